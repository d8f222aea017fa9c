"""Dataset readers: COCO / shapes JSON, PASCAL VOC and DIOR XML -> :class:`ImageRecord` lists.

Every reader returns one :class:`~vldus.data.records.ImageRecord` per listed image, with ALL
annotations of the split's classes (seen, unseen and excluded); choosing images and annotations
for training or testing is the job of :func:`select_training`, :func:`select_test` and
:func:`select_unseen_only` (docs/design.md §2.3, §3, §9.2).

Formats (``DataSource.format``):

- ``coco`` / ``shapes``: a COCO instances JSON (``ann_file``), images under ``img_dir``
  (``file_name`` is relative to it). ``bbox`` ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``;
  ``iscrowd`` boxes become ignore boxes; category names are matched to the split's classes with
  :func:`~vldus.data.splits.normalize_name` (``'hair drier'`` == ``'hair_drier'``).
- ``voc``: ``roots`` are ``VOCdevkit/VOC20xx`` folders, ``list_file`` (relative to each root)
  holds image ids one per line; ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` (or the XML's
  ``<filename>`` in ``JPEGImages/`` when no ``<id>.jpg`` exists). ``difficult`` objects become
  ignore boxes.
- ``dior``: VOC-style XML in ``Annotations/`` or ``Annotations/Horizontal Bounding Boxes/``;
  images in ``JPEGImages-trainval/``, ``JPEGImages-test/`` or ``JPEGImages/`` (first that has
  the file); lists in ``ImageSets/Main/{train,val,test}.txt``.

Pixel convention: boxes are continuous 0-based pixel coordinates, the box covering
``[x1, x2) x [y1, y2)`` (torchvision's and COCO's convention). VOC/DIOR XML coordinates are
1-based inclusive pixel indices, so ``xmin..xmax`` becomes ``x1 = xmin - 1, x2 = xmax`` (width
``xmax - xmin + 1``), the usual VOC-to-COCO conversion.

Image size comes from the annotation (COCO ``width``/``height``, XML ``<size>``); when it is
missing it is read from the image file's header with PIL (no decoding).

Image ids: COCO ids as in the JSON. VOC/DIOR: the digits of the file id (``2008_000123`` ->
2008000123, ``00042`` -> 42) when these are unique over the whole source and fit int32, else
1, 2, ... in list order.

Bad input raises :class:`~vldus.errors.InputError` with one line naming the file and the item:
malformed JSON/XML, a listed image or annotation file that does not exist, a category id not in
``categories``, an object whose class is not in the split, a malformed box.

Degenerate boxes (width or height < 1 px, or reaching more than 1 px outside the image) are an
InputError for ``shapes``, ``voc`` and ``dior`` by default; for ``coco`` they are dropped with one
counted warning, because COCO 2014 has a few boxes under 1 px, which the published loader (mmdet
1.x ``coco.py``) skips too. ``drop_degenerate=True/False`` overrides this for any format. Boxes
within the 1 px tolerance are clipped to the image.
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
from vldus.data.splits import Split, normalize_name
from vldus.errors import InputError

if TYPE_CHECKING:
    from vldus.config import DataSource

log = logging.getLogger(__name__)

FORMATS = ("coco", "shapes", "voc", "dior")
SETTINGS = ("zsd", "gzsd")
TEST_RULES = ("coco", "voc")
BOX_TOLERANCE = 1.0  # px a box may reach outside the image before it counts as degenerate
MIN_BOX_SIZE = 1.0  # px; narrower or lower boxes are degenerate (mmdet 1.x coco.py: w < 1 or h < 1)
MAX_IMAGE_ID = 2**31 - 1  # VOC/DIOR ids from file names must fit int32 (pycocotools, torch)
DROP_DEGENERATE_DEFAULT = {"coco": True, "shapes": False, "voc": False, "dior": False}


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
    if fmt not in FORMATS:
        raise InputError(getattr(source, "ann_file", "") or None,
                         f"data source: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    drop = DROP_DEGENERATE_DEFAULT[fmt] if drop_degenerate is None else bool(drop_degenerate)
    if fmt in ("coco", "shapes"):
        return _load_coco(source.ann_file, source.img_dir, split, drop)
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

    coco/shapes: the ids of the JSON's ``categories`` matched by name (InputError if a class of
    the split has no category); voc/dior, or coco/shapes without ``ann_file``: ``1..C``.
    """
    if source.format not in ("coco", "shapes") or not source.ann_file:
        return list(range(1, split.num_classes + 1))
    ann_file = source.ann_file
    by_name = {normalize_name(name): cid for cid, name in _coco_categories(ann_file)}
    ids = []
    for name in split.classes:
        if normalize_name(name) not in by_name:
            raise InputError(ann_file, f"class {name!r} of split {split.name}: no such category "
                                       f"in 'categories'")
        ids.append(by_name[normalize_name(name)])
    return ids


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
def _check_setting(setting: str, rule: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r} (one of {SETTINGS})")
    if rule not in TEST_RULES:
        raise ValueError(f"unknown test rule {rule!r} (one of {TEST_RULES})")


def _class_lookup(split: Split) -> dict[str, int]:
    """normalized class name -> detector index."""
    return {normalize_name(c): i + 1 for i, c in enumerate(split.classes)}


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

    def __init__(self, source: str, drop: bool):
        self.source, self.drop = source, drop
        self.dropped, self.first_dropped = 0, ""

    def __call__(self, box: Sequence[float], width: int, height: int, file: str,
                 item: str) -> list[float] | None:
        """Clipped ``[x1, y1, x2, y2]``, or None when degenerate and dropping."""
        x1, y1, x2, y2 = box
        problem = ""
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
        if not problem:
            return [x1, y1, x2, y2]
        if not self.drop:
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


def _load_coco(ann_file: str, img_dir: str, split: Split, drop: bool) -> list[ImageRecord]:
    data = read_coco_json(ann_file)
    categories = parse_categories(ann_file, data["categories"])
    _CATEGORY_CACHE[_file_key(ann_file)] = categories
    check_coco_items(ann_file, data)
    coco = _index_coco(data)

    lookup = _class_lookup(split)
    cat_label = {cid: lookup.get(normalize_name(name)) for cid, name in categories}
    cat_name = dict(categories)
    check = _BoxChecker(ann_file, drop)
    records = []
    for img in data["images"]:
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


def _parse_voc_xml(xml_path: str, image_dirs: Sequence[str], file_id: str, image_id: int,
                   lookup: dict[str, int], split: Split, check: _BoxChecker) -> ImageRecord:
    """One VOC-style annotation file -> record (1-based inclusive pixels -> continuous 0-based)."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise InputError(xml_path, f"malformed XML ({e})") from None
    except OSError as e:
        raise InputError(xml_path, f"cannot read annotation file ({e})") from None

    candidates = [os.path.join(d, file_id + ".jpg") for d in image_dirs]
    filename = (root.findtext("filename") or "").strip()
    if filename:
        candidates += [os.path.join(d, filename) for d in image_dirs]
    path = _first_existing(candidates)
    if path is None:
        raise InputError(xml_path, f"image {file_id}: image file not found: {candidates[0]}")

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


def _load_xml_dataset(roots: Sequence[str], list_file: str, split: Split, drop: bool,
                      dior: bool) -> list[ImageRecord]:
    """VOC (``Annotations/``, ``JPEGImages/``) or DIOR layout, over every root in order."""
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
    image_ids = _numeric_ids([n for _, n in entries])

    lookup = _class_lookup(split)
    check = _BoxChecker(", ".join(os.path.join(r, list_file) for r in roots), drop)
    records = []
    for (root, file_id), image_id in zip(entries, image_ids):
        if dior:
            ann_dirs = [os.path.join(root, "Annotations"),
                        os.path.join(root, "Annotations", "Horizontal Bounding Boxes")]
            image_dirs = [os.path.join(root, d) for d in ("JPEGImages-trainval", "JPEGImages-test", "JPEGImages")]
        else:
            ann_dirs = [os.path.join(root, "Annotations")]
            image_dirs = [os.path.join(root, "JPEGImages")]
        xml_candidates = [os.path.join(d, file_id + ".xml") for d in ann_dirs]
        xml_path = _first_existing(xml_candidates)
        if xml_path is None:
            raise InputError(os.path.join(root, list_file),
                             f"image {file_id}: annotation file not found: {xml_candidates[0]}")
        records.append(_parse_voc_xml(xml_path, image_dirs, file_id, image_id, lookup, split, check))
    check.report()
    return records
