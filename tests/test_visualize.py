"""Detection pictures (vldus.detection.visualize): what is drawn, where labels go, the legend."""
import numpy as np
from PIL import Image

from vldus.detection.visualize import (GT_COLOUR, SEEN_COLOUR, UNSEEN_COLOUR, draw_detections,
                                       drawn_detections, place_label)


def test_near_duplicates_of_one_class_drawn_once():
    boxes = np.array([[10, 10, 50, 50], [12, 12, 52, 52], [11, 11, 51, 51], [60, 60, 90, 90]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.2])
    labels = np.array([1, 1, 2, 1])
    keep = drawn_detections(boxes, scores, labels, score_thresh=0.3)
    assert keep.tolist() == [0, 2]  # the class-1 duplicate goes, class 2 on the same object stays
    assert drawn_detections(boxes, scores, labels, score_thresh=0.3, nms_iou=0.99).tolist() == [0, 1, 2]


def test_labels_never_overlap():
    taken = []
    box = (40.0, 40.0, 80.0, 80.0)
    first = place_label(box, (30.0, 10.0), taken, (200, 200))
    assert first == (40.0, 30.0, 70.0, 40.0)  # above the box, left-aligned
    taken.append(first)
    for _ in range(3):  # the same box again: inside its top, below it, inside its bottom
        spot = place_label(box, (30.0, 10.0), taken, (200, 200))
        assert spot is not None
        assert all(min(spot[2], t[2]) <= max(spot[0], t[0]) or min(spot[3], t[3]) <= max(spot[1], t[1])
                   for t in taken)
        taken.append(spot)
    assert place_label(box, (30.0, 10.0), taken, (200, 200)) is None  # no free place left


def test_picture_enlarged_with_dashed_ground_truth_and_legend():
    im = Image.new("RGB", (100, 100), (0, 0, 0))
    boxes = np.array([[10, 40, 50, 90], [60, 40, 95, 90]], np.float32)
    out = draw_detections(im, boxes, np.array([0.9, 0.8]), np.array([1, 2]), ["seen cls", "unseen cls"],
                          unseen_ids=[2], score_thresh=0.3, gt_boxes=np.array([[20, 5, 80, 30]]), min_side=400)
    assert out.width == 400 and out.height > 400  # enlarged 4x, legend strip below
    px = out.load()
    assert px[40, 240] == SEEN_COLOUR and px[380, 240] == UNSEEN_COLOUR  # boxes scaled with the image
    edge = [px[x, 20] == GT_COLOUR for x in range(80, 320)]  # the ground truth's top edge
    assert any(edge) and not all(edge)  # dashed
    legend = [px[x, y] for x in range(out.width) for y in range(400, out.height)]
    assert UNSEEN_COLOUR in legend and SEEN_COLOUR in legend
