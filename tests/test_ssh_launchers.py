"""Multi-node launches without Slurm or Kubernetes, for real: the deepspeed launcher's pdsh and openmpi runners and a
plain `mpirun` start the tiny GPT-2 preset as 2 CPU ranks on 2 "hosts" of a loopback OpenSSH cluster
(tests/ssh_cluster.py: node1 = 127.0.0.1, node2 = 127.0.0.2, one sshd, host keys checked). Each run must train (loss
falls), write a checkpoint, and reach both hosts over ssh (pdsh's per-host output prefixes; sshd's log).

What crosses into the remote shells, and how (what docs/multinode.md tells users):
- the deepspeed runners export PYTHON* variables of the launching shell plus every NAME=VALUE line of
  ./.deepspeed_env (or ~/.deepspeed_env): DS_ACCELERATOR=cpu, OMP_NUM_THREADS, PATH (and MASTER_PORT for openmpi,
  whose runner ignores --master_port) go there;
- `--no_ssh_check --master_addr`: DeepSpeed's own pre-check runs a bare `ssh HOST hostname`, which reads only
  ~/.ssh/config; this cluster's config is a file passed with -F (PDSH_SSH_ARGS_APPEND, OMPI_MCA_plm_rsh_args), and
  `dsfleet preflight` does that check (and more) instead;
- openmpi: `--launcher_args "--mca btl_tcp_if_include lo"` replaces the runner's default `eth0` (this cluster's only
  network is loopback);
- plain mpirun: `-x NAME` for each variable; ranks come from OMPI_COMM_WORLD_* and rank 0's address over mpi4py.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import explain, free_port, losses
from tests.ssh_cluster import ssh_cluster  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.ssh, pytest.mark.slow, pytest.mark.timeout(420)]

VENV_BIN = Path(sys.executable).parent
# the training entry point's contract (docs/ARCHITECTURE.md), small enough for 2 CPU ranks on 2 cores
TRAIN = ["--preset", "gpt2_tiny", "--from_scratch", "--dataset_name", "embedded", "--do_train", "--zero", "2",
         "--max_steps", "6", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--no_progress"]
RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"}


def need(tool):
    if not shutil.which(tool):
        pytest.skip(f"{tool} not installed — run make sysdeps")


@pytest.fixture
def workdir(tmp_path, ssh_cluster):
    """A launch directory with the 2-host hostfile (1 slot each) and a .deepspeed_env for the remote shells."""
    ssh_cluster.write_hostfile(tmp_path / "hostfile")
    return tmp_path


def write_deepspeed_env(workdir, **extra):
    lines = [f"{k}={v}" for k, v in {**RANK_ENV, **extra}.items()]
    (workdir / ".deepspeed_env").write_text("\n".join(lines) + "\n")  # NAME=VALUE lines only: no blanks, no comments


def launch(cmd, cluster, workdir, timeout=360):
    proc = subprocess.Popen(cmd, cwd=workdir, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our launcher's group; remote ranks go with sshd at teardown
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_trained(proc, out):
    assert proc.returncode == 0, explain(proc)
    assert "2 rank(s) via" in proc.stdout + proc.stderr, explain(proc)
    ls = losses(out)
    assert sorted(ls) == list(range(1, 7)), ls
    assert ls[6] < ls[1], f"loss did not fall: {ls}"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_6"
    assert (out / "checkpoints" / "step_6").is_dir()


def test_deepspeed_pdsh_two_hosts(ssh_cluster, workdir):
    need("pdsh")
    write_deepspeed_env(workdir)
    out = workdir / "run"
    cmd = [str(VENV_BIN / "deepspeed"), "--hostfile", "hostfile", "--launcher", "pdsh", "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", "dsfleet.train", *TRAIN, "--output_dir", str(out)]
    proc = launch(cmd, ssh_cluster, workdir)
    assert_trained(proc, out)
    both = proc.stdout + proc.stderr
    assert "2 rank(s) via env" in both
    # pdsh prefixes every remote line with its host: one launcher (node_rank 0 and 1) ran on each
    assert "node1: " in both and "node2: " in both, explain(proc)
    assert "node_rank=0" in both and "node_rank=1" in both


def test_deepspeed_openmpi_two_hosts(ssh_cluster, workdir):
    need("mpirun")
    write_deepspeed_env(workdir, MASTER_PORT=free_port())
    out = workdir / "run"
    mark = ssh_cluster.log_mark()
    cmd = [str(VENV_BIN / "deepspeed"), "--hostfile", "hostfile", "--launcher", "openmpi",
           "--launcher_args", "--mca btl_tcp_if_include lo", "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--module", "dsfleet.train", *TRAIN, "--output_dir", str(out)]
    proc = launch(cmd, ssh_cluster, workdir)
    assert_trained(proc, out)
    assert "2 rank(s) via openmpi" in proc.stdout + proc.stderr
    assert {"127.0.0.1", "127.0.0.2"} <= ssh_cluster.addresses_since(mark)  # orted over ssh on both hosts


def test_mpirun_two_hosts_ranks_from_openmpi_env(ssh_cluster, workdir):
    need("mpirun")
    out = workdir / "run"
    mark = ssh_cluster.log_mark()
    exports = [a for k, v in {**RANK_ENV, "MASTER_PORT": free_port()}.items() for a in ("-x", f"{k}={v}")]
    cmd = ["mpirun", "-np", "2", "--hostfile", "hostfile", *exports,
           sys.executable, "-m", "dsfleet.train", *TRAIN, "--output_dir", str(out)]
    proc = launch(cmd, ssh_cluster, workdir)
    assert_trained(proc, out)
    # one rank per host: OMPI_COMM_WORLD_LOCAL_SIZE=1 != world 2, so rank 0's address came over mpi4py
    assert "2 rank(s) via openmpi" in proc.stdout + proc.stderr
    assert {"127.0.0.1", "127.0.0.2"} <= ssh_cluster.addresses_since(mark)
