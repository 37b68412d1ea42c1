"""Test helpers that start real training processes: the deepspeed launcher with CPU ranks, or one plain
process, and read back what the run left (metrics.jsonl). Shared by every test that trains."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def deepspeed_train(args: list[str], ranks: int = 2, timeout: int = 400, env: dict | None = None,
                    script: str | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module dsfleet.train ARGS` on CPU ranks (or a script path instead of the module)."""
    target = [script] if script else ["--module", "dsfleet.train"]
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *target,
           "--no_progress", *args]
    return subprocess.run(cmd, env=env or cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def python_train(args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """One plain process: `python -m dsfleet.train ARGS`."""
    return subprocess.run([sys.executable, "-m", "dsfleet.train", *args], env=env or cpu_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def allreduce_segments_left(port: int | str) -> list[str]:
    """DeepSpeed CPU all-reduce /dev/shm segments still named for a run on this master port (dsfleet removes them)."""
    return [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in f]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"
