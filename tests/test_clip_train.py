"""vldus train-clip: hub-layout files that load like a user's CLIP, determinism, resume,
--exclude-unseen, a zero-shot accuracy floor, the distiller on a 32 px CLIP, bad input."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vldus import clip_train
from vldus.clip import clip_image_size, load_open_clip
from vldus.clip_train import (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE,
                              ClipTrainConfig, train_clip, training_set)
from vldus.data.shapes import CLASSES, DEFAULT_UNSEEN
from vldus.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

# About 6 s: 40 steps on the crops of 40 images (about 160 crops), held out: 30 images.
TINY = ClipTrainConfig(steps=40, batch_size=48, lr=3e-3, warmup_steps=5, train_images=40,
                       heldout_images=30, checkpoint_every=20)
# About 1 s: for determinism and resume.
MICRO = ClipTrainConfig(steps=6, batch_size=16, warmup_steps=2, train_images=8, heldout_images=4,
                        checkpoint_every=3)
OTHER_UNSEEN = ["green circle", "blue square", "red triangle", "yellow star"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(output folder, metrics) of one tiny run with seed 0 on all classes."""
    out = tmp_path_factory.mktemp("clip") / "run"
    return str(out), train_clip(out, seed=0, quiet=True, config=TINY)


def _weights(out):
    return load_file(os.path.join(out, WEIGHTS_FILE))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_layout_loads_like_a_users_clip(trained):
    out, metrics = trained
    assert sorted(os.listdir(out)) == sorted([CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE])  # no checkpoint left
    cfg = json.load(open(os.path.join(out, CONFIG_FILE)))
    assert set(cfg) == {"model_cfg", "preprocess_cfg"} and cfg["model_cfg"]["vision_cfg"]["image_size"] == 32
    model = load_open_clip(os.path.join(out, CONFIG_FILE), os.path.join(out, WEIGHTS_FILE))
    assert clip_image_size(model) == (32, 32)
    assert _same(model.state_dict(), _weights(out))
    assert json.load(open(os.path.join(out, METRICS_FILE))) == json.loads(json.dumps(metrics))
    assert metrics["trained_classes"] == list(CLASSES) and metrics["excluded_classes"] == []
    assert metrics["unseen_classes"] == list(DEFAULT_UNSEEN)


def test_accuracy_floor(trained):
    """Chance is 6.25 % over 16 classes; the tiny run reaches about 30 % (the default run > 90 %)."""
    acc = trained[1]["zero_shot_accuracy"]
    assert acc["all"] >= 15.0, acc
    assert trained[1]["heldout_crops"] > 50


def test_embed_cli_reads_the_files(trained, tmp_path):
    from vldus import cli

    out = trained[0]
    se = str(tmp_path / "se.npy")
    assert cli.main(["embed", "--classes", ",".join(CLASSES), "--encoder", "clip", "--quiet",
                     "--arch", os.path.join(out, CONFIG_FILE), "--weights", os.path.join(out, WEIGHTS_FILE),
                     "--out", se]) == 0
    matrix = np.load(se)
    assert matrix.shape == (len(CLASSES) + 1, 512)
    assert json.load(open(se + ".json"))["arch"] == os.path.abspath(os.path.join(out, CONFIG_FILE))


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Output folder of an uninterrupted MICRO run with seed 0."""
    out = tmp_path_factory.mktemp("clip") / "micro"
    train_clip(out, seed=0, quiet=True, config=MICRO)
    return str(out)


def test_deterministic_for_a_seed(micro, tmp_path):
    for seed, same in ((0, True), (1, False)):
        train_clip(tmp_path / str(seed), seed=seed, quiet=True, config=MICRO)
        assert _same(_weights(micro), _weights(tmp_path / str(seed))) is same


@pytest.mark.usefixtures("cpu_only")
def test_resume_gives_the_uninterrupted_weights(micro, tmp_path, monkeypatch, capsys):
    out = tmp_path / "resumed"
    write = clip_train._write_checkpoint
    calls = []

    def write_then_die(path, state):  # killed right after the first checkpoint (step 3)
        write(path, state)
        calls.append(state["step"])
        raise KeyboardInterrupt

    monkeypatch.setattr(clip_train, "_write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_clip(out, seed=0, quiet=True, config=MICRO)
    assert calls == [3] and os.path.isfile(out / CHECKPOINT_FILE)
    assert not os.path.exists(out / WEIGHTS_FILE)
    monkeypatch.setattr(clip_train, "_write_checkpoint", write)
    with pytest.raises(InputError, match="checkpoint.pt: written with other settings.*seed"):
        train_clip(out, seed=3, resume=True, quiet=True, config=MICRO)
    capsys.readouterr()
    metrics = train_clip(out, seed=0, resume=True, config=MICRO, quiet=True)
    assert "resuming after step 3" in capsys.readouterr().out
    assert metrics["resumed_from_step"] == 3
    assert _same(_weights(micro), _weights(out))
    assert not os.path.exists(out / CHECKPOINT_FILE)


def test_exclude_unseen_really_excludes(tmp_path, monkeypatch):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"name": "shapes", "classes": list(CLASSES),
                                 "seen": [c for c in CLASSES if c not in OTHER_UNSEEN],
                                 "unseen": OTHER_UNSEEN}))
    from vldus.data import shapes

    drawn = []
    render = shapes.render_image

    def spy(rng, labels, size, style=shapes.ShapesStyle()):
        image, boxes, objs = render(rng, labels, size, style)
        drawn.extend(CLASSES[int(o)] for o in objs)
        return image, boxes, objs

    monkeypatch.setattr(shapes, "render_image", spy)
    cfg = dataclasses.replace(MICRO, train_images=30)
    data = training_set(0, clip_train.unseen_classes(str(split)), 32, cfg)
    assert set(drawn) == set(CLASSES) - set(OTHER_UNSEEN)
    assert set(data.classes) == set(drawn) and len(data.labels) == len(drawn) == len(data.crops)
    for name in OTHER_UNSEEN:
        assert not any(name in c for c in data.captions)
    # through the command: the unseen classes are the split's, and none was trained on
    monkeypatch.setattr(shapes, "render_image", render)
    m = train_clip(tmp_path / "strict", exclude_unseen=str(split), quiet=True,
                   config=dataclasses.replace(MICRO, steps=2))
    assert m["unseen_classes"] == [c for c in CLASSES if c in OTHER_UNSEEN]
    assert m["excluded_classes"] == m["unseen_classes"]
    assert not set(m["trained_classes"]) & set(OTHER_UNSEEN)


def test_distiller_builds_from_the_trained_clip(trained):
    """train-generator's flags -> the shapes config -> the distiller, on the 32 px CLIP."""
    from vldus.cli import build_parser
    from vldus.config import load_config
    from vldus.synthesis.cli import config_overrides
    from vldus.synthesis.distill import build_distiller

    out = trained[0]
    args = build_parser().parse_args([
        "train-generator", "--config", "shapes", "--distill", "active",
        "--clip-arch", os.path.join(out, CONFIG_FILE), "--clip-weights", os.path.join(out, WEIGHTS_FILE)])
    gan = load_config(args.config, config_overrides(args)).gan
    torch.manual_seed(0)
    dist = build_distiller(gan, torch.nn.functional.normalize(torch.randn(5, 512), dim=1))
    assert dist.image_size == (32, 32)
    x_real, x_fake = torch.randn(4, 1024), torch.randn(4, 1024, requires_grad=True)
    losses = dist(x_real, x_fake, torch.randn(4, 512), torch.randn(4, 512))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    losses["total"].backward()
    assert x_fake.grad.abs().sum() > 0


def test_train_generator_flags_reach_the_config():
    from vldus.cli import build_parser
    from vldus.synthesis.cli import config_overrides

    args = build_parser().parse_args(["train-generator", "--config", "shapes", "--clip-arch", "a.json",
                                      "--clip-weights", "w.safetensors", "--clip-quickgelu", "off"])
    assert {"gan.clip_arch=a.json", "gan.clip_weights=w.safetensors",
            "gan.clip_quickgelu=off"} <= set(config_overrides(args))


@pytest.mark.parametrize("argv, message", [
    (["--exclude-unseen", "missing.json"], "missing.json: not a split file"),
    (["--exclude-unseen", "coco_65_15"], "unknown class name"),
    (["--steps", "0"], "--steps: 0: must be at least 1"),
])
def test_bad_input_exits_2_with_one_line(cli_error, tmp_path, argv, message):
    err = cli_error(["train-clip", "--out", str(tmp_path / "o")] + argv)
    assert message in err


def test_unreadable_checkpoint(cli_error, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / CHECKPOINT_FILE).write_bytes(b"junk")
    assert "checkpoint.pt: not a train-clip checkpoint" in cli_error(
        ["train-clip", "--out", str(out), "--resume", "--steps", "1"])
