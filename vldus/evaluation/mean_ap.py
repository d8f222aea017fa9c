"""Protocol ``mmdet-v1``: the published evaluation (mmdetection 1.x ``eval_map``), vectorised.

What the published code computes, per class and IoU threshold (our own implementation):

1. Per image, the class's detections are scanned by descending score. Each detection is
   compared with the class's ground-truth boxes of that image (non-ignored boxes first, then
   crowd / difficult ones) and takes the one of highest IoU (the first on ties).
   - IoU >= threshold and that box is ignored: the detection is neither TP nor FP;
   - IoU >= threshold and the box is not yet covered: TP, the box becomes covered;
   - IoU >= threshold and the box is covered: FP (a duplicate);
   - IoU < threshold, or no box of the class in the image: FP.
   The best box does not depend on what is covered, so the only sequential part is "first
   detection on a box wins": here a sort by (box, rank in the image) instead of a loop.
2. IoU in the 1-pixel-inclusive convention of mmdet 1.x: ``area = (x2 - x1 + 1) * (y2 - y1 + 1)``,
   float32 arithmetic in the same operation order. mmdet 1.x boxes were inclusive
   (``x2 = x + w - 1``); ours are continuous (``x2 = x + w``) and are converted by subtracting 1
   from x2 and y2, so a COCO file gives exactly the IoU mmdet 1.x computed from it
   (``inclusive_boxes=True`` skips that conversion for boxes already in mmdet 1.x form).
3. All detections of the class over all images are sorted by score; cumulative TP / FP give
   recall = TP / num_gt (float64) and precision = TP / max(TP + FP, eps) (float32).
4. AP = area under the precision envelope (all points, VOC 2010+ "area" mode).
   Recall@100 = the recall after the last detection (0 when the class has none).

Score ties are broken exactly as the reference does: it calls ``np.argsort`` (the default,
unstable sort) on the per-image and the per-class score arrays, in image order and, within an
image, in the order the detections were given; we make the same calls on the same arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vldus.evaluation.common import (ClassMetrics, EvalData, count_per_class, pair_up,
                                     segment_argmax_first)

EPS32 = np.finfo(np.float32).eps


def pixel_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of inclusive-pixel boxes, float32 as mmdet 1.x ``bbox_overlaps``.

    a, b: (P, 4) float32 xyxy with ``x2`` the last pixel column (width = x2 - x1 + 1).
    Returns (P,) float32.
    """
    one, zero = np.float32(1), np.float32(0)
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    w = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + one, zero)
    h = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + one, zero)
    overlap = w * h
    return overlap / (area_a + area_b - overlap)


def area_ap(recall: np.ndarray, precision: np.ndarray) -> np.float32:
    """Area under the interpolated precision-recall curve (all points), as a float32.

    recall: (n,) float64 non-decreasing; precision: (n,) float32. The curve is closed with
    (0, 0) in front and (1, 0) behind; precision is replaced by its envelope (the running max
    from the right) and summed over the recall steps.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision.astype(np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return np.float32(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def image_rank(key: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
    """Position of each detection in the scan order of its (class, image) group.

    The scan order is ``np.argsort(neg_scores[group])`` with the group's members in given
    order. Without ties any sort gives it; groups with tied scores are sorted by that exact
    call (rare, so the Python loop over them is cheap).
    key: (D,) int64 group key; neg_scores: (D,) float32 negated scores. Returns (D,) int64.
    """
    n = len(key)
    order = np.lexsort((np.arange(n), neg_scores, key))
    k, s = key[order], neg_scores[order]
    new_group = np.ones(n, bool)
    new_group[1:] = k[1:] != k[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    tied = np.nonzero(~new_group & np.r_[False, s[1:] == s[:-1]])[0]
    if len(tied):
        starts = np.nonzero(new_group)[0]
        bounds = np.r_[starts, n]
        for g in np.unique(np.searchsorted(starts, tied, side="right") - 1):
            a, b = bounds[g], bounds[g + 1]
            members = np.sort(order[a:b])
            order[a:b] = members[np.argsort(neg_scores[members])]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


@dataclass
class Matching:
    """How the detections of the evaluated classes match the ground truth (mmdet-v1 rules).

    ``det`` indexes ``EvalData.det_*``, ``best_gt`` indexes ``EvalData.gt_*``; the rest is per
    entry of ``det``. A detection is TP, FP or neither (its best box is an ignore region).
    """

    det: np.ndarray  # (D,) int64, the detections of the evaluated classes
    tp: np.ndarray  # (T, D) float32, 1 where a true positive at threshold t
    fp: np.ndarray  # (T, D) float32, 1 where a false positive at threshold t
    best_gt: np.ndarray  # (D,) int64, the ground truth of its class of highest IoU (-1: none)
    best_iou: np.ndarray  # (D,) float32, that IoU (-inf: no ground truth of its class in the image)


def match_mmdet_v1(data: EvalData, class_ids: Sequence[int], iou_thresholds: Sequence[float],
                   inclusive_boxes: bool = False) -> Matching:
    """Step 1 of the module docstring: TP / FP of every detection of ``class_ids``."""
    class_ids = np.asarray(class_ids, np.int64)
    T = len(iou_thresholds)

    g = np.nonzero(np.isin(data.gt_label, class_ids))[0]
    # scan order inside a (class, image) group: non-ignored boxes, then ignored, each as given
    g = g[np.lexsort((g, data.gt_ignore[g], data.group_key(data.gt_image[g], data.gt_label[g])))]
    gt_key = data.group_key(data.gt_image[g], data.gt_label[g])
    gt_boxes, gt_ignore = data.gt_boxes[g], data.gt_ignore[g]

    d = np.nonzero(np.isin(data.det_label, class_ids))[0]
    det_key = data.group_key(data.det_image[d], data.det_label[d])
    det_boxes = data.det_boxes[d].astype(np.float32)
    neg_scores = -data.det_scores[d].astype(np.float32)
    gt_boxes = gt_boxes.astype(np.float32)
    if not inclusive_boxes:  # continuous -> mmdet 1.x inclusive pixels
        gt_boxes[:, 2:] -= np.float32(1)
        det_boxes[:, 2:] -= np.float32(1)

    # each detection's best ground truth (independent of the threshold and of coverage)
    D = len(det_key)
    pairs = pair_up(det_key, gt_key)
    best_iou = np.full(D, -np.inf, np.float32)
    best_gt = np.zeros(D, np.int64)
    if len(pairs.det):
        iou = pixel_iou(det_boxes[pairs.det], gt_boxes[pairs.gt])
        seg_max, first = segment_argmax_first(iou, pairs)
        best_iou[pairs.seg_det] = seg_max
        best_gt[pairs.seg_det] = pairs.gt[first]
    on_ignored = gt_ignore[best_gt] if len(gt_ignore) else np.zeros(D, bool)
    rank = image_rank(det_key, neg_scores)

    tp = np.zeros((T, D), np.float32)
    fp = np.zeros((T, D), np.float32)
    for t, thr in enumerate(iou_thresholds):
        # float32 IoU against the float64 threshold: mmdet 1.x compared numpy scalars, which
        # numpy 1.x promoted to float64 (matters for thresholds like 0.7 with f32(0.7) < 0.7)
        hit = best_iou.astype(np.float64) >= float(thr)
        cand = np.nonzero(hit & ~on_ignored)[0]
        cand = cand[np.lexsort((rank[cand], best_gt[cand]))]
        first_on_box = np.ones(len(cand), bool)
        first_on_box[1:] = best_gt[cand][1:] != best_gt[cand][:-1]
        tp[t, cand[first_on_box]] = 1
        fp[t, cand[~first_on_box]] = 1
        fp[t, ~hit] = 1
    best_gt = np.where(np.isfinite(best_iou), g[best_gt], -1) if len(g) else np.full(D, -1, np.int64)
    return Matching(d, tp, fp, best_gt, best_iou)


def evaluate_mmdet_v1(data: EvalData, class_ids: Sequence[int], iou_thresholds: Sequence[float],
                      inclusive_boxes: bool = False) -> ClassMetrics:
    """Per-class AP and recall (fractions, float32) of ``class_ids`` at each threshold."""
    match = match_mmdet_v1(data, class_ids, iou_thresholds, inclusive_boxes)
    class_ids = np.asarray(class_ids, np.int64)
    T, K = len(iou_thresholds), len(class_ids)
    g = np.isin(data.gt_label, class_ids)
    gt_label, gt_ignore = data.gt_label[g], data.gt_ignore[g]
    det_label = data.det_label[match.det]
    neg_scores = -data.det_scores[match.det].astype(np.float32)
    tp, fp = match.tp, match.fp

    ap = np.zeros((K, T), np.float32)
    recall = np.zeros((K, T), np.float32)
    num_gt = count_per_class(gt_label[~gt_ignore], class_ids)
    by_label = np.argsort(det_label, kind="stable")  # keeps image order, then given order
    bounds = np.searchsorted(det_label[by_label], class_ids, side="left")
    ends = np.searchsorted(det_label[by_label], class_ids, side="right")
    num_dets = (ends - bounds).astype(np.int64)
    for k in range(K):
        sel = by_label[bounds[k]:ends[k]]
        order = sel[np.argsort(neg_scores[sel])]
        denom = max(float(num_gt[k]), float(EPS32))
        for t in range(T):
            tp_cum = np.cumsum(tp[t, order], dtype=np.float32)
            fp_cum = np.cumsum(fp[t, order], dtype=np.float32)
            rec = tp_cum.astype(np.float64) / denom
            prec = tp_cum / np.maximum(tp_cum + fp_cum, EPS32)
            ap[k, t] = area_ap(rec, prec)
            recall[k, t] = rec[-1] if len(rec) else 0.0
    return ClassMetrics(ap, recall, num_gt, num_dets)
