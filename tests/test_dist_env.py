"""Each launcher's env maps onto the same rank/world/local rank/master (dsfleet.dist_env)."""
import pytest

from dsfleet.cli import UsageError
from dsfleet.dist_env import discover, first_host


def test_deepspeed_launcher_and_torchrun_env():
    d = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node0", "MASTER_PORT": "29600"})
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.source) == (3, 8, 3, "node0", 29600, "env")


def test_kubernetes_pod_env():  # the rendered Indexed Job sets RANK from JOB_COMPLETION_INDEX and a pod DNS master
    d = discover({"JOB_COMPLETION_INDEX": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                  "MASTER_ADDR": "t5-3b-0.t5-3b", "MASTER_PORT": "29500"})
    assert (d.rank, d.world_size, d.master_addr) == (1, 2, "t5-3b-0.t5-3b")


def test_slurm_srun_step():
    d = discover({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
                  "SLURM_STEP_NODELIST": "gpu[003-004,9]", "SLURM_JOB_ID": "4321", "SLURM_NTASKS": "16"})
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (5, 16, 1, "gpu003", "slurm")
    assert d.master_port == 29500 + 4321 % 1000


def test_slurm_batch_shell_without_srun_is_single_process():
    d = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert (d.rank, d.world_size, d.source) == (0, 1, "single")


def test_openmpi_env_single_host_and_across_hosts():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (1, 2, 1, "127.0.0.1", "openmpi")
    across = dict(env, OMPI_COMM_WORLD_SIZE="4")
    assert discover(across, mpi_master=lambda: "10.9.8.7").master_addr == "10.9.8.7"
    with pytest.raises(UsageError, match="needs mpi4py"):
        discover(across)


def test_mpich_env():
    d = discover({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h0"})
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (2, 4, 0, "h0", "mpich")


def test_plain_process():
    assert discover({}).world_size == 1


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, "outside world size"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
])
def test_bad_env(env, words):
    with pytest.raises(UsageError, match=words):
        discover(env)


def test_nodelist_first_host():
    assert first_host("node[01-03,07],gpu5") == "node01"
    assert first_host("gpu5") == "gpu5"
    assert first_host("rack1-n[9-10]-ib") == "rack1-n9-ib"
