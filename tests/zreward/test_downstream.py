"""The student as a reward in text-to-image post-training: ReFL loss and group-relative rewards."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from zreward.downstream import group_rewards, refl_loss  # noqa: E402
from zreward.model import ZRewardModel  # noqa: E402
from zreward.scorer import RewardScorer  # noqa: E402
from zreward.tiny import tiny_qwen2_vl  # noqa: E402
from zreward_kernels import group_advantage  # noqa: E402

PROMPTS = ["a red car", "a blue dog"]


@pytest.fixture(scope="module")
def scorer():
    model, proc = tiny_qwen2_vl(seed=3)
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen reward model: gradients reach the images only
    return RewardScorer(ZRewardModel(model, proc), batch_size=4)


def test_refl_loss_optimises_images_towards_higher_reward(scorer):
    """A toy generator (free pixel logits per prompt) trained on -R rises in reward."""
    theta = torch.zeros(2, 3, 56, 56, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.2)
    history = []
    for _ in range(12):
        loss, out = refl_loss(scorer, torch.sigmoid(theta), PROMPTS)
        opt.zero_grad()
        loss.backward()
        assert theta.grad is not None and float(theta.grad.abs().sum()) > 0
        opt.step()
        history.append(float(out.reward.detach().mean()))
    assert torch.allclose(-loss.detach(), out.reward.detach().mean())
    # a random tiny reward model is nearly flat in pixel space, but gradient steps must climb it
    rises = sum(b > a for a, b in zip(history, history[1:]))
    assert history[-1] > history[0] and rises >= len(history) - 2, history
    assert all(p.grad is None for p in scorer.model.model.parameters())
    with pytest.raises(TypeError, match="refl_loss needs the generator's images as a float tensor"):
        refl_loss(scorer, [torch.zeros(56, 56, 3).numpy()], PROMPTS[:1])
    # a generator of [3, H, W] tensors (several resolutions) was refused as "not tensors"
    pics = [torch.rand(3, 56, 56, requires_grad=True), torch.rand(3, 84, 56, requires_grad=True)]
    loss, _ = refl_loss(scorer, (p for p in pics), PROMPTS)
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in pics)


def test_group_rewards_normalise_within_each_prompt(scorer):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 56, 56, generator=gen)
    prompts = ["a red car"] * 3 + ["a blue dog"] * 3
    res = group_rewards(scorer, images, prompts, group_size=3)
    plain = scorer.score(images, prompts)
    torch.testing.assert_close(res.rewards, plain.reward)
    adv, stats = group_advantage(plain.reward, group_size=3)
    torch.testing.assert_close(res.advantages, adv)
    torch.testing.assert_close(res.stats.mean, stats.mean)
    assert abs(float(res.advantages[:3].sum())) < 1e-4 and abs(float(res.advantages[3:].sum())) < 1e-4
    as_np = group_rewards(scorer, images, prompts, group_size=np.int64(3))  # was "must be a positive int"
    as_gen = group_rewards(scorer, (x for x in images[:3]), "a red car", group_size=3)  # was "3 images for 1 prompts"
    torch.testing.assert_close(as_gen.rewards, res.rewards[:3])
    torch.testing.assert_close(as_np.advantages, res.advantages)
    one = group_rewards(scorer, images[:3], "a red car", group_size=3)  # one prompt string for the group
    torch.testing.assert_close(one.rewards, res.rewards[:3])
    # variable groups through offsets; Dr. GRPO's mean-only mode
    off = torch.tensor([0, 2, 6])
    res2 = group_rewards(scorer, images, ["a red car"] * 2 + ["a blue dog"] * 4, group_offsets=off, mode="mean")
    r = res2.rewards
    torch.testing.assert_close(res2.advantages, torch.cat([r[:2] - r[:2].mean(), r[2:] - r[2:].mean()]),
                               atol=1e-6, rtol=1e-6)
    for given in ([0, 2, 6], (0, 2, 6), np.array([0, 2, 6])):  # passed the prompt check, then failed in the op
        as_list = group_rewards(scorer, images, ["a red car"] * 2 + ["a blue dog"] * 4, group_offsets=given,
                                mode="mean")
        torch.testing.assert_close(as_list.advantages, res2.advantages)
    # no group arguments: the groups are the prompts, wherever their samples stand in the batch
    shuffled = [0, 3, 4, 1, 5, 2]
    by_prompt = group_rewards(scorer, images[shuffled], [prompts[i] for i in shuffled])
    torch.testing.assert_close(by_prompt.rewards, res.rewards[shuffled])
    torch.testing.assert_close(by_prompt.advantages, res.advantages[shuffled])
    torch.testing.assert_close(by_prompt.stats.mean, res.stats.mean.flip(0))  # sorted prompts: "a blue dog" first
    with pytest.raises(ValueError, match=r"group 1 \(samples 3\.\.5\) mixes prompts"):
        group_rewards(scorer, images, prompts[:4] + ["a red car", "a blue dog"], group_size=3)
    with pytest.raises(ValueError, match="group_size must be a positive int dividing the 6 samples"):
        group_rewards(scorer, images, prompts, group_size=4)
    with pytest.raises(ValueError, match="group_offsets must rise from 0 to the 6 samples"):
        group_rewards(scorer, images, prompts, group_offsets=torch.tensor([0, 3, 5]))
