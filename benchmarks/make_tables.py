"""One source for every number: the result tables of README.md and docs/results.md, generated
from the metrics files under docs/results/.

A table lives between two markers in a Markdown file::

    <!-- table:demo -->
    ...generated, never edited by hand...
    <!-- /table -->

and ``NAME`` picks a function of :data:`TABLES`. Each function reads the JSON files of its
family (``docs/results/demo_seed*.json`` for ``demo``, see :data:`FAMILIES`) and returns the
Markdown table; with no file yet it returns a one-line placeholder that says how to add one.

Usage (from the repository root)::

    python benchmarks/make_tables.py                 # rewrite the tables in place
    python benchmarks/make_tables.py --check         # exit 1 when a table differs from its files
    python benchmarks/make_tables.py --add demo_out/metrics.json --name demo_seed0 \\
        --note "2-core AMD EPYC, torch 2.14.1, CPU"  # store a run's metrics (needed fields only)

The stored files keep what the tables read from a ``vldus demo`` ``metrics.json``
(docs/formats.md): ``method``, ``ablation`` rows, the ``zsd`` / ``gzsd`` / ``gzsd_published``
group and HM figures (no per-class entries), ``timings_s``, the CLIP's zero-shot accuracy,
plus ``note`` and ``seed``.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import re
import statistics
import sys
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("docs", "results")
DOCS = ("README.md", os.path.join("docs", "results.md"))
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

# Which stored files each table reads: glob patterns under docs/results/, one file per run.
FAMILIES = {
    "demo": "demo_seed*.json",          # vldus demo --seed N (default size)
    "heldout": "heldout_seed*.json",    # the same on seeds no choice was made on (checks the choices)
    "ablation": "ablation_seed*.json",  # vldus demo --ablation --seed N
    "quick": "quick_*.json",            # vldus demo --quick (any machine / kernel set)
    "kernels": "kernels_*.json",        # vldus demo (default size) with another kernel set
    "scorings": "scorings_seed*.json",  # benchmarks/gzsd_scorings.py on a finished demo
    "heldout-scorings": "heldout_scorings_seed*.json",  # the same on a held-out seed's demo
    "real": "real_*.json",              # benchmarks/real_photos.py: vldus prepare + vldus run on photographs
    "unseen-sets": "unseen_sets_seed*.json",  # benchmarks/unseen_sets.py: the demo on six unseen sets
}


# --------------------------------------------------------------------------------------------
# Stored files
# --------------------------------------------------------------------------------------------
def reduce_metrics(m: dict, seed: Optional[int], note: str) -> dict:
    """The fields of a demo ``metrics.json`` the tables read (per-class entries dropped)."""
    def groups(setting: Optional[dict]) -> Optional[dict]:
        if setting is None:
            return None
        keep = {k: setting[k] for k in ("setting", "protocol", "iou_thresholds", "groups", "hm",
                                        "scoring", "threshold") if k in setting}
        return keep

    clip = m.get("clip") or {}
    return {"note": note, "seed": seed, "method": m.get("method"), "precision": m.get("precision"),
            "ablation": {name: {k: v for k, v in row.items() if k != "distill"}
                         for name, row in (m.get("ablation") or {}).items()},
            "zsd": groups(m.get("zsd")), "gzsd": groups(m.get("gzsd")),
            "gzsd_published": groups(m.get("gzsd_published")),
            "timings_s": m.get("timings_s") or {}, "total_s": m.get("total_s"),
            "concurrent_stages": concurrent_stages(m),
            "clip": {"source": clip.get("source"), "zero_shot_accuracy": clip.get("zero_shot_accuracy")},
            **({"dataset": m["dataset"]} if m.get("dataset") else {}),
            **({"detector": {k: v for k, v in m["detector"].items() if k in ("val_seen_map50", "per_epoch")}}
               if m.get("detector") else {})}


def concurrent_stages(m: dict) -> dict[str, str]:
    """{stage run in a child process: the stage it ran beside} (runs before that record was a
    mapping list only train-clip, beside train-detector)."""
    stages = m.get("concurrent_stages") or {}
    return stages if isinstance(stages, dict) else {s: "train-detector" for s in stages}


def load_family(root: str, family: str) -> list[dict]:
    """The stored runs of ``family``, sorted by seed then file name."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, RESULTS, FAMILIES[family]))):
        with open(path) as f:
            run = json.load(f)
        run["file"] = os.path.relpath(path, root)
        runs.append(run)
    return sorted(runs, key=lambda r: (r.get("seed") is None, r.get("seed") or 0, r["file"]))


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------
def fmt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.1f}"


def fmt2(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


def mean_sd(values: list[Optional[float]], digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def placeholder(family: str) -> str:
    return (f"_No metrics file yet: store a run with `python benchmarks/make_tables.py --add "
            f"RUN/metrics.json --name {FAMILIES[family].replace('*', 'N')[:-5]}`, then run "
            f"`python benchmarks/make_tables.py`._\n")


def sources(runs: list[dict]) -> str:
    notes = sorted({r.get("note") or "" for r in runs} - {""})
    files = ", ".join(f"`{f}`" for f in dict.fromkeys(r["file"] for r in runs))
    return f"\nFrom {files}" + (f" ({'; '.join(notes)})" if notes else "") + ".\n"


def row_values(runs: list[dict], name: str, key: str) -> list[Optional[float]]:
    return [(r["ablation"].get(name) or {}).get(key) for r in runs]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def seeds_table(runs: list[dict], keys: list[tuple[str, str]]) -> str:
    """One row per demo variant: per-seed values and mean ± sd of each ``(key, title)``."""
    seeds = " / ".join(str(r.get("seed")) for r in runs)
    header = ["variant"]
    for _, title in keys:
        header += [f"{title} (seeds {seeds})", "mean ± sd"] if len(runs) > 1 else [title]
    names = list(dict.fromkeys(n for r in runs for n in r["ablation"]))
    rows = []
    for name in names:
        label = f"`{name}`" + (" (**main result**)" if name == runs[0].get("method") else "")
        row = [label]
        for key, _ in keys:
            vals = row_values(runs, name, key)
            row += [" / ".join(fmt(v) for v in vals), mean_sd(vals)] if len(runs) > 1 else [fmt(vals[0])]
        rows.append(row)
    return table(header, rows) + sources(runs)


def family_seeds_table(root: str, family: str) -> str:
    """ZSD mAP and GZSD HM (both scorings) at IoU 0.5 of every row of ``family``'s runs, per seed
    and mean."""
    runs = load_family(root, family)
    if not runs:
        return placeholder(family)
    return seeds_table(runs, [("zsd_map", "ZSD mAP"), ("gzsd_hm", "GZSD HM"),
                              ("gzsd_published_hm", "GZSD HM, published scoring")])


def demo_table(root: str) -> str:
    """README headline: the default demo's rows, per seed and mean."""
    return family_seeds_table(root, "demo")


def heldout_table(root: str) -> str:
    """The default demo on seeds that no setting or scoring was chosen on."""
    return family_seeds_table(root, "heldout")


def demo_main_table(root: str) -> str:
    """The main row per seed: mAP and Recall@100 at each IoU, ZSD and GZSD."""
    runs = load_family(root, "demo")
    if not runs:
        return placeholder("demo")
    rows = []
    for r in runs:
        parts = [("ZSD", "unseen", r["zsd"]["groups"]["unseen"])]
        if r.get("gzsd"):
            parts += [("GZSD", g, r["gzsd"]["groups"][g]) for g in ("seen", "unseen")]
            parts += [("GZSD", "HM", r["gzsd"]["hm"])]
        for setting, group, m in parts:
            ious = sorted(m["map"], key=float)
            rows.append([str(r.get("seed")), setting, group, " / ".join(fmt(m["map"][i]) for i in ious),
                         " / ".join(fmt(m["recall"][i]) for i in ious)])
    ious = " / ".join(sorted(runs[0]["zsd"]["groups"]["unseen"]["map"], key=float))
    return table(["seed", "setting", "group", f"mAP (IoU {ious})", f"Recall@100 (IoU {ious})"], rows) + sources(runs)


def run_seconds(run: dict) -> float:
    """The run's wall time: ``total_s`` (older files: the sum of the stage times, which ran in turn)."""
    return run["total_s"] if run.get("total_s") is not None else sum(run["timings_s"].values())


def timings_table(root: str) -> str:
    """Seconds per demo stage, per seed, and the total (wall time; a stage that ran in a child
    process is marked with the stage it ran beside)."""
    runs = load_family(root, "demo")
    if not runs:
        return placeholder("demo")
    stages = list(dict.fromkeys(s for r in runs for s in r["timings_s"]))
    beside = {s: other for r in runs for s, other in concurrent_stages(r).items()}
    rows = [[s + (f" (alongside {beside[s]})" if s in beside else "")] + [fmt(r["timings_s"].get(s)) for r in runs]
            for s in stages]
    rows.append(["**total**"] + [f"**{run_seconds(r):.0f}**" for r in runs])
    return table(["stage (s)"] + [f"seed {r.get('seed')}" for r in runs], rows) + sources(runs)


def clip_table(root: str) -> str:
    """Zero-shot accuracy (%) of each run's CLIP on held-out crops."""
    runs = load_family(root, "demo")
    if not runs:
        return placeholder("demo")
    rows = []
    for r in runs:
        acc = (r.get("clip") or {}).get("zero_shot_accuracy") or {}
        rows.append([str(r.get("seed")), (r.get("clip") or {}).get("source") or "–", fmt(acc.get("all")),
                     fmt(acc.get("unseen")), fmt(acc.get("unseen_among_unseen"))])
    return table(["seed", "CLIP", "all classes", "unseen (among all)", "unseen (among unseen)"], rows) + sources(runs)


def breakdown_table(root: str) -> str:
    """Per demo row: ZSD mAP@0.5 gained if every error of a kind were fixed (mean over seeds), and
    how many such false positives ranked before the row's last true positive (mean)."""
    runs = load_family(root, "demo")
    if not runs:
        return placeholder("demo")
    names = list(dict.fromkeys(n for r in runs for n, row in r["ablation"].items() if row.get("zsd_breakdown")))
    if not names:
        return "_No row of the stored runs has a ZSD error breakdown._\n"
    kinds = list(dict.fromkeys(k for r in runs for n in names
                               for k in (r["ablation"].get(n, {}).get("zsd_breakdown") or {}).get("kinds", {})))
    rows = []
    for name in names:
        parts = [(r["ablation"].get(name) or {}).get("zsd_breakdown") for r in runs]
        parts = [p for p in parts if p]
        cells = []
        for kind in kinds:
            gains = [p["kinds"][kind]["map_gain"]["unseen"] for p in parts if kind in p["kinds"]]
            before = [p["kinds"][kind]["before_last_tp"] for p in parts
                      if kind in p["kinds"] and p["kinds"][kind]["before_last_tp"] is not None]
            gain = f"{statistics.mean(gains):+.1f}".replace("-0.0", "+0.0")  # a gain is never negative
            cells.append(gain + (f" ({statistics.mean(before):.0f})" if before else ""))
        rows.append([f"`{name}`"] + cells)
    return table(["variant"] + [f"`{k}`" for k in kinds], rows) + sources(runs)


def ablation_table(root: str) -> str:
    """`vldus demo --ablation`: every row's ZSD mAP and GZSD HM (both scorings) at IoU 0.5."""
    return family_seeds_table(root, "ablation")


def quick_table(root: str) -> str:
    """`vldus demo --quick` runs (one per file, labelled by its note)."""
    runs = load_family(root, "quick")
    return runs_table(runs) if runs else placeholder("quick")


def kernels_table(root: str) -> str:
    """The default demo with another torch kernel set (one run per file), after the stored
    default-kernel run of the same seed."""
    runs = load_family(root, "kernels")
    if not runs:
        return placeholder("kernels")
    seeds = {r.get("seed") for r in runs}
    return runs_table([r for r in load_family(root, "demo") if r.get("seed") in seeds] + runs)


def scorings_table(root: str, family: str = "scorings") -> str:
    """ZSD mAP and GZSD seen / unseen mAP and HM at IoU 0.5 of each synthesis row under each
    scoring, per seed and mean (files written by benchmarks/gzsd_scorings.py; ZSD has no joint
    scoring)."""
    runs = load_family(root, family)
    if not runs:
        return ("_No file yet: `python benchmarks/gzsd_scorings.py DEMO_OUT --out "
                f"docs/results/{FAMILIES[family].replace('*', 'N')}`, then `python benchmarks/make_tables.py`._\n")
    seeds = " / ".join(str(r.get("seed")) for r in runs)
    header = ["row", "scoring", f"ZSD (seeds {seeds})", "mean ± sd", f"GZSD seen (seeds {seeds})", "mean ± sd",
              f"GZSD unseen (seeds {seeds})", "mean ± sd", f"GZSD HM (seeds {seeds})", "mean ± sd"]
    rows = []
    for name in dict.fromkeys(n for r in runs for n in r["rows"]):
        for scoring in dict.fromkeys(s for r in runs for s in r["rows"].get(name, {})):
            row = [f"`{name}`", scoring]
            for part, key in (("zsd", "map"), ("rows", "seen"), ("rows", "unseen"), ("rows", "hm")):
                vals = [(((r.get(part) or {}).get(name) or {}).get(scoring) or {}).get(key) for r in runs]
                row += [" / ".join(fmt(v) for v in vals), mean_sd(vals)]
            rows.append(row)
    return table(header, rows) + sources(runs)


def heldout_scorings_table(root: str) -> str:
    """The scorings table of the held-out seeds' demos."""
    return scorings_table(root, "heldout-scorings")


def runs_table(runs: list[dict]) -> str:
    """One row per run (labelled by its note): ZSD mAP of every row that ran, the main row's
    GZSD HM and the wall time."""
    names = list(dict.fromkeys(n for r in runs for n, row in r["ablation"].items() if row.get("status") == "ok"))
    header = ["run", "seed"] + [f"ZSD `{n}`" for n in names] + ["GZSD HM (main)", "time (s)"]
    rows = []
    for r in runs:
        main = r["ablation"].get(r.get("method")) or {}
        rows.append([r.get("note") or r["file"], str(r.get("seed"))] + [fmt(v) for v in
                    (row_values([r], n, "zsd_map")[0] for n in names)] +
                    [fmt(main.get("gzsd_hm")), f"{run_seconds(r):.0f}"])
    return table(header, rows) + sources(runs)


def real_runs(root: str) -> list[dict]:
    """The stored real-photo runs, by dataset, then fixed defaults before selection, then seed."""
    return sorted(load_family(root, "real"), key=lambda r: (r["dataset"]["name"], selected(r), r.get("seed") or 0))


def selected(run: dict) -> bool:
    """Whether a run chose its synthesizers' settings on pseudo-unseen validation."""
    return any((a.get("selection") or {}).get("chosen") for a in run["ablation"].values())


def settings_label(run: dict) -> str:
    return "selected" if selected(run) else "fixed"


def real_table(root: str) -> str:
    """Per real-photo run and row: ZSD mAP and Recall@100 at each IoU, GZSD seen / unseen / HM
    mAP@0.5, the detector's validation seen mAP@0.5 and the run's minutes."""
    runs = real_runs(root)
    if not runs:
        return placeholder("real")
    ious = sorted(next(iter(r["zsd"]["groups"]["unseen"]["map"] for r in runs)), key=float)
    header = ["dataset", "unseen", "seed", "settings", "det. val seen mAP", "row", f"ZSD mAP ({' / '.join(ious)})",
              f"ZSD Recall@100 ({' / '.join(ious)})", "GZSD seen / unseen / HM", "run (min)"]
    rows = []
    for r in runs:
        d = r["dataset"]
        for name, a in r["ablation"].items():
            if a.get("status") != "ok":
                continue
            z = a["by_iou"]["zsd"]
            rows.append([d["name"], ", ".join(d["prepare"]["unseen"]), str(r.get("seed")), settings_label(r),
                         fmt((r.get("detector") or {}).get("val_seen_map50")),
                         f"`{name}`" + (" (main)" if name == r.get("method") else ""),
                         " / ".join(fmt(z["map"][i]) for i in ious), " / ".join(fmt(z["recall"][i]) for i in ious),
                         " / ".join(fmt(a.get(k)) for k in ("gzsd_seen", "gzsd_unseen", "gzsd_hm")),
                         f"{d['run_s'] / 60:.0f}"])
    return table(header, rows) + sources(runs)


def real_summary_table(root: str) -> str:
    """README: per real-photo dataset and row, ZSD mAP@0.5 and GZSD HM, mean over the stored seeds,
    with the fixed defaults and (where stored) with pseudo-unseen selection."""
    runs = real_runs(root)
    if not runs:
        return placeholder("real")
    rows = []
    for dataset in dict.fromkeys(r["dataset"]["name"] for r in runs):
        mine = [r for r in runs if r["dataset"]["name"] == dataset]
        fixed = [r for r in mine if not selected(r)]
        chosen = [r for r in mine if selected(r)]
        seeds = " / ".join(str(r.get("seed")) for r in fixed)
        names = list(dict.fromkeys(n for r in mine for n, a in r["ablation"].items() if a.get("status") == "ok"))
        for name in names:
            rows.append([dataset, ", ".join(mine[0]["dataset"]["prepare"]["unseen"]), seeds, f"`{name}`",
                         mean_sd(row_values(fixed, name, "zsd_map")), mean_sd(row_values(fixed, name, "gzsd_hm")),
                         mean_sd(row_values(chosen, name, "zsd_map")), mean_sd(row_values(chosen, name, "gzsd_hm")),
                         mean_sd([(r.get("detector") or {}).get("val_seen_map50") for r in fixed or mine])])
    return table(["dataset", "unseen", "seeds", "row", "ZSD mAP@0.5", "GZSD HM@0.5", "ZSD, `--select`",
                  "HM, `--select`", "det. val seen mAP@0.5"], rows) + sources(runs)


def unseen_sets_runs(root: str) -> list[dict]:
    """The sets of the stored unseen-sets file(s), in the benchmark's order."""
    return [dict(s, file=r["file"], note=r.get("note")) for r in load_family(root, "unseen-sets") for s in r["sets"]]


def unseen_sets_table(root: str) -> str:
    """Per unseen set: synthesis_vldus ZSD mAP@0.5 and GZSD HM@0.5 with the fixed defaults and
    with pseudo-unseen selection, what was chosen, and the mean over the sets."""
    sets = unseen_sets_runs(root)
    if not sets:
        return placeholder("unseen-sets")
    rows = []
    for s in sets:
        c = s["chosen"]
        rows.append([s["set"], ", ".join(s["unseen"]), fmt(s["without_selection"]["zsd_map"]),
                     fmt(s["with_selection"]["zsd_map"]), fmt(s["without_selection"]["gzsd_hm"]),
                     fmt(s["with_selection"]["gzsd_hm"]),
                     f"{c['gan.epochs']} / {c['unseen_classifier.syn_num']} / {c['inference.zsd_scoring']}, "
                     f"{c['inference.gzsd_scoring']}", ", ".join(s["pseudo_unseen"])])
    mean = [mean_sd([s[w][k] for s in sets]) for k in ("zsd_map", "gzsd_hm")
            for w in ("without_selection", "with_selection")]
    rows.append([f"**mean of {len(sets)}**", "", mean[0], mean[1], mean[2], mean[3], "", ""])
    return table(["set", "unseen", "ZSD fixed", "ZSD selected", "HM fixed", "HM selected",
                  "chosen: GAN epochs / syn_num / ZSD, GZSD scoring", "pseudo-unseen (held-out seen)"],
                 rows) + sources(sets)


def selection_ranking_table(root: str) -> str:
    """Per unseen set: Spearman's rank correlation between the candidates' pseudo-unseen
    validation scores and their scores on the real unseen test images, and the test score lost
    by choosing on validation instead of on test."""
    sets = unseen_sets_runs(root)
    if not sets:
        return placeholder("unseen-sets")
    rows = []
    for s in sets:
        cands = s["candidates"]
        chosen = next(c for c in cands if (c["epochs"], c["syn_num"]) ==
                      (s["chosen"]["gan.epochs"], s["chosen"]["unseen_classifier.syn_num"]))
        best = max(c["test_score"] for c in cands)
        second = s.get("second_detector") or {}
        rows.append([s["set"], str(len(cands)), fmt2(s["spearman"]), fmt2(s["spearman_zsd"]),
                     fmt2(second.get("spearman")), fmt(min(c["test_score"] for c in cands)), fmt(best),
                     fmt(chosen["test_score"]), fmt(best - chosen["test_score"]),
                     fmt(second.get("chosen_test_score"))])
    rows.append([f"**mean of {len(sets)}**", "", mean_sd([s["spearman"] for s in sets], 2),
                 mean_sd([s["spearman_zsd"] for s in sets], 2),
                 mean_sd([(s.get("second_detector") or {}).get("spearman") for s in sets], 2), "", "", "", "", ""])
    return table(["set", "candidates", "Spearman (score)", "Spearman (ZSD)", "Spearman, second detector",
                  "test score: worst", "best", "chosen", "lost to the best", "chosen on the second detector"],
                 rows) + \
        ("\nscore = mean of ZSD mAP@0.5 and GZSD HM@0.5 of the candidate's classifier (soft scoring); "
     "second detector: the fold's candidates scored on a detector trained without the pseudo-unseen "
     "classes' images (`--second-detector`; – where not run).\n")


TABLES: dict[str, Callable[[str], str]] = {
    "unseen-sets": unseen_sets_table, "selection-ranking": selection_ranking_table,
    "real": real_table, "real-summary": real_summary_table,
    "demo": demo_table, "heldout": heldout_table, "demo-main": demo_main_table, "demo-timings": timings_table,
    "demo-clip": clip_table, "demo-breakdown": breakdown_table, "ablation": ablation_table,
    "quick": quick_table, "kernels": kernels_table, "scorings": scorings_table,
    "heldout-scorings": heldout_scorings_table,
}


# --------------------------------------------------------------------------------------------
# Rewriting and checking the documents
# --------------------------------------------------------------------------------------------
def render(text: str, root: str, where: str = "") -> str:
    """``text`` with every marked table regenerated (an unknown table name is an error)."""
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"{where}: unknown table {name!r} (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[name](root) + m.group(4)

    return MARKER.sub(one, text)


def process(root: str, files: list[str], check: bool) -> list[str]:
    """Rewrite (or, with ``check``, compare) each file's tables; returns the files that differ."""
    differ = []
    for rel in files:
        path = os.path.join(root, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render(text, root, rel)
        if new != text:
            differ.append(rel)
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    return differ


def add_run(root: str, metrics: str, name: str, note: str) -> str:
    """Store the needed fields of a run's metrics.json as docs/results/NAME.json."""
    if not any(fnmatch.fnmatch(f"{name}.json", pat) for pat in FAMILIES.values()):
        raise SystemExit(f"--name {name}: matches no table family ({', '.join(FAMILIES.values())})")
    with open(metrics) as f:
        m = json.load(f)
    seed = re.search(r"seed(\d+)", name)
    out = os.path.join(root, RESULTS, f"{name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(reduce_metrics(m, int(seed.group(1)) if seed else None, note), f, indent=1)
        f.write("\n")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a table differs from its files")
    p.add_argument("--root", default=ROOT, help="repository root (default: this script's)")
    p.add_argument("--files", nargs="+", default=list(DOCS), help="Markdown files holding tables")
    p.add_argument("--add", metavar="METRICS_JSON", help="store a vldus demo metrics.json first")
    p.add_argument("--name", help="its name under docs/results/ (demo_seedN, heldout_seedN, ablation_seedN, "
                                  "quick_LABEL, kernels_LABEL)")
    p.add_argument("--note", default="", help="machine / settings of the run, shown under the tables")
    args = p.parse_args(argv)
    if args.add:
        if not args.name:
            p.error("--add needs --name")
        print(f"stored {add_run(args.root, args.add, args.name, args.note)}")
    differ = process(args.root, args.files, args.check)
    for rel in differ:
        print(f"{rel}: tables {'differ from docs/results/' if args.check else 'regenerated'}")
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
