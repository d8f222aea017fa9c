"""Class splits (seen / unseen / excluded) and the image-selection rules of docs/design.md §2.3, §9.2.

The class lists live in ``vldus/data/splits/*.json`` (one file per split, the only source of
truth). A split JSON holds::

    {"name": str, "dataset": str, "classes": [names in detector order],
     "unseen": [names], "excluded": [names]}

Detector class index: 0 = background, ``i + 1`` = ``classes[i]``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Iterable, Sequence

import numpy as np

from vldus.errors import InputError

BUILTIN_SPLITS = ("coco_65_15", "coco_48_17", "voc_16_4", "dior_16_4")


def normalize_name(name: str) -> str:
    """Loose key for class names: case, spaces, '_' and '-' do not matter ('hair_drier' == 'Hair drier')."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def class_index(classes: Sequence[str], name: str, where: str) -> int:
    """1-based index of ``name`` in ``classes`` (loose match); InputError naming ``where`` if absent."""
    key = normalize_name(name)
    for i, c in enumerate(classes):
        if normalize_name(c) == key:
            return i + 1
    raise InputError(where, f"unknown class name {name!r}")


@dataclass(frozen=True)
class Split:
    """A dataset's class order and its seen / unseen / excluded partition."""

    name: str
    classes: tuple[str, ...]  # detector order, background not included
    unseen: tuple[str, ...]
    excluded: tuple[str, ...] = ()
    dataset: str = ""
    source_file: str = field(default="", compare=False)

    def __post_init__(self):
        where = self.source_file or self.name
        if len(set(map(normalize_name, self.classes))) != len(self.classes):
            raise InputError(where, "duplicate class names in 'classes'")
        known = {normalize_name(c) for c in self.classes}
        for group in ("unseen", "excluded"):
            for c in getattr(self, group):
                if normalize_name(c) not in known:
                    raise InputError(where, f"{group} class {c!r} is not in 'classes'")
        if set(map(normalize_name, self.unseen)) & set(map(normalize_name, self.excluded)):
            raise InputError(where, "a class is both unseen and excluded")
        if not self.unseen:
            raise InputError(where, "no unseen classes")
        if not self.seen:
            raise InputError(where, "no seen classes")

    # --- class groups -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of object classes C (the detector has C + 1 outputs with background)."""
        return len(self.classes)

    @property
    def seen(self) -> tuple[str, ...]:
        other = set(map(normalize_name, self.unseen + self.excluded))
        return tuple(c for c in self.classes if normalize_name(c) not in other)

    @cached_property
    def _lookup(self) -> dict[str, int]:
        """normalized name -> detector index (computed once: the selection rules run per image)."""
        return {normalize_name(c): i + 1 for i, c in enumerate(self.classes)}

    def index(self, name: str) -> int:
        """Detector index (1-based) of a class name, matched loosely; InputError if unknown."""
        i = self._lookup.get(normalize_name(name))
        if i is None:
            return class_index(self.classes, name, self.source_file or self.name)  # raises
        return i

    def ids(self, names: Iterable[str]) -> list[int]:
        return [self.index(n) for n in names]

    @cached_property
    def _group_ids(self) -> dict[str, tuple[int, ...]]:
        return {"seen": tuple(self.ids(self.seen)), "unseen": tuple(sorted(self.ids(self.unseen))),
                "excluded": tuple(sorted(self.ids(self.excluded)))}

    @property
    def seen_ids(self) -> list[int]:
        """Detector indices of the seen classes, ascending."""
        return list(self._group_ids["seen"])

    @property
    def unseen_ids(self) -> list[int]:
        """Detector indices of the unseen classes, ascending (the order of synthesized rows)."""
        return list(self._group_ids["unseen"])

    @property
    def excluded_ids(self) -> list[int]:
        return list(self._group_ids["excluded"])

    def group_of(self, label: int) -> str:
        """'background', 'seen', 'unseen' or 'excluded' for a detector index."""
        if label == 0:
            return "background"
        name = normalize_name(self.classes[label - 1])
        if name in map(normalize_name, self.unseen):
            return "unseen"
        if name in map(normalize_name, self.excluded):
            return "excluded"
        return "seen"

    def with_unseen(self, unseen: Sequence[str]) -> "Split":
        """The same classes with another unseen list (names checked, canonical spelling kept)."""
        canon = tuple(self.classes[self.index(n) - 1] for n in unseen)
        return Split(self.name, self.classes, canon, self.excluded, self.dataset, self.source_file)

    # --- image-selection rules ----------------------------------------------------------
    def keep_for_training(self, labels: np.ndarray) -> bool:
        """§2.3: train only on images whose objects are all seen (unseen or excluded disqualify)."""
        labels = np.asarray(labels)
        if labels.size == 0:
            return False
        return bool(np.isin(labels, self.seen_ids).all())

    def keep_for_test(self, labels: np.ndarray, setting: str, rule: str) -> bool:
        """§9.2 test images.

        ``rule='coco'``: zsd and gzsd keep images with at least one unseen object.
        ``rule='voc'`` (VOC, DIOR): zsd keeps images whose objects are all unseen;
        gzsd keeps images with at least one unseen object.
        """
        if setting not in ("zsd", "gzsd"):
            raise ValueError(f"unknown setting {setting!r}")
        if rule not in ("coco", "voc"):
            raise ValueError(f"unknown test rule {rule!r}")
        labels = np.asarray(labels)
        has_unseen = bool(np.isin(labels, self.unseen_ids).any())
        if setting == "gzsd" or rule == "coco":
            return has_unseen
        return has_unseen and bool(np.isin(labels, self.unseen_ids).all())

    def to_json(self) -> dict:
        return {"name": self.name, "dataset": self.dataset, "classes": list(self.classes),
                "unseen": list(self.unseen), "excluded": list(self.excluded)}


def load_split(name_or_path: str) -> Split:
    """Load a split by built-in name (``coco_65_15`` …) or from a JSON file path.

    A JSON file may also be a make-shapes ``split.json`` (``{"seen": [...], "unseen": [...]}``)
    next to which the class order is taken from ``attributes`` or ``categories``; for such
    files pass ``classes`` explicitly via :func:`split_from_names`.
    """
    if os.path.isfile(name_or_path):
        path = name_or_path
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(path, f"cannot read split JSON ({e})") from None
    else:
        if name_or_path not in BUILTIN_SPLITS:
            raise InputError(name_or_path, f"not a split file nor a built-in split {BUILTIN_SPLITS}")
        path = str(resources.files("vldus.data") / "splits" / f"{name_or_path}.json")
        with open(path) as f:
            d = json.load(f)
    if "classes" not in d:
        if "seen" in d and "unseen" in d:  # make-shapes split.json: classes = seen + unseen, order kept
            raise InputError(path, "split file has no 'classes' list; use the dataset's categories "
                                   "(split_from_names) to fix the class order")
        raise InputError(path, "split file needs 'classes' and 'unseen'")
    try:
        return Split(name=d.get("name", os.path.splitext(os.path.basename(path))[0]),
                     classes=tuple(d["classes"]), unseen=tuple(d["unseen"]),
                     excluded=tuple(d.get("excluded", ())), dataset=d.get("dataset", ""),
                     source_file=path)
    except KeyError as e:
        raise InputError(path, f"missing key {e}") from None


def split_from_names(name: str, classes: Sequence[str], unseen: Sequence[str],
                     excluded: Sequence[str] = (), dataset: str = "", source_file: str = "") -> Split:
    """Build a Split from explicit lists (used for make-shapes data and user datasets)."""
    where = source_file or name
    canon_unseen = tuple(classes[class_index(classes, n, where) - 1] for n in unseen)
    canon_excl = tuple(classes[class_index(classes, n, where) - 1] for n in excluded)
    return Split(name, tuple(classes), canon_unseen, canon_excl, dataset, source_file)
