"""Tiny local tokenizers and models for the library tests (nothing is downloaded)."""

import pytest

WORDS = ["[UNK]", "[PAD]", "<s>", "</s>", "a", "red", "blue", "green", "car", "dog", "circle", "square", "on", "the",
         "image", "rate", "for", "score", "from", "to", "in", "steps", "of", "answer", "with", "single", "prompt",
         "alignment", "realism", "aesthetics", "plausibility", ":", ".", ",", "(", ")", "=", "-",
         "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "x", "y"]


@pytest.fixture
def tiny_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def rl_base(tmp_path_factory):
    """A saved tiny Qwen2-VL ZRewardModel with the trace marker added: the RL trainers' start."""
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    from zreward.model import ZRewardModel
    from zreward.tiny import tiny_qwen2_vl
    from zreward.train.rl import ensure_marker

    d = tmp_path_factory.mktemp("rlbase")
    model, proc = tiny_qwen2_vl()
    zm = ZRewardModel(model, proc)
    ensure_marker(zm)
    zm.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def rl_teacher(tmp_path_factory):
    """Another tiny Qwen2-VL (seed 7) with the trace marker: an OPD teacher whose tokenizer has the
    student's ids (marker and score tokens) and whose weights differ from ``rl_base``'s."""
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    from zreward.model import ZRewardModel
    from zreward.tiny import tiny_qwen2_vl
    from zreward.train.rl import ensure_marker

    d = tmp_path_factory.mktemp("rlteacher")
    model, proc = tiny_qwen2_vl(seed=7)
    zm = ZRewardModel(model, proc)
    ensure_marker(zm)
    zm.save_pretrained(d)
    return str(d)
