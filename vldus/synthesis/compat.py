"""Stage 3a: the compatibility ("unseen") classifier, ``vldus train-unseen-classifier``
(docs/design.md §5).

A projection ``fc`` (1024 -> d) is trained on SEEN features with logits fc(x) · E^T, E = the
fixed [background] + seen rows of the class-embedding matrix. Cross-entropy, SGD (lr, momentum),
StepLR, a random train/val split; the state dict with the lowest validation loss is kept. It is
later used frozen with the UNSEEN rows as the loss C_u of the generator.

Output: ``cfg.path('synth', 'compat_classifier.pth')`` = {"fc.weight": (d, 1024), "fc.bias": (d,)}
(``--layout published``: the released {"fc1.weight", "fc1.bias"}), ``compat_classifier.json`` (losses per epoch), and
``compat_checkpoint.pth`` (per epoch, for ``--resume``; removed when done).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vldus.config import add_set_argument
from vldus.classifier_files import LAYOUTS, read_linear, write_linear
from vldus.errors import InputError
from vldus.synthesis.data import CHUNK_ROWS, FeatureFile, check_training_labels, feature_file_paths
from vldus.synthesis.models import CompatClassifier
from vldus.files import save_torch
from vldus.precision import resolve_precision

COMPAT_FILE = "compat_classifier.pth"


class CompatDivergence(RuntimeError):
    """The loss became non-finite; the message names the epoch and the last good checkpoint."""


def compat_classifier_path(cfg) -> str:
    return cfg.path("synth", COMPAT_FILE)


def load_compat_classifier(path: str, embeddings: torch.Tensor, dim: int) -> CompatClassifier:
    """The trained projection scored against ``embeddings`` (K, d) (e.g. the unseen rows).

    ``path``: ours (``fc.weight`` (d, dim) / ``fc.bias`` (d,)) or the released
    ``unseen_Classifier*.pth`` (``fc1.weight`` / ``fc1.bias``); see :mod:`vldus.classifier_files`.
    """
    if not os.path.isfile(path):
        raise InputError(path, "compatibility classifier not found (run vldus train-unseen-classifier "
                               "first, or give --compat-classifier FILE)")
    weight, bias = read_linear(path, "compatibility classifier")
    d = embeddings.shape[1]
    if tuple(weight.shape) != (d, dim) or tuple(bias.shape) != (d,):
        raise InputError(path, f"weight has shape {tuple(weight.shape)}, expected "
                               f"({d}, {dim}) = (embedding dim, features.dim)")
    model = CompatClassifier(dim, embeddings)
    model.load_state_dict({"fc.weight": weight, "fc.bias": bias})
    return model


def _batches(features: FeatureFile, rows: np.ndarray, targets: np.ndarray, batch_size: int,
             device: torch.device = torch.device("cpu")):
    """(x, y) batches on ``device`` over ``rows`` in the given order, read CHUNK_ROWS rows at a
    time; each chunk is uploaded once (pinned, asynchronous on CUDA) and sliced on the device."""
    chunk = max(batch_size, CHUNK_ROWS // batch_size * batch_size)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        x, y = features.gather(part), torch.from_numpy(targets[part])
        if device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for b in range(0, len(part), batch_size):
            yield x[b:b + batch_size], y[b:b + batch_size]


def train_compat_classifier(features: FeatureFile, embeddings: np.ndarray, seen_ids: list[int],
                            compat_cfg, device: str = "cpu", precision: str = "fp32",
                            quiet: bool = False, checkpoint_path: str | None = None,
                            resume: bool = False) -> tuple[dict, list[dict]]:
    """Train on ``features`` (labels 0 + seen ids); returns (best state dict, per-epoch history).

    ``embeddings`` (C+1, d): the full class matrix; rows [0] + seen_ids are used.
    With ``checkpoint_path`` a checkpoint is written after every epoch, and ``resume`` continues
    from it (same result as an uninterrupted run).
    """
    device = torch.device(device)
    classes = [0] + list(seen_ids)
    to_position = np.full(len(embeddings), -1, dtype=np.int64)  # detector index -> logit column
    to_position[classes] = np.arange(len(classes))
    targets = to_position[features.labels]
    if (targets < 0).any():
        raise InputError(features.labels_path, f"{int((targets < 0).sum())} rows are neither "
                                               "background nor a seen class")

    gen = torch.Generator().manual_seed(compat_cfg.seed)
    perm = torch.randperm(features.num_rows, generator=gen).numpy()
    n_val = int(round(features.num_rows * compat_cfg.val_fraction))
    val_rows, train_rows = np.sort(perm[:n_val]), perm[n_val:]

    # gen is a CPU generator (it orders the rows of the memory-mapped file), so the weights are
    # drawn on the CPU and then moved: the same initial weights on every device
    model = CompatClassifier(features.dim, torch.from_numpy(embeddings[classes]))
    bound = features.dim ** -0.5  # nn.Linear's default init, from the seeded generator
    with torch.no_grad():
        model.fc.weight.uniform_(-bound, bound, generator=gen)
        model.fc.bias.uniform_(-bound, bound, generator=gen)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=compat_cfg.lr, momentum=compat_cfg.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, compat_cfg.lr_step, compat_cfg.lr_gamma)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    start_epoch, history, best_state, best_loss = 0, [], None, float("inf")
    if resume and checkpoint_path and os.path.isfile(checkpoint_path):
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["rng"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        best_state, best_loss = ckpt["best_state"], ckpt["best_loss"]

    bar = tqdm(total=compat_cfg.epochs, initial=start_epoch, desc="compat classifier",
               unit="epoch", disable=quiet)
    for epoch in range(start_epoch, compat_cfg.epochs):
        t0 = time.time()
        model.train()
        order = train_rows[torch.randperm(len(train_rows), generator=gen).numpy()]
        train_loss = torch.zeros((), device=device)
        for x, y in _batches(features, order, targets, compat_cfg.batch_size, device):
            with autocast:
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_loss += loss.detach() * len(y)
        scheduler.step()
        model.eval()
        val_sums = torch.zeros(2, device=device)  # loss, correct: on the device until the epoch ends
        with torch.no_grad(), autocast:
            for x, y in _batches(features, val_rows, targets, compat_cfg.val_batch_size, device):
                logits = model(x).float()
                val_sums[0] += F.cross_entropy(logits, y, reduction="sum")
                val_sums[1] += (logits.argmax(1) == y).sum()
        train_sum, val_loss, val_correct = torch.cat([train_loss.view(1), val_sums]).tolist()
        n_val_rows = max(len(val_rows), 1)
        record = {"epoch": epoch + 1, "train_loss": train_sum / max(len(train_rows), 1),
                  "val_loss": val_loss / n_val_rows, "val_accuracy": int(val_correct) / n_val_rows,
                  "seconds": time.time() - t0}
        if not (np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"])):
            keep = (f"last good checkpoint: {checkpoint_path} (epoch {epoch})" if checkpoint_path and epoch
                    and os.path.isfile(checkpoint_path) else "no checkpoint was written")
            raise CompatDivergence(f"non-finite loss at epoch {epoch + 1}; {keep}. Lower compat.lr, "
                                   "then --resume")
        history.append(record)
        if record["val_loss"] < best_loss or best_state is None:
            best_loss = record["val_loss"]
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if checkpoint_path:
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": gen.get_state(),
                         "epoch": epoch + 1, "history": history, "best_state": best_state,
                         "best_loss": best_loss}, checkpoint_path)
        bar.set_postfix(val_loss=f"{record['val_loss']:.4f}", val_acc=f"{record['val_accuracy']:.3f}")
        bar.update(1)
    bar.close()
    if best_state is None:  # zero epochs configured
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return best_state, history


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------
def add_parser(sub, common) -> None:
    p = sub.add_parser("train-unseen-classifier", parents=[common],
                       help="stage 3a: compatibility classifier on seen features (docs/design.md §5)",
                       description="Train the projection fc (features -> class-embedding space) on "
                                   "seen training features; writes WORK_DIR/synth/compat_classifier.pth.")
    p.add_argument("--config", required=True, help="split config (configs/*.yaml or a bundled name)")
    add_set_argument(p)
    p.add_argument("--features-dir", help="folder of train_{fg}_{bg}_feats.npy (default WORK_DIR/features)")
    p.add_argument("--out", help=f"output file (default WORK_DIR/synth/{COMPAT_FILE})")
    p.add_argument("--layout", choices=LAYOUTS, default="ours",
                   help="file layout: ours {fc.weight, fc.bias} or published (the released "
                        "train_unseen_classifier.py's {fc1.weight, fc1.bias}, for the released code)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    p.set_defaults(func=run)


def default_device(requested: str | None) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device", f"{requested}: CUDA is not available")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from vldus.config import load_config
    from vldus.data.embeddings import load_class_embeddings

    cfg = load_config(args.config, args.set)
    out = args.out or compat_classifier_path(cfg)
    checkpoint = os.path.join(os.path.dirname(os.path.abspath(out)), "compat_checkpoint.pth")
    if args.resume and os.path.isfile(out) and not os.path.isfile(checkpoint):
        print(f"compatibility classifier: {out} is finished (--resume: nothing to do)")
        return 0
    split = cfg.load_split()
    device = default_device(args.device)
    embeddings = load_class_embeddings(cfg.embeddings.file, split, cfg.embeddings.spectral_norm)
    feats_path, labels_path = feature_file_paths(args.features_dir or cfg.path("features"), "train",
                                                 cfg.features.fg_iou, cfg.features.bg_iou)
    features = FeatureFile.open(feats_path, labels_path, cfg.features.dim, split.num_classes)
    check_training_labels(features, split)
    features.check_finite(quiet=args.quiet)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    precision = resolve_precision(cfg.gan.precision, device)
    t0 = time.time()
    try:
        state, history = train_compat_classifier(features, embeddings, split.seen_ids, cfg.compat, device,
                                                 precision, args.quiet, checkpoint, args.resume)
    except CompatDivergence as e:
        print(f"vldus {args.command}: error: {e}", file=sys.stderr)
        return 1
    write_linear(state["fc.weight"], state["fc.bias"], out, args.layout, kind="compat")
    best = min(history, key=lambda r: r["val_loss"]) if history else {}
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"classes": ["background"] + list(split.seen), "features": feats_path,
                   "rows": features.num_rows, "precision": precision, "device": device,
                   "best_epoch": best.get("epoch"), "best_val_loss": best.get("val_loss"),
                   "history": history, "seconds": round(time.time() - t0, 2)}, f, indent=1)
    if os.path.isfile(checkpoint):
        os.remove(checkpoint)
    print(f"compatibility classifier: {out} (best epoch {best.get('epoch')}, val loss "
          f"{best.get('val_loss', float('nan')):.4f}, val accuracy {best.get('val_accuracy', float('nan')):.3f})")
    return 0
