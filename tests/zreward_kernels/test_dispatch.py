"""Backend choice, the ZREWARD_BACKEND variable and backend_info()."""

import pytest
import torch

import zreward_kernels as zk
from zreward_kernels._triton_utils import HAS_TRITON


def test_cpu_auto_uses_reference_and_reports_it():
    zk.score_stats(torch.randn(3, 9))
    info = zk.backend_info()
    assert info["last_backend"]["score_stats"] == "reference"
    for key in ("torch_version", "triton_available", "triton_interpret", "cuda_available", "env_backend"):
        assert key in info
    from zreward_kernels._tuning import CONFIGS, override

    assert info["kernel_configs"] == CONFIGS and info["kernel_configs"] is not CONFIGS
    with override("gdso_fwd", PAIRS=4):
        assert zk.backend_info()["kernel_configs"]["gdso_fwd"]["PAIRS"] == 4  # the configuration in force
    from zreward_kernels import _workspace

    assert info["self_resetting_counters"] is True
    with _workspace.disabled():
        assert zk.backend_info()["self_resetting_counters"] is False


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_explicit_triton_records_backend(kdev):
    zk.rubric_loss(torch.randn(5, 9, device=kdev), target=torch.zeros(5, dtype=torch.long, device=kdev),
                   backend="triton")
    assert zk.backend_info()["last_backend"]["rubric_loss"] == "triton"


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' was requested but cannot run"):
        zk.score_stats(torch.randn(3, 9), backend="triton")


def test_explicit_triton_rejects_float64(kdev):
    with pytest.raises(TypeError, match="float64 inputs are supported by the reference backend only"):
        zk.score_stats(torch.randn(3, 9, dtype=torch.float64, device=kdev), backend="triton")


def test_gdso_group_limit_raises_when_forced_and_falls_back_on_auto(kdev):
    x = torch.randn(1, 2, 65, 9, device=kdev)
    s = torch.tensor([[3.0, 2.0]], device=kdev)
    with pytest.raises(RuntimeError, match="exceeds the kernel's limit"):
        zk.gdso_loss(x, s, backend="triton")
    out = zk.gdso_loss(x, s)
    assert zk.backend_info()["last_backend"]["gdso_loss"] == "reference"
    assert out.advantage.shape == (1, 2, 65)


def test_env_variable_forces_backend(monkeypatch, kdev):
    monkeypatch.setenv("ZREWARD_BACKEND", "reference")
    zk.score_stats(torch.randn(3, 9, device=kdev))
    assert zk.backend_info()["last_backend"]["score_stats"] == "reference"
    assert zk.backend_info()["env_backend"] == "reference"
    monkeypatch.setenv("ZREWARD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ZREWARD_BACKEND must be one of"):
        zk.score_stats(torch.randn(3, 9))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_torch_func_transforms_take_the_reference_path(kdev):
    """vmap / grad over an op: the fused path's autograd.Functions have no functorch rules (torch
    raised "it must override the setup_context staticmethod" for every CUDA call under a transform),
    so auto picks the reference there and an explicit backend="triton" says why it cannot run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 9, generator=g).to(kdev)
    t = torch.randint(0, 9, (4, 3), generator=g).to(kdev)
    got = torch.func.vmap(lambda a: zk.score_stats(a).mean)(x)
    assert zk.backend_info()["last_backend"]["score_stats"] == "reference"
    torch.testing.assert_close(got, zk.score_stats(x, backend="reference").mean)
    grad = torch.func.grad(lambda a: zk.rubric_loss(a, target=t).loss)(x)
    assert zk.backend_info()["last_backend"]["rubric_loss"] == "reference"
    xr = x.clone().requires_grad_(True)
    zk.rubric_loss(xr, target=t, backend="reference").loss.backward()
    torch.testing.assert_close(grad, xr.grad)
    with pytest.raises(RuntimeError, match=r"backend='triton' was requested but cannot run: torch\.func transforms"):
        torch.func.vmap(lambda a: zk.score_stats(a, backend="triton").mean)(x)
    # outside a transform the fused path stays the choice where it runs
    zk.score_stats(x, backend="triton")
    assert zk.backend_info()["last_backend"]["score_stats"] == "triton"


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_second_derivatives_need_the_reference(kdev):
    """The fused backward computes its gradient in a kernel, outside autograd: create_graph=True through it
    raises instead of silently leaving out the op's share of a second derivative (a gradient penalty on
    the logits summed with another term lost the fused term's part).  The reference is differentiable
    twice; a plain backward and a checkpointed one are unaffected."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 9, generator=g).to(kdev)
    t = torch.randint(0, 9, (4, 3), generator=g).to(kdev)
    scores = torch.full((2, 2), 3.0, device=kdev)
    ops = {
        "score_stats": lambda a, be: zk.score_stats(a, backend=be).mean.sum(),
        "rubric_loss": lambda a, be: zk.rubric_loss(a, target=t, backend=be).loss,
        "gdso_loss": lambda a, be: zk.gdso_loss(a.reshape(2, 2, 3, 9), scores, backend=be).loss,
    }
    for name, f in ops.items():
        xt = x.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match=f"{name}: the fused path is differentiable once.*backend='reference'"):
            torch.autograd.grad(f(xt, "triton") + (xt ** 3).sum(), xt, create_graph=True)
        xr = x.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(f(xr, "reference"), xr, create_graph=True)
        (hr,) = torch.autograd.grad((gr ** 2).sum(), xr)
        assert float(hr.abs().sum()) > 0, name
        xt = x.clone().requires_grad_(True)
        f(xt, "triton").backward()
        xc = x.clone().requires_grad_(True)
        checkpoint(f, xc, "triton", use_reentrant=True).backward()
        torch.testing.assert_close(xc.grad, xt.grad)
        torch.testing.assert_close(xt.grad, torch.autograd.grad(f(xr, "reference"), xr)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_auto_uses_triton():
    zk.score_stats(torch.randn(3, 9, device="cuda"))
    assert zk.backend_info()["last_backend"]["score_stats"] == "triton"


def test_launch_device_switches_only_to_a_cuda_tensors_other_device(monkeypatch):
    """Triton launches on the current CUDA device: a call on another device's tensors switches to
    that device for the call; the usual case (and CPU tensors) switches nothing."""
    from types import SimpleNamespace

    from zreward_kernels._dispatch import _NO_SWITCH, launch_device

    assert launch_device(torch.zeros(2)) is _NO_SWITCH
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    same = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    other = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=1))
    assert launch_device(same) is _NO_SWITCH
    ctx = launch_device(other)
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_runtime_loop_bound_runs_on_this_triton(kdev):
    """The fused forwards end with `for start in range(0, nprog, BLOCK_RED)` over a runtime scalar.
    Triton 3.6's interpreter (torch 2.11's) converted that scalar with int() of a 1-element array,
    which numpy >= 2.4 rejects; _triton_utils squeezes it there.  Sums 0..n-1 in steps of 4."""
    from zreward_kernels._triton_utils import tl, triton

    @triton.jit
    def _strided_sum(OUT, n, STEP: tl.constexpr):
        acc = tl.zeros([STEP], tl.int32)
        for start in range(0, n, STEP):
            idx = start + tl.arange(0, STEP)
            acc += tl.where(idx < n, idx, 0)
        tl.store(OUT, tl.sum(acc, 0))

    for n in (1, 7, 8, 13):
        out = torch.zeros(1, dtype=torch.int32, device=kdev)
        _strided_sum[(1,)](out, n, STEP=4)
        assert int(out) == n * (n - 1) // 2


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_interpreter_index_fix_wraps_only_the_unsqueezed_conversion(monkeypatch):
    import numpy as np
    from triton.runtime import interpreter as ti

    from zreward_kernels._triton_utils import _squeeze_interpreter_scalar_index

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Handle:
        data = np.array([5], dtype=np.int32)  # what Triton 3.6 passes: a 1-D one-element array

    def unsqueezed(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    class T:
        handle = Handle()

    monkeypatch.setattr(ti, "_patch_lang_tensor", unsqueezed)
    assert _squeeze_interpreter_scalar_index() is True
    assert _squeeze_interpreter_scalar_index() is False  # applied once
    ti._patch_lang_tensor(T, Scope())
    assert range(10)[T()] == 5  # __index__ of a one-element array, on any numpy version

    def squeezed(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(ti, "_patch_lang_tensor", squeezed)
    assert _squeeze_interpreter_scalar_index() is False and ti._patch_lang_tensor is squeezed


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_fused_calls_without_a_gradient_skip_autograd(kdev, monkeypatch):
    """Host path: a fused call with nothing to differentiate (no_grad, or logits that do not require
    grad) launches its kernel without an autograd.Function (whose wrapping of the outputs costs host
    time per call), and an eager ``gdso_loss`` with a gradient takes the one-output Function; the
    values are the reference's either way."""
    from zreward_kernels import gdso, rubric

    def refuse(*_a, **_k):
        raise AssertionError("autograd.Function used")

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, generator=gen).to(kdev)
    xg = torch.randn(2, 2, 3, 9, generator=gen).to(kdev)
    scores = torch.tensor([[4.0, 2.5], [1.0, 1.0]], device=kdev)
    tgt = torch.tensor([0, 3, 8, 2, 2, 1], device=kdev)
    calls = [
        (lambda t: zk.score_stats(t, backend="triton"), lambda t: zk.score_stats(t, backend="reference"), x),
        (lambda t: zk.rubric_loss(t, target=tgt, backend="triton"),
         lambda t: zk.rubric_loss(t, target=tgt, backend="reference"), x),
        (lambda t: zk.gdso_loss(t, scores, backend="triton"), lambda t: zk.gdso_loss(t, scores, backend="reference"),
         xg),
    ]
    with monkeypatch.context() as m:
        for fn in (rubric._ScoreStatsFn, rubric._RubricLossFn, gdso._GDSOFn, gdso._GDSOLossFn):
            m.setattr(fn, "apply", refuse)
        for fused, reference, t in calls:
            want = reference(t)
            for got in (fused(t), _no_grad(fused, t.clone().requires_grad_(True))):
                for name, a, b in zip(want._fields, got, want):
                    assert not a.requires_grad, name
                    tol = 5e-4 if name == "advantage" else 2e-5  # (divided by a group's std + eps, as in test_gdso)
                    torch.testing.assert_close(a, b, atol=tol, rtol=max(tol, 1e-4), msg=name)
    xr = xg.clone().requires_grad_(True)
    with monkeypatch.context() as m:
        m.setattr(gdso._GDSOFn, "apply", refuse)  # the many-output Function is for torch.compile only
        out = zk.gdso_loss(xr, scores, backend="triton")
    assert out.loss.requires_grad and not any(t.requires_grad for t in out[1:])
    out.loss.backward()
    assert xr.grad is not None and xr.grad.shape == xr.shape


def _no_grad(fn, t):
    with torch.no_grad():
        return fn(t)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_forward_mode_ad_takes_the_reference_path(kdev, monkeypatch):
    """Dual tensors (``torch.autograd.forward_ad``): the fused kernels read only the primal values and
    their autograd.Functions have no jvp, so a fused call raised torch's "must implement the jvp
    function", or -- where it ran without an autograd.Function (nothing to differentiate backwards;
    the restricted head without gradients) -- returned outputs with no tangent at all.  Auto picks the
    reference (and the matrix product for the head), whose tangents are torch.func.jvp's; an explicit
    backend="triton" says why it cannot run."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 3, 9, generator=g).to(kdev)
    tx = torch.randn(2, 2, 3, 9, generator=g).to(kdev)
    tgt = torch.randint(0, 9, (2, 2, 3), generator=g).to(kdev)
    scores = torch.tensor([[4.0, 2.5], [1.0, 1.0]], device=kdev)
    ops = {
        "score_stats": lambda a, **kw: zk.score_stats(a, **kw).mean,
        "rubric_loss": lambda a, **kw: zk.rubric_loss(a.reshape(4, 3, 9), target=tgt.reshape(4, 3), **kw).loss,
        "gdso_loss": lambda a, **kw: zk.gdso_loss(a, scores, **kw).loss,
    }
    for name, op in ops.items():
        _, want = torch.func.jvp(lambda a: op(a, backend="reference"), (x,), (tx,))
        for grad_mode in (True, False):
            with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
                got = fwAD.unpack_dual(op(fwAD.make_dual(x, tx))).tangent
                assert zk.backend_info()["last_backend"][name] == "reference", name
                with pytest.raises(RuntimeError, match=r"cannot run: forward-mode AD"):
                    op(fwAD.make_dual(x, tx), backend="triton")
            assert got is not None, (name, grad_mode)
            torch.testing.assert_close(got, want.to(got.dtype), msg=f"{name} tangent, grad mode {grad_mode}")

    # the restricted head: a dual weight or bias takes the product even where the kernel is forced
    hidden = torch.randn(3, 16, generator=g).to(kdev)
    weight = torch.randn(40, 16, generator=g).to(kdev)
    ids = torch.tensor([1, 5, 7, 9, 11, 13, 17, 19, 23], device=kdev)
    th, tw = torch.randn_like(hidden), torch.randn_like(weight)
    _, want_h = torch.func.jvp(lambda h: zk.restricted_logits(h, weight, ids), (hidden,), (th,))
    _, want_w = torch.func.jvp(lambda w: zk.restricted_logits(hidden, w, ids), (weight,), (tw,))
    for forced in (False, True):
        if forced:
            monkeypatch.setenv("ZREWARD_BACKEND", "triton")
        with fwAD.dual_level():
            got_w = fwAD.unpack_dual(zk.restricted_logits(hidden, fwAD.make_dual(weight, tw), ids)).tangent
            if forced:
                with pytest.raises(RuntimeError, match=r"cannot run: forward-mode AD"):
                    zk.restricted_logits(fwAD.make_dual(hidden, th), weight, ids)
            else:
                got_h = fwAD.unpack_dual(zk.restricted_logits(fwAD.make_dual(hidden, th), weight, ids)).tangent
                torch.testing.assert_close(got_h, want_h)
        torch.testing.assert_close(got_w, want_w, msg=f"restricted_logits weight tangent, forced={forced}")
    # outside a dual level, and for a plain tensor inside one, the fused path stays the choice where it runs
    zk.score_stats(x, backend="triton")
    assert zk.backend_info()["last_backend"]["score_stats"] == "triton"
    with fwAD.dual_level():
        zk.gdso_loss(x, scores, backend="triton")
    assert zk.backend_info()["last_backend"]["gdso_loss"] == "triton"


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_torch_func_transforms_and_fake_tensors_leave_no_bins_cached(kdev, monkeypatch):
    """The bin values tensor is cached per device; made first inside torch.func.grad or jvp (where
    auto runs the reference) it is the transform's wrapper, which has no storage once the transform
    ends: cached, it made every later fused call on that device fail at the launch ("Cannot access
    storage of TensorWrapper" on the CPU interpreter; a data pointer error on CUDA).  Made under
    FakeTensorMode (tracing tools) it is a fake tensor, which every later real call refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zreward_kernels import _common

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 3, 9, generator=g).to(kdev)
    scores = torch.tensor([[4.0, 2.5], [1.0, 1.0]], device=kdev)
    want = zk.gdso_loss(x, scores, backend="reference").loss
    monkeypatch.setattr(_common, "_BINS_CACHE", {})  # as in a fresh process
    torch.func.grad(lambda a: zk.gdso_loss(a, scores).loss)(x)
    torch.func.jvp(lambda a: zk.score_stats(a).mean, (x,), (x,))
    assert all(type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t)
               for t in _common._BINS_CACHE.values())
    torch.testing.assert_close(zk.gdso_loss(x, scores, backend="triton").loss, want, atol=2e-5, rtol=1e-5)
    monkeypatch.setattr(_common, "_BINS_CACHE", {})
    with FakeTensorMode():
        zk.score_stats(torch.randn(4, 9), validate=False)
    assert not _common._BINS_CACHE
    torch.testing.assert_close(zk.score_stats(x.cpu()).mean, zk.score_stats(x.cpu(), backend="reference").mean)
    torch.testing.assert_close(zk.gdso_loss(x, scores, backend="triton").loss, want, atol=2e-5, rtol=1e-5)
