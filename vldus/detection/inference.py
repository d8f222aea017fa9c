"""``vldus test``: zero-shot detection on the test images, detections + metrics (stage 4).

Steps: read the test annotations (``cfg.data.test``), choose the test images of the setting
(docs/design.md §9.2, ``cfg.data.test_rule``), load the detector, inject the synthesized classifier and
install the ZSD / GZSD scoring head (:mod:`vldus.detection.zsd`), detect image by image, then
write

- ``--out DETS.json``: COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h],
  "score"}]``, at most ``detector.detections_per_img`` per image, boxes in original image pixels;
- ``DETS.gt.json`` next to it: the ground truth of the chosen images (only unseen annotations in
  ZSD) in COCO format, so ``vldus evaluate --ann DETS.gt.json --dets DETS.json`` re-scores them;
- ``--metrics M.json`` (docs/formats.md metrics layout; with ``--zsd`` / ``--gzsd`` also
  ``"zsd_scoring"`` / ``"gzsd_scoring"``: ``{"scoring": "soft" | "joint" | "published",
  "threshold": float | null, "slope": float | null, "seen_weight": float | null, "source": str}``,
  the scoring that ran) and
  the printed table;
- ``--show-dir DIR``: one PNG per image with the detections above a display threshold.

The default scoring of both settings, ``soft``, weighs each box's unseen scores (ZSD and GZSD)
by the calibrated probability that it is not a seen object and its seen scores (GZSD) by the
rest, with the gate of ``gzsd_calibration.json`` next to ``--syn-weights`` (refused when made
for another checkpoint, classifier or ``bg_blend``; :func:`vldus.detection.gzsd.resolve_scoring`);
``--gzsd-scoring joint`` drops a box's seen scores when an unseen class explains it better;
``published`` is the released scoring. Detection runs :func:`score_image` on
:func:`vldus.detection.cache.box_inputs`, the path the Python API runs too. ``--cache DIR``
stores the detector's per-image outputs before its classification layer and re-scores them in
later runs (:mod:`vldus.detection.cache`).

``--scoring clip-regions`` asks a CLIP (``--clip-weights``) about each of the detector's boxes
instead of the injected classifier, ``--scoring ensemble`` combines the two per class
(:mod:`vldus.detection.clip_regions`, docs/clip_regions.md).

Under torchrun (``tools/dist_test.sh``) each rank detects every ``world``-th image and rank 0
gathers the detections (``torch.distributed.gather_object`` over gloo) and writes the files; the
result is the same as one process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vldus.config import add_set_argument
from vldus.config import Config, load_config
from vldus.data.images import read_rgb, to_float
from vldus.data.records import ImageRecord
from vldus.data.splits import Split
from vldus.devices import local_device, start_process_group
from vldus.errors import InputError, require_file
from vldus.files import write_json

if TYPE_CHECKING:
    from vldus.detection.cache import DetectorCache
    from vldus.detection.clip_regions import RegionScorer

SETTINGS = ("zsd", "gzsd", "seen")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
class TestImages(Dataset):
    """``records[i]`` -> ``(i, image float32 (3, H, W) in 0..1 or None, error message or None)``.

    Read errors come back as a message (not raised in a loader worker, where they would lose
    their type) and become an InputError in the main process.
    """

    def __init__(self, records: Sequence[ImageRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            return i, to_float(read_rgb(self.records[i].path)), None
        except InputError as e:
            return i, None, e.message


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def score_image(model: torch.nn.Module, head, inputs: BoxInputs) -> dict:
    """One image's detections from its :class:`vldus.detection.cache.BoxInputs`: the ZSD head's
    scoring, box decoding, NMS, rescaling to the image, scores in the released scale.
    ``{"boxes" (K, 4) float32 xyxy, "scores" (K,) float32, "labels" (K,) int64}`` numpy arrays.
    ``vldus test`` and :class:`vldus.api.ZeroShotDetector` both detect through here (equal to
    torchvision's own ``model([image])``, tests/test_cache.py)."""
    from vldus.detection.cache import score_boxes
    from vldus.detection.zsd import rescale_scores

    out = rescale_scores([score_boxes(model, inputs)], head)[0]
    return {"boxes": out["boxes"].float().cpu().numpy(), "scores": out["scores"].float().cpu().numpy(),
            "labels": out["labels"].cpu().numpy().astype(np.int64)}


@torch.inference_mode()
def detect(model: torch.nn.Module, head, records: Sequence[ImageRecord], device: str | torch.device,
           workers: int = 0, show: Optional[dict] = None, progress: bool = True,
           cache: Optional[DetectorCache] = None, regions: Optional[RegionScorer] = None) -> list[dict]:
    """Detections of each record, in order: ``{"boxes" (K,4) float32 xyxy, "scores" (K,), "labels"
    (K,) int64}`` numpy arrays, scores in the released scale (:func:`zsd.rescale_scores`).

    ``show``: ``{"dir", "class_names", "unseen_ids", "score_thresh"}`` draws each image to
    ``dir/<file stem>.png``. ``cache`` (:class:`vldus.detection.cache.DetectorCache`): images
    with an entry skip the detector up to its classification layer; the others are computed
    and stored. ``regions`` (:class:`vldus.detection.clip_regions.RegionScorer`): score with the
    ``clip-regions`` / ``ensemble`` scoring instead of the head's own.
    """
    from vldus.detection.cache import box_inputs

    entries = [cache.entry_path(r.path) for r in records] if cache is not None else [None] * len(records)
    todo = [i for i, e in enumerate(entries) if e is None or not os.path.isfile(e)]
    loader = iter(DataLoader(TestImages([records[i] for i in todo]), batch_size=None, shuffle=False,
                             num_workers=workers if todo else 0, pin_memory=torch.device(device).type == "cuda"))
    results: list[Optional[dict]] = [None] * len(records)
    pending = set(todo)
    if cache is not None:
        cache.hits, cache.misses = len(records) - len(todo), len(todo)
    for i in tqdm(range(len(records)), desc="test", unit="img", disable=not progress):
        image = None
        if i in pending:
            _, image, error = next(loader)
            if error is not None:
                raise InputError(records[i].path, error)
            inputs = box_inputs(model, image.to(device, non_blocking=True))
            if cache is not None:
                cache.store(entries[i], inputs)
                inputs = cache.rounded(inputs)
        else:
            inputs = cache.load(entries[i])
        if regions is not None:
            det = regions.score(model, head, inputs, image, records[i].path)
        else:
            det = score_image(model, head, inputs)
        results[i] = det
        if show is not None:
            _draw(image if image is not None else to_float(read_rgb(records[i].path)), records[i], det, show)
    return results


def _draw(image: torch.Tensor, record: ImageRecord, det: dict, show: dict) -> None:
    from PIL import Image

    from vldus.detection.visualize import draw_detections

    pil = Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy())
    picture = draw_detections(pil, det["boxes"], det["scores"], det["labels"], show["class_names"],
                              show["unseen_ids"], show["score_thresh"], gt_boxes=record.boxes)
    stem = os.path.splitext(os.path.basename(record.path))[0]
    picture.save(os.path.join(show["dir"], f"{stem}.png"))


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------
def coco_results(records: Sequence[ImageRecord], detections: Sequence[dict], category_ids: Sequence[int],
                 max_per_image: int) -> list[dict]:
    """COCO results list: ``bbox`` [x, y, w, h], best ``max_per_image`` of each image by score."""
    results = []
    for record, det in zip(records, detections):
        order = np.argsort(-det["scores"], kind="stable")[:max_per_image]
        for k in order:
            x1, y1, x2, y2 = det["boxes"][k].tolist()
            results.append({"image_id": int(record.image_id),
                            "category_id": int(category_ids[int(det["labels"][k]) - 1]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(det["scores"][k])})
    return results


def gt_path(out: str) -> str:
    """``dets.json`` -> ``dets.gt.json`` (the ground truth written next to the detections)."""
    stem = out[:-5] if out.endswith(".json") else out
    return f"{stem}.gt.json"


def evaluate(cfg: Config, split: Split, setting: str, records: Sequence[ImageRecord],
             detections: Sequence[dict]) -> dict:
    """Metrics of the detections (docs/formats.md layout) with the project's ZSDEvaluator.

    ``seen`` (the plain detector) scores the seen-class annotations of the GZSD images.
    """
    from vldus.evaluation import ZSDEvaluator

    evaluator = ZSDEvaluator(list(split.classes), list(split.unseen), setting,
                             iou_thresholds=tuple(cfg.evaluation.iou_thresholds),
                             protocol=cfg.evaluation.protocol, excluded=tuple(split.excluded),
                             max_dets_per_image=cfg.detector.detections_per_img)
    evaluator.process(list(records), list(detections))
    return evaluator.evaluate()


def format_metrics(metrics: dict) -> str:
    from vldus.evaluation import format_table

    return format_table(metrics)


# --------------------------------------------------------------------------------------------
# Distributed helpers (torchrun)
# --------------------------------------------------------------------------------------------
def _dist_start() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group)."""
    import torch.distributed as dist

    started = start_process_group("gloo")  # only Python objects are gathered, on the CPU
    if not dist.is_initialized():
        return 0, 1, False
    return dist.get_rank(), dist.get_world_size(), started


def _gather(obj, rank: int, world: int) -> Optional[list]:
    """Every rank's ``obj`` on rank 0 (a list in rank order); None on other ranks."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    box = [None] * world if rank == 0 else None
    dist.gather_object(obj, box, dst=0)
    return box


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------
def add_parser(sub, common) -> None:
    p = sub.add_parser("test", parents=[common], help="detect unseen classes on the test images (stage 4)",
                       description="Inject the synthesized classifier into the detector, detect the "
                                   "test images of the setting (docs/design.md §9.2) and write COCO-format "
                                   "detections (+ DETS.gt.json) and metrics.")
    p.add_argument("--config", required=True, help="split config (configs/*.yaml)")
    p.add_argument("--checkpoint", required=True, help="detector checkpoint (train-detector)")
    p.add_argument("--syn-weights", default=None, metavar="CLS",
                   help="synthesized classifier (classifier_best.pth); required for --zsd/--gzsd")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--zsd", dest="setting", action="store_const", const="zsd",
                      help="zero-shot detection: unseen classes only")
    mode.add_argument("--gzsd", dest="setting", action="store_const", const="gzsd",
                      help="generalized ZSD: seen and unseen classes")
    mode.add_argument("--seen", dest="setting", action="store_const", const="seen",
                      help="the plain detector over seen classes on the GZSD images (no synthesis)")
    p.add_argument("--out", required=True, metavar="DETS.json", help="COCO-format detections")
    p.add_argument("--metrics", default=None, metavar="M.json", help="write the metrics JSON here")
    p.add_argument("--show-dir", default=None, metavar="DIR", help="draw detections, one PNG per image")
    p.add_argument("--show-thresh", type=float, default=None,
                   help="score shown in pictures (default: inference.show_score_thresh)")
    p.add_argument("--seen-score-cut", type=float, default=None,
                   help="GZSD: zero seen scores below this (SU used 0.3; default: inference.seen_score_cut)")
    p.add_argument("--gzsd-scoring", default=None, choices=("soft", "joint", "published"),
                   help="GZSD scoring: soft (weigh a box's seen scores by the calibrated probability "
                        "that it is a seen object), joint (drop them when an unseen class explains it "
                        "better) or published (the released two-softmax scoring, docs/design.md §8.3); "
                        "default: inference.gzsd_scoring")
    p.add_argument("--zsd-scoring", default=None, choices=("soft", "published"),
                   help="ZSD scoring: soft (weigh a box's unseen scores by the calibrated probability "
                        "that it is not a seen object) or published (docs/design.md §8.2); default: "
                        "inference.zsd_scoring")
    p.add_argument("--gzsd-threshold", type=float, default=None,
                   help="soft / joint scoring threshold, both settings (default: inference.gzsd_threshold, "
                        "else gzsd_calibration.json next to --syn-weights, else the published scoring)")
    p.add_argument("--gzsd-slope", type=float, default=None,
                   help="soft scoring slope, with --gzsd-threshold (default: inference.gzsd_slope)")
    p.add_argument("--gzsd-seen-weight", type=float, default=None,
                   help="soft scoring weight of the seen evidence, with --gzsd-slope (default: "
                        "inference.gzsd_seen_weight, else 1)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N test images")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="detector-output cache: store what the detector computes before its "
                        "classification layer per test image on the first run, re-score from it "
                        "on later runs of the same checkpoint and detector config (any classifier, "
                        "setting or scoring)")
    p.add_argument("--cache-dtype", default="float32", choices=("float32", "float16"),
                   help="stored box features: float32 (same detections as without the cache) or "
                        "float16 (half the size; scores within ~1e-3)")
    p.add_argument("--scoring", default="vldus", choices=("vldus", "clip-regions", "ensemble"),
                   help="vldus: the injected classifier (default); clip-regions: a CLIP names each of "
                        "the detector's boxes (crop -> image encoder -> class names), times the "
                        "detector's object probability; ensemble: per class the weighted geometric "
                        "mean of the two (docs/clip_regions.md). Both need --clip-weights")
    p.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="CLIP weights for --scoring clip-regions / ensemble (a local open_clip / "
                        "OpenAI file, or train-clip's open_clip_model.safetensors)")
    p.add_argument("--clip-arch", default=None, metavar="NAME_OR_JSON",
                   help="open_clip architecture of --clip-weights (default ViT-B-32)")
    p.add_argument("--clip-margin", type=float, default=None,
                   help="crop = box grown by this fraction of its width/height per side (default 0.1, "
                        "as train-clip's crops)")
    p.add_argument("--ensemble-weights", default=None, metavar="W_SEEN,W_UNSEEN",
                   help="the CLIP's weight in --scoring ensemble for seen and unseen classes "
                        "(default 1/3,2/3: ViLD's, fixed in advance)")
    p.add_argument("--ensemble-unseen-names", default=None, choices=("unseen", "all"),
                   help="--gzsd --scoring ensemble: the CLIP's probability of an unseen class is a "
                        "softmax over the unseen names only (default: the CLIP says which unseen "
                        "class, never unseen rather than seen) or over all names (as clip-regions)")
    p.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) if available, else cpu")
    add_set_argument(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace, cfg: Config) -> None:
    """Option checks (InputError) and the command-line overrides of the config."""
    if args.max_images is not None and args.max_images < 1:
        raise InputError("--max-images", f"must be positive, got {args.max_images}")
    if args.seen_score_cut is not None:
        if args.setting != "gzsd":
            raise InputError("--seen-score-cut", "applies to --gzsd only")
        cfg.inference.seen_score_cut = args.seen_score_cut
    for name, settings in (("zsd_scoring", ("zsd",)), ("gzsd_scoring", ("gzsd",)),
                           ("gzsd_threshold", ("zsd", "gzsd")), ("gzsd_slope", ("zsd", "gzsd")),
                           ("gzsd_seen_weight", ("zsd", "gzsd"))):
        value = getattr(args, name)
        if value is not None:
            if args.setting not in settings:
                allowed = " / ".join("--" + s for s in settings)
                raise InputError(f"--{name.replace('_', '-')}", f"applies to {allowed} only")
            setattr(cfg.inference, name, value)
    if args.scoring != "vldus":
        if args.setting not in ("zsd", "gzsd"):
            raise InputError(f"--scoring {args.scoring}", "applies to --zsd / --gzsd only")
        if not args.clip_weights:
            raise InputError(f"--scoring {args.scoring}", "needs --clip-weights FILE (a local CLIP)")
    else:
        for name in ("clip_weights", "clip_arch", "clip_margin", "ensemble_weights", "ensemble_unseen_names"):
            if getattr(args, name) is not None:
                raise InputError(f"--{name.replace('_', '-')}", "applies to --scoring clip-regions / ensemble only")
    for name in ("ensemble_weights", "ensemble_unseen_names"):
        if getattr(args, name) is not None and args.scoring != "ensemble":
            raise InputError(f"--{name.replace('_', '-')}", "applies to --scoring ensemble only")
    if args.ensemble_unseen_names is not None and args.setting != "gzsd":
        raise InputError("--ensemble-unseen-names", "applies to --gzsd only")


def check_inference_config(cfg: Config) -> None:
    """InputError naming the config file for an impossible ``inference`` value."""
    from vldus.detection.gzsd import GATE_FITS, SCORINGS, ZSD_SCORINGS
    from vldus.detection.zsd import BOX_REGRESSIONS, EXCLUDED_MODES

    inf = cfg.inference
    if inf.seen_score_cut is not None and not 0.0 <= inf.seen_score_cut <= 1.0:
        raise InputError(cfg.source_file, f"inference.seen_score_cut: {inf.seen_score_cut} is not a probability")
    if not 0.0 <= inf.bg_blend <= 1.0:
        raise InputError(cfg.source_file, f"inference.bg_blend: {inf.bg_blend} is not in [0, 1]")
    if inf.gzsd_scoring not in SCORINGS:
        raise InputError(cfg.source_file, f"inference.gzsd_scoring: {inf.gzsd_scoring!r} is not one of "
                                          f"{', '.join(SCORINGS)}")
    if inf.zsd_scoring not in ZSD_SCORINGS:
        raise InputError(cfg.source_file, f"inference.zsd_scoring: {inf.zsd_scoring!r} is not one of "
                                          f"{', '.join(ZSD_SCORINGS)}")
    if inf.gzsd_scoring == "soft" and inf.gzsd_threshold is not None and inf.gzsd_slope is None:
        raise InputError(cfg.source_file, "inference.gzsd_threshold with the soft scoring needs "
                                          "inference.gzsd_slope too (--gzsd-slope)")
    if inf.gate_fit not in GATE_FITS:
        raise InputError(cfg.source_file, f"inference.gate_fit: {inf.gate_fit!r} is not one of {', '.join(GATE_FITS)}")
    if inf.gate_iou is not None and not 0.0 < inf.gate_iou <= 1.0:
        raise InputError(cfg.source_file, f"inference.gate_iou: {inf.gate_iou} is not in (0, 1] (null: per box)")
    if inf.gzsd_seen_weight is not None and inf.gzsd_slope is None:
        raise InputError(cfg.source_file, "inference.gzsd_seen_weight needs inference.gzsd_threshold and "
                                          "inference.gzsd_slope (--gzsd-threshold, --gzsd-slope)")
    if inf.box_regression not in BOX_REGRESSIONS:
        raise InputError(cfg.source_file, f"inference.box_regression: {inf.box_regression!r} is not one of "
                                          f"{', '.join(BOX_REGRESSIONS)}")
    if inf.excluded not in EXCLUDED_MODES:
        raise InputError(cfg.source_file, f"inference.excluded: {inf.excluded!r} is not one of "
                                          f"{', '.join(EXCLUDED_MODES)}")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    _check_args(args, cfg)
    run_test(cfg, args.setting, args.checkpoint, args.syn_weights, args.out, metrics_path=args.metrics,
             show_dir=args.show_dir, show_thresh=args.show_thresh, max_images=args.max_images,
             device=args.device, quiet=args.quiet, cache_dir=args.cache, cache_dtype=args.cache_dtype,
             scoring=args.scoring, clip_weights=args.clip_weights, clip_arch=args.clip_arch,
             clip_margin=args.clip_margin, ensemble_weights=parse_ensemble_weights(args.ensemble_weights),
             ensemble_unseen_names=args.ensemble_unseen_names)
    return 0


def parse_ensemble_weights(text: Optional[str]) -> Optional[dict]:
    """``"W_SEEN,W_UNSEEN"`` -> ``{"seen", "unseen"}`` (each in [0, 1]); None stays None."""
    if text is None:
        return None
    try:
        seen, unseen = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError("--ensemble-weights", f"{text!r}: expected two numbers W_SEEN,W_UNSEEN") from None
    if not (0.0 <= seen <= 1.0 and 0.0 <= unseen <= 1.0):
        raise InputError("--ensemble-weights", f"{text!r}: weights must be in [0, 1]")
    return {"seen": seen, "unseen": unseen}


def run_test(cfg: Config, setting: str, checkpoint: str, syn_weights: Optional[str], out: str,
             metrics_path: Optional[str] = None, show_dir: Optional[str] = None,
             show_thresh: Optional[float] = None, max_images: Optional[int] = None,
             device: Optional[str] = None, quiet: bool = False, cache_dir: Optional[str] = None,
             cache_dtype: str = "float32", scoring: str = "vldus", clip_weights: Optional[str] = None,
             clip_arch: Optional[str] = None, clip_margin: Optional[float] = None,
             ensemble_weights: Optional[dict] = None, ensemble_unseen_names: Optional[str] = None) -> Optional[dict]:
    """The whole ``vldus test`` (see the module docstring); returns the metrics on rank 0, else None.

    ``setting``: 'zsd' | 'gzsd' (need ``syn_weights``) | 'seen'. Under torchrun every rank calls it.
    ``cache_dir``: :mod:`vldus.detection.cache` folder (each rank stores the entries of its images).
    ``scoring``: 'vldus' | 'clip-regions' (``syn_weights`` optional) | 'ensemble', with the CLIP
    ``clip_weights`` / ``clip_arch``, crop margin ``clip_margin``, the ensemble's CLIP weights
    ``{"seen", "unseen"}`` and the names of its unseen CLIP probabilities in GZSD
    ``ensemble_unseen_names`` (:mod:`vldus.detection.clip_regions`; written to ``--metrics`` as
    ``"scoring"``, with the CLIP pass's time).
    """
    from vldus.detection.cache import DetectorCache
    from vldus.detection.gzsd import describe_scoring, resolve_scoring
    from vldus.data.readers import coco_category_ids, load_records, records_to_coco, select_test
    from vldus.detection.model import load_detector
    from vldus.detection.zsd import install_zsd_head, load_syn_classifier

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    check_inference_config(cfg)
    split = cfg.load_split()
    require_file(checkpoint, "detector checkpoint")
    if setting != "seen" and not (scoring == "clip-regions" and not syn_weights):
        if not syn_weights:
            raise InputError("--syn-weights", f"required with --{setting} (the synthesized classifier file)")
        require_file(syn_weights, "synthesized classifier")
    cache = DetectorCache(cache_dir, cfg.detector, checkpoint, cache_dtype) if cache_dir else None

    rank, world, started = _dist_start()
    try:
        start = time.time()
        records = select_test(load_records(cfg.data.test, split), split,
                              "gzsd" if setting == "seen" else setting, cfg.data.test_rule)
        if not records:
            raise InputError(cfg.data.test.ann_file or cfg.data.test.list_file or None,
                             f"no test image for {setting} (rule '{cfg.data.test_rule}': images with "
                             f"unseen objects of split '{split.name}')")
        if max_images:
            records = records[:max_images]
        category_ids = coco_category_ids(cfg.data.test, split)

        device = local_device(device)
        model = load_detector(cfg, split, checkpoint, device)
        classifier = None
        if setting != "seen" and syn_weights:
            in_features = model.roi_heads.box_predictor.cls_score.in_features
            classifier = load_syn_classifier(syn_weights, split, in_features)
        rule = None  # the scoring of the seen/unseen gate (vldus.detection.gzsd)
        if setting != "seen" and classifier:
            rule = resolve_scoring(cfg.inference, checkpoint, syn_weights, cfg.source_file, setting)
            if rank == 0:
                print(f"{setting} scoring: {describe_scoring(rule)}", file=sys.stdout)
        head = install_zsd_head(model, split, setting if classifier else "seen", classifier,
                                bg_blend=cfg.inference.bg_blend,
                                seen_score_cut=cfg.inference.seen_score_cut, excluded=cfg.inference.excluded,
                                gate_threshold=rule["threshold"] if rule else None,
                                gate_slope=rule["slope"] if rule else None,
                                gate_seen_weight=rule["seen_weight"] if rule else None,
                                gate_iou=cfg.inference.gate_iou, box_regression=cfg.inference.box_regression)
        regions = None
        if scoring != "vldus":
            regions = region_scorer(scoring, split, setting, device, cache, clip_weights, clip_arch, clip_margin,
                                    ensemble_weights, ensemble_unseen_names)

        show = None
        if show_dir:
            os.makedirs(show_dir, exist_ok=True)
            show = {"dir": show_dir, "class_names": split.classes, "unseen_ids": split.unseen_ids,
                    "score_thresh": cfg.inference.show_score_thresh if show_thresh is None else show_thresh}
        if cache is not None:
            cache.prepare()
        mine = list(range(rank, len(records), world))
        dets = detect(model, head, [records[i] for i in mine], device, workers=cfg.data.workers, show=show,
                      progress=not quiet and rank == 0, cache=cache, regions=regions)
        clip_s = regions.clip_s if regions else 0.0
        gathered = _gather((list(zip(mine, dets)), cache.hits if cache else 0, clip_s), rank, world)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return None

    detections: list[Optional[dict]] = [None] * len(records)
    for part, _, _ in gathered:
        for i, det in part:
            detections[i] = det
    results = coco_results(records, detections, category_ids, cfg.detector.detections_per_img)
    write_json(out, results, indent=None)
    write_json(gt_path(out), records_to_coco(records, split, category_ids), indent=None)
    metrics = evaluate(cfg, split, setting, records, detections)
    if rule is not None:
        metrics[f"{setting}_scoring"] = rule  # the scoring and threshold that ran
    if setting != "seen":
        metrics["box_regression"] = head.box_regression
    if regions is not None:
        metrics["scoring"] = {**regions.describe(), "clip_time_s": round(sum(t for _, _, t in gathered), 2),
                              "crop_cache_hits": regions.hits}
    if metrics_path:
        write_json(metrics_path, metrics, indent=None)
    print(format_metrics(metrics))
    if cache is not None:
        hits = sum(h for _, h, _ in gathered)
        print(f"cache: {hits} of {len(records)} images re-scored from {cache.dir}, "
              f"{len(records) - hits} computed and stored", file=sys.stdout)
    if regions is not None:
        print(f"scoring: {scoring} (CLIP {clip_weights}), CLIP pass {metrics['scoring']['clip_time_s']:.1f} s",
              file=sys.stdout)
    print(f"test: {setting}: {len(records)} images, {len(results)} detections, "
          f"{time.time() - start:.1f} s -> {out}", file=sys.stdout)
    return metrics


def region_scorer(scoring: str, split: Split, setting: str, device, cache: Optional[DetectorCache],
                  clip_weights: Optional[str], clip_arch: Optional[str], clip_margin: Optional[float],
                  ensemble_weights: Optional[dict], ensemble_unseen_names: Optional[str] = None) -> RegionScorer:
    """The :class:`vldus.detection.clip_regions.RegionScorer` of ``--scoring clip-regions | ensemble``,
    its crop cache inside the detector cache's key folder when there is one."""
    from vldus.detection.clip_regions import CROP_MARGIN, UNSEEN_NAMES, CropCache, RegionClip, RegionScorer

    if not clip_weights:
        raise InputError(f"--scoring {scoring}", "needs --clip-weights FILE (a local CLIP)")
    clip = RegionClip(clip_weights, clip_arch, device, CROP_MARGIN if clip_margin is None else clip_margin)
    crops = None
    if cache is not None:
        crops = CropCache(cache.dir, clip.key)
        crops.prepare()
    return RegionScorer(scoring, clip, split, setting, ensemble_weights, crops, ensemble_unseen_names or UNSEEN_NAMES[0])
