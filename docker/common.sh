# shellcheck shell=bash
# Shared by install.sh, check-ops.sh and build-image.sh: one reading of CUDA_ARCH and one way to fail on bad input.

# What docker/install.sh builds from source by default (scripts/make-device-wheels.sh fetches the same).
# shellcheck disable=SC2034  # read by the scripts that source this file
DSFLEET_DEEPSPEED_VERSION=0.19.8
# shellcheck disable=SC2034
DSFLEET_MAMBA_SSM_VERSION=2.3.2.post1
# shellcheck disable=SC2034
DSFLEET_CAUSAL_CONV1D_VERSION=1.7.0

# die MESSAGE: bad input -> one line on stderr (what is wrong, what to do), exit 2.
die() {
  echo "dsfleet: $*" >&2
  exit 2
}

# cuda_arch_list VALUE: prints the TORCH_CUDA_ARCH_LIST for VALUE ("" or "cpu" -> "cpu"), or dies.
# Accepts compute capabilities separated by ';' or spaces, each MAJOR.MINOR with an optional +PTX:
# 8.9, "8.0;9.0", "8.0 9.0", 9.0+PTX. Rejects everything else (sm_90, 9.0a, 90, 8.9;junk).
cuda_arch_list() {
  local value=$1 token tokens out=()
  case "$value" in "" | cpu | CPU) echo cpu; return 0 ;; esac
  IFS='; ' read -ra tokens <<<"$value"
  for token in "${tokens[@]}"; do
    [ -n "$token" ] || continue
    [[ "$token" =~ ^[1-9][0-9]?\.[0-9]+(\+PTX)?$ ]] ||
      die "CUDA_ARCH='$value' is not a compute-capability list ('$token') — use e.g. 8.9, \"8.0;9.0\" or 9.0+PTX (empty or cpu for a CPU build)"
    out+=("$token")
  done
  [ ${#out[@]} -gt 0 ] || die "CUDA_ARCH='$value' names no compute capability — use e.g. 8.9, \"8.0;9.0\" or 9.0+PTX"
  local IFS=';'
  echo "${out[*]}"
}

# required_ops ARCH_LIST: the DeepSpeed ops this flavour must have prebuilt (ds_report names).
# CPU: the shared-memory collective the CPU accelerator loads at init_distributed instead of fused Adam (a GPU
# kernel; dsfleet's CPU configs use torch's AdamW, so building DeepSpeed's CPU port of it would only cost CI time).
required_ops() {
  if [ "$1" = cpu ]; then
    echo "cpu_adam async_io deepspeed_shm_comm"
  else
    echo "cpu_adam async_io fused_adam"
  fi
}

# ds_accelerator ARCH_LIST: the DeepSpeed accelerator the ops are built for (and must be loaded with).
ds_accelerator() {
  if [ "$1" = cpu ]; then echo cpu; else echo cuda; fi
}

# mamba_kernels_wanted ARCH_LIST: 1 when install.sh builds the Mamba CUDA kernels (mamba-ssm's selective scan,
# causal-conv1d) for this flavour, else 0. DSFLEET_MAMBA_KERNELS: 1, 0, or empty (1 for GPU flavours, 0 for CPU).
mamba_kernels_wanted() {
  case "${DSFLEET_MAMBA_KERNELS:-}" in
    "") if [ "$1" = cpu ]; then echo 0; else echo 1; fi ;;
    0) echo 0 ;;
    1) [ "$1" != cpu ] || die "DSFLEET_MAMBA_KERNELS=1 needs a GPU CUDA_ARCH (the kernels are CUDA only) — set CUDA_ARCH=9.0 (say) or DSFLEET_MAMBA_KERNELS=0"
       echo 1 ;;
    *) die "DSFLEET_MAMBA_KERNELS=${DSFLEET_MAMBA_KERNELS} — use 1 (build the Mamba CUDA kernels), 0 (don't) or leave it empty (GPU flavours: 1)" ;;
  esac
}
