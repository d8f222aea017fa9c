"""ZSD / GZSD evaluation: per-class AP and Recall@100, group means and the harmonic mean.

:class:`ZSDEvaluator` follows detectron2's ``DatasetEvaluator`` shape: ``reset()``, then
``process(records, detections)`` batch by batch, then ``evaluate()`` returns the metrics dict
of docs/formats.md ("Metrics file"); :func:`format_table` prints it.

Settings (which annotations count, which groups are reported):

- ``zsd``: only annotations of unseen classes; group ``unseen``.
- ``gzsd``: annotations of seen and unseen classes; groups ``seen`` and ``unseen`` and their
  harmonic mean ``hm`` (2SU / (S + U), 0 when S + U = 0), for mAP and for recall.
- ``seen``: only annotations of seen classes; group ``seen`` (training-time validation of the
  detector; with ``unseen=()`` every non-excluded class is seen, i.e. one group of all classes).

Excluded classes (COCO 48/17's 15) are never evaluated. Group means run over the group's
classes that have ground truth; a class with detections and no ground truth is reported with
``num_gt`` 0 and left out. A group none of whose classes has ground truth in the evaluated
images has ``null`` means (and so a ``null`` HM) and is listed in ``"no_ground_truth"``, never
reported as 0.0. Values in the dict are percentages rounded to 4 decimals.

Boxes are continuous xyxy pixels (``x2 = x + w``, as in :class:`ImageRecord` and torchvision).
The Recall@100 budget: with ``mmdet-v1`` each image keeps at most ``max_dets_per_image``
detections over all classes (highest scores, ties by given order), as the published evaluation
does; with ``coco`` the cap is COCOeval's ``maxDets``, applied per image **and class**, so an
image may contribute more than ``max_dets_per_image`` detections in all.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from vldus.data.records import ImageRecord
from vldus.data.splits import class_index
from vldus.evaluation.coco_protocol import evaluate_coco
from vldus.evaluation.common import ClassMetrics, EvalData, check_thresholds, iou_key
from vldus.evaluation.mean_ap import evaluate_mmdet_v1

SETTINGS = ("zsd", "gzsd", "seen")
PROTOCOLS = ("mmdet-v1", "coco")
GROUPS_OF_SETTING = {"zsd": ("unseen",), "gzsd": ("seen", "unseen"), "seen": ("seen",)}
MAX_DETS_PER_IMAGE = 100  # the "@100" of Recall@100 (and the published detector's max_per_img)


def _numpy(x: Any, dtype) -> np.ndarray:
    """A numpy copy of an array-like or a (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class ZSDEvaluator:
    """Accumulates ground truth and detections, then computes the metrics of a setting.

    class_names: detector order (index i + 1 = class_names[i]); unseen / excluded: names
    (matched loosely, as vldus.data.splits does); setting: 'zsd' | 'gzsd' | 'seen';
    protocol: 'mmdet-v1' (published evaluation) | 'coco' (pycocotools COCOeval);
    inclusive_boxes: mmdet-v1 only, boxes are already mmdet 1.x inclusive pixels
    (``x2 = x + w - 1``) instead of continuous.
    """

    def __init__(self, class_names: Sequence[str], unseen: Sequence[str], setting: str,
                 iou_thresholds: Sequence[float] = (0.4, 0.5, 0.6), protocol: str = "mmdet-v1",
                 excluded: Sequence[str] = (), max_dets_per_image: int = MAX_DETS_PER_IMAGE,
                 inclusive_boxes: bool = False):
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r} (one of {', '.join(SETTINGS)})")
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
        if max_dets_per_image < 1:
            raise ValueError("max_dets_per_image must be >= 1")
        self.class_names = tuple(class_names)
        self.setting, self.protocol = setting, protocol
        self.iou_thresholds = check_thresholds(iou_thresholds)
        self.max_dets_per_image = int(max_dets_per_image)
        self.inclusive_boxes = bool(inclusive_boxes)
        unseen_ids = {class_index(self.class_names, n, "unseen classes") for n in unseen}
        excluded_ids = {class_index(self.class_names, n, "excluded classes") for n in excluded}
        if unseen_ids & excluded_ids:
            raise ValueError("a class is both unseen and excluded")
        self.group_of = {i: ("unseen" if i in unseen_ids else "excluded" if i in excluded_ids
                             else "seen") for i in range(1, len(self.class_names) + 1)}
        groups = GROUPS_OF_SETTING[setting]
        self.eval_ids = [i for i, grp in self.group_of.items() if grp in groups]
        self.reset()

    # --- DatasetEvaluator interface -----------------------------------------------------
    def reset(self) -> None:
        self._image_ids: list[int] = []
        self._seen_images: set[int] = set()
        self._gt: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._det: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def process(self, records: Sequence[ImageRecord], detections: Sequence[Mapping[str, Any]]) -> None:
        """Add a batch: ``detections[i]`` belongs to ``records[i]``.

        Each detection dict: "boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,) detector index
        1..C (numpy arrays, lists or torch tensors).
        """
        if len(records) != len(detections):
            raise ValueError(f"{len(records)} records but {len(detections)} detection dicts")
        keep_ids = np.asarray(self.eval_ids, np.int64)
        C = len(self.class_names)
        for rec, det in zip(records, detections):
            image_id = int(rec.image_id)
            if image_id in self._seen_images:
                raise ValueError(f"image {image_id} processed twice")
            if len(rec.labels) and (rec.labels.min() < 1 or rec.labels.max() > C):
                raise ValueError(f"image {image_id}: ground-truth label outside 1..{C}")
            boxes = _numpy(det["boxes"], np.float32).reshape(-1, 4)
            scores = _numpy(det["scores"], np.float64).reshape(-1)
            labels = _numpy(det["labels"], np.int64).reshape(-1)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(f"image {image_id}: boxes, scores and labels differ in length")
            if len(labels) and (labels.min() < 1 or labels.max() > C):
                raise ValueError(f"image {image_id}: detection label outside 1..{C}")
            if not (np.isfinite(scores).all() and np.isfinite(boxes).all()):
                raise ValueError(f"image {image_id}: non-finite detection box or score")
            if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
                raise ValueError(f"image {image_id}: detection box with x2 < x1 or y2 < y1")
            # mmdet-v1: the Recall@100 budget over all classes, best scores kept; coco caps
            # per image and class in evaluate_coco (COCOeval's maxDets)
            if self.protocol == "mmdet-v1" and len(scores) > self.max_dets_per_image:
                top = np.sort(np.argsort(-scores, kind="stable")[:self.max_dets_per_image])
                boxes, scores, labels = boxes[top], scores[top], labels[top]
            self._seen_images.add(image_id)
            self._image_ids.append(image_id)
            g = np.isin(rec.labels, keep_ids)
            self._gt.append((rec.boxes[g], rec.labels[g], rec.ignore[g]))
            d = np.isin(labels, keep_ids)
            self._det.append((boxes[d], scores[d], labels[d]))

    def evaluate(self, data: EvalData | None = None) -> dict:
        """The metrics dict (docs/formats.md "Metrics file"), percentages, of the processed
        images, or of ``data`` (boxes of other classes in it are left out, as in ``process``)."""
        data = self.collect() if data is None else data
        if self.protocol == "mmdet-v1":
            res = evaluate_mmdet_v1(data, self.eval_ids, self.iou_thresholds, self.inclusive_boxes)
        else:
            res = evaluate_coco(data, self.eval_ids, self.iou_thresholds, self.max_dets_per_image)
        return self._metrics(res)

    def collect(self) -> EvalData:
        """Everything processed so far as one :class:`EvalData` (evaluated classes only; the
        detections after the per-image budget)."""
        def cat(parts, dtype, shape=(0,)):
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(shape, dtype)

        n_gt = [len(g[1]) for g in self._gt]
        n_det = [len(d[2]) for d in self._det]
        positions = np.arange(len(self._image_ids), dtype=np.int64)
        return EvalData(
            image_ids=np.asarray(self._image_ids, np.int64),
            gt_image=np.repeat(positions, n_gt),
            gt_label=cat([g[1] for g in self._gt], np.int64),
            gt_boxes=cat([g[0] for g in self._gt], np.float32, (0, 4)),
            gt_ignore=cat([g[2] for g in self._gt], bool),
            det_image=np.repeat(positions, n_det),
            det_label=cat([d[2] for d in self._det], np.int64),
            det_boxes=cat([d[0] for d in self._det], np.float32, (0, 4)),
            det_scores=cat([d[1] for d in self._det], np.float64),
        )

    # --- internals ----------------------------------------------------------------------
    def _metrics(self, res: ClassMetrics) -> dict:
        keys = [iou_key(t) for t in self.iou_thresholds]

        def pct(x) -> float:
            return round(float(x) * 100.0, 4)

        classes = {}
        for k, cid in enumerate(self.eval_ids):
            classes[self.class_names[cid - 1]] = {
                "group": self.group_of[cid], "num_gt": int(res.num_gt[k]), "num_dets": int(res.num_dets[k]),
                "ap": {key: pct(res.ap[k, t]) for t, key in enumerate(keys)},
                "recall": {key: pct(res.recall[k, t]) for t, key in enumerate(keys)}}
        means: dict[str, dict[str, list[float | None]]] = {}
        empty = []
        for group in GROUPS_OF_SETTING[self.setting]:
            members = [k for k, cid in enumerate(self.eval_ids)
                       if self.group_of[cid] == group and res.num_gt[k] > 0]
            if not members:
                empty.append(group)
            # mean in the protocol's dtype (float32 for mmdet-v1, as the reference)
            means[group] = {name: [float(arr[members, t].mean()) if members else None
                                   for t in range(len(keys))]
                            for name, arr in (("map", res.ap), ("recall", res.recall))}

        def pct_or_none(x):
            return None if x is None else pct(x)

        metrics = {
            "setting": self.setting, "protocol": self.protocol,
            "iou_thresholds": list(self.iou_thresholds), "classes": classes,
            "groups": {group: {name: {key: pct_or_none(v) for key, v in zip(keys, vals)}
                               for name, vals in m.items()} for group, m in means.items()},
        }
        if empty:
            metrics["no_ground_truth"] = empty
        if self.setting == "gzsd":
            metrics["hm"] = {name: {key: None if s is None or u is None else pct(harmonic_mean(s, u))
                                    for key, s, u in zip(keys, means["seen"][name], means["unseen"][name])}
                             for name in ("map", "recall")}
        return metrics


def no_ground_truth_line(metrics: Mapping[str, Any]) -> str:
    """One line naming the groups without ground truth in a metrics dict ('' when none)."""
    empty = metrics.get("no_ground_truth") or []
    if not empty:
        return ""
    line = (f"{metrics['setting']}: no {' and no '.join(empty)} ground truth in the evaluated images, so no "
            f"{' / '.join(empty)} mAP")
    return line + (" and no HM" if metrics.get("hm") is not None else "")


def harmonic_mean(seen: float, unseen: float) -> float:
    """2SU / (S + U); 0 when S + U = 0."""
    return 2.0 * seen * unseen / (seen + unseen) if seen + unseen > 0 else 0.0


def format_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text table of a metrics dict: one row per class, then the group means and HM."""
    keys = [iou_key(t) for t in metrics["iou_thresholds"]]
    classes = metrics["classes"]
    width = max([len(n) for n in classes] + [len("mean unseen"), 5])
    head = (f"{'class':<{width}}  {'group':<6} {'gts':>6} {'dets':>7} | "
            + " ".join(f"{'AP@' + k:>7}" for k in keys) + " | "
            + " ".join(f"{'R@' + k:>7}" for k in keys))
    rule = "-" * len(head)

    def cell(v) -> str:
        return f"{'-':>7}" if v is None else f"{v:7.2f}"

    def row(name, group, gts, dets, ap, rec):
        return (f"{name:<{width}}  {group:<6} {gts:>6} {dets:>7} | "
                + " ".join(cell(ap[k]) for k in keys) + " | "
                + " ".join(cell(rec[k]) for k in keys))

    lines = [f"setting {metrics['setting']}, protocol {metrics['protocol']}, values in percent",
             head, rule]
    for name, c in classes.items():
        lines.append(row(name, c["group"], c["num_gt"], c["num_dets"], c["ap"], c["recall"]))
    lines.append(rule)
    for group, g in metrics["groups"].items():
        members = [c for c in classes.values() if c["group"] == group]
        with_gt = sum(1 for c in members if c["num_gt"] > 0)
        lines.append(row(f"mean {group}", f"{with_gt}/{len(members)}",
                         sum(c["num_gt"] for c in members), sum(c["num_dets"] for c in members),
                         g["map"], g["recall"]))
    if "hm" in metrics:
        lines.append(row("HM", "", "", "", metrics["hm"]["map"], metrics["hm"]["recall"]))
    if no_ground_truth_line(metrics):
        lines.append(no_ground_truth_line(metrics))
    return "\n".join(lines)
