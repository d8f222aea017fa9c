"""Sharded, resumable writing of a large (N, D) float32 feature matrix and its (N,) int64 labels.

A long extraction writes its rows into *shards* inside one parts folder::

    PARTS/run.json                  settings of the run that owns the folder
    PARTS/shard_00000.feats.bin     raw float32 rows (rows x dim), appended image after image
    PARTS/shard_00000.labels.bin    raw int64 labels (rows,)
    PARTS/shard_00000.json          written last, atomically: the shard is finished

A shard without its ``.json`` is unfinished and is rewritten from scratch on resume. When every
shard is finished, :func:`merge_shards` concatenates them (in shard order) into the final ``.npy``
files through memory maps, chunk by chunk, so memory stays flat however large the output; the
final files are written under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Sequence

import numpy as np

from vldus.files import write_json

FEATS_DTYPE = np.float32
LABELS_DTYPE = np.int64


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class ShardWriter:
    """Appends rows of one shard; :meth:`commit` marks it finished (use as a context manager)."""

    def __init__(self, store: "ShardStore", index: int):
        self.store = store
        self.index = index
        self.rows = 0
        self._feats = open(store.feats_file(index), "wb")
        self._labels = open(store.labels_file(index), "wb")

    def append(self, feats: np.ndarray, labels: np.ndarray) -> None:
        """Add rows: ``feats`` (K, dim) float32, ``labels`` (K,) int64."""
        feats = np.ascontiguousarray(feats, dtype=FEATS_DTYPE)
        labels = np.ascontiguousarray(labels, dtype=LABELS_DTYPE)
        if feats.ndim != 2 or feats.shape[1] != self.store.dim or len(labels) != len(feats):
            raise ValueError(f"expected ({len(labels)}, {self.store.dim}) rows, got {feats.shape}")
        self._feats.write(feats.tobytes())
        self._labels.write(labels.tobytes())
        self.rows += len(feats)

    def commit(self, info: dict) -> None:
        """Flush the data to disk, then write the shard's JSON marker (``info`` + row count)."""
        for f in (self._feats, self._labels):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        write_json(self.store.marker_file(self.index), {**info, "rows": self.rows})

    def close(self) -> None:
        self._feats.close()
        self._labels.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # an exception leaves the shard unfinished (no marker)


class ShardStore:
    """The parts folder of one extraction run."""

    def __init__(self, parts_dir: str, dim: int):
        self.dir = parts_dir
        self.dim = dim

    # --- file names ---------------------------------------------------------------------
    def feats_file(self, i: int) -> str:
        return os.path.join(self.dir, f"shard_{i:05d}.feats.bin")

    def labels_file(self, i: int) -> str:
        return os.path.join(self.dir, f"shard_{i:05d}.labels.bin")

    def marker_file(self, i: int) -> str:
        return os.path.join(self.dir, f"shard_{i:05d}.json")

    @property
    def run_file(self) -> str:
        return os.path.join(self.dir, "run.json")

    # --- state --------------------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.isfile(self.run_file)

    def run_info(self) -> dict | None:
        return read_json(self.run_file)

    def reset(self, run_info: dict) -> None:
        """Start an empty parts folder owned by a run with settings ``run_info``."""
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        write_json(self.run_file, run_info)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def finished(self, i: int) -> dict | None:
        """The marker of shard ``i`` if the shard is finished and its files are intact, else None."""
        info = read_json(self.marker_file(i))
        if info is None or "rows" not in info:
            return None
        rows = int(info["rows"])
        try:
            ok = (os.path.getsize(self.feats_file(i)) == rows * self.dim * np.dtype(FEATS_DTYPE).itemsize
                  and os.path.getsize(self.labels_file(i)) == rows * np.dtype(LABELS_DTYPE).itemsize)
        except OSError:
            ok = False
        return info if ok else None

    def pending(self, num_shards: int) -> list[int]:
        """Indices of the shards that are not finished."""
        return [i for i in range(num_shards) if self.finished(i) is None]

    def writer(self, i: int) -> ShardWriter:
        """Open shard ``i`` for writing from scratch (drops any earlier marker first)."""
        try:
            os.remove(self.marker_file(i))
        except FileNotFoundError:
            pass
        return ShardWriter(self, i)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Read-only memory maps of shard ``i``: feats (rows, dim) float32, labels (rows,) int64."""
        rows = int(self.finished(i)["rows"])
        if rows == 0:
            return np.zeros((0, self.dim), FEATS_DTYPE), np.zeros((0,), LABELS_DTYPE)
        feats = np.memmap(self.feats_file(i), FEATS_DTYPE, "r", shape=(rows, self.dim))
        labels = np.memmap(self.labels_file(i), LABELS_DTYPE, "r", shape=(rows,))
        return feats, labels


def _open_npy(path: str, dtype, shape: tuple[int, ...]):
    """A writable .npy memory map (an ordinary array when empty: mmap cannot map 0 bytes)."""
    if shape[0] == 0:
        return np.zeros(shape, dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def merge_shards(store: ShardStore, shards: Sequence[int], feats_path: str, labels_path: str,
                 chunk_rows: int = 16384) -> int:
    """Concatenate finished ``shards`` (in the given order) into ``feats_path`` (N, dim) float32
    and ``labels_path`` (N,) int64 .npy files; return N.

    Rows are copied ``chunk_rows`` at a time between memory maps. Both outputs are written to
    ``<path>.tmp`` first and renamed into place, labels last.
    """
    total = sum(int(store.finished(i)["rows"]) for i in shards)
    tmp_feats, tmp_labels = feats_path + ".tmp", labels_path + ".tmp"
    out_feats = _open_npy(tmp_feats, FEATS_DTYPE, (total, store.dim))
    out_labels = _open_npy(tmp_labels, LABELS_DTYPE, (total,))
    start = 0
    for i in shards:
        feats, labels = store.read(i)
        for lo in range(0, len(labels), chunk_rows):
            hi = min(lo + chunk_rows, len(labels))
            out_feats[start + lo:start + hi] = feats[lo:hi]
            out_labels[start + lo:start + hi] = labels[lo:hi]
        start += len(labels)
        del feats, labels
    for out, tmp in ((out_feats, tmp_feats), (out_labels, tmp_labels)):
        if isinstance(out, np.memmap):
            out.flush()
        else:
            with open(tmp, "wb") as f:
                np.save(f, out)
    del out_feats, out_labels
    os.replace(tmp_feats, feats_path)
    os.replace(tmp_labels, labels_path)
    return total


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Split item indices 0..num_items-1 into consecutive shards of ``shard_size`` items."""
    return [range(lo, min(lo + shard_size, num_items)) for lo in range(0, num_items, shard_size)]


def sum_counts(markers: Iterable[dict], key: str) -> dict:
    """Add up the ``key`` dicts (str -> int) of several shard markers."""
    total: dict[str, int] = {}
    for m in markers:
        for k, v in m.get(key, {}).items():
            total[k] = total.get(k, 0) + int(v)
    return total
