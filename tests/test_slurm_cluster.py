"""The local Slurm cluster (tests/slurm_cluster.py) against real slurmctld/slurmd, no mocks: it comes up idle, a
2-task batch job runs both ranks and they reach each other over loopback (gloo all_reduce, MASTER_ADDR from the
nodelist), and the preemption round trips dsfleet's Slurm scripts rely on work — `scontrol requeue` from outside,
and a USR1 (from `scancel --signal=USR1 --batch` and from Slurm's own `--signal=B:USR1@N` timer) that makes the
job checkpoint, exit 75 and requeue itself, restart with SLURM_RESTART_COUNT=1, resume and finish COMPLETED.
`sbatch --test-only` checks scripts against the controller."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster, up  # noqa: F401  (slurm_cluster: the fixture)

# every wait inside is bounded; the outer bound leaves room for the first test to install slurm-wlm + munge
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_up_idle_and_reused(slurm_cluster):
    states = slurm_cluster.node_states()
    assert sorted(states) == sorted(slurm_cluster.nodes), states
    assert all(s in ("idle", "mixed", "allocated") for s in states.values()), states  # other sessions may share it
    assert slurm_cluster.total_cpus >= 2
    for node in slurm_cluster.nodes:  # MASTER_ADDR comes from these names: they must resolve
        socket.gethostbyname(node)
    again, reused = up(owner="pytest")
    assert reused and again.conf == slurm_cluster.conf and again.port == slurm_cluster.port
    status = subprocess.run([sys.executable, "-m", "tests.slurm_cluster", "status"], cwd=REPO, capture_output=True,
                            text=True, timeout=30, env=slurm_cluster.env(DSFLEET_SLURM_DIR=str(slurm_cluster.root)))
    assert status.returncode == 0 and f"export SLURM_CONF={slurm_cluster.conf}" in status.stdout, status


def test_two_task_batch_job(slurm_cluster, tmp_path):
    nodes = len(slurm_cluster.nodes)
    script = write(tmp_path / "ranks.sbatch", f"""#!/bin/bash
#SBATCH --job-name=dsfleet-ranks --nodes={nodes} --ntasks=2 --time=2 --output={tmp_path}/ranks-%j.out
echo "batch on $SLURMD_NODENAME nodelist=$SLURM_JOB_NODELIST"
srun bash -c 'echo "rank=$SLURM_PROCID of $SLURM_NTASKS node=$SLURMD_NODENAME"'
""")
    job = slurm_cluster.sbatch(script, cwd=tmp_path)
    info = slurm_cluster.wait_job(job, timeout=60)
    assert info["ExitCode"] == "0:0", info
    out = lines(tmp_path / f"ranks-{job}.out")
    ranks = sorted(line for line in out if line.startswith("rank="))
    assert [r.split()[0] for r in ranks] == ["rank=0", "rank=1"], out
    assert all("of 2" in r for r in ranks), out
    if nodes == 2:  # one task per node, like two machines
        assert {r.split("node=")[1] for r in ranks} == set(slurm_cluster.nodes), out


def test_srun_ranks_all_reduce_over_gloo(slurm_cluster, tmp_path):
    """What `srun python -m dsfleet.train` needs: 2 tasks, MASTER_ADDR from the nodelist, a gloo group that works."""
    write(tmp_path / "allreduce.py", """import os
import torch
import torch.distributed as dist
dist.init_process_group("gloo", rank=int(os.environ["SLURM_PROCID"]), world_size=int(os.environ["SLURM_NTASKS"]))
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank={dist.get_rank()} sum={t.item():g} master={os.environ['MASTER_ADDR']}", flush=True)
dist.destroy_process_group()
""")
    script = write(tmp_path / "gloo.sbatch", f"""#!/bin/bash
#SBATCH --job-name=dsfleet-gloo --nodes={len(slurm_cluster.nodes)} --ntasks=2 --time=3 --output={tmp_path}/gloo.out
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR MASTER_PORT={free_port()} OMP_NUM_THREADS=1
srun {sys.executable} {tmp_path}/allreduce.py
""")
    job = slurm_cluster.sbatch(script, cwd=tmp_path)
    slurm_cluster.wait_job(job, timeout=100)
    out = lines(tmp_path / "gloo.out")
    assert sorted(line.split()[0] for line in out if line.startswith("rank=")) == ["rank=0", "rank=1"], out
    assert all("sum=3" in line for line in out if line.startswith("rank=")), out


def test_scontrol_requeue_restarts_the_job(slurm_cluster, tmp_path):
    marker = tmp_path / "starts.txt"
    script = write(tmp_path / "sleep.sbatch", f"""#!/bin/bash
#SBATCH --job-name=dsfleet-requeue --ntasks=1 --requeue --open-mode=append --output={tmp_path}/sleep-%j.out
echo "restart=${{SLURM_RESTART_COUNT:-0}}" >> {marker}
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 300 & wait $!; fi
echo finished >> {marker}
""")
    job = slurm_cluster.sbatch(script, cwd=tmp_path)
    wait_for(lambda: "restart=0" in lines(marker), 45, "the job to start")
    slurm_cluster.run("scontrol", "requeue", str(job))
    info = slurm_cluster.wait_job(job, timeout=60)
    assert lines(marker) == ["restart=0", "restart=1", "finished"], lines(marker)
    assert info.get("Restarts") in ("1", None), info  # None: read back from the job-completion log


WORKER = """#!/bin/bash
# A stand-in for dsfleet.train: resumes from ./ckpt if there is one; on USR1 it saves a checkpoint and exits 75.
cd "$1"
if [ -f ckpt ]; then echo "resumed from step $(cat ckpt)" >> events.txt; exit 0; fi
step=0
trap 'echo $step > ckpt; echo "checkpoint at step $step" >> events.txt; exit 75' USR1
echo "training from scratch" >> events.txt
while true; do step=$((step + 1)); sleep 0.2; done
"""


def preemptible_script(tmp_path: Path, signal_opt: str) -> Path:
    """The shape of dsfleet's sbatch scripts: the batch shell forwards USR1 to the trainer, and when the trainer
    exits 75 (checkpoint saved) the script requeues its own job."""
    write(tmp_path / "worker.sh", WORKER)
    return write(tmp_path / "preempt.sbatch", f"""#!/bin/bash
#SBATCH --job-name=dsfleet-preempt --ntasks=1 --requeue --open-mode=append {signal_opt}
#SBATCH --output={tmp_path}/preempt-%j.out
cd {tmp_path}
echo "start restart=${{SLURM_RESTART_COUNT:-0}}" >> events.txt
bash worker.sh {tmp_path} &
pid=$!
trap 'echo "batch got USR1" >> events.txt; kill -USR1 $pid' USR1
wait $pid; rc=$?
while [ $rc -gt 128 ] && kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done
if [ $rc = 75 ]; then
  echo "requeue" >> events.txt
  scontrol requeue "$SLURM_JOB_ID"
  sleep 60  # Slurm ends this run now
fi
exit $rc
""")


EXPECTED = [r"start restart=0", r"training from scratch", r"batch got USR1", r"checkpoint at step (\d+)", r"requeue",
            r"start restart=1", r"resumed from step (\d+)"]


def check_round_trip(events: list[str], info: dict) -> None:
    """USR1 -> checkpoint -> exit 75 -> requeue -> restart 1 resumes from the very step saved -> COMPLETED."""
    assert len(events) == len(EXPECTED) and all(re.fullmatch(p, e) for p, e in zip(EXPECTED, events)), events
    assert events[3].split()[-1] == events[6].split()[-1], events
    assert info.get("Restarts") in ("1", None), info  # None: read back from the job-completion log


def test_usr1_checkpoint_exit75_requeue(slurm_cluster, tmp_path):
    script = preemptible_script(tmp_path, "--signal=B:USR1@30")
    job = slurm_cluster.sbatch(script, cwd=tmp_path)
    events = tmp_path / "events.txt"
    wait_for(lambda: "training from scratch" in lines(events), 45, "the trainer to start")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # what Slurm sends 30 s before the limit
    info = slurm_cluster.wait_job(job, timeout=60)
    check_round_trip(lines(events), info)


def test_signal_timer_delivers_usr1_before_the_time_limit(slurm_cluster, tmp_path):
    """Slurm's own timer: --time=1 with --signal=B:USR1@50 signals ~10 s into the run (then the requeued run
    finishes from the checkpoint well inside its minute)."""
    script = preemptible_script(tmp_path, "--time=1 --signal=B:USR1@50")
    job = slurm_cluster.sbatch(script, cwd=tmp_path)
    info = slurm_cluster.wait_job(job, timeout=100)
    check_round_trip(lines(tmp_path / "events.txt"), info)


def test_sbatch_test_only(slurm_cluster, tmp_path):
    ok = write(tmp_path / "ok.sbatch", f"""#!/bin/bash
#SBATCH --nodes={len(slurm_cluster.nodes)} --ntasks=2 --time=5
srun hostname
""")
    too_big = write(tmp_path / "too_big.sbatch", """#!/bin/bash
#SBATCH --ntasks=1 --cpus-per-task=999
srun hostname
""")
    proc = slurm_cluster.run("sbatch", "--test-only", ok, cwd=tmp_path, check=False)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc
    proc = slurm_cluster.run("sbatch", "--test-only", too_big, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "not available" in proc.stderr, proc  # the controller really judges it
    # the committed scripts: tests/test_slurm_jobs.py::test_every_committed_sbatch_passes_test_only


def test_a_failed_start_says_why_and_leaves_nothing_running(slurm_cluster, tmp_path, monkeypatch):
    """A daemon that cannot start gives SlurmUnavailable with its own log line (the fixture's skip reason), and
    what did start (munged) is stopped again."""
    from tests import slurm_cluster as sc
    render = sc._render
    monkeypatch.setattr(sc, "_render",
                        lambda root, plan: render(root, plan).replace("select/cons_tres", "select/bogus"))
    root = tmp_path / "broken"
    with pytest.raises(sc.SlurmUnavailable) as err:
        sc.up(owner="pytest", root=root)
    assert "slurmctld" in str(err.value) and "select/bogus" in str(err.value), err.value
    assert not sc._job_processes(root)
    munged = sc._read_pid(root / "munge" / "munged.pid")
    assert munged is None or not sc._alive(munged)
