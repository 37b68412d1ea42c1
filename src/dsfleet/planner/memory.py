"""DeepSpeed's memory on one GPU and one host, phase by phase of a training step, for a candidate.

Why this exists: `torch.cuda.max_memory_allocated` peaks in one phase of a step (model init, forward/backward,
the optimizer step), not at the sum of everything; which tensors DeepSpeed holds in each phase depends on the ZeRO
stage, offload, precision and dsfleet's generated config (reduce bucket, overlap_comm, stage-3 reuse distance,
all read from dsfleet.dsconfig). The model states follow DeepSpeed's own estimators
(estimate_zero2/3_model_states_mem_needs) exactly; tests/test_planner.py compares them and the phases with
DeepSpeed's allocations on CPU ranks.
"""
from __future__ import annotations

import math

from dsfleet.dsconfig import STAGE3_MAX_REUSE_DISTANCE, default_reduce_bucket
from dsfleet.planner.sizes import GiB
from dsfleet.planner.activations import ActMem
from dsfleet.planner.candidate import Candidate
from dsfleet.planner.shape import ModelShape

# Assumptions (docs/planner.md names each; change them here, not in the formulas)
CONTEXT_BYTES = int(1.5 * GiB)  # CUDA context + NCCL communicators + driver reserve: outside the caching allocator
FRAGMENTATION = 0.07  # reserved-but-unallocated share of the allocator's peak
SUB_GROUP_SIZE = 10**9  # DeepSpeed's default zero_optimization.sub_group_size


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


def gpu_memory(shape: ModelShape, c: Candidate, total_gpus: int, act: ActMem, *, reduce_bucket: int | None = None,
               overlap_comm: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes live on one GPU in each phase of dsfleet's training step — what max_memory_allocated sees — and the
    DeepSpeed buffers among them. Phases: init (the model built on the GPU in fp32, cast, flattened, master copy
    made), forward/backward (from the second step on, when the Adam moments exist), optimizer step."""
    N, g = shape.n_params, total_gpus
    p = 2 if c.precision in ("bf16", "fp16") else 4
    part = math.ceil(N / g)
    fp32_copy = 4 if p == 2 else 0  # a separate fp32 tensor only when the model is 16-bit
    bucket = reduce_bucket or default_reduce_bucket(shape.hidden, c.zero_stage)  # dsfleet's generated config
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
            p * min(N, STAGE3_MAX_REUSE_DISTANCE // 2) + p * shape.largest_layer
        buf["forward/backward"] = gathered + p * shape.largest_param + p * bucket
        ph["forward/backward"] = resident + max(act_head, act_layer, act_fwd) + buf["forward/backward"] - p * bucket
        buf["optimizer step"] = (p + fp32_copy) * sub if c.offload_optimizer == "none" else 0
        ph["optimizer step"] = resident + buf["optimizer step"]
    return ph, buf


def zero3_host_staging_bytes(n_params: int, zero_stage: int, offload_param: str, precision: str, gpus_per_node: int,
                             nodes: int) -> int:
    """Per node: ZeRO-3 without parameter offload gathers each rank's 16-bit partitions into one flat buffer at
    optimizer init by way of the host (DeepSpeed 0.19's stage3 `defragment`: every partition copied into one CPU
    tensor, the device copies freed, the CPU tensor copied back whole), so each rank holds its whole partition in
    host memory once: p bytes x N / GPUs. mamba_7b on one H200: 12.9 GiB of the rank's measured 14.4 GiB peak RSS
    (docs/planner.md). ZeRO 0-2 flatten on the GPU when it has room (they fall back to the host only when it has
    not, which the planner's init phase rules out); with parameter offload the partitions live on the host anyway."""
    if zero_stage != 3 or offload_param != "none":
        return 0
    p = 4 if precision == "fp32" else 2
    return gpus_per_node * p * math.ceil(n_params / (gpus_per_node * nodes))


def host_bytes(shape: ModelShape, c: Candidate, gpus_per_node: int, nodes: int) -> tuple[int, int]:
    """(CPU bytes per node, NVMe bytes per node) DeepSpeed needs on the host at its peak, the rank processes' own
    memory (interpreter, libraries, CUDA's host side) not included. CPU offload: DeepSpeed's estimate (x1.5 buffer
    factor); NVMe: swap buffers on the host (four fp32 sub-groups per GPU), states on the disk; ZeRO-3 without
    parameter offload: the larger of zero.Init's buffers and the partitions staged at optimizer init."""
    N, g = shape.n_params, gpus_per_node * nodes
    part = math.ceil(N / g)
    staging = zero3_host_staging_bytes(N, c.zero_stage, c.offload_param, c.precision, gpus_per_node, nodes)
    if c.offload_optimizer == "nvme":
        host = gpus_per_node * 4 * 4 * min(part, SUB_GROUP_SIZE)
        disk = gpus_per_node * (16 * part + (2 * part if c.offload_param == "nvme" else 0))
        if c.offload_param == "cpu":
            host += gpus_per_node * 2 * part
        return max(host, staging), disk
    cpu, _ = estimator_model_states(N, shape.largest_layer, c.zero_stage, gpus_per_node, nodes,
                                    c.offload_optimizer == "cpu", c.offload_param == "cpu")
    return max(cpu, staging), 0


def fp32_model_states(shape: ModelShape, c: Candidate, g: int) -> int:
    """Model states per GPU of an fp32 run, which the estimators (16-bit params) do not cover: fp32 params and
    grads, fp32 master-free Adam moments, partitioned as the stage partitions them."""
    N, part = shape.n_params, math.ceil(shape.n_params / g)
    if c.zero_stage == 3:
        return 4 * shape.largest_layer + (0 if c.offload_param != "none" else 4 * part) + \
            (0 if c.offload_optimizer != "none" else 16 * part)
    if c.offload_optimizer != "none":
        return 4 * N
    if c.zero_stage == 0:
        return 16 * N
    return 4 * N + (4 * N if c.zero_stage == 1 and g > 1 else 0) + 16 * part


def split_model_states(shape: ModelShape, c: Candidate, g: int, states: int) -> tuple[int, int]:
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
