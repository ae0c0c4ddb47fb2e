"""Self-resetting semaphores for the fused forward kernels: no zero-fill launch per call.

The ``rubric_loss`` and ``gdso_loss`` forward kernels end with a last-program reduction behind a
ticket counter, and ``rubric_loss`` with pairs also hands out program ids in arrival order and
counts finished row programs (see ``rubric.py``).  Those counters must be zero when a launch
starts.  Zero-filling a fresh buffer costs a kernel launch per call; instead each launch gets four
int32 words from a block allocated (zeroed) once per device, and the last program of the launch
writes them back to zero.  Launches that share words never overlap:

* eager calls take the words of their CUDA stream (kernels on one stream run one after another);
* a call being captured into a CUDA graph takes words of its own, never handed out again (a graph
  replays its kernels in order, and CUDA serialises launches of one executable graph);
* the Triton CPU interpreter (tests) runs programs one at a time, synchronously: words per thread
  (zeroed again before a launch if an interrupted one left them dirty).

On CUDA a launch that dies half-way leaves the context unusable (a sticky error), so words cannot
be left dirty for a later launch of the same process.

:func:`semaphores` returns ``None`` -- and the caller zero-fills a fresh workspace, the old way --
under ``torch.compile`` tracing, when a capture starts before any eager call allocated the block
on that device, when the block's slots are used up, and when disabled (``ZREWARD_SELF_RESET=0`` or
:func:`disabled`, for tests and comparisons).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, Optional

import torch

WORDS = 4  # per launch: [ticket, next program id, row programs done, spare]
SLOTS = 1024  # per device: one per stream that called, plus one per captured call

_BLOCKS: Dict[str, dict] = {}
_LOCK = threading.Lock()
_STATE = {"enabled": os.environ.get("ZREWARD_SELF_RESET", "1") not in ("0", "")}


def _block(dev_key: str, device: torch.device, allocate: bool) -> Optional[dict]:
    blk = _BLOCKS.get(dev_key)
    if blk is None and allocate:
        with _LOCK:
            blk = _BLOCKS.get(dev_key)
            if blk is None:
                # a normal tensor even when the first call runs under torch.inference_mode(): the
                # CPU path zeroes words in place, which an inference tensor refuses outside that mode
                with torch.inference_mode(False):
                    words = torch.zeros(SLOTS * WORDS, device=device, dtype=torch.int32)
                blk = _BLOCKS[dev_key] = {"words": words, "slots": {}, "used": 0}
    return blk


def _take(blk: dict, key) -> Optional[torch.Tensor]:
    """The words of ``key`` (a stream or thread; handed out once, then reused), or fresh words never
    handed out again for ``key=None`` (a captured call); ``None`` when the block is used up."""
    if key is not None:
        words = blk["slots"].get(key)  # the usual case: no lock
        if words is not None:
            return words
    with _LOCK:
        if key is not None and key in blk["slots"]:
            return blk["slots"][key]
        if blk["used"] >= SLOTS:
            return None
        i = blk["used"]
        blk["used"] += 1
        view = blk["words"][i * WORDS:(i + 1) * WORDS]
        if key is not None:
            blk["slots"][key] = view
        return view


def semaphores(device: torch.device) -> Optional[torch.Tensor]:
    """Four int32 words, zero now and zero again when the launch that uses them ends, for a launch
    on ``device``'s current stream; ``None`` when the caller must zero-fill its own workspace."""
    if not _STATE["enabled"] or torch.compiler.is_compiling():
        return None
    if device.type == "cpu":
        words = _take(_block("cpu", device, allocate=True), threading.get_ident())
        # an interpreted launch can be interrupted half-way (an exception in a test): start from
        # zero every time (cheaper than checking); the kernels' own reset is checked by the tests
        return words.zero_() if words is not None else None
    if device.type != "cuda":
        return None
    dev_key = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    if torch.cuda.is_current_stream_capturing():
        blk = _block(dev_key, device, allocate=False)  # no allocation inside a capture
        return None if blk is None else _take(blk, None)
    return _take(_block(dev_key, device, allocate=True), torch.cuda.current_stream(device).cuda_stream)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Zero-fill a fresh workspace per call inside the block (the path without semaphores)."""
    old = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = old


def all_zero() -> bool:
    """Whether every word handed out is back at zero (a test and debugging aid; syncs)."""
    return all(int(b["words"].abs().sum()) == 0 for b in _BLOCKS.values())
