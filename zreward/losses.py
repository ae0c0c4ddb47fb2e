"""``nn.Module`` wrappers of the fused losses, for trainers that configure losses as modules."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from zreward_kernels import BIN_VALUES, GDSOOutput, RubricLossOutput, gdso_loss, rubric_loss


class RubricLoss(nn.Module):
    """Module form of :func:`zreward_kernels.rubric_loss`; options fixed at construction.

    ``forward(logits, **terms)`` takes the per-batch terms (``target``, ``target_probs``,
    ``teacher_logits``, ``teacher_probs``, ``pairs``, ``pair_gaps``) and returns a
    :class:`~zreward_kernels.RubricLossOutput`.
    """

    def __init__(
        self,
        *,
        weight_ce: float = 1.0,
        weight_kl: float = 1.0,
        weight_pair: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        bin_values: Sequence[float] = BIN_VALUES,
        temperature: float = 1.0,
        backend: Optional[str] = None,
        validate: bool = True,
    ):
        super().__init__()
        self.options = dict(
            weight_ce=weight_ce, weight_kl=weight_kl, weight_pair=weight_pair, ignore_index=ignore_index,
            reduction=reduction, bin_values=tuple(bin_values), temperature=temperature, backend=backend,
            validate=validate,
        )

    def forward(self, logits: torch.Tensor, **terms) -> RubricLossOutput:
        return rubric_loss(logits, **terms, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "bin_values")


class GDSOLoss(nn.Module):
    """Module form of :func:`zreward_kernels.gdso_loss`; ``forward(logits [P,2,G,K], scores [P,2])``."""

    def __init__(
        self,
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
    ):
        super().__init__()
        self.options = dict(
            lambda_pt=lambda_pt, lambda_pw=lambda_pw, alpha_pt=alpha_pt, alpha_pw=alpha_pw, eps=eps,
            bin_values=tuple(bin_values), temperature=temperature, backend=backend, validate=validate,
        )

    def forward(self, logits: torch.Tensor, scores: torch.Tensor) -> GDSOOutput:
        return gdso_loss(logits, scores, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "bin_values")
