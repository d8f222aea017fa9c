"""CLIP vision-language distillation for the synthesizer's critic (docs/design.md §6.4).

A frozen CLIP image encoder I(·) looks at RoI features turned into pictures, and the critic's
512-d feature head D(·) is pulled towards it:

- L_fa = w_fa · [ L1(D(x), I(x)) + L1(D(x~), I(x~)) + L1(D(x), I(x~)) + L1(D(x~), I(x)) ]
- r_I = rownorm(I(x~) · Tᵀ), r_D = rownorm(D(x~) · Tᵀ), T = class text embeddings (K, dt)
- L_ra^dis = w_ra_dis · L1(r_I, r_D)
- L_ra^div = w_ra_div · Σ_{i<j} cos(r_I,i, r_I,j), over every pair of the batch

x = real RoI features, x~ = generated ones, L1 = mean absolute difference, rownorm = L2
normalisation of each row. D(x~) and I(x~) receive gradients, so these terms can train both the
critic (through D) and the generator (through x~ and the frozen encoder).

Departures from the released code (docs/released.md): the feature -> image map is done in torch
(differentiable; no uint8/PIL round trip; bilinear resize instead of CLIP's bicubic PIL resize),
and L_ra^div sums over the whole batch (the release used one row, making it identically 0).
``mode='logged'`` reproduces the release's "computed and logged, never back-propagated", where
and how the released trainer computes it (:meth:`CLIPDistiller.released_terms`, called by the
trainer in every critic step on one randomly drawn row, through the released uint8/PIL image
path of :func:`features_to_clip_images_released`). On a GPU that path is slow: each critic step
copies to the host twice, resizes with PIL and uploads again (the configs use 'active').

Note that L_ra^div depends on I(x~) only: it sends gradient to x~ (the generator), never to
the critic features.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vldus.clip import OPENAI_MEAN, OPENAI_STD
from vldus.errors import InputError
from vldus.precision import resolve_precision

MODES = ("active", "logged", "off")


def features_to_clip_images(x: torch.Tensor, image_size: int | Sequence[int] = 224,
                            mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                            eps: float = 1e-6) -> torch.Tensor:
    """RoI features (B, D) -> CLIP-ready images (B, 3, H, W), differentiable.

    Each D = s·s vector (1024 -> 32x32) becomes a one-channel map, min-max scaled per sample to
    [0, 1] (a constant map becomes 0; ``eps`` guards the division), copied to 3 channels,
    bilinearly resized to ``image_size`` and normalised with the encoder's ``mean``/``std``
    (default: OpenAI CLIP's).
    """
    if x.dim() != 2:
        raise ValueError(f"expected features (B, D), got shape {tuple(x.shape)}")
    b, d = x.shape
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"feature dim {d} is not a square (needs s*s, e.g. 1024 = 32x32)")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    maps = x.reshape(b, 1, side, side)
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    maps = (maps - lo) / (hi - lo).clamp_min(eps)
    maps = maps.expand(b, 3, side, side)
    if maps.shape[-2:] != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    mean_t = torch.as_tensor(mean, dtype=maps.dtype, device=maps.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=maps.dtype, device=maps.device).view(1, 3, 1, 1)
    return (maps - mean_t) / std_t


@torch.no_grad()
def features_to_clip_images_released(x: torch.Tensor, image_size: int | Sequence[int] = 224,
                                     mean: Sequence[float] = OPENAI_MEAN,
                                     std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """The released trainer's map (docs/design.md §6.4), no gradient: RoI features (B, D) -> (B, 3, H, W).

    Per row: the s x s map (D = s*s), min-max scaled to [0, 255] and truncated to uint8, as a
    greyscale PIL image; then CLIP's preprocess: bicubic resize of the short side to H, centre
    crop (H, W), RGB, [0, 1], normalised with ``mean``/``std``. A constant map becomes 0 (the
    release would divide by zero).
    """
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    b, d = x.shape
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"feature dim {d} is not a square (needs s*s, e.g. 1024 = 32x32)")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    maps = x.detach().float().reshape(b, side, side).cpu()
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    scaled = torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1.0) * 255, 0.0)
    out = []
    for row in scaled.numpy().astype(np.uint8):  # astype truncates, as numpy did in the release
        img = TF.resize(Image.fromarray(row, mode="L"), min(size), InterpolationMode.BICUBIC)
        img = TF.center_crop(img, list(size)).convert("RGB")
        out.append(TF.normalize(TF.to_tensor(img), list(mean), list(std)))
    return torch.stack(out).to(x.device)


class CLIPDistiller(nn.Module):
    """The distillation losses of §6.4 around a frozen CLIP image encoder.

    Args:
        image_encoder: an open_clip model (its ``.visual`` tower is kept, the text tower is
            not) or any module mapping images (B, 3, H, W) -> (B, dt).
        text_matrix: T, (K, dt) class text embeddings (e.g. the CLIP ``se`` matrix).
        w_fa, w_ra_dis, w_ra_div: loss weights (docs/design.md §6.4: 0.005, 0.01, 0.001).
        mode: 'active' (differentiable) or 'logged' (values only, computed without autograd:
            the released behaviour).
        precision: 'fp32' or 'bf16' (autocast around the encoder, CPU or CUDA).
        image_size, mean, std: override what is read from the encoder (open_clip attributes).

    ``forward(x_real (B,1024), x_fake (B,1024), feat_real (B,dt), feat_fake (B,dt))`` returns
    ``{"l_fa", "l_ra_dis", "l_ra_div", "total"}`` (scalar tensors, weights applied).
    I(x_real) is computed without autograd unless ``x_real.requires_grad``; pass it as
    ``img_real`` (from :meth:`encode`) to reuse it across calls on the same real batch, and
    ``img_fake`` when the fakes are data (the critic's steps) and were encoded beforehand.
    """

    def __init__(self, image_encoder: nn.Module, text_matrix: torch.Tensor, w_fa: float,
                 w_ra_dis: float, w_ra_div: float, mode: str = "active", precision: str = "fp32",
                 image_size: Optional[int | Sequence[int]] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        from vldus.clip import clip_image_size, clip_mean_std, freeze

        if mode not in ("active", "logged"):
            raise ValueError(f"mode must be 'active' or 'logged', got {mode!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        text_matrix = torch.as_tensor(text_matrix, dtype=torch.float32)
        if text_matrix.dim() != 2:
            raise ValueError(f"text_matrix must be (K, dt), got shape {tuple(text_matrix.shape)}")
        default_mean, default_std = clip_mean_std(image_encoder)
        self.encoder = freeze(getattr(image_encoder, "visual", image_encoder))
        self.image_size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (
            (image_size, image_size) if image_size else clip_image_size(image_encoder))
        self.mean = tuple(mean or default_mean)
        self.std = tuple(std or default_std)
        self.register_buffer("text", text_matrix, persistent=False)
        self.w_fa, self.w_ra_dis, self.w_ra_div = float(w_fa), float(w_ra_dis), float(w_ra_div)
        self.mode = mode
        self.precision = precision

    @property
    def active(self) -> bool:
        """True when the losses carry gradients (add ``total`` to the optimised loss)."""
        return self.mode == "active"

    def train(self, mode: bool = True) -> "CLIPDistiller":
        super().train(mode)
        self.encoder.eval()  # the CLIP encoder stays frozen whatever the caller does
        return self

    def encode(self, features: torch.Tensor, released: bool = False) -> torch.Tensor:
        """I(features): (B, 1024) RoI features -> (B, dt) float32 CLIP image embeddings.
        ``released``: through the released uint8/PIL image path (no gradient)."""
        to_images = features_to_clip_images_released if released else features_to_clip_images
        images = to_images(features.float(), self.image_size, self.mean, self.std)
        with torch.autocast(images.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            out = self.encoder(images)
        return out.float()

    def forward(self, x_real: torch.Tensor, x_fake: torch.Tensor, feat_real: torch.Tensor,
                feat_fake: torch.Tensor, img_real: Optional[torch.Tensor] = None,
                img_fake: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.active and torch.is_grad_enabled()):
            return self._losses(x_real, x_fake, feat_real, feat_fake, img_real, img_fake)

    def _losses(self, x_real, x_fake, feat_real, feat_fake, img_real=None, img_fake=None) -> dict[str, torch.Tensor]:
        if img_real is not None:
            img_real = img_real.float()
        elif x_real.requires_grad:
            img_real = self.encode(x_real)
        else:
            with torch.no_grad():  # real features are data: no activations kept
                img_real = self.encode(x_real)
        img_fake = self.encode(x_fake) if img_fake is None else img_fake.float()
        return self._terms(img_real, img_fake, feat_real, feat_fake)

    @torch.no_grad()
    def released_terms(self, x_real: torch.Tensor, x_fake: torch.Tensor, feat_real: torch.Tensor,
                       feat_fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms as the released trainer computes them, for logging (no gradient): the rows
        given (the release: one row per critic step) through the released uint8/PIL image path.
        With one row L_ra^div is 0, as in the release."""
        return self._terms(self.encode(x_real, released=True), self.encode(x_fake, released=True),
                           feat_real, feat_fake)

    def _terms(self, img_real, img_fake, feat_real, feat_fake) -> dict[str, torch.Tensor]:
        feat_real, feat_fake = feat_real.float(), feat_fake.float()
        if feat_fake.shape[-1] != img_fake.shape[-1] or self.text.shape[1] != img_fake.shape[-1]:
            raise ValueError(f"dimension mismatch: critic features {feat_fake.shape[-1]}, CLIP "
                             f"image embeddings {img_fake.shape[-1]}, text rows {self.text.shape[1]}")
        l_fa = self.w_fa * (F.l1_loss(feat_real, img_real) + F.l1_loss(feat_fake, img_fake)
                            + F.l1_loss(feat_real, img_fake) + F.l1_loss(feat_fake, img_real))
        r_clip = F.normalize(img_fake @ self.text.T, dim=1)
        r_critic = F.normalize(feat_fake @ self.text.T, dim=1)
        l_ra_dis = self.w_ra_dis * F.l1_loss(r_critic, r_clip)
        cosines = r_clip @ r_clip.T  # rows are unit vectors: entries are cosines
        l_ra_div = self.w_ra_div * torch.triu(cosines, diagonal=1).sum()
        return {"l_fa": l_fa, "l_ra_dis": l_ra_dis, "l_ra_div": l_ra_div,
                "total": l_fa + l_ra_dis + l_ra_div}


def build_distiller(gan_cfg, text_matrix, device: str | torch.device = "cpu") -> Optional[CLIPDistiller]:
    """The distiller a GanConfig asks for, or None when ``gan_cfg.distill == 'off'``.

    'active' / 'logged' need ``gan_cfg.clip_weights`` (a local file; nothing is downloaded):
    without it this raises InputError rather than silently training without distillation.
    ``text_matrix``: (K, dt) array/tensor of class text embeddings, dt = CLIP embedding dim.
    """
    from vldus.clip import load_open_clip

    mode = gan_cfg.distill
    if mode not in MODES:
        raise InputError("gan.distill", f"{mode!r}: expected one of {MODES}")
    if mode == "off":
        return None
    if not gan_cfg.clip_weights:
        raise InputError("gan.clip_weights", f"gan.distill={mode!r} needs a local CLIP weights "
                                             "file: set gan.clip_weights (demo: --clip-weights) "
                                             "or gan.distill=off")
    model = load_open_clip(gan_cfg.clip_arch, gan_cfg.clip_weights, device,
                           getattr(gan_cfg, "clip_quickgelu", "auto"))
    text = torch.as_tensor(text_matrix, dtype=torch.float32)
    dim = getattr(model.visual, "output_dim", None) or getattr(model, "embed_dim", None)
    if dim is not None:
        if text.dim() != 2 or text.shape[1] != dim:
            raise InputError("embeddings", f"text matrix of shape {tuple(text.shape)}: relation "
                                           f"distillation needs {dim}-d CLIP text rows "
                                           "(vldus embed --encoder clip with the same weights)")
        if gan_cfg.d_feat != dim:
            raise InputError("gan.d_feat", f"{gan_cfg.d_feat}: the critic feature must have the "
                                           f"CLIP embedding dim {dim} for feature alignment")
    precision = resolve_precision(gan_cfg.precision, device)
    return CLIPDistiller(model, text, gan_cfg.w_fa, gan_cfg.w_ra_dis, gan_cfg.w_ra_div,
                         mode=mode, precision=precision).to(device)
