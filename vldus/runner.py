"""``vldus run``: the whole zero-shot pipeline on any config (and, through ``vldus demo``, on the
embedded benchmark): one implementation of the pipeline.

train-detector --validate (seen classes; torchrun over the CPU processes or GPUs available) ->
extract-features (seen train, seen validation) -> train-unseen-classifier (compatibility
classifier) -> per row: its unseen classifier (train-generator, or the compatibility classifier
as rows), calibrated on validation features -> test (ZSD, GZSD, GZSD with the released
inference) -> error breakdown -> pictures -> export (the main row) -> ``OUT/metrics.json``,
``OUT/report.md``, ``OUT/bundle``. Each stage is the stage's own command (``vldus.cli.main``) with
the config written to ``OUT/config.yaml``; the detector runs once over the test images
(``vldus test --cache``) and every row re-scores its stored box features.

Rows (same detector, features and class embeddings):

- ``no_synthesis``: the compatibility classifier alone, turned into classifier rows
  ``E[[0] + unseen] @ W`` and injected like a synthesized classifier; its GZSD scoring is
  calibrated like the others', on unseen features synthesized by the first synthesis row's
  generator (``calibrate-gzsd --generator``), so that every row is scored the same way;
- ``synthesis_su``: the synthesizer with SU's objective (WGAN-GP, C_s, C_u, mode seeking);
- ``synthesis_vldus``: plus the CLIP vision-language distillation (needs a CLIP);
- ``clip_regions`` / ``vldus_ensemble``: the CLIP names each box / ViLD's ensemble with
  ``synthesis_vldus`` (docs/clip_regions.md).

A row that needs a CLIP runs only where there is one (``gan.clip_weights`` in the config, or the
demo's own); otherwise it is reported as ``skipped: <reason>``. The main row is fixed in
advance: ``synthesis_vldus`` with a CLIP, else ``synthesis_su``.

Stages that do not depend on each other run side by side on a machine with two or more cores,
each with a share of torch's threads: the detector trains as two torchrun processes on a CPU
(half of the batch each, :func:`detector_ranks`) and the synthesizers train two at a time (the
second in a child process, ``OUT/work/synth_<row>.log``).

``--resume``: the stages a previous run of the same command finished (``OUT/work/stages.json``,
written atomically after each) are skipped; train-detector and train-generator continue from their
own checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from vldus.config import Config, add_set_argument, load_config, save_config
from vldus.errors import InputError, require_file
from vldus.files import write_json

METHOD = "synthesis_vldus"  # the main result where there is a CLIP, fixed in advance
METHOD_WITHOUT_CLIP = "synthesis_su"  # the main result without one
VARIANTS = ("no_synthesis", "synthesis_su", "synthesis_vldus")
SETTINGS = ("zsd", "gzsd", "gzsd_published")  # gzsd: the default GZSD scoring; the released inference
DISTILL_TERMS = ("l_fa", "l_ra_dis", "l_ra_div")
# pseudo-unseen selection on by default? Off: on six unseen sets of the embedded benchmark it lost
# to the fixed defaults on the mean (docs/results.md, "Unseen sets and pseudo-unseen selection")
SELECT_BY_DEFAULT = False
NO_CLIP = ("skipped: needs a CLIP image encoder (set gan.clip_weights and gan.clip_arch in the config, "
           "e.g. one trained by vldus train-clip)")


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
    proc: Optional[subprocess.Popen]  # None: done before (--resume)
    log: str
    beside: str  # the stage that runs in the parent meanwhile
    started: float
    ended: float = 0.0  # noted by ``waiter`` the moment the process ends
    waiter: Optional[threading.Thread] = None
    argv: Sequence[str] = ()

    def _wait(self) -> None:
        self.proc.wait()
        self.ended = time.perf_counter()


# Stages that continue from their own checkpoints when a run is resumed.
RESUMABLE = ("train-detector", "train-generator")


class Stages:
    """Runs stage commands in this process and records each one's wall time (seconds, summed
    over the runs of a stage that runs several times).

    ``done_file``: where each finished stage command is recorded (written atomically after each);
    with ``resume`` the commands recorded there are skipped (their outputs are on disk) and
    :data:`RESUMABLE` ones get ``--resume``."""

    def __init__(self, quiet: bool, done_file: str = "", resume: bool = False):
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self.concurrent: dict[str, str] = {}  # {stage run in a child process: the stage run here beside it}
        self.done_file = done_file
        self.done: list[str] = []
        if resume and done_file and os.path.isfile(done_file):
            with open(done_file) as f:
                self.done = json.load(f)["done"]
        self.resume = resume

    @staticmethod
    def key(argv: Sequence[str]) -> str:
        return hashlib.sha256(json.dumps(list(argv)).encode()).hexdigest()[:16]

    def skipped(self, name: str, argv: Sequence[str]) -> bool:
        """True (and said) when a resumed run finished this stage command before."""
        if self.key(argv) in self.done:
            print(f"\n== {name}: done before (--resume), skipped", flush=True)
            return True
        return False

    def finished(self, argv: Sequence[str]) -> None:
        if self.done_file:
            self.done.append(self.key(argv))
            write_json(self.done_file, {"done": self.done})

    def resumed(self, argv: list[str]) -> list[str]:
        return argv + ["--resume"] if self.resume and argv and argv[0] in RESUMABLE else argv

    def run(self, name: str, argv: list[str]) -> None:
        from vldus import cli

        if self.skipped(name, argv):
            return
        print(f"\n== {name}: vldus {' '.join(argv)}", flush=True)
        with self.timed(name):
            rc = cli.main(self.resumed(argv) + (["--quiet"] if self.quiet else []))
        if rc:
            raise StageFailed(name, rc)
        self.finished(argv)

    def run_ranks(self, name: str, argv: list[str], ranks: int, threads: int) -> None:
        """Run a stage command as ``ranks`` torchrun processes on this machine (gloo on CPU,
        NCCL on GPUs), ``threads`` torch threads each, and wait for them; their output goes to
        this terminal."""
        if self.skipped(name, argv):
            return
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "vldus.cli", *self.resumed(argv), *(["--quiet"] if self.quiet else [])]
        print(f"\n== {name} ({ranks} processes, torchrun): vldus {' '.join(argv)}", flush=True)
        with self.timed(name):
            rc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
                                stdin=subprocess.DEVNULL).returncode
        if rc:
            raise StageFailed(name, rc)
        self.finished(argv)

    def start(self, name: str, argv: list[str], threads: int, log: str, beside: str) -> "Background":
        """Run a stage command in a child process with ``threads`` torch threads, its output
        going to ``log``, beside the stage ``beside`` here; :meth:`finish` waits for it."""
        if self.skipped(name, argv):
            return Background(name, None, log, beside, time.perf_counter(), argv=argv)
        print(f"\n== {name} (in a child process, log {log}): vldus {' '.join(argv)}", flush=True)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "vldus.cli", *self.resumed(argv),
                                     *(["--quiet"] if self.quiet else [])],
                                    env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        job = Background(name, proc, log, beside, time.perf_counter(), argv=argv)
        job.waiter = threading.Thread(target=job._wait, daemon=True)
        job.waiter.start()
        return job

    def finish(self, job: "Background") -> None:
        """Wait for ``job``; StageFailed (after the end of its log) when it failed."""
        if job.proc is None:  # done before (--resume)
            return
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
        self.finished(job.argv)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the enclosed work as (part of) stage ``name``."""
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + elapsed
        print(f"== {name}: {elapsed:.1f} s", flush=True)


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


def write_report(run: "Run", result: dict, pictures: list[str]) -> str:
    """OUT/report.md: the run's header lines (``run.title``, ``run.header``), the rows, the error
    breakdown, the main row's tables, the detector, stage times and pictures."""
    from vldus.detection.gzsd import describe_scoring
    from vldus.evaluation.breakdown import KIND_TEXT, markdown_summary

    out = run.out
    ablation = result["ablation"]
    clip = result.get("clip") or {}
    acc = clip.get("zero_shot_accuracy") or {}
    lines = [
        f"# {run.title}", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {result['precision']}. "
        f"Seed {run.seed}.", *run.header,
        f"Unseen classes: {', '.join(result['unseen'])}.",
        (f"CLIP: {clip['source']} ({clip['arch']}, {clip['weights']})"
         + (f"; zero-shot crop accuracy {acc.get('all', 0):.1f} % (unseen classes {acc.get('unseen', 0):.1f} %)"
            if acc else "") + ".") if clip else "CLIP: none (the rows that need one are skipped).", "",
        f"Main result (fixed in advance): **{result['method']}**, exported to `{result['bundle']}` "
        f"(`vldus detect IMAGES --model {result['bundle']} --classes ...`).", "",
        "## Variants (IoU 0.5, same detector, features and class embeddings)", "",
        "| variant | what | ZSD mAP | GZSD HM | GZSD HM (published scoring) | status |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in ablation.items():
        lines.append(f"| {name} | {a['description']} | {_fmt(a['zsd_map'])} | {_fmt(a['gzsd_hm'])} | "
                     f"{_fmt(a['gzsd_published_hm'])} | {a['status']} |")
    lines += ["", "Scoring that ran, per row: " + "; ".join(
        f"{name}: {a['scoring_ran']}" for name, a in ablation.items() if a.get("scoring_ran")) + "."]
    notes = [f"{name}: {note}" for name, a in ablation.items() for note in a.get("notes", [])]
    lines += ["", *(f"- {n}" for n in notes)] if notes else []
    lines += selection_lines(ablation)
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


def distill_means(synth_dir: str) -> dict[str, float]:
    """Mean of each CLIP distillation term over the GAN epochs of a run (0.0 when off)."""
    with open(os.path.join(synth_dir, "log.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    history = [r for r in history if r.get("iterations")] or history
    return {k: sum(abs(r.get(k, 0.0)) for r in history) / max(len(history), 1) for k in DISTILL_TERMS}


@dataclass
class Run:
    """What the steps of one run share: the output folder, the config, the stage runner and the
    rows (each step adds what the next ones need)."""

    out: str
    stages: Stages
    cfg: Config
    cfg_path: str  # OUT/config.yaml, passed to every stage command
    rows: dict[str, Variant]
    region_rows: dict[str, RegionRow] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # {row: "skipped: <reason>"}
    clips: dict[str, ClipFiles] = field(default_factory=dict)
    checkpoint: str = ""  # the trained detector
    calibration_donor: Optional[str] = None  # the synthesis row whose generator calibrates no_synthesis
    method: str = METHOD  # the main row, fixed in advance
    seed: int = 0
    pictures: int = 6
    unseen_test_features: bool = False  # also extract unseen test features (reported, never used to choose)
    select: bool = False  # choose each synthesizer's schedule and scoring on pseudo-unseen validation
    title: str = "vldus run: zero-shot detection"
    header: list[str] = field(default_factory=list)  # report lines about the data
    started: float = field(default_factory=time.perf_counter)

    @property
    def base(self) -> list[str]:
        return ["--config", self.cfg_path]


def needed_clips(run: Run) -> list[str]:
    """The CLIPs ("main", "exclude_unseen") the run's rows distil from or score with."""
    return list(dict.fromkeys([v.clip for v in run.rows.values() if v.clip] +
                              [v.clip for v in run.region_rows.values()]))


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train_seen_detector(run: Run, clips: Sequence[Background] = ()) -> dict:
    """``vldus train-detector --validate`` (``clips``: the CLIPs training in child processes
    meanwhile); returns its validation seen mAP (:func:`detector_validation`)."""
    from vldus.detection.train import latest_checkpoint

    argv = ["train-detector"] + run.base + ["--validate"]
    cuda = torch.cuda.is_available()
    ranks = detector_ranks(torch.get_num_threads(), run.cfg.train.batch_size, cuda,
                           torch.cuda.device_count() if cuda else 0)
    with beside(clips):
        if ranks == 1:
            run.stages.run("train-detector", argv)
        elif cuda:  # one process per GPU, train.batch_size images each (the config's lr: not scaled)
            run.stages.run_ranks("train-detector", argv, ranks, max(1, torch.get_num_threads() // ranks))
        else:  # the same global batch, split over the processes; the threads the CLIPs left, shared
            run.stages.run_ranks("train-detector", argv + ["--set", f"train.batch_size={run.cfg.train.batch_size // ranks}"],
                                 ranks, max(1, torch.get_num_threads() // ranks))
    run.checkpoint = latest_checkpoint(run.cfg.path("detector"))
    return detector_validation(run.cfg.path("detector"))


def detector_ranks(threads: int, batch_size: int, cuda: bool, gpus: int = 1) -> int:
    """Processes the detector trains in: on the CPU, 2 (torchrun, half of the ``threads`` each,
    half of the batch each) when torch has two or more threads here and the batch splits in two;
    with ``cuda``, one per GPU (``gpus``; one GPU: in this process). On 2 cores two one-thread
    processes train a small detector 1.5x faster than one process (docs/history.md); the CLIPs'
    child processes run beside them."""
    if cuda:
        return max(1, gpus)
    return 2 if threads >= 2 and batch_size % 2 == 0 else 1


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


def extract_features(run: Run) -> None:
    """RoI features of the seen classes on the training images (the synthesizer's real features)
    and on the validation images (GZSD calibration), of the unseen classes on the test images
    (reported only); then the compatibility classifier on the training features."""
    passes = [("extract-features", "seen", "train"), ("extract-features (val)", "seen", "val")]
    if run.unseen_test_features:
        passes.append(("extract-features (unseen test)", "unseen", "test"))
    for stage, classes, data_split in passes:
        run.stages.run(stage, ["extract-features"] + run.base + [
            "--checkpoint", run.checkpoint, "--classes", classes, "--data-split", data_split])
    run.stages.run("compat-classifier", ["train-unseen-classifier"] + run.base)


def row_classifier(run: Run, name: str, variant: Variant) -> Optional[tuple[str, list[str]]]:
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
    if run.select:
        overrides.append("unseen_classifier.selection=pseudo_unseen")
    return f"synthesizer ({name})", ["train-generator"] + run.base + [
        "--out-dir", synth_dir, "--checkpoint", run.checkpoint, *variant.generator, *compat_argv] + \
        (["--set", *overrides] if overrides else [])


def selection_record(run: Run, name: str) -> Optional[dict]:
    """The row's pseudo-unseen selection (``synth_<row>/selection.json``), None without one."""
    from vldus.synthesis.select import SELECTION_FILE

    path = os.path.join(run.cfg.path(f"synth_{name}"), SELECTION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def chosen_scoring(run: Run, name: Optional[str]) -> list[str]:
    """``--set`` values of the ZSD and GZSD scorings the row's selection chose ([] without one)."""
    record = selection_record(run, name) if name else None
    if not record:
        return []
    return [f"{key}={record['chosen'][key]}" for key in ("inference.zsd_scoring", "inference.gzsd_scoring")]


def rows_and_results(run: Run) -> dict[str, dict]:
    """Every row's unseen classifier and test passes; {row: {setting: metrics}} in the rows'
    order. On two or more cores the synthesizers train two at a time, each with half of torch's
    threads (one left over alone with all of them): the second of a pair, in the rows' order, in
    a child process (log ``OUT/work/synth_<row>.log``), while the first trains here and then the
    rows whose classifiers are ready (and the ``clip_regions`` rows) are tested here. The rows
    without a synthesizer wait for the first one: its generator calibrates their scoring."""
    synthesizers = [(name, *stage) for name, variant in run.rows.items()
                    if (stage := row_classifier(run, name, variant)) is not None]
    waiting = [name for name in run.rows if name not in {row for row, _, _ in synthesizers}]
    run.calibration_donor = synthesizers[0][0] if synthesizers else None
    ready = [] if synthesizers else waiting
    results: dict[str, dict] = {}
    at_once = 2 if usable_cores() >= 2 else 1
    for k in range(0, len(synthesizers), at_once):
        (row, stage, argv), *others = synthesizers[k:k + at_once]
        jobs = [run.stages.start(other, other_argv, child_threads(), run.cfg.path(f"synth_{other_row}.log"), stage)
                for other_row, other, other_argv in others]
        with beside(jobs):
            run.stages.run(stage, argv)
            ready = (waiting if k == 0 else []) + ready + [row]
            test_ready_rows(run, ready, results)
        for job in jobs:
            run.stages.finish(job)
        ready += [other_row for other_row, _, _ in others]
    test_ready_rows(run, ready, results)
    return {name: results[name] for name in [*run.rows, *run.region_rows]}


def test_ready_rows(run: Run, ready: Sequence[str], results: dict[str, dict]) -> None:
    """Test the rows not yet in ``results`` that can be: the synthesis rows ``ready`` (their
    classifiers made) and the CLIP-on-boxes rows whose synthesis row, if they use one, is tested."""
    for name in ready:
        if name not in results:
            results[name] = row_results(run, name)
    for name, row in run.region_rows.items():
        if name not in results and (row.classifier is None or row.classifier in results):
            results[name] = region_row(run, row)


def row_results(run: Run, name: str) -> dict:
    """The test passes of a synthesis row whose classifier is made; {setting: metrics} for each
    of :data:`SETTINGS`."""
    synth_dir = run.cfg.path(f"synth_{name}")
    classifier = os.path.join(synth_dir, "classifier_best.pth")
    if run.rows[name].generator is None and run.calibration_donor:
        # scored like the synthesis rows: calibrated on the first synthesizer's unseen features
        donor = os.path.join(run.cfg.path(f"synth_{run.calibration_donor}"), "generator.pth")
        run.stages.run(f"calibrate-gzsd ({name})", ["calibrate-gzsd"] + run.base + [
            "--synth-dir", synth_dir, "--checkpoint", run.checkpoint, "--generator", donor])
    return {setting: run_test_pass(run, name, classifier, setting) for setting in SETTINGS}


def region_row(run: Run, row: RegionRow) -> dict:
    """A row of :data:`REGION_ROWS`: ``vldus test --scoring`` with its CLIP on the cached boxes
    (and crop embeddings); {setting: metrics}, the published GZSD scoring only where a
    synthesized classifier takes part."""
    clip = run.clips[row.clip]
    classifier = (os.path.join(run.cfg.path(f"synth_{row.classifier}"), "classifier_best.pth")
                  if row.classifier else None)
    extra = ["--scoring", row.scoring, "--clip-weights", clip.weights, "--clip-arch", clip.arch]
    settings = SETTINGS if classifier else ("zsd", "gzsd")
    return {setting: run_test_pass(run, row.name, classifier, setting, extra) for setting in settings}


def run_test_pass(run: Run, name: str, classifier: Optional[str], setting: str,
                  extra: Sequence[str] = ()) -> dict:
    """``vldus test`` of one row in one setting (on the cached box features); its metrics.
    ``classifier``: the row's unseen classifier (None: none, --scoring clip-regions);
    ``extra``: more ``vldus test`` options."""
    dets = run.cfg.path("results", f"{name}_{setting}.json")
    metrics = run.cfg.path("results", f"{name}_{setting}_metrics.json")
    # the released inference: its scoring and its box deltas for the unseen classes
    chosen = chosen_scoring(run, name if name in run.rows else None)
    scoring = (["--gzsd-scoring", "published", "--set", "inference.box_regression=best_seen"]
               if setting == "gzsd_published" else ["--set", *chosen] if chosen else [])
    syn = ["--syn-weights", classifier] if classifier else []
    run.stages.run(f"test ({name})", ["test"] + run.base + [
        "--checkpoint", run.checkpoint, *syn, f"--{setting.split('_')[0]}", *scoring,
        "--cache", run.cfg.path("test_cache"), "--out", dets, "--metrics", metrics, *extra])
    with open(metrics) as f:
        return json.load(f)


def draw_pictures(run: Run) -> list[str]:
    """GZSD detections of the main row on the first test images with an unseen object, and its
    feature and loss plots, copied to OUT; returns the pictures' paths relative to OUT."""
    synth_dir = run.cfg.path(f"synth_{run.method}")
    show = os.path.join(run.out, "pictures")
    run.stages.run("pictures", ["test"] + run.base + [
        "--checkpoint", run.checkpoint, "--syn-weights", os.path.join(synth_dir, "classifier_best.pth"),
        "--gzsd", "--out", run.cfg.path("results", "pictures.json"), "--show-dir", show,
        "--max-images", str(run.pictures)])
    for name in ("features_2d.png", "losses.png"):
        if os.path.isfile(os.path.join(synth_dir, name)):
            shutil.copyfile(os.path.join(synth_dir, name), os.path.join(run.out, name))
    return sorted(os.path.join("pictures", p) for p in os.listdir(show) if p.endswith(".png"))


def disagreement_picture(run: Run, names: Sequence[str]) -> Optional[str]:
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


def export_main_row(run: Run) -> str:
    """``vldus export`` of the main row (``run.method``) into OUT/bundle, for ``vldus detect``."""
    bundle = os.path.join(run.out, "bundle")
    run.stages.run("export", ["export"] + run.base + ["--out", bundle, "--checkpoint", run.checkpoint,
                                                      "--synth-dir", run.cfg.path(f"synth_{run.method}")] +
                   (["--set", *chosen] if (chosen := chosen_scoring(run, run.method)) else []))
    return bundle


def collect_metrics(run: Run, results: dict[str, dict], detector: dict, bundle: str) -> dict:
    """metrics.json: the main row's three settings, one summary per row (rows that did not run
    reported with ``status: skipped: <reason>``), the detector's validation, CLIP, stage times."""
    from vldus.evaluation.cli import test_output_breakdown

    ablation: dict[str, dict] = {}
    every = {**ROWS, **REGION_ROWS, **ABLATION, **REGION_ABLATION, **run.rows, **run.region_rows}
    for name in dict.fromkeys([*VARIANTS, *run.skipped, *results]):
        if name in run.region_rows:
            ablation[name] = region_summary(run, name, results[name])
            continue
        variant = every[name]
        if name not in results:
            ablation[name] = {"description": variant.description, "zsd_map": None, "gzsd_hm": None,
                              "gzsd_seen": None, "gzsd_unseen": None, "gzsd_published_hm": None,
                              "status": run.skipped.get(name, "skipped: not in this run's rows")}
            continue
        r = results[name]
        ablation[name] = {"description": variant.description,
                          "zsd_map": r["zsd"]["groups"]["unseen"]["map"]["0.5"], **gzsd_groups(r["gzsd"]),
                          "gzsd_published_hm": r["gzsd_published"]["hm"]["map"]["0.5"], "status": "ok",
                          **scoring_summary(r), "by_iou": every_iou(r)}
        if variant.generator is not None:
            ablation[name]["distill"] = distill_means(run.cfg.path(f"synth_{name}"))
            ablation[name]["selection"] = selection_summary(selection_record(run, name))
        ablation[name]["zsd_breakdown"] = test_output_breakdown(run.cfg, run.cfg.path("results", f"{name}_zsd.json"),
                                                                "zsd")
    main_clip = run.clips.get("main")
    clip = ({"source": main_clip.source, "arch": main_clip.arch, "weights": main_clip.weights,
             "dim": main_clip.dim, **main_clip.metrics} if main_clip else None)
    return {"zsd": results[run.method]["zsd"], "gzsd": results[run.method]["gzsd"],
            "gzsd_published": results[run.method]["gzsd_published"], "method": run.method,
            "precision": run.cfg.gan.precision, "unseen": list(run.cfg.load_split().unseen),
            "detector": detector, "bundle": bundle, "clip": clip,
            "ablation": ablation, "timings_s": run.stages.timings, "concurrent_stages": run.stages.concurrent}


def selection_lines(ablation: dict) -> list[str]:
    """report.md: per synthesis row, the held-out seen classes, every candidate's validation
    scores and the choice."""
    lines = []
    for name, a in ablation.items():
        sel = a.get("selection")
        if not sel or "candidates" not in sel:
            continue
        chosen = sel["chosen"]
        lines += ["", f"### {name}: settings chosen on pseudo-unseen validation", "",
                  f"Seen classes held out as pseudo-unseen: {', '.join(sel['pseudo_unseen'])}; scored on the "
                  "validation images (no test data). Chosen: " +
                  ", ".join(f"`{k}: {v}`" for k, v in chosen.items()) + " (fixed defaults: " +
                  ", ".join(f"`{k}: {v}`" for k, v in sel["default"].items()) + ").", "",
                  "| GAN epochs | syn_num | val ZSD mAP | val GZSD HM | score |", "|---|---|---|---|---|"]
        lines += [f"| {c['epochs']} | {c['syn_num']} | {_fmt(c['zsd_map'])} | {_fmt(c['gzsd_hm'])} | "
                  f"{_fmt(c['score'])} |" for c in sel["candidates"]]
        lines += ["", "Scorings of the chosen candidate: " + "; ".join(
            f"{r['name']}: ZSD {_fmt(r['zsd_map'])}, GZSD HM {_fmt(r['gzsd_hm'])}" for r in sel["scorings"]) + "."]
    return lines


def selection_summary(record: Optional[dict]) -> dict:
    """What a row's pseudo-unseen selection chose, from what, and on which held-out seen classes
    ({"status": "fixed defaults (--no-select)"} without one)."""
    if record is None:
        return {"status": "fixed defaults (--no-select)"}
    if record.get("skipped"):
        return {"status": f"fixed defaults: no pseudo-unseen fold ({record['skipped']})"}
    return {"status": "chosen on pseudo-unseen validation", "pseudo_unseen": record["pseudo_unseen"],
            "chosen": record["chosen"], "default": record["default"],
            "candidates": [{k: c[k] for k in ("epochs", "syn_num", "zsd_map", "gzsd_hm", "score")}
                           for c in record["candidates"]], "scorings": record["scorings"]}


def scoring_summary(r: dict) -> dict:
    """``scoring_ran``: one line naming the ZSD and GZSD scoring a row's test passes ran (a
    fallback to the published scoring included, with its reason); ``notes``: the settings whose
    images hold no ground truth of a group (no mAP, instead of 0.0)."""
    from vldus.detection.gzsd import describe_scoring
    from vldus.evaluation.evaluator import no_ground_truth_line

    ran = {setting: describe_scoring(r[setting][f"{setting}_scoring"])
           for setting in ("zsd", "gzsd") if r[setting].get(f"{setting}_scoring")}
    if len(ran) == 2 and ran["zsd"] == ran["gzsd"]:
        parts = [f"ZSD and GZSD {ran['zsd']}"]
    else:
        parts = [f"{setting.upper()} {text}" for setting, text in ran.items()]
    notes = [line for m in r.values() if (line := no_ground_truth_line(m))]
    return {"scoring_ran": "; ".join(parts), **({"notes": notes} if notes else {})}


def gzsd_groups(metrics: dict) -> dict:
    """A row's GZSD HM and its seen and unseen mAP at IoU 0.5 (``vldus test --gzsd`` metrics)."""
    return {"gzsd_hm": metrics["hm"]["map"]["0.5"], "gzsd_seen": metrics["groups"]["seen"]["map"]["0.5"],
            "gzsd_unseen": metrics["groups"]["unseen"]["map"]["0.5"]}


def every_iou(r: dict) -> dict:
    """A row's mAP and Recall@100 at every IoU: ``{"zsd": {"map", "recall"}, "gzsd": {"seen",
    "unseen", "hm": {"map", "recall"}}}`` ({IoU: value})."""
    return {"zsd": r["zsd"]["groups"]["unseen"],
            "gzsd": {**r["gzsd"]["groups"], "hm": r["gzsd"]["hm"]}}


def region_summary(run: Run, name: str, r: dict) -> dict:
    """The metrics.json summary of a :data:`REGION_ROWS` row: like a synthesis row's, plus the
    CLIP pass's time (the first pass computes the crop embeddings, later ones read them back)."""
    from vldus.evaluation.cli import test_output_breakdown

    published = r.get("gzsd_published")
    scoring = r["zsd"]["scoring"]
    summary = {"description": run.region_rows[name].description,
               "zsd_map": r["zsd"]["groups"]["unseen"]["map"]["0.5"], **gzsd_groups(r["gzsd"]),
               "gzsd_published_hm": published["hm"]["map"]["0.5"] if published else None, "status": "ok",
               **scoring_summary(r), "by_iou": every_iou(r),
               "scoring": {k: v for k, v in scoring.items() if k not in ("clip_time_s", "crop_cache_hits")},
               "clip_time_s": sum(m["scoring"]["clip_time_s"] for m in r.values())}
    summary["zsd_breakdown"] = test_output_breakdown(run.cfg, run.cfg.path("results", f"{name}_zsd.json"), "zsd")
    return summary


def _print_summary(result: dict, report: str, title: str) -> None:
    print(f"\n== {title} results (IoU 0.5)")
    for name, a in result["ablation"].items():
        if a["status"] != "ok":
            print(f"  {name:28s} {a['status']}")
            continue
        print(f"  {name:28s} ZSD mAP {_fmt(a['zsd_map']):>5s}   GZSD HM {_fmt(a['gzsd_hm']):>5s} "
              f"(published scoring {_fmt(a['gzsd_published_hm'])})")
        if a.get("scoring_ran"):
            print(f"  {'':28s} scoring: {a['scoring_ran']}")
        sel = a.get("selection") or {}
        if sel.get("status", "").startswith("fixed defaults:"):
            print(f"  {'':28s} {sel['status']}")
        elif sel.get("chosen"):
            print(f"  {'':28s} chosen on pseudo-unseen validation ({', '.join(sel['pseudo_unseen'])} held out): "
                  + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sel["chosen"].items()))
        for note in a.get("notes", []):
            print(f"  {'':28s} {note}")
    val = result["detector"].get("val_seen_map50")
    if val is not None:
        print(f"  detector: seen mAP {val:.1f} on the validation images")
    print(f"  main result: {result['method']}; total {result['total_s']:.0f} s; report: {report}")
    print(f"  model bundle: {result['bundle']} (vldus detect IMAGES --model {result['bundle']} --classes ...)")


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
def choose_rows(names: Sequence[str], has_clip: bool, ablation: bool = False
                ) -> tuple[dict[str, Variant], dict[str, RegionRow], dict[str, str], str]:
    """(synthesis rows, CLIP-on-boxes rows, {skipped row: reason}, main row) for the row names
    asked for; rows that need a CLIP are skipped without one, the ensembles without the main row."""
    known = {**ROWS, **ABLATION, **REGION_ROWS, **REGION_ABLATION}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError("--rows", f"unknown row {unknown[0]!r} (one of {', '.join(known)})")
    skipped: dict[str, str] = {}
    rows: dict[str, Variant] = {}
    region_rows: dict[str, RegionRow] = {}
    for n in names:
        row = known[n]
        if (row.clip if isinstance(row, Variant) else True) and not has_clip:
            skipped[n] = NO_CLIP
        elif isinstance(row, Variant):
            rows[n] = row
        else:
            region_rows[n] = row
    for n, row in list(region_rows.items()):
        if row.classifier is not None and row.classifier not in rows:
            del region_rows[n]
            skipped[n] = f"skipped: needs the row {row.classifier}"
    method = METHOD if METHOD in rows else METHOD_WITHOUT_CLIP if METHOD_WITHOUT_CLIP in rows else \
        next((n for n, v in rows.items() if v.generator is not None), next(iter(rows), ""))
    if not method:
        raise InputError("--rows", "no row to run")
    return rows, region_rows, skipped, method


def run_pipeline(run: Run, clip_jobs: Optional[dict[str, Background]] = None,
                 clips: Optional[Callable[[Run, dict[str, Background]], dict[str, ClipFiles]]] = None) -> dict:
    """The pipeline after the data exist: detector, the CLIPs (``clips(run, clip_jobs)``: those
    ``clip_jobs`` train in child processes beside the detector), features, every row, pictures,
    bundle, ``OUT/metrics.json`` and ``OUT/report.md``; returns the metrics dict."""
    clip_jobs = clip_jobs or {}
    detector = train_seen_detector(run, list(clip_jobs.values()))
    run.clips = clips(run, clip_jobs) if clips else config_clip(run)
    extract_features(run)
    results = rows_and_results(run)
    pictures = draw_pictures(run)
    disagreement = (disagreement_picture(run, [METHOD, *REGION_ROWS])
                    if set(REGION_ROWS) <= set(results) and METHOD in results else None)
    bundle = export_main_row(run)
    result = collect_metrics(run, results, detector, bundle)
    result["disagreement_picture"] = disagreement
    result["total_s"] = time.perf_counter() - run.started
    write_json(os.path.join(run.out, "metrics.json"), result)
    report = write_report(run, result, pictures)
    _print_summary(result, report, run.title.split(":")[0])
    return result


def config_clip(run: Run) -> dict[str, ClipFiles]:
    """The CLIP the config names (``gan.clip_weights``, ``gan.clip_arch``) as the run's "main" CLIP,
    with the class text embeddings it gives (``vldus embed --encoder clip``); {} without one."""
    cfg = run.cfg
    if not cfg.gan.clip_weights or not (run.rows.keys() & {n for n, v in ROWS.items() if v.clip} or run.region_rows):
        return {}
    from vldus.clip import load_open_clip

    clip = ClipFiles(cfg.gan.clip_arch, cfg.gan.clip_weights, "the config's gan.clip_weights")
    model = load_open_clip(clip.arch, clip.weights)
    clip.dim = int(getattr(model.visual, "output_dim", 0) or model.text_projection.shape[1])
    clip.text_embeddings = cfg.path("clip_text_main.npy")
    run.stages.run("embed (CLIP text)", ["embed", "--classes", cfg.split, "--encoder", "clip", "--arch", clip.arch,
                                         "--weights", clip.weights, "--out", clip.text_embeddings])
    cfg.gan.d_feat = clip.dim  # the critic's feature layer is aligned with CLIP's embedding
    save_config(cfg, run.cfg_path)
    return {"main": clip}


# --------------------------------------------------------------------------------------------
# vldus run
# --------------------------------------------------------------------------------------------
def seeded(cfg: Config, seed: int) -> Config:
    """The config with every training stage seeded from ``seed`` (as the demo does)."""
    cfg.train.seed = cfg.features.seed = seed
    cfg.gan.seed = cfg.compat.seed = 806 + seed
    return cfg


def check_config(cfg: Config) -> None:
    """Refuse, before any work, a config whose inputs are not there (one line, exit 2)."""
    from vldus.data.embeddings import check_sidecar

    split = cfg.load_split()
    require_file(cfg.embeddings.file, "class embeddings (embeddings.file)")
    if cfg.embeddings.file.endswith(".npy") and os.path.isfile(cfg.embeddings.file + ".json"):
        check_sidecar(cfg.embeddings.file, split)
    if cfg.data.val is None:
        raise InputError(cfg.source_file, "vldus run needs data.val (seen-only validation images: the detector's "
                                          "validation and the GZSD calibration); vldus prepare writes one")
    if cfg.gan.clip_weights:
        require_file(cfg.gan.clip_weights, "CLIP weights (gan.clip_weights)")


def add_parser(sub, common) -> None:
    p = sub.add_parser("run", parents=[common], help="the whole pipeline on any config (vldus prepare writes one)",
                       description="detector, features, compatibility classifier, each row's synthesizer, "
                                   "ZSD/GZSD test, evaluation with the error breakdown, report and bundle; "
                                   "writes DIR/metrics.json, DIR/report.md and DIR/bundle")
    p.add_argument("--config", required=True, help="config YAML (vldus prepare's DIR/config.yaml) or a bundled name")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="training seed of every stage (default 0)")
    p.add_argument("--rows", default=",".join([*ROWS, *REGION_ROWS]), metavar="A,B,...",
                   help="rows to run (default: %(default)s; rows that need a CLIP are skipped without one)")
    p.add_argument("--resume", action="store_true", help="skip the stages a previous run into DIR finished")
    add_select_argument(p)
    add_set_argument(p)
    p.set_defaults(func=run_command)


def add_select_argument(p) -> None:
    """``--select`` / ``--no-select``; the default is :data:`SELECT_BY_DEFAULT`."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--select", dest="select", action="store_true", default=SELECT_BY_DEFAULT,
                       help="choose each synthesis row's GAN epochs, synthetic features per class and ZSD/GZSD "
                            "scorings on pseudo-unseen validation (held-out seen classes, no test data; one more "
                            "synthesizer training per row; docs/selection.md)" +
                            (" (default)" if SELECT_BY_DEFAULT else ""))
    group.add_argument("--no-select", dest="select", action="store_false",
                       help="the fixed defaults (gan.epochs, unseen_classifier.syn_num, the config's scorings)" +
                            ("" if SELECT_BY_DEFAULT else " (default)"))


def run_command(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    cfg = seeded(load_config(args.config, args.set), args.seed)
    check_config(cfg)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    rows, region_rows, skipped, method = choose_rows(names, bool(cfg.gan.clip_weights))
    os.makedirs(out, exist_ok=True)
    cfg.work_dir = os.path.join(out, "work")
    os.makedirs(cfg.work_dir, exist_ok=True)
    cfg_path = os.path.join(out, "config.yaml")
    save_config(cfg, cfg_path)
    split = cfg.load_split()
    stages = Stages(args.quiet, os.path.join(cfg.work_dir, "stages.json"), args.resume)
    run = Run(out, stages, cfg, cfg_path, rows, region_rows, skipped, method=method, seed=args.seed,
              select=args.select,
              title=f"vldus run: zero-shot detection on {split.dataset or split.name}",
              header=[f"Config: {os.path.abspath(cfg.source_file)} ({len(split.seen)} seen, {len(split.unseen)} "
                      f"unseen classes; GZSD test rule {cfg.data.test_rule})."])
    return exit_code("run", lambda: run_pipeline(run))


def exit_code(command: str, work: Callable[[], object]) -> int:
    """Run ``work``; 0, or a failed stage's exit code: 2 for bad input (the stage has printed
    its one-line error), else 1 with the stage named."""
    try:
        work()
    except StageFailed as e:
        if e.code == 2:
            return 2
        print(f"vldus {command}: {e}", file=sys.stderr)
        return 1
    return 0
