"""Seed 001's run_translation.py commands run unchanged but for the model path and dataset, which point at
local stand-ins (no hub here): the shipped ZeRO-2/ZeRO-3 JSON configs (optimizer offload to CPU, "auto"
values), --fp16 (fp16 where DeepSpeed's CPU accelerator supports it on this CPU, else fp32 said in one line), the
deepspeed launcher on the script path."""
import functools
import json
import shlex
import sys

import pytest
import yaml

from tests.launch import REPO, cpu_env, explain, free_port, losses, metrics
from tests.local_assets import make_local_t5, make_local_wmt16

pytestmark = pytest.mark.slow

# The commands as the seed gives them, with {model}, {data}, {out}, {port} the only substitutions.
SEED_COMMANDS = {
    "zero2": "deepspeed --num_gpus=2 --master_port {port} src/dsfleet/train.py --deepspeed src/dsfleet/configs/ds_config_zero2.json "
             "--model_name_or_path {model} --per_device_train_batch_size 4 --output_dir {out} --overwrite_output_dir "
             "--fp16 --do_train --max_train_samples 64 --num_train_epochs 1 --dataset_name {data} "
             "--dataset_config \"ro-en\" --source_lang en --target_lang ro",
    "zero3": "deepspeed --num_gpus=2 --master_port {port} src/dsfleet/train.py --deepspeed src/dsfleet/configs/ds_config_zero3.json "
             "--model_name_or_path {model} --per_device_train_batch_size 4 --output_dir {out} --overwrite_output_dir "
             "--fp16 --do_train --max_train_samples 64 --num_train_epochs 1 --dataset_name {data} "
             "--dataset_config \"ro-en\" --source_lang en --target_lang ro",
    "zero3_eval_predict": "deepspeed --num_gpus=2 --master_port {port} src/dsfleet/train.py --deepspeed src/dsfleet/configs/ds_config_zero3.json "
             "--model_name_or_path {model} --per_device_train_batch_size 4 --per_device_eval_batch_size 8 "
             "--output_dir {out} --overwrite_output_dir --fp16 --do_train --do_eval --do_predict --max_train_samples 64 "
             "--max_eval_samples 16 --num_train_epochs 1 --dataset_name {data} --dataset_config \"ro-en\" "
             "--source_lang en --target_lang ro --source_prefix \"translate English to Romanian: \" --predict_with_generate",
    "one_gpu_zero2": "deepspeed --num_gpus=1 --master_port {port} src/dsfleet/train.py --deepspeed src/dsfleet/configs/ds_config_zero2.json "
             "--model_name_or_path {model} --per_device_train_batch_size 4 --output_dir {out} --overwrite_output_dir "
             "--fp16 --do_train --max_train_samples 32 --num_train_epochs 1 --dataset_name {data} "
             "--dataset_config \"ro-en\" --source_lang en --target_lang ro --source_prefix \"translate English to Romanian: \"",
}


@functools.cache
def cpu_accelerator_fp16() -> bool:
    """DeepSpeed's CPU accelerator's answer for this machine's CPU, asked the way a rank asks it."""
    import subprocess
    probe = "from deepspeed.accelerator import get_accelerator as g; print(bool(g().is_fp16_supported()))"
    proc = subprocess.run([sys.executable, "-c", probe], env=cpu_env(), capture_output=True, text=True, timeout=120)
    return proc.stdout.strip().splitlines()[-1] == "True"


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return make_local_t5(root / "t5-small"), make_local_wmt16(root / "wmt16")


@pytest.mark.parametrize("name", list(SEED_COMMANDS))
def test_seed_command_runs(name, local_hub, tmp_path):
    import subprocess
    model, data = local_hub
    out = tmp_path / "output_dir"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier run")  # --overwrite_output_dir is in the command: allowed
    cmd = SEED_COMMANDS[name].format(model=model, data=data, out=out, port=free_port())
    argv = shlex.split(cmd)
    argv[0] = str(REPO / ".venv" / "bin" / "deepspeed") if (REPO / ".venv").exists() else argv[0]
    proc = subprocess.run(argv + ["--no_progress"], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, explain(proc)
    # --fp16 on CPU ranks follows what DeepSpeed's CPU accelerator says of this CPU (AVX512-FP16/AMX CPUs train
    # in fp16): fp16 where supported, else fp32 and one line saying so — never silently
    ran_fp16 = json.loads((out / "ds_config.json").read_text()).get("fp16", {}).get("enabled") is True
    assert ran_fp16 is cpu_accelerator_fp16()
    assert ("trains in fp32" in proc.stdout) is not ran_fp16
    assert yaml.safe_load((out / "spec.yaml").read_text())["fp16"] is ran_fp16
    assert losses(out), "no training metrics"
    assert (out / "checkpoints" / "latest").is_file() and (out / "final" / "model.safetensors").is_file()
    if name == "zero3_eval_predict":
        rows = metrics(out)
        assert any("bleu" in r for r in rows) and any("predict_bleu" in r for r in rows)
        assert len((out / "generated_predictions.txt").read_text().splitlines()) == 48  # the whole test split
