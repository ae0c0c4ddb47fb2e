"""The reference is the spec: check it against closed forms, torch's own losses and gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from zreward_kernels import BIN_VALUES, gdso_loss, rubric_loss, score_stats
from zreward_kernels import reference as ref

V = torch.tensor(BIN_VALUES, dtype=torch.float64)


def test_uniform_logits_give_midpoint_and_known_std():
    out = score_stats(torch.zeros(3, 9), backend="reference")
    assert torch.allclose(out.probs, torch.full((3, 9), 1 / 9))
    assert torch.allclose(out.mean, torch.full((3,), 3.0))
    expected_std = math.sqrt(float(((V - 3.0) ** 2).mean()))
    assert torch.allclose(out.std, torch.full((3,), expected_std, dtype=torch.float32))


def test_point_mass_has_zero_std_and_finite_gradient():
    x = torch.full((2, 9), float("-inf"))
    x[0, 7] = 0.0
    x[1, 2] = 3.0
    x.requires_grad_(True)
    out = score_stats(x, backend="reference")
    assert out.mean.tolist() == [4.5, 2.0]
    assert out.std.tolist() == [0.0, 0.0]
    (out.mean.sum() + out.std.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert float(x.grad.abs().sum()) == 0.0


def test_temperature_divides_logits():
    x = torch.randn(5, 9)
    a = score_stats(x, temperature=2.5, backend="reference")
    b = score_stats(x / 2.5, backend="reference")
    torch.testing.assert_close(a.probs, b.probs)


def test_custom_bins():
    bins = (0.0, 1.0, 10.0)
    x = torch.tensor([[0.0, 0.0, 0.0]])
    out = score_stats(x, bin_values=bins, backend="reference")
    assert abs(float(out.mean) - 11 / 3) < 1e-6


def test_ce_matches_torch_cross_entropy_with_ignore_index():
    x = torch.randn(11, 9)
    t = torch.randint(0, 9, (11,))
    t[[2, 5]] = -100
    out = rubric_loss(x, target=t, backend="reference")
    torch.testing.assert_close(out.ce, F.cross_entropy(x, t, ignore_index=-100))
    torch.testing.assert_close(out.loss, out.ce)
    s = rubric_loss(x, target=t, reduction="sum", backend="reference")
    torch.testing.assert_close(s.ce, F.cross_entropy(x, t, ignore_index=-100, reduction="sum"))


def test_soft_ce_matches_torch_and_kl_matches_kl_div():
    x = torch.randn(7, 2, 9)
    tp = torch.softmax(torch.randn(7, 2, 9), -1)
    out = rubric_loss(x, target_probs=tp, teacher_probs=tp, reduction="none", backend="reference")
    torch.testing.assert_close(out.ce, F.cross_entropy(x.reshape(-1, 9), tp.reshape(-1, 9), reduction="none").view(7, 2))
    kl = F.kl_div(torch.log_softmax(x, -1), tp, reduction="none").sum(-1)
    torch.testing.assert_close(out.kl, kl)


def test_zeros_in_targets_contribute_nothing():
    x = torch.randn(4, 9)
    tp = torch.zeros(4, 9)
    tp[:, 3] = 1.0
    out = rubric_loss(x, target_probs=tp, teacher_probs=tp, reduction="none", backend="reference")
    hard = rubric_loss(x, target=torch.full((4,), 3), reduction="none", backend="reference")
    torch.testing.assert_close(out.ce, hard.ce)
    torch.testing.assert_close(out.kl, hard.ce)  # KL(onehot || p) = -log p_t
    assert torch.isfinite(out.ce).all()


def test_pair_term_by_hand():
    x = torch.randn(5, 9)
    mu = score_stats(x, backend="reference").mean
    pairs = torch.tensor([[0, 1], [3, 2], [4, 4]])
    gaps = torch.tensor([0.5, -1.0, 0.0])
    out = rubric_loss(x, pairs=pairs, pair_gaps=gaps, reduction="none", backend="reference")
    expected = torch.stack([(mu[0] - mu[1] - 0.5).abs(), (mu[3] - mu[2] + 1.0).abs(), torch.tensor(0.0)])
    torch.testing.assert_close(out.pair, expected)


def test_all_ignored_mean_is_zero_not_nan():
    x = torch.randn(3, 9, requires_grad=True)
    out = rubric_loss(x, target=torch.full((3,), -100), backend="reference")
    assert float(out.ce.detach()) == 0.0
    out.loss.backward()
    assert float(x.grad.abs().sum()) == 0.0


def _gradcheck(fn, x):
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_score_stats():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda t: tuple(ref.score_stats(t, BIN_VALUES, 1.3)), x)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_rubric_loss(reduction):
    torch.manual_seed(0)
    x = torch.randn(6, 2, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (6, 2))
    t[1, 0] = -100
    teacher = torch.randn(6, 2, 9, dtype=torch.float64)
    pairs = torch.tensor([[0, 3], [5, 7], [11, 2]])
    gaps = torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64)

    def fn(z):
        return tuple(
            ref.rubric_loss(z, BIN_VALUES, target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps,
                            weight_ce=0.7, weight_kl=1.3, weight_pair=0.5, reduction=reduction, temperature=1.2)
        )

    _gradcheck(fn, x)


def test_gradcheck_gdso():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 9, dtype=torch.float64, requires_grad=True)
    scores = torch.tensor([[4.5, 2.0], [3.0, 3.5], [1.0, 5.0]], dtype=torch.float64)
    _gdso = lambda z: ref.gdso_loss(z, scores, BIN_VALUES, alpha_pt=0.7, alpha_pw=1.4, temperature=0.9).loss  # noqa: E731
    _gradcheck(_gdso, x)


def test_gdso_group_of_one_and_equal_rewards_give_zero_advantage():
    x = torch.randn(2, 2, 1, 9)
    out = gdso_loss(x, torch.tensor([[4.0, 2.0], [3.0, 3.0]]), backend="reference")
    assert float(out.advantage.abs().sum()) == 0.0
    same = torch.randn(1, 1, 1, 9).expand(1, 2, 5, 9).contiguous()
    out = gdso_loss(same, torch.tensor([[3.0, 3.0]]), backend="reference")
    assert float(out.advantage.abs().max()) == 0.0


def test_cached_bins_created_in_inference_mode_still_work_with_autograd():
    from zreward_kernels._common import _BINS_CACHE

    _BINS_CACHE.clear()
    with torch.inference_mode():
        score_stats(torch.randn(2, 9), backend="reference")  # first use of the cached bins
    x = torch.randn(2, 9, requires_grad=True)
    score_stats(x, backend="reference").mean.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
