"""``vldus train-generator``: stage 3b + 3c (docs/design.md §6, §7); see vldus.synthesis.pipeline."""
from __future__ import annotations

import argparse
import os
import sys

from vldus.config import add_set_argument
from vldus.classifier_files import LAYOUTS
from vldus.synthesis.compat import default_device


def add_parser(sub, common) -> None:
    p = sub.add_parser("train-generator", parents=[common],
                       help="stage 3: train the unseen-feature synthesizer and the unseen classifier",
                       description="Train the conditional WGAN-GP on seen RoI features, synthesize "
                                   "unseen features and train the unseen classifier; writes "
                                   "WORK_DIR/synth/classifier_best.pth and friends.")
    p.add_argument("--config", required=True, help="split config (configs/*.yaml or a bundled name)")
    add_set_argument(p)
    p.add_argument("--resume", action="store_true", help="continue from synth/checkpoint_latest.pth")
    p.add_argument("--legacy", action="store_true",
                   help="released behaviour of the unseen-classifier loss: no gradient reaches G "
                        "(gan.legacy_unseen_loss=true)")
    p.add_argument("--distill", choices=("active", "logged", "off"),
                   help="CLIP distillation: active (optimised), logged (released: computed in the "
                        "critic loop on one random row, never optimised) or off (default: gan.distill)")
    p.add_argument("--distill-into", choices=("d_and_g", "d_only"),
                   help="where active distillation sends gradient: d_and_g (ours) or d_only (the "
                        "released design, critic loop only) (default: gan.distill_into)")
    p.add_argument("--clip-weights", metavar="FILE", help="local open_clip weights (gan.clip_weights)")
    p.add_argument("--clip-arch", metavar="NAME_OR_JSON",
                   help="open_clip model name or model-config JSON, e.g. OUT/open_clip_config.json of "
                        "vldus train-clip (gan.clip_arch)")
    p.add_argument("--clip-quickgelu", choices=("auto", "on", "off"),
                   help="QuickGELU for the CLIP (gan.clip_quickgelu; auto: an OpenAI TorchScript "
                        "archive gets the QuickGELU variant of the arch)")
    p.add_argument("--select-on-test", action="store_true",
                   help="published model selection on the real unseen TEST features (leaks test "
                        "data; unseen_classifier.selection=test)")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="detector checkpoint for C_s (default gan.detector_checkpoint, else the "
                        "latest WORK_DIR/detector/epoch_N.pth)")
    p.add_argument("--features-dir", help="folder of the {train,test}_{fg}_{bg} feature files "
                                          "(default WORK_DIR/features)")
    p.add_argument("--out-dir", help="output folder (default WORK_DIR/synth)")
    p.add_argument("--compat-classifier", metavar="FILE",
                   help="compatibility classifier C_u: ours or the released unseen_Classifier*.pth "
                        "(default WORK_DIR/synth/compat_classifier.pth)")
    p.add_argument("--layout", choices=LAYOUTS, default="ours",
                   help="classifier_best.pth layout: ours {fc.weight, fc.bias} or published (the "
                        "released {'state_dict': {fc1.weight, fc1.bias}, 'epoch': k}, for the "
                        "released code)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available)")
    p.add_argument("--skip-check", action="store_true",
                   help="do not scan the feature files for NaN/inf (they were checked before)")
    p.set_defaults(func=run)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The --set list plus the overrides the flags stand for (flags win)."""
    extra = []
    if args.legacy:
        extra.append("gan.legacy_unseen_loss=true")
    if args.distill:
        extra.append(f"gan.distill={args.distill}")
    if args.distill_into:
        extra.append(f"gan.distill_into={args.distill_into}")
    if args.clip_weights:
        extra.append(f"gan.clip_weights={args.clip_weights!s}")
    if args.clip_arch:
        extra.append(f"gan.clip_arch={args.clip_arch!s}")
    if args.clip_quickgelu:
        extra.append(f"gan.clip_quickgelu={args.clip_quickgelu}")
    if args.select_on_test:
        extra.append("unseen_classifier.selection=test")
    return list(args.set) + extra


def run(args: argparse.Namespace) -> int:
    from vldus.config import load_config
    from vldus.errors import require_file
    from vldus.synthesis.pipeline import CHECKPOINT, SynthesisOptions
    from vldus.synthesis.select import run_selected
    from vldus.synthesis.trainer import NonFiniteLoss

    cfg = load_config(args.config, config_overrides(args))
    if args.clip_weights:
        require_file(args.clip_weights, "CLIP weights file")
    options = SynthesisOptions(device=default_device(args.device), resume=args.resume,
                               quiet=args.quiet, features_dir=args.features_dir,
                               detector_checkpoint=args.checkpoint, out_dir=args.out_dir,
                               check_features=not args.skip_check,
                               compat_classifier=args.compat_classifier, layout=args.layout)
    out_dir = args.out_dir or cfg.path("synth")
    try:
        meta = run_selected(cfg, options)
    except NonFiniteLoss as e:
        ckpt = os.path.join(out_dir, CHECKPOINT)
        last = ckpt if os.path.isfile(ckpt) else "none (no epoch finished)"
        print(f"vldus train-generator: error: training diverged: {e}; last good checkpoint: {last} "
              f"(lower gan.lr, or resume with --resume)", file=sys.stderr)
        return 1
    res = meta["results"]
    line = (f"synthesizer done: {os.path.join(out_dir, 'classifier_best.pth')} (GAN {meta['selected']['epoch']} "
            f"epochs selected by '{meta['selected']['rule']}', {meta['samples_per_s']} samples/s")
    if "test_mean_class_accuracy" in res:
        line += f", unseen test mean class accuracy {res['test_mean_class_accuracy']:.3f}"
        if not res["test_used_for_selection"]:
            line += " (reported only, not used for selection)"
    print(line + ")")
    return 0
