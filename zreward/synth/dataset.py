"""Build the synthetic data set: prompts, candidate images, latent scores, rater labels, descriptions.

For each prompt, ``candidates`` images are rendered at spread-out defect levels, so same-prompt
pairs exist.  Every (image, dimension) becomes a :class:`zreward.data.RatedItem` whose ``image`` is
the uint8 array: training items carry one rater's score (as in the report), test items the ratings
of ``test_raters`` raters (the reference is their trimmed mean).  ``latent`` holds the true score
and ``description`` a short text of what is visible (the perception pre-training target and the
content a reasoning trace should reproduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from ..data import RatedItem
from .world import DIMENSIONS, Defects, RaterPanel, Scene, candidate_scene, render, sample_defects, sample_scene


@dataclass
class WorldConfig:
    n_prompts: int = 200
    candidates: int = 4
    image_size: int = 64
    test_fraction: float = 0.25
    test_raters: int = 5
    seed: int = 0
    raters: RaterPanel = field(default_factory=RaterPanel)


@dataclass
class SynthSample:
    """One rendered candidate image with everything known about it."""

    prompt: str
    group: str
    image: np.ndarray
    scene: Scene  # what was drawn
    defects: Defects
    latent: Dict[str, float]
    ratings: Dict[str, List[float]]
    split: str

    def description(self) -> str:
        return describe(self.scene, self.defects)


def _level_words(v: float) -> str:
    return "none" if v <= 0.05 else ("low" if v < 0.4 else ("medium" if v < 0.7 else "high"))


def describe(scene: Scene, d: Defects) -> str:
    """What a careful observer would write: objects, relation, ground, then the visible defects
    (only those present, with a level; "clean" when there are none)."""
    if len(scene.objects) == 1:
        objs = f"a {scene.objects[0].words()}"
    else:
        a, b = scene.objects
        objs = f"a {a.words()} {scene.relation} a {b.words()}"
    seen = [(name, v) for name, v in (("noise", d.noise), ("banding", d.banding), ("blocks", d.blocks),
                                      ("cast", d.cast), ("offcenter", d.offcenter), ("contrast", d.low_contrast),
                                      ("clutter", d.clutter), ("floating", d.floating), ("overlap", d.overlap))
            if v > 0.05]
    words = [f"{name} {_level_words(v)}" for name, v in seen]
    if d.wrong_shadow:
        words.append("shadow wrong")
    return f"{objs} on {scene.ground} . " + (" , ".join(words) if words else "clean") + " ."


#: every word the prompts and descriptions use (for a word-level tokenizer)
WORLD_WORDS = sorted({
    "a", "on", "of", "left", "right", "small", "big", "circle", "square", "triangle", "red", "green", "blue", "yellow",
    "grass", "sand", "noise", "banding", "blocks", "cast", "offcenter", "contrast", "clutter", "floating", "overlap",
    "shadow", "none", "low", "medium", "high", "good", "wrong", "clean", ".", ",",
})


def build_world(cfg: WorldConfig) -> List[SynthSample]:
    rng = np.random.default_rng(cfg.seed)
    n_test = int(round(cfg.n_prompts * cfg.test_fraction))
    out: List[SynthSample] = []
    for p in range(cfg.n_prompts):
        split = "test" if p >= cfg.n_prompts - n_test else "train"
        scene = sample_scene(rng)
        levels = np.linspace(0.0, 1.0, cfg.candidates) if cfg.candidates > 1 else np.array([0.5])
        levels = np.clip(levels + rng.uniform(-0.15, 0.15, len(levels)), 0, 1)
        for c, lvl in enumerate(levels):
            d = sample_defects(rng, scene, float(lvl))
            drawn = candidate_scene(scene, d, rng)
            img = render(drawn, d, cfg.image_size, rng)
            latent = d.latent()
            n_r = cfg.test_raters if split == "test" else 1
            out.append(SynthSample(prompt=scene.prompt(), group=f"p{p}", image=img, scene=drawn, defects=d,
                                   latent=latent, ratings=cfg.raters.rate(latent, n_r, rng), split=split))
    return out


def to_items(samples: List[SynthSample], split: str) -> List[RatedItem]:
    """Rated items (one per image and dimension) of one split; ``id`` is ``<group>/<candidate>``."""
    items = []
    counters: Dict[str, int] = {}
    for s in samples:
        if s.split != split:
            continue
        k = counters.get(s.group, 0)
        counters[s.group] = k + 1
        for d in DIMENSIONS:
            rs = s.ratings[d]
            items.append(RatedItem(prompt=s.prompt, image=s.image, dimension=d,
                                   score=rs[0] if len(rs) == 1 else None, ratings=list(rs) if len(rs) > 1 else [],
                                   group=s.group, id=f"{s.group}/{k}"))
    return items
