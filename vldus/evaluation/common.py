"""Data shared by the evaluation protocols: boxes flattened over images, and det-gt pairs.

Both protocols (:mod:`vldus.evaluation.mean_ap`, :mod:`vldus.evaluation.coco_protocol`) work on
an :class:`EvalData` and return a :class:`ClassMetrics`. Instead of looping over images and
classes in Python, every detection is paired with every ground-truth box of the same image and
class (:func:`pair_up`); per-detection maxima are then segment reductions over those pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class EvalData:
    """Ground truth and detections of all processed images, one row per box.

    ``*_image`` is the position of the image in processing order (0..N-1), ``*_label`` the
    detector class index (1..C). Boxes are float32 xyxy in continuous pixel coordinates
    (``x2 = x + w``). Detections are stored image by image, inside an image in the order they
    were given (that order breaks score ties, as in the reference implementations).
    """

    image_ids: np.ndarray  # (N,) int64, the image_id of each position
    gt_image: np.ndarray  # (G,) int64
    gt_label: np.ndarray  # (G,) int64
    gt_boxes: np.ndarray  # (G, 4) float32
    gt_ignore: np.ndarray  # (G,) bool: crowd / difficult
    det_image: np.ndarray  # (D,) int64
    det_label: np.ndarray  # (D,) int64
    det_boxes: np.ndarray  # (D, 4) float32
    det_scores: np.ndarray  # (D,) float64

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def group_key(self, image: np.ndarray, label: np.ndarray) -> np.ndarray:
        """One int64 per (class, image) pair, ordered by class then image."""
        return label.astype(np.int64) * max(self.num_images, 1) + image


@dataclass
class ClassMetrics:
    """Per-class results of a protocol, as fractions (0..1), K classes x T IoU thresholds.

    ``ap`` and ``recall`` keep the dtype of the protocol's arithmetic (float32 for mmdet-v1,
    float64 for coco) so that group means reproduce the reference to the last bit.
    """

    ap: np.ndarray  # (K, T)
    recall: np.ndarray  # (K, T)
    num_gt: np.ndarray  # (K,) int64, non-ignored ground-truth boxes
    num_dets: np.ndarray  # (K,) int64


@dataclass
class Pairs:
    """Every (detection, ground truth) pair sharing an image and a class.

    Pairs are grouped by detection (ascending), and inside a detection by ground-truth index
    (ascending). ``seg_start[i]`` is the first pair of ``seg_det[i]``, one entry per detection
    that has at least one pair: the offsets ``np.ufunc.reduceat`` needs.
    """

    det: np.ndarray  # (P,) detection index
    gt: np.ndarray  # (P,) ground-truth index
    counts: np.ndarray  # (D,) pairs per detection
    seg_start: np.ndarray  # (S,) first pair of each detection with pairs
    seg_det: np.ndarray  # (S,) that detection

    def per_pair(self, per_segment: np.ndarray) -> np.ndarray:
        """Broadcast a (..., S) per-segment array to (..., P) per-pair."""
        return np.repeat(per_segment, self.counts[self.seg_det], axis=-1)


def pair_up(det_key: np.ndarray, gt_key_sorted: np.ndarray) -> Pairs:
    """Pair each detection with every ground truth of equal key.

    det_key: (D,) int64; gt_key_sorted: (G,) int64, ascending (ground truth already put in the
    order the protocol scans it).
    """
    start = np.searchsorted(gt_key_sorted, det_key, side="left")
    stop = np.searchsorted(gt_key_sorted, det_key, side="right")
    counts = (stop - start).astype(np.int64)
    first = np.cumsum(counts) - counts  # first pair of each detection
    det = np.repeat(np.arange(len(det_key), dtype=np.int64), counts)
    gt = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first - start, counts)
    has = counts > 0
    return Pairs(det, gt, counts, first[has], np.nonzero(has)[0])


def segment_argmax_first(values: np.ndarray, pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """Per detection with pairs: (max value, index of the FIRST pair reaching it) — np.argmax."""
    seg_max = np.maximum.reduceat(values, pairs.seg_start)
    idx = np.arange(len(values), dtype=np.int64)
    at_max = values == pairs.per_pair(seg_max)
    first = np.minimum.reduceat(np.where(at_max, idx, len(values)), pairs.seg_start)
    return seg_max, first


def iou_key(threshold: float) -> str:
    """JSON key of an IoU threshold: one decimal ("0.5") unless more are needed ("0.55")."""
    one = f"{threshold:.1f}"
    return one if abs(float(one) - threshold) < 1e-9 else f"{threshold:g}"


def check_thresholds(iou_thresholds: Sequence[float]) -> tuple[float, ...]:
    """Validate IoU thresholds: non-empty, in (0, 1], distinct keys."""
    ts = tuple(float(t) for t in iou_thresholds)
    if not ts:
        raise ValueError("at least one IoU threshold is needed")
    for t in ts:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"IoU threshold {t} is not in (0, 1]")
    keys = [iou_key(t) for t in ts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate IoU thresholds {list(ts)}")
    return ts


def count_per_class(labels: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """(K,) int64: how many entries of ``labels`` equal each of ``class_ids``."""
    labels = np.sort(np.asarray(labels, np.int64))
    ids = np.asarray(class_ids, np.int64)
    return (np.searchsorted(labels, ids, side="right") - np.searchsorted(labels, ids, side="left")).astype(np.int64)
