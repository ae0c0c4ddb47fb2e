"""Fused Triton kernel for ``gdso_loss`` (SPEC section 3).

A program holds whole pairs (``_tuning.CONFIGS["gdso_fwd"]["PAIRS"]`` of them, one by default),
each pair's ``2 G`` rows (side ``w`` then side ``l``), so the ``G x G`` gap terms, both group
advantages and the direct losses come out of one pass over the logits.  The gradient of the
(P-averaged) loss is written during the forward (grad-in-forward): every normaliser is static here
(``1/P``, ``1/2G``, ``1/(2 G^2 R)``), so the backward is a single device-side multiply by
``grad_output``.  The scalar loss is reduced by the last program to finish,
in a fixed order (deterministic, no float atomics).

The row-wise part (softmax, mean, variance, the CE target) has two layouts, as the rubric kernels
do (``FLAT`` in the tuning table): a ``[rows, bins padded to 16]`` tile reduced across lanes (the
default), or row per thread, each lane visiting its row's bins in unrolled loops.  The group part
(the ``G x G`` gap terms and the group statistics) is the same code in both.
"""

from __future__ import annotations

import torch

from ._common import first_order_only
from ._triton_utils import HAS_TRITON, cdiv, next_pow2, tl, triton
from ._tuning import CONFIGS
from ._workspace import semaphores
from .reference import GDSOOutput
from .rubric import _flat

BLOCK_RED = 256

if HAS_TRITON:
    from .rubric import _dist_stats, _flat_stats

    @triton.jit
    def _flat_target(X, off, V, KC: tl.constexpr, inv_tau, rmask, s_j, BLOCK_R: tl.constexpr):
        """Row per thread: the scaled logit at the bin nearest ``s_j`` (the first of equally near
        bins, as ``tl.argmin`` and the reference's ``argmin`` pick) and that bin's index."""
        best = tl.full([BLOCK_R], float("inf"), tl.float32)
        zt = tl.zeros([BLOCK_R], tl.float32)
        bidx = tl.zeros([BLOCK_R], tl.int32)
        for k in tl.static_range(KC):
            dk = tl.abs(tl.load(V + k).to(tl.float32) - s_j)
            closer = dk < best
            best = tl.where(closer, dk, best)
            zt = tl.where(closer, tl.load(X + off + k, mask=rmask, other=0.0).to(tl.float32) * inv_tau, zt)
            bidx = tl.where(closer, k, bidx)
        return zt, bidx

    @triton.jit
    def _gdso_fwd_kernel(
        X, S, V, K, G, n_pairs, inv_tau,
        DX, MEAN, STD, RPT, RPW, RWD, ADV, CE, PW, PART, COUNTER, LOSS,
        lambda_pt, lambda_pw, alpha_pt, alpha_pw, eps,
        r_range, inv_r,
        PAIRS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RED: tl.constexpr,
        NEEDS_GRAD: tl.constexpr, WARP_STATS: tl.constexpr, FLAT: tl.constexpr, KC: tl.constexpr,
        GAP4: tl.constexpr,
    ):
        # A program holds PAIRS pairs.  Row-wise maths runs on the flat [PAIRS * BLOCK_S, BLOCK_K]
        # tile (slot s of pair j at flat row j * BLOCK_S + s; 2G rows per pair padded to BLOCK_S);
        # group maths on its [PAIRS, BLOCK_S] view and the [PAIRS, BLOCK_S, BLOCK_S] gap matrices.
        pid = tl.program_id(0).to(tl.int64)
        # 1/G and 1/P from the integer sizes here: a host-side 1 / n_pairs is a symbolic float under
        # torch.compile(dynamic=True), which inductor passed to the kernel typed as an integer
        inv_g = 1.0 / tl.maximum(G, 1).to(tl.float32)
        inv_p = 1.0 / tl.maximum(n_pairs, 1).to(tl.float32)
        cols = tl.arange(0, BLOCK_K)
        cmask = cols < K
        v = tl.load(V + cols, mask=cmask, other=0.0).to(tl.float32)

        # slot s of a pair: side s // BLOCK_G, member s % BLOCK_G (BLOCK_G = next_pow2(G), so a pair's
        # [BLOCK_S] row view is [2, BLOCK_G]: the gap terms and group statistics take [2, G, G], not
        # [2G, 2G] of which half is the wrong side)
        BLOCK_G: tl.constexpr = BLOCK_S // 2
        f = tl.arange(0, PAIRS * BLOCK_S)
        slot = f % BLOCK_S
        pair = pid * PAIRS + f // BLOCK_S
        side = slot // BLOCK_G
        member = slot % BLOCK_G
        fmask = (member < G) & (pair < n_pairs)
        rows = pair * 2 * G + side * G + member
        g_f = G * 1.0
        if FLAT:
            # row per thread: each lane owns a row and visits its KC bins in unrolled loops that
            # re-read the row from L1 (no bin padding, no cross-lane reductions for the softmax)
            off = rows * K
            sc0 = tl.load(S + 2 * pair, mask=fmask, other=0.0).to(tl.float32)
            sc1 = tl.load(S + 2 * pair + 1, mask=fmask, other=0.0).to(tl.float32)
            s_j = tl.where(side == 0, sc0, sc1)
            gap = tl.where(side == 0, sc0 - sc1, sc1 - sc0)  # gap_j = s_j - s_jbar
            zmax, ssum, mu, var = _flat_stats(X, off, V, KC, inv_tau, fmask, PAIRS * BLOCK_S)
            # hard target at the annotated bin (nearest bin; exact for scores on the grid)
            zt, bidx = _flat_target(X, off, V, KC, inv_tau, fmask, s_j, PAIRS * BLOCK_S)
            logp_t = tl.where(fmask, zt - zmax - tl.log(ssum), 0.0)
        else:
            m2 = fmask[:, None] & cmask[None, :]
            ko = rows[:, None] * K + cols[None, :]
            x = tl.load(X + ko, mask=m2, other=0.0).to(tl.float32)
            # every global load is issued here, before the first reduction: a load placed after one
            # waits for it (ptxas issued the score loads after the softmax's shuffles, and does not
            # move a load above a barrier), adding a memory round trip to the serial chain of each
            # program, which is what a one-wave launch (P = 512) waits for
            sc0 = tl.load(S + 2 * pair, mask=fmask, other=0.0).to(tl.float32)
            sc1 = tl.load(S + 2 * pair + 1, mask=fmask, other=0.0).to(tl.float32)
            p, logp, mu, d, var = _dist_stats(x, v, cmask, inv_tau)

            s_j = tl.where(side == 0, sc0, sc1)
            gap = tl.where(side == 0, sc0 - sc1, sc1 - sc0)  # gap_j = s_j - s_jbar

            # hard target at the annotated bin (nearest bin; exact for scores on the grid)
            dist = tl.where(cmask[None, :], tl.abs(v[None, :] - s_j[:, None]), float("inf"))
            bidx = tl.argmin(dist, 1)
            onehot = cols[None, :] == bidx[:, None]
            logp_t = tl.where(fmask, tl.sum(tl.where(onehot, logp, 0.0), 1), 0.0)

        # per-pair [PAIRS, BLOCK_S] views
        mu2 = tl.reshape(mu, (PAIRS, BLOCK_S))
        gap2 = tl.reshape(gap, (PAIRS, BLOCK_S))
        sj2 = tl.reshape(s_j, (PAIRS, BLOCK_S))
        ok2 = tl.reshape(fmask, (PAIRS, BLOCK_S))
        s_i = tl.arange(0, BLOCK_S)
        s_side = s_i // BLOCK_G
        s_ok = (s_i % BLOCK_G) < G  # slot s holds a member
        side2 = s_side[None, :]
        two = tl.arange(0, 2)
        m_i = tl.arange(0, BLOCK_G)
        m_ok = (m_i < G)[None, None, None, :]  # member s' exists

        # G x G gap terms: e[s, s'] = (mu_s - mu_s') - gap_s for s' on the other side
        if GAP4:
            # on a [PAIRS, 2, BLOCK_G, BLOCK_G] layout (side of s, s, s'): half the elements of
            # [BLOCK_S, BLOCK_S], but layout conversions cost barriers (sm_90, Triton 3.8, G = 8, tile
            # layout: 896 instructions and 25 barriers per program against 928 and 11), so the tile
            # layout takes it for large groups only (G = 64: 2,248 instructions and no spill; the
            # [BLOCK_S, BLOCK_S] form had 4,632 and spilled 32 B before slots were side * BLOCK_G + member)
            mu4 = tl.reshape(mu2, (PAIRS, 2, BLOCK_G))
            mu_oth = tl.sum(tl.where((two[:, None] != two[None, :])[None, :, :, None], mu4[:, None, :, :], 0.0), 2)
            valid = tl.reshape(ok2, (PAIRS, 2, BLOCK_G))[:, :, :, None] & m_ok
            e = (mu4[:, :, :, None] - mu_oth[:, :, None, :]) - tl.reshape(gap2, (PAIRS, 2, BLOCK_G))[:, :, :, None]
            sgn = tl.where(valid, tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0)), 0.0)
            row_abs = tl.reshape(tl.sum(sgn * e, 3), (PAIRS, BLOCK_S))  # sum_s' |e[s, s']|
            row_sgn = tl.reshape(tl.sum(sgn, 3), (PAIRS, BLOCK_S))
            row_smu = tl.reshape(tl.sum(sgn * mu_oth[:, :, None, :], 3), (PAIRS, BLOCK_S))  # sum_s' sign(e) mu_s'
        else:
            # on the [PAIRS, BLOCK_S, BLOCK_S] layout, the [PAIRS, BLOCK_S] views broadcast (no conversion)
            other = s_ok[None, :] & (s_side[:, None] != s_side[None, :])  # [BLOCK_S, BLOCK_S]
            valid = ok2[:, :, None] & other[None, :, :]
            e = (mu2[:, :, None] - mu2[:, None, :]) - gap2[:, :, None]
            sgn = tl.where(valid, tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0)), 0.0)
            row_abs = tl.sum(sgn * e, 2)  # sum_s' |e[s, s']|
            row_sgn = tl.sum(sgn, 2)
            row_smu = tl.sum(sgn * mu2[:, None, :], 2)  # sum_s' sign(e[s, s']) mu_s'
        # ce and pw per pair in one reduction over the members (a cross-warp sum: once, not twice),
        # laid out [PAIRS, 2] as they are stored
        cp = tl.sum(tl.join(tl.reshape(logp_t, (PAIRS, BLOCK_S)), row_abs), 1) \
            * tl.where(two == 0, -0.5 * inv_g, 0.5 * inv_g * inv_g * inv_r)[None, :]  # [PAIRS, 2]: ce, pw

        # Rewards and group-normalised advantages (unbiased std per side; a group of one gets 0), in
        # float32 with the reward written as an affine function of the row's own mean:
        #   r = (lambda_pt + lambda_pw) + (c_mu * mu_s + d_mu) / (G R),
        #   c_mu = -(lambda_pt (sigma G + row_sgn) + (lambda_pw - lambda_pt) row_sgn),
        #   d_mu = lambda_pt sigma s_j G + lambda_pw (row_sgn gap_s + row_smu),
        # with sigma = sign(mu_s - s_j), since |mu_s - s_j| = sigma (mu_s - s_j) and
        # sum_s' |e[s, s']| = row_sgn (mu_s - gap_s) - row_smu.  Where the reward is flat in mu
        # (lambda_pt == lambda_pw, mu_s < s_j, every predicted gap beyond gap_j: sigma = -1, row_sgn = G)
        # c_mu is exactly 0 and d_mu the same float32 value for every such member (the same signs, so the same
        # row_smu sum in the same order): rewards equal in exact arithmetic come out bitwise equal, instead
        # of differing by rounding noise that (std + eps) would blow up.  Deviations are taken from each
        # side's first reward, as in group_advantage: equal rewards give advantage exactly 0.
        # (Float64 here, as the reference does it, cost registers and time on the GPU: 72 vs 48 registers
        # for sm_90 at G = 8 with Triton 3.8; on an H200 the kernel took 112 us at P = 16384, the earlier
        # float32 version 64 us.)
        sig = tl.where(mu2 > sj2, 1.0, tl.where(mu2 < sj2, -1.0, 0.0))
        sum_abs = row_sgn * (mu2 - gap2) - row_smu
        r_pt = 1.0 - tl.abs(mu2 - sj2) / r_range
        r_pw = 1.0 - sum_abs / (g_f * r_range)
        # sigma G + row_sgn and lambda_pw - lambda_pt are exact, so c_mu is exactly 0 in the flat case
        # whichever products the compiler fuses into FMAs
        c_mu = -(lambda_pt * (sig * g_f + row_sgn) + (lambda_pw - lambda_pt) * row_sgn)
        d_mu = lambda_pt * sig * sj2 * g_f + lambda_pw * (row_sgn * gap2 + row_smu)
        r = (lambda_pt + lambda_pw) + (c_mu * mu2 + d_mu) / (g_f * r_range)
        gm1 = tl.maximum(g_f - 1.0, 1.0)
        if WARP_STATS:
            # Group statistics of each side, per row s over the members s' of its side, on the
            # layout of the gap terms, whose s' axis lies within a warp: warp shuffles instead of
            # reductions across warps through shared memory (for sm_90 at G = 8, 11 barriers per
            # program instead of 21 with Triton 3.8; a program's latency is what a P = 512 call waits
            # for).  WARP_STATS=0 (and groups above 16, _gdso_launch_config) reduce across the
            # [PAIRS, BLOCK_S] view instead (fewer registers: the shuffle path spilled 468 B at G = 64).
            if GAP4:
                r_col = tl.where(m_ok, tl.broadcast_to(tl.reshape(r, (PAIRS, 2, BLOCK_G))[:, :, None, :],
                                                        (PAIRS, 2, BLOCK_G, BLOCK_G)), 0.0)  # r of s's side
                f_row = tl.sum(tl.where((m_i == 0)[None, None, None, :], r_col, 0.0), 3)  # its first member's
                dr_col = tl.where(m_ok, r_col - f_row[:, :, :, None], 0.0)
                m_row = tl.sum(dr_col, 3) / g_f
                dev_col = tl.where(m_ok, dr_col - m_row[:, :, :, None], 0.0)
                sd_row = tl.reshape(tl.sqrt(tl.sum(dev_col * dev_col, 3) / gm1), (PAIRS, BLOCK_S))
                dev = (r - tl.reshape(f_row, (PAIRS, BLOCK_S))) - tl.reshape(m_row, (PAIRS, BLOCK_S))
            else:
                same = (s_ok[None, :] & (s_side[:, None] == s_side[None, :]))[None, :, :] & ok2[:, :, None]
                r_col = tl.where(same, r[:, None, :], 0.0)  # r of the members s' of row s's side
                first = (s_side * BLOCK_G)[:, None] == s_i[None, :]  # s' is the first member of row s's side
                f_row = tl.sum(tl.where(first[None, :, :] & same, r_col, 0.0), 2)
                dr_col = tl.where(same, r_col - f_row[:, :, None], 0.0)
                m_row = tl.sum(dr_col, 2) / g_f
                dev_col = tl.where(same, dr_col - m_row[:, :, None], 0.0)
                sd_row = tl.sqrt(tl.sum(dev_col * dev_col, 2) / gm1)
                dev = (r - f_row) - m_row
            den = sd_row + eps
        else:
            in0 = ok2 & (side2 == 0)
            in1 = ok2 & (side2 == 1)
            f0 = tl.sum(tl.where(ok2 & (s_i == 0)[None, :], r, 0.0), 1)
            f1 = tl.sum(tl.where(ok2 & (s_i == BLOCK_G)[None, :], r, 0.0), 1)
            dr = r - tl.where(side2 == 0, f0[:, None], f1[:, None])
            m0 = tl.sum(tl.where(in0, dr, 0.0), 1) / g_f
            m1 = tl.sum(tl.where(in1, dr, 0.0), 1) / g_f
            dev = dr - tl.where(side2 == 0, m0[:, None], m1[:, None])
            sd0 = tl.sqrt(tl.sum(tl.where(in0, dev * dev, 0.0), 1) / gm1)
            sd1 = tl.sqrt(tl.sum(tl.where(in1, dev * dev, 0.0), 1) / gm1)
            den = tl.where(side2 == 0, sd0[:, None], sd1[:, None]) + eps
        # a group of one, or std + eps == 0 (equal rewards with eps = 0), gets advantage 0
        adv = tl.where(den > 0.0, dev / tl.where(den > 0.0, den, 1.0), 0.0)
        adv = tl.where(g_f > 1.5, adv, 0.0)

        # The six per-row outputs are stored with one store, through a tensor of pointers into the
        # separate output tensors: a store converts its value's layout through shared memory (two
        # barriers), once for the joined value instead of once per output.  The outputs stay separate
        # tensors: views of one buffer cost more host time per call in autograd than they saved.
        std2 = tl.reshape(tl.sqrt(tl.maximum(var, 0.0)), (PAIRS, BLOCK_S))
        lo = tl.join(tl.join(mu2, std2), tl.join(r_pt, r_pw))
        hi = tl.join(tl.join(r, adv), tl.join(r, adv))  # the second half is padding, masked out
        six = tl.join(lo, hi)  # [PAIRS, BLOCK_S, 2, 2, 2]: [.., i, j, k], the output is (k, j, i)
        i3 = two[:, None, None]
        j3 = two[None, :, None]
        k3 = two[None, None, :]
        base = tl.where(k3 == 0, tl.where(j3 == 0, tl.where(i3 == 0, MEAN, STD), tl.where(i3 == 0, RPT, RPW)),
                        tl.where(i3 == 0, RWD, ADV))
        rows2 = tl.reshape(rows, (PAIRS, BLOCK_S))
        tl.store(base[None, None, :, :, :] + rows2[:, :, None, None, None], six,
                 mask=ok2[:, :, None, None, None] & ((k3 == 0) | (j3 == 0))[None, None, :, :, :])
        pairs1 = pid * PAIRS + tl.arange(0, PAIRS)
        pmask = pairs1 < n_pairs
        tl.store(tl.where(two == 0, CE, PW)[None, :] + pairs1[:, None], cp, mask=pmask[:, None])

        if NEEDS_GRAD:
            # d/dmu_s of sum_j sum_i sum_k |e| is 2 * sum_s' sign(e[s, s'])
            dmu = tl.reshape((alpha_pw * inv_g * inv_g * inv_r) * row_sgn, (PAIRS * BLOCK_S,))
            if FLAT:
                inv_s = 1.0 / ssum
                for k in tl.static_range(KC):
                    z = tl.load(X + off + k, mask=fmask, other=0.0).to(tl.float32) * inv_tau
                    pk = tl.exp(z - zmax) * inv_s
                    dk = tl.load(V + k).to(tl.float32) - mu
                    gk = (alpha_pt * 0.5 * inv_g) * (pk - (bidx == k).to(tl.float32)) + pk * dk * dmu
                    tl.store(DX + off + k, (gk * (inv_tau * inv_p)).to(DX.dtype.element_ty), mask=fmask)
            else:
                gx = (alpha_pt * 0.5 * inv_g) * (p - onehot.to(tl.float32)) + p * d * dmu[:, None]
                gx = gx * (inv_tau * inv_p)
                tl.store(DX + ko, gx.to(DX.dtype.element_ty), mask=m2)

        alpha = tl.where(two == 0, alpha_pt, alpha_pw)[None, :]
        tl.store(PART + pid, tl.sum(tl.sum(tl.where(pmask[:, None], alpha * cp, 0.0), 1), 0))
        tl.debug_barrier()
        nprog = tl.num_programs(0)
        ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel")
        if ticket == nprog - 1:
            tl.store(COUNTER, 0)  # every program has its ticket: back to zero (self-resetting, _workspace.py)
            ro = tl.arange(0, BLOCK_RED)
            acc = tl.zeros([BLOCK_RED], tl.float32)
            for start in range(0, nprog, BLOCK_RED):
                idx = start + ro
                acc += tl.load(PART + idx, mask=idx < nprog, other=0.0, volatile=True)
            tl.store(LOSS, tl.sum(acc, 0) * inv_p)


def _gdso_launch_config(g: int, k: int):
    """``(pairs per program, rows per pair, warps, warp-shuffle group statistics, layout constexprs)``
    from ``_tuning.CONFIGS["gdso_fwd"]``; a program holds at most 256 rows (``PAIRS * next_pow2(2G)``),
    and the shuffle statistics apply up to ``G = 16``.  Default warps (``num_warps`` 0): in the tile
    layout 4 up to ``G = 16``, 8 up to ``G = 32``, 16 above (the ``G x G`` gap terms of ``G = 64`` in
    8 warps needed 255 registers and spilled 588 B for sm_90 with Triton 3.6; 16 warps: 128
    registers, 180 B); row per thread (``FLAT=1``, up to 32 bins) one lane per row of the program,
    ``PAIRS * next_pow2(2G) / 32`` warps (at least 1, at most 8)."""
    cfg = CONFIGS["gdso_fwd"]
    block_s = next_pow2(2 * g)
    pairs = max(1, min(cfg["PAIRS"], 256 // block_s))
    layout = _flat(cfg, k)
    if cfg["num_warps"]:
        warps = cfg["num_warps"]
    elif layout["FLAT"]:
        warps = max(1, min(8, pairs * block_s // 32))
    else:
        warps = 4 if g <= 16 else 8 if g <= 32 else 16
    return pairs, block_s, warps, bool(cfg["WARP_STATS"]) and block_s <= 32, layout


def _gdso_forward(x, s, bins, params):
    """Allocate the outputs and launch the kernel: ``(loss, ce, pw, mean, std, r_pt, r_pw, r, adv, dx)``
    (``dx`` empty unless ``params``' last entry, ``needs_grad``, is set)."""
    r_range, inv_tau, lambda_pt, lambda_pw, alpha_pt, alpha_pw, eps, needs_grad = params
    n_pairs, _, g, k = x.shape
    dev = x.device
    f32 = torch.float32
    shp = (n_pairs, 2, g)
    mean = torch.empty(shp, device=dev, dtype=f32)
    std = torch.empty(shp, device=dev, dtype=f32)
    r_pt = torch.empty(shp, device=dev, dtype=f32)
    r_pw = torch.empty(shp, device=dev, dtype=f32)
    r = torch.empty(shp, device=dev, dtype=f32)
    adv = torch.empty(shp, device=dev, dtype=f32)
    ce = torch.empty(n_pairs, device=dev, dtype=f32)
    pw = torch.empty(n_pairs, device=dev, dtype=f32)
    pairs, block_s, warps, warp_stats, layout = _gdso_launch_config(g, k)
    nprog = cdiv(n_pairs, pairs)
    part = torch.empty(nprog, device=dev, dtype=f32)
    loss = torch.empty((), device=dev, dtype=f32)
    counter = semaphores(dev)  # zero now and after the launch: no fill per call
    if counter is None:
        counter = torch.zeros(1, device=dev, dtype=torch.int32)
    dx = torch.empty_like(x) if needs_grad else torch.empty(0, device=dev, dtype=x.dtype)
    _gdso_fwd_kernel[(nprog,)](
        x, s, bins, k, g, n_pairs, inv_tau,
        dx, mean, std, r_pt, r_pw, r, adv, ce, pw, part, counter, loss,
        float(lambda_pt), float(lambda_pw), float(alpha_pt), float(alpha_pw), float(eps),
        float(r_range), 1.0 / r_range,
        PAIRS=pairs, BLOCK_S=block_s, BLOCK_K=next_pow2(k), BLOCK_RED=BLOCK_RED, NEEDS_GRAD=needs_grad,
        WARP_STATS=warp_stats, num_warps=warps, GAP4=layout["FLAT"] or block_s > 32, **layout,
    )
    return loss, ce, pw, mean, std, r_pt, r_pw, r, adv, dx


def _scaled_grad(ctx, g_loss):
    first_order_only("gdso_loss")
    (dx,) = ctx.saved_tensors
    # a 0-d fp32 grad does not promote a bf16/fp16 tensor: one multiply kernel, input dtype kept
    return dx * g_loss


class _GDSOLossFn(torch.autograd.Function):
    """Eager calls that need the gradient: only ``loss`` passes through autograd.  The other
    outputs (detached by definition) are handed back through ``rest``, so autograd does not wrap
    eight more outputs forward and route eight empty gradient slots backward (5-14 us of host time
    per forward+backward on the development CPU; ``bench/results/cpu_host_path.md``)."""

    @staticmethod
    def forward(ctx, x, scores, bins, params, rest):
        loss, *others, dx = _gdso_forward(x, scores, bins, params)
        rest.extend(others)
        ctx.save_for_backward(dx)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        return _scaled_grad(ctx, g_loss), None, None, None, None


class _GDSOFn(torch.autograd.Function):
    """The same under torch.compile (Dynamo does not trace a forward that fills a Python list):
    every output comes out of the Function, all but ``loss`` marked non-differentiable."""

    @staticmethod
    def forward(ctx, x, scores, bins, params):
        *outs, dx = _gdso_forward(x, scores, bins, params)
        ctx.save_for_backward(dx)
        ctx.mark_non_differentiable(*outs[1:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_loss, *_unused):  # (the other outputs' gradients, zeros under compile, are unused)
        return (_scaled_grad(ctx, g_loss),) + (None,) * 3


def gdso_loss_triton(
    logits: torch.Tensor,
    scores: torch.Tensor,
    bins: torch.Tensor,
    r_range: float,
    *,
    lambda_pt: float = 1.0,
    lambda_pw: float = 1.0,
    alpha_pt: float = 1.0,
    alpha_pw: float = 1.0,
    eps: float = 1e-6,
    temperature: float = 1.0,
) -> GDSOOutput:
    x = logits.contiguous()
    s = (scores.detach() if scores.requires_grad else scores).float().contiguous()
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    params = (r_range, 1.0 / temperature, lambda_pt, lambda_pw, alpha_pt, alpha_pw, eps, needs_grad)
    if not needs_grad:  # nothing to differentiate: no autograd.Function at all
        return GDSOOutput(*_gdso_forward(x, s, bins, params)[:-1])
    if torch.compiler.is_compiling():
        return GDSOOutput(*_GDSOFn.apply(x, s, bins, params))
    rest = []
    loss = _GDSOLossFn.apply(x, s, bins, params, rest)
    return GDSOOutput(loss, *rest)
