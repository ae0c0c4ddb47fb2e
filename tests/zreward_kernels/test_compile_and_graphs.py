"""torch.compile(fullgraph=True) over each public op; on CUDA also launch counts and graph capture."""

import contextlib
import inspect

import pytest
import torch
from kernel_helpers import assert_close

import zreward_kernels as zk


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 9, generator=g).to(device)
    t = torch.randint(0, 9, (64, 4), generator=g).to(device)
    teacher = torch.randn(64, 4, 9, generator=g).to(device)
    pairs = torch.randint(0, 256, (100, 2), generator=g).to(device)
    gaps = torch.randn(100, generator=g).to(device)
    gx = torch.randn(16, 2, 8, 9, generator=g).to(device)
    scores = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])[torch.randint(0, 9, (16, 2), generator=g)].to(device)
    return x, t, teacher, pairs, gaps, gx, scores


def _ops(backend):
    def f_stats(x):
        s = zk.score_stats(x, backend=backend)
        return s.mean.sum() + s.std.sum()

    def f_rubric(x, t, teacher, pairs, gaps):
        return zk.rubric_loss(x, target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps, backend=backend).loss

    def f_gdso(gx, scores):
        return zk.gdso_loss(gx, scores, backend=backend).loss

    return f_stats, f_rubric, f_gdso


def _check_compiled(device, backend, compile_backend):
    torch._dynamo.reset()
    x, t, teacher, pairs, gaps, gx, scores = _inputs(device)
    for fn, args in zip(_ops(backend), ((x,), (x, t, teacher, pairs, gaps), (gx, scores))):
        eager_in = [a.clone().requires_grad_(True) if a is args[0] else a for a in args]
        comp_in = [a.clone().requires_grad_(True) if a is args[0] else a for a in args]
        e = fn(*eager_in)
        e.backward()
        c = torch.compile(fn, fullgraph=True, backend=compile_backend)(*comp_in)
        c.backward()
        assert_close(c, e, atol=1e-5, rtol=1e-5, name=fn.__name__)
        assert_close(comp_in[0].grad, eager_in[0].grad, atol=1e-5, rtol=1e-5, name=fn.__name__ + " grad")


def test_fullgraph_compile_reference_cpu():
    # aot_eager traces exactly what inductor would (dynamo + AOT autograd) without a C++ build
    _check_compiled("cpu", "reference", "aot_eager")


def test_fullgraph_compile_of_the_triton_host_path_cpu():
    """The fused path's host code (validation, launch set-up, the autograd.Functions, tuning-table
    reads) traces as one graph, forward and backward, without a GPU: the Triton launches are
    replaced by no-ops (the interpreter's kernels cannot be traced), so only traceability is checked
    here; values under torch.compile are checked on CUDA below."""
    from zreward_kernels.aot_check import intercepted_launches

    x, t, teacher, pairs, gaps, gx, scores = _inputs("cpu")
    cases = [
        (lambda x: (lambda s: s.probs.sum() + s.mean.sum() + s.std.sum())(zk.score_stats(x)), x),
        (lambda x: zk.rubric_loss(x, target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps).loss, x),
        (lambda x: (lambda o: o.loss.sum() + o.pair.sum() + o.mean.sum())(zk.rubric_loss(
            x, target_probs=torch.softmax(teacher, -1), teacher_probs=torch.softmax(teacher, -1), pairs=pairs,
            pair_gaps=gaps, reduction="none")), x),
        (lambda g: zk.gdso_loss(g, scores).loss, gx),
    ]
    with intercepted_launches():
        for fn, inp in cases:
            torch._dynamo.reset()
            xi = inp.clone().requires_grad_(True)
            torch.compile(fn, fullgraph=True, backend="aot_eager")(xi).backward()
            assert xi.grad is not None and xi.grad.shape == xi.shape


def _dynamic_cases(device: str):
    """(name, fn, two argument sets of different sizes) for every public op, each with a float
    option passed in as an argument (dynamic=True leaves Python floats unspecialised).  The head's
    weight and ids, captured by its fn rather than passed, are made on ``device`` (on CPU, they
    failed the H200 run of 2026-11-28 with the device check's error)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 16, generator=g).to(device)
    ids = torch.tensor([1, 5, 7, 9, 11, 13, 20, 30, 40], device=device)
    on_grid = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])

    def rubric_args(n, wt):
        return (torch.randn(n, 9, generator=g), torch.randint(0, 9, (n,), generator=g), torch.randn(n, 9, generator=g),
                torch.randint(0, n, (n // 2, 2), generator=g), torch.randn(n // 2, generator=g), wt)

    return [
        ("score_stats", lambda x, t: (lambda s: s.mean.sum() + s.std.sum())(zk.score_stats(x, temperature=t)),
         [(torch.randn(5, 4, 9, generator=g), 0.5), (torch.randn(7, 4, 9, generator=g), 2.0)]),
        ("rubric_loss", lambda x, t, te, p, gp, wt: zk.rubric_loss(
            x, target=t, teacher_logits=te, pairs=p, pair_gaps=gp, weight_ce=wt).loss,
         [rubric_args(10, 0.5), rubric_args(14, 2.0)]),
        ("gdso_loss", lambda x, s, lam: zk.gdso_loss(x, s, lambda_pt=lam).loss,
         [(torch.randn(2, 2, 3, 9, generator=g), on_grid[torch.randint(0, 9, (2, 2), generator=g)], 0.5),
          (torch.randn(3, 2, 3, 9, generator=g), on_grid[torch.randint(0, 9, (3, 2), generator=g)], 2.0)]),
        ("score_stats_from_hidden", lambda h: zk.score_stats_from_hidden(h, w, ids).mean.sum(),
         [(torch.randn(5, 16, generator=g),), (torch.randn(7, 16, generator=g),)]),
        ("group_advantage", lambda r, o, e: zk.group_advantage(r, group_offsets=o, eps=e)[0],
         [(torch.randn(8, generator=g), torch.tensor([0, 3, 8]), 1e-3),
          (torch.randn(12, generator=g), torch.tensor([0, 5, 12]), 1e-4)]),
    ]


def _check_dynamic(device: str, compile_backend: str, values: bool) -> None:
    for name, fn, argsets in _dynamic_cases(device):
        if not values and name == "group_advantage":
            continue  # not a Triton op: the reference run covers it
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=compile_backend)
        for args in argsets:
            args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
            differentiable = args[0].dim() > 1
            xc = args[0].clone().requires_grad_(differentiable)
            got = compiled(xc, *args[1:])
            if differentiable:
                got.backward()
                assert xc.grad is not None and xc.grad.shape == xc.shape, name
            if values:
                xe = args[0].clone().requires_grad_(differentiable)
                want = fn(xe, *args[1:])
                assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"{name} {tuple(xc.shape)}")
                if differentiable:
                    want.backward()
                    assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5, name=f"{name} grad {tuple(xc.shape)}")


@pytest.mark.parametrize("fused_host_path", [False, True], ids=["reference", "fused host path"])
def test_fullgraph_compile_with_dynamic_shapes_cpu(fused_host_path):
    """torch.compile(fullgraph=True, dynamic=True), what a trainer with varying batch sizes uses: every
    public op traces with symbolic sizes and unspecialised float options, and gives the eager values
    (math.isfinite in the argument checks broke this for every op).  The fused path's launches are
    no-ops here (see above), so it checks traceability and the gradient's shape only."""
    from zreward_kernels.aot_check import intercepted_launches

    with intercepted_launches() if fused_host_path else contextlib.nullcontext():
        _check_dynamic("cpu", "aot_eager", values=not fused_host_path)


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiling"])
def test_rubric_counters_alias_the_counts_only_outside_torch_compile(monkeypatch, compiling):
    """Without the semaphore workspace, rubric_loss' forward zero-fills its pair-sign counts and its
    four counters in one buffer, the counters a view of its tail (one fill launch).  Under
    torch.compile they are two buffers: a kernel argument written through two views of one buffer
    is copied before each launch of the compiled graph (inductor fuses the two fills)."""
    from zreward_kernels import _workspace
    from zreward_kernels.aot_check import intercepted_launches

    x, t, teacher, pairs, gaps, gx, scores = _inputs("cpu")
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []
    with _workspace.disabled(), intercepted_launches(calls=calls):
        zk.rubric_loss(x.clone().requires_grad_(True), target=t, pairs=pairs, pair_gaps=gaps)
    fwd = [(fn, args) for fn, args, _ in calls if fn.__name__ == "_rubric_fwd_kernel"]
    assert len(fwd) == 1
    fn, args = fwd[0]
    named = dict(zip(fn.arg_names, args))
    sem, cnt = named["SEM"], named["CNT"]
    rows = x.numel() // x.shape[-1]
    # outside torch.compile the counts' buffer is passed whole: [counts | counters]
    assert sem.numel() == 4 and cnt.numel() == rows + (0 if compiling else 4)
    assert sem.dtype == cnt.dtype == torch.int32
    shared = sem.untyped_storage().data_ptr() == cnt.untyped_storage().data_ptr()
    assert shared != compiling
    assert not sem.any() and not cnt.any()


@pytest.mark.cuda
def test_fullgraph_compile_with_dynamic_shapes_cuda():
    """The same on CUDA through inductor: the Triton kernels and the compiled group advantage with
    symbolic sizes, values against eager."""
    _check_dynamic("cuda", "inductor", values=True)


@pytest.mark.cuda
def test_fullgraph_compile_triton_cuda():
    _check_compiled("cuda", "triton", "inductor")


def _count_kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return names


@pytest.mark.cuda
def test_launch_counts_cuda():
    x, t, teacher, pairs, gaps, gx, scores = _inputs("cuda")
    xr = x.clone().requires_grad_(True)
    gr = gx.clone().requires_grad_(True)
    for a in range(2):  # warm up (compilation) first
        out = zk.rubric_loss(xr, target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps, validate=False)
        out.loss.backward()
        go = zk.gdso_loss(gr, scores, validate=False)
        go.loss.backward()
    holder = {}
    xr.grad = None
    gr.grad = None

    def ours(names):
        # autograd itself fills the seed gradient of a scalar .backward(): not one of our launches
        return [n for n in names if "FillFunctor<float>" not in n]

    def fwd():
        holder["o"] = zk.rubric_loss(xr, target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps, validate=False)

    fwd_names = _count_kernels(fwd)
    bwd_names = ours(_count_kernels(lambda: holder["o"].loss.backward()))
    triton_fwd = [n for n in fwd_names if "rubric_fwd" in n]
    print("rubric_loss fwd kernels:", fwd_names, "bwd kernels:", bwd_names)
    assert len(triton_fwd) == 1
    assert len(fwd_names) == 1  # the fused kernel alone: its counters are self-resetting (_workspace.py)
    assert len([n for n in bwd_names if "rubric_bwd" in n]) == 1 and len(bwd_names) == 1

    def gfwd():
        holder["g"] = zk.gdso_loss(gr, scores, validate=False)

    gf = _count_kernels(gfwd)
    gb = ours(_count_kernels(lambda: holder["g"].loss.backward()))
    print("gdso fwd kernels:", gf, "bwd kernels:", gb)
    assert len([n for n in gf if "gdso_fwd" in n]) == 1 and len(gf) == 1
    assert len(gb) == 1  # the device-side scale by grad_output


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    x, t, teacher, pairs, gaps, gx, scores = _inputs("cuda")
    static_x = x.clone().requires_grad_(True)
    static_g = gx.clone().requires_grad_(True)

    def step():
        o = zk.rubric_loss(static_x, target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps)
        og = zk.gdso_loss(static_g, scores)
        (o.loss + og.loss).backward()
        return o.loss.detach(), og.loss.detach()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            static_x.grad = None
            static_g.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    static_x.grad = None
    static_g.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_r, out_g = step()
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed + 10)
        new_x = torch.randn(x.shape, generator=gen).cuda()
        new_g = torch.randn(gx.shape, generator=gen).cuda()
        with torch.no_grad():
            static_x.copy_(new_x)
            static_g.copy_(new_g)
        graph.replay()
        torch.cuda.synchronize()
        ex = new_x.clone().requires_grad_(True)
        eg = new_g.clone().requires_grad_(True)
        er = zk.rubric_loss(ex, target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps, backend="reference")
        eo = zk.gdso_loss(eg, scores, backend="reference")
        (er.loss + eo.loss).backward()
        from zreward_kernels._workspace import all_zero

        assert all_zero(), "a replay left a semaphore non-zero"
        assert_close(out_r, er.loss, atol=1e-5, name="replayed rubric loss")
        assert_close(out_g, eo.loss, atol=1e-5, name="replayed gdso loss")
        assert_close(static_x.grad, ex.grad, atol=1e-6, rtol=1e-4, name="replayed rubric grad")
        assert_close(static_g.grad, eg.grad, atol=1e-6, rtol=1e-4, name="replayed gdso grad")


def _fwd_bwd(fn, n_args):
    """``fn``'s value and its gradient in the first argument, as a function of exactly ``n_args``
    positional arguments (what make_fx traces)."""
    def run(*args):
        out = fn(*args)
        return out, torch.autograd.grad(out, args[0])[0]
    run.__signature__ = inspect.Signature(
        [inspect.Parameter(f"a{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(n_args)])
    return run


def test_symbolic_sizes_give_the_kernels_no_size_derived_floats(monkeypatch):
    """Under torch.compile(dynamic=True) a float kernel argument computed from a size (``1 / rows``)
    is a SymFloat, and inductor types a symbolic argument that is neither a float constant nor a
    float symbol as an integer: on the H200 the launch failed with "'float' object cannot be
    interpreted as an integer" (2026-11-27).  Scales that depend on sizes are therefore computed in
    the kernels from the integer sizes.  Here every op's fused host path, forward and backward, is
    traced with symbolic sizes (make_fx, what AOT autograd does under dynamo; ``is_compiling`` reads
    True, as it does there, so no cached tensor is made in the trace) and no launch may receive a
    SymFloat."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from zreward_kernels import aot_check

    seen = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    class _Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.name, [type(a).__name__ for a in (*args, *kwargs.values())]))
            return launch

    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in aot_check._KERNELS]
    try:
        with aot_check.intercepted_launches():
            for mod, attr, name in aot_check._KERNELS:
                setattr(mod, attr, _Spy(name))
            g = torch.Generator().manual_seed(2)
            n = 10
            scores = (torch.arange(2, 11) * 0.5)[torch.randint(0, 9, (3, 2), generator=g)]
            cases = [
                (lambda x: (lambda s: s.probs.sum() + s.mean.sum() + s.std.sum())(
                    zk.score_stats(x, temperature=0.5, validate=False)), [torch.randn(n, 4, 9, generator=g)]),
                (lambda x, s: zk.gdso_loss(x, s, validate=False).loss, [torch.randn(3, 2, 4, 9, generator=g), scores]),
            ]
            for red in ("mean", "sum", "none"):
                cases.append((lambda x, t, te, p, gp, red=red: zk.rubric_loss(
                    x, target=t, teacher_logits=te, pairs=p, pair_gaps=gp, reduction=red, validate=False).loss.sum(),
                    [torch.randn(n, 9, generator=g), torch.randint(0, 9, (n,), generator=g),
                     torch.randn(n, 9, generator=g), torch.randint(0, n, (n // 2, 2), generator=g),
                     torch.randn(n // 2, generator=g)]))
            for fn, args in cases:
                gm = make_fx(_fwd_bwd(fn, len(args)), tracing_mode="symbolic")(args[0].requires_grad_(True), *args[1:])
                shape_env = next(n.meta["val"].fake_mode.shape_env for n in gm.graph.nodes
                                 if isinstance(n.meta.get("val"), torch.Tensor))
                # a float made from a size and then passed through float() pins the size: the
                # compiled function was specialised to the traced size (the rubric backward's 1 / rows)
                floats = [str(gd.expr) for gd in shape_env.guards if "ToFloat" in str(gd.expr)]
                assert not floats, floats
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
    # every kernel but the restricted head's projection kernels, which torch.compile never
    # launches (inductor compiles the matrix product there)
    assert {name for name, _ in seen} == {n for _, _, n in aot_check._KERNELS} - {"restricted_fwd", "restricted_bwd"}, \
        seen
    assert any("SymInt" in types for _, types in seen), seen  # the sizes were symbolic
    bad = [(name, types) for name, types in seen if "SymFloat" in types]
    assert not bad, bad


def test_dynamic_compile_does_not_recompile_for_a_new_size(monkeypatch):
    """torch.compile(dynamic=True) of a function that calls an op compiles once for all sizes: the
    bins cache read in the traced call guarded on the cache's contents, which the first call then
    changed, so the second call recompiled (seen with the cache empty, as in a fresh process)."""
    from zreward_kernels import _common
    from zreward_kernels.aot_check import intercepted_launches

    monkeypatch.setattr(_common, "_NORM_CACHE", {})
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    g = torch.Generator().manual_seed(3)
    scores = torch.arange(2, 11) * 0.5
    for fused in (False, True):
        with intercepted_launches() if fused else contextlib.nullcontext():
            for name, fn, make in [
                ("score_stats", lambda x: zk.score_stats(x).mean.sum(), lambda n: (torch.randn(n, 9, generator=g),)),
                ("rubric_loss", lambda x, t: zk.rubric_loss(x, target=t).loss,
                 lambda n: (torch.randn(n, 9, generator=g), torch.randint(0, 9, (n,), generator=g))),
                ("rubric_loss KL+pairs", lambda x, te, p: zk.rubric_loss(
                    x, teacher_logits=te, pairs=p, pair_gaps=torch.zeros(p.shape[0])).loss,
                 lambda n: (torch.randn(n, 9, generator=g), torch.randn(n, 9, generator=g),
                            torch.randint(0, n, (n - 1, 2), generator=g))),
                ("gdso_loss", lambda x, s: zk.gdso_loss(x, s).loss,
                 lambda n: (torch.randn(n, 2, 3, 9, generator=g), scores[torch.randint(0, 9, (n, 2), generator=g)])),
            ]:
                torch._dynamo.reset()
                _common._NORM_CACHE.clear()
                compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
                for n in (5, 7, 11):
                    args = make(n)
                    x = args[0].requires_grad_(True)
                    compiled(x, *args[1:]).backward()  # a recompile raises (error_on_recompile)
                    assert x.grad is not None, name
