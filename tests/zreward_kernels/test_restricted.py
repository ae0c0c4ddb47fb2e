"""restricted_logits and the *_from_hidden ops against the full LM head followed by a gather.

They run on ``kdev``: the CPU (reference backend) here, CUDA (the fused Triton kernels) where present."""

import zlib

import pytest
import torch
from kernel_helpers import assert_close

from zreward_kernels import (
    gdso_loss,
    gdso_loss_from_hidden,
    restricted_logits,
    rubric_loss,
    rubric_loss_from_hidden,
    score_stats,
    score_stats_from_hidden,
)

V, H = 300, 32
IDS = [17, 3, 250, 99, 42, 7, 188, 120, 64]


def _setup(dtype=torch.float32, seed=0, lead=(40,), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * 0.2).to(device, dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(device, dtype)
    return hidden, weight, bias


def _grads(fn, hidden, weight, bias):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    out = fn(h, w, b)
    out.backward()
    return out.detach(), h.grad, w.grad, b.grad


def _full(h, w, b):
    return (h @ w.t() + b)[..., IDS]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_parity_with_full_head_through_rubric_loss(dtype, tol, kdev):
    hidden, weight, bias = _setup(dtype, lead=(20, 3), device=kdev)
    t = torch.randint(0, 9, (20, 3), generator=torch.Generator().manual_seed(1)).to(kdev)
    pairs = torch.tensor([[0, 5], [7, 59], [33, 2]], device=kdev)
    gaps = torch.tensor([0.5, -1.0, 2.0], device=kdev)
    kw = dict(target=t, pairs=pairs, pair_gaps=gaps)

    def full(h, w, b):
        return rubric_loss(_full(h, w, b).float(), **kw).loss

    def restricted(h, w, b):
        return rubric_loss_from_hidden(h, w, IDS, b, **kw).loss

    ref = _grads(full, hidden, weight, bias)
    got = _grads(restricted, hidden, weight, bias)
    for name, a, e in zip(("loss", "hidden", "weight", "bias"), got, ref):
        assert a.dtype == e.dtype, name
        assert_close(a, e, atol=tol, rtol=tol, name=name)
    # only the K used rows of the weight carry gradient
    mask = torch.zeros(V, dtype=torch.bool, device=kdev)
    mask[IDS] = True
    assert float(got[2][~mask].abs().sum()) == 0.0 and float(got[2][mask].abs().sum()) > 0


@pytest.mark.filterwarnings("error::UserWarning")  # torch 2.11 warned "Sparse invariant checks are implicitly disabled"
def test_sparse_weight_gradient_equals_dense_rows(kdev):
    hidden, weight, bias = _setup(device=kdev)

    def loss(mode):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        s = score_stats(restricted_logits(h, w, IDS, b, weight_grad=mode))
        (s.mean.sum() + s.std.sum()).backward()
        return h.grad, w.grad, b.grad

    dh, dw, db = loss("dense")
    sh, sw, sb = loss("sparse")
    assert sw.is_sparse and sb.is_sparse and not dw.is_sparse
    assert sw.coalesce().indices().shape[1] == len(IDS)  # K rows, never a dense [V, H] tensor
    assert_close(sh, dh)
    assert_close(sw.to_dense(), dw)
    assert_close(sb.to_dense(), db)


@pytest.mark.parametrize("wrt", ["hidden", "weight"])
def test_sparse_weight_gradient_is_twice_differentiable(wrt):
    """A second derivative through the sparse path (gradient penalties, Hessian-vector products) equals
    the dense path's: the hidden-state gradient ``g @ W[ids]`` depends on the weight, whose share the
    first version's saved rows lost without an error."""
    hidden, weight, bias = (t.double() for t in _setup(lead=(6,)))

    def second(mode):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        s = score_stats(restricted_logits(h, w, IDS, b, weight_grad=mode), backend="reference")
        first = torch.autograd.grad(s.mean.sum() + s.std.sum(), h if wrt == "hidden" else w, create_graph=True)[0]
        ((first.to_dense() if first.is_sparse else first) ** 2).sum().backward()
        return [t.grad.to_dense() if t.grad.is_sparse else t.grad for t in (h, w, b)]

    for name, a, e in zip(("hidden", "weight", "bias"), second("sparse"), second("dense")):
        assert float(e.abs().sum()) > 0, name
        assert_close(a, e, atol=1e-10, rtol=1e-10, name=name)
    # the rows are gathered again for it: a weight changed in place meanwhile is refused, not misread
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = restricted_logits(h, w, IDS, weight_grad="sparse").sum()
    with torch.no_grad():
        w.mul_(2)
    with pytest.raises(RuntimeError, match="lm_head_weight was modified in place"):
        torch.autograd.grad(out, h, create_graph=True)


def test_sparse_weight_gradient_under_torch_compile():
    """Dynamo cannot trace sparse COO tensors: under torch.compile the sparse path runs eagerly (a graph
    break, same gradients), and with fullgraph=True the error says why and what compiles instead."""
    hidden, weight, bias = _setup(device="cpu")

    def loss(h, w, b):
        return (restricted_logits(h, w, IDS, b, weight_grad="sparse") ** 2).sum()

    grads = []
    for fn in (loss, torch.compile(loss, backend="aot_eager")):
        torch._dynamo.reset()
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        fn(h, w, b).backward()
        assert w.grad.is_sparse and b.grad.is_sparse
        grads.append((h.grad, w.grad.to_dense(), b.grad.to_dense()))
    for name, a, e in zip(("hidden", "weight", "bias"), grads[1], grads[0]):
        assert_close(a, e, name=name)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="weight_grad='sparse' runs eagerly.*weight_grad='dense'"):
        torch.compile(loss, backend="aot_eager", fullgraph=True)(hidden, weight.clone().requires_grad_(True), bias)
    # torch.func transforms: the autograd.Function has no functorch rules (torch said "must override the
    # setup_context staticmethod"); dense works there
    with pytest.raises(ValueError, match="weight_grad='sparse' cannot run under torch.func transforms"):
        torch.func.grad(lambda h: loss(h, weight, bias))(hidden)
    dense = torch.func.grad(lambda h: (restricted_logits(h, weight, IDS, bias) ** 2).sum())(hidden)
    assert_close(dense, grads[0][0], name="dense under torch.func.grad")


def test_frozen_weight_gets_no_gradient(kdev):
    hidden, weight, _ = _setup(device=kdev)
    h = hidden.clone().requires_grad_(True)
    out = score_stats_from_hidden(h, weight, IDS)
    out.mean.sum().backward()
    assert weight.grad is None and h.grad is not None


def test_score_stats_and_gdso_from_hidden(kdev):
    hidden, weight, bias = _setup(lead=(4, 2, 3), device=kdev)
    s1 = score_stats_from_hidden(hidden, weight, torch.tensor(IDS, device=kdev), bias)
    s2 = score_stats(_full(hidden, weight, bias))
    for a, b in zip(s1, s2):
        assert_close(a, b)
    scores = torch.tensor([[4.5, 2.0], [3.0, 3.0], [1.0, 5.0], [2.5, 2.0]], device=kdev)
    g1 = gdso_loss_from_hidden(hidden, weight, IDS, scores, bias)
    g2 = gdso_loss(_full(hidden, weight, bias), scores)
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_mixed_dtypes_cast_rows_to_hidden(kdev):
    hidden, weight, _ = _setup(device=kdev)
    out = restricted_logits(hidden.to(torch.bfloat16), weight, IDS)
    assert out.dtype == torch.bfloat16
    assert_close(out, (hidden.to(torch.bfloat16) @ weight[IDS].to(torch.bfloat16).t()), atol=1e-2, rtol=1e-2)


def test_bad_inputs(kdev):
    hidden, weight, bias = _setup(device=kdev)
    with pytest.raises(ValueError, match="token_ids must be distinct"):
        restricted_logits(hidden, weight, [3, 5, 3])
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 300\)"):
        restricted_logits(hidden, weight, [3, 300])
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 300\)"):
        restricted_logits(hidden, weight, [-1, 4])
    with pytest.raises(TypeError, match="token_ids must be an int32/int64 tensor"):
        restricted_logits(hidden, weight, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least one id"):
        restricted_logits(hidden, weight, [])
    with pytest.raises(ValueError, match=r"hidden's last dimension \(31\) must equal lm_head_weight's H \(32\)"):
        restricted_logits(hidden[:, :31], weight, IDS)
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[V, H\]"):
        restricted_logits(hidden, weight[None], IDS)
    with pytest.raises(ValueError, match=r"bias must be \[V\] = \[300\]"):
        restricted_logits(hidden, weight, IDS, bias[:10])
    with pytest.raises(ValueError, match="weight_grad must be one of"):
        restricted_logits(hidden, weight, IDS, weight_grad="rows")
    with pytest.raises(TypeError, match="hidden must be a floating-point tensor"):
        restricted_logits(hidden.long(), weight, IDS)
    meta = dict(device="meta")  # a device that differs from kdev, whatever kdev is
    with pytest.raises(ValueError, match=f"lm_head_weight is on meta but hidden is on {kdev}"):
        restricted_logits(hidden, weight.to(**meta), IDS)
    with pytest.raises(ValueError, match=f"bias is on meta but hidden is on {kdev}"):
        restricted_logits(hidden, weight, IDS, bias.to(**meta))
    with pytest.raises(ValueError, match=f"token_ids is on meta but hidden is on {kdev}"):
        restricted_logits(hidden, weight, torch.tensor(IDS, **meta))
    for x in (hidden, hidden[:5].reshape(5, 1, H), hidden[0]):  # 2-D (returned as is), 3-D and 1-D hidden
        out = restricted_logits(x, weight, torch.tensor(IDS, device=kdev, dtype=torch.int32), bias)
        assert out.shape == (*x.shape[:-1], len(IDS))
        assert_close(out, _full(x, weight, bias), atol=1e-5, rtol=1e-5)


def _kernel_on(monkeypatch, kdev, **cfg):
    """The Triton projection (restricted_fwd.KERNEL=1, the default) on the CPU interpreter too."""
    from zreward_kernels._tuning import override

    if kdev.type == "cpu":
        monkeypatch.setenv("ZREWARD_BACKEND", "triton")
    return override("restricted_fwd", KERNEL=1, **cfg)


def _kernel_off():
    """The matrix product (restricted_fwd.KERNEL=0): on CUDA the projection is the default, so a
    comparison with the product must ask for it."""
    from zreward_kernels._tuning import override

    return override("restricted_fwd", KERNEL=0)


@pytest.mark.parametrize("case", ["plain", "bias", "3-D row-strided hidden", "column-strided hidden", "odd sizes",
                                  "one row", "no rows", "blocks 32x64", "int32 ids"])
def test_triton_projection_equals_the_matrix_product(kdev, monkeypatch, case):
    """The no-grad projection kernel against ``hidden @ W[ids].T (+ b[ids])`` computed in float64:
    rows not a multiple of the row block, H not a multiple of the H chunk, K from 2 to 17 (padded to
    the 16-wide tensor-core side), a bias, hidden rows with a stride (read in place), a hidden whose
    last dimension has a stride (copied), a 3-D hidden."""
    import zreward_kernels as zk

    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))  # (str hashes differ between processes)
    n, h, v, k, cfg = 40, 96, 300, 9, {}
    if case == "odd sizes":
        n, h, k = 37, 301, 17
    elif case == "one row":
        n, k = 1, 2
    elif case == "no rows":
        n = 0
    elif case == "blocks 32x64":
        n, cfg = 70, dict(BLOCK_N=32, BLOCK_H=64)
    hidden = torch.randn(n, 2 * h if "strided" in case else h, generator=g)
    if case == "3-D row-strided hidden":
        hidden = hidden[:, :h].reshape(n // 4, 4, h)
        assert hidden.stride() == (4 * 2 * h, 2 * h, 1)  # a view: the kernel reads rows 2H apart
    elif case == "column-strided hidden":
        hidden = hidden[:, ::2]
    weight = torch.randn(v, h, generator=g) * 0.2
    bias = torch.randn(v, generator=g) if case == "bias" else None
    ids = torch.randperm(v, generator=g)[:k]
    if case == "int32 ids":
        ids = ids.int()
    hidden, weight, ids = hidden.to(kdev), weight.to(kdev), ids.to(kdev)
    bias = bias.to(kdev) if bias is not None else None
    want = hidden.double() @ weight.double()[ids.long()].t() + (0 if bias is None else bias.double()[ids.long()])
    with torch.no_grad(), _kernel_on(monkeypatch, kdev, **cfg):
        got = restricted_logits(hidden, weight, ids, bias)
    assert zk.backend_info()["last_backend"]["restricted_logits"] == "triton"
    assert got.shape == (*hidden.shape[:-1], k) and got.dtype == torch.float32
    assert_close(got, want.float(), atol=2e-5, rtol=2e-5, name=case)


@pytest.mark.cuda
def test_triton_projection_bf16_equals_the_matrix_product(kdev, monkeypatch):
    """bf16 hidden with an fp32 weight and bias (master weights): the kernel casts the K rows to
    bf16, accumulates in fp32, rounds once to bf16 and adds the bias in bf16, as the product does."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(1024, 3584, generator=g).to(kdev, torch.bfloat16)
    weight = (torch.randn(2000, 3584, generator=g) * 0.02).to(kdev)
    bias = torch.randn(2000, generator=g).to(kdev)
    ids = torch.tensor(IDS, device=kdev)
    want = restricted_logits(hidden, weight, ids, bias)
    with torch.no_grad(), _kernel_on(monkeypatch, kdev):
        got = restricted_logits(hidden, weight, ids, bias)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)


def _product_grads(kdev, monkeypatch, kernel, hidden, weight, ids, bias, wants, loss_fn, **cfg):
    """``(out, grads of the inputs named in wants)`` of ``loss_fn(restricted_logits(...))`` with the
    Triton projection on (``kernel``: checked to have run) or the matrix product (KERNEL=0: on CUDA
    the projection is the default, so the product must be asked for)."""
    from zreward_kernels._dispatch import _LAST_BACKEND

    _LAST_BACKEND.pop("restricted_logits", None)
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": None if bias is None else bias.clone()}
    for name in wants:
        leaves[name].requires_grad_(True)
    ctx = _kernel_on(monkeypatch, kdev, **cfg) if kernel else _kernel_off()
    with ctx:
        out = restricted_logits(leaves["hidden"], leaves["weight"], ids, leaves["bias"])
        grads = torch.autograd.grad(loss_fn(out), [leaves[n] for n in wants])
    assert _LAST_BACKEND.get("restricted_logits") == ("triton" if kernel else None)
    return out.detach(), dict(zip(wants, grads))


@pytest.mark.parametrize("case", ["frozen weight", "weight and bias", "weight, 3-D hidden", "weight, frozen hidden",
                                  "odd sizes", "column-strided hidden", "blocks 32x64", "one row", "no rows",
                                  "upstream from sum"])
def test_triton_projection_gradients_equal_the_matrix_product(kdev, monkeypatch, case):
    """With gradients (KERNEL=1) the forward kernel and the hidden-state gradient kernel against the
    product path's autograd, and both against float64: hidden rows and H not multiples of the tiles,
    K = 17 (padded to 32), a 3-D or column-strided hidden, an upstream gradient with zero strides
    (``.sum()``'s, read in place), dense weight and bias gradients that are zero outside the K rows."""
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    n, h, v, k, cfg = 40, 96, 300, 9, {}
    wants = {"frozen weight": ("hidden",), "weight, frozen hidden": ("weight",)}.get(case, ("hidden", "weight"))
    if case == "odd sizes":
        n, h, k = 37, 301, 17
    elif case == "blocks 32x64":
        n = 70
        cfg = dict(BLOCK_N=32, BLOCK_H=64)
    elif case == "one row":
        n, k = 1, 2
    elif case == "no rows":
        n = 0
    hidden = torch.randn(n, 2 * h if "strided" in case else h, generator=g)
    if case == "column-strided hidden":
        hidden = hidden[:, ::2]
    elif case.endswith("3-D hidden"):
        hidden = hidden.reshape(n // 4, 4, h)
    weight = torch.randn(v, h, generator=g) * 0.2
    bias = torch.randn(v, generator=g) if case == "weight and bias" else None
    if bias is not None:
        wants = wants + ("bias",)
    ids = torch.randperm(v, generator=g)[:k]
    up = torch.randn(*hidden.shape[:-1], k, generator=g).to(kdev)

    def loss_fn(out):
        return out.sum() if case == "upstream from sum" else (out * up).sum()

    hidden, weight, ids = hidden.to(kdev), weight.to(kdev), ids.to(kdev)
    bias = bias.to(kdev) if bias is not None else None
    from zreward_kernels._tuning import override

    with override("restricted_bwd", **cfg):  # other tiles: both kernels' (the forward's through _kernel_on)
        got_out, got = _product_grads(kdev, monkeypatch, True, hidden, weight, ids, bias, wants, loss_fn, **cfg)
    want_out, want = _product_grads(kdev, monkeypatch, False, hidden.double(), weight.double(), ids,
                                    None if bias is None else bias.double(), wants, loss_fn if case == "upstream from sum"
                                    else (lambda out: (out * up.double()).sum()))
    assert_close(got_out, want_out.float(), atol=2e-5, rtol=2e-5, name=f"{case}: logits")
    for name in wants:
        assert got[name].dtype == torch.float32 and got[name].shape == want[name].shape, name
        assert_close(got[name], want[name].float(), atol=5e-5, rtol=2e-5, name=f"{case}: d{name}")
    if "weight" in wants:
        outside = torch.ones(v, dtype=torch.bool, device=kdev)
        outside[ids] = False
        assert not got["weight"][outside].any()  # dense [V, H], zero outside the K rows


def test_triton_projection_is_twice_differentiable(kdev, monkeypatch):
    """backward with create_graph=True through the Triton path gives the product path's second
    derivatives (hidden, weight rows and bias): its backward runs differentiable PyTorch then."""
    hidden, weight, bias = _setup(device=kdev)
    ids = torch.tensor(IDS, device=kdev)

    def second(kernel):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        with (_kernel_on(monkeypatch, kdev) if kernel else _kernel_off()):
            out = restricted_logits(h, w, ids, b)
            first = torch.autograd.grad((out ** 3).sum(), [h, w, b], create_graph=True)
            return first + torch.autograd.grad(sum((f ** 2).sum() for f in first), [h, w, b])

    from zreward_kernels._dispatch import _LAST_BACKEND

    _LAST_BACKEND.pop("restricted_logits", None)
    got = second(True)
    assert _LAST_BACKEND["restricted_logits"] == "triton"
    for a, b in zip(got, second(False)):  # (cubes: the logits' last-bit differences grow through them)
        assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_triton_projection_backward_uses_the_forwards_rows(kdev, monkeypatch):
    """A frozen weight changed in place between forward and backward: the hidden-state gradient uses
    the rows the forward used (kept, K x H), as the product path's does; with create_graph=True and a
    trained weight, whose rows are gathered again then, the change is refused, not used silently."""
    hidden, weight, _ = _setup(device=kdev)
    ids = torch.tensor(IDS, device=kdev)
    grads = []
    for kernel in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone()
        with (_kernel_on(monkeypatch, kdev) if kernel else _kernel_off()):
            out = restricted_logits(h, w, ids)
        w.mul_(2.0)
        out.sum().backward()
        grads.append(h.grad)
    assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    assert_close(grads[0], weight[IDS].sum(0).expand_as(hidden), atol=1e-6, rtol=1e-6)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with _kernel_on(monkeypatch, kdev):
        out = restricted_logits(h, w, ids)
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match="lm_head_weight was modified in place"):
        torch.autograd.grad(out.sum(), [h], create_graph=True)


def test_triton_projection_forward_writes_the_rows_itself(kdev, monkeypatch):
    """With gradients the forward kernel also writes the K weight rows the backward needs, so the
    forward runs no separate gather (``index_select``, one more launch in a captured step); the
    backward's hidden-state gradient still equals ``g @ W[ids]``.  Chunks of H are spread over the
    programs: 40 rows in blocks of 16 (3 programs) against 96 / 16 = 6 chunks, and one program."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weight, _ = _setup(device=kdev)
    ids = torch.tensor(IDS, device=kdev)
    up = torch.randn(hidden.shape[0], len(IDS), generator=torch.Generator().manual_seed(3)).to(kdev)
    for n_rows, cfg in ((40, dict(BLOCK_N=16, BLOCK_H=16)), (7, dict(BLOCK_N=16, BLOCK_H=32))):
        h = hidden[:n_rows].clone().requires_grad_(True)
        with _kernel_on(monkeypatch, kdev, **cfg):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = restricted_logits(h, weight, ids, validate=False)
            (out * up[:n_rows]).sum().backward()
        ops = {e.key for e in prof.key_averages()}
        assert "aten::index_select" not in ops, sorted(ops)
        assert_close(h.grad, up[:n_rows] @ weight[IDS], atol=1e-5, rtol=1e-5, name=f"{n_rows} rows: dhidden")


@pytest.mark.cuda
def test_triton_projection_bf16_gradients_equal_the_matrix_product(kdev, monkeypatch):
    """bf16 at the benchmark's shapes (H = 3584, N = 1024), frozen weight, trained, and trained fp32
    master weights: the hidden-state gradient kernel rounds its fp32 sums once to bf16, as the
    product's backward does."""
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(1024, 3584, generator=g).to(kdev, torch.bfloat16)
    weight = (torch.randn(2000, 3584, generator=g) * 0.02).to(kdev, torch.bfloat16)
    ids = torch.tensor(IDS, device=kdev)
    up = torch.randn(1024, 9, generator=g).to(kdev, torch.bfloat16)
    master = weight.float()  # fp32 master weights: rows cast to bf16, their gradient cast back
    for w, wants in ((weight, ("hidden",)), (weight, ("hidden", "weight")), (master, ("hidden", "weight"))):
        got_out, got = _product_grads(kdev, monkeypatch, True, hidden, w, ids, None, wants,
                                      lambda out: (out * up).sum())
        want_out, want = _product_grads(kdev, monkeypatch, False, hidden, w, ids, None, wants,
                                        lambda out: (out * up).sum())
        assert_close(got_out.float(), want_out.float(), atol=2e-2, rtol=1e-2)
        for name in wants:
            assert got[name].dtype == want[name].dtype == (w.dtype if name == "weight" else torch.bfloat16)
            assert_close(got[name].float(), want[name].float(), atol=2e-2, rtol=1e-2, name=name)
            # and relative to the gradient's size (the hidden-state gradient is ~6e-2 per entry here)
            a, b = got[name].float(), want[name].float()
            assert b.norm() > 0 and (a - b).norm() <= 1e-2 * b.norm(), (name, float((a - b).norm() / b.norm()))


def test_triton_projection_only_where_it_applies(kdev, monkeypatch):
    """KERNEL=0 never runs the kernels; with KERNEL=1 (the default) a strided weight (rows not unit
    stride) keeps the matrix product (no copy of the weight), a gradient call takes the kernels
    (the product's gradient as before), and under autocast the product runs in autocast's dtype."""
    import zreward_kernels as zk
    from zreward_kernels._dispatch import _LAST_BACKEND
    from zreward_kernels._tuning import DEFAULT_CONFIGS, override

    assert DEFAULT_CONFIGS["restricted_fwd"]["KERNEL"] == 1
    hidden, weight, bias = _setup(device=kdev)
    _LAST_BACKEND.pop("restricted_logits", None)
    if kdev.type == "cpu":
        monkeypatch.setenv("ZREWARD_BACKEND", "triton")  # the interpreter: the Triton backend chosen, still no kernel
    with override("restricted_fwd", KERNEL=0):
        with torch.no_grad():
            restricted_logits(hidden, weight, IDS, bias)
        h = hidden.clone().requires_grad_(True)
        score_stats_from_hidden(h, weight, IDS).mean.sum().backward()
    assert "restricted_logits" not in zk.backend_info()["last_backend"]  # KERNEL=0: the product, no choice made
    monkeypatch.delenv("ZREWARD_BACKEND", raising=False)
    with _kernel_on(monkeypatch, kdev):
        wt = weight.t().contiguous().t()  # [V, H] with stride (1, V)
        with torch.no_grad():
            restricted_logits(hidden, wt, IDS)
        assert "restricted_logits" not in zk.backend_info()["last_backend"]
        h = hidden.clone().requires_grad_(True)
        out = restricted_logits(h, weight, IDS, bias)
        assert zk.backend_info()["last_backend"]["restricted_logits"] == "triton"
        out.sum().backward()
        assert_close(h.grad, weight[IDS].sum(0).expand_as(h), atol=1e-6, rtol=1e-6)
        with torch.no_grad():
            out = restricted_logits(hidden, weight, IDS)
        assert_close(out, hidden @ weight[IDS].t(), atol=1e-5, rtol=1e-5)
        _LAST_BACKEND.pop("restricted_logits", None)
        with torch.no_grad(), torch.autocast(kdev.type, dtype=torch.bfloat16):  # autocast: the product, its dtype
            out = restricted_logits(hidden, weight, IDS)
        assert out.dtype == torch.bfloat16 and "restricted_logits" not in zk.backend_info()["last_backend"]


def _fused_calls(monkeypatch):
    """Counts of the fused score_stats_from_hidden launches (forward, backward), by spying on its
    host launchers; the composition's own kernels are refused while a fused path is expected."""
    from zreward_kernels import restricted as R

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = R._project_stats_triton, R._ProjectedStatsFn.backward

    def spy_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def spy_bwd(ctx, *g):
        calls["bwd"] += 1
        return bwd(ctx, *g)

    monkeypatch.setattr(R, "_project_stats_triton", spy_fwd)
    monkeypatch.setattr(R._ProjectedStatsFn, "backward", staticmethod(spy_bwd))
    return calls


@pytest.mark.parametrize("case", ["all outputs", "mean from sum", "std only", "probs only", "3-D hidden, bias",
                                  "odd sizes, 5 bins, temperature", "blocks 32x64", "one row", "no grad"])
def test_fused_score_stats_from_hidden_equals_the_composition(kdev, monkeypatch, case):
    """With the Triton projection on and a frozen head, score_stats_from_hidden is one launch forward
    and one backward (projection and statistics fused); values and hidden-state gradients equal
    score_stats(restricted_logits(...)) on the matrix product and float64, for every mix of
    upstream gradients (probs, mean, std; .sum()'s zero strides), bins other than nine, a
    temperature, a bias, a 3-D hidden, rows and H not multiples of the tiles, one row, no grad."""
    from zreward_kernels import BIN_VALUES
    from zreward_kernels import reference as ref
    from zreward_kernels._tuning import override

    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    n, h, v, bins, tau, cfg = 40, 96, 300, None, 1.0, {}
    if case.startswith("odd sizes"):
        n, h, bins, tau = 37, 301, (1.0, 2.0, 3.0, 4.0, 5.0), 0.7
    elif case == "blocks 32x64":
        n, cfg = 70, dict(BLOCK_N=32, BLOCK_H=64)
    elif case == "one row":
        n = 1
    k = len(bins) if bins else 9
    hidden = torch.randn(n, h, generator=g)
    if case.startswith("3-D"):
        hidden = hidden.reshape(n // 4, 4, h)
    weight = torch.randn(v, h, generator=g) * 0.2
    bias = torch.randn(v, generator=g) if "bias" in case else None
    ids = torch.randperm(v, generator=g)[:k]
    lead = hidden.shape[:-1]
    ups = [torch.randn(*lead, k, generator=g), torch.randn(*lead, generator=g), torch.randn(*lead, generator=g)]
    kw = dict(bin_values=bins or BIN_VALUES, temperature=tau)

    def loss_fn(s, up):
        if case == "mean from sum":
            return s.mean.sum()
        if case.startswith("3-D"):  # every upstream gradient expanded (zero strides), probs' 3-D too
            return s.probs.sum() * 0.5 + s.mean.sum() + s.std.sum()
        used = {"std only": (2,), "probs only": (0,)}.get(case, (0, 1, 2))
        return sum((s[i] * up[i]).sum() for i in used)

    def run(kernel, dtype=torch.float32):
        x = hidden.to(kdev, dtype).requires_grad_(case != "no grad")
        w, b = weight.to(kdev, dtype), None if bias is None else bias.to(kdev, dtype)
        with override("restricted_fwd", KERNEL=int(kernel), **cfg), override("restricted_bwd", **cfg):
            if kernel and kdev.type == "cpu":
                monkeypatch.setenv("ZREWARD_BACKEND", "triton")
            s = (score_stats_from_hidden(x, w, ids.to(kdev), b, **kw) if kernel or dtype == torch.float32 else
                 ref.score_stats(restricted_logits(x, w, ids.to(kdev), b), tuple(kw["bin_values"]), tau))
            monkeypatch.delenv("ZREWARD_BACKEND", raising=False)
        grad = None
        if case != "no grad":
            grad, = torch.autograd.grad(loss_fn(s, [u.to(kdev, dtype) for u in ups]), [x])
        return s, grad

    calls = _fused_calls(monkeypatch)
    got, got_grad = run(True)
    assert calls == {"fwd": 1, "bwd": 0 if case == "no grad" else 1}
    composed, composed_grad = run(False)
    want, want_grad = run(False, torch.float64)
    assert calls["fwd"] == 1  # the composition did not take the fused path
    for name, a, b_, c in zip(("probs", "mean", "std"), got, composed, want):
        assert a.dtype == torch.float32 and a.shape == c.shape == (*lead, k)[: a.dim()]
        assert_close(a, b_, atol=2e-6, rtol=2e-6, name=f"{case}: {name} vs the composition")
        assert_close(a, c, atol=1e-5, rtol=1e-5, name=f"{case}: {name} vs float64")
    if case != "no grad":
        assert got_grad.dtype == torch.float32 and got_grad.shape == hidden.shape
        assert_close(got_grad, composed_grad, atol=2e-6, rtol=2e-6, name=f"{case}: dhidden vs the composition")
        assert_close(got_grad, want_grad, atol=2e-5, rtol=1e-5, name=f"{case}: dhidden vs float64")


def test_fused_score_stats_from_hidden_falls_back_and_fails_alike(kdev, monkeypatch):
    """Where the fused path does not apply it composes, with the same results and errors: a head
    that trains (its gradient needs the logits' gradient), token ids fewer than the bins (the
    composition's error); non-finite logits are refused by name after the fused launch as before
    it; a second derivative through the fused path is refused like score_stats'."""
    from zreward_kernels._tuning import override

    hidden, weight, bias = _setup(device=kdev)
    ids = torch.tensor(IDS, device=kdev)
    calls = _fused_calls(monkeypatch)
    with _kernel_on(monkeypatch, kdev):
        w = weight.clone().requires_grad_(True)
        s = score_stats_from_hidden(hidden, w, ids, bias)
        s.mean.sum().backward()
        assert calls["fwd"] == 0 and w.grad is not None and w.grad[IDS].abs().sum() > 0
        with pytest.raises(ValueError, match="last dimension of size 9"):
            score_stats_from_hidden(hidden, weight, ids[:5], bias)
        bad = hidden.clone()
        bad[3, 0] = float("inf")
        errors = []
        for kernel in (1, 0):
            with override("restricted_fwd", KERNEL=kernel), pytest.raises(ValueError) as info:
                score_stats_from_hidden(bad, weight, ids, bias)
            errors.append(str(info.value))
        assert calls["fwd"] == 1 and errors[0] == errors[1] and "logits" in errors[0], errors
        h = hidden.clone().requires_grad_(True)
        s = score_stats_from_hidden(h, weight, ids, bias)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(s.mean.sum(), [h], create_graph=True)


@pytest.mark.cuda
def test_fused_score_stats_from_hidden_bf16(kdev, monkeypatch):
    """bf16 at the benchmark's shapes (H = 3584, N = 1024): the fused launches against the
    composition on the matrix product (probs, mean, std and the hidden-state gradient of mean + std)."""
    from zreward_kernels._tuning import override

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1024, 3584, generator=g).to(kdev, torch.bfloat16)
    weight = (torch.randn(2000, 3584, generator=g) * 0.02).to(kdev, torch.bfloat16)
    ids = torch.tensor(IDS, device=kdev)
    calls = _fused_calls(monkeypatch)
    results = []
    for kernel in (1, 0):
        x = hidden.clone().requires_grad_(True)
        with override("restricted_fwd", KERNEL=kernel):
            s = score_stats_from_hidden(x, weight, ids, validate=False)
        (s.mean.sum() + s.std.sum()).backward()
        results.append((s, x.grad))
    assert calls == {"fwd": 1, "bwd": 1}
    (got, got_grad), (want, want_grad) = results
    assert got_grad.dtype == torch.bfloat16
    # relative to each tensor's size (the hidden-state gradient is ~1e-2 per entry here: an absolute
    # bf16 tolerance would pass a zero gradient); bf16 logits differ in their last bits between the
    # kernel's and cuBLAS's sums, which moves the statistics and gradients by about 1% at most
    for name, a, b in zip(("probs", "mean", "std", "dhidden"), (*got, got_grad), (*want, want_grad)):
        a, b = a.float(), b.float()
        assert b.norm() > 0 and (a - b).norm() <= 3e-2 * b.norm(), (name, float((a - b).norm() / b.norm()))
