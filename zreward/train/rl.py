"""Reasoning traces and the policy-gradient methods: GDSO, GRPO (baseline) and OPD (baseline).

A *trace query* is ``prefix(image, prompt) + question(dimension)`` followed by tokens the policy
samples, ending at the trace marker ``<|score|>`` (a special token added on first use; if the
policy has not emitted it after ``max_trace_tokens`` tokens it is appended and is not part of the
policy loss).  The score distribution is always read at the marker, through the restricted head,
so every sample has one (SPEC section 3).

Per outer iteration (one ``step`` of the loop):

1. the reference policy is reset to the current policy (``beta * KL(pi || pi_ref)``);
2. each query of the batch gets ``group_size`` sampled traces from the current (old) policy;
3. old and reference token log-probabilities and the rewards / advantages are computed once,
   without gradient (``gdso_loss`` for GDSO and GRPO; per-token teacher-student log-ratios for OPD);
   every token log-probability (old, reference, current, OPD's teacher) is taken at the sampling
   temperature, ``log_softmax(logits / sample_temperature)``: the policy that drew the tokens, as
   TRL and verl take it, so the importance ratio and the KL refer to it;
4. ``inner_updates`` optimizer steps each run the current policy on the fixed traces and minimise
   the clipped GRPO surrogate (:func:`grpo_token_loss`, the one implementation of it) plus, for GDSO,
   ``alpha_pt * ce + alpha_pw * pw`` from ``gdso_loss`` on the current score logits.

The policy loss has two equal implementations: :func:`grpo_token_loss` (PyTorch; full-vocabulary
logits for the trace tokens only, never for the prompt) and :func:`liger_token_loss` (Liger-Kernel's
fused linear GRPO loss, which computes those logits chunk by chunk).  ``policy_loss="auto"`` uses
Liger on CUDA when it is installed (GDSO and GRPO: per-sequence advantages) and PyTorch elsewhere;
OPD's per-token advantages always use PyTorch.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from zreward_kernels import gdso_loss
from zreward_kernels.reference import pointwise_reward

from ..rubric import fit_embeddings
from ..scorer import named_images

MARKER = "<|score|>"


# ---------------------------------------------------------------------------------------------
# the policy-gradient loss
def grpo_token_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: Optional[torch.Tensor],
                    advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
                    beta: float = 0.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Clipped GRPO surrogate with a k3 KL penalty, averaged over each sequence's tokens, then over sequences.

    ``logp``, ``logp_old``, ``logp_ref``, ``mask``: ``[N, T]`` (sampled tokens' log-probabilities
    under the current, sampling and reference policies; ``mask`` marks the tokens the policy
    sampled); ``advantages``: ``[N]`` (one per sequence) or ``[N, T]`` (per token).
    ``loss_t = -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A) + beta (exp(d_t) - d_t - 1)`` with
    ``r_t = exp(logp - logp_old)`` and ``d_t = logp_ref - logp``.

    Stats: ``policy_kl``, the mean k3 term over the masked tokens; ``clip_frac``, the fraction of
    masked tokens whose clip takes effect (``r_t > 1 + eps`` with ``A > 0``, or ``r_t < 1 - eps``
    with ``A < 0``: the token then gives no gradient), as TRL's ``clip_ratio/region_mean``, verl's
    ``pg_clipfrac`` and Liger-Kernel's GRPO metric count it.
    """
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    ratio = torch.exp(logp - logp_old)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_tok = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if logp_ref is not None and beta > 0:
        d = logp_ref - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    m = mask.to(logp.dtype)
    n = m.sum(1).clamp(min=1)
    loss = ((per_tok * m).sum(1) / n).mean()
    with torch.no_grad():
        tot = m.sum().clamp(min=1)
        stats = {"policy_kl": float((kl * m).sum() / tot),
                 "clip_frac": float(((((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0)))
                                     .to(m.dtype) * m).sum() / tot)}
    return loss, stats


def liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception:
        return False
    return True


def choose_policy_loss(policy_loss: str, method: str, device_type: str) -> str:
    """``"liger"`` or ``"torch"`` for a run: ``policy_loss="auto"`` picks Liger on CUDA when it is
    installed (never for OPD, whose advantages are per token)."""
    if method == "opd":
        return "torch"
    if policy_loss == "liger" or (policy_loss == "auto" and device_type == "cuda" and liger_available()):
        return "liger"
    return "torch"


def liger_token_loss(hidden: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor, bias, logp_old, logp_ref,
                     advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, beta: float, compiled: bool,
                     temperature: float = 1.0):
    """The same loss as :func:`grpo_token_loss` through Liger-Kernel's fused linear GRPO loss: the
    ``[N, T, V]`` logits of the trace tokens are computed chunk by chunk and never stored whole
    (divided by the sampling ``temperature``, as :func:`trace_forward` divides them)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    fn = LigerFusedLinearGRPOLoss(beta=beta, compiled=compiled, use_ref_model=beta > 0 and logp_ref is not None,
                                  epsilon_low=clip_eps, epsilon_high=clip_eps, loss_type="grpo", chunk_size=1,
                                  temperature=temperature)
    loss, metrics = fn(hidden, weight, tokens, mask.long(), advantages.float(), bias=bias,
                       ref_per_token_logps=logp_ref if beta > 0 else None, old_per_token_logps=logp_old)
    m = [float(x) for x in metrics]
    stats = {"policy_kl": m[0] if beta > 0 and len(m) > 1 else 0.0, "clip_frac": m[-1] if m else float("nan")}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# traces
def ensure_marker(zm) -> int:
    """The trace marker's token id, adding ``<|score|>`` (initialised from the text "Score") if needed."""
    tok = zm.tokenizer
    tid = tok.convert_tokens_to_ids(MARKER)
    if tid is None or tid == getattr(tok, "unk_token_id", None):
        pieces = tok("Score", add_special_tokens=False)["input_ids"]
        tok.add_tokens([MARKER], special_tokens=True)
        tid = tok.convert_tokens_to_ids(MARKER)
        fit_embeddings(zm.model, len(tok))
        with torch.no_grad():
            for table in {id(t): t for t in (zm.model.get_input_embeddings().weight,
                                             zm.model.get_output_embeddings().weight)}.values():
                table[tid] = table[torch.tensor(pieces, device=table.device)].mean(0)
    return int(tid)


def structural_tokens(tokenizer, marker: int) -> List[int]:
    """Special tokens a trace must never contain (image / video placeholders, chat markers, padding):
    every special token of the tokenizer except the trace marker."""
    from ..model import special_token_ids

    return sorted(special_token_ids(tokenizer) - {marker})


def _generation_inputs(scorer, images, prompts, dims) -> Dict[str, torch.Tensor]:
    """Left-padded full queries (prefix + question) for ``generate``."""
    zm = scorer.model
    enc = scorer._processor_inputs(images, [zm.prefix_text(p) for p in prompts])
    pad = zm.tokenizer.pad_token_id or 0
    rows, types = [], []
    questions = {d: zm.suffix_ids(d) for d in dict.fromkeys(dims)}  # each dimension's question tokenised once
    for i, d in enumerate(dims):
        keep = enc["attention_mask"][i].bool()
        rows.append(torch.cat([enc["input_ids"][i][keep], torch.tensor(questions[d], device=keep.device)]))
        if "mm_token_type_ids" in enc:
            types.append(torch.cat([enc["mm_token_type_ids"][i][keep], torch.zeros(len(questions[d]),
                                    dtype=enc["mm_token_type_ids"].dtype, device=keep.device)]))
    length = max(len(r) for r in rows)
    dev = enc["input_ids"].device
    ids = torch.full((len(rows), length), pad, dtype=torch.long, device=dev)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    out = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out.update(input_ids=ids, attention_mask=mask)
    if types:
        tt = torch.zeros_like(ids, dtype=types[0].dtype)
        for i, r in enumerate(types):
            tt[i, length - len(r):] = r
        out["mm_token_type_ids"] = tt
    return out


@torch.no_grad()
def sample_traces(scorer, model, images, prompts, dims, group_size: int, max_new: int, temperature: float,
                  marker: int) -> Tuple[List[List[int]], List[bool]]:
    """``group_size`` sampled traces per query, rows ordered query-major; each ends with the marker.
    Returns the token lists and whether the marker had to be appended (not sampled)."""
    enc = _generation_inputs(scorer, images, prompts, dims)
    tok = scorer.model.tokenizer
    pad = tok.pad_token_id or 0
    seq = model.generate(**enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                         max_new_tokens=max_new, num_return_sequences=group_size, eos_token_id=marker,
                         pad_token_id=pad, suppress_tokens=structural_tokens(tok, marker))
    new = seq[:, enc["input_ids"].shape[1]:].tolist()
    traces, forced = [], []
    for row in new:
        if marker in row:
            traces.append(row[:row.index(marker) + 1])
            forced.append(False)
        else:
            traces.append(row + [marker])
            forced.append(True)
    return traces, forced


def trace_forward(scorer, images, prompts, dims, traces: Sequence[Sequence[int]], forced: Sequence[bool],
                  score_ids: torch.Tensor, extra_tokens: Optional[Sequence[int]] = None, fused_head: bool = False,
                  temperature: float = 1.0):
    """Run the policy on ``prefix + question + trace``; returns ``(logp [N, T], mask [N, T],
    score_logits [N, K])``: the sampled tokens' log-probabilities under the policy at the sampling
    ``temperature`` (``log_softmax(logits / temperature)``: the policy that drew them, as TRL and verl
    compute them; ``mask`` covers the tokens the policy sampled) and the score logits at the marker
    (read at temperature 1, as the scorer reads them).  ``extra_tokens`` (one per row) appends a
    token after the marker whose log-probability is included (OPD's sampled score token).

    ``fused_head=True`` returns ``((hidden [N, T, H], tokens [N, T]), mask, score_logits)`` instead of
    the log-probabilities, for a fused linear loss (Liger) that never builds the ``[N, T, V]`` logits."""
    from ..hf import lm_head_params

    zm = scorer.model
    dev = zm.device
    questions = {d: zm.suffix_ids(d) for d in dict.fromkeys(dims)}  # once per dimension, not per row
    suf = [questions[d] for d in dims]
    tails = [s + list(t) + ([extra_tokens[i]] if extra_tokens is not None else []) for i, (s, t) in
             enumerate(zip(suf, traces))]
    length = max(len(t) for t in tails)
    pad = zm.tokenizer.pad_token_id or 0
    tail = torch.full((len(tails), length), pad, dtype=torch.long, device=dev)
    tmask = torch.zeros_like(tail)
    for i, t in enumerate(tails):
        tail[i, :len(t)] = torch.tensor(t, device=dev)
        tmask[i, :len(t)] = 1
    states, p = scorer.rows_states(images, prompts, tail, tmask)
    n_tok = max(len(t) for t in traces) + (1 if extra_tokens is not None else 0)
    idx = torch.zeros((len(tails), n_tok), dtype=torch.long, device=dev)
    tok = torch.zeros_like(idx)
    mask = torch.zeros((len(tails), n_tok), dtype=torch.bool, device=dev)
    marker_pos = torch.zeros(len(tails), dtype=torch.long, device=dev)
    for i, (s, t) in enumerate(zip(suf, traces)):
        toks = list(t) + ([extra_tokens[i]] if extra_tokens is not None else [])
        start = p + len(s)  # absolute index of the first trace token
        idx[i, :len(toks)] = torch.arange(start - 1, start - 1 + len(toks), device=dev)  # predicting states
        tok[i, :len(toks)] = torch.tensor(toks, device=dev)
        mask[i, :len(toks)] = True
        if forced[i]:
            mask[i, len(t) - 1] = False  # the appended marker was not sampled
        marker_pos[i] = start + len(t) - 1
    weight, bias = lm_head_params(zm.model)
    h = states.gather(1, idx.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
    h_m = states[torch.arange(len(tails), device=dev), marker_pos]
    from zreward_kernels import restricted_logits

    score_logits = restricted_logits(h_m, weight, score_ids, bias, validate=False).float()
    if fused_head:
        return (h, tok), mask, score_logits
    logits = (h @ weight.to(h.dtype).t()).float()
    if bias is not None:
        logits = logits + bias.float()
    logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
    return logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1), mask, score_logits


def score_token_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator OPD draws its score tokens from at outer step ``step`` on process ``rank``:
    seeded from the three, so a resumed run draws what an uninterrupted one draws (a generator seeded
    once per run restarted its stream on resume, and no checkpoint holds its state), processes draw
    independently (they shared one stream), and the draw does not depend on the device of the
    probabilities (a CPU generator with CUDA tensors raises: the draw happens on the CPU)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


_SCALE_DENOMINATOR = re.compile(r"(?:/|\bout\s+of)\s*$", re.IGNORECASE)


def parse_score(text: str) -> float:
    """The last number written in a trace (the report's parsed-text reward), NaN if none.  A number
    that only names the scale (the 5 of "4/5" or "4 out of 5") is not the score: the last number was
    taken, so "4 out of 5" parsed as 5 ("a score of 4" still reads 4)."""
    for m in reversed(list(re.finditer(r"\d+(?:\.\d+)?", text))):
        if not _SCALE_DENOMINATOR.search(text[:m.start()]):
            return float(m.group())
    return float("nan")


def parsed_rewards(parsed: torch.Tensor, scores: torch.Tensor, bin_values) -> torch.Tensor:
    """The parsed-text reward ``1 - |parsed - s| / R``; 0 (the worst on-scale reward) where no number
    was found or the number lies off the scale (a "100" gave 1 - 95/4 = -22.75, an outlier the group
    normalisation then made the whole group's signal)."""
    lo, hi = bin_values[0], bin_values[-1]
    ok = torch.isfinite(parsed) & (parsed >= lo) & (parsed <= hi)
    r = pointwise_reward(torch.where(ok, parsed, scores), scores, hi - lo)
    return torch.where(ok, r, torch.zeros_like(r))


# ---------------------------------------------------------------------------------------------
class RLMethod:
    """One outer iteration of GDSO / GRPO / OPD (see the module docstring)."""

    def __init__(self, ctx):
        self.ctx = ctx
        cfg = ctx.cfg
        self.zm = ctx.zm
        self.scorer = ctx.module_scorer
        self.marker = ctx.marker
        self.score_ids = torch.tensor(self.zm.score_tokens.token_ids, device=self.zm.device)
        self.cfg = cfg
        self.teacher = ctx.teacher

    def _policy(self):
        return self.ctx.acc.unwrap_model(self.ctx.module).model

    def step(self, step: int, batch: List) -> Dict[str, float]:
        """One outer iteration on ``batch``; returns its logged stats: ``reward`` (mean over the sampled
        traces), ``trace_len`` (sampled tokens per trace), ``forced_marker`` (share of traces whose
        marker was appended), ``policy_loss`` and ``loss`` (first inner update), ``kl_first_inner`` (0:
        pi_ref was just reset to pi) and ``policy_kl_last`` (last inner update), ``clip_frac`` (the
        share of sampled tokens whose clip took effect, averaged over the inner updates: the first sees
        pi = pi_old and clips nothing), ``grad_norm`` (before clipping, averaged over the inner
        updates), and for GDSO ``ce`` and ``pw`` (first inner update)."""
        cfg, acc, module, opt = self.cfg, self.ctx.acc, self.ctx.module, self.ctx.opt
        policy = self._policy()
        ref = copy.deepcopy(policy).eval() if cfg.beta > 0 else None  # reset pi_ref <- pi (this iteration)
        for p_ in (ref.parameters() if ref is not None else []):
            p_.requires_grad_(False)
        from .teacher import load_image

        if cfg.method == "opd":
            images = [load_image(b) for b in batch]
            prompts = [b.prompt for b in batch]
            dims = [b.dimension for b in batch]
        else:  # rows: pair-major, side w then l
            images = [x for b in batch for x in (load_image(b[0]), load_image(b[1]))]
            prompts = [x for b in batch for x in (b[0].prompt, b[1].prompt)]
            dims = [x for b in batch for x in (b[0].dimension, b[1].dimension)]
        g = cfg.group_size  # traces per query (OPD too: each trace gets its own score token)
        policy.eval()
        items = batch if cfg.method == "opd" else [x for b in batch for x in b]  # the rows' items
        with named_images(f"training item {it.id!r}" for it in items):  # the first processor call of the step
            traces, forced = sample_traces(self.scorer, policy, images, prompts, dims, g, cfg.max_trace_tokens,
                                           cfg.sample_temperature, self.marker)
        rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731  (query-major, like generate)
        r_images, r_prompts, r_dims = rep(images), rep(prompts), rep(dims)
        extra = None
        tau = cfg.sample_temperature  # every log-probability is the sampling policy's, at the temperature it sampled
        with torch.no_grad():
            logp_old, mask, score_old = trace_forward(self.scorer, r_images, r_prompts, r_dims, traces, forced,
                                                      self.score_ids, temperature=tau)
            if cfg.method == "opd":
                probs = torch.softmax(score_old / tau, -1)  # the score token is drawn at the same temperature
                pick = torch.multinomial(probs.float().cpu(), 1, generator=score_token_generator(
                    cfg.seed, step, acc.process_index)).squeeze(1).tolist()
                extra = [int(self.score_ids[k]) for k in pick]
                logp_old, mask, _ = trace_forward(self.scorer, r_images, r_prompts, r_dims, traces, forced,
                                                  self.score_ids, extra, temperature=tau)
                t_scorer = self.ctx.teacher_scorer
                logp_t, _, _ = trace_forward(t_scorer, r_images, r_prompts, r_dims, traces, forced,
                                             self.score_ids, extra, temperature=tau)
                adv_tok = (logp_t - logp_old) * mask
                rewards = adv_tok.sum(1) / mask.sum(1).clamp(min=1)
                advantages = adv_tok
            else:
                scores = torch.tensor([[b[0].reference, b[1].reference] for b in batch], device=score_old.device)
                k = score_old.shape[-1]
                shaped = score_old.view(len(batch), 2, g, k)
                out = gdso_loss(shaped, scores, lambda_pt=cfg.lambda_pt, lambda_pw=cfg.lambda_pw,
                                bin_values=self.zm.rubric.bin_values, validate=False)
                rewards = out.reward.reshape(-1)
                if cfg.method == "grpo" and cfg.reward_source == "parsed":
                    text = self.zm.tokenizer.batch_decode(traces, skip_special_tokens=True)
                    parsed = torch.tensor([parse_score(t) for t in text], device=rewards.device)
                    s_rows = scores.repeat_interleave(g, 1).reshape(-1)
                    rewards = parsed_rewards(parsed, s_rows, self.zm.rubric.bin_values)
                    from zreward_kernels import group_advantage

                    advantages = group_advantage(rewards.float(), group_size=g, validate=False)[0]
                else:
                    advantages = out.advantage.reshape(-1)
            logp_ref = None
            if ref is not None:
                r_scorer = self.ctx.scorer_for(ref)
                logp_ref, _, _ = trace_forward(r_scorer, r_images, r_prompts, r_dims, traces, forced,
                                               self.score_ids, extra, temperature=tau)
        policy.train()
        stats: Dict[str, float] = {"reward": float(rewards.mean()), "trace_len": float(mask.sum(1).float().mean()),
                                   "forced_marker": float(np.mean(forced))}
        norms = []  # read back once after the inner updates (no host sync per update)
        clips = []
        for u in range(cfg.inner_updates):
            pol = None
            if self.ctx.use_liger:
                from ..hf import lm_head_params

                try:
                    (h, tok), _, score_logits = module(r_images, r_prompts, r_dims, traces, forced, extra, True)
                    weight, bias = lm_head_params(policy)
                    pol, pstats = liger_token_loss(h, tok, weight, bias, logp_old, logp_ref, advantages, mask,
                                                   cfg.clip_eps, cfg.beta, compiled=h.is_cuda, temperature=tau)
                except Exception as exc:  # noqa: BLE001 - auto falls back, an explicit request raises
                    if cfg.policy_loss == "liger":
                        raise
                    warnings.warn(f"Liger's fused GRPO loss failed ({type(exc).__name__}: {exc}); policy_loss='auto' "
                                  "falls back to the PyTorch policy loss for the rest of this run", RuntimeWarning)
                    self.ctx.use_liger = False
                    pol = None
            if pol is None:
                logp, _, score_logits = module(r_images, r_prompts, r_dims, traces, forced, extra, temperature=tau)
                pol, pstats = grpo_token_loss(logp, logp_old, logp_ref, advantages, mask, cfg.clip_eps, cfg.beta)
            loss = pol
            if cfg.method == "gdso":
                k = score_logits.shape[-1]
                direct = gdso_loss(score_logits.view(len(batch), 2, g, k), scores, lambda_pt=cfg.lambda_pt,
                                   lambda_pw=cfg.lambda_pw, alpha_pt=cfg.alpha_pt, alpha_pw=cfg.alpha_pw,
                                   bin_values=self.zm.rubric.bin_values, validate=False)
                loss = loss + direct.loss
                if u == 0:
                    stats.update(ce=float(direct.ce.mean()), pw=float(direct.pw.mean()))
            acc.backward(loss)
            if cfg.max_grad_norm > 0:  # the norm before clipping, averaged over the inner updates
                norms.append(acc.clip_grad_norm_(module.parameters(), cfg.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            clips.append(pstats["clip_frac"])
            if u == 0:
                stats.update(policy_loss=float(pol.detach()), loss=float(loss.detach()),
                             kl_first_inner=pstats["policy_kl"])
        stats["policy_kl_last"] = pstats["policy_kl"]
        stats["clip_frac"] = float(np.mean(clips))
        if norms:
            stats["grad_norm"] = float(torch.stack([torch.as_tensor(n, dtype=torch.float32) for n in norms]).mean())
        del ref
        return stats
