"""One config object per dataset split.

A config is a YAML file under ``configs/`` that fills the dataclasses below; every
hyper-parameter of docs/design.md has a field here and a value in each split's file. Unknown keys are
errors (a typo must not silently fall back to a default).

Relative paths in a config are resolved against the current working directory, as with
mmdetection, or against the config file's folder with ``relative_to: config`` (what ``vldus
prepare`` writes, so that its folder can be moved with the data). A VOC ``list_file`` stays
relative to its root. ``--set section.key=value`` on the command line overrides any field (the value is
parsed as YAML, so ``--set gan.epochs=3`` gives an int); like mmdetection's ``--cfg-options``
one ``--set`` takes several (``--set gan.epochs=3 gan.lr=1e-4``) and may be repeated. An unknown
key is refused with the close names.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional, Sequence

import yaml

from vldus.errors import InputError


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class DataSource:
    """Where one set of images and annotations lives.

    format ``coco`` / ``shapes``: ``ann_file`` (instances JSON) and ``img_dir``.
    format ``voc`` / ``dior``: ``roots`` (dataset folders, e.g. VOCdevkit/VOC2007) and
    ``list_file`` (image-id list relative to each root, e.g. ImageSets/Main/train.txt).
    format ``yolo``: ``ann_file`` (an Ultralytics / Roboflow ``data.yaml``) and ``subset`` (its
    ``train``, ``val`` or ``test`` image folder), or ``img_dir``: a folder whose images (under it,
    subfolders included) are read instead, with ``list_file`` naming the ones to keep.
    ``list_file`` for ``coco`` and ``yolo`` (optional): the images to keep, one file name per
    line relative to the image folder (``vldus prepare`` writes one when it carves a
    validation split out of the training images).
    """

    format: str = "coco"
    ann_file: str = ""
    img_dir: str = ""
    roots: list[str] = field(default_factory=list)
    list_file: str = ""
    subset: str = ""  # yolo: the data.yaml key of the image folder (train, val, test)
    repeat: int = 1  # RepeatDataset factor (training only)


@dataclass
class DataConfig:
    train: DataSource = field(default_factory=DataSource)
    val: Optional[DataSource] = None
    test: DataSource = field(default_factory=DataSource)
    # §9.2: 'coco' (>=1 unseen for zsd and gzsd), 'voc' (zsd: unseen only) or 'all' (gzsd: every image)
    test_rule: str = "coco"
    min_image_side: int = 32  # §2.3: smaller images are dropped from training
    workers: int = 2


@dataclass
class DetectorConfig:
    """Faster R-CNN on torchvision (docs/design.md §2.1)."""

    backbone: str = "resnet101"  # resnet18/34/50/101, mobilenet_v2
    backbone_weights: Optional[str] = None  # torchvision-format ImageNet state dict, local file
    norm: str = "frozen_bn"  # frozen_bn (pretrained) | bn | gn (from scratch) | auto (frozen_bn iff weights)
    trainable_layers: int = 3  # of 5 stages; mmdet frozen_stages=1 == stem + layer1 frozen; all without weights
    fpn_channels: int = 256
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    min_size: int = 800  # image scale (short side)
    max_size: int = 1333  # image scale (long side)
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_size: int = 256
    rpn_pos_fraction: float = 0.5
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_nms: float = 0.7
    rpn_min_size: float = 0.0
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.5
    roi_batch_size: int = 512
    roi_pos_fraction: float = 0.25
    roi_sampling_ratio: int = 2  # RoIAlign sampling points per bin side (2: torchvision and mmdet)
    roi_align: str = "auto"  # gather (one weighted gather, fast on CPU) | torchvision | auto (gather on CPU)
    representation_size: int = 1024
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])  # 1/stds
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    legacy_mmdet: bool = False  # mmdetection-1.x anchor/box arithmetic (converted checkpoints, vldus.detection.legacy)
    channels_last: bool = False  # weights (and so activations) in NHWC memory format; same arithmetic, speed varies


@dataclass
class TrainConfig:
    """Detector training schedule (docs/design.md §2.1–2.2)."""

    epochs: int = 12
    batch_size: int = 2  # images per process
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])  # epochs at which lr *= gamma
    lr_gamma: float = 0.1
    grad_clip: Optional[float] = 35.0
    flip: float = 0.5
    seed: int = 0
    log_interval: int = 20
    amp: bool = False  # autocast on CUDA


@dataclass
class FeatureConfig:
    """RoI feature extraction (docs/design.md §3)."""

    fg_iou: float = 0.6
    bg_iou: float = 0.3
    num_rois: int = 512
    pos_fraction: float = 0.25
    bg_per_fg: int = 2
    dim: int = 1024
    proposals: Optional[int] = None  # RPN proposals per image (post-NMS); None: detector.rpn_post_nms_train
    seed: int = 0  # flips and RoI samples (each image pass has its own generator)


@dataclass
class EmbeddingConfig:
    """Class semantic embeddings (docs/design.md §4)."""

    file: str = ""  # (C+1) x d .npy, row 0 = background, detector order
    spectral_norm: bool = True  # divide the whole matrix by its largest singular value
    text_file: Optional[str] = None  # T for relation distillation; default: ``file``


@dataclass
class CompatConfig:
    """Compatibility ('unseen') classifier trained on seen features (docs/design.md §5)."""

    epochs: int = 100
    batch_size: int = 512
    val_batch_size: int = 1024
    lr: float = 1.0
    momentum: float = 0.9
    lr_step: int = 30
    lr_gamma: float = 0.1
    val_fraction: float = 0.2
    seed: int = 806


@dataclass
class GanConfig:
    """Conditional WGAN-GP synthesizer (docs/design.md §6)."""

    nz: int = 300
    ngh: int = 4096
    ndh: int = 4096
    d_feat: int = 512
    lambda_gp: float = 10.0
    critic_iter: int = 5
    lr: float = 5e-5
    beta1: float = 0.5
    batch_size: int = 32
    epochs: int = 100
    epoch_budget: int = 38000
    cls_weight: float = 0.01  # seen classifier C_s
    cls_weight_unseen: float = 0.01  # compatibility classifier C_u
    lz_ratio: float = 0.01  # mode seeking
    legacy_unseen_loss: bool = False  # released code: C_u loss on detached features (no gradient)
    distill: str = "off"  # active | logged | off (CLIP vision-language distillation, §6.4)
    clip_arch: str = "ViT-B-32"  # open_clip name or model-config JSON (vldus train-clip's open_clip_config.json)
    clip_weights: Optional[str] = None
    clip_quickgelu: str = "auto"  # auto (OpenAI TorchScript archive -> QuickGELU variant) | on | off
    w_fa: float = 0.005
    w_ra_dis: float = 0.01
    w_ra_div: float = 0.001
    distill_rows: int = 8  # rows of each batch seen by CLIP per step (released: 1, so L_ra^div = 0)
    # where active distillation sends gradient: d_and_g (ours) | d_only (the released design:
    # the terms sit in the critic loop only)
    distill_into: str = "d_and_g"
    seed: int = 806
    precision: str = "fp32"  # fp32 (published) | bf16 (products in bfloat16, fp32 weights) | auto (vldus/precision.py)
    detector_checkpoint: Optional[str] = None  # C_s source; null = latest WORK_DIR/detector/epoch_N.pth


@dataclass
class UnseenClassifierConfig:
    """Final classifier on synthesized unseen + real background features (docs/design.md §7)."""

    syn_num: int = 250
    epochs: int = 15
    lr: float = 1e-4
    lr_step: int = 30
    batch_size: int = 32
    bg_multiplier: int = 2
    # last (the fixed schedule) | pseudo_unseen (chosen on held-out seen classes, vldus.synthesis.select;
    # vldus run / vldus demo --select) | test (released: best on the real unseen TEST features, leaks)
    selection: str = "last"
    select_epochs: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])  # x gan.epochs
    select_syn_num: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # x syn_num
    pseudo_unseen: Optional[int] = None  # seen classes held out per fold; null: the unseen share, >= 1


@dataclass
class InferenceConfig:
    """Injection and ZSD / GZSD scoring (docs/design.md §8)."""

    bg_blend: float = 0.35  # weight of the detector's own background row
    seen_score_cut: Optional[float] = None  # SU's 0.3 GZSD cut; VLDUS: none
    # excluded classes (COCO 48/17): 'softmax' = in the ZSD softmax with background and unseen
    # (released behaviour), probability 0 in GZSD; 'mask' = probability 0 in both settings
    excluded: str = "softmax"
    # ZSD: 'soft' weighs a box's unseen scores by the calibrated probability that it is not a
    # seen object (vldus.detection.gzsd); 'published' = the released scoring (docs/design.md §8.2)
    zsd_scoring: str = "soft"
    # GZSD: 'soft' weighs a box's seen scores by the calibrated probability that it is a seen
    # object and its unseen scores by the rest, 'joint' drops the seen scores when an unseen class
    # explains it better; 'published' = the released two-softmax scoring (docs/design.md §8.3)
    gzsd_scoring: str = "soft"
    # the gate's threshold (soft and joint, both settings); null = gzsd_calibration.json next to
    # the classifier (chosen by train-generator / calibrate-gzsd without test data), else published
    gzsd_threshold: Optional[float] = None
    gzsd_slope: Optional[float] = None  # the soft scoring's slope, with gzsd_threshold
    gzsd_seen_weight: Optional[float] = None  # the soft scoring's weight of e_s (null: 1), with gzsd_slope
    # the soft gate's calibration: a regression on the margin e_u - e_s ("margin") or on the two
    # evidences with a seen weight of its own ("two_weights"; docs/gzsd.md)
    gate_fit: str = "margin"
    # the soft gate decided per object: each box takes the objectness-weighted mean gate of the
    # proposals overlapping it at IoU >= this; null: per box
    gate_iou: Optional[float] = None
    # the unseen classes' box deltas (their regression rows were never trained): 'seen_mixture'
    # the seen classes' deltas weighed by the detector's seen softmax, in every unseen slot;
    # 'best_seen' the best seen class's, in the best unseen class's slot (the released code)
    box_regression: str = "seen_mixture"
    # the calibration keeps the published scoring when its best threshold separates real seen from
    # synthesized unseen features with a balanced accuracy below this (the rule cannot tell them apart)
    gzsd_min_separation: float = 0.75
    show_score_thresh: float = 0.3  # `vldus test --show-dir` pictures: boxes with score >= this


@dataclass
class EvalConfig:
    iou_thresholds: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6])
    protocol: str = "mmdet-v1"


@dataclass
class Config:
    name: str = ""
    relative_to: str = "cwd"  # relative paths below resolve against: cwd | config (the file's folder)
    split: str = ""  # built-in split name or a split JSON file
    work_dir: str = "work_dirs/default"
    data: DataConfig = field(default_factory=DataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    unseen_classifier: UnseenClassifierConfig = field(default_factory=UnseenClassifierConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    source_file: str = ""  # filled by load_config

    # --- derived paths (one layout for every split) -------------------------------------
    def path(self, *parts: str) -> str:
        """A path under the work dir: detector/, features/, synth/, results/."""
        return os.path.join(self.work_dir, *parts)

    def load_split(self):
        """The Split object this config names (see vldus.data.splits)."""
        from vldus.data.splits import load_split

        if not self.split:
            raise InputError(self.source_file, "config has no 'split'")
        return load_split(self.split)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _build(cls: type, data: Any, where: str, file: str):
    """Fill dataclass ``cls`` from a mapping, strictly; ``where`` is the dotted key for errors."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise InputError(file, f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names or key == "source_file":
            raise InputError(file, f"unknown config key '{where + '.' if where else ''}{key}'"
                                   + _close_names(key, names - {"source_file"}, where))
        kwargs[key] = _coerce(hints[key], value, f"{where + '.' if where else ''}{key}", file)
    return cls(**kwargs)


class _Override(str):
    """A ``--set`` value as typed: parsed as YAML unless the field is a string, so that
    ``--set gan.distill=off`` stays 'off' (YAML 1.1 would read it as False)."""


def _coerce(tp: Any, value: Any, where: str, file: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, _Override)
                                                     and value.strip() in ("null", "~", "None", ""))):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, file)
    if isinstance(value, _Override):
        value = str(value) if tp is str else yaml.safe_load(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, file)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise InputError(file, f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]", file) for i, v in enumerate(value)] if args else list(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float:  # YAML 1.1 reads 1e-5 (no dot) as a string
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise InputError(file, f"{where}: expected float, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise InputError(file, f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _close_names(key: str, names: set[str], where: str = "") -> str:
    """' (close: a.b, a.c)' for an unknown ``key`` among ``names`` of section ``where``."""
    close = difflib.get_close_matches(key, sorted(names), n=5, cutoff=0.6)
    prefix = f"{where}." if where else ""
    return f" (close: {', '.join(prefix + c for c in close)})" if close else ""


def config_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config (``gan.epochs``, ``data.train.ann_file`` ...)."""
    cls = cls or Config
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "source_file":
            continue
        tp = section_type(typing.get_type_hints(cls)[f.name])
        out += config_keys(tp, f"{prefix}{f.name}.") if tp else [prefix + f.name]
    return out


def section_type(tp: Any) -> Optional[type]:
    """The dataclass a field holds (``Optional[X]`` -> X), or None for a plain value."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def check_override_key(dotted: str) -> None:
    """InputError('--set', ...) unless ``dotted`` names a config value; lists the close keys."""
    cls, parts = Config, dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints or part == "source_file":
            keys = config_keys()
            close = [k for k in keys if k.rsplit(".", 1)[-1] == parts[-1] and k != dotted]
            close += [k for k in difflib.get_close_matches(dotted, keys, n=5, cutoff=0.6) if k not in close]
            hint = f"; close names: {', '.join(close[:6])}" if close else \
                f"; '{'.'.join(parts[:i]) or 'top level'}' has {', '.join(sorted(hints.keys() - {'source_file'}))}"
            raise InputError("--set", f"unknown config key '{dotted}'{hint}")
        section = section_type(hints[part])
        if section is None:
            if i != len(parts) - 1:
                raise InputError("--set", f"'{dotted}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
            return
        cls = section
    # a whole section: allowed (a YAML mapping value), checked when the config is built


def add_set_argument(parser: argparse.ArgumentParser, help: str = "override config values, e.g. "
                     "--set gan.epochs=3 gan.lr=1e-4 (several after one flag, repeatable)") -> None:
    """The ``--set KEY=VALUE [KEY=VALUE ...]`` option every config-reading command takes."""
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError("--set", f"'{dotted}': '{p}' is not a section")
    node[leaf] = value


def resolve_config_path(path: str) -> str:
    """A config file path, or the name of a bundled config (``coco_65_15``, ``shapes`` ...)."""
    if os.path.isfile(path):
        return path
    bundled = resources.files("vldus") / "configs" / f"{path}.yaml"
    if os.sep not in path and bundled.is_file():
        return str(bundled)
    raise InputError(path, "config file not found (give a YAML path or a bundled config name: "
                           f"{', '.join(bundled_configs())})")


def bundled_configs() -> list[str]:
    folder = resources.files("vldus") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config and apply ``key.sub=value`` overrides. Bad input raises InputError.

    ``path`` is a file or the name of a bundled config (``vldus/configs`` = the repo's ``configs/``).
    """
    path = resolve_config_path(path)
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise InputError(path, f"malformed YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise InputError("--set", f"'{item}' is not key=value")
        key, raw = item.split("=", 1)
        check_override_key(key.strip())
        _set_dotted(tree, key.strip(), _Override(raw))
    cfg = _build(Config, tree, "", path)
    cfg.source_file = path
    if cfg.relative_to not in ("cwd", "config"):
        raise InputError(path, f"relative_to: {cfg.relative_to!r} (one of cwd, config)")
    if cfg.relative_to == "config":
        _resolve_relative(cfg, os.path.dirname(os.path.abspath(path)))
    return cfg


# Dotted keys holding a path (``data.*`` per source); the config's relative paths are resolved
# against its folder with ``relative_to: config``.
PATH_KEYS = ("split", "work_dir", "embeddings.file", "embeddings.text_file", "detector.backbone_weights",
             "gan.clip_weights", "gan.clip_arch", "gan.detector_checkpoint")
SOURCE_PATH_KEYS = ("ann_file", "img_dir", "list_file")
INSTALLED_WEIGHTS = "installed"  # detector.backbone_weights: the ImageNet file of an installed package


def _looks_like_path(key: str, value: str) -> bool:
    if key == "split":  # a built-in split name is not a path
        return value.endswith(".json") or os.sep in value
    if key == "gan.clip_arch":  # an open_clip name is not a path
        return value.endswith(".json")
    return not (key == "detector.backbone_weights" and value == INSTALLED_WEIGHTS)


def _resolve_relative(cfg: Config, folder: str) -> None:
    """Make the config's relative paths absolute against ``folder`` (``relative_to: config``)."""
    def fix(value: Optional[str]) -> Optional[str]:
        return os.path.normpath(os.path.join(folder, value)) if value and not os.path.isabs(value) else value

    for key in PATH_KEYS:
        section, _, leaf = key.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, leaf)
        if value and _looks_like_path(key, value):
            setattr(owner, leaf, fix(value))
    for source in (cfg.data.train, cfg.data.val, cfg.data.test):
        if source is None:
            continue
        source.roots = [fix(r) for r in source.roots]
        for leaf in SOURCE_PATH_KEYS:
            if leaf == "list_file" and source.format in ("voc", "dior"):
                continue  # relative to each root
            setattr(source, leaf, fix(getattr(source, leaf)))


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
