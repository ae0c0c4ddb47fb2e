"""``ZRewardModel``: a Hugging Face image-text-to-text model + processor + rubric + score tokens.

A query for (image, prompt, dimension) is laid out as ``prefix + suffix``:

* ``prefix`` -- the chat template's text up to the user's text, the image, ``Prompt: <prompt>``
  and the rubric preamble (every dimension's anchors), the same for every dimension of an image;
* ``suffix`` -- the short per-dimension question (:meth:`Rubric.question`), then the rest of the
  chat template up to the assistant's turn.  The score token is the next token after the suffix.

Prefix and suffix are tokenised separately and concatenated, in every scoring path, so the shared-
prefix scorer and independent queries see identical token sequences.

Saving writes the model and processor with ``save_pretrained`` (safetensors) and a small
``zreward_config.json`` (rubric, score tokens, model class); loading is offline only.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import List, Optional, Tuple

import torch
from torch import nn

from .hf import check_plain_lm_head
from .rubric import Rubric, ScoreTokens

CONFIG_NAME = "zreward_config.json"
#: Held around the scoring path's tokenizer and processor calls (``suffix_ids`` and the scorer's
#: processor call): a Hugging Face fast tokenizer sets its padding and truncation on the shared Rust
#: tokenizer per call, so two threads tokenising at once can pad with each other's settings ("Unable
#: to create tensor ...").  The trainers tokenise from one thread and do not take it.
TOKENIZER_LOCK = threading.RLock()


def special_token_ids(tokenizer) -> set:
    """Ids of the tokenizer's special tokens: its named ones and every added token marked special
    (chat markers, image and video placeholders, the score tokens, the trace marker)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


_SENTINEL = "\u2063ZREWARD_QUESTION\u2063"


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


class ZRewardModel(nn.Module):
    """Wraps ``model`` (a ``*ForConditionalGeneration`` / ``*ForCausalLM``) with its ``processor``.

    A tokenizer without a pad token gets its EOS token as the pad token (padding is masked in every
    path, so the scores do not depend on it)."""

    def __init__(self, model, processor, rubric: Optional[Rubric] = None, score_tokens: Optional[ScoreTokens] = None):
        super().__init__()
        check_plain_lm_head(model)  # the score logits are W h + b: a capped or scaled head would be off
        self.model = model
        self.processor = processor
        self.rubric = rubric or Rubric()
        tok = self.tokenizer
        if getattr(tok, "pad_token_id", None) is None:
            # batches are padded (and the padding masked) in every path; many Llama-based tokenizers
            # ship without a pad token: use EOS, as TRL's trainers do
            if getattr(tok, "eos_token", None) is None:
                raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
            tok.pad_token = tok.eos_token
        if score_tokens is None:
            score_tokens = ScoreTokens.add_special(self.tokenizer, model, self.rubric.bin_values)
        if len(score_tokens.token_ids) != len(self.rubric.bin_values):
            raise ValueError(f"{len(score_tokens.token_ids)} score tokens for {len(self.rubric.bin_values)} bins")
        self.score_tokens = score_tokens
        self._prefix_cache = None
        self._special_cache = None  # (tokenizer length, pattern of its special tokens' texts)

    # ---- text layout -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return _tokenizer_of(self.processor)

    def _template(self) -> Tuple[str, str]:
        """(text before the user's prompt text, text after the question) from the chat template."""
        if self._prefix_cache is None:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
            apply = getattr(self.processor, "apply_chat_template", None)
            if apply is None or getattr(self.processor, "chat_template", None) is None:
                raise ValueError("the processor has no chat template; set processor.chat_template")
            text = apply(messages, add_generation_prompt=True, tokenize=False)
            if text.count(_SENTINEL) != 1:
                raise ValueError("the chat template does not place the user's text exactly once")
            head, tail = text.split(_SENTINEL)
            self._prefix_cache = (head, tail)
        return self._prefix_cache

    def check_prompt(self, prompt: str, where: str = "prompt") -> None:
        """Refuse a prompt that holds the text of one of the tokenizer's special tokens (a chat-template
        marker such as ``<|im_end|>``, an image placeholder, a score token, the trace marker): the
        processor would read it as that token, not as text, and end the user's turn early, add an
        image slot or plant a score -- a different query, scored without a word."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
        tok = self.tokenizer
        n = len(tok)
        if self._special_cache is None or self._special_cache[0] != n:  # tokens may be added later (the marker)
            texts = {t for t in tok.convert_ids_to_tokens(sorted(special_token_ids(tok))) if t}
            pattern = re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True)))) if texts else None
            self._special_cache = (n, pattern)
        pattern = self._special_cache[1]
        found = pattern.search(prompt) if pattern is not None else None
        if found is not None:
            raise ValueError(f"{where} {prompt!r} holds {found.group(0)!r}, a special token of the model's tokenizer, "
                             "which would be read as that token (a chat marker, an image placeholder or a score "
                             "token), not as text; remove it from the prompt")

    def check_item_prompts(self, items, what: str = "item") -> None:
        """:meth:`check_prompt` of every distinct prompt of ``items`` (RatedItems), the error naming
        the first item that holds it (``what`` says which items: "training item", ...)."""
        seen = set()
        for it in items:
            if it.prompt not in seen:
                seen.add(it.prompt)
                self.check_prompt(it.prompt, f"{what} {it.id!r}: prompt")

    def prefix_text(self, prompt: str) -> str:
        """Everything up to the image and the user's prompt (shared by all dimensions)."""
        self.check_prompt(prompt)
        head, _ = self._template()
        return f"{head}Prompt: {prompt}\n{self.rubric.preamble_text()}"

    def suffix_ids(self, dimension: str) -> List[int]:
        """Token ids of the dimension's question and the template's tail (ends before the score)."""
        _, tail = self._template()
        with TOKENIZER_LOCK:
            return self.tokenizer(self.rubric.question(dimension) + tail, add_special_tokens=False)["input_ids"]

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.processor.save_pretrained(directory)
        cfg = {"rubric": self.rubric.to_dict(), "score_tokens": self.score_tokens.to_dict(),
               "model_class": type(self.model).__name__, "format": 1}
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, *, dtype: Optional[torch.dtype] = None,
                        device: Optional[torch.device] = None,
                        attn_implementation: Optional[str] = None) -> "ZRewardModel":
        """Load offline from ``directory`` (written by :meth:`save_pretrained`).

        ``attn_implementation`` defaults to ``"flash_attention_2"`` when the ``flash_attn`` package is
        installed and ``device`` is CUDA, else ``"sdpa"``.
        """
        import importlib.util

        import transformers

        if attn_implementation is None:
            on_cuda = device is not None and torch.device(device).type == "cuda"
            has_fa = importlib.util.find_spec("flash_attn") is not None
            attn_implementation = "flash_attention_2" if (on_cuda and has_fa) else "sdpa"

        if not os.path.isdir(directory):  # a typo, or a file: not "has no zreward_config.json"
            raise FileNotFoundError(f"no directory at {os.fspath(directory)!r} (a ZRewardModel saved with "
                                    "save_pretrained is a directory)")
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.exists(path):
            hint = (" (a Hugging Face model directory: load it with transformers, wrap it as "
                    "ZRewardModel(model, processor), which adds the score tokens, and save_pretrained that)"
                    if os.path.exists(os.path.join(directory, "config.json")) else "")
            raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; it was not saved by ZRewardModel{hint}")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        model_cls = getattr(transformers, cfg["model_class"], None)
        if model_cls is None:
            raise ValueError(f"transformers has no model class {cfg['model_class']!r} (installed {transformers.__version__})")
        kw = dict(local_files_only=True, attn_implementation=attn_implementation)
        if dtype is not None:
            kw["dtype"] = dtype
        model = model_cls.from_pretrained(directory, **kw)
        processor = transformers.AutoProcessor.from_pretrained(directory, local_files_only=True)
        if device is not None:
            model = model.to(device)
        tokens = ScoreTokens.from_dict(cfg["score_tokens"])
        tokens.verify(_tokenizer_of(processor))
        return cls(model.eval(), processor, Rubric.from_dict(cfg["rubric"]), tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
