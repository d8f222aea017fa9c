"""The README's overview picture: the first pictures of a demo run, side by side.

    python benchmarks/demo_picture.py DEMO_OUT [--out docs/demo_detections.png] [--count 4]

DEMO_OUT/pictures/*.png are the GZSD detections of the main row (``vldus test --show-dir``,
drawn by vldus.detection.visualize: score threshold, per-class NMS at drawing time, dashed
ground truth, legend).
"""
from __future__ import annotations

import argparse
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vldus.detection.visualize import tile  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_out")
    ap.add_argument("--out", default=os.path.join("docs", "demo_detections.png"))
    ap.add_argument("--count", type=int, default=4)
    args = ap.parse_args()
    folder = os.path.join(args.demo_out, "pictures")
    # the per-image pictures only (the demo also writes disagreement.png, three panels wide)
    names = sorted(p for p in os.listdir(folder) if p.endswith(".png") and p != "disagreement.png")[: args.count]
    if not names:
        print(f"{folder}: no pictures", file=sys.stderr)
        return 2
    tile([Image.open(os.path.join(folder, n)).convert("RGB") for n in names], columns=min(4, len(names))).save(args.out)
    print(f"{args.out}: {len(names)} pictures from {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
