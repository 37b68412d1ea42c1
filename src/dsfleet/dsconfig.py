"""The DeepSpeed config of a run: generated from the RunSpec, or a user's JSON with "auto" values filled in.

Both paths end in the same checks (batch arithmetic, precision the accelerator supports), so a config that
DeepSpeed would reject after minutes of model loading is rejected here first, in one line.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

from dsfleet.cli import fail

SHIPPED = ("zero2", "zero3")  # `--deepspeed zero2` names a tuned file shipped in dsfleet/configs/
STAGE3_MAX_REUSE_DISTANCE = 10**9  # when the spec names none; the planner counts what it keeps gathered


def shipped_config_path(name: str) -> Path:
    return Path(str(resources.files("dsfleet") / "configs" / f"ds_config_{name}.json"))


def read_user_config(path_or_name: str) -> dict[str, Any]:
    path = shipped_config_path(path_or_name) if path_or_name in SHIPPED else Path(path_or_name)
    if not path.is_file():
        fail(f"DeepSpeed config {path_or_name} not found — pass a readable JSON file or one of {', '.join(SHIPPED)}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        fail(f"DeepSpeed config {path} cannot be read ({e.__class__.__name__}) — check the file and its permissions")
    except json.JSONDecodeError as e:
        fail(f"DeepSpeed config {path} line {e.lineno} is not valid JSON ({e.msg}) — fix the syntax")
    if not isinstance(data, dict):
        fail(f"DeepSpeed config {path} is a JSON {type(data).__name__}, not an object — write one JSON object of "
             "DeepSpeed keys, e.g. {\"zero_optimization\": {\"stage\": 2}}")
    return data


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    block = {"device": device, "pin_memory": False}  # pinned host memory starves small hosts (seed 003)
    if device == "nvme":
        block.update(nvme_path=nvme_path, pin_memory=True)
    return block


def default_overlap_comm(zero_stage: int, world_size: int, on_cpu: bool) -> bool:
    """overlap_comm unless there is nothing to overlap: ZeRO-1/2 on one rank. DeepSpeed's ZeRO-1/2 overlap path
    synchronises the whole device before every reduce bucket (0.19, allreduce_and_copy); with no communication to
    hide that only stalls the backward pass (GPT-2 XL on one H200: docs/benchmarks.md)."""
    return not on_cpu and (world_size > 1 or zero_stage == 3)


def default_reduce_scatter(world_size: int) -> bool:
    """reduce_scatter for ZeRO-1/2 unless there is one rank. On one rank DeepSpeed's reduce-scatter path still
    flattens every bucket into a new tensor and copies each gradient back out of it; its all-reduce path reduces
    the bucket in place (a no-op on one rank). Same gradients either way; T5-3B on one H200 runs ~16 % faster
    (docs/benchmarks.md)."""
    return world_size > 1


def default_reduce_bucket(hidden_size: int, zero_stage: int) -> int:
    """reduce_bucket_size when the spec names none: max(h², 5e7) for ZeRO-1/2, h² for ZeRO-3."""
    h2 = hidden_size * hidden_size
    return max(h2, 5 * 10**7) if zero_stage < 3 else h2


def generate(spec, *, world_size: int, hidden_size: int, zero_stage: int, on_cpu: bool) -> dict[str, Any]:
    """A DeepSpeed config from the spec. `zero_stage` is already resolved (no "auto")."""
    h2 = hidden_size * hidden_size
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=default_overlap_comm(zero_stage, world_size, on_cpu)
                    if spec.overlap_comm is None else spec.overlap_comm,
                    reduce_bucket_size=spec.reduce_bucket_size or default_reduce_bucket(hidden_size, zero_stage))
    if zero_stage in (1, 2):
        zero.update(allgather_bucket_size=spec.allgather_bucket_size or 5 * 10**8,
                    reduce_scatter=default_reduce_scatter(world_size) if spec.reduce_scatter is None
                    else spec.reduce_scatter)
    if zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=spec.stage3_prefetch_bucket_size or int(0.9 * h2),
            stage3_param_persistence_threshold=spec.stage3_param_persistence_threshold or 10 * hidden_size,
            stage3_max_live_parameters=spec.stage3_max_live_parameters or 10**9,
            stage3_max_reuse_distance=spec.stage3_max_reuse_distance or STAGE3_MAX_REUSE_DISTANCE,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if spec.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(spec.offload_optimizer, spec.nvme_path)
    if spec.offload_param != "none":
        zero["offload_param"] = _offload(spec.offload_param, spec.nvme_path)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.per_device_train_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "train_batch_size": spec.per_device_train_batch_size * spec.gradient_accumulation_steps * world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": spec.learning_rate, "betas": [spec.adam_beta1, spec.adam_beta2], "eps": spec.adam_epsilon,
            "weight_decay": spec.weight_decay}},
        "steps_per_print": 10**9,  # dsfleet logs; DeepSpeed's own step prints would interleave with the bar
        "wall_clock_breakdown": False,
        # dsfleet measures throughput itself (metrics.jsonl); DeepSpeed's timer synchronises the device twice a step
        "timers": {"throughput": {"enabled": False}},
    }
    if spec.bf16:
        config["bf16"] = {"enabled": True}
    elif spec.fp16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    if on_cpu and spec.offload_optimizer == "none":
        config["optimizer"]["params"]["torch_adam"] = True  # no fused-Adam JIT build on CPU ranks
    if zero_stage == 3 or spec.offload_optimizer != "none":
        config["zero_allow_untested_optimizer"] = True
    return config


def fill_auto(user: dict[str, Any], spec, *, world_size: int, hidden_size: int, total_steps: int) -> dict[str, Any]:
    """Fill HF-style "auto" values of a user config from the spec, as HF Trainer does."""
    cfg = copy.deepcopy(user)
    h = hidden_size
    micro = spec.per_device_train_batch_size
    gas = spec.gradient_accumulation_steps
    values = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization.reduce_bucket_size": h * h,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h),
        "zero_optimization.stage3_param_persistence_threshold": 10 * h,
        "optimizer.params.lr": spec.learning_rate,
        "optimizer.params.betas": [spec.adam_beta1, spec.adam_beta2],
        "optimizer.params.eps": spec.adam_epsilon,
        "optimizer.params.weight_decay": spec.weight_decay,
        "scheduler.params.warmup_min_lr": 0,
        "scheduler.params.warmup_max_lr": spec.learning_rate,
        "scheduler.params.warmup_num_steps": spec.warmup_steps,
        "scheduler.params.total_num_steps": total_steps,
        "fp16.enabled": spec.fp16,
        "bf16.enabled": spec.bf16,
    }
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and node.get(leaf) == "auto":
            node[leaf] = value
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        cfg.setdefault(key, values[key])
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        fail(f"DeepSpeed config has \"auto\" for {', '.join(left)}, which dsfleet cannot fill — set a value")
    return cfg


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def check(config: dict[str, Any], *, world_size: int, on_cpu: bool,
          accelerator_fp16: bool) -> tuple[dict[str, Any], str | None]:
    """Batch arithmetic and precision: the config (fp16 turned off on a CPU accelerator without fp16) and the
    line that says so (None when nothing changed)."""
    micro = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    total = config.get("train_batch_size")
    if not all(isinstance(v, int) and v > 0 for v in (micro, gas, total)):
        bad = next(k for k, v in zip(("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                      "train_batch_size"), (micro, gas, total)) if not (isinstance(v, int) and v > 0))
        fail(f"DeepSpeed config {bad} is {config.get(bad)!r} — set it to a positive integer or \"auto\"")
    if micro * gas * world_size != total:
        fail(f"train_batch_size {total} != micro batch {micro} x grad accumulation {gas} x world size {world_size} "
             f"(= {micro * gas * world_size}) — fix one of them")
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        fail("DeepSpeed config enables both fp16 and bf16 — enable one")
    if config.get("fp16", {}).get("enabled") and on_cpu and not accelerator_fp16:
        return dict(config, fp16={"enabled": False}), (
            "fp16 is not supported by DeepSpeed's CPU accelerator on this CPU — this CPU run trains in fp32 "
            "(use --bf16 for reduced precision on CPU)")
    return config, None


def zero_stage_of(config: dict[str, Any]) -> int:
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        fail(f"DeepSpeed config zero_optimization is {zero!r}, not an object — write e.g. "
             "\"zero_optimization\": {\"stage\": 2}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        fail(f"DeepSpeed config zero_optimization.stage {stage!r} is not a ZeRO stage — use 0, 1, 2 or 3")
    return int(stage)


# the values of a DeepSpeed config that the run spec's flags carry (fill_auto fills each from the spec)
SPEC_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
              "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay",
              "fp16.enabled", "bf16.enabled")


def with_spec_autos(config: dict[str, Any]) -> dict[str, Any]:
    """The config with "auto" where the spec's flags hold the value: a file handed to a command that also carries
    those flags then has one source for each value (DeepSpeed's own choices stay in the file)."""
    cfg = copy.deepcopy(config)
    for dotted in SPEC_OWNED:
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = "auto"
    return cfg
