"""``group_advantage``: group-normalised advantages as a compiled op, with a PyTorch fallback.

Backends, chosen per call (``backend=None`` / ``"auto"``, ``"compiled"``, ``"reference"``):

* ``compiled``: ``torch.ops.zreward.group_advantage`` from ``csrc/`` -- C++ on CPU
  (``zreward_kernels._C``), CUDA kernels on GPU (``zreward_kernels._C_cuda``), registered with
  ``TORCH_LIBRARY`` and given a fake implementation here so ``torch.compile(fullgraph=True)``
  traces it;
* ``reference``: the vectorised PyTorch version in :mod:`zreward_kernels.reference`.

Importing never fails when an extension is missing (or ``ZREWARD_DISABLE_EXTENSIONS=1``): auto
falls back to the reference and :func:`zreward_kernels.backend_info` says so.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Tuple

import numpy as np
import torch

from ._common import _INT_DTYPES, DataChecks, check_float, data_checks_enabled
from ._dispatch import record_backend, requested_backend
from .reference import ADV_MODES, GroupStats
from .reference import group_advantage as _reference

EXT_STATUS = {"cpu": None, "cuda": None}  # None = loaded; otherwise the reason it is not
_MODE_CODE = {"std": 0, "mean": 1, "rloo": 2}
_OP = None  # torch.ops.zreward.group_advantage.default once the extension is loaded (one lookup, not one per call)


def _load() -> None:
    global _OP
    if os.environ.get("ZREWARD_DISABLE_EXTENSIONS", "0") not in ("", "0"):
        EXT_STATUS["cpu"] = EXT_STATUS["cuda"] = "disabled by ZREWARD_DISABLE_EXTENSIONS"
        return
    try:
        from . import _C  # noqa: F401  (defines the op and its CPU kernel)
    except Exception as exc:  # not built (ZREWARD_NO_EXT=1, no compiler, ABI mismatch, ...)
        EXT_STATUS["cpu"] = f"zreward_kernels._C not loaded: {type(exc).__name__}: {exc}"
        EXT_STATUS["cuda"] = "needs zreward_kernels._C"
        return
    _OP = torch.ops.zreward.group_advantage.default
    try:
        from . import _C_cuda  # noqa: F401  (adds the CUDA kernel)
    except Exception as exc:
        EXT_STATUS["cuda"] = f"zreward_kernels._C_cuda not loaded: {type(exc).__name__}: {exc}"
    else:
        from ._tuning import push_native

        push_native()  # the launch settings in force (a tuned-config file may have set them)

    @torch.library.register_fake("zreward::group_advantage")
    def _fake(rewards, offsets, group_size, mode, eps):
        m = rewards.shape[0]
        g = offsets.shape[0] - 1 if offsets is not None else m // group_size
        dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
        return (
            rewards.new_empty(m, dtype=dt),
            rewards.new_empty(g, dtype=dt),
            rewards.new_empty(g, dtype=dt),
            rewards.new_empty(g, dtype=torch.bool),
        )


_load()


def _unavailable(device_type: str) -> Optional[str]:
    """None when the compiled op can run on devices of ``device_type``, else the reason it cannot."""
    if device_type == "cpu":
        return EXT_STATUS["cpu"]
    if device_type == "cuda":
        return EXT_STATUS["cpu"] or EXT_STATUS["cuda"]
    return f"no compiled kernel for device type {device_type}"


def compiled_available(device: torch.device) -> Optional[str]:
    """None when the compiled op can run on ``device``, else the reason it cannot."""
    return _unavailable(device.type)


_ADV_BACKENDS = ("auto", "compiled", "reference")


def _label_codes(labels) -> np.ndarray:
    """Codes 0..G-1 of hashable, sortable labels (uid strings, tuples), numbered in sorted-label order:
    one dict pass and a sort of the G distinct labels (0.65 vs 2.7 ms for numpy.unique on 8192 uid
    strings on the 2-core CPU)."""
    index: dict = {}
    try:
        first = np.fromiter((index.setdefault(x, len(index)) for x in labels), dtype=np.int64, count=len(labels))
        distinct = list(index)
        by_label = sorted(range(len(distinct)), key=distinct.__getitem__)
    except TypeError as exc:
        raise TypeError(f"group_ids must be hashable, sortable labels of one kind: {exc}") from exc
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[by_label] = np.arange(len(distinct))
    return rank[first]


def groups_from_ids(group_ids, m: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(order [M], offsets [G+1])``: a stable permutation putting the samples in group order
    (groups by sorted label, members in input order) and the offsets of the contiguous groups it
    makes.  ``group_ids``: an integer tensor (any device), a numpy array or a sequence of hashable,
    sortable labels.  Reads the group count on the host."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"group_ids must be an integer tensor (or a sequence of labels), got {group_ids.dtype}")
        codes = group_ids
    else:
        if isinstance(group_ids, (str, bytes)) or not hasattr(group_ids, "__len__"):
            raise TypeError(f"group_ids must be a tensor, a numpy array or a sequence of labels, "
                            f"got {type(group_ids).__name__}")
        arr = group_ids if isinstance(group_ids, np.ndarray) else None
        if arr is None:
            if isinstance(next(iter(group_ids), 0), (numbers.Real, np.number)):  # numbers: one numpy array
                arr = np.asarray(group_ids)
                if arr.dtype.kind not in "iubf":  # numbers and labels mixed: as given (mixed kinds do not sort)
                    arr = None
        if arr is not None and (arr.size == 0 or arr.dtype.kind in "iub"):
            codes = torch.from_numpy(arr.astype(np.int64, copy=False))
        elif arr is not None and arr.dtype.kind == "f":
            raise TypeError("group_ids must be integer or label values, got floats")
        elif arr is not None and arr.ndim != 1:
            raise ValueError(f"group_ids must be [M] = [{m}] (one label per reward), got shape {arr.shape}")
        else:
            codes = torch.from_numpy(_label_codes(group_ids if arr is None else arr))
    if codes.dim() != 1 or codes.shape[0] != m:
        raise ValueError(f"group_ids must be [M] = [{m}] (one label per reward), got shape {tuple(codes.shape)}")
    codes = codes.to(device=device)
    lo, hi = torch.stack(torch.aminmax(codes)).tolist() if m else (0, 0)  # one sync for both
    if 0 <= lo and hi < min(4 * m + 1024, 2**31 - 1):
        # dense labels (the codes of string labels, prompt indices): int32 keys sort faster, and bincount counts the
        # groups in one pass (1 vs 13 ms for unique_consecutive at M = 2^20 on the 2-core CPU); labels that
        # do not occur leave zero counts, dropped
        keys = codes.to(torch.int32)
        if keys.is_cpu and hi < 65536:  # numpy's stable sort of 16-bit keys is a radix sort (64 vs 700 us at 16384)
            order = torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))
        else:
            order = torch.sort(keys, stable=True)[1]
        counts = torch.bincount(keys)
        counts = counts[counts > 0]
    else:
        srt, order = torch.sort(codes.to(torch.int64), stable=True)
        counts = torch.unique_consecutive(srt, return_counts=True)[1]
    offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def group_advantage(
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_offsets: Optional[torch.Tensor] = None,
    mode: str = "std",
    eps: float = 1e-6,
    validate: bool = True,
    backend: Optional[str] = None,
    group_ids=None,
) -> Tuple[torch.Tensor, GroupStats]:
    """Group-normalised advantages for GRPO-style trainers.

    ``rewards [M]`` (fp16/bf16/fp32/fp64) are split into groups either of a fixed ``group_size``
    (``M % group_size == 0``) or by ``group_offsets [G+1]`` (sorted, first 0, last M, like
    FlashAttention's ``cu_seqlens``; empty groups allowed) -- contiguous groups -- or by
    ``group_ids [M]``, each sample's group label in any order (what verl's ``index`` of prompt
    uids is: an integer tensor, a numpy array, or a sequence of hashable, sortable labels such as
    uid strings) -- exactly one of the three.  With ``group_ids`` the samples are put in group order
    by a stable sort, the op runs on the contiguous groups and the advantages come back in the
    input order; the stats are in the order of the sorted distinct labels (``torch.unique`` /
    ``numpy.unique`` order).  Counting the groups reads them on the host (one sync), so that path is
    not for compiled or CUDA-graph-captured loops: pass offsets there.

    ``mode``: ``"std"`` -> ``(r - mean) / (std + eps)`` with the unbiased std; ``"mean"`` ->
    ``r - mean`` (Dr. GRPO); ``"rloo"`` -> ``r - mean of the other members``.  A group of one gets
    advantage 0 in every mode; with ``eps=0`` a group of equal rewards gets 0 too (not ``0/0``).

    Returns ``(advantages [M], GroupStats(mean [G], std [G], zero_std [G]))``; advantages and stats
    are float32 (float64 for float64 rewards); ``zero_std`` flags groups whose rewards are all equal.
    Not differentiable (advantages are constants of the policy loss).  ``validate=True`` checks the
    offsets and rejects NaN/inf rewards (host syncs); ``validate=False`` skips every check that reads
    values so the op can sit in a compiled or CUDA-graph-captured loop.
    """
    # The checks below take the common argument types first (the call's host time is most of a
    # per-call GPU timing: see bench/test_bench_launch.py); every other type gets the general check.
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be float16, bfloat16, float32 or float64, got {rewards.dtype}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [M], got shape {tuple(rewards.shape)}")
    mode_code = _MODE_CODE.get(mode) if isinstance(mode, str) else None
    if mode_code is None:
        raise ValueError(f"mode must be one of {ADV_MODES}, got {mode!r}")
    eps_ = eps if type(eps) is float and 0.0 <= eps < math.inf else check_float("eps", eps, nonneg=True)
    m = rewards.shape[0]
    if group_ids is not None:
        if group_size is not None or group_offsets is not None:
            raise ValueError("give exactly one of group_size, group_offsets and group_ids")
        order, offsets = groups_from_ids(group_ids, m, rewards.device)
        adv_sorted, stats = group_advantage(rewards[order], group_offsets=offsets, mode=mode, eps=eps_,
                                            validate=validate, backend=backend)
        return torch.empty_like(adv_sorted).index_copy_(0, order, adv_sorted), stats
    if (group_size is None) == (group_offsets is None):
        raise ValueError("give exactly one of group_size, group_offsets and group_ids")
    if group_size is not None:
        if type(group_size) is not int:
            if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
                raise TypeError(f"group_size must be an int, got {group_size!r}")
            group_size = int(group_size)  # a numpy integer (np.unique counts, a shape entry) is taken as its value
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        if m % group_size != 0:
            raise ValueError(f"the number of rewards ({m}) is not a multiple of group_size ({group_size})")
    else:
        if not isinstance(group_offsets, torch.Tensor):
            raise TypeError(f"group_offsets must be a torch.Tensor, got {type(group_offsets).__name__}")
        if group_offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"group_offsets must be int32 or int64, got {group_offsets.dtype}")
        if group_offsets.dim() != 1 or group_offsets.shape[0] < 1:
            raise ValueError(f"group_offsets must be 1-D [G + 1], got shape {tuple(group_offsets.shape)}")
        if group_offsets.device != rewards.device:
            raise ValueError(f"group_offsets is on {group_offsets.device} but rewards is on {rewards.device}")
        group_offsets = group_offsets.long()
    if data_checks_enabled(validate):  # one host sync for all of them
        checks = DataChecks()
        if m:
            checks.bad(~torch.isfinite(rewards).all(), "rewards contains NaN or inf")
        if group_offsets is not None:
            o = group_offsets
            checks.bad((o[0] != 0) | (o[-1] != m), f"group_offsets must start at 0 and end at M={m}",
                       lambda: f", got {int(o[0])} ... {int(o[-1])}")
            if o.shape[0] > 1:
                checks.bad((o[1:] < o[:-1]).any(), "group_offsets must be sorted (non-decreasing)")
        checks.raise_first()

    req = requested_backend(backend, allowed=_ADV_BACKENDS)
    # the device type without building a device object (0.33 us of a call that takes a few)
    reason = _unavailable("cuda" if rewards.is_cuda else "cpu" if rewards.is_cpu else rewards.device.type)
    if req == "compiled" and reason is not None:
        raise RuntimeError(f"group_advantage: backend='compiled' was requested but cannot run: {reason}")
    use_compiled = req != "reference" and reason is None
    record_backend("group_advantage", "compiled" if use_compiled else "reference")
    if rewards.requires_grad:
        rewards = rewards.detach()
    if use_compiled:
        adv, mean, std, zs = _OP(rewards, group_offsets, group_size if group_size is not None else 0, mode_code, eps_)
        return adv, GroupStats(mean, std, zs)
    return _reference(rewards, group_size=group_size, group_offsets=group_offsets, mode=mode, eps=eps_)
