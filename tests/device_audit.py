"""Device audits for CPU-only tests: what a first CUDA run would trip over.

:class:`DeviceAudit` is a ``TorchFunctionMode`` that records, while code runs,

- ``generator_mismatches``: a random op whose ``generator`` lives on another device type than
  the tensor it fills (on CUDA: "Expected a 'cuda' device type for generator");
- ``syncs``: reads of a ``meta`` tensor's values on the host (``.item()``, ``float()``,
  ``bool()``, ``.tolist()``, ``.numpy()``, a copy to the CPU): on CUDA each of these waits for
  the device. The ``meta`` device stands in for CUDA: it has shapes and dtypes but no data, so
  the audit answers such reads with zeros and lets the code run on;
- ``uploads``: copies of CPU tensors onto a ``meta`` tensor (on CUDA, from pageable memory,
  they wait for the device too), factory calls that build a ``meta`` tensor from host data
  (``torch.tensor(list, device=...)``, ``torch.as_tensor``), and indexing of a ``meta`` tensor
  with a Python list or a CPU tensor (``x[:, ids]``, ``mask[ids] = True``: the index is copied
  to the device first);
- ``cpu_reads``: the same value reads on CPU tensors, for code that cannot run on ``meta``
  (torchvision's detection ops): the caller decides which of them count.

Each record names the first frame outside torch (``file:line function``).
:func:`scaler_step_reads_host` tells whether ``GradScaler.step`` reads the found-inf flag on
the host for an optimizer (amp is off on the CPU, so the audit never sees that read happen).
:func:`meta_generators` lets ``torch.Generator("meta")`` be created (torch has none): a CPU
generator stands in, remembered as a meta one, so the generator check still applies.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS = os.path.abspath(__file__)
_CLAIMED: dict[int, tuple[torch.Generator, str]] = {}  # id -> (generator, device type it stands for)

T = torch.Tensor
_VALUE_READS = {T.item: "item", T.tolist: "tolist", T.__bool__: "bool", T.__float__: "float",
                T.__int__: "int", T.__index__: "index", T.numpy: "numpy"}


def generator_device(gen: torch.Generator) -> str:
    claimed = _CLAIMED.get(id(gen))
    return claimed[1] if claimed is not None and claimed[0] is gen else gen.device.type


@contextlib.contextmanager
def meta_generators(monkeypatch):
    """``torch.Generator(device)`` works for ``meta`` (a CPU generator standing in)."""
    real = torch.Generator

    def make(device="cpu"):
        kind = torch.device(device).type
        gen = real("cpu" if kind == "meta" else device)
        if kind == "meta":
            _CLAIMED[id(gen)] = (gen, "meta")
        return gen

    monkeypatch.setattr(torch, "Generator", make)
    try:
        yield
    finally:
        monkeypatch.setattr(torch, "Generator", real)


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(_TORCH_DIR) and name != _THIS and "contextlib" not in name:
            return f"{name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _target_device(args, kwargs):
    """The device a ``Tensor.to(...)`` call copies to (None: the same device)."""
    if "device" in kwargs and kwargs["device"] is not None:
        return torch.device(kwargs["device"]).type
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a).type
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None


_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}
_INDEXING = {T.__getitem__, T.__setitem__}


def _host_index(index) -> bool:
    """An index (or a tuple of them) holding a Python list or a CPU tensor."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, list) or (isinstance(p, torch.Tensor) and p.device.type == "cpu" and p.dim() > 0)
               for p in parts)


def scaler_step_reads_host(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an enabled ``GradScaler.step(optimizer)`` reads the found-inf flag with ``.item()``
    (``torch/amp/grad_scaler.py``: optimizers without ``_step_supports_amp_scaling``, e.g. SGD
    and Adam unless fused)."""
    return not getattr(optimizer, "_step_supports_amp_scaling", False)


def _fake_value(t: torch.Tensor, how: str):
    zeros = torch.zeros(t.shape, dtype=t.dtype)
    if how == "numpy":
        return zeros.numpy()
    if how == "tolist":
        return zeros.tolist()
    if how in ("bool",):
        return False
    return zeros.item() if how in ("item", "float") else 0 if how in ("int", "index") else zeros


@dataclass
class DeviceAudit(TorchFunctionMode):
    generator_mismatches: list = field(default_factory=list)
    syncs: list = field(default_factory=list)
    uploads: list = field(default_factory=list)
    cpu_reads: list = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        this = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func in _VALUE_READS and this is not None:
            if this.device.type == "meta":
                self.syncs.append(f"{_VALUE_READS[func]} {_caller()}")
                return _fake_value(this, _VALUE_READS[func])
            self.cpu_reads.append(f"{_VALUE_READS[func]} {_caller()}")
        elif func in (T.cpu, T.to) and this is not None:
            target = "cpu" if func is T.cpu else _target_device(args, kwargs)
            if this.device.type == "meta" and target == "cpu":
                self.syncs.append(f"to cpu {_caller()}")
                dtype = next((a for a in args[1:] if isinstance(a, torch.dtype)), kwargs.get("dtype", this.dtype))
                return torch.zeros(this.shape, dtype=dtype)
            if this.device.type == "cpu" and target == "meta":
                self.uploads.append(f"upload {_caller()}")
        elif func in _FACTORIES:
            target = kwargs.get("device")
            data = args[0] if args else kwargs.get("data")
            if target is not None and torch.device(target).type == "meta" and not (
                    isinstance(data, torch.Tensor) and data.device.type == "meta"):
                self.uploads.append(f"{func.__name__} from host {_caller()}")
        elif func in _INDEXING and this is not None and this.device.type == "meta" and len(args) > 1 \
                and _host_index(args[1]):
            self.uploads.append(f"index from host {_caller()}")
        elif func is T.copy_ and this is not None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            if this.device.type == "meta" and args[1].device.type == "cpu" and args[1].numel() > 0:
                self.uploads.append(f"copy_ {_caller()}")
            if this.device.type == "cpu" and args[1].device.type == "meta":
                self.syncs.append(f"copy_ to cpu {_caller()}")
                return this
        out = func(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None:
            filled = out if isinstance(out, torch.Tensor) else this
            if filled is not None and filled.device.type != generator_device(gen):
                self.generator_mismatches.append(
                    f"{getattr(func, '__name__', func)}: generator on {generator_device(gen)}, tensor on "
                    f"{filled.device.type} at {_caller()}")
        return out

    def count(self, records: list, *, file: str, functions: tuple = ()) -> int:
        """How many of ``records`` come from ``file`` (a path ending) [in ``functions``]."""
        n = 0
        for r in records:
            where = r.split(" ", 1)[1] if " " in r else r
            path, _, function = where.rpartition(" ")
            if path.rsplit(":", 1)[0].endswith(file) and (not functions or function in functions):
                n += 1
        return n
