"""`vldus test --scoring clip-regions | ensemble`: a CLIP names the detector's boxes."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import vldus.detection.clip_regions as cr
from vldus.cli import main
from vldus.clip_train import crop_objects
from vldus.data.splits import Split
from test_inference import CAT_IDS, CLASSES, UNSEEN, cli_args, project  # noqa: F401 - the tiny project fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def _split() -> Split:
    # 2 seen (ids 1, 3), 2 unseen (ids 2, 4)
    return Split("t", ("a", "b", "c", "d"), ("b", "d"))


# --- arithmetic -----------------------------------------------------------------------------
def test_objectness_is_the_detectors_own_background():
    # columns: bg, seen a, unseen b, seen c, unseen d; the unseen columns must not matter
    logits = torch.tensor([[0.0, math.log(3.0), 50.0, 0.0, -50.0],
                           [0.0, -100.0, 9.0, -100.0, 9.0]])
    bg = torch.tensor([0.0, 0.0])
    p_obj = cr.detector_objectness(logits, bg, _split().seen_ids)
    # row 0: softmax([0, ln 3, 0]) -> background 1/5, object 4/5; row 1: no seen evidence
    assert p_obj[0].item() == pytest.approx(0.8, abs=1e-6)
    assert p_obj[1].item() == pytest.approx(0.0, abs=1e-6)


def test_region_probs_with_background():
    p_obj = torch.tensor([0.8, 0.25])
    p_clip = torch.tensor([[0.75, 0.25], [0.5, 0.5]])  # over the names of ids [2, 4] (ZSD: unseen)
    probs = cr.region_probs(p_obj, p_clip, [2, 4], 5)
    expected = torch.tensor([[0.2, 0.0, 0.6, 0.0, 0.2],
                             [0.75, 0.0, 0.125, 0.0, 0.125]])
    assert torch.allclose(probs, expected, atol=1e-7)
    assert torch.allclose(probs.sum(1), torch.ones(2))


def test_clip_probs_use_the_logit_scale():
    emb = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = cr.clip_probs(emb, text, logit_scale=math.log(3.0))  # cosines 1 and 0
    assert torch.allclose(p, torch.tensor([[0.75, 0.25]]))


def test_unseen_names_apart_in_the_gzsd_ensemble():
    """Step 7: the unseen columns are the softmax over the unseen names alone; the seen columns
    stay the softmax over all names (with the unseen ones in the denominator)."""
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])  # names a, b, c, d
    everything = cr.clip_probs(emb, text, logit_scale=2.0)
    apart = cr.clip_probs_unseen_apart(emb, text, 2.0, [1, 3])
    assert torch.equal(apart[:, [0, 2]], everything[:, [0, 2]])
    assert torch.allclose(apart[:, [1, 3]], cr.clip_probs(emb, text[[1, 3]], 2.0))
    assert torch.allclose(apart[:, [1, 3]].sum(1), torch.ones(2))
    assert not torch.allclose(apart[:, [1, 3]], everything[:, [1, 3]])
    assert torch.equal(cr.clip_probs_unseen_apart(emb, text, 2.0, []), everything)
    # only the GZSD ensemble gives them apart
    split = _split()

    class Clip:
        def text_rows(self, names):
            return torch.eye(4)[:len(names)]

    def cols(scoring, setting, names="unseen"):
        return cr.RegionScorer(scoring, Clip(), split, setting, unseen_names=names).unseen_cols

    assert cols("ensemble", "gzsd") == [1, 3]  # names a, b, c, d: b and d unseen
    assert cols("ensemble", "gzsd", "all") == cols("ensemble", "zsd") == cols("clip-regions", "gzsd") == []


def test_ensemble_weights_zero_and_one_give_either_method():
    split = _split()
    p_v = torch.tensor([[0.1, 0.0, 0.5, 0.0, 0.4], [0.6, 0.0, 0.0, 0.0, 0.4]])
    p_r = torch.tensor([[0.3, 0.0, 0.2, 0.0, 0.5], [0.2, 0.0, 0.64, 0.0, 0.16]])
    zero = cr.column_weights(split, {"seen": 0.0, "unseen": 0.0})
    one = cr.column_weights(split, {"seen": 1.0, "unseen": 1.0})
    assert torch.equal(cr.ensemble_scores(p_v, p_r, zero), p_v)
    assert torch.equal(cr.ensemble_scores(p_v, p_r, one), p_r)
    half = cr.ensemble_scores(p_v, p_r, cr.column_weights(split, {"seen": 0.0, "unseen": 0.5}))
    assert half[0, 2].item() == pytest.approx(math.sqrt(0.5 * 0.2))
    assert half[1, 2].item() == 0.0 and half[1, 4].item() == pytest.approx(math.sqrt(0.4 * 0.16))
    w = cr.column_weights(split, cr.ENSEMBLE_WEIGHTS)
    assert w[[1, 3]].tolist() == pytest.approx([1 / 3] * 2) and w[[2, 4]].tolist() == pytest.approx([2 / 3] * 2)


# --- crops ----------------------------------------------------------------------------------
def test_crop_margin_and_clamping():
    """The crops of train-clip: box grown by the margin per side, clamped to the image."""
    yy, xx = np.mgrid[0:40, 0:50]
    image = np.stack([xx * 5, yy * 6, (xx + yy) % 256], -1).astype(np.uint8)
    # box 10..20 grown by 0.1 * 10 = 1 px per side -> 9..21 (12 px: no resampling at size 12)
    crop = crop_objects(image, np.array([[10, 12, 20, 22]], np.float32), 12, 0.1)[0]
    assert np.array_equal(crop, image[11:23, 9:21])
    # at the corner, grown by 5 px per side, clamped at 0: 0..15
    crop = crop_objects(image, np.array([[0, 0, 10, 10]], np.float32), 15, 0.5)[0]
    assert np.array_equal(crop, image[0:15, 0:15])
    # at the far corner: 40..50 x 30..40 grown by 5 -> clamped at the image's width and height
    crop = crop_objects(image, np.array([[40, 30, 50, 40]], np.float32), 15, 0.5)[0]
    assert np.array_equal(crop, image[25:40, 35:50])


def test_embed_boxes_one_forward_per_image(tiny_clip, monkeypatch):
    clip = cr.RegionClip(tiny_clip.weights_path, tiny_clip.arch, "cpu", margin=0.1)
    calls = []
    encode = clip.model.encode_image
    monkeypatch.setattr(clip.model, "encode_image", lambda x, normalize: calls.append(x.shape) or encode(x, normalize=normalize))
    image = torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8)
    emb = clip.embed_boxes(image, torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 45.0, 35.0], [1, 1, 2, 2]]))
    assert calls == [(3, 3, 32, 32)]
    assert emb.shape == (3, 512) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


# --- the crop cache key ---------------------------------------------------------------------
def test_crop_cache_key(tiny_clip, tmp_path):
    def folder(weights, margin):
        return cr.CropCache(str(tmp_path), cr.RegionClip(weights, tiny_clip.arch, "cpu", margin=margin).key).dir

    same = folder(tiny_clip.weights_path, 0.1)
    assert folder(tiny_clip.weights_path, 0.1) == same
    assert folder(tiny_clip.weights_path, 0.2) != same
    state = torch.load(tiny_clip.weights_path, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1.0
    other = str(tmp_path / "other_clip.pt")
    torch.save(state, other)
    assert folder(other, 0.1) != same
    copy = str(tmp_path / "copy_clip.pt")
    shutil.copyfile(tiny_clip.weights_path, copy)
    assert folder(copy, 0.1) == same  # the file's bytes, not its name


# --- the command ----------------------------------------------------------------------------
def _test(project, tmp_path, tiny_clip, name, setting, *extra):
    out, metrics = tmp_path / f"{name}.json", tmp_path / f"{name}_m.json"
    rc = main(cli_args(project, setting, "--out", str(out), "--metrics", str(metrics),
                       "--clip-weights", tiny_clip.weights_path, "--clip-arch", tiny_clip.arch, *extra))
    assert rc == 0
    with open(out) as f, open(metrics) as g:
        return json.load(f), json.load(g)


def test_clip_regions_zsd_without_synthesis_and_cached(project, tmp_path, tiny_clip, monkeypatch):
    cache = str(tmp_path / "cache")
    dets, m = _test(project, tmp_path, tiny_clip, "a", "--zsd", "--scoring", "clip-regions", "--cache", cache)
    unseen_cats = {CAT_IDS[CLASSES.index(c)] for c in UNSEEN}
    assert dets and {d["category_id"] for d in dets} <= unseen_cats
    assert all(0.05 < d["score"] <= 1.0 for d in dets)
    s = m["scoring"]
    assert s["scoring"] == "clip-regions" and s["names"] == "unseen" and s["crop_cache_hits"] == 0
    assert s["clip_time_s"] > 0 and len(s["clip_sha256"]) == 64 and s["crop_margin"] == 0.1
    [key_dir] = [d for d in os.listdir(cache)]
    [crop_dir] = os.listdir(os.path.join(cache, key_dir, "clip"))
    assert len(os.listdir(os.path.join(cache, key_dir, "clip", crop_dir))) == 1 + 4  # key + 4 test images

    def no_clip(*a, **k):
        raise AssertionError("the CLIP ran although every crop embedding is cached")

    monkeypatch.setattr(cr.RegionClip, "embed_boxes", no_clip)
    again, m2 = _test(project, tmp_path, tiny_clip, "b", "--zsd", "--scoring", "clip-regions", "--cache", cache)
    assert again == dets and m2["scoring"]["crop_cache_hits"] == 4
    monkeypatch.undo()
    other, m3 = _test(project, tmp_path, tiny_clip, "c", "--zsd", "--scoring", "clip-regions", "--cache", cache,
                      "--clip-margin", "0.3")
    assert m3["scoring"]["crop_cache_hits"] == 0 and other != dets
    assert len(os.listdir(os.path.join(cache, key_dir, "clip"))) == 2


@pytest.mark.parametrize("setting", ["--zsd", "--gzsd"])
def test_ensemble_with_clip_weight_one_is_clip_regions(project, tmp_path, tiny_clip, setting):
    syn = ["--syn-weights", str(project / "cls.pth")]
    regions, _ = _test(project, tmp_path, tiny_clip, "r", setting, *syn, "--scoring", "clip-regions")
    # (in GZSD with the unseen CLIP probabilities over all names, as clip-regions has them)
    names = ["--ensemble-unseen-names", "all"] if setting == "--gzsd" else []
    ens, m = _test(project, tmp_path, tiny_clip, "e", setting, *syn, "--scoring", "ensemble",
                   "--ensemble-weights", "1,1", *names)
    assert m["scoring"]["ensemble_weights"]["seen"] == 1.0
    assert len(ens) == len(regions) > 0
    # matched as sets: two scores equal to within rounding may come out in either order
    left = list(regions)
    for a in ens:
        match = [i for i, b in enumerate(left) if (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
                 and a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)]
        assert match, f"no clip-regions detection matches the ensemble's {a}"
        left.pop(match[0])


def test_ensemble_default_weights_fixed_before_any_test_data(project, tmp_path, tiny_clip, monkeypatch):
    """The ensemble's weights are set when the scorer is built, from ENSEMBLE_WEIGHTS: building it
    with the test annotation file unreadable works, and --metrics records those weights."""
    from vldus.config import load_config
    from vldus.detection.inference import region_scorer

    cfg = load_config(str(project / "tiny.yaml"))
    poisoned = tmp_path / "poisoned.json"
    poisoned.write_text("{not json")
    cfg.data.test.ann_file = str(poisoned)
    scorer = region_scorer("ensemble", cfg.load_split(), "gzsd", "cpu", None, tiny_clip.weights_path,
                           tiny_clip.arch, None, None)
    assert scorer.weights == cr.ENSEMBLE_WEIGHTS
    _, m = _test(project, tmp_path, tiny_clip, "e", "--gzsd", "--syn-weights", str(project / "cls.pth"),
                 "--scoring", "ensemble")
    w = m["scoring"]["ensemble_weights"]
    assert (w["seen"], w["unseen"]) == pytest.approx((1 / 3, 2 / 3)) and "fixed in advance" in w["source"]
    assert m["scoring"]["names"] == "all" and m["scoring"]["ensemble_unseen_names"] == "unseen"


def test_bad_options(project, tmp_path, cli_error, tiny_clip):
    base = cli_args(project, "--zsd", "--out", str(tmp_path / "d.json"))
    assert "needs --clip-weights" in cli_error(base + ["--scoring", "clip-regions"])
    assert "applies to --scoring" in cli_error(base + ["--syn-weights", str(project / "cls.pth"),
                                                       "--clip-weights", tiny_clip.weights_path])
    assert "--ensemble-weights" in cli_error(base + ["--syn-weights", str(project / "cls.pth"), "--scoring",
                                                     "ensemble", "--clip-weights", tiny_clip.weights_path,
                                                     "--ensemble-weights", "2,0"])
    assert "--syn-weights" in cli_error(base + ["--scoring", "ensemble", "--clip-weights", tiny_clip.weights_path])
    ensemble = base + ["--syn-weights", str(project / "cls.pth"), "--clip-weights", tiny_clip.weights_path]
    assert "--ensemble-unseen-names: applies to --gzsd only" in cli_error(
        ensemble + ["--scoring", "ensemble", "--ensemble-unseen-names", "all"])
    assert "--ensemble-unseen-names: applies to --scoring ensemble only" in cli_error(
        ensemble + ["--scoring", "clip-regions", "--ensemble-unseen-names", "all"])


def test_boxes_the_detector_calls_background_are_not_asked(tiny_clip, monkeypatch):
    """p_obj <= MIN_OBJECTNESS: no crop, probability 0 for every name, background 1 - p_obj."""
    split = _split()
    scorer = cr.RegionScorer("clip-regions", cr.RegionClip(tiny_clip.weights_path, tiny_clip.arch, "cpu"),
                             split, "zsd")
    # seen columns 1, 3; p_obj = sigmoid(logsumexp(z_seen) - z_bg): row 0 0.8, row 1 below the floor
    logits = torch.tensor([[0.0, math.log(2.0), 0.0, math.log(2.0), 0.0],
                           [0.0, -8.0, 5.0, -8.0, 5.0]])
    boxes = torch.tensor([[1.0, 1.0, 20.0, 20.0], [5.0, 5.0, 30.0, 30.0]])
    reg = cr.Regions(logits, torch.zeros(2), torch.zeros(2, 20), boxes)
    monkeypatch.setattr(cr, "regions", lambda model, head, inputs: reg)
    asked = []
    embed = scorer.clip.embed_boxes
    monkeypatch.setattr(scorer.clip, "embed_boxes", lambda image, b: asked.append(b.clone()) or embed(image, b))
    _, probs, scale = scorer.class_scores(None, None, None, torch.zeros(3, 40, 40, dtype=torch.uint8), "x.png")
    assert scale == 1.0 and len(asked) == 1 and torch.equal(asked[0], boxes[:1])
    p_obj1 = torch.sigmoid(torch.tensor(-8.0 + math.log(2.0)))
    assert probs[0, 0].item() == pytest.approx(0.2, abs=1e-6) and probs[0, [2, 4]].sum().item() == pytest.approx(0.8)
    assert probs[1, 0].item() == pytest.approx(1 - p_obj1.item()) and probs[1, 1:].abs().sum().item() == 0.0
    assert scorer.misses == 1 and scorer.clip_s > 0


def test_demo_rows_by_size():
    from vldus.demo import FULL, METHOD, QUICK, TINY, demo_rows

    rows, regions = demo_rows(FULL, ablation=False)
    assert METHOD in rows and list(regions) == ["clip_regions", "vldus_ensemble"]
    assert regions["vldus_ensemble"].classifier == METHOD and regions["clip_regions"].classifier is None
    assert demo_rows(QUICK, ablation=False)[1] == {} and demo_rows(TINY, ablation=False)[1] == {}
    _, regions = demo_rows(QUICK, ablation=True)
    assert list(regions) == ["clip_regions", "vldus_ensemble", "clip_regions_exclude_unseen",
                             "vldus_ensemble_exclude_unseen"]
    assert {r.clip for r in regions.values()} == {"main", "exclude_unseen"}
