"""The run spec: one validated description of a training run, merged preset < YAML file < CLI flags.

Every launcher backend (deepspeed, srun, mpirun, torchrun/k8s), the renderers and the planner read this
one object. The CLI accepts HF `run_translation.py` flags verbatim so existing commands keep working.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dsfleet.cli import fail

OffloadTarget = Literal["none", "cpu", "nvme"]


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train
    preset: str | None = None
    model_name_or_path: str | None = None
    from_scratch: bool = False
    tokenizer_name: str | None = None
    task: Literal["translation", "causal_lm"] | None = None
    # data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    source_lang: str = "en"
    target_lang: str = "ro"
    source_prefix: str | None = None
    max_source_length: int = Field(128, gt=0)
    max_target_length: int = Field(128, gt=0)
    block_size: int = Field(1024, gt=0)
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    max_predict_samples: int | None = Field(None, gt=0)
    synthetic_data: bool = False
    # what to do
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    predict_with_generate: bool = False
    num_beams: int = Field(1, gt=0)
    generation_max_length: int | None = None
    # optimisation
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(1.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler_type: Literal["linear", "constant", "cosine"] = "linear"
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    seed: int = 42
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    # DeepSpeed
    deepspeed: str | None = None
    zero: Literal[0, 1, 2, 3, "auto"] = 2
    offload_optimizer: OffloadTarget = "none"
    offload_param: OffloadTarget = "none"
    nvme_path: str | None = None
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None
    stage3_prefetch_bucket_size: int | None = None
    stage3_param_persistence_threshold: int | None = None
    stage3_max_live_parameters: int | None = None
    stage3_max_reuse_distance: int | None = None
    overlap_comm: bool | None = None
    reduce_scatter: bool | None = None  # ZeRO-1/2; default: on with more than one rank (dsconfig says why)
    gpu_mem_bytes: int | None = None  # planner input for `zero: auto`; default: the visible GPU's memory
    # fast path (dsfleet/fastpath.py): same math, fewer kernels and bytes; all off = the stock transformers path
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"  # auto: SDPA if supported
    fused_loss: bool = True  # chunked CE from hidden states + output embedding, no full fp32 logits (ZeRO 0-2)
    fused_activation: bool = True  # GPT-2's gelu_new as the one-kernel tanh GELU (same formula)
    compile: bool = False  # torch.compile of each repeated block (ZeRO 0-2)
    fused_grad_checks: bool = True  # ZeRO-1/2's per-tensor overflow check + clip norm as multi-tensor kernels
    # Mamba's selective scan + causal conv1d: the mamba_ssm / causal_conv1d CUDA kernels (auto: when they import on
    # a GPU; on: required, else bad input; off: transformers' pure-PyTorch scan even where they are installed)
    mamba_kernels: Literal["auto", "on", "off"] = "auto"
    gc_interval: int = Field(50, ge=0)  # Python's GC at every N-th step boundary, not mid-step (0: Python's own)
    # checkpoints, logging
    save_steps: int = Field(0, ge=0)  # 0: only at the end
    save_total_limit: int | None = Field(None, gt=0)
    resume_from_checkpoint: str | None = None  # "auto" | a path
    logging_steps: int = Field(10, gt=0)
    eval_steps: int = Field(0, ge=0)  # 0: at the end only
    peak_tflops: float | None = None
    no_progress: bool = False
    report_to: list[str] = ["jsonl", "tensorboard"]
    export_hf: bool = True
    # planning / diagnostics
    dry_run: bool = False
    check_memory: bool = False
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> "RunSpec":
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 both set — choose one")
        if self.offload_param != "none" and self.zero not in (3, "auto"):
            raise ValueError(f"offload_param={self.offload_param} needs ZeRO stage 3 (got zero={self.zero}) — use --zero 3")
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("NVMe offload needs --nvme_path — pass --nvme_path DIR on a fast local disk")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps {self.max_steps} is not a step count — pass a positive number of optimizer "
                             "steps, or -1 (the default) to train --num_train_epochs")
        return self

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


# Flags accepted on the command line: every RunSpec field (as --name), plus HF's --dataset_config alias.
IGNORED_FLAGS = ("local_rank", "local-rank")  # the deepspeed launcher appends --local_rank=N; env wins


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but bad input is one line naming the problem and the fix, exit 2."""

    def error(self, message: str):  # noqa: D401
        print(f"{self.prog}: {message} — see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser(prog: str = "dsfleet train") -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description="Train with DeepSpeed from one run spec "
                            "(preset < --config YAML < flags). Accepts HF run_translation.py flags.",
                            argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="YAML run spec (keys are the flag names)")
    for name, field in RunSpec.model_fields.items():
        flag = f"--{name}"
        ann = field.annotation
        if ann is bool:
            parser.add_argument(flag, nargs="?", const=True, type=_parse_bool, help=field.description)
        elif name == "zero":
            parser.add_argument(flag, type=lambda v: v if v == "auto" else int(v), help="ZeRO stage 0-3 or auto")
        elif name == "report_to":
            parser.add_argument(flag, nargs="+")
        else:
            parser.add_argument(flag, type=_scalar_type(ann))
    parser.add_argument("--dataset_config", dest="dataset_config_name")
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
    if preset_name:
        preset_defaults["preset"] = get_preset(preset_name).name
    merged = {**preset_defaults, **from_yaml, **cli}
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
    yaml_path = ns.pop("config", None)
    return merge_spec(ns, yaml_path)


def spec_to_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
