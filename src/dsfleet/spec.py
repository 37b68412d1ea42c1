"""The run spec: one validated description of a training run, merged preset < YAML file < CLI flags.

Every launcher backend (deepspeed, srun, mpirun, torchrun/k8s), the renderers and the planner read this
one object. The CLI accepts HF `run_translation.py` flags verbatim so existing commands keep working.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsfleet import trackers
from dsfleet.cli import OneLineParser, fail
from dsfleet.presets import PRESETS, SEED_NAMES

OffloadTarget = Literal["none", "cpu", "nvme"]


class RunSpec(BaseModel):
    """Every field is a train flag (`--name`) and a YAML key; its description is the flag's --help line."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train
    preset: str | None = Field(None, description=f"model preset by name: {', '.join(PRESETS)} (also t5-3b, mamba7b; "
                               f"{', '.join(f'{a} = {n}' for a, n in SEED_NAMES.items())}, seed 004's names)")
    model_name_or_path: str | None = Field(None, description="weights to start from: a local model dir with config.json, "
                                           "or a hub id when the hub is reachable")
    from_scratch: bool = Field(False, description="random init from --preset, --config_name or the config of "
                               "--model_name_or_path instead of loading weights")
    config_name: str | None = Field(None, description="the architecture as a transformers config: a dir with "
                                    "config.json, or the file itself (any model type: llama, qwen2, bart, mt5, ...); "
                                    "with --from_scratch a random init of it")
    tokenizer_name: str | None = Field(None, description="tokenizer dir or hub id; unset: the model's, or with "
                                       "--from_scratch a byte-level BPE trained on the run's training text")
    task: Literal["translation", "causal_lm"] | None = Field(None, description="what the model learns; unset: "
                                                             "from the model's config: translation for seq2seq models "
                                                             "(T5, mT5, BART, ...), causal_lm for decoders (GPT-2, "
                                                             "Mamba, Llama, ...)")
    # data
    dataset_name: str | None = Field(None, description="a `datasets` name or local dir, or `embedded` for the "
                                     "shipped en-ro / text corpus")
    dataset_config_name: str | None = Field(None, description="the dataset's config, e.g. ro-en")
    train_file: str | None = Field(None, description="training data file: json, jsonl, csv or txt; translation rows "
                                   '{"translation": {"en": ..., "ro": ...}}')
    validation_file: str | None = Field(None, description="evaluation data file, same formats as --train_file")
    test_file: str | None = Field(None, description="prediction data file (--do_predict), same formats as --train_file")
    text_column: str = Field("text", description="column holding the text for causal_lm")
    source_lang: str = Field("en", description="translation source language key")
    target_lang: str = Field("ro", description="translation target language key")
    source_prefix: str | None = Field(None, description="text put before every source sentence, e.g. 'translate "
                                      "English to Romanian: '")
    max_source_length: int = Field(128, gt=0, description="translation: source tokens kept per example")
    max_target_length: int = Field(128, gt=0, description="translation: target tokens kept per example (and generated "
                                   "without --generation_max_length)")
    block_size: int = Field(1024, gt=0, description="causal_lm: tokens per training sequence (text is packed)")
    max_train_samples: int | None = Field(None, gt=0, description="use only the first N training examples")
    max_eval_samples: int | None = Field(None, gt=0, description="use only the first N evaluation examples")
    max_predict_samples: int | None = Field(None, gt=0, description="use only the first N prediction examples")
    synthetic_data: bool = Field(False, description="random token ids at the spec's lengths instead of a dataset "
                                 "(benchmarks, memory checks; implies --from_scratch without a model)")
    cache_dir: str | None = Field(None, description="token cache: the corpus tokenized once into memory-mapped "
                                  "shards that every rank reads, reused by each run whose data, tokenizer and "
                                  "lengths match (`dsfleet prepare` fills it ahead of a job); unset: "
                                  "$DSFLEET_CACHE_DIR, else ~/.cache/dsfleet. On a dir all nodes see, rank 0 "
                                  "prepares for the job; else the first rank of each node")
    streaming: bool = Field(False, description="read the training data as a stream (datasets' streaming=True: "
                            "bigger than the disk), each rank its own share, tokenized and packed on the fly; the "
                            "stream position is in the checkpoint (an exact resume on the same world size). Needs "
                            "--max_steps and a tokenizer to load; causal-LM text packed into blocks, translation "
                            "pairs one a row; evaluation reads --validation_file/--test_file through the token cache")
    preprocessing_num_workers: int | None = Field(None, gt=0, description="processes that tokenize the corpus into "
                                                  "the token cache; unset: every core")
    # what to do
    output_dir: str | None = Field(None, description="run dir: metrics.jsonl, tb/, plot.png, checkpoints/, final/, "
                                   "spec.yaml, ds_config.json (required, except for a dry run)")
    overwrite_output_dir: bool = Field(False, description="replace what an earlier run left in --output_dir (only "
                                       "dsfleet's own files are removed)")
    do_train: bool = Field(False, description="train (the default when none of --do_train/--do_eval/--do_predict is "
                                "given)")
    do_eval: bool = Field(False, description="evaluate on the validation split at the end (loss; BLEU or perplexity)")
    do_predict: bool = Field(False, description="generate for the test split into OUTPUT_DIR/generated_predictions.txt")
    predict_with_generate: bool = Field(False, description="translation: generate during evaluation to score BLEU")
    num_beams: int = Field(1, gt=0, description="beams for generation")
    generation_max_length: int | None = Field(None, description="tokens to generate; unset: --max_target_length")
    # optimisation
    per_device_train_batch_size: int = Field(8, gt=0, description="micro batch per rank (DeepSpeed's "
                                             "train_micro_batch_size_per_gpu)")
    per_device_eval_batch_size: int = Field(8, gt=0, description="evaluation batch per rank")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro batches per optimizer step "
                                             "(train_batch_size = micro batch x this x world size)")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, description="AdamW beta1")
    adam_beta2: float = Field(0.999, description="AdamW beta2")
    adam_epsilon: float = Field(1e-8, description="AdamW epsilon")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0: none)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup optimizer steps")
    lr_scheduler_type: Literal["linear", "constant", "cosine"] = Field("linear", description="learning rate decay "
                                                                       "after warmup")
    num_train_epochs: float = Field(3.0, gt=0, description="epochs to train when --max_steps is -1")
    max_steps: int = Field(-1, description="optimizer steps to train; -1: --num_train_epochs decides")
    seed: int = Field(42, description="seed of init, data order and dropout")
    fp16: bool = Field(False, description="fp16 mixed precision (trained in fp32, and said so, where the accelerator "
                            "has no fp16)")
    bf16: bool = Field(False, description="bf16 mixed precision")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, one more "
                                         "forward pass of compute")
    # DeepSpeed
    deepspeed: str | None = Field(None, description="a DeepSpeed JSON config (HF's --deepspeed FILE), or zero2 / zero3 "
                                  "for the shipped ones; \"auto\" values are filled from the spec; unset: generated "
                                  "from the spec. A bare --deepspeed (DeepSpeed's add_config_arguments switch) is "
                                  "accepted: dsfleet always trains with DeepSpeed")
    zero: Literal[0, 1, 2, 3, "auto"] = Field(2, description="ZeRO stage; auto: the planner's fastest stage/offload "
                                              "that fits (ignored with --deepspeed FILE, whose stage wins)")
    offload_optimizer: OffloadTarget = Field("none", description="ZeRO-Offload of optimizer states (nvme needs "
                                             "--nvme_path)")
    offload_param: OffloadTarget = Field("none", description="ZeRO-3 parameter offload (needs --zero 3)")
    nvme_path: str | None = Field(None, description="dir on a fast local disk for NVMe offload")
    reduce_bucket_size: int | None = Field(None, description="ZeRO reduce bucket (elements); unset: max(h², 5e7) for "
                                           "ZeRO-1/2, h² for ZeRO-3 (h = hidden size)")
    allgather_bucket_size: int | None = Field(None, description="ZeRO-1/2 all-gather bucket (elements); unset: 5e8")
    stage3_prefetch_bucket_size: int | None = Field(None, description="ZeRO-3 prefetch bucket (elements); unset: 0.9 h²")
    stage3_param_persistence_threshold: int | None = Field(None, description="ZeRO-3: parameters smaller than this "
                                                           "stay unpartitioned; unset: 10 h")
    stage3_max_live_parameters: int | None = Field(None, description="ZeRO-3: parameters kept gathered at once; "
                                                   "unset: 1e9")
    stage3_max_reuse_distance: int | None = Field(None, description="ZeRO-3: keep a parameter gathered if it is reused "
                                                  "within this many; unset: 1e9")
    overlap_comm: bool | None = Field(None, description="overlap gradient reduction with backward; unset: on, except "
                                      "ZeRO-1/2 on one rank (nothing to overlap)")
    reduce_scatter: bool | None = Field(None, description="ZeRO-1/2: reduce-scatter gradients instead of all-reduce; "
                                        "unset: on with more than one rank (dsconfig says why)")
    gpu_mem_bytes: int | None = Field(None, description="GPU memory the planner assumes for --zero auto and the dry "
                                      "run's plan (bytes); unset: the visible GPU's, 80 GiB without one")
    # fast path (dsfleet/fastpath.py): same math, fewer kernels and bytes; all off = the stock transformers path
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="transformers attention kernel; auto: SDPA where the model class has it")
    fused_loss: bool = Field(True, description="chunked cross-entropy from hidden states and the output embedding, no "
                             "full fp32 logits (ZeRO 0-2)")
    fused_activation: bool = Field(True, description="GPT-2's gelu_new as the one-kernel tanh GELU (same formula)")
    compile: bool = Field(False, description="torch.compile of each repeated block (ZeRO 0-2)")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "off", description="with --compile: replay each compiled block as a CUDA graph (torch.compile's "
        "reduce-overhead mode: no per-kernel launches from the host); auto: on for CUDA runs at ZeRO 0-2 without "
        "gradient checkpointing whose batches have one shape (packed causal-LM blocks, synthetic rows), except "
        "Mamba. Off by default until its loss curve is checked on a GPU (docs/benchmarks.md)")
    fused_grad_checks: bool = Field(True, description="ZeRO-1/2's per-tensor overflow check and clip norm as "
                                    "multi-tensor kernels")
    mamba_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Mamba's selective scan and causal conv1d as the mamba_ssm / causal_conv1d CUDA kernels; "
        "auto: when they import on a GPU; on: required (else one line); off: transformers' pure-PyTorch scan")
    gc_interval: int = Field(50, ge=0, description="Python's garbage collector at every N-th step boundary, not "
                             "mid-step; 0: Python's own")
    # checkpoints, logging
    save_steps: int = Field(0, ge=0, description="checkpoint every N optimizer steps; 0: only at the end")
    save_total_limit: int | None = Field(None, gt=0, description="keep only the newest N checkpoints; unset: all")
    save_interval_minutes: float = Field(0, ge=0, description="also checkpoint once this many minutes have passed "
                                         "since the last save (every rank agrees at a step boundary); 0: steps "
                                         "only. Rendered launch files default to 30")
    dist_timeout: int = Field(1800, gt=0, description="seconds a collective may wait for a peer before it fails "
                              "(torch.distributed's timeout): a rank alive but stuck")
    heartbeat_timeout: int = Field(120, ge=0, description="seconds without a peer's heartbeat after which every rank "
                                   "exits 75 naming the missing rank (a stopped, killed or lost rank; the launchers "
                                   "restart the job, which resumes); 0: no watchdog")
    resume_from_checkpoint: str | None = Field(None, description="auto (the latest complete checkpoint in "
                                               "--output_dir, if any), a step dir, or a checkpoints dir; restores "
                                               "model, optimizer, scheduler, step, data position and RNG")
    logging_steps: int = Field(10, gt=0, description="log loss, lr, throughput every N optimizer steps")
    eval_steps: int = Field(0, ge=0, description="evaluate every N optimizer steps; 0: at the end only")
    peak_tflops: float | None = Field(None, description="the accelerator's peak TFLOP/s per rank, for MFU in "
                                      "metrics.jsonl")
    no_progress: bool = Field(False, description="no progress bar (logs only)")
    report_to: list[str] = Field(["jsonl", "tensorboard"], description=(
        "where metrics go, any of: jsonl tensorboard wandb mlflow (or none, or all). The names given are used, plus "
        "jsonl always (metrics.jsonl: plot.png is drawn from it); none = jsonl alone; all = jsonl, "
        "tensorboard and each of wandb/mlflow that is installed (pip install 'dsfleet[wandb]', 'dsfleet[mlflow]'). "
        "Settings from their env: WANDB_PROJECT/WANDB_MODE/WANDB_DIR, MLFLOW_TRACKING_URI/MLFLOW_EXPERIMENT_NAME"))
    export_hf: bool = Field(True, description="write consolidated HF weights (safetensors) to OUTPUT_DIR/final")
    # planning / diagnostics
    num_gpus: int | None = Field(None, gt=0, description="GPUs (ranks) to plan for without a launcher: --dry_run and "
                                 "--check_memory print the plan for N (seed 004's flag); a launched run must have "
                                 "exactly N ranks; unset: the launched world size")
    dry_run: bool = Field(False, description="print the run spec, the DeepSpeed config and the memory plan, then exit "
                          "without training or writing anything")
    check_memory: bool = Field(False, description="print live GPU/CPU memory after engine init and at every log; with "
                               "--num_gpus N other than the launched world size: the memory plan for N, nothing run")
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1, description="cap this process's share of GPU memory "
                                              "(torch.cuda.set_per_process_memory_fraction): emulate a smaller card")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value):  # HF accepts `report_to: wandb`
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        return trackers.parse_report_to(value)

    @model_validator(mode="after")
    def _consistent(self) -> "RunSpec":
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 both set — choose one")
        if self.offload_param != "none" and self.zero not in (3, "auto"):
            raise ValueError(f"offload_param={self.offload_param} needs ZeRO stage 3 (got zero={self.zero}) — use --zero 3")
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("NVMe offload needs --nvme_path — pass --nvme_path DIR on a fast local disk")
        if self.cuda_graphs == "on" and not self.compile:
            raise ValueError("--cuda_graphs on replays the compiled blocks: it needs --compile true")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps {self.max_steps} is not a step count — pass a positive number of optimizer "
                             "steps, or -1 (the default) to train --num_train_epochs")
        if self.streaming:
            from dsfleet.streaming import check
            check(self)
        return self

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def planned_world_size(self, launched: int) -> int:
        """The world size this run plans for: --num_gpus N (seed 004: plan 4 GPUs from one process), else the
        launched one. A --check_memory for N ranks that were not launched becomes a dry run (the memory plan for
        N: there is nothing to measure N ranks on); training needs exactly N launched ranks."""
        if self.num_gpus is None or self.num_gpus == launched:
            return launched
        if self.check_memory:
            self.dry_run = True
        if not self.dry_run:
            fail(f"--num_gpus {self.num_gpus} but {launched} rank(s) were launched — launch {self.num_gpus} (e.g. "
                 f"deepspeed --num_gpus {self.num_gpus} --module dsfleet.train ...), or add --dry_run to plan for "
                 f"{self.num_gpus} without launching")
        return self.num_gpus


# Flags accepted on the command line: every RunSpec field as --name, plus the names other programs give a few
# fields (each said in that field's help line by flag_help, hence in --help and docs/flags.md).
ALIASES = {  # alias flag -> (the field it sets, whose name it is)
    "dataset_config": ("dataset_config_name", "HF run_translation.py's name"),
    "deepspeed_config": ("deepspeed", "DeepSpeed's add_config_arguments name, seeds 002 and 004"),
    "load_checkpoint": ("resume_from_checkpoint", "seed 004's name"),
}
IGNORED_FLAGS = ("local_rank", "local-rank")  # the deepspeed launcher appends --local_rank=N; env wins
# --help groups, each named at its first field (RunSpec's order).
GROUPS = {"preset": "what to train", "dataset_name": "data", "output_dir": "what to do",
          "per_device_train_batch_size": "optimisation", "deepspeed": "DeepSpeed",
          "attn_implementation": "fast path (same math, fewer kernels and bytes; all off = the stock transformers path)",
          "save_steps": "checkpoints, logging", "num_gpus": "planning, diagnostics"}
METAVARS = {"preset": "NAME", "model_name_or_path": "DIR|ID", "config_name": "DIR|FILE", "tokenizer_name": "DIR|ID", "dataset_name": "NAME|DIR",
            "dataset_config_name": "NAME", "train_file": "FILE", "validation_file": "FILE", "test_file": "FILE",
            "text_column": "NAME", "source_lang": "LANG", "target_lang": "LANG", "source_prefix": "TEXT",
            "output_dir": "DIR", "cache_dir": "DIR", "deepspeed": "FILE", "nvme_path": "DIR", "resume_from_checkpoint": "auto|DIR",
            "report_to": "NAME"}
DESCRIPTION = ("Train with DeepSpeed from one run spec: preset < --config YAML < flags. Accepts HF run_translation.py "
               "flags verbatim, and DeepSpeed's `--deepspeed --deepspeed_config FILE`. Every flag is also a key of the "
               "YAML spec. Defaults shown are the run spec's; a --preset sets its own for some (task, lengths, "
               "learning rate): `dsfleet show-config -- --preset NAME` prints the merged values.")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _zero_stage(text: str) -> int | str:
    return text if text == "auto" else int(text)


class _DeepSpeedFlag(argparse.Action):
    """--deepspeed FILE (HF's flag: a config path or a shipped name) sets the config; a bare --deepspeed
    (DeepSpeed's add_config_arguments switch, "use DeepSpeed") sets nothing: dsfleet always trains with DeepSpeed."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None:
            setattr(namespace, self.dest, values)


def shown_default(value: Any) -> str:
    """A default as a user types it: true/false, space-separated lists, `unset` for None."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def flag_help(name: str) -> str:
    """A field's --help line: its description, its alias flags, then its choices (Literal fields) and default
    (a None default goes unsaid where the description says what `unset` means)."""
    field = RunSpec.model_fields[name]
    text = field.description + "".join(f"; also --{alias} ({who})" for alias, (target, who) in ALIASES.items()
                                       if target == name)
    facts = [f"choices: {', '.join(choices)}"] if (choices := _choices(field.annotation)) else []
    if not (field.default is None and "unset:" in field.description):
        facts.append(f"default: {shown_default(field.default)}")
    return f"{text} ({'; '.join(facts)})" if facts else text


def build_parser(prog: str = "dsfleet train") -> argparse.ArgumentParser:
    """The train flags from RunSpec: help, choices and defaults all come from the fields (defaults are not set on
    the parser, argument_default=SUPPRESS, so only typed flags override the preset and YAML)."""
    from dsfleet import __version__
    parser = OneLineParser(prog=prog, description=DESCRIPTION, argument_default=argparse.SUPPRESS,
                           allow_abbrev=False, usage="%(prog)s [--config FILE] [--preset NAME] [--FLAG [VALUE] ...]")
    parser.add_argument("--config", metavar="FILE", help="YAML run spec: one `flag: value` line per flag, without --")
    parser.add_argument("--version", action="version", version=f"dsfleet {__version__}",
                        help="print dsfleet's version and exit")
    group = parser
    for name, field in RunSpec.model_fields.items():
        group = parser.add_argument_group(GROUPS[name]) if name in GROUPS else group
        ann = field.annotation
        choices = _choices(ann)
        metavar = "{" + ",".join(choices) + "}" if choices else METAVARS.get(name) or (
            "BOOL" if "bool" in str(ann) else "N" if _scalar_type(ann) is int else "X" if _scalar_type(ann) is float
            else name.upper())
        kwargs: dict[str, Any] = {"metavar": metavar, "help": flag_help(name).replace("%", "%%")}
        if ann is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool)
        elif name == "zero":
            kwargs.update(type=_zero_stage)
        elif name == "deepspeed":
            kwargs.update(nargs="?", const=None, action=_DeepSpeedFlag)
        elif name == "report_to":
            kwargs.update(nargs="+", metavar="NAME")
        else:
            kwargs.update(type=_scalar_type(ann))
        group.add_argument(f"--{name}", **kwargs)
        for alias in (a for a, (target, _) in ALIASES.items() if target == name):
            group.add_argument(f"--{alias}", dest=f"_alias_{alias}", metavar=metavar, help=f"the same as --{name}")
    for flag in IGNORED_FLAGS:
        parser.add_argument(f"--{flag}", dest="_ignored_local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def _scalar_type(annotation: Any):
    text = str(annotation)
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        fail(f"config file {path} not found — pass an existing YAML run spec to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        fail(f"config file {path}{where} is not valid YAML — fix the syntax ({getattr(e, 'problem', e)})")
    if not isinstance(data, dict):
        fail(f"config file {path} is a YAML {type(data).__name__}, not a mapping — write one `key: value` line per "
             "spec key (the train flags without --), e.g. `zero: 3`")
    return data


def merge_spec(cli: dict[str, Any], yaml_path: str | None = None) -> RunSpec:
    """preset defaults < YAML < CLI, validated. Bad values -> UsageError (one line, exit 2)."""
    from dsfleet.presets import get_preset

    from_yaml = load_yaml(yaml_path) if yaml_path else {}
    preset_name = cli.get("preset") or from_yaml.get("preset")
    preset_defaults = dict(get_preset(preset_name).defaults) if preset_name else {}
    merged = {**preset_defaults, **from_yaml, **cli}
    if preset_name:  # an alias (7b_mamba, t5-3b) is recorded as the preset's own name
        merged["preset"] = get_preset(preset_name).name
    try:
        return RunSpec(**merged)
    except ValidationError as e:
        fail(describe_error(e.errors()[0], cli, from_yaml, yaml_path))


def describe_error(err: dict[str, Any], cli: dict[str, Any], from_yaml: dict[str, Any], yaml_path: str | None) -> str:
    """One pydantic error as `WHERE VALUE: what is wrong — what to pass`, WHERE the flag or YAML key that set it."""
    loc = err.get("loc") or ()
    if not loc:  # the model validator: its message names the flags and the fix
        msg = err["msg"].removeprefix("Value error, ")
        return msg if " — " in msg else f"{msg} — see --help"
    name = str(loc[0])
    if err["type"] == "extra_forbidden":
        return f"unknown spec key {name!r} in {yaml_path or 'spec'} — valid keys are the train flags (see --help)"
    value = err.get("input")
    if name in cli:  # as typed on the command line
        where = f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
    elif name in from_yaml:
        where = f"{yaml_path}: {name} {value!r}"
    else:
        where = f"{name} {value!r}"
    problem, fix = _problem_and_fix(err, RunSpec.model_fields.get(name))
    return f"{where}: {problem} — {fix}"


def _choices(annotation) -> list[str]:
    """The values of a Literal (or of the Literal inside `Literal[...] | None`)."""
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return [c for arg in get_args(annotation) if arg is not type(None) for c in _choices(arg)]


def _problem_and_fix(err: dict[str, Any], field) -> tuple[str, str]:
    kind = err["type"]
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (err.get("ctx") or {}).items()}
    text = str(field.annotation) if field is not None else ""
    number = "a positive integer" if "int" in text and "float" not in text else "a positive number"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}", f"pass {number}" if ctx.get("gt") == 0 else f"pass more than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}", "pass 0 or more" if ctx.get("ge") == 0 else f"pass {ctx.get('ge')} or more"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}", f"pass at most {ctx.get('le')}"
    if kind == "literal_error":
        choices = _choices(field.annotation) if field is not None else []
        return "not one of the choices", f"use one of: {', '.join(choices) or ctx.get('expected')}"
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return "not a whole number", "pass an integer, e.g. 8"
    if kind in ("float_parsing", "float_type"):
        return "not a number", "pass a number, e.g. 3e-4"
    if kind in ("bool_parsing", "bool_type"):
        return "not true/false", "pass true or false"
    if kind == "list_type":
        return "not a list", "write a list, e.g. [jsonl, tensorboard]"
    if kind.startswith("string"):
        return "not a string", "quote it in the YAML file"
    if kind == "value_error":
        problem, _, fix = err["msg"].removeprefix("Value error, ").partition(" — ")
        return problem, fix or "see --help"
    return err["msg"][:1].lower() + err["msg"][1:], "see --help"


def parse_args(argv: list[str] | None = None, prog: str = "dsfleet train") -> RunSpec:
    ns = vars(build_parser(prog).parse_args(argv))
    ns.pop("_ignored_local_rank", None)
    for alias, (name, _) in ALIASES.items():
        if f"_alias_{alias}" in ns:
            value = ns.pop(f"_alias_{alias}")
            if name in ns and ns[name] != value:
                fail(f"--{name} {ns[name]} and --{alias} {value} disagree — pass one of them")
            ns[name] = value
    yaml_path = ns.pop("config", None)
    return merge_spec(ns, yaml_path)


def spec_to_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
