"""The Slurm batch script `dsfleet render --target slurm` writes, submitted with `sbatch` to the real local Slurm
cluster (tests/slurm_cluster.py: slurmctld + 2 slurmd on this host, no mocks).

The script is the one template every slurm/*.sbatch comes from, rendered for the tiny preset in CPU mode (`--cpu`:
ntasks-per-node = ranks, no GPU request, DS_ACCELERATOR=cpu): `srun` starts 2 tasks of `python -m dsfleet.train`,
which find their ranks from SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID and rank 0's address from the
allocation's nodelist, and train as 2 real DeepSpeed ranks over gloo.

- a plain run ends COMPLETED with metrics and checkpoints in its run dir ($DSFLEET_OUTPUT_ROOT/<job name>-<job id>);
  its data was prepared by the script's one prepare task into $DSFLEET_OUTPUT_ROOT/token-cache before the ranks
  started, and the ranks say they reused that entry;
- preemption, both ways Slurm does it: the USR1 that `--signal=B:USR1@N` sends before the time limit (delivered on
  demand with `scancel --signal=USR1 --batch`), and `scontrol requeue` from outside (TERM to every process). Either
  way the ranks save a checkpoint and exit 75, the job is requeued (by the script itself after USR1), starts again
  with SLURM_RESTART_COUNT=1, resumes from the checkpoint and ends COMPLETED; the losses after the resume equal the
  uninterrupted run's at the same steps (same seed; measured equal to ~1e-6, asserted within RTOL);
- 2 nodes x 1 rank: the ranks on two slurmd nodes meet at the first host of the nodelist;
- every committed slurm/*.sbatch is accepted by the controller (`sbatch --test-only`), and so is one with every site
  option set;
- every job here runs with bash 4.2's `wait` (tests/test_render.py's OLD_BASH_WAIT through BASH_ENV, which the batch
  shell reads: no `wait -n`/`-p`), the shell of RHEL 7; with a stand-in trainer (DSFLEET_PYTHON, a shell script) the
  script's verdicts are checked directly: exit 0 -> COMPLETED; every task fails -> FAILED with that code, never 0;
  exit 75 after the requeue cap -> FAILED 75 with the reason, no requeue;
- a real 2-rank batch job whose rank 1 gets SIGSTOP: rank 0's watchdog exits 75, srun ends the stopped task, the
  script requeues on the restart_requested marker, and the restarted job resumes and ends COMPLETED.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import psutil

from tests.launch import REPO, VENV_BIN, losses
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
from tests.test_render import OLD_BASH_WAIT

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(420)]

# the preemption tests signal at step 12 and need the run still going when Slurm's signal reaches the ranks: 28 more
# steps were 1.4 s on a 2-core box, which a faster CPU or a slow slurmctld round trip could use up
MAX_STEPS = 100
SAVE_STEPS = 10
RTOL = 1e-4  # losses after a resume vs the uninterrupted run, relative
FLAGS = ["--from_scratch", "--dataset_name", "embedded", "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size",
         "16", "--logging_steps", "1", "--save_steps", str(SAVE_STEPS), "--zero", "2", "--seed", "42", "--no_progress"]
JOB_TIMEOUT = 240  # s for one job to reach its final state, restarts included


def render(out: Path, nodes: int, ranks: int, *options: str, flags: tuple[str, ...] = ()) -> Path:
    proc = subprocess.run([str(VENV_BIN / "dsfleet"), "render", "--preset", "t5_tiny", "--target", "slurm", "--nodes",
                           str(nodes), "--gpus-per-node", str(ranks), "--cpu", "--time", "00:15:00", "--signal-lead",
                           "60", *options, "--out", str(out), "--", *FLAGS, *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out / "slurm" / "t5_tiny.sbatch"


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    """1 node x 2 CPU ranks: the tiny preset through the same template as slurm/t5_3b.sbatch."""
    return render(tmp_path_factory.mktemp("render"), 1, 2)


class Job:
    def __init__(self, cluster, script: Path, workdir: Path, python: str = sys.executable, **env_extra: str):
        self.cluster, self.workdir, self.runs = cluster, workdir, workdir / "runs"
        (workdir / "old_bash_wait.sh").write_text(OLD_BASH_WAIT)
        env = cluster.env(DSFLEET_PYTHON=python, DSFLEET_OUTPUT_ROOT=str(self.runs),
                          BASH_ENV=str(workdir / "old_bash_wait.sh"), **env_extra)
        self.id = cluster.sbatch(script, cwd=workdir, env=env)
        self.run_dir = self.runs / f"dsfleet-t5-tiny-{self.id}"  # $SLURM_JOB_NAME-$SLURM_JOB_ID
        self.log = workdir / f"dsfleet-t5-tiny-{self.id}.out"  # --output=%x-%j.out in the submit dir

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def ours(self) -> str:
        return "\n".join(line for line in self.text().splitlines() if line.startswith(("dsfleet", "srun", "slurmstepd")))

    def steps(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return sum(1 for line in path.read_text().splitlines() if '"loss"' in line) if path.exists() else 0

    def wait_steps(self, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.steps() < n:
            state = self.cluster.state(self.id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING"):
                raise AssertionError(f"job {self.id} is {state} before step {n}\n{self.ours()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {self.id} did not reach step {n} in {timeout:.0f}s\n{self.ours()}\n"
                                     f"{self.cluster.log_tail()}")
            time.sleep(0.2)

    def wait(self, states: tuple[str, ...] = ("COMPLETED",), timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        try:
            return self.cluster.wait_job(self.id, states, timeout=timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- job output\n{self.ours()}") from None


@pytest.fixture(scope="module")
def baseline(slurm_cluster, script, tmp_path_factory):  # noqa: F811
    """The uninterrupted run: the reference curve for the preemption tests."""
    job = Job(slurm_cluster, script, tmp_path_factory.mktemp("baseline"))
    info = job.wait()
    return job, info


def test_tiny_sbatch_runs_to_completed(baseline):
    job, info = baseline
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode", "0:0") == "0:0", info
    out = job.ours()
    assert f"dsfleet: job {job.id} restart 0" in out and "2 rank(s) via slurm" in out, out
    assert "invalid option" not in job.text()  # the loop never asked bash 4.2's wait for -n or -p
    # the data: one task prepared it into the shared cache before the ranks started; the ranks reused that entry
    cache = job.runs / "token-cache"
    m = re.search(r"dsfleet prepare: token cache built: (\S+) — train ([\d,]+) rows", out)
    assert m and Path(m.group(1)).parent == cache / "tokens", out
    reused = f"dsfleet: token cache reused: {m.group(1)} — train {m.group(2)} rows"
    assert reused in out and out.index(m.group(0)) < out.index(reused) < out.index("2 rank(s) via slurm"), out
    assert out.count("token cache built") == 1, out  # no rank built its own
    loss = losses(job.run_dir)
    assert sorted(loss) == list(range(1, MAX_STEPS + 1)), sorted(loss)
    assert sum(loss[s] for s in range(MAX_STEPS - 4, MAX_STEPS + 1)) < 0.5 * sum(loss[s] for s in range(1, 6)), loss
    ckpt = job.run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{MAX_STEPS}"
    assert (ckpt / f"step_{SAVE_STEPS}" / "COMPLETE").is_file()
    assert (job.run_dir / "final" / "model.safetensors").is_file()


def check_resumed(job: Job, info: dict, baseline_job: Job, signal_words: str) -> None:
    out = job.ours()
    assert info["JobState"] == "COMPLETED", info
    assert info.get("Restarts") in ("1", None), info  # None: read back from the job-completion log
    assert f"dsfleet: job {job.id} restart 0" in out and f"dsfleet: job {job.id} restart 1" in out, out
    m = re.search(rf"preempted \((?:{signal_words})\) — checkpoint step (\d+) saved", out)
    assert m, out
    saved = int(m.group(1))
    assert SAVE_STEPS < saved < MAX_STEPS, out
    assert f"resumed from {job.run_dir}/checkpoints/step_{saved} at step {saved}" in out, out
    loss, ref = losses(job.run_dir), losses(baseline_job.run_dir)
    assert sorted(loss) == list(range(1, MAX_STEPS + 1)), sorted(loss)  # every step once, across the restart
    after = range(saved + 1, MAX_STEPS + 1)
    off = {s: (loss[s], ref[s]) for s in after if abs(loss[s] - ref[s]) > RTOL * abs(ref[s])}
    assert not off, f"after the resume at step {saved} the curve departs from the uninterrupted run: {off}"
    assert (job.run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS}"


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, script, baseline, tmp_path):  # noqa: F811
    """The signal `--signal=B:USR1@N` sends N s before the time limit, delivered now to the batch shell."""
    job = Job(slurm_cluster, script, tmp_path)
    job.wait_steps(SAVE_STEPS + 2)  # a periodic checkpoint exists; training is under way
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job.id))
    info = job.wait()
    assert f"requeueing job {job.id}" in job.ours(), job.ours()  # the script requeued its own job on exit 75
    check_resumed(job, info, baseline[0], "SIGUSR1")


def test_scontrol_requeue_checkpoints_and_resumes(slurm_cluster, script, baseline, tmp_path):  # noqa: F811
    """Requeue from outside (an admin, a preemption policy): Slurm sends TERM to every process of the job."""
    job = Job(slurm_cluster, script, tmp_path)
    job.wait_steps(SAVE_STEPS + 2)
    slurm_cluster.run("scontrol", "requeue", str(job.id))
    info = job.wait()
    check_resumed(job, info, baseline[0], "SIGTERM|a peer's signal")


def test_two_nodes_meet_at_the_first_host_of_the_nodelist(slurm_cluster, tmp_path):  # noqa: F811
    if len(slurm_cluster.nodes) < 2:
        pytest.skip("the local cluster has one node on this machine (no second resolvable host name)")
    script = render(tmp_path / "render", 2, 1)
    job = Job(slurm_cluster, script, tmp_path)
    info = job.wait()
    assert info["JobState"] == "COMPLETED", info
    out = job.ours()
    m = re.search(r"restart 0 on (\S+): 2 ranks, master (\S+):\d+", out)
    assert m, out
    nodelist = slurm_cluster.run("scontrol", "show", "hostnames", m.group(1)).stdout.split()
    assert len(nodelist) == 2 and m.group(2) == nodelist[0], out  # rank 0 = the first host of the allocation
    assert sorted(losses(job.run_dir)) == list(range(1, MAX_STEPS + 1))


def test_every_committed_sbatch_passes_test_only(slurm_cluster, script, tmp_path):  # noqa: F811
    """The controller judges every directive of every committed script: as written against the `gpu` partition
    of 8-GPU nodes it is written for (tests/slurm_cluster.py: CLOUD nodes no slurmd backs), and with its sizes
    scaled to the real CPU nodes (0 GPUs, 1 task of 1 CPU per node); a node-too-small request is refused. The
    CPU-mode tiny script is checked as written."""
    proc = slurm_cluster.run("sbatch", "--test-only", script, cwd=tmp_path, check=False)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    committed = sorted((REPO / "slurm").glob("*.sbatch"))
    assert len(committed) >= 5, committed
    for path in committed:
        text = path.read_text()
        nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
        as_written = slurm_cluster.run("sbatch", "--test-only", "-p", "gpu", path, cwd=tmp_path, check=False)
        assert as_written.returncode == 0 and "in partition gpu" in as_written.stderr, f"{path.name}: {as_written.stderr}"
        scaled = slurm_cluster.run("sbatch", "--test-only", "--gpus-per-node=0", "--ntasks-per-node=1",
                                   "--cpus-per-task=1", f"--nodes={min(nodes, len(slurm_cluster.nodes))}", path,
                                   cwd=tmp_path, check=False)
        assert scaled.returncode == 0 and "to start at" in scaled.stderr, f"{path.name}: {scaled.stderr}"
    too_many = slurm_cluster.run("sbatch", "--test-only", "-p", "gpu", "--gpus-per-node=9", committed[0], cwd=tmp_path,
                                 check=False)
    assert too_many.returncode != 0 and "not available" in too_many.stderr, too_many


# ------------------------------------------------------------------------------------------------ the script's verdicts

FAKE_TRAINER = """#!/bin/bash
# stands in for the interpreter: `FAKE -m dsfleet.cli prepare ARGS` in the one prepare task (exits with
# FAKE_PREPARE_CODE), then `FAKE -m dsfleet.train ARGS` in each srun task (exits with FAKE_CODE)
if [ "$2" = dsfleet.cli ]; then
  if [ -n "${FAKE_PREPARE_SLEEP:-}" ]; then echo "dsfleet-fake: preparing"; sleep "$FAKE_PREPARE_SLEEP" & wait $!; fi
  echo "dsfleet-fake: prepare task $SLURM_PROCID of $SLURM_NTASKS: $3 $4 $5 exits ${FAKE_PREPARE_CODE:-0}"
  exit "${FAKE_PREPARE_CODE:-0}"
fi
echo "dsfleet-fake: task $SLURM_PROCID restart ${SLURM_RESTART_COUNT:-0} exits $FAKE_CODE"
exit "$FAKE_CODE"
"""


@pytest.mark.parametrize("code, state, exit_code, words", [
    (0, "COMPLETED", "0:0", None),
    (3, "FAILED", "3:0", None),
    (75, "FAILED", "75:0", "has restarted 0 times (DSFLEET_MAX_REQUEUES=0): not requeueing"),
    ("prepare 2", "FAILED", "2:0", "dsfleet: preparing the data failed (exit 2: the line above says why)"),
])
def test_the_script_s_verdict_follows_the_trainer(slurm_cluster, script, tmp_path, code, state, exit_code, words):  # noqa: F811
    """Never exit 0 without training: the batch script's own exit is the trainer's (or the data preparation's, which
    runs first, in one task), under bash 4.2's wait."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    prepare_code = code.split()[1] if isinstance(code, str) else "0"
    job = Job(slurm_cluster, script, tmp_path, python=str(fake), FAKE_CODE=str(code), DSFLEET_MAX_REQUEUES="0",
              FAKE_PREPARE_CODE=prepare_code)
    info = job.wait((state,), timeout=90)
    assert info.get("ExitCode") == exit_code, (info, job.text())
    text = job.text()
    assert text.count(f"prepare task 0 of 1: prepare --world-size 2 exits {prepare_code}") == 1, text
    if isinstance(code, str):  # the preparation failed: no training task started
        assert "dsfleet-fake: task" not in text, text
        assert text.index("preparing the data into") < text.index("prepare task 0"), text
    else:
        assert text.count(f"exits {code}") == 2 + (code == 0), text  # both tasks ran to their end (+ prepare's 0)
        assert text.index("prepare task 0") < text.index("dsfleet-fake: task"), text  # prepared before the ranks
    assert "invalid option" not in text, text
    if words:
        assert words in text, text


def test_a_signal_while_preparing_takes_the_requeue_path(slurm_cluster, script, tmp_path):  # noqa: F811
    """USR1 (the time-limit warning) during the data preparation: nothing to checkpoint, so the script stops the
    prepare task and exits 75, the requeue path (here past the cap: FAILED 75 with the reason); no rank started."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    job = Job(slurm_cluster, script, tmp_path, python=str(fake), FAKE_CODE="0", FAKE_PREPARE_SLEEP="60",
              DSFLEET_MAX_REQUEUES="0")
    deadline = time.monotonic() + 60
    while "dsfleet-fake: preparing" not in job.text():
        assert time.monotonic() < deadline, job.text()
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job.id))
    info = job.wait(("FAILED",), timeout=90)
    text = job.text()
    assert info.get("ExitCode") == "75:0", (info, text)
    assert "dsfleet: USR1 while preparing the data (no checkpoint yet): restart requested" in text, text
    assert "has restarted 0 times (DSFLEET_MAX_REQUEUES=0): not requeueing" in text, text
    assert "dsfleet-fake: task" not in text and "exits 0" not in text, text  # no rank, and the prepare never finished


def test_every_site_option_passes_test_only(slurm_cluster, tmp_path):  # noqa: F811
    """Account, QOS, memory, exclusive, constraint, setup, roots, offline cache, requeue cap: the controller accepts
    the script (the local nodes carry no features, so --constraint is judged as written and then cleared)."""
    path = render(tmp_path / "render", 1, 2, "--account", "proj-42", "--mem", "500M", "--exclusive", "--constraint",
                  "h100&ib", "--setup", "export SITE_SETUP=1 && umask 0002", "--output-root", "/tmp/dsfleet-runs",
                  "--hf-home", "$TMPDIR/hf", "--hf-offline", "--max-requeues", "3", "--qos", "normal")
    as_written = slurm_cluster.run("sbatch", "--test-only", path, cwd=tmp_path, check=False)
    assert as_written.returncode == 0 or "node configuration is not available" in as_written.stderr or \
        "Invalid feature" in as_written.stderr, as_written.stderr  # only the features this cluster lacks
    cleared = slurm_cluster.run("sbatch", "--test-only", "--constraint=", path, cwd=tmp_path, check=False)
    assert cleared.returncode == 0 and "to start at" in cleared.stderr, cleared.stderr


def rank_process(run_dir: Path, procid: str) -> psutil.Process:
    """The srun task with SLURM_PROCID=procid training into run_dir (slurmd runs it on this machine)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.info["cmdline"] and "dsfleet.train" in p.info["cmdline"] and str(run_dir) in p.info["cmdline"] \
                    and p.environ().get("SLURM_PROCID") == procid:
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no rank {procid} training into {run_dir}")


@pytest.mark.timeout(600)
def test_a_stopped_rank_ends_in_a_requeue_and_a_finished_run(slurm_cluster, tmp_path):  # noqa: F811
    script = render(tmp_path / "render", 1, 2, flags=("--heartbeat_timeout", "10"))
    job = Job(slurm_cluster, script, tmp_path)
    job.wait_steps(SAVE_STEPS + 2)
    rank_process(job.run_dir, "1").suspend()  # SIGSTOP
    info = job.wait(timeout=420)
    out = job.text()
    assert info["JobState"] == "COMPLETED", (info, out[-3000:])
    assert re.search(r"dsfleet: rank 1 \(host \S+, pid \d+\) has sent no heartbeat for \d+ s", out), out[-3000:]
    assert f"requeueing job {job.id}" in out and f"dsfleet: job {job.id} restart 1" in out, job.ours()
    m = re.search(rf"resumed from {re.escape(str(job.run_dir))}/checkpoints/step_(\d+) at step (\d+)", out)
    assert m and int(m.group(1)) >= SAVE_STEPS, job.ours()
    assert sorted(losses(job.run_dir)) == list(range(1, MAX_STEPS + 1))
    assert (job.run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS}"
