#!/usr/bin/env bash
# With no registry to pull from, the CPU flavour still needs a base: this debootstraps a minimal Debian into a
# buildah container and commits it as localhost/dsfleet-base:SUITE (kept; a second call returns at once).
# Usage: make-local-base.sh [SUITE]   (default bookworm); Env: DEBIAN_MIRROR (default http://deb.debian.org/debian)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=docker/common.sh
. "$here/common.sh"
suite=${1:-bookworm}
[[ "$suite" =~ ^[a-z]+$ ]] || die "SUITE=$suite is not a Debian suite name — e.g. bookworm"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
name=localhost/dsfleet-base:$suite
command -v buildah >/dev/null || die "buildah is not installed — apt-get install buildah"
command -v debootstrap >/dev/null || die "debootstrap is not installed — apt-get install debootstrap"
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root — run as root"
if buildah inspect --type image "$name" >/dev/null 2>&1; then echo "$name"; exit 0; fi
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root=$(buildah mount "$ctr")
debootstrap --variant=minbase "$suite" "$root" "$mirror" >&2
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
buildah config --env LANG=C.UTF-8 --cmd bash "$ctr"
buildah umount "$ctr" >/dev/null
buildah commit -q "$ctr" "$name" >/dev/null
echo "$name"
