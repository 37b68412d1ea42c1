"""Activation memory: the bytes autograd keeps for one micro-batch of dsfleet's training step, per model family.

Why this exists: after the model states, activations decide whether a micro-batch fits. They are counted here
tensor by tensor for the preset families (T5, GPT-2, Mamba with either scan) — every other architecture is
measured by tracing its own code (planner/measured.py) — with and
without activation checkpointing and dsfleet's fast path; whether the fused loss is used, and how it chunks its
logits, is read from dsfleet.fastpath itself (the code that runs). docs/planner.md lists every term;
tests/test_planner.py checks each formula against autograd on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsfleet.planner.shape import ModelShape

DEVICE_KERNELS = {  # what differs between the CUDA kernels and the CPU ones (the tests measure on CPU)
    "cuda": {"dropout_mask": 1, "ln_stats": 8},  # bool dropout masks; fp32 mean+rstd per LayerNorm row
    "cpu": {"dropout_mask": None, "ln_stats": None},  # CPU: mask and stats in the input dtype
}


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


def activation_memory(shape: ModelShape, micro_batch: int, seq_len: int, tgt_len: int | None = None,
                      precision: str = "bf16", checkpointing: bool = False, *, fused_loss: bool = True,
                      fused_activation: bool = True, zero_stage: int = 2, device: str = "cuda") -> ActMem:
    """Activation memory of dsfleet's training step. `fused_loss`/`fused_activation` are the RunSpec fast-path
    switches (the fused loss is counted where fastpath.fused_loss_skip_reason allows it, the rule fastpath.apply
    follows). `device="cpu"` gives the CPU kernels' numbers, which the tests measure."""
    if shape.measured:  # an architecture without a formula: its own code traced (planner/measured.py)
        from dsfleet.planner.measured import measured_activations
        return measured_activations(shape, micro_batch, seq_len, tgt_len or shape.tgt_len or seq_len, precision,
                                    checkpointing, fused_loss, fused_activation, zero_stage)
    p = 2 if precision in ("bf16", "fp16") else 4
    up = 1 if p == 2 else 0  # an fp32 upcast is a separate tensor only for 16-bit models
    kern = DEVICE_KERNELS[device]
    mask = (kern["dropout_mask"] or p) if shape.dropout > 0 else 0
    ln_stats = kern["ln_stats"] or 2 * p
    from dsfleet.fastpath import fused_loss_skip_reason  # lazily: dsfleet.planner imports without torch
    loss_family = "gpt2" if shape.family == "generic" else shape.family  # a --params model is GPT-like
    fused = fused_loss and fused_loss_skip_reason(loss_family, zero_stage) is None
    if shape.family == "t5":
        return _t5_act(shape, micro_batch, seq_len, tgt_len or shape.tgt_len or seq_len, p, up, mask, checkpointing,
                       fused)
    if shape.family == "mamba":
        if shape.mamba_kernels:
            return _mamba_kernel_act(shape, micro_batch, seq_len, p, checkpointing)
        return _mamba_act(shape, micro_batch, seq_len, p, up, checkpointing)
    return _gpt2_act(shape, micro_batch, seq_len, p, mask, ln_stats, checkpointing, fused,
                     fused_activation or shape.family == "generic")


def _fused_head(shape: ModelShape, tokens: int, p: int) -> tuple[int, int, int]:
    """fastpath.linear_cross_entropy: (forward peak, bytes saved for backward, backward peak), all beyond the
    hidden states. Forward keeps grad_h [T,h] and an fp32 grad_w [V,h]; each chunk of rows holds its logits
    (model dtype), their fp32 copy, log-softmax and the two gradients of the cross-entropy."""
    from dsfleet.fastpath import chunk_rows, padded_vocab
    h, v = shape.hidden, shape.vocab
    v_pad = padded_vocab(v)
    rows = min(chunk_rows(v_pad), tokens)
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
    h, N = s.hidden, s.d_state
    E = s.expand * h
    T = b * seq
    EN = E * N
    conv = (seq + s.conv_kernel - 1) / seq
    layer = int(4 * h + 4 + p * h  # RMSNorm: fp32 input copy, rsqrt, normed
                + p * h  # in_proj input
                + p * E * (2 + conv + 6) + 4 * E * up + 4 * E  # x|z, conv out, silu(z), u, dt in/out, x_proj/out_proj in
                + EN * (12 + p * up)  # exp(A dt), dt B, fp32 states, 16-bit states
                + 4 * N + p * (s.dt_rank + 2 * N))  # B in fp32, x_proj output
    scan_bwd = 12 * EN * T  # two fp32 accumulators + one slice gradient
    scan_fwd = 4 * EN * T  # dt*B*x, alive through the loop
    return _mamba_stack(s, T, p, layer, ckpt, scan_fwd, scan_bwd, "pure-PyTorch scan")


MAMBA_SCAN_CHUNK = 2048  # mamba_ssm's selective scan keeps its fp32 state at every 2048-token chunk boundary


def _mamba_kernel_act(s: ModelShape, b: int, seq: int, p: int, ckpt: bool) -> ActMem:
    """MambaForCausalLM on mamba_ssm's fused path (mamba_inner_fn, as transformers calls it when the kernels are
    installed): no (d_inner x d_state) tensor per token. A layer keeps its RMSNorm's fp32 input copy, rsqrt and
    output (= in_proj's input) and what mamba_inner_fn saves at its default checkpoint_lvl 1 — x|z, x_proj's output,
    B and C as contiguous copies, the scan output, the scan's fp32 chunk states; the conv output and delta are
    recomputed in its backward, which then holds them with dx|dz, their gradients and the gated output and its
    gradient, all (batch, d_inner, seq) in the model dtype (+ fp32 dB, dC). Checked against the H200 peaks of
    docs/benchmarks.md (tests/test_planner.py)."""
    h, N = s.hidden, s.d_state
    E = s.expand * h
    T = b * seq
    chunks = -(-seq // MAMBA_SCAN_CHUNK)
    layer = int(4 * h + 4 + 2 * p * h  # RMSNorm: fp32 input copy, rsqrt, normed = in_proj's input
                + p * (2 * E + E) + p * (s.dt_rank + 2 * N) + p * 2 * N  # x|z, the scan output; x_dbl; B, C
                + 4 * E * 2 * N * chunks / seq)  # the scan's fp32 states at chunk boundaries, per token
    scan_bwd = (p * 8 * E + 8 * N) * T  # conv out, delta (recomputed), dx|dz, dconv, ddelta, gated out + grad; dB, dC
    scan_fwd = p * E * T  # the gated output, before out_proj
    return _mamba_stack(s, T, p, layer, ckpt, scan_fwd, scan_bwd, "mamba_ssm kernels")


def _mamba_stack(s: ModelShape, T: int, p: int, layer: int, ckpt: bool, scan_fwd: int, scan_bwd: int,
                 notes: str) -> ActMem:
    """A Mamba's phases from one layer's kept bytes per token and its scan's transients (either scan): the layers
    (or, checkpointed, their inputs), the final norm and the model's own fp32 loss over full logits."""
    h, v, L, N, E = s.hidden, s.vocab, s.layers, s.d_state, s.expand * s.hidden
    per_layer_const = 8 * E * N + 4 * E  # A = -exp(A_log) and D in fp32
    hidden_in = 4 * h  # the fp32 residual stream (residual_in_fp32): a checkpointed layer's input
    head_fwd, head_saved, head_bwd = _stock_lm_head(v, T, p, loss_fp32=True, logits_kept=False)
    head_tok = 4 * h + 4 * h + 4 + p * h + 8 + 8  # norm_f in fp32: input, normed, rsqrt; lm_head input; mask; labels
    if ckpt:  # layer 0's input is the 16-bit embedding output, the others the fp32 residual stream
        base = (p * h + hidden_in * (L - 1)) * T + head_tok * T
    else:
        base = (layer * T + per_layer_const) * L + head_tok * T
    tied = p * v * h if s.tied else 0
    one_layer = layer * T if ckpt else 0
    return ActMem(saved=base + head_saved,
                  head_peak=base + head_bwd,
                  layer_peak=base + one_layer + scan_bwd + p * s.largest_param + tied,
                  fwd_peak=base + one_layer + scan_fwd + head_fwd,
                  notes=notes)
