"""ZSDEvaluator on hand-worked cases: expected AP / recall are derived in the comments.

Notation: a detection sequence sorted by score, T = true positive, F = false positive,
I = neither (on an ignored box). mmdet-v1 AP = area under the precision envelope over the
recall steps; coco AP = mean of the envelope at the 101 recall points 0, 0.01, ..., 1.
"""
import json

import numpy as np
import pytest

from vldus.data.records import ImageRecord
from vldus.evaluation import ZSDEvaluator, format_table, harmonic_mean

CLASSES = ["cat", "dog", "cow", "car"]  # detector index 1..4
UNSEEN = ["dog", "car"]
BOTH = ["mmdet-v1", "coco"]


def rec(image_id, boxes=(), labels=(), ignore=None):
    ignore = [False] * len(labels) if ignore is None else ignore
    return ImageRecord(image_id, f"{image_id}.jpg", 200, 200, boxes, labels, ignore)


def det(boxes=(), scores=(), labels=()):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, float),
            "labels": np.asarray(labels, np.int64)}


def run(records, dets, setting="gzsd", protocol="mmdet-v1", **kw):
    ev = ZSDEvaluator(CLASSES, UNSEEN, setting, protocol=protocol, **kw)
    ev.process(records, dets)
    return ev.evaluate()


A = [10, 10, 50, 50]
B = [100, 100, 150, 160]
FAR = [160, 0, 190, 30]


@pytest.mark.parametrize("protocol", BOTH)
def test_perfect_result(protocol):
    # two images, one dog each, each found exactly: T T -> precision 1, recall 1, AP 100
    m = run([rec(1, [A], [2]), rec(2, [B], [2])],
            [det([A], [0.9], [2]), det([B], [0.8], [2])], "zsd", protocol)
    dog = m["classes"]["dog"]
    assert dog["ap"] == {"0.4": 100.0, "0.5": 100.0, "0.6": 100.0}
    assert dog["recall"]["0.5"] == 100.0 and dog["num_gt"] == 2 and dog["num_dets"] == 2
    assert m["groups"]["unseen"]["map"]["0.5"] == 100.0


@pytest.mark.parametrize("protocol", BOTH)
def test_false_positive_ranked_first(protocol):
    # F T: recall 0, 1; precision 0, 1/2; envelope 1/2 everywhere -> AP 50 (both protocols)
    m = run([rec(1, [A], [2])], [det([FAR, A], [0.9, 0.8], [2, 2])], "zsd", protocol)
    assert m["classes"]["dog"]["ap"]["0.5"] == 50.0
    assert m["classes"]["dog"]["recall"]["0.5"] == 100.0


def test_duplicate_on_covered_box():
    # gts A, B; dets: A 0.9, A again 0.8 (duplicate), B 0.7 -> T F T
    # recall .5 .5 1, precision 1 .5 2/3, envelope 1 2/3 2/3
    # mmdet-v1: .5 * 1 + .5 * 2/3 = 83.3333
    # coco: 51 recall points <= .5 at 1, 50 points above at 2/3 -> (51 + 100/3) / 101 = 83.4983
    records = [rec(1, [A, B], [2, 2])]
    dets = [det([A, A, B], [0.9, 0.8, 0.7], [2, 2, 2])]
    assert run(records, dets, "zsd")["classes"]["dog"]["ap"]["0.5"] == pytest.approx(83.3333, abs=1e-4)
    assert run(records, dets, "zsd", "coco")["classes"]["dog"]["ap"]["0.5"] == pytest.approx(83.4983, abs=1e-4)
    # a duplicate ranked last only adds an F after full recall: AP stays 100
    m = run([rec(1, [A], [2])], [det([A, A], [0.9, 0.8], [2, 2])], "zsd")
    assert m["classes"]["dog"]["ap"]["0.5"] == 100.0 and m["classes"]["dog"]["num_dets"] == 2


def test_missed_box():
    # gts A, B; one det on A: T -> recall .5, precision 1
    # mmdet-v1: .5 * 1 + .5 * 0 = 50; coco: 51 of 101 points at 1 = 50.495; recall 50 in both
    records, dets = [rec(1, [A, B], [2, 2])], [det([A], [0.9], [2])]
    mm, co = run(records, dets, "zsd"), run(records, dets, "zsd", "coco")
    assert mm["classes"]["dog"]["ap"]["0.5"] == 50.0
    assert co["classes"]["dog"]["ap"]["0.5"] == pytest.approx(100 * 51 / 101, abs=1e-4)
    assert mm["classes"]["dog"]["recall"]["0.5"] == co["classes"]["dog"]["recall"]["0.5"] == 50.0


@pytest.mark.parametrize("protocol", BOTH)
def test_crowd_or_difficult_hit_is_neither_tp_nor_fp(protocol):
    # gts: A (normal), B (ignored). dets: B 0.9, A 0.8 -> I T: tp 0 1, fp 0 0 -> AP 100.
    # (were the hit on B a FP, it would be F T -> AP 50); num_gt counts A only
    records = [rec(1, [A, B], [2, 2], [False, True])]
    m = run(records, [det([B, A], [0.9, 0.8], [2, 2])], "zsd", protocol)
    assert m["classes"]["dog"]["ap"]["0.5"] == 100.0
    assert m["classes"]["dog"]["num_gt"] == 1 and m["classes"]["dog"]["recall"]["0.5"] == 100.0


@pytest.mark.parametrize("protocol", BOTH)
def test_class_with_ground_truth_and_no_detections(protocol):
    # dog found perfectly (100), car has a gt and no detection (AP 0, recall 0): unseen mean 50
    m = run([rec(1, [A, B], [2, 4])], [det([A], [0.9], [2])], "zsd", protocol)
    car = m["classes"]["car"]
    assert car["num_gt"] == 1 and car["num_dets"] == 0
    assert car["ap"]["0.5"] == 0.0 and car["recall"]["0.5"] == 0.0
    assert m["groups"]["unseen"]["map"]["0.5"] == 50.0 and m["groups"]["unseen"]["recall"]["0.5"] == 50.0


@pytest.mark.parametrize("protocol", BOTH)
def test_class_with_detections_and_no_ground_truth(protocol):
    # car has detections but no gt: reported (num_gt 0), left out of the unseen mean (= dog's 100)
    m = run([rec(1, [A], [2])], [det([A, B], [0.9, 0.8], [2, 4])], "zsd", protocol)
    car = m["classes"]["car"]
    assert car["num_gt"] == 0 and car["num_dets"] == 1 and car["ap"]["0.5"] == 0.0
    assert m["groups"]["unseen"]["map"]["0.5"] == 100.0


@pytest.mark.parametrize("protocol", BOTH)
def test_no_detections_at_all(protocol):
    m = run([rec(1, [A], [2]), rec(2)], [det(), det()], "gzsd", protocol)
    assert m["classes"]["dog"]["ap"]["0.5"] == 0.0 and m["classes"]["dog"]["recall"]["0.5"] == 0.0
    assert m["groups"]["unseen"]["map"]["0.5"] == 0.0
    # no seen ground truth in these images: no seen mAP and no HM (never a silent 0.0)
    assert m["groups"]["seen"]["map"]["0.5"] is None and m["hm"]["map"]["0.5"] is None
    assert m["no_ground_truth"] == ["seen"]
    assert "no seen ground truth" in format_table(m)


@pytest.mark.parametrize("protocol", BOTH)
@pytest.mark.parametrize("n_better, found", [(99, True), (100, False)])
def test_at_most_100_detections_per_image(protocol, n_better, found):
    # the dog det has the lowest score; n_better higher-scored cow dets come first. mmdet-v1: with
    # 99 of them the dog det is the 100th and counts (recall 100); with 100 it is cut (recall 0).
    # coco: COCOeval caps per image AND class, so the only dog det always counts.
    found = found or protocol == "coco"
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (n_better, 2))
    boxes = np.r_[np.c_[xy, xy + 20], [A]]
    scores = np.r_[rng.uniform(0.5, 1.0, n_better), 0.1]
    labels = np.r_[np.full(n_better, 3), 2]
    m = run([rec(1, [A], [2])], [det(boxes, scores, labels)], "gzsd", protocol)
    assert m["classes"]["dog"]["recall"]["0.5"] == (100.0 if found else 0.0)
    assert m["classes"]["cow"]["num_dets"] == n_better  # cow dets all kept
    assert m["classes"]["dog"]["num_dets"] == int(found)


def test_max_dets_per_image_is_an_option():
    boxes = [A, B]
    m = run([rec(1, [A, B], [2, 2])], [det(boxes, [0.9, 0.8], [2, 2])], "zsd", max_dets_per_image=1)
    assert m["classes"]["dog"]["recall"]["0.5"] == 50.0


def test_plus_one_pixel_iou_at_the_threshold_boundary_inclusive_boxes():
    # mmdet 1.x inclusive pixels: gt [0,0,9,9] is 10x10 = 100 px, det [0,0,9,4] is 10x5 = 50 px,
    # all inside the gt: IoU = 50 / 100 = 0.5 exactly -> TP at 0.4 and 0.5, FP at 0.6.
    # (without the +1, 9*4 / 9*9 = 0.444 would be a FP at 0.5)
    m = run([rec(1, [[0, 0, 9, 9]], [2])], [det([[0, 0, 9, 4]], [0.9], [2])], "zsd",
            inclusive_boxes=True)
    assert m["classes"]["dog"]["ap"] == {"0.4": 100.0, "0.5": 100.0, "0.6": 0.0}


def test_plus_one_pixel_iou_on_continuous_boxes():
    # continuous boxes are mmdet 1.x boxes with x2, y2 one pixel further: gt [0,0,10,10] and
    # det [0,0,10,5] are the case above (IoU 0.5, TP at 0.5); det [0,0,10,4.9] has IoU 0.49
    # (FP at 0.5, TP at 0.4). Applying +1 to the continuous coordinates directly would give
    # 11 * 5.9 / 121 = 0.536 and make it a TP at 0.5.
    gt = [rec(1, [[0, 0, 10, 10]], [2])]
    assert run(gt, [det([[0, 0, 10, 5]], [0.9], [2])], "zsd")["classes"]["dog"]["ap"]["0.5"] == 100.0
    m = run(gt, [det([[0, 0, 10, 4.9]], [0.9], [2])], "zsd")
    assert m["classes"]["dog"]["ap"] == {"0.4": 100.0, "0.5": 0.0, "0.6": 0.0}


def test_threshold_compared_in_float64_like_the_published_code():
    # inclusive gt 10x10, det 10x7 inside it: float32 IoU = f32(0.7) = 0.69999999 < 0.7.
    # mmdet 1.x compared numpy scalars, promoted to float64 by numpy 1.x: a FP at IoU 0.7.
    m = run([rec(1, [[0, 0, 9, 9]], [2])], [det([[0, 0, 9, 6]], [0.9], [2])], "zsd",
            iou_thresholds=(0.7,), inclusive_boxes=True)
    assert m["classes"]["dog"]["ap"]["0.7"] == 0.0


def test_best_box_is_taken_even_when_covered_mmdet_v1():
    # mmdet-v1 compares a detection only with its highest-IoU box: gts A and A' (shifted);
    # det1 exactly on A (0.9) covers A; det2 (0.8) overlaps A best and A' above 0.5 too, but is
    # a duplicate on A -> F (COCO would fall back to A' and make it a T).
    a2 = [14, 10, 54, 50]
    d2 = [12, 10, 52, 50]  # IoU with A 0.905, with A' 0.905 - tie broken by order -> A
    records = [rec(1, [A, a2], [2, 2])]
    dets = [det([A, d2], [0.9, 0.8], [2, 2])]
    mm = run(records, dets, "zsd", iou_thresholds=(0.5,))
    co = run(records, dets, "zsd", "coco", iou_thresholds=(0.5,))
    assert mm["classes"]["dog"]["recall"]["0.5"] == 50.0  # T F
    assert co["classes"]["dog"]["recall"]["0.5"] == 100.0  # T T


def test_zsd_counts_unseen_annotations_only():
    # a seen cat gt and a cat det: in zsd neither is evaluated; the classes are the unseen ones
    m = run([rec(1, [A, B], [1, 2])], [det([A, B], [0.9, 0.8], [1, 2])], "zsd")
    assert set(m["classes"]) == {"dog", "car"}
    assert set(m["groups"]) == {"unseen"} and "hm" not in m
    assert m["groups"]["unseen"]["map"]["0.5"] == 100.0


def test_gzsd_groups_hm_and_excluded_class():
    # cat (seen) AP 100; dog (unseen): F T -> 50; cow excluded: never reported
    # HM = 2 * 100 * 50 / 150 = 66.6667; recall HM = 100
    records = [rec(1, [A, B, FAR], [1, 2, 3])]
    dets = [det([A, FAR, B, FAR], [0.9, 0.9, 0.8, 0.7], [1, 2, 2, 3])]
    ev = ZSDEvaluator(CLASSES, UNSEEN, "gzsd", excluded=["cow"])
    ev.process(records, dets)
    m = ev.evaluate()
    assert "cow" not in m["classes"]
    assert m["groups"]["seen"]["map"]["0.5"] == 100.0 and m["groups"]["unseen"]["map"]["0.5"] == 50.0
    assert m["hm"]["map"]["0.5"] == pytest.approx(66.6667, abs=1e-4)
    assert m["hm"]["recall"]["0.5"] == 100.0


def test_seen_setting_for_training_time_validation():
    ev = ZSDEvaluator(CLASSES, (), "seen")  # no unseen classes: every class in group "seen"
    ev.process([rec(1, [A, B], [1, 2])], [det([A], [0.9], [1])])
    m = ev.evaluate()
    assert set(m["groups"]) == {"seen"} and set(m["classes"]) == set(CLASSES)
    assert m["groups"]["seen"]["map"]["0.5"] == 50.0  # cat 100, dog 0 (cow, car have no gt)


@pytest.mark.parametrize("setting", ["zsd", "gzsd"])
@pytest.mark.parametrize("protocol", BOTH)
def test_metrics_json_schema(setting, protocol):
    records = [rec(1, [A, B], [1, 2]), rec(2, [FAR], [4])]
    dets = [det([A, B, FAR], [0.9, 0.6, 0.3], [1, 2, 4]), det([FAR], [0.5], [4])]
    m = json.loads(json.dumps(run(records, dets, setting, protocol)))  # JSON-serializable
    expected_keys = {"setting", "protocol", "iou_thresholds", "classes", "groups"}
    assert set(m) == (expected_keys | {"hm"} if setting == "gzsd" else expected_keys)
    assert m["setting"] == setting and m["protocol"] == protocol
    assert m["iou_thresholds"] == [0.4, 0.5, 0.6]
    keys = {"0.4", "0.5", "0.6"}
    for c in m["classes"].values():
        assert set(c) == {"group", "num_gt", "num_dets", "ap", "recall"}
        assert c["group"] in ("seen", "unseen")
        assert isinstance(c["num_gt"], int) and isinstance(c["num_dets"], int)
        assert set(c["ap"]) == set(c["recall"]) == keys
        assert all(0.0 <= v <= 100.0 for v in list(c["ap"].values()) + list(c["recall"].values()))
    assert set(m["groups"]) == ({"seen", "unseen"} if setting == "gzsd" else {"unseen"})
    for g in m["groups"].values():
        assert set(g) == {"map", "recall"} and set(g["map"]) == set(g["recall"]) == keys
    # percentages, not fractions: car found perfectly in image 2 -> 100
    assert m["classes"]["car"]["ap"]["0.5"] == 100.0
    if setting == "gzsd":
        assert set(m["hm"]) == {"map", "recall"} and set(m["hm"]["map"]) == keys


def test_iou_keys_keep_needed_decimals():
    m = run([rec(1, [A], [2])], [det([A], [0.9], [2])], "zsd", iou_thresholds=(0.5, 0.75))
    assert set(m["classes"]["dog"]["ap"]) == {"0.5", "0.75"}


def test_harmonic_mean():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(100.0, 50.0) == pytest.approx(200 / 3)


def test_format_table_rows():
    m = run([rec(1, [A, B], [1, 2])], [det([A, B], [0.9, 0.8], [1, 2])], "gzsd")
    text = format_table(m)
    lines = text.splitlines()
    assert "AP@0.5" in lines[1] and "R@0.6" in lines[1]
    assert any(line.startswith("cat") and "100.00" in line for line in lines)
    assert any(line.startswith("mean unseen") for line in lines)
    assert lines[-1].startswith("HM")


def test_reset_and_batches():
    ev = ZSDEvaluator(CLASSES, UNSEEN, "zsd")
    ev.process([rec(1, [A], [2])], [det([FAR], [0.9], [2])])
    ev.reset()
    ev.process([rec(1, [A], [2])], [det([A], [0.9], [2])])  # same image id again after reset
    ev.process([rec(2, [B], [2])], [det([B], [0.8], [2])])  # a second batch
    m = ev.evaluate()
    assert m["classes"]["dog"]["ap"]["0.5"] == 100.0 and m["classes"]["dog"]["num_gt"] == 2


def test_process_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    d = {"boxes": torch.tensor([A], dtype=torch.float32), "scores": torch.tensor([0.9]),
         "labels": torch.tensor([2])}
    m = run([rec(1, [A], [2])], [d], "zsd")
    assert m["classes"]["dog"]["ap"]["0.5"] == 100.0


@pytest.mark.parametrize("records, dets, match", [
    ([rec(1)], [], "1 records but 0"),
    ([rec(1)], [det([A], [0.9], [5])], "label outside"),
    ([rec(1)], [det([A], [0.9, 0.8], [2])], "differ in length"),
    ([rec(1)], [det([[10, 10, 5, 50]], [0.9], [2])], "x2 < x1"),
    ([rec(1)], [det([A], [float("nan")], [2])], "non-finite"),
    ([rec(1), rec(1)], [det(), det()], "processed twice"),
])
def test_process_rejects_bad_calls(records, dets, match):
    ev = ZSDEvaluator(CLASSES, UNSEEN, "zsd")
    with pytest.raises(ValueError, match=match):
        ev.process(records, dets)


def test_constructor_checks():
    with pytest.raises(ValueError, match="setting"):
        ZSDEvaluator(CLASSES, UNSEEN, "all")
    with pytest.raises(ValueError, match="protocol"):
        ZSDEvaluator(CLASSES, UNSEEN, "zsd", protocol="voc07")
    with pytest.raises(ValueError, match="not in"):
        ZSDEvaluator(CLASSES, UNSEEN, "zsd", iou_thresholds=(0.5, 1.5))
    from vldus.errors import InputError
    with pytest.raises(InputError, match="horse"):
        ZSDEvaluator(CLASSES, ["horse"], "zsd")
