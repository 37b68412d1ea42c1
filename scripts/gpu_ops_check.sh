#!/usr/bin/env bash
# One device call on the GPU box (H100, python3 + CUDA torch preinstalled, no network): docker/install.sh builds
# DeepSpeed's CPU Adam + AIO + fused Adam for sm_90 from the carried .whl/ (sdist + wheels), timed; ds_report must
# list them installed; then 1-GPU ZeRO-2 steps (optimizer offloaded to CPU: CPU Adam; not offloaded: fused Adam)
# and an AIO round trip must run with nothing JIT-compiled. Everything lands in $OUT (log, ds_report, timings).
# Carry: .whl (deepspeed-*.tar.gz, deepspeed's missing deps as py3.12 wheels, tools/ setuptools+wheel, debs/ libaio).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_ops_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_ops_check.log") 2>&1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1
arch=${CUDA_ARCH:-9.0}
fails=()
fail() { echo "FAIL: $*"; fails+=("$*"); }

echo "== machine"
nvidia-smi -L
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
{ command -v nvcc || ls /usr/local/cuda/bin/nvcc; } && "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -2
echo "TORCH_CUDA_ARCH_LIST in the environment: ${TORCH_CUDA_ARCH_LIST:-unset} (the build uses CUDA_ARCH=$arch)"
nproc

# A venv that sees the preinstalled torch; the system pip installs into it (no pip copy needed, no network).
venv=/tmp/dsfleet-ops-venv
rm -rf "$venv"
python3 -m venv --system-site-packages --without-pip "$venv" || { echo "FAIL: cannot create a venv"; exit 1; }
py=$venv/bin/python
# The box's python3 may itself live in a venv (/opt/torch/.venv): --system-site-packages then shows the base
# interpreter's packages, not that venv's torch. A .pth file puts the parent env's site-packages on the path.
parent_site=$(python3 -c 'import site; print("\n".join(site.getsitepackages()))')
"$py" -c 'import site; print(site.getsitepackages()[0])' | { read -r own; printf '%s\n' "$parent_site" >"$own/_box_parent_env.pth"; }
"$py" -c 'import torch' 2>/dev/null || { echo "FAIL: the venv does not see the box's torch"; exit 1; }
"$py" -c 'import setuptools, wheel' 2>/dev/null ||
  "$py" -m pip install -q --no-index --find-links .whl/tools setuptools wheel || fail "setuptools/wheel"

# libaio: the AIO op needs its header and library; carried Debian packages stand in when the box lacks them.
if ! printf '#include <libaio.h>\nint main(void){return io_submit(0,0,0);}\n' | cc -x c - -o /tmp/aio_probe -laio 2>/dev/null; then
  echo "== libaio not on the box: using the carried packages"
  aio=/tmp/libaio-root
  rm -rf "$aio" && mkdir -p "$aio"
  for deb in .whl/debs/libaio*.deb; do
    if command -v dpkg-deb >/dev/null; then dpkg-deb -x "$deb" "$aio"
    else (tmp=$(mktemp -d) && cd "$tmp" && ar x "$repo/$deb" && tar -xf data.tar.* -C "$aio"); fi
  done
  libdir=$(dirname "$(find "$aio" -name 'libaio.so*' | head -1)")
  export CPATH="$aio/usr/include${CPATH:+:$CPATH}" LIBRARY_PATH="$libdir${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

echo "== build: docker/install.sh torch deepspeed (CUDA_ARCH=$arch, offline, from .whl)"
t0=$(date +%s.%N)
PYTHON=$py CUDA_ARCH=$arch WHEELHOUSE=$repo/.whl OFFLINE=1 DS_FORCE_BUILD=1 bash docker/install.sh torch deepspeed
rc=$?
t1=$(date +%s.%N)
build_s=$(python3 -c "print(round($t1 - $t0, 1))")
[ $rc -eq 0 ] || { fail "install.sh exited $rc"; printf 'GPU OPS CHECK FAILED: %s\n' "${fails[@]}"; exit 1; }
echo "== second run (must find everything built and do nothing)"
t2=$(date +%s.%N)
PYTHON=$py CUDA_ARCH=$arch WHEELHOUSE=$repo/.whl OFFLINE=1 bash docker/install.sh torch deepspeed | tee "$OUT/second_run.txt"
t3=$(date +%s.%N)
again_s=$(python3 -c "print(round($t3 - $t2, 1))")
grep -q "nothing to do" "$OUT/second_run.txt" || fail "second install.sh run rebuilt"
printf 'build_s=%s\nsecond_run_s=%s\ncuda_arch=%s\nnproc=%s\n' "$build_s" "$again_s" "$arch" "$(nproc)" | tee "$OUT/timings.txt"

echo "== ds_report"
PATH=$venv/bin:$PATH DS_ACCELERATOR=cuda "$py" -m deepspeed.env_report 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >"$OUT/ds_report.txt"
cat "$OUT/ds_report.txt"
PYTHON=$py CUDA_ARCH=$arch bash docker/check-ops.sh deepspeed >/dev/null || fail "ds_report does not list cpu_adam/async_io/fused_adam installed"

# Steps with an empty torch-extensions dir: any JIT build would land there. TORCH_CUDA_ARCH_LIST is set to a
# value a JIT build could use, so that the empty dir, not a parse error, is what proves nothing was built.
step() {
  local name=$1
  shift
  local ext=/tmp/dsfleet-jit-$name
  rm -rf "$ext" && mkdir -p "$ext"
  echo "== $name: $*"
  PATH=$venv/bin:$PATH TORCH_EXTENSIONS_DIR=$ext TORCH_CUDA_ARCH_LIST=$arch timeout 300 \
    "$py" -m deepspeed.launcher.runner --num_gpus 1 --master_port 29731 docker/offload_step.py "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "OFFLOAD_STEP|Error|error" "$OUT/$name.log" | tail -5
  [ $rc -eq 0 ] || fail "$name exited $rc"
  grep -q '"jit_built": \[\]' "$OUT/$name.log" || fail "$name: something was JIT-built: $(ls "$ext")"
  [ -z "$(ls -A "$ext")" ] || fail "$name: $ext is not empty: $(ls "$ext")"
  if grep -Eq "Building extension module|Loading extension module|Emitting ninja" "$OUT/$name.log"; then fail "$name: JIT messages in the log"; fi
}
aio_dir=/var/tmp/dsfleet-aio  # a disk, not tmpfs: the AIO op opens files with O_DIRECT
rm -rf "$aio_dir" && mkdir -p "$aio_dir"
step zero2_offload_cpu --zero 2 --offload_optimizer cpu --steps 3 --aio_dir "$aio_dir"
grep -q '"cpu_adam": "[^"]*site-packages/deepspeed/ops/adam/cpu_adam_op' "$OUT/zero2_offload_cpu.log" || fail "cpu_adam not loaded from the prebuilt library"
grep -q '"async_io": "[^"]*site-packages/deepspeed/ops/aio/' "$OUT/zero2_offload_cpu.log" || fail "async_io not loaded from the prebuilt library"
step zero2_fused_adam --zero 2 --offload_optimizer none --steps 3
grep -q '"fused_adam": "[^"]*site-packages/deepspeed/ops/adam/fused_adam_op' "$OUT/zero2_fused_adam.log" || fail "fused_adam not loaded from the prebuilt library"
rm -rf "$aio_dir"

# The same through dsfleet's entry point, when the box has its dependencies (transformers etc.).
if "$py" -c 'import transformers' 2>/dev/null; then
  ext=/tmp/dsfleet-jit-train && rm -rf "$ext" /tmp/dsfleet-ops-run && mkdir -p "$ext"
  echo "== dsfleet.train gpt2_tiny ZeRO-2 offload_optimizer cpu"
  PATH=$venv/bin:$PATH PYTHONPATH=$repo/src TORCH_EXTENSIONS_DIR=$ext TORCH_CUDA_ARCH_LIST=$arch timeout 300 \
    "$py" -m deepspeed.launcher.runner --num_gpus 1 --master_port 29732 --module dsfleet.train --preset gpt2_tiny \
    --from_scratch --synthetic_data --zero 2 --offload_optimizer cpu --max_steps 2 --no_progress \
    --output_dir /tmp/dsfleet-ops-run >"$OUT/dsfleet_train.log" 2>&1
  rc=$?
  echo "dsfleet.train rc=$rc jit dir: [$(ls -A "$ext")]"
  tail -2 /tmp/dsfleet-ops-run/metrics.jsonl 2>/dev/null | tee "$OUT/dsfleet_train_metrics.jsonl"
  [ -z "$(ls -A "$ext")" ] || fail "dsfleet.train JIT-built: $(ls "$ext")"
  # Informational: the box may lack some of dsfleet's own dependencies; offload_step.py above is the proof.
  [ $rc -eq 0 ] || { echo "NOTE: dsfleet.train did not finish (rc=$rc), see dsfleet_train.log:"; grep -E "Error|error" "$OUT/dsfleet_train.log" | tail -3; }
else
  echo "== dsfleet.train skipped: transformers is not on this box"
fi

# The built DeepSpeed as a tarball for later calls (scripts/device_env.sh lays .whl/prebuilt/deepspeed-*.tgz over
# the carried wheels): the bench and memory runs then load these ops instead of JIT-building their own.
site=$("$py" -c 'import deepspeed, os; print(os.path.dirname(os.path.dirname(deepspeed.__file__)))')
tgz=$OUT/deepspeed-$("$py" -c 'import deepspeed; print(deepspeed.__version__)')-sm${arch//[.+]/}.tgz
if (cd "$site" && tar -czf "$tgz" deepspeed deepspeed-*.dist-info); then ls -la "$tgz"; else fail "cannot pack the built deepspeed"; fi

if [ ${#fails[@]} -gt 0 ]; then
  printf 'GPU OPS CHECK FAILED:\n' && printf '  %s\n' "${fails[@]}"
  exit 1
fi
echo "GPU OPS CHECK PASSED: build ${build_s}s, second run ${again_s}s"
