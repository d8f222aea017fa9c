"""GZSD under each scoring (published, joint, soft), and ZSD under each of its own (published,
soft), on a finished ``vldus demo`` run.

Every synthesis row of the demo is re-scored from the demo's test cache (seconds per scoring),
so the scorings are compared on the same detector, classifier and calibration::

    python benchmarks/gzsd_scorings.py demo_out --out docs/results/scorings_seed0.json \\
        --note "2-core Intel Xeon, torch 2.14.1, default kernels"
    python benchmarks/make_tables.py        # the `scorings` table of docs/results.md

A row whose ``gzsd_calibration.json`` an older vldus wrote (without the soft fit) is calibrated
again first with ``vldus calibrate-gzsd`` (validation features and the generator; no test data).

``--gates`` adds the soft scoring under the opt-in gate variants (:data:`GATES`, docs/gzsd.md) as
scorings of their own, e.g. ``soft (two_weights+object)``: ``two_weights`` is calibrated again
(``inference.gate_fit: two_weights``) in a copy of the row's folder, ``object`` decides the gate
per object (``inference.gate_iou: 0.5``). ``--box-regressions best_seen`` adds every scoring
again with the unseen classes' box deltas of that rule (``inference.box_regression``; the demo's
own rule is the config's), named e.g. ``soft (best_seen boxes)``.

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
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vldus import cli  # noqa: E402
from vldus.config import load_config  # noqa: E402
from vldus.detection.gzsd import CALIBRATION_FILE, CALIBRATION_KEYS, SCORINGS, ZSD_SCORINGS  # noqa: E402
from vldus.detection.train import latest_checkpoint  # noqa: E402
from vldus.detection.zsd import BOX_REGRESSIONS  # noqa: E402

# opt-in variants of the soft gate (--gates): name -> (inference.gate_fit, inference.gate_iou)
GATES = {"two_weights": ("two_weights", None), "object": ("margin", 0.5), "two_weights+object": ("two_weights", 0.5)}


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


def score_row(demo: str, row: str, checkpoint: str, setting: str = "gzsd", gates: tuple[str, ...] = (),
              boxes: tuple[str, ...] = ()) -> dict:
    """{scoring: {"seen", "unseen", "hm" (GZSD) or "map" (ZSD), "threshold", "slope", "seen_weight",
    "ran"}} of one row in ``setting``: each scoring of the setting, then ``soft (GATE)`` for each
    name of ``gates``, then each scoring again with the box deltas of each rule of ``boxes``."""
    config, synth = os.path.join(demo, "config.yaml"), os.path.join(demo, "work", f"synth_{row}")
    with open(os.path.join(synth, CALIBRATION_FILE)) as f:
        if not set(CALIBRATION_KEYS) <= set(json.load(f)):
            quiet_cli(["calibrate-gzsd", "--config", config, "--synth-dir", synth, "--checkpoint", checkpoint])
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        # (name in the output, synthesizer folder, scoring options of vldus test)
        scorings = SCORINGS if setting == "gzsd" else ZSD_SCORINGS
        runs = [(scoring, synth, [f"--{setting}-scoring", scoring]) for scoring in scorings]
        for name in gates:
            fit, iou = GATES[name]
            runs.append((f"soft ({name})", calibrated_copy(config, synth, checkpoint, fit, tmp),
                         [f"--{setting}-scoring", "soft", "--set", f"inference.gate_fit={fit}",
                          f"inference.gate_iou={'null' if iou is None else iou}"]))
        runs += [(f"{scoring} ({rule} boxes)", synth,
                  [f"--{setting}-scoring", scoring, "--set", f"inference.box_regression={rule}"])
                 for rule in boxes for scoring in scorings]
        for scoring, folder, options in runs:
            metrics = os.path.join(tmp, "metrics.json")
            quiet_cli(["test", "--config", config, "--checkpoint", checkpoint, f"--{setting}",
                       "--syn-weights", os.path.join(folder, "classifier_best.pth"), *options,
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


def calibrated_copy(config: str, synth: str, checkpoint: str, fit: str, tmp: str) -> str:
    """``synth`` itself for the default fit, else a copy of its classifier and generator under
    ``tmp`` calibrated with ``inference.gate_fit: fit`` (made once per fit)."""
    if fit == "margin":
        return synth
    folder = os.path.join(tmp, f"synth_{fit}")
    if not os.path.isdir(folder):
        os.makedirs(folder)
        for name in ("classifier_best.pth", "generator.pth"):
            shutil.copy2(os.path.join(synth, name), folder)
        quiet_cli(["calibrate-gzsd", "--config", config, "--synth-dir", folder, "--checkpoint", checkpoint,
                   "--set", f"inference.gate_fit={fit}"])
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo", help="a finished `vldus demo --out` folder (with work/test_cache)")
    p.add_argument("--out", required=True, help="JSON to write (docs/results/scorings_seedN.json)")
    p.add_argument("--note", default="", help="machine / settings, shown under the table")
    p.add_argument("--gates", nargs="*", default=[], choices=list(GATES),
                   help="also the soft scoring with these opt-in gate variants (docs/gzsd.md)")
    p.add_argument("--box-regressions", nargs="*", default=[], choices=list(BOX_REGRESSIONS),
                   help="also every scoring with these unseen box deltas (inference.box_regression)")
    args = p.parse_args(argv)
    seed = load_config(os.path.join(args.demo, "config.yaml")).train.seed  # the demo's --seed
    checkpoint = latest_checkpoint(os.path.join(args.demo, "work", "detector"))
    names = synthesis_rows(args.demo)
    gates, boxes = tuple(args.gates), tuple(args.box_regressions)
    rows = {row: score_row(args.demo, row, checkpoint, gates=gates, boxes=boxes) for row in names}
    zsd = {row: score_row(args.demo, row, checkpoint, "zsd", gates, boxes) for row in names}
    with open(args.out, "w") as f:
        json.dump({"note": args.note, "seed": seed, "rows": rows, "zsd": zsd}, f, indent=1)
        f.write("\n")
    for row, scorings in rows.items():
        print(row, ", ".join(f"{s} HM {v['hm']:.1f} (seen {v['seen']:.1f})" for s, v in scorings.items()) + "; ZSD " +
              ", ".join(f"{s} {v['map']:.1f}" for s, v in zsd[row].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
