"""`vldus demo --quick`: the whole pipeline end to end on the embedded benchmark (about 3 minutes).

This is the one slow test of the suite: it is the proof that zero-shot detection works, so it
asserts a real floor, not just that files appear.
"""
import json
import os

import pytest

from vldus import cli


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    with open(out / "metrics.json") as f:
        return out, json.load(f)


def test_quick_demo_detects_unseen_classes(quick_demo):
    _, m = quick_demo
    ablation = m["ablation"]
    assert m["zsd"]["setting"] == "zsd" and m["gzsd"]["setting"] == "gzsd"
    assert m["zsd"]["groups"]["unseen"]["map"]["0.5"] > 10
    assert ablation["no_synthesis"]["status"] == "ok" and ablation["synthesis_su"]["status"] == "ok"
    assert ablation["synthesis_su"]["zsd_map"] >= ablation["no_synthesis"]["zsd_map"]
    assert ablation["synthesis_vldus"]["status"].startswith("skipped: ")
    assert m["method"] == "synthesis_su"
    assert set(m["gzsd"]["groups"]) == {"seen", "unseen"} and "hm" in m["gzsd"]


def test_quick_demo_report_and_pictures(quick_demo):
    out, m = quick_demo
    report = (out / "report.md").read_text()
    assert "## Ablation" in report and "## ZSD" in report and "## GZSD" in report
    pictures = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![detections]")]
    assert pictures and all(os.path.isfile(out / p) for p in pictures)
    assert set(m["timings_s"]) >= {"make-shapes", "train-detector", "extract-features", "test (synthesis_su)"}
