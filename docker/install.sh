#!/usr/bin/env bash
# The one DeepSpeed install: the Dockerfile RUNs it and `make venv`/`make setup` run it on bare metal.
# Env: PYTHON (interpreter of the target env), CUDA_ARCH (empty = CPU build), DSFLEET_SRC (path to install dsfleet from).
set -euo pipefail
PYTHON=${PYTHON:-python3}
CUDA_ARCH=${CUDA_ARCH:-}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
pip=("$PYTHON" -m pip install -q)
"${pip[@]}" --upgrade pip wheel setuptools ninja
"$PYTHON" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==${TORCH_VERSION}"
"${pip[@]}" hjson msgpack einops py-cpuinfo psutil pydantic numpy packaging tqdm
if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
fi
if [ -n "${DSFLEET_SRC:-}" ]; then
  "${pip[@]}" -e "${DSFLEET_SRC}[test]"
fi
