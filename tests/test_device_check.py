"""benchmarks/device_check.sh: the GPU check's every step on the CPU (``--tiny``, with its own
``vldus demo --tiny``), so the script is known to work before a GPU machine ever runs it; its step
runner (own timeouts, JSON rewritten after every step, a failed step does not stop the others) and
the one-to-one comparison of two detection files.

The whole rehearsal (marked ``rehearsal``) runs speed benchmarks and trains a pipeline of its own,
so ``make test`` leaves it out and ``make rehearse`` (run by ``.ci/run`` after ``make test``) runs
it; the other tests here are part of ``make test``."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import device_check  # noqa: E402
from device_check import compare_detections  # noqa: E402

STEPS = ["setup", "bench_gan", "bench_detector", "demo", "parity", "dist_test", "dist_train"]


@pytest.mark.rehearsal
@pytest.mark.timeout(600)
def test_every_step_runs_and_one_table_is_printed(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--cpu", "--tiny",
                        "--out", str(out), "--work", str(work)],
                       capture_output=True, text=True, env=env, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == STEPS
    report = json.load(open(out / "device_check.json"))
    assert report["finished"] and list(report["steps"]) == STEPS
    assert all(report["steps"][s]["ok"] and report["steps"][s]["status"] == "ok" for s in STEPS)
    assert all(report["steps"][s]["seconds"] <= report["steps"][s]["timeout_s"] + 5 for s in STEPS)
    assert report["steps"]["setup"]["missing"] == [] and report["steps"]["setup"]["pycocotools"]
    assert report["steps"]["bench_gan"]["samples_per_s"]["fp32"] > 0
    # torchrun with 2 processes (a process group, detections gathered on rank 0) gives the one
    # process's detections, every one matched one-to-one
    dist = report["steps"]["dist_test"]["cpu_x2"]
    assert dist["matched_fraction"] == 1.0 and dist["confident_a"] > 0 and dist["confident_a"] == dist["confident_b"]
    # few files come back from the device machine; the work folder holds the rest
    assert sorted(os.listdir(out)) == ["demo_metrics.json", "device_check.json", "device_check.log"]
    assert (work / "parity_cpu.json").exists() and (work / "dist_test_cpu.json").exists()
    # one torchrun process trained one epoch (gloo on the CPU) and rank 0 saved and validated it
    train = report["steps"]["dist_train"]
    assert train["backend"] == "gloo" and "epoch_1.pth" in train["summary"]


def det(image, cls, box, score):
    return {"image_id": image, "category_id": cls, "bbox": box, "score": score}


def test_compare_detections_identical_and_moved():
    a = [det(1, 3, [10, 10, 20, 20], 0.9), det(1, 4, [50, 50, 10, 10], 0.2)]  # 0.2: not confident
    same = compare_detections(a, a)
    assert same == {"confident_a": 1, "confident_b": 1, "matched": 1, "unmatched_a": 0, "unmatched_b": 0,
                    "matched_fraction": 1.0, "max_score_diff": 0.0}
    moved = [det(1, 3, [14, 10, 20, 20], 0.85)]  # IoU 0.67 < 0.95
    res = compare_detections(a, moved)
    assert (res["matched"], res["unmatched_a"], res["unmatched_b"], res["matched_fraction"]) == (0, 1, 1, 0.0)
    nudged = [det(1, 3, [10.1, 10, 20, 20], 0.88)]
    res = compare_detections(a, nudged)
    assert res["matched_fraction"] == 1.0 and res["max_score_diff"] == pytest.approx(0.02)
    other_class, other_image = [det(1, 5, [10, 10, 20, 20], 0.9)], [det(2, 3, [10, 10, 20, 20], 0.9)]
    assert compare_detections(a, other_class)["matched"] == 0
    assert compare_detections(a, other_image)["matched"] == 0


def test_compare_detections_is_one_to_one():
    # two confident detections of a on one box of b: one pair, one left over (the old one-way
    # match paired both with the same detection of b)
    a = [det(1, 3, [10, 10, 20, 20], 0.9), det(1, 3, [10.2, 10, 20, 20], 0.8)]
    b = [det(1, 3, [10, 10, 20, 20], 0.9)]
    res = compare_detections(a, b)
    assert (res["matched"], res["unmatched_a"], res["unmatched_b"]) == (1, 1, 0)
    assert res["matched_fraction"] == pytest.approx(2 / 3) and res["max_score_diff"] == 0.0
    # the same the other way round
    res = compare_detections(b, a)
    assert (res["matched"], res["unmatched_a"], res["unmatched_b"]) == (1, 0, 1)


def test_compare_detections_counts_both_directions():
    # b's extra confident detection counts against the match (the old match only looked from a)
    a = [det(1, 3, [10, 10, 20, 20], 0.9)]
    b = a + [det(1, 7, [60, 60, 20, 20], 0.7)]
    res = compare_detections(a, b)
    assert (res["confident_a"], res["confident_b"], res["unmatched_a"], res["unmatched_b"]) == (1, 2, 0, 1)
    assert res["matched_fraction"] == pytest.approx(2 / 3)
    # a twin just under the score line on one side still pairs (and shows the score difference)
    near = [det(1, 3, [10, 10, 20, 20], 0.29)]
    res = compare_detections([det(1, 3, [10, 10, 20, 20], 0.31)], near)
    assert (res["matched"], res["unmatched_a"], res["unmatched_b"], res["confident_b"]) == (1, 0, 0, 0)
    assert res["max_score_diff"] == pytest.approx(0.02)
    # two unconfident twins are not compared at all
    assert compare_detections(near, near)["matched"] == 0


def test_compare_detections_pairs_the_closest_boxes_first():
    # a0 fits b1 best (IoU 1), a1 fits b0 best; each used once, so both pairs form, and the score
    # differences are those of the closest boxes
    a = [det(1, 3, [10, 10, 20, 20], 0.9), det(1, 3, [10.5, 10, 20, 20], 0.6)]
    b = [det(1, 3, [10.5, 10, 20, 20], 0.59), det(1, 3, [10, 10, 20, 20], 0.8)]
    res = compare_detections(a, b)
    assert (res["matched"], res["unmatched_a"], res["unmatched_b"]) == (2, 0, 0)
    assert res["max_score_diff"] == pytest.approx(0.1)


def run_main(monkeypatch, tmp_path, steps, budget=60):
    monkeypatch.setattr(device_check, "STEPS", steps)
    monkeypatch.setattr(device_check, "CPU_SLOWER", 1)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # main() prepends to both
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(device_check.signal, "signal", lambda *args: None)
    monkeypatch.setattr(sys, "argv", ["device_check.py", "--cpu", "--out", str(tmp_path / "out"),
                                      "--work", str(tmp_path / "work"), "--budget", str(budget)])
    code = device_check.main()
    return code, json.load(open(tmp_path / "out" / "device_check.json"))


def test_steps_run_on_after_a_failure_and_a_timeout(monkeypatch, tmp_path):
    seen = {}

    def fails(ctx):
        raise RuntimeError("broken")

    def hangs(ctx):
        ctx.run([sys.executable, "-c", "import time; time.sleep(60)"])
        return True, "never", {}

    def looks(ctx):  # the JSON on disk already holds the earlier steps' results
        seen.update(json.load(open(os.path.join(ctx.args.out, "device_check.json")))["steps"])
        return True, "fine", {"figure": 1.5}

    code, report = run_main(monkeypatch, tmp_path, (("fails", fails, 10, 1), ("hangs", hangs, 2, 1),
                                                    ("looks", looks, 10, 1)))
    assert code == 1 and report["finished"]
    assert report["steps"]["fails"]["status"] == "failed" and "broken" in report["steps"]["fails"]["summary"]
    assert report["steps"]["hangs"]["status"] == "timeout" and report["steps"]["hangs"]["seconds"] < 10
    assert report["steps"]["looks"] == dict(report["steps"]["looks"], ok=True, status="ok", figure=1.5)
    assert seen["fails"]["status"] == "failed" and seen["hangs"]["status"] == "timeout"
    assert seen["looks"]["status"] == "running"
    log = open(tmp_path / "out" / "device_check.log").read()
    assert "killed at the step's timeout" in log


def test_step_timeouts_keep_time_for_the_later_steps(monkeypatch, tmp_path):
    def ok(ctx):
        return True, "", {}

    code, report = run_main(monkeypatch, tmp_path, (("a", ok, 100, 5), ("b", ok, 100, 20), ("c", ok, 100, 30)),
                            budget=100)
    assert code == 0
    timeouts = [report["steps"][s]["timeout_s"] for s in "abc"]
    assert timeouts[0] == pytest.approx(50, abs=1)  # 100 s less the 20 + 30 kept for b and c
    assert timeouts[1] <= 70 and timeouts[2] <= 100
    # a step with no time left is not started
    code, report = run_main(monkeypatch, tmp_path, (("a", ok, 10, 1), ("b", ok, 10, 20)), budget=10)
    assert code == 1 and report["steps"]["a"]["status"] == "timeout" and report["steps"]["b"]["ok"]


WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker stuck in a collective: only SIGKILL ends it
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(300)
"""


@pytest.mark.timeout(90)
def test_a_torchrun_step_past_its_timeout_ends_with_its_workers(monkeypatch, tmp_path):
    # torchrun starts each worker in a session of its own: killing the step's process group alone
    # left the worker running, holding the step's output open, and the check waited for it
    script, pid_file = tmp_path / "worker.py", tmp_path / "worker.pid"
    script.write_text(WORKER)

    def torchrun(ctx):
        ctx.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                 f"--master_port={device_check.free_port()}", str(script), str(pid_file)])
        return True, "never", {}

    def before(ctx):
        return True, "first", {}

    def after(ctx):
        return True, "still run", {}

    monkeypatch.setattr(device_check, "TERM_GRACE_S", 3)
    start = time.perf_counter()
    code, report = run_main(monkeypatch, tmp_path, (("before", before, 5, 1), ("torchrun", torchrun, 15, 1),
                                                    ("after", after, 5, 1)), budget=60)
    assert time.perf_counter() - start < 15 + 3 + 15
    assert code == 1 and report["finished"] and report["cuda_budget_s"] == 300
    steps = report["steps"]
    assert steps["torchrun"]["status"] == "timeout" and steps["torchrun"]["seconds"] < 15 + 3 + 10
    assert steps["before"]["ok"] and steps["after"]["ok"] and steps["after"]["summary"] == "still run"
    worker = int(pid_file.read_text())  # started within the timeout, and ended with the step
    deadline = time.time() + 5
    while os.path.exists(f"/proc/{worker}") and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z"
