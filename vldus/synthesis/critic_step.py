"""One WGAN-GP update of the critic, with its backward pass written out (SPEC Part B §6.3).

The critic loss on a real batch x, a fake batch x~ (same embeddings a) and the interpolates
x^ = alpha x + (1 - alpha) x~ is

    L_D = -(mean D(x, a) - mean D(x~, a)) + lambda * mean_i (||d D(x^_i, a) / d x^_i|| - 1)^2

D is a LeakyReLU MLP, so it is piecewise linear in x and its input gradient has a closed form,
g = W1x^T diag(m1) W2^T diag(m2) w3 (m = the LeakyReLU slopes at the point, constants almost
everywhere). That makes the whole update a handful of matrix products, computed here directly
instead of by autograd's double backward:

- the interpolates' first-layer pre-activation is the interpolation of those of x and x~
  (the layer is affine), so the widest layer is applied to 2B rows, not 3B;
- the two gradient contributions of each weight (Wasserstein term and penalty) come out of ONE
  matrix product over the stacked rows;
- under bfloat16 the weights are copied into persistent low-precision buffers once per update
  and the float32 gradients land in persistent buffers: no allocation per step.

:func:`critic_step` is checked against autograd's double-backward penalty in the tests.
Other losses on the critic's 512-d feature (the CLIP distillation) enter through
``feat_grad``: their gradient w.r.t. the feature rows, added before the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vldus.synthesis.models import LEAKY_SLOPE, ComputeWeights, Critic


def _lrelu_and_slope(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(LeakyReLU(pre), its derivative: 1 where pre > 0, else the slope), in pre's dtype."""
    slope = torch.where(pre > 0, pre.new_ones(()), pre.new_full((), LEAKY_SLOPE))
    return pre * slope, slope


@dataclass
class CriticForward:
    """What the backward pass needs from the forward pass (B = real rows = fake rows)."""

    xin: torch.Tensor    # (2B, X) [x; x~] in compute dtype
    att: torch.Tensor    # (B, A)
    h1: torch.Tensor     # (2B, H) first hidden layer
    m1: torch.Tensor     # (2B, H) its LeakyReLU slopes
    m2: torch.Tensor     # (2B, F) slopes of the feature layer
    feat: torch.Tensor   # (2B, F) D's feature (rows :B real, B: fake)
    score: torch.Tensor  # (2B,) float32
    u1: torch.Tensor     # (B, H) d score / d pre1 at the interpolates
    u2: torch.Tensor     # (B, F) d score / d pre2 at the interpolates
    m1i: torch.Tensor    # (B, H) slopes at the interpolates
    m2i: torch.Tensor    # (B, F)
    grad_x: torch.Tensor  # (B, X) float32, d score / d x at the interpolates
    wasserstein: torch.Tensor
    gp: torch.Tensor


class CriticUpdate:
    """Computes L_D and writes its gradients into the critic's ``.grad`` buffers.

    ``precision='bf16'`` runs the products in bfloat16 from low-precision copies of the
    weights (call :meth:`refresh` after every optimizer step); the gradients are float32.
    """

    def __init__(self, critic: Critic, lambda_gp: float, precision: str = "fp32"):
        self.D = critic
        self.lambda_gp = lambda_gp
        self.weights = ComputeWeights(critic, precision)
        self.dtype = self.weights.dtype
        for p in critic.parameters():
            p.grad = torch.zeros_like(p)
        # the weight-gradient products write into these (bfloat16), then into the float32 .grad
        self.grad_out = {name: (p.grad if self.dtype == torch.float32 else
                                torch.empty_like(p, dtype=self.dtype))
                         for name, p in critic.named_parameters()}

    def refresh(self) -> None:
        """Copy the float32 weights into the compute-precision buffers (after each step)."""
        self.weights.refresh()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, fake: torch.Tensor, att: torch.Tensor,
                alpha: torch.Tensor) -> CriticForward:
        """Scores of [x; fake] and the penalty at alpha x + (1 - alpha) fake; x, fake (B, X),
        att (B, A), alpha (B, 1)."""
        D, c, B = self.D, self.dtype, x.shape[0]
        w = self.weights
        W1x, b1, W1a = w["fc1_x.weight"], w["fc1_x.bias"], w["fc1_att.weight"]
        W2, b2, w3 = w["fc2.weight"], w["fc2.bias"], w["fc3.weight"]
        xin = torch.cat([x, fake]).to(c)
        att = att.to(c)
        pre_x = xin @ W1x.T                                    # (2B, H) input part of layer 1
        pre_a = torch.addmm(b1, att, W1a.T)                    # (B, H) embedding part + bias
        h1, m1 = _lrelu_and_slope((pre_x.view(2, B, -1) + pre_a).view(2 * B, -1))
        feat, m2 = _lrelu_and_slope(torch.addmm(b2, h1, W2.T))
        score = (feat.float() @ D.fc3.weight.T).squeeze(1) + D.fc3.bias
        wasserstein = score[:B].mean() - score[B:].mean()

        # interpolates: layer 1 is affine, so its pre-activation interpolates too
        pre_i = torch.lerp(pre_x[B:], pre_x[:B], alpha.to(c)) + pre_a
        h1i, m1i = _lrelu_and_slope(pre_i)
        _, m2i = _lrelu_and_slope(torch.addmm(b2, h1i, W2.T))
        u2 = m2i * w3                                          # (B, F)
        u1 = m1i * (u2 @ W2)                                   # (B, H)
        grad_x = (u1 @ W1x).float()                            # (B, X)
        gp = self.lambda_gp * ((grad_x.norm(dim=1) - 1.0) ** 2).mean()
        return CriticForward(xin, att, h1, m1, m2, feat, score, u1, u2, m1i, m2i, grad_x,
                             wasserstein, gp)

    @torch.no_grad()
    def backward(self, f: CriticForward, feat_grad: Optional[torch.Tensor] = None) -> None:
        """Write d L_D / d theta into the critic's ``.grad`` (float32). ``feat_grad`` (2B, F):
        gradient of extra losses w.r.t. ``f.feat``, added to the Wasserstein term's."""
        D, c = self.D, self.dtype
        B = f.att.shape[0]
        W1x, W2 = self.weights["fc1_x.weight"], self.weights["fc2.weight"]

        # penalty: dL/dg, then back through g = W1x^T (m1 . (W2^T (m2 . w3)))
        norm = f.grad_x.norm(dim=1, keepdim=True)
        r = (2.0 * self.lambda_gp / B) * (norm - 1.0) / norm.clamp_min(1e-12) * f.grad_x
        r = r.to(c)                                            # (B, X)
        q = f.m1i * (r @ W1x.T)                                # (B, H) dL/d(u2 W2)
        du2 = q @ W2.T                                         # (B, F)

        # Wasserstein term: d(-mean real + mean fake)/d score = -1/B, +1/B
        d_score = torch.cat([torch.full((B,), -1.0 / B), torch.full((B,), 1.0 / B)]).to(f.feat.device)
        d_feat = d_score[:, None] * D.fc3.weight.float()       # (2B, F)
        if feat_grad is not None:
            d_feat = d_feat + feat_grad.float()
        d_pre2 = (d_feat * f.m2).to(c)                         # (2B, F)
        d_pre1 = (d_pre2 @ W2) * f.m1                          # (2B, H)

        # each weight: one product over [Wasserstein rows; penalty rows]
        self._weight_grad(D.fc1_x.weight, "fc1_x.weight", torch.cat([d_pre1, f.u1]), torch.cat([f.xin, r]))
        D.fc1_x.bias.grad.copy_(d_pre1.float().sum(0))
        self._weight_grad(D.fc1_att.weight, "fc1_att.weight", d_pre1[:B] + d_pre1[B:], f.att)
        self._weight_grad(D.fc2.weight, "fc2.weight", torch.cat([d_pre2, f.u2]), torch.cat([f.h1, q]))
        D.fc2.bias.grad.copy_(d_pre2.float().sum(0))
        D.fc3.weight.grad.copy_((d_score @ f.feat.float() + (f.m2i * du2).float().sum(0)).view(1, -1))
        D.fc3.bias.grad.copy_(d_score.sum().reshape(1))

    def _weight_grad(self, param: torch.nn.Parameter, name: str, d_out: torch.Tensor,
                     inputs: torch.Tensor) -> None:
        """param.grad = d_out^T @ inputs (rows summed), through the preallocated buffer."""
        out = torch.mm(d_out.T, inputs, out=self.grad_out[name])
        if out is not param.grad:
            param.grad.copy_(out)
