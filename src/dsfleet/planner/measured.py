"""Activation memory measured, for architectures without a formula (any transformers model: Llama, Qwen2,
Mistral, BART, mT5, ...).

Why this exists: activations.py counts T5, GPT-2 and Mamba tensor by tensor, but a formula per architecture
does not scale to every model a user brings. Here the model's own code runs one training micro-step —
forward, the loss dsfleet would use (the fused loss where fastpath allows it), backward with every gradient taken
away as DeepSpeed's hooks take them — under torch's FakeTensorMode: the real config (hidden size, heads, GQA,
vocabulary, sequence length), no memory and little time spent, every tensor autograd keeps counted from its
storage's birth to its death. Traced at 1 and 2 layers (encoder and decoder separately for seq2seq) and at
micro-batch 1 and 2, the numbers are scaled linearly to the real layer count and micro-batch. On CPU the
fake trace equals a real CPU run's allocations byte for byte (tests/test_any_model.py checks it against real
autograd); CUDA's attention kernels keep the same outputs plus an fp32 logsumexp, as CPU's flash kernel does.
The traced model is the one the run trains: parameters in the run's precision, buffers fp32 (as DeepSpeed's engine
leaves them), and rows whose positions are not packed (docs/planner.md: both were found with GPU memory snapshots).
"""
from __future__ import annotations

import json
import weakref
from contextlib import contextmanager
from functools import lru_cache

PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
METHOD = "measured (fake-tensor trace of the model's own code at 1-2 layers, scaled to the layers and micro-batch)"


def layer_keys(cfg_kwargs: dict, seq2seq: bool) -> tuple[str, ...]:
    """The config keys holding the repeated-block counts: (layers,) or (encoder layers, decoder layers)."""
    pairs = (("num_layers", "num_decoder_layers"), ("encoder_layers", "decoder_layers"))
    if seq2seq:
        for enc, dec in pairs:
            if enc in cfg_kwargs or dec in cfg_kwargs:
                return enc, dec
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if key in cfg_kwargs:
            return (key,)
    return ("num_hidden_layers",)


def with_layers(cfg_kwargs: dict, keys: tuple[str, ...], counts: tuple[int, ...]) -> dict:
    """The config with these block counts; per-layer lists (layer_types, ...) cut to the new length."""
    out = dict(cfg_kwargs)
    for key, n in zip(keys, counts):
        old = int(out.get(key) or 0)
        out[key] = n
        for k, v in cfg_kwargs.items():
            if isinstance(v, list) and old and len(v) == old and k not in keys:
                out[k] = v[:n]
    return out


class LiveBytes:
    """A dispatch mode counting the bytes of every tensor storage an op creates until that storage dies (what the
    caching allocator would hold for it); the storages of `exclude` (the model's parameters) are not counted."""

    def __new__(cls, exclude=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = self.peak = 0
                # the parameters' and buffers' storages: views of them (a transposed weight) allocate nothing
                self.sizes: dict[int, int] = {t.untyped_storage()._cdata: 0 for t in exclude}

            def _free(self, key):
                self.live -= self.sizes.pop(key, 0)

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch
                from torch._subclasses.fake_tensor import FakeTensor
                if (func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor)
                        and args[0].dtype == torch.bool):
                    # a Python branch on a tensor's value (BART's `if torch.rand([]) < layerdrop` in transformers
                    # 5.17, `if x.isinf().any()`): a fake tensor has none. False takes the usual path (the layer
                    # runs, nothing to clamp); anything else data-dependent still fails loudly. Real tensors
                    # (the CPU checks against real autograd) keep their values
                    return False
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key = st._cdata
                        if key not in self.sizes:
                            self.sizes[key] = st.nbytes()
                            self.live += st.nbytes()
                            weakref.finalize(st, self._free, key)
                self.peak = max(self.peak, self.live)
                return out

        return _Mode()


def training_step_bytes(model, batch: dict) -> tuple[int, int, int]:
    """(bytes kept at the turn from forward to backward, forward peak, overall peak) of one micro-step of `model`
    on `batch`, gradients dropped as they are made (DeepSpeed's hooks move them into its buckets)."""
    for q in model.parameters():
        if q.requires_grad:
            q.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
    with LiveBytes(exclude=[*model.parameters(), *model.buffers()]) as live:
        loss = model(**batch).loss
        saved, fwd_peak = live.live, live.peak
        loss.backward()
        del loss
    return saved, fwd_peak, live.peak


def as_deepspeed_casts(model, dtype):
    """The model in the dtypes a run trains it in: built in fp32 (models.build_for_run), then DeepSpeed's bf16/fp16
    engine casts the parameters and leaves the buffers in fp32 — BART's `final_logits_bias` among them, so its
    logits, and the loss's log-softmax and their gradients, are fp32 (measured on an H200: three 3.07 GiB blocks at
    32 x 512 x 50,265 where a bf16 build has 1.53 GiB each: the planner's -17 %). tests/test_any_model.py checks
    this against DeepSpeed's own engine."""
    for q in model.parameters():
        q.data = q.data.to(dtype)
    return model


@contextmanager
def positions_as_the_run_has_them():
    """dsfleet's batches are unpadded rows whose positions run 0..n-1 (no sequences packed in one row), which
    transformers finds out by reading the position ids' values (`masking_utils.find_packed_sequence_indices`: a
    `.all()` on a tensor). A fake tensor has no values, the trace's branch reads False, and the model then builds
    an s x s mask per layer and, with a mask, expands GQA's key/value heads (`repeat_kv`) — neither of which the
    real step allocates (measured on an H200: 160 MiB a layer of a 1.2B Llama at 8 x 2048, the planner's +11.5 %).
    Inside this, the check answers what it answers for the run's rows: not packed."""
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    found = getattr(masking_utils, "find_packed_sequence_indices", None)
    if found is None:  # a transformers without the check: nothing to answer
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = found


@lru_cache(maxsize=512)
def trace(config_json: str, seq2seq: bool, layers: tuple[int, ...], micro_batch: int, seq: int, tgt: int,
          precision: str, checkpointing: bool, fused_loss: bool, fused_activation: bool,
          zero_stage: int) -> tuple[int, int, int]:
    """One fake-tensor training micro-step of the config at `layers` blocks: training_step_bytes's three numbers."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsfleet import fastpath, models
    data = json.loads(config_json)
    model_type = data.pop("model_type")
    data = with_layers(data, layer_keys(data, seq2seq), layers)
    fam = models.family(model_type, seq2seq)
    cfg = fam.config_cls(**data)
    dtype = getattr(torch, PRECISION_DTYPES[precision])
    kwargs = {"attn_implementation": "sdpa"} if getattr(fam.model_cls, "_supports_sdpa", False) else {}
    import warnings
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings(), positions_as_the_run_has_them():
        warnings.simplefilter("ignore")  # transformers' deprecation notes, once per trace
        model = as_deepspeed_casts(fam.model_cls._from_config(cfg, **kwargs), dtype).train()
        if checkpointing:
            if hasattr(model.config, "use_cache"):
                model.config.use_cache = False
            model.gradient_checkpointing_enable()
        if fused_activation:
            fastpath.fuse_activations(model)
        if fused_loss and fastpath.fused_loss_skip_reason(model_type, zero_stage, model) is None:
            fastpath.install_fused_loss(model)
        vocab = int(cfg.vocab_size)
        ids = torch.randint(3, vocab, (micro_batch, seq))
        # data.Collator's batch: unpadded blocks / fixed-length pairs (an all-ones mask is the same as none)
        batch = {"input_ids": ids, "labels": torch.randint(3, vocab, (micro_batch, tgt)) if seq2seq else ids.clone()}
        return training_step_bytes(model, batch)


def measured_activations(shape, micro_batch: int, seq: int, tgt: int, precision: str, checkpointing: bool,
                         fused_loss: bool, fused_activation: bool, zero_stage: int):
    """ActMem of `shape` (a planner ModelShape carrying its config) from traces at 1 and 2 blocks: one block at
    the real micro-batch (the embeddings, the head and the loss as they are at that size: the fused loss's chunk
    buffers stop growing at its chunk size, so they do not scale with the micro-batch — extrapolated from
    micro-batch 1-2 they were 6.4 GiB too many for a Llama of 32k vocabulary at 8 x 2048, docs/planner.md), and
    each further block's bytes from a micro-batch-1 trace, per sample linear."""
    from dsfleet.planner.activations import ActMem
    precision = "bf16" if precision == "fp16" else precision  # the same bytes
    fused_stage = 3 if zero_stage == 3 else 2  # all the fused-loss rule asks of the stage
    key = dict(seq=seq, tgt=tgt if shape.seq2seq else 0, precision=precision, checkpointing=checkpointing,
               fused_loss=fused_loss, fused_activation=fused_activation, zero_stage=fused_stage)
    n_blocks = (shape.layers, shape.dec_layers) if shape.seq2seq else (shape.layers,)
    one = tuple(1 for _ in n_blocks)
    base1 = trace(shape.config_json, shape.seq2seq, one, 1, **key)
    rest = trace(shape.config_json, shape.seq2seq, one, micro_batch, **key)
    per_block = []
    for i in range(len(n_blocks)):
        two = tuple(2 if j == i else 1 for j in range(len(n_blocks)))
        t = trace(shape.config_json, shape.seq2seq, two, 1, **key)
        per_block.append(tuple(a - b for a, b in zip(t, base1)))
    b = micro_batch
    values = []
    for k in range(3):  # saved, forward peak, overall peak
        blocks = sum((n - 1) * per[k] * b for n, per in zip(n_blocks, per_block))
        values.append(int(rest[k] + blocks))
    saved, fwd, peak = values
    return ActMem(saved=saved, head_peak=peak, layer_peak=peak, fwd_peak=fwd, notes=METHOD)
