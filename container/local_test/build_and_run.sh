#!/usr/bin/env bash
# Build the serving image and smoke-test it the way SageMaker runs it (`serve`, port 8080): wait for /ping,
# then send a chat request to /v1/chat/completions and to /invocations and print the replies.
#
# Engine: docker when a daemon answers; otherwise buildah (vfs storage, chroot isolation), which needs no
# daemon. With buildah and no registry in reach, the base is a local Debian bookworm built by debootstrap
# (python3 + python3-venv) and the CPU torch wheel from $WHEEL_DIR; pip inside RUN gets the host CA bundle.
#
# Usage: container/local_test/build_and_run.sh [build|run|all]     (default: all)
# Environment (all optional):
#   IMAGE=localhost/sagemaker-llm:local   tag to build/run
#   ENGINE=docker|buildah                 force an engine
#   BASE_IMAGE=...                        base for the build (buildah default: the local Debian base)
#   TORCH_REQUIREMENT=torch==2.13.0       torch to install when the base has none (buildah default)
#   WHEEL_DIR=/opt/wheels                 local wheel folder (pip find-links) mounted into the build
#   CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt   host CA bundle mounted for pip (TLS-intercepting egress)
#   MIRROR=http://deb.debian.org/debian   debootstrap mirror (default: the one apt uses here)
#   MODEL_DIR=/path/to/model              mounted at /opt/ml/model (default: the image's tiny default model)
#   PORT=8080  READY_TIMEOUT=600          where the server listens; how long to wait for /ping
#   HF_MODEL_ID, SM_NUM_GPUS, MESSAGES_API_ENABLED, MAX_TOTAL_TOKENS, ...: passed through to the container
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${IMAGE:-localhost/sagemaker-llm:local}
PORT=${PORT:-8080}
READY_TIMEOUT=${READY_TIMEOUT:-600}
WHEEL_DIR=${WHEEL_DIR:-/opt/wheels}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=${WORK_DIR:-$REPO/.cache/local_test}     # .cache/ is git-ignored
BASE_TAG=localhost/debian-python:bookworm
PASS_ENV=(HF_MODEL_ID HF_MODEL_REVISION SM_NUM_GPUS MESSAGES_API_ENABLED MAX_INPUT_TOKENS MAX_TOTAL_TOKENS
          MAX_BATCH_PREFILL_TOKENS MAX_CONCURRENT_REQUESTS API_KEY HF_TOKEN)
BUILDAH=(buildah --storage-driver vfs)         # the env var STORAGE_DRIVER is not honoured by every subcommand
SERVER_PID=""
CONTAINER=""

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pick_engine() {
    if [[ -n "${ENGINE:-}" ]]; then echo "$ENGINE"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
    else echo buildah
    fi
}

ensure_buildah_tools() {
    local missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# The Debian mirror apt already uses on this machine (deb822 or one-line sources), else the public one.
apt_mirror() {
    local uri
    uri=$(grep -hsE '^URIs:.*debian/?$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')
    [[ -n "$uri" ]] || uri=$(grep -hsE '^deb .*debian/? bookworm' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                               | head -n1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

has_image() { "${BUILDAH[@]}" images --quiet "$1" >/dev/null 2>&1; }

# A minimal Debian bookworm with python3 + venv, imported as a local image (no registry needed).
build_debian_base() {
    if has_image "$BASE_TAG"; then log "base $BASE_TAG already present"; return; fi
    local mirror=${MIRROR:-$(apt_mirror)} rootfs="$WORK/rootfs" t0=$SECONDS
    log "debootstrap bookworm from $mirror"
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || die "debootstrap failed, see $WORK/debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$WORK/rootfs.tar" .
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' >"$WORK/Containerfile.base"
    "${BUILDAH[@]}" bud --isolation chroot --quiet -f "$WORK/Containerfile.base" -t "$BASE_TAG" "$WORK" >/dev/null
    rm -rf "$rootfs" "$WORK/rootfs.tar"
    log "base $BASE_TAG built in $((SECONDS - t0)) s"
}

build_image() {
    local engine=$1 t0=$SECONDS
    if [[ $engine == docker ]]; then
        local args=()
        [[ -n "${BASE_IMAGE:-}" ]] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
        [[ -n "${TORCH_REQUIREMENT:-}" ]] && args+=(--build-arg "TORCH_REQUIREMENT=$TORCH_REQUIREMENT")
        docker build "${args[@]}" -t "$IMAGE" "$REPO"
    else
        ensure_buildah_tools
        mkdir -p "$WORK"
        [[ -n "${BASE_IMAGE:-}" ]] || build_debian_base
        local args=(--build-arg "BASE_IMAGE=${BASE_IMAGE:-$BASE_TAG}"
                    --build-arg "TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0}")
        if [[ -f "$CA_BUNDLE" ]]; then
            args+=(-v "$CA_BUNDLE:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
        fi
        if [[ -d "$WHEEL_DIR" ]]; then
            args+=(-v "$WHEEL_DIR:/run/wheels:ro" --build-arg PIP_FIND_LINKS=/run/wheels)
        fi
        local old_id
        old_id=$("${BUILDAH[@]}" images --quiet "$IMAGE" 2>/dev/null || true)
        log "buildah bud $IMAGE"
        "${BUILDAH[@]}" bud --isolation chroot "${args[@]}" -t "$IMAGE" "$REPO"
        # vfs keeps a full copy per image: drop the build this one replaced (kept if a container uses it)
        if [[ -n "$old_id" && "$old_id" != "$("${BUILDAH[@]}" images --quiet "$IMAGE")" ]]; then
            "${BUILDAH[@]}" rmi "$old_id" >/dev/null 2>&1 || true
        fi
    fi
    log "image $IMAGE built in $((SECONDS - t0)) s; size: $(image_size "$engine")"
}

image_size() {
    if [[ $1 == docker ]]; then docker image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec
    else "${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE"
    fi
}

container_env_args() {
    local name
    for name in "${PASS_ENV[@]}"; do
        [[ -n "${!name:-}" ]] && printf -- '-e\0%s=%s\0' "$name" "${!name}"
    done
    return 0
}

start_server() {
    local engine=$1 env_args=()
    mapfile -d '' env_args < <(container_env_args)
    if [[ $engine == docker ]]; then
        local extra=()
        [[ -n "${MODEL_DIR:-}" ]] && extra+=(-v "$(realpath "$MODEL_DIR"):/opt/ml/model:ro")
        command -v nvidia-smi >/dev/null && extra+=(--gpus all)
        CONTAINER=$(docker run -d --rm -p "$PORT:8080" "${env_args[@]}" "${extra[@]}" "$IMAGE" serve)
        log "docker container $CONTAINER started"
        docker logs -f "$CONTAINER" >"$WORK/serve.log" 2>&1 &
    else
        local extra=()
        [[ -n "${MODEL_DIR:-}" ]] && extra+=(-v "$(realpath "$MODEL_DIR"):/opt/ml/model:ro")
        # chroot isolation shares the host network, so the server's :8080 is the host's :8080.
        ((PORT == 8080)) || extra+=(-e "SAGEMAKER_BIND_TO_PORT=$PORT")
        CONTAINER=$("${BUILDAH[@]}" from --quiet "$IMAGE")
        log "buildah container $CONTAINER; running \`serve\`"
        setsid "${BUILDAH[@]}" run --isolation chroot --network host "${env_args[@]}" "${extra[@]}" \
            "$CONTAINER" -- serve >"$WORK/serve.log" 2>&1 &
        SERVER_PID=$!
    fi
}

stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        # Like SageMaker: SIGTERM to `serve` itself, SIGKILL for everything left 30 s later.
        local serve_pid t0=$SECONDS
        serve_pid=$(pgrep -s "$SERVER_PID" -f '^python[0-9.]* /opt/program/serve' | head -n1 || true)
        log "stopping serve (SIGTERM to pid ${serve_pid:-?})"
        if [[ -n "$serve_pid" ]]; then kill -TERM "$serve_pid" 2>/dev/null || true
        else kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        fi
        for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            log "serve still running after 30 s: SIGKILL"
            kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
        fi
        local status=0 left
        wait "$SERVER_PID" 2>/dev/null || status=$?
        log "serve stopped in $((SECONDS - t0)) s (exit status $status)"
        left=$(pgrep -s "$SERVER_PID" | tr '\n' ' ' || true)
        if [[ -n "$left" ]]; then
            log "WARNING: processes left behind by serve: $left- killing them"
            kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
        fi
    fi
    SERVER_PID=""
    if [[ -n "$CONTAINER" ]]; then
        if [[ $ENGINE_USED == docker ]]; then docker stop "$CONTAINER" >/dev/null 2>&1 || true
        else "${BUILDAH[@]}" rm "$CONTAINER" >/dev/null 2>&1 || true
        fi
        CONTAINER=""
    fi
}

wait_ready() {
    local t0=$SECONDS
    until curl -fsS -o /dev/null "http://127.0.0.1:$PORT/ping" 2>/dev/null; do
        if [[ -n "$SERVER_PID" ]] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
            tail -n 40 "$WORK/serve.log" >&2; die "serve exited before /ping answered"
        fi
        ((SECONDS - t0 < READY_TIMEOUT)) || { tail -n 40 "$WORK/serve.log" >&2; die "/ping not 200 after ${READY_TIMEOUT}s"; }
        sleep 1
    done
    log "/ping 200 after $((SECONDS - t0)) s"
}

post() {   # post PATH JSON: print status, time and body
    local path=$1 body=$2
    log "POST $path $body"
    curl -sS -w '\n-> HTTP %{http_code} in %{time_total}s\n' -H 'Content-Type: application/json' \
        -X POST "http://127.0.0.1:$PORT$path" -d "$body"
}

smoke_test() {
    local chat='{"model": "tgi", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}'
    post /v1/chat/completions "$chat"
    post /invocations '{"messages": [{"role": "user", "content": "What is SageMaker?"}], "max_tokens": 16}'
    post /invocations '{"messages": [{"role": "user", "content": "Stream, please."}], "max_tokens": 8, "stream": true}'
}

main() {
    local what=${1:-all}
    ENGINE_USED=$(pick_engine)
    mkdir -p "$WORK"
    log "engine: $ENGINE_USED; image: $IMAGE"
    case $what in
        build) build_image "$ENGINE_USED" ;;
        run | all)
            [[ $what == all ]] && build_image "$ENGINE_USED"
            trap stop_server EXIT
            local t0=$SECONDS
            start_server "$ENGINE_USED"
            wait_ready
            smoke_test
            stop_server
            log "run finished in $((SECONDS - t0)) s; server log: $WORK/serve.log"
            ;;
        *) die "usage: $0 [build|run|all]" ;;
    esac
}

main "$@"
