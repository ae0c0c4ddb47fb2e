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


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
