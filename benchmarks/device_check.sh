#!/usr/bin/env bash
# The prepared GPU check: wheels and imports, GAN and detector benchmarks, quick demo, CPU-vs-CUDA
# parity, torchrun test, one torchrun training epoch; one table at the end and
# OUT/device_check.json rewritten after every step. See benchmarks/device_check.py.
#
#   benchmarks/device_wheels.sh .whl                              # here: what the GPU machine lacks
#   benchmarks/device_check.sh --wheels .whl --out "$OUT"         # there (300 s budget)
#   benchmarks/device_check.sh --cpu --tiny                       # the same steps on the CPU
#
# Runs with python3 (or $PYTHON), with this checkout first on PYTHONPATH: nothing to install
# but the wheels of --wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/device_check.py "$@"
