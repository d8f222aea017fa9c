"""Stage 4: put the synthesized unseen classifier into the detector and score ZSD / GZSD.

docs/design.md §8. Two pieces, both working on a torchvision ``FastRCNNPredictor`` (``cls_score``
Linear(F, C+1), ``bbox_pred`` Linear(F, 4(C+1)); detector index 0 = background):

1. :func:`inject_classifier` copies the synthesized classifier (rows ``[background, unseen
   classes in ascending detector index]``) into ``cls_score``: unseen rows are replaced, the
   background row becomes ``bg_blend * detector background + (1 - bg_blend) * synthesized
   background`` (weight and bias), seen rows stay bit-identical. The detector's own background
   row is kept (returned, and remembered on the predictor) because GZSD needs it.

2. :class:`ZSDPredictor` wraps the predictor and is installed as
   ``model.roi_heads.box_predictor``. This is the plug-in seam: torchvision is not patched.
   ``RoIHeads.postprocess_detections`` applies ``softmax`` to whatever the predictor returns,
   then drops boxes with score <= ``score_thresh``, runs per-class NMS and keeps the top
   ``detections_per_img``. Since ``softmax(log p) = p`` for any probability vector ``p``, the
   wrapper returns **log-probabilities** computed by the rules below, and torchvision's own
   postprocess then thresholds, suppresses and ranks exactly those probabilities.

   Per RoI, with logits ``z`` (C+1 columns, after injection), seen columns S, unseen U,
   excluded X (48/17 only):

   * box regression borrow (all modes but ``seen``; the unseen regression rows were never
     trained), ``box_regression``: ``seen_mixture`` (default) gives every unseen slot the seen
     classes' deltas weighed by the detector's softmax over the seen classes, ``sum_s
     softmax(z[S])_s d_s``; ``best_seen`` (the released code) copies the 4 deltas of ``a_s =
     argmax z[S]`` into the slot of ``a_u = argmax z[U]`` alone.
   * ``zsd`` (§8.2): seen columns get probability 0; softmax over background, unseen and — with
     ``excluded='softmax'``, as in the released code — the excluded classes. ``excluded='mask'``
     gives the excluded classes probability 0 as well. With a gate slope (``--zsd-scoring
     soft``, :mod:`vldus.detection.gzsd`) each box keeps the fraction ``w = sigmoid(slope (e_u -
     seen_weight e_s - threshold))`` of its unseen probabilities (the calibrated probability that
     it is not a seen object; the rest goes to background), so a seen object that looks like an unseen
     class ranks below the real unseen objects; None = the released scoring.
   * ``gzsd`` (§8.3): two softmaxes, ``q_s`` over [detector's own background, seen] and ``q_u``
     over [blended background (column 0), unseen]; each group is calibrated on its own.
     The released code reports ``q_s`` and ``q_u`` directly as scores and a background of
     ``(q_s[bg] + q_u[bg]) / 2``; those numbers sum to between 1 and 2, so they are not a
     distribution and torchvision's softmax would rescale them per RoI. We return instead the
     equal mixture ``p = (q_s + q_u) / 2`` (background = mean of the two backgrounds, the class
     probabilities + background sum to 1). ``p`` is the released score divided by the constant
     :attr:`ZSDPredictor.score_scale` = 2, so rankings, NMS and the top-100 cut are unchanged;
     :func:`prepare_postprocess` divides torchvision's ``score_thresh`` by the same factor and
     :func:`rescale_scores` multiplies the final scores back, which reproduces the released
     scores exactly. Excluded classes get probability 0: the released code leaves their raw
     logits in the score matrix (not probabilities; they are never evaluated but can take
     places in the 100-per-image budget), which no softmax output can express.
     ``seen_score_cut`` (SU's 0.3; VLDUS removed it): seen probabilities ``q_s < cut`` are set to 0
     and their mass moves to the seen group's background. ``joint_threshold`` (``--gzsd-scoring
     joint``, :mod:`vldus.detection.gzsd`): boxes an unseen class explains better lose their
     seen probabilities the same way; with ``joint_slope`` as well (``--gzsd-scoring soft``) each
     box keeps the fraction ``1 - w`` of its seen probabilities and ``w`` of its unseen ones
     (each group's removed mass goes to its background); None = the released scoring.
   * ``seen``: the plain detector restricted to [background, seen] (no injection needed; a
     baseline without synthesis).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from vldus.classifier_files import read_linear
from vldus.data.splits import Split
from vldus.errors import InputError

MODES = ("zsd", "gzsd", "seen")
EXCLUDED_MODES = ("softmax", "mask")
# the unseen classes' box deltas (borrow_box_regression); best_seen: the released code
BOX_REGRESSIONS = ("seen_mixture", "best_seen")


# --------------------------------------------------------------------------------------------
# The synthesized classifier file
# --------------------------------------------------------------------------------------------
def load_syn_classifier(path: str, split: Split, in_features: int) -> tuple[Tensor, Tensor]:
    """Read a synthesized classifier: ``weight`` (1+U, in_features), ``bias`` (1+U,) float32.

    Rows are [background, unseen classes in ascending detector index]. Any layout of
    :mod:`vldus.classifier_files`: ours (``fc.weight`` / ``fc.bias``), the released
    ``classifier_best.pth`` / ``classifier_latest.pth`` / ``classifier_{g}_{c}.pth``
    (``{"state_dict": {"fc1.weight", "fc1.bias"}, "epoch": k}``), or bare ``weight`` / ``bias``.
    Anything that does not fit the split and the detector raises InputError naming the file.
    """
    weight, bias = read_linear(path, "synthesized classifier")
    rows = 1 + len(split.unseen_ids)
    if tuple(weight.shape) != (rows, in_features) or tuple(bias.shape) != (rows,):
        raise InputError(path, f"weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not "
                               f"fit: expected ({rows}, {in_features}) / ({rows},) = 1 background + "
                               f"{rows - 1} unseen classes of split '{split.name}' x the detector's "
                               f"{in_features}-d box features")
    return weight, bias


# --------------------------------------------------------------------------------------------
# §8.1 injection
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def inject_classifier(predictor: nn.Module, split: Split, weight: Tensor, bias: Tensor,
                      bg_blend: float) -> tuple[Tensor, Tensor]:
    """Copy the synthesized classifier into ``predictor.cls_score`` in place (§8.1).

    weight (1+U, F), bias (1+U,): row 0 = background, row k = ``split.unseen_ids[k-1]``.
    Returns the detector's own background row ``(weight (F,), bias ())`` (clones, taken before
    the blend), also stored as ``predictor.detector_background`` for :class:`ZSDPredictor`.
    """
    cls = predictor.cls_score
    unseen = split.unseen_ids
    if cls.out_features != split.num_classes + 1:
        raise ValueError(f"cls_score has {cls.out_features} outputs, split '{split.name}' needs "
                         f"{split.num_classes + 1}")
    if tuple(weight.shape) != (1 + len(unseen), cls.in_features) or tuple(bias.shape) != (1 + len(unseen),):
        raise ValueError(f"synthesized classifier {tuple(weight.shape)}/{tuple(bias.shape)} does not fit "
                         f"({1 + len(unseen)}, {cls.in_features})")
    if getattr(predictor, "detector_background", None) is not None:
        raise ValueError("inject_classifier was already applied to this predictor")
    det_w, det_b = cls.weight[0].clone(), cls.bias[0].clone()
    weight = weight.to(cls.weight)
    bias = bias.to(cls.bias)
    idx = torch.tensor(unseen, device=cls.weight.device)
    cls.weight[idx] = weight[1:]
    cls.bias[idx] = bias[1:]
    cls.weight[0] = bg_blend * det_w + (1.0 - bg_blend) * weight[0]
    cls.bias[0] = bg_blend * det_b + (1.0 - bg_blend) * bias[0]
    predictor.detector_background = (det_w, det_b)
    return det_w, det_b


# --------------------------------------------------------------------------------------------
# §8.2 / §8.3 scoring
# --------------------------------------------------------------------------------------------
def seen_deltas(logits: Tensor, deltas: Tensor, seen_ids: Sequence[int], rule: str = "seen_mixture") -> Tensor:
    """The box deltas an object of no seen class takes, per RoI: ``seen_mixture`` the seen
    classes' deltas weighed by the softmax over the seen logits, ``best_seen`` those of the
    best seen class (the released code).

    logits (R, C+1), deltas (R, 4(C+1)) -> (R, 4).
    """
    if rule not in BOX_REGRESSIONS:
        raise ValueError(f"box regression must be one of {BOX_REGRESSIONS}, got {rule!r}")
    num_rois, cols = logits.shape
    if deltas.shape != (num_rois, 4 * cols):
        raise ValueError(f"class-specific box deltas (R, {4 * cols}) expected, got {tuple(deltas.shape)}")
    seen = _index(seen_ids, logits.device)
    per_class = deltas.reshape(num_rois, cols, 4)[:, seen]  # (R, S, 4)
    if rule == "best_seen":
        rows = torch.arange(num_rois, device=logits.device)
        return per_class[rows, logits[:, seen].argmax(dim=1)]
    weights = logits[:, seen].softmax(dim=1).to(per_class.dtype)
    return torch.einsum("rs,rsk->rk", weights, per_class)


def borrow_box_regression(logits: Tensor, deltas: Tensor, seen_ids: Sequence[int],
                          unseen_ids: Sequence[int], rule: str = "seen_mixture") -> Tensor:
    """Give the unseen classes' slots the deltas of :func:`seen_deltas`: every unseen slot
    (``seen_mixture``), or the best unseen class's slot alone (``best_seen``, the released code:
    the other unseen slots keep their untrained deltas).

    logits (R, C+1), deltas (R, 4(C+1)) -> new deltas (R, 4(C+1)); the input is not modified.
    """
    borrowed = seen_deltas(logits, deltas, seen_ids, rule)
    num_rois, cols = logits.shape
    unseen = _index(unseen_ids, logits.device)
    out = deltas.reshape(num_rois, cols, 4).clone()
    if rule == "best_seen":
        rows = torch.arange(num_rois, device=logits.device)
        out[rows, unseen[logits[:, unseen].argmax(dim=1)]] = borrowed
    else:
        out[:, unseen] = borrowed[:, None, :]
    return out.reshape(num_rois, 4 * cols)


# Index tensors and column masks per (ids, device), made once: built from Python lists at every
# call they were several blocking host-to-device copies per image on CUDA.
_ON_DEVICE: dict = {}


def _index(ids: Sequence[int], device) -> Tensor:
    """``ids`` as an int64 tensor on ``device`` (cached: do not modify it)."""
    key = ("index", tuple(ids), str(device))
    if key not in _ON_DEVICE:
        with torch.inference_mode(False):  # usable outside inference mode too
            _ON_DEVICE[key] = torch.tensor(list(ids), dtype=torch.int64).to(device)
    return _ON_DEVICE[key]


def _column_mask(cols: int, ids: Sequence[int], device) -> Tensor:
    """(cols,) bool, True at ``ids``, on ``device`` (cached: do not modify it)."""
    key = ("mask", cols, tuple(ids), str(device))
    if key not in _ON_DEVICE:
        with torch.inference_mode(False):
            mask = torch.zeros(cols, dtype=torch.bool)
            mask[list(ids)] = True
            _ON_DEVICE[key] = mask.to(device)
    return _ON_DEVICE[key]


def zsd_log_probs(logits: Tensor, split: Split, excluded: str = "softmax",
                  gate: Optional[Tensor] = None) -> Tensor:
    """§8.2: (R, C+1) log-probabilities; seen classes (and excluded ones with 'mask') get log 0.
    ``gate`` (R,) in [0, 1] (the soft scoring's :func:`unseen_weight`): each box keeps that
    share of its unseen probabilities, the rest goes to the background column."""
    keep = [0] + split.unseen_ids + (split.excluded_ids if excluded == "softmax" else [])
    masked = logits.masked_fill(~_column_mask(logits.shape[1], keep, logits.device), float("-inf"))
    if gate is None:
        return F.log_softmax(masked, dim=1)
    probs = F.softmax(masked, dim=1)
    unseen = _index(split.unseen_ids, logits.device)
    moved = probs.index_select(1, unseen) * (1.0 - gate[:, None])
    probs = probs.index_add(1, unseen, -moved)
    probs[:, 0] += moved.sum(dim=1)
    return torch.log(probs)


def seen_log_probs(logits: Tensor, split: Split, background_logit: Optional[Tensor] = None) -> Tensor:
    """The plain detector over [background, seen]: (R, C+1) log-probabilities."""
    if background_logit is not None:
        logits = torch.cat([background_logit[:, None], logits[:, 1:]], dim=1)
    keep = [0] + split.seen_ids
    masked = logits.masked_fill(~_column_mask(logits.shape[1], keep, logits.device), float("-inf"))
    return F.log_softmax(masked, dim=1)


def group_evidence(logits: Tensor, detector_bg_logit: Tensor, split: Split) -> tuple[Tensor, Tensor]:
    """The joint GZSD scoring's evidence (:mod:`vldus.detection.gzsd`): logits (R, C+1) after
    injection, detector_bg_logit (R,) -> (e_s (R,), e_u (R,)), the log-odds "a seen object" vs
    the detector's background and "an unseen object" vs the blended background."""
    e_s = torch.logsumexp(logits[:, _index(split.seen_ids, logits.device)], dim=1) - detector_bg_logit
    e_u = torch.logsumexp(logits[:, _index(split.unseen_ids, logits.device)], dim=1) - logits[:, 0]
    return e_s, e_u


def unseen_wins(logits: Tensor, detector_bg_logit: Tensor, split: Split, threshold: float) -> Tensor:
    """(R,) bool: boxes whose seen scores the joint scoring removes (``e_u - e_s > threshold``)."""
    e_s, e_u = group_evidence(logits, detector_bg_logit, split)
    return (e_u - e_s) > threshold


def unseen_weight(logits: Tensor, detector_bg_logit: Tensor, split: Split, threshold: float,
                  slope: Optional[float], seen_weight: float = 1.0) -> Tensor:
    """(R,) float: the share of each box's seen scores that the joint scoring removes: 0 or 1
    (:func:`unseen_wins`) without ``slope``; ``sigmoid(slope (e_u - seen_weight e_s -
    threshold))``, the calibrated probability that the box is not a seen object, with it (the
    soft scoring)."""
    if slope is None:
        return unseen_wins(logits, detector_bg_logit, split, threshold).to(logits.dtype)
    e_s, e_u = group_evidence(logits, detector_bg_logit, split)
    return torch.sigmoid(slope * (e_u - seen_weight * e_s - threshold))


def gzsd_probs(logits: Tensor, detector_bg_logit: Tensor, split: Split,
               seen_score_cut: Optional[float] = None, joint_threshold: Optional[float] = None,
               joint_slope: Optional[float] = None, soft_gate: Optional[Tensor] = None) -> Tensor:
    """§8.3 as a distribution: (R, C+1) mixture ``(q_seen + q_unseen) / 2`` (see module doc).

    logits (R, C+1) after injection (column 0 = blended background), detector_bg_logit (R,) =
    the detector's own background logit. Rows sum to 1; excluded classes get 0.
    ``joint_threshold``: the joint scoring (:mod:`vldus.detection.gzsd`): boxes where an unseen
    class wins by more than this lose their seen probabilities (mass to the seen background);
    with ``joint_slope`` (the soft scoring) they lose the share w = :func:`unseen_weight` of
    them and keep the share w of their unseen ones (``soft_gate`` (R,): that w computed already,
    with a seen weight or by :func:`object_gate`); None = the published scoring.
    """
    seen, unseen = _index(split.seen_ids, logits.device), _index(split.unseen_ids, logits.device)
    q_s = F.softmax(torch.cat([detector_bg_logit[:, None], logits[:, seen]], dim=1), dim=1)
    q_u = F.softmax(torch.cat([logits[:, :1], logits[:, unseen]], dim=1), dim=1)
    if seen_score_cut is not None:
        q_s = _move_to_background(q_s, (q_s[:, 1:] < seen_score_cut).to(q_s.dtype))
    if joint_threshold is not None:
        if soft_gate is None:
            soft_gate = unseen_weight(logits, detector_bg_logit, split, joint_threshold, joint_slope)
        w = soft_gate[:, None]
        q_s = _move_to_background(q_s, w)
        if joint_slope is not None:  # soft: the unseen side keeps the share w
            q_u = _move_to_background(q_u, 1.0 - w)
    probs = logits.new_zeros(logits.shape)
    probs[:, 0] = 0.5 * (q_s[:, 0] + q_u[:, 0])
    probs[:, seen] = 0.5 * q_s[:, 1:]
    probs[:, unseen] = 0.5 * q_u[:, 1:]
    return probs


def _move_to_background(q: Tensor, share: Tensor) -> Tensor:
    """q (R, 1+K) [background, classes]: move the share (R, 1) or (R, K) of each class
    probability to the background."""
    moved = q[:, 1:] * share
    return torch.cat([q[:, :1] + moved.sum(dim=1, keepdim=True), q[:, 1:] - moved], dim=1)


def object_gate(gate: Tensor, logits: Tensor, detector_bg_logit: Tensor, split: Split, boxes: Tensor,
                iou: float) -> Tensor:
    """One seen/unseen decision per object, not per box: each box's soft gate (R,) becomes the
    mean of the gates of the boxes overlapping it at IoU >= ``iou`` (itself included), each
    weighted by its objectness ``sigmoid(max(e_s, e_u))``. boxes (R, 4) xyxy: the proposals the
    logits (R, C+1, after injection) were computed for. Whether an object is seen or unseen
    should not depend on which of its boxes is asked (measured in docs/gzsd.md)."""
    e_s, e_u = group_evidence(logits, detector_bg_logit, split)
    weight = (box_iou(boxes, boxes) >= iou).to(gate.dtype) * torch.sigmoid(torch.maximum(e_s, e_u))[None, :]
    return (weight @ gate) / weight.sum(dim=1).clamp_min(torch.finfo(gate.dtype).tiny)


class ZSDPredictor(nn.Module):
    """Wraps a FastRCNNPredictor; ``forward(x)`` -> (log-probabilities (R, C+1), deltas (R, 4(C+1))).

    Install as ``model.roi_heads.box_predictor`` (see the module docstring). ``mode`` is
    'zsd', 'gzsd' or 'seen'. GZSD needs the detector's own background row: ``detector_bg``
    ``(weight (F,), bias ())``, by default the one :func:`inject_classifier` left on the predictor.
    ``seen_score_cut`` applies to GZSD only; ``gate_threshold``, ``gate_slope`` and
    ``gate_seen_weight`` are the seen/unseen gate of :mod:`vldus.detection.gzsd`: in GZSD the
    threshold alone is the joint scoring and with the slope the soft one; in ZSD only the soft
    one exists (threshold and slope, or neither); None = the published scoring. ``gate_iou``:
    with the soft gate and the boxes' proposals given to :meth:`forward`, the gate is decided
    per object (:func:`object_gate`); None, or without proposals (torchvision's own
    ``model(images)`` calls the predictor with the features alone), per box. ``box_regression``:
    the unseen classes' box deltas (:func:`borrow_box_regression`). Detection scores
    from torchvision's postprocess are probabilities of this distribution; multiply by
    :attr:`score_scale` (or use :func:`rescale_scores`) for the released per-group scores.
    """

    def __init__(self, base_predictor: nn.Module, split: Split, mode: str,
                 seen_score_cut: Optional[float] = None,
                 detector_bg: Optional[tuple[Tensor, Tensor]] = None, excluded: str = "softmax",
                 gate_threshold: Optional[float] = None, gate_slope: Optional[float] = None,
                 gate_seen_weight: float = 1.0, gate_iou: Optional[float] = None,
                 box_regression: str = "seen_mixture"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if excluded not in EXCLUDED_MODES:
            raise ValueError(f"excluded must be one of {EXCLUDED_MODES}, got {excluded!r}")
        if box_regression not in BOX_REGRESSIONS:
            raise ValueError(f"box_regression must be one of {BOX_REGRESSIONS}, got {box_regression!r}")
        self.base = base_predictor
        self.box_regression = box_regression
        self.split = split
        self.mode = mode
        self.excluded = excluded
        self.seen_score_cut = seen_score_cut if mode == "gzsd" else None
        if mode == "zsd" and (gate_threshold is None) != (gate_slope is None):
            raise ValueError("ZSD scores with the soft gate (threshold and slope) or without one")
        self.gate_threshold = gate_threshold if mode != "seen" else None
        self.gate_slope = gate_slope if mode != "seen" else None
        self.gate_seen_weight = gate_seen_weight
        self.gate_iou = gate_iou
        if detector_bg is None:
            detector_bg = getattr(base_predictor, "detector_background", None)
        if (mode == "gzsd" or self.gate_slope is not None) and detector_bg is None:
            raise ValueError(f"{mode} needs the detector's own background row: call inject_classifier "
                             "first or pass detector_bg")
        if detector_bg is not None:
            self.register_buffer("detector_bg_weight", detector_bg[0].detach().clone(), persistent=False)
            self.register_buffer("detector_bg_bias", detector_bg[1].detach().clone().reshape(()),
                                 persistent=False)
        else:
            self.detector_bg_weight = self.detector_bg_bias = None

    @property
    def score_scale(self) -> float:
        """Released score = this factor x probability (2 in GZSD: two groups, each sums to 1)."""
        return 2.0 if self.mode == "gzsd" else 1.0

    def forward(self, x: Tensor, proposals: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x (R, F) box features [, proposals (R, 4) xyxy of one image] -> (log-probabilities
        (R, C+1), deltas (R, 4(C+1)))."""
        x = x.flatten(start_dim=1)
        logits, deltas = self.base(x)
        bg = None
        if self.detector_bg_weight is not None:
            bg = F.linear(x, self.detector_bg_weight[None], self.detector_bg_bias[None])[:, 0]
        if self.mode == "seen":
            return seen_log_probs(logits, self.split, bg), deltas
        deltas = borrow_box_regression(logits, deltas, self.split.seen_ids, self.split.unseen_ids,
                                       self.box_regression)
        gate = None  # the soft scoring's share of unseen scores per box
        if self.gate_slope is not None:
            gate = unseen_weight(logits, bg, self.split, self.gate_threshold, self.gate_slope, self.gate_seen_weight)
            if self.gate_iou is not None and proposals is not None:
                gate = object_gate(gate, logits, bg, self.split, proposals, self.gate_iou)
        if self.mode == "zsd":
            return zsd_log_probs(logits, self.split, self.excluded, gate), deltas
        return torch.log(gzsd_probs(logits, bg, self.split, self.seen_score_cut, self.gate_threshold,
                                    self.gate_slope, soft_gate=gate)), deltas

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, excluded={self.excluded}, seen_score_cut={self.seen_score_cut}, "
                f"gate_threshold={self.gate_threshold}, gate_slope={self.gate_slope}, "
                f"gate_seen_weight={self.gate_seen_weight}, gate_iou={self.gate_iou}, "
                f"box_regression={self.box_regression}, "
                f"unseen={len(self.split.unseen_ids)}")


# --------------------------------------------------------------------------------------------
# Wiring into a torchvision detector
# --------------------------------------------------------------------------------------------
def install_zsd_head(model: nn.Module, split: Split, mode: str,
                     classifier: Optional[tuple[Tensor, Tensor]] = None, bg_blend: float = 0.35,
                     seen_score_cut: Optional[float] = None, excluded: str = "softmax",
                     gate_threshold: Optional[float] = None, gate_slope: Optional[float] = None,
                     gate_seen_weight: Optional[float] = None, gate_iou: Optional[float] = None,
                     box_regression: str = "seen_mixture") -> ZSDPredictor:
    """Inject ``classifier`` (weight, bias) into ``model``'s predictor and install a ZSDPredictor.

    ``classifier`` is required for 'zsd' / 'gzsd' and ignored for 'seen'. ``gate_threshold``,
    ``gate_slope``, ``gate_seen_weight`` (None: 1), ``gate_iou``: the scoring's seen/unseen gate
    (:class:`ZSDPredictor`; None = published); ``box_regression``: the unseen classes' box deltas
    (:func:`borrow_box_regression`). Also divides ``model.roi_heads.score_thresh`` by the
    predictor's score_scale (see :func:`rescale_scores`).
    """
    base = model.roi_heads.box_predictor
    if isinstance(base, ZSDPredictor):
        raise ValueError("the model already has a ZSD head")
    if mode != "seen":
        if classifier is None:
            raise ValueError(f"mode {mode!r} needs the synthesized classifier")
        inject_classifier(base, split, classifier[0], classifier[1], bg_blend)
    head = ZSDPredictor(base, split, mode, seen_score_cut=seen_score_cut, excluded=excluded,
                        gate_threshold=gate_threshold, gate_slope=gate_slope,
                        gate_seen_weight=1.0 if gate_seen_weight is None else gate_seen_weight,
                        gate_iou=gate_iou, box_regression=box_regression)
    model.roi_heads.box_predictor = head
    prepare_postprocess(model, head)
    return head


def prepare_postprocess(model: nn.Module, head: ZSDPredictor) -> None:
    """Scale torchvision's score threshold so that it applies to released-style scores."""
    model.roi_heads.score_thresh = model.roi_heads.score_thresh / head.score_scale


def rescale_scores(detections: list[dict], head: ZSDPredictor) -> list[dict]:
    """Multiply the ``scores`` of torchvision detection dicts by ``head.score_scale`` (in place).

    Each group probability is at most 1; the clamp only removes float round-off.
    """
    if not math.isclose(head.score_scale, 1.0):
        for det in detections:
            det["scores"] = (det["scores"] * head.score_scale).clamp(max=1.0)
    return detections
