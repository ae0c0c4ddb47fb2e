"""ZRewardModel + RewardScorer on tiny models of four families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA), offline."""

import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # Qwen2-VL's processor imports it

from zreward.tiny import FAMILIES, NATIVE_SIDE  # noqa: E402

from zreward.model import ZRewardModel  # noqa: E402
from zreward.scorer import RewardScorer, as_reward_fn  # noqa: E402
from zreward.downstream import refl_loss  # noqa: E402

PROMPTS = ["a red car", "a blue dog on the square", "green circle", "a car"]


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(56, 56), (84, 56), (28, 84), (56, 84)]
    return [(rng.random((h, w, 3)) * 255).astype("uint8") for h, w in sizes[:n]]


@pytest.fixture(params=sorted(FAMILIES))
def zmodel(request):
    model, proc = FAMILIES[request.param]()
    zm = ZRewardModel(model, proc)
    zm.tiny_family = request.param
    return zm


def test_shared_prefix_equals_independent_queries(zmodel):
    imgs = _images()
    a = RewardScorer(zmodel, shared_prefix=True).score(imgs, PROMPTS)
    b = RewardScorer(zmodel, shared_prefix=False).score(imgs, PROMPTS)
    assert a.probs.shape == (4, 4, 9) and a.mean.shape == (4, 4) and a.reward.shape == (4,)
    for x, y in zip((a.probs, a.mean, a.std, a.in_vocab_mass), (b.probs, b.mean, b.std, b.in_vocab_mass)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_suffix_layouts_agree_with_unequal_questions(attn):
    """Packed suffixes (block mask) and the repeated cache give the full queries' scores, also when
    the dimension questions differ in length (padded suffixes) and under eager attention."""
    from zreward.rubric import Rubric

    rubric = Rubric(question_template="{dimension} : {description} . score")  # lengths differ per dimension
    for family in sorted(FAMILIES):
        model, proc = FAMILIES[family]()
        model.set_attn_implementation(attn)
        zm = ZRewardModel(model, proc, rubric=rubric)
        lengths = {len(zm.suffix_ids(d)) for d in rubric.dimensions}
        assert len(lengths) > 1, lengths
        imgs = _images()
        full = RewardScorer(zm, shared_prefix=False).score(imgs, PROMPTS)
        for layout in ("packed", "repeat", "auto"):
            out = RewardScorer(zm, layout=layout, batch_size=3).score(imgs, PROMPTS)
            torch.testing.assert_close(out.probs, full.probs, atol=1e-5, rtol=1e-5, msg=f"{family} {layout}")
        sub = RewardScorer(zm, layout="packed").score(imgs[:2], PROMPTS[:2], dimensions=["plausibility", "realism"])
        torch.testing.assert_close(sub.probs, full.probs[:2, [3, 1]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layout must be"):
        RewardScorer(zm, layout="stacked")


def test_flash_attention_models_use_the_repeated_cache(zmodel, monkeypatch):
    """FlashAttention takes no custom mask: layout='auto' falls back to the repeated cache (same
    scores), and an explicit layout='packed' is refused with a clear error."""
    calls = []
    imgs = _images(2)
    want = RewardScorer(zmodel, shared_prefix=False).score(imgs, PROMPTS[:2])
    auto = RewardScorer(zmodel)
    packed = RewardScorer(zmodel, layout="packed")
    monkeypatch.setattr(auto, "_attn_impl", lambda: "flash_attention_2")
    orig = auto._base.forward

    def spy(*a, **k):
        calls.append(k.get("attention_mask").dim() if k.get("attention_mask") is not None else None)
        return orig(*a, **k)

    monkeypatch.setattr(auto._base, "forward", spy)
    got = auto.score(imgs, PROMPTS[:2])
    torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=1e-5)
    assert calls == [2, 2]  # prefix and suffix passes with 2-D padding masks: no block mask built
    monkeypatch.setattr(packed, "_attn_impl", lambda: "flash_attention_2")
    with pytest.raises(ValueError, match="layout='packed' needs SDPA or eager attention"):
        packed.score(imgs, PROMPTS[:2])


def test_scores_are_the_models_own_next_token_logits(zmodel):
    """The restricted head on the backbone's states equals the full model's next-token logits at
    the score position, gathered at the score tokens (one unpadded query at a time)."""
    from zreward.train.rl import _generation_inputs

    imgs, dims = _images(2), ["alignment", "plausibility"]
    scorer = RewardScorer(zmodel)
    got = scorer.query_logits(imgs, PROMPTS[:2], dims)
    ids = list(zmodel.score_tokens.token_ids)
    for i in range(2):
        enc = _generation_inputs(scorer, [imgs[i]], [PROMPTS[i]], [dims[i]])
        with torch.no_grad():
            full = zmodel.model(**enc).logits[0, -1]
        torch.testing.assert_close(got[i].detach(), full[ids].float(), atol=1e-5, rtol=1e-5)


def test_batch_invariance_and_order(zmodel):
    imgs = _images()
    full = RewardScorer(zmodel, batch_size=4).score(imgs, PROMPTS)
    one = RewardScorer(zmodel, batch_size=1).score(imgs, PROMPTS)
    torch.testing.assert_close(full.probs, one.probs, atol=1e-4, rtol=1e-4)
    alone = RewardScorer(zmodel).score([imgs[2]], [PROMPTS[2]])
    torch.testing.assert_close(alone.probs[0], full.probs[2], atol=1e-4, rtol=1e-4)


def test_output_contents(zmodel):
    out = RewardScorer(zmodel).score(_images(2), PROMPTS[:2], dimensions=["realism", "alignment"])
    assert out.dimensions == ("realism", "alignment")
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2, 2))
    v = torch.tensor(zmodel.rubric.bin_values)
    torch.testing.assert_close(out.mean, (out.probs * v).sum(-1))
    torch.testing.assert_close(out.reward, out.mean.mean(-1))  # equal weights over the scored dimensions
    assert ((out.in_vocab_mass > 0) & (out.in_vocab_mass <= 1)).all()
    # the question differs per dimension, so the distributions do
    assert float((out.probs[:, 0] - out.probs[:, 1]).abs().max()) > 0


def test_image_inputs_agree(zmodel, tmp_path):
    # an image of the size each tiny processor keeps as is (no resize): every input route sees the same pixels
    side = NATIVE_SIDE[zmodel.tiny_family]
    arr = (np.random.default_rng(3).random((side, side, 3)) * 255).astype("uint8")
    from PIL import Image

    path = tmp_path / "img.png"  # lossless
    Image.fromarray(arr).save(path)
    s = RewardScorer(zmodel)
    by_array = s.score([arr], PROMPTS[:1])
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    for images in ([Image.fromarray(arr)], [str(path)], [path],  # PIL, file paths (str or PathLike)
                   Image.fromarray(arr), arr, str(path)):  # one image not in a list: a batch of one
        torch.testing.assert_close(s.score(images, PROMPTS[:1]).probs, by_array.probs, msg=repr(type(images)))
    u8 = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # as torchvision.io.read_image returns it
    for images in (tensor[None], tensor, u8[None], u8):  # [1, 3, H, W] and one image [3, H, W]; float and uint8
        torch.testing.assert_close(s.score(images, PROMPTS[0]).probs, by_array.probs, atol=1e-5, rtol=1e-5)
    for dtype, tol in ((torch.float16, 1e-5), (torch.bfloat16, 2e-5), (torch.float64, 1e-5)):  # a pipeline's dtype
        torch.testing.assert_close(s.score(tensor[None].to(dtype), PROMPTS[0]).probs, by_array.probs, atol=tol,
                                   rtol=tol, msg=str(dtype))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_tokenizer_without_a_pad_token(family):
    """Llama-based tokenizers often have no pad token; batches need one (HF raises 'Asking to pad
    but the tokenizer does not have a padding token'): the wrapper uses EOS, and the scores of
    unequal-length queries do not change."""
    model, proc = FAMILIES[family]()
    ref = RewardScorer(ZRewardModel(model, proc)).score(_images(2), PROMPTS[:2])
    proc.tokenizer.pad_token = None
    zm = ZRewardModel(model, proc)
    assert proc.tokenizer.pad_token == proc.tokenizer.eos_token is not None
    torch.testing.assert_close(RewardScorer(zm).score(_images(2), PROMPTS[:2]).probs, ref.probs, atol=1e-5, rtol=1e-5)


def test_scoring_leaves_the_shared_tokenizer_alone_and_is_thread_safe():
    """The scorer used to switch the tokenizer's padding_side to "left" around each processor call:
    threads scoring at once left it "left" for good (one saved the other's setting), and any code
    using the tokenizer meanwhile saw it.  Left padding is now asked for per call, and processor
    calls are serialised (a fast tokenizer keeps its padding settings on the shared Rust object)."""
    import threading

    from zreward.tiny import tiny_qwen2_vl

    model, proc = tiny_qwen2_vl()
    zm = ZRewardModel(model, proc)
    tok = proc.tokenizer
    seen = []
    call = type(proc).__call__

    def spy(self, *a, **k):
        seen.append(tok.padding_side)
        return call(self, *a, **k)

    prompts = [["a", "a red car on a long and winding road"], ["a blue dog", "x"]]
    imgs = _images(4)
    ref = [RewardScorer(zm).score(imgs[2 * i:2 * i + 2], prompts[i]).probs for i in range(2)]
    type(proc).__call__ = spy
    try:
        RewardScorer(zm).score(imgs[:2], prompts[0])
    finally:
        type(proc).__call__ = call
    assert seen == ["right"]  # the tokenizer's own setting, untouched during the call
    bad = []

    def work(i):
        s = RewardScorer(zm)
        for _ in range(10):
            try:  # an exception in a thread would not fail the test by itself
                if not torch.allclose(s.score(imgs[2 * i:2 * i + 2], prompts[i]).probs, ref[i], atol=1e-5):
                    bad.append(i)
            except Exception as exc:  # the fast tokenizer's shared padding state raced: "Unable to create tensor"
                bad.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad and tok.padding_side == "right", bad[:3]


def test_thin_images_are_read_as_height_width_channels(zmodel):
    """An HxWx3 array with a height of 1, 3 or 4 pixels was taken for channels-first by the processor
    (its layout guess), so a scrambled image was scored without any error; the layout is now stated.
    Each route must score what the PIL route scores; tensors [3, H, W] too."""
    from PIL import Image

    s = RewardScorer(zmodel, in_vocab_mass=False)
    text = [zmodel.prefix_text("a red car")]
    for shape in ((1, 1, 3), (3, 40, 3), (4, 300, 3)):
        arr = (np.random.default_rng(1).random(shape) * 255).astype("uint8")
        # the tiny models' scores hardly depend on the pixels, so compare what reaches the model
        pil = zmodel.processor(text=text, images=[Image.fromarray(arr)], return_tensors="pt")["pixel_values"]
        ours = s._processor_inputs([arr], text)["pixel_values"]
        assert ours.shape == pil.shape and torch.equal(ours, pil), shape
        tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
        s.score(tensor, "a red car")  # [3, H, W] with H or W of 3: stated as channels-first, no guess


def test_differentiable_scoring_reaches_the_pixels(zmodel):
    for p in zmodel.model.parameters():
        p.requires_grad_(False)
    images = torch.rand(3, 3, 56, 56, requires_grad=True)
    out = RewardScorer(zmodel, batch_size=2).score(images, PROMPTS[:3], differentiable=True)
    out.reward.sum().backward()
    g = images.grad
    assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0
    assert all(float(g[i].abs().sum()) > 0 for i in range(3))  # every image gets its own gradient
    plain = RewardScorer(zmodel, batch_size=2).score(images.detach(), PROMPTS[:3])
    torch.testing.assert_close(out.reward.detach(), plain.reward, atol=1e-6, rtol=1e-6)
    assert not plain.reward.requires_grad
    with pytest.raises(TypeError, match="differentiable=True needs images as a float tensor"):
        RewardScorer(zmodel).score(_images(1), PROMPTS[:1], differentiable=True)


def test_differentiable_scoring_inside_inference_mode_is_refused(zmodel):
    """It returned a reward without a graph (enable_grad cannot leave inference mode), so the
    caller's backward() failed later with "does not require grad"."""
    x = torch.rand(1, 3, 56, 56, requires_grad=True)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch.inference_mode\(\)"):
        RewardScorer(zmodel).score(x, "a red car", differentiable=True)
    with torch.no_grad():  # no_grad is fine: enable_grad leaves it
        out = RewardScorer(zmodel).score(x, "a red car", differentiable=True)
    out.reward.sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_a_list_of_tensor_images_of_several_sizes(zmodel):
    """A generator at several resolutions gives [3, H, W] tensors that cannot be stacked: a list of them
    scores like each tensor alone and like the uint8 arrays, and keeps the graph to every image."""
    side = NATIVE_SIDE[zmodel.tiny_family]
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, side, side, generator=g), torch.rand(3, 2 * side, side, generator=g)
    u8 = (a * 255).round().to(torch.uint8)
    s = RewardScorer(zmodel, batch_size=2)
    out = s.score([a, b, u8], ["x", "y", "x"])
    torch.testing.assert_close(out.probs[0], s.score(a, "x").probs[0])
    torch.testing.assert_close(out.probs[1], s.score(b, "y").probs[0])
    arrays = [(t.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for t in (a, b)]
    torch.testing.assert_close(out.probs[:2], s.score(arrays, ["x", "y"]).probs, atol=1e-5, rtol=1e-5)
    ga, gb = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss, o = refl_loss(s, [ga, gb], ["x", "y"])
    loss.backward()
    assert float(ga.grad.abs().sum()) > 0 and float(gb.grad.abs().sum()) > 0
    torch.testing.assert_close(o.reward.detach(), out.reward[:2])
    with pytest.raises(TypeError, match="image 1: a list that holds tensor images must hold only tensors"):
        s.score([a, arrays[1]], ["x", "y"])
    with pytest.raises(ValueError, match=r"image 1: a tensor image in a list must be \[3, H, W\]"):
        s.score([a, b[None]], ["x", "y"])
    with pytest.raises(ValueError, match=r"got min -0.5 and max 0.5 \(image 1\) \(a VAE decoder's output"):
        s.score([a, torch.full_like(b, -0.5).index_fill_(1, torch.tensor([0]), 0.5)], ["x", "y"])


def test_differentiable_scoring_refuses_a_processor_that_drops_the_graph(zmodel, monkeypatch):
    """transformers < 5.4 preprocessed tensor images without keeping their graph: the reward then does
    not depend on the pixels as far as autograd can see, which must be an error, not a silent zero
    gradient (or a RuntimeError far away at backward)."""
    cls = type(zmodel.processor)
    original = cls.__call__

    def detaching(self, *args, **kwargs):
        enc = original(self, *args, **kwargs)
        for k, v in enc.items():
            if isinstance(v, torch.Tensor):
                enc[k] = v.detach()
        return enc

    monkeypatch.setattr(cls, "__call__", detaching)
    images = torch.rand(2, 3, 56, 56, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"do not track the gradient of `images`.*transformers >= 5.4"):
        RewardScorer(zmodel).score(images, PROMPTS[:2], differentiable=True)
    # images that need no gradient, and the default (inference) path, are unaffected
    plain = RewardScorer(zmodel).score(images.detach(), PROMPTS[:2], differentiable=True)
    assert torch.isfinite(plain.reward).all()
    assert torch.isfinite(RewardScorer(zmodel).score(images, PROMPTS[:2]).reward).all()


def test_save_and_reload_offline(zmodel, tmp_path):
    before = RewardScorer(zmodel).score(_images(2), PROMPTS[:2])
    zmodel.save_pretrained(tmp_path)
    assert (tmp_path / "zreward_config.json").exists()
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    loaded = ZRewardModel.from_pretrained(str(tmp_path))
    assert loaded.score_tokens == zmodel.score_tokens and loaded.rubric == zmodel.rubric
    after = RewardScorer(loaded).score(_images(2), PROMPTS[:2])
    torch.testing.assert_close(after.probs, before.probs, atol=1e-6, rtol=1e-6)
    zmodel.model.save_pretrained(tmp_path / "plain")  # a Hugging Face directory, never wrapped
    with pytest.raises(FileNotFoundError, match=r"has no zreward_config.json; .* wrap it as "
                                                r"ZRewardModel\(model, processor\)"):
        ZRewardModel.from_pretrained(str(tmp_path / "plain"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"it was not saved by ZRewardModel$"):
        ZRewardModel.from_pretrained(str(tmp_path / "empty"))
    for gone in (tmp_path / "missing", tmp_path / "zreward_config.json"):  # it said "has no zreward_config.json"
        with pytest.raises(FileNotFoundError, match=r"no directory at .* \(a ZRewardModel saved with save_pretrained"):
            ZRewardModel.from_pretrained(str(gone))


def test_bad_inputs(zmodel):
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got"):
            RewardScorer(zmodel, batch_size=bad)
    assert RewardScorer(zmodel, batch_size=np.int64(4)).batch_size == 4  # a numpy integer was refused
    s = RewardScorer(zmodel)
    with pytest.raises(ValueError, match=r"got 1 images for 2 prompts"):
        s.score(_images(1), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"an image tensor must be \[B, 3, H, W\]"):
        s.score(torch.rand(1, 4, 28, 28), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"must hold finite values in \[0, 1\]"):
        s.score(torch.rand(1, 3, 28, 28) * 2, PROMPTS[:1])
    with pytest.raises(ValueError, match=r"VAE decoder's output lies in \[-1, 1\]: pass \(images \+ 1\) / 2"):
        s.score(torch.rand(1, 3, 28, 28) * 2 - 1, PROMPTS[:1])
    with pytest.raises(ValueError, match=r"must hold finite values in \[0, 1\], got min nan"):
        s.score(torch.full((1, 3, 28, 28), float("nan")), PROMPTS[:1])  # not a NaN reward
    with pytest.raises(ValueError, match=r"\[3, H, W\] for one image\), got shape \(28, 28, 3\)"):
        s.score(torch.rand(28, 28, 3), PROMPTS[:1])
    with pytest.raises(FileNotFoundError, match=r"image 1: no image file at 'missing.png'"):
        s.score([_images(1)[0], "missing.png"], PROMPTS[:2])
    with pytest.raises(TypeError, match=r"uint8 \(0..255\) or floating point"):
        s.score(torch.zeros(1, 3, 28, 28, dtype=torch.int32), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"arrays must be HxWx3 uint8, .*; floats in \[0, 1\]: \(img \* 255\)"):
        s.score([np.zeros((28, 28, 3), dtype=np.float32)], PROMPTS[:1])
    with pytest.raises(ValueError, match=r"arrays must be HxWx3 uint8, .*; drop the alpha channel"):
        s.score([np.zeros((28, 28, 4), dtype=np.uint8)], PROMPTS[:1])
    with pytest.raises(ValueError, match=r"arrays must be HxWx3 uint8, .*; a grey image"):
        s.score([np.zeros((28, 28), dtype=np.uint8)], PROMPTS[:1])
    with pytest.raises(ValueError, match=r"an image array must be HxWx3 .*got shape \(28, 28\); a grey image"):
        s.score(np.zeros((28, 28), dtype=np.uint8), PROMPTS[0])  # alone: it was split into 28 rows
    with pytest.raises(ValueError, match=r"dimensions must be distinct, got \['realism', 'realism'\]"):
        s.score(_images(1), PROMPTS[:1], dimensions=["realism", "realism"])  # it would weigh twice in the reward
    with pytest.raises(ValueError, match="unknown dimension 'beauty'"):
        s.score(_images(1), PROMPTS[:1], dimensions=["beauty"])
    with pytest.raises(TypeError, match="prompts must be strings, got a int"):
        s.score(_images(1), [3])
    with pytest.raises(TypeError, match=r"got a ndarray; score\(images, prompts\) takes the images first"):
        s.score("a red car", _images(1))  # ImageReward's argument order
    from PIL import Image

    with pytest.raises(TypeError, match=r"got a Image; score\(images, prompts\) takes the images first"):
        s.score("a red car", Image.fromarray(_images(1)[0]))


def test_an_enclosing_autocast_stays_in_force(zmodel):
    """With autocast=False (as the trainers use it) or on CPU, the scorer adds no autocast of its own
    and must not switch off the caller's (or accelerate's mixed_precision)."""
    imgs = _images(2)
    fp32 = RewardScorer(zmodel, autocast=False).score(imgs, PROMPTS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kw in (dict(autocast=False), {}):
            bf16 = RewardScorer(zmodel, **kw).score(imgs, PROMPTS[:2])
            assert not torch.equal(bf16.probs, fp32.probs), kw
            torch.testing.assert_close(bf16.probs, fp32.probs, atol=2e-2, rtol=0)


def test_one_prompt_string_for_every_image_and_one_dimension_name(zmodel):
    """A single prompt string is every image's prompt (not a sequence of one-character prompts), and
    a single dimension name is one dimension (not its letters)."""
    s = RewardScorer(zmodel)
    imgs = _images(2)
    tensor = torch.rand(2, 3, 56, 56)
    for images in (imgs, tensor):
        one = s.score(images, "a red car", dimensions="realism")
        listed = s.score(images, ["a red car"] * 2, dimensions=["realism"])
        assert one.dimensions == ("realism",) and one.mean.shape == (2, 1)
        torch.testing.assert_close(one.probs, listed.probs)
    # a generator of images with one prompt string was counted as one image ("got 2 images for 1 prompts")
    gen = s.score((x for x in imgs), "a red car", dimensions="realism")
    torch.testing.assert_close(gen.probs, s.score(imgs, "a red car", dimensions="realism").probs)
    torch.testing.assert_close(s.score(map(torch.as_tensor, [tensor[0], tensor[1]]), "a red car").reward,
                               s.score(tensor, "a red car").reward)


def test_reward_fn_adapter(zmodel):
    fn = as_reward_fn(RewardScorer(zmodel), dimensions=["alignment", "aesthetics"])
    scores, info = fn(_images(2), PROMPTS[:2], {"step": 0})
    assert scores.shape == (2,)
    assert set(info["mean"]) == {"alignment", "aesthetics"} and info["std"]["alignment"].shape == (2,)


def test_scores_work_in_a_policy_gradient_loss_and_in_place(zmodel):
    """The outputs were inference tensors (the model runs under torch.inference_mode): REINFORCE's
    `(logp * reward).mean().backward()` raised "Inference tensors cannot be saved for backward", and
    `reward -= baseline` raised too.  They now behave like torch.no_grad() results."""
    from zreward.downstream import group_rewards

    scorer = RewardScorer(zmodel)
    out = scorer.score(_images(2), PROMPTS[:2])
    expected = out.reward.clone()
    for t in (out.probs, out.mean, out.std, out.reward, out.in_vocab_mass):
        assert not t.is_inference() and not t.requires_grad
    logp = torch.zeros(2, requires_grad=True)
    (logp * out.reward).sum().backward()
    torch.testing.assert_close(logp.grad, expected)
    out.reward -= out.reward.mean()  # in place, outside any inference mode
    torch.testing.assert_close(out.reward, expected - expected.mean())
    scores, _ = as_reward_fn(scorer)(_images(2), PROMPTS[:2], None)
    g = group_rewards(scorer, _images(2), "a red car", group_size=2)
    for t in (scores, g.rewards, g.advantages):
        logp = torch.zeros(2, requires_grad=True)
        (logp * t).sum().backward()
        torch.testing.assert_close(logp.grad, t)


def test_query_logits_rows_match_scoring_and_train(zmodel):
    imgs = _images(3)
    dims = ["realism", "alignment", "realism"]
    scorer = RewardScorer(zmodel)
    rows = scorer.query_logits(imgs, PROMPTS[:3], dims)
    full = scorer.score(imgs, PROMPTS[:3])
    want = torch.stack([full.probs[i, zmodel.rubric.index(d)] for i, d in enumerate(dims)])
    torch.testing.assert_close(torch.softmax(rows, -1), want, atol=1e-5, rtol=1e-5)
    # it keeps the graph: a loss on it reaches the model's parameters
    rows.logsumexp(-1).sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in zmodel.model.parameters())
    with pytest.raises(ValueError, match="got 2 dimensions for 3 prompts"):
        scorer.query_logits(imgs, PROMPTS[:3], dims[:2])


def test_in_vocab_mass_is_chunked_and_gradient_free(zmodel, monkeypatch):
    """The mass equals softmax over the full vocabulary summed at the score tokens, however the
    vocabulary is chunked, and a differentiable call keeps no graph for it."""
    import zreward.scorer as sc

    imgs = _images(2)
    whole = RewardScorer(zmodel).score(imgs, PROMPTS[:2])
    monkeypatch.setattr(sc, "VOCAB_CHUNK", 7)  # many uneven chunks
    chunked = RewardScorer(zmodel).score(imgs, PROMPTS[:2])
    torch.testing.assert_close(chunked.in_vocab_mass, whole.in_vocab_mass, atol=1e-6, rtol=1e-5)
    # against a direct full-vocabulary softmax at one score position
    from zreward.train.rl import _generation_inputs

    enc = _generation_inputs(RewardScorer(zmodel), [imgs[0]], [PROMPTS[0]], ["alignment"])
    with torch.no_grad():
        p = torch.softmax(zmodel.model(**enc).logits[0, -1].float(), -1)
    want = float(p[list(zmodel.score_tokens.token_ids)].sum())
    assert abs(float(whole.in_vocab_mass[0, 0]) - want) < 1e-5
    x = torch.rand(1, 3, 56, 56, requires_grad=True)
    out = RewardScorer(zmodel).score(x, PROMPTS[:1], differentiable=True)
    assert out.reward.requires_grad and not out.in_vocab_mass.requires_grad


def test_an_image_the_processor_refuses_is_named(tmp_path):
    """Qwen's processor refuses an image whose sides differ more than 200-fold, and the error named no
    image: in a batch of hundreds, which one?  It now names the caller's index (and file), and its
    size, in the processor's own exception type; the images around it are unaffected."""
    from PIL import Image

    from zreward.evaluate import score_items
    from zreward.data import RatedItem
    from zreward.tiny import tiny_qwen2_vl

    m, p = tiny_qwen2_vl()
    zm = ZRewardModel(m, p)
    sc = RewardScorer(zm, batch_size=2)
    ok = np.zeros((64, 64, 3), np.uint8)
    wide = np.zeros((30, 6400, 3), np.uint8)  # aspect ratio 213
    with pytest.raises(ValueError, match=r"^image 3 \(30 x 6400 pixels\) cannot be preprocessed by Qwen2VLProcessor: "
                                         r"absolute aspect ratio must be smaller than 200"):
        sc.score([ok, ok, ok, wide], ["a car", "a red car", "a car", "a car"])
    with pytest.raises(ValueError, match=r"^image 0 \(20 x 4500 pixels\) cannot be preprocessed"):
        sc.score(torch.rand(1, 3, 20, 4500), "a car")
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(ok).save(tmp_path / "ok.png")
    paths = [str(tmp_path / "ok.png"), str(tmp_path / "wide.png")]
    with pytest.raises(ValueError, match=r"^image 1 \('.*wide\.png'\) \(30 x 6400 pixels\)"):
        sc.score(paths, "a car")
    items = [RatedItem(prompt="a car", image=x, dimension="realism", score=3.0, id=str(i)) for i, x in enumerate(paths)]
    with pytest.raises(ValueError, match=r"\('.*wide\.png'\) \(30 x 6400 pixels\) cannot be preprocessed"):
        score_items(sc, items)
    out = sc.score([ok, ok], "a car")  # the scorer is still usable
    assert out.reward.shape == (2,) and torch.isfinite(out.reward).all()


def test_a_batch_error_that_is_no_images_fault_is_left_as_it_is(monkeypatch):
    """When the processor refuses the batch for a reason that is not an image's (here: any text with
    'BAD' in it), no image is blamed: the processor's own error comes through unchanged."""
    from zreward.tiny import tiny_qwen2_vl

    m, p = tiny_qwen2_vl()
    zm = ZRewardModel(m, p)
    real = type(zm.processor).__call__

    def picky(self, *args, text=None, **kw):
        if any("BAD" in t for t in text):
            raise ValueError("the text holds BAD")
        return real(self, *args, text=text, **kw)

    monkeypatch.setattr(type(zm.processor), "__call__", picky)
    sc = RewardScorer(zm)
    with pytest.raises(ValueError, match=r"^the text holds BAD$"):
        sc.score(_images(3), ["a car", "a BAD car", "a car"])
    assert torch.isfinite(sc.score(_images(2), "a car").reward).all()


def test_prompts_holding_special_token_text_are_refused(zmodel, tmp_path):
    """A prompt holding a special token's text was read as that token: '<|im_end|>' ended the user's
    turn early, '<score_1.0>' planted a score token, '<|image_pad|>' added an image slot (Qwen's
    processor then failed naming no prompt) -- a different query, scored without a word.  Such a
    prompt is now refused by name, in every family; the trace marker added later is covered too."""
    from zreward.train.rl import ensure_marker

    sc = RewardScorer(zmodel)
    tok = zmodel.tokenizer
    score_text = tok.convert_ids_to_tokens(zmodel.score_tokens.token_ids[0])
    bad = [f"a car {score_text}"] + [f"a car {t}" for t in ("<|im_end|>", "<|image_pad|>", "<|im_start|>")
                                     if t in tok.get_vocab()]
    for prompt in bad:
        with pytest.raises(ValueError, match=r"holds '.+', a special token of the model's tokenizer"):
            sc.score(_images(1), prompt)
    ok = sc.score(_images(2), ["a car [sic] <b>bold</b> | 1.0", "score: 4.5"])  # ordinary text passes
    assert torch.isfinite(ok.reward).all()
    marker = tok.convert_ids_to_tokens(ensure_marker(zmodel))
    with pytest.raises(ValueError, match=re.escape(repr(marker))):
        sc.score(_images(1), f"then {marker}")


def test_questions_are_tokenised_once_per_dimension_list(monkeypatch):
    """Every scoring batch tokenised each dimension's question again and copied it to the device
    (234 us per batch of four dimensions on the development CPU); they are kept per question text,
    so a changed template still takes effect, and the scores are the same."""
    from zreward.tiny import tiny_qwen2_vl

    m, p = tiny_qwen2_vl()
    zm = ZRewardModel(m, p)
    calls = []
    real = ZRewardModel.suffix_ids
    monkeypatch.setattr(ZRewardModel, "suffix_ids", lambda self, d: calls.append(d) or real(self, d))
    sc = RewardScorer(zm, batch_size=2)
    imgs = [np.zeros((48, 48, 3), np.uint8), np.full((48, 48, 3), 200, np.uint8)] * 2
    first = sc.score(imgs, "a car")
    again = sc.score(imgs, "a car")
    assert calls == list(zm.rubric.dimensions)  # once, for the first of four batches
    torch.testing.assert_close(first.probs, again.probs, rtol=0, atol=0)
    zm.rubric.question_template = "How is the {dimension}?"
    changed = sc.score(imgs[:1], "a car", "realism")
    assert calls[-1] == "realism" and len(calls) == len(zm.rubric.dimensions) + 1
    realism = zm.rubric.index("realism")
    assert not torch.equal(changed.probs[0, 0], first.probs[0, realism])  # the new question was asked


def test_kept_question_tensors_serve_a_differentiable_call_after_an_inference_one():
    """The kept tensors are made outside inference mode: a differentiable call after a plain score()
    call (which runs in inference mode) saves them for backward."""
    from zreward.tiny import tiny_qwen2_vl

    m, p = tiny_qwen2_vl()
    sc = RewardScorer(ZRewardModel(m, p))
    imgs = torch.rand(2, 3, 48, 48)
    sc.score(imgs, "a car")  # inference mode: fills the cache
    x = imgs.clone().requires_grad_(True)
    sc.score(x, "a car", differentiable=True).reward.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_torch_func_grad_through_the_scorer_leaves_no_transform_tensors_cached(monkeypatch):
    """torch.func.grad over a differentiable scoring call gives autograd's gradient; the scorer's
    constant tensors (suffix ids, score-token ids) made inside the transform are that transform's
    wrappers, which have no storage once it ends: cached, they made every later call that launched a
    Triton kernel on them fail ("Cannot access storage of TensorWrapper" here, "... data pointer of
    Tensor that doesn't have storage" on CUDA).  Here the later call forces the restricted head's
    Triton kernel (the CPU interpreter)."""
    from zreward.tiny import tiny_qwen2_vl

    model, proc = tiny_qwen2_vl()
    zm = ZRewardModel(model, proc)
    for p in zm.model.parameters():
        p.requires_grad_(False)
    s = RewardScorer(zm, batch_size=2, in_vocab_mass=False)
    imgs = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))

    def reward(im):
        return s.score(im, PROMPTS[:2], differentiable=True).reward.sum()

    g = torch.func.grad(reward)(imgs)
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    cached = [t for v in s._const_cache.values() for t in (v if isinstance(v, tuple) else (v,))]
    assert not any(wrapped(t) for t in cached)
    x = imgs.clone().requires_grad_(True)
    reward(x).backward()
    torch.testing.assert_close(g, x.grad, atol=1e-6, rtol=1e-4)
    plain = s.score(imgs, PROMPTS[:2]).reward
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ZREWARD_BACKEND", "triton")
    import zreward_kernels as zk

    out = s.score(imgs, PROMPTS[:2])
    assert zk.backend_info()["last_backend"]["restricted_logits"] == "triton"  # the head's kernel, on the cached ids
    torch.testing.assert_close(out.reward, plain, atol=1e-5, rtol=1e-5)
