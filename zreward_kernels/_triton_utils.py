"""Import Triton when it is there; report why when it is not."""

from __future__ import annotations

import os

try:  # Triton ships with Linux CUDA builds of torch; elsewhere it may be missing.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_VERSION = triton.__version__
    TRITON_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_VERSION = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _squeeze_interpreter_scalar_index() -> bool:
    """Make Triton 3.6's CPU interpreter work with numpy >= 2.4.

    That interpreter turns a runtime scalar argument into a Python int (as the bound of
    ``for start in range(0, nprog, BLOCK)``, which the fused forwards use for their final reduction)
    with ``int()`` of a one-element 1-D numpy array, which numpy 2.4 rejects ("only 0-dimensional
    arrays can be converted to Python scalars"): every interpreted fused forward failed with torch
    2.11's Triton and a current numpy.  Triton 3.8 squeezes the array first.  Where the installed
    interpreter has the unsqueezed conversion, wrap its tensor patching so it squeezes too.  Returns
    whether the fix was applied; does nothing for compiled (GPU) kernels."""
    import inspect

    from triton.runtime import interpreter as ti

    patch = getattr(ti, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_zreward_squeezed", False):
        return False
    try:
        buggy = "int(self.handle.data))" in inspect.getsource(patch)
    except (OSError, TypeError):
        return False
    if not buggy:
        return False

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._zreward_squeezed = True
    ti._patch_lang_tensor = patched
    return True


INTERPRETER_INDEX_FIX = bool(HAS_TRITON and interpreter_enabled() and _squeeze_interpreter_scalar_index())


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
