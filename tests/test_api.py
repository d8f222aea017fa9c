"""vldus.api.ZeroShotDetector and `vldus detect` on the quick demo's exported model
(tests/quick_demo_run.py): class names given at run time, synthesis on the fly."""
import json
import os

import numpy as np
import pytest
import torch

from quick_demo_run import first_image, quick_bundle, quick_demo
from vldus import cli
from vldus.api import ZeroShotDetector

pytestmark = pytest.mark.timeout(600)
UNSEEN_MAP_FLOOR = 30.0  # percent, mAP@0.5 of the demo's unseen classes named at run time


@pytest.fixture(scope="module")
def bundle() -> str:
    return quick_bundle()


@pytest.fixture(scope="module")
def test_records():
    from vldus.config import load_config
    from vldus.data.readers import load_records, select_test

    cfg = load_config(quick_demo().config)
    split = cfg.load_split()
    return split, select_test(load_records(cfg.data.test, split), split, "zsd", cfg.data.test_rule)


def test_held_out_classes_are_found(bundle, test_records, tmp_path):
    from vldus.evaluation import ZSDEvaluator

    split, records = test_records
    det = ZeroShotDetector.load(bundle, cache_dir=str(tmp_path / "cache"))
    det.set_classes(list(quick_demo().unseen))
    assert det.classifier_source == "trained"
    results = det([r.path for r in records], score_thresh=0.0)
    dets = [{"boxes": r["boxes"], "scores": r["scores"],
             "labels": np.array([split.index(n) for n in r["labels"]], dtype=np.int64)} for r in results]
    assert all(set(r["labels"]) <= set(quick_demo().unseen) for r in results)
    evaluator = ZSDEvaluator(list(split.classes), list(split.unseen), "zsd")
    evaluator.process(records, dets)
    metrics = evaluator.evaluate()
    unseen_map = metrics["groups"]["unseen"]["map"]["0.5"]
    print(f"quick demo bundle: unseen mAP@0.5 = {unseen_map:.2f}")
    assert unseen_map > UNSEEN_MAP_FLOOR


def test_cache_returns_the_same_classifier(bundle, tmp_path):
    cache = str(tmp_path / "cache")
    first = ZeroShotDetector.load(bundle, cache_dir=cache)
    first.set_classes(["blue circle", "red square"])
    assert first.classifier_source == "trained"
    mtime = os.path.getmtime(first.classifier_path)
    w1 = first.head.base.cls_score.weight.detach().clone()

    second = ZeroShotDetector.load(bundle, cache_dir=cache)
    second.set_classes(["blue circle", "red square"])
    assert second.classifier_source == "cache"
    assert second.classifier_path == first.classifier_path
    assert os.path.getmtime(second.classifier_path) == mtime
    assert np.array_equal(w1.numpy(), second.head.base.cls_score.weight.detach().numpy())

    swapped = ZeroShotDetector.load(bundle, cache_dir=cache)
    swapped.set_classes(["red square", "blue circle"])  # rows follow the given order, no retraining
    assert swapped.classifier_source == "cache"
    c = len(swapped.split.classes)
    w3 = swapped.head.base.cls_score.weight.detach().numpy()
    np.testing.assert_array_equal(w3[c + 1], w1.numpy()[c + 2])
    np.testing.assert_array_equal(w3[c + 2], w1.numpy()[c + 1])


def test_cli_and_api_give_the_same_boxes(bundle, test_records, tmp_path):
    split, records = test_records
    paths = [r.path for r in records[:3]]
    out = tmp_path / "out"
    assert cli.main(["detect", *paths, "--model", bundle, "--classes", "blue circle, red square", "--gzsd",
                     "--score", "0.05", "--out", str(out), "--quiet"]) == 0
    det = ZeroShotDetector.load(bundle)
    det.set_classes(["blue circle", "red square"], gzsd=True)
    api = det(paths, score_thresh=0.05)
    total = 0
    for path, res in zip(paths, api):
        stem = os.path.splitext(os.path.basename(path))[0]
        assert (out / f"{stem}.png").is_file()
        with open(out / f"{stem}.json") as f:
            saved = json.load(f)
        np.testing.assert_allclose(np.array(saved["boxes"]).reshape(-1, 4), res["boxes"], atol=1e-4)
        assert saved["labels"] == res["labels"]
        np.testing.assert_allclose(saved["scores"], res["scores"], atol=1e-6)
        total += len(res["labels"])
    assert total > 0
    names = {n for r in api for n in r["labels"]}
    assert names & set(split.seen), "GZSD detects seen classes too"


def test_api_accepts_pil_and_tensors(bundle, test_records):
    from PIL import Image

    from vldus.api import read_image

    _, records = test_records
    det = ZeroShotDetector.load(bundle)
    det.set_classes("blue circle, red square")
    path = records[0].path
    with Image.open(path) as im:
        pil = im.convert("RGB")
    a, b, c = det([path, pil, read_image(path)], score_thresh=0.05)
    for other in (b, c):
        np.testing.assert_allclose(a["boxes"], other["boxes"], atol=1e-4)
        assert a["labels"] == other["labels"]


@pytest.mark.parametrize("classes,expected", [
    ("blue circle,,red square", "empty"),
    ("blue circle, ", "empty"),
    ("purple circle", "purple circle"),
    ("blue circle, Blue_Circle", "duplicate"),
])
def test_bad_class_names(bundle, tmp_path, cli_error, classes, expected):
    image = first_image(quick_demo())
    err = cli_error(["detect", image, "--model", bundle, "--classes", classes,
                     "--out", str(tmp_path / "out")])
    assert expected in err


def test_unreadable_image(bundle, tmp_path, cli_error):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    err = cli_error(["detect", str(bad), "--model", bundle, "--classes", "blue circle",
                     "--out", str(tmp_path / "out")])
    assert "broken.png" in err and "cannot read image" in err


def test_gzsd_named_seen_class_uses_the_new_row(bundle, tmp_path):
    """A requested name that is a seen class replaces that seen row in GZSD (no duplicate label)."""
    det = ZeroShotDetector.load(bundle, cache_dir=str(tmp_path / "cache"))
    det.set_classes(["blue circle", "red circle"], gzsd=True)
    split = det.split
    assert "red circle" in split.seen
    assert "red circle" in det.ext_split.excluded and "blue circle" in det.ext_split.excluded
    assert det.label_names[det.ext_split.unseen_ids[1] - 1] == "red circle"
    assert det.ext_split.seen_ids == [i for i in split.seen_ids if split.classes[i - 1] != "red circle"]


def test_folder_input_and_unique_output_names(bundle, test_records, tmp_path):
    import shutil

    from vldus.detect import output_stems

    _, records = test_records
    folder = tmp_path / "imgs"
    folder.mkdir()
    for r in records[:2]:
        shutil.copy(r.path, folder)
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out"
    assert cli.main(["detect", str(folder), "--model", bundle, "--classes", "blue circle", "--out", str(out),
                     "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{os.path.splitext(os.path.basename(r.path))[0]}.{ext}" for r in records[:2] for ext in ("json", "png"))
    assert output_stems(["a/x.png", "b/x.png", "x.jpg"]) == ["x", "x_2", "x_3"]


def _same_rows_as_vldus_test(det, split) -> None:
    """The one difference by design between the API and vldus test: a new name has no
    box-regression rows of its own (zero deltas, borrowed from the seen classes), while vldus
    test's unseen slots keep the detector's rows of those classes (never trained on a positive).
    Give the API the same rows."""
    box = det.model.roi_heads.box_predictor.base.bbox_pred
    num = len(split.classes)
    with torch.no_grad():
        for k, class_id in enumerate(split.unseen_ids, start=1):
            box.weight[4 * (num + k):4 * (num + k + 1)] = box.weight[4 * class_id:4 * (class_id + 1)]
            box.bias[4 * (num + k):4 * (num + k + 1)] = box.bias[4 * class_id:4 * (class_id + 1)]


def _compare_with_vldus_test(det, run, cfg, split, tmp_path, options: list[str]) -> dict:
    """vldus test --gzsd on 4 test images with ``options``; the API's detections on them must be
    the same (labels and scores). Returns the scoring vldus test recorded."""
    from vldus.data.readers import load_records, select_test

    out = tmp_path / "dets.json"
    assert cli.main(["test", "--config", run.config, "--checkpoint", run.checkpoint, "--syn-weights",
                     os.path.join(run.synth_dir, "classifier_best.pth"), "--gzsd", "--out", str(out),
                     "--metrics", str(tmp_path / "m.json"), "--max-images", "4", "--quiet", "--device", "cpu",
                     *options]) == 0
    with open(tmp_path / "m.json") as f:
        ran = json.load(f)["gzsd_scoring"]
    with open(out) as f:
        tested = json.load(f)
    with open(str(out)[:-5] + ".gt.json") as f:
        category = {c["id"]: c["name"] for c in json.load(f)["categories"]}
    records = select_test(load_records(cfg.data.test, split), split, "gzsd", cfg.data.test_rule)[:4]
    for record, result in zip(records, det([r.path for r in records], score_thresh=0.0)):
        expected = sorted((category[d["category_id"]], round(d["score"], 4)) for d in tested
                          if d["image_id"] == record.image_id)
        got = sorted(zip(result["labels"], np.round(result["scores"], 4).tolist()))
        assert len(got) == len(expected) > 0
        assert [n for n, _ in got] == [n for n, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=2e-4)
    return ran


def test_gzsd_scores_as_vldus_test(bundle, tmp_path):
    """Given vldus test's own classifier (put in the API's classifier cache), GZSD through the API
    runs the same scoring as `vldus test --gzsd` (default scoring, calibrated on the same seen
    features against the same generator: the same fit and the same decision) and the same
    inference path: same boxes, scores and labels; with a configured soft gate too, whatever the
    calibration decided. With inference.gzsd_scoring: published both drop the rule."""
    from safetensors.torch import save_file

    from vldus.config import load_config
    from vldus.detection.zsd import load_syn_classifier

    run = quick_demo()
    cfg = load_config(run.config)
    split = cfg.load_split()
    weight, bias = load_syn_classifier(os.path.join(run.synth_dir, "classifier_best.pth"), split, cfg.features.dim)
    names = [split.classes[i - 1] for i in split.unseen_ids]  # classifier rows 1.. in this order
    cache = tmp_path / "cache"
    det = ZeroShotDetector.load(bundle, cache_dir=str(cache))
    order = sorted(names)
    rows = [0] + [1 + names.index(n) for n in order]
    cache.mkdir()
    save_file({"weight": weight[rows].contiguous(), "bias": bias[rows].contiguous()},
              str(cache / f"classifier_{det._cache_key(order)}.safetensors"))
    det.set_classes(names, gzsd=True)
    assert det.classifier_source == "cache"
    _same_rows_as_vldus_test(det, split)
    ran = _compare_with_vldus_test(det, run, cfg, split, tmp_path, [])
    assert det.scoring["scoring"] == ran["scoring"] and det.gzsd_scoring is det.scoring
    # the calibration itself, whichever scoring it chose: the same rows give the same fit and checks
    with open(os.path.join(run.synth_dir, "gzsd_calibration.json")) as f:
        stored = json.load(f)
    assert det.calibration["scoring"] == stored["scoring"]
    for key in ("balanced_accuracy", "threshold", "soft_slope", "soft_threshold", "synthetic_auc"):
        assert det.calibration[key] == pytest.approx(stored[key], abs=1e-3), key
    if ran["scoring"] != "published":
        assert det.scoring["threshold"] == pytest.approx(ran["threshold"], abs=1e-3)
        assert (det.head.gate_threshold, det.head.gate_slope) == (det.scoring["threshold"], det.scoring["slope"])
        if ran["slope"] is not None:  # soft
            assert det.scoring["slope"] == pytest.approx(ran["slope"], abs=1e-3)
            assert det.head.gate_seen_weight == det.scoring["seen_weight"]
            assert det.scoring["seen_weight"] == pytest.approx(ran["seen_weight"], abs=1e-3)

    # ZSD: the same calibration gates the unseen scores, in the API as in vldus test --zsd
    det.set_classes(names)
    assert det.head.mode == "zsd" and det.scoring["scoring"] == ran["scoring"] and det.gzsd_scoring is None
    if ran["scoring"] == "soft":
        assert (det.head.gate_threshold, det.head.gate_slope) == pytest.approx((ran["threshold"], ran["slope"]), abs=1e-3)

    # a configured soft gate (the calibration's own fit), in both: the same detections
    threshold, slope = stored["soft_threshold"], stored["soft_slope"]
    det.cfg.inference.gzsd_threshold, det.cfg.inference.gzsd_slope = threshold, slope
    det.set_classes(names, gzsd=True)
    assert det.calibration is None and det.scoring["scoring"] == "soft"
    assert (det.head.gate_threshold, det.head.gate_slope) == (threshold, slope)
    _same_rows_as_vldus_test(det, split)
    configured = _compare_with_vldus_test(det, run, cfg, split, tmp_path,
                                          ["--gzsd-threshold", str(threshold), "--gzsd-slope", str(slope)])
    assert configured["scoring"] == "soft" and configured["slope"] == slope

    det.cfg.inference.gzsd_threshold = det.cfg.inference.gzsd_slope = None
    det.cfg.inference.gzsd_scoring = "published"
    det.set_classes(names, gzsd=True)
    assert det.scoring["scoring"] == "published" and det.head.gate_threshold is None
