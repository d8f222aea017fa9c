"""Pictures of a synthesizer run: loss curves and a 2-D view of real and synthesized features."""
from __future__ import annotations

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: list[dict], path: str) -> None:
    """Per-epoch means of the critic and generator losses, the CLIP distillation terms (when the
    run had them) and the test accuracy (if recorded)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    panels = [("critic", ("loss_d", "wasserstein", "gp", "distill_d")),
              ("generator", ("loss_g", "adversarial", "cls_seen", "cls_unseen", "distill_g")),
              ("mode seeking", ("mode_seeking",)),
              ("CLIP distillation", ("l_fa", "l_ra_dis", "l_ra_div"))]
    panels = [(t, names) for t, names in panels if any(r.get(n) for r in history for n in names)]
    has_acc = any("best_test_accuracy" in r for r in history)
    fig, axes = plt.subplots(1, len(panels) + has_acc, figsize=(4.2 * (len(panels) + has_acc), 3.4),
                             squeeze=False)
    axes = axes[0]
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            values = [r.get(name, np.nan) for r in history]
            if any(v != 0 for v in values if np.isfinite(v)):
                ax.plot(epochs, values, label=name, marker="." if len(epochs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("GAN epoch")
        ax.legend(fontsize=7)
    if has_acc:
        ax = axes[-1]
        ax.plot(epochs, [max(r.get("test_accuracy", [np.nan])) for r in history], label="epoch best")
        ax.plot(epochs, [r.get("best_test_accuracy", np.nan) for r in history], label="best so far")
        ax.set_title("unseen TEST accuracy (selection)")
        ax.set_xlabel("GAN epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(n, k), replace=False)) if n else np.zeros(0, np.int64)


def plot_features_2d(inputs, syn_feats: torch.Tensor, syn_labels: torch.Tensor, path: str,
                     points: int, seed: int) -> None:
    """PCA (fitted on all shown points) of real seen, synthesized unseen and, when the test
    features exist, real unseen features; unseen classes share a colour between real (o) and
    synthesized (x). ``syn_labels`` are classifier rows 1..U."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    split = inputs.split
    fg = np.flatnonzero(inputs.train.labels > 0)
    seen_rows = fg[_subsample(len(fg), points, rng)]
    groups = [("real seen", inputs.train.gather(seen_rows), None)]
    pick = _subsample(len(syn_feats), points, rng)
    groups.append(("synthesized unseen", syn_feats[pick], syn_labels[pick].numpy()))
    if inputs.test_set is not None:
        fg_test = np.flatnonzero(inputs.test_set.labels.numpy() > 0)
        pick = fg_test[_subsample(len(fg_test), points, rng)]
        groups.append(("real unseen (test)", inputs.test.gather(inputs.test_set.rows[pick]),
                       inputs.test_set.labels.numpy()[pick]))
    data = torch.cat([g[1].float() for g in groups])
    mean = data.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(data - mean, q=2, center=False, niter=4)
    names = [split.classes[i - 1] for i in split.unseen_ids]
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7, 6))
    for name, feats, labels in groups:
        xy = ((feats.float() - mean) @ v).numpy()
        if labels is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=4, c="0.75", label=name)
            continue
        marker = "x" if name.startswith("synth") else "o"
        for k in np.unique(labels):
            m = labels == k
            ax.scatter(xy[m, 0], xy[m, 1], s=8, marker=marker, color=cmap((k - 1) % 20),
                       label=f"{names[k - 1]} ({'syn' if marker == 'x' else 'real'})", alpha=0.7)
    ax.set_title("RoI features, first two principal components")
    ax.legend(fontsize=6, markerscale=1.5, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
