"""``vldus train-detector``: train the seen-class Faster R-CNN (docs/design.md §2).

Single process, or one process per GPU/CPU slot under torchrun (``tools/dist_train.sh``):
DistributedDataParallel with a DistributedSampler, nccl on CUDA, gloo on CPU.

Schedule (``cfg.train``): SGD (lr, momentum, weight decay on every parameter, as mmdetection),
linear warm-up over ``warmup_iters`` iterations from ``warmup_ratio`` x lr, lr x ``lr_gamma``
at each epoch of ``lr_steps`` (0-based epoch index, mmdetection's ``step=[8, 11]``), gradient
clipping at max-norm ``grad_clip``, autocast + GradScaler on CUDA when ``amp``.

Outputs in ``cfg.path('detector')``:
  ``epoch_N.pth``  {"model", "optimizer", "scheduler", "scaler", "rng" (one entry per rank:
                   torch, cuda, numpy, python), "epoch": N, "classes": [names], "world_size",
                   "iters_per_epoch", "rank_fingerprints" (sha256 of each rank's parameters:
                   equal under DDP, checked every epoch)}; written to a temporary file and renamed, so a crash never
                   leaves a half-written checkpoint. ``--resume`` continues from the latest.
  ``log.jsonl``    one JSON object per ``log_interval`` iterations ({"epoch", "iter", "lr",
                   "loss", each loss, "s_per_iter", "images_per_s"}) and one per epoch
                   ({"epoch", "loss", "time_s", "checkpoint"[, "val_seen_map50", "val"]}).
  ``metrics.json`` with ``--validate``: {"validation": {"per_epoch": [{"epoch", "val_seen_map50",
                   "seen_map", "seen_recall", "images", "images_per_rank"}, ...], "last": {...}}}.
  ``config.yaml``  the resolved config.

Determinism: data order depends on (train.seed, epoch), flips on (seed, epoch, sample), and
every RNG state is checkpointed; on CPU deterministic algorithms are switched on. On the CPU a
run stopped after epoch k and resumed ends with the same weights as an uninterrupted one; on
CUDA it does not (atomic adds in the backward of roi_align, index_select and interpolate), nor
does the CUDA RNG continue when the number of GPUs changed.

The losses stay on the device: they come to the host once per ``log_interval`` iterations, as
one stacked copy (vldus's only host read in the loop; torchvision's own box sampling, RPN
filtering and NMS still synchronise every iteration on CUDA). With amp the optimizer is fused
SGD, so that GradScaler reads no flag per step. A non-finite loss found there stops
training with exit code 1 and a message naming the epoch and the (first bad) iteration; no
checkpoint is written for that epoch, so the last good one stays as it was.

``--validate`` reports seen-class mAP after each epoch with ``vldus.evaluation.ZSDEvaluator`` on
``data.val``, or, when it is null, on ``data.test``; in both cases on the images whose objects
are all seen (the §2.3 rule), so unseen objects never count as misses or false positives.
Under torchrun each rank detects its share of these images and rank 0 evaluates the gathered
detections.

Several processes (:mod:`vldus.devices`): the work dir must be one shared file system (checked
at start: every rank must read a file rank 0 wrote there). Rank 0 decides which checkpoint
``--resume`` continues from and tells the others. The training collectives time out after
``VLDUS_TRAIN_TIMEOUT_MIN`` (default 30 minutes), so a rank that hangs stops the run within
that; the other ranks wait for the work rank 0 does alone (checkpoint, evaluation) on a gloo
barrier with ``VLDUS_DIST_TIMEOUT_MIN`` (default 120 minutes).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from vldus.config import add_set_argument
from vldus.config import Config, load_config, save_config
from vldus.data.images import to_float
from vldus.data.splits import Split
from vldus.devices import (broadcast_object, check_shared_dir, local_device, long_barrier, long_group,
                           raise_if_any, start_process_group, train_timeout)
from vldus.detection.dataset import DetectionDataset, collate_fn, training_dataset
from vldus.detection.model import build_detector, checkpoint_state, resolve_norm, to_device
from vldus.errors import InputError
from vldus.files import save_torch

LOG_FILE = "log.jsonl"
CHECKPOINT_RE = re.compile(r"epoch_(\d+)\.pth")


class NonFiniteLossError(RuntimeError):
    """Training diverged; the message names the epoch, the iteration and the last checkpoint."""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes (buffers such as BatchNorm statistics are per rank)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    long: Optional[object] = None  # gloo group with the long timeout (vldus.devices.long_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """One process per device. torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain run is rank 0 of 1.

    The process group has the short training timeout (:func:`vldus.devices.train_timeout`);
    what rank 0 does alone (the checkpoint, the log and the validation summary) ends on a barrier
    of ``long``, a gloo group with the long timeout (:func:`vldus.devices.dist_timeout`)."""
    device = local_device()
    start_process_group("nccl" if device.type == "cuda" else "gloo", timeout=train_timeout())
    if not dist.is_initialized():
        return DistInfo(device=device)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, long=long_group())


def resume_checkpoint(det_dir: str, split: Split, info: DistInfo) -> tuple[Optional[str], Optional[dict]]:
    """(path, checkpoint) of the latest epoch_N.pth of ``det_dir`` as rank 0 sees it, loaded on
    every rank; (None, None) when there is none. An InputError on every rank when any rank cannot
    read the file (a stale or node-local directory would otherwise restart ranks at different
    epochs)."""
    latest = broadcast_object(latest_checkpoint(det_dir) if info.is_main else None, info.long)
    if latest is None:
        return None, None
    ckpt, error = None, None
    try:
        ckpt = load_training_checkpoint(latest, split)
    except InputError as e:
        error = e
    raise_if_any(error, info.long)
    return latest, ckpt


@contextlib.contextmanager
def deterministic_cpu(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms for the duration of training (CPU runs), restored afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# --------------------------------------------------------------------------------------------
# Random state (checkpointed, so a resumed run continues the same random streams)
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker base_seed + worker_id; derive numpy/python from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_path(cfg: Config, epoch: int) -> str:
    return cfg.path("detector", f"epoch_{epoch}.pth")


def latest_checkpoint(directory: str) -> Optional[str]:
    """``epoch_N.pth`` with the largest N in ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    found = [(int(m.group(1)), f) for f in os.listdir(directory) if (m := CHECKPOINT_RE.fullmatch(f))]
    return os.path.join(directory, max(found)[1]) if found else None


def load_training_checkpoint(path: str, split: Split) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(path, f"cannot read checkpoint ({(str(e).splitlines() or [''])[0]})") from None
    checkpoint_state(ckpt, path)
    missing = [k for k in ("optimizer", "scheduler", "epoch", "rng") if k not in ckpt]
    if missing:
        raise InputError(path, f"not a train-detector checkpoint (no {', '.join(missing)}); cannot resume")
    if list(ckpt.get("classes", split.classes)) != list(split.classes):
        raise InputError(path, f"checkpoint classes differ from split {split.name!r}")
    return ckpt


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------
def lr_factor(iteration: int, iters_per_epoch: int, cfg: Config) -> float:
    """Multiplier of train.lr at global ``iteration`` (0-based): step decay x linear warm-up."""
    t = cfg.train
    epoch = iteration // iters_per_epoch
    factor = t.lr_gamma ** sum(epoch >= s for s in t.lr_steps)
    if iteration < t.warmup_iters:
        factor *= 1.0 - (1.0 - iteration / t.warmup_iters) * (1.0 - t.warmup_ratio)
    return factor


# --------------------------------------------------------------------------------------------
# Validation (seen classes)
# --------------------------------------------------------------------------------------------
def _evaluator_class():
    try:
        from vldus.evaluation import ZSDEvaluator
    except ImportError:
        raise InputError("--validate", "needs vldus.evaluation.ZSDEvaluator, which this installation "
                                       "does not have yet; train without --validate") from None
    return ZSDEvaluator


def validation_dataset(cfg: Config, split: Split) -> DetectionDataset:
    """``data.val`` (or ``data.test`` when val is null): images whose objects are all seen."""
    from vldus.data.readers import load_records, select_training

    source = cfg.data.val or cfg.data.test
    records = select_training(load_records(source, split), split, min_side=0)
    if not records:
        raise InputError(source.ann_file or source.list_file or None,
                         "--validate: no image whose objects are all seen classes")
    return DetectionDataset(records, train=False, uint8=True)


@torch.no_grad()
def detect_shard(model: torch.nn.Module, dataset: DetectionDataset, indices: list[int], batch_size: int,
                 workers: int, device: torch.device, progress: bool = True) -> list[tuple[int, dict]]:
    """(dataset index, detections {"boxes", "scores", "labels"} on the CPU) of the images ``indices``."""
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                        collate_fn=collate_fn, num_workers=workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    out, position = [], 0
    for images, _ in tqdm(loader, desc="validate", disable=not progress, leave=False):
        outputs = model([to_float(im.to(device, non_blocking=True)) for im in images])
        for o in outputs:
            out.append((indices[position], {k: v.float().cpu() for k, v in o.items()}))
            position += 1
    model.train(was_training)
    return out


def evaluate_seen(model: torch.nn.Module, dataset: DetectionDataset, cfg: Config, split: Split,
                  device: torch.device, progress: bool = True, info: Optional[DistInfo] = None) -> Optional[dict]:
    """Run the detector on ``dataset`` and return the evaluator's metrics dict (setting "seen").

    Under torchrun (``info``) every rank detects its share of the images (rank r: images r,
    r + world, ...) and rank 0 gathers the detections and evaluates; other ranks return None.
    """
    info = info or DistInfo(device=device)
    mine = list(range(info.rank, len(dataset), info.world_size))
    dets = detect_shard(model, dataset, mine, cfg.train.batch_size, cfg.data.workers, device,
                        progress and info.is_main)
    parts = _gather_to_main(dets, info)
    if not info.is_main:
        return None
    evaluator = _evaluator_class()(list(split.classes), list(split.unseen), setting="seen",
                                   iou_thresholds=tuple(cfg.evaluation.iou_thresholds),
                                   protocol=cfg.evaluation.protocol, excluded=tuple(split.excluded))
    ordered = sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])
    evaluator.process([dataset.records[i] for i, _ in ordered], [d for _, d in ordered])
    metrics = evaluator.evaluate()
    metrics["images_per_rank"] = [len(part) for part in parts]
    return metrics


def seen_map(metrics: dict, iou: str = "0.5") -> float:
    return float(metrics["groups"]["seen"]["map"][iou])


VAL_METRICS_FILE = "metrics.json"


def validation_record(epoch: int, metrics: dict) -> dict:
    """One epoch's validation summary: ``val_seen_map50`` and the evaluator's seen group."""
    seen = metrics["groups"]["seen"]
    return {"epoch": epoch, "val_seen_map50": seen_map(metrics), "seen_map": seen["map"],
            "seen_recall": seen["recall"], "images": sum(metrics["images_per_rank"]),
            "images_per_rank": metrics["images_per_rank"]}


def write_validation_metrics(path: str, record: dict) -> None:
    """Add ``record`` to ``path`` ({"validation": {"per_epoch": [...], "last": {...}}}, other keys
    kept; a record of a later or equal epoch, left by a run that was resumed, is replaced)."""
    from vldus.files import write_json

    data = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
    old = data.get("validation", {}).get("per_epoch", []) if isinstance(data.get("validation"), dict) else []
    per_epoch = [r for r in old if isinstance(r, dict) and r.get("epoch", 0) < record["epoch"]] + [record]
    data["validation"] = {"per_epoch": per_epoch, "last": record}
    write_json(path, data)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
class _JsonLog:
    """Append-only JSON-lines log, written by rank 0 only."""

    def __init__(self, path: Optional[str], fresh: bool):
        self.path = path
        if path and fresh:
            open(path, "w").close()

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def window_losses(rows: list[torch.Tensor], info: DistInfo) -> tuple[np.ndarray, np.ndarray]:
    """The loss rows of a logging window, (n, K) on the device, copied to the host in one go:
    (values (n, K), bad (n,) bool: a non-finite loss at that iteration on any rank).

    vldus's only host read in the training loop: the losses stay on the device in between.
    """
    block = torch.stack(rows).float()
    bad = (~torch.isfinite(block)).any(1).float()
    if info.world_size > 1:  # every rank stops at the same iteration
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    host = torch.cat([block, bad[:, None]], 1).cpu().numpy()
    return host[:, :-1], host[:, -1] > 0


def _check_finite(values: np.ndarray, bad: np.ndarray, names: list[str], epoch: int, first_iteration: int,
                  last_good: Optional[str]) -> None:
    """NonFiniteLossError naming the first bad iteration of a window (1-based ``first_iteration``
    is the window's first). The weights of the epoch are not saved, so the last good checkpoint
    stays as it was."""
    if not bad.any():
        return
    k = int(np.flatnonzero(bad)[0])
    parts = ", ".join(f"{name}={v:.4g}" for name, v in zip(names, values[k]))
    keep = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
    raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, iteration {first_iteration + k} ({parts}); "
                             f"{keep}. Lower train.lr or raise train.warmup_iters, then --resume")


def make_optimizer(params: list, cfg: Config, device: torch.device) -> torch.optim.SGD:
    """SGD per ``cfg.train``; fused on CUDA, where GradScaler's step then reads no found-inf flag
    on the host (one sync per iteration with plain SGD)."""
    t = cfg.train
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           fused=device.type == "cuda")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list, grad_clip: Optional[float]) -> None:
    """Backward (loss scaled on CUDA), gradient clipping at max-norm ``grad_clip``, one step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def load_scaler_state(scaler: torch.amp.GradScaler, saved: dict, path: str, info: DistInfo) -> None:
    """Continue the loss scale of an amp run. A run without amp (any CPU run, ``amp: false``)
    saves an empty state, which an enabled GradScaler refuses: it then starts afresh; a saved
    scale is unused when this run has amp off."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
    elif info.is_main and scaler.is_enabled() != bool(saved):
        now = "on" if scaler.is_enabled() else "off"
        print(f"note: {path} was written with amp {'off' if now == 'on' else 'on'}, this run has amp "
              f"{now}: the loss scale {'starts afresh' if now == 'on' else 'is not used'}", file=sys.stderr)


def train_detector(cfg: Config, resume: bool = False, validate: bool = False, skip_bad_images: bool = False,
                   progress: bool = True) -> Optional[str]:
    """Train per ``cfg`` and return the path of the last checkpoint (see the module docstring)."""
    info = init_distributed()
    split = cfg.load_split()
    t = cfg.train
    det_dir = cfg.path("detector")
    if cfg.detector.backbone_weights is None and resolve_norm(cfg.detector) == "frozen_bn":
        raise InputError(cfg.source_file or "config", "detector.norm frozen_bn needs detector.backbone_weights: "
                                                      "frozen BatchNorm on a random backbone diverges; "
                                                      "use norm bn, gn or auto")
    if validate:
        _evaluator_class()
    os.makedirs(det_dir, exist_ok=True)
    check_shared_dir(det_dir, info.long)

    seed_everything(t.seed + info.rank)
    dataset = training_dataset(cfg, split, skip_bad=skip_bad_images, uint8=True)  # to float on the device
    val_set = validation_dataset(cfg, split) if validate else None
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=t.seed)
    loader = DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, collate_fn=collate_fn,
                        num_workers=cfg.data.workers, worker_init_fn=_seed_worker,
                        pin_memory=info.device.type == "cuda")  # pinned: the copies can overlap
    iters_per_epoch = len(loader)

    model = to_device(build_detector(cfg, split), info.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, info.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, iters_per_epoch, cfg))
    amp = t.amp and info.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_epoch, last_good = 0, None
    latest, ckpt = resume_checkpoint(det_dir, split, info) if resume else (None, None)
    if latest:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        load_scaler_state(scaler, ckpt.get("scaler") or {}, latest, info)
        rngs = ckpt["rng"]
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
        elif info.is_main:
            print(f"note: {latest} was written by {len(rngs)} process(es), this run has "
                  f"{info.world_size}: random streams restart, the result will differ from an "
                  f"uninterrupted run", file=sys.stderr)
        start_epoch, last_good = int(ckpt["epoch"]), latest
        if ckpt.get("iters_per_epoch", iters_per_epoch) != iters_per_epoch and info.is_main:
            print(f"note: {iters_per_epoch} iterations per epoch now, {ckpt['iters_per_epoch']} "
                  f"before: the lr schedule is continued by iteration count", file=sys.stderr)
        if info.is_main:
            print(f"resuming from {latest} (epoch {start_epoch} of {t.epochs})", file=sys.stderr)
    elif info.is_main and resume:
        print(f"no checkpoint in {det_dir}; starting from scratch", file=sys.stderr)

    if info.is_main:
        save_config(cfg, os.path.join(det_dir, "config.yaml"))
    log = _JsonLog(os.path.join(det_dir, LOG_FILE) if info.is_main else None, fresh=not latest)

    train_model: torch.nn.Module = model
    if info.world_size > 1:
        if info.device.type == "cuda" and resolve_norm(cfg.detector) == "bn":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # no buffer broadcast at every forward: SyncBN keeps the statistics equal, and rank 0's
        # are broadcast before validation
        train_model = DistributedDataParallel(train_model, device_ids=[info.device.index] if info.device.index
                                              is not None else None, broadcast_buffers=False)
    skipped: set[str] = set()

    with deterministic_cpu(info.device.type == "cpu"):
        for epoch in range(start_epoch, t.epochs):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            train_model.train()
            epoch_start, sums, count = time.time(), {}, 0
            window_start, window = time.time(), []
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not (progress and info.is_main),
                       unit="it", dynamic_ncols=True)
            for i, (images, targets) in enumerate(bar):
                for target in targets:
                    skipped.update(target.pop("skipped", ()))
                images = [to_float(im.to(info.device, non_blocking=True)) for im in images]
                targets = [{k: (v.to(info.device, non_blocking=True) if torch.is_tensor(v) else v)
                            for k, v in tg.items()} for tg in targets]
                with torch.autocast(info.device.type, enabled=amp):
                    losses = train_model(images, targets)
                loss = sum(losses.values())

                optimizer_step(loss, optimizer, scaler, params, t.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()

                names = list(losses) + ["loss"]
                window.append(torch.stack([v.detach().float() for v in losses.values()] + [loss.detach().float()]))
                count += 1
                n_window = (i % t.log_interval) + 1
                if n_window == t.log_interval or i + 1 == iters_per_epoch:
                    values, bad = window_losses(window, info)
                    _check_finite(values, bad, names, epoch + 1, i + 2 - n_window, last_good)
                    means = values.mean(0)
                    for k, v in zip(names, values.sum(0)):
                        sums[k] = sums.get(k, 0.0) + float(v)
                    elapsed = time.time() - window_start
                    record = {"epoch": epoch + 1, "iter": i + 1, "iters": iters_per_epoch, "lr": lr}
                    record |= {k: float(v) for k, v in zip(names, means)}
                    record |= {"s_per_iter": elapsed / n_window,
                               "images_per_s": n_window * t.batch_size * info.world_size / max(elapsed, 1e-9)}
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{record['images_per_s']:.1f}")
                    window_start, window = time.time(), []

            summary = {"epoch": epoch + 1} | {k: v / max(count, 1) for k, v in sums.items()}
            summary["time_s"] = time.time() - epoch_start
            path = checkpoint_path(cfg, epoch + 1)
            rngs = _gather(rng_state(), info)
            fingerprints = _gather(weights_fingerprint(model), info)
            if len(set(fingerprints)) > 1:  # DDP averages gradients: the ranks must agree
                raise RuntimeError(f"epoch {epoch + 1}: the {info.world_size} processes ended with "
                                   "different weights (gradients were not synchronised)")
            if info.is_main:
                save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                 "rng": rngs, "epoch": epoch + 1, "classes": list(split.classes),
                                 "world_size": info.world_size, "iters_per_epoch": iters_per_epoch,
                            "rank_fingerprints": fingerprints}, path)
                summary["checkpoint"] = path
            long_barrier(info.long)  # the others wait here, not in a collective, while rank 0 saves
            if val_set is not None:  # every rank evaluates its share of the images
                _broadcast_buffers(model, info)  # with rank 0's BatchNorm statistics (the checkpoint's)
                metrics = evaluate_seen(model, val_set, cfg, split, info.device, progress, info)
                if info.is_main:
                    val = validation_record(epoch + 1, metrics)
                    summary["val_seen_map50"] = val["val_seen_map50"]
                    summary["val"] = {k: v for k, v in val.items() if k not in ("epoch", "val_seen_map50")}
                    write_validation_metrics(os.path.join(det_dir, VAL_METRICS_FILE), val)
                    print(f"epoch {epoch + 1}: seen mAP@0.5 {val['val_seen_map50']:.1f}", file=sys.stderr)
            if info.is_main:
                log.write(summary)
            long_barrier(info.long)  # while rank 0 evaluates and writes
            last_good = path

    all_skipped = set().union(*_gather(sorted(skipped), info))
    if all_skipped and info.is_main:
        print(f"skipped {len(all_skipped)} unreadable image(s), e.g. {sorted(all_skipped)[0]}", file=sys.stderr)
    return last_good


def _broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running statistics, which each rank updates on its own data
    after DDP's broadcast) on every rank."""
    if info.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _gather_to_main(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on rank 0 ([] on the other ranks)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _gather(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] (every rank gets the list)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_parser(sub, common) -> None:
    p = sub.add_parser("train-detector", parents=[common],
                       help="train the seen-class Faster R-CNN (single process or under torchrun)",
                       description="Train the seen-class detector. Exit 2: bad input; exit 1: the loss "
                                   "became non-finite (the last good checkpoint is kept).")
    p.add_argument("--config", required=True, help="config YAML (or the name of a bundled one)")
    p.add_argument("--work-dir", help="override cfg.work_dir; checkpoints go to WORK_DIR/detector/")
    p.add_argument("--resume", action="store_true", help="continue from the latest epoch_N.pth")
    p.add_argument("--validate", action="store_true", help="report seen-class mAP after each epoch")
    add_set_argument(p)
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted at the end) instead of stopping")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    try:
        last = train_detector(cfg, resume=args.resume, validate=args.validate,
                              skip_bad_images=args.skip_bad_images, progress=not args.quiet)
    except NonFiniteLossError as e:
        print(f"vldus {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if last and not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"detector checkpoint: {last}", file=sys.stderr)
    return 0
