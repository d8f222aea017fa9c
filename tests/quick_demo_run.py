"""The one trained pipeline of the test suite: ``vldus demo --quick``, run once per test session
(the demo exports its main row with ``vldus export``, as a user does).

Used by the modules of :data:`MODULES`: tests/test_demo.py (the demo's own assertions),
tests/test_api.py and tests/test_bundle.py (the exported model).
Everything runs through ``vldus.cli.main`` like a user's commands. Under pytest-xdist (``make test``
runs two workers) tests/conftest.py sends all of them to one worker, so the run happens once while
the other worker goes through the rest of the suite.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from typing import NamedTuple

MODULES = ("test_api.py", "test_bundle.py", "test_demo.py")


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
    """Run (once per process) and return ``vldus demo --quick``."""
    if "run" in _CACHE:
        return _CACHE["run"]
    from vldus import cli
    from vldus.detection.train import latest_checkpoint

    out = tempfile.mkdtemp(prefix="vldus_quick_demo_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    start = time.perf_counter()
    rc = cli.main(["demo", "--out", out, "--quick", "--quiet"])
    if rc:
        raise RuntimeError(f"vldus demo --quick failed (exit {rc})")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    run = DemoRun(out, os.path.join(out, "config.yaml"), latest_checkpoint(os.path.join(out, "work", "detector")),
                  os.path.join(out, "work", f"synth_{metrics['method']}"), os.path.join(out, "shapes"),
                  tuple(metrics["unseen"]), metrics, time.perf_counter() - start)
    _CACHE["run"] = run
    return run


def quick_bundle() -> str:
    """The quick demo's main model as the demo exported it (``vldus export`` into OUT/bundle)."""
    return quick_demo().metrics["bundle"]


def first_image(run: DemoRun) -> str:
    images = os.path.join(run.shapes, "images")
    return os.path.join(images, sorted(os.listdir(images))[0])
