#!/usr/bin/env bash
# Installs the Debian packages dsfleet's tests drive for real, only those missing. Needs root and apt.
set -euo pipefail
declare -A need=(
  [slurmctld]=slurm-wlm [munged]=munge [sshd]=openssh-server [ssh]=openssh-client
  [pdsh]=pdsh [mpirun]=openmpi-bin [mpicc]=libopenmpi-dev [shellcheck]=shellcheck [ip]=iproute2
)
missing=()
for bin in "${!need[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("${need[$bin]}")
done
[ -e /usr/include/libaio.h ] || missing+=(libaio-dev)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "dsfleet: missing system packages: ${missing[*]} — install them (Debian: apt-get install ${missing[*]})" >&2
  exit 2
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
