#!/usr/bin/env python3
"""How long one causal self-attention forward + backward takes in each of torch's SDPA kernels (cuDNN, flash,
memory-efficient, math), with and without dropout, at the shapes of a bench suite: which kernel the fast path
should ask for (docs/benchmarks.md, issue 21). torch picks by its own priority list when nothing is asked; this
times each kernel that accepts the inputs, alternating rounds, and prints one line per kernel.

    python3 scripts/attn_speed.py --batch 32 --heads 25 --seq 1024 --head_dim 64 --dropout 0.1
"""
from __future__ import annotations

import argparse
import sys


def main() -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=25)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--layers", type=int, default=48, help="per-step figure: this many calls a step")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("attn_speed: no CUDA device — this measures GPU kernels", file=sys.stderr)
        return 2
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    # causal FLOPs: QK^T and PV, forward 2 x 2bshd / 2, backward 2.5x the forward
    flops = 3.5 * 2 * 2 * args.batch * args.heads * args.seq * args.seq * args.head_dim / 2

    def once(backend, dropout: float) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with sdpa_kernel([backend]):
            for i in range(args.iters + 3):
                if i == 3:
                    start.record()
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
                out.backward(grad)
            end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters

    times: dict[tuple[str, float], list[float]] = {}
    for _ in range(args.rounds):
        for name, backend in kernels.items():
            for dropout in sorted({0.0, args.dropout}):
                try:
                    times.setdefault((name, dropout), []).append(once(backend, dropout))
                except RuntimeError as e:
                    times[(name, dropout)] = []
                    print(f"{name} dropout {dropout}: not usable ({str(e).splitlines()[0][:100]})")
    print(f"shape {shape} bf16 causal, fwd+bwd, best of {args.rounds} rounds x {args.iters} calls; "
          f"per step = x {args.layers} layers")
    for (name, dropout), ms in sorted(times.items(), key=lambda kv: min(kv[1]) if kv[1] else 1e9):
        if ms:
            best = min(ms)
            print(f"  {name:9s} dropout {dropout:<4}: {best:7.3f} ms/call  {best * args.layers:7.1f} ms/step  "
                  f"{flops / best / 1e9:6.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
