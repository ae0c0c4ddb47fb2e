"""Launch configurations of the Triton kernels, in one table.

Each kernel's tile size and warp count are read from :data:`CONFIGS` at launch time.  The defaults
are the best configurations of the day's earlier H200 sweep of 2026-11-27; the day's last sweep
(``bench/results/h200_tune.md``, best per kernel in ``bench/results/h200_kernel_configs.json``,
benchmarks with the defaults in ``h200.md``) found no candidate more than 2.3% better, so they stay.
The sweep ranks candidates by their geometric-mean speed-up over its two sizes, timed in CUDA
graphs.  ``bench/tune_kernels.py`` times alternatives on a GPU through :func:`override`, so a GPU
session picks defaults from measurements rather than guesses.

Keys:

* ``BLOCK_R``: rows per program (``score_stats`` and ``rubric_loss`` row programs), a power of two;
* ``BLOCK_P``: pairs per pair program of the ``rubric_loss`` forward, a power of two;
* ``PAIRS``: same-prompt pairs per ``gdso_loss`` program (each pair holds ``2 G`` rows), a power
  of two; the launcher lowers it so one program never holds more than 256 rows;
* ``num_warps``: warps per program; 0 for the ``gdso_loss`` default (tile layout: 4 up to
  ``G = 16``, 8 up to ``G = 32``, 16 above; row per thread: one lane per row of the program);
* ``WARP_STATS`` (``gdso_loss``): 1 sums each side's group statistics per row on the gap terms'
  layout, whose member axis lies within a warp (shuffles; up to ``G = 16``), 0 across the program's
  warps through shared memory (the earlier way; 1 is the default: 9-10% faster in the H200 sweep);
* ``ELEMS_PER_LANE`` (``group_advantage``, the CUDA kernel of ``csrc/``): group members each lane
  visits for the typical group size (1: one lane per member, up to a warp per group); a power of two;
* ``KERNEL`` (``group_advantage``): which CUDA segment kernel runs groups below 1024 members: 1, the
  first one, or 2 (the default since the H200 sweep), with full-warp shuffles, members kept in registers
  between the passes and a ballot for ``zero_std`` (``csrc/group_advantage_cuda.cu`` says more);
* ``restricted_fwd`` (the vocab-restricted head's projection): ``KERNEL`` 1 (the default) runs one
  Triton kernel (``BLOCK_N`` hidden rows per program, ``H`` walked in ``BLOCK_H`` chunks, each a
  tensor-core product against the K gathered rows), 0 the matrix product ``hidden @ W[ids].T``.
  On the H200 (2026-11-27, N = 1024, bf16, 20 CUDA-graph replays back to back) the kernel's
  forward took 9.4 us per replay against the product's 22.1, and ``score_stats_from_hidden``'s
  fused forward+backward 25.9 against 39.7 us; per eager call, synchronised after each, the
  forward took 0.114 ms against 0.058 (a Triton launch costs more host time than the product's
  two torch ops), forward+backward 0.945 against 0.964 ms.  The tiles stay 16 x 256, the ones
  those figures were measured with: that run's sweep (CUDA-graph replays) put 32 x 128 first
  (9.9 against 11.6 us at N = 1024) but its profile (kernel time alone) the default (7.9 against
  8.6 us); with gradients (training the score token) the same switch runs the forward kernel
  and, for the hidden-state gradient ``g @ W[ids]``, a second one, whose tiles of
  ``[BLOCK_N, BLOCK_H]`` gradient elements are ``restricted_bwd``'s settings; ``score_stats_from_hidden``'s
  fused kernels (projection and statistics, forward and backward) use the same two entries;
* ``FLAT``: 0 for the tile layout (a ``[BLOCK_R, 16]`` tile, bins padded to a power of two,
  reductions across lanes), 1 for row per thread (each lane owns whole rows and visits the bins in
  unrolled loops; grids of up to 32 bins).  For ``gdso_loss`` (2026-11-28, not yet timed on a GPU,
  so 0 stays its default): row per thread compiles, for sm_90 at ``G = 8`` (Triton 3.8), to 1,296
  SASS instructions per program of 2 pairs in one warp (``PAIRS=2``) or 1,664 per warp for 8 pairs
  in 4 warps, 650-830 warp-instructions per pair against about 3,700 for the tile layout (928 in
  each of 4 warps, one pair); where many waves of programs make the kernel issue-bound (P = 16384:
  70 us on the H200 for about 4 us of memory traffic) that is the measure, where one wave's latency
  decides (P = 512) a program's serial chain is, and the flat program's is longer.

Configurations tuned for a particular GPU (``bench/tune_kernels.py --write-config FILE``) are applied
with :func:`load_configs` or, at import, from the file named by ``ZREWARD_KERNEL_CONFIGS``.  They
are launch parameters only: every configuration computes the same values (tested), so a config file
made on another GPU can cost speed, never correctness.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Dict, Iterator, Optional

CONFIGS: Dict[str, Dict[str, int]] = {
    "stats_fwd": {"BLOCK_R": 64, "num_warps": 8, "FLAT": 0},
    "stats_bwd": {"BLOCK_R": 64, "num_warps": 2, "FLAT": 0},
    "rubric_fwd": {"BLOCK_R": 256, "BLOCK_P": 256, "num_warps": 8, "FLAT": 1},
    "rubric_bwd": {"BLOCK_R": 128, "num_warps": 4, "FLAT": 1},
    "gdso_fwd": {"PAIRS": 1, "num_warps": 0, "WARP_STATS": 1, "FLAT": 0},
    "group_advantage": {"ELEMS_PER_LANE": 4, "KERNEL": 2},
    "restricted_fwd": {"KERNEL": 1, "BLOCK_N": 16, "BLOCK_H": 256, "num_warps": 4},
    "restricted_bwd": {"BLOCK_N": 64, "BLOCK_H": 128, "num_warps": 4},
}

#: The shipped defaults, as they were before a tuned file (``ZREWARD_KERNEL_CONFIGS``) or
#: :func:`load_configs` changed :data:`CONFIGS`; a copy, never changed.
DEFAULT_CONFIGS: Dict[str, Dict[str, int]] = {k: dict(v) for k, v in CONFIGS.items()}

_POW2_KEYS = ("BLOCK_R", "BLOCK_P", "PAIRS", "ELEMS_PER_LANE", "BLOCK_N", "BLOCK_H")

def _tile(rows_warps, per_thread):
    """Tile-layout candidates with at most ``per_thread`` padded elements per thread."""
    return [dict(BLOCK_R=r, num_warps=w, FLAT=0) for r, w in rows_warps if r * 16 <= per_thread * 32 * w]


_FLAT = [dict(BLOCK_R=r, num_warps=r // (32 * n), FLAT=1) for r in (128, 256, 512) for n in (1, 2)]
_GRID = [(r, w) for r in (64, 128, 256, 512) for w in (2, 4, 8, 16) if w < 16 or r >= 256]

#: Candidates ``bench/tune_kernels.py`` times on a GPU (each kernel swept with the others at their
#: defaults).  Tiles are limited to at most 32 (``score_stats``) or 16 (``rubric_loss``,
#: ``gdso_loss``) padded elements per thread: beyond that ``ptxas`` spills registers for sm_90
#: (``python -m zreward_kernels.aot_check --sweep all --verbose`` prints the register use);
#: 16 warps only for tiles of 256 rows or more.  Row-per-thread candidates hold 1 or 2 rows per
#: thread.
SWEEP: Dict[str, list] = {
    "stats_fwd": _tile(_GRID, 32) + _FLAT,
    "stats_bwd": _tile(_GRID, 32) + _FLAT,
    "rubric_fwd": [dict(c, BLOCK_P=min(c["BLOCK_R"], 256)) for c in _tile(_GRID, 16) + _FLAT],
    "rubric_bwd": _tile(_GRID, 16) + _FLAT,
    "gdso_fwd": [dict(PAIRS=n, num_warps=w, WARP_STATS=ws, FLAT=0) for ws in (1, 0) for n in (1, 2, 4, 8, 16)
                 for w in (1, 2, 4, 8) if n * 16 * 16 <= 16 * 32 * w]  # rows per program = PAIRS * 16 at G = 8
    # row per thread: one lane per row (PAIRS * 16 = 32 * warps at G = 8), or two, or one pair per
    # warp (half its lanes idle: the shortest one-warp program, 1,136 instructions for sm_90)
    + [dict(PAIRS=n, num_warps=w, WARP_STATS=ws, FLAT=1) for ws in (1, 0) for n in (1, 2, 4, 8, 16)
       for w in (1, 2, 4, 8) if n * 16 in (32 * w, 64 * w) or (n, w) == (1, 1)],
    # 16 and 32: one lane (thread) per group of up to 16 / 32 members, no shuffles at all
    "group_advantage": [dict(ELEMS_PER_LANE=e, KERNEL=k) for k in (1, 2) for e in (1, 2, 4, 8, 16, 32)],
    # the matrix product (KERNEL=0) and the Triton projection (KERNEL=1) in other tilings, against the
    # default (the projection, 16 x 256)
    "restricted_fwd": [dict(KERNEL=0)] + [dict(KERNEL=1, BLOCK_N=n, BLOCK_H=h, num_warps=w)
                                          for n, h, w in ((16, 128, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8),
                                                          (64, 64, 4), (64, 128, 8))],
    # its hidden-state gradient (with KERNEL=1): [BLOCK_N, BLOCK_H] tiles of dX, at most 64 fp32
    # accumulators per thread
    "restricted_bwd": [dict(BLOCK_N=n, BLOCK_H=h, num_warps=w)
                       for n, h, w in ((32, 128, 4), (32, 256, 4), (64, 64, 4), (64, 128, 4), (64, 256, 8),
                                       (128, 64, 8), (128, 128, 8))],
}


def config(kernel: str) -> Dict[str, int]:
    """The current launch configuration of ``kernel`` (a key of :data:`CONFIGS`)."""
    return CONFIGS[kernel]


def _check(kernel: str, cfg: Dict[str, int]) -> None:
    if kernel not in CONFIGS:
        raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(CONFIGS)}")
    for key, val in cfg.items():
        if key not in CONFIGS[kernel]:
            raise KeyError(f"kernel {kernel!r} has no setting {key!r}; settings: {sorted(CONFIGS[kernel])}")
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{kernel}.{key} must be an int, got {val!r}")
        if key in _POW2_KEYS and (val < 1 or val & (val - 1)):
            raise ValueError(f"{kernel}.{key} must be a power of two >= 1, got {val}")
        if key == "ELEMS_PER_LANE" and val > 32:
            raise ValueError(f"{kernel}.ELEMS_PER_LANE must be a power of two in 1..32, got {val}")
        if key == "KERNEL" and kernel == "restricted_fwd" and val not in (0, 1):
            raise ValueError(f"{kernel}.KERNEL must be 0 (matrix product) or 1 (Triton), got {val}")
        if key == "KERNEL" and kernel != "restricted_fwd" and val not in (1, 2):
            raise ValueError(f"{kernel}.KERNEL must be 1 or 2, got {val}")
        if key in ("BLOCK_N", "BLOCK_H") and val < 16:
            raise ValueError(f"{kernel}.{key} must be at least 16 (a tensor-core product's smallest side), got {val}")
        if key == "WARP_STATS" and val not in (0, 1):
            raise ValueError(f"{kernel}.WARP_STATS must be 0 (cross-warp sums) or 1 (warp shuffles), got {val}")
        if key == "FLAT" and val not in (0, 1):
            raise ValueError(f"{kernel}.FLAT must be 0 (tile layout) or 1 (row per thread), got {val}")
        if key == "num_warps" and val not in ((0, 1, 2, 4, 8, 16) if kernel == "gdso_fwd" else (1, 2, 4, 8, 16)):
            raise ValueError(f"{kernel}.num_warps must be one of 1, 2, 4, 8, 16, got {val}")


@contextlib.contextmanager
def override(kernel: str, **cfg: int) -> Iterator[Dict[str, int]]:
    """Run a block with some settings of ``kernel`` changed (restored on exit), e.g.
    ``with override("rubric_fwd", BLOCK_R=256, num_warps=8): ...``.  Not thread-safe: meant for
    benchmarks and tests, not for concurrent training code."""
    _check(kernel, cfg)
    old = dict(CONFIGS[kernel])
    CONFIGS[kernel].update(cfg)
    push_native()
    try:
        yield CONFIGS[kernel]
    finally:
        CONFIGS[kernel].clear()
        CONFIGS[kernel].update(old)
        push_native()


def load_configs(path: str, *, strict_device: Optional[str] = None) -> Dict[str, Dict[str, int]]:
    """Apply the launch configurations in the JSON file ``path`` (``{"configs": {kernel: {setting:
    value}}}``, as ``bench/tune_kernels.py --write-config`` writes it) and return them.  Every
    kernel and setting is checked before anything changes; an unknown kernel or setting, or a bad
    value, raises naming it.  With ``strict_device``, a file tuned on another device (its
    ``"device"`` field) is refused."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("configs"), dict):
        raise ValueError(f"{path}: expected an object with a 'configs' object mapping kernels to settings")
    if strict_device is not None and data.get("device") != strict_device:
        raise ValueError(f"{path}: tuned on {data.get('device')!r}, not on {strict_device!r}")
    configs = data["configs"]
    for kernel, cfg in configs.items():
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: settings of {kernel!r} must be an object, got {cfg!r}")
        _check(kernel, cfg)
    for kernel, cfg in configs.items():
        CONFIGS[kernel].update(cfg)
    push_native()
    return configs


def push_native() -> None:
    """Hand the settings of compiled (non-Triton) kernels to their extension, when it is loaded:
    the group-advantage CUDA kernel's elements per lane and segment kernel.  Called whenever the
    table changes and when the extension loads; a no-op without it."""
    mod = sys.modules.get("zreward_kernels._C_cuda")
    if mod is not None and hasattr(mod, "set_config"):
        cfg = CONFIGS["group_advantage"]
        mod.set_config(cfg["ELEMS_PER_LANE"], cfg["KERNEL"])


if os.environ.get("ZREWARD_KERNEL_CONFIGS"):
    load_configs(os.environ["ZREWARD_KERNEL_CONFIGS"])
