"""`vldus test --cache`: detector outputs stored once, later runs re-score them to the same detections."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vldus.detection.cache as cache_mod
from vldus.cli import main
from test_inference import ROOT, _free_port, cli_args, project  # noqa: F401 - the tiny project fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def _read(path):
    with open(path) as f:
        return json.load(f)


def _run(project, tmp_path, name, setting, *extra, cls="cls.pth"):
    out = tmp_path / f"{name}.json"
    syn = [] if setting == "--seen" else ["--syn-weights", str(project / cls)]
    assert main(cli_args(project, *syn, setting, "--out", str(out), *extra)) == 0
    return _read(out)


def _no_detector(*args, **kwargs):
    raise AssertionError("the detector ran although every image is in the cache")


@pytest.mark.parametrize("setting", ["--zsd", "--gzsd", "--seen"])
def test_cached_runs_give_the_same_detections(project, tmp_path, capsys, monkeypatch, setting):
    cache = str(tmp_path / "cache")
    plain = _run(project, tmp_path, "plain", setting)
    first = _run(project, tmp_path, "first", setting, "--cache", cache)
    assert "cache: 0 of 4 images re-scored" in capsys.readouterr().out
    monkeypatch.setattr(cache_mod, "box_inputs", _no_detector)
    again = _run(project, tmp_path, "again", setting, "--cache", cache)
    assert "cache: 4 of 4 images re-scored" in capsys.readouterr().out
    assert plain and plain == first == again  # float32 entries: bit-identical detections
    [key_dir] = os.listdir(cache)
    names = sorted(os.listdir(os.path.join(cache, key_dir)))
    assert names[-1] == "key.json" and len(names) == 5  # 4 images + the key
    key = _read(os.path.join(cache, key_dir, "key.json"))
    assert key["dtype"] == "float32" and len(key["checkpoint_sha256"]) == 64
    assert "score_thresh" not in key["detector"] and key["detector"]["min_size"] == 64


@pytest.mark.parametrize("setting", ["plain", "seen", "zsd", "gzsd"])
def test_cached_rescoring_equals_torchvision_forward(project, tmp_path, setting):
    """On a real picture (the shapes generator's), the cache's two halves (box_inputs, stored and
    read back, then score_image: what vldus test and the API run) give torchvision's own
    ``model([image])`` in eval mode, with the detector's own predictor ("plain") or a ZSD head
    installed as its box_predictor: same boxes, scores and labels."""
    from PIL import Image

    from vldus.config import load_config
    from vldus.data.images import read_rgb, to_float
    from vldus.data.shapes import render_image
    from vldus.detection.cache import DetectorCache, box_inputs, score_boxes
    from vldus.detection.inference import score_image
    from vldus.detection.model import load_detector
    from vldus.detection.zsd import install_zsd_head, load_syn_classifier, rescale_scores

    pixels, _, _ = render_image(np.random.default_rng(3), [0, 5, 9, 12], 96)
    path = tmp_path / "shapes.png"
    Image.fromarray(pixels).save(path)
    image = to_float(read_rgb(str(path)))
    cfg = load_config(str(project / "tiny.yaml"))
    split = cfg.load_split()
    model = load_detector(cfg, split, str(project / "det.pth"), "cpu").eval()
    head = None
    if setting != "plain":
        classifier = load_syn_classifier(str(project / "cls.pth"), split, 1024)
        head = install_zsd_head(model, split, setting, classifier, bg_blend=0.35,  # gzsd: joint, zsd: soft
                                gate_threshold=-2.0 if setting != "seen" else None,
                                gate_slope=1.0 if setting == "zsd" else None)
    with torch.inference_mode():
        expected = model([image])[0]
    if head is not None:
        expected = rescale_scores([expected], head)[0]

    cache = DetectorCache(str(tmp_path / "cache"), cfg.detector, str(project / "det.pth"))
    cache.prepare()
    entry = cache.entry_path(str(path))
    cache.store(entry, box_inputs(model, image))
    stored = cache.load(entry)
    if head is None:
        out = score_boxes(model, stored)
        got = {k: v.numpy() for k, v in out.items()}
    else:
        got = score_image(model, head, stored)
    assert len(expected["boxes"]) > 10  # a random detector still finds boxes: the test compares something
    assert len(got["boxes"]) == len(expected["boxes"])
    np.testing.assert_array_equal(got["labels"], expected["labels"].numpy())
    np.testing.assert_allclose(got["boxes"], expected["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(got["scores"], expected["scores"].numpy(), atol=1e-5)


def test_other_classifier_and_postprocess_reuse_the_cache(project, tmp_path, capsys, monkeypatch):
    """One cache serves any synthesized classifier and the post-classification settings."""
    g = torch.Generator().manual_seed(5)
    torch.save({"fc.weight": torch.randn(3, 1024, generator=g) * 0.05, "fc.bias": torch.zeros(3)},
               tmp_path / "cls2.pth")
    cache = str(tmp_path / "cache")
    _run(project, tmp_path, "warm", "--gzsd", "--cache", cache)
    capsys.readouterr()
    extra = ["--set", "detector.score_thresh=0.2", "--set", "detector.nms_thresh=0.3"]
    plain = _run(project, tmp_path, "plain", "--gzsd", *extra, cls=str(tmp_path / "cls2.pth"))
    monkeypatch.setattr(cache_mod, "box_inputs", _no_detector)
    cached = _run(project, tmp_path, "cached", "--gzsd", "--cache", cache, *extra, cls=str(tmp_path / "cls2.pth"))
    assert "cache: 4 of 4 images" in capsys.readouterr().out
    assert plain == cached and all(d["score"] > 0.2 for d in cached)


def test_other_checkpoint_or_detector_config_is_recomputed(project, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    _run(project, tmp_path, "a", "--zsd", "--cache", cache)
    state = torch.load(project / "det.pth", weights_only=True)
    state["model"]["roi_heads.box_head.fc6.bias"] += 0.01
    torch.save(state, tmp_path / "det2.pth")
    out = tmp_path / "b.json"
    assert main(["test", "--config", str(project / "tiny.yaml"), "--checkpoint", str(tmp_path / "det2.pth"),
                 "--quiet", "--syn-weights", str(project / "cls.pth"), "--zsd", "--out", str(out),
                 "--cache", cache]) == 0
    _run(project, tmp_path, "c", "--zsd", "--cache", cache, "--set", "detector.rpn_post_nms_test=20")
    printed = capsys.readouterr().out
    assert printed.count("cache: 0 of 4 images re-scored") == 3
    assert len(os.listdir(cache)) == 3  # one folder per key


def test_float16_cache_is_consistent_and_half_size(project, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    plain = _run(project, tmp_path, "plain", "--gzsd")
    first = _run(project, tmp_path, "first", "--gzsd", "--cache", cache, "--cache-dtype", "float16")
    monkeypatch.setattr(cache_mod, "box_inputs", _no_detector)
    again = _run(project, tmp_path, "again", "--gzsd", "--cache", cache, "--cache-dtype", "float16")
    assert first == again  # the first run already scores the rounded features
    [key_dir] = os.listdir(cache)
    entry = next(p for p in os.listdir(os.path.join(cache, key_dir)) if p.endswith(".pt"))
    assert torch.load(os.path.join(cache, key_dir, entry), weights_only=True)["features"].dtype == torch.float16
    # the stated tolerance: each image's best detection keeps its class, box and score (within 1e-2)
    def best(dets):
        out = {}
        for d in dets:  # written best first per image
            out.setdefault(d["image_id"], d)
        return out

    a, b = best(plain), best(first)
    assert a.keys() == b.keys()
    for image_id, d in a.items():
        assert b[image_id]["category_id"] == d["category_id"]
        assert b[image_id]["score"] == pytest.approx(d["score"], abs=1e-2)
        assert b[image_id]["bbox"] == pytest.approx(d["bbox"], abs=0.1)


def test_damaged_entry_is_one_line_exit_2(project, tmp_path, cli_error):
    cache = tmp_path / "cache"
    _run(project, tmp_path, "a", "--seen", "--cache", str(cache))
    [key_dir] = os.listdir(cache)
    entry = next(p for p in os.listdir(cache / key_dir) if p.endswith(".pt"))
    (cache / key_dir / entry).write_bytes(b"not a torch file")
    err = cli_error(cli_args(project, "--seen", "--out", str(tmp_path / "b.json"), "--cache", str(cache)))
    assert entry in err and "unreadable cache entry" in err and "delete it to recompute" in err


def test_two_processes_fill_the_cache_one_process_reuses_it(project, tmp_path, capsys):
    """tools/dist_test.sh, 2 gloo processes: rank 0 alone writes and reports, the detections and
    ground truth are one process's (without a cache), and one process re-scores the cache the
    two filled to the same detections."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, PORT=str(_free_port()),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cache = str(tmp_path / "cache")
    common = ["--syn-weights", str(project / "cls.pth"), "--gzsd"]
    two = [os.path.join(ROOT, "tools", "dist_test.sh"), str(project / "tiny.yaml"), str(project / "det.pth"), "2",
           *common, "--cache", cache, "--quiet", "--out", str(tmp_path / "two.json")]
    done = subprocess.run(two, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("test: gzsd: 4 images") == 1  # rank 0 alone writes and reports
    assert "cache: 0 of 4 images re-scored" in done.stdout
    assert main(cli_args(project, *common, "--quiet", "--out", str(tmp_path / "alone.json"))) == 0  # one thread, like OMP=1
    assert main(cli_args(project, *common, "--cache", cache, "--out", str(tmp_path / "one.json"))) == 0
    assert "cache: 4 of 4 images re-scored" in capsys.readouterr().out
    alone = _read(tmp_path / "alone.json")
    assert len(alone) > 0
    for other in ("two", "one"):
        dets = _read(tmp_path / f"{other}.json")
        assert [(d["image_id"], d["category_id"]) for d in dets] == [(d["image_id"], d["category_id"]) for d in alone]
        np.testing.assert_allclose([d["bbox"] + [d["score"]] for d in dets], [d["bbox"] + [d["score"]] for d in alone],
                                   rtol=0, atol=1e-4)
        assert _read(tmp_path / f"{other}.gt.json") == _read(tmp_path / "alone.gt.json")
