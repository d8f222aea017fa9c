"""``vldus detect``: find user-named classes in images with a model bundle (``vldus export``).

    vldus detect photos/ --model BUNDLE --classes "zebra, giraffe" [--gzsd] [--score 0.3] --out DIR

Writes, per image, ``DIR/<stem>.png`` (detections drawn; new names in the unseen colour) and
``DIR/<stem>.json`` = {"image": path, "width", "height", "classes": [names], "setting": "zsd" |
"gzsd", "boxes": [[x1, y1, x2, y2], ...] (pixels), "labels": [name, ...], "scores": [...]},
best first, "zsd_scoring" or "gzsd_scoring": {"scoring", "threshold", "slope", "seen_weight",
"source"} and "box_regression" (the new names' box deltas: ``inference.box_regression``)
(scored as ``vldus test --zsd`` / ``--gzsd``: see :meth:`vldus.api.ZeroShotDetector.set_classes`).
Everything goes through :class:`vldus.api.ZeroShotDetector`, so the Python API gives the same
boxes.
"""
from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from vldus.errors import InputError
from vldus.files import write_json


def add_parser(sub, common) -> None:
    p = sub.add_parser("detect", parents=[common], help="detect classes named at run time (model bundle)",
                       description="Embed the class names with the bundle's encoder, synthesize their "
                                   "features, train (or load from the cache) their classifier, and detect "
                                   "them in the images: one PNG and one JSON per image.")
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDER", help="image files and/or folders")
    p.add_argument("--model", required=True, metavar="BUNDLE", help="bundle folder (vldus export)")
    p.add_argument("--classes", required=True, metavar="NAMES", help='comma-separated, e.g. "zebra, giraffe"')
    p.add_argument("--gzsd", action="store_true", help="also detect the bundle's seen classes")
    p.add_argument("--score", type=float, default=0.3, help="keep detections with at least this score")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--cache-dir", default=None, help="classifier cache (default BUNDLE/cache or ~/.cache/vldus)")
    p.set_defaults(func=run)


def output_stems(paths: list[str]) -> list[str]:
    """File stems, made unique with _2, _3 ... when two images share one."""
    stems, used = [], set()
    for path in paths:
        stem = base = os.path.splitext(os.path.basename(path))[0]
        k = 1
        while stem in used:
            k += 1
            stem = f"{base}_{k}"
        used.add(stem)
        stems.append(stem)
    return stems


def run(args: argparse.Namespace) -> int:
    from vldus.api import ZeroShotDetector, check_image_files, image_paths, read_image
    from vldus.detection.gzsd import describe_scoring

    if not 0.0 <= args.score <= 1.0:
        raise InputError("--score", f"must be in [0, 1], got {args.score}")
    paths = image_paths(args.images)
    check_image_files(paths)  # fail on a bad file before any work
    start = time.time()
    det = ZeroShotDetector.load(args.model, device=args.device, cache_dir=args.cache_dir)
    det.set_classes(args.classes, gzsd=args.gzsd)
    how = "loaded from the cache" if det.classifier_source == "cache" else "trained"
    print(f"detect: classifier for {len(det.classes)} names {how} ({det.classifier_path}), "
          f"{time.time() - start:.1f} s")
    setting = "gzsd" if args.gzsd else "zsd"
    print(f"detect: {setting} scoring: {describe_scoring(det.scoring)}")
    os.makedirs(args.out, exist_ok=True)
    count = 0
    for path, stem in tqdm(list(zip(paths, output_stems(paths))), desc="detect", unit="img", disable=args.quiet):
        image = read_image(path)
        result = det.detect_tensor(image, args.score)
        det.draw(image, result, args.score).save(os.path.join(args.out, f"{stem}.png"))
        record = {"image": path, "width": int(image.shape[2]), "height": int(image.shape[1]),
                  "classes": det.classes, "setting": setting, f"{setting}_scoring": det.scoring,
                  "box_regression": det.head.box_regression,
                  "boxes": result["boxes"].tolist(), "labels": result["labels"],
                  "scores": result["scores"].tolist()}
        write_json(os.path.join(args.out, f"{stem}.json"), record)
        count += len(result["labels"])
    print(f"detect: {len(paths)} images, {count} detections, {time.time() - start:.1f} s -> {args.out}")
    return 0
