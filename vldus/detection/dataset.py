"""Detector training data: :class:`ImageRecord` lists -> (image tensor, target dict) pairs.

One sample is::

    image:  float32 (3, H, W), RGB in 0..1 (the detector normalises and resizes it itself);
            with ``uint8=True`` the decoded uint8 (3, H, W), a quarter of the bytes to copy to
            the device, where :func:`vldus.data.images.to_float` makes the detector's input
    target: {"boxes": float32 (N, 4) xyxy pixels, "labels": int64 (N,) detector index 1..C,
             "image_id": int}

Ignore boxes (crowd / difficult) are not targets. Training samples are flipped horizontally
with probability ``flip``; whether sample ``i`` of epoch ``e`` is flipped depends only on
(seed, e, i), so the data are the same whatever the number of loader workers and after a
resume. ``repeat`` > 1 is mmdetection's RepeatDataset: one epoch visits every image ``repeat``
times (each visit with its own flip draw).

A missing or undecodable image raises :class:`BadImageError` (an InputError naming the file);
with ``skip_bad=True`` it is logged, replaced by the next readable image, and its path is
listed in the replacement's target under ``"skipped"`` so the training loop can count it.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vldus.data.images import read_rgb, to_float
from vldus.data.records import ImageRecord
from vldus.errors import InputError

log = logging.getLogger(__name__)


class BadImageError(InputError):
    """An image file that is missing or cannot be decoded.

    Survives a DataLoader worker: torch re-raises worker exceptions as ``type(msg)`` with the
    formatted traceback as the only argument, from whose last line the message is recovered.
    """

    def __init__(self, source: Optional[str], message: Optional[str] = None):
        if message is None:  # re-raised by a DataLoader worker: source is the traceback text
            last = [line for line in str(source).strip().splitlines() if line.strip()][-1]
            text = last.split(": ", 1)[1] if last.startswith(("vldus.", "BadImageError")) else last
            super().__init__(None, text)
        else:
            super().__init__(source, message)


def read_image(path: str, width: int, height: int, uint8: bool = False) -> torch.Tensor:
    """Decode ``path`` to float32 (3, H, W) RGB in 0..1 (``uint8``: uint8 0..255); BadImageError
    when it cannot be read or its size differs from the annotation's ``width`` x ``height``
    (boxes would be wrong)."""
    try:
        image = read_rgb(path)
    except InputError as e:
        raise BadImageError(path, e.message) from None
    if image.shape[1:] != (height, width):
        raise BadImageError(path, f"image is {image.shape[2]}x{image.shape[1]} px but the annotation says "
                                  f"{width}x{height}")
    return image if uint8 else to_float(image)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror xyxy boxes (N, 4) in an image ``width`` px wide."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


class DetectionDataset(Dataset):
    """(image, target) samples from records; see the module docstring."""

    def __init__(self, records: Sequence[ImageRecord], train: bool, flip: float = 0.0, seed: int = 0,
                 repeat: int = 1, skip_bad: bool = False, uint8: bool = False):
        if repeat < 1:
            raise InputError("data.train.repeat", f"must be >= 1, got {repeat}")
        self.records = list(records)
        self.train = train
        self.flip = flip if train else 0.0
        self.seed = seed
        self.repeat = repeat
        self.skip_bad = skip_bad
        self.uint8 = uint8
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the flip draws of ``epoch`` (call it like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) * self.repeat

    def is_flipped(self, index: int) -> bool:
        if self.flip <= 0:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < self.flip)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        skipped = []
        n = len(self.records)
        for attempt in range(n):
            record = self.records[(index + attempt) % n]
            try:
                image = read_image(record.path, record.width, record.height, self.uint8)
                break
            except BadImageError as e:
                if not self.skip_bad:
                    raise
                log.warning("skipping unreadable image: %s", e)
                skipped.append(record.path)
        else:
            raise BadImageError(None, f"none of the {n} images can be read")

        keep = ~record.ignore
        boxes = torch.from_numpy(record.boxes[keep]).float().reshape(-1, 4)
        labels = torch.from_numpy(record.labels[keep]).long()
        if self.is_flipped(index):
            image = image.flip(-1)
            boxes = flip_boxes(boxes, record.width)
        target = {"boxes": boxes, "labels": labels, "image_id": int(record.image_id)}
        if skipped:
            target["skipped"] = skipped
        return image, target


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images differ in size: keep lists (torchvision's detectors batch them themselves)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def training_dataset(cfg, split, skip_bad: bool = False, uint8: bool = False) -> DetectionDataset:
    """The detector's training set (docs/design.md §2.3): ``cfg.data.train`` records whose objects are all
    seen, sides >= ``data.min_image_side``, flipped with ``train.flip``, repeated
    ``data.train.repeat`` times per epoch (``uint8``: images as decoded, see the module doc)."""
    from vldus.data.readers import load_records, select_training

    source = cfg.data.train
    records = select_training(load_records(source, split), split, cfg.data.min_image_side)
    if not records:
        raise InputError(source.ann_file or source.list_file or None,
                         f"no training images: none has only seen classes of split {split.name!r}")
    return DetectionDataset(records, train=True, flip=cfg.train.flip, seed=cfg.train.seed,
                            repeat=source.repeat, skip_bad=skip_bad, uint8=uint8)
