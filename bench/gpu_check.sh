#!/usr/bin/env bash
# The GPU check of issue 3 in one command, under 10 minutes on one H100/H200: kernel correctness, the
# gpu-marked tests, then our Engine against transformers' generate_batch on a random Llama-3-8B-shaped model,
# and the fused MoE kernel and our Engine on a random Mixtral-8x7B-shaped model (4 of its 32 layers).
# With --case gemma2-9b, a random Gemma-2-9B-shaped model instead (serving path vs torch path, decode throughput).
# Every stage runs under `timeout` inside one overall budget; results are JSON files in OUT_DIR.
set -uo pipefail

usage() {
    cat <<'EOF'
usage: bash bench/gpu_check.sh [OUT_DIR] [--cpu-smoke] [--model-dir DIR] [--budget-s N]
                               [--skip-correctness] [--skip-baseline] [--skip-moe] [--case llama3-8b|gemma2-9b]

Stages (each under its own timeout, all inside --budget-s, default 570 s):
  build    random bf16 Llama-3.1-8B folder (python -m bench.gpu_model), in the background, into
           --model-dir (default /dev/shm/gpu-check-llama3-8b when it has room, else $TMPDIR); reused when built
  pytest   python -m pytest -q -m gpu tests/model_handler          (runs while the folder is written)
  kernels  python bench/gpu_kernels.py --out OUT_DIR/gpu_kernels.json  (after the build: quiet GPU)
  ours     python -m bench.gpu_engine ours: Engine.add_request/step at batch 1, 32, 128; 128 in / 128 out,
           step by step (ASYNC_SCHEDULING=0)
  ours-async  the same with ASYNC_SCHEDULING=1 (the next step launched before this one's tokens are read);
           its own rows and verdicts, and a check that it generates the step-by-step tokens
  moe      python -m bench.gpu_moe: builds (or reuses) a random bf16 Mixtral-8x7B-shaped folder with 4 of its
           32 layers (12.2 GB; the whole model would not fit one GPU), then the fused Triton MoE against the
           torch experts loop (one layer's experts at 1-1024 tokens, the whole model's logits) and each
           path's time per layer
  moe-ours python -m bench.gpu_engine ours on that folder: decode throughput at the same batches and lengths
  hf       python -m bench.gpu_engine hf: model.generate_batch, same folder, prompts and lengths
  profile  python -m bench.gpu_profile, once step by step and once with ASYNC_SCHEDULING=1 (information:
           host phases and GPU busy time per decode step; runs only if the budget has room)
  report   one table, PASS/FAIL per correctness check and target -> OUT_DIR/gpu_check.json

OUT_DIR (default bench/results/tmp/gpu-check/, which git ignores) receives gpu_model.json, gpu_kernels.json,
gpu_engine_ours.json, gpu_engine_ours-async.json, gpu_engine_hf.json, gpu_moe.json, gpu_engine_moe.json,
profile-sync.json, profile-async.json, gpu_check.json and gpu_check.log; a run worth keeping goes to
bench/results/gpu-<card>/. Exit status: 0 all checks correct (targets may still FAIL), 1 a correctness check
failed, 2 a stage failed or timed out (or bad usage), 3 no report. The profile stage is information only: it
changes no verdict and no exit status.

  --cpu-smoke         the same Python on CPU: a tiny model of the same config, batches 1 and 4,
                      16 in / 8 out, float32, kernels under Triton's interpreter (< 60 s)
  --model-dir DIR     build (or reuse) the model folder here
  --budget-s N        overall time budget in seconds
  --skip-correctness  skip the pytest and kernels stages
  --skip-baseline     skip the transformers stage
  --skip-moe          skip the moe and moe-ours stages
  --case gemma2-9b    instead of the above, a random bf16 Gemma-2-9B folder (windows of 4096 on alternate layers,
                      soft-capped attention and final logits; --model-dir default /dev/shm/gpu-check-gemma2-9b when
                      it has room): stages build, check (python -m bench.gpu_family check: the engine's kernels
                      against the torch path on the same weights, a prompt longer than the window, then decodes),
                      ours (bench.gpu_engine at batch 1 and 32, 128 in / 128 out), report -> OUT_DIR/
                      gpu_check_gemma2-9b.json; exit 0 correct, 1 the paths disagree, 2 a stage failed. With
                      --cpu-smoke: the same fields at a tiny size (window 8), float32, on CPU
Environment: PYTHON (interpreter, default python3); the engine's own variables (MAX_BATCH_SIZE,
CUDA_GRAPHS, MAX_TOTAL_TOKENS, ...) pass through to the ours stage.
EOF
}

OUT="" SMOKE=0 MODEL_DIR="" BUDGET_S="" SKIP_CORRECTNESS=0 SKIP_BASELINE=0 SKIP_MOE=0 CASE=llama3-8b
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --cpu-smoke) SMOKE=1 ;;
        --skip-correctness) SKIP_CORRECTNESS=1 ;;
        --skip-baseline) SKIP_BASELINE=1 ;;
        --skip-moe) SKIP_MOE=1 ;;
        --model-dir) [ $# -ge 2 ] || { echo "gpu_check.sh: --model-dir needs a folder" >&2; exit 2; }
            MODEL_DIR="$2"; shift ;;
        --model-dir=*) MODEL_DIR="${1#*=}" ;;
        --budget-s) [ $# -ge 2 ] || { echo "gpu_check.sh: --budget-s needs seconds" >&2; exit 2; }
            BUDGET_S="$2"; shift ;;
        --budget-s=*) BUDGET_S="${1#*=}" ;;
        --case) [ $# -ge 2 ] || { echo "gpu_check.sh: --case needs a name" >&2; exit 2; }
            CASE="$2"; shift ;;
        --case=*) CASE="${1#*=}" ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "gpu_check.sh: one OUT_DIR only (got $OUT and $1)" >&2; exit 2; }
            OUT="$1" ;;
    esac
    shift
done
case "$BUDGET_S" in
    "") BUDGET_S=$([ "$SMOKE" = 1 ] && echo 200 || echo 570) ;;
    *[!0-9]*) echo "gpu_check.sh: --budget-s must be whole seconds, got $BUDGET_S" >&2; exit 2 ;;
esac
case "$CASE" in
    llama3-8b | gemma2-9b) ;;
    *) echo "gpu_check.sh: unknown --case $CASE (llama3-8b or gemma2-9b)" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/bench/results/tmp/gpu-check}"
if ! mkdir -p "$OUT"; then
    echo "gpu_check.sh: cannot create $OUT" >&2
    exit 2
fi
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu PRESET=smoke DTYPE=float32 BATCHES=1,4 PROFILE_BATCHES=1,4 PROMPT=16 OUTPUT=8 MAX_TOKENS=256
    KERNEL_ARGS=(--device cpu --small --skip-timing) CAP_BUILD=60 CAP_PYTEST=90 CAP_KERNELS=60 CAP_OURS=90
    MODEL_DIR="${MODEL_DIR:-$WORK/smoke-model}"
    MOE_PRESET=mixtral-smoke MOE_DIR="$WORK/mixtral-smoke" MOE_LAYER_BATCHES=1,16 CAP_MOE=60
    # Tiny ops on a shared CPU: one thread each avoids OpenMP spin-waiting against the other processes
    # (seen here: 0.2 ms per attention call with one thread, 47 ms with two on a loaded 2-core box).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    DEVICE=cuda PRESET=llama3-8b DTYPE=bfloat16 BATCHES=1,32,128 PROFILE_BATCHES=1,32 PROMPT=128 OUTPUT=128
    MAX_TOKENS=8192
    KERNEL_ARGS=() CAP_BUILD=240 CAP_PYTEST=150 CAP_KERNELS=110 CAP_OURS=170
    MOE_PRESET=mixtral-4l MOE_LAYER_BATCHES=1,32,128,1024 CAP_MOE=150
    # 12.2 GB: tmpfs when it has room beside the 16 GB Llama folder, else $TMPDIR; reused when built.
    shm_free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
    if [ -f /dev/shm/gpu-check-mixtral-4l/build.json ] || [ "${shm_free_kb:-0}" -gt $((32 * 1024 * 1024)) ]; then
        MOE_DIR=/dev/shm/gpu-check-mixtral-4l
    else
        MOE_DIR="${TMPDIR:-/tmp}/gpu-check-mixtral-4l"
    fi
    if [ -z "$MODEL_DIR" ]; then
        # tmpfs writes and reads at memory speed; a folder there from an earlier run is reused.
        folder=gpu-check-$CASE need_gb=$([ "$CASE" = gemma2-9b ] && echo 21 || echo 24)
        shm_free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
        if [ -f "/dev/shm/$folder/build.json" ] || [ "${shm_free_kb:-0}" -gt $((need_gb * 1024 * 1024)) ]; then
            MODEL_DIR="/dev/shm/$folder"
        else
            MODEL_DIR="${TMPDIR:-/tmp}/$folder"
        fi
    fi
fi
if [ "$CASE" = gemma2-9b ]; then # the family case's own preset, batches and stage caps (see --help)
    PRESET=$([ "$SMOKE" = 1 ] && echo gemma2-smoke || echo gemma2-9b)
    CASE_BATCHES=$([ "$SMOKE" = 1 ] && echo 1,4 || echo 1,32)
    CAP_BUILD=$([ "$SMOKE" = 1 ] && echo 60 || echo 240) CAP_CHECK=$([ "$SMOKE" = 1 ] && echo 90 || echo 200)
fi
RESERVE_S=15 # kept back at every stage for the report
declare -A RC=([build]=skip [pytest]=skip [kernels]=skip [ours]=skip [ours-async]=skip [moe]=skip [moe-ours]=skip
    [hf]=skip [profile]=skip [check]=skip)

limit_for() { # limit_for CAP: the stage's timeout, capped by what is left of the budget
    local left=$((BUDGET_S - SECONDS - RESERVE_S))
    echo $(($1 < left ? $1 : left))
}

stage() { # stage NAME CAP COMMAND...: run under timeout, record its exit status in RC[NAME]
    local name=$1 limit began
    limit=$(limit_for "$2")
    shift 2
    if [ "$limit" -lt 20 ]; then
        echo "== $name: not run, only ${limit}s of the budget left"
        RC[$name]=124
        return
    fi
    echo "== $name (timeout ${limit}s): $*"
    began=$SECONDS
    timeout --kill-after=15 "$limit" "$@"
    RC[$name]=$?
    echo "== $name: rc ${RC[$name]} after $((SECONDS - began))s"
}

run_all() {
    cd "$ROOT" || return 2
    echo "gpu_check: $(date -u +%FT%TZ) mode=$([ "$SMOKE" = 1 ] && echo cpu-smoke || echo gpu) budget=${BUDGET_S}s"
    echo "  out=$OUT model_dir=$MODEL_DIR moe_dir=$MOE_DIR python=$PY"
    "$PY" -c 'import sys, torch, transformers, triton; print("  python", sys.version.split()[0], "torch",
torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__, "cuda",
torch.cuda.is_available() and torch.cuda.get_device_name())' || return 2
    if [ "$SMOKE" = 0 ]; then
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm \
            --format=csv,noheader | sed 's/^/  /'
        "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
            echo "gpu_check: no CUDA device here; use --cpu-smoke"
            return 2
        }
    fi
    rm -f "$OUT"/gpu_model.json "$OUT"/gpu_kernels.json "$OUT"/gpu_engine_ours.json "$OUT"/gpu_engine_hf.json \
        "$OUT"/gpu_engine_ours-async.json "$OUT"/gpu_moe.json "$OUT"/gpu_engine_moe.json \
        "$OUT"/gpu_check.json "$OUT"/profile-sync.json "$OUT"/profile-async.json

    # The folder is written while the correctness tests run (they need little GPU memory); the kernel
    # timings wait for it so they see a quiet GPU.
    local build_limit began
    build_limit=$(limit_for "$CAP_BUILD")
    echo "== build (background, timeout ${build_limit}s): $PRESET -> $MODEL_DIR"
    timeout --kill-after=15 "$build_limit" "$PY" -m bench.gpu_model "$MODEL_DIR" --preset "$PRESET" \
        --device "$DEVICE" --json "$OUT/gpu_model.json" >"$WORK/build.log" 2>&1 &
    local build_pid=$!
    began=$SECONDS
    if [ "$SKIP_CORRECTNESS" = 0 ]; then
        stage pytest "$CAP_PYTEST" "$PY" -m pytest -q -m gpu tests/model_handler -p no:cacheprovider \
            --junitxml="$WORK/gpu_tests.xml"
    fi
    wait "$build_pid"
    RC[build]=$?
    sed 's/^/  build: /' "$WORK/build.log"
    echo "== build: rc ${RC[build]} after $((SECONDS - began))s"
    if [ "$SKIP_CORRECTNESS" = 0 ]; then
        stage kernels "$CAP_KERNELS" "$PY" bench/gpu_kernels.py ${KERNEL_ARGS[@]+"${KERNEL_ARGS[@]}"} \
            --out "$OUT/gpu_kernels.json"
    fi
    local common=(--device "$DEVICE" --dtype "$DTYPE" --batch-sizes "$BATCHES" --prompt-tokens "$PROMPT"
        --output-tokens "$OUTPUT" --max-batch-tokens "$MAX_TOKENS")
    if [ "${RC[build]}" = 0 ]; then
        ASYNC_SCHEDULING=0 stage ours "$CAP_OURS" "$PY" -m bench.gpu_engine ours "$MODEL_DIR" \
            --out "$OUT/gpu_engine_ours.json" "${common[@]}"
        ASYNC_SCHEDULING=1 stage ours-async "$CAP_OURS" "$PY" -m bench.gpu_engine ours "$MODEL_DIR" \
            --out "$OUT/gpu_engine_ours-async.json" "${common[@]}"
    fi
    if [ "$SKIP_MOE" = 0 ]; then
        # Before the transformers baseline, which takes whatever of the budget is left.
        stage moe "$CAP_MOE" "$PY" -m bench.gpu_moe "$MOE_DIR" --preset "$MOE_PRESET" --device "$DEVICE" \
            --dtype "$DTYPE" --batch-sizes "$MOE_LAYER_BATCHES" --out "$OUT/gpu_moe.json"
        if [ -f "$MOE_DIR/build.json" ]; then
            ASYNC_SCHEDULING=0 stage moe-ours "$CAP_OURS" "$PY" -m bench.gpu_engine ours "$MOE_DIR" \
                --out "$OUT/gpu_engine_moe.json" "${common[@]}"
        else
            echo "== moe-ours: not run, the MoE model folder was not built"
        fi
    fi
    if [ "${RC[build]}" = 0 ]; then
        if [ "$SKIP_BASELINE" = 0 ]; then
            # Whatever is left; the stage plans its own work to end 20 s before its timeout.
            local hf_limit
            hf_limit=$(limit_for 300)
            stage hf 300 "$PY" -m bench.gpu_engine hf "$MODEL_DIR" --out "$OUT/gpu_engine_hf.json" \
                "${common[@]}" --deadline-s $((hf_limit - 20))
        fi
        # Information only (not in the report's verdicts): is async scheduling faster on this GPU?
        local mode
        for mode in sync async; do
            ASYNC_SCHEDULING=$([ "$mode" = async ] && echo 1 || echo 0) stage profile 60 "$PY" -m bench.gpu_profile \
                "$MODEL_DIR" --out "$OUT/profile-$mode.json" --device "$DEVICE" --dtype "$DTYPE" \
                --batch-sizes "$PROFILE_BATCHES" --prompt-tokens "$PROMPT" --steps 30 --profiled-steps 4
        done
    else
        echo "== ours, ours-async, hf, profile: not run, the model folder was not built"
    fi

    echo "== report"
    local report_args=(--results "$OUT" --tests-xml "$WORK/gpu_tests.xml") name
    for name in build pytest kernels ours ours-async moe moe-ours hf; do
        report_args+=(--stage "$name=${RC[$name]}")
    done
    [ "$SMOKE" = 1 ] || report_args+=(--require-gpu-tests)
    "$PY" -m bench.gpu_engine report "${report_args[@]}"
    local rc=$?
    # A crashed report also exits 1; only a written summary makes its status mean anything.
    [ "$rc" -le 2 ] && [ -f "$OUT/gpu_check.json" ] || rc=3
    echo "gpu_check: exit $rc after ${SECONDS}s"
    return "$rc"
}

run_case() { # --case gemma2-9b: build, serving path vs torch path, decode throughput, the case's own report
    cd "$ROOT" || return 2
    local mode
    mode=$([ "$SMOKE" = 1 ] && echo cpu-smoke || echo gpu)
    echo "gpu_check: $(date -u +%FT%TZ) case=$CASE mode=$mode budget=${BUDGET_S}s"
    echo "  out=$OUT model_dir=$MODEL_DIR python=$PY"
    if [ "$SMOKE" = 0 ]; then
        "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
            echo "gpu_check: no CUDA device here; use --cpu-smoke"
            return 2
        }
    fi
    rm -f "$OUT/gpu_model_$CASE.json" "$OUT/gpu_family_$CASE.json" "$OUT/gpu_engine_$CASE.json" \
        "$OUT/gpu_check_$CASE.json"
    stage build "$CAP_BUILD" "$PY" -m bench.gpu_model "$MODEL_DIR" --preset "$PRESET" --device "$DEVICE" \
        --json "$OUT/gpu_model_$CASE.json"
    if [ "${RC[build]}" = 0 ]; then
        stage check "$CAP_CHECK" "$PY" -m bench.gpu_family check "$MODEL_DIR" --out "$OUT/gpu_family_$CASE.json" \
            --device "$DEVICE" --dtype "$DTYPE"
        stage ours "$CAP_OURS" "$PY" -m bench.gpu_engine ours "$MODEL_DIR" --out "$OUT/gpu_engine_$CASE.json" \
            --device "$DEVICE" --dtype "$DTYPE" --batch-sizes "$CASE_BATCHES" --prompt-tokens "$PROMPT" \
            --output-tokens "$OUTPUT" --max-batch-tokens "$MAX_TOKENS"
    else
        echo "== check, ours: not run, the model folder was not built"
    fi
    echo "== report"
    "$PY" -m bench.gpu_family report --results "$OUT" --case "$CASE" --stage "build=${RC[build]}" \
        --stage "check=${RC[check]}" --stage "ours=${RC[ours]}"
    local rc=$?
    [ "$rc" -le 2 ] && [ -f "$OUT/gpu_check_$CASE.json" ] || rc=3
    echo "gpu_check: exit $rc after ${SECONDS}s"
    return "$rc"
}

if [ "$CASE" = llama3-8b ]; then
    run_all 2>&1 | tee "$OUT/gpu_check.log"
else
    run_case 2>&1 | tee "$OUT/gpu_check_$CASE.log"
fi
exit "${PIPESTATUS[0]}"
