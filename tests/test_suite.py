"""The suite's own layout: the quick demo runs once per session, shared by the xdist workers
(tests/quick_demo_run.py, tests/conftest.py); the GPU check's rehearsal runs outside the timed
suite, in CI."""
import concurrent.futures
import glob
import json
import os
import re
import time
import types

import pytest

import conftest
import quick_demo_run
from quick_demo_run import MODULES

HERE = os.path.dirname(os.path.abspath(__file__))


def test_quick_demo_users_are_listed():
    users = {os.path.basename(p) for p in glob.glob(os.path.join(HERE, "test_*.py"))
             if p != os.path.abspath(__file__) and "quick_demo_run import" in open(p).read()}
    # an unlisted user could start on the other worker and idle there until the demo is done
    assert users == set(MODULES)


def test_the_rehearsal_is_left_out_of_make_test_and_run_by_ci():
    # the GPU check's whole CPU run is marked, make test deselects exactly that mark, and CI runs
    # make rehearse after make test: a rehearsal left out of both would go untested
    root = os.path.dirname(HERE)
    marked = [p for p in glob.glob(os.path.join(HERE, "test_*.py"))
              if p != os.path.abspath(__file__) and "@pytest.mark.rehearsal" in open(p).read()]
    assert [os.path.basename(p) for p in marked] == ["test_device_check.py"]
    makefile = open(os.path.join(root, "Makefile")).read()
    assert '-m "not rehearsal" tests' in makefile and "-m rehearsal tests" in makefile
    ci = [line.strip() for line in open(os.path.join(root, ".ci", "run")) if line.strip().startswith("make")]
    assert ci == ["make test", "make rehearse"]


def _fake_demo(out: str, calls: list, seconds: float = 0.0):
    """What quick_demo_run.finished_run reads of a demo folder, written after ``seconds``."""
    calls.append(out)
    time.sleep(seconds)
    os.makedirs(os.path.join(out, "work", "detector"))
    open(os.path.join(out, "work", "detector", "epoch_1.pth"), "w").close()
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"method": "synthesis_vldus", "unseen": ["blue circle"]}, f)
    return quick_demo_run.finished_run(out, 12.5)


def test_one_process_runs_the_shared_demo_the_others_wait_and_read_it(tmp_path, monkeypatch):
    # two callers at once (flock locks separate open files even within a process): the second
    # blocks until the first has finished, then reads its folder and time without running it
    calls: list = []
    monkeypatch.setattr(quick_demo_run, "run_demo", lambda out: _fake_demo(out, calls, seconds=0.3))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(quick_demo_run.shared_run, [str(tmp_path)] * 2))
    assert len(calls) == 1 and runs[0] == runs[1]
    assert runs[0].out == str(tmp_path / "demo") and runs[0].seconds == 12.5
    assert runs[0].unseen == ("blue circle",)
    assert runs[0].checkpoint.endswith("epoch_1.pth")


def test_a_failed_shared_demo_fails_the_others_without_running_again(tmp_path, monkeypatch):
    calls: list = []

    def broken(out: str):
        calls.append(out)
        raise RuntimeError("vldus demo --quick failed (exit 1)")

    monkeypatch.setattr(quick_demo_run, "run_demo", broken)
    for expected in ("exit 1", "failed in another worker: RuntimeError: vldus demo --quick failed (exit 1)"):
        with pytest.raises(RuntimeError, match=re.escape(expected)):
            quick_demo_run.shared_run(str(tmp_path))
    assert len(calls) == 1


class _Worker:
    """The part of an xdist WorkerController the scheduler talks to."""

    def __init__(self, name: str):
        self.gateway = types.SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent += indices

    def shutdown(self) -> None:
        self.shutting_down = True


def test_the_late_demo_tests_go_to_whichever_worker_is_free_after_all_others():
    late = [f"tests/{m}::test_{i}" for m in quick_demo_run.LATE_MODULES for i in range(6)]
    early = [f"tests/{m}::test_{i}" for m in sorted(set(MODULES) - set(quick_demo_run.LATE_MODULES))
             for i in range(2)]
    others = [f"tests/test_other.py::test_{i}" for i in range(8)]
    collection = sorted(late + early + others)
    config = types.SimpleNamespace(getvalue=lambda name: ["2*popen"],
                                   option=types.SimpleNamespace(loadscopereorder=True))
    scheduler = conftest.pytest_xdist_make_scheduler(config, None)
    a, b = _Worker("gw0"), _Worker("gw1")
    for worker in (a, b):
        scheduler.add_node(worker)
    for worker in (a, b):
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()

    def given(worker: _Worker) -> set:
        return {collection[i] for i in worker.sent}

    def complete_one(worker: _Worker) -> None:
        index = next(i for i in worker.sent if i not in done)
        done.add(index)
        scheduler.mark_test_complete(worker, index)

    assert set(early) <= given(a) and not set(early) & given(b)  # the demo's start: one worker
    assert not set(late) & (given(a) | given(b))  # held back
    done: set = set()
    while not set(late) & given(b):  # b works through the other tests while a trains the demo
        complete_one(b)
    assert given(a) | given(b) >= set(early + others)  # every other test was handed out first
    assert len(set(late) & given(b)) < len(late)  # b waits for the demo with part of them only
    while not set(late) & given(a):  # a, done with its demo tests, takes its share of the rest
        complete_one(a)
    while len(done) < len(collection):  # the rest, the two workers in turn
        for worker in (a, b):
            if set(worker.sent) - done:
                complete_one(worker)
    assert given(a) | given(b) == set(collection) and not given(a) & given(b)
    assert set(late) & given(a) and set(late) & given(b)  # both workers ran some of them
