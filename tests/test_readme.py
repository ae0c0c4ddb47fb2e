"""The README's code runs as written.

Every ```python block is executed with the few names it leaves to the reader (a model's score
logits, a Hugging Face model, images, a saved model's directory) bound to small real values, and
what it computes is checked; the JSON training config parses into a ``TrainConfig``; every
``zreward ...`` command line parses with the CLI's own parser.  A new python block in the README
needs its names here (the block count is asserted), so documentation cannot drift from the API
unnoticed.
"""

import json
import os
import re
import shlex

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(lang: str):
    text = open(README, encoding="utf-8").read()
    return re.findall(r"^```" + lang + r"\n(.*?)^```", text, flags=re.S | re.M)


def test_block_count():
    # fused ops, group advantage, restricted head, scoring, downstream: each has a test below
    assert len(_blocks("python")) == 5


def test_fused_ops_block():
    n, d = 6, 4
    g = torch.Generator().manual_seed(0)
    bin_index = torch.randint(0, 9, (n, d), generator=g)
    bin_index[0, 0] = -100
    ns = dict(
        model_score_logits=torch.randn(n, d, 9, generator=g, requires_grad=True),
        bin_index=bin_index,
        teacher_logits=torch.randn(n, d, 9, generator=g),
        pairs=torch.tensor([[0, 4], [5, 9], [22, 3]]),
        gaps=torch.tensor([0.5, -1.0, 0.0]),
        score_logits_after_traces=torch.randn(3, 2, 4, 9, generator=g, requires_grad=True),
        scores=torch.tensor([[4.0, 2.5], [3.0, 3.0], [5.0, 1.0]]),
        policy_term=torch.zeros(()),
    )
    exec(_blocks("python")[0], ns)
    assert ns["reward"].shape == (n,)
    assert ns["out"].loss.dim() == 0 and torch.isfinite(ns["out"].loss)
    assert ns["model_score_logits"].grad is not None and ns["model_score_logits"].grad.abs().sum() > 0
    assert ns["g"].advantage.shape == (3, 2, 4) and not ns["g"].advantage.requires_grad
    assert ns["score_logits_after_traces"].grad.abs().sum() > 0


def test_group_advantage_block():
    ns = dict(rewards=torch.randn(64, generator=torch.Generator().manual_seed(0)),
              cu_seqlens=torch.tensor([0, 3, 3, 20, 64]), uids=[f"prompt-{i % 5}" for i in range(64)])
    exec(_blocks("python")[1], ns)
    adv, stats = ns["adv"], ns["stats"]
    assert adv.shape == (64,) and stats.mean.shape == (4,) and bool(stats.zero_std[1])  # the empty group
    r = ns["rewards"][3:20]
    torch.testing.assert_close(adv[3:20], r - (r.sum() - r) / (len(r) - 1))  # rloo


def test_restricted_head_block():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    score_token_ids = torch.tensor([11, 5, 90, 43, 77, 2, 60, 31, 19])
    ns = dict(model=model, score_positions=torch.tensor([9, 6, -1]),
              inputs=dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
              score_token_ids=score_token_ids, t=torch.tensor([0, 4, 8]))
    exec(_blocks("python")[2], ns)
    with torch.no_grad():
        full = model(input_ids=ids).logits[torch.arange(3), torch.tensor([9, 6, 9])][:, score_token_ids]
    torch.testing.assert_close(ns["logits"].detach(), full, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ns["out"].loss)


@pytest.fixture(scope="module")
def scoring_namespace(tmp_path_factory):
    """The scoring block run on a tiny Qwen2-VL saved the way the README loads it."""
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    from zreward import ZRewardModel
    from zreward.tiny import tiny_qwen2_vl

    model, proc = tiny_qwen2_vl()
    path = str(tmp_path_factory.mktemp("zr") / "model")
    ZRewardModel(model, proc).save_pretrained(path)
    block = _blocks("python")[3]
    assert '"path/to/local/dir"' in block
    images = [torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8).numpy() for _ in range(3)]
    ns = dict(images=images, prompts=["a red car", "a blue dog", "a green circle"])
    exec(block.replace('"path/to/local/dir"', repr(path)), ns)
    return ns


def test_scoring_block(scoring_namespace):
    ns = scoring_namespace
    out = ns["out"]
    assert out.probs.shape == (3, 4, 9) and out.reward.shape == (3,) and out.in_vocab_mass.shape == (3, 4)
    scores, info = ns["reward_fn"](ns["images"], ns["prompts"])
    torch.testing.assert_close(scores, out.reward)


def test_downstream_block(scoring_namespace):
    images = torch.rand(8, 3, 56, 56, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    ns = dict(scoring_namespace, images=images, prompts=["a red car"] * 8)
    exec(_blocks("python")[4], ns)
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert ns["g"].advantages.shape == (8,)


def test_json_config_block(tmp_path):
    (block,) = _blocks("json")
    path = tmp_path / "sft.json"
    path.write_text(block)
    from zreward.train.config import TrainConfig

    cfg = TrainConfig.from_file(str(path))
    assert cfg.method == "sft" and cfg.max_steps == 2000
    cfg.validate()


def test_command_lines_parse():
    from zreward.cli import build_parser

    parser = build_parser()
    lines = [ln.split("#")[0].strip() for b in _blocks("bash") for ln in b.splitlines()]
    commands = []
    for ln in lines:
        words = shlex.split(ln.replace("[", "").replace("]", ""))
        if words[:1] == ["zreward"]:
            commands.append(words[1:])
        elif "-m" in words and words[words.index("-m") + 1:][:1] == ["zreward"]:
            commands.append(words[words.index("-m") + 2:])
    assert len(commands) >= 8  # score, eval, five trainers, the accelerate launch
    for argv in commands:
        args = parser.parse_args(argv)
        assert callable(args.fn), argv
    assert json.dumps(sorted({c[0] for c in commands})) == '["eval", "score", "train"]'


def test_every_command_line_option_is_explained():
    """`zreward --help` showed the first line of the description, cut mid-list; --device, --seed,
    --batch-size, --dimensions and --no-plots had no help text."""
    import argparse

    from zreward.cli import build_parser

    parser = build_parser()
    assert parser.description.endswith("``info`` (backends).")
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"zreward {name} {action.dest} has no help text"
