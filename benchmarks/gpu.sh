#!/usr/bin/env bash
# The one GPU entry point, built around a lent GPU machine's budget (15 min in all, 10 min per
# command; BENCHMARKS.md "GPU runs" says how to call it): one global deadline counted from the
# start, phases in order of value, each limited by the time left and stopped with SIGINT (then
# SIGKILL after a grace period) so pytest and pytest-benchmark write what they measured, the
# report rewritten after every phase, a short summary printed last.
#
#   OUT=$OUT GPU_DEADLINE=540 bash benchmarks/gpu.sh       on the GPU machine (device tool)
#   PHASES=compile GPU_DEADLINE=200 bash benchmarks/gpu.sh  torch.compile baselines: a 2nd call
#   QUICK=1 bash benchmarks/gpu.sh                          the suite's tiny cases (runs on CPU)
#
# Phases, in this order (PHASES="a,b" picks; default: build wheel tests first-call kernels e2e),
# with caps in s:
#   build      150  carried wheels (.whl/, fastdiff's aside) into /tmp/site; pip install -e .:
#                   on a torch older than setup.py MIN_BUILD_TORCH (the machine's 2.11) with the
#                   carried fastdiff wheel's extension, else compiled against the machine's torch
#                   (no .git there: pass FASTDIFF_GIT_COMMIT)
#   wheel      120  the fastdiff wheel built
#                   elsewhere (GPU_WHEEL, default the carried .whl/fastdiff-*.whl: `make wheel`
#                   here, against another torch) installed alone into a fresh folder and pytest
#                   -m cuda of a copy of tests/ run against it with FASTDIFF_PREBUILT=require:
#                   the stable-ABI extension and its cubins on the machine's torch (issue 17)
#   tests      170  pytest -m cuda on the Triton JIT path (FASTDIFF_PREBUILT=0)
#   tests-prebuilt 120  only when named: pytest -m cuda with FASTDIFF_PREBUILT=require (the
#                   wheel phase covers it with the wheel's own cubins): the cubins carried in
#                   kernels/cubins (FASTDIFF_CUDA_ARCHS=90 make prebuilt, here), else compiled
#                   there for the device's arch first
#   first-call  75  benchmarks/test_first_call.py: first call, first image, prebuilt vs JIT
#   kernels     75  benchmarks/test_kernels.py at SD1.5 shapes, fp16: fastdiff vs eager / SDPA
#   e2e        240  benchmarks/test_e2e.py: SD1.5 U-Net 512x512, CFG 7.5, DDIM 50, batch 1 then
#                   4: diffusers eager, fastdiff.accelerate, the engine
#   steps       90  only when named (PHASES=default,steps): benchmarks/test_steps.py on CUDA,
#                   fp16: each scheduler family's fused step vs diffusers' step + CFG (issue 14)
#   tune       150  only when named (PHASES=default,tune): benchmarks/tune.py, launch-parameter
#                   sweeps of attention and group_norm_silu against SDPA / eager (tune.json)
#   kernels-compile 150, e2e-compile 400   (PHASES=compile: build + these) torch.compile
#                   baselines, with eager / diffusers and the engine timed in the same run
# A phase gets min(cap, time left - GPU_GRACE - GPU_REPORT_S) and is skipped, with a line
# saying so, when that is under GPU_MIN_PHASE. So the script ends by the deadline.
#
# Environment: OUT (default bench-results/gpu-<time>), GPU_DEADLINE (540), GPU_GRACE (15),
# GPU_REPORT_S (10, kept for the last report), GPU_MIN_PHASE (20), GPU_CAPS ("e2e=300,tests=60"),
# GPU_SKIP_BUILD=1 (the package is installed already), GPU_TEST_PATHS (the tests phase's test
# files, default tests: a rerun can pick up where a cut phase stopped), GPU_SLOW_PHASE=<phase> (that phase's
# pytest sleeps after its first test: tests/test_gpu_script.py), QUICK=1, PYTHON (python3).
# $OUT gets at most 8 files: log (all of stdout), tests.log and bench.log (the pytest output of
# the test and benchmark phases, tune's too), prebuild.jsonl (when cubins are compiled there),
# results.json, results.md, chart.png, tune.json (the tune phase). Raw pytest-benchmark JSON stays in a temporary folder outside $OUT.
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
DEADLINE=${GPU_DEADLINE:-540}
GRACE=${GPU_GRACE:-15}
REPORT_S=${GPU_REPORT_S:-10}
MIN_PHASE=${GPU_MIN_PHASE:-20}
QUICK=${QUICK:-0}
export PY=${PYTHON:-python3} SITE=${GPU_SITE:-/tmp/site} PYTHONUNBUFFERED=1
export OUT=${OUT:-bench-results/gpu-$(date +%Y%m%d-%H%M%S)}
export FASTDIFF_GIT_COMMIT=${FASTDIFF_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT" || exit 1
rm -f "$OUT"/{log,tests.log,bench.log,prebuild.jsonl,results.json,results.md,chart.png}
RAW=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-gpu.XXXXXX") || exit 1
exec > >(tee "$OUT/log") 2>&1
tee_pid=$!
trap 'rm -rf "$RAW"; exec >&- 2>&-; wait "$tee_pid" 2>/dev/null' EXIT

declare -A CAP=([build]=150 [wheel]=120 [tests]=170 [tests-prebuilt]=120 [first-call]=75 [kernels]=75 [e2e]=240
                [steps]=90 [tune]=150 [kernels-compile]=150 [e2e-compile]=400)
ORDER="build wheel tests tests-prebuilt first-call kernels e2e steps tune kernels-compile e2e-compile"
caps=${GPU_CAPS:-}
for kv in ${caps//,/ }; do
  [ -n "${CAP[${kv%%=*}]+x}" ] || { echo "GPU_CAPS: no phase '${kv%%=*}'"; exit 2; }
  CAP[${kv%%=*}]=${kv#*=}
done
want=" "
phases=${PHASES:-default}
for p in ${phases//,/ }; do
  case $p in
    default) want+="build wheel tests first-call kernels e2e " ;;
    compile) want+="build kernels-compile e2e-compile " ;;
    all) want+="$ORDER " ;;
    *) [ -n "${CAP[$p]+x}" ] || { echo "PHASES: no phase '$p' (phases: $ORDER)"; exit 2; }
       want+="$p " ;;
  esac
done
[ "${GPU_SKIP_BUILD:-0}" = 1 ] && want=${want// build / }
selected=()
for p in $ORDER; do [[ $want == *" $p "* ]] && selected+=("$p"); done

quick=()
[ "$QUICK" = 1 ] && quick=(--bench-quick)
echo "fastdiff gpu.sh: phases ${selected[*]}; deadline ${DEADLINE} s, grace ${GRACE} s;" \
     "commit $FASTDIFF_GIT_COMMIT; OUT=$OUT$( [ "$QUICK" = 1 ] && echo "; QUICK cases")"

stop=""     # why the remaining phases are skipped
cur=""      # the running phase's timeout process
on_signal() { stop="interrupted"; [ -n "$cur" ] && kill -INT "$cur" 2>/dev/null; }
trap on_signal INT TERM

record() {  # record PHASE STATUS SECONDS LIMIT EXIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$RAW/phases.tsv"
  echo "-- $1: $2 after $3 s${6:+ ($6)}"
}

report() {  # rewrites results.json / results.md / chart.png in $OUT
  local args=("$RAW" "$OUT" --deadline "$DEADLINE")
  [ "$QUICK" = 1 ] && args+=(--quick)
  timeout -k 5 60 "$PY" benchmarks/gpu_report.py "${args[@]}" "$@" || echo "(report failed)"
}

# run_phase NAME LOG COMMAND...: COMMAND under the phase's limit; LOG (in $OUT) gets its output,
# or stdout when LOG is "-". Returns 1 when the phase did not run.
run_phase() {
  local name=$1 log=$2; shift 2
  local now left limit cap=${CAP[$name]} rc secs status note=""
  now=$(date +%s)
  left=$(( start + DEADLINE - now - GRACE - REPORT_S ))
  limit=$(( cap < left ? cap : left ))
  if [ -n "$stop" ]; then
    record "$name" skipped 0 "" "" "$stop"; return 1
  elif (( limit < MIN_PHASE )); then
    record "$name" skipped 0 "" "" "too little time left: $(( left > 0 ? left : 0 )) s"
    return 1
  fi
  echo "== $name: limit $limit s ($(( now - start )) s of $DEADLINE s gone)"
  local envs=(FASTDIFF_PHASE_STATUS="$RAW/$name.status.json"
              FASTDIFF_PHASE_PARTIAL="$RAW/$name.partial.json")
  [ "${GPU_SLOW_PHASE:-}" = "$name" ] && envs+=(FASTDIFF_PHASE_SLOW=1)
  if [ "$log" = - ]; then
    env "${envs[@]}" timeout -s INT -k "$GRACE" "$limit" "$@" &
  else
    echo "==== $name ($(date -u +%H:%M:%S))" >> "$OUT/$log"
    env "${envs[@]}" timeout -s INT -k "$GRACE" "$limit" "$@" >> "$OUT/$log" 2>&1 &
  fi
  cur=$!
  while :; do   # wait returns early when this script is signalled; on_signal passes it on
    wait "$cur"; rc=$?
    kill -0 "$cur" 2>/dev/null || break
  done
  cur=""
  secs=$(( $(date +%s) - now ))
  case $rc in
    0) status=ok ;;
    5) status=ok; note="no tests selected" ;;
    124) status=cut
         if [ "$limit" = "$cap" ]; then note="at its $cap s cap"; else note="at the deadline"; fi ;;
    137) status=cut; note="killed $GRACE s after SIGINT: results up to its last finished test" ;;
    1) status=failed; note="tests failed" ;;
    *) status=failed; note="exit $rc" ;;
  esac
  [ "$stop" = interrupted ] && { status=cut; note="interrupted"; }
  if [ "$log" != - ]; then   # the outcome: failures and pytest's last line
    sed -n '/^==== '"$name"' /,$p' "$OUT/$log" | grep -E '^(FAILED|ERROR) ' | head -n 10
    tail -n 1 "$OUT/$log"
  fi
  record "$name" "$status" "$secs" "$limit" "$rc" "$note"
  [ "$name" != "${selected[-1]}" ] && report
  return 0
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p benchmarks.gpu_plugin)
bench_phase() {  # bench_phase NAME TEST_FILE [pytest args]
  local name=$1 file=$2; shift 2
  run_phase "$name" bench.log "${PYTEST[@]}" "${quick[@]}" --benchmark-json "$RAW/$name.json" \
    --benchmark-columns=median,rounds "$file" "$@"
}

probe() {  # the device and the versions (env.json); ARCH: the GPU's sm version, or empty
  ARCH=$(timeout 120 "$PY" - "$RAW/env.json" <<'PY'
import json, sys

import torch

sys.path.insert(0, "benchmarks")
try:
    import fastdiff  # noqa: F401
    import report
except Exception as err:          # noqa: BLE001 - reported; the phases are skipped
    sys.exit(f"fastdiff does not import: {err}")
env = report.environment()
json.dump(env, open(sys.argv[1], "w"))
print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}",
      file=sys.stderr)
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(major * 10 + minor)
PY
  ) || stop="fastdiff does not import"
  export ARCH
}

for name in "${selected[@]}"; do
  # The wheel phase imports its own fastdiff (the wheel's), not this tree's.
  [ "$name" != build ] && [ "$name" != wheel ] && [ -z "${ARCH+x}" ] && [ -z "$stop" ] && probe
  case $name in
    build)
      run_phase build - bash -c '
        set -e
        deps=$(ls .whl/*.whl 2>/dev/null | grep -v "/fastdiff-" || true)
        if [ -n "$deps" ]; then
          echo "installing $(echo "$deps" | wc -l) carried wheels into $SITE"
          "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" $deps
        fi
        # A torch older than setup.py MIN_BUILD_TORCH (the machine has 2.11): its headers build
        # an extension that crashes, so the carried wheel'"'"'s (make wheel, here) is installed.
        export FASTDIFF_EXTENSION=$("$PY" - .whl <<"PY"
import glob, os, re, sys, tempfile, zipfile
import torch
need = tuple(map(int, re.search(r"^MIN_BUILD_TORCH = \((\d+), (\d+)\)",
                                open("setup.py").read(), re.M).groups()))
have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
wheels = sorted(glob.glob(os.path.join(sys.argv[1], "fastdiff-*.whl")))
if have < need and wheels:
    path = os.path.join(tempfile.mkdtemp(), "_C.abi3.so")
    with open(path, "wb") as f:
        f.write(zipfile.ZipFile(wheels[0]).read("fastdiff/_C.abi3.so"))
    print(f"torch {torch.__version__} < {need}: the extension of {wheels[0]}", file=sys.stderr)
    print(path)
PY
)
        echo "installing fastdiff on torch $("$PY" -c "import torch; print(torch.__version__)")" \
             "${FASTDIFF_EXTENSION:+with the carried extension}"
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
        ls .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
        "$PY" -c "import diffusers, transformers as t; print(\"diffusers\", diffusers.__version__,
                  \"transformers\", t.__version__)" || echo "diffusers does not import: e2e skips"'
      if awk -F'\t' '$1 == "build" && $2 == "ok" {ok = 1} END {exit !ok}' "$RAW/phases.tsv"
      then   # the phases after it import the carried wheels
        ls .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
      else
        stop="the build failed"
      fi ;;
    wheel)
      run_phase wheel tests.log bash -c '
        whl=${GPU_WHEEL:-$(ls .whl/fastdiff-*.whl 2>/dev/null | head -n 1)}
        [ -n "$whl" ] && [ -f "$whl" ] \
          || { echo "no fastdiff wheel to test (GPU_WHEEL, or make wheel here and carry .whl/)"; exit 3; }
        site=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-wheel.XXXXXX") || exit 3
        work=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-wheel-tests.XXXXXX") || exit 3
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$whl" || exit 3
        cp -r tests benchmarks pyproject.toml "$work"/ && cd "$work" || exit 3
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
        "$PY" -c "import torch, fastdiff; print(\"the wheel\", fastdiff.__file__, \"on torch\",
                  torch.__version__)" || { echo "the wheel does not import"; exit 3; }
        FASTDIFF_PREBUILT=require exec "$@" -m cuda --maxfail=50 tests' _ "${PYTEST[@]}" ;;
    tests)
      # shellcheck disable=SC2086  # GPU_TEST_PATHS: a list of test files (default: tests)
      run_phase tests tests.log env FASTDIFF_PREBUILT=0 "${PYTEST[@]}" -m cuda --maxfail=50 \
        ${GPU_TEST_PATHS:-tests} ;;
    tests-prebuilt)
      run_phase tests-prebuilt tests.log bash -c '
        m=kernels/cubins/manifest.json
        if [ -n "$ARCH" ] && [ -f $m ] && "$PY" -c "import json, sys
sys.exit(int(sys.argv[1]) not in json.load(open(sys.argv[2]))[\"archs\"])" "$ARCH" $m; then
          echo "prebuilt kernels: the carried kernels/cubins (sm_$ARCH)"
        elif [ -n "$ARCH" ]; then
          echo "prebuilt kernels: compiling for sm_$ARCH into kernels/cubins (log: prebuild.jsonl)"
          env -u TRITON_INTERPRET "$PY" -m fastdiff.kernels.prebuild --arch "$ARCH" \
            --emit kernels/cubins --jobs "$(nproc)" > "$OUT/prebuild.jsonl" \
            || { echo "compiling the prebuilt kernels failed: see prebuild.jsonl"; exit 3; }
        else
          echo "no GPU: no prebuilt kernels"
        fi
        FASTDIFF_PREBUILT=require exec "$@" -m cuda --maxfail=50 tests' _ "${PYTEST[@]}" ;;
    first-call)
      bench_phase first-call benchmarks/test_first_call.py ;;
    kernels)
      k="sd15 and not compile"; [ "$QUICK" = 1 ] && k="not compile"
      bench_phase kernels benchmarks/test_kernels.py -k "$k" ;;
    e2e)
      bench_phase e2e benchmarks/test_e2e.py -k "not compile" ;;
    steps)
      k="cuda and step-"; [ "$QUICK" = 1 ] && k="cpu and step- and (DDIM or PNDM)"
      bench_phase steps benchmarks/test_steps.py -k "$k" ;;
    tune)   # SIGINT at the limit: tune.py writes tune.json with what it timed
      run_phase tune bench.log "$PY" benchmarks/tune.py --out "$OUT/tune.json" \
        --budget $(( ${CAP[tune]} - 10 )) $( [ "$QUICK" = 1 ] && echo --dry ) ;;
    kernels-compile)
      k=sd15; [ "$QUICK" = 1 ] && k=""
      bench_phase kernels-compile benchmarks/test_kernels.py ${k:+-k "$k"} ;;
    e2e-compile)
      bench_phase e2e-compile benchmarks/test_e2e.py -k "not accelerate" ;;
  esac
done

report --summary
echo "total: $(( $(date +%s) - start )) s of the $DEADLINE s deadline"
[ "$stop" = interrupted ] && exit 130
exit 0
