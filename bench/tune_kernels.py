"""Sweep the Triton kernels' launch configurations (``zreward_kernels._tuning.SWEEP``) on a GPU.

For each kernel and candidate configuration, the op that launches the kernel runs forward+backward
on the benchmark suite's inputs (``bench/test_bench_kernels.py``), captured in a CUDA graph with
the other kernels at their defaults; the median replay time over several batches of replays is the
op's device time under that configuration.  Prints one markdown table per kernel and size, fastest
first, with the speed-up over the current default, and writes everything to ``--json``.  A
candidate that fails to compile or capture is reported, not fatal.

    python bench/tune_kernels.py [--json FILE] [--write-config FILE] [--reps 50] [--quick] [--jobs N] [KERNEL ...]

``--jobs N`` first compiles every candidate's launches in N spawned processes (one eager
forward+backward per candidate and size, so the launches are those the timing makes): Triton
writes each compiled kernel to its on-disk cache, and the timing then loads it instead of
compiling it, one candidate after another.  Compiling dominates a sweep on a fresh machine (tens
of candidates, seconds each); with 16 host cores this cuts it by about the number of jobs.

``--write-config`` writes, per kernel, the candidate with the best geometric-mean speed-up over the
sizes (among those that ran at every size) as a file ``ZREWARD_KERNEL_CONFIGS`` /
``zreward_kernels._tuning.load_configs`` apply; or pick new defaults in ``_tuning.py`` from the
tables, then re-run the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch

from zreward_kernels._tuning import CONFIGS, SWEEP, override

_BENCH = os.path.dirname(os.path.abspath(__file__))


def _bench_helpers():
    """The benchmark suite's capture helpers and cases (imported when a sweep runs, so the
    bookkeeping below imports without bench/ on the path)."""
    if _BENCH not in sys.path:
        sys.path.insert(0, _BENCH)
    from conftest import capture_fwd_bwd, capture_graph
    from test_bench_kernels import _case, _fused_loss

    return capture_fwd_bwd, capture_graph, _case, _fused_loss


OP = {"stats_fwd": "score_stats", "stats_bwd": "score_stats", "rubric_fwd": "rubric_loss",
      "rubric_bwd": "rubric_loss", "gdso_fwd": "gdso_loss", "group_advantage": "group_advantage",
      "restricted_fwd": "restricted_logits", "restricted_bwd": "restricted_logits_grad"}
ROWS = (16384, 262144)  # rows of 9 logits; gdso_loss: P = rows / 16 pairs of 2 x 8 (8192 rows: the goal's P = 512)
GDSO_ROWS = (8192, 262144)
ADV_SIZES = (1 << 20, -(1 << 20))  # M rewards in groups of 16; negative: variable groups of 1..31 (offsets)
# restricted head: N score positions of a Qwen2.5-7B-sized hidden state (H = 3584, bf16), forward without
# gradients; the head has 4096 rows instead of 152064 (only the K = 9 gathered rows are read either way)
RESTRICTED_SIZES = (1024, 4096)
_RESTRICTED = {}


def _restricted_call(n: int, grad: bool = False):
    """The no-grad restricted-head forward at N = ``n`` (what the scorer runs), as a function; with
    ``grad``, the benchmarks' forward+backward into the hidden states (frozen head:
    ``score_stats_from_hidden(...).mean.sum().backward()``) with the Triton projection on
    (``restricted_fwd.KERNEL=1``: one fused launch each way), whose backward kernel's tiles
    (``restricted_bwd``, shared with ``restricted_logits``' gradient kernel) are swept."""
    from zreward_kernels import restricted_logits, score_stats_from_hidden

    if "w" not in _RESTRICTED:
        gen = torch.Generator(device="cuda").manual_seed(0)
        _RESTRICTED["w"] = torch.randn(4096, 3584, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        _RESTRICTED["ids"] = torch.arange(4087, 4096, device="cuda")
    w, ids = _RESTRICTED["w"], _RESTRICTED["ids"]
    hidden = torch.randn(n, 3584, device="cuda", dtype=torch.bfloat16)
    if grad:
        hidden.requires_grad_(True)

        def fn_grad():
            hidden.grad = None
            with override("restricted_fwd", KERNEL=1):
                score_stats_from_hidden(hidden, w, ids, validate=False).mean.sum().backward()
        return fn_grad

    def fn():
        with torch.no_grad():
            return restricted_logits(hidden, w, ids, validate=False)
    return fn


def _advantage_graph(m: int):
    """The compiled group advantage (forward only) captured in a CUDA graph: ``(graph, inputs)``
    (keep the inputs alive while the graph replays)."""
    from zreward_kernels import group_advantage

    gen = torch.Generator().manual_seed(0)
    r = torch.randn(abs(m), generator=gen).cuda()
    if m > 0:
        def fn():
            return group_advantage(r, group_size=16, validate=False)
    else:
        sizes = torch.randint(1, 32, (abs(m) // 16,), generator=gen)
        off = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).clamp(max=abs(m))
        off[-1] = abs(m)
        off = off.cuda()

        def fn():
            return group_advantage(r, group_offsets=off, validate=False)
    return _bench_helpers()[1](fn), fn


def graph_ms(op: str, rows: int, reps: int) -> float:
    if op == "group_advantage":
        graph, _keep = _advantage_graph(rows)
    elif op.startswith("restricted_logits"):
        _keep = _restricted_call(rows, grad=op.endswith("_grad"))
        graph = _bench_helpers()[1](_keep)
    else:
        capture_fwd_bwd, _, _case, _fused_loss = _bench_helpers()
        x0, kw = _case(op, rows)
        x = x0.clone().requires_grad_(True)
        graph = capture_fwd_bwd(_fused_loss(op), x, kw)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def _sizes(kernel: str, quick: bool) -> tuple:
    op = OP[kernel]
    return {"gdso_loss": GDSO_ROWS, "group_advantage": ADV_SIZES,
            "restricted_logits": RESTRICTED_SIZES, "restricted_logits_grad": RESTRICTED_SIZES}.get(op, ROWS)[
        : 1 if quick else None]


def _candidates(kernel: str) -> list:
    """The default configuration of ``kernel`` first, then every other candidate of the sweep."""
    default = dict(CONFIGS[kernel])
    return [default] + [c for c in SWEEP[kernel] if {**default, **c} != default]


def run_once(op: str, rows: int) -> None:
    """One eager forward+backward of ``op`` on the inputs the timing uses (what a graph capture's
    warm-up runs first): the launches, and so the compiles, of a timed candidate."""
    if op.startswith("restricted_logits"):
        _restricted_call(rows, grad=op.endswith("_grad"))()
        return
    _, _, _case, _fused_loss = _bench_helpers()
    x0, kw = _case(op, rows)
    x = x0.clone().requires_grad_(True)
    _fused_loss(op)(x, **kw).backward()


def _compile_one(item) -> tuple:
    """Worker of :func:`precompile`: run one candidate at each size; ``(item, None | error)``."""
    kernel, cfg, sizes = item
    try:
        with override(kernel, **cfg):
            for rows in sizes:
                run_once(OP[kernel], rows)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return item, None
    except Exception as exc:  # noqa: BLE001 - reported; the timing reports it again
        return item, f"{type(exc).__name__}: {exc}"[:300]


def compile_items(kernels, quick: bool) -> list:
    """``(kernel, config, sizes)`` for every candidate of ``kernels`` that has something to compile
    (the group advantage is a compiled op: nothing)."""
    return [(k, c, _sizes(k, quick)) for k in kernels if OP[k] != "group_advantage" for c in _candidates(k)]


def precompile(items, jobs: int, timeout: float) -> dict:
    """Run ``items`` (see :func:`compile_items`) in ``jobs`` spawned processes (see ``--jobs``).

    Returns counts ``dict(done=, failed=, left=, seconds=)``: ``failed`` candidates raised (the
    timing reports the error again), ``left`` were not reached within ``timeout`` seconds (the
    timing compiles them itself).
    """
    counts = dict(done=0, failed=0, left=len(items), seconds=0.0)
    if not items or jobs < 1:
        return counts
    started = time.monotonic()
    pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(items)))
    try:
        it = pool.imap_unordered(_compile_one, items)
        for _ in items:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                break
            try:
                (kernel, cfg, _), err = it.next(timeout=left)
            except multiprocessing.TimeoutError:
                break
            counts["left"] -= 1
            counts["failed" if err else "done"] += 1
            if err:
                print(f"  precompile {kernel} {cfg}: {err}", flush=True)
    finally:
        pool.terminate()
        pool.join()
    counts["seconds"] = round(time.monotonic() - started, 1)
    return counts


def sweep(kernel: str, reps: int, quick: bool) -> list:
    op = OP[kernel]
    sizes = _sizes(kernel, quick)
    cands = _candidates(kernel)
    default = cands[0]  # the record of this very dict is flagged default=True
    results = []
    for rows in sizes:
        for cfg in cands:
            rec = dict(kernel=kernel, op=op, rows=rows, config={**default, **cfg}, default=cfg is default)
            try:
                with override(kernel, **cfg):
                    rec["ms"] = graph_ms(op, rows, reps)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is a result
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            results.append(rec)
            msg = f"{rec['ms'] * 1e3:.1f} us" if "ms" in rec else rec["error"]
            print(f"  {kernel} rows={rows} {rec['config']}: {msg}", flush=True)
    return results


def report(results: list) -> str:
    lines = []
    keys = sorted({(r["kernel"], r["rows"]) for r in results})
    for kernel, rows in keys:
        rs = [r for r in results if r["kernel"] == kernel and r["rows"] == rows]
        base = next((r.get("ms") for r in rs if r["default"]), None)
        what = (f"M = {abs(rows)}, {'groups of 16' if rows > 0 else 'variable groups of 1..31'}"
                if kernel == "group_advantage" else
                f"forward without gradients, N = {rows}, H = 3584, bf16" if kernel == "restricted_fwd"
                else f"score_stats_from_hidden mean fwd+bwd into the hidden states with KERNEL=1, N = {rows}, "
                "H = 3584, bf16"
                if kernel == "restricted_bwd" else f"fwd+bwd, {rows} rows")
        lines += [f"\n### {kernel} ({rs[0]['op']} {what}, CUDA graph)\n",
                  "| config | us | vs default |", "|---|---|---|"]
        for r in sorted(rs, key=lambda r: r.get("ms", float("inf"))):
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items()) + (" (default)" if r["default"] else "")
            if "ms" in r:
                rel = f"{base / r['ms']:.2f}x" if base else "-"
                lines.append(f"| {cfg} | {r['ms'] * 1e3:.1f} | {rel} |")
            else:
                lines.append(f"| {cfg} | failed: {r['error'][:120]} | - |")
    return "\n".join(lines)


def best_configs(results: list) -> dict:
    """Per kernel: the config with the best geometric-mean speed-up over the default across sizes,
    among the configs measured at every size; ``(config, speed-up)``."""
    out = {}
    for kernel in sorted({r["kernel"] for r in results}):
        rs = [r for r in results if r["kernel"] == kernel]
        sizes = sorted({r["rows"] for r in rs})
        base = {r["rows"]: r.get("ms") for r in rs if r["default"]}
        if any(base.get(n) is None for n in sizes):
            continue
        by_cfg = {}
        for r in rs:
            by_cfg.setdefault(json.dumps(r["config"], sort_keys=True), {})[r["rows"]] = r.get("ms")
        best = None
        for key, times in by_cfg.items():
            if any(times.get(n) is None for n in sizes):
                continue
            logs = [math.log(base[n] / times[n]) for n in sizes]
            score = math.exp(sum(logs) / len(logs))
            if best is None or score > best[1]:
                best = (json.loads(key), score)
        if best is not None:
            out[kernel] = best
    return out


#: sweep order: the kernels of the open goals first (a timeout cuts the last ones, not these)
ORDER = ["group_advantage", "gdso_fwd", "restricted_fwd", "restricted_bwd", "rubric_fwd", "rubric_bwd", "stats_fwd", "stats_bwd"]


def _write(args, results: list, final: bool, device: str) -> None:
    """The report (printed when final), the JSON of every result and the best-config file."""
    text = f"# Launch-configuration sweep on {device}\n" + report(results)
    if final:
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, results=results), f, indent=1)
    if args.write_config:
        best = best_configs(results)
        if final:
            print("\nBest per kernel (geometric-mean speed-up over the default across sizes):")
            for kernel, (cfg, score) in best.items():
                print(f"  {kernel}: {cfg} ({score:.2f}x)")
        with open(args.write_config, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__,
                           configs={k: c for k, (c, _) in best.items()},
                           speedup={k: round(v, 3) for k, (_, v) in best.items()}), f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernels", nargs="*", default=list(SWEEP), help=f"kernels to sweep (default: all of {list(SWEEP)})")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--write-config", default=None,
                    help="write the best config per kernel to this file (for ZREWARD_KERNEL_CONFIGS)")
    ap.add_argument("--reps", type=int, default=50, help="graph replays per timed batch (5 batches)")
    ap.add_argument("--quick", action="store_true", help="the smaller size only")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds: start no further kernel's sweep after this long (0: no limit)")
    ap.add_argument("--jobs", type=int, default=0,
                    help="compile every candidate in this many processes before timing (0: compile while timing)")
    args = ap.parse_args()
    if args.jobs < 0:
        ap.error(f"--jobs must be >= 0, got {args.jobs}")
    unknown = [k for k in args.kernels if k not in SWEEP]
    if unknown:
        ap.error(f"unknown kernels {unknown}; known: {list(SWEEP)}")
    if not torch.cuda.is_available():
        print("tune_kernels needs a CUDA device", file=sys.stderr)
        return 2
    results = []
    device = torch.cuda.get_device_name(0)
    started = time.monotonic()
    kernels = sorted(args.kernels, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))
    if args.jobs > 0:
        # at most half the budget: what is not compiled by then is compiled while timing, as without --jobs
        counts = precompile(compile_items(kernels, args.quick), args.jobs, args.budget / 2 if args.budget else 600)
        print(f"  precompiled in {args.jobs} processes: {counts}", flush=True)
    for kernel in kernels:
        if args.budget and time.monotonic() - started > args.budget:
            print(f"  {kernel}: not swept (--budget {args.budget:.0f} s spent)", flush=True)
            continue
        results += sweep(kernel, args.reps, args.quick)
        _write(args, results, final=False, device=device)  # a run cut short by a timeout keeps what it measured
    _write(args, results, final=True, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
