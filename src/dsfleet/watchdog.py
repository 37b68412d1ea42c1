"""A lost or stopped rank ends the job within --heartbeat_timeout instead of hanging it.

Why it exists: when one rank dies (SIGKILL, the OOM killer, a lost node) or stops (SIGSTOP, a frozen VM), its peers
wait in their next collective until the backend's timeout (gloo 30 min, NCCL 10-30 min) and what happens then is a
traceback or an abort, not a restart. Here every rank runs a daemon thread that beats into the TCPStore
torch.distributed already has (a client of its own at MASTER_ADDR:MASTER_PORT, with a short timeout, so a stopped
store host is noticed too): rank 0 watches every rank's beat, the others watch rank 0's. A beat that stops advancing
for the timeout, or a store that stops answering, makes the rank print ONE line naming the missing rank and its host
and exit 75 (EXIT_PREEMPTED: "start me again"); the rank that saw it first posts the line in the store so every
survivor exits at its next beat, and leaves OUTPUT_DIR/restart_requested for the Slurm script (srun reports a killed
task's signal, not 75). The launchers restart the whole gang and the run resumes from checkpoints/latest.

A collective that fails in the main thread because a peer went away (gloo: "Connection closed by peer") is held back
(sys.excepthook) until the watchdog names the missing rank, so that path ends the same way: one line, exit 75.
In a pod, each beat also touches DSFLEET_HEARTBEAT_DIR/pid-PID, and the pod launcher ends a rank of its own whose file
grows old (a stopped process cannot end itself). A rank that finishes posts "done" and is no longer watched.
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import threading
import time
from pathlib import Path

from dsfleet.runtime import EXIT_PREEMPTED

BEAT = "dsfleet/heartbeat/"
LOST = "dsfleet/lost"
DONE = b"done"
MARKER = "restart_requested"
PEER_FAILURE_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                      "timeout", "socket closed", "connection refused", "ncclremoteerror", "gloo")

_active: "Watchdog | None" = None


def start(spec, denv, out: Path | None) -> "Watchdog | None":
    """Every rank, right after joining the process group. None on one rank or with --heartbeat_timeout 0."""
    global _active
    if denv.world_size < 2 or not spec.heartbeat_timeout:
        return None
    _active = Watchdog(denv.rank, denv.world_size, denv.master_addr, denv.master_port, spec.heartbeat_timeout, out)
    _active.start()
    sys.excepthook = _peer_failure_hook(sys.excepthook)
    atexit.register(_active.stop, quiet=True)  # an error exit (74, 2) is the main thread's, not a lost peer
    return _active


def stop() -> None:
    """The end of a run that finished or saved after a preemption, before the last barrier: say "done" so peers
    still closing their logs do not take this rank for lost, and stop watching."""
    if _active is not None:
        _active.stop()


class Watchdog:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: int,
                 out: Path | None):
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout_s)
        self.master = f"{master_addr}:{master_port}"
        self.out = out
        self.interval = max(0.5, min(5.0, self.timeout / 6))
        self.host = socket.gethostname()
        self._addr, self._port = master_addr, master_port
        self._stopped = threading.Event()
        self._store = None
        self._beats = 0
        beat_dir = os.environ.get("DSFLEET_HEARTBEAT_DIR")
        self._beat_file = Path(beat_dir) / f"pid-{os.getpid()}" if beat_dir else None
        self._thread = threading.Thread(target=self._run, name="dsfleet-watchdog", daemon=True)

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        import torch.distributed as dist
        self._store = dist.TCPStore(self._addr, self._port, is_master=False, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=self.timeout))
        self._beat()
        self._thread.start()

    def stop(self, quiet: bool = False) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._beat_file is not None:
            self._beat_file.unlink(missing_ok=True)
        if not quiet and self._store is not None:
            try:
                self._store.set_timeout(datetime.timedelta(seconds=min(5.0, self.timeout)))
                self._store.set(f"{BEAT}{self.rank}", DONE)
            except Exception:  # the store host already gone: nobody is left to watch this rank
                pass

    # ------------------------------------------------------------------------------------------------ the thread

    def _beat(self) -> None:
        self._beats += 1
        self._store.set(f"{BEAT}{self.rank}", f"{self._beats} {self.host} {os.getpid()}")
        if self._beat_file is not None:
            self._beat_file.parent.mkdir(parents=True, exist_ok=True)
            self._beat_file.touch()

    def _run(self) -> None:
        started = last_ok = time.monotonic()
        seen: dict[int, tuple[bytes | None, float]] = {}
        watched = [r for r in (range(self.world_size) if self.rank == 0 else [0]) if r != self.rank]
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            try:
                self._beat()
                if self._store.check([LOST]):
                    self._exit(self._store.get(LOST).decode(errors="replace"), post=False)
                for peer in watched:
                    key = f"{BEAT}{peer}"
                    value = self._store.get(key) if self._store.check([key]) else None
                    if value == DONE:
                        continue
                    last = seen.get(peer)
                    if last is None or last[0] != value:
                        seen[peer] = (value, now if last is not None or value is not None else started)
                    elif now - last[1] > self.timeout:
                        self._lost(peer, value, now - last[1])
                last_ok = now
            except Exception as e:  # a store that does not answer: its host, rank 0, is stopped or gone
                if self._stopped.is_set():
                    return
                if time.monotonic() - last_ok > self.timeout:
                    why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
                    self._exit(f"rank 0 ({self.master}, the rendezvous store) has not answered for "
                               f"{time.monotonic() - last_ok:.0f} s ({why})", post=False)

    def _lost(self, peer: int, value: bytes | None, age: float) -> None:
        if value is None:
            self._exit(f"rank {peer} sent no heartbeat in {age:.0f} s (it never started its watchdog)")
            return
        _, host, pid = value.decode(errors="replace").split(" ", 2)
        self._exit(f"rank {peer} (host {host}, pid {pid}) has sent no heartbeat for {age:.0f} s (stopped, killed or "
                   "its node lost)")

    def _exit(self, what: str, post: bool = True) -> None:
        if self._stopped.is_set():
            return
        line = (f"dsfleet: {what} — rank {self.rank} exits {EXIT_PREEMPTED} so the launcher restarts the job from "
                "checkpoints/latest")
        if post:  # every other survivor reads it at its next beat
            try:
                self._store.set_timeout(datetime.timedelta(seconds=min(5.0, self.timeout)))
                self._store.set(LOST, what)
            except Exception:
                pass
        if self.out is not None:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / MARKER).write_text(what + "\n")
            except OSError:
                pass
        print(line, file=sys.stderr, flush=True)
        os._exit(EXIT_PREEMPTED)

    def wait_for_verdict(self) -> None:
        """The main thread after a collective failed: give the watchdog the time to name the missing rank (it ends the
        process); if every peer keeps beating, the collective failed for another reason — say so, exit 75."""
        deadline = time.monotonic() + self.timeout + 2 * self.interval + 5
        while time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.2)


def _is_peer_failure(exc: BaseException) -> bool:
    try:
        import torch.distributed as dist
        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:
        return False
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in PEER_FAILURE_WORDS)


def _peer_failure_hook(previous):
    def hook(exc_type, exc, tb):
        w = _active
        if w is None or w._stopped.is_set() or not _is_peer_failure(exc):
            return previous(exc_type, exc, tb)
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a launcher ending this failed rank (deepspeed's does) wins
        w.wait_for_verdict()  # normally ends the process with the watchdog's line
        first = (str(exc).strip().splitlines() or [exc_type.__name__])[0][:200]
        w._exit(f"a collective failed while every peer still beats ({first})")
    return hook
