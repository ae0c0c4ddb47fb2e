"""The compiled extension is part of the build wherever its toolchain exists (so a CUDA build
error cannot land silently: `make test` compiles csrc/ for sm_80 and sm_90 when nvcc is present)."""

import os
import shutil

import pytest
import torch

from zreward_kernels.advantage import EXT_STATUS


@pytest.mark.skipif(os.environ.get("ZREWARD_NO_EXT") == "1", reason="extensions disabled for this build")
def test_cpu_extension_built():
    assert EXT_STATUS["cpu"] is None, EXT_STATUS["cpu"]


@pytest.mark.skipif(
    os.environ.get("ZREWARD_NO_EXT") == "1" or os.environ.get("ZREWARD_CUDA") == "0"
    or torch.version.cuda is None or not (shutil.which("nvcc") or os.path.isdir("/usr/local/cuda/include")),
    reason="no CUDA toolkit or CUDA build disabled",
)
def test_cuda_extension_built_where_toolkit_exists():
    assert EXT_STATUS["cuda"] is None, EXT_STATUS["cuda"]


def test_top_level_names_without_heavy_imports():
    """`import zreward` gives the user-facing classes and stays light: transformers and accelerate
    load when a model or a trainer is first used, not at import."""
    import subprocess
    import sys

    code = (
        "import sys, zreward, zreward.scorer, zreward.model, zreward.train.rl as rl\n"
        "assert zreward.RewardScorer is zreward.scorer.RewardScorer\n"
        "assert zreward.ZRewardModel is zreward.model.ZRewardModel\n"
        "assert zreward.train.__name__ == 'zreward.train' and rl.__name__ == 'zreward.train.rl'\n"
        "missing = [n for n in zreward.__all__ if not hasattr(zreward, n)]\n"
        "assert not missing, missing\n"
        "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
