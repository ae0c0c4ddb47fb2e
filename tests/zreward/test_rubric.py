"""Rubric questions and weights; score tokens (special and existing) on a tiny tokenizer and model."""

import pytest
import torch

from zreward.rubric import DIMENSIONS, Rubric, ScoreTokens
from zreward_kernels import BIN_VALUES

transformers = pytest.importorskip("transformers")


def test_rubric_defaults_and_questions():
    r = Rubric()
    assert r.dimensions == DIMENSIONS and r.bin_values == BIN_VALUES
    assert sum(r.weights) == pytest.approx(1.0)
    q = r.question("realism")
    assert q == "Rate the image for realism."
    pre = r.preamble_text()
    assert "1.0 to 5.0" in pre and "steps of 0.5" in pre
    assert all(f"- {d}: {r.descriptions[d]}" in pre for d in DIMENSIONS)
    assert Rubric.from_dict(r.to_dict()) == r


def test_bin_values_are_written_with_the_digits_they_need():
    """Bins were written with one decimal: a quarter-step rubric told the model "in steps of 0.2", and
    the 1.25 and 1.75 tokens were named (and initialised) as 1.2 and 1.8."""
    quarter = tuple(1.0 + 0.25 * k for k in range(17))
    pre = Rubric(bin_values=quarter).preamble_text()
    assert "1.0 to 5.0 in steps of 0.25" in pre
    labels = ScoreTokens.special_labels(quarter)
    assert labels[:4] == ["<score_1.0>", "<score_1.25>", "<score_1.5>", "<score_1.75>"]
    assert len(set(labels)) == 17
    assert ScoreTokens.special_labels(BIN_VALUES) == [f"<score_{v:.1f}>" for v in BIN_VALUES]  # unchanged
    assert "from 0.0 to 10.0 in steps of 1.0," in Rubric(bin_values=tuple(range(11))).preamble_text()
    assert ScoreTokens.special_labels((0.1 * 3, 1.0)) == ["<score_0.3>", "<score_1.0>"]  # float noise is not a digit


def test_rubric_reward_uses_weights_renormalised_to_the_scored_dimensions():
    r = Rubric(weights=(2.0, 1.0, 1.0, 0.0))
    mean = torch.tensor([[5.0, 3.0, 1.0, 4.0]])
    assert float(r.reward(mean)) == pytest.approx((2 * 5 + 3 + 1) / 4)
    assert float(r.reward(mean[:, 1:3], ["realism", "aesthetics"])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="sum to zero"):
        r.reward(mean[:, 3:], ["plausibility"])
    with pytest.raises(ValueError, match="mean has 4 dimensions but 2 were named"):
        r.reward(mean, ["realism", "aesthetics"])


def test_rubric_validation():
    with pytest.raises(ValueError, match="distinct"):
        Rubric(dimensions=("a", "a"), descriptions={"a": "x"})
    with pytest.raises(ValueError, match=r"descriptions missing for \['b'\]"):
        Rubric(dimensions=("a", "b"), descriptions={"a": "x"})
    with pytest.raises(ValueError, match="one entry per dimension"):
        Rubric(weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="non-negative"):
        Rubric(weights=(1.0, -1.0, 1.0, 1.0))
    for bad in (float("nan"), float("inf")):  # NaN passed both comparisons: every reward came out NaN
        with pytest.raises(ValueError, match="weights must be finite"):
            Rubric(weights=(bad, 1.0, 1.0, 1.0))
        with pytest.raises(ValueError, match="bin_values must be at least two finite"):
            Rubric(bin_values=(1.0, bad))
    with pytest.raises(ValueError, match="unknown placeholder"):
        Rubric(question_template="Rate {colour}")
    with pytest.raises(ValueError, match="unknown placeholder"):
        Rubric(preamble="Scale {lowest}")
    with pytest.raises(ValueError, match="unknown dimension 'beauty'"):
        Rubric().question("beauty")


def _tiny_model(tokenizer, tied):
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_special_score_tokens_are_single_and_initialised_from_the_number(tiny_tokenizer, tied, tmp_path):
    model = _tiny_model(tiny_tokenizer, tied)
    v0 = len(tiny_tokenizer)
    st = ScoreTokens.add_special(tiny_tokenizer, model)
    assert st.mode == "special" and len(st.token_ids) == 9
    assert model.get_input_embeddings().weight.shape[0] == len(tiny_tokenizer) == v0 + 9
    for lab, i in zip(st.labels, st.token_ids):
        assert tiny_tokenizer(lab, add_special_tokens=False)["input_ids"] == [i]
    emb = model.get_input_embeddings().weight
    pieces = tiny_tokenizer("4.5", add_special_tokens=False)["input_ids"]
    assert len(pieces) == 3  # "4", ".", "5": why special tokens are needed
    torch.testing.assert_close(emb[st.token_ids[7]], emb[pieces].mean(0))
    if not tied:
        out = model.get_output_embeddings().weight
        torch.testing.assert_close(out[st.token_ids[7]], out[pieces].mean(0))
    # adding again is idempotent and keeps (trained) rows: wrapping a trained model loaded with plain
    # Hugging Face classes must not re-initialise its score tokens; the mapping survives a save/load
    with torch.no_grad():
        model.get_input_embeddings().weight[list(st.token_ids)] += 1.0
    trained = model.get_input_embeddings().weight[list(st.token_ids)].clone()
    again = ScoreTokens.add_special(tiny_tokenizer, model)
    assert again.token_ids == st.token_ids and len(tiny_tokenizer) == v0 + 9
    torch.testing.assert_close(model.get_input_embeddings().weight[list(st.token_ids)], trained, atol=0, rtol=0)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ScoreTokens.from_dict(st.to_dict()).verify(reloaded)


def test_adding_score_tokens_leaves_the_callers_random_stream(tiny_tokenizer):
    """Growing the embedding table drew the new rows' (overwritten) random initialisation from the
    global stream, so wrapping a model moved the caller's random numbers, and a seeded sampling call
    that first added the trace marker sampled other traces than the same call once it was there."""
    model = _tiny_model(tiny_tokenizer, tied=False)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    st = ScoreTokens.add_special(tiny_tokenizer, model)
    assert model.get_input_embeddings().weight.shape[0] == len(tiny_tokenizer) and len(st.token_ids) == 9
    assert torch.equal(torch.rand(4), expected)


def test_special_score_tokens_never_shrink_a_padded_vocabulary(tiny_tokenizer):
    """Real checkpoints pad the embedding table beyond the tokenizer (Qwen: 151936 rows); the new
    tokens take padding rows and the table keeps its size."""
    model = _tiny_model(tiny_tokenizer, tied=False)
    rows = len(tiny_tokenizer) + 16
    model.resize_token_embeddings(rows, mean_resizing=False)
    st = ScoreTokens.add_special(tiny_tokenizer, model)
    assert model.get_input_embeddings().weight.shape[0] == rows == model.get_output_embeddings().weight.shape[0]
    assert max(st.token_ids) < rows
    emb = model.get_input_embeddings().weight
    pieces = tiny_tokenizer("4.5", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(emb[st.token_ids[7]], emb[pieces].mean(0))


def test_existing_tokens_must_be_single_and_distinct(tiny_tokenizer):
    st = ScoreTokens.from_existing(tiny_tokenizer, ["1", "2", "3", "4", "5", "6", "7", "8", "9"])
    assert st.mode == "existing" and len(set(st.token_ids)) == 9
    with pytest.raises(ValueError, match=r"score label '4.5' is not a single token .* encodes to 3 tokens"):
        ScoreTokens.from_existing(tiny_tokenizer, ["1", "1.5"[:1], "4.5"])
    with pytest.raises(ValueError, match="map to repeated token ids"):
        ScoreTokens.from_existing(tiny_tokenizer, ["1", "1"])
    other = ScoreTokens("existing", ("1", "2"), (99, 98))
    with pytest.raises(ValueError, match="maps to .* but the model was saved with 99"):
        other.verify(tiny_tokenizer)


def test_weights_by_dimension_and_one_dimension_as_a_string():
    """weights={"realism": 2, ...} failed with "could not convert string to float: 'realism'", and
    dimensions="realism" was split into letters ("descriptions missing for ['r', 'e', ...]")."""
    r = Rubric(weights={"realism": 2, "alignment": 1, "aesthetics": 1, "plausibility": 0})
    assert r.weights == (1.0, 2.0, 1.0, 0.0)  # in the rubric's dimension order
    assert r.weights == Rubric(weights=(1, 2, 1, 0)).weights
    with pytest.raises(ValueError, match=r"once; unknown \['beauty'\], missing \['plausibility'\]"):
        Rubric(weights={"realism": 2, "alignment": 1, "aesthetics": 1, "beauty": 1})
    with pytest.raises(ValueError, match=r"weights must be numbers, one per dimension in the order"):
        Rubric(weights=["a", "b", "c", "d"])
    one = Rubric(dimensions="realism", descriptions={"realism": "looks real"})
    assert one.dimensions == ("realism",) and one.weights == (1.0,)
    assert Rubric.from_dict(Rubric(weights={"realism": 2, "alignment": 1, "aesthetics": 1, "plausibility": 0})
                            .to_dict()).weights == (1.0, 2.0, 1.0, 0.0)
