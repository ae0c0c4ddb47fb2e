"""Helpers shared by the kernel tests."""

import torch


def assert_close(actual, expected, *, atol=1e-5, rtol=1e-5, name=""):
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def run_with_grads(fn, x, upstream_seed=0, outputs=None):
    """Call ``fn(x)``, back-propagate random upstream gradients into the selected outputs.

    Returns ``(output_tuple, x.grad)``.  The upstream gradients are drawn from a fixed seed so the
    same weights are used for every backend.
    """
    xx = x.detach().clone().requires_grad_(True)
    out = fn(xx)
    gen = torch.Generator().manual_seed(upstream_seed)
    total = 0.0
    names = outputs if outputs is not None else range(len(out))
    for i in names:
        t = out[i]
        if not isinstance(t, torch.Tensor):
            continue
        w = torch.randn(t.shape, generator=gen).to(t.device)  # drawn for every output: same weights per backend
        if not t.requires_grad or t.numel() == 0:
            continue
        total = total + (t.float() * w).sum()
    if isinstance(total, torch.Tensor):
        total.backward()
    return out, xx.grad
