#!/usr/bin/env bash
# Run the image the way SageMaker does (`docker run IMAGE serve`, port 8080), for docker or podman users.
#
# Usage: serve_local.sh [IMAGE] [MODEL_DIR]
#   IMAGE      default: sagemaker-llm:latest (build with: docker build -t sagemaker-llm:latest .)
#   MODEL_DIR  a local model folder, mounted read-only at /opt/ml/model as SageMaker does with ModelDataUrl;
#              without it the container serves HF_MODEL_ID, else its built-in tiny model.
# Environment: ENGINE (docker|podman), PORT (host port, default 8080), and HF_MODEL_ID, SM_NUM_GPUS,
# MESSAGES_API_ENABLED, MAX_TOTAL_TOKENS, HF_TOKEN, API_KEY are passed through when set.
set -euo pipefail

IMAGE=${1:-sagemaker-llm:latest}
MODEL_DIR=${2:-}
ENGINE=${ENGINE:-docker}
PORT=${PORT:-8080}

args=(--rm --name sagemaker-llm-local -p "$PORT:8080" --shm-size 1g)
for name in HF_MODEL_ID HF_MODEL_REVISION SM_NUM_GPUS MESSAGES_API_ENABLED MAX_INPUT_TOKENS MAX_TOTAL_TOKENS \
            MAX_BATCH_PREFILL_TOKENS MAX_CONCURRENT_REQUESTS HF_TOKEN API_KEY; do
    [[ -n "${!name:-}" ]] && args+=(-e "$name")
done
[[ -n "$MODEL_DIR" ]] && args+=(-v "$(realpath "$MODEL_DIR"):/opt/ml/model:ro")
command -v nvidia-smi >/dev/null 2>&1 && args+=(--gpus all)

echo "serving $IMAGE on http://localhost:$PORT (Ctrl-C stops it)" >&2
exec "$ENGINE" run "${args[@]}" "$IMAGE" serve
