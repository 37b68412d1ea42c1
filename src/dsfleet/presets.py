"""Model presets by name: published architecture dims plus the run defaults that suit each size.

A preset is data, not code: the model registry (models.py) turns `family` + `config` into a
transformers config and model. Weights never come from here: `--model_name_or_path` loads them,
`--from_scratch` asks for a random init from these dims.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "t5" | "gpt2" | "mamba" — key into models.MODEL_FAMILIES
    config: dict[str, Any]  # kwargs of the transformers config class
    hub_id: str | None = None  # the published checkpoint these dims come from
    defaults: dict[str, Any] = field(default_factory=dict)  # RunSpec defaults for this size
    cpu_sized: bool = False  # small enough for CPU tests; its vocab follows the local tokenizer


_T5_COMMON = {"feed_forward_proj": "relu", "relative_attention_num_buckets": 32, "dropout_rate": 0.1,
              "tie_word_embeddings": False, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
_T5_TRANSLATION = {"task": "translation", "source_lang": "en", "target_lang": "ro",
                   "source_prefix": "translate English to Romanian: ",
                   "max_source_length": 128, "max_target_length": 128}


def _t5(name: str, d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, hub: str | None, **defaults) -> Preset:
    cfg = dict(_T5_COMMON, vocab_size=32128, d_model=d_model, d_ff=d_ff, num_layers=layers,
               num_decoder_layers=layers, num_heads=heads, d_kv=d_kv)
    if hub in ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b"):
        cfg["tie_word_embeddings"] = True  # original T5 ties input and output embeddings
    return Preset(name, "t5", cfg, hub, dict(_T5_TRANSLATION, **defaults))


def _gpt2(name: str, n_embd: int, layers: int, heads: int, hub: str | None, **defaults) -> Preset:
    cfg = {"vocab_size": 50257, "n_positions": 1024, "n_embd": n_embd, "n_layer": layers, "n_head": heads,
           "bos_token_id": 50256, "eos_token_id": 50256}
    return Preset(name, "gpt2", cfg, hub, dict({"task": "causal_lm", "block_size": 1024}, **defaults))


def _mamba(name: str, d_model: int, layers: int, vocab: int, hub: str | None, **defaults) -> Preset:
    # initializer_range 0.02: the reference implementation's pretraining init (mamba_ssm's embedding std), not
    # transformers' MambaConfig default 0.1, whose tied logits have std ~0.1*sqrt(d_model): a from-scratch mamba_7b
    # started at loss ~30 (7 logits of std) and did not fall in 32 steps on the H200. A model dir keeps its own.
    cfg = {"vocab_size": vocab, "hidden_size": d_model, "num_hidden_layers": layers, "state_size": 16,
           "conv_kernel": 4, "expand": 2, "tie_word_embeddings": True, "residual_in_fp32": True,
           "initializer_range": 0.02}
    return Preset(name, "mamba", cfg, hub, dict({"task": "causal_lm", "block_size": 2048}, **defaults))


_ALL = [
    # T5 (Raffel et al. 2020, Table 14 dims; the t5-* checkpoints)
    _t5("t5_small", 512, 2048, 6, 8, 64, "t5-small"),
    _t5("t5_large", 1024, 4096, 24, 16, 64, "t5-large"),
    _t5("t5_3b", 1024, 16384, 24, 32, 128, "t5-3b"),
    _t5("t5_11b", 1024, 65536, 24, 128, 128, "t5-11b"),
    # GPT-2 (Radford et al. 2019; the gpt2* checkpoints)
    _gpt2("gpt2", 768, 12, 12, "gpt2"),
    _gpt2("gpt2_medium", 1024, 24, 16, "gpt2-medium"),
    _gpt2("gpt2_large", 1280, 36, 20, "gpt2-large"),
    _gpt2("gpt2_xl", 1600, 48, 25, "gpt2-xl"),
    # Mamba (Gu & Dao 2023): 1b/3b are the published mamba-1.4b / mamba-2.8b dims; 7b is the seed's model
    _mamba("mamba_1b", 2048, 48, 50280, "state-spaces/mamba-1.4b-hf"),
    _mamba("mamba_3b", 2560, 64, 50280, "state-spaces/mamba-2.8b-hf"),
    _mamba("mamba_7b", 4864, 45, 50257, None, block_size=4096),
]

# CPU-sized presets for tests and the demo: same code paths, minutes on 2 cores.
_TINY = [
    Preset("t5_tiny", "t5", dict(_T5_COMMON, vocab_size=512, d_model=64, d_ff=256, num_layers=2, num_decoder_layers=2,
                                 num_heads=4, d_kv=16, dropout_rate=0.0),
           None, dict(_T5_TRANSLATION, max_source_length=48, max_target_length=48, learning_rate=3e-3),
           cpu_sized=True),
    Preset("gpt2_tiny", "gpt2", {"vocab_size": 512, "n_positions": 256, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                 "bos_token_id": 0, "eos_token_id": 0},
           None, {"task": "causal_lm", "block_size": 64, "learning_rate": 3e-3}, cpu_sized=True),
    Preset("mamba_tiny", "mamba", {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 8,
                                   "conv_kernel": 4, "expand": 2, "tie_word_embeddings": True},
           None, {"task": "causal_lm", "block_size": 64, "learning_rate": 3e-3}, cpu_sized=True),
]


def _key(name: str) -> str:
    """Preset names compare without case, '-' and '_'."""
    return name.replace("-", "").replace("_", "").lower()


PRESETS: dict[str, Preset] = {p.name: p for p in _ALL + _TINY}
# Seed 004's train_deepspeed.py names its Mamba sizes size-first (`--preset 7b_mamba`); its commands run unchanged.
SEED_NAMES = {"7b_mamba": "mamba_7b", "3b_mamba": "mamba_3b", "1b_mamba": "mamba_1b"}
# "mamba7b", "t5-3b", "gpt2_xl" all name a preset: file names in slurm/ and k8s/ drop the underscore.
_ALIASES = {_key(n): n for n in PRESETS} | {_key(a): n for a, n in SEED_NAMES.items()}


def get_preset(name: str) -> Preset:
    key = _ALIASES.get(_key(name))
    if key is None:
        from dsfleet.cli import fail
        fail(f"unknown preset {name!r} — use one of: {', '.join(PRESETS)}")
    return PRESETS[key]
