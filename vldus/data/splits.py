"""Class splits (seen / unseen / excluded) and the image-selection rules of docs/design.md §2.3, §9.2.

The class lists live in ``vldus/data/splits/*.json`` (one file per split, the only source of
truth). A split JSON holds::

    {"name": str, "dataset": str, "classes": [names in detector order],
     "unseen": [names], "excluded": [names], "aliases": {name in the data: class}}

Detector class index: 0 = background, ``i + 1`` = ``classes[i]``.

``aliases`` (optional; ``vldus prepare --rename bowk=bowl`` writes it): names as written in the
data that stand for a class (a typo, a second spelling). Wherever a class name is looked up
(:meth:`Split.index`, the dataset readers) an alias counts as its class, matched loosely like
class names (:func:`normalize_name`). An alias's target must be in ``classes``; an alias may not
itself be a class name.
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
# §9.2 test-image rules (Split.keep_for_test): 'coco', 'voc' (VOC, DIOR) and 'all' (datasets whose
# unseen objects never share an image with seen ones)
TEST_RULES = ("coco", "voc", "all")


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
    # (name as written in the data, class it stands for); a dict {alias: class} is accepted too
    aliases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        where = self.source_file or self.name
        if len(set(map(normalize_name, self.classes))) != len(self.classes):
            raise InputError(where, "duplicate class names in 'classes'")
        known = {normalize_name(c): c for c in self.classes}
        alias_of = {}  # normalized alias -> the class it stands for (spelled as in 'classes')
        aliases = []
        for alias, target in _alias_pairs(self.aliases, where):
            if normalize_name(target) not in known:
                raise InputError(where, f"alias {alias!r}: its class {target!r} is not in 'classes'")
            if normalize_name(alias) in known:
                raise InputError(where, f"alias {alias!r}: is a class name itself")
            target = known[normalize_name(target)]
            if normalize_name(alias) in alias_of:
                if alias_of[normalize_name(alias)] != target:
                    raise InputError(where, f"alias {alias!r}: stands for both "
                                            f"{alias_of[normalize_name(alias)]!r} and {target!r}")
                continue  # the same alias again
            alias_of[normalize_name(alias)] = target
            aliases.append((alias, target))
        object.__setattr__(self, "aliases", tuple(aliases))
        for group in ("unseen", "excluded"):  # an alias written there means its class
            names = tuple(alias_of.get(normalize_name(c), c) for c in getattr(self, group))
            object.__setattr__(self, group, names)
            for c in names:
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
        """normalized name or alias -> detector index (computed once: the selection rules run
        per image)."""
        lookup = {normalize_name(c): i + 1 for i, c in enumerate(self.classes)}
        for alias, target in self.aliases:
            lookup[normalize_name(alias)] = lookup[normalize_name(target)]
        return lookup

    def index(self, name: str) -> int:
        """Detector index (1-based) of a class name or alias, matched loosely; InputError if unknown."""
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
        """The same classes (and aliases) with another unseen list (names checked, canonical
        spelling kept)."""
        canon = tuple(self.classes[self.index(n) - 1] for n in unseen)
        return Split(self.name, self.classes, canon, self.excluded, self.dataset, self.source_file,
                     self.aliases)

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
        ``rule='all'`` (datasets where unseen objects never share an image with seen ones, e.g.
        about one box per image): zsd keeps images with at least one unseen object; gzsd keeps
        every image with at least one object that is not excluded.
        """
        if setting not in ("zsd", "gzsd"):
            raise ValueError(f"unknown setting {setting!r}")
        if rule not in TEST_RULES:
            raise ValueError(f"unknown test rule {rule!r} (one of {', '.join(TEST_RULES)})")
        labels = np.asarray(labels)
        if setting == "gzsd" and rule == "all":
            return bool((~np.isin(labels, self.excluded_ids)).any())
        has_unseen = bool(np.isin(labels, self.unseen_ids).any())
        if setting == "gzsd" or rule in ("coco", "all"):
            return has_unseen
        return has_unseen and bool(np.isin(labels, self.unseen_ids).all())

    def to_json(self) -> dict:
        d = {"name": self.name, "dataset": self.dataset, "classes": list(self.classes),
             "unseen": list(self.unseen), "excluded": list(self.excluded)}
        if self.aliases:
            d["aliases"] = dict(self.aliases)
        return d


def _alias_pairs(aliases, where: str) -> tuple[tuple[str, str], ...]:
    """``aliases`` (a mapping or (alias, class) pairs) as a tuple of string pairs; InputError
    naming ``where`` otherwise."""
    items = aliases.items() if isinstance(aliases, dict) else aliases
    try:
        pairs = tuple((a, t) for a, t in items)
    except (TypeError, ValueError):
        raise InputError(where, "'aliases': expected {name in the data: class}") from None
    for a, t in pairs:
        if not (isinstance(a, str) and isinstance(t, str) and a.strip() and t.strip()):
            raise InputError(where, f"'aliases': {a!r}: {t!r}: alias and class must be non-empty strings")
    return pairs


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
    aliases = d.get("aliases", {})
    if not isinstance(aliases, dict):
        raise InputError(path, "'aliases': expected an object {name in the data: class}")
    try:
        return Split(name=d.get("name", os.path.splitext(os.path.basename(path))[0]),
                     classes=tuple(d["classes"]), unseen=tuple(d["unseen"]),
                     excluded=tuple(d.get("excluded", ())), dataset=d.get("dataset", ""),
                     source_file=path, aliases=tuple(aliases.items()))
    except KeyError as e:
        raise InputError(path, f"missing key {e}") from None


def split_from_names(name: str, classes: Sequence[str], unseen: Sequence[str],
                     excluded: Sequence[str] = (), dataset: str = "", source_file: str = "",
                     aliases: dict[str, str] | Sequence[tuple[str, str]] = ()) -> Split:
    """Build a Split from explicit lists (used for make-shapes data and user datasets).
    ``unseen`` / ``excluded`` may name a class by one of its ``aliases``."""
    where = source_file or name
    alias_of = {normalize_name(a): t for a, t in _alias_pairs(aliases, where)}
    canon = [tuple(classes[class_index(classes, alias_of.get(normalize_name(n), n), where) - 1] for n in group)
             for group in (unseen, excluded)]
    return Split(name, tuple(classes), canon[0], canon[1], dataset, source_file, _alias_pairs(aliases, where))
