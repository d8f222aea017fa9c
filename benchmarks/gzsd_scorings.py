"""GZSD under each scoring (published, joint, soft), and ZSD under each of its own (published,
soft), on a finished ``vldus demo`` run.

Every synthesis row of the demo is re-scored from the demo's test cache (seconds per scoring),
so the scorings are compared on the same detector, classifier and calibration::

    python benchmarks/gzsd_scorings.py demo_out --out docs/results/scorings_seed0.json \\
        --note "2-core Intel Xeon, torch 2.14.1, default kernels"
    python benchmarks/make_tables.py        # the `scorings` table of docs/results.md

A row whose ``gzsd_calibration.json`` an older vldus wrote (without the soft fit) is calibrated
again first with ``vldus calibrate-gzsd`` (validation features and the generator; no test data).

Output JSON: ``{"note": str, "seed": int, "rows": {ROW: {SCORING: {"seen", "unseen", "hm":
mAP@0.5, "threshold": float | null, "slope": float | null, "seen_weight": float | null, "ran": the
scoring that ran (published when the calibration cannot separate the groups)}}}, "zsd": {ROW:
{SCORING: {"map": ZSD mAP@0.5, "threshold", "slope", "seen_weight", "ran"}}}}`` (GZSD under "rows").
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
from vldus.detection.gzsd import CALIBRATION_FILE, CALIBRATION_KEYS, SCORINGS, ZSD_SCORINGS  # noqa: E402
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


def score_row(demo: str, row: str, checkpoint: str, setting: str = "gzsd") -> dict:
    """{scoring: {"seen", "unseen", "hm" (GZSD) or "map" (ZSD), "threshold", "slope", "seen_weight",
    "ran"}} of one row in ``setting``."""
    config, synth = os.path.join(demo, "config.yaml"), os.path.join(demo, "work", f"synth_{row}")
    with open(os.path.join(synth, CALIBRATION_FILE)) as f:
        if not set(CALIBRATION_KEYS) <= set(json.load(f)):
            quiet_cli(["calibrate-gzsd", "--config", config, "--synth-dir", synth, "--checkpoint", checkpoint])
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scoring in SCORINGS if setting == "gzsd" else ZSD_SCORINGS:
            metrics = os.path.join(tmp, "metrics.json")
            quiet_cli(["test", "--config", config, "--checkpoint", checkpoint, f"--{setting}",
                       "--syn-weights", os.path.join(synth, "classifier_best.pth"), f"--{setting}-scoring", scoring,
                       "--cache", os.path.join(demo, "work", "test_cache"),
                       "--out", os.path.join(tmp, "dets.json"), "--metrics", metrics])
            with open(metrics) as f:
                m = json.load(f)
            ran = m[f"{setting}_scoring"]
            scores = ({"seen": m["groups"]["seen"]["map"]["0.5"], "unseen": m["groups"]["unseen"]["map"]["0.5"],
                       "hm": m["hm"]["map"]["0.5"]} if setting == "gzsd" else {"map": m["groups"]["unseen"]["map"]["0.5"]})
            result[scoring] = {**scores, "threshold": ran["threshold"], "slope": ran["slope"],
                               "seen_weight": ran["seen_weight"], "ran": ran["scoring"]}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo", help="a finished `vldus demo --out` folder (with work/test_cache)")
    p.add_argument("--out", required=True, help="JSON to write (docs/results/scorings_seedN.json)")
    p.add_argument("--note", default="", help="machine / settings, shown under the table")
    args = p.parse_args(argv)
    seed = load_config(os.path.join(args.demo, "config.yaml")).train.seed  # the demo's --seed
    checkpoint = latest_checkpoint(os.path.join(args.demo, "work", "detector"))
    names = synthesis_rows(args.demo)
    rows = {row: score_row(args.demo, row, checkpoint) for row in names}
    zsd = {row: score_row(args.demo, row, checkpoint, "zsd") for row in names}
    with open(args.out, "w") as f:
        json.dump({"note": args.note, "seed": seed, "rows": rows, "zsd": zsd}, f, indent=1)
        f.write("\n")
    for row, scorings in rows.items():
        print(row, ", ".join(f"{s} HM {v['hm']:.1f} (seen {v['seen']:.1f})" for s, v in scorings.items()) + "; ZSD " +
              ", ".join(f"{s} {v['map']:.1f}" for s, v in zsd[row].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
