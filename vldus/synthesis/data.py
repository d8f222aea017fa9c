"""RoI feature files for stage 3, read through memory maps (docs/design.md §3, §6.2).

A feature set is the pair written by ``vldus extract-features``:
``{split}_{fg}_{bg}_feats.npy`` (N, dim) float32 and ``{split}_{fg}_{bg}_labels.npy`` (N,) int64
(0 = background, k = detector class index). The labels (8 bytes a row) are held in memory; the
features (4 KB a row) never are: rows are gathered from a memory map opened for one chunk at a
time and closed again, so the pages of a many-gigabyte file never pile up in the process.

:func:`sample_epoch_pool` is the per-epoch data pool of the published GAN trainer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from vldus.data.splits import Split
from vldus.errors import InputError, require_file

# Rows read per memory map in one go. Sequential reads: 32768 rows x 1024 float32 = 128 MB.
# Random rows: each page fault may map its neighbours too (the kernel's fault-around, 64 KB),
# so a random chunk keeps up to 4096 x 64 KB = 256 MB of the file resident until it is unmapped.
CHUNK_ROWS = 32768
GATHER_ROWS = 4096


def feature_file_paths(features_dir: str, data_split: str, fg_iou: float, bg_iou: float) -> tuple[str, str]:
    """(feats, labels) paths under the names ``vldus extract-features`` writes."""
    from vldus.detection.extract import output_paths

    paths = output_paths(features_dir, data_split, fg_iou, bg_iou)
    return paths.feats, paths.labels


@dataclass
class FeatureFile:
    """An (N, dim) float32 feature file with its (N,) labels; rows gathered chunk by chunk."""

    feats_path: str
    labels_path: str
    labels: np.ndarray  # (N,) int64, in memory
    dim: int

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    @classmethod
    def open(cls, feats_path: str, labels_path: str, dim: int, num_classes: int) -> "FeatureFile":
        """Check headers, shapes and label range; InputError naming the file and the count."""
        require_file(feats_path, "feature file")
        require_file(labels_path, "label file")
        shape, dtype = _npy_header(feats_path)
        if len(shape) != 2:
            raise InputError(feats_path, f"expected an (N, {dim}) feature matrix, got shape {shape}")
        if shape[1] != dim:
            raise InputError(feats_path, f"feature width {shape[1]} != features.dim {dim} of the config")
        if dtype != np.float32:
            raise InputError(feats_path, f"feature dtype {dtype}, expected float32")
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise InputError(labels_path, f"cannot read labels ({str(e).splitlines()[0]})") from None
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(labels_path, f"expected (N,) integer labels, got shape {labels.shape} "
                                          f"dtype {labels.dtype}")
        if len(labels) != shape[0]:
            raise InputError(labels_path, f"{len(labels)} labels for {shape[0]} feature rows in "
                                          f"{feats_path}")
        bad = (labels < 0) | (labels > num_classes)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InputError(labels_path, f"{int(bad.sum())} labels out of range 0..{num_classes} "
                                          f"(first: row {first}, label {int(labels[first])})")
        return cls(feats_path, labels_path, labels.astype(np.int64), dim)

    # --- reading ------------------------------------------------------------------------
    def _map(self) -> np.ndarray:
        return np.load(self.feats_path, mmap_mode="r")

    def gather(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (any order, repeats allowed) -> float32 tensor (len(rows), dim).

        Rows are read in ascending order, ``GATHER_ROWS`` per memory map, then put back in the
        requested order.
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = torch.empty((len(rows), self.dim), dtype=torch.float32)
        order = np.argsort(rows, kind="stable")
        for start in range(0, len(rows), GATHER_ROWS):
            pick = order[start:start + GATHER_ROWS]
            mm = self._map()
            out[torch.from_numpy(pick)] = torch.from_numpy(mm[rows[pick]])
            del mm  # unmap: the touched pages leave this process
        return out

    def load(self, device: torch.device | str) -> torch.Tensor:
        """Every row, (N, dim) float32 on ``device``, read CHUNK_ROWS rows at a time."""
        out = torch.empty((self.num_rows, self.dim), dtype=torch.float32, device=device)
        for start in range(0, self.num_rows, CHUNK_ROWS):
            mm = self._map()
            out[start:start + CHUNK_ROWS].copy_(torch.from_numpy(np.array(mm[start:start + CHUNK_ROWS])))
            del mm
        return out

    def check_finite(self, quiet: bool = False) -> None:
        """Scan every row for NaN/inf; InputError naming the file, the count and the first row."""
        bad_rows, first = 0, None
        bar = tqdm(total=self.num_rows, desc=f"check {os.path.basename(self.feats_path)}",
                   unit="row", unit_scale=True, disable=quiet, leave=False)
        for start in range(0, self.num_rows, CHUNK_ROWS):
            mm = self._map()
            bad = ~np.isfinite(mm[start:start + CHUNK_ROWS]).all(axis=1)  # on the map: no copy
            del mm
            if bad.any():
                bad_rows += int(bad.sum())
                if first is None:
                    first = start + int(np.flatnonzero(bad)[0])
            bar.update(len(bad))
        bar.close()
        if bad_rows:
            raise InputError(self.feats_path, f"{bad_rows} rows contain NaN or inf (first: row {first})")

    # --- label bookkeeping ---------------------------------------------------------------
    def counts(self, num_classes: int) -> np.ndarray:
        """(C+1,) number of rows per label."""
        return np.bincount(self.labels, minlength=num_classes + 1)


class DeviceRows:
    """Rows of a :class:`FeatureFile` gathered onto ``device`` (the GAN's epoch pools).

    On CUDA the whole file is copied to the device once when it takes at most half of the free
    device memory; each pool is then gathered there with an index tensor, so no epoch waits for
    the memory map. Otherwise (the CPU, or a file too large) each pool is read from the memory
    map, on CUDA into pinned memory and copied asynchronously. ``resident`` forces the choice.
    """

    def __init__(self, features: FeatureFile, device: torch.device | str, resident: Optional[bool] = None):
        self.features, self.device = features, torch.device(device)
        if resident is None:
            resident = self.device.type == "cuda" and (
                features.num_rows * features.dim * 4 <= torch.cuda.mem_get_info(self.device)[0] // 2)
        self.rows = features.load(self.device) if resident else None

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), dim) float32 on the device; ``rows`` (n,) int64 row indices."""
        if self.rows is not None:
            return self.rows.index_select(0, rows.to(self.device, non_blocking=True))
        out = self.features.gather(rows)
        if self.device.type == "cuda":
            out = out.pin_memory()
        return out.to(self.device, non_blocking=True)


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy file, read through a memory map (no data is loaded)."""
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(path, f"not a .npy array file ({str(e).splitlines()[0]})") from None
    shape, dtype, fortran = mm.shape, mm.dtype, (mm.ndim > 1 and not mm.flags.c_contiguous)
    del mm
    if fortran:
        raise InputError(path, "Fortran-ordered array; save it C-ordered (np.ascontiguousarray)")
    return tuple(shape), np.dtype(dtype)


def check_training_labels(features: FeatureFile, split: Split) -> None:
    """Training features (from seen-only images): background and every seen class present,
    no unseen or excluded rows. InputError naming the file and the count otherwise."""
    counts = features.counts(split.num_classes)
    if counts[0] == 0:
        raise InputError(features.labels_path, "no background rows (label 0)")
    other = [i for i in split.unseen_ids + split.excluded_ids if counts[i] > 0]
    if other:
        names = ", ".join(f"{split.classes[i - 1]} ({counts[i]})" for i in other[:5])
        raise InputError(features.labels_path, f"{int(counts[other].sum())} rows of unseen/excluded "
                                               f"classes in training features: {names}")
    empty = [i for i in split.seen_ids if counts[i] == 0]
    if empty:
        names = ", ".join(split.classes[i - 1] for i in empty[:10])
        raise InputError(features.labels_path, f"{len(empty)} seen classes have no features: {names}")


def require_unseen(split: Split) -> None:
    if not split.unseen_ids:
        raise InputError(split.source_file or split.name, "the unseen class list is empty")


# --------------------------------------------------------------------------------------------
# The GAN's per-epoch pool (docs/design.md §6.2)
# --------------------------------------------------------------------------------------------
def sample_epoch_pool(labels: torch.Tensor, budget: int, generator: torch.Generator,
                      fg_rows: Optional[torch.Tensor] = None,
                      bg_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row indices of one GAN epoch: all foreground + floor(#fg / #labels) random background
    rows (#labels = distinct labels, background included), shuffled, the first ``budget`` kept.

    ``fg_rows``/``bg_rows`` may be passed precomputed (they only depend on ``labels``).
    """
    if fg_rows is None:
        fg_rows = torch.nonzero(labels > 0).squeeze(1)
    if bg_rows is None:
        bg_rows = torch.nonzero(labels == 0).squeeze(1)
    num_labels = int(torch.unique(labels).numel())
    n_bg = min(len(fg_rows) // num_labels, len(bg_rows))
    bg = bg_rows[torch.randperm(len(bg_rows), generator=generator)[:n_bg]]
    pool = torch.cat([fg_rows, bg])
    return pool[torch.randperm(len(pool), generator=generator)[:budget]]


def sample_batches(pool_size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(iterations, batch) positions into the pool: ceil(pool/batch) iterations, each an
    independent random batch without repeats (batches may overlap), as the published trainer
    draws them. No iteration when the pool is smaller than one batch (its short batch is skipped).
    """
    if pool_size < batch_size:
        return torch.empty((0, batch_size), dtype=torch.int64)
    batches = torch.empty((-(-pool_size // batch_size), batch_size), dtype=torch.int64)
    for i in range(len(batches)):
        batches[i] = torch.randperm(pool_size, generator=generator)[:batch_size]
    return batches


def derive_seed(seed: int, *keys: int) -> int:
    """An independent seed for a side stream (classifier of epoch k, plots ...)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def default_detector_checkpoint(cfg) -> str:
    """gan.detector_checkpoint, else the latest epoch_N.pth of WORK_DIR/detector."""
    if cfg.gan.detector_checkpoint:
        return cfg.gan.detector_checkpoint
    from vldus.detection.train import latest_checkpoint

    found = latest_checkpoint(cfg.path("detector"))
    if not found:
        raise InputError(cfg.path("detector"), "no detector checkpoint (epoch_N.pth) found; train the "
                                               "detector or set gan.detector_checkpoint / --checkpoint")
    return found
