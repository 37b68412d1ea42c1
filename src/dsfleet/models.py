"""Model registry: a preset family name -> how to build its transformers config and model.

Weights come from `from_pretrained(path)` (a local dir, or the hub when reachable) or, only when asked
(`--from_scratch`), from a random init of the preset's config. Never silently one for the other.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class ModelFamily:
    config_cls: Callable[[], Any]
    model_cls: Callable[[], Any]
    seq2seq: bool


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    return ModelFamily(T5Config, T5ForConditionalGeneration, True)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return ModelFamily(GPT2Config, GPT2LMHeadModel, False)


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM
    return ModelFamily(MambaConfig, MambaForCausalLM, False)


MODEL_FAMILIES: dict[str, Callable[[], ModelFamily]] = {"t5": _t5, "gpt2": _gpt2, "mamba": _mamba}


def family(name: str) -> ModelFamily:
    return MODEL_FAMILIES[name]()


def build_config(preset, **overrides):
    """The transformers config of a preset, with overrides (vocab size of a local tokenizer, dropout...)."""
    return family(preset.family).config_cls(**{**preset.config, **overrides})


def count_parameters(preset, **overrides) -> int:
    """Exact parameter count of a preset, from a meta-device model (no memory spent)."""
    fam = family(preset.family)
    with torch.device("meta"):
        model = fam.model_cls(build_config(preset, **overrides))
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def zero3_construction(family_name: str):
    """Around building a model inside deepspeed.zero.Init: transformers' Mamba initialises its mixers by copying
    whole tensors into A_log, D and dt_proj's bias (init_mamba_weights), which zero.Init has already partitioned to
    empty shards ('size of tensor a (0) must match ... (16)', mamba_7b on one H200). Here that method runs on the
    gathered parameters (rank 0's values are kept: every rank starts from the same init); other families unchanged."""
    if family_name != "mamba":
        yield
        return
    import deepspeed
    from transformers.models.mamba import modeling_mamba
    mixer = modeling_mamba.MambaMixer
    upstream = mixer.init_mamba_weights

    def gathered(self):
        params = [self.A_log, self.D, *self.dt_proj.parameters()]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            upstream(self)

    mixer.init_mamba_weights = gathered
    try:
        yield
    finally:
        mixer.init_mamba_weights = upstream


def load_model(preset, model_name_or_path: str | None, from_scratch: bool, config_overrides: dict | None = None,
               gradient_checkpointing: bool = False, attn_implementation: str | None = None):
    fam = family(preset.family)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if from_scratch:
        config = build_config(preset, **(config_overrides or {}))
        model = fam.model_cls._from_config(config, **kwargs) if kwargs else fam.model_cls(config)
    else:
        model = fam.model_cls.from_pretrained(model_name_or_path, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    return model
