"""Joint GZSD scoring: drop a box's seen scores when an unseen class explains it better.

The released GZSD scoring (:func:`vldus.detection.zsd.gzsd_probs`, ``--gzsd-scoring published``)
keeps two independent softmaxes per box, so an unseen object that the detector takes for a seen
look-alike (a blue circle scored as a blue square) yields a confident seen detection: a false
positive for that seen class. ``joint`` compares, per box, the evidence of the two groups:

    e_s = log sum_{k in seen}   exp z_k - z_bg_det     (log-odds "a seen object" vs background,
                                                         detector's own classifier)
    e_u = log sum_{k in unseen} exp z_k - z_bg_blend   (same for the injected unseen classifier)

and when ``e_u - e_s > threshold`` the box's seen probabilities are set to 0 (their mass goes to
the seen group's background). Unseen scores are those of the published scoring, so the unseen
detections do not change (except for places freed in the per-image budget).

The one setting, ``threshold``, is chosen WITHOUT test data by :func:`calibrate`: on real seen
RoI features of the detector's TRAINING images (stage-2 features, IoU >= features.fg_iou with a
seen box) and unseen features synthesized by the trained generator, it is the value that best
separates the two (highest balanced accuracy of "unseen wins"). ``vldus train-generator`` runs it
after the classifier and writes ``gzsd_calibration.json`` next to ``classifier_best.pth``;
``vldus calibrate-gzsd`` re-runs it for an existing synthesizer folder; ``vldus test --gzsd``
reads the file next to ``--syn-weights``; ``inference.gzsd_threshold`` / ``--gzsd-threshold``
override it. Without either, ``vldus test`` falls back to the published scoring and says so (an
uncalibrated threshold can cost more seen mAP than it saves).

``gzsd_calibration.json``: ``{"scoring": "joint" | "published", "threshold": float,
"balanced_accuracy": float, "min_separation": float, "seen_rows": int, "unseen_rows": int,
"source": str}``; "published" when the best threshold separates the two with a balanced accuracy
below ``inference.gzsd_min_separation``: then the rule would remove real seen detections about as
often as look-alikes, and ``vldus test`` keeps the published scoring.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import Tensor, nn

from vldus.data.splits import Split
from vldus.errors import InputError

SCORINGS = ("joint", "published")
CALIBRATION_FILE = "gzsd_calibration.json"


def group_evidence(logits: Tensor, detector_bg_logit: Tensor, split: Split) -> tuple[Tensor, Tensor]:
    """logits (R, C+1) after injection, detector_bg_logit (R,) -> (e_s (R,), e_u (R,)), see module doc."""
    e_s = torch.logsumexp(logits[:, split.seen_ids], dim=1) - detector_bg_logit
    e_u = torch.logsumexp(logits[:, split.unseen_ids], dim=1) - logits[:, 0]
    return e_s, e_u


def unseen_wins(logits: Tensor, detector_bg_logit: Tensor, split: Split, threshold: float) -> Tensor:
    """(R,) bool: boxes whose seen scores the joint scoring removes."""
    e_s, e_u = group_evidence(logits, detector_bg_logit, split)
    return (e_u - e_s) > threshold


# --------------------------------------------------------------------------------------------
# Choosing the threshold (no test data)
# --------------------------------------------------------------------------------------------
def best_threshold(seen_margin: Tensor, unseen_margin: Tensor) -> tuple[float, float]:
    """Threshold t on ``margin = e_u - e_s`` maximising the balanced accuracy of the rule
    "unseen iff margin > t" on seen rows (should be <= t) and unseen rows (should be > t).

    Returns (t, balanced accuracy); t is the midpoint between the two margins it falls between.
    """
    if len(seen_margin) == 0 or len(unseen_margin) == 0:
        raise ValueError("need seen and unseen rows to choose the GZSD threshold")
    values = torch.cat([seen_margin, unseen_margin]).double()
    is_unseen = torch.cat([torch.zeros(len(seen_margin)), torch.ones(len(unseen_margin))]).double()
    order = torch.argsort(values, stable=True)
    values, is_unseen = values[order], is_unseen[order]
    # threshold just after position i: rows 0..i are called seen
    seen_right = torch.cumsum(1 - is_unseen, 0) / len(seen_margin)
    unseen_right = 1 - torch.cumsum(is_unseen, 0) / len(unseen_margin)
    balanced = (seen_right + unseen_right) / 2
    distinct = torch.ones_like(values, dtype=torch.bool)
    distinct[:-1] = values[1:] > values[:-1]  # cut only between different values
    balanced = balanced.masked_fill(~distinct, -1.0)
    i = int(torch.argmax(balanced))
    upper = values[i + 1] if i + 1 < len(values) else values[i] + 1.0
    return float((values[i] + upper) / 2), float(balanced[i])


@torch.no_grad()
def margins(features: Tensor, cls_weight: Tensor, cls_bias: Tensor, syn_weight: Tensor, syn_bias: Tensor,
            split: Split, bg_blend: float) -> Tensor:
    """``e_u - e_s`` (N,) of RoI features (N, F) under the detector's ``cls_score`` (C+1, F) with the
    synthesized classifier (1+U, F) injected as ``vldus test`` does."""
    from vldus.detection.zsd import inject_classifier

    pred = nn.Module()
    pred.cls_score = nn.Linear(cls_weight.shape[1], cls_weight.shape[0])
    pred.cls_score.weight.copy_(cls_weight)
    pred.cls_score.bias.copy_(cls_bias)
    det_w, det_b = inject_classifier(pred, split, syn_weight, syn_bias, bg_blend)
    x = features.float()
    e_s, e_u = group_evidence(pred.cls_score(x), x @ det_w + det_b, split)
    return e_u - e_s


def calibrate(seen_features: Tensor, unseen_features: Tensor, cls_weight: Tensor, cls_bias: Tensor,
              syn_weight: Tensor, syn_bias: Tensor, split: Split, bg_blend: float, source: str,
              min_separation: float = 0.0) -> dict:
    """The ``gzsd_calibration.json`` dict (see the module doc) from seen / unseen RoI features.

    When the best threshold's balanced accuracy is below ``min_separation`` the rule cannot tell
    seen from unseen boxes here, and the file says ``"scoring": "published"`` (the threshold is
    still recorded)."""
    args = (cls_weight.float(), cls_bias.float(), syn_weight.float(), syn_bias.float(), split, bg_blend)
    threshold, accuracy = best_threshold(margins(seen_features, *args), margins(unseen_features, *args))
    return {"scoring": "joint" if accuracy >= min_separation else "published",
            "threshold": round(threshold, 6), "balanced_accuracy": round(accuracy, 6),
            "min_separation": min_separation,
            "seen_rows": len(seen_features), "unseen_rows": len(unseen_features), "bg_blend": bg_blend,
            "source": source}


def calibration_path(syn_weights: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(syn_weights)), CALIBRATION_FILE)


def resolve_threshold(syn_weights: Optional[str], configured: Optional[float]) -> tuple[Optional[float], str]:
    """(threshold, where it came from): ``configured`` (inference.gzsd_threshold / --gzsd-threshold)
    if set, else ``gzsd_calibration.json`` next to ``syn_weights``, else (None, why): no
    calibrated threshold, the caller uses the published scoring."""
    if configured is not None:
        return float(configured), "inference.gzsd_threshold"
    path = calibration_path(syn_weights) if syn_weights else None
    if path is None or not os.path.isfile(path):
        return None, (f"no {CALIBRATION_FILE} next to the classifier: run vldus calibrate-gzsd "
                      "or set --gzsd-threshold")
    try:
        with open(path) as f:
            calibration = json.load(f)
        if calibration.get("scoring", "joint") == "published":
            return None, (f"{path}: the calibration separates seen from unseen boxes with balanced "
                          f"accuracy {calibration['balanced_accuracy']:.2f} < {calibration['min_separation']}")
        return float(calibration["threshold"]), path
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(path, f"unreadable GZSD calibration ({type(e).__name__}: {e}); delete it or "
                               "re-run vldus calibrate-gzsd") from None
