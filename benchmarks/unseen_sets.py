"""Results over unseen sets, not one: the demo on the default unseen set and on five others, with
pseudo-unseen selection, and whether the selection ranks candidates as the real unseen classes do.

The five other sets were drawn once, before any of them was run, with
``numpy.random.default_rng(20261208)``: four of the 16 classes in category order, redrawn until
:func:`vldus.data.shapes.check_unseen` accepts them and they differ from the default and from
each other (:data:`SETS`).

Per set: ``vldus demo --seed 0 --unseen ... --select`` (selection on: each synthesis row's schedule and
scoring chosen on held-out seen classes); then, for the main row, the same candidates trained on
the real split and tested on the real unseen test images (:func:`vldus.synthesis.select.
evaluate_candidates`, for this report only: nothing the demo chose saw them). From those: the
Spearman rank correlation of the candidates' validation scores with their test scores, and the
main row without selection (the default candidate, the same computation as ``--no-select``).
``--store`` writes docs/results/unseen_sets_seed0.json for ``benchmarks/make_tables.py``.

    python benchmarks/unseen_sets.py --out runs/unseen_sets [--sets default,set1] [--store]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SET_SEED = 20261208
SETS = {
    "default": ("blue circle", "red square", "yellow triangle", "green star"),
    "set1": ("green square", "yellow square", "red star", "green star"),
    "set2": ("blue circle", "red triangle", "blue star", "yellow star"),
    "set3": ("red square", "blue square", "yellow square", "yellow triangle"),
    "set4": ("blue circle", "yellow square", "yellow triangle", "blue star"),
    "set5": ("red circle", "red square", "green triangle", "blue triangle"),
}
MAIN = "synthesis_vldus"


def draw_sets(n: int = 5, seed: int = SET_SEED) -> list[tuple[str, ...]]:
    """The draw that gave :data:`SETS` (kept to show it; the test suite checks they agree)."""
    from vldus.data.shapes import CLASSES, DEFAULT_UNSEEN, check_unseen
    from vldus.errors import InputError

    rng, sets = np.random.default_rng(seed), []
    while len(sets) < n:
        pick = tuple(CLASSES[i] for i in sorted(rng.choice(len(CLASSES), 4, replace=False)))
        try:
            canon = check_unseen(pick)
        except InputError:
            continue
        if set(canon) != set(DEFAULT_UNSEEN) and canon not in sets:
            sets.append(canon)
    return sets


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties: the mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def run_demo(out: str, unseen: tuple[str, ...]) -> float:
    exe = os.path.join(os.path.dirname(sys.executable), "vldus")
    start = time.perf_counter()
    argv = [exe, "demo", "--out", out, "--seed", "0", "--unseen", ",".join(unseen), "--select", "--quiet"]
    print("$ " + " ".join(argv[1:]), flush=True)
    with open(out + ".log", "w") as log:
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"unseen_sets: vldus demo failed (exit {rc}; {out}.log)")
    return time.perf_counter() - start


def test_candidates(out: str, row: str = MAIN) -> list[dict]:
    """The row's candidates trained on the real split and scored on the real test images."""
    import torch

    from vldus.synthesis.pipeline import SynthesisOptions
    from vldus.synthesis.select import Candidate, evaluate_candidates

    cfg, meta, selection = row_config(out, row, f"test_candidates_{row}")
    cand_dir = os.path.join(out, "work", f"test_candidates_{row}")
    torch.set_num_threads(1)  # as the demo's synthesizers train, two at a time on two cores
    options = SynthesisOptions(device="cpu", quiet=True, features_dir=cfg.path("features"),
                               detector_checkpoint=meta["detector_checkpoint"], out_dir=cand_dir,
                               compat_classifier=meta["compat_classifier"], plots=False)
    cands = [Candidate(c["epochs"], c["syn_num"]) for c in selection["candidates"]]
    return evaluate_candidates(cfg, options, cand_dir, meta["detector_checkpoint"], cfg.path("features"),
                               cands, cache=cfg.path("test_cache"))


def row_config(out: str, row: str, folder: str):
    """(the row's config with the fixed defaults put back, its meta.json, its selection.json),
    the config written to OUT/work/FOLDER/config.yaml."""
    import yaml

    from vldus.config import load_config

    synth = os.path.join(out, "work", f"synth_{row}")
    with open(os.path.join(synth, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(synth, "selection.json")) as f:
        selection = json.load(f)
    conf = meta["config"]
    conf["gan"]["epochs"] = selection["default"]["gan.epochs"]
    conf["unseen_classifier"]["syn_num"] = selection["default"]["unseen_classifier.syn_num"]
    conf["unseen_classifier"]["selection"] = "last"
    os.makedirs(os.path.join(out, "work", folder), exist_ok=True)
    path = os.path.join(out, "work", folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(conf, f)
    return load_config(path), meta, selection


def second_detector(out: str, row: str = MAIN) -> dict:
    """The same fold, but a detector trained without the pseudo-unseen classes' images (as the
    real unseen ones are kept out), its own features and compatibility classifier: the
    candidates' validation scores on it (OUT/work/fold_second_detector)."""
    import torch

    from vldus.config import save_config
    from vldus.synthesis.pipeline import SynthesisOptions
    from vldus.synthesis.select import Candidate, build_fold, evaluate_candidates

    cfg, meta, selection = row_config(out, row, "fold_second_detector")
    work = os.path.join(out, "work", "fold_second_detector")
    fold = build_fold(cfg, meta["detector_checkpoint"], cfg.path("features"), os.path.join(work, "fold"), "cpu", True)
    assert fold.pseudo_unseen == selection["pseudo_unseen"]
    fcfg = fold.cfg
    fcfg.work_dir = work
    fcfg.gan.detector_checkpoint = None
    path = os.path.join(work, "fold_config.yaml")
    save_config(fcfg, path)
    exe = os.path.join(os.path.dirname(sys.executable), "vldus")
    start = time.perf_counter()
    from vldus.detection.train import latest_checkpoint
    from vldus.synthesis.data import feature_file_paths

    if not os.path.isfile(os.path.join(work, "detector", "metrics.json")):  # a finished training writes it
        if subprocess.run([exe, "train-detector", "--config", path, "--validate", "--quiet"]).returncode:
            # no validation image without a pseudo-unseen object (tiny runs): train without
            subprocess.run([exe, "train-detector", "--config", path, "--quiet"], check=True)
    ckpt = latest_checkpoint(os.path.join(work, "detector"))
    for data_split in ("train", "val"):
        if not os.path.isfile(feature_file_paths(fcfg.path("features"), data_split, fcfg.features.fg_iou,
                                                 fcfg.features.bg_iou)[1]):
            subprocess.run([exe, "extract-features", "--config", path, "--checkpoint", ckpt, "--classes", "seen",
                            "--data-split", data_split, "--quiet"], check=True)
    if not os.path.isfile(fcfg.path("synth", "compat_classifier.pth")):
        subprocess.run([exe, "train-unseen-classifier", "--config", path, "--quiet"], check=True)
    detector_s = time.perf_counter() - start
    fcfg.gan.detector_checkpoint = ckpt
    torch.set_num_threads(1)
    options = SynthesisOptions(device="cpu", quiet=True, features_dir=fcfg.path("features"), detector_checkpoint=ckpt,
                               out_dir=os.path.join(work, "candidates"),
                               compat_classifier=fcfg.path("synth", "compat_classifier.pth"), plots=False)
    cands = [Candidate(c["epochs"], c["syn_num"]) for c in selection["candidates"]]
    rows = evaluate_candidates(fcfg, options, options.out_dir, ckpt, fcfg.path("features"), cands,
                               cache=os.path.join(work, "test_cache"))
    from vldus.runner import detector_validation

    return {"candidates": rows, "detector_s": detector_s, "seconds": time.perf_counter() - start,
            "detector_val_seen_map50": detector_validation(os.path.join(work, "detector")).get("val_seen_map50"),
            "train_images": "the training images without a pseudo-unseen object"}


def summarize(name: str, out: str, seconds: float | None, tested: list[dict]) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    row = m["ablation"][MAIN]
    sel = row["selection"]
    val = sel["candidates"]
    default = next(t for t in tested if (t["epochs"], t["syn_num"]) ==
                   (sel["default"]["gan.epochs"], sel["default"]["unseen_classifier.syn_num"]))
    best_test = max(tested, key=lambda t: t["score"])
    return {"set": name, "unseen": list(SETS[name]), "pseudo_unseen": sel["pseudo_unseen"],
            "chosen": sel["chosen"], "default": sel["default"],
            "with_selection": {"zsd_map": row["zsd_map"], "gzsd_hm": row["gzsd_hm"],
                               "gzsd_seen": row["gzsd_seen"], "gzsd_unseen": row["gzsd_unseen"]},
            "without_selection": {k: default[k] for k in ("zsd_map", "gzsd_hm", "gzsd_seen", "gzsd_unseen")},
            "best_candidate_on_test": {k: best_test[k] for k in ("epochs", "syn_num", "zsd_map", "gzsd_hm")},
            "candidates": [{"epochs": v["epochs"], "syn_num": v["syn_num"], "val_score": v["score"],
                            "val_zsd": v["zsd_map"], "val_hm": v["gzsd_hm"], "test_score": t["score"],
                            "test_zsd": t["zsd_map"], "test_hm": t["gzsd_hm"]} for v, t in zip(val, tested)],
            "spearman": spearman([v["score"] for v in val], [t["score"] for t in tested]),
            "spearman_zsd": spearman([v["zsd_map"] for v in val], [t["zsd_map"] for t in tested]),
            "rows": {n: {"zsd_map": a.get("zsd_map"), "gzsd_hm": a.get("gzsd_hm")}
                     for n, a in m["ablation"].items() if a.get("status") == "ok"},
            "demo_s": seconds if seconds is not None else m.get("total_s")}


def second_detector_summary(out: str, summary: dict) -> dict:
    """{"second_detector": its Spearman against the test scores, its validation seen mAP ...}
    where OUT/second_detector.json exists, else {}."""
    path = os.path.join(out, "second_detector.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        sd = json.load(f)
    val = [c["score"] for c in sd["candidates"]]
    test = [c["test_score"] for c in summary["candidates"]]
    from vldus.synthesis.select import best

    rows = [dict(c, test_score=t) for c, t in zip(sd["candidates"], test)]
    default = next(r for r in rows if (r["epochs"], r["syn_num"]) ==
                   (summary["default"]["gan.epochs"], summary["default"]["unseen_classifier.syn_num"]))
    chosen = best(rows, lambda r: r["score"], default)
    return {"second_detector": {"spearman": spearman(val, test), "val_scores": val,
                                "chosen": {"epochs": chosen["epochs"], "syn_num": chosen["syn_num"]},
                                "chosen_test_score": chosen["test_score"], "detector_val_seen_map50": sd["detector_val_seen_map50"],
                                "seconds": sd["seconds"]}}


def run_set(name: str, out: str, done: str) -> None:
    """The demo on one set (unless OUT/SET/metrics.json exists), its candidates on the test
    images, OUT/SET/unseen_set.json."""
    seconds = None if os.path.isfile(os.path.join(out, "metrics.json")) else run_demo(out, SETS[name])
    start = time.perf_counter()
    tested = test_candidates(out)
    summary = summarize(name, out, seconds, tested)
    summary["test_candidates_s"] = time.perf_counter() - start
    with open(done, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{name}: ZSD {summary['with_selection']['zsd_map']:.1f} (fixed {summary['without_selection']['zsd_map']:.1f}), "
          f"HM {summary['with_selection']['gzsd_hm']:.1f} (fixed {summary['without_selection']['gzsd_hm']:.1f}), "
          f"Spearman {summary['spearman']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--sets", default=",".join(SETS), help="sets to run (default: %(default)s)")
    p.add_argument("--store", action="store_true", help="write docs/results/unseen_sets_seed0.json from "
                                                        "every finished set under --out")
    p.add_argument("--note", default="", help="machine and anything else for the stored file's note")
    p.add_argument("--second-detector", action="store_true",
                   help="also score the fold's candidates on a detector trained without the pseudo-unseen "
                        "classes' images (OUT/SET/second_detector.json; about 5 minutes a set)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        out = os.path.join(args.out, name)
        done = os.path.join(out, "unseen_set.json")
        if not os.path.isfile(done):
            run_set(name, out, done)
        second = os.path.join(out, "second_detector.json")
        if args.second_detector and not os.path.isfile(second):
            result = second_detector(out)  # written when finished: a stopped run leaves no file
            with open(second, "w") as f:
                json.dump(result, f, indent=1)
    if args.store:
        sets = []
        for name in SETS:
            path = os.path.join(args.out, name, "unseen_set.json")
            if os.path.isfile(path):
                with open(path) as f:
                    sets.append(json.load(f))
                sets[-1].update(second_detector_summary(os.path.join(args.out, name), sets[-1]))
        note = args.note or f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        out = os.path.join(ROOT, "docs", "results", "unseen_sets_seed0.json")
        with open(out, "w") as f:
            json.dump({"note": note, "seed": 0, "set_seed": SET_SEED, "sets": sets}, f, indent=1)
            f.write("\n")
        print(f"stored {len(sets)} sets -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
