"""Detect any class names in images with a model bundle (``vldus export``).

    from vldus.api import ZeroShotDetector
    det = ZeroShotDetector.load("bundle/")
    det.set_classes(["zebra", "giraffe"])
    results = det(images)   # PIL images, float tensors (3, H, W) in 0..1, or paths
    # -> [{"boxes": (K, 4) float32 xyxy pixels, "labels": [name, ...], "scores": (K,) float32}, ...]

How new names are detected (:meth:`ZeroShotDetector.set_classes`):

1. each name is embedded with the bundle's encoder and divided by the bundle's scale (the
   spectral norm of the training embedding matrix), like the training classes were;
2. the bundle's generator synthesizes ``unseen_classifier.syn_num`` features per name; with the
   bundle's real background features they train a fresh unseen classifier
   (:func:`vldus.synthesis.unseen_classifier.train_unseen_classifier`, seconds). The classifier
   is cached under ``BUNDLE/cache/`` (or ``~/.cache/vldus`` when the bundle is read-only), keyed
   by the bundle digest and the sorted names: the same names load it instead of retraining;
3. the detector's predictor gets the new names as EXTRA rows: a head over
   ``detector classes + new names`` whose first C+1 rows are the trained detector's and whose new
   rows receive the synthesized classifier (:func:`vldus.detection.zsd.install_zsd_head`). The
   detector's own unseen classes (never trained) are masked out; ZSD scores only the new names,
   GZSD (``gzsd=True``) the seen classes and the new names (§8.3). A new name equal to a seen
   class takes that class's place in GZSD (the seen row is masked). GZSD scores as ``vldus
   test --gzsd`` (default joint scoring, its threshold calibrated for the new names on the
   bundle's seen validation features; :meth:`ZeroShotDetector.set_classes`);
4. images go through the one inference path of ``vldus test``
   (:func:`vldus.detection.inference.score_image`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from vldus.bundle import CACHE_DIR, DETECTOR_FILE, GENERATOR_FILE, BACKGROUND_FILE, Bundle, load_bundle
from vldus.data.images import check_readable, read_rgb, to_float
from vldus.errors import InputError
from vldus.files import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ImageLike = Union[str, os.PathLike, "PIL.Image.Image", torch.Tensor]  # noqa: F821


def parse_class_names(names: Union[str, Sequence[str]], source: str = "--classes") -> list[str]:
    """Names from a list or a comma-separated string; InputError for an empty or duplicate name."""
    from vldus.data.splits import normalize_name

    items = names.split(",") if isinstance(names, str) else list(names)
    out, seen = [], {}
    for k, name in enumerate(items, start=1):
        if not isinstance(name, str) or not name.strip():
            raise InputError(source, f"class name {k} is empty")
        name = name.strip()
        key = normalize_name(name)
        if key in seen:
            raise InputError(source, f"{name!r}: duplicate class name (same as {seen[key]!r})")
        seen[key] = name
        out.append(name)
    if not out:
        raise InputError(source, "no class names given")
    return out


def embed_names(encoder: dict, names: Sequence[str]) -> np.ndarray:
    """(N, d) float32 embeddings of ``names`` on the training scale (see encoder.json in vldus.bundle)."""
    from vldus.data.embeddings import build_embeddings

    kind = encoder["encoder"]
    if kind == "attributes":
        from vldus.data.shapes import ATTRIBUTE_NAMES

        if list(encoder.get("attributes", [])) != list(ATTRIBUTE_NAMES):
            raise InputError("encoder.json", "attribute vocabulary differs from this vldus version's")
        matrix, _ = build_embeddings(names, "attributes")
    elif kind == "clip":
        from vldus.files import sha256_file

        weights = encoder["weights"]
        if not os.path.isfile(weights):
            raise InputError(weights, "CLIP weights of the bundle's encoder not found")
        if encoder.get("weights_sha256") and sha256_file(weights) != encoder["weights_sha256"]:
            raise InputError(weights, "CLIP weights differ from the ones the bundle was trained with (sha256)")
        matrix, _ = build_embeddings(names, "clip", weights=weights, arch=encoder.get("arch"),
                                     prompts=encoder.get("prompts"),
                                     quickgelu=encoder.get("quickgelu", "auto"))
    elif kind == "minilm":
        model = encoder.get("model")
        matrix, _ = build_embeddings(names, "minilm", weights=model if model and os.path.isdir(model) else None,
                                     prompts=encoder.get("prompts"))
    else:
        raise InputError("encoder.json", f"unknown encoder {kind!r}")
    rows = np.asarray(matrix[1:], dtype=np.float64) / float(encoder["scale"])
    if rows.shape[1] != int(encoder["dim"]):
        raise InputError("encoder.json", f"encoder gives {rows.shape[1]}-d embeddings, bundle expects {encoder['dim']}")
    return rows.astype(np.float32)


def read_image(image: ImageLike, where: str = "image") -> torch.Tensor:
    """float32 (3, H, W) in 0..1 from a path, a PIL image or such a tensor; InputError otherwise."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise InputError(where, f"expected a float tensor (3, H, W), got {image.dtype} {tuple(image.shape)}")
        if image.numel() == 0 or image.min() < 0 or image.max() > 1:
            raise InputError(where, "tensor values must lie in 0..1")
        return image.float()
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, (str, os.PathLike)):
        return to_float(read_rgb(str(image)))
    else:
        raise InputError(where, f"expected a path, a PIL image or a tensor, got {type(image).__name__}")
    return to_float(torch.from_numpy(array.copy()).permute(2, 0, 1))


class ZeroShotDetector:
    """A bundle's detector with classes chosen at run time (see the module doc)."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", cache_dir: Optional[str] = None):
        self.bundle = bundle
        self.device = torch.device(device)
        self.cache_dir = cache_dir or self._default_cache_dir()
        self.cfg, self.split = bundle.cfg, bundle.split
        self._detector_state = bundle.tensors(DETECTOR_FILE)
        self.classes: list[str] = []
        self.gzsd = False
        self.classifier_source: Optional[str] = None  # 'cache' | 'trained' after set_classes
        self.classifier_path: Optional[str] = None
        self.model = None
        self.head = None
        self.scoring: Optional[dict] = None  # {"scoring", "threshold", "slope", "seen_weight", "source"} that runs
        self.calibration: Optional[dict] = None  # the gzsd_calibration dict made for the names (None: none made)

    @property
    def gzsd_scoring(self) -> Optional[dict]:
        """:attr:`scoring` in GZSD, else None (the name before ZSD had a scoring of its own)."""
        return self.scoring if self.gzsd else None

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu", cache_dir: Optional[str] = None) -> "ZeroShotDetector":
        """Open and verify the bundle at ``path`` (InputError when it is not a valid bundle)."""
        return cls(load_bundle(path), device, cache_dir)

    def _default_cache_dir(self) -> str:
        own = os.path.join(self.bundle.path, CACHE_DIR)
        try:
            os.makedirs(own, exist_ok=True)
            if os.access(own, os.W_OK):
                return own
        except OSError:
            pass
        return os.path.join(os.path.expanduser("~"), ".cache", "vldus", self.bundle.digest[:16])

    # --- classes ------------------------------------------------------------------------
    def set_classes(self, names: Union[str, Sequence[str]], gzsd: bool = False) -> None:
        """Detect ``names`` from now on (and, with ``gzsd``, the bundle's seen classes too).

        Scores as ``vldus test --zsd`` / ``--gzsd`` does (``inference.zsd_scoring`` /
        ``gzsd_scoring`` of the bundle's config): the configured scoring with
        ``inference.gzsd_threshold`` when set, else one calibrated here on the bundle's real seen
        validation features against features of the new names synthesized by the generator
        (:func:`vldus.synthesis.calibrate.calibrate_generator`, the calibration train-generator
        runs); ``self.scoring`` says what runs, ``self.calibration`` (None when the config fixes
        the scoring) what the calibration found."""
        from vldus.data.splits import Split, normalize_name
        from vldus.detection.model import build_detector
        from vldus.detection.zsd import install_zsd_head

        names = parse_class_names(names)
        weight, bias = self._classifier(names)
        split = self.split
        queries = tuple(f"<query {k}: {n}>" for k, n in enumerate(names, start=1))
        masked = list(split.unseen) + list(split.excluded)
        if gzsd:
            keys = {normalize_name(n) for n in names}
            masked += [c for c in split.seen if normalize_name(c) in keys]
        ext = Split(f"{split.name}+query", tuple(split.classes) + queries, queries, tuple(masked))

        model = build_detector(self.cfg, split, load_backbone=False)
        model.load_state_dict(self._detector_state)
        model.roi_heads.box_predictor = _extend_predictor(model.roi_heads.box_predictor, len(names))
        model.to(self.device).eval()
        setting = "gzsd" if gzsd else "zsd"
        scoring = self._scoring(model, ext, names, weight, bias, setting)
        inf = self.cfg.inference
        self.head = install_zsd_head(model, ext, setting, (weight, bias), bg_blend=inf.bg_blend,
                                     seen_score_cut=inf.seen_score_cut, excluded="mask",
                                     gate_threshold=scoring["threshold"], gate_slope=scoring["slope"],
                                     gate_seen_weight=scoring["seen_weight"], gate_iou=inf.gate_iou,
                                     box_regression=inf.box_regression)
        self.model, self.classes, self.gzsd, self.ext_split = model, names, gzsd, ext
        self.scoring = scoring
        self.label_names = list(split.classes) + names  # detector index k -> label_names[k - 1]

    def _scoring(self, model, ext, names: list[str], weight: torch.Tensor, bias: torch.Tensor, setting: str) -> dict:
        """``{"scoring", "threshold", "slope", "seen_weight", "source"}`` as
        :func:`vldus.detection.gzsd.resolve_scoring`, with the calibration computed for the new
        names (see :meth:`set_classes`)."""
        from vldus.detection.gzsd import calibrated_scoring, configured_scoring, published, wanted_scoring
        from vldus.synthesis.calibrate import SEED_KEY, calibrate_generator
        from vldus.synthesis.data import derive_seed

        inf = self.cfg.inference
        self.calibration = None
        configured = configured_scoring(inf, setting)
        if configured is not None:
            return configured
        stored = self.bundle.tensors(BACKGROUND_FILE)
        if "seen_features" not in stored:
            return published("the bundle has no seen features to calibrate on (export it again)")
        keep = torch.isin(stored["seen_labels"], torch.tensor(ext.seen_ids))
        cls = model.roi_heads.box_predictor.cls_score
        seen_names = [ext.classes[k - 1] for k in ext.seen_ids]
        calibration = calibrate_generator(
            stored["seen_features"][keep], self._generator(), torch.from_numpy(embed_names(self.bundle.encoder, names)),
            torch.from_numpy(embed_names(self.bundle.encoder, seen_names)),
            (cls.weight.cpu(), cls.bias.cpu()), (weight, bias), ext, inf, derive_seed(self.cfg.gan.seed, SEED_KEY),
            "the bundle's seen features vs synthesized features of the new names", GENERATOR_FILE)
        self.calibration = calibration
        return calibrated_scoring(wanted_scoring(inf, setting), calibration,
                                  f"calibrated for these names on {int(keep.sum())} seen features of the bundle")

    def _generator(self):
        from vldus.synthesis.models import load_generator

        cfg = self.cfg
        return load_generator(self.bundle.tensors(GENERATOR_FILE), cfg.gan.nz, int(self.bundle.encoder["dim"]),
                              cfg.gan.ngh, cfg.features.dim, self.bundle.file(GENERATOR_FILE))

    def _cache_key(self, sorted_names: list[str]) -> str:
        blob = json.dumps({"bundle": self.bundle.digest, "names": sorted_names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _classifier(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1+N, dim) weight and (1+N,) bias, rows [background] + names in the given order."""
        from safetensors.torch import load_file, save_file

        order = sorted(names)
        path = os.path.join(self.cache_dir, f"classifier_{self._cache_key(order)}.safetensors")
        state = None
        if os.path.isfile(path):
            try:
                state = load_file(path)
                if state["weight"].shape != (1 + len(order), self.cfg.features.dim):
                    state = None
            except Exception:  # a damaged cache entry is retrained, not an error
                state = None
        if state is not None:
            self.classifier_source = "cache"
        else:
            state = self._train_classifier(order)
            os.makedirs(self.cache_dir, exist_ok=True)
            metadata = {"names": json.dumps(order), "bundle": self.bundle.digest}
            atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
            self.classifier_source = "trained"
        self.classifier_path = path
        rows = torch.tensor([0] + [1 + order.index(n) for n in names])
        return state["weight"][rows].contiguous(), state["bias"][rows].contiguous()

    def _train_classifier(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Synthesize syn_num features per name, add real background, train the classifier."""
        from vldus.synthesis.models import synthesize
        from vldus.synthesis.unseen_classifier import train_unseen_classifier

        cfg, uc = self.cfg, self.cfg.unseen_classifier
        att = torch.from_numpy(embed_names(self.bundle.encoder, names))
        g = torch.Generator().manual_seed(cfg.gan.seed)
        syn = synthesize(self._generator(), att, uc.syn_num, g)
        index = torch.arange(len(names)).repeat_interleave(uc.syn_num)
        background = self.bundle.tensors(BACKGROUND_FILE)["features"]
        n_bg = min(uc.bg_multiplier * uc.syn_num, len(background))
        bg = background[torch.randperm(len(background), generator=g)[:n_bg]]
        feats = torch.cat([syn, bg])
        labels = torch.cat([index + 1, torch.zeros(n_bg, dtype=torch.int64)])
        model = train_unseen_classifier(feats, labels, len(names), uc, g)
        return {"weight": model.fc.weight.detach().contiguous(), "bias": model.fc.bias.detach().contiguous()}

    # --- detection ----------------------------------------------------------------------
    @torch.inference_mode()
    def detect_tensor(self, image: torch.Tensor, score_thresh: float = 0.3) -> dict:
        """One image float32 (3, H, W) in 0..1 -> {"boxes" (K,4), "labels" [names], "scores" (K,),
        "label_ids" (K,) detector index of the extended head}, scores >= score_thresh, best first."""
        from vldus.detection.cache import box_inputs
        from vldus.detection.inference import score_image

        if self.model is None:
            raise InputError("set_classes", "call set_classes(names) before detecting")
        det = score_image(self.model, self.head, box_inputs(self.model, image.to(self.device)))
        keep = np.flatnonzero(det["scores"] >= score_thresh)
        keep = keep[np.argsort(-det["scores"][keep], kind="stable")]
        ids = det["labels"][keep]
        return {"boxes": det["boxes"][keep], "scores": det["scores"][keep],
                "labels": [self.label_names[int(i) - 1] for i in ids], "label_ids": ids}

    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]], score_thresh: float = 0.3) -> list[dict]:
        if isinstance(images, (str, os.PathLike, torch.Tensor)) or hasattr(images, "convert"):
            images = [images]
        return [self.detect_tensor(read_image(im, f"images[{i}]"), score_thresh) for i, im in enumerate(images)]

    def draw(self, image: torch.Tensor, result: dict, score_thresh: float = 0.3):
        """A PIL picture of ``result`` on ``image`` (float (3, H, W)); new names in the unseen colour."""
        from PIL import Image

        from vldus.detection.visualize import draw_detections

        pil = Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
        return draw_detections(pil, result["boxes"], result["scores"], result["label_ids"], self.label_names,
                               self.ext_split.unseen_ids, score_thresh)


def _extend_predictor(predictor, extra: int):
    """A FastRCNNPredictor with ``extra`` zero rows appended after the C+1 trained ones (the new
    names' cls rows are filled by the injection; their box deltas are borrowed from seen classes)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    cls, box = predictor.cls_score, predictor.bbox_pred
    rows = cls.out_features
    new = FastRCNNPredictor(cls.in_features, rows + extra)
    with torch.no_grad():
        for layer in (new.cls_score, new.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
        new.cls_score.weight[:rows] = cls.weight
        new.cls_score.bias[:rows] = cls.bias
        new.bbox_pred.weight[:4 * rows] = box.weight
        new.bbox_pred.bias[:4 * rows] = box.bias
    return new.to(cls.weight.device)


def check_image_files(paths: Sequence[str]) -> None:
    """InputError for the first file that is not an image PIL can open (header only: cheap)."""
    for path in paths:
        check_readable(path)


def image_paths(inputs: Sequence[str]) -> list[str]:
    """Files named directly, plus the image files (by extension, sorted) of named folders."""
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f)))
            if not found:
                raise InputError(item, "folder holds no image files")
            out += found
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise InputError(item, "image file or folder not found")
    return out
