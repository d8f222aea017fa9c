"""``vldus prepare`` + ``vldus run`` end to end on a few real photographs (Roboflow's Aquarium, CC BY
4.0, in YOLO layout), one short epoch of each stage: the two commands a user with a labelled
folder runs. Skipped, with the reason, where ``../shared/data/aquarium`` is absent."""
import json
import os
import shutil

import pytest

AQUARIUM = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "shared", "data", "aquarium")
NAMES = ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]
UNSEEN = {3, 4}  # puffin, shark
# one process, no loader workers: process start-ups would cost more than the work
SHORT = ["train.batch_size=1", "data.workers=0", "train.epochs=1", "train.lr_steps=[]", "train.warmup_iters=2",
         "detector.min_size=160", "detector.max_size=224", "detector.rpn_post_nms_train=100",
         "detector.rpn_post_nms_test=100",
         "detector.roi_batch_size=32", "features.num_rois=64", "gan.epochs=1", "gan.epoch_budget=256",
         "compat.epochs=2", "unseen_classifier.epochs=2", "unseen_classifier.syn_num=50"]


def classes_of(label_file: str) -> set[int]:
    with open(label_file) as f:
        return {int(line.split()[0]) for line in f if line.strip()}


def few_images(tmp_path) -> str:
    """A YOLO-layout copy of a few Aquarium images: 8 seen-only and 2 unseen-holding training
    images, 3 seen-only validation images (each adding a class), 3 test images with an unseen
    object."""
    root = tmp_path / "aquarium_few"
    want = {"train": (8, 2), "valid": (3, 0), "test": (0, 3)}  # (seen-only, with an unseen object)
    trained: set[int] = set()  # the classes of the seen-only training images
    for subset, (n_seen, n_unseen) in want.items():
        for part in ("images", "labels"):
            (root / subset / part).mkdir(parents=True)
        seen_left, unseen_left = n_seen, n_unseen
        covered: set[int] = set()
        for name in sorted(os.listdir(os.path.join(AQUARIUM, subset, "labels"))):
            label = os.path.join(AQUARIUM, subset, "labels", name)
            held = classes_of(label)
            if not held or subset == "valid" and (held <= covered or not held <= trained):
                continue  # validation: each image adds a trained class (selection holds one out, keeps one)
            if held & UNSEEN and unseen_left:
                unseen_left -= 1
            elif not held & UNSEEN and seen_left:
                seen_left -= 1
            else:
                continue
            covered |= held
            stem = os.path.splitext(name)[0]
            shutil.copy(label, root / subset / "labels" / name)
            shutil.copy(os.path.join(AQUARIUM, subset, "images", stem + ".jpg"), root / subset / "images")
            if subset == "train" and not held & UNSEEN:
                trained |= held
            if not seen_left and not unseen_left:
                break
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
                                    f"nc: 7\nnames: {NAMES}\n")
    return str(root)


@pytest.mark.skipif(not os.path.isdir(AQUARIUM), reason=f"the Aquarium photographs are not at {AQUARIUM}")
def test_prepare_and_run_on_real_photographs(tmp_path, capsys):
    from vldus.cli import main

    data, prepared, out = few_images(tmp_path), tmp_path / "prepared", tmp_path / "run"
    assert main(["prepare", data, "--unseen", "puffin,shark", "--out", str(prepared), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "test: 5 images" in printed  # the 3 test images + the 2 training images with an unseen object
    rc = main(["run", "--config", str(prepared / "config.yaml"), "--out", str(out), "--quiet", "--select",
               "--rows", "no_synthesis,synthesis_su,synthesis_vldus", "--set", *SHORT])
    assert rc == 0
    with open(out / "metrics.json") as f:
        m = json.load(f)
    assert m["method"] == "synthesis_su"  # no CLIP: the main row fixed in advance without one
    assert set(m) >= {"zsd", "gzsd", "method", "ablation", "timings_s", "detector"}
    rows = m["ablation"]
    for name in ("no_synthesis", "synthesis_su"):
        assert rows[name]["status"] == "ok" and rows[name]["zsd_map"] is not None
        assert rows[name]["scoring_ran"].startswith("ZSD")  # every row calibrated and scored alike
        assert set(rows[name]["by_iou"]["zsd"]["map"]) == {"0.4", "0.5", "0.6"}
    assert os.path.isfile(out / "work" / "synth_no_synthesis" / "gzsd_calibration.json")
    assert rows["synthesis_vldus"]["status"].startswith("skipped: needs a CLIP image encoder")
    assert m["zsd"]["groups"]["unseen"]["map"]["0.5"] == rows["synthesis_su"]["zsd_map"]
    assert {"train-detector", "extract-features", "synthesizer (synthesis_su)"} <= set(m["timings_s"])
    selection = rows["synthesis_su"]["selection"]  # chosen on held-out seen classes (--select)
    assert selection["status"] == "chosen on pseudo-unseen validation"
    assert len(selection["pseudo_unseen"]) == 1 and selection["pseudo_unseen"][0] not in ("puffin", "shark")
    assert (selection["chosen"]["gan.epochs"], selection["chosen"]["unseen_classifier.syn_num"]) in \
        {(c["epochs"], c["syn_num"]) for c in selection["candidates"]}
    report = (out / "report.md").read_text()
    assert "Scoring that ran, per row" in report and "skipped: needs a CLIP" in report
    assert any(p.endswith(".png") for p in os.listdir(out / "pictures"))
    assert os.path.isfile(out / "bundle" / "manifest.json")  # vldus detect --model RUN/bundle
