"""gdso_loss: kernel vs reference, and both vs a direct loop transcription of SPEC section 3."""

import math

import pytest
import torch
from kernel_helpers import assert_close, run_with_grads

from zreward_kernels import BIN_VALUES, gdso_loss


def _spec_loop(logits, scores, bins, lambda_pt=1.0, lambda_pw=1.0, alpha_pt=1.0, alpha_pw=1.0, eps=1e-6, tau=1.0):
    """SPEC section 3 written out with Python loops over pairs, sides and samples (float64)."""
    P, _, G, K = logits.shape
    R = bins[-1] - bins[0]
    out = {k: torch.zeros(P, 2, G, dtype=torch.float64) for k in ("mean", "r_pt", "r_pw", "r", "adv")}
    ce_p, pw_p = [], []
    for p in range(P):
        q = {}
        for j in range(2):
            for i in range(G):
                z = [float(logits[p, j, i, k]) / tau for k in range(K)]
                m = max(z)
                ex = [math.exp(v - m) for v in z]
                s = sum(ex)
                q[j, i] = [v / s for v in ex]
                out["mean"][p, j, i] = sum(q[j, i][k] * bins[k] for k in range(K))
        s_ = [float(scores[p, 0]), float(scores[p, 1])]
        ce = 0.0
        pw = 0.0
        for j in range(2):
            jb = 1 - j
            gap = s_[j] - s_[jb]
            b = min(range(K), key=lambda k: abs(bins[k] - s_[j]))
            for i in range(G):
                mu = float(out["mean"][p, j, i])
                out["r_pt"][p, j, i] = 1 - abs(mu - s_[j]) / R
                tot = sum(abs((mu - float(out["mean"][p, jb, k])) - gap) for k in range(G))
                out["r_pw"][p, j, i] = 1 - tot / (G * R)
                out["r"][p, j, i] = lambda_pt * out["r_pt"][p, j, i] + lambda_pw * out["r_pw"][p, j, i]
                ce += -math.log(q[j, i][b])
                pw += tot
            rs = [float(out["r"][p, j, i]) for i in range(G)]
            mean_r = sum(rs) / G
            if G > 1:
                std_r = math.sqrt(sum((v - mean_r) ** 2 for v in rs) / (G - 1))
                for i in range(G):
                    out["adv"][p, j, i] = (rs[i] - mean_r) / (std_r + eps)
        ce_p.append(ce / (2 * G))
        pw_p.append(pw / (2 * G * G * R))
    loss = sum(alpha_pt * c + alpha_pw * w for c, w in zip(ce_p, pw_p)) / P
    return out, torch.tensor(ce_p), torch.tensor(pw_p), loss


def _random_scores(P, gen, bins=BIN_VALUES):
    idx = torch.randint(0, len(bins), (P, 2), generator=gen)
    return torch.tensor(bins)[idx].float()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("G", [1, 2, 3, 8])
def test_matches_loop_transcription_of_spec(kdev, backend, G):
    gen = torch.Generator().manual_seed(G)
    P = 4
    x = torch.randn(P, 2, G, 9, generator=gen) * 2
    scores = _random_scores(P, gen)
    scores[0] = torch.tensor([3.0, 3.0])  # a tie: gap 0
    kw = dict(lambda_pt=0.6, lambda_pw=1.4, alpha_pt=0.8, alpha_pw=1.7, eps=1e-6, temperature=1.3)
    dev = kdev if backend == "triton" else "cpu"
    out = gdso_loss(x.to(dev), scores.to(dev), backend=backend, **kw)
    spec, ce, pw, loss = _spec_loop(x.double(), scores.double(), BIN_VALUES, kw["lambda_pt"], kw["lambda_pw"],
                                    kw["alpha_pt"], kw["alpha_pw"], kw["eps"], kw["temperature"])
    assert_close(out.mean, spec["mean"], atol=1e-5)
    assert_close(out.reward_pt, spec["r_pt"], atol=1e-5)
    assert_close(out.reward_pw, spec["r_pw"], atol=1e-5)
    assert_close(out.reward, spec["r"], atol=1e-5)
    assert_close(out.advantage, spec["adv"], atol=2e-4, rtol=2e-4)
    assert_close(out.ce, ce, atol=1e-5)
    assert_close(out.pw, pw, atol=1e-5)
    assert abs(float(out.loss) - loss) < 1e-5


@pytest.mark.parametrize("G", [1, 2, 5, 8, 16, 33])
@pytest.mark.parametrize("P", [1, 3, 17])
def test_kernel_matches_reference(kdev, G, P):
    gen = torch.Generator().manual_seed(100 * G + P)
    x = (torch.randn(P, 2, G, 9, generator=gen) * 2).to(kdev)
    scores = _random_scores(P, gen).to(kdev)
    kw = dict(lambda_pt=0.5, lambda_pw=1.5, alpha_pt=1.2, alpha_pw=0.3)
    r_out, r_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="reference", **kw), x, outputs=[0])
    k_out, k_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="triton", **kw), x, outputs=[0])
    for name, a, b in zip(r_out._fields, k_out, r_out):
        tol = 5e-4 if name == "advantage" else 2e-5
        assert_close(a, b, atol=tol, rtol=tol, name=name)
        assert a.dtype == torch.float32
        assert a.requires_grad == (name == "loss"), name
    assert_close(k_grad, r_grad, atol=1e-6, rtol=1e-5, name="grad")


@pytest.mark.parametrize("G", [3, 4, 5, 12, 33])
def test_custom_bins_and_equal_rewards(kdev, G):
    bins = (1.0, 2.0, 3.0, 4.0, 5.0)
    x = torch.randn(1, 1, 1, 5).expand(3, 2, G, 5).contiguous().to(kdev)
    scores = torch.tensor([[3.0, 3.0], [5.0, 1.0], [2.0, 4.0]], device=kdev)
    r = gdso_loss(x, scores, bin_values=bins, backend="reference")
    k = gdso_loss(x, scores, bin_values=bins, backend="triton")
    for name, a, b in zip(r._fields, k, r):
        assert_close(a, b, atol=2e-5, name=name)
    # identical samples within a side: all-equal rewards give advantage exactly 0
    assert float(k.advantage.abs().max()) == 0.0
    for backend in ("reference", "triton"):  # also with eps = 0 (not 0/0 = NaN)
        assert float(gdso_loss(x, scores, bin_values=bins, eps=0.0, backend=backend).advantage.abs().max()) == 0.0


@pytest.mark.parametrize("lam", [1.0, 0.7])
@pytest.mark.parametrize("G", [3, 8, 20])
def test_rewards_flat_in_mu_give_no_rounding_noise_advantages(kdev, G, lam):
    # With lambda_pt == lambda_pw the reward of side w is flat in mu wherever mu_w < s_w and every
    # predicted gap mu_w - mu_l exceeds the annotated one: the +1/R of r_pt and the -G/(G R) of r_pw
    # cancel.  Such a group's rewards are equal in exact arithmetic, so its advantages must be ~0,
    # not float32 rounding noise divided by (std + eps) (which is ~0.1 with eps = 1e-6).
    gen = torch.Generator().manual_seed(G)
    bins = torch.tensor(BIN_VALUES)
    P = 16
    mu_w = 3.3 + 0.4 * torch.rand(P, G, generator=gen)  # below s_w = 4
    mu_l = 1.8 + 0.4 * torch.rand(P, G, generator=gen)  # gap over s_l = 3 larger than the annotated 1
    x = torch.stack([-4 * (bins - mu_w[..., None]) ** 2, -4 * (bins - mu_l[..., None]) ** 2], 1).to(kdev)
    scores = torch.tensor([[4.0, 3.0]]).repeat(P, 1).to(kdev)
    for backend in ("reference", "triton"):
        out = gdso_loss(x, scores, lambda_pt=lam, lambda_pw=lam, backend=backend)
        mw, ml = out.mean[:, 0].cpu(), out.mean[:, 1].cpu()
        assert bool((mw < 4).all()) and bool((mw.amin(1) - ml.amax(1) > 1).all())  # inside the flat region
        assert float(out.reward[:, 0].std(1).max()) < 1e-6, backend
        assert float(out.advantage[:, 0].abs().max()) < 1e-4, backend
        assert float(out.advantage[:, 1].abs().amax(1).min()) > 0.5, backend  # side l is not flat: real spread
        if backend == "triton":
            # the kernel's float32 reward is affine in mu with a slope of exactly 0 here (also for a
            # lambda whose product with G rounds): equal rewards, advantage exactly 0
            assert bool((out.reward[:, 0] == out.reward[:, 0, :1]).all())
            assert float(out.advantage[:, 0].abs().max()) == 0.0


def test_upstream_gradient_scales(kdev):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, 4, 9, generator=gen).to(kdev).requires_grad_(True)
    scores = _random_scores(6, gen).to(kdev)
    out = gdso_loss(x, scores, backend="triton")
    (out.loss * 3.5).backward()
    g1 = x.grad.clone()
    x.grad = None
    gdso_loss(x, scores, backend="triton").loss.backward()
    assert_close(g1, 3.5 * x.grad, atol=1e-6, rtol=1e-5)


def test_off_grid_scores_snap_when_not_validated(kdev):
    x = torch.randn(2, 2, 3, 9).to(kdev)
    off = torch.tensor([[4.4, 2.1], [3.0, 1.0]], device=kdev)
    snapped = torch.tensor([[4.5, 2.0], [3.0, 1.0]], device=kdev)
    a = gdso_loss(x, off, backend="triton", validate=False)
    b = gdso_loss(x, snapped, backend="reference")
    assert_close(a.ce, b.ce, atol=1e-5)


def test_outputs_are_independent_and_writable_in_place(kdev):
    """The kernel stores several outputs through one tensor of pointers (per joined value): each
    output holds its own values, is a tensor of its own (changing one in place, which autograd allows
    for these non-differentiable outputs, touches no other output), and the loss's gradient is
    unaffected."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 4, 9, generator=gen).to(kdev).requires_grad_(True)
    scores = _random_scores(3, gen).to(kdev)
    ref = gdso_loss(x.detach(), scores, backend="reference")
    out = gdso_loss(x, scores, backend="triton")
    for name, a, b in zip(out._fields[1:], out[1:], ref[1:]):
        assert not a.requires_grad, name
        assert_close(a, b, atol=2e-5, rtol=1e-5, name=name)
    before = [t.clone() for t in out[1:]]
    for i, t in enumerate(out[1:]):  # one output at a time: the others keep their values
        t.add_(100.0)
        for j, (u, b) in enumerate(zip(out[1:], before)):
            assert torch.equal(u, b + 100.0 if j <= i else b), (out._fields[1 + i], out._fields[1 + j])
    out.loss.backward()
    g = x.grad.clone()
    x.grad = None
    gdso_loss(x, scores, backend="triton").loss.backward()
    assert torch.equal(g, x.grad)


def test_empty_pairs(kdev):
    x = torch.zeros(0, 2, 4, 9, device=kdev, requires_grad=True)
    out = gdso_loss(x, torch.zeros(0, 2, device=kdev), backend="triton")
    assert float(out.loss.detach()) == 0.0 and out.advantage.shape == (0, 2, 4)
    out.loss.backward()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_fp32_reference(dtype):
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(512, 2, 8, 9, generator=gen) * 2).to(dtype).cuda()
    scores = _random_scores(512, gen).cuda()
    r_out, r_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="reference"), x.float(), outputs=[0])
    k_out, k_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="triton"), x, outputs=[0])
    for name, a, b in zip(r_out._fields, k_out, r_out):
        tol = 2e-3 if name == "advantage" else 1e-4
        assert_close(a, b, atol=tol, rtol=tol, name=name)
    assert k_grad.dtype == dtype
    assert_close(k_grad, r_grad, atol=1e-4, rtol=2e-2, name="grad")
