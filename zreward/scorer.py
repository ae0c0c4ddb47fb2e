"""``RewardScorer``: score images on rubric dimensions with one prefix pass per image.

For a batch of B images and D dimensions the scorer runs the backbone once over the B shared
prefixes (chat template, image, prompt, rubric preamble) with a KV cache, then runs the D dimension
questions (the suffixes) against it: packed end to end in one row per image under a block mask
(SDPA / eager attention), or as B x D short rows against a cache repeated D times (FlashAttention).  The nine
score logits at the end of each suffix come from the vocab-restricted head
(:func:`zreward_kernels.restricted_logits`) and the distribution maths from
:func:`zreward_kernels.score_stats`.  ``shared_prefix=False`` runs the B x D full queries instead
(the baseline, and the check that both agree).

Padding: prefixes are left-padded and suffixes right-padded; position ids are computed from the
attention masks (and, for M-RoPE models such as Qwen2-VL, from the model's stored rope deltas), so
an image's scores do not depend on what else is in the batch beyond floating-point reduction order
(the tests bound the difference by 1e-4 in float32).  Batches are formed after sorting by prompt
length to keep padding small; results come back in input order.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from zreward_kernels import restricted_logits, score_stats
from zreward_kernels._common import cacheable

from .hf import backbone, lm_head_params
from .model import TOKENIZER_LOCK, ZRewardModel

#: Vocabulary columns per chunk of the in-vocabulary-mass normaliser.
VOCAB_CHUNK = 32768


@dataclass
class RewardOutput:
    """Scores of B images on D dimensions (float32, on the model's device)."""

    probs: torch.Tensor  # [B, D, K]
    mean: torch.Tensor  # [B, D]
    std: torch.Tensor  # [B, D]
    reward: torch.Tensor  # [B]: rubric-weighted mean over the scored dimensions
    in_vocab_mass: Optional[torch.Tensor]  # [B, D]: softmax mass of the K score tokens in the full vocabulary
    dimensions: Tuple[str, ...]


def _out_of_inference(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def _is_pil(img) -> bool:
    return hasattr(img, "convert") and hasattr(img, "size") and not isinstance(img, (np.ndarray, torch.Tensor))


def _single_image(images) -> bool:
    """One image given on its own (not in a list): a path, a PIL image, an HxWx3 array or a
    ``[3, H, W]`` tensor."""
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 3
    return isinstance(images, torch.Tensor) and images.dim() == 3 and images.shape[0] == 3


def read_image(path) -> np.ndarray:
    """The image file at ``path`` as an HxWx3 uint8 array (RGB)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file at {os.fspath(path)!r}")
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def check_count(name: str, value, low: int = 1) -> int:
    """``value`` as an ``int`` (numpy integers too), refused by ``name`` unless an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def unreadable_images(paths) -> List[Tuple[str, str]]:
    """``(path, reason)`` for each path that is not an image file PIL can identify, checked from the
    file headers alone (no pixels are decoded), so a broken or mislabelled file in a long list is
    found before any image is scored rather than when its batch comes up."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for p in paths:
        if not os.path.isfile(p):
            bad.append((os.fspath(p), "not found"))
            continue
        try:
            with Image.open(p):  # lazy: reads the header only
                pass
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            bad.append((os.fspath(p), f"not a readable image ({type(exc).__name__}: {exc})"))
    return bad


def image_batch(images):
    """``images`` as given, except that a one-pass iterable (a generator, ``map``) becomes a list: it
    is counted against the prompts and then read, and a single prompt string made it one image."""
    return list(images) if isinstance(images, Iterator) else images


def prompt_list(prompts, images) -> List[str]:
    """``prompts`` as a list, one per image; a single string is every image's prompt (as ImageReward
    and HPS take one prompt for a list of images)."""
    if isinstance(prompts, str):
        if _single_image(images):
            n = 1
        elif isinstance(images, (torch.Tensor, np.ndarray)):
            n = images.shape[0] if images.ndim == 4 else 1
        else:
            n = len(images) if isinstance(images, (list, tuple)) else 1
        return [prompts] * n
    if not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a string or a sequence of strings, got a {type(prompts).__name__}; "
                        "score(images, prompts) takes the images first")
    return list(prompts)


def _unit_range(img: torch.Tensor, what: str) -> torch.Tensor:
    """A tensor image as floating point in [0, 1]: uint8 (torchvision.io.read_image's output, 0..255,
    unambiguous) is divided by 255."""
    if img.dtype == torch.uint8:
        return img.float() / 255
    if not img.is_floating_point():
        raise TypeError(f"{what} must be uint8 (0..255) or floating point in [0, 1], got {img.dtype}")
    return img


def _check_unit_range(imgs: List[torch.Tensor], what: str) -> None:
    """Refuse values outside [0, 1] or NaN; one host sync for all the tensors."""
    idx = [i for i, t in enumerate(imgs) if t.numel()]
    if not idx:
        return
    dev = imgs[idx[0]].device
    ranges = torch.stack([torch.stack(torch.aminmax(imgs[i].detach())).float().to(dev) for i in idx]).tolist()
    for i, (lo, hi) in zip(idx, ranges):
        if not (lo >= 0 and hi <= 1):  # also false for NaN
            hint = (" (a VAE decoder's output lies in [-1, 1]: pass (images + 1) / 2, as diffusers' "
                    "postprocessing does)" if -1 <= lo < 0 and hi <= 1 else "")
            where = f" (image {i})" if len(imgs) > 1 else ""
            raise ValueError(f"{what} must hold finite values in [0, 1], got min {lo} and max {hi}{where}{hint}")


def tensor_images(images) -> bool:
    """Whether ``images`` are tensors (a batch, or a non-empty list of them): what differentiable
    scoring takes."""
    return isinstance(images, torch.Tensor) or (isinstance(images, (list, tuple)) and len(images) > 0
                                                and all(isinstance(x, torch.Tensor) for x in images))


def check_array_image(img: np.ndarray, where: str) -> None:
    """An image array must be HxWx3 uint8; the error says how to make one."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        hint = ("; drop the alpha channel (img[..., :3])" if img.ndim == 3 and img.shape[2] == 4 else
                "; a grey image: np.stack([img] * 3, -1)" if img.ndim == 2 else
                "; floats in [0, 1]: (img * 255).round().astype(np.uint8), or pass a tensor"
                if img.dtype.kind == "f" else "")
        raise ValueError(f"{where}: arrays must be HxWx3 uint8, got {img.dtype} {img.shape}{hint}")


def image_array(img, where: str = "image") -> np.ndarray:
    """One image given as a file path, a PIL image (any mode: converted to RGB) or an HxWx3 uint8
    array, as an HxWx3 uint8 array; ``where`` names it in errors."""
    if isinstance(img, (str, os.PathLike)):
        try:
            return read_image(img)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: {e}") from None
    if isinstance(img, np.ndarray):
        check_array_image(img, where)
        return img
    if _is_pil(img):
        return np.array(img.convert("RGB"))
    raise TypeError(f"{where}: expected a PIL image, an HxWx3 uint8 array, an image file path or "
                    f"a [B,3,H,W] tensor, got {type(img).__name__}")


def _as_images(images, n: int):
    """Validate images.  A float tensor [B, 3, H, W] in [0, 1] is returned as is (it is preprocessed
    by the processor's torch backend on its own device: no PIL or numpy round trip, and gradients
    flow); PIL images, HxWx3 uint8 arrays and image file paths are returned as a list of uint8
    arrays.  A single image (not in a list; a tensor ``[3, H, W]``) is a batch of one."""
    if isinstance(images, np.ndarray) and images.ndim not in (3, 4):  # list() would split it into rows
        raise ValueError(f"an image array must be HxWx3 (or a batch BxHxWx3), got shape {images.shape}"
                         + ("; a grey image: np.stack([img] * 3, -1)" if images.ndim == 2 else ""))
    if _single_image(images):
        images = images[None] if isinstance(images, torch.Tensor) else [images]
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"an image tensor must be [B, 3, H, W] (or [3, H, W] for one image), got shape "
                             f"{tuple(images.shape)}")
        images = _unit_range(images, "an image tensor")
        _check_unit_range([images], "an image tensor")
        if images.shape[0] != n:
            raise ValueError(f"got {images.shape[0]} images for {n} prompts")
        return images
    if isinstance(images, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in images):
        # [3, H, W] tensors of any sizes (a generator at several resolutions): the batch path, image by image
        out = []
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor):
                raise TypeError(f"image {i}: a list that holds tensor images must hold only tensors, got "
                                f"{type(img).__name__} (convert it, or score the two kinds in separate calls)")
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: a tensor image in a list must be [3, H, W], got shape {tuple(img.shape)}")
            out.append(_unit_range(img, f"image {i}"))
        _check_unit_range(out, "an image tensor")
        if len(out) != n:
            raise ValueError(f"got {len(out)} images for {n} prompts")
        return out
    else:
        out = [image_array(img, f"image {i}") for i, img in enumerate(list(images))]
    if len(out) != n:
        raise ValueError(f"got {len(out)} images for {n} prompts")
    return out


def _failing_image(call, images, texts) -> Optional[int]:
    """The first image that ``call([text], [image])`` refuses on its own while it takes the same text
    with a plain 64 x 64 image of the same kind (None if there is none: the batch failed for another
    reason).  Run only after the whole batch failed, to say which image."""
    for k, (img, text) in enumerate(zip(images, texts)):
        try:
            call([text], [img])
        except Exception:
            plain = (torch.zeros(3, 64, 64, device=img.device) if isinstance(img, torch.Tensor)
                     else np.zeros((64, 64, 3), np.uint8))
            try:
                call([text], [plain])
            except Exception:
                return None  # not this image's fault
            return k
    return None


def _image_label(images, i: int) -> str:
    """How an error names the caller's image ``i``: its index, and its file where it was given as one."""
    given = images[i] if isinstance(images, (list, tuple)) else None
    return f"image {i}" + (f" ({os.fspath(given)!r})" if isinstance(given, (str, os.PathLike)) else "")


def _pixel_size(img) -> str:
    """``H x W pixels`` of an HxWx3 array or a [3, H, W] tensor."""
    h, w = (img.shape[-2:] if isinstance(img, torch.Tensor) else img.shape[:2])
    return f"{int(h)} x {int(w)} pixels"


_IMAGE_NAMES: "contextvars.ContextVar[Optional[List[str]]]" = contextvars.ContextVar("zreward_image_names",
                                                                                     default=None)


@contextlib.contextmanager
def named_images(names):
    """Within the block, an image the processor refuses in a batch of ``len(names)`` images is named
    ``names[k]`` (k its place in the batch) rather than "image k of the batch": the trainers pass
    their items' ids (``training item '17'``).  A call given its own names, or a batch of another
    size, is not affected."""
    token = _IMAGE_NAMES.set(list(names))
    try:
        yield
    finally:
        _IMAGE_NAMES.reset(token)


def _named(exc: Exception, message: str) -> Exception:
    """``exc``'s type with ``message``, or a ValueError where that type takes no single message."""
    try:
        out = type(exc)(message)
    except Exception:
        return ValueError(message)
    return out if str(out) == message else ValueError(message)


class RewardScorer:
    """High-throughput scorer over a :class:`ZRewardModel`."""

    def __init__(self, model: ZRewardModel, *, batch_size: int = 8, shared_prefix: bool = True,
                 in_vocab_mass: bool = True, autocast_dtype: Optional[torch.dtype] = None,
                 autocast: bool = True, backend: Optional[str] = None, layout: str = "auto"):
        """``autocast``: run the model under ``torch.autocast`` -- ``autocast_dtype`` if given, else
        bf16 for float32 models on CUDA; none elsewhere (an enclosing autocast, the caller's or
        accelerate's, stays in force: the scorer never disables one).  Trainers pass ``autocast=False`` and let
        accelerate's ``mixed_precision`` decide.  ``layout`` places the D dimension suffixes after
        the shared prefix: ``"packed"`` (one row per image, block mask), ``"repeat"`` (the cache
        repeated D times) or ``"auto"`` (packed under SDPA and eager attention, repeat otherwise)."""
        batch_size = check_count("batch_size", batch_size)
        if layout not in ("auto", "packed", "repeat"):
            raise ValueError(f"layout must be 'auto', 'packed' or 'repeat', got {layout!r}")
        self.layout = layout
        self.model = model
        self.batch_size = batch_size
        self.shared_prefix = shared_prefix
        self.in_vocab_mass = in_vocab_mass
        self.autocast_dtype = autocast_dtype
        self.autocast = autocast
        self.backend = backend
        self._base = backbone(model.model)
        self._const_cache: Dict[tuple, object] = {}  # question tensors (_suffixes) and score-token ids (_head)
        params = inspect.signature(self._base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._mrope = hasattr(self._base, "get_rope_index")

    # ---- public API ----------------------------------------------------------------------------
    def score(self, images, prompts: Sequence[str], dimensions: Optional[Sequence[str]] = None,
              differentiable: bool = False) -> RewardOutput:
        """Score ``images`` (a list of PIL images, HxWx3 uint8 arrays or image file paths, a tensor
        [B,3,H,W], float in [0,1] or uint8, or a list of [3,H,W] such tensors of any sizes; a single
        image is a batch of one; a generator is read as a list) against their ``prompts`` (one per image, or one string for all) on
        ``dimensions`` (a name or a sequence of names; default: every rubric dimension).

        By default the model runs under ``torch.inference_mode()``; the outputs are then copied out
        of it (a few hundred numbers per image), so they behave like ``torch.no_grad()`` results: a
        policy-gradient loss may multiply them with log-probabilities, and they may be changed in place.
        ``differentiable=True`` (tensor images only: a batch or a list of them; not inside
        ``torch.inference_mode()``) keeps the graph, so ``out.reward.sum().backward()`` reaches the
        input pixels through the processor's torch preprocessing (resize, normalise, patchify) -- the
        ReFL / DRaFT use of SPEC section 6.  The model's own parameters get gradients too unless frozen.
        """
        images = image_batch(images)
        if differentiable and not tensor_images(images):
            raise TypeError("differentiable=True needs images as a float tensor [B, 3, H, W] in [0, 1] "
                            "(or a list of [3, H, W] ones)")
        if differentiable:
            if torch.is_inference_mode_enabled():  # enable_grad cannot leave it: the reward would have no graph
                raise RuntimeError("score(differentiable=True) was called inside torch.inference_mode(), where no "
                                   "graph can be recorded; call it outside inference mode")
            with torch.enable_grad():
                return self._score(images, prompts, dimensions)
        with torch.inference_mode():
            out = self._score(images, prompts, dimensions)
        # inference tensors cannot be saved for backward nor changed in place outside inference mode:
        # `(logp * out.reward).mean().backward()` or `out.reward -= baseline` would raise
        return RewardOutput(**{f.name: _out_of_inference(getattr(out, f.name)) for f in fields(out)})

    def _score(self, images, prompts, dimensions) -> RewardOutput:
        prompts = prompt_list(prompts, images)
        if not prompts:
            raise ValueError("score() needs at least one image and prompt")
        if not all(isinstance(p, str) for p in prompts):
            bad = next(p for p in prompts if not isinstance(p, str))
            raise TypeError(f"prompts must be strings, got a {type(bad).__name__}; score(images, prompts) takes the "
                            "images first (ImageReward's score(prompt, images) takes them second)")
        if isinstance(dimensions, str):
            dimensions = (dimensions,)
        dims = tuple(dimensions) if dimensions is not None else self.model.rubric.dimensions
        if not dims:
            raise ValueError("dimensions must name at least one rubric dimension")
        if len(set(dims)) != len(dims):  # a repeated one would count twice in the reward
            raise ValueError(f"dimensions must be distinct, got {list(dims)}")
        for d in dims:
            self.model.rubric.index(d)
        imgs = _as_images(images, len(prompts))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        parts, masses, where = [], [], []
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            batch = imgs[torch.tensor(idx, device=imgs.device)] if isinstance(imgs, torch.Tensor) else [imgs[i] for i in idx]
            lg, ms = self._score_batch(batch, [prompts[i] for i in idx], dims,
                                       lambda k, idx=idx: _image_label(images, idx[k]))
            parts.append(lg)
            masses.append(ms)
            where.extend(idx)
        inverse = torch.empty(len(where), dtype=torch.long)
        inverse[torch.tensor(where)] = torch.arange(len(where))
        inverse = inverse.to(parts[0].device)
        logits = torch.cat(parts)[inverse]  # back to input order (differentiable)
        mass = torch.cat(masses)[inverse] if self.in_vocab_mass else None
        st = score_stats(logits, bin_values=self.model.rubric.bin_values, backend=self.backend)
        reward = self.model.rubric.reward(st.mean, dims)
        return RewardOutput(st.probs, st.mean, st.std, reward, mass, dims)

    # ---- internals -----------------------------------------------------------------------------
    def _processor_inputs(self, images, texts: List[str], name_of: Optional[Callable[[int], str]] = None
                          ) -> Dict[str, torch.Tensor]:
        """The processor's inputs for one batch.  ``name_of(k)`` says which image the caller gave as the
        batch's k-th, for the error raised when the processor refuses one (default: its place in the
        batch); it is called on that error only."""
        # the layout is stated, not inferred: HF guesses channels-first for an HxWx3 array whose height
        # is 1 or 3 (or up to 4 in recent releases), silently scoring scrambled pixels
        extra = {"input_data_format": "channels_last"}  # _as_images gives HxWx3 uint8 arrays
        if tensor_images(images):  # _as_images gave a batch, or a list of tensors only
            extra = {"do_rescale": False, "input_data_format": "channels_first"}  # [3, H, W] in [0, 1]
            images = list(images)
        if name_of is None:
            names = _IMAGE_NAMES.get()
            if names is not None and len(names) == len(images):
                name_of = names.__getitem__
        tracked = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in images)
        # left padding asked for per call: the shared tokenizer's padding_side is never switched (code
        # using the tokenizer meanwhile saw "left").  The call itself is serialised: a fast tokenizer
        # sets its padding on the shared Rust object per call, which races between threads
        with TOKENIZER_LOCK:
            call = lambda t, im: self.model.processor(text=t, images=im, return_tensors="pt",  # noqa: E731
                                                      padding=True, padding_side="left", **extra)
            try:
                enc = call(texts, images)
            except Exception as exc:  # which image? (Qwen's "absolute aspect ratio must be smaller than 200")
                bad = _failing_image(call, images, texts)
                if bad is None:
                    raise
                raise _named(exc, f"{name_of(bad) if name_of is not None else f'image {bad} of the batch'} "
                                  f"({_pixel_size(images[bad])}) cannot be preprocessed by "
                                  f"{type(self.model.processor).__name__}: {exc}") from exc
        if tracked and not any(isinstance(v, torch.Tensor) and v.requires_grad for v in enc.values()):
            # transformers < 5.4 preprocesses tensor images without keeping their graph: the reward
            # would silently not depend on the pixels as far as autograd can see
            import transformers

            raise RuntimeError(
                f"the processor ({type(self.model.processor).__name__}, transformers {transformers.__version__}) "
                "returned pixel values that do not track the gradient of `images`, so differentiable scoring "
                "cannot reach the pixels; transformers >= 5.4 keeps the graph through its torch preprocessing")
        dev = self.model.device
        return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}

    def _suffixes(self, dims) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [D, Ls], mask [D, Ls], lengths [D])`` of the dimensions' questions, right-padded, on the
        model's device.  Kept per (question texts, template tail, tokenizer size, pad id, device): a
        scoring call otherwise tokenised every question again and copied them to the device one by
        one (234 us per batch of four dimensions on the development CPU, five host-to-device copies
        on a GPU); nothing writes into these tensors."""
        dims = tuple(dims)
        tok = self.model.tokenizer
        pad = tok.pad_token_id or 0
        dev = self.model.device
        key = (tuple(self.model.rubric.question(d) for d in dims), self.model._template()[1], len(tok), pad, dev)
        hit = self._const_cache.get(key)
        if hit is not None:
            return hit
        ids = [self.model.suffix_ids(d) for d in dims]
        length = max(len(x) for x in ids)
        # normal tensors even when made inside score()'s inference mode: a later differentiable call
        # (training, ReFL) saves them for backward, which inference tensors refuse
        with torch.inference_mode(False):
            out = torch.full((len(dims), length), pad, dtype=torch.long)
            mask = torch.zeros((len(dims), length), dtype=torch.long)
            for j, x in enumerate(ids):
                out[j, :len(x)] = torch.tensor(x)
                mask[j, :len(x)] = 1
            hit = (out.to(dev), mask.to(dev), torch.tensor([len(x) for x in ids]).to(dev))
        if not cacheable(hit[0]):  # made inside torch.func.grad/jvp or a fake-tensor mode: see _head
            return hit
        if len(self._const_cache) >= 64:  # a bounded cache: many distinct dimension lists
            self._const_cache.clear()
        self._const_cache[key] = hit
        return hit

    def _autocast(self):
        """The scorer's own autocast, or nothing: an enclosing autocast (accelerate's
        ``mixed_precision``, or the caller's) stays in force when the scorer adds none."""
        dev = self.model.device
        dt = self.autocast_dtype
        if not self.autocast:
            return contextlib.nullcontext()
        if dt is None and dev.type == "cuda" and next(self.model.model.parameters()).dtype == torch.float32:
            dt = torch.bfloat16
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=dt)

    def _head(self, h: torch.Tensor):
        weight, bias = lm_head_params(self.model.model)
        key = (self.model.score_tokens.token_ids, h.device)
        ids = self._const_cache.get(key)
        if ids is None:  # one host-to-device copy per device, not per batch
            with torch.inference_mode(False):  # a normal tensor (see _suffixes)
                ids = torch.tensor(key[0], device=h.device)
            # not kept when made inside a torch.func transform (grad, jvp): the tensor is that
            # transform's wrapper, without storage once it ends, and a later call's Triton launch
            # failed on it ("Cannot access data pointer of Tensor that doesn't have storage")
            if cacheable(ids):
                self._const_cache[key] = ids
        logits = restricted_logits(h, weight, ids, bias, validate=False).float()
        mass = None
        if self.in_vocab_mass:
            # a diagnostic: no gradient (so a differentiable call keeps no [rows, V] activations), and
            # the full-vocabulary log-normaliser in column chunks (peak memory rows x VOCAB_CHUNK)
            with torch.no_grad():
                hd = h.detach()
                lse = None
                for start in range(0, weight.shape[0], VOCAB_CHUNK):
                    z = (hd @ weight[start:start + VOCAB_CHUNK].to(hd.dtype).t()).float()
                    if bias is not None:
                        z = z + bias[start:start + VOCAB_CHUNK].float()
                    part = torch.logsumexp(z, -1)
                    lse = part if lse is None else torch.logaddexp(lse, part)
                mass = torch.exp(torch.logsumexp(logits.detach(), -1) - lse)
        return logits, mass

    def _score_batch(self, images, prompts, dims, name_of: Optional[Callable[[int], str]] = None):
        b, d = len(prompts), len(dims)
        suffix, suffix_mask, suffix_len = self._suffixes(dims)
        prefix = self._processor_inputs(images, [self.model.prefix_text(p) for p in prompts], name_of)
        with self._autocast():
            if self.shared_prefix:
                h = self._shared(prefix, suffix, suffix_mask, suffix_len, b, d)
            else:
                h = self._independent(images, prompts, suffix, suffix_mask, suffix_len, b, d)
            logits, mass = self._head(h)
        return logits.view(b, d, -1), (mass.view(b, d) if mass is not None else None)

    def _text_positions(self, mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def _attn_impl(self) -> str:
        cfg = getattr(getattr(self._base, "language_model", None), "config", None) or self._base.config
        return str(getattr(cfg, "_attn_implementation", None) or "eager")

    def _shared(self, prefix, suffix, suffix_mask, suffix_len, b, d):
        """Prefix pass with a KV cache, then the D suffixes against it.

        ``layout="packed"`` (SDPA and eager attention): the D suffixes of an image are laid end to end
        in one row of ``D * Ls`` tokens with a block mask (each suffix sees the prefix and its own
        earlier tokens, never another suffix) and position ids that restart after the prefix for
        every suffix, so the cache is neither repeated D times nor copied D times per layer.
        ``layout="repeat"`` (FlashAttention, which takes no custom mask): the cache is repeated D
        times and the suffixes run as B x D short rows.  Both give the full queries' states."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.model.config)
        except TypeError:  # older transformers
            cache = DynamicCache()
        pmask = prefix["attention_mask"]
        kw = dict(prefix)
        if not self._mrope:
            kw["position_ids"] = self._text_positions(pmask)
        self._base(**kw, use_cache=True, **{self._cache_kw: cache})
        deltas = getattr(self._base, "rope_deltas", None) if self._mrope else None
        n_valid = pmask.sum(1, keepdim=True)  # [B, 1]
        ls = suffix.shape[1]
        dev = suffix.device
        impl = self._attn_impl()
        packed = self.layout == "packed" or (self.layout == "auto" and impl in ("sdpa", "eager"))
        if packed and impl not in ("sdpa", "eager"):
            raise ValueError(f"layout='packed' needs SDPA or eager attention (a custom mask); the model uses {impl!r}")
        if packed:
            step = torch.arange(ls, device=dev).repeat(d)  # position of each packed token in its suffix
            pos = n_valid + step  # [B, D*Ls]
            if deltas is not None:
                pos = pos + deltas.to(pos.device)
            if self._mrope:
                pos = pos.unsqueeze(0).expand(3, -1, -1)
            block = torch.arange(d, device=dev).repeat_interleave(ls)
            own = (block[:, None] == block[None, :]) & (step[:, None] >= step[None, :])
            own = own & suffix_mask.reshape(1, -1).bool()  # [D*Ls, D*Ls]
            see_prefix = pmask.bool()[:, None, :].expand(b, d * ls, pmask.shape[1])
            allowed = torch.cat([see_prefix, own.unsqueeze(0).expand(b, -1, -1)], dim=2).unsqueeze(1)
            if impl == "sdpa":
                mask = allowed
            else:  # additive mask for eager attention
                dt = next(self._base.parameters()).dtype
                mask = torch.zeros(allowed.shape, dtype=dt, device=dev).masked_fill_(~allowed, torch.finfo(dt).min)
            ids = suffix.reshape(1, d * ls).expand(b, -1)
            out = self._base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             **{self._cache_kw: cache})
            last = torch.arange(d, device=dev) * ls + suffix_len - 1  # [D]
            return out.last_hidden_state[:, last].reshape(b * d, -1)
        cache.batch_repeat_interleave(d)
        pos = n_valid + torch.arange(ls, device=dev)  # [B, Ls]: continues each prefix's text positions
        if deltas is not None:
            pos = pos + deltas.to(pos.device)
        pos = pos.repeat_interleave(d, 0)  # [B*D, Ls]
        if self._mrope:
            pos = pos.unsqueeze(0).expand(3, -1, -1)
        ids = suffix.repeat(b, 1)  # row b*D + j holds dimension j
        smask = suffix_mask.repeat(b, 1)
        mask = torch.cat([pmask.repeat_interleave(d, 0), smask], dim=1)
        out = self._base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self._cache_kw: cache})
        last = suffix_len.repeat(b) - 1
        return out.last_hidden_state[torch.arange(b * d, device=last.device), last]

    def _independent(self, images, prompts, suffix, suffix_mask, suffix_len, b, d):
        if isinstance(images, torch.Tensor):
            rep_images = images.repeat_interleave(d, 0)
        else:
            rep_images = [img for img in images for _ in range(d)]
        rep_prompts = [p for p in prompts for _ in range(d)]
        return self._rows_hidden(rep_images, rep_prompts, suffix.repeat(b, 1), suffix_mask.repeat(b, 1),
                                 suffix_len.repeat(b))

    def rows_states(self, images, prompts, tails: torch.Tensor, tail_mask: torch.Tensor):
        """Backbone states ``[N, P + L, H]`` of rows ``prefix(image, prompt) + tail``; returns
        ``(states, P)``.  Prefixes are left-padded by the processor, tails (token ids after the
        prefix: a question, or a question + trace + marker) must be right-padded."""
        enc = self._processor_inputs(images, [self.model.prefix_text(p) for p in prompts])
        p = enc["input_ids"].shape[1]
        ids = torch.cat([enc["input_ids"], tails], dim=1)
        mask = torch.cat([enc["attention_mask"], tail_mask], dim=1)
        kw = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in kw:
            kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros_like(tails)], 1)
        if not self._mrope:
            kw["position_ids"] = self._text_positions(mask)
        # no KV cache: nothing reads one here, and a model with gradient checkpointing would warn
        out = self._base(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        return out.last_hidden_state, p

    def _rows_hidden(self, images, prompts, suffix, suffix_mask, suffix_len):
        """Backbone hidden state at the score position of full queries (one row per image, prompt, suffix)."""
        states, p = self.rows_states(images, prompts, suffix, suffix_mask)
        last = p + suffix_len - 1
        return states[torch.arange(states.shape[0], device=last.device), last]

    def query_logits(self, images, prompts: Sequence[str], dimensions: Sequence[str]) -> torch.Tensor:
        """Score-token logits ``[N, K]`` (float32) of N full queries, row i = (images[i], prompts[i],
        dimensions[i]).  Runs in the caller's grad mode (no inference mode): the training forward."""
        prompts = list(prompts)
        dims = list(dimensions)
        if len(dims) != len(prompts):
            raise ValueError(f"got {len(dims)} dimensions for {len(prompts)} prompts")
        imgs = _as_images(images, len(prompts))
        order = sorted(set(dims), key=self.model.rubric.index)
        suffix, smask, slen = self._suffixes(order)
        row = torch.tensor([order.index(d) for d in dims], device=suffix.device)
        with self._autocast():
            h = self._rows_hidden(imgs, prompts, suffix[row], smask[row], slen[row])
            logits, _ = self._head(h)
        return logits


def as_reward_fn(scorer: RewardScorer, dimensions: Optional[Sequence[str]] = None):
    """Adapter for T2I RL loops: ``fn(images, prompts, metadata=None) -> (scores [B], info)``.

    ``info`` holds per-dimension ``mean`` and ``std`` tensors and the in-vocabulary mass.
    """

    def fn(images, prompts, metadata=None):
        out = scorer.score(images, prompts, dimensions)
        info = {
            "mean": {dim: out.mean[:, j] for j, dim in enumerate(out.dimensions)},
            "std": {dim: out.std[:, j] for j, dim in enumerate(out.dimensions)},
            "in_vocab_mass": out.in_vocab_mass,
        }
        return out.reward, info

    return fn
