"""GZSD under each scoring (published, joint, soft) on a finished ``vldus demo`` run.

Every synthesis row of the demo is re-scored from the demo's test cache (seconds per scoring),
so the scorings are compared on the same detector, classifier and calibration::

    python benchmarks/gzsd_scorings.py demo_out --out docs/results/scorings_seed0.json \\
        --note "2-core Intel Xeon, torch 2.14.1, default kernels"
    python benchmarks/make_tables.py        # the `scorings` table of docs/results.md

A row whose ``gzsd_calibration.json`` an older vldus wrote (without the soft fit) is calibrated
again first with ``vldus calibrate-gzsd`` (validation features and the generator; no test data).

Output JSON: ``{"note": str, "seed": int, "rows": {ROW: {SCORING: {"seen", "unseen", "hm":
mAP@0.5, "threshold": float | null, "slope": float | null, "ran": the scoring that ran (published
when the calibration cannot separate the groups)}}}}``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vldus import cli  # noqa: E402
from vldus.config import load_config  # noqa: E402
from vldus.detection.gzsd import CALIBRATION_FILE, CALIBRATION_KEYS, SCORINGS  # noqa: E402
from vldus.detection.train import latest_checkpoint  # noqa: E402


def quiet_cli(argv: list[str]) -> None:
    """``vldus ARGV`` with its output swallowed; SystemExit with the output when it fails."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(argv + ["--quiet"])
    if code:
        raise SystemExit(f"vldus {' '.join(argv[:1])} failed (exit {code}):\n{out.getvalue()[-2000:]}")


def synthesis_rows(demo: str) -> list[str]:
    """The demo's rows with a synthesized classifier and generator (work/synth_ROW/)."""
    with open(os.path.join(demo, "metrics.json")) as f:
        rows = json.load(f)["ablation"]
    return [r for r in rows if os.path.isfile(os.path.join(demo, "work", f"synth_{r}", "generator.pth"))]


def score_row(demo: str, row: str, checkpoint: str) -> dict:
    """{scoring: {"seen", "unseen", "hm", "threshold", "slope"}} of one row."""
    config, synth = os.path.join(demo, "config.yaml"), os.path.join(demo, "work", f"synth_{row}")
    with open(os.path.join(synth, CALIBRATION_FILE)) as f:
        if not set(CALIBRATION_KEYS) <= set(json.load(f)):
            quiet_cli(["calibrate-gzsd", "--config", config, "--synth-dir", synth, "--checkpoint", checkpoint])
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scoring in SCORINGS:
            metrics = os.path.join(tmp, "metrics.json")
            quiet_cli(["test", "--config", config, "--checkpoint", checkpoint, "--gzsd",
                       "--syn-weights", os.path.join(synth, "classifier_best.pth"), "--gzsd-scoring", scoring,
                       "--cache", os.path.join(demo, "work", "test_cache"),
                       "--out", os.path.join(tmp, "dets.json"), "--metrics", metrics])
            with open(metrics) as f:
                m = json.load(f)
            result[scoring] = {"seen": m["groups"]["seen"]["map"]["0.5"], "unseen": m["groups"]["unseen"]["map"]["0.5"],
                               "hm": m["hm"]["map"]["0.5"], "threshold": m["gzsd_scoring"]["threshold"],
                               "slope": m["gzsd_scoring"]["slope"], "ran": m["gzsd_scoring"]["scoring"]}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo", help="a finished `vldus demo --out` folder (with work/test_cache)")
    p.add_argument("--out", required=True, help="JSON to write (docs/results/scorings_seedN.json)")
    p.add_argument("--note", default="", help="machine / settings, shown under the table")
    args = p.parse_args(argv)
    seed = load_config(os.path.join(args.demo, "config.yaml")).train.seed  # the demo's --seed
    checkpoint = latest_checkpoint(os.path.join(args.demo, "work", "detector"))
    rows = {row: score_row(args.demo, row, checkpoint) for row in synthesis_rows(args.demo)}
    with open(args.out, "w") as f:
        json.dump({"note": args.note, "seed": seed, "rows": rows}, f, indent=1)
        f.write("\n")
    for row, scorings in rows.items():
        print(row, ", ".join(f"{s} HM {v['hm']:.1f} (seen {v['seen']:.1f})" for s, v in scorings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
