"""DeepSpeed ZeRO-1/2's per-step gradient checks as multi-tensor kernels: the same decisions, ~2 launches not ~5,000.

Before every optimizer step, DeepSpeed's ZeRO-1/2 optimizer (0.19) walks the gradient partition one tensor at a
time, from Python: a non-finite check (amax + amin + isfinite per tensor, run even in bf16) and, for gradient
clipping, a norm (an fp64 copy + a norm per tensor). For GPT-2 XL that is 580 tensors and ~5,000 tiny kernels a
step, each launched from the host while the device waits: a profile on one H200 showed the GPU idle for about a
third of every step, most of it here (docs/benchmarks.md). `install(engine)` replaces the two walks, on that
engine's optimizer instance only, with `torch._foreach_norm` over the whole list (one fused multi-tensor kernel)
accumulating in fp64, and skips the clip multiply when its factor is exactly 1:

- overflow: "some gradient element is NaN or +-inf" == "some per-tensor L2 norm in fp64 is not finite" (an fp64
  sum of squares of finite fp32/bf16/fp16 values cannot overflow: at most 1.2e77 per element), so the same
  steps are skipped;
- norm: the same formula as DeepSpeed (per-tensor fp64 norms, squares summed, cast to fp32, all-reduced over
  the data-parallel group, square root, NaN/inf masked to DeepSpeed's -1 sentinel); only the order of the fp64
  summation inside a tensor differs;
- clip: DeepSpeed multiplies the fp32 gradient partition by 1/max((norm + 1e-6) / clip, 1) every step; when that
  factor is exactly 1 the multiply is the identity and is skipped (decided on the host from the norm, which the
  step has already synchronised on). Any doubt near the boundary runs DeepSpeed's own multiply.

Anything this does not cover (CPU offload, MoE, model or pipeline parallelism, a non-L2 norm, an optimizer that
is not ZeRO-1/2's, or a DeepSpeed without these methods) keeps DeepSpeed's own code; `install` says why.
tests/test_zero_step.py runs real 2-rank ZeRO-2 with and without it (same losses, same skipped NaN step).
"""
from __future__ import annotations

import math
import types

import torch


def install(engine) -> str | None:
    """Swap the checks on `engine.optimizer`; None when done, else why not (for the run's start line)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return "this DeepSpeed has no ZeRO-1/2 optimizer module"
    opt = getattr(engine, "optimizer", None)
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        return "the optimizer is not DeepSpeed's ZeRO-1/2 one"
    missing = [name for name in ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct",
                                 "unscale_and_clip_grads", "averaged_gradients", "bit16_groups",
                                 "dp_process_group", "clip_grad", "loss_scale", "device") if not hasattr(opt, name)]
    if missing:
        return f"this DeepSpeed's ZeRO optimizer lacks {', '.join(missing)}"
    if getattr(opt, "cpu_offload", False):
        return "CPU offload: DeepSpeed checks gradients on the host side"
    if getattr(opt, "has_moe_layers", False):
        return "MoE layers: expert norms are averaged separately"
    if getattr(opt, "model_parallel_world_size", 1) > 1:
        return "model parallelism: norms are reduced over the model-parallel group too"
    opt._dsfleet_deepspeed_norm = opt.get_grad_norm_direct
    opt._dsfleet_deepspeed_clip = opt.unscale_and_clip_grads
    opt.has_overflow_partitioned_grads_serial = types.MethodType(_any_non_finite, opt)
    opt.get_grad_norm_direct = types.MethodType(_grad_norm, opt)
    opt.unscale_and_clip_grads = types.MethodType(_clip_unless_identity, opt)
    return None


def _norms_fp64(grads: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms accumulated in fp64, one multi-tensor kernel per device/dtype group."""
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))


def _partition_grads(opt) -> list[torch.Tensor]:
    return [g for i in range(len(opt.bit16_groups)) for g in (opt.averaged_gradients[i] or []) if g is not None]


def _any_non_finite(opt) -> torch.Tensor:
    """DeepSpeed's has_overflow_partitioned_grads_serial: a 1-element tensor on the device, true if any gradient
    element of this rank's partition is NaN or +-inf (no host sync here; DeepSpeed all-reduces it). The norms are
    kept for the clip norm DeepSpeed computes next from the same, unchanged gradients."""
    grads = _partition_grads(opt)
    if not grads:
        return torch.zeros(1, dtype=torch.bool, device=torch.device(opt.device))
    norms = _norms_fp64(grads)
    opt._dsfleet_norms = ([id(g) for g in grads], norms)
    return (~torch.isfinite(norms.sum())).reshape(1)


def _grad_norm(opt, gradients, params, norm_type=2):
    """DeepSpeed's get_grad_norm_direct for the L2 norm without pipeline-replicated parameters."""
    if float(norm_type) != 2.0 or any(getattr(p, "ds_pipe_replicated", False) for p in params):
        return opt._dsfleet_deepspeed_norm(gradients, params, norm_type)
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    grads = [g for g, _ in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)]
    kept_ids, kept = getattr(opt, "_dsfleet_norms", None) or (None, None)
    opt._dsfleet_norms = None
    if grads:
        norms = kept if kept_ids == [id(g) for g in grads] else _norms_fp64([g.detach() for g in grads])
        total = norms.pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=torch.device(opt.device))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=opt.dp_process_group)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=opt.device)
    return total


CLIP_MARGIN = 1e-6  # stay clear of the boundary where host fp64 and device fp32 could round differently


def _clip_unless_identity(opt, grad_groups_flat, total_norm):
    """Skip DeepSpeed's clip multiply only when its factor is exactly 1 (no loss scale, norm below the clip)."""
    if opt.loss_scale == 1.0 and opt.clip_grad > 0.0 and total_norm is not None:
        norm = float(total_norm)
        if math.isfinite(norm) and norm >= 0.0 and (norm + 1e-6) / opt.clip_grad < 1.0 - CLIP_MARGIN:
            return None
    return opt._dsfleet_deepspeed_clip(grad_groups_flat, total_norm)
