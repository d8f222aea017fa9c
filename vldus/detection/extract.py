"""Stage 2: RoI feature extraction with the frozen seen-class detector (docs/design.md §3).

For every source image (one at a time, the detector frozen in eval mode):

1. the *training* pipeline: resize (the detector's own transform) and a random horizontal flip
   (``--data-split train`` and ``test``; validation images are not flipped: they stand for
   test images, which never are);
2. RPN proposals with the *training* proposal settings (pre/post-NMS top-n of training), or
   ``features.proposals`` post-NMS proposals when that is set (more proposals: more real RoIs
   per image to sample from);
3. :func:`assign_and_sample`: GT boxes added as proposals, max-IoU assignment (foreground
   IoU >= ``features.fg_iou``, background < ``features.bg_iou``, the band between ignored), the
   training sampler (``num_rois`` RoIs, at most ``pos_fraction`` foreground), then every sampled
   foreground RoI plus at most ``bg_per_fg`` times as many sampled background RoIs;
4. RoIAlign + the two shared FC layers (+ReLU): one 1024-d row per kept RoI, labelled with the
   detector class index of its GT (0 = background).

``--data-split val`` reads ``data.val`` (``--classes seen``): RoI features of held-out images,
never trained on, for calibrating the seen/unseen decisions (``vldus calibrate-gzsd``).

Output, in ``SAVE_DIR``: ``{data_split}_{fg}_{bg}_feats.npy`` (N, 1024) float32,
``{data_split}_{fg}_{bg}_labels.npy`` (N,) int64, and ``{data_split}_{fg}_{bg}_manifest.json``
(written last: counts and the run's settings). Rows go image after image, in the order of the
source list (the repeat passes one after the other). The work is cut into shards of
``--shard-size`` image passes (see :mod:`vldus.detection.shards`) so a killed run resumes and
several torchrun processes share it; every pass draws its flip and samples from its own seeded
generator, so the rows do not depend on the number of processes nor on interruptions.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import os
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou
from tqdm import tqdm

from vldus.config import add_set_argument
from vldus.config import Config, FeatureConfig, load_config
from vldus.data.images import read_rgb
from vldus.data.records import ImageRecord
from vldus.data.splits import Split
from vldus.devices import check_shared_dir, local_device, start_process_group
from vldus.detection.shards import ShardStore, merge_shards, read_json, shard_ranges
from vldus.errors import InputError, require_file
from vldus.files import write_json


BARRIER_TIMEOUT = datetime.timedelta(hours=12)


# --------------------------------------------------------------------------------------------
# The extraction rules (pure functions: the unit tests feed them hand-made boxes)
# --------------------------------------------------------------------------------------------
def _random_subset(indices: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` (or all, if fewer) elements of ``indices`` in random order."""
    order = torch.randperm(len(indices), generator=generator)[:count]
    return indices[order.to(indices.device)]


def assign_and_sample(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, cfg: FeatureConfig,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Choose the RoIs of one image whose features are kept, and their labels.

    proposals: (P, 4) xyxy; gt_boxes: (G, 4) xyxy (no ignore boxes); gt_labels: (G,) int64
    detector class indices. Returns ``rois`` (F + B, 4) and ``labels`` (F + B,) int64: the F
    sampled foreground RoIs first (label = class of the GT they overlap most), then B <=
    ``cfg.bg_per_fg * F`` sampled background RoIs (label 0).

    - the GT boxes are added to the proposals (in front, IoU 1 with themselves);
    - a box is foreground if its best IoU with a GT is >= ``cfg.fg_iou``, background if it is
      < ``cfg.bg_iou``; boxes in between are ignored (never sampled);
    - the training sampler draws ``cfg.num_rois`` boxes, at most ``int(num_rois * pos_fraction)``
      of them foreground, the rest background (fewer if there are not enough);
    - of the sampled background boxes, a random ``bg_per_fg * F`` are kept.
    """
    boxes = torch.cat([gt_boxes.to(proposals), proposals])
    if len(gt_boxes):
        max_iou, matched = box_iou(gt_boxes.to(boxes), boxes).max(dim=0)
    else:  # no GT: every box is background
        max_iou = boxes.new_zeros(len(boxes))
        matched = torch.zeros(len(boxes), dtype=torch.long, device=boxes.device)
    fg = torch.nonzero(max_iou >= cfg.fg_iou).flatten()
    bg = torch.nonzero(max_iou < cfg.bg_iou).flatten()

    fg = _random_subset(fg, int(cfg.num_rois * cfg.pos_fraction), generator)
    bg = _random_subset(bg, cfg.num_rois - len(fg), generator)
    bg = bg[: cfg.bg_per_fg * len(fg)]  # bg is in random order: its head is a random subset

    keep = torch.cat([fg, bg])
    labels = torch.zeros(len(keep), dtype=torch.int64, device=boxes.device)
    labels[: len(fg)] = gt_labels.to(boxes.device, torch.int64)[matched[fg]]
    return boxes[keep], labels


def pass_generator(seed: int, item: int) -> torch.Generator:
    """The random generator of work item ``item`` (one image pass): independent of sharding."""
    state = np.random.SeedSequence([seed, item]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror an image (C, H, W) and its xyxy boxes (N, 4) left to right."""
    width = image.shape[-1]
    flipped = boxes[:, [2, 1, 0, 3]].clone()
    flipped[:, [0, 2]] = width - flipped[:, [0, 2]]
    return image.flip(-1), flipped


@contextlib.contextmanager
def training_proposals(rpn, post_nms: Optional[int] = None) -> Iterator[None]:
    """Make a torchvision RegionProposalNetwork in eval mode use its *training* top-n settings
    (``post_nms``, when given, replaces the training post-NMS count)."""
    pre, post = rpn._pre_nms_top_n, rpn._post_nms_top_n
    count = post["training"] if post_nms is None else post_nms
    rpn._pre_nms_top_n = {"training": pre["training"], "testing": pre["training"]}
    rpn._post_nms_top_n = {"training": count, "testing": count}
    try:
        yield
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n = pre, post


class RoIFeatureExtractor:
    """Features of the kept RoIs of one image, from a frozen torchvision FasterRCNN.

    Uses only the model's public parts: ``transform``, ``backbone``, ``rpn`` and
    ``roi_heads.box_roi_pool`` / ``roi_heads.box_head``.
    """

    def __init__(self, model: torch.nn.Module, features: FeatureConfig, flip: float,
                 amp: bool = False):
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.cfg = features
        self.flip = flip
        self.device = next(model.parameters()).device
        self.amp = amp and self.device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, image: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                 generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """image uint8 (3, H, W); gt_boxes (G, 4) xyxy pixels; gt_labels (G,) detector indices.

        Returns feats (K, dim) float32 and labels (K,) int64 (numpy, K = F + B, see
        :func:`assign_and_sample`).
        """
        model = self.model
        gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
        gt_labels = torch.as_tensor(gt_labels, dtype=torch.int64).reshape(-1)
        if torch.rand((), generator=generator).item() < self.flip:
            image, gt_boxes = hflip(image, gt_boxes)
        image = image.to(self.device, torch.float32) / 255.0
        target = {"boxes": gt_boxes.to(self.device), "labels": gt_labels.to(self.device)}
        images, targets = model.transform([image], [target])
        with torch.autocast(self.device.type, enabled=self.amp):
            features = model.backbone(images.tensors)
            if isinstance(features, Tensor):
                features = OrderedDict([("0", features)])
            with training_proposals(model.rpn, self.cfg.proposals):
                proposals, _ = model.rpn(images, features)
            proposals = proposals[0].float()
            proposals = proposals[torch.isfinite(proposals).all(dim=1)]  # guard against a diverged model
            rois, labels = assign_and_sample(proposals, targets[0]["boxes"],
                                             targets[0]["labels"], self.cfg, generator)
            if len(rois) == 0:
                return np.zeros((0, self.cfg.dim), np.float32), np.zeros((0,), np.int64)
            x = model.roi_heads.box_roi_pool(features, [rois], images.image_sizes)
            x = model.roi_heads.box_head(x)
        if x.shape[1] != self.cfg.dim:
            raise InputError("features.dim", f"is {self.cfg.dim} but the detector's box head "
                                             f"gives {x.shape[1]}-d features")
        return x.float().cpu().numpy(), labels.cpu().numpy()


# --------------------------------------------------------------------------------------------
# Output files and the sharded, resumable run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputPaths:
    feats: str
    labels: str
    manifest: str
    parts: str  # shard folder, removed once the run is complete


def output_paths(save_dir: str, data_split: str, fg_iou: float, bg_iou: float) -> OutputPaths:
    """The published names: ``{data_split}_{fg}_{bg}_feats.npy`` etc. (e.g. train_0.6_0.3_)."""
    stem = os.path.join(save_dir, f"{data_split}_{float(fg_iou)}_{float(bg_iou)}")
    return OutputPaths(f"{stem}_feats.npy", f"{stem}_labels.npy", f"{stem}_manifest.json",
                       f"{stem}.parts")


def _dist_info() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(value):
    """Rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _normalized(obj):
    """``obj`` as it reads back from JSON (tuples become lists), so settings compare equal."""
    return json.loads(json.dumps(obj))


def _complete(paths: OutputPaths, run_info: dict) -> Optional[dict]:
    """The manifest if a finished run with these settings left its outputs, else None."""
    manifest = read_json(paths.manifest)
    if manifest and manifest.get("run") == run_info and os.path.isfile(paths.feats) \
            and os.path.isfile(paths.labels):
        return manifest
    return None


def _settings_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in keys[:3])


def _prepare(store: ShardStore, paths: OutputPaths, run_info: dict, resume: bool) -> Optional[dict]:
    """Rank 0: decide between 'already complete' (returns the manifest), 'resume the parts
    folder' and 'start over' (old outputs removed)."""
    if resume:
        manifest = _complete(paths, run_info)
        if manifest is not None:
            store.remove()  # left over if the run was killed right after its manifest
            return manifest
        if store.exists():
            old = store.run_info()
            if old != run_info:
                raise InputError(store.run_file, "the parts folder was written by a run with other "
                                 f"settings ({_settings_difference(old or {}, run_info)}); "
                                 "rerun without --resume")
            return None
    for path in (paths.manifest, paths.feats, paths.labels):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    store.reset(run_info)
    return None


def run_extraction(extractor, records: Sequence[ImageRecord], paths: OutputPaths, *,
                   repeat: int = 1, seed: int = 0, shard_size: int = 500, resume: bool = False,
                   skip_bad_images: bool = False, quiet: bool = False, workers: int = 0,
                   class_names: Sequence[str] = (), run_info: Optional[dict] = None) -> Optional[dict]:
    """Extract the RoI features of ``records`` (each one ``repeat`` times) into ``paths``.

    ``extractor(image uint8 (3,H,W), boxes, labels, generator) -> (feats, labels)`` is a
    :class:`RoIFeatureExtractor` (or any callable with that contract). Under torchrun each
    process takes its share of the unfinished shards; rank 0 merges and returns the manifest
    dict, other ranks return None. ``run_info`` (JSON-able settings that determine the output)
    guards ``resume``: a parts folder of a run with other settings is an InputError.
    ``workers`` threads decode the next images while the model runs.
    """
    rank, world = _dist_info()
    dim = extractor.cfg.dim
    n = len(records)
    items = shard_ranges(n * repeat, shard_size)
    image_list = hashlib.sha1("\n".join(r.path for r in records).encode()).hexdigest()
    run_info = _normalized({**(run_info or {}), "images": n, "image_list_sha1": image_list,
                            "repeat": repeat, "seed": seed, "shard_size": shard_size,
                            "features": dataclasses.asdict(extractor.cfg), "flip": extractor.flip})
    store = ShardStore(paths.parts, dim)
    started = time.time()

    done = None
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(paths.feats)), exist_ok=True)
        done = _prepare(store, paths, run_info, resume)
    done = _broadcast(done)
    if done is not None:
        return done if rank == 0 else None
    check_shared_dir(paths.parts)  # rank 0 merges every rank's shards from this folder
    # rank 0's list for every rank: stale directory caches (NFS) would make shards done twice or never
    pending = _broadcast(store.pending(len(items)) if rank == 0 else None)

    mine = pending[rank::world]
    bar = tqdm(total=sum(len(items[i]) for i in mine), unit="img", desc="extract-features",
               disable=quiet or rank != 0, dynamic_ncols=True)
    for shard in mine:
        counts = np.zeros(0, np.int64)
        skipped: list[str] = []
        with store.writer(shard) as writer:
            loaded = _prefetch(lambda item: read_rgb(records[item % n].path), items[shard], workers)
            for item, image_of in zip(items[shard], loaded):
                record = records[item % n]
                try:
                    image = image_of()
                except InputError:
                    if not skip_bad_images:
                        raise
                    skipped.append(record.path)
                    bar.update()
                    continue
                keep = ~record.ignore
                feats, labels = extractor(image, torch.from_numpy(record.boxes[keep]),
                                          torch.from_numpy(record.labels[keep]),
                                          pass_generator(seed, item))
                writer.append(feats, labels)
                counts = _add_counts(counts, labels)
                bar.update()
            writer.commit({"items": len(items[shard]), "skipped": skipped,
                           "label_counts": {str(k): int(v) for k, v in enumerate(counts) if v}})
    bar.close()
    _barrier()
    if rank != 0:
        return None
    return _finish(store, paths, len(items), run_info, class_names, time.time() - started)


def _prefetch(load: Callable[[int], object], items: Sequence[int], workers: int) -> Iterator[Callable[[], object]]:
    """For each item, a callable returning ``load(item)`` (or raising its error), loaded up to
    ``2 * workers`` items ahead in background threads; in the caller's thread if ``workers`` is 0."""
    if workers <= 0:
        for item in items:
            yield functools.partial(load, item)
        return
    with ThreadPoolExecutor(workers) as pool:
        queue: deque[Future] = deque()
        ahead = iter(items)
        for item in itertools.islice(ahead, 2 * workers):
            queue.append(pool.submit(load, item))
        while queue:
            yield queue.popleft().result
            for item in itertools.islice(ahead, 1):
                queue.append(pool.submit(load, item))


def _add_counts(counts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    new = np.bincount(labels, minlength=len(counts)) if len(labels) else np.zeros(0, np.int64)
    if len(new) > len(counts):
        counts = np.pad(counts, (0, len(new) - len(counts)))
    counts[: len(new)] += new
    return counts


def _finish(store: ShardStore, paths: OutputPaths, num_shards: int, run_info: dict,
            class_names: Sequence[str], seconds: float) -> dict:
    """Merge the finished shards, write the manifest (last), drop the parts folder."""
    markers = [store.finished(i) for i in range(num_shards)]
    missing = [i for i, m in enumerate(markers) if m is None]
    if missing:
        raise RuntimeError(f"shards {missing} are not finished")  # a process died: rerun --resume
    with contextlib.suppress(FileNotFoundError):
        os.remove(paths.manifest)
    rows = merge_shards(store, range(num_shards), paths.feats, paths.labels)
    label_counts: dict[int, int] = {}
    for m in markers:
        for k, v in m["label_counts"].items():
            label_counts[int(k)] = label_counts.get(int(k), 0) + v
    names = ["background", *class_names]
    skipped = sorted({p for m in markers for p in m["skipped"]})
    bg_rows = label_counts.get(0, 0)
    manifest = {
        "feats": os.path.basename(paths.feats), "labels": os.path.basename(paths.labels),
        "rows": rows, "dim": store.dim, "fg_rows": rows - bg_rows, "bg_rows": bg_rows,
        "images": run_info["images"], "passes": sum(m["items"] for m in markers) - sum(
            len(m["skipped"]) for m in markers),
        "skipped_images": skipped,
        "rows_per_label": {(names[k] if k < len(names) else str(k)): v
                           for k, v in sorted(label_counts.items())},
        "seconds": round(seconds, 1),
        "run": run_info,
    }
    write_json(paths.manifest, manifest)
    store.remove()
    return manifest


# --------------------------------------------------------------------------------------------
# Source images and the command
# --------------------------------------------------------------------------------------------
def select_images(cfg: Config, split: Split, classes: str, data_split: str) -> tuple[list[ImageRecord], int]:
    """The source images of one extraction, and how many times each is processed.

    ``--classes seen`` keeps images whose objects are all seen (the training selection of §2.3,
    so ``seen``/``train`` is the detector's own training set, RepeatDataset factor honoured);
    ``--classes unseen`` keeps images whose objects are all unseen (the §3 test features).
    ``--data-split`` picks the data source (``cfg.data.train``, ``cfg.data.val`` or ``cfg.data.test``).
    """
    from vldus.data.readers import load_records, select_training, select_unseen_only

    if data_split == "val" and cfg.data.val is None:
        raise InputError(cfg.source_file or "config", "--data-split val: data.val is null (no validation images)")
    if data_split == "val" and classes != "seen":
        raise InputError("--classes", "--data-split val has seen classes only (validation images hold no unseen object)")
    source = {"train": cfg.data.train, "val": cfg.data.val, "test": cfg.data.test}[data_split]
    records = load_records(source, split)
    if classes == "seen":
        records = select_training(records, split, cfg.data.min_image_side)
    else:
        records = select_unseen_only(records, split)
    if not records:
        raise InputError(source.ann_file or source.list_file or cfg.source_file,
                         f"no {data_split} images whose objects are all {classes}")
    return list(records), (source.repeat if data_split == "train" else 1)


def add_parser(sub, common) -> None:
    p = sub.add_parser("extract-features", parents=[common],
                       help="extract RoI features with the trained detector (stage 2)",
                       description="Write {split}_{fg}_{bg}_feats.npy (N x 1024 float32) and "
                                   "_labels.npy (N int64; 0 = background) into --save-dir.")
    p.add_argument("--config", required=True, help="split config (configs/*.yaml)")
    p.add_argument("--checkpoint", required=True, help="detector checkpoint (train-detector)")
    p.add_argument("--classes", required=True, choices=["seen", "unseen"],
                   help="images whose objects are all seen / all unseen")
    p.add_argument("--data-split", required=True, choices=["train", "val", "test"],
                   help="data source: cfg.data.train, cfg.data.val (seen classes only) or cfg.data.test")
    p.add_argument("--save-dir", default=None, help="output folder (default: WORK_DIR/features)")
    add_set_argument(p)
    p.add_argument("--seed", type=int, default=None, help="default: features.seed of the config")
    p.add_argument("--resume", action="store_true", help="keep finished shards of a killed run")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted) instead of stopping")
    p.add_argument("--max-images", type=int, default=None, help="only the first N source images")
    p.add_argument("--shard-size", type=int, default=500,
                   help="image passes per shard (the unit of resume and of work sharing)")
    p.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) if available, else cpu")
    p.add_argument("--amp", action="store_true", help="autocast on CUDA (features saved as float32, but rounded to fp16 "
                                              "precision, while vldus test scores fp32 features)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.shard_size < 1 or (args.max_images is not None and args.max_images < 1):
        raise InputError("--shard-size/--max-images", "must be positive")
    cfg = load_config(args.config, args.set)
    split = cfg.load_split()
    require_file(args.checkpoint, "checkpoint")

    import torch.distributed as dist

    # barriers only (features stay on each rank's device); ranks may wait for each other
    # for up to one shard's time, which on a CPU can exceed the 30 min default
    own_group = start_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        records, repeat = select_images(cfg, split, args.classes, args.data_split)
        if args.data_split == "val" and cfg.data.val == cfg.data.test:
            print("note: data.val is the same source as data.test: these are features of test images",
                  file=sys.stderr)
        if args.max_images:
            records = records[: args.max_images]
        from vldus.detection.model import load_detector

        device = local_device(args.device)
        model = load_detector(cfg, split, args.checkpoint, device)
        flip = 0.0 if args.data_split == "val" else cfg.train.flip
        extractor = RoIFeatureExtractor(model, cfg.features, flip, amp=args.amp)
        save_dir = args.save_dir or cfg.path("features")
        paths = output_paths(save_dir, args.data_split, cfg.features.fg_iou, cfg.features.bg_iou)
        seed = cfg.features.seed if args.seed is None else args.seed
        run_info = {"config": dataclasses.asdict(cfg.detector), "split": split.name,
                    "class_names": list(split.classes), "classes": args.classes,
                    "data_split": args.data_split, "checkpoint": os.path.abspath(args.checkpoint),
                    "checkpoint_bytes": os.path.getsize(args.checkpoint)}
        manifest = run_extraction(extractor, records, paths, repeat=repeat, seed=seed,
                                  shard_size=args.shard_size, resume=args.resume,
                                  skip_bad_images=args.skip_bad_images, quiet=args.quiet,
                                  workers=cfg.data.workers,
                                  class_names=split.classes, run_info=run_info)
    finally:
        if own_group:
            dist.destroy_process_group()
    if manifest is not None:
        print(summary_line(manifest, paths), file=sys.stdout)
    return 0


def summary_line(manifest: dict, paths: OutputPaths) -> str:
    skipped = len(manifest["skipped_images"])
    return (f"extract-features: {manifest['rows']} rows ({manifest['fg_rows']} fg, "
            f"{manifest['bg_rows']} bg) from {manifest['images']} images "
            f"({manifest['passes']} passes), {skipped} skipped bad image{'s' * (skipped != 1)}"
            f" -> {paths.feats}")
