"""Pictures of detections: one PNG per test image (``vldus test --show-dir``, ``vldus detect``).

What a reader should see at a glance:

- only detections scoring at least ``score_thresh`` are drawn, and of boxes of one class that
  overlap by IoU >= ``draw_nms_iou`` only the best (a per-class NMS at drawing time, stricter
  than the detector's own), so near-duplicates do not pile up; the legend states both;
- unseen classes in orange, seen classes in blue, each box labelled with its class and score;
  labels are placed where they cover no other label (above the box, inside it, below it, ...);
  a label with no free place is left out (its box stays; the legend counts them);
- ground truth, when given, as dashed white lines, so a box without a dashed partner is a false
  positive and a dashed box without a coloured one is a miss.

Small images (the shapes benchmark's 160 px) are enlarged to ``min_side`` pixels first so that
labels stay readable; boxes are scaled with them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import batched_nms

SEEN_COLOUR = (40, 120, 255)
UNSEEN_COLOUR = (255, 90, 20)
GT_COLOUR = (255, 255, 255)
TEXT_COLOUR = (255, 255, 255)
LEGEND_BG = (30, 30, 30)
DRAW_NMS_IOU = 0.3  # per-class NMS at drawing time (the detector's own is nms_thresh 0.5)
MIN_SIDE = 480


def drawn_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, score_thresh: float,
                     nms_iou: float = DRAW_NMS_IOU) -> np.ndarray:
    """Indices of the detections to draw, best first: score >= ``score_thresh``, then per-class
    NMS at ``nms_iou``. boxes (K, 4) xyxy, scores (K,), labels (K,)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    above = np.flatnonzero(scores >= score_thresh)
    if len(above) == 0:
        return above
    keep = batched_nms(torch.from_numpy(boxes[above]), torch.from_numpy(scores[above]),
                       torch.from_numpy(labels[above]), nms_iou).numpy()
    return above[keep]


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], colour, width: int, dash: int) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)),
                               ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            draw.line((ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
                      fill=colour, width=width)


def _overlap(a: tuple, b: tuple) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def place_label(box: Sequence[float], size: tuple[float, float], taken: list[tuple],
                canvas: tuple[int, int]) -> Optional[tuple[float, float, float, float]]:
    """Where a label of ``size`` (w, h) goes for ``box``: the first candidate (above the box,
    inside its top, below it, inside its bottom, each left- then right-aligned, moved into the
    canvas) that covers no label in ``taken``; None when every candidate would."""
    x1, y1, x2, y2 = box
    w, h = size
    W, H = canvas
    candidates = []
    for y in (y1 - h, y1, y2, y2 - h):
        for x in (x1, x2 - w):
            x = min(max(0.0, x), W - w)
            y = min(max(0.0, y), H - h)
            candidates.append((x, y, x + w, y + h))
    return next((c for c in candidates if not any(_overlap(c, t) > 0 for t in taken)), None)


def draw_detections(image: Image.Image, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str], unseen_ids: Sequence[int], score_thresh: float = 0.3,
                    gt_boxes: Optional[np.ndarray] = None, draw_nms_iou: float = DRAW_NMS_IOU,
                    min_side: int = MIN_SIDE, legend: bool = True) -> Image.Image:
    """Return a new RGB picture of ``image`` with detections drawn (see the module doc).

    boxes (K, 4) xyxy pixels of ``image``, scores (K,), labels (K,) detector index 1..C (name =
    ``class_names[label - 1]``); gt_boxes (N, 4) xyxy, optional. The picture is ``image``
    enlarged to ``min_side`` on its short side (never shrunk), with a legend strip below.
    """
    scale = max(1.0, min_side / max(1, min(image.size)))
    size = (round(image.width * scale), round(image.height * scale))
    pic = image.convert("RGB").resize(size, Image.BILINEAR) if scale > 1 else image.convert("RGB").copy()
    draw = ImageDraw.Draw(pic)
    font = ImageFont.load_default()
    line = max(2, round(min(pic.size) / 200))
    unseen = set(int(i) for i in unseen_ids)

    if gt_boxes is not None:
        for box in np.asarray(gt_boxes, dtype=float).reshape(-1, 4) * scale:
            _dashed_rectangle(draw, box.tolist(), GT_COLOUR, max(1, line - 1), dash=4 * line)

    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4) * scale
    scores = np.asarray(scores, dtype=float).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    keep = drawn_detections(boxes, scores, labels, score_thresh, draw_nms_iou)
    colours = {int(i): UNSEEN_COLOUR if int(labels[i]) in unseen else SEEN_COLOUR for i in keep}
    for i in keep[::-1]:  # lowest first, so the best box ends on top
        draw.rectangle(boxes[i].tolist(), outline=colours[int(i)], width=line)
    taken: list[tuple] = []
    for i in keep:  # best first: the best detections get the best label places
        text = f"{class_names[int(labels[i]) - 1]} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        spot = place_label(boxes[i].tolist(), (right - left + 4, bottom - top + 4), taken, pic.size)
        if spot is None:
            continue
        taken.append(spot)
        draw.rectangle(spot, fill=colours[int(i)])
        draw.text((spot[0] + 2 - left, spot[1] + 2 - top), text, fill=TEXT_COLOUR, font=font)
    if not legend:
        return pic
    return _with_legend(pic, font, score_thresh, draw_nms_iou, gt_boxes is not None, len(keep) - len(taken))


def _with_legend(pic: Image.Image, font, score_thresh: float, nms_iou: float, has_gt: bool,
                 unlabelled: int) -> Image.Image:
    """``pic`` with a strip below: colour keys, ground-truth style and what is drawn."""
    items = [(UNSEEN_COLOUR, "unseen class"), (SEEN_COLOUR, "seen class")]
    note = f"score >= {score_thresh:.2f}; one box per class where boxes overlap (IoU >= {nms_iou:.1f})"
    if unlabelled:
        note += f"; {unlabelled} label{'s' if unlabelled > 1 else ''} left out (no free place)"
    probe = ImageDraw.Draw(pic)
    th = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    lines = [""]  # the note, wrapped at "; " to the picture's width
    for part in note.split("; "):
        joined = f"{lines[-1]}; {part}" if lines[-1] else part
        if lines[-1] and probe.textlength(joined, font=font) > pic.width - 12:
            lines.append(part)
        else:
            lines[-1] = joined
    rows = 1 + has_gt + len(lines)
    out = Image.new("RGB", (pic.width, pic.height + rows * (th + 4) + 4), LEGEND_BG)
    out.paste(pic, (0, 0))
    draw = ImageDraw.Draw(out)
    x, y = 6, pic.height + 4
    for colour, text in items:
        draw.rectangle((x, y + 2, x + 12, y + th - 2), fill=colour)
        draw.text((x + 16, y + 2), text, fill=TEXT_COLOUR, font=font)
        x += 16 + draw.textlength(text, font=font) + 14
    if has_gt:
        y += th + 4
        _dashed_rectangle(draw, (6, y + 2, 18, y + th - 2), GT_COLOUR, 1, dash=3)
        draw.text((22, y + 2), "ground truth", fill=TEXT_COLOUR, font=font)
    for text in lines:
        y += th + 4
        draw.text((6, y + 2), text, fill=TEXT_COLOUR, font=font)
    return out


def tile(pictures: Sequence[Image.Image], columns: int = 4, gap: int = 6) -> Image.Image:
    """Pictures side by side in rows of ``columns`` (for the docs' overview picture)."""
    w = max(p.width for p in pictures)
    h = max(p.height for p in pictures)
    rows = (len(pictures) + columns - 1) // columns
    out = Image.new("RGB", (columns * w + (columns - 1) * gap, rows * h + (rows - 1) * gap), (255, 255, 255))
    for k, p in enumerate(pictures):
        out.paste(p, ((k % columns) * (w + gap), (k // columns) * (h + gap)))
    return out
