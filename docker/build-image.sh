#!/usr/bin/env bash
# `make image` / `make image-cpu`: stages a small build context and builds docker/Dockerfile with whichever
# builder this machine has (docker, podman, or buildah: no daemon needed), tagged with flavour and versions.
# Usage: build-image.sh CUDA_ARCH|cpu [IMAGE] [BASE_IMAGE]
# Env: CONTAINER_BUILDER (docker|podman|buildah; default: the first that works here), WHEELHOUSE (wheels/sdists
#      the build may install from, e.g. a CPU torch wheel), TORCH_VERSION, TORCH_INDEX_URL, DEEPSPEED_VERSION,
#      MAX_JOBS, USER_UID, DSFLEET_EXTRAS (passed as build args when set), BUILDAH_ISOLATION (default chroot:
#      works inside a container with no OCI runtime), BUILD_CA_BUNDLE (default $PIP_CERT: a CA bundle pip trusts
#      during the build only, for networks behind a TLS-intercepting proxy).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=docker/common.sh
. "$repo/docker/common.sh"

if [ $# -lt 1 ] || [ $# -gt 3 ]; then die "usage: build-image.sh CUDA_ARCH|cpu [IMAGE] [BASE_IMAGE]"; fi
[ -n "$1" ] || die "CUDA_ARCH is required for a GPU image — make image CUDA_ARCH=8.9 (or make image-cpu)"
arch=$(cuda_arch_list "$1")
image=${2:-dsfleet}
base=${3:-}
[[ "$image" =~ ^[a-z0-9]([a-z0-9._/-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9._-]+)*$ ]] ||
  die "IMAGE=$image is not an image repository name (lower case, no tag) — the tag is made from arch and versions"
torch_version=${TORCH_VERSION:-2.13.0}
ds_version=${DEEPSPEED_VERSION:-0.19.8}
if [ "$arch" = cpu ]; then
  base=${base:-ubuntu:24.04}
  flavour=cpu
else
  base=${base:-nvidia/cuda:13.0.2-devel-ubuntu24.04}
  flavour=$(sed -e 's/+PTX/ptx/g' -e 's/\.//g' -e 's/;/-sm/g' -e 's/^/sm/' <<<"$arch")
fi
tag="$image:$flavour-torch${torch_version%%+*}-ds$ds_version"
alias_tag="$image:$flavour"

builder=${CONTAINER_BUILDER:-}
if [ -z "$builder" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then builder=docker
  elif command -v podman >/dev/null; then builder=podman
  elif command -v buildah >/dev/null; then builder=buildah
  else die "no image builder here (docker with a running engine, podman or buildah) — apt-get install buildah"
  fi
fi
case "$builder" in docker | podman | buildah) ;; *) die "CONTAINER_BUILDER=$builder — use docker, podman or buildah" ;; esac
command -v "$builder" >/dev/null || die "CONTAINER_BUILDER=$builder is not installed"
[ -z "${WHEELHOUSE:-}" ] || [ -d "$WHEELHOUSE" ] || die "WHEELHOUSE=$WHEELHOUSE is not a directory"

# The context holds only what the Dockerfile copies, so a .venv or run dirs never travel to the builder.
ctx=$(mktemp -d "${TMPDIR:-/tmp}/dsfleet-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/docker" "$ctx/wheels"
cp "$repo"/docker/Dockerfile "$repo"/docker/*.sh "$repo"/docker/*.py "$ctx/docker/"
cp "$repo/pyproject.toml" "$repo/README.md" "$ctx/"
tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' -cf - src | tar -C "$ctx" -xf -
if [ -n "${WHEELHOUSE:-}" ]; then
  find "$WHEELHOUSE" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' -o -name '*.zip' \) \
    -exec cp -l {} "$ctx/wheels/" \; 2>/dev/null ||
    find "$WHEELHOUSE" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' -o -name '*.zip' \) -exec cp {} "$ctx/wheels/" \;
fi

# A TLS-intercepting proxy's CA (this host's PIP_CERT) must reach pip inside the build, never the image:
# it rides in the bind-mounted wheels/ dir, and PIP_CERT is a build arg, not an ENV of the image.
ca=${BUILD_CA_BUNDLE:-${PIP_CERT:-}}
ca_args=()
if [ -n "$ca" ]; then
  [ -f "$ca" ] || die "BUILD_CA_BUNDLE/PIP_CERT=$ca is not a file — point it at the CA bundle pip should trust"
  cp "$ca" "$ctx/wheels/ca-bundle.crt"
  ca_args=(--build-arg PIP_CERT=/wheels/ca-bundle.crt)
fi

args=("${ca_args[@]}" --build-arg "BASE_IMAGE=$base" --build-arg "CUDA_ARCH=$arch" --build-arg "TORCH_VERSION=$torch_version"
  --build-arg "DEEPSPEED_VERSION=$ds_version")
for var in TORCH_INDEX_URL MAX_JOBS USER_UID DSFLEET_EXTRAS; do
  if [ -n "${!var+set}" ]; then args+=(--build-arg "$var=${!var}"); fi
done
args+=(-f "$ctx/docker/Dockerfile" -t "$tag" -t "$alias_tag")
case "$builder" in
  docker) cmd=(env DOCKER_BUILDKIT=1 docker build "${args[@]}" "$ctx") ;;
  podman) cmd=(podman build --layers "${args[@]}" "$ctx") ;;
  buildah) cmd=(buildah bud --layers --isolation "${BUILDAH_ISOLATION:-chroot}" "${args[@]}" "$ctx") ;;
esac
echo "dsfleet image: ${cmd[*]}"
t0=$SECONDS
"${cmd[@]}"
echo "dsfleet image: built $tag (also $alias_tag) from $base with $builder in $((SECONDS - t0)) s"
