"""The rubric (dimensions, their anchor texts, bins, weights) and the nine score tokens.

``Rubric`` builds the per-dimension question that follows the shared image+prompt prefix, so
scoring D dimensions of one image shares everything up to the question (SPEC section 1).
``ScoreTokens`` maps the bins to nine single tokens, either added special tokens (new embedding rows
initialised from the embeddings of the label's text, e.g. the pieces of "4.5") or existing tokens
that are checked to be exactly one token each.  Both serialise to plain dicts (JSON, no pickle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from zreward_kernels import BIN_VALUES

DIMENSIONS: Tuple[str, ...] = ("alignment", "realism", "aesthetics", "plausibility")

DESCRIPTIONS: Dict[str, str] = {
    "alignment": "how well the image matches the text prompt (1 = unrelated, 2 = mostly wrong, 3 = partly matches, "
                 "4 = matches with small errors, 5 = matches every detail)",
    "realism": "how real and free of artifacts the image looks (1 = broken or obviously synthetic, 2 = strong "
               "artifacts, 3 = noticeable artifacts, 4 = minor flaws, 5 = flawless)",
    "aesthetics": "visual appeal: composition, colour, contrast and lighting (1 = unpleasant, 2 = poor, 3 = ordinary, "
                  "4 = pleasing, 5 = striking)",
    "plausibility": "physical plausibility: support, contact, shadows and proportions (1 = impossible, 2 = clearly "
                    "wrong, 3 = some errors, 4 = nearly plausible, 5 = fully plausible)",
}

#: Shared by every dimension of an image (goes into the prefix, after the image and the prompt).
PREAMBLE = ("Score the image against the prompt on a scale from {low} to {high} in steps of {step}, one rubric "
            "dimension at a time.\n{rubric}\n")
#: The per-dimension question (the suffix); the score token follows it.
QUESTION = "Rate the image for {dimension}."


def _fmt(v: float) -> str:
    """A bin value as text: one decimal ("4.5"), or as many as it needs ("1.25"; it was "1.2", so a
    quarter-step rubric told the model "in steps of 0.2" and the 1.25 token was named and initialised
    as 1.2)."""
    for digits in range(1, 7):
        text = f"{v:.{digits}f}"
        if abs(float(text) - v) <= 1e-9 * max(1.0, abs(v)):
            return text
    return repr(float(v))


@dataclass
class Rubric:
    """Rubric dimensions, anchor descriptions, score bins and aggregation weights.

    ``weights`` (one per dimension, in order, or a dict by dimension) default to equal weights
    summing to one, so the reward ``sum_d w_d mu_d`` stays on the score scale.  A single string
    for ``dimensions`` is one dimension.  The rubric text (every dimension's anchors, the scale) is
    the ``preamble``, shared by all dimensions of an image; each query then names its one dimension
    with the short ``question``.  Keeping the per-dimension part short is what makes one shared prefix pay off.
    ``preamble`` may use ``{low}``, ``{high}``, ``{step}`` and ``{rubric}``; ``question`` uses
    ``{dimension}`` (and may use ``{description}``).
    """

    dimensions: Tuple[str, ...] = DIMENSIONS
    descriptions: Dict[str, str] = field(default_factory=lambda: dict(DESCRIPTIONS))
    bin_values: Tuple[float, ...] = BIN_VALUES
    weights: Optional[Tuple[float, ...]] = None
    preamble: str = PREAMBLE
    question_template: str = QUESTION

    def __post_init__(self):
        if isinstance(self.dimensions, str):  # one dimension, as score(dimensions="realism") takes it
            self.dimensions = (self.dimensions,)
        self.dimensions = tuple(str(d) for d in self.dimensions)
        self.bin_values = tuple(float(v) for v in self.bin_values)
        if not self.dimensions:
            raise ValueError("a rubric needs at least one dimension")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"rubric dimensions must be distinct, got {self.dimensions}")
        missing = [d for d in self.dimensions if d not in self.descriptions]
        if missing:
            raise ValueError(f"rubric descriptions missing for {missing}")
        if (len(self.bin_values) < 2 or not all(math.isfinite(v) for v in self.bin_values)
                or any(b <= a for a, b in zip(self.bin_values, self.bin_values[1:]))):
            raise ValueError(f"bin_values must be at least two finite, strictly increasing values, "
                             f"got {self.bin_values}")
        if self.weights is None:
            self.weights = tuple(1.0 / len(self.dimensions) for _ in self.dimensions)
        if isinstance(self.weights, Mapping):  # {dimension: weight}: one for every dimension, none other
            unknown = sorted(set(map(str, self.weights)) - set(self.dimensions))
            missing = [d for d in self.dimensions if d not in self.weights]
            if unknown or missing:
                raise ValueError(f"weights given by dimension must name each of {list(self.dimensions)} once; "
                                 f"unknown {unknown}, missing {missing}")
            self.weights = tuple(self.weights[d] for d in self.dimensions)
        try:
            self.weights = tuple(float(w) for w in self.weights)
        except (TypeError, ValueError):
            raise ValueError(f"weights must be numbers, one per dimension in the order {list(self.dimensions)} "
                             f"(or a dict by dimension), got {self.weights!r}") from None
        if len(self.weights) != len(self.dimensions):
            raise ValueError(f"weights must have one entry per dimension ({len(self.dimensions)}), got {self.weights}")
        if not all(math.isfinite(w) and w >= 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"weights must be finite and non-negative with a positive sum, got {self.weights}")
        try:
            self.question(self.dimensions[0])
            self.preamble_text()
        except (KeyError, IndexError) as exc:
            raise ValueError(f"preamble or question_template has an unknown placeholder: {exc}") from None

    def index(self, dimension: str) -> int:
        if dimension not in self.dimensions:
            raise ValueError(f"unknown dimension {dimension!r}; this rubric has {list(self.dimensions)}")
        return self.dimensions.index(dimension)

    def preamble_text(self) -> str:
        """The rubric text shared by all dimensions (every dimension's anchors and the scale)."""
        step = self.bin_values[1] - self.bin_values[0]
        rubric = "\n".join(f"- {d}: {self.descriptions[d]}" for d in self.dimensions)
        return self.preamble.format(low=_fmt(self.bin_values[0]), high=_fmt(self.bin_values[-1]), step=_fmt(step),
                                    rubric=rubric)

    def question(self, dimension: str) -> str:
        """The dimension-specific text that ends the query; the score token follows it."""
        self.index(dimension)
        return self.question_template.format(dimension=dimension, description=self.descriptions[dimension])

    def reward(self, mean: torch.Tensor, dimensions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``sum_d w_d mu_d`` over the last dimension of ``mean [..., D]``, weights renormalised to
        the dimensions scored (so scoring a subset keeps the reward on the score scale)."""
        dims = list(dimensions) if dimensions is not None else list(self.dimensions)
        if mean.shape[-1] != len(dims):
            raise ValueError(f"mean has {mean.shape[-1]} dimensions but {len(dims)} were named")
        w = [self.weights[self.index(d)] for d in dims]
        total = sum(w)  # on the host: no device sync per call
        if total <= 0:
            raise ValueError(f"the weights of the scored dimensions {dims} sum to zero")
        return (mean * torch.tensor([x / total for x in w], dtype=mean.dtype, device=mean.device)).sum(-1)

    def to_dict(self) -> dict:
        return dict(dimensions=list(self.dimensions), descriptions=dict(self.descriptions),
                    bin_values=list(self.bin_values), weights=list(self.weights), preamble=self.preamble,
                    question_template=self.question_template)

    @classmethod
    def from_dict(cls, d: dict) -> "Rubric":
        return cls(dimensions=tuple(d["dimensions"]), descriptions=dict(d["descriptions"]),
                   bin_values=tuple(d["bin_values"]), weights=tuple(d["weights"]), preamble=d["preamble"],
                   question_template=d["question_template"])


def fit_embeddings(model, vocab: int) -> None:
    """Grow the model's embedding table (and untied head) to hold ``vocab`` token ids; never shrink
    it (real checkpoints pad the table beyond the tokenizer: Qwen has 151936 rows)."""
    weight = model.get_input_embeddings().weight
    if vocab > weight.shape[0]:
        # the new rows' random initialisation is overwritten by the callers; drawing it from a forked
        # stream leaves the caller's random numbers as they were (seeded sampling right after adding
        # a token gave other samples than the same call once the token was there)
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            model.resize_token_embeddings(vocab, mean_resizing=False)


@dataclass
class ScoreTokens:
    """The K score tokens: ``labels[k]`` is the text of bin k, ``token_ids[k]`` its single token id."""

    mode: str
    labels: Tuple[str, ...]
    token_ids: Tuple[int, ...]

    def __post_init__(self):
        if self.mode not in ("special", "existing"):
            raise ValueError(f"score token mode must be 'special' or 'existing', got {self.mode!r}")
        if len(self.labels) != len(self.token_ids):
            raise ValueError("labels and token_ids must have the same length")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError(f"score token ids must be distinct, got {self.token_ids}")

    @staticmethod
    def special_labels(bin_values: Sequence[float]) -> List[str]:
        return [f"<score_{_fmt(v)}>" for v in bin_values]

    @classmethod
    def add_special(cls, tokenizer, model, bin_values: Sequence[float] = BIN_VALUES) -> "ScoreTokens":
        """Add one special token per bin, resize the model, initialise the new rows sensibly.

        Each new input-embedding row (and output row, when the head is not tied) is the mean of the
        existing embeddings of the bin's plain text (the pieces of "4.5"), so a fresh score token
        starts next to the number it stands for.  Labels the tokenizer already has (a trained
        Z-Reward model loaded with plain Hugging Face classes and wrapped again) keep their rows.
        """
        labels = cls.special_labels(bin_values)
        pieces = [tokenizer(_fmt(v), add_special_tokens=False)["input_ids"] for v in bin_values]
        existing = [tokenizer.convert_tokens_to_ids(t) for t in labels]
        unk = getattr(tokenizer, "unk_token_id", None)
        new = [i is None or i == unk for i in existing]
        to_add = [t for t, n in zip(labels, new) if n]
        if to_add:
            tokenizer.add_tokens(to_add, special_tokens=True)
        ids = [tokenizer.convert_tokens_to_ids(t) for t in labels]
        fit_embeddings(model, len(tokenizer))  # new rows are set just below
        with torch.no_grad():
            tables = [model.get_input_embeddings().weight]
            out = model.get_output_embeddings()
            if out is not None and out.weight is not tables[0]:
                tables.append(out.weight)
            for table in tables:
                for i, pc, n in zip(ids, pieces, new):
                    if n and pc:
                        table[i] = table[torch.tensor(pc, device=table.device)].mean(0)
        return cls("special", tuple(labels), tuple(ids))

    @classmethod
    def from_existing(cls, tokenizer, labels: Sequence[str]) -> "ScoreTokens":
        """Use nine existing tokens (zero-shot use of a base model); each must be exactly one token."""
        ids = []
        for lab in labels:
            enc = tokenizer(lab, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(
                    f"score label {lab!r} is not a single token for this tokenizer (it encodes to {len(enc)} tokens "
                    f"{enc}); choose single-token labels or add special score tokens"
                )
            ids.append(int(enc[0]))
        if len(set(ids)) != len(ids):
            raise ValueError(f"score labels {list(labels)} map to repeated token ids {ids}")
        return cls("existing", tuple(labels), tuple(ids))

    def verify(self, tokenizer) -> None:
        """Check that a (re)loaded tokenizer still maps every label to its saved id."""
        for lab, i in zip(self.labels, self.token_ids):
            got = (tokenizer.convert_tokens_to_ids(lab) if self.mode == "special"
                   else tokenizer(lab, add_special_tokens=False)["input_ids"])
            got = got[0] if isinstance(got, list) and len(got) == 1 else got
            if got != i:
                raise ValueError(f"score token {lab!r} maps to {got} in this tokenizer, but the model was saved with {i}")

    def to_dict(self) -> dict:
        return dict(mode=self.mode, labels=list(self.labels), token_ids=list(self.token_ids))

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreTokens":
        return cls(d["mode"], tuple(d["labels"]), tuple(int(i) for i in d["token_ids"]))
