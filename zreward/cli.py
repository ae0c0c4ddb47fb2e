"""Command line: ``zreward demo`` (the main job on the embedded default) and ``zreward info``.

Until the synthetic-world pipeline lands, ``demo`` runs a small but real experiment on the fused
ops: a linear score head over noisy per-item features is trained three ways -- SFT (cross-entropy
to one noisy rater label per item), SFT plus the pairwise gap term, and RISD (forward KL to a
better-informed teacher's score distribution) -- and evaluated on held-out items against trimmed
means of five raters.  It then runs ``gdso_loss`` on sampled groups and times every op on the
device at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from zreward_kernels import BIN_VALUES, backend_info, gdso_loss, group_advantage, rubric_loss, score_stats

from .metrics import hpa, plcc, srcc, trimmed_mean

DIMENSIONS = ("alignment", "realism", "aesthetics", "plausibility")


def _snap(x: torch.Tensor) -> torch.Tensor:
    """Round to the half-point grid and clamp to [1, 5]."""
    return (x * 2).round().div(2).clamp(1.0, 5.0)


def _world(n: int, feat_dim: int, gen: torch.Generator, mix: torch.Tensor, group: int):
    d = len(DIMENSIONS)
    latent = 1 + 4 * torch.rand(n, d, generator=gen)
    # what the student sees: a noisy, mixed view of the latent quality
    feats = (latent - 3 + 0.7 * torch.randn(n, d, generator=gen)) @ mix + 0.3 * torch.randn(n, feat_dim, generator=gen)
    raters = _snap(latent.unsqueeze(-1) + 0.9 * torch.randn(n, d, 5, generator=gen))
    label = raters[..., 0]  # training data carries one rater's score per item
    reference = trimmed_mean(raters)  # test reference: trimmed mean of five raters
    # the teacher has reasoned about the item: a sharper, less noisy distribution
    centre = latent + 0.35 * torch.randn(n, d, generator=gen)
    v = torch.tensor(BIN_VALUES)
    teacher_logits = -((v - centre.unsqueeze(-1)) ** 2) / (2 * 0.45**2)
    groups = torch.arange(n) // group
    return dict(feats=feats, label=label, reference=reference, teacher_logits=teacher_logits, groups=groups)


def _pairs(groups: torch.Tensor, label: torch.Tensor, d: int):
    """All same-group, same-dimension pairs as flattened row indices ``n * D + d`` and gaps."""
    n = groups.numel()
    a, b = torch.triu_indices(n, n, offset=1)
    same = groups[a] == groups[b]
    a, b = a[same], b[same]
    dims = torch.arange(d)
    ra = (a.unsqueeze(1) * d + dims).flatten()
    rb = (b.unsqueeze(1) * d + dims).flatten()
    flat = label.flatten()
    return torch.stack([ra, rb], 1), flat[ra] - flat[rb]


def _train(method: str, train: dict, feat_dim: int, steps: int, device, seed: int, log_every: int):
    torch.manual_seed(seed)
    d, k = len(DIMENSIONS), len(BIN_VALUES)
    head = torch.nn.Linear(feat_dim, d * k).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    feats = train["feats"].to(device)
    target = (train["label"] * 2 - 2).long().to(device)  # score -> bin index
    teacher = train["teacher_logits"].to(device)
    pairs, gaps = _pairs(train["groups"], train["label"], d)
    pairs, gaps = pairs.to(device), gaps.to(device)
    terms = {
        "sft": dict(target=target),
        "sft+pair": dict(target=target, pairs=pairs, pair_gaps=gaps, weight_pair=1.0),
        "risd": dict(teacher_logits=teacher),
    }[method]
    curve = []
    for step in range(steps):
        logits = head(feats).view(-1, d, k)
        out = rubric_loss(logits, validate=step == 0, **terms)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            curve.append((step, float(out.loss.detach())))
    return head, curve


def _evaluate(head, test: dict, device) -> dict:
    d, k = len(DIMENSIONS), len(BIN_VALUES)
    with torch.inference_mode():
        stats = score_stats(head(test["feats"].to(device)).view(-1, d, k))
    mu = stats.mean.cpu()
    ref = test["reference"]
    groups = test["groups"].unsqueeze(1).expand_as(mu) * d + torch.arange(d)  # pairs within prompt and dimension
    return {
        "HPA": hpa(mu, ref, groups),
        "margin HPA": hpa(mu, ref, groups, margin=0.5),
        "PLCC": plcc(mu, ref),
        "SRCC": srcc(mu, ref),
        "mean std": float(stats.std.mean()),
    }


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
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(args.seed)
    d = len(DIMENSIONS)
    mix = torch.linalg.qr(torch.randn(args.feat_dim, args.feat_dim, generator=gen))[0][:d]
    train = _world(args.items, args.feat_dim, gen, mix, args.group)
    test = _world(args.test_items, args.feat_dim, gen, mix, args.group)
    print(f"zreward demo on {device} | train items {args.items} x {d} dimensions, test items {args.test_items}, "
          f"groups of {args.group}, {args.steps} steps")
    t0 = time.perf_counter()
    results = {}
    for method in ("sft", "sft+pair", "risd"):
        head, curve = _train(method, train, args.feat_dim, args.steps, device, args.seed, max(args.steps // 4, 1))
        res = _evaluate(head, test, device)
        res["loss curve"] = curve
        results[method] = res
    print()
    print("| head trained with | test HPA | margin HPA | PLCC | SRCC | mean std | loss (first -> last) |")
    print("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        c = r["loss curve"]
        print(f"| {method} | {r['HPA']:.4f} | {r['margin HPA']:.4f} | {r['PLCC']:.4f} | {r['SRCC']:.4f} | "
              f"{r['mean std']:.3f} | {c[0][1]:.3f} -> {c[-1][1]:.3f} |")

    # GDSO on sampled groups: G noisy samples per side from the RISD head's logits
    g = 8
    p = min(64, args.test_items // 2)
    with torch.no_grad():
        base = head(test["feats"][: 2 * p].to(device)).view(p, 2, 1, d, len(BIN_VALUES))[:, :, :, 0]
    samples = base + torch.randn(p, 2, g, len(BIN_VALUES), generator=gen).to(device)
    ref_scores = _snap(test["reference"][: 2 * p, 0].view(p, 2)).to(device)
    out = gdso_loss(samples.requires_grad_(True), ref_scores)
    out.loss.backward()
    print()
    print(f"gdso_loss on {p} pairs x 2 sides x G={g}: loss {float(out.loss.detach()):.4f} (ce {float(out.ce.mean()):.4f}, "
          f"pw {float(out.pw.mean()):.4f}); reward mean {float(out.reward.mean()):.4f}, "
          f"advantage mean {float(out.advantage.mean()):+.2e} std {float(out.advantage.std()):.3f}")

    print()
    print(f"forward+backward time per call on {device} ({args.op_rows} rows; ms):")
    print("| op | reference (eager) | fused Triton / compiled op |")
    print("|---|---|---|")
    for name, ref_ms, fused_ms in _op_table(device, args.op_rows, gen):
        fused = f"{fused_ms:.3f}" if fused_ms is not None else "n/a (Triton needs CUDA)"
        print(f"| {name} | {ref_ms:.3f} | {fused} |")
    print()
    print(f"backends used: {backend_info()['last_backend']}; total {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _load_scorer(args):
    from .model import ZRewardModel
    from .scorer import RewardScorer

    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model!r} is not a directory (a ZRewardModel saved with save_pretrained)")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = ZRewardModel.from_pretrained(args.model, device=device)
    return RewardScorer(model, batch_size=args.batch_size)


def score_cmd(args) -> int:
    from PIL import Image

    prompts = args.prompt
    if len(prompts) == 1 and len(args.images) > 1:
        prompts = prompts * len(args.images)
    if len(prompts) != len(args.images):
        raise SystemExit(f"give one --prompt, or one per image ({len(args.images)}), got {len(prompts)}")
    pics = []
    for path in args.images:
        if not os.path.exists(path):
            raise SystemExit(f"image not found: {path}")
        with Image.open(path) as im:
            pics.append(im.convert("RGB"))
    scorer = _load_scorer(args)
    out = scorer.score(pics, prompts, args.dimensions)
    rows = []
    for i, path in enumerate(args.images):
        row = {"image": path, "prompt": prompts[i], "reward": float(out.reward[i])}
        for j, d in enumerate(out.dimensions):
            row[d] = {"mean": float(out.mean[i, j]), "std": float(out.std[i, j]),
                      "probs": [round(float(x), 6) for x in out.probs[i, j]]}
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| image | reward | " + " | ".join(f"{d} (mean +- std)" for d in out.dimensions) + " |")
        print("|---|---|" + "---|" * len(out.dimensions))
        for r in rows:
            cells = " | ".join(f"{r[d]['mean']:.3f} +- {r[d]['std']:.3f}" for d in out.dimensions)
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

    cfg = TrainConfig.from_file(args.config, method=args.method)
    last = train(cfg, resume=args.resume)
    print(json.dumps(last, indent=2))
    return 0


def info(_args) -> int:
    print(json.dumps(backend_info(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zreward", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the main job on the embedded default data")
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--test-items", type=int, default=1024)
    p.add_argument("--group", type=int, default=4, help="candidates per prompt")
    p.add_argument("--feat-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--op-rows", type=int, default=16384)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results table as JSON")
    p.set_defaults(fn=demo)
    p = sub.add_parser("info", help="print which kernel backends are available")
    p.set_defaults(fn=info)
    p = sub.add_parser("train", help="train a reward model (sft, risd; gdso, grpo, opd planned)")
    p.add_argument("method", help="sft | risd | gdso | grpo | opd (overrides the config's method)")
    p.add_argument("--config", required=True, help="JSON config (see zreward.train.config for every key)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.set_defaults(fn=train_cmd)
    for name, fn, helptext in (("score", score_cmd, "score images against a prompt with a saved reward model"),
                               ("eval", eval_cmd, "evaluate a saved reward model on a JSONL manifest")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="directory written by ZRewardModel.save_pretrained")
        p.add_argument("--device", default="auto")
        p.add_argument("--batch-size", type=int, default=16)
        if name == "score":
            p.add_argument("images", nargs="+", help="image files")
            p.add_argument("--prompt", action="append", required=True, help="the prompt (once, or once per image)")
            p.add_argument("--dimensions", nargs="+", default=None)
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            p.add_argument("--manifest", required=True, help="JSONL manifest (see zreward.data)")
            p.add_argument("--out", required=True, help="folder for metrics.json, predictions.jsonl and plots")
            p.add_argument("--no-plots", action="store_true")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    return args.fn(args)
