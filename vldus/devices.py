"""Which device a process computes on, and its process group under torchrun.

``torchrun`` (``tools/dist_train.sh``, ``tools/dist_test.sh``) starts one process per GPU and
sets RANK, LOCAL_RANK and WORLD_SIZE; process ``LOCAL_RANK`` of a node uses ``cuda:LOCAL_RANK``.
:func:`local_device` checks that this GPU exists (more processes than GPUs would otherwise fail
deep inside CUDA with "invalid device ordinal") and makes it the current device, so that no rank
opens a context on GPU 0 by accident.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch

from vldus.errors import InputError

# Default process-group timeout: long enough for work that one rank does alone between two
# collectives (rank 0 writing a checkpoint, evaluating or gathering results), which NCCL's
# default 10-minute watchdog would kill. VLDUS_DIST_TIMEOUT_MIN overrides it.
DIST_TIMEOUT_MIN = 120


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def under_torchrun() -> bool:
    """True when torchrun (or another launcher of its kind) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)


def local_device(requested: Optional[str] = None) -> torch.device:
    """``requested`` (checked), else ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    A CUDA device is checked against ``torch.cuda.device_count()`` (InputError naming the rank and
    the count) and made the current device with ``torch.cuda.set_device``.
    """
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device", f"{requested}: CUDA is not available")
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
    else:
        return torch.device("cpu")
    if device.type == "cuda":
        index = local_rank() if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            raise InputError("LOCAL_RANK" if not requested else "--device",
                             f"process {local_rank()} of this node needs cuda:{index}, but only "
                             f"{count} GPU(s) are visible; start at most {count} processes per node "
                             "(torchrun --nproc_per_node) or set CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def dist_timeout() -> datetime.timedelta:
    """The process-group timeout: VLDUS_DIST_TIMEOUT_MIN minutes (default DIST_TIMEOUT_MIN)."""
    value = os.environ.get("VLDUS_DIST_TIMEOUT_MIN", str(DIST_TIMEOUT_MIN))
    try:
        minutes = float(value)
    except ValueError:
        raise InputError("VLDUS_DIST_TIMEOUT_MIN", f"{value!r} is not a number of minutes") from None
    if minutes <= 0:
        raise InputError("VLDUS_DIST_TIMEOUT_MIN", f"{value!r} must be positive")
    return datetime.timedelta(minutes=minutes)


def start_process_group(backend: str, timeout: Optional[datetime.timedelta] = None) -> bool:
    """Start the process group under torchrun (even with one process, so that the distributed
    code path is the one that runs); returns whether this call started it."""
    import torch.distributed as dist

    distributed = under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed or dist.is_initialized():
        return False
    dist.init_process_group(backend, timeout=timeout or dist_timeout())
    return True
