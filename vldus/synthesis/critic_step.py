"""One WGAN-GP update of the critic, with its backward pass written out (docs/design.md §6.3).

The critic loss on a real batch x, a fake batch x~ (same embeddings a) and the interpolates
x^ = alpha x + (1 - alpha) x~ is

    L_D = -(mean D(x, a) - mean D(x~, a)) + lambda * mean_i (||d D(x^_i, a) / d x^_i|| - 1)^2

D is a LeakyReLU MLP, so it is piecewise linear in x and its input gradient has a closed form,
g = W1x^T diag(m1) W2^T diag(m2) w3 (m = the LeakyReLU slopes at the point, constants almost
everywhere). That makes the whole update a handful of matrix products, computed here directly
instead of by autograd's double backward:

- the interpolates' first-layer pre-activation is the interpolation of those of x and x~
  (the layer is affine), so the widest layer is applied to 2B rows, not 3B;
- rows that meet the same weight are stacked into one product: real, fake and interpolate rows
  through the second layer, the Wasserstein and the penalty backward through it, and the two
  gradient contributions of each weight;
- under bfloat16 the weights are copied into persistent low-precision buffers once per update
  and the float32 gradients land in persistent buffers: no allocation per step.

:class:`CriticUpdate` is checked against autograd's double-backward penalty in the tests.
Other losses on the critic's 512-d feature (the CLIP distillation) enter through
``feat_grad``: their gradient w.r.t. the feature rows, given to the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vldus.synthesis.models import LEAKY_SLOPE, ComputeWeights, Critic


def _lrelu(pre: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.leaky_relu(pre, LEAKY_SLOPE)


def _times_slope(grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """grad * LeakyReLU'(pre), read off the activation act = LeakyReLU(pre) (same sign as pre)."""
    return torch.ops.aten.leaky_relu_backward(grad, act, LEAKY_SLOPE, True)


@dataclass
class CriticForward:
    """The forward pass over real, fake and interpolate rows (B each), in compute dtype."""

    xin: torch.Tensor    # (2B, X) [x; x~]
    att: torch.Tensor    # (B, A)
    h1: torch.Tensor     # (3B, H) first hidden layer: real, fake, interpolates
    h2: torch.Tensor     # (3B, F) feature layer (its LeakyReLU slopes are read off h1, h2)
    feat: torch.Tensor   # (2B, F) D's feature of the real and fake rows = h2[:2B]
    score: torch.Tensor  # (2B,) float32
    wasserstein: torch.Tensor  # mean score real - mean score fake


@dataclass
class CriticLoss:
    """Loss terms of one update (float32 scalars) and the penalty's input gradients."""

    wasserstein: torch.Tensor
    gp: torch.Tensor
    grad_x: torch.Tensor  # (B, X) d score / d x at the interpolates


class CriticUpdate:
    """Computes L_D and writes its gradients into the critic's ``.grad`` buffers.

    ``precision='bf16'`` runs the products in bfloat16 from low-precision copies of the
    weights (call :meth:`refresh` after every optimizer step); the gradients are float32.
    Use: ``f = update.forward(x, fake, att, alpha)``, then ``loss = update.backward(f)``.
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
        """x, fake (B, X) float32, att (B, A), alpha (B, 1): the interpolates are
        alpha x + (1 - alpha) fake."""
        w, c, B = self.weights, self.dtype, x.shape[0]
        xin = torch.cat([x, fake]).to(c)
        att = att.to(c)
        pre_x = xin @ w["fc1_x.weight"].T                              # (2B, H) input part
        pre_a = torch.addmm(w["fc1_x.bias"], att, w["fc1_att.weight"].T)  # (B, H) embedding + bias
        # layer 1 is affine: the interpolates' pre-activation interpolates those of x and x~
        pre_i = torch.lerp(pre_x[B:], pre_x[:B], alpha.to(c)) + pre_a
        h1 = _lrelu(torch.cat([(pre_x.view(2, B, -1) + pre_a).view(2 * B, -1), pre_i]))
        h2 = _lrelu(torch.addmm(w["fc2.bias"], h1, w["fc2.weight"].T))
        feat = h2[:2 * B]
        score = (feat.float() @ self.D.fc3.weight.T).squeeze(1) + self.D.fc3.bias
        return CriticForward(xin, att, h1, h2, feat, score, score[:B].mean() - score[B:].mean())

    @torch.no_grad()
    def backward(self, f: CriticForward, feat_grad: Optional[torch.Tensor] = None) -> CriticLoss:
        """The penalty, and d L_D / d theta written into the critic's ``.grad`` (float32).
        ``feat_grad`` (2B, F): gradient of extra losses w.r.t. ``f.feat``."""
        D, w, c = self.D, self.weights, self.dtype
        B = f.att.shape[0]
        W1x, W2 = w["fc1_x.weight"], w["fc2.weight"]
        h1_i, h2_i = f.h1[2 * B:], f.h2[2 * B:]

        # Wasserstein term: d(-mean real + mean fake)/d score = -1/B, +1/B; then the feature
        d_score = torch.full((2 * B,), 1.0 / B, device=f.feat.device)
        d_score[:B] = -1.0 / B
        d_feat = d_score[:, None] * D.fc3.weight.float()               # (2B, F)
        if feat_grad is not None:
            d_feat = d_feat + feat_grad.float()
        d_pre2 = _times_slope(d_feat.to(c), f.feat)                     # (2B, F)
        # penalty: the input gradient g = W1x^T (m1 . (W2^T (m2 . w3))) at the interpolates,
        # m1, m2 = the LeakyReLU slopes there
        u2 = _times_slope(w["fc3.weight"].expand(B, -1), h2_i)         # (B, F) d score / d pre2
        d_pre2_u2 = torch.cat([d_pre2, u2])                             # (3B, F)
        d_h1_all = _times_slope(d_pre2_u2 @ W2, f.h1)                   # (3B, H) both in one product
        d_pre1, u1 = d_h1_all[:2 * B], d_h1_all[2 * B:]                 # u1 = d score / d pre1
        grad_x = (u1 @ W1x).float()                                     # (B, X)
        norm = grad_x.norm(dim=1, keepdim=True)
        gp = self.lambda_gp * ((norm - 1.0) ** 2).mean()
        # back through g: r = dL/dg, q = dL/d(u2 W2), du2 = dL/du2
        r = ((2.0 * self.lambda_gp / B) * (norm - 1.0) / norm.clamp_min(1e-12) * grad_x).to(c)
        q = _times_slope(r @ W1x.T, h1_i)                               # (B, H)
        du2 = q @ W2.T                                                  # (B, F)

        # each weight: one product over [Wasserstein rows; penalty rows]
        self._weight_grad(D.fc1_x.weight, "fc1_x.weight", torch.cat([d_pre1, u1]), torch.cat([f.xin, r]))
        D.fc1_x.bias.grad.copy_(d_pre1.float().sum(0))
        self._weight_grad(D.fc1_att.weight, "fc1_att.weight", d_pre1[:B] + d_pre1[B:], f.att)
        self._weight_grad(D.fc2.weight, "fc2.weight", d_pre2_u2, torch.cat([f.h1[:2 * B], q]))
        D.fc2.bias.grad.copy_(d_pre2.float().sum(0))
        D.fc3.weight.grad.copy_((d_score @ f.feat.float() + _times_slope(du2, h2_i).float().sum(0)).view(1, -1))
        D.fc3.bias.grad.copy_(d_score.sum().reshape(1))
        return CriticLoss(f.wasserstein, gp, grad_x)

    def _weight_grad(self, param: torch.nn.Parameter, name: str, d_out: torch.Tensor,
                     inputs: torch.Tensor) -> None:
        """param.grad = d_out^T @ inputs (rows summed), through the preallocated buffer."""
        out = torch.mm(d_out.T, inputs, out=self.grad_out[name])
        if out is not param.grad:
            param.grad.copy_(out)
