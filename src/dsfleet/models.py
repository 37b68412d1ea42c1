"""Model registry: a preset family name -> how to build its transformers config and model.

Weights come from `from_pretrained(path)` (a local dir, or the hub when reachable) or, only when asked
(`--from_scratch`), from a random init of the preset's config. Never silently one for the other.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dsfleet.cli import fail


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
        rank = dist.get_rank() if dist.is_initialized() else 0
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
               gradient_checkpointing: bool = False, attn_implementation: str | None = None):
    fam = family(preset.family)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if from_scratch:
        config = build_config(preset, **(config_overrides or {}))
        model = fam.model_cls._from_config(config, **kwargs)  # (not the constructor: it knows ZeRO-3's init)
    else:
        model = fam.model_cls.from_pretrained(model_name_or_path, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    return model


@dataclass(frozen=True)
class ModelSource:
    """Which architecture a run trains (a preset, or a model dir's config) — weights come from the spec."""
    preset: Any  # presets.Preset: family + transformers config kwargs
    family: str
    name: str

    @property
    def seq2seq(self) -> bool:
        return self.family == "t5"

    @property
    def hidden_size(self) -> int:
        for key in ("d_model", "n_embd", "hidden_size"):
            if key in self.preset.config:
                return int(self.preset.config[key])
        return 1024

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position embeddings take (None: relative positions, or a scan)."""
        for key in ("n_positions", "max_position_embeddings"):
            if self.preset.config.get(key):
                return int(self.preset.config[key])
        return None


def resolve_source(spec) -> ModelSource:
    """Which architecture (preset or a model dir's config) and where its weights come from — never silently.
    Also sets the spec's task from the architecture when the spec names none."""
    from dsfleet.presets import Preset, get_preset
    preset = get_preset(spec.preset) if spec.preset else None
    if spec.synthetic_data and not spec.from_scratch and not spec.model_name_or_path:
        spec.from_scratch = True  # random tokens need no trained weights; said in the start line
    if not spec.from_scratch and not spec.model_name_or_path and not spec.dry_run:  # a dry run loads no weights
        fail(f"no weights given — pass --model_name_or_path DIR (a local dir or hub id) or --from_scratch for a "
             f"random init of {preset.name if preset else 'the preset'}")
    if preset is None:
        if not spec.model_name_or_path:
            fail("--from_scratch without an architecture — pass --preset NAME (e.g. t5_small) or --model_name_or_path "
                 "DIR whose config.json gives it")
        cfg = model_config(spec.model_name_or_path)
        if cfg.model_type not in MODEL_FAMILIES:
            fail(f"model type {cfg.model_type!r} is not supported — use a T5, GPT-2 or Mamba model")
        preset = Preset(Path(spec.model_name_or_path).name or cfg.model_type, cfg.model_type, cfg.to_diff_dict())
    source = ModelSource(preset, preset.family, preset.name)
    if spec.task is None:
        spec.task = "translation" if source.seq2seq else "causal_lm"
    return source


def check_weights(spec) -> None:
    """A run about to train: the weights' dir must be readable now — they load after the run dir exists."""
    if spec.model_name_or_path and spec.preset and not spec.from_scratch:
        model_config(spec.model_name_or_path)


def model_config(name_or_path: str):
    """The transformers config of --model_name_or_path: a missing local dir, an unreadable config.json and an
    unreachable hub id are each one line (bad input), said before anything is written."""
    from transformers import AutoConfig
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # hub ids: NAME or ORG/NAME
    if looks_local and not local.is_dir():
        fail(f"--model_name_or_path {name_or_path}: no such directory — pass a local model dir (with config.json) or a "
             "hub id such as t5-small")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as e:
        if local.is_dir():
            fail(f"cannot read the model config in {name_or_path} ({type(e).__name__}: "
                 f"{(str(e).strip().splitlines() or [''])[0][:120]}) — pass a dir with a transformers config.json")
        fail(f"cannot load model {name_or_path!r} ({type(e).__name__}: no local dir with config.json "
             "and the hub is unreachable?) — pass a local model dir, or --preset NAME --from_scratch")


def build_for_run(spec, source: ModelSource, tokenizer, ds_config: dict, zero_stage: int, accel):
    """The model a run trains: weights from the model dir, or a random init (--from_scratch) sized to the run's
    tokenizer; under ZeRO-3 partitioned while it is built, so a model larger than one device never materialises."""
    from dsfleet.fastpath import attn_implementation
    attn = attn_implementation(spec, source.family)
    overrides = {}
    if tokenizer is not None and spec.from_scratch:
        overrides = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if source.seq2seq:
            overrides["decoder_start_token_id"] = tokenizer.pad_token_id
        else:
            overrides["bos_token_id"] = tokenizer.eos_token_id
        if source.preset.cpu_sized or len(tokenizer) > source.preset.config.get("vocab_size", 0):
            overrides["vocab_size"] = len(tokenizer)

    def load():
        return load_model(source.preset, spec.model_name_or_path, spec.from_scratch, overrides,
                          spec.gradient_checkpointing, attn_implementation=attn)

    keep_alive = None
    if zero_stage == 3:
        import torch._dynamo  # noqa: F401 — imported inside zero.Init, its polyfills trip over the patched Tensor.__new__
        family(source.family)  # import the model classes outside the patched context too
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
