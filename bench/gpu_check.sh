#!/usr/bin/env bash
# One-shot GPU check for the whole package: every GPU test and every GPU benchmark.
# Run on a CUDA machine from the repository root:  OUT=/some/dir bash bench/gpu_check.sh
# It uses the machine's own python3 (torch, triton, transformers, accelerate, pytest-benchmark are
# preinstalled on the lent GPU machines); wheels under .whl/ (if any) are installed to /tmp/site
# first -- carry liger-kernel that way (the device README says how):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl liger-kernel==0.8.5
# Results land in $OUT: env.txt, build.log, tests.log, tune.md/tune.json/kernel_configs.json, profile.txt, bench.json,
# bench.log, summary.md.  STEPS picks the steps (default: "tests tune profile bench"; the build always
# runs); TEST_TIMEOUT, TUNE_TIMEOUT, BENCH_TIMEOUT (seconds) bound them -- keep their sum under the
# device's per-command limit.
set -u
STEPS=${STEPS:-"tests tune profile bench"}
has_step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
OUT=${OUT:-/tmp/zreward_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

echo "== build the compiled extension (csrc/)"
( time $PY setup.py build_ext --inplace ) >"$OUT/build.log" 2>&1
echo "build exit: $?" | tee -a "$OUT/build.log"
tail -n 4 "$OUT/build.log"
$PY -c "import zreward_kernels as z; print(z.backend_info()['compiled_extension'])" 2>&1 | tee -a "$OUT/build.log"

if has_step tests; then
  XDIST=""
  $PY -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_WORKERS:-6}"
  echo "== tests ($XDIST)"
  timeout "${TEST_TIMEOUT:-240}" $PY -m pytest tests -q -rs $XDIST -p no:cacheprovider >"$OUT/tests.log" 2>&1
  echo "tests exit: $?" | tee -a "$OUT/tests.log"
  tail -n 25 "$OUT/tests.log"
fi

if has_step tune; then
  echo "== launch-configuration sweep (bench/tune_kernels.py)"
  timeout "${TUNE_TIMEOUT:-200}" $PY bench/tune_kernels.py --json "$OUT/tune.json" \
    --write-config "$OUT/kernel_configs.json" >"$OUT/tune.md" 2>&1
  echo "tune exit: $?" | tee -a "$OUT/tune.md"
  grep -A4 "^###" "$OUT/tune.md" | head -n 60
fi

if has_step profile; then
  echo "== per-kernel device time (bench/profile_kernels.py)"
  timeout 90 $PY bench/profile_kernels.py >"$OUT/profile.txt" 2>&1
  echo "profile exit: $?" | tee -a "$OUT/profile.txt"
  cat "$OUT/profile.txt"
fi

if has_step bench; then
  echo "== benchmarks"
  timeout "${BENCH_TIMEOUT:-300}" $PY -m pytest bench --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds >"$OUT/bench.log" 2>&1
  echo "bench exit: $?" | tee -a "$OUT/bench.log"
  tail -n 5 "$OUT/bench.log"
fi
if [ -f "$OUT/bench.json" ]; then
  $PY bench/summarize.py "$OUT/bench.json" --title "Fused kernels on $($PY -c 'import torch; print(torch.cuda.get_device_name(0))')" \
    >"$OUT/summary.md" && cat "$OUT/summary.md"
fi
