"""Backend choice: Triton on CUDA, the PyTorch reference otherwise.

* ``backend=None`` (or ``"auto"``): the ``ZREWARD_BACKEND`` environment variable if set, else
  Triton for CUDA tensors when Triton imports (and the op supports the input), else the reference.
* ``backend="reference"``: always the reference.
* ``backend="triton"``: Triton, or a ``RuntimeError``/``TypeError`` saying why it cannot run
  (no Triton, CPU tensors without ``TRITON_INTERPRET=1``, float64 input, unsupported size).

:func:`backend_info` reports what is available and which backend each op used last.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from ._common import forward_ad_dual, functorch_wrapped
from ._triton_utils import HAS_TRITON, TRITON_IMPORT_ERROR, TRITON_VERSION, interpreter_enabled
from ._tuning import CONFIGS

BACKENDS = ("auto", "reference", "triton")
_LAST_BACKEND: dict = {}


# os.environ.get encodes the key and decodes the value on every call (~0.7 us on the development CPU,
# more on slower hosts, once per op call); the mapping os.environ keeps in step with every change made
# through it (os.environ[...] = ..., pytest's monkeypatch.setenv, ...) is read directly instead.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("ZREWARD_BACKEND") if _ENV_DATA is not None and hasattr(os.environ, "encodekey") \
    else None


def env_backend() -> Optional[str]:
    """``ZREWARD_BACKEND`` as ``os.environ.get`` reads it, read per call (a change applies at once)."""
    if _ENV_KEY is None:
        return os.environ.get("ZREWARD_BACKEND")
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def requested_backend(backend: Optional[str], allowed=BACKENDS) -> str:
    """The backend asked for by the call, else by ``ZREWARD_BACKEND``, else "auto".

    ``ZREWARD_BACKEND`` names a backend of the Triton ops; for an op whose backends differ (the
    compiled group advantage) a value it does not know means "auto".
    """
    if backend is not None:
        req = backend.lower()
        if req not in allowed:
            raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
        return req
    env = env_backend()
    if not env:
        return "auto"
    env = env.lower()
    if env not in BACKENDS + ("compiled",):
        raise ValueError(f"ZREWARD_BACKEND must be one of {BACKENDS + ('compiled',)}, got {env!r}")
    return env if env in allowed else "auto"


_NO_SWITCH = contextlib.nullcontext()


def launch_device(x: torch.Tensor):
    """A context that makes ``x``'s CUDA device the current one for a Triton call, when it is not.

    Triton launches on the *current* device (and its current stream): a reward model on ``cuda:1``
    called while ``cuda:0`` is current would otherwise run on the wrong GPU with foreign pointers.
    A no-op (no device switch, one comparison) in the usual case, under ``torch.compile`` tracing,
    and for CPU tensors.  The backward needs none: autograd runs it with the tensors' device current.
    """
    if x.is_cuda and not torch.compiler.is_compiling():
        idx = x.device.index
        if idx is not None and idx != torch.cuda.current_device():
            return torch.cuda.device(idx)
    return _NO_SWITCH


def record_backend(op: str, choice: str) -> None:
    if not torch.compiler.is_compiling():
        _LAST_BACKEND[op] = choice


def _triton_unavailable_reason(x: torch.Tensor, extra: Optional[str]) -> Optional[str]:
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    if x.device.type == "cpu":
        if not interpreter_enabled():
            return "the tensors are on the CPU; Triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)"
    elif x.device.type != "cuda":
        return f"Triton kernels need CUDA tensors, got device {x.device}"
    if x.dtype == torch.float64:
        return "float64 inputs are supported by the reference backend only (the kernels compute in float32)"
    if not torch.compiler.is_compiling():  # (Dynamo cannot trace these checks)
        if functorch_wrapped(x):
            return ("torch.func transforms (vmap, grad, jacrev, ...) run the reference backend: the fused kernels' "
                    "autograd.Functions have no functorch rules")
        if forward_ad_dual(x):
            return ("forward-mode AD (torch.autograd.forward_ad dual tensors) runs the reference backend: the fused "
                    "kernels read only the primal values and their autograd.Functions have no jvp rules")
    return extra


def choose_backend(op: str, backend: Optional[str], x: torch.Tensor, unsupported: Optional[str] = None) -> str:
    """Pick the backend for one call of ``op`` on tensor ``x``.

    ``unsupported`` is a reason the Triton kernel cannot take this particular input (for example a
    group size above the kernel's limit), or None.
    """
    req = requested_backend(backend)
    if req == "reference":
        choice = "reference"
    else:
        reason = _triton_unavailable_reason(x, unsupported)
        if req == "triton":
            if reason is not None:
                exc = TypeError if x.dtype == torch.float64 else RuntimeError
                raise exc(f"{op}: backend='triton' was requested but cannot run: {reason}")
            choice = "triton"
        else:
            auto_ok = reason is None and x.device.type == "cuda"
            choice = "triton" if auto_ok else "reference"
    record_backend(op, choice)
    return choice


def backend_info() -> dict:
    """What can run here and which backend each op used on its last call."""
    cuda = torch.cuda.is_available()
    return {
        "torch_version": torch.__version__,
        "triton_available": HAS_TRITON,
        "triton_version": TRITON_VERSION,
        "triton_import_error": TRITON_IMPORT_ERROR,
        "triton_interpret": interpreter_enabled(),
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "env_backend": env_backend(),
        "default_backend_cuda": "triton" if HAS_TRITON else "reference",
        "default_backend_cpu": "reference",
        "compiled_extension": _extension_status(),
        "last_backend": dict(_LAST_BACKEND),
        "kernel_configs": {k: dict(v) for k, v in CONFIGS.items()},
        "kernel_configs_file": os.environ.get("ZREWARD_KERNEL_CONFIGS"),
        "self_resetting_counters": _workspace_state(),
    }


def _workspace_state() -> bool:
    """Whether the fused forwards use self-resetting counters (no fill launch; ``ZREWARD_SELF_RESET``)."""
    from ._workspace import _STATE

    return bool(_STATE["enabled"])


def _extension_status() -> dict:
    from .advantage import EXT_STATUS

    return {k: ("loaded" if v is None else v) for k, v in EXT_STATUS.items()}
