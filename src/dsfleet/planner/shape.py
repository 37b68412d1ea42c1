"""The model as the planner sees it: parameter counts and architecture dims, nothing allocated.

Why this exists: every memory and cost formula reads the same few numbers (parameters, DeepSpeed's largest layer,
hidden size, vocabulary, layers, heads, lengths). They come from a preset (dsfleet.presets + dsfleet.models, a
meta-device instance: exact counts), from the config of a model dir or --config_name (any transformers model
type, the same meta-device build; its config kept for the measured activations), or, for a bare `--params`
count, from a GPT-like decoder of that size.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from dsfleet.cli import fail


def parse_count(text: str | int) -> int:
    """'6.9e9', '6.9B', '350M', 1e9 -> a parameter count."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.match(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*$", str(text), re.I)
    if not m:
        fail(f"cannot read parameter count {text!r} — write it like 6.9e9, 6.9B or 350M")
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # t5 | gpt2 | mamba | generic (a --params count: a GPT-like decoder is assumed)
    n_params: int
    largest_layer: int  # DeepSpeed's definition: the module with the most direct parameters
    largest_param: int
    hidden: int
    vocab: int
    layers: int  # decoder layers for LMs, encoder layers for T5
    dec_layers: int = 0
    heads: int = 1
    d_ff: int = 0
    inner: int = 0  # T5 attention width heads*d_kv
    d_state: int = 0
    expand: int = 2
    dt_rank: int = 0
    conv_kernel: int = 4
    tied: bool = True
    dropout: float = 0.0
    seq_len: int = 1024  # default sequence (LM block size or seq2seq source length)
    tgt_len: int = 0  # seq2seq target length
    seq2seq: bool = False  # encoder-decoder (T5, mT5, BART, ...): source and target lengths
    config_json: str = ""  # an architecture without a formula: its config, for the measured activations
    mamba_kernels: bool = False  # Mamba: mamba_ssm's fused CUDA scan runs (its activations), not transformers' loop

    @property
    def measured(self) -> bool:
        """Activations measured (planner/measured.py) rather than counted by a formula (activations.py)."""
        return self.family not in FORMULA_FAMILIES


FORMULA_FAMILIES = ("t5", "gpt2", "mamba", "generic")  # activations.py has a formula for these


@lru_cache(maxsize=None)
def model_shape(preset_name: str) -> ModelShape:
    """Exact counts from dsfleet.models (meta device, nothing allocated) + the preset's architecture dims."""
    from dsfleet.models import build_config, count_parameters
    from dsfleet.presets import get_preset

    preset = get_preset(preset_name)
    return shape_from_config(preset.name, preset.family, build_config(preset), preset.defaults,
                             n_params=count_parameters(preset), seq2seq=preset.family == "t5")


def shape_from_config(name: str, family_name: str, cfg, defaults: dict | None = None,
                      n_params: int | None = None, seq2seq: bool | None = None) -> ModelShape:
    """A ModelShape from any transformers config (a preset's, a model dir's, --config_name's): the counts from a
    meta-device build of the model class the run would train (nothing allocated)."""
    import json

    import torch

    from dsfleet.models import config_kwargs, family

    fam = family(family_name, seq2seq)
    with torch.device("meta"):
        model = fam.model_cls(cfg)
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    largest_param = max(p.numel() for p in model.parameters())
    n_params = n_params or sum(p.numel() for p in model.parameters())
    d = defaults or {}
    common = dict(name=name, family=family_name, n_params=n_params, largest_layer=largest_layer,
                  largest_param=largest_param, vocab=int(cfg.vocab_size),
                  tied=bool(getattr(cfg, "tie_word_embeddings", False)), seq2seq=fam.seq2seq)
    if family_name not in FORMULA_FAMILIES or (family_name == "t5") != fam.seq2seq:
        from dsfleet.planner.measured import layer_keys
        kw = config_kwargs(cfg)
        keys = layer_keys(kw, fam.seq2seq)
        counts = [int(getattr(cfg, k, 0) or kw.get(k) or 0) for k in keys]
        heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "encoder_attention_heads", 0) or 1)
        hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "d_model", 0))
        return ModelShape(**dict(common, family=family_name if family_name not in FORMULA_FAMILIES else
                                 f"{family_name} ({'seq2seq' if fam.seq2seq else 'causal'})"),
                          hidden=hidden, layers=counts[0], dec_layers=counts[1] if len(counts) > 1 else 0,
                          heads=heads, d_ff=int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "d_ff", 0) or 0),
                          seq_len=int(d.get("max_source_length" if fam.seq2seq else "block_size",
                                            128 if fam.seq2seq else 1024)),
                          tgt_len=int(d.get("max_target_length", 128)) if fam.seq2seq else 0,
                          config_json=json.dumps({"model_type": family_name, **kw}, sort_keys=True))
    if family_name == "t5":
        return ModelShape(**common, hidden=cfg.d_model, layers=cfg.num_layers, dec_layers=cfg.num_decoder_layers,
                          heads=cfg.num_heads, d_ff=cfg.d_ff, inner=cfg.num_heads * cfg.d_kv, dropout=cfg.dropout_rate,
                          seq_len=int(d.get("max_source_length", 128)), tgt_len=int(d.get("max_target_length", 128)))
    if family_name == "gpt2":
        return ModelShape(**common, hidden=cfg.n_embd, layers=cfg.n_layer, heads=cfg.n_head,
                          d_ff=cfg.n_inner or 4 * cfg.n_embd, dropout=max(cfg.resid_pdrop, cfg.embd_pdrop),
                          seq_len=int(d.get("block_size", 1024)))
    return ModelShape(**common, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, d_state=cfg.state_size,
                      expand=cfg.expand, dt_rank=int(cfg.time_step_rank), conv_kernel=cfg.conv_kernel,
                      seq_len=int(d.get("block_size", 2048)))


def shape_for_spec(spec_like) -> ModelShape | None:
    """The spec's model: its preset, or the config of its --config_name or --model_name_or_path (any
    transformers model type; seq2seq or causal as the config or --task says)."""
    preset = getattr(spec_like, "preset", None)
    if preset:
        return model_shape(preset)
    path = getattr(spec_like, "config_name", None) or getattr(spec_like, "model_name_or_path", None)
    if not path:
        return None
    from dsfleet.cli import UsageError
    from dsfleet.models import model_config, seq2seq_of
    try:
        cfg = model_config(str(path))
        seq2seq = seq2seq_of(cfg, getattr(spec_like, "task", None))
        name = str(path).rstrip("/").split("/")[-1]
        return shape_for_config(name if name not in ("", "config.json") else cfg.model_type, cfg, seq2seq)
    except UsageError:  # no readable config, or no class for its task: nothing to plan with
        return None


def shape_for_config(name: str, cfg, seq2seq: bool) -> ModelShape:
    return shape_from_config(name, cfg.model_type, cfg, seq2seq=seq2seq)


def generic_shape(n_params: int, seq_len: int | None = None) -> ModelShape:
    """A --params count without an architecture: a GPT-style decoder (h/layers ~ 128, 50k vocab, d_ff 4h,
    fused path), the largest layer its embedding. Stated in the plan's header."""
    vocab = 50257
    hidden = max(64, int(round((n_params * 128 / 12) ** (1 / 3) / 64)) * 64)
    layers = max(1, round((n_params - vocab * hidden) / (12 * hidden * hidden)))
    return ModelShape(name=f"{n_params / 1e9:.2f}B-param decoder", family="generic", n_params=n_params,
                      largest_layer=vocab * hidden, largest_param=vocab * hidden, hidden=hidden, vocab=vocab,
                      layers=layers, heads=max(1, hidden // 128), d_ff=4 * hidden, tied=True, dropout=0.0,
                      seq_len=seq_len or 2048)


def resolve_shape(params, preset, seq_len) -> ModelShape:
    """The model of a `dsfleet plan` request: its --preset, or a GPT-like decoder of --params parameters."""
    if preset:
        return model_shape(preset)
    if params is None:
        fail("no model given — pass --preset NAME or --params N (e.g. 6.9B), or --model_name_or_path DIR / "
             "--config_name DIR|FILE")
    n = parse_count(params)
    if n <= 0:
        fail(f"--params {params} is not a positive parameter count — write it like 6.9e9, 6.9B or 350M")
    return generic_shape(n, seq_len)
