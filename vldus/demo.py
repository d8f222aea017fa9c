"""``vldus demo``: the whole zero-shot pipeline (VLDUS) on the embedded benchmark, on CPU in minutes.

make-shapes (train, seen-only validation, test) -> train-clip (a small CLIP for the benchmark,
unless ``--clip-weights`` names one) -> train-detector --validate (seen classes) ->
extract-features (seen train, seen validation, unseen test) -> train-unseen-classifier
(compatibility classifier) -> train-generator (per variant) -> test (ZSD, GZSD, GZSD with the
released inference: the published scoring and the released box deltas) -> export (the main row)
-> metrics. Each stage is the stage's own command
(``vldus.cli.main``), run in this process with the config written to ``OUT/config.yaml``;
nothing of the pipeline is implemented twice. The detector runs once over the test images
(``vldus test --cache``); every variant and setting re-scores its stored box features.

Stages that do not depend on each other run side by side on a machine with two or more cores,
each with a share of torch's threads (intra-op threads speed these small models up far less than
a second process does): the CLIP trains in a child process (``python -m vldus.cli train-clip``,
output in ``OUT/work/clip*.log``) while make-shapes draws the benchmark and the detector trains
as two torchrun processes (half of the batch each, :func:`detector_ranks`), and the synthesizers
train two at a time (the second in a child process, ``OUT/work/synth_<row>.log``).

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

Rows that ask the CLIP about each of the detector's boxes instead of (or besides) synthesizing
(:data:`REGION_ROWS`, ``vldus test --scoring``, docs/clip_regions.md), on the same detector,
boxes and CLIP: ``clip_regions`` (the CLIP alone, no synthesis) and ``vldus_ensemble`` (ViLD's
ensemble of ``synthesis_vldus`` and ``clip_regions``); in the default size and with
``--ablation``, which adds both with the CLIP trained without the unseen classes.

Outputs: ``OUT/metrics.json`` (docs/formats.md), ``OUT/report.md`` with tables and pictures, the
stage outputs under ``OUT/work``, the CLIP under ``OUT/clip``, the benchmark under ``OUT/shapes``
and the main row's model bundle (``vldus detect --model OUT/bundle``) under ``OUT/bundle``.
``metrics.json`` holds each stage's wall time (``timings_s``; a stage run several times: the sum)
and the whole run's (``total_s``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from vldus.config import Config, add_set_argument, load_config, save_config
from vldus.errors import InputError, require_file
from vldus.files import write_json

VARIANTS = ("no_synthesis", "synthesis_su", "synthesis_vldus")
METHOD = "synthesis_vldus"  # the main result, fixed in advance
DEFAULT_OUT = "demo_out"  # as the Makefile's DEMO_OUT
SETTINGS = ("zsd", "gzsd", "gzsd_published")  # gzsd: the default GZSD scoring; the released inference
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
    region_rows: bool = True  # clip_regions and vldus_ensemble (:data:`REGION_ROWS`)
    config: tuple[str, ...] = ()  # KEY=VALUE overrides of the shapes config for this size
    # On two or more cores, train the CLIP in a child process beside the detector; the smoke run
    # trains it here afterwards (its detector takes seconds, less than the child's imports).
    clip_beside: bool = True


# The default demo's GAN: 5 epochs at lr 2e-4 (half the iterations of 10 at 1e-4, the same or
# better mAP on three seeds' detectors: docs/history.md, session 13).
FULL = DemoSize(train_images=600, test_images=200, detector_epochs=None, detector_warmup=None,
                gan_epochs=5, gan_epoch_budget=8000, compat_epochs=30, gan_lr=2e-4)
# The quick demo and the smoke run train a cheaper detector than the config's: the images at their
# own 160 px (no upscale), 64 FPN channels (RoIAlign, box head and RPN head all shrink with them),
# 150 proposals, 32 RoIs per image and one RoIAlign sample per bin (RoIAlign's backward is the
# largest part of a CPU step; docs/benchmarks.md), lr 0.005. Neither channels-last nor the gather
# RoIAlign speeds this small detector up, so it keeps NCHW and torchvision's kernel: the gather's
# other rounding trained a worse quick detector with the AVX2 variables (ZSD 54.8, floor 55).
SMALL_DETECTOR = ("detector.min_size=160", "detector.max_size=160", "detector.anchor_sizes=[10,20,40,80,160]",
                  "detector.fpn_channels=64", "detector.rpn_post_nms_train=150", "detector.roi_batch_size=32",
                  "detector.roi_sampling_ratio=1", "detector.channels_last=false", "detector.roi_align=torchvision",
                  "train.lr=0.005")
# The quick detector must converge (5 epochs at 64 FPN channels: a fifth less time than 4 epochs
# at 128, and a better detector): an unconverged one turns another CPU's fp32 round-off into a
# different result (docs/history.md, quick demo). The test suite runs it; the other candidates
# measured are in docs/history.md.
QUICK = DemoSize(train_images=260, test_images=70, detector_epochs=5, detector_warmup=40,
                 gan_epochs=8, gan_epoch_budget=4000, compat_epochs=15, clip_steps=150, gan_lr=4e-4, pictures=3,
                 rows=("no_synthesis", "synthesis_vldus"), region_rows=False, config=SMALL_DETECTOR)
# A smoke run of every stage (benchmarks/device_check.sh --tiny): seconds, no meaningful metrics.
TINY = DemoSize(train_images=24, test_images=8, detector_epochs=1, detector_warmup=2,
                gan_epochs=1, gan_epoch_budget=256, compat_epochs=2, clip_steps=4, pictures=1,
                rows=("no_synthesis", "synthesis_vldus"), region_rows=False, config=SMALL_DETECTOR,
                clip_beside=False)


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


@dataclass(frozen=True)
class RegionRow:
    """A row scored with ``vldus test --scoring {scoring}`` and the CLIP ``clip`` ("main" or
    "exclude_unseen"); ``classifier``: the synthesis row whose classifier it uses (None: none)."""

    name: str
    scoring: str
    clip: str
    classifier: Optional[str] = None
    description: str = ""


REGION_ROWS = {
    "clip_regions": RegionRow("clip_regions", "clip-regions", "main",
                              description="CLIP on the detector's boxes x the detector's object probability (no synthesis)"),
    "vldus_ensemble": RegionRow("vldus_ensemble", "ensemble", "main", METHOD,
                                description="ViLD's ensemble of synthesis_vldus and clip_regions (CLIP weight 1/3 "
                                            "seen, 2/3 unseen; in GZSD the CLIP names unseen classes among "
                                            "the unseen names only)"),
}
REGION_ABLATION = {
    "clip_regions_exclude_unseen": RegionRow(
        "clip_regions_exclude_unseen", "clip-regions", "exclude_unseen",
        description="clip_regions with the CLIP trained without the unseen classes"),
    "vldus_ensemble_exclude_unseen": RegionRow(
        "vldus_ensemble_exclude_unseen", "ensemble", "exclude_unseen", METHOD,
        description="synthesis_vldus ensembled with the CLIP trained without the unseen classes"),
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


@dataclass
class Background:
    """A stage command running in a child process (:meth:`Stages.start`)."""

    name: str
    proc: subprocess.Popen
    log: str
    beside: str  # the stage that runs in the parent meanwhile
    started: float
    ended: float = 0.0  # noted by ``waiter`` the moment the process ends
    waiter: Optional[threading.Thread] = None

    def _wait(self) -> None:
        self.proc.wait()
        self.ended = time.perf_counter()


class Stages:
    """Runs stage commands in this process and records each one's wall time (seconds, summed
    over the runs of a stage that runs several times)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self.concurrent: dict[str, str] = {}  # {stage run in a child process: the stage run here beside it}

    def run(self, name: str, argv: list[str]) -> None:
        from vldus import cli

        print(f"\n== {name}: vldus {' '.join(argv)}", flush=True)
        with self.timed(name):
            rc = cli.main(argv + (["--quiet"] if self.quiet else []))
        if rc:
            raise StageFailed(name, rc)

    def run_ranks(self, name: str, argv: list[str], ranks: int, threads: int) -> None:
        """Run a stage command as ``ranks`` torchrun processes on this machine (gloo on CPU),
        ``threads`` torch threads each, and wait for them; their output goes to this terminal."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "vldus.cli", *argv, *(["--quiet"] if self.quiet else [])]
        print(f"\n== {name} ({ranks} processes, torchrun): vldus {' '.join(argv)}", flush=True)
        with self.timed(name):
            rc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
                                stdin=subprocess.DEVNULL).returncode
        if rc:
            raise StageFailed(name, rc)

    def start(self, name: str, argv: list[str], threads: int, log: str, beside: str) -> "Background":
        """Run a stage command in a child process with ``threads`` torch threads, its output
        going to ``log``, beside the stage ``beside`` here; :meth:`finish` waits for it."""
        print(f"\n== {name} (in a child process, log {log}): vldus {' '.join(argv)}", flush=True)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "vldus.cli", *argv, *(["--quiet"] if self.quiet else [])],
                                    env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        job = Background(name, proc, log, beside, time.perf_counter())
        job.waiter = threading.Thread(target=job._wait, daemon=True)
        job.waiter.start()
        return job

    def finish(self, job: "Background") -> None:
        """Wait for ``job``; StageFailed (after the end of its log) when it failed."""
        job.waiter.join()
        rc, elapsed = job.proc.returncode, job.ended - job.started
        self.timings[job.name] = self.timings.get(job.name, 0.0) + elapsed
        self.concurrent[job.name] = job.beside
        print(f"== {job.name}: {elapsed:.1f} s (in a child process)", flush=True)
        if rc:
            with open(job.log, errors="replace") as f:
                tail = f.read().strip().splitlines()
            print("\n".join(tail[-1:] if rc == 2 else tail[-20:]), file=sys.stderr)
            raise StageFailed(job.name, rc)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the enclosed work as (part of) stage ``name``."""
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + elapsed
        print(f"== {name}: {elapsed:.1f} s", flush=True)


# --------------------------------------------------------------------------------------------
# Inputs and config
# --------------------------------------------------------------------------------------------
def check_inputs(args: argparse.Namespace) -> None:
    """Refuse bad input before any work (one line, exit 2): unknown or impossible unseen classes,
    a CLIP file that is not there, a ``--set`` the shapes config does not take."""
    from vldus.data.shapes import check_unseen

    if args.unseen:
        check_unseen([n.strip() for n in args.unseen.split(",") if n.strip()], source="--unseen")
    if args.clip_weights:
        require_file(args.clip_weights, "CLIP weights file (--clip-weights)")
    if args.clip_arch and args.clip_arch.endswith(".json"):
        require_file(args.clip_arch, "open_clip model config (--clip-arch)")
    if args.clip_arch and not args.clip_weights:
        raise InputError("--clip-arch", "needs --clip-weights (the demo trains its own CLIP otherwise)")
    load_config("shapes", args.set)


def demo_config(out: str, size: DemoSize, seed: int, overrides: Sequence[str] = ()) -> Config:
    """The bundled ``shapes`` config pointed at OUT, sized by ``size``, seeded by ``seed``;
    ``overrides`` (``vldus demo --set``) come after the size's own, the training lengths after both."""
    from vldus.detection.model import default_backbone_weights

    cfg = load_config("shapes", [*size.config, *overrides])
    data = os.path.join(out, "shapes")
    cfg.name = "shapes_demo"
    cfg.split = os.path.join(data, "split.json")
    cfg.work_dir = os.path.join(out, "work")
    for source, part in ((cfg.data.train, "train"), (cfg.data.val, "val"), (cfg.data.test, "test")):
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
def clip_training(args: argparse.Namespace, out: str, size: DemoSize, which: str,
                  split_file: str) -> Optional[tuple[str, list[str], str]]:
    """(stage name, ``train-clip`` argv, its --out folder) of the CLIP of ``which`` ("main" or
    "exclude_unseen"); None when it is the user's (``--clip-weights``)."""
    if which == "main" and args.clip_weights:
        return None
    folder = os.path.join(out, "clip" if which == "main" else "clip_exclude_unseen")
    argv = ["train-clip", "--out", folder, "--seed", str(args.seed)]
    if size.clip_steps is not None:
        argv += ["--steps", str(size.clip_steps)]
    if which == "exclude_unseen":
        argv += ["--exclude-unseen", split_file]
    return ("train-clip" if which == "main" else "train-clip (exclude unseen)"), argv, folder


def prepare_clip(stages: Stages, args: argparse.Namespace, out: str, size: DemoSize, which: str,
                 split_file: str, trained: bool = False) -> ClipFiles:
    """The CLIP of ``which`` ("main" or "exclude_unseen"): the user's (``--clip-weights``) or one
    trained by ``vldus train-clip`` (here, unless ``trained``: already in a child process); plus
    the class text embeddings it gives (``vldus embed``)."""
    from vldus.clip import load_open_clip

    training = clip_training(args, out, size, which, split_file)
    if training is None:
        clip = ClipFiles(args.clip_arch or "ViT-B-32", args.clip_weights, "--clip-weights")
    else:
        name, argv, folder = training
        if not trained:
            stages.run(name, argv)
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
    from vldus.detection.gzsd import describe_scoring
    from vldus.evaluation.breakdown import KIND_TEXT, markdown_summary

    ablation = result["ablation"]
    clip = result["clip"]
    acc = clip.get("zero_shot_accuracy") or {}
    lines = [
        "# vldus demo: zero-shot detection on the embedded benchmark", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {result['precision']}. "
        f"Seed {args.seed}{', quick run' if args.quick else ', tiny run' if args.tiny else ''}.",
        f"Benchmark: {size.train_images} training and {size.test_images} test images (and seen-only "
        f"validation images); unseen classes: {', '.join(result['unseen'])}.",
        f"CLIP: {clip['source']} ({clip['arch']}, {clip['weights']})"
        + (f"; zero-shot crop accuracy {acc.get('all', 0):.1f} % (unseen classes {acc.get('unseen', 0):.1f} %)"
           if acc else "") + ".", "",
        f"Main result (fixed in advance): **{result['method']}**, exported to `{result['bundle']}` "
        f"(`vldus detect IMAGES --model {result['bundle']} --classes ...`).", "",
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
        ran = result[setting].get(f"{result[setting]['setting']}_scoring")
        lines += ["", f"## {title} ({result['method']})", ""]
        lines += [f"Scoring: {describe_scoring(ran)}; box deltas: {result[setting].get('box_regression')}.", ""] \
            if ran else []
        lines += [metrics_table(result[setting])]
    val = result["detector"].get("per_epoch")
    if val:
        lines += ["", "## Detector", "", "Seen mAP@0.5 on the validation images (never trained on), per epoch: "
                  + ", ".join(f"{v:.1f}" for v in val) + "."]
    lines += ["", "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    beside = result["concurrent_stages"]
    lines += [f"| {k}{f' (in a child process, alongside {beside[k]})' if k in beside else ''} | {v:.1f} |"
              for k, v in result["timings_s"].items()]
    lines += [f"| **total** | **{result['total_s']:.1f}** |"]
    lines += ["", "## Pictures", ""]
    lines += ["Detections (GZSD) on test images with unseen objects; unseen classes in their own colour:", ""]
    lines += [f"![detections]({p})" for p in pictures]
    if result.get("disagreement_picture"):
        lines += ["", "ZSD detections (score >= the display threshold) of synthesis_vldus, clip_regions and "
                  "vldus_ensemble, left to right, on the test image where they name the most objects "
                  "differently:", "", f"![disagreement]({result['disagreement_picture']})"]
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


@dataclass
class DemoRun:
    """What the steps of one demo run share: the options, the output folder, the config and the
    stage runner (each step adds what the next ones need)."""

    args: argparse.Namespace
    out: str
    size: DemoSize
    stages: Stages
    cfg: Config
    cfg_path: str  # OUT/config.yaml, passed to every stage command
    rows: dict[str, Variant]
    region_rows: dict[str, RegionRow] = field(default_factory=dict)
    clips: dict[str, ClipFiles] = field(default_factory=dict)
    checkpoint: str = ""  # the trained detector

    @property
    def base(self) -> list[str]:
        return ["--config", self.cfg_path]


def run_demo(args: argparse.Namespace) -> dict:
    """The whole demo, step by step; every step runs stage commands (see the module docstring)."""
    started = time.perf_counter()
    run = prepare_inputs(args)
    # The main CLIP renders its own images: it trains while make-shapes draws the benchmark (one
    # core) and the detector trains; a CLIP trained without the unseen classes reads their names
    # from the benchmark's split, so it starts after make-shapes.
    clip_jobs = start_clip_training(run, [c for c in needed_clips(run) if c == "main"],
                                    "make-shapes, train-detector")
    with beside(list(clip_jobs.values())):
        make_benchmark(run)
    clip_jobs |= start_clip_training(run, [c for c in needed_clips(run) if c != "main"], "train-detector")
    detector = train_seen_detector(run, list(clip_jobs.values()))
    prepare_clips(run, clip_jobs)
    extract_features(run)
    results = rows_and_results(run)
    pictures = draw_pictures(run)
    disagreement = disagreement_picture(run, [METHOD, *REGION_ROWS]) if set(REGION_ROWS) <= set(results) else None
    bundle = export_main_row(run)
    result = collect_metrics(run, results, detector, bundle)
    result["disagreement_picture"] = disagreement
    result["total_s"] = time.perf_counter() - started
    write_json(os.path.join(run.out, "metrics.json"), result)
    report = write_report(run.out, result, pictures, run.size, args)
    _print_summary(result, report)
    return result


def prepare_inputs(args: argparse.Namespace) -> DemoRun:
    """Check the options and write the demo's config (the benchmark: :func:`make_benchmark`)."""
    out = os.path.abspath(args.out)
    size = TINY if args.tiny else QUICK if args.quick else FULL
    check_inputs(args)
    os.makedirs(out, exist_ok=True)
    cfg = demo_config(out, size, args.seed, args.set)
    os.makedirs(cfg.work_dir, exist_ok=True)
    cfg_path = os.path.join(out, "config.yaml")
    save_config(cfg, cfg_path)  # rewritten with the CLIP's width (prepare_clips)
    return DemoRun(args, out, size, Stages(args.quiet), cfg, cfg_path, *demo_rows(size, args.ablation))


def make_benchmark(run: DemoRun) -> None:
    """``vldus make-shapes``: the benchmark's train, validation and test images under OUT/shapes."""
    argv = ["make-shapes", "--out", os.path.join(run.out, "shapes"), "--seed", str(run.args.seed),
            "--train-images", str(run.size.train_images), "--test-images", str(run.size.test_images)]
    run.stages.run("make-shapes", argv + (["--unseen", run.args.unseen] if run.args.unseen else []))


def demo_rows(size: DemoSize, ablation: bool) -> tuple[dict[str, Variant], dict[str, RegionRow]]:
    """The synthesis rows and the CLIP-on-boxes rows a run of this size makes."""
    rows = {k: v for k, v in ROWS.items() if k in size.rows} | (ABLATION if ablation else {})
    region_rows = (REGION_ROWS if size.region_rows or ablation else {}) | (REGION_ABLATION if ablation else {})
    if METHOD not in rows:  # the ensembles need the main row's classifier
        region_rows = {k: v for k, v in region_rows.items() if v.classifier is None}
    return rows, region_rows


def needed_clips(run: DemoRun) -> list[str]:
    """The CLIPs ("main", "exclude_unseen") the run's rows distil from or score with."""
    return list(dict.fromkeys([v.clip for v in run.rows.values() if v.clip] +
                              [v.clip for v in run.region_rows.values()]))


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def start_clip_training(run: DemoRun, which_clips: Sequence[str], alongside: str) -> dict[str, Background]:
    """On two or more cores: start training those of ``which_clips`` the demo trains itself, each
    in a child process with half of torch's threads (module doc), beside the stages named
    ``alongside``; {which: job}. {} on one core or when the size says so (they train in turn in
    :func:`prepare_clips`)."""
    if usable_cores() < 2 or not run.size.clip_beside:
        return {}
    threads = child_threads()
    jobs = {}
    for which in which_clips:
        training = clip_training(run.args, run.out, run.size, which, run.cfg.split)
        if training is not None:
            name, argv, folder = training
            jobs[which] = run.stages.start(name, argv, threads,
                                           os.path.join(run.cfg.work_dir, os.path.basename(folder) + ".log"),
                                           alongside)
    return jobs


def prepare_clips(run: DemoRun, jobs: dict[str, Background]) -> None:
    """The CLIP(s) the rows distil from (``jobs``: those training in child processes, waited for
    here); then the config is written with the critic's width."""
    for job in jobs.values():
        run.stages.finish(job)
    run.clips = {which: prepare_clip(run.stages, run.args, run.out, run.size, which, run.cfg.split,
                                     trained=which in jobs)
                 for which in needed_clips(run)}
    # The critic's feature layer is aligned with CLIP's embedding: every synthesis row gets the
    # same critic width, so the rows differ only in what they are named for.
    run.cfg.gan.d_feat = run.clips["main"].dim
    save_config(run.cfg, run.cfg_path)


def train_seen_detector(run: DemoRun, clips: Sequence[Background] = ()) -> dict:
    """``vldus train-detector --validate`` (``clips``: the CLIPs training in child processes
    meanwhile); returns its validation seen mAP (:func:`detector_validation`)."""
    from vldus.detection.train import latest_checkpoint

    argv = ["train-detector"] + run.base + ["--validate"]
    ranks = detector_ranks(torch.get_num_threads(), run.cfg.train.batch_size, torch.cuda.is_available())
    with beside(clips):
        if ranks == 1:
            run.stages.run("train-detector", argv)
        else:  # the same global batch, split over the processes; the threads the CLIPs left, shared
            run.stages.run_ranks("train-detector", argv + ["--set", f"train.batch_size={run.cfg.train.batch_size // ranks}"],
                                 ranks, max(1, torch.get_num_threads() // ranks))
    run.checkpoint = latest_checkpoint(run.cfg.path("detector"))
    return detector_validation(run.cfg.path("detector"))


def detector_ranks(threads: int, batch_size: int, cuda: bool) -> int:
    """Processes the detector trains in: on the CPU, 2 (torchrun, half of the ``threads`` each,
    half of the batch each) when torch has two or more threads here and the batch splits in two;
    else 1 (in this process; always with ``cuda``: one GPU takes the whole batch, and torchrun's
    second process would ask for a second GPU). On 2 cores two one-thread processes train this
    small detector 1.5x faster than one process (docs/history.md); the CLIPs' child processes run
    beside them."""
    return 2 if not cuda and threads >= 2 and batch_size % 2 == 0 else 1


def child_threads() -> int:
    """torch threads of a stage in a child process beside a stage here: half of them."""
    return max(1, torch.get_num_threads() // 2)


@contextlib.contextmanager
def beside(jobs: Sequence[Background]) -> Iterator[None]:
    """While the enclosed stages run here, ``jobs`` run in child processes: half of torch's
    threads are left to them (intra-op threads speed these small models up far less than a second
    process does), and a failure here kills them. The caller waits for them (:meth:`Stages.finish`)."""
    threads = torch.get_num_threads()
    if jobs:
        torch.set_num_threads(max(1, threads - child_threads()))
    try:
        yield
    except BaseException:
        for job in jobs:
            job.proc.kill()
        raise
    finally:
        torch.set_num_threads(threads)


def detector_validation(det_dir: str) -> dict:
    """``{"val_seen_map50": last epoch's, "per_epoch": [...]}``: seen mAP@0.5 on the validation
    images, from the detector's ``metrics.json`` (``validation.per_epoch``) or else from the epoch
    records of its ``log.jsonl``; ``{}`` when neither has one."""
    metrics_file = os.path.join(det_dir, "metrics.json")
    if os.path.isfile(metrics_file):
        with open(metrics_file) as f:
            records = json.load(f).get("validation", {}).get("per_epoch", [])
    else:
        with open(os.path.join(det_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    values = [r["val_seen_map50"] if "val_seen_map50" in r else r["val"]["seen_map"]["0.5"]
              for r in records if "val_seen_map50" in r or "val" in r]
    return {"val_seen_map50": values[-1], "per_epoch": values} if values else {}


def extract_features(run: DemoRun) -> None:
    """RoI features of the seen classes on the training images (the synthesizer's real features)
    and on the validation images (GZSD calibration), of the unseen classes on the test images
    (reported only); then the compatibility classifier on the training features."""
    for stage, classes, data_split in (("extract-features", "seen", "train"),
                                       ("extract-features (val)", "seen", "val"),
                                       ("extract-features (unseen test)", "unseen", "test")):
        run.stages.run(stage, ["extract-features"] + run.base + [
            "--checkpoint", run.checkpoint, "--classes", classes, "--data-split", data_split])
    run.stages.run("compat-classifier", ["train-unseen-classifier"] + run.base)


def row_classifier(run: DemoRun, name: str, variant: Variant) -> Optional[tuple[str, list[str]]]:
    """Make the row's unseen classifier (``OUT/work/synth_<row>/classifier_best.pth``) where that
    is quick: the compatibility classifier as rows, and, for a row named on CLIP text embeddings,
    its compatibility classifier on them. Returns the synthesizer still to train as (stage name,
    ``train-generator`` argv); None for a row without synthesis."""
    synth_dir = run.cfg.path(f"synth_{name}")
    os.makedirs(synth_dir, exist_ok=True)
    overrides: list[str] = []
    if variant.clip:
        clip = run.clips[variant.clip]
        overrides = [f"gan.clip_arch={clip.arch}", f"gan.clip_weights={clip.weights}",
                     f"embeddings.text_file={clip.text_embeddings}"]
    compat_argv: list[str] = []
    if variant.clip_embeddings:
        overrides.append(f"embeddings.file={run.clips[variant.clip].text_embeddings}")
        compat = os.path.join(synth_dir, "compat_classifier.pth")
        run.stages.run(f"compat-classifier ({name})", ["train-unseen-classifier"] + run.base +
                       ["--out", compat, "--set", *overrides])
        compat_argv = ["--compat-classifier", compat]
    if variant.generator is None:
        with run.stages.timed(f"classifier ({name})"):
            compat_as_classifier(run.cfg, os.path.join(synth_dir, "classifier_best.pth"))
        return None
    return f"synthesizer ({name})", ["train-generator"] + run.base + [
        "--out-dir", synth_dir, "--checkpoint", run.checkpoint, *variant.generator, *compat_argv] + \
        (["--set", *overrides] if overrides else [])


def rows_and_results(run: DemoRun) -> dict[str, dict]:
    """Every row's unseen classifier and test passes; {row: {setting: metrics}} in the rows'
    order. On two or more cores the synthesizers train two at a time, each with half of torch's
    threads (one left over alone with all of them): the second of a pair, in the rows' order, in
    a child process (log ``OUT/work/synth_<row>.log``), while the first trains here and then the
    rows whose classifiers are ready (and the ``clip_regions`` rows) are tested here."""
    synthesizers = [(name, *stage) for name, variant in run.rows.items()
                    if (stage := row_classifier(run, name, variant)) is not None]
    ready = [name for name in run.rows if name not in {row for row, _, _ in synthesizers}]
    results: dict[str, dict] = {}
    at_once = 2 if usable_cores() >= 2 else 1
    for k in range(0, len(synthesizers), at_once):
        (row, stage, argv), *others = synthesizers[k:k + at_once]
        jobs = [run.stages.start(other, other_argv, child_threads(), run.cfg.path(f"synth_{other_row}.log"), stage)
                for other_row, other, other_argv in others]
        with beside(jobs):
            run.stages.run(stage, argv)
            ready.append(row)
            test_ready_rows(run, ready, results)
        for job in jobs:
            run.stages.finish(job)
        ready += [other_row for other_row, _, _ in others]
    test_ready_rows(run, ready, results)
    return {name: results[name] for name in [*run.rows, *run.region_rows]}


def test_ready_rows(run: DemoRun, ready: Sequence[str], results: dict[str, dict]) -> None:
    """Test the rows not yet in ``results`` that can be: the synthesis rows ``ready`` (their
    classifiers made) and the CLIP-on-boxes rows whose synthesis row, if they use one, is tested."""
    for name in ready:
        if name not in results:
            results[name] = row_results(run, name)
    for name, row in run.region_rows.items():
        if name not in results and (row.classifier is None or row.classifier in results):
            results[name] = region_row(run, row)


def row_results(run: DemoRun, name: str) -> dict:
    """The test passes of a synthesis row whose classifier is made; {setting: metrics} for each
    of :data:`SETTINGS`."""
    classifier = os.path.join(run.cfg.path(f"synth_{name}"), "classifier_best.pth")
    return {setting: run_test_pass(run, name, classifier, setting) for setting in SETTINGS}


def region_row(run: DemoRun, row: RegionRow) -> dict:
    """A row of :data:`REGION_ROWS`: ``vldus test --scoring`` with its CLIP on the cached boxes
    (and crop embeddings); {setting: metrics}, the published GZSD scoring only where a
    synthesized classifier takes part."""
    clip = run.clips[row.clip]
    classifier = (os.path.join(run.cfg.path(f"synth_{row.classifier}"), "classifier_best.pth")
                  if row.classifier else None)
    extra = ["--scoring", row.scoring, "--clip-weights", clip.weights, "--clip-arch", clip.arch]
    settings = SETTINGS if classifier else ("zsd", "gzsd")
    return {setting: run_test_pass(run, row.name, classifier, setting, extra) for setting in settings}


def run_test_pass(run: DemoRun, name: str, classifier: Optional[str], setting: str,
                  extra: Sequence[str] = ()) -> dict:
    """``vldus test`` of one row in one setting (on the cached box features); its metrics.
    ``classifier``: the row's unseen classifier (None: none, --scoring clip-regions);
    ``extra``: more ``vldus test`` options."""
    dets = run.cfg.path("results", f"{name}_{setting}.json")
    metrics = run.cfg.path("results", f"{name}_{setting}_metrics.json")
    # the released inference: its scoring and its box deltas for the unseen classes
    scoring = (["--gzsd-scoring", "published", "--set", "inference.box_regression=best_seen"]
               if setting == "gzsd_published" else [])
    syn = ["--syn-weights", classifier] if classifier else []
    run.stages.run(f"test ({name})", ["test"] + run.base + [
        "--checkpoint", run.checkpoint, *syn, f"--{setting.split('_')[0]}", *scoring,
        "--cache", run.cfg.path("test_cache"), "--out", dets, "--metrics", metrics, *extra])
    with open(metrics) as f:
        return json.load(f)


def draw_pictures(run: DemoRun) -> list[str]:
    """GZSD detections of the main row on the first test images with an unseen object, and its
    feature and loss plots, copied to OUT; returns the pictures' paths relative to OUT."""
    synth_dir = run.cfg.path(f"synth_{METHOD}")
    show = os.path.join(run.out, "pictures")
    run.stages.run("pictures", ["test"] + run.base + [
        "--checkpoint", run.checkpoint, "--syn-weights", os.path.join(synth_dir, "classifier_best.pth"),
        "--gzsd", "--out", run.cfg.path("results", "pictures.json"), "--show-dir", show,
        "--max-images", str(run.size.pictures)])
    for name in ("features_2d.png", "losses.png"):
        if os.path.isfile(os.path.join(synth_dir, name)):
            shutil.copyfile(os.path.join(synth_dir, name), os.path.join(run.out, name))
    return sorted(os.path.join("pictures", p) for p in os.listdir(show) if p.endswith(".png"))


def disagreement_picture(run: DemoRun, names: Sequence[str]) -> Optional[str]:
    """The ZSD test image where the rows ``names`` most often name a ground-truth object
    differently (the class of each row's best detection with IoU >= 0.5 on it), drawn once per
    row side by side into OUT/pictures/disagreement.png; its path relative to OUT, None when
    they always agree."""
    import numpy as np
    from PIL import Image, ImageDraw
    from torchvision.ops import box_iou

    from vldus.detection.visualize import draw_detections

    def load(path: str):
        with open(path) as f:
            return json.load(f)

    def xyxy(items: list[dict]) -> np.ndarray:
        return np.array([[x, y, x + w, y + h] for d in items for x, y, w, h in [d["bbox"]]], np.float32).reshape(-1, 4)

    def by_image(items: list[dict]) -> dict[int, list[dict]]:
        grouped: dict[int, list[dict]] = {}
        for d in items:
            grouped.setdefault(d["image_id"], []).append(d)
        return grouped

    gt = load(run.cfg.path("results", f"{names[0]}_zsd.gt.json"))
    annotations = by_image(gt["annotations"])
    dets = {n: by_image(load(run.cfg.path("results", f"{n}_zsd.json"))) for n in names}
    best_image, best_count = None, 0
    for image in gt["images"]:
        objects = [a for a in annotations.get(image["id"], []) if not a["iscrowd"]]
        named = []
        for n in names:
            mine = sorted(dets[n].get(image["id"], []), key=lambda d: -d["score"])
            iou = box_iou(torch.from_numpy(xyxy(mine)), torch.from_numpy(xyxy(objects)))  # (dets, objects)
            named.append([next((d["category_id"] for d, v in zip(mine, iou[:, k].tolist()) if v >= 0.5), None)
                          for k in range(len(objects))])
        count = sum(len(set(labels)) > 1 for labels in zip(*named))
        if count > best_count:
            best_image, best_count = image, count
    if best_image is None:
        return None
    split = run.cfg.load_split()
    index = {c["id"]: k + 1 for k, c in enumerate(gt["categories"])}
    with Image.open(best_image["file_name"]) as im:
        image = im.convert("RGB")
    gt_boxes = xyxy(annotations[best_image["id"]])
    panels = []
    for n in names:
        mine = dets[n].get(best_image["id"], [])
        panels.append(draw_detections(image, xyxy(mine), np.array([d["score"] for d in mine], np.float32),
                                      np.array([index[d["category_id"]] for d in mine], np.int64), split.classes,
                                      split.unseen_ids, run.cfg.inference.show_score_thresh, gt_boxes=gt_boxes))
    header = 18
    picture = Image.new("RGB", (sum(p.width for p in panels), header + max(p.height for p in panels)), (255, 255, 255))
    pen = ImageDraw.Draw(picture)
    x = 0
    for n, p in zip(names, panels):
        picture.paste(p, (x, header))
        pen.text((x + 4, 3), n, fill=(0, 0, 0))
        x += p.width
    os.makedirs(os.path.join(run.out, "pictures"), exist_ok=True)
    picture.save(os.path.join(run.out, "pictures", "disagreement.png"))
    return os.path.join("pictures", "disagreement.png")


def export_main_row(run: DemoRun) -> str:
    """``vldus export`` of the main row (:data:`METHOD`) into OUT/bundle, for ``vldus detect``."""
    bundle = os.path.join(run.out, "bundle")
    run.stages.run("export", ["export"] + run.base + ["--out", bundle, "--checkpoint", run.checkpoint,
                                                      "--synth-dir", run.cfg.path(f"synth_{METHOD}")])
    return bundle


def collect_metrics(run: DemoRun, results: dict[str, dict], detector: dict, bundle: str) -> dict:
    """The demo's metrics.json: the main row's three settings, one summary per row (the rows
    --quick / --tiny skip reported as skipped), the detector's validation, CLIP, stage times."""
    from vldus.evaluation.cli import test_output_breakdown

    ablation: dict[str, dict] = {}
    for name in [*VARIANTS, *(k for k in results if k not in VARIANTS)]:
        if name in run.region_rows:
            ablation[name] = region_summary(run, name, results[name])
            continue
        variant = run.rows.get(name) or ROWS[name]
        if name not in results:
            ablation[name] = {"description": variant.description, "zsd_map": None, "gzsd_hm": None,
                              "gzsd_seen": None, "gzsd_unseen": None, "gzsd_published_hm": None,
                              "status": "skipped: --quick / --tiny train one synthesizer (run vldus demo without them)"}
            continue
        r = results[name]
        ablation[name] = {"description": variant.description,
                          "zsd_map": r["zsd"]["groups"]["unseen"]["map"]["0.5"], **gzsd_groups(r["gzsd"]),
                          "gzsd_published_hm": r["gzsd_published"]["hm"]["map"]["0.5"], "status": "ok"}
        if variant.generator is not None:
            ablation[name]["distill"] = distill_means(run.cfg.path(f"synth_{name}"))
        ablation[name]["zsd_breakdown"] = test_output_breakdown(run.cfg, run.cfg.path("results", f"{name}_zsd.json"),
                                                                "zsd")
    main_clip = run.clips["main"]
    return {"zsd": results[METHOD]["zsd"], "gzsd": results[METHOD]["gzsd"],
            "gzsd_published": results[METHOD]["gzsd_published"], "method": METHOD,
            "precision": run.cfg.gan.precision, "unseen": list(run.cfg.load_split().unseen),
            "detector": detector, "bundle": bundle,
            "clip": {"source": main_clip.source, "arch": main_clip.arch, "weights": main_clip.weights,
                     "dim": main_clip.dim, **main_clip.metrics},
            "ablation": ablation, "timings_s": run.stages.timings, "concurrent_stages": run.stages.concurrent}


def gzsd_groups(metrics: dict) -> dict:
    """A row's GZSD HM and its seen and unseen mAP at IoU 0.5 (``vldus test --gzsd`` metrics)."""
    return {"gzsd_hm": metrics["hm"]["map"]["0.5"], "gzsd_seen": metrics["groups"]["seen"]["map"]["0.5"],
            "gzsd_unseen": metrics["groups"]["unseen"]["map"]["0.5"]}


def region_summary(run: DemoRun, name: str, r: dict) -> dict:
    """The metrics.json summary of a :data:`REGION_ROWS` row: like a synthesis row's, plus the
    CLIP pass's time (the first pass computes the crop embeddings, later ones read them back)."""
    from vldus.evaluation.cli import test_output_breakdown

    published = r.get("gzsd_published")
    scoring = r["zsd"]["scoring"]
    summary = {"description": run.region_rows[name].description,
               "zsd_map": r["zsd"]["groups"]["unseen"]["map"]["0.5"], **gzsd_groups(r["gzsd"]),
               "gzsd_published_hm": published["hm"]["map"]["0.5"] if published else None, "status": "ok",
               "scoring": {k: v for k, v in scoring.items() if k not in ("clip_time_s", "crop_cache_hits")},
               "clip_time_s": sum(m["scoring"]["clip_time_s"] for m in r.values())}
    summary["zsd_breakdown"] = test_output_breakdown(run.cfg, run.cfg.path("results", f"{name}_zsd.json"), "zsd")
    return summary


def _print_summary(result: dict, report: str) -> None:
    print("\n== vldus demo results (IoU 0.5)")
    for name, a in result["ablation"].items():
        if a["status"] != "ok":
            print(f"  {name:28s} {a['status']}")
            continue
        print(f"  {name:28s} ZSD mAP {_fmt(a['zsd_map']):>5s}   GZSD HM {_fmt(a['gzsd_hm']):>5s} "
              f"(published scoring {_fmt(a['gzsd_published_hm'])})")
    val = result["detector"].get("val_seen_map50")
    if val is not None:
        print(f"  detector: seen mAP {val:.1f} on the validation images")
    print(f"  main result: {result['method']}; total {result['total_s']:.0f} s; report: {report}")
    print(f"  model bundle: {result['bundle']} (vldus detect IMAGES --model {result['bundle']} --classes ...)")


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="the whole pipeline on the embedded benchmark",
                       description="make-shapes, CLIP, detector, features, synthesizer (SU and VLDUS), "
                                   "ZSD/GZSD test and evaluation on the embedded benchmark; writes "
                                   "DIR/metrics.json and DIR/report.md")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="benchmark and training seed")
    p.add_argument("--unseen", default=None, metavar="A,B,...", help="unseen classes (default: make-shapes')")
    p.add_argument("--quick", action="store_true",
                   help="a smaller, shorter run (what the test suite trains; about 5 minutes on a 2-core CPU)")
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
    add_set_argument(p, help="override values of the demo's shapes config, e.g. --set "
                             "features.proposals=300 detector.roi_batch_size=128 (with --quick / "
                             "--tiny their training lengths win)")
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
