"""mmdetection-1.x anchor placement and box coding (vldus.detection.legacy), against numbers
computed by hand from the mmdet 1.x formulas with the SPEC §2.1 settings (scale 8, ratios
0.5/1/2, strides 4..64)."""
import math

import torch
from torchvision.models.detection.image_list import ImageList

from vldus.detection.legacy import LegacyAnchorGenerator, LegacyBoxCoder, mmdet_base_anchors

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
    # level 0, location (y=0, x=1): the three base anchors shifted by 4 in x
    assert torch.equal(anchors[3:6], torch.tensor([[-17., -9., 28., 12.], [-10., -14., 21., 17.],
                                                   [-5., -21., 16., 24.]]))
    # last level, location (y=1, x=0): shifted by the stride 64 (torchvision would use 800 // 13 = 61)
    start = sum(h * w for h, w in shapes[:4]) * 3 + 19 * 3
    assert torch.equal(anchors[start + 1], torch.tensor([-224., -224. + 64, 287., 287. + 64]))


def test_decode_by_hand_with_plus_one_convention():
    coder = LegacyBoxCoder((10.0, 10.0, 5.0, 5.0))  # target stds 0.1, 0.1, 0.2, 0.2
    box = torch.tensor([[10., 20., 29., 59.]])  # w = 20, h = 40 (+1), centre (19.5, 39.5)
    # deltas before stds: dx 0.1, dy -0.05, dw log 2, dh 0
    deltas = torch.tensor([[1.0, -0.5, 5 * math.log(2.0), 0.0]])
    # gx = 19.5 + 20 * 0.1 = 21.5, gy = 39.5 - 40 * 0.05 = 37.5, gw = 40, gh = 40
    # x1 = 21.5 - 20 + 0.5 = 2, y1 = 37.5 - 20 + 0.5 = 18, x2 = 21.5 + 20 - 0.5 = 41, y2 = 57
    expected = torch.tensor([[2., 18., 41., 57.]])
    torch.testing.assert_close(coder.decode_single(deltas, box), expected)
    # zero deltas give the box back (torchvision's coder would too; the +1 cancels)
    torch.testing.assert_close(coder.decode_single(torch.zeros(1, 4), box), box)


def test_dw_clamped_on_both_sides():
    coder = LegacyBoxCoder((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0., 0., 99., 99.]])  # w = h = 100
    out = coder.decode_single(torch.tensor([[0., 0., -20., 20.]]), box)
    w, h = out[0, 2] - out[0, 0] + 1, out[0, 3] - out[0, 1] + 1
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
    # encode by hand for row 0 with the +1 widths
    pw, gw = props[0, 2] - props[0, 0] + 1, gts[0, 2] - gts[0, 0] + 1
    dx = ((gts[0, 0] + gts[0, 2]) / 2 - (props[0, 0] + props[0, 2]) / 2) / pw
    torch.testing.assert_close(deltas[0, 0], 10 * dx)
    torch.testing.assert_close(deltas[0, 2], 5 * torch.log(gw / pw))
    # decode as a 2-class regression output (4 per class): both slots give the gt back
    out = coder.decode(torch.cat([deltas, deltas], 1), [props])
    assert out.shape == (6, 2, 4)
    torch.testing.assert_close(out[:, 1], gts, rtol=1e-5, atol=1e-4)


def test_roi_align_ends_at_x2_plus_one():
    from torchvision.ops import MultiScaleRoIAlign

    from vldus.detection.legacy import LegacyRoIAlign
    # one level at stride 4 whose value is the feature-map x coordinate (bilinear is exact on it)
    ramp = torch.arange(32.0).expand(1, 1, 32, 32).contiguous()
    box = [torch.tensor([[0.0, 0.0, 27.0, 27.0]])]
    legacy = LegacyRoIAlign(["0"], 7, 2)({"0": ramp}, box, [(128, 128)])
    # mmdet 1.x: RoI [0, (27 + 1) / 4 = 7) -> 7 bins of 1 cell, samples at pw + 0.25, pw + 0.75
    torch.testing.assert_close(legacy[0, 0, 0], torch.arange(7.0) + 0.5)
    # torchvision alone: RoI [0, 6.75) -> bins of 6.75 / 7 cells
    plain = MultiScaleRoIAlign(["0"], 7, 2)({"0": ramp}, box, [(128, 128)])
    torch.testing.assert_close(plain[0, 0, 0], (torch.arange(7.0) + 0.5) * 6.75 / 7)


def test_transform_rounds_size_like_mmcv_and_maps_back_by_the_scale():
    from vldus.detection.legacy import LegacyTransform
    t = LegacyTransform(96, 96, [0.5] * 3, [0.25] * 3)
    t.eval()
    # 70 x 90, scale min(96 / 90, 96 / 70) = 16 / 15: 74.67 -> 75 rows (torchvision floors to 74), 96 cols
    images, _ = t([torch.rand(3, 70, 90)])
    assert images.image_sizes == [(74, 95)]  # (h - 1, w - 1), see the next test
    result = t.postprocess([{"boxes": torch.tensor([[0.0, 15.0, 96.0, 75.0]])}], images.image_sizes, [(70, 90)])
    torch.testing.assert_close(result[0]["boxes"], torch.tensor([[0.0, 15.0 * 15 / 16, 90.0, 75.0 * 15 / 16]]))
    t.train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 21.0, 31.0], [0.0, 0.0, 90.0, 70.0]]), "labels": torch.tensor([1, 2])}
    _, targets = t([torch.rand(3, 70, 90)], [target])
    # inclusive (x2 - 1) then x 16/15, clipped to [0, 95] x [0, 74]
    want = torch.tensor([[10.0, 10.0, 20.0, 30.0], [0.0, 0.0, 89.0, 69.0]]) * 16 / 15
    want[1, 2], want[1, 3] = min(want[1, 2], 95.0), min(want[1, 3], 74.0)
    torch.testing.assert_close(targets[0]["boxes"], want)
    assert torch.equal(target["boxes"][0], torch.tensor([10.0, 10.0, 21.0, 31.0]))  # caller's dict untouched


def test_legacy_detector_trains_and_detects():
    from vldus.config import Config
    from vldus.data.splits import split_from_names
    from vldus.detection.legacy import LegacyRoIAlign, LegacyTransform
    from vldus.detection.model import build_detector
    split = split_from_names("tiny", ["a", "b"], ["b"])
    cfg = Config(name="tiny", work_dir="unused")
    det = cfg.detector
    det.backbone, det.norm, det.fpn_channels, det.min_size, det.max_size = "resnet18", "bn", 32, 96, 96
    det.legacy_mmdet = True
    torch.manual_seed(0)
    model = build_detector(cfg, split)
    assert isinstance(model.transform, LegacyTransform) and isinstance(model.roi_heads.box_roi_pool, LegacyRoIAlign)
    assert model.transform.min_size == (96,) and model.roi_heads.box_roi_pool.sampling_ratio == 2
    target = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 70, 90)], [target])
    assert set(losses) >= {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 70, 90)])
    assert out["boxes"].shape[1] == 4 and (out["boxes"][:, 2] <= 90).all()


def test_transform_reports_last_pixel_index_so_boxes_clip_to_w_minus_1():
    from torchvision.ops import boxes as box_ops

    from vldus.detection.legacy import LegacyTransform
    t = LegacyTransform(96, 96, [0.5] * 3, [0.25] * 3).eval()
    images, _ = t([torch.rand(3, 70, 90)])
    assert images.image_sizes == [(74, 95)] and images.tensors.shape[-2:] == (96, 96)
    clipped = box_ops.clip_boxes_to_image(torch.tensor([[-5.0, -5.0, 200.0, 200.0]]), images.image_sizes[0])
    assert clipped.tolist() == [[0.0, 0.0, 95.0, 74.0]]
