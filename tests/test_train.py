"""train-detector: loss goes down, resume == uninterrupted, divergence stops cleanly, torchrun works."""
import copy
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import kill_when
from vldus.cli import main
from vldus.config import Config, DataSource, save_config
from vldus.detection.train import latest_checkpoint, lr_factor, train_detector
from vldus.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["red square", "green square", "blue square"]
COLOURS = {1: (230, 30, 30), 2: (30, 200, 30), 3: (30, 30, 230)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_coco(root, n_images=8, size=64, seed=0, unseen_every=0):
    """Noise images with 1-2 coloured squares; every ``unseen_every``-th image holds a blue one."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "images", exist_ok=True)
    images, anns = [], []
    for i in range(1, n_images + 1):
        canvas = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
        labels = [int(rng.integers(1, 3)) for _ in range(int(rng.integers(1, 3)))]
        if unseen_every and i % unseen_every == 0:
            labels[0] = 3
        for label in labels:
            s = int(rng.integers(size // 5, size // 2))
            x, y = (int(v) for v in rng.integers(0, size - s, 2))
            canvas[y:y + s, x:x + s] = COLOURS[label]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": label,
                         "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})
        name = f"im_{i:03d}.png"
        Image.fromarray(canvas).save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": size, "height": size})
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    split_file = root / "split.json"
    split_file.write_text(json.dumps({"name": "tiny", "classes": CLASSES, "unseen": ["blue square"]}))
    return str(ann_file), str(root / "images"), str(split_file)


def tiny_config(tmp_path, epochs=2, **train) -> Config:
    ann, img_dir, split = make_tiny_coco(tmp_path / "data")
    cfg = Config(name="tiny", split=split, work_dir=str(tmp_path / "work"))
    cfg.data.train = DataSource(format="shapes", ann_file=ann, img_dir=img_dir)
    cfg.data.test = DataSource(format="shapes", ann_file=ann, img_dir=img_dir)
    cfg.data.workers = 0
    d = cfg.detector
    d.backbone, d.norm, d.trainable_layers, d.fpn_channels = "mobilenet_v2", "bn", 5, 32
    d.min_size = d.max_size = 64
    d.anchor_sizes = [8, 16, 32, 64, 128]
    d.rpn_pre_nms_train = d.rpn_post_nms_train = 200
    d.rpn_pre_nms_test = d.rpn_post_nms_test = 100
    d.rpn_batch_size, d.roi_batch_size = 64, 64
    t = cfg.train
    t.epochs, t.batch_size, t.lr, t.warmup_iters, t.lr_steps, t.log_interval = epochs, 2, 0.01, 2, [1], 2
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def test_lr_schedule_matches_mmdet():
    cfg = Config()
    cfg.train.warmup_iters, cfg.train.warmup_ratio, cfg.train.lr_steps = 500, 1 / 3, [8, 11]
    assert lr_factor(0, 100, cfg) == pytest.approx(1 / 3)
    assert lr_factor(250, 100, cfg) == pytest.approx(2 / 3)
    assert lr_factor(500, 100, cfg) == 1.0
    assert lr_factor(799, 100, cfg) == 1.0
    assert lr_factor(800, 100, cfg) == pytest.approx(0.1)  # first iteration of epoch 9
    assert lr_factor(1100, 100, cfg) == pytest.approx(0.01)


def test_training_lowers_the_loss(tmp_path):
    cfg = tiny_config(tmp_path, epochs=6, lr_steps=[], warmup_iters=1, lr=0.02)
    last = train_detector(cfg, validate=True, progress=False)
    assert last == cfg.path("detector", "epoch_6.pth")
    log = [json.loads(line) for line in open(cfg.path("detector", "log.jsonl"))]
    epochs = [r for r in log if "checkpoint" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, 7))
    assert epochs[-1]["loss"] < 0.7 * epochs[0]["loss"], [r["loss"] for r in epochs]
    # --validate (data.val is null -> data.test, seen-only images): a seen mAP per epoch
    assert all(0.0 <= r["val"]["seen_map"]["0.5"] <= 100.0 for r in epochs)
    iters = [r for r in log if "iter" in r]
    assert {"lr", "loss_classifier", "loss_objectness", "s_per_iter", "images_per_s"} <= set(iters[0])
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 6 and ckpt["classes"] == CLASSES
    assert ckpt["model"]["roi_heads.box_predictor.cls_score.weight"].shape == (len(CLASSES) + 1, 1024)


def _log_has(path: str, epoch: int, iteration: int) -> bool:
    """log.jsonl holds the record of ``iteration`` of ``epoch`` (written every log_interval)."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return any(r.get("epoch") == epoch and r.get("iter") == iteration
                   for r in (json.loads(line) for line in f if line.endswith("\n")))


@pytest.mark.usefixtures("cpu_only")
def test_kill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    """kill -9 in the middle of epoch 2 of 3, then --resume: the same weights as a run that was
    never interrupted (every random stream is checkpointed, checkpoints are atomic)."""
    whole = tiny_config(tmp_path / "a", epochs=3, flip=0.5)
    train_detector(whole, progress=False)

    parted = tiny_config(tmp_path / "b", epochs=3, flip=0.5)
    cfg_file = str(tmp_path / "b.yaml")
    save_config(parted, cfg_file)
    log = parted.path("detector", "log.jsonl")
    kill_when([sys.executable, "-m", "vldus.cli", "train-detector", "--config", cfg_file, "--quiet"],
              ready=lambda: _log_has(log, epoch=2, iteration=2))  # 2 of the epoch's 4 iterations done
    assert latest_checkpoint(parted.path("detector")) == parted.path("detector", "epoch_1.pth")
    assert main(["train-detector", "--config", cfg_file, "--resume", "--quiet"]) == 0

    a = torch.load(whole.path("detector", "epoch_3.pth"), weights_only=True)
    b = torch.load(parted.path("detector", "epoch_3.pth"), weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_divergence_stops_and_keeps_checkpoint(tmp_path, capsys):
    """A real divergence (lr x 1e8 from epoch 2 on through the step schedule, no clipping) stops training with the epoch and
    the iteration named; the last good checkpoint stays byte-identical and no later one appears."""
    cfg = tiny_config(tmp_path, epochs=1)
    train_detector(cfg, progress=False)
    good = cfg.path("detector", "epoch_1.pth")
    before = open(good, "rb").read()

    cfg_file = tmp_path / "cfg.yaml"
    cfg.train.epochs = 2
    save_config(cfg, str(cfg_file))
    code = main(["train-detector", "--config", str(cfg_file), "--resume", "--quiet",
                 "--set", "train.lr_gamma=1e8", "--set", "train.grad_clip=null"])
    err = capsys.readouterr().err
    assert code == 1
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and re.search(r"non-finite loss at epoch 2, iteration [2-4] ", line[0]), err
    assert f"last good checkpoint: {good}" in line[0]
    assert open(good, "rb").read() == before
    assert latest_checkpoint(cfg.path("detector")) == good
    assert not os.path.exists(cfg.path("detector", "epoch_2.pth"))


def test_frozen_bn_without_weights_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.detector.norm = "frozen_bn"
    with pytest.raises(InputError, match="backbone_weights"):
        train_detector(cfg, progress=False)


def test_missing_weights_file_via_cli(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, str(cfg_file))
    missing = str(tmp_path / "weights" / "mobilenet_v2.pth")
    code = main(["train-detector", "--config", str(cfg_file), "--quiet",
                 "--set", f"detector.backbone_weights={missing}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and missing in err[0]


def _half_of_the_data(cfg: Config, rank: int, world: int) -> Config:
    """The same run on the images that rank ``rank`` of ``world`` trains on in epoch 1."""
    from torch.utils.data import DistributedSampler

    from vldus.detection.dataset import training_dataset

    records = training_dataset(cfg, cfg.load_split()).records
    sampler = DistributedSampler(range(len(records)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.train.seed)
    keep = {records[i].image_id for i in sampler}
    coco = json.load(open(cfg.data.train.ann_file))
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    half = os.path.join(os.path.dirname(cfg.data.train.ann_file), f"half_{rank}.json")
    with open(half, "w") as f:
        json.dump(coco, f)
    single = copy.deepcopy(cfg)
    single.data.train.ann_file = half
    single.work_dir = cfg.work_dir + f"_half_{rank}"
    return single


def test_torchrun_two_processes_synchronise(tmp_path):
    """tools/dist_train.sh -> torchrun -> 2 gloo processes with DDP: both ranks end with the same
    weights, and those differ from rank 0 training alone on its half of the data. --validate:
    each rank evaluates half of the validation images, rank 0 gathers them; the mAP is that of
    one process evaluating them all."""
    cfg = tiny_config(tmp_path, epochs=1, flip=0.0)
    # validation after two iterations: every box, and a loose IoU, so that the metrics are not 0
    cfg.detector.score_thresh, cfg.evaluation.iou_thresholds = 0.0, [0.1, 0.5]
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, str(cfg_file))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable,
               MASTER_PORT=str(port))
    cmd = ["bash", os.path.join(REPO, "tools", "dist_train.sh"), str(cfg_file), "2", "--quiet", "--validate"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(cfg.path("detector", "epoch_1.pth"), weights_only=True)
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    assert ddp["iters_per_epoch"] == 2  # 8 images / 2 processes / batch 2
    fingerprints = ddp["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]

    epoch = [r for r in map(json.loads, open(cfg.path("detector", "log.jsonl"))) if "checkpoint" in r]
    metrics = json.load(open(cfg.path("detector", "metrics.json")))["validation"]
    assert len(epoch) == 1 and metrics["per_epoch"] == [metrics["last"]]
    assert metrics["last"]["images_per_rank"] == [4, 4]  # 8 seen-only images, rank r: r, r + 2, ...
    assert epoch[0]["val_seen_map50"] == metrics["last"]["val_seen_map50"]
    from vldus.detection.model import load_detector
    from vldus.detection.train import evaluate_seen, seen_map, validation_dataset

    split = cfg.load_split()
    model = load_detector(cfg, split, cfg.path("detector", "epoch_1.pth"))
    alone = evaluate_seen(model, validation_dataset(cfg, split), cfg, split, torch.device("cpu"), False)
    assert alone["images_per_rank"] == [8]
    assert seen_map(alone) == pytest.approx(metrics["last"]["val_seen_map50"], abs=1e-9)
    assert alone["groups"]["seen"]["recall"] == pytest.approx(metrics["last"]["seen_recall"], abs=1e-9)
    assert seen_map(alone, "0.1") == pytest.approx(metrics["last"]["seen_map"]["0.1"], abs=1e-9)
    assert metrics["last"]["seen_map"]["0.1"] > 0 and metrics["last"]["seen_recall"]["0.1"] > 0

    single = _half_of_the_data(cfg, rank=0, world=2)
    train_detector(single, progress=False)
    alone = torch.load(single.path("detector", "epoch_1.pth"), weights_only=True)
    assert alone["iters_per_epoch"] == 2 and alone["rank_fingerprints"][0] != fingerprints[0]
    changed = [k for k, v in ddp["model"].items() if v.is_floating_point() and not torch.equal(v, alone["model"][k])]
    assert "roi_heads.box_predictor.cls_score.weight" in changed


def test_skip_bad_images(tmp_path, capsys):
    cfg = tiny_config(tmp_path, epochs=1)
    bad = os.path.join(cfg.data.train.img_dir, "im_002.png")
    with open(bad, "wb") as f:
        f.write(b"broken")
    with pytest.raises(InputError) as e:
        train_detector(cfg, progress=False)
    assert bad in str(e.value)
    assert train_detector(cfg, skip_bad_images=True, progress=False) == cfg.path("detector", "epoch_1.pth")
    assert f"skipped 1 unreadable image(s), e.g. {bad}" in capsys.readouterr().err
