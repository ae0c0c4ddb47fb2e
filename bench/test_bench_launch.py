"""Where small calls spend their time: the host cost of one kernel launch, and of the host path of
one fused-op call with its launches stubbed.

Compares, per call: a one-element torch op, a trivial Triton kernel with 2 arguments, the same
with 40 arguments (about what the fused rubric kernel takes), and an empty autograd.Function
round trip.  Each call is followed by nothing (no sync), and the timing loop syncs once at the end.
"""

import pytest
import torch
from conftest import DEVICE, sync

from zreward_kernels._triton_utils import HAS_TRITON, tl, triton

N_CALLS = 200

if HAS_TRITON:

    @triton.jit
    def _noop2(X, n):
        pid = tl.program_id(0)
        if pid < 0:
            tl.store(X, n)

    @triton.jit
    def _noop40(X, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
                b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, f1, f2, f3, f4, f5, f6, f7, f8, C1: tl.constexpr):
        pid = tl.program_id(0)
        if pid < 0:
            tl.store(X, f1)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("what", ["torch_add", "triton_2_args", "triton_40_args", "autograd_function"])
def test_host_cost_per_call(benchmark, what):
    if DEVICE.type != "cuda":
        pytest.skip("launch overhead is measured on CUDA")
    x = torch.zeros(1, device=DEVICE)
    ptrs = [torch.zeros(1, device=DEVICE) for _ in range(20)]
    if what == "torch_add":
        def call():
            x.add_(1)
    elif what == "triton_2_args":
        def call():
            _noop2[(1,)](x, 3)
    elif what == "triton_40_args":
        def call():
            _noop40[(1,)](x, *ptrs, *range(10), *[0.5] * 8, C1=1)
    else:
        xr = torch.zeros(1, device=DEVICE, requires_grad=True)

        def call():
            _Identity.apply(xr).sum().backward()

    def loop():
        for _ in range(N_CALLS):
            call()
        sync()

    loop()
    benchmark.group = "host cost of one call"
    benchmark.extra_info.update(what=what, calls_per_round=N_CALLS, device_name=torch.cuda.get_device_name(0),
                                torch=torch.__version__)
    benchmark.pedantic(loop, rounds=10, iterations=1, warmup_rounds=1)


@pytest.fixture
def no_launches():
    """The public ops on the fused path with every Triton launch a no-op (on any device): what is
    left is the host path of a call (validation, launch set-up, autograd)."""
    from zreward_kernels.aot_check import intercepted_launches

    with intercepted_launches():
        yield


@pytest.mark.parametrize("op", ["score_stats [64,4,9]", "rubric_loss [256,9] CE+KL+pairs", "gdso_loss P=8 G=8",
                                "group_advantage M=64 g=16", "score_stats [64,4,9] no_grad",
                                "rubric_loss [256,9] CE+KL+pairs no_grad", "gdso_loss P=8 G=8 no_grad"])
def test_host_path_of_a_fused_call(benchmark, no_launches, op):
    """Host time of one forward+backward of a fused op with its kernel launches replaced by no-ops
    (Python validation and set-up, allocations, autograd.Function, the autograd engine): on the
    lent GPU machines this, not the kernels, dominates a per-call step below ~10^5 rows.  Runs on
    CPU too (the same host code).  The group advantage (not differentiable, a compiled op rather
    than Triton) is timed whole on 64 rewards: its wrapper, the dispatcher and the op's set-up.
    ``no_grad``: the forward alone under ``torch.no_grad()`` (scoring; rewards for a policy step)."""
    import zreward_kernels as zk

    fwd_only = op.endswith(" no_grad")
    gen = torch.Generator().manual_seed(0)
    if op.startswith("group_advantage"):
        from zreward_kernels.advantage import compiled_available

        if compiled_available(DEVICE) is not None:
            pytest.skip(f"compiled op unavailable: {compiled_available(DEVICE)}")
        x = torch.randn(64, generator=gen).to(DEVICE)

        def call():
            zk.group_advantage(x, group_size=16, validate=False)
    elif op.startswith("score_stats"):
        x = torch.randn(64, 4, 9, generator=gen).to(DEVICE).requires_grad_(True)

        def call():
            s = zk.score_stats(x, validate=False)
            if not fwd_only:
                (s.mean.sum() + s.std.sum()).backward()
    elif op.startswith("rubric_loss"):
        x = torch.randn(256, 9, generator=gen).to(DEVICE).requires_grad_(True)
        kw = dict(target=torch.randint(0, 9, (256,), generator=gen).to(DEVICE),
                  teacher_logits=torch.randn(256, 9, generator=gen).to(DEVICE),
                  pairs=torch.randint(0, 256, (128, 2), generator=gen).to(DEVICE),
                  pair_gaps=torch.zeros(128, device=DEVICE))

        def call():
            out = zk.rubric_loss(x, validate=False, **kw)
            if not fwd_only:
                out.loss.backward()
    else:
        x = torch.randn(8, 2, 8, 9, generator=gen).to(DEVICE).requires_grad_(True)
        scores = torch.full((8, 2), 3.0, device=DEVICE)

        def call():
            out = zk.gdso_loss(x, scores, validate=False)
            if not fwd_only:
                out.loss.backward()

    def loop():
        with torch.set_grad_enabled(not fwd_only):
            for _ in range(N_CALLS):
                x.grad = None
                call()
        sync()

    _time_rounds(benchmark, loop, "host path of one fused call (launches stubbed)", f"host path: {op}")


def _time_rounds(benchmark, loop, group: str, what: str) -> None:
    """Time ``loop`` (N_CALLS calls, then one sync) as one round, after one untimed run."""
    loop()
    benchmark.group = group
    benchmark.extra_info.update(what=what, calls_per_round=N_CALLS, torch=torch.__version__,
                                device_name=torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu")
    benchmark.pedantic(loop, rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["bare ops", "restricted_logits", "restricted_logits Triton projection"])
def test_restricted_head_host_path(benchmark, impl):
    """Host cost of one no-grad restricted-head call on tiny tensors (N = 4, H = 16, V = 64, K = 9):
    the two bare torch ops it runs (``W.index_select(0, ids)`` and the product) against
    ``restricted_logits`` with ``validate=False`` (the same two ops plus its argument checks), and on
    CUDA its Triton projection (one launch).  The device work is negligible at this size, so the
    difference is the wrapper's host path."""
    from zreward_kernels import restricted_logits
    from zreward_kernels._tuning import override

    if impl.endswith("Triton projection") and DEVICE.type != "cuda":
        pytest.skip("the Triton projection runs on CUDA")
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 16, generator=gen).to(DEVICE)
    w = torch.randn(64, 16, generator=gen).to(DEVICE)
    ids = torch.arange(9, device=DEVICE)
    if impl == "bare ops":
        def call():
            return h @ w.index_select(0, ids).t()
    else:
        def call():
            return restricted_logits(h, w, ids, validate=False)

    def loop():
        with torch.no_grad(), override("restricted_fwd", KERNEL=int(impl.endswith("Triton projection"))):
            for _ in range(N_CALLS):
                call()
        sync()

    _time_rounds(benchmark, loop, "host path of one restricted-head call (N = 4)", f"restricted head: {impl}")
