"""Runs a small deterministic training job; used by the trainer tests in subprocesses.

usage: python train_runner.py BASE_MODEL_DIR OUT_DIR MAX_STEPS [--resume] [--kill-at N] [--batch B] [--save-every S]
                              [--items N] [--teacher DIR --cache FILE] [--eval-every N] [--warmup N]
                              [--schedule cosine|linear|constant]
SFT by default; with --teacher, RISD with its targets cached in FILE (and each process prints how
many items it computed targets for).  --eval-every evaluates on 8 fresh toy items (each process
prints how many items it predicted).
"""

import argparse
import os
import signal

import numpy as np

from zreward.data import RatedItem
from zreward.train import TrainConfig, train


def toy_items(n=32, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        red = i % 2 == 0
        a = np.zeros((56, 56, 3), np.uint8)
        a[..., 0 if red else 2] = 200
        a += rng.integers(0, 40, a.shape, dtype=np.uint8)
        items.append(RatedItem(prompt="a car", image=a, dimension="realism", score=5.0 if red else 1.0,
                               ratings=[5.0, 4.5, 5.0] if red else [1.0, 1.5, 1.0], group=f"g{i // 2}", id=str(i)))
    return items


def gdso_first_step_logs(base, out_root, device, policy_losses=("torch", "liger"), **overrides):
    """The logged metrics of one GDSO step per policy loss (same seed, so the same sampled traces);
    ``overrides`` go to every run's TrainConfig."""
    import json

    logs = {}
    for loss in policy_losses:
        out = os.path.join(str(out_root), loss)
        kw = dict(method="gdso", model=base, output_dir=out, max_steps=1, batch_size=4, lr=3e-3, log_every=1,
                  save_every=0, group_size=4, max_trace_tokens=6, inner_updates=1, device=device, policy_loss=loss)
        cfg = TrainConfig(**{**kw, **overrides})
        train(cfg, items=toy_items())
        with open(os.path.join(out, "metrics.jsonl")) as f:
            logs[loss] = json.loads(f.readline())
    return logs


def _count_items(module, name, label):
    """Make ``module.name(model, items, **kw)`` print how many items this process passed it."""
    fn = getattr(module, name)

    def counted(model, items, **kw):
        print(f"{label}: {len(items)}", flush=True)
        return fn(model, items, **kw)

    setattr(module, name, counted)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--schedule", default="cosine")
    a = ap.parse_args()
    if a.eval_every:
        import zreward.evaluate as evaluate_mod

        _count_items(evaluate_mod, "predict_items", "eval items predicted here")
    risd = {}
    if a.teacher:
        import zreward.train.teacher as teacher_mod

        _count_items(teacher_mod, "compute_targets", "teacher targets computed here")
        risd = dict(method="risd", teacher=a.teacher, teacher_cache=a.cache)
    cfg = TrainConfig(**{**dict(method="sft", model=a.base, output_dir=a.out, max_steps=a.steps, batch_size=a.batch,
                                lr=3e-3, log_every=1, save_every=a.save_every, device="cpu", seed=1,
                                eval_every=a.eval_every, warmup_steps=a.warmup, schedule=a.schedule), **risd})

    def on_step(step, _):
        if a.kill_at and step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

    train(cfg, items=toy_items(a.items), eval_items=toy_items(8, seed=5) if a.eval_every else None,
          resume=a.resume, on_step=on_step)
