"""The ``yolo`` format: Ultralytics / Roboflow data.yaml trees written here; folder resolution,
label conversion, ``list_file``, every bad-input case."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from vldus.config import DataSource
from vldus.data.readers import coco_category_ids, load_records
from vldus.data.splits import split_from_names
from vldus.errors import InputError

SPLIT = split_from_names("kitchen", ["cup", "bowl", "spoon"], ["spoon"])
NAMES = ["cup", "bowl", "spoon"]


def image(path, size=(100, 50)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size).save(path)


def write_yaml(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def label(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def roboflow(tmp_path, label_text="1 0.5 0.5 0.2 0.4\n", data=None):
    """Roboflow's layout: data.yaml at the root, ``train: ../train/images``; one labelled train
    image of 100x50, one valid image without a label file, one test image."""
    root = tmp_path / "ds"
    image(str(root / "train" / "images" / "b.jpg"))
    label(str(root / "train" / "labels" / "b.txt"), label_text)
    image(str(root / "valid" / "images" / "v.png"), size=(40, 30))
    image(str(root / "test" / "images" / "t.jpg"))
    label(str(root / "test" / "labels" / "t.txt"), "2 0.5 0.5 0.5 0.5\n")
    data = {"train": "../train/images", "val": "../valid/images", "test": "../test/images",
            "nc": 3, "names": NAMES} if data is None else data
    return write_yaml(root / "data.yaml", data)


def src(ann_file, subset="train", list_file=""):
    return DataSource(format="yolo", ann_file=str(ann_file), subset=subset, list_file=list_file)


# ---------------------------------------------------------------------------------------------
# layouts and conversion
# ---------------------------------------------------------------------------------------------
def test_roboflow_layout_boxes_to_pixels(tmp_path):
    ann = roboflow(tmp_path, "1 0.5 0.5 0.2 0.4\n\n0 0.1 0.2 0.2 0.4\n")
    (rec,) = load_records(src(ann), SPLIT)
    assert rec.path == str(tmp_path / "ds" / "train" / "images" / "b.jpg")
    assert (rec.width, rec.height, rec.image_id) == (100, 50, 1)
    # cx cy w h normalised -> continuous pixel xyxy: (0.5 +- 0.1) * 100, (0.5 +- 0.2) * 50
    np.testing.assert_allclose(rec.boxes, [[40, 15, 60, 35], [0, 0, 20, 20]], atol=1e-4)
    assert rec.labels.tolist() == [2, 1] and not rec.ignore.any()
    (val,) = load_records(src(ann, "val"), SPLIT)  # no label file: an image without objects
    assert len(val) == 0 and (val.width, val.height) == (40, 30)
    (test,) = load_records(src(ann, "test"), SPLIT)
    assert test.labels.tolist() == [3]
    assert coco_category_ids(src(ann), SPLIT) == [1, 2, 3]


def test_ultralytics_layout_path_names_dict_and_sorted_images(tmp_path):
    """coco8-style: ``path`` relative to the yaml, ``images/train``, labels in ``labels/train``."""
    root = tmp_path / "datasets" / "toy"
    for name in ("z.JPG", "a.png", "m.jpeg", "notes.txt", "sub/c.bmp"):
        if name.endswith(".txt"):
            label(str(root / "images" / "train" / name), "not an image")
        else:
            image(str(root / "images" / "train" / name))
    label(str(root / "labels" / "train" / "m.txt"), "0 0.5 0.5 1 1\n")
    label(str(root / "labels" / "train" / "sub" / "c.txt"), "2 0.5 0.5 0.5 0.5\n")
    ann = write_yaml(tmp_path / "cfg" / "toy.yaml", {"path": "../datasets/toy", "train": "images/train",
                                                     "names": {2: "spoon", 0: "cup", 1: "bowl"}})
    recs = load_records(src(ann), SPLIT)
    assert [os.path.relpath(r.path, root / "images" / "train") for r in recs] == [
        "a.png", "m.jpeg", os.path.join("sub", "c.bmp"), "z.JPG"]
    assert [r.image_id for r in recs] == [1, 2, 3, 4]
    assert [r.labels.tolist() for r in recs] == [[], [1], [3], []]
    np.testing.assert_allclose(recs[1].boxes, [[0, 0, 100, 50]])


def test_several_folders_and_default_folders(tmp_path):
    root = tmp_path / "ds"
    image(str(root / "a" / "images" / "1.jpg"))
    image(str(root / "b" / "images" / "2.jpg"))
    image(str(root / "test" / "images" / "t.jpg"))
    image(str(root / "val" / "images" / "v.jpg"))
    ann = write_yaml(root / "data.yaml", {"train": ["b/images", "a/images"], "names": NAMES})
    assert [os.path.basename(r.path) for r in load_records(src(ann), SPLIT)] == ["2.jpg", "1.jpg"]
    assert [os.path.basename(r.path) for r in load_records(src(ann, "test"), SPLIT)] == ["t.jpg"]
    assert [os.path.basename(r.path) for r in load_records(src(ann, "val"), SPLIT)] == ["v.jpg"]
    image(str(root / "valid" / "images" / "w.jpg"))  # Roboflow's name first
    assert [os.path.basename(r.path) for r in load_records(src(ann, "val"), SPLIT)] == ["w.jpg"]


def test_box_within_tolerance_clipped_and_alias_names(tmp_path):
    ann = roboflow(tmp_path, "0 0.5 0.5 1.01 1.0\n", data={"train": "train/images", "names": ["Cup", "bowk", "spoon"]})
    split = split_from_names("kitchen", ["cup", "bowl", "spoon"], ["spoon"], aliases={"bowk": "bowl"})
    (rec,) = load_records(src(ann), split)  # 1.01 * 100 = 0.5 px beyond each side: clipped
    np.testing.assert_allclose(rec.boxes, [[0, 0, 100, 50]], atol=1e-4)
    label(str(tmp_path / "ds" / "train" / "labels" / "b.txt"), "1 0.5 0.5 0.5 0.5\n")
    assert load_records(src(ann), split)[0].labels.tolist() == [2]
    with pytest.raises(InputError, match=r"b\.txt: line 1: class 1 'bowk' is not a class of split kitchen"):
        load_records(src(ann), SPLIT)


# ---------------------------------------------------------------------------------------------
# list_file
# ---------------------------------------------------------------------------------------------
def test_list_file_keeps_listed_images_with_their_ids(tmp_path):
    root = tmp_path / "ds"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        image(str(root / "train" / "images" / name))
    ann = write_yaml(root / "data.yaml", {"train": "../train/images", "names": NAMES})
    (tmp_path / "keep.txt").write_text("c.jpg\n\n./a.jpg\n")
    recs = load_records(src(ann, list_file=str(tmp_path / "keep.txt")), SPLIT)
    assert [(os.path.basename(r.path), r.image_id) for r in recs] == [("a.jpg", 1), ("c.jpg", 3)]
    (tmp_path / "bad.txt").write_text("a.jpg\nd.jpg\n")
    with pytest.raises(InputError) as e:
        load_records(src(ann, list_file=str(tmp_path / "bad.txt")), SPLIT)
    assert str(e.value).startswith(f"{tmp_path / 'bad.txt'}: line 2: 'd.jpg' is not an image of {ann}")
    (tmp_path / "twice.txt").write_text("a.jpg\na.jpg\n")
    with pytest.raises(InputError, match=r"twice\.txt: line 2: 'a\.jpg' is listed twice \(line 1\)"):
        load_records(src(ann, list_file=str(tmp_path / "twice.txt")), SPLIT)
    with pytest.raises(InputError, match=r"nope\.txt: image list not found"):
        load_records(src(ann, list_file=str(tmp_path / "nope.txt")), SPLIT)


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and the line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    ("1 0.5 0.5 0.2\n", "line 1: expected 5 numbers 'class cx cy w h', got 4"),
    ("\n1 0.5 0.5 0.2 0.2 0.9\n", "line 2: expected 5 numbers 'class cx cy w h', got 6"),
    ("0 0.1 0.1 0.5 0.1 0.5 0.5\n", "line 1: 6 coordinates: a polygon (segmentation) line, not a box"),
    ("1 0.5 x 0.2 0.2\n", "line 1: 'x' is not a number"),
    ("1 0.5 nan 0.2 0.2\n", "line 1: 'nan' is not a finite number"),
    ("3 0.5 0.5 0.2 0.2\n", "line 1: class 3 is not an index of 'names' (0..2)"),
    ("-1 0.5 0.5 0.2 0.2\n", "line 1: class -1 is not an index of 'names'"),
    ("1.5 0.5 0.5 0.2 0.2\n", "line 1: class 1.5 is not an index of 'names'"),
    ("1 0.5 0.5 0.2 -0.2\n", "line 1: width and height must be >= 0, got w=0.2 h=-0.2"),
    ("1 0.95 0.5 0.2 0.2\n", "line 1: box xyxy [85, 20, 105, 30] is outside the 100x50 image"),
    ("1 50 25 20 10\n", "line 1: box xyxy [4000, 1000, 6000, 1500] is outside the 100x50 image"),  # pixels
])
def test_bad_label_lines(tmp_path, text, message):
    ann = roboflow(tmp_path, text)
    with pytest.raises(InputError) as e:
        load_records(src(ann), SPLIT)
    assert str(e.value).startswith(f"{tmp_path / 'ds' / 'train' / 'labels' / 'b.txt'}: {message}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("drop", [None, True, False])
def test_tiny_boxes_dropped_with_a_warning(tmp_path, caplog, drop):
    """Boxes under 1 px (Roboflow's Aquarium export holds two of width and height 0) are dropped
    and counted in one warning, whatever drop_degenerate says; a box outside the image is not."""
    ann = roboflow(tmp_path, "1 0.5 0.5 0.005 0.2\n0 0.5 0.5 0.2 0.2\n2 0.3 0.3 0 0\n")
    with caplog.at_level(logging.WARNING, logger="vldus.data.readers"):
        (rec,) = load_records(src(ann), SPLIT, drop_degenerate=drop)
    assert rec.labels.tolist() == [1]  # class 0's detector index
    assert any("dropped 2 degenerate box(es)" in r.getMessage() for r in caplog.records)


def test_unreadable_image_and_no_labels_warning(tmp_path, caplog):
    ann = roboflow(tmp_path)
    bad = tmp_path / "ds" / "train" / "images" / "c.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(InputError) as e:
        load_records(src(ann), SPLIT)
    assert str(e.value).startswith(f"{bad}: cannot read image (UnidentifiedImageError")
    os.remove(bad)
    with caplog.at_level(logging.WARNING, logger="vldus.data.readers"):
        load_records(src(ann, "val"), SPLIT)
    assert any("no label file for any of the 1 images" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("data,subset,message", [
    ({"train": "train/images"}, "train", "'names': expected a list of class names or {index: name}, missing"),
    ({"train": "train/images", "names": []}, "train", "'names': empty"),
    ({"train": "train/images", "names": NAMES, "nc": 4}, "train", "'nc': 4, but 'names' has 3 entries"),
    ({"train": "train/images", "names": {0: "cup", 2: "bowl"}}, "train", "'names': indices must be 0..1, got [0, 2]"),
    ({"train": "train/images", "names": {"a": "cup"}}, "train", "'names': key 'a' is not a class index"),
    ({"train": "train/images", "names": ["cup", None]}, "train", "'names': class 1: expected a name, got None"),
    ({"train": "nope/images", "names": NAMES}, "train", "'train': image folder not found: "),
    ({"train": "data.yaml", "names": NAMES}, "train", "'train': "),  # + the path: checked below
    ({"train": "train/images", "names": NAMES}, "val", "'val': no such key, and no "),
    ({"train": "train/images", "names": NAMES}, "", "data source: format yolo needs 'subset' (one of train, val, test), got ''"),
    ({"train": "train/images", "names": NAMES}, "valid", "data source: format yolo needs 'subset' (one of train, val, test), got 'valid'"),
    ({"train": 3, "names": NAMES}, "train", "'train': expected an image folder or a list of folders, got 3"),
    ({"train": "train/images", "names": NAMES, "path": ["x"]}, "train", "'path': expected the dataset folder"),
])
def test_bad_yaml_names_the_file_and_key(tmp_path, data, subset, message):
    root = tmp_path / "ds"
    image(str(root / "train" / "images" / "b.jpg"))
    ann = write_yaml(root / "data.yaml", data)
    with pytest.raises(InputError) as e:
        load_records(src(ann, subset), SPLIT)
    assert str(e.value).startswith(f"{ann}: {message}")
    assert "\n" not in str(e.value)
    if data["train"] == "data.yaml":
        assert str(e.value) == (f"{ann}: 'train': {ann} is a file; expected an image folder "
                                f"(image-list files are not supported)")
    if subset == "val":
        assert str(e.value) == (f"{ann}: 'val': no such key, and no {root / 'valid' / 'images'} or "
                                f"{root / 'val' / 'images'} folder")


def test_unreadable_yaml(tmp_path):
    with pytest.raises(InputError, match=r"nope\.yaml: dataset yaml not found"):
        load_records(src(tmp_path / "nope.yaml"), SPLIT)
    (tmp_path / "bad.yaml").write_text("names: [cup, bowl\ntrain: x\n")
    with pytest.raises(InputError, match=r"bad\.yaml: line \d+ column \d+: malformed YAML"):
        load_records(src(tmp_path / "bad.yaml"), SPLIT)
    (tmp_path / "list.yaml").write_text("- cup\n")
    with pytest.raises(InputError, match=r"list\.yaml: top level: expected a mapping"):
        load_records(src(tmp_path / "list.yaml"), SPLIT)
    with pytest.raises(InputError, match="format yolo needs 'ann_file'"):
        load_records(DataSource(format="yolo", subset="train"), SPLIT)
