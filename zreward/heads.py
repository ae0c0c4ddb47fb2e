"""Score heads built on the vocab-restricted projection."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn


class RestrictedHead(nn.Module):
    """The K score-token rows of an LM head as their own (small, replicated) parameter.

    Use it when only the score rows should train (their gradient is a dense ``[K, H]`` tensor that
    any optimizer takes) or when the LM head is sharded (FSDP / DeepSpeed ZeRO-3): copy the rows out
    once with :meth:`from_lm_head` (gather them while the head's parameters are gathered), train,
    and :meth:`write_back` before saving the full model.
    """

    def __init__(self, rows: torch.Tensor, token_ids: Sequence[int], bias: Optional[torch.Tensor] = None):
        super().__init__()
        if rows.dim() != 2 or rows.shape[0] != len(token_ids):
            raise ValueError(f"rows must be [K, H] with K = len(token_ids) = {len(token_ids)}, got {tuple(rows.shape)}")
        self.weight = nn.Parameter(rows.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long), persistent=True)

    @classmethod
    def from_lm_head(cls, lm_head_weight: torch.Tensor, token_ids: Union[Sequence[int], torch.Tensor],
                     lm_head_bias: Optional[torch.Tensor] = None) -> "RestrictedHead":
        ids = [int(t) for t in token_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"token_ids must be distinct, got {ids}")
        v = lm_head_weight.shape[0]
        if any(t < 0 or t >= v for t in ids):
            raise ValueError(f"token_ids must lie in [0, {v}), got {ids}")
        idx = torch.tensor(ids, device=lm_head_weight.device)
        rows = lm_head_weight.detach().index_select(0, idx)
        bias = lm_head_bias.detach().index_select(0, idx) if lm_head_bias is not None else None
        return cls(rows, ids, bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H] -> [..., K]`` logits of the score tokens."""
        bias = self.bias.to(hidden.dtype) if self.bias is not None else None
        return F.linear(hidden, self.weight.to(hidden.dtype), bias)

    @torch.no_grad()
    def write_back(self, lm_head_weight: torch.Tensor, lm_head_bias: Optional[torch.Tensor] = None) -> None:
        """Copy the trained rows into the full LM head (in place)."""
        ids = self.token_ids.to(lm_head_weight.device)
        lm_head_weight.index_copy_(0, ids, self.weight.to(lm_head_weight.dtype))
        if self.bias is not None and lm_head_bias is not None:
            lm_head_bias.index_copy_(0, ids, self.bias.to(lm_head_bias.dtype))
