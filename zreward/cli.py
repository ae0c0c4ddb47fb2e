"""Command line: ``zreward demo`` (the main job: the pipeline on the synthetic world), ``score``,
``eval``, ``train``, ``ops`` (fused-op timings) and ``info`` (backends)."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from zreward_kernels import BIN_VALUES, backend_info, gdso_loss, group_advantage, rubric_loss, score_stats

from ._json import dumps as strict_dumps


def _time(fn, device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def _op_table(device, rows: int, gen: torch.Generator):
    k = len(BIN_VALUES)
    x = torch.randn(rows, k, generator=gen).to(device)
    t = torch.randint(0, k, (rows,), generator=gen).to(device)
    teacher = torch.randn(rows, k, generator=gen).to(device)
    pairs = torch.randint(0, rows, (rows // 2, 2), generator=gen).to(device)
    gaps = (torch.randint(-8, 9, (rows // 2,), generator=gen) * 0.5).to(device)
    g = 8
    p = max(rows // (2 * g), 1)
    gx = torch.randn(p, 2, g, k, generator=gen).to(device)
    scores = torch.tensor(BIN_VALUES)[torch.randint(0, k, (p, 2), generator=gen)].to(device)
    backends = ["reference"] + (["triton"] if device.type == "cuda" and backend_info()["triton_available"] else [])
    lines = []
    for name in ("score_stats", "rubric_loss", "gdso_loss"):
        times = {}
        for be in backends:
            xr = (gx if name == "gdso_loss" else x).clone().requires_grad_(True)

            def step(be=be, xr=xr, name=name):
                if name == "score_stats":
                    s = score_stats(xr, backend=be, validate=False)
                    loss = s.mean.sum() + s.std.sum()
                elif name == "rubric_loss":
                    loss = rubric_loss(xr, target=t, teacher_logits=teacher, pairs=pairs, pair_gaps=gaps,
                                       backend=be, validate=False).loss
                else:
                    loss = gdso_loss(xr, scores, backend=be, validate=False).loss
                loss.backward()
                xr.grad = None

            times[be] = _time(step, device, 20)
        fused = times.get("triton")
        lines.append((name, times["reference"], fused))
    # the compiled group advantage (C++ on CPU, CUDA kernels on GPU) against its PyTorch reference
    rewards = torch.randn(rows * 16, generator=gen).to(device)
    times = {}
    for be in ("reference", "compiled"):
        if be == "compiled" and backend_info()["compiled_extension"]["cpu" if device.type == "cpu" else "cuda"] != "loaded":
            continue
        times[be] = _time(lambda be=be: group_advantage(rewards, group_size=16, validate=False, backend=be), device, 20)
    lines.append((f"group_advantage (M={rows * 16}, groups of 16; forward only)", times["reference"], times.get("compiled")))
    return lines


def demo(args) -> int:
    """The main job: the whole pipeline on the synthetic world (see zreward.synth.pipeline)."""
    from dataclasses import replace

    from .synth.pipeline import PRESETS, run

    cfg = replace(PRESETS[args.preset], out_dir=args.out, seed=args.seed)
    run(cfg)
    return 0


def _device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when available), ``cpu``, or a CUDA device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps, xpu, ...: nothing here is built or tested for them
        raise SystemExit(f"--device {name!r}: zreward runs on cpu or cuda (or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name!r}, but no CUDA device is available here (torch {torch.__version__}); "
                         "use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name!r}, but there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def ops(args) -> int:
    """Forward+backward time of every fused op against its reference on this device."""
    device = _device(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"forward+backward time per call on {device} ({args.rows} rows; ms):")
    print("| op | reference (eager) | fused Triton / compiled op |")
    print("|---|---|---|")
    for name, ref_ms, fused_ms in _op_table(device, args.rows, gen):
        fused = f"{fused_ms:.3f}" if fused_ms is not None else "n/a (Triton needs CUDA)"
        print(f"| {name} | {ref_ms:.3f} | {fused} |")
    print(f"backends used: {backend_info()['last_backend']}")
    return 0


def _load_scorer(args):
    from .model import ZRewardModel
    from .scorer import RewardScorer

    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model!r} is not a directory (a ZRewardModel saved with save_pretrained)")
    device = _device(args.device)
    model = ZRewardModel.from_pretrained(args.model, device=device)
    return RewardScorer(model, batch_size=args.batch_size)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _image_paths(paths):
    """Image files, a directory standing for the image files in it (sorted by name, not recursive)."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise SystemExit(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in directory {path}")
            out.extend(found)
        else:
            out.append(path)
    return out


def score_cmd(args) -> int:
    from .evaluate import _progress
    from .scorer import unreadable_images

    paths = _image_paths(args.images)
    prompts = args.prompt
    if len(prompts) == 1 and len(paths) > 1:
        prompts = prompts * len(paths)
    if len(prompts) != len(paths):
        raise SystemExit(f"give one --prompt, or one per image ({len(paths)}), got {len(prompts)}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:  # all of them before any is scored
        raise SystemExit(f"image not found: {missing[0]}" + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
    bad = unreadable_images(paths)  # headers only; a broken file would otherwise stop the run when its batch came up
    if bad:
        raise SystemExit(f"{bad[0][0]}: {bad[0][1]}" + (f" ({len(bad)} unreadable files)" if len(bad) > 1 else ""))
    scorer = _load_scorer(args)
    for prompt in dict.fromkeys(prompts):  # a special token's text, before any image is scored
        try:
            scorer.model.check_prompt(prompt, "--prompt")
        except ValueError as e:
            raise SystemExit(str(e)) from None
    rows, dims = [], None
    bs = args.batch_size
    bar = _progress(len(paths), "scoring") if len(paths) > bs else None
    for s in range(0, len(paths), bs):  # images are read batch by batch, not all at once
        chunk = paths[s:s + bs]
        # paths, read by the scorer: an image its processor refuses is named by its file
        out = scorer.score(chunk, prompts[s:s + bs], args.dimensions)
        dims = out.dimensions
        for i, path in enumerate(chunk):
            row = {"image": path, "prompt": prompts[s + i], "reward": float(out.reward[i])}
            for j, d in enumerate(dims):
                row[d] = {"mean": float(out.mean[i, j]), "std": float(out.std[i, j]),
                          "probs": [round(float(x), 6) for x in out.probs[i, j]]}
            rows.append(row)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if args.json:
        print(strict_dumps(rows, indent=2))
    else:
        print("| image | reward | " + " | ".join(f"{d} (mean +- std)" for d in dims) + " |")
        print("|---|---|" + "---|" * len(dims))
        for r in rows:
            cells = " | ".join(f"{r[d]['mean']:.3f} +- {r[d]['std']:.3f}" for d in dims)
            print(f"| {r['image']} | {r['reward']:.3f} | {cells} |")
    return 0


def eval_cmd(args) -> int:
    from .data import load_manifest
    from .evaluate import evaluate_items, format_table

    scorer = _load_scorer(args)
    items = load_manifest(args.manifest, dimensions=scorer.model.rubric.dimensions)
    report = evaluate_items(scorer, items, out_dir=args.out, batch_size=args.batch_size, plots=not args.no_plots)
    print(format_table(report))
    print(f"\nwrote {os.path.join(args.out, 'metrics.json')}" + (
        "" if args.no_plots else f" and plots: {', '.join(report['_meta'].get('plots', [])) or 'none'}"))
    return 0


def train_cmd(args) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_file(args.config, method=args.method,
                                overwrite_output_dir=True if args.overwrite_output_dir else None)
    last = train(cfg, resume=args.resume)
    print(strict_dumps(last, indent=2))
    return 0


def info(_args) -> int:
    print(json.dumps(backend_info(), indent=2))
    return 0


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse's messages name the type
    return parse


DEVICE_HELP = "auto (cuda when there is one, else cpu), cpu, cuda or cuda:N"


def build_parser() -> argparse.ArgumentParser:
    """The ``zreward`` command line (every subcommand; ``main`` parses and runs)."""
    parser = argparse.ArgumentParser(prog="zreward", description=" ".join(__doc__.split()))  # the whole sentence, not its first line
    from . import __version__

    parser.add_argument("--version", action="version", version=f"zreward {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the main job: the Z-Reward pipeline on the synthetic world")
    p.add_argument("--preset", choices=["quick", "full"], default="quick",
                   help="quick: about 2 min on 2 CPU cores; full: the README's table (about 11 min)")
    p.add_argument("--out", default="demo_out", help="folder for models, results.md/json and plots")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the world and every model (default 0)")
    p.set_defaults(fn=demo)
    p = sub.add_parser("ops", help="time every fused op against its reference on this device")
    p.add_argument("--rows", type=_int_at_least(1), default=16384,
                   help="rows of logits per call (group_advantage times 16 x as many rewards)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(fn=ops)
    p = sub.add_parser("info", help="print which kernel backends are available")
    p.set_defaults(fn=info)
    p = sub.add_parser("train", help="train a reward model (sft, risd, gdso, grpo, opd)")
    p.add_argument("method", help="sft | risd | gdso | grpo | opd (overrides the config's method; "
                                  "a warning says so when they differ)")
    p.add_argument("--config", required=True, help="JSON config (see zreward.train.config for every key)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="replace a previous run in output_dir (its metrics.jsonl, checkpoints, final/, tb/)")
    p.set_defaults(fn=train_cmd)
    for name, fn, helptext in (("score", score_cmd, "score images against a prompt with a saved reward model"),
                               ("eval", eval_cmd, "evaluate a saved reward model on a JSONL manifest")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="directory written by ZRewardModel.save_pretrained")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="images per forward pass (default 16)")
        if name == "score":
            p.add_argument("images", nargs="+", help="image files, or directories (the image files in them, by name)")
            p.add_argument("--prompt", action="append", required=True, help="the prompt (once, or once per image)")
            p.add_argument("--dimensions", nargs="+", default=None,
                           help="rubric dimensions to score (default: all of the model's)")
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            p.add_argument("--manifest", required=True, help="JSONL manifest (see zreward.data)")
            p.add_argument("--out", required=True, help="folder for metrics.json, predictions.jsonl and plots")
            p.add_argument("--no-plots", action="store_true", help="skip the three plots (no matplotlib needed)")
        p.set_defaults(fn=fn)
    return parser


#: What bad input raises across the library (each message names the argument or file): shown as one
#: line, not a traceback, on the command line.  ``ZREWARD_TRACEBACK=1`` shows the traceback.
USER_ERRORS = (ValueError, TypeError, OSError, NotImplementedError)


def main(argv=None) -> int:
    """Run a command.  From the shell (``argv`` None), bad input (:data:`USER_ERRORS`) prints
    ``zreward <command>: error: <message>`` and exits with status 2, as argparse does for bad
    flags; called with ``argv`` from Python, the exception propagates."""
    args = build_parser().parse_args(argv)
    if argv is not None or os.environ.get("ZREWARD_TRACEBACK", "0") not in ("", "0"):
        return args.fn(args)
    import sys

    try:
        return args.fn(args)
    except SystemExit as exc:  # the commands' own checks (a missing image, a bad --device)
        if not isinstance(exc.code, str):
            raise
        print(f"zreward {args.command}: error: {exc.code}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        what = f"{type(exc).__name__}: " if not isinstance(exc, ValueError) else ""
        print(f"zreward {args.command}: error: {what}{exc}", file=sys.stderr)
        return 2
