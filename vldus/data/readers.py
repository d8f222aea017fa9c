"""Dataset readers: COCO / shapes JSON, PASCAL VOC and DIOR XML, YOLO txt -> :class:`ImageRecord` lists.

Every reader returns one :class:`~vldus.data.records.ImageRecord` per listed image, with ALL
annotations of the split's classes (seen, unseen and excluded); choosing images and annotations
for training or testing is the job of :func:`select_training`, :func:`select_test` and
:func:`select_unseen_only` (docs/design.md §2.3, §3, §9.2).

Formats (``DataSource.format``):

- ``coco`` / ``shapes``: a COCO instances JSON (``ann_file``), images under ``img_dir``
  (``file_name`` is relative to it). ``bbox`` ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``;
  ``iscrowd`` boxes become ignore boxes; category names are matched to the split's classes (and
  aliases) with :func:`~vldus.data.splits.normalize_name` (``'hair drier'`` == ``'hair_drier'``).
  An optional ``list_file`` keeps only the images whose ``file_name`` it lists, one per line.
- ``voc``: ``roots`` are ``VOCdevkit/VOC20xx`` folders, ``list_file`` (relative to each root)
  holds image ids one per line; ``Annotations/<id>.xml`` and ``JPEGImages/<id>.<ext>``, the
  first of the extensions :data:`IMAGE_EXTENSIONS` that exists (``.jpg`` first; any case). The
  image is paired with its XML by id only, never by the XML's ``<filename>`` (GTEA Gaze+ XMLs
  name the source video frame there). ``difficult`` objects become ignore boxes.
- ``dior``: VOC-style XML in ``Annotations/`` or ``Annotations/Horizontal Bounding Boxes/``;
  images ``<id>.<ext>`` in ``JPEGImages-trainval/``, ``JPEGImages-test/`` or ``JPEGImages/``
  (first folder that has the file); lists in ``ImageSets/Main/{train,val,test}.txt``.
- ``yolo``: ``ann_file`` is an Ultralytics / Roboflow ``data.yaml``, ``subset`` its key
  ``train``, ``val`` or ``test``. The yaml has ``names`` (a list, or ``{index: name}`` with
  indices 0..n-1), optional ``nc`` (= the number of names), optional ``path`` (the dataset root,
  relative to the yaml's folder; default: the yaml's folder) and per subset an image folder or a
  list of folders relative to the root. As in Ultralytics, a value ``../x`` whose joined path
  does not exist is tried as ``x`` (Roboflow writes ``train: ../train/images`` with the yaml at
  the dataset root). A subset without a key (or with a null value) uses ``<root>/train/images``,
  ``<root>/valid/images`` or ``<root>/val/images``, ``<root>/test/images`` when it exists.
  Images: every file with an extension in :data:`IMAGE_EXTENSIONS` (any case) under the folder,
  subfolders included, sorted by path relative to the folder. Labels: the image path with its
  last ``images`` folder replaced by ``labels`` and the extension by ``.txt`` (next to the image
  when the path has no ``images`` folder), one object per line ``class cx cy w h``, normalised
  to the image size (read from the image header). A missing or empty label file is an image
  without objects; blank lines are skipped; YOLO has no ignore boxes. ``names`` are matched to
  the split like COCO categories. An optional ``list_file`` keeps only the images it lists, one path relative to the
  image folder per line.

Pixel convention: boxes are continuous 0-based pixel coordinates, the box covering
``[x1, x2) x [y1, y2)`` (torchvision's and COCO's convention). VOC/DIOR XML coordinates are
1-based inclusive pixel indices, so ``xmin..xmax`` becomes ``x1 = xmin - 1, x2 = xmax`` (width
``xmax - xmin + 1``), the usual VOC-to-COCO conversion.

Image size comes from the annotation (COCO ``width``/``height``, XML ``<size>``); when it is
missing it is read from the image file's header with PIL (no decoding).

Image ids: COCO ids as in the JSON. VOC/DIOR: the digits of the file id (``2008_000123`` ->
2008000123, ``00042`` -> 42) when these are unique over the whole source and fit int32, else
1, 2, ... in list order. YOLO: 1, 2, ... in image order over the subset's folders, counted
before ``list_file`` filtering (a listed image has the same id as in the whole folder;
Roboflow's names ``x_jpg.rf.<hash>.jpg`` carry hash digits, so digits of the stem would rarely
be usable).

Bad input raises :class:`~vldus.errors.InputError` with one line naming the file and the item:
malformed JSON/XML/YAML, a listed image or annotation file that does not exist, a category id
not in ``categories``, an object whose class is not in the split, a malformed box; for YOLO a
label line (named by its line number) with other than 5 numbers (a polygon line is named as
such), a class index outside ``names``, a width or height <= 0, an image PIL cannot open; for
``list_file`` a listed name that is not an image of the source.

Before any split exists (``vldus prepare``), :func:`dataset_class_names` lists the class names
as written in the data and :func:`load_records_all_classes` reads records labelled by them.

Degenerate boxes (width or height < 1 px, or reaching more than 1 px outside the image) are an
InputError for ``shapes``, ``voc``, ``dior`` and ``yolo`` by default; for ``coco`` they are dropped
with one counted warning, because COCO 2014 has a few boxes under 1 px, which the published
loader (mmdet 1.x ``coco.py``) skips too. ``drop_degenerate=True/False`` overrides this for any
format. Boxes within the 1 px tolerance are clipped to the image.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from vldus.data.records import ImageRecord
from vldus.data.splits import TEST_RULES, Split, normalize_name
from vldus.errors import InputError

if TYPE_CHECKING:
    from vldus.config import DataSource

log = logging.getLogger(__name__)

FORMATS = ("coco", "shapes", "voc", "dior", "yolo")
SETTINGS = ("zsd", "gzsd")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # VOC / DIOR / YOLO images
YOLO_SUBSETS = ("train", "val", "test")
BOX_TOLERANCE = 1.0  # px a box may reach outside the image before it counts as degenerate
MIN_BOX_SIZE = 1.0  # px; narrower or lower boxes are degenerate (mmdet 1.x coco.py: w < 1 or h < 1)
MAX_IMAGE_ID = 2**31 - 1  # VOC/DIOR ids from file names must fit int32 (pycocotools, torch)
DROP_DEGENERATE_DEFAULT = {"coco": True, "shapes": False, "voc": False, "dior": False, "yolo": False}


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def load_records(source: "DataSource", split: Split, *, drop_degenerate: bool | None = None) -> list[ImageRecord]:
    """Read every image listed by ``source`` (a :class:`vldus.config.DataSource`).

    Returns one record per image, in file / list order, labels = detector index
    (``split.index(name)``), images without annotations included.
    ``drop_degenerate``: None = the format's default (see the module docstring).
    """
    fmt = source.format
    _check_format(source)
    drop = DROP_DEGENERATE_DEFAULT[fmt] if drop_degenerate is None else bool(drop_degenerate)
    if fmt in ("coco", "shapes"):
        return _load_coco(source.ann_file, source.img_dir, split, drop, getattr(source, "list_file", ""))
    if fmt == "yolo":
        return _load_yolo(source, split, drop)
    return _load_xml_dataset(source.roots, source.list_file, split, drop, dior=(fmt == "dior"))


def select_training(records: Iterable[ImageRecord], split: Split, min_side: int) -> list[ImageRecord]:
    """§2.3 training images: every object (ignore boxes included) is seen, at least one object,
    both image sides >= ``min_side``. Records are returned unchanged (ignore boxes stay ignore)."""
    return [r for r in records
            if min(r.width, r.height) >= min_side and split.keep_for_training(r.labels)]


def select_test(records: Iterable[ImageRecord], split: Split, setting: str, rule: str) -> list[ImageRecord]:
    """§9.2 test images and the annotations evaluated on them.

    Images: ``split.keep_for_test(labels, setting, rule)`` over all objects (ignore boxes
    included). Annotations: ``zsd`` keeps only unseen ones; ``gzsd`` keeps all but those of
    excluded classes (COCO 48/17's 15 classes, never evaluated).
    """
    _check_setting(setting, rule)
    unseen, excluded = split.unseen_ids, split.excluded_ids
    out = []
    for r in records:
        if not split.keep_for_test(r.labels, setting, rule):
            continue
        keep = np.isin(r.labels, unseen) if setting == "zsd" else ~np.isin(r.labels, excluded)
        out.append(r.subset(keep))
    return out


def select_unseen_only(records: Iterable[ImageRecord], split: Split) -> list[ImageRecord]:
    """§3: images with at least one object, all of them unseen (the unseen test features)."""
    unseen = split.unseen_ids
    return [r for r in records if len(r) and bool(np.isin(r.labels, unseen).all())]


def coco_category_ids(source: "DataSource", split: Split) -> list[int]:
    """Category id of each detector index 1..C (element ``i`` is the id of ``split.classes[i]``).

    coco/shapes: the ids of the JSON's ``categories`` matched by name, or else by one of the
    class's aliases (InputError if a class of the split has no category); voc/dior/yolo, or
    coco/shapes without ``ann_file``: ``1..C``.
    """
    if source.format not in ("coco", "shapes") or not source.ann_file:
        return list(range(1, split.num_classes + 1))
    ann_file = source.ann_file
    by_name = {normalize_name(name): cid for cid, name in _coco_categories(ann_file)}
    ids = []
    for name in split.classes:
        keys = [normalize_name(name)] + [normalize_name(a) for a, t in split.aliases if t == name]
        key = next((k for k in keys if k in by_name), None)
        if key is None:
            raise InputError(ann_file, f"class {name!r} of split {split.name}: no such category "
                                       f"in 'categories'")
        ids.append(by_name[key])
    return ids


def dataset_class_names(source: "DataSource") -> list[str]:
    """The class names as written in the data, before any split exists (``vldus prepare``).

    coco/shapes: the categories' names in the JSON's order; yolo: ``names`` in index order;
    voc/dior: every ``<object><name>`` over the listed ids' XMLs, in order of first appearance.
    Names equal under :func:`~vldus.data.splits.normalize_name` count once (first spelling kept):
    the readers map them to one class anyway. InputError (one line) on bad input or no names.
    """
    fmt = source.format
    _check_format(source)
    if fmt in ("coco", "shapes"):
        ann_file = source.ann_file
        names, where = [n for _, n in parse_categories(ann_file, read_coco_json(ann_file)["categories"])], ann_file
    elif fmt == "yolo":
        names, where = _yolo_names(source.ann_file, _read_yolo_yaml(source.ann_file)), source.ann_file
    else:
        names = []
        for _, file_id, xml_path in _xml_entries(source.roots, source.list_file, fmt == "dior"):
            root = _read_xml(xml_path)
            for k, obj in enumerate(root.findall("object"), start=1):
                name = (obj.findtext("name") or "").strip()
                if not name:
                    raise InputError(xml_path, f"object {k}: no <name>")
                names.append(name)
        where = ", ".join(os.path.join(r, source.list_file) for r in source.roots)
    unique: dict[str, str] = {}
    for name in names:
        unique.setdefault(normalize_name(name), name)
    if not unique:
        raise InputError(where, "no class names in the data (no categories, names or objects)")
    return list(unique.values())


def load_records_all_classes(source: "DataSource", *, drop_degenerate: bool | None = None
                             ) -> tuple[list[ImageRecord], list[str]]:
    """Records of ``source`` labelled by :func:`dataset_class_names` (label ``i + 1`` =
    ``names[i]``), and those names: for ``vldus prepare``, before any split exists."""
    names = dataset_class_names(source)
    keys = {normalize_name(n) for n in names}
    placeholder = "vldus placeholder"  # the throwaway split's one unseen class; no label uses it
    while normalize_name(placeholder) in keys:
        placeholder += " x"
    split = Split("all-classes", tuple(names) + (placeholder,), (placeholder,))
    return load_records(source, split, drop_degenerate=drop_degenerate), names


def records_to_coco(records: Sequence[ImageRecord], split: Split, category_ids: Sequence[int]) -> dict:
    """COCO-format ground truth of ``records`` (for ``vldus evaluate --ann``).

    images: ``{id, file_name (the record's path), width, height}``; annotations: ``bbox``
    ``[x, y, w, h]``, ``area = w * h``, ignore boxes have ``iscrowd = 1`` and ``ignore = 1``;
    categories: every class of the split, in detector order, with ``category_ids``.
    """
    if len(category_ids) != split.num_classes:
        raise ValueError(f"{len(category_ids)} category ids for {split.num_classes} classes")
    images, annotations = [], []
    for r in records:
        images.append({"id": int(r.image_id), "file_name": r.path,
                       "width": int(r.width), "height": int(r.height)})
        for box, label, ignore in zip(r.boxes.tolist(), r.labels.tolist(), r.ignore.tolist()):
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": int(r.image_id),
                                "category_id": int(category_ids[label - 1]),
                                "bbox": [x1, y1, w, h], "area": w * h,
                                "iscrowd": int(ignore), "ignore": int(ignore)})
    categories = [{"id": int(cid), "name": name} for cid, name in zip(category_ids, split.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def _check_format(source: "DataSource") -> None:
    if source.format not in FORMATS:
        raise InputError(getattr(source, "ann_file", "") or None,
                         f"data source: unknown format {source.format!r} (one of {', '.join(FORMATS)})")


def _check_setting(setting: str, rule: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r} (one of {SETTINGS})")
    if rule not in TEST_RULES:
        raise ValueError(f"unknown test rule {rule!r} (one of {TEST_RULES})")


def _class_lookup(split: Split) -> dict[str, int]:
    """normalized class name or alias -> detector index."""
    return dict(split._lookup)


def _read_image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file from its header; InputError naming the file when PIL
    cannot open it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InputError(path, f"cannot read image ({type(e).__name__}{': ' + reason if reason else ''})") from None


def _name_key(name: str) -> str:
    """An image path relative to its folder, as compared with a ``list_file`` line."""
    return os.path.normpath(name.strip())


def _listed(list_file: str, names: Sequence[str], where: str) -> list[bool]:
    """Which of ``names`` (image paths relative to the image folder) ``list_file`` lists (one
    per line, blank lines skipped). InputError naming the list file and the line for a listed
    name that is not among ``names`` (``where``: the source), is ambiguous or is listed twice."""
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(list_file, "image list not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(list_file, f"cannot read image list ({e})") from None
    position: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        position.setdefault(_name_key(name), []).append(i)
    keep, listed_at = [False] * len(names), {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key = _name_key(line)
        if key not in position:
            raise InputError(list_file, f"line {line_no}: {line.strip()!r} is not an image of {where}")
        if key in listed_at:
            raise InputError(list_file, f"line {line_no}: {line.strip()!r} is listed twice (line {listed_at[key]})")
        if len(position[key]) > 1:
            raise InputError(list_file, f"line {line_no}: {line.strip()!r} names {len(position[key])} images "
                                        f"of {where}")
        listed_at[key] = line_no
        keep[position[key][0]] = True
    return keep


def _image_size_from_header(path: str, where: str) -> tuple[int, int]:
    """(width, height) from the image header; PIL opens lazily, nothing is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(where, f"no image size in the annotation and cannot read the header "
                                f"of {path} ({e})") from None


class _BoxChecker:
    """Validates boxes against their image; degenerate ones raise or are dropped and counted."""

    def __init__(self, source: str, drop: bool, drop_small: bool = False):
        self.source, self.drop, self.drop_small = source, drop, drop_small
        self.dropped, self.first_dropped = 0, ""

    def __call__(self, box: Sequence[float], width: int, height: int, file: str,
                 item: str) -> list[float] | None:
        """Clipped ``[x1, y1, x2, y2]``, or None when degenerate and dropping."""
        x1, y1, x2, y2 = box
        problem, small = "", False
        if not all(math.isfinite(v) for v in box):
            problem = f"box {list(box)} is not finite"
        elif (x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE
              or x2 > width + BOX_TOLERANCE or y2 > height + BOX_TOLERANCE):
            problem = f"box xyxy {_fmt(box)} is outside the {width}x{height} image"
        else:
            x1, y1 = max(x1, 0.0), max(y1, 0.0)
            x2, y2 = min(x2, float(width)), min(y2, float(height))
            if x2 - x1 < MIN_BOX_SIZE or y2 - y1 < MIN_BOX_SIZE:
                problem = f"box xyxy {_fmt(box)} has width or height < {MIN_BOX_SIZE:g} px"
                small = True
        if not problem:
            return [x1, y1, x2, y2]
        if not (self.drop or (self.drop_small and small)):
            raise InputError(file, f"{item}: {problem} (drop_degenerate=True drops such boxes)")
        self.dropped += 1
        where = item if file == self.source else f"{file}: {item}"
        self.first_dropped = self.first_dropped or f"{where}: {problem}"
        return None

    def report(self) -> None:
        if self.dropped:
            log.warning("%s: dropped %d degenerate box(es) (width or height < %g px, or outside the "
                        "image); first: %s", self.source, self.dropped, MIN_BOX_SIZE, self.first_dropped)


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _make_record(image_id: int, path: str, width: int, height: int,
                 boxes: list, labels: list, ignore: list) -> ImageRecord:
    return ImageRecord(image_id, path, int(width), int(height),
                       np.asarray(boxes, np.float32).reshape(-1, 4),
                       np.asarray(labels, np.int64), np.asarray(ignore, bool))


# ----------------------------------------------------------------------------------------------
# COCO / shapes
# ----------------------------------------------------------------------------------------------
_CATEGORY_CACHE: dict[tuple, list[tuple[int, str]]] = {}  # (path, mtime, size) -> categories


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def read_coco_json(ann_file: str) -> dict:
    """A COCO instances JSON with its top-level layout checked (``images``, ``annotations``,
    ``categories`` lists; a missing ``annotations`` becomes ``[]``). Public: ``vldus evaluate``
    reads its ground truth with it. InputError names the file and the item."""
    if not ann_file:
        raise InputError(None, "data source: format coco/shapes needs 'ann_file'")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(ann_file, "annotation file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(ann_file, f"line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(ann_file, f"cannot read annotation file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(ann_file, "top level: expected a JSON object with 'images', "
                                   "'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise InputError(ann_file, f"'{key}': expected a list")
    data.setdefault("annotations", [])
    for key in ("images", "categories"):
        if key not in data:
            raise InputError(ann_file, f"'{key}': missing")
    return data


def parse_categories(ann_file: str, categories: list) -> list[tuple[int, str]]:
    """(id, name) of each entry of a COCO ``categories`` list, in file order; InputError on a
    missing id or name or a duplicate id."""
    out, seen_ids = [], set()
    for k, c in enumerate(categories):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise InputError(ann_file, f"categories[{k}]: needs an integer 'id' and a string 'name'")
        if c["id"] in seen_ids:
            raise InputError(ann_file, f"category {c['id']}: duplicate id")
        seen_ids.add(c["id"])
        out.append((c["id"], c["name"]))
    return out


def _coco_categories(ann_file: str) -> list[tuple[int, str]]:
    """(id, name) of the JSON's categories, cached per file version."""
    try:
        key = _file_key(ann_file)
    except OSError:
        raise InputError(ann_file, "annotation file not found") from None
    if key not in _CATEGORY_CACHE:
        _CATEGORY_CACHE[key] = parse_categories(ann_file, read_coco_json(ann_file)["categories"])
    return _CATEGORY_CACHE[key]


def check_coco_items(ann_file: str, data: dict) -> None:
    """Check the field types pycocotools relies on (integer, unique image and annotation ids,
    ``file_name``, ``image_id`` of a listed image, 4-number ``bbox``), so that a bad file fails
    with one InputError naming the item."""
    image_ids = set()
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            raise InputError(ann_file, f"images[{k}]: needs an integer 'id'")
        if not isinstance(img.get("file_name"), str):
            raise InputError(ann_file, f"image {img['id']}: needs a string 'file_name'")
        if img["id"] in image_ids:
            raise InputError(ann_file, f"image {img['id']}: duplicate id")
        image_ids.add(img["id"])
    ann_ids = set()
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
            raise InputError(ann_file, f"annotations[{k}]: needs an integer 'id'")
        aid = ann["id"]
        if aid in ann_ids:
            raise InputError(ann_file, f"annotation {aid}: duplicate id")
        ann_ids.add(aid)
        if ann.get("image_id") not in image_ids:
            raise InputError(ann_file, f"annotation {aid}: image_id {ann.get('image_id')!r} is not in 'images'")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise InputError(ann_file, f"annotation {aid}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")


def _index_coco(data: dict):
    """A pycocotools COCO index over an already loaded dict (its progress prints silenced)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _load_coco(ann_file: str, img_dir: str, split: Split, drop: bool, list_file: str = "") -> list[ImageRecord]:
    data = read_coco_json(ann_file)
    categories = parse_categories(ann_file, data["categories"])
    _CATEGORY_CACHE[_file_key(ann_file)] = categories
    check_coco_items(ann_file, data)
    coco = _index_coco(data)
    images = data["images"]
    if list_file:  # only the listed file names (checked before any image is looked for)
        keep = _listed(list_file, [img["file_name"] for img in images], ann_file)
        images = [img for img, k in zip(images, keep) if k]

    lookup = _class_lookup(split)
    cat_label = {cid: lookup.get(normalize_name(name)) for cid, name in categories}
    cat_name = dict(categories)
    check = _BoxChecker(ann_file, drop)
    records = []
    for img in images:
        img_id = img["id"]
        path = os.path.join(img_dir, img["file_name"])
        if not os.path.exists(path):
            raise InputError(ann_file, f"image {img_id}: image file not found: {path}")
        width, height = img.get("width"), img.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            width, height = _image_size_from_header(path, f"{ann_file}: image {img_id}")
        boxes, labels, ignore = [], [], []
        for ann in coco.imgToAnns.get(img_id, []):
            aid, cid = ann["id"], ann.get("category_id")
            if cid not in cat_label:
                raise InputError(ann_file, f"annotation {aid}: category_id {cid!r} is not in 'categories'")
            if cat_label[cid] is None:
                raise InputError(ann_file, f"annotation {aid}: category {cid} {cat_name[cid]!r} is not "
                                           f"a class of split {split.name}")
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = check([x, y, x + w, y + h], width, height, ann_file, f"image {img_id} annotation {aid}")
            if box is None:
                continue
            boxes.append(box)
            labels.append(cat_label[cid])
            ignore.append(bool(ann.get("iscrowd", 0)))
        records.append(_make_record(img_id, path, width, height, boxes, labels, ignore))
    check.report()
    return records


# ----------------------------------------------------------------------------------------------
# PASCAL VOC / DIOR
# ----------------------------------------------------------------------------------------------
def _read_id_list(list_path: str) -> list[str]:
    """Image ids, the first token of each non-empty line (class lists 'id  1' work too)."""
    try:
        with open(list_path, encoding="utf-8") as f:
            ids = [line.split()[0] for line in f if line.strip()]
    except FileNotFoundError:
        raise InputError(list_path, "image list not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(list_path, f"cannot read image list ({e})") from None
    return ids


def _first_existing(paths: Sequence[str]) -> str | None:
    return next((p for p in paths if os.path.exists(p)), None)


class _ImageFinder:
    """``<folder>/<id>.<ext>`` for the first folder and extension of :data:`IMAGE_EXTENSIONS`
    that exists (``.jpg`` first); extensions in another case (``.JPG``) are found through one
    cached listing per folder."""

    def __init__(self):
        self._listings: dict[str, dict[str, str]] = {}  # folder -> lower-case name -> name

    def _listing(self, folder: str) -> dict[str, str]:
        if folder not in self._listings:
            try:
                names = os.listdir(folder)
            except OSError:
                names = []
            self._listings[folder] = {n.lower(): n for n in sorted(names, reverse=True)}
        return self._listings[folder]

    def __call__(self, folders: Sequence[str], file_id: str) -> str | None:
        for folder in folders:
            for ext in IMAGE_EXTENSIONS:
                path = os.path.join(folder, file_id + ext)
                if os.path.isfile(path):
                    return path
            sub, stem = os.path.split(os.path.join(folder, file_id))
            listing = self._listing(sub)
            for ext in IMAGE_EXTENSIONS:
                name = listing.get((stem + ext).lower())
                if name is not None and os.path.isfile(os.path.join(sub, name)):
                    return os.path.join(sub, name)
        return None


def _numeric_ids(names: Sequence[str]) -> list[int]:
    """Digits of each file id when they are unique, else 1..N (see the module docstring)."""
    digits = [re.sub(r"\D", "", n) for n in names]
    if all(digits):
        ids = [int(d) for d in digits]
        if len(set(ids)) == len(ids) and max(ids) <= MAX_IMAGE_ID:
            return ids
    return list(range(1, len(names) + 1))


def _xml_number(obj: ET.Element, tag: str, xml_path: str, item: str) -> float:
    text = obj.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise InputError(xml_path, f"{item}: <{tag}> must be a number, got {text!r}") from None


def _read_xml(xml_path: str) -> ET.Element:
    try:
        return ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise InputError(xml_path, f"malformed XML ({e})") from None
    except OSError as e:
        raise InputError(xml_path, f"cannot read annotation file ({e})") from None


def _parse_voc_xml(xml_path: str, image_dirs: Sequence[str], file_id: str, image_id: int,
                   lookup: dict[str, int], split: Split, check: _BoxChecker,
                   find_image: _ImageFinder) -> ImageRecord:
    """One VOC-style annotation file -> record (1-based inclusive pixels -> continuous 0-based).
    The image is found by ``file_id`` alone (the XML's ``<filename>`` is not used)."""
    root = _read_xml(xml_path)
    path = find_image(image_dirs, file_id)
    if path is None:
        others = ", ".join(IMAGE_EXTENSIONS[1:])
        raise InputError(xml_path, f"image {file_id}: image file not found: {file_id}{IMAGE_EXTENSIONS[0]} "
                                   f"(or {others}) in {' or '.join(image_dirs)}")

    width = height = 0
    size = root.find("size")
    if size is not None:
        try:
            width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
        except (TypeError, ValueError):
            width = height = 0
    if width <= 0 or height <= 0:
        width, height = _image_size_from_header(path, xml_path)

    boxes, labels, ignore = [], [], []
    for k, obj in enumerate(root.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        item = f"object {k} ({name!r})" if name else f"object {k}"
        if not name:
            raise InputError(xml_path, f"{item}: no <name>")
        label = lookup.get(normalize_name(name))
        if label is None:
            raise InputError(xml_path, f"{item}: class {name!r} is not in split {split.name}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise InputError(xml_path, f"{item}: no <bndbox>")
        xmin, ymin, xmax, ymax = (_xml_number(bnd, t, xml_path, item) for t in ("xmin", "ymin", "xmax", "ymax"))
        box = check([xmin - 1, ymin - 1, xmax, ymax], width, height, xml_path, f"image {file_id} {item}")
        if box is None:
            continue
        difficult = (obj.findtext("difficult") or "0").strip()
        boxes.append(box)
        labels.append(label)
        ignore.append(difficult not in ("", "0"))
    return _make_record(image_id, path, width, height, boxes, labels, ignore)


def _image_dirs(root: str, dior: bool) -> list[str]:
    if dior:
        return [os.path.join(root, d) for d in ("JPEGImages-trainval", "JPEGImages-test", "JPEGImages")]
    return [os.path.join(root, "JPEGImages")]


def _xml_entries(roots: Sequence[str], list_file: str, dior: bool) -> list[tuple[str, str, str]]:
    """(root, file id, annotation path) of every listed image, over every root in order."""
    if not roots or not list_file:
        raise InputError(None, "data source: format voc/dior needs 'roots' and 'list_file'")
    entries = []  # (root, file id)
    for root in roots:
        if not os.path.isdir(root):
            raise InputError(root, "dataset folder not found")
        list_path = os.path.join(root, list_file)
        names = _read_id_list(list_path)
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InputError(list_path, f"image {dup}: listed twice")
        entries += [(root, n) for n in names]
    out = []
    for root, file_id in entries:
        ann_dirs = [os.path.join(root, "Annotations")]
        if dior:
            ann_dirs.append(os.path.join(root, "Annotations", "Horizontal Bounding Boxes"))
        xml_candidates = [os.path.join(d, file_id + ".xml") for d in ann_dirs]
        xml_path = _first_existing(xml_candidates)
        if xml_path is None:
            raise InputError(os.path.join(root, list_file),
                             f"image {file_id}: annotation file not found: {xml_candidates[0]}")
        out.append((root, file_id, xml_path))
    return out


def _load_xml_dataset(roots: Sequence[str], list_file: str, split: Split, drop: bool,
                      dior: bool) -> list[ImageRecord]:
    """VOC (``Annotations/``, ``JPEGImages/``) or DIOR layout, over every root in order."""
    entries = _xml_entries(roots, list_file, dior)
    image_ids = _numeric_ids([file_id for _, file_id, _ in entries])
    lookup = _class_lookup(split)
    check = _BoxChecker(", ".join(os.path.join(r, list_file) for r in roots), drop)
    find_image = _ImageFinder()
    records = []
    for (root, file_id, xml_path), image_id in zip(entries, image_ids):
        records.append(_parse_voc_xml(xml_path, _image_dirs(root, dior), file_id, image_id, lookup,
                                      split, check, find_image))
    check.report()
    return records


# ----------------------------------------------------------------------------------------------
# YOLO (Ultralytics / Roboflow data.yaml)
# ----------------------------------------------------------------------------------------------
# image folders tried, under the dataset root, for a subset the yaml has no key for
YOLO_DEFAULT_DIRS = {"train": ("train/images",), "val": ("valid/images", "val/images"), "test": ("test/images",)}


def _read_yolo_yaml(ann_file: str) -> dict:
    """The data.yaml as a dict; InputError naming the file (and line) when it cannot be read."""
    import yaml

    if not ann_file:
        raise InputError(None, "data source: format yolo needs 'ann_file' (a data.yaml)")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(ann_file, "dataset yaml not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(ann_file, f"cannot read dataset yaml ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]
        raise InputError(ann_file, f"{where}malformed YAML ({problem})") from None
    if not isinstance(data, dict):
        raise InputError(ann_file, "top level: expected a mapping with 'names' and 'train' / 'val' / 'test'")
    return data


def _yolo_names(ann_file: str, data: dict) -> list[str]:
    """``names`` in index order (a list, or ``{index: name}`` with indices 0..n-1), checked
    against ``nc`` when present."""
    names = data.get("names")
    if isinstance(names, dict):
        by_index = {}
        for key, name in names.items():
            index = key if isinstance(key, int) and not isinstance(key, bool) else (
                int(key) if isinstance(key, str) and key.strip().isdigit() else None)
            if index is None:
                raise InputError(ann_file, f"'names': key {key!r} is not a class index")
            by_index[index] = name
        if sorted(by_index) != list(range(len(by_index))):
            raise InputError(ann_file, f"'names': indices must be 0..{len(by_index) - 1}, "
                                       f"got {sorted(by_index)}")
        names = [by_index[i] for i in range(len(by_index))]
    elif not isinstance(names, list):
        raise InputError(ann_file, "'names': expected a list of class names or {index: name}"
                         + ("" if "names" in data else ", missing"))
    out = []
    for i, name in enumerate(names):
        if isinstance(name, bool) or not isinstance(name, (str, int, float)) or not str(name).strip():
            raise InputError(ann_file, f"'names': class {i}: expected a name, got {name!r} (quote it)")
        out.append(str(name).strip())
    if not out:
        raise InputError(ann_file, "'names': empty")
    nc = data.get("nc")
    if nc is not None and (isinstance(nc, bool) or nc != len(out)):
        raise InputError(ann_file, f"'nc': {nc!r}, but 'names' has {len(out)} entries")
    return out


def _yolo_image_dirs(ann_file: str, data: dict, subset: str) -> list[str]:
    """The image folders of ``subset``, resolved like Ultralytics (see the module docstring)."""
    if subset not in YOLO_SUBSETS:
        raise InputError(ann_file, f"data source: format yolo needs 'subset' (one of "
                                   f"{', '.join(YOLO_SUBSETS)}), got {subset!r}")
    base = os.path.dirname(os.path.abspath(ann_file))
    root = data.get("path")
    if root in (None, ""):
        root = base
    elif not isinstance(root, str):
        raise InputError(ann_file, f"'path': expected the dataset folder, got {root!r}")
    else:
        root = os.path.normpath(os.path.join(base, os.path.expanduser(root)))
    value = data.get(subset)
    if value in (None, "", []):
        candidates = [os.path.join(root, rel) for rel in YOLO_DEFAULT_DIRS[subset]]
        found = next((d for d in candidates if os.path.isdir(d)), None)
        if found is None:
            raise InputError(ann_file, f"'{subset}': no such key, and no {' or '.join(candidates)} folder")
        return [found]
    dirs = []
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, str) or not v.strip():
            raise InputError(ann_file, f"'{subset}': expected an image folder or a list of folders, got {v!r}")
        folder = os.path.normpath(os.path.join(root, v))
        if not os.path.exists(folder) and v.startswith("../"):  # Roboflow's data.yaml
            folder = os.path.normpath(os.path.join(root, v[3:]))
        if os.path.isfile(folder):
            raise InputError(ann_file, f"'{subset}': {folder} is a file; expected an image folder "
                                       f"(image-list files are not supported)")
        if not os.path.isdir(folder):
            raise InputError(ann_file, f"'{subset}': image folder not found: {folder}")
        dirs.append(folder)
    return dirs


def _yolo_images(folder: str) -> list[str]:
    """Image files under ``folder`` (subfolders included), as sorted paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out += [os.path.relpath(os.path.join(dirpath, f), folder) for f in filenames
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(out)


def _yolo_label_path(image_path: str) -> str:
    """The label file of an image: its last ``images`` folder becomes ``labels``, ``.txt`` (as
    Ultralytics' ``img2label_paths``); next to the image when its path has no ``images`` folder."""
    folder, name = os.path.split(image_path)
    parts = folder.split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return os.path.join(os.sep.join(parts), os.path.splitext(name)[0] + ".txt")


def _yolo_line_values(tokens: list[str], label_path: str, line_no: int) -> list[float]:
    if len(tokens) != 5:
        if len(tokens) >= 7 and len(tokens) % 2 == 1:
            problem = (f"{len(tokens) - 1} coordinates: a polygon (segmentation) line, not a box "
                       f"'class cx cy w h'")
        else:
            problem = f"expected 5 numbers 'class cx cy w h', got {len(tokens)}"
        raise InputError(label_path, f"line {line_no}: {problem}")
    values = []
    for t in tokens:
        try:
            v = float(t)
        except ValueError:
            raise InputError(label_path, f"line {line_no}: {t!r} is not a number") from None
        if not math.isfinite(v):
            raise InputError(label_path, f"line {line_no}: {t!r} is not a finite number")
        values.append(v)
    return values


def _parse_yolo_labels(label_path: str, width: int, height: int, names: Sequence[str],
                       labels_of: Sequence[int | None], split: Split, check: _BoxChecker):
    """Boxes and labels of one image's label file (normalised cx cy w h -> pixel xyxy)."""
    try:
        with open(label_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(label_path, f"cannot read label file ({e})") from None
    boxes, labels = [], []
    for line_no, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        k, cx, cy, w, h = _yolo_line_values(tokens, label_path, line_no)
        if k != int(k) or not 0 <= k < len(names):
            raise InputError(label_path, f"line {line_no}: class {tokens[0]} is not an index of 'names' "
                                         f"(0..{len(names) - 1})")
        k = int(k)
        if labels_of[k] is None:
            raise InputError(label_path, f"line {line_no}: class {k} {names[k]!r} is not a class of "
                                         f"split {split.name}")
        if w < 0 or h < 0:
            raise InputError(label_path, f"line {line_no}: width and height must be >= 0, got "
                                         f"w={tokens[3]} h={tokens[4]}")
        box = check([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                     (cy + h / 2) * height], width, height, label_path, f"line {line_no}")
        if box is not None:
            boxes.append(box)
            labels.append(labels_of[k])
    return boxes, labels


def _load_yolo(source: "DataSource", split: Split, drop: bool) -> list[ImageRecord]:
    ann_file = source.ann_file
    data = _read_yolo_yaml(ann_file)
    names = _yolo_names(ann_file, data)
    # img_dir (optional) replaces the subset's folders: every image under it, e.g. the dataset's
    # root with a list_file naming test/images/... and train/images/... (vldus prepare's test set)
    folders = [source.img_dir] if source.img_dir else _yolo_image_dirs(ann_file, data, source.subset)
    if source.img_dir and not os.path.isdir(source.img_dir):
        raise InputError(ann_file, f"img_dir {source.img_dir}: no such folder")
    entries = [(folder, rel) for folder in folders for rel in _yolo_images(folder)]  # image id = position + 1
    keep = [True] * len(entries)
    if getattr(source, "list_file", ""):
        keep = _listed(source.list_file, [rel for _, rel in entries],
                       f"{ann_file} '{source.subset}' ({', '.join(folders)})")
    lookup = _class_lookup(split)
    labels_of = [lookup.get(normalize_name(n)) for n in names]
    # Boxes under 1 px (Roboflow exports hold a few of width and height 0) are dropped with one
    # counted warning, as COCO's; a box outside the image stays an error.
    check = _BoxChecker(ann_file, drop, drop_small=True)
    records, labelled = [], 0
    for image_id, ((folder, rel), kept) in enumerate(zip(entries, keep), start=1):
        if not kept:
            continue
        path = os.path.join(folder, rel)
        width, height = _read_image_size(path)
        label_path = _yolo_label_path(path)
        boxes, labels = [], []
        if os.path.isfile(label_path):
            labelled += 1
            boxes, labels = _parse_yolo_labels(label_path, width, height, names, labels_of, split, check)
        records.append(_make_record(image_id, path, width, height, boxes, labels, [False] * len(labels)))
    if records and not labelled:
        log.warning("%s: '%s': no label file for any of the %d images (looked for %s)", ann_file,
                    source.subset, len(records), _yolo_label_path(records[0].path))
    check.report()
    return records
