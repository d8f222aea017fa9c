"""`vldus test` end to end on a tiny generated COCO-format dataset with a tiny random detector."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from vldus.cli import main
from vldus.config import load_config
from vldus.data.records import ImageRecord
from vldus.detection.inference import coco_results, gt_path
from vldus.detection.visualize import SEEN_COLOUR, UNSEEN_COLOUR, draw_detections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["red circle", "blue circle", "red square", "blue square", "green star", "grey star"]
UNSEEN = ["blue circle", "green star"]  # detector ids 2, 5
EXCLUDED = ["grey star"]  # id 6, like COCO 48/17's excluded classes
CAT_IDS = [11, 12, 13, 14, 15, 16]  # COCO category ids differ from detector indices
# test images: (width, height, [(class index 0-based, box xyxy)])
IMAGES = [
    (80, 60, [(1, (5, 5, 30, 30)), (0, (40, 10, 70, 40))]),    # unseen + seen
    (64, 96, [(0, (10, 10, 40, 40))]),                         # seen only: never a test image
    (96, 64, [(4, (20, 8, 60, 50))]),                          # unseen only
    (72, 72, [(2, (4, 4, 30, 30)), (5, (40, 40, 70, 70))]),    # seen + excluded: not a test image
    (64, 64, [(4, (8, 8, 40, 40)), (5, (40, 30, 62, 60))]),    # unseen + excluded
    (90, 70, [(1, (50, 20, 85, 60)), (3, (5, 5, 35, 35))]),    # unseen + seen
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Dataset, split, config, random detector checkpoint and synthesized classifier files."""
    root = tmp_path_factory.mktemp("tiny_zsd")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    images, annotations = [], []
    for n, (w, h, objects) in enumerate(IMAGES, start=1):
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        for c, box in objects:
            draw.rectangle(box, fill=(40 * c, 255 - 40 * c, 128))
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + n, "category_id": CAT_IDS[c],
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
        im.save(root / "images" / f"img{n}.png")
        images.append({"id": 100 + n, "file_name": f"img{n}.png", "width": w, "height": h})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": c} for i, c in zip(CAT_IDS, CLASSES)]}
    (root / "test.json").write_text(json.dumps(coco))
    (root / "split.json").write_text(json.dumps({"name": "tiny", "classes": CLASSES, "unseen": UNSEEN,
                                                 "excluded": EXCLUDED}))
    config = {
        "name": "tiny", "split": str(root / "split.json"), "work_dir": str(root / "work"),
        "data": {"train": {"format": "coco", "ann_file": str(root / "test.json"), "img_dir": str(root / "images")},
                 "test": {"format": "coco", "ann_file": str(root / "test.json"), "img_dir": str(root / "images")},
                 "test_rule": "coco", "workers": 0},
        "detector": {"backbone": "resnet18", "norm": "bn", "fpn_channels": 32, "min_size": 64, "max_size": 96,
                     "anchor_sizes": [8, 16, 32, 64, 128], "rpn_pre_nms_test": 100, "rpn_post_nms_test": 50},
    }
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(config))

    from vldus.detection.model import build_detector

    cfg = load_config(str(cfg_path))
    split = cfg.load_split()
    torch.manual_seed(0)
    model = build_detector(cfg, split)
    torch.save({"model": model.state_dict(), "classes": list(split.classes), "epoch": 1}, root / "det.pth")
    g = torch.Generator().manual_seed(1)
    rows = 1 + len(split.unseen_ids)
    torch.save({"fc.weight": torch.randn(rows, 1024, generator=g) * 0.05, "fc.bias": torch.zeros(rows)},
               root / "cls.pth")
    torch.save({"fc.weight": torch.zeros(rows + 1, 1024), "fc.bias": torch.zeros(rows + 1)}, root / "bad.pth")
    return root


def cli_args(project, *extra):
    return ["test", "--config", str(project / "tiny.yaml"), "--checkpoint", str(project / "det.pth"),
            "--quiet", *extra]


def _read(path):
    with open(path) as f:
        return json.load(f)


# --- pure helpers ---------------------------------------------------------------------------
def test_coco_results_layout_and_top_k():
    rec = ImageRecord(7, "x.png", 50, 40)
    det = {"boxes": np.array([[1, 2, 11, 22], [0, 0, 5, 5], [3, 3, 4, 4]], np.float32),
           "scores": np.array([0.2, 0.9, 0.5], np.float32), "labels": np.array([2, 1, 2])}
    out = coco_results([rec], [det], [30, 40], max_per_image=2)
    assert out == [{"image_id": 7, "category_id": 30, "bbox": [0.0, 0.0, 5.0, 5.0], "score": pytest.approx(0.9)},
                   {"image_id": 7, "category_id": 40, "bbox": [3.0, 3.0, 1.0, 1.0], "score": pytest.approx(0.5)}]
    assert gt_path("a/dets.json") == "a/dets.gt.json" and gt_path("dets") == "dets.gt.json"


def test_draw_detections_colours_and_threshold():
    im = Image.new("RGB", (100, 100), (0, 0, 0))
    boxes = np.array([[10, 40, 50, 90], [60, 40, 95, 90], [5, 5, 95, 30]], np.float32)
    out = draw_detections(im, boxes, np.array([0.9, 0.8, 0.1]), np.array([1, 2, 1]), ["seen cls", "unseen cls"],
                          unseen_ids=[2], score_thresh=0.3, min_side=100, legend=False)
    px = out.load()
    assert px[10, 70] == SEEN_COLOUR and px[95, 70] == UNSEEN_COLOUR
    assert px[50, 5] == px[95, 15] == (0, 0, 0)  # the 0.1 box is below the display threshold
    assert px[12, 36] != (0, 0, 0)  # a label above the seen box
    assert im.getpixel((10, 70)) == (0, 0, 0)  # the input is not drawn on


# --- the command ----------------------------------------------------------------------------
def test_zsd_end_to_end(project, tmp_path):
    out, metrics, show = tmp_path / "dets.json", tmp_path / "m.json", tmp_path / "show"
    rc = main(cli_args(project, "--syn-weights", str(project / "cls.pth"), "--zsd", "--out", str(out),
                        "--metrics", str(metrics), "--show-dir", str(show), "--set", "inference.excluded=mask"))
    assert rc == 0
    dets = _read(out)
    chosen = {101, 103, 105, 106}  # images with at least one unseen object (coco rule)
    unseen_cats = {CAT_IDS[CLASSES.index(c)] for c in UNSEEN}
    assert dets and {d["image_id"] for d in dets} <= chosen
    assert {d["category_id"] for d in dets} <= unseen_cats
    sizes = {100 + n: (w, h) for n, (w, h, _) in enumerate(IMAGES, start=1)}
    for d in dets:
        x, y, w, h = d["bbox"]
        W, H = sizes[d["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W + 1e-3 and y + h <= H + 1e-3 and 0.05 < d["score"] <= 1
    assert max(sum(d["image_id"] == i for d in dets) for i in chosen) <= 100
    gt = _read(gt_path(str(out)))
    assert {im["id"] for im in gt["images"]} == chosen
    assert {a["category_id"] for a in gt["annotations"]} == unseen_cats  # zsd: unseen annotations only
    assert len(gt["annotations"]) == 4
    m = _read(metrics)
    assert m["setting"] == "zsd" and set(m["classes"]) == set(UNSEEN)
    # the default soft scoring needs a calibration file: without one, published, and why
    ran = m.pop("zsd_scoring")
    assert ran["scoring"] == "published" and "calibrate-gzsd" in ran["source"]
    assert m.pop("box_regression") == "seen_mixture"  # the unseen boxes' deltas that ran
    assert sorted(os.listdir(show)) == ["img1.png", "img3.png", "img5.png", "img6.png"]
    # `vldus evaluate` re-scores the written files to the same metrics
    rc = main(["evaluate", "--ann", gt_path(str(out)), "--dets", str(out), "--unseen", ",".join(UNSEEN),
               "--excluded", ",".join(EXCLUDED), "--setting", "zsd", "--out", str(tmp_path / "m2.json"), "--quiet"])
    assert rc == 0 and _read(tmp_path / "m2.json") == m


def test_seen_mode_needs_no_synthesis(project, tmp_path):
    out = tmp_path / "seen.json"
    assert main(cli_args(project, "--seen", "--out", str(out), "--metrics", str(tmp_path / "m.json"))) == 0
    cats = {d["category_id"] for d in _read(out)}
    assert cats and cats <= {CAT_IDS[i] for i in (0, 2, 3)}
    m = _read(tmp_path / "m.json")
    assert m["setting"] == "seen" and set(m["classes"]) <= {"red circle", "red square", "blue square"}


def test_gzsd_end_to_end_and_seen_score_cut(project, tmp_path):
    runs = {}
    for name, extra in (("plain", ["--gzsd-scoring", "published"]),
                        ("cut", ["--gzsd-scoring", "published", "--seen-score-cut", "0.3"])):
        out = tmp_path / f"{name}.json"
        rc = main(cli_args(project, "--syn-weights", str(project / "cls.pth"), "--gzsd", "--out", str(out),
                            "--metrics", str(tmp_path / f"{name}.m.json"), *extra))
        assert rc == 0
        runs[name] = _read(out)
    dets = runs["plain"]
    cats = {d["category_id"] for d in dets}
    assert CAT_IDS[5] not in cats  # the excluded class is never output in gzsd
    assert cats & {CAT_IDS[i] for i in (0, 2, 3)} and cats & {CAT_IDS[i] for i in (1, 4)}
    # the cut removes every seen detection scoring below 0.3 and leaves the unseen scores alone
    # (it can only free places in the 100-per-image budget for more unseen detections)
    seen_cats = {CAT_IDS[i] for i in (0, 2, 3)}
    cut = runs["cut"]
    assert all(d["score"] >= 0.3 for d in cut if d["category_id"] in seen_cats)
    assert any(d["score"] < 0.3 for d in dets if d["category_id"] in seen_cats)
    def unseen(ds):  # (image, category) -> array of [score, bbox]
        out = {}
        for d in ds:
            if d["category_id"] not in seen_cats:
                out.setdefault((d["image_id"], d["category_id"]), []).append([d["score"]] + d["bbox"])
        return {k: np.array(v) for k, v in out.items()}

    before, after = unseen(dets), unseen(cut)
    assert sum(map(len, before.values())) < sum(map(len, after.values()))
    for key, rows in before.items():  # every unseen detection is still there, same score and box
        dist = np.abs(rows[:, None, :] - after[key][None, :, :]).max(axis=2)
        assert (dist.min(axis=1) < 1e-4).all()
    m = _read(tmp_path / "plain.m.json")
    assert m["setting"] == "gzsd" and "hm" in m and "grey star" not in m["classes"]
    gt = _read(gt_path(str(tmp_path / "plain.json")))
    assert CAT_IDS[5] not in {a["category_id"] for a in gt["annotations"]}
    assert len(gt["annotations"]) == 6


def test_joint_lowers_seen_detections_soft_both_groups(project, tmp_path, capsys):
    """joint and soft vs published on the same detector: joint's seen detections a subset and
    every unseen detection kept (more may enter the 100-per-image budget the removed seen ones
    free); soft's seen and unseen scores never higher, each group lower in sum."""
    runs = {}
    for name, extra in (("published", ["--gzsd-scoring", "published"]),
                        ("joint", ["--gzsd-scoring", "joint", "--gzsd-threshold", "-2"]),
                        ("soft", ["--gzsd-threshold", "-2", "--gzsd-slope", "1"]),
                        ("soft_seen_weight", ["--gzsd-threshold", "-2", "--gzsd-slope", "1", "--gzsd-seen-weight", "3"])):
        out = tmp_path / f"{name}.json"
        assert main(cli_args(project, "--syn-weights", str(project / "cls.pth"), "--gzsd", "--out", str(out),
                             *extra)) == 0
        runs[name] = {(d["image_id"], d["category_id"], tuple(round(v, 2) for v in d["bbox"])): d["score"]
                      for d in _read(out)}
    out = capsys.readouterr().out
    assert "gzsd scoring: joint, threshold -2 (inference.gzsd_threshold)" in out
    assert "gzsd scoring: soft, threshold -2, slope 1, seen weight 1 (inference.gzsd_threshold and inference.gzsd_slope)" in out
    assert ("gzsd scoring: soft, threshold -2, slope 1, seen weight 3 (inference.gzsd_threshold and "
            "inference.gzsd_slope and inference.gzsd_seen_weight)") in out
    # the gate decided per object (inference.gate_iou 0.5) or per box (null, the default): other scores
    per_object = tmp_path / "per_object.json"
    assert main(cli_args(project, "--syn-weights", str(project / "cls.pth"), "--gzsd", "--out", str(per_object),
                         "--gzsd-threshold", "-2", "--gzsd-slope", "1", "--set", "inference.gate_iou=0.5")) == 0
    assert sorted(d["score"] for d in _read(per_object)) != sorted(runs["soft"].values())
    # more weight on the seen evidence: seen detections keep more of their scores than with weight 1
    seen_of = lambda r: sum(v for k, v in r.items() if k[1] in {CAT_IDS[i] for i in (0, 2, 3)})  # noqa: E731
    assert seen_of(runs["soft_seen_weight"]) > seen_of(runs["soft"])
    # no calibration file next to cls.pth and no threshold: the published scoring, said so
    assert main(cli_args(project, "--syn-weights", str(project / "cls.pth"), "--gzsd", "--out",
                         str(tmp_path / "default.json"))) == 0
    assert "gzsd scoring: published (no gzsd_calibration.json" in capsys.readouterr().out
    assert _read(tmp_path / "default.json") == _read(tmp_path / "published.json")
    seen_cats = {CAT_IDS[i] for i in (0, 2, 3)}
    pub, joint = runs["published"], runs["joint"]
    pub_seen, joint_seen = ({k for k in r if k[1] in seen_cats} for r in (pub, joint))
    assert joint_seen < pub_seen  # a low threshold removes some seen detections, adds none
    for key in set(pub) - pub_seen:  # every unseen detection kept, same score (up to round-off)
        assert joint[key] == pytest.approx(pub[key], abs=1e-5)
    # soft: a box keeps a share of each score (boxes below the 100 kept per image may move up)
    # (the gate at -2 keeps most of the unseen scores: w = sigmoid(e_u - e_s + 2))
    for group, kept in ((pub_seen, 0.9), (set(pub) - pub_seen, 0.99)):
        both = runs["soft"].keys() & group
        assert both and all(runs["soft"][k] <= pub[k] + 1e-6 for k in both)
        assert sum(runs["soft"][k] for k in both) < kept * sum(pub[k] for k in both)


def test_box_regression_moves_unseen_boxes_only_and_is_recorded(project, tmp_path):
    """inference.box_regression: the released best_seen against the default seen_mixture on one
    detector: the seen detections identical, unseen boxes moved, the rule in --metrics."""
    runs = {}
    for rule in ("seen_mixture", "best_seen"):
        out, metrics = tmp_path / f"{rule}.json", tmp_path / f"{rule}_metrics.json"
        assert main(cli_args(project, "--syn-weights", str(project / "cls.pth"), "--gzsd", "--gzsd-scoring",
                             "published", "--out", str(out), "--metrics", str(metrics),
                             "--set", f"inference.box_regression={rule}",
                             "detector.detections_per_img=1000")) == 0  # no cap: it would mix the groups
        assert _read(metrics)["box_regression"] == rule
        runs[rule] = _read(out)
    seen_cats = {CAT_IDS[i] for i in (0, 2, 3)}
    seen = {rule: [d for d in dets if d["category_id"] in seen_cats] for rule, dets in runs.items()}
    assert seen["seen_mixture"] and seen["seen_mixture"] == seen["best_seen"]
    unseen = {rule: sorted(tuple(d["bbox"]) for d in dets if d["category_id"] not in seen_cats)
              for rule, dets in runs.items()}
    assert unseen["seen_mixture"] and unseen["seen_mixture"] != unseen["best_seen"]


@pytest.mark.parametrize("extra,message", [
    (["--zsd"], "--syn-weights: required with --zsd"),
    (["--syn-weights", "CLS", "--zsd", "--seen-score-cut", "0.3"], "applies to --gzsd only"),
    (["--syn-weights", "BAD", "--zsd"], r"bad.pth: weight (4, 1024) / bias (4,) do not fit"),
    (["--syn-weights", "MISSING", "--gzsd"], "missing.pth: synthesized classifier not found"),
    (["--syn-weights", "CLS", "--zsd", "--set", "inference.excluded=raw"], "inference.excluded: 'raw'"),
    (["--syn-weights", "CLS", "--gzsd", "--set", "inference.seen_score_cut=3"], "seen_score_cut: 3.0 is not"),
    (["--syn-weights", "CLS", "--zsd", "--gzsd-scoring", "joint"], "--gzsd-scoring: applies to --gzsd only"),
    (["--syn-weights", "CLS", "--gzsd", "--set", "inference.gzsd_scoring=max"], "inference.gzsd_scoring: 'max'"),
    (["--syn-weights", "CLS", "--gzsd", "--zsd-scoring", "soft"], "--zsd-scoring: applies to --zsd only"),
    (["--syn-weights", "CLS", "--zsd", "--set", "inference.zsd_scoring=joint"], "inference.zsd_scoring: 'joint'"),
    (["--syn-weights", "CLS", "--zsd", "--gzsd-threshold", "1"], "needs inference.gzsd_slope too"),
    (["--syn-weights", "CLS", "--gzsd", "--gzsd-scoring", "soft", "--gzsd-threshold", "1"],
     "inference.gzsd_threshold with the soft scoring needs inference.gzsd_slope"),
    (["--syn-weights", "CLS", "--gzsd", "--gzsd-seen-weight", "2"], "inference.gzsd_seen_weight needs"),
    (["--syn-weights", "CLS", "--zsd", "--set", "inference.gate_iou=1.5"], "inference.gate_iou: 1.5 is not in (0, 1]"),
    (["--syn-weights", "CLS", "--zsd", "--set", "inference.gate_fit=cubic"], "inference.gate_fit: 'cubic' is not one of"),
    (["--syn-weights", "CLS", "--gzsd", "--set", "inference.box_regression=agnostic"],
     "inference.box_regression: 'agnostic' is not one of seen_mixture, best_seen"),
    (["--syn-weights", "CLS", "--zsd", "--set", "data.test.ann_file=SEEN_ONLY"], "seen_only.json: no test image"),
    (["--seen", "--max-images", "0"], "--max-images: must be positive"),
])
def test_bad_input_is_one_line_exit_2(project, tmp_path, capsys, extra, message):
    coco = _read(project / "test.json")  # image 102 alone: seen objects only
    coco["images"] = [im for im in coco["images"] if im["id"] == 102]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == 102]
    (tmp_path / "seen_only.json").write_text(json.dumps(coco))
    names = {"CLS": "cls.pth", "BAD": "bad.pth", "MISSING": "missing.pth"}
    extra = [str(project / names[e]) if e in names else e for e in extra]
    extra = [e.replace("SEEN_ONLY", str(tmp_path / "seen_only.json")) for e in extra]
    rc = main(cli_args(project, *extra, "--out", str(tmp_path / "d.json")))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("vldus test: error: ") and "\n" not in err
    assert message in err
    assert not (tmp_path / "d.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_calibration_file_is_used_recorded_and_refused_for_another_classifier(project, tmp_path, capsys, cli_error):
    """gzsd_calibration.json next to --syn-weights: used when made for this checkpoint,
    classifier and bg_blend, its scoring and threshold written to --metrics; refused (one line,
    exit 2, how to recalibrate) once the classifier file is another one."""
    import shutil

    from vldus.files import sha256_file

    cls = tmp_path / "classifier_best.pth"
    shutil.copy(project / "cls.pth", cls)
    calibration = {"scoring": "joint", "threshold": -2.0, "balanced_accuracy": 0.9, "min_separation": 0.75,
                   "soft_slope": 0.5, "gate_fit": "margin", "soft_seen_weight": 1.25, "soft_threshold": -1.5,
                   "synthetic_auc": 0.6, "synthetic_auc_floor": 0.52,
                   "bg_blend": load_config(str(project / "tiny.yaml")).inference.bg_blend,
                   "detector_sha256": sha256_file(str(project / "det.pth")),
                   "classifier_sha256": sha256_file(str(cls))}
    (tmp_path / "gzsd_calibration.json").write_text(json.dumps(calibration))
    args = cli_args(project, "--syn-weights", str(cls), "--gzsd", "--out", str(tmp_path / "d.json"),
                    "--metrics", str(tmp_path / "m.json"))
    assert main(args) == 0
    assert _read(tmp_path / "m.json")["gzsd_scoring"] == {  # the default: soft
        "scoring": "soft", "threshold": -1.5, "slope": 0.5, "seen_weight": 1.25,
        "source": str(tmp_path / "gzsd_calibration.json")}
    assert main(args + ["--gzsd-scoring", "joint"]) == 0
    assert _read(tmp_path / "m.json")["gzsd_scoring"] == {
        "scoring": "joint", "threshold": -2.0, "slope": None, "seen_weight": None,
        "source": str(tmp_path / "gzsd_calibration.json")}
    assert main(args + ["--gzsd-scoring", "published"]) == 0
    assert _read(tmp_path / "m.json")["gzsd_scoring"]["scoring"] == "published"
    zsd = [a if a != "--gzsd" else "--zsd" for a in args]  # ZSD: the same gate, on the unseen scores
    assert main(zsd) == 0
    assert _read(tmp_path / "m.json")["zsd_scoring"] == {
        "scoring": "soft", "threshold": -1.5, "slope": 0.5, "seen_weight": 1.25,
        "source": str(tmp_path / "gzsd_calibration.json")}
    soft_zsd = _read(tmp_path / "d.json")
    assert main(zsd + ["--zsd-scoring", "published"]) == 0
    assert _read(tmp_path / "m.json")["zsd_scoring"]["scoring"] == "published"
    assert sum(d["score"] for d in soft_zsd) < sum(d["score"] for d in _read(tmp_path / "d.json"))
    torch.save({"fc.weight": torch.zeros(3, 1024), "fc.bias": torch.zeros(3)}, cls)  # another classifier
    err = cli_error(args)
    assert "gzsd_calibration.json" in err and "made for another classifier" in err
    assert f"vldus calibrate-gzsd --config {project / 'tiny.yaml'} --synth-dir {tmp_path}" in err
