"""bf16 against fp32 on finished demo runs: accuracy and synthesizer time (docs/benchmarks.md).

For each ``vldus demo`` folder given, re-trains the synthesizer of each synthesis row with
``gan.precision=bf16`` (same detector, features, CLIP, seeds and options as the demo's fp32 row)
and scores it from the demo's test cache; prints one line per run and row and the mean and sd of
the differences (bf16 - fp32) in ZSD mAP and GZSD HM at IoU 0.5.

    python benchmarks/precision_parity.py DEMO_OUT [DEMO_OUT ...] [--rows synthesis_su synthesis_vldus]

bf16 only pays off where the CPU multiplies bfloat16 natively (AVX-512-bf16, AMX) or on a GPU;
this script prints which CPU ran it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _stage(argv: list[str], what: str) -> None:
    """Run one vldus command with its stdout kept out of the summary; exit naming ``what`` on failure."""
    from vldus import cli

    with contextlib.redirect_stdout(io.StringIO()):
        if cli.main(argv + ["--quiet"]):
            raise SystemExit(f"{argv[0]} failed for {what}")


def retrain(demo: str, row: str) -> dict:
    """Re-run the demo's ``row`` at bf16; returns {"zsd", "hm", "gan_s"} of bf16 and of fp32."""
    from vldus.demo import ROWS
    from vldus.detection.train import latest_checkpoint

    cfg_path = os.path.join(demo, "config.yaml")
    work = os.path.join(demo, "work")
    ckpt = latest_checkpoint(os.path.join(work, "detector"))
    fp32_dir = os.path.join(work, f"synth_{row}")
    out = os.path.join(work, f"synth_{row}_bf16")
    sets = ["gan.precision=bf16"]
    if ROWS[row].clip:  # the demo's own CLIP (a --clip-weights run is not supported here)
        clip = os.path.join(demo, "clip")
        sets += [f"gan.clip_arch={clip}/open_clip_config.json", f"gan.clip_weights={clip}/open_clip_model.safetensors",
                 f"embeddings.text_file={work}/clip_text_main.npy"]
    _stage(["train-generator", "--config", cfg_path, "--out-dir", out, "--checkpoint", ckpt, *ROWS[row].generator,
            "--set", *sets], f"{demo} {row}")
    result = {}
    for name, folder in (("bf16", out), ("fp32", fp32_dir)):
        scores = {}
        for setting in ("zsd", "gzsd"):
            dets = os.path.join(folder, f"parity_{setting}.json")
            _stage(["test", "--config", cfg_path, "--checkpoint", ckpt, "--syn-weights",
                    os.path.join(folder, "classifier_best.pth"), f"--{setting}", "--cache",
                    os.path.join(work, "test_cache"), "--out", dets, "--metrics", dets + ".m.json"], folder)
            m = json.load(open(dets + ".m.json"))
            scores[setting] = m["groups"]["unseen"]["map"]["0.5"] if setting == "zsd" else m["hm"]["map"]["0.5"]
        meta = json.load(open(os.path.join(folder, "meta.json")))
        result[name] = {"zsd": scores["zsd"], "hm": scores["gzsd"], "gan_s": meta["timings_s"]["gan"],
                        "precision": meta["settings"]["precision"]}
    assert result["fp32"]["precision"] == "fp32" and result["bf16"]["precision"] == "bf16"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demos", nargs="+", metavar="DEMO_OUT")
    ap.add_argument("--rows", nargs="+", default=["synthesis_su", "synthesis_vldus"])
    args = ap.parse_args()
    from benchmarks.bench_gan import cpu_description

    print(cpu_description())
    diffs: dict[str, list] = {"zsd": [], "hm": [], "speed": []}
    for demo in args.demos:
        for row in args.rows:
            r = retrain(demo, row)
            b, f = r["bf16"], r["fp32"]
            print(f"{demo} {row}: fp32 ZSD {f['zsd']:.1f} HM {f['hm']:.1f} GAN {f['gan_s']:.0f} s | "
                  f"bf16 ZSD {b['zsd']:.1f} HM {b['hm']:.1f} GAN {b['gan_s']:.0f} s", flush=True)
            diffs["zsd"].append(b["zsd"] - f["zsd"])
            diffs["hm"].append(b["hm"] - f["hm"])
            diffs["speed"].append(f["gan_s"] / b["gan_s"])
    for key, values in diffs.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        label = "fp32/bf16 GAN time" if key == "speed" else f"bf16 - fp32 {key}"
        print(f"{label}: mean {statistics.mean(values):+.2f}, sd {sd:.2f} over {len(values)} runs")
    print(json.dumps(diffs))


if __name__ == "__main__":
    main()
