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
