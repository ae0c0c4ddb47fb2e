"""Forward+backward of each fused op: eager reference vs torch.compile(reference) vs fused Triton.

Sizes are rows of 9 logits, 64 to 262144.  ``rubric_loss`` runs CE (hard target) + KL (teacher
logits) + pairs (P = rows / 2); ``gdso_loss`` uses G = 8 (P = rows / 16; 8192 rows is the goal's
P = 512); ``score_stats`` back-propagates ``mean.sum() + std.sum()``.  The fused path needs CUDA
and is skipped on CPU.

``torch.compile`` of the reference is compiled once per (op, rows), with ``dynamic=False``: the
compiled code specialised to that size, compile's best case.  (Until 2026-11-28 one compiled function
per op served every size, so from the second size on it ran dynamic-shape kernels whose speed depended
on which sizes came first: the H200 runs of 2026-11-27 and 2026-11-28 timed its gdso_loss graph
replay at 262144 rows at 0.36, 0.51 and 0.12 ms.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, QUICK, back_to_back, capture_fwd_bwd, kernel_names, peak_memory_bytes, sync

from zreward_kernels import BIN_VALUES, gdso_loss, rubric_loss, score_stats
from zreward_kernels import reference as ref

SIZES = [64, 1024] if QUICK else [64, 1024, 8192, 16384, 262144]
IMPLS = ["eager", "compile", "fused"]
OPS = ["score_stats", "rubric_loss", "gdso_loss"]
K = len(BIN_VALUES)
G = 8

_COMPILED = {}


def _case(op: str, rows: int):
    gen = torch.Generator().manual_seed(rows)
    if op == "gdso_loss":
        p = max(rows // (2 * G), 1)
        x = torch.randn(p, 2, G, K, generator=gen).to(DEVICE)
        scores = torch.tensor(BIN_VALUES)[torch.randint(0, K, (p, 2), generator=gen)].to(DEVICE)
        return x, dict(scores=scores)
    x = torch.randn(rows, K, generator=gen).to(DEVICE)
    if op == "score_stats":
        return x, {}
    n_pairs = rows // 2
    return x, dict(
        target=torch.randint(0, K, (rows,), generator=gen).to(DEVICE),
        teacher_logits=torch.randn(rows, K, generator=gen).to(DEVICE),
        pairs=torch.randint(0, rows, (n_pairs, 2), generator=gen).to(DEVICE),
        pair_gaps=(torch.randint(-8, 9, (n_pairs,), generator=gen) * 0.5).to(DEVICE),
    )


def _reference_loss(op):
    if op == "score_stats":
        def f(x):
            s = ref.score_stats(x, BIN_VALUES)
            return s.mean.sum() + s.std.sum()
    elif op == "rubric_loss":
        def f(x, target, teacher_logits, pairs, pair_gaps):
            return ref.rubric_loss(x, BIN_VALUES, target=target, teacher_logits=teacher_logits, pairs=pairs,
                                   pair_gaps=pair_gaps).loss
    else:
        def f(x, scores):
            return ref.gdso_loss(x, scores, BIN_VALUES).loss
    return f


def _fused_loss(op):
    if op == "score_stats":
        def f(x):
            s = score_stats(x, backend="triton", validate=False)
            return s.mean.sum() + s.std.sum()
    elif op == "rubric_loss":
        def f(x, **kw):
            return rubric_loss(x, backend="triton", validate=False, **kw).loss
    else:
        def f(x, scores):
            return gdso_loss(x, scores, backend="triton", validate=False).loss
    return f


def _impl(op, impl, rows):
    if impl == "eager":
        return _reference_loss(op)
    if impl == "compile":  # one static compilation per size (module docstring)
        if (op, rows) not in _COMPILED:
            _COMPILED[op, rows] = torch.compile(_reference_loss(op), dynamic=False)
        return _COMPILED[op, rows]
    return _fused_loss(op)


@pytest.mark.parametrize("rows", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_fwd_bwd(benchmark, op, impl, rows):
    if impl == "fused" and DEVICE.type != "cuda":
        pytest.skip("the fused Triton path needs CUDA (the CPU interpreter is not a speed measure)")
    x0, kw = _case(op, rows)
    x = x0.clone().requires_grad_(True)
    fn = _impl(op, impl, rows)

    def step():
        x.grad = None
        loss = fn(x, **kw)
        loss.backward()
        sync()
        return loss

    for _ in range(3):  # warm-up: compilation, autotuning caches, allocator
        loss = step()
    if impl != "eager":  # what is timed computes the reference's loss and gradient
        grad = x.grad.clone()
        x.grad = None
        want = _reference_loss(op)(x, **kw)
        want.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad, x.grad, atol=1e-5, rtol=1e-3)
    benchmark.group = f"{op} rows={rows}"
    benchmark.extra_info.update(
        op=op, impl=impl, rows=rows, device=str(DEVICE), torch=torch.__version__,
        device_name=torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu",
        peak_mem_bytes=peak_memory_bytes(step),
    )
    if DEVICE.type == "cuda":
        held = {}
        x.grad = None
        fwd = kernel_names(lambda: held.setdefault("loss", fn(x, **kw)))
        bwd = kernel_names(lambda: held["loss"].backward())
        benchmark.extra_info.update(kernels_fwd=len(fwd), kernels_bwd=len(bwd), kernel_names_fwd=fwd,
                                    kernel_names_bwd=bwd)
    benchmark.pedantic(step, rounds=20 if rows >= 16384 else 50, iterations=1, warmup_rounds=2)


def _captured(op, impl, rows):
    """``op``'s forward+backward by ``impl`` on ``rows`` rows, captured in a CUDA graph (skips
    without CUDA, and reports a capture failure as the skip reason).  Returns ``(graph, inputs)``:
    keep the inputs alive while the graph replays (it reads their memory)."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    x0, kw = _case(op, rows)
    x = x0.clone().requires_grad_(True)
    try:
        return capture_fwd_bwd(_impl(op, impl, rows), x, kw), (x, kw)
    except Exception as exc:  # report, do not hide: a capture failure is a result too
        pytest.skip(f"{impl} could not be captured in a CUDA graph: {type(exc).__name__}: {exc}"[:300])


@pytest.mark.parametrize("rows", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_fwd_bwd_cuda_graph(benchmark, op, impl, rows):
    """The same forward+backward captured once in a CUDA graph and replayed: device time without
    the per-call host overhead (Python, autograd, kernel-launch API) that dominates small calls."""
    graph, _inputs = _captured(op, impl, rows)

    def replay():
        graph.replay()
        sync()

    replay()
    benchmark.group = f"{op} rows={rows} (CUDA graph)"
    benchmark.extra_info.update(op=op, impl=impl, rows=rows, mode="cuda-graph", device=str(DEVICE),
                                torch=torch.__version__, device_name=torch.cuda.get_device_name(0))
    benchmark.pedantic(replay, rounds=50, iterations=5, warmup_rounds=2)


REPLAYS = 20


@pytest.mark.parametrize("rows", [8192, 262144] if not QUICK else [1024])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["rubric_loss", "gdso_loss"])
def test_fwd_bwd_cuda_graph_back_to_back(benchmark, op, impl, rows):
    """The captured forward+backward replayed REPLAYS times with one sync at the end, timed per
    replay: what a training loop that replays a captured step without waiting on each one sees --
    the device time of one step, or the host cost of one graph launch where that is larger.  Only
    the goal's ops and sizes (gdso_loss at 8192 rows is P = 512, G = 8)."""
    graph, _inputs = _captured(op, impl, rows)
    replays = back_to_back(graph, REPLAYS)
    replays()
    benchmark.group = f"{op} rows={rows} (CUDA graph, {REPLAYS} back to back)"
    benchmark.extra_info.update(op=op, impl=impl, rows=rows, mode=f"cuda-graph x{REPLAYS}", calls_per_call=REPLAYS,
                                device=str(DEVICE), torch=torch.__version__,
                                device_name=torch.cuda.get_device_name(0))
    benchmark.pedantic(replays, rounds=20, iterations=1, warmup_rounds=1)
