"""Class semantic embeddings (SPEC Part B §4): load them, and build them with ``vldus embed``.

An embedding matrix E has shape (C+1, d): row 0 = background, row k = ``split.classes[k-1]``
(detector order). The synthesizer conditions on E after dividing the WHOLE matrix by one scalar,
its spectral norm (largest singular value), as the released code does.

Files :func:`load_class_embeddings` reads

- ``.npy``: a 2-D array with one row per class — ours (``vldus embed``), VLDUS's ``se-*.npy``
  (81x512 / 21x512) and SU's ``fasttext.npy`` / ``word_w2v.npy`` / VOC ``*.npy`` (81x300 / 21x300).
- ``.txt`` / ``.csv``: comma (or whitespace) separated numbers, the PL-ZSD layout used by SU's
  ``word_ftx.txt`` etc.: one line per DIMENSION and one column per CLASS (300 lines x 80
  columns). A matrix with C (not C+1) classes has no background row; pass
  ``background='mean'`` (mean of the class rows) or ``'zero'`` to add one — there is no silent
  default because the published results depend on that choice (SPEC §4.2).
- the sidecar ``<file>.json`` ``{"classes": [...]}`` written by ``vldus embed``: when present,
  its class order must equal the split's.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from vldus.data.splits import Split, normalize_name
from vldus.errors import InputError

BACKGROUND_RULES = ("mean", "zero")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_class_embeddings(path: str | os.PathLike, split: Split, spectral_norm: bool = True,
                          background: Optional[str] = None) -> np.ndarray:
    """Read a class-embedding file for ``split``; returns float32 (C+1, d), row 0 = background.

    ``spectral_norm``: divide the whole matrix by its largest singular value (SPEC §4.1).
    ``background``: 'mean' | 'zero', needed only when the file holds C rows (no background).
    Bad input raises InputError naming the file and the counts.
    """
    path = str(path)
    if background is not None and background not in BACKGROUND_RULES:
        raise InputError(path, f"background={background!r}: expected one of {BACKGROUND_RULES}")
    matrix = read_embedding_file(path, split.num_classes)
    n_rows = matrix.shape[0]
    expected = split.num_classes + 1
    where = f"split {split.name} has {split.num_classes} classes + background = {expected} rows"
    if n_rows == split.num_classes and background is not None:
        matrix = add_background_row(matrix, background)
    elif n_rows == split.num_classes:
        raise InputError(path, f"{n_rows} rows, {where}: the file has no background row; choose "
                               f"one with background='mean' or 'zero'")
    elif n_rows != expected:
        raise InputError(path, f"{n_rows} rows, {where}")
    bad = ~np.isfinite(matrix)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise InputError(path, f"{int(bad.sum())} NaN/inf values in {len(rows)} rows "
                               f"(first: row {int(rows[0])})")
    check_sidecar(path, split)
    if spectral_norm:
        matrix = spectral_normalize(matrix, path)
    return matrix.astype(np.float32)


def read_embedding_file(path: str, num_classes: int) -> np.ndarray:
    """The raw matrix of an embedding file as float64 (rows = classes, as stored; see module doc)."""
    if not os.path.isfile(path):
        raise InputError(path, "embedding file not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            matrix = np.load(path, allow_pickle=False)
        elif ext in (".txt", ".csv"):
            matrix = _read_text_matrix(path, num_classes)
        else:
            raise InputError(path, f"unknown embedding file type {ext!r} (expected .npy, .txt or .csv)")
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise InputError(path, f"cannot read embedding file ({str(e).splitlines()[0]})") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise InputError(path, f"expected a 2-D numeric matrix, got shape {matrix.shape} "
                               f"dtype {matrix.dtype}")
    return matrix.astype(np.float64)


def _read_text_matrix(path: str, num_classes: int) -> np.ndarray:
    """PL-ZSD text layout: dimension x class; transposed to class x dimension.

    A file whose columns cannot be classes (neither C nor C+1 of them) but whose lines can is
    read as class x dimension instead.
    """
    with open(path) as f:
        first = f.readline()
    delimiter = "," if "," in first else None
    matrix = np.loadtxt(path, delimiter=delimiter, dtype=np.float64, ndmin=2)
    rows, cols = matrix.shape
    if cols in (num_classes, num_classes + 1):
        return matrix.T
    if rows in (num_classes, num_classes + 1):
        return matrix
    raise InputError(path, f"{rows} lines x {cols} columns: neither has {num_classes} or "
                           f"{num_classes + 1} entries (one per class, optionally + background)")


def add_background_row(class_rows: np.ndarray, rule: str) -> np.ndarray:
    """Prepend a background row to (C, d) class rows: 'mean' of the class rows or 'zero'."""
    if rule == "mean":
        bg = class_rows.mean(axis=0, keepdims=True)
    elif rule == "zero":
        bg = np.zeros((1, class_rows.shape[1]), class_rows.dtype)
    else:
        raise ValueError(f"unknown background rule {rule!r}")
    return np.concatenate([bg, class_rows], axis=0)


def spectral_normalize(matrix: np.ndarray, source: str = "") -> np.ndarray:
    """``matrix / sigma_max(matrix)``: one scalar for the whole matrix (not per row)."""
    sigma = float(np.linalg.norm(np.asarray(matrix, dtype=np.float64), 2))
    if not np.isfinite(sigma) or sigma == 0.0:
        raise InputError(source or None, f"embedding matrix has spectral norm {sigma}; "
                                         "cannot normalize an all-zero matrix")
    return (np.asarray(matrix, dtype=np.float64) / sigma).astype(np.float32)


def sidecar_path(path: str) -> str:
    return f"{path}.json"


def check_sidecar(path: str, split: Split) -> None:
    """If ``<path>.json`` exists, its "classes" must be the split's classes in the same order."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return
    try:
        with open(side) as f:
            classes = json.load(f)["classes"]
        classes = [str(c) for c in classes]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(side, f"cannot read the 'classes' list of the sidecar ({e!r})") from None
    if len(classes) != split.num_classes:
        raise InputError(side, f"{len(classes)} classes, split {split.name} has {split.num_classes}")
    for i, (mine, theirs) in enumerate(zip(classes, split.classes)):
        if normalize_name(mine) != normalize_name(theirs):
            raise InputError(side, f"class order differs from split {split.name} at row {i + 1}: "
                                   f"file has {mine!r}, split has {theirs!r}")

