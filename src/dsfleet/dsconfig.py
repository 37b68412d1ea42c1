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
    cpu_rank_optimizer(config, on_cpu=on_cpu)  # no fused-Adam JIT build on CPU ranks
    if zero_stage == 3 or spec.offload_optimizer != "none":
        config["zero_allow_untested_optimizer"] = True
    return config


# ---- optimizer and scheduler blocks of a user config ----------------------------------------------------------
# The optimizer names DeepSpeed builds itself (deepspeed/runtime/config.py DEEPSPEED_OPTIMIZERS; it compares them
# lowercased), as users spell them. Any other name DeepSpeed looks up in torch.optim (case as written).
DEEPSPEED_OPTIMIZERS = ("Adam", "AdamW", "Adagrad", "Lamb", "Lion", "Muon", "MuAdam", "MuAdamW", "MuSGD")
ADAM_TYPES = ("adam", "adamw")

# DeepSpeed's own schedulers (deepspeed/runtime/lr_schedules.py, 0.19): the keyword parameters each constructor
# takes after the optimizer, and which of them have no default. DeepSpeed calls `Type(optimizer, **params)`, so any
# other key is a TypeError deep inside deepspeed.initialize; dsfleet names it first. tests/test_hf_ds_configs.py
# compares this table with the installed DeepSpeed's signatures. Any other name DeepSpeed looks up in
# torch.optim.lr_scheduler.
_WARMUP = ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration")
SCHEDULER_PARAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "WarmupLR": (_WARMUP, ()),
    "WarmupDecayLR": (("total_num_steps", *_WARMUP), ("total_num_steps",)),
    "WarmupCosineLR": (("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                        "last_batch_iteration"), ("total_num_steps",)),
    "OneCycle": (("cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size", "cycle_second_step_size",
                  "cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "cycle_momentum",
                  "cycle_min_mom", "cycle_max_mom", "decay_mom_rate", "last_batch_iteration"),
                 ("cycle_min_lr", "cycle_max_lr")),
    "LRRangeTest": (("lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
                     "lr_range_test_staircase", "last_batch_iteration"), ()),
}
# step counts: DeepSpeed's warmup schedulers insist on an int (a JSON 1e3 reads as 1000.0)
_STEP_COUNTS = ("warmup_num_steps", "total_num_steps", "cycle_first_step_size", "cycle_second_step_size",
                "cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "lr_range_test_step_size",
                "last_batch_iteration")


def _torch_class(module_name: str, name: str, base_name: str) -> bool:
    """Whether torch.optim[.lr_scheduler] has a class `name` derived from `base_name` (what DeepSpeed falls back to)."""
    import importlib
    module = importlib.import_module(module_name)
    cls, base = getattr(module, name, None), getattr(module, base_name)
    return isinstance(cls, type) and issubclass(cls, base)


def _block(cfg: dict[str, Any], key: str) -> dict[str, Any] | None:
    block = cfg.get(key)
    if block is None:
        return None
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        fail(f"DeepSpeed config {key} is {json.dumps(block)[:80]}, not an object with a \"type\" — write e.g. "
             f"\"{key}\": {{\"type\": \"{'AdamW' if key == 'optimizer' else 'WarmupDecayLR'}\", \"params\": {{...}}}}")
    params = block.setdefault("params", {})  # DeepSpeed unpacks params with **: a missing block would be None
    if params is None:
        block["params"] = {}
    elif not isinstance(params, dict):
        fail(f"DeepSpeed config {key}.params is {json.dumps(params)[:80]}, not an object — write e.g. "
             "\"params\": {\"lr\": \"auto\"}")
    return block


def check_optimizer_block(cfg: dict[str, Any]) -> None:
    block = _block(cfg, "optimizer")
    if block is None:
        return
    name = block["type"]
    if name.lower() not in {n.lower() for n in DEEPSPEED_OPTIMIZERS} and not _torch_class("torch.optim", name,
                                                                                            "Optimizer"):
        fail(f"DeepSpeed config optimizer.type {name!r} is not an optimizer DeepSpeed can build — use one of "
             f"{', '.join(DEEPSPEED_OPTIMIZERS)} or a torch.optim class name (e.g. SGD)")


def check_scheduler_block(cfg: dict[str, Any]) -> None:
    block = _block(cfg, "scheduler")
    if block is None:
        return
    name, params = block["type"], block["params"]
    if name not in SCHEDULER_PARAMS:
        if not _torch_class("torch.optim.lr_scheduler", name, "LRScheduler"):
            fail(f"DeepSpeed config scheduler.type {name!r} is not a scheduler DeepSpeed knows — use one of "
                 f"{', '.join(SCHEDULER_PARAMS)} or a torch.optim.lr_scheduler class name (e.g. StepLR)")
        return  # a torch scheduler: its parameters are torch's business
    accepted, required = SCHEDULER_PARAMS[name]
    unknown = [k for k in params if k not in accepted]
    if unknown:
        fail(f"DeepSpeed config scheduler {name} has no parameter {', '.join(unknown)} — {name} takes "
             f"{', '.join(accepted)}")
    missing = [k for k in required if k not in params]
    if missing:
        fail(f"DeepSpeed config scheduler {name} needs params.{', params.'.join(missing)} — set "
             f"{'it' if len(missing) == 1 else 'them'} (\"auto\" fills {'it' if len(missing) == 1 else 'them'} "
             "from the run)")


def _step_count(params: dict[str, Any], key: str) -> None:
    """Step counts as DeepSpeed accepts them: an int (1e3 in JSON is 1000.0), and no warmup as 1 step.

    DeepSpeed >= 0.19.6 rejects warmup_num_steps 0 (WarmupLR, WarmupDecayLR, WarmupCosineLR: 'must be a positive
    integer') and a cycle_first_step_size 0 (OneCycle divides by it). Older DeepSpeed silently raised a warmup of
    0 to 2 steps (it still floors at 2: max(2, n)), so 1 runs the very schedule that 0 always ran — and it is what
    HF Trainer writes for "auto" with no warmup (max(1, warmup steps)). An explicit 0 means the same and gets the
    same 1."""
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value != int(value) or value < (-1 if key == "last_batch_iteration" else 0):
        fail(f"DeepSpeed config scheduler.params.{key} is {value!r} — set a whole number of steps >= 0")
    params[key] = int(value)
    if key in ("warmup_num_steps", "cycle_first_step_size") and params[key] == 0:
        params[key] = 1


def fill_auto(user: dict[str, Any], spec, *, world_size: int, hidden_size: int, total_steps: int) -> dict[str, Any]:
    """Fill HF-style "auto" values of a user config with what HF Trainer gives them, from the spec.

    The keys HF Trainer fills (transformers' HfTrainerDeepSpeedConfig, plus accelerate's DeepSpeedPlugin for
    stage3_gather_16bit_weights_on_model_save; the amp block as transformers 4.x filled it) get HF's values:
    batch sizes, clipping, Adam's lr/betas/eps/weight_decay, the warmup schedulers' warmup_min_lr 0,
    warmup_max_lr = learning rate, warmup_num_steps = max(1, warmup steps), total_num_steps = `total_steps` (the
    run's optimizer steps), fp16/bf16 enabled, ZeRO buckets from the hidden size. Scheduler parameters HF leaves
    "auto" (which DeepSpeed then chokes on) get the value that keeps HF Trainer's schedule: WarmupCosineLR warms
    up from 0 and decays to 0 (warmup_min_ratio, cos_min_ratio 0); OneCycle ramps from 0 to the learning rate over
    the warmup and back down over the remaining steps, betas left alone (cycle_momentum false, momenta = beta1),
    no post-cycle decay. Adam's adam_w_mode "auto" is true (HF's AdamW), torch_adam "auto" is DeepSpeed's default
    (false; CPU ranks get torch's Adam in check()). The optimizer/scheduler `type` and scheduler parameter names
    are checked against what DeepSpeed builds, so a wrong one is one line here, not a traceback later."""
    cfg = copy.deepcopy(user)
    h = hidden_size
    micro = spec.per_device_train_batch_size
    gas = spec.gradient_accumulation_steps
    warmup = max(1, spec.warmup_steps)  # HF: max(1, args.get_warmup_steps(num_training_steps)); see _step_count
    check_optimizer_block(cfg)
    check_scheduler_block(cfg)
    values = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization.reduce_bucket_size": h * h,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h),
        "zero_optimization.stage3_param_persistence_threshold": 10 * h,
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,  # accelerate's default (dsfleet's
        # final/ export gathers the ZeRO-3 shards itself, whatever this says)
        "optimizer.params.lr": spec.learning_rate,
        "optimizer.params.betas": [spec.adam_beta1, spec.adam_beta2],
        "optimizer.params.eps": spec.adam_epsilon,
        "optimizer.params.weight_decay": spec.weight_decay,
        "optimizer.params.adam_w_mode": True,
        "optimizer.params.torch_adam": False,
        # WarmupLR / WarmupDecayLR (HF fills these four), WarmupCosineLR (total, warmup; the ratios are dsfleet's)
        "scheduler.params.warmup_min_lr": 0,
        "scheduler.params.warmup_max_lr": spec.learning_rate,
        "scheduler.params.warmup_num_steps": warmup,
        "scheduler.params.total_num_steps": total_steps,
        "scheduler.params.warmup_min_ratio": 0.0,
        "scheduler.params.cos_min_ratio": 0.0,
        # OneCycle (HF fills none of these): up over the warmup, down over the rest, Adam's betas untouched
        "scheduler.params.cycle_min_lr": 0,
        "scheduler.params.cycle_max_lr": spec.learning_rate,
        "scheduler.params.cycle_first_step_size": warmup,
        "scheduler.params.cycle_second_step_size": max(total_steps - warmup, 0),
        "scheduler.params.cycle_first_stair_count": 0,
        "scheduler.params.cycle_second_stair_count": 0,
        "scheduler.params.decay_lr_rate": 0.0,
        "scheduler.params.decay_step_size": 0,
        "scheduler.params.cycle_momentum": False,
        "scheduler.params.cycle_min_mom": spec.adam_beta1,
        "scheduler.params.cycle_max_mom": spec.adam_beta1,
        "scheduler.params.decay_mom_rate": 0.0,
        "fp16.enabled": spec.fp16,
        "bf16.enabled": spec.bf16,
        "amp.enabled": False,   # apex amp: transformers 4.x filled it true only with --fp16_backend apex
        "amp.opt_level": "O1",  # transformers 4.x: args.fp16_opt_level, default O1
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
    left = [k for k, v in leaves(cfg) if v == "auto"]
    if left:
        fail(f"DeepSpeed config has \"auto\" for {', '.join(left)}, which dsfleet cannot fill — set a value")
    scheduler = cfg.get("scheduler")
    if scheduler and scheduler["type"] in SCHEDULER_PARAMS:
        for key in _STEP_COUNTS:
            _step_count(scheduler["params"], key)
    return cfg


def cpu_rank_optimizer(config: dict[str, Any], *, on_cpu: bool) -> dict[str, Any]:
    """Adam/AdamW on CPU ranks as torch's optimizer (torch_adam), unless ZeRO offloads the optimizer.

    Without offload DeepSpeed builds Adam/AdamW as FusedAdam, which on CPU ranks is a C++ JIT build at every first
    start (compiler and minutes needed); torch.optim.AdamW is the same update and ZeRO supports it. With the
    optimizer offloaded (device cpu/nvme) DeepSpeed uses DeepSpeedCPUAdam, built ahead by docker/install.sh, and
    torch_adam would stop that (DeepSpeed checks torch_adam first, then refuses a non-DeepSpeed optimizer under
    offload). An explicit torch_adam false is overridden on CPU ranks for the same reason. Other optimizer types
    are left as they are (DeepSpeed would hand torch_adam to their constructor)."""
    opt = config.get("optimizer")
    if not on_cpu or not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ADAM_TYPES:
        return config
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    if zero.get("stage", 0) and offload.get("device", "none") in ("cpu", "nvme"):
        return config
    params = opt.get("params")
    opt["params"] = dict(params or {}, torch_adam=True)
    return config


def leaves(node, prefix=""):
    """(dotted.key, value) for every leaf of a nested config."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def check(config: dict[str, Any], *, world_size: int, on_cpu: bool,
          accelerator_fp16: bool) -> tuple[dict[str, Any], str | None]:
    """Batch arithmetic and precision: the config (fp16 turned off on a CPU accelerator without fp16, Adam as
    torch's optimizer on CPU ranks: cpu_rank_optimizer) and the line that says what changed (None: nothing)."""
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
        return cpu_rank_optimizer(dict(config, fp16={"enabled": False}), on_cpu=on_cpu), (
            "fp16 is not supported by DeepSpeed's CPU accelerator on this CPU — this CPU run trains in fp32 "
            "(use --bf16 for reduced precision on CPU)")
    return cpu_rank_optimizer(config, on_cpu=on_cpu), None


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
