"""A real, throwaway Slurm cluster on this one machine: for the tests (the session fixture `slurm_cluster`) and for
people (`make slurm-up` / `make slurm-down`, i.e. `python -m tests.slurm_cluster up|down|status`).

Why it exists: dsfleet renders sbatch scripts and relies on Slurm's requeue and signal behaviour for preemption.
Mocks cannot tell a wrong directive, a requeue that never restarts or a step that cannot reach its peers from a
working one, so the tests drive Debian's own slurmctld/slurmd/munged.

What it does: installs slurm-wlm + munge from Debian when they are missing (root + apt only), writes a minimal
slurm.conf for this host (CPUs from nproc, no GPUs, proctrack/pgid + task/none: no cgroups, nothing that
needs privileges a container lacks; plus a `gpu` partition of two 8-GPU CLOUD nodes that no slurmd backs, so
`sbatch --test-only -p gpu` judges the committed GPU scripts against the nodes they are written for), starts munged, slurmctld and the slurmd(s) directly (no systemd), waits for
the nodes to be idle, and tears everything down by PID file. All config, state, logs, sockets and PID files live
in one directory, DSFLEET_SLURM_DIR (default /tmp/dsfleet-slurm); Slurm's commands find it through
SLURM_CONF=<dir>/slurm.conf (`cluster.env()` gives an environment with it set).

Two nodes on one host: Debian's slurm-wlm is built without --enable-multiple-slurmd (slurmctld stops with
"Duplicated NodeHostName" when two nodes share one host name), yet two plain slurmd processes run side by side when
each node has its own NodeHostname alias and its own Port, both with NodeAddr=127.0.0.1. So the cluster has 2 nodes
whenever this host has a resolvable host name other than "localhost": the nodes are named after the two names the
host already resolves (its short host name and "localhost"), so `scontrol show hostnames $SLURM_JOB_NODELIST` gives
a MASTER_ADDR that resolves, without touching /etc/hosts. Otherwise it falls back to 1 node with CPUs >= 2.

Reuse: `up` keeps a healthy cluster from an earlier run (same config, daemons alive, nodes responding) and
otherwise stops the old daemons by their PID files and starts afresh. A cluster started by `make slurm-up` is
left up by the tests; one the fixture started is stopped when the last pytest session using it ends.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import pytest
except ImportError:  # the CLI works without pytest
    pytest = None

DEFAULT_DIR = "/tmp/dsfleet-slurm"
DEFAULT_PORT = 16817          # slurmctld; slurmd i listens on DEFAULT_PORT + 1 + i (not Slurm's 6817/6818)
CRED_EXPIRE = 10              # s; Slurm also holds a requeued job for cred_expire + 1 s (default 120) before restart
START_TIMEOUT = 60            # s for the daemons to come up and the nodes to be idle
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
DAEMONS = ("munged", "slurmctld", "slurmd")
GPU_NODES = 2  # fake GPU nodes of the `gpu` partition (the largest committed script asks for 2)
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the local cluster; the message says why (from the daemons' logs when they failed)."""


def cluster_dir() -> Path:
    return Path(os.environ.get("DSFLEET_SLURM_DIR") or DEFAULT_DIR).resolve()


def _path_env() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [p for p in SBIN if p not in parts])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_path_env())


# ---------------------------------------------------------------------------------------------------- the cluster


@dataclass
class SlurmCluster:
    root: Path
    nodes: list[str]
    cpus_per_node: int
    port: int

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def total_cpus(self) -> int:
        return self.cpus_per_node * len(self.nodes)

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ plus SLURM_CONF (and the sbin dirs on PATH): what every Slurm command and job needs here."""
        env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=_path_env())
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 30, check: bool = True, cwd: Path | str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """One Slurm client command against this cluster; on failure (check=True) the error carries its output."""
        proc = subprocess.run([str(a) for a in args], env=env or self.env(), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} -> exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, script: Path | str, *args: str, cwd: Path | str | None = None, env: dict | None = None) -> int:
        """Submit a script file; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, str(script), cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...); once the controller has
        forgotten the job (MinJobAge), its last line in the job-completion log. {} when unknown."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode == 0 and "JobId=" in proc.stdout:
            return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        comp = self.root / "log" / "jobcomp.txt"
        rows = [line for line in (comp.read_text().splitlines() if comp.exists() else [])
                if line.startswith(f"JobId={job_id} ")]
        return dict(re.findall(r"(\w+)=(\S*)", rows[-1])) if rows else {}

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_job(self, job_id: int, states: tuple[str, ...] = ("COMPLETED",), timeout: float = 60,
                 poll: float = 0.5) -> dict[str, str]:
        """Wait until the job is in one of `states`; a different final state or the deadline raises with the job's
        record and the daemons' log tails (so a failed test says what Slurm did)."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            st = info.get("JobState", "")
            if st in states:
                return info
            if st in final:
                break
            time.sleep(poll)
        raise AssertionError(f"job {job_id} is {info.get('JobState', 'unknown')}, expected {'/'.join(states)} "
                             f"(waited up to {timeout:.0f}s)\njob: {info}\n{self.log_tail()}")

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=10).stdout
        return dict(line.split(None, 1) for line in out.splitlines() if line.strip())

    def log_tail(self, lines: int = 15) -> str:
        return _log_tail(self.root, lines)


# ---------------------------------------------------------------------------------------------------- the plan


def _node_names() -> list[str]:
    """Names this host already resolves: its short host name (if it resolves and is not localhost) and localhost."""
    host = socket.gethostname().split(".")[0]
    names = []
    if host and host != "localhost" and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", host):
        try:
            socket.gethostbyname(host)
            names.append(host)
        except OSError:
            pass
    return names + ["localhost"]


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _mem_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


def _plan(port: int) -> dict:
    nodes = _node_names()
    cpus = _nproc() if len(nodes) > 1 else max(2, _nproc())
    return {"nodes": nodes, "cpus_per_node": cpus, "mem_mb": max(1024, _mem_mb() // len(nodes)), "port": port,
            "user": _user()}


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


def _render(root: Path, plan: dict) -> str:
    host = socket.gethostname().split(".")[0]
    port = plan["port"]
    lines = [
        "# written by dsfleet tests/slurm_cluster.py: a local test cluster; rewritten on every fresh start",
        "ClusterName=dsfleet",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={port}",
        f"SlurmdPort={port + 1}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE}",
        f"SlurmUser={plan['user']}",
        f"SlurmdUser={plan['user']}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        f"PlugStackConfig={root}/plugstack.conf",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "MailProg=/bin/true",
        # no cgroups, no privileges: processes tracked by process group (orphaned children included), tasks not bound
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root}/log/jobcomp.txt",
        "SwitchType=switch/none",
        "GresTypes=gpu",
        # power saving only so that the CLOUD gpu nodes count as startable; nothing ever resumes them
        "SuspendProgram=/bin/true",
        "ResumeProgram=/bin/true",
        "SuspendTime=INFINITE",
        "ResumeTimeout=600",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        # preemption: requeue allowed; finished jobs stay visible to `scontrol show job` for 2 minutes
        "JobRequeue=1",
        "MinJobAge=120",
        "KillWait=30",
        "InactiveLimit=0",
        "SlurmdTimeout=120",
        "SchedulerParameters=sched_interval=2,bf_interval=2",  # a requeued job restarts as soon as eligible
    ]
    for i, name in enumerate(plan["nodes"]):
        alias = f"dsfleet-{name}"  # distinct per node: the build refuses two nodes with one NodeHostname
        lines.append(f"NodeName={name} NodeHostname={alias} NodeAddr=127.0.0.1 Port={port + 1 + i} "
                     f"CPUs={plan['cpus_per_node']} RealMemory={plan['mem_mb']} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(plan['nodes'])} Default=YES MaxTime=INFINITE State=UP")
    # The GPU nodes the committed scripts target (8 GPUs, 128 CPUs each), for `sbatch --test-only -p gpu` only:
    # the controller judges the scripts against them; no slurmd backs them and no job is ever run on them.
    lines.append(f"NodeName=gpu[1-{GPU_NODES}] CPUs=128 RealMemory=1000000 Gres=gpu:8 State=CLOUD")
    lines.append(f"PartitionName=gpu Nodes=gpu[1-{GPU_NODES}] Default=NO MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _ports_free(port: int, count: int) -> bool:
    for p in range(port, port + count):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                return False
    return True


def _pick_port(count: int) -> int:
    base = int(os.environ.get("DSFLEET_SLURM_PORT") or DEFAULT_PORT)
    for k in range(40):
        if _ports_free(base + 10 * k, count):
            return base + 10 * k
    raise SlurmUnavailable(f"no free TCP ports for slurmctld/slurmd from {base} on")


# ---------------------------------------------------------------------------------------------------- processes


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _proc_argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def _is_ours(pid: int, daemon: str, root: Path) -> bool:
    """The PID still runs `daemon` of this cluster (not a recycled PID, not another cluster's daemon)."""
    argv = _proc_argv(pid)
    if not argv or Path(argv[0]).name != daemon:
        return False
    if daemon == "munged":
        return any(str(root) in a for a in argv)
    return _proc_environ(pid).get("SLURM_CONF") == str(root / "slurm.conf")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _pidfiles(root: Path) -> list[tuple[str, Path]]:
    run = root / "run"
    files = [("slurmd", p) for p in sorted(run.glob("slurmd-*.pid"))]
    return files + [("slurmctld", run / "slurmctld.pid"), ("munged", root / "munge" / "munged.pid")]


def _stop(pids: list[int], grace: float = 10) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _job_processes(root: Path) -> list[int]:
    """Leftover slurmstepd and job processes of this cluster: they carry its SLURM_CONF in their environment
    (slurmstepd from slurmd, job tasks from the submitter) and, for tasks, a SLURM_JOB_ID. Never this process or
    its ancestors."""
    conf = str(root / "slurm.conf")
    keep = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in keep:
        keep.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        pid = int(entry.name)
        env = _proc_environ(pid)
        if env.get("SLURM_CONF") != conf:
            continue
        argv = _proc_argv(pid)
        if (argv and Path(argv[0]).name == "slurmstepd") or "SLURM_JOB_ID" in env:
            found.append(pid)
    return found


def _log_tail(root: Path, lines: int = 15) -> str:
    out = []
    logs = [root / "munge" / "munged.log", root / "log" / "slurmctld.log", *sorted((root / "log").glob("slurmd-*.log")),
            *sorted((root / "log").glob("*.stderr"))]
    for log in logs:
        if log.exists() and log.stat().st_size:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log}\n" + "\n".join(text))
    return "\n".join(out)


def _failure_reason(root: Path) -> str:
    """The first fatal/error lines of the daemons' logs: the reason a start failed, in their words."""
    hits = []
    logs = [root / "munge" / "munged.log", root / "log" / "slurmctld.log", *sorted((root / "log").glob("slurmd-*.log")),
            *sorted((root / "log").glob("*.stderr"))]
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r"fatal|error|Error|Failed|failed", line) and "MailProg" not in line:
                hits.append(f"{log.name}: {line.strip()}")
    return "\n".join(hits[:8]) or "no error in the daemons' logs"


# ---------------------------------------------------------------------------------------------------- install


def ensure_installed() -> None:
    """slurm-wlm + munge from Debian when a binary is missing (root + apt-get); otherwise SlurmUnavailable."""
    missing = [b for b in (*DAEMONS, *CLIENTS, "munge") if not _which(b)]
    if not missing:
        return
    if os.getuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and this user cannot install them (needs root "
                               f"and apt-get): run `make sysdeps` or `apt-get install {' '.join(PACKAGES)}`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    still = [b for b in (*DAEMONS, *CLIENTS) if not _which(b)]
    if proc.returncode != 0 or still:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-500:]}")


# ---------------------------------------------------------------------------------------------------- up / down


@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "cluster.json").read_text())
    except (OSError, ValueError):
        return None


def _healthy(root: Path, meta: dict) -> SlurmCluster | None:
    """The cluster described by cluster.json, if its config is what this code writes today, every daemon is alive
    and the nodes respond."""
    plan = _plan(meta["port"])
    conf = root / "slurm.conf"
    if not conf.exists() or conf.read_text() != _render(root, plan):
        return None
    for daemon, pidfile in _pidfiles(root):
        pid = _read_pid(pidfile)
        if pid is None or not _alive(pid) or not _is_ours(pid, daemon, root):
            return None
    if len(list((root / "run").glob("slurmd-*.pid"))) != len(plan["nodes"]):
        return None
    cluster = SlurmCluster(root, plan["nodes"], plan["cpus_per_node"], plan["port"])
    try:
        if cluster.run("scontrol", "ping", timeout=10, check=False).returncode != 0:
            return None
        states = cluster.node_states()
    except (RuntimeError, subprocess.TimeoutExpired):
        return None
    ok = {"idle", "mixed", "allocated", "completing"}
    if sorted(states) != sorted(plan["nodes"]) or not all(s in ok for s in states.values()):
        return None
    return cluster


def _start_daemon(root: Path, name: str, argv: list[str], env: dict) -> None:
    """Run a daemon that forks into the background itself; its early stderr (before its log opens) is kept."""
    with open(root / "log" / f"{name}.stderr", "w") as err:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=30,
                              start_new_session=True)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"{name} did not start (exit {proc.returncode}):\n{_failure_reason(root)}")


def _wait(predicate, timeout: float, what: str, root: Path) -> None:
    """Poll `predicate`; give up at the deadline, or at once when a daemon died (a started daemon's PID file names a
    dead process) or logged a fatal error: the reason is then the daemons' own words."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [f.name[:-4] for _, f in _pidfiles(root) if (pid := _read_pid(f)) is not None and not _alive(pid)]
        if dead or _fatal_logged(root):
            raise SlurmUnavailable(f"{what}: {', '.join(dead) or 'a daemon'} exited:\n{_failure_reason(root)}")
        time.sleep(0.3)
    raise SlurmUnavailable(f"{what} within {timeout:.0f}s:\n{_failure_reason(root)}")


def _fatal_logged(root: Path) -> bool:
    logs = [root / "log" / "slurmctld.log", *(root / "log").glob("slurmd-*.log")]
    return any(log.exists() and "fatal:" in log.read_text(errors="replace") for log in logs)


def _fresh_start(root: Path, owner: str) -> SlurmCluster:
    for sub in ("state", "spool", "run", "log"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    os.chmod(root, 0o755)  # munged wants every directory above its socket searchable
    munge = root / "munge"
    munge.mkdir(exist_ok=True)
    os.chmod(munge, 0o755)
    key = munge / "munge.key"
    if not key.exists():
        key.write_bytes(secrets.token_bytes(1024))
    os.chmod(key, 0o400)
    for stale in ("munge.socket", "munge.socket.lock", "munged.pid", "munged.log"):
        (munge / stale).unlink(missing_ok=True)
    (root / "plugstack.conf").write_text("# empty: no SPANK plugins in the test cluster\n")

    plan = _plan(_pick_port(1 + len(_node_names())))
    (root / "slurm.conf").write_text(_render(root, plan))
    cluster = SlurmCluster(root, plan["nodes"], plan["cpus_per_node"], plan["port"])
    env = {k: v for k, v in cluster.env().items() if not k.startswith(("PYTEST_", "SLURM_"))}
    env["SLURM_CONF"] = str(cluster.conf)

    _start_daemon(root, "munged", [_which("munged"), f"--key-file={key}", f"--socket={munge}/munge.socket",
                                   f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                                   f"--seed-file={munge}/munged.seed", "--force"], env)
    _wait(lambda: (munge / "munge.socket").exists(), 15, "munged did not open its socket", root)
    _start_daemon(root, "slurmctld", [_which("slurmctld"), "-c"], env)
    _wait(lambda: cluster.run("scontrol", "ping", timeout=10, check=False).returncode == 0, START_TIMEOUT,
          "slurmctld did not answer `scontrol ping`", root)
    for name in plan["nodes"]:
        _start_daemon(root, f"slurmd-{name}", [_which("slurmd"), "-N", name], env)

    def idle() -> bool:
        try:
            states = cluster.node_states()
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return sorted(states) == sorted(plan["nodes"]) and all(s == "idle" for s in states.values())

    _wait(idle, START_TIMEOUT, "the nodes did not become idle", root)
    (root / "cluster.json").write_text(json.dumps({**plan, "owner": owner}, indent=1))
    return cluster


def up(owner: str = "cli", root: Path | None = None) -> tuple[SlurmCluster, bool]:
    """A running, idle-or-busy healthy cluster: (cluster, reused). Installs the packages if needed; stops a stale or
    broken earlier cluster by its PID files first. Raises SlurmUnavailable with the daemons' reason on failure."""
    root = root or cluster_dir()
    ensure_installed()
    with _locked(root):
        meta = _meta(root)
        if meta:
            cluster = _healthy(root, meta)
            if cluster:
                if owner == "cli" and meta.get("owner") != "cli":  # a person adopted it: the tests leave it up now
                    (root / "cluster.json").write_text(json.dumps({**meta, "owner": "cli"}, indent=1))
                return cluster, True
        _down(root)
        try:
            return _fresh_start(root, owner), False
        except SlurmUnavailable:
            _down(root)
            raise


def _down(root: Path) -> list[str]:
    stopped = []
    conf = root / "slurm.conf"
    ctld = _read_pid(root / "run" / "slurmctld.pid")
    if conf.exists() and ctld and _alive(ctld) and _is_ours(ctld, "slurmctld", root):
        env = dict(os.environ, SLURM_CONF=str(conf), PATH=_path_env())
        try:  # cancel the jobs first, so slurmstepd cleans up their processes
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                                  timeout=10).stdout.split()
            if jobs:
                subprocess.run(["scancel", *jobs], env=env, capture_output=True, timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and _job_processes(root):
                    time.sleep(0.3)
                stopped.append(f"cancelled jobs {' '.join(jobs)}")
        except subprocess.TimeoutExpired:
            pass
    slurm, munge = [], []
    for daemon, pidfile in _pidfiles(root):
        pid = _read_pid(pidfile)
        if pid and _alive(pid) and _is_ours(pid, daemon, root):
            (munge if daemon == "munged" else slurm).append(pid)
            stopped.append(f"{pidfile.name[:-4]} (pid {pid})")
    _stop(slurm)
    _stop(munge)  # last: the slurm daemons talk to it while they shut down
    strays = _job_processes(root)
    if strays:
        _stop(strays, grace=3)
        stopped.append(f"left-over job processes {' '.join(map(str, strays))}")
    for pidfile in (root / "run").glob("*.pid") if (root / "run").exists() else []:
        pidfile.unlink(missing_ok=True)
    (root / "cluster.json").unlink(missing_ok=True)
    shutil.rmtree(root / "users", ignore_errors=True)
    return stopped


def down(root: Path | None = None) -> list[str]:
    """Stop this directory's cluster by its PID files (jobs cancelled first). Logs stay for a post-mortem."""
    root = root or cluster_dir()
    if not root.exists():
        return []
    with _locked(root):
        return _down(root)


# ---------------------------------------------------------------------------------------------------- pytest


def acquire() -> SlurmCluster:
    """up() for a pytest session; the session is recorded so concurrent sessions share one cluster."""
    cluster, _ = up(owner="pytest")
    users = cluster.root / "users"
    users.mkdir(exist_ok=True)
    (users / str(os.getpid())).touch()
    return cluster


def release(cluster: SlurmCluster) -> None:
    """End of a pytest session: stop the cluster when no other live session uses it and `make slurm-up` did not
    start it."""
    root = cluster.root
    with _locked(root):
        users = root / "users"
        (users / str(os.getpid())).unlink(missing_ok=True)
        live = [p for p in (users.iterdir() if users.exists() else []) if p.name.isdigit() and _alive(int(p.name))]
        meta = _meta(root) or {}
        if not live and meta.get("owner") != "cli":
            _down(root)


if pytest is not None:
    @pytest.fixture(scope="session")
    def slurm_cluster():
        """A real local Slurm cluster (see the module docstring). Skips, with the daemons' own reason, only when
        this machine cannot run it; DSFLEET_REQUIRE_SLURM=1 turns that skip into a failure."""
        try:
            cluster = acquire()
        except SlurmUnavailable as exc:
            msg = f"local Slurm cluster cannot run on this machine: {exc}"
            if os.environ.get("DSFLEET_REQUIRE_SLURM") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
        yield cluster
        release(cluster)


# ---------------------------------------------------------------------------------------------------- CLI


def _describe(cluster: SlurmCluster) -> str:
    states = cluster.node_states()
    nodes = ", ".join(f"{n} ({states.get(n, '?')}, {cluster.cpus_per_node} CPUs)" for n in cluster.nodes)
    return (f"nodes: {nodes}\nconfig, state and logs: {cluster.root}\n"
            f"use it from this shell:\n  export SLURM_CONF={cluster.conf}\n  sinfo; sbatch ...\n"
            f"stop it: make slurm-down")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else ""
    if cmd not in ("up", "down", "status"):
        print("usage: python -m tests.slurm_cluster up|down|status   (directory: DSFLEET_SLURM_DIR, default "
              f"{DEFAULT_DIR})", file=sys.stderr)
        return 2
    root = cluster_dir()
    if cmd == "up":
        try:
            cluster, reused = up(owner="cli", root=root)
        except SlurmUnavailable as exc:
            print(f"dsfleet: the local Slurm cluster did not start — {exc}", file=sys.stderr)
            return 1
        print(("reusing the running" if reused else "started a") + " local Slurm cluster")
        print(_describe(cluster))
        return 0
    if cmd == "down":
        stopped = down(root)
        print("stopped: " + ", ".join(stopped) if stopped else f"no local Slurm cluster running in {root}")
        return 0
    meta = _meta(root)
    cluster = _healthy(root, meta) if meta else None
    if not cluster:
        print(f"no healthy local Slurm cluster in {root}")
        return 1
    print(_describe(cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
