"""`vldus calibrate-gzsd`: the joint GZSD threshold from validation features + the generator, no test data.

A hand-made task whose answer is known: four features, the detector's cls_score all zero (so
every box has ``e_s = log 3``: three seen classes, logits 0, background 0), the synthesized
classifier's unseen row reads feature 0 (``e_u = x0``), so a box's margin is ``x0 - log 3``. The
generator outputs ``[3 (a2 - 0.1), 0, 0, 0]`` whatever the noise (a2: the class embedding's last
entry, 1.1 for the unseen class, 0.1 for the seen ones): every synthesized unseen row has margin
``3 - log 3``, every synthesized seen row ``-log 3`` (the chance check passes). The validation
seen rows have ``x0 = 0, 0, 0, 5`` (one look-alike): the best cut lies between ``-log 3`` and
``3 - log 3`` with balanced accuracy ``(3/4 + 1) / 2 = 0.875``, threshold ``1.5 - log 3``.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import yaml
from file_spy import files_opened

from vldus.cli import main
from vldus.synthesis.models import Generator

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, NZ, ATT = 4, 2, 3
CLASSES = ["c0", "c1", "c2", "c3"]  # c1 unseen: seen ids 1, 3, 4; unseen id 2
EXPECTED_THRESHOLD = 1.5 - math.log(3)


@pytest.fixture
def task(tmp_path):
    """The hand-made task (module doc); its test files exist and hold poison (NaN features,
    out-of-range labels, an annotation file that is not JSON) so that reading them would change
    the result or fail."""
    root = tmp_path
    (root / "split.json").write_text(json.dumps({"name": "hand", "classes": CLASSES, "unseen": ["c1"]}))
    np.save(root / "se.npy", np.eye(len(CLASSES) + 1, ATT, dtype=np.float32) + 0.1)
    (root / "detector").mkdir()
    torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": torch.zeros(5, DIM),
                          "roi_heads.box_predictor.cls_score.bias": torch.zeros(5)}, "epoch": 1},
               root / "detector" / "epoch_1.pth")
    fdir = root / "features"
    fdir.mkdir()
    val = np.zeros((6, DIM), np.float32)
    val[3, 0] = 5.0  # the look-alike
    np.save(fdir / "val_0.6_0.3_feats.npy", val)
    np.save(fdir / "val_0.6_0.3_labels.npy", np.array([1, 3, 4, 1, 0, 0], np.int64))  # 4 seen + 2 bg
    np.save(fdir / "test_0.6_0.3_feats.npy", np.full((6, DIM), np.nan, np.float32))
    np.save(fdir / "test_0.6_0.3_labels.npy", np.full(6, 99, np.int64))
    np.save(fdir / "train_0.6_0.3_feats.npy", np.full((6, DIM), 7.0, np.float32))  # must not be used
    np.save(fdir / "train_0.6_0.3_labels.npy", np.array([1, 3, 4, 1, 0, 0], np.int64))
    (root / "instances_test.json").write_text("poison: not JSON")
    synth = root / "synth"
    synth.mkdir()
    G = Generator(NZ, ATT, 8, DIM)
    with torch.no_grad():
        for p in G.parameters():
            p.zero_()
        G.fc1_att.weight[0, 2] = 1.0  # hidden unit 0 = a2
        G.fc2.weight[0, 0], G.fc2.bias[0] = 3.0, -0.3
    torch.save(G.state_dict(), synth / "generator.pth")
    weight = torch.zeros(2, DIM)
    weight[1, 0] = 1.0
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(2)}, synth / "classifier_best.pth")
    cfg = {"name": "hand", "split": str(root / "split.json"), "work_dir": str(root),
           "data": {"test": {"format": "coco", "ann_file": str(root / "instances_test.json"), "img_dir": str(root)},
                    "val": {"format": "coco", "ann_file": str(root / "instances_val.json"), "img_dir": str(root)}},
           "features": {"dim": DIM}, "embeddings": {"file": str(root / "se.npy"), "spectral_norm": False},
           "gan": {"nz": NZ, "ngh": 8, "seed": 3}, "inference": {"bg_blend": 0.35, "gzsd_min_separation": 0.75}}
    (root / "hand.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _calibrate(root, *extra) -> dict:
    assert main(["calibrate-gzsd", "--config", str(root / "hand.yaml"), "--synth-dir", str(root / "synth"),
                 "--quiet", *extra]) == 0
    return json.loads((root / "synth" / "gzsd_calibration.json").read_text())


def test_known_threshold_and_balanced_accuracy(task, capsys):
    out = _calibrate(task)
    assert out["balanced_accuracy"] == pytest.approx(0.875)
    assert out["threshold"] == pytest.approx(EXPECTED_THRESHOLD, abs=1e-5)
    assert out["scoring"] == "joint" and out["calibration_source"] == "val"
    assert out["seen_rows"] == 4 and out["unseen_rows"] == 4000  # 4 seen validation rows; 4000 / 1 unseen class
    assert out["synthetic_seen_rows"] == 3999 and out["synthetic_auc"] == 1.0  # 1333 per seen class
    assert "no test data" in out["source"] and out["bg_blend"] == 0.35
    assert out["detector_sha256"] and out["classifier_sha256"]
    assert "calibrate-gzsd:" in capsys.readouterr().out


def test_below_min_separation_keeps_the_published_scoring(task):
    out = _calibrate(task, "--set", "inference.gzsd_min_separation=0.9")
    assert out["balanced_accuracy"] == pytest.approx(0.875) and out["scoring"] == "published"


def test_a_margin_that_only_tells_synthesized_features_keeps_the_published_scoring(task):
    """The generator ignores the class (every row [3, 0, 0, 0]): its seen rows get the margin of
    its unseen ones, so the calibration's separation is that of real from synthesized rows."""
    G = Generator(NZ, ATT, 8, DIM)
    with torch.no_grad():
        for p in G.parameters():
            p.zero_()
        G.fc2.bias[0] = 3.0
    torch.save(G.state_dict(), task / "synth" / "generator.pth")
    out = _calibrate(task)
    assert out["balanced_accuracy"] == pytest.approx(0.875)
    assert out["threshold"] == pytest.approx(EXPECTED_THRESHOLD, abs=1e-5)
    assert out["synthetic_auc"] == 0.5 and out["scoring"] == "published"


def test_never_reads_test_or_training_data(task):
    """The spy records every file opened; the test files are poisoned and then removed: the
    result is the same and none of them (nor the training features) was ever opened."""
    with files_opened() as opened:
        poisoned = _calibrate(task)
    assert any(p.endswith("val_0.6_0.3_feats.npy") for p in opened)  # the spy sees the reads
    forbidden = {str(task / "instances_test.json")} | {
        str(task / "features" / f"{s}_0.6_0.3_{k}.npy") for s in ("test", "train") for k in ("feats", "labels")}
    assert not forbidden & set(opened), "the GZSD calibration read test or training data"
    for path in forbidden:
        os.remove(path)
    assert _calibrate(task) == poisoned


def test_without_validation_split_falls_back_to_training_features_and_says_so(task, capsys):
    cfg = yaml.safe_load((task / "hand.yaml").read_text())
    del cfg["data"]["val"]
    (task / "hand.yaml").write_text(yaml.safe_dump(cfg))
    out = _calibrate(task)
    assert out["calibration_source"] == "train" and out["seen_features"].endswith("train_0.6_0.3_feats.npy")
    assert "TRAINING" in out["source"]
    assert "warning: the config has no validation split" in capsys.readouterr().err


def test_missing_validation_features_is_one_line(task, cli_error):
    os.remove(task / "features" / "val_0.6_0.3_feats.npy")
    err = cli_error(["calibrate-gzsd", "--config", str(task / "hand.yaml"), "--synth-dir", str(task / "synth")])
    assert "val_0.6_0.3_feats.npy" in err and "vldus extract-features" in err and "--data-split val" in err


def test_deterministic(task):
    assert _calibrate(task) == _calibrate(task)


def test_non_finite_generator_is_one_line(task, cli_error):
    state = torch.load(task / "synth" / "generator.pth", weights_only=True)
    state["fc2.bias"][0] = float("nan")
    torch.save(state, task / "synth" / "generator.pth")
    err = cli_error(["calibrate-gzsd", "--config", str(task / "hand.yaml"), "--synth-dir", str(task / "synth")])
    assert "generator.pth" in err and "NaN" in err


def test_missing_generator_is_one_line(task, tmp_path, cli_error):
    os.remove(task / "synth" / "generator.pth")
    err = cli_error(["calibrate-gzsd", "--config", str(task / "hand.yaml"), "--synth-dir", str(task / "synth")])
    assert "generator.pth" in err


def test_default_device_is_train_generators(task, monkeypatch):
    """calibrate-gzsd rewrites what train-generator wrote: with no --device both take CUDA when
    it is there (calibrate-gzsd used the CPU)."""
    from vldus.synthesis import calibrate
    from vldus.synthesis.compat import default_device

    used = []

    def record(cfg, synth_dir, checkpoint, features_dir, device="cpu", warn=True, generator=None):
        used.append(device)
        raise StopIteration

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(calibrate, "calibrate_synth_dir", record)
    with pytest.raises(StopIteration):
        main(["calibrate-gzsd", "--config", str(task / "hand.yaml"), "--synth-dir", str(task / "synth"), "--quiet"])
    assert used == [default_device(None)] == ["cuda"]
