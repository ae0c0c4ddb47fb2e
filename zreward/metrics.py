"""Evaluation metrics (SPEC section 5).

* :func:`hpa` -- human preference accuracy over pairs within the same group (prompt) and dimension
  whose reference scores differ; a pair is correct iff ``(mu_a - mu_b)(s_a - s_b) > 0``, so a
  predicted tie is wrong (``pred_ties="wrong"``, the SPEC).  Labelled alternatives:
  ``pred_ties="half"`` (a predicted tie counts 0.5) and ``pred_ties="skip"`` (such pairs are left
  out).  ``margin`` keeps only pairs with ``|s_a - s_b| > margin`` (margin HPA: 0.5).
* :func:`plcc` (Pearson on the raw scores; ``logistic=True`` first maps the predictions through the
  4-parameter logistic fitted to the references, as image-quality work does), :func:`srcc`
  (Spearman), :func:`krcc` (Kendall tau-b).
* Distribution metrics against rater histograms over the bins: :func:`kl_divergence`
  ``KL(raters || model)``, :func:`js_divergence` (base 2, in [0, 1]) and :func:`wasserstein1`
  (earth mover's distance on the score axis).
* :func:`pairwise_ece` -- calibration of the pairwise preference probability
  ``P(a > b) = P(X_a > X_b) + 0.5 P(X_a = X_b)`` with independent ``X ~`` each item's predicted
  distribution, oriented towards the predicted winner and binned by confidence (10 bins).
* :func:`trimmed_mean` -- the test-set reference: mean after dropping the highest and lowest rating.
* :func:`gsb` -- the downstream side-by-side score ``(Good - Bad) / (Good + Same + Bad)`` of a tuned
  generator against its baseline.
* :func:`evaluate` -- all of the above but GSB, pooled over dimensions and per dimension.

Inputs may be tensors, arrays or lists; computation is float64 numpy/scipy.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator
from typing import Dict, Optional, Sequence

import numpy as np

PRED_TIES = ("wrong", "half", "skip")


def _np(x, name: Optional[str] = None) -> np.ndarray:
    """``x`` as a float64 array; with ``name``, NaN or inf is refused naming the argument (scipy's
    own message names neither, and a NaN prediction would silently count as a wrong pair in HPA)."""
    if isinstance(x, Iterator):  # a generator: numpy would make a 0-d object array of it
        x = list(x)
    if hasattr(x, "detach"):  # a torch tensor, of any dtype (numpy has no bfloat16) and device
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    a = np.asarray(x, dtype=np.float64)
    if name is not None and not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a.ravel()))
        raise ValueError(f"{name} must be finite; found {a.ravel()[bad[0]]} at flat index {bad[0]} "
                         f"({len(bad)} non-finite entries)")
    return a


def _labels(groups) -> np.ndarray:
    """Group labels (any hashable values; a tensor, an array, a list or a generator) as a flat array."""
    if isinstance(groups, Iterator):
        groups = list(groups)
    return np.asarray(groups.detach().cpu() if hasattr(groups, "detach") else groups).ravel()


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def _paired(pred, ref):
    """``pred`` and ``ref`` as flat float64 arrays of one length (finite)."""
    x, y = _np(pred, "pred").ravel(), _np(ref, "ref").ravel()
    _same_shape(x, y, "pred and ref")
    return x, y


def _dists(target_hist, pred_probs):
    """Both as float64 arrays of one shape whose rows are distributions (see :func:`_check_distributions`:
    an unnormalised or negative row gave a divergence that meant nothing, without an error)."""
    t, p = _np(target_hist, "target_hist"), _np(pred_probs, "pred_probs")
    _same_shape(t, p, "target_hist and pred_probs")
    _check_distributions(t, "target_hist")
    _check_distributions(p, "pred_probs")
    return t, p


def _pairs_within(groups: np.ndarray):
    """Index pairs (a < b) of items sharing a group id."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    aa, bb = [], []
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        iu, ju = np.triu_indices(e - s, k=1)
        aa.append(order[s + iu])
        bb.append(order[s + ju])
    if not aa:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(aa), np.concatenate(bb)


def hpa(pred, ref, groups, margin: float = 0.0, pred_ties: str = "wrong") -> float:
    """HPA of predictions against reference scores within groups (NaN when no pair qualifies).

    ``groups`` must already separate dimensions (e.g. ``prompt_id * D + d``); every unordered pair in
    a group with ``ref_a != ref_b`` and ``|ref_a - ref_b| > margin`` counts once.
    """
    if pred_ties not in PRED_TIES:
        raise ValueError(f"pred_ties must be one of {PRED_TIES}, got {pred_ties!r}")
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")  # NaN gave HPA NaN, silently
    p, r = _np(pred, "pred").ravel(), _np(ref, "ref").ravel()
    g = _labels(groups)
    if not (p.shape == r.shape == g.shape):
        raise ValueError(f"pred, ref and groups must have the same length, got {p.shape}, {r.shape}, {g.shape}")
    a, b = _pairs_within(g)
    dr = r[a] - r[b]
    dp = p[a] - p[b]
    keep = (dr != 0) & (np.abs(dr) > margin)
    dr, dp = dr[keep], dp[keep]
    correct = (dp * dr) > 0
    tie = dp == 0
    if pred_ties == "skip":
        correct, tie = correct[~tie], tie[~tie]
    if correct.size == 0:
        return float("nan")
    score = correct.sum() + (0.5 * tie.sum() if pred_ties == "half" else 0.0)
    return float(score / correct.size)


def _logistic4(x, b1, b2, b3, b4):
    with np.errstate(over="ignore"):  # exp overflow -> inf -> the curve's asymptote, as intended
        return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2


def plcc(pred, ref, logistic: bool = False) -> float:
    """Pearson correlation; with ``logistic=True`` after a fitted 4-parameter logistic mapping
    (NaN for fewer than 5 points: four parameters fit four points exactly, and fewer cannot be fit --
    scipy raised a TypeError, which stopped a whole evaluation on a dimension with 3 items)."""
    from scipy.optimize import OptimizeWarning, curve_fit
    from scipy.stats import pearsonr

    x, y = _paired(pred, ref)
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    if logistic:
        if x.size <= 4:
            return float("nan")
        p0 = [y.max(), y.min(), float(np.mean(x)), float(np.std(x)) or 1.0]
        try:
            with warnings.catch_warnings():  # an exact fit has no covariance estimate; that is fine here
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(_logistic4, x, y, p0=p0, maxfev=20000)
            x = _logistic4(x, *params)
        except RuntimeError:  # the fit did not converge: report the raw correlation, not garbage
            pass
        if np.std(x) == 0:
            return float("nan")
    return float(pearsonr(x, y)[0])


def srcc(pred, ref) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    x, y = _paired(pred, ref)
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(spearmanr(x, y)[0])


def krcc(pred, ref) -> float:
    """Kendall rank correlation (tau-b, which accounts for ties)."""
    from scipy.stats import kendalltau

    x, y = _paired(pred, ref)
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(kendalltau(x, y)[0])


def rater_histograms(ratings: Sequence[Sequence[float]], bin_values: Sequence[float]) -> np.ndarray:
    """Normalised histograms ``[N, K]`` of each item's ratings over the bins (nearest bin).

    Every item needs at least one rating, each finite and within the bins' range: a rating off the
    scale (a 7 on 1..5) was counted in the end bin and an item without ratings got an all-zero row,
    which the divergences then scored without an error."""
    v = np.asarray(bin_values, dtype=np.float64)
    lo, hi = float(v[0]), float(v[-1])
    tol = 1e-9 * max(hi - lo, 1.0)
    out = np.zeros((len(ratings), len(v)))
    for i, rs in enumerate(ratings):
        xs = [float(x) for x in rs]
        if not xs:
            raise ValueError(f"ratings: item {i} has no ratings")
        for x in xs:
            if not (lo - tol <= x <= hi + tol):  # also refuses NaN
                raise ValueError(f"ratings: item {i} has the rating {x}, outside the bins' range [{lo}, {hi}]")
            out[i, int(np.argmin(np.abs(v - x)))] += 1
        out[i] /= len(xs)
    return out


def kl_divergence(target_hist, pred_probs, eps: float = 1e-12) -> np.ndarray:
    """Per-item ``KL(target || pred)`` in nats (``0 log 0 = 0``; ``pred`` floored at ``eps``)."""
    t, p = _dists(target_hist, pred_probs)
    p = np.maximum(p, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1.0)) - np.log(p)), 0.0)
    return terms.sum(-1)


def js_divergence(target_hist, pred_probs) -> np.ndarray:
    """Per-item Jensen-Shannon divergence, base 2 (in [0, 1])."""
    t, p = _dists(target_hist, pred_probs)
    m = 0.5 * (t + p)

    def _kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * (np.log2(np.where(a > 0, a, 1.0)) - np.log2(np.where(b > 0, b, 1.0))), 0.0).sum(-1)

    return 0.5 * _kl(t, m) + 0.5 * _kl(p, m)


def wasserstein1(target_hist, pred_probs, bin_values: Sequence[float]) -> np.ndarray:
    """Per-item earth mover's distance on the score axis: ``sum_k |CDF_t - CDF_p|_k (v_{k+1} - v_k)``."""
    t, p = _dists(target_hist, pred_probs)
    v = np.asarray(bin_values, dtype=np.float64)
    if v.ndim != 1 or len(v) != t.shape[-1]:
        raise ValueError(f"bin_values must give one value per bin of the histograms ({t.shape[-1]}), got {len(v)}")
    cdf = np.cumsum(t - p, axis=-1)[..., :-1]
    return np.abs(cdf) @ np.diff(v)


def _check_distributions(p: np.ndarray, name: str) -> None:
    """Rows of ``p`` must be distributions: non-negative, summing to 1 within 1e-3 (float32 softmax
    output passes; logits, or scores, would otherwise give preference probabilities outside [0, 1])."""
    if not p.size:
        return
    off = np.abs(p.sum(-1) - 1) > 1e-3
    if p.min() < 0 or off.any():
        bad = int(np.flatnonzero((p < 0).any(-1) | off)[0])
        raise ValueError(f"{name} must hold probability rows (>= 0, summing to 1); row {bad} sums to "
                         f"{p[bad].sum():.6g} with minimum {p[bad].min():.6g}")


def preference_probability(probs_a, probs_b) -> np.ndarray:
    """``P(X_a > X_b) + 0.5 P(X_a = X_b)`` for independent ``X_a ~ probs_a``, ``X_b ~ probs_b`` (per row)."""
    pa, pb = _np(probs_a, "probs_a"), _np(probs_b, "probs_b")
    _same_shape(pa, pb, "probs_a and probs_b")
    cb = np.cumsum(pb, axis=-1)
    below = np.concatenate([np.zeros_like(cb[..., :1]), cb[..., :-1]], axis=-1)  # P(X_b < v_k)
    return (pa * (below + 0.5 * pb)).sum(-1)


def pairwise_calibration(probs, ref, groups, n_bins: int = 10) -> Optional[Dict[str, np.ndarray]]:
    """Reliability data of pairwise preference probabilities (None without pairs).

    Pairs as in :func:`hpa` (same group, reference scores differ).  Each pair is oriented so the
    predicted winner comes first (confidence in [0.5, 1]; a pair at 0.5, within 1e-9, counts half right);
    returns per confidence bin the ``count``,
    mean ``confidence`` and ``accuracy`` (NaN for empty bins), and the bin ``edges``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    pr = _np(probs, "probs")
    r = _np(ref, "ref").ravel()
    g = _labels(groups)
    if pr.ndim != 2 or not (len(pr) == len(r) == len(g)):
        # extra rows, or a shorter ref/groups, were used as far as they went: an ECE of the wrong items
        raise ValueError(f"probs must be [N, K] with one row per item of ref and groups, got probs {pr.shape}, "
                         f"ref {r.shape}, groups {g.shape}")
    _check_distributions(pr, "probs")
    a, b = _pairs_within(g)
    keep = r[a] != r[b]
    a, b = a[keep], b[keep]
    if a.size == 0:
        return None
    p_ab = preference_probability(pr[a], pr[b])
    a_wins = r[a] > r[b]
    conf = np.maximum(p_ab, 1 - p_ab)
    # a pair predicted at 0.5 names no winner: it counts half right (it counted as "a wins", so a model that
    # gives every image the same distribution, calibrated at 0.5, got an ECE of 0.5).  Equal distributions
    # give 0.5 only up to rounding (within 4e-16 for random ones), hence the tolerance
    tie = np.abs(p_ab - 0.5) <= 1e-9
    correct = np.where(tie, 0.5, np.where(p_ab > 0.5, a_wins, ~a_wins).astype(float))
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": confidence, "accuracy": accuracy}


def pairwise_ece(probs, ref, groups, n_bins: int = 10) -> float:
    """Expected calibration error of pairwise preference probabilities (NaN without pairs):
    ``sum over confidence bins of (n_bin / n) |accuracy_bin - confidence_bin|``."""
    cal = pairwise_calibration(probs, ref, groups, n_bins)
    if cal is None:
        return float("nan")
    m = cal["count"] > 0
    w = cal["count"][m] / cal["count"].sum()
    return float((w * np.abs(cal["accuracy"][m] - cal["confidence"][m])).sum())


def trimmed_mean(ratings, dim: int = -1, mask=None):
    """Reference score: mean after dropping one highest and one lowest rating (plain mean below 3).

    Accepts a tensor (returns a float64 tensor) or an array / list of equal-length rows (returns an
    array).  ``mask`` (the ratings' shape) marks the valid ratings of ragged rows.  A row without a
    valid rating has no reference: NaN (it read 0.0, a score off the scale, as if rated).
    """
    is_torch = hasattr(ratings, "detach")
    r = _np(ratings)
    m = np.ones_like(r, dtype=bool) if mask is None else np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, bool)
    if m.shape != r.shape:  # a mask of another shape would broadcast, marking ratings it was not given for
        raise ValueError(f"mask must have the ratings' shape {r.shape}, got {m.shape}")
    n = m.sum(dim)
    total = np.where(m, r, 0.0).sum(dim)
    hi = np.where(m, r, -np.inf).max(dim, initial=-np.inf)
    lo = np.where(m, r, np.inf).min(dim, initial=np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n >= 3, (total - hi - lo) / np.maximum(n - 2, 1), total / np.maximum(n, 1))
    out = np.where(n > 0, out, np.nan)
    if is_torch:
        import torch

        return torch.from_numpy(out)
    return out


def gsb(judgments=None, *, good: int = 0, same: int = 0, bad: int = 0) -> float:
    """GSB of side-by-side judgments of tuned vs baseline images (SPEC section 5):
    ``(Good - Bad) / (Good + Same + Bad)``, in [-1, 1].

    Give the judgments as a sequence of ``"G"``/``"S"``/``"B"`` (case-insensitive; ``"good"``,
    ``"same"``, ``"bad"`` too) or of numbers ``+1``/``0``/``-1`` (tuned better / same / worse), or as
    the counts ``good=``, ``same=``, ``bad=``.  NaN when there are no judgments."""
    if judgments is not None:
        if good or same or bad:
            raise ValueError("give the judgments or the counts good=/same=/bad=, not both")
        names = {"g": 1, "good": 1, "s": 0, "same": 0, "b": -1, "bad": -1}
        votes = []
        for i, j in enumerate(judgments):
            if isinstance(j, str):
                if j.lower() not in names:
                    raise ValueError(f"judgment {i}: expected G, S or B, got {j!r}")
                votes.append(names[j.lower()])
            elif j in (1, 0, -1) and not isinstance(j, bool):
                votes.append(int(j))
            else:
                raise ValueError(f"judgment {i}: expected G/S/B or +1/0/-1, got {j!r}")
        good, same, bad = votes.count(1), votes.count(0), votes.count(-1)
    for name, c in (("good", good), ("same", same), ("bad", bad)):
        if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {c!r}")
    total = good + same + bad
    return float("nan") if total == 0 else (good - bad) / total


def _block(pred, ref, groups, probs, hist, bin_values) -> Dict[str, float]:
    out = {
        "n": int(len(pred)),
        "hpa": hpa(pred, ref, groups),
        "margin_hpa": hpa(pred, ref, groups, margin=0.5),
        "plcc": plcc(pred, ref),
        "plcc_logistic": plcc(pred, ref, logistic=True),
        "srcc": srcc(pred, ref),
        "krcc": krcc(pred, ref),
    }
    if probs is not None:
        out["pairwise_ece"] = pairwise_ece(probs, ref, groups)
        if hist is not None:
            out["kl"] = float(np.mean(kl_divergence(hist, probs)))
            out["js"] = float(np.mean(js_divergence(hist, probs)))
            out["wasserstein1"] = float(np.mean(wasserstein1(hist, probs, bin_values)))
    return out


def evaluate(
    pred,
    ref,
    groups,
    dimensions,
    probs=None,
    rater_hist=None,
    bin_values: Optional[Sequence[float]] = None,
) -> Dict[str, Dict[str, float]]:
    """Metrics pooled over all items and per dimension.

    ``pred``/``ref``/``groups``/``dimensions`` are per item (an item = one image on one dimension);
    pairs are only formed within the same group *and* dimension.  ``probs [N, K]`` (predicted
    distributions) adds the pairwise ECE; with ``rater_hist [N, K]`` also KL, JS and Wasserstein-1.
    Returns ``{"pooled": {...}, "<dimension>": {...}, ...}``.
    """
    if bin_values is None:
        from zreward_kernels import BIN_VALUES as bin_values  # noqa: N811
    p, r = _np(pred, "pred").ravel(), _np(ref, "ref").ravel()
    dims = np.asarray(list(dimensions), dtype=object)
    groups = list(groups)
    if len(groups) != len(dims):
        raise ValueError(f"groups and dimensions must have one entry per item, got {len(groups)} and {len(dims)}")
    grp = np.asarray([f"{d}\x00{g}" for g, d in zip(groups, dims)], dtype=object)
    pr = None if probs is None else _np(probs, "probs")
    hs = None if rater_hist is None else _np(rater_hist, "rater_hist")
    if not (p.shape[0] == r.shape[0] == len(dims) == len(grp)):
        raise ValueError("pred, ref, groups and dimensions must have one entry per item")
    for name, a in (("probs", pr), ("rater_hist", hs)):
        if a is not None and (a.ndim != 2 or a.shape[0] != p.shape[0]):
            raise ValueError(f"{name} must be [N, K] with one row per item ({p.shape[0]}), got {a.shape}")
    report = {"pooled": _block(p, r, grp, pr, hs, bin_values)}
    for d in sorted(set(dims.tolist())):
        m = dims == d
        report[str(d)] = _block(p[m], r[m], grp[m], None if pr is None else pr[m], None if hs is None else hs[m],
                                bin_values)
    return report
