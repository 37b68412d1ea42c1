"""Each launcher's env maps onto the same rank/world/local rank/master (dsfleet.dist_env)."""
import os
import shutil

import pytest

from dsfleet.cli import UsageError
from dsfleet.dist_env import discover, expand_nodelist, first_host, python_hostlist_hostnames, scontrol_hostnames


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


# Slurm hostlist expressions and what they expand to, in Slurm's order
NODELISTS = {
    "n[1-2]-ib[3-4]": ["n1-ib3", "n1-ib4", "n2-ib3", "n2-ib4"],  # a bracket after a suffix: the product
    "gpu[001-003]": ["gpu001", "gpu002", "gpu003"],  # zero padding kept
    "a1,b[2-3]": ["a1", "b2", "b3"],
    "node[01-03,07],gpu5": ["node01", "node02", "node03", "node07", "gpu5"],
    "gpu[098-101]": ["gpu098", "gpu099", "gpu100", "gpu101"],  # the padding width across a carry
    "n[1-2]-ib[3-4],x[9-10]": ["n1-ib3", "n1-ib4", "n2-ib3", "n2-ib4", "x9", "x10"],
}


@pytest.mark.parametrize("nodelist", list(NODELISTS))
def test_nodelist_expansion(nodelist):
    assert expand_nodelist(nodelist) == NODELISTS[nodelist]
    assert python_hostlist_hostnames(nodelist) == NODELISTS[nodelist]  # the path off Slurm, on every machine
    assert first_host(nodelist) == NODELISTS[nodelist][0]


def test_slurm_step_master_is_the_first_host_of_a_bracketed_suffix_list():
    d = discover({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "n[1-2]-ib[3-4]"})
    assert d.master_addr == "n1-ib3"


@pytest.mark.parametrize("bad", ["n[1-", "a[3-1]", "n[1-2]]", ","])
def test_unreadable_nodelist_is_one_line_naming_master_addr(bad):
    with pytest.raises(UsageError, match="set MASTER_ADDR explicitly"):
        expand_nodelist(bad)


@pytest.fixture
def scontrol_env(tmp_path):
    """An environment in which this machine's real scontrol expands hostlists: it needs a slurm.conf to read, not a
    running slurmctld (without one it exits 1: 'Could not establish a configuration source')."""
    if shutil.which("scontrol") is None:
        pytest.skip("no scontrol on this machine (Debian's slurm-client, installed by tests/slurm_cluster.py)")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost\n")
    env = dict(os.environ, SLURM_CONF=str(conf))
    if scontrol_hostnames("a[1-2]", env) != ["a1", "a2"]:
        pytest.skip("this scontrol does not expand hostlists with a minimal slurm.conf")
    return env


@pytest.mark.parametrize("nodelist", list(NODELISTS))
def test_scontrol_and_python_hostlist_agree(scontrol_env, nodelist):
    assert scontrol_hostnames(nodelist, scontrol_env) == python_hostlist_hostnames(nodelist) == NODELISTS[nodelist]


def test_scontrol_that_cannot_run_or_rejects_a_form_falls_back(scontrol_env, monkeypatch):
    # no readable slurm.conf: scontrol exits 1 and python-hostlist answers
    no_conf = dict(scontrol_env, SLURM_CONF=str(os.devnull) + ".missing")
    assert scontrol_hostnames("a[1-2]", no_conf) is None
    # Slurm 22.05's scontrol rejects a suffix after the last bracket ("Invalid hostlist", still exit 0)
    assert scontrol_hostnames("rack1-n[9-10]-ib", scontrol_env) in (None, ["rack1-n9-ib", "rack1-n10-ib"])
    monkeypatch.setenv("SLURM_CONF", scontrol_env["SLURM_CONF"])
    assert expand_nodelist("rack1-n[9-10]-ib") == ["rack1-n9-ib", "rack1-n10-ib"]
    # what it cannot read is still one line (scontrol echoes "n[1-" as the host "n]")
    for bad in ("n[1-", "a[3-1]", "n[1-2]]", ","):
        with pytest.raises(UsageError, match="set MASTER_ADDR explicitly"):
            expand_nodelist(bad)

