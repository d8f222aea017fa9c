"""The synthesized unseen classifier (docs/design.md §7).

A fresh Linear(1024 -> 1 + |unseen|) is trained on ``syn_num`` synthesized features per unseen
class plus ``bg_multiplier * syn_num`` real background features; outputs are
[background, unseen classes in ascending detector index] — the rows the injection step copies
into the detector. Adam(lr, betas (0.5, 0.999)), cross-entropy, shuffled batches; after epoch e
(0-based) the learning rate becomes lr * 0.1 ** (e // lr_step), as published.

Model selection: the default (``selection: last``) trains it once, after the last GAN epoch, and
keeps the last classifier epoch — no test data is looked at. ``selection: test`` reproduces the
published protocol (after every GAN epoch, keep the classifier with the best mean per-class
accuracy on the real unseen TEST features); it leaks test data and says so.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from vldus.errors import InputError
from vldus.synthesis.data import CHUNK_ROWS, FeatureFile
from vldus.synthesis.models import UnseenClassifier


def train_unseen_classifier(feats: torch.Tensor, labels: torch.Tensor, num_unseen: int, uc_cfg,
                            generator: torch.Generator,
                            on_epoch: Optional[Callable[[int, UnseenClassifier], None]] = None
                            ) -> UnseenClassifier:
    """Train a fresh classifier on feats (N, dim) float32 / labels (N,) in 0..num_unseen.

    ``on_epoch(epoch (1-based), classifier)`` is called after every epoch (selection hook).
    ``generator`` draws the initial weights and the batch order.
    """
    device = feats.device
    model = UnseenClassifier(feats.shape[1], num_unseen, generator=generator).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=uc_cfg.lr, betas=(0.5, 0.999))
    for epoch in range(uc_cfg.epochs):
        model.train()
        order = torch.randperm(len(feats), generator=generator).to(device)
        for start in range(0, len(order), uc_cfg.batch_size):
            rows = order[start:start + uc_cfg.batch_size]
            loss = F.cross_entropy(model(feats[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = uc_cfg.lr * 0.1 ** (epoch // uc_cfg.lr_step)
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
    return model


def mean_class_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[int, float]]:
    """Mean over the classes present in ``labels`` of the per-class accuracy, and the per-class map."""
    per_class = {}
    for c in torch.unique(labels).tolist():
        mask = labels == c
        per_class[int(c)] = float((pred[mask] == c).float().mean())
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


class LabelledFeatures:
    """Rows of a feature file whose labels are background or unseen, labels mapped to
    classifier rows 0..U (0 = background, k = k-th unseen class). Read chunk by chunk."""

    def __init__(self, features: FeatureFile, unseen_ids: list[int]):
        mapping = np.full(features.labels.max(initial=0) + 1, -1, dtype=np.int64)
        mapping[0] = 0
        for k, cid in enumerate(unseen_ids):
            if cid < len(mapping):
                mapping[cid] = k + 1
        mapped = mapping[features.labels]
        self.features = features
        self.rows = np.flatnonzero(mapped >= 0)
        self.labels = torch.from_numpy(mapped[self.rows])
        self.dropped = int(len(mapped) - len(self.rows))
        if len(self.rows) == 0:
            raise InputError(features.labels_path, "no background or unseen-class rows")
        self._on_device: Optional[tuple[torch.device, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> torch.Tensor:
        """Arg-max predictions (len,) of ``model`` on every row.

        On an accelerator the rows are read from the file once and kept there (``selection:
        test`` predicts after every classifier epoch); on the CPU they are read chunk by chunk.
        """
        device = torch.device(device)
        if device.type != "cpu":
            if self._on_device is None or self._on_device[0] != device:
                rows = torch.empty((len(self.rows), self.features.dim), device=device)
                for start in range(0, len(self.rows), CHUNK_ROWS):
                    rows[start:start + CHUNK_ROWS] = self.features.gather(self.rows[start:start + CHUNK_ROWS])
                self._on_device = (device, rows)
            x = self._on_device[1]
            return torch.cat([model(x[s:s + CHUNK_ROWS]).argmax(1) for s in range(0, len(x), CHUNK_ROWS)]).cpu()
        preds = []
        for start in range(0, len(self.rows), CHUNK_ROWS):
            x = self.features.gather(self.rows[start:start + CHUNK_ROWS]).to(device)
            preds.append(model(x).argmax(1).cpu())
        return torch.cat(preds)

    def accuracy(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> tuple[float, dict[int, float]]:
        return mean_class_accuracy(self.predict(model, device), self.labels)
