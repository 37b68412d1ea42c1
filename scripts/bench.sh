#!/usr/bin/env bash
# `make bench`: one call on a GPU box — dsfleet against HF Trainer + DeepSpeed, side by side (dsfleet/bench.py).
# Installs the carried wheels (.whl/*.whl: deepspeed and what the image lacks) into /tmp/site, runs dsfleet from
# source, and writes results.json, results.md and per-run logs to $OUT. Arguments pass through to `dsfleet bench`:
#   bash scripts/bench.sh                               # --suite all: gpt2_xl, t5_3b, scaling (1 GPU here)
#   bash scripts/bench.sh --suite scaling --gpus 2      # GPT-2 XL on 1 and 2 GPUs
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/runs/bench}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PYTHONPATH
# DeepSpeed's op builder cannot parse arch names like the image's "9.0a": name the card's plain capability
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
echo "TORCH_CUDA_ARCH_LIST was: ${TORCH_CUDA_ARCH_LIST:-unset}, card: ${cap:-unknown}"
export TORCH_CUDA_ARCH_LIST=${cap:-9.0}
# one extensions dir for the whole call: FusedAdam / CPUAdam are JIT-built once, before anything is timed
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/dsfleet-torch-extensions}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v "^\[" 
python3 -m dsfleet.cli bench --out "$OUT" "$@"
