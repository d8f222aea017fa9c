"""``vldus evaluate``: score a COCO results file against a COCO ground-truth file.

Ground truth (``--ann``): COCO instances JSON. Classes are the ``categories`` ordered by id
(detector index i + 1 = i-th smallest id); every image of the file is scored, with or without
annotations; ``iscrowd`` (or ``ignore``) boxes are ignore regions. With ``--protocol mmdet-v1``
boxes under 1 px wide or high (or with ``area`` <= 0) are dropped, as the published loader did;
``coco`` keeps every box, as pycocotools does.

Detections (``--dets``): the COCO results format, a JSON list of
``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``.

Prints the table of :func:`vldus.evaluation.format_table`; ``--out`` writes the metrics JSON
(docs/formats.md "Metrics file"). ``--breakdown`` adds the error breakdown of
:mod:`vldus.evaluation.breakdown` (table and the metrics' "breakdown" entry).
"""
from __future__ import annotations

import json
import logging
import math
from typing import Sequence

import numpy as np

from vldus.config import Config, EvalConfig
from vldus.data.readers import (check_coco_items, coco_category_ids, load_records, parse_categories,
                                read_coco_json, select_test)
from vldus.data.records import ImageRecord
from vldus.data.splits import normalize_name
from vldus.errors import InputError, require_file
from vldus.evaluation.breakdown import error_breakdown, format_breakdown
from vldus.evaluation.common import check_thresholds
from vldus.evaluation.evaluator import MAX_DETS_PER_IMAGE, PROTOCOLS, ZSDEvaluator, format_table
from vldus.files import write_json

log = logging.getLogger(__name__)
MIN_BOX_SIZE = 1.0  # px; mmdet 1.x's COCO loader skipped narrower or lower ground truth


def add_parser(sub, common) -> None:
    defaults = EvalConfig()
    p = sub.add_parser("evaluate", parents=[common],
                       help="ZSD / GZSD mAP and Recall@100 of a COCO results file",
                       description="Score a detections file (COCO results format) against COCO "
                                   "ground truth: per-class AP and Recall@100 at each IoU, group "
                                   "means and (gzsd) the harmonic mean, as percentages.")
    p.add_argument("--ann", required=True, metavar="GT.json", help="ground truth, COCO instances JSON")
    p.add_argument("--dets", required=True, metavar="DETS.json", help="detections, COCO results JSON")
    p.add_argument("--unseen", required=True, metavar="A,B,...",
                   help="comma-separated unseen class names (as in the ground truth's categories)")
    p.add_argument("--setting", required=True, choices=("zsd", "gzsd", "seen"),
                   help="zsd: unseen annotations only; gzsd: seen and unseen, with HM; "
                        "seen: seen annotations only")
    p.add_argument("--iou", type=float, nargs="+", default=list(defaults.iou_thresholds),
                   metavar="T", help="IoU thresholds (default: %(default)s)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=defaults.protocol,
                   help="mmdet-v1: the published evaluation (VOC all-point AP, +1 pixel boxes); "
                        "coco: pycocotools COCOeval (101-point AP) (default: %(default)s)")
    p.add_argument("--excluded", default="", metavar="A,B,...",
                   help="comma-separated classes never evaluated (COCO 48/17's 15)")
    p.add_argument("--out", metavar="M.json", help="write the metrics JSON here")
    p.add_argument("--breakdown", type=float, nargs="?", const=0.5, default=None, metavar="IOU",
                   help="also split each class's false positives and misses into kinds (seen-class "
                        "confusion, unseen-class confusion, localisation, both, duplicate, background, "
                        "missed) with the mAP gained if each were fixed, at IoU IOU (default 0.5); "
                        "printed and written into --out as 'breakdown'. --ann must hold the seen "
                        "objects too (mmdet-v1 only)")
    p.set_defaults(func=run)


def run(args) -> int:
    classes, category_ids, records = read_ground_truth(args.ann, drop_small=args.protocol == "mmdet-v1")
    unseen = _class_list(args.unseen, classes, args.ann, "--unseen")
    excluded = _class_list(args.excluded, classes, args.ann, "--excluded")
    if not unseen and args.setting != "seen":
        raise InputError(args.ann, "--unseen: no class names given")
    if set(map(normalize_name, unseen)) & set(map(normalize_name, excluded)):
        raise InputError(args.ann, "--excluded: a class is also in --unseen")
    try:
        thresholds = check_thresholds(args.iou)
    except ValueError as e:
        raise InputError(None, f"--iou: {e}") from None
    detections = read_detections(args.dets, records, category_ids, args.ann)

    if args.breakdown is not None and args.protocol != "mmdet-v1":
        raise InputError(None, "--breakdown: only with --protocol mmdet-v1")
    if args.breakdown is not None and not 0.0 < args.breakdown <= 1.0:
        raise InputError(None, f"--breakdown: IoU {args.breakdown} is not in (0, 1]")

    evaluator = ZSDEvaluator(classes, unseen, args.setting, thresholds, args.protocol, excluded)
    evaluator.process(records, detections)
    metrics = evaluator.evaluate()
    print(format_table(metrics))
    if args.breakdown is not None:
        metrics["breakdown"] = error_breakdown(records, detections, classes, unseen, args.setting,
                                               args.breakdown, excluded=excluded)
        print("\n" + format_breakdown(metrics["breakdown"]))
    if args.out:
        write_metrics(metrics, args.out)
    return 0


def test_output_breakdown(cfg: Config, dets_path: str, setting: str, iou: float = 0.5) -> dict:
    """The error breakdown (:func:`error_breakdown`) of a ``vldus test --out`` detections file.

    The images are those ``vldus test`` scores for ``setting`` ('zsd' | 'gzsd'; a run without
    ``--max-images``), with every annotation of the config's test source, seen objects included.
    """
    split = cfg.load_split()
    everything = load_records(cfg.data.test, split)
    tested = {r.image_id for r in select_test(everything, split, setting, cfg.data.test_rule)}
    records = [r for r in everything if r.image_id in tested]
    detections = read_detections(dets_path, records, coco_category_ids(cfg.data.test, split),
                                 cfg.data.test.ann_file or "the test images")
    return error_breakdown(records, detections, split.classes, split.unseen, setting, iou,
                           excluded=split.excluded, max_dets_per_image=cfg.detector.detections_per_img)


def write_metrics(metrics: dict, path: str) -> None:
    """Write the metrics JSON atomically (tmp file, then rename)."""
    try:
        write_json(path, metrics, indent=2)
    except OSError as e:
        raise InputError(path, f"cannot write metrics ({e})") from None


def _class_list(text: str, classes: Sequence[str], ann: str, option: str) -> list[str]:
    """Class names of a comma-separated option, checked against the ground truth's categories."""
    known = {normalize_name(c): c for c in classes}
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if normalize_name(n) not in known:
            raise InputError(ann, f"{option}: unknown class name {n!r} (not in 'categories')")
    return [known[normalize_name(n)] for n in names]


# ----------------------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------------------
def read_ground_truth(path: str, drop_small: bool) -> tuple[list[str], list[int], list[ImageRecord]]:
    """(class names by category id, the category ids, one record per image in file order).

    Boxes become continuous xyxy (``x + w``); labels are 1-based positions in the id order.
    ``drop_small``: skip boxes under 1 px wide or high, or with ``area`` <= 0 (mmdet 1.x).
    No image file is opened.
    """
    data = read_coco_json(path)
    categories = sorted(parse_categories(path, data["categories"]))
    check_coco_items(path, data)
    label_of = {cid: i + 1 for i, (cid, _) in enumerate(categories)}
    per_image: dict[int, list] = {img["id"]: [] for img in data["images"]}
    dropped = 0
    for ann in data["annotations"]:
        aid, cid = ann["id"], ann.get("category_id")
        if cid not in label_of:
            raise InputError(path, f"annotation {aid}: category_id {cid!r} is not in 'categories'")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
            raise InputError(path, f"annotation {aid}: bbox {ann['bbox']} is not finite or has a "
                                   f"negative width or height")
        area = ann.get("area")
        if drop_small and (w < MIN_BOX_SIZE or h < MIN_BOX_SIZE
                           or (isinstance(area, (int, float)) and area <= 0)):
            dropped += 1
            continue
        ignore = bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0))
        per_image[ann["image_id"]].append(([x, y, x + w, y + h], label_of[cid], ignore))
    if dropped:
        log.warning("%s: %d ground-truth box(es) under %g px wide or high dropped (mmdet 1.x loader)",
                    path, dropped, MIN_BOX_SIZE)
    records = []
    for img in data["images"]:
        anns = per_image[img["id"]]
        records.append(ImageRecord(img["id"], img.get("file_name", ""), int(img.get("width") or 0),
                                   int(img.get("height") or 0), [a[0] for a in anns],
                                   [a[1] for a in anns], [a[2] for a in anns]))
    return [name for _, name in categories], [cid for cid, _ in categories], records


# ----------------------------------------------------------------------------------------------
# detections
# ----------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _entry_problem(e) -> str:
    """Why one results entry is malformed ('' if it is fine)."""
    if not isinstance(e, dict):
        return f"expected an object, got {type(e).__name__}"
    for key in ("image_id", "category_id"):
        if key not in e:
            return f"missing '{key}'"
        if not _is_int(e[key]):
            return f"'{key}' must be an integer, got {e[key]!r}"
    b = e.get("bbox")
    if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(_is_real(v) for v in b):
        return f"'bbox' must be 4 finite numbers [x, y, w, h], got {b!r}"
    if b[2] < 0 or b[3] < 0:
        return f"'bbox' {list(b)} has a negative width or height"
    if "score" not in e or not _is_real(e["score"]):
        return f"'score' must be a finite number, got {e.get('score')!r}"
    return ""


def _columns(entries: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(image_id, category_id, bbox (n, 4), score) arrays, or None when anything looks off
    (the slow per-entry check then names the entry)."""
    try:
        img = np.array([e["image_id"] for e in entries])
        cat = np.array([e["category_id"] for e in entries])
        box = np.array([e["bbox"] for e in entries])
        score = np.array([e["score"] for e in entries])
    except (TypeError, KeyError, ValueError, IndexError):
        return None
    if (img.dtype.kind != "i" or cat.dtype.kind != "i" or box.dtype.kind not in "iuf"
            or score.dtype.kind not in "iuf" or box.shape != (len(entries), 4)):
        return None
    box, score = box.astype(np.float64), score.astype(np.float64)
    if not (np.isfinite(box).all() and np.isfinite(score).all()) or (box[:, 2:] < 0).any():
        return None
    return img.astype(np.int64), cat.astype(np.int64), box, score


def read_detections(path: str, records: Sequence[ImageRecord], category_ids: Sequence[int],
                    ann_path: str) -> list[dict]:
    """Detections of each record (same order): dicts of boxes (K, 4) continuous xyxy, scores,
    labels (1-based position of the category id in ``category_ids``)."""
    require_file(path, "detections file")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(path, f"line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read detections ({e})") from None
    if not isinstance(entries, list):
        raise InputError(path, "top level: expected a JSON list of detections (COCO results format)")

    n_images = len(records)
    if not entries:
        return [_empty_detections() for _ in range(n_images)]
    cols = _columns(entries)
    if cols is None:
        for i, e in enumerate(entries):
            problem = _entry_problem(e)
            if problem:
                raise InputError(path, f"entry {i}: {problem}")
        raise InputError(path, "malformed detections")  # unreachable unless numpy disagrees
    img, cat, box, score = cols

    pos = _lookup(img, np.array([r.image_id for r in records], np.int64))
    if (pos < 0).any():
        i = int(np.argmax(pos < 0))
        raise InputError(path, f"entry {i}: image_id {img[i]} is not an image of {ann_path}")
    label = _lookup(cat, np.asarray(category_ids, np.int64)) + 1
    if (label < 1).any():
        i = int(np.argmax(label < 1))
        raise InputError(path, f"entry {i}: category_id {cat[i]} is not a category of {ann_path}")

    xyxy = np.c_[box[:, :2], box[:, :2] + box[:, 2:]]
    order = np.argsort(pos, kind="stable")  # image by image, file order inside an image
    counts = np.bincount(pos, minlength=n_images)
    over = int((counts > MAX_DETS_PER_IMAGE).sum())
    if over:
        log.warning("%s: %d image(s) have more than %d detections; the best-scored %d of each are "
                    "evaluated", path, over, MAX_DETS_PER_IMAGE, MAX_DETS_PER_IMAGE)
    splits = np.cumsum(counts)[:-1]
    return [{"boxes": xyxy[o], "scores": score[o], "labels": label[o]}
            for o in np.split(order, splits)]


def _empty_detections() -> dict:
    return {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}


def _lookup(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of each value in ``table`` (unique ids), -1 where absent."""
    order = np.argsort(table, kind="stable")
    at = np.clip(np.searchsorted(table[order], values), 0, max(len(table) - 1, 0))
    if not len(table):
        return np.full(len(values), -1, np.int64)
    found = table[order][at] == values
    return np.where(found, order[at], -1).astype(np.int64)
