#!/usr/bin/env bash
# `make bench`: one call on a GPU box — dsfleet against HF Trainer + DeepSpeed, side by side (dsfleet/bench/).
# scripts/device_env.sh installs the carried wheels (and a prebuilt DeepSpeed when carried), runs dsfleet from
# source, and writes results.json, results.md and per-run logs to $OUT. Arguments pass through to `dsfleet bench`:
#   bash scripts/bench.sh                               # --suite all: gpt2_xl, t5_3b, scaling (1 GPU here)
#   bash scripts/bench.sh --suite scaling --gpus 2      # GPT-2 XL on 1 and 2 GPUs
#   bash scripts/bench.sh --suite any_model --timeout 200   # issue 18: Llama 1.2B from config vs HF Trainer +
#                                                       # ZeRO-2, BART-large's peak vs the planner (~8 min, one H200)
# Issue 21 (the strongest peers, dsfleet/bench/peers.py): one device call per suite on one nvidia-h200, carry .whl
# (with .whl/prebuilt/: no FusedAdam JIT build), each under the 10-minute limit (docs/benchmarks.md, "To run next"):
#   OUT=$OUT/g bash scripts/bench.sh --suite gpt2_xl --steps 20 --warmup 5 --timeout 240 --work /tmp/w
#   OUT=$OUT/t bash scripts/bench.sh --suite t5_3b --steps 15 --warmup 5 --timeout 200 --work /tmp/w
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/runs/bench}
mkdir -p "$OUT"
# shellcheck source=scripts/device_env.sh
. scripts/device_env.sh || exit 1
# GPU clocks, power and temperature every 250 ms for the whole call: a slow step beside a clock drop is the card,
# not the code (the metrics rows carry unix times to line them up)
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
    --format=csv,nounits -lms 250 >"$OUT/gpu_telemetry.csv" 2>/dev/null &
  _telemetry=$!
  trap 'kill "$_telemetry" 2>/dev/null' EXIT
fi
python3 -c 'import dsfleet; print("bench: dsfleet from", dsfleet.__file__)'
python3 -m dsfleet.cli bench --out "$OUT" "$@"
