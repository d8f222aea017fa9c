"""The released classifier files, in and out (vldus.classifier_files).

The released files are written here the way the released code writes them: modules whose
layer attribute is ``fc1`` (``ClsModelTrain``: Linear(F -> 1+U); ``ClsUnseenTrain``: Linear(F ->
d) plus a plain-attribute embedding matrix), saved with the released ``torch.save`` call shapes,
and their storages tagged as CUDA tensors (the released code trains on a GPU), so reading them on
a CPU machine needs ``map_location='cpu'``.
"""
import contextlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synthesis_task import make_task
from vldus.classifier_files import read_linear, write_linear
from vldus.cli import main
from vldus.config import load_config
from vldus.detection.zsd import load_syn_classifier
from vldus.errors import InputError
from vldus.synthesis.compat import load_compat_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 32


class ClsModelTrain(nn.Module):  # the released synthesized classifier: one layer named fc1
    def __init__(self, dim, rows):
        super().__init__()
        self.fc1 = nn.Linear(dim, rows)


class ClsUnseen(nn.Module):  # the released compatibility classifier: fc1 + a plain matrix W
    def __init__(self, dim, att):
        super().__init__()
        self.W = att.float()  # a plain attribute: not in the state dict
        self.fc1 = nn.Linear(dim, att.shape[1])

    def forward(self, x):
        return F.log_softmax(self.fc1(x) @ self.W.T, dim=1)


@contextlib.contextmanager
def saved_as_cuda():
    """torch.save tags every storage 'cuda:0', as a file saved from GPU tensors is tagged."""
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    try:
        yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("task"), dim=DIM)


@pytest.fixture(scope="module")
def split(task):
    return load_config(task.config).load_split()


def test_cuda_tagged_file_needs_map_location(tmp_path):
    path = str(tmp_path / "c.pth")
    with saved_as_cuda():
        torch.save({"fc1.weight": torch.ones(2, 3), "fc1.bias": torch.zeros(2)}, path)
    if not torch.cuda.is_available():  # the tag is real: a plain load fails on a CPU machine
        with pytest.raises(RuntimeError):
            torch.load(path, weights_only=True)
    w, b = read_linear(path, "x")
    assert w.device.type == "cpu" and torch.equal(w, torch.ones(2, 3))


@pytest.mark.parametrize("name", ["classifier_best.pth", "classifier_latest.pth", "classifier_3_7.pth"])
def test_released_synthesized_classifier_loads(tmp_path, split, name):
    torch.manual_seed(0)
    model = ClsModelTrain(DIM, 1 + len(split.unseen_ids))
    path = str(tmp_path / name)
    with saved_as_cuda():  # released train_cls.py
        torch.save({"state_dict": model.state_dict(), "epoch": 6}, path)
    w, b = load_syn_classifier(path, split, in_features=DIM)
    assert torch.equal(w, model.fc1.weight.detach()) and torch.equal(b, model.fc1.bias.detach())


def test_released_compat_classifier_loads_and_scores_alike(tmp_path, task, split):
    emb = torch.from_numpy(np.load(task.embeddings))
    torch.manual_seed(0)
    released = ClsUnseen(DIM, emb[[0] + split.seen_ids])
    path = str(tmp_path / "unseen_Classifier_6515.pth")
    with saved_as_cuda():  # released train_unseen_classifier.py
        torch.save(released.state_dict(), path)
    ours = load_compat_classifier(path, emb[split.unseen_ids], DIM)
    released.W = emb[split.unseen_ids]  # how the released GAN trainer uses it (ClsUnseen)
    x = torch.rand(5, DIM)
    with torch.no_grad():
        torch.testing.assert_close(F.log_softmax(ours(x), dim=1), released(x))  # ours: logits


@pytest.mark.parametrize("kind", ["synthesized", "compat"])
def test_published_layout_round_trip_and_loads_in_released_modules(tmp_path, kind):
    weight, bias = torch.randn(5, DIM), torch.randn(5)
    path = str(tmp_path / "out.pth")
    write_linear(weight, bias, path, "published", kind, epoch=14)
    obj = torch.load(path, weights_only=True)
    if kind == "synthesized":  # released reader: torch.load(f)['state_dict']['fc1.weight']
        assert obj["epoch"] == 14
        obj = obj["state_dict"]
    released = ClsModelTrain(DIM, 5)
    released.load_state_dict(obj)  # strict: exactly the released module's keys
    assert torch.equal(released.fc1.weight.detach(), weight)
    w, b = read_linear(path, "x")
    assert torch.equal(w, weight) and torch.equal(b, bias)
    write_linear(weight, bias, path, "ours", kind)
    assert set(torch.load(path, weights_only=True)) == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("obj,pattern", [
    ({"state_dict": {"fc1.weight": torch.zeros(2, 3)}, "epoch": 0}, "no 'fc.weight'"),
    ({"fc1.weight": torch.zeros(2, 3), "fc1.bias": torch.zeros(2), "W": torch.zeros(2)}, "expected only"),
    ({"fc1.weight": torch.full((2, 3), float("nan")), "fc1.bias": torch.zeros(2)}, "NaN"),
    ([1, 2], "expected a state dict"),
])
def test_bad_files_are_input_errors(tmp_path, obj, pattern):
    path = str(tmp_path / "bad.pth")
    torch.save(obj, path)
    with pytest.raises(InputError, match=pattern) as e:
        read_linear(path, "synthesized classifier")
    assert path in str(e.value)


def test_cli_published_layout_out_and_released_files_in(task, tmp_path, split):
    """train-unseen-classifier and train-generator write the released layouts; train-generator
    takes the released compatibility classifier (--compat-classifier) and vldus test's reader
    the released classifier_best.pth."""
    compat = str(tmp_path / "unseen_Classifier.pth")
    assert main(["train-unseen-classifier", "--config", task.config, "--quiet", "--out", compat,
                 "--layout", "published", "--set", "compat.epochs=1"]) == 0
    assert set(torch.load(compat, weights_only=True)) == {"fc1.weight", "fc1.bias"}
    out = tmp_path / "synth"
    assert main(["train-generator", "--config", task.config, "--quiet", "--device", "cpu",
                 "--out-dir", str(out), "--compat-classifier", compat, "--layout", "published",
                 "--set", "gan.epochs=1", "gan.epoch_budget=64", "unseen_classifier.epochs=2"]) == 0
    cls = torch.load(out / "classifier_best.pth", weights_only=True)
    assert cls["epoch"] == 1 and set(cls["state_dict"]) == {"fc1.weight", "fc1.bias"}
    w, _ = load_syn_classifier(str(out / "classifier_best.pth"), split, in_features=DIM)
    assert torch.equal(w, cls["state_dict"]["fc1.weight"])


def test_cli_missing_compat_classifier(task, tmp_path, cli_error):
    err = cli_error(["train-generator", "--config", task.config, "--quiet", "--device", "cpu",
                     "--out-dir", str(tmp_path), "--compat-classifier", str(tmp_path / "none.pth")])
    assert "none.pth" in err and "not found" in err
