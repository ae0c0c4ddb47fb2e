"""Constants, the bin-grid helper and input validation shared by every op.

Validation is split in two kinds:

* *static* checks (types, shapes, dtypes, devices, option values) cost nothing on
  the device and always run;
* *data* checks (NaN logits, target ranges, scores on the grid, pair indices in
  range, distributions that sum to one) read tensor values and therefore need a
  host synchronisation.  They run when ``validate=True`` (the default) and are
  skipped when ``validate=False``, while ``torch.compile`` traces the call, or
  while a CUDA graph is being captured -- a host sync would break all three.  Under
  ``torch.func.vmap`` they run on the flags of every vmapped sample.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

#: The nine half-point score bins of the Z-Reward rubric (SPEC section 1).
BIN_VALUES: Tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)

#: Largest number of bins a Triton kernel handles (bins are padded to a power of two).
MAX_BINS = 256
#: Largest gdso_loss group size G the Triton kernel handles (one program holds 2G rows, padded to a
#: power of two); larger groups run the reference.
MAX_GROUP = 64

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_BINS_CACHE: dict = {}


def _is_tracing() -> bool:
    """True while torch.compile traces or a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return True
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:  # pragma: no cover - defensive on odd builds
        return False


def data_checks_enabled(validate: bool) -> bool:
    """Whether value-reading (host-syncing) checks should run for this call."""
    return bool(validate) and not _is_tracing()


_NORM_CACHE: dict = {}


def normalize_bins(bin_values) -> Tuple[float, ...]:
    """Return ``bin_values`` as a tuple of floats, checked to be a strictly increasing grid.

    Tuples are cached, except while torch.compile traces: a traced read of the cache guards on its
    contents, and the first eager call's insertion then failed that guard, so every compiled
    function that used an op was compiled twice."""
    if isinstance(bin_values, tuple) and not torch.compiler.is_compiling():
        hit = _NORM_CACHE.get(bin_values)
        if hit is not None:
            return hit
        vals = _normalize_bins(bin_values)
        _NORM_CACHE[bin_values] = vals
        return vals
    return _normalize_bins(bin_values)


def _normalize_bins(bin_values) -> Tuple[float, ...]:
    if isinstance(bin_values, torch.Tensor):
        if bin_values.dim() != 1:
            raise ValueError(f"bin_values must be 1-D, got shape {tuple(bin_values.shape)}")
        bin_values = bin_values.detach().cpu().tolist()
    try:
        vals = tuple(float(v) for v in bin_values)
    except TypeError as exc:
        raise TypeError(f"bin_values must be a sequence of numbers, got {type(bin_values).__name__}") from exc
    if len(vals) < 2:
        raise ValueError(f"bin_values needs at least 2 bins, got {len(vals)}")
    if len(vals) > MAX_BINS:
        raise ValueError(f"bin_values has {len(vals)} bins; at most {MAX_BINS} are supported")
    if not all(_finite(v) for v in vals):
        raise ValueError(f"bin_values must be finite, got {vals}")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"bin_values must be strictly increasing, got {vals}")
    return vals


def bins_tensor(bins: Tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bin values as a tensor on ``device`` (cached per device outside of tracing)."""
    if torch.compiler.is_compiling():
        return torch.tensor(bins, device=device, dtype=dtype)
    key = (bins, str(device), dtype)
    t = _BINS_CACHE.get(key)
    if t is None:
        # a normal tensor even when first asked for inside torch.inference_mode(): an inference
        # tensor in the cache would later be refused by autograd ("cannot be saved for backward")
        with torch.inference_mode(False):
            t = torch.tensor(bins, device=device, dtype=dtype)
        if cacheable(t):
            _BINS_CACHE[key] = t
    return t


def cacheable(t: torch.Tensor) -> bool:
    """Whether a constant tensor just made may be kept for later calls: a plain tensor.  Made inside
    ``torch.func.grad``/``jvp`` it is that transform's wrapper, which has no storage once the
    transform ends (a later kernel launch on it failed); made under ``FakeTensorMode`` (tracing
    tools) it is a fake tensor, which later real calls refused."""
    return type(t) is torch.Tensor and not functorch_wrapped(t)


def _finite(v: float) -> bool:
    """``math.isfinite`` for a Python float, in comparisons (False for NaN): ``torch.compile`` with
    ``dynamic=True`` refuses ``math.isfinite`` on a float inside a traced function ("torch.* op
    returned non-Tensor"), which broke every public op compiled that way."""
    return -math.inf < v < math.inf


def _as_float(name: str, value) -> float:
    """``value`` as a Python float: a real number (Python or numpy), not a tensor, a bool or a string
    (``float()`` reads True as 1.0 and "1e-6" as a number, so a config value of the wrong type went
    through)."""
    tp = type(value)
    if tp is float:  # the usual case first (a check per float argument of every op call)
        return value
    if tp is int:
        return float(value)
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python float, not a tensor")
    if isinstance(value, (bool, str, bytes)) or type(value).__name__ in ("bool_", "bool"):
        raise TypeError(f"{name} must be a float, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a float, got {value!r}") from exc


def check_temperature(temperature) -> float:
    t = _as_float("temperature", temperature)
    if not (_finite(t) and t > 0):
        raise ValueError(f"temperature must be a finite positive float, got {temperature!r}")
    return t


def check_float(name: str, value, *, positive: bool = False, nonneg: bool = False) -> float:
    v = _as_float(name, value)
    if not _finite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def check_logits(name: str, logits, k: int) -> None:
    """Static checks of a logits-like tensor whose last dimension holds the bins."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] != k:
        raise ValueError(
            f"{name} must have the bins in its last dimension of size {k} (len(bin_values)), "
            f"got shape {tuple(logits.shape)}"
        )


def check_same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must agree")


def check_int_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


class DataChecks:
    """Value checks (the ones that read tensor data) gathered and read back with one host sync.

    ``bad(flag, message, detail=None)`` queues a 0-d bool tensor that is True when a check fails,
    with the error's message and, optionally, a callable returning text appended to it that names the
    offending value (called only on failure, so it may index the data).  :meth:`raise_first` reads
    every flag at once -- one device-to-host copy instead of one per check -- and raises
    ``ValueError`` for the first failed check, in the order they were queued.  Every flag must be on
    one device.

    Under ``torch.func`` transforms (``vmap`` over the op, a ``grad`` inside it) the flags are
    wrapped tensors whose values cannot be read directly: they are unwrapped to the flags of every
    vmapped sample, so the checks still run; where a detail cannot be computed there (it indexes a
    batched tensor), the message is raised without it.
    """

    __slots__ = ("_flags", "_messages")

    def __init__(self) -> None:
        self._flags: list = []
        self._messages: list = []

    def bad(self, flag: torch.Tensor, message: str, detail=None) -> None:
        self._flags.append(flag)
        self._messages.append((message, detail))

    def raise_first(self) -> None:
        if not self._flags:
            return
        flags = self._flags
        wrapped = functorch_wrapped(flags[0])
        if wrapped:
            flags = [_unwrapped(f).any() for f in flags]
        failed = torch.stack(flags).tolist() if len(flags) > 1 else [bool(flags[0])]
        for is_bad, (message, detail) in zip(failed, self._messages):
            if is_bad:
                if detail is not None:
                    try:
                        message += detail()
                    except Exception:  # noqa: BLE001 - a batched tensor cannot be indexed by its values
                        if not wrapped:
                            raise
                raise ValueError(message)


def first_order_only(op: str) -> None:
    """Called in a fused op's backward: raise when it runs to build a graph (``create_graph=True``).

    The fused backward scales or recomputes the gradient in a kernel, outside autograd's view, so a
    second derivative through it would miss the op's share without an error.  The backward of a
    graph traced by ``torch.compile`` is skipped (its tracing may run with grad mode on)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{op}: the fused path is differentiable once; a second derivative through it "
                           "(create_graph=True: gradient penalties, Hessian-vector products) needs backend='reference'")


_IS_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's wrapper (``vmap``'s batched tensor, ``grad``'s)."""
    return _IS_WRAPPED is not None and bool(_IS_WRAPPED(t))


try:
    import torch.autograd.forward_ad as _fwad
except ImportError:  # pragma: no cover - every supported torch has it
    _fwad = None


def forward_ad_dual(t: Optional[torch.Tensor]) -> bool:
    """Whether ``t`` carries a forward-mode AD tangent (``torch.autograd.forward_ad.make_dual`` inside
    a ``dual_level``).  The fused kernels read only the primal values and their autograd.Functions
    have no ``jvp``: such a call runs the reference, whose torch ops carry the tangent.  Outside a
    dual level this is one comparison."""
    if t is None or _fwad is None or getattr(_fwad, "_current_level", 0) < 0:
        return False
    return _fwad.unpack_dual(t).tangent is not None


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under ``torch.func`` wrappers (a batched flag: one value per vmapped sample)."""
    while functorch_wrapped(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def check_finite_logits(checks: DataChecks, name: str, logits: torch.Tensor, temperature: float = 1.0) -> None:
    """Queue the data check: no NaN / +inf, and every row has at least one finite logit.

    One pass over the logits: the row maxima (``amax`` propagates NaN) are NaN for a row holding
    NaN, +inf for a row holding +inf, and -inf only for a row whose logits are all -inf.  Below
    ``temperature`` 1 a finite row maximum must stay finite once divided by it, in the precision
    the ops compute in (float32; float64 for float64 logits): a row whose maximum overflowed to
    +-inf gave NaN probabilities.
    """
    if logits.numel() == 0:
        return
    rmax = logits.amax(dim=-1)
    checks.bad(rmax.isnan().any(), f"{name} contains NaN")
    checks.bad((rmax == float("inf")).any(), f"{name} contains +inf")
    checks.bad((rmax == float("-inf")).any(), f"{name} has a row whose logits are all -inf (no bin has probability mass)")
    if temperature < 1.0:
        dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        over = (rmax.to(dt) / temperature).isinf() & rmax.isfinite()
        checks.bad(over.any(), f"{name} / temperature overflows {str(dt)[6:]} (temperature={temperature}): scale the "
                   "logits down or raise the temperature",
                   lambda: f"; a row's largest logit is {float(rmax[over].flatten()[0]):.4g}")


def check_distribution(checks: DataChecks, name: str, probs: torch.Tensor, atol: float = 1e-3) -> None:
    """Queue the data check: non-negative rows that sum to one (zeros allowed).

    The tolerance is at least the dtype's epsilon: a bf16 distribution (8 significant bits) rounded
    from an exact one sums to 1 only within about 0.004.
    """
    if probs.numel() == 0:
        return
    if probs.is_floating_point():
        atol = max(atol, torch.finfo(probs.dtype).eps)
    checks.bad(~torch.isfinite(probs).all(), f"{name} contains NaN or inf")
    checks.bad((probs < 0).any(), f"{name} has negative entries; it must hold probabilities")
    sums = probs.float().sum(-1)
    off = (sums - 1.0).abs() > atol
    checks.bad(off.any(), f"{name} rows must sum to 1 (within {atol})",
               lambda: f"; found a row summing to {float(sums[off].flatten()[0]):.6g}")


def scores_to_bins(checks: DataChecks, scores: torch.Tensor, bins: Tuple[float, ...], name: str = "scores") -> None:
    """Queue the data check that every score lies on the bin grid (within 1e-4 of a bin value)."""
    if scores.numel() == 0:
        return
    checks.bad(~torch.isfinite(scores).all(), f"{name} contains NaN or inf")
    lo, hi = bins[0], bins[-1]
    out = (scores < lo - 1e-4) | (scores > hi + 1e-4)
    checks.bad(out.any(), f"{name} must lie in [{lo}, {hi}]", lambda: f"; found {float(scores[out].flatten()[0])}")
    off = (scores.double().unsqueeze(-1) - bins_tensor(bins, scores.device, torch.float64)).abs().min(-1).values > 1e-4
    checks.bad(off.any(), f"{name} must lie on the bin grid {bins}",
               lambda: f"; found {float(scores[off].flatten()[0])}")


