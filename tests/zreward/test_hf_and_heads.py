"""Hugging Face helpers and RestrictedHead on tiny models built from configs (no hub access)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from zreward.heads import RestrictedHead  # noqa: E402
from zreward.hf import final_hidden_states, lm_head_params  # noqa: E402
from zreward_kernels import restricted_logits  # noqa: E402

IDS = [11, 5, 90, 43, 77, 2, 60, 31, 19]


def _tiny(kind: str, tied: bool):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_restricted_equals_full_logits_at_positions(kind, tied):
    model = _tiny(kind, tied)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded sequence: its score position is 6
    pos = torch.tensor([9, 6, -1])
    weight, bias = lm_head_params(model)
    if tied:
        assert weight is model.get_input_embeddings().weight
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        h = final_hidden_states(model, pos, input_ids=ids, attention_mask=mask)
        got = restricted_logits(h, weight, IDS, bias)
    want = full[torch.arange(3), torch.tensor([9, 6, 9])][:, IDS]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # [B, P] positions and a boolean mask give the same rows
    with torch.no_grad():
        hp = final_hidden_states(model, torch.tensor([[9, 2]] * 3), input_ids=ids, attention_mask=mask)
        bm = torch.zeros(3, 10, dtype=torch.bool)
        bm[:, 2] = True
        hb = final_hidden_states(model, bm, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(hp[:, 1], hb)


def test_tied_embedding_receives_only_score_row_gradients():
    model = _tiny("llama", tied=True)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    weight, _ = lm_head_params(model)
    h = final_hidden_states(model, torch.tensor([7, 7]), input_ids=ids)
    restricted_logits(h, weight, IDS).sum().backward()
    g = model.get_input_embeddings().weight.grad
    assert g is not None
    used = set(IDS) | set(ids.flatten().tolist())  # score rows (head) + looked-up rows (embedding)
    untouched = [i for i in range(128) if i not in used]
    assert float(g[untouched].abs().sum()) == 0.0
    assert float(g[IDS].abs().sum()) > 0


def test_bad_positions():
    model = _tiny("llama", tied=False)
    ids = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match=r"positions must lie in \[-8, 8\)"):
        final_hidden_states(model, torch.tensor([8, 0]), input_ids=ids)
    with pytest.raises(ValueError, match=r"positions must be \[B\] or \[B, P\] with B = 2"):
        final_hidden_states(model, torch.tensor([1, 2, 3]), input_ids=ids)
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(TypeError, match="positions must be an integer or boolean tensor, got torch.float32"):
        final_hidden_states(model, torch.tensor([1.0, 2.0]), input_ids=ids)
    with pytest.raises(TypeError, match="positions must be an integer or boolean tensor, got list"):
        final_hidden_states(model, [1, 2], input_ids=ids)  # an AttributeError after a whole forward pass
    assert not calls  # refused before the backbone ran


def test_restricted_head_trains_rows_and_writes_back():
    model = _tiny("qwen2", tied=False)
    weight, bias = lm_head_params(model)
    head = RestrictedHead.from_lm_head(weight, IDS, bias)
    h = torch.randn(5, 32)
    torch.testing.assert_close(head(h), restricted_logits(h, weight, IDS, bias).detach())
    opt = torch.optim.AdamW(head.parameters(), lr=0.1)
    head(h).pow(2).mean().backward()
    assert head.weight.grad.shape == (9, 32)
    opt.step()
    before = weight.detach().clone()
    head.write_back(weight.data)
    torch.testing.assert_close(weight.detach()[IDS], head.weight.detach())
    others = [i for i in range(128) if i not in IDS]
    assert torch.equal(weight.detach()[others], before[others])
    with pytest.raises(ValueError, match="token_ids must be distinct"):
        RestrictedHead.from_lm_head(weight, [1, 1])


def test_vlm_with_an_image():
    """Qwen2-VL: the backbone includes the vision tower, so image tokens are merged before the score position."""
    import inspect

    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1, 2, 152, 150, 153, 5, 6, 7]])
    inputs = dict(input_ids=ids, pixel_values=torch.randn(4, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 2, 2]]))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (ids == 150).int()
    weight, bias = lm_head_params(model)
    with torch.no_grad():
        full = model(**inputs).logits[:, 7, IDS]
        got = restricted_logits(final_hidden_states(model, torch.tensor([7]), **inputs), weight, IDS, bias)
        other = inputs["pixel_values"] + 1.0  # the image matters: another image changes the score logits
        moved = restricted_logits(final_hidden_states(model, torch.tensor([7]), **{**inputs, "pixel_values": other}),
                                  weight, IDS, bias)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert float((moved - got).abs().max()) > 1e-6


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_models_that_transform_their_logits_after_the_head_are_refused(kind):
    """Gemma 2 (and PaliGemma 2) soft-caps its logits after the LM head, Granite divides and Cohere
    (Aya Vision) multiplies them: the restricted head's W h + b then is not the model's own
    distribution, and a ZRewardModel of such a model scored silently off.  It is refused, naming the
    config field; with the field switched off, model and restricted head agree again."""
    from zreward.hf import check_plain_lm_head, logit_transforms
    from zreward.model import ZRewardModel

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    cls, cfg_cls, field, off = {
        "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config, "final_logit_softcapping", None),
        "granite": (transformers.GraniteForCausalLM, transformers.GraniteConfig, "logits_scaling", 1.0),
        "cohere": (transformers.CohereForCausalLM, transformers.CohereConfig, "logit_scale", 1.0)}[kind]
    extra = {"head_dim": 8, "final_logit_softcapping": 0.5} if kind == "gemma2" else {
        "logits_scaling": 4.0} if kind == "granite" else {"logit_scale": 0.25}
    torch.manual_seed(0)
    model = cls(cfg_cls(**common, **extra)).eval()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    weight, bias = lm_head_params(model)

    def gap():
        with torch.no_grad():
            full = model(input_ids=ids).logits[:, -1][:, IDS]
            got = restricted_logits(final_hidden_states(model, torch.tensor([-1, -1]), input_ids=ids), weight,
                                    torch.tensor(IDS), bias)
        return float((full - got).abs().max())

    assert logit_transforms(model) == {field: extra[field]}
    assert gap() > 1e-2  # what the scores would have been off by
    with pytest.raises(NotImplementedError, match=rf"{cls.__name__} transforms its logits after the LM head "
                                                  rf"\({field}="):
        ZRewardModel(model, processor=None)
    setattr(model.config, field, off)
    if kind == "cohere":  # the model copied the value when it was built: still refused
        assert logit_transforms(model) == {field: extra[field]}
    torch.manual_seed(0)  # the way out the error names: the transform off when the model is made
    model = cls(cfg_cls(**common, **{**extra, field: off})).eval()
    weight, bias = lm_head_params(model)
    assert logit_transforms(model) == {}
    check_plain_lm_head(model)
    assert gap() < 1e-5


def test_logit_transforms_of_vision_language_models_follow_their_forward():
    """PaliGemma 2 soft-caps with its Gemma 2 text config's field; Aya Vision's text config carries
    Cohere's logit_scale but its forward returns the plain projection, so it is not refused.  Checked
    on the classes with their default configs (no weights are made)."""
    from zreward.hf import logit_transforms

    def shell(cls, cfg):
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.config = cfg
        return m

    import inspect

    pali = shell(transformers.PaliGemmaForConditionalGeneration,
                 transformers.PaliGemmaConfig(text_config={"model_type": "gemma2"}))
    # PaliGemma's forward applies its text config's cap since transformers 5.18 or so (5.17 does not)
    caps = "final_logit_softcapping" in inspect.getsource(transformers.PaliGemmaForConditionalGeneration.forward)
    assert logit_transforms(pali) == ({"final_logit_softcapping": 30.0} if caps else {})
    from packaging.version import Version

    assert caps or Version(transformers.__version__) < Version("5.24")  # the version CI installs caps
    aya = shell(transformers.AyaVisionForConditionalGeneration, transformers.AyaVisionConfig())
    assert logit_transforms(aya) == {}
    for cls, cfg in ((transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig()),
                     (transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig()),
                     (transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig()),
                     (transformers.Gemma3ForConditionalGeneration, transformers.Gemma3Config()),
                     (transformers.LlavaForConditionalGeneration, transformers.LlavaConfig())):
        assert logit_transforms(shell(cls, cfg)) == {}, cls.__name__


def test_restricted_head_write_back_loses_nothing_and_checks_first():
    """A head with a bias refuses to write back without the LM head's bias (the trained entries were
    dropped without a word); shapes are checked before anything is written."""
    w, b = torch.randn(20, 8), torch.randn(20)
    head = RestrictedHead.from_lm_head(w, [1, 2, 3], b)
    with torch.no_grad():
        head.weight += 1.0
        head.bias += 1.0
    w2, b2 = w.clone(), b.clone()
    with pytest.raises(ValueError, match="pass lm_head_bias"):
        head.write_back(w2)
    assert torch.equal(w2, w)  # nothing written
    with pytest.raises(ValueError, match=r"lm_head_bias must be \[V\] = \[20\]"):
        head.write_back(w2, torch.zeros(19))
    with pytest.raises(ValueError, match=r"H = 8"):
        head.write_back(torch.zeros(20, 16), b2)
    with pytest.raises(ValueError, match="token_ids reach 3"):
        head.write_back(torch.zeros(3, 8), torch.zeros(3))
    assert torch.equal(w2, w) and torch.equal(b2, b)
    head.write_back(w2, b2)
    torch.testing.assert_close(w2[[1, 2, 3]], w[[1, 2, 3]] + 1.0)
    torch.testing.assert_close(b2[[1, 2, 3]], b[[1, 2, 3]] + 1.0)
    no_bias = RestrictedHead.from_lm_head(w, [4, 5])
    with pytest.raises(ValueError, match="has no bias"):
        no_bias.write_back(w2, b2)


def test_restricted_head_constructor_checks_its_arguments():
    rows = torch.randn(3, 8)
    with pytest.raises(ValueError, match="token_ids must be distinct"):
        RestrictedHead(rows, [1, 1, 2])
    with pytest.raises(ValueError, match="token_ids must be >= 0"):
        RestrictedHead(rows, [1, -1, 2])
    with pytest.raises(ValueError, match=r"bias must be \[K\] = \[3\]"):
        RestrictedHead(rows, [1, 2, 3], bias=torch.randn(20))  # the LM head's full bias, not the rows'
    with pytest.raises(TypeError, match="rows must be a floating-point tensor"):
        RestrictedHead(torch.ones(3, 8, dtype=torch.long), [1, 2, 3])
    with pytest.raises(TypeError, match="token_ids must be"):
        RestrictedHead(rows, [1.0, 2.5, 3.0])
    head = RestrictedHead(rows, torch.tensor([7, 8, 9]))
    assert head.token_ids.tolist() == [7, 8, 9]


def test_restricted_logits_refuses_fractional_token_ids():
    """``[1.7, 2.2]`` was truncated to ids 1 and 2 without a word."""
    h, w = torch.randn(2, 8), torch.randn(20, 8)
    with pytest.raises(TypeError, match="token_ids must be"):
        restricted_logits(h, w, [1.7, 2.2])
    for mask in ([True, False], [torch.tensor(True), 2]):  # a mask given as ids was read as ids 1 and 0
        with pytest.raises(TypeError, match="token_ids must be"):
            restricted_logits(h, w, mask)
    import numpy as np

    ref = restricted_logits(h, w, [3, 4])
    for ids in (np.array([3, 4]), [torch.tensor(3), np.int64(4)], (3, 4)):
        torch.testing.assert_close(restricted_logits(h, w, ids), ref)
