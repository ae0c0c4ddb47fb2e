"""Vocab-restricted score head: the K score-token logits without the full-vocabulary projection.

A reward VLM only needs the logits of its K score tokens at each score position; the usual path
computes all V (about 152k for Qwen) and gathers K.  ``restricted_logits`` gathers the K rows of
the LM head first and projects onto them: ``hidden [..., H] @ W[token_ids].T -> [..., K]``.

Gradients reach ``hidden`` and, when the weight requires grad, the K used rows of the weight:

* ``weight_grad="dense"`` (default): plain autograd; the weight's gradient is the dense ``[V, H]``
  tensor the full head would also produce (zeros outside the K rows) -- what standard optimizers
  such as AdamW expect;
* ``weight_grad="sparse"``: the weight's gradient is a sparse COO tensor holding only the K rows
  (as ``nn.Embedding(sparse=True)`` does), so no dense ``[V, H]`` gradient is ever allocated; use
  an optimizer that accepts sparse gradients, or keep the rows as their own parameter
  (:class:`zreward.heads.RestrictedHead`).  Under ``torch.compile`` this path runs eagerly (a
  graph break: Dynamo cannot trace sparse tensors; with ``fullgraph=True`` an error that says so);
* a frozen weight (``requires_grad=False``) gets no gradient at all.

The projection can run as one Triton kernel instead of a gather and a matrix product, and with
gradients its hidden-state gradient ``g @ W[ids]`` as a second one (:class:`_ProjectionFn`; the
weight and bias gradients stay matrix products and sums): the default where it applies, chosen in the
launch table (``restricted_fwd.KERNEL``; see :func:`_projection_kernel_applies`).

The ``*_from_hidden`` entry points compose the projection with the fused rubric ops (with the
projection kernel and a frozen head, ``score_stats_from_hidden`` fuses the two: one launch each
way, see :class:`_ProjectedStatsFn`).  The only
row-proportional intermediate they add is the ``[N, K]`` logits tensor (K = 9: 36 bytes per row in
fp32, against the ``H * 2`` bytes of each bf16 hidden row the caller already holds), so peak extra
memory stays flat in V and tiny in N without chunking; ``bench/test_bench_restricted.py`` measures it.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import torch

from . import ops as _ops
from ._common import (BIN_VALUES, DataChecks, bins_tensor, check_finite_logits, check_float_tensor,
                      check_same_device, check_temperature, data_checks_enabled, first_order_only, forward_ad_dual,
                      functorch_wrapped, normalize_bins)
from ._dispatch import launch_device
from ._triton_utils import HAS_TRITON, cdiv, next_pow2, tl, triton
from ._tuning import CONFIGS
from .ops import gdso_loss, rubric_loss, score_stats
from .reference import GDSOOutput, RubricLossOutput, ScoreStats
from .rubric import _skip_zero_grads, _vec

if HAS_TRITON:
    from .rubric import _dist_stats, _stats_dlogits_tile, _tile_index

_WEIGHT_GRAD = ("dense", "sparse")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAS_TRITON:

    @triton.jit
    def _project_rows(
        X, stride_x, W, stride_w, IDS, B, OUT, ROWS, H, pid, rows, rmask, ks, kmask,
        HAS_BIAS: tl.constexpr, STORE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """The logits of program ``pid``'s ``BLOCK_N`` hidden rows (``rows``, ``ks`` and their masks from
        rubric's ``_tile_index``), in OUT's dtype. BLOCK_N rows of hidden against the K gathered weight
        rows, walking H in BLOCK_H chunks with one [BLOCK_N, BLOCK_H] x [BLOCK_H, BLOCK_K] tensor-core
        product each, accumulated in float32; the weight rows are cast to hidden's dtype first, as the
        matmul path does, and the result is rounded to it once (then the bias is added in that dtype).
        STORE_ROWS (a call with gradients): the gathered rows, as loaded (the weight's dtype), are also
        written to ROWS [K, H] for the backward -- chunk c by program c % programs, so the stores are spread
        over the programs -- instead of a separate gather launch."""
        ids = tl.load(IDS + ks, mask=kmask, other=0)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            hmask = hs < H
            x = tl.load(X + rows[:, None] * stride_x + hs[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
            w = tl.load(W + ids[:, None] * stride_w + hs[None, :], mask=kmask[:, None] & hmask[None, :], other=0.0)
            if STORE_ROWS:
                if (h0 // BLOCK_H) % tl.num_programs(0) == pid:
                    tl.store(ROWS + ks[:, None].to(tl.int64) * H + hs[None, :], w,
                             mask=kmask[:, None] & hmask[None, :])
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
        o = acc.to(OUT.dtype.element_ty)
        if HAS_BIAS:
            b = tl.load(B + ids, mask=kmask, other=0.0).to(OUT.dtype.element_ty)
            o = (o.to(tl.float32) + b.to(tl.float32)[None, :]).to(OUT.dtype.element_ty)
        return o

    @triton.jit
    def _restricted_fwd_kernel(
        X, stride_x, W, stride_w, IDS, B, OUT, ROWS, n_rows, H, K,
        HAS_BIAS: tl.constexpr, STORE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # the logits [N, K] of hidden x W[ids].T (+ b[ids]): see _project_rows
        pid = tl.program_id(0)
        rows, rmask, ks, kmask, m2 = _tile_index(pid, n_rows, K, BLOCK_N, BLOCK_K)
        o = _project_rows(X, stride_x, W, stride_w, IDS, B, OUT, ROWS, H, pid, rows, rmask, ks, kmask, HAS_BIAS,
                          STORE_ROWS, BLOCK_N, BLOCK_K, BLOCK_H, PRECISION)
        tl.store(OUT + rows[:, None] * K + ks[None, :], o, mask=m2)

    @triton.jit
    def _restricted_stats_fwd_kernel(
        X, stride_x, W, stride_w, IDS, B, OUT, ROWS, V, PROBS, MEAN, STD, n_rows, H, K, inv_tau,
        HAS_BIAS: tl.constexpr, STORE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # score_stats_from_hidden in one launch: the logits as _restricted_fwd_kernel makes them (kept
        # in OUT for the backward), then score_stats' softmax, mean and std of them, as its kernel
        # computes them from the stored logits
        pid = tl.program_id(0)
        rows, rmask, ks, kmask, m2 = _tile_index(pid, n_rows, K, BLOCK_N, BLOCK_K)
        o = _project_rows(X, stride_x, W, stride_w, IDS, B, OUT, ROWS, H, pid, rows, rmask, ks, kmask, HAS_BIAS,
                          STORE_ROWS, BLOCK_N, BLOCK_K, BLOCK_H, PRECISION)
        tl.store(OUT + rows[:, None] * K + ks[None, :], o, mask=m2)
        v = tl.load(V + ks, mask=kmask, other=0.0).to(tl.float32)
        p, logp, mu, d, var = _dist_stats(o.to(tl.float32), v, kmask, inv_tau)
        tl.store(PROBS + rows[:, None] * K + ks[None, :], p, mask=m2)
        tl.store(MEAN + rows, mu, mask=rmask)
        tl.store(STD + rows, tl.sqrt(tl.maximum(var, 0.0)), mask=rmask)

    @triton.jit
    def _restricted_bwd_kernel(
        G, stride_gn, stride_gk, WK, stride_w, DX, n_rows, H, K,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # The hidden-state gradient dX = G @ WK ([N, K] x [K, H], WK the K weight rows gathered by
        # the forward): one program per [BLOCK_N, BLOCK_H] tile of dX, one tensor-core product over
        # the K (padded) score tokens.  G is read through its strides (the expanded ones of a .sum()
        # need no copy) and cast, like the rows, to dX's dtype (hidden's), as the matrix product's
        # backward does; fp32 accumulation, rounded once.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = rows < n_rows
        hmask = hs < H
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K
        g = tl.load(G + rows[:, None] * stride_gn + ks[None, :] * stride_gk, mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(WK + ks[:, None] * stride_w + hs[None, :], mask=kmask[:, None] & hmask[None, :], other=0.0)
        dt = DX.dtype.element_ty
        acc = tl.dot(g.to(dt), w.to(dt), input_precision=PRECISION)
        tl.store(DX + rows[:, None] * H + hs[None, :], acc.to(dt), mask=rmask[:, None] & hmask[None, :])

    @triton.jit
    def _restricted_stats_bwd_kernel(
        LOGITS, V, K, inv_tau, DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd, WK, stride_w, DX, n_rows, H,
        HAS_DP: tl.constexpr, HAS_DMU: tl.constexpr, HAS_DSTD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # score_stats_from_hidden's hidden-state gradient in one launch: each [BLOCK_N, BLOCK_H] tile
        # of dX recomputes its rows' dL/dlogits from the kept logits as score_stats' backward does
        # (rounded to the logits' dtype, as that kernel writes it), then multiplies by the K rows as
        # _restricted_bwd_kernel does
        rows, rmask, cols, cmask, m2 = _tile_index(tl.program_id(0), n_rows, K, BLOCK_N, BLOCK_K)
        g = _stats_dlogits_tile(LOGITS, K, V, inv_tau, DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd,
                                rows, rmask, cols, cmask, m2, BLOCK_N, HAS_DP, HAS_DMU, HAS_DSTD)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = hs < H
        w = tl.load(WK + cols[:, None] * stride_w + hs[None, :], mask=cmask[:, None] & hmask[None, :], other=0.0)
        dt = DX.dtype.element_ty
        acc = tl.dot(g.to(LOGITS.dtype.element_ty).to(dt), w.to(dt), input_precision=PRECISION)
        tl.store(DX + rows[:, None] * H + hs[None, :], acc.to(dt), mask=rmask[:, None] & hmask[None, :])


def _projection_kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the projection runs the Triton kernels: chosen in the launch table
    (``restricted_fwd.KERNEL``: 1, the default since the H200 timed the kernels at half the product's
    device time; 0 keeps the matrix product, whose eager call costs less host time), not under
    torch.compile (inductor compiles the product itself) or
    autocast (the product runs in autocast's dtype there), float32/16 or bfloat16 tensors,
    unit-stride weight rows (a strided weight view is not copied), and the backend choice of the
    other ops for ``x`` (Triton on CUDA; on the CPU interpreter with ``ZREWARD_BACKEND=triton``),
    recorded as ``restricted_logits``.  With gradients the forward kernel is wrapped in
    :class:`_ProjectionFn` (the hidden-state gradient is a second kernel)."""
    if CONFIGS["restricted_fwd"]["KERNEL"] != 1 or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled(x.device.type):  # the product's autocast dtype and precision, as without the switch
        return False
    if x.dtype not in _KERNEL_DTYPES or weight.dtype not in _KERNEL_DTYPES or weight.stride(1) != 1:
        return False
    if bias is not None and (bias.dtype not in _KERNEL_DTYPES or functorch_wrapped(bias) or forward_ad_dual(bias)):
        return False
    if functorch_wrapped(weight) or forward_ad_dual(weight):  # (the product carries a tangent; the kernel would not)
        return False
    # through the ops module, where aot_check's interception replaces the choice (compiling the launch)
    return _ops.choose_backend("restricted_logits", None, x) == "triton"


def _project_triton(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias: Optional[torch.Tensor],
                    rows_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [N, H] @ weight[ids].T (+ bias[ids])`` in one Triton launch, in ``x``'s dtype; with
    ``rows_out`` (contiguous ``[K, H]``, the weight's dtype) the same launch also writes the
    gathered rows ``weight[ids]`` there."""
    n, h = x.shape
    k = ids.numel()
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(n, k, device=x.device, dtype=x.dtype)
    if n == 0:
        if rows_out is not None:  # no program runs to write them
            torch.index_select(weight, 0, ids, out=rows_out)
        return out
    cfg = CONFIGS["restricted_fwd"]
    with launch_device(x):
        _restricted_fwd_kernel[(cdiv(n, cfg["BLOCK_N"]),)](
            x, x.stride(0), weight, weight.stride(0), ids.contiguous(), bias if bias is not None else x, out,
            rows_out if rows_out is not None else out, n, h, k,
            HAS_BIAS=bias is not None, STORE_ROWS=rows_out is not None, BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=max(16, next_pow2(k)), BLOCK_H=cfg["BLOCK_H"],
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
        )
    return out


def _hidden_grad_triton(g: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g [N, K] @ rows[K, H].to(dtype) -> [N, H]`` in one Triton launch (the hidden-state gradient)."""
    n, k = g.shape
    h = rows.shape[1]
    dx = torch.empty(n, h, device=g.device, dtype=dtype)
    if n == 0:
        return dx
    cfg = CONFIGS["restricted_bwd"]
    _restricted_bwd_kernel[(cdiv(n, cfg["BLOCK_N"]), cdiv(h, cfg["BLOCK_H"]))](
        g, g.stride(0), g.stride(1), rows, rows.stride(0), dx, n, h, k,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=max(16, next_pow2(k)), BLOCK_H=cfg["BLOCK_H"],
        PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
    )
    return dx


def _project_stats_triton(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias: Optional[torch.Tensor],
                          bins: torch.Tensor, inv_tau: float, rows_out: Optional[torch.Tensor] = None):
    """``(logits [N, K] in x's dtype, probs [N, K], mean [N], std [N])`` (fp32 statistics) of
    ``x [N, H]`` (N > 0) against ``weight[ids]`` in one launch; ``rows_out`` as in :func:`_project_triton`."""
    n, h = x.shape
    k = ids.numel()
    if x.stride(1) != 1:
        x = x.contiguous()
    logits = torch.empty(n, k, device=x.device, dtype=x.dtype)
    probs = torch.empty(n, k, device=x.device, dtype=torch.float32)
    mean = torch.empty(n, device=x.device, dtype=torch.float32)
    std = torch.empty(n, device=x.device, dtype=torch.float32)
    cfg = CONFIGS["restricted_fwd"]
    _restricted_stats_fwd_kernel[(cdiv(n, cfg["BLOCK_N"]),)](
        x, x.stride(0), weight, weight.stride(0), ids, bias if bias is not None else x, logits,
        rows_out if rows_out is not None else logits, bins, probs, mean, std, n, h, k, inv_tau,
        HAS_BIAS=bias is not None, STORE_ROWS=rows_out is not None, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=max(16, next_pow2(k)), BLOCK_H=cfg["BLOCK_H"],
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
    )
    return logits, probs, mean, std


class _ProjectedStatsFn(torch.autograd.Function):
    """score_stats_from_hidden with a frozen head and gradients into ``hidden``: the forward is one
    launch (logits, kept for the backward, and their probs, mean and std; the K weight rows written
    out as it loads them), the backward one more (each tile of the hidden-state gradient recomputes
    its rows' logit gradient, as score_stats' backward kernel does, and multiplies by the rows).  The
    logits come back as a fourth output, not differentiable, for the caller's data checks.
    Differentiable once, as score_stats' fused path is."""

    @staticmethod
    def forward(ctx, x, weight, ids, bias, bins, inv_tau):
        rows = torch.empty(ids.numel(), weight.shape[1], device=weight.device, dtype=weight.dtype)
        logits, probs, mean, std = _project_stats_triton(x, weight, ids, bias, bins, inv_tau, rows)
        ctx.save_for_backward(logits, rows, bins)
        ctx.inv_tau = inv_tau
        ctx.mark_non_differentiable(logits)
        _skip_zero_grads(ctx)
        return logits, probs, mean, std

    @staticmethod
    def backward(ctx, _g_logits, g_probs, g_mean, g_std):
        if g_probs is None and g_mean is None and g_std is None:
            return None, None, None, None, None, None
        first_order_only("score_stats_from_hidden")
        logits, rows, bins = ctx.saved_tensors
        n, k = logits.shape
        h = rows.shape[1]
        dx = torch.empty(n, h, device=logits.device, dtype=logits.dtype)
        gp = g_probs if g_probs is not None else logits
        if gp.dim() != 2:
            gp = gp.reshape(-1, k)
        cfg = CONFIGS["restricted_bwd"]
        _restricted_stats_bwd_kernel[(cdiv(n, cfg["BLOCK_N"]), cdiv(h, cfg["BLOCK_H"]))](
            logits, bins, k, ctx.inv_tau, gp, gp.stride(0), gp.stride(1), *_vec(g_mean, logits), *_vec(g_std, logits),
            rows, rows.stride(0), dx, n, h,
            HAS_DP=g_probs is not None, HAS_DMU=g_mean is not None, HAS_DSTD=g_std is not None,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=max(16, next_pow2(k)), BLOCK_H=cfg["BLOCK_H"],
            PRECISION="ieee" if dx.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
        )
        return dx, None, None, None, None, None


def _rows_for_backward(ctx, rows: Optional[torch.Tensor], ids: torch.Tensor, what: str) -> Optional[torch.Tensor]:
    """The K weight rows a backward multiplies by: ``rows``, saved by the forward, except under
    ``create_graph=True`` (grad mode on in the backward) with a weight that requires grad, where they
    are gathered again from ``ctx.weight`` (kept by reference with ``ctx.weight_version``): the saved
    rows carry no graph to the weight, so a second derivative would lack the weight's share without a
    word.  A weight modified in place since the forward is refused there."""
    if not (torch.is_grad_enabled() and ctx.needs_input_grad[1]):
        return rows
    if ctx.weight._version != ctx.weight_version:
        raise RuntimeError(f"{what}: lm_head_weight was modified in place between the forward and a backward with "
                           "create_graph=True")
    return ctx.weight.index_select(0, ids)


class _ProjectionFn(torch.autograd.Function):
    """The Triton projection with gradients.  As for the product path, the forward keeps the K
    weight rows it used (``K x H``, written by the forward kernel as it loads them, so no separate
    gather launch: a later in-place change of the weight does not reach this backward) and ``hidden``
    only when the weight needs its gradient.  The hidden-state gradient
    ``g @ W[ids]`` is the second kernel; the weight rows' gradient ``g.T @ hidden`` and the bias
    gradient are a matrix product and a sum scattered into dense ``[V, H]`` / ``[V]`` tensors, as
    autograd makes them for the product path's gather.  Under ``create_graph=True`` the backward
    runs the same formulas in differentiable PyTorch, re-gathering the rows from a weight that
    requires grad (as :class:`_SparseRowsFn` does), so second derivatives match the product path's."""

    @staticmethod
    def forward(ctx, x, weight, ids, bias):
        ids = ids.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the K rows for the hidden-state gradient, written by the forward launch (no gather launch)
        rows = torch.empty(ids.numel(), weight.shape[1], device=weight.device, dtype=weight.dtype) if need_x else None
        out = _project_triton(x, weight, ids, bias, rows)
        ctx.save_for_backward(x if need_w else None, rows, ids)
        ctx.weight, ctx.weight_version = weight, weight._version  # its dtype and shape, and _rows_for_backward
        ctx.x_dtype = x.dtype
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        x, rows, ids = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad
        weight = ctx.weight
        d_x = d_w = d_b = None
        if need_x:
            if torch.is_grad_enabled():  # create_graph=True: differentiable in g (and a trained weight)
                d_x = g @ _rows_for_backward(ctx, rows, ids, "restricted_logits").to(ctx.x_dtype)
            else:
                d_x = _hidden_grad_triton(g, rows, ctx.x_dtype)
        if need_w:
            d_rows = (g.t() @ x).to(weight.dtype)
            d_w = torch.zeros(weight.shape, device=weight.device, dtype=weight.dtype).index_add(0, ids, d_rows)
        if need_b:
            shape, dtype = ctx.bias_meta
            d_b = torch.zeros(shape, device=g.device, dtype=dtype).index_add(0, ids, g.sum(0).to(dtype))
        return d_x, d_w, None, d_b


class _SparseRowsFn(torch.autograd.Function):
    """``hidden @ W[ids].T (+ b[ids])`` whose weight/bias gradients are sparse COO row tensors."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, bias):
        rows = weight.index_select(0, ids)
        out = hidden @ rows.to(hidden.dtype).t()
        if bias is not None:
            out = out + bias.index_select(0, ids).to(out.dtype)
        ctx.save_for_backward(hidden, rows, ids)
        ctx.weight, ctx.weight_version = weight, weight._version  # its shape, and _rows_for_backward
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        hidden, rows, ids = ctx.saved_tensors
        rows = _rows_for_backward(ctx, rows, ids, "restricted_logits(weight_grad='sparse')")
        d_hidden = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_hidden = g @ rows.to(g.dtype)
        # the indices are the validated, distinct token ids: no invariant check needed, and saying so
        # explicitly keeps torch >= 2.11 from warning that the checks are "implicitly disabled"
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            if ctx.needs_input_grad[1]:
                d_rows = (g.t() @ hidden).to(rows.dtype)
                d_weight = torch.sparse_coo_tensor(ids.unsqueeze(0), d_rows, ctx.weight.shape, check_invariants=False)
            if ctx.needs_input_grad[3]:
                d_bias = torch.sparse_coo_tensor(ids.unsqueeze(0), g.sum(0).to(ctx.bias_dtype), ctx.bias_shape,
                                                 check_invariants=False)
        return d_hidden, d_weight, None, d_bias


@torch.compiler.disable(reason="weight_grad='sparse' runs eagerly: torch.compile cannot trace sparse COO gradients; "
                                "compile with weight_grad='dense', a frozen weight, or zreward.heads.RestrictedHead")
def _sparse_rows_eager(x, weight, ids, bias):
    """:class:`_SparseRowsFn` outside the compiled graph: Dynamo cannot trace ``torch.sparse_coo_tensor``,
    so under ``torch.compile`` the sparse path is a graph break (an error with ``fullgraph=True``, naming the
    reason above) instead of a failure inside Dynamo."""
    return _SparseRowsFn.apply(x, weight, ids, bias)


def _as_ids(token_ids, device: torch.device) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token_ids must be an int32/int64 tensor, got {token_ids.dtype}")
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D [K], got shape {tuple(token_ids.shape)}")
        if token_ids.device != device:
            raise ValueError(f"token_ids is on {token_ids.device} but hidden is on {device}")
        return token_ids if token_ids.dtype == torch.int64 else token_ids.long()
    try:  # operator.index: ints, numpy ints and 0-d integer tensors; a float such as 2.7 is refused, not truncated
        ids = [operator.index(t) for t in token_ids]
        # operator.index reads True (and a 0-d bool tensor) as 1: a mask passed as ids
        if any(isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool) for t in token_ids):
            raise TypeError("bool")
    except TypeError as exc:
        raise TypeError(f"token_ids must be a 1-D integer tensor or a sequence of ints, got {token_ids!r}") from exc
    return torch.tensor(ids, dtype=torch.long, device=device)


def restricted_logits(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: Union[torch.Tensor, Sequence[int]],
    bias: Optional[torch.Tensor] = None,
    *,
    weight_grad: str = "dense",
    validate: bool = True,
) -> torch.Tensor:
    """Logits of the K ``token_ids`` only: ``hidden [..., H] -> [..., K]``, in ``hidden``'s dtype.

    Equal to ``(hidden @ lm_head_weight.T + bias)[..., token_ids]`` without the ``[..., V]``
    intermediate.  ``token_ids`` must be distinct and inside ``[0, V)`` (checked when ``validate``;
    the range check reads values, so it is skipped under ``validate=False`` / torch.compile /
    CUDA-graph capture, where an out-of-range id is an indexing error of ``index_select``).  A
    weight of another dtype than ``hidden`` (fp32 master weights, bf16 activations) is cast after
    the K rows are gathered.  See the module docstring for ``weight_grad``.
    """
    x, ids, lead = _checked(hidden, lm_head_weight, token_ids, bias, weight_grad, validate)
    out = _project(x, lm_head_weight, ids, bias, weight_grad)
    return out if lead is None else out.reshape(*lead, ids.numel())


def _checked(hidden, lm_head_weight, token_ids, bias, weight_grad, validate):
    """restricted_logits' checks: ``(hidden as [rows, H], the token ids as a long tensor, the leading shape)``;
    the leading shape is None for a 2-D ``hidden`` (no reshapes: host time is most of a per-call GPU timing)."""
    check_float_tensor("hidden", hidden)
    check_float_tensor("lm_head_weight", lm_head_weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have a last dimension H")
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, H], got shape {tuple(lm_head_weight.shape)}")
    v, h = lm_head_weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden's last dimension ({hidden.shape[-1]}) must equal lm_head_weight's H ({h})")
    if weight_grad not in _WEIGHT_GRAD:
        raise ValueError(f"weight_grad must be one of {_WEIGHT_GRAD}, got {weight_grad!r}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must be [V] = [{v}], got shape {tuple(bias.shape)}")
    if lm_head_weight.device != hidden.device or (bias is not None and bias.device != hidden.device):
        check_same_device("hidden", hidden, lm_head_weight=lm_head_weight, bias=bias)  # raises, naming which
    ids = _as_ids(token_ids, hidden.device)
    if ids.numel() == 0:
        raise ValueError("token_ids must hold at least one id")
    if data_checks_enabled(validate):  # one host sync for both
        checks = DataChecks()
        out = (ids < 0) | (ids >= v)
        checks.bad(out.any(), f"token_ids must lie in [0, {v}) (the LM head's vocabulary)",
                   lambda: f"; found {int(ids[out][0])}")
        srt = ids.sort().values
        checks.bad((srt[1:] == srt[:-1]).any(), "token_ids must be distinct", lambda: f", got {ids.tolist()}")
        checks.raise_first()
    if hidden.dim() == 2:
        return hidden, ids, None
    return hidden.reshape(-1, h), ids, hidden.shape[:-1]


def _project(x, lm_head_weight, ids, bias, weight_grad) -> torch.Tensor:
    """``x [rows, H] -> [rows, K]`` by the path that applies (sparse rows, the Triton kernels, the product)."""
    if weight_grad == "sparse" and torch.is_grad_enabled():
        if torch.compiler.is_compiling():
            out = _sparse_rows_eager(x, lm_head_weight, ids, bias)
        else:
            if functorch_wrapped(x) or functorch_wrapped(lm_head_weight):
                raise ValueError("weight_grad='sparse' cannot run under torch.func transforms (vmap, grad, ...): "
                                 "use weight_grad='dense' there")
            out = _SparseRowsFn.apply(x, lm_head_weight, ids, bias)
    elif _projection_kernel_applies(x, lm_head_weight, bias):
        if torch.is_grad_enabled() and (x.requires_grad or lm_head_weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            out = _ProjectionFn.apply(x, lm_head_weight, ids, bias)
        else:
            out = _project_triton(x, lm_head_weight, ids, bias)
    else:
        rows = lm_head_weight.index_select(0, ids)
        out = x @ (rows if rows.dtype == x.dtype else rows.to(x.dtype)).t()
        if bias is not None:
            out = out + bias.index_select(0, ids).to(out.dtype)
    return out


def score_stats_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids,
    bias: Optional[torch.Tensor] = None,
    *,
    weight_grad: str = "dense",
    bin_values: Sequence[float] = BIN_VALUES,
    temperature: float = 1.0,
    backend: Optional[str] = None,
    validate: bool = True,
) -> ScoreStats:
    """:func:`zreward_kernels.score_stats` of the restricted logits of ``hidden [..., H]``.

    Where the Triton projection applies (by default on CUDA, see
    :func:`_projection_kernel_applies`), score_stats runs on the Triton backend, there is a row to
    score and the head is frozen (the weight and bias need no gradient), the projection and the
    statistics are one launch, and with gradients into ``hidden`` the backward is one more
    (:class:`_ProjectedStatsFn`); elsewhere this is ``score_stats(restricted_logits(...))``.  Both
    give the same values, errors and gradients."""
    x, ids, lead = _checked(hidden, lm_head_weight, token_ids, bias, weight_grad, validate)
    k = ids.numel()
    bins = normalize_bins(bin_values)
    tau = check_temperature(temperature)
    if k == len(bins) and x.shape[0] and _stats_kernel_applies(x, lm_head_weight, bias, backend):
        ids = ids.contiguous()
        with launch_device(x):
            bins_t = bins_tensor(bins, x.device)
            if torch.is_grad_enabled() and x.requires_grad:
                logits, probs, mean, std = _ProjectedStatsFn.apply(x, lm_head_weight, ids, bias, bins_t, 1.0 / tau)
            else:
                logits, probs, mean, std = _project_stats_triton(x, lm_head_weight, ids, bias, bins_t, 1.0 / tau)
        if data_checks_enabled(validate):  # what score_stats checks of the logits, on the ones the kernel kept
            checks = DataChecks()
            check_finite_logits(checks, "logits", logits, tau)
            checks.raise_first()
        if lead is None:
            return ScoreStats(probs, mean, std)
        return ScoreStats(probs.reshape(*lead, k), mean.reshape(lead), std.reshape(lead))
    logits = _project(x, lm_head_weight, ids, bias, weight_grad)
    if lead is not None:
        logits = logits.reshape(*lead, k)
    return score_stats(logits, bin_values=bins, temperature=tau, backend=backend, validate=validate)


def _stats_kernel_applies(x, weight, bias, backend) -> bool:
    """Whether score_stats_from_hidden runs as :class:`_ProjectedStatsFn`: the projection kernel
    applies, score_stats would run on Triton, and no gradient reaches the head."""
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return _projection_kernel_applies(x, weight, bias) and _ops.choose_backend("score_stats", backend, x) == "triton"


def rubric_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids,
    bias: Optional[torch.Tensor] = None,
    *,
    weight_grad: str = "dense",
    **kwargs,
) -> RubricLossOutput:
    """:func:`zreward_kernels.rubric_loss` of the restricted logits of ``hidden [N, H]`` or
    ``[N, D, H]``; every keyword of ``rubric_loss`` is accepted."""
    logits = restricted_logits(hidden, lm_head_weight, token_ids, bias, weight_grad=weight_grad,
                               validate=kwargs.get("validate", True))
    return rubric_loss(logits, **kwargs)


def gdso_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids,
    scores: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    weight_grad: str = "dense",
    **kwargs,
) -> GDSOOutput:
    """:func:`zreward_kernels.gdso_loss` of the restricted logits of ``hidden [P, 2, G, H]``."""
    logits = restricted_logits(hidden, lm_head_weight, token_ids, bias, weight_grad=weight_grad,
                               validate=kwargs.get("validate", True))
    return gdso_loss(logits, scores, **kwargs)
