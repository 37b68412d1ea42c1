"""The run spec merges preset < YAML < flags and the DeepSpeed config it produces is what DeepSpeed needs."""
import json

import pytest

from dsfleet import dsconfig
from dsfleet.cli import UsageError
from dsfleet.presets import PRESETS, get_preset
from dsfleet.spec import parse_args


def test_precedence_preset_then_yaml_then_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: t5_tiny\nlearning_rate: 0.01\nmax_source_length: 32\nper_device_train_batch_size: 4\n")
    spec = parse_args(["--config", str(cfg), "--per_device_train_batch_size", "2"])
    assert spec.max_target_length == 48          # from the preset
    assert spec.learning_rate == 0.01            # YAML over preset (preset says 3e-3)
    assert spec.max_source_length == 32          # YAML over preset
    assert spec.per_device_train_batch_size == 2  # flag over YAML


def test_hf_flags_verbatim():
    spec = parse_args(["--model_name_or_path", "t5-small", "--fp16", "--do_train", "--dataset_config", "ro-en",
                       "--source_prefix", "translate English to Romanian: ", "--local_rank=3", "--bf16", "false"])
    assert spec.fp16 and not spec.bf16 and spec.do_train
    assert spec.dataset_config_name == "ro-en"


@pytest.mark.parametrize("argv, words", [
    (["--preset", "t5_huge"], "unknown preset 't5_huge'"),
    (["--preset", "t5_tiny", "--fp16", "--bf16"], "choose one"),
    (["--preset", "t5_tiny", "--offload_param", "cpu", "--zero", "2"], "needs ZeRO stage 3"),
    (["--preset", "t5_tiny", "--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
])
def test_bad_spec_is_one_clear_error(argv, words):
    with pytest.raises(UsageError, match=words):
        parse_args(argv)


def test_unknown_yaml_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("preset: t5_tiny\nlearnin_rate: 3\n")
    with pytest.raises(UsageError, match="unknown spec key 'learnin_rate'"):
        parse_args(["--config", str(cfg)])


def test_preset_aliases_and_mamba7b_size():
    from dsfleet.models import count_parameters
    assert get_preset("mamba7b").name == "mamba_7b" and get_preset("t5-3b").name == "t5_3b"
    n = count_parameters(PRESETS["mamba_7b"])
    assert 6.85e9 < n < 6.95e9, n  # the seed's ~6.89B model; dsfleet prints the exact count


@pytest.mark.parametrize("name", ["mamba_1b", "mamba_7b"])
def test_a_from_scratch_mamba_preset_starts_near_the_uniform_loss(name):
    """A from-scratch Mamba at the published/seed widths starts near ln(vocab) on random tokens, as a pretraining
    run expects — transformers' default init (initializer_range 0.1) put mamba_7b at ~30, too far up to fall in
    30 steps on the H200. One layer of the real width, real init, one forward on CPU."""
    import math
    import torch
    from dsfleet.models import build_config, family
    preset = PRESETS[name]
    config = build_config(preset, num_hidden_layers=1)
    torch.manual_seed(0)
    model = family(preset.family).model_cls(config)
    ids = torch.randint(3, config.vocab_size, (1, 64))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.log(config.vocab_size) - 0.5 < loss < math.log(config.vocab_size) + 2.5, loss


def test_generated_config_batch_arithmetic_and_offload():
    spec = parse_args(["--preset", "t5_tiny", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
                       "3", "--zero", "2", "--offload_optimizer", "cpu", "--bf16"])
    cfg = dsconfig.generate(spec, world_size=8, hidden_size=64, zero_stage=2, on_cpu=False)
    assert cfg["train_batch_size"] == 4 * 3 * 8
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cfg["bf16"] == {"enabled": True}
    dsconfig.check(cfg, world_size=8, on_cpu=False, accelerator_fp16=True)


def test_user_config_auto_filled_and_checked():
    spec = parse_args(["--preset", "t5_tiny", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--fp16"])
    user = dsconfig.read_user_config("zero3")
    cfg = dsconfig.fill_auto(user, spec, world_size=2, hidden_size=64, total_steps=100)
    assert cfg["train_batch_size"] == 8 and cfg["optimizer"]["params"]["lr"] == 1e-3
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert cfg["fp16"]["enabled"] is True
    assert "auto" not in json.dumps(cfg)
    cfg["train_batch_size"] = 10
    with pytest.raises(UsageError, match=r"train_batch_size 10 != micro batch 4 x grad accumulation 1 x world size 2"):
        dsconfig.check(cfg, world_size=2, on_cpu=False, accelerator_fp16=True)


@pytest.mark.parametrize("accelerator_fp16", [False, True])
def test_fp16_on_cpu_follows_the_accelerator_and_says_so(accelerator_fp16):
    """Both branches, whatever this machine's CPU: fp32 with a line where the CPU accelerator has no fp16."""
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
           "fp16": {"enabled": True}}
    out, note = dsconfig.check(cfg, world_size=1, on_cpu=True, accelerator_fp16=accelerator_fp16)
    assert out["fp16"]["enabled"] is accelerator_fp16
    assert (note is not None and "trains in fp32" in note) is not accelerator_fp16


def test_unreadable_ds_config(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_batch_size": 8,,}')
    with pytest.raises(UsageError, match="line 1 is not valid JSON"):
        dsconfig.read_user_config(str(bad))
