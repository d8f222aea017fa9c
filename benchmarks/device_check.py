"""One prepared check for the day a GPU machine is lent (``benchmarks/device_check.sh``).

Steps, each timed, then one table (and ``device_check.json`` in --out):

1. ``demo``: ``vldus demo --quick`` on the device (``--tiny``: ``vldus demo --tiny``; ``--demo DIR``
   reuses a finished demo run instead);
2. ``bench_gan``: benchmarks/bench_gan.py at COCO 65/15 settings, fp32 and bf16;
3. ``bench_detector``: benchmarks/bench_detector.py, ResNet-101-FPN at 1333x800 (``--tiny``:
   the MobileNetV2 ``shapes`` case);
4. ``dist_test``: tools/dist_test.sh (torchrun, one process) on the demo's detector and classifier;
5. ``parity``: ``vldus test`` of the demo's VLDUS classifier on CPU and on the device; the
   detections must agree (same class, box IoU >= 0.95, score within 0.02 for the detections
   scoring >= 0.3).

    benchmarks/device_check.sh [--cpu] [--tiny] [--demo DIR] [--out DIR]

On a CUDA machine the whole check is sized to finish in under 8 minutes; ``--cpu --tiny`` runs
the same steps on the CPU in seconds (the test suite runs it, with ``--demo``, so the script is
known to work before a GPU ever runs it). Exit code 1 when a step fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def sh(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Steps: each returns (ok, one-line summary, details dict)
# --------------------------------------------------------------------------------------------
def step_demo(args, work: str) -> tuple[bool, str, dict]:
    if args.demo:
        demo = args.demo
    else:
        demo = os.path.join(work, "demo")
        r = sh([PY, "-m", "vldus.cli", "demo", "--out", demo, "--quiet", "--tiny" if args.tiny else "--quick"],
               env=_device_env(args), timeout=900)
        if r.returncode:
            return False, f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", {}
    m = json.load(open(os.path.join(demo, "metrics.json")))
    rows = {k: (v["zsd_map"], v["gzsd_hm"]) for k, v in m["ablation"].items() if v["status"] == "ok"}
    summary = ", ".join(f"{k} ZSD {z:.1f} HM {h:.1f}" for k, (z, h) in rows.items())
    args.demo_dir = demo
    return True, summary + f"; {sum(m['timings_s'].values()):.0f} s", {"ablation": rows, "timings_s": m["timings_s"]}


def step_bench_gan(args, work: str) -> tuple[bool, str, dict]:
    cmd = [PY, "benchmarks/bench_gan.py", "--device", args.device, "--rss-rows", "0"]
    cmd += ["--precision", "fp32", "--iterations", "2", "--repeat", "1"] if args.tiny else \
        ["--precision", "both", "--iterations", "60", "--repeat", "2"]
    r = sh(cmd, timeout=300)
    if r.returncode:
        return False, f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", {}
    res = last_json(r.stdout)
    rates = {k.split("/")[-1]: v["samples_per_s"] for k, v in res.items()
             if k.startswith(f"{args.device}/vldus/")}
    return True, ", ".join(f"{p} {v:.0f} samples/s" for p, v in rates.items()), {"samples_per_s": rates}


def step_bench_detector(args, work: str) -> tuple[bool, str, dict]:
    case, iters = ("shapes", 1) if args.tiny else ("r101_1333", 20)
    r = sh([PY, "benchmarks/bench_detector.py", "--worker", case, "--iters", str(iters), "--device", args.device],
           timeout=300)
    if r.returncode:
        return False, f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", {}
    res = last_json(r.stdout)
    mem = f", peak CUDA {res['peak_cuda_mb']} MB" if "peak_cuda_mb" in res else ""
    return True, f"{res['backbone']} {res['scale']}: {res['s_per_iter']:.3f} s/iter{mem}", res


def _demo_files(demo: str) -> dict:
    from vldus.detection.train import latest_checkpoint

    work = os.path.join(demo, "work")
    return {"config": os.path.join(demo, "config.yaml"),
            "checkpoint": latest_checkpoint(os.path.join(work, "detector")),
            "classifier": os.path.join(work, "synth_synthesis_vldus", "classifier_best.pth")}


def step_dist_test(args, work: str) -> tuple[bool, str, dict]:
    f = _demo_files(args.demo_dir)
    out = os.path.join(work, "dist_test.json")
    env = {"PYTHON": PY, "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    r = sh(["bash", "tools/dist_test.sh", f["config"], f["checkpoint"], "1", "--syn-weights", f["classifier"],
            "--zsd", "--out", out, "--metrics", out + ".metrics.json", "--quiet", *_max_images(args)], env=env)
    if r.returncode:
        return False, f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", {}
    m = json.load(open(out + ".metrics.json"))
    zsd = m["groups"]["unseen"]["map"]["0.5"]
    return True, f"torchrun 1 process: ZSD mAP {zsd:.1f} in {time.perf_counter() - start:.1f} s", {"zsd_map": zsd}


def step_parity(args, work: str) -> tuple[bool, str, dict]:
    f = _demo_files(args.demo_dir)
    runs = {}
    for device in dict.fromkeys(["cpu", args.device]):
        out = os.path.join(work, f"parity_{device}.json")
        r = sh([PY, "-m", "vldus.cli", "test", "--config", f["config"], "--checkpoint", f["checkpoint"],
                "--syn-weights", f["classifier"], "--gzsd", "--device", device, "--out", out, "--quiet",
                *_max_images(args)])
        if r.returncode:
            return False, f"{device}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", {}
        runs[device] = json.load(open(out))
    cpu, dev = runs["cpu"], runs[args.device]
    res = compare_detections(cpu, dev)
    ok = res["matched_fraction"] >= 0.99 and res["max_score_diff"] <= 0.02
    return ok, (f"cpu vs {args.device}: {res['matched']}/{res['confident']} confident detections matched, "
                f"max score diff {res['max_score_diff']:.4f}"), res


def compare_detections(a: list[dict], b: list[dict], min_score: float = 0.3) -> dict:
    """Match each detection of ``a`` scoring >= ``min_score`` to one of ``b`` in the same image and
    class with box IoU >= 0.95; the fraction matched and the largest score difference."""
    import numpy as np

    by_key: dict = {}
    for d in b:
        by_key.setdefault((d["image_id"], d["category_id"]), []).append(d)
    confident = [d for d in a if d["score"] >= min_score]
    matched, diffs = 0, [0.0]
    for d in confident:
        best, best_iou = None, 0.0
        for e in by_key.get((d["image_id"], d["category_id"]), []):
            iou = _iou(np.array(d["bbox"]), np.array(e["bbox"]))
            if iou > best_iou:
                best, best_iou = e, iou
        if best is not None and best_iou >= 0.95:
            matched += 1
            diffs.append(abs(best["score"] - d["score"]))
    return {"confident": len(confident), "matched": matched,
            "matched_fraction": matched / max(len(confident), 1), "max_score_diff": max(diffs)}


def _iou(a, b) -> float:
    """IoU of two [x, y, w, h] boxes."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-9)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_images(args) -> list[str]:
    return ["--max-images", "8"] if args.tiny else []


def _device_env(args) -> dict:
    return {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}


STEPS = (("demo", step_demo), ("bench_gan", step_bench_gan), ("bench_detector", step_bench_detector),
         ("dist_test", step_dist_test), ("parity", step_parity))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (default: CUDA, which must be present)")
    ap.add_argument("--tiny", action="store_true", help="the smallest sizes: a smoke run in seconds")
    ap.add_argument("--demo", metavar="DIR", help="reuse a finished `vldus demo` run instead of running one")
    ap.add_argument("--out", metavar="DIR", default=os.environ.get("OUT") or "device_check_out",
                    help="work folder; device_check.json goes there (default $OUT or ./device_check_out)")
    args = ap.parse_args()
    import torch

    args.device = "cpu" if args.cpu else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: error: no CUDA device (use --cpu)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    work = os.path.abspath(args.out)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    rows, report = [], {"device": gpu, "torch": torch.__version__, "tiny": args.tiny, "steps": {}}
    for name, step in STEPS:
        start = time.perf_counter()
        try:
            ok, summary, details = step(args, work)
        except Exception as e:  # noqa: BLE001 -- a broken step is reported, the others still run
            ok, summary, details = False, f"{type(e).__name__}: {e}", {}
        seconds = time.perf_counter() - start
        rows.append((name, "ok" if ok else "FAILED", seconds, summary))
        report["steps"][name] = {"ok": ok, "seconds": round(seconds, 1), "summary": summary, **details}
        print(f"[{name}] {'ok' if ok else 'FAILED'} ({seconds:.1f} s): {summary}", flush=True)
        if name == "demo" and not ok:
            break  # the later steps need the demo's files
    print(f"\n| step | status | seconds | result ({gpu}, torch {torch.__version__}) |\n|---|---|---|---|")
    for name, status, seconds, summary in rows:
        print(f"| {name} | {status} | {seconds:.1f} | {summary} |")
    with open(os.path.join(work, "device_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    return 0 if all(r[1] == "ok" for r in rows) and len(rows) == len(STEPS) else 1


if __name__ == "__main__":
    sys.exit(main())
