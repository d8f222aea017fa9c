"""RoI feature extraction (docs/design.md §3): the assignment/sampling rules on hand-made boxes, the
extractor on a tiny torchvision Faster R-CNN, the sharded resumable run, and the command."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from vldus.config import FeatureConfig
from vldus.data.records import ImageRecord
from vldus.detection import extract
from vldus.detection.extract import (RoIFeatureExtractor, assign_and_sample, hflip, output_paths,
                                     pass_generator, run_extraction, training_proposals)
from vldus.errors import InputError

GT = torch.tensor([[0.0, 0.0, 100.0, 100.0]])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cfg(**kw) -> FeatureConfig:
    return FeatureConfig(**{"fg_iou": 0.6, "bg_iou": 0.3, "num_rois": 512, "pos_fraction": 0.25,
                            "bg_per_fg": 2, **kw})


def as_set(boxes: torch.Tensor) -> set:
    return {tuple(b) for b in boxes.tolist()}


# --------------------------------------------------------------------------------------------
# assign_and_sample on hand-made boxes
# --------------------------------------------------------------------------------------------
def test_thresholds_and_ignored_band():
    # IoU with GT [0,0,100,100] of a box [0,0,w,100] is w/100.
    props = torch.tensor([[0, 0, w, 100.0] for w in (60, 59, 45, 30, 29, 10)])
    rois, labels = assign_and_sample(props, GT, torch.tensor([3]), cfg(), gen())
    fg = rois[labels > 0]
    assert as_set(fg) == {(0, 0, 100, 100), (0, 0, 60, 100)}  # GT itself + IoU 0.6 exactly
    assert (labels[labels > 0] == 3).all()
    # 0.59, 0.45, 0.30 are in the ignored band [0.3, 0.6); 0.29 and 0.10 are background
    assert as_set(rois[labels == 0]) == {(0, 0, 29, 100), (0, 0, 10, 100)}
    assert labels.dtype == torch.int64 and rois.shape == (4, 4)
    assert labels[:2].gt(0).all() and labels[2:].eq(0).all()  # foreground first


def test_custom_thresholds_move_the_band():
    props = torch.tensor([[0, 0, w, 100.0] for w in (55, 45)])
    rois, labels = assign_and_sample(props, GT, torch.tensor([1]), cfg(fg_iou=0.5, bg_iou=0.5), gen())
    assert as_set(rois[labels > 0]) == {(0, 0, 100, 100), (0, 0, 55, 100)}
    assert as_set(rois[labels == 0]) == {(0, 0, 45, 100)}


def test_labels_are_the_class_of_the_best_matching_gt():
    gt = torch.tensor([[0, 0, 100, 100.0], [200, 200, 300, 300.0]])
    props = torch.tensor([[5, 0, 100, 100.0], [200, 205, 300, 300.0], [0, 0, 70, 100.0],
                          [150, 150, 300, 300.0]])  # last: IoU 0.44 with the second GT -> ignored
    rois, labels = assign_and_sample(props, gt, torch.tensor([2, 5]), cfg(), gen())
    got = {tuple(b): int(l) for b, l in zip(rois.tolist(), labels.tolist())}
    assert got == {(0, 0, 100, 100): 2, (200, 200, 300, 300): 5, (5, 0, 100, 100): 2,
                   (200, 205, 300, 300): 5, (0, 0, 70, 100): 2}


def test_gt_boxes_are_added_as_proposals():
    gt = torch.tensor([[10, 10, 50, 50.0], [60, 60, 90, 90.0]])
    rois, labels = assign_and_sample(torch.zeros(0, 4), gt, torch.tensor([4, 1]), cfg(), gen())
    assert as_set(rois) == as_set(gt) and sorted(labels.tolist()) == [1, 4]


@pytest.mark.parametrize("bg_per_fg", [1, 2, 3])
def test_background_capped_at_bg_per_fg_times_foreground(bg_per_fg):
    far = torch.tensor([[200 + i, 200, 260 + i, 260.0] for i in range(100)])  # IoU 0 with GT
    rois, labels = assign_and_sample(far, GT, torch.tensor([1]), cfg(bg_per_fg=bg_per_fg), gen())
    assert (labels > 0).sum() == 1 and (labels == 0).sum() == bg_per_fg
    assert as_set(rois[labels == 0]) <= as_set(far)


def test_positive_fraction_cap_and_sample_size():
    near = torch.tensor([[i * 0.1, 0, 100 + i * 0.1, 100.0] for i in range(200)])  # IoU > 0.6
    far = torch.tensor([[200 + i, 200, 260 + i, 260.0] for i in range(100)])
    rois, labels = assign_and_sample(torch.cat([near, far]), GT, torch.tensor([1]),
                                     cfg(num_rois=64, pos_fraction=0.25), gen())
    assert (labels > 0).sum() == 16  # int(64 * 0.25) of the 201 foreground boxes
    assert (labels == 0).sum() == 32  # 48 background sampled, 2 x 16 kept
    # few background boxes: all of them are kept (fewer than 2F)
    rois, labels = assign_and_sample(torch.cat([near, far[:5]]), GT, torch.tensor([1]),
                                     cfg(num_rois=64, pos_fraction=0.25), gen())
    assert (labels > 0).sum() == 16 and (labels == 0).sum() == 5


def test_background_comes_from_the_sampled_rois():
    # 10 fg, 1000 bg, num_rois 20: the sampler keeps 10 bg (20 - 10); the 2x cap (20) is not reached
    near = torch.tensor([[i * 0.1, 0, 100 + i * 0.1, 100.0] for i in range(9)])
    far = torch.tensor([[200 + i * 0.01, 200, 260, 260.0] for i in range(1000)])
    _, labels = assign_and_sample(torch.cat([near, far]), GT, torch.tensor([1]),
                                  cfg(num_rois=20, pos_fraction=0.5), gen())
    assert (labels > 0).sum() == 10 and (labels == 0).sum() == 10


def test_no_gt_gives_no_rows():
    props = torch.tensor([[0, 0, 10, 10.0], [5, 5, 30, 30.0]])
    rois, labels = assign_and_sample(props, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), cfg(), gen())
    assert rois.shape == (0, 4) and labels.shape == (0,)


def test_sampling_is_seeded():
    near = torch.tensor([[i * 0.1, 0, 100 + i * 0.1, 100.0] for i in range(200)])
    far = torch.tensor([[200 + i, 200, 260 + i, 260.0] for i in range(300)])
    props, c = torch.cat([near, far]), cfg(num_rois=64)
    a = assign_and_sample(props, GT, torch.tensor([1]), c, gen(1))[0]
    b = assign_and_sample(props, GT, torch.tensor([1]), c, gen(1))[0]
    d = assign_and_sample(props, GT, torch.tensor([1]), c, gen(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, d)
    assert torch.equal(pass_generator(0, 7).initial_seed() * torch.ones(1),
                       pass_generator(0, 7).initial_seed() * torch.ones(1))
    assert pass_generator(0, 7).initial_seed() != pass_generator(0, 8).initial_seed()
    assert pass_generator(0, 7).initial_seed() != pass_generator(1, 7).initial_seed()


def test_hflip_mirrors_boxes():
    image = torch.arange(2 * 3 * 10).reshape(2, 3, 10)
    flipped, boxes = hflip(image, torch.tensor([[1.0, 2.0, 4.0, 3.0]]))
    assert torch.equal(flipped[..., 0], image[..., 9])
    assert boxes.tolist() == [[6.0, 2.0, 9.0, 3.0]]


# --------------------------------------------------------------------------------------------
# The extractor on a tiny Faster R-CNN
# --------------------------------------------------------------------------------------------
NUM_CLASSES = 5


def tiny_detector(pre_train=300, post_train=120, pre_test=40, post_test=10) -> FasterRCNN:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 8
    return FasterRCNN(
        backbone, num_classes=NUM_CLASSES + 1, min_size=64, max_size=96,
        rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        rpn_pre_nms_top_n_train=pre_train, rpn_post_nms_top_n_train=post_train,
        rpn_pre_nms_top_n_test=pre_test, rpn_post_nms_top_n_test=post_test,
    ).eval()


def test_training_proposal_settings_in_eval_mode():
    model = tiny_detector()
    images, _ = model.transform([torch.rand(3, 64, 64)])
    feats = {"0": model.backbone(images.tensors)}
    with torch.no_grad():
        plain = model.rpn(images, feats)[0][0]
        with training_proposals(model.rpn):
            train = model.rpn(images, feats)[0][0]
    assert len(plain) == 10 and 10 < len(train) <= 120
    assert not model.training and model.rpn._post_nms_top_n["testing"] == 10  # restored
    with torch.no_grad(), training_proposals(model.rpn, post_nms=30):  # features.proposals
        assert len(model.rpn(images, feats)[0][0]) == 30
    assert model.rpn._post_nms_top_n == {"training": 120, "testing": 10}


def test_extractor_uses_features_proposals(monkeypatch):
    """features.proposals replaces the training post-NMS count; None keeps it."""
    from vldus.detection import extract

    seen = []

    def spy(proposals, *args):
        seen.append(len(proposals))
        return assign_and_sample(proposals, *args)

    monkeypatch.setattr(extract, "assign_and_sample", spy)
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    boxes, labels = torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.tensor([1])
    for proposals in (None, 40):
        RoIFeatureExtractor(tiny_detector(), cfg(num_rois=64, proposals=proposals), flip=0.0)(
            image, boxes, labels, gen())
    assert 40 < seen[0] <= 120 and seen[1] == 40


def test_extractor_rows_shapes_and_labels():
    ext = RoIFeatureExtractor(tiny_detector(), cfg(num_rois=64), flip=0.5)
    image = torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0], [30.0, 10.0, 60.0, 30.0]])
    feats, labels = ext(image, boxes, torch.tensor([2, 5]), gen())
    assert feats.dtype == np.float32 and labels.dtype == np.int64
    assert feats.shape == (len(labels), 1024) and (feats >= 0).all()  # after the ReLU
    fg = (labels > 0).sum()
    assert fg >= 2 and set(labels[labels > 0]) <= {2, 5} and (labels == 0).sum() <= 2 * fg
    again = ext(image, boxes, torch.tensor([2, 5]), gen())
    assert np.array_equal(feats, again[0]) and np.array_equal(labels, again[1])
    assert all(not p.requires_grad for p in ext.model.parameters())


def test_extractor_flip_follows_the_generator():
    ext = RoIFeatureExtractor(tiny_detector(), cfg(num_rois=64), flip=1.0)
    image = torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)
    boxes, labels = torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.tensor([1])
    flipped_input = hflip(image, boxes)
    no_flip = RoIFeatureExtractor(tiny_detector(), cfg(num_rois=64), flip=0.0)
    a = ext(image, boxes, labels, gen())
    b = no_flip(*flipped_input, labels, gen())
    assert np.allclose(a[0], b[0], atol=1e-5) and np.array_equal(a[1], b[1])


# --------------------------------------------------------------------------------------------
# The sharded run
# --------------------------------------------------------------------------------------------
def make_records(root, n=5, size=(64, 48)) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        path = os.path.join(root, f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        boxes = [[4, 4, 30, 40], [30, 10, 60, 30], [0, 0, 10, 10]]
        records.append(ImageRecord(i, path, *size, boxes, [(1, 4, 5)[i % 3], 2, 3], [False, False, True]))
    return records


class Counting:
    """Wraps an extractor; counts calls and can fail (a simulated kill) after ``fail_after``."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after, self.calls = inner, fail_after, 0
        self.cfg, self.flip = inner.cfg, inner.flip

    def __call__(self, *args):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner(*args)


@pytest.fixture(scope="module")
def extractor():
    return RoIFeatureExtractor(tiny_detector(), cfg(num_rois=64), flip=0.5)


def load(paths):
    return np.load(paths.feats), np.load(paths.labels)


def test_output_names_layout_and_manifest(tmp_path, extractor):
    records = make_records(tmp_path)
    paths = output_paths(str(tmp_path / "out"), "train", 0.6, 0.3)
    m = run_extraction(extractor, records, paths, repeat=2, seed=3, shard_size=3, quiet=True,
                       class_names=[f"c{i}" for i in range(1, NUM_CLASSES + 1)])
    assert sorted(os.listdir(tmp_path / "out")) == ["train_0.6_0.3_feats.npy", "train_0.6_0.3_labels.npy",
                                                    "train_0.6_0.3_manifest.json"]
    feats, labels = load(paths)
    assert feats.dtype == np.float32 and feats.shape == (len(labels), 1024) and labels.dtype == np.int64
    # ignore boxes (label 3 here) are never GT: label 3 cannot appear
    assert set(np.unique(labels)) <= {0, 1, 2, 4, 5} and (labels > 0).sum() >= 2 * 2 * 5
    assert m["rows"] == len(labels) and m["fg_rows"] == (labels > 0).sum()
    assert m["passes"] == 10 and m["images"] == 5 and m["skipped_images"] == []
    assert m["rows_per_label"]["background"] == (labels == 0).sum()
    on_disk = json.load(open(paths.manifest))
    assert on_disk["rows"] == m["rows"] and on_disk["run"]["seed"] == 3
    # same rows whatever the shard size; a different seed gives other samples
    other = output_paths(str(tmp_path / "other"), "train", 0.6, 0.3)
    run_extraction(extractor, records, other, repeat=2, seed=3, shard_size=4, quiet=True, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(load(paths), load(other)))
    run_extraction(extractor, records, other, repeat=2, seed=4, shard_size=4, quiet=True)
    assert not np.array_equal(load(paths)[0], load(other)[0])


@pytest.mark.usefixtures("cpu_only")
def test_resume_after_a_kill(tmp_path, extractor):
    records = make_records(tmp_path, n=6)
    ref = output_paths(str(tmp_path / "ref"), "test", 0.6, 0.3)
    run_extraction(extractor, records, ref, shard_size=2, quiet=True)

    paths = output_paths(str(tmp_path / "out"), "test", 0.6, 0.3)
    killed = Counting(extractor, fail_after=3)  # dies inside the second shard
    with pytest.raises(KeyboardInterrupt):
        run_extraction(killed, records, paths, shard_size=2, quiet=True)
    assert not os.path.exists(paths.feats) and not os.path.exists(paths.manifest)
    assert os.path.isfile(os.path.join(paths.parts, "shard_00000.json"))
    assert not os.path.exists(os.path.join(paths.parts, "shard_00001.json"))

    resumed = Counting(extractor)
    m = run_extraction(resumed, records, paths, shard_size=2, resume=True, quiet=True)
    assert resumed.calls == 4  # shard 0 kept, shards 1 and 2 redone
    assert all(np.array_equal(a, b) for a, b in zip(load(ref), load(paths)))
    assert m["rows"] == len(load(ref)[1]) and not os.path.exists(paths.parts)

    again = Counting(extractor)  # complete: --resume does nothing
    run_extraction(again, records, paths, shard_size=2, resume=True, quiet=True)
    assert again.calls == 0
    fresh = Counting(extractor)  # without --resume: starts over
    run_extraction(fresh, records, paths, shard_size=2, quiet=True)
    assert fresh.calls == 6


def test_resume_with_other_settings_is_refused(tmp_path, extractor):
    records = make_records(tmp_path, n=4)
    paths = output_paths(str(tmp_path / "out"), "train", 0.6, 0.3)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(Counting(extractor, fail_after=1), records, paths, shard_size=1, quiet=True)
    with pytest.raises(InputError, match="seed"):
        run_extraction(extractor, records, paths, shard_size=1, seed=9, resume=True, quiet=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images(tmp_path, extractor, workers):
    records = make_records(tmp_path, n=3)
    open(records[1].path, "wb").write(b"not an image")
    os.remove(records[2].path)
    paths = output_paths(str(tmp_path / "out"), "train", 0.6, 0.3)
    with pytest.raises(InputError) as e:
        run_extraction(extractor, records, paths, quiet=True, workers=workers)
    assert records[1].path in str(e.value) and "cannot read image" in str(e.value)
    assert not os.path.exists(paths.feats)
    m = run_extraction(extractor, records, paths, repeat=2, skip_bad_images=True, quiet=True,
                       workers=workers)
    assert m["skipped_images"] == sorted([records[1].path, records[2].path]) and m["passes"] == 2
    assert "2 skipped bad images" in extract.summary_line(m, paths)
    assert len(np.load(paths.labels)) == m["rows"] > 0


def test_empty_output_is_still_written(tmp_path, extractor):
    records = [ImageRecord(0, make_records(tmp_path, n=1)[0].path, 64, 48)]  # no GT: no rows
    paths = output_paths(str(tmp_path / "out"), "train", 0.6, 0.3)
    m = run_extraction(extractor, records, paths, quiet=True)
    feats, labels = load(paths)
    assert m["rows"] == 0 and feats.shape == (0, 1024) and labels.shape == (0,)


# --------------------------------------------------------------------------------------------
# The command (config + checkpoint + COCO-format data, as a user runs it)
# --------------------------------------------------------------------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402

import yaml  # noqa: E402

from vldus import cli  # noqa: E402
from vldus.config import load_config  # noqa: E402

CLASSES = ["disc", "square", "bar", "ring"]  # 'ring' is unseen


def _write_coco(root, name, images):
    """images: list of (boxes xywh, class names); draws each box as a bright rectangle."""
    rng = np.random.default_rng(len(name))
    entries, anns = [], []
    for i, objects in enumerate(images):
        pixels = rng.integers(0, 60, (64, 80, 3), dtype=np.uint8)
        for x, y, w, h, _ in objects:
            pixels[y:y + h, x:x + w] = 220
        file = f"{name}_{i}.png"
        Image.fromarray(pixels).save(root / "images" / file)
        entries.append({"id": i + 1, "file_name": file, "width": 80, "height": 64})
        for x, y, w, h, cls in objects:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": CLASSES.index(cls) + 1,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
    with open(root / "annotations" / f"instances_{name}.json", "w") as f:
        json.dump({"images": entries, "annotations": anns, "categories": cats}, f)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny dataset, its config (R18-FPN at 64 px) and a random-weight detector checkpoint."""
    from vldus.detection.model import build_detector

    root = tmp_path_factory.mktemp("proj")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    seen = [[(5, 5, 20, 30, "disc"), (40, 20, 30, 20, "square")], [(10, 30, 40, 20, "bar")],
            [(50, 5, 20, 50, "disc")], [(30, 30, 30, 30, "square")],
            [(5, 5, 30, 30, "disc"), (45, 30, 20, 20, "ring")]]  # last one: has an unseen object
    test = [[(10, 10, 30, 30, "ring")], [(40, 10, 30, 40, "ring"), (5, 40, 20, 20, "ring")],
            [(5, 5, 30, 30, "disc"), (45, 30, 20, 20, "ring")]]
    val = [[(10, 10, 30, 30, "disc")], [(40, 10, 30, 40, "bar"), (5, 40, 20, 20, "square")]]
    _write_coco(root, "train", seen)
    _write_coco(root, "test", test)
    _write_coco(root, "val", val)
    with open(root / "split.json", "w") as f:
        json.dump({"name": "tiny", "classes": CLASSES, "unseen": ["ring"]}, f)
    tree = yaml.safe_load(open("configs/shapes.yaml"))
    tree.update(name="tiny", split=str(root / "split.json"), work_dir=str(root / "work"))
    src = {"format": "coco", "img_dir": str(root / "images")}
    tree["data"]["train"] = {**src, "ann_file": str(root / "annotations/instances_train.json"), "repeat": 2}
    tree["data"]["test"] = {**src, "ann_file": str(root / "annotations/instances_test.json")}
    tree["data"]["val"] = {**src, "ann_file": str(root / "annotations/instances_val.json")}
    tree["detector"].update(backbone="resnet18", norm="bn", backbone_weights=None, fpn_channels=16,
                            min_size=64, max_size=80, anchor_sizes=[16, 32, 64, 128, 256],
                            rpn_pre_nms_train=300, rpn_post_nms_train=100, roi_batch_size=128)
    tree["features"]["num_rois"] = 64
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tree))
    cfg = load_config(str(config))
    split = cfg.load_split()
    torch.manual_seed(0)
    model = build_detector(cfg, split)
    ckpt = root / "epoch_1.pth"
    torch.save({"model": model.state_dict(), "classes": list(split.classes), "epoch": 1}, ckpt)
    return {"root": root, "config": str(config), "ckpt": str(ckpt), "cfg": cfg}


def _args(project, save_dir, *extra, classes="seen", data_split="train"):
    return ["extract-features", "--quiet", "--config", project["config"], "--checkpoint", project["ckpt"],
            "--classes", classes, "--data-split", data_split, "--save-dir", str(save_dir), *extra]


def test_command_seen_train_and_unseen_test(project, tmp_path, capsys):
    with torch_threads(1):
        assert cli.main(_args(project, tmp_path, "--shard-size", "3")) == 0
    out = capsys.readouterr().out
    assert "from 4 images (8 passes), 0 skipped bad images" in out  # repeat 2; 'ring' image dropped
    labels = np.load(tmp_path / "train_0.6_0.3_labels.npy")
    assert np.load(tmp_path / "train_0.6_0.3_feats.npy").shape == (len(labels), 1024)
    assert set(np.unique(labels)) == {0, 1, 2, 3} and (labels > 0).sum() >= 2 * 6

    assert cli.main(_args(project, tmp_path, classes="unseen", data_split="test")) == 0
    labels = np.load(tmp_path / "test_0.6_0.3_labels.npy")
    assert set(np.unique(labels)) == {0, 4}  # unseen-only test images: 'ring' (index 4) + bg
    m = json.load(open(tmp_path / "test_0.6_0.3_manifest.json"))
    assert m["images"] == 2 and m["rows_per_label"]["ring"] == (labels == 4).sum() >= 3


def test_command_val_split_seen_only_without_flips(project, tmp_path, capsys):
    """--data-split val: data.val's images (seen only), repeat 1, never flipped, same file format."""
    assert cli.main(_args(project, tmp_path, "--set", "features.proposals=50", data_split="val")) == 0
    assert "from 2 images (2 passes)" in capsys.readouterr().out
    labels = np.load(tmp_path / "val_0.6_0.3_labels.npy")
    assert np.load(tmp_path / "val_0.6_0.3_feats.npy").shape == (len(labels), 1024)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    m = json.load(open(tmp_path / "val_0.6_0.3_manifest.json"))
    assert m["run"]["flip"] == 0.0 and m["run"]["data_split"] == "val" and m["run"]["features"]["proposals"] == 50
    assert cli.main(_args(project, tmp_path, classes="unseen", data_split="val")) == 2
    assert "--data-split val has seen classes only" in capsys.readouterr().err


def test_command_val_split_without_data_val_is_one_line_exit_2(project, tmp_path, capsys):
    assert cli.main(_args(project, tmp_path, "--set", "data.val=null", data_split="val")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.val is null" in err
    assert not os.path.exists(tmp_path / "val_0.6_0.3_feats.npy")


def test_command_defaults_to_work_dir_features(project):
    args = _args(project, "unused", "--max-images", "1")
    i = args.index("--save-dir")
    assert cli.main(args[:i] + args[i + 2:]) == 0
    feats = os.path.join(project["cfg"].path("features"), "train_0.6_0.3_feats.npy")
    assert os.path.isfile(feats)


@pytest.mark.parametrize("case", ["missing_ckpt", "wrong_classes", "missing_config", "bad_image"])
def test_command_bad_input_is_one_line_exit_2(project, tmp_path, capsys, case):
    from vldus.detection.model import build_detector
    from vldus.data.splits import split_from_names

    args = _args(project, tmp_path / "out")
    if case == "missing_ckpt":
        args[args.index("--checkpoint") + 1] = needle = str(tmp_path / "none.pth")
    elif case == "wrong_classes":
        other = split_from_names("x", CLASSES + ["star"], ["ring"])
        needle = str(tmp_path / "five.pth")
        torch.save({"model": build_detector(project["cfg"], other).state_dict()}, needle)
        args[args.index("--checkpoint") + 1] = needle
    elif case == "missing_config":
        args[args.index("--config") + 1] = needle = str(tmp_path / "none.yaml")
    else:
        bad = tmp_path / "bad.yaml"
        tree = yaml.safe_load(open(project["config"]))
        images = tmp_path / "images"
        images.mkdir()
        for f in (project["root"] / "images").iterdir():
            (images / f.name).write_bytes(f.read_bytes())
        (images / "train_0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        tree["data"]["train"]["img_dir"] = str(images)
        bad.write_text(yaml.safe_dump(tree))
        args[args.index("--config") + 1] = str(bad)
        needle = str(images / "train_0.png")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("vldus extract-features: error:")
    if case == "bad_image":
        assert cli.main(args + ["--skip-bad-images"]) == 0
        assert "1 skipped bad image " in capsys.readouterr().out


def test_torchrun_two_processes_match_one(project, tmp_path):
    with torch_threads(1):  # torchrun workers run with OMP_NUM_THREADS=1: same arithmetic
        assert cli.main(_args(project, tmp_path / "one", "--shard-size", "1")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "vldus.cli", *_args(project, tmp_path / "two", "--shard-size", "1")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("extract-features:") == 1  # rank 0 reports
    one = [np.load(tmp_path / "one" / f"train_0.6_0.3_{k}.npy") for k in ("feats", "labels")]
    two = [np.load(tmp_path / "two" / f"train_0.6_0.3_{k}.npy") for k in ("feats", "labels")]
    assert len(one[1]) == len(two[1]) and np.array_equal(one[1], two[1])
    assert np.allclose(one[0], two[0], atol=1e-4)


class torch_threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def test_rank_0_lists_the_pending_shards_for_every_rank(tmp_path, extractor):
    """Two ranks, rank 1 with a stale view of the parts folder (it lists no pending shard): rank
    0's list is every rank's, so every shard is done once (each rank listed its own, and rank 0
    then found rank 1's shards unfinished)."""
    from test_devices import _two_ranks

    from vldus.detection.shards import ShardStore

    records = make_records(tmp_path)
    paths = output_paths(str(tmp_path / "out"), "train", 0.6, 0.3)
    real = ShardStore.pending

    def run(rank):
        if rank == 1:
            ShardStore.pending = lambda self, n: []
        else:
            ShardStore.pending = real
        m = run_extraction(extractor, records, paths, repeat=1, seed=3, shard_size=1, quiet=True)
        return None if m is None else m["passes"]

    assert _two_ranks(run) == [len(records), None]
    one = output_paths(str(tmp_path / "one"), "train", 0.6, 0.3)
    run_extraction(extractor, records, one, repeat=1, seed=3, shard_size=1, quiet=True)
    assert np.array_equal(load(paths)[1], load(one)[1])
