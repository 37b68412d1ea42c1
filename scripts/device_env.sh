# shellcheck shell=bash
# Sourced by every GPU-box script (bench.sh, gpu_smoke.sh, gpu_memory_check.sh): the box has CUDA torch and
# transformers but not deepspeed or pydantic, and no network. This installs the carried wheels (.whl/*.whl) into
# /tmp/site, lays a prebuilt DeepSpeed over them when one was carried (.whl/prebuilt/deepspeed-*.tgz, made by
# scripts/gpu_ops_check.sh: CPU Adam + AIO + fused Adam built for this card, so nothing is JIT-compiled), puts
# dsfleet's src/ on PYTHONPATH and sets the environment the box needs.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_out=${OUT:-/tmp/out}
mkdir -p "$_out"
if compgen -G "$_repo/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$_repo"/.whl/*.whl \
    >"$_out/pip.log" 2>&1 || { tail -5 "$_out/pip.log"; return 1; }
fi
for _tgz in "$_repo"/.whl/prebuilt/deepspeed-*.tgz; do
  [ -f "$_tgz" ] || continue
  rm -rf /tmp/site/deepspeed && mkdir -p /tmp/site
  tar -xzf "$_tgz" -C /tmp/site || return 1
  echo "device_env: DeepSpeed with prebuilt ops from ${_tgz#"$_repo"/}"
done
export PYTHONPATH=/tmp/site:$_repo/src${PYTHONPATH:+:$PYTHONPATH}
# DeepSpeed's op builder cannot parse arch names like the image's "9.0a": name the card's plain capability
_cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
echo "device_env: TORCH_CUDA_ARCH_LIST was ${TORCH_CUDA_ARCH_LIST:-unset}, card ${_cap:-unknown}"
export TORCH_CUDA_ARCH_LIST=${_cap:-9.0}
# one extensions dir for the whole call: anything JIT-built is built once, before anything is timed
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/dsfleet-torch-extensions}
# NVLink multicast stays off on shared boxes (KINDS.md)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
python3 -c "import torch, transformers, deepspeed; from deepspeed.git_version_info import installed_ops as o; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'prebuilt ops:', sorted(k for k, v in o.items() if v))" 2>&1 | grep -v '^\['
