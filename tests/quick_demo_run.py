"""The one trained pipeline of the test suite: ``vldus demo --quick``, run once per test session
(the demo exports its main row with ``vldus export``, as a user does).

Used by the modules of :data:`MODULES`: tests/test_demo.py (the demo's own assertions),
tests/test_api.py and tests/test_bundle.py (the exported model).
Everything runs through ``vldus.cli.main`` like a user's commands. Under pytest-xdist (``make test``
runs two workers) the run is shared: tests/conftest.py names one folder for the whole session
(:data:`SHARED_ENV`), the first worker that needs the demo runs it there while holding a lock on
the folder, and a worker that needs it meanwhile waits for the lock and reads the finished run.
tests/conftest.py starts the demo's modules on one worker and holds the tests of
:data:`LATE_MODULES` back until every other test is handed out, then gives them to whichever
worker is free: the other worker, when it has run everything else, shares the demo's tests
instead of idling.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from typing import Iterator, NamedTuple

MODULES = ("test_api.py", "test_bundle.py", "test_demo.py")
LATE_MODULES = ("test_api.py",)  # over half of the demo's test time, shared by both workers at the end
SHARED_ENV = "VLDUS_QUICK_DEMO_DIR"  # the session's demo folder, set by tests/conftest.py under xdist


class DemoRun(NamedTuple):
    out: str          # the demo's --out folder
    config: str       # OUT/config.yaml
    checkpoint: str   # OUT/work/detector/epoch_N.pth
    synth_dir: str    # OUT/work/synth_synthesis_vldus (the main method's)
    shapes: str       # OUT/shapes (the benchmark)
    unseen: tuple     # the unseen class names
    metrics: dict     # OUT/metrics.json
    seconds: float


_CACHE: dict = {}


def quick_demo() -> DemoRun:
    """Run (once per session under xdist, else once per process) and return ``vldus demo --quick``."""
    if "run" not in _CACHE:
        shared = os.environ.get(SHARED_ENV)
        if shared:
            _CACHE["run"] = shared_run(shared)
        else:
            out = tempfile.mkdtemp(prefix="vldus_quick_demo_")
            atexit.register(shutil.rmtree, out, ignore_errors=True)
            _CACHE["run"] = run_demo(os.path.join(out, "demo"))
    return _CACHE["run"]


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """No GPU for this process and its children: the suite compares the demo's files with the
    API's CPU results and with the numbers of docs/results, which are the CPU's."""
    import torch

    before, available = os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = lambda: False
    try:
        yield
    finally:
        torch.cuda.is_available = available
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def run_demo(out: str) -> DemoRun:
    """``vldus demo --quick --out out`` on the CPU, timed."""
    from vldus import cli

    start = time.perf_counter()
    with on_cpu():
        rc = cli.main(["demo", "--out", out, "--quick", "--no-select", "--quiet"])
    if rc:
        raise RuntimeError(f"vldus demo --quick failed (exit {rc})")
    return finished_run(out, time.perf_counter() - start)


def finished_run(out: str, seconds: float) -> DemoRun:
    """The :class:`DemoRun` of the finished demo in ``out`` that took ``seconds``."""
    from vldus.detection.train import latest_checkpoint

    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return DemoRun(out, os.path.join(out, "config.yaml"), latest_checkpoint(os.path.join(out, "work", "detector")),
                   os.path.join(out, "work", f"synth_{metrics['method']}"), os.path.join(out, "shapes"),
                   tuple(metrics["unseen"]), metrics, seconds)


def shared_run(folder: str) -> DemoRun:
    """The demo in ``folder``/demo, run by the first process that asks (holding an exclusive lock
    on ``folder``/lock); the others block on the lock, then read its outcome from
    ``folder``/outcome.json: ``{"seconds": s}``, or ``{"error": message}`` when it failed (they
    fail with that message instead of running it again)."""
    from vldus.files import write_json

    out, outcome = os.path.join(folder, "demo"), os.path.join(folder, "outcome.json")
    with open(os.path.join(folder, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(outcome):
            try:
                run = run_demo(out)
            except BaseException as e:
                write_json(outcome, {"error": f"{type(e).__name__}: {e}"})
                raise
            write_json(outcome, {"seconds": run.seconds})
            return run
    with open(outcome) as f:
        state = json.load(f)
    if "error" in state:
        raise RuntimeError(f"vldus demo --quick failed in another worker: {state['error']}")
    return finished_run(out, state["seconds"])


def quick_bundle() -> str:
    """The quick demo's main model as the demo exported it (``vldus export`` into OUT/bundle)."""
    return quick_demo().metrics["bundle"]


def first_image(run: DemoRun) -> str:
    images = os.path.join(run.shapes, "images")
    return os.path.join(images, sorted(os.listdir(images))[0])
