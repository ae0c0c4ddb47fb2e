"""Work split over the processes of an ``accelerate.Accelerator`` and gathered back in order."""

from __future__ import annotations

from typing import Sequence

import torch


def gather_shards(acc, mine: torch.Tensor, shards: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """All ``n`` rows, in item order, on every process, from the rows each process computed.

    ``shards[r]`` are the item indices process ``r`` computed (every process knows all of them: the
    split is deterministic) and ``mine`` holds this process's rows in that order.  One all-gather
    of equal-sized buffers (each padded to the largest share); on CPU in ``mine``'s dtype.
    """
    world, rank = acc.num_processes, acc.process_index
    if mine.shape[0] != len(shards[rank]):
        raise ValueError(f"process {rank} computed {mine.shape[0]} rows for a share of {len(shards[rank])}")
    out = mine.new_empty((n,) + tuple(mine.shape[1:]))
    if world == 1:
        out[torch.as_tensor(list(shards[0]), dtype=torch.long)] = mine
        return out
    per = max(1, max(len(s) for s in shards))
    buf = mine.new_zeros((per,) + tuple(mine.shape[1:]))
    buf[:mine.shape[0]] = mine
    every = acc.gather(buf.to(acc.device)).cpu()  # [world * per, ...], process-major
    for r, idx in enumerate(shards):
        if len(idx):
            out[torch.as_tensor(list(idx), dtype=torch.long)] = every[r * per:r * per + len(idx)]
    return out
