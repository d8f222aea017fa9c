"""Multi-scale RoIAlign as one weighted gather: torchvision's ``MultiScaleRoIAlign`` numbers,
several times faster on a CPU (docs/benchmarks.md, detector profile).

torchvision's CPU ``roi_align`` kernel recomputes every sample's bilinear weights once per
channel and runs its backward pass as a serial scatter; on the demo's detector that backward was
the largest single cost of a training step. Here each output bin is a weighted sum of at most
``4 * ratio * ratio`` feature-map cells, so the whole pooling over all FPN levels is one
``F.embedding_bag`` call over the feature maps laid out as rows of ``C`` channels:

    table   (sum over levels of N * H * W, C)   every level's cells, channels last
    indices (K * 7 * 7, 4 * ratio * ratio)      the cells each bin reads
    weights (K * 7 * 7, 4 * ratio * ratio)      bilinear weight / ratio**2 (0 outside the map)

Its backward is a vectorised index-add of the output gradient into those rows. The arithmetic is
torchvision's ``roi_align(aligned=False)`` with a fixed sampling ratio (a RoI is at least one
cell wide, samples beyond one cell outside the map count 0, samples near the last row or column
read it) and its FPN level rule; only the order of the fp32 sums differs (~1e-6).

``detector.roi_align``: ``gather`` (this), ``torchvision`` (its kernel), ``auto`` (this on CPU
tensors, torchvision's elsewhere: its CUDA kernel is not the bottleneck there).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

KERNELS = ("auto", "gather", "torchvision")


class GatherRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign(featmap_names, output_size, sampling_ratio)`` (a subclass, as
    torchvision's FasterRCNN requires): ``forward(features, boxes, image_shapes) -> (K, C,
    output_size, output_size)`` for the K boxes of all images in order. ``kernel``: see the
    module docstring."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, kernel: str = "auto"):
        super().__init__(featmap_names, output_size, sampling_ratio)
        if kernel not in KERNELS:
            raise ValueError(f"unknown RoIAlign kernel {kernel!r}; choose one of {KERNELS}")
        if kernel == "gather" and sampling_ratio < 1:
            raise ValueError("the gather RoIAlign needs a fixed sampling ratio (roi_sampling_ratio >= 1)")
        self.kernel = kernel

    def uses_gather(self, device: torch.device) -> bool:
        if self.kernel == "auto":
            return device.type == "cpu" and self.sampling_ratio >= 1
        return self.kernel == "gather"

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = [features[name] for name in self.featmap_names]
        if not self.uses_gather(maps[0].device):
            return super().forward(features, boxes, image_shapes)
        # torchvision's scale inference: each level's power-of-two ratio to the largest image
        height = max(h for h, _ in image_shapes)
        scales = [2.0 ** round(math.log2(m.shape[-2] / height)) for m in maps]
        mapper = LevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])))
        return gather_roi_align(maps, scales, boxes, mapper(boxes), self.output_size[0], self.sampling_ratio)


def gather_roi_align(maps: list[Tensor], scales: list[float], boxes: list[Tensor], levels: Tensor,
                     output_size: int, ratio: int) -> Tensor:
    """RoIAlign of ``boxes`` (per image (k_i, 4) x1y1x2y2 in image pixels), box ``j`` read from
    ``maps[levels[j]]`` ((N, C, H_l, W_l) at ``scales[l]``). Returns (K, C, output_size, output_size)."""
    device, dtype = maps[0].device, maps[0].dtype
    channels = maps[0].shape[1]
    table = torch.cat([m.to(dtype).permute(0, 2, 3, 1).reshape(-1, channels) for m in maps])
    heights = torch.tensor([m.shape[2] for m in maps], device=device)[levels]
    widths = torch.tensor([m.shape[3] for m in maps], device=device)[levels]
    starts = [0]
    for m in maps[:-1]:
        starts.append(starts[-1] + m.shape[0] * m.shape[2] * m.shape[3])
    image = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=device) for i, b in enumerate(boxes)])
    first_cell = torch.tensor(starts, device=device)[levels] + image * heights * widths  # (K,)
    rois = torch.cat(boxes).detach()
    rois = rois * torch.tensor(scales, dtype=rois.dtype, device=device)[levels, None]

    y_cells, y_weights = _axis(rois[:, 1], rois[:, 3], heights, output_size, ratio)  # (K, out, ratio, 2)
    x_cells, x_weights = _axis(rois[:, 0], rois[:, 2], widths, output_size, ratio)
    k = len(rois)
    # (K, out_y, out_x, ratio_y, 2, ratio_x, 2): every (sample, corner) pair of a bin
    cells = (first_cell[:, None, None, None, None, None, None]
             + y_cells[:, :, None, :, :, None, None] * widths[:, None, None, None, None, None, None]
             + x_cells[:, None, :, None, None, :, :])
    weights = y_weights[:, :, None, :, :, None, None] * x_weights[:, None, :, None, None, :, :] / ratio ** 2
    bag = (k * output_size ** 2, 4 * ratio ** 2)
    pooled = F.embedding_bag(cells.reshape(bag), table, per_sample_weights=weights.reshape(bag).to(dtype), mode="sum")
    return pooled.view(k, output_size, output_size, channels).permute(0, 3, 1, 2)


def _axis(start: Tensor, end: Tensor, size: Tensor, bins: int, ratio: int) -> tuple[Tensor, Tensor]:
    """One axis of torchvision's aligned=False sampling: the lower/upper cell (K, bins, ratio, 2)
    of each sample and its bilinear weight (0 for a sample more than a cell outside the map)."""
    step = (end - start).clamp(min=1.0) / bins  # (K,)
    grid = torch.arange(bins * ratio, device=start.device, dtype=start.dtype)
    bin_index = torch.div(grid, ratio, rounding_mode="floor")
    sample = grid - bin_index * ratio
    pos = start[:, None] + bin_index * step[:, None] + (sample + 0.5) * step[:, None] / ratio  # (K, bins*ratio)
    size = size[:, None]
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    last = low >= size - 1  # at or beyond the last cell: read it alone
    low = torch.where(last, size - 1, low)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(pos), pos - low)
    cells = torch.stack([low, high], -1).view(-1, bins, ratio, 2)
    weights = (torch.stack([1 - frac, frac], -1) * inside[..., None]).view(-1, bins, ratio, 2)
    return cells, weights
