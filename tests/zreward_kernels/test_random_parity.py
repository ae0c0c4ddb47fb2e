"""Seeded random option combinations: fused kernels against the reference.

The other kernel tests vary one option at a time; these draw whole calls at random (bins and
their number, temperature, strided inputs, -inf logits, every term and reduction, weights of 0,
pairs with duplicates and self-pairs, several G) so interactions between options are exercised
too.  Gradients are compared with a tolerance scaled by the largest gradient entry: where a
softmax is nearly a point mass the reference's gradient at the peak is a cancellation of
large terms, and the two sides may differ by a few ulps of those terms.  The same holds for
bins of large magnitude (mean and std gradients are differences of terms of the size of the bin
values): there ``rubric_loss`` is also compared with the reference in float64, and the kernel may
be off the float64 gradient by a few times the float32 reference's own error (seed 13, bins 10.5
and 13.25: the float32 reference is 2.2e-6 off on CPU, and on the H200 the two float32 sides
differed by 2.6e-6 where 2.5e-6 was allowed).
"""

import random

import pytest
import torch
from kernel_helpers import run_with_grads

import zreward_kernels as zk

N_CALLS = 24


def _close(actual, expected, name, tol=5e-5):
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    torch.testing.assert_close(a, e, atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _close_grad(actual, expected, x, exact=None):
    """``actual`` against the float32 reference's ``expected``; with the float64 reference's
    ``exact``, against that instead, allowing 4x the float32 reference's own error."""
    a = (actual if actual is not None else torch.zeros_like(x)).detach().float().cpu()
    e = (expected if expected is not None else torch.zeros_like(x)).detach().float().cpu()
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    atol = 2e-6 * scale
    if exact is not None:
        ex = exact.detach().double().cpu()
        ref_err = float((e.double() - ex).abs().max()) if e.numel() else 0.0
        atol = max(atol, 4 * ref_err)
        a, e = a.double(), ex
    torch.testing.assert_close(a, e, atol=atol, rtol=5e-5, msg=lambda m: f"grad: {m}")


def _bins(rnd, k):
    if k == 9 and rnd.random() < 0.6:
        return None
    return tuple(sorted(rnd.sample([v * 0.25 for v in range(-40, 80)], k)))


def _strided(x, rnd, gen):
    if rnd.random() < 0.3:  # every other element of a wider tensor: non-contiguous last dimension
        big = torch.randn(x.shape[:-1] + (2 * x.shape[-1],), generator=gen)
        big[..., ::2] = x
        return big[..., ::2]
    return x


@pytest.mark.parametrize("seed", range(N_CALLS))
def test_rubric_loss_random_calls(kdev, seed):
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    k = rnd.choice([9, 9, 2, 5, 11, 17])
    n = rnd.choice([1, 3, 64, 130])
    d = rnd.choice([None, 1, 3])
    shape = (n, k) if d is None else (n, d, k)
    rows = n * (d or 1)
    x = torch.randn(shape, generator=gen) * rnd.choice([0.1, 2.0, 20.0])
    if rnd.random() < 0.2:
        x.view(-1, k)[0, 0] = float("-inf")
    x = _strided(x, rnd, gen)
    kw = dict(reduction=rnd.choice(["mean", "sum", "none"]), weight_ce=rnd.choice([0.0, 1.0, 0.3]),
              weight_kl=rnd.choice([0.0, 1.0, 2.5]), weight_pair=rnd.choice([0.0, 1.0, 0.7]),
              temperature=rnd.choice([1.0, 0.5, 3.0]))
    bins = _bins(rnd, k)
    if bins is not None:
        kw["bin_values"] = bins
    ce = rnd.choice([None, "target", "target_probs"])
    kl = rnd.choice([None, "teacher_logits", "teacher_probs"])
    with_pairs = rnd.random() < 0.6 or not (ce or kl)
    if ce == "target":
        t = torch.randint(0, k, shape[:-1], generator=gen)
        t.view(-1)[:: rnd.choice([2, 3, 5])] = -100
        kw["target"] = t
    elif ce == "target_probs":
        tp = torch.softmax(torch.randn(shape, generator=gen) * 3, -1)
        tp[..., 0] = 0.0
        kw["target_probs"] = tp / tp.sum(-1, keepdim=True)
    if kl == "teacher_logits":
        kw["teacher_logits"] = torch.randn(shape, generator=gen) * 2
    elif kl == "teacher_probs":
        kw["teacher_probs"] = torch.softmax(torch.randn(shape, generator=gen) * 3, -1)
    if with_pairs:
        p = rnd.choice([1, 7, 200])
        pairs = torch.randint(0, rows, (p, 2), generator=gen)
        pairs[0, 1] = pairs[0, 0]  # a self-pair: mu_a - mu_b = 0 exactly
        kw["pairs"], kw["pair_gaps"] = pairs, torch.randn(p, generator=gen)
    kw = {key: (v.to(kdev) if torch.is_tensor(v) else v) for key, v in kw.items()}
    x = x.to(kdev)
    r_out, r_grad = run_with_grads(lambda t: zk.rubric_loss(t, backend="reference", **kw), x, upstream_seed=seed)
    k_out, k_grad = run_with_grads(lambda t: zk.rubric_loss(t, backend="triton", **kw), x, upstream_seed=seed)
    kw64 = {key: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for key, v in kw.items()}
    _, e_grad = run_with_grads(lambda t: zk.rubric_loss(t, backend="reference", **kw64), x.double(),
                               upstream_seed=seed)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        _close(a, b, name)
    _close_grad(k_grad, r_grad, x, exact=e_grad)


@pytest.mark.parametrize("seed", range(N_CALLS))
def test_gdso_loss_random_calls(kdev, seed):
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    k = rnd.choice([9, 9, 2, 5, 13])
    bins = zk.BIN_VALUES if k == 9 else tuple(sorted(rnd.sample([v * 0.5 for v in range(-20, 40)], k)))
    p, g = rnd.choice([1, 2, 5, 40]), rnd.choice([1, 2, 3, 7, 8, 20, 64])
    x = _strided(torch.randn(p, 2, g, k, generator=gen) * rnd.choice([0.3, 2.0, 10.0]), rnd, gen)
    scores = torch.tensor(bins)[torch.randint(0, k, (p, 2), generator=gen)].float()
    kw = dict(lambda_pt=rnd.choice([1.0, 0.0, 0.5]), lambda_pw=rnd.choice([1.0, 0.0, 2.0]),
              alpha_pt=rnd.choice([1.0, 0.0, 0.3]), alpha_pw=rnd.choice([1.0, 0.0, 3.0]),
              eps=rnd.choice([1e-6, 1e-3, 0.0]), temperature=rnd.choice([1.0, 0.7, 2.0]), bin_values=bins)
    x, scores = x.to(kdev), scores.to(kdev)
    r_out, r_grad = run_with_grads(lambda t: zk.gdso_loss(t, scores, backend="reference", **kw), x, upstream_seed=seed)
    k_out, k_grad = run_with_grads(lambda t: zk.gdso_loss(t, scores, backend="triton", **kw), x, upstream_seed=seed)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        if name == "advantage":  # (r - mean) / (std + eps) amplifies the means' last-ulp differences where std is tiny
            rw = r_out.reward.float().cpu()
            spread = (rw.std(-1, keepdim=True) if g > 1 else torch.zeros_like(rw[..., :1])).expand_as(rw)
            keep = spread > 1e-4
            _close(a.cpu()[keep], b.cpu()[keep], name, tol=2e-3)
            assert bool(torch.isfinite(a).all()), "advantage"
        else:
            _close(a, b, name)
    _close_grad(k_grad, r_grad, x)
