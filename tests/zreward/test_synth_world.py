"""The synthetic world: determinism, label statistics, descriptions, and the analytic judge."""

import numpy as np
import pytest

from zreward.synth.dataset import WORLD_WORDS, WorldConfig, build_world, to_items
from zreward.synth.judge import agreement, judge, parse_prompt
from zreward.synth.world import DIMENSIONS, Defects, RaterPanel, Scene, Obj, render


def test_world_is_deterministic_per_seed():
    a = build_world(WorldConfig(n_prompts=12, seed=3))
    b = build_world(WorldConfig(n_prompts=12, seed=3))
    c = build_world(WorldConfig(n_prompts=12, seed=4))
    assert all(np.array_equal(x.image, y.image) and x.ratings == y.ratings and x.prompt == y.prompt
               for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_splits_groups_and_rating_counts():
    cfg = WorldConfig(n_prompts=40, candidates=4, test_fraction=0.25, test_raters=5, seed=0)
    samples = build_world(cfg)
    assert len(samples) == 160
    train, test = to_items(samples, "train"), to_items(samples, "test")
    assert len(train) == 30 * 4 * 4 and len(test) == 10 * 4 * 4  # prompts x candidates x dimensions
    assert {it.group for it in train}.isdisjoint({it.group for it in test})  # held-out prompts
    assert all(it.score is not None and not it.ratings for it in train)  # one rater per training item
    assert all(len(it.ratings) == 5 and it.score is None for it in test)  # references: trimmed means of 5
    for it in train + test:
        for r in ([it.score] if it.score is not None else it.ratings):
            assert 1.0 <= r <= 5.0 and r * 2 == int(r * 2)  # half points
    groups = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    assert all(len(g) == 4 and len({x.prompt for x in g}) == 1 for g in groups.values())


def test_rater_statistics_follow_the_configuration():
    rng = np.random.default_rng(0)
    panel = RaterPanel(bias={"alignment": 0.5, "realism": -0.3, "aesthetics": 0.0, "plausibility": 0.0},
                       noise={"alignment": 0.3, "realism": 0.6, "aesthetics": 0.5, "plausibility": 0.5},
                       rater_bias_sd=0.1)
    latent = {d: 3.0 for d in DIMENSIONS}
    r = panel.rate(latent, 20000, rng)
    assert np.mean(r["alignment"]) - 3.0 == pytest.approx(0.5, abs=0.03)
    assert np.mean(r["realism"]) - 3.0 == pytest.approx(-0.3, abs=0.03)
    # spread: noise and personal bias in quadrature, plus half-point rounding (variance 1/48)
    assert np.std(r["alignment"]) == pytest.approx(np.sqrt(0.3 ** 2 + 0.1 ** 2 + 1 / 48), rel=0.08)
    assert np.std(r["realism"]) == pytest.approx(np.sqrt(0.6 ** 2 + 0.1 ** 2 + 1 / 48), rel=0.08)


def test_latent_scores_span_the_scale_and_candidates_differ():
    samples = build_world(WorldConfig(n_prompts=60, seed=1))
    for d in DIMENSIONS:
        v = np.array([s.latent[d] for s in samples])
        assert v.min() <= 2.0 and v.max() == 5.0 and len(np.unique(np.round(v, 1))) > 5
    # the candidates of a prompt are spread out: clean ones score higher on average than the worst
    first = np.mean([sum(s.latent.values()) for s in samples[0::4]])
    last = np.mean([sum(s.latent.values()) for s in samples[3::4]])
    assert first > last + 3


def test_descriptions_use_the_world_vocabulary():
    samples = build_world(WorldConfig(n_prompts=20, seed=2))
    vocab = set(WORLD_WORDS)
    for s in samples:
        words = s.description().split() + s.prompt.split()
        assert set(words) <= vocab, set(words) - vocab
    assert "shadow wrong" in " ".join(s.description() for s in samples if s.defects.wrong_shadow)
    assert any(s.description().endswith("clean .") for s in samples)


def test_judge_agrees_with_latent_scores():
    samples = build_world(WorldConfig(n_prompts=100, seed=11))
    agree = agreement(samples)
    # measured on seed 0 (150 prompts): alignment 0.80, realism 0.86, aesthetics 0.63, plausibility 0.71
    assert agree["pooled"] > 0.6
    for d in DIMENSIONS:
        assert agree[d] > 0.5, (d, agree)


def test_judge_on_hand_made_scenes():
    scene = Scene([Obj("circle", "red", "big", 0.3), Obj("square", "blue", "small", 0.7)], "left of", "grass", True)
    clean = judge(render(scene, Defects(), 64), scene.prompt())
    assert all(v >= 4.5 for v in clean.values()), clean
    swapped = "a small blue square left of a big red circle on grass"
    assert judge(render(scene, Defects(), 64), swapped)["alignment"] <= 3.5
    noisy = judge(render(scene, Defects(noise=0.9), 64, np.random.default_rng(0)), scene.prompt())
    assert noisy["realism"] <= 2.0
    lifted = Scene([Obj("circle", "red", "big", 0.3, lift=0.25), Obj("square", "blue", "small", 0.7)], "left of",
                   "grass", True)
    assert judge(render(lifted, Defects(floating=0.8), 64), scene.prompt())["plausibility"] <= 3.0
    assert parse_prompt("a small red circle on sand") is not None
    with pytest.raises(ValueError, match="not from the synthetic world's grammar"):
        judge(render(scene, Defects(), 64), "a photo of a cat")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        judge(np.zeros((64, 64)), scene.prompt())
