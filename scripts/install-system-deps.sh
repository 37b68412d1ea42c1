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
# the image test builds the CPU image with buildah from a debootstrapped base (no Docker engine, no registry);
# installed with its recommended packages, as tested (docs/image.md)
image_tools=()
for bin in buildah debootstrap; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || image_tools+=("$bin")
done
if [ ${#missing[@]} -eq 0 ] && [ ${#image_tools[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "dsfleet: missing system packages: ${missing[*]} ${image_tools[*]} — install them (Debian: apt-get install ${missing[*]} ${image_tools[*]})" >&2
  exit 2
fi
echo "installing: ${missing[*]} ${image_tools[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
if [ ${#missing[@]} -gt 0 ]; then apt-get install -y -q --no-install-recommends "${missing[@]}"; fi
if [ ${#image_tools[@]} -gt 0 ]; then apt-get install -y -q "${image_tools[@]}"; fi
