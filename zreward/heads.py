"""Score heads built on the vocab-restricted projection."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from zreward_kernels.restricted import _as_ids  # the fused ops' own reader: same types, same messages


def _kind(x) -> str:
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def _distinct_ids(token_ids) -> list:
    """``token_ids`` as a list of distinct non-negative ints (named in the error otherwise)."""
    dev = token_ids.device if isinstance(token_ids, torch.Tensor) else torch.device("cpu")
    ids = _as_ids(token_ids, dev).tolist()
    if not ids:
        raise ValueError("token_ids must hold at least one id")
    if len(set(ids)) != len(ids):
        raise ValueError(f"token_ids must be distinct, got {ids}")
    if min(ids) < 0:
        raise ValueError(f"token_ids must be >= 0, got {ids}")
    return ids


class RestrictedHead(nn.Module):
    """The K score-token rows of an LM head as their own (small, replicated) parameter.

    Use it when only the score rows should train (their gradient is a dense ``[K, H]`` tensor that
    any optimizer takes) or when the LM head is sharded (FSDP / DeepSpeed ZeRO-3): copy the rows out
    once with :meth:`from_lm_head` (gather them while the head's parameters are gathered), train,
    and :meth:`write_back` before saving the full model.
    """

    def __init__(self, rows: torch.Tensor, token_ids: Sequence[int], bias: Optional[torch.Tensor] = None):
        super().__init__()
        ids = _distinct_ids(token_ids)
        if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
            raise TypeError(f"rows must be a floating-point tensor [K, H], got {_kind(rows)}")
        if rows.dim() != 2 or rows.shape[0] != len(ids):
            raise ValueError(f"rows must be [K, H] with K = len(token_ids) = {len(ids)}, got {tuple(rows.shape)}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
                raise TypeError(f"bias must be a floating-point tensor [K], got {_kind(bias)}")
            if tuple(bias.shape) != (len(ids),):
                raise ValueError(f"bias must be [K] = [{len(ids)}] (the score rows' entries, not the LM head's [V] "
                                 f"bias: use from_lm_head), got shape {tuple(bias.shape)}")
        self.weight = nn.Parameter(rows.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long), persistent=True)

    @classmethod
    def from_lm_head(cls, lm_head_weight: torch.Tensor, token_ids: Union[Sequence[int], torch.Tensor],
                     lm_head_bias: Optional[torch.Tensor] = None) -> "RestrictedHead":
        ids = _distinct_ids(token_ids)
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
        """Copy the trained rows (and bias entries) into the full LM head, in place.

        Everything is checked before anything is written: a head with a bias needs ``lm_head_bias``
        (the trained bias would otherwise be dropped), and the shapes must fit the head.
        """
        k, h = self.weight.shape
        if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != h:
            raise ValueError(f"lm_head_weight must be [V, H] with H = {h} (the rows' width), "
                             f"got shape {tuple(lm_head_weight.shape)}")
        v = lm_head_weight.shape[0]
        top = int(self.token_ids.max())
        if top >= v:
            raise ValueError(f"lm_head_weight has {v} rows, but this head's token_ids reach {top}")
        if self.bias is not None:
            if lm_head_bias is None:
                raise ValueError("this head has a bias; pass lm_head_bias so the trained bias entries are written "
                                 "back too (they would be lost)")
            if tuple(lm_head_bias.shape) != (v,):
                raise ValueError(f"lm_head_bias must be [V] = [{v}], got shape {tuple(lm_head_bias.shape)}")
        elif lm_head_bias is not None:
            raise ValueError("lm_head_bias was given, but this head has no bias to write back")
        ids = self.token_ids.to(lm_head_weight.device)
        lm_head_weight.index_copy_(0, ids, self.weight.to(lm_head_weight.dtype))
        if self.bias is not None:
            lm_head_bias.index_copy_(0, ids.to(lm_head_bias.device), self.bias.to(lm_head_bias.dtype))
