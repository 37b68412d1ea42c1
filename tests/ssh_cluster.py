"""A real OpenSSH "cluster" on loopback, for tests of everything dsfleet launches or checks over ssh.

Why it exists: the deepspeed launcher (pdsh and openmpi runners), mpirun and `dsfleet preflight` all reach hosts
through ssh, and mocking ssh would hide exactly the failures they exist to catch (host keys, auth, remote PATH, env
that does not cross a fresh ssh shell). So this module starts Debian's sshd (openssh-server) on a free loopback port
with generated host and user keys and writes an ssh_config with host aliases:

    node1 -> 127.0.0.1:PORT    node2 -> 127.0.0.2:PORT     the healthy pair (1 slot each)
    stale -> 127.0.0.3:PORT    a host whose sessions see another dsfleet: sshd's `Match LocalAddress 127.0.0.3` block
                               sets PYTHONPATH to a directory holding a different `dsfleet` package, the way a node
                               with a stale install on its path looks to anything that logs in (ssh, pdsh, Fabric)
    down  -> 127.0.0.1:CLOSED  a port nothing listens on (a dead node / sshd not running)

Host keys ARE checked: the config says StrictHostKeyChecking yes with a known_hosts file holding the generated host
key. Nothing is written to /root/.ssh: every client is pointed at the config through its own knob (see `env()`):
pdsh `PDSH_SSH_ARGS_APPEND=-F CONFIG`, OpenMPI `OMPI_MCA_plm_rsh_args=-F CONFIG`, dsfleet preflight (Fabric)
`DSFLEET_SSH_CONFIG=CONFIG`. sshd runs in the foreground as our child and is stopped by its PID.

Use it as the session-scoped pytest fixture `ssh_cluster` (`from tests.ssh_cluster import ssh_cluster`), or by hand:
`python -m tests.ssh_cluster` starts it, prints the exports, and tears it down on Enter / Ctrl-C.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HEALTHY = {"node1": "127.0.0.1", "node2": "127.0.0.2"}
STALE_ADDR = "127.0.0.3"
STALE_DSFLEET_VERSION = "0.0.0+stale"


def _free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _listening(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class SSHCluster:
    root: Path
    port: int
    closed_port: int
    proc: subprocess.Popen | None = None
    hosts: dict[str, str] = field(default_factory=lambda: dict(HEALTHY))

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def identity(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def log(self) -> Path:
        return self.root / "sshd.log"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) plus what pdsh, OpenMPI's rsh launcher and preflight need to use our config."""
        env = dict(os.environ if base is None else base)
        cfg = str(self.ssh_config)
        env.update({
            "DSFLEET_SSH_CONFIG": cfg,                  # dsfleet preflight (Fabric/paramiko)
            "PDSH_RCMD_TYPE": "ssh",                    # pdsh: ssh, not rsh (the deepspeed runner sets it too)
            "PDSH_SSH_ARGS_APPEND": f"-F {cfg}",        # pdsh: appended to its `-2 -a -x -l%u %h`
            "OMPI_MCA_plm_rsh_agent": "ssh",            # mpirun starts orted on each host over ssh ...
            "OMPI_MCA_plm_rsh_args": f"-F {cfg}",       # ... with our config
            "OMPI_MCA_plm_rsh_no_tree_spawn": "1",      # every orted from the launching host (no ssh hops)
            "OMPI_MCA_oob_tcp_if_include": "lo",        # the only network this cluster has is loopback, which
            "OMPI_MCA_btl_tcp_if_include": "lo",        # OpenMPI skips by default
        })
        if os.geteuid() == 0:  # mpirun refuses root without both of these (or --allow-run-as-root)
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        return env

    def ssh(self, host: str, command: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """`ssh -F CONFIG HOST COMMAND` (the plain OpenSSH client, host keys checked)."""
        return subprocess.run(["ssh", "-F", str(self.ssh_config), host, command], capture_output=True, text=True,
                              timeout=timeout, **kw)

    def write_hostfile(self, path: Path, hosts: dict[str, int] | None = None) -> Path:
        """A DeepSpeed/OpenMPI hostfile (`HOST slots=N`), by default the healthy pair with 1 slot each."""
        hosts = hosts or {h: 1 for h in self.hosts}
        path.write_text("# loopback ssh cluster (tests/ssh_cluster.py)\n"
                        + "".join(f"{h} slots={n}\n" for h, n in hosts.items()))
        return path

    def log_mark(self) -> int:
        """Where sshd's log ends now; pass to `addresses_since` after running something."""
        return self.log.stat().st_size if self.log.exists() else 0

    def addresses_since(self, mark: int) -> set[str]:
        """The loopback addresses (hosts) sshd accepted connections on since `mark`: proof of which hosts a
        launcher reached over ssh (sshd logs `Connection from A port N on ADDRESS port P`)."""
        with open(self.log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return set(re.findall(rf"Connection from \S+ port \d+ on (\S+) port {self.port}\b", text))

    def stop(self) -> None:
        """Stop sshd and everything it started (sessions and what they run, e.g. ranks left by a failed launch)."""
        if self.proc is None:
            return
        # taken first (orphans get re-parented away); leaves first, so each parent is alive to reap its children
        tree = [*reversed(_descendants(self.proc.pid)), self.proc.pid]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                self.proc.poll()  # reap our direct child
                if not any(_alive(p) for p in tree):
                    break
                time.sleep(0.1)
            else:
                continue
            break
        self.proc.wait(timeout=10)
        self.proc = None


def _ppids() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                out[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _descendants(pid: int) -> list[int]:
    """PIDs below `pid`, from /proc."""
    parent, out, frontier = _ppids(), [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   capture_output=True, timeout=30)


def start(root: Path | None = None) -> SSHCluster:
    """Generate keys and configs under `root` (a new temp dir by default) and start sshd; ready when it returns."""
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError("sshd not found — install openssh-server (make sysdeps / scripts/install-system-deps.sh)")
    root = Path(root or tempfile.mkdtemp(prefix="dsfleet-ssh-"))
    root.mkdir(parents=True, exist_ok=True)
    cluster = SSHCluster(root=root, port=_free_port(), closed_port=_free_port())
    _keygen(root / "host_ed25519", "dsfleet-test-host")
    _keygen(cluster.identity, "dsfleet-test-user")
    shutil.copy(root / "id_ed25519.pub", root / "authorized_keys")

    # the "stale" host's dsfleet: a package that shadows the real one for sessions on 127.0.0.3 only
    stale = root / "stale-site" / "dsfleet"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text(f'"""An old dsfleet install (tests/ssh_cluster.py)."""\n'
                                       f'__version__ = "{STALE_DSFLEET_VERSION}"\n')

    listen = [*HEALTHY.values(), STALE_ADDR]
    (root / "sshd_config").write_text("\n".join([
        f"Port {cluster.port}",
        *(f"ListenAddress {a}" for a in listen),
        f"HostKey {root / 'host_ed25519'}",
        f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}",
        "PermitRootLogin prohibit-password",  # root by key only
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",  # the key files live under /tmp (world-writable), which StrictModes rejects
        "MaxStartups 200",  # pdsh, mpirun and preflight open connections in parallel
        "MaxSessions 50",
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
        f"Match LocalAddress {STALE_ADDR}",
        f"    SetEnv PYTHONPATH={root / 'stale-site'}",
        "",
    ]))
    host_pub = (root / "host_ed25519.pub").read_text().split()[:2]
    names = [*HEALTHY, "stale", *listen]
    cluster.known_hosts.write_text(",".join(f"[{n}]:{cluster.port}" for n in names) + " " + " ".join(host_pub) + "\n")

    common = [f"    Port {cluster.port}", "    User root", f"    IdentityFile {cluster.identity}",
              "    IdentitiesOnly yes", f"    UserKnownHostsFile {cluster.known_hosts}",
              "    GlobalKnownHostsFile /dev/null", "    StrictHostKeyChecking yes", "    PasswordAuthentication no",
              "    BatchMode yes", "    ConnectTimeout 5", "    LogLevel ERROR"]
    blocks = [*(f"Host {h}\n    HostName {a}" for h, a in HEALTHY.items()), f"Host stale\n    HostName {STALE_ADDR}",
              f"Host down\n    HostName 127.0.0.1\n    Port {cluster.closed_port}",  # first value wins in ssh_config
              "Host *\n" + "\n".join(common)]
    cluster.ssh_config.write_text("# loopback test cluster (tests/ssh_cluster.py)\n" + "\n\n".join(blocks) + "\n")

    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir (Debian's init makes it)
    check = subprocess.run([SSHD, "-t", "-f", str(root / "sshd_config")], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"sshd rejected the generated config: {check.stderr.strip()}")
    with open(cluster.log, "ab") as log:
        cluster.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while not all(_listening(a, cluster.port) for a in listen):
        if cluster.proc.poll() is not None or time.monotonic() > deadline:
            cluster.stop()
            raise RuntimeError(f"sshd did not come up on port {cluster.port}: {cluster.log.read_text()[-2000:]}")
        time.sleep(0.1)
    return cluster


@pytest.fixture(scope="session")
def ssh_cluster():
    """The running loopback cluster (see the module docstring); skipped when sshd/ssh-keygen are not installed."""
    for tool in ("ssh", "ssh-keygen"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed — run make sysdeps")
    if not os.access(SSHD, os.X_OK):
        pytest.skip("sshd not installed — run make sysdeps")
    cluster = start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def _main() -> int:
    cluster = start()
    env = cluster.env({})
    print(f"sshd pid {cluster.proc.pid} on port {cluster.port}; hosts node1 node2 (healthy), stale, down")
    print(f"  ssh -F {cluster.ssh_config} node1 hostname")
    print("\n".join(f"export {k}='{v}'" for k, v in env.items()))
    try:
        input("Enter (or Ctrl-C) stops sshd and removes " + str(cluster.root) + "\n")
    except (KeyboardInterrupt, EOFError):
        pass
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
