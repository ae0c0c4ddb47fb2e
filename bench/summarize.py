"""Turn a pytest-benchmark JSON file into the markdown tables committed under bench/results/.

Usage: python bench/summarize.py BENCH.json [--title TEXT] > bench/results/NAME.md
Times are medians in milliseconds; "vs eager" / "vs compile" are speed-ups of the fused path.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _fmt_ms(v):
    return "-" if v is None else (f"{v:.4f}" if v < 0.1 else f"{v:.3f}")


def _fmt_mb(v):
    return "-" if v is None else f"{v / 2**20:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    data = json.load(open(args.json_file))
    table = defaultdict(dict)
    devices = set()
    torch_versions = set()
    launch = []
    adv = defaultdict(dict)
    head = defaultdict(dict)
    ce = defaultdict(dict)
    scorer = {}
    for b in data["benchmarks"]:
        ei = b.get("extra_info", {})
        if ei.get("op") == "scorer":
            devices.add(ei.get("device_name", "?"))
            torch_versions.add(ei.get("torch", "?"))
            scorer[ei["impl"]] = (ei["images_per_s"], b["stats"]["median"] * 1e3, ei["images"])
            continue
        if ei.get("op") == "score_token_ce":
            devices.add(ei.get("device_name", "?"))
            ce[ei["n"]][ei["impl"]] = (b["stats"]["median"] * 1e3, ei.get("peak_mem_bytes"))
            continue
        if ei.get("op") == "restricted_head":
            devices.add(ei.get("device_name", "?"))
            # the gradient of the hidden states is the backward's requested output, the same for both paths
            grad = ei["n"] * ei["h"] * (4 if ei["dtype"].endswith("float32") else 2) if ei["mode"] == "fwd+bwd" else 0
            per_call = b["stats"]["median"] * 1e3 / ei.get("calls_per_call", 1)  # back-to-back replays: per replay
            head[(ei["mode"], ei["n"])][ei["impl"]] = (per_call, ei.get("peak_mem_bytes"), grad)
            continue
        if ei.get("op") == "group_advantage":
            devices.add(ei.get("device_name", "?"))
            torch_versions.add(ei.get("torch", "?"))
            adv[(ei["groups"], ei["m"])][ei["impl"]] = b["stats"]["median"] * 1e3
            continue
        if "what" in ei:
            launch.append((ei["what"], b["stats"]["median"] / ei["calls_per_round"] * 1e6))
            devices.add(ei.get("device_name", "?"))
            if "torch" in ei:
                torch_versions.add(ei["torch"])
        if "op" not in ei:
            continue
        devices.add(ei.get("device_name", "?"))
        torch_versions.add(ei.get("torch", "?"))
        mode = ei.get("mode", "per call")
        table[(ei["op"], ei["rows"], mode)][ei["impl"]] = dict(
            ms=b["stats"]["median"] * 1e3 / ei.get("calls_per_call", 1), mem=ei.get("peak_mem_bytes"),
            kf=ei.get("kernels_fwd"), kb=ei.get("kernels_bwd"),
        )
    title = args.title or "Benchmark results"
    print(f"# {title}\n")
    print(f"Device: {', '.join(sorted(devices))}; torch {', '.join(sorted(torch_versions))}; "
          f"pytest-benchmark {data.get('version', '?')}; {data.get('datetime', '')}\n")
    if table:
        print("Forward+backward per call, median ms; peak extra memory of one call in MiB; "
              "kernel launches forward/backward (CUDA only). Modes: per call (eager Python, a sync after each "
              "call); cuda-graph (the call captured once, each replay followed by a sync); cuda-graph x20 (20 "
              "replays back to back, one sync, time per replay).\n")
        print("| op | rows | mode | eager ms | compile ms | fused ms | fused vs eager | fused vs compile "
              "| eager MiB | compile MiB | fused MiB | launches eager | launches compile | launches fused |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (op, rows, mode) in sorted(table, key=lambda k: (k[0], k[2], k[1])):
            r = table[(op, rows, mode)]
            e, c, f = r.get("eager", {}), r.get("compile", {}), r.get("fused", {})
            sp_e = f"{e['ms'] / f['ms']:.1f}x" if e and f else "-"
            sp_c = f"{c['ms'] / f['ms']:.1f}x" if c and f else "-"

            def launches(d):
                return f"{d['kf']}/{d['kb']}" if d and d.get("kf") is not None else "-"

            print(f"| {op} | {rows} | {mode} | {_fmt_ms(e.get('ms'))} | {_fmt_ms(c.get('ms'))} | {_fmt_ms(f.get('ms'))} | "
                  f"{sp_e} | {sp_c} | {_fmt_mb(e.get('mem'))} | {_fmt_mb(c.get('mem'))} | {_fmt_mb(f.get('mem'))} | "
                  f"{launches(e)} | {launches(c)} | {launches(f)} |")

    if adv:
        print("\n## group_advantage\n")
        print("Median ms per call; speed-ups of the compiled op. verl_loop = verl's per-group Python loop "
              "(CPU only, M <= 16384 and the goal point M = 2^20 in groups of 16); TRL = TRL GRPOTrainer's "
              "grouped mean/std + repeat_interleave (fixed groups); group_ids = the compiled op given one label per "
              "sample in shuffled order (sorted into groups, the advantages scattered back); uid strings = the same labels "
              "as 32-hex-digit strings in a numpy object array (verl's index).\n")
        # the other CUDA segment kernel, if timed: KERNEL=1 (the default is 2 since the 2026-11-27 sweep);
        # result files of earlier runs timed KERNEL=2 next to the then default 1
        alt = next((k for k in ("compiled_kernel1", "compiled_kernel2") if any(k in r for r in adv.values())), None)
        k2 = alt is not None
        ids = any("compiled_ids" in r for r in adv.values())  # group_ids in shuffled order (verl's index)
        uids = any("compiled_uids" in r for r in adv.values())  # the same as uid strings
        print("| groups | M | verl loop ms | TRL ms | vectorized ms | compiled ms | vs loop | vs TRL | vs vectorized |"
              + (f" kernel {alt[-1]} ms | kernel {alt[-1]} vs vectorized |" if k2 else "")
              + (" group_ids (shuffled) ms | group_ids vs loop |" if ids else "")
              + (" uid strings ms | uid strings vs loop |" if uids else ""))
        print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if k2 else "") + ("---|---|" if ids else "")
              + ("---|---|" if uids else ""))
        order = {"2": 0, "16": 1, "64": 2, "var": 3}

        def ratio(a, b, fmt):
            return format(a / b, fmt) + "x" if a and b else "-"

        for (grp, m) in sorted(adv, key=lambda k: (order.get(k[0], 9), k[1])):
            r = adv[(grp, m)]
            lo, tr, ve, co = r.get("verl_loop"), r.get("trl"), r.get("vectorized"), r.get("compiled")
            c2 = r.get(alt) if k2 else None
            extra = f" {_fmt_ms(c2)} | {ratio(ve, c2, '.1f')} |" if k2 else ""
            for present, key in ((ids, "compiled_ids"), (uids, "compiled_uids")):
                if present:
                    ci = r.get(key)
                    extra += f" {_fmt_ms(ci)} | {ratio(lo, ci, '.0f')} |"
            print(f"| {grp} | {m} | {_fmt_ms(lo)} | {_fmt_ms(tr)} | {_fmt_ms(ve)} | {_fmt_ms(co)} | "
                  f"{ratio(lo, co, '.0f')} | {ratio(tr, co, '.1f')} | {ratio(ve, co, '.1f')} |" + extra)

    if scorer:
        print("\n## Scorer (4 dimensions per image)\n")
        base = scorer.get("shared_prefix", (None,))[0]
        print("| path | images/s | ms per batch | shared prefix is |")
        print("|---|---|---|---|")
        for impl in ("shared_prefix", "shared_prefix_repeat", "independent", "generate_parse_8",
                     "reasoning_trace_256"):
            if impl in scorer:
                ips, ms, n = scorer[impl]
                rel = "-" if impl == "shared_prefix" or not base else f"{base / ips:.1f}x faster"
                print(f"| {impl} | {ips:.2f} | {ms:.1f} ({n} images) | {rel} |")

    if ce:
        print("\n## Training the score token: fwd+bwd into the hidden states (H = 3584, V = 152064)\n")
        print("Median ms / peak extra MiB of one call. Full-vocabulary CE (PyTorch) and Liger's fused linear CE "
              "normalise over all V tokens; restricted CE over the nine score bins.\n")
        print("| N | full-vocab CE ms | Liger FLCE ms | restricted CE ms | full-vocab MiB | Liger MiB | restricted MiB |")
        print("|---|---|---|---|---|---|---|")
        for n in sorted(ce):
            r = ce[n]
            cells = [_fmt_ms(r[i][0]) if i in r else "-" for i in ("full_vocab_ce", "liger_flce", "restricted_ce")]
            mems = [_fmt_mb(r[i][1]) if i in r else "-" for i in ("full_vocab_ce", "liger_flce", "restricted_ce")]
            print(f"| {n} | " + " | ".join(cells + mems) + " |")

    if head:
        print("\n## Vocab-restricted head (H = 3584, V = 152064, K = 9)\n")
        print("Median ms and peak extra memory (MiB) of one call; ratios full / restricted. \"beyond dH\" subtracts "
              "the hidden-state gradient (N x H), the output the backward is asked for, from both peaks.\n")
        print("\"restricted\" is the gather and matrix product (`restricted_fwd.KERNEL=0`), \"Triton\" the projection "
              "kernel (`KERNEL=1`, the default since 2026-11-28; CUDA only; fwd+bwd adds its hidden-state gradient "
              "kernel, fused with the statistics).\n")
        print("| mode | N | full head ms | restricted ms | time ratio | Triton ms | Triton time ratio | full MiB "
              "| restricted MiB | memory ratio | memory ratio beyond dH |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for (mode, n) in sorted(head, key=lambda k: (k[0], k[1])):
            r = head[(mode, n)]
            f, rr, rt = r.get("full_head"), r.get("restricted"), r.get("restricted_triton")
            tr = f"{f[0] / rr[0]:,.0f}x" if f and rr else "-"
            tt = f"{f[0] / rt[0]:,.0f}x" if f and rt else "-"
            mr = f"{f[1] / rr[1]:,.0f}x" if f and rr and rr[1] else "-"
            beyond = "-"
            if f and rr and f[1] is not None and rr[1] is not None and rr[1] - rr[2] > 0:
                beyond = f"{(f[1] - f[2]) / (rr[1] - rr[2]):,.0f}x" if mode == "fwd+bwd" else mr
            print(f"| {mode} | {n} | {_fmt_ms(f[0]) if f else '-'} | {_fmt_ms(rr[0]) if rr else '-'} | {tr} | "
                  f"{_fmt_ms(rt[0]) if rt else '-'} | {tt} | "
                  f"{_fmt_mb(f[1]) if f else '-'} | {_fmt_mb(rr[1]) if rr else '-'} | {mr} | {beyond} |")

    if launch:
        print("\nHost cost of one call (median over rounds of 200 calls, one sync per round), microseconds:\n")
        print("| call | us |")
        print("|---|---|")
        for what, us in launch:
            print(f"| {what} | {us:.1f} |")


if __name__ == "__main__":
    main()
