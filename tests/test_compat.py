"""Stage 3a: the compatibility classifier (vldus train-unseen-classifier, docs/design.md §5)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import kill_when
from synthesis_task import make_task
from vldus.cli import main
from vldus.config import load_config
from vldus.data.embeddings import load_class_embeddings
from vldus.errors import InputError
from vldus.synthesis.compat import load_compat_classifier, train_compat_classifier
from vldus.synthesis.data import FeatureFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def task(tmp_path):
    return make_task(tmp_path)


def test_command_writes_published_layout_and_generalises(task, capsys):
    assert main(["train-unseen-classifier", "--config", task.config, "--quiet"]) == 0
    out = os.path.join(task.root, "synth", "compat_classifier.pth")
    state = torch.load(out, weights_only=True)
    assert set(state) == {"fc.weight", "fc.bias"} and state["fc.weight"].shape == (6, 32)
    info = json.load(open(os.path.join(task.root, "synth", "compat_classifier.json")))
    assert info["classes"][0] == "background" and len(info["history"]) == 4
    assert info["best_val_loss"] == min(r["val_loss"] for r in info["history"])
    assert min(r["val_loss"] for r in info["history"]) < 0.5
    # used with the UNSEEN rows (never trained on) it classifies real unseen features (zero-shot)
    cfg = load_config(task.config)
    split = cfg.load_split()
    emb = torch.from_numpy(load_class_embeddings(task.embeddings, split, False))
    model = load_compat_classifier(out, emb[split.unseen_ids], 32)
    x = torch.from_numpy(np.load(os.path.join(task.features_dir, "test_0.6_0.3_feats.npy")))
    y = np.load(os.path.join(task.features_dir, "test_0.6_0.3_labels.npy"))
    truth = torch.from_numpy(np.searchsorted(split.unseen_ids, y[y > 0]))
    accuracy = (model(x[y > 0]).argmax(1) == truth).float().mean()
    assert accuracy > 0.6  # chance: 0.25
    # --resume on a finished run has nothing to do
    assert main(["train-unseen-classifier", "--config", task.config, "--quiet", "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.usefixtures("cpu_only")
def test_resume_equals_uninterrupted(task, tmp_path):
    cfg = load_config(task.config)
    split = cfg.load_split()
    emb = load_class_embeddings(task.embeddings, split, False)
    ff = FeatureFile.open(os.path.join(task.features_dir, "train_0.6_0.3_feats.npy"),
                          os.path.join(task.features_dir, "train_0.6_0.3_labels.npy"), 32, split.num_classes)
    full, hist_full = train_compat_classifier(ff, emb, split.seen_ids, cfg.compat, quiet=True)
    ckpt = str(tmp_path / "ckpt.pth")
    cfg.compat.epochs = 2  # the "killed" run stopped after two epochs
    train_compat_classifier(ff, emb, split.seen_ids, cfg.compat, quiet=True, checkpoint_path=ckpt)
    cfg.compat.epochs = 4
    resumed, hist = train_compat_classifier(ff, emb, split.seen_ids, cfg.compat, quiet=True,
                                            checkpoint_path=ckpt, resume=True)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    for key in full:
        assert torch.equal(full[key], resumed[key])
    assert [r["val_loss"] for r in hist] == [r["val_loss"] for r in hist_full]


@pytest.mark.usefixtures("cpu_only")
def test_kill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    """kill -9 while the command runs an epoch, then --resume: the same classifier as a run that
    was never interrupted."""
    overrides = {"compat.epochs": 12, "compat.batch_size": 8, "compat.lr": 0.1}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = make_task(tmp_path / "a", overrides=overrides)
    assert main(["train-unseen-classifier", "--config", whole.config, "--quiet"]) == 0

    parted = make_task(tmp_path / "b", overrides=overrides)
    ckpt = os.path.join(parted.root, "synth", "compat_checkpoint.pth")
    kill_when([sys.executable, "-m", "vldus.cli", "train-unseen-classifier", "--config", parted.config, "--quiet"],
              ready=lambda: os.path.isfile(ckpt) and torch.load(ckpt, weights_only=True)["epoch"] >= 2)
    out = os.path.join(parted.root, "synth", "compat_classifier.pth")
    assert not os.path.exists(out) and torch.load(ckpt, weights_only=True)["epoch"] < 12
    assert main(["train-unseen-classifier", "--config", parted.config, "--quiet", "--resume"]) == 0

    a = torch.load(os.path.join(whole.root, "synth", "compat_classifier.pth"), weights_only=True)
    b = torch.load(out, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hist_a = json.load(open(os.path.join(whole.root, "synth", "compat_classifier.json")))["history"]
    hist_b = json.load(open(os.path.join(parted.root, "synth", "compat_classifier.json")))["history"]
    assert [r["val_loss"] for r in hist_a] == [r["val_loss"] for r in hist_b]


def test_divergence_is_one_line_naming_epoch_and_checkpoint(tmp_path, capsys):
    """lr x 1e37 from epoch 2 on (a real divergence): exit 1, one line naming epoch 2 and the
    epoch-1 checkpoint, which --resume can continue from."""
    task = make_task(tmp_path, overrides={"compat.lr_step": 1, "compat.lr_gamma": 1e37})
    capsys.readouterr()
    assert main(["train-unseen-classifier", "--config", task.config, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    ckpt = os.path.join(task.root, "synth", "compat_checkpoint.pth")
    assert len(err) == 1 and "error: non-finite loss at epoch 2; last good checkpoint: " in err[0], err
    assert f"{ckpt} (epoch 1)" in err[0]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    assert not os.path.exists(os.path.join(task.root, "synth", "compat_classifier.pth"))


def test_load_rejects_wrong_shapes(tmp_path):
    path = str(tmp_path / "c.pth")
    torch.save({"fc.weight": torch.zeros(7, 32), "fc.bias": torch.zeros(7)}, path)
    with pytest.raises(InputError, match=r"\(7, 32\).*\(6, 32\)"):
        load_compat_classifier(path, torch.zeros(4, 6), 32)
    torch.save({"weight": torch.zeros(6, 32)}, path)
    with pytest.raises(InputError, match="fc.weight"):
        load_compat_classifier(path, torch.zeros(4, 6), 32)


def test_bad_features_are_refused(task, capsys):
    labels = np.load(os.path.join(task.features_dir, "train_0.6_0.3_labels.npy"))
    labels[0] = 40
    np.save(os.path.join(task.features_dir, "train_0.6_0.3_labels.npy"), labels)
    assert main(["train-unseen-classifier", "--config", task.config, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train_0.6_0.3_labels.npy" in err and "1 labels out of range" in err


def test_root_script_is_the_command():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_unseen_classifier.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "vldus train-unseen-classifier" in out.stdout and "--config" in out.stdout
