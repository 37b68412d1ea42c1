"""One point of the planner's search space (ZeRO stage, offload, precision, checkpointing, micro-batch) and what
was computed for it.

Why this exists: the memory model and the cost model both read a candidate's choices, the search fills in their
results, and `zero: auto` hands the chosen one to the training entry point; one type, shared, keeps them apart.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
