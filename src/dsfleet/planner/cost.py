"""The cost model: estimated seconds per optimizer step of a candidate, used only to rank candidates that fit.

Why this exists: several ZeRO stages / offloads often fit; they differ in the bytes they move (collectives, PCIe,
NVMe) and the compute they repeat (activation checkpointing). A small stated model (the constants below, named in
docs/planner.md) ranks them; its absolute seconds are not a prediction.
"""
from __future__ import annotations

from dsfleet.planner.candidate import Candidate
from dsfleet.planner.shape import ModelShape

# Assumptions (docs/planner.md names each; change them here, not in the formula)
ACHIEVED_FLOPS = {"bf16": 400e12, "fp16": 400e12, "fp32": 50e12}  # per GPU, at large micro-batches
EFF_HALF_TOKENS = 1024  # GPU efficiency = tokens / (tokens + this): small micro-batches under-use the GPU
LINK_BW_INTRA = 150e9  # bytes/s per GPU for collectives inside a node (NVLink)
LINK_BW_INTER = 25e9  # bytes/s per GPU across nodes (200 Gb/s NIC per GPU)
ZERO3_FETCH_BW = 100e9  # bytes/s: ZeRO-3's per-module gather/partition hooks, even on one GPU
PCIE_BW = 25e9  # bytes/s per GPU, host <-> device
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed CPU-Adam, per GPU's share of the host cores
NVME_BW = 3e9  # bytes/s per GPU, optimizer/param swapping


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
