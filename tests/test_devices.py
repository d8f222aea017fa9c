"""What a first CUDA run would hit, checked on the CPU: device choice per rank (torch.cuda
queries patched), the process group under torchrun, the GradScaler state on resume, host reads
in the detector's training loop, the epoch pools on the device, bitwise tests pinned to the CPU."""
import ast
import glob
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from device_audit import DeviceAudit
from test_train import make_tiny_coco, tiny_config
from vldus.cli import main
from vldus.config import save_config
from vldus.errors import InputError

TESTS = os.path.dirname(os.path.abspath(__file__))
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def one_gpu(monkeypatch):
    """torch.cuda says: available, one device; set_device calls are recorded."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return chosen


def test_train_detector_device_per_local_rank(monkeypatch, one_gpu):
    from vldus.detection.train import init_distributed

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert init_distributed().device == torch.device("cuda", 0)
    assert one_gpu == [torch.device("cuda", 0)]  # the current device: no context on another GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(InputError, match=r"LOCAL_RANK: process 1 of this node needs cuda:1, but only 1 GPU"):
        init_distributed()


@pytest.fixture
def test_images(tmp_path):
    """A config whose test images hold unseen objects, and a (dummy) checkpoint file."""
    cfg = tiny_config(tmp_path)
    ann, img_dir, _ = make_tiny_coco(tmp_path / "test_data", unseen_every=2)
    cfg.data.test.ann_file, cfg.data.test.img_dir = ann, img_dir
    cfg_file = str(tmp_path / "cfg.yaml")
    save_config(cfg, cfg_file)
    checkpoint = tmp_path / "epoch_1.pth"
    checkpoint.write_bytes(b"never read")
    return cfg_file, str(checkpoint)


@pytest.mark.parametrize("command", [
    ["test", "--seen", "--out", "{tmp}/dets.json"],
    ["extract-features", "--classes", "seen", "--data-split", "train", "--save-dir", "{tmp}/feats"]])
def test_more_ranks_than_gpus_is_one_line_exit_2(command, test_images, tmp_path, monkeypatch, one_gpu, capsys):
    """``vldus test`` and ``extract-features`` as process LOCAL_RANK=1 on a machine with one GPU:
    one line naming the rank and the GPU count, before any model is loaded."""
    import vldus.detection.model

    def loaded(*args, **kwargs):
        raise AssertionError(f"load_detector reached with device {args[3] if len(args) > 3 else kwargs}")
    monkeypatch.setattr(vldus.detection.model, "load_detector", loaded)
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg_file, checkpoint = test_images
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main(args[:1] + ["--config", cfg_file, "--checkpoint", checkpoint, "--quiet"] + args[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs cuda:1, but only 1 GPU(s) are visible" in err[0], err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_process_under_torchrun_starts_a_process_group(monkeypatch):
    """``tools/dist_test.sh CFG CKPT 1``: torchrun with one process runs the distributed path."""
    from vldus.detection.inference import _dist_start

    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), TORCHELASTIC_RUN_ID="one")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        assert _dist_start() == (0, 1, True) and dist.is_initialized()
        assert _dist_start() == (0, 1, False)  # already started: not started twice
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name)
    assert _dist_start() == (0, 1, False) and not dist.is_initialized()  # a plain run: none


def _write_epoch_1(cfg, scaler_state: dict) -> None:
    """A finished epoch 1 as train-detector writes it, with the given GradScaler state."""
    from vldus.detection.model import build_detector
    from vldus.detection.train import rng_state

    split = cfg.load_split()
    model = build_detector(cfg, split)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    os.makedirs(cfg.path("detector"), exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler_state, "rng": [rng_state()],
                "epoch": 1, "classes": list(split.classes), "world_size": 1, "iters_per_epoch": 4},
               cfg.path("detector", "epoch_1.pth"))


def test_resume_with_amp_after_a_run_without(tmp_path, monkeypatch, capsys):
    """A run without amp (any CPU run) saves an empty scaler state, which an enabled GradScaler
    refuses ("The source state dict is empty"): resuming with amp on starts the loss scale afresh."""
    from vldus.detection.train import train_detector

    cfg = tiny_config(tmp_path, epochs=1)
    _write_epoch_1(cfg, {})
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real("cpu", enabled=True))  # amp "on"
    assert train_detector(cfg, resume=True, progress=False) == cfg.path("detector", "epoch_1.pth")
    assert "written with amp off, this run has amp on" in capsys.readouterr().err


def test_resume_without_amp_after_an_amp_run(tmp_path, capsys):
    from vldus.detection.train import train_detector

    cfg = tiny_config(tmp_path, epochs=1)
    _write_epoch_1(cfg, {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                         "growth_interval": 2000, "_growth_tracker": 3})
    assert train_detector(cfg, resume=True, progress=False) == cfg.path("detector", "epoch_1.pth")
    assert "written with amp on, this run has amp off" in capsys.readouterr().err


def test_detector_iterations_read_losses_once_per_logging_interval(tmp_path):
    """No ``.item()`` per iteration: the loss values (and the NaN check) come to the host once
    per logging interval, as one stacked copy."""
    from vldus.detection.train import train_detector

    cfg = tiny_config(tmp_path, epochs=1)  # 8 images, batch 2: 4 iterations, log_interval 2
    audit = DeviceAudit()
    with audit:
        train_detector(cfg, progress=False)
    loop = ("train_detector", "window_losses", "_check_finite", "optimizer_step")
    reads = [r for r in audit.cpu_reads if audit.count([r], file="vldus/detection/train.py", functions=loop)]
    assert len(reads) <= 2, reads  # one per logging window


def test_epoch_pools_gathered_on_the_device(tmp_path, monkeypatch):
    """DeviceRows with the file resident: the memory map is read once (when the rows are put on
    the device), every epoch pool is then an index on the device."""
    from vldus.synthesis.data import DeviceRows, FeatureFile

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(50, 8)).astype(np.float32), rng.integers(0, 3, 50)
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "l.npy", labels)
    ff = FeatureFile.open(str(tmp_path / "f.npy"), str(tmp_path / "l.npy"), 8, 2)
    reads = []
    real_map = FeatureFile._map
    monkeypatch.setattr(FeatureFile, "_map", lambda self: reads.append(1) or real_map(self))
    rows = DeviceRows(ff, "cpu", resident=True)
    after_load = len(reads)
    for epoch in range(3):
        pool = torch.from_numpy(rng.integers(0, 50, 20))
        assert torch.equal(rows.gather(pool), torch.from_numpy(feats[pool.numpy()]))
    assert len(reads) == after_load
    assert torch.equal(DeviceRows(ff, "cpu").gather(pool), torch.from_numpy(feats[pool.numpy()]))  # not resident


def _bitwise_resume_tests():
    """(file, test) of every test comparing a resumed run with an uninterrupted one bit for bit."""
    found = []
    for path in sorted(glob.glob(os.path.join(TESTS, "test_*.py"))):
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.FunctionDef) and "resume" in node.name and any(
                    w in node.name for w in ("equal", "uninterrupted", "same", "kill")):
                found.append((path, node))
    return found


def test_bitwise_resume_tests_pin_the_cpu():
    """roi_align's CUDA backward (and others) is not deterministic: every bitwise resume test
    runs on the CPU on a GPU machine too (the ``cpu_only`` fixture)."""
    found = _bitwise_resume_tests()
    assert len(found) >= 5
    unpinned = [f"{os.path.basename(p)}::{n.name}" for p, n in found
                if "cpu_only" not in ast.unparse(n.decorator_list) and "cpu_only" not in
                [a.arg for a in n.args.args]]
    assert unpinned == []
