"""rubric_loss: every term, option and reduction; Triton kernel against the reference."""

import itertools

import pytest
import torch
from kernel_helpers import assert_close, run_with_grads

from zreward_kernels import rubric_loss


def _make(n, d=None, p=0, seed=0, device="cpu", zeros_in_targets=True):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 9) if d is None else (n, d, 9)
    lead = shape[:-1]
    rows = n * (d or 1)
    x = torch.randn(shape, generator=g) * 2
    target = torch.randint(0, 9, lead, generator=g)
    if rows > 2:
        target.view(-1)[::3] = -100
    tp = torch.softmax(torch.randn(shape, generator=g) * 2, -1)
    if zeros_in_targets:
        tp[..., 0] = 0.0
        tp[..., 5] = 0.0
        tp = tp / tp.sum(-1, keepdim=True)
    teacher = torch.randn(shape, generator=g) * 2
    pairs = torch.randint(0, max(rows, 1), (p, 2), generator=g)
    gaps = (torch.randint(-8, 9, (p,), generator=g) * 0.5).float()
    mv = lambda t: t.to(device)  # noqa: E731
    return dict(x=mv(x), target=mv(target), target_probs=mv(tp), teacher_logits=mv(teacher),
                teacher_probs=mv(torch.softmax(teacher, -1)), pairs=mv(pairs), pair_gaps=mv(gaps))


def _compare(x, kw, outputs=None, atol=2e-5, rtol=2e-5):
    r_out, r_grad = run_with_grads(lambda t: rubric_loss(t, backend="reference", **kw), x.float(), outputs=outputs)
    k_out, k_grad = run_with_grads(lambda t: rubric_loss(t, backend="triton", **kw), x, outputs=outputs)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        assert_close(a, b, atol=atol, rtol=rtol, name=name)
        assert a.dtype == torch.float32, name
    if r_grad is not None or k_grad is not None:
        if r_grad is None:
            r_grad = torch.zeros_like(x, dtype=torch.float32)
        if k_grad is None:
            k_grad = torch.zeros_like(x)
        assert k_grad.dtype == x.dtype
        assert_close(k_grad, r_grad, atol=atol, rtol=rtol, name="grad")
    return k_out, k_grad


CE_TERMS = [None, "target", "target_probs"]
KL_TERMS = [None, "teacher_logits", "teacher_probs"]


@pytest.mark.parametrize("ce,kl,pairs", [c for c in itertools.product(CE_TERMS, KL_TERMS, [False, True]) if any(c)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_term_combination(kdev, ce, kl, pairs, reduction):
    data = _make(45, 4, p=37, seed=hash((ce, kl, pairs)) % 1000, device=kdev)
    kw = dict(reduction=reduction, weight_ce=0.7, weight_kl=1.3, weight_pair=0.4)
    if ce:
        kw[ce] = data[ce]
    if kl:
        kw[kl] = data[kl]
    if pairs:
        kw.update(pairs=data["pairs"], pair_gaps=data["pair_gaps"])
    _compare(data["x"], kw)


@pytest.mark.parametrize("output", ["loss", "ce", "kl", "pair", "mean", "std"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_through_each_output(kdev, output, reduction):
    data = _make(30, 3, p=25, seed=7, device=kdev)
    kw = dict(target=data["target"], teacher_logits=data["teacher_logits"], pairs=data["pairs"],
              pair_gaps=data["pair_gaps"], reduction=reduction, weight_kl=0.5)
    idx = ["loss", "ce", "kl", "pair", "mean", "std"].index(output)
    _compare(data["x"], kw, outputs=[idx])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_and_custom_bins(kdev, temperature):
    bins = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 11, generator=g).to(kdev)
    t = torch.randint(0, 11, (50,), generator=g).to(kdev)
    teacher = torch.randn(50, 11, generator=g).to(kdev)
    pairs = torch.randint(0, 50, (20, 2), generator=g).to(kdev)
    gaps = torch.randn(20, generator=g).to(kdev)
    kw = dict(target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps, bin_values=bins, temperature=temperature)
    _compare(x, kw)


@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 300])
def test_sizes_around_the_tile(kdev, n):
    data = _make(n, p=max(n // 2, 1), seed=n, device=kdev)
    _compare(data["x"], dict(target=data["target"], teacher_probs=data["teacher_probs"],
                             pairs=data["pairs"], pair_gaps=data["pair_gaps"]))


def test_many_pairs_across_tiles_and_duplicates(kdev):
    data = _make(40, p=0, seed=11, device=kdev)
    g = torch.Generator().manual_seed(5)
    pairs = torch.randint(0, 40, (300, 2), generator=g)
    pairs[:10] = torch.tensor([3, 4])  # the same pair many times
    pairs[10:15, 1] = pairs[10:15, 0]  # self-pairs (mu_a - mu_b = 0)
    gaps = torch.randn(300, generator=g)
    gaps[10:15] = 0.0  # |0 - 0| = 0: sign 0 on both sides
    _compare(data["x"], dict(pairs=pairs.to(kdev), pair_gaps=gaps.to(kdev)))


def test_no_pairs_tensor_with_zero_rows(kdev):
    data = _make(10, seed=2, device=kdev)
    empty = torch.zeros(0, 2, dtype=torch.long, device=kdev)
    out, _ = _compare(data["x"], dict(target=data["target"], pairs=empty, pair_gaps=torch.zeros(0, device=kdev)))
    assert float(out.pair.detach()) == 0.0


def test_all_rows_ignored(kdev):
    data = _make(9, seed=3, device=kdev)
    t = torch.full((9,), -100, device=kdev)
    out, grad = _compare(data["x"], dict(target=t, teacher_logits=data["teacher_logits"]))
    assert float(out.ce.detach()) == 0.0 and torch.isfinite(out.loss)


def test_custom_ignore_index(kdev):
    data = _make(20, seed=4, device=kdev)
    t = data["target"].clone()
    t[t == -100] = 7
    t[:4] = 7
    _compare(data["x"], dict(target=t, ignore_index=7))


def test_empty_batch(kdev):
    x = torch.zeros(0, 4, 9, device=kdev)
    t = torch.zeros(0, 4, dtype=torch.long, device=kdev)
    for red in ("mean", "sum", "none"):
        out, _ = _compare(x, dict(target=t, reduction=red))
        if red != "none":
            assert float(out.loss.detach()) == 0.0


def test_extreme_and_minus_inf_logits(kdev):
    data = _make(12, seed=6, device=kdev)
    x = data["x"].clone()
    x[0] = 1e4
    x[1] = -1e4
    x[2, :4] = float("-inf")
    x[3] = torch.linspace(-1e4, 1e4, 9)
    t = torch.full((12,), 6, device=kdev)  # finite logit at bin 6 in every row
    teacher = data["teacher_logits"].clone()
    teacher[2, :4] = float("-inf")  # the teacher puts no mass where the student cannot (else KL = inf)
    out, grad = _compare(x, dict(target=t, teacher_logits=teacher, pairs=data["pairs"][:0],
                                 pair_gaps=data["pair_gaps"][:0]), atol=1e-4)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_does_not_write_into_inputs(kdev):
    data = _make(20, p=10, seed=8, device=kdev)
    copies = {k: v.clone() for k, v in data.items()}
    kw = {k: v for k, v in data.items() if k not in ("x", "target_probs", "teacher_probs")}
    run_with_grads(lambda t: rubric_loss(t, backend="triton", **kw), data["x"])
    for k, v in data.items():
        assert torch.equal(v, copies[k]), k


def test_deterministic(kdev):
    data = _make(300, 4, p=500, seed=9, device=kdev)
    kw = dict(target=data["target"], teacher_logits=data["teacher_logits"], pairs=data["pairs"],
              pair_gaps=data["pair_gaps"])
    a, ga = run_with_grads(lambda t: rubric_loss(t, backend="triton", **kw), data["x"])
    b, gb = run_with_grads(lambda t: rubric_loss(t, backend="triton", **kw), data["x"])
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    assert torch.equal(ga, gb)


def test_no_grad_forward(kdev):
    data = _make(20, p=5, seed=10, device=kdev)
    with torch.no_grad():
        a = rubric_loss(data["x"], target=data["target"], pairs=data["pairs"], pair_gaps=data["pair_gaps"],
                        backend="triton")
    b = rubric_loss(data["x"], target=data["target"], pairs=data["pairs"], pair_gaps=data["pair_gaps"],
                    backend="reference")
    assert_close(a.loss, b.loss)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_fp32_reference(dtype):
    data = _make(2000, 4, p=3000, seed=12, device="cuda")
    kw = dict(target=data["target"], teacher_logits=data["teacher_logits"].to(dtype), pairs=data["pairs"],
              pair_gaps=data["pair_gaps"])
    x = data["x"].to(dtype)
    r_out, r_grad = run_with_grads(
        lambda t: rubric_loss(t, backend="reference", **{**kw, "teacher_logits": kw["teacher_logits"].float()}),
        x.float())
    k_out, k_grad = run_with_grads(lambda t: rubric_loss(t, backend="triton", **kw), x)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        assert_close(a, b, atol=1e-4, rtol=1e-4, name=name)
    assert k_grad.dtype == dtype
    assert_close(k_grad, r_grad, atol=1e-2, rtol=2e-2, name="grad")


def test_expanded_upstream_gradients(kdev):
    data = _make(40, 2, p=30, seed=13, device=kdev)
    kw = dict(target=data["target"], pairs=data["pairs"], pair_gaps=data["pair_gaps"])
    grads = []
    for be in ("reference", "triton"):
        xx = data["x"].clone().requires_grad_(True)
        out = rubric_loss(xx, backend=be, **kw)
        (out.loss + out.mean.sum() * 0.3 + out.std.sum() * 0.7).backward()
        grads.append(xx.grad)
    assert_close(grads[1], grads[0], atol=2e-6, rtol=1e-5)
