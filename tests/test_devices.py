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

from device_audit import DeviceAudit, scaler_step_reads_host
from test_train import make_tiny_coco, tiny_config
from vldus.cli import main
from vldus.config import save_config
from vldus.errors import InputError

TESTS = os.path.dirname(os.path.abspath(__file__))
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "LOCAL_WORLD_SIZE", "VLDUS_DEVICE_INDEX")

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
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node=2 on one GPU
    with pytest.raises(InputError, match=r"LOCAL_RANK: process 1 of this node needs cuda:1, but only 1 GPU"):
        init_distributed()


def test_one_gpu_per_process_launchers(monkeypatch, one_gpu):
    """srun --gpus-per-task=1 (or a pod per GPU): every process sees its own GPU as cuda:0 while
    LOCAL_RANK is 0..7; each uses that GPU (it was refused as "needs cuda:N, only 1 visible")."""
    from vldus.devices import local_device

    monkeypatch.setenv("LOCAL_RANK", "5")
    assert local_device() == torch.device("cuda", 0) and one_gpu == [torch.device("cuda", 0)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # several visible: LOCAL_RANK picks
    assert local_device() == torch.device("cuda", 5)
    monkeypatch.setenv("VLDUS_DEVICE_INDEX", "2")
    assert local_device() == torch.device("cuda", 2)
    monkeypatch.setenv("VLDUS_DEVICE_INDEX", "9")
    with pytest.raises(InputError, match=r"VLDUS_DEVICE_INDEX: .*needs cuda:9, but only 8 GPU"):
        local_device()


def test_rank_and_master_addr_alone_are_no_process_group(monkeypatch, one_gpu):
    """Cluster pods that set RANK and MASTER_ADDR only: a plain run, not a wait for peers; a
    launcher without torchrun's agent that sets every env:// variable starts the group."""
    from vldus.devices import start_process_group, under_torchrun

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert not under_torchrun() and start_process_group("gloo") is False
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(InputError, match="WORLD_SIZE: 4 processes, but MASTER_PORT not set"):
        start_process_group("gloo")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert under_torchrun()


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
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
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
        monkeypatch.delenv(name, raising=False)
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


def _two_ranks(target, *args, init: bool = True) -> list:
    """``target(rank, *args)`` in two forked processes of one gloo group (``init=False``: the
    env:// variables set, ``target`` starts the group); their results (an exception's text for a
    failed rank)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results, port = ctx.Queue(), _free_port()

    def run(rank):
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive the fork (a hang)
        if init:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        else:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        try:
            out = target(rank, *args)
        except Exception as e:  # noqa: BLE001 -- reported to the test
            out = f"{type(e).__name__}: {e}"
        results.put((rank, out))
        if dist.is_initialized():
            dist.destroy_process_group()

    procs = [ctx.Process(target=run, args=(rank,), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        found = dict(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [found[0], found[1]]


def _shared(rank, folders):
    from vldus.devices import check_shared_dir, long_group

    check_shared_dir(str(folders[rank]), long_group())
    return sorted(os.listdir(folders[rank]))


def _resume(rank, folder, unreadable_on):
    import vldus.detection.train as train
    from vldus.detection.train import DistInfo, resume_checkpoint
    from vldus.devices import long_group

    if rank == 1:  # a stale directory cache: rank 1 lists only epoch 1
        train.latest_checkpoint = lambda d: os.path.join(d, "epoch_1.pth")

    def load(path, split):
        if rank == unreadable_on:
            raise InputError(path, "cannot read checkpoint (no such file)")
        return {"read": os.path.basename(path)}

    train.load_training_checkpoint = load
    info = DistInfo(rank=rank, world_size=2, long=long_group())
    path, ckpt = resume_checkpoint(str(folder), None, info)
    return os.path.basename(path), ckpt


def test_rank_0_decides_and_every_rank_checks(tmp_path):
    """Several nodes: each rank must see rank 0's work dir (one error on every rank otherwise);
    --resume continues from rank 0's latest checkpoint on every rank, and a rank that cannot read
    it stops the whole group with one error (each rank chose for itself, restarting at other
    epochs)."""
    local = [tmp_path / "node0", tmp_path / "node1"]
    for folder in local:
        folder.mkdir()
    errors = _two_ranks(_shared, local)
    assert all("node" in e and "process 1: does not hold the file rank 0 wrote" in e for e in errors), errors
    assert _two_ranks(_shared, [tmp_path, tmp_path]) == [["node0", "node1"]] * 2  # the token is removed

    for epoch in (1, 2):
        (tmp_path / f"epoch_{epoch}.pth").write_bytes(b"")
    assert _two_ranks(_resume, tmp_path, None) == [("epoch_2.pth", {"read": "epoch_2.pth"})] * 2
    errors = _two_ranks(_resume, tmp_path, 1)
    assert all(e.startswith("InputError: ") and "epoch_2.pth: process 1: cannot read" in e for e in errors), errors


def _train_with_a_slow_rank(rank, cfg, slow_rank, where):
    import time

    import vldus.detection.train as train

    for name in where if rank == slow_rank else ():
        def slow(*args, real=getattr(train, name), **kwargs):
            time.sleep(6)
            return real(*args, **kwargs)

        setattr(train, name, slow)
    return os.path.basename(train.train_detector(cfg, validate=True, progress=False))


def test_training_collectives_time_out_but_rank_0_may_work_alone(tmp_path, monkeypatch):
    """Training collectives use the short VLDUS_TRAIN_TIMEOUT_MIN: a rank stuck in an iteration
    stops the others within it (they waited the long timeout, 2 h). What rank 0 does alone (the
    checkpoint, the validation's evaluation) ends on a barrier with the long timeout."""
    cfg = tiny_config(tmp_path, epochs=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("VLDUS_TRAIN_TIMEOUT_MIN", "0.05")  # 3 s
    monkeypatch.setenv("VLDUS_DIST_TIMEOUT_MIN", "1")
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    alone = ("save_torch", "write_validation_metrics")  # 2 x 6 s on rank 0 alone
    assert _two_ranks(_train_with_a_slow_rank, cfg, 0, alone, init=False) == ["epoch_1.pth"] * 2
    stuck = _two_ranks(_train_with_a_slow_rank, cfg, 1, ("optimizer_step",), init=False)
    assert stuck[0] != "epoch_1.pth" and "timed out" in stuck[0].lower(), stuck


def test_the_audit_sees_uploads_from_host_data():
    """Factory calls from Python data and list indexes on the device copy from the host (the
    audit counted only ``.to`` and ``copy_``)."""
    x = torch.empty(3, 5, device="meta")
    audit = DeviceAudit()
    with audit:
        torch.tensor([1, 2], device="meta")
        torch.as_tensor([1, 2], device=x.device)
        x[:, [1, 2]]
        x[[0]] = 1.0
        x[:, torch.tensor([1])]
        x[:, 1:3], x[0], torch.zeros(2, device="meta"), torch.as_tensor(x)  # no host data
    assert len(audit.uploads) == 5, audit.uploads


def test_zsd_scoring_uploads_its_class_indices_once():
    """vldus test scores every image: the class index tensors and masks are put on the device
    once, not copied from Python lists per image."""
    from vldus.data.splits import split_from_names
    from vldus.detection.zsd import borrow_box_regression, gzsd_probs, zsd_log_probs

    split = split_from_names("toy", ["a", "b", "c", "d", "e", "f"], unseen=["e", "b"], excluded=["f"])
    cols = split.num_classes + 1

    def one_image(logits, deltas, bg):
        gzsd_probs(logits, bg, split, seen_score_cut=0.1, joint_threshold=0.5, joint_slope=2.0)
        zsd_log_probs(logits, split, gate=bg.sigmoid())
        borrow_box_regression(logits, deltas, split.seen_ids, split.unseen_ids)

    counts = []
    for _ in range(2):
        logits, bg = torch.empty(4, cols, device="meta"), torch.empty(4, device="meta")
        audit = DeviceAudit()
        with audit:
            one_image(logits, torch.empty(4, 4 * cols, device="meta"), bg)
        counts.append(len(audit.uploads) + len(audit.syncs))
    assert counts[1] == 0, audit.uploads + audit.syncs


def test_training_optimizer_takes_no_host_read_in_the_grad_scaler(tmp_path):
    """amp on CUDA: GradScaler's step reads the found-inf flag on the host for plain SGD at every
    iteration; the training optimizer is fused there, which needs no read."""
    from vldus.detection.train import make_optimizer

    cfg = tiny_config(tmp_path)
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not scaler_step_reads_host(make_optimizer(params, cfg, torch.device("cuda")))
    assert scaler_step_reads_host(torch.optim.SGD(params, lr=0.1))  # what the audit looks for


def test_channels_last_only_off_cuda(tmp_path, monkeypatch):
    """detector.channels_last holds on the CPU; on CUDA the weights go back to NCHW (roi_align
    copied every channels-last FPN level there)."""
    from vldus.detection.model import build_detector, to_device

    cfg = tiny_config(tmp_path)
    cfg.detector.channels_last = True
    model = build_detector(cfg, cfg.load_split())
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert to_device(model, "cpu") is model and conv.weight.is_contiguous(memory_format=torch.channels_last)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append((a, k)) or self)
    to_device(model, torch.device("cuda"))
    assert moved == [((torch.device("cuda"),), {}), ((), {"memory_format": torch.contiguous_format})]
