"""Pseudo-unseen validation: choose the synthesizer's schedule and the scoring without unseen data.

The zero-shot literature's protocol (Xian et al.'s "proposed splits"; for detection: hold out
*seen* classes, never unseen ones). ``unseen_classifier.selection: pseudo_unseen`` (what ``vldus
run --select`` and ``vldus demo --select`` pass) makes ``vldus train-generator`` do, before it trains:

1. Draw ``unseen_classifier.pseudo_unseen`` seen classes P from the seed (default: as many as the
   unseen share of the classes, at least 1), each with validation boxes; with attribute
   embeddings (0/1 vectors), every attribute of P still belongs to a remaining seen class.
2. Build the fold in ``OUT/pseudo_unseen/``: ``split.json`` (unseen = P; the real unseen classes
   excluded), the training features without P's rows, the detector checkpoint with P's rows of
   the classification layer replaced by the mean of the real unseen rows (rows that never saw a
   positive, as an unseen class's), and a compatibility classifier on the remaining seen classes.
   The detector itself is the one trained on every seen class: its backbone has seen P's boxes
   (docs/selection.md measures what that does to the ranking).
3. Train the synthesizer on the fold for ``gan.epochs`` (the row's own options), keeping the
   generator at every candidate epoch; for each candidate (epochs x syn_num from
   ``unseen_classifier.select_epochs`` / ``select_syn_num``) train the unseen classifier,
   calibrate it, and score ZSD mAP@0.5 and GZSD HM@0.5 of P on the *validation* images
   (``vldus test`` on them, the detector's boxes cached); then, for the best candidate, the ZSD
   and GZSD scorings (soft | published).
4. Write ``OUT/selection.json``: the fold, every candidate with its validation scores, the choice
   ``{"gan.epochs", "unseen_classifier.syn_num", "inference.zsd_scoring", "inference.gzsd_scoring"}``.

Nothing here opens ``data.test`` or the test features: the fold's "test" images are the
validation images. A candidate's score is the mean of the two figures (ZSD alone where the
fold's GZSD has no ground truth of a group); ties keep the fixed default.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from vldus.classifier_files import write_linear
from vldus.errors import InputError
from vldus.files import save_npy, save_torch, write_json
from vldus.synthesis.data import FeatureFile, derive_seed, feature_file_paths

SELECTION_FILE = "selection.json"
FOLD_DIR = "pseudo_unseen"
SCORINGS = ("soft", "published")  # the scorings compared for the chosen candidate
FOLD_SEED_KEY = 7
CHOICE_KEYS = ("gan.epochs", "unseen_classifier.syn_num", "inference.zsd_scoring", "inference.gzsd_scoring")


class NoFold(Exception):
    """The data allow no pseudo-unseen fold (too few seen classes with validation boxes)."""


@dataclass(frozen=True)
class Candidate:
    """One synthesizer schedule: GAN epochs and synthetic features per unseen class."""

    epochs: int
    syn_num: int

    @property
    def name(self) -> str:
        return f"e{self.epochs}_n{self.syn_num}"


def candidates(cfg) -> list[Candidate]:
    """The grid: ``select_epochs`` (fractions of gan.epochs) x ``select_syn_num`` (multiples of
    syn_num), the fixed default (gan.epochs, syn_num) always among them."""
    uc, epochs = cfg.unseen_classifier, cfg.gan.epochs
    es = sorted({max(1, round(f * epochs)) for f in uc.select_epochs} | {epochs})
    ns = sorted({max(1, round(m * uc.syn_num)) for m in uc.select_syn_num} | {uc.syn_num})
    return [Candidate(e, n) for e in es for n in ns]


def default_candidate(cfg) -> Candidate:
    return Candidate(cfg.gan.epochs, cfg.unseen_classifier.syn_num)


# --------------------------------------------------------------------------------------------
# The fold
# --------------------------------------------------------------------------------------------
def pseudo_unseen_count(split, requested: Optional[int]) -> int:
    """``requested``, or as many seen classes as the unseen share of all classes (>= 1), leaving
    at least one seen class."""
    seen, unseen = len(split.seen_ids), len(split.unseen_ids)
    if not requested and seen < 2:
        raise NoFold(f"{seen} seen class: none to hold out")
    k = requested if requested else max(1, round(seen * unseen / max(1, seen + unseen)))
    if not 1 <= k < seen:
        raise InputError("unseen_classifier.pseudo_unseen", f"{k} pseudo-unseen classes of {seen} seen: "
                                                            "needs 1 .. seen - 1")
    return k


def draw_pseudo_unseen(split, attributes: np.ndarray, val_labels: np.ndarray, count: int, seed: int,
                       tries: int = 1000) -> list[int]:
    """Class ids of ``count`` seen classes with validation rows, drawn with ``seed``, leaving one
    with validation rows (the GZSD calibration's). With 0/1 attribute rows (``attributes`` (C+1,
    d)), every attribute of a drawn class must belong to a remaining seen class (the rule the
    embedded benchmark's unseen sets follow). :class:`NoFold` where the data allow none."""
    present = set(np.unique(val_labels).tolist())
    pool = [i for i in split.seen_ids if i in present]
    if len(pool) < count + 1:
        raise NoFold(f"{len(pool)} seen classes have validation boxes: {count} to hold out and one to keep "
                     "are needed")
    binary = bool(np.isin(attributes, (0.0, 1.0)).all())
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        pick = sorted(int(i) for i in rng.choice(pool, count, replace=False))
        rest = [i for i in split.seen_ids if i not in pick]
        if not binary or (attributes[pick] <= attributes[rest].max(0)).all():
            return pick
    raise NoFold(f"no {count} seen classes whose attributes the other seen classes cover ({tries} draws)")


@dataclass
class Fold:
    """What the fold's synthesizer and tests read."""

    cfg: object  # the fold's Config (split, work_dir, data.test = data.val)
    checkpoint: str
    features_dir: str
    compat: str
    pseudo_unseen: list[str]


def _filtered_copy(src: FeatureFile, keep: np.ndarray, dst: tuple[str, str]) -> None:
    feats = np.load(src.feats_path, mmap_mode="r", allow_pickle=False)
    save_npy(dst[0], np.ascontiguousarray(feats[keep]))
    save_npy(dst[1], src.labels[keep])


def _link(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        os.remove(dst)
    os.symlink(os.path.abspath(src), dst)


def build_fold(cfg, checkpoint: str, features_dir: str, out_dir: str, device: str, quiet: bool) -> Fold:
    """The fold of this config (module docstring, step 1-2) in ``out_dir``."""
    from vldus.data.embeddings import load_class_embeddings
    from vldus.data.splits import Split
    from vldus.precision import resolve_precision
    from vldus.synthesis.compat import train_compat_classifier
    from vldus.synthesis.models import SEEN_BIAS_KEY, SEEN_WEIGHT_KEY

    split, uc = cfg.load_split(), cfg.unseen_classifier
    fg, bg, dim = cfg.features.fg_iou, cfg.features.bg_iou, cfg.features.dim
    train = FeatureFile.open(*feature_file_paths(features_dir, "train", fg, bg), dim, split.num_classes)
    val_paths = feature_file_paths(features_dir, "val", fg, bg)
    if cfg.data.val is None or not os.path.isfile(val_paths[1]):
        raise InputError(val_paths[1], "pseudo-unseen selection needs data.val and its RoI features "
                                       "(vldus extract-features --data-split val)")
    val = FeatureFile.open(*val_paths, dim, split.num_classes)
    raw = load_class_embeddings(cfg.embeddings.file, split, False)
    pick = draw_pseudo_unseen(split, raw, val.labels, pseudo_unseen_count(split, uc.pseudo_unseen),
                              derive_seed(cfg.gan.seed, FOLD_SEED_KEY))
    names = [split.classes[i - 1] for i in pick]
    fold_split = Split(f"{split.name}-pseudo-unseen", split.classes, tuple(names),
                       tuple(split.excluded) + tuple(split.unseen), split.dataset, "", split.aliases)
    os.makedirs(os.path.join(out_dir, "features"), exist_ok=True)
    split_path = os.path.join(out_dir, "split.json")
    write_json(split_path, fold_split.to_json())

    fold_features = os.path.join(out_dir, "features")
    _filtered_copy(train, ~np.isin(train.labels, pick), feature_file_paths(fold_features, "train", fg, bg))
    for src, dst in zip(val_paths, feature_file_paths(fold_features, "val", fg, bg)):
        _link(src, dst)

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt)
    never_positive = split.unseen_ids + split.excluded_ids
    for key in (SEEN_WEIGHT_KEY, SEEN_BIAS_KEY):
        rows = state[key].clone()
        rows[pick] = rows[never_positive].mean(0)
        state[key] = rows
    fold_ckpt = os.path.join(out_dir, "detector.pth")
    save_torch(ckpt, fold_ckpt)

    fold_cfg = copy.deepcopy(cfg)
    fold_cfg.split, fold_cfg.work_dir = split_path, out_dir
    fold_cfg.data.test = cfg.data.val
    fold_cfg.data.test_rule = "all" if cfg.data.test_rule == "all" else "coco"
    fold_cfg.gan.detector_checkpoint = fold_ckpt
    fold_cfg.unseen_classifier.selection = "last"

    compat = os.path.join(out_dir, "compat_classifier.pth")
    if not os.path.isfile(compat):
        fold_train = FeatureFile.open(*feature_file_paths(fold_features, "train", fg, bg), dim, split.num_classes)
        emb = load_class_embeddings(cfg.embeddings.file, fold_split, cfg.embeddings.spectral_norm)
        state_c, _ = train_compat_classifier(fold_train, emb, fold_split.seen_ids, cfg.compat, device,
                                             resolve_precision(cfg.gan.precision, torch.device(device)), True)
        write_linear(state_c["fc.weight"], state_c["fc.bias"], compat, "ours", kind="compat")
    if not quiet:
        print(f"pseudo-unseen fold: {', '.join(names)} held out of {len(split.seen_ids)} seen classes "
              f"({out_dir})", flush=True)
    return Fold(fold_cfg, fold_ckpt, fold_features, compat, names)


# --------------------------------------------------------------------------------------------
# Candidates: one synthesizer training, many classifiers
# --------------------------------------------------------------------------------------------
def train_with_snapshots(cfg, options, out_dir: str, epochs: list[int]):
    """Train the synthesizer of ``cfg`` for gan.epochs into ``out_dir`` (resumable), keeping
    ``generator_e<k>.pth`` for each k in ``epochs``; returns (inputs, trainer) after the last."""
    from vldus.precision import resolve_precision
    from vldus.synthesis.pipeline import (ClassifierData, _Inputs, build_trainer, resume_progress,
                                          train_gan)

    device = torch.device(options.device)
    os.makedirs(out_dir, exist_ok=True)
    inputs = _Inputs(cfg, options)
    trainer = build_trainer(cfg, inputs, device, resolve_precision(cfg.gan.precision, device))
    sampler = torch.Generator().manual_seed(cfg.gan.seed)
    progress = resume_progress(cfg, options, out_dir, trainer, sampler)

    def keep(epoch: int) -> None:
        if epoch in epochs:
            save_torch({k: v.detach().cpu() for k, v in trainer.G.state_dict().items()},
                       os.path.join(out_dir, f"generator_e{epoch}.pth"))

    opts = dataclasses.replace(options, on_epoch_end=keep, out_dir=out_dir)
    train_gan(cfg, opts, inputs, trainer, sampler, progress, ClassifierData(cfg, inputs, trainer, device),
              out_dir, device)
    return inputs, trainer


def make_classifier(cfg, inputs, trainer, candidate: Candidate, snapshot: str, cand_dir: str,
                    checkpoint: str, features_dir: str, device: str) -> str:
    """The candidate's unseen classifier (the generator of its epoch, its syn_num), exactly as
    train-generator makes the final one, calibrated; returns its ``classifier_best.pth``."""
    from vldus.synthesis.calibrate import calibrate_synth_dir
    from vldus.synthesis.pipeline import ClassifierData
    from vldus.synthesis.unseen_classifier import train_unseen_classifier

    os.makedirs(cand_dir, exist_ok=True)
    c_cfg = copy.deepcopy(cfg)
    c_cfg.unseen_classifier.syn_num = candidate.syn_num
    trainer.G.load_state_dict(torch.load(snapshot, map_location=trainer.device, weights_only=True))
    x, y, g = ClassifierData(c_cfg, inputs, trainer, torch.device(device))(candidate.epochs)
    model = train_unseen_classifier(x.to(device), y.to(device), len(inputs.split.unseen_ids),
                                    c_cfg.unseen_classifier, g)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = os.path.join(cand_dir, "classifier_best.pth")
    write_linear(state["fc.weight"], state["fc.bias"], path, "ours", kind="synthesized",
                 epoch=c_cfg.unseen_classifier.epochs - 1)
    save_torch({k: v.detach().cpu() for k, v in trainer.G.state_dict().items()},
               os.path.join(cand_dir, "generator.pth"))
    calibrate_synth_dir(c_cfg, cand_dir, checkpoint, features_dir, device, warn=False)
    return path


def test_scores(cfg, checkpoint: str, classifier: str, out_dir: str, cache_dir: str, device: str,
                zsd_scoring: Optional[str] = None, gzsd_scoring: Optional[str] = None,
                settings: tuple[str, ...] = ("zsd", "gzsd")) -> dict:
    """``vldus test`` of a classifier on ``cfg.data.test`` (the fold's: the validation images);
    {"zsd_map", "gzsd_hm", "gzsd_seen", "gzsd_unseen"} at IoU 0.5 (None: no ground truth)."""
    from vldus.detection.inference import run_test

    t_cfg = copy.deepcopy(cfg)
    t_cfg.inference.zsd_scoring = zsd_scoring or cfg.inference.zsd_scoring
    t_cfg.inference.gzsd_scoring = gzsd_scoring or cfg.inference.gzsd_scoring
    out: dict = {}
    with open(os.path.join(out_dir, "test.log"), "a") as log, contextlib.redirect_stdout(log):
        for setting in settings:
            tag = f"{setting}_{t_cfg.inference.zsd_scoring if setting == 'zsd' else t_cfg.inference.gzsd_scoring}"
            m = run_test(t_cfg, setting, checkpoint, classifier, os.path.join(out_dir, f"{tag}.json"),
                         device=device, quiet=True, cache_dir=cache_dir)
            if setting == "zsd":
                out["zsd_map"] = m["groups"]["unseen"]["map"]["0.5"]
            else:
                out.update({"gzsd_hm": m["hm"]["map"]["0.5"], "gzsd_seen": m["groups"]["seen"]["map"]["0.5"],
                            "gzsd_unseen": m["groups"]["unseen"]["map"]["0.5"]})
    return out


def score(r: dict) -> Optional[float]:
    """A candidate's validation score: mean of ZSD mAP@0.5 and GZSD HM@0.5 (those that exist)."""
    vals = [v for v in (r.get("zsd_map"), r.get("gzsd_hm")) if v is not None]
    return float(np.mean(vals)) if vals else None


def evaluate_candidates(cfg, options, out_dir: str, checkpoint: str, features_dir: str,
                        cands: list[Candidate], cache: Optional[str] = None) -> list[dict]:
    """Train once (snapshots), then every candidate's classifier and its test scores on
    ``cfg.data.test``; one dict per candidate. Used on the fold (selection) and, by the
    benchmarks only, on the real split (to see whether the fold ranks candidates as the real
    unseen classes do). ``cache``: the detector-box cache folder (default OUT/test_cache)."""
    inputs, trainer = train_with_snapshots(cfg, options, out_dir, sorted({c.epochs for c in cands}))
    cache = cache or os.path.join(out_dir, "test_cache")
    rows = []
    for cand in cands:
        cand_dir = os.path.join(out_dir, cand.name)
        cls = make_classifier(cfg, inputs, trainer, cand, os.path.join(out_dir, f"generator_e{cand.epochs}.pth"),
                              cand_dir, checkpoint, features_dir, options.device)
        r = {"epochs": cand.epochs, "syn_num": cand.syn_num,
             **test_scores(cfg, checkpoint, cls, cand_dir, cache, options.device)}
        r["score"] = score(r)
        rows.append(r)
        if not options.quiet:
            print(f"  {cand.name}: ZSD {_fmt(r['zsd_map'])}, GZSD HM {_fmt(r['gzsd_hm'])}", flush=True)
    return rows


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def best(rows: list[dict], key, default) -> dict:
    """The row with the highest ``key(row)``; ties (and no score at all) keep ``default``."""
    scored = [r for r in rows if key(r) is not None]
    if not scored:
        return default
    top = max(key(r) for r in scored)
    return default if key(default) is not None and key(default) >= top else \
        next(r for r in scored if key(r) == top)


def select_on_pseudo_unseen(cfg, options) -> dict:
    """Module docstring, steps 1-4; returns the selection record (also ``OUT/selection.json``).
    With ``options.resume`` a finished record is reused."""
    from vldus.synthesis.data import default_detector_checkpoint

    out_dir = options.out_dir or cfg.path("synth")
    path = os.path.join(out_dir, SELECTION_FILE)
    if options.resume and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    fold_dir = os.path.join(out_dir, FOLD_DIR)
    checkpoint = options.detector_checkpoint or default_detector_checkpoint(cfg)
    default_choice = {"gan.epochs": cfg.gan.epochs, "unseen_classifier.syn_num": cfg.unseen_classifier.syn_num,
                      "inference.zsd_scoring": cfg.inference.zsd_scoring,
                      "inference.gzsd_scoring": cfg.inference.gzsd_scoring}
    try:
        fold = build_fold(cfg, checkpoint, options.features_dir or cfg.path("features"), fold_dir,
                          options.device, options.quiet)
    except NoFold as e:
        print(f"selection: no pseudo-unseen fold ({e}); the fixed defaults train", flush=True)
        record = {"skipped": str(e), "pseudo_unseen": [], "candidates": [], "scorings": [],
                  "default": default_choice, "chosen": default_choice, "reads_test_data": False}
        write_json(path, record)
        return record
    fold_options = dataclasses.replace(options, features_dir=fold.features_dir, detector_checkpoint=fold.checkpoint,
                                       compat_classifier=fold.compat, out_dir=fold_dir, plots=False)
    cands = candidates(cfg)
    rows = evaluate_candidates(fold.cfg, fold_options, fold_dir, fold.checkpoint, fold.features_dir, cands)
    default = next(r for r in rows if (r["epochs"], r["syn_num"]) == (cfg.gan.epochs, cfg.unseen_classifier.syn_num))
    chosen = best(rows, score, default)
    cls = os.path.join(fold_dir, Candidate(chosen["epochs"], chosen["syn_num"]).name, "classifier_best.pth")
    cache = os.path.join(fold_dir, "test_cache")
    scorings = {}
    for s in SCORINGS:
        if s == cfg.inference.zsd_scoring and s == cfg.inference.gzsd_scoring:
            scorings[s] = {k: chosen[k] for k in ("zsd_map", "gzsd_hm")}
        else:
            r = test_scores(fold.cfg, fold.checkpoint, cls, os.path.dirname(cls), cache, options.device,
                            zsd_scoring=s, gzsd_scoring=s)
            scorings[s] = {k: r[k] for k in ("zsd_map", "gzsd_hm")}
    zsd_default = {"name": cfg.inference.zsd_scoring, **scorings.get(cfg.inference.zsd_scoring, {})}
    gzsd_default = {"name": cfg.inference.gzsd_scoring, **scorings.get(cfg.inference.gzsd_scoring, {})}
    table = [{"name": s, **v} for s, v in scorings.items()]
    zsd = best(table, lambda r: r.get("zsd_map"), zsd_default)["name"]
    gzsd = best(table, lambda r: r.get("gzsd_hm"), gzsd_default)["name"]
    record = {
        "protocol": "pseudo-unseen validation: seen classes held out, scored on the validation images",
        "pseudo_unseen": fold.pseudo_unseen, "fold_seed": derive_seed(cfg.gan.seed, FOLD_SEED_KEY),
        "detector": "the one trained on every seen class (its classification rows of the held-out "
                    "classes replaced by the real unseen rows' mean)",
        "candidates": rows, "scorings": table,
        "default": default_choice,
        "chosen": {"gan.epochs": chosen["epochs"], "unseen_classifier.syn_num": chosen["syn_num"],
                   "inference.zsd_scoring": zsd, "inference.gzsd_scoring": gzsd},
        "reads_test_data": False,
    }
    write_json(path, record)
    if not options.quiet:
        print(f"selected on pseudo-unseen validation: {record['chosen']}", flush=True)
    return record


def run_selected(cfg, options) -> dict:
    """``vldus train-generator``: with ``selection: pseudo_unseen``, choose (:func:`select_on_pseudo_unseen`)
    and train the chosen schedule; otherwise train the config's. Returns meta.json's dict (with
    ``selection``: the fold, the default and the choice)."""
    from vldus.synthesis.pipeline import run_synthesis

    if cfg.unseen_classifier.selection != "pseudo_unseen":
        return run_synthesis(cfg, options)
    record = select_on_pseudo_unseen(cfg, options)
    meta = run_synthesis(apply_choice(cfg, record), options)
    meta["selection"] = {k: record[k] for k in ("pseudo_unseen", "chosen", "default")}
    write_json(os.path.join(options.out_dir or cfg.path("synth"), "meta.json"), meta)
    return meta


def apply_choice(cfg, record: dict):
    """A copy of ``cfg`` with the synthesizer's chosen schedule (the scorings are the test's)."""
    out = copy.deepcopy(cfg)
    out.gan.epochs = int(record["chosen"]["gan.epochs"])
    out.unseen_classifier.syn_num = int(record["chosen"]["unseen_classifier.syn_num"])
    return out
