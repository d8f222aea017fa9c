"""mmdetection-1.x anchor placement and box coding (vldus.detection.legacy), against numbers
computed by hand from the mmdet 1.x formulas with the docs/design.md §2.1 settings (scale 8, ratios
0.5/1/2, strides 4..64). mmdet boxes are inclusive; the legacy model holds them as
(x1, y1, x2 + 1, y2 + 1)."""
import math

import torch
from torchvision.models.detection.image_list import ImageList

from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import MultiScaleRoIAlign, box_iou

from vldus.detection.legacy import (LegacyAnchorGenerator, LegacyBoxCoder, LegacyTransform, mmdet_base_anchors,
                                    mmdet_delta2bbox, to_exclusive)

SIZES = ((32,), (64,), (128,), (256,), (512,))  # scale 8 x strides 4..64
RATIOS = ((0.5, 1.0, 2.0),) * 5


def test_base_anchors_stride4_by_hand():
    # ctr = 0.5 * (4 - 1) = 1.5. ratio 0.5 (h/w): w = 32 * sqrt(2) = 45.2548, h = 32 / sqrt(2) = 22.6274
    # x1 = 1.5 - 0.5 * 44.2548 = -20.627 -> -21; y1 = 1.5 - 0.5 * 21.6274 = -9.314 -> -9
    # x2 = 1.5 + 22.127 = 23.627 -> 24; y2 = 1.5 + 10.814 = 12.314 -> 12
    # ratio 1: 1.5 -/+ 15.5 -> -14, 17.  ratio 2: the transpose of ratio 0.5.
    expected = torch.tensor([[-21., -9., 24., 12.], [-14., -14., 17., 17.], [-9., -21., 12., 24.]])
    assert torch.equal(mmdet_base_anchors(4, 32, (0.5, 1.0, 2.0)), expected)
    # stride 64, size 512, ratio 1: ctr 31.5 -/+ 255.5 -> -224, 287
    assert torch.equal(mmdet_base_anchors(64, 512, (1.0,)), torch.tensor([[-224., -224., 287., 287.]]))


def test_grid_uses_fixed_strides_and_location_major_order():
    gen = LegacyAnchorGenerator(SIZES, RATIOS)
    # an 800 x 1216 padded image: level sizes 200x304 ... 13x19 (13 * 64 != 800)
    shapes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    images = ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)])
    (anchors,) = gen(images, feats)
    assert anchors.shape == (sum(h * w for h, w in shapes) * 3, 4)
    # level 0, location (y=0, x=1): the three base anchors shifted by 4 in x (held exclusive: x2 + 1)
    assert torch.equal(anchors[3:6], torch.tensor([[-17., -9., 29., 13.], [-10., -14., 22., 18.],
                                                   [-5., -21., 17., 25.]]))
    # last level, location (y=1, x=0): shifted by the stride 64 (torchvision would use 800 // 13 = 61)
    start = sum(h * w for h, w in shapes[:4]) * 3 + 19 * 3
    assert torch.equal(anchors[start + 1], torch.tensor([-224., -224. + 64, 288., 288. + 64]))


def test_decode_by_hand_with_plus_one_convention():
    coder = LegacyBoxCoder((10.0, 10.0, 5.0, 5.0))  # target stds 0.1, 0.1, 0.2, 0.2
    box = torch.tensor([[10., 20., 29., 59.]])  # w = 20, h = 40 (+1), centre (19.5, 39.5)
    # deltas before stds: dx 0.1, dy -0.05, dw log 2, dh 0
    deltas = torch.tensor([[1.0, -0.5, 5 * math.log(2.0), 0.0]])
    # gx = 19.5 + 20 * 0.1 = 21.5, gy = 39.5 - 40 * 0.05 = 37.5, gw = 40, gh = 40
    # x1 = 21.5 - 20 + 0.5 = 2, y1 = 37.5 - 20 + 0.5 = 18, x2 = 21.5 + 20 - 0.5 = 41, y2 = 57
    expected = torch.tensor([[2., 18., 41., 57.]])
    torch.testing.assert_close(mmdet_delta2bbox(deltas, box, coder.weights, coder.bbox_xform_clip), expected)
    torch.testing.assert_close(coder.decode_single(deltas, to_exclusive(box)), to_exclusive(expected))
    # on exclusive boxes, within the clamp, this is torchvision's own formula
    plain = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, to_exclusive(box))
    torch.testing.assert_close(plain, to_exclusive(expected))


def test_dw_clamped_on_both_sides():
    coder = LegacyBoxCoder((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0., 0., 100., 100.]])  # exclusive: w = h = 100
    out = coder.decode_single(torch.tensor([[0., 0., -20., 20.]]), box)
    w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
    torch.testing.assert_close(w, torch.tensor(100 * 16 / 1000))
    torch.testing.assert_close(h, torch.tensor(100 * 1000 / 16))


def test_encode_decode_round_trip_multiclass():
    torch.manual_seed(0)
    coder = LegacyBoxCoder((10.0, 10.0, 5.0, 5.0))
    xy = torch.rand(6, 2) * 100
    props = torch.cat([xy, xy + 5 + torch.rand(6, 2) * 80], 1)
    xy = torch.rand(6, 2) * 100
    gts = torch.cat([xy, xy + 5 + torch.rand(6, 2) * 80], 1)
    deltas = coder.encode_single(gts, props)
    # encode by hand for row 0 (exclusive widths = mmdet's +1 widths; the centre shift cancels)
    pw, gw = props[0, 2] - props[0, 0], gts[0, 2] - gts[0, 0]
    dx = ((gts[0, 0] + gts[0, 2]) / 2 - (props[0, 0] + props[0, 2]) / 2) / pw
    torch.testing.assert_close(deltas[0, 0], 10 * dx)
    torch.testing.assert_close(deltas[0, 2], 5 * torch.log(gw / pw))
    # decode as a 2-class regression output (4 per class): both slots give the gt back
    out = coder.decode(torch.cat([deltas, deltas], 1), [props])
    assert out.shape == (6, 2, 4)
    torch.testing.assert_close(out[:, 1], gts, rtol=1e-5, atol=1e-4)


def test_iou_and_roi_align_of_exclusive_boxes_are_mmdet_ones():
    # mmdet 1.x IoU of [0, 0, 9, 9] and [5, 0, 14, 9] (inclusive): 50 / (100 + 100 - 50)
    a, b = torch.tensor([[0., 0., 9., 9.]]), torch.tensor([[5., 0., 14., 9.]])
    torch.testing.assert_close(box_iou(to_exclusive(a), to_exclusive(b)), torch.tensor([[1 / 3]]))
    # one level at stride 4 whose value is the feature-map x coordinate (bilinear is exact on it);
    # mmdet 1.x RoIAlign of inclusive [0, 0, 27, 27]: [0, (27 + 1) / 4 = 7) -> 7 bins of 1 cell,
    # samples at pw + 0.25 and pw + 0.75
    ramp = torch.arange(32.0).expand(1, 1, 32, 32).contiguous()
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    out = pool({"0": ramp}, [to_exclusive(torch.tensor([[0.0, 0.0, 27.0, 27.0]]))], [(128, 128)])
    torch.testing.assert_close(out[0, 0, 0], torch.arange(7.0) + 0.5)


def test_transform_rounds_size_like_mmcv_and_maps_back_by_the_scale():
    t = LegacyTransform(96, 96, [0.5] * 3, [0.25] * 3)
    t.eval()
    # 70 x 90, scale min(96 / 90, 96 / 70) = 16 / 15: 74.67 -> 75 rows (torchvision floors to 74), 96 cols
    images, _ = t([torch.rand(3, 70, 90)])
    assert images.image_sizes == [(75, 96)]
    # detections: mmdet's inclusive box divided by the scale, + 1 on x2, y2 (our record convention)
    result = t.postprocess([{"boxes": torch.tensor([[0.0, 15.0, 96.0, 75.0]])}], images.image_sizes, [(70, 90)])
    mmdet = torch.tensor([[0.0, 15.0, 95.0, 74.0]]) * 15 / 16
    torch.testing.assert_close(result[0]["boxes"], mmdet + torch.tensor([0.0, 0.0, 1.0, 1.0]))
    t.train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 21.0, 31.0], [0.0, 0.0, 90.0, 70.0]]), "labels": torch.tensor([1, 2])}
    _, targets = t([torch.rand(3, 70, 90)], [target])
    # inclusive (x2 - 1), x 16/15, clipped to [0, 95] x [0, 74], held exclusive (+1)
    want = torch.tensor([[10.0, 10.0, 20.0, 30.0], [0.0, 0.0, 89.0, 69.0]]) * 16 / 15
    want = want.clamp(max=95.0)
    want[:, 1::2] = want[:, 1::2].clamp(max=74.0)
    assert want[1, 2] < 95 and want[1, 3] < 74  # (the clamp does not bite here)
    torch.testing.assert_close(targets[0]["boxes"], to_exclusive(want))
    assert torch.equal(target["boxes"][0], torch.tensor([10.0, 10.0, 21.0, 31.0]))  # caller's dict untouched


def test_legacy_detector_trains_and_detects():
    from vldus.config import Config
    from vldus.data.splits import split_from_names
    from vldus.detection.model import build_detector
    split = split_from_names("tiny", ["a", "b"], ["b"])
    cfg = Config(name="tiny", work_dir="unused")
    det = cfg.detector
    det.backbone, det.norm, det.fpn_channels, det.min_size, det.max_size = "resnet18", "bn", 32, 96, 96
    det.legacy_mmdet = True
    torch.manual_seed(0)
    model = build_detector(cfg, split)
    assert isinstance(model.transform, LegacyTransform)
    assert model.transform.min_size == (96,) and model.roi_heads.box_roi_pool.sampling_ratio == 2
    target = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 70, 90)], [target])
    assert set(losses) >= {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 70, 90)])
    # clipped to [0, W - 1] = [0, 95] in the resized image, / scale, + 1
    assert out["boxes"].shape[1] == 4 and (out["boxes"][:, 2] <= 95 * 15 / 16 + 1 + 1e-4).all()
