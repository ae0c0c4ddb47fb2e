"""group_advantage: every backend against a loop-based reference; opcheck; compile; fallback."""

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from kernel_helpers import assert_close

import zreward_kernels as zk
from zreward_kernels._tuning import override
from zreward_kernels.advantage import EXT_STATUS, compiled_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _loop_reference(rewards, offsets, mode, eps):
    """Per-group Python loop over float64 values (the way verl writes it, made exact)."""
    vals = [float(v) for v in rewards.double().cpu()]
    adv = [0.0] * len(vals)
    means, stds, zs = [], [], []
    for g in range(len(offsets) - 1):
        grp = vals[offsets[g]:offsets[g + 1]]
        n = len(grp)
        if n == 0:
            means.append(0.0), stds.append(0.0), zs.append(True)
            continue
        mean = math.fsum(grp) / n
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in grp) / (n - 1)) if n > 1 else 0.0
        means.append(mean), stds.append(std), zs.append(max(grp) == min(grp))
        for i, v in enumerate(grp):
            if n == 1:
                a = 0.0
            elif mode == "std":
                a = (v - mean) / (std + eps) if std + eps > 0 else 0.0  # equal rewards with eps = 0: 0
            elif mode == "mean":
                a = v - mean
            else:
                a = v - (math.fsum(grp) - v) / (n - 1)
            adv[offsets[g] + i] = a
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(means), torch.tensor(stds), torch.tensor(zs)


def _backends(device):
    out = ["reference"]
    if compiled_available(torch.device(device)) is None:
        out.append("compiled")
    return out


def _check(rewards, offsets_list, mode, eps, device, backend, group_size=None, tol=1e-5):
    exp_adv, exp_mean, exp_std, exp_zs = _loop_reference(rewards, offsets_list, mode, eps)
    kw = dict(group_size=group_size) if group_size is not None else dict(
        group_offsets=torch.tensor(offsets_list, dtype=torch.long, device=device))
    # on CUDA, both segment kernels of csrc/group_advantage_cuda.cu (the KERNEL launch setting)
    kernels = (1, 2) if device == "cuda" and backend == "compiled" else (None,)
    for kernel in kernels:
        ctx = override("group_advantage", KERNEL=kernel) if kernel else contextlib.nullcontext()
        with ctx:
            adv, st = zk.group_advantage(rewards.to(device), mode=mode, eps=eps, backend=backend, **kw)
        want = torch.float64 if rewards.dtype == torch.float64 else torch.float32
        assert adv.dtype == want and st.mean.dtype == want and st.zero_std.dtype == torch.bool
        assert_close(adv, exp_adv, atol=tol, rtol=tol, name=f"advantage (kernel {kernel})")
        assert_close(st.mean, exp_mean, atol=tol, rtol=tol, name=f"mean (kernel {kernel})")
        assert_close(st.std, exp_std, atol=tol, rtol=tol, name=f"std (kernel {kernel})")
        assert torch.equal(st.zero_std.cpu(), exp_zs), f"zero_std (kernel {kernel})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["std", "mean", "rloo"])
@pytest.mark.parametrize("g", [1, 2, 3, 16, 33, 64, 1500])
def test_fixed_groups(device, mode, g):
    gen = torch.Generator().manual_seed(g)
    r = torch.randn(g * 7, generator=gen)
    r[:g] = 0.25  # an all-equal group
    for be in _backends(device):
        _check(r, list(range(0, g * 7 + 1, g)), mode, 1e-6, device, be, group_size=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["std", "mean", "rloo"])
def test_variable_groups_with_sizes_0_1_2_and_10000(device, mode):
    gen = torch.Generator().manual_seed(0)
    sizes = [0, 1, 2, 0, 5, 10000, 3, 1, 0, 64, 33]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    r = torch.randn(offsets[-1], generator=gen) * 3
    r[offsets[4]:offsets[5]] = -1.5  # all-equal group of 5
    for be in _backends(device):
        _check(r, offsets, mode, 1e-6, device, be)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [
    [1] * 200 + [500] + [0] * 50 + [2] * 30,  # small average (CUDA: few lanes per group) with one large group
    [3000, 0, 1, 2000, 17],                   # large average (CUDA: a block per group) with empty and single groups
])
def test_variable_groups_far_from_the_average(device, sizes):
    gen = torch.Generator().manual_seed(len(sizes))
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    r = torch.randn(offsets[-1], generator=gen) * 2 + 5
    for be in _backends(device):
        for mode in ("std", "rloo"):
            _check(r, offsets, mode, 1e-6, device, be)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 5, 40, 1500])  # warp segments and, on CUDA, the block kernel
def test_eps_zero_gives_zero_not_nan_for_equal_rewards(device, n):
    r = torch.cat([torch.full((n,), 0.7), torch.randn(n, generator=torch.Generator().manual_seed(n))])
    for backend in _backends(device):
        _check(r, [0, n, 2 * n], "std", 0.0, device, backend)
        _check(r, [0, n, 2 * n], "std", 0.0, device, backend, group_size=n)
        adv, _ = zk.group_advantage(r.to(device), group_size=n, eps=0.0, backend=backend)
        assert bool(torch.isfinite(adv).all()) and float(adv[:n].abs().max()) == 0.0, backend


@pytest.mark.parametrize("device", DEVICES)
def test_large_magnitude_rewards_keep_their_noise(device):
    gen = torch.Generator().manual_seed(1)
    r64 = 1e6 + torch.randn(4096, generator=gen, dtype=torch.float64) * 1e-3
    r32 = (1e6 + torch.randint(-64, 64, (4096,), generator=gen).float() * 0.0625)  # on the fp32 grid at 1e6
    for be in _backends(device):
        _check(r64, list(range(0, 4097, 16)), "std", 1e-6, device, be, group_size=16, tol=1e-6)
        _check(r32, list(range(0, 4097, 16)), "std", 1e-6, device, be, group_size=16, tol=1e-4)
        adv, _ = zk.group_advantage(r32.to(device), group_size=16, backend=be)
        assert float(adv.abs().max()) > 0.5  # no precision collapse to all-zero advantages


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_dtype(device, dtype):
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(96, generator=gen).to(dtype)  # the loop reference reads the same rounded values
    for be in _backends(device):
        _check(r, list(range(0, 97, 8)), "std", 1e-6, device, be, group_size=8)
        _check(r, [0, 10, 10, 50, 96], "rloo", 1e-6, device, be)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(device):
    for be in _backends(device):
        adv, st = zk.group_advantage(torch.zeros(0, device=device), group_size=4, backend=be)
        assert adv.shape == (0,) and st.mean.shape == (0,)
        adv, st = zk.group_advantage(torch.zeros(0, device=device), backend=be,
                                     group_offsets=torch.tensor([0, 0, 0], device=device))
        assert st.zero_std.tolist() == [True, True] and st.mean.tolist() == [0.0, 0.0]


def test_bad_input():
    r = torch.randn(10)
    with pytest.raises(ValueError, match="exactly one of group_size, group_offsets and group_ids"):
        zk.group_advantage(r)
    with pytest.raises(ValueError, match="exactly one of group_size, group_offsets and group_ids"):
        zk.group_advantage(r, group_size=5, group_offsets=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="exactly one of group_size, group_offsets and group_ids"):
        zk.group_advantage(r, group_size=5, group_ids=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group_ids must be \[M\] = \[10\]"):
        zk.group_advantage(r, group_ids=torch.zeros(9, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        zk.group_advantage(r, group_ids=torch.zeros(10))
    with pytest.raises(TypeError, match="got floats"):
        zk.group_advantage(r, group_ids=[0.5] * 10)
    with pytest.raises(TypeError, match="got str"):
        zk.group_advantage(r, group_ids="abcdefghij")
    for mixed in ([1, "a"] * 5, ["a", 1] * 5):  # numpy would turn 1 into "1"
        with pytest.raises(TypeError, match="sortable labels of one kind"):
            zk.group_advantage(r, group_ids=mixed)
    with pytest.raises(TypeError, match="sortable labels of one kind: unhashable"):
        zk.group_advantage(r, group_ids=[[0]] * 10)
    nan_r = r.clone()
    nan_r[4] = float("nan")
    with pytest.raises(ValueError, match="rewards contains NaN or inf"):
        zk.group_advantage(nan_r, group_ids=[0, 1] * 5)
    with pytest.raises(ValueError, match=r"not a multiple of group_size \(3\)"):
        zk.group_advantage(r, group_size=3)
    with pytest.raises(ValueError, match="group_size must be positive"):
        zk.group_advantage(r, group_size=0)
    for not_int in (True, 5.0, torch.tensor(5)):
        with pytest.raises(TypeError, match="group_size must be an int"):
            zk.group_advantage(r, group_size=not_int)
    # a numpy integer (np.unique counts, a shape entry) is an int; it was refused
    torch.testing.assert_close(zk.group_advantage(r, group_size=np.int64(5))[0], zk.group_advantage(r, group_size=5)[0])
    with pytest.raises(ValueError, match="must start at 0 and end at M=10"):
        zk.group_advantage(r, group_offsets=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="must be sorted"):
        zk.group_advantage(r, group_offsets=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(TypeError, match="group_offsets must be int32 or int64"):
        zk.group_advantage(r, group_offsets=torch.tensor([0.0, 10.0]))
    bad = r.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="rewards contains NaN or inf"):
        zk.group_advantage(bad, group_size=5)
    with pytest.raises(ValueError, match="mode must be one of"):
        zk.group_advantage(r, group_size=5, mode="zscore")
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[M\]"):
        zk.group_advantage(r.view(2, 5), group_size=5)
    with pytest.raises(TypeError, match="rewards must be float16"):
        zk.group_advantage(torch.arange(10), group_size=5)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        zk.group_advantage(r, group_size=5, eps=-1.0)
    # validate=False skips only the value checks
    adv, _ = zk.group_advantage(bad, group_size=5, validate=False)
    assert torch.isnan(adv[:5]).all() and torch.isfinite(adv[5:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["std", "mean", "rloo"])
def test_group_ids_in_any_order(device, mode):
    """Groups given as one label per sample in any order (verl's index of prompt uids; its balance_batch
    reorders a batch across ranks): the same advantages, in the input order, as the contiguous groups,
    the stats in sorted-label order; integer tensors, numpy arrays and lists of uid strings alike."""
    g = torch.Generator().manual_seed(3)
    sizes = [3, 1, 5, 2, 16, 4]
    offsets = [0] + np.cumsum(sizes).tolist()
    labels = torch.cat([torch.full((n,), 10 * i + 7) for i, n in enumerate(sizes)])  # sorted, not 0..G-1
    r = torch.randn(offsets[-1], generator=g, dtype=torch.float64).float()
    perm = torch.randperm(offsets[-1], generator=g)
    exp_adv, exp_mean, exp_std, exp_zs = _loop_reference(r, offsets, mode, 1e-6)
    uids = [f"uid-{int(v):04d}" for v in labels[perm]]  # zero-padded: string order is label order
    for backend in _backends(device):
        # dense labels (counted by bincount), sparse and negative ones (a sort and unique_consecutive), labels
        # as numpy integers, as uid strings in an object array and in a list
        sparse = labels[perm] * 10**12 - 10**13
        pairs = [(u[:4], int(u[4:])) for u in uids]  # tuples as labels, e.g. (prompt, seed)
        for ids in (labels[perm].to(device), sparse.to(device), labels[perm].numpy(), np.array(uids, dtype=object),
                    uids, pairs):
            adv, st = zk.group_advantage(r[perm].to(device), group_ids=ids, mode=mode, backend=backend)
            assert_close(adv.cpu().double(), exp_adv[perm], atol=1e-5, rtol=1e-5, name=f"{backend} {type(ids)}")
            assert_close(st.mean.cpu().double(), exp_mean, atol=1e-5, rtol=1e-5, name="mean")
            assert_close(st.std.cpu().double(), exp_std, atol=1e-5, rtol=1e-5, name="std")
            assert torch.equal(st.zero_std.cpu(), exp_zs)
    # members keep their input order within a group: a stable sort, so the result does not depend on ties
    same = torch.zeros(offsets[-1], dtype=torch.long, device=device)
    adv, _ = zk.group_advantage(r.to(device), group_ids=same, mode=mode)
    assert_close(adv.cpu().double(), _loop_reference(r, [0, offsets[-1]], mode, 1e-6)[0], atol=1e-5, rtol=1e-5,
                 name="one group")


@pytest.mark.parametrize("device", DEVICES)
def test_group_ids_with_many_labels(device):
    """Dense labels past 16 bits (the torch sort instead of numpy's radix sort on CPU): the same as the
    contiguous groups the labels make."""
    g = torch.Generator().manual_seed(4)
    m = 20000
    labels = torch.randint(0, 80000, (m,), generator=g)
    labels[0] = 79999  # beyond 65535 for certain
    r = torch.randn(m, generator=g)
    srt, order = torch.sort(labels, stable=True)
    counts = torch.unique_consecutive(srt, return_counts=True)[1]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
    want, want_st = zk.group_advantage(r[order].to(device), group_offsets=offsets)
    got, got_st = zk.group_advantage(r.to(device), group_ids=labels.to(device))
    torch.testing.assert_close(got.cpu()[order], want.cpu())
    torch.testing.assert_close(got_st.std.cpu(), want_st.std.cpu())


@pytest.mark.skipif(EXT_STATUS["cpu"] is not None, reason="compiled extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    op = torch.ops.zreward.group_advantage.default
    r = torch.randn(40, device=device)
    torch.library.opcheck(op, (r, None, 8, 0, 1e-6))
    torch.library.opcheck(op, (r, torch.tensor([0, 3, 3, 40], device=device), 0, 2, 1e-6))
    torch.library.opcheck(op, (r.double(), None, 4, 1, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_fullgraph_compile(device):
    torch._dynamo.reset()
    r = torch.randn(64, device=device)
    offs = torch.tensor([0, 5, 5, 40, 64], device=device)

    def f(x, o):
        a, st = zk.group_advantage(x, group_size=8, validate=False)
        b, st2 = zk.group_advantage(x, group_offsets=o, mode="rloo", validate=False)
        return a * 2 + 1, st.std, b, st2.zero_std

    backend = "inductor" if device == "cuda" else "aot_eager"
    got = torch.compile(f, fullgraph=True, backend=backend)(r, offs)
    want = f(r, offs)
    for a, b in zip(got, want):
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, atol=1e-6)


def test_backend_info_and_forced_reference():
    zk.group_advantage(torch.randn(8), group_size=4, backend="reference")
    info = zk.backend_info()
    assert info["last_backend"]["group_advantage"] == "reference"
    assert set(info["compiled_extension"]) == {"cpu", "cuda"}
    if EXT_STATUS["cpu"] is None:
        zk.group_advantage(torch.randn(8), group_size=4)
        assert zk.backend_info()["last_backend"]["group_advantage"] == "compiled"


def test_import_without_extension_falls_back():
    code = (
        "import torch, zreward_kernels as zk\n"
        "a, s = zk.group_advantage(torch.tensor([1., 2., 3., 5.]), group_size=2)\n"
        "info = zk.backend_info()\n"
        "assert info['last_backend']['group_advantage'] == 'reference', info\n"
        "assert info['compiled_extension']['cpu'].startswith('disabled'), info\n"
        "assert abs(float(a[1]) - 0.7071) < 1e-3, a\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ZREWARD_DISABLE_EXTENSIONS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    forced = code.replace("group_size=2)", "group_size=2, backend='compiled')")
    out = subprocess.run([sys.executable, "-c", forced], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "backend='compiled' was requested but cannot run" in out.stderr


@pytest.mark.skipif(EXT_STATUS["cpu"] is not None, reason="compiled extension not built")
def test_deterministic_cpu():
    r = torch.randn(100000)
    a1, s1 = zk.group_advantage(r, group_size=16)
    a2, s2 = zk.group_advantage(r, group_size=16)
    assert torch.equal(a1, a2) and torch.equal(s1.std, s2.std)
