"""Stage 3 end to end (vldus train-generator): accuracy on a separable synthetic task, outputs,
determinism, resume, the leaky selection, divergence, and every bad input."""
import json
import os

import numpy as np
import pytest
import torch

from synthesis_task import make_task, train_compat
from vldus.cli import main
from vldus.config import load_config
from vldus.synthesis.pipeline import SynthesisOptions, run_synthesis


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The synthetic task with its compatibility classifier (stage 3a) trained."""
    t = make_task(tmp_path_factory.mktemp("task"))
    train_compat(t)
    return t


def run_cli(task, *extra, out_dir=None):
    args = ["train-generator", "--config", task.config, "--quiet", "--device", "cpu"]
    if out_dir:
        args += ["--out-dir", str(out_dir)]
    return main(args + list(extra))


def weights(out_dir):
    return {name: torch.load(os.path.join(out_dir, name), weights_only=True)
            for name in ("generator.pth", "critic.pth", "classifier_best.pth")}


def assert_same(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


# --------------------------------------------------------------------------------------------
def test_synthesized_classifier_recognises_real_unseen_features(task, tmp_path, capsys):
    """Trained on seen classes only, the classifier built from synthesized features classifies
    held-out REAL unseen features (the default selection never looks at them)."""
    out = tmp_path / "synth"
    assert run_cli(task, "--set", "gan.epochs=50", out_dir=out) == 0
    meta = json.load(open(out / "meta.json"))
    acc = meta["results"]["test_mean_class_accuracy"]
    assert acc > 0.9, meta["results"]
    assert meta["settings"]["uses_test_data_for_selection"] is False
    assert meta["selected"] == {"epoch": 50, "cls_epoch": 8, "rule": "last"}
    assert "not used for selection" in capsys.readouterr().out

    # outputs: published classifier layout, rows = [background, unseen ascending]
    cls = torch.load(out / "classifier_best.pth", weights_only=True)
    assert set(cls) == {"fc.weight", "fc.bias"}
    assert cls["fc.weight"].shape == (1 + len(task.unseen_ids), 32)
    assert meta["classifier_rows"] == ["background"] + [f"c{i - 1}" for i in task.unseen_ids]
    assert [c["id"] for c in meta["classes"]["unseen"]] == task.unseen_ids
    assert len(meta["embeddings"]["sha256"]) == 64 and meta["config"]["gan"]["epochs"] == 50
    for name in ("generator.pth", "critic.pth", "losses.png", "features_2d.png", "log.jsonl",
                 "checkpoint_latest.pth"):
        assert (out / name).stat().st_size > 0, name
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in log] == list(range(1, 51))
    assert all(r["iterations"] == 20 and np.isfinite(r["loss_g"]) for r in log)
    # the joint GZSD scoring's threshold, chosen on validation features + the generator
    calib = json.load(open(out / "gzsd_calibration.json"))
    assert calib == meta["gzsd_calibration"] and calib["scoring"] == "joint"
    assert calib["calibration_source"] == "val" and calib["seen_features"].endswith("val_0.6_0.3_feats.npy")
    assert calib["balanced_accuracy"] > 0.7  # well above chance (0.5): the groups are apart
    # calibrate-gzsd on the same inputs rewrites exactly the file train-generator wrote
    os.remove(out / "gzsd_calibration.json")
    assert main(["calibrate-gzsd", "--config", task.config, "--synth-dir", str(out), "--quiet",
                 "--set", "gan.epochs=50"]) == 0
    assert json.load(open(out / "gzsd_calibration.json")) == calib


@pytest.mark.usefixtures("cpu_only")
def test_same_seed_same_weights_and_resume_equals_uninterrupted(task, tmp_path):
    settings = ["--set", "gan.epochs=3", "--set", "gan.epoch_budget=160"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run_cli(task, *settings, out_dir=a) == 0
    assert run_cli(task, *settings, out_dir=b) == 0
    assert_same(weights(a), weights(b))

    # kill after GAN epoch 2 (the checkpoint of epoch 2 is on disk), then --resume
    cfg = load_config(task.config, ["gan.epochs=3", "gan.epoch_budget=160"])

    def kill(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_synthesis(cfg, SynthesisOptions(out_dir=str(c), quiet=True, on_epoch_end=kill))
    assert torch.load(c / "checkpoint_latest.pth", weights_only=True)["epoch"] == 2
    assert run_cli(task, *settings, "--resume", out_dir=c) == 0
    assert_same(weights(a), weights(c))
    assert [json.loads(line)["epoch"] for line in open(c / "log.jsonl")] == [1, 2, 3]
    assert json.load(open(c / "meta.json"))["settings"]["resumed"] is True


def test_resume_refuses_other_settings(task, tmp_path, capsys):
    settings = ["--set", "gan.epochs=1", "--set", "gan.epoch_budget=64"]
    assert run_cli(task, *settings, out_dir=tmp_path) == 0
    assert run_cli(task, *settings, "--set", "gan.lr=0.5", "--resume", out_dir=tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint_latest.pth" in err and "lr" in err


def test_select_on_test_reproduces_published_selection_and_says_so(task, tmp_path, capsys):
    out = tmp_path / "leaky"
    assert run_cli(task, "--select-on-test", "--set", "gan.epochs=2", "--set", "gan.epoch_budget=160",
                   out_dir=out) == 0
    printed = capsys.readouterr().out
    assert "TEST features" in printed and "test data" in printed
    meta = json.load(open(out / "meta.json"))
    assert meta["settings"]["uses_test_data_for_selection"] is True
    assert meta["selected"]["rule"] == "best test accuracy"
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    best = max(max(r["test_accuracy"]) for r in log)
    assert meta["selected"]["test_accuracy"] == pytest.approx(best)
    assert meta["results"]["test_mean_class_accuracy"] == pytest.approx(best)


def test_divergence_names_epoch_and_iteration_and_keeps_checkpoint(task, tmp_path, capsys):
    settings = ["--set", "gan.epoch_budget=160"]
    assert run_cli(task, *settings, "--set", "gan.epochs=1", out_dir=tmp_path) == 0
    before = (tmp_path / "checkpoint_latest.pth").read_bytes()
    rc = run_cli(task, *settings, "--set", "gan.epochs=2", "--set", "gan.lr=1e30", out_dir=tmp_path)
    err = capsys.readouterr().err
    assert rc == 1 and "epoch 1, iteration" in err and "checkpoint_latest.pth" in err
    assert (tmp_path / "checkpoint_latest.pth").read_bytes() == before


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the count, exit 2
# --------------------------------------------------------------------------------------------
@pytest.fixture
def broken(task, tmp_path):
    """A private copy of the task's inputs (features, embeddings, split) to break."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(task.root, root, ignore=shutil.ignore_patterns("synth"))
    os.makedirs(root / "synth")
    shutil.copy(os.path.join(task.root, "synth", "compat_classifier.pth"), root / "synth")
    cfg = open(task.config).read().replace(task.root, str(root))
    (root / "toy.yaml").write_text(cfg)
    return root


def _expect_error(root, capsys, *needles, extra=()):
    rc = main(["train-generator", "--config", str(root / "toy.yaml"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_bad_embedding_rows(broken, capsys):
    np.save(broken / "se.npy", np.random.rand(5, 6).astype(np.float32))
    _expect_error(broken, capsys, "se.npy", "5 rows", "15 rows")


def test_bad_feature_width(broken, capsys):
    path = broken / "features" / "train_0.6_0.3_feats.npy"
    feats = np.load(path)
    np.save(path, np.concatenate([feats, feats[:, :8]], axis=1))
    _expect_error(broken, capsys, "train_0.6_0.3_feats.npy", "width 40", "features.dim 32")


def test_labels_out_of_range(broken, capsys):
    labels = np.load(broken / "features" / "train_0.6_0.3_labels.npy")
    labels[[3, 7]] = [99, -1]
    np.save(broken / "features" / "train_0.6_0.3_labels.npy", labels)
    _expect_error(broken, capsys, "train_0.6_0.3_labels.npy", "2 labels out of range", "row 3")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_features(broken, capsys, monkeypatch, value):
    import vldus.synthesis.data as data

    monkeypatch.setattr(data, "CHUNK_ROWS", 1000)  # the scan goes chunk by chunk
    path = broken / "features" / "train_0.6_0.3_feats.npy"
    feats = np.load(path)
    feats[[10, 2500, 2501], 4] = value
    np.save(path, feats)
    _expect_error(broken, capsys, "train_0.6_0.3_feats.npy", "3 rows contain NaN or inf", "row 10")


def test_seen_class_without_features(broken, capsys):
    feats = np.load(broken / "features" / "train_0.6_0.3_feats.npy")
    labels = np.load(broken / "features" / "train_0.6_0.3_labels.npy")
    keep = labels != 1  # c0, a seen class
    np.save(broken / "features" / "train_0.6_0.3_feats.npy", feats[keep])
    np.save(broken / "features" / "train_0.6_0.3_labels.npy", labels[keep])
    _expect_error(broken, capsys, "train_0.6_0.3_labels.npy", "1 seen classes have no features: c0")


def test_unseen_rows_in_training_features(broken, capsys):
    labels = np.load(broken / "features" / "train_0.6_0.3_labels.npy")
    labels[:4] = 2  # c1 is unseen
    np.save(broken / "features" / "train_0.6_0.3_labels.npy", labels)
    _expect_error(broken, capsys, "train_0.6_0.3_labels.npy", "4 rows of unseen/excluded")


def test_empty_unseen_list(broken, capsys):
    split = json.load(open(broken / "split.json"))
    split["unseen"] = []
    json.dump(split, open(broken / "split.json", "w"))
    _expect_error(broken, capsys, "split.json", "no unseen classes")


def test_label_count_mismatch(broken, capsys):
    labels = np.load(broken / "features" / "train_0.6_0.3_labels.npy")
    np.save(broken / "features" / "train_0.6_0.3_labels.npy", labels[:-5])
    _expect_error(broken, capsys, "train_0.6_0.3_labels.npy", f"{len(labels) - 5} labels for {len(labels)}")


def test_missing_compat_classifier(broken, capsys):
    os.remove(broken / "synth" / "compat_classifier.pth")
    _expect_error(broken, capsys, "compat_classifier.pth", "train-unseen-classifier")


def test_active_distillation_without_clip_weights(broken, capsys):
    _expect_error(broken, capsys, "clip_weights", extra=["--distill", "active"])


def test_detector_checkpoint_with_wrong_class_count(broken, capsys):
    det = broken / "detector" / "epoch_1.pth"
    ckpt = torch.load(det, weights_only=True)
    ckpt["model"] = {k: v[:-1] for k, v in ckpt["model"].items()}
    torch.save(ckpt, det)
    _expect_error(broken, capsys, "epoch_1.pth", "(14, 32)", "(15, 32)")


# --------------------------------------------------------------------------------------------
# The data pool (docs/design.md §6.2) and the memory-mapped reader
# --------------------------------------------------------------------------------------------
def test_epoch_pool_and_batches():
    from vldus.synthesis.data import sample_batches, sample_epoch_pool

    labels = torch.tensor([0] * 100 + [1] * 10 + [2] * 20)  # 30 fg, 3 labels -> 10 bg
    g = torch.Generator().manual_seed(0)
    pool = sample_epoch_pool(labels, 1000, g)
    assert (labels[pool] > 0).sum() == 30 and (labels[pool] == 0).sum() == 10
    assert len(set(pool.tolist())) == 40
    assert len(sample_epoch_pool(labels, 25, g)) == 25
    batches = sample_batches(40, 16, g)
    assert batches.shape == (3, 16)  # ceil(40 / 16) full batches
    assert all(len(set(b.tolist())) == 16 for b in batches) and batches.max() < 40
    assert sample_batches(10, 16, g).shape == (0, 16)  # a short pool gives no batch


def test_gather_keeps_order_across_chunks(tmp_path, monkeypatch):
    import vldus.synthesis.data as data

    feats = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "l.npy", np.zeros(50, np.int64))
    monkeypatch.setattr(data, "GATHER_ROWS", 7)
    ff = data.FeatureFile.open(str(tmp_path / "f.npy"), str(tmp_path / "l.npy"), 4, 3)
    rows = np.array([49, 3, 3, 20, 0, 17, 8, 49])
    assert torch.equal(ff.gather(rows), torch.from_numpy(feats[rows]))
