"""mmdetection-1.x box arithmetic for torchvision's Faster R-CNN (``detector.legacy_mmdet: true``).

A checkpoint trained with mmdetection 1.x (the published VLDUS detectors, docs/design.md §2.1) and
converted by ``vldus convert-checkpoint`` has the same weights as there, but mmdet 1.x counts
pixels differently. With the flag set, :func:`apply_legacy_mmdet` swaps the parts below into a
built model (composition: subclasses handed to ``model.transform``, ``model.rpn`` and
``model.roi_heads``; torchvision itself is not patched).

mmdet 1.x boxes are INCLUSIVE: ``x2`` is the last pixel, a box is ``x2 - x1 + 1`` wide, and its
IoU, NMS, RoIAlign extent (``(x2 + 1) * scale``), FPN level (``sqrt((w + 1)(h + 1))``) and
min-size filter all use that width. Inside the legacy model every box is therefore held as
``(x1, y1, x2 + 1, y2 + 1)`` ("exclusive"); torchvision's own IoU, NMS, RoIAlign, level mapper
and size filter then compute exactly mmdet 1.x's numbers, and only four parts need swapping:

* :class:`LegacyTransform` — mmcv ``imrescale`` keep-ratio resize: scale ``s = min(long /
  max(h, w), short / min(h, w))``, new size ``int(w s + 0.5) x int(h s + 0.5)`` (torchvision
  floors), bilinear. Training boxes (our records are exclusive = mmdet inclusive + 1) are
  scaled as mmdet scales its inclusive boxes: ``x2 = (x2 - 1) s``, clipped to ``[0, W - 1]``,
  then +1. Detections are mmdet 1.x's (inclusive boxes divided by the one scale factor ``s``;
  torchvision maps back by per-axis size ratios), returned +1 on ``x2, y2`` like our records,
  so the mmdet-v1 evaluation (which subtracts 1) sees exactly mmdet 1.x's boxes.
* :class:`LegacyAnchorGenerator` — mmdet 1.x ``AnchorGenerator(base_size=stride, scales=[size /
  stride], ratios)``, ``ctr=None``: a cell's base anchor is centred at ``0.5 (stride - 1)``
  (torchvision: 0) and spans ``ctr -/+ 0.5 (w - 1)``, rounded; cells are shifted by the FIXED
  strides 4..64 (torchvision derives a stride as padded size // feature size: 61, not 64, for
  the 'pool' level of an 800-high image). The order of the anchors of a location is the same in
  both libraries (ratio-major; one size per level: the order of ``aspect_ratios``), so the
  ``rpn_cls`` / ``rpn_reg`` channels need no permutation.
* :class:`LegacyBoxCoder` — mmdet 1.x ``bbox2delta`` / ``delta2bbox`` (centre ``(x1 + x2) / 2``,
  width ``x2 - x1 + 1``, corners ``ctr -/+ 0.5 w +/- 0.5``) on the inclusive boxes, with ``dw, dh``
  clamped on BOTH sides to ``|log(16 / 1000)|`` (torchvision clamps only above). Weights =
  1 / target_stds as in the plain coder. (On exclusive boxes this is torchvision's formula with
  the two-sided clamp; it is written out in mmdet's terms so it can be checked against them.)

What remains different from mmdetection 1.x (not reproduced; sub-pixel effects or degenerate boxes):

* Resize arithmetic: OpenCV resizes the uint8 image (quantised to uint8, fixed-point weights);
  here float tensors are interpolated (bilinear, align_corners=False, no antialias), after
  normalisation instead of before (equal up to that rounding).
* Clipping: torchvision clips exclusive boxes to ``[0, W]``, i.e. inclusive ``x2`` to
  ``[-1, W - 1]`` and ``x1`` to ``[0, W]`` (mmdet: both ``[0, W - 1]``): differs only for
  boxes lying entirely outside the image.
* RoIAlign: an RoI narrower than one feature cell is widened to 1 cell by torchvision, kept
  as is by mmdet 1.x (``fmax(end - start, 0)``). The level mapper's 1e-6 sits outside the log
  in torchvision, inside in mmdet (only within 1e-6 of a level boundary).
* Proposals: mmdet keeps ``nms_post`` per level then the top ``max_num`` overall, torchvision
  NMSes each level (batched) and keeps the top ``post_nms_top_n`` overall: the same set up to ties.
* torchvision drops decoded boxes under 0.01 px and, in training, uses anchors crossing the
  image border; mmdet 1.x keeps the former and ignores the latter (allowed_border 0).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

# The strides of the FPN levels '0'..'3', 'pool' (architecture, not a setting): mmdet 1.x
# ``anchor_strides=[4, 8, 16, 32, 64]`` with ``anchor_base_sizes`` = the strides.
FPN_STRIDES = (4, 8, 16, 32, 64)

# mmdet 1.x delta2bbox ``wh_ratio_clip=16 / 1000``
WH_RATIO_CLIP = 16 / 1000


def to_inclusive(boxes: Tensor) -> Tensor:
    """(x1, y1, x2 + 1, y2 + 1) -> mmdet 1.x (x1, y1, x2, y2); (N, 4k) -> (N, 4k)."""
    out = boxes.clone()
    out[:, 2::4] -= 1.0
    out[:, 3::4] -= 1.0
    return out


def to_exclusive(boxes: Tensor) -> Tensor:
    """mmdet 1.x (x1, y1, x2, y2) -> (x1, y1, x2 + 1, y2 + 1); (N, 4k) -> (N, 4k)."""
    out = boxes.clone()
    out[:, 2::4] += 1.0
    out[:, 3::4] += 1.0
    return out


def mmdet_base_anchors(stride: int, size: float, ratios: Sequence[float]) -> Tensor:
    """mmdet 1.x ``AnchorGenerator.gen_base_anchors`` for one level, INCLUSIVE boxes:
    (len(ratios), 4) float32. ``base_size = stride``, ``scales = [size / stride]``; ratio = h / w.
    """
    ratios_t = torch.tensor(list(ratios), dtype=torch.float64)
    ctr = 0.5 * (stride - 1)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = stride * w_ratios * (size / stride)
    hs = stride * h_ratios * (size / stride)
    anchors = torch.stack([ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1),
                           ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)], dim=1)
    return anchors.round().float()


class LegacyAnchorGenerator(AnchorGenerator):
    """torchvision AnchorGenerator with mmdet 1.x base anchors (held exclusive) and fixed strides.

    sizes: one tuple with ONE size per level (as build_detector makes them); strides: one per level.
    Output: per image, (sum_l H_l W_l A, 4) anchors, location-major, anchors inner.
    """

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int] = FPN_STRIDES) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in aspect_ratios))
        if len(strides) != len(self.sizes) or any(len(s) != 1 for s in self.sizes):
            raise ValueError(f"need one size per level and one stride per level, got sizes "
                             f"{self.sizes} and strides {tuple(strides)}")
        self.strides = tuple(int(s) for s in strides)
        self.cell_anchors = [to_exclusive(mmdet_base_anchors(st, s[0], r))
                             for st, s, r in zip(self.strides, self.sizes, self.aspect_ratios)]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class LegacyBoxCoder(BoxCoder):
    """mmdet 1.x ``bbox2delta`` / ``delta2bbox`` for exclusive boxes; weights = 1 / target_stds.

    encode_single(gt (N,4), proposals (N,4)) -> (N,4); decode_single(deltas (N,4K), boxes (N,4))
    -> (N,4K). Means are 0 (as in every published config).
    """

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__(tuple(float(w) for w in weights), bbox_xform_clip=abs(math.log(WH_RATIO_CLIP)))

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        p = to_inclusive(proposals.to(reference_boxes.dtype))
        g = to_inclusive(reference_boxes)
        px, py = (p[:, 0] + p[:, 2]) * 0.5, (p[:, 1] + p[:, 3]) * 0.5
        pw, ph = p[:, 2] - p[:, 0] + 1.0, p[:, 3] - p[:, 1] + 1.0
        gx, gy = (g[:, 0] + g[:, 2]) * 0.5, (g[:, 1] + g[:, 3]) * 0.5
        gw, gh = g[:, 2] - g[:, 0] + 1.0, g[:, 3] - g[:, 1] + 1.0
        return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                            ww * torch.log(gw / pw), wh * torch.log(gh / ph)], dim=1)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return to_exclusive(mmdet_delta2bbox(rel_codes, to_inclusive(boxes.to(rel_codes.dtype)),
                                             self.weights, self.bbox_xform_clip))


def mmdet_delta2bbox(deltas: Tensor, rois: Tensor, weights: Sequence[float], clip: float) -> Tensor:
    """mmdet 1.x ``delta2bbox`` without clipping to the image: inclusive rois (N, 4), deltas
    (N, 4K) scaled by ``weights`` (= 1 / stds) -> inclusive boxes (N, 4K)."""
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, min=-clip, max=clip)
    dh = torch.clamp(deltas[:, 3::4] / wh, min=-clip, max=clip)
    px = ((rois[:, 0] + rois[:, 2]) * 0.5)[:, None]
    py = ((rois[:, 1] + rois[:, 3]) * 0.5)[:, None]
    pw = (rois[:, 2] - rois[:, 0] + 1.0)[:, None]
    ph = (rois[:, 3] - rois[:, 1] + 1.0)[:, None]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * dx, py + ph * dy
    out = torch.stack([gx - gw * 0.5 + 0.5, gy - gh * 0.5 + 0.5,
                       gx + gw * 0.5 - 0.5, gy + gh * 0.5 - 0.5], dim=2)
    return out.flatten(1)


def mmcv_rescale(height: int, width: int, short: int, long: int) -> tuple[float, int, int]:
    """mmcv ``imrescale(img, (long, short))``: (scale, new height, new width)."""
    scale = min(long / max(height, width), short / min(height, width))
    return scale, int(height * scale + 0.5), int(width * scale + 0.5)


class LegacyTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform with mmcv's keep-ratio resize and scale-factor box mapping.

    Same constructor as GeneralizedRCNNTransform (``min_size`` = short side, ``max_size`` =
    long side); images (3, H, W) in 0..1; target boxes exclusive xyxy (our records);
    detections come back exclusive too: mmdet 1.x's inclusive boxes / s, + 1 on x2, y2.
    """

    def _scale(self, height: int, width: int, short: int) -> tuple[float, int, int]:
        return mmcv_rescale(height, width, short, int(self.max_size))

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None
               ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        h, w = image.shape[-2:]
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        scale, nh, nw = self._scale(h, w, short)
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        if target is not None:
            boxes = to_inclusive(target["boxes"]) * scale  # mmdet 1.x Resize on inclusive boxes
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, nw - 1)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, nh - 1)
            target = {**target, "boxes": to_exclusive(boxes)}
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, (h, w) in zip(result, original_image_sizes):
            scale, _, _ = self._scale(h, w, self.min_size[-1])
            pred["boxes"] = to_exclusive(to_inclusive(pred["boxes"]) / scale)
        return result


def apply_legacy_mmdet(model, anchor_sizes: Sequence[int], aspect_ratios: Sequence[float],
                       bbox_reg_weights: Sequence[float]) -> None:
    """Swap the mmdet 1.x transform, anchor generator and box coders into a built torchvision
    FasterRCNN (its other settings are kept)."""
    t = model.transform
    model.transform = LegacyTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                      size_divisible=t.size_divisible, fixed_size=t.fixed_size)
    model.rpn.anchor_generator = LegacyAnchorGenerator(
        tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    model.rpn.box_coder = LegacyBoxCoder((1.0, 1.0, 1.0, 1.0))  # mmdet RPN target_stds = 1
    model.roi_heads.box_coder = LegacyBoxCoder(bbox_reg_weights)
