"""Which box deltas should an unseen class borrow? Each rule of ``inference.box_regression``,
measured on the seen-only validation images, with no test data.

An unseen class has no trained regression row, so its boxes take deltas from the seen classes'
rows (docs/design.md §8.2). The validation images hold seen objects only; to ask how well a rule
places the box of an object whose own row is missing, every validation object is treated in
turn as if its class were unseen: its own class's column is left out of the rule (leave one
class out), and the decoded box is compared with the object's ground-truth box.

Per validation image, the detector's test proposals (``rpn_post_nms_test``) that overlap a
ground-truth object at IoU >= ``--min-iou`` (0.5) are decoded under:

- ``own``: the object's own class's deltas (what a trained row gives: the ceiling);
- each rule of :data:`vldus.detection.zsd.BOX_REGRESSIONS`, over the seen classes other than
  the object's (:func:`vldus.detection.zsd.seen_deltas` with that column masked out);
- ``proposal``: no regression (the proposal itself).

Output JSON: ``{"note": str, "seed": int, "checkpoint": path, "images": int, "rois": int,
"min_iou": float, "rules": {RULE: {"mean_iou": float, "iou>=0.5": %, "iou>=0.6": %,
"iou>=0.7": %, "iou>=0.8": %}}}``, every value over the same RoIs::

    python benchmarks/box_regression_val.py demo_out --out box_regression_val.json [--device cuda] \\
        --note "2-core AMD EPYC, torch 2.14.1"
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torchvision.models.detection.transform import resize_boxes  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from vldus.config import load_config  # noqa: E402
from vldus.data.images import read_rgb, to_float  # noqa: E402
from vldus.data.readers import load_records  # noqa: E402
from vldus.detection.cache import box_inputs  # noqa: E402
from vldus.detection.model import load_detector  # noqa: E402
from vldus.detection.train import latest_checkpoint  # noqa: E402
from vldus.detection.zsd import BOX_REGRESSIONS, seen_deltas  # noqa: E402
from vldus.errors import InputError  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.8)


@torch.inference_mode()
def leave_one_out_ious(model, seen_ids: list[int], image: torch.Tensor, gt_boxes: torch.Tensor,
                       gt_labels: torch.Tensor, min_iou: float) -> dict[str, torch.Tensor]:
    """{rule: (R,) IoU of each decoded box with its ground truth} for the proposals of one image
    that overlap a ground-truth object at IoU >= ``min_iou``. image float (3, H, W) in 0..1;
    gt_boxes (N, 4) xyxy original pixels, gt_labels (N,) detector class indices (all seen)."""
    inputs = box_inputs(model, image)
    proposals = inputs.proposals.float()
    gt = resize_boxes(gt_boxes.float(), list(inputs.original_size), list(inputs.image_size))
    overlap = box_iou(proposals, gt)
    best_iou, best_gt = overlap.max(dim=1)  # the caller passes images with objects only
    keep = best_iou >= min_iou
    if not bool(keep.any()):
        return {}
    proposals, target, label = proposals[keep], gt[best_gt[keep]], gt_labels[best_gt[keep]]
    logits, deltas = model.roi_heads.box_predictor(inputs.features[keep].flatten(start_dim=1).float())
    rows = torch.arange(len(label), device=label.device)
    held_out = logits.clone()
    held_out[rows, label] = float("-inf")  # the object's class plays no part: as if unseen
    per_class = deltas.reshape(len(label), -1, 4)
    chosen = {"own": per_class[rows, label], "proposal": torch.zeros_like(per_class[:, 0])}
    for rule in BOX_REGRESSIONS:
        chosen[rule] = seen_deltas(held_out, deltas, seen_ids, rule)
    coder = model.roi_heads.box_coder
    return {name: box_iou(coder.decode(d, [proposals])[:, 0], target).diagonal() for name, d in chosen.items()}


def summarise(ious: torch.Tensor) -> dict:
    """Mean IoU and the share (%) of boxes at or above each of :data:`THRESHOLDS`."""
    out = {"mean_iou": round(float(ious.mean()), 4)}
    out.update({f"iou>={t}": round(100.0 * float((ious >= t).float().mean()), 2) for t in THRESHOLDS})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo", help="a finished `vldus demo --out` folder (config.yaml, work/detector)")
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--note", default="", help="machine / settings")
    p.add_argument("--min-iou", type=float, default=0.5, help="proposals this close to an object (default 0.5)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)
    try:
        cfg = load_config(os.path.join(args.demo, "config.yaml"))
        if cfg.data.val is None:
            raise InputError(cfg.source_file, "data.val: no validation images to measure on")
        split = cfg.load_split()
        checkpoint = latest_checkpoint(os.path.join(args.demo, "work", "detector"))
        model = load_detector(cfg, split, checkpoint, args.device)
        records = [r for r in load_records(cfg.data.val, split) if len(r)]
    except InputError as e:
        print(f"box_regression_val: error: {e}", file=sys.stderr)
        return 2
    parts: dict[str, list[torch.Tensor]] = {}
    for record in tqdm(records, desc="validation images", unit="img"):
        image = to_float(read_rgb(record.path)).to(args.device)
        ious = leave_one_out_ious(model, list(split.seen_ids), image, torch.as_tensor(record.boxes, device=args.device),
                                  torch.as_tensor(record.labels, device=args.device), args.min_iou)
        for name, v in ious.items():
            parts.setdefault(name, []).append(v.cpu())
    if not parts:
        print(f"box_regression_val: error: no proposal within IoU {args.min_iou} of a validation object",
              file=sys.stderr)
        return 2
    rules = {name: summarise(torch.cat(v)) for name, v in parts.items()}
    result = {"note": args.note, "seed": cfg.train.seed, "checkpoint": os.path.abspath(checkpoint),
              "images": len(records), "rois": int(sum(len(v) for v in parts["own"])),
              "min_iou": args.min_iou, "rules": rules}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for name, r in rules.items():
        print(f"{name:14s} mean IoU {r['mean_iou']:.3f}  " +
              "  ".join(f"IoU>={t} {r[f'iou>={t}']:.1f} %" for t in THRESHOLDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
