"""Self-resetting semaphores of the fused forward kernels (zreward_kernels._workspace): the forward
is one launch with no zero-fill, and the counters are back at zero after every launch."""

import threading

import pytest
import torch
from kernel_helpers import assert_close

import zreward_kernels as zk
from zreward_kernels import _workspace

BINS = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])


def _rubric_case(rows, n_pairs, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 9, generator=g)
    kw = dict(target=torch.randint(0, 9, (rows,), generator=g), teacher_logits=torch.randn(rows, 9, generator=g),
              pairs=torch.randint(0, rows, (n_pairs, 2), generator=g), pair_gaps=torch.randn(n_pairs, generator=g))
    return x, kw


def _check_rubric(kdev, x, kw, reduction):
    kw = {k: v.to(kdev) for k, v in kw.items()}
    xt = x.clone().to(kdev).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    ot = zk.rubric_loss(xt, backend="triton", reduction=reduction, **kw)
    orf = zk.rubric_loss(xr, backend="reference", reduction=reduction, **{k: v.cpu() for k, v in kw.items()})
    ot.loss.backward()
    orf.loss.backward()
    for name in ("loss", "ce", "kl", "pair"):
        assert_close(getattr(ot, name), getattr(orf, name), name=f"{name} ({reduction})")
    assert_close(xt.grad, xr.grad, name=f"grad ({reduction})")
    return ot


def _check_gdso(kdev, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, 2, 8, 9, generator=g)
    scores = BINS[torch.randint(0, 9, (p, 2), generator=g)]
    xt = x.clone().to(kdev).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    a = zk.gdso_loss(xt, scores.to(kdev), backend="triton")
    b = zk.gdso_loss(xr, scores, backend="reference")
    a.loss.backward()
    b.loss.backward()
    assert_close(a.loss, b.loss, name="gdso loss")
    assert_close(xt.grad, xr.grad, name="gdso grad")


def test_counters_are_zero_after_every_launch_and_calls_stay_correct(kdev):
    # sizes change from call to call: a counter left non-zero would skip the last program's
    # reduction (wrong loss) or hand out program ids past the grid (rows never computed)
    for i, (rows, n_pairs) in enumerate([(300, 200), (64, 1), (1000, 700), (5, 3), (300, 200)]):
        for reduction in ("mean", "sum"):
            x, kw = _rubric_case(rows, n_pairs, seed=i)
            _check_rubric(kdev, x, kw, reduction)
            assert _workspace.all_zero()
        _check_gdso(kdev, p=3 + 40 * i, seed=i)
        assert _workspace.all_zero()


def test_pair_counts_need_no_zeroed_buffer(kdev, monkeypatch):
    """With semaphores the per-row pair counts live in a fresh, unzeroed buffer that the row programs
    zero before any pair program adds to it: fill every fresh int32 buffer with garbage to show it."""
    real_empty = torch.empty

    def garbage_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        if t.dtype == torch.int32:
            t.fill_(123456)
        return t

    monkeypatch.setattr(torch, "empty", garbage_empty)
    x, kw = _rubric_case(700, 500, seed=3)
    _check_rubric(kdev, x, kw, "mean")
    _check_rubric(kdev, x, kw, "sum")
    assert _workspace.all_zero()


def test_zero_filled_path_gives_the_same_values(kdev):
    x, kw = _rubric_case(513, 300, seed=5)
    a = _check_rubric(kdev, x, kw, "mean")
    with _workspace.disabled():
        assert _workspace.semaphores(torch.device(kdev)) is None
        b = _check_rubric(kdev, x, kw, "mean")
        _check_gdso(kdev, p=17, seed=5)
    assert torch.equal(a.loss, b.loss)  # the same fixed reduction order either way


def test_semaphores_are_handed_out_per_thread_on_cpu():
    dev = torch.device("cpu")
    mine = _workspace.semaphores(dev)
    assert mine is not None and mine.dtype == torch.int32 and mine.shape == (_workspace.WORDS,)
    assert _workspace.semaphores(dev).data_ptr() == mine.data_ptr()  # the same words on every call
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("w", _workspace.semaphores(dev)))
    t.start()
    t.join()
    assert other["w"].data_ptr() != mine.data_ptr()


@pytest.mark.cuda
def test_many_programs_and_streams_cuda():
    """More programs than the GPU holds at once (the pair programs wait for row programs that took
    their ids earlier, so they are running), on two streams at once, then in a captured graph."""
    x, kw = _rubric_case(1 << 19, 1 << 18, seed=7)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    outs = {}
    for name, s in (("a", s1), ("b", s2)):
        with torch.cuda.stream(s):
            outs[name] = zk.rubric_loss(x.cuda(), validate=False, **{k: v.cuda() for k, v in kw.items()})
    torch.cuda.synchronize()
    ref = zk.rubric_loss(x, backend="reference", **kw)
    for name in outs:
        assert_close(outs[name].loss, ref.loss, atol=1e-5, rtol=1e-5, name=f"stream {name}")
    assert _workspace.all_zero()
    _check_rubric("cuda", x, kw, "mean")
    assert _workspace.all_zero()


def test_first_call_under_inference_mode_then_outside(kdev, monkeypatch):
    """The counter block made by a first call under torch.inference_mode() is a normal tensor:
    later calls outside that mode use it too (an inference tensor would refuse the CPU path's reset)."""
    monkeypatch.setattr(_workspace, "_BLOCKS", {})
    x, kw = _rubric_case(40, 10, seed=11)
    with torch.inference_mode():
        a = zk.rubric_loss(x.to(kdev), backend="triton", **{k: v.to(kdev) for k, v in kw.items()})
    b = zk.rubric_loss(x.to(kdev), backend="triton", **{k: v.to(kdev) for k, v in kw.items()})
    assert torch.equal(a.loss, b.loss) and _workspace.all_zero()
