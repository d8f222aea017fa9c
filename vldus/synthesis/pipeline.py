"""Stage 3b + 3c as one resumable run: train the synthesizer, then the unseen classifier
(SPEC Part B §6, §7). ``vldus train-generator`` is a thin wrapper around :func:`run_synthesis`.

Inputs (paths from the config unless overridden):
  WORK_DIR/features/train_{fg}_{bg}_{feats,labels}.npy   seen training features (stage 2)
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
``resume=True`` continues from it and gives the same weights as an uninterrupted run).
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
from vldus.synthesis.data import (FeatureFile, check_training_labels, default_detector_checkpoint,
                                  derive_seed, feature_file_paths, require_unseen, sample_batches,
                                  sample_epoch_pool)
from vldus.synthesis.models import Critic, Generator, init_weights, seen_classifier_from_detector
from vldus.precision import resolve_precision
from vldus.synthesis.calibrate import calibrate_synth_dir, seen_feature_file
from vldus.synthesis.trainer import LOSS_NAMES, GANTrainer
from vldus.synthesis.unseen_classifier import LabelledFeatures, train_unseen_classifier

CHECKPOINT = "checkpoint_latest.pth"
SELECTIONS = ("last", "test")
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


def run_synthesis(cfg, options: SynthesisOptions) -> dict:
    """Train G/D for gan.epochs (resumable), then the unseen classifier; write every output.

    Returns the meta dict written to meta.json. Raises InputError for bad input and
    :class:`vldus.synthesis.trainer.NonFiniteLoss` when training diverges (the last good
    checkpoint stays in place).
    """
    t_start = time.time()
    gan, uc = cfg.gan, cfg.unseen_classifier
    device = torch.device(options.device)
    precision = resolve_precision(gan.precision, device)
    out_dir = options.out_dir or cfg.path("synth")
    os.makedirs(out_dir, exist_ok=True)
    inputs = _Inputs(cfg, options)
    split = inputs.split
    if uc.selection == "test":
        print(LEAK_NOTICE, flush=True)

    init_gen = torch.Generator().manual_seed(gan.seed)
    att_dim, dim = inputs.embeddings.shape[1], cfg.features.dim
    G = Generator(gan.nz, att_dim, gan.ngh, dim)
    D = Critic(dim, att_dim, gan.ndh, gan.d_feat)
    init_weights(G, init_gen)
    init_weights(D, init_gen)
    trainer = GANTrainer(G, D, torch.from_numpy(inputs.embeddings), inputs.seen_classifier, inputs.compat,
                         split.unseen_ids, gan, device, precision, inputs.distiller,
                         seed=derive_seed(gan.seed, 1))
    sampler = torch.Generator().manual_seed(gan.seed)  # epoch pools and batches

    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    log_path = os.path.join(out_dir, "log.jsonl")
    start_epoch, history, best = 0, [], None
    if options.resume and os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        diff = _differences(ckpt["settings"], _settings_key(cfg))
        if diff:
            raise InputError(ckpt_path, "written with other settings (" + "; ".join(diff[:4]) +
                             "); restore them or start without --resume")
        trainer.load_state_dict(ckpt["trainer"])
        sampler.set_state(ckpt["sampler_rng"])
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt.get("best")
        print(f"resuming after GAN epoch {start_epoch} from {ckpt_path}", flush=True)
    elif options.resume:
        print(f"no checkpoint in {out_dir}; starting from scratch", flush=True)
    with open(log_path, "w") as f:  # the log matches the checkpoint we continue from
        f.writelines(json.dumps(r) + "\n" for r in history)

    labels = torch.from_numpy(inputs.train.labels)
    fg_rows = torch.nonzero(labels > 0).squeeze(1)
    bg_rows = torch.nonzero(labels == 0).squeeze(1)
    unseen_att = torch.from_numpy(inputs.embeddings[split.unseen_ids])
    num_unseen = len(split.unseen_ids)

    def classifier_data(epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """syn_num synthesized features per unseen class + bg_multiplier*syn_num real background."""
        g = torch.Generator().manual_seed(derive_seed(gan.seed, 2, epoch))
        syn = trainer.synthesize(unseen_att, uc.syn_num, torch.Generator(device).manual_seed(
            derive_seed(gan.seed, 3, epoch))).cpu()
        n_bg = min(uc.bg_multiplier * uc.syn_num, len(bg_rows))
        bg = inputs.train.gather(bg_rows[torch.randperm(len(bg_rows), generator=g)[:n_bg]])
        feats = torch.cat([syn, bg])
        targets = torch.cat([torch.arange(1, num_unseen + 1).repeat_interleave(uc.syn_num),
                             torch.zeros(n_bg, dtype=torch.int64)])
        return feats, targets, g

    t_gan = time.time()
    bar = tqdm(total=gan.epochs, initial=start_epoch, desc="GAN epochs", unit="epoch", disable=options.quiet)
    for epoch in range(start_epoch + 1, gan.epochs + 1):
        pool = sample_epoch_pool(labels, gan.epoch_budget, sampler, fg_rows, bg_rows)
        batches = sample_batches(len(pool), gan.batch_size, sampler)
        feats = inputs.train.gather(pool).to(device)
        pool_labels = labels[pool].to(device)
        it_bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="it", leave=False,
                      disable=options.quiet)
        t0 = time.time()
        losses = trainer.train_epoch(feats, pool_labels, batches.to(device), epoch, it_bar.update)
        record = _epoch_record(epoch, losses, time.time() - t0, gan.batch_size)
        it_bar.close()
        del feats
        if uc.selection == "test":  # published: pick the classifier on real unseen test features
            x, y, g = classifier_data(epoch)
            def keep_best(cls_epoch, model, epoch=epoch):
                nonlocal best
                acc, _ = inputs.test_set.accuracy(model, device)
                record.setdefault("test_accuracy", []).append(acc)
                if best is None or acc >= best["accuracy"]:
                    best = {"accuracy": acc, "epoch": epoch, "cls_epoch": cls_epoch,
                            "classifier": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                            "generator": {k: v.detach().cpu().clone() for k, v in trainer.G.state_dict().items()},
                            "critic": {k: v.detach().cpu().clone() for k, v in trainer.D.state_dict().items()}}
            train_unseen_classifier(x.to(device), y.to(device), num_unseen, uc, g, keep_best)
            record["best_test_accuracy"] = best["accuracy"]
        history.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        save_torch({"epoch": epoch, "trainer": trainer.state_dict(), "sampler_rng": sampler.get_state(),
                     "history": history, "best": best, "settings": _settings_key(cfg)}, ckpt_path)
        bar.set_postfix(loss_d=f"{record['loss_d']:.3f}", loss_g=f"{record['loss_g']:.3f}",
                        samples_s=record["samples_per_s"])
        bar.update(1)
        if options.on_epoch_end is not None:
            options.on_epoch_end(epoch)
    bar.close()
    gan_seconds = time.time() - t_gan

    # --- the final classifier -----------------------------------------------------------
    t_cls = time.time()
    x, y, g = classifier_data(gan.epochs)
    if uc.selection == "last" or best is None:
        classifier = train_unseen_classifier(x.to(device), y.to(device), num_unseen, uc, g)
        cls_state = {k: v.detach().cpu() for k, v in classifier.state_dict().items()}
        gen_state, critic_state = trainer.G.state_dict(), trainer.D.state_dict()
        selected = {"epoch": gan.epochs, "cls_epoch": uc.epochs, "rule": "last"}
    else:
        cls_state, gen_state, critic_state = best["classifier"], best["generator"], best["critic"]
        selected = {"epoch": best["epoch"], "cls_epoch": best["cls_epoch"], "rule": "best test accuracy",
                    "test_accuracy": best["accuracy"]}
        trainer.G.load_state_dict(gen_state)  # the plots show the selected generator
        x, y, g = classifier_data(best["epoch"])
    write_linear(cls_state["fc.weight"], cls_state["fc.bias"], os.path.join(out_dir, "classifier_best.pth"),
                 options.layout, kind="synthesized", epoch=selected["cls_epoch"] - 1)
    save_torch({k: v.cpu() for k, v in gen_state.items()}, os.path.join(out_dir, "generator.pth"))
    # the joint GZSD scoring's threshold, chosen without test data: the same function (and so the
    # same file) as vldus calibrate-gzsd, on the files just written
    calibration = calibrate_synth_dir(cfg, out_dir, inputs.detector_checkpoint,
                                      options.features_dir or cfg.path("features"), device, warn=False)
    save_torch({k: v.cpu() for k, v in critic_state.items()}, os.path.join(out_dir, "critic.pth"))
    from vldus.synthesis.models import UnseenClassifier

    final = UnseenClassifier(dim, num_unseen)
    final.load_state_dict(cls_state)
    final.eval()
    with torch.no_grad():
        train_acc = float((final(x).argmax(1) == y).float().mean())
    results = {"classifier_train_accuracy": train_acc}
    if inputs.test_set is not None:
        acc, per_class = inputs.test_set.accuracy(final)
        names = ["background"] + list(split.classes[i - 1] for i in split.unseen_ids)
        results["test_mean_class_accuracy"] = acc
        results["test_class_accuracy"] = {names[k]: v for k, v in per_class.items()}
        results["test_rows"] = len(inputs.test_set)
        results["test_used_for_selection"] = uc.selection == "test"
    cls_seconds = time.time() - t_cls

    if options.plots:
        from vldus.synthesis.plots import plot_features_2d, plot_losses

        plot_losses(history, os.path.join(out_dir, "losses.png"))
        plot_features_2d(inputs, x[y > 0], y[y > 0], os.path.join(out_dir, "features_2d.png"),
                         PLOT_POINTS, derive_seed(gan.seed, 4))

    epochs_run = [r for r in history if r.get("iterations")]
    meta = {
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
                     "resumed": bool(options.resume and start_epoch > 0)},
        "selected": selected,
        "results": results,
        "gzsd_calibration": calibration,
        "timings_s": {"gan": round(gan_seconds, 2), "classifier": round(cls_seconds, 2),
                      "total": round(time.time() - t_start, 2),
                      "gan_epoch_mean": round(float(np.mean([r["seconds"] for r in epochs_run])), 3)
                      if epochs_run else None},
        "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in epochs_run])), 1)
        if epochs_run else None,
        "config": cfg.to_dict(),
    }
    write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta
