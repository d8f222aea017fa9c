"""The error breakdown (vldus.evaluation.breakdown) on hand-made detections, one error of each kind."""
import json

import numpy as np
import pytest

from vldus import cli
from vldus.data.records import ImageRecord
from vldus.evaluation.breakdown import KINDS, error_breakdown, format_breakdown, markdown_summary

CLASSES = ["cat", "dog", "fox", "owl"]  # detector index 1..4
UNSEEN = ["fox", "owl"]
CAT, DOG, FOX, OWL = 1, 2, 3, 4

# one 200 x 200 image: fox A and B, owl O and M (unseen), cat C and dog D (seen)
GT = [([10, 10, 50, 50], FOX),  # A: found by a perfect detection, then a duplicate
      ([100, 100, 140, 140], FOX),  # B: only a box too short (IoU 0.375): loc
      ([10, 100, 50, 140], OWL),  # O: boxed exactly, labelled fox: cls_unseen
      ([160, 60, 190, 90], OWL),  # M: nothing near it: missed
      ([100, 10, 140, 50], CAT),  # C: boxed exactly, labelled fox: cls_seen
      ([150, 150, 190, 190], DOG)]  # D: a fox box with IoU 0.375: both
DETS = [([60, 160, 80, 180], FOX, 0.95),  # bkg, ranked above the true positive
        ([10, 10, 50, 50], FOX, 0.9),  # the true positive on A
        ([11, 11, 51, 51], FOX, 0.8),  # dupe on A
        ([100, 10, 140, 50], FOX, 0.7),  # cls_seen on C
        ([10, 100, 50, 140], FOX, 0.6),  # cls_unseen on O
        ([100, 100, 140, 115], FOX, 0.5),  # loc on B
        ([150, 150, 190, 165], FOX, 0.4)]  # both on D


def _record(gt, image_id=1):
    return ImageRecord(image_id, f"{image_id}.png", 200, 200, [b for b, _ in gt], [c for _, c in gt],
                       [False] * len(gt))


def _dets(dets):
    return {"boxes": np.array([b for b, _, _ in dets], np.float32).reshape(-1, 4),
            "labels": np.array([c for _, c, _ in dets], np.int64),
            "scores": np.array([s for _, _, s in dets])}


def _breakdown(setting="zsd", gt=GT, dets=DETS):
    return error_breakdown([_record(gt)], [_dets(dets)], CLASSES, UNSEEN, setting, 0.5)


def test_one_error_of_each_kind():
    b = _breakdown()
    assert {k: v["count"] for k, v in b["kinds"].items()} == dict.fromkeys(KINDS, 1)
    # only the background box ranks above fox's last (only) true positive
    assert {k: v["before_last_tp"] for k, v in b["kinds"].items()} == {
        "cls_seen": 0, "cls_unseen": 0, "loc": 0, "both": 0, "dupe": 0, "bkg": 1, "missed": None}
    fox, owl = b["classes"]["fox"], b["classes"]["owl"]
    assert fox["tp"] == 1 and owl["tp"] == 0
    assert fox["errors"] == {**dict.fromkeys(KINDS, 1), "missed": 0}
    assert owl["errors"] == {**dict.fromkeys(KINDS, 0), "missed": 1}
    assert b["objects_not_evaluated"] == 2 and set(b["classes"]) == {"fox", "owl"}


def test_map_if_fixed_by_hand():
    # fox: FP, TP, FP x 5 -> AP = 0.5 x 1/2 = 0.25; owl: no detection -> 0; mAP 12.5
    b = _breakdown()
    assert b["map"]["unseen"] == pytest.approx(12.5, abs=1e-3)
    gain = {k: v["map_gain"]["unseen"] for k, v in b["kinds"].items()}
    assert gain == pytest.approx({
        "bkg": 12.5,  # fox AP 0.5
        "loc": 100 * (0.5 * 0.5 + 0.5 * 2 / 6 - 0.25) / 2,  # B found at rank 6
        "cls_unseen": 25.0,  # the box becomes owl's true positive on O: owl AP 0.5
        "missed": 25.0,  # a perfect owl detection on M: owl AP 0.5
        "cls_seen": 0.0, "dupe": 0.0, "both": 0.0,  # removed after fox's last true positive
    }, abs=1e-3)
    assert b["classes"]["owl"]["ap_gain"]["cls_unseen"] == pytest.approx(50.0, abs=1e-3)


def test_fixing_the_only_false_positive_gives_ap_one():
    gt = [([10, 10, 50, 50], FOX), ([100, 100, 140, 140], FOX)]
    dets = [([10, 10, 50, 50], FOX, 0.9), ([60, 160, 80, 180], FOX, 0.8), ([100, 100, 140, 140], FOX, 0.7)]
    b = _breakdown(gt=gt, dets=dets)
    assert b["kinds"]["bkg"]["count"] == 1 and b["kinds"]["bkg"]["before_last_tp"] == 1
    assert sum(k["count"] for k in b["kinds"].values()) == 1
    ap = 0.5 + 0.5 * 2 / 3
    assert b["classes"]["fox"]["ap"] == pytest.approx(100 * ap, abs=1e-3)
    assert b["classes"]["fox"]["ap"] + b["classes"]["fox"]["ap_gain"]["bkg"] == pytest.approx(100.0, abs=1e-3)


def test_gzsd_fixes_a_seen_confusion_into_a_seen_true_positive():
    b = _breakdown("gzsd")
    assert b["kinds"]["missed"]["count"] == 2  # owl M and the dog (the "both" box does not claim it)
    assert b["classes"]["cat"]["ap_gain"]["cls_seen"] == pytest.approx(100.0, abs=1e-3)
    assert set(b["kinds"]["loc"]["map_gain"]) == {"seen", "unseen", "hm"}
    assert b["kinds"]["cls_seen"]["map_gain"]["seen"] == pytest.approx(50.0, abs=1e-3)  # cat 0 -> 1, dog 0


def test_without_seen_ground_truth_the_seen_confusion_is_background():
    unseen_only = [g for g in GT if g[1] in (FOX, OWL)]
    b = _breakdown(gt=unseen_only)
    # the boxes on the cat and on the dog now overlap nothing
    assert (b["kinds"]["cls_seen"]["count"], b["kinds"]["both"]["count"], b["kinds"]["bkg"]["count"]) == (0, 0, 3)
    assert "no object of a seen class" in format_breakdown(b)


def test_tables():
    b = _breakdown()
    text = format_breakdown(b)
    assert "cls_unseen" in text and "+25.00" in text and "owl" in text
    md = markdown_summary({"row": b})
    assert md.splitlines()[2].startswith("| row | 12.5 | 1 (+0.0) | 1 (+25.0) |")


def _write_coco(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 200, "height": 200}]
    cats = [{"id": 10 * (i + 1), "name": n} for i, n in enumerate(CLASSES)]
    anns = [{"id": k + 1, "image_id": 1, "category_id": 10 * c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0} for k, (b, c) in enumerate(GT)]
    dets = [{"image_id": 1, "category_id": 10 * c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            for b, c, s in DETS]
    ann, det = tmp_path / "gt.json", tmp_path / "dets.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    det.write_text(json.dumps(dets))
    return str(ann), str(det)


def test_evaluate_cli_writes_the_breakdown(tmp_path, capsys):
    ann, det = _write_coco(tmp_path)
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", "--ann", ann, "--dets", det, "--unseen", "fox,owl", "--setting", "zsd",
                     "--breakdown", "--out", str(out)]) == 0
    assert "error breakdown" in capsys.readouterr().out
    saved = json.loads(out.read_text())["breakdown"]
    assert saved["kinds"]["cls_seen"]["count"] == 1 and saved["map"]["unseen"] == pytest.approx(12.5, abs=1e-3)
    assert cli.main(["evaluate", "--ann", ann, "--dets", det, "--unseen", "fox,owl", "--setting", "zsd",
                     "--protocol", "coco", "--breakdown"]) == 2
    assert "--breakdown" in capsys.readouterr().err
