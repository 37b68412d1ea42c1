#!/usr/bin/env bash
# The build gate: runs ds_report and fails unless every op this flavour needs shows as installed (prebuilt).
# Env: PYTHON (interpreter of the env to check), CUDA_ARCH (empty/cpu = CPU flavour). Exit 1 = ops missing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=docker/common.sh
. "$here/common.sh"
PYTHON=${PYTHON:-python3}
arch=$(cuda_arch_list "${CUDA_ARCH:-}")
accel=$(ds_accelerator "$arch")
read -ra want <<<"$(required_ops "$arch")"
# ds_report lists ops for the running accelerator and says [YES] only when the op was prebuilt for it.
bindir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
# Colours stripped so the table can be read (and grepped) as plain text.
plain=$(PATH="$bindir:$PATH" DS_ACCELERATOR=$accel "$PYTHON" -m deepspeed.env_report 2>&1 | sed 's/\x1b\[[0-9;]*m//g') || {
  echo "$plain" >&2
  echo "dsfleet: ds_report failed (is deepspeed installed in $PYTHON's env?)" >&2
  exit 1
}
echo "$plain"
missing=()
for op in "${want[@]}"; do
  grep -Eq "^${op} \.+ \[YES\]" <<<"$plain" || missing+=("$op")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "dsfleet: ops not prebuilt for DS_ACCELERATOR=$accel: ${missing[*]} — rerun docker/install.sh (CUDA_ARCH=${CUDA_ARCH:-})" >&2
  exit 1
fi
echo "dsfleet: prebuilt for $accel: ${want[*]}"
