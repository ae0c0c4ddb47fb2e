"""Pure-PyTorch reference of every op: the written spec, the CPU fallback and the test oracle.

Everything here is plain differentiable PyTorch (autograd provides the gradients), computed in
float32 (float64 when the logits are float64, so ``torch.autograd.gradcheck`` can run on it).
The fused Triton kernels in :mod:`zreward_kernels.rubric` and :mod:`zreward_kernels.gdso`
must match these functions; the tests enforce it.

Conventions shared with the kernels (documented once, here):

* ``z = logits / temperature``; ``p = softmax(z)`` over the K bins; ``mu = sum_k p_k v_k``;
  ``std = sqrt(sum_k p_k (v_k - mu)^2)``.  The gradient of ``std`` is defined as 0 where the
  distribution is a point mass (``std == 0``), instead of the NaN that ``sqrt'(0)`` gives.
* Targets (``target``, ``target_probs``, ``teacher_logits``, ``teacher_probs``, ``pair_gaps``,
  ``scores``) are constants: no gradient flows to them.
* Zeros in target distributions contribute nothing (``0 * log 0 = 0``).
* ``reduction="mean"``: CE over non-ignored rows, KL over rows, the pair term over pairs; a
  mean over zero elements is 0 (an all-ignored batch gives ``ce = 0``, not NaN).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ._common import bins_tensor


class ScoreStats(NamedTuple):
    """Closed-set score distribution: ``probs [..., K]``, ``mean [...]``, ``std [...]`` (float32)."""

    probs: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class RubricLossOutput(NamedTuple):
    """Result of :func:`rubric_loss`.

    ``loss`` is ``weight_ce * ce + weight_kl * kl + weight_pair * pair``.  For ``reduction="none"``
    ``ce``/``kl``/``loss`` are per row (the logits' leading shape; ``loss`` then holds the CE and KL
    terms only) and ``pair`` is per pair.  Terms that were not requested are zeros.  ``mean`` and
    ``std`` are the per-row expectation and standard deviation.  All float32, all differentiable.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    pair: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class GDSOOutput(NamedTuple):
    """Result of :func:`gdso_loss` (SPEC section 3).

    ``loss`` (scalar, differentiable) is ``mean_P(alpha_pt * ce + alpha_pw * pw)``.  Everything
    else is detached: ``ce``/``pw`` per pair ``[P]``; ``mean``, ``std``, ``reward_pt``,
    ``reward_pw``, ``reward`` and ``advantage`` per sample ``[P, 2, G]``.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    pw: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    reward_pt: torch.Tensor
    reward_pw: torch.Tensor
    reward: torch.Tensor
    advantage: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _safe_sqrt(var: torch.Tensor) -> torch.Tensor:
    pos = var > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, var, torch.ones_like(var))), torch.zeros_like(var))


def distribution(logits: torch.Tensor, bins: Tuple[float, ...], temperature: float = 1.0):
    """``(log_probs, probs, mean, std)`` of the closed-set softmax over the bins."""
    dt = _compute_dtype(logits)
    v = bins_tensor(bins, logits.device, dt)
    logp = torch.log_softmax(logits.to(dt) / temperature, dim=-1)
    p = logp.exp()
    mu = (p * v).sum(-1)
    var = (p * (v - mu.unsqueeze(-1)) ** 2).sum(-1)
    return logp, p, mu, _safe_sqrt(var)


def score_stats(logits: torch.Tensor, bins: Tuple[float, ...], temperature: float = 1.0) -> ScoreStats:
    _, p, mu, std = distribution(logits, bins, temperature)
    return ScoreStats(p, mu, std)


def _xlogy_masked(q: torch.Tensor, logx: torch.Tensor) -> torch.Tensor:
    """``q * logx`` with the convention ``0 * (anything) = 0``."""
    return torch.where(q > 0, q * logx, torch.zeros_like(logx))


def rubric_loss(
    logits: torch.Tensor,
    bins: Tuple[float, ...],
    *,
    target: Optional[torch.Tensor] = None,
    target_probs: Optional[torch.Tensor] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    teacher_probs: Optional[torch.Tensor] = None,
    pairs: Optional[torch.Tensor] = None,
    pair_gaps: Optional[torch.Tensor] = None,
    weight_ce: float = 1.0,
    weight_kl: float = 1.0,
    weight_pair: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    temperature: float = 1.0,
) -> RubricLossOutput:
    lead = logits.shape[:-1]
    k = logits.shape[-1]
    x = logits.reshape(-1, k)
    rows = x.shape[0]
    logp, p, mu, std = distribution(x, bins, temperature)
    dt = logp.dtype
    zero_rows = logp.new_zeros(rows)

    # pointwise cross-entropy (hard bin index or soft labels)
    ce_rows = zero_rows
    n_valid = rows
    if target is not None:
        t = target.reshape(-1).long()
        valid = t != ignore_index
        picked = logp.gather(1, torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1)).squeeze(1)
        ce_rows = torch.where(valid, -picked, zero_rows)
        n_valid = valid.sum()
    elif target_probs is not None:
        tp = target_probs.reshape(-1, k).detach().to(dt)
        ce_rows = -_xlogy_masked(tp, logp).sum(-1)

    # RISD forward KL(q_teacher || q_student)
    kl_rows = zero_rows
    if teacher_logits is not None or teacher_probs is not None:
        if teacher_logits is not None:
            logq = torch.log_softmax(teacher_logits.reshape(-1, k).detach().to(dt) / temperature, dim=-1)
            q = logq.exp()
        else:
            q = teacher_probs.reshape(-1, k).detach().to(dt)
            logq = torch.log(torch.where(q > 0, q, torch.ones_like(q)))
        kl_rows = _xlogy_masked(q, logq).sum(-1) - _xlogy_masked(q, logp).sum(-1)

    # pairwise gap |(mu_a - mu_b) - gap|
    if pairs is not None and pairs.shape[0] > 0:
        pr = pairs.long()
        pair_terms = (mu[pr[:, 0]] - mu[pr[:, 1]] - pair_gaps.detach().to(dt)).abs()
    else:
        pair_terms = logp.new_zeros(0 if pairs is None else pairs.shape[0])

    if reduction == "none":
        ce = ce_rows.reshape(lead)
        kl = kl_rows.reshape(lead)
        pair = pair_terms
        loss = weight_ce * ce + weight_kl * kl
    else:
        if reduction == "mean":
            if isinstance(n_valid, torch.Tensor):
                ce = ce_rows.sum() / n_valid.clamp(min=1).to(dt)
            else:
                ce = ce_rows.sum() / max(n_valid, 1)
            kl = kl_rows.sum() / max(rows, 1)
            pair = pair_terms.sum() / max(pair_terms.shape[0], 1)
        else:  # sum
            ce, kl, pair = ce_rows.sum(), kl_rows.sum(), pair_terms.sum()
        loss = weight_ce * ce + weight_kl * kl + weight_pair * pair
    return RubricLossOutput(loss, ce, kl, pair, mu.reshape(lead), std.reshape(lead))


def bin_index(scores: torch.Tensor, bins: Tuple[float, ...]) -> torch.Tensor:
    """Index of the bin nearest to each score (exact for scores on the grid)."""
    v = bins_tensor(bins, scores.device, torch.float64)
    return (scores.double().unsqueeze(-1) - v).abs().argmin(-1)


def pointwise_reward(pred: torch.Tensor, score: torch.Tensor, r_range: float) -> torch.Tensor:
    """SPEC section 3's pointwise reward ``1 - |pred - score| / R`` (``R = v_max - v_min``): 1 for an
    exact prediction, 0 for one a whole scale away.  ``gdso_loss`` applies it to the predicted
    means, the GRPO baseline (``zreward.train.rl.parsed_rewards``) to the numbers parsed from text."""
    return 1 - (pred - score).abs() / r_range


def gdso_loss(
    logits: torch.Tensor,
    scores: torch.Tensor,
    bins: Tuple[float, ...],
    *,
    lambda_pt: float = 1.0,
    lambda_pw: float = 1.0,
    alpha_pt: float = 1.0,
    alpha_pw: float = 1.0,
    eps: float = 1e-6,
    temperature: float = 1.0,
) -> GDSOOutput:
    """GDSO rewards, group advantages and direct losses (SPEC section 3).

    ``logits [P, 2, G, K]``: side 0 is ``w``, side 1 is ``l``; ``scores [P, 2]`` the annotated
    scores ``(s_w, s_l)`` on the bin grid.
    """
    n_pairs, _, g, _ = logits.shape
    r_range = bins[-1] - bins[0]
    logp, p, mu, std = distribution(logits, bins, temperature)
    dt = mu.dtype
    s = scores.detach().to(dt)  # [P, 2]
    gap = s - s.flip(1)  # gap_j = s_j - s_jbar
    # e[p, j, i, k] = (mu[j, i] - mu[jbar, k]) - gap_j
    e = mu.unsqueeze(-1) - mu.flip(1).unsqueeze(-2) - gap[:, :, None, None]
    abs_e = e.abs()

    # direct losses (carry the gradient)
    idx = bin_index(scores, bins)  # [P, 2]
    tgt = idx[:, :, None, None].expand(n_pairs, 2, g, 1)
    ce = -logp.gather(-1, tgt).squeeze(-1).mean(dim=(1, 2))  # (1/2G) sum_j sum_i
    pw = abs_e.sum(dim=(1, 2, 3)) / (2 * g * g * r_range)
    if n_pairs > 0:
        loss = (alpha_pt * ce + alpha_pw * pw).mean()
    else:
        loss = (logp.sum() * 0).to(dt)

    # rewards and advantages (detached), in float64 from the means: with lambda_pt == lambda_pw a
    # side's reward is flat in mu where mu_j < s_j and every predicted gap exceeds gap_j (the slopes
    # +1/R and -G/(G R) cancel), and such equal-in-exact-arithmetic rewards must give advantage ~0,
    # not float32 rounding noise / (std + eps).  mu_a - mu_b - gap and the sums over k are exact in
    # float64 for float32 means; the outputs are returned in the means' dtype.
    with torch.no_grad():
        mu64, s64 = mu.detach().double(), scores.detach().double()
        e64 = mu64.unsqueeze(-1) - mu64.flip(1).unsqueeze(-2) - (s64 - s64.flip(1))[:, :, None, None]
        r_pt = pointwise_reward(mu64, s64.unsqueeze(-1), r_range)
        r_pw = 1 - e64.abs().sum(-1) / (g * r_range)
        r = lambda_pt * r_pt + lambda_pw * r_pw
        # advantage normalised within each side's group of G (the shared group-advantage reference)
        adv = group_advantage(r.reshape(-1), group_size=g, mode="std", eps=eps)[0].view_as(r)
        r_pt, r_pw, r, adv = (t.to(dt) for t in (r_pt, r_pw, r, adv))
    return GDSOOutput(
        loss, ce.detach(), pw.detach(), mu.detach(), std.detach(), r_pt, r_pw, r, adv
    )


class GroupStats(NamedTuple):
    """Per-group statistics of :func:`group_advantage`: ``mean [G]``, unbiased ``std [G]`` and
    ``zero_std [G]`` (True where every reward of the group is equal, including groups of 0 or 1)."""

    mean: torch.Tensor
    std: torch.Tensor
    zero_std: torch.Tensor


ADV_MODES = ("std", "mean", "rloo")


def _std_normalised(dv: torch.Tensor, sd: torch.Tensor, eps: float) -> torch.Tensor:
    """``dv / (std + eps)``, 0 where ``std + eps == 0`` (all rewards equal with ``eps = 0``)."""
    den = sd + eps
    return torch.where(den > 0, dv / den, torch.zeros_like(dv))


def group_advantage(
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_offsets: Optional[torch.Tensor] = None,
    mode: str = "std",
    eps: float = 1e-6,
):
    """Group-normalised advantages, vectorised PyTorch (segment reductions, no loop over groups).

    ``std``: ``(r - mean) / (std + eps)`` (unbiased std); ``mean``: ``r - mean`` (Dr. GRPO);
    ``rloo``: ``r - mean of the other members`` = ``n/(n-1) (r - mean)``.  A group of one gets 0 in
    every mode, and so does a group with ``std + eps == 0`` (equal rewards, ``eps=0``); an empty
    group has mean 0, std 0, zero_std True.  Statistics are accumulated in float64 after
    subtracting each group's first reward (exact for 1e6 + small noise).  Outputs are float64 for
    float64 rewards, float32 otherwise.
    """
    out_dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(torch.float64)
    m = r.shape[0]
    dev = r.device
    if group_offsets is None:
        g = group_size
        x = r.view(-1, g)
        d = x - x[:, :1]
        shift = d.mean(1, keepdim=True)
        dv = d - shift
        n = g
        sd = (dv.pow(2).sum(1) / max(n - 1, 1)).sqrt() if n > 1 else torch.zeros(x.shape[0], dtype=r.dtype, device=dev)
        mean = x[:, 0] + shift[:, 0]
        zero_std = x.amax(1) == x.amin(1) if x.shape[0] else torch.zeros(0, dtype=torch.bool, device=dev)
        if n <= 1:
            adv = torch.zeros_like(x)
        elif mode == "std":
            adv = _std_normalised(dv, sd.unsqueeze(1), eps)
        elif mode == "mean":
            adv = dv
        else:
            adv = dv * (n / (n - 1))
        return adv.reshape(-1).to(out_dt), GroupStats(mean.to(out_dt), sd.to(out_dt), zero_std)

    offs = group_offsets.long()
    n_groups = offs.shape[0] - 1
    counts = offs[1:] - offs[:-1]
    ids = torch.repeat_interleave(torch.arange(n_groups, device=dev), counts, output_size=m)
    n = counts.to(torch.float64)
    first = r[offs[:-1].clamp(max=max(m - 1, 0))] if m > 0 else torch.zeros(n_groups, dtype=r.dtype, device=dev)
    d = r - first[ids]
    s1 = torch.zeros(n_groups, dtype=r.dtype, device=dev).index_add_(0, ids, d)
    shift = s1 / n.clamp(min=1)
    dv = d - shift[ids]
    s2 = torch.zeros(n_groups, dtype=r.dtype, device=dev).index_add_(0, ids, dv * dv)
    sd = torch.where(n > 1, s2 / (n - 1).clamp(min=1), torch.zeros_like(s2)).sqrt()
    mn = torch.full((n_groups,), float("inf"), dtype=r.dtype, device=dev).scatter_reduce_(0, ids, r, "amin")
    mx = torch.full((n_groups,), float("-inf"), dtype=r.dtype, device=dev).scatter_reduce_(0, ids, r, "amax")
    zero_std = (mn == mx) | (counts == 0)
    mean = torch.where(counts > 0, first + shift, torch.zeros_like(first))
    ne = n[ids]
    if mode == "std":
        adv = _std_normalised(dv, sd[ids], eps)
    elif mode == "mean":
        adv = dv
    else:
        adv = dv * ne / (ne - 1).clamp(min=1)
    adv = torch.where(ne > 1, adv, torch.zeros_like(adv))
    return adv.to(out_dt), GroupStats(mean.to(out_dt), sd.to(out_dt), zero_std)
