"""Launch configurations (zreward_kernels._tuning): every tile size / pairs-per-program setting the
tuning sweep may pick gives the reference's values and gradients."""

import pytest
import torch
from kernel_helpers import assert_close, run_with_grads

from zreward_kernels import BIN_VALUES, gdso_loss, rubric_loss, score_stats
from zreward_kernels._tuning import CONFIGS, override


def _scores(p, gen):
    return (torch.randint(2, 9, (p, 2), generator=gen) * 0.5).float()


def _assert_gdso_close(k_out, k_grad, r_out, r_grad):
    """Kernel outputs and gradient against the reference's (the advantage divides float32 rounding
    by a group's std + eps, so it gets a looser tolerance)."""
    for name, a, b in zip(r_out._fields, k_out, r_out):
        tol = 5e-4 if name == "advantage" else 2e-5
        assert_close(a, b, atol=tol, rtol=tol, name=name)
    assert_close(k_grad, r_grad, atol=1e-6, rtol=1e-5, name="grad")


@pytest.mark.parametrize("warp_stats", [1, 0])
@pytest.mark.parametrize("pairs_per_prog", [2, 4, 16])
@pytest.mark.parametrize("G,P", [(1, 5), (3, 7), (8, 17), (33, 3)])
def test_gdso_several_pairs_per_program(kdev, pairs_per_prog, G, P, warp_stats):
    gen = torch.Generator().manual_seed(7 * G + P)
    x = (torch.randn(P, 2, G, 9, generator=gen) * 2).to(kdev)
    scores = _scores(P, gen).to(kdev)
    kw = dict(lambda_pt=0.7, lambda_pw=1.3, alpha_pt=0.9, alpha_pw=0.4)
    r_out, r_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="reference", **kw), x, outputs=[0])
    with override("gdso_fwd", PAIRS=pairs_per_prog, num_warps=2, WARP_STATS=warp_stats):
        k_out, k_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="triton", **kw), x, outputs=[0])
    _assert_gdso_close(k_out, k_grad, r_out, r_grad)
    assert CONFIGS["gdso_fwd"]["PAIRS"] == 1  # restored


@pytest.mark.parametrize("warp_stats", [1, 0])
@pytest.mark.parametrize("G,P,pairs_per_prog,warps,bins", [
    (1, 5, 16, 0, 9), (3, 7, 4, 0, 9), (8, 17, 2, 0, 9), (8, 17, 8, 4, 9), (8, 9, 4, 1, 5), (33, 3, 1, 0, 9)])
def test_gdso_row_per_thread_layout(kdev, G, P, pairs_per_prog, warps, bins, warp_stats):
    """FLAT=1 (one lane per row, the bins visited in unrolled loops) gives the reference's outputs and
    gradient: several pairs per program, the default warps (one lane per row) and two rows per lane,
    a 5-bin grid with a temperature, and groups of 1 and 33 (the tile layout's cross-warp statistics)."""
    gen = torch.Generator().manual_seed(11 * G + P)
    values = BIN_VALUES if bins == 9 else (1.0, 2.0, 3.0, 4.0, 5.0)
    x = (torch.randn(P, 2, G, bins, generator=gen) * 2).to(kdev)
    scores = (_scores(P, gen) if bins == 9 else torch.randint(1, 6, (P, 2), generator=gen).float()).to(kdev)
    kw = dict(lambda_pt=0.7, lambda_pw=1.3, alpha_pt=0.9, alpha_pw=0.4, bin_values=values,
              temperature=1.0 if bins == 9 else 0.7)
    r_out, r_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="reference", **kw), x, outputs=[0])
    with override("gdso_fwd", PAIRS=pairs_per_prog, num_warps=warps, WARP_STATS=warp_stats, FLAT=1):
        k_out, k_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="triton", **kw), x, outputs=[0])
    _assert_gdso_close(k_out, k_grad, r_out, r_grad)
    assert CONFIGS["gdso_fwd"]["FLAT"] == 0  # restored


@pytest.mark.parametrize("fwd,bwd", [
    (dict(BLOCK_R=16, BLOCK_P=4, num_warps=1), dict(BLOCK_R=32, num_warps=2)),
    (dict(BLOCK_R=256, BLOCK_P=256, num_warps=8), dict(BLOCK_R=256, num_warps=8)),
    (dict(BLOCK_R=32, BLOCK_P=16, num_warps=1, FLAT=1), dict(BLOCK_R=64, num_warps=2, FLAT=1)),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rubric_loss_tile_sizes(kdev, fwd, bwd, reduction):
    gen = torch.Generator().manual_seed(3)
    n, p = 70, 45
    x = (torch.randn(n, 9, generator=gen) * 2).to(kdev)
    target = torch.randint(0, 9, (n,), generator=gen)
    target[::4] = -100
    kw = dict(target=target.to(kdev), teacher_logits=(torch.randn(n, 9, generator=gen) * 2).to(kdev),
              pairs=torch.randint(0, n, (p, 2), generator=gen).to(kdev),
              pair_gaps=(torch.randint(-8, 9, (p,), generator=gen) * 0.5).float().to(kdev), reduction=reduction)
    r_out, r_grad = run_with_grads(lambda t: rubric_loss(t, backend="reference", **kw), x)
    with override("rubric_fwd", **fwd), override("rubric_bwd", **bwd):
        k_out, k_grad = run_with_grads(lambda t: rubric_loss(t, backend="triton", **kw), x)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        assert_close(a, b, atol=2e-5, rtol=2e-5, name=name)
    assert_close(k_grad, r_grad, atol=2e-5, rtol=2e-5, name="grad")


@pytest.mark.parametrize("block_r,flat", [(1, 0), (16, 0), (512, 0), (1, 1), (32, 1), (256, 1)])
def test_score_stats_tile_sizes(kdev, block_r, flat):
    x = (torch.randn(37, 9, generator=torch.Generator().manual_seed(1)) * 3).to(kdev)
    x[5, 3] = float("-inf")
    r_out, r_grad = run_with_grads(lambda t: score_stats(t, backend="reference"), x)
    with override("stats_fwd", BLOCK_R=block_r, FLAT=flat), \
            override("stats_bwd", BLOCK_R=block_r, num_warps=1, FLAT=flat):
        k_out, k_grad = run_with_grads(lambda t: score_stats(t, backend="triton"), x)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        assert_close(a, b, name=name)
    assert_close(k_grad, r_grad, name="grad")


CE_TERMS = [None, "target", "target_probs"]
KL_TERMS = [None, "teacher_logits", "teacher_probs"]


@pytest.mark.parametrize("ce", CE_TERMS)
@pytest.mark.parametrize("kl", KL_TERMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rubric_loss_row_per_thread_layout_every_term(kdev, ce, kl, reduction):
    """FLAT=1 (one row per lane, unrolled bins) against the reference: every CE and KL form, pairs,
    ignored rows, a -inf logit, zeros in the soft targets and teacher, temperature, 3-D logits."""
    gen = torch.Generator().manual_seed(11)
    n, d, p = 23, 3, 17
    x = torch.randn(n, d, 9, generator=gen) * 3
    x[2, 1, 4] = float("-inf")
    t = torch.randint(0, 9, (n, d), generator=gen)
    t[::3, 0] = -100
    tp = torch.softmax(torch.randn(n, d, 9, generator=gen), -1)
    tp[..., 0] = 0
    tp = tp / tp.sum(-1, keepdim=True)
    tl_ = torch.randn(n, d, 9, generator=gen) * 2
    tq = torch.softmax(tl_, -1)
    tq[..., 4] = 0  # no teacher mass where the student has a -inf logit
    tq = tq / tq.sum(-1, keepdim=True)
    kw = dict(pairs=torch.randint(0, n * d, (p, 2), generator=gen), pair_gaps=torch.randn(p, generator=gen),
              reduction=reduction, temperature=1.3)
    if ce:
        kw[ce] = t if ce == "target" else tp
    if kl:
        kw[kl] = tl_ if kl == "teacher_logits" else tq
    kw = {k: (v.to(kdev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    x = x.to(kdev)
    r_out, r_grad = run_with_grads(lambda z: rubric_loss(z, backend="reference", **kw), x)
    with override("rubric_fwd", FLAT=1, BLOCK_R=32, num_warps=1), override("rubric_bwd", FLAT=1, BLOCK_R=64):
        k_out, k_grad = run_with_grads(lambda z: rubric_loss(z, backend="triton", **kw), x)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        assert_close(a, b, atol=2e-5, rtol=2e-5, name=name)
    assert_close(k_grad, r_grad, atol=2e-5, rtol=2e-5, name="grad")


def test_row_per_thread_layout_low_precision_and_large_grids(kdev):
    """bf16 logits under FLAT=1; a grid above FLAT_MAX_BINS falls back to the tile layout."""
    from zreward_kernels.rubric import FLAT_MAX_BINS

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(40, 9, generator=gen) * 2).to(kdev)
    t = torch.randint(0, 9, (40,), generator=gen).to(kdev)
    r_out, r_grad = run_with_grads(lambda z: rubric_loss(z, backend="reference", target=t), x)
    with override("rubric_fwd", FLAT=1), override("rubric_bwd", FLAT=1):
        k_out, k_grad = run_with_grads(lambda z: rubric_loss(z, backend="triton", target=t), x.bfloat16())
    assert k_grad.dtype == torch.bfloat16
    assert_close(k_out.loss, r_out.loss, atol=3e-2, rtol=3e-2, name="loss")
    assert_close(k_grad, r_grad, atol=3e-2, rtol=3e-2, name="grad")
    bins = tuple(float(i) for i in range(FLAT_MAX_BINS + 8))
    xb = (torch.randn(10, len(bins), generator=gen)).to(kdev)
    r_out, r_grad = run_with_grads(lambda z: score_stats(z, bin_values=bins, backend="reference"), xb)
    with override("stats_fwd", FLAT=1), override("stats_bwd", FLAT=1):
        k_out, k_grad = run_with_grads(lambda z: score_stats(z, bin_values=bins, backend="triton"), xb)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        assert_close(a, b, atol=1e-4, rtol=1e-4, name=name)
    assert_close(k_grad, r_grad, atol=1e-4, rtol=1e-4, name="grad")


@pytest.mark.parametrize("kernel,settings,exc,match", [
    ("rubric", dict(BLOCK_R=64), KeyError, "unknown kernel 'rubric'"),
    ("rubric_fwd", dict(PAIRS=2), KeyError, "has no setting 'PAIRS'"),
    ("rubric_fwd", dict(BLOCK_R=96), ValueError, r"rubric_fwd.BLOCK_R must be a power of two >= 1, got 96"),
    ("stats_fwd", dict(num_warps=3), ValueError, "stats_fwd.num_warps must be one of"),
    ("rubric_bwd", dict(FLAT=2), ValueError, r"rubric_bwd.FLAT must be 0 \(tile layout\) or 1"),
    ("gdso_fwd", dict(PAIRS=2.0), TypeError, "gdso_fwd.PAIRS must be an int"),
    ("gdso_fwd", dict(WARP_STATS=2), ValueError, r"gdso_fwd.WARP_STATS must be 0 \(cross-warp sums\) or 1"),
    ("gdso_fwd", dict(FLAT=2), ValueError, r"gdso_fwd.FLAT must be 0 \(tile layout\) or 1 \(row per thread\)"),
    ("restricted_fwd", dict(KERNEL=2), ValueError, r"restricted_fwd.KERNEL must be 0 \(matrix product\) or 1"),
    ("restricted_fwd", dict(BLOCK_N=8), ValueError, "restricted_fwd.BLOCK_N must be at least 16"),
    ("restricted_fwd", dict(BLOCK_H=96), ValueError, "restricted_fwd.BLOCK_H must be a power of two"),
    ("restricted_bwd", dict(BLOCK_N=8), ValueError, "restricted_bwd.BLOCK_N must be at least 16"),
    ("restricted_bwd", dict(KERNEL=1), KeyError, "kernel 'restricted_bwd' has no setting 'KERNEL'"),
])
def test_override_rejects_bad_settings(kernel, settings, exc, match):
    before = {k: dict(v) for k, v in CONFIGS.items()}
    with pytest.raises(exc, match=match):
        with override(kernel, **settings):
            pass
    assert CONFIGS == before


def test_override_restores_after_an_error():
    before = dict(CONFIGS["rubric_fwd"])
    with pytest.raises(RuntimeError):
        with override("rubric_fwd", BLOCK_R=64):
            assert CONFIGS["rubric_fwd"]["BLOCK_R"] == 64
            raise RuntimeError
    assert CONFIGS["rubric_fwd"] == before  # restored after an error too


@pytest.fixture
def restore_configs():
    saved = {k: dict(v) for k, v in CONFIGS.items()}
    yield
    for k, v in saved.items():
        CONFIGS[k].clear()
        CONFIGS[k].update(v)


def test_load_configs_applies_a_tuned_file(tmp_path, restore_configs, kdev):
    import json

    from zreward_kernels._tuning import load_configs

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "configs": {
        "rubric_fwd": {"BLOCK_R": 64, "BLOCK_P": 32, "num_warps": 2}, "gdso_fwd": {"PAIRS": 4}}}))
    before = {k: dict(v) for k, v in CONFIGS.items()}
    with pytest.raises(ValueError, match="tuned on 'NVIDIA H200', not on 'NVIDIA H100'"):
        load_configs(str(path), strict_device="NVIDIA H100")
    assert CONFIGS == before  # nothing applied
    load_configs(str(path))
    # the file's settings replace those it names; the others (FLAT, num_warps) keep their values
    assert CONFIGS["rubric_fwd"] == {"BLOCK_R": 64, "BLOCK_P": 32, "num_warps": 2, "FLAT": before["rubric_fwd"]["FLAT"]}
    assert CONFIGS["gdso_fwd"] == {**before["gdso_fwd"], "PAIRS": 4}
    assert {k: v for k, v in CONFIGS.items() if k not in ("rubric_fwd", "gdso_fwd")} == {
        k: v for k, v in before.items() if k not in ("rubric_fwd", "gdso_fwd")}
    # the tuned launch still computes the reference's values
    x = torch.randn(3, 2, 8, 9, generator=torch.Generator().manual_seed(0)).to(kdev)
    scores = torch.full((3, 2), 3.0, device=kdev)
    a = gdso_loss(x, scores, backend="triton")
    b = gdso_loss(x, scores, backend="reference")
    assert_close(a.loss, b.loss, name="loss")


@pytest.mark.parametrize("content,match", [
    ('{"configs": {"rubric_fwd": {"BLOCK_R": 96}}}', "rubric_fwd.BLOCK_R must be a power of two"),
    ('{"configs": {"softmax": {"BLOCK_R": 64}}}', "unknown kernel 'softmax'"),
    ('{"configs": {"gdso_fwd": {"BLOCK_R": 64}}}', "has no setting 'BLOCK_R'"),
    ('{"rubric_fwd": {"BLOCK_R": 64}}', "expected an object with a 'configs' object"),
    ('{"configs": {"rubric_fwd": 64}}', "settings of 'rubric_fwd' must be an object"),
    ("{not json", "not valid JSON"),
])
def test_load_configs_rejects_bad_files_before_changing_anything(tmp_path, restore_configs, content, match):
    from zreward_kernels._tuning import load_configs

    path = tmp_path / "bad.json"
    path.write_text('{"configs": {"stats_fwd": {"BLOCK_R": 64}, ' + content[len('{"configs": {'):]
                    if content.startswith('{"configs": {') else content)
    before = {k: dict(v) for k, v in CONFIGS.items()}
    with pytest.raises((KeyError, ValueError), match=match):
        load_configs(str(path))
    assert CONFIGS == before


def test_environment_variable_applies_a_file_at_import(tmp_path):
    import json
    import os
    import subprocess
    import sys

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"configs": {"stats_bwd": {"BLOCK_R": 256, "num_warps": 8}}}))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, ZREWARD_KERNEL_CONFIGS=str(path), PYTHONPATH=root)
    code = ("from zreward_kernels._tuning import CONFIGS, DEFAULT_CONFIGS as D; "
            "print(CONFIGS['stats_bwd'], CONFIGS['stats_fwd'] == D['stats_fwd'], D['stats_bwd'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    from zreward_kernels._tuning import DEFAULT_CONFIGS

    # the file's two settings applied, FLAT kept, the other kernels and the defaults' copy untouched
    flat = DEFAULT_CONFIGS["stats_bwd"]["FLAT"]
    assert r.stdout.strip() == (f"{{'BLOCK_R': 256, 'num_warps': 8, 'FLAT': {flat}}} True "
                                f"{DEFAULT_CONFIGS['stats_bwd']}")
    assert DEFAULT_CONFIGS["stats_bwd"] != {"BLOCK_R": 256, "num_warps": 8, "FLAT": flat}  # the file changes something


def test_group_advantage_settings_reach_the_cuda_extension():
    """The CUDA kernel's launch settings live in the same table; changing them reaches the extension
    (when built: the setter works without a GPU) and is restored with the table."""
    import sys

    import zreward_kernels  # noqa: F401  (loads the extensions)

    ext = sys.modules.get("zreward_kernels._C_cuda")
    if ext is None:
        pytest.skip("the CUDA extension is not built here")
    cfg = CONFIGS["group_advantage"]
    start = (cfg["ELEMS_PER_LANE"], cfg["KERNEL"])
    assert ext.config() == start
    with override("group_advantage", ELEMS_PER_LANE=1, KERNEL=1):
        assert ext.config() == (1, 1)
        with override("group_advantage", ELEMS_PER_LANE=4):
            assert ext.config() == (4, 1)
            with override("group_advantage", KERNEL=2):
                assert ext.config() == (4, 2)
            assert ext.config() == (4, 1)
        assert ext.config() == (1, 1)
    assert ext.config() == start
    for bad in ((3, 1), (64, 1), (1, 0), (1, 3)):
        with pytest.raises(ValueError, match=f"got elems_per_lane={bad[0]}, kernel={bad[1]}"):
            ext.set_config(*bad)
    with pytest.raises(ValueError, match="group_advantage.ELEMS_PER_LANE must be a power of two >= 1, got 3"):
        with override("group_advantage", ELEMS_PER_LANE=3):
            pass
    with pytest.raises(ValueError, match="ELEMS_PER_LANE must be a power of two in 1..32, got 64"):
        with override("group_advantage", ELEMS_PER_LANE=64):
            pass
    with pytest.raises(ValueError, match="group_advantage.KERNEL must be 1 or 2, got 3"):
        with override("group_advantage", KERNEL=3):
            pass
    assert ext.config() == start


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", [1, 2])
@pytest.mark.parametrize("elems", [1, 2, 4, 8, 16, 32])
def test_group_advantage_cuda_every_setting_matches_the_reference(elems, kernel):
    from zreward_kernels import group_advantage

    gen = torch.Generator().manual_seed(elems)
    r = torch.randn(4096, generator=gen, dtype=torch.float64).cuda()
    sizes = torch.randint(0, 40, (200,), generator=gen)
    off = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    rv = torch.randn(int(off[-1]), generator=gen).cuda()
    for mode in ("std", "mean", "rloo"):
        for g in (2, 16, 64):
            want = group_advantage(r, group_size=g, mode=mode, backend="reference")
            with override("group_advantage", ELEMS_PER_LANE=elems, KERNEL=kernel):
                got = group_advantage(r, group_size=g, mode=mode, backend="compiled")
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1].std, want[1].std)
        want = group_advantage(rv, group_offsets=off.cuda(), mode=mode, backend="reference")
        with override("group_advantage", ELEMS_PER_LANE=elems, KERNEL=kernel):
            got = group_advantage(rv, group_offsets=off.cuda(), mode=mode, backend="compiled")
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[1].zero_std, want[1].zero_std)


@pytest.fixture
def tune_kernels():
    """bench/tune_kernels.py as a module, with bench/ on sys.path for the test (spawned workers
    import it from the parent's path)."""
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
    sys.path.insert(0, bench)
    try:
        import tune_kernels as tk

        yield tk
    finally:
        sys.path.remove(bench)


def test_sweep_bookkeeping_picks_the_best_config_and_writes_a_loadable_file(tmp_path, restore_configs, tune_kernels):
    """bench/tune_kernels.py's choice and files, on synthetic timings (the sweep itself needs a GPU):
    the best config is the one with the best geometric-mean speed-up over the default across sizes,
    a config not measured at every size (or a failed one) is not chosen, and the file it writes is
    one load_configs applies."""
    import argparse
    import json

    tk = tune_kernels
    from zreward_kernels._tuning import SWEEP, load_configs

    assert sorted(tk.ORDER) == sorted(SWEEP)  # every kernel has a place in the sweep order
    d = {"ELEMS_PER_LANE": 1, "KERNEL": 1}

    def rec(cfg, rows, ms=None, error=None):
        r = dict(kernel="group_advantage", op="group_advantage", rows=rows, config={**d, **cfg}, default=cfg == {})
        r.update({"ms": ms} if ms is not None else {"error": error})
        return r

    results = [rec({}, 1, 0.020), rec({}, 2, 0.080),
               rec({"KERNEL": 2}, 1, 0.010), rec({"KERNEL": 2}, 2, 0.060),  # 2x and 1.33x: 1.63x
               rec({"ELEMS_PER_LANE": 4}, 1, 0.005),  # 4x, but not measured at size 2
               rec({"ELEMS_PER_LANE": 2}, 1, 0.019), rec({"ELEMS_PER_LANE": 2}, 2, error="RuntimeError: boom")]
    best = tk.best_configs(results)
    cfg, score = best["group_advantage"]
    assert cfg == {"ELEMS_PER_LANE": 1, "KERNEL": 2} and score == pytest.approx((2.0 * 80 / 60) ** 0.5)
    args = argparse.Namespace(json=str(tmp_path / "tune.json"), write_config=str(tmp_path / "best.json"))
    tk._write(args, results, final=False, device="NVIDIA Test")
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert saved["device"] == "NVIDIA Test" and len(saved["results"]) == len(results)
    assert "KERNEL=2" in tk.report(results) and "failed: RuntimeError: boom" in tk.report(results)
    load_configs(str(tmp_path / "best.json"), strict_device="NVIDIA Test")
    assert CONFIGS["group_advantage"] == {"ELEMS_PER_LANE": 1, "KERNEL": 2}


def test_sweep_precompiles_candidates_in_worker_processes(tune_kernels):
    """bench/tune_kernels.py --jobs: each candidate runs once in a spawned worker (on a GPU that
    compiles it into Triton's on-disk cache before the timing); a candidate that raises is counted
    and reported, and a timeout stops the workers and leaves the rest to the timing.  Here the
    workers run the kernels in the CPU interpreter on small inputs."""
    tk = tune_kernels
    items = [("stats_fwd", {"BLOCK_R": 16}, (8,)), ("gdso_fwd", {"PAIRS": 2}, (48,)),
             ("stats_bwd", {"NO_SUCH_SETTING": 1}, (8,))]
    counts = tk.precompile(items, jobs=2, timeout=240)
    assert (counts["done"], counts["failed"], counts["left"]) == (2, 1, 0), counts
    assert counts["seconds"] > 0
    cut = tk.precompile(items, jobs=1, timeout=0.01)
    assert (cut["done"], cut["failed"], cut["left"]) == (0, 0, 3), cut
    # every gdso candidate once (the default first), nothing for the compiled group advantage
    every = tk.compile_items(["group_advantage", "gdso_fwd"], quick=True)
    assert [c for _, c, _ in every] == tk._candidates("gdso_fwd")
    assert {k for k, _, _ in every} == {"gdso_fwd"} and every[0][1] == CONFIGS["gdso_fwd"]


def test_sweep_flags_the_default_once_per_size_and_picks_the_fastest(monkeypatch, tune_kernels, restore_configs):
    """tune_kernels.sweep with the timing replaced by a function of the configuration in force (the
    real timing needs a GPU): every candidate is timed at every size under its own configuration,
    the default is flagged exactly once per size, and best_configs picks the fastest candidate."""
    tk = tune_kernels
    fast = dict(CONFIGS["gdso_fwd"], PAIRS=4, num_warps=8)
    monkeypatch.setattr(tk, "graph_ms", lambda op, rows, reps: 0.5 if CONFIGS["gdso_fwd"] == fast else 1.0)
    results = tk.sweep("gdso_fwd", reps=1, quick=False)
    cands = tk._candidates("gdso_fwd")
    assert len(results) == len(cands) * len(tk.GDSO_ROWS)
    for rows in tk.GDSO_ROWS:
        flagged = [r for r in results if r["rows"] == rows and r["default"]]
        assert len(flagged) == 1 and flagged[0]["config"] == CONFIGS["gdso_fwd"] and flagged[0]["ms"] == 1.0
    assert tk.best_configs(results) == {"gdso_fwd": (fast, 2.0)}


@pytest.mark.parametrize("argv,match", [(["--jobs", "-2"], "--jobs must be >= 0"),
                                        (["no_such_kernel"], "unknown kernels")])
def test_sweep_rejects_bad_arguments_before_needing_a_gpu(monkeypatch, capsys, tune_kernels, argv, match):
    import sys

    monkeypatch.setattr(sys, "argv", ["tune_kernels.py", *argv])
    with pytest.raises(SystemExit) as exc:
        tune_kernels.main()
    assert exc.value.code == 2 and match in capsys.readouterr().err
