"""A procedural text-to-image world where the truth is known.

A *scene* has one or two objects (shape, colour, size) on a ground under a sky with a sun; two
objects stand in a spatial relation.  The *prompt* describes the intended scene; a *candidate*
image renders it with graded defects for each rubric dimension:

* alignment     -- a wrong colour, a wrong shape, a swapped relation, a missing object;
* realism       -- sensor noise, colour banding, block artefacts, unnatural colour casts;
* aesthetics    -- off-centre composition, low contrast, clutter;
* plausibility  -- an object floating without support, objects interpenetrating, shadows cast
  towards the sun.

Each dimension's severity s in [0, 1] gives the latent true score ``5 - 4 s``; simulated raters
add a per-dimension bias and noise and answer in half points.  Everything is a function of the
seed (numpy ``Generator``), so the world is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 70, 215), "yellow": (235, 205, 40),
}
SIZES = {"small": 0.13, "big": 0.21}  # half-extent as a fraction of the image side
RELATIONS = ("left of", "right of")
GROUNDS = {"grass": (95, 150, 80), "sand": (200, 180, 130)}
SKY = (150, 190, 235)
GROUND_Y = 0.72  # the ground line (fraction of the height from the top)
DIMENSIONS = ("alignment", "realism", "aesthetics", "plausibility")


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of the width
    lift: float = 0.0  # gap between the object's bottom and the ground (fraction of the height)

    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class Scene:
    objects: List[Obj]
    relation: Optional[str]  # how objects[0] stands to objects[1]
    ground: str
    sun_left: bool  # the sun is in the top-left corner (shadows fall to the right)

    def prompt(self) -> str:
        if len(self.objects) == 1:
            return f"a {self.objects[0].words()} on {self.ground}"
        a, b = self.objects
        return f"a {a.words()} {self.relation} a {b.words()} on {self.ground}"


@dataclass
class Defects:
    """Severities in [0, 1] per dimension, and which concrete defects produce them."""

    alignment: List[str] = field(default_factory=list)  # "color", "shape", "relation", "missing"
    noise: float = 0.0
    banding: float = 0.0
    blocks: float = 0.0
    cast: float = 0.0
    offcenter: float = 0.0
    low_contrast: float = 0.0
    clutter: float = 0.0
    floating: float = 0.0
    overlap: float = 0.0
    wrong_shadow: bool = False

    def severity(self) -> Dict[str, float]:
        align = {"color": 0.35, "shape": 0.35, "relation": 0.45, "missing": 0.75}
        return {
            "alignment": min(1.0, sum(align[k] for k in self.alignment)),
            "realism": min(1.0, max(self.noise, self.banding, self.blocks, self.cast)
                           + 0.25 * (sum(v > 0 for v in (self.noise, self.banding, self.blocks, self.cast)) > 1)),
            "aesthetics": min(1.0, max(self.offcenter, self.low_contrast, self.clutter)),
            "plausibility": min(1.0, max(self.floating, self.overlap, 0.8 if self.wrong_shadow else 0.0)),
        }

    def latent(self) -> Dict[str, float]:
        return {d: 5.0 - 4.0 * s for d, s in self.severity().items()}


def sample_scene(rng: np.random.Generator) -> Scene:
    n = 1 if rng.random() < 0.3 else 2
    colors = rng.choice(list(COLORS), size=n, replace=False).tolist()
    objs = [Obj(shape=str(rng.choice(SHAPES)), color=c, size=str(rng.choice(list(SIZES))), x=0.0) for c in colors]
    rel = None
    if n == 1:
        objs[0].x = 0.5
    else:
        rel = str(rng.choice(RELATIONS))
        left, right = (0, 1) if rel == "left of" else (1, 0)
        objs[left].x, objs[right].x = 0.3, 0.7
    return Scene(objs, rel, str(rng.choice(list(GROUNDS))), bool(rng.random() < 0.5))


def sample_defects(rng: np.random.Generator, scene: Scene, level: float) -> Defects:
    """Random defects; ``level`` in [0, 1] scales how bad a candidate tends to be."""
    d = Defects()
    kinds = ["color", "shape"] + (["relation", "missing"] if len(scene.objects) == 2 else [])
    for k in kinds:
        if rng.random() < 0.45 * level:
            d.alignment.append(k)
    if "missing" in d.alignment and "relation" in d.alignment:
        d.alignment.remove("relation")

    def amount():
        return float(np.clip(rng.random() * level * 1.3, 0, 1)) if rng.random() < 0.6 * level + 0.1 else 0.0

    d.noise, d.banding, d.blocks, d.cast = amount(), amount() * (rng.random() < 0.5), amount() * (rng.random() < 0.5), \
        amount() * (rng.random() < 0.5)
    d.offcenter, d.low_contrast, d.clutter = amount(), amount() * (rng.random() < 0.6), amount() * (rng.random() < 0.6)
    d.floating = amount()
    d.overlap = amount() * (len(scene.objects) == 2)
    d.wrong_shadow = bool(rng.random() < 0.3 * level)
    return d


def candidate_scene(scene: Scene, defects: Defects, rng: np.random.Generator) -> Scene:
    """The scene actually drawn: the prompt's scene with its alignment errors applied."""
    objs = [replace(o) for o in scene.objects]
    rel = scene.relation
    if "color" in defects.alignment:
        i = int(rng.integers(len(objs)))
        used = {o.color for o in objs}
        objs[i].color = str(rng.choice([c for c in COLORS if c not in used]))
    if "shape" in defects.alignment:
        i = int(rng.integers(len(objs)))
        objs[i].shape = str(rng.choice([s for s in SHAPES if s != objs[i].shape]))
    if "relation" in defects.alignment and len(objs) == 2:
        objs[0].x, objs[1].x = objs[1].x, objs[0].x
        rel = "right of" if rel == "left of" else "left of"
    if "missing" in defects.alignment and len(objs) == 2:
        objs = [objs[int(rng.integers(2))]]
        objs[0].x = 0.5
        rel = None
    if defects.offcenter > 0:  # push the composition towards one edge
        shift = 0.32 * defects.offcenter * (1 if rng.random() < 0.5 else -1)
        for o in objs:
            o.x = float(np.clip(o.x + shift, 0.12, 0.88))
    if defects.overlap > 0 and len(objs) == 2:
        mid = 0.5 * (objs[0].x + objs[1].x)
        for o in objs:
            o.x = o.x + (mid - o.x) * min(1.0, 0.9 * defects.overlap + 0.1)
    if defects.floating > 0:
        objs[int(rng.integers(len(objs)))].lift = 0.05 + 0.25 * defects.floating
    return Scene(objs, rel, scene.ground, scene.sun_left)


# ---------------------------------------------------------------------------------------------
# rendering
def _grid(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy / size, xx / size


def _shape_mask(shape: str, cx: float, cy: float, half: float, yy, xx) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    # triangle pointing up, base at the bottom
    top, bottom = cy - half, cy + half
    t = np.clip((yy - top) / (2 * half), 0, 1)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= t * half)


def render(scene: Scene, defects: Defects, size: int = 64, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Draw the (candidate) scene with its realism / aesthetics / plausibility defects: HxWx3 uint8."""
    rng = rng or np.random.default_rng(0)
    yy, xx = _grid(size)
    img = np.zeros((size, size, 3), np.float32)
    sky = np.array(SKY, np.float32)
    horizon_tint = np.array((205, 225, 245), np.float32)
    frac = np.clip(yy / GROUND_Y, 0, 1)[..., None]
    img[:] = sky * (1 - frac) + horizon_tint * frac  # a smooth sky gradient (banding shows on it)
    ground = yy >= GROUND_Y
    img[ground] = np.array(GROUNDS[scene.ground], np.float32)
    sun_x = 0.12 if scene.sun_left else 0.88
    img[(xx - sun_x) ** 2 + (yy - 0.12) ** 2 <= 0.07 ** 2] = (255, 235, 120)
    if defects.clutter > 0:
        for _ in range(int(3 + 14 * defects.clutter)):
            cx, cy = rng.random(), rng.uniform(0.05, 0.95)
            h = rng.uniform(0.015, 0.035)
            col = np.array(COLORS[str(rng.choice(list(COLORS)))], np.float32) * 0.8 + 40
            img[_shape_mask(str(rng.choice(SHAPES)), cx, cy, h, yy, xx)] = col
    shadow_dir = 1.0 if scene.sun_left else -1.0
    if defects.wrong_shadow:
        shadow_dir = -shadow_dir
    for o in scene.objects:  # shadows first, on the ground, away from the sun
        half = SIZES[o.size]
        sx = o.x + shadow_dir * (half + 0.06)
        m = ((xx - sx) / (half + 0.06)) ** 2 + ((yy - (GROUND_Y + 0.03)) / 0.035) ** 2 <= 1
        img[m & ground] *= 0.55
    for o in scene.objects:
        half = SIZES[o.size]
        cy = GROUND_Y - half - o.lift
        m = _shape_mask(o.shape, o.x, cy, half, yy, xx)
        img[m] = np.array(COLORS[o.color], np.float32)
    # realism and aesthetics defects on the whole image
    if defects.low_contrast > 0:
        a = 0.75 * defects.low_contrast
        img = img * (1 - a) + img.mean((0, 1), keepdims=True) * a
    if defects.cast > 0:
        img = img * (1 - 0.6 * defects.cast) + np.array((255, 0, 255), np.float32) * 0.6 * defects.cast
    if defects.banding > 0:
        levels = max(2, int(round(24 - 20 * defects.banding)))
        img = np.round(img / 255 * (levels - 1)) / (levels - 1) * 255
    if defects.blocks > 0:
        b = 4 if defects.blocks < 0.5 else 8
        small = img.reshape(size // b, b, size // b, b, 3).mean((1, 3))
        blocky = np.repeat(np.repeat(small, b, 0), b, 1)
        img = img * (1 - defects.blocks) + blocky * defects.blocks
    if defects.noise > 0:
        img = img + rng.normal(0, 70 * defects.noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# raters
@dataclass
class RaterPanel:
    """Raters with a per-dimension bias and noise; scores snap to half points in [1, 5]."""

    bias: Dict[str, float] = field(default_factory=lambda: {d: 0.0 for d in DIMENSIONS})
    noise: Dict[str, float] = field(default_factory=lambda: {"alignment": 0.45, "realism": 0.55,
                                                             "aesthetics": 0.7, "plausibility": 0.55})
    rater_bias_sd: float = 0.2

    def rate(self, latent: Dict[str, float], n: int, rng: np.random.Generator) -> Dict[str, List[float]]:
        out = {}
        for d, v in latent.items():
            personal = rng.normal(0, self.rater_bias_sd, n)
            raw = v + self.bias.get(d, 0.0) + personal + rng.normal(0, self.noise.get(d, 0.5), n)
            out[d] = [float(x) for x in np.clip(np.round(raw * 2) / 2, 1.0, 5.0)]
        return out
