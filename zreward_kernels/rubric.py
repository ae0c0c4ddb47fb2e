"""Fused Triton kernels for the row-wise rubric ops: ``score_stats`` and ``rubric_loss``.

Every row kernel has two layouts, chosen per launch from ``_tuning.CONFIGS`` (``FLAT``): a tile of
``BLOCK_R`` rows with the bins padded to a power of two and reduced across lanes (the default), or
row per thread (``FLAT=1``): each lane owns whole rows and visits the K bins in unrolled loops,
re-reading the row from L1 (no padding, no cross-lane reductions; grids of up to 32 bins).

``score_stats`` has a lean forward kernel (softmax, expectation, standard deviation per tile of
``BLOCK_R`` rows, bins padded to a power of two) and a lean backward kernel that reads the upstream
gradients of ``probs``, ``mean`` and ``std`` in place (stride 0 for the expanded scalars that
``.sum()`` produces, so no copies).

``rubric_loss`` has one forward kernel whose grid holds two kinds of programs:

* *row programs* (one per tile of ``BLOCK_R`` rows): softmax, expectation, standard deviation,
  the pointwise CE (hard or soft target) and the RISD KL;
* *pair programs* (one per tile of ``BLOCK_P`` pairs): they recompute the two rows' expectations
  (18 logits per pair), the gap term ``|(mu_a - mu_b) - gap|`` and its sign.  For the gradient each
  pair adds its integer sign to a per-row counter (int32 atomics: exact, so deterministic).

Each program writes its partial sums to its own slot; the last program to finish (an acq_rel
ticket counter) adds the slots in a fixed order and writes the reduced loss.  The counters come
from ``_workspace.semaphores`` (zero at launch, written back to zero by the last program) and the
per-row pair counts are zeroed by the row programs before any pair program adds to them, so the
forward is one kernel launch, with no fill and no host sync.  Where no semaphores can be had
(``torch.compile`` tracing, a capture before any eager call) one small int32 zero-fill comes first.

Why the ``rubric_loss`` backward recomputes instead of storing the gradient in the forward
(grad-in-forward, as ``gdso_loss`` does): the ``mean`` CE normaliser is the number of non-ignored
rows, which is only known once every row program has run.  Storing ``dL/dlogits`` during the
forward would need that count up front (a host sync or an extra reduction launch).  Recomputing
the softmax in the backward reads the same number of bytes as reading a stored gradient (logits
instead of the gradient buffer), keeps no extra ``[N, K]`` buffer alive between forward and
backward, and lets one backward kernel serve every output's gradient (loss, ce, kl, pair, mean,
std).  The backward is one kernel launch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import first_order_only
from ._triton_utils import HAS_TRITON, cdiv, next_pow2, tl, triton
from ._tuning import CONFIGS
from ._workspace import semaphores
from .reference import RubricLossOutput, ScoreStats

# Tile sizes and warps per kernel live in ``_tuning.CONFIGS`` (rows per row program ``BLOCK_R``,
# pairs per pair program ``BLOCK_P``), read at launch time.
BLOCK_RED = 256  # partial slots reduced per step by the last program

if HAS_TRITON:

    @triton.jit
    def _log_softmax(x, cmask, inv_tau):
        z = tl.where(cmask[None, :], x * inv_tau, float("-inf"))
        zmax = tl.max(z, 1)
        ez = tl.exp(z - zmax[:, None])
        s = tl.sum(ez, 1)
        p = ez / s[:, None]
        logp = z - (zmax + tl.log(s))[:, None]
        return p, logp

    @triton.jit
    def _dist_stats(x, v, cmask, inv_tau):
        p, logp = _log_softmax(x, cmask, inv_tau)
        mu = tl.sum(p * v[None, :], 1)
        d = v[None, :] - mu[:, None]
        var = tl.sum(p * d * d, 1)
        return p, logp, mu, d, var

    @triton.jit
    def _tile_index(pid, n_rows, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """``(rows, row mask, cols, col mask, tile mask)`` of program ``pid``'s tile of rows, bins
        padded to BLOCK_K.  Takes no pointer, and every kernel computes the indices it stores at with
        it (or ``_flat_rows``) rather than taking them from a helper that also loads: torch.compile's
        analysis of which arguments a kernel writes takes all arguments of a helper call as sources of
        what it returns, so an address from such a helper marks its input pointers as written, and
        torch.compile would copy those inputs before each launch (``aot_check --written``)."""
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        cols = tl.arange(0, BLOCK_K)
        cmask = cols < K
        return rows, rmask, cols, cmask, rmask[:, None] & cmask[None, :]

    @triton.jit
    def _row_tile(X, stride_x, V, inv_tau, rows, cols, cmask, m2):
        """Load a tile of rows (``_tile_index``) and its distribution statistics."""
        v = tl.load(V + cols, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        p, logp, mu, d, var = _dist_stats(x, v, cmask, inv_tau)
        return p, logp, mu, d, var

    @triton.jit
    def _dvar(var, dstd):
        """dL/dvar from dL/dstd, per row; std'(0) := 0 at a point mass."""
        std = tl.sqrt(tl.maximum(var, 0.0))
        return tl.where(std > 0, dstd / (2.0 * std), 0.0)

    @triton.jit
    def _stats_grad(p, d, var, dmu, dstd):
        """dL/dz of a row given upstream dL/dmean (``dmu``) and dL/dstd (``dstd``), per row."""
        dvar = _dvar(var, dstd)
        return p * (d * dmu[:, None] + dvar[:, None] * (d * d - var[:, None]))

    # ---- row-per-thread ("flat") layout: a program's rows are a 1-D vector, one row per lane; the
    # KC bins are visited by unrolled loops that re-read the row from L1, so no bin padding and no
    # cross-lane reductions.  Chosen per kernel by the tuning table's FLAT setting.

    @triton.jit
    def _flat_max(X, off, KC: tl.constexpr, inv_tau, rmask, BLOCK_R: tl.constexpr):
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for k in tl.static_range(KC):
            m = tl.maximum(m, tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau)
        return m

    @triton.jit
    def _flat_max_sum(X, off, KC: tl.constexpr, inv_tau, rmask, BLOCK_R: tl.constexpr):
        """Per row: max logit ``m`` and softmax normaliser ``s = sum_k exp(z_k - m)``."""
        m = _flat_max(X, off, KC, inv_tau, rmask, BLOCK_R)
        s = tl.zeros([BLOCK_R], tl.float32)
        for k in tl.static_range(KC):
            s += tl.exp(tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau - m)
        return m, s

    @triton.jit
    def _flat_stats(X, off, V, KC: tl.constexpr, inv_tau, rmask, BLOCK_R: tl.constexpr):
        """Per row: max logit ``m``, softmax normaliser ``s``, mean ``mu`` and variance ``var``."""
        m = _flat_max(X, off, KC, inv_tau, rmask, BLOCK_R)
        s = tl.zeros([BLOCK_R], tl.float32)
        sv = tl.zeros([BLOCK_R], tl.float32)
        for k in tl.static_range(KC):
            e = tl.exp(tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau - m)
            s += e
            sv += e * tl.load(V + k).to(tl.float32)
        mu = sv / s
        var = tl.zeros([BLOCK_R], tl.float32)
        for k in tl.static_range(KC):
            e = tl.exp(tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau - m)
            dk = tl.load(V + k).to(tl.float32) - mu
            var += e * dk * dk
        return m, s, mu, var / s

    @triton.jit
    def _flat_rows(pid, n_rows, stride_x, BLOCK_R: tl.constexpr):
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        return rows, rows < n_rows, rows * stride_x

    @triton.jit
    def _stats_fwd_kernel(
        X, stride_x, V, K, n_rows, inv_tau, PROBS, MEAN, STD,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FLAT: tl.constexpr, KC: tl.constexpr,
    ):
        if FLAT:
            rows, rmask, off = _flat_rows(tl.program_id(0), n_rows, stride_x, BLOCK_R)
            m, s, mu, var = _flat_stats(X, off, V, KC, inv_tau, rmask, BLOCK_R)
            inv_s = 1.0 / s
            for k in tl.static_range(KC):
                z = tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau
                tl.store(PROBS + rows * KC + k, tl.exp(z - m) * inv_s, mask=rmask)
        else:
            rows, rmask, cols, cmask, m2 = _tile_index(tl.program_id(0), n_rows, K, BLOCK_R, BLOCK_K)
            p, logp, mu, d, var = _row_tile(X, stride_x, V, inv_tau, rows, cols, cmask, m2)
            tl.store(PROBS + rows[:, None] * K + cols[None, :], p, mask=m2)
        tl.store(MEAN + rows, mu, mask=rmask)
        tl.store(STD + rows, tl.sqrt(tl.maximum(var, 0.0)), mask=rmask)

    @triton.jit
    def _stats_bwd_kernel(
        X, stride_x, V, K, n_rows, inv_tau, DX,
        DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_DP: tl.constexpr, HAS_DMU: tl.constexpr, HAS_DSTD: tl.constexpr,
        FLAT: tl.constexpr, KC: tl.constexpr,
    ):
        if FLAT:
            _stats_bwd_flat(X, stride_x, V, n_rows, inv_tau, DX, DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd,
                            BLOCK_R, HAS_DP, HAS_DMU, HAS_DSTD, KC)
        else:
            _stats_bwd_tile(X, stride_x, V, K, n_rows, inv_tau, DX, DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd,
                            BLOCK_R, BLOCK_K, HAS_DP, HAS_DMU, HAS_DSTD)

    @triton.jit
    def _stats_bwd_flat(
        X, stride_x, V, n_rows, inv_tau, DX, DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd,
        BLOCK_R: tl.constexpr, HAS_DP: tl.constexpr, HAS_DMU: tl.constexpr, HAS_DSTD: tl.constexpr,
        KC: tl.constexpr,
    ):
        rows, rmask, off = _flat_rows(tl.program_id(0), n_rows, stride_x, BLOCK_R)
        m, s, mu, var = _flat_stats(X, off, V, KC, inv_tau, rmask, BLOCK_R)
        inv_s = 1.0 / s
        dmu = tl.zeros([BLOCK_R], tl.float32)
        dvar = tl.zeros([BLOCK_R], tl.float32)
        if HAS_DMU:
            dmu = tl.load(DMU + rows * s_dmu, mask=rmask, other=0.0).to(tl.float32)
        if HAS_DSTD:
            dvar = _dvar(var, tl.load(DSTD + rows * s_dstd, mask=rmask, other=0.0).to(tl.float32))
        pgp = tl.zeros([BLOCK_R], tl.float32)
        if HAS_DP:
            for k in tl.static_range(KC):
                pk = tl.exp(tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau - m) * inv_s
                pgp += pk * tl.load(DP + rows * s_dp_r + k * s_dp_c, mask=rmask, other=0.0).to(tl.float32)
        for k in tl.static_range(KC):
            pk = tl.exp(tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau - m) * inv_s
            dk = tl.load(V + k).to(tl.float32) - mu
            g = pk * (dk * dmu + dvar * (dk * dk - var))
            if HAS_DP:
                g += pk * (tl.load(DP + rows * s_dp_r + k * s_dp_c, mask=rmask, other=0.0).to(tl.float32) - pgp)
            tl.store(DX + rows * KC + k, (g * inv_tau).to(DX.dtype.element_ty), mask=rmask)

    @triton.jit
    def _stats_bwd_tile(
        X, stride_x, V, K, n_rows, inv_tau, DX, DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_DP: tl.constexpr, HAS_DMU: tl.constexpr, HAS_DSTD: tl.constexpr,
    ):
        rows, rmask, cols, cmask, m2 = _tile_index(tl.program_id(0), n_rows, K, BLOCK_R, BLOCK_K)
        g = _stats_dlogits_tile(X, stride_x, V, inv_tau, DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd,
                                rows, rmask, cols, cmask, m2, BLOCK_R, HAS_DP, HAS_DMU, HAS_DSTD)
        tl.store(DX + rows[:, None] * K + cols[None, :], g.to(DX.dtype.element_ty), mask=m2)

    @triton.jit
    def _stats_dlogits_tile(
        X, stride_x, V, inv_tau, DP, s_dp_r, s_dp_c, DMU, s_dmu, DSTD, s_dstd, rows, rmask, cols, cmask, m2,
        BLOCK_R: tl.constexpr, HAS_DP: tl.constexpr, HAS_DMU: tl.constexpr, HAS_DSTD: tl.constexpr,
    ):
        """dL/dlogits of a tile of rows (``_tile_index``; fp32, zero on rows past ``n_rows`` and on
        padded bins), from the upstream gradients of probs, mean and std."""
        # the upstream gradients are loaded before the logits' statistics are computed, so that their
        # memory round trip overlaps the logits' one instead of following the softmax's shuffles
        dmu = tl.zeros([BLOCK_R], tl.float32)
        dstd = tl.zeros([BLOCK_R], tl.float32)
        if HAS_DMU:
            dmu = tl.load(DMU + rows * s_dmu, mask=rmask, other=0.0).to(tl.float32)
        if HAS_DSTD:
            dstd = tl.load(DSTD + rows * s_dstd, mask=rmask, other=0.0).to(tl.float32)
        if HAS_DP:
            gp = tl.load(DP + rows[:, None] * s_dp_r + cols[None, :] * s_dp_c, mask=m2, other=0.0).to(tl.float32)
        p, logp, mu, d, var = _row_tile(X, stride_x, V, inv_tau, rows, cols, cmask, m2)
        g = _stats_grad(p, d, var, dmu, dstd)
        if HAS_DP:
            g += p * (gp - tl.sum(p * gp, 1)[:, None])
        return g * inv_tau

    @triton.jit
    def _rubric_rows_tile(X, stride_x, V, K, inv_tau, TGT, TP, TQ, ignore_index, rows, rmask, cols, cmask, m2,
                          MEAN, STD, BLOCK_R: tl.constexpr, CE_MODE: tl.constexpr, KL_MODE: tl.constexpr):
        """Row program of the loss forward on a tile of rows (``_tile_index``): stores the per-row
        mean and std, returns the rows' CE, KL and validity."""
        p, logp, mu, d, var = _row_tile(X, stride_x, V, inv_tau, rows, cols, cmask, m2)
        tl.store(MEAN + rows, mu, mask=rmask)
        tl.store(STD + rows, tl.sqrt(tl.maximum(var, 0.0)), mask=rmask)
        ko = rows[:, None] * K + cols[None, :]
        ce_r = tl.zeros([BLOCK_R], tl.float32)
        valid = rmask
        if CE_MODE == 1:
            t = tl.load(TGT + rows, mask=rmask, other=0).to(tl.int64)
            valid = rmask & (t != ignore_index)
            picked = tl.sum(tl.where(cols[None, :] == t[:, None], logp, 0.0), 1)
            ce_r = tl.where(valid, -picked, 0.0)
        if CE_MODE == 2:
            tp = tl.load(TP + ko, mask=m2, other=0.0).to(tl.float32)
            ce_r = tl.where(rmask, -tl.sum(tl.where(tp > 0, tp * logp, 0.0), 1), 0.0)
        kl_r = tl.zeros([BLOCK_R], tl.float32)
        if KL_MODE == 1:
            tx = tl.load(TQ + ko, mask=m2, other=0.0).to(tl.float32)
            q, logq = _log_softmax(tx, cmask, inv_tau)
            kl_r = tl.where(rmask, tl.sum(tl.where(q > 0, q * (logq - logp), 0.0), 1), 0.0)
        if KL_MODE == 2:
            q = tl.load(TQ + ko, mask=m2, other=0.0).to(tl.float32)
            logq = tl.log(tl.where(q > 0, q, 1.0))
            kl_r = tl.where(rmask, tl.sum(tl.where(q > 0, q * (logq - logp), 0.0), 1), 0.0)
        return ce_r, kl_r, valid

    @triton.jit
    def _rubric_rows_flat(X, V, inv_tau, TGT, TP, TQ, ignore_index, rows, rmask, off, MEAN, STD,
                          BLOCK_R: tl.constexpr, CE_MODE: tl.constexpr, KL_MODE: tl.constexpr, KC: tl.constexpr):
        """Row program of the loss forward, row-per-thread layout (``_flat_rows``; same effects as the
        tile one)."""
        ko = rows * KC
        # every load that depends on no other is issued first: the target, and the teacher's logits
        # (their max and normaliser computed here, before the student's statistics), so their memory
        # round trips overlap the logits' one instead of following it (and no store comes before a
        # load: see the end)
        if CE_MODE == 1:
            t = tl.load(TGT + rows, mask=rmask, other=0).to(tl.int64)
        if KL_MODE == 1:
            mq, sq = _flat_max_sum(TQ, ko, KC, inv_tau, rmask, BLOCK_R)
        m, s, mu, var = _flat_stats(X, off, V, KC, inv_tau, rmask, BLOCK_R)
        lse = m + tl.log(s)
        ce_r = tl.zeros([BLOCK_R], tl.float32)
        valid = rmask
        if CE_MODE == 1:
            valid = rmask & (t != ignore_index)
            inb = valid & (t >= 0) & (t < KC)  # an unvalidated out-of-range target gives an infinite CE
            zt = tl.load(X + off + t, mask=inb, other=float("-inf")).to(tl.float32) * inv_tau
            ce_r = tl.where(valid, lse - zt, 0.0)
        if CE_MODE == 2:
            acc = tl.zeros([BLOCK_R], tl.float32)
            for k in tl.static_range(KC):
                tp = tl.load(TP + ko + k, mask=rmask, other=0.0).to(tl.float32)
                z = tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau
                acc += tl.where(tp > 0, tp * (z - lse), 0.0)
            ce_r = tl.where(rmask, -acc, 0.0)
        kl_r = tl.zeros([BLOCK_R], tl.float32)
        if KL_MODE > 0:
            if KL_MODE == 1:
                lseq = mq + tl.log(sq)
            acc = tl.zeros([BLOCK_R], tl.float32)
            for k in tl.static_range(KC):
                z = tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau
                tq = tl.load(TQ + ko + k, mask=rmask, other=0.0).to(tl.float32)
                if KL_MODE == 1:
                    logq = tq * inv_tau - lseq
                    q = tl.exp(logq)
                else:
                    q = tq
                    logq = tl.log(tl.where(q > 0, q, 1.0))
                acc += tl.where(q > 0, q * (logq - (z - lse)), 0.0)
            kl_r = tl.where(rmask, acc, 0.0)
        # stored last: a store between two loads keeps ptxas from issuing the second load early (the
        # pointers might alias), which put the target's and the teacher's loads a memory round trip
        # after the logits' ones
        tl.store(MEAN + rows, mu, mask=rmask)
        tl.store(STD + rows, tl.sqrt(tl.maximum(var, 0.0)), mask=rmask)
        return ce_r, kl_r, valid

    @triton.jit
    def _rubric_fwd_kernel(
        X, stride_x, V, K, n_rows, inv_tau,
        TGT, TP, TQ, ignore_index,
        PAIRS, GAPS, n_pairs,
        MEAN, STD, CE_ROWS, KL_ROWS, PAIR_TERMS, SIGN, SEM, CNT,
        PART, LOSS, CE_OUT, KL_OUT, PAIR_OUT, NV_OUT,
        w_ce, w_kl, w_pair, n_row_progs,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RED: tl.constexpr,
        CE_MODE: tl.constexpr, KL_MODE: tl.constexpr, HAS_PAIRS: tl.constexpr,
        STORE_ROWS: tl.constexpr, STORE_SIGN: tl.constexpr,
        STORE_CNT: tl.constexpr, REDUCE: tl.constexpr, MEAN_RED: tl.constexpr,
        ZERO_CNT: tl.constexpr, FLAT: tl.constexpr, KC: tl.constexpr,
    ):
        # SEM: int32 [ticket, next program id, row programs done, spare], zero at launch; the last
        # program writes them back to zero (self-resetting, see _workspace.py).  CNT: per-row
        # pair-sign counts; with ZERO_CNT the buffer is fresh (not zeroed): row programs zero their
        # rows, and programs take ids in arrival order (SEM[1]) so that the pair programs, which
        # wait for every row program to have zeroed its rows (SEM[2]), only wait for programs that
        # are already running (no deadlock however many programs the GPU holds at once).
        if ZERO_CNT:
            pid = tl.atomic_add(SEM + 1, 1)
        else:
            pid = tl.program_id(0)
        if pid < n_row_progs:
            if FLAT:
                rows, rmask, off = _flat_rows(pid, n_rows, stride_x, BLOCK_R)
                ce_r, kl_r, valid = _rubric_rows_flat(X, V, inv_tau, TGT, TP, TQ, ignore_index, rows, rmask, off,
                                                      MEAN, STD, BLOCK_R, CE_MODE, KL_MODE, KC)
            else:
                rows, rmask, cols, cmask, m2 = _tile_index(pid, n_rows, K, BLOCK_R, BLOCK_K)
                ce_r, kl_r, valid = _rubric_rows_tile(X, stride_x, V, K, inv_tau, TGT, TP, TQ, ignore_index, rows,
                                                      rmask, cols, cmask, m2, MEAN, STD, BLOCK_R, CE_MODE, KL_MODE)
            if STORE_ROWS:
                tl.store(CE_ROWS + rows, ce_r, mask=rmask)
                tl.store(KL_ROWS + rows, kl_r, mask=rmask)
                tl.store(LOSS + rows, w_ce * ce_r + w_kl * kl_r, mask=rmask)
            if ZERO_CNT:
                tl.store(CNT + rows, tl.zeros_like(rows).to(tl.int32), mask=rmask)
                tl.debug_barrier()  # every lane's zeros before the release
                tl.atomic_add(SEM + 2, 1, sem="release")
            if REDUCE:
                tl.store(PART + pid * 4 + 0, tl.sum(ce_r, 0))
                tl.store(PART + pid * 4 + 1, tl.sum(valid.to(tl.float32), 0))
                tl.store(PART + pid * 4 + 2, tl.sum(kl_r, 0))
                tl.store(PART + pid * 4 + 3, 0.0)
        else:
            if HAS_PAIRS:
                cols = tl.arange(0, BLOCK_K)
                cmask = cols < K
                v = tl.load(V + cols, mask=cmask, other=0.0).to(tl.float32)
                pidx = (pid - n_row_progs).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
                pm = pidx < n_pairs
                # clamp so that unvalidated indices can never read out of bounds
                a = tl.minimum(tl.maximum(tl.load(PAIRS + 2 * pidx, mask=pm, other=0).to(tl.int64), 0), n_rows - 1)
                b = tl.minimum(tl.maximum(tl.load(PAIRS + 2 * pidx + 1, mask=pm, other=0).to(tl.int64), 0), n_rows - 1)
                pm2 = pm[:, None] & cmask[None, :]  # (names differ from the row branch's: shapes differ)
                xa = tl.load(X + a[:, None] * stride_x + cols[None, :], mask=pm2, other=0.0).to(tl.float32)
                xb = tl.load(X + b[:, None] * stride_x + cols[None, :], mask=pm2, other=0.0).to(tl.float32)
                pa, _la = _log_softmax(xa, cmask, inv_tau)
                pb, _lb = _log_softmax(xb, cmask, inv_tau)
                mua = tl.sum(pa * v[None, :], 1)
                mub = tl.sum(pb * v[None, :], 1)
                gap = tl.load(GAPS + pidx, mask=pm, other=0.0).to(tl.float32)
                e = (mua - mub) - gap
                term = tl.where(pm, tl.abs(e), 0.0)
                sgn = tl.where(e > 0, 1, tl.where(e < 0, -1, 0)).to(tl.int32)
                if STORE_ROWS:
                    tl.store(PAIR_TERMS + pidx, term, mask=pm)
                if STORE_SIGN:
                    tl.store(SIGN + pidx, sgn.to(tl.float32), mask=pm)
                if STORE_CNT:  # CNT[row]: the row's pair-sign count
                    if ZERO_CNT:
                        while tl.atomic_add(SEM + 2, 0, sem="acquire") < n_row_progs:
                            pass
                    tl.atomic_add(CNT + a, sgn, mask=pm)
                    tl.atomic_add(CNT + b, -sgn, mask=pm)
                if REDUCE:
                    tl.store(PART + pid * 4 + 0, 0.0)
                    tl.store(PART + pid * 4 + 1, 0.0)
                    tl.store(PART + pid * 4 + 2, 0.0)
                    tl.store(PART + pid * 4 + 3, tl.sum(term, 0))
        if REDUCE:
            # last program to arrive reduces all partial slots in a fixed order (deterministic)
            tl.debug_barrier()
            nprog = tl.num_programs(0)
            ticket = tl.atomic_add(SEM, 1, sem="acq_rel")
            if ticket == nprog - 1:
                # every other program has taken its ticket, its last use of SEM: back to zero
                tl.store(SEM + tl.arange(0, 4), tl.zeros([4], tl.int32))
                ro = tl.arange(0, BLOCK_RED)
                acc_ce = tl.zeros([BLOCK_RED], tl.float32)
                acc_nv = tl.zeros([BLOCK_RED], tl.int32)
                acc_kl = tl.zeros([BLOCK_RED], tl.float32)
                acc_pr = tl.zeros([BLOCK_RED], tl.float32)
                for start in range(0, nprog, BLOCK_RED):
                    idx = start + ro
                    m = idx < nprog
                    acc_ce += tl.load(PART + idx * 4 + 0, mask=m, other=0.0, volatile=True)
                    acc_nv += tl.load(PART + idx * 4 + 1, mask=m, other=0.0, volatile=True).to(tl.int32)
                    acc_kl += tl.load(PART + idx * 4 + 2, mask=m, other=0.0, volatile=True)
                    acc_pr += tl.load(PART + idx * 4 + 3, mask=m, other=0.0, volatile=True)
                ce_t = tl.sum(acc_ce, 0)
                nv = tl.sum(acc_nv, 0)
                kl_t = tl.sum(acc_kl, 0)
                pr_t = tl.sum(acc_pr, 0)
                if MEAN_RED:
                    ce_t = ce_t / tl.maximum(nv, 1).to(tl.float32)
                    # divided by the sizes here, not by reciprocals computed on the host: under
                    # torch.compile(dynamic=True) a host-side 1 / rows is a symbolic float, which
                    # inductor passed to the kernel typed as an integer (the launch failed)
                    kl_t = kl_t / tl.maximum(n_rows, 1).to(tl.float32)
                    pr_t = pr_t / tl.maximum(n_pairs, 1).to(tl.float32)
                tl.store(LOSS, w_ce * ce_t + w_kl * kl_t + w_pair * pr_t)
                tl.store(CE_OUT, ce_t)
                tl.store(KL_OUT, kl_t)
                tl.store(PAIR_OUT, pr_t)
                tl.store(NV_OUT, nv.to(tl.float32))

    @triton.jit
    def _rubric_bwd_kernel(
        X, stride_x, V, K, n_rows, inv_tau, DX,
        TGT, TP, TQ, ignore_index,
        CE_COEF, ce_coef_stride, ce_scale, NV,
        KL_COEF, kl_coef_stride, kl_scale, kl_den,
        PAIR_COEF, pair_scale, pair_den, CNT,
        DMU, s_dmu, DSTD, s_dstd,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        CE_MODE: tl.constexpr, CE_MEAN: tl.constexpr, KL_MODE: tl.constexpr,
        HAS_CNT: tl.constexpr, HAS_DMU: tl.constexpr, HAS_DSTD: tl.constexpr,
        FLAT: tl.constexpr, KC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        # per-row coefficients: upstream dL/dmean (pair signs included) and dL/dstd, CE and KL weights
        dmu = tl.zeros([BLOCK_R], tl.float32)
        if HAS_CNT:
            cnt = tl.load(CNT + rows, mask=rmask, other=0).to(tl.float32)
            dmu += tl.load(PAIR_COEF).to(tl.float32) * (pair_scale / tl.maximum(pair_den, 1).to(tl.float32)) * cnt
        if HAS_DMU:
            dmu += tl.load(DMU + rows * s_dmu, mask=rmask, other=0.0).to(tl.float32)
        dstd = tl.zeros([BLOCK_R], tl.float32)
        if HAS_DSTD:
            dstd = tl.load(DSTD + rows * s_dstd, mask=rmask, other=0.0).to(tl.float32)
        c_ce = tl.zeros([BLOCK_R], tl.float32)
        t = tl.zeros([BLOCK_R], tl.int64)
        valid = rmask
        if CE_MODE > 0:
            c_ce = tl.load(CE_COEF + rows * ce_coef_stride, mask=rmask, other=0.0).to(tl.float32) * ce_scale
            if CE_MEAN:
                c_ce = c_ce / tl.maximum(tl.load(NV), 1.0)
            if CE_MODE == 1:
                t = tl.load(TGT + rows, mask=rmask, other=0).to(tl.int64)
                valid = t != ignore_index
        c_kl = tl.zeros([BLOCK_R], tl.float32)
        if KL_MODE > 0:
            c_kl = (tl.load(KL_COEF + rows * kl_coef_stride, mask=rmask, other=0.0).to(tl.float32)
                    * (kl_scale / tl.maximum(kl_den, 1).to(tl.float32)))
        if FLAT:
            _rubric_bwd_flat(X, stride_x, V, inv_tau, DX, TP, TQ, rows, rmask, dmu, dstd, c_ce, t, valid, c_kl,
                             BLOCK_R, CE_MODE, KL_MODE, KC)
        else:
            _rubric_bwd_tile(X, stride_x, V, K, n_rows, inv_tau, DX, TP, TQ, pid, dmu, dstd, c_ce, t, valid, c_kl,
                             BLOCK_R, BLOCK_K, CE_MODE, KL_MODE)

    @triton.jit
    def _rubric_bwd_tile(X, stride_x, V, K, n_rows, inv_tau, DX, TP, TQ, pid, dmu, dstd, c_ce, t, valid, c_kl,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CE_MODE: tl.constexpr, KL_MODE: tl.constexpr):
        rows, rmask, cols, cmask, m2 = _tile_index(pid, n_rows, K, BLOCK_R, BLOCK_K)
        p, logp, mu, d, var = _row_tile(X, stride_x, V, inv_tau, rows, cols, cmask, m2)
        ko = rows[:, None] * K + cols[None, :]
        # the mean/std part first, so the centred bins d are dead before the CE/KL tiles are loaded
        # (fewer live [BLOCK_R, BLOCK_K] tiles, fewer registers)
        g = _stats_grad(p, d, var, dmu, dstd)
        if CE_MODE == 1:
            onehot = (cols[None, :] == t[:, None]).to(tl.float32)
            g += tl.where(valid[:, None], c_ce[:, None] * (p - onehot), 0.0)
        if CE_MODE == 2:
            tp = tl.load(TP + ko, mask=m2, other=0.0).to(tl.float32)
            g += c_ce[:, None] * (p * tl.sum(tp, 1)[:, None] - tp)
        if KL_MODE > 0:
            if KL_MODE == 1:
                tx = tl.load(TQ + ko, mask=m2, other=0.0).to(tl.float32)
                q, _lq = _log_softmax(tx, cmask, inv_tau)
            else:
                q = tl.load(TQ + ko, mask=m2, other=0.0).to(tl.float32)
            g += c_kl[:, None] * (p * tl.sum(q, 1)[:, None] - q)
        g = g * inv_tau
        tl.store(DX + ko, g.to(DX.dtype.element_ty), mask=m2)

    @triton.jit
    def _rubric_bwd_flat(X, stride_x, V, inv_tau, DX, TP, TQ, rows, rmask, dmu, dstd, c_ce, t, valid, c_kl,
                         BLOCK_R: tl.constexpr, CE_MODE: tl.constexpr, KL_MODE: tl.constexpr, KC: tl.constexpr):
        off = rows * stride_x
        ko = rows * KC
        m, s, mu, var = _flat_stats(X, off, V, KC, inv_tau, rmask, BLOCK_R)
        inv_s = 1.0 / s
        dvar = _dvar(var, dstd)
        sum_tp = tl.zeros([BLOCK_R], tl.float32)
        if CE_MODE == 2:
            for k in tl.static_range(KC):
                sum_tp += tl.load(TP + ko + k, mask=rmask, other=0.0).to(tl.float32)
        sum_q = tl.zeros([BLOCK_R], tl.float32)
        mq = tl.zeros([BLOCK_R], tl.float32)
        inv_sq = tl.zeros([BLOCK_R], tl.float32)
        if KL_MODE == 1:
            mq, sq = _flat_max_sum(TQ, ko, KC, inv_tau, rmask, BLOCK_R)
            inv_sq = 1.0 / sq
            sum_q = sq * inv_sq
        if KL_MODE == 2:
            for k in tl.static_range(KC):
                sum_q += tl.load(TQ + ko + k, mask=rmask, other=0.0).to(tl.float32)
        for k in tl.static_range(KC):
            pk = tl.exp(tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau - m) * inv_s
            dk = tl.load(V + k).to(tl.float32) - mu
            g = pk * (dk * dmu + dvar * (dk * dk - var))
            if CE_MODE == 1:
                g += tl.where(valid, c_ce * (pk - (t == k).to(tl.float32)), 0.0)
            if CE_MODE == 2:
                g += c_ce * (pk * sum_tp - tl.load(TP + ko + k, mask=rmask, other=0.0).to(tl.float32))
            if KL_MODE == 1:
                q = tl.exp(tl.load(TQ + ko + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau - mq) * inv_sq
                g += c_kl * (pk * sum_q - q)
            if KL_MODE == 2:
                g += c_kl * (pk * sum_q - tl.load(TQ + ko + k, mask=rmask, other=0.0).to(tl.float32))
            tl.store(DX + ko + k, (g * inv_tau).to(DX.dtype.element_ty), mask=rmask)


#: Most bins the row-per-thread layout unrolls; larger grids use the tile layout whatever FLAT says.
FLAT_MAX_BINS = 32


def _flat(cfg, k: int) -> dict:
    """The FLAT / KC constexprs of a launch: the row-per-thread layout when the tuning table asks for
    it and the grid is small enough to unroll (KC = K), else the tile layout (KC unused, fixed at 1
    so it adds no compile variants)."""
    flat = bool(cfg.get("FLAT", 0)) and k <= FLAT_MAX_BINS
    return dict(FLAT=flat, KC=k if flat else 1)


_KL_NONE, _KL_LOGITS, _KL_PROBS = 0, 1, 2
_CE_NONE, _CE_HARD, _CE_SOFT = 0, 1, 2


def _launch_fwd(
    x: torch.Tensor,
    bins: torch.Tensor,
    inv_tau: float,
    *,
    target=None,
    target_probs=None,
    teacher=None,
    kl_mode: int = _KL_NONE,
    pairs=None,
    gaps=None,
    ignore_index: int = -100,
    weights=(1.0, 1.0, 1.0),
    reduction: str = "mean",
    needs_grad: bool = False,
):
    """Launch the fused loss forward kernel on contiguous ``x [..., K]`` (rows = leading dims,
    flattened); per-row outputs get the leading shape."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    rows = x.numel() // k
    dev = x.device
    ce_mode = _CE_HARD if target is not None else (_CE_SOFT if target_probs is not None else _CE_NONE)
    n_pairs = 0 if pairs is None else pairs.shape[0]
    has_pairs = n_pairs > 0
    reduce = reduction in ("mean", "sum")
    store_rows = reduction == "none"
    store_cnt = has_pairs and reduce and needs_grad
    store_sign = has_pairs and store_rows and needs_grad
    cfg = CONFIGS["rubric_fwd"]
    block_r, block_p = cfg["BLOCK_R"], cfg["BLOCK_P"]
    n_row_progs = max(1, cdiv(rows, block_r))
    n_pair_progs = cdiv(n_pairs, block_p) if has_pairs else 0

    f32 = dict(device=dev, dtype=torch.float32)
    mean = torch.empty(lead, **f32)
    std = torch.empty(lead, **f32)
    # buffers a configuration never writes are stood in for by ``mean`` (typed float32; the kernel
    # does not touch them and none is returned): fewer allocations per call
    if store_rows:
        ce_rows, kl_rows, pair_terms = (torch.empty(lead, **f32), torch.empty(lead, **f32),
                                        torch.empty(n_pairs, **f32))
    else:
        ce_rows = kl_rows = pair_terms = mean
    sign = torch.empty(n_pairs, **f32) if store_sign else mean
    nprog = n_row_progs + n_pair_progs
    zero_cnt = False
    if reduce:
        part = torch.empty(nprog * 4, **f32)
        loss, ce, kl, pair, nv = (torch.empty((), **f32) for _ in range(5))
        sem = semaphores(dev)
        if sem is not None:  # no fill: self-resetting counters, counts zeroed by the row programs
            cnt = torch.empty(rows if store_cnt else 0, device=dev, dtype=torch.int32)
            zero_cnt = store_cnt
        elif torch.compiler.is_compiling():
            # two buffers: torch.compile copies an argument written through two views of one buffer
            # before each launch (inductor fuses the two fills)
            cnt = torch.zeros(rows if store_cnt else 0, device=dev, dtype=torch.int32)
            sem = torch.zeros(4, device=dev, dtype=torch.int32)
        else:  # the one fill: int32 [per-row pair-sign counts | 4 counters]
            n_cnt = rows if store_cnt else 0
            cnt = torch.zeros(n_cnt + 4, device=dev, dtype=torch.int32)
            sem = cnt[n_cnt:]
    else:
        sem = cnt = torch.empty(0, device=dev, dtype=torch.int32)
        part = ce = kl = pair = nv = mean
        loss = torch.empty(lead, **f32)
    dummy = x
    _rubric_fwd_kernel[(nprog,)](
        x, k, bins, k, rows, inv_tau,
        target if target is not None else dummy,
        target_probs if target_probs is not None else dummy,
        teacher if teacher is not None else dummy,
        ignore_index,
        pairs if has_pairs else dummy,
        gaps if has_pairs else dummy,
        n_pairs,
        mean, std, ce_rows, kl_rows, pair_terms, sign, sem, cnt,
        part, loss, ce, kl, pair, nv,
        float(weights[0]), float(weights[1]), float(weights[2]), n_row_progs,
        BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_K=next_pow2(k), BLOCK_RED=BLOCK_RED,
        CE_MODE=ce_mode, KL_MODE=kl_mode, HAS_PAIRS=has_pairs,
        STORE_ROWS=store_rows, STORE_SIGN=store_sign,
        STORE_CNT=store_cnt, REDUCE=reduce, MEAN_RED=(reduction == "mean"), ZERO_CNT=zero_cnt,
        **_flat(cfg, k), num_warps=cfg["num_warps"],
    )
    return dict(
        mean=mean, std=std, ce_rows=ce_rows, kl_rows=kl_rows, pair_terms=pair_terms,
        sign=sign, ws=cnt if store_cnt else None, loss=loss, ce=ce, kl=kl, pair=pair, nv=nv,
    )


def _launch_bwd(
    x: torch.Tensor,
    bins: torch.Tensor,
    inv_tau: float,
    *,
    target=None,
    target_probs=None,
    teacher=None,
    kl_mode: int = _KL_NONE,
    ignore_index: int = -100,
    ce_coef: Optional[Tuple[torch.Tensor, float]] = None,
    ce_mean_nv: Optional[torch.Tensor] = None,
    kl_coef: Optional[Tuple[torch.Tensor, float]] = None,
    pair_coef: Optional[Tuple[torch.Tensor, float]] = None,
    kl_den=1,
    pair_den=1,
    ws: Optional[torch.Tensor] = None,
    dmu: Optional[torch.Tensor] = None,
    dstd: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the backward kernel; coefficients are ``(tensor, scale)`` with a 0-d or per-row tensor.

    The KL and pair coefficients are divided by ``kl_den`` and ``pair_den`` (sizes, for the mean
    reduction) in the kernel: a size-derived float from the host is a symbolic float under
    torch.compile(dynamic=True), which specialised the compiled backward to one size."""
    k = x.shape[-1]
    rows = x.numel() // k
    dx = torch.empty_like(x)
    if rows == 0:
        return dx
    dummy = x
    ce_mode = _CE_NONE
    if ce_coef is not None:
        ce_mode = _CE_HARD if target is not None else (_CE_SOFT if target_probs is not None else _CE_NONE)
    if kl_coef is None:
        kl_mode = _KL_NONE
    ce_t, ce_s = ce_coef if ce_mode else (dummy, 0.0)
    kl_t, kl_s = kl_coef if kl_mode else (dummy, 0.0)
    has_cnt = pair_coef is not None and ws is not None
    pr_t, pr_s = pair_coef if has_cnt else (dummy, 0.0)
    cfg = CONFIGS["rubric_bwd"]
    _rubric_bwd_kernel[(cdiv(rows, cfg["BLOCK_R"]),)](
        x, k, bins, k, rows, inv_tau, dx,
        target if target is not None else dummy,
        target_probs if target_probs is not None else dummy,
        teacher if teacher is not None else dummy,
        ignore_index,
        ce_t, 0 if ce_t.dim() == 0 else 1, float(ce_s),
        ce_mean_nv if ce_mean_nv is not None else dummy,
        kl_t, 0 if kl_t.dim() == 0 else 1, float(kl_s), kl_den,
        pr_t, float(pr_s), pair_den, ws if has_cnt else dummy,
        *_vec(dmu, dummy), *_vec(dstd, dummy),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_K=next_pow2(k),
        CE_MODE=ce_mode, CE_MEAN=ce_mean_nv is not None, KL_MODE=kl_mode,
        HAS_CNT=has_cnt, HAS_DMU=dmu is not None, HAS_DSTD=dstd is not None,
        **_flat(cfg, k), num_warps=cfg["num_warps"],
    )
    return dx


def _vec(t: Optional[torch.Tensor], dummy: torch.Tensor):
    """``(tensor, stride)`` of a per-row upstream gradient; stride 0 (an expanded scalar, as
    ``.sum()`` produces) is read in place instead of being copied to a contiguous buffer."""
    if t is None:
        return dummy, 0
    if t.dim() != 1:
        t = t.reshape(-1)
    if t.stride(0) not in (0, 1):
        t = t.contiguous()
    return t, t.stride(0)


def _skip_zero_grads(ctx) -> None:
    """Let unused outputs arrive as ``None`` in backward (no zero-filled tensors, no extra launches).

    Dynamo does not support ``set_materialize_grads``; under torch.compile the gradients arrive
    materialised (possibly zeros) and the backward's general path handles them.
    """
    if not torch.compiler.is_compiling():
        ctx.set_materialize_grads(False)


def _stats_forward(x, bins, inv_tau):
    """``(probs, mean, std)`` of contiguous ``x [..., K]``: the outputs keep the leading shape (no views)."""
    k = x.shape[-1]
    rows = x.numel() // k
    dev = x.device
    probs = torch.empty(x.shape, device=dev, dtype=torch.float32)
    mean = torch.empty(x.shape[:-1], device=dev, dtype=torch.float32)
    std = torch.empty(x.shape[:-1], device=dev, dtype=torch.float32)
    if rows:
        cfg = CONFIGS["stats_fwd"]
        _stats_fwd_kernel[(cdiv(rows, cfg["BLOCK_R"]),)](
            x, k, bins, k, rows, inv_tau, probs, mean, std,
            BLOCK_R=cfg["BLOCK_R"], BLOCK_K=next_pow2(k), **_flat(cfg, k), num_warps=cfg["num_warps"],
        )
    return probs, mean, std


class _ScoreStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bins, inv_tau):
        probs, mean, std = _stats_forward(x, bins, inv_tau)
        ctx.save_for_backward(x, bins)
        ctx.inv_tau = inv_tau
        _skip_zero_grads(ctx)
        return probs, mean, std

    @staticmethod
    def backward(ctx, g_probs, g_mean, g_std):
        x, bins = ctx.saved_tensors
        if g_probs is None and g_mean is None and g_std is None:
            return None, None, None
        first_order_only("score_stats")
        k = x.shape[-1]
        rows = x.numel() // k
        dx = torch.empty_like(x)
        if rows:
            gp = g_probs if g_probs is not None else x
            if gp.dim() != 2:
                gp = gp.reshape(-1, k)  # a view for contiguous and for expanded (stride-0) gradients
            cfg = CONFIGS["stats_bwd"]
            _stats_bwd_kernel[(cdiv(rows, cfg["BLOCK_R"]),)](
                x, k, bins, k, rows, ctx.inv_tau, dx,
                gp, gp.stride(0), gp.stride(1), *_vec(g_mean, x), *_vec(g_std, x),
                BLOCK_R=cfg["BLOCK_R"], BLOCK_K=next_pow2(k),
                HAS_DP=g_probs is not None, HAS_DMU=g_mean is not None, HAS_DSTD=g_std is not None,
                **_flat(cfg, k), num_warps=cfg["num_warps"],
            )
        return dx, None, None


def score_stats_triton(logits: torch.Tensor, bins: torch.Tensor, temperature: float) -> ScoreStats:
    # the Function takes [..., K] as is: no reshapes or views of tracked tensors (host time per call)
    if not (logits.requires_grad and torch.is_grad_enabled()):  # scoring: no autograd.Function at all
        return ScoreStats(*_stats_forward(logits.contiguous(), bins, 1.0 / temperature))
    probs, mean, std = _ScoreStatsFn.apply(logits.contiguous(), bins, 1.0 / temperature)
    return ScoreStats(probs, mean, std)


def _combine(g_loss, weight, g_term):
    """Coefficient of one term's gradient: ``g_loss * weight + g_term`` as ``(tensor, scale)``."""
    if g_loss is not None and g_term is None:
        return g_loss.float().contiguous(), weight
    if g_loss is None and g_term is not None:
        return g_term.float().contiguous(), 1.0
    if g_loss is not None and g_term is not None:
        return (g_loss.float() * weight + g_term.float()).contiguous(), 1.0
    return None


def _rubric_forward(x, bins, target, target_probs, teacher, pairs, gaps, params) -> dict:
    inv_tau, kl_mode, w_ce, w_kl, w_pair, ignore_index, reduction, needs_grad = params
    return _launch_fwd(
        x, bins, inv_tau, target=target, target_probs=target_probs, teacher=teacher,
        kl_mode=kl_mode, pairs=pairs, gaps=gaps, ignore_index=ignore_index,
        weights=(w_ce, w_kl, w_pair), reduction=reduction, needs_grad=needs_grad,
    )


def _rubric_outputs(out: dict, reduction: str) -> tuple:
    """``(loss, ce, kl, pair, mean, std)`` from ``_launch_fwd``'s buffers: per-row / per-pair terms
    for ``reduction="none"``, the reduced ones otherwise."""
    if reduction == "none":
        return out["loss"], out["ce_rows"], out["kl_rows"], out["pair_terms"], out["mean"], out["std"]
    return out["loss"], out["ce"], out["kl"], out["pair"], out["mean"], out["std"]


class _RubricLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bins, target, target_probs, teacher, pairs, gaps, params):
        inv_tau, kl_mode, w_ce, w_kl, w_pair, ignore_index, reduction, needs_grad = params
        out = _rubric_forward(x, bins, target, target_probs, teacher, pairs, gaps, params)
        _skip_zero_grads(ctx)
        ctx.inv_tau, ctx.kl_mode, ctx.ignore_index, ctx.reduction = inv_tau, kl_mode, ignore_index, reduction
        ctx.weights = (w_ce, w_kl, w_pair)
        ctx.rows = x.numel() // x.shape[-1]
        ctx.n_pairs = 0 if pairs is None else pairs.shape[0]
        none_red = reduction == "none"
        # fixed order (None where absent: save_for_backward takes None)
        ctx.save_for_backward(
            x, bins, target, target_probs, teacher, pairs if none_red else None, out["ws"],
            out["sign"] if (none_red and ctx.n_pairs > 0) else None, None if none_red else out["nv"],
        )
        return _rubric_outputs(out, reduction)

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl, g_pair, g_mean, g_std):
        first_order_only("rubric_loss")
        x, bins, target, target_probs, teacher, pairs, ws, sign, nv = ctx.saved_tensors
        w_ce, w_kl, w_pair = ctx.weights
        has_ce = target is not None or target_probs is not None
        has_kl = teacher is not None
        mean_red = ctx.reduction == "mean"
        ce_coef = _combine(g_loss, w_ce, g_ce) if has_ce else None
        kl_coef = _combine(g_loss, w_kl, g_kl) if has_kl else None
        pair_coef = None
        dmu = g_mean
        if ctx.n_pairs > 0:
            if ctx.reduction == "none":
                if g_pair is not None:
                    contrib = g_pair.float() * sign
                    dmu_p = torch.zeros(ctx.rows, device=x.device, dtype=torch.float32)
                    dmu_p.index_add_(0, pairs[:, 0].long(), contrib).index_add_(0, pairs[:, 1].long(), -contrib)
                    dmu = dmu_p if dmu is None else dmu.reshape(-1) + dmu_p
            else:
                pair_coef = _combine(g_loss, w_pair, g_pair)
        dx = _launch_bwd(
            x, bins, ctx.inv_tau, target=target, target_probs=target_probs, teacher=teacher,
            kl_mode=ctx.kl_mode, ignore_index=ctx.ignore_index,
            ce_coef=ce_coef, ce_mean_nv=nv if (mean_red and ce_coef is not None) else None,
            kl_coef=kl_coef, pair_coef=pair_coef, kl_den=ctx.rows if mean_red else 1,
            pair_den=ctx.n_pairs if mean_red else 1, ws=ws, dmu=dmu, dstd=g_std,
        )
        return (dx,) + (None,) * 7


def rubric_loss_triton(
    logits: torch.Tensor,
    bins: torch.Tensor,
    *,
    target=None,
    target_probs=None,
    teacher_logits=None,
    teacher_probs=None,
    pairs=None,
    pair_gaps=None,
    weight_ce=1.0,
    weight_kl=1.0,
    weight_pair=1.0,
    ignore_index=-100,
    reduction="mean",
    temperature=1.0,
) -> RubricLossOutput:
    # the Function takes [..., K] and leading-shape targets as they are (contiguous): no reshapes or
    # views of tracked tensors, which cost host time per call; per-row outputs come back shaped
    x = logits.contiguous()
    tgt = _const(target)
    tp = _const(target_probs)
    if teacher_logits is not None:
        teacher, kl_mode = _const(teacher_logits), _KL_LOGITS
    elif teacher_probs is not None:
        teacher, kl_mode = _const(teacher_probs), _KL_PROBS
    else:
        teacher, kl_mode = None, _KL_NONE
    has_pairs = pairs is not None and pairs.shape[0] > 0
    prs = pairs.contiguous() if has_pairs else None
    gaps = _const(pair_gaps) if has_pairs else None
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    params = (1.0 / temperature, kl_mode, float(weight_ce), float(weight_kl), float(weight_pair), int(ignore_index),
              reduction, needs_grad)
    if not needs_grad:  # nothing to differentiate: no autograd.Function at all
        return RubricLossOutput(*_rubric_outputs(_rubric_forward(x, bins, tgt, tp, teacher, prs, gaps, params),
                                                 reduction))
    return RubricLossOutput(*_RubricLossFn.apply(x, bins, tgt, tp, teacher, prs, gaps, params))


def _const(t):
    """A constant input (no gradient flows to it), contiguous."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    return t.contiguous()
