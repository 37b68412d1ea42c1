"""`dsfleet preflight`: the checks' logic on made-up host reports (fast), bad input (exit 2, one line), and the real
thing against a loopback OpenSSH cluster (tests/ssh_cluster.py): the healthy pair passes; a host on a closed port
and a host whose sessions import another dsfleet are each named with the failing check (exit 1); host keys are
verified (an unknown key fails, it is not silently accepted as Fabric would by default)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsfleet.hostfile import HostEntry
from dsfleet.preflight import GB, HostProbe, Options, evaluate
from tests.launch import free_port
from tests.ssh_cluster import STALE_DSFLEET_VERSION, ssh_cluster  # noqa: F401  (the fixture)

DSFLEET = str(Path(sys.executable).parent / "dsfleet")


# ------------------------------------------------------------------------------ the checks on made-up reports

def opts(**kw):
    base = dict(cpu=False, python="/opt/venv/bin/python", output_dir="/runs/x", workdir="/work", min_free_gb=10,
                min_shm_gb=1, master_port=29500, max_clock_skew=2.0, require_ops=("cpu_adam", "fused_adam"))
    return Options(**{**base, **kw})


def report_of(**kw):
    r = {"python": "3.11.7", "executable": "/opt/venv/bin/python", "hostname": "h",
         "dsfleet": {"version": "0.1.0"}, "torch": {"version": "2.13.0"}, "deepspeed": {"version": "0.19.8"},
         "ops": ["cpu_adam", "fused_adam"], "gpus": ["H100, 81559 MiB"] * 8, "cpus": 64, "workdir": True,
         "disk": {"path": "/runs", "free": 500 * GB, "writable": True}, "shm": {"size": 32 * GB, "free": 32 * GB},
         "port_free": True, "nccl_env": {"NCCL_IB_DISABLE": "0"}}
    r.update(kw)
    return r


def healthy(n=3):
    entries = [HostEntry(f"n{i}", 8, i + 1) for i in range(n)]
    probes = {e.host: HostProbe(probe=report_of(), clock_offset=0.01 * i, clock_uncertainty=0.01)
              for i, e in enumerate(entries)}
    return entries, probes


def failures(entries, probes, **kw):
    return {(h, c) for h, c, _ in evaluate(entries, probes, opts(**kw)).failures}


def test_healthy_cluster_passes():
    entries, probes = healthy()
    rep = evaluate(entries, probes, opts())
    assert rep.ok, rep.failures
    assert rep.cells["n0"]["port"].status == "ok" and rep.cells["n1"]["port"].status == "skip"  # master only


def test_odd_host_out_is_named_per_check():
    entries, probes = healthy()
    probes["n1"].probe = report_of(torch={"version": "2.12.0"}, nccl_env={"NCCL_IB_DISABLE": "1"},
                                   ops=["cpu_adam", "fused_adam", "async_io"])
    probes["n2"].probe = report_of(gpus=["H100, 81559 MiB"] * 4, shm={"size": 64 * 1024 ** 2, "free": 0},
                                   disk={"path": "/runs", "free": 2 * GB, "writable": True}, workdir=False)
    got = evaluate(entries, probes, opts())
    assert {(h, c) for h, c, _ in got.failures} == {
        ("n1", "torch"), ("n1", "nccl_env"), ("n1", "ops"),
        ("n2", "devices"), ("n2", "shm"), ("n2", "disk"), ("n2", "workdir")}
    why = {(h, c): d for h, c, d in got.failures}
    assert "torch 2.12.0 differs from 2.13.0 on n0, n2" in why["n1", "torch"]
    assert "NCCL_IB_DISABLE=1 (vs 0)" in why["n1", "nccl_env"]
    assert "4 GPU(s) but slots=8 (hostfile line 3)" in why["n2", "devices"]
    assert "64 MB" in why["n2", "shm"]


def test_tie_goes_to_the_master_and_import_errors_fail():
    entries, probes = healthy(2)
    probes["n1"].probe = report_of(dsfleet={"version": "0.0.9"}, deepspeed={"error": "ImportError: libcudart"})
    assert failures(entries, probes) == {("n1", "dsfleet"), ("n1", "deepspeed")}


def test_default_ops_are_what_the_install_script_builds():
    """preflight's default --require-ops per flavour is docker/common.sh's required_ops: a host installed by
    docker/install.sh passes, and a change to one without the other fails here, not on a cluster."""
    from dsfleet.preflight import DEFAULT_OPS
    common = Path(__file__).resolve().parents[1] / "docker" / "common.sh"
    for flavour, arch in (("cpu", "cpu"), ("gpu", "9.0")):
        out = subprocess.run(["bash", "-c", f". {common}; required_ops {arch}"], capture_output=True, text=True,
                             check=True).stdout.split()
        assert sorted(out) == sorted(DEFAULT_OPS[flavour].split(",")), (flavour, out)


def test_required_ops_gpus_cpu_mode_port_clock():
    entries, probes = healthy(2)
    for p in probes.values():
        p.probe = report_of(ops=["cpu_adam"], gpus=[])
    probes["n0"].probe["port_free"] = False
    probes["n1"].probe["port_free"] = False  # not the master: not its business
    probes["n1"].clock_offset = 9.0
    assert failures(entries, probes) == {("n0", "ops"), ("n1", "ops"), ("n0", "devices"), ("n1", "devices"),
                                         ("n0", "port"), ("n1", "clock")}
    # CPU hosts: cores count against slots, nvidia-smi is not needed
    for p in probes.values():
        p.probe.update(cpus=4, gpus_error="no nvidia-smi on PATH")
        del p.probe["gpus"]
    assert ("n0", "devices") in failures(entries, probes, cpu=True)  # 8 slots > 4 cores
    probes["n0"].probe["cpus"] = probes["n1"].probe["cpus"] = 8
    assert failures(entries, probes, cpu=True, require_ops=()) == {("n0", "port"), ("n1", "clock")}


def test_unreachable_and_unprobed_hosts_skip_the_rest():
    entries, probes = healthy(3)
    probes["n1"] = HostProbe(error="connection refused at root@10.0.0.2:22")
    probes["n2"] = HostProbe(probe_error="/opt/venv/bin/python exited 127: No such file or directory")
    rep = evaluate(entries, probes, opts())
    assert {(h, c) for h, c, _ in rep.failures} == {("n1", "ssh"), ("n2", "python")}
    assert all(cell.status == "skip" for c, cell in rep.cells["n1"].items() if c != "ssh")
    assert rep.cells["n0"]["dsfleet"].status == "ok"


# ------------------------------------------------------------------------------ bad input: one line, exit 2

def run_preflight(args, env=None, cwd=None, timeout=240):
    return subprocess.run([DSFLEET, "preflight", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


@pytest.mark.parametrize("setup, args, words", [
    ("hostfile", ["--hostfile", "{hf}"], ["hf:2", "listed twice"]),
    ("missing", ["--hostfile", "{tmp}/nope"], ["not found"]),
    ("ssh_config", ["--hostfile", "{good}", "--ssh-config", "{tmp}/no_config"], ["ssh config", "not found"]),
    ("port", ["--hostfile", "{good}", "--master-port", "70000"], ["--master-port 70000"]),
    ("ops", ["--hostfile", "{good}", "--require-ops", "cpu adam"], ["--require-ops"]),
    ("ds_env", ["--hostfile", "{good}"], [".deepspeed_env:2", "NAME=VALUE"]),
])
def test_bad_input_exit_2_one_line(tmp_path, setup, args, words):
    (tmp_path / "hf").write_text("a slots=1\na slots=1\n")
    (tmp_path / "good").write_text("a slots=1\n")
    if setup == "ds_env":  # the deepspeed launcher would crash on the blank line
        (tmp_path / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\n\nOMP_NUM_THREADS=1\n")
    fmt = {"hf": tmp_path / "hf", "good": tmp_path / "good", "tmp": tmp_path}
    env = dict(os.environ, HOME=str(tmp_path))
    env.pop("DSFLEET_SSH_CONFIG", None)
    proc = run_preflight([a.format(**fmt) for a in args], env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsfleet preflight: ") and " — " in lines[0], proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ------------------------------------------------------------------------------ a real ssh cluster


def cluster_run(cluster, tmp_path, hosts, *extra):
    hf = cluster.write_hostfile(tmp_path / "hostfile", {h: 1 for h in hosts})
    args = ["--hostfile", str(hf), "--cpu", "--min-free-gb", "1", "--min-shm-gb", "0.01",
            "--master-port", str(free_port()), *extra]
    return run_preflight(args, env=cluster.env(), cwd=tmp_path)


@pytest.mark.ssh
@pytest.mark.timeout(300)
def test_healthy_pair_passes(ssh_cluster, tmp_path):
    proc = cluster_run(ssh_cluster, tmp_path, ["node1", "node2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 2 host(s) passed every check" in proc.stdout
    for word in ("node1", "node2", "ssh", "dsfleet", "✓ 0.1.0", "nccl_env"):
        assert word in proc.stdout, proc.stdout


@pytest.mark.ssh
@pytest.mark.timeout(300)
def test_closed_port_and_stale_dsfleet_are_named(ssh_cluster, tmp_path):
    """`down` is an alias for a port nothing listens on; `stale` is a host whose ssh sessions get a PYTHONPATH
    (sshd's `Match LocalAddress` + `SetEnv`, set on the server side like a node's own profile) holding another
    dsfleet package: its interpreter really imports a different dsfleet, which is what preflight reads."""
    proc = cluster_run(ssh_cluster, tmp_path, ["node1", "node2", "stale", "down"], "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert not data["ok"]
    assert {(f["host"], f["check"]) for f in data["failures"]} == {("stale", "dsfleet"), ("down", "ssh")}
    checks = {h["host"]: h["checks"] for h in data["hosts"]}
    assert checks["stale"]["dsfleet"]["value"] == STALE_DSFLEET_VERSION
    assert checks["node1"]["dsfleet"]["value"] == "0.1.0" and checks["stale"]["torch"]["status"] == "ok"
    assert all(c["status"] == "skip" for name, c in checks["down"].items() if name != "ssh")
    err = proc.stderr
    assert f"preflight: FAIL stale dsfleet: dsfleet {STALE_DSFLEET_VERSION} differs from 0.1.0 on node1, node2" in err
    assert f"preflight: FAIL down ssh: connection refused at root@127.0.0.1:{ssh_cluster.closed_port}" in err
    assert "problem(s) on stale, down" in err


@pytest.mark.ssh
@pytest.mark.timeout(120)
def test_host_keys_are_checked(ssh_cluster, tmp_path):
    """Same cluster, but a known_hosts without its key: refused (Fabric alone would accept any key)."""
    (tmp_path / "empty_known_hosts").write_text("")
    config = ssh_cluster.ssh_config.read_text().replace(str(ssh_cluster.known_hosts),
                                                        str(tmp_path / "empty_known_hosts"))
    (tmp_path / "ssh_config").write_text(config)
    proc = cluster_run(ssh_cluster, tmp_path, ["node1"], "--ssh-config", str(tmp_path / "ssh_config"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "preflight: FAIL node1 ssh: host key unknown" in proc.stderr, proc.stderr
    # a wrong key on record: refused as a mismatch
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, timeout=30)
    key = " ".join(Path(f"{other}.pub").read_text().split()[:2])
    (tmp_path / "empty_known_hosts").write_text(f"[127.0.0.1]:{ssh_cluster.port} {key}\n")
    proc = cluster_run(ssh_cluster, tmp_path, ["node1"], "--ssh-config", str(tmp_path / "ssh_config"))
    assert proc.returncode == 1 and "host key does not match known_hosts" in proc.stderr, proc.stderr
