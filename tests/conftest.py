"""Test set-up: Triton kernels run on CUDA when present, else in the CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton compiles (decorates) the kernels, so it is set
here, before zreward_kernels is imported by any test module.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import zreward_kernels  # noqa: E402,F401


@pytest.fixture
def kdev() -> torch.device:
    """The device on which the Triton backend runs in this session."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
