"""Vocab-restricted score head vs full LM head then gather, at Qwen2.5-7B shapes.

H = 3584, V = 152064, K = 9 score tokens, fp32 on CPU (bf16 on CUDA), N = 16 .. 4096 score
positions; "fwd" = logits only, "fwd+bwd" = logits -> score_stats mean -> backward into the
hidden states (the LM head frozen, as when only the backbone or adapters train).  The full head
runs on CPU only up to N = 1024 (one N = 1024 forward is about 1.1 TFLOP).
"""

import pytest
import torch
from conftest import DEVICE, QUICK, back_to_back, capture_graph, peak_memory_bytes, sync

from zreward_kernels import restricted_logits, score_stats, score_stats_from_hidden
from zreward_kernels._tuning import CONFIGS, override

H, V = 3584, 152064
IDS = list(range(151665, 151674))  # nine ids near the end of the vocabulary, like added special tokens
SIZES = [16, 64] if QUICK else [16, 64, 256, 1024, 4096]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
REPLAYS = 20  # back-to-back CUDA-graph replays per timed round
_WEIGHT = {}


def _weight():
    if "w" not in _WEIGHT:
        g = torch.Generator().manual_seed(0)
        _WEIGHT["w"] = (torch.randn(V, H, generator=g) * 0.02).to(DEVICE, DTYPE)
    return _WEIGHT["w"]


def _head_call(impl: str, mode: str, n: int):
    """``(hidden, call)``: one call of the full or restricted head at N = ``n`` (``fwd``: logits
    under no_grad; ``fwd+bwd``: logits -> score_stats mean -> backward into the hidden states, the
    restricted head through its entry point ``score_stats_from_hidden``: the matrix product and
    score_stats' kernels for ``restricted``, one fused launch each way for ``restricted_triton``),
    with no sync, so it can be captured in a CUDA graph too."""
    weight = _weight()
    ids = torch.tensor(IDS, device=DEVICE)
    hidden = torch.randn(n, H, generator=torch.Generator().manual_seed(n)).to(DEVICE, DTYPE)
    hidden.requires_grad_(mode == "fwd+bwd")

    def logits():
        if impl == "full_head":
            return (hidden @ weight.t())[:, ids]
        # restricted / restricted_triton: the same call with the projection kernel switched off / on
        # around the whole benchmark (_kernel_setting), so no per-call switching is timed
        return restricted_logits(hidden, weight, ids, validate=False)

    def call():
        hidden.grad = None
        if mode == "fwd":
            with torch.no_grad():
                return logits()
        if impl == "full_head":
            out = logits()
            stats = score_stats(out, validate=False)
        else:
            stats = out = score_stats_from_hidden(hidden, weight, ids, validate=False)
        stats.mean.sum().backward()
        return out

    return hidden, call


def _skip_unless_kernel_runs(impl: str, mode: str) -> None:
    if impl == "restricted_triton" and DEVICE.type != "cuda":
        pytest.skip("the Triton projection runs on CUDA")


@pytest.fixture
def _kernel_setting(request):
    """``restricted_fwd.KERNEL`` for the whole test: 1 when its ``impl`` is ``restricted_triton``, 0
    (the matrix product) for ``restricted``, whatever a tuned-configuration file
    (``ZREWARD_KERNEL_CONFIGS``, which ``bench/gpu_check.sh`` applies after its sweep) chose, so the
    two columns always time the two paths they name."""
    impl = request.node.callspec.params.get("impl")
    if impl in ("restricted", "restricted_triton"):
        with override("restricted_fwd", KERNEL=int(impl == "restricted_triton")):
            yield
    else:
        yield


def _check_kernel_ran() -> None:
    """The timed restricted_triton call ran the projection kernel, not the matrix product."""
    from zreward_kernels import backend_info

    used = backend_info()["last_backend"].get("restricted_logits")
    assert used == "triton", f"restricted_triton ran the {used} projection"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["full_head", "restricted", "restricted_triton"])
def test_restricted_head(benchmark, _kernel_setting, impl, mode, n):
    """Per call: the full head then a gather, the restricted head (a gather of the K weight rows and
    a matrix product: ``restricted_fwd.KERNEL=0``), and, on CUDA, the restricted head's Triton
    projection (``KERNEL=1``, the default; with gradients its hidden-state gradient is a second
    kernel, and ``score_stats_from_hidden`` fuses the statistics into both)."""
    _skip_unless_kernel_runs(impl, mode)
    if impl == "full_head" and DEVICE.type == "cpu" and n > 1024:
        pytest.skip("full head at N > 1024 on CPU takes minutes; the goal point is N = 1024")
    _, call = _head_call(impl, mode, n)

    def step():
        out = call()
        sync()
        return out

    slow = impl == "full_head" and DEVICE.type == "cpu" and n >= 256
    if not slow:
        step()
    if impl == "restricted_triton":
        _check_kernel_ran()
    peak = peak_memory_bytes(step)
    benchmark.group = f"restricted head {mode} N={n}"
    benchmark.extra_info.update(op="restricted_head", impl=impl, mode=mode, n=n, h=H, v=V, dtype=str(DTYPE),
                                peak_mem_bytes=peak, device=str(DEVICE), torch=torch.__version__,
                                device_name=torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu")
    benchmark.pedantic(step, rounds=1 if slow else 10, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["full_head", "restricted", "restricted_triton"])
def test_restricted_head_cuda_graph_back_to_back(benchmark, _kernel_setting, impl, mode):
    """The goal point N = 1024, one call captured in a CUDA graph and replayed REPLAYS times with one
    sync, timed per replay: the device time of a call, which the per-call timings above hide under
    the host time of the restricted path (56-84 us per forward on the lent H200, 2026-11-27).  CUDA
    only; the same two paths and modes as test_restricted_head."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    _skip_unless_kernel_runs(impl, mode)
    n = 1024
    _, call = _head_call(impl, mode, n)
    replays = back_to_back(capture_graph(call), REPLAYS)
    if impl == "restricted_triton":
        _check_kernel_ran()
    replays()
    benchmark.group = f"restricted head {mode} N={n} (CUDA graph, {REPLAYS} back to back)"
    benchmark.extra_info.update(op="restricted_head", impl=impl, mode=f"{mode} cuda-graph x{REPLAYS}", n=n, h=H,
                                v=V, dtype=str(DTYPE), peak_mem_bytes=None, calls_per_call=REPLAYS,
                                device=str(DEVICE), torch=torch.__version__,
                                device_name=torch.cuda.get_device_name(0))
    benchmark.pedantic(replays, rounds=20, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["full_vocab_ce", "liger_flce", "restricted_ce"])
def test_score_token_ce(benchmark, impl, n):
    """Training the score token, forward+backward into the hidden states (LM head frozen), the ways a
    user would run it: cross-entropy over the full vocabulary in PyTorch (``hidden @ W.T`` then CE),
    Liger-Kernel's fused linear cross-entropy (full vocabulary, chunked, never materialising the
    logits), and ours: the closed-set CE over the nine score tokens (``rubric_loss_from_hidden``).
    The first two normalise over all V tokens, ours over the nine bins (SPEC section 1) -- the
    comparison is of what each costs for the same job.  CUDA only (Liger's kernel is Triton)."""
    if DEVICE.type != "cuda":
        pytest.skip("the score-token CE comparison with Liger-Kernel runs on CUDA")
    from zreward_kernels import rubric_loss_from_hidden

    weight = _weight()
    gen = torch.Generator().manual_seed(n)
    bins = torch.randint(0, len(IDS), (n,), generator=gen)
    labels = torch.tensor(IDS)[bins].to(DEVICE)
    bins = bins.to(DEVICE)
    ids = torch.tensor(IDS, device=DEVICE)
    hidden = torch.randn(n, H, generator=gen).to(DEVICE, DTYPE).requires_grad_(True)
    if impl == "liger_flce":
        liger = pytest.importorskip("liger_kernel.transformers")
        flce = liger.LigerFusedLinearCrossEntropyLoss()

        def loss():
            return flce(weight, hidden, labels)
    elif impl == "full_vocab_ce":
        def loss():
            return torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), labels)
    else:
        def loss():
            return rubric_loss_from_hidden(hidden, weight, ids, target=bins, validate=False).loss

    def step():
        hidden.grad = None
        loss().backward()
        sync()

    step()
    peak = peak_memory_bytes(step)
    benchmark.group = f"score-token CE N={n}"
    benchmark.extra_info.update(op="score_token_ce", impl=impl, n=n, h=H, v=V, dtype=str(DTYPE), peak_mem_bytes=peak,
                                device=str(DEVICE), torch=torch.__version__, device_name=torch.cuda.get_device_name(0),
                                restricted_kernel=CONFIGS["restricted_fwd"]["KERNEL"])
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
