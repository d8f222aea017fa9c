"""The one record format every dataset reader returns.

An :class:`ImageRecord` is one image with its annotations, labels already mapped to the
split's detector order (1..C; 0 is background and never appears in a record).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageRecord:
    """One annotated image.

    boxes:  float32 (N, 4), xyxy in pixels of the original image
    labels: int64 (N,), detector class index in 1..C
    ignore: bool (N,), crowd (COCO) / difficult (VOC, DIOR) boxes: neither TP nor FP in
            evaluation, not used as training targets
    """

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.ignore = np.asarray(self.ignore, dtype=bool).reshape(-1)
        assert len(self.boxes) == len(self.labels) == len(self.ignore), "boxes/labels/ignore lengths differ"

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray) -> "ImageRecord":
        """The same image with only the annotations where ``keep`` is True."""
        keep = np.asarray(keep, dtype=bool)
        return ImageRecord(self.image_id, self.path, self.width, self.height,
                           self.boxes[keep], self.labels[keep], self.ignore[keep])
