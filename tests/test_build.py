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


def test_sdist_holds_every_file_the_extension_includes(tmp_path):
    """`pip install zreward-*.tar.gz` compiles csrc/: the sdist must carry the headers the sources
    include (setuptools packs only the compiled sources; building from an sdist failed with
    'group_advantage_common.h: No such file or directory' before MANIFEST.in and `depends=`)."""
    import re
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy, so the check writes no egg-info into the checkout
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info", "build")
    for name in ("zreward", "zreward_kernels", "csrc"):
        shutil.copytree(root / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(root / name, src / name)
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (tarball,) = (tmp_path / "dist").glob("zreward-*.tar.gz")
    with tarfile.open(tarball) as tar:
        packed = {Path(n).name: tar.extractfile(n).read().decode() for n in tar.getnames()
                  if Path(n).parent.name == "csrc" and tar.getmember(n).isfile()}
    wanted = {p.name for p in (root / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert wanted <= set(packed), sorted(wanted - set(packed))
    for name, text in packed.items():
        for inc in re.findall(r'#include\s+"([^"]+)"', text):
            assert inc in packed, f"{name} includes {inc}, which the sdist lacks"


def test_one_version_everywhere(capsys):
    """The installed metadata, both packages and `zreward --version` name one version."""
    import importlib.metadata

    import zreward
    import zreward_kernels
    from zreward.cli import main

    assert importlib.metadata.version("zreward") == zreward.__version__ == zreward_kernels.__version__
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith(f"zreward {zreward.__version__} (torch ")
