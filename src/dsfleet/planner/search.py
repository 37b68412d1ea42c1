"""The search: every candidate (ZeRO 0-3 x offload x precision x checkpointing x micro-batch) for a model on given
hardware, costed, the fastest that fits chosen, and one line saying why (or what would fit, when nothing does).

Why this exists: the memory model (activations.py, memory.py) says whether one candidate fits and the cost model
(cost.py) what it costs; this module walks the space, applies the tie-break rules, and is what the resolver
(dsfleet.resolve) calls for `zero: auto`: `plan_for_spec(spec, hardware)` / `choose_for_spec(spec, hardware)`,
the topology given as a dsfleet.resolve.Hardware (nodes x GPUs per node), never guessed from the environment.
"""
from __future__ import annotations


import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable

from dsfleet.cli import fail
from dsfleet.dsconfig import default_overlap_comm
from dsfleet.planner.activations import activation_memory
from dsfleet.planner.candidate import Candidate
from dsfleet.planner.cost import step_cost
from dsfleet.planner.memory import (CONTEXT_BYTES, FRAGMENTATION, estimator_model_states, fp32_model_states,
                                    gpu_memory, host_bytes, split_model_states)
from dsfleet.planner.shape import ModelShape, resolve_shape, shape_for_spec
from dsfleet.planner.sizes import DEFAULT_CPU_MEM, DEFAULT_GPU_MEM, GiB, format_gib

if TYPE_CHECKING:
    from dsfleet.resolve import Hardware

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
OFFLOADS = (  # (ZeRO stage, optimizer offload, param offload) that DeepSpeed supports
    (0, "none", "none"), (1, "none", "none"), (1, "cpu", "none"), (2, "none", "none"), (2, "cpu", "none"),
    (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu"), (3, "nvme", "none"), (3, "nvme", "nvme"),
)
PRECISIONS = ("bf16", "fp16", "fp32")  # in the order the tie-break prefers them


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
    seq2seq: bool = False
    activations: str = "formula (planner/activations.py)"  # or measured: how the activation bytes were found

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "family": self.family, "n_params": self.n_params, "largest_layer": self.largest_layer,
            "gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "gpu_mem_bytes": self.gpu_mem_bytes,
            "cpu_mem_bytes": self.cpu_mem_bytes, "seq_len": self.seq_len, "tgt_len": self.tgt_len,
            "fused_loss": self.fused_loss, "best": self.best.to_json() if self.best else None, "reason": self.reason,
            "impossible": self.impossible, "seq2seq": self.seq2seq, "activations": self.activations,
            "candidates": [c.to_json() for c in self.candidates],
        }


def evaluate(shape: ModelShape, *, zero_stage: int, offload_optimizer: str = "none", offload_param: str = "none",
             precision: str = "bf16", gradient_checkpointing: bool = False, micro_batch: int = 1, gpus: int = 1,
             nodes: int = 1, gpu_mem_bytes: int = DEFAULT_GPU_MEM, cpu_mem_bytes: int = DEFAULT_CPU_MEM,
             seq_len: int | None = None, tgt_len: int | None = None, fused_loss: bool = True,
             fused_activation: bool = True, grad_accum: int = 1) -> Candidate:
    """One candidate, fully costed: the memory phases, the fit on GPU and host, and the step cost."""
    c = Candidate(zero_stage, offload_optimizer, offload_param, precision, gradient_checkpointing, micro_batch)
    total = gpus * nodes
    seq = seq_len or shape.seq_len
    tgt = (tgt_len or shape.tgt_len or seq) if shape.seq2seq else 0
    act = activation_memory(shape, micro_batch, seq, tgt, precision, gradient_checkpointing, fused_loss=fused_loss,
                            fused_activation=fused_activation, zero_stage=zero_stage)
    phases, buffers = gpu_memory(shape, c, total, act, overlap_comm=default_overlap_comm(zero_stage, total, False))
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    _, states = estimator_model_states(shape.n_params, shape.largest_layer, zero_stage, gpus, nodes,
                                       offload_optimizer != "none", offload_param != "none")
    if precision == "fp32":  # no 16-bit copies: fp32 params and grads, Adam moments; the estimators assume 16-bit
        states = fp32_model_states(shape, c, total)
    params_b, optim_b = split_model_states(shape, c, total, states)
    overhead = CONTEXT_BYTES + int(FRAGMENTATION * peak)
    c.gpu = {"params": params_b, "grads": states - params_b - optim_b, "optimizer": optim_b,
             "activations": act.peak, "buffers": buffers.get(peak_phase, 0), "overhead": overhead, "peak": peak,
             "need": peak + overhead}
    c.model_states_bytes = states
    c.peak_phase, c.phases = peak_phase, phases
    c.cpu_bytes_per_node, c.nvme_bytes_per_node = host_bytes(shape, c, gpus, nodes)
    c.fits_gpu = c.gpu["need"] <= gpu_mem_bytes
    # the host is checked where DeepSpeed puts states there: offload, and ZeRO-3's staging of the 16-bit partitions
    host_side = c.offload_optimizer != "none" or c.offload_param != "none" or c.zero_stage == 3
    c.fits_cpu = not host_side or c.cpu_bytes_per_node <= cpu_mem_bytes
    c.fits = c.fits_gpu and c.fits_cpu
    if not c.fits_gpu:
        c.why_not = f"needs {format_gib(c.gpu['need'])} GiB/GPU > {format_gib(gpu_mem_bytes)}"
    elif not c.fits_cpu:
        c.why_not = f"needs {format_gib(c.cpu_bytes_per_node)} GiB CPU/node > {format_gib(cpu_mem_bytes)}"
    tokens_per_sample = seq + tgt
    flops_tokens = (seq + tgt) / 2 if shape.seq2seq else seq  # half the params see each seq2seq token
    terms = step_cost(shape, c, gpus, nodes, tokens_per_sample, flops_tokens, grad_accum)
    c.tokens_per_step = int(terms.pop("tokens"))
    c.cost_terms = terms
    c.est_step_cost = sum(terms.values())
    return c


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
         grad_accum: int = 1, mamba_kernels: bool | None = None) -> Plan:
    """Every candidate (ZeRO 0-3 x offload x precision x checkpointing x micro-batch) for this model on this
    hardware, the fastest fitting one as `best`, and a one-line `reason` (or what would fit, if nothing does).
    `mamba_kernels`: a Mamba's activations for mamba_ssm's fused scan (True) or transformers' pure-PyTorch one
    (False); None keeps the shape's."""
    if gpus < 1 or nodes < 1:
        fail(f"--gpus {gpus} --nodes {nodes}: both must be >= 1 — pass the GPUs per node and the node count, "
             "e.g. --gpus 8 --nodes 2")
    if precision is not None and precision not in PRECISIONS:
        fail(f"unknown precision {precision!r} — use one of {', '.join(PRECISIONS)}")
    if micro_batch is not None and micro_batch < 1:
        fail(f"--micro-batch {micro_batch} must be >= 1 — pass a positive micro-batch, or leave it out to try 1..64")
    shape = shape or resolve_shape(params, preset, seq_len)
    if shape.family == "mamba" and mamba_kernels is not None:
        shape = replace(shape, mamba_kernels=mamba_kernels)
    seq = seq_len or shape.seq_len
    tgt = (tgt_len or shape.tgt_len or seq) if shape.seq2seq else 0
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
                  cpu_mem_bytes, seq, tgt, fused_loss, cands, best, "", seq2seq=shape.seq2seq)
    if shape.measured:
        from dsfleet.planner.measured import METHOD
        result.activations = METHOD
    elif shape.family == "mamba":
        result.activations += (": mamba_ssm's fused scan" if shape.mamba_kernels else
                               ": transformers' pure-PyTorch scan (--mamba_kernels off, or no kernels)")
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
    line = (f"{b.label()}: the fastest that fits ({format_gib(b.gpu['need'])} of {format_gib(pl.gpu_mem_bytes)} "
            f"GiB/GPU; est. {t['compute']:.3g}s compute + {t['communication']:.3g}s communication + "
            f"{t['offload']:.3g}s offload per step)")
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
    size = format_gib(pl.gpu_mem_bytes)
    head = (f"{pl.model} fits no ZeRO stage, offload or micro-batch on {pl.total_gpus} x {size} GiB GPU(s) with "
            f"{format_gib(pl.cpu_mem_bytes)} GiB CPU/node")
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
    line = (f"{head} — at {pl.seq_len} tokens the activations alone need {format_gib(act.peak)} GiB/GPU "
            f"(micro-batch {mb}, checkpointing)")
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
# The API the resolver calls (dsfleet.resolve: train, render, show-config)

def choose_for_spec(spec_like, hardware: Hardware) -> Candidate | None:
    """`zero: auto`: the fastest fitting ZeRO stage / offload / checkpointing for the spec's model, micro-batch,
    precision and lengths on `hardware` (the spec's micro-batch is kept; checkpointing is only ever switched on)."""
    pl = plan_for_spec(spec_like, hardware)
    return None if pl is None else pl.best


def plan_for_spec(spec_like, hardware: Hardware) -> Plan | None:
    """The plan for exactly what a run spec trains: its model (preset or model dir), micro-batch, lengths,
    precision, fused-path flags and accumulation, on `hardware` (nodes x GPUs per node, memory per GPU and per
    node); None when the model cannot be read."""
    if not all(hasattr(hardware, k) for k in ("nodes", "gpus_per_node", "gpu_mem_bytes", "cpu_mem_bytes")):
        raise TypeError(f"plan_for_spec(spec, hardware) takes a dsfleet.resolve.Hardware, not {hardware!r} (the "
                        "world size alone does not say how many GPUs share a node)")
    shape = shape_for_spec(spec_like)
    if shape is None:
        return None
    bf16, fp16 = bool(getattr(spec_like, "bf16", False)), bool(getattr(spec_like, "fp16", False))
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    if shape.seq2seq:
        seq, tgt = getattr(spec_like, "max_source_length", None), getattr(spec_like, "max_target_length", None)
    else:
        seq, tgt = getattr(spec_like, "block_size", None), None
    pl = plan(shape=shape, gpus=hardware.gpus_per_node, nodes=hardware.nodes, gpu_mem_bytes=hardware.gpu_mem_bytes,
              cpu_mem_bytes=hardware.cpu_mem_bytes,
              micro_batch=int(getattr(spec_like, "per_device_train_batch_size", 1) or 1), seq_len=seq, tgt_len=tgt,
              precision=precision, gradient_checkpointing=True if getattr(spec_like, "gradient_checkpointing", False)
              else None, fused_loss=bool(getattr(spec_like, "fused_loss", True)),
              fused_activation=bool(getattr(spec_like, "fused_activation", True)),
              grad_accum=int(getattr(spec_like, "gradient_accumulation_steps", 1) or 1),
              mamba_kernels=mamba_kernels_expected(spec_like, hardware))
    return pl


def mamba_kernels_expected(spec_like, hardware: Hardware) -> bool:
    """Whether a Mamba run takes mamba_ssm's fused scan. Inside a run, what its process decided
    (fastpath.choose_mamba_scan, carried as hardware.mamba_kernels). Planned from elsewhere: `--mamba_kernels on`,
    or `auto` on GPUs (the GPU image and docker/install.sh build the kernels; where they are missing, train falls
    back with one line and re-plans with this answer); CPU ranks and `off` take transformers' pure-PyTorch scan."""
    decided = getattr(hardware, "mamba_kernels", None)
    if decided is not None:
        return decided
    choice = getattr(spec_like, "mamba_kernels", "auto")
    return choice == "on" or (choice == "auto" and not getattr(hardware, "cpu", False))


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
            f"({format_gib(best.gpu['need'])} of {format_gib(plan.gpu_mem_bytes)} GiB/GPU) and is est. {speedup:.1f}x "
            f"faster per token — use --zero {best.zero_stage} (or --zero auto)")
