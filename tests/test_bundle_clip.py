"""A bundle made with the clip encoder is one folder: `vldus export` copies the CLIP files into it,
so `vldus detect` / the API still work after the original CLIP file is gone.

Everything is tiny and hand-made (random detector, generator and features; the tiny CLIP of
conftest), so the test runs in seconds and never needs the quick demo.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from vldus import cli
from vldus.bundle import MANIFEST, export_bundle, load_bundle
from vldus.config import load_config
from vldus.errors import InputError


@pytest.fixture
def clip_run(tmp_path, tiny_clip):
    """(cfg, checkpoint, synth_dir, clip_copy_dir): a trained-run layout whose class embeddings
    were built by `vldus embed --encoder clip` from a CLIP copy the test may delete."""
    from vldus.detection.model import build_detector
    from vldus.synthesis.data import feature_file_paths
    from vldus.synthesis.models import Generator

    shapes = str(tmp_path / "shapes")
    assert cli.main(["make-shapes", "--out", shapes, "--train-images", "2", "--test-images", "1", "--quiet"]) == 0
    clip_dir = tmp_path / "clip_original"
    clip_dir.mkdir()
    weights = shutil.copy(tiny_clip.weights_path, clip_dir / "tiny_clip.pt")
    arch = shutil.copy(tiny_clip.arch, clip_dir / "tiny_clip_config.json")
    se = str(tmp_path / "se_clip.npy")
    assert cli.main(["embed", "--classes", os.path.join(shapes, "split.json"), "--encoder", "clip",
                     "--arch", str(arch), "--weights", str(weights), "--out", se, "--quiet"]) == 0

    cfg = load_config("shapes")
    cfg.split = os.path.join(shapes, "split.json")
    cfg.work_dir = str(tmp_path / "work")
    cfg.embeddings.file = se
    cfg.gan.ngh = 32
    split = cfg.load_split()
    torch.manual_seed(0)
    ckpt = str(tmp_path / "det.pth")
    torch.save({"model": build_detector(cfg, split, load_backbone=False).state_dict(),
                "classes": list(split.classes)}, ckpt)
    for data_split in ("train", "val"):  # val: the seen rows the bundle's GZSD calibration uses
        feats_path, labels_path = feature_file_paths(cfg.path("features"), data_split, cfg.features.fg_iou,
                                                     cfg.features.bg_iou)
        os.makedirs(os.path.dirname(feats_path), exist_ok=True)
        np.save(feats_path, np.random.default_rng(0).random((12, cfg.features.dim), dtype=np.float32))
        np.save(labels_path, np.array([0] * 8 + [1] * 4, dtype=np.int64))
    synth = str(tmp_path / "synth")
    os.makedirs(synth)
    torch.save(Generator(cfg.gan.nz, 512, cfg.gan.ngh, cfg.features.dim).state_dict(),
               os.path.join(synth, "generator.pth"))
    return cfg, ckpt, synth, str(clip_dir)


def test_bundle_carries_its_clip(clip_run, tmp_path):
    from vldus.api import ZeroShotDetector

    cfg, ckpt, synth, clip_dir = clip_run
    bundle = str(tmp_path / "bundle")
    manifest = export_bundle(cfg, bundle, ckpt, synth, background_rows=8)
    with open(os.path.join(bundle, "encoder.json")) as f:
        enc = json.load(f)
    assert enc["encoder"] == "clip"
    assert enc["weights"] == "clip/tiny_clip.pt" and enc["arch"] == "clip/tiny_clip_config.json"
    assert {"clip/tiny_clip.pt", "clip/tiny_clip_config.json"} <= set(manifest["files"])

    shutil.rmtree(clip_dir)  # the original CLIP is gone; the bundle moves too
    moved = str(tmp_path / "elsewhere" / "bundle")
    shutil.move(bundle, moved)
    det = ZeroShotDetector.load(moved)
    det.set_classes(["blue circle", "red square"])
    image = torch.rand(3, 64, 64)
    out = det([image], score_thresh=0.0)
    assert len(out) == 1 and set(out[0]) >= {"boxes", "labels", "scores"}


def test_bundle_clip_copy_is_checked(clip_run, tmp_path):
    """The copied CLIP file is in the manifest: a modified copy is refused like any bundle file."""
    cfg, ckpt, synth, _ = clip_run
    bundle = str(tmp_path / "bundle")
    export_bundle(cfg, bundle, ckpt, synth, background_rows=8)
    with open(os.path.join(bundle, "clip", "tiny_clip.pt"), "ab") as f:
        f.write(b"x")
    with pytest.raises(InputError, match="sha256"):
        load_bundle(bundle)
    with open(os.path.join(bundle, MANIFEST)) as f:
        assert "clip/tiny_clip.pt" in json.load(f)["files"]
