"""score_stats: the Triton kernel against the reference, values and gradients."""

import pytest
import torch
from kernel_helpers import assert_close, run_with_grads

from zreward_kernels import score_stats


def _both(x, **kw):
    r_out, r_grad = run_with_grads(lambda t: score_stats(t, backend="reference", **kw), x.float())
    k_out, k_grad = run_with_grads(lambda t: score_stats(t, backend="triton", **kw), x)
    return r_out, r_grad, k_out, k_grad


@pytest.mark.parametrize("shape", [(1, 9), (7, 9), (129, 9), (3, 4, 9), (0, 9)])
def test_matches_reference_fp32(kdev, shape):
    torch.manual_seed(1)
    x = (torch.randn(shape) * 3).to(kdev)
    r_out, r_grad, k_out, k_grad = _both(x)
    for name, a, b in zip(("probs", "mean", "std"), k_out, r_out):
        assert_close(a, b, atol=2e-6, rtol=1e-5, name=name)
        assert a.dtype == torch.float32 and a.shape == b.shape
    if x.numel():
        assert_close(k_grad, r_grad, atol=2e-6, rtol=1e-5, name="grad")
        assert k_grad.dtype == x.dtype


@pytest.mark.parametrize("bins", [(1.0, 2.0, 3.0, 4.0, 5.0), tuple(float(i) for i in range(11)), (0.0, 0.1, 5.0)])
def test_other_bin_grids_and_temperature(kdev, bins):
    torch.manual_seed(2)
    x = torch.randn(33, len(bins)).to(kdev)
    r_out, r_grad, k_out, k_grad = _both(x, bin_values=bins, temperature=0.7)
    for a, b in zip(k_out, r_out):
        assert_close(a, b, atol=5e-6, rtol=1e-5)
    assert_close(k_grad, r_grad, atol=5e-6, rtol=1e-5)


def test_extreme_logits(kdev):
    x = torch.randn(6, 9)
    x[0] = 1e4
    x[1, :] = -1e4
    x[1, 4] = 1e4  # point mass: std 0, gradient must stay finite
    x[2, :3] = float("-inf")
    x[3] = torch.linspace(-1e4, 1e4, 9)
    x = x.to(kdev)
    r_out, r_grad, k_out, k_grad = _both(x)
    for a, b in zip(k_out, r_out):
        assert torch.isfinite(a).all()
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(k_grad).all()
    assert_close(k_grad, r_grad, atol=1e-5, rtol=1e-5)
    assert float(k_out.std[1].detach()) == 0.0


def test_only_some_outputs_used(kdev):
    x = torch.randn(10, 9).to(kdev)
    for idx in ([0], [1], [2], [1, 2]):
        r = run_with_grads(lambda t: score_stats(t, backend="reference"), x, outputs=idx)[1]
        k = run_with_grads(lambda t: score_stats(t, backend="triton"), x, outputs=idx)[1]
        assert_close(k, r, atol=2e-6, rtol=1e-5, name=str(idx))


def test_does_not_write_into_input(kdev):
    x = torch.randn(20, 9).to(kdev)
    before = x.clone()
    run_with_grads(lambda t: score_stats(t, backend="triton"), x)
    assert torch.equal(x, before)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_fp32_reference(dtype):
    torch.manual_seed(3)
    x = (torch.randn(1000, 4, 9, device="cuda") * 2).to(dtype)
    r_out, r_grad = run_with_grads(lambda t: score_stats(t.float(), backend="reference"), x.float())
    k_out, k_grad = run_with_grads(lambda t: score_stats(t, backend="triton"), x)
    for a, b in zip(k_out, r_out):
        assert_close(a, b, atol=1e-5, rtol=1e-5)  # maths is fp32 on the same (rounded) inputs
    assert k_grad.dtype == dtype
    assert_close(k_grad, r_grad, atol=2e-2, rtol=2e-2)


def test_reference_bf16_against_fp32_reference():
    torch.manual_seed(4)
    x = torch.randn(50, 9).to(torch.bfloat16)
    a = score_stats(x, backend="reference")
    b = score_stats(x.float(), backend="reference")
    for u, w in zip(a, b):
        assert u.dtype == torch.float32
        assert_close(u, w, atol=1e-6, rtol=1e-6)


def test_expanded_upstream_gradients_read_in_place(kdev):
    """``.sum()`` gives stride-0 upstream gradients; the kernel reads them without copying."""
    x = torch.randn(50, 3, 9).to(kdev)
    grads = []
    for be in ("reference", "triton"):
        xx = x.clone().requires_grad_(True)
        s = score_stats(xx, backend=be)
        (s.mean.sum() * 0.5 + s.std.sum() * 2.0 + s.probs[..., 4].sum()).backward()
        grads.append(xx.grad)
    assert_close(grads[1], grads[0], atol=2e-6, rtol=1e-5)
