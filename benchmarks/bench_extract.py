"""Benchmark `vldus extract-features`: images/s and peak memory, end to end (image decode,
detector, sampling, sharded writing, final merge), with randomly initialised detectors.

Cases:
  shapes      configs/shapes.yaml: MobileNetV2-FPN on 160 px PNG images at their own size (the CPU demo)
  r101_1333   configs/coco_65_15.yaml: ResNet-101-FPN, 1333x800 JPEG images (the paper's scale)

Each case runs in its own subprocess so that its peak RSS is its own. On CUDA the model runs
under autocast (``--amp``, default on there); peak CUDA memory is reported too.

    python benchmarks/bench_extract.py [--cases shapes r101_1333] [--images N] [--device cpu|cuda]
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

import _cases  # benchmarks/_cases.py (run as a script, so its folder is on sys.path)

CASES = {
    # name: (config, image width, image height, default number of timed images)
    "shapes": ("configs/shapes.yaml", 160, 160, 24),
    "r101_1333": ("configs/coco_65_15.yaml", 1333, 800, 3),
}


def make_images(folder: str, width: int, height: int, count: int, num_classes: int, seed: int = 0):
    """Random images with 3-6 random boxes each, as ImageRecords."""
    import numpy as np
    from PIL import Image

    from vldus.data.records import ImageRecord

    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        path = os.path.join(folder, f"img{i}.{'png' if width < 400 else 'jpg'}")
        Image.fromarray(pixels).save(path, quality=90)
        k = int(rng.integers(3, 7))
        xy = rng.uniform(0, 0.7, (k, 2)) * [width, height]
        wh = rng.uniform(0.1, 0.3, (k, 2)) * [width, height]
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(1, num_classes + 1, k)
        records.append(ImageRecord(i, path, width, height, boxes, labels, np.zeros(k, bool)))
    return records


def calibrate_batchnorm(model, records) -> None:
    """Set BatchNorm running statistics of the random backbone from a few images."""
    import torch

    from vldus.data.images import read_rgb

    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    device = next(model.parameters()).device
    images, _ = model.transform([read_rgb(r.path).to(device).float() / 255 for r in records])
    model.backbone.train()
    with torch.no_grad():
        model.backbone(images.tensors)
    model.eval()


def run_case(name: str, images: int, device: str, amp: bool) -> dict:
    import torch

    from vldus.config import load_config
    from vldus.data.splits import split_from_names
    from vldus.detection.extract import RoIFeatureExtractor, output_paths, run_extraction
    from vldus.detection.model import build_detector

    config, width, height, _ = CASES[name]
    # trainable BN, calibrated below: a random network with identity (frozen) BN blows up its
    # activations through ResNet-101 and the RPN then proposes non-finite boxes
    cfg = load_config(config, ["detector.backbone_weights=null", "detector.norm=bn"])
    if name == "shapes":
        from vldus.data.shapes import CLASSES

        split = split_from_names("shapes", CLASSES, CLASSES[-3:])
    else:
        split = cfg.load_split()
    torch.manual_seed(0)
    model = build_detector(cfg, split, load_backbone=False).to(device).eval()
    extractor = RoIFeatureExtractor(model, cfg.features, cfg.train.flip, amp=amp)
    with tempfile.TemporaryDirectory() as tmp:
        records = make_images(tmp, width, height, images + 1, split.num_classes)
        calibrate_batchnorm(model, records[:2])
        warm = output_paths(os.path.join(tmp, "warm"), "train", 0.6, 0.3)
        run_extraction(extractor, records[:1], warm, quiet=True)  # first-call overheads
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        paths = output_paths(os.path.join(tmp, "out"), "train", 0.6, 0.3)
        start = time.perf_counter()
        manifest = run_extraction(extractor, records[1:], paths, quiet=True, workers=cfg.data.workers)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    result = {
        "case": name, "device": device, "amp": amp, "images": images, "threads": torch.get_num_threads(),
        "images_per_s": round(images / seconds, 3), "s_per_image": round(seconds / images, 3),
        "rows_per_image": round(manifest["rows"] / images, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if device.startswith("cuda"):
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> int:
    args = _cases.parse_args(__doc__, CASES, "images", "timed images per case")
    if args.worker:
        print(json.dumps(run_case(args.worker, args.images, args.device, _cases.use_amp(args))))
        return 0
    return _cases.run_in_subprocesses(__file__, args, "images", lambda name: CASES[name][3], lambda res: (
        f"{res['images_per_s']:7.2f} img/s ({res['s_per_image']:.3f} s/img, {res['images']} images, "
        f"{res['threads']} threads), {res['rows_per_image']} rows/img, peak RSS {res['peak_rss_mb']} MB"))


if __name__ == "__main__":
    sys.exit(main())
