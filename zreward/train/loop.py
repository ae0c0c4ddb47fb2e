"""The training loop shared by every method, on accelerate (DDP / FSDP / DeepSpeed by its config).

* Data order is a function of (seed, epoch): each epoch is a fixed permutation of the items, cut
  into global batches of ``batch_size`` (the last partial batch of an epoch is dropped); process r
  of W takes every W-th item of the global batch, then splits its share into ``grad_accum``
  micro-batches.  Step s therefore always sees the same items, which makes resuming exact without
  storing sampler state.
* Checkpoints (``checkpoint-<step>/``) hold accelerate's state (model weights as safetensors,
  optimizer, scheduler, RNG) and ``trainer_state.json``; ``resume=True`` continues from the newest
  one.  Only our own checkpoints are loaded (accelerate unpickles its optimizer state).
* Metrics go to ``metrics.jsonl`` (and TensorBoard when installed); ``final/`` holds the trained
  ``ZRewardModel``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from zreward_kernels import rubric_loss
from zreward_kernels.reference import bin_index

from .. import _json as strict_json
from ..data import RatedItem, atomic_path, check_one_image_per_key, load_manifest, missing_images
from ..metrics import rater_histograms
from ..scorer import named_images
from .config import TrainConfig
from .teacher import item_key, load_image, load_targets, sharded_targets, teacher_source


class TraceModule(nn.Module):
    """The trainable forward of the policy methods: (queries, traces) -> (token log-probs, mask, score logits)."""

    def __init__(self, zmodel):
        super().__init__()
        from ..scorer import RewardScorer

        self.model = zmodel.model
        self._scorer = RewardScorer(zmodel, in_vocab_mass=False, autocast=False)
        self._ids = list(zmodel.score_tokens.token_ids)

    def forward(self, images, prompts, dims, traces, forced, extra=None, fused_head=False, temperature=1.0):
        from .rl import trace_forward

        ids = torch.tensor(self._ids, device=next(self.model.parameters()).device)
        return trace_forward(self._scorer, images, prompts, dims, traces, forced, ids, extra, fused_head,
                             temperature=temperature)


def _pair_indices(items: Sequence[RatedItem]) -> List[tuple]:
    """Index pairs (a < b) of items in the same group and dimension whose references differ."""
    by = {}
    for i, it in enumerate(items):
        by.setdefault((it.group, it.dimension), []).append(i)
    out = []
    for key in sorted(by):
        idx = by[key]
        out.extend((a, b) for j, a in enumerate(idx) for b in idx[j + 1:] if items[a].reference != items[b].reference)
    return out


def make_pairs(items: Sequence[RatedItem]) -> List[tuple]:
    """Same-group, same-dimension pairs with different references, the better-rated item first."""
    return [(items[a], items[b]) if items[a].reference > items[b].reference else (items[b], items[a])
            for a, b in _pair_indices(items)]


class ScoreModule(nn.Module):
    """The trainable forward (images, prompts, dimensions) -> score logits, as one module so that
    accelerate's wrappers (DDP, FSDP) see every call."""

    def __init__(self, zmodel):
        super().__init__()
        from ..scorer import RewardScorer

        self.model = zmodel.model  # registers the HF model's parameters
        self._zmodel = [zmodel]  # a list keeps it out of the module tree
        self._scorer = RewardScorer(zmodel, in_vocab_mass=False, autocast=False)

    def forward(self, images, prompts, dimensions):
        return self._scorer.query_logits(images, prompts, dimensions)


def _targets(chunk: Sequence[RatedItem], bins, device) -> torch.Tensor:
    """Hard CE targets: the bin nearest to each item's reference score."""
    return bin_index(torch.tensor([it.reference for it in chunk], dtype=torch.float64), bins).to(device)


def _schedule(cfg: TrainConfig):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1.0 - t

    return factor


def _apply_resumed_settings(opt, sched, cfg: TrainConfig) -> None:
    """After a checkpoint's optimizer and scheduler state are loaded, the run's own ``lr``,
    ``weight_decay`` and schedule (``max_steps``, ``warmup_steps``, ``schedule``) govern from the
    resumed step on, as the resume warning says: the loaded state carries the old run's base LR and
    weight decay (a changed ``lr`` was ignored) and the LR its schedule set last (an extended
    ``max_steps`` trained its first resumed step at the old schedule's final LR, 0 under decay).
    With unchanged settings this sets the values the state already holds (a resume stays exact)."""
    inner = getattr(sched, "scheduler", sched)  # accelerate's wrapper holds the LambdaLR
    inner.base_lrs = [cfg.lr for _ in inner.base_lrs]
    for g, base, factor in zip(opt.param_groups, inner.base_lrs, inner.lr_lambdas):
        g["initial_lr"] = base
        g["lr"] = base * factor(inner.last_epoch)  # the LR LambdaLR sets at this step
        g["weight_decay"] = cfg.weight_decay
    inner._last_lr = [g["lr"] for g in opt.param_groups]


def _step_schedule(acc, sched) -> None:
    """One step of the LR schedule per optimizer step, whatever the number of processes; none when
    fp16 loss scaling skipped the optimizer step (what accelerate's wrapper did with one process)."""
    if not acc.optimizer_step_was_skipped:
        sched.step()


def batch_indices(n_items: int, cfg: TrainConfig, step: int, rank: int, world: int) -> List[List[int]]:
    """This process's micro-batches (item indices) for optimizer step ``step`` (0-based)."""
    per_epoch = n_items // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {n_items} training items")
    epoch, b = divmod(step, per_epoch)
    perm = np.random.default_rng(cfg.seed + 7919 * epoch).permutation(n_items)
    global_batch = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
    mine = global_batch[rank::world]
    return [list(map(int, c)) for c in np.array_split(mine, cfg.grad_accum)]


def _step_of(checkpoint: str) -> int:
    return int(os.path.basename(checkpoint).rsplit("-", 1)[1])


def _checkpoints(output_dir: str, complete: Optional[bool] = None) -> List[str]:
    """``checkpoint-<step>`` folders by step; ``complete=True`` / ``False``: only those with / without
    their ``trainer_state.json``, which is written last (atomically), so a folder without it is
    what a run killed while saving left behind."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    paths = [os.path.join(output_dir, d) for _, d in sorted(found)]
    if complete is None:
        return paths
    return [p for p in paths if os.path.isfile(os.path.join(p, "trainer_state.json")) == complete]


def refuse_sharded_parameters(acc) -> None:
    """The trainers keep a whole copy of the model on every process (DDP; DeepSpeed ZeRO-1/2): the
    evaluation during training and the final save run the unwrapped model on the main process
    alone, and RL sampling calls ``generate`` with per-process lengths.  With sharded parameters
    (FSDP, DeepSpeed ZeRO-3) the first would hang on a collective only one process joins and the
    second would save shards, so such a launch is refused before any model is loaded."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if kind == DistributedType.FSDP or kind == DistributedType.MEGATRON_LM or (
            kind == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3):
        name = "DeepSpeed ZeRO-3" if kind == DistributedType.DEEPSPEED else str(kind.value)
        raise NotImplementedError(
            f"the zreward trainers need the whole model on every process (DDP, or DeepSpeed ZeRO-1/2); this launch "
            f"shards the parameters ({name}): evaluation and the final save run on the main process alone and would "
            "hang or save shards. Launch with DDP or ZeRO-2 (the optimizer state is still sharded there)")


def _fresh_accelerate_state() -> None:
    """accelerate keeps its state in process-wide singletons: a second ``train()`` in one process (a
    notebook, the demo) with another ``mixed_precision`` raised, and one with ``device="cuda"`` after
    a CPU run silently kept the CPU.  Each run starts from a clean state; under a distributed launch
    the process group (``PartialState``) is kept and only the precision and accumulation state reset."""
    from accelerate.state import AcceleratorState, GradientState

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not distributed)
    GradientState._reset_state()


def _previous_run(output_dir: str) -> List[str]:
    """The entries a previous run left in ``output_dir`` (what a new run would mix with)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n in ("metrics.jsonl", "final", "tb") or re.fullmatch(r"checkpoint-\d+", n))


def train(cfg: TrainConfig, items: Optional[List[RatedItem]] = None, eval_items: Optional[List[RatedItem]] = None,
          resume: bool = False, on_step: Optional[Callable[[int, Dict], None]] = None) -> Dict:
    """Run ``cfg.method``; returns the last logged metrics.  See the module docstring."""
    cfg.validate(has_items=items is not None)
    if cfg.device == "cuda" and not torch.cuda.is_available():  # accelerate would quietly train on the CPU
        raise ValueError(f"device='cuda', but no CUDA device is available here (torch {torch.__version__}); "
                           "use device='auto' or 'cpu'")
    previous = [] if resume else _previous_run(cfg.output_dir)
    if previous and not cfg.overwrite_output_dir:
        raise ValueError(f"output_dir {cfg.output_dir!r} holds a previous run ({', '.join(previous[:4])}"
                         f"{', ...' if len(previous) > 4 else ''}); resume it (resume=True, --resume) or set "
                         "overwrite_output_dir=true to delete those entries first")
    from ..model import ZRewardModel  # imported late: config errors must not wait for transformers
    from ..evaluate import image_key
    from ..scorer import unreadable_images

    for what, given, manifest in (("items", items, cfg.train_manifest), ("eval_items", eval_items, cfg.eval_manifest)):
        if given is not None and manifest:
            warnings.warn(f"train() got {what}, so the config's {'train' if what == 'items' else 'eval'}_manifest "
                          f"{manifest!r} is not read", stacklevel=2)
    # a generator would be used up by the first check that walks it
    items = load_manifest(cfg.train_manifest) if items is None else list(items)
    if eval_items is None and cfg.eval_manifest:
        eval_items = load_manifest(cfg.eval_manifest)
    elif eval_items is not None:
        eval_items = list(eval_items)
    if cfg.eval_every and eval_items and all(it.reference is None for it in eval_items):
        raise ValueError(f"eval_every={cfg.eval_every} but none of the {len(eval_items)} eval items has a score or "
                         "ratings to evaluate against")
    for what, its in (("training", items), ("eval", eval_items or [])):  # a missing file would stop a run mid-way
        missing = missing_images(its)
        if missing:
            raise FileNotFoundError(f"{len(missing)} {what} image file(s) not found, e.g. {missing[:3]}")
        bad = unreadable_images(sorted({it.image for it in its if isinstance(it.image, str)}))  # headers only
        if bad:
            raise ValueError(f"{len(bad)} {what} image file(s) are not readable images, e.g. {bad[0][0]}: {bad[0][1]}")
    if cfg.method == "risd":  # its targets are computed, cached and looked up by item id
        check_one_image_per_key(items, item_key, "training items", "teacher targets are keyed by id, dimension and prompt")
    if eval_items:
        check_one_image_per_key(eval_items, image_key, "eval items", "an in-memory image is known by its id in evaluation")
    if cfg.eval_every and not eval_items:
        warnings.warn(f"eval_every={cfg.eval_every} but there are no eval items (eval_manifest or eval_items): "
                      "no evaluation will run", stacklevel=2)
    if cfg.needs_labels():
        unlabelled = [it for it in items if it.reference is None]
        if unlabelled:
            raise ValueError(f"method {cfg.method!r} needs a score or ratings on every item; "
                             f"{len(unlabelled)} item(s) have neither, e.g. {unlabelled[0].id!r}")
        if cfg.method == "sft" and cfg.soft_labels and any(not it.ratings for it in items):
            raise ValueError("soft_labels=True needs 'ratings' on every item")
    rl = cfg.method in ("gdso", "grpo", "opd")
    units = items
    if cfg.method in ("gdso", "grpo"):
        units = make_pairs(items)
        if not units:
            raise ValueError(f"{cfg.method} needs same-prompt pairs (same group and dimension, different scores); "
                             "the training items have none")
    if cfg.batch_size > len(units):
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(units)} training "
                         f"{'pairs' if units is not items else 'items'}")
    for name in ("model", "teacher"):  # named by their config key, before accelerate or any model starts
        path = getattr(cfg, name)
        if path and not os.path.isdir(path):
            raise FileNotFoundError(f"{name} {path!r} is not a directory (a ZRewardModel saved with save_pretrained)")
    if cfg.method == "risd" and not cfg.teacher and not os.path.isfile(cfg.teacher_cache):
        # a cache alone must exist: nothing could make it (a TypeError once the student had loaded)
        raise FileNotFoundError(f"teacher_cache {cfg.teacher_cache!r} does not exist, and no teacher is given to "
                                "compute it: name the teacher model directory ('teacher') or an existing cache")

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    _fresh_accelerate_state()
    # step_scheduler_with_optimizer=False: accelerate's scheduler wrapper otherwise steps the schedule
    # num_processes times per call (it assumes each process loads a full batch), but batch_size here is
    # the global batch, split over the processes, and the schedule counts optimizer steps: under two
    # processes the warmup and the decay ran twice as fast and the LR sat at 0 for the second half
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, step_scheduler_with_optimizer=False)
    refuse_sharded_parameters(acc)
    if previous:  # overwrite_output_dir: the main process deletes the previous run's entries
        if acc.is_main_process:
            for name in previous:
                path = os.path.join(cfg.output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        acc.wait_for_everyone()
    if cfg.batch_size % (acc.num_processes * cfg.grad_accum):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of processes x grad_accum "
                         f"({acc.num_processes} x {cfg.grad_accum})")
    set_seed(cfg.seed)
    zm = ZRewardModel.from_pretrained(cfg.model, device=acc.device)
    lo, hi = zm.rubric.bin_values[0], zm.rubric.bin_values[-1]
    for what, its in (("training", items), ("eval", eval_items or [])):  # before any step, not when a batch needs it
        bad = next((it for it in its if it.dimension not in zm.rubric.dimensions), None)
        if bad is not None:
            raise ValueError(f"{what} item {bad.id!r} has dimension {bad.dimension!r}; the model's rubric has "
                             f"{list(zm.rubric.dimensions)}")
        zm.check_item_prompts(its, f"{what} item")  # a special token's text in a prompt
        # a label off the scale (say 1..10 data for a 1..5 rubric) would be snapped to the end bins
        bad = next((it for it in its if any(not lo <= v <= hi for v in it.labels)), None)
        if bad is not None:
            raise ValueError(f"{what} item {bad.id!r} has a score or rating outside the rubric's scale [{lo}, {hi}] "
                             f"(score {bad.score}, ratings {bad.ratings}); rescale the labels to the bins")
    zm.model.train()
    if cfg.grad_checkpointing:  # the newer name where transformers has it
        (getattr(zm.model, "activation_checkpointing_enable", None) or zm.model.gradient_checkpointing_enable)()
    bins = zm.rubric.bin_values

    targets = None
    if cfg.method == "risd":
        source = teacher_source(cfg.teacher, cfg.teacher_traces, cfg.max_trace_tokens,
                                cfg.sample_temperature) if cfg.teacher else None
        if cfg.teacher_cache and os.path.exists(cfg.teacher_cache):
            targets = load_targets(cfg.teacher_cache, items, bins, source=source)
        else:
            teacher = ZRewardModel.from_pretrained(cfg.teacher, device=acc.device).eval()
            if teacher.rubric.bin_values != bins:
                raise ValueError("teacher and student use different score bins")
            lacking = sorted({it.dimension for it in items} - set(teacher.rubric.dimensions))
            if lacking:  # the rubric's own error named no model, came when that item's batch did, and under
                # several processes only on the one holding it, while the others waited in the gather
                raise ValueError(f"the teacher's rubric has no dimension {lacking[0]!r} (it has "
                                 f"{list(teacher.rubric.dimensions)}), which training items use")
            # split over the processes: each computes its share once, all get every row
            targets = sharded_targets(acc, teacher, items, traces=cfg.teacher_traces, trace_tokens=cfg.max_trace_tokens,
                                      temperature=cfg.sample_temperature)
            del teacher
            if cfg.teacher_cache and acc.is_main_process:
                from .teacher import save_targets

                save_targets(cfg.teacher_cache, targets, items, source, bins)

    marker = teacher_zm = None
    if rl:
        from .rl import ensure_marker

        marker = ensure_marker(zm)  # before the optimizer: it may add an embedding row
        if cfg.method == "opd":
            teacher_zm = ZRewardModel.from_pretrained(cfg.teacher, device=acc.device).eval()
            if ensure_marker(teacher_zm) != marker or teacher_zm.score_tokens.token_ids != zm.score_tokens.token_ids:
                raise ValueError("opd needs a teacher with the student's tokenizer (marker and score tokens differ)")
            t_vocab, s_vocab = teacher_zm.tokenizer.get_vocab(), zm.tokenizer.get_vocab()  # each built once
            if t_vocab != s_vocab:  # the advantage compares token by token
                diff = set(t_vocab.items()) ^ set(s_vocab.items())
                raise ValueError(f"opd needs a teacher with the student's tokenizer: the vocabularies differ in "
                                 f"{len(diff)} entries, e.g. {sorted(diff)[:3]}; the per-token advantage "
                                 "log pi_T(y_t) - log pi_S(y_t) would compare different tokens")
            for p_ in teacher_zm.model.parameters():
                p_.requires_grad_(False)
    module = TraceModule(zm) if rl else ScoreModule(zm)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    module, opt, sched = acc.prepare(module, opt, sched)

    os.makedirs(cfg.output_dir, exist_ok=True)
    start = 0
    if resume:
        ckpts = _checkpoints(cfg.output_dir, complete=True)
        partial = [p for p in _checkpoints(cfg.output_dir, complete=False)
                   if not ckpts or _step_of(p) > _step_of(ckpts[-1])]
        if partial:  # a run killed while saving: its files are incomplete, resume from the last whole one
            warnings.warn(f"{', '.join(map(os.path.basename, partial))} has no trainer_state.json (the run stopped "
                          f"while saving it); resuming from {os.path.basename(ckpts[-1]) if ckpts else 'step 0'}",
                          stacklevel=2)
        if ckpts:
            with open(os.path.join(ckpts[-1], "trainer_state.json")) as f:
                state = json.load(f)
            check_resume(state, cfg, len(units), ckpts[-1])  # before loading a state that may not fit
            acc.load_state(ckpts[-1])
            _apply_resumed_settings(opt, sched, cfg)
            start = state["step"]
            acc.print(f"resumed from {ckpts[-1]} at step {start}"
                      + (f" (max_steps={cfg.max_steps}: nothing left to train)" if start >= cfg.max_steps else ""))
        else:  # a job that always passes --resume starts from scratch the first time
            acc.print(f"resume: no checkpoint in {cfg.output_dir}; starting at step 0")
    log_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    tb = _tensorboard(cfg.output_dir) if acc.is_main_process else None

    def loss_for(idx: List[int]):
        chunk = [items[i] for i in idx]
        with named_images(f"training item {it.id!r}" for it in chunk):  # an image the processor refuses
            logits = module([load_image(it) for it in chunk], [it.prompt for it in chunk],
                            [it.dimension for it in chunk])
        kw = {}
        if cfg.method == "sft":
            if cfg.soft_labels:
                hist = rater_histograms([it.ratings for it in chunk], bins)
                kw["target_probs"] = torch.tensor(hist, dtype=torch.float32, device=logits.device)
            else:
                kw["target"] = _targets(chunk, bins, logits.device)
            if cfg.weight_pair > 0:
                pairs, gaps = _batch_pairs(chunk)
                if pairs:
                    kw.update(pairs=torch.tensor(pairs, device=logits.device),
                              pair_gaps=torch.tensor(gaps, dtype=torch.float32, device=logits.device),
                              weight_pair=cfg.weight_pair)
        else:  # risd: forward KL to the teacher at temperature tau, scaled by tau^2 (Hinton)
            tau = cfg.temperature
            q = targets[idx].to(logits.device)  # the teacher's own distributions (tau = 1), as cached
            if tau != 1.0:  # the teacher at tau too: q^(1/tau) renormalised, = softmax(z_T / tau) for one read
                q = torch.softmax(q.log() / tau, dim=-1)
            kw.update(teacher_probs=q, temperature=tau, weight_kl=tau ** 2)
            if cfg.weight_ce > 0:
                hard = _targets(chunk, bins, logits.device)
                if tau != 1.0:  # the human labels' CE on the student's own distribution (tau = 1), as Hinton's
                    soft = rubric_loss(logits, bin_values=bins, **kw)
                    ce = rubric_loss(logits, bin_values=bins, target=hard, weight_ce=cfg.weight_ce)
                    return soft._replace(loss=soft.loss + ce.loss, ce=ce.ce)
                kw.update(target=hard, weight_ce=cfg.weight_ce)
        return rubric_loss(logits, bin_values=bins, **kw)

    method = None
    if rl:
        from types import SimpleNamespace

        from ..scorer import RewardScorer
        from .rl import RLMethod

        def scorer_for(hf_model):
            return RewardScorer(ZRewardModel(hf_model, zm.processor, zm.rubric, zm.score_tokens), in_vocab_mass=False,
                                autocast=False)

        from . import rl as _rl

        use_liger = _rl.choose_policy_loss(cfg.policy_loss, cfg.method, acc.device.type) == "liger"
        ctx = SimpleNamespace(cfg=cfg, zm=zm, acc=acc, module=module, opt=opt, marker=marker, scorer_for=scorer_for,
                              use_liger=use_liger,
                              module_scorer=RewardScorer(zm, in_vocab_mass=False, autocast=False),
                              teacher=teacher_zm, teacher_scorer=(RewardScorer(teacher_zm, in_vocab_mass=False,
                                                                               autocast=False) if teacher_zm else None))
        method = RLMethod(ctx)

    last: Dict = {}
    t0 = time.time()
    progress = _progress(acc, start, cfg.max_steps)
    for step in range(start, cfg.max_steps):
        module.train()
        if rl:  # one outer iteration: sample, then inner_updates optimizer steps (inside the method)
            idx = [i for c in batch_indices(len(units), cfg, step, acc.process_index, acc.num_processes) for i in c]
            lr_used = sched.get_last_lr()[0]
            totals = method.step(step, [units[i] for i in idx])
            _step_schedule(acc, sched)
            grad_norm = totals.pop("grad_norm", float("nan"))  # mean over the inner updates; NaN without clipping
        else:
            micro = batch_indices(len(items), cfg, step, acc.process_index, acc.num_processes)
            totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "pair": 0.0}
            for j, idx in enumerate(micro):
                ctx = acc.no_sync(module) if j < len(micro) - 1 else _null()
                with ctx:
                    out = loss_for(idx)
                    acc.backward(out.loss / len(micro))
                for k in totals:
                    totals[k] += float(getattr(out, k).detach()) / len(micro)
            grad_norm = (float(acc.clip_grad_norm_(module.parameters(), cfg.max_grad_norm))
                         if cfg.max_grad_norm > 0 else float("nan"))
            lr_used = sched.get_last_lr()[0]
            opt.step()
            _step_schedule(acc, sched)
            opt.zero_grad(set_to_none=True)
        done = step + 1
        _log_step(acc, cfg, done, start, totals, grad_norm, lr_used, t0, log_path, tb, last)
        if eval_items and cfg.eval_every and done % cfg.eval_every == 0:
            last.update(_evaluate(acc, module, zm, eval_items, done, log_path, cfg))
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            _save_checkpoint(acc, cfg, done, len(units))
        if progress is not None:
            progress.update(1)
            key = "reward" if rl else "loss"
            progress.set_postfix({key: f"{totals.get(key, float('nan')):.4f}"})
        if on_step is not None:
            on_step(done, last)
    if progress is not None:
        progress.close()
    _save_checkpoint(acc, cfg, cfg.max_steps, len(units))
    acc.wait_for_everyone()
    if acc.is_main_process:
        zm.model = acc.unwrap_model(module).model
        zm.save_pretrained(os.path.join(cfg.output_dir, "final"))
    acc.wait_for_everyone()
    return last


def _log_step(acc, cfg, done, start, totals, grad_norm, lr_used, t0, log_path, tb, last: Dict) -> None:
    """Average the step's metrics over processes and append them to metrics.jsonl (in place into ``last``)."""
    if not (done % cfg.log_every == 0 or done == cfg.max_steps or done == start + 1):
        return
    keys = sorted(totals)
    vals = acc.reduce(torch.tensor([float(totals[k]) for k in keys], device=acc.device), reduction="mean").tolist()
    last.clear()
    last.update({"step": done, **dict(zip(keys, vals)), "grad_norm": grad_norm, "lr": lr_used,
                 "elapsed_s": round(time.time() - t0, 2)})
    if acc.is_main_process:
        with open(log_path, "a") as f:
            f.write(strict_json.dumps(last) + "\n")
        if tb is not None:
            for k, v in last.items():
                if k != "step":
                    tb.add_scalar(f"train/{k}", v, done)


def _batch_pairs(chunk: Sequence[RatedItem]):
    """Pairs inside a batch (row indices) and their annotated gaps, for the pairwise term."""
    pairs = _pair_indices(chunk)
    return [list(p) for p in pairs], [chunk[a].reference - chunk[b].reference for a, b in pairs]


#: Config keys a resumed run must share with its checkpoint: they pick the model, the objective or
#: the order of the data (step s always sees the same items), so changing them would silently give
#: neither the old run nor a new one.
RESUME_MUST_MATCH = ("method", "model", "batch_size", "grad_accum", "seed")
#: Keys that may change on resume (logging, saving, evaluation, where things are written); a change
#: of any other key is allowed with a warning (it changes the optimisation from the resumed step on).
RESUME_FREE = ("output_dir", "train_manifest", "eval_manifest", "overwrite_output_dir", "save_every",
               "keep_checkpoints", "eval_every", "log_every", "device", "eval_traces", "grad_checkpointing",
               "teacher_cache")


def check_resume(state: Dict, cfg: TrainConfig, n_units: int, where: str) -> None:
    """Refuse to resume a checkpoint made with another model, objective, data order or number of
    training items (pairs for gdso/grpo); warn about other changed settings."""
    old = state.get("config", {})

    def same(k):
        a, b = old[k], getattr(cfg, k)
        if k == "model" and isinstance(a, str) and isinstance(b, str):  # one directory, however it is written
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b

    bad = [f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH if k in old and not same(k)]
    if "units" in state and state["units"] != n_units:
        bad.append(f"training items (pairs for gdso/grpo): {state['units']} -> {n_units}")
    if bad:
        raise ValueError(f"cannot resume {where}: it was made with other settings ({'; '.join(bad)}); resume with "
                         "the original ones, or start a new run")
    changed = [f"{k}: {old[k]!r} -> {v!r}" for k, v in cfg.to_dict().items()
               if k in old and k not in RESUME_FREE and k not in RESUME_MUST_MATCH and old[k] != v]
    if changed:
        warnings.warn(f"resuming {where} with changed settings ({'; '.join(changed)}): they apply from the resumed "
                      "step on", stacklevel=3)


def _save_checkpoint(acc, cfg: TrainConfig, step: int, n_units: int) -> None:
    """``checkpoint-<step>/``: accelerate's state, then ``trainer_state.json`` last and atomically (its
    presence marks a whole checkpoint); then older ones beyond ``keep_checkpoints`` are removed, and
    incomplete ones that a killed run left at earlier steps."""
    path = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    if acc.is_main_process and os.path.isdir(path):  # a leftover of a run killed while saving it
        shutil.rmtree(path)
    acc.wait_for_everyone()
    acc.save_state(path, safe_serialization=True)
    acc.wait_for_everyone()  # every process's files are written before the checkpoint is marked whole
    if acc.is_main_process:
        with atomic_path(os.path.join(path, "trainer_state.json")) as tmp, open(tmp, "w") as f:
            json.dump({"step": step, "units": n_units, "config": cfg.to_dict()}, f, indent=2)
        whole = _checkpoints(cfg.output_dir, complete=True)
        stale = [d for d in _checkpoints(cfg.output_dir, complete=False) if _step_of(d) < step]
        for d in (whole[:-cfg.keep_checkpoints] if cfg.keep_checkpoints else []) + stale:
            shutil.rmtree(d, ignore_errors=True)
    acc.wait_for_everyone()


def _evaluate(acc, module, zm, eval_items, step, log_path, cfg: Optional[TrainConfig] = None) -> Dict:
    """Metrics on the labelled eval items.  Every process predicts its share of the images (each
    image with all of its dimensions) and the main process computes the metrics of all of them."""
    from .. import evaluate as ev
    from ._dist import gather_shards

    labelled = [it for it in eval_items if it.reference is not None]
    if not labelled:
        raise ValueError("no eval item has a score or ratings to evaluate against")
    module.eval()
    zm.model = acc.unwrap_model(module).model
    shards = [ev.shard_by_image(labelled, r, acc.num_processes) for r in range(acc.num_processes)]
    traces = cfg.eval_traces if cfg is not None else 0
    kw = dict(traces=traces, trace_tokens=cfg.max_trace_tokens, temperature=cfg.sample_temperature) if traces else {}
    mean, probs = ev.predict_items(zm, [labelled[i] for i in shards[acc.process_index]], **kw)
    k = len(zm.rubric.bin_values)  # (a process may have no image: zero rows)
    rows = torch.from_numpy(np.concatenate([mean.reshape(-1, 1), probs.reshape(len(mean), k)], 1))
    every = gather_shards(acc, rows, shards, len(labelled)).numpy()
    out = {}
    if acc.is_main_process:
        rep = ev.report_items(labelled, every[:, 0], every[:, 1:], zm.rubric.bin_values)
        out = {f"eval_{k}": v for k, v in rep["pooled"].items() if k != "n"}
        with open(log_path, "a") as f:
            f.write(strict_json.dumps({"step": step, **out}) + "\n")
    acc.wait_for_everyone()
    module.train()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _progress(acc, start, total):
    if not acc.is_main_process:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, desc="train", unit="step")


def _tensorboard(output_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(os.path.join(output_dir, "tb"))
