"""Hugging Face helpers: score-position hidden states without the full LM head.

``final_hidden_states(model, positions, **inputs)`` runs the model's backbone (the module named by
``model.base_model_prefix``: ``LlamaModel`` inside ``LlamaForCausalLM``, ``Qwen2VLModel`` -- vision
tower included -- inside ``Qwen2VLForConditionalGeneration``) and gathers the last hidden state at
the given positions; the ``[B, T, V]`` logits are never built.  ``lm_head_params(model)`` returns
the output projection's weight (the input embedding itself when the model ties them) and bias, ready
for :func:`zreward_kernels.restricted_logits`.

FSDP / DeepSpeed ZeRO-3: the LM head (or tied embedding) is sharded, so ``index_select`` on it
sees a flat shard.  Gather only while reading the K rows -- e.g. FSDP ``summon_full_params`` on the
head module or DeepSpeed ``GatheredParameters([head.weight])`` around
:meth:`zreward.heads.RestrictedHead.from_lm_head` -- and train the rows as that small replicated
parameter; write them back before saving.  With DDP nothing special is needed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def backbone(model):
    """The module that produces the final hidden states (everything but the LM head)."""
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    if base is None or base is model:
        raise ValueError(
            f"{type(model).__name__} has no backbone under base_model_prefix={prefix!r}; pass the backbone itself"
        )
    return base


def lm_head_params(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, H], bias [V] or None)`` of the model's output projection (tied or not)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head.weight, getattr(head, "bias", None)


def final_hidden_states(model, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """Final hidden states at ``positions`` without computing any vocabulary logits.

    ``positions``: ``[B]`` (one position per sequence, returns ``[B, H]``), ``[B, P]`` (returns
    ``[B, P, H]``) or a boolean mask ``[B, T]`` (returns ``[N, H]`` for the N true entries, in
    row-major order).  Negative positions count from the end.  ``inputs`` go to the backbone
    unchanged (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...).
    """
    out = backbone(model)(**inputs, return_dict=True)
    h = out.last_hidden_state  # [B, T, H]
    b, t, _ = h.shape
    if positions.dtype == torch.bool:
        if tuple(positions.shape) != (b, t):
            raise ValueError(f"a boolean positions mask must be [B, T] = [{b}, {t}], got {tuple(positions.shape)}")
        return h[positions]
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be an integer or boolean tensor, got {positions.dtype}")
    pos = positions.to(h.device).long()
    squeeze = pos.dim() == 1
    if squeeze:
        pos = pos.unsqueeze(1)
    if pos.dim() != 2 or pos.shape[0] != b:
        raise ValueError(f"positions must be [B] or [B, P] with B = {b}, got {tuple(positions.shape)}")
    pos = torch.where(pos < 0, pos + t, pos)
    if bool(((pos < 0) | (pos >= t)).any()):
        raise ValueError(f"positions must lie in [-{t}, {t})")
    gathered = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    return gathered.squeeze(1) if squeeze else gathered
