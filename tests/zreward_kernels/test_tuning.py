"""Launch configurations (zreward_kernels._tuning): every tile size / pairs-per-program setting the
tuning sweep may pick gives the reference's values and gradients."""

import pytest
import torch
from kernel_helpers import assert_close, run_with_grads

from zreward_kernels import gdso_loss, rubric_loss, score_stats
from zreward_kernels._tuning import CONFIGS, override


def _scores(p, gen):
    return (torch.randint(2, 9, (p, 2), generator=gen) * 0.5).float()


@pytest.mark.parametrize("pairs_per_prog", [2, 4, 16])
@pytest.mark.parametrize("G,P", [(1, 5), (3, 7), (8, 17), (33, 3)])
def test_gdso_several_pairs_per_program(kdev, pairs_per_prog, G, P):
    gen = torch.Generator().manual_seed(7 * G + P)
    x = (torch.randn(P, 2, G, 9, generator=gen) * 2).to(kdev)
    scores = _scores(P, gen).to(kdev)
    kw = dict(lambda_pt=0.7, lambda_pw=1.3, alpha_pt=0.9, alpha_pw=0.4)
    r_out, r_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="reference", **kw), x, outputs=[0])
    with override("gdso_fwd", PAIRS=pairs_per_prog, num_warps=2):
        k_out, k_grad = run_with_grads(lambda t: gdso_loss(t, scores, backend="triton", **kw), x, outputs=[0])
    for name, a, b in zip(r_out._fields, k_out, r_out):
        tol = 5e-4 if name == "advantage" else 2e-5
        assert_close(a, b, atol=tol, rtol=tol, name=name)
    assert_close(k_grad, r_grad, atol=1e-6, rtol=1e-5, name="grad")
    assert CONFIGS["gdso_fwd"]["PAIRS"] == 1  # restored


@pytest.mark.parametrize("fwd,bwd", [
    (dict(BLOCK_R=16, BLOCK_P=4, num_warps=1), dict(BLOCK_R=32, num_warps=2)),
    (dict(BLOCK_R=256, BLOCK_P=256, num_warps=8), dict(BLOCK_R=256, num_warps=8)),
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


@pytest.mark.parametrize("block_r", [1, 16, 512])
def test_score_stats_tile_sizes(kdev, block_r):
    x = (torch.randn(37, 9, generator=torch.Generator().manual_seed(1)) * 3).to(kdev)
    r_out, r_grad = run_with_grads(lambda t: score_stats(t, backend="reference"), x)
    with override("stats_fwd", BLOCK_R=block_r), override("stats_bwd", BLOCK_R=block_r, num_warps=1):
        k_out, k_grad = run_with_grads(lambda t: score_stats(t, backend="triton"), x)
    for name, a, b in zip(r_out._fields, k_out, r_out):
        assert_close(a, b, name=name)
    assert_close(k_grad, r_grad, name="grad")


def test_override_rejects_bad_settings():
    with pytest.raises(KeyError, match="unknown kernel 'rubric'"):
        with override("rubric", BLOCK_R=64):
            pass
    with pytest.raises(KeyError, match="has no setting 'PAIRS'"):
        with override("rubric_fwd", PAIRS=2):
            pass
    with pytest.raises(ValueError, match=r"rubric_fwd.BLOCK_R must be a power of two >= 1, got 96"):
        with override("rubric_fwd", BLOCK_R=96):
            pass
    with pytest.raises(ValueError, match="stats_fwd.num_warps must be one of"):
        with override("stats_fwd", num_warps=3):
            pass
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
    with pytest.raises(ValueError, match="tuned on 'NVIDIA H200', not on 'NVIDIA H100'"):
        load_configs(str(path), strict_device="NVIDIA H100")
    assert CONFIGS["rubric_fwd"]["BLOCK_R"] == 128  # nothing applied
    load_configs(str(path))
    assert CONFIGS["rubric_fwd"] == {"BLOCK_R": 64, "BLOCK_P": 32, "num_warps": 2}
    assert CONFIGS["gdso_fwd"] == {"PAIRS": 4, "num_warps": 0}
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
    code = "from zreward_kernels._tuning import CONFIGS; print(CONFIGS['stats_bwd'], CONFIGS['stats_fwd'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "{'BLOCK_R': 256, 'num_warps': 8} {'BLOCK_R': 128, 'num_warps': 4}"
