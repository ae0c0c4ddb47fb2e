"""Shared set-up for the pytest-benchmark suites (``pytest bench/ --benchmark-only``).

Every benchmark runs on the best device present (CUDA if available, else CPU) and records, next
to pytest-benchmark's timings, the peak extra memory of one call and (on CUDA) the number of
kernels one call launches, in ``benchmark.extra_info``.  ``ZREWARD_BENCH_QUICK=1`` keeps only the
smallest sizes (a smoke run).
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

DEVICE = torch.device(os.environ.get("ZREWARD_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("ZREWARD_BENCH_QUICK", "0") not in ("", "0")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(fn) -> int:
    """Peak memory allocated above the starting point during one call of ``fn``."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e["ts"]):
        if e["args"].get("Device Type", 0) != 0:
            continue
        cur += e["args"]["Bytes"]
        peak = max(peak, cur)
    return int(peak)


def kernel_names(fn) -> list:
    """Names of the CUDA kernels (and memsets/copies) one call of ``fn`` launches."""
    if DEVICE.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def capture_graph(step, warmup: int = 3):
    """Warm ``step()`` up on a side stream, then capture one call in a CUDA graph (returned).
    Raises what the capture raises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def back_to_back(graph, replays: int):
    """A function that replays ``graph`` ``replays`` times, then syncs once (timed per replay by the
    back-to-back benchmarks: ``calls_per_call=replays`` in their extra_info)."""
    def run():
        for _ in range(replays):
            graph.replay()
        sync()

    return run


def capture_fwd_bwd(fn, x, kw):
    """``fn(x, **kw).backward()`` captured by :func:`capture_graph` (``x.grad`` reset before each
    call; the graph owns the gradient buffer it writes)."""
    def step():
        x.grad = None
        fn(x, **kw).backward()

    return capture_graph(step)


@pytest.fixture(scope="session")
def device():
    return DEVICE
