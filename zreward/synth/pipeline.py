"""The whole Z-Reward pipeline on the synthetic world (what ``zreward demo`` / ``make demo`` runs).

1. Build the world (cached): prompts, candidates, one rater label per training item, trimmed means
   of five raters on held-out test prompts.
2. Two tiny Qwen2-VL bases (teacher size and a smaller student size) get a short perception
   pre-training: after the scoring question they learn to write what the image shows (objects,
   relation, visible defects) and end with the ``<|score|>`` marker -- so they start like a
   pretrained base that can describe scenes, and a sampled trace is a description.  The teacher
   base then gets a reasoning cold start (the same description plus CE on the score read at the
   marker), the starting point of the GRPO and GDSO teachers.
3. Teachers: SFT (scores directly), GRPO (policy term, expectation reward) and GDSO (traces, GDSO
   rewards, direct losses).  Students (smaller): SFT, OPD (on-policy distillation from the GDSO
   teacher) and RISD (forward KL to the GDSO teacher's trace-conditioned distributions).
4. Every model is evaluated on the test set with HPA, margin HPA, PLCC and SRCC (pooled and per
   dimension) and its output tokens per score; models that reason (GRPO, GDSO, OPD) are read after
   sampled traces (``eval_traces`` of them at ``eval_temperature``, averaged), the others directly.
5. ``results.md`` / ``results.json`` (tables like the report's Tables 2 and 3) and plots: HPA over
   training steps per method, the student's calibration, score distributions.

Why reasoning can help here (see ``shared/docs/MEASURED.md``): perception is cheap to learn,
comparing it with the prompt is expensive for a model that scores directly; a trace that first
describes the image turns alignment into a comparison of text with text.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List

import numpy as np
import torch

from .. import _json as strict_json
from ..data import RatedItem
from ..evaluate import evaluate_items, evaluate_with_traces
from ..model import ZRewardModel
from ..rubric import Rubric
from ..scorer import RewardScorer
from ..tiny import tiny_qwen2_vl
from ..train import TrainConfig, train
from ..train.rl import ensure_marker, trace_forward
from zreward_kernels import rubric_loss
from zreward_kernels.reference import bin_index
from .dataset import WORLD_WORDS, WorldConfig, build_world, to_items
from .world import DIMENSIONS

#: a short rubric for the world (its text is part of every prefix, so it is kept brief)
WORLD_RUBRIC = Rubric(
    descriptions={
        "alignment": "objects colours shapes and relation as the prompt says",
        "realism": "no noise banding blocks or colour cast",
        "aesthetics": "centred composition good contrast no clutter",
        "plausibility": "objects stand on the ground do not overlap shadows away from the sun",
    },
    preamble="score from {low} to {high} .\n",
    question_template="rate {dimension} .",
)


@dataclass
class DemoConfig:
    preset: str = "quick"
    out_dir: str = "demo_out"
    seed: int = 0
    n_prompts: int = 64
    candidates: int = 4
    image_size: int = 56
    teacher_hidden: int = 64
    student_hidden: int = 32
    layers: int = 2
    pretrain_steps: int = 500
    pretrain_batch: int = 16
    direct_steps: int = 200  # sft teacher, sft student, risd student
    direct_batch: int = 16
    rl_steps: int = 30  # grpo, gdso, opd
    rl_pairs: int = 4
    group_size: int = 4
    max_trace_tokens: int = 40
    eval_traces: int = 2
    eval_temperature: float = 0.5
    cold_start_steps: int = 300
    curve_points: int = 3
    lr: float = 2e-3
    rl_lr: float = 2e-4  # policy-gradient methods: a small step keeps the cold start's language intact
    rl_temperature: float = 0.7
    methods: List[str] = field(default_factory=lambda: ["sft_teacher", "grpo_teacher", "gdso_teacher",
                                                         "sft_student", "opd_student", "risd_student"])


PRESETS = {
    "quick": DemoConfig(),
    "full": DemoConfig(preset="full", n_prompts=300, pretrain_steps=1200, cold_start_steps=800, direct_steps=1500,
                       rl_steps=120, rl_pairs=8, group_size=6, eval_traces=3, curve_points=4, teacher_hidden=96,
                       student_hidden=48),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_base(hidden: int, layers: int, seed: int) -> ZRewardModel:
    torch.manual_seed(seed)  # the pipeline owns the process: the weights and what follows draw from one stream
    model, proc = tiny_qwen2_vl(seed=None, hidden=hidden, layers=layers, vision_depth=2, max_pixels=56 * 56,
                                extra_words=WORLD_WORDS)
    zm = ZRewardModel(model, proc, rubric=WORLD_RUBRIC)
    ensure_marker(zm)
    return zm


def pretrain(zm: ZRewardModel, samples, steps: int, batch: int, lr: float, seed: int,
             score_weight: float = 0.0) -> List[float]:
    """Perception pre-training: teacher-forced descriptions as the trace after the scoring question.

    With ``score_weight > 0`` it is the reasoning cold start instead: the same description loss plus
    ``score_weight`` x cross-entropy of the score read at the marker against the item's (single)
    rater label, so the model learns to score after its own description before GRPO / GDSO.
    """
    marker = ensure_marker(zm)
    scorer = RewardScorer(zm, in_vocab_mass=False, autocast=False)
    ids = torch.tensor(zm.score_tokens.token_ids)
    tok = zm.tokenizer
    opt = torch.optim.AdamW(zm.model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    train_s = [s for s in samples if s.split == "train"]
    curve = []
    zm.model.train()
    for step in range(steps):
        pick = rng.integers(0, len(train_s), batch)
        rows = [train_s[i] for i in pick]
        dims = [DIMENSIONS[int(rng.integers(4))] for _ in rows]
        traces = [tok(s.description(), add_special_tokens=False)["input_ids"] + [marker] for s in rows]
        logp, mask, score_logits = trace_forward(scorer, [s.image for s in rows], [s.prompt for s in rows], dims,
                                                 traces, [False] * len(rows), ids)
        loss = -(logp * mask).sum() / mask.sum()
        if score_weight > 0:
            target = bin_index(torch.tensor([s.ratings[d][0] for s, d in zip(rows, dims)], dtype=torch.float64),
                               zm.rubric.bin_values)
            loss = loss + score_weight * rubric_loss(score_logits, target=target, bin_values=zm.rubric.bin_values,
                                                     validate=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    zm.model.eval()
    return curve


def _description_accuracy(zm: ZRewardModel, samples, n: int = 24) -> float:
    """Fraction of test images whose greedy description names the drawn objects exactly."""
    from ..train.rl import _generation_inputs, structural_tokens

    test = [s for s in samples if s.split == "test"][:n]
    scorer = RewardScorer(zm, in_vocab_mass=False, autocast=False)
    marker = ensure_marker(zm)
    enc = _generation_inputs(scorer, [s.image for s in test], [s.prompt for s in test], ["alignment"] * len(test))
    with torch.no_grad():
        seq = zm.model.generate(**enc, do_sample=False, max_new_tokens=24, eos_token_id=marker,
                                pad_token_id=zm.tokenizer.pad_token_id, suppress_tokens=structural_tokens(
                                    zm.tokenizer, marker))
    text = zm.tokenizer.batch_decode(seq[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    ok = [t.split(" . ")[0].strip() == s.description().split(" . ")[0].strip() for t, s in zip(text, test)]
    return float(np.mean(ok))


def _curve(out_dir: str) -> List[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(x) for x in f) if "eval_hpa" in r]


def run(cfg: DemoConfig) -> Dict:
    t0 = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    world = WorldConfig(n_prompts=cfg.n_prompts, candidates=cfg.candidates, image_size=cfg.image_size, seed=cfg.seed)
    samples = build_world(world)
    train_items, test_items = to_items(samples, "train"), to_items(samples, "test")
    _log(f"world: {len(samples)} images ({len(train_items)} training items with one rater, {len(test_items)} test "
         f"items with 5 raters); preset {cfg.preset}")
    from .judge import agreement

    judge_agree = agreement([s for s in samples if s.split == "test"])
    _log("analytic judge vs latent scores (test images), SRCC: "
         + ", ".join(f"{k} {v:.3f}" for k, v in judge_agree.items()))

    bases = {}
    pre = {}
    for role, hidden in (("teacher", cfg.teacher_hidden), ("student", cfg.student_hidden)):
        zm = build_base(hidden, cfg.layers, cfg.seed)
        curve = pretrain(zm, samples, cfg.pretrain_steps, cfg.pretrain_batch, cfg.lr, cfg.seed)
        acc = _description_accuracy(zm, samples)
        path = os.path.join(cfg.out_dir, f"base_{role}")
        zm.save_pretrained(path)
        bases[role] = path
        pre[role] = {"loss_first": curve[0], "loss_last": curve[-1], "object_description_accuracy": acc}
        _log(f"perception pre-training ({role}, hidden {hidden}): description loss {curve[0]:.3f} -> {curve[-1]:.3f}, "
             f"objects described exactly on {acc:.0%} of test images")
    # reasoning cold start for the teachers that score after a trace (GRPO, GDSO)
    zm = ZRewardModel.from_pretrained(bases["teacher"])
    curve = pretrain(zm, samples, cfg.cold_start_steps, cfg.pretrain_batch, cfg.lr, cfg.seed + 1, score_weight=1.0)
    bases["reasoning"] = os.path.join(cfg.out_dir, "base_reasoning_teacher")
    zm.save_pretrained(bases["reasoning"])
    pre["reasoning cold start"] = {"loss_first": curve[0], "loss_last": curve[-1],
                                   "object_description_accuracy": _description_accuracy(zm, samples)}
    _log(f"reasoning cold start (teacher): description + score loss {curve[0]:.3f} -> {curve[-1]:.3f}")

    n_eval = max(cfg.curve_points, 1)
    common = dict(lr=cfg.lr, device="cpu", save_every=0, seed=cfg.seed, log_every=5, schedule="cosine",
                  warmup_steps=0, overwrite_output_dir=True)  # a re-run of the demo replaces its runs
    rl = dict(lr=cfg.rl_lr, sample_temperature=cfg.rl_temperature, max_trace_tokens=cfg.max_trace_tokens)
    runs = {
        "sft_teacher": dict(method="sft", model=bases["teacher"], max_steps=cfg.direct_steps, batch_size=cfg.direct_batch),
        "grpo_teacher": dict(method="grpo", model=bases["reasoning"], max_steps=cfg.rl_steps, batch_size=cfg.rl_pairs,
                             group_size=cfg.group_size, eval_traces=1, **rl),
        "gdso_teacher": dict(method="gdso", model=bases["reasoning"], max_steps=cfg.rl_steps, batch_size=cfg.rl_pairs,
                             group_size=cfg.group_size, eval_traces=1, **rl),
        "sft_student": dict(method="sft", model=bases["student"], max_steps=cfg.direct_steps, batch_size=cfg.direct_batch),
        "opd_student": dict(method="opd", model=bases["student"], max_steps=cfg.rl_steps, batch_size=cfg.rl_pairs * 2,
                            group_size=1, teacher="@gdso_teacher", eval_traces=1, **rl),  # one trace per item (SPEC)
        "risd_student": dict(method="risd", model=bases["student"], max_steps=cfg.direct_steps,
                             batch_size=cfg.direct_batch, teacher="@gdso_teacher", teacher_traces=1,
                             max_trace_tokens=cfg.max_trace_tokens),
    }
    curve_items = [it for it in test_items if int(it.group[1:]) % 2 == 0]  # half the test prompts for curves
    results = {}
    for name in cfg.methods:
        spec = dict(runs[name])
        if str(spec.get("teacher", "")).startswith("@"):
            spec["teacher"] = os.path.join(cfg.out_dir, spec["teacher"][1:], "final")
        out = os.path.join(cfg.out_dir, name)
        steps = spec["max_steps"]
        tc = TrainConfig(output_dir=out, eval_every=max(steps // n_eval, 1), **{**common, **spec})
        t = time.time()
        train(tc, items=train_items, eval_items=curve_items)
        train_s = time.time() - t
        zm = ZRewardModel.from_pretrained(os.path.join(out, "final"))
        reasoning = name in ("grpo_teacher", "gdso_teacher", "opd_student")  # they score after a trace
        t = time.time()
        if reasoning:
            torch.manual_seed(cfg.seed)
            rep = evaluate_with_traces(zm, test_items, traces=cfg.eval_traces, trace_tokens=cfg.max_trace_tokens,
                                       temperature=cfg.eval_temperature)
            tokens = _mean_trace_tokens(zm, test_items[:32], cfg.max_trace_tokens, cfg.eval_temperature) + 1
        else:
            rep = evaluate_items(RewardScorer(zm, in_vocab_mass=False), test_items, plots=False, progress=False)
            tokens = 1.0
        results[name] = {"report": rep, "train_s": round(train_s, 1), "eval_s": round(time.time() - t, 1),
                         "tokens_per_score": round(tokens, 1), "curve": _curve(out)}
        p = rep["pooled"]
        _log(f"{name}: HPA {p['hpa']:.4f}, margin HPA {p['margin_hpa']:.4f}, PLCC {p['plcc']:.4f}, SRCC {p['srcc']:.4f}"
             f" ({tokens:.0f} output tokens per score; trained {train_s:.0f} s)")
    summary = {"config": asdict(cfg), "pretraining": pre, "judge_agreement": judge_agree, "results": results,
               "minutes": round((time.time() - t0) / 60, 2)}
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        strict_json.dump(summary, f, indent=2, default=float)
    table = results_markdown(summary)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table)
    plots = write_demo_plots(cfg.out_dir, summary, test_items)
    _log(f"done in {summary['minutes']:.1f} min; wrote results.md, results.json" + (f", {', '.join(plots)}" if plots else ""))
    print()
    print(table)
    return summary


def _mean_trace_tokens(zm: ZRewardModel, items: List[RatedItem], max_tokens: int, temperature: float) -> float:
    from ..train.rl import sample_traces
    from ..train.teacher import load_image

    marker = ensure_marker(zm)
    scorer = RewardScorer(zm, in_vocab_mass=False)
    traces, _ = sample_traces(scorer, zm.model, [load_image(it) for it in items], [it.prompt for it in items],
                              [it.dimension for it in items], 1, max_tokens, temperature, marker)
    return float(np.mean([len(t) for t in traces]))


ROLE = {"sft_teacher": ("teacher", "SFT"), "grpo_teacher": ("teacher", "GRPO"), "gdso_teacher": ("teacher", "GDSO"),
        "sft_student": ("student", "SFT"), "opd_student": ("student", "OPD"), "risd_student": ("student", "RISD")}


def results_markdown(summary: Dict) -> str:
    res = summary["results"]
    cfg = summary["config"]
    lines = [f"# Z-Reward on the synthetic world ({cfg['preset']} preset, {summary['minutes']:.1f} min on this machine)",
             "", "Test set: held-out prompts, references are trimmed means of five simulated raters.", "",
             "| model | method | HPA | margin HPA | PLCC | SRCC | output tokens per score |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        role, method = ROLE.get(name, ("", name))
        p = r["report"]["pooled"]
        lines.append(f"| {role} | {method} | {p['hpa']:.4f} | {p['margin_hpa']:.4f} | {p['plcc']:.4f} | {p['srcc']:.4f}"
                     f" | {r['tokens_per_score']:.0f} |")
    lines += ["", "HPA per dimension:", "", "| model | method | " + " | ".join(DIMENSIONS) + " |",
              "|---|---|" + "---|" * len(DIMENSIONS)]
    for name, r in res.items():
        role, method = ROLE.get(name, ("", name))
        vals = " | ".join(f"{r['report'].get(d, {}).get('hpa', float('nan')):.4f}" for d in DIMENSIONS)
        lines.append(f"| {role} | {method} | {vals} |")
    pre = summary["pretraining"]
    lines += ["", "Perception pre-training: " + "; ".join(
        f"{k} description loss {v['loss_first']:.2f} -> {v['loss_last']:.2f}, objects described exactly on "
        f"{v['object_description_accuracy']:.0%} of test images" for k, v in pre.items()) + ".",
        "Analytic judge vs latent scores (SRCC): " + ", ".join(
            f"{k} {v:.3f}" for k, v in summary["judge_agreement"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_demo_plots(out_dir: str, summary: Dict, test_items: List[RatedItem]) -> List[str]:
    try:  # Figure, not pyplot: no global backend switch in the caller's process
        from matplotlib.figure import Figure
    except ImportError:
        return []
    written = []
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    panels = {"direct": ("sft_teacher", "sft_student", "risd_student"), "policy": ("grpo_teacher", "gdso_teacher",
                                                                                   "opd_student")}
    for ax, (kind, names) in zip(axes, panels.items()):
        for name in names:
            c = summary["results"].get(name, {}).get("curve", [])
            if c:
                ax.plot([x["step"] for x in c], [x["eval_hpa"] for x in c], "o-",
                        label=" ".join(ROLE.get(name, ("", name))[::-1]))
        ax.axhline(0.5, color="k", lw=0.8, ls=":")
        ax.set_xlabel("optimizer step" if kind == "direct" else "outer iteration (sample + inner updates)")
        ax.set_title("direct losses" if kind == "direct" else "policy methods (read after traces)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("HPA on half of the test prompts")
    fig.tight_layout()
    written.append(os.path.join(out_dir, "hpa_over_steps.png"))
    fig.savefig(written[-1], dpi=120)
    risd = os.path.join(out_dir, "risd_student", "final")
    if os.path.isdir(risd):
        zm = ZRewardModel.from_pretrained(risd)
        evaluate_items(RewardScorer(zm, in_vocab_mass=False), test_items, out_dir=os.path.join(out_dir, "risd_eval"),
                       plots=True, progress=False)
        written.append(os.path.join(out_dir, "risd_eval", "reliability.png"))
        written.append(os.path.join(out_dir, "risd_eval", "scatter.png"))
        written.append(_distribution_plot(out_dir, test_items, Figure))
    return written


def _distribution_plot(out_dir: str, test_items: List[RatedItem], Figure) -> str:
    """Per dimension: the RISD student's mean predicted distribution over the bins against the raters' histogram."""
    from ..metrics import rater_histograms

    with open(os.path.join(out_dir, "risd_eval", "predictions.jsonl")) as f:
        preds = [json.loads(x) for x in f]
    by_key = {(it.id, it.dimension): it for it in test_items}
    bins = WORLD_RUBRIC.bin_values
    fig = Figure(figsize=(3.2 * len(DIMENSIONS), 3))
    axes = fig.subplots(1, len(DIMENSIONS), sharey=True)
    for ax, d in zip(axes, DIMENSIONS):
        rows = [p for p in preds if p["dimension"] == d]
        model = np.mean([p["probs"] for p in rows], axis=0)
        raters = rater_histograms([by_key[(p["id"], d)].ratings for p in rows], bins).mean(0)
        x = np.arange(len(bins))
        ax.bar(x - 0.2, raters, width=0.4, label="raters")
        ax.bar(x + 0.2, model, width=0.4, label="RISD student")
        ax.set_xticks(x[::2], [f"{v:.0f}" for v in bins[::2]])
        ax.set_title(d)
    axes[0].set_ylabel("share of test items")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "score_distributions.png")
    fig.savefig(path, dpi=120)
    return path


__all__ = ["DemoConfig", "PRESETS", "run", "replace"]
