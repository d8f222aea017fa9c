"""mmdetection-1.x box arithmetic for torchvision's Faster R-CNN (``detector.legacy_mmdet: true``).

A checkpoint trained with mmdetection 1.x (the published VLDUS detectors, SPEC Part B §2.1) and
converted by ``vldus convert-checkpoint`` has the same weights as there, but torchvision places
anchors and decodes boxes slightly differently. With the flag set, :func:`apply_legacy_mmdet`
swaps these parts into a built model (composition: subclasses handed to ``model.rpn`` and
``model.roi_heads``; torchvision itself is not patched):

* :class:`LegacyAnchorGenerator` — mmdet 1.x ``AnchorGenerator(base_size=stride, scales=[size /
  stride], ratios)`` with ``ctr=None``: the base anchor of a cell is centred at
  ``0.5 * (stride - 1)`` (not 0) and spans ``[ctr - 0.5 (w - 1), ctr + 0.5 (w - 1)]`` (the +1
  pixel convention), rounded; cells are shifted by the FIXED strides 4, 8, 16, 32, 64
  (torchvision derives the stride as padded size // feature size, which is 61, not 64, for the
  'pool' level of an 800-high image). Anchor order per location is the same in both
  libraries (ratio-major; with one size per level simply the order of ``aspect_ratios``), so
  ``rpn_cls`` / ``rpn_reg`` channels need no permutation.
* :class:`LegacyBoxCoder` — mmdet 1.x ``bbox2delta`` / ``delta2bbox``: widths are
  ``x2 - x1 + 1``, centres ``(x1 + x2) / 2``, decoded corners ``ctr -/+ 0.5 w +/- 0.5``, and
  ``dw, dh`` clamped on both sides to ``|log(16 / 1000)|`` (torchvision clamps only above).
  Weights = 1 / target_stds, as in the non-legacy coder.
* :class:`LegacyRoIAlign` — mmdet 1.x's RoIAlign kernel (non-aligned, like torchvision's
  ``roi_align(aligned=False)``) ends an RoI at ``(x2 + 1) * scale``, and its FPN level mapper
  uses ``sqrt((w + 1)(h + 1))``: both follow from pooling the box ``(x1, y1, x2 + 1, y2 + 1)``.

* :class:`LegacyTransform` — mmcv ``imrescale`` keep-ratio resize: scale ``s = min(long /
  max(h, w), short / min(h, w))``, new size ``int(w s + 0.5) x int(h s + 0.5)`` (torchvision
  floors), bilinear; training boxes are made inclusive (``x2 - 1``, mmdet 1.x's COCO/VOC loaders)
  and multiplied by ``s``; detections are divided by ``s`` (torchvision: per-axis size ratios).
  Output boxes are therefore mmdet 1.x inclusive pixel boxes (x2 = last pixel), as the published
  evaluation expects (ZSDEvaluator ``inclusive_boxes``). Image sizes are reported as
  ``(h - 1, w - 1)`` so that torchvision clips proposals and detections to ``[0, W - 1]`` like
  mmdet 1.x (``image_list.image_sizes`` is used for nothing else in torchvision's Faster R-CNN).

What remains different from mmdetection 1.x (not reproduced; effects are sub-pixel or at ties):

* Resize arithmetic: OpenCV resizes the uint8 image (result quantised to uint8, fixed-point
  weights); here float tensors are interpolated (bilinear, align_corners=False, no antialias),
  and normalisation comes before the resize instead of after (equal up to that rounding).
* Training: mmdet 1.x ignores anchors crossing the image border (allowed_border 0) when it
  assigns RPN targets; torchvision uses all anchors.
* NMS: mmdet 1.x's kernel computes IoU with ``+1`` widths; torchvision's ``nms`` without.
  Proposals: mmdet keeps ``nms_post`` per level then the top ``max_num`` overall, torchvision
  NMSes each level (batched) and keeps the top ``post_nms_top_n`` overall — the same set.
* RoI level mapping: mmdet 1.x ``floor(log2(s / 56 + 1e-6))``, torchvision (on the shifted
  boxes) ``floor(4 + log2(s / 224) + 1e-6) - 2``, s = sqrt((w+1)(h+1)): the epsilon sits
  elsewhere, which matters only within 1e-6 of a level boundary.
* RoIAlign: an RoI narrower than one feature cell is widened to 1 cell by torchvision, kept
  as is by mmdet 1.x (``fmax(end - start, 0)``).
* torchvision drops boxes smaller than 0.01 px after decoding; mmdet 1.x's RCNN test does not.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torch.nn import functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

# The strides of the FPN levels '0'..'3', 'pool' (architecture, not a setting): mmdet 1.x
# ``anchor_strides=[4, 8, 16, 32, 64]`` with ``anchor_base_sizes`` = the strides.
FPN_STRIDES = (4, 8, 16, 32, 64)

# mmdet 1.x delta2bbox ``wh_ratio_clip=16 / 1000``
WH_RATIO_CLIP = 16 / 1000


def mmdet_base_anchors(stride: int, size: float, ratios: Sequence[float]) -> Tensor:
    """mmdet 1.x ``AnchorGenerator.gen_base_anchors`` for one level: (len(ratios), 4) float32.

    ``base_size = stride``, ``scales = [size / stride]``; ratio = h / w.
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
    """torchvision AnchorGenerator with mmdet 1.x base anchors and fixed strides.

    sizes: one tuple with ONE size per level (as build_detector makes them); strides: one per level.
    Output: per image, (sum_l H_l W_l A, 4) xyxy anchors, location-major, anchors inner.
    """

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int] = FPN_STRIDES) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in aspect_ratios))
        if len(strides) != len(self.sizes) or any(len(s) != 1 for s in self.sizes):
            raise ValueError(f"need one size per level and one stride per level, got sizes "
                             f"{self.sizes} and strides {tuple(strides)}")
        self.strides = tuple(int(s) for s in strides)
        self.cell_anchors = [mmdet_base_anchors(st, s[0], r)
                             for st, s, r in zip(self.strides, self.sizes, self.aspect_ratios)]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        anchors = torch.cat(per_level)
        return [anchors for _ in image_list.image_sizes]


class LegacyBoxCoder(BoxCoder):
    """mmdet 1.x ``bbox2delta`` / ``delta2bbox`` (+1 pixel widths), weights = 1 / target_stds.

    encode_single(gt (N,4), proposals (N,4)) -> (N,4); decode_single(deltas (N,4K), boxes (N,4))
    -> (N,4K). Means are 0 (as in every SPEC config).
    """

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__(tuple(float(w) for w in weights), bbox_xform_clip=abs(math.log(WH_RATIO_CLIP)))

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        p = proposals.to(reference_boxes.dtype)
        px, py = (p[:, 0] + p[:, 2]) * 0.5, (p[:, 1] + p[:, 3]) * 0.5
        pw, ph = p[:, 2] - p[:, 0] + 1.0, p[:, 3] - p[:, 1] + 1.0
        g = reference_boxes
        gx, gy = (g[:, 0] + g[:, 2]) * 0.5, (g[:, 1] + g[:, 3]) * 0.5
        gw, gh = g[:, 2] - g[:, 0] + 1.0, g[:, 3] - g[:, 1] + 1.0
        return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                            ww * torch.log(gw / pw), wh * torch.log(gh / ph)], dim=1)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        wx, wy, ww, wh = self.weights
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
        clip = self.bbox_xform_clip
        dw = torch.clamp(rel_codes[:, 2::4] / ww, min=-clip, max=clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, min=-clip, max=clip)
        px = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None]
        py = ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        pw = (boxes[:, 2] - boxes[:, 0] + 1.0)[:, None]
        ph = (boxes[:, 3] - boxes[:, 1] + 1.0)[:, None]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        gx, gy = px + pw * dx, py + ph * dy
        out = torch.stack([gx - gw * 0.5 + 0.5, gy - gh * 0.5 + 0.5,
                           gx + gw * 0.5 - 0.5, gy + gh * 0.5 - 0.5], dim=2)
        return out.flatten(1)


class LegacyRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign over ``(x1, y1, x2 + 1, y2 + 1)``: mmdet 1.x RoI extent and level choice.

    Same constructor and output, (sum N_i, C, out_h, out_w), as MultiScaleRoIAlign.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        plus_one = [b + b.new_tensor([0.0, 0.0, 1.0, 1.0]) for b in boxes]
        return super().forward(x, plus_one, image_shapes)


def mmcv_rescale(height: int, width: int, short: int, long: int) -> tuple[float, int, int]:
    """mmcv ``imrescale(img, (long, short))``: (scale, new height, new width)."""
    scale = min(long / max(height, width), short / min(height, width))
    return scale, int(height * scale + 0.5), int(width * scale + 0.5)


class LegacyTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform with mmcv's keep-ratio resize and scale-factor box mapping.

    Same constructor as GeneralizedRCNNTransform (``min_size`` = short side, ``max_size`` =
    long side); images (3, H, W) in 0..1, boxes xyxy.
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
            boxes = target["boxes"] - target["boxes"].new_tensor([0.0, 0.0, 1.0, 1.0])  # inclusive x2, y2
            boxes = boxes * scale
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, nw - 1)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, nh - 1)
            target = {**target, "boxes": boxes}
        return image, target

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None
                ) -> tuple[ImageList, Optional[list[dict[str, Tensor]]]]:
        image_list, targets = super().forward(images, targets)
        # Report the largest pixel index (h - 1, w - 1) as the size: torchvision then clips
        # proposals and detections to [0, W - 1] x [0, H - 1], as mmdet 1.x does.
        sizes = [(h - 1, w - 1) for h, w in image_list.image_sizes]
        return ImageList(image_list.tensors, sizes), targets

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, (h, w) in zip(result, original_image_sizes):
            scale, _, _ = self._scale(h, w, self.min_size[-1])
            pred["boxes"] = pred["boxes"] / scale
        return result


def apply_legacy_mmdet(model, anchor_sizes: Sequence[int], aspect_ratios: Sequence[float],
                       bbox_reg_weights: Sequence[float]) -> None:
    """Swap the mmdet 1.x transform, anchor generator, box coders and RoIAlign into a built
    torchvision FasterRCNN (its own settings are kept)."""
    t = model.transform
    model.transform = LegacyTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                      size_divisible=t.size_divisible, fixed_size=t.fixed_size)
    model.rpn.anchor_generator = LegacyAnchorGenerator(
        tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    model.rpn.box_coder = LegacyBoxCoder((1.0, 1.0, 1.0, 1.0))  # mmdet RPN target_stds = 1
    model.roi_heads.box_coder = LegacyBoxCoder(bbox_reg_weights)
    pool = model.roi_heads.box_roi_pool
    model.roi_heads.box_roi_pool = LegacyRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio)
