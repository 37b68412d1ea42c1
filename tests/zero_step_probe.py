"""Run under the deepspeed launcher by tests/test_zero_step.py: a small model on real ZeRO-2 bf16 CPU ranks, six
steps, rank 0's gradient of one weight turned NaN at step NAN_STEP (so the ranks must agree to skip it), with
DeepSpeed's own gradient checks or with dsfleet.zero_step's (FUSED=1). Prints one RESULT line of JSON."""
import json
import os

import deepspeed
import torch

from dsfleet.dist_env import leave_process_group, release_cpu_allreduce_segment

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
release_cpu_allreduce_segment()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": float(os.environ["CLIP"]),
          "zero_optimization": {"stage": 2, "reduce_bucket_size": 200, "allgather_bucket_size": 200,
                                "compute_grad_norm": os.environ.get("NORM", "1") == "1"},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "bf16": {"enabled": True}, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
why_not = "not asked"
if os.environ.get("FUSED") == "1":
    from dsfleet import zero_step
    why_not = zero_step.install(engine)
checks_from = engine.optimizer.has_overflow_partitioned_grads_serial.__func__.__module__
nan_step = int(os.environ["NAN_STEP"])
data = torch.Generator().manual_seed(rank)
losses, norms = [], []
for step in range(6):
    x = torch.randn(4, 16, generator=data).to(torch.bfloat16)
    y = torch.randn(4, 4, generator=data).to(torch.bfloat16)
    hook = engine.module[2].weight.register_hook(lambda g: g * float("nan")) if step == nan_step and rank == 0 else None
    loss = ((engine(x) - y) ** 2).mean()
    engine.backward(loss)
    engine.step()
    if hook is not None:
        hook.remove()
    losses.append(float(loss))
    norm = engine.get_global_grad_norm()
    norms.append(float("nan") if norm is None else float(norm))
if rank == 0:
    params = [p.detach().float().flatten().tolist() for p in engine.module.parameters()]
    print("RESULT " + json.dumps({"losses": losses, "norms": norms, "skipped": engine.skipped_steps,
                                  "params": params, "why_not": why_not, "checks_from": checks_from}), flush=True)
leave_process_group()
