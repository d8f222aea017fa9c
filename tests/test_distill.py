"""CLIP distillation: the feature->image map, hand-checked loss values, where gradients go."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from vldus.config import GanConfig
from vldus.errors import InputError
from vldus.synthesis.distill import (CLIPDistiller, build_distiller, features_to_clip_images,
                                    features_to_clip_images_released)

W_FA, W_DIS, W_DIV = 0.005, 0.01, 0.001


def test_feature_to_image_map():
    x = torch.arange(2 * 1024, dtype=torch.float32).reshape(2, 1024)
    x[1] = -3.0 * x[1]
    x[1, 5] = 1e6  # an outlier is the max of its own sample only
    raw = features_to_clip_images(x, image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    assert raw.shape == (2, 3, 32, 32)
    for b in range(2):
        assert raw[b].min() == 0 and raw[b].max() == 1
        assert torch.equal(raw[b, 0], raw[b, 1]) and torch.equal(raw[b, 0], raw[b, 2])
    # sample 0 is a ramp: row-major 32x32 reshape, scaled by its own range
    assert torch.allclose(raw[0, 0], x[0].reshape(32, 32) / 1023)
    assert raw[1, 0, 0, 5] == 1
    # resize + CLIP normalisation
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    img = features_to_clip_images(x, image_size=(64, 48), mean=mean, std=std)
    assert img.shape == (2, 3, 64, 48)
    for c in range(3):
        back = img[:, c] * std[c] + mean[c]
        assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    # constant features: no division by zero
    flat = features_to_clip_images(torch.full((1, 1024), 7.0), 32, (0, 0, 0), (1, 1, 1))
    assert torch.isfinite(flat).all() and flat.abs().max() == 0
    with pytest.raises(ValueError, match="not a square"):
        features_to_clip_images(torch.zeros(1, 1000))


def test_map_is_differentiable():
    x = torch.randn(3, 1024, requires_grad=True)
    (features_to_clip_images(x, 64) ** 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


class ToyEncoder(nn.Module):
    """A linear 'image encoder' so the losses can be computed by hand."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.proj = nn.Linear(3 * 32 * 32, dim)

    def forward(self, images):
        return self.proj(images.flatten(1))


def toy_distiller(mode="active", dim=4, k=5):
    torch.manual_seed(0)
    return CLIPDistiller(ToyEncoder(dim), torch.randn(k, dim), W_FA, W_DIS, W_DIV, mode=mode,
                         image_size=32)


def test_losses_match_hand_computation():
    dist = toy_distiller()
    torch.manual_seed(1)
    x_real, x_fake = torch.randn(3, 1024), torch.randn(3, 1024)
    f_real, f_fake = torch.randn(3, 4), torch.randn(3, 4)
    out = dist(x_real, x_fake, f_real, f_fake)
    with torch.no_grad():
        i_real = dist.encoder(features_to_clip_images(x_real, 32)).numpy().astype(np.float64)
        i_fake = dist.encoder(features_to_clip_images(x_fake, 32)).numpy().astype(np.float64)
    t = dist.text.numpy().astype(np.float64)
    fr, ff = f_real.numpy().astype(np.float64), f_fake.numpy().astype(np.float64)

    def l1(a, b):
        return np.abs(a - b).mean()

    fa = W_FA * (l1(fr, i_real) + l1(ff, i_fake) + l1(fr, i_fake) + l1(ff, i_real))
    rownorm = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    r_i, r_d = rownorm(i_fake @ t.T), rownorm(ff @ t.T)
    dis = W_DIS * l1(r_i, r_d)
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    div = W_DIV * (cos(r_i[0], r_i[1]) + cos(r_i[0], r_i[2]) + cos(r_i[1], r_i[2]))
    assert abs(div) > 1e-6  # the released one-row version was identically 0
    for key, want in [("l_fa", fa), ("l_ra_dis", dis), ("l_ra_div", div), ("total", fa + dis + div)]:
        assert out[key].shape == () and np.isclose(out[key].item(), want, rtol=1e-4, atol=1e-9), key


@pytest.mark.parametrize("loss", ["l_fa", "l_ra_dis", "l_ra_div"])
def test_gradients_reach_fakes_not_encoder(tiny_clip, loss):
    model, _ = tiny_clip
    torch.manual_seed(0)
    dist = CLIPDistiller(model, torch.randn(6, 512), W_FA, W_DIS, W_DIV)
    x_real = torch.rand(4, 1024)
    x_fake = torch.rand(4, 1024, requires_grad=True)
    f_real = torch.randn(4, 512, requires_grad=True)
    f_fake = torch.randn(4, 512, requires_grad=True)
    dist(x_real, x_fake, f_real, f_fake)[loss].backward()
    assert x_fake.grad is not None and x_fake.grad.abs().sum() > 0
    if loss == "l_ra_div":  # depends on I(x~) only
        assert f_fake.grad is None and f_real.grad is None
    else:
        assert f_fake.grad is not None and f_fake.grad.abs().sum() > 0
    if loss == "l_fa":
        assert f_real.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(not p.requires_grad for p in dist.parameters())


def test_real_branch_without_autograd_unless_asked():
    dist = toy_distiller()
    grad_modes = []
    dist.encoder.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    x_fake = torch.randn(2, 1024, requires_grad=True)
    f = torch.randn(2, 4, requires_grad=True)
    dist(torch.randn(2, 1024), x_fake, f, f)
    assert grad_modes == [False, True]  # real (no autograd), fake
    x_real = torch.randn(2, 1024, requires_grad=True)
    dist(x_real, x_fake, f, f)["l_fa"].backward()
    assert x_real.grad is not None and x_real.grad.abs().sum() > 0


def test_logged_mode_carries_no_gradient():
    active, logged = toy_distiller("active"), toy_distiller("logged")
    x = torch.randn(3, 1024, requires_grad=True)
    f = torch.randn(3, 4, requires_grad=True)
    a, b = active(x, x, f, f), logged(x, x, f, f)
    assert a["total"].requires_grad and not b["total"].requires_grad
    assert torch.allclose(a["total"], b["total"]) and logged.active is False


def test_encoder_stays_eval_and_bf16_runs(tiny_clip):
    model, _ = tiny_clip
    dist = CLIPDistiller(model, torch.randn(3, 512), W_FA, W_DIS, W_DIV, precision="bf16")
    dist.train()
    assert not dist.encoder.training
    out = dist(torch.rand(2, 1024), torch.rand(2, 1024), torch.randn(2, 512), torch.randn(2, 512))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_build_distiller(tiny_clip):
    model, weights = tiny_clip
    text = np.random.default_rng(0).normal(size=(5, 512)).astype(np.float32)
    off = dataclasses.replace(GanConfig(), distill="off")
    assert build_distiller(off, text, "cpu") is None
    for mode in ("active", "logged"):
        with pytest.raises(InputError, match=f"gan.clip_weights: gan.distill='{mode}' needs a local CLIP"):
            build_distiller(dataclasses.replace(GanConfig(), distill=mode), text, "cpu")
    cfg = dataclasses.replace(GanConfig(), distill="active", clip_arch=tiny_clip.arch,
                              clip_weights=weights, precision="fp32")
    dist = build_distiller(cfg, text, "cpu")
    assert isinstance(dist, CLIPDistiller) and dist.active and dist.precision == "fp32"
    assert dist.image_size == (32, 32) and (dist.w_fa, dist.w_ra_dis, dist.w_ra_div) == (W_FA, W_DIS, W_DIV)
    with pytest.raises(InputError, match=r"embeddings: text matrix of shape \(5, 300\)"):
        build_distiller(cfg, np.zeros((5, 300), np.float32), "cpu")
    with pytest.raises(InputError, match="gan.d_feat: 256"):
        build_distiller(dataclasses.replace(cfg, d_feat=256), text, "cpu")
    with pytest.raises(InputError, match="gan.distill: 'on'"):
        build_distiller(dataclasses.replace(cfg, distill="on"), text, "cpu")


def test_released_image_path_is_uint8_pil_bicubic():
    """The released map: min-max to [0, 255], truncated to uint8, PIL bicubic resize, RGB."""
    from PIL import Image

    x = torch.arange(1024, dtype=torch.float32).reshape(1, 1024) * 0.37
    img = features_to_clip_images_released(x, 32, (0, 0, 0), (1, 1, 1))  # no resize
    assert img.shape == (1, 3, 32, 32) and torch.equal(img[0, 0], img[0, 2])
    expected = torch.floor(x.reshape(32, 32) / x.max() * 255) / 255  # truncation, not rounding
    torch.testing.assert_close(img[0, 0], expected)
    big = features_to_clip_images_released(x, 64, (0, 0, 0), (1, 1, 1))
    ref = Image.fromarray((expected * 255).round().numpy().astype(np.uint8), mode="L").resize((64, 64), Image.BICUBIC)
    torch.testing.assert_close(big[0, 0], torch.from_numpy(np.asarray(ref) / 255.0).float())
    flat = features_to_clip_images_released(torch.full((1, 1024), 3.0), 32, (0, 0, 0), (1, 1, 1))
    assert flat.abs().max() == 0


def test_released_terms_one_row():
    dist = toy_distiller("logged")
    torch.manual_seed(2)
    out = dist.released_terms(torch.rand(1, 1024), torch.rand(1, 1024), torch.randn(1, 4), torch.randn(1, 4))
    assert out["l_ra_div"] == 0 and out["l_fa"] > 0 and out["l_ra_dis"] > 0
    assert not out["total"].requires_grad
