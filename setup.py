"""Build script for the compiled ops in csrc/ (package metadata lives in pyproject.toml).

* ``zreward_kernels._C``      -- the op schema and the C++ CPU implementation (always built).
* ``zreward_kernels._C_cuda`` -- the CUDA implementation, built when a CUDA toolkit is found and
  torch is a CUDA build.

Environment switches:
  ZREWARD_NO_EXT=1        build no extension at all (the package falls back to PyTorch);
  ZREWARD_CUDA=auto|1|0   CUDA extension: auto-detect (default), force (error if impossible), skip;
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default here: "8.0;9.0+PTX" when no GPU is visible).

Build without isolation so the installed torch is used: ``pip install --no-build-isolation -e .``.
"""

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("ZREWARD_NO_EXT", "0") == "1":
        return [], {}
    # torch locates CUDA through CUDA_HOME, else `which nvcc`; a wrapper script on PATH (as on our dev
    # machines) would point it at /usr/local, so prefer the conventional toolkit directory when it exists.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # building metadata only (e.g. an sdist) without torch
        print("zreward: torch not importable at build time; building without compiled extensions")
        return [], {}
    cxx = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    # headers as `depends`, so a changed header rebuilds the extension (MANIFEST.in puts them in the sdist)
    headers = sorted(glob.glob("csrc/*.h"))
    exts = [CppExtension("zreward_kernels._C", ["csrc/group_advantage_cpu.cpp"], depends=headers,
                         extra_compile_args={"cxx": cxx})]
    want = os.environ.get("ZREWARD_CUDA", "auto").lower()
    can = CUDA_HOME is not None and torch.version.cuda is not None
    if want == "1" and not can:
        raise RuntimeError("ZREWARD_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found")
    if want == "1" or (want == "auto" and can):
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        exts.append(
            CUDAExtension(
                "zreward_kernels._C_cuda",
                ["csrc/group_advantage_binding_cuda.cpp", "csrc/group_advantage_cuda.cu"],
                depends=headers,
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            )
        )
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
