"""Networks of the synthesizer (docs/design.md §5, §6.1, §7).

- :class:`Generator` G(z, a): [z; a] -> Linear -> LeakyReLU(0.2) -> Linear -> ReLU (features are
  post-ReLU RoI features, hence the final ReLU).
- :class:`Critic` D(x, a): [x; a] -> Linear -> LeakyReLU(0.2) -> Linear(-> d_feat) -> LeakyReLU(0.2)
  (= D's feature, aligned with CLIP) -> Linear(-> 1) (the score). Returns (feature, score).
- :class:`CompatClassifier`: a projection ``fc`` (1024 -> d) scored against FIXED class
  embeddings; the state dict holds only ``fc.weight``/``fc.bias`` (published layout).
- :class:`UnseenClassifier`: Linear(1024 -> 1 + |unseen|) named ``fc``; rows = [background,
  unseen classes in ascending detector index].

The first layer of G and D acts on a concatenation [input; a]. It is stored as two Linear layers
whose outputs are added (``fc1_z``/``fc1_x`` for the input part with the bias, ``fc1_att`` for
the class-embedding part): the same function, but the embedding part can be computed once for
rows that share an embedding (the five critic steps of an iteration, the unseen batch), and
each weight stays a separate leaf tensor (cheap mixed-precision casts, no slicing in autograd).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Published architecture constants (docs/design.md §6.1): LeakyReLU slope and the N(0, 0.02) init.
LEAKY_SLOPE = 0.2
INIT_STD = 0.02


def init_weights(module: nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """Every Linear: weight ~ N(0, 0.02), bias = 0 (docs/design.md §6.1)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.normal_(0.0, INIT_STD, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()


def _gather_rows(att_term: torch.Tensor, att_index: Optional[torch.Tensor]) -> torch.Tensor:
    return att_term if att_index is None else att_term.index_select(0, att_index)


class Generator(nn.Module):
    """G(z (N, nz), a (M, att_dim)) -> features (N, out_dim) >= 0.

    ``att_index`` (N,) picks the embedding row of each noise row (default: row i for noise i,
    M = N), so a few distinct embeddings can condition many noise rows.
    """

    def __init__(self, nz: int, att_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.nz, self.att_dim, self.out_dim = nz, att_dim, out_dim
        self.fc1_z = nn.Linear(nz, hidden)
        self.fc1_att = nn.Linear(att_dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, z: torch.Tensor, att: torch.Tensor,
                att_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.fc1_z(z) + _gather_rows(self.fc1_att(att), att_index)
        return F.relu(self.fc2(F.leaky_relu(h, LEAKY_SLOPE)))


@torch.no_grad()
def synthesize(generator: Generator, att: torch.Tensor, num: int, noise: torch.Generator,
               chunk: int = 8192) -> torch.Tensor:
    """``num`` features per row of ``att`` (K, att_dim): float32 (K * num, out_dim), class-major
    (rows ``k*num .. (k+1)*num - 1`` belong to ``att[k]``). Noise z ~ N(0, 1) comes from ``noise``,
    a CPU generator, ``chunk`` rows at a time, and is moved to G's device (the one way vldus
    samples G: classifier training, GZSD calibration and the bundle's new names draw the same rows
    from the same seed, on any device up to matmul round-off). Leaves G's train/eval mode as it was."""
    if noise.device.type != "cpu":
        raise ValueError(f"synthesize: the noise generator must be a CPU generator, not {noise.device}")
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    index = torch.arange(len(att), device=device).repeat_interleave(num)
    att = att.to(device=device, dtype=torch.float32)
    out = []
    for start in range(0, len(index), chunk):
        idx = index[start:start + chunk]
        z = torch.randn(len(idx), generator.nz, generator=noise)
        if device.type == "cuda":
            z = z.pin_memory()  # an asynchronous upload (the caching host allocator keeps it alive)
        z = z.to(device, non_blocking=True)
        out.append(generator(z, att, idx).float())
    generator.train(was_training)
    return torch.cat(out) if out else att.new_zeros(0, generator.out_dim)


def load_generator(state: dict | str, nz: int, att_dim: int, hidden: int, out_dim: int,
                   where: str = "generator") -> Generator:
    """A :class:`Generator` (eval mode, CPU) from a state dict or a ``generator.pth`` path;
    InputError naming ``where`` (or the path) when the file is unreadable or the sizes differ
    from the config's (gan.nz, gan.ngh, features.dim, the embedding width)."""
    from vldus.errors import InputError, require_file

    if isinstance(state, str):
        where = state
        require_file(state, "generator (train-generator output)")
    generator = Generator(nz, att_dim, hidden, out_dim)
    try:
        if isinstance(state, str):
            state = torch.load(state, map_location="cpu", weights_only=True)
        generator.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - wrong file or other sizes
        raise InputError(where, f"does not fit the config's generator ({str(e).splitlines()[0]})") from None
    return generator.eval()


class Critic(nn.Module):
    """D(x (N, x_dim), a (M, att_dim)) -> (feature (N, feat_dim), score (N,)).

    The critic update itself (forward, penalty and backward written out) is
    :class:`vldus.synthesis.critic_step.CriticUpdate`.
    """

    def __init__(self, x_dim: int, att_dim: int, hidden: int, feat_dim: int):
        super().__init__()
        self.x_dim, self.att_dim, self.feat_dim = x_dim, att_dim, feat_dim
        self.fc1_x = nn.Linear(x_dim, hidden)
        self.fc1_att = nn.Linear(att_dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, feat_dim)
        self.fc3 = nn.Linear(feat_dim, 1)

    def head(self, pre1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First-layer pre-activation (N, hidden) -> (feature (N, feat_dim), score (N,))."""
        feat = F.leaky_relu(self.fc2(F.leaky_relu(pre1, LEAKY_SLOPE)), LEAKY_SLOPE)
        return feat, self.fc3(feat).squeeze(1)

    def forward(self, x: torch.Tensor, att: torch.Tensor,
                att_index: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.fc1_x(x) + _gather_rows(self.fc1_att(att), att_index))


class CompatClassifier(nn.Module):
    """Compatibility classifier (docs/design.md §5): logits = fc(x) · E^T with E fixed.

    ``embeddings`` (K, d): the class rows it scores against ([background] + seen rows while it
    is trained, the unseen rows when it is used as the frozen loss C_u). They are a
    non-persistent buffer: the state dict holds ``fc.weight`` (d, in_dim) and ``fc.bias`` (d,).
    """

    def __init__(self, in_dim: int, embeddings: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(in_dim, embeddings.shape[1])
        self.register_buffer("embeddings", torch.as_tensor(embeddings, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K)."""
        return self.fc(x) @ self.embeddings.T


class UnseenClassifier(nn.Module):
    """The synthesized classifier (docs/design.md §7): ``fc`` = Linear(in_dim -> 1 + |unseen|)."""

    def __init__(self, in_dim: int, num_unseen: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.fc = nn.Linear(in_dim, 1 + num_unseen)
        # nn.Linear's default init, U(-1/sqrt(in), 1/sqrt(in)), drawn from ``generator``
        bound = in_dim ** -0.5
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound, generator=generator)
            self.fc.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# Frozen classifiers loaded from files
# --------------------------------------------------------------------------------------------
SEEN_WEIGHT_KEY = "roi_heads.box_predictor.cls_score.weight"
SEEN_BIAS_KEY = "roi_heads.box_predictor.cls_score.bias"


def seen_classifier_from_detector(checkpoint_path: str, num_classes: int, dim: int) -> nn.Linear:
    """C_s: the detector's classification layer Linear(dim -> C+1), from a checkpoint
    ``{"model": state_dict, ...}`` (``vldus train-detector``) or a bare state dict."""
    from vldus.errors import InputError, require_file

    require_file(checkpoint_path, "detector checkpoint")
    try:
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpicklable / corrupt / not a torch file
        raise InputError(checkpoint_path, f"cannot read detector checkpoint ({str(e).splitlines()[0]})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or SEEN_WEIGHT_KEY not in state or SEEN_BIAS_KEY not in state:
        raise InputError(checkpoint_path, f"no '{SEEN_WEIGHT_KEY}'/'.bias' in the checkpoint's model")
    weight, bias = state[SEEN_WEIGHT_KEY], state[SEEN_BIAS_KEY]
    if tuple(weight.shape) != (num_classes + 1, dim) or tuple(bias.shape) != (num_classes + 1,):
        raise InputError(checkpoint_path, f"cls_score has shape {tuple(weight.shape)}, expected "
                                          f"({num_classes + 1}, {dim}) = (classes + background, features.dim)")
    layer = nn.Linear(dim, num_classes + 1)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        layer.bias.copy_(bias.float())
    return layer


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------
class ComputeWeights:
    """The weights a module multiplies with: its float32 parameters, or (``precision='bf16'``)
    persistent bfloat16 copies of them.

    The float32 parameters stay the optimizer's master weights: call :meth:`refresh` after each
    optimizer step. ``weights(*inputs)`` runs the module with the copies (floating inputs cast
    to their dtype). With ``trainable=True`` the copies collect gradients and
    :meth:`grads_to_master` stores them, as float32, in the parameters' ``.grad``.
    """

    def __init__(self, module: nn.Module, precision: str = "fp32", trainable: bool = False):
        self.module = module
        self.params = dict(module.named_parameters())
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.copies = None
        if self.dtype != torch.float32:
            self.copies = {n: p.detach().to(self.dtype).requires_grad_(trainable)
                           for n, p in self.params.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        """The compute tensor of parameter ``name`` (e.g. 'fc2.weight')."""
        return self.params[name] if self.copies is None else self.copies[name]

    def __call__(self, *inputs):
        if self.copies is None:
            return self.module(*inputs)
        inputs = [t.to(self.dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
        return torch.func.functional_call(self.module, self.copies, tuple(inputs))

    @torch.no_grad()
    def refresh(self) -> None:
        if self.copies is not None:
            for name, p in self.params.items():
                self.copies[name].copy_(p)

    def zero_grad(self) -> None:
        for t in (self.params if self.copies is None else self.copies).values():
            t.grad = None

    @torch.no_grad()
    def grads_to_master(self) -> None:
        if self.copies is None:
            return
        for name, p in self.params.items():
            g = self.copies[name].grad
            if p.grad is None:
                p.grad = g.float()
            else:
                p.grad.copy_(g)
