"""Pseudo-unseen validation's parts (vldus/synthesis/select.py) and the unseen-sets benchmark's
fixed draw; the selection end to end: tests/test_demo.py."""
import os
import sys

import numpy as np
import pytest

from vldus.config import Config
from vldus.data.shapes import CLASSES, DEFAULT_UNSEEN, attribute_matrix
from vldus.data.splits import Split
from vldus.errors import InputError
from vldus.synthesis import select

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def shapes_split() -> Split:
    return Split("shapes", tuple(CLASSES), DEFAULT_UNSEEN)


def test_drawn_pseudo_unseen_are_seen_classes_whose_attributes_stay_covered():
    split = shapes_split()
    att = attribute_matrix(CLASSES)
    val_labels = np.array([0] + split.seen_ids * 3)
    for seed in range(20):
        pick = select.draw_pseudo_unseen(split, att, val_labels, 3, seed)
        rest = [i for i in split.seen_ids if i not in pick]
        assert len(pick) == 3 and set(pick) <= set(split.seen_ids)
        assert (att[pick] <= att[rest].max(0)).all()
    assert select.draw_pseudo_unseen(split, att, val_labels, 3, 5) == select.draw_pseudo_unseen(split, att, val_labels, 3, 5)


def test_pseudo_unseen_need_validation_boxes_and_a_seen_class_left():
    split = shapes_split()
    att = attribute_matrix(CLASSES)
    only_two = np.array([0, split.seen_ids[0], split.seen_ids[1]])
    with pytest.raises(select.NoFold, match="2 seen classes have validation boxes"):
        select.draw_pseudo_unseen(split, att, only_two, 3, 0)
    with pytest.raises(select.NoFold, match="one to keep"):  # the calibration needs a seen class left
        select.draw_pseudo_unseen(split, att, only_two, 2, 0)
    assert len(select.draw_pseudo_unseen(split, att, only_two, 1, 0)) == 1
    assert select.pseudo_unseen_count(split, None) == 3  # 12 seen x 4/16
    with pytest.raises(InputError, match="needs 1 .. seen - 1"):
        select.pseudo_unseen_count(split, 12)


def test_dense_embeddings_have_no_coverage_rule():
    split = shapes_split()
    dense = np.random.default_rng(0).normal(size=(len(CLASSES) + 1, 5))
    pick = select.draw_pseudo_unseen(split, dense, np.array(split.seen_ids), 11, 0)
    assert len(pick) == 11


def test_candidate_grid_holds_the_default():
    cfg = Config()
    cfg.gan.epochs, cfg.unseen_classifier.syn_num = 20, 500
    grid = select.candidates(cfg)
    assert [(c.epochs, c.syn_num) for c in grid] == [(e, n) for e in (10, 15, 20) for n in (250, 500, 1000)]
    cfg.unseen_classifier.select_epochs, cfg.unseen_classifier.select_syn_num = [0.3], [3.0]
    assert select.default_candidate(cfg) in select.candidates(cfg) and len(select.candidates(cfg)) == 4


def test_ties_keep_the_default():
    default = {"n": "d", "s": 50.0}
    rows = [{"n": "a", "s": 50.0}, default, {"n": "b", "s": 49.0}]
    assert select.best(rows, lambda r: r["s"], default) is default
    rows.append({"n": "c", "s": 50.5})
    assert select.best(rows, lambda r: r["s"], default)["n"] == "c"
    assert select.best([{"s": None}], lambda r: r["s"], default) is default
    assert select.score({"zsd_map": 40.0, "gzsd_hm": None}) == 40.0
    assert select.score({"zsd_map": 40.0, "gzsd_hm": 50.0}) == 45.0


def test_unseen_sets_are_the_fixed_draw_and_spearman_is_right():
    import unseen_sets

    drawn = unseen_sets.draw_sets()
    assert [unseen_sets.SETS[f"set{k}"] for k in range(1, 6)] == drawn
    assert unseen_sets.SETS["default"] == DEFAULT_UNSEEN
    assert unseen_sets.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert unseen_sets.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert unseen_sets.spearman([1, 2, 3], [5, 5, 5]) is None
    assert unseen_sets.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
