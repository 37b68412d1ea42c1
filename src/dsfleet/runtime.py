"""What a training process needs from its machine besides the model and the data: the accelerator (CPU ranks
when there is no GPU), the seed, Python's garbage collector kept out of the step, the preemption flag the ranks
agree on, and the exit codes the launchers act on."""
from __future__ import annotations

import atexit
import gc
import os
import signal

EXIT_PREEMPTED = 75  # a checkpoint was saved after SIGUSR1/SIGTERM; the Slurm script requeues on this code
EXIT_SAVE_FAILED = 74  # a checkpoint could not be written (disk full, read-only); the previous one is intact


def has_gpu() -> bool:
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return False
    import torch
    return torch.cuda.is_available()


def accelerator():
    """DeepSpeed's accelerator for this process: the GPU when there is one, else CPU ranks (gloo)."""
    if not has_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


# Imported by `import deepspeed` for a feature a training rank never uses: DeepSpeed's autotuner does
# `try: import mlflow` at import time (to log its own experiments, run by the `deepspeed --autotuning` launcher,
# not by a rank), and mlflow pulls in pandas and pyarrow: 1.5 s of CPU and ~110 MB of RSS per rank, measured on
# this repo's venv. The autotuner then sees no mlflow; `--report_to mlflow` imports it later as usual.
_NOT_FOR_RANKS = ("mlflow",)


def import_deepspeed():
    """`import deepspeed` without the modules of _NOT_FOR_RANKS: each is marked absent (None in sys.modules, which
    makes its import raise ImportError, the case DeepSpeed handles) while DeepSpeed imports, then unmarked, so a
    later import of it works. A module already imported, or already marked absent by someone else, is left as is."""
    import sys
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    marked = [name for name in _NOT_FOR_RANKS if name not in sys.modules]
    for name in marked:
        sys.modules[name] = None
    try:
        import deepspeed
    finally:
        for name in marked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return deepspeed


def start_process_group(accel, local_rank: int, memory_fraction: float | None, timeout_s: int | None = None) -> None:
    """Bind this rank's device and join the process group (DeepSpeed's own init, no MPI discovery: dist_env did it).
    timeout_s (--dist_timeout): how long a collective may wait for a peer before it fails (torch's default
    otherwise); a stopped or lost peer is the watchdog's (dsfleet/watchdog.py), which is faster."""
    import datetime

    import deepspeed
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
        if memory_fraction:
            import torch
            torch.cuda.set_per_process_memory_fraction(memory_fraction, local_rank)
    timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                               verbose=False, **timeout)
    from dsfleet import dist_env
    dist_env.release_cpu_allreduce_segment()


def global_rank() -> int:
    """This process's rank in the job once the process group is up (whatever launched it: srun and mpirun set
    no RANK), else 0."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm before clipping (DeepSpeed keeps it; inf on a skipped step)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


class StepBoundaryGC:
    """Python's cyclic garbage collector at every `interval`-th step boundary instead of whenever allocation counts
    trigger it: a collection over the millions of objects of a transformers + DeepSpeed process, landing in the
    middle of backward, leaves the GPU waiting (GPT-2 XL on one H200: every few steps ~10 % slower). Objects alive
    at the start of the loop are frozen out of collections. interval 0 leaves Python's collector as it is.
    stop() (also run at exit, whichever way the run ends) hands everything back to Python's collector, so the
    interpreter's own shutdown collection still frees the frozen objects (process groups, their threads)."""

    def __init__(self, interval: int):
        self.interval = interval
        if interval:
            gc.collect()
            gc.freeze()
            gc.disable()
            atexit.register(self.stop)

    def stop(self) -> None:
        if self.interval:
            gc.unfreeze()
            gc.enable()

    def maybe_collect(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect()


class PreemptionFlag:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it at step boundaries (one tiny all-reduce) and save together."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        import torch
        import torch.distributed as dist
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.signal_name:
            self.signal_name = "a peer's signal"
        return bool(flag.item())
