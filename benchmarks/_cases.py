"""Shared driver of the benchmarks that time each case in a fresh subprocess (so peak memory
is the case's own): parse the common options, run ``SCRIPT --worker CASE ...`` per case, print
one line per case from the JSON the worker prints last."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable


def parse_args(doc: str, cases: dict, count_option: str, count_help: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(cases), choices=list(cases))
    parser.add_argument(f"--{count_option}", type=int, default=None, help=count_help)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--amp", choices=["on", "off", "auto"], default="auto", help="auto: on for CUDA")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one case, in a subprocess
    return parser.parse_args()


def use_amp(args: argparse.Namespace) -> bool:
    return args.amp == "on" or (args.amp == "auto" and args.device.startswith("cuda"))


def run_in_subprocesses(script: str, args: argparse.Namespace, count_option: str,
                        default_count: Callable[[str], int], describe: Callable[[dict], str]) -> int:
    """Run every case of ``args.cases`` as ``script --worker CASE``; print ``describe(result)``."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# load: {open('/proc/loadavg').read().split()[:3]}  cpus: {os.cpu_count()}")
    for name in args.cases:
        count = getattr(args, count_option) or default_count(name)
        cmd = [sys.executable, script, "--worker", name, f"--{count_option}", str(count),
               "--device", args.device, "--amp", args.amp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-3000:]}", file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        extra = f", peak CUDA {res['peak_cuda_mb']} MB ({res['gpu']})" if "peak_cuda_mb" in res else ""
        print(f"{name:10s} {res['device']:5s} amp={res['amp']!s:5s} {describe(res)}{extra}")
    print(f"# load after: {open('/proc/loadavg').read().split()[:3]}")
    return 0
