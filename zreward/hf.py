"""Hugging Face helpers: score-position hidden states without the full LM head.

``final_hidden_states(model, positions, **inputs)`` runs the model's backbone (the module named by
``model.base_model_prefix``: ``LlamaModel`` inside ``LlamaForCausalLM``, ``Qwen2VLModel`` -- vision
tower included -- inside ``Qwen2VLForConditionalGeneration``) and gathers the last hidden state at
the given positions; the ``[B, T, V]`` logits are never built.  ``lm_head_params(model)`` returns
the output projection's weight (the input embedding itself when the model ties them) and bias, ready
for :func:`zreward_kernels.restricted_logits`.  Models that change their logits after the projection
(Gemma 2's final soft-capping, Granite's and Cohere's logit scaling, ...) are named by
:func:`logit_transforms`; ``ZRewardModel`` refuses them (:func:`check_plain_lm_head`).

FSDP / DeepSpeed ZeRO-3: the LM head (or tied embedding) is sharded, so ``index_select`` on it
sees a flat shard.  Gather only while reading the K rows -- e.g. FSDP ``summon_full_params`` on the
head module or DeepSpeed ``GatheredParameters([head.weight])`` around
:meth:`zreward.heads.RestrictedHead.from_lm_head` -- and train the rows as that small replicated
parameter; write them back before saving.  With DDP nothing special is needed.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

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


#: Config fields with which a model changes its logits after the LM head's projection, and the value
#: at which each does nothing.  The restricted head computes the projection ``W h + b`` only.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2, PaliGemma 2, ...: cap * tanh(logits / cap)
    "logit_softcapping": None,
    "logits_scaling": 1.0,  # Granite (divides), HyperCLOVA X (multiplies)
    "logit_scale": 1.0,  # Cohere, Aya Vision: multiplies
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,  # Falcon-H1
}


def logit_transforms(model) -> Dict[str, object]:
    """The fields of ``model``'s config (or its text config) that transform the logits after the LM
    head (:data:`LOGIT_TRANSFORMS` not at their no-op value, and named in the source of the model's
    ``forward``); empty for a plain projection.  The model's own attributes of those names count too
    (Cohere copies ``logit_scale`` at construction, so a config changed later does not reach it).

    A field only counts where ``forward`` reads it: Aya Vision's text config carries Cohere's
    ``logit_scale``, but its forward returns the plain projection (transformers 5.x)."""
    import inspect

    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source to read: every active field counts
        source = None
    found = {}
    config = getattr(model, "config", None)
    configs = [config, model]
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for cfg in configs:
        for name, off in LOGIT_TRANSFORMS.items():
            value = getattr(cfg, name, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # unset (None), or not a scalar setting
            if (off is None or value != off) and (source is None or name in source):
                found[name] = value
    return found


def check_plain_lm_head(model) -> None:
    """Raise when ``model`` transforms its logits after the LM head's projection: the nine score
    logits from :func:`zreward_kernels.restricted_logits` (``W h + b``) would then not be the model's
    own, and the scores silently off."""
    found = logit_transforms(model)
    if found:
        what = ", ".join(f"{k}={v!r}" for k, v in sorted(found.items()))
        raise NotImplementedError(
            f"{type(model).__name__} transforms its logits after the LM head ({what}); zreward reads the score "
            "logits as the plain projection W h + b, so its scores would not be the model's own distribution. "
            "To train from this model anyway, switch the transform off when loading it, so the model and zreward "
            "agree: for example from_pretrained(..., final_logit_softcapping=None), or logits_scaling / "
            "logit_scale = 1.0 (on the text config of a vision-language model)")


def final_hidden_states(model, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """Final hidden states at ``positions`` without computing any vocabulary logits.

    ``positions``: ``[B]`` (one position per sequence, returns ``[B, H]``), ``[B, P]`` (returns
    ``[B, P, H]``) or a boolean mask ``[B, T]`` (returns ``[N, H]`` for the N true entries, in
    row-major order).  Negative positions count from the end.  ``inputs`` go to the backbone
    unchanged (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...).
    """
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.bool, torch.int32, torch.int64):
        # checked before the forward pass, which would otherwise run for nothing
        raise TypeError(f"positions must be an integer or boolean tensor, got "
                        f"{positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    out = backbone(model)(**inputs, return_dict=True)
    h = out.last_hidden_state  # [B, T, H]
    b, t, _ = h.shape
    if positions.dtype == torch.bool:
        if tuple(positions.shape) != (b, t):
            raise ValueError(f"a boolean positions mask must be [B, T] = [{b}, {t}], got {tuple(positions.shape)}")
        return h[positions]
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
