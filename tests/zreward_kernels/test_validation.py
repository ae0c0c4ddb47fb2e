"""Bad input gets a clear error naming the argument; validate=False skips only the data checks."""

import re

import pytest
import torch

from zreward_kernels import gdso_loss, rubric_loss, score_stats


def _raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


def test_score_stats_bad_inputs():
    _raises(TypeError, "logits must be a torch.Tensor", score_stats, [[0.0] * 9])
    _raises(TypeError, "logits must be float16", score_stats, torch.zeros(2, 9, dtype=torch.long))
    _raises(ValueError, r"logits must have the bins in its last dimension of size 9", score_stats, torch.zeros(2, 8))
    _raises(ValueError, "size 5", score_stats, torch.zeros(2, 9), bin_values=(1, 2, 3, 4, 5))
    _raises(ValueError, "temperature must be a finite positive", score_stats, torch.zeros(2, 9), temperature=0.0)
    _raises(TypeError, "temperature must be a Python float", score_stats, torch.zeros(2, 9), temperature=torch.tensor(1.0))
    _raises(ValueError, "bin_values must be strictly increasing", score_stats, torch.zeros(2, 3), bin_values=(1, 3, 2))
    _raises(ValueError, "at least 2 bins", score_stats, torch.zeros(2, 1), bin_values=(1.0,))
    nan = torch.zeros(2, 9)
    nan[1, 3] = float("nan")
    _raises(ValueError, "logits contains NaN", score_stats, nan)
    allinf = torch.zeros(2, 9)
    allinf[0] = float("-inf")
    _raises(ValueError, "all -inf", score_stats, allinf)
    pinf = torch.zeros(2, 9)
    pinf[0, 0] = float("inf")
    _raises(ValueError, r"\+inf", score_stats, pinf)
    # validate=False skips the value checks (no host sync) but never the static ones
    assert torch.isnan(score_stats(nan, validate=False).mean[1])
    _raises(ValueError, "size 9", score_stats, torch.zeros(2, 8), validate=False)


def test_rubric_loss_bad_inputs():
    x = torch.randn(4, 3, 9)
    t = torch.randint(0, 9, (4, 3))
    _raises(ValueError, "at least one term", rubric_loss, x)
    _raises(ValueError, "at most one of target and target_probs", rubric_loss, x, target=t, target_probs=torch.softmax(x, -1))
    _raises(ValueError, "at most one of teacher_logits and teacher_probs", rubric_loss, x, teacher_logits=x, teacher_probs=torch.softmax(x, -1))
    _raises(ValueError, "logits must be \\[N, K\\] or \\[N, D, K\\]", rubric_loss, torch.randn(9), target=torch.tensor(1))
    _raises(ValueError, "target must have the logits' leading shape", rubric_loss, x, target=t[:, :2])
    _raises(TypeError, "target must be an integer tensor", rubric_loss, x, target=t.float())
    _raises(ValueError, r"target values must be bin indices in \[0, 9\)", rubric_loss, x, target=t.clone().fill_(9))
    _raises(ValueError, "target_probs must have the logits' shape", rubric_loss, x, target_probs=torch.softmax(x, -1)[:2])
    bad_p = torch.softmax(x, -1) * 1.5
    _raises(ValueError, "target_probs rows must sum to 1", rubric_loss, x, target_probs=bad_p)
    _raises(ValueError, "teacher_probs has negative entries", rubric_loss, x, teacher_probs=-torch.softmax(x, -1))
    _raises(ValueError, "pairs and pair_gaps must be given together", rubric_loss, x, pairs=torch.zeros(1, 2, dtype=torch.long))
    _raises(ValueError, r"pairs must be \[P, 2\]", rubric_loss, x, pairs=torch.zeros(3, dtype=torch.long), pair_gaps=torch.zeros(3))
    _raises(ValueError, r"pair_gaps must be \[P\]", rubric_loss, x, pairs=torch.zeros(3, 2, dtype=torch.long), pair_gaps=torch.zeros(2))
    _raises(ValueError, r"pairs holds row indices outside \[0, 12\)", rubric_loss, x,
            pairs=torch.tensor([[0, 12]]), pair_gaps=torch.zeros(1))
    _raises(ValueError, "pair_gaps contains NaN", rubric_loss, x, pairs=torch.tensor([[0, 1]]), pair_gaps=torch.tensor([float("nan")]))
    # no rows but pairs: every index is out of range, known from the shapes, so even with validate=False
    _raises(ValueError, "pairs holds 1 pairs but logits has no rows", rubric_loss, torch.randn(0, 9),
            pairs=torch.tensor([[0, 1]]), pair_gaps=torch.zeros(1), validate=False)
    _raises(ValueError, "reduction must be one of", rubric_loss, x, target=t, reduction="avg")
    _raises(ValueError, "weight_kl must be finite", rubric_loss, x, target=t, weight_kl=float("inf"))
    _raises(TypeError, "ignore_index must be an int", rubric_loss, x, target=t, ignore_index=1.5)
    _raises(ValueError, "ZREWARD_BACKEND|backend must be one of", rubric_loss, x, target=t, backend="cuda")


@pytest.mark.parametrize("big", [1e38, -1e38])
def test_logits_that_overflow_once_divided_by_the_temperature(big):
    """Finite logits whose row maximum overflows float32 once divided by a temperature below 1 gave NaN
    probabilities (a large positive maximum) or a NaN row (a row of large negatives) without an error."""
    x = torch.zeros(2, 2, 1, 9)
    if big > 0:
        x[0, 0, 0, 3] = big
    else:
        x[0, 0, 0] = big
    rows = x.reshape(4, 9)
    ops = [lambda t, **kw: score_stats(t, **kw),
           lambda t, **kw: rubric_loss(t, target=torch.zeros(4, dtype=torch.long), **kw),
           lambda t, **kw: rubric_loss(torch.zeros(4, 9), teacher_logits=t, **kw),
           lambda t, **kw: gdso_loss(t.reshape(2, 2, 1, 9), torch.full((2, 2), 3.0), **kw)]
    for op in ops:
        name = "teacher_logits" if op is ops[2] else "logits"
        _raises(ValueError, rf"{name} / temperature overflows float32 \(temperature=0.1\).*largest logit is "
                + re.escape(f"{big:.4g}"), op, rows, temperature=0.1)
        _raises(ValueError, "overflows", op, rows.bfloat16(), temperature=0.1)
        out = op(rows, temperature=0.5)  # 2e38 fits float32
        assert all(torch.isfinite(t).all() for t in out if isinstance(t, torch.Tensor))
        out = op(rows.double(), temperature=0.1)  # float64 logits are computed in float64: no overflow
        assert all(torch.isfinite(t).all() for t in out if isinstance(t, torch.Tensor))
    # what it refuses: the reference gave NaN there
    assert torch.isnan(score_stats(rows, temperature=0.1, validate=False).probs[0]).all()


def test_numpy_integer_ignore_index_is_taken():
    """``ignore_index=np.int64(-100)`` was refused ("must be an int")."""
    import numpy as np

    x = torch.randn(6, 9)
    t = torch.tensor([0, 3, -100, 8, -100, 4])
    a = rubric_loss(x, target=t, ignore_index=np.int64(-100))
    b = rubric_loss(x, target=t, ignore_index=-100)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.ce, b.ce)
    _raises(TypeError, "ignore_index must be an int", rubric_loss, x, target=t, ignore_index=-100.0)


def test_device_mismatch_is_named():
    x = torch.randn(4, 9, device="meta")
    t = torch.zeros(4, dtype=torch.long)
    _raises(ValueError, "target is on cpu but logits is on meta", rubric_loss, x, target=t, validate=False)


def test_gdso_bad_inputs():
    x = torch.randn(3, 2, 4, 9)
    s = torch.tensor([[4.5, 2.0], [3.0, 3.0], [1.0, 5.0]])
    _raises(ValueError, r"logits must be \[P, 2, G, K\]", gdso_loss, torch.randn(3, 3, 4, 9), s)
    _raises(ValueError, r"scores must be \[P, 2\] = \[3, 2\]", gdso_loss, x, s[:2])
    _raises(TypeError, "scores must be a floating-point tensor", gdso_loss, x, s.long())
    _raises(ValueError, "scores must lie on the bin grid", gdso_loss, x, torch.tensor([[4.3, 2.0], [3.0, 3.0], [1.0, 5.0]]))
    _raises(ValueError, r"scores must lie in \[1.0, 5.0\]", gdso_loss, x, s + 1.0)
    _raises(ValueError, "scores contains NaN", gdso_loss, x, s.clone().fill_(float("nan")))
    _raises(ValueError, "eps must be >= 0", gdso_loss, x, s, eps=-1.0)
    _raises(ValueError, "G >= 1", gdso_loss, torch.randn(3, 2, 0, 9), s)


def test_bad_input_loses_nothing():
    """A rejected call leaves its inputs untouched."""
    x = torch.randn(4, 9)
    t = torch.full((4,), 12)
    x0, t0 = x.clone(), t.clone()
    with pytest.raises(ValueError):
        rubric_loss(x, target=t)
    assert torch.equal(x, x0) and torch.equal(t, t0)


def test_data_checks_read_every_flag_once_and_raise_the_first_failure_in_order():
    from zreward_kernels._common import DataChecks

    built = []

    def detail(text):
        def build():
            built.append(text)
            return f"; found {text}"
        return build

    checks = DataChecks()
    checks.bad(torch.tensor(False), "first", detail(1))
    checks.bad(torch.tensor(True), "second", detail(2))
    checks.bad(torch.tensor(True), "third", detail(3))
    with pytest.raises(ValueError, match="^second; found 2$"):
        checks.raise_first()
    assert built == [2]  # details are built only for the failure reported
    ok = DataChecks()
    ok.bad(torch.tensor(False), "never")
    ok.raise_first()
    DataChecks().raise_first()  # nothing queued: nothing read


def test_nan_takes_precedence_over_inf_in_one_row():
    x = torch.zeros(2, 9)
    x[0, 0], x[0, 1] = float("inf"), float("nan")
    _raises(ValueError, "logits contains NaN", score_stats, x)
    y = torch.zeros(2, 9, dtype=torch.bfloat16)
    y[1, 4] = float("inf")
    _raises(ValueError, r"logits contains \+inf", score_stats, y)


def test_low_precision_distributions_pass_the_sum_check():
    """A bf16 distribution rounded from an exact one sums to 1 only within about 0.004 (it was
    refused at 1e-3: 'found a row summing to 1.00122'); the tolerance is the dtype's epsilon, and a
    bf16 row that is really off is still refused."""
    torch.manual_seed(0)
    x = torch.randn(64, 4, 9)
    p = torch.softmax(torch.randn(64, 4, 9) * 3, -1)
    assert float((p.bfloat16().float().sum(-1) - 1).abs().max()) > 1e-3  # the case that was refused
    for dt in (torch.bfloat16, torch.float16):
        ref = rubric_loss(x, target_probs=p.to(dt).float(), teacher_probs=p.to(dt).float(), validate=False)
        out = rubric_loss(x, target_probs=p.to(dt), teacher_probs=p.to(dt))
        torch.testing.assert_close(out.loss, ref.loss)
    off = p.clone()
    off[0, 0] *= 1.02
    _raises(ValueError, "target_probs rows must sum to 1 \\(within 0.0078125\\)", rubric_loss, x,
            target_probs=off.bfloat16())
    _raises(ValueError, "target_probs rows must sum to 1 \\(within 0.001\\)", rubric_loss, x, target_probs=off)


def test_float_options_refuse_bools_and_strings():
    """float() took eps=True as 1.0 and temperature="2" as 2.0: a config value of the wrong type went
    through silently."""
    import numpy as np

    from zreward_kernels import group_advantage

    x = torch.randn(4, 9)
    r = torch.randn(8)
    for bad in (True, np.bool_(True), "1e-6", b"1"):
        with pytest.raises(TypeError, match="eps must be a float, got"):
            group_advantage(r, group_size=4, eps=bad)
        with pytest.raises(TypeError, match="temperature must be a float, got"):
            score_stats(x, temperature=bad)
    assert group_advantage(r, group_size=4, eps=np.float32(1e-6))[0].shape == (8,)  # numpy floats are numbers
    assert score_stats(x, temperature=2)[0].shape == (4, 9)  # and so are ints


def test_value_checks_run_under_vmap():
    """torch.func.vmap over an op with validate=True (the default): the checks read the flags of every
    vmapped sample (a batched flag has no storage to read) and name the problem; good input gives the
    per-sample values.  Before, every validated call under vmap failed with "Cannot access data
    pointer of Tensor that doesn't have storage"."""
    import math

    vmap = torch.func.vmap
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 9, generator=g)
    t = torch.randint(0, 9, (4, 3), generator=g)
    gx = torch.randn(4, 2, 2, 3, 9, generator=g)
    sc = torch.full((4, 2, 2), 3.0)
    assert torch.allclose(vmap(lambda a: score_stats(a).mean)(x), score_stats(x).mean)
    per_sample = torch.stack([rubric_loss(x[i], target=t[i]).loss for i in range(4)])
    assert torch.allclose(vmap(lambda a, b: rubric_loss(a, target=b).loss)(x, t), per_sample)
    per_pair = torch.stack([gdso_loss(gx[i], sc[i]).loss for i in range(4)])
    assert torch.allclose(vmap(lambda a, s: gdso_loss(a, s).loss)(gx, sc), per_pair)

    xb = x.clone()
    xb[2, 1, 3] = math.nan
    with pytest.raises(ValueError, match="logits contains NaN"):
        vmap(lambda a: score_stats(a).mean)(xb)
    tb = t.clone()
    tb[1, 2] = 11
    with pytest.raises(ValueError, match=r"target values must be bin indices in \[0, 9\)"):
        vmap(lambda a, b: rubric_loss(a, target=b).loss)(x, tb)
    sb = sc.clone()
    sb[3, 0, 1] = 3.2
    with pytest.raises(ValueError, match="scores must lie on the bin grid"):
        vmap(lambda a, s: gdso_loss(a, s).loss)(gx, sb)
