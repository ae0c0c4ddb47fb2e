"""Evaluate a reward model on a manifest: score every image once, compute metrics, write plots."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from . import _json as strict_json
from .data import RatedItem, check_one_image_per_key, missing_images
from .metrics import evaluate, pairwise_calibration, rater_histograms
from .scorer import RewardScorer, check_count, unreadable_images


def _progress(total: int, desc: str):
    """A bar counting images (None without tqdm, which comes with transformers)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img")


def image_key(it: RatedItem) -> tuple:
    """What identifies an item's query prefix: its image (path, or id for an in-memory array) and prompt."""
    return (it.image if isinstance(it.image, str) else ("in-memory", it.id), it.prompt)


def shard_by_image(items: List[RatedItem], rank: int, world: int) -> List[int]:
    """Indices of the items process ``rank`` of ``world`` predicts: the distinct images (with their
    prompts) round-robin over the processes, each with all of its dimensions (one prefix pass)."""
    by_image: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for i, it in enumerate(items):
        by_image.setdefault(image_key(it), []).append(i)
    return [i for key in list(by_image)[rank::world] for i in by_image[key]]


def score_items(scorer: RewardScorer, items: List[RatedItem], batch_size: int = 16, progress: bool = True):
    """Score each distinct (image, prompt) once on the dimensions its items ask for.

    Returns per item: predicted mean ``[N]`` and distribution ``[N, K]`` (numpy float64).
    """
    from .train.teacher import load_image

    items = list(items)  # any iterable: it is walked more than once
    batch_size = check_count("batch_size", batch_size)
    rubric = scorer.model.rubric
    for it in items:
        rubric.index(it.dimension)
    missing = missing_images(items)
    if missing:  # before scoring any image, not when its batch comes up
        raise FileNotFoundError(f"image not found: {missing[0]} ({len(missing)} missing image file(s))")
    bad = unreadable_images(sorted({it.image for it in items if isinstance(it.image, str)}))
    if bad:  # likewise for a file that is there but is not an image (headers only)
        raise ValueError(f"{bad[0][0]}: {bad[0][1]} ({len(bad)} unreadable image file(s))")
    check_one_image_per_key(items, image_key, "items", "an in-memory image is known by its id here")
    scorer.model.check_item_prompts(items)  # a special token's text in a prompt, before any image is scored
    images: "OrderedDict[tuple, List[int]]" = OrderedDict()
    first: Dict[tuple, RatedItem] = {}
    for i, it in enumerate(items):
        key = image_key(it)
        images.setdefault(key, []).append(i)
        first.setdefault(key, it)
    keys = list(images)
    dims = tuple(d for d in rubric.dimensions if any(it.dimension == d for it in items))
    mean = np.zeros(len(items))
    probs = np.zeros((len(items), len(rubric.bin_values)))
    bar = _progress(len(keys), "scoring") if progress else None
    for s in range(0, len(keys), batch_size):
        chunk = keys[s:s + batch_size]
        pics = []
        for key in chunk:  # a file is given as its path, so an image the processor refuses is named by it
            img = first[key].image
            pics.append(img if isinstance(img, (str, os.PathLike)) else load_image(first[key]))
        out = scorer.score(pics, [p for _, p in chunk], dims)
        for j, key in enumerate(chunk):
            for i in images[key]:
                d = dims.index(items[i].dimension)
                mean[i] = float(out.mean[j, d])
                probs[i] = out.probs[j, d].float().cpu().numpy()
        if bar is not None:
            bar.update(len(chunk))  # images, not batches (it counted batches as images)
    if bar is not None:
        bar.close()
    return mean, probs


def _report(labelled: List[RatedItem], mean: np.ndarray, probs: np.ndarray, bin_values) -> Dict:
    """Pooled and per-dimension metrics of predictions against the items' references (rater
    histograms too when every item has ratings on the rubric's scale: ratings off it, say on 1..10,
    would be snapped to the end bins, so the distribution metrics are left out with a warning)."""
    hist = None
    if all(it.ratings for it in labelled):
        lo, hi = bin_values[0], bin_values[-1]
        if all(lo <= r <= hi for it in labelled for r in it.ratings):
            hist = rater_histograms([it.ratings for it in labelled], bin_values)
        else:
            warnings.warn(f"ratings outside the rubric's scale [{lo}, {hi}]: the distribution metrics (KL, JS, "
                          "Wasserstein-1) are left out; the rank and correlation metrics do not depend on the scale",
                          stacklevel=3)
    return evaluate(mean, np.array([it.reference for it in labelled]), [it.group for it in labelled],
                    [it.dimension for it in labelled], probs=probs, rater_hist=hist, bin_values=bin_values)


def evaluate_items(scorer: RewardScorer, items: List[RatedItem], out_dir: Optional[str] = None,
                   batch_size: int = 16, plots: bool = True, progress: bool = True) -> Dict:
    """Metrics (pooled and per dimension) of the scorer on the items that have a reference score."""
    items = list(items)  # any iterable: it is walked more than once
    labelled = [it for it in items if it.reference is not None]
    if not labelled:
        raise ValueError("no item has a score or ratings to evaluate against")
    mean, probs = score_items(scorer, labelled, batch_size, progress)
    ref = np.array([it.reference for it in labelled])
    groups = [it.group for it in labelled]
    dims = [it.dimension for it in labelled]
    report = _report(labelled, mean, probs, scorer.model.rubric.bin_values)
    report["_meta"] = {"items": len(labelled), "skipped_unlabelled": len(items) - len(labelled),
                       "images": len({image_key(it) for it in labelled})}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            strict_json.dump(report, f, indent=2, default=float)
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            for it, m, p in zip(labelled, mean, probs):
                f.write(strict_json.dumps({"id": it.id, "dimension": it.dimension, "group": it.group, "mean": m,
                                    "reference": it.reference, "probs": [round(x, 6) for x in p]}) + "\n")
        if plots:
            report["_meta"]["plots"] = write_plots(out_dir, mean, ref, probs, groups, dims, report)
    return report


def evaluate_with_traces(zm, items: List[RatedItem], traces: int = 1, trace_tokens: int = 32,
                         temperature: float = 1.0, batch_size: int = 16) -> Dict:
    """Metrics of a reasoning model: each item's distribution is read after ``traces`` sampled
    reasoning traces and averaged (``zreward.train.teacher.compute_targets``)."""
    labelled = [it for it in items if it.reference is not None]
    if not labelled:
        raise ValueError("no item has a score or ratings to evaluate against")
    _, probs = predict_items(zm, labelled, traces=traces, trace_tokens=trace_tokens, temperature=temperature,
                             batch_size=batch_size)
    report = _report(labelled, probs @ np.asarray(zm.rubric.bin_values), probs, zm.rubric.bin_values)
    report["_meta"] = {"items": len(labelled), "traces": traces}
    return report


def predict_items(zm, items: List[RatedItem], *, traces: int = 0, trace_tokens: int = 32, temperature: float = 1.0,
                  batch_size: int = 16, progress: bool = False):
    """Predicted mean ``[N]`` and distribution ``[N, K]`` (numpy float64) of a ``ZRewardModel`` per item:
    read right after the question (each image scored once, :func:`score_items`), or with ``traces``
    averaged over that many sampled reasoning traces (``zreward.train.teacher.compute_targets``)."""
    items = list(items)
    if not traces:
        return score_items(RewardScorer(zm, in_vocab_mass=False), items, batch_size, progress)
    from .train.teacher import compute_targets

    probs = compute_targets(zm, items, batch_size, traces=traces, trace_tokens=trace_tokens,
                            temperature=temperature, progress=progress).numpy().astype(np.float64)
    return probs @ np.asarray(zm.rubric.bin_values), probs


def report_items(labelled: List[RatedItem], mean, probs, bin_values) -> Dict:
    """The metrics of predictions (``mean [N]``, ``probs [N, K]``) of labelled items."""
    return _report(labelled, np.asarray(mean, dtype=np.float64), np.asarray(probs, dtype=np.float64), bin_values)


def write_plots(out_dir, mean, ref, probs, groups, dims, report) -> List[str]:
    """Reliability diagram, predicted-vs-reference scatter, per-dimension bars (needs matplotlib)."""
    try:  # Figure, not pyplot: no global backend switch in the caller's process (a notebook keeps its own)
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'zreward[plots]')")
        return []
    written = []
    grp = [f"{d}/{g}" for g, d in zip(groups, dims)]
    cal = pairwise_calibration(probs, ref, grp)
    if cal is not None:
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        m = cal["count"] > 0
        centers = 0.5 * (cal["edges"][1:] + cal["edges"][:-1])
        ax.bar(centers[m], cal["accuracy"][m], width=0.045, alpha=0.7, label="accuracy")
        ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(cal["confidence"][m], cal["accuracy"][m], "o-", color="C3", label="mean confidence")
        ax.set_xlabel("predicted preference probability (winner)")
        ax.set_ylabel("fraction of pairs ordered correctly")
        ax.set_title(f"pairwise calibration, ECE {report['pooled'].get('pairwise_ece', float('nan')):.3f}")
        ax.set_xlim(0.5, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "reliability.png"))
        fig.savefig(written[-1], dpi=120)
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    for d in sorted(set(dims)):
        sel = np.array([x == d for x in dims])
        ax.scatter(ref[sel], mean[sel], s=12, alpha=0.7, label=d)
    ax.set_xlabel("reference score")
    ax.set_ylabel("predicted mean")
    ax.set_title(f"pooled SRCC {report['pooled']['srcc']:.3f}, PLCC {report['pooled']['plcc']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "scatter.png"))
    fig.savefig(written[-1], dpi=120)
    names = [d for d in report if not d.startswith("_") and d != "pooled"]
    fig = Figure(figsize=(1.6 * len(names) + 2, 3.5))
    ax = fig.subplots()
    x = np.arange(len(names))
    for j, key in enumerate(("hpa", "margin_hpa", "srcc")):
        ax.bar(x + (j - 1) * 0.27, [report[n][key] for n in names], width=0.27, label=key)
    ax.set_xticks(x, names)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    srcc = [report[n]["srcc"] for n in names if np.isfinite(report[n]["srcc"])]  # NaN below 2 items or a tie
    ax.set_ylim(min([0.0] + [v - 0.05 for v in srcc]), 1)
    ax.legend(fontsize=8)
    ax.set_title("per dimension")
    fig.tight_layout()
    written.append(os.path.join(out_dir, "dimensions.png"))
    fig.savefig(written[-1], dpi=120)
    return written


def format_table(report: Dict) -> str:
    keys = ("hpa", "margin_hpa", "plcc", "srcc", "krcc", "pairwise_ece")
    lines = ["| set | n | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, r in report.items():
        if name.startswith("_"):
            continue
        vals = " | ".join(f"{r.get(k, float('nan')):.4f}" for k in keys)
        lines.append(f"| {name} | {r['n']} | {vals} |")
    return "\n".join(lines)


__all__ = ["evaluate_items", "format_table", "score_items", "write_plots"]
