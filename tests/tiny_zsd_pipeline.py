"""A tiny trained vldus pipeline on the embedded benchmark, built once per test session.

Used by tests/test_bundle.py and tests/test_api.py: make-shapes -> train-detector (2 short
epochs, ImageNet MobileNetV2 from the fdet package) -> extract-features -> compat classifier ->
train-generator (few GAN epochs), each through ``vldus.cli.main`` like ``vldus demo``.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from typing import NamedTuple

HELD_OUT = ("blue circle", "red square")
TRAIN_IMAGES = 160


class TinyRun(NamedTuple):
    out: str          # run folder
    config: str       # OUT/config.yaml
    checkpoint: str   # OUT/work/detector/epoch_1.pth
    synth_dir: str    # OUT/work/synth
    shapes: str       # OUT/shapes (the benchmark)
    seconds: float


_CACHE: dict[str, TinyRun] = {}
TIMINGS: dict[str, float] = {}  # seconds per stage command


def _stage(argv: list[str]) -> None:
    from vldus import cli

    start = time.perf_counter()
    rc = cli.main(argv + ["--quiet"])
    TIMINGS[argv[0]] = TIMINGS.get(argv[0], 0.0) + time.perf_counter() - start
    if rc:
        raise RuntimeError(f"stage failed: vldus {' '.join(argv)} (exit {rc})")


def tiny_run() -> TinyRun:
    """Train (once per process) and return the tiny pipeline's files."""
    if "run" in _CACHE:
        return _CACHE["run"]
    from vldus.config import load_config, save_config
    from vldus.detection.model import default_backbone_weights

    start = time.perf_counter()
    out = tempfile.mkdtemp(prefix="vldus_tiny_zsd_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    shapes = os.path.join(out, "shapes")
    _stage(["make-shapes", "--out", shapes, "--seed", "0", "--train-images", str(TRAIN_IMAGES), "--test-images", "40",
            "--unseen", ",".join(HELD_OUT)])
    cfg = load_config("shapes")
    cfg.name = "tiny"
    cfg.split = os.path.join(shapes, "split.json")
    cfg.work_dir = os.path.join(out, "work")
    for source, part in ((cfg.data.train, "train"), (cfg.data.test, "test")):
        source.ann_file = os.path.join(shapes, "annotations", f"instances_{part}.json")
        source.img_dir = os.path.join(shapes, "images")
    cfg.embeddings.file = os.path.join(shapes, "attributes.npy")
    cfg.detector.backbone_weights = default_backbone_weights(cfg)
    # a fast detector: native 160 px images, fewer RoIs; 2 epochs so seen classes score well
    cfg.detector.min_size = cfg.detector.max_size = 160
    cfg.detector.roi_batch_size, cfg.detector.rpn_post_nms_train = 64, 150
    cfg.train.epochs, cfg.train.lr_steps = 2, []  # 80 iterations, all inside the lr warm-up
    cfg.gan.epochs, cfg.gan.epoch_budget = 3, 2000
    cfg.compat.epochs, cfg.compat.lr_step = 5, 4
    cfg.unseen_classifier.syn_num, cfg.unseen_classifier.epochs = 200, 8
    config = os.path.join(out, "config.yaml")
    save_config(cfg, config)
    _stage(["train-detector", "--config", config])
    checkpoint = os.path.join(cfg.path("detector"), "epoch_2.pth")
    _stage(["extract-features", "--config", config, "--checkpoint", checkpoint, "--classes", "seen",
            "--data-split", "train"])
    _stage(["train-unseen-classifier", "--config", config])
    _stage(["train-generator", "--config", config, "--checkpoint", checkpoint, "--distill", "off"])
    run = TinyRun(out, config, checkpoint, cfg.path("synth"), shapes, time.perf_counter() - start)
    _CACHE["run"] = run
    return run


def tiny_bundle() -> str:
    """The tiny run exported once (``vldus export``) to a bundle folder; returns its path."""
    if "bundle" in _CACHE:
        return _CACHE["bundle"]
    run = tiny_run()
    bundle = os.path.join(run.out, "bundle")
    _stage(["export", "--config", run.config, "--out", bundle, "--checkpoint", run.checkpoint])
    _CACHE["bundle"] = bundle
    return bundle


if __name__ == "__main__":
    r = tiny_run()
    print(r)
    print(tiny_bundle())
    print(TIMINGS)

