"""Choose the joint GZSD scoring's threshold without test data (``vldus calibrate-gzsd``).

Inputs, none of them from the test set: the detector's ``cls_score`` (checkpoint), the
synthesized classifier (``SYNTH_DIR/classifier_best.pth``), the trained generator
(``SYNTH_DIR/generator.pth``) and the class embeddings (unseen features, and seen ones for the
chance check, are synthesized afresh, not the classifier's training rows), and real seen RoI
features of held-out validation images (``FEATURES/val_{fg}_{bg}_feats.npy`` of ``vldus
extract-features --data-split val``, rows with a seen label). A config without ``data.val``
falls back to the detector's training images' features (``train_*``, over-confident: the
detector was trained on them), prints a warning and records ``"calibration_source": "train"``.
:func:`vldus.detection.gzsd.calibrate` picks the threshold; the result goes to
``SYNTH_DIR/gzsd_calibration.json`` with the sha256 of the detector checkpoint and of the
classifier file, where ``vldus test --gzsd`` finds (and checks) it.

``vldus train-generator`` calls :func:`calibrate_synth_dir` on its own outputs, so
``calibrate-gzsd`` on the same inputs rewrites exactly the file it wrote: both default to the
same device (CUDA when available), and the synthesized features' noise comes from a CPU
generator, so another device changes them only by matmul round-off.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from vldus.config import add_set_argument
from vldus.data.embeddings import load_class_embeddings
from vldus.detection.gzsd import CALIBRATION_FILE, GATE_FITS, calibrate
from vldus.detection.zsd import load_syn_classifier
from vldus.errors import InputError, require_file
from vldus.files import sha256_file, write_json
from vldus.synthesis.data import FeatureFile, default_detector_checkpoint, derive_seed, feature_file_paths
from vldus.synthesis.models import load_generator, seen_classifier_from_detector, synthesize

SEEN_ROWS = 4000  # real seen rows used (at most); as many synthesized unseen rows in all
SEED_KEY = 5  # derive_seed(gan.seed, SEED_KEY): the calibration's own random stream
SOURCES = {
    "val": "real seen RoI features of held-out validation images vs unseen features synthesized "
           "by the generator; no test data",
    "train": "real seen RoI features of the detector's TRAINING images (no validation split) vs "
             "unseen features synthesized by the generator; no test data",
}


def seen_feature_file(cfg, features_dir: str, warn: bool = True) -> tuple[FeatureFile, str]:
    """(the feature file calibration reads its seen rows from, ``"val"`` | ``"train"``).

    ``data.val`` set: the validation features, InputError when they are missing. No ``data.val``:
    the training features, with a warning on stderr (``warn``)."""
    split_name = "val" if cfg.data.val is not None else "train"
    feats, labels = feature_file_paths(features_dir, split_name, cfg.features.fg_iou, cfg.features.bg_iou)
    if split_name == "val":
        for path in (feats, labels):
            if not os.path.isfile(path):
                raise InputError(path, "validation RoI features not found (the GZSD calibration uses "
                                       f"held-out images): run vldus extract-features --config "
                                       f"{cfg.source_file or 'CONFIG'} --data-split val")
    elif warn:
        print("warning: the config has no validation split (data.val): the GZSD scoring is calibrated "
              "on the detector's TRAINING images' RoI features (over-confident); add data.val and run "
              "vldus extract-features --data-split val", file=sys.stderr, flush=True)
    return FeatureFile.open(feats, labels, cfg.features.dim, cfg.load_split().num_classes), split_name


def pick_seen_rows(labels: np.ndarray, split, seed: int) -> np.ndarray:
    """Indices of at most :data:`SEEN_ROWS` rows with a seen label, drawn with ``seed`` (sorted
    by draw order, not by index)."""
    rows = np.flatnonzero(np.isin(labels, split.seen_ids))
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:SEEN_ROWS].numpy()]


def calibrate_generator(seen: torch.Tensor, generator: torch.nn.Module, unseen_att: torch.Tensor,
                        seen_att: torch.Tensor, detector_cls: tuple[torch.Tensor, torch.Tensor],
                        classifier: tuple[torch.Tensor, torch.Tensor], split, inference, seed: int, source: str,
                        where: str = "generator") -> dict:
    """:func:`vldus.detection.gzsd.calibrate` on real seen rows ``seen`` (N, F) against
    ``SEEN_ROWS / U`` features per unseen class synthesized from ``unseen_att`` (U, d), then
    ``SEEN_ROWS / S`` per seen class from ``seen_att`` (S, d) for the chance check, with noise
    seeded by ``derive_seed(seed, 1)`` (a CPU generator, on any device). ``detector_cls``: the detector's
    cls_score (weight (C+1, F), bias); ``classifier``: the synthesized one (1+U rows);
    ``inference``: the config section (bg_blend, gzsd_min_separation). InputError naming ``where``
    when the generator yields NaN/inf."""
    if inference.gate_fit not in GATE_FITS:
        raise InputError("inference.gate_fit", f"{inference.gate_fit!r} is not one of {', '.join(GATE_FITS)}")
    noise = torch.Generator().manual_seed(derive_seed(seed, 1))
    unseen = synthesize(generator, unseen_att, max(1, SEEN_ROWS // len(unseen_att)), noise).cpu()
    synthetic_seen = synthesize(generator, seen_att, max(1, SEEN_ROWS // len(seen_att)), noise).cpu()
    if not (torch.isfinite(unseen).all() and torch.isfinite(synthetic_seen).all()):
        raise InputError(where, "the generator synthesizes NaN or inf features")
    return calibrate(seen, unseen, detector_cls[0].detach(), detector_cls[1].detach(), classifier[0],
                     classifier[1], split, inference.bg_blend, source, inference.gzsd_min_separation,
                     inference.gate_fit, synthetic_seen=synthetic_seen)


def calibrate_synth_dir(cfg, synth_dir: str, detector_checkpoint: str, features_dir: str,
                        device: str | torch.device = "cpu", warn: bool = True,
                        generator: str | None = None) -> dict:
    """Calibrate a synthesizer folder (``generator.pth`` + ``classifier_best.pth``), write
    ``SYNTH_DIR/gzsd_calibration.json`` and return its dict (see :mod:`vldus.detection.gzsd`).
    ``generator``: another folder's ``generator.pth`` whose synthesized features calibrate this
    classifier (a classifier made without synthesis, e.g. the compatibility classifier's rows)."""
    split = cfg.load_split()
    dim = cfg.features.dim
    gen_path = generator or os.path.join(synth_dir, "generator.pth")
    require_file(gen_path, "generator (calibrate-gzsd --generator)")
    cls_path = os.path.join(synth_dir, "classifier_best.pth")
    classifier = load_syn_classifier(cls_path, split, dim)
    emb = torch.from_numpy(load_class_embeddings(cfg.embeddings.file, split, cfg.embeddings.spectral_norm))
    G = load_generator(gen_path, cfg.gan.nz, emb.shape[1], cfg.gan.ngh, dim).to(device)
    seen_classifier = seen_classifier_from_detector(detector_checkpoint, split.num_classes, dim)
    features, source = seen_feature_file(cfg, features_dir, warn)

    seed = derive_seed(cfg.gan.seed, SEED_KEY)
    pick = pick_seen_rows(features.labels, split, seed)
    if len(pick) == 0:
        raise InputError(features.labels_path, "no seen-class rows to calibrate the GZSD scoring on")
    seen = features.gather(pick)
    if not torch.isfinite(seen).all():
        raise InputError(features.feats_path, "seen rows used for the GZSD calibration contain NaN or inf")
    result = calibrate_generator(seen, G, emb[split.unseen_ids], emb[split.seen_ids],
                                 (seen_classifier.weight, seen_classifier.bias),
                                 classifier, split, cfg.inference, seed, SOURCES[source], gen_path)
    result.update({"calibration_source": source, "seen_features": os.path.abspath(features.feats_path),
                   "detector_checkpoint": os.path.abspath(detector_checkpoint),
                   "detector_sha256": sha256_file(detector_checkpoint),
                   "classifier": os.path.abspath(cls_path), "classifier_sha256": sha256_file(cls_path)})
    write_json(os.path.join(synth_dir, CALIBRATION_FILE), result)
    return result


def add_parser(sub, common) -> None:
    p = sub.add_parser("calibrate-gzsd", parents=[common],
                       help="choose the joint GZSD scoring's threshold without test data",
                       description="Write SYNTH_DIR/gzsd_calibration.json: the threshold of the joint GZSD "
                                   "scoring, chosen on real seen RoI features of the validation images "
                                   "(extract-features --data-split val) vs unseen features synthesized by "
                                   "SYNTH_DIR/generator.pth, for this detector checkpoint and "
                                   "classifier_best.pth (train-generator does this itself).")
    p.add_argument("--config", required=True, help="split config (configs/*.yaml)")
    p.add_argument("--synth-dir", required=True, metavar="DIR", help="train-generator output folder")
    p.add_argument("--checkpoint", default=None, help="detector checkpoint (default: as train-generator)")
    p.add_argument("--features-dir", default=None, help="stage-2 features (default: WORK_DIR/features)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available, as "
                                                  "train-generator)")
    p.add_argument("--generator", default=None, metavar="FILE",
                   help="the generator whose synthesized unseen features calibrate SYNTH_DIR's classifier "
                        "(default SYNTH_DIR/generator.pth; another run's for a classifier made without "
                        "synthesis, as vldus run does for no_synthesis)")
    add_set_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vldus.config import load_config
    from vldus.synthesis.compat import default_device

    cfg = load_config(args.config, args.set)
    checkpoint = args.checkpoint or default_detector_checkpoint(cfg)
    calibrate_synth_dir(cfg, args.synth_dir, checkpoint, args.features_dir or cfg.path("features"),
                        default_device(args.device), generator=args.generator)
    out = os.path.join(args.synth_dir, CALIBRATION_FILE)
    with open(out) as f:
        print(f"calibrate-gzsd: {f.read().strip()} -> {out}")
    return 0
