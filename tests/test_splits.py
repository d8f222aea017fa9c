"""Built-in class splits against docs/design.md §9.3, and the image-selection rules of §2.3, §3, §9.2."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vldus.data.readers import select_test, select_training, select_unseen_only
from vldus.data.records import ImageRecord
from vldus.data.splits import BUILTIN_SPLITS, TEST_RULES, Split, load_split, normalize_name, split_from_names
from vldus.errors import InputError

# The standard 80-class COCO order (person = 1 ... toothbrush = 80), docs/design.md §9.3.
COCO_80 = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl "
    "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave "
    "oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()

SEEN_48 = (
    "person bicycle car motorcycle train truck boat bench bird horse sheep bear zebra giraffe "
    "backpack handbag suitcase frisbee skis kite surfboard bottle fork spoon bowl banana apple "
    "sandwich orange broccoli carrot pizza donut chair bed toilet tv laptop mouse remote microwave "
    "oven toaster refrigerator book clock vase toothbrush"
).split()

EXCLUDED_15 = (
    "baseball_bat baseball_glove cell_phone dining_table fire_hydrant hair_drier hot_dog "
    "parking_meter potted_plant sports_ball stop_sign teddy_bear tennis_racket traffic_light wine_glass"
).split()

VOC_ORDER = ("aeroplane bicycle bird boat bottle bus cat chair cow diningtable horse motorbike "
             "person pottedplant sheep tvmonitor car dog sofa train").split()

DIOR_ORDER = ("Expressway-Service-area Expressway-toll-station airplane airport baseballfield "
              "basketballcourt bridge chimney dam golffield groundtrackfield harbor overpass ship "
              "stadium storagetank tenniscourt trainstation vehicle windmill").split()


def norm(names):
    return [normalize_name(n) for n in names]


# ---------------------------------------------------------------------------------------------
# class lists (§9.3)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,order,unseen_ids,n_excluded", [
    ("coco_65_15", COCO_80, [5, 7, 13, 16, 22, 29, 30, 32, 43, 49, 53, 62, 65, 71, 79], 0),
    ("coco_48_17", COCO_80, [5, 6, 16, 17, 20, 21, 26, 28, 32, 37, 42, 44, 56, 58, 67, 72, 77], 15),
    ("voc_16_4", VOC_ORDER, [17, 18, 19, 20], 0),
    ("dior_16_4", DIOR_ORDER, [4, 6, 11, 20], 0),
])
def test_builtin_split_matches_spec(name, order, unseen_ids, n_excluded):
    split = load_split(name)
    assert norm(split.classes) == norm(order)
    assert split.unseen_ids == unseen_ids
    assert len(split.excluded_ids) == n_excluded
    assert len(split.seen_ids) == split.num_classes - len(unseen_ids) - n_excluded
    assert sorted(split.seen_ids + split.unseen_ids + split.excluded_ids) == list(range(1, split.num_classes + 1))
    for i in split.unseen_ids:
        assert split.group_of(i) == "unseen"


def test_every_builtin_split_is_tested():
    assert set(BUILTIN_SPLITS) == {"coco_65_15", "coco_48_17", "voc_16_4", "dior_16_4"}


def test_coco_48_17_seen_and_excluded_lists():
    split = load_split("coco_48_17")
    assert sorted(norm(split.seen)) == sorted(norm(SEEN_48)) and len(split.seen) == 48
    assert sorted(norm(split.excluded)) == sorted(norm(EXCLUDED_15))
    assert split.group_of(split.index("dining table")) == "excluded"


def test_unseen_ids_ascending_and_index_is_loose():
    split = load_split("coco_65_15")
    assert split.index("Hair-Drier") == split.index("hair_drier") == 79
    assert split.with_unseen(["toothbrush", "cat"]).unseen_ids == [16, 80]
    with pytest.raises(InputError, match="unknown class name 'unicorn'"):
        split.index("unicorn")


# ---------------------------------------------------------------------------------------------
# image selection (§2.3, §3, §9.2) on hand-made records
# ---------------------------------------------------------------------------------------------
def rec(labels, ignore=None, side=100, image_id=1):
    n = len(labels)
    boxes = np.tile(np.array([[1, 2, 30, 40]], np.float32), (n, 1)) + np.arange(n, dtype=np.float32)[:, None]
    return ImageRecord(image_id, f"{image_id}.jpg", side, side + 10, boxes, labels,
                       [False] * n if ignore is None else ignore)


# COCO 65/15: person 1, car 3 seen; airplane 5, train 7 unseen.
# COCO 48/17: person 1 seen, bus 6 unseen, dining table 61 excluded.
# VOC 16/4: person 13 seen; car 17, dog 18 unseen.
TRAINING = [
    ("coco_65_15", [1, 3], None, 100, True),
    ("coco_65_15", [1, 5], None, 100, False),  # an unseen object disqualifies the image
    ("coco_65_15", [1, 5], [False, True], 100, False),  # ... even as a crowd / difficult box
    ("coco_65_15", [1, 3], [False, True], 100, True),  # seen ignore boxes stay, as ignore
    ("coco_65_15", [], None, 100, False),  # no annotations
    ("coco_65_15", [1], None, 31, False),  # a side < min_side (32)
    ("coco_65_15", [1], None, 32, True),
    ("coco_48_17", [1, 61], None, 100, False),  # an excluded class disqualifies too
    ("coco_48_17", [1, 6], None, 100, False),
    ("voc_16_4", [13, 13], None, 100, True),
    ("voc_16_4", [13, 17], None, 100, False),
]


@pytest.mark.parametrize("split_name,labels,ignore,side,kept", TRAINING)
def test_select_training(split_name, labels, ignore, side, kept):
    split = load_split(split_name)
    r = rec(labels, ignore, side)
    out = select_training([r], split, min_side=32)
    assert (len(out) == 1) == kept
    if kept:  # unchanged record, ignore flags included
        assert out[0].labels.tolist() == labels and out[0].ignore.tolist() == r.ignore.tolist()
        np.testing.assert_array_equal(out[0].boxes, r.boxes)


TEST = [  # split, setting, rule, labels, annotations kept (None = image dropped)
    ("coco_65_15", "zsd", "coco", [1, 5, 3, 7], [5, 7]),  # >= 1 unseen; only unseen evaluated
    ("coco_65_15", "zsd", "coco", [1, 3], None),
    ("coco_65_15", "zsd", "coco", [], None),
    ("coco_65_15", "gzsd", "coco", [1, 5, 3], [1, 5, 3]),  # same images, all annotations
    ("coco_65_15", "gzsd", "coco", [1, 3], None),
    ("coco_48_17", "zsd", "coco", [1, 6, 61], [6]),
    ("coco_48_17", "gzsd", "coco", [1, 6, 61], [1, 6]),  # excluded classes never evaluated
    ("coco_48_17", "gzsd", "coco", [1, 61], None),
    ("coco_48_17", "zsd", "coco", [61], None),
    ("voc_16_4", "zsd", "voc", [17, 18], [17, 18]),  # only unseen objects
    ("voc_16_4", "zsd", "voc", [13, 17], None),  # a seen object disqualifies
    ("voc_16_4", "gzsd", "voc", [13, 17], [13, 17]),  # >= 1 unseen, all annotations
    ("voc_16_4", "gzsd", "voc", [13], None),
    ("voc_16_4", "zsd", "coco", [13, 17], [17]),  # the coco rule on VOC labels
    ("dior_16_4", "zsd", "voc", [4, 20], [4, 20]),
    ("dior_16_4", "zsd", "voc", [3, 20], None),
]


@pytest.mark.parametrize("split_name,setting,rule,labels,kept", TEST)
def test_select_test(split_name, setting, rule, labels, kept):
    split = load_split(split_name)
    r = rec(labels)
    out = select_test([r], split, setting, rule)
    if kept is None:
        assert out == []
        return
    (s,) = out
    assert s.labels.tolist() == kept
    keep = [lab in kept for lab in labels]
    np.testing.assert_array_equal(s.boxes, r.boxes[keep])  # boxes travel with their labels
    assert len(r) == len(labels)  # the input record is not modified


def test_select_test_keeps_ignore_flags_and_rejects_bad_settings():
    split = load_split("coco_65_15")
    (s,) = select_test([rec([1, 5, 7], [True, True, False])], split, "zsd", "coco")
    assert s.labels.tolist() == [5, 7] and s.ignore.tolist() == [True, False]
    with pytest.raises(ValueError, match="setting"):
        select_test([rec([5])], split, "gzs", "coco")
    with pytest.raises(ValueError, match="rule"):
        select_test([rec([5])], split, "zsd", "lvis")
    with pytest.raises(ValueError, match="setting"):
        split.keep_for_test(np.array([5]), "both", "coco")


@pytest.mark.parametrize("split_name,labels,kept", [
    ("coco_65_15", [5, 7, 5], True),
    ("coco_65_15", [1, 5], False),
    ("coco_65_15", [], False),
    ("coco_48_17", [6, 61], False),  # an excluded object is not unseen
    ("voc_16_4", [17, 20], True),
    ("voc_16_4", [13, 20], False),
])
def test_select_unseen_only(split_name, labels, kept):
    out = select_unseen_only([rec(labels)], load_split(split_name))
    assert (len(out) == 1) == kept
    if kept:
        assert out[0].labels.tolist() == labels


def test_selection_keeps_order_over_many_records():
    split = split_from_names("toy", ["a", "b", "c"], ["c"])
    records = [rec(labels, image_id=i) for i, labels in enumerate([[1], [3], [1, 3], [2, 2], []])]
    assert [r.image_id for r in select_training(records, split, 1)] == [0, 3]
    assert [r.image_id for r in select_test(records, split, "zsd", "voc")] == [1]
    assert [r.image_id for r in select_test(records, split, "gzsd", "voc")] == [1, 2]
    assert [r.image_id for r in select_unseen_only(records, split)] == [1]


# ---------------------------------------------------------------------------------------------
# the 'all' test rule: unseen objects never share an image with seen ones
# ---------------------------------------------------------------------------------------------
ALL_RULE = [  # COCO 48/17: person 1 seen, bus 6 unseen, dining table 61 excluded
    ("zsd", [6], [6]),
    ("zsd", [1, 6], [6]),  # as 'coco'
    ("zsd", [1], None),
    ("gzsd", [1], [1]),  # a seen-only image is a GZSD test image too
    ("gzsd", [6], [6]),
    ("gzsd", [1, 61], [1]),
    ("gzsd", [61], None),  # only excluded objects
    ("gzsd", [], None),
    ("zsd", [], None),
]


@pytest.mark.parametrize("setting,labels,kept", ALL_RULE)
def test_select_test_rule_all(setting, labels, kept):
    out = select_test([rec(labels)], load_split("coco_48_17"), setting, "all")
    assert (None if not out else out[0].labels.tolist()) == kept


def test_test_rules_listed():
    assert TEST_RULES == ("coco", "voc", "all")
    with pytest.raises(ValueError, match="unknown test rule 'lvis'"):
        load_split("voc_16_4").keep_for_test(np.array([17]), "zsd", "lvis")


# ---------------------------------------------------------------------------------------------
# class aliases (vldus prepare --rename bowk=bowl)
# ---------------------------------------------------------------------------------------------
def kitchen(**kw):
    return Split("kitchen", ("cup", "bowl", "spoon"), ("spoon",), aliases=(("bowk", "bowl"), ("Tea-Cup", "cup")), **kw)


def test_alias_counts_as_its_class():
    split = kitchen()
    assert split.index("bowk") == split.index("Bowl") == 2 and split.index("teacup") == 1
    assert split.ids(["BOWK", "spoon"]) == [2, 3]
    moved = split.with_unseen(["bowk"])
    assert moved.unseen == ("bowl",) and moved.aliases == split.aliases and moved.unseen_ids == [2]
    with pytest.raises(InputError, match="unknown class name 'plate'"):
        split.index("plate")
    # an alias in the unseen / excluded list means its class
    s1 = Split("k", ("cup", "bowl", "spoon", "fork"), ("bowk",), ("Tea Cup",), aliases={"bowk": "bowl", "teacup": "cup"})
    assert (s1.unseen, s1.excluded, s1.seen, s1.unseen_ids) == (("bowl",), ("cup",), ("spoon", "fork"), [2])
    s2 = split_from_names("k", ["cup", "bowl", "spoon"], ["bowk"], aliases={"bowk": "bowl"})
    assert s2.unseen == ("bowl",) and s2.seen == ("cup", "spoon") and s2.aliases == (("bowk", "bowl"),)


@pytest.mark.parametrize("aliases,message", [
    ((("bowk", "plate"),), "alias 'bowk': its class 'plate' is not in 'classes'"),
    ((("Bowl", "cup"),), "alias 'Bowl': is a class name itself"),
    ((("bowk", "bowl"), ("BOWK", "cup")), "alias 'BOWK': stands for both 'bowl' and 'cup'"),
    ((("bowk", 3),), "'aliases': 'bowk': 3: alias and class must be non-empty strings"),
])
def test_bad_aliases(aliases, message):
    with pytest.raises(InputError) as e:
        Split("kitchen", ("cup", "bowl", "spoon"), ("spoon",), aliases=aliases, source_file="k.json")
    assert str(e.value) == f"k.json: {message}"


def test_aliases_round_trip_through_the_split_json(tmp_path):
    split = kitchen(source_file="")
    d = split.to_json()
    assert d["aliases"] == {"bowk": "bowl", "Tea-Cup": "cup"}
    (tmp_path / "k.json").write_text(json.dumps(d))
    again = load_split(str(tmp_path / "k.json"))
    assert again == split and again.index("bowk") == 2
    assert "aliases" not in load_split("voc_16_4").to_json()  # written only when there are some
    d["aliases"] = ["bowk"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"bad\.json: 'aliases': expected an object"):
        load_split(str(tmp_path / "bad.json"))
    d["aliases"] = {"bowk": "plate"}
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"bad\.json: alias 'bowk': its class 'plate' is not in 'classes'"):
        load_split(str(tmp_path / "bad.json"))
