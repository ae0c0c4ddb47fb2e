"""Tiny image-text-to-text models of four families, built from configs with a local word-level
tokenizer (no hub access): Qwen2-VL (M-RoPE positions), Qwen2.5-VL (windowed vision attention),
Qwen3-VL (interleaved M-RoPE, DeepStack visual features, 16-pixel patches) and LLaVA (CLIP vision
+ Llama).

Used by the tests and benchmarks, and as a starting point for models trained from scratch here
(no pretrained weights can be downloaded).  ``hidden``/``layers``/``vision_depth`` size them.

``seed`` fixes the weights: they are drawn from torch's CPU random stream seeded with it, and the
caller's stream is restored afterwards, so building a model leaves the caller's random numbers as
they were.  ``seed=None`` draws the weights from (and advances) the global stream instead.
"""

import numbers

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ["[UNK]", "[PAD]", "a", "an", "red", "blue", "green", "car", "dog", "circle", "square", "on", "the", "of",
         "image", "rate", "for", "score", "from", "to", "in", "steps", "answer", "with", "single", "prompt", "Prompt",
         "Rate", "Answer", "how", "well", "matches", "text", "real", "visual", "appeal", "physical", "alignment",
         "realism", "aesthetics", "plausibility", ":", ".", ",", "(", ")", "=", "\n", "0", "1", "2", "3", "4", "5",
         "6", "7", "8", "9", "user", "assistant", "USER", "ASSISTANT"]
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                "<|endoftext|>"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _seeded(seed, build):
    """``build()`` with the weights drawn from a stream seeded with ``seed``, the caller's restored."""
    if seed is None:
        return build()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):  # the weights are made on the CPU
        torch.manual_seed(int(seed))
        return build()


def _tokenizer(special, eos, extra_words=()):
    words = list(WORDS) + [w for w in extra_words if w not in WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.add_tokens(special, special_tokens=True)
    fast.eos_token = eos
    return fast


def _qwen_parts(processor_cls, extra_words, image_processor, video_processor):
    tok = _tokenizer(QWEN_SPECIAL, "<|endoftext|>", extra_words)
    proc = processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                         chat_template=QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return tok, proc, ids, special


def _mrope_section(head_dim):
    """(temporal, height, width) split of half the head dimension."""
    return [head_dim // 2 - 2 * (head_dim // 8), head_dim // 8, head_dim // 8]


def _qwen2_text_config(tok, ids, hidden, layers):
    """Text config shared by the tiny Qwen2-VL and Qwen2.5-VL (head dim = hidden / 4, M-RoPE)."""
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|endoftext|>"],
                rope_scaling={"type": "mrope", "mrope_section": _mrope_section(hidden // 4)})


def _tiny_qwen2_family(config_cls, model_cls, processor_cls, vision_config, seed, hidden, layers, max_pixels,
                       extra_words):
    """Qwen2-VL and Qwen2.5-VL differ only in their classes and vision tower."""
    tok, proc, ids, special = _qwen_parts(
        processor_cls, extra_words,
        transformers.Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels), transformers.Qwen2VLVideoProcessor())
    cfg = config_cls(
        text_config=_qwen2_text_config(tok, ids, hidden, layers), vision_config=vision_config,
        pad_token_id=tok.pad_token_id, eos_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|im_start|>"], **special)
    return _seeded(seed, lambda: model_cls(cfg).eval()), proc


def tiny_qwen2_vl(seed=0, hidden=32, layers=2, vision_depth=2, max_pixels=84 * 84, extra_words=()):
    """``extra_words``: more whole words for the word-level tokenizer (e.g. a synthetic world's vocabulary)."""
    vision = dict(depth=vision_depth, embed_dim=hidden, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    return _tiny_qwen2_family(transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration,
                              transformers.Qwen2VLProcessor, vision, seed, hidden, layers, max_pixels, extra_words)


def tiny_qwen2_5_vl(seed=0, hidden=32, layers=2, vision_depth=2, max_pixels=84 * 84, extra_words=()):
    vision = dict(depth=vision_depth, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4,
                  out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=[vision_depth - 1])
    return _tiny_qwen2_family(transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                              transformers.Qwen2_5_VLProcessor, vision, seed, hidden, layers, max_pixels, extra_words)


def tiny_qwen3_vl(seed=0, hidden=32, layers=2, vision_depth=2, max_pixels=96 * 96, extra_words=()):
    tok, proc, ids, special = _qwen_parts(
        transformers.Qwen3VLProcessor, extra_words,
        transformers.Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=max_pixels, patch_size=16, merge_size=2),
        transformers.Qwen3VLVideoProcessor(patch_size=16))
    hd = hidden // 4
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hd, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                          "mrope_section": _mrope_section(hd)},
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=vision_depth, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4,
                           out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        **special)
    return _seeded(seed, lambda: transformers.Qwen3VLForConditionalGeneration(cfg).eval()), proc


def tiny_llava(seed=0, hidden=32, layers=2, vision_depth=2, extra_words=()):
    tok = _tokenizer(["<image>", "</s>"], "</s>", extra_words)
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                       vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                       image_token="<image>", num_additional_image_tokens=1)
    vision = transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_depth,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=2048,
                                    pad_token_id=tok.pad_token_id)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                   image_token_index=tok.convert_tokens_to_ids("<image>"),
                                   vision_feature_select_strategy="default", vision_feature_layer=-1)
    return _seeded(seed, lambda: transformers.LlavaForConditionalGeneration(cfg).eval()), proc


FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl, "llava": tiny_llava}
#: Image side (pixels) each tiny processor keeps as is: a multiple of its patch x merge size.
NATIVE_SIDE = {"qwen2_vl": 56, "qwen2_5_vl": 56, "qwen3_vl": 64, "llava": 28}
