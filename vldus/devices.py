"""Which device a process computes on, and its process group under torchrun.

``torchrun`` (``tools/dist_train.sh``, ``tools/dist_test.sh``) starts one process per GPU and
sets RANK, LOCAL_RANK and WORLD_SIZE; process ``LOCAL_RANK`` of a node uses ``cuda:LOCAL_RANK``.
A process that sees exactly one GPU uses it whatever its LOCAL_RANK: launchers that bind one GPU
to each process (``srun --gpus-per-task=1``, a Kubernetes pod per GPU) give every process its
own GPU as cuda:0. ``VLDUS_DEVICE_INDEX`` picks the index outright. :func:`local_device` checks
that the GPU exists (more processes than GPUs would otherwise fail deep inside CUDA with
"invalid device ordinal") and makes it the current device, so that no rank opens a context on
GPU 0 by accident.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import uuid
from typing import Optional

import torch

from vldus.errors import InputError

# The long timeout: long enough for work that one rank does alone between two collectives (rank 0
# writing a checkpoint, evaluating or gathering results), which NCCL's default 10-minute watchdog
# would kill. The process groups of test and extract-features have it, and train-detector's
# barriers around rank 0's work (:func:`long_group`). VLDUS_DIST_TIMEOUT_MIN overrides it.
DIST_TIMEOUT_MIN = 120


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# What init_process_group("env://") reads: a launcher without torchrun's agent (srun, a
# Kubernetes job) must set all of them.
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True when torchrun, or a launcher that sets every variable of :data:`ENV_VARS`, started
    this process (RANK and MASTER_ADDR alone, as some cluster pods have, do not count)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(name in os.environ for name in ENV_VARS)


def device_index(count: int) -> int:
    """The GPU of this process among the ``count`` visible: VLDUS_DEVICE_INDEX when set, 0 when one
    GPU is visible and torchrun did not start more processes on this node than that, else
    LOCAL_RANK."""
    value = os.environ.get("VLDUS_DEVICE_INDEX")
    if value is not None:
        try:
            return int(value)
        except ValueError:
            raise InputError("VLDUS_DEVICE_INDEX", f"{value!r} is not a device index") from None
    if count == 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return 0
    return local_rank()


def local_device(requested: Optional[str] = None) -> torch.device:
    """``requested`` (checked), else this process's GPU (:func:`device_index`) when CUDA is
    available, else the CPU.

    A CUDA device is checked against ``torch.cuda.device_count()`` (InputError naming the rank and
    the count) and made the current device with ``torch.cuda.set_device``.
    """
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device", f"{requested}: CUDA is not available")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        return torch.device("cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device_index(count) if device.index is None else device.index
        if index >= count:
            source = "--device" if requested and device.index is not None else (
                "VLDUS_DEVICE_INDEX" if "VLDUS_DEVICE_INDEX" in os.environ else "LOCAL_RANK")
            raise InputError(source,
                             f"process {local_rank()} of this node needs cuda:{index}, but only "
                             f"{count} GPU(s) are visible; start at most {count} processes per node "
                             "(torchrun --nproc_per_node) or set CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def dist_timeout() -> datetime.timedelta:
    """The long timeout: VLDUS_DIST_TIMEOUT_MIN minutes (default DIST_TIMEOUT_MIN)."""
    return _minutes("VLDUS_DIST_TIMEOUT_MIN", DIST_TIMEOUT_MIN)


def _minutes(name: str, default: float) -> datetime.timedelta:
    value = os.environ.get(name, str(default))
    try:
        minutes = float(value)
    except ValueError:
        raise InputError(name, f"{value!r} is not a number of minutes") from None
    if minutes <= 0:
        raise InputError(name, f"{value!r} must be positive")
    return datetime.timedelta(minutes=minutes)


def start_process_group(backend: str, timeout: Optional[datetime.timedelta] = None) -> bool:
    """Start the process group under torchrun (even with one process, so that the distributed
    code path is the one that runs); returns whether this call started it."""
    import torch.distributed as dist

    if not under_torchrun():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            missing = [name for name in ENV_VARS if name not in os.environ]
            raise InputError("WORLD_SIZE", f"{os.environ['WORLD_SIZE']} processes, but {', '.join(missing)} "
                                           "not set: start them with torchrun (tools/torchrun.sh) or set "
                                           f"{', '.join(ENV_VARS)}")
        return False
    if dist.is_initialized():
        return False
    dist.init_process_group(backend, timeout=timeout or dist_timeout())
    return True


# The timeout of the training collectives (DDP's all-reduce, the loss and weight checks): a rank
# that hangs or dies unreported stops the others within it, while the work rank 0 does alone
# (checkpoint, evaluation) waits behind :func:`long_barrier` with VLDUS_DIST_TIMEOUT_MIN.
TRAIN_TIMEOUT_MIN = 30


def train_timeout() -> datetime.timedelta:
    """The training collectives' timeout: VLDUS_TRAIN_TIMEOUT_MIN minutes (default TRAIN_TIMEOUT_MIN)."""
    return _minutes("VLDUS_TRAIN_TIMEOUT_MIN", TRAIN_TIMEOUT_MIN)


def long_group():
    """A gloo group of every rank with the long timeout (:func:`dist_timeout`), for the barriers
    behind which one rank works alone; None without a process group. Every rank must call it."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=dist_timeout())


def long_barrier(group) -> None:
    """Wait on ``group`` (:func:`long_group`) for every rank; nothing without one."""
    import torch.distributed as dist

    if group is not None:
        dist.barrier(group=group)


def broadcast_object(value, group=None):
    """Rank 0's ``value`` on every rank (``value`` itself without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def raise_if_any(error: Optional[InputError], group=None) -> None:
    """Every rank raises the same InputError when ``error`` is set on any rank (the first
    such rank's, naming it), so that no rank goes on into a collective the others left."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else (error.source, error.message), group=group)
    for rank, found in enumerate(errors):
        if found is not None:
            where, message = found
            raise InputError(where, f"process {rank}: {message}")


def check_shared_dir(directory: str, group=None) -> None:
    """Every rank sees ``directory`` as rank 0 does: rank 0 writes a token file in it, and every
    rank must read it back. InputError on every rank otherwise (several nodes need a shared file
    system for the work dir: rank 0 writes the checkpoints and shards that the others read)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    token = broadcast_object(uuid.uuid4().hex, group)
    path = os.path.join(directory, f".vldus_shared_{token}")
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            f.write(token)
    dist.barrier(group=group)
    try:
        with open(path) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    error = None if seen else InputError(directory, "does not hold the file rank 0 wrote there: every node must "
                                                    "see the same work dir (a shared file system)")
    dist.barrier(group=group)
    if dist.get_rank() == 0:
        with contextlib.suppress(OSError):
            os.remove(path)
    raise_if_any(error, group)
