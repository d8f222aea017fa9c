"""The arithmetic of the synthesis stage (``gan.precision``): GAN, compatibility classifier and
the CLIP image encoder of the distillation all follow it.

- ``fp32`` (default): the published arithmetic, the same numbers on every CPU as far as float32
  allows (no dependence on AVX-512 / AMX).
- ``bf16``: matrix products in bfloat16 with float32 master weights; about 2x faster where the
  hardware multiplies bfloat16 natively (AVX-512-bf16, AMX, recent GPUs), slower elsewhere.
  Its speed and accuracy against fp32 are in docs/history.md ("Precision").
- ``auto``: ``bf16`` where the device multiplies bfloat16 natively, else ``fp32``. Opt-in only,
  since results then depend on the machine.
"""
from __future__ import annotations

import torch

from vldus.errors import InputError

PRECISIONS = ("fp32", "bf16", "auto")


def cpu_has_bf16() -> bool:
    """True when the CPU has native bfloat16 dot products (avx512_bf16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``gan.precision`` -> the precision that runs, ``'fp32'`` or ``'bf16'``."""
    if precision not in PRECISIONS:
        raise InputError("gan.precision", f"{precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
