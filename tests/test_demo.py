"""`vldus demo --quick`: VLDUS end to end on the embedded benchmark (tests/quick_demo_run.py).

The proof that zero-shot detection works, on any CPU: fp32, fixed seed, real floors with a margin.
"""
import json
import os

import pytest

from file_spy import files_opened
from quick_demo_run import quick_demo

pytestmark = pytest.mark.timeout(900)

# Floors (IoU 0.5) well below what the quick demo measured with torch's AVX-512 and its AVX2
# kernels, one thread as in `make test` (docs/development.md): they fail when a stage breaks, not
# when the instruction set changes. Measured, seed 0 (session 18, 2-core AMD EPYC; the published
# scoring, which the calibration's chance check keeps on this small detector): default kernels
# ZSD no_synthesis 50.3, synthesis_vldus 70.2, GZSD HM 61.0; AVX2 variables 53.6, 68.4, 65.3.
# Session 11's Intel Xeon runs, the earlier 128-channel detector's and the GAN seed's share:
# docs/results.md, docs/history.md.
ZSD_FLOOR = 55.0
GZSD_HM_FLOOR = 45.0
# synthesis_vldus above no_synthesis (ZSD mAP) on seed 0: measured +8.9 to +19.9 (+14.8 / +19.9 in
# session 18); other seeds of the quick demo differ more (seed 2, AVX2 variables: +2.8); the
# GAN's seed alone moves synthesis_vldus by 7 points on one detector (it was +10 until a run at
# +8.9 failed it)
SYNTHESIS_MARGIN = 5.0
CLIP_ACCURACY_FLOOR = 30.0  # percent, 16-way zero-shot on held-out crops (chance 6.25) of the 150-step CLIP; measured 49.7
# quick detector, seen mAP@0.5 on the validation images after its last epoch: measured 79.5 with
# either kernel set (default kernels, epochs 13.5 / 34.9 / 63.3 / 73.4 / 79.5); the floor leaves
# room for other CPUs.
VAL_SEEN_MAP_FLOOR = 40.0


@pytest.fixture(scope="module")
def run():
    return quick_demo()


def test_vldus_is_the_method_and_beats_no_synthesis(run):
    m, ablation = run.metrics, run.metrics["ablation"]
    print(f"quick demo: ZSD no_synthesis {ablation['no_synthesis']['zsd_map']:.1f}, synthesis_vldus "
          f"{ablation['synthesis_vldus']['zsd_map']:.1f}; GZSD HM {m['gzsd']['hm']['map']['0.5']:.1f} "
          f"(published {m['gzsd_published']['hm']['map']['0.5']:.1f}); {run.seconds:.0f} s")
    assert m["method"] == "synthesis_vldus" and m["precision"] == "fp32"
    assert list(ablation) == ["no_synthesis", "synthesis_su", "synthesis_vldus"]
    assert ablation["no_synthesis"]["status"] == ablation["synthesis_vldus"]["status"] == "ok"
    # --quick trains one synthesizer: the SU row is reported as skipped, with null metrics
    assert ablation["synthesis_su"]["status"].startswith("skipped: ")
    assert ablation["synthesis_su"]["zsd_map"] is None and ablation["synthesis_su"]["gzsd_hm"] is None
    assert m["zsd"]["setting"] == "zsd" and m["zsd"]["groups"]["unseen"]["map"]["0.5"] > ZSD_FLOOR
    assert m["zsd"]["groups"]["unseen"]["map"]["0.5"] == ablation["synthesis_vldus"]["zsd_map"]
    for group in ("seen", "unseen"):  # each row's GZSD groups, the main row's as in its own metrics
        assert ablation["synthesis_vldus"][f"gzsd_{group}"] == m["gzsd"]["groups"][group]["map"]["0.5"]
        assert ablation["no_synthesis"][f"gzsd_{group}"] > 0 and ablation["synthesis_su"][f"gzsd_{group}"] is None
    assert ablation["synthesis_vldus"]["zsd_map"] >= ablation["no_synthesis"]["zsd_map"] + SYNTHESIS_MARGIN
    assert set(m["gzsd"]["groups"]) == {"seen", "unseen"} and m["gzsd"]["hm"]["map"]["0.5"] > GZSD_HM_FLOOR


def test_distillation_was_active(run):
    """The VLDUS row trained with non-zero CLIP distillation losses, in D's and G's objectives."""
    ablation = run.metrics["ablation"]
    assert all(ablation["synthesis_vldus"]["distill"][k] > 0 for k in ("l_fa", "l_ra_dis", "l_ra_div"))
    log = [json.loads(line) for line in open(os.path.join(run.synth_dir, "log.jsonl")) if line.strip()]
    epochs = [r for r in log if r.get("iterations")]
    assert epochs and all(r["distill_d"] != 0 and r["distill_g"] != 0 for r in epochs)
    meta = json.load(open(os.path.join(run.synth_dir, "meta.json")))
    assert meta["settings"]["distill"] == "active" and meta["settings"]["precision"] == "fp32"
    clip = run.metrics["clip"]
    assert clip["source"].startswith("trained") and clip["zero_shot_accuracy"]["all"] > CLIP_ACCURACY_FLOOR


def test_default_scoring_follows_its_calibration(run):
    """What the default (soft) scoring guarantees, on any machine, in ZSD and GZSD: it acts only
    when its calibration (no test data) separates seen from unseen well enough, runs with the
    calibrated slope and threshold and lowers scores (fewer boxes above the score floor), never
    raises them. Whether that raises the mAP is measured, not asserted (docs/gzsd.md, on three
    default-demo seeds)."""
    m = run.metrics
    default, published = m["gzsd"], m["gzsd_published"]
    assert default["setting"] == published["setting"] == "gzsd"
    path = os.path.join(run.synth_dir, "gzsd_calibration.json")
    calib = json.load(open(path))
    usable = (calib["balanced_accuracy"] >= calib["min_separation"] and calib["soft_slope"] > 0
              and calib["synthetic_auc"] >= calib["synthetic_auc_floor"])
    assert calib["scoring"] == ("joint" if usable else "published")

    def dets(metrics: dict, group: str) -> int:
        return sum(c["num_dets"] for c in metrics["classes"].values() if c["group"] == group)

    assert published["gzsd_scoring"] == {"scoring": "published", "threshold": None, "slope": None,
                                         "seen_weight": None, "source": "inference.gzsd_scoring"}
    if not usable:  # --metrics records what ran (the released column also borrows its unseen
        # boxes another way; the scorings benchmark below compares the same boxes)
        assert default["gzsd_scoring"]["scoring"] == "published"
        assert (default["box_regression"], published["box_regression"]) == ("seen_mixture", "best_seen")
    else:
        assert default["gzsd_scoring"] == {"scoring": "soft", "threshold": calib["soft_threshold"],
                                           "slope": calib["soft_slope"], "seen_weight": calib["soft_seen_weight"],
                                           "source": path}
        assert dets(default, "seen") < dets(published, "seen")  # lower seen scores: fewer above the score floor
        assert dets(default, "unseen") <= dets(published, "unseen")
    assert default["groups"]["unseen"]["map"]["0.5"] > 0
    # ZSD: the same calibration, on the unseen scores only
    assert m["zsd"]["zsd_scoring"] == (default["gzsd_scoring"] if usable else {
        "scoring": "published", "threshold": None, "slope": None, "seen_weight": None,
        "source": m["zsd"]["zsd_scoring"]["source"]})


def test_scorings_benchmark_rescores_the_demo(run, tmp_path):
    """benchmarks/gzsd_scorings.py on the finished demo: every synthesis row under each scoring,
    the default (soft) and the released inference (published scoring, best_seen boxes) equal to
    what the demo itself measured, an opt-in gate variant (recalibrated in a copy, the demo's own
    calibration left as it was) and every scoring with the released box deltas."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import gzsd_scorings

    out = tmp_path / "scorings.json"
    calibration = os.path.join(run.synth_dir, "gzsd_calibration.json")
    before = open(calibration).read()
    assert gzsd_scorings.main([run.out, "--out", str(out), "--note", "quick demo",
                               "--gates", "two_weights+object", "--box-regressions", "best_seen"]) == 0
    assert open(calibration).read() == before
    result = json.load(open(out))
    assert result["seed"] == 0 and result["note"] == "quick demo" and list(result["rows"]) == ["synthesis_vldus"]
    row = result["rows"]["synthesis_vldus"]
    assert list(row) == ["soft", "joint", "published", "soft (two_weights+object)", "soft (best_seen boxes)",
                         "joint (best_seen boxes)", "published (best_seen boxes)"]
    variant = row["soft (two_weights+object)"]
    if variant["ran"] == "soft":  # its own seen weight, fitted on the copy's calibration
        assert variant["seen_weight"] != 1.0 and variant["threshold"] != row["soft"]["threshold"]
    assert run.metrics["gzsd"]["box_regression"] == run.metrics["zsd"]["box_regression"] == "seen_mixture"
    assert run.metrics["gzsd_published"]["box_regression"] == "best_seen"  # the released inference
    for scoring, setting in (("soft", "gzsd"), ("published (best_seen boxes)", "gzsd_published")):
        assert row[scoring]["hm"] == pytest.approx(run.metrics[setting]["hm"]["map"]["0.5"], abs=1e-9)
        assert row[scoring]["ran"] == run.metrics[setting]["gzsd_scoring"]["scoring"]
    assert row["joint"]["slope"] is None and row["published"]["threshold"] is None
    if row["soft"]["ran"] == "published":  # the calibration keeps the published scoring: same detections
        assert row["soft"]["hm"] == row["joint"]["hm"] == row["published"]["hm"]
    zsd = result["zsd"]["synthesis_vldus"]
    assert list(zsd) == ["soft", "published", "soft (two_weights+object)", "soft (best_seen boxes)",
                         "published (best_seen boxes)"] and zsd["published"]["ran"] == "published"
    assert zsd["soft"]["map"] == pytest.approx(run.metrics["zsd"]["groups"]["unseen"]["map"]["0.5"], abs=1e-9)
    assert zsd["soft"]["ran"] == run.metrics["zsd"]["zsd_scoring"]["scoring"]


def test_box_regression_benchmark_on_validation_images(run, tmp_path, capsys):
    """benchmarks/box_regression_val.py on the finished demo: each rule, the object's own row and
    the bare proposal, over the same validation RoIs (leave one class out, no test data)."""
    import shutil
    import sys

    import yaml

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import box_regression_val

    out = tmp_path / "boxes.json"
    assert box_regression_val.main([run.out, "--out", str(out), "--note", "quick demo"]) == 0
    result = json.load(open(out))
    assert result["seed"] == 0 and result["rois"] > 0 and result["images"] > 0
    rules = result["rules"]
    assert set(rules) == {"own", "proposal", "seen_mixture", "best_seen"}
    assert rules["proposal"]["iou>=0.5"] == 100.0  # proposals chosen at IoU >= 0.5 with their object
    for r in rules.values():
        assert 0.0 < r["mean_iou"] <= 1.0 and r["iou>=0.5"] >= r["iou>=0.6"] >= r["iou>=0.7"] >= r["iou>=0.8"]
    # a demo folder without validation images: one line, exit 2
    bare = tmp_path / "bare"
    shutil.copytree(os.path.join(run.out, "work", "detector"), bare / "work" / "detector")
    config = yaml.safe_load(open(os.path.join(run.out, "config.yaml")))
    config["data"]["val"] = None
    (bare / "config.yaml").write_text(yaml.safe_dump(config))
    assert box_regression_val.main([str(bare), "--out", str(tmp_path / "none.json")]) == 2
    assert "data.val: no validation images" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()


def test_report_and_pictures(run):
    report = open(os.path.join(run.out, "report.md")).read()
    assert "## Variants" in report and "## ZSD" in report and "## GZSD" in report
    assert "published scoring" in report and "CLIP: trained by vldus train-clip" in report
    # each setting's section says which scoring ran, and why (the reason --metrics records)
    from vldus.detection.gzsd import describe_scoring

    for setting in ("zsd", "gzsd", "gzsd_published"):
        ran = run.metrics[setting][f"{run.metrics[setting]['setting']}_scoring"]
        assert f"Scoring: {describe_scoring(ran)}; box deltas: {run.metrics[setting]['box_regression']}." in report
    pictures = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![detections]")]
    assert pictures and all(os.path.isfile(os.path.join(run.out, p)) for p in pictures)
    assert os.path.isfile(os.path.join(run.out, "losses.png"))
    timings = run.metrics["timings_s"]
    assert set(timings) >= {"make-shapes", "train-clip", "train-detector", "extract-features",
                            "extract-features (val)", "synthesizer (synthesis_vldus)", "test (synthesis_vldus)",
                            "classifier (no_synthesis)", "pictures", "export"}
    # train-clip trains in a child process alongside train-detector (on two or more cores)
    from vldus.runner import usable_cores

    concurrent = run.metrics["concurrent_stages"]
    assert concurrent == ({} if usable_cores() < 2 else {"train-clip": "make-shapes, train-detector"})
    assert sum(v for k, v in timings.items() if k not in concurrent) <= run.metrics["total_s"] <= run.seconds
    assert "## Stage timings" in report and "| **total** |" in report


def test_detector_validated_on_held_out_seen_images(run):
    """train-detector ran with --validate on the seen-only validation split; the demo reports the
    last epoch's seen mAP, and the validation RoI features (for GZSD calibration) were extracted."""
    from vldus.demo import QUICK

    val = run.metrics["detector"]
    print(f"quick demo: detector seen mAP on the validation images per epoch {val['per_epoch']}")
    assert len(val["per_epoch"]) == QUICK.detector_epochs and val["val_seen_map50"] == val["per_epoch"][-1]
    assert VAL_SEEN_MAP_FLOOR < val["val_seen_map50"] <= 100.0
    features = os.path.join(run.out, "work", "features")
    manifest = json.load(open(os.path.join(features, "val_0.6_0.3_manifest.json")))
    unseen = set(run.metrics["unseen"])
    assert manifest["fg_rows"] > 0 and not unseen & set(manifest["rows_per_label"])
    assert manifest["run"]["data_split"] == "val" and manifest["run"]["flip"] == 0.0


def test_main_row_is_exported(run):
    """OUT/bundle is the main row's model: the generator the synthesis_vldus row trained."""
    import torch
    from safetensors.torch import load_file

    from vldus.bundle import GENERATOR_FILE

    assert run.metrics["bundle"] == os.path.join(run.out, "bundle")
    exported = load_file(os.path.join(run.metrics["bundle"], GENERATOR_FILE))
    trained = torch.load(os.path.join(run.synth_dir, "generator.pth"), map_location="cpu", weights_only=True)
    assert run.synth_dir.endswith("synth_synthesis_vldus") and exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_pseudo_unseen_selection_reads_no_test_data_and_records_its_choice(run, tmp_path):
    """Selection on the quick demo's features (a 2-epoch synthesizer, two candidates): the spy
    records every file opened while it selects; no test image, annotation, feature or cached box
    is among them, the held-out classes are seen ones, and selection.json holds every candidate
    with its validation scores and the choice."""
    from vldus.config import load_config
    from vldus.synthesis.pipeline import SynthesisOptions
    from vldus.synthesis.select import SELECTION_FILE, select_on_pseudo_unseen

    cfg = load_config(run.config, ["unseen_classifier.selection=pseudo_unseen", "gan.epochs=2",
                                   "unseen_classifier.select_epochs=[0.5]", "unseen_classifier.select_syn_num=[1.0]",
                                   "gan.distill=off"])
    test_ann = os.path.abspath(cfg.data.test.ann_file)
    val_ann = os.path.abspath(cfg.data.val.ann_file)
    with open(test_ann) as f:
        test_images = {os.path.abspath(os.path.join(cfg.data.test.img_dir, im["file_name"]))
                       for im in json.load(f)["images"]}
    out = tmp_path / "synth"
    options = SynthesisOptions(quiet=True, detector_checkpoint=run.checkpoint, out_dir=str(out), plots=False)
    with files_opened() as opened:
        record = select_on_pseudo_unseen(cfg, options)
    assert val_ann in opened and any(p.endswith("val_0.6_0.3_feats.npy") for p in opened)  # the spy sees reads
    features = os.path.abspath(cfg.path("features"))
    forbidden = [p for p in opened if p == test_ann or p in test_images
                 or os.path.basename(p).startswith("test_") and p.startswith(features)
                 or p.startswith(os.path.abspath(cfg.path("test_cache")))]
    assert not forbidden, f"selection read test data: {forbidden[:3]}"

    split = cfg.load_split()
    assert set(record["pseudo_unseen"]) <= set(split.seen) and record["reads_test_data"] is False
    assert [(c["epochs"], c["syn_num"]) for c in record["candidates"]] == [(1, cfg.unseen_classifier.syn_num),
                                                                           (2, cfg.unseen_classifier.syn_num)]
    assert all(c["zsd_map"] is not None and c["score"] is not None for c in record["candidates"])
    assert record["chosen"]["gan.epochs"] in (1, 2) and {s["name"] for s in record["scorings"]} == {"soft", "published"}
    with open(out / SELECTION_FILE) as f:
        assert json.load(f) == record
