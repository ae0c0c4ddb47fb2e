"""Metrics against scipy and hand-computed cases, ties included."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from zreward import metrics as M

BINS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)


def test_hpa_hand_case_with_ties():
    # group g1: refs 1, 2, 2 -> pairs (0,1), (0,2) count; (1,2) is a human tie and is skipped
    # group g2: refs 5, 3 -> one pair; the prediction ties it -> wrong under the SPEC
    pred = [1.0, 2.0, 0.5, 4.0, 4.0]
    ref = [1.0, 2.0, 2.0, 5.0, 3.0]
    groups = ["g1", "g1", "g1", "g2", "g2"]
    # (0,1): dp=-1, dr=-1 -> correct; (0,2): dp=0.5, dr=-1 -> wrong; (3,4): dp=0 -> tie
    assert M.hpa(pred, ref, groups) == pytest.approx(1 / 3)
    assert M.hpa(pred, ref, groups, pred_ties="half") == pytest.approx(1.5 / 3)
    assert M.hpa(pred, ref, groups, pred_ties="skip") == pytest.approx(1 / 2)
    # margin 0.5: only |dr| > 0.5 -> (0,1) |1|, (0,2) |1|, (3,4) |2| all stay; margin 1.0 keeps only (3,4)
    assert M.hpa(pred, ref, groups, margin=1.0) == 0.0
    assert math.isnan(M.hpa([1.0, 2.0], [3.0, 3.0], ["a", "a"]))
    with pytest.raises(ValueError, match="pred_ties must be one of"):
        M.hpa(pred, ref, groups, pred_ties="random")
    with pytest.raises(ValueError, match="same length"):
        M.hpa(pred, ref[:4], groups)


def test_hpa_pairs_never_cross_groups():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = torch.tensor([2.0, 1.0, 2.0, 1.0])
    assert M.hpa(pred, ref, [0, 0, 1, 1]) == 0.0  # both within-group pairs are inverted
    # grouped the other way, both pairs are human ties (2 vs 2, 1 vs 1): no pair counts, HPA is undefined
    assert math.isnan(M.hpa(pred, ref, [0, 1, 0, 1]))


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=60), 1)  # rounding makes ties
    y = np.round(x + rng.normal(scale=0.7, size=60), 0)
    assert M.plcc(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.srcc(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert M.krcc(x, y) == pytest.approx(stats.kendalltau(x, y)[0])
    assert math.isnan(M.plcc(np.ones(5), np.arange(5.0)))


def test_logistic_plcc_linearises_a_monotone_map():
    x = np.linspace(-3, 3, 50)
    y = 1 + 4 / (1 + np.exp(-2 * x))  # a logistic function of x
    assert M.plcc(x, y) < 0.98
    assert M.plcc(x, y, logistic=True) > 0.999


def test_torch_tensors_of_any_dtype():
    """Predictions straight from a model: bf16 tensors failed ('Got unsupported ScalarType BFloat16',
    numpy has none); fp16/bf16/fp32 tensors and int tensors for groups give the float64 results."""
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(1, 10, 40) / 2.0, rng.integers(1, 10, 40) / 2.0  # exact in bf16
    groups, dims = np.repeat(np.arange(10), 4), ["realism"] * 40
    want = M.evaluate(pred, ref, groups, dims)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        got = M.evaluate(torch.tensor(pred).to(dt), torch.tensor(ref).to(dt), torch.tensor(groups), dims)
        assert got == want, dt


def test_small_sets_give_nan_not_an_error():
    """A dimension with 3 items (a small eval set, a periodic evaluation) stopped the whole evaluation:
    scipy's curve_fit raises a TypeError for fewer points than the logistic's 4 parameters."""
    pred, ref = np.array([1.0, 2.0, 3.5, 4.0, 5.0, 6.0]), np.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
    for n in (1, 2, 3, 4):  # four points are fit exactly (always 1.0): NaN too
        assert np.isnan(M.plcc(pred[:n], ref[:n], logistic=True)), n
    assert np.isfinite(M.plcc(pred[:5], ref[:5], logistic=True))
    rep = M.evaluate(pred, ref, ["a", "a", "a", "b", "b", "b"], ["realism"] * 3 + ["alignment"] * 3)
    assert np.isnan(rep["realism"]["plcc_logistic"]) and np.isfinite(rep["pooled"]["plcc_logistic"])
    assert rep["realism"]["srcc"] == pytest.approx(1.0) and rep["realism"]["hpa"] == 1.0


def test_distribution_metrics_hand_cases():
    t = np.zeros((2, 9))
    p = np.zeros((2, 9))
    t[0, 0] = 1.0
    p[0, 8] = 1.0  # all mass at 1.0 vs all at 5.0: W1 = 4, JS = 1 bit
    t[1, 2] = t[1, 4] = 0.5
    p[1] = t[1]
    assert M.wasserstein1(t, p, BINS).tolist() == pytest.approx([4.0, 0.0])
    assert M.js_divergence(t, p).tolist() == pytest.approx([1.0, 0.0])
    kl = M.kl_divergence(t, p)
    assert kl[1] == pytest.approx(0.0) and kl[0] > 20  # p floored at eps where t has mass
    q = np.full(9, 1 / 9)
    assert M.kl_divergence(t[1:], q[None])[0] == pytest.approx(math.log(9 / 2))


def test_rater_histograms():
    h = M.rater_histograms([[1, 1, 3], [5.0]], BINS)
    assert h[0].tolist() == pytest.approx([2 / 3, 0, 0, 0, 1 / 3, 0, 0, 0, 0])
    assert h[1, 8] == 1.0


def test_preference_probability_and_ece():
    a = np.zeros(9)
    a[6] = 1.0  # 4.0 for sure
    b = np.zeros(9)
    b[2] = b[6] = 0.5  # 2.0 or 4.0
    assert M.preference_probability(a[None], b[None])[0] == pytest.approx(0.5 + 0.5 * 0.5)
    assert M.preference_probability(a[None], a[None])[0] == pytest.approx(0.5)
    # two pairs, both predicted with confidence 0.75: one right, one wrong -> |0.5 - 0.75| = 0.25
    probs = np.stack([a, b, a, b])
    ref = [4.0, 2.0, 2.0, 4.0]
    groups = ["x", "x", "y", "y"]
    assert M.pairwise_ece(probs, ref, groups) == pytest.approx(0.25)
    # a model that gives every image the same distribution predicts 0.5 for every pair: calibrated, ECE 0
    # (the tie counted as "the first item wins", so ECE was 0.5 whichever order the items came in)
    same = np.tile(np.full(9, 1 / 9), (4, 1))
    for order in ([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]):
        assert M.pairwise_ece(same, order, [0] * 4) == pytest.approx(0.0)
        cal = M.pairwise_calibration(same, order, [0] * 4)
        assert cal["count"][0] == 6 and cal["accuracy"][0] == pytest.approx(0.5)
    # equal but non-uniform distributions give 0.5 only up to rounding (about a third exactly)
    rand = np.tile(np.random.default_rng(0).dirichlet(np.ones(9)), (4, 1))
    assert M.pairwise_ece(rand, [4.0, 3.0, 2.0, 1.0], [0] * 4) == pytest.approx(0.0)


def test_trimmed_mean():
    assert M.trimmed_mean([[1, 2, 3, 10]])[0] == pytest.approx(2.5)
    assert M.trimmed_mean([[4, 5]])[0] == pytest.approx(4.5)
    t = M.trimmed_mean(torch.tensor([[1.0, 5.0, 3.0]]))
    assert isinstance(t, torch.Tensor) and float(t[0]) == 3.0
    ragged = M.trimmed_mean(np.array([[1, 2, 3, 0.0], [2, 2, 9, 9]]), mask=np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert ragged.tolist() == pytest.approx([2.0, 5.5])
    # a row without a valid rating has no reference (it read 0.0); no ratings at all alike
    empty = M.trimmed_mean([[1, 2, 3], [4, 5, 6]], mask=[[1, 1, 1], [0, 0, 0]])
    assert empty[0] == pytest.approx(2.0) and np.isnan(empty[1])
    assert torch.isnan(M.trimmed_mean(torch.zeros(2, 0))).all()
    with pytest.raises(ValueError, match=r"mask must have the ratings' shape \(2, 3\), got \(1, 3\)"):
        M.trimmed_mean([[1, 2, 3], [4, 5, 6]], mask=[[1, 1, 0]])


def test_evaluate_pooled_and_per_dimension():
    rng = np.random.default_rng(0)
    n = 40
    ref = rng.integers(1, 6, size=n).astype(float)
    pred = ref + rng.normal(scale=0.3, size=n)
    groups = [f"p{i // 4}" for i in range(n)]
    dims = ["alignment", "realism"] * (n // 2)
    probs = np.full((n, 9), 1 / 9)
    hist = M.rater_histograms([[r] for r in ref], BINS)
    rep = M.evaluate(pred, ref, groups, dims, probs=probs, rater_hist=hist)
    assert set(rep) == {"pooled", "alignment", "realism"}
    assert rep["pooled"]["n"] == n and rep["alignment"]["n"] == n // 2
    for key in ("hpa", "margin_hpa", "plcc", "plcc_logistic", "srcc", "krcc", "pairwise_ece", "kl", "js", "wasserstein1"):
        assert key in rep["pooled"]
    # pairs never mix dimensions: the pooled HPA equals the pair-weighted mean of the per-dimension ones
    sub = [M.hpa(pred[i::2], ref[i::2], groups[i::2]) for i in (0, 1)]
    assert min(sub) <= rep["pooled"]["hpa"] <= max(sub)
    assert rep["pooled"]["srcc"] == pytest.approx(stats.spearmanr(pred, ref)[0])


def test_distribution_metrics_refuse_what_is_not_a_distribution():
    """An unnormalised or negative row, an item without ratings and a rating off the scale gave numbers
    (KL 5.5 for a histogram summing to 4, a 7 counted as a 5, an all-zero histogram) without an error."""
    u = np.full((1, 9), 1 / 9)
    for fn in (M.kl_divergence, M.js_divergence, lambda t, p: M.wasserstein1(t, p, BINS)):
        with pytest.raises(ValueError, match="target_hist must hold probability rows.*row 0 sums to 4"):
            fn(u * 4, u)
        with pytest.raises(ValueError, match="pred_probs must hold probability rows.*minimum -0.5"):
            fn(u, np.array([[1.5, -0.5] + [0.0] * 7]))
        assert fn(u, u)[0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="item 1 has no ratings"):
        M.rater_histograms([[3.0], []], BINS)
    with pytest.raises(ValueError, match=r"item 0 has the rating 7.0, outside the bins' range \[1.0, 5.0\]"):
        M.rater_histograms([[7.0]], BINS)
    with pytest.raises(ValueError, match="item 0 has the rating nan"):
        M.rater_histograms([[float("nan")]], BINS)
    assert M.rater_histograms([[3.2, 5.0]], BINS)[0].tolist() == [0, 0, 0, 0, 0.5, 0, 0, 0, 0.5]  # nearest bin


def test_gsb():
    from zreward.metrics import gsb

    assert gsb(["G", "G", "S", "B"]) == 0.25  # (2 - 1) / 4
    assert gsb(["good", "Same", "bad", "BAD"]) == -0.25
    assert gsb([1, 1, 1, 0, -1]) == 0.4
    assert gsb(good=3, same=1, bad=0) == 0.75
    assert gsb(good=0, same=5, bad=0) == 0.0
    assert np.isnan(gsb([]))
    with pytest.raises(ValueError, match="judgment 1: expected G, S or B, got 'better'"):
        gsb(["G", "better"])
    with pytest.raises(ValueError, match="judgment 0: expected G/S/B or"):
        gsb([2])
    with pytest.raises(ValueError, match="not both"):
        gsb(["G"], good=1)
    with pytest.raises(ValueError, match="bad must be a non-negative integer count"):
        gsb(good=1, bad=-1)


def test_bad_inputs_are_named():
    """A NaN prediction used to count as a wrong pair in HPA and then stop scipy with 'array must not
    contain infs or NaNs' (no argument named); groups longer than dimensions were cut silently."""
    pred, ref = np.array([3.0, np.nan, 2.0, 4.0]), np.array([3.0, 3.5, 2.0, 4.5])
    groups, dims = ["a", "a", "b", "b"], ["realism"] * 4
    with pytest.raises(ValueError, match=r"pred must be finite; found nan at flat index 1 \(1 non-finite"):
        M.evaluate(pred, ref, groups, dims)
    for bad in (float("nan"), -1.0, "0.5"):  # NaN gave HPA NaN, a string a numpy ufunc error
        with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
            M.hpa(ref, ref, groups, margin=bad)
    probs = np.full((4, 9), 1 / 9)
    for bad in (0, 2.5, True):  # numpy's messages named neither the argument nor the function
        with pytest.raises(ValueError, match="n_bins must be a positive integer"):
            M.pairwise_ece(probs, ref, groups, n_bins=bad)
    with pytest.raises(ValueError, match="pred must be finite"):
        M.hpa(pred, ref, groups)
    with pytest.raises(ValueError, match="ref must be finite; found inf"):
        M.srcc(ref, np.array([1.0, np.inf, 2.0, 3.0]))
    with pytest.raises(ValueError, match="probs must be finite"):
        M.evaluate(ref, ref, groups, dims, probs=np.full((4, 9), np.nan))
    with pytest.raises(ValueError, match="groups and dimensions must have one entry per item, got 5 and 4"):
        M.evaluate(ref, ref, groups + ["c"], dims)
    for f in (M.plcc, M.srcc, M.krcc):  # scipy's messages were about broadcasting and concatenation
        with pytest.raises(ValueError, match=r"pred and ref must have the same shape, got \(3,\) and \(4,\)"):
            f(ref[:3], ref)
    with pytest.raises(ValueError, match=r"target_hist and pred_probs must have the same shape"):
        M.kl_divergence(np.ones((2, 9)) / 9, np.ones((3, 9)) / 9)


def test_numpy_scalar_options_are_taken():
    """``margin=np.float32(0.5)`` and ``n_bins=np.int64(5)`` were refused as not numbers."""
    pred, ref, groups = [1.0, 2.0, 3.5, 2.0], [1.0, 2.0, 3.0, 4.0], [0, 0, 0, 0]
    assert M.hpa(pred, ref, groups, margin=np.float32(0.5)) == M.hpa(pred, ref, groups, margin=0.5)
    probs = torch.softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(0)), -1)
    assert M.pairwise_ece(probs, ref, groups, n_bins=np.int64(5)) == M.pairwise_ece(probs, ref, groups, n_bins=5)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.pairwise_ece(probs, ref, groups, n_bins=np.float64(5.0))


def test_generators_and_lists_of_scalar_tensors_are_read_like_arrays():
    """A generator gave "float() argument must be ... not 'generator'" (a 0-d object array), and a
    generator of group labels one group of length 1 ("must have the same length ... (1,)")."""
    import torch

    from zreward.metrics import hpa, pairwise_ece, plcc, srcc

    pred = [torch.tensor(v) for v in (3.0, 2.0, 4.0, 1.0, 5.0, 2.5)]  # e.g. out.reward[i] collected in a loop
    ref = [3.0, 2.5, 4.5, 1.0, 4.0, 2.0]
    groups = ["a", "a", "b", "b", "b", "a"]
    probs = np.random.default_rng(0).dirichlet(np.ones(9), 6)
    want = (srcc(np.array([float(x) for x in pred]), ref), plcc(np.array([float(x) for x in pred]), ref),
            hpa(np.array([float(x) for x in pred]), ref, groups), pairwise_ece(probs, ref, groups))
    assert (srcc(pred, ref), plcc(pred, ref), hpa(pred, ref, groups), pairwise_ece(probs, ref, groups)) == want
    got = (srcc(iter(pred), iter(ref)), plcc((x for x in pred), ref), hpa(iter(pred), iter(ref), iter(groups)),
           pairwise_ece(iter(list(probs)), iter(ref), iter(groups)))
    assert got == want


def test_calibration_inputs_must_line_up():
    """pairwise_ece used as many rows of probs as ref and groups named and ignored the rest (an ECE of
    the wrong items), took logits for probabilities, and wasserstein1 named no argument when the bins
    did not match the histograms."""
    rng = np.random.default_rng(0)
    probs = rng.random((12, 9))
    probs /= probs.sum(1, keepdims=True)
    ref, groups = rng.integers(1, 6, 12).astype(float), np.repeat(np.arange(3), 4)
    with pytest.raises(ValueError, match=r"probs must be \[N, K\] with one row per item of ref and groups"):
        M.pairwise_ece(np.vstack([probs, probs[:3]]), ref, groups)
    with pytest.raises(ValueError, match=r"got probs \(12, 9\), ref \(8,\), groups \(8,\)"):
        M.pairwise_ece(probs, ref[:8], groups[:8])
    with pytest.raises(ValueError, match=r"probs must be \[N, K\]"):
        M.pairwise_ece(probs.ravel(), ref, groups)
    with pytest.raises(ValueError, match=r"probs must hold probability rows .* row 0 sums to"):
        M.pairwise_ece(np.log(probs), ref, groups)
    assert 0 <= M.pairwise_ece(probs.astype(np.float32), ref, groups) <= 1  # float32 softmax rows pass
    with pytest.raises(ValueError, match=r"bin_values must give one value per bin of the histograms \(9\), got 3"):
        M.wasserstein1(probs, probs, [1.0, 2.0, 3.0])
    for kw, name in ((dict(probs=probs[:10]), "probs"), (dict(probs=probs, rater_hist=probs[:11]), "rater_hist")):
        with pytest.raises(ValueError, match=rf"{name} must be \[N, K\] with one row per item \(12\)"):
            M.evaluate(probs.sum(1) + ref, ref, groups, ["a"] * 12, **kw)
