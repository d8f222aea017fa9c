"""open_clip from local files: formats, frozen model, one-line errors for files that do not fit."""
import json

import pytest
import torch

from vldus.clip import (build_open_clip, clip_image_size, clip_mean_std, get_clip_tokenizer,
                        load_open_clip)
from vldus.errors import InputError


def test_tiny_clip_fixture(tiny_clip):
    model, weights = tiny_clip
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert clip_image_size(model) == (32, 32)
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, 32, 32))
        txt = model.encode_text(get_clip_tokenizer(tiny_clip.arch)(["a photo of a dog."]))
    assert img.shape == (2, 512) and txt.shape == (1, 512)
    # the same file gives the same model
    again = load_open_clip(tiny_clip.arch, weights)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("fmt", ["training_checkpoint", "safetensors", "torchscript"])
def test_other_weight_formats(tiny_clip, tmp_path, fmt):
    model, _ = tiny_clip
    if fmt == "training_checkpoint":  # open_clip's train loop: DataParallel prefix + extras
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "name": "x",
                    "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:  # OpenAI ships TorchScript archives
        path = tmp_path / "jit.pt"
        torch.jit.script(model).save(str(path))
    loaded = load_open_clip(tiny_clip.arch, path)
    assert _same_weights(model, loaded)


def test_missing_file(tiny_clip, tmp_path):
    with pytest.raises(InputError, match=r"nope.pt: CLIP weights file not found"):
        load_open_clip(tiny_clip.arch, tmp_path / "nope.pt")
    with pytest.raises(InputError, match="no CLIP weights file"):
        load_open_clip(tiny_clip.arch, "")


def test_mismatched_shapes_and_keys(tiny_clip, tmp_path):
    model, weights = tiny_clip
    cfg = json.load(open(tiny_clip.arch))
    cfg["vision_cfg"]["width"] = 96
    cfg["text_cfg"]["layers"] = 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_open_clip(str(other), weights)
    msg = str(e.value)
    assert msg.startswith(weights) and "missing keys" in msg and "shape mismatches" in msg
    extra = dict(model.state_dict(), bogus=torch.zeros(1))
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(InputError, match=r"extra.pt: .*1 unexpected keys \(e.g. bogus\)"):
        load_open_clip(tiny_clip.arch, tmp_path / "extra.pt")


def test_unreadable_and_not_weights_only(tiny_clip, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt: cannot read CLIP weights"):
        load_open_clip(tiny_clip.arch, bad)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "fn": json.dumps}, evil)  # needs full unpickling
    with pytest.raises(InputError, match="evil.pt: cannot read CLIP weights"):
        load_open_clip(tiny_clip.arch, evil)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(InputError, match="list.pt: not a state dict"):
        load_open_clip(tiny_clip.arch, tmp_path / "list.pt")


def test_unknown_arch_and_bad_config(tmp_path):
    with pytest.raises(InputError, match="ViT-Nope: --arch: neither"):
        build_open_clip("ViT-Nope")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(InputError, match="cfg.json: not an open_clip model config"):
        build_open_clip(str(cfg))


def test_config_file_named_like_builtin_does_not_shadow_it(tiny_clip, tmp_path):
    shadow = tmp_path / "ViT-B-32.json"
    shadow.write_text(open(tiny_clip.arch).read())
    assert clip_image_size(build_open_clip(str(shadow))) == (32, 32)
    import open_clip
    assert open_clip.get_model_config("ViT-B-32")["vision_cfg"]["image_size"] == 224


def test_open_clip_config_json_with_preprocess(tiny_clip, tmp_path):
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": json.load(open(tiny_clip.arch)),
                                "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    model = load_open_clip(str(path), tiny_clip.weights_path)
    assert clip_mean_std(model) == ((0.5,) * 3, (0.25,) * 3)


def test_openai_constants_match_open_clip():
    import open_clip
    from vldus.clip import OPENAI_MEAN, OPENAI_STD
    assert OPENAI_MEAN == open_clip.OPENAI_DATASET_MEAN and OPENAI_STD == open_clip.OPENAI_DATASET_STD


# --- QuickGELU: OpenAI's archives -----------------------------------------------------------
@pytest.fixture
def openai_archive(tiny_clip, tmp_path):
    """A TorchScript archive as OpenAI ships them: open_clip's (= OpenAI's) key names plus the
    ``input_resolution`` / ``context_length`` / ``vocab_size`` entries of OpenAI's models."""
    model = tiny_clip.model

    class OpenAICLIP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in model.named_children():
                self.add_module(name, child)
            for name, p in model.named_parameters(recurse=False):
                self.register_parameter(name, p)
            for key, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
                self.register_buffer(key, torch.tensor(value))

        def forward(self, image):
            return self.visual(image)

    path = tmp_path / "ViT-tiny.pt"
    archive = OpenAICLIP()
    assert {k for k in archive.state_dict() if k not in model.state_dict()} == {
        "input_resolution", "context_length", "vocab_size"}
    torch.jit.script(archive).save(str(path))
    return str(path)


def test_openai_archive_selects_quickgelu(tiny_clip, openai_archive, capsys):
    from vldus.clip import read_clip_weights, uses_quick_gelu

    assert read_clip_weights(openai_archive)[1] is True
    assert not uses_quick_gelu(tiny_clip.model)
    model = load_open_clip(tiny_clip.arch, openai_archive)
    out = capsys.readouterr().out
    assert uses_quick_gelu(model)
    assert "OpenAI TorchScript archive" in out and "QuickGELU" in out and openai_archive in out
    assert _same_weights(tiny_clip.model, model)
    with torch.no_grad():  # same weights, other activation: other embeddings (why it matters)
        img = torch.randn(1, 3, 32, 32)
        assert not torch.allclose(model.encode_image(img), tiny_clip.model.encode_image(img))


def test_other_archives_keep_the_named_activation(tiny_clip, tmp_path, capsys):
    from vldus.clip import read_clip_weights, uses_quick_gelu

    path = tmp_path / "scripted.pt"  # an open_clip model scripted by a user: not OpenAI's
    torch.jit.script(tiny_clip.model).save(str(path))
    assert read_clip_weights(str(path))[1] is False
    assert not uses_quick_gelu(load_open_clip(tiny_clip.arch, path))
    assert capsys.readouterr().out == ""
    # converted OpenAI weights in another format: forced by hand
    assert uses_quick_gelu(load_open_clip(tiny_clip.arch, tiny_clip.weights_path, quickgelu="on"))


def test_explicit_mismatch_is_refused(tiny_clip, openai_archive, tmp_path, cli_error):
    with pytest.raises(InputError) as e:
        load_open_clip(tiny_clip.arch, openai_archive, quickgelu="off")
    msg = str(e.value)
    assert msg.startswith(openai_archive) and tiny_clip.arch in msg and "QuickGELU" in msg
    err = cli_error(["embed", "--classes", "dog,cat", "--encoder", "clip", "--arch", tiny_clip.arch,
                     "--weights", openai_archive, "--quickgelu", "off", "--out", str(tmp_path / "se.npy")])
    assert openai_archive in err and tiny_clip.arch in err
    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps(dict(json.load(open(tiny_clip.arch)), quick_gelu=True)))
    with pytest.raises(InputError, match="quick.json: architecture uses QuickGELU, but --quickgelu off"):
        load_open_clip(str(quick), tiny_clip.weights_path, quickgelu="off")
    with pytest.raises(InputError, match="--quickgelu: 'maybe'"):
        load_open_clip(tiny_clip.arch, tiny_clip.weights_path, quickgelu="maybe")


def test_quickgelu_names():
    from vldus.clip import _quickgelu_name, arch_uses_quick_gelu

    assert _quickgelu_name("ViT-B-32") == "ViT-B-32-quickgelu"
    assert arch_uses_quick_gelu("ViT-B-32-quickgelu") and not arch_uses_quick_gelu("ViT-B-32")
