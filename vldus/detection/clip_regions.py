"""Scoring the detector's boxes with a CLIP: ``vldus test --scoring clip-regions | ensemble``.

The open-vocabulary peer of synthesis (ViLD, OWL-ViT, Detic): ask a CLIP about each region.
Per test image, on the detector's own candidates (the proposals of :class:`vldus.detection.cache.BoxInputs`,
so the same boxes the VLDUS head scores):

1. **Box.** Every proposal is decoded with the deltas the ZSD head gives its unseen classes
   (:func:`vldus.detection.zsd.seen_deltas` under ``inference.box_regression``: by default the
   seen classes' deltas weighed by the detector's seen softmax), clipped to the image. This one
   box per proposal is cropped, scored and reported for every class (class-agnostic regression).
2. **Crop.** Grown by ``margin`` of its width/height per side, clamped to the image, resized to
   the CLIP's input side: train-clip's crops (:func:`vldus.clip_train.crop_objects`).
3. **CLIP.** The image encoder embeds the crops of one image in one forward pass (L2-normalised);
   ``p_clip = softmax(logit_scale * emb @ T.T)`` over the class names of the setting (ZSD: the
   unseen names; GZSD: all names), T = the class text rows of ``vldus embed --encoder clip``
   (:func:`vldus.data.embeddings.encode_texts_clip`, its 7-prompt ensemble). Boxes with
   ``p_obj <= MIN_OBJECTNESS`` (step 4) are not cropped and get ``p_clip = 0``.
4. **Object vs background, from the detector.** ``p_obj = 1 - softmax([z_bg, z_seen])[bg]
   = sigmoid(logsumexp(z_seen) - z_bg)``: the plain detector's probability that the box holds
   an object (its own background row and seen rows, never the synthesized classifier). So
   ``clip-regions`` needs no ``--syn-weights``.
5. ``clip-regions``: class score ``p_obj * p_clip(class)``, background ``1 - p_obj`` (a
   distribution over background + the setting's names).
6. ``ensemble`` (ViLD's ensemble): per class ``s = p_vldus^(1 - w) * p_regions^w``, a weighted
   geometric mean of the VLDUS head's probability (ZSD: its softmax; GZSD: the released
   per-group score, :mod:`vldus.detection.zsd`) and the ``clip-regions`` probability, ``w`` =
   the CLIP's weight, one for seen classes, one for unseen (:data:`ENSEMBLE_WEIGHTS`: ViLD's
   lambda = 2/3, fixed in advance, never chosen on test data). ``w = 0`` gives VLDUS's scores
   on the class-agnostic boxes, ``w = 1`` gives ``clip-regions``.
7. In GZSD the ensemble's ``p_clip`` of an **unseen** class is the softmax over the unseen names
   only (:data:`UNSEEN_NAMES` "unseen", the default): the CLIP says which unseen class, as the
   VLDUS head's unseen group does, and never that an object is an unseen class rather than a
   seen one, which a CLIP that never saw the unseen classes gets wrong (it names them as their
   seen look-alikes). A **seen** class's ``p_clip`` stays the softmax over all names, so the CLIP
   can still say that a box is no seen object. "all": every ``p_clip`` over all names, as
   ``clip-regions``.

Thresholding, per-class NMS and the ``detections_per_img`` cut are torchvision's own
``postprocess_detections`` (fed log-probabilities, as :class:`vldus.detection.zsd.ZSDPredictor`).

Crop-embedding cache (with ``vldus test --cache DIR``): next to the detector's entries, keyed
by the detector cache's key, the CLIP file's sha256, the architecture and the crop settings::

    DIR/<detector key digest>/clip/<crop key digest>/key.json
    DIR/<detector key digest>/clip/<crop key digest>/<image sha256>.pt
        {"boxes" (R, 4) float32 xyxy original pixels, "embeddings" (R, d) float32 unit rows}

An entry whose boxes differ from the current ones is recomputed (and rewritten).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vldus.data.splits import Split
from vldus.detection.cache import KeyedFolder, key_digest
from vldus.detection.zsd import seen_deltas
from vldus.errors import InputError
from vldus.files import save_torch, sha256_file

SCORINGS = ("vldus", "clip-regions", "ensemble")
# The CLIP's weight w in the ensemble, per group: ViLD's lambda = 2/3 (Gu et al., ICLR 2022, ensemble:
# p_text^(2/3) p_image^(1/3) for base classes, p_text^(1/3) p_image^(2/3) for novel ones).
ENSEMBLE_WEIGHTS = {"seen": 1.0 / 3.0, "unseen": 2.0 / 3.0}
# Which names the GZSD ensemble's CLIP probability of an unseen class is a softmax over (step 7).
UNSEEN_NAMES = ("unseen", "all")
CROP_MARGIN = 0.1  # train-clip's ClipTrainConfig.crop_margin
# Boxes the detector gives p_obj <= this are not cropped (their p_clip = 0): about 2/3 of a
# quick-demo detector's proposals. None of them could pass score_thresh 0.05: clip-regions scores are
# <= p_obj; at ViLD's ensemble weights an unseen score is <= p_obj^(2/3) <= 0.047 and a seen
# one <= q_seen^(2/3) p_obj^(1/3) <= p_obj (the detector's seen probabilities sum to p_obj).
MIN_OBJECTNESS = 0.01
VERSION = 1


# --------------------------------------------------------------------------------------------
# The arithmetic (tensors only)
# --------------------------------------------------------------------------------------------
def detector_objectness(logits: Tensor, detector_bg_logit: Tensor, seen_ids: Sequence[int]) -> Tensor:
    """(R,) ``p_obj = 1 - softmax([z_bg, z_seen])[bg]`` from the detector's own logits (R, C+1)
    (seen columns) and background logit (R,)."""
    return torch.sigmoid(torch.logsumexp(logits[:, list(seen_ids)], dim=1) - detector_bg_logit)


def clip_probs(embeddings: Tensor, text: Tensor, logit_scale: float) -> Tensor:
    """(R, K) softmax over K names of ``logit_scale * embeddings (R, d) @ text (K, d).T``
    (both unit rows)."""
    return F.softmax(logit_scale * embeddings.float() @ text.float().T, dim=1)


def clip_probs_unseen_apart(embeddings: Tensor, text: Tensor, logit_scale: float,
                            unseen_cols: Sequence[int]) -> Tensor:
    """(R, K) :func:`clip_probs` over all K names, except the columns ``unseen_cols``: the softmax
    over those names alone (each row's unseen columns sum to 1)."""
    probs = clip_probs(embeddings, text, logit_scale)
    cols = list(unseen_cols)
    if cols:
        probs[:, cols] = clip_probs(embeddings, text[cols], logit_scale)
    return probs


def region_probs(p_obj: Tensor, p_clip: Tensor, name_ids: Sequence[int], num_cols: int) -> Tensor:
    """(R, num_cols) ``clip-regions`` distribution: column 0 (background) ``1 - p_obj``, columns
    ``name_ids`` ``p_obj * p_clip``, others 0."""
    probs = p_clip.new_zeros((p_clip.shape[0], num_cols))
    probs[:, 0] = 1.0 - p_obj
    probs[:, list(name_ids)] = p_obj[:, None] * p_clip
    return probs


def ensemble_scores(p_vldus: Tensor, p_regions: Tensor, clip_weight: Tensor) -> Tensor:
    """(R, C+1) ``p_vldus^(1 - w) * p_regions^w`` per column; ``clip_weight`` (C+1,) = w per
    column. ``0^0 = 1``: w = 0 returns ``p_vldus`` and w = 1 ``p_regions`` exactly."""
    return p_vldus.pow(1.0 - clip_weight) * p_regions.pow(clip_weight)


def column_weights(split: Split, weights: dict, device=None) -> Tensor:
    """(C+1,) CLIP weight per detector column: ``weights["seen"]`` on seen columns,
    ``weights["unseen"]`` on the others (background's is not used)."""
    w = torch.full((split.num_classes + 1,), float(weights["unseen"]), device=device)
    w[list(split.seen_ids)] = float(weights["seen"])
    return w


# --------------------------------------------------------------------------------------------
# The boxes of one image
# --------------------------------------------------------------------------------------------
@dataclass
class Regions:
    """One image's candidates under the installed head."""

    logits: Tensor  # (R, C+1) the predictor's logits (after injection)
    detector_bg: Tensor  # (R,) the detector's own background logit
    deltas: Tensor  # (R, 4(C+1)) every slot holds the proposal's class-agnostic deltas
    boxes: Tensor  # (R, 4) float32 xyxy, original-image pixels (the crops' boxes)


@torch.inference_mode()
def regions(model: nn.Module, head, inputs) -> Regions:
    """The class-agnostic candidate boxes of :class:`~vldus.detection.cache.BoxInputs`
    ``inputs`` (module doc, step 1) and the logits that score them."""
    from torchvision.models.detection.transform import resize_boxes
    from torchvision.ops import boxes as box_ops

    roi = model.roi_heads
    param = next(head.parameters())
    x = inputs.features.to(device=param.device, dtype=param.dtype).flatten(start_dim=1)
    proposals = inputs.proposals.to(device=param.device, dtype=torch.float32)
    logits, deltas = head.base(x)
    if head.detector_bg_weight is not None:  # injected: the detector's own row was kept aside
        bg = F.linear(x, head.detector_bg_weight[None], head.detector_bg_bias[None])[:, 0]
    else:
        bg = logits[:, 0]
    agnostic = seen_deltas(logits, deltas, head.split.seen_ids, head.box_regression)  # (R, 4)
    boxes = roi.box_coder.decode(agnostic, [proposals])[:, 0]
    boxes = box_ops.clip_boxes_to_image(boxes, inputs.image_size)
    boxes = resize_boxes(boxes, list(inputs.image_size), list(inputs.original_size))
    return Regions(logits.float(), bg.float(), agnostic.repeat(1, logits.shape[1]), boxes.float())


# --------------------------------------------------------------------------------------------
# The CLIP side: crops, their embeddings, the text rows
# --------------------------------------------------------------------------------------------
class RegionClip:
    """A CLIP (:func:`vldus.clip.load_open_clip`) that embeds box crops and scores names."""

    def __init__(self, weights: str, arch: Optional[str], device: str | torch.device,
                 margin: float = CROP_MARGIN, quickgelu: str = "auto"):
        from vldus.clip import DEFAULT_ARCH, clip_image_size, clip_mean_std, load_open_clip, uses_quick_gelu

        if not 0.0 <= margin <= 1.0:
            raise InputError("--clip-margin", f"{margin} is not in [0, 1]")
        self.arch = arch or DEFAULT_ARCH
        self.weights = weights
        self.device = device
        self.model = load_open_clip(self.arch, weights, device, quickgelu)
        self.size = clip_image_size(self.model)
        self.mean, self.std = clip_mean_std(self.model)
        self.margin = margin
        self.logit_scale = float(self.model.logit_scale.exp())
        self.sha256 = sha256_file(weights)
        arch_id = sha256_file(self.arch) if os.path.isfile(self.arch) else self.arch
        self.key = {"version": VERSION, "clip_sha256": self.sha256, "arch": arch_id,
                    "quick_gelu": uses_quick_gelu(self.model), "margin": margin, "size": list(self.size),
                    "mean": list(self.mean), "std": list(self.std), "min_objectness": MIN_OBJECTNESS}

    def text_rows(self, names: Sequence[str]) -> Tensor:
        """(K, d) class rows of ``vldus embed --encoder clip`` (its prompt ensemble) on the device."""
        from vldus.clip import get_clip_tokenizer
        from vldus.data.embeddings import DEFAULT_PROMPTS, encode_texts_clip, readable_name

        rows = encode_texts_clip([readable_name(n) for n in names], self.model, get_clip_tokenizer(self.arch),
                                 DEFAULT_PROMPTS["clip"], self.device)
        return torch.from_numpy(rows).to(self.device)

    @torch.inference_mode()
    def embed_boxes(self, image: Tensor, boxes: Tensor) -> Tensor:
        """image uint8 (3, H, W), boxes (R, 4) xyxy image pixels -> (R, d) float32 unit rows on
        the CLIP's device (one forward pass)."""
        from vldus.clip_train import crop_objects, to_model_input

        if len(boxes) == 0:
            return torch.zeros((0, self.model.visual.output_dim), device=self.device)
        crops = crop_objects(image.permute(1, 2, 0).cpu().numpy(), boxes.cpu().numpy(), self.size[0], self.margin)
        x = to_model_input(crops, self.mean, self.std).to(self.device)
        return self.model.encode_image(x, normalize=True).float()


class CropCache(KeyedFolder):
    """Per-image crop embeddings under the detector cache's key folder (module doc)."""

    def __init__(self, detector_cache_dir: str, clip_key: dict):
        self.key = clip_key
        self.dir = os.path.join(detector_cache_dir, "clip", key_digest(clip_key))

    def load(self, entry: str, boxes: Tensor) -> Optional[Tensor]:
        """The stored embeddings if the entry exists and was made for ``boxes``; else None."""
        if not os.path.isfile(entry):
            return None
        try:
            obj = torch.load(entry, map_location="cpu", weights_only=True)
            stored, emb = obj["boxes"], obj["embeddings"]
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed and rewritten
            return None
        if stored.shape != boxes.shape or not torch.allclose(stored, boxes.cpu(), atol=1e-3):
            return None
        return emb

    def store(self, entry: str, boxes: Tensor, embeddings: Tensor) -> None:
        save_torch({"boxes": boxes.detach().float().cpu(), "embeddings": embeddings.detach().float().cpu()}, entry)


# --------------------------------------------------------------------------------------------
# Scoring one image
# --------------------------------------------------------------------------------------------
class RegionScorer:
    """``clip-regions`` / ``ensemble`` detections of one image (module doc); counts the CLIP
    pass's time (``clip_s``, crops + encoder) and the crop-cache hits."""

    def __init__(self, scoring: str, clip: RegionClip, split: Split, setting: str,
                 weights: Optional[dict] = None, cache: Optional[CropCache] = None,
                 unseen_names: str = UNSEEN_NAMES[0]):
        if scoring not in SCORINGS[1:]:
            raise ValueError(f"scoring must be one of {SCORINGS[1:]}, got {scoring!r}")
        if unseen_names not in UNSEEN_NAMES:
            raise ValueError(f"unseen_names must be one of {UNSEEN_NAMES}, got {unseen_names!r}")
        if setting not in ("zsd", "gzsd"):
            raise InputError(f"--scoring {scoring}", "applies to --zsd / --gzsd only")
        self.scoring, self.clip, self.split, self.setting = scoring, clip, split, setting
        self.name_ids = list(split.unseen_ids) if setting == "zsd" else list(range(1, split.num_classes + 1))
        self.text = clip.text_rows([split.classes[i - 1] for i in self.name_ids])
        self.weights = dict(ENSEMBLE_WEIGHTS if weights is None else weights)
        self.unseen_names = unseen_names
        # columns of p_clip given apart (step 7): the unseen names of the GZSD ensemble
        apart = scoring == "ensemble" and setting == "gzsd" and unseen_names == "unseen"
        unseen = set(split.unseen_ids)
        self.unseen_cols = [k for k, i in enumerate(self.name_ids) if i in unseen] if apart else []
        self.cache = cache
        self.clip_s = 0.0
        self.hits = self.misses = 0

    def describe(self) -> dict:
        """What ran, for ``--metrics`` (``"scoring"``)."""
        out = {"scoring": self.scoring, "clip_weights": os.path.abspath(self.clip.weights),
               "clip_sha256": self.clip.sha256, "clip_arch": self.clip.arch, "crop_margin": self.clip.margin,
               "crop_size": self.clip.size[0], "logit_scale": round(self.clip.logit_scale, 4),
               "names": "unseen" if self.setting == "zsd" else "all",
               "objectness": "1 - p_bg of the detector's own classifier over [background, seen]",
               "boxes": "class-agnostic: each proposal decoded with the deltas of its unseen classes (inference.box_regression)"}
        if self.scoring == "ensemble":
            out["ensemble_weights"] = {**self.weights, "source": "fixed in advance: ViLD's lambda = 2/3"
                                       if self.weights == ENSEMBLE_WEIGHTS else "given"}
            if self.setting == "gzsd":
                out["ensemble_unseen_names"] = self.unseen_names
        return out

    def embeddings(self, image: Optional[Tensor], image_path: str, boxes: Tensor) -> Tensor:
        """(R, d) crop embeddings of ``boxes``, from the crop cache when it has them."""
        entry = self.cache.entry_path(image_path) if self.cache is not None else None
        if entry is not None:
            emb = self.cache.load(entry, boxes)
            if emb is not None:
                self.hits += 1
                return emb.to(self.clip.device)
        self.misses += 1
        from vldus.data.images import read_rgb

        start = time.perf_counter()
        if image is None:
            image = read_rgb(image_path)
        elif image.dtype != torch.uint8:  # vldus test's float image in 0..1 (to_float of the file's bytes)
            image = image.mul(255).round().to(torch.uint8)
        emb = self.clip.embed_boxes(image, boxes)
        self.clip_s += time.perf_counter() - start
        if entry is not None:
            self.cache.store(entry, boxes, emb)
        return emb

    @torch.inference_mode()
    def class_scores(self, model: nn.Module, head, inputs, image: Optional[Tensor],
                     image_path: str) -> tuple[Regions, Tensor, float]:
        """(regions, scores (R, C+1) with column 0 = background and class columns summing with it
        to ``scale``, scale): ``scale`` is 1 (clip-regions, ZSD ensemble) or 2 (GZSD ensemble:
        two groups in the released scale)."""
        reg = regions(model, head, inputs)
        p_obj = detector_objectness(reg.logits, reg.detector_bg, self.split.seen_ids)
        asked = p_obj > MIN_OBJECTNESS
        emb = self.embeddings(image, image_path, reg.boxes[asked])
        p_clip = p_obj.new_zeros((len(p_obj), len(self.name_ids)))
        p_clip[asked] = clip_probs_unseen_apart(emb, self.text, self.clip.logit_scale, self.unseen_cols)
        probs = region_probs(p_obj, p_clip, self.name_ids, reg.logits.shape[1])
        if self.scoring == "clip-regions":
            return reg, probs, 1.0
        # the head without the proposals: its soft gate per box (the stored ensemble runs were
        # measured so; the per-object gate of vldus test is not tried here yet)
        p_vldus = head(inputs.features.to(reg.logits.device, next(head.parameters()).dtype))[0].exp().float()
        p_vldus = p_vldus * head.score_scale  # released scale: each group sums to 1 with its background
        scores = ensemble_scores(p_vldus, probs, column_weights(self.split, self.weights, probs.device))
        scale = head.score_scale
        scores[:, 0] = (scale - scores[:, 1:].sum(dim=1)).clamp(min=0.0)
        return reg, scores, scale

    @torch.inference_mode()
    def score(self, model: nn.Module, head, inputs, image: Optional[Tensor], image_path: str) -> dict:
        """One image's detections, as :func:`vldus.detection.inference.score_image` returns them."""
        reg, scores, scale = self.class_scores(model, head, inputs, image, image_path)
        roi = model.roi_heads
        proposals = inputs.proposals.to(device=reg.deltas.device, dtype=torch.float32)
        base_thresh = roi.score_thresh * head.score_scale  # install_zsd_head divided it
        roi.score_thresh = base_thresh / scale
        try:
            log_probs = torch.log((scores / scale).clamp(min=0.0))
            boxes, out_scores, labels = roi.postprocess_detections(log_probs, reg.deltas, [proposals],
                                                                   [inputs.image_size])
        finally:
            roi.score_thresh = base_thresh / head.score_scale
        det = model.transform.postprocess([{"boxes": boxes[0], "scores": out_scores[0], "labels": labels[0]}],
                                          [inputs.image_size], [inputs.original_size])[0]
        return {"boxes": det["boxes"].float().cpu().numpy(),
                "scores": (det["scores"] * scale).clamp(max=1.0).float().cpu().numpy(),
                "labels": det["labels"].cpu().numpy().astype(np.int64)}
