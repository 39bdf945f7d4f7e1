# SageMaker LLM serving image: TGI-compatible HTTP API on :8080, started by `docker run IMAGE serve`.
#
# Default base: the official PyTorch CUDA 12.8 runtime image. It already holds python3 + pip (conda), a CUDA
# torch with the matching triton and the CUDA/cuDNN user-space libraries, so nothing multi-GB is downloaded
# twice. ml.g5 (A10G, sm_86) runs it; CUDA 12.x minor-version compatibility covers the 535/550 drivers of the
# SageMaker GPU AMIs, and `al2023-ami-sagemaker-inference-gpu-4-1` (driver 580) needs no compat at all.
# Any base with python3 (+ the venv module) works: `--build-arg BASE_IMAGE=...`; when the base has no torch,
# pass `--build-arg TORCH_REQUIREMENT=torch==X` (container/local_test/build_and_run.sh does this for CPU).
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Build-time only (ARGs are environment for RUN, never stored in the image): pip's CA bundle behind a
# TLS-intercepting proxy, a local wheel folder, and a torch to install when the base has none.
# pip ignores these variables when they are empty.
ARG PIP_CERT=
ARG PIP_FIND_LINKS=
ARG TORCH_REQUIREMENT=

LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true

# HOME and every cache live in one world-writable folder, so `docker run --user 1000 ...` works locally too;
# SageMaker itself runs the container as root. /opt/ml/model is where SageMaker unpacks ModelDataUrl.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/app \
    XDG_CACHE_HOME=/home/app/.cache \
    HF_HOME=/home/app/.cache/huggingface \
    TRITON_CACHE_DIR=/home/app/.cache/triton \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/program:/opt/venv/bin:$PATH

# The venv sees the base's site-packages, so a torch the base already has satisfies `torch>=...` and is
# not reinstalled. Dependencies come first, from setup.cfg alone, so code edits keep this layer cached.
COPY setup.cfg pyproject.toml /tmp/src/
RUN python3 -m venv --system-site-packages /opt/venv \
    && python -c "import configparser, os, sys; c = configparser.ConfigParser(); c.read(sys.argv[1]); print(os.environ.get('TORCH_REQUIREMENT', '') + c['options']['install_requires'])" /tmp/src/setup.cfg > /tmp/src/requirements.txt \
    && pip install --no-cache-dir -r /tmp/src/requirements.txt \
    && mkdir -p /opt/ml/model /home/app/.cache \
    && chmod -R 1777 /home/app

COPY . /tmp/src/
RUN pip install --no-cache-dir --no-deps /tmp/src \
    && rm -rf /tmp/src

# With a CPU torch (no CUDA), compile the C++ CPU kernels now for three x86 levels (AVX-512+bf16, AVX-512, AVX2;
# model_handler/kernels/cpu_prebuilt.py): at start-up the engine loads the best one the host runs, so the image
# needs no compiler and a fresh instance compiles nothing. A compiler missing from the base is installed for this
# step only, and every package it brought is purged in the same RUN. CUDA images skip the step: their engine
# never runs the CPU kernels. bash with pipefail, so a failed stage of the purge's pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV CPU_KERNELS_PREBUILT_DIR=/opt/cpu-kernels
# hadolint ignore=DL3008
RUN if python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
        echo "CUDA torch: the C++ CPU kernels are not prebuilt"; \
    else \
        added=""; \
        if ! command -v c++ >/dev/null; then \
            dpkg-query -W -f='${Package}\n' | sort > /tmp/packages-before \
            && apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ >/dev/null && added=g++; \
        fi; \
        python -m model_handler.kernels.cpu_prebuilt "$CPU_KERNELS_PREBUILT_DIR" \
        && if [ -n "$added" ]; then \
            dpkg-query -W -f='${Package}\n' | sort | comm -13 /tmp/packages-before - | xargs apt-get purge -y -qq >/dev/null \
            && apt-get clean && rm -rf /var/lib/apt/lists/* /tmp/packages-before; \
        fi; \
    fi

# container/: the launcher `serve` (local_test/ is in .dockerignore). SageMaker runs `docker run IMAGE serve`: the argument replaces
# CMD and resolves through PATH (/opt/program comes first), as in AWS's bring-your-own-container example.
# No ENTRYPOINT is needed; CMD makes a bare `docker run IMAGE` serve as well.
COPY container/ /opt/program/
WORKDIR /opt/program

EXPOSE 8080
CMD ["serve"]
