"""benchmarks/device_check.sh --cpu --tiny: the GPU check's every step, on the CPU, on the quick
demo's run, so the script is known to work before a GPU machine ever runs it."""
import json
import os
import subprocess

import pytest

from quick_demo_run import quick_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(600)


def test_every_step_runs_and_one_table_is_printed(tmp_path):
    run = quick_demo()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=__import__("sys").executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--cpu", "--tiny",
                        "--demo", run.out, "--out", str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    steps = ["demo", "bench_gan", "bench_detector", "dist_test", "parity"]
    assert [line.split("|")[1].strip() for line in table[1:]] == steps
    report = json.load(open(tmp_path / "device_check.json"))
    assert all(report["steps"][s]["ok"] for s in steps)
    assert report["steps"]["bench_gan"]["samples_per_s"]["fp32"] > 0
    assert report["steps"]["parity"]["matched_fraction"] == 1.0  # CPU against itself
    # the torchrun test scores the same detector and classifier as the demo
    assert report["steps"]["dist_test"]["zsd_map"] > 0


def test_compare_detections_finds_a_moved_box():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from device_check import compare_detections

    a = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.9},
         {"image_id": 1, "category_id": 4, "bbox": [50, 50, 10, 10], "score": 0.2}]  # below 0.3: not checked
    same = compare_detections(a, a)
    assert same["matched_fraction"] == 1.0 and same["max_score_diff"] == 0.0 and same["confident"] == 1
    moved = [dict(a[0], bbox=[14, 10, 20, 20], score=0.85)]
    assert compare_detections(a, moved)["matched_fraction"] == 0.0  # IoU 0.67 < 0.95
    nudged = [dict(a[0], bbox=[10.1, 10, 20, 20], score=0.88)]
    res = compare_detections(a, nudged)
    assert res["matched_fraction"] == 1.0 and abs(res["max_score_diff"] - 0.02) < 1e-9
