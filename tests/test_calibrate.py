"""`vldus calibrate-gzsd`: the joint GZSD threshold from training features + the generator, no test data."""
from __future__ import annotations

import builtins
import json
import os

import pytest
import torch
import yaml

from synthesis_task import make_task
from vldus.cli import main
from vldus.synthesis.models import Generator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Toy task + a random generator and synthesized classifier in WORK/synth; the config names
    test annotations that exist (so reading them would succeed and go unnoticed without the spy)."""
    root = tmp_path_factory.mktemp("calib")
    task = make_task(root, per_class=40)
    test_ann = root / "instances_test.json"
    test_ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with open(task.config) as f:
        cfg = yaml.safe_load(f)
    cfg["data"] = {"test": {"format": "coco", "ann_file": str(test_ann), "img_dir": str(root)}}
    with open(task.config, "w") as f:
        yaml.safe_dump(cfg, f)
    synth_dir = root / "synth"
    synth_dir.mkdir()
    torch.manual_seed(0)
    gan = cfg["gan"]
    torch.save(Generator(gan["nz"], 6, gan["ngh"], 32).state_dict(), synth_dir / "generator.pth")
    rows = 1 + len(task.unseen_ids)
    torch.save({"fc.weight": torch.randn(rows, 32), "fc.bias": torch.zeros(rows)}, synth_dir / "classifier_best.pth")
    return task, str(synth_dir), str(test_ann)


def test_writes_calibration_without_reading_test_data(synth, monkeypatch, capsys):
    task, synth_dir, test_ann = synth
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    assert main(["calibrate-gzsd", "--config", task.config, "--synth-dir", synth_dir, "--quiet"]) == 0
    monkeypatch.undo()
    paths = [p for p in opened if isinstance(p, str)]
    assert any(p.endswith("train_0.6_0.3_feats.npy") for p in paths)  # the spy sees the reads
    assert any(p.endswith("generator.pth") for p in paths)
    test_files = {test_ann} | {os.path.join(task.features_dir, f"test_0.6_0.3_{k}.npy") for k in ("feats", "labels")}
    assert not test_files & set(paths), "the GZSD calibration read test data"
    out = json.loads(open(os.path.join(synth_dir, "gzsd_calibration.json")).read())
    assert "no test data" in out["source"]
    assert out["unseen_rows"] > 0 and out["seen_rows"] == 40 * 10  # all seen training rows (< 4000)
    assert 0.5 <= out["balanced_accuracy"] <= 1.0
    # a random generator and classifier: joint only where the two groups separate
    assert out["scoring"] == ("joint" if out["balanced_accuracy"] >= out["min_separation"] else "published")
    assert "calibrate-gzsd:" in capsys.readouterr().out


def test_deterministic(synth):
    task, synth_dir, _ = synth
    outs = []
    for _ in range(2):
        assert main(["calibrate-gzsd", "--config", task.config, "--synth-dir", synth_dir, "--quiet"]) == 0
        outs.append(json.loads(open(os.path.join(synth_dir, "gzsd_calibration.json")).read()))
    assert outs[0] == outs[1]


def test_missing_generator_is_one_line(synth, tmp_path, cli_error):
    task, _, _ = synth
    err = cli_error(["calibrate-gzsd", "--config", task.config, "--synth-dir", str(tmp_path)])
    assert "generator.pth" in err
