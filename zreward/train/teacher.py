"""RISD teacher targets: the frozen teacher's score distributions, computed once and cached.

Cache format: a safetensors file with one tensor ``probs`` ``[N, K]`` (float32) and metadata
``keys`` (a JSON list of ``"<id>\\t<dimension>\\t<prompt>"`` item keys, row order), ``teacher``
(where the targets came from, with the trace settings) and ``bin_values``.  Loading matches rows to items by key, so a
manifest may be reordered or subset.  When a run names its teacher as well, the file must have been made
by that teacher (absolute path) with the same trace settings.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..data import RatedItem, atomic_path, check_one_image_per_key
from ..scorer import image_array, named_images


def item_key(it: RatedItem) -> str:
    return f"{it.id}\t{it.dimension}\t{it.prompt}"


def load_image(it: RatedItem) -> np.ndarray:
    """The item's image as an HxWx3 uint8 array (``image``: a path or, in memory, an array or a PIL image)."""
    return image_array(it.image, f"item {it.id!r}")


@torch.no_grad()
def compute_targets(teacher, items: Sequence[RatedItem], batch_size: int = 16, traces: int = 0,
                    trace_tokens: int = 32, temperature: float = 1.0, progress: bool = False) -> torch.Tensor:
    """Teacher distributions ``[N, K]`` over the bins, one row per item (``teacher`` a ZRewardModel).

    ``traces=0`` reads the distribution right after the question; ``traces=n`` samples n reasoning
    traces per item (ending at the ``<|score|>`` marker, at most ``trace_tokens`` tokens, sampling
    ``temperature``), reads q_T(s | p, I, d, rho) at each marker and averages the n distributions.
    ``progress`` shows a progress bar over the items (when tqdm is installed).
    """
    from ..scorer import RewardScorer, check_count

    items = list(items)  # any iterable: it is sliced into batches
    batch_size = check_count("batch_size", batch_size)
    traces = check_count("traces", traces, 0)
    if traces:  # generate's own errors named neither argument ("max() arg is an empty sequence" for traces=-1)
        trace_tokens = check_count("trace_tokens", trace_tokens)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (the traces are sampled), got {temperature!r}")
        temperature = float(temperature)  # generate refuses a numpy float
    scorer = RewardScorer(teacher, in_vocab_mass=False)
    rows = []
    if traces:
        from .rl import ensure_marker, sample_traces, trace_forward

        marker = ensure_marker(teacher)
        ids = torch.tensor(teacher.score_tokens.token_ids, device=teacher.device)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc="teacher targets", unit="item")
        except ImportError:
            pass
    for s in range(0, len(items), batch_size):
        if bar is not None and s:
            bar.update(batch_size)
        chunk = items[s:s + batch_size]
        images, prompts, dims = [load_image(it) for it in chunk], [it.prompt for it in chunk], [it.dimension for it in chunk]
        with named_images(f"item {it.id!r}" for it in chunk):  # an image the teacher's processor refuses
            if not traces:
                logits = scorer.query_logits(images, prompts, dims)
                rows.append(torch.softmax(logits.float(), -1).cpu())
                continue
            tr, forced = sample_traces(scorer, teacher.model, images, prompts, dims, traces, trace_tokens,
                                       temperature, marker)
        rep = lambda xs: [x for x in xs for _ in range(traces)]  # noqa: E731
        _, _, logits = trace_forward(scorer, rep(images), rep(prompts), rep(dims), tr, forced, ids)
        probs = torch.softmax(logits.float(), -1).view(len(chunk), traces, -1).mean(1)
        rows.append(probs.cpu())
    if bar is not None:
        bar.update(len(items) - bar.n)
        bar.close()
    return torch.cat(rows) if rows else torch.zeros(0, len(teacher.rubric.bin_values))


def sharded_targets(acc, teacher, items: Sequence[RatedItem], **kwargs) -> torch.Tensor:
    """:func:`compute_targets` split over the processes of ``acc`` (an ``accelerate.Accelerator``):
    process r computes items r, r + W, r + 2W, ... and every process gets all N rows, in item order
    (one gather).  With one process it is ``compute_targets``."""
    from ._dist import gather_shards

    world, rank = acc.num_processes, acc.process_index
    shards = [list(range(r, len(items), world)) for r in range(world)]
    mine = compute_targets(teacher, [items[i] for i in shards[rank]], progress=acc.is_main_process, **kwargs)
    return gather_shards(acc, mine, shards, len(items))


def save_targets(path: str, probs: torch.Tensor, items: Sequence[RatedItem], teacher: str,
                 bin_values: Sequence[float]) -> None:
    from safetensors.torch import save_file

    check_one_image_per_key(items, item_key, "items", "teacher targets are keyed by id, dimension and prompt")
    meta = {"keys": json.dumps([item_key(it) for it in items]), "teacher": str(teacher),
            "bin_values": json.dumps(list(bin_values)), "format": "1"}
    with atomic_path(path) as tmp:  # a run killed while writing leaves no torn cache
        save_file({"probs": probs.float().contiguous()}, tmp, metadata=meta)


def teacher_source(teacher: str, traces: int, trace_tokens: int, temperature: float) -> str:
    """How a cache's targets were made (stored in the file, compared when a teacher is given)."""
    return (f"{os.path.abspath(teacher)} (traces={traces}, trace_tokens={trace_tokens}, "
            f"temperature={temperature})")


def load_targets(path: str, items: Sequence[RatedItem], bin_values: Sequence[float],
                 source: Optional[str] = None) -> torch.Tensor:
    """Rows of a cache for ``items``.  ``source`` (:func:`teacher_source` of the run's teacher and
    trace settings), when given, must match what made the file: a cache from another teacher or
    other settings is refused instead of being trained on."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        probs = f.get_tensor("probs")
    if "keys" not in meta:
        raise ValueError(f"{path} is not a zreward teacher-target file (no 'keys' metadata)")
    if source is not None and meta.get("teacher") != source:
        raise ValueError(f"teacher_cache {path} holds targets made by {meta.get('teacher')!r}, but this run's "
                         f"teacher is {source!r}; delete the file or point teacher_cache elsewhere")
    saved_bins = json.loads(meta.get("bin_values", "[]"))
    if [float(v) for v in saved_bins] != [float(v) for v in bin_values]:
        raise ValueError(f"{path} was made for bins {saved_bins}, the student uses {list(bin_values)}")
    index = {k: i for i, k in enumerate(json.loads(meta["keys"]))}
    missing: List[str] = [item_key(it) for it in items if item_key(it) not in index]
    if missing:
        raise ValueError(f"{path} has no teacher target for {len(missing)} item(s), e.g. {missing[0]!r}")
    return probs[[index[item_key(it)] for it in items]]
