"""DetectionDataset: tensors and targets, flips, repeat, bad images, the training selection."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vldus.config import Config, DataSource
from vldus.data.records import ImageRecord
from vldus.data.splits import split_from_names
from vldus.detection.dataset import (BadImageError, DetectionDataset, collate_fn, flip_boxes,
                                     training_dataset)
from vldus.errors import InputError


def write_image(path, width=40, height=30, box=(5, 10, 15, 20)):
    """Grey image with one white rectangle at ``box`` (xyxy, pixels)."""
    a = np.full((height, width, 3), 50, np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = 255
    Image.fromarray(a).save(path)
    return str(path)


def record(path, image_id=1, width=40, height=30, boxes=((5, 10, 15, 20),), labels=(1,), ignore=(False,)):
    return ImageRecord(image_id, str(path), width, height, np.array(boxes, np.float32),
                       np.array(labels), np.array(ignore))


def white_box(image: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(image[0] > 0.9, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_sample_layout_and_ignore_boxes(tmp_path):
    p = write_image(tmp_path / "a.png")
    rec = record(p, image_id=7, boxes=[(5, 10, 15, 20), (0, 0, 4, 4)], labels=[2, 1], ignore=[False, True])
    image, target = DetectionDataset([rec], train=False)[0]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["boxes"].tolist() == [[5, 10, 15, 20]] and target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [2] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 7 and "skipped" not in target


def test_flip_moves_boxes_with_pixels(tmp_path):
    p = write_image(tmp_path / "a.png")
    ds = DetectionDataset([record(p)], train=True, flip=1.0)
    image, target = ds[0]
    assert target["boxes"].tolist() == [[25, 10, 35, 20]]
    assert white_box(image) == target["boxes"][0].tolist()
    assert flip_boxes(torch.tensor([[0.0, 1, 10, 2]]), 10).tolist() == [[0, 1, 10, 2]]


def test_flip_draws_are_seeded_per_epoch_and_sample(tmp_path):
    p = write_image(tmp_path / "a.png")
    ds = DetectionDataset([record(p)] * 64, train=True, flip=0.5, seed=3)
    first = [ds.is_flipped(i) for i in range(64)]
    assert 16 < sum(first) < 48
    assert first == [DetectionDataset([record(p)] * 64, train=True, flip=0.5, seed=3).is_flipped(i) for i in range(64)]
    ds.set_epoch(1)
    assert [ds.is_flipped(i) for i in range(64)] != first
    assert not any(DetectionDataset([record(p)] * 8, train=False, flip=1.0).is_flipped(i) for i in range(8))


def test_repeat(tmp_path):
    recs = [record(write_image(tmp_path / f"{i}.png"), image_id=i) for i in range(3)]
    ds = DetectionDataset(recs, train=True, repeat=4)
    assert len(ds) == 12
    assert [ds[i][1]["image_id"] for i in (0, 4, 11)] == [0, 1, 2]
    with pytest.raises(InputError, match="repeat"):
        DetectionDataset(recs, train=True, repeat=0)


def test_collate_keeps_lists(tmp_path):
    recs = [record(write_image(tmp_path / "a.png")), record(write_image(tmp_path / "b.png", 20, 20, (1, 1, 5, 5)),
                                                             image_id=2, width=20, height=20)]
    images, targets = collate_fn([DetectionDataset(recs, train=False)[i] for i in range(2)])
    assert [im.shape for im in images] == [(3, 30, 40), (3, 20, 20)]
    assert [t["image_id"] for t in targets] == [1, 2]


@pytest.mark.parametrize("problem", ["missing", "corrupt", "size"])
def test_bad_image_names_the_file(tmp_path, problem):
    path = tmp_path / "bad.png"
    if problem == "corrupt":
        path.write_bytes(b"\x89PNG not really")
    elif problem == "size":
        write_image(path, width=41)
    with pytest.raises(BadImageError) as e:
        DetectionDataset([record(path)], train=False)[0]
    assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1
    assert isinstance(e.value, InputError)


def test_bad_image_from_a_worker_process_stays_one_line(tmp_path):
    path = str(tmp_path / "gone.png")
    loader = DataLoader(DetectionDataset([record(path)], train=False), num_workers=1, collate_fn=collate_fn)
    with pytest.raises(InputError) as e:
        next(iter(loader))
    assert str(e.value) == f"{path}: image file not found"


def test_skip_bad_replaces_and_reports(tmp_path):
    good = write_image(tmp_path / "good.png")
    recs = [record(tmp_path / "gone.png", image_id=1), record(good, image_id=2)]
    ds = DetectionDataset(recs, train=False, skip_bad=True)
    image, target = ds[0]
    assert target["image_id"] == 2 and target["skipped"] == [str(tmp_path / "gone.png")]
    assert "skipped" not in ds[1][1]
    with pytest.raises(BadImageError, match="none of the 1 images"):
        DetectionDataset(recs[:1], train=False, skip_bad=True)[0]


def test_training_dataset_selects_seen_only_images(tmp_path):
    import json
    write_image(tmp_path / "1.png")
    write_image(tmp_path / "2.png")
    write_image(tmp_path / "3.png", width=20, height=20)
    ann = {"images": [{"id": 1, "file_name": "1.png", "width": 40, "height": 30},
                      {"id": 2, "file_name": "2.png", "width": 40, "height": 30},
                      {"id": 3, "file_name": "3.png", "width": 20, "height": 20}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 10, 10, 10], "iscrowd": 0},
                           {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 10, 10, 10], "iscrowd": 0},
                           {"id": 3, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}],
           "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    split = split_from_names("s", ["cat", "dog"], ["dog"])
    cfg = Config()
    cfg.data.train = DataSource(format="coco", ann_file=str(tmp_path / "ann.json"), img_dir=str(tmp_path), repeat=2)
    cfg.data.min_image_side = 25
    cfg.train.flip = 0.25
    ds = training_dataset(cfg, split)
    assert [r.image_id for r in ds.records] == [1]  # 2 has an unseen dog, 3 is too small
    assert len(ds) == 2 and ds.flip == 0.25 and ds.train
    cfg.data.min_image_side = 100
    with pytest.raises(InputError, match="no training images"):
        training_dataset(cfg, split)
