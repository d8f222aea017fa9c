"""Time ZSDEvaluator against pycocotools' COCOeval on a COCO-sized synthetic result.

Input (synthetic but shaped like a real detector's output on COCO val): ``--images`` images of
640x480, ``--classes`` classes, 1 + Poisson(6) ground-truth boxes per image over a few classes
(1% crowd), each box found by 1-2 jittered detections (10% with a confused class), the rest of
the ``--dets`` per image false positives with lower scores.

Timed: ZSDEvaluator ``process`` + ``evaluate`` (protocols mmdet-v1 and coco), and COCOeval
``evaluate`` + ``accumulate`` with the same settings (IoU 0.4/0.5/0.6, maxDets 100, area all);
``--coco-defaults`` also times COCOeval with its default 10 IoUs x 4 areas x 3 maxDets. Data
building and COCO indexing (``COCO()``, ``loadRes``) are not timed. The coco protocol's
per-class AP and recall are checked against COCOeval's (max abs difference printed).

    python benchmarks/bench_evaluator.py [--images 5000] [--classes 80] [--dets 100] [--seed 0]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import time

import numpy as np

from vldus.data.records import ImageRecord
from vldus.evaluation import ZSDEvaluator

IOUS = (0.4, 0.5, 0.6)


def make_data(n_images: int, n_classes: int, dets_per_image: int, seed: int):
    """(records, detections per image) in vldus form."""
    rng = np.random.default_rng(seed)
    W, H = 640.0, 480.0
    records, detections = [], []
    for i in range(n_images):
        n = 1 + rng.poisson(6)
        present = rng.choice(n_classes, size=min(n_classes, 1 + rng.poisson(2)), replace=False) + 1
        labels = rng.choice(present, size=n)
        wh = np.exp(rng.uniform(np.log(8), np.log(400), (n, 2))) * [1.0, 0.8]
        xy = rng.uniform(0, 1, (n, 2)) * ([W, H] - wh).clip(1)
        boxes = np.c_[xy, xy + wh]
        crowd = rng.random(n) < 0.01
        records.append(ImageRecord(i + 1, f"{i + 1}.jpg", int(W), int(H), boxes, labels, crowd))

        src = np.repeat(np.arange(n), rng.integers(1, 3, n))[:dets_per_image]
        k = len(src)
        jitter = rng.normal(0, 0.08, (k, 4)) * np.tile(wh[src], 2)
        tp_boxes = boxes[src] + jitter
        tp_labels = np.where(rng.random(k) < 0.9, labels[src], rng.integers(1, n_classes + 1, k))
        tp_scores = rng.beta(5, 2, k)
        m = dets_per_image - k
        fwh = np.exp(rng.uniform(np.log(8), np.log(300), (m, 2)))
        fxy = rng.uniform(0, 1, (m, 2)) * ([W, H] - fwh).clip(1)
        fp_boxes = np.c_[fxy, fxy + fwh]
        fp_labels = np.where(rng.random(m) < 0.5, rng.choice(present, m), rng.integers(1, n_classes + 1, m))
        fp_scores = rng.beta(1.2, 6, m)
        b = np.r_[tp_boxes, fp_boxes]
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        order = np.argsort(-np.r_[tp_scores, fp_scores], kind="stable")  # detector output order
        detections.append({"boxes": b[order].astype(np.float32),
                           "scores": np.r_[tp_scores, fp_scores][order],
                           "labels": np.r_[tp_labels, fp_labels][order].astype(np.int64)})
    return records, detections


def to_coco(records, detections, n_classes: int):
    """The same data as a COCO GT dict and a COCO results list."""
    images, anns, results = [], [], []
    for r, d in zip(records, detections):
        images.append({"id": r.image_id, "file_name": r.path, "width": r.width, "height": r.height})
        for (x1, y1, x2, y2), lab, ign in zip(r.boxes.tolist(), r.labels.tolist(), r.ignore.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": r.image_id, "category_id": lab,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": int(ign)})
        for (x1, y1, x2, y2), s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            results.append({"image_id": r.image_id, "category_id": lab,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, n_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, results


def time_ours(records, detections, names, unseen, protocol):
    ev = ZSDEvaluator(names, unseen, "gzsd", IOUS, protocol)
    t0 = time.perf_counter()
    ev.process(records, detections)
    metrics = ev.evaluate()
    return time.perf_counter() - t0, metrics


def time_cocoeval(gt, results, same_settings: bool):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        E = COCOeval(coco_gt, coco_dt, "bbox")
        if same_settings:
            E.params.iouThrs = np.array(IOUS)
            E.params.maxDets = [100]
            E.params.areaRng = [[0, 1e10]]
            E.params.areaRngLbl = ["all"]
        t0 = time.perf_counter()
        E.evaluate()
        E.accumulate()
        dt = time.perf_counter() - t0
    return dt, E


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--dets", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coco-defaults", action="store_true", help="also time COCOeval's default settings")
    args = ap.parse_args()

    records, detections = make_data(args.images, args.classes, args.dets, args.seed)
    names = [f"class{c}" for c in range(1, args.classes + 1)]
    unseen = names[::5]
    gt, results = to_coco(records, detections, args.classes)
    print(f"{args.images} images, {len(gt['annotations'])} gt boxes, {len(results)} detections, "
          f"{args.classes} classes, IoU {IOUS}")

    t_mm, _ = time_ours(records, detections, names, unseen, "mmdet-v1")
    t_co, ours = time_ours(records, detections, names, unseen, "coco")
    t_ref, E = time_cocoeval(gt, results, same_settings=True)
    print(f"vldus mmdet-v1 (process+evaluate): {t_mm:8.2f} s")
    print(f"vldus coco     (process+evaluate): {t_co:8.2f} s")
    print(f"COCOeval evaluate+accumulate     : {t_ref:8.2f} s   (same IoUs, maxDets 100, area all)")
    print(f"ratio COCOeval / vldus mmdet-v1  : {t_ref / t_mm:8.1f}x")
    print(f"ratio COCOeval / vldus coco      : {t_ref / t_co:8.1f}x")

    worst = 0.0
    for k, name in enumerate(names):
        for t, key in enumerate(("0.4", "0.5", "0.6")):
            p = E.eval["precision"][t, :, k, 0, 0]
            ref_ap = 100 * p.mean() if (p > -1).any() else 0.0
            ref_rec = 100 * max(E.eval["recall"][t, k, 0, 0], 0.0)
            c = ours["classes"][name]
            worst = max(worst, abs(c["ap"][key] - ref_ap), abs(c["recall"][key] - ref_rec))
    print(f"coco protocol vs COCOeval: max |difference| {worst:.2e} percentage points "
          f"(values rounded to 1e-4)")
    if args.coco_defaults:
        t_def, _ = time_cocoeval(gt, results, same_settings=False)
        print(f"COCOeval default settings (10 IoUs x 4 areas x 3 maxDets): {t_def:8.2f} s")
    print("load average (1, 5, 15 min):", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
