"""open_clip models built from LOCAL weight files. Nothing is ever downloaded.

``arch`` names the architecture: an open_clip model name (``ViT-B-32``, ``ViT-B-32-quickgelu``,
… see ``open_clip.list_models()``), or the path of a JSON model config — either open_clip's
bare model config ``{"embed_dim", "vision_cfg", "text_cfg", ...}`` or an
``open_clip_config.json`` ``{"model_cfg": {...}, "preprocess_cfg": {...}}``.

``weights_path`` is a file with the weights of the whole model, in any of these formats:
a plain state dict or an open_clip training checkpoint ``{"state_dict": ...}`` saved with
``torch.save`` (``.pt``/``.pth``/``.bin``; keys may carry DataParallel's ``module.`` prefix),
a ``.safetensors`` file (``open_clip_model.safetensors`` of the hub repos), or OpenAI's
TorchScript archive (``ViT-B-32.pt`` of the ``clip`` package). Pickles are read with
``weights_only=True``.

QuickGELU: OpenAI's CLIP models were trained with QuickGELU (x * sigmoid(1.702 x)) where
open_clip's plain names (``ViT-B-32``) use GELU; the weights load either way, silently giving
other embeddings. ``quickgelu`` (:data:`QUICKGELU_MODES`) decides: ``auto`` (default) builds
the QuickGELU variant of the named architecture for an OpenAI TorchScript archive (recognised by
the ``input_resolution``/``context_length``/``vocab_size`` entries only OpenAI's archives carry)
and says so on stdout, and the architecture as named for any other file; ``on`` forces QuickGELU
(for OpenAI weights converted to another format, e.g. the hub's ``openai`` safetensors);
``off`` keeps GELU and refuses an OpenAI archive or a QuickGELU architecture, naming both.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from vldus.errors import InputError, require_file

DEFAULT_ARCH = "ViT-B-32"
# OpenAI CLIP's image normalisation (= open_clip.OPENAI_DATASET_MEAN/STD; kept here so that
# generic encoders do not need the open_clip import).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
QUICKGELU_MODES = ("auto", "on", "off")
# Entries of OpenAI's TorchScript state dicts that are not parameters (their build_model drops them).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_REGISTERED: dict[str, str] = {}  # config-file content hash -> registered open_clip model name
_CONFIG_DIR: Optional[tempfile.TemporaryDirectory] = None


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------
def resolve_arch(arch: str) -> tuple[str, dict]:
    """(open_clip model name, preprocess overrides) for a built-in name or a config-JSON path.

    A config file is registered with open_clip under a name derived from its content, so a file
    called e.g. ``ViT-B-32.json`` can never shadow the built-in config of that name.
    """
    import open_clip

    if os.path.isfile(arch):
        try:
            with open(arch) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(arch, f"cannot read model config JSON ({e})") from None
        preprocess = cfg.get("preprocess_cfg", {}) if isinstance(cfg, dict) else {}
        model_cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else None
        if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in
                                                      ("embed_dim", "vision_cfg", "text_cfg")):
            raise InputError(arch, "not an open_clip model config (needs 'embed_dim', "
                                   "'vision_cfg' and 'text_cfg', optionally under 'model_cfg')")
        text = json.dumps(model_cfg, sort_keys=True)
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        if key not in _REGISTERED:
            global _CONFIG_DIR
            if _CONFIG_DIR is None:
                _CONFIG_DIR = tempfile.TemporaryDirectory(prefix="vldus_clip_cfg_")
            name = f"vldus-arch-{key}"
            path = os.path.join(_CONFIG_DIR.name, f"{name}.json")
            with open(path, "w") as f:
                f.write(text)
            open_clip.add_model_config(path)
            _REGISTERED[key] = name
        return _REGISTERED[key], preprocess
    if arch not in open_clip.list_models():
        raise InputError(arch, "--arch: neither an open_clip model name (open_clip.list_models()) "
                               "nor a model-config JSON file")
    return arch, {}


def arch_uses_quick_gelu(arch: str) -> bool:
    """True when the open_clip config of ``arch`` (name or config JSON) sets ``quick_gelu``."""
    import open_clip

    name, _ = resolve_arch(arch)
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


def build_open_clip(arch: str = DEFAULT_ARCH, device: str | torch.device = "cpu",
                    force_quick_gelu: bool = False) -> nn.Module:
    """A randomly initialised open_clip model of architecture ``arch`` (offline);
    ``force_quick_gelu`` builds its QuickGELU variant."""
    import open_clip
    from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg

    name, preprocess = resolve_arch(arch)
    logging.disable(logging.WARNING)  # "no pretrained weights loaded": we load them ourselves
    try:
        # No `pretrained` tag and no tower weights: open_clip has nothing to fetch.
        model = open_clip.create_model(name, pretrained=None, pretrained_image=False,
                                       pretrained_text=False, device=device,
                                       force_quick_gelu=force_quick_gelu)
    except Exception as e:  # open_clip raises RuntimeError/ValueError/KeyError for bad configs
        raise InputError(arch, f"cannot build open_clip model ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        logging.disable(logging.NOTSET)
    if preprocess:
        set_model_preprocess_cfg(model, {**get_model_preprocess_cfg(model), **preprocess})
    return model


def get_clip_tokenizer(arch: str = DEFAULT_ARCH) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for ``arch`` (texts -> (N, context_length) int64 token ids)."""
    import open_clip

    name, _ = resolve_arch(arch)
    try:
        return open_clip.get_tokenizer(name)
    except Exception as e:  # an HF tokenizer that is not in the local cache
        raise InputError(arch, f"cannot build the tokenizer offline ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def read_clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a CLIP weights file (see module doc for the formats), keys cleaned."""
    return read_clip_weights(path)[0]


def read_clip_weights(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict with keys cleaned, whether the file is an OpenAI TorchScript archive)."""
    path = require_file(path, "CLIP weights file")
    torchscript = False
    obj: Any
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj = load_file(path, device="cpu")
        except Exception as e:
            raise InputError(path, f"cannot read safetensors file ({str(e).splitlines()[0]})") from None
    else:
        try:
            with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
            obj = _read_torchscript(path)
            torchscript = obj is not None
            if obj is None:
                raise InputError(path, "cannot read CLIP weights (not a weights-only torch file, "
                                       f"safetensors or TorchScript archive: {str(e).splitlines()[0]})"
                                 ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "not a state dict (expected a mapping of parameter names to tensors)")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    openai = torchscript and any(k in state for k in OPENAI_EXTRA_KEYS)
    for key in OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state, openai


def _read_torchscript(path: str) -> Optional[dict[str, torch.Tensor]]:
    """State dict of a TorchScript archive (OpenAI's own CLIP files), or None if it is not one."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        if not any(n.endswith("code/__torch__.py") or "/code/" in n for n in z.namelist()):
            return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    except Exception:
        return None


def quick_gelu_for(arch: str, path: str, openai: bool, quickgelu: str = "auto") -> bool:
    """Whether to force QuickGELU on ``arch`` for the weights file ``path`` (``openai``: it is an
    OpenAI TorchScript archive); InputError for an explicit mismatch (``quickgelu='off'``)."""
    if quickgelu not in QUICKGELU_MODES:
        raise InputError("--quickgelu", f"{quickgelu!r}: expected one of {QUICKGELU_MODES}")
    arch_quick = arch_uses_quick_gelu(arch)
    if quickgelu == "on":
        return not arch_quick
    if quickgelu == "off":
        if arch_quick:
            raise InputError(arch, "architecture uses QuickGELU, but --quickgelu off asks for GELU")
        if openai:
            raise InputError(path, f"an OpenAI CLIP archive (trained with QuickGELU) with architecture "
                                   f"{arch!r} (GELU) and --quickgelu off: use "
                                   f"{_quickgelu_name(arch)!r} or --quickgelu auto")
        return False
    if openai and not arch_quick:
        print(f"CLIP: {path} is an OpenAI TorchScript archive, trained with QuickGELU: using "
              f"{_quickgelu_name(arch)} (not {arch})", flush=True)
        return True
    return False


def _quickgelu_name(arch: str) -> str:
    """The name of the QuickGELU variant of ``arch`` (open_clip's ``-quickgelu`` names)."""
    import open_clip

    if not os.path.isfile(arch) and f"{arch}-quickgelu" in open_clip.list_models():
        return f"{arch}-quickgelu"
    return f"{arch} with QuickGELU"


def uses_quick_gelu(model: nn.Module) -> bool:
    """True when the model's transformer blocks use QuickGELU."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def load_open_clip(arch: str = DEFAULT_ARCH, weights_path: str | os.PathLike = "",
                   device: str | torch.device = "cpu", quickgelu: str = "auto") -> nn.Module:
    """open_clip model ``arch`` with the weights of the local file ``weights_path``.

    ``quickgelu``: auto | on | off, see the module doc (auto: an OpenAI TorchScript archive gets
    the QuickGELU variant of ``arch``, printed).
    Returned frozen (``requires_grad=False`` everywhere) and in eval mode, on ``device``.
    InputError names the file when it is missing, unreadable, or its keys/shapes do not fit.
    """
    from open_clip.model import convert_to_custom_text_state_dict

    if not weights_path:
        raise InputError(arch, "no CLIP weights file given (nothing is downloaded; pass a local file)")
    path = require_file(str(weights_path), "CLIP weights file")
    state, openai = read_clip_weights(path)
    model = build_open_clip(arch, "cpu", force_quick_gelu=quick_gelu_for(arch, path, openai, quickgelu))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    expected = model.state_dict()
    # TorchScript archives also store buffers that open_clip keeps out of its state dict.
    transient = {name for name, _ in model.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in transient}
    for key in ("logit_scale", "logit_bias"):  # scalar vs 1-element tensor across versions
        if key in state and key in expected and state[key].numel() == expected[key].numel():
            state[key] = state[key].reshape(expected[key].shape)
    _check_fit(path, arch, state, expected)
    model.load_state_dict(state, strict=True)
    return freeze(model.to(device))


def _check_fit(path: str, arch: str, state: dict, expected: dict) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
        raise InputError(path, f"weights do not fit open_clip arch {arch!r}: " + ", ".join(parts))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients (inputs can still receive gradients through it)."""
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# Facts about a loaded model
# --------------------------------------------------------------------------------------------
def clip_image_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the image encoder expects."""
    visual = getattr(model, "visual", model)
    size = getattr(visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def clip_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation constants of the image encoder (OpenAI's by default)."""
    visual = getattr(model, "visual", model)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean", getattr(visual, "image_mean", None)) or OPENAI_MEAN
    std = cfg.get("std", getattr(visual, "image_std", None)) or OPENAI_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
