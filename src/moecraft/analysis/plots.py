"""PNG plots of routing statistics (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def usage_heatmaps(mats: Sequence[torch.Tensor], labels: Sequence[str], layers: Sequence[int], path: Path,
                   score_name: str) -> Path:
    """One heatmap per task: rows = MoE layers, columns = experts, colour = relevance score."""
    n = len(mats)
    n_exp = mats[0].shape[1]
    fig, axes = plt.subplots(n, 1, figsize=(max(6, 0.28 * n_exp + 2), 0.45 * len(layers) * n + 1.2 * n),
                             squeeze=False)
    vmax = max(float(m.max()) for m in mats)
    for ax, m, lab in zip(axes[:, 0], mats, labels):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{lab}: {score_name} per expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _save(fig, path)


def concentration_plot(conc: dict[str, torch.Tensor], ps: Sequence[float], layers: Sequence[int], n_experts: int,
                       path: Path) -> Path:
    """Experts needed for share p of the mass, per layer: one panel per p, one line per task."""
    fig, axes = plt.subplots(1, len(ps), figsize=(4 * len(ps), 3.2), squeeze=False, sharey=True)
    for j, (ax, p) in enumerate(zip(axes[0], ps)):
        for lab, c in conc.items():
            ax.plot(range(len(layers)), c[:, j].numpy(), marker="o", label=lab)
        ax.set_title(f"experts holding {p:.0%} of the mass")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel("layer")
        ax.set_ylim(0, n_experts + 0.5)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"experts (of {n_experts})")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def matrix_plot(mat: torch.Tensor, labels: Sequence[str], title: str, path: Path, fmt: str = "{:.2f}",
                vmax: float | None = None) -> Path:
    """Annotated square matrix (overlap between tasks)."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.1 * n + 1.5))
    im = ax.imshow(mat.numpy(), cmap="Blues", vmin=0, vmax=vmax)
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            v = float(mat[i, j])
            ax.text(j, i, fmt.format(v), ha="center", va="center",
                    color="white" if vmax and v > 0.6 * vmax else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def before_after_plot(before: torch.Tensor, after: torch.Tensor, layers: Sequence[int], path: Path,
                      score_name: str) -> Path:
    """Before, after and after - before heatmaps side by side."""
    diff = after - before
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(layers) + 2))
    vmax = max(float(before.max()), float(after.max()))
    lim = max(float(diff.abs().max()), 1e-12)
    for ax, m, title, kw in [
        (axes[0], before, "before", {"cmap": "viridis", "vmin": 0, "vmax": vmax}),
        (axes[1], after, "after", {"cmap": "viridis", "vmin": 0, "vmax": vmax}),
        (axes[2], diff, "after - before", {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}),
    ]:
        im = ax.imshow(m.numpy(), aspect="auto", interpolation="nearest", **kw)
        ax.set_title(f"{title} ({score_name})")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.04)
    axes[0].set_ylabel("layer")
    fig.tight_layout()
    return _save(fig, path)


def bar_plot(groups: dict[str, dict[str, float]], title: str, ylabel: str, path: Path) -> Path:
    """Grouped bars: ``groups[group][series] = value`` (e.g. method -> {before, after})."""
    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.5))
    for k, s in enumerate(series):
        vals = [groups[n].get(s, float("nan")) for n in names]
        bars = ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(names))], vals, width, label=s)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    values = [v for g in groups.values() for v in g.values() if v == v]
    if values and min(values) >= 0:  # scores and perplexities: keep 0 at the bottom, even when all are 0
        ax.set_ylim(0, max(max(values) * 1.15, 1.0))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
