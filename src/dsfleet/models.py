"""Model registry: which transformers classes build a run's model, for a preset family or any model dir.

The architecture comes from what the run names: a preset (t5, gpt2, mamba families: published dims), else
`--config_name DIR|config.json`, else the config.json of `--model_name_or_path`. Any transformers model type
works: its config class from AutoConfig's registry, its model class from the causal-LM or seq2seq auto mapping
(the task from the config's `architectures` / `is_encoder_decoder`, or `--task`). Weights come from
`from_pretrained(path)` (a local dir, or the hub when reachable) or, only when asked (`--from_scratch`), from a
random init of the config. Never silently one for the other: a preset whose family is not the model dir's
model_type is one line, not a checkpoint loaded into the wrong class.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dsfleet.cli import fail


@dataclass(frozen=True)
class ModelFamily:
    config_cls: Callable[..., Any]
    model_cls: Any
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


MODEL_FAMILIES: dict[str, Callable[[], ModelFamily]] = {"t5": _t5, "gpt2": _gpt2, "mamba": _mamba}  # the presets'
_CONFIG_META_KEYS = ("model_type", "transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype",
                     "_attn_implementation_autoset")


def config_class(model_type: str):
    from transformers import CONFIG_MAPPING
    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        fail(f"model type {model_type!r} is not known to this transformers version — upgrade transformers, or pass a "
             "model dir of a known architecture")


def seq2seq_of(cfg, task: str | None = None) -> bool:
    """Whether a config trains as a seq2seq model: --task wins (translation = seq2seq), else the config's
    `architectures` (…ForConditionalGeneration / …ForCausalLM), else `is_encoder_decoder`."""
    if task is not None:
        return task == "translation"
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    for arch in getattr(cfg, "architectures", None) or []:
        if arch in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values():
            return True
        if arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return False
    return bool(getattr(cfg, "is_encoder_decoder", False))


def model_class(model_type: str, seq2seq: bool):
    """The concrete transformers class of a model type: the seq2seq or causal-LM auto mapping's entry."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    cfg_cls = config_class(model_type)
    mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if seq2seq else MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[cfg_cls]
    except KeyError:
        other_mapping = MODEL_FOR_CAUSAL_LM_MAPPING if seq2seq else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
        if cfg_cls not in other_mapping:
            fail(f"model type {model_type!r} is no language model: transformers has no causal-LM or seq2seq class for "
                 "it — pass a model dir of a causal LM (Llama, Qwen2, GPT-2, ...) or a seq2seq model (T5, BART, ...)")
        other = "causal_lm" if seq2seq else "translation"
        fail(f"model type {model_type!r} has no {'seq2seq' if seq2seq else 'causal-LM'} class in transformers — "
             f"pass --task {other}, or a model dir of another architecture")


def family(name: str, seq2seq: bool | None = None) -> ModelFamily:
    """The classes of a preset family, or of any transformers model type (seq2seq: which auto mapping)."""
    if name in MODEL_FAMILIES and seq2seq in (None, MODEL_FAMILIES[name]().seq2seq):
        return MODEL_FAMILIES[name]()
    if seq2seq is None:
        seq2seq = bool(getattr(config_class(name)(), "is_encoder_decoder", False))
    return ModelFamily(config_class(name), model_class(name, seq2seq), seq2seq)


def config_kwargs(cfg) -> dict[str, Any]:
    """A transformers config as the kwargs of its class (what a Preset's `config` holds)."""
    d = cfg.to_diff_dict()
    return {k: v for k, v in d.items() if k not in _CONFIG_META_KEYS}


def build_config(preset, seq2seq: bool | None = None, **overrides):
    """The transformers config of a preset (or of a model dir's config), with overrides (vocab size of a local
    tokenizer, dropout...)."""
    return family(preset.family, seq2seq).config_cls(**{**preset.config, **overrides})


def count_parameters(preset, seq2seq: bool | None = None, **overrides) -> int:
    """Exact parameter count of a preset, from a meta-device model (no memory spent)."""
    fam = family(preset.family, seq2seq)
    with torch.device("meta"):
        model = fam.model_cls(build_config(preset, seq2seq, **overrides))
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def mamba_zero3_init(family_name: str, accel):
    """Around building a Mamba from scratch under ZeRO-3; yields `finish(model)`, to call once it is built.
    transformers runs each module's weight init on that module's gathered parameters, but until some release (5.17,
    the GPU image's, does not; 5.24 does) not on its children's: MambaMixer's init writes dt_proj, conv1d and
    out_proj, there still empty shards ('size of tensor a (0) must match ... (9728)': mamba_7b on one H200). Here a
    mixer whose weights are still partitioned defers its init, and `finish` initialises every mixer on all of its
    parameters gathered (rank 0's values kept) — on every rank, as gathering is collective: rank 0, the only one
    that runs transformers' init, says whether it deferred."""
    if family_name != "mamba":
        yield lambda model: None
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers.models.mamba.modeling_mamba import MambaMixer
    upstream = MambaMixer.init_mamba_weights
    deferred = []

    def init_or_defer(self):
        params = [*self.parameters(recurse=False), *self.dt_proj.parameters()]
        if any(getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE for p in params):
            deferred.append(self)
            return
        upstream(self)

    def finish(model):
        import torch.distributed as dist
        flag = torch.tensor([len(deferred)], device=accel.current_device_name())
        if dist.is_initialized():
            dist.broadcast(flag, 0)
        if not flag.item():
            return
        from dsfleet.runtime import global_rank
        rank = global_rank()
        for mixer in (m for m in model.modules() if isinstance(m, MambaMixer)):
            with deepspeed.zero.GatheredParameters(list(mixer.parameters()), modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        model._init_weights(mixer)

    MambaMixer.init_mamba_weights = init_or_defer
    try:
        yield finish
    finally:
        MambaMixer.init_mamba_weights = upstream


def load_model(preset, model_name_or_path: str | None, from_scratch: bool, config_overrides: dict | None = None,
               gradient_checkpointing: bool = False, attn_implementation: str | None = None,
               seq2seq: bool | None = None, config=None):
    """A preset's (or model dir's) model: from_pretrained(model_name_or_path) — with `config` when one was named
    apart from the weights (--config_name) — or, with from_scratch, a random init of its config + overrides."""
    fam = family(preset.family, seq2seq)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if from_scratch:
        config = build_config(preset, seq2seq, **(config_overrides or {}))
        model = fam.model_cls._from_config(config, **kwargs)  # (not the constructor: it knows ZeRO-3's init)
    else:
        if config is not None:
            kwargs["config"] = config
        model = fam.model_cls.from_pretrained(model_name_or_path, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    return model


@dataclass(frozen=True)
class ModelSource:
    """Which architecture a run trains (a preset, or a model dir's / --config_name's config) — weights come from
    the spec. `family` is the transformers model_type (t5, gpt2, mamba, llama, bart, ...)."""
    preset: Any  # presets.Preset: family + transformers config kwargs
    family: str
    name: str
    seq2seq: bool = False
    from_config: str | None = field(default=None)  # the dir or config.json the architecture was read from

    @property
    def model_cls(self):
        return family(self.family, self.seq2seq).model_cls

    def config(self, **overrides):
        return build_config(self.preset, self.seq2seq, **overrides)

    @property
    def hidden_size(self) -> int:
        for key in ("d_model", "n_embd", "hidden_size"):
            if key in self.preset.config:
                return int(self.preset.config[key])
        return int(getattr(self.config(), "hidden_size", 1024) or 1024)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position embeddings take (None: relative positions, or a scan)."""
        for key in ("n_positions", "max_position_embeddings"):
            if self.preset.config.get(key):
                return int(self.preset.config[key])
        return None


def resolve_source(spec) -> ModelSource:
    """Which architecture (preset, --config_name, or a model dir's config) and where its weights come from —
    never silently. Also sets the spec's task from the architecture when the spec names none."""
    from dsfleet.presets import Preset, get_preset
    preset = get_preset(spec.preset) if spec.preset else None
    config_name = getattr(spec, "config_name", None)
    if spec.synthetic_data and not spec.from_scratch and not spec.model_name_or_path:
        spec.from_scratch = True  # random tokens need no trained weights; said in the start line
    if not spec.from_scratch and not spec.model_name_or_path and not spec.dry_run:  # a dry run loads no weights
        what = preset.name if preset else config_name or "the preset"
        fail(f"no weights given — pass --model_name_or_path DIR (a local dir or hub id) or --from_scratch for a "
             f"random init of {what}")
    if preset is not None:
        if config_name:
            fail(f"--preset {preset.name} and --config_name {config_name} both name the architecture — pass one")
        dir_cfg = _dir_config(spec) if spec.model_name_or_path else None
        if dir_cfg is not None:
            check_preset_family(preset, dir_cfg, spec.model_name_or_path)
        seq2seq = family(preset.family).seq2seq
        source = ModelSource(preset, preset.family, preset.name, seq2seq)
    else:
        where = config_name or spec.model_name_or_path
        if not where:
            fail("--from_scratch without an architecture — pass --preset NAME (e.g. t5_small), --config_name "
                 "DIR|config.json, or --model_name_or_path DIR whose config.json gives it")
        cfg = model_config(where, flag="--config_name" if config_name else "--model_name_or_path")
        if config_name and spec.model_name_or_path and not spec.from_scratch:
            weights = model_config(spec.model_name_or_path)
            if weights.model_type != cfg.model_type:
                fail(f"--config_name {config_name} is a {cfg.model_type!r} model but {spec.model_name_or_path} holds "
                     f"{weights.model_type!r} weights — pass matching ones, or --from_scratch")
        seq2seq = seq2seq_of(cfg, spec.task)
        family(cfg.model_type, seq2seq)  # a model type without a class for this task: one line now
        name = Path(str(where).rstrip("/")).name
        name = cfg.model_type if name in ("", "config.json") else name
        source = ModelSource(Preset(name, cfg.model_type, config_kwargs(cfg)), cfg.model_type, name, seq2seq,
                             str(where))
    if spec.task is None:
        spec.task = "translation" if source.seq2seq else "causal_lm"
    return source


def _dir_config(spec):
    """The local model dir's config next to a --preset, or None when it is not a local dir with a config (a hub id
    is checked by check_weights when a run is about to train; render and show-config do not reach the hub)."""
    path = Path(spec.model_name_or_path).expanduser()
    if not (path / "config.json").is_file():
        return None
    return model_config(spec.model_name_or_path)


def check_preset_family(preset, cfg, where: str) -> None:
    """A preset names a family; weights of another model type would load into the wrong class (every weight
    dropped, a random model trained): one line instead."""
    if cfg.model_type != preset.family:
        fail(f"--preset {preset.name} is a {preset.family} model but {where} holds a {cfg.model_type!r} model — drop "
             f"--preset (the dir's config says the architecture), or pass a {preset.family} model dir")


def check_weights(spec) -> None:
    """A run about to train: the weights' dir must be readable now — they load after the run dir exists — and of
    the preset's family."""
    if spec.model_name_or_path and not spec.from_scratch:
        cfg = model_config(spec.model_name_or_path)
        if spec.preset:
            from dsfleet.presets import get_preset
            check_preset_family(get_preset(spec.preset), cfg, spec.model_name_or_path)


def model_config(name_or_path: str, flag: str = "--model_name_or_path"):
    """The transformers config of a model dir (or a config.json): a missing local dir, an unreadable config.json
    and an unreachable hub id are each one line (bad input), said before anything is written."""
    from transformers import AutoConfig
    local = Path(name_or_path).expanduser()
    looks_local = (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # hub ids: NAME or ORG/NAME
                   or name_or_path.endswith(".json"))
    if looks_local and not (local.is_dir() or local.is_file()):
        if flag != "--model_name_or_path":
            fail(f"{flag} {name_or_path}: no such file or directory — pass a dir with config.json, or the "
                 "config.json itself")
        fail(f"{flag} {name_or_path}: no such directory — pass a local model dir (with config.json) or a "
             "hub id such as t5-small")
    try:
        if local.is_file():
            from transformers import CONFIG_MAPPING
            import json
            data = json.loads(local.read_text())
            if "model_type" not in data:
                raise ValueError("no model_type in the file")
            return CONFIG_MAPPING[data["model_type"]].from_pretrained(str(local))
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as e:
        if local.exists():
            fail(f"cannot read the model config in {name_or_path} ({type(e).__name__}: "
                 f"{(str(e).strip().splitlines() or [''])[0][:120]}) — pass a dir with a transformers config.json")
        fail(f"cannot load model {name_or_path!r} ({type(e).__name__}: no local dir with config.json "
             "and the hub is unreachable?) — pass a local model dir, or --preset NAME --from_scratch")


def build_for_run(spec, source: ModelSource, tokenizer, ds_config: dict, zero_stage: int, accel):
    """The model a run trains: weights from the model dir, or a random init (--from_scratch) sized to the run's
    tokenizer; under ZeRO-3 partitioned while it is built, so a model larger than one device never materialises."""
    from dsfleet.fastpath import attn_implementation
    attn = attn_implementation(spec, source.model_cls)
    overrides = {}
    if tokenizer is not None and spec.from_scratch:
        overrides = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if source.seq2seq:
            overrides["decoder_start_token_id"] = tokenizer.pad_token_id
        else:
            overrides["bos_token_id"] = tokenizer.eos_token_id
        if source.preset.cpu_sized or len(tokenizer) > source.preset.config.get("vocab_size", 0):
            overrides["vocab_size"] = len(tokenizer)

    named_config = source.config() if getattr(spec, "config_name", None) and not spec.from_scratch else None

    def load():
        return load_model(source.preset, spec.model_name_or_path, spec.from_scratch, overrides,
                          spec.gradient_checkpointing, attn_implementation=attn, seq2seq=source.seq2seq,
                          config=named_config)

    keep_alive = None
    if zero_stage == 3:
        from torch import _dynamo  # noqa: F401 — imported inside zero.Init, its polyfills trip over the patched
        # Tensor.__new__ (`import torch._dynamo` here would make `torch` a local name of this function)
        source.model_cls  # import the model classes outside the patched context too
        from transformers.integrations import HfDeepSpeedConfig
        # while it is alive transformers builds under deepspeed.zero.Init itself and runs its weight init on gathered
        # parameters; a bare zero.Init left every partitioned weight at torch's default (embeddings N(0, 1))
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841
        if spec.from_scratch:
            try:
                with mamba_zero3_init(source.family, accel) as finish:
                    model = load()
                finish(model)
                return model
            finally:
                del keep_alive
    on_cpu = accel.device_name() == "cpu"
    device = None if on_cpu or not spec.from_scratch else torch.device(accel.current_device_name())
    try:
        if device is not None:
            with device:
                return load()
        return load()
    except (OSError, ValueError) as e:
        fail(f"cannot load weights from {spec.model_name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}) "
             "— pass a local model dir or --from_scratch")
    finally:
        del keep_alive
