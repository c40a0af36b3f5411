#!/usr/bin/env bash
# One prepared run on a CUDA machine: the device tests, the GPU checks and every benchmark,
# each step under its own time limit, so that a hang costs one step and not the machine.
#
#   bash benchmarks/gpu.sh OUT [STEP ...]
#
# STEPs (default: all, in this order): env tests checks dense prefill decode generate train.
# Each step writes its JSON into a work folder ($ZOO_GPU_WORK, default /tmp/zoo-gpu), which
# outlives the run, so that the steps may be split over several runs on the same machine
# (delete it to start afresh).
# After the steps, OUT receives three files: gpu.json (every result found in the work folder
# and the targets, each marked as holding or not: benchmarks/gpu_summary.py), log.txt (the
# whole output) and tests.xml (the device tests' JUnit report, when that step ran).
#
# A step's limit in seconds can be changed with LIMIT_<step>=N (LIMIT_tests=300). Were every
# step to use its whole default limit, the run would take 17 minutes: where one call may run
# for 10 at most, run it in two, `env tests checks dense` (8 at most), then `prefill decode
# generate train` (9.5 at most), on the same machine. Training compiles three models, which
# takes minutes: it runs at 160m alone unless TRAIN_SIZES="160m 410m" asks for both.
# PYTHON chooses the interpreter (default python3). With --smoke the same steps run on the
# CPU at tiny sizes: that checks the plumbing, not the figures.
set -uo pipefail

usage="usage: bash benchmarks/gpu.sh OUT [--smoke] [STEP ...]  (steps: env tests checks dense prefill decode generate train)"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create the output folder $1" >&2; exit 2; }
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SMOKE=0
STEPS=()
ALL=(env tests checks dense prefill decode generate train)
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        env|tests|checks|dense|prefill|decode|generate|train) STEPS+=("$arg") ;;
        *) echo "unknown step '$arg'; $usage" >&2; exit 2 ;;
    esac
done
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${ALL[@]}")

PY=${PYTHON:-python3}
WORK=${ZOO_GPU_WORK:-/tmp/zoo-gpu}
mkdir -p "$WORK"
LOG="$OUT/log.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

say() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

earlier=$(cd "$WORK" && ls -- *.json 2>/dev/null | tr '\n' ' ')
[ -n "$earlier" ] && say "the work folder $WORK holds results of earlier runs, which the summary keeps unless a step here redoes them (delete the folder to start afresh): $earlier"

# What the library and its tests import; whatever is missing is installed (from wheels in
# .whl/ when the machine has no index to reach), and the run stops if that fails.
missing=$("$PY" - <<'EOF'
import importlib.util
needed = {"torch": "torch", "einops": "einops", "safetensors": "safetensors", "tokenizers": "tokenizers",
          "numpy": "numpy", "tqdm": "tqdm", "matplotlib": "matplotlib", "huggingface_hub": "huggingface_hub",
          "hypothesis": "hypothesis", "pytest": "pytest", "xdist": "pytest-xdist", "transformers": "transformers"}
print(" ".join(pip for module, pip in needed.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
    say "installing $missing"
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --find-links .whl $missing || { say "installing from .whl failed"; exit 1; }
    else
        "$PY" -m pip install -q $missing || { say "installing $missing failed"; exit 1; }
    fi
fi

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu DTYPE=float32 COMPILE=""
    SIZES=(tiny) SIZE_LIST=tiny BATCHES=2 SEQ=64 NEW=8 PROMPT=8 REPEATS=1 TRAIN_BATCH=2 TRAIN_SEQ=32
    TRAIN_SIZES=(tiny)
    CHECKS=(--device cpu --smoke --only precision,host_syncs)
    TEST_DEVICES=cpu TEST_SELECT=(-n 0 tests/test_precision.py)
else
    DEVICE=cuda DTYPE=bfloat16 COMPILE=--compile
    SIZES=(160m 410m) SIZE_LIST=160m BATCHES=8,64 SEQ=2048 NEW=256 PROMPT=128 REPEATS=3 TRAIN_BATCH=8 TRAIN_SEQ=2048
    read -r -a TRAIN_SIZES <<<"${TRAIN_SIZES:-160m}"
    CHECKS=(--device cuda)
    TEST_DEVICES=cuda TEST_SELECT=(-n 8 tests -k cuda)
fi

# run NAME LIMIT COMMAND...: the command under `timeout`, its output in the log, its exit
# status in the work folder. NAME is the step, or the step and a size (dense-160m); the
# step's LIMIT_ variable overrides LIMIT.
run() {
    local step=$1 limit=$2
    shift 2
    local var="LIMIT_${step%%-*}"
    limit=${!var:-$limit}
    say "step $step (limit ${limit}s): $*"
    local start=$SECONDS
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && say "step $step stopped at its limit of ${limit}s"
    say "step $step: rc $rc after $((SECONDS - start))s"
    echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit}" >"$WORK/rc-$step.json"
}

for step in "${STEPS[@]}"; do
    case "$step" in
    env)
        run env 30 "$PY" benchmarks/gpu_summary.py --environment "$WORK/env.json" ;;
    tests)
        ZOO_TEST_DEVICES=$TEST_DEVICES run tests 150 "$PY" -m pytest -q -p no:cacheprovider \
            --junitxml "$OUT/tests.xml" "${TEST_SELECT[@]}" ;;
    checks)
        run checks 120 "$PY" benchmarks/gpu_checks.py "${CHECKS[@]}" --out "$WORK/checks.json" ;;
    dense)
        for size in "${SIZES[@]}"; do
            preset=pythia-$size
            [ "$SMOKE" = 1 ] && preset=pythia-tiny
            run "dense-$size" 90 "$PY" benchmarks/dense_forward.py --preset "$preset" --device "$DEVICE" --dtype "$DTYPE" \
                $COMPILE --batch "${BATCHES%%,*}" --seq-len "$SEQ" --repeats 10 --warmup 3 \
                --out "$WORK/dense-$size.json"
        done ;;
    prefill)  # eager: at T = 2048 the kernels are large, and every slot bucket would compile anew
        run prefill 90 "$PY" benchmarks/inference.py --only prefill --sizes "$SIZE_LIST" --batch "$BATCHES" \
            --seq-len "$SEQ" --halting 0,0.5 --device "$DEVICE" --dtype "$DTYPE" --repeats "$REPEATS" \
            --out "$WORK/prefill.json" ;;
    decode)
        run decode 75 "$PY" benchmarks/inference.py --only decode --sizes "$SIZE_LIST" --batch "$BATCHES" \
            --prompt-len "$PROMPT" --new-tokens "$NEW" --device "$DEVICE" --dtype "$DTYPE" $COMPILE \
            --repeats "$REPEATS" --out "$WORK/decode.json" ;;
    generate)
        run generate 90 "$PY" benchmarks/inference.py --only generate --sizes "$SIZE_LIST" --batch "${BATCHES%%,*}" \
            --prompt-len "$PROMPT" --new-tokens "$NEW" --device "$DEVICE" --dtype "$DTYPE" $COMPILE \
            --hf-cache static --repeats "$REPEATS" --out "$WORK/generate.json" ;;
    train)
        for size in "${TRAIN_SIZES[@]}"; do
            bf16=--bf16
            [ "$SMOKE" = 1 ] && bf16=""
            run "train-$size" 300 "$PY" benchmarks/train_throughput.py --size "$size" --device "$DEVICE" $bf16 $COMPILE \
                --batch "$TRAIN_BATCH" --seq-len "$TRAIN_SEQ" --steps 10 --warmup 3 --peak-tflops 989 \
                --out "$WORK/train-$size.json"
        done ;;
    esac
done

junit=()
[ -f "$OUT/tests.xml" ] && junit=(--junit "$OUT/tests.xml")
"$PY" benchmarks/gpu_summary.py "$WORK" "${junit[@]}" --out "$OUT/gpu.json" 2>&1 | tee -a "$LOG"
