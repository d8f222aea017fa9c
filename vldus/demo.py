"""``vldus demo``: the whole zero-shot pipeline (VLDUS) on the embedded benchmark, on CPU in minutes.

make-shapes -> train-clip (a small CLIP for the benchmark, unless ``--clip-weights`` names one)
-> train-detector (seen classes) -> extract-features (seen train, unseen test) ->
train-unseen-classifier (compatibility classifier) -> train-generator (per variant) -> test
(ZSD, GZSD, GZSD with the published scoring) -> metrics. Each stage is the stage's own command
(``vldus.cli.main``), run in this process with the config written to ``OUT/config.yaml``;
nothing of the pipeline is implemented twice. The detector runs once over the test images
(``vldus test --cache``); every variant and setting re-scores its stored box features.

Variants (same detector, features and class embeddings):

- ``no_synthesis``: the compatibility classifier alone: its projection scored against the
  unseen class embeddings, turned into classifier rows ``E[[0] + unseen] @ W`` and injected like
  a synthesized classifier;
- ``synthesis_su``: the synthesizer with SU's objective (WGAN-GP, C_s, C_u, mode seeking; no CLIP);
- ``synthesis_vldus``: plus the CLIP vision-language distillation (into D and G): the main
  result, fixed in advance, never chosen by test mAP.

``--ablation`` adds rows (:data:`ABLATION`): class embeddings from the CLIP's text encoder (as
the paper), the released behaviour (``--legacy --distill logged``), distillation into D only
(the released design) and a CLIP trained without the unseen classes.

Outputs: ``OUT/metrics.json`` (docs/formats.md), ``OUT/report.md`` with tables and pictures, the
stage outputs under ``OUT/work``, the CLIP under ``OUT/clip`` and the benchmark under ``OUT/shapes``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from vldus.config import Config, load_config, save_config
from vldus.errors import InputError, require_file
from vldus.files import write_json

VARIANTS = ("no_synthesis", "synthesis_su", "synthesis_vldus")
METHOD = "synthesis_vldus"  # the main result, fixed in advance
SETTINGS = ("zsd", "gzsd", "gzsd_published")  # gzsd: the default GZSD scoring; the released one
DISTILL_TERMS = ("l_fa", "l_ra_dis", "l_ra_div")


@dataclass(frozen=True)
class DemoSize:
    """How big the demo run is: the benchmark and the training lengths (everything else is the
    bundled ``shapes`` config)."""

    train_images: int
    test_images: int
    detector_epochs: Optional[int]  # None: the config's
    detector_warmup: Optional[int]  # warm-up iterations; None: the config's
    gan_epochs: int
    gan_epoch_budget: int
    compat_epochs: int
    clip_steps: Optional[int] = None  # None: train-clip's default
    gan_lr: Optional[float] = None  # None: the config's
    pictures: int = 6
    rows: tuple[str, ...] = VARIANTS  # the variants that run (the others are reported as skipped)


FULL = DemoSize(train_images=600, test_images=200, detector_epochs=None, detector_warmup=None,
                gan_epochs=10, gan_epoch_budget=8000, compat_epochs=30)
# The quick detector must converge (4 epochs): an unconverged one turns another CPU's fp32
# round-off into a different result (docs/history.md, quick demo).
QUICK = DemoSize(train_images=260, test_images=70, detector_epochs=4, detector_warmup=40,
                 gan_epochs=8, gan_epoch_budget=4000, compat_epochs=15, clip_steps=150, gan_lr=4e-4, pictures=3,
                 rows=("no_synthesis", "synthesis_vldus"))
# A smoke run of every stage (benchmarks/device_check.sh --tiny): seconds, no meaningful metrics.
TINY = DemoSize(train_images=24, test_images=8, detector_epochs=1, detector_warmup=2,
                gan_epochs=1, gan_epoch_budget=256, compat_epochs=2, clip_steps=4, pictures=1,
                rows=("no_synthesis", "synthesis_vldus"))


@dataclass(frozen=True)
class Variant:
    """One row: how its classifier is made. ``generator`` holds train-generator options (None:
    no synthesis); ``clip`` names the CLIP it distils from ("main" or "exclude_unseen");
    ``clip_embeddings``: class embeddings from that CLIP's text encoder instead of the attributes."""

    name: str
    generator: Optional[tuple[str, ...]]
    clip: Optional[str] = None
    clip_embeddings: bool = False
    description: str = ""


ROWS = {
    "no_synthesis": Variant("no_synthesis", None, description="compatibility classifier alone"),
    "synthesis_su": Variant("synthesis_su", ("--distill", "off"), description="SU objective, no CLIP"),
    "synthesis_vldus": Variant("synthesis_vldus", ("--distill", "active"), clip="main",
                               description="+ CLIP distillation into D and G"),
}
ABLATION = {
    "vldus_clip_text_embeddings": Variant(
        "vldus_clip_text_embeddings", ("--distill", "active"), clip="main", clip_embeddings=True,
        description="VLDUS with class embeddings from the CLIP's text encoder (as the paper)"),
    "vldus_released": Variant(
        "vldus_released", ("--legacy", "--distill", "logged"), clip="main",
        description="released behaviour: C_u without gradient, distillation logged only"),
    "vldus_distill_d_only": Variant(
        "vldus_distill_d_only", ("--distill", "active", "--distill-into", "d_only"), clip="main",
        description="distillation into D only (the released design)"),
    "vldus_clip_exclude_unseen": Variant(
        "vldus_clip_exclude_unseen", ("--distill", "active"), clip="exclude_unseen",
        description="VLDUS with a CLIP trained without the unseen classes"),
}


@dataclass
class ClipFiles:
    """A CLIP the demo distils from: open_clip arch (name or config JSON) and weights file."""

    arch: str
    weights: str
    source: str  # "trained by train-clip" or "--clip-weights"
    text_embeddings: str = ""  # (C+1, dim) .npy from vldus embed --encoder clip
    dim: int = 0
    metrics: dict = field(default_factory=dict)


class StageFailed(RuntimeError):
    def __init__(self, name: str, code: int):
        super().__init__(f"stage {name} failed (exit code {code})")
        self.code = code


class Stages:
    """Runs stage commands in this process and records each one's wall time."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    def run(self, name: str, argv: list[str]) -> None:
        from vldus import cli

        print(f"\n== {name}: vldus {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        rc = cli.main(argv + (["--quiet"] if self.quiet else []))
        elapsed = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + elapsed  # a stage may run several times
        print(f"== {name}: {elapsed:.1f} s", flush=True)
        if rc:
            raise StageFailed(name, rc)


# --------------------------------------------------------------------------------------------
# Inputs and config
# --------------------------------------------------------------------------------------------
def check_inputs(args: argparse.Namespace) -> None:
    """Refuse bad input before any work (one line, exit 2): unknown or impossible unseen classes,
    a CLIP file that is not there."""
    from vldus.data.shapes import check_unseen

    if args.unseen:
        check_unseen([n.strip() for n in args.unseen.split(",") if n.strip()], source="--unseen")
    if args.clip_weights:
        require_file(args.clip_weights, "CLIP weights file (--clip-weights)")
    if args.clip_arch and args.clip_arch.endswith(".json"):
        require_file(args.clip_arch, "open_clip model config (--clip-arch)")
    if args.clip_arch and not args.clip_weights:
        raise InputError("--clip-arch", "needs --clip-weights (the demo trains its own CLIP otherwise)")


def demo_config(out: str, size: DemoSize, seed: int) -> Config:
    """The bundled ``shapes`` config pointed at OUT, sized by ``size``, seeded by ``seed``."""
    from vldus.detection.model import default_backbone_weights

    cfg = load_config("shapes")
    data = os.path.join(out, "shapes")
    cfg.name = "shapes_demo"
    cfg.split = os.path.join(data, "split.json")
    cfg.work_dir = os.path.join(out, "work")
    for source, part in ((cfg.data.train, "train"), (cfg.data.test, "test")):
        source.ann_file = os.path.join(data, "annotations", f"instances_{part}.json")
        source.img_dir = os.path.join(data, "images")
    cfg.embeddings.file = os.path.join(data, "attributes.npy")
    if cfg.detector.backbone_weights is None:
        # --tiny (a smoke run) may train a random backbone; the others need the ImageNet file
        cfg.detector.backbone_weights = default_backbone_weights(cfg, required=size is not TINY)
    if size.detector_epochs is not None:
        cfg.train.epochs = size.detector_epochs
        # the last epoch at the lower rate, as in the config
        cfg.train.lr_steps = [size.detector_epochs - 1] if size.detector_epochs > 1 else []
    if size.detector_warmup is not None:
        cfg.train.warmup_iters = size.detector_warmup
    cfg.gan.epochs = size.gan_epochs
    if size.gan_lr is not None:
        cfg.gan.lr = size.gan_lr
    cfg.gan.epoch_budget = size.gan_epoch_budget
    cfg.compat.epochs = size.compat_epochs
    cfg.compat.lr_step = min(cfg.compat.lr_step, max(1, 2 * size.compat_epochs // 3))
    cfg.train.seed = cfg.features.seed = seed
    cfg.gan.seed = cfg.compat.seed = 806 + seed
    return cfg


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------
def prepare_clip(stages: Stages, args: argparse.Namespace, out: str, size: DemoSize, which: str,
                 split_file: str) -> ClipFiles:
    """The CLIP of ``which`` ("main" or "exclude_unseen"): the user's (``--clip-weights``) or one
    trained by ``vldus train-clip``; plus the class text embeddings it gives (``vldus embed``)."""
    from vldus.clip import load_open_clip

    if which == "main" and args.clip_weights:
        clip = ClipFiles(args.clip_arch or "ViT-B-32", args.clip_weights, "--clip-weights")
    else:
        folder = os.path.join(out, "clip" if which == "main" else "clip_exclude_unseen")
        argv = ["train-clip", "--out", folder, "--seed", str(args.seed)]
        if size.clip_steps is not None:
            argv += ["--steps", str(size.clip_steps)]
        if which == "exclude_unseen":
            argv += ["--exclude-unseen", split_file]
        stages.run("train-clip" if which == "main" else "train-clip (exclude unseen)", argv)
        with open(os.path.join(folder, "metrics.json")) as f:
            metrics = json.load(f)
        clip = ClipFiles(os.path.join(folder, "open_clip_config.json"),
                         os.path.join(folder, "open_clip_model.safetensors"),
                         "trained by vldus train-clip" + (" --exclude-unseen" if which != "main" else ""),
                         metrics=metrics)
    model = load_open_clip(clip.arch, clip.weights)
    clip.dim = int(getattr(model.visual, "output_dim", 0) or model.text_projection.shape[1])
    clip.text_embeddings = os.path.join(out, "work", f"clip_text_{which}.npy")
    stages.run("embed (CLIP text)", ["embed", "--classes", split_file, "--encoder", "clip", "--arch", clip.arch,
                                     "--weights", clip.weights, *_clip_prompts(clip), "--out",
                                     clip.text_embeddings])
    return clip


def _clip_prompts(clip: ClipFiles) -> list[str]:
    """The caption templates a CLIP trained by train-clip learned; embed's defaults otherwise."""
    if not clip.source.startswith("trained"):
        return []
    from vldus.clip_train import TEMPLATES

    return [a for t in TEMPLATES for a in ("--prompt", t)]


# --------------------------------------------------------------------------------------------
# The no-synthesis baseline
# --------------------------------------------------------------------------------------------
def compat_as_classifier(cfg: Config, out_path: str) -> None:
    """Write the compatibility classifier as injectable rows: logits ``fc(x) · E_k`` for
    k in [background] + unseen equal ``x · (E_k W) + E_k · b``. Same layout as classifier_best.pth."""
    from vldus.classifier_files import read_linear, write_linear
    from vldus.data.embeddings import load_class_embeddings
    from vldus.synthesis.compat import compat_classifier_path

    split = cfg.load_split()
    emb = torch.from_numpy(load_class_embeddings(cfg.embeddings.file, split, cfg.embeddings.spectral_norm))
    weight, bias = read_linear(compat_classifier_path(cfg), "compatibility classifier")
    rows = emb[[0] + split.unseen_ids]  # (1+U, d)
    write_linear(rows @ weight.float(), rows @ bias.float(), out_path)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def metrics_table(m: dict) -> str:
    """Markdown: one row per class and per group (and HM), mAP and Recall@100 at each IoU."""
    ious = [f"{t:.1f}" for t in m["iou_thresholds"]]
    head = "| class | group | #gt | " + " | ".join(f"mAP@{t}" for t in ious) + " | " + \
        " | ".join(f"RE@{t}" for t in ious) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(ious))]
    for name, c in m["classes"].items():
        lines.append(f"| {name} | {c['group']} | {c['num_gt']} | " + " | ".join(_fmt(c["ap"][t]) for t in ious)
                     + " | " + " | ".join(_fmt(c["recall"][t]) for t in ious) + " |")
    for group, g in m["groups"].items():
        lines.append(f"| **{group} (mean)** | | | " + " | ".join(f"**{_fmt(g['map'][t])}**" for t in ious)
                     + " | " + " | ".join(f"**{_fmt(g['recall'][t])}**" for t in ious) + " |")
    if "hm" in m:
        lines.append("| **HM** | | | " + " | ".join(f"**{_fmt(m['hm']['map'][t])}**" for t in ious)
                     + " | " + " | ".join(f"**{_fmt(m['hm']['recall'][t])}**" for t in ious) + " |")
    return "\n".join(lines)


def write_report(out: str, result: dict, pictures: list[str], size: DemoSize, args) -> str:
    from vldus.evaluation.breakdown import KIND_TEXT, markdown_summary

    ablation = result["ablation"]
    clip = result["clip"]
    acc = clip.get("zero_shot_accuracy") or {}
    lines = [
        "# vldus demo: zero-shot detection on the embedded benchmark", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {result['precision']}. "
        f"Seed {args.seed}{', quick run' if args.quick else ', tiny run' if args.tiny else ''}.",
        f"Benchmark: {size.train_images} training and {size.test_images} test images; unseen classes: "
        f"{', '.join(result['unseen'])}.",
        f"CLIP: {clip['source']} ({clip['arch']}, {clip['weights']})"
        + (f"; zero-shot crop accuracy {acc.get('all', 0):.1f} % (unseen classes {acc.get('unseen', 0):.1f} %)"
           if acc else "") + ".", "",
        f"Main result (fixed in advance): **{result['method']}**.", "",
        "## Variants (IoU 0.5, same detector, features and class embeddings)", "",
        "| variant | what | ZSD mAP | GZSD HM | GZSD HM (published scoring) | status |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in ablation.items():
        lines.append(f"| {name} | {a['description']} | {_fmt(a['zsd_map'])} | {_fmt(a['gzsd_hm'])} | "
                     f"{_fmt(a['gzsd_published_hm'])} | {a['status']} |")
    lines += ["", "## Where ZSD loses its points (IoU 0.5)", "",
              "False positives and missed objects by kind, each as count (mAP gained if that kind "
              "were fixed): " + "; ".join(f"{k}: {v}" for k, v in KIND_TEXT.items()) + ".", "",
              markdown_summary({k: a["zsd_breakdown"] for k, a in ablation.items() if "zsd_breakdown" in a})]
    for setting, title in (("zsd", "ZSD"), ("gzsd", "GZSD"), ("gzsd_published", "GZSD, published scoring")):
        lines += ["", f"## {title} ({result['method']})", "", metrics_table(result[setting])]
    lines += ["", "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    lines += ["", "## Pictures", ""]
    lines += ["Detections (GZSD) on test images with unseen objects; unseen classes in their own colour:", ""]
    lines += [f"![detections]({p})" for p in pictures]
    for title, name in (("Synthesized vs real features (PCA)", "features_2d.png"),
                        ("GAN and CLIP distillation losses", "losses.png")):
        if os.path.isfile(os.path.join(out, name)):
            lines += ["", f"### {title}", "", f"![{title}]({name})"]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def distill_means(synth_dir: str) -> dict[str, float]:
    """Mean of each CLIP distillation term over the GAN epochs of a run (0.0 when off)."""
    with open(os.path.join(synth_dir, "log.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    history = [r for r in history if r.get("iterations")] or history
    return {k: sum(abs(r.get(k, 0.0)) for r in history) / max(len(history), 1) for k in DISTILL_TERMS}


def run_demo(args: argparse.Namespace) -> dict:
    out = os.path.abspath(args.out)
    size = TINY if args.tiny else QUICK if args.quick else FULL
    check_inputs(args)
    os.makedirs(out, exist_ok=True)
    stages = Stages(args.quiet)

    shapes_argv = ["make-shapes", "--out", os.path.join(out, "shapes"), "--seed", str(args.seed),
                   "--train-images", str(size.train_images), "--test-images", str(size.test_images)]
    if args.unseen:
        shapes_argv += ["--unseen", args.unseen]
    stages.run("make-shapes", shapes_argv)

    cfg = demo_config(out, size, args.seed)
    cfg_path = os.path.join(out, "config.yaml")
    split = cfg.load_split()
    rows = {k: v for k, v in ROWS.items() if k in size.rows} | (ABLATION if args.ablation else {})
    os.makedirs(cfg.work_dir, exist_ok=True)
    clips = {which: prepare_clip(stages, args, out, size, which, cfg.split)
             for which in dict.fromkeys(v.clip for v in rows.values() if v.clip)}
    # The critic's feature layer is aligned with CLIP's embedding: every synthesis row gets the
    # same critic width, so the rows differ only in what they are named for.
    cfg.gan.d_feat = clips["main"].dim
    save_config(cfg, cfg_path)
    base = ["--config", cfg_path]

    stages.run("train-detector", ["train-detector"] + base)
    from vldus.detection.train import latest_checkpoint

    ckpt = latest_checkpoint(cfg.path("detector"))
    stages.run("extract-features", ["extract-features"] + base + ["--checkpoint", ckpt, "--classes", "seen",
                                                                  "--data-split", "train"])
    stages.run("extract-features", ["extract-features"] + base + ["--checkpoint", ckpt, "--classes", "unseen",
                                                                  "--data-split", "test"])
    stages.run("compat-classifier", ["train-unseen-classifier"] + base)
    from vldus.evaluation.cli import test_output_breakdown

    cache = cfg.path("test_cache")
    results: dict[str, dict] = {}
    ablation: dict[str, dict] = {}
    for name, variant in rows.items():
        synth_dir = cfg.path(f"synth_{name}")
        os.makedirs(synth_dir, exist_ok=True)
        classifier = os.path.join(synth_dir, "classifier_best.pth")
        overrides: list[str] = []
        if variant.clip:
            clip = clips[variant.clip]
            overrides = [f"gan.clip_arch={clip.arch}", f"gan.clip_weights={clip.weights}",
                         f"embeddings.text_file={clip.text_embeddings}"]
        if variant.clip_embeddings:
            overrides.append(f"embeddings.file={clips[variant.clip].text_embeddings}")
            compat = os.path.join(synth_dir, "compat_classifier.pth")
            stages.run(f"compat-classifier ({name})", ["train-unseen-classifier"] + base +
                       ["--out", compat, "--set", *overrides])
            overrides_argv = ["--compat-classifier", compat]
        else:
            overrides_argv = []
        if variant.generator is None:
            compat_as_classifier(cfg, classifier)
        else:
            stages.run(f"synthesizer ({name})", ["train-generator"] + base + [
                "--out-dir", synth_dir, "--checkpoint", ckpt, *variant.generator, *overrides_argv] +
                (["--set", *overrides] if overrides else []))
        results[name] = {}
        for setting in SETTINGS:
            dets = cfg.path("results", f"{name}_{setting}.json")
            metrics = cfg.path("results", f"{name}_{setting}_metrics.json")
            scoring = ["--gzsd-scoring", "published"] if setting == "gzsd_published" else []
            stages.run(f"test ({name})", ["test"] + base + [
                "--checkpoint", ckpt, "--syn-weights", classifier, f"--{setting.split('_')[0]}", *scoring,
                "--cache", cache, "--out", dets, "--metrics", metrics])
            with open(metrics) as f:
                results[name][setting] = json.load(f)
        ablation[name] = {"description": variant.description,
                          "zsd_map": results[name]["zsd"]["groups"]["unseen"]["map"]["0.5"],
                          "gzsd_hm": results[name]["gzsd"]["hm"]["map"]["0.5"],
                          "gzsd_published_hm": results[name]["gzsd_published"]["hm"]["map"]["0.5"],
                          "status": "ok"}
        if variant.generator is not None:
            ablation[name]["distill"] = distill_means(synth_dir)
        ablation[name]["zsd_breakdown"] = test_output_breakdown(cfg, cfg.path("results", f"{name}_zsd.json"), "zsd")

    for name in VARIANTS:
        if name not in ablation:
            ablation[name] = {"description": ROWS[name].description, "zsd_map": None, "gzsd_hm": None,
                              "gzsd_published_hm": None,
                              "status": "skipped: --quick / --tiny train one synthesizer (run vldus demo without them)"}
    ablation = {k: ablation[k] for k in [*VARIANTS, *(k for k in ablation if k not in VARIANTS)]}
    pictures = _pictures(stages, cfg, base, ckpt, METHOD, size.pictures, out)
    for name in ("features_2d.png", "losses.png"):
        src = os.path.join(cfg.path(f"synth_{METHOD}"), name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    main_clip = clips["main"]
    result = {"zsd": results[METHOD]["zsd"], "gzsd": results[METHOD]["gzsd"],
              "gzsd_published": results[METHOD]["gzsd_published"], "method": METHOD,
              "precision": cfg.gan.precision, "unseen": list(split.unseen),
              "clip": {"source": main_clip.source, "arch": main_clip.arch, "weights": main_clip.weights,
                       "dim": main_clip.dim, **main_clip.metrics},
              "ablation": ablation, "timings_s": stages.timings}
    write_json(os.path.join(out, "metrics.json"), result)
    report = write_report(out, result, pictures, size, args)
    _print_summary(result, report)
    return result


def _pictures(stages: Stages, cfg: Config, base: list[str], ckpt: str, method: str, count: int,
              out: str) -> list[str]:
    """Draw GZSD detections of the main method on the first ``count`` test images with an unseen object."""
    show = os.path.join(out, "pictures")
    stages.run("pictures", ["test"] + base + ["--checkpoint", ckpt, "--syn-weights",
                                              os.path.join(cfg.path(f"synth_{method}"), "classifier_best.pth"),
                                              "--gzsd", "--out", cfg.path("results", "pictures.json"),
                                              "--show-dir", show, "--max-images", str(count)])
    return sorted(os.path.join("pictures", p) for p in os.listdir(show) if p.endswith(".png"))


def _print_summary(result: dict, report: str) -> None:
    print("\n== vldus demo results (IoU 0.5)")
    for name, a in result["ablation"].items():
        if a["status"] != "ok":
            print(f"  {name:28s} {a['status']}")
            continue
        print(f"  {name:28s} ZSD mAP {_fmt(a['zsd_map']):>5s}   GZSD HM {_fmt(a['gzsd_hm']):>5s} "
              f"(published scoring {_fmt(a['gzsd_published_hm'])})")
    print(f"  main result: {result['method']}; total {sum(result['timings_s'].values()):.0f} s; report: {report}")


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="the whole pipeline on the embedded benchmark",
                       description="make-shapes, CLIP, detector, features, synthesizer (SU and VLDUS), "
                                   "ZSD/GZSD test and evaluation on the embedded benchmark; writes "
                                   "DIR/metrics.json and DIR/report.md")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="benchmark and training seed")
    p.add_argument("--unseen", default=None, metavar="A,B,...", help="unseen classes (default: make-shapes')")
    p.add_argument("--quick", action="store_true", help="a smaller, shorter run (about 3 minutes)")
    p.add_argument("--tiny", action="store_true",
                   help="a smoke run of every stage in about a minute (no meaningful metrics)")
    p.add_argument("--ablation", action="store_true",
                   help="also the rows: CLIP text embeddings, released behaviour, distillation into D "
                        "only, CLIP trained without the unseen classes")
    p.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="your own open_clip / OpenAI CLIP weights for the distillation (default: "
                        "train a small CLIP for the benchmark with vldus train-clip)")
    p.add_argument("--clip-arch", default=None, metavar="NAME_OR_JSON",
                   help="open_clip architecture of --clip-weights (default ViT-B-32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        run_demo(args)
    except StageFailed as e:
        if e.code == 2:  # bad input: the stage has printed its one-line error
            return 2
        print(f"vldus demo: {e}", file=sys.stderr)
        return 1
    return 0
