#!/usr/bin/env python
"""Familiar entry point of the published code: the compatibility ("unseen") classifier.

    python train_unseen_classifier.py --config configs/coco_65_15.yaml [--set KEY=VALUE ...]

is ``vldus train-unseen-classifier`` (docs/design.md §5); see ``vldus train-unseen-classifier --help``.
"""
import sys

from vldus.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-unseen-classifier", *sys.argv[1:]]))
