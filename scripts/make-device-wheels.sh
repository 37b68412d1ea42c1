#!/usr/bin/env bash
# Assembles the GPU box's carried .whl/ from nothing, on a machine with PyPI (and, for libaio, Debian's apt).
# The box (python3.12, CUDA torch, transformers, nvcc, no network) lacks DeepSpeed and some of its and dsfleet's
# dependencies; scripts/device_env.sh installs .whl/*.whl into /tmp/site on every call, docker/install.sh builds
# from the sdists here (OFFLINE=1 WHEELHOUSE=.whl), scripts/gpu_ops_check.sh reads tools/ and debs/.
#
#   .whl/<pkg>-*.whl          cp312 manylinux / pure wheels of what the box image lacks (KINDS.md's package list)
#   .whl/deepspeed-V-py3-none-any.whl   DeepSpeed built here from its sdist with DS_BUILD_OPS=0 (pure Python:
#                             its ops JIT-build there, or come prebuilt from .whl/prebuilt/)
#   .whl/deepspeed-V.tar.gz   the sdist itself (docker/install.sh deepspeed builds the ops from it there)
#   .whl/mamba_ssm-V.tar.gz, causal_conv1d-V.tar.gz   CUDA sources for docker/install.sh mamba
#   .whl/tools/               setuptools + wheel (gpu_ops_check.sh's build venv, if the box lacks them)
#   .whl/debs/                libaio .debs (the box has no libaio; only the AIO op needs it)
#
# Usage: scripts/make-device-wheels.sh [DIR]        (default .whl in the repo root; created, existing files kept)
# Env: PYTHON  an interpreter with pip and torch (builds DeepSpeed's wheel; default .venv/bin/python, else python3)
#      DEEPSPEED_VERSION, MAMBA_SSM_VERSION, CAUSAL_CONV1D_VERSION: default to docker/install.sh's
#      NO_DEBS=1 skips the libaio .debs (no apt-get here)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=docker/common.sh
. "$repo/docker/common.sh"
dir=${1:-$repo/.whl}
PYTHON=${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3)}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-$DSFLEET_DEEPSPEED_VERSION}
MAMBA_SSM_VERSION=${MAMBA_SSM_VERSION:-$DSFLEET_MAMBA_SSM_VERSION}
CAUSAL_CONV1D_VERSION=${CAUSAL_CONV1D_VERSION:-$DSFLEET_CAUSAL_CONV1D_VERSION}
"$PYTHON" -c 'import torch' 2>/dev/null || die "PYTHON=$PYTHON has no torch (DeepSpeed's setup.py imports it) — run make setup first or point PYTHON at an env with torch"
mkdir -p "$dir" "$dir/tools"
log() { echo "make-device-wheels: $*"; }
pip=("$PYTHON" -m pip --disable-pip-version-check)

# The box's interpreter: CPython 3.12 on x86-64 glibc (manylinux tags pip must match exactly, README of device).
box=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for n in 17 27 28 34; do box+=(--platform "manylinux_2_${n}_x86_64"); done
box+=(--platform manylinux2014_x86_64 --platform any)

# What the image lacks among DeepSpeed's and dsfleet's runtime needs (the rest — numpy, msgpack, ninja, py-cpuinfo,
# einops, psutil, tqdm, packaging, pyyaml, rich, safetensors... — is there; KINDS.md lists the image's packages).
# pydantic-core is pinned by pydantic: take the pin from the pydantic wheel's metadata.
box_wheel() { "${pip[@]}" download -q --no-deps "${box[@]}" -d "$dir" "$@"; }
box_wheel pydantic annotated-types typing-inspection hjson
# the token cache and --streaming load raw text through `datasets` (pure Python; the image has pyarrow, pandas,
# fsspec, xxhash, but neither datasets nor its dill / multiprocess): the versions this venv's tests run
dver() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
box_wheel "datasets$(v=${DATASETS_VERSION:-$(dver datasets)} && [ -n "$v" ] && echo "==$v")" "dill$(v=$(dver dill) && echo "==$v")" \
  "multiprocess$(v=$(dver multiprocess) && echo "==$v")"
pyds=("$dir"/pydantic-[0-9]*.whl)
pyd=${pyds[-1]}
core_pin=$(unzip -p "$pyd" '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core *\(==[^; ]*\).*/\1/p' | head -1)
[ -n "$core_pin" ] || die "cannot read pydantic-core's pin from $pyd — inspect its METADATA"
box_wheel "pydantic-core$core_pin"

# DeepSpeed: the sdist (ops built on the box by docker/install.sh) and a pure-Python wheel made from it here.
"${pip[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d "$dir" "deepspeed==$DEEPSPEED_VERSION"
if ! compgen -G "$dir/deepspeed-$DEEPSPEED_VERSION-*.whl" >/dev/null; then
  log "building deepspeed $DEEPSPEED_VERSION wheel (DS_BUILD_OPS=0) from its sdist"
  DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$dir" \
    "$dir/deepspeed-$DEEPSPEED_VERSION.tar.gz"
fi

# Mamba's CUDA kernels, as sources. Their setup.py runs at download (metadata): skip its CUDA part there.
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "${pip[@]}" download -q --no-deps --no-binary :all: \
  --no-build-isolation -d "$dir" "mamba-ssm==$MAMBA_SSM_VERSION" "causal-conv1d==$CAUSAL_CONV1D_VERSION"

# Build tools for gpu_ops_check.sh's venv (pure wheels, not installed by device_env.sh: they live in tools/).
"${pip[@]}" download -q --no-deps --only-binary=:all: -d "$dir/tools" setuptools wheel

if [ "${NO_DEBS:-0}" != 1 ]; then
  if command -v apt-get >/dev/null; then
    mkdir -p "$dir/debs"
    # libaio1 (Debian 12) / libaio1t64 (Debian 13, Ubuntu 24.04): whichever this apt knows
    aio_lib=$(apt-cache show libaio1t64 >/dev/null 2>&1 && echo libaio1t64 || echo libaio1)
    (cd "$dir/debs" && apt-get download "$aio_lib" libaio-dev >/dev/null) || log "apt-get download libaio failed: AIO cannot be built on the box"
  else
    log "no apt-get here: .whl/debs/ (libaio, for gpu_ops_check.sh's AIO op) left out"
  fi
fi

# One version of each distribution: two stop device_env.sh's whole install.
dupes=$(find "$dir" -maxdepth 1 -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || die "$dir holds two versions of: $dupes — delete the older wheel(s)"
log "$(du -sh "$dir" | cut -f1) in $dir:"
find "$dir" -type f -printf '  %P  %s bytes\n' | sort
