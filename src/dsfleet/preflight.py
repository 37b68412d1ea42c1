"""`dsfleet preflight --hostfile F`: check every host of a DeepSpeed hostfile before a job burns cluster hours.

Why it exists: a multi-node launch (deepspeed --launcher pdsh|openmpi, mpirun) fails late and far from the cause: a
host that refuses ssh, a node whose image has another torch, a missing prebuilt op that JIT-compiles on one rank
only, a 64 MB /dev/shm, a busy master port, a skewed clock or an NCCL_* variable set on one node. This command
opens ssh to every host in parallel (Fabric ThreadingGroup, host keys checked against known_hosts), runs one small
probe with the interpreter the deepspeed launcher will run there, and compares the hosts with each other:

  ssh        reachable with keys, host key known (the ssh config's StrictHostKeyChecking=no is honoured, else unknown
             keys fail), and no two lines of the hostfile reaching the same machine
  python, torch, deepspeed, dsfleet
             import on the host and have the same version everywhere (the odd host out is named)
  ops        DeepSpeed ops prebuilt (what ds_report shows as installed) include --require-ops, same set everywhere
  devices    GPUs from nvidia-smi >= slots; with --cpu (default when DS_ACCELERATOR=cpu): cores >= slots
  workdir    the launch directory exists (the pdsh runner `cd`s into it on every host)
  disk       free space (and write access) at --output-dir
  shm        /dev/shm size (NCCL and DeepSpeed's CPU collectives use it; containers default to 64 MB)
  port       --master-port free on the first host (the rendezvous)
  clock      clock offset to the first host, measured over ssh, within --max-clock-skew
  nccl_env   NCCL_* / TORCH_NCCL_* in a fresh ssh shell equal across hosts
  model      with --model_name_or_path / --config_name (as train takes them): the model dir or config.json is
             there on every host with the same model_type (readable here first: a bad one is bad input)

Output: a rich table (host x check), or --json; one line per failing host and check on stderr. Exit 0 all pass,
1 the cluster has a problem, 2 bad input (malformed hostfile or .deepspeed_env, missing ssh config, bad option).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dsfleet.cli import fail
from dsfleet.hostfile import HostEntry, over_capacity, read_hostfile

CHECKS = ("ssh", "python", "torch", "deepspeed", "dsfleet", "ops", "devices", "workdir", "disk", "shm", "port",
          "clock", "nccl_env", "model")
# what docker/common.sh's required_ops builds into the image, per flavour
DEFAULT_OPS = {"cpu": "cpu_adam,async_io,deepspeed_shm_comm", "gpu": "cpu_adam,async_io,fused_adam"}
ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_")
MARKER = "DSFLEET_PREFLIGHT "
GB = 1024 ** 3


def add_arguments(parser) -> None:
    parser.add_argument("--hostfile", required=True, help="DeepSpeed hostfile (`HOST slots=N` lines)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--ssh-config", default=os.environ.get("DSFLEET_SSH_CONFIG"),
                        help="ssh config file for host aliases, ports, keys, known_hosts (default $DSFLEET_SSH_CONFIG,"
                             " else ~/.ssh/config and /etc/ssh/ssh_config)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter to probe on each host (default: this one's path, which is what the "
                             "deepspeed launcher runs on every host)")
    parser.add_argument("--cpu", action="store_true", default=os.environ.get("DS_ACCELERATOR") == "cpu",
                        help="CPU hosts: count cores instead of GPUs against slots (default when DS_ACCELERATOR=cpu)")
    parser.add_argument("--output-dir", default=".", help="the run's output dir: free space and write access are "
                        "checked there on every host (relative paths: from this directory, as the launcher does)")
    parser.add_argument("--min-free-gb", type=float, default=20.0, help="free disk needed at --output-dir (20)")
    parser.add_argument("--min-shm-gb", type=float, default=1.0, help="/dev/shm size needed (1)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="rendezvous port that must be free on the first host (default $MASTER_PORT or 29500)")
    parser.add_argument("--max-clock-skew", type=float, default=2.0, help="seconds a host's clock may differ from "
                        "the first host's (2)")
    parser.add_argument("--require-ops", default=None,
                        help="comma-separated DeepSpeed ops that must be prebuilt (default: the image's set, "
                             f"gpu: {DEFAULT_OPS['gpu']}; cpu: {DEFAULT_OPS['cpu']}; '' for none)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for each host's probe (180)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to open ssh to a host (10)")
    parser.add_argument("--model_name_or_path", "--model-name-or-path", dest="model_name_or_path", metavar="DIR",
                        help="the run's model dir (as train's flag): checked on every host (same model_type)")
    parser.add_argument("--config_name", "--config-name", dest="config_name", metavar="DIR|FILE",
                        help="the run's transformers config (as train's flag): checked on every host")


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    cpu: bool
    python: str
    output_dir: str
    workdir: str
    min_free_gb: float
    min_shm_gb: float
    master_port: int
    max_clock_skew: float
    require_ops: tuple[str, ...]
    timeout: float = 180.0
    connect_timeout: float = 10.0
    ssh_config: str | None = None
    model: str | None = None  # absolute path of the model dir / config.json the run reads
    model_type: str | None = None  # what it says here


def options(args) -> Options:
    """Validated options from argparse (bad values: one line, exit 2)."""
    for flag in ("min_free_gb", "min_shm_gb", "max_clock_skew"):
        if getattr(args, flag) < 0:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} is negative — pass 0 or more")
    for flag in ("timeout", "connect_timeout"):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be positive — pass e.g. 60")
    if args.master_port is None:  # the default: the MASTER_PORT the launcher will use, else DeepSpeed's 29500
        from dsfleet.dist_env import master_port
        args.master_port = master_port(os.environ)
    if not 1 <= args.master_port <= 65535:
        fail(f"--master-port {args.master_port} is not a TCP port — pass 1..65535 (e.g. 29500)")
    ops_text = DEFAULT_OPS["cpu" if args.cpu else "gpu"] if args.require_ops is None else args.require_ops
    ops = tuple(o.strip() for o in ops_text.split(",") if o.strip())
    bad = [o for o in ops if not re.fullmatch(r"[a-z][a-z0-9_]*", o)]
    if bad:
        fail(f"--require-ops: {bad[0]!r} is not an op name — use ds_report's names, e.g. cpu_adam,fused_adam")
    if args.ssh_config and not Path(args.ssh_config).expanduser().is_file():
        fail(f"ssh config {args.ssh_config} not found — pass an existing file to --ssh-config (or unset "
             "DSFLEET_SSH_CONFIG to use ~/.ssh/config)")
    if not args.python.strip():
        fail("--python is empty — pass the interpreter path the launcher runs on the hosts")
    model = getattr(args, "config_name", None) or getattr(args, "model_name_or_path", None)
    model_type = None
    if model:
        from dsfleet.models import model_config
        flag = "--config_name" if getattr(args, "config_name", None) else "--model_name_or_path"
        model_type = model_config(model, flag=flag).model_type  # unreadable here: one line, exit 2
        if Path(model).expanduser().exists():
            model = os.path.abspath(os.path.expanduser(model))
        else:
            model = None  # a hub id: nothing to find on the hosts' disks
    return Options(model=model, model_type=model_type, cpu=args.cpu, python=args.python, output_dir=os.path.abspath(os.path.expanduser(args.output_dir)),
                   workdir=os.getcwd(), min_free_gb=args.min_free_gb, min_shm_gb=args.min_shm_gb,
                   master_port=args.master_port, max_clock_skew=args.max_clock_skew, require_ops=ops,
                   timeout=args.timeout, connect_timeout=args.connect_timeout,
                   ssh_config=str(Path(args.ssh_config).expanduser()) if args.ssh_config else None)


def deepspeed_env_files() -> list[str]:
    """The .deepspeed_env files the launcher will export to every host, checked the way it reads them.

    DeepSpeed's runner splits every line of ~/.deepspeed_env and ./.deepspeed_env (DS_ENV_FILE renames them) at
    the first '=' and crashes on anything else — a blank line or a comment included — so those are bad input here.
    """
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    found = []
    for folder in (os.path.expanduser("~"), "."):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(True), 1):
            key = line.split("=", 1)[0].strip()
            if "=" not in line or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                fail(f"{path}:{number}: {line.strip()!r} is not NAME=VALUE — the deepspeed launcher fails on it; "
                     "keep only NAME=VALUE lines (no blank lines or comments)")
        found.append(os.path.abspath(path))
    return found


# ------------------------------------------------------------------------------------------------ the probe

# Runs on each host with the launcher's interpreter; stdlib first so a broken torch still reports the rest.
PROBE = r'''
import json, os, platform, shutil, socket, subprocess, sys
r = {"python": platform.python_version(), "executable": sys.executable, "hostname": socket.gethostname()}
def version(name):
    try:
        return {"version": str(getattr(__import__(name), "__version__", "unknown"))}
    except BaseException as e:
        return {"error": ("%s: %s" % (type(e).__name__, e))[:300]}
for name in ("dsfleet", "torch", "deepspeed"):
    r[name] = version(name)
try:
    from deepspeed.git_version_info import installed_ops
    r["ops"] = sorted(k for k, v in installed_ops.items() if v)
except BaseException as e:
    r["ops_error"] = ("%s: %s" % (type(e).__name__, e))[:300]
if A["cpu"]:
    r["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
else:
    smi = shutil.which("nvidia-smi")
    if not smi:
        r["gpus_error"] = "no nvidia-smi on PATH"
    else:
        try:
            p = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=60)
            if p.returncode == 0:
                r["gpus"] = [l.strip() for l in p.stdout.splitlines() if l.strip()]
            else:
                r["gpus_error"] = "nvidia-smi failed: " + (p.stderr or p.stdout).strip()[:200]
        except Exception as e:
            r["gpus_error"] = "nvidia-smi: %s" % e
r["workdir"] = os.path.isdir(A["workdir"])
path = A["output_dir"]
while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
usage = shutil.disk_usage(path)
r["disk"] = {"path": path, "free": usage.free, "writable": os.access(path, os.W_OK)}
try:
    st = os.statvfs("/dev/shm")
    r["shm"] = {"size": st.f_frsize * st.f_blocks, "free": st.f_frsize * st.f_bavail}
except OSError as e:
    r["shm_error"] = str(e)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", A["port"]))
    r["port_free"] = True
except OSError as e:
    r["port_free"], r["port_error"] = False, str(e)
finally:
    s.close()
r["nccl_env"] = {k: v for k, v in os.environ.items() if k.startswith(tuple(A["env_prefixes"]))}
if A.get("model"):
    cfg = A["model"] if A["model"].endswith(".json") else os.path.join(A["model"], "config.json")
    try:
        with open(cfg) as f:
            r["model"] = {"model_type": json.load(f).get("model_type")}
    except BaseException as e:
        r["model"] = {"error": ("%s: %s" % (type(e).__name__, e))[:300]}
print(A["marker"] + json.dumps(r), flush=True)
'''


def probe_command(opts: Options) -> str:
    """The shell command that runs PROBE with the launcher's interpreter on a host (quoting-proof: base64)."""
    args = {"cpu": opts.cpu, "workdir": opts.workdir, "output_dir": opts.output_dir, "port": opts.master_port,
            "env_prefixes": list(ENV_PREFIXES), "marker": MARKER, "model": opts.model}
    code = f"A = {args!r}\n{PROBE}"
    payload = base64.b64encode(code.encode()).decode()
    return f"{shlex.quote(opts.python)} -c \"import base64; exec(base64.b64decode('{payload}').decode())\""


@dataclass
class HostProbe:
    """What was learnt about one host (None where the stage was not reached)."""
    error: str | None = None              # ssh stage
    probe: dict[str, Any] | None = None   # PROBE's report
    probe_error: str | None = None
    clock_offset: float | None = None     # host clock - local clock, seconds
    clock_uncertainty: float | None = None


# ------------------------------------------------------------------------------------------------ ssh (Fabric)


def _short(exc: BaseException, target: str = "") -> str:
    """One line for an ssh failure: what happened at which user@address:port, and what to do."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    at = f" at {target}" if target else ""
    if "NoValidConnectionsError" in name or "Unable to connect" in text:
        return f"connection refused{at} — is sshd running there, is the port right?"
    if name == "gaierror":
        return f"cannot resolve the host name{at} ({text}) — fix the name or add a Host alias to the ssh config"
    if name == "BadHostKeyException":
        return f"host key does not match known_hosts{at} ({text}) — verify the host, then update known_hosts"
    if name == "SSHException" and "not found in known_hosts" in text:
        return f"host key unknown{at} ({text}) — add it to known_hosts (ssh-keyscan, verified) and retry"
    if name == "AuthenticationException":
        return f"authentication failed{at} — install your public key in the host's authorized_keys"
    if name in ("timeout", "TimeoutError"):
        return f"ssh connect timed out{at} — host down or firewalled?"
    if name == "CommandTimedOut":
        return f"timed out{at} ({text})"
    return f"{name}{at}: {text}"[:300]


def collect(entries: list[HostEntry], opts: Options) -> dict[str, HostProbe]:
    """ssh to every host in parallel; returns a HostProbe per hostfile host."""
    import paramiko
    from fabric import Config, Connection, ThreadingGroup
    from fabric.exceptions import GroupException

    class TimedConnection(Connection):
        """A Connection that remembers when its last command started and ended (for the clock check)."""
        span = (0.0, 0.0)

        def run(self, command, **kwargs):
            t0 = time.time()
            try:
                return super().run(command, **kwargs)
            finally:
                self.span = (t0, time.time())

    config = Config(runtime_ssh_path=opts.ssh_config) if opts.ssh_config else Config()
    out = {e.host: HostProbe() for e in entries}
    conns: dict[str, Any] = {}
    by_target: dict[tuple, str] = {}
    for e in entries:
        cxn = TimedConnection(e.host, config=config, connect_timeout=int(opts.connect_timeout))
        target = (cxn.user, cxn.host, cxn.port)
        if target in by_target:  # two hostfile lines, one machine: ranks would collide there
            out[e.host].error = (f"same machine as {by_target[target]} ({cxn.user}@{cxn.host}:{cxn.port}) — "
                                 "list each machine once")
            continue
        by_target[target] = e.host
        _check_host_keys(cxn, paramiko)
        conns[e.host] = cxn

    def run_all(hosts: Iterable[str], command: str, timeout: float) -> dict[str, Any]:
        group = ThreadingGroup.from_connections([conns[h] for h in hosts])
        try:
            results = group.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
        except GroupException as e:
            results = e.result
        return {h: results[conns[h]] for h in hosts}

    try:
        alive = list(conns)
        for host, res in run_all(alive, "true", opts.connect_timeout + 30).items():
            if isinstance(res, BaseException):
                cxn = conns[host]
                out[host].error = _short(res, f"{cxn.user}@{cxn.host}:{cxn.port}")
            elif res.exited != 0:
                out[host].error = f"`true` exited {res.exited} over ssh: {res.stderr.strip()[:200]}"
        alive = [h for h in alive if out[h].error is None]
        if alive:  # connections are open: one fast command measures each clock against ours
            for host, res in run_all(alive, "date +%s.%N", 30).items():
                t0, t1 = conns[host].span
                try:
                    remote = float(res.stdout.strip())
                    out[host].clock_offset, out[host].clock_uncertainty = remote - (t0 + t1) / 2, (t1 - t0) / 2
                except (AttributeError, ValueError):
                    pass  # reported by the clock check as unmeasured
            for host, res in run_all(alive, probe_command(opts), opts.timeout).items():
                if isinstance(res, BaseException):
                    out[host].probe_error = _short(res)
                    continue
                lines = [line for line in res.stdout.splitlines() if line.startswith(MARKER)]
                try:
                    out[host].probe = json.loads(lines[-1][len(MARKER):]) if lines else None
                except ValueError as e:
                    out[host].probe_error = f"unreadable probe report: {e}"
                    continue
                if not lines:
                    tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or ["no output"]
                    out[host].probe_error = f"{opts.python} exited {res.exited}: {tail[0][:240]}"
    finally:
        for cxn in conns.values():
            cxn.close()
    return out


def _check_host_keys(cxn, paramiko) -> None:
    """Reject unknown host keys (Fabric's default is to accept any) unless the ssh config says otherwise."""
    cfg = cxn.ssh_config
    client = cxn.client
    strict = str(cfg.get("stricthostkeychecking", "yes")).lower()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if strict in ("no", "off", "accept-new")
                                       else paramiko.RejectPolicy())
    files = str(cfg.get("userknownhostsfile", "~/.ssh/known_hosts ~/.ssh/known_hosts2")).split()
    files += str(cfg.get("globalknownhostsfile", "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2")).split()
    for f in files:
        path = os.path.expanduser(f)
        if os.path.isfile(path):
            client.load_system_host_keys(path)  # read-only: never written back


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class Cell:
    status: str  # ok | fail | skip
    text: str
    detail: str = ""  # why it failed (the stderr line)


@dataclass
class Report:
    entries: list[HostEntry]
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)

    @property
    def failures(self) -> list[tuple[str, str, str]]:
        return [(h, c, cell.detail or cell.text) for h, row in self.cells.items() for c, cell in row.items()
                if cell.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failures


def _reference(values: dict[str, Any], order: list[str]) -> Any:
    """The value most hosts have; a tie goes to the value of the earliest host (the master)."""
    counts = Counter(json.dumps(v, sort_keys=True) for v in values.values())
    best = max(counts.values())
    for host in order:
        if host in values and counts[json.dumps(values[host], sort_keys=True)] == best:
            return values[host]


def _others(values: dict[str, Any], ref: Any) -> str:
    return ", ".join(h for h, v in values.items() if v == ref)


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1024 ** 2:.0f} MB"


def evaluate(entries: list[HostEntry], probes: dict[str, HostProbe], opts: Options) -> Report:
    """Pure: the host x check table from what `collect` learnt."""
    order = [e.host for e in entries]
    report = Report(entries, {h: {} for h in order})
    skip = Cell("skip", "–")
    ok = {h: probes[h].probe for h in order if probes[h].error is None and probes[h].probe is not None}

    for e in entries:
        p, row = probes[e.host], report.cells[e.host]
        row["ssh"] = Cell("fail", "unreachable", p.error) if p.error else Cell("ok", "ok")
        if p.error is None and p.probe is None:
            row["python"] = Cell("fail", "probe failed", p.probe_error or "no report")

    # the same version of each component everywhere (failed imports fail on their own)
    for check in ("python", "torch", "deepspeed", "dsfleet"):
        values = {}
        for h, r in ok.items():
            if check == "python":
                values[h] = r["python"]
            elif "error" in r[check]:
                report.cells[h][check] = Cell("fail", "import failed", f"import {check} with {r['executable']}: "
                                              f"{r[check]['error']}")
            else:
                values[h] = r[check]["version"]
        if values:
            ref = _reference(values, order)
            for h, v in values.items():
                if v == ref:
                    report.cells[h][check] = Cell("ok", v)
                else:
                    report.cells[h][check] = Cell("fail", v, f"{check} {v} differs from {ref} on {_others(values, ref)}"
                                                  f" ({ok[h]['executable']}) — install the same version everywhere")

    ops = {h: r["ops"] for h, r in ok.items() if "ops" in r}
    ref_ops = _reference(ops, order) if ops else None
    for h, r in ok.items():
        if "ops" not in r:
            report.cells[h]["ops"] = Cell("fail", "unknown", f"cannot read prebuilt ops: {r.get('ops_error')}")
            continue
        missing = [o for o in opts.require_ops if o not in r["ops"]]
        if missing:
            report.cells[h]["ops"] = Cell("fail", "missing " + ",".join(missing),
                                          f"DeepSpeed ops not prebuilt: {', '.join(missing)} (ds_report) — install "
                                          "the image's deepspeed (docker/install.sh builds them)")
        elif r["ops"] != ref_ops:
            diff = sorted(set(r["ops"]) ^ set(ref_ops))
            report.cells[h]["ops"] = Cell("fail", f"{len(r['ops'])} prebuilt", f"prebuilt ops differ from "
                                          f"{_others(ops, ref_ops)} in: {', '.join(diff)} — use one image everywhere")
        else:
            report.cells[h]["ops"] = Cell("ok", f"{len(r['ops'])} prebuilt")

    slots = {e.host: e.slots for e in entries}
    for h, r in ok.items():
        if opts.cpu:
            have, what = r.get("cpus"), "core(s)"
        elif "gpus" in r:
            have, what = len(r["gpus"]), "GPU(s)"
        else:
            report.cells[h]["devices"] = Cell("fail", "no GPU", f"{r.get('gpus_error')} — a GPU host needs the "
                                              "NVIDIA driver; for CPU hosts pass --cpu")
            continue
        e = next(x for x in entries if x.host == h)
        if over_capacity([e], {h: have}):
            report.cells[h]["devices"] = Cell("fail", f"{have} < {slots[h]} slots", f"{have} {what} but slots="
                                              f"{slots[h]} (hostfile line {e.line}) — set slots={have} or fewer")
        else:
            report.cells[h]["devices"] = Cell("ok", f"{have} {what.replace('(s)', 's' if have != 1 else '')}")

    for h, r in ok.items():
        report.cells[h]["workdir"] = Cell("ok", "exists") if r["workdir"] else Cell(
            "fail", "missing", f"launch directory {opts.workdir} does not exist there (the pdsh runner cd's into it; "
            "mpirun starts ranks there) — launch from a directory every host has, e.g. a shared filesystem")
        d = r["disk"]
        if not d["writable"]:
            report.cells[h]["disk"] = Cell("fail", "read-only", f"{d['path']} is not writable (output dir "
                                           f"{opts.output_dir}) — pick a writable --output_dir")
        elif d["free"] < opts.min_free_gb * GB:
            report.cells[h]["disk"] = Cell("fail", _gb(d["free"]) + " free", f"only {_gb(d['free'])} free at "
                                           f"{d['path']} (need {opts.min_free_gb:g} GB for checkpoints) — free space "
                                           "or pick another --output-dir")
        else:
            report.cells[h]["disk"] = Cell("ok", _gb(d["free"]) + " free")
        if "shm" not in r:
            report.cells[h]["shm"] = Cell("fail", "none", f"/dev/shm unusable: {r.get('shm_error')} — mount a tmpfs")
        elif r["shm"]["size"] < opts.min_shm_gb * GB:
            report.cells[h]["shm"] = Cell("fail", _gb(r["shm"]["size"]), f"/dev/shm is {_gb(r['shm']['size'])} (need "
                                          f"{opts.min_shm_gb:g} GB) — docker run --shm-size=16g / ipc: host")
        else:
            report.cells[h]["shm"] = Cell("ok", _gb(r["shm"]["size"]))

    master = order[0]
    for h, r in ok.items():
        if h != master:
            report.cells[h]["port"] = skip
        elif r["port_free"]:
            report.cells[h]["port"] = Cell("ok", f"{opts.master_port} free")
        else:
            report.cells[h]["port"] = Cell("fail", f"{opts.master_port} busy", f"master port {opts.master_port} is "
                                           f"in use ({r.get('port_error')}) — pick a free port: preflight --master-port N, then the launcher's --master_port N")

    clocked = [h for h in order if probes[h].clock_offset is not None and probes[h].error is None]
    if clocked:
        ref = clocked[0]
        for h in order:
            p = probes[h]
            if p.error is not None:
                continue
            if p.clock_offset is None:
                if p.probe is not None:  # the host runs commands, but `date` gave no time
                    report.cells[h]["clock"] = Cell("fail", "unmeasured", "could not read the clock "
                                                    "(`date +%s.%N` over ssh) — is GNU date installed?")
                continue
            skew = p.clock_offset - probes[ref].clock_offset
            slack = p.clock_uncertainty + probes[ref].clock_uncertainty
            if abs(skew) - slack > opts.max_clock_skew:
                report.cells[h]["clock"] = Cell("fail", f"{skew:+.1f} s", f"clock {skew:+.1f} s (±{slack:.2f}) from "
                                                f"{ref}'s, more than {opts.max_clock_skew:g} s — run NTP/chrony")
            else:
                report.cells[h]["clock"] = Cell("ok", f"{skew:+.2f} s")

    envs = {h: r["nccl_env"] for h, r in ok.items()}
    if envs:
        ref_env = _reference(envs, order)
        for h, env in envs.items():
            if env == ref_env:
                report.cells[h]["nccl_env"] = Cell("ok", f"{len(env)} vars" if env else "none set")
                continue
            diff = sorted(set(env) | set(ref_env))
            diff = [f"{k}={env.get(k, '<unset>')} (vs {ref_env.get(k, '<unset>')})" for k in diff
                    if env.get(k) != ref_env.get(k)]
            report.cells[h]["nccl_env"] = Cell("fail", f"{len(diff)} differ", "NCCL env differs from "
                                               f"{_others(envs, ref_env)}: {'; '.join(diff)} — set it the same "
                                               "everywhere (or in .deepspeed_env)")

    if opts.model:
        for h, r in ok.items():
            m = r.get("model") or {"error": "not probed"}
            if "error" in m:
                report.cells[h]["model"] = Cell("fail", "unreadable", f"{opts.model}: {m['error']} — put the model "
                                                "dir where every host sees the same path (a shared filesystem)")
            elif m["model_type"] != opts.model_type:
                report.cells[h]["model"] = Cell("fail", str(m["model_type"]), f"{opts.model} holds a "
                                                f"{m['model_type']!r} model there, {opts.model_type!r} here — use "
                                                "one model dir everywhere")
            else:
                report.cells[h]["model"] = Cell("ok", m["model_type"])

    for h in order:  # whatever was not reached
        for check in CHECKS:
            report.cells[h].setdefault(check, skip)
        report.cells[h] = {c: report.cells[h][c] for c in CHECKS}
    return report


# ------------------------------------------------------------------------------------------------ output


def as_json(report: Report, opts: Options, hostfile: str, env_files: list[str]) -> dict:
    return {
        "ok": report.ok, "hostfile": hostfile, "mode": "cpu" if opts.cpu else "gpu", "python": opts.python,
        "deepspeed_env_files": env_files,
        "hosts": [{"host": e.host, "slots": e.slots,
                   "checks": {c: {"status": cell.status, "value": cell.text, "detail": cell.detail}
                              for c, cell in report.cells[e.host].items()}} for e in report.entries],
        "failures": [{"host": h, "check": c, "detail": d} for h, c, d in report.failures],
    }


def print_table(report: Report, opts: Options, hostfile: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    mode = "CPU" if opts.cpu else "GPU"
    table = Table(title=f"dsfleet preflight: {hostfile} ({len(report.entries)} hosts, {mode})", show_lines=False)
    table.add_column("host", no_wrap=True)
    table.add_column("slots", justify="right")
    for check in CHECKS:
        table.add_column(check)
    style = {"ok": ("green", "✓ "), "fail": ("bold red", "✗ "), "skip": ("dim", "")}
    for e in report.entries:
        cells = []
        for cell in report.cells[e.host].values():
            color, mark = style[cell.status]
            cells.append(f"[{color}]{mark}{cell.text}[/]")
        table.add_row(e.host, str(e.slots), *cells)
    console.print(table)


def run(args) -> int:
    opts = options(args)
    entries = read_hostfile(args.hostfile)
    env_files = deepspeed_env_files()
    probes = collect(entries, opts)
    report = evaluate(entries, probes, opts)
    if args.json:
        print(json.dumps(as_json(report, opts, args.hostfile, env_files), indent=2))
    else:
        print_table(report, opts, args.hostfile)
    for host, check, detail in report.failures:
        print(f"preflight: FAIL {host} {check}: {detail}", file=sys.stderr)
    if report.ok:
        if not args.json:
            print(f"preflight: all {len(entries)} host(s) passed every check")
        return 0
    bad = list(dict.fromkeys(h for h, _, _ in report.failures))
    print(f"preflight: {len(report.failures)} problem(s) on {', '.join(bad)}", file=sys.stderr)
    return 1
