"""``vldus export``: one folder with everything needed to detect classes named at run time.

Bundle layout (format version :data:`FORMAT_VERSION`; safetensors + JSON/YAML only, no pickle):

    BUNDLE/detector.safetensors    the trained detector's state dict (all C+1 class rows)
    BUNDLE/generator.safetensors   the feature generator G(z, a) (vldus.synthesis.models.Generator)
    BUNDLE/background.safetensors  "features" (N, dim) real background RoI features sampled from the
                                   training features (the unseen classifier's background class),
                                   "detector_bg_weight" (dim,), "detector_bg_bias" (1,): the
                                   detector's own background row; "seen_features" (M, dim) and
                                   "seen_labels" (M,) int64: up to 4000 real seen RoI features of
                                   the validation images (training images without ``data.val``),
                                   on which the API calibrates its GZSD scoring
    BUNDLE/encoder.json            how class names become embeddings: {"encoder": "attributes" |
                                   "clip" | "minilm", encoder settings (attribute vocabulary; CLIP
                                   arch + weights + sha256, paths relative to BUNDLE; MiniLM folder;
                                   prompts),
                                   "spectral_norm": bool, "scale": float, "dim": int}. A new name's
                                   raw embedding is divided by ``scale`` = the largest singular
                                   value of the raw TRAINING matrix (1.0 without spectral norm), so
                                   new names live on the scale the generator was trained on.
    BUNDLE/split.json              {"name", "classes" (detector order), "seen", "unseen", "excluded"}
    BUNDLE/config.yaml             the run's config (detector norm resolved, no external weights)
    BUNDLE/clip/                   with the clip encoder: a copy of the CLIP weights file (and of
                                   the arch's config JSON when the arch is a file), so the bundle
                                   is one folder that can move to another machine
    BUNDLE/manifest.json           {"format": "vldus-bundle", "format_version", "vldus_version",
                                   "created", "files": {name: {"sha256", "bytes"}}}
    BUNDLE/cache/                  trained classifiers of `vldus detect` (not in the manifest)

:func:`load_bundle` checks the format version and every file's sha256 (InputError otherwise).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from vldus.config import add_set_argument
from vldus.errors import InputError
from vldus.files import sha256_file, write_json

FORMAT = "vldus-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DETECTOR_FILE = "detector.safetensors"
GENERATOR_FILE = "generator.safetensors"
BACKGROUND_FILE = "background.safetensors"
ENCODER_FILE = "encoder.json"
SPLIT_FILE = "split.json"
CONFIG_FILE = "config.yaml"
BUNDLE_FILES = (DETECTOR_FILE, GENERATOR_FILE, BACKGROUND_FILE, ENCODER_FILE, SPLIT_FILE, CONFIG_FILE)
CACHE_DIR = "cache"
CLIP_DIR = "clip"


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def _encoder_settings(cfg, split, raw: np.ndarray, encoder: Optional[str]) -> dict:
    """encoder.json minus the scale: which encoder built ``cfg.embeddings.file`` and its settings.

    Read from the ``vldus embed`` sidecar (``FILE.json``); a file without sidecar is accepted as
    the attributes encoder when it equals ``attribute_matrix(classes)`` (the make-shapes file).
    """
    from vldus.data.embeddings import sidecar_path
    from vldus.data.shapes import ATTRIBUTE_NAMES, attribute_matrix

    path = cfg.embeddings.file
    side = sidecar_path(path)
    meta: dict = {}
    if os.path.isfile(side):
        with open(side) as f:
            meta = json.load(f)
    name = encoder or meta.get("encoder")
    if name is None:
        try:
            matches = np.allclose(attribute_matrix(list(split.classes)), raw)
        except InputError:
            matches = False
        if not matches:
            raise InputError(path, f"cannot tell which encoder built it (no sidecar {side}); pass --encoder")
        name = "attributes"
    if name == "attributes":
        expected = attribute_matrix(list(split.classes), source=path)
        if expected.shape != raw.shape or not np.allclose(expected, raw):
            raise InputError(path, "is not the attribute matrix of the split's classes (--encoder attributes)")
        return {"encoder": "attributes", "attributes": list(ATTRIBUTE_NAMES)}
    if name == "clip":
        if not meta.get("weights"):
            raise InputError(side, "clip encoder: the sidecar names no CLIP weights file")
        return {"encoder": "clip", "arch": meta.get("arch"), "weights": meta["weights"],
                "weights_sha256": meta.get("weights_sha256"), "prompts": meta.get("prompts"),
                "quickgelu": meta.get("quickgelu", "auto")}
    if name == "minilm":
        return {"encoder": "minilm", "model": meta.get("model"), "prompts": meta.get("prompts")}
    raise InputError("--encoder", f"{name!r}: expected attributes, clip or minilm")


def _copy_clip_files(enc: dict, out: str) -> list[str]:
    """Copy a clip encoder's weights (and its arch config JSON, when the arch is a file) into
    ``out/clip/`` and point ``enc`` at the copies, relative to the bundle; returns their
    bundle-relative names (listed in the manifest). No-op for the other encoders."""
    import shutil

    if enc.get("encoder") != "clip":
        return []
    weights = enc["weights"]
    if not os.path.isfile(weights):
        raise InputError(weights, "CLIP weights of the embeddings' encoder not found (named by the sidecar)")
    if enc.get("weights_sha256") and sha256_file(weights) != enc["weights_sha256"]:
        raise InputError(weights, "CLIP weights differ from the ones the embeddings were made with (sha256)")
    os.makedirs(os.path.join(out, CLIP_DIR), exist_ok=True)
    names = []
    for key in ("weights", "arch"):
        src = enc.get(key)
        if key == "arch" and not (src and os.path.isfile(src)):
            continue  # an open_clip model name travels as text
        name = f"{CLIP_DIR}/{os.path.basename(src)}"
        shutil.copyfile(src, os.path.join(out, name))
        enc[key] = name
        names.append(name)
    return names


def _sample_background(cfg, rows: int) -> np.ndarray:
    """Up to ``rows`` background rows (label 0) of the training features, float32 (N, dim)."""
    from vldus.synthesis.data import feature_file_paths

    feats_path, labels_path = feature_file_paths(cfg.path("features"), "train", cfg.features.fg_iou,
                                                 cfg.features.bg_iou)
    for p in (feats_path, labels_path):
        if not os.path.isfile(p):
            raise InputError(p, "training features not found (run vldus extract-features first)")
    labels = np.load(labels_path, mmap_mode="r")
    feats = np.load(feats_path, mmap_mode="r")
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0] or feats.shape[1] != cfg.features.dim:
        raise InputError(feats_path, f"shape {feats.shape} does not fit {labels_path} ({labels.shape[0]} rows) "
                                     f"and features.dim {cfg.features.dim}")
    bg = np.flatnonzero(np.asarray(labels) == 0)
    if len(bg) == 0:
        raise InputError(labels_path, "no background rows (label 0)")
    pick = np.sort(np.random.default_rng(cfg.gan.seed).permutation(bg)[:rows])
    out = np.asarray(feats[pick], dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError(feats_path, "background features contain NaN or infinite values")
    return out


def export_bundle(cfg, out: str, checkpoint: Optional[str] = None, synth_dir: Optional[str] = None,
                  background_rows: int = 4096, encoder: Optional[str] = None) -> dict:
    """Write the bundle of a trained run to ``out`` (see the module doc); returns the manifest.

    ``checkpoint``: detector (default: the latest WORK_DIR/detector/epoch_N.pth);
    ``synth_dir``: folder with ``generator.pth`` (default WORK_DIR/synth).
    """
    from safetensors.torch import save_file

    from vldus import __version__
    from vldus.config import save_config
    from vldus.data.embeddings import load_class_embeddings
    from vldus.detection.model import load_detector, resolve_norm
    from vldus.detection.train import latest_checkpoint
    from vldus.synthesis.calibrate import SEED_KEY, pick_seen_rows, seen_feature_file
    from vldus.synthesis.data import derive_seed
    from vldus.synthesis.models import load_generator

    if background_rows < 1:
        raise InputError("--background-rows", f"must be positive, got {background_rows}")
    split = cfg.load_split()
    checkpoint = checkpoint or latest_checkpoint(cfg.path("detector"))
    if not checkpoint:
        raise InputError(cfg.path("detector"), "no detector checkpoint (epoch_N.pth); pass --checkpoint")
    model = load_detector(cfg, split, checkpoint)
    det_state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}

    raw = load_class_embeddings(cfg.embeddings.file, split, spectral_norm=False).astype(np.float64)
    scale = float(np.linalg.norm(raw, 2)) if cfg.embeddings.spectral_norm else 1.0
    enc = _encoder_settings(cfg, split, raw, encoder)
    enc.update(spectral_norm=bool(cfg.embeddings.spectral_norm), scale=scale, dim=int(raw.shape[1]))

    synth_dir = synth_dir or cfg.path("synth")
    gen_path = os.path.join(synth_dir, "generator.pth")
    if not os.path.isfile(gen_path):
        raise InputError(gen_path, "generator not found (run vldus train-generator first)")
    generator = load_generator(gen_path, cfg.gan.nz, raw.shape[1], cfg.gan.ngh, cfg.features.dim)

    background = _sample_background(cfg, background_rows)
    seen_file, seen_source = seen_feature_file(cfg, cfg.path("features"))  # the API's GZSD calibration
    seen_rows = np.sort(pick_seen_rows(seen_file.labels, split, derive_seed(cfg.gan.seed, SEED_KEY)))
    seen = seen_file.gather(seen_rows)
    if not torch.isfinite(seen).all():
        raise InputError(seen_file.feats_path, "seen features contain NaN or infinite values")
    cls = det_state["roi_heads.box_predictor.cls_score.weight"], det_state["roi_heads.box_predictor.cls_score.bias"]

    os.makedirs(out, exist_ok=True)
    save_file(det_state, os.path.join(out, DETECTOR_FILE))
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, os.path.join(out, GENERATOR_FILE))
    save_file({"features": torch.from_numpy(background), "detector_bg_weight": cls[0][0].clone(),
               "detector_bg_bias": cls[1][:1].clone(), "seen_features": seen.contiguous(),
               "seen_labels": torch.from_numpy(seen_file.labels[seen_rows].astype(np.int64))},
              os.path.join(out, BACKGROUND_FILE))
    clip_files = _copy_clip_files(enc, out)
    write_json(os.path.join(out, ENCODER_FILE), enc)
    write_json(os.path.join(out, SPLIT_FILE), {"name": split.name, "classes": list(split.classes),
                                                "seen": list(split.seen), "unseen": list(split.unseen),
                                                "excluded": list(split.excluded)})
    bundle_cfg = copy.deepcopy(cfg)
    bundle_cfg.detector.norm = resolve_norm(cfg.detector)  # weights are in the bundle: no ImageNet file
    bundle_cfg.detector.backbone_weights = None
    bundle_cfg.split = SPLIT_FILE
    save_config(bundle_cfg, os.path.join(out, CONFIG_FILE))
    files = {name: {"sha256": sha256_file(os.path.join(out, name)), "bytes": os.path.getsize(os.path.join(out, name))}
             for name in (*BUNDLE_FILES, *clip_files)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "vldus_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": {"config": cfg.source_file, "checkpoint": os.path.abspath(checkpoint),
                           "generator": os.path.abspath(gen_path), "seen_features": seen_source},
                "files": files}
    write_json(os.path.join(out, MANIFEST), manifest)
    return manifest



# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
@dataclass
class Bundle:
    """A checked bundle folder. ``digest`` = sha256 of manifest.json (names this exact bundle)."""

    path: str
    manifest: dict
    digest: str
    cfg: object            # vldus.config.Config
    split: object          # vldus.data.splits.Split
    encoder: dict

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.file(name))


def load_bundle(path: str) -> Bundle:
    """Open and verify a bundle: format version, every listed file present with its sha256."""
    from vldus.config import load_config
    from vldus.data.splits import Split

    path = str(path)
    man_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise InputError(path, "bundle folder not found")
    if not os.path.isfile(man_path):
        raise InputError(man_path, "not a vldus bundle (no manifest.json)")
    try:
        with open(man_path, "rb") as f:
            raw = f.read()
        manifest = json.loads(raw)
    except (OSError, ValueError) as e:
        raise InputError(man_path, f"cannot read the manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(man_path, "not a vldus bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(man_path, f"bundle format version {manifest.get('format_version')!r}; this vldus "
                                   f"reads version {FORMAT_VERSION} (export the bundle again)")
    files = manifest.get("files") or {}
    for name in BUNDLE_FILES:
        if name not in files:
            raise InputError(man_path, f"{name}: not listed in the manifest")
    for name in files:
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise InputError(fp, "bundle file missing")
        if sha256_file(fp) != files[name].get("sha256"):
            raise InputError(fp, "sha256 does not match the manifest (corrupt or modified file)")
    with open(os.path.join(path, ENCODER_FILE)) as f:
        encoder = json.load(f)
    for key in ("weights", "arch"):  # the clip encoder's files travel inside the bundle
        if encoder.get("encoder") == "clip" and str(encoder.get(key) or "").startswith(f"{CLIP_DIR}/"):
            encoder[key] = os.path.join(os.path.abspath(path), encoder[key])
    with open(os.path.join(path, SPLIT_FILE)) as f:
        s = json.load(f)
    split = Split(s["name"], tuple(s["classes"]), tuple(s["unseen"]), tuple(s.get("excluded", ())),
                  source_file=os.path.join(path, SPLIT_FILE))
    cfg = load_config(os.path.join(path, CONFIG_FILE))
    cfg.split = os.path.join(path, SPLIT_FILE)
    return Bundle(os.path.abspath(path), manifest, hashlib.sha256(raw).hexdigest(), cfg, split, encoder)


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------
def add_parser(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], help="write a model bundle for `vldus detect`",
                       description="Pack the trained detector, the generator, real background features, "
                                   "the class-name encoder settings, the class lists and the config into "
                                   "one folder (safetensors + JSON, sha256 manifest).")
    p.add_argument("--config", required=True, help="the run's config")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="output folder")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="detector checkpoint (default: latest WORK_DIR/detector/epoch_N.pth)")
    p.add_argument("--synth-dir", default=None, metavar="DIR",
                   help="folder with generator.pth (default: WORK_DIR/synth)")
    p.add_argument("--encoder", default=None, choices=("attributes", "clip", "minilm"),
                   help="encoder of embeddings.file (default: from its `vldus embed` sidecar)")
    p.add_argument("--background-rows", type=int, default=4096,
                   help="real background features stored for the unseen classifier")
    add_set_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vldus.config import load_config

    cfg = load_config(args.config, args.set)
    manifest = export_bundle(cfg, args.out, args.checkpoint, args.synth_dir, args.background_rows, args.encoder)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"export: {len(manifest['files'])} files, {size / 2 ** 20:.1f} MiB -> {args.out}")
    return 0
