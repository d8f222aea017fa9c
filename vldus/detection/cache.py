"""Detector-output cache for ``vldus test --cache DIR``: run the detector once, re-score many times.

Every ZSD / GZSD / seen run on one detector computes the same thing before the classification
layer: resize + normalise, backbone + FPN, RPN proposals, RoIAlign and the two-FC box head. Only
the classification layer changes (the injected synthesized classifier, the scoring rule). The
cache keeps, per test image, a :class:`BoxInputs` and later runs only do
:func:`score_boxes`: injection + scoring + box decoding + NMS + rescaling to the image.

Layout (one folder per key, so caches of several detectors can share ``DIR``)::

    DIR/<key digest>/key.json        the key (below), for people and for checks
    DIR/<key digest>/<image sha256>.pt
        {"proposals" (N, 4) float32 xyxy in resized-image pixels, "features" (N, F) float32 or
         float16 box-head outputs, "image_size" [h, w] after resizing, "original_size" [H, W]}

The key is the sha256 of the detector checkpoint's bytes, every ``detector`` config value that
acts before the classification layer (backbone, image scale, mean/std, RPN settings ...; not
``score_thresh`` / ``nms_thresh`` / ``detections_per_img``, which re-scoring applies), the stored
dtype and a format version. Images are identified by the sha256 of their file bytes. A run whose
key differs finds no entries and computes (and stores) them; entries are written atomically, one
file per image, so concurrent ranks under torchrun never write the same file.

``float32`` entries give exactly the detections of a run without the cache (same code path:
:func:`box_inputs` then :func:`score_boxes`). ``float16`` halves the size; the box features are
rounded to 11 significant bits (relative error <= 2^-11 ~ 5e-4 per value), which moves scores by
about 1e-3 and can reorder near-ties. The device is not part of the key: entries computed on a
GPU re-scored on a CPU (or the reverse) differ from a fresh run there by float round-off only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
import torch
from torch import Tensor, nn

from vldus.detection.zsd import ZSDPredictor
from vldus.errors import InputError
from vldus.files import save_torch, sha256_file, write_json

VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# detector settings applied after the classification layer: re-scoring uses the current ones
POSTPROCESS_KEYS = ("score_thresh", "nms_thresh", "detections_per_img")


@dataclass
class BoxInputs:
    """What the detector computes for one image before its classification layer."""

    proposals: Tensor  # (N, 4) float32 xyxy, resized-image pixels
    features: Tensor  # (N, F) box-head outputs
    image_size: tuple[int, int]  # (h, w) after the detector's resize
    original_size: tuple[int, int]  # (H, W) of the image file


# --------------------------------------------------------------------------------------------
# The two halves of a torchvision Faster R-CNN forward pass (eval mode, one image)
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def box_inputs(model: nn.Module, image: Tensor) -> BoxInputs:
    """image float32 (3, H, W) in 0..1 on the model's device -> its :class:`BoxInputs`.

    The same steps as ``GeneralizedRCNN.forward`` + ``RoIHeads.forward`` in eval mode, up to
    (not including) ``box_predictor``.
    """
    original = (int(image.shape[-2]), int(image.shape[-1]))
    images, _ = model.transform([image])
    features = model.backbone(images.tensors)
    if isinstance(features, Tensor):
        features = {"0": features}
    proposals, _ = model.rpn(images, features)
    x = model.roi_heads.box_roi_pool(features, proposals, images.image_sizes)
    x = model.roi_heads.box_head(x)
    h, w = images.image_sizes[0]
    return BoxInputs(proposals[0], x, (int(h), int(w)), original)


@torch.inference_mode()
def score_boxes(model: nn.Module, inputs: BoxInputs) -> dict:
    """The rest of the forward pass: ``box_predictor`` (e.g. a ZSD head) + postprocess.

    Returns torchvision's detection dict ``{"boxes" (K, 4) xyxy original pixels, "scores" (K,),
    "labels" (K,)}``. Features are cast to the predictor's dtype (float16 cache entries).
    """
    roi = model.roi_heads
    param = next(roi.box_predictor.parameters())
    features = inputs.features.to(device=param.device, dtype=param.dtype)
    proposals = inputs.proposals.to(device=param.device, dtype=torch.float32)
    # a ZSD head's soft gate is decided per object: it needs the boxes
    takes_boxes = isinstance(roi.box_predictor, ZSDPredictor)
    logits, deltas = roi.box_predictor(features, proposals) if takes_boxes else roi.box_predictor(features)
    boxes, scores, labels = roi.postprocess_detections(logits, deltas, [proposals], [inputs.image_size])
    result = [{"boxes": boxes[0], "scores": scores[0], "labels": labels[0]}]
    return model.transform.postprocess(result, [inputs.image_size], [inputs.original_size])[0]


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------
def cache_key(detector_cfg, checkpoint_sha256: str, dtype: str) -> dict:
    """The key (see the module docstring) as a JSON-able dict."""
    det = {k: v for k, v in dataclasses.asdict(detector_cfg).items() if k not in POSTPROCESS_KEYS}
    det.pop("backbone_weights", None)  # ImageNet init: overwritten by the checkpoint
    return {"version": VERSION, "checkpoint_sha256": checkpoint_sha256, "dtype": dtype, "detector": det}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class KeyedFolder:
    """A folder ``DIR`` holding ``key.json`` and one ``<image sha256>.pt`` entry per image; the
    detector cache and the CLIP crop cache (:mod:`vldus.detection.clip_regions`) are both one."""

    dir: str
    key: dict

    def prepare(self) -> None:
        """Create the folder and its key.json (idempotent; every rank may call it)."""
        os.makedirs(self.dir, exist_ok=True)
        key_file = os.path.join(self.dir, "key.json")
        if not os.path.isfile(key_file):
            write_json(key_file, self.key)

    def entry_path(self, image_path: str) -> str:
        try:
            return os.path.join(self.dir, sha256_file(image_path) + ".pt")
        except OSError as e:
            raise InputError(image_path, f"cannot read image ({e.strerror})") from None


class DetectorCache(KeyedFolder):
    """Per-image :class:`BoxInputs` under ``root/<key digest>/`` (see the module docstring)."""

    def __init__(self, root: str, detector_cfg, checkpoint: str, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise InputError("--cache-dtype", f"{dtype!r}: expected one of {', '.join(DTYPES)}")
        if os.path.exists(root) and not os.path.isdir(root):
            raise InputError(root, "--cache: not a folder")
        self.dtype = dtype
        self.key = cache_key(detector_cfg, sha256_file(checkpoint), dtype)
        self.dir = os.path.join(root, key_digest(self.key))
        self.hits = self.misses = 0  # set by inference.detect

    def load(self, entry: str) -> BoxInputs:
        """The stored entry (a missing or damaged one is an InputError)."""
        try:
            obj = torch.load(entry, map_location="cpu", weights_only=True)
            inputs = BoxInputs(obj["proposals"], obj["features"], tuple(obj["image_size"]),
                               tuple(obj["original_size"]))
        except Exception as e:  # noqa: BLE001 - a damaged file: name it, tell how to recover
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(entry, f"unreadable cache entry ({why}); delete it to recompute") from None
        return inputs

    def store(self, entry: str, inputs: BoxInputs) -> None:
        save_torch({"proposals": inputs.proposals.detach().float().cpu(),
                    "features": inputs.features.detach().to(DTYPES[self.dtype]).cpu(),
                    "image_size": list(inputs.image_size), "original_size": list(inputs.original_size)},
                   entry)

    def rounded(self, inputs: BoxInputs) -> BoxInputs:
        """``inputs`` as a later run reads them back (features in the stored dtype)."""
        if self.dtype == "float32":
            return inputs
        return dataclasses.replace(inputs, features=inputs.features.to(DTYPES[self.dtype]))
