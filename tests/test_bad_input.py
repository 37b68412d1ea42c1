"""A catalogue of bad input: every entry point (train flags, presets, the YAML spec, ds_config JSON, hostfiles,
dataset files, the launcher environment, plan/render/preflight/show-config) answers a malformed input with ONE
line on stderr naming the problem and the fix ("what is wrong — what to do"), exit code 2, no traceback, and
writes or overwrites nothing.

Each case runs in its own empty directory (the process's working directory, so relative paths in the table
are the paths the user typed); the directory is hashed before and after, so a stray file, a created
--output_dir or a touched input fails the case. docs/bad_inputs.md lists every case with the line it gives;
regenerate it with `.venv/bin/python -m tests.test_bad_input` (runs every case, rewrites the doc).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.launch import REPO, cpu_env, free_port

DOC = REPO / "docs" / "bad_inputs.md"
OUT = "run"  # every train case passes --output_dir run (relative to the case's directory)
TRAIN_SUFFIX = ["--output_dir", OUT, "--no_progress"]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
              "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "DSFLEET_SSH_CONFIG")


@dataclass(frozen=True)
class Case:
    id: str
    surface: str  # cli | preset/model | yaml | ds_config | hostfile | dataset | env | plan | render | preflight | ...
    argv: tuple[str, ...]  # ("train", ...) = python -m dsfleet.train ...; ("plan", ...) = dsfleet plan ...
    expect: str  # a substring of the one line
    files: dict[str, str] = field(default_factory=dict)  # relative path -> text, created before the run
    env: dict[str, str] = field(default_factory=dict)  # launcher/user environment for this case

    def command(self) -> list[str]:
        if self.argv[0] == "train":
            return [sys.executable, "-m", "dsfleet.train", *self.argv[1:], *TRAIN_SUFFIX]
        return [sys.executable, "-m", "dsfleet.cli", *self.argv]

    def shown(self) -> str:
        """The command as a user types it (for the doc)."""
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        head = "python -m dsfleet.train" if self.argv[0] == "train" else f"dsfleet {self.argv[0]}"
        args = " ".join(_quote(a) for a in self.argv[1:])
        return " ".join(x for x in (env, head, args) if x)


def _quote(arg: str) -> str:
    return repr(arg) if not arg or any(c in arg for c in " \"'{}[]") else arg


def _json(obj) -> str:
    return json.dumps(obj) + "\n"


TINY = ("--preset", "t5_tiny", "--from_scratch", "--dataset_name", "embedded", "--max_steps", "2")
TINY_DATA = ("--preset", "t5_tiny", "--from_scratch", "--max_steps", "2")  # + a --train_file
GPT_DATA = ("--preset", "gpt2_tiny", "--from_scratch", "--max_steps", "2")  # + a --train_file
PAIR = _json({"translation": {"en": "hello", "ro": "salut"}})
HOSTS = ("preflight", "--hostfile", "hosts", "--output-dir", OUT)

CASES = [
    # ---- train flags ------------------------------------------------------------------------------------------
    Case("unknown-flag", "cli", ("train", *TINY, "--learning_rat", "1"), "unrecognized arguments: --learning_rat"),
    Case("not-a-number", "cli", ("train", *TINY, "--learning_rate", "abc"), "--learning_rate: invalid float value: 'abc'"),
    Case("not-a-bool", "cli", ("train", *TINY, "--bf16", "maybe"), "expected true/false, got 'maybe'"),
    Case("zero-stage-5", "cli", ("train", *TINY, "--zero", "5"), "--zero 5: not one of the choices"),
    Case("batch-size-0", "cli", ("train", *TINY, "--per_device_train_batch_size", "0"),
         "--per_device_train_batch_size 0: must be > 0"),
    Case("negative-lr", "cli", ("train", *TINY, "--learning_rate", "-0.001"), "--learning_rate -0.001: must be > 0"),
    Case("fp16-and-bf16", "cli", ("train", *TINY, "--fp16", "--bf16"), "--fp16 and --bf16 both set"),
    Case("offload-to-gpu", "cli", ("train", *TINY, "--offload_optimizer", "gpu"), "--offload_optimizer gpu: not one of the choices"),
    Case("offload-param-zero2", "cli", ("train", *TINY, "--offload_param", "cpu"), "needs ZeRO stage 3"),
    Case("nvme-without-path", "cli", ("train", *TINY, "--zero", "3", "--offload_optimizer", "nvme"), "--nvme_path"),
    Case("negative-max-steps", "cli", ("train", *TINY[:-1], "-3"), "--max_steps -3 is not a step count"),
    Case("negative-gc-interval", "cli", ("train", *TINY, "--gc_interval", "-1"), "--gc_interval -1: must be >= 0"),
    Case("cuda-graphs-without-compile", "cli", ("train", *TINY, "--cuda_graphs", "on"), "it needs --compile true"),
    Case("cuda-graphs-on-cpu", "cli", ("train", *TINY, "--compile", "true", "--cuda_graphs", "on"),
         "--cuda_graphs on: it needs CUDA GPUs"),
    Case("reduce-scatter-not-bool", "cli", ("train", *TINY, "--reduce_scatter", "maybe"),
         "--reduce_scatter maybe: not true/false"),
    Case("overwrite-and-resume", "cli", ("train", *TINY, "--overwrite_output_dir", "--resume_from_checkpoint", "auto"),
         "contradict each other"),
    Case("resume-missing-checkpoint", "cli", ("train", *TINY, "--resume_from_checkpoint", "ckpt/step_9"),
         "checkpoint ckpt/step_9 not found"),
    Case("output-dir-is-a-file", "cli", ("train", *TINY), "is a file", files={OUT: "not a directory\n"}),
    Case("output-dir-not-empty", "cli", ("train", *TINY), "exists and is not empty",
         files={f"{OUT}/metrics.jsonl": _json({"step": 5, "loss": 1.0})}),
    # ---- preset / model ---------------------------------------------------------------------------------------
    Case("unknown-preset", "preset/model", ("train", "--preset", "t5_giant", "--from_scratch"), "unknown preset 't5_giant'"),
    Case("no-weights", "preset/model", ("train", "--preset", "t5_tiny", "--dataset_name", "embedded"),
         "pass --model_name_or_path"),
    Case("scratch-without-architecture", "preset/model", ("train", "--from_scratch", "--dataset_name", "embedded"),
         "--from_scratch without an architecture"),
    Case("model-dir-missing", "preset/model", ("train", "--model_name_or_path", "./models/t5-base", "--dataset_name",
                                               "embedded"), "--model_name_or_path ./models/t5-base: no such directory"),
    Case("model-dir-missing-with-preset", "preset/model", ("train", "--preset", "t5_tiny", "--model_name_or_path",
                                                           "./models/t5-base", "--dataset_name", "embedded"),
         "--model_name_or_path ./models/t5-base: no such directory"),
    Case("hub-model-unreachable", "preset/model", ("train", "--model_name_or_path", "t5-small", "--dataset_name",
                                                   "embedded"), "cannot load model 't5-small'"),
    Case("unsupported-model-type", "preset/model", ("train", "--model_name_or_path", "vit", "--dataset_name",
                                                    "embedded"), "model type 'vit' is no language model",
         files={"vit/config.json": _json({"model_type": "vit"})}),  # any causal LM / seq2seq type trains (issue 18)
    # ---- YAML run spec (--config) -----------------------------------------------------------------------------
    Case("yaml-missing", "yaml", ("train", *TINY, "--config", "run.yaml"), "config file run.yaml not found"),
    Case("yaml-syntax", "yaml", ("train", *TINY, "--config", "run.yaml"), "run.yaml line 3 is not valid YAML",
         files={"run.yaml": "preset: t5_tiny\nzero: [2\n"}),
    Case("yaml-unknown-key", "yaml", ("train", *TINY, "--config", "run.yaml"), "unknown spec key 'learning_rat'",
         files={"run.yaml": "learning_rat: 0.001\n"}),
    Case("yaml-wrong-type", "yaml", ("train", *TINY, "--config", "run.yaml"), "run.yaml: per_device_train_batch_size 'lots': not a whole number",
         files={"run.yaml": "per_device_train_batch_size: lots\n"}),
    Case("yaml-top-level-list", "yaml", ("train", *TINY, "--config", "run.yaml"), "is a YAML list, not a mapping",
         files={"run.yaml": "- preset: t5_tiny\n- zero: 2\n"}),
    Case("yaml-bad-choice", "yaml", ("train", *TINY, "--config", "run.yaml"), "lr_scheduler_type 'polynomial': not one of the choices",
         files={"run.yaml": "lr_scheduler_type: polynomial\n"}),
    # ---- DeepSpeed config JSON (--deepspeed) ------------------------------------------------------------------
    Case("ds-config-missing", "ds_config", ("train", *TINY, "--deepspeed", "missing.json"),
         "DeepSpeed config missing.json not found"),
    Case("ds-config-syntax", "ds_config", ("train", *TINY, "--deepspeed", "ds.json"), "line 1 is not valid JSON",
         files={"ds.json": '{"train_batch_size": 8,}\n'}),
    Case("ds-config-array", "ds_config", ("train", *TINY, "--deepspeed", "ds.json"), "is a JSON list, not an object",
         files={"ds.json": "[1, 2]\n"}),
    Case("ds-config-zero-stage-7", "ds_config", ("train", *TINY, "--deepspeed", "ds.json"), "zero_optimization.stage 7 is not a ZeRO stage",
         files={"ds.json": _json({"zero_optimization": {"stage": 7}})}),
    Case("ds-config-batch-arithmetic", "ds_config", ("train", *TINY, "--deepspeed", "ds.json",
                                                     "--per_device_train_batch_size", "4"),
         "train_batch_size 10 != micro batch 4 x grad accumulation 1 x world size 1",
         files={"ds.json": _json({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
                                  "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}})}),
    Case("ds-config-batch-not-int", "ds_config", ("train", *TINY, "--deepspeed", "ds.json"),
         "train_micro_batch_size_per_gpu is 'four'", files={"ds.json": _json({"train_micro_batch_size_per_gpu": "four"})}),
    Case("ds-config-unfillable-auto", "ds_config", ("train", *TINY, "--deepspeed", "ds.json"),
         '"auto" for scheduler.params.warmup_type',
         files={"ds.json": _json({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "auto"}}})}),
    # ---- dataset files ----------------------------------------------------------------------------------------
    Case("train-file-missing", "dataset", ("train", *TINY_DATA, "--train_file", "train.jsonl"),
         "--train_file train.jsonl not found"),
    Case("train-file-extension", "dataset", ("train", *TINY_DATA, "--train_file", "train.xlsx"), ".xlsx",
         files={"train.xlsx": "en,ro\nhello,salut\n"}),
    Case("train-file-empty", "dataset", ("train", *TINY_DATA, "--train_file", "train.jsonl"), "--train_file train.jsonl is empty",
         files={"train.jsonl": ""}),
    Case("train-file-bad-json", "dataset", ("train", *TINY_DATA, "--train_file", "train.jsonl"),
         "cannot read train.jsonl (ArrowInvalid: JSON parse error", files={"train.jsonl": PAIR + "{not json\n"}),
    Case("train-file-no-column", "dataset", ("train", *TINY_DATA, "--train_file", "train.jsonl"),
         "no 'translation' column", files={"train.jsonl": _json({"en": "hello", "ro": "salut"})}),
    Case("train-file-wrong-language", "dataset", ("train", *TINY_DATA, "--train_file", "train.jsonl"),
         "no language 'ro'", files={"train.jsonl": _json({"translation": {"en": "hello", "de": "hallo"}})}),
    Case("too-few-samples", "dataset", ("train", *TINY_DATA, "--train_file", "train.jsonl",
                                        "--per_device_train_batch_size", "4"), "only 1 training samples",
         files={"train.jsonl": PAIR}),
    Case("unknown-dataset-name", "dataset", ("train", *TINY_DATA, "--dataset_name", "no_such_org/no_such_dataset"),
         "cannot load dataset 'no_such_org/no_such_dataset'"),
    Case("no-data", "dataset", ("train", *TINY_DATA), "no data given"),
    # ---- launcher environment ---------------------------------------------------------------------------------
    Case("rank-without-world-size", "env", ("train", *TINY), "RANK is set but WORLD_SIZE is not", env={"RANK": "0"}),
    Case("world-size-not-int", "env", ("train", *TINY), "WORLD_SIZE='abc' is not an integer",
         env={"RANK": "0", "WORLD_SIZE": "abc"}),
    Case("rank-outside-world", "env", ("train", *TINY), "rank 3 is outside world size 2",
         env={"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}),
    Case("world-without-master", "env", ("train", *TINY), "MASTER_ADDR is not set", env={"RANK": "0", "WORLD_SIZE": "2"}),
    Case("master-port-not-a-port", "env", ("train", *TINY), "MASTER_PORT='notaport'", env={"MASTER_PORT": "notaport"}),
    Case("master-port-out-of-range", "env", ("train", *TINY), "MASTER_PORT=70000", env={"MASTER_PORT": "70000"}),
    Case("slurm-task-not-int", "env", ("train", *TINY), "SLURM_PROCID='x' is not an integer",
         env={"SLURM_PROCID": "x", "SLURM_STEP_NUM_TASKS": "2"}),
    # ---- hostfiles --------------------------------------------------------------------------------------------
    Case("hostfile-missing", "hostfile", HOSTS, "hostfile hosts not found"),
    Case("hostfile-no-slots", "hostfile", HOSTS, "hosts:2: host node-1 has no slots",
         files={"hosts": "node-0 slots=8\nnode-1\n"}),
    Case("hostfile-slots-0", "hostfile", HOSTS, "hosts:1: slots=0 for node-0", files={"hosts": "node-0 slots=0\n"}),
    Case("hostfile-duplicate-host", "hostfile", HOSTS, "host node-0 is listed twice",
         files={"hosts": "node-0 slots=8\nnode-1 slots=8\nnode-0 slots=8\n"}),
    Case("hostfile-empty", "hostfile", HOSTS, "hosts: no hosts", files={"hosts": "# no machines yet\n\n"}),
    Case("hostfile-spaces-around-equals", "hostfile", HOSTS, "spaces around '='", files={"hosts": "node-0 slots = 8\n"}),
    Case("render-hostfile-bad", "render", ("render", "--preset", "t5_tiny", "--target", "hostfile", "--hostfile",
                                           "hosts", "--out", OUT), "slots='eight'", files={"hosts": "node-0 slots=eight\n"}),
    # ---- plan / render / preflight / show-config --------------------------------------------------------------
    Case("unknown-command", "cli", ("frobnicate",), "unknown command 'frobnicate'"),
    Case("render-unknown-preset", "render", ("render", "--preset", "nope", "--target", "slurm", "--out", OUT),
         "unknown preset 'nope'"),
    Case("render-unknown-target", "render", ("render", "--preset", "t5_tiny", "--target", "lsf", "--out", OUT),
         "unknown target 'lsf'"),
    Case("plan-zero-gpus", "plan", ("plan", "--preset", "t5_3b", "--gpus", "0"), "--gpus 0 --nodes 1: both must be >= 1"),
    Case("plan-gpus-not-int", "plan", ("plan", "--preset", "t5_3b", "--gpus", "two"), "--gpus: invalid int value: 'two'"),
    Case("plan-bad-memory-unit", "plan", ("plan", "--preset", "t5_3b", "--gpu-mem", "80XB"), "cannot read size '80XB'"),
    Case("plan-no-model", "plan", ("plan", "--gpus", "8"), "no model given"),
    Case("preflight-no-hostfile", "preflight", ("preflight",), "--hostfile"),
    Case("preflight-master-port-env", "preflight", HOSTS, "MASTER_PORT='notaport'",
         files={"hosts": "localhost slots=1\n"}, env={"MASTER_PORT": "notaport"}),
    Case("show-config-bad-flag", "show-config", ("show-config", "--", "--preset", "t5_tiny", "--from_scratch", "--zero", "5"),
         "--zero 5"),
    Case("bench-variant-no-name", "bench", ("bench", "--suite", "cpu_smoke", "--out", OUT, "--variant", "--fused_loss false"),
         "is not NAME=FLAGS"),
    Case("bench-unknown-row", "bench", ("bench", "--suite", "cpu_smoke", "--out", OUT, "--rows", "dsfleet_plan"),
         "--rows: no suite has a row 'dsfleet_plan'"),
    # ---- data holes and sizes the model or the data cannot fill (issue 16) ------------------------------------
    Case("csv-empty-text-cell", "dataset", ("train", *GPT_DATA, "--train_file", "train.csv"),
         "--train_file train.csv row 2: the 'text' cell is empty", files={"train.csv": "text,label\nhello there,1\n,2\n"}),
    Case("translation-empty-side", "dataset", ("train", *TINY_DATA, "--train_file", "train.jsonl"),
         "row 2: the 'ro' side of the translation is empty",
         files={"train.jsonl": PAIR + _json({"translation": {"en": "hello", "ro": ""}})}),
    Case("translation-null-side", "dataset", ("train", *TINY_DATA, "--train_file", "train.jsonl"),
         "row 1: the 'en' side of the translation is empty",
         files={"train.jsonl": _json({"translation": {"en": None, "ro": "salut"}}) + PAIR}),
    Case("block-size-over-data", "dataset", ("train", *GPT_DATA, "--train_file", "train.txt", "--block_size", "200"),
         "shorter than one block of --block_size 200", files={"train.txt": "hello there\nanother short line\n"}),
    Case("block-size-over-positions-preset", "preset/model", ("train", *GPT_DATA, "--train_file", "train.txt",
                                                               "--block_size", "1024"),
         "--block_size 1024 is longer than the model's 256 positions", files={"train.txt": "hello there\n"}),
    Case("block-size-over-positions-model-dir", "preset/model",
         ("train", "--model_name_or_path", "small-gpt2", "--from_scratch", "--max_steps", "2", "--train_file", "train.txt"),
         "--block_size 1024 is longer than the model's 256 positions",
         files={"small-gpt2/config.json": _json({"model_type": "gpt2", "n_positions": 256, "n_embd": 32, "n_layer": 1,
                                                 "n_head": 2, "vocab_size": 300}),
                "train.txt": "hello there\n"}),
    # ---- DeepSpeed config optimizer / scheduler blocks (HF-docs configs; dsconfig.check_*_block) ----------------
    Case("ds-config-unknown-optimizer", "ds_config", ("train", *TINY, "--deepspeed", "ds.json"),
         "optimizer.type 'AdamW8bit' is not an optimizer DeepSpeed can build",
         files={"ds.json": _json({"optimizer": {"type": "AdamW8bit", "params": {"lr": "auto"}}})}),
    Case("ds-config-unknown-scheduler", "ds_config", ("train", *TINY, "--deepspeed", "ds.json"),
         "scheduler.type 'CosineWithRestarts' is not a scheduler DeepSpeed knows",
         files={"ds.json": _json({"scheduler": {"type": "CosineWithRestarts", "params": {"warmup_num_steps": "auto"}}})}),
    Case("ds-config-scheduler-param", "ds_config", ("train", *TINY, "--deepspeed", "ds.json"),
         "scheduler WarmupCosineLR has no parameter warmup_max_lr",
         files={"ds.json": _json({"scheduler": {"type": "WarmupCosineLR", "params": {
             "total_num_steps": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}}})}),
    # ---- the seeds' command shapes: --num_gpus, --deepspeed [--deepspeed_config FILE], --load_checkpoint, presets -
    Case("num-gpus-0", "cli", ("train", *TINY, "--num_gpus", "0", "--dry_run"), "--num_gpus 0: must be > 0"),
    Case("num-gpus-not-a-number", "cli", ("train", *TINY, "--num_gpus", "four"), "--num_gpus: invalid int value: 'four'"),
    Case("num-gpus-not-launched", "cli", ("train", *TINY, "--num_gpus", "4"), "--num_gpus 4 but 1 rank(s) were launched"),
    Case("deepspeed-config-missing", "ds_config", ("train", *TINY, "--deepspeed", "--deepspeed_config", "missing.json"),
         "DeepSpeed config missing.json not found"),
    Case("deepspeed-config-no-file", "ds_config", ("train", *TINY, "--deepspeed_config"),
         "argument --deepspeed_config: expected one argument"),
    Case("deepspeed-and-deepspeed-config-differ", "ds_config", ("train", *TINY, "--deepspeed", "a.json",
                                                                "--deepspeed_config", "b.json"),
         "--deepspeed a.json and --deepspeed_config b.json disagree", files={"a.json": "{}\n", "b.json": "{}\n"}),
    Case("load-checkpoint-missing", "cli", ("train", *TINY, "--load_checkpoint", "nowhere"), "checkpoint nowhere not found"),
    Case("unknown-size-first-preset", "preset/model", ("train", "--preset", "13b_mamba", "--num_gpus", "4", "--dry_run"),
         "unknown preset '13b_mamba'"),
    # ---- experiment trackers (--report_to) --------------------------------------------------------------------
    Case("report-to-typo", "cli", ("train", *TINY, "--report_to", "wandbb"), "'wandbb' is not a tracker"),
    Case("report-to-none-and-more", "cli", ("train", *TINY, "--report_to", "none", "wandb"), "none cannot be combined"),
    Case("report-to-yaml-typo", "yaml", ("train", *TINY, "--config", "spec.yaml"), "'mlfow' is not a tracker",
         files={"spec.yaml": "report_to: [tensorboard, mlfow]\n"}),
    Case("report-to-mlflow-no-uri", "env", ("train", *TINY, "--report_to", "mlflow"), "MLFLOW_TRACKING_URI is not set",
         env={"MLFLOW_TRACKING_URI": ""}),
    # ---- Mamba CUDA kernels (issue 19) ------------------------------------------------------------------------
    Case("mamba-kernels-on-without-them", "cli", ("train", "--preset", "mamba_tiny", "--from_scratch", "--synthetic_data",
                                                  "--mamba_kernels", "on"),
         "--mamba_kernels on, but the mamba_ssm / causal_conv1d CUDA kernels cannot run here"),
    Case("mamba-kernels-bad-value", "cli", ("train", "--preset", "mamba_tiny", "--from_scratch", "--mamba_kernels", "yes"),
         "mamba_kernels"),
    # ---- launch files for real clusters: site options, timeouts, checkpoint interval (issue 20) -------------------
    Case("render-rwo-for-two-pods", "render", ("render", "--preset", "t5_tiny", "--target", "k8s", "--nodes", "2",
                                               "--gpus-per-node", "1", "--cpu", "--access-mode", "RWO", "--out", OUT,
                                               "--", "--from_scratch"), "--access-mode RWO mounts the run dir on one node"),
    Case("render-setup-not-bash", "render", ("render", "--preset", "t5_tiny", "--target", "slurm", "--nodes", "1",
                                             "--gpus-per-node", "1", "--setup", "module load cuda; fi", "--out", OUT,
                                             "--", "--from_scratch"), "--setup is not a shell snippet bash can run"),
    Case("render-bad-toleration", "render", ("render", "--preset", "t5_tiny", "--target", "k8s", "--nodes", "1",
                                             "--gpus-per-node", "1", "--tolerations", "gpu:Sometimes", "--out", OUT,
                                             "--", "--from_scratch"), "is not KEY[=VALUE][:EFFECT]"),
    Case("render-max-requeues-negative", "render", ("render", "--preset", "t5_tiny", "--target", "slurm", "--nodes", "1",
                                                    "--gpus-per-node", "1", "--max-requeues", "-1", "--out", OUT, "--",
                                                    "--from_scratch"), "--max-requeues -1 is negative"),
    Case("save-interval-negative", "cli", ("train", *TINY, "--save_interval_minutes", "-5"), "save_interval_minutes"),
    Case("dist-timeout-zero", "cli", ("train", *TINY, "--dist_timeout", "0"), "dist_timeout"),
    # ---- any model (issue 18): a preset whose family is not the model dir's model_type is refused, never a
    # checkpoint loaded into the preset's class and silently re-initialised; --config_name and --task misuse
    Case("preset-gpt2-with-llama-dir", "preset/model", ("train", "--preset", "gpt2_tiny", "--model_name_or_path",
                                                        "tiny-llama", "--dataset_name", "embedded"),
         "--preset gpt2_tiny is a gpt2 model but tiny-llama holds a 'llama' model",
         files={"tiny-llama/config.json": _json({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                  "num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "vocab_size": 512})}),
    Case("preset-mamba-with-qwen2-dir", "preset/model", ("train", "--preset", "mamba_tiny", "--model_name_or_path",
                                                         "tiny-qwen2", "--dataset_name", "embedded"),
         "--preset mamba_tiny is a mamba model but tiny-qwen2 holds a 'qwen2' model",
         files={"tiny-qwen2/config.json": _json({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                                                  "num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "vocab_size": 512})}),
    Case("preset-t5-with-bart-dir", "preset/model", ("train", "--preset", "t5_tiny", "--model_name_or_path",
                                                     "tiny-bart", "--dataset_name", "embedded"),
         "--preset t5_tiny is a t5 model but tiny-bart holds a 'bart' model",
         files={"tiny-bart/config.json": _json({"model_type": "bart", "d_model": 64, "encoder_layers": 2,
                                                 "decoder_layers": 2, "vocab_size": 512})}),
    Case("preset-t5-with-bart-dir-from-scratch", "preset/model", ("train", "--preset", "t5_tiny", "--from_scratch",
                                                                  "--model_name_or_path", "tiny-bart",
                                                                  "--dataset_name", "embedded"),
         "--preset t5_tiny is a t5 model but tiny-bart holds a 'bart' model",
         files={"tiny-bart/config.json": _json({"model_type": "bart", "d_model": 64, "encoder_layers": 2,
                                                 "decoder_layers": 2, "vocab_size": 512})}),
    Case("config-name-missing", "preset/model", ("train", "--from_scratch", "--config_name", "llama.json",
                                                 "--dataset_name", "embedded"), "--config_name llama.json: no such"),
    Case("config-name-no-model-type", "preset/model", ("train", "--from_scratch", "--config_name", "llama.json",
                                                       "--dataset_name", "embedded"),
         "cannot read the model config in llama.json", files={"llama.json": _json({"hidden_size": 64})}),
    Case("config-name-and-preset", "preset/model", ("train", "--preset", "t5_tiny", "--from_scratch", "--config_name",
                                                    "llama.json", "--dataset_name", "embedded"),
         "both name the architecture", files={"llama.json": _json({"model_type": "llama"})}),
    Case("task-without-a-class", "preset/model", ("train", "--from_scratch", "--config_name", "llama.json", "--task",
                                                  "translation", "--dataset_name", "embedded"),
         "model type 'llama' has no seq2seq class", files={"llama.json": _json({"model_type": "llama"})}),
    Case("render-model-type-unknown", "render", ("render", "--model_name_or_path", "odd", "--target", "slurm",
                                                 "--nodes", "1", "--gpus-per-node", "1", "--out", OUT),
         "cannot read the model config in odd", files={"odd/config.json": _json({"model_type": "not_a_model"})}),
    Case("plan-model-dir-missing", "plan", ("plan", "--model_name_or_path", "./nowhere"),
         "--model_name_or_path ./nowhere: no such directory"),
    # ---- the token cache (issue 22) ---------------------------------------------------------------------------
    Case("cache-dir-is-a-file", "dataset", ("train", *TINY, "--cache_dir", "cache"), "--cache_dir cache is a file",
         files={"cache": "not a directory\n"}),
    Case("prepare-block-size-over-data", "dataset", ("prepare", "--", *GPT_DATA, "--train_file", "train.txt",
                                                     "--block_size", "200"),
         "shorter than one block of --block_size 200", files={"train.txt": "hello there\nanother short line\n"}),
    # ---- streaming (issue 22): what a stream cannot serve is refused before anything is read or written ---------
    Case("streaming-with-synthetic-data", "cli", ("train", "--preset", "gpt2_tiny", "--synthetic_data", "--streaming",
                                                  "--max_steps", "2"),
         "--streaming reads a dataset, --synthetic_data makes batches without one"),
    Case("streaming-by-epochs", "cli", ("train", "--preset", "gpt2_tiny", "--from_scratch", "--train_file", "train.txt",
                                        "--streaming"),
         "--streaming needs --max_steps", files={"train.txt": "hello there\n"}),
    Case("streaming-eval-without-a-file", "cli", ("train", *GPT_DATA, "--train_file", "train.txt", "--streaming",
                                                  "--do_eval"),
         "--do_eval with --streaming reads its split from --validation_file", files={"train.txt": "hello there\n"}),
    Case("streaming-without-a-tokenizer", "dataset", ("train", *GPT_DATA, "--train_file", "train.txt", "--streaming"),
         "--streaming needs a tokenizer to load", files={"train.txt": "hello there\n"}),
]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (sha256, mtime) and directory (mtime) under root, root included: a file rewritten with the same
    bytes, or one created and removed again, changes it too."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in [root, *sorted(root.rglob("*"))]}


def case_env(case: Case) -> dict[str, str]:
    env = cpu_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the hub is unreachable
    for key in LAUNCH_ENV:
        env.pop(key, None)
    env["MASTER_PORT"] = str(free_port())  # cases that reach the rendezvous must not collide with other runs
    env.update(case.env)
    return env


def ours(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("dsfleet", "python -m dsfleet.train"))]


def make_files(case: Case, workdir: Path) -> None:
    for rel, text in case.files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(text)


def run(case: Case, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(case.command(), cwd=workdir, env=case_env(case), capture_output=True, text=True, timeout=180)


def test_catalogue_is_big_enough_and_ids_unique():
    assert len(CASES) >= 34
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path):
    make_files(case, tmp_path)
    before = snapshot(tmp_path)
    proc = run(case, tmp_path)
    lines = ours(proc.stderr)
    why = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-3000:]}\n--- stdout\n{proc.stdout[-1500:]}"
    assert proc.returncode == 2, why
    assert "Traceback" not in proc.stderr + proc.stdout, why
    assert len(lines) == 1, why
    assert " — " in lines[0], why  # what is wrong — what to do
    assert case.expect in lines[0], why
    if not any(rel.split("/")[0] == OUT for rel in case.files):
        assert not (tmp_path / OUT).exists(), why
    assert snapshot(tmp_path) == before, why


def test_existing_output_dir_is_not_clobbered(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_5").mkdir(parents=True)
    (out / "checkpoints" / "step_5" / "weights.pt").write_bytes(b"precious")
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    before = snapshot(tmp_path)
    proc = run(Case("existing-output-dir", "cli", ("train", *TINY), ""), tmp_path)
    lines = ours(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "exists and is not empty" in lines[0] and "--overwrite_output_dir" in lines[0] and " — " in lines[0]
    assert snapshot(tmp_path) == before


def test_doc_lists_every_case():
    text = DOC.read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"{DOC} lacks {missing} — regenerate it: .venv/bin/python -m tests.test_bad_input"


# ---------------------------------------------------------------------------------------------------------------
# docs/bad_inputs.md, generated from the cases above

DOC_HEAD = """# Bad input: what dsfleet says

Every malformed input below gets **one line** on stderr — *what is wrong — what to do* — exit code **2**, no
traceback, and nothing written or overwritten (no `--output_dir` is created, an existing one is left as it was).
The table is the catalogue `tests/test_bad_input.py` checks, with the line each case really printed. Regenerate it
after changing a message: `.venv/bin/python -m tests.test_bad_input` (runs every case, about two minutes).

How the cases run: each in its own empty directory, so the paths are the ones typed. `python -m dsfleet.train`
cases also pass `--output_dir run --no_progress`; every case runs with `DS_ACCELERATOR=cpu` and the Hugging Face
hub offline (`HF_HUB_OFFLINE=1`), which is what "unreachable" means below. Files a case creates are listed under
the command, their text as a JSON string. `dsfleet X` is `python -m dsfleet.cli X`.

| # | id | surface | input | the line |
| --- | --- | --- | --- | --- |
"""


def _code(text: str) -> str:
    """Inline code in a table cell: pipes escaped, backticks inside allowed (double-backtick span)."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def write_doc() -> int:
    rows, bad = [], []
    for n, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as tmp:
            make_files(case, Path(tmp))
            proc = run(case, Path(tmp))
            lines = ours(proc.stderr)
            line = lines[0].replace(tmp, ".") if len(lines) == 1 else f"(exit {proc.returncode}, {len(lines)} lines)"
        if proc.returncode != 2 or len(lines) != 1:
            bad.append(case.id)
        files = "<br>".join(f"file `{rel}`: {_code(json.dumps(text, ensure_ascii=False))}"
                            for rel, text in case.files.items())
        given = _code(case.shown()) + (f"<br>{files}" if files else "")
        rows.append(f"| {n} | `{case.id}` | {case.surface} | {given} | {_code(line)} |")
        print(f"{case.id}: {line}", file=sys.stderr)
    DOC.write_text(DOC_HEAD + "\n".join(rows) + "\n")
    print(f"wrote {DOC} ({len(rows)} cases)", file=sys.stderr)
    if bad:
        print(f"not one line / exit 2: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(write_doc())
