"""Profile the demo's detector component by component: where a training iteration, a feature
extraction pass and a test pass spend their time.

Settings: the demo's (``vldus demo``: configs/shapes.yaml with the ImageNet MobileNetV2 file when
installed), changed with ``--set KEY=VALUE``; data: a small make-shapes benchmark in a temporary
folder. Three parts, each on real make-shapes images through vldus' own code paths:

- **training iteration** (one batch of ``train.batch_size`` images, the same batch every time):
  forward with losses, backward, gradient clipping, SGD step, as ``vldus train-detector``.
  Forward time per module (transform, backbone, FPN, RPN head, the rest of the RPN: anchors,
  proposals, NMS, losses; RoIAlign, box head, box predictor, the rest of the RoI heads: box
  sampling and losses). Backward time per module too: every backward op is charged to the module
  whose forward op created it (matched by autograd sequence number in ``torch.profiler``);
  ``AccumulateGrad`` (adding gradients into ``.grad``) is listed on its own.
- **extraction pass** (``vldus extract-features``' RoIFeatureExtractor, one image at a time):
  per image, backbone + FPN, RPN (with the extraction proposal count), RoIAlign, box head, the rest.
- **test pass** (``vldus test``'s two halves, :func:`vldus.detection.cache.box_inputs` and
  :func:`~vldus.detection.cache.score_boxes`): per image, backbone + FPN, RPN (test proposal
  count), RoIAlign, box head, predictor + NMS.

Times come from ``torch.profiler`` ranges (CPU time on CPU; kernel time on CUDA) around each
module's forward; each part runs ``--repeat`` times and the table shows the minimum of each
component (the machine may be shared: the minimum is the least disturbed run). The unprofiled
wall time of a training iteration (minimum of ``--repeat``) is printed for reference.

    python benchmarks/profile_detector.py [--device cpu|cuda] [--repeat 3] [--images 16]
        [--checkpoint DETECTOR.pth] [--set KEY=VALUE ...] [--out profile.json]

e.g. ``--set detector.channels_last=true`` or ``--set features.proposals=300 detector.roi_batch_size=128``.

A trained ``--checkpoint`` (e.g. demo_out/work/detector/epoch_3.pth) makes the RPN's proposals
and the test pass's detections those of the demo; without one the detector is untrained (same
shapes of work, except the number of detections NMS sees).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

# Forward ranges of a torchvision FasterRCNN: (name, path of the module inside the model).
MODULES = (
    ("transform", "transform"),
    ("backbone", "backbone.body"),
    ("FPN", "backbone.fpn"),
    ("RPN head", "rpn.head"),
    ("RPN", "rpn"),
    ("RoIAlign", "roi_heads.box_roi_pool"),
    ("box head", "roi_heads.box_head"),
    ("box predictor", "roi_heads.box_predictor"),
    ("RoI heads", "roi_heads"),
)
# Ranges that contain other ranges: reported as "the rest" (their own time minus the inner ones).
REST = {"RPN": ("RPN rest (anchors, proposals, NMS, losses)", ("RPN head",)),
        "RoI heads": ("RoI heads rest (sampling, losses)", ("RoIAlign", "box head", "box predictor"))}
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


# --------------------------------------------------------------------------------------------
# Ranges around module forwards, read back from the profiler
# --------------------------------------------------------------------------------------------
class ModuleRanges:
    """``torch.profiler.record_function`` ranges around the forward of the :data:`MODULES` of a
    model (forward hooks), so profiler events can be charged to modules."""

    def __init__(self, model: nn.Module, modules=MODULES):
        self.handles = []
        for name, path in modules:
            module = model.get_submodule(path)
            stack: list = []
            self.handles.append(module.register_forward_pre_hook(self._enter(name, stack)))
            self.handles.append(module.register_forward_hook(self._exit(stack)))

    @staticmethod
    def _enter(name: str, stack: list) -> Callable:
        def hook(module, inputs):
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            stack.append(rf)
        return hook

    @staticmethod
    def _exit(stack: list) -> Callable:
        def hook(module, inputs, output):
            stack.pop().__exit__(None, None, None)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def event_time(event, cuda: bool) -> float:
    """Milliseconds of one profiler event with its children: kernel time on CUDA, CPU time otherwise."""
    return (event.device_time_total if cuda else event.cpu_time_total) / 1000.0


def charge(events, range_names: set[str], cuda: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Forward and backward milliseconds per range name of one profiled run.

    Forward: the range events' times (summed over calls). Backward: each
    ``evaluate_function: XBackward`` event goes to the innermost range whose forward ops carry its
    sequence number; ``AccumulateGrad`` and unmatched ones to their own entries.
    """
    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    owner: dict[int, str] = {}

    def visit(event, inside: str | None) -> None:
        if event.name in ("backward", "optimizer step") or event.name.startswith(BACKWARD_PREFIX):
            return  # only forward ops own sequence numbers
        name = event.name if event.name in range_names else inside
        if name is not None and event.sequence_nr is not None and event.sequence_nr >= 0 \
                and not event.name.startswith(BACKWARD_PREFIX):
            owner[event.sequence_nr] = name  # visited outside-in: the innermost range wins
        for child in event.cpu_children:
            visit(child, name)

    for event in events:
        if event.cpu_parent is None:
            visit(event, None)
        if event.name in range_names:
            forward[event.name] += event_time(event, cuda)
    for event in events:
        if not event.name.startswith(BACKWARD_PREFIX):
            continue
        op = event.name[len(BACKWARD_PREFIX):]
        if op.startswith("torch::autograd::AccumulateGrad"):
            backward["AccumulateGrad"] += event_time(event, cuda)
        else:
            backward[owner.get(event.sequence_nr, "unattributed")] += event_time(event, cuda)
    return dict(forward), dict(backward)


def exclusive(times: dict[str, float], nested: bool = True) -> dict[str, float]:
    """Turn the containing ranges of :data:`REST` into "the rest" entries: their own time minus
    the inner ranges' when ``nested`` (forward range times include the inner ones), renamed only
    otherwise (backward ops are already charged to the innermost range)."""
    out = dict(times)
    for outer, (rest, inner) in REST.items():
        if outer in out:
            out[rest] = out.pop(outer) - (sum(out.get(i, 0.0) for i in inner) if nested else 0.0)
    if "forward" in out:  # ops of the forward pass outside every module (the loss sum)
        out["outside the modules (loss sum)"] = out.pop("forward")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profiled(fn: Callable[[], None], device: torch.device):
    """Run ``fn`` under ``torch.profiler``; returns its events."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    return prof.events()


def min_over(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in runs for k in r)
    return {k: min(r.get(k, 0.0) for r in runs) for k in keys}


# --------------------------------------------------------------------------------------------
# The three parts
# --------------------------------------------------------------------------------------------
def profile_training(model: nn.Module, cfg, batch, device: torch.device, repeat: int) -> dict:
    """One training iteration (forward + losses, backward, clipping, SGD step), ``repeat`` times."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    optimizer = torch.optim.SGD(params, lr=t.lr * 0.01, momentum=t.momentum, weight_decay=t.weight_decay)
    images, targets = batch

    def step() -> None:
        with torch.profiler.record_function("forward"):
            losses = model(images, targets)
            loss = sum(losses.values())
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer step"):
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, oneDNN primitive caches)
    walls = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        walls.append(time.perf_counter() - start)

    names = {n for n, _ in MODULES} | {"forward", "backward", "optimizer step"}
    forward_runs, backward_runs, total_runs = [], [], []
    ranges = ModuleRanges(model)
    for _ in range(repeat):
        forward, backward = charge(profiled(step, device), names, device.type == "cuda")
        totals = {k: forward.pop(k) for k in ("forward", "backward", "optimizer step")}
        forward_runs.append(exclusive(forward))
        backward_runs.append(exclusive(backward, nested=False))
        total_runs.append(totals)
    ranges.remove()
    return {"forward_ms": min_over(forward_runs), "backward_ms": min_over(backward_runs),
            "totals_ms": min_over(total_runs), "wall_s_per_iter": min(walls),
            "images": len(images)}


def profile_pass(model: nn.Module, run_image: Callable, images: list, device: torch.device,
                 repeat: int, extra_ranges: tuple[str, ...] = ()) -> dict:
    """Per-image milliseconds of ``run_image(image)`` over ``images``, per module range."""
    names = {n for n, _ in MODULES} | {"image"} | set(extra_ranges)

    def one_pass() -> None:
        for image in images:
            with torch.profiler.record_function("image"):
                run_image(image)

    one_pass()  # warm-up
    runs = []
    ranges = ModuleRanges(model)
    for _ in range(repeat):
        forward, _ = charge(profiled(one_pass, device), names, device.type == "cuda")
        per_image = {k: v / len(images) for k, v in exclusive(forward).items()}
        total = per_image.pop("image")
        per_image["other"] = total - sum(per_image.values())
        per_image["total"] = total
        runs.append(per_image)
    ranges.remove()
    return min_over(runs)


# --------------------------------------------------------------------------------------------
# Setup and report
# --------------------------------------------------------------------------------------------
def demo_settings(folder: str, overrides: list[str], train_images: int, test_images: int):
    """The demo's config over a fresh make-shapes benchmark in ``folder``, plus ``overrides``."""
    from vldus.config import load_config, save_config
    from vldus.data.shapes import make_shapes
    from vldus.demo import FULL, demo_config

    make_shapes(os.path.join(folder, "shapes"), seed=0, train_images=train_images, test_images=test_images,
                val_images=1, progress=False)
    path = os.path.join(folder, "config.yaml")
    save_config(demo_config(folder, FULL, seed=0), path)
    return load_config(path, overrides)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def table(result: dict) -> str:
    tr = result["training"]
    lines = [f"# {result['machine']}; device {result['device']}; load average before: {result['load']}",
             f"# settings: {result['settings']}",
             "", f"training iteration ({tr['images']} images; ms, min of {result['repeat']})",
             f"{'component':44s} {'forward':>8s} {'backward':>9s} {'total':>8s} {'share':>6s}"]
    keys = list(dict.fromkeys([*tr["forward_ms"], *tr["backward_ms"]]))
    step = tr["totals_ms"]
    whole = sum(step.values())
    for k in keys:
        f, b = tr["forward_ms"].get(k, 0.0), tr["backward_ms"].get(k, 0.0)
        lines.append(f"{k:44s} {f:8.1f} {b:9.1f} {f + b:8.1f} {100 * (f + b) / whole:5.1f}%")
    lines.append(f"{'clip + SGD step + zero_grad':44s} {'':8s} {'':9s} {step['optimizer step']:8.1f} "
                 f"{100 * step['optimizer step'] / whole:5.1f}%")
    lines.append(f"{'iteration (profiled: forward, backward, step)':44s} {step['forward']:8.1f} "
                 f"{step['backward']:9.1f} {whole:8.1f}")
    lines.append(f"{'iteration, wall clock, not profiled':44s} {'':8s} {'':9s} {1000 * tr['wall_s_per_iter']:8.1f}")
    for part, title in (("extraction", "extraction pass (ms per image)"), ("test", "test pass (ms per image)")):
        p = result[part]
        lines += ["", f"{title}, min of {result['repeat']}"]
        for k, v in p.items():
            if k != "total":
                lines.append(f"{k:44s} {v:8.1f} {100 * v / p['total']:5.1f}%")
        lines.append(f"{'total':44s} {p['total']:8.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--repeat", type=int, default=3, help="profiled runs of each part (the table: minimum)")
    ap.add_argument("--images", type=int, default=16, help="images of the extraction and test passes")
    ap.add_argument("--checkpoint", default=None, help="a trained detector (default: untrained)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides on top of the demo's settings")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()

    from vldus.data.images import read_rgb
    from vldus.data.readers import load_records, select_test, select_training
    from vldus.detection.cache import box_inputs, score_boxes
    from vldus.detection.dataset import collate_fn, training_dataset
    from vldus.detection.extract import RoIFeatureExtractor, pass_generator
    from vldus.detection.model import build_detector, load_detector

    device = torch.device(args.device)
    load = open("/proc/loadavg").read().split()[:3] if os.path.isfile("/proc/loadavg") else []
    with tempfile.TemporaryDirectory(prefix="profile_detector_") as folder:
        cfg = demo_settings(folder, args.set, train_images=max(args.images, 16), test_images=args.images)
        split = cfg.load_split()
        if args.checkpoint:
            model = load_detector(cfg, split, args.checkpoint, device)
        else:
            torch.manual_seed(0)
            model = build_detector(cfg, split).to(device)

        dataset = training_dataset(cfg, split)
        images, targets = collate_fn([dataset[i] for i in range(cfg.train.batch_size)])
        batch = ([im.to(device) for im in images],
                 [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in tg.items()} for tg in targets])
        training = profile_training(copy.deepcopy(model), cfg, batch, device, args.repeat)

        model.eval()
        train_records = select_training(load_records(cfg.data.train, split), split, 0)[: args.images]
        extractor = RoIFeatureExtractor(copy.deepcopy(model), cfg.features, cfg.train.flip)
        loaded = [(read_rgb(r.path), torch.from_numpy(r.boxes), torch.from_numpy(r.labels)) for r in train_records]
        extraction = profile_pass(extractor.model, lambda x: extractor(*x, pass_generator(0, 0)), loaded,
                                  device, args.repeat)

        test_records = select_test(load_records(cfg.data.test, split), split, "gzsd", cfg.data.test_rule)
        test_images = [read_rgb(r.path).to(device, torch.float32) / 255.0 for r in test_records[: args.images]]
        test = profile_pass(model, lambda image: score_boxes(model, box_inputs(model, image)), test_images,
                            device, args.repeat)

    d, f = cfg.detector, cfg.features
    result = {
        "machine": machine(), "device": str(device), "load": " ".join(load), "repeat": args.repeat,
        "settings": (f"{d.backbone} FPN {d.fpn_channels}, {d.min_size}-{d.max_size} px, batch {cfg.train.batch_size}, "
                     f"{d.roi_batch_size} RoIs/image, RoIAlign {d.roi_align} (ratio {d.roi_sampling_ratio}), "
                     f"proposals {d.rpn_post_nms_train} train / "
                     f"{f.proposals or d.rpn_post_nms_train} extraction / {d.rpn_post_nms_test} test"
                     f"{', channels-last' if d.channels_last else ''}"
                     f"{', checkpoint ' + args.checkpoint if args.checkpoint else ', untrained'}"),
        "overrides": args.set, "training": training, "extraction": extraction, "test": test,
    }
    print(table(result))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
