"""``vldus demo``: the whole zero-shot pipeline on the embedded benchmark, on CPU in minutes.

make-shapes -> train-detector (seen classes) -> extract-features (seen train, unseen test) ->
train-unseen-classifier (compatibility classifier) -> train-generator -> test (ZSD, GZSD) ->
metrics. Each stage is the stage's own command (``vldus.cli.main``), run in this process with the
config written to ``OUT/config.yaml``; nothing of the pipeline is implemented twice.

The ablation uses the same detector and features:

- ``no_synthesis``: the compatibility classifier alone: its projection scored against the
  unseen class embeddings, turned into classifier rows ``E[[0] + unseen] @ W`` and injected like
  a synthesized classifier;
- ``synthesis_su``: the synthesizer with SU's objective (WGAN-GP, C_s, C_u, mode seeking; no CLIP);
- ``synthesis_vldus``: plus the CLIP vision-language distillation; needs ``--clip-weights``, else
  reported as ``skipped: <reason>``.

Outputs: ``OUT/metrics.json`` (INTERFACES.md), ``OUT/report.md`` with tables and pictures, the
stage outputs under ``OUT/work`` and the benchmark under ``OUT/shapes``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from vldus.config import Config, load_config, save_config
from vldus.errors import InputError
from vldus.files import write_json

VARIANTS = ("no_synthesis", "synthesis_su", "synthesis_vldus")
SETTINGS = ("zsd", "gzsd")


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
    pictures: int = 6


FULL = DemoSize(train_images=600, test_images=200, detector_epochs=None, detector_warmup=None,
                gan_epochs=10, gan_epoch_budget=8000, compat_epochs=30)
QUICK = DemoSize(train_images=260, test_images=70, detector_epochs=2, detector_warmup=40,
                 gan_epochs=16, gan_epoch_budget=4000, compat_epochs=15, pictures=3)


class StageFailed(RuntimeError):
    pass


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
            raise StageFailed(f"stage {name} failed (exit code {rc})")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def demo_config(out: str, size: DemoSize, seed: int, clip_weights: Optional[str]) -> Config:
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
        cfg.detector.backbone_weights = default_backbone_weights(cfg)
    if size.detector_epochs is not None:
        cfg.train.epochs = size.detector_epochs
        cfg.train.lr_steps = [s for s in cfg.train.lr_steps if s < size.detector_epochs]
    if size.detector_warmup is not None:
        cfg.train.warmup_iters = size.detector_warmup
    cfg.gan.epochs = size.gan_epochs
    cfg.gan.epoch_budget = size.gan_epoch_budget
    cfg.compat.epochs = size.compat_epochs
    cfg.compat.lr_step = min(cfg.compat.lr_step, max(1, 2 * size.compat_epochs // 3))
    cfg.gan.clip_weights = clip_weights
    cfg.train.seed = cfg.features.seed = seed
    cfg.gan.seed = cfg.compat.seed = 806 + seed
    return cfg


# --------------------------------------------------------------------------------------------
# The no-synthesis baseline
# --------------------------------------------------------------------------------------------
def compat_as_classifier(cfg: Config, out_path: str) -> None:
    """Write the compatibility classifier as injectable rows: logits ``fc(x) · E_k`` for
    k in [background] + unseen equal ``x · (E_k W) + E_k · b``. Same layout as classifier_best.pth."""
    from vldus.data.embeddings import load_class_embeddings
    from vldus.synthesis.compat import compat_classifier_path

    split = cfg.load_split()
    emb = torch.from_numpy(load_class_embeddings(cfg.embeddings.file, split, cfg.embeddings.spectral_norm))
    state = torch.load(compat_classifier_path(cfg), map_location="cpu", weights_only=True)
    rows = emb[[0] + split.unseen_ids]  # (1+U, d)
    torch.save({"fc.weight": rows @ state["fc.weight"].float(), "fc.bias": rows @ state["fc.bias"].float()},
               out_path)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.1f}"


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
    ablation = result["ablation"]
    lines = [
        "# vldus demo: zero-shot detection on the embedded benchmark", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Seed {args.seed}"
        f"{', quick run' if args.quick else ''}.",
        f"Benchmark: {size.train_images} training and {size.test_images} test images; unseen classes: "
        f"{', '.join(result['unseen'])}.", "",
        f"Main result: **{result['method']}**.", "",
        "## Ablation (IoU 0.5, same detector and features)", "",
        "| variant | ZSD mAP | GZSD HM | status |", "|---|---|---|---|",
    ]
    for name in VARIANTS:
        a = ablation[name]
        ok = a["status"] == "ok"
        lines.append(f"| {name} | {_fmt(a['zsd_map']) if ok else '-'} | {_fmt(a['gzsd_hm']) if ok else '-'} | {a['status']} |")
    for setting in SETTINGS:
        lines += ["", f"## {setting.upper()} ({result['method']})", "", metrics_table(result[setting])]
    lines += ["", "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    lines += ["", "## Pictures", ""]
    lines += ["Detections (GZSD) on test images with unseen objects; unseen classes in their own colour:", ""]
    lines += [f"![detections]({p})" for p in pictures]
    for title, name in (("Synthesized vs real features (PCA)", "features_2d.png"), ("GAN losses", "losses.png")):
        if os.path.isfile(os.path.join(out, name)):
            lines += ["", f"### {title}", "", f"![{title}]({name})"]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> dict:
    out = os.path.abspath(args.out)
    size = QUICK if args.quick else FULL
    if args.clip_weights and not os.path.isfile(args.clip_weights):
        raise InputError(args.clip_weights, "CLIP weights file not found")
    os.makedirs(out, exist_ok=True)
    stages = Stages(args.quiet)

    shapes_argv = ["make-shapes", "--out", os.path.join(out, "shapes"), "--seed", str(args.seed),
                   "--train-images", str(size.train_images), "--test-images", str(size.test_images)]
    if args.unseen:
        shapes_argv += ["--unseen", args.unseen]
    stages.run("make-shapes", shapes_argv)

    cfg = demo_config(out, size, args.seed, args.clip_weights)
    cfg_path = os.path.join(out, "config.yaml")
    save_config(cfg, cfg_path)
    split = cfg.load_split()
    base = ["--config", cfg_path]

    stages.run("train-detector", ["train-detector"] + base)
    from vldus.detection.train import latest_checkpoint

    ckpt = latest_checkpoint(cfg.path("detector"))
    stages.run("extract-features", ["extract-features"] + base + ["--checkpoint", ckpt, "--classes", "seen",
                                                                  "--data-split", "train"])
    stages.run("extract-features", ["extract-features"] + base + ["--checkpoint", ckpt, "--classes", "unseen",
                                                                  "--data-split", "test"])
    stages.run("compat-classifier", ["train-unseen-classifier"] + base)

    results: dict[str, dict] = {}
    ablation: dict[str, dict] = {}
    for variant in VARIANTS:
        synth_dir = cfg.path(f"synth_{variant}")
        if variant == "synthesis_vldus" and not args.clip_weights:
            ablation[variant] = {"zsd_map": 0.0, "gzsd_hm": 0.0,
                                 "status": "skipped: no --clip-weights (CLIP ViT weights file) given"}
            continue
        if variant == "no_synthesis":
            os.makedirs(synth_dir, exist_ok=True)
            classifier = os.path.join(synth_dir, "classifier_best.pth")
            compat_as_classifier(cfg, classifier)
        else:
            distill = ["--distill", "active", "--clip-weights", args.clip_weights] if variant == "synthesis_vldus" \
                else ["--distill", "off"]
            stages.run(f"synthesizer ({variant})", ["train-generator"] + base + ["--out-dir", synth_dir,
                                                                               "--checkpoint", ckpt] + distill)
            classifier = os.path.join(synth_dir, "classifier_best.pth")
        results[variant] = {}
        for setting in SETTINGS:
            dets = cfg.path("results", f"{variant}_{setting}.json")
            metrics = cfg.path("results", f"{variant}_{setting}_metrics.json")
            stages.run(f"test ({variant})", ["test"] + base + ["--checkpoint", ckpt, "--syn-weights", classifier,
                                                               f"--{setting}", "--out", dets, "--metrics", metrics])
            with open(metrics) as f:
                results[variant][setting] = json.load(f)
        ablation[variant] = {"zsd_map": results[variant]["zsd"]["groups"]["unseen"]["map"]["0.5"],
                             "gzsd_hm": results[variant]["gzsd"]["hm"]["map"]["0.5"], "status": "ok"}

    ran = [v for v in VARIANTS if ablation[v]["status"] == "ok" and v != "no_synthesis"] or ["no_synthesis"]
    method = max(ran, key=lambda v: ablation[v]["zsd_map"])
    pictures = _pictures(stages, cfg, base, ckpt, method, size.pictures, out)
    for name in ("features_2d.png", "losses.png"):
        src = os.path.join(cfg.path(f"synth_{method}"), name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    result = {"zsd": results[method]["zsd"], "gzsd": results[method]["gzsd"], "method": method,
              "unseen": list(split.unseen), "ablation": ablation, "timings_s": stages.timings}
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
        if a["status"] == "ok":
            print(f"  {name:16s} ZSD mAP {a['zsd_map']:5.1f}   GZSD HM {a['gzsd_hm']:5.1f}")
        else:
            print(f"  {name:16s} {a['status']}")
    print(f"  total {sum(result['timings_s'].values()):.0f} s; report: {report}")


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="the whole pipeline on the embedded benchmark",
                       description="make-shapes, detector, features, synthesizer, ZSD/GZSD test and "
                                   "evaluation on the embedded benchmark; writes DIR/metrics.json and DIR/report.md")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="benchmark and training seed")
    p.add_argument("--unseen", default=None, metavar="A,B,...", help="unseen classes (default: make-shapes')")
    p.add_argument("--quick", action="store_true", help="a smaller, shorter run (about 3 minutes)")
    p.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="open_clip ViT-B-32 weights: adds the synthesis_vldus row (CLIP distillation)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        run_demo(args)
    except StageFailed as e:  # the stage has already printed its one-line error
        print(f"vldus demo: {e}", file=sys.stderr)
        return 1
    return 0
