"""Files that hold one linear layer: the two classifiers of stage 3, in our layout and in the
layouts the released code saves (docs/design.md §5, §7).

Layouts (``torch.save`` of a dict of tensors; ``weight`` (out, in), ``bias`` (out,)):

=================  ===========================================================================
``ours``           ``{"fc.weight", "fc.bias"}`` — both classifiers
``published``      synthesized classifier (released ``train_cls.py``: ``classifier_best.pth``,
                   ``classifier_latest.pth``, ``classifier_best_latest.pth``,
                   ``classifier_{g}_{c}.pth``): ``{"state_dict": {"fc1.weight", "fc1.bias"},
                   "epoch": int}`` (0-based classifier epoch);
                   compatibility classifier (released ``train_unseen_classifier.py``:
                   ``unseen_Classifier*.pth``): ``{"fc1.weight", "fc1.bias"}``
=================  ===========================================================================

:func:`read_linear` reads all of them (also a bare ``{"weight", "bias"}``), with
``weights_only=True`` and CUDA tensors mapped to the CPU; :func:`write_linear` writes either.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from vldus.errors import InputError
from vldus.files import save_torch

LAYOUTS = ("ours", "published")
KINDS = ("synthesized", "compat")
# layer-name prefixes accepted on reading: ours, the released modules' ``fc1``, a bare nn.Linear
LAYER_PREFIXES = ("fc.", "fc1.", "")


def read_linear(path: str, what: str) -> tuple[Tensor, Tensor]:
    """(weight (out, in), bias (out,)) float32 from a file in any layout above.

    ``what`` names the file in errors ("synthesized classifier"). A missing or unreadable file,
    no weight/bias pair, extra entries, non-tensors or NaN/inf raise InputError naming ``path``.
    """
    if not os.path.isfile(path):
        raise InputError(path, f"{what} file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects weights_only refuses
        raise InputError(path, f"cannot read {what} ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # released train_cls.py: {'state_dict': ..., 'epoch': k}
    if not isinstance(obj, dict):
        raise InputError(path, f"{what}: expected a state dict, got {type(obj).__name__}")
    keys = sorted(map(str, obj))
    for prefix in LAYER_PREFIXES:
        wkey, bkey = prefix + "weight", prefix + "bias"
        if wkey in obj and bkey in obj:
            break
    else:
        raise InputError(path, f"{what}: no 'fc.weight'/'fc.bias' (or 'fc1.*', or 'weight'/'bias') "
                               f"entries; keys are {keys[:8]}")
    if len(obj) != 2:
        raise InputError(path, f"{what}: expected only '{wkey}' and '{bkey}', keys are {keys[:8]}")
    weight, bias = obj[wkey], obj[bkey]
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor):
        raise InputError(path, f"{what}: '{wkey}' and '{bkey}' must be tensors")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise InputError(path, f"{what}: '{wkey}' or '{bkey}' contains NaN or infinite values")
    return weight.float(), bias.float()


def write_linear(weight: Tensor, bias: Tensor, path: str, layout: str = "ours",
                 kind: str = "synthesized", epoch: Optional[int] = None) -> None:
    """Write one linear layer atomically in ``layout`` ('ours' | 'published').

    ``kind`` selects the published layout: 'synthesized' wraps the layer as
    ``{"state_dict": {"fc1.*"}, "epoch": epoch}`` (``epoch`` 0-based, default 0), 'compat' is the
    bare ``{"fc1.*"}``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    prefix = "fc." if layout == "ours" else "fc1."
    state = {prefix + "weight": weight.detach().float().cpu().contiguous(),
             prefix + "bias": bias.detach().float().cpu().contiguous()}
    if layout == "published" and kind == "synthesized":
        state = {"state_dict": state, "epoch": int(epoch or 0)}
    save_torch(state, path)
