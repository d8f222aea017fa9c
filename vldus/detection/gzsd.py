"""Joint and soft scoring: a box's seen scores go when an unseen class explains it better, and
(soft) its unseen scores go when a seen class does.

The released GZSD scoring (:func:`vldus.detection.zsd.gzsd_probs`, ``--gzsd-scoring published``)
keeps two independent softmaxes per box, so an unseen object that the detector takes for a seen
look-alike (a blue circle scored as a blue square) yields a confident seen detection: a false
positive for that seen class. ``joint`` compares, per box, the evidence of the two groups
(:func:`vldus.detection.zsd.group_evidence`):

    e_s = log sum_{k in seen}   exp z_k - z_bg_det     (log-odds "a seen object" vs background,
                                                         detector's own classifier)
    e_u = log sum_{k in unseen} exp z_k - z_bg_blend   (same for the injected unseen classifier)

and when ``e_u - e_s > threshold`` the box's seen probabilities are set to 0 (their mass goes to
the seen group's background). ``soft`` keeps, instead, the share ``1 - sigmoid(slope (e_u -
seen_weight e_s - threshold'))`` of them: the calibrated probability that the box is a seen
object, so a look-alike falls below the real objects of its seen class rather than out of the list, and a
real seen object that the rule would have cut keeps part of its score. ``soft`` also keeps only
the share ``sigmoid(...)`` of the box's unseen scores, in GZSD and in ZSD (``--zsd-scoring
soft``): the unseen classifier alone cannot say "a seen object", so a seen object that looks
like an unseen class (a blue square for a blue circle) would otherwise be a confident unseen
false positive. ``joint`` leaves the unseen scores as published.

The joint rule's ``threshold`` is chosen WITHOUT test data by :func:`calibrate`: on real seen
RoI features of held-out VALIDATION images (``val_{fg}_{bg}_feats.npy`` of ``vldus
extract-features --data-split val``: rows with a seen label; a config without ``data.val`` falls
back to the detector's training images' features, with a warning, ``"calibration_source":
"train"``) and unseen features synthesized by the trained generator, it is the value that best
separates the two (highest balanced accuracy of "unseen wins"; among equal ones the highest
threshold, which removes the fewest seen detections). The soft scoring's ``slope`` and
``threshold'`` come from a logistic regression of "unseen" on the margin ``e_u - e_s`` over the
same rows, both groups weighted equally (:func:`fit_soft_gate`); with ``inference.gate_fit:
two_weights`` the regression is on ``(e_u, e_s)`` and also fits ``seen_weight`` (opt-in:
docs/gzsd.md). ``vldus train-generator`` writes
``gzsd_calibration.json`` next to ``classifier_best.pth``; ``vldus calibrate-gzsd`` rewrites the
same file (:mod:`vldus.synthesis.calibrate`). ``inference.gzsd_threshold`` / ``--gzsd-threshold``
override it. Without either, ``vldus test`` uses the published scoring and says so (an
uncalibrated threshold can cost more seen mAP than it saves).

``gzsd_calibration.json``: ``{"scoring": "joint" | "published", "threshold": float,
"balanced_accuracy": float, "min_separation": float, "seen_rows": int, "unseen_rows": int,
"soft_slope": float, "gate_fit": "margin" | "two_weights", "soft_seen_weight": float,
"soft_threshold": float, "synthetic_auc": float, "synthetic_auc_floor": float,
"synthetic_seen_rows": int, "bg_blend": float, "source": str,
"calibration_source": "val" | "train", "seen_features": path,
"detector_checkpoint": path, "detector_sha256": hex, "classifier": path, "classifier_sha256":
hex}``. "published" when the best threshold separates the two with a balanced accuracy below
``inference.gzsd_min_separation`` (then the rule would remove real seen detections about as
often as look-alikes), or when the margin does not separate features the generator synthesized
for the seen classes from those of the unseen classes better than chance (``synthetic_auc``
below ``synthetic_auc_floor``: the calibration's separation is then that of real from
synthesized features, which says nothing about real unseen objects). :func:`resolve_scoring`
refuses (InputError, exit 2) a file made for another detector checkpoint, classifier file,
``gate_fit`` or ``bg_blend``, or one without these keys.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import Tensor, nn

from vldus.data.splits import Split
from vldus.detection.zsd import group_evidence, inject_classifier, unseen_wins  # noqa: F401 - the rule
from vldus.errors import InputError
from vldus.files import sha256_file

SCORINGS = ("soft", "joint", "published")  # GZSD (inference.gzsd_scoring)
ZSD_SCORINGS = ("soft", "published")  # ZSD (inference.zsd_scoring): the gate acts on unseen scores only
CALIBRATION_FILE = "gzsd_calibration.json"
# keys vldus test needs to trust a calibration file
CALIBRATION_KEYS = ("scoring", "threshold", "balanced_accuracy", "min_separation", "soft_slope", "gate_fit",
                    "soft_seen_weight", "soft_threshold", "synthetic_auc", "synthetic_auc_floor", "bg_blend",
                    "detector_sha256", "classifier_sha256")
# standard errors above 0.5 that the synthesized seen/unseen AUC must reach (about 1 in 1000 by chance)
CHANCE_Z = 3.0
GATE_FITS = ("margin", "two_weights")  # inference.gate_fit: what the soft gate's regression is on


# --------------------------------------------------------------------------------------------
# Choosing the threshold (no test data)
# --------------------------------------------------------------------------------------------
def best_threshold(seen_margin: Tensor, unseen_margin: Tensor) -> tuple[float, float]:
    """Threshold t on ``margin = e_u - e_s`` maximising the balanced accuracy of the rule
    "unseen iff margin > t" on seen rows (should be <= t) and unseen rows (should be > t).

    Returns (t, balanced accuracy); t is the midpoint between the two margins it falls between.
    Among cuts with the same balanced accuracy the highest t wins: it removes the fewest seen
    detections.
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
    # ties: the LAST best cut, i.e. the highest threshold, which removes the fewest seen boxes
    i = len(balanced) - 1 - int(torch.argmax(balanced.flip(0)))
    upper = values[i + 1] if i + 1 < len(values) else values[i] + 1.0
    return float((values[i] + upper) / 2), float(balanced[i])


def separation_auc(low: Tensor, high: Tensor) -> float:
    """The probability that a row of ``high`` (N,) has a larger value than a row of ``low`` (M,),
    ties counting half (the Mann-Whitney AUC; 0.5: no separation)."""
    low, high = low.double().sort().values, high.double()
    below = torch.searchsorted(low, high, right=False)  # rows of low under each row of high
    not_above = torch.searchsorted(low, high, right=True)  # ... under or equal to it
    return float((below + not_above).sum()) / (2 * len(low) * len(high))


def chance_auc(n_low: int, n_high: int, z: float = CHANCE_Z) -> float:
    """The AUC that rows of two groups of these sizes with no separation stay below but for
    chance: 0.5 plus ``z`` standard errors, ``sqrt((n_low + n_high + 1) / (12 n_low n_high))``."""
    return 0.5 + z * ((n_low + n_high + 1) / (12.0 * n_low * n_high)) ** 0.5


def fit_soft_gate(seen_evidence: Tensor, unseen_evidence: Tensor, iterations: int = 50) -> tuple[float, float, float]:
    """(slope, seen_weight, threshold) of ``P(unseen | e_u, e_s) = sigmoid(slope (e_u - seen_weight
    e_s - threshold))``: a logistic regression on the evidences ``(e_u, e_s)`` (N, 2) of seen rows
    (label 0) and unseen rows (label 1), each group weighted to half of the total as in the
    balanced accuracy; Newton's method in float64, with a tiny ridge on the two coefficients so
    that separable rows give large finite ones. A slope <= 0 (unseen rows do not carry more
    unseen evidence) is returned as it is, with seen_weight 1; the caller treats it as no gate."""
    x = torch.cat([seen_evidence, unseen_evidence]).double()
    n_seen, n_unseen = len(seen_evidence), len(unseen_evidence)
    y = torch.cat([x.new_zeros(n_seen), x.new_ones(n_unseen)])
    w = torch.cat([x.new_full((n_seen,), 0.5 / n_seen), x.new_full((n_unseen,), 0.5 / n_unseen)])
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (N, 3): e_u, e_s and offset columns
    ridge = torch.diag(x.new_tensor([1e-6, 1e-6, 0.0]))
    params = x.new_zeros(3)
    for _ in range(iterations):
        p = torch.sigmoid(x @ params)
        grad = x.T @ (w * (p - y)) + ridge @ params
        hessian = (x * (w * p * (1 - p))[:, None]).T @ x + ridge
        step = torch.linalg.solve(hessian + 1e-12 * torch.eye(3, dtype=x.dtype, device=x.device), grad)
        params = params - step
        if float(step.abs().max()) < 1e-10:
            break
    slope, seen_coef, offset = (float(v) for v in params)
    if slope <= 0:
        return slope, 1.0, 0.0
    return slope, -seen_coef / slope, -offset / slope


def margin_only(evidence: Tensor) -> Tensor:
    """(N, 2) evidences (e_u, e_s) -> (e_u - e_s, 0): the margin fit's columns."""
    return torch.stack([evidence[:, 0] - evidence[:, 1], torch.zeros_like(evidence[:, 0])], dim=1)


@torch.no_grad()
def evidence(features: Tensor, cls_weight: Tensor, cls_bias: Tensor, syn_weight: Tensor, syn_bias: Tensor,
             split: Split, bg_blend: float) -> Tensor:
    """``(e_u, e_s)`` (N, 2) of RoI features (N, F) under the detector's ``cls_score`` (C+1, F) with
    the synthesized classifier (1+U, F) injected as ``vldus test`` does."""
    pred = nn.Module()
    pred.cls_score = nn.Linear(cls_weight.shape[1], cls_weight.shape[0])
    pred.cls_score.weight.copy_(cls_weight)
    pred.cls_score.bias.copy_(cls_bias)
    det_w, det_b = inject_classifier(pred, split, syn_weight, syn_bias, bg_blend)
    x = features.float()
    e_s, e_u = group_evidence(pred.cls_score(x), x @ det_w + det_b, split)
    return torch.stack([e_u, e_s], dim=1)


def calibrate(seen_features: Tensor, unseen_features: Tensor, cls_weight: Tensor, cls_bias: Tensor,
              syn_weight: Tensor, syn_bias: Tensor, split: Split, bg_blend: float, source: str,
              min_separation: float = 0.0, gate_fit: str = "margin", *, synthetic_seen: Tensor) -> dict:
    """The ``gzsd_calibration.json`` dict (see the module doc) from real seen RoI features
    ``seen_features`` (N, F) and synthesized unseen ones ``unseen_features`` (M, F); ``synthetic_seen``
    (K, F): features the same generator synthesized for the SEEN classes.
    ``gate_fit`` (:data:`GATE_FITS`): the soft gate's regression on the margin ``e_u - e_s``
    (seen weight 1) or on the two evidences (its own seen weight).

    The rules run (``"scoring": "joint"``; ``inference.gzsd_scoring`` chooses which) only when the
    margin separates the two groups here (balanced accuracy >= ``min_separation``, fitted slope >
    0) AND separates synthesized seen from synthesized unseen features better than chance
    (``synthetic_auc`` >= :func:`chance_auc`): real and synthesized features differ in ways of
    their own (the detector is less sure of synthesized ones), and a margin that separates only
    those would tell real from synthesized boxes, not seen from unseen ones. Otherwise the file
    says ``"published"`` (the fitted values are still recorded)."""
    args = (cls_weight.float(), cls_bias.float(), syn_weight.float(), syn_bias.float(), split, bg_blend)
    seen_ev, unseen_ev = evidence(seen_features, *args), evidence(unseen_features, *args)
    synthetic_ev = evidence(synthetic_seen, *args)
    synthetic_auc = separation_auc(synthetic_ev[:, 0] - synthetic_ev[:, 1], unseen_ev[:, 0] - unseen_ev[:, 1])
    synthetic_floor = chance_auc(len(synthetic_seen), len(unseen_features))
    # the joint rule's hard threshold is on the margin e_u - e_s
    threshold, accuracy = best_threshold(seen_ev[:, 0] - seen_ev[:, 1], unseen_ev[:, 0] - unseen_ev[:, 1])
    if gate_fit == "two_weights":
        slope, seen_weight, soft_threshold = fit_soft_gate(seen_ev, unseen_ev)
    elif gate_fit == "margin":  # the same regression on (e_u - e_s, 0)
        slope, _, soft_threshold = fit_soft_gate(margin_only(seen_ev), margin_only(unseen_ev))
        seen_weight = 1.0
    else:
        raise ValueError(f"gate_fit must be one of {GATE_FITS}, got {gate_fit!r}")
    separates = accuracy >= min_separation and slope > 0 and synthetic_auc >= synthetic_floor
    return {"scoring": "joint" if separates else "published",
            "threshold": round(threshold, 6), "balanced_accuracy": round(accuracy, 6),
            "min_separation": min_separation, "soft_slope": round(slope, 6),
            "gate_fit": gate_fit, "soft_seen_weight": round(seen_weight, 6),
            "soft_threshold": round(soft_threshold, 6),
            "synthetic_auc": round(synthetic_auc, 6), "synthetic_auc_floor": round(synthetic_floor, 6),
            "seen_rows": len(seen_features), "unseen_rows": len(unseen_features),
            "synthetic_seen_rows": len(synthetic_seen), "bg_blend": bg_blend, "source": source}


def calibration_path(syn_weights: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(syn_weights)), CALIBRATION_FILE)


def read_calibration(path: str, hint: str = "re-run vldus calibrate-gzsd") -> dict:
    """A ``gzsd_calibration.json`` with every key :func:`resolve_scoring` needs; InputError
    (ending with ``hint``) otherwise."""
    try:
        with open(path) as f:
            calibration = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable GZSD calibration ({type(e).__name__}: {e}); {hint}") from None
    missing = [k for k in CALIBRATION_KEYS if not isinstance(calibration, dict) or k not in calibration]
    if missing:
        raise InputError(path, f"GZSD calibration without {', '.join(missing)} (an older vldus wrote it); {hint}")
    if calibration["scoring"] not in SCORINGS[1:]:
        raise InputError(path, f"scoring {calibration['scoring']!r} is not one of {', '.join(SCORINGS[1:])}; {hint}")
    return calibration


def recalibrate_hint(syn_weights: str, checkpoint: str, config: Optional[str]) -> str:
    return (f"recalibrate: vldus calibrate-gzsd --config {config or 'CONFIG'} --synth-dir "
            f"{os.path.dirname(os.path.abspath(syn_weights))} --checkpoint {checkpoint}")


def resolve_scoring(inference, checkpoint: str, syn_weights: Optional[str],
                    config: Optional[str] = None, setting: str = "gzsd") -> dict:
    """The scoring ``vldus test`` runs in ``setting`` ('zsd' or 'gzsd'): ``{"scoring": "soft" |
    "joint" | "published", "threshold": float | None, "slope": float | None, "seen_weight": float |
    None, "source": str}``
    (also written to ``--metrics`` as ``zsd_scoring`` / ``gzsd_scoring``).

    ``inference``: the config's section (``zsd_scoring`` / ``gzsd_scoring``, ``gzsd_threshold``,
    ``gzsd_slope``, ``gzsd_seen_weight``, ``bg_blend``). Order: the setting's scoring is
    ``published``; a configured ``gzsd_threshold`` (with ``gzsd_slope`` and optionally
    ``gzsd_seen_weight``, default 1, for ``soft``; the gate of both settings);
    ``gzsd_calibration.json`` next to ``syn_weights``, which must have been made for this
    ``checkpoint``, this classifier file and this ``bg_blend`` (InputError naming the file and
    the recalibration command otherwise); no file: the published scoring, with the reason as
    ``source``.
    """
    configured = configured_scoring(inference, setting)
    if configured is not None:
        return configured
    path = calibration_path(syn_weights) if syn_weights else None
    if path is None or not os.path.isfile(path):
        return published(f"no {CALIBRATION_FILE} next to the classifier: run vldus calibrate-gzsd "
                         "or set --gzsd-threshold")
    hint = recalibrate_hint(syn_weights, checkpoint, config)
    calibration = read_calibration(path, hint)
    if calibration["gate_fit"] != inference.gate_fit:
        raise InputError(path, f"made with gate_fit {calibration['gate_fit']}, this run uses "
                               f"{inference.gate_fit}; {hint}")
    if calibration["bg_blend"] != inference.bg_blend:
        raise InputError(path, f"made for bg_blend {calibration['bg_blend']}, this run uses "
                               f"{inference.bg_blend}; {hint}")
    for key, name, file in (("detector_sha256", "detector checkpoint", checkpoint),
                            ("classifier_sha256", "classifier", syn_weights)):
        if calibration[key] != sha256_file(file):
            raise InputError(path, f"made for another {name} than {file} (sha256 differs); {hint}")
    return calibrated_scoring(wanted_scoring(inference, setting), calibration, path)


def published(source: str) -> dict:
    """The scoring dict of the published scoring, with why it runs."""
    return {"scoring": "published", "threshold": None, "slope": None, "seen_weight": None, "source": source}


def wanted_scoring(inference, setting: str) -> str:
    """The configured scoring of ``setting`` ('zsd' or 'gzsd')."""
    return inference.zsd_scoring if setting == "zsd" else inference.gzsd_scoring


def configured_scoring(inference, setting: str = "gzsd") -> Optional[dict]:
    """The scoring the config fixes by itself in ``setting`` (its scoring ``published``, or a
    configured ``gzsd_threshold``), else None: a calibration decides."""
    wanted = wanted_scoring(inference, setting)
    if wanted == "published":
        return published(f"inference.{setting}_scoring")
    if inference.gzsd_threshold is None:
        return None
    soft = wanted == "soft"
    if soft and inference.gzsd_slope is None:  # joint GZSD may configure a threshold alone
        raise InputError("inference.gzsd_threshold", f"the soft {setting.upper()} scoring needs "
                         f"inference.gzsd_slope too (--gzsd-slope), or --{setting}-scoring published")
    seen_weight = inference.gzsd_seen_weight
    return {"scoring": wanted, "threshold": float(inference.gzsd_threshold),
            "slope": float(inference.gzsd_slope) if soft else None,
            "seen_weight": (1.0 if seen_weight is None else float(seen_weight)) if soft else None,
            "source": "inference.gzsd_threshold" + (" and inference.gzsd_slope" if soft else "")
                      + (" and inference.gzsd_seen_weight" if soft and seen_weight is not None else "")}


def calibrated_scoring(wanted: str, calibration: dict, source: str) -> dict:
    """The scoring dict of a calibration (``wanted``: "soft" or "joint", the configured scoring):
    the published one when the calibration cannot separate seen from unseen boxes."""
    if calibration["scoring"] == "published":
        return published(f"{source}: {why_published(calibration)}")
    if wanted == "soft":
        return {"scoring": "soft", "threshold": float(calibration["soft_threshold"]),
                "slope": float(calibration["soft_slope"]), "seen_weight": float(calibration["soft_seen_weight"]),
                "source": source}
    return {"scoring": "joint", "threshold": float(calibration["threshold"]), "slope": None, "seen_weight": None,
            "source": source}


def why_published(calibration: dict) -> str:
    """Why a calibration says ``"published"``, in words."""
    if calibration["balanced_accuracy"] < calibration["min_separation"]:
        return (f"the calibration separates seen from unseen boxes with balanced accuracy "
                f"{calibration['balanced_accuracy']:.2f} < {calibration['min_separation']}")
    if calibration["synthetic_auc"] < calibration["synthetic_auc_floor"]:
        return (f"the margin separates synthesized seen from synthesized unseen features no better than "
                f"chance (AUC {calibration['synthetic_auc']:.3f} < {calibration['synthetic_auc_floor']:.3f}): "
                f"it tells real from synthesized features, not seen from unseen ones")
    return f"the soft gate's fitted slope {calibration['soft_slope']:g} is not positive"


def describe_scoring(scoring: dict) -> str:
    """One line for a :func:`resolve_scoring` dict, e.g. ``joint, threshold 1.5 (PATH)``."""
    if scoring["scoring"] == "soft":
        return (f"soft, threshold {scoring['threshold']:g}, slope {scoring['slope']:g}, seen weight "
                f"{scoring['seen_weight']:g} ({scoring['source']})")
    if scoring["scoring"] == "joint":
        return f"joint, threshold {scoring['threshold']:g} ({scoring['source']})"
    return f"published ({scoring['source']})"
