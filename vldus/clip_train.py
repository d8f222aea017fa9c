"""``vldus train-clip``: a small CLIP for the embedded benchmark, trained with open_clip itself.

A web-trained CLIP has seen every everyday concept; the embedded benchmark's classes ("blue
circle") are not everyday photos, so VLDUS's distillation needs a CLIP that has seen them. This
trains one in about a minute on a CPU: the open_clip architecture of
``vldus/configs/clip/shapes_clip.json`` (a ViT on 32 px crops, a small text transformer, the
standard 49,408-token vocabulary and open_clip's own tokenizer), on single-object crops and
captions from make-shapes images drawn with their OWN random streams (never the benchmark's
training or test images: see :data:`TRAIN_STREAM`).

Loss: a class-level contrastive loss with a learnable temperature, as CLIP's image->text term:
each step draws ``captions_per_step`` captions of every training class (templates such as "a
photo of a blue circle.", "a blue circle."), averages their L2-normalised embeddings per class,
and takes the cross-entropy of the scaled image-class cosine logits of the batch's crops; the
logit scale starts at ln(1/0.07) and is clamped at ln 100 (open_clip's rules). AdamW, warm-up
then cosine decay, horizontal flips.

Output, the hub layout that :func:`vldus.clip.load_open_clip` reads like a user's own CLIP::

    DIR/open_clip_config.json        {"model_cfg": {...open_clip model config...},
                                      "preprocess_cfg": {"size", "mean", "std", ...}}
    DIR/open_clip_model.safetensors  the whole model's state dict (float32)
    DIR/metrics.json                 {"zero_shot_accuracy": {"all": pct, "unseen": pct, ...}, ...}
    DIR/checkpoint.pt                while training only (atomic; --resume continues from it)

Zero-shot accuracy is measured on held-out crops (a third stream) with the prompt ensemble of
``vldus embed --encoder clip`` over all classes: ``all`` on every held-out crop, ``unseen`` on
the crops of the unseen classes (make-shapes' default ones, or those of ``--exclude-unseen``).

Determinism: the model initialisation, the batches and the flips come from generators seeded
with ``seed``; the same seed (and thread count) gives identical weights, and a resumed run gives
the weights of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from vldus.clip import OPENAI_MEAN, OPENAI_STD
from vldus.errors import InputError
from vldus.files import atomic_write, save_torch, sha256_file, write_json

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
# Random streams of make-shapes' generator (rng keys [seed, stream, i]); the benchmark itself
# uses vldus.data.shapes.SPLIT_CODES, so these images are never the benchmark's.
TRAIN_STREAM = 101
HELDOUT_STREAM = 102
# Captions of the training crops ('{}' = class name).
TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "a photo of the {}.", "a {} shape.",
                              "a cropped photo of a {}.", "a drawing of a {}.")


def model_config_path() -> str:
    """The open_clip model config shipped with vldus (bare model config JSON)."""
    return str(resources.files("vldus") / "configs" / "clip" / "shapes_clip.json")


@dataclass(frozen=True)
class ClipTrainConfig:
    """Settings of ``train-clip`` (defaults: >= 90 % zero-shot accuracy in about a minute on 2 cores)."""

    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1          # AdamW; not on biases, norms, logit scale (open_clip's rule)
    warmup_steps: int = 20             # linear warm-up, then cosine decay to 0
    train_images: int = 400            # make-shapes images for training crops (2-6 objects each)
    heldout_images: int = 100          # images for the held-out zero-shot accuracy
    image_size: int = 160              # make-shapes image side (the benchmark's default)
    crop_margin: float = 0.1           # crop = visible box grown by this fraction per side
    flip_prob: float = 0.5             # horizontal flips of training crops
    captions_per_step: int = 1         # captions per class and step, drawn from the templates
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    checkpoint_every: int = 100        # steps between atomic checkpoints (92 MB: weights + AdamW state)
    templates: tuple[str, ...] = TEMPLATES

    def check(self) -> None:
        for name in ("steps", "batch_size", "train_images", "heldout_images", "checkpoint_every",
                     "captions_per_step"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}", f"{getattr(self, name)}: must be at least 1")
        if self.captions_per_step > len(self.templates):
            raise InputError("captions_per_step", f"{self.captions_per_step}: more than the "
                                                  f"{len(self.templates)} templates")
        for t in self.templates:
            if t.count("{}") != 1:
                raise InputError("templates", f"{t!r}: needs exactly one '{{}}' for the class name")


# --------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------
def unseen_classes(exclude_unseen: Optional[str]) -> tuple[str, ...]:
    """Unseen make-shapes classes of a split: ``None``/'default' -> make-shapes' default unseen
    classes; else a split JSON path (make-shapes' ``split.json``) or a built-in split name."""
    from vldus.data.shapes import CLASSES, DEFAULT_UNSEEN, check_unseen

    if exclude_unseen in (None, "default"):
        return tuple(DEFAULT_UNSEEN)
    from vldus.data.splits import load_split

    split = load_split(exclude_unseen)
    return check_unseen(split.unseen, CLASSES, source=split.source_file or exclude_unseen)


# --------------------------------------------------------------------------------------------
# Data: single-object crops of make-shapes images
# --------------------------------------------------------------------------------------------
def crop_objects(image: np.ndarray, boxes: np.ndarray, size: int, margin: float) -> np.ndarray:
    """(N, size, size, 3) uint8 crops of ``image`` (H, W, 3) at ``boxes`` (N, 4) xyxy px, each box
    grown by ``margin`` of its width/height per side (clipped to the image), resized (antialiased)."""
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        box = (max(0.0, x0 - mx), max(0.0, y0 - my), min(float(w), x1 + mx), min(float(h), y1 + my))
        out[k] = np.asarray(pil.resize((size, size), Image.BILINEAR, box=box))
    return out


def draw_crops(seed: int, stream: int, n_images: int, class_names: Sequence[str], crop_size: int,
               cfg: ClipTrainConfig, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Crops of every object of ``n_images`` make-shapes images that show only ``class_names``.

    Returns (crops uint8 (N, crop_size, crop_size, 3), labels int64 (N,) = index into
    ``class_names``). Class frequencies are balanced (make-shapes' planner).
    """
    from vldus.data.shapes import CLASSES, ShapesStyle, plan_split, render_image

    style = ShapesStyle()
    ids = [CLASSES.index(c) for c in class_names]
    plans = plan_split(np.random.default_rng([seed, stream, 0]), n_images,
                       {"seen": 1.0, "mixed": 0.0, "unseen": 0.0}, ids, [], style)
    crops, labels = [], []
    for i, plan in enumerate(tqdm(plans, desc=f"train-clip crops ({stream})", unit="img",
                                  disable=not progress)):
        image, boxes, objs = render_image(np.random.default_rng([seed, stream, i + 1]), plan,
                                          cfg.image_size, style)
        crops.append(crop_objects(image, boxes, crop_size, cfg.crop_margin))
        labels.extend(ids.index(int(o)) for o in objs)
    return np.concatenate(crops), np.asarray(labels, np.int64)


def to_model_input(crops: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W)."""
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@dataclass
class TrainingSet:
    """What the CLIP is trained on: crops, their labels, the class names and all captions."""

    classes: tuple[str, ...]       # class names, label order
    crops: np.ndarray              # (N, S, S, 3) uint8
    labels: np.ndarray             # (N,) int64 into classes
    captions: list[str]            # len(classes) * len(templates), class-major


def training_set(seed: int, exclude: Sequence[str], crop_size: int, cfg: ClipTrainConfig,
                 progress: bool = False) -> TrainingSet:
    """The training crops and captions: every make-shapes class except ``exclude``."""
    from vldus.data.shapes import CLASSES

    classes = tuple(c for c in CLASSES if c not in set(exclude))
    crops, labels = draw_crops(seed, TRAIN_STREAM, cfg.train_images, classes, crop_size, cfg, progress)
    captions = [t.format(c) for c in classes for t in cfg.templates]
    return TrainingSet(classes, crops, labels, captions)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def open_clip_config() -> dict:
    """The ``open_clip_config.json`` this command writes (hub layout)."""
    with open(model_config_path()) as f:
        model_cfg = json.load(f)
    size = model_cfg["vision_cfg"]["image_size"]
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                               "interpolation": "bilinear", "resize_mode": "squash"}}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: torch.nn.Module, cfg: ClipTrainConfig) -> torch.optim.Optimizer:
    """AdamW; the fused kernel where this torch has it (4x faster on the 6.3M-entry token table)."""
    groups = _param_groups(model, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)


def learning_rate(step: int, cfg: ClipTrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def class_text_embeddings(model, tokens: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, d) unit rows: mean of each class's normalised caption embeddings (class-major
    ``tokens``, (n_classes * k, context), k captions per class)."""
    txt = model.encode_text(tokens, normalize=True)
    return F.normalize(txt.view(n_classes, -1, txt.shape[-1]).mean(1), dim=-1)


def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: np.ndarray,
                       class_names: Sequence[str], batch: int = 512) -> np.ndarray:
    """Per-crop correctness (N,) bool: argmax over ``class_names`` of the cosine between the
    image embedding and the class text embedding of ``vldus embed --encoder clip`` (its prompt
    ensemble), i.e. exactly the class rows the pipeline uses."""
    from vldus.data.embeddings import DEFAULT_PROMPTS, encode_texts_clip

    text = torch.from_numpy(encode_texts_clip(class_names, model, tokenizer, DEFAULT_PROMPTS["clip"]))
    with torch.no_grad():
        img = torch.cat([model.encode_image(images[i:i + batch], normalize=True)
                         for i in range(0, len(images), batch)])
    return (img @ text.T).argmax(1).numpy() == labels


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _settings(seed: int, exclude: Sequence[str], cfg: ClipTrainConfig) -> dict:
    """What a checkpoint must match to be resumed (JSON-able)."""
    return {"seed": seed, "exclude": list(exclude), "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
            "model_cfg": open_clip_config()["model_cfg"]}


def _write_checkpoint(path: str, state: dict) -> None:
    save_torch(state, path)


def _read_checkpoint(path: str, settings: dict) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(ckpt["settings"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input here
        raise InputError(path, f"not a train-clip checkpoint ({(str(e).splitlines() or [''])[0]})") from None
    if saved != settings:
        diff = [k for k in settings if saved.get(k) != settings[k]]
        diff += [f"config.{k}" for k in settings["config"]
                 if saved.get("config", {}).get(k) != settings["config"][k]]
        raise InputError(path, f"written with other settings ({', '.join(d for d in diff if d != 'config')}); "
                               "use the same options or start without --resume")
    return ckpt


def train_clip(out: str | os.PathLike, seed: int = 0, exclude_unseen: Optional[str] = None,
               steps: Optional[int] = None, resume: bool = False, quiet: bool = False,
               config: ClipTrainConfig = ClipTrainConfig()) -> dict:
    """Train the benchmark CLIP into ``out`` (layout in the module doc); returns metrics.json's dict.

    ``exclude_unseen``: a split JSON path or built-in split name whose unseen classes are left out
    of training (crops and captions); None = train on every class. ``steps`` overrides
    ``config.steps``. ``resume`` continues from ``out/checkpoint.pt`` if there is one.
    """
    from vldus.clip import clip_image_size, clip_mean_std, get_clip_tokenizer

    cfg = dataclasses.replace(config, steps=steps) if steps is not None else config
    cfg.check()
    start_time = time.perf_counter()
    unseen = unseen_classes(exclude_unseen)
    exclude = unseen if exclude_unseen is not None else ()
    out = str(out)
    arch = prepare_output(out)
    settings = _settings(seed, exclude, cfg)
    ckpt_path = os.path.join(out, CHECKPOINT_FILE)
    ckpt = resume_point(ckpt_path, settings, resume)

    model = initial_model(arch, seed, cfg)
    tokenizer = get_clip_tokenizer(arch)
    crop_size = clip_image_size(model)[0]
    mean, std = clip_mean_std(model)
    data = training_set(seed, exclude, crop_size, cfg, progress=not quiet)
    batches = ClipBatches(to_model_input(data.crops, mean, std), torch.from_numpy(data.labels),
                          tokenizer(data.captions), len(data.classes), cfg,
                          torch.Generator().manual_seed(seed))
    optimizer = make_optimizer(model, cfg)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        batches.sampler.set_state(ckpt["sampler"])
        start = int(ckpt["step"])

    train_steps(model, optimizer, batches, cfg, start, ckpt_path, settings, quiet)
    train_s = time.perf_counter() - start_time
    weights = save_weights(model, out)
    metrics = evaluate(model, tokenizer, seed, unseen, crop_size, mean, std, cfg, quiet)
    metrics.update({
        "seed": seed, "steps": cfg.steps, "trained_classes": list(data.classes),
        "excluded_classes": list(exclude), "train_crops": int(len(data.labels)),
        "captions_per_class": len(cfg.templates), "final_logit_scale": float(model.logit_scale.exp()),
        "time_s": round(time.perf_counter() - start_time, 1), "train_time_s": round(train_s, 1),
        "torch_threads": torch.get_num_threads(), "config": dataclasses.asdict(cfg),
        "files": {"arch": CONFIG_FILE, "weights": WEIGHTS_FILE, "weights_sha256": sha256_file(weights)},
        "resumed_from_step": start,
    })
    write_json(os.path.join(out, METRICS_FILE), metrics)
    if os.path.isfile(ckpt_path):  # finished: the checkpoint (model + optimizer state) is not needed
        os.remove(ckpt_path)
    return metrics


def prepare_output(out: str) -> str:
    """Create ``out`` and write the model config there; returns its path (the ``--arch``)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InputError(out, f"cannot create the output folder ({e.strerror})") from None
    arch = os.path.join(out, CONFIG_FILE)
    write_json(arch, open_clip_config())
    return arch


def resume_point(ckpt_path: str, settings: dict, resume: bool) -> Optional[dict]:
    """The checkpoint to continue from (``resume`` and a file there), else None; says which."""
    ckpt = _read_checkpoint(ckpt_path, settings) if resume and os.path.isfile(ckpt_path) else None
    if resume:  # one line, also with --quiet (it says what the run continues from)
        print(f"resuming after step {ckpt['step']} from {ckpt_path}" if ckpt else
              f"no checkpoint in {os.path.dirname(ckpt_path)}; starting from scratch", flush=True)
    return ckpt


def initial_model(arch: str, seed: int, cfg: ClipTrainConfig):
    """The randomly initialised CLIP (seeded; the caller's global RNG is left alone) with the
    configured initial logit scale."""
    from vldus.clip import build_open_clip

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_open_clip(arch)
    with torch.no_grad():
        model.logit_scale.fill_(cfg.init_logit_scale)
    return model


@dataclass
class ClipBatches:
    """Training batches: random crops (some flipped) and, per class, a random subset of its
    captions. ``sampler`` is the only random stream (its state goes into the checkpoint)."""

    images: torch.Tensor           # (N, 3, S, S) normalised crops
    labels: torch.Tensor           # (N,) int64
    tokens: torch.Tensor           # (n_classes * n_templates, context), class-major
    n_classes: int
    cfg: ClipTrainConfig
    sampler: torch.Generator

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (B, 3, S, S), labels (B,), caption tokens (n_classes * captions_per_step, context))."""
        cfg = self.cfg
        idx = torch.randint(len(self.images), (cfg.batch_size,), generator=self.sampler)
        flip = torch.rand(cfg.batch_size, generator=self.sampler) < cfg.flip_prob
        n_t = len(cfg.templates)
        pick = torch.rand(self.n_classes, n_t, generator=self.sampler).argsort(1)[:, :cfg.captions_per_step]
        pick = (pick + torch.arange(self.n_classes).view(-1, 1) * n_t).reshape(-1)
        x = self.images[idx]
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), self.labels[idx], self.tokens[pick]


def clip_loss(model, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class-level contrastive loss: cross-entropy of the scaled cosines between each image and
    every class's mean caption embedding."""
    img = model.encode_image(images, normalize=True)
    txt = class_text_embeddings(model, tokens, n_classes)
    return F.cross_entropy(model.logit_scale.exp() * img @ txt.T, labels)


def train_steps(model, optimizer: torch.optim.Optimizer, batches: ClipBatches, cfg: ClipTrainConfig,
                start: int, ckpt_path: str, settings: dict, quiet: bool) -> None:
    """Steps ``start`` .. ``cfg.steps``: batch -> loss -> step, checkpointing every
    ``cfg.checkpoint_every`` steps (atomically)."""
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="train-clip", unit="step", disable=quiet,
               initial=start, total=cfg.steps)
    for step in bar:
        images, labels, tokens = batches.next()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss = clip_loss(model, images, labels, tokens, batches.n_classes)
        if not torch.isfinite(loss):
            raise InputError(ckpt_path, f"loss is {loss.item()} at step {step + 1}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, cfg.max_logit_scale)
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _write_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "sampler": batches.sampler.get_state(), "step": step + 1,
                                          "settings": json.dumps(settings)})
    bar.close()


def save_weights(model, out: str) -> str:
    """Freeze ``model`` and write its weights as ``out/open_clip_model.safetensors`` (atomically,
    readable like any file the user creates); returns the path."""
    from safetensors.torch import save_file

    from vldus.clip import freeze

    freeze(model)
    weights = os.path.join(out, WEIGHTS_FILE)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors creates files private (0600)
    return weights


def evaluate(model, tokenizer, seed: int, unseen: Sequence[str], crop_size: int, mean, std,
             cfg: ClipTrainConfig, quiet: bool = True) -> dict:
    """Zero-shot accuracy (percent) on held-out crops of every class: {"zero_shot_accuracy":
    {"all", "unseen", "unseen_among_unseen"}, "heldout_crops", "unseen_classes"}."""
    from vldus.data.shapes import CLASSES

    crops, labels = draw_crops(seed, HELDOUT_STREAM, cfg.heldout_images, CLASSES, crop_size, cfg)
    images = to_model_input(crops, mean, std)
    correct = zero_shot_accuracy(model, tokenizer, images, labels, CLASSES)
    unseen_ids = [CLASSES.index(c) for c in unseen]
    is_unseen = np.isin(labels, unseen_ids)
    among = zero_shot_accuracy(model, tokenizer, images[torch.from_numpy(is_unseen)],
                               np.searchsorted(unseen_ids, labels[is_unseen]), list(unseen))

    def pct(x: np.ndarray) -> float:
        return round(100.0 * float(x.mean()), 2) if len(x) else float("nan")

    return {"zero_shot_accuracy": {"all": pct(correct), "unseen": pct(correct[is_unseen]),
                                   "unseen_among_unseen": pct(among)},
            "heldout_crops": int(len(labels)), "unseen_classes": list(unseen),
            "per_class_accuracy": {c: pct(correct[labels == k]) for k, c in enumerate(CLASSES)}}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_parser(sub, common) -> None:
    d = ClipTrainConfig()
    p = sub.add_parser("train-clip", parents=[common],
                       help="train a small CLIP for the embedded benchmark (open_clip hub layout)",
                       description="Train a small open_clip CLIP on single-object crops and captions of "
                                   "make-shapes images drawn with their own seed (never the benchmark's "
                                   "images). Writes OUT/open_clip_config.json, "
                                   "OUT/open_clip_model.safetensors and OUT/metrics.json (zero-shot "
                                   "accuracy on held-out crops); use them as --arch/--clip-arch and "
                                   "--weights/--clip-weights.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and batch seed")
    p.add_argument("--exclude-unseen", metavar="SPLIT", default=None,
                   help="leave the unseen classes of SPLIT (a split.json path, a built-in split name, "
                        "or 'default' = make-shapes' default unseen classes) out of training: the "
                        "stricter setting. Default: train on every class, as a web-trained CLIP has "
                        "seen every concept")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    m = train_clip(args.out, seed=args.seed, exclude_unseen=args.exclude_unseen, steps=args.steps,
                   resume=args.resume, quiet=args.quiet)
    acc = m["zero_shot_accuracy"]
    print(f"train-clip: zero-shot accuracy {acc['all']:.1f} % on {m['heldout_crops']} held-out crops "
          f"({acc['unseen']:.1f} % on unseen classes {', '.join(m['unseen_classes'])}) in "
          f"{m['time_s']:.0f} s; use --arch {os.path.join(args.out, CONFIG_FILE)} "
          f"--weights {os.path.join(args.out, WEIGHTS_FILE)}")
    return 0
