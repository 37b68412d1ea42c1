"""Why this exists: proof that a ZeRO step runs on the ops docker/install.sh prebuilt, with nothing JIT-compiled,
independent of dsfleet's own entry point (CPU ranks in CI and in the image, one GPU on the GPU box).

Run it under the deepspeed launcher, e.g.
  DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(mktemp -d) deepspeed --num_gpus 2 docker/offload_step.py --zero 2
Rank 0 prints one line `OFFLOAD_STEP {json}`: losses, the file each loaded op came from, what the
torch-extensions (JIT) dir holds afterwards, and the AIO round trip result when --aio_dir is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--offload_optimizer", default="cpu", choices=["none", "cpu"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--aio_dir", default="", help="also write and read back a tensor through the AIO op here")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the launcher; the env wins")
    args = p.parse_args()
    if args.steps < 1:
        print("offload_step: --steps must be >= 1 — give the number of optimizer steps to run", file=sys.stderr)
        return 2

    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.builder import OpBuilder

    deepspeed.init_distributed()
    from dsfleet.dist_env import leave_process_group, release_cpu_allreduce_segment  # /dev/shm, clean exit
    release_cpu_allreduce_segment()
    accel = get_accelerator()
    on_gpu = accel.device_name() != "cpu"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    zero = {"stage": args.zero}
    if args.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 1000,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    losses = []
    for _ in range(args.steps):
        x = torch.randn(4, 64, device=engine.device, dtype=dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), x.float())
        engine.backward(loss)
        engine.step()
        losses.append(round(loss.item(), 6))

    aio = None
    if args.aio_dir:
        from deepspeed.ops.op_builder import AsyncIOBuilder
        handle = AsyncIOBuilder().load().aio_handle()
        path = os.path.join(args.aio_dir, f"aio_rank{engine.global_rank}.bin")
        out = torch.arange(1 << 18, dtype=torch.float32)
        back = torch.zeros_like(out)
        try:
            handle.sync_pwrite(out, path)
            handle.sync_pread(back, path)
            aio = "ok" if torch.equal(out, back) else "read back differs"
        except Exception as e:  # O_DIRECT is refused by some file systems (tmpfs): report, do not hide
            aio = f"{type(e).__name__}: {e}"
        finally:
            if os.path.exists(path):
                os.remove(path)

    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    jit = sorted(os.listdir(ext_dir)) if ext_dir and os.path.isdir(ext_dir) else []
    if engine.global_rank == 0:
        report = {
            "accelerator": accel.device_name(),
            "world_size": engine.world_size,
            "optimizer": type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__,
            "losses": losses,
            "ops": {name: getattr(mod, "__file__", "?") for name, mod in sorted(OpBuilder._loaded_ops.items())},
            "torch_extensions_dir": ext_dir,
            "jit_built": jit,
            "aio": aio,
        }
        print("OFFLOAD_STEP " + json.dumps(report), flush=True)
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
