"""DeepSpeed configs as users copy them from the transformers docs' DeepSpeed page — an optimizer block and a
scheduler block full of "auto" — run unchanged under `--deepspeed FILE`.

What a user would notice, checked for real: every "auto" gets the value HF Trainer gives it (compared with what
the installed transformers' own HfTrainerDeepSpeedConfig writes into the same file), DeepSpeed accepts the result
(its config parser and its scheduler classes, stepped), a wrong optimizer/scheduler type or scheduler parameter is
one line instead of a traceback in deepspeed.initialize, CPU ranks never need a fused-Adam build, and two real
2-rank CPU runs with the docs' files train with the learning rate following the scheduler.

tests/fixtures/hf_docs/ holds the docs' files as printed there: ds_config_zero2.json is the ZeRO-2 example
(WarmupLR); ds_config_zero3.json is the ZeRO-3 example with the page's WarmupDecayLR scheduler block (the one
the page says matches HF's default linear schedule) in place of its WarmupLR block.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import types
from pathlib import Path

import pytest

from dsfleet import dsconfig
from dsfleet.cli import UsageError
from dsfleet.spec import parse_args
from tests.launch import cpu_env, deepspeed_train, explain, losses, metrics

FIXTURES = Path(__file__).parent / "fixtures" / "hf_docs"
DOC_ZERO2 = FIXTURES / "ds_config_zero2.json"
DOC_ZERO3 = FIXTURES / "ds_config_zero3.json"
HIDDEN, WORLD, TOTAL = 64, 2, 30
HF_FLAGS = ["--preset", "gpt2_tiny", "--from_scratch", "--learning_rate", "1e-3", "--weight_decay", "0.01",
            "--adam_beta1", "0.8", "--adam_beta2", "0.99", "--adam_epsilon", "1e-7", "--max_grad_norm", "0.5",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]


def doc(path: Path) -> dict:
    return json.loads(path.read_text())


def spec_of(*extra: str):
    return parse_args([*HF_FLAGS, *extra])


def ours(user: dict, spec, *, world: int = WORLD, on_cpu: bool = False) -> dict:
    cfg = dsconfig.fill_auto(user, spec, world_size=world, hidden_size=HIDDEN, total_steps=TOTAL)
    return dsconfig.check(cfg, world_size=world, on_cpu=on_cpu, accelerator_fp16=True)[0]


def hf_trainer_fill(user: dict, spec, *, world: int = WORLD) -> dict:
    """The config HF Trainer hands DeepSpeed for these flags: transformers' HfTrainerDeepSpeedConfig, both stages
    (trainer_config_process at TrainingArguments time, trainer_config_finalize once model and step count are known)."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(user))
    warmup_of = TrainingArguments(output_dir="unused", warmup_steps=spec.warmup_steps, report_to=[]).get_warmup_steps
    args = types.SimpleNamespace(
        world_size=world, per_device_train_batch_size=spec.per_device_train_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, max_grad_norm=spec.max_grad_norm,
        learning_rate=spec.learning_rate, adam_beta1=spec.adam_beta1, adam_beta2=spec.adam_beta2,
        adam_epsilon=spec.adam_epsilon, weight_decay=spec.weight_decay, save_on_each_node=False, fp16=spec.fp16,
        fp16_full_eval=False, bf16=spec.bf16, bf16_full_eval=False, get_warmup_steps=warmup_of)
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=HIDDEN)), TOTAL)
    return hf.config


leaves = dsconfig.leaves


def with_scheduler(user: dict, type_: str, params: dict) -> dict:
    return dict(copy.deepcopy(user), scheduler={"type": type_, "params": params})


WARMUP_DECAY = {"total_num_steps": "auto", "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}
COSINE = {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_min_ratio": "auto", "cos_min_ratio": "auto"}
ONE_CYCLE = {"cycle_min_lr": "auto", "cycle_max_lr": "auto", "cycle_first_step_size": "auto",
             "cycle_second_step_size": "auto", "cycle_momentum": "auto", "cycle_min_mom": "auto",
             "cycle_max_mom": "auto", "decay_lr_rate": "auto", "decay_step_size": "auto"}


# ---- every "auto" HF Trainer fills gets HF Trainer's value ------------------------------------------------------
@pytest.mark.parametrize("path", [DOC_ZERO2, DOC_ZERO3], ids=["docs_zero2", "docs_zero3"])
@pytest.mark.parametrize("extra", [["--warmup_steps", "7"], ["--bf16"], ["--fp16", "--warmup_steps", "3"]],
                         ids=["fp32_warmup7", "bf16_no_warmup", "fp16_warmup3"])
def test_docs_configs_filled_as_hf_trainer_fills_them(path, extra):
    spec = spec_of(*extra)
    user = doc(path)
    mine, theirs = ours(user, spec), hf_trainer_fill(user, spec)
    filled_by_hf = {k: v for k, v in leaves(theirs) if v != "auto"}
    mine_flat = dict(leaves(mine))
    differ = {k: (mine_flat.get(k), v) for k, v in filled_by_hf.items() if mine_flat.get(k) != v}
    assert not differ, differ  # (dsfleet, HF Trainer)
    assert "auto" not in json.dumps(mine)
    # the same values written out, so a change in transformers cannot move both sides at once unnoticed
    opt = mine["optimizer"]["params"]
    assert opt == {"lr": 1e-3, "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.01}
    assert (mine["train_micro_batch_size_per_gpu"], mine["gradient_accumulation_steps"], mine["train_batch_size"],
            mine["gradient_clipping"]) == (4, 2, 4 * 2 * WORLD, 0.5)
    sched = mine["scheduler"]["params"]
    assert sched["warmup_min_lr"] == 0 and sched["warmup_max_lr"] == 1e-3
    assert sched["warmup_num_steps"] == max(1, spec.warmup_steps)  # no warmup -> 1 step, as HF writes it
    assert mine["fp16"]["enabled"] is spec.fp16 and mine["bf16"]["enabled"] is spec.bf16
    zero = mine["zero_optimization"]
    if zero["stage"] == 3:
        assert sched["total_num_steps"] == TOTAL
        assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
                zero["stage3_param_persistence_threshold"]) == (HIDDEN ** 2, int(0.9 * HIDDEN ** 2), 10 * HIDDEN)
    else:
        assert zero["reduce_bucket_size"] == 2e8  # the file's own value stays


@pytest.mark.parametrize("type_, params", [("WarmupDecayLR", WARMUP_DECAY), ("WarmupCosineLR", COSINE)])
def test_other_scheduler_shapes_match_hf_where_hf_fills(type_, params):
    spec = spec_of("--warmup_steps", "5")
    user = with_scheduler(doc(DOC_ZERO2), type_, params)
    mine, theirs = ours(user, spec), hf_trainer_fill(user, spec)
    for key, value in leaves(theirs):
        if value != "auto":
            assert dict(leaves(mine))[key] == value, key
    got = mine["scheduler"]["params"]
    assert got["total_num_steps"] == TOTAL and got["warmup_num_steps"] == 5
    if type_ == "WarmupCosineLR":  # HF leaves these "auto" (DeepSpeed then fails); HF's cosine goes 0 -> lr -> 0
        assert (got["warmup_min_ratio"], got["cos_min_ratio"]) == (0.0, 0.0)


def test_one_cycle_auto_is_hf_linear_shape_and_keeps_adam_betas():
    got = ours(with_scheduler(doc(DOC_ZERO2), "OneCycle", ONE_CYCLE), spec_of("--warmup_steps", "5"))
    assert got["scheduler"]["params"] == {
        "cycle_min_lr": 0, "cycle_max_lr": 1e-3, "cycle_first_step_size": 5, "cycle_second_step_size": TOTAL - 5,
        "cycle_momentum": False, "cycle_min_mom": 0.8, "cycle_max_mom": 0.8, "decay_lr_rate": 0.0,
        "decay_step_size": 0}


def test_amp_block_and_adam_modes_and_zero3_save_flag():
    user = doc(DOC_ZERO3)
    user["amp"] = {"enabled": "auto", "opt_level": "auto"}  # the docs' apex block; transformers 4.x filled it
    user["optimizer"]["params"].update(torch_adam="auto", adam_w_mode="auto")
    user["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = "auto"  # accelerate fills it
    got = ours(user, spec_of())
    assert got["amp"] == {"enabled": False, "opt_level": "O1"}
    assert got["optimizer"]["params"]["adam_w_mode"] is True and got["optimizer"]["params"]["torch_adam"] is False
    assert got["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False


def test_fp16_auto_cast_auto_is_not_guessed():
    """HF fills no fp16.auto_cast; dsfleet neither: one line asking for a value."""
    user = doc(DOC_ZERO2)
    user["fp16"]["auto_cast"] = "auto"
    with pytest.raises(UsageError, match=r'"auto" for fp16\.auto_cast'):
        ours(user, spec_of())


# ---- DeepSpeed accepts what dsfleet writes, and its schedulers run the schedule --------------------------------
def deepspeed_lrs(cfg: dict, steps: int) -> tuple[list[float], tuple]:
    """DeepSpeed's scheduler class for the config, built as deepspeed.initialize builds it (`Type(optimizer,
    **params)` over the optimizer at optimizer.params.lr), stepped once per optimizer step: the lr of each step
    and the Adam betas at the end."""
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DeepSpeedConfig
    DeepSpeedConfig(cfg)  # DeepSpeed's own parser takes the whole file
    opt_params = cfg["optimizer"]["params"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=opt_params["lr"],
                                  betas=tuple(opt_params["betas"]))
    scheduler = getattr(lr_schedules, cfg["scheduler"]["type"])(optimizer, **cfg["scheduler"]["params"])
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return lrs, optimizer.param_groups[0]["betas"]


@pytest.mark.parametrize("warmup", [0, 6])
@pytest.mark.parametrize("type_, params", [("WarmupLR", {k: "auto" for k in ("warmup_min_lr", "warmup_max_lr",
                                                                            "warmup_num_steps")}),
                                           ("WarmupDecayLR", WARMUP_DECAY), ("WarmupCosineLR", COSINE),
                                           ("OneCycle", ONE_CYCLE)])
def test_deepspeed_takes_the_filled_scheduler_and_runs_its_schedule(type_, params, warmup):
    peak = 1e-3
    cfg = ours(with_scheduler(doc(DOC_ZERO2), type_, params), spec_of("--warmup_steps", str(warmup)), world=1)
    lrs, betas = deepspeed_lrs(cfg, TOTAL + 1)
    assert max(lrs) == pytest.approx(peak), lrs
    assert lrs[0] < peak / 2  # every DeepSpeed schedule starts its first step from the bottom
    top = next(i for i, lr in enumerate(lrs) if lr == pytest.approx(peak))  # the step that first runs at the peak
    assert top <= max(warmup, 2), (top, lrs)  # after the warmup; with none, by DeepSpeed's floor of 2 steps
    if type_ == "WarmupLR":
        assert lrs[top:] == pytest.approx([peak] * (len(lrs) - top))
    else:  # decays to ~0 at the planned end, never rising again
        assert all(b <= a + 1e-12 for a, b in zip(lrs[top:], lrs[top + 1:])), lrs
        assert lrs[TOTAL] < 0.05 * peak, lrs
    assert tuple(betas) == (0.8, 0.99)  # OneCycle with cycle_momentum auto leaves Adam's betas alone


def test_explicit_step_counts_are_what_deepspeed_accepts():
    user = with_scheduler(doc(DOC_ZERO2), "WarmupDecayLR", {"warmup_num_steps": 0, "total_num_steps": 1e3})
    got = ours(user, spec_of())["scheduler"]["params"]
    assert got["warmup_num_steps"] == 1 and got["total_num_steps"] == 1000 and isinstance(got["total_num_steps"], int)
    deepspeed_lrs(ours(user, spec_of(), world=1), 3)
    for bad in (-5, 2.5):
        user["scheduler"]["params"]["warmup_num_steps"] = bad
        with pytest.raises(UsageError, match=rf"scheduler\.params\.warmup_num_steps is {bad}"):
            ours(user, spec_of())


# ---- wrong types and parameters: one line --------------------------------------------------------------------
def test_unknown_optimizer_and_scheduler_types_name_the_supported_ones():
    user = doc(DOC_ZERO2)
    user["optimizer"]["type"] = "AdamW8bit"
    with pytest.raises(UsageError, match=r"optimizer\.type 'AdamW8bit' is not an optimizer DeepSpeed can build — "
                                         r"use one of Adam, AdamW, .* or a torch\.optim class name"):
        ours(user, spec_of())
    user = with_scheduler(doc(DOC_ZERO2), "CosineWithRestarts", {})
    with pytest.raises(UsageError, match=r"scheduler\.type 'CosineWithRestarts' is not a scheduler DeepSpeed knows "
                                         r"— use one of WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest"):
        ours(user, spec_of())
    # what DeepSpeed does build: its names in any case, torch.optim and torch.optim.lr_scheduler classes
    user = with_scheduler(doc(DOC_ZERO2), "StepLR", {"step_size": 10})
    user["optimizer"] = {"type": "SGD", "params": {"lr": "auto"}}
    assert ours(user, spec_of())["optimizer"]["params"] == {"lr": 1e-3}
    user["optimizer"]["type"] = "adamw"
    ours(user, spec_of())


def test_scheduler_parameters_deepspeed_would_reject_are_one_line():
    # WarmupDecayLR's block with the type switched to cosine: WarmupCosineLR peaks at optimizer.params.lr
    user = with_scheduler(doc(DOC_ZERO2), "WarmupCosineLR", WARMUP_DECAY)
    with pytest.raises(UsageError, match=r"scheduler WarmupCosineLR has no parameter warmup_min_lr, warmup_max_lr "
                                         r"— WarmupCosineLR takes total_num_steps, warmup_min_ratio"):
        ours(user, spec_of())
    user = with_scheduler(doc(DOC_ZERO2), "WarmupDecayLR", {"warmup_num_steps": "auto"})
    with pytest.raises(UsageError, match=r"scheduler WarmupDecayLR needs params\.total_num_steps"):
        ours(user, spec_of())
    user = doc(DOC_ZERO2)
    del user["scheduler"]["params"]  # DeepSpeed would unpack None; dsfleet gives it an empty block
    assert ours(user, spec_of())["scheduler"]["params"] == {}


def test_scheduler_table_is_the_installed_deepspeeds():
    from deepspeed.runtime import config as ds_config, lr_schedules
    for name, (accepted, required) in dsconfig.SCHEDULER_PARAMS.items():
        params = list(inspect.signature(getattr(lr_schedules, name)).parameters.values())[1:]  # after optimizer
        assert tuple(p.name for p in params) == accepted, name
        assert tuple(p.name for p in params if p.default is inspect.Parameter.empty) == required, name
    assert set(lr_schedules.VALID_LR_SCHEDULES) == set(dsconfig.SCHEDULER_PARAMS)
    assert {n.lower() for n in dsconfig.DEEPSPEED_OPTIMIZERS} == set(ds_config.DEEPSPEED_OPTIMIZERS)


# ---- CPU ranks: Adam without a fused-Adam build ---------------------------------------------------------------
@pytest.mark.parametrize("zero, on_cpu, torch_adam", [
    ({"stage": 2}, True, True),                                          # FusedAdam would be a JIT build
    ({"stage": 2, "offload_optimizer": {"device": "none"}}, True, True),  # "none" is no offload
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}}, True, None),   # DeepSpeedCPUAdam, prebuilt
    ({"stage": 2}, False, None),                                          # GPU: DeepSpeed's fused Adam
])
def test_cpu_ranks_get_torch_adam_unless_offloaded(zero, on_cpu, torch_adam):
    user = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": False}}, "zero_optimization": zero}
    got = ours(user, spec_of(), on_cpu=on_cpu)["optimizer"]["params"]
    assert got.get("torch_adam") is (torch_adam if torch_adam is not None else False)
    sgd = ours({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": zero}, spec_of(),
               on_cpu=on_cpu)
    assert "torch_adam" not in sgd["optimizer"]["params"]  # DeepSpeed would pass it to torch.optim.SGD


# ---- real runs: the docs' files on two CPU ranks --------------------------------------------------------------
RUN = ["--from_scratch", "--dataset_name", "embedded", "--do_train", "--per_device_train_batch_size", "8",
       "--logging_steps", "1", "--learning_rate", "3e-3", "--max_steps", str(TOTAL)]


def lr_and_loss(out: Path) -> tuple[list[float], list[float]]:
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
    return [r["lr"] for r in rows], [losses(out)[s] for s in range(1, TOTAL + 1)]


@pytest.mark.slow
def test_docs_zero3_file_trains_unchanged_with_warmup_decay(tmp_path):
    """The docs' ZeRO-3 file (optimizer and parameters offloaded, WarmupDecayLR all "auto") with HF's default of
    no warmup: DeepSpeed would reject warmup_num_steps 0; the run warms up one step and decays to ~0."""
    out = tmp_path / "z3"
    proc = deepspeed_train(["--preset", "t5_tiny", *RUN, "--deepspeed", str(DOC_ZERO3), "--output_dir", str(out)])
    assert proc.returncode == 0, explain(proc)
    assert "ZeRO-3" in proc.stdout and "2 rank(s)" in proc.stdout
    used = json.loads((out / "ds_config.json").read_text())
    assert used["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "total_num_steps": TOTAL, "warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 1}}
    lr, loss = lr_and_loss(out)
    # metrics log the lr after each step's scheduler step: DeepSpeed's WarmupDecayLR at iteration step-1, with
    # its 2-step warmup floor: 0, the peak, then linear to 0 at the planned total
    assert lr[0] == 0 and lr[1] == pytest.approx(3e-3)
    assert lr[2:] == pytest.approx([3e-3 * (TOTAL - (s - 1)) / (TOTAL - 2) for s in range(3, TOTAL + 1)])
    assert lr[-1] < 0.05 * 3e-3
    assert sum(loss[-5:]) < 0.5 * sum(loss[:5]), loss


@pytest.mark.slow
def test_docs_zero2_file_warms_up_and_runs_torch_adam_on_cpu_ranks(tmp_path):
    """The docs' ZeRO-2 file with offload off (the docs' advice when memory suffices): Adam runs as torch's
    optimizer on CPU ranks (no fused-Adam build), WarmupLR ramps over --warmup_steps then holds the peak."""
    warmup = 8
    user = doc(DOC_ZERO2)
    user["zero_optimization"]["offload_optimizer"] = {"device": "none"}
    path = tmp_path / "ds_zero2.json"
    path.write_text(json.dumps(user, indent=4))
    out, extensions = tmp_path / "z2", tmp_path / "torch_extensions"
    proc = deepspeed_train(["--preset", "gpt2_tiny", *RUN, "--warmup_steps", str(warmup), "--deepspeed", str(path),
                            "--output_dir", str(out)], env=cpu_env(TORCH_EXTENSIONS_DIR=str(extensions)))
    assert proc.returncode == 0, explain(proc)
    # nothing JIT-built: DeepSpeed's FusedAdam on CPU ranks would compile fused_adam here (4 min on 2 cores)
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))
    used = json.loads((out / "ds_config.json").read_text())
    assert used["optimizer"]["params"]["torch_adam"] is True
    lr, loss = lr_and_loss(out)
    # WarmupLR's default log ramp at iteration step-1: peak * ln(step) / ln(warmup), then the peak
    assert lr == pytest.approx([3e-3 * math.log(s) / math.log(warmup) if s < warmup else 3e-3
                                for s in range(1, TOTAL + 1)])
    assert sum(loss[-5:]) < 0.6 * sum(loss[:5]), loss
