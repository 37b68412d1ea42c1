"""A lost or stopped rank never hangs the job (dsfleet/watchdog.py), with real DeepSpeed CPU ranks over gloo.

Two `python -m dsfleet.train` processes are started the way the Kubernetes pod launcher starts them (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the env; no launcher above them that would kill the survivors for us). Once
a checkpoint exists — written by --save_interval_minutes, the time-based interval, which both ranks must agree on or
the save itself would hang — rank 1 gets SIGSTOP (a frozen process: its TCP connections stay open, so gloo would
wait its whole timeout) or SIGKILL (gone: rank 0's collective fails at once). Either way rank 0 must exit 75 within
--heartbeat_timeout plus a few seconds, with one line naming rank 1 and its host and no traceback. A new 2-rank run
then resumes from checkpoints/latest and re-runs the steps after it with the losses of the first run.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.launch import REPO, cpu_env, deepspeed_train, explain, free_port, losses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HEARTBEAT = 10  # s: --heartbeat_timeout of these runs
GRACE = 8  # s on top: one beat interval, a store round trip, interpreter exit
# The fault must land mid-run on any machine: a checkpoint every 0.6 s of training and steps enough that no CPU
# finishes them before the first one (CI once ran 120 steps inside a 3 s interval: both ranks ended untouched).
STEPS = 400
ARGS = ["--preset", "t5_tiny", "--from_scratch", "--dataset_name", "embedded", "--logging_steps", "1",
        "--per_device_train_batch_size", "8", "--seed", "11", "--report_to", "jsonl", "--zero", "2",
        "--max_steps", str(STEPS), "--save_interval_minutes", "0.01", "--save_total_limit", "2",
        "--heartbeat_timeout", str(HEARTBEAT), "--dist_timeout", "600", "--no_progress"]


def start_ranks(out, tmp_path):
    port = free_port()
    procs = []
    for rank in (0, 1):
        log = open(tmp_path / f"rank{rank}.log", "w")
        env = cpu_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "dsfleet.train", *ARGS, "--output_dir", str(out)],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_for_checkpoint_and_steps(out, procs, timeout=240):
    """Until a complete checkpoint exists and training is past it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a rank ended before the fault"
        latest = out / "checkpoints" / "latest"
        if latest.is_file() and (out / "metrics.jsonl").is_file():
            saved = int(latest.read_text().split("_")[1])
            if losses(out) and max(losses(out)) >= saved + 3:
                return saved
        time.sleep(0.1)
    raise AssertionError("no checkpoint and progress past it")


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_a_stopped_or_killed_rank_ends_its_peer_with_one_line_and_the_run_resumes(tmp_path, sig):
    out = tmp_path / "run"
    procs = start_ranks(out, tmp_path)
    try:
        wait_for_checkpoint_and_steps(out, procs)
        procs[1].send_signal(sig)
        hit = time.monotonic()
        try:
            code = procs[0].wait(timeout=HEARTBEAT + GRACE + 30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank 0 still running {HEARTBEAT + GRACE + 30} s after {sig.name} of rank 1 "
                                 f"(a hang)\n{(tmp_path / 'rank0.log').read_text()[-3000:]}")
        took = time.monotonic() - hit
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    log0 = (tmp_path / "rank0.log").read_text()
    assert code == 75, f"rank 0 exit {code}\n{log0[-3000:]}"
    assert took <= HEARTBEAT + GRACE, f"rank 0 took {took:.1f} s after {sig.name} (timeout {HEARTBEAT} s)"
    lines = [line for line in log0.splitlines() if "no heartbeat" in line or "Traceback" in line or " exits 75" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("dsfleet: rank 1 (host ") and f"{socket.gethostname()}" in lines[0], lines[0]
    assert "rank 0 exits 75 so the launcher restarts the job" in lines[0], lines[0]
    assert (out / "restart_requested").read_text().startswith("rank 1 (host ")  # for the Slurm script
    saved = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    first = losses(out)
    reached = max(first)
    assert reached > saved

    resumed = deepspeed_train([*ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "auto"], timeout=400)
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {out}/checkpoints/step_{saved} at step {saved}" in resumed.stdout, explain(resumed)
    assert "has sent no heartbeat" not in resumed.stdout + resumed.stderr  # a finished run is no lost peer
    curve = losses(out)
    assert max(curve) == STEPS and sorted(curve) == list(range(1, STEPS + 1))
    again = {s: (first[s], curve[s]) for s in range(saved + 1, reached + 1)
             if abs(first[s] - curve[s]) > 1e-4 * abs(first[s]) + 1e-6}
    assert not again, f"the resumed run departs from the first one after step {saved}: {again}"
