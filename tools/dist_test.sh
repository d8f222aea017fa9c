#!/usr/bin/env bash
# Distributed `vldus test` with torchrun: each process detects its share of the test images,
# rank 0 gathers the detections and writes the files (same result as one process).
#
#   tools/dist_test.sh CFG CHECKPOINT NPROC [vldus test options]
#   tools/dist_test.sh configs/coco_65_15.yaml work_dirs/coco_65_15/detector/epoch_12.pth 4 \
#       --syn-weights work_dirs/coco_65_15/synth/classifier_best.pth --zsd --out dets.json
#
# NPROC processes per node (GPUs: one per process, LOCAL_RANK picks the device; CPU: gloo).
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT (or PORT) on each node.
# PYTHON selects the interpreter (default: python3, else python).
# VLDUS_DIST_TIMEOUT_MIN: the process-group timeout in minutes (default 120): work that rank 0
# does alone between collectives must finish within it.
# The processes gather over gloo: on hosts with several network interfaces set GLOO_SOCKET_IFNAME
# (e.g. eth0) so that gloo does not bind the loopback address the hostname may resolve to.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: $0 CFG CHECKPOINT NPROC [vldus test options]" >&2
    exit 2
fi
CFG=$1
CKPT=$2
NPROC=$3
shift 3
exec "$(dirname "$0")/torchrun.sh" "$NPROC" test --config "$CFG" --checkpoint "$CKPT" "$@"
