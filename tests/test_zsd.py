"""Injection of the synthesized classifier and ZSD / GZSD scoring (docs/design.md §8)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from vldus.data.splits import split_from_names
from vldus.detection.zsd import (ZSDPredictor, borrow_box_regression, gzsd_probs, inject_classifier,
                                 install_zsd_head, load_syn_classifier, rescale_scores, seen_deltas)
from vldus.errors import InputError

# detector order: 1 a, 2 b, 3 c, 4 d, 5 e, 6 f; unseen b, e; excluded f (like 48/17)
SPLIT = split_from_names("toy", ["a", "b", "c", "d", "e", "f"], unseen=["e", "b"], excluded=["f"])
C1 = SPLIT.num_classes + 1


def make_predictor(feat: int = 16, seed: int = 0, scale: float = 1.0) -> FastRCNNPredictor:
    torch.manual_seed(seed)
    p = FastRCNNPredictor(feat, C1)
    with torch.no_grad():
        p.cls_score.weight.mul_(scale)
    return p


def syn_classifier(feat: int = 16, seed: int = 1, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    rows = 1 + len(SPLIT.unseen_ids)
    return torch.randn(rows, feat, generator=g) * scale, torch.randn(rows, generator=g)


def roi_heads(head: nn.Module, score_thresh: float = 0.05) -> RoIHeads:
    return RoIHeads(None, None, head, 0.5, 0.5, 512, 0.25, None, score_thresh, 0.5, 100)


def test_split_ids():
    assert SPLIT.unseen_ids == [2, 5] and SPLIT.seen_ids == [1, 3, 4] and SPLIT.excluded_ids == [6]


# --- §8.1 injection -------------------------------------------------------------------------
def test_inject_rows_and_background_blend():
    p = make_predictor()
    before_w, before_b = p.cls_score.weight.clone(), p.cls_score.bias.clone()
    w, b = syn_classifier()
    det_w, det_b = inject_classifier(p, SPLIT, w, b, bg_blend=0.35)
    after_w, after_b = p.cls_score.weight, p.cls_score.bias
    for i in SPLIT.seen_ids + SPLIT.excluded_ids:  # untouched, bit-identical
        assert torch.equal(after_w[i], before_w[i]) and torch.equal(after_b[i], before_b[i])
    for k, i in enumerate(SPLIT.unseen_ids, start=1):  # ascending detector index = row order
        assert torch.equal(after_w[i], w[k]) and torch.equal(after_b[i], b[k])
    torch.testing.assert_close(after_w[0], 0.35 * before_w[0] + 0.65 * w[0])
    torch.testing.assert_close(after_b[0], 0.35 * before_b[0] + 0.65 * b[0])
    assert torch.equal(det_w, before_w[0]) and torch.equal(det_b, before_b[0])
    assert p.detector_background[0] is det_w
    torch.testing.assert_close(p.bbox_pred.weight, make_predictor().bbox_pred.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already"):
        inject_classifier(p, SPLIT, w, b, bg_blend=0.35)


@pytest.mark.parametrize("layout", ["published", "plain", "wrapped"])
def test_published_classifier_file_reproduces_logits(tmp_path, layout):
    class ClsModel(nn.Module):  # the published layout: Linear(1024 -> 1 + U) named 'fc'
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1024, 1 + len(SPLIT.unseen_ids))

    torch.manual_seed(3)
    model = ClsModel()
    state = model.state_dict()
    if layout == "plain":
        state = {"weight": state["fc.weight"], "bias": state["fc.bias"]}
    elif layout == "wrapped":
        state = {"state_dict": state, "epoch": 7}
    path = str(tmp_path / "classifier_best.pth")
    torch.save(state, path)

    p = make_predictor(feat=1024)
    w, b = load_syn_classifier(path, SPLIT, in_features=1024)
    inject_classifier(p, SPLIT, w, b, bg_blend=0.35)
    x = torch.randn(5, 1024)
    with torch.no_grad():
        torch.testing.assert_close(p(x)[0][:, SPLIT.unseen_ids], model.fc(x)[:, 1:])


def _save(tmp_path, obj, name="cls.pth"):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case,pattern", [
    ("rows", r"\(4, 16\).*expected \(3, 16\)"),
    ("features", r"\(3, 8\).*expected \(3, 16\)"),
    ("bias", r"\(5,\).*expected"),
    ("keys", "no 'fc.weight'"),
    ("notorch", "cannot read"),
    ("missing", "not found"),
])
def test_bad_classifier_file_is_input_error(tmp_path, case, pattern):
    if case == "rows":
        path = _save(tmp_path, {"fc.weight": torch.zeros(4, 16), "fc.bias": torch.zeros(4)})
    elif case == "features":
        path = _save(tmp_path, {"fc.weight": torch.zeros(3, 8), "fc.bias": torch.zeros(3)})
    elif case == "bias":
        path = _save(tmp_path, {"fc.weight": torch.zeros(3, 16), "fc.bias": torch.zeros(5)})
    elif case == "keys":
        path = _save(tmp_path, {"linear.weight": torch.zeros(3, 16)})
    elif case == "notorch":
        path = str(tmp_path / "cls.pth")
        with open(path, "w") as f:
            f.write("not a checkpoint")
    else:
        path = str(tmp_path / "absent.pth")
    with pytest.raises(InputError, match=pattern) as e:
        load_syn_classifier(path, SPLIT, in_features=16)
    assert path in str(e.value) and "\n" not in str(e.value)


# --- regression borrow ----------------------------------------------------------------------
def test_borrow_copies_best_seen_deltas_into_best_unseen_slot():
    # the released rule; seen columns 1, 3, 4; unseen 2, 5; excluded 6 (ignored by the borrow)
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.0, 9.0, 0.0],
                           [0.0, 7.0, 0.0, 1.0, 3.0, 2.0, 9.0]])
    deltas = torch.arange(2 * 4 * C1, dtype=torch.float32).reshape(2, 4 * C1)
    out = borrow_box_regression(logits, deltas, SPLIT.seen_ids, SPLIT.unseen_ids, "best_seen")
    d, o = deltas.view(2, C1, 4), out.view(2, C1, 4)
    # row 0: a_s = 3, a_u = 5 (9.0 > 5.0); row 1: a_s = 1, a_u = 5
    assert torch.equal(o[0, 5], d[0, 3]) and torch.equal(o[1, 5], d[1, 1])
    changed = (o != d).any(dim=2)
    assert changed.nonzero().tolist() == [[0, 5], [1, 5]]
    assert torch.equal(deltas.view(2, C1, 4), d)  # input untouched


def test_borrow_seen_mixture_fills_every_unseen_slot_with_the_seen_softmax_mix():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.0, 9.0, 0.0],
                           [3.0, 0.0, 0.0, 0.0, 0.0, 2.0, 9.0]])  # row 1: seen logits tied
    deltas = torch.randn(2, 4 * C1)
    out = borrow_box_regression(logits, deltas, SPLIT.seen_ids, SPLIT.unseen_ids).view(2, C1, 4)
    d = deltas.view(2, C1, 4)
    seen = list(SPLIT.seen_ids)
    for r in range(2):
        w = torch.softmax(logits[r, seen], dim=0)  # background, unseen and excluded logits play no part
        mix = (w[:, None] * d[r, seen]).sum(dim=0)
        for u in SPLIT.unseen_ids:
            torch.testing.assert_close(out[r, u], mix)
    torch.testing.assert_close(out[1, SPLIT.unseen_ids[0]], d[1, seen].mean(dim=0))
    others = [k for k in range(C1) if k not in SPLIT.unseen_ids]
    assert torch.equal(out[:, others], d[:, others])  # seen, background, excluded slots untouched
    # one seen class far ahead: the mixture is its deltas, as the released rule's
    sharp = logits.clone()
    sharp[0, 3] = 80.0
    torch.testing.assert_close(seen_deltas(sharp, deltas, SPLIT.seen_ids)[0], d[0, 3])
    torch.testing.assert_close(seen_deltas(sharp, deltas, SPLIT.seen_ids, "best_seen")[0], d[0, 3])


def test_box_regression_rule_is_checked():
    with pytest.raises(ValueError, match="box_regression"):
        ZSDPredictor(make_predictor(), SPLIT, "zsd", box_regression="agnostic")
    with pytest.raises(ValueError, match="best_seen"):
        seen_deltas(torch.zeros(1, C1), torch.zeros(1, 4 * C1), SPLIT.seen_ids, "best")


# --- §8.2 ZSD -------------------------------------------------------------------------------
@pytest.mark.parametrize("excluded", ["softmax", "mask"])
def test_zsd_never_outputs_a_seen_class(excluded):
    torch.manual_seed(0)
    p = make_predictor(scale=30.0)
    w, b = syn_classifier(scale=3.0)
    inject_classifier(p, SPLIT, w, b, bg_blend=0.35)
    head = ZSDPredictor(p, SPLIT, "zsd", excluded=excluded)
    heads = roi_heads(head)
    feats = torch.randn(400, 16)
    proposals = [torch.rand(200, 2) * 50 + torch.tensor([0.0, 0.0]), torch.rand(200, 2) * 50]
    proposals = [torch.cat([q, q + 5 + torch.rand(200, 2) * 40], dim=1) for q in proposals]
    with torch.no_grad():
        logp, deltas = head(feats)
        boxes, scores, labels = heads.postprocess_detections(logp, deltas, proposals, [(100, 100)] * 2)
    probs = logp.exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(400))
    assert (probs[:, SPLIT.seen_ids] == 0).all()
    allowed = set(SPLIT.unseen_ids) | (set(SPLIT.excluded_ids) if excluded == "softmax" else set())
    got = set(torch.cat(labels).tolist())
    assert got and got <= allowed and set(SPLIT.unseen_ids) <= got
    assert all(len(s) <= 100 for s in scores)
    # the softmax over the kept columns is exactly what torchvision sees
    with torch.no_grad():
        logits = p(feats)[0]
    keep = [0] + sorted(allowed)
    torch.testing.assert_close(probs[:, keep], torch.softmax(logits[:, keep], dim=1))


# --- §8.3 GZSD ------------------------------------------------------------------------------
def test_gzsd_hand_computation_on_a_toy():
    feat = 2
    p = FastRCNNPredictor(feat, C1)
    with torch.no_grad():
        p.cls_score.weight.zero_()
        p.cls_score.bias.copy_(torch.tensor([1.0, 2.0, 0.0, 0.5, -1.0, 0.3, 4.0]))  # detector logits
        p.cls_score.weight[:, 0] = 1.0  # logit_j = x0 + bias_j
    w = torch.zeros(3, feat)
    w[:, 0] = 1.0
    b = torch.tensor([0.2, 1.5, -0.5])  # synthesized: background, b (id 2), e (id 5)
    inject_classifier(p, SPLIT, w, b, bg_blend=0.35)
    head = ZSDPredictor(p, SPLIT, "gzsd")
    x = torch.tensor([[0.0, 3.0]])  # x0 = 0: logits = biases
    with torch.no_grad():
        probs = torch.softmax(head(x)[0], dim=1)[0].double()

    e = math.exp
    det_bg, seen = 1.0, {1: 2.0, 3: 0.5, 4: -1.0}
    zs = e(det_bg) + sum(e(v) for v in seen.values())
    blended_bg = 0.35 * 1.0 + 0.65 * 0.2
    unseen = {2: 1.5, 5: -0.5}
    zu = e(blended_bg) + sum(e(v) for v in unseen.values())
    expect = [0.0] * C1
    expect[0] = 0.5 * (e(det_bg) / zs + e(blended_bg) / zu)
    for i, v in seen.items():
        expect[i] = 0.5 * e(v) / zs
    for i, v in unseen.items():
        expect[i] = 0.5 * e(v) / zu
    torch.testing.assert_close(probs, torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert probs[6] == 0  # excluded class
    assert abs(float(probs.sum()) - 1.0) < 1e-6
    # released scores = per-group probabilities = score_scale x mixture
    assert head.score_scale == 2.0
    assert abs(2 * float(probs[1]) - e(2.0) / zs) < 1e-6 and abs(2 * float(probs[2]) - e(1.5) / zu) < 1e-6


def test_gzsd_needs_detector_background():
    with pytest.raises(ValueError, match="background"):
        ZSDPredictor(make_predictor(), SPLIT, "gzsd")


def test_gzsd_rows_sum_to_one_and_regression_borrowed():
    p = make_predictor(scale=5.0)
    w, b = syn_classifier(scale=2.0)
    inject_classifier(p, SPLIT, w, b, bg_blend=0.35)
    head = ZSDPredictor(p, SPLIT, "gzsd")
    x = torch.randn(50, 16)
    with torch.no_grad():
        logp, deltas = head(x)
        logits, raw = p(x)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(50))
    torch.testing.assert_close(deltas, borrow_box_regression(logits, raw, SPLIT.seen_ids, SPLIT.unseen_ids))
    assert not torch.equal(deltas, raw)


@pytest.mark.parametrize("cut", [None, 0.3])
def test_seen_score_cut(cut):
    p = make_predictor(scale=4.0)
    w, b = syn_classifier()
    det_bg = inject_classifier(p, SPLIT, w, b, bg_blend=0.35)
    x = torch.randn(200, 16)
    with torch.no_grad():
        logits = p(x)[0]
        bg_logit = x @ det_bg[0] + det_bg[1]
        plain = gzsd_probs(logits, bg_logit, SPLIT)
        got = ZSDPredictor(p, SPLIT, "gzsd", seen_score_cut=cut)(x)[0].exp()
    seen = SPLIT.seen_ids
    torch.testing.assert_close(got.sum(1), torch.ones(200))
    torch.testing.assert_close(got[:, SPLIT.unseen_ids], plain[:, SPLIT.unseen_ids])
    if cut is None:
        torch.testing.assert_close(got, plain)
        return
    low = 2 * plain[:, seen] < cut  # released seen score below the cut
    assert low.any() and (~low).any()
    assert (got[:, seen][low] == 0).all()
    torch.testing.assert_close(got[:, seen][~low], plain[:, seen][~low])
    torch.testing.assert_close(got[:, 0], plain[:, 0] + (plain[:, seen] * low).sum(1))


def test_seen_mode_is_plain_detector_over_seen_classes():
    p = make_predictor(scale=3.0)
    x = torch.randn(20, 16)
    with torch.no_grad():
        logits = p(x)[0]
        probs = ZSDPredictor(p, SPLIT, "seen")(x)[0].exp()
    keep = [0] + SPLIT.seen_ids
    torch.testing.assert_close(probs[:, keep], torch.softmax(logits[:, keep], dim=1))
    assert (probs[:, SPLIT.unseen_ids + SPLIT.excluded_ids] == 0).all()


# --- the seam inside a real torchvision detector --------------------------------------------
class TinyBackbone(nn.Module):
    out_channels = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("mode", ["zsd", "gzsd"])
def test_install_in_torchvision_faster_rcnn(mode):
    torch.manual_seed(0)
    model = FasterRCNN(TinyBackbone(), num_classes=C1, min_size=64, max_size=64,
                       box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_score_thresh=0.05,
                       rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
                       rpn_post_nms_top_n_test=100)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(50)
    model.eval()
    base = model.roi_heads.box_predictor
    feat = base.cls_score.in_features
    w, b = syn_classifier(feat=feat, scale=50.0)
    head = install_zsd_head(model, SPLIT, mode, (w, b), bg_blend=0.35, excluded="mask")
    assert model.roi_heads.box_predictor is head
    assert model.roi_heads.score_thresh == pytest.approx(0.05 / head.score_scale)
    with torch.no_grad():
        dets = rescale_scores(model([torch.rand(3, 64, 80)]), head)
    labels = dets[0]["labels"]
    assert len(labels) > 0 and (dets[0]["scores"] > 0.05).all() and (dets[0]["scores"] <= 1).all()
    if mode == "zsd":
        assert set(labels.tolist()) <= set(SPLIT.unseen_ids)
    else:
        assert not set(labels.tolist()) & set(SPLIT.excluded_ids)
    with pytest.raises(ValueError, match="already"):
        install_zsd_head(model, SPLIT, mode, (w, b))
