#!/usr/bin/env bash
# Mamba on the GPU box (issue 19): the mamba-ssm / causal-conv1d CUDA kernels built once per machine, then real
# runs. Phases, run in the order given (default: build bench 7b), each logging under $OUT:
#   build   docker/install.sh mamba (CUDA_ARCH, default 9.0) offline from the carried sdists in .whl/, timed, gated by
#           check-ops.sh mamba; a second run must do nothing. The built packages are packed as
#           $OUT/mamba-kernels-<versions>-sm90.txz (stripped, xz; in 15 MiB parts .part00 ... when larger: $OUT returns files of
#           16 MiB at most); later calls carry them in .whl/prebuilt/, where device_env.sh lays them over
#           /tmp/site. Skipped when such a tarball was carried (MAMBA_REBUILD=1 builds anyway). FusedAdam is
#           JIT-built meanwhile, in the background, for the runs after it.
#   bench   dsfleet bench --suite mamba: mamba_1b, kernels vs transformers' pure-PyTorch scan (MFU, tokens/s, loss)
#   fp32    mamba_1b at 4 x 128 in fp32, kernels against the pure-PyTorch scan, 8 steps: the same math without bf16
#           rounding (relative 1e-3 per step)
#   resume  mamba_1b (kernels, ZeRO-2, 1 x 2048) killed after step RESUME_KILL_AT of 40 with a checkpoint at step
#           20, relaunched with --resume_from_checkpoint auto: steps 21.. must repeat the first launch's losses
#   7b      mamba_7b on one GPU as `dsfleet plan` chooses for seq 2048 (ZeRO stage, micro-batch, checkpointing):
#           MAMBA7B_STEPS (30) steps, stopped after the last (no checkpoint); the planner's predicted peak against
#           the measured one
#   7b4096  the same at seq 4096 (the planner's choice for 4096)
#   7bckpt  mamba_7b at seq 2048 as `7b`, with a checkpoint at step 20 in the first place with room for it (ZeRO
#           states, ~12 bytes a parameter: under /tmp, else /dev/shm when the host's free memory holds it too);
#           the launch killed (SIGKILL) after step MAMBA7B_KILL_AT (32), a relaunch with --resume_from_checkpoint
#           auto stopped after the same step (or at MAMBA_DEADLINE): steps 21.. must repeat the first launch's. The
#           relaunch memory-maps the checkpoint (dsfleet's checkpoint.loads_memory_mapped, every load): in /dev/shm
#           a loaded second copy (77 GiB) would not fit beside it.
#           MAMBA7B_CKPT_ROOT=DIR puts the checkpoint there instead (how the phase was checked on CPU with a
#           small model standing in for plan_7b's).
# mamba_7b's runs train at MAMBA7B_LR (1.2e-4, GPT-3 6.7B's peak) after MAMBA7B_WARMUP (5) warmup steps, then
# linear decay: a from-scratch pretraining rate, so that 30 steps show the loss fall (the fine-tuning default 5e-5
# did not move it); on the random tokens of --synthetic_data it falls towards ln(vocab) = 10.8.
# Carry: .whl (make-device-wheels.sh) and, from an earlier call, .whl/prebuilt/mamba-kernels-*.
# MAMBA_START_BY=S: a phase after the first starts only within S seconds of this script's start (a device call
# lasts 10 minutes at most; what is under $OUT comes back either way). MAMBA_DEADLINE=S: a training launch still
# running S seconds after this script's start is stopped (SIGKILL) and what it logged is summarised.
# Every launch's host memory is sampled: the rank's peak RSS (VmHWM), its peak anonymous RSS, the host's least
# MemAvailable.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_mamba}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_mamba.log") 2>&1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1
arch=${CUDA_ARCH:-9.0}
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(build bench 7b)
for p in "${phases[@]}"; do
  case "$p" in build | bench | fp32 | resume | 7b | 7b4096 | 7bckpt) ;;
    *) echo "gpu_mamba: unknown phase '$p' — phases: build bench fp32 resume 7b 7b4096 7bckpt" >&2; exit 2 ;;
  esac
done
fails=()
fail() { echo "FAIL: $*"; fails+=("$*"); }
work=/tmp/dsfleet-mamba
mkdir -p "$work"
echo "== machine: $(nproc) CPUs"
df -h / /tmp /dev/shm 2>/dev/null | sed 's/^/  /'
free -g | sed 's/^/  /'
# shellcheck source=scripts/device_env.sh
. scripts/device_env.sh || exit 1

# The box's python3 lives in a venv (/opt/torch/.venv): a venv made from it sees the base interpreter, not torch,
# so a .pth file adds the parent env's site-packages (as gpu_ops_check.sh does). install.sh installs into it.
build_venv() {
  local venv=$work/venv parent own
  rm -rf "$venv"
  python3 -m venv --system-site-packages --without-pip "$venv" || return 1
  parent=$(python3 -c 'import site; print("\n".join(site.getsitepackages()))')
  own=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  printf '%s\n' "$parent" >"$own/_box_parent_env.pth"
  echo "$venv/bin/python"
}

phase_build() {
  local carried
  carried=$(compgen -G ".whl/prebuilt/mamba-kernels-*" | head -1)
  if [ -n "$carried" ] && [ "${MAMBA_REBUILD:-0}" != 1 ]; then
    echo "== build: skipped, carried $carried (laid over /tmp/site by device_env.sh)"
    return 0
  fi
  # FusedAdam for the runs after this: JIT-built into device_env's TORCH_EXTENSIONS_DIR while nvcc runs
  python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
    >"$OUT/prebuild_fused_adam.log" 2>&1 &
  local adam_pid=$! py rc t0
  py=$(build_venv) || { fail "cannot create the build venv"; return 1; }
  echo "== build: docker/install.sh mamba (CUDA_ARCH=$arch, MAX_JOBS=${MAX_JOBS:-$(nproc)}, offline from .whl)"
  t0=$SECONDS
  # PYTHONPATH unset: the build env must not see /tmp/site (an older laid-over build, carried wheels)
  env -u PYTHONPATH PYTHON="$py" CUDA_ARCH="$arch" WHEELHOUSE="$repo/.whl" OFFLINE=1 DS_FORCE_BUILD=1 \
    bash docker/install.sh mamba >"$OUT/build_mamba.log" 2>&1
  rc=$?
  local build_s=$((SECONDS - t0))
  grep -E "dsfleet|error|Error" "$OUT/build_mamba.log" | grep -v "^ *warning" | tail -15
  [ $rc -eq 0 ] || { fail "install.sh mamba exited $rc after ${build_s}s (build_mamba.log)"; wait "$adam_pid"; return 1; }
  t0=$SECONDS
  env -u PYTHONPATH PYTHON="$py" CUDA_ARCH="$arch" WHEELHOUSE="$repo/.whl" OFFLINE=1 bash docker/install.sh mamba \
    >"$OUT/build_mamba_again.log" 2>&1 || fail "second install.sh mamba failed"
  grep -q "nothing to do" "$OUT/build_mamba_again.log" || fail "second install.sh mamba rebuilt"
  printf 'build_s=%s\nsecond_run_s=%s\ncuda_arch=%s\nnproc=%s\n' "$build_s" "$((SECONDS - t0))" "$arch" "$(nproc)" |
    tee "$OUT/build_timings.txt"
  env -u PYTHONPATH PYTHON="$py" CUDA_ARCH="$arch" bash docker/check-ops.sh mamba || fail "check-ops.sh mamba"
  # the SASS in the library: one cubin per target named in CUDA_ARCH
  local site lib
  site=$("$py" -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("mamba_ssm").submodule_search_locations[0]))')
  for lib in "$site"/selective_scan_cuda*.so "$site"/causal_conv1d_cuda*.so; do
    echo "$(basename "$lib"): $(du -h "$lib" | cut -f1), targets: $(cuobjdump --list-elf "$lib" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort | uniq -c | tr '\n' ' ')"
  done
  # pack what was built (packages, extension libraries, dist-infos) for later calls: host debug sections
  # stripped (the GPU code is in .nv_fatbin, kept) and xz, so that it fits a call's 64 MiB carry (gzip: 66 MB)
  local versions name tgz
  versions=$("$py" -c 'import importlib.metadata as m; print("ssm" + m.version("mamba_ssm") + "-conv" + m.version("causal_conv1d"))')
  name=mamba-kernels-$versions-sm${arch//[.+]/}.txz
  tgz=$work/$name
  strip --strip-debug "$site"/selective_scan_cuda*.so "$site"/causal_conv1d_cuda*.so || echo "   (strip failed: packed as built)"
  (cd "$site" && python3 -c 'import sys, tarfile
with tarfile.open(sys.argv[1], "w:xz") as tar:
    for name in sys.argv[2:]:
        tar.add(name)' "$tgz" mamba_ssm causal_conv1d selective_scan_cuda*.so causal_conv1d_cuda*.so \
    mamba_ssm-*.dist-info causal_conv1d-*.dist-info) || { fail "cannot pack the built kernels"; return 1; }
  ls -la "$tgz"
  if [ "$(stat -c %s "$tgz")" -gt $((16 * 2**20)) ]; then
    split -b 15M -d -a 2 "$tgz" "$OUT/$name.part"
  else
    cp "$tgz" "$OUT/$name"
  fi
  ls -la "$OUT"/mamba-kernels-*
  device_env_lay "$tgz" || fail "cannot lay the built kernels over /tmp/site"
  wait "$adam_pid" || fail "FusedAdam JIT build failed (prebuild_fused_adam.log)"
}

phase_bench() {
  echo "== bench: dsfleet bench --suite mamba"
  python3 -m dsfleet.cli bench --suite mamba --out "$OUT/bench" --work "$work/bench" --timeout 300 ||
    fail "bench --suite mamba"
  cp "$OUT/bench/results.md" "$OUT/bench_results.md" 2>/dev/null
  rm -rf "$work/bench"
}

# train_until NAME STOP_AT -- TRAIN_ARGS...: one `deepspeed --num_gpus 1 --module dsfleet.train` launch (the
# per-node command of slurm/mamba7b.sbatch), logged to $OUT/NAME.log; stopped (SIGKILL, as a crash would) once
# metrics.jsonl has a row for step STOP_AT (0: let it finish) or at MAMBA_DEADLINE. The run dir is
# $work/NAME, or RUN_DIR when set. Leaves the exit code in $train_rc; the rank's host memory goes to summary.txt.
train_until() {
  local name=$1 stop_at=$2 dir=${RUN_DIR:-$work/$1}
  shift 3
  echo "== $name: dsfleet.train --output_dir $dir $*"
  setsid python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port "$((29600 + RANDOM % 300))" \
    --module dsfleet.train --output_dir "$dir" --report_to jsonl --no_progress --logging_steps 1 "$@" \
    >>"$OUT/$name.log" 2>&1 &
  local pid=$! rank="" p hwm=0 anon=0 avail_min now seen=0
  # a relaunch appends to the same metrics.jsonl: only its own rows count
  [ -f "$dir/metrics.jsonl" ] && seen=$(wc -l <"$dir/metrics.jsonl")
  avail_min=$(awk '/^MemAvailable/{print $2}' /proc/meminfo)
  while kill -0 "$pid" 2>/dev/null; do
    if [ -z "$rank" ]; then  # the rank: `python -u -m dsfleet.train --local_rank=0 ...` in the launch's session
      for p in $(ps -o pid= -s "$pid" 2>/dev/null); do
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "-m dsfleet.train " && rank=$p
      done
    fi
    if [ -n "$rank" ] && [ -r "/proc/$rank/status" ]; then
      read -r now p < <(awk '/^VmHWM/{h=$2} /^RssAnon/{a=$2} END{print h+0, a+0}' "/proc/$rank/status")
      [ "$now" -gt "$hwm" ] && hwm=$now
      [ "$p" -gt "$anon" ] && anon=$p
    fi
    now=$(awk '/^MemAvailable/{print $2}' /proc/meminfo)
    [ "$now" -lt "$avail_min" ] && avail_min=$now
    if [ "$stop_at" -gt 0 ] && tail -n +$((seen + 1)) "$dir/metrics.jsonl" 2>/dev/null | grep -q "\"step\": $stop_at,"; then
      kill -KILL -- "-$pid" 2>/dev/null
      echo "   stopped after step $stop_at"
      break
    fi
    if [ -n "${MAMBA_DEADLINE:-}" ] && [ "$SECONDS" -gt "$MAMBA_DEADLINE" ]; then
      kill -KILL -- "-$pid" 2>/dev/null
      fail "$name stopped at MAMBA_DEADLINE=${MAMBA_DEADLINE}s before step $stop_at"
      break
    fi
    sleep 0.5
  done
  wait "$pid"
  train_rc=$?
  sleep 2  # the driver releases the killed ranks' memory
  grep -E "^dsfleet|Error|error:" "$OUT/$name.log" | grep -v Warning | tail -6
  echo "$name host: rank peak RSS $((hwm / 1024)) MiB (anonymous $((anon / 1024)) MiB), host MemAvailable at least $((avail_min / 1024)) MiB, launch ended at ${SECONDS}s" |
    tee -a "$OUT/summary.txt"
}

# summarise NAME [NAME...]: steps, loss first/last, tokens/s, MFU, peak memory (median over steps after the 3rd)
summarise() {
  python3 - "$work" "$@" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
for name in sys.argv[2:]:
    rows = [json.loads(l) for l in (work / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in l] \
        if (work / name / "metrics.jsonl").exists() else []
    if not rows:
        print(f"{name}: no train rows"); continue
    timed = [r for r in rows if r["step"] > 3] or rows
    med = lambda k: statistics.median([r[k] for r in timed if r.get(k) is not None] or [float("nan")])
    print(f"{name}: steps {rows[0]['step']}-{rows[-1]['step']}, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
          f"tokens/s {med('tokens_per_s'):,.0f}, TFLOP/s {med('tflops'):.1f}, MFU {med('mfu'):.1%}, "
          f"peak {max(r['peak_mem_bytes'] for r in rows) / 2**30:.1f} GiB allocated "
          f"({max(r.get('peak_mem_reserved_bytes') or 0 for r in rows) / 2**30:.1f} reserved), "
          f"scan {rows[-1].get('mamba_scan')}")
PY
}

# same_losses A B FIRST LAST: run B repeats run A's losses at steps FIRST..LAST (relative RTOL, default 2e-2: bf16)
same_losses() {
  python3 - "$work" "$@" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
work, a, b, first, last = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def losses(n):
    p = work / n / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, p.read_text().splitlines()) if "loss" in r} if p.exists() else {}
la, lb = losses(a), losses(b)
steps = [s for s in range(first, last + 1) if s in la and s in lb]
worst = max((abs(la[s] - lb[s]) / abs(la[s]) for s in steps), default=None)
print(f"{a} vs {b}: steps {steps[:1]}..{steps[-1:]} in both; " +
      " ".join(f"{s}:{la[s]:.4f}/{lb[s]:.4f}" for s in steps) + f"; max rel diff {worst}")
rtol = float(__import__("os").environ.get("RTOL", "2e-2"))
print(f"  tolerance {rtol}: {'ok' if steps and worst is not None and worst <= rtol else 'EXCEEDED'}")
sys.exit(0 if steps and worst is not None and worst <= rtol and min(lb) == first else 1)
PY
}

# split_launches NAME: a resumed run appends its rows to the same metrics.jsonl; NAME_a/ and NAME_b/ get each
# launch's rows (split where the step count goes back)
split_launches() {
  python3 - "$work" "$1" <<'PY'
import json, sys
from pathlib import Path
work, name = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(l) for l in (work / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
cut = next((i for i in range(1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"]), len(rows))
for suffix, part in (("_a", rows[:cut]), ("_b", rows[cut:])):
    (work / (name + suffix)).mkdir(exist_ok=True)
    (work / (name + suffix) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
PY
}

phase_fp32() {
  local args=(--preset mamba_1b --from_scratch --synthetic_data --zero 2 --per_device_train_batch_size 4
    --block_size 128 --max_steps 8 --export_hf false --peak_tflops 989)
  rm -rf "$work"/fp32_*
  train_until fp32_kernels 8 -- "${args[@]}" --mamba_kernels on
  train_until fp32_pytorch 8 -- "${args[@]}" --mamba_kernels off
  RTOL=1e-3 same_losses fp32_pytorch fp32_kernels 1 8 || fail "fp32 losses of the kernels and the PyTorch scan differ"
  summarise fp32_kernels fp32_pytorch
  rm -rf "$work"/fp32_*
}

phase_resume() {
  local kill_at=${RESUME_KILL_AT:-26}
  local args=(--preset mamba_1b --from_scratch --synthetic_data --bf16 --zero 2 --mamba_kernels on
    --per_device_train_batch_size 1 --block_size 2048 --max_steps 40 --save_steps 20 --export_hf false
    --peak_tflops 989)
  rm -rf "$work/resume1b"
  train_until resume1b "$kill_at" -- "${args[@]}"
  find "$work/resume1b/checkpoints" -maxdepth 1 -printf "   checkpoints: %f\n" 2>/dev/null
  train_until resume1b 0 -- "${args[@]}" --resume_from_checkpoint auto
  [ "$train_rc" = 0 ] || fail "resumed mamba_1b run exited $train_rc"
  grep -q "resumed from .*step_20" "$OUT/resume1b.log" || fail "mamba_1b did not resume from step_20"
  split_launches resume1b
  same_losses resume1b_a resume1b_b 21 "$kill_at" || fail "mamba_1b resumed losses differ from the first launch's"
  summarise resume1b_a resume1b_b
  cp "$work/resume1b/metrics.jsonl" "$OUT/resume1b_metrics.jsonl"
  rm -rf "$work"/resume1b*
}

# plan_7b SEQ: the planner's choice for mamba_7b on this GPU at SEQ tokens -> $args7b (the training flags but
# the step counts) and $predicted (bytes: torch.cuda.max_memory_allocated)
plan_7b() {
  local seq=$1 zero mb ckpt offload
  python3 -m dsfleet.cli plan --preset mamba_7b --gpus 1 --gpu-mem 139GiB --cpu-mem 128GiB --seq-len "$seq" \
    --precision bf16 | tee "$OUT/plan_mamba_7b_$seq.txt" | tail -1
  read -r zero mb ckpt predicted offload < <(python3 -m dsfleet.cli plan --preset mamba_7b --gpus 1 --gpu-mem 139GiB \
    --cpu-mem 128GiB --seq-len "$seq" --precision bf16 --json | python3 -c 'import json, sys; b = json.load(sys.stdin)["best"]
print(b["zero_stage"], b["micro_batch"], int(b["gradient_checkpointing"]), b["gpu"]["peak"], b["offload_optimizer"])')
  echo "== 7b seq $seq: planner's choice: ZeRO-$zero, micro-batch $mb, checkpointing $ckpt, optimizer offload $offload, predicted peak $((predicted / 2**20)) MiB"
  args7b=(--preset mamba_7b --from_scratch --synthetic_data --bf16 --zero "$zero" --offload_optimizer "$offload"
    --per_device_train_batch_size "$mb" --block_size "$seq" --export_hf false --peak_tflops 989
    --learning_rate "${MAMBA7B_LR:-1.2e-4}" --warmup_steps "${MAMBA7B_WARMUP:-5}")
  [ "$ckpt" = 0 ] || args7b+=(--gradient_checkpointing)
}

# run_7b NAME SEQ: MAMBA7B_STEPS steps at the planner's choice for SEQ, stopped after the last (nothing saved)
run_7b() {
  local name=$1 seq=$2 steps=${MAMBA7B_STEPS:-30}
  plan_7b "$seq"
  rm -rf "${work:?}/$name"
  train_until "$name" "$steps" -- "${args7b[@]}" --max_steps "$steps"
  summarise "$name"
  echo "$name: planner predicted peak $((predicted / 2**20)) MiB (torch.cuda.max_memory_allocated)" | tee -a "$OUT/summary.txt"
  cp "$work/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl" 2>/dev/null
  rm -rf "${work:?}/$name"
}

phase_7b() { run_7b mamba7b 2048; }
phase_7b4096() { run_7b mamba7b_4096 4096; }

phase_7bckpt() {
  local kill_at=${MAMBA7B_KILL_AT:-32} need free avail root=""
  plan_7b 2048
  need=$((12 * 6923 * 10**6 + 2**30))  # ZeRO-3 checkpoint: fp32 master + Adam's two moments, a GiB to spare
  free=$(df --output=avail -B1 "$work" | tail -1)
  if [ -n "${MAMBA7B_CKPT_ROOT:-}" ]; then  # chosen by the caller (a check of this phase on a small model)
    root=$MAMBA7B_CKPT_ROOT
  elif [ "$free" -gt "$need" ]; then
    root=$work
  else
    echo "   $((free / 2**30)) GiB free under $work, ~$((need / 2**30)) GiB needed: trying /dev/shm"
    free=$(df --output=avail -B1 /dev/shm | tail -1)
    avail=$(($(awk '/^MemAvailable/{print $2}' /proc/meminfo) * 1024))
    # /dev/shm is host memory: the checkpoint and the training process (~16 GiB host) must both fit
    if [ "$free" -gt "$need" ] && [ "$avail" -gt $((need + 24 * 2**30)) ]; then
      root=/dev/shm/dsfleet-mamba
    fi
  fi
  if [ -z "$root" ]; then
    fail "no room for a mamba_7b checkpoint (~$((need / 2**30)) GiB) under $work or in /dev/shm: 7bckpt not run"
    return 1
  fi
  echo "== 7bckpt: checkpoint under $root ($((free / 2**30)) GiB free, ~$((need / 2**30)) GiB needed)"
  rm -rf "${root:?}/mamba7b_ckpt" "$work"/mamba7b_ckpt*
  local args=("${args7b[@]}" --max_steps 40 --save_steps 20)
  RUN_DIR=$root/mamba7b_ckpt train_until mamba7b_ckpt "$kill_at" -- "${args[@]}"
  du -sh "$root/mamba7b_ckpt/checkpoints/"* 2>/dev/null | sed 's/^/   /'
  find "$root/mamba7b_ckpt/checkpoints/step_20" -type f -printf "   %s bytes  %p\n" 2>/dev/null
  RUN_DIR=$root/mamba7b_ckpt train_until mamba7b_ckpt "$kill_at" -- "${args[@]}" --resume_from_checkpoint auto
  grep -q "resumed from .*step_20" "$OUT/mamba7b_ckpt.log" || fail "mamba_7b did not resume from step_20"
  mkdir -p "$work/mamba7b_ckpt"
  cp "$root/mamba7b_ckpt/metrics.jsonl" "$work/mamba7b_ckpt/metrics.jsonl" 2>/dev/null
  cp "$root/mamba7b_ckpt/metrics.jsonl" "$OUT/mamba7b_ckpt_metrics.jsonl" 2>/dev/null
  split_launches mamba7b_ckpt
  same_losses mamba7b_ckpt_a mamba7b_ckpt_b 21 "$kill_at" || fail "mamba_7b resumed losses differ from the first launch's"
  summarise mamba7b_ckpt_a mamba7b_ckpt_b
  echo "mamba7b_ckpt: planner predicted peak $((predicted / 2**20)) MiB (torch.cuda.max_memory_allocated)" | tee -a "$OUT/summary.txt"
  rm -rf "${root:?}/mamba7b_ckpt" "$work"/mamba7b_ckpt*
}

# $OUT returns 8 files at most: all but the kernel tarball, this log and the summaries go into logs.tgz
pack_out() {
  local f
  mkdir -p "$work/outlogs"
  while IFS= read -r -d '' f; do
    (cd "$OUT" && cp --parents "$f" "$work/outlogs/" && rm -f "$f")
  done < <(cd "$OUT" && find . -type f ! -name 'mamba-kernels-*' ! -name logs.tgz ! -name gpu_mamba.log \
    ! -name summary.txt ! -name bench_results.md -print0)
  find "$OUT" -mindepth 1 -type d -empty -delete
  (cd "$work/outlogs" && tar -czf "$OUT/logs.tgz" .)
}

first=1
for p in "${phases[@]}"; do
  if [ "$first" = 0 ] && [ -n "${MAMBA_START_BY:-}" ] && [ "$SECONDS" -gt "$MAMBA_START_BY" ]; then
    fail "phase $p not started: ${SECONDS}s gone, MAMBA_START_BY=$MAMBA_START_BY"
    continue
  fi
  first=0
  echo "== phase $p at ${SECONDS}s"
  "phase_$p"
  pack_out
done
if [ ${#fails[@]} -gt 0 ]; then
  printf 'GPU MAMBA FAILED:\n' && printf '  %s\n' "${fails[@]}"
  exit 1
fi
echo "GPU MAMBA PASSED: ${phases[*]}"
