"""Benchmark detector training (`vldus train-detector`): iterations/s and peak memory.

Cases (randomly initialised detectors, random images with random boxes):
  shapes      configs/shapes.yaml: MobileNetV2-FPN, train.batch_size images of 160x160 px
              resized to the config's scale (the CPU demo)
  r101_1333   configs/coco_65_15.yaml: ResNet-101-FPN, 1 image of 1333x800 (the paper's scale)

One training iteration = forward with losses, backward, gradient clipping, SGD step, as in
vldus.detection.train, after 3 warm-up iterations. Trainable BatchNorm replaces the configs'
frozen BN (frozen BN on a random backbone blows up), and without ImageNet weights all 5 backbone
stages train (the configs train 3 with weights): the result records both
(``trainable_stages``, ``configured_trainable_layers``). Each case runs in its own
subprocess so that its peak RSS is its own. On CUDA the model runs under autocast with a
GradScaler (``--amp``, default on there) and peak CUDA memory is reported too.

    python benchmarks/bench_detector.py [--cases shapes r101_1333] [--iters N] [--device cpu|cuda]

Feature-extraction timing lives in benchmarks/bench_extract.py. Other scripts can call
:func:`time_training` directly.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import _cases  # benchmarks/_cases.py (run as a script, so its folder is on sys.path)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # vldus, uninstalled

CASES = {
    # name: (config, image width, image height, images per iteration (None: train.batch_size), timed iters)
    "shapes": ("configs/shapes.yaml", 160, 160, None, 10),
    "r101_1333": ("configs/coco_65_15.yaml", 1333, 800, 1, 2),
}


def random_batch(batch: int, width: int, height: int, num_classes: int, seed: int = 0):
    """``batch`` random images (3, H, W) in 0..1 and targets with 3-6 random boxes each."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=g))
        k = int(torch.randint(3, 7, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 0.7 * torch.tensor([width, height])
        wh = (0.1 + 0.2 * torch.rand(k, 2, generator=g)) * torch.tensor([width, height])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, num_classes + 1, (k,), generator=g)})
    return images, targets


def time_training(cfg, split, batch: int, width: int, height: int, iters: int, warmup: int = 1,
                  device: str = "cpu", amp: bool = False) -> dict:
    """Seconds per training iteration of ``build_detector(cfg, split)`` on random data.

    Returns {"s_per_iter", "iters_per_s", "images_per_s", "cpu_s_per_iter", "peak_cuda_mb" and
    "gpu" (CUDA only)}.
    """
    import torch

    from vldus.detection.model import build_detector
    from vldus.detection.train import optimizer_step

    torch.manual_seed(0)
    model = build_detector(cfg, split, load_backbone=False).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    optimizer = torch.optim.SGD(params, lr=t.lr * 0.01, momentum=t.momentum, weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    images, targets = random_batch(batch, width, height, split.num_classes)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in tg.items()} for tg in targets]
    cuda = device.startswith("cuda")

    def step():
        with torch.autocast(torch.device(device).type, enabled=amp):
            loss = sum(model(images, targets).values())
        optimizer_step(loss, optimizer, scaler, params, t.grad_clip)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    # CPU seconds of this process per iteration: on a shared machine a steadier figure than
    # wall time (with N threads, wall time on an idle machine is roughly cpu_s / N or more).
    cpu_seconds = (time.process_time() - cpu_start) / iters
    result = {"s_per_iter": round(seconds, 4), "iters_per_s": round(1 / seconds, 3),
              "images_per_s": round(batch / seconds, 3), "cpu_s_per_iter": round(cpu_seconds, 4)}
    if cuda:
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result["gpu"] = torch.cuda.get_device_name()
    return result


WARMUP = 3  # the first iterations allocate and pick kernels


def run_case(name: str, iters: int, device: str, amp: bool) -> dict:
    import torch

    from vldus.config import load_config
    from vldus.data.splits import split_from_names

    config, width, height, batch, _ = CASES[name]
    cfg = load_config(config, ["detector.backbone_weights=null", "detector.norm=bn"])
    if name == "shapes":
        from vldus.data.shapes import CLASSES, DEFAULT_UNSEEN

        split = split_from_names("shapes", CLASSES, DEFAULT_UNSEEN)
    else:
        split = cfg.load_split()
    batch = batch or cfg.train.batch_size
    result = {"case": name, "device": device, "amp": amp, "batch": batch, "iters": iters,
              "scale": [cfg.detector.max_size, cfg.detector.min_size], "backbone": cfg.detector.backbone,
              "threads": torch.get_num_threads()}
    result |= time_training(cfg, split, batch, width, height, iters, warmup=WARMUP, device=device, amp=amp)
    result |= {"trainable_stages": 5, "configured_trainable_layers": cfg.detector.trainable_layers,
               "configured_amp": cfg.train.amp}
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def main() -> int:
    args = _cases.parse_args(__doc__, CASES, "iters", "timed iterations per case")
    if args.worker:
        print(json.dumps(run_case(args.worker, args.iters, args.device, _cases.use_amp(args))))
        return 0
    return _cases.run_in_subprocesses(__file__, args, "iters", lambda name: CASES[name][4], lambda res: (
        f"{res['backbone']} {res['scale']} batch {res['batch']}: {res['iters_per_s']:.3f} it/s "
        f"({res['s_per_iter']:.3f} s/it, {res['images_per_s']:.2f} img/s, {res['cpu_s_per_iter']:.3f} CPU s/it, "
        f"{res['iters']} iters, {res['threads']} threads), peak RSS {res['peak_rss_mb']} MB"))


if __name__ == "__main__":
    sys.exit(main())
