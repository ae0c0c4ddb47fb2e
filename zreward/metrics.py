"""Evaluation metrics of SPEC section 5 (the core; the scoring-library issue extends this module).

* :func:`hpa`: human preference accuracy over same-group, same-dimension pairs whose reference
  scores differ; a pair is correct iff ``(mu_a - mu_b)(s_a - s_b) > 0``, so a predicted tie is
  wrong.  ``margin`` keeps only pairs with ``|s_a - s_b| > margin`` (margin HPA uses 0.5).
* :func:`plcc` (Pearson, raw) and :func:`srcc` (Spearman, average ranks for ties).
"""

from __future__ import annotations

from typing import Optional

import torch


def hpa(pred: torch.Tensor, ref: torch.Tensor, groups: torch.Tensor, margin: float = 0.0) -> float:
    """HPA of predictions ``pred [N]`` against reference scores ``ref [N]`` within ``groups [N]``.

    Every unordered pair ``(a, b)`` with ``groups[a] == groups[b]`` and ``|ref_a - ref_b| > margin``
    (and ``ref_a != ref_b``) counts once.  Returns NaN when there is no such pair.
    """
    pred, ref, groups = pred.detach().double().flatten(), ref.detach().double().flatten(), groups.flatten()
    if not (pred.shape == ref.shape == groups.shape):
        raise ValueError(f"pred, ref and groups must have the same length, got {pred.shape}, {ref.shape}, {groups.shape}")
    order = torch.argsort(groups, stable=True)
    pred, ref, groups = pred[order], ref[order], groups[order]
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    correct = 0
    total = 0
    start = 0
    for c in counts.tolist():  # groups are small (a prompt's candidates); pairs inside are vectorised
        p, r = pred[start:start + c], ref[start:start + c]
        start += c
        if c < 2:
            continue
        iu = torch.triu_indices(c, c, offset=1)
        dr = r[iu[0]] - r[iu[1]]
        dp = p[iu[0]] - p[iu[1]]
        keep = (dr != 0) & (dr.abs() > margin)
        total += int(keep.sum())
        correct += int(((dp * dr) > 0)[keep].sum())
    return correct / total if total else float("nan")


def plcc(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Pearson linear correlation (raw, no logistic fit)."""
    x = pred.detach().double().flatten()
    y = ref.detach().double().flatten()
    x = x - x.mean()
    y = y - y.mean()
    den = (x.norm() * y.norm()).item()
    return float((x @ y).item() / den) if den > 0 else float("nan")


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    sorted_x, order = torch.sort(x, stable=True)
    ranks = torch.empty_like(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    starts = ends - counts.double()
    avg = (starts + ends - 1) / 2  # mean 0-based position of each tie block
    ranks[order] = avg[inverse] + 1
    return ranks


def srcc(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Spearman rank correlation (ties get average ranks, as scipy.stats.spearmanr)."""
    x = pred.detach().double().flatten()
    y = ref.detach().double().flatten()
    return plcc(_average_ranks(x), _average_ranks(y))


def trimmed_mean(ratings: torch.Tensor, dim: int = -1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference score: mean after dropping one highest and one lowest rating (SPEC section 2).

    With fewer than three ratings the plain mean is used.
    """
    r = ratings.double()
    if mask is None:
        mask = torch.ones_like(r, dtype=torch.bool)
    n = mask.sum(dim)
    big = torch.finfo(torch.float64).max
    total = torch.where(mask, r, 0).sum(dim)
    hi = torch.where(mask, r, -big).max(dim).values
    lo = torch.where(mask, r, big).min(dim).values
    trimmed = (total - hi - lo) / (n - 2).clamp(min=1)
    plain = total / n.clamp(min=1)
    return torch.where(n >= 3, trimmed, plain)
