#!/usr/bin/env bash
# One device call: install carried wheels, then the entry point on one GPU — GPT-2 ZeRO-2 bf16 and T5 ZeRO-3
# on synthetic tokens — to catch GPU-only problems before the long measurements.
set -uo pipefail
rm -rf /tmp/runs  # this script's own scratch: a warm machine keeps the last call's runs
OUT=${OUT:-/tmp/out}
# shellcheck source=scripts/device_env.sh
. "$(dirname "$0")/device_env.sh" || exit 1
run() { name=$1; shift; timeout 240 python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 29700 --module dsfleet.train \
  --from_scratch --synthetic_data --bf16 --no_progress --logging_steps 5 --report_to jsonl --output_dir "/tmp/runs/$name" "$@" \
  > "$OUT/$name.log" 2>&1; echo "$name rc=$?"; grep -E "dsfleet|Error|error" "$OUT/$name.log" | grep -v Warning | tail -5; tail -2 "/tmp/runs/$name/metrics.jsonl" 2>/dev/null | cut -c1-300; }
run gpt2_z2 --preset gpt2 --zero 2 --max_steps 20 --per_device_train_batch_size 8 --block_size 1024 --peak_tflops 989
run t5s_z3 --preset t5_small --zero 3 --max_steps 10 --per_device_train_batch_size 16
