"""Rank discovery for every launcher dsfleet supports, in one place.

The same `python -m dsfleet.train` runs under the deepspeed launcher and torchrun (they export RANK etc.),
a Kubernetes Indexed Job (torchrun-style env rendered from JOB_COMPLETION_INDEX), `srun` (SLURM_* of the
step), `mpirun` (OpenMPI's OMPI_COMM_WORLD_* and MPICH's PMI_*; the master address comes from rank 0 via
mpi4py) and a plain single process. `discover()` reads only the env mapping it is given, so each mapping is
testable (under srun the master is the first host of the step's nodelist, expanded by Slurm's own scontrol where
it runs, else by python-hostlist: the same hosts either way).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping

from dsfleet.cli import fail

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # which launcher's env this came from

    def as_environ(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a Slurm hostlist expression, in Slurm's order: 'n[1-2]-ib[3-4],gpu[001-002]' -> n1-ib3,
    n1-ib4, n2-ib3, n2-ib4, gpu001, gpu002. Slurm's own `scontrol show hostnames` where Slurm is installed and
    configured (as a node that runs Slurm steps is); python-hostlist elsewhere, and for the forms this Slurm's
    scontrol rejects (a suffix after the last bracket: 'rack1-n[9-10]-ib'). Bad input -> one line, exit 2."""
    hosts = scontrol_hostnames(nodelist)
    if hosts is None:
        hosts = python_hostlist_hostnames(nodelist)
    if not hosts:
        fail(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r} — set MASTER_ADDR explicitly")
    return hosts


def scontrol_hostnames(nodelist: str, environ: Mapping[str, str] | None = None) -> list[str] | None:
    """`scontrol show hostnames NODELIST`; None where scontrol is missing, cannot read a slurm.conf (it needs one,
    not a running slurmctld) or rejects the expression (it says so on stderr and still exits 0; an unclosed
    bracket it passes through as a 'host' with a bracket in it)."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20,
                              env=None if environ is None else dict(environ))
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = done.stdout.split()
    if done.returncode != 0 or "invalid" in done.stderr.lower() or not hosts or any(
            c in host for host in hosts for c in "[],"):
        return None
    return hosts


def python_hostlist_hostnames(nodelist: str) -> list[str]:
    """The same expansion without Slurm, by python-hostlist (a dsfleet dependency)."""
    import hostlist

    try:
        return hostlist.expand_hostlist(nodelist.strip())
    except hostlist.BadHostlist as e:
        fail(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r} ({e}) — set MASTER_ADDR explicitly")


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: 'gpu[003-005,9],cpu1' -> 'gpu003', 'n[1-2]-ib[3-4]' -> 'n1-ib3'."""
    return expand_nodelist(nodelist)[0]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        fail(f"{key}={env[key]!r} is not an integer — fix the launcher environment (or unset {key})")


def master_port(env: Mapping[str, str], default: int = DEFAULT_PORT) -> int:
    """MASTER_PORT from the environment (checked: an integer in 1..65535), else `default`."""
    if "MASTER_PORT" not in env:
        return default
    port = _int(env, "MASTER_PORT")
    if not 1 <= port <= 65535:
        fail(f"MASTER_PORT={port} is not a TCP port — export a free port in 1..65535 (e.g. {DEFAULT_PORT})")
    return port


def discover(env: Mapping[str, str] | None = None,
             mpi_master: Callable[[], str] | None = None) -> DistEnv:
    """Map whatever launcher env is present onto rank/world/local rank/master. Bad env -> one line, exit 2."""
    env = os.environ if env is None else env
    rank_keys = [k for k in ("RANK", "WORLD_SIZE") if k in env]
    if len(rank_keys) == 1:
        missing = {"RANK", "WORLD_SIZE"} - set(rank_keys)
        fail(f"{rank_keys[0]} is set but {missing.pop()} is not — set both (torchrun/deepspeed do) or neither")
    if rank_keys:  # deepspeed launcher, torchrun, k8s pods (rendered env), or a user who set them
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        master = env.get("MASTER_ADDR")
        if world > 1 and not master:
            fail("WORLD_SIZE > 1 but MASTER_ADDR is not set — export the address of rank 0")
        return _checked(DistEnv(rank, world, local, master or "127.0.0.1", master_port(env), "env"))
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:  # mpirun (OpenMPI or MPICH/Intel MPI)
        ompi = "OMPI_COMM_WORLD_RANK" in env
        rank = _int(env, "OMPI_COMM_WORLD_RANK" if ompi else "PMI_RANK")
        world = _int(env, "OMPI_COMM_WORLD_SIZE" if ompi else "PMI_SIZE")
        local_key = "OMPI_COMM_WORLD_LOCAL_RANK" if ompi else "MPI_LOCALRANKID"
        local = _int(env, local_key) if local_key in env else 0
        local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or env.get("MPI_LOCALNRANKS")
        if "MASTER_ADDR" in env:
            master = env["MASTER_ADDR"]
        elif local_size and local_size.strip().isdigit() and int(local_size) == world:
            master = "127.0.0.1"  # every rank on this host
        elif mpi_master is not None:
            master = mpi_master()
        else:
            fail("mpirun across hosts needs mpi4py (pip install mpi4py) or MASTER_ADDR — provide one")
        return _checked(DistEnv(rank, world, local, master, master_port(env), "openmpi" if ompi else "mpich"))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # a task of an srun step
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        master = env.get("MASTER_ADDR") or first_host(nodelist)
        job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        job_port = DEFAULT_PORT + job % 1000  # distinct jobs sharing a node
        return _checked(DistEnv(rank, world, local, master, master_port(env, job_port), "slurm"))
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), master_port(env), "single")


_SOURCE_WORDS = {"env": "RANK/WORLD_SIZE", "openmpi": "OpenMPI env", "mpich": "MPICH env", "slurm": "Slurm env"}


def _checked(d: DistEnv) -> DistEnv:
    where = _SOURCE_WORDS.get(d.source, d.source)
    if d.world_size < 1 or not 0 <= d.rank < d.world_size:
        fail(f"rank {d.rank} is outside world size {d.world_size} ({where}) — fix the launcher environment "
             "(0 <= rank < world size)")
    if d.local_rank < 0:
        fail(f"local rank {d.local_rank} is negative ({where}) — fix the launcher environment")
    return d


def mpi4py_master() -> str:
    """Rank 0's address, broadcast over MPI (mpirun across hosts without MASTER_ADDR)."""
    from mpi4py import MPI

    host = socket.gethostbyname(socket.gethostname()) if MPI.COMM_WORLD.Get_rank() == 0 else None
    return MPI.COMM_WORLD.bcast(host, root=0)


def setup() -> DistEnv:
    """Discover and export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for torch.distributed."""
    d = discover(os.environ, mpi_master=mpi4py_master)
    os.environ.update(d.as_environ())
    return d


def leave_process_group() -> None:
    """End of a finished run, on every rank: a barrier, then destroy the default process group. Exiting with it
    still alive lets the interpreter tear down c10d's threads in no set order; on CPU ranks (gloo) about one 2-rank
    run in eight then aborted at exit ('terminate called without an active exception', exit -6) after finishing
    its work. Only for the success path: after an error a peer may never reach the barrier."""
    import torch.distributed as dist

    from dsfleet import watchdog
    watchdog.stop()  # this rank is done: its peers no longer watch for its heartbeat
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def release_cpu_allreduce_segment() -> None:
    """DeepSpeed's CPU all-reduce (its shm comm op, used when every rank is on one host) creates a ~69 MB
    /dev/shm segment per rank at init_distributed and never removes it: a hundred 2-rank CPU runs fill a 24 GB
    /dev/shm, and then runs hang. Every rank calls this once after deepspeed.init_distributed: it waits at a barrier
    (by then every rank has mapped its peers' segments) and removes this rank's name; the memory is freed when the
    ranks exit, kill -9 included. A no-op where there is no such segment (GPU runs, ranks on several hosts)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass
