"""Checkpoints that survive preemption: DeepSpeed engine state + dsfleet's own (step, data position, RNG),
a COMPLETE marker written only after every rank has saved, and a `latest` pointer replaced atomically after
that — so a kill -9 mid-save leaves `latest` on the previous, loadable checkpoint. Plus the HF export.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsfleet.cli import fail

COMPLETE = "COMPLETE"
STATE_FILE = "dsfleet_state.json"


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


def save(engine, root: Path, step: int, state: dict[str, Any], *, rank: int, keep: int | None) -> Path:
    """Every rank calls this. Returns the checkpoint dir; `latest` points at it only once it is complete."""
    tag = f"step_{step}"
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():  # a partial save of the same step from a killed run
        shutil.rmtree(tag_dir)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        _write_atomic(tag_dir / STATE_FILE, json.dumps(state, indent=1))
        _write_atomic(tag_dir / COMPLETE, "")
        _write_atomic(root / "latest", tag)
        if keep:
            for old in sorted(completed(root), key=_step_of)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return tag_dir


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
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                          load_optimizer_states=load_optimizer, load_lr_scheduler_states=True)
    if load_path is None:
        fail(f"DeepSpeed could not load checkpoint {tag_dir} — check that it matches this model and ZeRO stage")
    state = json.loads((tag_dir / STATE_FILE).read_text())
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if rng_file.is_file() and state.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


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
