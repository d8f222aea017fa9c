"""vldus make-shapes: layout, determinism, attributes, composition, clutter, box accuracy, CLI errors."""
import contextlib
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from vldus import cli
from vldus.data import shapes as S
from vldus.data.splits import load_split
from vldus.errors import InputError

SMALL = dict(train_images=16, test_images=12, image_size=96, val_images=3)


def _digest(folder: str) -> dict[str, str]:
    """sha256 of every file under folder, keyed by relative path."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shapes"))
    S.make_shapes(out, seed=3, train_images=40, test_images=40, image_size=128, progress=False)
    return out


def _load(folder: str, split: str) -> dict:
    with open(os.path.join(folder, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


# --- layout and determinism ---------------------------------------------------------------
def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    S.make_shapes(a, seed=7, progress=False, **SMALL)
    S.make_shapes(b, seed=7, progress=False, **SMALL)
    S.make_shapes(c, seed=8, progress=False, **SMALL)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert len(da) == SMALL["train_images"] + SMALL["test_images"] + SMALL["val_images"] + 5  # 3 json, split, attributes
    assert da == db
    images = [k for k in da if k.startswith("images")]
    assert sum(da[k] != dc.get(k) for k in images) == len(images)
    assert da["split.json"] == dc["split.json"] and da["attributes.npy"] == dc["attributes.npy"]


def test_rerun_into_same_folder_removes_stale_images(tmp_path):
    S.make_shapes(tmp_path, seed=1, train_images=5, test_images=4, image_size=64, progress=False, val_images=3)
    S.make_shapes(tmp_path, seed=1, train_images=3, test_images=2, image_size=64, progress=False, val_images=1)
    assert sorted(os.listdir(tmp_path / "images")) == [
        "test_000001.png", "test_000002.png", "train_000001.png", "train_000002.png", "train_000003.png",
        "val_000001.png"]


def test_validation_images_leave_train_and_test_unchanged(tmp_path):
    """The validation split is drawn from its own generators and numbered last: adding it (or
    changing its size) changes no training or test file."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    S.make_shapes(a, seed=5, progress=False, **{**SMALL, "val_images": 1})
    S.make_shapes(b, seed=5, progress=False, **{**SMALL, "val_images": 4})
    da, db = _digest(a), _digest(b)
    same = [k for k in da if not os.path.basename(k).startswith(("val_", "instances_val"))]
    assert len(same) == SMALL["train_images"] + SMALL["test_images"] + 4
    assert all(da[k] == db[k] for k in same)
    assert S.default_val_images(600) == 75 and S.default_val_images(4) == 1


@pytest.mark.parametrize("split", ["train", "test", "val"])
def test_coco_json_is_valid(data, split):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(os.path.join(data, "annotations", f"instances_{split}.json"))
    with open(os.path.join(data, "split.json")) as f:
        sp = json.load(f)
    cats = coco.loadCats(coco.getCatIds())
    assert [c["name"] for c in cats] == sp["classes"] == list(S.CLASSES)
    assert [c["id"] for c in cats] == list(range(1, len(S.CLASSES) + 1))
    assert len(coco.getImgIds()) == (5 if split == "val" else 40)
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img["width"], img["height"]) == (128, 128)
        with Image.open(os.path.join(data, "images", img["file_name"])) as im:
            assert im.size == (128, 128) and im.mode == "RGB"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert 1 <= len(anns) <= S.ShapesStyle().objects_per_image[1]
        for a in anns:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
            assert a["area"] == pytest.approx(w * h) and a["iscrowd"] == 0
            assert max(w, h) >= 0.5 * S.ShapesStyle().object_size[0] * 128  # no slivers


def test_train_test_and_val_image_ids_are_disjoint(data):
    ids = [{i["id"] for i in _load(data, s)["images"]} for s in ("train", "test", "val")]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    anns = [a for s in ("train", "test", "val") for a in _load(data, s)["annotations"]]
    assert len({a["id"] for a in anns}) == len(anns)


def test_split_json_loads_as_split(data):
    split = load_split(os.path.join(data, "split.json"))
    assert split.classes == S.CLASSES and split.unseen == S.DEFAULT_UNSEEN
    with open(os.path.join(data, "split.json")) as f:
        assert json.load(f)["seen"] == list(split.seen)
    assert len(split.seen) == 12


# --- attributes ---------------------------------------------------------------------------
def test_attribute_matrix_rows(data):
    a = np.load(os.path.join(data, "attributes.npy"))
    assert a.dtype == np.float32 and a.shape == (len(S.CLASSES) + 1, len(S.ATTRIBUTE_NAMES))
    np.testing.assert_array_equal(a, S.attribute_matrix(S.CLASSES))
    bg = S.ATTRIBUTE_NAMES.index("background")
    assert a[0, bg] == 1 and a[0].sum() == 1 and (a[1:, bg] == 0).all()
    shapes, colours = a[1:, :len(S.SHAPES)], a[1:, len(S.SHAPES):len(S.SHAPES) + len(S.COLOURS)]
    assert (shapes.sum(1) == 1).all() and (colours.sum(1) == 1).all()
    k = S.CLASSES.index("yellow star") + 1
    assert a[k, S.ATTRIBUTE_NAMES.index("yellow")] == 1 and a[k, S.ATTRIBUTE_NAMES.index("star")] == 1
    assert len({tuple(r) for r in a}) == len(a)  # all rows distinct


def test_attribute_matrix_accepts_loose_names_and_rejects_unknown():
    np.testing.assert_array_equal(S.attribute_matrix(["Red_Circle", "blue-star"]),
                                  S.attribute_matrix(["red circle", "blue star"]))
    with pytest.raises(InputError, match="purple circle"):
        S.attribute_matrix(["red circle", "purple circle"], source="names.txt")


@pytest.mark.parametrize("unseen", [S.DEFAULT_UNSEEN, ("red circle", "green circle", "red square")])
def test_every_unseen_class_shares_attributes_with_seen_classes(unseen):
    unseen = S.check_unseen(unseen)
    seen = [c for c in S.CLASSES if c not in unseen]
    for u in unseen:
        colour, shape = u.split()
        same_shape = [s for s in seen if s.split()[1] == shape]
        same_colour = [s for s in seen if s.split()[0] == colour]
        assert same_shape and same_colour and set(same_shape) != set(same_colour)


def test_default_unseen_is_a_latin_square_diagonal():
    assert sorted(u.split()[0] for u in S.DEFAULT_UNSEEN) == sorted(S.COLOURS)
    assert sorted(u.split()[1] for u in S.DEFAULT_UNSEEN) == sorted(S.SHAPES)


def test_class_colours_stay_apart_under_jitter():
    rng = np.random.default_rng(0)
    ranges = {**S.CLASS_HSV, **S.DISTRACTOR_HSV}
    samples = {n: np.array([S._hsv_colour(rng, r) for _ in range(600)], float) for n, r in ranges.items()}
    for a in S.CLASS_HSV:
        for b in ranges:
            if a != b:
                d = np.sqrt(((samples[a][:, None] - samples[b][None]) ** 2).sum(-1)).min()
                assert d > 50, (a, b, d)


# --- composition --------------------------------------------------------------------------
def test_split_composition(data):
    unseen_ids = {S.CLASSES.index(u) + 1 for u in S.DEFAULT_UNSEEN}
    kinds = {}
    for split in ("train", "test"):
        d = _load(data, split)
        per_image = {i["id"]: [] for i in d["images"]}
        for a in d["annotations"]:
            per_image[a["image_id"]].append(a["category_id"] in unseen_ids)
        flags = list(per_image.values())
        kinds[split] = (sum(not any(f) for f in flags), sum(any(f) and not all(f) for f in flags),
                        sum(all(f) for f in flags))
    seen_only, mixed, unseen_only = kinds["train"]
    assert seen_only >= 0.8 * 40 and mixed + unseen_only >= 2
    seen_only, mixed, unseen_only = kinds["test"]
    assert mixed + unseen_only >= 0.7 * 40 and mixed >= 10 and unseen_only >= 5


def test_validation_split_is_seen_only_and_not_training_images(data):
    val, train = _load(data, "val"), _load(data, "train")
    unseen_ids = {S.CLASSES.index(u) + 1 for u in S.DEFAULT_UNSEEN}
    assert len(val["images"]) == S.default_val_images(40) == 5
    assert val["annotations"] and not any(a["category_id"] in unseen_ids for a in val["annotations"])
    assert {a["image_id"] for a in val["annotations"]} == {i["id"] for i in val["images"]}
    assert all(i["file_name"].startswith("val_") for i in val["images"])
    pixels = {Image.open(os.path.join(data, "images", i["file_name"])).tobytes() for i in train["images"]}
    assert not any(Image.open(os.path.join(data, "images", i["file_name"])).tobytes() in pixels
                   for i in val["images"])


def test_class_frequencies_balanced_within_groups():
    rng = np.random.default_rng(0)
    seen = [S.CLASSES.index(c) for c in S.CLASSES if c not in S.DEFAULT_UNSEEN]
    unseen = [S.CLASSES.index(c) for c in S.DEFAULT_UNSEEN]
    plans = S.plan_split(rng, 300, S.TEST_MIX, seen, unseen, S.ShapesStyle())
    counts = np.bincount([c for p in plans for c in p], minlength=len(S.CLASSES))
    for group in (seen, unseen):
        assert counts[group].max() - counts[group].min() <= 1
    assert counts[unseen].min() > counts[seen].max()  # test split is rich in unseen objects


# --- what the images look like ------------------------------------------------------------
def _image_and_boxes(folder, d, img):
    arr = np.asarray(Image.open(os.path.join(folder, "images", img["file_name"])), np.float32)
    anns = [a for a in d["annotations"] if a["image_id"] == img["id"]]
    return arr, anns


def test_background_is_cluttered_and_noisy(data):
    d = _load(data, "train")
    for img in d["images"][:10]:
        arr, anns = _image_and_boxes(data, d, img)
        background = np.ones(arr.shape[:2], bool)
        for a in anns:
            x, y, w, h = (int(round(v)) for v in a["bbox"])
            background[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2] = False
        assert arr[background].std(0).mean() > 12  # gradients, blobs, clutter
        # pixel noise: residual against the 4-neighbour mean
        nb = (arr[:-2, 1:-1] + arr[2:, 1:-1] + arr[1:-1, :-2] + arr[1:-1, 2:]) / 4
        assert np.median(np.abs(arr[1:-1, 1:-1] - nb)) > 1.5


def _class_colour_mask(arr: np.ndarray, colour: str, margin: float = 14.0) -> np.ndarray:
    """Pixels whose hue lies in the colour's hue range (+- margin) and that are saturated."""
    hsv = np.asarray(Image.fromarray(arr.astype(np.uint8)).convert("HSV"), np.float32)
    hue, sat = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255
    (h0, h1), _, _ = S.CLASS_HSV[colour]
    centre, half = (h0 + h1) / 2, (h1 - h0) / 2 + margin
    dist = np.abs((hue - centre + 180) % 360 - 180)
    return (dist <= half) & (sat > 0.45)


def test_boxes_are_tight_around_drawn_objects(data):
    d = _load(data, "test")
    checked = 0
    for img in d["images"][:12]:
        arr, anns = _image_and_boxes(data, d, img)
        for a in anns:
            colour = S.CLASSES[a["category_id"] - 1].split()[0]
            mask = _class_colour_mask(arr, colour)
            x0, y0, w, h = a["bbox"]
            x0, y0, x1, y1 = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x0 + w)), int(np.ceil(y0 + h))
            inside = mask[y0:y1, x0:x1]
            assert inside.mean() > 0.25  # the object fills a good part of its box
            for strip in (inside[:3], inside[-3:], inside[:, :3], inside[:, -3:]):
                assert strip.any()  # each box edge touches the object (thin tips blur: 3 px)
            checked += 1
    assert checked >= 30


# --- command line ----------------------------------------------------------------------------
def test_cli_writes_dataset_with_unseen_override(tmp_path):
    out = str(tmp_path / "d")
    rc, stdout, err = _cli("make-shapes", "--out", out, "--seed", "2", "--train-images", "3",
                           "--test-images", "3", "--val-images", "2", "--image-size", "80",
                           "--unseen", "Red Circle, green_square,blue triangle", "--quiet")
    assert rc == 0 and err == "" and stdout == ""
    with open(os.path.join(out, "split.json")) as f:
        sp = json.load(f)
    assert sp["name"] == "shapes"
    assert sp["unseen"] == ["red circle", "green square", "blue triangle"]
    assert len(sp["seen"]) == 13 and not set(sp["seen"]) & set(sp["unseen"])
    with Image.open(os.path.join(out, "images", "test_000003.png")) as im:
        assert im.size == (80, 80)
    assert len(_load(out, "val")["images"]) == 2 and os.path.isfile(os.path.join(out, "images", "val_000002.png"))


@pytest.mark.parametrize("argv, expected", [
    (["--unseen", "red circle,purple circle"], "purple circle"),
    (["--unseen", "red circle,red square,red triangle,red star"], "'red'"),
    (["--unseen", "blue circle,blue square,yellow circle,yellow square,blue triangle,blue star"], "'blue'"),
    (["--unseen", ",".join(S.CLASSES)], "no seen class"),
    (["--unseen", " , "], "no unseen"),
    (["--unseen", "red circle,Red_Circle"], "twice"),
    (["--train-images", "0"], "--train-images"),
    (["--val-images", "0"], "--val-images"),
    (["--image-size", "20"], "--image-size"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, argv, expected):
    rc, _, err = _cli("make-shapes", "--out", str(tmp_path / "d"), "--quiet", *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vldus make-shapes: error: ") and expected in lines[0]
    assert not os.path.exists(tmp_path / "d")  # nothing written on bad input


def test_cli_out_is_a_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "f").write_text("x")
    rc, _, err = _cli("make-shapes", "--out", str(tmp_path / "f"), "--quiet", "--train-images", "1")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / "f") in err
