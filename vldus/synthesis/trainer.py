"""The conditional WGAN-GP of the synthesizer: one training iteration and its losses
(docs/design.md §6.3, §6.4).

One iteration on a real batch (x, y), a = E[y]:

- **critic**, ``critic_iter`` steps on the same real batch, a fresh z each:
  L_D = -(mean D(x,a) - mean D(G(z,a),a)) + lambda * mean (||grad_x D(x^,a)|| - 1)^2
  [+ distillation total, ``distill='active'``: gradients into D; the fakes are detached].
  ``distill='logged'`` (the released trainer): in every critic step, one randomly drawn row of
  the batch, a fresh fake for it, the terms through the released image path, logged only (the
  last step's values are recorded, as the release prints them); training is exactly that of
  ``distill='off'`` (the row and noise come from a separate generator).
- **generator**, one step with D frozen:
  L_G = -mean D(G(z,a),a) + cls_weight * NLL(C_s(G(z,a)), y) + lz_ratio * L_ms
  + cls_weight_unseen * NLL(C_u(G(z_u, a_u)), y_u) [+ distillation total, ``active`` with
  ``distill_into='d_and_g'``; ``'d_only'`` is the released design: no distillation in L_G].
  ``legacy_unseen_loss`` computes the C_u term on detached features (the released code: no
  gradient reaches G).

Speed (the same arithmetic as the published trainer, less of it):

- G is not updated during the critic steps, so the fakes of all critic steps come from one
  G forward (their noise is drawn fresh for each step, as published).
- The critic update is written out by hand (:mod:`vldus.synthesis.critic_step`): the
  interpolates reuse the first layer's products of x and G(z), the penalty's input gradient has
  a closed form, and each weight's two gradient terms come from one matrix product.
- The embedding part of a first layer is computed once per distinct embedding row.
- ``gan.precision`` bf16: the products run in bfloat16 from persistent copies of the weights
  (:class:`ComputeWeights`, refreshed after each optimizer step); the float32 weights, the
  gradients given to Adam and the loss values stay float32.
- No host synchronisation per iteration: losses go into a preallocated tensor that is checked
  for NaN/inf every ``CHECK_EVERY`` iterations.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vldus.errors import InputError
from vldus.precision import resolve_precision  # noqa: F401  (re-exported for the benchmarks)
from vldus.synthesis.critic_step import CriticUpdate
from vldus.synthesis.models import CompatClassifier, ComputeWeights, Critic, Generator, synthesize

# The loss values recorded for every iteration (columns of the history tensor).
LOSS_NAMES = ("loss_d", "wasserstein", "gp", "distill_d", "loss_g", "adversarial", "cls_seen",
              "mode_seeking", "cls_unseen", "distill_g", "l_fa", "l_ra_dis", "l_ra_div")
CHECK_EVERY = 50  # iterations between NaN/inf checks (the only host syncs of an epoch)
MS_EPS = 1e-5  # published mode-seeking denominator guard
DISTILL_INTO = ("d_and_g", "d_only")


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or inf; names the epoch (1-based), the iteration and the loss."""

    def __init__(self, epoch: int, iteration: int, name: str):
        self.epoch, self.iteration, self.name = epoch, iteration, name
        super().__init__(f"non-finite {name} at epoch {epoch}, iteration {iteration}")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def mode_seeking_loss(fake1: torch.Tensor, fake2: torch.Tensor, z1: torch.Tensor,
                      z2: torch.Tensor) -> torch.Tensor:
    """MSGAN term 1 / (mean|G(z2,a) - G(z1,a)| / mean|z2 - z1| + 1e-5)."""
    ratio = (fake2 - fake1).abs().mean() / (z2 - z1).abs().mean()
    return 1.0 / (ratio + MS_EPS)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class GANTrainer:
    """Trains G and D one epoch at a time.

    Args:
        generator, critic: the networks (initialised by the caller).
        embeddings: E (C+1, att_dim), row 0 = background (spectral-normalised).
        seen_classifier: C_s, the detector's frozen classification layer (1024 -> C+1).
        unseen_classifier: C_u, the frozen compatibility classifier with the UNSEEN rows.
        unseen_ids: detector indices of the unseen classes, ascending (rows of C_u).
        gan_cfg: the ``gan`` config section (weights, lr, batch size, critic_iter ...).
        device, precision: where and how ('fp32' | 'bf16') to compute.
        distiller: a CLIPDistiller (``mode`` 'active' or 'logged'), or None.
        seed: seeds the noise generator (z, alpha).
    """

    def __init__(self, generator: Generator, critic: Critic, embeddings: torch.Tensor,
                 seen_classifier: nn.Module, unseen_classifier: CompatClassifier,
                 unseen_ids: list[int], gan_cfg, device: torch.device | str = "cpu",
                 precision: str = "fp32", distiller: Optional[nn.Module] = None, seed: int = 0):
        self.device = torch.device(device)
        self.cfg = gan_cfg
        self.G = generator.to(self.device)
        self.D = critic.to(self.device)
        self.E = torch.as_tensor(embeddings, dtype=torch.float32).to(self.device)
        self.seen_cls = _frozen(seen_classifier.to(self.device))
        self.unseen_cls = _frozen(unseen_classifier.to(self.device))
        self.unseen_att = self.E[torch.as_tensor(unseen_ids, device=self.device)]
        self.distiller = distiller
        if gan_cfg.distill_into not in DISTILL_INTO:
            raise InputError("gan.distill_into", f"{gan_cfg.distill_into!r}: expected one of {DISTILL_INTO}")
        self.precision = precision
        fused = self.device.type in ("cpu", "cuda")
        betas = (gan_cfg.beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=gan_cfg.lr, betas=betas, fused=fused)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=gan_cfg.lr, betas=betas, fused=fused)
        self.critic_update = CriticUpdate(self.D, gan_cfg.lambda_gp, precision)
        self.g_weights = ComputeWeights(self.G, precision, trainable=True)
        self.d_weights = self.critic_update.weights  # D frozen in the G step: its copies serve
        self.noise = torch.Generator(self.device).manual_seed(seed)
        # logged distillation draws its row and noise here, so that it changes no training stream
        self.logged_noise = torch.Generator(self.device).manual_seed(seed + 1)
        zero = torch.zeros((), device=self.device)
        self.critic_parts = {"total": zero, "l_fa": zero, "l_ra_dis": zero, "l_ra_div": zero}
        num_unseen, per_class = len(unseen_ids), gan_cfg.batch_size // 4
        self.unseen_labels = torch.arange(num_unseen, device=self.device).repeat_interleave(per_class)

    # --- helpers ------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, generator=self.noise)

    @property
    def distill_active(self) -> bool:
        return self.distiller is not None and self.distiller.mode == "active"

    @property
    def distill_logged(self) -> bool:
        return self.distiller is not None and self.distiller.mode == "logged"

    @property
    def distill_into_g(self) -> bool:
        """Active distillation also in the generator step (ours; the release: critic only)."""
        return self.distill_active and self.cfg.distill_into == "d_and_g"

    # --- one epoch ----------------------------------------------------------------------
    def train_epoch(self, feats: torch.Tensor, labels: torch.Tensor, batches: torch.Tensor,
                    epoch: int = 1, progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Run ``len(batches)`` iterations; batch i = rows ``batches[i]`` of feats/labels.

        feats (P, dim) float32, labels (P,) int64 and batches (iterations, B) live on the
        trainer's device. Returns the loss history (iterations, len(LOSS_NAMES)) on the CPU.
        Raises NonFiniteLoss (epoch and iteration named) when a loss turns NaN/inf.
        """
        self.G.train()
        self.D.train()
        history = torch.zeros(len(batches), len(LOSS_NAMES), device=self.device)
        checked = 0
        for i in range(len(batches)):
            rows = batches[i]
            x, y = feats.index_select(0, rows), labels.index_select(0, rows)
            img_real = self.encode_real(x)
            d_stats = self.critic_steps(x, y, img_real)
            g_stats = self.generator_step(x, y, img_real)
            history[i] = torch.stack(d_stats + g_stats)
            if (i + 1) % CHECK_EVERY == 0 or i + 1 == len(batches):
                self._check_finite(history[checked:i + 1], epoch, checked)
                if progress is not None:
                    progress(i + 1 - checked)
                checked = i + 1
        return history.cpu()

    def _check_finite(self, rows: torch.Tensor, epoch: int, first_iteration: int) -> None:
        bad = ~torch.isfinite(rows)
        if bool(bad.any()):
            it, col = (int(v) for v in torch.nonzero(bad)[0])
            raise NonFiniteLoss(epoch, first_iteration + it + 1, LOSS_NAMES[col])

    @torch.no_grad()
    def encode_real(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """I(x) of the rows of the real batch that go through CLIP (None without a distiller):
        the encoder is frozen and x is the same for the critic steps and the G step, so the
        iteration encodes it once."""
        if not self.distill_active:
            return None
        return self.distiller.encode(x[:min(self.cfg.distill_rows, x.shape[0])])

    # --- critic -------------------------------------------------------------------------
    def critic_steps(self, x: torch.Tensor, y: torch.Tensor,
                     img_real: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """``critic_iter`` WGAN-GP steps of D on the real batch (x, y); returns the last
        step's [loss_d, wasserstein, gp, distill_d] (detached scalars). ``img_real``:
        :meth:`encode_real` of x (computed here when None)."""
        cfg, B = self.cfg, x.shape[0]
        steps = cfg.critic_iter
        a = self.E.index_select(0, y)
        with torch.no_grad():
            z = self.randn(steps * B, cfg.nz)
            same_att = torch.arange(B, device=self.device).repeat(steps)
            fakes = self.g_weights(z, a, same_att).float().view(steps, B, -1)
        alphas = torch.rand(steps, B, 1, device=self.device, generator=self.noise)
        img_fakes = None
        if self.distill_active:
            if img_real is None:
                img_real = self.encode_real(x)
            # the fakes are data for the critic: all steps' rows through CLIP in one batch
            r = min(cfg.distill_rows, B)
            with torch.no_grad():
                img_fakes = self.distiller.encode(fakes[:, :r].reshape(steps * r, -1)).view(steps, r, -1)
        for step in range(steps):
            fwd = self.critic_update.forward(x, fakes[step], a, alphas[step])
            distill, feat_grad = torch.zeros((), device=self.device), None
            if self.distill_active:
                distill, feat_grad = self._distill_feature_grad(x, fakes[step], fwd.feat, img_real,
                                                                img_fakes[step])
            loss = self.critic_update.backward(fwd, feat_grad)
            if self.distill_logged:  # D's weights of this step, before its optimizer step
                self.critic_parts = self._released_distill_terms(x, a, fwd.feat)
            self.opt_d.step()
            self.critic_update.refresh()
        loss_d = loss.gp - loss.wasserstein + distill
        if self.distill_logged:
            distill = self.critic_parts["total"]
        return [loss_d, loss.wasserstein, loss.gp, distill.detach()]

    @torch.no_grad()
    def _released_distill_terms(self, x: torch.Tensor, a: torch.Tensor,
                                feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The released critic-loop block (docs/design.md §6.4): one row r drawn at random from the batch,
        a fresh fake G(z, a_r), D's features of x_r and of that fake at the current weights,
        and the terms through the released image path. Logged only.
        (The release draws r from 0..63 whatever the batch size, an IndexError for batch 32.)"""
        r = torch.randint(0, x.shape[0], (1,), device=self.device, generator=self.logged_noise)
        z = torch.randn(1, self.cfg.nz, device=self.device, generator=self.logged_noise)
        a_r = a.index_select(0, r)
        fake = self.g_weights(z, a_r).float()
        feat_fake = self.d_weights(fake, a_r)[0].float()
        return self.distiller.released_terms(x.index_select(0, r), fake, feat.index_select(0, r).float(),
                                             feat_fake)

    def _distill_feature_grad(self, x: torch.Tensor, fake: torch.Tensor, feat: torch.Tensor,
                              img_real: torch.Tensor, img_fake: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distillation total on the first ``distill_rows`` real and fake rows, and its
        gradient w.r.t. the critic's features (2B, F) (fakes are data for the critic).
        The terms are kept in ``critic_parts`` (logged when the G step has none)."""
        B, r = x.shape[0], min(self.cfg.distill_rows, x.shape[0])
        feat_real = feat[:r].float().requires_grad_(True)
        feat_fake = feat[B:B + r].float().requires_grad_(True)
        with torch.enable_grad():
            parts = self.distiller(x[:r], fake[:r], feat_real, feat_fake, img_real, img_fake)
            g_real, g_fake = torch.autograd.grad(parts["total"], [feat_real, feat_fake])
        self.critic_parts = {k: v.detach() for k, v in parts.items()}
        feat_grad = torch.zeros(feat.shape, device=self.device)
        feat_grad[:r], feat_grad[B:B + r] = g_real, g_fake
        return parts["total"].detach(), feat_grad

    # --- generator ----------------------------------------------------------------------
    def generator_step(self, x: torch.Tensor, y: torch.Tensor,
                       img_real: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """One G step; returns [loss_g, adversarial, cls_seen, mode_seeking, cls_unseen,
        distill_g, l_fa, l_ra_dis, l_ra_div] (detached scalars). ``img_real``: as in
        :meth:`critic_steps`."""
        cfg, B = self.cfg, x.shape[0]
        a = self.E.index_select(0, y)
        legacy = cfg.legacy_unseen_loss
        self.D.requires_grad_(False)
        # one G forward for fake1 = G(z1, a), fake2 = G(z2, a) and (unless legacy) the unseen batch
        n_unseen = 0 if legacy else len(self.unseen_labels)
        z = self.randn(2 * B + n_unseen, cfg.nz)
        att = torch.cat([a, self.unseen_att])
        index = torch.cat([torch.arange(B, device=self.device).repeat(2), B + self.unseen_labels[:n_unseen]])
        self.g_weights.zero_grad()
        with self.autocast():
            out = self.g_weights(z, att, index).float()
            fake1, fake2 = out[:B], out[B:2 * B]
            feat_fake, score = self.d_weights(fake1, a)
            adversarial = -score.float().mean()
            cls_seen = F.cross_entropy(self.seen_cls(fake1).float(), y)
            mode_seeking = mode_seeking_loss(fake1, fake2, z[:B], z[B:2 * B])
            if legacy:  # released: unseen features generated without autograd history
                with torch.no_grad():
                    z_u = self.randn(len(self.unseen_labels), cfg.nz)
                    fake_u = self.g_weights(z_u, self.unseen_att, self.unseen_labels).float()
            else:
                fake_u = out[2 * B:]
            cls_unseen = F.cross_entropy(self.unseen_cls(fake_u).float(), self.unseen_labels)
        loss_g = (adversarial + cfg.cls_weight * cls_seen + cfg.lz_ratio * mode_seeking
                  + cfg.cls_weight_unseen * cls_unseen)
        # without a distillation term in L_G, the terms recorded are the critic's (last step)
        parts, distill_g = self.critic_parts, torch.zeros((), device=self.device)
        if self.distill_into_g:
            r = min(cfg.distill_rows, B)
            with torch.no_grad():
                feat_real = self.d_weights(x[:r], a[:r])[0].float()
            if img_real is None:
                img_real = self.encode_real(x)
            parts = self.distiller(x[:r], fake1[:r], feat_real, feat_fake[:r], img_real)
            distill_g = parts["total"]
            loss_g = loss_g + distill_g
        loss_g.backward()
        self.g_weights.grads_to_master()
        self.opt_g.step()
        self.g_weights.refresh()
        self.D.requires_grad_(True)
        return [t.detach().float() for t in (loss_g, adversarial, cls_seen, mode_seeking, cls_unseen,
                                             distill_g, parts["l_fa"], parts["l_ra_dis"],
                                             parts["l_ra_div"])]

    # --- synthesis ----------------------------------------------------------------------
    def synthesize(self, att: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """:func:`vldus.synthesis.models.synthesize` with the current G (noise from ``generator``,
        so synthesis does not disturb the training streams)."""
        return synthesize(self.G, att, num, generator)

    # --- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": self.G.state_dict(), "critic": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "noise_rng": self.noise.get_state(), "noise_device": self.device.type}

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Continue from :meth:`state_dict`; InputError naming ``source`` when it was written on
        another kind of device (a CPU and a CUDA noise generator have different states)."""
        saved = state.get("noise_device") or _generator_device(state["noise_rng"])
        if saved != self.device.type:
            raise InputError(source, f"written by a run on {saved}, this run is on {self.device.type}: "
                                     f"the noise generator cannot continue on another device; resume "
                                     f"with --device {saved} or start without --resume")
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["critic"])
        self.critic_update.refresh()
        self.g_weights.refresh()
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.noise.set_state(state["noise_rng"])


def _generator_device(state: torch.Tensor) -> str:
    """The device type of a generator state without a recorded device (older checkpoints):
    the CPU's Mersenne Twister state is 5056 bytes, CUDA's Philox seed and offset 16."""
    return "cpu" if state.numel() == torch.Generator("cpu").get_state().numel() else "cuda"


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module

