#!/usr/bin/env bash
# The build gate: runs ds_report and fails unless every op this flavour needs shows as installed (prebuilt), and
# fails unless the Mamba CUDA kernels import where install.sh builds them (selective_scan_cuda, causal_conv1d_cuda).
# Usage: check-ops.sh [deepspeed] [mamba]   (no argument: deepspeed, and mamba when DSFLEET_MAMBA_KERNELS resolves to 1)
# Env: PYTHON (interpreter of the env to check), CUDA_ARCH (empty/cpu = CPU flavour), DSFLEET_MAMBA_KERNELS (as
# install.sh reads it). Exit 1 = ops missing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=docker/common.sh
. "$here/common.sh"
PYTHON=${PYTHON:-python3}
arch=$(cuda_arch_list "${CUDA_ARCH:-}")
accel=$(ds_accelerator "$arch")
read -ra want <<<"$(required_ops "$arch")"
checks=("$@")
if [ ${#checks[@]} -eq 0 ]; then
  checks=(deepspeed)
  mamba=$(mamba_kernels_wanted "$arch")
  [ "$mamba" = 0 ] || checks+=(mamba)
fi
for c in "${checks[@]}"; do
  case "$c" in deepspeed | mamba) ;; *) die "unknown check '$c' — checks are: deepspeed mamba" ;; esac
done

check_deepspeed() {
  # ds_report lists ops for the running accelerator and says [YES] only when the op was prebuilt for it.
  local bindir plain missing=() op
  bindir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  # Colours stripped so the table can be read (and grepped) as plain text.
  plain=$(PATH="$bindir:$PATH" DS_ACCELERATOR=$accel "$PYTHON" -m deepspeed.env_report 2>&1 | sed 's/\x1b\[[0-9;]*m//g') || {
    echo "$plain" >&2
    echo "dsfleet: ds_report failed (is deepspeed installed in $PYTHON's env?)" >&2
    exit 1
  }
  echo "$plain"
  for op in "${want[@]}"; do
    grep -Eq "^${op} \.+ \[YES\]" <<<"$plain" || missing+=("$op")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dsfleet: ops not prebuilt for DS_ACCELERATOR=$accel: ${missing[*]} — rerun docker/install.sh (CUDA_ARCH=${CUDA_ARCH:-})" >&2
    exit 1
  fi
  echo "dsfleet: prebuilt for $accel: ${want[*]}"
}

# The compiled halves of mamba-ssm and causal-conv1d: transformers' Mamba falls back to its pure-PyTorch scan,
# silently but for a warning, whenever `import mamba_ssm` / `import causal_conv1d` fails, and these are what fail.
check_mamba() {
  "$PYTHON" - <<'PY' || { echo "dsfleet: the Mamba CUDA kernels do not import — rerun docker/install.sh mamba (CUDA_ARCH=${CUDA_ARCH:-})" >&2; exit 1; }
import importlib.metadata as md
import sys
import torch  # noqa: F401  (the kernel libraries link against it)
try:
    import causal_conv1d_cuda, selective_scan_cuda
except ImportError as err:
    sys.exit(f"dsfleet: {err}")
for dist, lib in (("mamba_ssm", selective_scan_cuda), ("causal_conv1d", causal_conv1d_cuda)):
    print(f"dsfleet: {dist} {md.version(dist)}: {lib.__name__} from {lib.__file__}")
PY
}

for c in "${checks[@]}"; do "check_$c"; done
