#!/usr/bin/env python3
"""How fast a checkpoint-shaped state goes through torch.save, with and without the zip records' crc32
(dsfleet.checkpoint.saves_without_checksums), alternating: the numbers behind dsfleet's save setting
(docs/benchmarks.md). On a GPU box the tensors live on the GPU, as DeepSpeed's optimizer partitions do when it
saves (each storage copied to the host inside torch.save); elsewhere on the CPU.

    python3 scripts/save_speed.py --gib 12 --dir /dev/shm --rounds 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    import torch
    from dsfleet.checkpoint import saves_without_checksums
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=4.0, help="state size: 3 flat fp32 tensors (master, 2 moments)")
    p.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = int(args.gib * 2**30 / 3 / 4)
    state = {name: torch.randn(n, device=device) for name in ("fp32_partition", "exp_avg", "exp_avg_sq")}
    state["small"] = [torch.randn(4096, device=device, dtype=torch.bfloat16) for _ in range(200)]
    size = sum(t.numel() * t.element_size() for t in (state["fp32_partition"], state["exp_avg"], state["exp_avg_sq"],
                                                      *state["small"]))
    path = args.dir / f"save_speed_{os.getpid()}.pt"
    print(f"{size / 2**30:.2f} GiB on {device} -> {path}", flush=True)
    for r in range(args.rounds):
        for crc in (True, False):
            path.unlink(missing_ok=True)
            t0 = time.time()
            if crc:
                torch.save(state, path)
            else:
                with saves_without_checksums():
                    torch.save(state, path)
            dt = time.time() - t0
            print(f"round {r} crc32 {'on ' if crc else 'off'}: {dt:6.2f} s, {size / 1e9 / dt:5.2f} GB/s", flush=True)
    back = torch.load(path, map_location="cpu")
    assert torch.equal(back["exp_avg"], state["exp_avg"].cpu()), "the file does not load back equal"
    print("loads back equal", flush=True)
    path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
