"""The joint and soft GZSD scorings (vldus.detection.gzsd) on hand-made score tables, and their calibration."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vldus.data.splits import split_from_names
from vldus.config import InferenceConfig
from vldus.detection.gzsd import (best_threshold, calibrate, chance_auc, fit_soft_gate, group_evidence,
                                  resolve_scoring, separation_auc, unseen_wins, why_published)
from vldus.files import sha256_file
from vldus.detection.zsd import ZSDPredictor, gzsd_probs, unseen_weight, zsd_log_probs
from vldus.errors import InputError

# detector order: 1 red square, 2 blue square, 3 blue circle, 4 green circle; unseen: blue circle
SPLIT = split_from_names("toy", ["red square", "blue square", "blue circle", "green circle"],
                         unseen=["blue circle"])
BIG, NONE = 6.0, -6.0

# logits after injection: [blended bg, red sq, blue sq, blue circle (unseen), green circle]; the
# detector's own background logit is the second element of each row
TABLE = {
    # a blue circle (unseen) the detector takes for a blue square: both groups confident,
    # the unseen classifier far more so
    "look-alike": ([0.0, NONE, 2.5, BIG + 4, NONE], 0.0),
    # a real blue square: the unseen classifier also fires (nearest unseen class), but weaker
    "real seen": ([0.0, NONE, BIG + 2, 3.0, NONE], 0.0),
    # background: nothing confident
    "background": ([2.0, NONE, -1.0, -1.0, NONE], 1.0),
}


def _rows(*names):
    logits = torch.tensor([TABLE[n][0] for n in names])
    bg = torch.tensor([TABLE[n][1] for n in names])
    return logits, bg


class _FixedPredictor(torch.nn.Module):
    """A box predictor that returns the given logits for inputs torch.eye(R); its detector
    background row reads bg off the same one-hot inputs."""

    def __init__(self, logits: torch.Tensor, bg: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.detector_background = (bg.clone(), torch.tensor(0.0))

    def forward(self, x):
        return x @ self.logits, torch.zeros(x.shape[0], 4 * self.logits.shape[1])



def test_evidence_is_the_log_odds_of_each_group():
    logits, bg = _rows("real seen")
    e_s, e_u = group_evidence(logits, bg, SPLIT)
    seen = torch.tensor([NONE, BIG + 2, NONE])
    assert e_s.item() == pytest.approx(torch.logsumexp(seen, 0).item() - 0.0)
    assert e_u.item() == pytest.approx(3.0 - 0.0)


def test_look_alike_removed_real_seen_kept():
    logits, bg = _rows("look-alike", "real seen", "background")
    published = gzsd_probs(logits, bg, SPLIT)
    joint = gzsd_probs(logits, bg, SPLIT, joint_threshold=0.0)
    blue_square, blue_circle = 2, 3
    # published: the look-alike is also a confident blue square (a seen false positive)
    assert 2 * published[0, blue_square] > 0.3
    # joint: its seen scores are gone, its unseen score untouched
    assert joint[0, SPLIT.seen_ids].abs().max() == 0
    assert joint[0, blue_circle] == published[0, blue_circle]
    # the real blue square keeps its seen score; nothing changes for it or for background
    assert torch.equal(joint[1:], published[1:])
    assert 2 * joint[1, blue_square] > 0.9
    torch.testing.assert_close(joint.sum(1), torch.ones(3))  # still a distribution
    assert unseen_wins(logits, bg, SPLIT, 0.0).tolist() == [True, False, False]


def test_threshold_moves_the_decision():
    logits, bg = _rows("look-alike", "real seen")
    e_s, e_u = group_evidence(logits, bg, SPLIT)
    margin = (e_u - e_s).tolist()
    assert margin[0] > 0 > margin[1]
    assert unseen_wins(logits, bg, SPLIT, margin[0] + 0.1).tolist() == [False, False]
    assert unseen_wins(logits, bg, SPLIT, margin[1] - 0.1).tolist() == [True, True]


def test_published_scoring_unchanged():
    """joint_threshold=None is the released two-softmax mixture, value by value."""
    logits, bg = _rows("look-alike", "real seen", "background")
    p = gzsd_probs(logits, bg, SPLIT)
    for r in range(3):
        z = logits[r]
        q_s = torch.softmax(torch.stack([bg[r], z[1], z[2], z[4]]), 0)
        q_u = torch.softmax(torch.stack([z[0], z[3]]), 0)
        torch.testing.assert_close(p[r], torch.stack([(q_s[0] + q_u[0]) / 2, q_s[1] / 2, q_s[2] / 2,
                                                      q_u[1] / 2, q_s[3] / 2]))


def test_best_threshold_separates_and_reports_accuracy():
    seen = torch.tensor([-5.0, -4.0, -3.0, 1.5])  # one seen row on the wrong side
    unseen = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t, acc = best_threshold(seen, unseen)
    # cutting after -3 (one seen row wrong) and after 1.5 (one unseen row wrong) tie at 0.875:
    # the higher cut wins (it removes fewer seen detections)
    assert t == pytest.approx(1.75) and acc == pytest.approx((3 / 4 + 1) / 2)
    t, acc = best_threshold(torch.tensor([0.0, 1.0]), torch.tensor([5.0]))
    assert t == pytest.approx(3.0) and acc == 1.0
    with pytest.raises(ValueError):
        best_threshold(torch.tensor([]), unseen)


def test_calibrate_on_features_picks_a_separating_threshold():
    """Seen features excite the blue-square row, unseen ones the blue-circle row (both partly)."""
    g = torch.Generator().manual_seed(0)
    feat = 8
    cls_w = torch.zeros(SPLIT.num_classes + 1, feat)
    cls_w[2, 0] = cls_w[2, 1] = 1.0  # detector: blue square responds to dims 0 and 1
    cls_b = torch.zeros(SPLIT.num_classes + 1)
    syn_w, syn_b = torch.zeros(2, feat), torch.zeros(2)
    syn_w[1, 1] = syn_w[1, 2] = 1.0  # synthesized: blue circle responds to dims 1 and 2
    seen = torch.rand(200, feat, generator=g) * torch.tensor([4.0, 1, 0, 0, 0, 0, 0, 0])
    seen[:, 1] = 2.0
    unseen = torch.rand(100, feat, generator=g) * torch.tensor([0.0, 0, 4, 0, 0, 0, 0, 0])
    unseen[:, 1] = 2.0
    synthetic_seen = seen[torch.randperm(200, generator=g)[:150]] + 0.01  # the generator's seen rows look seen
    out = calibrate(seen, unseen, cls_w, cls_b, syn_w, syn_b, SPLIT, bg_blend=0.35, source="hand-made",
                    synthetic_seen=synthetic_seen)
    assert out["balanced_accuracy"] > 0.95 and out["scoring"] == "joint"
    assert out["synthetic_auc"] > 0.95 and out["synthetic_auc_floor"] == pytest.approx(chance_auc(150, 100), abs=1e-6)
    assert out["seen_rows"] == 200 and out["unseen_rows"] == 100 and out["synthetic_seen_rows"] == 150
    assert math.isfinite(out["threshold"])
    assert out["soft_slope"] > 0 and math.isfinite(out["soft_threshold"])
    assert out["gate_fit"] == "margin" and out["soft_seen_weight"] == 1.0  # the default fit: on e_u - e_s
    two = calibrate(seen, unseen, cls_w, cls_b, syn_w, syn_b, SPLIT, bg_blend=0.35, source="hand-made",
                    gate_fit="two_weights", synthetic_seen=synthetic_seen)
    assert two["gate_fit"] == "two_weights" and two["soft_slope"] > 0 and two["soft_seen_weight"] != 1.0
    assert {k: v for k, v in two.items() if not k.startswith(("soft_", "gate_"))} == \
        {k: v for k, v in out.items() if not k.startswith(("soft_", "gate_"))}  # the joint rule is the same
    with pytest.raises(ValueError, match="gate_fit"):
        calibrate(seen, unseen, cls_w, cls_b, syn_w, syn_b, SPLIT, bg_blend=0.35, source="x", gate_fit="cubic",
                  synthetic_seen=synthetic_seen)
    # the generator's seen rows drawn like its unseen ones: the margin separates real from
    # synthesized rows as well as before, but not seen from unseen classes, so no rule runs
    synthetic_like_unseen = unseen[torch.randperm(100, generator=g)] + 0.01
    artefact = calibrate(seen, unseen, cls_w, cls_b, syn_w, syn_b, SPLIT, bg_blend=0.35, source="hand-made",
                         synthetic_seen=synthetic_like_unseen)
    assert artefact["balanced_accuracy"] == out["balanced_accuracy"] and artefact["threshold"] == out["threshold"]
    assert artefact["synthetic_auc"] < artefact["synthetic_auc_floor"] and artefact["scoring"] == "published"
    assert "no better than chance" in why_published(artefact)


def test_separation_auc_counts_ties_half_and_the_chance_floor_shrinks_with_rows():
    assert separation_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert separation_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    # pairs: (1 vs 1) tie = 0.5, (1 vs 2) = 1, (3 vs 1) = 0, (3 vs 2) = 0 -> 1.5 / 4
    assert separation_auc(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.375)
    assert separation_auc(torch.ones(5), torch.ones(7)) == pytest.approx(0.5)
    # brute force on random values with ties
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 5, (40,), generator=g).float(), torch.randint(0, 6, (30,), generator=g).float()
    pairs = (b[None, :] > a[:, None]).double().mean() + 0.5 * (b[None, :] == a[:, None]).double().mean()
    assert separation_auc(a, b) == pytest.approx(float(pairs), abs=1e-12)
    # 0.5 + 3 standard errors of the AUC of two groups that do not differ
    assert chance_auc(4000, 4000) == pytest.approx(0.5 + 3 * (8001 / (12 * 4000 * 4000)) ** 0.5)
    assert 0.5 < chance_auc(4000, 4000) < chance_auc(100, 100) < 0.65


def test_calibration_without_separation_keeps_the_published_scoring(tmp_path):
    """Seen and unseen features drawn alike: no threshold separates them, so the calibration
    says 'published' and vldus test does not remove seen detections."""
    g = torch.Generator().manual_seed(0)
    feat = 8
    cls_w, cls_b = torch.randn(SPLIT.num_classes + 1, feat, generator=g), torch.zeros(SPLIT.num_classes + 1)
    syn_w, syn_b = torch.randn(2, feat, generator=g), torch.zeros(2)
    seen, unseen = torch.rand(300, feat, generator=g), torch.rand(300, feat, generator=g)
    out = calibrate(seen, unseen, cls_w, cls_b, syn_w, syn_b, SPLIT, bg_blend=0.35, source="hand-made",
                    min_separation=0.75, synthetic_seen=torch.rand(300, feat, generator=g))
    assert out["balanced_accuracy"] < 0.75 and out["scoring"] == "published"
    ckpt, cls = _made_for(tmp_path, out)
    scoring = resolve_scoring(InferenceConfig(bg_blend=0.35), ckpt, cls)
    assert scoring["scoring"] == "published" and scoring["threshold"] is None
    assert "balanced accuracy" in scoring["source"]


def _made_for(tmp_path, calibration: dict, bg_blend: float = 0.35) -> tuple[str, str]:
    """A detector checkpoint and classifier file with ``calibration`` written for them."""
    ckpt, cls = tmp_path / "epoch_1.pth", tmp_path / "classifier_best.pth"
    ckpt.write_bytes(b"detector")
    cls.write_bytes(b"classifier")
    calibration = dict(calibration, bg_blend=bg_blend, detector_sha256=sha256_file(str(ckpt)),
                       classifier_sha256=sha256_file(str(cls)))
    (tmp_path / "gzsd_calibration.json").write_text(json.dumps(calibration))
    return str(ckpt), str(cls)


JOINT = {"scoring": "joint", "threshold": -1.25, "balanced_accuracy": 0.9, "min_separation": 0.75,
         "soft_slope": 0.8, "gate_fit": "margin", "soft_seen_weight": 1.5, "soft_threshold": -1.0,
         "synthetic_auc": 0.6, "synthetic_auc_floor": 0.52}


def test_resolve_scoring_order(tmp_path):
    ckpt, cls = tmp_path / "epoch_1.pth", tmp_path / "classifier_best.pth"
    scoring = resolve_scoring(InferenceConfig(), str(ckpt), str(cls))
    assert scoring["scoring"] == "published" and "calibrate-gzsd" in scoring["source"]  # no file
    ckpt, cls = _made_for(tmp_path, JOINT)
    path = str(tmp_path / "gzsd_calibration.json")
    assert resolve_scoring(InferenceConfig(), ckpt, cls) == {  # the default: soft
        "scoring": "soft", "threshold": -1.0, "slope": 0.8, "seen_weight": 1.5, "source": path}
    assert resolve_scoring(InferenceConfig(gzsd_scoring="joint"), ckpt, cls) == {
        "scoring": "joint", "threshold": -1.25, "slope": None, "seen_weight": None, "source": path}
    assert resolve_scoring(InferenceConfig(gzsd_scoring="joint", gzsd_threshold=2.0), ckpt, cls) == {
        "scoring": "joint", "threshold": 2.0, "slope": None, "seen_weight": None, "source": "inference.gzsd_threshold"}
    assert resolve_scoring(InferenceConfig(gzsd_scoring="soft", gzsd_threshold=2.0, gzsd_slope=3.0), ckpt, cls) == {
        "scoring": "soft", "threshold": 2.0, "slope": 3.0, "seen_weight": 1.0,
        "source": "inference.gzsd_threshold and inference.gzsd_slope"}
    assert resolve_scoring(InferenceConfig(gzsd_threshold=2.0, gzsd_slope=3.0, gzsd_seen_weight=1.25), ckpt, cls) == {
        "scoring": "soft", "threshold": 2.0, "slope": 3.0, "seen_weight": 1.25,
        "source": "inference.gzsd_threshold and inference.gzsd_slope and inference.gzsd_seen_weight"}
    assert resolve_scoring(InferenceConfig(gzsd_scoring="published"), ckpt, cls)["scoring"] == "published"
    # ZSD: its own scoring, the same gate
    assert resolve_scoring(InferenceConfig(gzsd_scoring="published"), ckpt, cls, setting="zsd") == {
        "scoring": "soft", "threshold": -1.0, "slope": 0.8, "seen_weight": 1.5, "source": path}
    assert resolve_scoring(InferenceConfig(zsd_scoring="published"), ckpt, cls, setting="zsd")["source"] == \
        "inference.zsd_scoring"
    assert resolve_scoring(InferenceConfig(gzsd_threshold=2.0, gzsd_slope=3.0), ckpt, cls, setting="zsd")["slope"] == 3.0
    with pytest.raises(InputError, match="soft ZSD scoring needs inference.gzsd_slope"):
        resolve_scoring(InferenceConfig(gzsd_scoring="joint", gzsd_threshold=2.0), ckpt, cls, setting="zsd")
    (tmp_path / "gzsd_calibration.json").write_text("{")
    with pytest.raises(InputError, match="unreadable GZSD calibration.*calibrate-gzsd"):
        resolve_scoring(InferenceConfig(), ckpt, cls)


@pytest.mark.parametrize("change", ["classifier", "detector", "bg_blend", "gate_fit", "no scoring key", "no sha256",
                                    "no soft fit", "no seen weight", "no chance check"])
def test_calibration_made_for_other_files_is_refused(tmp_path, change):
    """A gzsd_calibration.json is trusted only for the checkpoint, classifier and bg_blend it
    was made for, and only with every key (a missing 'scoring' does not mean joint)."""
    ckpt, cls = _made_for(tmp_path, JOINT)
    path = tmp_path / "gzsd_calibration.json"
    inference = InferenceConfig(bg_blend=0.35)
    if change == "classifier":
        (tmp_path / "classifier_best.pth").write_bytes(b"another classifier")
    elif change == "detector":
        (tmp_path / "epoch_1.pth").write_bytes(b"another detector")
    elif change == "bg_blend":
        inference = InferenceConfig(bg_blend=0.5)
    elif change == "gate_fit":
        inference = InferenceConfig(bg_blend=0.35, gate_fit="two_weights")
    else:
        data = json.loads(path.read_text())
        del data[{"no scoring key": "scoring", "no sha256": "classifier_sha256", "no soft fit": "soft_slope",
                  "no seen weight": "soft_seen_weight", "no chance check": "synthetic_auc"}[change]]
        path.write_text(json.dumps(data))
    with pytest.raises(InputError) as e:
        resolve_scoring(inference, ckpt, cls, "configs/toy.yaml")
    assert e.value.source == str(path)
    assert (f"vldus calibrate-gzsd --config configs/toy.yaml --synth-dir {tmp_path} --checkpoint {ckpt}"
            in e.value.message)


def test_ties_keep_the_threshold_that_removes_fewest_seen_boxes():
    """Seen margins 0, 2; unseen 1, 3. Cut after 0: seen 1/2 right, unseen 2/2 -> 0.75; after 1:
    1/2, 1/2 -> 0.5; after 2: 2/2, 1/2 -> 0.75. The tie goes to the cut after 2 (t = 2.5): only
    boxes with margin > 2.5 lose their seen scores, fewer than with t = 0.5."""
    t, acc = best_threshold(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0]))
    assert acc == pytest.approx(0.75) and t == pytest.approx(2.5)
    # rows in another order, repeated values
    t, acc = best_threshold(torch.tensor([2.0, 0.0, 2.0, 0.0]), torch.tensor([3.0, 1.0, 3.0, 1.0]))
    assert acc == pytest.approx(0.75) and t == pytest.approx(2.5)


def test_soft_scoring_weighs_both_groups_by_the_calibrated_probability():
    """soft: each box keeps w = sigmoid(slope (e_u - e_s - t)) of its unseen scores and 1 - w of
    its seen ones, so the look-alike drops far below the real blue square without leaving the
    list and the real blue square's unseen score (blue circle) drops too; each group's removed
    mass goes to its background; a steep slope removes the seen scores as the hard joint rule
    does, and the unseen scores where the seen group wins."""
    logits, bg = _rows("look-alike", "real seen", "background")
    published = gzsd_probs(logits, bg, SPLIT)
    soft = gzsd_probs(logits, bg, SPLIT, joint_threshold=0.0, joint_slope=1.0)
    e_s, e_u = group_evidence(logits, bg, SPLIT)
    w = torch.sigmoid(e_u - e_s)
    blue_square, blue_circle = 2, 3
    torch.testing.assert_close(soft[:, SPLIT.seen_ids], published[:, SPLIT.seen_ids] * (1 - w[:, None]))
    torch.testing.assert_close(soft[:, SPLIT.unseen_ids], published[:, SPLIT.unseen_ids] * w[:, None])
    assert 0 < soft[0, blue_square] < 0.1 * soft[1, blue_square]
    assert 0 < soft[1, blue_circle] < 0.1 * published[1, blue_circle]
    torch.testing.assert_close(soft[0, blue_circle], published[0, blue_circle], rtol=0.02, atol=0)
    torch.testing.assert_close(soft.sum(1), torch.ones(3))
    torch.testing.assert_close(unseen_weight(logits, bg, SPLIT, 0.0, None), unseen_wins(logits, bg, SPLIT, 0.0).float())
    steep = gzsd_probs(logits, bg, SPLIT, joint_threshold=0.0, joint_slope=1e4)
    joint = gzsd_probs(logits, bg, SPLIT, joint_threshold=0.0)
    torch.testing.assert_close(steep[:, SPLIT.seen_ids], joint[:, SPLIT.seen_ids])
    wins = unseen_wins(logits, bg, SPLIT, 0.0).float()[:, None]
    torch.testing.assert_close(steep[:, SPLIT.unseen_ids], published[:, SPLIT.unseen_ids] * wins)
    assert torch.equal(joint[:, SPLIT.unseen_ids], published[:, SPLIT.unseen_ids])


def test_soft_zsd_scoring_weighs_unseen_scores_by_the_calibrated_probability():
    """ZSD soft: each box keeps w of its unseen probabilities (rest to background): the real blue
    square no longer scores as a confident blue circle, the look-alike barely changes, seen
    columns stay 0; the head does it with both gate values and refuses a threshold alone."""
    logits, bg = _rows("look-alike", "real seen", "background")
    published = zsd_log_probs(logits, SPLIT).exp()
    e_s, e_u = group_evidence(logits, bg, SPLIT)
    w = torch.sigmoid(2.0 * (e_u - e_s - 0.5))
    soft = zsd_log_probs(logits, SPLIT, gate=w).exp()
    torch.testing.assert_close(soft[:, SPLIT.unseen_ids], published[:, SPLIT.unseen_ids] * w[:, None])
    torch.testing.assert_close(soft.sum(1), torch.ones(3))
    assert torch.equal(soft[:, SPLIT.seen_ids], torch.zeros(3, len(SPLIT.seen_ids)))
    blue_circle = 3
    assert soft[1, blue_circle] < 0.1 * published[1, blue_circle]
    assert soft[0, blue_circle] > 0.9 * published[0, blue_circle]
    predictor = _FixedPredictor(logits, bg)
    head = ZSDPredictor(predictor, SPLIT, "zsd", gate_threshold=0.5, gate_slope=2.0)
    log_probs, _ = head(torch.eye(3))
    torch.testing.assert_close(log_probs.exp(), soft)
    with pytest.raises(ValueError, match="soft gate"):
        ZSDPredictor(predictor, SPLIT, "zsd", gate_threshold=0.5)


def test_soft_fit_recovers_a_known_logistic_and_weighs_both_groups_equally():
    """Evidences (e_u, e_s) ~ N((0, 2), I) for seen rows and N((1, 0), I) for unseen rows: the
    true log-odds are e_u - 2 e_s + 1.5 = 1 (e_u - 2 e_s - (-1.5)), so slope 1, seen weight 2,
    threshold -1.5 -- also with four times as many seen rows (each group weighs half)."""
    g = torch.Generator().manual_seed(0)
    seen = torch.randn(40000, 2, generator=g) + torch.tensor([0.0, 2.0])
    unseen = torch.randn(10000, 2, generator=g) + torch.tensor([1.0, 0.0])
    slope, seen_weight, threshold = fit_soft_gate(seen, unseen)
    assert slope == pytest.approx(1.0, abs=0.05) and seen_weight == pytest.approx(2.0, abs=0.1)
    assert threshold == pytest.approx(-1.5, abs=0.1)
    # a gate on the plain margin e_u - e_s gives seen weight 1
    shift = torch.randn(50000, generator=g)[:, None]  # the same shift of both evidences
    seen_m, unseen_m = torch.randn(40000, generator=g) - 1, torch.randn(10000, generator=g) + 1
    slope, seen_weight, threshold = fit_soft_gate(torch.stack([seen_m, torch.zeros(40000)], 1) + shift[:40000],
                                                  torch.stack([unseen_m, torch.zeros(10000)], 1) + shift[40000:])
    assert slope == pytest.approx(2.0, abs=0.1) and seen_weight == pytest.approx(1.0, abs=0.05)
    assert threshold == pytest.approx(0.0, abs=0.05)
    # swapped groups would give a negative slope: the calibration then keeps the published scoring
    assert fit_soft_gate(unseen, seen)[0] < 0
    # separable rows: a large, finite slope at the gap
    slope, seen_weight, threshold = fit_soft_gate(torch.tensor([[-2.0, 0.0], [-1.0, 0.0]]),
                                                  torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    assert math.isfinite(slope) and slope > 10 and threshold == pytest.approx(0.0, abs=1e-6)


def test_soft_gate_weighs_the_seen_evidence():
    """unseen_weight = sigmoid(slope (e_u - seen_weight e_s - threshold)); a seen weight of 1 is
    the margin gate, and the predictor passes its weight through."""
    logits, bg = _rows("look-alike", "real seen", "background")
    e_s, e_u = group_evidence(logits, bg, SPLIT)
    for seen_weight in (1.0, 2.0):
        expected = torch.sigmoid(1.5 * (e_u - seen_weight * e_s - 0.25))
        torch.testing.assert_close(unseen_weight(logits, bg, SPLIT, 0.25, 1.5, seen_weight), expected)
    # more weight on the seen evidence: the boxes with seen evidence look less unseen
    assert torch.all(unseen_weight(logits, bg, SPLIT, 0.25, 1.5, 2.0)[e_s > 0] <
                     unseen_weight(logits, bg, SPLIT, 0.25, 1.5)[e_s > 0])
    predictor = _FixedPredictor(logits, bg)
    head = ZSDPredictor(predictor, SPLIT, "zsd", gate_threshold=0.25, gate_slope=1.5, gate_seen_weight=2.0)
    gate = unseen_weight(logits, bg, SPLIT, 0.25, 1.5, 2.0)
    torch.testing.assert_close(head(torch.eye(3))[0].exp(), zsd_log_probs(logits, SPLIT, gate=gate).exp())


def test_object_gate_is_one_decision_per_object():
    """Two overlapping boxes on one object share the objectness-weighted mean of their gates; a
    box elsewhere keeps its own; the ZSD head does it only when given the boxes."""
    from vldus.detection.zsd import object_gate

    logits, bg = _rows("look-alike", "real seen", "background")
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    gate = torch.tensor([0.9, 0.1, 0.7])
    e_s, e_u = group_evidence(logits, bg, SPLIT)
    obj = torch.sigmoid(torch.maximum(e_s, e_u))
    shared = (obj[0] * 0.9 + obj[1] * 0.1) / (obj[0] + obj[1])
    got = object_gate(gate, logits, bg, SPLIT, boxes, iou=0.5)
    torch.testing.assert_close(got, torch.stack([shared, shared, torch.tensor(0.7)]))
    torch.testing.assert_close(object_gate(gate, logits, bg, SPLIT, boxes, iou=0.95), gate)  # no overlap that high
    head = ZSDPredictor(_FixedPredictor(logits, bg), SPLIT, "zsd", gate_threshold=0.5, gate_slope=2.0, gate_iou=0.5)
    per_box = unseen_weight(logits, bg, SPLIT, 0.5, 2.0)
    per_object = object_gate(per_box, logits, bg, SPLIT, boxes, 0.5)
    torch.testing.assert_close(head(torch.eye(3), boxes)[0].exp(), zsd_log_probs(logits, SPLIT, gate=per_object).exp())
    torch.testing.assert_close(head(torch.eye(3))[0].exp(), zsd_log_probs(logits, SPLIT, gate=per_box).exp())
    gzsd = ZSDPredictor(_FixedPredictor(logits, bg), SPLIT, "gzsd", gate_threshold=0.5, gate_slope=2.0, gate_iou=0.5)
    torch.testing.assert_close(gzsd(torch.eye(3), boxes)[0].exp(),
                               gzsd_probs(logits, bg, SPLIT, joint_threshold=0.5, joint_slope=2.0, soft_gate=per_object))
    assert not torch.allclose(per_object, per_box)
