#!/usr/bin/env bash
# `make demo`: the main job — a real 2-rank DeepSpeed ZeRO-2 training of a tiny T5 on the embedded en->ro
# corpus (CPU ranks when there is no GPU), leaving a run dir with metrics, plot.png and a checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEEPSPEED=${DEEPSPEED:-.venv/bin/deepspeed}
run_dir=${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | wc -l); fi
if [ "$gpus" -ge 1 ]; then
  ranks=$(( gpus < 2 ? gpus : 2 )); precision=--bf16
else
  export DS_ACCELERATOR=cpu; ranks=2; precision=
fi
echo "dsfleet demo: $ranks rank(s), $( [ "$gpus" -ge 1 ] && echo GPU || echo CPU ), run dir $run_dir"
# shellcheck disable=SC2086  # $precision is empty or one flag
"$DEEPSPEED" --num_gpus "$ranks" --master_port "${MASTER_PORT:-29650}" --module dsfleet.train \
  --preset t5_tiny --from_scratch --dataset_name embedded --zero 2 $precision \
  --do_train --do_eval --predict_with_generate \
  --per_device_train_batch_size 16 --max_steps 300 --logging_steps 10 --eval_steps 50 --save_steps 150 \
  --output_dir "$run_dir"
"$PY" - "$run_dir" <<'PYEOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if "loss" in r]
bleu = [(r["step"], round(r["bleu"], 1)) for r in rows if "bleu" in r]
print(f"\nloss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.4f} (step {train[-1]['step']})")
print("BLEU by step: " + ", ".join(f"{s}: {b}" for s, b in bleu))
print(f"run dir: {run}/  metrics.jsonl  plot.png  checkpoints/{(run / 'checkpoints' / 'latest').read_text().strip()}  final/")
PYEOF
