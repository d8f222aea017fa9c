"""Pictures of detections: one PNG per test image (``vldus test --show-dir``).

Boxes of unseen classes are drawn in their own colour, so the zero-shot detections stand out;
each box carries its class name and score. Ground-truth boxes, when given, are thin grey lines.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SEEN_COLOUR = (40, 120, 255)
UNSEEN_COLOUR = (255, 90, 20)
GT_COLOUR = (200, 200, 200)
TEXT_COLOUR = (255, 255, 255)


def draw_detections(image: Image.Image, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str], unseen_ids: Sequence[int], score_thresh: float = 0.3,
                    gt_boxes: Optional[np.ndarray] = None) -> Image.Image:
    """Return a copy of ``image`` (RGB) with detections drawn on it.

    boxes (K, 4) xyxy pixels, scores (K,), labels (K,) detector index 1..C (name =
    ``class_names[label - 1]``); only scores >= ``score_thresh`` are drawn, lowest first so the
    best box ends on top. gt_boxes (N, 4) xyxy, optional.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    line = max(1, round(min(out.size) / 200))
    unseen = set(int(i) for i in unseen_ids)
    if gt_boxes is not None:
        for box in np.asarray(gt_boxes, dtype=float).reshape(-1, 4):
            draw.rectangle(box.tolist(), outline=GT_COLOUR, width=1)
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    for i in np.argsort(scores, kind="stable"):
        if scores[i] < score_thresh:
            continue
        colour = UNSEEN_COLOUR if int(labels[i]) in unseen else SEEN_COLOUR
        x1, y1, x2, y2 = boxes[i].tolist()
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        text = f"{class_names[int(labels[i]) - 1]} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1  # above the box, inside when at the top edge
        tx = max(0.0, min(x1, out.width - tw - 2))  # keep the label inside the picture
        draw.rectangle((tx, ty, tx + tw + 2, ty + th + 2), fill=colour)
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=TEXT_COLOUR, font=font)
    return out
