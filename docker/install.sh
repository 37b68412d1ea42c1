#!/usr/bin/env bash
# The one DeepSpeed install: the Dockerfile RUNs it and `make venv`/`make setup` run it on bare metal, so CI,
# the image and the GPU box run the same steps. Idempotent: with everything built for this flavour it takes seconds.
#
# Usage: install.sh [torch] [deepspeed] [mamba] [dsfleet]   (no argument: all; mamba only when DSFLEET_MAMBA_KERNELS
#        resolves to 1, dsfleet only when DSFLEET_SRC is set)
# Env:
#   PYTHON             interpreter of the target env (default python3)
#   CUDA_ARCH          compute capabilities for the GPU ops: 8.9, "8.0;9.0", 9.0+PTX; empty or cpu = CPU build
#   DSFLEET_SRC        path to install dsfleet from; DSFLEET_EDITABLE (1: pip -e), DSFLEET_EXTRAS (default test)
#   DEEPSPEED_VERSION  default common.sh's (0.19.8), built from its sdist with CPU Adam + AIO, and fused Adam (CUDA) or the
#                      shared-memory collective (CPU: what the CPU accelerator JIT-builds at init_distributed)
#   TORCH_VERSION      empty: keep any torch of the right flavour (CUDA build for CUDA_ARCH), else install 2.13.0;
#                      set: the installed torch must be that version ("2.13.0" or exactly "2.13.0+cpu")
#   TORCH_INDEX_URL    empty: pip's configured index; auto: download.pytorch.org/whl/cpu or /cuXYZ (from nvcc); a URL
#   WHEELHOUSE         a dir of wheels/sdists pip looks in first; OFFLINE=1 adds --no-index (a box with no network)
#   DSFLEET_MAMBA_KERNELS  1: build mamba-ssm's selective scan and causal-conv1d's CUDA kernels for CUDA_ARCH from
#                      their sdists (transformers' Mamba uses them when they import; otherwise a pure-PyTorch scan);
#                      0: not; empty: 1 for a GPU CUDA_ARCH, 0 for CPU. MAMBA_SSM_VERSION / CAUSAL_CONV1D_VERSION
#                      default to common.sh's; NVCC_THREADS replaces their nvcc --threads (default theirs, 4)
#   DS_FORCE_BUILD=1   rebuild the ops (and the Mamba kernels) even when the installed build matches; MAX_JOBS
#                      compile jobs (default nproc)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=docker/common.sh
. "$here/common.sh"

PYTHON=${PYTHON:-python3}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-$DSFLEET_DEEPSPEED_VERSION}
MAMBA_SSM_VERSION=${MAMBA_SSM_VERSION:-$DSFLEET_MAMBA_SSM_VERSION}
CAUSAL_CONV1D_VERSION=${CAUSAL_CONV1D_VERSION:-$DSFLEET_CAUSAL_CONV1D_VERSION}
DEFAULT_TORCH_VERSION=2.13.0
TORCH_VERSION=${TORCH_VERSION:-}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
DSFLEET_SRC=${DSFLEET_SRC:-}
DSFLEET_EDITABLE=${DSFLEET_EDITABLE:-1}
DSFLEET_EXTRAS=${DSFLEET_EXTRAS-test}
WHEELHOUSE=${WHEELHOUSE:-}
OFFLINE=${OFFLINE:-0}

# ---- inputs, all checked before anything is installed -----------------------------------------------------------
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(torch deepspeed mamba dsfleet)
for s in "${steps[@]}"; do
  case "$s" in torch | deepspeed | mamba | dsfleet) ;; *) die "unknown step '$s' — steps are: torch deepspeed mamba dsfleet" ;; esac
done
want() { [[ " ${steps[*]} " == *" $1 "* ]]; }
arch=$(cuda_arch_list "${CUDA_ARCH:-}")
accel=$(ds_accelerator "$arch")
read -ra ops <<<"$(required_ops "$arch")"
mamba=$(mamba_kernels_wanted "$arch")
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null ||
  die "PYTHON=$PYTHON is not a Python >= 3.10 — point PYTHON at the target env's interpreter"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "PYTHON=$PYTHON has no pip — create the env with python3 -m venv"
[ -z "$WHEELHOUSE" ] || [ -d "$WHEELHOUSE" ] || die "WHEELHOUSE=$WHEELHOUSE is not a directory — point it at the carried wheels/sdists"
[ -z "$DSFLEET_SRC" ] || [ -f "$DSFLEET_SRC/pyproject.toml" ] || die "DSFLEET_SRC=$DSFLEET_SRC has no pyproject.toml — point it at the dsfleet checkout"
case "$OFFLINE" in 0 | 1) ;; *) die "OFFLINE=$OFFLINE — use 1 (no network: only WHEELHOUSE) or 0" ;; esac
[ "$OFFLINE" = 0 ] || [ -n "$WHEELHOUSE" ] || die "OFFLINE=1 needs WHEELHOUSE (the dir of carried wheels/sdists)"

pip_source=()
[ -z "$WHEELHOUSE" ] || pip_source+=(--find-links "$WHEELHOUSE")
[ "$OFFLINE" = 0 ] || pip_source+=(--no-index)
pip=("$PYTHON" -m pip install --disable-pip-version-check "${pip_source[@]}")
# Console scripts of the env (ninja, ds_report) must be found by the build and by check-ops.sh.
bindir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$bindir:$PATH"
log() { echo "dsfleet install: $*"; }

# Prints the distributions among "$@" (import names mapped by pip names) that the env lacks.
missing_dists() {
  "$PYTHON" - "$@" <<'PY'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        print(name)
PY
}

# Prints "VERSION CUDA" of the env's torch (CUDA is "none" for a CPU build); fails when torch is absent.
torch_state() { "$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")' 2>/dev/null; }

# Prints MAJOR.MINOR of the CUDA toolkit's nvcc; fails when there is none.
nvcc_release() {
  local nvcc
  nvcc=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
  [ -n "$nvcc" ] && [ -x "$nvcc" ] || nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  [ -x "$nvcc" ] || return 1
  "$nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p'
}

torch_ok() {
  local state version cuda
  state=$(torch_state) || return 1
  read -r version cuda <<<"$state"
  if [ "$arch" != cpu ] && [ "$cuda" = none ]; then
    log "torch $version is a CPU build; CUDA_ARCH=$arch needs a CUDA build"
    return 1
  fi
  [ -z "$TORCH_VERSION" ] && return 0
  if [[ "$TORCH_VERSION" == *+* ]]; then [ "$version" = "$TORCH_VERSION" ]; else [ "${version%%+*}" = "$TORCH_VERSION" ]; fi ||
    { log "torch $version is not the pinned $TORCH_VERSION"; return 1; }
}

# ---- 1. torch: keep a matching one (the GPU box brings its own), else the pinned build of this flavour -----------
install_torch() {
  if torch_ok; then
    local state
    state=$(torch_state)
    log "keeping torch ${state% *} ($([ "${state#* }" = none ] && echo CPU build || echo "CUDA ${state#* }"))"
    return 0
  fi
  local index=() url=$TORCH_INDEX_URL release
  if [ "$url" = auto ]; then
    if [ "$arch" = cpu ]; then
      url=https://download.pytorch.org/whl/cpu
    else
      release=$(nvcc_release) || die "CUDA_ARCH=$arch needs the CUDA toolkit (nvcc) to pick torch — use a CUDA devel BASE_IMAGE or set CUDA_HOME"
      url=https://download.pytorch.org/whl/cu${release//./}
    fi
  fi
  [ -z "$url" ] || index=(--index-url "$url")
  log "installing torch==${TORCH_VERSION:-$DEFAULT_TORCH_VERSION} ${url:+from $url}"
  "${pip[@]}" "${index[@]}" "torch==${TORCH_VERSION:-$DEFAULT_TORCH_VERSION}"
  torch_ok || die "the torch just installed does not fit CUDA_ARCH=${CUDA_ARCH:-cpu} — set TORCH_INDEX_URL (auto picks the CUDA build from nvcc)"
}

# ---- 2. DeepSpeed with the ops prebuilt; rebuilt only when the installed build is not this one -------------------
build_id() {
  echo "deepspeed=$DEEPSPEED_VERSION torch=$(torch_state | tr ' ' /) accelerator=$accel arch=$arch ops=${ops[*]}"
}

# Succeeds when deepspeed carries this script's build for this flavour and every required op imports.
deepspeed_built() {
  DS_ACCELERATOR=$accel "$PYTHON" - "$(build_id)" "${ops[@]}" <<'PY' 2>/dev/null
import importlib.util, os, sys
want, ops = sys.argv[1], sys.argv[2:]
spec = importlib.util.find_spec("deepspeed")
if spec is None:
    print("dsfleet install: deepspeed is not installed"); sys.exit(1)
marker = os.path.join(spec.submodule_search_locations[0], "dsfleet_build.txt")
have = open(marker).read().strip() if os.path.exists(marker) else "deepspeed without prebuilt ops"
if have != want:
    print(f"dsfleet install: installed: {have}\ndsfleet install: wanted:    {want}"); sys.exit(1)
import torch  # noqa: F401  (the op libraries link against it)
from deepspeed.git_version_info import installed_ops
from deepspeed.ops.op_builder.all_ops import ALL_OPS
for op in ops:
    if not installed_ops.get(op):
        print(f"dsfleet install: op {op} is not prebuilt"); sys.exit(1)
    # The builder's load() imports the prebuilt library (async_io needs pin_memory's loaded first); it would
    # JIT-compile only an op that is not prebuilt, and those were rejected just above.
    ALL_OPS[op].load()
PY
}

check_toolchain() {
  local cc=${CC:-cc} probe
  command -v "$cc" >/dev/null || die "no C compiler ($cc) to build the DeepSpeed ops — install build-essential (Debian/Ubuntu)"
  command -v "${CXX:-c++}" >/dev/null || die "no C++ compiler to build the DeepSpeed ops — install build-essential (Debian/Ubuntu)"
  probe=$(mktemp -d)
  printf '#include <libaio.h>\nint main(void) { return io_submit(0, 0, 0); }\n' >"$probe/aio.c"
  # shellcheck disable=SC2086  # CFLAGS/LDFLAGS are flag lists, split on purpose (DeepSpeed's probe reads them too)
  "$cc" ${CFLAGS:-} "$probe/aio.c" -o "$probe/aio" ${LDFLAGS:-} -laio >/dev/null 2>&1 ||
    { rm -rf "$probe"; die "libaio headers/library not found (AIO op) — apt-get install libaio-dev, or set CFLAGS=-I.. LDFLAGS=-L.."; }
  rm -rf "$probe"
  if [ "$arch" != cpu ]; then check_cuda_toolchain; fi
}

check_cuda_toolchain() {
  local release torch_cuda
  release=$(nvcc_release) || die "CUDA_ARCH=$arch needs the CUDA toolkit (nvcc) — use a CUDA devel BASE_IMAGE or set CUDA_HOME"
  torch_cuda=$(torch_state | cut -d' ' -f2)
  [ "${release%%.*}" = "${torch_cuda%%.*}" ] ||
    die "nvcc is CUDA $release but torch was built for CUDA $torch_cuda — use a BASE_IMAGE with CUDA $torch_cuda (or the torch for $release)"
}

install_deepspeed() {
  local deps=() missing=()
  torch_state >/dev/null || die "torch is not installed in $PYTHON's env — run install.sh with the torch step first"
  # DeepSpeed's runtime requirements, installed before it so that its own install can be --no-deps
  # (resolving deepspeed's dependencies could replace the torch kept above).
  deps=(einops hjson msgpack numpy packaging psutil py-cpuinfo pydantic tqdm setuptools wheel)
  command -v ninja >/dev/null || deps+=(ninja)
  mapfile -t missing < <(missing_dists "${deps[@]}")
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    "${pip[@]}" "${missing[@]}"
  fi
  if [ "${DS_FORCE_BUILD:-0}" != 1 ] && deepspeed_built; then
    log "deepspeed $DEEPSPEED_VERSION already built with ${ops[*]} for $accel (arch $arch) — nothing to do"
    return 0
  fi
  check_toolchain
  local build_env=(DS_BUILD_OPS=0 DS_ACCELERATOR="$accel" DS_ENABLE_NINJA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}")
  local op var
  for op in "${ops[@]}"; do
    case "$op" in
      cpu_adam) var=DS_BUILD_CPU_ADAM ;; async_io) var=DS_BUILD_AIO ;; fused_adam) var=DS_BUILD_FUSED_ADAM ;;
      deepspeed_shm_comm) var=DS_BUILD_SHM_COMM ;; *) die "internal: no build variable for op $op" ;;
    esac
    build_env+=("$var=1")
  done
  # No GPU is needed to build: the arch list says what to compile for (TORCH_CUDA_ARCH_LIST), DS_ACCELERATOR for which.
  if [ "$arch" = cpu ]; then
    # DeepSpeed's CPU op builder links its prebuilt ops without their extra ldflags, so async_io would lack
    # libaio (undefined symbol io_submit at load); name it here, kept even where the linker drops unused libs.
    build_env+=(TORCH_CUDA_ARCH_LIST= LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,--no-as-needed -laio")
  else
    build_env+=(TORCH_CUDA_ARCH_LIST="$arch")
  fi
  log "building deepspeed $DEEPSPEED_VERSION from source: ${build_env[*]}"
  local t0=$SECONDS
  # --no-binary: only the sdist has the op sources; --no-cache-dir: a cached wheel may lack the ops;
  # --no-build-isolation: build against the torch installed here, never a freshly downloaded one.
  env "${build_env[@]}" "${pip[@]}" --no-deps --no-build-isolation --no-cache-dir --force-reinstall \
    --no-binary deepspeed "deepspeed==$DEEPSPEED_VERSION"
  log "deepspeed build took $((SECONDS - t0)) s"
  PYTHON=$PYTHON CUDA_ARCH=$arch bash "$here/check-ops.sh" deepspeed
  local pkg
  pkg=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("deepspeed").submodule_search_locations[0])')
  build_id >"$pkg/dsfleet_build.txt"
  deepspeed_built || die "deepspeed was built but its ops do not load — see the build log above"
  log "deepspeed $DEEPSPEED_VERSION built with ${ops[*]} for $accel"
}

# ---- 3. Mamba's CUDA kernels (mamba-ssm, causal-conv1d), built from their sdists for CUDA_ARCH alone -------------
mamba_build_id() {
  echo "mamba_ssm=$MAMBA_SSM_VERSION causal_conv1d=$CAUSAL_CONV1D_VERSION torch=$(torch_state | tr ' ' /) arch=$arch"
}

# Succeeds when mamba_ssm carries this script's build and both kernel libraries import.
mamba_built() {
  "$PYTHON" - "$(mamba_build_id)" <<'PY' 2>/dev/null
import importlib.util, os, sys
spec = importlib.util.find_spec("mamba_ssm")
if spec is None:
    print("dsfleet install: mamba_ssm is not installed"); sys.exit(1)
marker = os.path.join(spec.submodule_search_locations[0], "dsfleet_build.txt")
have = open(marker).read().strip() if os.path.exists(marker) else "mamba_ssm not built by dsfleet"
if have != sys.argv[1]:
    print(f"dsfleet install: installed: {have}\ndsfleet install: wanted:    {sys.argv[1]}"); sys.exit(1)
import torch  # noqa: F401  (the kernel libraries link against it)
import causal_conv1d_cuda, selective_scan_cuda  # noqa: F401
PY
}

# build_cuda_sdist SDIST WHEEL_DIR: a wheel of SDIST whose nvcc targets are TORCH_CUDA_ARCH_LIST alone. Both
# packages' setup.py hard-code a -gencode pair for every architecture their nvcc knows (nine with CUDA 13, which is
# why one build took over 8 minutes); this drops those pairs from each CUDAExtension's nvcc flags, so torch's
# BuildExtension adds the TORCH_CUDA_ARCH_LIST ones, and runs the sdist's own setuptools backend in this process.
build_cuda_sdist() {
  "$PYTHON" - "$1" "$2" <<'PY'
import os, sys, tarfile, tempfile
sdist, wheel_dir = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
work = tempfile.mkdtemp(prefix="dsfleet-sdist-")
with tarfile.open(sdist) as tar:
    tar.extractall(work, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(work)
(src,) = [os.path.join(work, d) for d in os.listdir(work)]
threads = os.environ.get("NVCC_THREADS", "")
dropped = []

def own_arch_flags(flags):
    kept, it = [], iter(flags)
    for flag in it:
        if flag in ("-gencode", "--generate-code"):
            dropped.append(next(it, ""))
        elif flag.startswith(("-gencode=", "--generate-code=", "-arch=", "--gpu-architecture=")):
            dropped.append(flag)
        elif flag == "--threads" and threads:
            next(it, None)
            kept += ["--threads", threads]
        else:
            kept.append(flag)
    return kept

import torch.utils.cpp_extension as cpp_extension
upstream = cpp_extension.CUDAExtension

def CUDAExtension(name, sources, *args, **kwargs):
    flags = kwargs.get("extra_compile_args")
    if isinstance(flags, dict) and "nvcc" in flags:
        flags["nvcc"] = own_arch_flags(flags["nvcc"])
    return upstream(name, sources, *args, **kwargs)

cpp_extension.CUDAExtension = CUDAExtension  # setup.py's `from torch.utils.cpp_extension import` finds this one
os.chdir(src)
sys.path.insert(0, src)
from setuptools import build_meta
name = build_meta.build_wheel(wheel_dir)
print(f"dsfleet install: built {name} for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')} "
      f"({len(dropped)} hard-coded nvcc targets dropped: {' '.join(dropped)})")
PY
}

install_mamba() {
  [ "$mamba" = 1 ] || return 0
  torch_state >/dev/null || die "torch is not installed in $PYTHON's env — run install.sh with the torch step first"
  # What mamba_ssm imports at run time besides torch/triton/transformers; their other requirements (tilelang,
  # quack-kernels: Mamba-3 only, imported inside try blocks) are left out, hence --no-deps below.
  local deps=(einops packaging setuptools wheel) missing=()
  command -v ninja >/dev/null || deps+=(ninja)
  mapfile -t missing < <(missing_dists "${deps[@]}")
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    "${pip[@]}" "${missing[@]}"
  fi
  if [ "${DS_FORCE_BUILD:-0}" != 1 ] && mamba_built; then
    log "mamba kernels already built ($(mamba_build_id)) — nothing to do"
    return 0
  fi
  check_cuda_toolchain
  local tmp t0=$SECONDS
  tmp=$(mktemp -d)
  # Their setup.py runs when pip reads the sdists' metadata: skip its CUDA part there.
  MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip download -q --disable-pip-version-check \
    "${pip_source[@]}" --no-deps --no-binary :all: --no-build-isolation -d "$tmp/src" \
    "causal-conv1d==$CAUSAL_CONV1D_VERSION" "mamba-ssm==$MAMBA_SSM_VERSION"
  local build_env=(TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE)  # FORCE_BUILD: compile, never fetch a wheel from GitHub
  log "building causal-conv1d $CAUSAL_CONV1D_VERSION and mamba-ssm $MAMBA_SSM_VERSION side by side: ${build_env[*]}"
  # Side by side: causal-conv1d's 4 sources beside mamba's 11 keep the cores busy (one nvcc target each).
  (export "${build_env[@]}" && build_cuda_sdist "$tmp/src/causal_conv1d-$CAUSAL_CONV1D_VERSION.tar.gz" "$tmp/wheels") \
    >"$tmp/causal_conv1d.log" 2>&1 &
  local conv_pid=$! rc=0 conv_rc=0
  (export "${build_env[@]}" && build_cuda_sdist "$tmp/src/mamba_ssm-$MAMBA_SSM_VERSION.tar.gz" "$tmp/wheels") \
    >"$tmp/mamba_ssm.log" 2>&1 || rc=$?
  wait "$conv_pid" || conv_rc=$?
  local name
  for name in causal_conv1d mamba_ssm; do
    echo "---- $name build log"
    grep -v -e '^ptxas info' -e '^    ' -e 'bytes stack frame' "$tmp/$name.log" || true  # ptxas -v: thousands of lines
  done
  [ "$conv_rc" = 0 ] || die "causal-conv1d $CAUSAL_CONV1D_VERSION did not build (exit $conv_rc) — see its log above"
  [ "$rc" = 0 ] || die "mamba-ssm $MAMBA_SSM_VERSION did not build (exit $rc) — see its log above"
  log "mamba kernels build took $((SECONDS - t0)) s"
  "${pip[@]}" --no-deps --force-reinstall --no-cache-dir "$tmp"/wheels/*.whl
  local pkg
  pkg=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("mamba_ssm").submodule_search_locations[0])')
  mamba_build_id >"$pkg/dsfleet_build.txt"
  PYTHON=$PYTHON CUDA_ARCH=$arch bash "$here/check-ops.sh" mamba
  mamba_built || die "the Mamba kernels were built but do not import — see the build log above"
  rm -rf "$tmp"
  log "mamba kernels built for arch $arch"
}

# ---- 4. dsfleet itself -------------------------------------------------------------------------------------------
install_dsfleet() {
  [ -n "$DSFLEET_SRC" ] || return 0
  local target=$DSFLEET_SRC
  [ -z "$DSFLEET_EXTRAS" ] || target="${DSFLEET_SRC}[${DSFLEET_EXTRAS}]"
  if [ "$DSFLEET_EDITABLE" = 1 ]; then "${pip[@]}" -q -e "$target"; else "${pip[@]}" -q "$target"; fi
  log "dsfleet installed from $DSFLEET_SRC"
}

if want torch; then install_torch; fi
if want deepspeed; then install_deepspeed; fi
if want mamba; then install_mamba; fi
if want dsfleet; then install_dsfleet; fi
