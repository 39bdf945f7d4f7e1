#!/usr/bin/env bash
# Send one request to a locally running container (serve_local.sh), as SageMaker would: POST /invocations.
#
# Usage: predict.sh [PAYLOAD_FILE|-] [CONTENT_TYPE]
#   PAYLOAD_FILE  JSON body (default: a short chat request); `-` reads stdin
#   CONTENT_TYPE  default application/json
# Environment: PORT (default 8080), STREAM=1 to stream the reply as server-sent events,
#              ROUTE=/v1/chat/completions to use the OpenAI route instead of /invocations.
set -euo pipefail

PORT=${PORT:-8080}
ROUTE=${ROUTE:-/invocations}
CONTENT_TYPE=${2:-application/json}
if [[ $# -ge 1 ]]; then
    payload=$(cat "$1")
else
    payload='{"messages": [{"role": "user", "content": "What is Amazon SageMaker?"}], "max_tokens": 64}'
fi
if [[ "${STREAM:-0}" == 1 ]]; then
    payload=$(printf '%s' "$payload" | python3 -c 'import json, sys; b = json.load(sys.stdin); b["stream"] = True; print(json.dumps(b))')
fi

curl --fail-with-body -sS -N -X POST "http://localhost:$PORT$ROUTE" -H "Content-Type: $CONTENT_TYPE" \
    --data-binary "$payload"
echo
