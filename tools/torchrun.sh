#!/usr/bin/env bash
# The torchrun launch shared by dist_train.sh and dist_test.sh: NPROC processes of
# `vldus ARGS...` per node.
#
#   tools/torchrun.sh NPROC VLDUS_COMMAND [options]
#
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT (or PORT) on each node.
# PYTHON selects the interpreter (default: python3, else python).
# VLDUS_DIST_TIMEOUT_MIN: the long timeout in minutes (default 120): work that rank 0 does alone
# between collectives must finish within it. VLDUS_TRAIN_TIMEOUT_MIN: train-detector's
# collectives (default 30): a rank that hangs stops the others within it.
# Several nodes need one shared file system for the work dir (checked at start); gloo on hosts
# with several network interfaces: set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME for NCCL).
set -euo pipefail
NPROC=$1
shift
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-${PORT:-29500}}" \
    --nproc_per_node="$NPROC" \
    -m vldus.cli "$@"
