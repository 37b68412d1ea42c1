"""The fast path of the training entry point: the same model and the same math, fewer kernels and fewer bytes.

`python -m dsfleet.train` spends most of a GPT-2/T5 step in a few places that the stock transformers modules
leave slow: the loss over a 50k vocabulary (bf16 logits, then a full fp32 copy, then log-softmax, all kept for
backward), GPT-2's `gelu_new` written as eight elementwise kernels, and one kernel launch per small op. Each
piece here is switched by a RunSpec flag and changes no number the model computes beyond floating-point
rounding (the loss curves of both paths are compared in tests/test_bench.py and by `dsfleet bench`):

- `attn_implementation` ("auto": SDPA where the model class supports it, so fused flash/efficient kernels);
- `fused_loss`: the cross-entropy computed from the final hidden states and the output embedding in row
  chunks, logits of at most `CHUNK_BYTES` alive at a time, gradients made in the same pass (no logits are
  kept for backward); the vocabulary is padded to a multiple of 64 inside the op (never in the model) so the
  three GEMMs use aligned tensor-core kernels — padded columns are -inf and take no probability;
- `fused_activation`: GPT-2's tanh-approximated GELU as one kernel (the same formula);
- `compile`: torch.compile of each repeated block (regional compilation: one compiled graph serves every
  layer, state-dict keys unchanged), which DeepSpeed ZeRO-1/2 allows since their hooks are on gradients, and
  of the fused loss's per-chunk softmax/gradient math.

The fused loss reads the output embedding directly, which ZeRO-3 keeps partitioned: at stage 3 the model's
own loss is used and the start line says so. After deepspeed.initialize, `attach` swaps ZeRO-1/2's per-tensor
gradient checks for multi-tensor ones (dsfleet/zero_step.py) and, with `DSFLEET_PROFILE=DIR`, profiles three
steps (dsfleet/profiling.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_BYTES = 512 * 2**20  # fp32 logits alive at once in the fused loss
VOCAB_MULTIPLE = 64  # the fused loss pads the vocabulary to a multiple of this, inside the op


# ---------------------------------------------------------------------------------------------------------
# The loss: linear layer + cross-entropy in row chunks.

# config keys of models whose logits are not the output embedding's product alone (a soft cap, a scale, a bias
# after the head): the fused loss would compute another function, so it is skipped for them
POST_HEAD_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                         "logits_soft_cap")
# config keys of models whose own loss is more than next-token cross-entropy: the fused loss would drop the rest
OWN_LOSS_CONFIG_KEYS = {"output_router_logits": "adds its router's auxiliary loss",  # Mixtral, Qwen2-MoE, ...
                        "ngram": "adds n-gram prediction losses"}  # ProphetNet (and label smoothing, eps)
NO_FUSED_LOSS_FAMILIES = ("mamba",)  # transformers' Mamba: its own loss (the planner's formula counts that path)


def fused_loss_skip_reason(family: str, zero_stage: int, model=None) -> str | None:
    """Why `fused_loss` is not used for this model at this ZeRO stage; None when it is. The one rule that `apply`
    follows and the memory planner counts activations by. Any causal LM or seq2seq model whose logits are its
    output embedding's product qualifies (with `model` given, what the model has is checked: an output embedding,
    nothing added after it)."""
    if family in NO_FUSED_LOSS_FAMILIES:
        return f"{family} has no output-embedding loss to fuse"
    if model is not None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or getattr(head, "weight", None) is None:
            return f"{type(model).__name__} has no output embedding"
        if getattr(head, "bias", None) is not None:
            return f"{type(model).__name__}'s output embedding has a bias"
        if getattr(model, "final_logits_bias", None) is not None:
            return f"{type(model).__name__} adds final_logits_bias after its head"
        cfg = getattr(model, "config", None)
        extra = [k for k in POST_HEAD_CONFIG_KEYS if getattr(cfg, k, None) not in (None, 0, 1, 1.0)]
        if extra:
            return f"{type(model).__name__} transforms its logits ({extra[0]})"
        own = [k for k in OWN_LOSS_CONFIG_KEYS if getattr(cfg, k, None)]
        if own:
            return f"{type(model).__name__} {OWN_LOSS_CONFIG_KEYS[own[0]]} ({own[0]})"
        if cfg is not None and cfg.is_encoder_decoder and not (hasattr(model, "prepare_decoder_input_ids_from_labels")
                                                               or hasattr(model, "_shift_right")):
            return f"{type(model).__name__} cannot make decoder inputs from labels"
    if zero_stage == 3:
        return "ZeRO-3 partitions the output embedding"
    return None


def padded_vocab(vocab: int) -> int:
    """The vocabulary the fused loss computes over: `vocab` rounded up to a multiple of VOCAB_MULTIPLE."""
    return vocab + (-vocab) % VOCAB_MULTIPLE


def chunk_rows(vocab: int) -> int:
    """Rows of one chunk of the fused loss over a (padded) vocabulary: fp32 logits of at most CHUNK_BYTES."""
    rows = max(CHUNK_BYTES // (4 * vocab), 16)
    return 1 << (rows.bit_length() - 1)  # a power of two: whole chunks for the usual batch x length products


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32 for bf16/fp16 models, the model's own dtype when wider."""
    return torch.promote_types(dtype, torch.float32)


def _padded(weight: torch.Tensor) -> torch.Tensor:
    pad = padded_vocab(weight.shape[0]) - weight.shape[0]
    return F.pad(weight, (0, 0, 0, pad)) if pad else weight


def _ce_math(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of a chunk of logits and d(sum)/d(logits) (softmax - one-hot, zero on ignored rows) written as
    plain tensor math, for torch.compile to fuse into a reduction and one pointwise pass (used with `compile`;
    in eager mode the autograd of F.cross_entropy below makes fewer passes)."""
    x = logits.to(_acc(logits.dtype))
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    hit = torch.arange(x.shape[1], device=x.device) == targets[:, None]
    valid = (targets != IGNORE_INDEX)[:, None]
    loss = torch.where(hit & valid, lse - x, 0.0).sum()
    grad = torch.where(valid, torch.exp(x - lse) - hit.to(x.dtype), 0.0)
    return loss, grad.to(logits.dtype)


_compiled_ce = None  # torch.compile(_ce_math) once `compile` is on


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE of one chunk and, if asked, d(sum)/d(logits) in the model dtype (softmax - one-hot)."""
    logits = hidden @ weight.t()  # model dtype, like the lm_head's own matmul
    if logits.shape[1] > vocab:
        logits[:, vocab:] = float("-inf")
    if want_grad and _compiled_ce is not None:
        return _compiled_ce(logits, targets)
    with torch.enable_grad():
        upcast = logits.to(_acc(logits.dtype)).requires_grad_(want_grad)  # fp32 loss, as transformers' causal-LM loss
        loss = F.cross_entropy(upcast, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if not want_grad:
        return loss.detach(), None
    (grad,) = torch.autograd.grad(loss, upcast)
    return loss.detach(), grad.to(hidden.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(hidden @ weight.T, targets) over non-ignored targets; gradients computed in forward, scaled in
    backward by the incoming gradient (the loss is the graph's end, so that is a scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        vocab = weight.shape[0]
        w = _padded(weight)
        rows = chunk_rows(w.shape[0])
        count = (targets != IGNORE_INDEX).sum()
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(w.shape, dtype=_acc(w.dtype), device=w.device)
        total = torch.zeros((), dtype=_acc(hidden.dtype), device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            loss, g = _chunk_loss(h, w, targets[start:start + rows], vocab, want_grad=True)
            total += loss
            grad_h[start:start + rows] = g @ w
            grad_w += g.t() @ h
        ctx.save_for_backward(grad_h, grad_w[:vocab], count)
        ctx.weight_dtype = weight.dtype
        return total / count.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out.to(grad_w.dtype) / count.clamp(min=1)  # fp32: 1/count in bf16 would bias every gradient
        return (grad_h.to(grad_w.dtype) * scale).to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (-100 ignored) without full logits.

    hidden [N, H], weight [V, H], targets [N]. Equal to F.cross_entropy(F.linear(hidden, weight).float(),
    targets, ignore_index=-100) up to summation order."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    w = _padded(weight)
    rows = chunk_rows(w.shape[0])
    total = torch.zeros((), dtype=_acc(hidden.dtype), device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        total += _chunk_loss(hidden[start:start + rows], w, targets[start:start + rows], weight.shape[0], False)[0]
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# Installing the pieces on a transformers model.

@dataclass
class FusedLossOutput:
    """What the training loop reads from a forward with labels: `.loss` (logits are never formed)."""
    loss: torch.Tensor
    logits: Any = None

    def __getitem__(self, i):
        return (self.loss, self.logits)[i]


class _HeadBypass:
    """While active, the output embedding returns its input: the model's forward then yields the hidden
    states exactly as its head would see them (T5's d_model**-0.5 rescale included)."""

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def __enter__(self):
        self.head.forward = lambda hidden: hidden  # instance attribute: shadows the class forward
        return self

    def __exit__(self, *exc):
        del self.head.forward


def install_fused_loss(model, family: str | None = None) -> None:
    """Replace `model.forward` (on the instance) so a training call with labels computes the fused loss.
    Calls without labels, or with anything beyond input_ids/attention_mask/labels (generation, eval with
    extra outputs), go to the model's own forward unchanged. Seq2seq or not is what the model's config says;
    the decoder inputs are the model's own shift of the labels (T5's _shift_right, BART's shift_tokens_right)."""
    original = model.forward
    head = model.get_output_embeddings()
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if seq2seq and shift is None:
        shift = lambda labels: model._shift_right(labels)  # noqa: E731
    elif seq2seq:
        shift = functools.partial(lambda f, labels: f(labels=labels), shift)

    @functools.wraps(original)  # generation inspects forward's signature: it keeps seeing the model's own
    def forward(*args, **kwargs):
        labels = kwargs.get("labels")
        if args or labels is None or set(kwargs) - {"input_ids", "attention_mask", "labels"}:
            return original(*args, **kwargs)
        input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        with _HeadBypass(head):
            if seq2seq:
                out = original(input_ids=input_ids, attention_mask=attention_mask,
                               decoder_input_ids=shift(labels), use_cache=False)
                targets = labels
            else:
                # dsfleet's causal-LM batches are unpadded blocks (data.Collator: the mask is all ones), so
                # the mask is left out: SDPA takes its causal kernel, transformers skips its mask checks
                out = original(input_ids=input_ids, use_cache=False)
                targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # token t predicts token t+1
        hidden = out.logits if hasattr(out, "logits") else out[0]
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1))
        return FusedLossOutput(loss=loss)

    model.forward = forward


def fuse_activations(model) -> int:
    """GPT-2's gelu_new (tanh-approximated GELU in eight elementwise ops) -> the one-kernel tanh GELU."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ in ("NewGELUActivation", "FastGELUActivation"):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def repeated_blocks(model) -> list[torch.nn.Module]:
    """The repeated layers of every ModuleList made of one block class (GPT-2 h, T5 encoder/decoder block, Mamba
    layers) that share the list's most common structure: T5's first block, which alone owns the relative
    position bias, stays eager, so each stack compiles one graph instead of two."""
    blocks, inside = [], []
    for name, module in model.named_modules():  # parents come before their children
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            shapes = [tuple((n, type(m).__name__) for n, m in block.named_modules()) for block in module]
            common = max(set(shapes), key=shapes.count)
            blocks.extend(block for block, shape in zip(module, shapes) if shape == common)
            inside.append(name + ".")
    return blocks


def compile_blocks(model, cuda_graphs: bool = False) -> int:
    """torch.compile of each repeated block, in place; with `cuda_graphs`, in reduce-overhead mode: each block's
    forward and backward kernels replay as one CUDA graph per layer (inductor's CUDA graph trees), so a step
    bound by the host launching thousands of small kernels (T5-3B at micro-batch 16) runs at the device's pace.
    Only for batches of one shape (resolve._cuda_graphs): each new shape records new graphs. This is exactly the
    configuration measured on one H200 (docs/benchmarks.md, "CUDA graphs"): T5-3B at 16 x (128 + 128) 25.5k
    tokens/s against 16.3-16.9k without; with dynamo's static shapes, the dynamic-graph skip and a step mark per
    forward added it measured 18.3k, so none of those is here."""
    import torch._dynamo
    backend = os.environ.get("DSFLEET_COMPILE_BACKEND", "inductor")
    limit = 64  # every layer hits the first layer's graph; headroom for layer-0 / encoder / decoder variants
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit if "accumulated" not in name else 512))
    mode = "reduce-overhead" if cuda_graphs else None
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(backend=backend, mode=mode)  # in place: parameter names and the state dict are unchanged
    return len(blocks)


def attn_implementation(spec, cls) -> str | None:
    """What to pass as transformers' attn_implementation for the model class `cls` (a family name is looked up):
    "auto" means SDPA when the class supports it, else the class's own attention."""
    from dsfleet.cli import fail
    if isinstance(cls, str):
        from dsfleet.models import family as model_family
        cls = model_family(cls).model_cls
    wanted = spec.attn_implementation
    if wanted == "auto":
        return "sdpa" if getattr(cls, "_supports_sdpa", False) else None
    if wanted == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        fail(f"{cls.__name__} has no SDPA attention in this transformers version — use --attn_implementation auto")
    if wanted == "flash_attention_2":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is None:
            fail("--attn_implementation flash_attention_2 needs the flash-attn package — install it, or use sdpa")
    return wanted


@dataclass
class FastPath:
    """What apply() switched on, for the start line and the run's records."""
    parts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # facts every metrics row carries (e.g. the Mamba scan path)
    warnings: list[str] = field(default_factory=list)   # one line each, printed by rank 0
    memory_history: bool = False  # DSFLEET_MEMORY_SNAPSHOT=DIR: this rank records its CUDA allocations

    def describe(self) -> str:
        text = ", ".join(self.parts) or "off"
        return text + (f" (not used: {'; '.join(self.skipped)})" if self.skipped else "")

    def attach(self, engine, spec, out_dir: Path, rank: int, total_steps: int) -> None:
        """After deepspeed.initialize: the engine-side pieces (ZeRO-1/2 gradient checks as multi-tensor kernels,
        dsfleet/zero_step.py) and the optional profiler (DSFLEET_PROFILE=DIR, rank 0)."""
        if spec.fused_grad_checks:
            from dsfleet import zero_step
            why_not = zero_step.install(engine)
            if why_not:
                self.skipped.append(f"multi-tensor gradient checks ({why_not})")
            else:
                self.parts.append("multi-tensor gradient checks")
        target = os.environ.get("DSFLEET_PROFILE")
        if target and rank == 0:
            from dsfleet.profiling import attach_profiler
            attach_profiler(engine, Path(target), total_steps)
        if self.memory_history:
            from dsfleet.profiling import attach_memory_snapshot
            attach_memory_snapshot(engine, Path(os.environ["DSFLEET_MEMORY_SNAPSHOT"]))


def apply(model, spec, family: str, zero_stage: int, mamba_scan: "MambaScan | None" = None) -> FastPath:
    """Switch on the fast-path pieces the spec asks for, on a model before deepspeed.initialize; a Mamba's scan is
    the one choose_mamba_scan decided at the start of the run (reported here, not decided again)."""
    fast = FastPath()
    from dsfleet.runtime import global_rank
    if os.environ.get("DSFLEET_MEMORY_SNAPSHOT") and global_rank() == 0:
        from dsfleet.profiling import start_memory_history
        fast.memory_history = start_memory_history()  # from here: DeepSpeed's states and the steps' allocations
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl:
        fast.parts.append(f"attention {impl}")
    cfg = getattr(model, "config", None)
    has_attention = any(getattr(cfg, k, None) for k in ("num_attention_heads", "n_head", "num_heads"))
    if spec.attn_implementation == "auto" and has_attention and impl not in ("sdpa", "flash_attention_2"):
        fast.skipped.append(f"SDPA ({type(model).__name__} has no SDPA attention: its own)")
    if spec.fused_activation and fuse_activations(model):
        fast.parts.append("fused GELU")
    if spec.fused_loss:
        skip = fused_loss_skip_reason(family, zero_stage, model)
        if skip:
            fast.skipped.append(f"fused loss ({skip})")
        else:
            install_fused_loss(model, family)
            fast.parts.append("fused chunked cross-entropy")
    if family == "mamba":
        if mamba_scan is None:
            raise TypeError("internal: fastpath.apply of a Mamba needs the scan choose_mamba_scan decided")
        _mamba_scan(fast, mamba_scan)
        if zero_stage == 3:
            fast.parts.append(f"ZeRO-3 gathers for {gather_mamba_mixer_weights(model)} Mamba mixers the weights they "
                              "read directly")
    if spec.compile:
        cuda_graphs = spec.cuda_graphs == "on"  # resolve decided it (resolve._cuda_graphs)
        compiled = compile_blocks(model, cuda_graphs)
        if compiled:
            fast.parts.append(f"torch.compile of {compiled} blocks" + (" as CUDA graphs" if cuda_graphs else ""))
        else:
            fast.skipped.append(f"torch.compile ({type(model).__name__} has no ModuleList of repeated blocks)")
        if "fused chunked cross-entropy" in fast.parts:
            compile_loss()
            fast.parts.append("compiled cross-entropy")
    return fast


# The import names transformers' Mamba resolves (mamba_ssm, causal_conv1d) and their compiled halves, which are
# what fails to import when the packages are present but were not built for this torch/CUDA.
MAMBA_KERNEL_MODULES = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda")


def mamba_kernels_problem() -> str | None:
    """Why transformers' Mamba would not run the mamba_ssm / causal_conv1d CUDA kernels here, or None when it
    would. transformers (5.x) imports the packages when modeling_mamba is first imported and keeps its
    pure-PyTorch functions wherever an import fails; this makes the same imports, so it answers for the model
    the run builds (call it before or after; the answer is the same)."""
    import importlib
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn  # noqa: F401
        importlib.import_module("causal_conv1d").causal_conv1d_fn  # noqa: B018
    except Exception as e:  # ImportError, or a library built for another torch (undefined symbol: OSError)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
    return None


def hide_mamba_kernels() -> None:
    """`--mamba_kernels off`: make mamba_ssm / causal_conv1d unimportable in this process, so that transformers'
    Mamba keeps its pure-PyTorch scan (the reference path, for comparisons) even where the kernels are installed.
    Must run before transformers' modeling_mamba is imported: it resolves the kernels once, at import."""
    import sys
    if "transformers.models.mamba.modeling_mamba" in sys.modules:
        raise RuntimeError("internal: hide_mamba_kernels() after transformers' Mamba module was imported")
    for name in MAMBA_KERNEL_MODULES:
        sys.modules[name] = None  # `import name` now raises ImportError


@dataclass(frozen=True)
class MambaScan:
    """The scan a Mamba run takes in this process, decided once by choose_mamba_scan (transformers fixes it when its
    Mamba module is first imported) and carried: to the planner (resolve.Hardware.mamba_kernels, so a `--zero auto`
    plan counts the activations of the scan that runs) and to the fast path's report."""
    kernels: bool
    why_not: str | None = None  # "--mamba_kernels off", "CPU run", or why the kernels do not import on this GPU


def _mamba_scan(fast: FastPath, scan: MambaScan) -> None:
    if scan.kernels:
        fast.tags["mamba_scan"] = "cuda_kernels"
        fast.parts.append("Mamba selective scan + causal conv1d CUDA kernels")
        return
    fast.tags["mamba_scan"] = "pytorch"
    if scan.why_not in ("--mamba_kernels off", "CPU run"):
        fast.skipped.append(f"Mamba CUDA kernels ({scan.why_not}): pure-PyTorch scan")
        return
    fast.warnings.append(
        f"warning: mamba_ssm / causal_conv1d kernels unavailable ({scan.why_not}) — Mamba runs transformers' "
        "pure-PyTorch scan, which materialises the (batch, d_inner, seq, d_state) state tensors and is several "
        "times slower and larger than the fused kernels; install them (docker/install.sh mamba builds them "
        "for CUDA_ARCH) for real runs")
    fast.skipped.append("Mamba CUDA kernels (unavailable): pure-PyTorch scan")


def gather_mamba_mixer_weights(model) -> int:
    """ZeRO-3 gathers a module's parameters for that module's own forward and backward only. transformers'
    MambaMixer reads its x_proj, dt_proj, out_proj and conv1d weights as tensors (the fused kernel takes them all;
    the PyTorch path dt_proj's and conv1d's) instead of calling those modules, so at stage 3 it would see empty
    partitions (seen on an H200: 'size of tensor a (0) must match ... (16)'). Registered as the mixer's external
    parameters, DeepSpeed gathers them around the mixer's forward and backward."""
    import deepspeed
    register_external_parameter = deepspeed.zero.register_external_parameter
    mixers = 0
    for module in model.modules():
        if type(module).__name__ == "MambaMixer":
            for child in (module.x_proj, module.dt_proj, module.out_proj, module.conv1d):
                for param in child.parameters(recurse=False):
                    register_external_parameter(module, param)
            mixers += 1
    return mixers


def compile_loss() -> None:
    """The fused loss's per-chunk softmax/gradient math through torch.compile (two fused kernels per chunk)."""
    global _compiled_ce
    _compiled_ce = torch.compile(_ce_math, backend=os.environ.get("DSFLEET_COMPILE_BACKEND", "inductor"),
                                 dynamic=False)


def choose_mamba_scan(spec, family: str, has_gpu: bool) -> MambaScan | None:
    """--mamba_kernels, decided once per process, before transformers' Mamba is imported (it picks its scan at
    import): off hides the kernel packages; on requires them on a GPU (one line otherwise); auto uses them where
    they import. The answer (None for other families) is what the planner and the fast path are given."""
    if spec.mamba_kernels == "off":
        hide_mamba_kernels()
    if family != "mamba":
        return None
    if spec.mamba_kernels == "off":
        return MambaScan(False, "--mamba_kernels off")
    problem = mamba_kernels_problem() if has_gpu else "CPU run"
    if problem and spec.mamba_kernels == "on":
        from dsfleet.cli import fail
        fail(f"--mamba_kernels on, but the mamba_ssm / causal_conv1d CUDA kernels cannot run here "
             f"({'no GPU visible' if not has_gpu else problem}) — build them for this GPU (docker/install.sh mamba "
             "with CUDA_ARCH set) or pass --mamba_kernels auto")
    return MambaScan(problem is None, problem)