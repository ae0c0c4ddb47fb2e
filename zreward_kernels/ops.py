"""Public functional API: validation, then dispatch to the fused kernel or the reference."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from . import reference as ref
from ._common import (
    BIN_VALUES,
    MAX_GROUP,
    bins_tensor,
    DataChecks,
    check_distribution,
    check_finite_logits,
    check_float,
    check_float_tensor,
    check_int_tensor,
    check_logits,
    check_same_device,
    check_temperature,
    data_checks_enabled,
    normalize_bins,
    scores_to_bins,
)
from ._dispatch import choose_backend, launch_device
from .reference import GDSOOutput, RubricLossOutput, ScoreStats

_REDUCTIONS = ("mean", "sum", "none")


def score_stats(
    logits: torch.Tensor,
    *,
    bin_values: Sequence[float] = BIN_VALUES,
    temperature: float = 1.0,
    backend: Optional[str] = None,
    validate: bool = True,
) -> ScoreStats:
    """Closed-set score distribution of vocab-restricted logits ``[..., K]``.

    Returns ``ScoreStats(probs [..., K], mean [...], std [...])`` in float32 with
    ``probs = softmax(logits / temperature)``, ``mean = sum_k probs_k v_k`` and
    ``std = sqrt(sum_k probs_k (v_k - mean)^2)``.  Differentiable with respect to ``logits``
    through all three outputs (this is the differentiable-reward path); the gradient comes back in
    the logits' dtype.  The gradient of ``std`` is 0 where the distribution is a point mass.
    """
    bins = normalize_bins(bin_values)
    tau = check_temperature(temperature)
    check_logits("logits", logits, len(bins))
    if data_checks_enabled(validate):
        checks = DataChecks()
        check_finite_logits(checks, "logits", logits, tau)
        checks.raise_first()
    be = choose_backend("score_stats", backend, logits)
    if be == "triton":
        from .rubric import score_stats_triton

        if logits.numel() == 0:
            return ref.score_stats(logits, bins, tau)
        with launch_device(logits):
            return score_stats_triton(logits, bins_tensor(bins, logits.device), tau)
    return ref.score_stats(logits, bins, tau)


def rubric_loss(
    logits: torch.Tensor,
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
    bin_values: Sequence[float] = BIN_VALUES,
    temperature: float = 1.0,
    backend: Optional[str] = None,
    validate: bool = True,
) -> RubricLossOutput:
    """Fused SFT / RISD loss over rubric-bin logits (SPEC sections 3-4).

    ``logits`` is ``[N, K]`` or ``[N, D, K]``; its rows are the flattened leading dimensions
    (row ``n * D + d``).  Terms, each optional (at least one must be given):

    * pointwise cross-entropy to a hard bin index ``target`` (leading shape, integer; rows equal to
      ``ignore_index`` are skipped) **or** to soft labels ``target_probs`` (same shape as logits,
      rows summing to one, zeros allowed);
    * RISD forward ``KL(q_teacher || q_student)``, teacher given as ``teacher_logits`` (softmaxed
      at the same ``temperature``) **or** ``teacher_probs`` (zeros allowed);
    * pairwise gap ``|(mu_a - mu_b) - gap|`` for ``pairs [P, 2]`` (row indices into the flattened
      rows) and ``pair_gaps [P]`` (the annotated ``s_a - s_b``); the gradient reaches both rows.

    Targets, teachers and gaps are constants (no gradient flows to them).  ``temperature`` divides
    the student (and teacher) logits; Hinton-style ``tau^2`` scaling is left to the caller
    (multiply ``weight_kl``).

    Returns ``RubricLossOutput(loss, ce, kl, pair, mean, std)`` (float32):
    ``loss = weight_ce * ce + weight_kl * kl + weight_pair * pair``.  ``reduction="mean"`` averages
    CE over non-ignored rows, KL over rows and the pair term over pairs (an empty mean is 0);
    ``"sum"`` sums; ``"none"`` returns per-row ``ce``/``kl`` (leading shape), per-pair ``pair``
    ``[P]`` and a per-row ``loss`` holding the CE and KL terms only (the pair term is per pair, so it
    is not folded in).  ``mean``/``std`` are the per-row expectation and standard deviation.
    Every output is differentiable with respect to ``logits``.
    """
    bins = normalize_bins(bin_values)
    k = len(bins)
    tau = check_temperature(temperature)
    w_ce = check_float("weight_ce", weight_ce)
    w_kl = check_float("weight_kl", weight_kl)
    w_pair = check_float("weight_pair", weight_pair)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    ignore_index = int(ignore_index)  # a numpy integer is taken as its value
    check_logits("logits", logits, k)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, K] or [N, D, K], got shape {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    rows = 1
    for s in lead:
        rows *= s
    if target is not None and target_probs is not None:
        raise ValueError("give at most one of target and target_probs")
    if teacher_logits is not None and teacher_probs is not None:
        raise ValueError("give at most one of teacher_logits and teacher_probs")
    if (pairs is None) != (pair_gaps is None):
        raise ValueError("pairs and pair_gaps must be given together")
    if target is None and target_probs is None and teacher_logits is None and teacher_probs is None and pairs is None:
        raise ValueError("rubric_loss needs at least one term: target, target_probs, teacher_logits, teacher_probs or pairs")
    if target is not None:
        check_int_tensor("target", target)
        if tuple(target.shape) != lead:
            raise ValueError(f"target must have the logits' leading shape {lead}, got {tuple(target.shape)}")
    for name, t in (("target_probs", target_probs), ("teacher_logits", teacher_logits), ("teacher_probs", teacher_probs)):
        if t is not None:
            check_float_tensor(name, t)
            if t.shape != logits.shape:
                raise ValueError(f"{name} must have the logits' shape {tuple(logits.shape)}, got {tuple(t.shape)}")
    if pairs is not None:
        check_int_tensor("pairs", pairs)
        if pairs.dim() != 2 or pairs.shape[1] != 2:
            raise ValueError(f"pairs must be [P, 2], got shape {tuple(pairs.shape)}")
        check_float_tensor("pair_gaps", pair_gaps)
        if tuple(pair_gaps.shape) != (pairs.shape[0],):
            raise ValueError(f"pair_gaps must be [P] = [{pairs.shape[0]}], got shape {tuple(pair_gaps.shape)}")
        if rows == 0 and pairs.shape[0] > 0:  # known from the shapes: checked even with validate=False
            raise ValueError(f"pairs holds {pairs.shape[0]} pairs but logits has no rows to index")
    check_same_device(
        "logits", logits, target=target, target_probs=target_probs, teacher_logits=teacher_logits,
        teacher_probs=teacher_probs, pairs=pairs, pair_gaps=pair_gaps,
    )
    if data_checks_enabled(validate):  # every value check, read back with one host sync
        checks = DataChecks()
        check_finite_logits(checks, "logits", logits, tau)
        if target is not None and target.numel():
            bad = (target != ignore_index) & ((target < 0) | (target >= k))
            checks.bad(bad.any(), f"target values must be bin indices in [0, {k}) or ignore_index={ignore_index}",
                       lambda: f"; found {int(target[bad].flatten()[0])}")
        if target_probs is not None:
            check_distribution(checks, "target_probs", target_probs)
        if teacher_logits is not None:
            check_finite_logits(checks, "teacher_logits", teacher_logits, tau)
        if teacher_probs is not None:
            check_distribution(checks, "teacher_probs", teacher_probs)
        if pairs is not None and pairs.numel():
            checks.bad(((pairs < 0) | (pairs >= rows)).any(),
                       f"pairs holds row indices outside [0, {rows}) (rows are the flattened leading dims)")
            checks.bad(~torch.isfinite(pair_gaps).all(), "pair_gaps contains NaN or inf")
        checks.raise_first()

    kwargs = dict(
        target=target, target_probs=target_probs, teacher_logits=teacher_logits, teacher_probs=teacher_probs,
        pairs=pairs, pair_gaps=pair_gaps, weight_ce=w_ce, weight_kl=w_kl, weight_pair=w_pair,
        ignore_index=ignore_index, reduction=reduction, temperature=tau,
    )
    be = choose_backend("rubric_loss", backend, logits)
    if be == "triton":
        from .rubric import rubric_loss_triton

        with launch_device(logits):
            return rubric_loss_triton(logits, bins_tensor(bins, logits.device), **kwargs)
    return ref.rubric_loss(logits, bins, **kwargs)


def gdso_loss(
    logits: torch.Tensor,
    scores: torch.Tensor,
    *,
    lambda_pt: float = 1.0,
    lambda_pw: float = 1.0,
    alpha_pt: float = 1.0,
    alpha_pw: float = 1.0,
    eps: float = 1e-6,
    bin_values: Sequence[float] = BIN_VALUES,
    temperature: float = 1.0,
    backend: Optional[str] = None,
    validate: bool = True,
) -> GDSOOutput:
    """GDSO rewards, group advantages and direct losses for ``P`` same-prompt pairs (SPEC section 3).

    ``logits [P, 2, G, K]`` are the score logits read after each of the ``G`` sampled traces of
    side ``w`` (index 0) and side ``l`` (index 1); ``scores [P, 2]`` are the annotated ``(s_w, s_l)``,
    on the bin grid.  With ``R = v_max - v_min`` and ``gap_j = s_j - s_jbar``:

    * ``reward_pt = 1 - |mu - s_j| / R``;
      ``reward_pw[j, i] = 1 - 1/(G R) sum_k |(mu[j, i] - mu[jbar, k]) - gap_j|``;
      ``reward = lambda_pt * reward_pt + lambda_pw * reward_pw``;
    * ``advantage = (reward - mean_i) / (std_i + eps)`` within each side's group (unbiased std;
      a group of one gets advantage 0);
    * ``ce = -1/(2G) sum_j sum_i log q[j, i](bin(s_j))`` and
      ``pw = 1/(2 G^2 R) sum_j sum_i sum_k |(mu[j, i] - mu[jbar, k]) - gap_j|``, per pair;
    * ``loss = mean_P(alpha_pt * ce + alpha_pw * pw)``.

    Only ``loss`` carries gradient (to ``logits``); rewards and advantages come back detached,
    ready for the policy term.  Outputs are float32.  Deviations are taken from each side's first
    reward, so rewards that are equal, or equal in exact arithmetic (with ``lambda_pt == lambda_pw``
    a side's reward is flat in ``mu`` where ``mu < s_j`` and every predicted gap exceeds
    ``gap_j``), give advantage 0, not float32 rounding noise divided by ``std + eps``: the
    reference computes rewards and advantages in float64 from the float32 means (0 to ~1e-9); the
    Triton kernel stays in float32 and writes each reward as an affine function of the row's own
    mean whose slope is exactly 0 in the flat case (bitwise equal rewards, advantage exactly 0; see
    ``gdso.py``).  With ``validate=False`` scores off the grid are snapped to the nearest bin for
    the CE target instead of raising.
    """
    bins = normalize_bins(bin_values)
    tau = check_temperature(temperature)
    lam_pt = check_float("lambda_pt", lambda_pt)
    lam_pw = check_float("lambda_pw", lambda_pw)
    a_pt = check_float("alpha_pt", alpha_pt)
    a_pw = check_float("alpha_pw", alpha_pw)
    eps_ = check_float("eps", eps, nonneg=True)
    check_logits("logits", logits, len(bins))
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must be [P, 2, G, K] (side w then side l), got shape {tuple(logits.shape)}")
    n_pairs, _, g, _ = logits.shape
    if g < 1:
        raise ValueError("logits must hold at least one sample per side (G >= 1)")
    check_float_tensor("scores", scores)
    if tuple(scores.shape) != (n_pairs, 2):
        raise ValueError(f"scores must be [P, 2] = [{n_pairs}, 2], got shape {tuple(scores.shape)}")
    check_same_device("logits", logits, scores=scores)
    if data_checks_enabled(validate):
        checks = DataChecks()
        check_finite_logits(checks, "logits", logits, tau)
        scores_to_bins(checks, scores, bins, name="scores")
        checks.raise_first()
    unsupported = f"group size G={g} exceeds the kernel's limit of {MAX_GROUP}" if g > MAX_GROUP else None
    be = choose_backend("gdso_loss", backend, logits, unsupported)
    kwargs = dict(lambda_pt=lam_pt, lambda_pw=lam_pw, alpha_pt=a_pt, alpha_pw=a_pw, eps=eps_, temperature=tau)
    if be == "triton" and n_pairs > 0:
        from .gdso import gdso_loss_triton

        with launch_device(logits):
            return gdso_loss_triton(logits, scores, bins_tensor(bins, logits.device), bins[-1] - bins[0], **kwargs)
    return ref.gdso_loss(logits, scores, bins, **kwargs)
