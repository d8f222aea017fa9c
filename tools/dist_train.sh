#!/usr/bin/env bash
# Distributed `vldus train-detector` with torchrun: one process per GPU (nccl), or per CPU
# slot (gloo) when there is no GPU; DistributedDataParallel, each process sees its share of
# every epoch. train.batch_size is per process (the paper: 4 GPUs x 1 image at lr 0.02).
#
#   tools/dist_train.sh CFG NPROC [train-detector options]
#   tools/dist_train.sh configs/coco_65_15.yaml 4 --validate
#   tools/dist_train.sh configs/coco_65_15.yaml 4 --resume
#
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT (or PORT) on each node.
# PYTHON selects the interpreter (default: python3, else python).
# VLDUS_DIST_TIMEOUT_MIN: the long timeout in minutes (default 120): work that rank 0 does alone
# between collectives must finish within it. VLDUS_TRAIN_TIMEOUT_MIN: train-detector's
# collectives (default 30): a rank that hangs stops the others within it.
# Several nodes need one shared file system for the work dir (checked at start); gloo on hosts
# with several network interfaces: set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME for NCCL).
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 CFG NPROC [vldus train-detector options]" >&2
    exit 2
fi
CFG=$1
NPROC=$2
shift 2
exec "$(dirname "$0")/torchrun.sh" "$NPROC" train-detector --config "$CFG" "$@"
