"""The reward model inside text-to-image post-training (SPEC section 6).

Two ways a generator's trainer uses the student:

* :func:`refl_loss` -- ReFL / DRaFT: images from the generator flow, with gradients, through the
  scorer's tensor-only preprocessing into the reward model; the loss is ``-R(p, G(p))``, to be
  back-propagated through the last denoising steps.  The reward model's own weights should be frozen
  (``requires_grad_(False)``); the gradient then reaches the images only.
* :func:`group_rewards` -- the group-relative (GRPO-style) variant: G samples per prompt are scored
  without gradients and their rewards normalised within each prompt's group by the compiled
  :func:`zreward_kernels.group_advantage` op; the trainer weights its policy-gradient term with them.

Both score every rubric dimension by default and combine them with the rubric's weights (the
scorer's ``reward``); ``dimensions=`` restricts them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from zreward_kernels import GroupStats, group_advantage

from .scorer import RewardOutput, RewardScorer, image_batch, prompt_list, tensor_images


def refl_loss(scorer: RewardScorer, images: torch.Tensor, prompts: Sequence[str],
              dimensions: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, RewardOutput]:
    """``(loss, out)`` with ``loss = -out.reward.mean()``, differentiable with respect to ``images``
    (a float tensor ``[B, 3, H, W]`` in ``[0, 1]``, for example the decoded output of the last
    denoising steps, or a list of ``[3, H, W]`` ones of several sizes)."""
    images = image_batch(images)
    if not tensor_images(images):
        raise TypeError("refl_loss needs the generator's images as a float tensor [B, 3, H, W] in [0, 1] "
                        "(or a list of [3, H, W] ones)")
    out = scorer.score(images, prompts, dimensions, differentiable=True)
    return -out.reward.mean(), out


@dataclass
class GroupRewards:
    """Rewards of B = sum of group sizes samples and their group-relative advantages."""

    advantages: torch.Tensor  # [B] float32, normalised within each prompt's group
    rewards: torch.Tensor  # [B] the scorer's combined reward
    stats: GroupStats  # per group: mean, std, zero_std (all rewards equal: no learning signal)
    scores: RewardOutput  # per-dimension distributions, means and stds


def group_rewards(scorer: RewardScorer, images, prompts: Sequence[str], *, group_size: Optional[int] = None,
                  group_offsets: Optional[torch.Tensor] = None, mode: str = "std", eps: float = 1e-6,
                  dimensions: Optional[Sequence[str]] = None, check_prompts: bool = True) -> GroupRewards:
    """Score the samples (no gradients) and normalise the rewards within each prompt's group.

    With neither ``group_size`` nor ``group_offsets`` the groups are the prompts: samples with the
    same prompt text form a group wherever they stand in the batch (``group_ids=prompts`` of
    :func:`zreward_kernels.group_advantage`; the stats come in sorted-prompt order).  Otherwise the
    samples of a group are consecutive: ``group_size`` for groups of equal size or
    ``group_offsets [G+1]`` (like ``cu_seqlens``; a tensor, a list or an array of ints);
    ``mode`` is ``std`` (GRPO), ``mean`` (Dr. GRPO) or ``rloo``, as in
    :func:`zreward_kernels.group_advantage`.  ``check_prompts`` raises if a consecutive group holds
    different prompts (a sign of mis-ordered samples).
    """
    images = image_batch(images)
    prompts = prompt_list(prompts, images)
    if check_prompts:
        if group_size is not None:
            if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1 \
                    or len(prompts) % group_size:
                raise ValueError(f"group_size must be a positive int dividing the {len(prompts)} samples, "
                                 f"got {group_size!r}")
            bounds = list(range(0, len(prompts) + 1, group_size))
        elif group_offsets is not None:
            bounds = [int(v) for v in torch.as_tensor(group_offsets).reshape(-1).tolist()]
            if not bounds or bounds[0] != 0 or bounds[-1] != len(prompts) or any(
                    b < a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"group_offsets must rise from 0 to the {len(prompts)} samples, got {bounds[:8]}"
                                 f"{'...' if len(bounds) > 8 else ''}")
        else:
            bounds = None  # grouped by prompt below
        if bounds is not None:
            for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                if len(set(prompts[a:b])) > 1:
                    raise ValueError(f"group {g} (samples {a}..{b - 1}) mixes prompts {sorted(set(prompts[a:b]))[:3]}; "
                                     "a group's samples must share one prompt")
    out = scorer.score(images, prompts, dimensions)
    if group_offsets is not None:  # a list or array is fine here; the op itself takes a tensor on the rewards' device
        group_offsets = torch.as_tensor(group_offsets, device=out.reward.device)
    by_prompt = list(prompts) if group_size is None and group_offsets is None else None
    adv, stats = group_advantage(out.reward, group_size=group_size, group_offsets=group_offsets, group_ids=by_prompt,
                                 mode=mode, eps=eps)
    return GroupRewards(adv, out.reward, stats, out)
