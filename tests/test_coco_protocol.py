"""Protocol coco against pycocotools COCOeval (evaluate + accumulate) on random data.

Crowd boxes, score ties, image ids out of order, non-contiguous category ids, images with no
ground truth and images with no detections are all in the mix.
"""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vldus.data.records import ImageRecord
from vldus.evaluation import ZSDEvaluator
from vldus.evaluation.coco_protocol import coco_iou, evaluate_coco

CATEGORY_IDS = [3, 7, 11, 20]  # detector index i + 1 <-> CATEGORY_IDS[i]
NAMES = ["c1", "c2", "c3", "c4"]


def random_case(seed, n_images=40, ties=False):
    rng = np.random.default_rng(seed)
    records, dets = [], []
    for i in rng.permutation(n_images):
        n = int(rng.integers(0, 7))
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.c_[xy, xy + rng.uniform(2, 40, (n, 2))]
        labels = rng.integers(1, 5, n)
        records.append(ImageRecord(int(i) * 3 + 1, "", 128, 128, boxes, labels, rng.random(n) < 0.15))
        k = int(rng.integers(0, 20))
        if n:
            src = rng.integers(0, n, k)
            db = boxes[src] + rng.normal(0, 4, (k, 4))
            dl = np.where(rng.random(k) < 0.8, labels[src], rng.integers(1, 5, k))
        else:
            db, dl = np.zeros((k, 4)), rng.integers(1, 5, k)
        far = (rng.random(k) < 0.3) | (n == 0)
        fxy = rng.uniform(0, 80, (int(far.sum()), 2))
        db[far] = np.c_[fxy, fxy + rng.uniform(2, 40, (int(far.sum()), 2))]
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        scores = np.round(rng.random(k), 1) if ties else rng.random(k)
        dets.append({"boxes": db.astype(np.float32), "scores": scores, "labels": dl})
    return records, dets


def cocoeval(records, dets, thresholds):
    images, anns, results = [], [], []
    for r, d in zip(records, dets):
        images.append({"id": r.image_id, "width": 128, "height": 128, "file_name": ""})
        for (x1, y1, x2, y2), lab, ign in zip(r.boxes.tolist(), r.labels.tolist(), r.ignore.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": r.image_id, "category_id": CATEGORY_IDS[lab - 1],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(ign)})
        for (x1, y1, x2, y2), s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            results.append({"image_id": r.image_id, "category_id": CATEGORY_IDS[lab - 1],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, NAMES)]}
        gt.createIndex()
        E = COCOeval(gt, gt.loadRes(results), "bbox")
        E.params.iouThrs = np.array(thresholds)
        E.params.maxDets = [100]
        E.params.areaRng = [[0, 1e10]]
        E.params.areaRngLbl = ["all"]
        E.evaluate()
        E.accumulate()
    return E


@pytest.mark.parametrize("seed, thresholds", [(0, (0.4, 0.5, 0.6)), (1, (0.4, 0.5, 0.6)),
                                              (2, (0.5, 0.75)), (3, (0.4, 0.5, 0.6))])
def test_agrees_with_pycocotools(seed, thresholds):
    records, dets = random_case(seed, ties=seed % 2 == 1)
    E = cocoeval(records, dets, thresholds)
    ev = ZSDEvaluator(NAMES, ["c2", "c4"], "gzsd", iou_thresholds=thresholds, protocol="coco")
    ev.process(records, dets)
    res = evaluate_coco(ev.collect(), ev.eval_ids, thresholds)
    for k in range(len(NAMES)):
        for t in range(len(thresholds)):
            precision = E.eval["precision"][t, :, k, 0, 0]
            has_gt = (precision > -1).any()
            assert res.num_gt[k] > 0 if has_gt else res.num_gt[k] == 0
            ref_ap = precision.mean() if has_gt else 0.0
            ref_recall = max(E.eval["recall"][t, k, 0, 0], 0.0)
            assert abs(res.ap[k, t] - ref_ap) < 1e-9, (k, t)
            assert abs(res.recall[k, t] - ref_recall) < 1e-9, (k, t)
    # and through the metrics dict: group means of the per-class values, in percent
    m = ev.evaluate()
    k = NAMES.index("c2")
    assert m["classes"]["c2"]["ap"]["0.5"] == pytest.approx(100 * res.ap[k, thresholds.index(0.5)], abs=1e-4)


def test_coco_iou_crowd_uses_detection_area():
    det = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    gt = np.array([[0, 0, 20, 20], [0, 0, 20, 20], [10, 10, 20, 20]], float)
    iou = coco_iou(det, gt, np.array([False, True, False]))
    np.testing.assert_allclose(iou, [100 / 400, 1.0, 0.0])


def test_second_best_box_after_the_best_is_taken():
    # COCO lets a detection fall back to a free box: gts G1, G2 side by side; det1 on G1;
    # det2 overlaps G1 best (taken) and G2 enough -> matches G2 (mmdet-v1 would count a FP)
    g1, g2 = [0, 0, 40, 40], [4, 0, 44, 40]
    records = [ImageRecord(1, "", 64, 64, [g1, g2], [1, 1], [False, False])]
    dets = [{"boxes": np.array([g1, [1, 0, 41, 40]], np.float32), "scores": np.array([0.9, 0.8]),
             "labels": np.array([1, 1])}]
    E = cocoeval(records, dets, (0.5,))
    ev = ZSDEvaluator(NAMES, ["c2"], "gzsd", iou_thresholds=(0.5,), protocol="coco")
    ev.process(records, dets)
    m = ev.evaluate()
    assert m["classes"]["c1"]["recall"]["0.5"] == 100.0 == 100 * E.eval["recall"][0, 0, 0, 0]


def crowded_case(seed, n_images=6, per_image=300):
    """``per_image`` detections on every image, spread over all classes (COCOeval keeps the best
    100 per image and class, not per image)."""
    rng = np.random.default_rng(seed)
    records, dets = [], []
    for i in range(n_images):
        n = 8
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.c_[xy, xy + rng.uniform(8, 40, (n, 2))]
        labels = rng.integers(1, 5, n)
        records.append(ImageRecord(i + 1, "", 128, 128, boxes, labels, np.zeros(n, bool)))
        src = rng.integers(0, n, per_image)
        db = boxes[src] + rng.normal(0, 6, (per_image, 4))
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        dl = np.where(rng.random(per_image) < 0.5, labels[src], rng.integers(1, 5, per_image))
        dets.append({"boxes": db.astype(np.float32), "scores": rng.random(per_image), "labels": dl})
    return records, dets


def test_coco_caps_per_image_and_class_like_cocoeval():
    records, dets = crowded_case(0)
    thresholds = (0.5,)
    E = cocoeval(records, dets, thresholds)
    ev = ZSDEvaluator(NAMES, ["c2", "c4"], "gzsd", iou_thresholds=thresholds, protocol="coco")
    ev.process(records, dets)
    m = ev.evaluate()
    for k, name in enumerate(NAMES):
        ref_ap = 100 * E.eval["precision"][0, :, k, 0, 0].mean()
        ref_recall = 100 * E.eval["recall"][0, k, 0, 0]
        assert m["classes"][name]["ap"]["0.5"] == pytest.approx(ref_ap, abs=1e-4), name
        assert m["classes"][name]["recall"]["0.5"] == pytest.approx(ref_recall, abs=1e-4), name
    # up to 100 detections per image AND class count, far more than 100 per image
    capped = sum(min(int((d["labels"] == c).sum()), 100) for d in dets for c in range(1, 5))
    assert sum(m["classes"][n]["num_dets"] for n in NAMES) == capped > 2 * 6 * 100
    # mmdet-v1 keeps its budget of 100 per image over all classes
    ev1 = ZSDEvaluator(NAMES, ["c2", "c4"], "gzsd", iou_thresholds=thresholds, protocol="mmdet-v1")
    ev1.process(records, dets)
    assert sum(ev1.evaluate()["classes"][n]["num_dets"] for n in NAMES) == 6 * 100
