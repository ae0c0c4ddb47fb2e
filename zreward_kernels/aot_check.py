"""Compile every Triton kernel launch the fused ops make, for a CUDA target, without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not whether they
compile: it accepts, for example, a variable whose shape differs between the two branches of an
``if``, which the compiler rejects.  This check runs the public ops on small CPU tensors with the
kernel launches intercepted (nothing is computed), records each launch's argument types,
constexprs and warps, and compiles it with ``triton.compile`` for the chosen architecture (PTX and
cubin through Triton's bundled ``ptxas``) twice: as Triton's JIT specialises it on a GPU (an int
argument equal to 1 becomes a constexpr, ints and pointers divisible by 16 get divisibility hints;
the JIT's own binder computes this) and with plain argument types (the code other sizes get).
``--sweep`` adds the candidate configurations in ``_tuning.SWEEP`` (``all``, or a ``sample``: each
kernel's smallest, middle and largest tile).
With ``--verbose``, ``ptxas -v`` register and spill counts and the SASS instruction and barrier
counts (``nvdisasm``) are printed per launch.

    python -m zreward_kernels.aot_check [--arch 90] [--sweep none|sample|all] [--verbose]

Needs Triton with its NVIDIA backend and must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from . import _tuning
from . import gdso as _gdso
from . import ops as _ops
from . import restricted as _restricted
from . import rubric as _rubric
from ._triton_utils import HAS_TRITON, interpreter_enabled

_KERNELS = (
    (_rubric, "_stats_fwd_kernel", "stats_fwd"),
    (_rubric, "_stats_bwd_kernel", "stats_bwd"),
    (_rubric, "_rubric_fwd_kernel", "rubric_fwd"),
    (_rubric, "_rubric_bwd_kernel", "rubric_bwd"),
    (_gdso, "_gdso_fwd_kernel", "gdso_fwd"),
    (_restricted, "_restricted_fwd_kernel", "restricted_fwd"),
    (_restricted, "_restricted_bwd_kernel", "restricted_bwd"),
    (_restricted, "_restricted_stats_fwd_kernel", "restricted_fwd"),
    (_restricted, "_restricted_stats_bwd_kernel", "restricted_bwd"),
)

_PTR = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
        torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _PTR[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(v).__name__}")


class Launch(NamedTuple):
    """One recorded launch: the kernel's name in the tuning table, the JIT function, the signature
    (argument types; ``"constexpr"`` for constexprs), the constexprs by argument name, the warps,
    and the attributes (``tt.divisibility`` hints) by argument path."""

    name: str
    fn: object
    sig: dict
    consts: dict
    warps: int
    attrs: dict


def _jit_specialization(fn, args, kwargs) -> Optional[Tuple[dict, dict, dict]]:
    """``(signature, constexprs by name, attrs)`` as Triton's JIT specialises this launch: an int
    argument equal to 1 becomes a constexpr, and ints and pointers divisible by 16 get a
    divisibility hint (what a launch on a GPU compiles).  Uses Triton's own binder (3.6 to 3.8);
    ``None`` where that is unavailable (the caller falls back to plain argument types)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", 90, 32))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        _, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    except Exception:  # noqa: BLE001 - a Triton without these internals: plain types
        return None
    names = fn.arg_names
    return sig, {names[path[0]]: v for path, v in consts.items()}, attrs


class _Recorder:
    def __init__(self, fn, name: str, log: Optional[list], calls: Optional[list] = None):
        self.fn, self.name, self.log, self.calls = fn, name, log, calls

    def __getitem__(self, grid):
        if self.log is None and self.calls is None:
            return _no_launch

        def launch(*args, **kwargs):
            if self.calls is not None:
                self.calls.append((self.fn, args, kwargs))
            if self.log is None:
                return
            # twice: as the JIT specialises this launch on a GPU (sizes equal to 1 as constexprs,
            # divisibility hints), and with plain argument types, the code other sizes compile to
            warps = kwargs.get("num_warps", 4)
            consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            sig = {n: "constexpr" if n in consts else _arg_type(args[i]) for i, n in enumerate(self.fn.arg_names)}
            jit = _jit_specialization(self.fn, args, kwargs)
            if jit is not None:
                jit_sig, jit_consts, jit_attrs = jit
                self.log.append(Launch(self.name, self.fn, jit_sig, jit_consts, warps, jit_attrs))
            self.log.append(Launch(self.name, self.fn, sig, consts, warps, {}))

        return launch


def _no_launch(*args, **kwargs):
    return None


@contextlib.contextmanager
def intercepted_launches(record: bool = False, calls: Optional[list] = None) -> Iterator[Optional[list]]:
    """Within the block the public ops take the fused path on any device and their Triton launches
    do nothing (with ``record``, each launch's kernel, signature, constexprs and warps is appended
    to the yielded list; with a ``calls`` list, each launch's ``(kernel, args, kwargs)`` is appended
    to it).  What runs is the host path of a call: validation, launch set-up,
    autograd.  Used to compile launches here, to trace the host path with torch.compile without a
    GPU (tests) and to time it (``bench/test_bench_launch.py``).  Not thread-safe."""
    log = [] if record else None
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in _KERNELS]
    old_choose = _ops.choose_backend
    try:
        for mod, attr, name in _KERNELS:
            setattr(mod, attr, _Recorder(getattr(mod, attr), name, log, calls))
        _ops.choose_backend = lambda *a, **k: "triton"
        yield log
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
        _ops.choose_backend = old_choose


def _workloads() -> Dict[str, List[Tuple[str, Callable[[], None]]]]:
    """Small calls of the public ops that together make every kind of launch, grouped by the
    kernels whose sweeps they represent."""
    from . import gdso_loss, rubric_loss, score_stats

    g = torch.Generator().manual_seed(0)
    n, p = 24, 6

    def x_(dtype=torch.float32, shape=(n, 9)):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    tgt = torch.randint(0, 9, (n,), generator=g)
    probs = torch.softmax(torch.randn(n, 9, generator=g), -1)
    pairs = torch.randint(0, n, (p, 2), generator=g)
    gaps = torch.zeros(p)

    def stats(dtype=torch.float32, all_grads=True):
        def run():
            s = score_stats(x_(dtype), validate=False)
            (s.probs.sum() + s.mean.sum() + s.std.sum() if all_grads else s.mean.sum()).backward()
        return run

    def rubric(dtype=torch.float32, grad=True, **kw):
        def run():
            x = x_(dtype)
            with torch.set_grad_enabled(grad):
                out = rubric_loss(x, validate=False, **kw)
            if grad:
                (out.loss.sum() + out.pair.sum() + out.mean.sum() + out.std.sum()).backward()
        return run

    def gdso(G=8, dtype=torch.float32, grad=True):
        def run():
            x = x_(dtype, (3, 2, G, 9))
            scores = torch.full((3, 2), 3.0)
            with torch.set_grad_enabled(grad):
                out = gdso_loss(x, scores, validate=False)
            if grad:
                out.loss.backward()
        return run

    def restricted(dtype=torch.float32, w_dtype=torch.float32, bias=False, grad=None):
        # the Triton projection (restricted_fwd.KERNEL=1): compiled whatever the launch table says.
        # grad: None (scoring), "hidden" (frozen weight; upstream gradient contiguous, as score_stats'
        # backward gives it) or "all" (weight and bias too; upstream gradient of a .sum(), zero strides)
        def run():
            from . import restricted_logits
            h = torch.randn(40, 3584, generator=g).to(dtype).requires_grad_(grad is not None)
            w = torch.randn(64, 3584, generator=g).to(w_dtype).requires_grad_(grad == "all")
            b = torch.randn(64, generator=g).requires_grad_(grad == "all") if bias else None
            with torch.set_grad_enabled(grad is not None), _tuning.override("restricted_fwd", KERNEL=1):
                out = restricted_logits(h, w, torch.arange(9), b, validate=False)
                if grad == "hidden":
                    out.backward(torch.ones_like(out))
                elif grad == "all":
                    out.sum().backward()
        return run

    def restricted_stats(dtype=torch.float32, grad=True, outputs=("mean",)):
        # score_stats_from_hidden with the Triton projection: projection and statistics fused
        def run():
            from . import score_stats_from_hidden
            h = torch.randn(40, 3584, generator=g).to(dtype).requires_grad_(grad)
            w = torch.randn(64, 3584, generator=g).to(dtype)
            with torch.set_grad_enabled(grad), _tuning.override("restricted_fwd", KERNEL=1):
                s = score_stats_from_hidden(h, w, torch.arange(9), validate=False)
                if grad:
                    sum(getattr(s, o).sum() for o in outputs).backward()
        return run

    main_rubric = ("rubric CE+KL+pairs mean", rubric(target=tgt, teacher_logits=torch.randn(n, 9, generator=g),
                                                     pairs=pairs, pair_gaps=gaps))
    return {
        "stats": [("score_stats", stats()), ("score_stats bf16, mean only", stats(torch.bfloat16, False))],
        "rubric": [
            main_rubric,
            ("rubric soft CE+KL probs none", rubric(target_probs=probs, teacher_probs=probs, pairs=pairs,
                                                    pair_gaps=gaps, reduction="none")),
            ("rubric pairs sum", rubric(pairs=pairs, pair_gaps=gaps, reduction="sum")),
            ("rubric bf16", rubric(torch.bfloat16, target=tgt, pairs=pairs, pair_gaps=gaps)),
            ("rubric fp16 no grad", rubric(torch.float16, grad=False, target=tgt, teacher_probs=probs)),
        ],
        "gdso": [("gdso G=8", gdso()), ("gdso G=1", gdso(1)), ("gdso G=3 bf16", gdso(3, torch.bfloat16)),
                 ("gdso G=64", gdso(64)), ("gdso no grad", gdso(grad=False))],
        "restricted": [("restricted bf16 fwd+bwd", restricted(torch.bfloat16, torch.bfloat16, grad="hidden")),
                       ("restricted bf16", restricted(torch.bfloat16, torch.bfloat16)),
                       ("restricted bf16, fp32 weight and bias", restricted(torch.bfloat16, bias=True)),
                       ("restricted fp32", restricted()),
                       ("restricted fp32 fwd+bwd, weight and bias", restricted(bias=True, grad="all")),
                       ("score_stats_from_hidden bf16 mean fwd+bwd", restricted_stats(torch.bfloat16)),
                       ("score_stats_from_hidden bf16", restricted_stats(torch.bfloat16, grad=False)),
                       ("score_stats_from_hidden fp32 probs, mean and std fwd+bwd",
                        restricted_stats(outputs=("probs", "mean", "std")))],
    }


_SWEEP_WORKLOADS = {"stats_fwd": "stats", "stats_bwd": "stats", "rubric_fwd": "rubric", "rubric_bwd": "rubric",
                    "gdso_fwd": "gdso", "restricted_fwd": "restricted", "restricted_bwd": "restricted"}


def _candidates(kernel: str, sweep: str) -> list:
    cands = _tuning.SWEEP[kernel]
    if sweep == "all":
        return cands
    if sweep == "sample":  # smallest, middle and largest tile: one of each code shape
        return [cands[i] for i in sorted({0, len(cands) // 2, len(cands) - 1})]
    if sweep == "none":
        return []
    raise ValueError(f"sweep must be 'none', 'sample' or 'all', got {sweep!r}")


def _run_workloads(sweep: str) -> None:
    """Run every workload, then each sweep kernel's first workload under each candidate (within
    :func:`intercepted_launches`)."""
    work = _workloads()
    cands = {kernel: _candidates(kernel, sweep) for kernel in _tuning.SWEEP if kernel in _SWEEP_WORKLOADS}
    for group in work.values():
        for _, run in group:
            run()
    for kernel, cfgs in cands.items():
        if cfgs:
            _, run = work[_SWEEP_WORKLOADS[kernel]][0]
            for cfg in cfgs:
                with _tuning.override(kernel, **cfg):
                    run()


def record_launches(sweep: str = "none") -> list:
    """Every distinct launch of the default configurations, and of the candidate configurations in
    ``_tuning.SWEEP`` (``sweep="all"``, or ``"sample"``: the smallest, middle and largest of each
    kernel), as :class:`Launch` records (specialised as the JIT would on a GPU)."""
    with intercepted_launches(record=True) as log:
        _run_workloads(sweep)
    seen, out = set(), []
    for rec in log:
        key = (rec.name, tuple(sorted(rec.sig.items())), tuple(sorted(rec.consts.items())), rec.warps,
               tuple(sorted((k, str(v)) for k, v in rec.attrs.items())))
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def _ptxas_usage(ptx: str, arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - report only
        return "ptxas n/a"
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spilled"


def _sass_counts(cubin: bytes) -> str:
    """SASS instructions and barriers (``BAR``) of a compiled kernel, from Triton's bundled
    ``nvdisasm``: a program's serial chain of cross-warp steps, which sets a kernel's time when one
    wave of programs covers the batch (``gdso_loss`` at P = 512)."""
    try:
        import triton.knobs as knobs

        nvdisasm = knobs.nvidia.nvdisasm.path
    except Exception:  # noqa: BLE001 - report only (older Triton, no bundled tool)
        return "SASS n/a"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True)
    if r.returncode != 0:
        return "SASS n/a"
    ops = [m.group(1) for m in re.finditer(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", r.stdout,
                                            re.MULTILINE)]
    return f"{len(ops)} SASS instructions, {ops.count('BAR')} BAR"


def compile_all(arch: int = 90, sweep: str = "none", verbose: bool = False) -> int:
    """Compile every recorded launch for ``sm_<arch>``; returns the number compiled.  Raises on
    the first launch that does not compile, naming it."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    if interpreter_enabled():
        raise RuntimeError("aot_check must run without TRITON_INTERPRET=1 (the kernels must be JIT functions)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    launches = record_launches(sweep)
    for i, (name, fn, sig, consts, warps, attrs) in enumerate(launches):
        desc = f"{name} ({fn.__name__}) warps={warps} " + " ".join(f"{k}={v}" for k, v in consts.items()) \
            + (" (as specialised by the JIT)" if attrs else "")
        try:
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=dict(num_warps=warps))
        except Exception as exc:
            raise RuntimeError(f"{desc}: does not compile for sm_{arch}: {exc}") from exc
        if verbose:
            print(f"[{i + 1}/{len(launches)}] {desc}: {_ptxas_usage(k.asm['ptx'], arch)}, "
                  f"{_sass_counts(k.asm['cubin'])}", flush=True)
    return len(launches)


# The arguments each kernel writes (stores or atomics).  torch.compile finds a user Triton kernel's
# written arguments from its TTIR (torch._higher_order_ops.triton_kernel_wrap.identify_mutated_tensors)
# and clones every argument it believes written before the launch: an input believed written costs
# a copy per call in a compiled graph.  Its analysis follows a store's address back through every
# operand of the ops that computed it, and takes all arguments of a @triton.jit helper call as
# operands of what the call returns: an address made from the row indices a helper returned
# together with loaded values marks the helper's input pointers as written.  The kernels therefore
# compute their tile's indices in helpers that take no pointers.
WRITES = {
    "_stats_fwd_kernel": {"PROBS", "MEAN", "STD"},
    "_stats_bwd_kernel": {"DX"},
    "_rubric_fwd_kernel": {"MEAN", "STD", "CE_ROWS", "KL_ROWS", "PAIR_TERMS", "SIGN", "SEM", "CNT", "PART", "LOSS",
                           "CE_OUT", "KL_OUT", "PAIR_OUT", "NV_OUT"},
    "_rubric_bwd_kernel": {"DX"},
    "_gdso_fwd_kernel": {"DX", "MEAN", "STD", "RPT", "RPW", "RWD", "ADV", "CE", "PW", "PART", "COUNTER", "LOSS"},
    "_restricted_fwd_kernel": {"OUT", "ROWS"},
    "_restricted_bwd_kernel": {"DX"},
    "_restricted_stats_fwd_kernel": {"OUT", "ROWS", "PROBS", "MEAN", "STD"},
    "_restricted_stats_bwd_kernel": {"DX"},
}


def written_arguments(arch: int = 90, sweep: str = "none") -> List[Tuple[str, str, List[str]]]:
    """``(kernel, launch, arguments torch.compile believes written)`` for every distinct launch of
    the default configurations (and of the sweep's candidates, as in :func:`record_launches`), from
    PyTorch's own analysis (see ``WRITES``), run for an ``sm_<arch>`` target without a GPU."""
    if interpreter_enabled():
        raise RuntimeError("aot_check must run without TRITON_INTERPRET=1 (the kernels must be JIT functions)")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class _TargetOnly:  # what the analysis asks of the active driver: the target to compile for
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    calls: list = []
    with intercepted_launches(calls=calls):
        _run_workloads(sweep)
    seen, out = set(), []
    old = driver._active  # None without a GPU (asking for it would raise)
    driver.set_active(_TargetOnly())
    try:
        for fn, args, kwargs in calls:
            named = dict(zip(fn.arg_names, args))
            named.update((k, v) for k, v in kwargs.items() if k not in ("num_warps", "num_stages"))
            consts = tuple(sorted((k, v) for k, v in named.items() if not isinstance(v, torch.Tensor)
                                  and k not in ("stride_x", "n_rows", "n_pairs", "H", "inv_tau")))
            key = (fn.__name__, consts, tuple(str(v.dtype) for v in named.values() if isinstance(v, torch.Tensor)))
            if key in seen:
                continue
            seen.add(key)
            desc = " ".join(f"{k}={v}" for k, v in consts if k.isupper())
            out.append((fn.__name__, desc, _believed_written(fn, named)))
    finally:
        driver._active = old
    return out


def _believed_written(fn, named: dict) -> List[str]:
    """The tensor arguments torch.compile treats as written by this launch (PyTorch 2.11 to 2.14)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if hasattr(tkw, "identify_mutated_tensors"):  # PyTorch <= 2.12
        return sorted(tkw.identify_mutated_tensors(fn, named, {}))
    accesses = tkw.identify_accessed_tensors(fn, named, {})  # later: read and write sets
    return sorted(d.name for d in accesses.read_writes.writes if isinstance(named.get(d.name), torch.Tensor))


def check_written(arch: int = 90, sweep: str = "none", verbose: bool = False) -> int:
    """Raise if torch.compile would believe any launch writes an argument outside ``WRITES`` (it
    would clone that input per call); returns the number of launches checked."""
    found = written_arguments(arch, sweep)
    bad = []
    for name, desc, written in found:
        extra = sorted(set(written) - WRITES[name])
        if verbose:
            print(f"{name} {desc}: writes {', '.join(written) or 'nothing'}", flush=True)
        if extra or not written:
            bad.append(f"{name} {desc}: torch.compile believes it writes {written}; not outputs: {extra}")
    if bad:
        raise RuntimeError("launches torch.compile would clone inputs for:\n" + "\n".join(bad))
    return len(found)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (80, 90, ...)")
    ap.add_argument("--sweep", choices=("none", "sample", "all"), default="none",
                    help="also compile the tuning candidates in _tuning.SWEEP (all, or a sample of each kernel's)")
    ap.add_argument("--verbose", action="store_true",
                    help="one line per launch with ptxas register use and SASS instruction and barrier counts")
    ap.add_argument("--written", action="store_true",
                    help="instead, check that torch.compile's analysis finds each launch writing only its outputs")
    args = ap.parse_args(argv)
    if args.written:
        n = check_written(args.arch, args.sweep, args.verbose)
        print(f"{n} kernel launches write only their outputs, as torch.compile sees them")
        return 0
    n = compile_all(args.arch, args.sweep, args.verbose)
    print(f"compiled {n} kernel launches for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
