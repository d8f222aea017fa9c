"""vldus convert-checkpoint --from mmdet-v1, and the published-layout files (classifier_best.pth,
the compat classifier, se-*.npy) loading through our readers."""
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from vldus.cli import main
from vldus.config import Config, save_config
from vldus.data.embeddings import load_class_embeddings
from vldus.data.splits import split_from_names
from vldus.detection.convert import convert_mmdet_v1
from vldus.detection.model import build_detector, load_detector
from vldus.detection.zsd import inject_classifier, load_syn_classifier
from vldus.errors import InputError
from vldus.synthesis.compat import load_compat_classifier

CLASSES = ["circle", "square", "triangle", "star"]
SPLIT = split_from_names("tiny", CLASSES, ["star"])


class PickledMeta:  # a non-plain object in "meta": weights_only=True refuses it
    pass


def tiny_cfg(tmp_path, legacy: bool = False) -> Config:
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"name": "tiny", "classes": CLASSES, "seen": CLASSES[:3], "unseen": ["star"]}))
    cfg = Config(name="tiny", work_dir=str(tmp_path / "work"), split=str(split_file))
    det = cfg.detector
    det.backbone, det.norm, det.fpn_channels = "resnet18", "frozen_bn", 32
    det.min_size = det.max_size = 96
    det.legacy_mmdet = legacy
    return cfg


def to_mmdet_v1(state: dict) -> dict:
    """Our state dict under mmdetection-1.x names (the inverse of the converter, written here
    independently), with the BatchNorm counters mmdet 1.x checkpoints carry."""
    prefixes = [("backbone.body.", "backbone."), ("backbone.fpn.inner_blocks.", "neck.lateral_convs."),
                ("backbone.fpn.layer_blocks.", "neck.fpn_convs."), ("rpn.head.conv.0.0.", "rpn_head.rpn_conv."),
                ("rpn.head.cls_logits.", "rpn_head.rpn_cls."), ("rpn.head.bbox_pred.", "rpn_head.rpn_reg."),
                ("roi_heads.box_head.fc6.", "bbox_head.shared_fcs.0."),
                ("roi_heads.box_head.fc7.", "bbox_head.shared_fcs.1."),
                ("roi_heads.box_predictor.cls_score.", "bbox_head.fc_cls."),
                ("roi_heads.box_predictor.bbox_pred.", "bbox_head.fc_reg.")]
    out = {}
    for key, value in state.items():
        ours, theirs = next(p for p in prefixes if key.startswith(p[0]))
        rest = key[len(ours):]
        if "fpn" in ours:  # inner_blocks.N.0.weight -> lateral_convs.N.conv.weight
            n, _, leaf = rest.split(".", 2)
            rest = f"{n}.conv.{leaf}"
        out[theirs + rest] = value.clone()
        if key.endswith("running_var"):
            out[theirs + rest.replace("running_var", "num_batches_tracked")] = torch.tensor(1000)
    return out


def random_detector(cfg):
    torch.manual_seed(0)
    model = build_detector(cfg, SPLIT, load_backbone=False)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.normal_(0, 0.05)
    return model.eval()


def write_mmdet(tmp_path, model, edit=None, meta_extra=None):
    state = to_mmdet_v1(model.state_dict())
    if edit:
        edit(state)
    meta = {"mmdet_version": "1.0rc0+1234abc", "epoch": 12, "iter": 8000, "CLASSES": tuple(CLASSES),
            "config": "model = dict(type='FasterRCNN')", **(meta_extra or {})}
    path = tmp_path / "epoch_12.pth"
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.02}]}},
               path)
    return str(path)


def convert(tmp_path, cfg, src, *extra):
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, str(cfg_file))
    out = tmp_path / "converted.pth"
    code = main(["convert-checkpoint", "--from", "mmdet-v1", src, "--config", str(cfg_file),
                 "--out", str(out), *extra])
    return code, str(out)


@pytest.mark.parametrize("legacy", [False, True])
def test_converted_detector_reproduces_the_original(tmp_path, capsys, legacy):
    cfg = tiny_cfg(tmp_path, legacy)
    model = random_detector(cfg)
    code, out = convert(tmp_path, cfg, write_mmdet(tmp_path, model))
    assert code == 0, capsys.readouterr().err
    assert "0 unmapped, 0 missing" in capsys.readouterr().out
    obj = torch.load(out, weights_only=True)
    assert obj["epoch"] == 12 and obj["classes"] == CLASSES
    loaded = load_detector(cfg, SPLIT, out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.manual_seed(1)
    images = [torch.rand(3, 80, 64), torch.rand(3, 70, 90)]
    with torch.no_grad():
        want, got = model(images), loaded(images)
    assert sum(len(d["boxes"]) for d in want) > 0
    for w, g in zip(want, got):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(w[key], g[key])


def test_unmapped_keys_are_listed_not_loaded(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    model = random_detector(cfg)
    extra = {"bbox_head.fc_extra.weight": torch.zeros(3), "mask_head.conv.weight": torch.zeros(2, 2)}
    code, _ = convert(tmp_path, cfg, write_mmdet(tmp_path, model, edit=lambda s: s.update(extra)))
    out = capsys.readouterr().out
    assert code == 0
    assert "unmapped (dropped): bbox_head.fc_extra.weight (3,)" in out and "mask_head.conv.weight" in out
    assert "2 unmapped, 0 missing" in out


def test_class_names_in_meta_are_compared(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    src = write_mmdet(tmp_path, random_detector(cfg), meta_extra={"CLASSES": ("circle", "square", "star", "triangle")})
    code, _ = convert(tmp_path, cfg, src)
    assert code == 0
    assert "differ from split 'tiny' at index 3: 'star' vs 'triangle'" in capsys.readouterr().err


def _drop_rpn_reg_bias(state):
    del state["rpn_head.rpn_reg.bias"]


def _reshape_fc7(state):
    state["bbox_head.shared_fcs.1.weight"] = torch.zeros(512, 1024)


def _fewer_classes(state):
    state["bbox_head.fc_cls.weight"] = state["bbox_head.fc_cls.weight"][:4]


@pytest.mark.parametrize("edit,pattern", [
    (_drop_rpn_reg_bias, r"1 key\(s\) .* no counterpart, e.g. 'rpn.head.bbox_pred.bias'.*--allow-missing"),
    (_reshape_fc7, re.escape("bbox_head.shared_fcs.1.weight: shape (512, 1024) does not fit "
                             "roi_heads.box_head.fc7.weight (1024, 1024)")),
    (_fewer_classes, r"fc_cls has 4 rows, split 'tiny' needs 4 classes \+ background = 5"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys, edit, pattern):
    cfg = tiny_cfg(tmp_path)
    src = write_mmdet(tmp_path, random_detector(cfg), edit=edit)
    code, out = convert(tmp_path, cfg, src)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"vldus convert-checkpoint: error: {src}: ")
    assert re.search(pattern, err), err
    assert not (tmp_path / "converted.pth").exists()


def test_allow_missing_keeps_initial_values(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    code, out = convert(tmp_path, cfg, write_mmdet(tmp_path, random_detector(cfg), edit=_drop_rpn_reg_bias),
                        "--allow-missing")
    assert code == 0 and "missing (initial value kept): rpn.head.bbox_pred.bias" in capsys.readouterr().out
    load_detector(cfg, SPLIT, out)  # loads


def test_pickled_objects_need_explicit_unsafe_load(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    src = write_mmdet(tmp_path, random_detector(cfg), meta_extra={"obj": PickledMeta()})
    code, _ = convert(tmp_path, cfg, src)
    err = capsys.readouterr().err
    assert code == 2 and "weights_only=True" in err and "--unsafe-load" in err
    code, out = convert(tmp_path, cfg, src, "--unsafe-load")
    assert code == 0 and "weights_only=False" in capsys.readouterr().err
    load_detector(cfg, SPLIT, out)


def test_batchnorm_counters_filled_for_trainable_bn(tmp_path):
    cfg = tiny_cfg(tmp_path)
    frozen = random_detector(cfg)
    cfg.detector.norm = "bn"
    target = build_detector(cfg, SPLIT, load_backbone=False).state_dict()
    state = {k: v for k, v in to_mmdet_v1(frozen.state_dict()).items() if not k.endswith("num_batches_tracked")}
    out, unmapped, missing = convert_mmdet_v1(state, target, "x.pth")
    assert not unmapped and not missing and set(out) == set(target)
    assert int(out["backbone.body.bn1.num_batches_tracked"]) == 0


# --------------------------------------------------------------------------------------------
# Published-layout files
# --------------------------------------------------------------------------------------------
def test_published_classifier_best_injects_into_converted_detector(tmp_path):
    cfg = tiny_cfg(tmp_path, legacy=True)
    model = random_detector(cfg)
    torch.manual_seed(5)
    cls_model = nn.Module()
    cls_model.fc = nn.Linear(1024, 1 + len(SPLIT.unseen_ids))  # published ClsModelTrain: Linear 1024 -> 1 + U
    path = str(tmp_path / "classifier_best.pth")
    torch.save(cls_model.state_dict(), path)
    w, b = load_syn_classifier(path, SPLIT, in_features=1024)
    predictor = model.roi_heads.box_predictor
    inject_classifier(predictor, SPLIT, w, b, bg_blend=0.35)
    x = torch.rand(6, 1024)
    with torch.no_grad():
        logits = predictor(x)[0]
        torch.testing.assert_close(logits[:, SPLIT.unseen_ids], cls_model.fc(x)[:, 1:])


def test_published_compat_classifier_loads(tmp_path):
    torch.manual_seed(6)
    fc = nn.Linear(1024, 512)  # published ClsUnseenTrain.fc: Linear 1024 -> 512
    path = str(tmp_path / "unseen_Classifier_6515.pth")
    torch.save({"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()}, path)
    emb = torch.randn(15, 512)
    clf = load_compat_classifier(path, emb, 1024)
    x = torch.rand(3, 1024)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), fc(x) @ emb.T)


def test_published_se_file_loads(tmp_path):
    names = [f"class{i}" for i in range(80)]
    split = split_from_names("coco_like", names, names[-15:])
    rng = np.random.default_rng(0)
    se = rng.standard_normal((81, 512)).astype(np.float32)  # se-coco.npy: 81 x 512, row 0 background
    path = tmp_path / "se-coco.npy"
    np.save(path, se)
    got = load_class_embeddings(path, split)
    assert got.shape == (81, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, se / np.linalg.norm(se.astype(np.float64), 2), rtol=1e-5)
    with pytest.raises(InputError, match="81 rows"):
        load_class_embeddings(path, split_from_names("voc_like", names[:20], names[16:20]))
