"""``vldus convert-checkpoint --from mmdet-v1``: an mmdetection-1.x Faster R-CNN (ResNet + FPN)
checkpoint -> a checkpoint ``load_detector`` reads (the published VLDUS detectors, docs/design.md §2.1).

Input: the ``.pth`` mmdetection 1.x writes ({"meta": {...}, "state_dict": {...}, "optimizer":
...}) or a bare state dict. Output: {"model": state_dict, "epoch": meta.epoch or 0, "classes":
split classes} (the train-detector layout), written atomically.

Key families (mmdet 1.x -> torchvision 0.29, ``build_detector``):

  backbone.{conv1,bn1,layer1..4}.*      -> backbone.body.*                 (same ResNet names)
  neck.lateral_convs.N.conv.*           -> backbone.fpn.inner_blocks.N.0.*
  neck.fpn_convs.N.conv.*               -> backbone.fpn.layer_blocks.N.0.*
  rpn_head.rpn_conv.*                   -> rpn.head.conv.0.0.*
  rpn_head.rpn_cls.*  (sigmoid, A ch.)  -> rpn.head.cls_logits.*
  rpn_head.rpn_reg.*  (4A ch.)          -> rpn.head.bbox_pred.*
  bbox_head.shared_fcs.0/1.*            -> roi_heads.box_head.fc6/fc7.*
  bbox_head.fc_cls.*  (row 0 = bg)      -> roi_heads.box_predictor.cls_score.*
  bbox_head.fc_reg.*  (4 per class)     -> roi_heads.box_predictor.bbox_pred.*

No channel permutation is needed: both libraries order the anchors of a location by aspect
ratio (one scale per level), anchor-major in the RPN channels (channel = a * 4 + coordinate),
flatten RoI features (N, 256, 7, 7) the same way, and put background in class row 0. BatchNorm
``num_batches_tracked`` counters are dropped when the target has frozen BatchNorm (zeros are
filled in when it has trainable BatchNorm and the source lacks them). Use the converted file
with ``detector.legacy_mmdet: true`` to get mmdet 1.x anchors and box coding.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional

import torch
from torch import Tensor

from vldus.config import add_set_argument
from vldus.config import load_config
from vldus.detection.model import RESNETS, build_detector
from vldus.errors import InputError
from vldus.files import save_torch

FORMATS = ("mmdet-v1",)

# (mmdet 1.x pattern, torchvision replacement), tried in order; \1 etc. keep indices and leaf names.
MMDET_V1_RULES: list[tuple[str, str]] = [
    (r"^backbone\.((?:conv1|bn1|layer\d)\..+)$", r"backbone.body.\1"),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.(.+)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.(.+)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"^rpn_head\.rpn_conv\.(.+)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn_head\.rpn_cls\.(.+)$", r"rpn.head.cls_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(.+)$", r"rpn.head.bbox_pred.\1"),
    (r"^bbox_head\.shared_fcs\.0\.(.+)$", r"roi_heads.box_head.fc6.\1"),
    (r"^bbox_head\.shared_fcs\.1\.(.+)$", r"roi_heads.box_head.fc7.\1"),
    (r"^bbox_head\.fc_cls\.(.+)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^bbox_head\.fc_reg\.(.+)$", r"roi_heads.box_predictor.bbox_pred.\1"),
]
_COMPILED = [(re.compile(p), r) for p, r in MMDET_V1_RULES]


def mmdet_v1_target_key(key: str) -> Optional[str]:
    """The torchvision key of an mmdet 1.x key, or None when no rule covers it."""
    for pattern, repl in _COMPILED:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return None


def read_mmdet_checkpoint(path: str, unsafe_load: bool = False) -> tuple[dict[str, Tensor], dict]:
    """(state dict, meta) of an mmdet 1.x file. ``weights_only=True`` unless ``unsafe_load``."""
    if not os.path.isfile(path):
        raise InputError(path, "checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except Exception as e:  # noqa: BLE001 - unreadable or refused by weights_only
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if unsafe_load else ("; if it holds pickled Python objects and you trust the file, "
                                       "pass --unsafe-load")
        raise InputError(path, f"cannot read checkpoint with weights_only=True ({msg}){hint}") from None
    meta: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(path, "expected an mmdetection checkpoint ({'state_dict': ...}) or a state dict of tensors")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a (Distributed)DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, meta


def convert_mmdet_v1(state: dict[str, Tensor], target: dict[str, Tensor], source: str,
                     allow_missing: bool = False) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Map an mmdet 1.x state dict onto ``target`` (our model's state dict: names and shapes).

    Returns (converted state, unmapped source keys, target keys filled from ``target`` because
    the source lacks them). A shape mismatch is an InputError naming both keys and shapes; a
    missing target key is one too unless ``allow_missing`` (then the target's value is kept).
    """
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        new = mmdet_v1_target_key(key)
        if new is None or new not in target:
            if key.endswith("num_batches_tracked"):
                continue  # a BatchNorm counter: our frozen BatchNorm has none
            unmapped.append(key)
            continue
        if tuple(value.shape) != tuple(target[new].shape):
            raise InputError(source, f"{key}: shape {tuple(value.shape)} does not fit {new} "
                                     f"{tuple(target[new].shape)}")
        out[new] = value.to(target[new].dtype)
    missing = [k for k in target if k not in out]
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    for k in counters:
        out[k] = torch.zeros_like(target[k])
    missing = [k for k in missing if k not in counters]
    if missing and not allow_missing:
        raise InputError(source, f"{len(missing)} key(s) of the configured detector have no counterpart, "
                                 f"e.g. {missing[0]!r} (pass --allow-missing to keep their initial values)")
    for k in missing:
        out[k] = target[k]
    return out, unmapped, missing


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_parser(sub, common) -> None:
    p = sub.add_parser("convert-checkpoint", parents=[common],
                       help="convert an mmdetection-1.x Faster R-CNN checkpoint for load_detector")
    p.add_argument("checkpoint", metavar="IN.pth", help="mmdetection 1.x checkpoint")
    p.add_argument("--from", dest="source_format", choices=FORMATS, required=True,
                   help="format of IN.pth")
    p.add_argument("--config", required=True, help="config (detector + split) the output must fit")
    add_set_argument(p)
    p.add_argument("--out", required=True, metavar="OUT.pth", help="converted checkpoint")
    p.add_argument("--allow-missing", action="store_true",
                   help="keep initial values for detector keys the checkpoint lacks")
    p.add_argument("--unsafe-load", action="store_true",
                   help="read IN.pth with weights_only=False (runs pickled code: trusted files only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    split = cfg.load_split()
    if cfg.detector.backbone not in RESNETS:
        raise InputError("detector.backbone", f"mmdet-v1 conversion needs a ResNet backbone, got "
                                              f"{cfg.detector.backbone!r}")
    if args.unsafe_load:
        print(f"warning: loading {args.checkpoint} with weights_only=False: it can run arbitrary code",
              file=sys.stderr)
    state, meta = read_mmdet_checkpoint(args.checkpoint, args.unsafe_load)

    rows = state.get("bbox_head.fc_cls.weight")
    if rows is not None and rows.shape[0] != split.num_classes + 1:
        raise InputError(args.checkpoint, f"bbox_head.fc_cls has {rows.shape[0]} rows, split "
                                          f"{split.name!r} needs {split.num_classes} classes + background "
                                          f"= {split.num_classes + 1}")
    names = meta.get("CLASSES")
    if isinstance(names, (list, tuple)) and list(names) != list(split.classes):
        pairs = enumerate(zip(names, split.classes))
        first = next((i for i, (a, b) in pairs if a != b), min(len(names), split.num_classes))
        theirs = names[first] if first < len(names) else "(none)"
        ours = split.classes[first] if first < split.num_classes else "(none)"
        print(f"warning: the checkpoint's meta CLASSES differ from split {split.name!r} at index {first + 1}: "
              f"{theirs!r} vs {ours!r} (rows are taken in order)", file=sys.stderr)
    target = build_detector(cfg, split, load_backbone=False).state_dict()
    converted, unmapped, missing = convert_mmdet_v1(state, target, args.checkpoint, args.allow_missing)
    for k in unmapped:
        print(f"unmapped (dropped): {k} {tuple(state[k].shape)}")
    for k in missing:
        print(f"missing (initial value kept): {k}")
    epoch = meta.get("epoch", 0) if isinstance(meta.get("epoch", 0), int) else 0
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    save_torch({"model": converted, "epoch": epoch, "classes": list(split.classes)}, args.out)
    print(f"converted {len(converted) - len(missing)} tensors ({len(unmapped)} unmapped, "
          f"{len(missing)} missing) -> {args.out}")
    if not cfg.detector.legacy_mmdet:
        print("note: use --set detector.legacy_mmdet=true with this checkpoint for mmdetection-1.x "
              "anchors and box coding")
    return 0
