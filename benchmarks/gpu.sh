#!/usr/bin/env bash
# The one GPU entry point: build, CUDA tests, the benchmark suite; results under $OUT.
#
#   bash benchmarks/gpu.sh            on a lent GPU machine (torch, triton, nvcc there; no
#                                     internet): wheels for what is missing are carried in .whl/
#   QUICK=1 bash benchmarks/gpu.sh    the same steps with the suite's quick cases (tries it on CPU)
#
# Writes $OUT (default bench-results/gpu-<time>): log, tests.log, results.json (device, torch,
# triton and CUDA versions, git commit, every raw timing), results.md, chart.png. Phases run
# cheapest first, each under its own time limit, so a slow torch.compile cannot cost the rest:
# total well under 10 minutes. A summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu-$(date +%Y%m%d-%H%M%S)}
# no .git on the GPU machine: pass the commit measured (FASTDIFF_GIT_COMMIT=$(git rev-parse HEAD))
export FASTDIFF_GIT_COMMIT=${FASTDIFF_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log") 2>&1
start=$(date +%s)
phase() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  phase "installing carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
phase "building fastdiff against torch $("$PY" -c 'import torch; print(torch.__version__)')"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
"$PY" -c "import fastdiff, torch; print('fastdiff', fastdiff.__version__, 'cuda', torch.cuda.is_available())"

arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(M * 10 + m)" 2>/dev/null)
if [ -n "$arch" ]; then
  phase "prebuilt kernels for sm_$arch (as the wheel carries them) into kernels/cubins"
  env -u TRITON_INTERPRET "$PY" -m fastdiff.kernels.aot --arch "$arch" --emit kernels/cubins \
    --jobs "$(nproc)" > "$OUT/aot.jsonl" || echo "AOT compile failed: see $OUT/aot.jsonl"
  "$PY" -m fastdiff info
fi

quick=""
[ "${QUICK:-0}" = 1 ] && quick="--bench-quick"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  phase "CUDA tests"
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests -m cuda -x 2>&1 | tee "$OUT/tests.log" | tail -5
  phase "CUDA tests, prebuilt kernels required (FASTDIFF_AOT=require)"
  FASTDIFF_AOT=require timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests -m cuda 2>&1 \
    | tee "$OUT/tests-aot.log" | tail -5
else
  echo "no GPU: the CUDA tests are skipped; the suite runs its CPU paths"
fi

bench() {  # bench NAME LIMIT_S pytest-args...
  local name=$1 limit=$2; shift 2
  phase "suite: $name (limit ${limit}s)"
  timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider $quick \
    --benchmark-json "$OUT/raw-$name.json" --benchmark-columns=median,rounds "$@" | tail -3
}
bench first-call 150 benchmarks/test_first_call.py
bench kernels 150 benchmarks/test_kernels.py -k "not compile"
bench e2e 150 benchmarks/test_e2e.py -k "not compile"
bench kernels-compile 120 benchmarks/test_kernels.py -k "compile"
bench e2e-compile 150 benchmarks/test_e2e.py -k "compile"

phase "report"
"$PY" - "$OUT" <<'PY'
import glob, json, sys
from fastdiff import bench
out = sys.argv[1]
raws = []
for p in sorted(glob.glob(f"{out}/raw-*.json")):
    try:
        raws.append(bench.load_raw(p))
    except ValueError:                 # empty: that phase ran nothing or hit its time limit
        print(f"(no results in {p})")
if not raws:
    sys.exit("no benchmark results")
merged = dict(raws[0], benchmarks=[b for r in raws for b in r["benchmarks"]])
env = merged.get("fastdiff_env") or bench.environment()
md, _ = bench.write_results(merged, out, f"fastdiff bench on {env['device']}")
print(f"\n{env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
      f"commit {env['git_commit']}\n\n{md}")
PY
phase "done: $OUT"
