"""Shared pytest fixtures. Nothing here may touch the network."""
import json
import os
import shutil
import tempfile
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from quick_demo_run import LATE_MODULES as QUICK_DEMO_LATE_MODULES
from quick_demo_run import MODULES as QUICK_DEMO_MODULES
from quick_demo_run import SHARED_ENV as QUICK_DEMO_ENV

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # one share of the cores per pytest-xdist worker: OpenMP threads of two workers competing
    # for the same cores run far slower than one thread each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# A tiny open_clip architecture: 512-d joint embedding like ViT-B/32, 32x32 images, one layer
# per tower, so a forward pass takes milliseconds on a CPU. vocab_size must stay 49408 (the
# tokenizer's), context_length may be short.
TINY_CLIP_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


class TinyClip(NamedTuple):
    """``model, weights_path = tiny_clip``; ``tiny_clip.arch`` is the config JSON for --arch."""

    model: torch.nn.Module
    weights_path: str

    @property
    def arch(self) -> str:
        return os.path.join(os.path.dirname(self.weights_path), "tiny_clip_config.json")


@pytest.fixture
def cpu_only(monkeypatch):
    """Bitwise comparisons (resume == uninterrupted) run on the CPU, also on a GPU machine:
    roi_align's CUDA backward and other CUDA kernels are not deterministic. Subprocesses see no
    GPU (CUDA_VISIBLE_DEVICES=""), this process reports none."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def _tiny_clip_files(tmp_path_factory) -> str:
    """Write the tiny config and a randomly initialised (seeded) weights file once per session."""
    from vldus.clip import build_open_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    arch = str(folder / "tiny_clip_config.json")
    with open(arch, "w") as f:
        json.dump(TINY_CLIP_CONFIG, f)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_open_clip(arch)
    weights = str(folder / "tiny_clip.pt")
    torch.save(model.state_dict(), weights)
    return weights


@pytest.fixture
def tiny_clip(_tiny_clip_files) -> TinyClip:
    """A tiny random open_clip model (image embedding 512-d, frozen, eval) and its weights file."""
    from vldus.clip import load_open_clip

    weights = _tiny_clip_files
    return TinyClip(load_open_clip(os.path.join(os.path.dirname(weights), "tiny_clip_config.json"),
                                   weights), weights)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny tensors run fastest on one, and on 2 shared cores two OpenMP threads spinning against
    other jobs run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli_error(capsys):
    """``cli_error(argv)`` runs ``vldus ARGV``, asserts exit code 2 with one ``error:`` line on
    stderr, and returns that line."""
    from vldus import cli

    def run(argv: list[str]) -> str:
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err, err
        return err
    return run


def kill_when(cmd: list[str], ready, timeout: float = 120.0, env: dict | None = None) -> None:
    """Start ``cmd``, wait until ``ready()`` is true, then SIGKILL it (``kill -9``).

    Fails when the process ends on its own first: the point is to stop it in the middle."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"{cmd[:4]} ended (exit {proc.returncode}) before it was killed: "
                                     f"{proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, f"{cmd[:4]} not ready after {timeout} s"
            time.sleep(0.02)
        proc.kill()
        assert proc.wait(30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def pytest_configure(config):
    """Under pytest-xdist: one folder for the session's quick demo, named to the workers through
    the environment they inherit (tests/quick_demo_run.py), removed when the session ends (an
    empty folder named in the environment beforehand is used and kept, e.g. to read the demo's
    stage times afterwards)."""
    if _xdist_controller(config) and QUICK_DEMO_ENV not in os.environ:
        folder = tempfile.mkdtemp(prefix="vldus_quick_demo_")
        os.environ[QUICK_DEMO_ENV] = folder

        def remove() -> None:
            shutil.rmtree(folder, ignore_errors=True)
            os.environ.pop(QUICK_DEMO_ENV, None)

        config.add_cleanup(remove)


def _module(nodeid: str) -> str:
    return os.path.basename(nodeid.split("::", 1)[0])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist: the quick demo's modules start on one worker (the first test runs the demo),
    except the tests of :data:`QUICK_DEMO_LATE_MODULES`, held back until every other test is
    handed out and then given one at a time to whichever worker is free, so that both workers
    share the demo's tests (a worker waits for the demo if it is still running); every other
    test runs wherever a worker is free. (xdist's own ``--dist loadgroup`` marks do not work with
    pytest 9's node ids.)"""
    from xdist.scheduler import LoadScopeScheduling

    class QuickDemoFirstAndLast(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            if module in QUICK_DEMO_LATE_MODULES:
                return nodeid  # a scope of its own: dealt one at a time
            return "quick_demo" if module in QUICK_DEMO_MODULES else nodeid

        def _assign_work_unit(self, node) -> None:
            late = [scope for scope in self.workqueue if _module(scope) in QUICK_DEMO_LATE_MODULES]
            if len(late) < len(self.workqueue):
                for scope in late:
                    self.workqueue.move_to_end(scope)
            super()._assign_work_unit(node)

    return QuickDemoFirstAndLast(config, log)
