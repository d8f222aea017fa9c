"""A small, well-separated synthetic stage-3 task shared by the synthesizer tests.

Features of class k are ``2 + e_k @ P + noise`` (clipped at 0 like post-ReLU RoI features),
where e_k is class k's embedding row: the embeddings are informative of the means through a
linear map, so a generator trained on seen classes can place unseen classes correctly.
Writes, under ``root``: split.json, se.npy, features/{train,test,val}_0.6_0.3_{feats,labels}.npy
(val: seen classes only, as ``extract-features --data-split val`` of a seen-only validation split),
detector/epoch_1.pth (C_s = nearest-mean classifier), and a config YAML.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import yaml


@dataclass
class Task:
    root: str
    config: str
    split: str
    embeddings: str
    features_dir: str
    detector: str
    means: np.ndarray  # (C+1, dim)
    unseen_ids: list


def make_task(root, dim: int = 32, att_dim: int = 6, seen: int = 10, unseen: int = 4,
              per_class: int = 200, noise: float = 0.3, scale: float = 1.5, seed: int = 1, overrides: dict | None = None) -> Task:
    root = str(root)
    rng = np.random.default_rng(seed)
    num = seen + unseen
    classes = [f"c{i}" for i in range(num)]
    unseen_names = classes[1::3][:unseen]  # interleaved: unseen ids are not the last ones
    split = os.path.join(root, "split.json")
    with open(split, "w") as f:
        json.dump({"name": "toy", "classes": classes, "unseen": unseen_names}, f)
    unseen_ids = sorted(classes.index(n) + 1 for n in unseen_names)
    seen_ids = [i for i in range(1, num + 1) if i not in unseen_ids]

    # unit-norm embeddings (like CLIP text vectors): the compatibility classifier scores by dot
    # product, which ranks classes by direction only when the rows have equal norms
    emb = rng.normal(size=(num + 1, att_dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    proj = rng.normal(size=(att_dim, dim)).astype(np.float32) * scale
    means = 2.0 + emb @ proj
    se = os.path.join(root, "se.npy")
    np.save(se, emb)

    def sample(ids, counts):
        labels = np.concatenate([np.full(n, k) for k, n in zip(ids, counts)]).astype(np.int64)
        feats = means[labels] + noise * rng.normal(size=(len(labels), dim))
        order = rng.permutation(len(labels))
        return np.maximum(feats, 0).astype(np.float32)[order], labels[order]

    fdir = os.path.join(root, "features")
    os.makedirs(fdir)
    n_fg = per_class * len(seen_ids)
    x, y = sample([0] + seen_ids, [2 * n_fg] + [per_class] * len(seen_ids))
    np.save(os.path.join(fdir, "train_0.6_0.3_feats.npy"), x)
    np.save(os.path.join(fdir, "train_0.6_0.3_labels.npy"), y)
    x, y = sample([0] + unseen_ids, [per_class] + [per_class // 2] * len(unseen_ids))
    np.save(os.path.join(fdir, "test_0.6_0.3_feats.npy"), x)
    np.save(os.path.join(fdir, "test_0.6_0.3_labels.npy"), y)
    # held-out seen-only validation images (the GZSD calibration's seen rows)
    x, y = sample([0] + seen_ids, [per_class] + [per_class // 4] * len(seen_ids))
    np.save(os.path.join(fdir, "val_0.6_0.3_feats.npy"), x)
    np.save(os.path.join(fdir, "val_0.6_0.3_labels.npy"), y)

    # C_s: the nearest-mean classifier (argmin |x - mean|), as the detector's cls_score layer
    os.makedirs(os.path.join(root, "detector"))
    det = os.path.join(root, "detector", "epoch_1.pth")
    w = torch.from_numpy(means).float() / 10  # temperature 10: moderate logits, like a trained head
    torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": w,
                          "roi_heads.box_predictor.cls_score.bias": -5 * (w * w).sum(1)},
                "epoch": 1, "classes": classes}, det)

    cfg = {
        "name": "toy", "split": split, "work_dir": root,
        "data": {"val": {"format": "coco", "ann_file": os.path.join(root, "instances_val.json")}},
        "features": {"dim": dim},
        "embeddings": {"file": se, "spectral_norm": False},
        "compat": {"epochs": 4, "batch_size": 64, "val_batch_size": 256, "lr": 1.0, "momentum": 0.9,
                   "lr_step": 3, "lr_gamma": 0.1, "val_fraction": 0.2, "seed": 806},
        "gan": {"nz": 8, "ngh": 64, "ndh": 64, "d_feat": 16, "lambda_gp": 10, "critic_iter": 5,
                "lr": 0.003, "beta1": 0.5, "batch_size": 32, "epochs": 20, "epoch_budget": 640,
                "cls_weight": 1.0, "cls_weight_unseen": 0.1, "lz_ratio": 0.001, "distill": "off",
                "distill_rows": 4, "seed": 806, "precision": "fp32", "detector_checkpoint": det},
        "unseen_classifier": {"syn_num": 100, "epochs": 8, "lr": 0.001, "lr_step": 20,
                              "batch_size": 32, "bg_multiplier": 2, "selection": "last"},
    }
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        cfg[section][name] = value
    config = os.path.join(root, "toy.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    return Task(root, config, split, se, fdir, det, means, unseen_ids)


def train_compat(task: Task) -> str:
    """Stage 3a on the task (seconds); returns the compat classifier path."""
    from vldus.cli import main

    assert main(["train-unseen-classifier", "--config", task.config, "--quiet"]) == 0
    return os.path.join(task.root, "synth", "compat_classifier.pth")
