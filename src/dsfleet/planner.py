"""`dsfleet plan`: which ZeRO stage / offload / precision / checkpointing / micro-batch fits, and which is fastest,
answered from arithmetic before a GPU is spent.

Why this exists: users guess (a 6.9B Mamba "fits ZeRO-2 at 23 GB/GPU on 4 cards" when its 16-bit weights alone
are 13.8 GB), hand-tune ZeRO-3 knobs until a run stops crashing, or pay ZeRO-3's extra traffic on a card where
ZeRO-1/2 fits. For every candidate this module predicts, per GPU, the peak that `torch.cuda.max_memory_allocated`
reports during training with dsfleet's own entry point (model states, activations, DeepSpeed buffers, as live at
each phase of a step), adds the framework overhead that the caching allocator does not see, checks the CPU side of
offload, and ranks the candidates that fit with a small stated cost model. docs/planner.md states the formulas,
the assumptions and the measurements behind them.

The model-state numbers follow DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs) exactly for
the same inputs; the activation formulas count, tensor by tensor, what autograd keeps for the transformers modules
dsfleet trains (T5, GPT-2, Mamba's pure-PyTorch scan) with and without dsfleet's fast path (fastpath.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterable

from dsfleet.dsconfig import default_overlap_comm, default_reduce_bucket

GiB = 2**30

# ---------------------------------------------------------------------------------------------------------
# Assumptions (docs/planner.md names each; change them here, not in the formulas)

DEFAULT_GPU_MEM = 80 * GiB
DEFAULT_CPU_MEM = 512 * GiB
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
OFFLOADS = (  # (ZeRO stage, optimizer offload, param offload) that DeepSpeed supports
    (0, "none", "none"), (1, "none", "none"), (1, "cpu", "none"), (2, "none", "none"), (2, "cpu", "none"),
    (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu"), (3, "nvme", "none"), (3, "nvme", "nvme"),
)
PRECISIONS = ("bf16", "fp16", "fp32")

CONTEXT_BYTES = int(1.5 * GiB)  # CUDA context + NCCL communicators + driver reserve: outside the caching allocator
FRAGMENTATION = 0.07  # reserved-but-unallocated share of the allocator's peak
ACHIEVED_FLOPS = {"bf16": 400e12, "fp16": 400e12, "fp32": 50e12}  # per GPU, at large micro-batches
EFF_HALF_TOKENS = 1024  # GPU efficiency = tokens / (tokens + this): small micro-batches under-use the GPU
LINK_BW_INTRA = 150e9  # bytes/s per GPU for collectives inside a node (NVLink)
LINK_BW_INTER = 25e9  # bytes/s per GPU across nodes (200 Gb/s NIC per GPU)
ZERO3_FETCH_BW = 100e9  # bytes/s: ZeRO-3's per-module gather/partition hooks, even on one GPU
PCIE_BW = 25e9  # bytes/s per GPU, host <-> device
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed CPU-Adam, per GPU's share of the host cores
NVME_BW = 3e9  # bytes/s per GPU, optimizer/param swapping

# dsfleet's generated DeepSpeed config (dsconfig.generate) — what the entry point runs
SUB_GROUP_SIZE = 10**9  # DeepSpeed's default zero_optimization.sub_group_size
MAX_REUSE_DISTANCE = 10**9  # stage3_max_reuse_distance (dsconfig default)

DEVICE_KERNELS = {  # what differs between the CUDA kernels and the CPU ones (the tests measure on CPU)
    "cuda": {"dropout_mask": 1, "ln_stats": 8},  # bool dropout masks; fp32 mean+rstd per LayerNorm row
    "cpu": {"dropout_mask": None, "ln_stats": None},  # CPU: mask and stats in the input dtype
}


# ---------------------------------------------------------------------------------------------------------
# Inputs: sizes and parameter counts

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'80GiB', '24GB', '512G', '1.5TiB', 8e10 -> bytes. GB/TB are decimal; GiB and bare G/T are binary."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        from dsfleet.cli import fail
        fail(f"cannot read size {text!r} — write it like 80GiB, 24GB or 512G")
    number, unit, binary, byte = m.groups()
    power = "kmgtp".find(unit.lower()) + 1 if unit else 0
    base = 1000 if (byte and not binary) else 1024
    return int(float(number) * base**power)


def parse_count(text: str | int) -> int:
    """'6.9e9', '6.9B', '350M', 1e9 -> a parameter count."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.match(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*$", str(text), re.I)
    if not m:
        from dsfleet.cli import fail
        fail(f"cannot read parameter count {text!r} — write it like 6.9e9, 6.9B or 350M")
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


# ---------------------------------------------------------------------------------------------------------
# The model: dims from the preset config, counts from a meta-device instance

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
    seq_len: int = 1024  # default sequence (LM block size or T5 source length)
    tgt_len: int = 0  # T5 target length


@lru_cache(maxsize=None)
def model_shape(preset_name: str) -> ModelShape:
    """Exact counts from dsfleet.models (meta device, nothing allocated) + the preset's architecture dims."""
    from dsfleet.models import build_config, count_parameters
    from dsfleet.presets import get_preset

    preset = get_preset(preset_name)
    return shape_from_config(preset.name, preset.family, build_config(preset), preset.defaults,
                             n_params=count_parameters(preset))


def shape_from_config(name: str, family_name: str, cfg, defaults: dict | None = None,
                      n_params: int | None = None) -> ModelShape:
    """A ModelShape from a transformers config of a supported family (a preset's, or a model dir's)."""
    import torch

    from dsfleet.models import family

    with torch.device("meta"):
        model = family(family_name).model_cls(cfg)
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    largest_param = max(p.numel() for p in model.parameters())
    n_params = n_params or sum(p.numel() for p in model.parameters())
    d = defaults or {}
    common = dict(name=name, family=family_name, n_params=n_params, largest_layer=largest_layer,
                  largest_param=largest_param, vocab=int(cfg.vocab_size), tied=bool(cfg.tie_word_embeddings))
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
    """The spec's model: its preset, or the config.json of its --model_name_or_path (T5, GPT-2, Mamba)."""
    preset = getattr(spec_like, "preset", None)
    if preset:
        return model_shape(preset)
    path = getattr(spec_like, "model_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 — no readable config: nothing to plan with
        return None
    if cfg.model_type not in ("t5", "gpt2", "mamba"):
        return None
    return shape_from_config(str(path).rstrip("/").split("/")[-1] or cfg.model_type, cfg.model_type, cfg)


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


# ---------------------------------------------------------------------------------------------------------
# Activations: bytes autograd keeps, per family (counted op by op; docs/planner.md lists every term)

@dataclass
class ActMem:
    """Activation bytes of one micro-batch on one GPU (what the model itself allocates during fwd/bwd)."""
    saved: int  # held at the turn from forward to backward
    head_peak: int  # at the start of backward (loss gradients), before any parameter gradient exists
    layer_peak: int  # later in backward (a layer's gradients + the tied embedding's gradient)
    fwd_peak: int  # during forward
    notes: str = ""

    @property
    def peak(self) -> int:
        return max(self.head_peak, self.layer_peak, self.fwd_peak)


def _fused_chunk_bytes() -> int:
    try:
        from dsfleet.fastpath import CHUNK_BYTES
        return int(CHUNK_BYTES)
    except Exception:  # noqa: BLE001 — the fast path is optional; its documented default
        return 512 * 2**20


def activation_memory(shape: ModelShape, micro_batch: int, seq_len: int, tgt_len: int | None = None,
                      precision: str = "bf16", checkpointing: bool = False, *, fused_loss: bool = True,
                      fused_activation: bool = True, zero_stage: int = 2, device: str = "cuda") -> ActMem:
    """Activation memory of dsfleet's training step. `fused_loss`/`fused_activation` are the RunSpec fast-path
    switches (the fused loss is used at ZeRO 0-2 for GPT-2/T5 only, as fastpath.apply does). `device="cpu"`
    gives the CPU kernels' numbers, which the tests measure."""
    p = 2 if precision in ("bf16", "fp16") else 4
    up = 1 if p == 2 else 0  # an fp32 upcast is a separate tensor only for 16-bit models
    kern = DEVICE_KERNELS[device]
    mask = (kern["dropout_mask"] or p) if shape.dropout > 0 else 0
    ln_stats = kern["ln_stats"] or 2 * p
    fused = fused_loss and zero_stage < 3 and shape.family in ("gpt2", "t5", "generic")
    if shape.family == "t5":
        return _t5_act(shape, micro_batch, seq_len, tgt_len or shape.tgt_len or seq_len, p, up, mask, checkpointing,
                       fused)
    if shape.family == "mamba":
        return _mamba_act(shape, micro_batch, seq_len, p, up, checkpointing)
    return _gpt2_act(shape, micro_batch, seq_len, p, mask, ln_stats, checkpointing, fused,
                     fused_activation or shape.family == "generic")


def _fused_head(shape: ModelShape, tokens: int, p: int) -> tuple[int, int, int]:
    """fastpath.linear_cross_entropy: (forward peak, bytes saved for backward, backward peak), all beyond the
    hidden states. Forward keeps grad_h [T,h] and an fp32 grad_w [V,h]; each chunk of rows holds its logits
    (model dtype), their fp32 copy, log-softmax and the two gradients of the cross-entropy."""
    h, v = shape.hidden, shape.vocab
    v_pad = v + (-v) % 64
    rows = max(_fused_chunk_bytes() // (4 * v_pad), 16)
    rows = min(1 << (rows.bit_length() - 1), tokens)
    saved = p * tokens * h + 4 * v_pad * h
    padded_copy = p * v_pad * h if v_pad != v else 0
    # a chunk's logits, fp32 copy, log-softmax, NLL and log-softmax gradients; then its g.T @ h product
    fwd = saved + padded_copy + max(rows * v_pad * (p + 16), rows * v_pad * (2 * p + 4) + p * v_pad * h)
    bwd = saved + 4 * v * h + p * v * h + (4 + 4 + p) * tokens * h  # grad_w*scale (fp32), its cast, grad_h's
    return fwd, saved, bwd


def _stock_lm_head(v: int, tokens: int, p: int, loss_fp32: bool, logits_kept: bool) -> tuple[int, int, int]:
    """The model's own loss over full logits: (forward peak, saved for backward, backward peak) per micro-batch.
    transformers' causal-LM loss upcasts the logits to fp32 and keeps the log-softmax; T5 takes the loss in the
    logits' dtype. `logits_kept`: the 16-bit logits stay referenced (by the model output) while the loss runs."""
    if loss_fp32:
        saved = 4 * v * tokens  # log-softmax output
        fwd = ((p if logits_kept else 0) + 8) * v * tokens if p == 2 else 8 * v * tokens
        fwd = max(fwd, (p + 4) * v * tokens)  # the cast itself: 16-bit and fp32 logits together
        bwd = 12 * v * tokens  # log-softmax + the NLL gradient + log-softmax's gradient
    else:
        saved = p * v * tokens
        fwd = 2 * p * v * tokens
        bwd = 3 * p * v * tokens
    return fwd, saved, bwd


def _gpt2_act(s: ModelShape, b: int, seq: int, p: int, mask: int, ln: int, ckpt: bool, fused: bool,
              fused_gelu: bool) -> ActMem:
    h, heads, v, L, ff = s.hidden, s.heads, s.vocab, s.layers, s.d_ff or 4 * s.hidden
    T = b * seq
    kv_cache = 0 if (fused or ckpt) else 2  # the model's own forward fills a DynamicCache: k, v copies
    gelu = 1 if fused_gelu else 4  # gelu_new as eight ops keeps x, tanh, 1+tanh, 0.5x; the fused kernel x only
    # per token per layer: ln_1 input, c_attn input, qkv, [k, v cache copies], attention output, residual,
    # c_fc input; c_fc output(s) kept by the GELU, c_proj input; two dropout masks; LayerNorm mean/rstd x2;
    # the attention kernel's fp32 logsumexp per head
    layer = p * h * (1 + 1 + 3 + kv_cache + 1 + 1 + 1) + p * ff * (gelu + 1) + 2 * mask * h + 2 * ln + 4 * heads
    embed = mask * h + 8  # dropout mask, token ids
    hidden_in = p * h  # a checkpointed layer keeps its input only
    bwd_transient = p * ff  # the gradient of a layer's MLP input to c_proj
    largest = p * s.largest_param  # one parameter's gradient before DeepSpeed takes it
    tied = p * v * h if s.tied else 0  # the output embedding's gradient waits for the input embedding's
    if fused:
        head_fwd, head_saved, head_bwd = _fused_head(s, T, p)
        head_tok = p * h + ln  # ln_f input
    else:
        head_fwd, head_saved, head_bwd = _stock_lm_head(v, T, p, loss_fp32=True, logits_kept=True)
        head_tok = 2 * p * h + ln + 8  # ln_f input, lm_head input, labels
    base = (hidden_in if ckpt else layer) * L * T + embed * T + head_tok * T
    one_layer = layer * T if ckpt else 0
    return ActMem(saved=base + head_saved,
                  head_peak=base + head_bwd,
                  layer_peak=base - head_tok * T + one_layer + bwd_transient * T + p * h * T + largest + tied,
                  fwd_peak=base + head_fwd,
                  notes="fused loss" if fused else "model loss")


def _t5_act(s: ModelShape, b: int, src: int, tgt: int, p: int, up: int, mask: int, ckpt: bool,
            fused: bool) -> ActMem:
    h, I, F, heads, v = s.hidden, s.inner, s.d_ff, s.heads, s.vocab
    Ts, Tt = b * src, b * tgt
    # T5LayerNorm: its input, the fp32 copy, rsqrt, the normed value; + its output, kept by the next Linear
    norm = 3 * p * h + 4 * h * up + 4
    ffn = norm + 2 * p * F + mask * F + mask * h  # relu output, dropout mask, wo input, dropout mask
    lse = 4 * heads  # the efficient-attention kernel's fp32 logsumexp
    enc = (norm + 4 * p * I + lse + mask * h) + ffn  # q, k, v, attention output
    dec_t = (norm + 4 * p * I + lse + mask * h) + (norm + 2 * p * I + lse + mask * h) + ffn  # self + cross (q, out)
    dec_s = 2 * p * I  # cross-attention k, v over the source, per decoder layer
    once = p * heads * (src * src + tgt * tgt + tgt * src)  # position biases (shared by every layer)
    if not ckpt:
        once += 8 * (src * src + tgt * tgt)  # relative-position buckets (int64), kept by the bias lookup
    embed = (mask * h + 8) * (Ts + Tt)  # dropout masks, ids
    # final norms + dropout; the encoder output (kept by every cross-attention) / the lm_head input (model loss)
    finals = (norm + mask * h) * Ts + (norm + mask * h - (p * h if fused else 0)) * Tt
    if ckpt:
        layers = p * h * (s.layers * Ts + s.dec_layers * Tt)
    else:
        layers = enc * s.layers * Ts + (dec_t * Tt + dec_s * Ts) * s.dec_layers
    if fused:
        head_fwd, head_saved, head_bwd = _fused_head(s, Tt, p)
    else:
        head_fwd, head_saved, head_bwd = _stock_lm_head(v, Tt, p, loss_fp32=False, logits_kept=True)
    base = layers + once + embed + finals
    one_layer = (dec_t * Tt + dec_s * Ts) if ckpt else 0
    tied = p * v * h if s.tied else 0
    return ActMem(saved=base + head_saved,
                  head_peak=base + head_bwd,
                  layer_peak=base + one_layer + p * F * max(Tt, Ts) + p * h * Tt + p * s.largest_param + tied,
                  fwd_peak=base + one_layer + head_fwd,
                  notes="fused loss" if fused else "model loss")


def _mamba_act(s: ModelShape, b: int, seq: int, p: int, up: int, ckpt: bool) -> ActMem:
    """transformers' MambaForCausalLM without the CUDA kernels: the selective scan materialises
    (batch, d_inner, seq, d_state) tensors in fp32 — exp(A*dt), dt*B, and every step's state (kept in fp32 by the
    next step's multiply and in the model dtype by the output matmul). Backward adds, per layer, two full-size
    fp32 gradient accumulators (for exp(A*dt) and dt*B*x, fed slice by slice) plus one slice-gradient buffer."""
    h, v, L, N = s.hidden, s.vocab, s.layers, s.d_state
    E = s.expand * h
    T = b * seq
    EN = E * N
    conv = (seq + s.conv_kernel - 1) / seq
    layer = int(4 * h + 4 + p * h  # RMSNorm: fp32 input copy, rsqrt, normed
                + p * h  # in_proj input
                + p * E * (2 + conv + 6) + 4 * E * up + 4 * E  # x|z, conv out, silu(z), u, dt in/out, x_proj/out_proj in
                + EN * (12 + p * up)  # exp(A dt), dt B, fp32 states, 16-bit states
                + 4 * N + p * (s.dt_rank + 2 * N))  # B in fp32, x_proj output
    per_layer_const = 8 * E * N + 4 * E  # A = -exp(A_log) and D in fp32
    hidden_in = 4 * h  # the fp32 residual stream (residual_in_fp32): a checkpointed layer's input
    head_fwd, head_saved, head_bwd = _stock_lm_head(v, T, p, loss_fp32=True, logits_kept=False)
    head_tok = 4 * h + 4 * h + 4 + p * h + 8 + 8  # norm_f in fp32: input, normed, rsqrt; lm_head input; mask; labels
    if ckpt:  # layer 0's input is the 16-bit embedding output, the others the fp32 residual stream
        base = (p * h + hidden_in * (L - 1)) * T + head_tok * T
    else:
        base = (layer * T + per_layer_const) * L + head_tok * T
    scan_bwd = 12 * EN * T  # two fp32 accumulators + one slice gradient
    scan_fwd = 4 * EN * T  # dt*B*x, alive through the loop
    tied = p * v * h if s.tied else 0
    one_layer = layer * T if ckpt else 0
    return ActMem(saved=base + head_saved,
                  head_peak=base + head_bwd,
                  layer_peak=base + one_layer + scan_bwd + p * s.largest_param + tied,
                  fwd_peak=base + one_layer + scan_fwd + head_fwd,
                  notes="pure-PyTorch scan")


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed: model states (its estimators' convention) and what is live in each phase of a step

def estimator_model_states(n_params: int, largest_layer: int, stage: int, gpus_per_node: int, nodes: int,
                           offload_optimizer: bool, offload_param: bool, zero_init: bool = True,
                           buffer_factor: float = 1.5) -> tuple[int, int]:
    """(per-CPU-node bytes, per-GPU bytes) of params + gradients + optimizer states, the arithmetic of DeepSpeed's
    estimate_zero2/3_model_states_mem_needs (16-bit params, fp32 master + Adam): stage 0/1 extend the stage-2
    formula (no partitioning of gradients at stage 1, nothing partitioned at stage 0)."""
    total = nodes * gpus_per_node
    N = n_params
    if stage == 3:
        live = 4 * largest_layer
        if offload_optimizer:
            gpu = live if offload_param else live + int(2 * N / total)
            per_gpu_cpu = 18 if offload_param else 16
            cpu = N * (per_gpu_cpu / nodes if zero_init else max(4 * gpus_per_node, per_gpu_cpu / nodes)) * buffer_factor
        else:
            gpu = live + int(18 * N / total)
            cpu = (largest_layer if zero_init else N) * 4 * gpus_per_node * buffer_factor
        return int(cpu), int(gpu)
    if offload_optimizer:
        return int(N * max(4 * total, 16) * buffer_factor), int(2 * N)
    cpu = N * 4 * gpus_per_node * buffer_factor
    if stage == 2:
        return int(cpu), int(2 * N + int(18 * N / total))
    if stage == 1:  # gradients whole on every GPU, only optimizer states (and fp32 grad copies) partitioned
        return int(cpu), int(4 * N + int(16 * N / total))
    return int(cpu), int(20 * N)  # stage 0: everything on every GPU (16-bit params+grads, fp32 grads/master/Adam)


@dataclass
class Candidate:
    zero_stage: int
    offload_optimizer: str  # none | cpu | nvme
    offload_param: str  # none | cpu | nvme
    precision: str  # bf16 | fp16 | fp32
    gradient_checkpointing: bool
    micro_batch: int
    # per-GPU bytes: params, grads, optimizer (the model states), activations, buffers, overhead, peak, need
    gpu: dict[str, int] = field(default_factory=dict)
    model_states_bytes: int = 0  # params + grads + optimizer, per GPU (DeepSpeed's estimator convention)
    peak_phase: str = ""  # which phase holds the predicted max_memory_allocated
    phases: dict[str, int] = field(default_factory=dict)
    cpu_bytes_per_node: int = 0
    nvme_bytes_per_node: int = 0
    fits_gpu: bool = False
    fits_cpu: bool = False
    fits: bool = False
    est_step_cost: float = 0.0  # seconds per optimizer step (cost model, relative use only)
    cost_terms: dict[str, float] = field(default_factory=dict)
    tokens_per_step: int = 0  # per GPU
    why_not: str = ""

    @property
    def time_per_token(self) -> float:
        return self.est_step_cost / max(self.tokens_per_step, 1)

    @property
    def offload(self) -> str:
        if self.offload_optimizer == "none":
            return "none"
        return f"optimizer+params->{self.offload_param}" if self.offload_param != "none" else \
            f"optimizer->{self.offload_optimizer}"

    def label(self) -> str:
        parts = [f"ZeRO-{self.zero_stage}", "no offload" if self.offload == "none" else self.offload,
                 self.precision, f"micro-batch {self.micro_batch}"]
        if self.gradient_checkpointing:
            parts.append("activation checkpointing")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["offload"] = self.offload
        d["time_per_token"] = self.time_per_token
        return d


def _bucket(shape: ModelShape, stage: int) -> int:
    return default_reduce_bucket(shape.hidden, stage)  # what dsfleet's generated config asks DeepSpeed for


def gpu_memory(shape: ModelShape, c: Candidate, total_gpus: int, act: ActMem, *, reduce_bucket: int | None = None,
               overlap_comm: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes live on one GPU in each phase of dsfleet's training step — what max_memory_allocated sees — and the
    DeepSpeed buffers among them. Phases: init (the model built on the GPU in fp32, cast, flattened, master copy
    made), forward/backward (from the second step on, when the Adam moments exist), optimizer step."""
    N, g = shape.n_params, total_gpus
    p = 2 if c.precision in ("bf16", "fp16") else 4
    part = math.ceil(N / g)
    fp32_copy = 4 if p == 2 else 0  # a separate fp32 tensor only when the model is 16-bit
    bucket = reduce_bucket or _bucket(shape, c.zero_stage)
    buckets = (2 if overlap_comm else 1) * p * bucket  # overlap_comm double-buffers the bucket
    act_head, act_layer, act_fwd = act.head_peak, act.layer_peak, act.fwd_peak
    ph: dict[str, int] = {}
    buf: dict[str, int] = {"init": 0}
    cast = 4 * N + (2 * shape.largest_param if p == 2 else 0)  # fp32 build on the GPU, then cast param by param
    if c.zero_stage in (0, 1, 2) and c.offload_optimizer != "none":
        # the GPU keeps the 16-bit params; fp32 master, grads and Adam live on the host
        resident = p * N
        ph["init"] = max(cast, p * N + p * part)  # flat buffer, then the master copy leaves through a 16-bit clone
        buf["forward/backward"] = buckets + (p + 4) * shape.largest_param  # + the grad staging buffer, fp32 copy
        ph["forward/backward"] = resident + max(act_head, act_layer + buf["forward/backward"], act_fwd)
        buf["optimizer step"] = 0
        ph["optimizer step"] = resident
    elif c.zero_stage == 0:
        resident = p * N + fp32_copy * N + 8 * N  # 16-bit params, fp32 master, Adam
        ph["init"] = max(cast, p * N + p * N + fp32_copy * N)
        buf["forward/backward"] = 0
        ph["forward/backward"] = resident + max(act_head, act_layer + p * N // 2, act_fwd, p * N)
        buf["optimizer step"] = (4 + 4) * N if p == 2 else 4 * N  # per-param fp32 grads, then their flat copy
        ph["optimizer step"] = resident + p * N + buf["optimizer step"]
    elif c.zero_stage in (1, 2):
        grads = p * part if (c.zero_stage == 2 or g == 1) else p * N  # stage 1: every gradient, unless one GPU
        resident = p * N + 4 * part + 8 * part  # 16-bit params, fp32 master partition, Adam partition
        # flat copy of the params; master copy made through a 16-bit clone; a zero fp32 gradient at init
        ph["init"] = max(cast, 2 * p * N, p * N + p * part + 4 * part, p * N + 8 * part)
        buf["forward/backward"] = buckets
        ph["forward/backward"] = resident + max(act_head, act_layer + grads + buckets, act_fwd)
        buf["optimizer step"] = p * part  # the flat 16-bit copy of the gradient partition, as it becomes fp32
        ph["optimizer step"] = resident + grads + buf["optimizer step"] + fp32_copy * part
    else:
        sub = min(part, SUB_GROUP_SIZE + shape.largest_param)  # the optimizer steps one sub-group at a time
        if c.offload_param != "none":
            resident = p * bucket
        elif c.offload_optimizer != "none":
            resident = p * part + p * bucket
        else:  # 16-bit partition, its gradient buffer, fp32 master, Adam, the reduce bucket
            resident = p * part + p * part + 4 * part + 8 * part + p * bucket
        ph["init"] = resident - (8 * part if c.offload_optimizer == "none" else 0) + p * sub  # Adam comes later
        # gathered parameters: kept between their forward and backward use (stage3_max_reuse_distance) + the
        # module being computed — none on one GPU with the params there (a gather is a view of the partition);
        # + one full gradient before it is reduce-scattered
        gathered = 0 if (g == 1 and c.offload_param == "none") else \
            p * min(N, MAX_REUSE_DISTANCE // 2) + p * shape.largest_layer
        buf["forward/backward"] = gathered + p * shape.largest_param + p * bucket
        ph["forward/backward"] = resident + max(act_head, act_layer, act_fwd) + buf["forward/backward"] - p * bucket
        buf["optimizer step"] = (p + fp32_copy) * sub if c.offload_optimizer == "none" else 0
        ph["optimizer step"] = resident + buf["optimizer step"]
    return ph, buf


def offload_host_bytes(shape: ModelShape, c: Candidate, gpus_per_node: int, nodes: int) -> tuple[int, int]:
    """(CPU bytes per node, NVMe bytes per node). CPU offload: DeepSpeed's estimate (x1.5 buffer factor);
    NVMe: swap buffers on the host (four fp32 sub-groups per GPU), states on the disk."""
    N, g = shape.n_params, gpus_per_node * nodes
    part = math.ceil(N / g)
    if c.offload_optimizer == "nvme":
        host = gpus_per_node * 4 * 4 * min(part, SUB_GROUP_SIZE)
        disk = gpus_per_node * (16 * part + (2 * part if c.offload_param == "nvme" else 0))
        if c.offload_param == "cpu":
            host += gpus_per_node * 2 * part
        return host, disk
    cpu, _ = estimator_model_states(N, shape.largest_layer, c.zero_stage, gpus_per_node, nodes,
                                    c.offload_optimizer == "cpu", c.offload_param == "cpu")
    return cpu, 0


# ---------------------------------------------------------------------------------------------------------
# The cost model (seconds per optimizer step; only its ratios are used)

def step_cost(shape: ModelShape, c: Candidate, gpus_per_node: int, nodes: int, tokens_per_sample: int,
              flops_tokens_per_sample: float, grad_accum: int = 1) -> dict[str, float]:
    """compute = 6 N x tokens (x4/3 recomputed with checkpointing) / achieved FLOP/s x efficiency(tokens);
    communication = 16-bit parameter bytes moved per step (ZeRO 0-2: 2x, once per step for 0/1 and per
    micro-step reduce for 2; ZeRO-3: 3x per micro-step plus its fetch hooks) over the link bandwidth;
    offload = PCIe bytes + CPU Adam time, or NVMe bytes. No overlap assumed."""
    g = gpus_per_node * nodes
    N = shape.n_params
    tokens = c.micro_batch * tokens_per_sample * grad_accum
    flops = 6 * N * c.micro_batch * flops_tokens_per_sample * grad_accum * (4 / 3 if c.gradient_checkpointing else 1)
    eff = (c.micro_batch * tokens_per_sample) / (c.micro_batch * tokens_per_sample + EFF_HALF_TOKENS)
    compute = flops / (ACHIEVED_FLOPS[c.precision] * eff)
    p16 = (2 if c.precision != "fp32" else 4) * N
    link = LINK_BW_INTER if nodes > 1 else LINK_BW_INTRA
    ring = (g - 1) / g
    if c.zero_stage in (0, 1):
        comm = 2 * p16 * ring / link
    elif c.zero_stage == 2:
        comm = (grad_accum + 1) * p16 * ring / link
    else:
        comm = 3 * p16 * grad_accum * (ring / link + 1 / ZERO3_FETCH_BW)
    part = N / g
    offload = 0.0
    if c.offload_optimizer == "cpu":
        offload += (4 + 2) * part / PCIE_BW + part / CPU_ADAM_PARAMS_PER_S  # fp32 grads out, 16-bit params back
    elif c.offload_optimizer == "nvme":
        offload += (4 + 2) * part / PCIE_BW + part / CPU_ADAM_PARAMS_PER_S + 2 * 16 * part / NVME_BW
    if c.offload_param == "cpu":
        offload += 2 * 2 * part * grad_accum / PCIE_BW  # partitions fetched for forward and backward
    elif c.offload_param == "nvme":
        offload += 2 * 2 * part * grad_accum / NVME_BW
    return {"compute": compute, "communication": comm, "offload": offload, "tokens": tokens}


# ---------------------------------------------------------------------------------------------------------
# Planning

@dataclass
class Plan:
    model: str
    n_params: int
    largest_layer: int
    family: str
    gpus_per_node: int
    nodes: int
    gpu_mem_bytes: int
    cpu_mem_bytes: int
    seq_len: int
    tgt_len: int
    fused_loss: bool
    candidates: list[Candidate]
    best: Candidate | None
    reason: str
    impossible: bool = False

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "family": self.family, "n_params": self.n_params, "largest_layer": self.largest_layer,
            "gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "gpu_mem_bytes": self.gpu_mem_bytes,
            "cpu_mem_bytes": self.cpu_mem_bytes, "seq_len": self.seq_len, "tgt_len": self.tgt_len,
            "fused_loss": self.fused_loss, "best": self.best.to_json() if self.best else None, "reason": self.reason,
            "impossible": self.impossible, "candidates": [c.to_json() for c in self.candidates],
        }


def _resolve_shape(params, preset, seq_len) -> ModelShape:
    if preset:
        return model_shape(preset)
    if params is None:
        from dsfleet.cli import fail
        fail("no model given — pass --preset NAME or --params N (e.g. 6.9B)")
    n = parse_count(params)
    if n <= 0:
        from dsfleet.cli import fail
        fail(f"--params {params} is not a positive parameter count — write it like 6.9e9, 6.9B or 350M")
    return generic_shape(n, seq_len)


def evaluate(shape: ModelShape, *, zero_stage: int, offload_optimizer: str = "none", offload_param: str = "none",
             precision: str = "bf16", gradient_checkpointing: bool = False, micro_batch: int = 1, gpus: int = 1,
             nodes: int = 1, gpu_mem_bytes: int = DEFAULT_GPU_MEM, cpu_mem_bytes: int = DEFAULT_CPU_MEM,
             seq_len: int | None = None, tgt_len: int | None = None, fused_loss: bool = True,
             fused_activation: bool = True, grad_accum: int = 1) -> Candidate:
    """One candidate, fully costed: the memory phases, the fit on GPU and host, and the step cost."""
    c = Candidate(zero_stage, offload_optimizer, offload_param, precision, gradient_checkpointing, micro_batch)
    total = gpus * nodes
    seq = seq_len or shape.seq_len
    tgt = (tgt_len or shape.tgt_len or seq) if shape.family == "t5" else 0
    act = activation_memory(shape, micro_batch, seq, tgt, precision, gradient_checkpointing, fused_loss=fused_loss,
                            fused_activation=fused_activation, zero_stage=zero_stage)
    phases, buffers = gpu_memory(shape, c, total, act, overlap_comm=default_overlap_comm(zero_stage, total, False))
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    _, states = estimator_model_states(shape.n_params, shape.largest_layer, zero_stage, gpus, nodes,
                                       offload_optimizer != "none", offload_param != "none")
    if precision == "fp32":  # no 16-bit copies: fp32 params and grads, Adam moments; the estimators assume 16-bit
        states = _fp32_states(shape, c, total)
    params_b, optim_b = _split_states(shape, c, total, states)
    overhead = CONTEXT_BYTES + int(FRAGMENTATION * peak)
    c.gpu = {"params": params_b, "grads": states - params_b - optim_b, "optimizer": optim_b,
             "activations": act.peak, "buffers": buffers.get(peak_phase, 0), "overhead": overhead, "peak": peak,
             "need": peak + overhead}
    c.model_states_bytes = states
    c.peak_phase, c.phases = peak_phase, phases
    c.cpu_bytes_per_node, c.nvme_bytes_per_node = offload_host_bytes(shape, c, gpus, nodes)
    c.fits_gpu = c.gpu["need"] <= gpu_mem_bytes
    host_side = c.offload_optimizer != "none" or c.offload_param != "none"
    c.fits_cpu = not host_side or c.cpu_bytes_per_node <= cpu_mem_bytes
    c.fits = c.fits_gpu and c.fits_cpu
    if not c.fits_gpu:
        c.why_not = f"needs {_gib(c.gpu['need'])} GiB/GPU > {_gib(gpu_mem_bytes)}"
    elif not c.fits_cpu:
        c.why_not = f"needs {_gib(c.cpu_bytes_per_node)} GiB CPU/node > {_gib(cpu_mem_bytes)}"
    tokens_per_sample = seq + tgt
    flops_tokens = (seq + tgt) / 2 if shape.family == "t5" else seq  # half the params see each T5 token
    terms = step_cost(shape, c, gpus, nodes, tokens_per_sample, flops_tokens, grad_accum)
    c.tokens_per_step = int(terms.pop("tokens"))
    c.cost_terms = terms
    c.est_step_cost = sum(terms.values())
    return c


def _fp32_states(shape: ModelShape, c: Candidate, g: int) -> int:
    N, part = shape.n_params, math.ceil(shape.n_params / g)
    if c.zero_stage == 3:
        return 4 * shape.largest_layer + (0 if c.offload_param != "none" else 4 * part) + \
            (0 if c.offload_optimizer != "none" else 16 * part)
    if c.offload_optimizer != "none":
        return 4 * N
    if c.zero_stage == 0:
        return 16 * N
    return 4 * N + (4 * N if c.zero_stage == 1 and g > 1 else 0) + 16 * part


def _split_states(shape: ModelShape, c: Candidate, g: int, states: int) -> tuple[int, int]:
    """(params, optimizer) shares of the model states; grads are the rest. params: the 16-bit weights on the GPU
    (at ZeRO-3 the partition plus DeepSpeed's 4 x largest-layer allowance for gathered ones); optimizer: fp32
    master + Adam moments (12 bytes/param of the partition) when they are on the GPU."""
    N, part = shape.n_params, math.ceil(shape.n_params / g)
    p = 2 if c.precision != "fp32" else 4
    on_gpu_optim = c.offload_optimizer == "none"
    if c.zero_stage == 3:
        params = 4 * shape.largest_layer + (p * part if c.offload_param == "none" else 0)
    else:
        params = p * N
    optim = (12 * (N if c.zero_stage == 0 else part)) if on_gpu_optim else 0
    params = min(params, states)
    return params, min(optim, states - params)


def candidate_space(stages=None, offloads=None, precisions=None, checkpointing=None, micro_batches=None):
    for stage, opt, par in OFFLOADS:
        if stages is not None and stage not in stages:
            continue
        if offloads is not None and (opt, par) not in offloads:
            continue
        for prec in precisions or PRECISIONS:
            for ckpt in ((False, True) if checkpointing is None else (checkpointing,)):
                for mb in micro_batches or MICRO_BATCHES:
                    yield stage, opt, par, prec, ckpt, mb


_OFFLOAD_RANK = {"none": 0, "cpu": 1, "nvme": 2}


_STAGE_PREFERENCE = {2: 0, 1: 1, 0: 2, 3: 3}  # same traffic for 0/1/2: the one that partitions most first


def _pick_best(fitting: list[Candidate]) -> Candidate | None:
    """The lowest est. time per token. Within 0.5% of it (ties): no offload, bf16, no recompute, then ZeRO-2 > 1 >
    0 > 3 (0-2 move the same bytes; 2 keeps the least state), then the most headroom."""
    if not fitting:
        return None
    fastest = min(c.time_per_token for c in fitting)
    near = [c for c in fitting if c.time_per_token <= fastest * 1.005]
    return min(near, key=lambda c: (_OFFLOAD_RANK[c.offload_optimizer], _OFFLOAD_RANK[c.offload_param],
                                    PRECISIONS.index(c.precision), c.gradient_checkpointing,
                                    _STAGE_PREFERENCE[c.zero_stage], c.gpu["need"]))


def plan(*, params=None, preset: str | None = None, shape: ModelShape | None = None, gpus: int, nodes: int = 1,
         gpu_mem_bytes: int = DEFAULT_GPU_MEM,
         cpu_mem_bytes: int = DEFAULT_CPU_MEM, micro_batch: int | None = None, seq_len: int | None = None,
         tgt_len: int | None = None, precision: str | None = None, gradient_checkpointing: bool | None = None,
         zero_stages: Iterable[int] | None = None, fused_loss: bool = True, fused_activation: bool = True,
         grad_accum: int = 1) -> Plan:
    """Every candidate (ZeRO 0-3 x offload x precision x checkpointing x micro-batch) for this model on this
    hardware, the fastest fitting one as `best`, and a one-line `reason` (or what would fit, if nothing does)."""
    from dsfleet.cli import fail
    if gpus < 1 or nodes < 1:
        fail(f"--gpus {gpus} --nodes {nodes}: both must be >= 1 — pass the GPUs per node and the node count, "
             "e.g. --gpus 8 --nodes 2")
    if precision is not None and precision not in PRECISIONS:
        fail(f"unknown precision {precision!r} — use one of {', '.join(PRECISIONS)}")
    if micro_batch is not None and micro_batch < 1:
        fail(f"--micro-batch {micro_batch} must be >= 1 — pass a positive micro-batch, or leave it out to try 1..64")
    shape = shape or _resolve_shape(params, preset, seq_len)
    seq = seq_len or shape.seq_len
    tgt = (tgt_len or shape.tgt_len or seq) if shape.family == "t5" else 0
    kw = dict(gpus=gpus, nodes=nodes, gpu_mem_bytes=gpu_mem_bytes, cpu_mem_bytes=cpu_mem_bytes, seq_len=seq,
              tgt_len=tgt or None, fused_loss=fused_loss, fused_activation=fused_activation, grad_accum=grad_accum)
    cands = [evaluate(shape, zero_stage=s, offload_optimizer=o, offload_param=q, precision=pr,
                      gradient_checkpointing=ck, micro_batch=mb, **kw)
             for s, o, q, pr, ck, mb in candidate_space(
                 stages=set(zero_stages) if zero_stages is not None else None,
                 precisions=(precision,) if precision else None, checkpointing=gradient_checkpointing,
                 micro_batches=(micro_batch,) if micro_batch else None)]
    fitting = [c for c in cands if c.fits]
    best = _pick_best(fitting)
    result = Plan(shape.name, shape.n_params, shape.largest_layer, shape.family, gpus, nodes, gpu_mem_bytes,
                  cpu_mem_bytes, seq, tgt, fused_loss, cands, best, "")
    result.reason = _reason(result, fitting) if best else what_would_fit(result, shape, kw, precision, micro_batch)
    result.impossible = best is None
    return result


def _kind(c: Candidate) -> str:
    return f"ZeRO-{c.zero_stage}" if c.offload == "none" else ("NVMe offload" if "nvme" in c.offload else
                                                                 "CPU offload")


def _reason(pl: Plan, fitting: list[Candidate]) -> str:
    """One line: the choice, its memory, and what the cost model says about the alternatives."""
    b = pl.best
    t = b.cost_terms
    line = (f"{b.label()}: the fastest that fits ({_gib(b.gpu['need'])} of {_gib(pl.gpu_mem_bytes)} GiB/GPU; est. "
            f"{t['compute']:.3g}s compute + {t['communication']:.3g}s communication + {t['offload']:.3g}s offload "
            f"per step)")
    best_of: dict[str, Candidate] = {}
    for c in fitting:
        k = _kind(c)
        if k != _kind(b) and (k not in best_of or c.time_per_token < best_of[k].time_per_token):
            best_of[k] = c
    ties = sorted(k for k, c in best_of.items() if c.time_per_token <= b.time_per_token * 1.005)
    slower = sorted(((c.time_per_token / b.time_per_token, k) for k, c in best_of.items() if k not in ties))
    if ties:
        line += f"; {'/'.join(ties)} move as many bytes but keep more state"
    if slower:
        line += "; " + ", ".join(f"{k} {r:.2f}x" for r, k in slower) + " slower per token"
    return line


def what_would_fit(pl: Plan, shape: ModelShape, kw: dict, precision: str | None, micro_batch: int | None) -> str:
    """The one line for an impossible request: more GPUs (ZeRO-3), CPU offload with how much RAM, NVMe — or, when
    the activations alone overflow the GPU, the sequence length at which something fits."""
    prec = precision or "bf16"
    mb = micro_batch or 1
    base = dict(kw, precision=prec, micro_batch=mb, gradient_checkpointing=True)
    size = _gib(pl.gpu_mem_bytes)
    head = (f"{pl.model} fits no ZeRO stage, offload or micro-batch on {pl.total_gpus} x {size} GiB GPU(s) with "
            f"{_gib(pl.cpu_mem_bytes)} GiB CPU/node")
    options = []
    gpn = pl.gpus_per_node
    for total in _growing(pl.total_gpus):
        per_node = min(gpn, total)
        nodes = math.ceil(total / per_node)
        if evaluate(shape, zero_stage=3, **dict(base, gpus=per_node, nodes=nodes)).fits:
            options.append(f">= {nodes * per_node} GPUs of {size} GiB with ZeRO-3")
            break
    for opt, par in (("cpu", "none"), ("cpu", "cpu")):
        c = evaluate(shape, zero_stage=3, offload_optimizer=opt, offload_param=par, **base)
        if c.fits_gpu:
            what = "optimizer" if par == "none" else "optimizer+param"
            options.append(f"ZeRO-3 {what} offload with >= {math.ceil(c.cpu_bytes_per_node / GiB)} GiB CPU RAM/node")
            break
    c = evaluate(shape, zero_stage=3, offload_optimizer="nvme", offload_param="nvme", **base)
    if c.fits_gpu and c.fits_cpu:
        options.append(f"NVMe offload (ZeRO-Infinity, >= {math.ceil(c.nvme_bytes_per_node / GiB)} GiB NVMe/node)")
    if options:
        return f"{head} — it needs " + ", or ".join(options)
    act = activation_memory(shape, mb, pl.seq_len, pl.tgt_len or None, prec, True, zero_stage=3)
    line = (f"{head} — at {pl.seq_len} tokens the activations alone need {_gib(act.peak)} GiB/GPU (micro-batch {mb}, "
            f"checkpointing)")
    seq = pl.seq_len // 2
    while seq >= 64:
        shorter = dict(kw, seq_len=seq, tgt_len=(min(pl.tgt_len, seq) if pl.tgt_len else None))
        fits = [evaluate(shape, zero_stage=z, offload_optimizer=o, offload_param=q, precision=prec, micro_batch=mb,
                         gradient_checkpointing=True, **shorter) for z, o, q in OFFLOADS]
        fits = [f for f in fits if f.fits]
        if fits:
            best = _pick_best(fits)
            return f"{line}; at --seq-len {seq} it fits with {best.label()}"
        seq //= 2
    return f"{line}: use GPUs with more memory"


def _growing(start: int):
    n = max(start + 1, 2)
    while n <= 4096:
        yield n
        n = n + 1 if n < 8 else n * 2 if n < 64 else n + 64


# ---------------------------------------------------------------------------------------------------------
# The API the training entry point calls

def choose_for_spec(spec_like, world_size: int, gpu_mem_bytes: int, cpu_mem_bytes: int) -> Candidate | None:
    """`zero: auto`: the fastest fitting ZeRO stage / offload / checkpointing for the spec's model, micro-batch,
    precision and lengths (the spec's micro-batch is kept; checkpointing is only ever switched on)."""
    pl = plan_for_spec(spec_like, world_size, gpu_mem_bytes, cpu_mem_bytes)
    return None if pl is None else pl.best


def plan_for_spec(spec_like, world_size: int, gpu_mem_bytes: int, cpu_mem_bytes: int) -> Plan | None:
    """The plan for exactly what a run spec trains: its model (preset or model dir), micro-batch, lengths,
    precision, fused-path flags and accumulation, on `world_size` ranks; None when the model cannot be read."""
    shape = shape_for_spec(spec_like)
    if shape is None:
        return None
    bf16, fp16 = bool(getattr(spec_like, "bf16", False)), bool(getattr(spec_like, "fp16", False))
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    if shape.family == "t5":
        seq, tgt = getattr(spec_like, "max_source_length", None), getattr(spec_like, "max_target_length", None)
    else:
        seq, tgt = getattr(spec_like, "block_size", None), None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    gpus = max(1, min(local, world_size))
    nodes = max(1, math.ceil(world_size / gpus))
    pl = plan(shape=shape, gpus=gpus, nodes=nodes, gpu_mem_bytes=gpu_mem_bytes, cpu_mem_bytes=cpu_mem_bytes,
              micro_batch=int(getattr(spec_like, "per_device_train_batch_size", 1) or 1), seq_len=seq, tgt_len=tgt,
              precision=precision, gradient_checkpointing=True if getattr(spec_like, "gradient_checkpointing", False)
              else None, fused_loss=bool(getattr(spec_like, "fused_loss", True)),
              fused_activation=bool(getattr(spec_like, "fused_activation", True)),
              grad_accum=int(getattr(spec_like, "gradient_accumulation_steps", 1) or 1))
    return pl


def _count_text(n: int) -> str:
    """6.923B, 124.4M, 96.3K: parameter counts readable at every scale (tiny CPU presets included)."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{3 if unit == 'B' else 1}f}{unit}"
    return str(n)


def check_heavier_stage(plan: Plan, user_stage: int) -> str | None:
    """A warning when the user's ds_config uses a heavier ZeRO stage than the fastest fitting candidate, and the
    lighter one is meaningfully (>= 10%) faster by the cost model; None otherwise."""
    best = plan.best
    if best is None or user_stage <= best.zero_stage:
        return None
    same = [c for c in plan.candidates if c.fits and c.zero_stage == user_stage]
    if not same:
        return None
    theirs = min(same, key=lambda c: c.time_per_token)
    speedup = theirs.time_per_token / best.time_per_token
    if speedup < 1.10:
        return None
    return (f"ZeRO-{user_stage} is heavier than this run needs: {best.label()} fits "
            f"({_gib(best.gpu['need'])} of {_gib(plan.gpu_mem_bytes)} GiB/GPU) and is est. {speedup:.1f}x faster per "
            f"token — use --zero {best.zero_stage} (or --zero auto)")


# ---------------------------------------------------------------------------------------------------------
# Output

def summary_rows(pl: Plan, precision: str | None = None) -> list[Candidate]:
    """One row per (stage, offload, checkpointing) at one precision: its largest fitting micro-batch, or its
    smallest micro-batch when none fits."""
    prec = precision or (pl.best.precision if pl.best else "bf16")
    rows = []
    keys = []
    for c in pl.candidates:
        k = (c.zero_stage, c.offload_optimizer, c.offload_param, c.gradient_checkpointing)
        if c.precision == prec and k not in keys:
            keys.append(k)
    for k in keys:
        group = [c for c in pl.candidates if c.precision == prec and
                 (c.zero_stage, c.offload_optimizer, c.offload_param, c.gradient_checkpointing) == k]
        fit = [c for c in group if c.fits]
        rows.append(max(fit, key=lambda c: c.micro_batch) if fit else min(group, key=lambda c: c.micro_batch))
    return rows


def format_plan(plan: Plan, show_all: bool = False) -> str:
    """The human table: GiB per GPU, CPU GiB per node, fit, and the cost relative to the best."""
    pl = plan
    head = (f"{pl.model}: {_count_text(pl.n_params)} params (largest layer {_count_text(pl.largest_layer)}), "
            f"{pl.nodes} node(s) x {pl.gpus_per_node} GPU(s) of {_gib(pl.gpu_mem_bytes)} GiB, "
            f"{_gib(pl.cpu_mem_bytes)} GiB CPU/node, "
            + (f"source {pl.seq_len} / target {pl.tgt_len} tokens" if pl.family == "t5" else f"{pl.seq_len} tokens")
            + ("" if pl.family != "generic" else " (GPT-like dims assumed for --params)"))
    legend = ("GiB per GPU: states = params+grads+optimizer (DeepSpeed's estimate), act = activations, buf = DeepSpeed "
              "buffers, ovh = CUDA context/NCCL/fragmentation;\n  peak = predicted torch.cuda.max_memory_allocated "
              "(the largest phase of a step, not the sum), need = peak + ovh; cost = est. time per token / best")
    rows = pl.candidates if show_all else summary_rows(pl)
    ref = pl.best.time_per_token if pl.best else None
    cols = ["ZeRO", "offload", "prec", "ckpt", "mb", "params", "grads", "optim", "act", "buf", "ovh", "peak",
            "need", "CPU/node", "fits", "cost"]
    table = [cols]
    for c in rows:
        g = c.gpu
        table.append([str(c.zero_stage), c.offload, c.precision, "on" if c.gradient_checkpointing else "-",
                      str(c.micro_batch), _gib(g["params"]), _gib(g["grads"]), _gib(g["optimizer"]),
                      _gib(g["activations"]), _gib(g["buffers"]), _gib(g["overhead"]), _gib(g["peak"]),
                      _gib(g["need"]), _gib(c.cpu_bytes_per_node) + ("" if not c.nvme_bytes_per_node else
                                                                      f" +{_gib(c.nvme_bytes_per_node)}nvme"),
                      "yes" if c.fits else "no", f"{c.time_per_token / ref:.2f}x" if (ref and c.fits) else "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = [head, legend, ""]
    for i, r in enumerate(table):
        lines.append("  ".join(v.rjust(w) if i and j >= 4 else v.ljust(w) for j, (v, w) in enumerate(zip(r, widths))))
    lines.append("")
    lines.append(("best: " if pl.best else "no fit: ") + pl.reason)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# `dsfleet plan`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", help="a dsfleet preset (t5_3b, gpt2_xl, mamba_7b, ...)")
    model.add_argument("--params", help="a parameter count instead (6.9e9, 6.9B): a GPT-like decoder is assumed")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU (default 80GiB; 24GB, 40GiB ...)")
    parser.add_argument("--cpu-mem", default="512GiB", help="CPU memory per node (default 512GiB)")
    parser.add_argument("--micro-batch", type=int, help="only this micro-batch per GPU (default: try 1..64)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (T5: source length; default: the preset's)")
    parser.add_argument("--tgt-len", type=int, help="T5 target length (default: the preset's)")
    parser.add_argument("--precision", choices=PRECISIONS, help="only this precision (default: all three)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (cost model)")
    parser.add_argument("--no-fused-loss", action="store_true", help="plan for the model's own loss (--fused_loss false)")
    parser.add_argument("--all", action="store_true", help="list every candidate, not the best micro-batch of each")
    parser.add_argument("--json", action="store_true", help="machine-readable: every candidate, bytes as integers")


def run(args) -> int:
    from dsfleet.cli import fail
    if not args.preset and not args.params:
        fail("no model given — pass --preset NAME or --params N (e.g. 6.9B)")
    pl = plan(params=args.params, preset=args.preset, gpus=args.gpus, nodes=args.nodes,
              gpu_mem_bytes=parse_size(args.gpu_mem), cpu_mem_bytes=parse_size(args.cpu_mem),
              micro_batch=args.micro_batch, seq_len=args.seq_len, tgt_len=args.tgt_len, precision=args.precision,
              fused_loss=not args.no_fused_loss, grad_accum=args.grad_accum)
    if args.json:
        print(json.dumps(pl.to_json(), indent=1))
    elif pl.best is not None or args.all:
        print(format_plan(pl, show_all=args.all))
    if pl.best is None:
        fail(pl.reason)  # one line: what would fit; exit 2
    return 0
