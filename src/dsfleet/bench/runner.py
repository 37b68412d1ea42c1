"""The processes a measurement needs, run one way: `dsfleet bench` and scripts/gpu_memory_check.py both start a
training launch with its own log file, poll it against a deadline and a "measured enough" test, kill its whole
process group (launcher and ranks) once done, and read what it left in metrics.jsonl. One launch/poll/kill loop,
one metrics reader, one free-port helper and one nvidia-smi query serve both, so a fix to any (a stray rank left
on the GPU, a half-written row) reaches every measurement.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class Finished:
    """What one launch did: whether it got to `done` (at any time: before its exit, at its exit or at the
    deadline), its exit status, and its times (`started` and `first_at` are unix times)."""
    reached: bool
    timed_out: bool
    rc: int | None
    started: float
    wall_s: float
    first_at: float | None = None


def launch(cmd: list[str], env: dict[str, str], log: Path, done: Callable[[], bool], timeout: float,
           first: Callable[[], float | None] | None = None, grace_s: float = 0.0, poll_s: float = 0.2,
           cwd: str | Path | None = None) -> Finished:
    """Run `cmd` in a new process group with stdout and stderr in `log`; stop it `grace_s` seconds after `done()`
    first holds (0: at once — a training run's end-of-run checkpoint and export are not part of the measurement),
    when it exits, or `timeout` seconds after the start. `first()` is asked until it answers (the unix time of
    the first finished step, say)."""
    started = time.time()
    reached_at = None
    first_at = None
    timed_out = False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        try:
            while True:
                rc = proc.poll()
                now = time.time()
                if first_at is None and first is not None:
                    first_at = first()
                if reached_at is None and done():
                    reached_at = now
                if rc is not None:
                    break
                if reached_at is not None and now - reached_at >= grace_s:
                    kill_group(proc)
                    break
                if now - started > timeout:
                    kill_group(proc)
                    timed_out = True
                    break
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                kill_group(proc)
    reached = reached_at is not None or done()
    return Finished(reached=reached, timed_out=timed_out, rc=proc.returncode, started=started,
                    wall_s=time.time() - started, first_at=first_at)


def kill_group(proc: subprocess.Popen) -> None:
    """End the launcher and the ranks it started: the process group `launch` created for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    time.sleep(1)  # let the driver release the ranks' device memory before the next launch


def free_port() -> int:
    """A TCP port nobody listens on right now, for a launch's rendezvous (MASTER_PORT / --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_env(**extra: str) -> dict[str, str]:
    """This environment for a child that must run this dsfleet (its source first on PYTHONPATH), unbuffered so
    its log is current while it is polled."""
    import dsfleet
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    src = str(Path(dsfleet.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.update(extra)
    return env


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as it stands: one dict per row; a row being written right now (or no file yet) is left out."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written right now
            pass
    return rows


def last_step(path: Path, key: str = "loss") -> int:
    """The highest step of metrics.jsonl's rows that carry `key` (0 before the first): how far a run has got."""
    return max((r["step"] for r in read_rows(path) if key in r), default=0)


def step_seconds(rows: list[dict[str, Any]], tokens_per_step: int) -> list[float]:
    """Each row's wall time: its step's tokens over its tokens/s (rows are single steps: --logging_steps 1)."""
    return [tokens_per_step / r["tokens_per_s"] for r in rows]


def last_error(log: Path) -> str:
    """The line that says what went wrong: the last exception or error line of a launch's log, else its end."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception|error:|Killed|CUDA out of memory)", line)
              and "Warning" not in line]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:240]


def gpu_query(*fields: str) -> list[list[str]] | None:
    """`nvidia-smi --query-gpu=FIELDS` without units: one list of values per GPU; None when nvidia-smi cannot run.
    Asked of nvidia-smi, so the caller never creates a CUDA context of its own (every launch gets the whole card)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.strip()]
