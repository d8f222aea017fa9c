#!/usr/bin/env bash
# Stage 3 for DIOR 16/4 (docs/design.md §5-7): the compatibility classifier, then the synthesizer
# and the unseen classifier. Every hyper-parameter is in configs/dior_16_4.yaml (gan and
# unseen_classifier sections); nothing is set here.
#
#   script/dior_16_4.sh [train-generator options]   e.g. --clip-weights FILE --device cuda --resume
#
# The compatibility classifier is trained once (a finished one is kept; delete
# WORK_DIR/synth/compat_classifier.pth to retrain it); the options go to vldus train-generator.
# CONFIG=... overrides the config file, VLDUS=... the command (default: vldus).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/dior_16_4.yaml}
VLDUS=${VLDUS:-vldus}
$VLDUS train-unseen-classifier --config "$CONFIG" --resume
$VLDUS train-generator --config "$CONFIG" "$@"
