"""Config loading: every split's file parses, published values land in the right fields, bad input is caught."""
import pytest

from vldus.config import load_config
from vldus.errors import InputError

SPLITS = ["coco_65_15", "coco_48_17", "voc_16_4", "dior_16_4"]


@pytest.mark.parametrize("name", SPLITS + ["shapes"])
def test_every_config_loads(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.name == name
    assert cfg.features.fg_iou == 0.6 and cfg.features.bg_iou == 0.3
    assert cfg.gan.lambda_gp == 10 and cfg.gan.critic_iter == 5 and cfg.gan.beta1 == 0.5


@pytest.mark.parametrize("name,scale,lr,gan_lr,syn_num,batch", [
    ("coco_65_15", (1333, 800), 0.02, 5e-5, 250, 32),
    ("coco_48_17", (1333, 800), 0.02, 1e-4, 300, 32),
    ("voc_16_4", (1000, 600), 0.01, 1e-5, 500, 64),
    ("dior_16_4", (1000, 600), 0.01, 1e-5, 500, 64),
])
def test_spec_values(name, scale, lr, gan_lr, syn_num, batch):
    cfg = load_config(f"configs/{name}.yaml")
    assert (cfg.detector.max_size, cfg.detector.min_size) == scale
    assert cfg.train.lr == lr and cfg.train.grad_clip == 35 and cfg.train.warmup_iters == 500
    assert cfg.gan.lr == gan_lr and cfg.unseen_classifier.syn_num == syn_num
    assert cfg.gan.batch_size == batch == cfg.unseen_classifier.batch_size
    assert cfg.inference.bg_blend == 0.35


def test_overrides_are_typed():
    cfg = load_config("configs/coco_65_15.yaml", ["gan.epochs=3", "train.lr=0.5", "work_dir=/tmp/x"])
    assert cfg.gan.epochs == 3 and isinstance(cfg.gan.epochs, int)
    assert cfg.train.lr == 0.5 and cfg.work_dir == "/tmp/x"


@pytest.mark.parametrize("text,needle", [
    ("gan: {epochz: 3}\n", "gan.epochz"),
    ("gan: {epochs: three}\n", "gan.epochs"),
    ("gan: [1, 2\n", "malformed YAML"),
    ("data: {train: {roots: 5}}\n", "data.train.roots"),
])
def test_bad_config_names_file_and_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        load_config(str(p))
    assert str(p) in str(e.value) and needle in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_config(str(tmp_path / "none.yaml"))


def test_bundled_config_by_name():
    cfg = load_config("voc_16_4")
    assert cfg.name == "voc_16_4" and cfg.load_split().unseen == ("car", "dog", "sofa", "train")


@pytest.mark.parametrize("item,field,expected", [
    ("gan.distill=off", "distill", "off"),        # YAML 1.1 would make this False
    ("gan.clip_weights=null", "clip_weights", None),
    ("gan.clip_weights=w/yes.pt", "clip_weights", "w/yes.pt"),
    ("gan.lr=1e-5", "lr", 1e-5),
    ("gan.legacy_unseen_loss=true", "legacy_unseen_loss", True),
])
def test_override_values_follow_the_field_type(item, field, expected):
    cfg = load_config("configs/shapes.yaml", [item])
    assert getattr(cfg.gan, field) == expected


def test_saved_config_round_trips(tmp_path):
    from vldus.config import save_config

    cfg = load_config("configs/shapes.yaml", ["gan.distill=off", "train.epochs=1"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.to_dict() == cfg.to_dict()


def test_set_takes_several_values_and_repeats():
    """mmdetection's --cfg-options style: several KEY=VALUE after one --set, and --set again."""
    from vldus.cli import build_parser

    args = build_parser().parse_args(["train-generator", "--config", "shapes", "--set", "gan.epochs=3",
                                      "gan.lr=1e-4", "--resume", "--set", "train.lr=0.5"])
    assert args.set == ["gan.epochs=3", "gan.lr=1e-4", "train.lr=0.5"] and args.resume
    cfg = load_config("configs/coco_65_15.yaml", args.set)
    assert (cfg.gan.epochs, cfg.gan.lr, cfg.train.lr) == (3, 1e-4, 0.5)


@pytest.mark.parametrize("item,close", [
    ("gan.distil=logged", ["gan.distill", "gan.distill_rows"]),
    ("gan.epochz=3", ["gan.epochs"]),
    ("epochs=3", ["gan.epochs", "train.epochs", "unseen_classifier.epochs"]),
    ("gna.epochs=3", ["gan.epochs"]),
])
def test_unknown_set_key_lists_close_names(item, close):
    with pytest.raises(InputError) as e:
        load_config("configs/coco_65_15.yaml", [item])
    msg = str(e.value)
    assert msg.startswith("--set") and f"unknown config key '{item.split('=')[0]}'" in msg
    assert all(name in msg for name in close), msg


def test_set_into_a_value_is_refused():
    with pytest.raises(InputError, match="'gan.epochs' is a value, not a section"):
        load_config("configs/coco_65_15.yaml", ["gan.epochs.x=1"])


def test_unknown_yaml_key_lists_close_names(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("gan: {distil: logged}\n")
    with pytest.raises(InputError, match=r"unknown config key 'gan.distil' \(close: gan.distill"):
        load_config(str(p))


def test_demo_config_takes_the_size_then_the_users_overrides(tmp_path):
    from vldus.demo import FULL, QUICK, demo_config

    weights = "detector.backbone_weights=/given/mobilenet.pth"  # not the installed package's
    quick = demo_config(str(tmp_path), QUICK, seed=3, overrides=[weights, "features.proposals=300"])
    assert quick.detector.roi_sampling_ratio == 1 and quick.detector.roi_batch_size == 32  # QUICK.config
    assert quick.features.proposals == 300 and quick.train.epochs == QUICK.detector_epochs
    assert quick.train.seed == 3 and quick.data.train.ann_file.startswith(str(tmp_path))
    full = demo_config(str(tmp_path), FULL, seed=0, overrides=[weights, "detector.roi_sampling_ratio=1", "train.epochs=9"])
    assert full.detector.roi_sampling_ratio == 1 and full.detector.roi_batch_size == 128  # the config's
    assert full.train.epochs == 9  # FULL keeps the config's epochs
    assert demo_config(str(tmp_path), FULL, seed=0, overrides=[weights]).detector.roi_sampling_ratio == 2
