"""Training configuration: one JSON file (or a ``TrainConfig`` in Python), validated up front.

Every field has a documented default; ``TrainConfig.from_file`` rejects unknown keys.  Paths are
used as given: relative ones resolve against the current directory, not the config file's folder
(a manifest's relative image paths resolve against the manifest).  Validation
(``validate``) runs before any model is loaded, so a bad config fails in milliseconds.

Common fields
    method            one of ``sft``, ``risd``, ``gdso``, ``grpo``, ``opd``
    model             directory of a ``ZRewardModel`` (the model trained: the student for ``risd``)
    output_dir        checkpoints (``checkpoint-<step>/``), ``metrics.jsonl``, ``final/``
    overwrite_output_dir=False
                      a new run (not ``resume``) refuses an output_dir that holds a previous run's
                      ``metrics.jsonl``, ``checkpoint-*``, ``final/`` or ``tb/`` (its metrics would be
                      appended to and a later resume could pick up the old run's checkpoint); True
                      deletes those entries first (nothing else in the directory).  ``resume`` wins.
    train_manifest    JSONL manifest (``zreward.data``); or pass items to ``train()`` from Python
    eval_manifest     optional manifest evaluated every ``eval_every`` steps with ``zreward.metrics``
    max_steps=100, batch_size=8 (items per optimizer step, over all processes), grad_accum=1,
    lr=1e-4, weight_decay=0.0, warmup_steps=0, schedule="cosine" | "linear" | "constant",
    max_grad_norm=1.0, mixed_precision="no" | "bf16" | "fp16", grad_checkpointing=False,
    save_every=50 (0: only at the end), keep_checkpoints=2 (0: keep all), eval_every=0, log_every=10, seed=0,
    device="auto" | "cpu" | "cuda",
    eval_traces=0       0: evaluate by reading the score right after the question; n: average the
                        distributions read after n sampled traces (how a reasoning teacher is judged)

``sft``
    soft_labels=False   cross-entropy to the rater histogram instead of the annotated bin
    weight_pair=0.0     add the pairwise gap term over same-group, same-dimension pairs in a batch

``risd``
    teacher             directory of the frozen teacher ``ZRewardModel``; or
    teacher_cache       a file of cached teacher distributions (``zreward.train.teacher``); made on the
                        first run that names a teacher, and refused later if another teacher or other
                        trace settings made it
    temperature=1.0     student and teacher logits divided by it (a cached or trace-averaged teacher
                        distribution q as q^(1/tau), renormalised); the KL term is scaled by its square
    weight_ce=0.0       optional extra CE to the human labels (then items need labels), at temperature 1
    teacher_traces=0    0: the teacher's distribution right after the question; n: averaged over n sampled
                        reasoning traces (read at the <|score|> marker; max_trace_tokens, sample_temperature)

``gdso``, ``grpo`` (same-prompt pairs; ``batch_size`` = pairs per step) and ``opd`` (``batch_size`` = items)
    group_size=4        traces sampled per query (G >= 2 for gdso and grpo; opd: each trace with its own
                        score token, every token's teacher-student log-ratio its advantage; 1 is one trace)
    max_trace_tokens=32 the trace ends at the ``<|score|>`` marker or after this many tokens
    sample_temperature=1.0, inner_updates=2, clip_eps=0.2, beta=0.04 (KL to the per-iteration reference)
    lambda_pt=1.0, lambda_pw=1.0 (reward mix), alpha_pt=1.0, alpha_pw=1.0 (gdso direct losses)
    reward_source="expectation" | "parsed" (grpo: reward from the expectation, or from a number parsed
                        from the trace text -- the report's ablation)
    teacher             opd: the frozen teacher ``ZRewardModel`` (the same vocabulary, checked before any step)
    policy_loss="auto" | "torch" | "liger" (gdso, grpo: Liger-Kernel's fused linear GRPO loss; auto uses it
                        on CUDA when liger-kernel is installed; the two are parity-tested)
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional

METHODS = ("sft", "risd", "gdso", "grpo", "opd")
IMPLEMENTED = METHODS
RL_METHODS = ("gdso", "grpo", "opd")
PATH_FIELDS = ("model", "output_dir", "train_manifest", "eval_manifest", "teacher", "teacher_cache")


#: The fields each method reads (besides ``common``); ``max_trace_tokens`` and ``sample_temperature``
#: whenever traces are sampled (RL methods, ``eval_traces``, RISD's ``teacher_traces``).
_USED_BY = {
    "common": ("method", "model", "output_dir", "train_manifest", "eval_manifest", "overwrite_output_dir", "max_steps",
               "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm",
               "mixed_precision", "grad_checkpointing", "save_every", "keep_checkpoints", "eval_every", "log_every",
               "seed", "device", "eval_traces"),
    "sft": ("soft_labels", "weight_pair"),
    "risd": ("teacher", "teacher_cache", "temperature", "weight_ce", "teacher_traces"),
    "gdso": ("group_size", "inner_updates", "clip_eps", "beta", "lambda_pt", "lambda_pw", "alpha_pt", "alpha_pw",
             "reward_source", "policy_loss"),
    "grpo": ("group_size", "inner_updates", "clip_eps", "beta", "lambda_pt", "lambda_pw", "reward_source",
             "policy_loss"),
    "opd": ("group_size", "inner_updates", "clip_eps", "beta", "teacher", "policy_loss"),
}


@dataclass
class TrainConfig:
    method: str
    model: str
    output_dir: str
    train_manifest: Optional[str] = None
    eval_manifest: Optional[str] = None
    overwrite_output_dir: bool = False
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    grad_checkpointing: bool = False
    save_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    eval_traces: int = 0
    # sft
    soft_labels: bool = False
    weight_pair: float = 0.0
    # risd
    teacher: Optional[str] = None
    teacher_cache: Optional[str] = None
    temperature: float = 1.0
    weight_ce: float = 0.0
    teacher_traces: int = 0
    # gdso / grpo / opd
    group_size: int = 4
    max_trace_tokens: int = 32
    sample_temperature: float = 1.0
    inner_updates: int = 2
    clip_eps: float = 0.2
    beta: float = 0.04
    lambda_pt: float = 1.0
    lambda_pw: float = 1.0
    alpha_pt: float = 1.0
    alpha_pw: float = 1.0
    reward_source: str = "expectation"
    policy_loss: str = "auto"

    @classmethod
    def from_file(cls, path: str, **overrides) -> "TrainConfig":
        from ..data import read_json

        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a JSON object")
        given = {k: v for k, v in overrides.items() if v is not None}
        changed = sorted(k for k in given if k in data and data[k] != given[k])
        if changed:  # `zreward train sft --config gdso.json` is more often a slip than a plan
            what = ", ".join(f"{k}={data[k]!r} with {given[k]!r}" for k in changed)
            warnings.warn(f"{path}: the command line overrides {what}", stacklevel=2)
        data.update(given)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config key(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("method", "model", "output_dir") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing required key(s) {missing}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, has_items: bool = False) -> None:
        """Everything that can be checked without loading a model."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.method not in IMPLEMENTED:
            raise NotImplementedError(f"method {self.method!r} is not implemented yet (implemented: {IMPLEMENTED})")
        if not has_items and not self.train_manifest:
            raise ValueError("give train_manifest in the config, or pass items to train() from Python")
        self._check_types()
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("save_every", "eval_every", "warmup_steps", "keep_checkpoints", "eval_traces", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("overwrite_output_dir", "grad_checkpointing", "soft_labels"):  # "false" would be truthy
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.weight_pair < 0 or self.weight_ce < 0:
            raise ValueError("weight_pair and weight_ce must be >= 0")
        if self.method == "risd":
            if not self.teacher and not self.teacher_cache:
                raise ValueError("risd needs a teacher model directory ('teacher') or cached targets ('teacher_cache')")
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
            if not isinstance(self.teacher_traces, int) or self.teacher_traces < 0:
                raise ValueError(f"teacher_traces must be a non-negative integer, got {self.teacher_traces!r}")
        if self.method in RL_METHODS:
            if self.method in ("gdso", "grpo") and (not isinstance(self.group_size, int) or self.group_size < 2):
                raise ValueError(f"{self.method} needs group_size >= 2 (the group advantage of one sample is 0), "
                                 f"got {self.group_size!r}")
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
            if self.grad_accum != 1:
                raise ValueError(f"{self.method} takes inner_updates optimizer steps per batch; use grad_accum=1")
            for name in ("max_trace_tokens", "inner_updates"):
                if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                    raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
            if not self.sample_temperature > 0 or not 0 < self.clip_eps < 1 or self.beta < 0:
                raise ValueError("sample_temperature must be > 0, clip_eps in (0, 1), beta >= 0")
            if self.reward_source not in ("expectation", "parsed"):
                raise ValueError(f"reward_source must be expectation or parsed, got {self.reward_source!r}")
            if self.reward_source == "parsed" and self.method != "grpo":
                raise ValueError("reward_source='parsed' is the grpo ablation; gdso rewards use the expectation")
            if self.method == "opd" and not self.teacher:
                raise ValueError("opd needs a teacher model directory ('teacher')")
            if self.policy_loss not in ("auto", "torch", "liger"):
                raise ValueError(f"policy_loss must be auto, torch or liger, got {self.policy_loss!r}")
            if self.policy_loss == "liger":
                if self.method == "opd":
                    raise ValueError("policy_loss='liger' takes per-sequence advantages; opd's are per token")
                from .rl import liger_available

                if not liger_available():
                    raise ValueError("policy_loss='liger' needs liger-kernel (pip install liger-kernel)")
        unused = self.unused_settings()
        if unused:
            what = ", ".join(f"{k}={getattr(self, k)!r}" for k in unused)
            warnings.warn(f"method {self.method!r} does not use {what} (set away from the default): they change "
                          "nothing in this run", UserWarning, stacklevel=2)

    def unused_settings(self) -> list:
        """Fields set away from their defaults that this method never reads (``weight_pair`` for
        ``risd``, ``soft_labels`` for ``gdso``, ...): ``validate`` warns about them, since a setting
        that silently does nothing looks like one that made no difference."""
        used = set(_USED_BY["common"]) | set(_USED_BY[self.method])
        if self.eval_traces > 0 or self.method in RL_METHODS or (self.method == "risd" and self.teacher_traces > 0):
            used |= {"max_trace_tokens", "sample_temperature"}  # traces are sampled
        return [f.name for f in fields(self) if f.name not in used and getattr(self, f.name) != f.default]

    def _check_types(self) -> None:
        """Every field holds a value of its type; numbers are finite.  JSON gives strings as easily as
        numbers, and Python's json reads ``NaN`` and ``Infinity``, which pass every range check written
        as a comparison (NaN) or make the run diverge (an infinite learning rate)."""
        for f in fields(self):
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))  # "float", ...
            if kind == "float":
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                    raise ValueError(f"{f.name} must be a finite number, got {v!r}")
                if not isinstance(v, (int, float)):  # a numpy scalar: kept as its Python value (the config is JSON)
                    setattr(self, f.name, float(v))
            elif kind == "int":
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise ValueError(f"{f.name} must be an integer, got {v!r}")
                setattr(self, f.name, int(v))
            elif f.name in PATH_FIELDS:
                if isinstance(v, os.PathLike):  # a pathlib.Path from Python: kept as a string (the config is JSON)
                    setattr(self, f.name, os.fspath(v))
                elif not (isinstance(v, str) or (v is None and "Optional" in kind)):
                    raise ValueError(f"{f.name} must be a path (a string), got {v!r}")
            elif kind == "str" and not isinstance(v, str):
                raise ValueError(f"{f.name} must be a string, got {v!r}")

    def needs_labels(self) -> bool:
        return self.method in ("sft", "gdso", "grpo") or (self.method == "risd" and self.weight_ce > 0)
