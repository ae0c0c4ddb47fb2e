"""GDSO, GRPO and OPD: the policy loss against a loop reference, reference-policy resets, degenerate
groups, and each method learning a toy task on tiny models."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchvision")
pytest.importorskip("accelerate")

from train_runner import gdso_first_step_logs, toy_items  # noqa: E402

from zreward.hf import lm_head_params  # noqa: E402
from zreward.model import ZRewardModel  # noqa: E402
from zreward.scorer import RewardScorer  # noqa: E402
from zreward.train import TrainConfig, train  # noqa: E402
from zreward.train.rl import MARKER, ensure_marker, grpo_token_loss, sample_traces, structural_tokens  # noqa: E402
from zreward_kernels import BIN_VALUES, group_advantage  # noqa: E402


@pytest.fixture(scope="module")
def base(rl_base):
    return rl_base


def _log(path):
    with open(path / "metrics.jsonl") as f:
        return [json.loads(x) for x in f]


def _loop_loss(logp, old, ref, adv, mask, eps, beta):
    """The GRPO token loss written out with Python loops over sequences and tokens."""
    total = 0.0
    for i in range(logp.shape[0]):
        acc, n = 0.0, 0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            a = float(adv[i])
            r = math.exp(float(logp[i, t]) - float(old[i, t]))
            term = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            d = float(ref[i, t]) - float(logp[i, t])
            term += beta * (math.exp(d) - d - 1)
            acc, n = acc + term, n + 1
        total += acc / max(n, 1)
    return total / logp.shape[0]


def test_policy_loss_matches_a_loop_reference_including_gradient():
    g = torch.Generator().manual_seed(0)
    n, t = 6, 9
    logp = (torch.randn(n, t, generator=g) * 0.3 - 2).requires_grad_(True)
    old = (logp.detach() + torch.randn(n, t, generator=g) * 0.3)
    ref = logp.detach() + torch.randn(n, t, generator=g) * 0.2
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    loss, stats = grpo_token_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.05)
    assert float(loss.detach()) == pytest.approx(_loop_loss(logp.detach(), old, ref, adv, mask, 0.2, 0.05), rel=1e-5)
    loss.backward()
    # finite-difference gradient of the loop reference at a few coordinates
    for (i, j) in [(0, 0), (2, 5), (5, 8)]:
        if not mask[i, j]:
            continue
        h = 1e-3
        up, dn = logp.detach().clone(), logp.detach().clone()
        up[i, j] += h
        dn[i, j] -= h
        fd = (_loop_loss(up, old, ref, adv, mask, 0.2, 0.05) - _loop_loss(dn, old, ref, adv, mask, 0.2, 0.05)) / (2 * h)
        assert float(logp.grad[i, j]) == pytest.approx(fd, rel=1e-2, abs=1e-5)
    # the clip counts where it takes effect (the surrogate gives the token no gradient): a ratio above 1 + eps with a
    # positive advantage or below 1 - eps with a negative one, as TRL, verl and Liger count it
    r, a = torch.exp(logp.detach() - old), adv[:, None].expand(n, t)
    effective = [bool(mask[i, j]) and ((r[i, j] > 1.2 and a[i, j] > 0) or (r[i, j] < 0.8 and a[i, j] < 0))
                 for i in range(n) for j in range(t)]
    assert sum(effective) > 0 and stats["clip_frac"] == pytest.approx(sum(effective) / float(mask.sum()))


def test_degenerate_group_gives_zero_policy_gradient():
    rewards = torch.full((8,), 0.7)  # one group, all rewards equal
    adv, st = group_advantage(rewards, group_size=8)
    assert bool(st.zero_std[0]) and float(adv.abs().max()) == 0.0
    logp = torch.randn(8, 5).requires_grad_(True)
    loss, _ = grpo_token_loss(logp, logp.detach() - 0.1, logp.detach(), adv, torch.ones(8, 5, dtype=torch.bool),
                              beta=0.04)  # pi == pi_ref: the KL term has zero gradient as well
    loss.backward()
    assert float(logp.grad.abs().max()) == 0.0


def test_sampled_traces_end_at_the_marker_and_avoid_structural_tokens(base):
    zm = ZRewardModel.from_pretrained(base)
    marker = ensure_marker(zm)
    assert zm.tokenizer.convert_tokens_to_ids(MARKER) == marker
    banned = set(structural_tokens(zm.tokenizer, marker))
    assert zm.tokenizer.convert_tokens_to_ids("<|image_pad|>") in banned and marker not in banned
    items = toy_items(4)
    torch.manual_seed(0)
    traces, forced = sample_traces(RewardScorer(zm), zm.model, [it.image for it in items], [it.prompt for it in items],
                                   ["realism"] * 4, group_size=3, max_new=6, temperature=1.5, marker=marker)
    assert len(traces) == 12
    for t, f in zip(traces, forced):
        assert t[-1] == marker and marker not in t[:-1] and len(t) <= 7
        assert not banned & set(t)
        assert f == (len(t) == 7)


def test_gdso_learns_the_toy_task_and_resets_the_reference(base, tmp_path):
    cfg = TrainConfig(method="gdso", model=base, output_dir=str(tmp_path), max_steps=10, batch_size=4, lr=3e-3,
                      log_every=1, save_every=0, group_size=4, max_trace_tokens=6, inner_updates=2,
                      schedule="constant", device="cpu")
    train(cfg, items=toy_items())
    log = _log(tmp_path)
    assert all(x["kl_first_inner"] == 0.0 for x in log)  # pi_ref is reset to pi at every outer iteration
    # clip_frac averages the inner updates: the first sees pi = pi_old and clips nothing (it logged only that one)
    assert any(x["clip_frac"] > 0 for x in log) and all(0 <= x["clip_frac"] < 0.5 for x in log)
    assert all(x["policy_kl_last"] > 0 for x in log)  # ... and the inner updates move pi away from it
    assert log[-1]["ce"] < 0.5 * log[0]["ce"] and log[-1]["pw"] < log[0]["pw"]
    assert log[-1]["reward"] > log[0]["reward"] + 0.2
    assert all(math.isfinite(x["grad_norm"]) and x["grad_norm"] > 0 for x in log)  # the inner updates' mean norm


def test_grpo_with_the_parsed_reward_learns_to_write_the_score(base, tmp_path):
    cfg = TrainConfig(method="grpo", model=base, output_dir=str(tmp_path), max_steps=24, batch_size=4, lr=1e-2,
                      log_every=1, save_every=0, group_size=8, max_trace_tokens=2, inner_updates=2, beta=0.0,
                      reward_source="parsed", schedule="constant", device="cpu")
    train(cfg, items=toy_items())
    r = [x["reward"] for x in _log(tmp_path)]
    assert np.mean(r[-4:]) > np.mean(r[:4]) + 0.4


def test_parsed_reward_reads_the_score_not_the_scale():
    """The parsed reward took the last number of a trace: "4 out of 5" read 5, and a number off the
    scale ("100") gave a reward of -22.75, which the group normalisation made the group's signal."""
    from zreward.train.rl import parse_score, parsed_rewards

    cases = {"4": 4.0, "score 4.5/5": 4.5, "I give 4 out of 5": 4.0, "4 / 5": 4.0, "a score of 3": 3.0,
             "Rating: 3.5. Out of 5": 3.5, "5 5": 5.0, "10/10": 10.0}
    for text, want in cases.items():
        assert parse_score(text) == want, text
    assert math.isnan(parse_score("no number")) and math.isnan(parse_score("/5"))
    parsed = torch.tensor([4.0, 100.0, float("nan"), 1.0, 0.5])
    r = parsed_rewards(parsed, torch.full((5,), 4.0), BIN_VALUES)
    assert r.tolist() == [1.0, 0.0, 0.0, 0.25, 0.0]


def test_opd_pulls_the_student_towards_the_teacher(base, tmp_path):
    items = toy_items()

    def query_states(z, n):
        sc = RewardScorer(z, in_vocab_mass=False)
        suffix, sm, sl = sc._suffixes(["realism"])
        return sc._rows_hidden([it.image for it in items[:n]], [it.prompt for it in items[:n]], suffix.repeat(n, 1),
                               sm.repeat(n, 1), sl.repeat(n))

    def query_logprobs(z):
        return torch.log_softmax(query_states(z, 8) @ lm_head_params(z.model)[0].t(), -1)

    teacher = ZRewardModel.from_pretrained(base)
    with torch.no_grad():  # an opinionated teacher: it strongly prefers the token "5" after the question
        h = query_states(teacher, len(items))
        direction = h.mean(0) / h.mean(0).norm()
        lm_head_params(teacher.model)[0][teacher.tokenizer.convert_tokens_to_ids("5")] += 8.0 * direction
    teacher.save_pretrained(str(tmp_path / "teacher"))
    cfg = TrainConfig(method="opd", model=base, group_size=1, output_dir=str(tmp_path / "run"), max_steps=30,
                      batch_size=4, lr=1e-2,
                      log_every=5, save_every=0, teacher=str(tmp_path / "teacher"), max_trace_tokens=4,
                      inner_updates=2, schedule="constant", device="cpu")
    train(cfg, items=items)

    def kl(student):  # exact KL(student || teacher) of the next token after the question
        with torch.no_grad():
            s, t = query_logprobs(student), query_logprobs(teacher)
        return float((s.exp() * (s - t)).sum(-1).mean())

    before = kl(ZRewardModel.from_pretrained(base))
    after = kl(ZRewardModel.from_pretrained(str(tmp_path / "run" / "final")))
    assert after < 0.5 * before, (before, after)


def test_an_opd_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_one_does(base, rl_teacher, tmp_path):
    """OPD drew its score tokens from a generator seeded once per run and saved in no checkpoint: a
    resumed run restarted that stream and drew other tokens than the uninterrupted run (final weights
    0.03 apart after 1 + 2 steps).  The generator is now seeded per outer step (and process), so the
    resumed run ends with the same weights, bit for bit."""
    cfg = TrainConfig(method="opd", model=base, group_size=1, output_dir=str(tmp_path / "full"), max_steps=3,
                      batch_size=2, lr=1e-2,
                      log_every=1, save_every=1, teacher=rl_teacher, max_trace_tokens=4,
                      inner_updates=1, schedule="constant", device="cpu")
    train(cfg, items=toy_items(16))
    part = dataclasses.replace(cfg, output_dir=str(tmp_path / "part"))
    train(dataclasses.replace(part, max_steps=1), items=toy_items(16))
    with pytest.warns(UserWarning, match="max_steps: 1 -> 3"):
        train(part, items=toy_items(16), resume=True)
    full, resumed = (ZRewardModel.from_pretrained(str(tmp_path / d / "final")).model.state_dict() for d in ("full", "part"))
    moved = ZRewardModel.from_pretrained(base).model.state_dict()
    assert any(not torch.equal(full[k], moved[k]) for k in full)  # the steps trained something
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_opd_samples_group_size_traces_per_item(base, rl_teacher, tmp_path, monkeypatch):
    """OPD took one trace per item whatever group_size said (the config documents it as the traces
    sampled per query); it now samples group_size traces, each with its own score token."""
    import zreward.train.rl as rl

    seen = []

    def recording(scorer, model, images, prompts, dims, group_size, *args, **kwargs):
        traces, forced = sample_traces(scorer, model, images, prompts, dims, group_size, *args, **kwargs)
        seen.append((len(images), group_size, len(traces)))
        return traces, forced

    monkeypatch.setattr(rl, "sample_traces", recording)
    cfg = TrainConfig(method="opd", model=base, group_size=3, output_dir=str(tmp_path / "run"), max_steps=1,
                      batch_size=2, lr=1e-2, log_every=1, save_every=0, teacher=rl_teacher, max_trace_tokens=4,
                      inner_updates=1, schedule="constant", device="cpu")
    train(cfg, items=toy_items(8))
    assert seen == [(2, 3, 6)]
    with pytest.raises(ValueError, match="group_size must be a positive integer, got 0"):
        train(dataclasses.replace(cfg, group_size=0), items=toy_items(8))


def test_opd_refuses_a_teacher_with_another_vocabulary(base, tmp_path):
    """OPD compared only the marker and score-token ids of teacher and student; a teacher whose
    vocabulary differs elsewhere was taken, and its per-token log-probabilities compared with the
    student's as if the ids named the same tokens."""
    from zreward.rubric import fit_embeddings

    teacher = ZRewardModel.from_pretrained(base)
    teacher.tokenizer.add_tokens(["<only_in_the_teacher>"])  # after the marker and score tokens: their ids stay
    fit_embeddings(teacher.model, len(teacher.tokenizer))
    teacher.save_pretrained(str(tmp_path / "teacher"))
    cfg = TrainConfig(method="opd", model=base, group_size=1, output_dir=str(tmp_path / "run"), max_steps=1,
                      batch_size=2, teacher=str(tmp_path / "teacher"), max_trace_tokens=4, device="cpu")
    with pytest.raises(ValueError, match=r"the vocabularies differ in 1 entries, e.g. \[\('<only_in_the_teacher>'"):
        train(cfg, items=toy_items(4))


def test_score_token_generator_is_per_step_and_process_on_the_cpu():
    from zreward.train.rl import score_token_generator

    def draw(*args):
        return torch.multinomial(torch.full((64, 9), 1 / 9), 1, generator=score_token_generator(*args)).flatten()

    assert score_token_generator(0, 3, 0).device.type == "cpu"
    assert torch.equal(draw(0, 3, 0), draw(0, 3, 0))  # a function of (seed, step, process) alone
    for other in ((0, 4, 0), (0, 3, 1), (1, 3, 0)):
        assert not torch.equal(draw(0, 3, 0), draw(*other)), other


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_liger_fused_policy_loss_matches_the_pytorch_path(tau):
    pytest.importorskip("liger_kernel")
    from zreward.train.rl import liger_token_loss

    g = torch.Generator().manual_seed(0)
    b, t, h, v = 4, 7, 16, 50
    hid = torch.randn(b, t, h, generator=g).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * 0.3).requires_grad_(True)
    tok = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.2
    adv = torch.randn(b, generator=g)
    with torch.no_grad():
        lp0 = torch.log_softmax(hid @ w.t() / tau, -1).gather(-1, tok[..., None]).squeeze(-1)
    old = lp0 + 0.1 * torch.randn(b, t, generator=g)
    ref = lp0 + 0.1 * torch.randn(b, t, generator=g)
    fused, fused_stats = liger_token_loss(hid, tok, w, None, old, ref, adv, mask, 0.2, 0.04, compiled=False,
                                          temperature=tau)
    fused.backward()
    gh, gw = hid.grad.clone(), w.grad.clone()
    hid.grad = w.grad = None
    lp = torch.log_softmax(hid @ w.t() / tau, -1).gather(-1, tok[..., None]).squeeze(-1)
    plain, plain_stats = grpo_token_loss(lp, old, ref, adv, mask, 0.2, 0.04)
    plain.backward()
    assert abs(float(fused.detach()) - float(plain.detach())) < 1e-6
    # the logged stats mean the same on both paths (clip_frac counted |r - 1| > eps whatever the advantage's sign)
    assert plain_stats["clip_frac"] > 0
    assert fused_stats == pytest.approx(plain_stats, abs=1e-6)
    torch.testing.assert_close(gh, hid.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["gdso", "opd"])
def test_every_log_probability_is_taken_at_the_sampling_temperature(base, tmp_path, monkeypatch, method):
    """Traces are drawn at sample_temperature, but the old, reference, current (and OPD's teacher)
    token log-probabilities were taken at temperature 1: the importance ratio and the KL then referred
    to a policy that did not draw the tokens (TRL and verl divide the logits by the sampling
    temperature). Every log-probability of a step now comes from the policy at that temperature."""
    import zreward.train.rl as rl

    seen = []
    real = rl.trace_forward

    def recording(*a, **kw):
        seen.append(kw.get("temperature", 1.0))
        return real(*a, **kw)

    monkeypatch.setattr(rl, "trace_forward", recording)
    import zreward.train.loop as loop_mod

    monkeypatch.setattr(loop_mod.TraceModule, "forward", lambda self, *a, temperature=1.0, **kw: (
        seen.append(temperature), real(self._scorer, *a[:5], torch.tensor(self._ids), *a[5:], **kw,
                                       temperature=temperature))[1])
    kw = dict(method=method, model=base, output_dir=str(tmp_path / method), max_steps=1, batch_size=4, lr=1e-3,
              save_every=0, max_trace_tokens=4, inner_updates=2, beta=0.04, sample_temperature=0.7, policy_loss="torch")
    if method == "opd":
        kw["teacher"] = base
    else:
        kw["group_size"] = 2
    train(TrainConfig(**kw), items=toy_items(8))
    # old (+ OPD: old with the score token, teacher), reference, then the two inner updates
    assert len(seen) == (6 if method == "opd" else 4) and seen == [0.7] * len(seen), seen
    # and the log-probabilities are the policy's at that temperature: log_softmax(W h / tau)
    zm = ZRewardModel.from_pretrained(base)
    marker = ensure_marker(zm)
    items = toy_items(2)
    sc = RewardScorer(zm, in_vocab_mass=False)
    args = ([it.image for it in items], [it.prompt for it in items], ["realism"] * 2)
    torch.manual_seed(0)
    traces, forced = sample_traces(sc, zm.model, *args, group_size=1, max_new=4, temperature=0.7, marker=marker)
    ids = torch.tensor(zm.score_tokens.token_ids)
    with torch.no_grad():
        logp, mask, _ = real(sc, *args, traces, forced, ids, temperature=0.7)
        (h, tok), _, _ = real(sc, *args, traces, forced, ids, fused_head=True)
        w, b = lm_head_params(zm.model)
        z = h @ w.t() + (b if b is not None else 0)
        want = torch.log_softmax(z / 0.7, -1).gather(-1, tok[..., None]).squeeze(-1)
    torch.testing.assert_close(logp[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_gdso_step_with_liger_equals_pytorch(base, tmp_path):
    pytest.importorskip("liger_kernel")
    logs = gdso_first_step_logs(base, tmp_path, "cpu")
    for k in ("policy_loss", "loss", "ce", "pw", "reward"):
        assert logs["torch"][k] == pytest.approx(logs["liger"][k], abs=1e-6), k


def test_gradient_checkpointing_changes_no_number_and_keeps_caching_quiet(base, tmp_path):
    """A GDSO step with gradient checkpointing logs what one without it logs; the training forward
    asks for no KV cache (transformers warned '`use_cache=True` is incompatible with gradient
    checkpointing' on every run, as the config's use_cache=True reached the checkpointed backbone)."""
    import logging

    import transformers.utils.logging as hf_logging

    hf_logging.logging.Logger.warning_once.cache_clear()  # a message is logged once per process
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root = hf_logging.get_logger()
    root.addHandler(handler)
    try:
        logs = {gc: gdso_first_step_logs(base, tmp_path / str(gc), "cpu", ("torch",), grad_checkpointing=gc)["torch"]
                for gc in (False, True)}
    finally:
        root.removeHandler(handler)
    assert not [m for m in seen if "gradient checkpointing" in m], seen
    for k in ("policy_loss", "loss", "ce", "pw", "reward", "grad_norm"):
        assert logs[True][k] == pytest.approx(logs[False][k], abs=1e-6), k


def test_liger_failure_falls_back_under_auto_and_raises_when_requested(base, tmp_path, monkeypatch):
    """policy_loss='auto' survives a Liger failure (warns, then runs the PyTorch loss: same numbers as a
    PyTorch run); an explicit policy_loss='liger' surfaces it."""
    import zreward.train.rl as rl

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Liger failure")

    def run(loss, out):
        cfg = TrainConfig(method="gdso", model=base, output_dir=str(out), max_steps=1, batch_size=4, lr=3e-3,
                          log_every=1, save_every=0, group_size=4, max_trace_tokens=6, inner_updates=2,
                          device="cpu", policy_loss=loss)
        train(cfg, items=toy_items())
        return _log(out)[0]

    plain = run("torch", tmp_path / "torch")
    monkeypatch.setattr(rl, "liger_token_loss", broken)
    monkeypatch.setattr(rl, "choose_policy_loss", lambda *a, **k: "liger")  # as on a CUDA machine with Liger
    monkeypatch.setattr(rl, "liger_available", lambda: True)  # the config check for an explicit 'liger'
    with pytest.warns(RuntimeWarning, match="simulated Liger failure.*falls back to the PyTorch policy loss"):
        fallback = run("auto", tmp_path / "auto")
    for key in ("loss", "policy_loss", "reward", "ce", "pw"):
        assert fallback[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), key
    with pytest.raises(RuntimeError, match="simulated Liger failure"):
        run("liger", tmp_path / "liger")
