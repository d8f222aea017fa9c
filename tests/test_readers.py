"""Dataset readers: COCO/shapes JSON, VOC and DIOR XML trees written here, plus the real
Pascal-VOC annotations shipped inside the ``deepforest`` package; every bad-input case."""
from __future__ import annotations

import importlib.util
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from vldus.config import DataSource
from vldus.data.readers import (coco_category_ids, dataset_class_names, load_records,
                                load_records_all_classes, records_to_coco)
from vldus.data.splits import load_split, split_from_names
from vldus.errors import InputError

COCO = load_split("coco_65_15")
VOC = load_split("voc_16_4")
DIOR = load_split("dior_16_4")


# ---------------------------------------------------------------------------------------------
# fixture writers
# ---------------------------------------------------------------------------------------------
def touch(path, size=None):
    """An image file: empty bytes (readers only stat it) or a real PNG of ``size`` (w, h)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if size is None:
        open(path, "wb").close()
    else:
        Image.new("RGB", size).save(path, format="PNG")


def coco_dict():
    """Two images; categories named as in COCO json ('hair drier'), ids not 1..C."""
    return {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 9, "file_name": "sub/b.jpg", "width": 50, "height": 40},
                   {"id": 11, "file_name": "c.jpg", "width": 60, "height": 60}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 89, "bbox": [0, 0, 100, 80], "iscrowd": 1},
            {"id": 3, "image_id": 9, "category_id": 1, "bbox": [1.5, 2.5, 10, 5]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"},
                       {"id": 89, "name": "hair drier"}],
    }


def write_coco(tmp_path, data=None, images=True):
    data = coco_dict() if data is None else data
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    if images:
        for img in data["images"]:
            touch(str(tmp_path / "img" / img["file_name"]))
    return DataSource(format="coco", ann_file=str(ann), img_dir=str(tmp_path / "img"))


def voc_xml(objects, size=(100, 80), filename=None):
    """VOC annotation text; objects = (name, (xmin, ymin, xmax, ymax), difficult)."""
    parts = ["<annotation>"]
    if filename:
        parts.append(f"<filename>{filename}</filename>")
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
                     f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc_root(root, items, list_name="train.txt", ann_dir="Annotations", img_dir="JPEGImages"):
    """items: {file id: xml text}; writes XML, an empty .jpg per id and the list file."""
    for file_id, xml in items.items():
        os.makedirs(root / ann_dir, exist_ok=True)
        (root / ann_dir / f"{file_id}.xml").write_text(xml)
        touch(str(root / img_dir / f"{file_id}.jpg"))
    os.makedirs(root / "ImageSets" / "Main", exist_ok=True)
    (root / "ImageSets" / "Main" / list_name).write_text("".join(f"{i}\n" for i in items))
    return root


def voc_source(*roots, list_name="train.txt", fmt="voc"):
    return DataSource(format=fmt, roots=[str(r) for r in roots], list_file=f"ImageSets/Main/{list_name}")


# ---------------------------------------------------------------------------------------------
# COCO / shapes
# ---------------------------------------------------------------------------------------------
def test_coco_boxes_labels_crowd_and_empty_images(tmp_path):
    src = write_coco(tmp_path)
    recs = load_records(src, COCO)
    assert [r.image_id for r in recs] == [7, 9, 11]  # file order, image without annotations kept
    a, b, c = recs
    assert a.path == str(tmp_path / "img" / "a.jpg") and (a.width, a.height) == (100, 80)
    np.testing.assert_allclose(a.boxes, [[10, 20, 40, 60], [0, 0, 100, 80]])
    assert a.labels.tolist() == [COCO.index("airplane"), COCO.index("hair_drier")] == [5, 79]
    assert a.ignore.tolist() == [False, True]
    np.testing.assert_allclose(b.boxes, [[1.5, 2.5, 11.5, 7.5]])
    assert b.labels.tolist() == [1] and b.boxes.dtype == np.float32 and b.labels.dtype == np.int64
    assert len(c) == 0 and c.boxes.shape == (0, 4)


def test_shapes_format_uses_the_coco_reader(tmp_path):
    data = {"images": [{"id": 1, "file_name": "0001.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [4, 4, 8, 8]}],
            "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"},
                           {"id": 3, "name": "green star"}]}
    src = write_coco(tmp_path, data)
    src.format = "shapes"
    split = split_from_names("shapes", ["red circle", "blue square", "green star"], ["green star"])
    (rec,) = load_records(src, split)
    assert rec.labels.tolist() == [2]
    assert coco_category_ids(src, split) == [1, 2, 3]


def test_coco_size_read_from_image_header_when_missing(tmp_path):
    data = coco_dict()
    del data["images"][0]["width"], data["images"][0]["height"]
    src = write_coco(tmp_path, data)
    touch(str(tmp_path / "img" / "a.jpg"), size=(123, 45))  # a real PNG under a .jpg name
    rec = load_records(src, COCO)[0]
    assert (rec.width, rec.height) == (123, 45)


def test_coco_category_ids_follow_detector_order(tmp_path):
    src = write_coco(tmp_path)
    split = split_from_names("three", ["hair_drier", "person", "airplane"], ["airplane"])
    assert coco_category_ids(src, split) == [89, 1, 5]
    assert coco_category_ids(voc_source(tmp_path), VOC) == list(range(1, 21))
    assert coco_category_ids(DataSource(format="shapes"), split) == [1, 2, 3]
    with pytest.raises(InputError, match=r"instances\.json: class 'bicycle' of split coco_65_15"):
        coco_category_ids(src, COCO)


def test_records_to_coco_round_trip(tmp_path):
    src = write_coco(tmp_path)
    split = split_from_names("three", ["person", "airplane", "hair drier"], ["airplane"])
    recs = load_records(src, split)
    gt = records_to_coco(recs, split, coco_category_ids(src, split))
    assert [c["id"] for c in gt["categories"]] == [1, 5, 89]
    assert gt["annotations"][0]["bbox"] == [10, 20, 30, 40] and gt["annotations"][0]["area"] == 1200
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1, 0]
    for img in gt["images"]:  # file_name is the full path: point img_dir at the root to re-read
        img["file_name"] = os.path.relpath(img["file_name"], tmp_path / "img")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    again = load_records(DataSource(format="coco", ann_file=str(tmp_path / "gt.json"),
                                    img_dir=str(tmp_path / "img")), split)
    for r, s in zip(recs, again):
        assert r.image_id == s.image_id and (r.width, r.height) == (s.width, s.height)
        np.testing.assert_allclose(r.boxes, s.boxes)
        assert r.labels.tolist() == s.labels.tolist() and r.ignore.tolist() == s.ignore.tolist()


@pytest.mark.parametrize("bbox,clipped", [
    ([-0.5, 0, 10, 10], [0, 0, 9.5, 10]),  # within the 1 px tolerance: clipped
    ([95, 75, 5.8, 5.9], [95, 75, 100, 80]),
])
def test_boxes_within_tolerance_are_clipped(tmp_path, bbox, clipped):
    data = coco_dict()
    data["annotations"] = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": bbox}]
    rec = load_records(write_coco(tmp_path, data), COCO)[0]
    np.testing.assert_allclose(rec.boxes, [clipped], atol=1e-5)


@pytest.mark.parametrize("bbox,problem", [
    ([10, 10, 0, 5], "width or height < 1 px"),
    ([10, 10, 5, -3], "width or height < 1 px"),
    ([10, 10, 0.4, 5], "width or height < 1 px"),
    ([-3, 10, 5, 5], "outside the 100x80 image"),
    ([90, 10, 20, 5], "outside the 100x80 image"),
])
def test_degenerate_boxes_coco_drops_with_one_counted_warning(tmp_path, caplog, bbox, problem):
    data = coco_dict()
    data["annotations"][0]["bbox"] = bbox
    data["annotations"].append({"id": 4, "image_id": 7, "category_id": 1, "bbox": bbox})
    src = write_coco(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="vldus.data.readers"):
        recs = load_records(src, COCO)
    assert recs[0].labels.tolist() == [79]  # both degenerate boxes dropped, the crowd box kept
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 2 degenerate box(es)" in warnings[0].getMessage()
    assert problem in warnings[0].getMessage()
    with pytest.raises(InputError) as e:  # the strict policy, and the default of 'shapes'
        load_records(src, COCO, drop_degenerate=False)
    assert str(e.value) .startswith(f"{src.ann_file}: image 7 annotation 1: box") and problem in str(e.value)
    src.format = "shapes"
    with pytest.raises(InputError, match="image 7 annotation 1"):
        load_records(src, COCO)


def _set(data, path, value):
    """data[path[0]][path[1]]... = value."""
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@pytest.mark.parametrize("edit,message", [
    (("annotations", 0, "category_id", 3), "annotation 1: category_id 3 is not in 'categories'"),
    (("categories", 0, "name", "unicorn"), "annotation 3: category 1 'unicorn' is not a class of split coco_65_15"),
    (("annotations", 2, "bbox", [1, 2, 3]), "annotation 3: 'bbox' must be 4 numbers"),
    (("annotations", 2, "bbox", [1, 2, "3", 4]), "annotation 3: 'bbox' must be 4 numbers"),
    (("annotations", 1, "image_id", 99), "annotation 2: image_id 99 is not in 'images'"),
    (("annotations", 1, "id", 1), "annotation 1: duplicate id"),
    (("images", 1, "id", 7), "image 7: duplicate id"),
    (("images", 0, "file_name", None), "image 7: needs a string 'file_name'"),
    (("categories", 1, "id", "5"), "categories[1]: needs an integer 'id'"),
    (("annotations", []), None),  # valid: no annotations at all
])
def test_coco_bad_items_name_file_and_item(tmp_path, edit, message):
    data = coco_dict()
    _set(data, edit[:-1], edit[-1])
    src = write_coco(tmp_path, data, images=False)
    for img in coco_dict()["images"]:
        touch(str(tmp_path / "img" / img["file_name"]))
    if message is None:
        assert sum(len(r) for r in load_records(src, COCO)) == 0
        return
    with pytest.raises(InputError) as e:
        load_records(src, COCO)
    assert str(e.value) == f"{src.ann_file}: {message}" or str(e.value).startswith(f"{src.ann_file}: {message}")
    assert "\n" not in str(e.value)


def test_coco_missing_image_names_the_path(tmp_path):
    src = write_coco(tmp_path)
    os.remove(tmp_path / "img" / "sub" / "b.jpg")
    with pytest.raises(InputError) as e:
        load_records(src, COCO)
    assert str(e.value) == f"{src.ann_file}: image 9: image file not found: {tmp_path / 'img' / 'sub' / 'b.jpg'}"


@pytest.mark.parametrize("text,message", [
    ('{"images": [', "line 1 column 13: malformed JSON"),
    ("[1, 2]", "top level: expected a JSON object"),
    ('{"images": {}, "categories": []}', "'images': expected a list"),
    ('{"images": []}', "'categories': missing"),
])
def test_coco_malformed_json_names_the_file(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    src = DataSource(format="coco", ann_file=str(tmp_path / "bad.json"), img_dir=str(tmp_path))
    with pytest.raises(InputError) as e:
        load_records(src, COCO)
    assert str(e.value).startswith(f"{tmp_path / 'bad.json'}: {message}")


def test_missing_annotation_file_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match=r"nope\.json: annotation file not found"):
        load_records(DataSource(format="coco", ann_file=str(tmp_path / "nope.json")), COCO)
    with pytest.raises(InputError, match="unknown format 'lvis'"):
        load_records(DataSource(format="lvis"), COCO)


# ---------------------------------------------------------------------------------------------
# PASCAL VOC
# ---------------------------------------------------------------------------------------------
def test_voc_two_roots_pixel_convention_difficult_and_class_order(tmp_path):
    v07 = write_voc_root(tmp_path / "VOC2007", {
        "000005": voc_xml([("car", (1, 1, 10, 20), 0), ("person", (5, 6, 100, 80), 1)]),
        "000007": voc_xml([("sofa", (3, 4, 3, 4), 0)], size=(40, 30)),
    })
    v12 = write_voc_root(tmp_path / "VOC2012", {"2008_000123": voc_xml([("tvmonitor", (2, 2, 9, 9), 0)])})
    recs = load_records(voc_source(v07, v12), VOC)
    assert [r.image_id for r in recs] == [5, 7, 2008000123]
    a, b, c = recs
    assert a.path == str(v07 / "JPEGImages" / "000005.jpg")
    # 1-based inclusive xmin..xmax -> continuous [xmin - 1, xmax): width xmax - xmin + 1
    np.testing.assert_allclose(a.boxes, [[0, 0, 10, 20], [4, 5, 100, 80]])
    assert a.labels.tolist() == [17, 13] and a.ignore.tolist() == [False, True]
    np.testing.assert_allclose(b.boxes, [[2, 3, 3, 4]])  # a one-pixel object is 1x1, not empty
    assert (b.width, b.height) == (40, 30) and b.labels.tolist() == [19]
    assert c.labels.tolist() == [16] and c.path.endswith(os.path.join("VOC2012", "JPEGImages", "2008_000123.jpg"))


def test_voc_size_from_header_and_image_found_by_id_with_any_extension(tmp_path):
    root = tmp_path / "VOC"
    write_voc_root(root, {"x1": voc_xml([("dog", (1, 1, 5, 5), 0)], size=None, filename="frame_0042.jpg")})
    os.remove(root / "JPEGImages" / "x1.jpg")
    touch(str(root / "JPEGImages" / "x1.png"), size=(33, 22))
    touch(str(root / "JPEGImages" / "frame_0042.jpg"), size=(10, 10))  # the XML's <filename>: not used
    (rec,) = load_records(voc_source(root), VOC)
    assert rec.path == str(root / "JPEGImages" / "x1.png") and (rec.width, rec.height) == (33, 22)


def test_voc_pairs_by_id_jpg_first_and_any_case(tmp_path):
    root = write_voc_root(tmp_path / "VOC", {"a": voc_xml([]), "b": voc_xml([]), "c": voc_xml([])})
    touch(str(root / "JPEGImages" / "a.png"))  # a.jpg exists too: .jpg first
    os.remove(root / "JPEGImages" / "b.jpg")
    touch(str(root / "JPEGImages" / "b.TIF"))
    os.remove(root / "JPEGImages" / "c.jpg")
    touch(str(root / "JPEGImages" / "c.webp"))
    recs = load_records(voc_source(root), VOC)
    assert [os.path.basename(r.path) for r in recs] == ["a.jpg", "b.TIF", "c.webp"]


def test_voc_never_pairs_by_the_xml_filename(tmp_path):
    """GTEA Gaze+ XMLs name the source video frame in <filename>: only <id>.<ext> counts."""
    root = write_voc_root(tmp_path / "VOC", {"0001": voc_xml([("dog", (1, 1, 5, 5), 0)], filename="P01_frame_0931.jpg")})
    os.remove(root / "JPEGImages" / "0001.jpg")
    touch(str(root / "JPEGImages" / "P01_frame_0931.jpg"))
    with pytest.raises(InputError) as e:
        load_records(voc_source(root), VOC)
    assert str(e.value) == (f"{root / 'Annotations' / '0001.xml'}: image 0001: image file not found: 0001.jpg "
                            f"(or .jpeg, .png, .bmp, .webp, .tif, .tiff) in {root / 'JPEGImages'}")


def test_voc_list_ids_take_the_first_token_and_non_numeric_ids_count(tmp_path):
    root = write_voc_root(tmp_path / "VOC", {"a": voc_xml([]), "b": voc_xml([("cat", (1, 1, 4, 4), 0)])})
    (root / "ImageSets" / "Main" / "train.txt").write_text("a  1\n\nb -1\n")
    recs = load_records(voc_source(root), VOC)
    assert [r.image_id for r in recs] == [1, 2] and [len(r) for r in recs] == [0, 1]


def test_voc_degenerate_box_error_or_counted_drop(tmp_path, caplog):
    root = write_voc_root(tmp_path / "VOC", {
        "000001": voc_xml([("cat", (10, 10, 5, 20), 0), ("dog", (1, 1, 5, 5), 0)]),
        "000002": voc_xml([("cat", (1, 1, 150, 20), 0)]),
    })
    xml = root / "Annotations" / "000001.xml"
    with pytest.raises(InputError) as e:
        load_records(voc_source(root), VOC)
    assert str(e.value).startswith(f"{xml}: image 000001 object 1 ('cat'): box xyxy [9, 9, 5, 20] has width or height")
    with caplog.at_level(logging.WARNING, logger="vldus.data.readers"):
        recs = load_records(voc_source(root), VOC, drop_degenerate=True)
    assert [r.labels.tolist() for r in recs] == [[18], []]
    (w,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "dropped 2 degenerate box(es)" in w.getMessage()


SIZE = "<size><width>10</width><height>10</height></size>"


@pytest.mark.parametrize("xml,message", [
    ("<annotation><object>", "malformed XML"),
    (voc_xml([("unicorn", (1, 1, 5, 5), 0)]), "object 1 ('unicorn'): class 'unicorn' is not in split voc_16_4"),
    (voc_xml([("cat", (1, 1, 5, 5), 0), ("cat", (1, "x", 5, 5), 0)]), "object 2 ('cat'): <ymin> must be a number, got 'x'"),
    (f"<annotation>{SIZE}<object><name>cat</name></object></annotation>", "object 1 ('cat'): no <bndbox>"),
    (f"<annotation>{SIZE}<object><bndbox/></object></annotation>", "object 1: no <name>"),
    (voc_xml([("cat", (1, 1, 5, 5), 0)], size=None), "no image size in the annotation and cannot read the header"),
])
def test_voc_bad_xml_names_file_and_object(tmp_path, xml, message):
    root = write_voc_root(tmp_path / "VOC", {"000001": xml})
    with pytest.raises(InputError) as e:
        load_records(voc_source(root), VOC)
    assert str(e.value).startswith(f"{root / 'Annotations' / '000001.xml'}: {message}")


def test_voc_missing_files_are_named(tmp_path):
    root = write_voc_root(tmp_path / "VOC", {"000001": voc_xml([]), "000002": voc_xml([])})
    os.remove(root / "JPEGImages" / "000002.jpg")
    with pytest.raises(InputError) as e:
        load_records(voc_source(root), VOC)
    assert str(e.value) == (f"{root / 'Annotations' / '000002.xml'}: image 000002: image file not found: "
                            f"000002.jpg (or .jpeg, .png, .bmp, .webp, .tif, .tiff) in {root / 'JPEGImages'}")
    os.remove(root / "Annotations" / "000001.xml")
    with pytest.raises(InputError) as e:
        load_records(voc_source(root), VOC)
    assert str(e.value) == (f"{root / 'ImageSets' / 'Main' / 'train.txt'}: image 000001: annotation file "
                            f"not found: {root / 'Annotations' / '000001.xml'}")
    with pytest.raises(InputError, match=r"test\.txt: image list not found"):
        load_records(voc_source(root, list_name="test.txt"), VOC)
    with pytest.raises(InputError, match=r"VOC2099: dataset folder not found"):
        load_records(voc_source(tmp_path / "VOC2099"), VOC)
    (root / "ImageSets" / "Main" / "dup.txt").write_text("000002\n000002\n")
    with pytest.raises(InputError, match=r"dup\.txt: image 000002: listed twice"):
        load_records(voc_source(root, list_name="dup.txt"), VOC)


# ---------------------------------------------------------------------------------------------
# DIOR
# ---------------------------------------------------------------------------------------------
def test_dior_layout_both_image_folders_and_loose_names(tmp_path):
    root = tmp_path / "DIOR"
    hbb = os.path.join("Annotations", "Horizontal Bounding Boxes")
    write_voc_root(root, {"00001": voc_xml([("Expressway-Service-area", (1, 1, 50, 50), 0),
                                            ("windmill", (10, 10, 20, 30), 0)], size=(800, 800))},
                   ann_dir=hbb, img_dir="JPEGImages-trainval", list_name="train.txt")
    write_voc_root(root, {"11726": voc_xml([("expressway toll station", (1, 1, 5, 5), 0),
                                            ("groundtrackfield", (100, 100, 400, 300), 1)], size=(800, 800))},
                   ann_dir="Annotations", img_dir="JPEGImages-test", list_name="test.txt")
    (train,) = load_records(voc_source(root, list_name="train.txt", fmt="dior"), DIOR)
    (test,) = load_records(voc_source(root, list_name="test.txt", fmt="dior"), DIOR)
    assert train.path == str(root / "JPEGImages-trainval" / "00001.jpg") and train.image_id == 1
    assert train.labels.tolist() == [1, 20]
    assert test.path == str(root / "JPEGImages-test" / "11726.jpg") and test.image_id == 11726
    assert test.labels.tolist() == [2, 11] and test.ignore.tolist() == [False, True]
    assert DIOR.unseen_ids == [4, 6, 11, 20]
    # a voc source does not look into the DIOR folders
    with pytest.raises(InputError, match="annotation file not found"):
        load_records(voc_source(root, list_name="train.txt"), DIOR)


def test_dior_plain_jpegimages_folder(tmp_path):
    root = write_voc_root(tmp_path / "DIOR", {"00002": voc_xml([("vehicle", (1, 1, 9, 9), 0)])})
    (rec,) = load_records(voc_source(root, fmt="dior"), DIOR)
    assert rec.path == str(root / "JPEGImages" / "00002.jpg") and rec.labels.tolist() == [19]


# ---------------------------------------------------------------------------------------------
# real annotations: the Pascal-VOC files shipped with the deepforest package
# ---------------------------------------------------------------------------------------------
def deepforest_data():
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepforest package not installed (pip install --no-deps deepforest)")
    return os.path.join(spec.submodule_search_locations[0], "data")


DEEPFOREST_XML = ["2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop",
                  "OSBS_029", "SOAP_061"]


def deepforest_tree(tmp_path):
    """A VOC tree of links to the package's files (its images are .png/.tif: found by id)."""
    data = deepforest_data()
    root = tmp_path / "deepforest"
    os.makedirs(root / "Annotations")
    os.makedirs(root / "JPEGImages")
    os.makedirs(root / "ImageSets" / "Main")
    for name in DEEPFOREST_XML:
        os.symlink(os.path.join(data, name + ".xml"), root / "Annotations" / f"{name}.xml")
    for name in os.listdir(data):  # OSBS_029 is there as .png and .tif: link the .tif, the annotated one
        if name.lower().endswith((".png", ".tif")) and name != "OSBS_029.png":
            os.symlink(os.path.join(data, name), root / "JPEGImages" / name)
    (root / "ImageSets" / "Main" / "all.txt").write_text("\n".join(DEEPFOREST_XML) + "\n")
    return root


def test_deepforest_real_annotations(tmp_path):
    root = deepforest_tree(tmp_path)
    split = split_from_names("deepforest", ["Tree", "Alive", "Dead"], ["Dead"])
    recs = load_records(voc_source(root, list_name="all.txt"), split)
    assert len(recs) == 4 and sum(len(r) for r in recs) == 951
    counts = np.bincount(np.concatenate([r.labels for r in recs]), minlength=4)
    assert counts.tolist() == [0, 914, 9, 28]
    assert len({r.image_id for r in recs}) == 4
    for r in recs:
        with Image.open(r.path) as im:
            assert im.size == (r.width, r.height)  # the XML <size> agrees with the image
        assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 3] > r.boxes[:, 1]).all()
        assert r.boxes.min() >= 0 and (r.boxes[:, 2] <= r.width).all() and (r.boxes[:, 3] <= r.height).all()
        assert not r.ignore.any()
    assert recs[2].path.endswith("OSBS_029.tif")  # found by id: <id>.tif


def test_deepforest_class_outside_the_split_is_named(tmp_path):
    root = deepforest_tree(tmp_path)
    split = split_from_names("trees", ["Tree", "Shrub"], ["Shrub"])  # a split needs seen and unseen
    with pytest.raises(InputError) as e:
        load_records(voc_source(root, list_name="all.txt"), split)
    assert str(e.value) == f"{root / 'Annotations' / 'SOAP_061.xml'}: object 1 ('Dead'): class 'Dead' is not in split trees"


# ---------------------------------------------------------------------------------------------
# list_file for COCO, aliases, class names before a split exists (vldus prepare)
# ---------------------------------------------------------------------------------------------
def test_coco_list_file_keeps_listed_file_names(tmp_path):
    src = write_coco(tmp_path)
    os.remove(tmp_path / "img" / "a.jpg")  # not listed: never looked for
    (tmp_path / "keep.txt").write_text("c.jpg\n\nsub/b.jpg\n")
    src.list_file = str(tmp_path / "keep.txt")
    assert [r.image_id for r in load_records(src, COCO)] == [9, 11]  # JSON order
    (tmp_path / "keep.txt").write_text("c.jpg\nsub/x.jpg\n")
    with pytest.raises(InputError) as e:
        load_records(src, COCO)
    assert str(e.value) == f"{tmp_path / 'keep.txt'}: line 2: 'sub/x.jpg' is not an image of {src.ann_file}"


def test_coco_aliases_map_categories_to_their_class(tmp_path):
    data = coco_dict()
    data["categories"][1]["name"] = "aeroplane"  # the data's spelling of 'airplane'
    src = write_coco(tmp_path, data)
    split = split_from_names("three", ["person", "airplane", "hair drier"], ["airplane"],
                             aliases={"aeroplane": "airplane"})
    assert load_records(src, split)[0].labels.tolist() == [2, 3]
    assert coco_category_ids(src, split) == [1, 5, 89]
    with pytest.raises(InputError, match="category 5 'aeroplane' is not a class of split three"):
        load_records(src, split_from_names("three", ["person", "airplane", "hair drier"], ["airplane"]))


def test_dataset_class_names_and_records_coco(tmp_path):
    data = coco_dict()
    data["categories"].append({"id": 90, "name": "Hair_Drier"})  # the same class, loosely
    src = write_coco(tmp_path, data)
    assert dataset_class_names(src) == ["person", "airplane", "hair drier"]
    recs, names = load_records_all_classes(src)
    assert names == ["person", "airplane", "hair drier"]
    assert [r.labels.tolist() for r in recs] == [[2, 3], [1], []]


def test_dataset_class_names_and_records_yolo(tmp_path):
    root = tmp_path / "ds"
    touch(str(root / "train" / "images" / "a.jpg"), size=(20, 10))
    os.makedirs(root / "train" / "labels")
    (root / "train" / "labels" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n0 0.5 0.5 1 1\n")
    (root / "data.yaml").write_text("names: {1: cup, 0: bowk}\ntrain: ../train/images\n")  # index order counts
    src = DataSource(format="yolo", ann_file=str(root / "data.yaml"), subset="train")
    assert dataset_class_names(src) == ["bowk", "cup"]
    (rec,), names = load_records_all_classes(src)  # one class per name is enough: no unseen needed
    assert names == ["bowk", "cup"] and rec.labels.tolist() == [2, 1]


def test_dataset_class_names_and_records_voc_first_appearance(tmp_path):
    root = write_voc_root(tmp_path / "VOC", {
        "1": voc_xml([("Mug", (1, 1, 5, 5), 0), ("pan", (1, 1, 5, 5), 1)]),
        "2": voc_xml([]),
        "3": voc_xml([("lid", (1, 1, 5, 5), 0), ("mug", (2, 2, 5, 5), 0), ("Pan", (1, 1, 9, 9), 0)]),
    })
    write_voc_root(root, {"4": voc_xml([("fork", (1, 1, 5, 5), 0)])}, list_name="other.txt")
    src = voc_source(root)
    assert dataset_class_names(src) == ["Mug", "pan", "lid"]  # 'fork' is not listed in train.txt
    recs, names = load_records_all_classes(src)
    assert [r.labels.tolist() for r in recs] == [[1, 2], [], [3, 1, 2]]
    assert recs[0].ignore.tolist() == [False, True]
    (rec,), names = load_records_all_classes(voc_source(root, list_name="other.txt", fmt="dior"))
    assert names == ["fork"] and rec.labels.tolist() == [1]


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo", "lvis"])
def test_dataset_class_names_bad_input_is_one_line(tmp_path, fmt):
    if fmt == "coco":
        (tmp_path / "x.json").write_text('{"images": [], "categories": [{"id": 1}]}')
        src, message = DataSource(format="coco", ann_file=str(tmp_path / "x.json")), "categories[0]: needs"
    elif fmt == "voc":
        root = write_voc_root(tmp_path / "VOC", {"1": voc_xml([]), "2": "<annotation><object>"})
        src, message = voc_source(root), "malformed XML"
        with pytest.raises(InputError, match=r"2\.xml: malformed XML"):
            dataset_class_names(src)
        write_voc_root(root, {"2": voc_xml([])})
        message = "no class names in the data"
    elif fmt == "yolo":
        (tmp_path / "data.yaml").write_text("names: [a, b]\nnc: 3\n")
        src, message = DataSource(format="yolo", ann_file=str(tmp_path / "data.yaml")), "'nc': 3"
    else:
        src, message = DataSource(format="lvis"), "data source: unknown format 'lvis'"
    for call in (dataset_class_names, load_records_all_classes):
        with pytest.raises(InputError) as e:
            call(src)
        assert message in str(e.value) and "\n" not in str(e.value)
