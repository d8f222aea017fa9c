"""``vldus demo``: the whole zero-shot pipeline (VLDUS) on the embedded benchmark, on CPU in minutes.

The demo is ``vldus make-shapes`` (train, seen-only validation, test images) and ``vldus
train-clip`` (a small CLIP for the benchmark, unless ``--clip-weights`` names one) followed by
the pipeline every dataset runs, :func:`vldus.runner.run_pipeline` (``vldus run``), on the bundled
``shapes`` config sized by :class:`DemoSize`. What is specific to the benchmark lives here: its
sizes, the CLIP it trains, the config pointed at OUT.

The main CLIP trains in a child process (``OUT/work/clip*.log``) while make-shapes draws the
benchmark and the detector trains. ``--ablation`` adds rows (:data:`vldus.runner.ABLATION`):
class embeddings from the CLIP's text encoder (as the paper), the released behaviour
(``--legacy --distill logged``), distillation into D only and a CLIP trained without the unseen
classes, and the CLIP-on-boxes rows with that CLIP.

Outputs: as ``vldus run`` (``OUT/metrics.json``, docs/formats.md; ``OUT/report.md``; ``OUT/bundle``;
the stage outputs under ``OUT/work``), plus the CLIP under ``OUT/clip`` and the benchmark under
``OUT/shapes``.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from vldus.config import Config, add_set_argument, load_config, save_config
from vldus.errors import InputError, require_file
from vldus.runner import (ABLATION, METHOD, REGION_ABLATION, REGION_ROWS, ROWS, VARIANTS, Background, ClipFiles,
                          RegionRow, Run, Stages, Variant, add_select_argument, beside, child_threads, exit_code,
                          needed_clips, run_pipeline, usable_cores)

DEFAULT_OUT = "demo_out"  # as the Makefile's DEMO_OUT


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


@dataclass
class DemoRun(Run):
    """A :class:`vldus.runner.Run` with the demo's options and size."""

    args: Optional[argparse.Namespace] = None
    size: Optional[DemoSize] = None


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


def run_demo(args: argparse.Namespace) -> dict:
    """The whole demo: the benchmark and the CLIPs here, the rest :func:`vldus.runner.run_pipeline`."""
    run = prepare_inputs(args)
    # The main CLIP renders its own images: it trains while make-shapes draws the benchmark (one
    # core) and the detector trains; a CLIP trained without the unseen classes reads their names
    # from the benchmark's split, so it starts after make-shapes.
    clip_jobs = start_clip_training(run, [c for c in needed_clips(run) if c == "main"],
                                    "make-shapes, train-detector")
    with beside(list(clip_jobs.values())):
        make_benchmark(run)
    clip_jobs |= start_clip_training(run, [c for c in needed_clips(run) if c != "main"], "train-detector")
    return run_pipeline(run, clip_jobs, prepare_clips)


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
    rows, region_rows = demo_rows(size, args.ablation)
    skipped = {name: "skipped: --quick / --tiny train one synthesizer (run vldus demo without them)"
               for name in VARIANTS if name not in rows}
    kind = ", quick run" if args.quick else ", tiny run" if args.tiny else ""
    header = [f"Benchmark{kind}: {size.train_images} training and {size.test_images} test images (and seen-only "
              "validation images)."]
    return DemoRun(out, Stages(args.quiet), cfg, cfg_path, rows, region_rows, skipped, seed=args.seed,
                   select=args.select,
                   pictures=size.pictures, unseen_test_features=True,
                   title="vldus demo: zero-shot detection on the embedded benchmark", header=header,
                   args=args, size=size)


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


def prepare_clips(run: DemoRun, jobs: dict[str, Background]) -> dict[str, ClipFiles]:
    """The CLIP(s) the rows distil from (``jobs``: those training in child processes, waited for
    here); then the config is written with the critic's width."""
    for job in jobs.values():
        run.stages.finish(job)
    clips = {which: prepare_clip(run.stages, run.args, run.out, run.size, which, run.cfg.split,
                                 trained=which in jobs)
             for which in needed_clips(run)}
    # The critic's feature layer is aligned with CLIP's embedding: every synthesis row gets the
    # same critic width, so the rows differ only in what they are named for.
    run.cfg.gan.d_feat = clips["main"].dim
    save_config(run.cfg, run.cfg_path)
    return clips


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
    add_select_argument(p)
    add_set_argument(p, help="override values of the demo's shapes config, e.g. --set "
                             "features.proposals=300 detector.roi_batch_size=128 (with --quick / "
                             "--tiny their training lengths win)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return exit_code("demo", lambda: run_demo(args))
