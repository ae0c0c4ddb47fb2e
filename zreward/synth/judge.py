"""A pixel-only analytic judge for images of the synthetic world.

It sees the image and the prompt text -- never the scene that was drawn or its defects -- and
estimates each rubric dimension from colour segmentation, geometry and image statistics, using the
world's rendering conventions (palette, ground line, sun).  It is what scores images a generator
produces later, where no ground truth exists.  ``agreement`` reports how well it tracks the latent
scores on rendered images.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .world import COLORS, DIMENSIONS, GROUND_Y, GROUNDS, SKY

_OBJ = r"a (small|big) (red|green|blue|yellow) (circle|square|triangle)"
_PROMPT = re.compile(rf"^{_OBJ}(?: (left of|right of) {_OBJ})? on (grass|sand)$")


def parse_prompt(prompt: str) -> Optional[dict]:
    m = _PROMPT.match(prompt.strip())
    if not m:
        return None
    g = m.groups()
    objs = [dict(size=g[0], color=g[1], shape=g[2])]
    if g[3]:
        objs.append(dict(size=g[4], color=g[5], shape=g[6]))
    return dict(objects=objs, relation=g[3], ground=g[7])


def _score(severity: float) -> float:
    return float(5.0 - 4.0 * np.clip(severity, 0.0, 1.0))


def _components(f: np.ndarray, sun_left: bool):
    """Objects and clutter: connected regions of each palette colour above the ground line, outside
    the sun, in a median-filtered image whose global cast and contrast loss were undone."""
    size = f.shape[0]
    smooth = ndimage.median_filter(f, size=(3, 3, 1))
    pal = np.array(list(COLORS.values()), np.float32)
    dist = np.linalg.norm(smooth[:, :, None, :] - pal[None, None], axis=-1)  # [H, W, C]
    best = dist.argmin(-1)
    chroma = smooth.max(-1) - smooth.min(-1)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    sun_x = 0.12 if sun_left else 0.88
    region = (yy < GROUND_Y) & ((xx - sun_x) ** 2 + (yy - 0.12) ** 2 > 0.085 ** 2)
    ok = region & (dist.min(-1) < 75) & (chroma > 95)
    found = []
    for ci, name in enumerate(COLORS):
        lab, n = ndimage.label(ok & (best == ci))
        for k in range(1, n + 1):
            ys, xs = np.nonzero(lab == k)
            if len(ys) < 3:
                continue
            h = (ys.max() - ys.min() + 1) / size
            w = (xs.max() - xs.min() + 1) / size
            found.append(dict(color=name, area=len(ys) / size ** 2, h=h, w=w, x=(xs.mean() + 0.5) / size,
                              bottom=(ys.max() + 1) / size,
                              fill=len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))))
    big = [c for c in found if c["h"] >= 0.16 and c["w"] >= 0.12]
    small = [c for c in found if not (c["h"] >= 0.16 and c["w"] >= 0.12)]
    return big, small


def _shape(c: dict) -> str:
    # fill of the bounding box: square ~1 (0.9 after the median filter), circle pi/4, triangle 1/2
    return "square" if c["fill"] >= 0.86 else ("circle" if c["fill"] >= 0.64 else "triangle")


def _banding_and_blocks(f: np.ndarray, size: int, gy: int):
    """Banding from the quantisation step of the sky's vertical profile (L levels -> step 255/(L-1),
    rendered L = 24 - 20 s); blocks from how much larger the vertical gradient is on block boundaries
    than inside blocks (a blend a of b x b block means gives a ratio of (1 - a + a b) / (1 - a))."""
    lum = f.mean(-1)
    rows = slice(int(0.22 * size), gy - 2)
    profile = np.median(lum[rows], axis=1)  # median over columns ignores objects and clutter
    steps = np.abs(np.diff(profile))
    jumps = steps[steps > 0.75]
    banding = 0.0
    if len(jumps) and (steps <= 0.75).mean() > 0.5:  # mostly flat rows with a few jumps: quantised
        levels = 255.0 / np.median(jumps) + 1
        banding = float(np.clip((24 - levels) / 20, 0.05, 1))
    v = np.median(np.abs(np.diff(lum[rows], axis=0)), axis=1)  # per row boundary
    idx = np.arange(rows.start, rows.start + len(v)) + 1  # index of the row below each boundary
    blocks = 0.0
    for b in (4, 8):
        on = v[idx % b == 0]
        off = v[idx % b != 0]
        if len(on) and len(off) and on.mean() > 0.2:
            r = on.mean() / max(off.mean(), 1e-3)
            if r > 1.5:
                blocks = max(blocks, float(np.clip((r - 1) / (r - 1 + b), 0, 1)) * (1.6 if b == 4 else 1.0))
    return banding, float(np.clip(blocks, 0, 1))


def judge(image: np.ndarray, prompt: str) -> Dict[str, float]:
    """Estimated score (1..5) per dimension for one HxWx3 uint8 image of the world."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {img.dtype} {img.shape}")
    spec = parse_prompt(prompt)
    if spec is None:
        raise ValueError(f"prompt {prompt!r} is not from the synthetic world's grammar")
    size = img.shape[0]
    f = img.astype(np.float32)
    gy = int(GROUND_Y * size)

    # --- global colour cast and contrast loss (measured on sky and ground), then undone
    sky_mean = f[2:int(0.2 * size), :].reshape(-1, 3).mean(0)
    cast = float(np.clip((sky_mean[0] + sky_mean[2] - 2 * sky_mean[1]) / 255 / 0.9 - 0.05, 0, 1))
    ground_color = np.array(GROUNDS[spec["ground"]], np.float32)
    expect = np.linalg.norm(np.array(SKY, np.float32) - ground_color)
    seen = np.linalg.norm(f[int(0.3 * size):int(0.45 * size)].reshape(-1, 3).mean(0)
                          - f[gy + 2:].reshape(-1, 3).mean(0))
    contrast_loss = float(np.clip(1 - seen / expect, 0, 0.8))
    g = f
    if cast > 0.05:
        k = min(0.6 * cast, 0.9)
        g = (g - np.array((255, 0, 255), np.float32) * k) / (1 - k)
    if contrast_loss > 0.05:
        g = (g - contrast_loss * g.mean((0, 1), keepdims=True)) / (1 - contrast_loss)
    g = np.clip(g, 0, 255)
    top = f[: int(0.25 * size)]
    bright = (top[..., 0] > 200) & (top[..., 1] > 180) & (top[..., 2] < 190) & (top[..., 0] - top[..., 2] > 60)
    sun_left = bright[:, : size // 2].sum() >= bright[:, size // 2:].sum()
    objs, clutter = _components(g, sun_left)

    # --- realism: noise, banding, blocks (measured on the sky), colour cast
    sky = f[int(0.25 * size):gy - 2, :]
    resid = sky - ndimage.median_filter(sky, size=(3, 3, 1))
    noise = np.median(np.abs(resid)) * 1.4826 / 0.6 / 70  # MAD of the residual -> rendered sigma / 70
    banding, blocks = _banding_and_blocks(f, size, gy) if noise < 0.2 else (0.0, 0.0)
    realism = _score(max(noise, banding, blocks, cast))

    # --- aesthetics: off-centre composition, low contrast, clutter
    offcenter = float(np.clip((abs(np.mean([o["x"] for o in objs]) - 0.5) - 0.03) / 0.3, 0, 1)) if objs else 0.0
    low_contrast = float(np.clip(contrast_loss / 0.75 - 0.1, 0, 1))
    clutter_sev = float(np.clip((len(clutter) - 1) / 12, 0, 1))
    aesthetics = _score(max(offcenter, low_contrast, clutter_sev))

    # --- plausibility: floating, interpenetration, shadow direction
    floating = max([float(np.clip((GROUND_Y - o["bottom"] - 0.04) / 0.25, 0, 1)) for o in objs], default=0.0)
    overlap = 0.0
    if len(objs) >= 2:
        a, b = sorted(objs, key=lambda o: -o["area"])[:2]
        gap = abs(a["x"] - b["x"]) - (a["w"] + b["w"]) / 2
        overlap = float(np.clip(-gap / 0.15, 0, 1))
    band = g[gy: min(size, gy + int(0.08 * size))].mean(-1)
    dark = band < 0.75 * np.median(band)
    wrong_shadow = 0.0
    if objs and dark.any():
        shadow_x = (np.nonzero(dark)[1].mean() + 0.5) / size
        obj_x = np.mean([o["x"] for o in objs])
        if (shadow_x - obj_x) * (1 if sun_left else -1) < -0.02:
            wrong_shadow = 0.8
    plausibility = _score(max(floating, overlap, wrong_shadow))

    # --- alignment: detected objects against the prompt
    want = spec["objects"]
    sev = 0.0
    found = sorted(objs, key=lambda o: -o["area"])[: max(len(want), 1)]
    if len(want) == 2 and len(found) < 2:
        sev += 0.75
    wanted_colors = [w["color"] for w in want]
    for o in found:
        if o["color"] not in wanted_colors:
            sev += 0.35
    for w in want:
        match = [o for o in found if o["color"] == w["color"]]
        if match and _shape(match[0]) != w["shape"]:
            sev += 0.35
    if len(want) == 2 and len(found) == 2 and spec["relation"]:
        by = {o["color"]: o["x"] for o in found}
        if want[0]["color"] in by and want[1]["color"] in by:
            left = by[want[0]["color"]] < by[want[1]["color"]]
            if left != (spec["relation"] == "left of"):
                sev += 0.45
    alignment = _score(min(sev, 1.0))
    return {"alignment": alignment, "realism": realism, "aesthetics": aesthetics, "plausibility": plausibility}


def agreement(samples: Sequence, dims: Sequence[str] = DIMENSIONS) -> Dict[str, float]:
    """SRCC of the judge's scores with the latent scores, per dimension and pooled."""
    from scipy.stats import spearmanr

    est: Dict[str, List[float]] = {d: [] for d in dims}
    true: Dict[str, List[float]] = {d: [] for d in dims}
    for s in samples:
        j = judge(s.image, s.prompt)
        for d in dims:
            est[d].append(j[d])
            true[d].append(s.latent[d])
    out = {d: float(spearmanr(est[d], true[d])[0]) for d in dims}
    out["pooled"] = float(spearmanr(sum(est.values(), []), sum(true.values(), []))[0])
    return out
