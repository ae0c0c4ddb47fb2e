"""The benchmark suites run in CI too, once each at their smallest sizes: `pytest bench/` is what users
run, and nothing else here executes its code (the full runs happen on the lent GPU machines, where a
broken benchmark costs scarce device time).  ``--benchmark-disable`` runs every benchmarked function
once as a plain test; ``ZREWARD_BENCH_QUICK=1`` keeps the smallest sizes (about a minute on 2 cores)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmarks_run_once_each_at_smallest_sizes():
    env = dict(os.environ, ZREWARD_BENCH_QUICK="1")
    env.pop("TRITON_INTERPRET", None)  # as a user's shell has it: the bench suite skips Triton on CPU itself
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-disable"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 40, tail  # a collection that silently shrank would pass too
