"""Per-kernel device time (torch.profiler) of the fused ops and the compiled group advantage.

Run on a CUDA machine after building the extension:  python bench/profile_kernels.py [SUBSTRING]
Prints one line per (case, kernel): total device microseconds per call, averaged over 20 calls.
With SUBSTRING, only the cases whose name contains it.
"""

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import zreward_kernels as zk
from zreward_kernels._tuning import override

dev = "cuda"
K = 9


def cases():
    g = torch.Generator().manual_seed(0)
    for m, grp in ((1 << 20, 16), (1 << 22, 16)):
        r = torch.randn(m, generator=g).to(dev)
        yield f"group_advantage M={m} g={grp}", lambda r=r, grp=grp: zk.group_advantage(r, group_size=grp, validate=False)
        sizes = torch.full((m // 16,), 16)
        offs = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(dev)
        yield f"group_advantage M={m} offsets(16)", lambda r=r, o=offs: zk.group_advantage(r, group_offsets=o, validate=False)
        var = torch.randint(1, 32, (m // 16,), generator=g)
        var[-1] += m - int(var.sum()) if int(var.sum()) < m else 0
        vo = torch.cat([torch.zeros(1, dtype=torch.long), var.cumsum(0)]).clamp(max=m)
        vo[-1] = m
        yield f"group_advantage M={m} offsets(1-31)", lambda r=r, o=vo.to(dev): zk.group_advantage(r, group_offsets=o, validate=False)
    rows = 262144
    x = torch.randn(rows, K, generator=g).to(dev).requires_grad_(True)
    kw = dict(target=torch.randint(0, K, (rows,), generator=g).to(dev), teacher_logits=torch.randn(rows, K, generator=g).to(dev),
              pairs=torch.randint(0, rows, (rows // 2, 2), generator=g).to(dev), pair_gaps=torch.randn(rows // 2, generator=g).to(dev))
    yield f"rubric_loss fwd+bwd rows={rows}", lambda: zk.rubric_loss(x, validate=False, **kw).loss.backward()
    yield f"rubric_loss fwd+bwd rows={rows} no pairs", lambda: zk.rubric_loss(
        x, validate=False, target=kw["target"], teacher_logits=kw["teacher_logits"]).loss.backward()
    # the kernel issue's goal size (P = 512, one wave of programs) at G = 8 and other group sizes, and a large batch
    for n_pairs, grp in ((512, 8), (512, 2), (512, 4), (512, 16), (rows // 16, 8)):
        gx = torch.randn(n_pairs, 2, grp, K, generator=g).to(dev).requires_grad_(True)
        sc = torch.full((n_pairs, 2), 3.0, device=dev)
        yield (f"gdso_loss fwd+bwd P={n_pairs} G={grp}",
               lambda gx=gx, sc=sc: zk.gdso_loss(gx, sc, validate=False).loss.backward())
    yield f"score_stats fwd+bwd rows={rows}", lambda: (lambda s: (s.mean.sum() + s.std.sum()).backward())(zk.score_stats(x, validate=False))
    # the restricted-head issue's goal point (Qwen2.5-7B head, bf16, N = 1024): which kernels the
    # restricted path's device time goes to (22.5 us forward per replay in CUDA graphs on the H200,
    # 2026-11-27, against 16.7 us for 100x the full head's), and the full head beside it
    n, h, v = 1024, 3584, 152064
    w = (torch.randn(v, h, generator=g) * 0.02).to(dev, torch.bfloat16)
    ids = torch.arange(151600, 151609, device=dev)
    hid = torch.randn(n, h, generator=g).to(dev, torch.bfloat16).requires_grad_(True)

    def restricted_fwd():
        with torch.no_grad():
            return zk.restricted_logits(hid, w, ids, validate=False)

    def full_fwd():
        with torch.no_grad():
            return (hid @ w.t())[:, ids]

    yield f"restricted_logits fwd N={n} H={h}", restricted_fwd
    yield (f"restricted_logits + score_stats mean fwd+bwd N={n} H={h}",
           lambda: zk.score_stats(zk.restricted_logits(hid, w, ids, validate=False), validate=False).mean.sum().backward())
    # the same through the fused entry point (with KERNEL=1: one launch forward, one backward)
    yield (f"score_stats_from_hidden mean fwd+bwd N={n} H={h}",
           lambda: zk.score_stats_from_hidden(hid, w, ids, validate=False).mean.sum().backward())
    yield f"full head then gather fwd N={n} V={v}", full_fwd


# launch settings timed beside the default: (kernel in zreward_kernels/_tuning.py, (label, settings)...)
VARIANTS = {
    "gdso_loss fwd+bwd P=512 G=8": ("gdso_fwd", (("WARP_STATS=0", dict(WARP_STATS=0)),
                                                 ("num_warps=8", dict(num_warps=8)),
                                                 ("FLAT=1 PAIRS=1 (one warp)", dict(FLAT=1, PAIRS=1)),
                                                 ("FLAT=1 PAIRS=2", dict(FLAT=1, PAIRS=2)))),
    # row per thread (FLAT=1): about a third of the tile layout's instructions per pair for sm_90
    # (aot_check), which matters where the kernel is issue-bound (many waves), not where one wave's
    # latency decides (P = 512)
    "gdso_loss fwd+bwd P=16384 G=8": ("gdso_fwd", (("FLAT=1 PAIRS=2", dict(FLAT=1, PAIRS=2)),
                                                   ("FLAT=1 PAIRS=8", dict(FLAT=1, PAIRS=8)))),
    # small groups: fewer barriers with fewer warps (sm_90, aot_check), more instructions per lane
    "gdso_loss fwd+bwd P=512 G=2": ("gdso_fwd", (("num_warps=1", dict(num_warps=1)), ("num_warps=2", dict(num_warps=2)))),
    "gdso_loss fwd+bwd P=512 G=4": ("gdso_fwd", (("num_warps=1", dict(num_warps=1)), ("num_warps=2", dict(num_warps=2)))),
    # the Triton projection (KERNEL=1, the default) in a few tilings against the matrix product
    "restricted_logits fwd N=1024 H=3584": ("restricted_fwd", tuple(
        (f"Triton BLOCK_N={bn} BLOCK_H={bh} num_warps={w}", dict(KERNEL=1, BLOCK_N=bn, BLOCK_H=bh, num_warps=w))
        for bn, bh, w in ((16, 256, 4), (16, 128, 4), (32, 128, 4), (16, 512, 8), (64, 64, 4)))),
    # with gradients the same switch runs the forward kernel and the hidden-state gradient kernel
    "restricted_logits + score_stats mean fwd+bwd N=1024 H=3584": ("restricted_fwd", (
        ("Triton (forward and hidden-state gradient kernels, default tiles)", dict(KERNEL=1)),)),
    "score_stats_from_hidden mean fwd+bwd N=1024 H=3584": ("restricted_fwd", (
        ("Triton (projection and statistics fused, forward and backward, default tiles)", dict(KERNEL=1)),)),
}


def variants():
    """Every case; the group advantage once per CUDA segment kernel (the KERNEL launch setting),
    gdso_loss at the goal point also with cross-warp group statistics, with 8 warps and row per
    thread (FLAT=1), at P = 16384 also row per thread, and at
    G = 2 and 4 also with 1 and 2 warps (the default is 4); the restricted head's forward also
    with its Triton projection in several tilings, and its fwd+bwd with the Triton kernels (the
    plain cases pinned to the matrix product).  A VARIANTS key that names no case is reported (its
    variants would otherwise be left out without a word)."""
    seen = set()
    for name, fn in cases():
        seen.add(name)
        if name.startswith("group_advantage"):
            for k in (1, 2):
                def run(fn=fn, k=k):
                    with override("group_advantage", KERNEL=k):
                        return fn()
                yield f"{name} kernel={k}", run
        elif name.startswith(("restricted_logits", "score_stats_from_hidden")):
            # the matrix product, whatever a tuned-configuration file chose; the kernels are the variants
            def run(fn=fn):
                with override("restricted_fwd", KERNEL=0):
                    return fn()
            yield f"{name} (matrix product)", run
        else:
            yield name, fn
        kernel, settings = VARIANTS.get(name, (None, ()))
        for what, cfg in settings:
            def run(fn=fn, kernel=kernel, cfg=cfg):
                with override(kernel, **cfg):
                    return fn()
            yield f"{name} {what}", run
    unknown = sorted(set(VARIANTS) - seen)
    if unknown:
        print(f"VARIANTS keys that name no case (not profiled): {unknown}", flush=True)


only = sys.argv[1] if len(sys.argv) > 1 else ""
for name, fn in variants():
    if only not in name:
        continue
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    tot = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name[:70]] += e.device_time / 20
    print(f"== {name}: {sum(tot.values()):.1f} us device time per call")
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
        print(f"   {v:8.1f} us  {k}")
