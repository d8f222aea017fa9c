"""benchmarks/make_tables.py: the result tables in README.md and docs/results.md match the metrics
files under docs/results/, and the check catches a table that no longer does."""
import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_tables  # noqa: E402


def _group(zsd: float) -> dict:
    return {"map": {"0.4": zsd + 1, "0.5": zsd, "0.6": zsd - 9},
            "recall": {"0.4": 99.0, "0.5": 98.5, "0.6": 91.0}}


def _metrics(zsd: float, hm: float) -> dict:
    """A demo metrics.json in the layout of docs/formats.md (values made up, never published)."""
    cls = {"blue circle": {"group": "unseen", "num_gt": 3, "num_dets": 9, "ap": {"0.5": zsd}}}
    row = {"description": "d", "zsd_map": zsd, "gzsd_hm": hm, "gzsd_published_hm": hm - 1, "status": "ok"}
    return {"method": "synthesis_vldus", "precision": "fp32",
            "zsd": {"setting": "zsd", "classes": cls, "groups": {"unseen": _group(zsd)}},
            "gzsd": {"setting": "gzsd", "classes": cls, "scoring": "joint", "groups":
                     {"seen": _group(hm), "unseen": _group(zsd)}, "hm": _group(hm)},
            "gzsd_published": {"setting": "gzsd", "groups": {"seen": _group(hm), "unseen": _group(zsd)},
                               "hm": _group(hm - 1)},
            "ablation": {"no_synthesis": dict(row, zsd_map=zsd - 20),
                         "synthesis_vldus": dict(row, distill={"l_fa": 0.1})},
            "timings_s": {"train-detector": 150.0, "test": 12.5},
            "clip": {"source": "trained by vldus train-clip", "weights": "/x",
                     "zero_shot_accuracy": {"all": 96.2, "unseen": 98.0, "unseen_among_unseen": 100.0}}}


@pytest.fixture
def repo_copy(tmp_path):
    """README.md and docs/results.md copied to a temporary root, without the stored runs (the
    tests store their own, made-up ones)."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "README.md"), root / "README.md")
    shutil.copy(os.path.join(ROOT, "docs", "results.md"), root / "docs" / "results.md")
    return str(root)


def test_repo_tables_match_their_files():
    assert make_tables.main(["--check", "--root", ROOT]) == 0


def test_markers_present():
    """The headline table is generated: README and docs/results.md carry their markers."""
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "<!-- table:demo -->" in f.read()
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        text = f.read()
    for name in ("demo-main", "demo-timings", "ablation", "heldout", "heldout-scorings"):
        assert f"<!-- table:{name} -->" in text


def test_check_catches_changed_numbers(repo_copy, tmp_path):
    for seed, (zsd, hm) in enumerate([(78.04, 72.66), (74.9, 69.1)]):
        run = tmp_path / f"metrics{seed}.json"
        run.write_text(json.dumps(_metrics(zsd, hm)))
        make_tables.add_run(repo_copy, str(run), f"demo_seed{seed}", "made-up test numbers")
    assert make_tables.main(["--check", "--root", repo_copy]) == 1  # new files, stale tables
    assert make_tables.main(["--root", repo_copy]) == 0
    assert make_tables.main(["--check", "--root", repo_copy]) == 0
    readme = os.path.join(repo_copy, "README.md")
    with open(readme) as f:
        text = f.read()
    assert "| 78.0 / 74.9 | 76.5 ± 2.2 |" in text  # per-seed values and mean ± sd of the main row

    with open(readme, "w") as f:  # a hand-edited number
        f.write(text.replace("78.0 / 74.9", "78.1 / 74.9", 1))
    assert make_tables.main(["--check", "--root", repo_copy]) == 1
    make_tables.main(["--root", repo_copy])
    assert make_tables.main(["--check", "--root", repo_copy]) == 0

    stored = os.path.join(repo_copy, "docs", "results", "demo_seed1.json")
    with open(stored) as f:  # a metrics file that changed under the tables
        m = json.load(f)
    m["ablation"]["synthesis_vldus"]["zsd_map"] = 80.0
    with open(stored, "w") as f:
        json.dump(m, f)
    assert make_tables.main(["--check", "--root", repo_copy]) == 1


def test_stored_file_keeps_only_what_tables_read(tmp_path):
    run = tmp_path / "metrics.json"
    run.write_text(json.dumps(_metrics(78.0, 72.7)))
    out = make_tables.add_run(str(tmp_path), str(run), "demo_seed3", "note")
    with open(out) as f:
        stored = json.load(f)
    assert stored["seed"] == 3 and stored["note"] == "note"
    assert "classes" not in stored["zsd"] and "distill" not in stored["ablation"]["synthesis_vldus"]
    assert stored["gzsd"]["scoring"] == "joint" and stored["gzsd"]["hm"]["map"]["0.5"] == 72.7
    with pytest.raises(SystemExit):
        make_tables.add_run(str(tmp_path), str(run), "not_a_family", "")


def test_breakdown_table_means_the_gains_over_seeds(tmp_path):
    root = tmp_path / "repo"
    for seed, (gain, before) in enumerate([(10.0, 100), (13.0, 120)]):
        m = _metrics(78.0, 72.7)
        m["ablation"]["synthesis_vldus"]["zsd_breakdown"] = {"kinds": {
            "cls_seen": {"count": 500, "before_last_tp": before, "map_gain": {"unseen": gain}},
            "missed": {"count": 0, "before_last_tp": None, "map_gain": {"unseen": 0.0}}}}
        run = tmp_path / f"m{seed}.json"
        run.write_text(json.dumps(m))
        make_tables.add_run(str(root), str(run), f"demo_seed{seed}", "made-up")
    text = make_tables.breakdown_table(str(root))
    assert "| `synthesis_vldus` | +11.5 (110) | +0.0 |" in text  # rows without a breakdown are left out
    assert "no_synthesis" not in text


def test_scorings_table_one_line_per_row_and_scoring(tmp_path):
    """docs/results/scorings_seed*.json (benchmarks/gzsd_scorings.py): per seed and mean, in the
    order of the files' rows and scorings; ZSD where the scoring exists for it."""
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    for seed, seen in ((0, 70.0), (1, 80.0)):
        rows = {"synthesis_vldus": {s: {"seen": seen + k, "unseen": 90.0, "hm": seen + k + 5, "threshold": None,
                                        "slope": None} for k, s in enumerate(("soft", "joint", "published"))}}
        zsd = {"synthesis_vldus": {"soft": {"map": 91.0 + seed}, "published": {"map": 85.0 + seed}}}
        (results / f"scorings_seed{seed}.json").write_text(json.dumps({"note": "made-up", "seed": seed, "rows": rows,
                                                                       "zsd": zsd}))
    text = make_tables.scorings_table(str(tmp_path))
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert lines == [
        "| `synthesis_vldus` | soft | 91.0 / 92.0 | 91.5 ± 0.7 | 70.0 / 80.0 | 75.0 ± 7.1 | 90.0 / 90.0 | 90.0 ± 0.0 | 75.0 / 85.0 | 80.0 ± 7.1 |",
        "| `synthesis_vldus` | joint | – / – | – | 71.0 / 81.0 | 76.0 ± 7.1 | 90.0 / 90.0 | 90.0 ± 0.0 | 76.0 / 86.0 | 81.0 ± 7.1 |",
        "| `synthesis_vldus` | published | 85.0 / 86.0 | 85.5 ± 0.7 | 72.0 / 82.0 | 77.0 ± 7.1 | 90.0 / 90.0 | 90.0 ± 0.0 | 77.0 / 87.0 | 82.0 ± 7.1 |"]
    assert "(seeds 0 / 1)" in text and "`docs/results/scorings_seed0.json`" in text and "(made-up)" in text
