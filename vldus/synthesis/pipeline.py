"""Stage 3b + 3c as one resumable run: train the synthesizer, then the unseen classifier
(docs/design.md §6, §7). ``vldus train-generator`` is a thin wrapper around :func:`run_synthesis` (through
:func:`vldus.synthesis.select.run_selected`, which first chooses the schedule where
``unseen_classifier.selection`` is ``pseudo_unseen``).

Inputs (paths from the config unless overridden):
  WORK_DIR/features/train_{fg}_{bg}_{feats,labels}.npy   seen training features (stage 2)
  WORK_DIR/features/val_{fg}_{bg}_{feats,labels}.npy     seen features of the validation images
                                                          (with data.val: the GZSD calibration's)
  WORK_DIR/features/test_{fg}_{bg}_{feats,labels}.npy    real unseen test features (optional:
                                                          the 2-D plot, a reported accuracy, and
                                                          the leaky ``selection: test``)
  embeddings.file                                        class embeddings (C+1, d)
  the detector checkpoint                                C_s = its cls_score layer
  WORK_DIR/synth/compat_classifier.pth                   C_u (stage 3a; or options.compat_classifier,
                                                          e.g. the released unseen_Classifier*.pth)

Outputs in WORK_DIR/synth/: classifier_best.pth {"fc.weight" (1+U, 1024), "fc.bias" (1+U,)} (layout
"published": the released {"state_dict": {"fc1.weight", "fc1.bias"}, "epoch": k}),
generator.pth, critic.pth (state dicts), gzsd_calibration.json (the joint GZSD scoring's threshold,
:mod:`vldus.synthesis.calibrate`), meta.json, log.jsonl (one line per GAN epoch),
losses.png, features_2d.png, and checkpoint_latest.pth (written atomically after every GAN epoch;
``resume=True`` continues from it and, on the CPU, gives the same weights as an uninterrupted
run; CUDA kernels with atomic adds make a resumed GPU run differ in round-off).

:func:`run_synthesis` reads top to bottom: check the inputs (:class:`_Inputs`), build the trainer,
resume, train the GAN (:func:`train_gan`), choose the final classifier, write the weights,
calibrate the GZSD scoring (:func:`vldus.synthesis.calibrate.calibrate_synth_dir`), measure,
plot, write meta.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from vldus.classifier_files import write_linear
from vldus.errors import InputError
from vldus.files import save_torch, sha256_file, write_json
from vldus.synthesis.compat import compat_classifier_path, load_compat_classifier
from vldus.synthesis.data import (DeviceRows, FeatureFile, check_training_labels, default_detector_checkpoint,
                                  derive_seed, feature_file_paths, require_unseen, sample_batches,
                                  sample_epoch_pool)
from vldus.synthesis.models import Critic, Generator, init_weights, seen_classifier_from_detector
from vldus.precision import resolve_precision
from vldus.synthesis.calibrate import calibrate_synth_dir, seen_feature_file
from vldus.synthesis.trainer import LOSS_NAMES, GANTrainer
from vldus.synthesis.unseen_classifier import LabelledFeatures, train_unseen_classifier

CHECKPOINT = "checkpoint_latest.pth"
SELECTIONS = ("last", "test", "pseudo_unseen")
DISTILL_MODES = ("active", "logged", "off")
PLOT_POINTS = 1500  # points per group in features_2d.png
# gan settings a resumed run may change (anything else must match the checkpoint)
RESUMABLE_CHANGES = ("epochs", "clip_weights", "detector_checkpoint")

LEAK_NOTICE = ("NOTE: selection=test — the unseen classifier (and the generator epoch) is chosen "
               "on the real unseen TEST features, as in the published code; this uses test data "
               "for model selection and overstates the results.")


@dataclass
class SynthesisOptions:
    """Run-time choices that are not hyper-parameters."""

    device: str = "cpu"
    resume: bool = False
    quiet: bool = False
    features_dir: Optional[str] = None  # default cfg.path('features')
    detector_checkpoint: Optional[str] = None  # default gan.detector_checkpoint, else the latest
    out_dir: Optional[str] = None  # default cfg.path('synth')
    check_features: bool = True  # scan the feature files for NaN/inf
    plots: bool = True
    on_epoch_end: Optional[Callable[[int], None]] = None  # called with the finished epoch (1-based)
    compat_classifier: Optional[str] = None  # C_u file (ours or the released unseen_Classifier*.pth)
    layout: str = "ours"  # classifier_best.pth layout: ours | published (released train_cls.py)


class _Inputs:
    """Everything stage 3 reads, checked up front (bad input fails before any training)."""

    def __init__(self, cfg, options: SynthesisOptions):
        from vldus.data.embeddings import load_class_embeddings
        from vldus.synthesis.distill import build_distiller

        gan, uc = cfg.gan, cfg.unseen_classifier
        if gan.distill not in DISTILL_MODES:
            raise InputError("gan.distill", f"{gan.distill!r}: expected one of {DISTILL_MODES}")
        if uc.selection not in SELECTIONS:
            raise InputError("unseen_classifier.selection", f"{uc.selection!r}: expected one of {SELECTIONS}")
        self.split = split = cfg.load_split()
        require_unseen(split)
        dim = cfg.features.dim
        self.embeddings_file = cfg.embeddings.file
        self.embeddings = load_class_embeddings(cfg.embeddings.file, split, cfg.embeddings.spectral_norm)
        self.distiller = None  # before the (long) feature scan: a missing CLIP file fails at once
        if gan.distill != "off":
            text = load_class_embeddings(cfg.embeddings.text_file or cfg.embeddings.file, split,
                                         cfg.embeddings.spectral_norm)
            self.distiller = build_distiller(gan, text, options.device)
        self.detector_checkpoint = options.detector_checkpoint or default_detector_checkpoint(cfg)
        self.seen_classifier = seen_classifier_from_detector(self.detector_checkpoint, split.num_classes, dim)
        unseen_rows = torch.from_numpy(self.embeddings[split.unseen_ids])
        self.compat_path = options.compat_classifier or compat_classifier_path(cfg)
        self.compat = load_compat_classifier(self.compat_path, unseen_rows, dim)
        features_dir = options.features_dir or cfg.path("features")
        self.train = FeatureFile.open(*feature_file_paths(features_dir, "train", cfg.features.fg_iou,
                                                          cfg.features.bg_iou), dim, split.num_classes)
        check_training_labels(self.train, split)
        seen_feature_file(cfg, features_dir)  # the GZSD calibration's, checked up front
        test_paths = feature_file_paths(features_dir, "test", cfg.features.fg_iou, cfg.features.bg_iou)
        self.test = None
        if os.path.isfile(test_paths[0]) and os.path.isfile(test_paths[1]):
            self.test = FeatureFile.open(*test_paths, dim, split.num_classes)
        elif uc.selection == "test":
            raise InputError(test_paths[0], "selection=test needs the real unseen test features")
        if options.check_features:
            for ff in (self.train, self.test):
                if ff is not None:
                    ff.check_finite(quiet=options.quiet)
        self.test_set = LabelledFeatures(self.test, split.unseen_ids) if self.test is not None else None
        if self.test_set is not None and self.test_set.dropped:
            print(f"note: {self.test.labels_path}: {self.test_set.dropped} rows of seen/excluded classes "
                  "are not used (unseen test features: background + unseen classes)", flush=True)


def _settings_key(cfg) -> dict:
    gan = {k: v for k, v in dataclasses.asdict(cfg.gan).items() if k not in RESUMABLE_CHANGES}
    return {"gan": gan, "embeddings": dataclasses.asdict(cfg.embeddings),
            "features_dim": cfg.features.dim, "split": cfg.split}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _epoch_record(epoch: int, history: torch.Tensor, seconds: float, batch_size: int) -> dict:
    means = history.mean(0).tolist() if len(history) else [float("nan")] * len(LOSS_NAMES)
    samples = len(history) * batch_size
    record = {"epoch": epoch, "iterations": len(history), "samples": samples,
              "seconds": round(seconds, 3), "samples_per_s": round(samples / max(seconds, 1e-9), 1)}
    record.update({name: float(v) for name, v in zip(LOSS_NAMES, means)})
    return record


@dataclass
class _Progress:
    """What the GAN loop carries from epoch to epoch (and checkpoint_latest.pth stores)."""

    start_epoch: int = 0  # epochs done before this run (resume)
    history: list = dataclasses.field(default_factory=list)  # one log record per epoch
    best: Optional[dict] = None  # selection=test: the best classifier so far and its G, D


@dataclass
class _Final:
    """The selected classifier, generator and critic, and the classifier's training data."""

    classifier: dict
    generator: dict
    critic: dict
    selected: dict
    x: torch.Tensor  # (N, dim) the classifier's training features
    y: torch.Tensor  # (N,) their targets (0 = background)


def build_trainer(cfg, inputs: _Inputs, device: torch.device, precision: str) -> GANTrainer:
    """G and D initialised from gan.seed, in a GANTrainer."""
    gan = cfg.gan
    init_gen = torch.Generator().manual_seed(gan.seed)
    att_dim, dim = inputs.embeddings.shape[1], cfg.features.dim
    G = Generator(gan.nz, att_dim, gan.ngh, dim)
    D = Critic(dim, att_dim, gan.ndh, gan.d_feat)
    init_weights(G, init_gen)
    init_weights(D, init_gen)
    return GANTrainer(G, D, torch.from_numpy(inputs.embeddings), inputs.seen_classifier, inputs.compat,
                      inputs.split.unseen_ids, gan, device, precision, inputs.distiller,
                      seed=derive_seed(gan.seed, 1))


def resume_progress(cfg, options: SynthesisOptions, out_dir: str, trainer: GANTrainer,
                    sampler: torch.Generator) -> _Progress:
    """With ``options.resume``: load checkpoint_latest.pth into the trainer and the sampler (same
    settings required). Rewrites log.jsonl to match the epochs we continue from."""
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    progress = _Progress()
    if options.resume and os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        diff = _differences(ckpt["settings"], _settings_key(cfg))
        if diff:
            raise InputError(ckpt_path, "written with other settings (" + "; ".join(diff[:4]) +
                             "); restore them or start without --resume")
        trainer.load_state_dict(ckpt["trainer"], ckpt_path)
        sampler.set_state(ckpt["sampler_rng"])
        progress = _Progress(ckpt["epoch"], ckpt["history"], ckpt.get("best"))
        print(f"resuming after GAN epoch {progress.start_epoch} from {ckpt_path}", flush=True)
    elif options.resume:
        print(f"no checkpoint in {out_dir}; starting from scratch", flush=True)
    with open(os.path.join(out_dir, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in progress.history)
    return progress


class ClassifierData:
    """``data(epoch)`` -> (features (N, dim), targets (N,), generator): syn_num synthesized
    features per unseen class + bg_multiplier * syn_num real background rows, drawn from seeds
    of (gan.seed, epoch), and the generator that then trains the classifier."""

    def __init__(self, cfg, inputs: _Inputs, trainer: GANTrainer, device: torch.device):
        self.cfg, self.inputs, self.trainer, self.device = cfg, inputs, trainer, device
        self.unseen_att = torch.from_numpy(inputs.embeddings[inputs.split.unseen_ids])
        self.bg_rows = torch.nonzero(torch.from_numpy(inputs.train.labels) == 0).squeeze(1)

    def __call__(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        seed, uc = self.cfg.gan.seed, self.cfg.unseen_classifier
        g = torch.Generator().manual_seed(derive_seed(seed, 2, epoch))
        syn = self.trainer.synthesize(self.unseen_att, uc.syn_num, torch.Generator().manual_seed(
            derive_seed(seed, 3, epoch))).cpu()
        n_bg = min(uc.bg_multiplier * uc.syn_num, len(self.bg_rows))
        bg = self.inputs.train.gather(self.bg_rows[torch.randperm(len(self.bg_rows), generator=g)[:n_bg]])
        targets = torch.cat([torch.arange(1, len(self.unseen_att) + 1).repeat_interleave(uc.syn_num),
                             torch.zeros(n_bg, dtype=torch.int64)])
        return torch.cat([syn, bg]), targets, g


def train_gan(cfg, options: SynthesisOptions, inputs: _Inputs, trainer: GANTrainer, sampler: torch.Generator,
              progress: _Progress, classifier_data: ClassifierData, out_dir: str, device: torch.device) -> None:
    """GAN epochs ``progress.start_epoch + 1 .. gan.epochs``: train, log, (selection=test) keep the
    best classifier, checkpoint atomically. Updates ``progress`` in place."""
    gan, uc = cfg.gan, cfg.unseen_classifier
    labels = torch.from_numpy(inputs.train.labels)
    fg_rows = torch.nonzero(labels > 0).squeeze(1)
    bg_rows = torch.nonzero(labels == 0).squeeze(1)
    pool_rows = DeviceRows(inputs.train, device)  # on CUDA: the whole file on the device, if it fits
    bar = tqdm(total=gan.epochs, initial=progress.start_epoch, desc="GAN epochs", unit="epoch",
               disable=options.quiet)
    for epoch in range(progress.start_epoch + 1, gan.epochs + 1):
        pool = sample_epoch_pool(labels, gan.epoch_budget, sampler, fg_rows, bg_rows)
        batches = sample_batches(len(pool), gan.batch_size, sampler)
        feats = pool_rows.gather(pool)
        pool_labels = labels[pool].to(device)
        it_bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="it", leave=False,
                      disable=options.quiet)
        t0 = time.time()
        losses = trainer.train_epoch(feats, pool_labels, batches.to(device), epoch, it_bar.update)
        record = _epoch_record(epoch, losses, time.time() - t0, gan.batch_size)
        it_bar.close()
        del feats
        if uc.selection == "test":  # published: pick the classifier on real unseen test features
            select_on_test(inputs, trainer, progress, classifier_data, record, epoch, uc, device)
        progress.history.append(record)
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        save_torch({"epoch": epoch, "trainer": trainer.state_dict(), "sampler_rng": sampler.get_state(),
                    "history": progress.history, "best": progress.best, "settings": _settings_key(cfg)},
                   os.path.join(out_dir, CHECKPOINT))
        bar.set_postfix(loss_d=f"{record['loss_d']:.3f}", loss_g=f"{record['loss_g']:.3f}",
                        samples_s=record["samples_per_s"])
        bar.update(1)
        if options.on_epoch_end is not None:
            options.on_epoch_end(epoch)
    bar.close()


def select_on_test(inputs: _Inputs, trainer: GANTrainer, progress: _Progress, classifier_data: ClassifierData,
                   record: dict, epoch: int, uc, device: torch.device) -> None:
    """The published (leaky) selection: train this epoch's classifier, keep it (with G and D) in
    ``progress.best`` whenever its accuracy on the real unseen test features is the best so far."""
    x, y, g = classifier_data(epoch)

    def keep_best(cls_epoch, model):
        acc, _ = inputs.test_set.accuracy(model, device)
        record.setdefault("test_accuracy", []).append(acc)
        if progress.best is None or acc >= progress.best["accuracy"]:
            progress.best = {"accuracy": acc, "epoch": epoch, "cls_epoch": cls_epoch,
                             "classifier": _cpu_copy(model.state_dict()),
                             "generator": _cpu_copy(trainer.G.state_dict()),
                             "critic": _cpu_copy(trainer.D.state_dict())}
    train_unseen_classifier(x.to(device), y.to(device), len(inputs.split.unseen_ids), uc, g, keep_best)
    record["best_test_accuracy"] = progress.best["accuracy"]


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def final_classifier(cfg, trainer: GANTrainer, progress: _Progress, classifier_data: ClassifierData,
                     device: torch.device) -> _Final:
    """selection=last: a classifier on the last generator's features; selection=test: the best
    one kept during training (and its generator, loaded into the trainer for the plots)."""
    gan, uc = cfg.gan, cfg.unseen_classifier
    best = progress.best
    if uc.selection == "last" or best is None:
        x, y, g = classifier_data(gan.epochs)
        classifier = train_unseen_classifier(x.to(device), y.to(device), len(classifier_data.unseen_att), uc, g)
        return _Final({k: v.detach().cpu() for k, v in classifier.state_dict().items()}, trainer.G.state_dict(),
                      trainer.D.state_dict(), {"epoch": gan.epochs, "cls_epoch": uc.epochs, "rule": "last"}, x, y)
    trainer.G.load_state_dict(best["generator"])
    x, y, _ = classifier_data(best["epoch"])
    return _Final(best["classifier"], best["generator"], best["critic"],
                  {"epoch": best["epoch"], "cls_epoch": best["cls_epoch"], "rule": "best test accuracy",
                   "test_accuracy": best["accuracy"]}, x, y)


def classifier_results(cfg, inputs: _Inputs, final: _Final) -> dict:
    """Accuracy of the final classifier on its training data and (when present, reported only
    unless selection=test) on the real unseen test features."""
    from vldus.synthesis.models import UnseenClassifier

    split = inputs.split
    model = UnseenClassifier(cfg.features.dim, len(split.unseen_ids))
    model.load_state_dict(final.classifier)
    model.eval()
    with torch.no_grad():
        results = {"classifier_train_accuracy": float((model(final.x).argmax(1) == final.y).float().mean())}
    if inputs.test_set is not None:
        acc, per_class = inputs.test_set.accuracy(model)
        names = ["background"] + list(split.classes[i - 1] for i in split.unseen_ids)
        results["test_mean_class_accuracy"] = acc
        results["test_class_accuracy"] = {names[k]: v for k, v in per_class.items()}
        results["test_rows"] = len(inputs.test_set)
        results["test_used_for_selection"] = cfg.unseen_classifier.selection == "test"
    return results


def run_synthesis(cfg, options: SynthesisOptions) -> dict:
    """Train G/D for gan.epochs (resumable), then the unseen classifier; write every output.

    Returns the meta dict written to meta.json. Raises InputError for bad input and
    :class:`vldus.synthesis.trainer.NonFiniteLoss` when training diverges (the last good
    checkpoint stays in place).
    """
    t_start = time.time()
    gan = cfg.gan
    device = torch.device(options.device)
    precision = resolve_precision(gan.precision, device)
    out_dir = options.out_dir or cfg.path("synth")
    os.makedirs(out_dir, exist_ok=True)
    # selection=pseudo_unseen: vldus.synthesis.select.run_selected chose gan.epochs and syn_num
    # before this call; from here on it trains like "last"
    inputs = _Inputs(cfg, options)
    if cfg.unseen_classifier.selection == "test":
        print(LEAK_NOTICE, flush=True)

    trainer = build_trainer(cfg, inputs, device, precision)
    sampler = torch.Generator().manual_seed(gan.seed)  # epoch pools and batches
    progress = resume_progress(cfg, options, out_dir, trainer, sampler)
    classifier_data = ClassifierData(cfg, inputs, trainer, device)
    t_gan = time.time()
    train_gan(cfg, options, inputs, trainer, sampler, progress, classifier_data, out_dir, device)
    gan_seconds = time.time() - t_gan

    t_cls = time.time()
    final = final_classifier(cfg, trainer, progress, classifier_data, device)
    write_linear(final.classifier["fc.weight"], final.classifier["fc.bias"],
                 os.path.join(out_dir, "classifier_best.pth"), options.layout, kind="synthesized",
                 epoch=final.selected["cls_epoch"] - 1)
    save_torch({k: v.cpu() for k, v in final.generator.items()}, os.path.join(out_dir, "generator.pth"))
    save_torch({k: v.cpu() for k, v in final.critic.items()}, os.path.join(out_dir, "critic.pth"))
    # the joint GZSD scoring's threshold, chosen without test data: the same function (and so the
    # same file) as vldus calibrate-gzsd, on the files just written
    calibration = calibrate_synth_dir(cfg, out_dir, inputs.detector_checkpoint,
                                      options.features_dir or cfg.path("features"), device, warn=False)
    results = classifier_results(cfg, inputs, final)
    cls_seconds = time.time() - t_cls

    if options.plots:
        from vldus.synthesis.plots import plot_features_2d, plot_losses

        plot_losses(progress.history, os.path.join(out_dir, "losses.png"))
        labelled = final.y > 0
        plot_features_2d(inputs, final.x[labelled], final.y[labelled], os.path.join(out_dir, "features_2d.png"),
                         PLOT_POINTS, derive_seed(gan.seed, 4))

    timings = {"gan": round(gan_seconds, 2), "classifier": round(cls_seconds, 2),
               "total": round(time.time() - t_start, 2)}
    meta = build_meta(cfg, options, inputs, progress, final, results, calibration, timings, device, precision)
    write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def build_meta(cfg, options: SynthesisOptions, inputs: _Inputs, progress: _Progress, final: _Final,
               results: dict, calibration: dict, timings: dict, device: torch.device, precision: str) -> dict:
    """meta.json: what was trained from what, the selection, results, calibration and timings."""
    gan, uc, split = cfg.gan, cfg.unseen_classifier, inputs.split
    epochs_run = [r for r in progress.history if r.get("iterations")]
    timings["gan_epoch_mean"] = (round(float(np.mean([r["seconds"] for r in epochs_run])), 3)
                                 if epochs_run else None)
    return {
        "split": split.name,
        "classes": {"seen": [{"id": i, "name": split.classes[i - 1]} for i in split.seen_ids],
                    "unseen": [{"id": i, "name": split.classes[i - 1]} for i in split.unseen_ids]},
        "classifier_rows": ["background"] + [split.classes[i - 1] for i in split.unseen_ids],
        "embeddings": {"file": inputs.embeddings_file, "sha256": sha256_file(inputs.embeddings_file),
                       "shape": list(inputs.embeddings.shape)},
        "features": {"train": inputs.train.feats_path, "train_rows": inputs.train.num_rows,
                     "test": inputs.test.feats_path if inputs.test else None},
        "detector_checkpoint": inputs.detector_checkpoint,
        "compat_classifier": inputs.compat_path,
        "settings": {"device": str(device), "precision": precision, "distill": gan.distill,
                     "distill_into": gan.distill_into,
                     "layout": options.layout,
                     "legacy_unseen_loss": gan.legacy_unseen_loss, "selection": uc.selection,
                     "uses_test_data_for_selection": uc.selection == "test",
                     "resumed": bool(options.resume and progress.start_epoch > 0)},
        "selected": final.selected,
        "results": results,
        "gzsd_calibration": calibration,
        "timings_s": timings,
        "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in epochs_run])), 1)
        if epochs_run else None,
        "config": cfg.to_dict(),
    }
