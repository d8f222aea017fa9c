"""Files written whole or not at all, and file hashes.

Every output goes to a temporary file beside its target and is then renamed into place
(``os.replace`` is atomic within a file system): a kill never leaves a half-written file, and a
resumed run never reads one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Callable, Optional

import torch


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file next to ``path``, which is then renamed to ``path``.
    The temporary file is removed when ``write`` fails."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any, indent: Optional[int] = 1) -> None:
    """``obj`` as JSON in ``path``, atomically and flushed to disk; parent folders are created."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)


def save_torch(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_npy(path: str, array) -> None:
    """``np.save`` of ``array`` to ``path``, atomically (through a handle: no '.npy' appended)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
