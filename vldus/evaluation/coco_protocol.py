"""Protocol ``coco``: pycocotools COCOeval's bbox AP and recall at given IoU thresholds, vectorised.

Settings: area range 'all', maxDets 100 (per image and class, as COCOeval counts it), one IoU
threshold at a time. Ignored boxes (crowd / difficult) are COCO crowd regions: their IoU is
intersection / detection area, any number of detections may match them, and a detection that
matches one is neither TP nor FP.

Matching (COCOeval ``evaluateImg``), per image and class, detections by descending score
(stable): a detection takes, among the ground truth still free (crowd is always free) with
IoU >= threshold, the non-ignored box of highest IoU, or failing that the ignored box of
highest IoU (the last one on ties). A matched box is no longer free. Unlike mmdet-v1 a
detection may fall back to its second-best box, so matching is sequential: we run it in rounds,
round r handling the r-th detection of every (image, class) group at once.

Accumulation (COCOeval ``accumulate``): per class, detections of all images (image ids
ascending) sorted by score (stable); precision made monotone; AP = mean of the precision at the
101 recall points 0, 0.01, ..., 1 (0 beyond the last recall); recall = final recall.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vldus.evaluation.common import ClassMetrics, EvalData, count_per_class, pair_up

RECALL_POINTS = np.linspace(0.0, 1.0, 101, endpoint=True)


def coco_iou(det: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Row-wise IoU of continuous xyxy boxes in float64 (pycocotools ``bbIou``).

    det, gt: (P, 4); crowd: (P,) bool, where the union is the detection's area. Returns (P,).
    """
    det = det.astype(np.float64)
    gt = gt.astype(np.float64)
    w = np.minimum(det[:, 2], gt[:, 2]) - np.maximum(det[:, 0], gt[:, 0])
    h = np.minimum(det[:, 3], gt[:, 3]) - np.maximum(det[:, 1], gt[:, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    det_area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
    gt_area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    union = np.where(crowd, det_area, det_area + gt_area - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _rank_in_group(key: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Position in the group after a stable sort by descending score (COCOeval's mergesort)."""
    n = len(key)
    order = np.lexsort((np.arange(n), -scores, key))
    k = key[order]
    new_group = np.ones(n, bool)
    new_group[1:] = k[1:] != k[:-1]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    return rank


def evaluate_coco(data: EvalData, class_ids: Sequence[int], iou_thresholds: Sequence[float],
                  max_dets: int = 100) -> ClassMetrics:
    """Per-class AP and recall (fractions, float64) of ``class_ids`` at each threshold."""
    class_ids = np.asarray(class_ids, np.int64)
    T, K = len(iou_thresholds), len(class_ids)
    # COCOeval starts from min(t, 1 - 1e-10) and accepts IoU >= it
    thr = np.array([min(float(t), 1 - 1e-10) for t in iou_thresholds])[:, None]

    g = np.isin(data.gt_label, class_ids)
    gt_key = data.group_key(data.gt_image[g], data.gt_label[g])
    order = np.lexsort((np.arange(len(gt_key)), data.gt_ignore[g], gt_key))  # non-ignored first
    gt_key = gt_key[order]
    gt_boxes, gt_ignore, gt_label = data.gt_boxes[g][order], data.gt_ignore[g][order], data.gt_label[g][order]

    d = np.nonzero(np.isin(data.det_label, class_ids))[0]
    rank = _rank_in_group(data.group_key(data.det_image[d], data.det_label[d]), data.det_scores[d])
    d, rank = d[rank < max_dets], rank[rank < max_dets]
    o = np.lexsort((d, rank))  # round r = the r-th detection of every group
    d, rank = d[o], rank[o]
    det_key = data.group_key(data.det_image[d], data.det_label[d])
    D = len(d)

    pairs = pair_up(det_key, gt_key)
    iou = coco_iou(data.det_boxes[d][pairs.det], gt_boxes[pairs.gt], gt_ignore[pairs.gt])
    pair_first = np.r_[0, np.cumsum(pairs.counts)]  # pairs of detection i: [pair_first[i], pair_first[i+1])
    round_bounds = np.searchsorted(rank, np.arange(int(rank.max(initial=-1)) + 2))

    free = np.ones((T, len(gt_key)), bool)
    matched = np.zeros((T, D), bool)
    on_ignored = np.zeros((T, D), bool)
    priority = np.where(gt_ignore, 1, 2)  # a free non-ignored box beats any ignored one
    for a, b in zip(round_bounds[:-1], round_bounds[1:]):
        pa, pb = pair_first[a], pair_first[b]
        if pa == pb:
            continue
        sa, sb = np.searchsorted(pairs.seg_start, [pa, pb])
        seg = pairs.seg_start[sa:sb] - pa
        seg_len = pairs.counts[pairs.seg_det[sa:sb]]
        pg, piou = pairs.gt[pa:pb], iou[pa:pb]
        cand = (piou >= thr) & (gt_ignore[pg] | free[:, pg])  # (T, P_r)
        pri = np.where(cand, priority[pg], 0)
        best_pri = np.maximum.reduceat(pri, seg, axis=1)
        keep = cand & (pri == np.repeat(best_pri, seg_len, axis=1))
        kiou = np.where(keep, piou, -1.0)
        keep &= kiou == np.repeat(np.maximum.reduceat(kiou, seg, axis=1), seg_len, axis=1)
        last = np.maximum.reduceat(np.where(keep, np.arange(pb - pa), -1), seg, axis=1)
        t_idx, s_idx = np.nonzero(best_pri > 0)
        box = pg[last[t_idx, s_idx]]
        det = pairs.seg_det[sa:sb][s_idx]
        matched[t_idx, det] = True
        on_ignored[t_idx, det] = gt_ignore[box]
        free[t_idx, box] = False

    # accumulate per class: image ids ascending, then stable by descending score
    image_pos = np.argsort(np.argsort(data.image_ids, kind="stable"), kind="stable")
    det_label, scores = data.det_label[d], data.det_scores[d]
    tps = matched & ~on_ignored
    fps = ~matched & ~on_ignored
    num_gt = count_per_class(gt_label[~gt_ignore], class_ids)
    ap = np.zeros((K, T))
    recall = np.zeros((K, T))
    num_dets = np.zeros(K, np.int64)
    by_label = np.argsort(det_label, kind="stable")
    lo = np.searchsorted(det_label[by_label], class_ids, side="left")
    hi = np.searchsorted(det_label[by_label], class_ids, side="right")
    for k in range(K):
        sel = by_label[lo[k]:hi[k]]
        num_dets[k] = len(sel)
        if num_gt[k] == 0 or len(sel) == 0:
            continue
        sel = sel[np.lexsort((rank[sel], image_pos[data.det_image[d][sel]], -scores[sel]))]
        tp = np.cumsum(tps[:, sel], axis=1).astype(np.float64)
        fp = np.cumsum(fps[:, sel], axis=1).astype(np.float64)
        rc = tp / num_gt[k]
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
        n = len(sel)
        for t in range(T):
            at = np.searchsorted(rc[t], RECALL_POINTS, side="left")
            q = np.where(at < n, pr[t, np.minimum(at, n - 1)], 0.0)
            ap[k, t] = np.mean(q)
            recall[k, t] = rc[t, -1]
    return ClassMetrics(ap, recall, num_gt, num_dets)
