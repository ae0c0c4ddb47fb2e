"""Every Triton kernel launch of the fused ops compiles for sm_90 and sm_80 (no GPU needed).

The interpreter the other kernel tests run in does not type-check the kernels the way the
compiler does; this compiles the launches the ops really make (default configurations, and a
sample of the tuning candidates for sm_90), each as Triton's JIT specialises it on a GPU and with
plain argument types, through ``python -m zreward_kernels.aot_check``; and that torch.compile's
analysis of which arguments each launch writes finds its outputs only (``--written``).
"""

import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(*args):
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "zreward_kernels.aot_check", *args], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_launches_compile_for_sm90_with_tuning_sample():
    out = _check("--arch", "90", "--sweep", "sample", "--verbose")
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert out.strip().endswith(f"compiled {len(lines)} kernel launches for sm_90")
    for kernel in ("stats_fwd", "stats_bwd", "rubric_fwd", "rubric_bwd", "gdso_fwd"):
        assert any(f"] {kernel} " in ln for ln in lines), kernel
    # the code shapes the interpreter cannot vouch for: row and pair tiles of different sizes, several pairs per program
    assert any("rubric_fwd" in ln and "BLOCK_R=512 BLOCK_P=256" in ln for ln in lines)
    assert any("gdso_fwd" in ln and "PAIRS=16" in ln for ln in lines)
    assert any("gdso_fwd" in ln and "BLOCK_S=128" in ln for ln in lines)  # G = 64
    # launches as the JIT specialises them on a GPU: an int argument equal to 1 (G = 1) becomes a constexpr
    assert any("gdso_fwd" in ln and " G=1 " in ln and "(as specialised by the JIT)" in ln for ln in lines)
    for kernel in ("stats_fwd", "stats_bwd", "rubric_fwd", "rubric_bwd"):  # the row-per-thread layout
        assert any(f"] {kernel} " in ln and "FLAT=True KC=9" in ln for ln in lines), kernel
    assert len(lines) >= 30
    # --verbose: registers from ptxas, instructions and barriers from nvdisasm (both bundled with Triton)
    assert all(re.search(r": \d+ regs, \d+ B spilled, (\d+ SASS instructions, \d+ BAR|SASS n/a)$", ln) for ln in lines)
    assert any(re.search(r"\] gdso_fwd .*, \d+ SASS instructions, \d+ BAR$", ln) for ln in lines)


def test_default_launches_compile_for_sm80():
    out = _check("--arch", "80")
    assert "for sm_80" in out


def test_recorder_sees_the_configured_launch():
    """In process: the recorder captures the launch the op makes under a tuning override, once as
    Triton's JIT specialises it (divisibility hints) and once with plain argument types."""
    code = (
        "from zreward_kernels import aot_check, _tuning\n"
        "with _tuning.override('gdso_fwd', PAIRS=4, num_warps=2):\n"
        "    with aot_check.intercepted_launches(record=True) as log:\n"
        "        aot_check._workloads()['gdso'][0][1]()\n"
        "jit, plain = log\n"
        "assert plain.name == 'gdso_fwd' and plain.consts['PAIRS'] == 4 and plain.warps == 2, plain\n"
        "assert plain.sig['X'] == '*fp32' and plain.sig['COUNTER'] == '*i32' and plain.sig['G'] == 'i32', plain.sig\n"
        "assert not plain.attrs and jit.attrs, (plain.attrs, jit.attrs)  # divisibility hints: the JIT's record only\n"
        "assert jit.consts['PAIRS'] == 4 and jit.warps == 2 and jit.sig['X'] == '*fp32', jit\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_torch_compile_sees_each_launch_write_only_its_outputs():
    """torch.compile decides from a user kernel's TTIR which arguments it writes and copies each
    such argument before the launch in a compiled graph.  Its analysis takes every argument of a
    @triton.jit helper call as a source of what the call returns, so a kernel that stored at row
    indices returned by the helper that also loaded its logits was believed to write its logits,
    bins, targets and weights (the old kernels: 18 of the 30 default launches, among them every
    score_stats launch and most rubric_loss forward ones).  Checked for every launch of the default configurations and of all sweep candidates,
    with PyTorch's own analysis."""
    out = _check("--written", "--sweep", "all", "--verbose")
    lines = [ln for ln in out.splitlines() if ": writes " in ln]
    assert out.strip().endswith(f"{len(lines)} kernel launches write only their outputs, as torch.compile sees them")
    assert len(lines) >= 60
    for kernel in ("_stats_fwd_kernel", "_stats_bwd_kernel", "_rubric_fwd_kernel", "_rubric_bwd_kernel",
                   "_gdso_fwd_kernel", "_restricted_fwd_kernel", "_restricted_bwd_kernel",
                   "_restricted_stats_fwd_kernel", "_restricted_stats_bwd_kernel"):
        assert any(ln.startswith(kernel + " ") for ln in lines), kernel
    # both layouts of the row kernels (the tile one only in the sweep)
    for kernel in ("_stats_fwd_kernel", "_stats_bwd_kernel", "_rubric_fwd_kernel", "_rubric_bwd_kernel"):
        for flat in ("True", "False"):
            assert any(ln.startswith(kernel + " ") and f"FLAT={flat}" in ln for ln in lines), (kernel, flat)
    assert any(ln.startswith("_stats_fwd_kernel ") and ln.endswith("writes MEAN, PROBS, STD") for ln in lines)
    assert any(ln.startswith("_restricted_stats_bwd_kernel ") and ln.endswith("writes DX") for ln in lines)


def test_written_check_finds_an_input_believed_written():
    """The check fails where a launch is believed to write an input: with stats_fwd's outputs
    declared as PROBS and MEAN only, its STD store is reported."""
    code = (
        "from zreward_kernels import aot_check\n"
        "aot_check.WRITES['_stats_fwd_kernel'] = {'PROBS', 'MEAN'}\n"
        "try:\n"
        "    aot_check.check_written()\n"
        "except RuntimeError as exc:\n"
        "    assert \"_stats_fwd_kernel\" in str(exc) and \"not outputs: ['STD']\" in str(exc), exc\n"
        "    print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-3000:] + r.stderr[-3000:]
