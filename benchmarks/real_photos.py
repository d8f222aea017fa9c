"""The real-photo benchmark: ``vldus prepare`` + ``vldus run`` on two datasets of photographs, read
as any user's data, with MiniLM class embeddings (no CLIP).

Datasets (never committed; the folder next to the repository, ``../shared/data``, or ``--data``):

- ``kitchen``: GTEA Gaze+ kitchen frames in VOC layout (research use; ``gtea_gazeplus_voc``),
  24 seen / 7 unseen classes after ``--rename bowk=bowl --min-images 12``;
- ``aquarium-1`` / ``-2`` / ``-3``: Roboflow's Aquarium (CC BY 4.0; ``aquarium``, YOLO layout),
  7 classes, unseen pairs {puffin, shark}, {jellyfish, stingray}, {penguin, starfish}, fixed in
  advance.

Each run: ``vldus prepare DATA ... --out OUT/prepared`` then ``vldus run --config
OUT/prepared/config.yaml --out OUT/run --seed N``, timed; ``--store NAME`` then keeps its metrics
under docs/results/real_NAME.json (``benchmarks/make_tables.py --add``) with the dataset, the
prepare summary and the machine in the note. Usage::

    python benchmarks/real_photos.py kitchen --seed 0 --out runs/kitchen_s0 --store kitchen_seed0

``--select`` passes ``vldus run --select``: the synthesizers' settings chosen on pseudo-unseen
validation (the tables' ``selected`` rows; without it the fixed defaults, the ``fixed`` rows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

# name: (dataset folder, prepare options); the unseen sets are fixed in advance
DATASETS = {
    "kitchen": ("gtea_gazeplus_voc", ["--unseen", "pizza,milk,bowl,sausage,microwave,onion,honey",
                                      "--rename", "bowk=bowl", "--min-images", "12"]),
    "aquarium-1": ("aquarium", ["--unseen", "puffin,shark"]),
    "aquarium-2": ("aquarium", ["--unseen", "jellyfish,stingray"]),
    "aquarium-3": ("aquarium", ["--unseen", "penguin,starfish"]),
}
ATTRIBUTION = {
    "gtea_gazeplus_voc": "GTEA Gaze+ (Georgia Tech; research use), VOC-layout copy downscaled to 640x480",
    "aquarium": "Aquarium, Roboflow public datasets (CC BY 4.0)",
}


def vldus(*argv: str) -> float:
    """Run ``vldus ARGV`` (the virtual environment's), fail loudly, return its wall time."""
    exe = os.path.join(os.path.dirname(sys.executable), "vldus")
    start = time.perf_counter()
    print("\n$ vldus " + " ".join(argv), flush=True)
    rc = subprocess.run([exe, *argv], env=dict(os.environ, HF_HUB_OFFLINE="1")).returncode
    if rc:
        sys.exit(f"real_photos: vldus {argv[0]} failed (exit {rc})")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--data", default=SHARED_DATA, help="folder holding the datasets (default %(default)s)")
    p.add_argument("--rows", default=None, help="vldus run --rows (default: all)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="vldus run --set")
    p.add_argument("--resume", action="store_true", help="vldus run --resume (a stopped run into OUT)")
    p.add_argument("--select", action="store_true", help="vldus run --select (settings chosen on pseudo-unseen "
                                                         "validation; default: the fixed ones)")
    p.add_argument("--store", metavar="NAME", help="store the metrics as docs/results/real_NAME.json")
    p.add_argument("--note", default="", help="machine and anything else for the stored file's note")
    args = p.parse_args(argv)

    folder, options = DATASETS[args.dataset]
    data = os.path.join(args.data, folder)
    if not os.path.isdir(data):
        sys.exit(f"real_photos: {data} not found (see docs/results.md, 'Real photographs', for the download)")
    prepared, out = os.path.join(args.out, "prepared"), os.path.join(args.out, "run")
    prepare_s = vldus("prepare", data, *options, "--out", prepared, "--seed", str(args.seed))
    run_argv = ["run", "--config", os.path.join(prepared, "config.yaml"), "--out", out, "--seed", str(args.seed)]
    run_argv += ["--rows", args.rows] if args.rows else []
    run_argv += ["--resume"] if args.resume else []
    run_argv += ["--select"] if args.select else []
    run_argv += ["--set", *args.set] if args.set else []
    run_s = vldus(*run_argv)
    print(f"\nreal_photos: prepare {prepare_s:.0f} s, run {run_s:.0f} s -> {out}/metrics.json")
    if args.store:
        with open(os.path.join(prepared, "prepare.json")) as f:
            summary = json.load(f)
        metrics_file = os.path.join(out, "metrics.json")
        with open(metrics_file) as f:
            metrics = json.load(f)
        metrics["dataset"] = {"name": args.dataset, "folder": folder, "attribution": ATTRIBUTION[folder],
                              "prepare": {k: summary[k] for k in ("classes", "unseen", "excluded", "images",
                                                                  "test_rule") if k in summary},
                              "run_s": run_s, "prepare_s": prepare_s}
        with open(metrics_file, "w") as f:
            json.dump(metrics, f, indent=1)
        note = args.note or f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_tables.py"), "--add", metrics_file,
                        "--name", f"real_{args.store}", "--note", note], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
