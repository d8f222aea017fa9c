"""Error breakdown: where a detector's false positives and misses come from, and what each costs.

After TIDE (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors",
ECCV 2020) and COCO's ``analyze()``. The detections of the evaluated classes are matched as the
``mmdet-v1`` protocol matches them (:func:`vldus.evaluation.mean_ap.match_mmdet_v1`) at the main
IoU threshold ``t`` (0.5); every false positive then gets exactly one kind, checked in this order
(IoU in the protocol's 1-pixel-inclusive convention, against every object of the image,
ignore regions included):

- ``dupe``: its best object of its own class has IoU >= t but a higher-scored detection took it;
- ``cls_seen``: IoU >= t with an object of another class that is not unseen: a seen object (in
  ZSD present in the image but not evaluated) or one of an excluded class;
- ``cls_unseen``: IoU >= t with an object of another, unseen class;
- ``loc``: right class, ``t_b`` <= IoU < t with an object of its class (``t_b`` = 0.1);
- ``both``: ``t_b`` <= IoU < t with an object of another class only (TIDE's "Cls + Loc");
- ``bkg``: IoU < ``t_b`` with every object of the image.

An object of an evaluated class that no detection found (no true positive) and that no ``cls_*``
or ``loc`` error points at is ``missed``.

Counts: ``count`` is every false positive of the kind (all detections, after the per-image budget
of 100); ``before_last_tp`` only those ranked above their class's last true positive, the only ones
that lower all-point AP.

mAP if fixed (TIDE's oracle): every error of one kind is fixed, the evaluator recomputes the mAP
at ``t`` and the gain over the reported mAP is given in percentage points.

- ``cls_seen``, ``cls_unseen``, ``loc``: the detection becomes a perfect detection (box and class)
  of the object it points at, unless that object is already found or claimed by a higher-scored
  fix; then it is removed. In ZSD a seen object is not evaluated, so fixing ``cls_seen`` removes
  the detections.
- ``dupe``, ``both``, ``bkg``: the detections are removed.
- ``missed``: a perfect detection of each missed object is added, scored above every detection
  (TIDE instead takes the object out of the count).

Only the ``mmdet-v1`` protocol (the published evaluation) is supported.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from vldus.data.records import ImageRecord
from vldus.evaluation.common import EvalData, iou_key, pair_up, segment_argmax_first
from vldus.evaluation.evaluator import MAX_DETS_PER_IMAGE, ZSDEvaluator
from vldus.evaluation.mean_ap import match_mmdet_v1, pixel_iou

KINDS = ("cls_seen", "cls_unseen", "loc", "both", "dupe", "bkg", "missed")
KIND_TEXT = {
    "cls_seen": "on an object of a seen (not evaluated in ZSD) class",
    "cls_unseen": "on an object of another unseen class",
    "loc": "right class, 0.1 <= IoU < t",
    "both": "wrong class and 0.1 <= IoU < t",
    "dupe": "object already found by a higher score",
    "bkg": "IoU < 0.1 with every object",
    "missed": "object no detection found",
}
BACKGROUND_IOU = 0.1
_FP_KINDS = KINDS[:-1]
_RELABEL = ("cls_seen", "cls_unseen", "loc")  # fixed by moving the detection onto its object


def error_breakdown(records: Sequence[ImageRecord], detections: Sequence[Mapping[str, Any]],
                    class_names: Sequence[str], unseen: Sequence[str], setting: str, iou: float = 0.5, *,
                    excluded: Sequence[str] = (), max_dets_per_image: int = MAX_DETS_PER_IMAGE,
                    inclusive_boxes: bool = False, background_iou: float = BACKGROUND_IOU) -> dict:
    """The breakdown of one detections set (module docstring) as a plain, JSON-ready dict.

    records: the ground truth with EVERY annotation (seen, unseen, excluded: the seen objects
    are what ``cls_seen`` is measured against); detections: one dict per record ("boxes"
    (K, 4) continuous xyxy, "scores" (K,), "labels" (K,) detector index 1..C); class sets and
    ``setting`` as in :class:`ZSDEvaluator`. Returns ``{"setting", "protocol", "iou",
    "background_iou", "objects_not_evaluated", "map": {group: %}, "kinds": {kind: {"count",
    "before_last_tp", "map_gain": {group: points}}}, "classes": {name: {"group", "num_gt", "tp",
    "ap", "errors": {kind: count}, "ap_gain": {kind: points}}}}``; gzsd adds "hm" to the groups.
    mAP and gains are percentages; ``objects_not_evaluated`` counts the annotations of classes the
    setting does not score (0 in ZSD means ``cls_seen`` could not be measured).
    """
    evaluator = ZSDEvaluator(class_names, unseen, setting, (iou,), "mmdet-v1", excluded,
                             max_dets_per_image, inclusive_boxes)
    evaluator.process(records, detections)
    data = _with_all_ground_truth(evaluator.collect(), records)
    errors = _classify(data, evaluator, iou, background_iou, inclusive_boxes)
    base = evaluator.evaluate(data)
    fixed = {kind: evaluator.evaluate(_fix(data, errors, kind)) for kind in KINDS}
    return _summary(data, evaluator, errors, base, fixed, iou, background_iou)


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------
def _with_all_ground_truth(data: EvalData, records: Sequence[ImageRecord]) -> EvalData:
    """``data`` (detections of the evaluated classes) with every annotation of the records as
    its ground truth; the protocol itself leaves out the classes it does not evaluate."""
    counts = [len(r) for r in records]

    def cat(parts, dtype, shape):
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(shape, dtype)

    return EvalData(data.image_ids, np.repeat(np.arange(len(records), dtype=np.int64), counts),
                    cat([r.labels for r in records], np.int64, (0,)),
                    cat([r.boxes for r in records], np.float32, (0, 4)),
                    cat([r.ignore for r in records], bool, (0,)),
                    data.det_image, data.det_label, data.det_boxes, data.det_scores)


def _classify(data: EvalData, evaluator: ZSDEvaluator, iou: float, background_iou: float,
              inclusive_boxes: bool) -> dict:
    """Per detection: ``kind`` (index into KINDS, -1 for a true positive or an ignored one) and
    ``target`` (the object a cls / loc error points at, -1 otherwise); ``tp`` (D,) bool;
    ``missed``: indices of the missed objects; ``covered``: objects found by a true positive."""
    match = match_mmdet_v1(data, evaluator.eval_ids, (iou,), inclusive_boxes)
    assert len(match.det) == len(data.det_label), "detections of other classes in the data"
    tp, fp = match.tp[0] > 0, match.fp[0] > 0
    other_iou, other_gt = _best_other_class(data, inclusive_boxes)
    own = match.best_iou.astype(np.float64)
    other = other_iou.astype(np.float64)
    other_label = data.gt_label[other_gt] if len(data.gt_label) else np.zeros(len(other_gt), np.int64)
    cls = np.where(np.isin(other_label, _unseen_ids(evaluator)), KINDS.index("cls_unseen"),
                   KINDS.index("cls_seen"))
    kind = np.select([~fp, own >= iou, other >= iou, own >= background_iou, other >= background_iou],
                     [-1, KINDS.index("dupe"), cls, KINDS.index("loc"), KINDS.index("both")],
                     KINDS.index("bkg"))
    target = np.select([kind == KINDS.index("loc"), np.isin(kind, [KINDS.index(k) for k in _RELABEL])],
                       [match.best_gt, other_gt], -1)
    covered = np.unique(match.best_gt[tp])
    evaluated = np.isin(data.gt_label, evaluator.eval_ids) & ~data.gt_ignore
    found = np.zeros(len(data.gt_label), bool)
    found[covered] = True
    found[target[target >= 0]] = True
    return {"kind": kind, "target": target, "tp": tp, "covered": covered,
            "missed": np.nonzero(evaluated & ~found)[0]}


def _best_other_class(data: EvalData, inclusive_boxes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per detection: the highest IoU with an object of another class in its image (-inf when
    there is none) and that object (the first on ties; 0 when none)."""
    D = len(data.det_label)
    pairs = pair_up(data.det_image, data.gt_image)  # ground truth is stored image by image
    best = np.full(D, -np.inf, np.float32)
    which = np.zeros(D, np.int64)
    if len(pairs.det):
        det_boxes = data.det_boxes[pairs.det].astype(np.float32)
        gt_boxes = data.gt_boxes[pairs.gt].astype(np.float32)
        if not inclusive_boxes:  # the protocol's inclusive pixels
            det_boxes[:, 2:] -= np.float32(1)
            gt_boxes[:, 2:] -= np.float32(1)
        values = pixel_iou(det_boxes, gt_boxes)
        values[data.gt_label[pairs.gt] == data.det_label[pairs.det]] = -np.inf
        seg_max, first = segment_argmax_first(values, pairs)
        best[pairs.seg_det] = seg_max
        which[pairs.seg_det] = pairs.gt[first]
    return best, which


def _unseen_ids(evaluator: ZSDEvaluator) -> list[int]:
    return [i for i, group in evaluator.group_of.items() if group == "unseen"]


# ----------------------------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------------------------
def _fix(data: EvalData, errors: dict, kind: str) -> EvalData:
    """``data`` with every error of ``kind`` fixed (module docstring)."""
    if kind == "missed":
        return _add_perfect_detections(data, errors["missed"])
    mine = np.nonzero(errors["kind"] == KINDS.index(kind))[0]
    boxes, labels = data.det_boxes.copy(), data.det_label.copy()
    remove = mine
    if kind in _RELABEL:
        mine = mine[np.argsort(-data.det_scores[mine], kind="stable")]
        target = errors["target"][mine]
        first = np.zeros(len(mine), bool)
        first[np.unique(target, return_index=True)[1]] = True  # the best-scored claim of each object
        moved = first & ~np.isin(target, errors["covered"]) & ~data.gt_ignore[target]
        boxes[mine[moved]] = data.gt_boxes[target[moved]]
        labels[mine[moved]] = data.gt_label[target[moved]]
        remove = mine[~moved]
    keep = np.ones(len(labels), bool)
    keep[remove] = False
    return EvalData(data.image_ids, data.gt_image, data.gt_label, data.gt_boxes, data.gt_ignore,
                    data.det_image[keep], labels[keep], boxes[keep], data.det_scores[keep])


def _add_perfect_detections(data: EvalData, objects: np.ndarray) -> EvalData:
    """``data`` plus one detection on each of ``objects`` (its box and class), scored above all."""
    top = float(data.det_scores.max()) + 1.0 if len(data.det_scores) else 1.0
    image = np.concatenate([data.det_image, data.gt_image[objects]])
    order = np.argsort(image, kind="stable")  # detections stay stored image by image
    return EvalData(data.image_ids, data.gt_image, data.gt_label, data.gt_boxes, data.gt_ignore,
                    image[order], np.concatenate([data.det_label, data.gt_label[objects]])[order],
                    np.concatenate([data.det_boxes, data.gt_boxes[objects]])[order],
                    np.concatenate([data.det_scores, np.full(len(objects), top)])[order])


# ----------------------------------------------------------------------------------------------
# the dict
# ----------------------------------------------------------------------------------------------
def _before_last_tp(data: EvalData, tp: np.ndarray) -> np.ndarray:
    """(D,) bool: ranked (by score, then stored order) above the last true positive of its class."""
    order = np.lexsort((np.arange(len(tp)), -data.det_scores, data.det_label))
    last = np.full(int(data.det_label.max(initial=0)) + 1, -1)
    np.maximum.at(last, data.det_label[order][tp[order]], np.nonzero(tp[order])[0])
    before = np.zeros(len(tp), bool)
    before[order] = np.arange(len(tp)) < last[data.det_label[order]]
    return before


def _map_of(metrics: dict, key: str) -> dict[str, float]:
    out = {g: m["map"][key] for g, m in metrics["groups"].items()}
    if "hm" in metrics:
        out["hm"] = metrics["hm"]["map"][key]
    return out


def _summary(data: EvalData, evaluator: ZSDEvaluator, errors: dict, base: dict, fixed: dict,
             iou: float, background_iou: float) -> dict:
    key = iou_key(iou)
    kind, tp = errors["kind"], errors["tp"]
    before = _before_last_tp(data, tp)
    base_map = _map_of(base, key)
    missed_label = data.gt_label[errors["missed"]]
    kinds = {}
    for k, name in enumerate(KINDS):
        gain = {g: round(v - base_map[g], 4) for g, v in _map_of(fixed[name], key).items()}
        if name == "missed":
            kinds[name] = {"count": len(missed_label), "before_last_tp": None, "map_gain": gain}
        else:
            kinds[name] = {"count": int((kind == k).sum()), "before_last_tp": int((before & (kind == k)).sum()),
                           "map_gain": gain}
    classes = {}
    for cid in evaluator.eval_ids:
        name = evaluator.class_names[cid - 1]
        c = base["classes"][name]
        mine = data.det_label == cid
        counts = {n: int((mine & (kind == k)).sum()) for k, n in enumerate(_FP_KINDS)}
        counts["missed"] = int((missed_label == cid).sum())
        classes[name] = {"group": c["group"], "num_gt": c["num_gt"], "tp": int((mine & tp).sum()),
                         "ap": c["ap"][key], "errors": counts,
                         "ap_gain": {n: round(fixed[n]["classes"][name]["ap"][key] - c["ap"][key], 4)
                                     for n in KINDS}}
    not_evaluated = ~np.isin(data.gt_label, evaluator.eval_ids)
    return {"setting": evaluator.setting, "protocol": "mmdet-v1", "iou": float(iou),
            "background_iou": float(background_iou), "objects_not_evaluated": int(not_evaluated.sum()),
            "map": base_map, "kinds": kinds, "classes": classes}


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def format_breakdown(b: Mapping[str, Any], per_class: bool = True) -> str:
    """A plain-text table of an :func:`error_breakdown` dict: one row per kind (count, count
    before the last true positive, mAP gain if fixed per group), then the counts per class."""
    groups = list(b["map"])
    lines = [f"error breakdown: setting {b['setting']}, IoU {b['iou']:g} (background < "
             f"{b['background_iou']:g}); mAP " + ", ".join(f"{g} {v:.2f}" for g, v in b["map"].items())]
    if b["setting"] == "zsd" and not b["objects_not_evaluated"]:
        lines.append("note: the ground truth holds no object of a seen class, so cls_seen cannot be "
                     "told apart (such boxes count as loc, both or bkg)")
    head = f"{'kind':<11} {'count':>6} {'<last TP':>8} | " + " ".join(f"{'+mAP ' + g:>11}" for g in groups)
    lines += [head, "-" * len(head)]
    for name, k in b["kinds"].items():
        before = "" if k["before_last_tp"] is None else k["before_last_tp"]
        lines.append(f"{name:<11} {k['count']:>6} {before:>8} | "
                     + " ".join(f"{k['map_gain'][g]:>+11.2f}" for g in groups))
    if per_class:
        width = max([len(n) for n in b["classes"]] + [5])
        head = f"{'class':<{width}} {'group':<6} {'gts':>5} {'tp':>5} {'AP':>6} | " + " ".join(
            f"{k:>10}" for k in KINDS)
        lines += ["", head, "-" * len(head)]
        for name, c in b["classes"].items():
            lines.append(f"{name:<{width}} {c['group']:<6} {c['num_gt']:>5} {c['tp']:>5} {c['ap']:>6.2f} | "
                         + " ".join(f"{c['errors'][k]:>10}" for k in KINDS))
    return "\n".join(lines)


def markdown_summary(rows: Mapping[str, Mapping[str, Any]], group: str = "unseen") -> str:
    """Markdown: one row per named breakdown, each kind as "count (+mAP gain)" for ``group``."""
    lines = ["| row | mAP | " + " | ".join(KINDS) + " |", "|" + "---|" * (2 + len(KINDS))]
    for name, b in rows.items():
        lines.append(f"| {name} | {b['map'][group]:.1f} | " + " | ".join(
            f"{b['kinds'][k]['count']} ({b['kinds'][k]['map_gain'][group]:+.1f})" for k in KINDS) + " |")
    return "\n".join(lines)
