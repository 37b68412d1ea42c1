"""The Kubernetes Job `dsfleet render --target k8s` writes, run here as a cluster would run it: each pod's command,
exactly as rendered, executed once per completion index as a local process, with the environment, files, host name
and DNS names the pod would get — and the tiny preset trains as 2 real DeepSpeed CPU ranks (gloo).

What is real and what stands in (no Kubernetes here):
- env: the container's `env` list of the rendered Job, resolved as the kubelet does — literal values, `$(VAR)`
  references to earlier entries, and the downward-API fieldRef to the `batch.kubernetes.io/job-completion-index`
  annotation, which the Job controller sets to the pod's index — plus HOSTNAME, and PATH/HOME as an image provides
  them (the image's Python is this venv's).
- command: `command` + `args` of the container, `$(VAR)`-expanded, run verbatim (bash /etc/dsfleet/launch.sh ...).
- volumes: each pod runs in its own mount and UTS namespace (`unshare`), chrooted into a root built from this
  machine's directories; the ConfigMap's keys are files at its mountPath (/etc/dsfleet), the PVC is one directory
  both pods mount at /checkpoints (ReadWriteMany), the memory emptyDir is a tmpfs of its sizeLimit at /dev/shm.
- DNS: in a cluster, `<job>-0.<service>` (MASTER_ADDR) resolves through the headless Service to pod 0's IP. Here
  both pods share this machine's loopback, so each pod's /etc/hosts (a private copy, as the kubelet also writes
  one per pod) maps every pod's DNS names to 127.0.0.1. The name rank 1 connects to is the rendered MASTER_ADDR,
  unchanged; only the address it resolves to is loopback. The pod's host name is set in its UTS namespace.
- not emulated: the image itself, runAsUser 1001 (the processes run as the test's user), resource limits, and
  a network namespace per pod.

Gang restart: a rank of pod 1 gets SIGSTOP (a frozen process). Rank 0's watchdog exits 75 within the heartbeat
timeout (10 s here) with one line naming rank 1, pod 1's launcher ends its rank whose heartbeat file aged past
DSFLEET_HEARTBEAT_TIMEOUT and exits 75: both pods end with the code the podFailurePolicy ignores, no pod is left
hanging, and the replacements (every index) resume from latest.

Data: pod 0's launcher prepares the data (`dsfleet prepare`) into /checkpoints/token-cache before its ranks start
and marks it done for this Job's uid; pod 1 waits for that marker; the ranks of both pods reuse the entry.

Preemption: an evicted pod gets SIGTERM on its PID 1 (the launcher), which forwards it to its ranks; all ranks agree
at the next step, save a checkpoint and exit 75, which the Job's podFailurePolicy ignores (no backoff count) and
replaces the pod; the replacements resume from /checkpoints/<job>/checkpoints/latest and finish.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from tests.launch import REPO, VENV_BIN, free_port, losses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_STEPS = 60
SAVE_STEPS = 10
TINY_FLAGS = ["--from_scratch", "--dataset_name", "embedded", "--max_steps", str(MAX_STEPS),
              "--per_device_train_batch_size", "16", "--logging_steps", "1", "--save_steps", str(SAVE_STEPS),
              "--zero", "2", "--no_progress", "--heartbeat_timeout", "10"]
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
UID_LABEL = "metadata.labels['batch.kubernetes.io/controller-uid']"  # the Job controller labels its pods with it
JOB_UID = "0f6c1f2e-5d0b-4c1e-9a57-3b1f0c2d4e6f"  # the uid the Job object would have
IMAGE_ENV = {  # what the image's ENV and user would give the container
    "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    # the image's dsfleet is the checkout under test (a worktree puts its src/ first, as the tests' own ranks get it)
    **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}),
}


def _can_make_pods() -> str | None:
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        return "unshare/chroot not installed (util-linux, coreutils)"
    probe = subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"cannot create mount/UTS namespaces here (needs root or CAP_SYS_ADMIN): {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    reason = _can_make_pods()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("render")
    port = free_port()
    proc = subprocess.run([str(VENV_BIN / "dsfleet"), "render", "--preset", "t5_tiny", "--target", "k8s", "--nodes",
                           "2", "--gpus-per-node", "1", "--cpu", "--master-port", str(port), "--out", str(out), "--",
                           *TINY_FLAGS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all((out / "k8s" / "t5_tiny.yaml").read_text()) if d}
    return SimpleNamespace(docs=docs, port=port, root=tmp_path_factory.mktemp("cluster"))


def test_the_rendered_job_is_an_indexed_job_with_pod_dns(job):
    j, svc = job.docs["Job"], job.docs["Service"]
    spec = j["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{j['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == INDEX_ANNOTATION
    assert env["WORLD_SIZE"]["value"] == "2" and env["MASTER_PORT"]["value"] == str(job.port)
    rules = {r["action"]: r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r}
    assert 75 in rules["Ignore"]["onExitCodes"]["values"] and 2 in rules["FailJob"]["onExitCodes"]["values"]
    assert pod["restartPolicy"] == "Never" and spec["podReplacementPolicy"] == "Failed"
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]  # --cpu: no GPU request


# ------------------------------------------------------------------------------------------------ the pod runner


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined VAR is replaced, $$ escapes, anything else stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def pod_env(container: dict, index: int, hostname: str) -> dict[str, str]:
    defined: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            defined[item["name"]] = expand(item["value"], defined)
            continue
        path = item["valueFrom"]["fieldRef"]["fieldPath"]
        assert path in (INDEX_ANNOTATION, UID_LABEL), f"this test resolves the completion index and Job uid, not {path}"
        defined[item["name"]] = str(index) if path == INDEX_ANNOTATION else JOB_UID
    return {**IMAGE_ENV, "HOSTNAME": hostname, **defined}


def _quantity(q: str) -> str:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", q)
    assert m, q
    return m.group(1) + m.group(2)[0].lower()


class Pod:
    """One pod of the Indexed Job as a local process (see the module docstring for what stands in for what)."""

    def __init__(self, job, index: int, pvc: Path):
        j, svc, cm = job.docs["Job"], job.docs["Service"], job.docs["ConfigMap"]
        spec = j["spec"]["template"]["spec"]
        self.name = f"{j['metadata']['name']}-{index}"  # Indexed Job pods are named <job>-<index> as host names
        (self.container,) = spec["containers"]
        self.env = pod_env(self.container, index, self.name)
        self.argv = [expand(w, self.env) for w in self.container["command"] + self.container.get("args", [])]
        self.root = job.root / self.name
        self.log = job.root / f"{self.name}.log"
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = []
        for vm in self.container["volumeMounts"]:
            vol = volumes[vm["name"]]
            if "configMap" in vol:
                assert vol["configMap"]["name"] == cm["metadata"]["name"]
                mounts.append(("configmap", None, vm["mountPath"]))
            elif "persistentVolumeClaim" in vol:
                mounts.append(("bind", pvc, vm["mountPath"]))
            elif vol.get("emptyDir", {}).get("medium") == "Memory":
                mounts.append(("tmpfs", _quantity(vol["emptyDir"]["sizeLimit"]), vm["mountPath"]))
            else:
                raise AssertionError(f"volume {vol} has no stand-in here")
        names = [f"{j['metadata']['name']}-{i}" for i in range(j["spec"]["completions"])]
        domain = svc["metadata"]["name"]
        hosts = "".join(f"127.0.0.1\t{n}.{domain}.default.svc.cluster.local {n}.{domain} {n}\n" for n in names)
        self.script = self._setup_script(mounts, cm["data"], hosts)
        self.proc = None

    def _setup_script(self, mounts, config_data: dict[str, str], hosts: str) -> str:
        root = self.root
        lines = ["set -eu", f"root={shlex.quote(str(root))}", 'mkdir -p "$root"',
                 # the machine's directories (the image's files, the venv), read through bind mounts
                 'for dir in /*; do name=${dir#/}; [ "$name" = etc ] && continue',
                 '  if [ -L "$dir" ]; then ln -sfn "$(readlink "$dir")" "$root/$name"',
                 '  elif [ -d "$dir" ]; then mkdir -p "$root/$name"; mount --rbind "$dir" "$root/$name"; fi; done',
                 # the pod's own /etc, with its /etc/hosts
                 'rm -rf "$root/etc"; cp -a /etc "$root/etc"',
                 f'printf %s {shlex.quote(hosts)} >> "$root/etc/hosts"']
        for kind, source, target in mounts:
            dest = f'"$root"{shlex.quote(target)}'
            if kind == "configmap":
                lines.append(f"mkdir -p {dest}")
                for key, text in config_data.items():
                    lines.append(f"printf %s {shlex.quote(text)} > {dest}/{shlex.quote(key)}")
            elif kind == "bind":
                lines += [f"mkdir -p {dest}", f"mount --bind {shlex.quote(str(source))} {dest}"]
            else:
                lines += [f"mkdir -p {dest}", f"mount -t tmpfs -o size={source} tmpfs {dest}"]
        lines += [f"hostname {shlex.quote(self.name)}", 'cd "$root"', 'exec chroot "$root" "$@"']
        return "\n".join(lines)

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(["unshare", "--mount", "--uts", "--propagation", "private", "bash", "-c",
                                          self.script, self.name, *self.argv],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd="/",
                                         start_new_session=True)  # its own process group: stopped as one

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"pod {self.name} still running after {timeout:.0f}s\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        keep = [line for line in text if "Warning" not in line and "return func" not in line]
        return f"--- {self.name}\n" + "\n".join(keep[-n:])


def run_pods(pods: list[Pod], timeout: float, until=None, then=None) -> list[int]:
    """Start every pod; optionally call `then()` once `until()` is true; wait for all; their exit codes."""
    for pod in pods:
        pod.start()
    try:
        if until is not None:
            deadline = time.monotonic() + timeout
            while not until():
                if any(p.proc.poll() is not None for p in pods):
                    raise AssertionError("a pod ended before the preemption point\n" + "\n".join(p.tail() for p in pods))
                if time.monotonic() > deadline:
                    raise AssertionError("no training progress\n" + "\n".join(p.tail() for p in pods))
                time.sleep(0.2)
            then()
        return [p.wait(timeout) for p in pods]
    finally:
        for pod in pods:
            pod.kill()


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def test_pods_train_and_an_evicted_pod_resumes(job):
    j = job.docs["Job"]
    pvc = job.root / "pvc"
    pvc.mkdir()
    pods = [Pod(job, i, pvc) for i in range(j["spec"]["completions"])]
    run_dir = pvc / Path(pods[0].env["DSFLEET_OUTPUT_DIR"]).relative_to("/checkpoints")
    assert pods[0].argv[:2] == ["bash", "/etc/dsfleet/launch.sh"], pods[0].argv
    assert pods[1].env["JOB_COMPLETION_INDEX"] == "1" and pods[1].env["MASTER_ADDR"] == f"{pods[0].name}.{j['metadata']['name']}"

    # 1. both pods train; once a checkpoint exists, pod 1 is evicted: SIGTERM to its PID 1, as the kubelet sends
    codes = run_pods(pods, 300, until=lambda: logged_steps(run_dir) >= SAVE_STEPS + 2,
                     then=lambda: pods[1].proc.send_signal(signal.SIGTERM))
    logs = "\n".join(p.tail() for p in pods)
    assert codes == [75, 75], f"exit codes {codes}\n{logs}"  # checkpoint saved by every rank, then 75
    assert "2 rank(s) via env" in pods[0].log.read_text(), logs
    # the data: pod 0 prepared it into the PVC's token cache before any rank started; pod 1 waited for its marker;
    # the ranks reused the entry
    log0, log1 = pods[0].log.read_text(), pods[1].log.read_text()
    m = re.search(r"dsfleet prepare: token cache built: (/checkpoints/token-cache/tokens/\S+) — train ([\d,]+) rows",
                  log0)
    assert m, logs
    reused = f"dsfleet: token cache reused: {m.group(1)} — train {m.group(2)} rows"
    assert log0.index(m.group(0)) < log0.index(reused) < log0.index("2 rank(s) via env"), logs
    assert "dsfleet: waiting for pod 0 to prepare the data" in log1 and "token cache built" not in log1, logs
    assert (pvc / "token-cache" / f".prepared-{j['metadata']['name']}-{JOB_UID}").is_file()
    assert re.search(r"preempted \(.*\) — checkpoint step (\d+) saved", pods[0].log.read_text()), logs
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert SAVE_STEPS < saved < MAX_STEPS, saved
    # 75 is the code the Job's podFailurePolicy ignores: the controller replaces the pods without a backoff count
    ignore = [r for r in j["spec"]["podFailurePolicy"]["rules"] if r["action"] == "Ignore" and "onExitCodes" in r]
    assert ignore and 75 in ignore[0]["onExitCodes"]["values"]

    # 2. the replacement pods (same index, same env, same PVC) resume from the checkpoint and finish
    codes = run_pods(pods, 300)
    logs = "\n".join(p.tail() for p in pods)
    assert codes == [0, 0], f"exit codes {codes}\n{logs}"
    assert f"resumed from /checkpoints/{j['metadata']['name']}/checkpoints/step_{saved} at step {saved}" \
        in pods[0].log.read_text(), logs
    assert pods[0].log.read_text().count("dsfleet prepare: token cache reused") == 1, logs  # the replacement's prepare
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, MAX_STEPS + 1)), sorted(loss)  # every step logged once, across the restart
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(MAX_STEPS - 4, MAX_STEPS + 1)) / 5
    assert last < 0.5 * first, (first, last)  # the loss falls
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS}"
    assert (run_dir / "final" / "model.safetensors").is_file()
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert spec["deepspeed"] == "/etc/dsfleet/ds_config.json"  # the ConfigMap's DeepSpeed config drove the run


def rank_in_pod(port: int, rank: str) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.info["cmdline"] and "dsfleet.train" in p.info["cmdline"] and \
                    p.environ().get("MASTER_PORT") == str(port) and p.environ().get("RANK") == rank:
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no rank {rank} on port {port}")


def test_a_stopped_rank_ends_every_pod_and_the_gang_resumes(job):
    j = job.docs["Job"]
    pvc = job.root / "pvc-gang"
    pvc.mkdir()
    pods = [Pod(job, i, pvc) for i in range(j["spec"]["completions"])]
    for pod in pods:
        pod.log = job.root / f"{pod.name}-gang.log"
    run_dir = pvc / Path(pods[0].env["DSFLEET_OUTPUT_DIR"]).relative_to("/checkpoints")
    assert pods[0].env["DSFLEET_HEARTBEAT_TIMEOUT"] == "10"  # the rendered --heartbeat_timeout
    stopped = {}

    def stop_rank_1():
        stopped["at"] = time.monotonic()
        rank_in_pod(job.port, "1").suspend()  # SIGSTOP

    codes = run_pods(pods, 300, until=lambda: logged_steps(run_dir) >= SAVE_STEPS + 2, then=stop_rank_1)
    took = time.monotonic() - stopped["at"]
    logs = "\n".join(p.tail() for p in pods)
    assert codes == [75, 75], f"exit codes {codes}\n{logs}"
    assert took < 10 + 20, f"the pods took {took:.0f} s to end after the stop\n{logs}"
    log0, log1 = pods[0].log.read_text(), pods[1].log.read_text()
    assert re.search(r"dsfleet: rank 1 \(host dsfleet-t5-tiny-1, pid \d+\) has sent no heartbeat", log0), logs
    assert "has not beaten for over 10s (stopped or hung): killing it" in log1, logs
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    codes = run_pods(pods, 300)  # the Job replaces both pods: the whole gang starts again
    logs = "\n".join(p.tail() for p in pods)
    assert codes == [0, 0], f"exit codes {codes}\n{logs}"
    assert f"at step {saved}" in pods[0].log.read_text(), logs
    assert sorted(losses(run_dir)) == list(range(1, MAX_STEPS + 1))
