"""Choose the joint GZSD scoring's threshold without test data (``vldus calibrate-gzsd``).

Inputs, none of them from the test set: the detector's ``cls_score`` (checkpoint), the
synthesized classifier (``classifier_best.pth``), the trained generator (``generator.pth``) and
the class embeddings (unseen features are synthesized afresh, not the classifier's training
rows), and real seen RoI features of the detector's training images (stage-2
``train_*_feats.npy``, rows with a seen label). :func:`vldus.detection.gzsd.calibrate` picks the
threshold; the result goes to ``gzsd_calibration.json`` next to ``classifier_best.pth``, where
``vldus test --gzsd`` finds it. ``vldus train-generator`` runs the same step after training.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

import numpy as np
import torch

from vldus.config import add_set_argument
from vldus.errors import InputError, require_file
from vldus.files import write_json

SEEN_ROWS = 4000  # real seen rows used (at most)
SOURCE = ("real seen RoI features of the detector's training images (stage 2) vs unseen features "
          "synthesized by the generator; no test data")


def calibrate_gzsd(cfg, split, train, synthesize: Callable[[torch.Tensor, int, torch.Generator], torch.Tensor],
                   unseen_att: torch.Tensor, seen_classifier: torch.nn.Linear, classifier_state: dict,
                   seed: int) -> dict:
    """The ``gzsd_calibration.json`` dict.

    ``train``: the training :class:`vldus.synthesis.data.FeatureFile`; ``synthesize(att (U, d),
    num, generator)`` -> (U*num, F) features; ``seen_classifier``: the detector's cls_score;
    ``classifier_state``: the synthesized classifier ``{"fc.weight", "fc.bias"}``.
    """
    from vldus.detection.gzsd import calibrate

    g = torch.Generator().manual_seed(seed)
    fg = np.flatnonzero(np.isin(train.labels, split.seen_ids))
    if len(fg) == 0:
        raise InputError(train.labels_path, "no seen-class rows to calibrate the GZSD scoring on")
    pick = fg[torch.randperm(len(fg), generator=g)[:SEEN_ROWS].numpy()]
    seen = train.gather(pick)
    unseen = synthesize(unseen_att, max(1, SEEN_ROWS // len(split.unseen_ids)), g).float().cpu()
    weight = classifier_state.get("fc.weight", classifier_state.get("weight"))
    bias = classifier_state.get("fc.bias", classifier_state.get("bias"))
    return calibrate(seen, unseen, seen_classifier.weight.detach(), seen_classifier.bias.detach(),
                     weight, bias, split, cfg.inference.bg_blend, SOURCE, cfg.inference.gzsd_min_separation)


def calibrate_synth_dir(cfg, synth_dir: str, detector_checkpoint: str, features_dir: str, device: str = "cpu",
                        seed: int = 0) -> str:
    """Calibrate an existing synthesizer folder (``generator.pth`` + ``classifier_best.pth``);
    returns the written ``gzsd_calibration.json`` path."""
    from vldus.data.embeddings import load_class_embeddings
    from vldus.detection.gzsd import CALIBRATION_FILE
    from vldus.detection.zsd import load_syn_classifier
    from vldus.synthesis.data import FeatureFile, feature_file_paths
    from vldus.synthesis.models import Generator, seen_classifier_from_detector

    split = cfg.load_split()
    dim, gan = cfg.features.dim, cfg.gan
    gen_path = os.path.join(synth_dir, "generator.pth")
    cls_path = os.path.join(synth_dir, "classifier_best.pth")
    require_file(gen_path, "generator (train-generator output)")
    weight, bias = load_syn_classifier(cls_path, split, dim)
    emb = torch.from_numpy(load_class_embeddings(cfg.embeddings.file, split, cfg.embeddings.spectral_norm))
    G = Generator(gan.nz, emb.shape[1], gan.ngh, dim)
    try:
        G.load_state_dict(torch.load(gen_path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - wrong file or other gan.nz/ngh
        raise InputError(gen_path, f"does not fit the config's generator ({str(e).splitlines()[0]})") from None
    G.to(device).eval()

    def synthesize(att: torch.Tensor, num: int, g: torch.Generator) -> torch.Tensor:
        index = torch.arange(len(att)).repeat_interleave(num)
        z = torch.randn(len(index), gan.nz, generator=g)
        with torch.no_grad():
            return G(z.to(device), att.to(device), index.to(device)).cpu()

    train = FeatureFile.open(*feature_file_paths(features_dir, "train", cfg.features.fg_iou, cfg.features.bg_iou),
                             dim, split.num_classes)
    seen_classifier = seen_classifier_from_detector(detector_checkpoint, split.num_classes, dim)
    result = calibrate_gzsd(cfg, split, train, synthesize, emb[split.unseen_ids], seen_classifier,
                            {"fc.weight": weight, "fc.bias": bias}, seed)
    out = os.path.join(synth_dir, CALIBRATION_FILE)
    write_json(out, result)
    return out


def add_parser(sub, common) -> None:
    p = sub.add_parser("calibrate-gzsd", parents=[common],
                       help="choose the joint GZSD scoring's threshold without test data",
                       description="Write SYNTH_DIR/gzsd_calibration.json: the threshold of the joint GZSD "
                                   "scoring, chosen on real seen training RoI features vs unseen features "
                                   "synthesized by SYNTH_DIR/generator.pth (train-generator does this itself).")
    p.add_argument("--config", required=True, help="split config (configs/*.yaml)")
    p.add_argument("--synth-dir", required=True, metavar="DIR", help="train-generator output folder")
    p.add_argument("--checkpoint", default=None, help="detector checkpoint (default: as train-generator)")
    p.add_argument("--features-dir", default=None, help="stage-2 features (default: WORK_DIR/features)")
    p.add_argument("--device", default="cpu")
    add_set_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vldus.config import load_config
    from vldus.synthesis.pipeline import default_detector_checkpoint, derive_seed

    cfg = load_config(args.config, args.set)
    checkpoint = args.checkpoint or default_detector_checkpoint(cfg)
    out = calibrate_synth_dir(cfg, args.synth_dir, checkpoint, args.features_dir or cfg.path("features"),
                              args.device, derive_seed(cfg.gan.seed, 5))
    with open(out) as f:
        print(f"calibrate-gzsd: {f.read().strip()} -> {out}")
    return 0
