"""The seeds' other command shapes run as typed: seed 004's `train_deepspeed.py --preset 7b_mamba --num_gpus 4
--dry_run` / `--check_memory` / `--load_checkpoint DIR`, and seed 002's `deepspeed train_gpt2_ds.py --deepspeed
--deepspeed_config FILE` (DeepSpeed's own add_config_arguments convention). The script is dsfleet's train.py on
its path; a tiny preset stands in for the model where something really trains (CPU ranks)."""
import json
import re
import subprocess
import sys

import pytest
import yaml

from dsfleet.cli import UsageError
from dsfleet.spec import parse_args
from tests.launch import REPO, cpu_env, deepspeed_train, explain, losses, metrics, python_train

TRAIN_SCRIPT = str(REPO / "src" / "dsfleet" / "train.py")
TINY_GPT2 = ["--preset", "gpt2_tiny", "--from_scratch", "--dataset_name", "embedded", "--per_device_train_batch_size",
             "4", "--logging_steps", "1", "--report_to", "jsonl", "--no_progress"]


# ---- the parse: each shape sets the spec field it names ---------------------------------------------------------

def test_deepspeed_flag_both_conventions():
    assert parse_args(["--deepspeed", "--deepspeed_config", "ds.json"]).deepspeed == "ds.json"  # DeepSpeed's
    assert parse_args(["--deepspeed_config", "ds.json", "--deepspeed"]).deepspeed == "ds.json"
    assert parse_args(["--deepspeed", "zero3", "--fp16"]).deepspeed == "zero3"  # HF's: a path or shipped name
    assert parse_args(["--fp16", "--deepspeed"]).deepspeed is None  # bare: "use DeepSpeed", the config from the spec
    assert parse_args(["--deepspeed", "ds.json", "--deepspeed_config", "ds.json"]).deepspeed == "ds.json"
    with pytest.raises(UsageError, match="--deepspeed a.json and --deepspeed_config b.json disagree"):
        parse_args(["--deepspeed", "a.json", "--deepspeed_config", "b.json"])


def test_seed_004_names():
    spec = parse_args(["--preset", "7b_mamba", "--num_gpus", "4", "--load_checkpoint", "./checkpoints/step_10000"])
    assert (spec.preset, spec.num_gpus, spec.resume_from_checkpoint) == ("mamba_7b", 4, "./checkpoints/step_10000")
    assert parse_args(["--preset", "3b_mamba"]).preset == "mamba_3b"
    assert parse_args(["--preset", "1b_mamba"]).preset == "mamba_1b"
    with pytest.raises(UsageError, match="--resume_from_checkpoint auto and --load_checkpoint x disagree"):
        parse_args(["--resume_from_checkpoint", "auto", "--load_checkpoint", "x"])


# ---- seed 004: planning for 4 GPUs from one process ---------------------------------------------------------------

def _plan_sections(stdout: str) -> tuple[dict, dict, str]:
    """print_plan's three sections: the run spec (YAML), the DeepSpeed config (JSON), the memory plan (text)."""
    spec_text, rest = stdout.split("# run spec\n", 1)[1].split("# DeepSpeed config\n", 1)
    ds_text, plan_text = rest.split("# memory plan\n", 1)
    return yaml.safe_load(spec_text), json.loads(ds_text), plan_text


@pytest.mark.parametrize("mode", ["--dry_run", "--check_memory"])
def test_seed_004_plans_for_num_gpus_and_writes_nothing(mode, tmp_path):
    cmd = [sys.executable, TRAIN_SCRIPT, "--preset", "7b_mamba", "--num_gpus", "4", mode]  # the seed's, verbatim
    proc = subprocess.run(cmd, cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, explain(proc)
    spec, ds_config, plan = _plan_sections(proc.stdout)
    assert spec["preset"] == "mamba_7b" and spec["num_gpus"] == 4 and spec["dry_run"] is True
    micro, accum = spec["per_device_train_batch_size"], spec["gradient_accumulation_steps"]
    assert ds_config["train_batch_size"] == micro * accum * 4 != micro * accum  # world size 4, not the 1 process
    assert re.search(r"mamba_7b: 6\.9\d\dB params .* 1 node\(s\) x 4 GPU\(s\)", plan), plan
    assert "memory after engine init" not in proc.stdout  # nothing was built to measure
    assert list(tmp_path.iterdir()) == []  # no output dir, no spec.yaml, no tokenizer


# ---- seed 004: --load_checkpoint DIR resumes (and --check_memory measures a launched run) --------------------------

@pytest.mark.slow
def test_seed_004_load_checkpoint_resumes_exactly(tmp_path):
    out = tmp_path / "run"
    first = python_train([*TINY_GPT2, "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out),
                          "--num_gpus", "1", "--check_memory"])  # N ranks launched = N planned: a real run
    assert first.returncode == 0, explain(first)
    assert "[rank 0] memory after engine init:" in first.stdout and "[rank 0] step 2:" in first.stdout
    reference = losses(out)
    resumed = python_train([*TINY_GPT2, "--max_steps", "2", "--output_dir", str(out),
                            "--load_checkpoint", str(out / "checkpoints" / "step_1")])
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {out / 'checkpoints' / 'step_1'} at step 1" in resumed.stdout
    again = [r["loss"] for r in metrics(out) if r.get("step") == 2 and "loss" in r]
    assert len(again) == 2, metrics(out)  # step 2 trained once in each run, from the same state
    assert again[1] == pytest.approx(reference[2], rel=1e-4), (again, reference)


# ---- seed 002: deepspeed <script> --deepspeed --deepspeed_config FILE ----------------------------------------------

@pytest.mark.slow
def test_seed_002_deepspeed_launcher_with_deepspeed_config(tmp_path):
    ds_json = tmp_path / "deepspeed_config.json"
    ds_json.write_text(json.dumps({  # a hand-written DeepSpeed config as seed 002's: no "auto", its own optimizer
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
        "zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}))
    out = tmp_path / "run"
    proc = deepspeed_train(["--deepspeed", "--deepspeed_config", str(ds_json), "--preset", "gpt2_tiny",
                            "--from_scratch", "--dataset_name", "embedded", "--per_device_train_batch_size", "4",
                            "--max_steps", "3", "--logging_steps", "1", "--output_dir", str(out)],
                           ranks=1, script="src/dsfleet/train.py")
    assert proc.returncode == 0, explain(proc)
    assert "ZeRO-1" in proc.stdout and " = 4, 3 steps" in proc.stdout  # micro 4 x accum 1 x world 1, the file's
    used = json.loads((out / "ds_config.json").read_text())  # what DeepSpeed was given: the user's file
    assert used["zero_optimization"]["stage"] == 1
    assert used["optimizer"]["params"]["lr"] == 2e-3 and used["optimizer"]["params"]["weight_decay"] == 0.1
    assert sorted(losses(out)) == [1, 2, 3]
