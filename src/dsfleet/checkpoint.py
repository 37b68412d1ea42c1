"""Checkpoints that survive preemption: DeepSpeed engine state + dsfleet's own (step, data position, RNG),
a COMPLETE marker written only after every rank has saved, and a `latest` pointer replaced atomically after
that — so a kill -9 mid-save leaves `latest` on the previous, loadable checkpoint. Plus the HF export.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from dsfleet.cli import fail

COMPLETE = "COMPLETE"
STATE_FILE = "dsfleet_state.json"


@contextmanager
def _torch_serialization(section: str, name: str, value: Any) -> Iterator[None]:
    """torch.utils.serialization.config.<section>.<name> = value inside the block (torch >= 2.6; older torch:
    unchanged). DeepSpeed calls torch.save/torch.load itself, so its checkpoint I/O is steered through this."""
    try:
        from torch.utils.serialization import config
        part = getattr(config, section)
        before = getattr(part, name)
    except (ImportError, AttributeError):
        yield
        return
    setattr(part, name, value)
    try:
        yield
    finally:
        setattr(part, name, before)


def saves_without_checksums():
    """torch.save's zip writer computes a crc32 of every record, single-threaded: a third to a half of a save's time
    (here: 2 GiB to tmpfs 0.5 GiB/s with it, 2.4 GiB/s without; mamba_7b's 83 GB took 136-154 s on the H200 box),
    and torch.load never checks it (a flipped byte loads silently, tried). Whether a checkpoint is whole is what
    the COMPLETE marker and the atomic `latest` say; so dsfleet's saves skip the checksum."""
    return _torch_serialization("save", "compute_crc32", False)


def loads_memory_mapped():
    """DeepSpeed's load reads each file this rank needs whole into host memory before copying it to the device:
    the 16-bit module file, then the rank's optimizer shard (12 bytes a parameter of its partition: 77 GiB for
    mamba_7b's one-GPU ZeRO-3 resume), all of it anonymous memory that a pod's memory limit counts. Memory-mapped,
    the same bytes are file pages the kernel can drop and re-read, so a requeued pod sized for training also
    survives its resume (gpt2 on one CPU rank: 2.63 -> 1.70 GiB anonymous at the end of the load)."""
    return _torch_serialization("load", "mmap", True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file() and (tag_dir / STATE_FILE).is_file()


class CheckpointError(Exception):
    """A save failed on some rank (disk full, read-only, I/O error); `latest` still names the last good one."""


def _fault_point(where: str, step: int, rank: int) -> None:
    """Fault injection for the reliability tests only: DSFLEET_FAULT_INJECT=kill_in_save:STEP:RANK kills that
    rank with SIGKILL after its shards are on disk, before the save completes. Unset in real runs."""
    spec = os.environ.get("DSFLEET_FAULT_INJECT", "")
    if spec == f"{where}:{step}:{rank}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def should_save(spec, step: int, total_steps: int) -> bool:
    """A mid-run checkpoint every --save_steps, and once --save_interval_minutes have passed since this process's
    last save (or its first step) — the end of the run always saves. Every rank calls this at every step boundary:
    the clocks of the ranks differ, so with an interval they agree on it (one tiny all-reduce, as the preemption
    flag does) and save together."""
    if step >= total_steps:
        return False
    by_steps = bool(spec.save_steps) and step % spec.save_steps == 0
    if not spec.save_interval_minutes:
        return by_steps
    now = time.monotonic()
    since = _last_save.setdefault("at", now)
    due = _any_rank(now - since >= 60 * spec.save_interval_minutes)
    return by_steps or due


_last_save: dict[str, float] = {}  # monotonic time of this process's last save (should_save's interval)


def save(engine, root: Path, step: int, state: dict[str, Any], *, rank: int, keep: int | None) -> Path:
    """Every rank calls this. Returns the checkpoint dir; `latest` points at it only once it is complete."""
    tag = f"step_{step}"
    tag_dir = root / tag
    error = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)  # here, not inside DeepSpeed's save (see below)
            if tag_dir.exists():  # a partial save of the same step from a killed run
                shutil.rmtree(tag_dir)
        _check_room(root)
    except OSError as e:
        error = e
    # Every rank must take part in the same collectives in the same order, or a failure on one rank hangs the
    # others: the go/no-go is agreed first, and a rank whose DeepSpeed save raises still meets the barrier that
    # ends DeepSpeed's save_checkpoint on the others (between its tag check and that barrier, a ZeRO 0-2 save
    # runs no collective; the save dir exists already, so nothing fails before the tag check).
    if _any_rank(error is not None):
        _give_up(tag_dir, root, rank, error)
    try:
        with saves_without_checksums():
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch.save wraps ENOSPC in RuntimeError
        error = e
        _barrier()
    if error is None:
        try:
            with saves_without_checksums():
                torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
        except (OSError, RuntimeError) as e:
            error = e
    _fault_point("kill_in_save", step, rank)
    if _any_rank(error is not None):
        _give_up(tag_dir, root, rank, error)
    if rank == 0:
        try:
            _write_atomic(tag_dir / STATE_FILE, json.dumps(state, indent=1))
            _write_atomic(tag_dir / COMPLETE, "")
            _write_atomic(root / "latest", tag)
        except OSError as e:
            error = e
    if _any_rank(error is not None):
        _give_up(tag_dir, root, rank, error)
    if rank == 0 and keep:
        for old in sorted(completed(root), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    _last_save["at"] = time.monotonic()
    return tag_dir


def _check_room(root: Path) -> None:
    """Before a save: a read-only output dir, or less free space than the last checkpoint took, fails now —
    on every rank alike, before DeepSpeed writes anything — instead of halfway through the files."""
    problem = _room_problem(root)
    if problem:
        raise OSError(errno.EROFS if problem.startswith("Read-only") else errno.ENOSPC, problem, str(root))


def _room_problem(root: Path, need_without_checkpoint: int = 0) -> str | None:
    """Why the next checkpoint cannot be written under `root`, in plain words, or None: a read-only file system,
    or less free space than the newest complete checkpoint took (`need_without_checkpoint` when there is none)."""
    try:
        st = os.statvfs(root if root.is_dir() else root.parent)  # other ranks may look before rank 0 made it
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "Read-only file system"
    last = max(completed(root), key=_step_of, default=None)
    needed = sum(p.stat().st_size for p in last.rglob("*") if p.is_file()) if last else need_without_checkpoint
    free = st.f_bavail * st.f_frsize
    if free < needed:
        return f"No space left on device: {free / 2**20:.1f} MiB free, a checkpoint needs about {needed / 2**20:.1f} MiB"
    return None


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _give_up(tag_dir: Path, root: Path, rank: int, error: Exception | None):
    if rank == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)  # never leave a half checkpoint that looks loadable
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    # torch.save reports a full disk as 'unexpected pos 128 vs 0': name the usual causes plainly
    reason = (_room_problem(root, need_without_checkpoint=16 * 2**20)
              or (f"{type(error).__name__}: {error}" if error else "failed on another rank"))
    kept = f"the last complete checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
    raise CheckpointError(f"checkpoint save to {tag_dir} failed ({reason.splitlines()[0][:200]}) — {kept}; "
                          "free space or make the output dir writable, then resume with --resume_from_checkpoint auto")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("_")[-1])
    except ValueError:
        return -1


def completed(root: Path) -> list[Path]:
    return [p for p in root.glob("step_*") if p.is_dir() and is_complete(p)] if root.is_dir() else []


def find(request: str, output_dir: Path) -> Path | None:
    """--resume_from_checkpoint: 'auto' -> latest complete under output_dir/checkpoints (None if none yet);
    a path -> that checkpoint (a step dir, or a checkpoints root with `latest`)."""
    if request == "auto":
        root = output_dir / "checkpoints"
        latest = root / "latest"
        if latest.is_file() and is_complete(root / latest.read_text().strip()):
            return root / latest.read_text().strip()
        done = sorted(completed(root), key=_step_of)
        return done[-1] if done else None
    path = Path(request)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir():
        fail(f"checkpoint {request} not found — pass a step dir, a checkpoints dir, or 'auto'")
    if not is_complete(path):
        fail(f"checkpoint {path} is incomplete (no {COMPLETE} marker: its save was interrupted) — "
             "resume from an earlier one or 'auto'")
    return path


def load(engine, tag_dir: Path, *, rank: int, load_optimizer: bool = True) -> dict[str, Any]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; returns dsfleet's state dict."""
    with loads_memory_mapped():
        load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                              load_optimizer_states=load_optimizer, load_lr_scheduler_states=True)
    if load_path is None:
        fail(f"DeepSpeed could not load checkpoint {tag_dir} — check that it matches this model and ZeRO stage")
    state = json.loads((tag_dir / STATE_FILE).read_text())
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if rng_file.is_file() and state.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def for_world_size(tag_dir: Path | None, ds_config: dict[str, Any], world_size: int, *, rank: int) -> Path | None:
    """The checkpoint to resume on this world size: the saved one, or (saved by another world size) its universal
    conversion, with DeepSpeed told to load it as such."""
    if tag_dir is None or saved_world_size(tag_dir) == world_size:
        return tag_dir
    ds_config["checkpoint"] = {"load_universal": True}
    return to_universal(tag_dir, rank=rank)  # ZeRO shards re-cut for this world


def resume(engine, tag_dir: Path, order, run_state: dict[str, Any], *, rank: int) -> int:
    """Restore the engine and the data position from a checkpoint; rank 0 says where and what the resuming run
    changes (world size, global batch, LR schedule). Returns the step to continue from."""
    state = load(engine, tag_dir, rank=rank)
    if order is not None:
        order.load_state(state["data"])
    if rank == 0:
        print(f"dsfleet: resumed from {tag_dir} at step {state['step']}", flush=True)
        changed = resume_changes(state, run_state)
        if changed:
            print(f"dsfleet: {changed}", flush=True)
    return int(state["step"])


def saved_world_size(tag_dir: Path) -> int:
    return int(json.loads((tag_dir / STATE_FILE).read_text()).get("world_size", 1))


def to_universal(tag_dir: Path, *, rank: int) -> Path:
    """A checkpoint saved on another world size -> DeepSpeed's universal format (rank 0 converts, all wait).
    The original stays untouched; the universal copy sits beside it and carries dsfleet's state file."""
    import subprocess
    import sys
    out = tag_dir.with_name(f"{tag_dir.name}_universal")
    if rank == 0 and not (out / COMPLETE).is_file():
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(tag_dir), "--output_folder", str(out), "--num_extract_workers", "1",
                               "--num_merge_workers", "1", "--inject_missing_state"], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            fail(f"cannot convert {tag_dir} to a universal checkpoint for a new world size ({tail[0][:200]}) — "
                 "resume on the world size it was saved with")
        shutil.copy(tag_dir / STATE_FILE, out / STATE_FILE)
        _write_atomic(out / COMPLETE, "")
    _barrier()
    return out


def export_hf(engine, model, tokenizer, out_dir: Path, *, rank: int, zero_stage: int) -> None:
    """Consolidated HF weights (save_pretrained, safetensors) on rank 0 — gathered from ZeRO-3 shards if needed."""
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        else:
            model.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    _barrier()


_RESUME_KEYS = {"world_size": "world size", "global_batch": "global batch", "schedule": "LR schedule"}


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """One line naming what the resuming run changes against the run that saved the checkpoint (world size,
    global batch, LR schedule), or None. Keys an older checkpoint lacks are not compared."""
    changes = []
    for key, words in _RESUME_KEYS.items():
        if key in saved and saved[key] != now.get(key):
            if key == "schedule" and isinstance(saved[key], dict) and isinstance(now.get(key), dict):
                diff = [f"{k} {saved[key].get(k)} -> {now[key].get(k)}" for k in sorted(set(saved[key]) | set(now[key]))
                        if saved[key].get(k) != now[key].get(k)]
                changes.append(f"{words} ({', '.join(diff)})")
            else:
                changes.append(f"{words} {saved[key]} -> {now.get(key)}")
    return "resuming with a changed " + "; ".join(changes) if changes else None
