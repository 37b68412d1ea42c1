# shellcheck shell=bash
# Sourced by every GPU-box script (bench.sh, gpu_smoke.sh, gpu_memory_check.sh, gpu_mamba.sh): the box has CUDA
# torch and transformers but not deepspeed or pydantic, and no network. This installs the carried wheels
# (.whl/*.whl, assembled by scripts/make-device-wheels.sh) into /tmp/site, lays prebuilt packages over them when
# carried (.whl/prebuilt/*.tgz or *.txz, or one split in parts NAME.part00, .part01 ... to come back through $OUT):
# deepspeed-*.tgz from scripts/gpu_ops_check.sh (CPU Adam + AIO + fused Adam built for this card, so nothing is
# JIT-compiled) and mamba-kernels-*.txz from scripts/gpu_mamba.sh (mamba_ssm + causal_conv1d built for this card),
# puts dsfleet's src/ on PYTHONPATH and sets the environment the box needs.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_out=${OUT:-/tmp/out}
mkdir -p "$_out"
if compgen -G "$_repo/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$_repo"/.whl/*.whl \
    >"$_out/pip.log" 2>&1 || { tail -5 "$_out/pip.log"; return 1; }
fi
# device_env_lay TARBALL: its top-level entries replace those in /tmp/site (TARBALL.part* when split; any of
# tar's compressions, read by Python's tarfile: the box may lack xz)
device_env_lay() {
  local tgz=$1 parts=("$1")
  [ -f "$tgz" ] || parts=("$tgz".part*)
  [ -f "${parts[0]}" ] || { echo "device_env: no $tgz"; return 1; }
  mkdir -p /tmp/site
  cat "${parts[@]}" | python3 -c '
import shutil, sys, tarfile
from pathlib import Path
site = Path("/tmp/site")
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*") as tar:
    seen = set()
    for member in tar:
        top = member.name.split("/")[0]
        if top not in seen and top not in (".", ""):
            seen.add(top)
            target = site / top
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        tar.extract(member, site, filter="data") if hasattr(tarfile, "data_filter") else tar.extract(member, site)
' || return 1
  echo "device_env: prebuilt ${tgz##*/} laid over /tmp/site"
}
for _tgz in "$_repo"/.whl/prebuilt/*.tgz "$_repo"/.whl/prebuilt/*.txz "$_repo"/.whl/prebuilt/*.part00; do
  [ -f "$_tgz" ] || continue
  device_env_lay "${_tgz%.part00}" || return 1
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
