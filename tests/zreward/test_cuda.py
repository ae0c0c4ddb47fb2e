"""The library on a GPU: the scorer (fp32 and bf16 autocast, shared prefix, both suffix layouts,
differentiable tensor images), the downstream reward helpers and the trainers (the fused rubric loss
in an SFT run; a GDSO step with Liger's compiled GRPO loss against the PyTorch one; OPD steps).

Every test needs CUDA (skipped elsewhere; `bench/gpu_check.sh` runs this module).  CPU results are
the reference: the other library tests check them in detail."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from zreward.downstream import group_rewards, refl_loss  # noqa: E402
from zreward.model import ZRewardModel  # noqa: E402
from zreward.scorer import RewardScorer  # noqa: E402
from zreward.tiny import FAMILIES, tiny_qwen2_vl  # noqa: E402
from zreward_kernels import group_advantage  # noqa: E402

pytestmark = pytest.mark.cuda

PROMPTS = ["a red car", "a blue dog on the square", "green circle", "a car"]


@pytest.fixture
def dev():
    return torch.device("cuda")


@pytest.fixture
def exact_fp32():
    """fp32 matmuls and convolutions without TF32, so CUDA and CPU agree to float rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(56, 56), (84, 56), (28, 84), (56, 84)]
    return [(rng.random((h, w, 3)) * 255).astype("uint8") for h, w in sizes[:n]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scorer_on_cuda_matches_cpu(family, dev, exact_fp32):
    model, proc = FAMILIES[family]()
    zm = ZRewardModel(model, proc)
    imgs = _images()
    cpu = RewardScorer(zm).score(imgs, PROMPTS)
    zm.to(dev)
    fp32 = RewardScorer(zm, autocast=False).score(imgs, PROMPTS)
    assert fp32.probs.device.type == "cuda" and fp32.reward.dtype == torch.float32
    for name in ("probs", "mean", "std", "reward", "in_vocab_mass"):
        torch.testing.assert_close(getattr(fp32, name).cpu(), getattr(cpu, name), atol=1e-4, rtol=1e-4, msg=name)
    # the other query layouts agree on the GPU too
    for kw in (dict(shared_prefix=False), dict(layout="repeat")):
        other = RewardScorer(zm, autocast=False, **kw).score(imgs, PROMPTS)
        torch.testing.assert_close(other.probs, fp32.probs, atol=1e-4, rtol=1e-4, msg=str(kw))
    # the default on CUDA: bf16 autocast for an fp32 model -- close to fp32, outputs still fp32
    bf16 = RewardScorer(zm).score(imgs, PROMPTS)
    assert bf16.mean.dtype == torch.float32 and torch.isfinite(bf16.probs).all()
    torch.testing.assert_close(bf16.probs.sum(-1), torch.ones_like(bf16.probs[..., 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(bf16.probs, fp32.probs, atol=2e-2, rtol=0)
    torch.testing.assert_close(bf16.mean, fp32.mean, atol=1e-1, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_differentiable_scoring_on_cuda_reaches_the_pixels(family, dev):
    model, proc = FAMILIES[family]()
    for p in model.parameters():
        p.requires_grad_(False)
    zm = ZRewardModel(model, proc).to(dev)
    images = torch.rand(3, 3, 56, 56, device=dev, requires_grad=True)
    out = RewardScorer(zm, batch_size=2).score(images, PROMPTS[:3], differentiable=True)
    out.reward.sum().backward()
    g = images.grad
    assert g is not None and g.device.type == "cuda" and torch.isfinite(g).all()
    assert all(float(g[i].abs().sum()) > 0 for i in range(3))  # every image gets its own gradient
    plain = RewardScorer(zm, batch_size=2).score(images.detach(), PROMPTS[:3])
    torch.testing.assert_close(out.reward.detach(), plain.reward, atol=1e-3, rtol=1e-3)
    # a list of CUDA tensors of two sizes (bf16, as a pipeline gives them): graph kept to each one
    a = torch.rand(3, 56, 56, device=dev).bfloat16().requires_grad_()
    b = torch.rand(3, 84, 56, device=dev).bfloat16().requires_grad_()
    out = RewardScorer(zm).score([a, b], PROMPTS[:2], differentiable=True)
    out.reward.sum().backward()
    assert a.grad.device.type == "cuda" and float(a.grad.float().abs().sum()) > 0
    assert float(b.grad.float().abs().sum()) > 0


def test_refl_and_group_rewards_on_cuda(dev):
    model, proc = tiny_qwen2_vl(seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    scorer = RewardScorer(ZRewardModel(model, proc).to(dev), batch_size=4, autocast=False)
    theta = torch.zeros(2, 3, 56, 56, device=dev, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.2)
    history = []
    for _ in range(12):
        loss, out = refl_loss(scorer, torch.sigmoid(theta), ["a red car", "a blue dog"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(out.reward.detach().mean()))
    rises = sum(b > a for a, b in zip(history, history[1:]))
    assert history[-1] > history[0] and rises >= len(history) - 2, history
    images = torch.rand(6, 3, 56, 56, generator=torch.Generator().manual_seed(0)).to(dev)
    prompts = ["a red car"] * 3 + ["a blue dog"] * 3
    res = group_rewards(scorer, images, prompts, group_size=3)
    assert res.advantages.device.type == "cuda"
    adv, stats = group_advantage(res.rewards.cpu(), group_size=3)  # the compiled CPU op as the reference
    torch.testing.assert_close(res.advantages.cpu(), adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.stats.mean.cpu(), stats.mean)


@pytest.fixture(scope="module")
def base(rl_base):
    pytest.importorskip("accelerate")
    return rl_base


def _log(path):
    with open(path / "metrics.jsonl") as f:
        return [json.loads(x) for x in f]


def test_sft_on_cuda_learns_the_toy_task(base, tmp_path):
    """The trainer on the GPU: accelerate places the model there and the loss is the fused Triton
    rubric_loss (the CPU runs use the reference)."""
    from train_runner import toy_items

    import zreward_kernels
    from zreward.train import TrainConfig, train

    cfg = TrainConfig(method="sft", model=base, output_dir=str(tmp_path), max_steps=40, batch_size=8, lr=3e-3,
                      log_every=5, save_every=0, schedule="constant", device="cuda")
    train(cfg, items=toy_items())
    assert zreward_kernels.backend_info()["last_backend"]["rubric_loss"] == "triton"
    log = _log(tmp_path)
    assert log[-1]["loss"] < 0.4 < log[0]["loss"]
    trained = ZRewardModel.from_pretrained(str(tmp_path / "final"), device="cuda", attn_implementation="sdpa")
    fresh = toy_items(8, seed=5)
    out = RewardScorer(trained).score([it.image for it in fresh], [it.prompt for it in fresh], ["realism"])
    red, blue = out.mean[0::2, 0], out.mean[1::2, 0]
    assert float(red.min()) > float(blue.max()) + 1.0


def test_gdso_step_on_cuda_with_compiled_liger_equals_pytorch(base, tmp_path):
    """policy_loss='liger' on CUDA runs Liger's fused linear GRPO loss compiled (torch.compile); one
    GDSO step logs the same values as the PyTorch policy loss (same sampled traces: same seed)."""
    pytest.importorskip("liger_kernel")
    from train_runner import gdso_first_step_logs

    logs = gdso_first_step_logs(base, tmp_path, "cuda")
    for k in ("policy_loss", "loss", "ce", "pw", "reward"):
        assert logs["torch"][k] == pytest.approx(logs["liger"][k], rel=1e-4, abs=1e-5), k


def test_opd_steps_on_cuda(base, rl_teacher, tmp_path):
    """OPD on the GPU.  Its score tokens were drawn with a CPU generator from CUDA probabilities,
    which raises ("Expected a 'cuda' device type for generator") at the first step; they are drawn on
    the CPU now.  Two steps run, move the weights, and log finite values."""
    import math

    from train_runner import toy_items

    from zreward.train import TrainConfig, train

    cfg = TrainConfig(method="opd", model=base, group_size=1, output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, lr=1e-2,
                      log_every=1, save_every=0, teacher=rl_teacher, max_trace_tokens=4,
                      inner_updates=1, schedule="constant", device="cuda")
    train(cfg, items=toy_items(8))
    log = _log(tmp_path / "run")
    assert [x["step"] for x in log] == [1, 2]
    assert all(math.isfinite(x["loss"]) and x["grad_norm"] > 0 for x in log)
