#!/usr/bin/env bash
# The prepared GPU check: quick demo, GAN and detector benchmarks, torchrun test, CPU-vs-CUDA
# parity; one table at the end. See benchmarks/device_check.py.
#
#   benchmarks/device_check.sh                     # on a CUDA machine (< 8 minutes)
#   benchmarks/device_check.sh --cpu --tiny        # the same steps on the CPU, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${PYTHON:-python}" benchmarks/device_check.py "$@"
