"""Protocol mmdet-v1 against a plain-loop transcription of mmdetection 1.x ``eval_map``.

The reference below is written from the published algorithm (per image, per class, detection by
detection, IoU pair by pair in float32); the vectorised protocol must give bit-identical AP and
recall on random data, score ties included.
"""
import numpy as np
import pytest

from vldus.data.records import ImageRecord
from vldus.evaluation import ZSDEvaluator
from vldus.evaluation.common import pair_up
from vldus.evaluation.mean_ap import area_ap, evaluate_mmdet_v1, image_rank, pixel_iou

EPS = np.finfo(np.float32).eps
C = 4


def iou_one(a, b):
    """One pair, inclusive pixels, float32 scalars."""
    one, zero = np.float32(1), np.float32(0)
    w = np.maximum(np.minimum(a[2], b[2]) - np.maximum(a[0], b[0]) + one, zero)
    h = np.maximum(np.minimum(a[3], b[3]) - np.maximum(a[1], b[1]) + one, zero)
    overlap = w * h
    return overlap / ((a[2] - a[0] + one) * (a[3] - a[1] + one) + (b[2] - b[0] + one) * (b[3] - b[1] + one) - overlap)


def reference_eval_map(records, dets, thr):
    """[(ap float32, final recall float32, num_gt)] per class 1..C, the slow way."""
    out = []
    for c in range(1, C + 1):
        tps, fps, scores, num_gt = [], [], [], 0
        for r, d in zip(records, dets):
            m = r.labels == c
            gt = np.vstack([r.boxes[m & ~r.ignore], r.boxes[m & r.ignore]]).astype(np.float32)
            gt_ignored = [False] * int((m & ~r.ignore).sum()) + [True] * int((m & r.ignore).sum())
            num_gt += int((m & ~r.ignore).sum())
            k = d["labels"] == c
            db, ds = d["boxes"][k].astype(np.float32), d["scores"][k].astype(np.float32)
            gt[:, 2:] -= np.float32(1)  # continuous -> inclusive, as mmdet 1.x loaded COCO
            db[:, 2:] -= np.float32(1)
            tp, fp = np.zeros(len(db), np.float32), np.zeros(len(db), np.float32)
            if len(gt) == 0:
                fp[:] = 1
            elif len(db):
                ious = np.array([[iou_one(x, g) for g in gt] for x in db], np.float32)
                best, arg = ious.max(axis=1), ious.argmax(axis=1)
                covered = [False] * len(gt)
                for i in np.argsort(-ds):
                    if float(best[i]) >= thr:
                        j = arg[i]
                        if gt_ignored[j]:
                            continue
                        if not covered[j]:
                            covered[j] = True
                            tp[i] = 1
                        else:
                            fp[i] = 1
                    else:
                        fp[i] = 1
            tps.append(tp), fps.append(fp), scores.append(ds)
        order = np.argsort(-np.concatenate(scores))
        tp = np.cumsum(np.concatenate(tps)[order])
        fp = np.cumsum(np.concatenate(fps)[order])
        recall = tp / np.maximum(np.array([num_gt]), EPS)
        precision = tp / np.maximum(tp + fp, EPS)
        mrec = [0.0] + list(recall) + [1.0]
        mpre = [0.0] + [float(p) for p in precision] + [0.0]
        for i in range(len(mpre) - 1, 0, -1):
            mpre[i - 1] = max(mpre[i - 1], mpre[i])
        steps = [(mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]]
        ap = np.float32(np.sum(np.array(steps)))
        out.append((ap, np.float32(recall[-1]) if len(recall) else np.float32(0), num_gt))
    return out


def random_case(seed, n_images=25, ties=False):
    rng = np.random.default_rng(seed)
    records, dets = [], []
    for i in range(n_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.c_[xy, xy + rng.uniform(2, 40, (n, 2))]
        labels = rng.integers(1, C + 1, n)
        records.append(ImageRecord(1000 - i, "", 128, 128, boxes, labels, rng.random(n) < 0.15))
        k = int(rng.integers(0, 15))
        if n:
            src = rng.integers(0, n, k)
            db = boxes[src] + rng.normal(0, 4, (k, 4))
            dl = np.where(rng.random(k) < 0.8, labels[src], rng.integers(1, C + 1, k))
        else:
            db, dl = np.zeros((k, 4)), rng.integers(1, C + 1, k)
        far = (rng.random(k) < 0.3) | (n == 0)
        fxy = rng.uniform(0, 80, (int(far.sum()), 2))
        db[far] = np.c_[fxy, fxy + rng.uniform(2, 40, (int(far.sum()), 2))]
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        scores = rng.random(k)
        if ties:  # many equal scores: ties inside an image and across images
            scores = np.round(scores, 1)
        dets.append({"boxes": db.astype(np.float32), "scores": scores, "labels": dl})
    return records, dets


@pytest.mark.parametrize("seed", range(6))
def test_bit_identical_to_reference_loop(seed):
    records, dets = random_case(seed, ties=seed % 2 == 1)
    thresholds = (0.4, 0.5, 0.7)
    ev = ZSDEvaluator([f"c{i}" for i in range(1, C + 1)], ["c2"], "gzsd", iou_thresholds=thresholds)
    ev.process(records, dets)
    res = evaluate_mmdet_v1(ev.collect(), ev.eval_ids, thresholds)
    assert res.ap.dtype == np.float32
    for t, thr in enumerate(thresholds):
        for k, (ap, recall, num_gt) in enumerate(reference_eval_map(records, dets, thr)):
            assert res.ap[k, t] == ap, (thr, k)
            assert res.recall[k, t] == recall, (thr, k)
            assert res.num_gt[k] == num_gt


def test_pixel_iou_matches_the_formula():
    a = np.array([[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 4, 4]], np.float32)
    b = np.array([[0, 0, 9, 4], [20, 20, 30, 30], [5, 5, 9, 9]], np.float32)
    np.testing.assert_array_equal(pixel_iou(a, b), np.float32([0.5, 0.0, 0.0]))
    c = np.array([[0, 0, 4, 4]], np.float32), np.array([[4, 4, 8, 8]], np.float32)
    assert pixel_iou(*c)[0] == np.float32(1 / 49)  # touching corner pixel: 1 px of 25 + 25 - 1


def test_area_ap_by_hand():
    # recall .5 .5 1, precision 1 .5 2/3 -> .5 * 1 + .5 * 2/3
    ap = area_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3], np.float32))
    assert ap == pytest.approx(0.5 + 1 / 3, abs=1e-7)
    assert area_ap(np.zeros(0), np.zeros(0, np.float32)) == 0.0


def test_image_rank_follows_argsort_on_ties():
    key = np.array([5, 5, 5, 7, 5, 7])
    neg = -np.array([0.3, 0.9, 0.3, 0.1, 0.3, 0.1], np.float32)
    rank = image_rank(key, neg)
    for k in (5, 7):
        members = np.nonzero(key == k)[0]
        expected = np.empty(len(members), np.int64)
        expected[np.argsort(neg[members])] = np.arange(len(members))
        np.testing.assert_array_equal(rank[members], expected)


def test_pair_up_groups_by_detection():
    pairs = pair_up(np.array([3, 1, 2, 3]), np.array([1, 3, 3]))
    assert pairs.det.tolist() == [0, 0, 1, 3, 3]
    assert pairs.gt.tolist() == [1, 2, 0, 1, 2]
    assert pairs.seg_det.tolist() == [0, 1, 3] and pairs.seg_start.tolist() == [0, 2, 3]


def crowded_ties_case(seed):
    """Two boxes per image, a dozen detections around them with only two distinct scores: which
    of several equal-score hits on a box is the TP decides the AP."""
    rng = np.random.default_rng(seed)
    records, dets = [], []
    for i in range(6):
        xy = rng.uniform(0, 80, (2, 2))
        boxes = np.c_[xy, xy + 30]
        records.append(ImageRecord(i + 1, "", 128, 128, boxes, [1, 1], [False, False]))
        db = boxes[rng.integers(0, 2, 12)] + rng.normal(0, 1.5, (12, 4))
        db[rng.random(12) < 0.3] += 60
        dets.append({"boxes": db.astype(np.float32), "scores": rng.choice([0.5, 0.6], 12),
                     "labels": np.ones(12, np.int64)})
    return records, dets


def test_score_ties_broken_like_the_reference():
    # numpy's default argsort is not stable (here even on 5 elements), so the per-image scan
    # order of equal scores must come from the same argsort call as in the reference
    for seed in range(10):
        records, dets = crowded_ties_case(seed)
        ev = ZSDEvaluator([f"c{i}" for i in range(1, C + 1)], ["c2"], "gzsd", iou_thresholds=(0.5,))
        ev.process(records, dets)
        res = evaluate_mmdet_v1(ev.collect(), ev.eval_ids, (0.5,))
        ap, recall, _ = reference_eval_map(records, dets, 0.5)[0]
        assert res.ap[0, 0] == ap and res.recall[0, 0] == recall, seed
