"""Scorer throughput on a small Qwen2-VL built from a config (hidden 128, 4 layers, vision depth 4,
112x112 images): images/s for 4-dimension scoring with a shared prefix (suffixes packed under a
block mask, and the cache repeated per dimension), with four independent queries, and by generating
8 tokens per query and parsing a number; plus the cost of a teacher-style reasoning trace of 256
generated tokens per query.  Every path is timed from images and prompts (image preprocessing and
tokenisation included).  Both scoring paths give identical distributions
(asserted here on every run)."""

import re

import numpy as np
import pytest
import torch
from conftest import DEVICE, QUICK, sync

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from zreward.model import ZRewardModel  # noqa: E402
from zreward.scorer import RewardScorer  # noqa: E402
from zreward.tiny import tiny_qwen2_vl  # noqa: E402

N_IMAGES = 4 if QUICK else 16
PROMPTS = ["a red car on the square", "a blue dog", "green circle on a square", "a red circle"]
_STATE = {}


def _setup():
    if not _STATE:
        model, proc = tiny_qwen2_vl(hidden=128, layers=4, vision_depth=4, max_pixels=112 * 112)
        zm = ZRewardModel(model.to(DEVICE), proc)
        rng = np.random.default_rng(0)
        images = [(rng.random((112, 112, 3)) * 255).astype("uint8") for _ in range(N_IMAGES)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(N_IMAGES)]
        a = RewardScorer(zm, batch_size=N_IMAGES, in_vocab_mass=False).score(images, prompts)
        b = RewardScorer(zm, batch_size=N_IMAGES, in_vocab_mass=False, shared_prefix=False).score(images, prompts)
        torch.testing.assert_close(a.probs, b.probs, atol=1e-4, rtol=1e-4)
        _STATE.update(zm=zm, images=images, prompts=prompts)
    return _STATE["zm"], _STATE["images"], _STATE["prompts"]


def _generate_inputs(zm, images, prompts):
    """The B x D full queries as generate() inputs: the tokens the scorer's independent path scores,
    left-padded as whole queries (zreward.train.rl builds the same inputs for sampling traces)."""
    from zreward.train.rl import _generation_inputs

    dims = zm.rubric.dimensions
    return _generation_inputs(RewardScorer(zm), [im for im in images for _ in dims],
                              [p for p in prompts for _ in dims], [d for _ in prompts for d in dims])


def _parse(texts):
    out = []
    for t in texts:
        m = re.search(r"\d+(\.\d+)?", t)
        out.append(float(m.group()) if m else float("nan"))
    return out


@pytest.mark.parametrize("impl", ["shared_prefix", "shared_prefix_repeat", "independent", "generate_parse_8",
                                  "reasoning_trace_256"])
def test_scorer_throughput(benchmark, impl):
    zm, images, prompts = _setup()
    if impl.startswith("shared_prefix") or impl == "independent":
        # shared_prefix: the default layout (suffixes packed in one row per image under a block mask);
        # shared_prefix_repeat: the prefix cache repeated once per dimension (the FlashAttention layout)
        scorer = RewardScorer(zm, batch_size=len(images), in_vocab_mass=False, shared_prefix=impl != "independent",
                              layout="repeat" if impl == "shared_prefix_repeat" else "auto")

        def run():
            out = scorer.score(images, prompts)
            sync()
            return out
    else:
        n_new = 8 if impl == "generate_parse_8" else 256

        def run():  # preprocessing included, as in the scorer paths
            enc = _generate_inputs(zm, images, prompts)
            with torch.inference_mode():
                seq = zm.model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                        pad_token_id=zm.tokenizer.pad_token_id)
            scores = _parse(zm.tokenizer.batch_decode(seq[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
            sync()
            return scores

    run()
    rounds = 3 if impl == "reasoning_trace_256" else 10
    benchmark.group = "scorer: 4 dimensions per image"
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(op="scorer", impl=impl, images=len(images), dimensions=4, device=str(DEVICE),
                                torch=torch.__version__,
                                device_name=torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu")
    if benchmark.stats is not None:  # None under --benchmark-disable (each function runs once, as a test)
        benchmark.extra_info["images_per_s"] = len(images) / benchmark.stats.stats.median
