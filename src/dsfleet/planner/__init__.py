"""`dsfleet plan`: which ZeRO stage / offload / precision / checkpointing / micro-batch fits, and which is fastest,
answered from arithmetic before a GPU is spent.

Why this exists: users guess (a 6.9B Mamba "fits ZeRO-2 at 23 GB/GPU on 4 cards" when its 16-bit weights alone
are 13.8 GB), hand-tune ZeRO-3 knobs until a run stops crashing, or pay ZeRO-3's extra traffic on a card where
ZeRO-1/2 fits. For every candidate the planner predicts, per GPU, the peak that `torch.cuda.max_memory_allocated`
reports during training with dsfleet's own entry point, adds the framework overhead the caching allocator does
not see, checks the CPU side of offload, and ranks the candidates that fit with a small stated cost model.
docs/planner.md states the formulas, the assumptions and the measurements behind them.

One module per concern; this package re-exports the names callers use (`from dsfleet import planner`):
- shape.py: the model's counts and dims (preset, model dir, or a bare --params count);
- activations.py: what autograd keeps per micro-batch (the fast-path rules read from dsfleet.fastpath);
- memory.py: DeepSpeed's model states (its estimators' arithmetic) and what is live per phase of a step, on the
  GPU and the host (the generated config's buckets and limits read from dsfleet.dsconfig);
- cost.py: the cost model that ranks fitting candidates;
- candidate.py: one point of the search space and its results;
- search.py: the search, the choice and its one-line reason; `plan_for_spec(spec, hardware)` /
  `choose_for_spec(spec, hardware)` for `zero: auto` (the resolver's call), the topology a dsfleet.resolve.Hardware;
- cli.py: `dsfleet plan`'s flags (`add_arguments`/`run`, dispatched by dsfleet.cli) and `format_plan`;
- sizes.py: '80GiB' in, GiB out, and the hardware `dsfleet plan` assumes when not told.
"""
from __future__ import annotations

from dsfleet.planner.activations import DEVICE_KERNELS, ActMem, activation_memory
from dsfleet.planner.candidate import Candidate
from dsfleet.planner.cli import add_arguments, format_plan, run, summary_rows
from dsfleet.planner.cost import step_cost
from dsfleet.planner.memory import estimator_model_states, gpu_memory, host_bytes, zero3_host_staging_bytes
from dsfleet.planner.search import (MICRO_BATCHES, OFFLOADS, PRECISIONS, Plan, candidate_space, check_heavier_stage,
                                    choose_for_spec, evaluate, plan, plan_for_spec, what_would_fit)
from dsfleet.planner.shape import ModelShape, generic_shape, model_shape, parse_count, shape_for_spec, shape_from_config
from dsfleet.planner.sizes import DEFAULT_CPU_MEM, DEFAULT_GPU_MEM, GiB, parse_size

__all__ = [
    "DEFAULT_CPU_MEM", "DEFAULT_GPU_MEM", "GiB", "parse_size",
    "DEVICE_KERNELS", "ActMem", "activation_memory",
    "Candidate",
    "add_arguments", "format_plan", "run", "summary_rows",
    "step_cost",
    "estimator_model_states", "gpu_memory", "host_bytes", "zero3_host_staging_bytes",
    "MICRO_BATCHES", "OFFLOADS", "PRECISIONS", "Plan", "candidate_space", "check_heavier_stage", "choose_for_spec",
    "evaluate", "plan", "plan_for_spec", "what_would_fit",
    "ModelShape", "generic_shape", "model_shape", "parse_count", "shape_for_spec", "shape_from_config",
]
