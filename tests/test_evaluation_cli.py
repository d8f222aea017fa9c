"""``vldus evaluate``: files in, table and metrics JSON out; bad input is one line and exit 2."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vldus import cli
from vldus.evaluation import ZSDEvaluator
from vldus.evaluation.cli import read_detections, read_ground_truth

# categories deliberately listed out of id order: classes are ordered by id (cat, dog, cow, car)
CATEGORIES = [{"id": 9, "name": "car"}, {"id": 1, "name": "cat"}, {"id": 4, "name": "dog"},
              {"id": 6, "name": "cow"}]
DOG, CAT, CAR = 4, 1, 9


def gt_file(tmp_path, annotations, n_images=3):
    images = [{"id": 10 + i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(n_images)]
    anns = [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": bbox,
             "area": bbox[2] * bbox[3], "iscrowd": crowd}
            for i, (img, cat, bbox, crowd) in enumerate(annotations)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return str(path)


def dets_file(tmp_path, entries, name="dets.json"):
    path = tmp_path / name
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return str(path)


def d(img, cat, bbox, score):
    return {"image_id": img, "category_id": cat, "bbox": bbox, "score": score}


def evaluate(capsys, *args):
    rc = cli.main(["evaluate", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_end_to_end_gzsd(tmp_path, capsys):
    # image 10: dog found (T); image 11: cat found, plus a FP cat ranked first (F T -> AP 50);
    # image 12: no annotation, a car det there is a FP for car (car has no gt: left out of means)
    gt = gt_file(tmp_path, [(10, DOG, [10, 10, 30, 30], 0), (11, CAT, [50, 50, 20, 20], 0)])
    dets = dets_file(tmp_path, [d(10, DOG, [10, 10, 30, 30], 0.9), d(11, CAT, [0, 0, 10, 10], 0.95),
                                d(11, CAT, [50, 50, 20, 20], 0.8), d(12, CAR, [5, 5, 10, 10], 0.7)])
    out = tmp_path / "sub" / "m.json"
    rc, stdout, _ = evaluate(capsys, "--ann", gt, "--dets", dets, "--unseen", "dog,car",
                             "--setting", "gzsd", "--out", str(out))
    assert rc == 0
    m = json.loads(out.read_text())
    assert list(m["classes"]) == ["cat", "dog", "cow", "car"]  # category id order 1, 4, 6, 9
    assert m["classes"]["cat"]["ap"]["0.5"] == 50.0 and m["classes"]["dog"]["ap"]["0.5"] == 100.0
    assert m["classes"]["car"]["num_gt"] == 0 and m["classes"]["car"]["num_dets"] == 1
    assert m["groups"]["seen"]["map"]["0.5"] == 50.0 and m["groups"]["unseen"]["map"]["0.5"] == 100.0
    assert m["hm"]["map"]["0.5"] == pytest.approx(66.6667, abs=1e-4)
    assert "mean unseen" in stdout and "AP@0.5" in stdout


def test_cli_equals_in_process_evaluator(tmp_path, capsys):
    # same records and detections through files and through ZSDEvaluator: identical metrics
    rng = np.random.default_rng(0)
    anns, entries = [], []
    for img in (10, 11, 12):
        for _ in range(4):
            x, y, w, h = (float(v) for v in rng.uniform(0, 50, 2).tolist() + rng.uniform(5, 40, 2).tolist())
            cat = int(rng.choice([CAT, DOG, CAR]))
            anns.append((img, cat, [x, y, w, h], int(rng.random() < 0.2)))
            for _ in range(2):
                j = rng.normal(0, 3, 4)
                entries.append(d(img, cat, [x + j[0], y + j[1], w + abs(j[2]), h + abs(j[3])], float(rng.random())))
    gt = gt_file(tmp_path, anns)
    dets = dets_file(tmp_path, entries)
    out = tmp_path / "m.json"
    assert evaluate(capsys, "--ann", gt, "--dets", dets, "--unseen", "dog,car", "--setting", "gzsd",
                    "--out", str(out))[0] == 0
    classes, cat_ids, records = read_ground_truth(gt, drop_small=True)
    ev = ZSDEvaluator(classes, ["dog", "car"], "gzsd")
    ev.process(records, read_detections(dets, records, cat_ids, gt))
    assert json.loads(out.read_text()) == json.loads(json.dumps(ev.evaluate()))


def test_protocol_coco_matches_pycocotools_on_files(tmp_path, capsys):
    rng = np.random.default_rng(1)
    anns, entries = [], []
    for img in (10, 11, 12):
        for _ in range(5):
            x, y, w, h = (float(v) for v in rng.uniform(0, 50, 2).tolist() + rng.uniform(5, 40, 2).tolist())
            cat = int(rng.choice([CAT, DOG]))
            anns.append((img, cat, [x, y, w, h], int(rng.random() < 0.2)))
            for _ in range(3):
                j = rng.normal(0, 4, 4)
                entries.append(d(img, cat, [x + j[0], y + j[1], w + abs(j[2]), h + abs(j[3])], float(rng.random())))
    gt, dets = gt_file(tmp_path, anns), dets_file(tmp_path, entries)
    out = tmp_path / "m.json"
    assert evaluate(capsys, "--ann", gt, "--dets", dets, "--unseen", "dog", "--setting", "gzsd",
                    "--protocol", "coco", "--iou", "0.5", "0.75", "--out", str(out))[0] == 0
    m = json.loads(out.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        E = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        E.params.iouThrs = np.array([0.5, 0.75])
        E.params.maxDets = [100]
        E.params.areaRng, E.params.areaRngLbl = [[0, 1e10]], ["all"]
        E.evaluate()
        E.accumulate()
    for k, name in enumerate(["cat", "dog"]):  # E.params.catIds sorted: 1 (cat), 4 (dog)
        for t, key in enumerate(["0.5", "0.75"]):
            assert m["classes"][name]["ap"][key] == pytest.approx(100 * E.eval["precision"][t, :, k, 0, 0].mean(), abs=1e-4)
            assert m["classes"][name]["recall"][key] == pytest.approx(100 * E.eval["recall"][t, k, 0, 0], abs=1e-4)


def test_mmdet_v1_reads_boxes_like_mmdet_1x(tmp_path, capsys):
    # mmdet 1.x loaded [x, y, w, h] as [x, y, x + w - 1, y + h - 1] and used +1 areas:
    # gt [0, 0, 10, 10] and det [0, 0, 10, 5] are 100 and 50 pixels -> IoU 0.5 exactly (TP at 0.5)
    gt = gt_file(tmp_path, [(10, DOG, [0, 0, 10, 10], 0)], n_images=1)
    dets = dets_file(tmp_path, [d(10, DOG, [0, 0, 10, 5], 0.9)])
    out = tmp_path / "m.json"
    assert evaluate(capsys, "--ann", gt, "--dets", dets, "--unseen", "dog", "--setting", "zsd",
                    "--out", str(out))[0] == 0
    assert json.loads(out.read_text())["classes"]["dog"]["ap"] == {"0.4": 100.0, "0.5": 100.0, "0.6": 0.0}


def test_small_boxes_dropped_for_mmdet_v1_only(tmp_path, capsys):
    gt = gt_file(tmp_path, [(10, DOG, [0, 0, 0.5, 10], 0), (10, DOG, [20, 20, 10, 10], 0)], n_images=1)
    dets = dets_file(tmp_path, [d(10, DOG, [20, 20, 10, 10], 0.9)])
    out = tmp_path / "m.json"
    for protocol, num_gt in (("mmdet-v1", 1), ("coco", 2)):
        assert evaluate(capsys, "--ann", gt, "--dets", dets, "--unseen", "dog", "--setting", "zsd",
                        "--protocol", protocol, "--out", str(out))[0] == 0
        assert json.loads(out.read_text())["classes"]["dog"]["num_gt"] == num_gt


def test_no_detections_and_every_image_scored(tmp_path, capsys):
    gt = gt_file(tmp_path, [(10, DOG, [10, 10, 30, 30], 0)])
    out = tmp_path / "m.json"
    rc, _, _ = evaluate(capsys, "--ann", gt, "--dets", dets_file(tmp_path, []), "--unseen", "dog",
                        "--setting", "zsd", "--out", str(out))
    assert rc == 0
    dog = json.loads(out.read_text())["classes"]["dog"]
    assert dog["ap"]["0.5"] == 0.0 and dog["recall"]["0.5"] == 0.0
    # a FP on image 12, which has no annotation at all, still counts: T then F -> AP 100;
    # F (0.95 on image 12) then T -> AP 50
    dets = dets_file(tmp_path, [d(12, DOG, [0, 0, 5, 5], 0.95), d(10, DOG, [10, 10, 30, 30], 0.9)])
    evaluate(capsys, "--ann", gt, "--dets", dets, "--unseen", "dog", "--setting", "zsd", "--out", str(out))
    assert json.loads(out.read_text())["classes"]["dog"]["ap"]["0.5"] == 50.0


def test_more_than_100_detections_per_image_are_capped(tmp_path, capsys, caplog):
    gt = gt_file(tmp_path, [(10, DOG, [10, 10, 30, 30], 0)], n_images=1)
    entries = [d(10, CAT, [50, 50, 10, 10], 0.5 + i / 1000) for i in range(100)]
    entries.append(d(10, DOG, [10, 10, 30, 30], 0.1))  # the 101st by score
    out = tmp_path / "m.json"
    rc, _, _ = evaluate(capsys, "--ann", gt, "--dets", dets_file(tmp_path, entries), "--unseen", "dog",
                        "--setting", "gzsd", "--out", str(out))
    assert rc == 0 and "more than 100 detections" in caplog.text
    assert json.loads(out.read_text())["classes"]["dog"]["recall"]["0.5"] == 0.0


GOOD = d(10, DOG, [1, 2, 3, 4], 0.5)


@pytest.mark.parametrize("dets, expect", [
    ("[{\"image_id\": 10,", ["dets.json", "line 1", "malformed JSON"]),
    ({"image_id": 10}, ["dets.json", "top level", "list"]),
    ([GOOD, {"category_id": DOG, "bbox": [1, 2, 3, 4], "score": 0.5}], ["dets.json", "entry 1", "image_id"]),
    ([GOOD, GOOD, d(10, DOG, [1, 2, 3], 0.5)], ["dets.json", "entry 2", "bbox"]),
    ([d(10, DOG, [1, 2, -3, 4], 0.5)], ["dets.json", "entry 0", "negative width"]),
    ([d(10, DOG, [1, 2, 3, 4], "high")], ["dets.json", "entry 0", "score"]),
    ([d(10, DOG, [1, 2, 3, 4], None)], ["dets.json", "entry 0", "score"]),
    ([d("10", DOG, [1, 2, 3, 4], 0.5)], ["dets.json", "entry 0", "image_id", "integer"]),
    ([GOOD, d(77, DOG, [1, 2, 3, 4], 0.5)], ["dets.json", "entry 1", "image_id 77", "gt.json"]),
    ([GOOD, GOOD, d(10, 5, [1, 2, 3, 4], 0.5)], ["dets.json", "entry 2", "category_id 5", "gt.json"]),
])
def test_bad_detections_file(tmp_path, capsys, dets, expect):
    gt = gt_file(tmp_path, [(10, DOG, [10, 10, 30, 30], 0)])
    rc, _, err = evaluate(capsys, "--ann", gt, "--dets", dets_file(tmp_path, dets), "--unseen", "dog",
                          "--setting", "zsd")
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("vldus evaluate: error: ")
    for word in expect:
        assert word in err


@pytest.mark.parametrize("changes, expect", [
    ({"--unseen": "dog,horse"}, ["gt.json", "--unseen", "'horse'"]),
    ({"--excluded": "zebra"}, ["gt.json", "--excluded", "'zebra'"]),
    ({"--excluded": "dog"}, ["gt.json", "--excluded"]),
    ({"--iou": "1.5"}, ["--iou", "1.5"]),
    ({"--dets": "MISSING.json"}, ["MISSING.json", "not found"]),
    ({"--ann": "MISSING.json"}, ["MISSING.json", "not found"]),
])
def test_bad_arguments(tmp_path, capsys, changes, expect):
    options = {"--ann": gt_file(tmp_path, [(10, DOG, [10, 10, 30, 30], 0)]),
               "--dets": dets_file(tmp_path, [GOOD]), "--unseen": "dog", "--setting": "zsd"}
    options.update({k: str(tmp_path / v) if v == "MISSING.json" else v for k, v in changes.items()})
    rc, _, err = evaluate(capsys, *[x for item in options.items() for x in item])
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("vldus evaluate: error: ")
    for word in expect:
        assert word in err


@pytest.mark.parametrize("annotation, expect", [
    ((10, 99, [1, 1, 5, 5], 0), ["gt.json", "annotation 1", "category_id 99"]),
    ((10, DOG, [1, 1, -5, 5], 0), ["gt.json", "annotation 1", "negative"]),
    ((55, DOG, [1, 1, 5, 5], 0), ["gt.json", "annotation 1", "image_id 55"]),
])
def test_bad_ground_truth(tmp_path, capsys, annotation, expect):
    gt = gt_file(tmp_path, [annotation])
    rc, _, err = evaluate(capsys, "--ann", gt, "--dets", dets_file(tmp_path, []), "--unseen", "dog",
                          "--setting", "zsd")
    assert rc == 2 and err.count("\n") == 1
    for word in expect:
        assert word in err
