"""Routing analysis from router statistics (ESFT §3.2 and Figure 2; relevance scores of eq. 5/6).

All functions take score matrices ``[n_layers, n_experts]`` (float64; rows are MoE layers).
- concentration: per layer, the fewest experts holding a share p of the layer's score mass
  (eq. 8 on row-normalised scores), for several p: small numbers mean a task uses few experts;
- shared top-k: per layer |top-k(A) ∩ top-k(B)|, averaged over layers (the paper's Figure 2 measure,
  with k the model's experts per token);
- Jaccard of the eq. 8 selections |S_A ∩ S_B| / |S_A ∪ S_B|, averaged over layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moecraft.errors import MoecraftError


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise MoecraftError(f"score matrices differ in shape {tuple(a.shape)} vs {tuple(b.shape)}: not the same model?")


def concentration(scores: torch.Tensor, ps: Sequence[float]) -> torch.Tensor:
    """``[n_layers, len(ps)]`` int: experts needed to hold share p of each layer's mass."""
    from moecraft.esft.selection import select_layer

    return torch.tensor([[len(select_layer(row, p, normalize=True)) for p in ps] for row in scores], dtype=torch.long)


def top_k_sets(scores: torch.Tensor, k: int) -> list[set[int]]:
    """Per layer, the ids of the k highest scores (ties -> lower id, as in selection)."""
    order = torch.sort(-scores.double(), dim=1, stable=True).indices[:, :k]
    return [set(r.tolist()) for r in order]


def shared_top_k(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over layers of the number of experts in both top-k sets (0..k)."""
    _check_pair(a, b)
    return sum(len(x & y) for x, y in zip(top_k_sets(a, k), top_k_sets(b, k))) / a.shape[0]


def selections(scores: torch.Tensor, p: float) -> list[set[int]]:
    """Per layer, the eq. 8 selection (raw scores, as training would use them)."""
    from moecraft.esft.selection import select_layer

    return [set(select_layer(row, p)) for row in scores]


def jaccard_selected(a: torch.Tensor, b: torch.Tensor, p: float) -> float:
    """Mean over layers of the Jaccard index of the eq. 8 selections of A and B."""
    _check_pair(a, b)
    sa, sb = selections(a, p), selections(b, p)
    return sum(len(x & y) / len(x | y) for x, y in zip(sa, sb)) / a.shape[0]


def overlap_matrix(mats: Sequence[torch.Tensor], fn, *args) -> torch.Tensor:
    """Symmetric ``[n, n]`` matrix of ``fn(mats[i], mats[j], *args)``."""
    n = len(mats)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = fn(mats[i], mats[j], *args)
    return out
