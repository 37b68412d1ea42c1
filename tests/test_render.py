"""`dsfleet render`: the committed launch files are exactly what rendering gives (drift), each is valid for the tool
that reads it (kubernetes-validate --strict, shellcheck, DeepSpeed's own hostfile reader, the Slurm directives the
issue asks for), the templates share their pieces instead of copying them, and bad input is one line, exit 2, with
nothing written. Running the files is tests/test_k8s_launch.py's and tests/test_slurm_jobs.py's job."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jinja2
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from dsfleet import cli, dsconfig, render
from dsfleet.spec import parse_args
from tests.launch import REPO, VENV_BIN

# the oldest Kubernetes the files claim (podFailurePolicy GA; podReplacementPolicy beta, on by default) and the
# newest schema kubernetes-validate ships (a current release)
K8S_VERSIONS = ("1.31.0", latest_version())
COMMITTED_DIRS = ("slurm", "k8s", "hostfiles")


def committed_files() -> dict[str, str]:
    files = {}
    for d in COMMITTED_DIRS:
        for p in sorted((REPO / d).rglob("*")):
            if p.is_file() and p.name != ".gitkeep":
                files[str(p.relative_to(REPO))] = p.read_text()
    return files


def dsfleet(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "dsfleet"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("all")
    proc = dsfleet("render", "--all", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ drift


def test_committed_set_is_what_rendering_gives(rendered):
    committed = committed_files()
    assert sorted(rendered) == sorted(committed), "committed set differs in files — run `make render` and commit"
    stale = [name for name in rendered if rendered[name] != committed[name]]
    assert not stale, f"{', '.join(stale)} differ from `dsfleet render --all` — run `make render` and commit"


def test_the_committed_set_is_the_issue_s(rendered):
    names = set(rendered)
    for stem in ("t5_small", "t5_3b", "t5_11b", "gpt2_xl", "mamba7b"):
        assert f"slurm/{stem}.sbatch" in names and f"hostfiles/{stem}" in names
    assert {n for n in names if n.startswith("k8s/")} == {"k8s/t5_3b.yaml", "k8s/mamba7b.yaml"}


def test_each_header_command_reproduces_its_file(tmp_path):
    """The `Rendered by` line of every committed file is a command that gives that file byte for byte."""
    for name, text in committed_files().items():
        m = re.search(r"^# Rendered by `(dsfleet render .+)`$", text, re.M)
        assert m, f"{name} has no Rendered-by line"
        out = tmp_path / name.replace("/", "_")
        argv = shlex.split(m.group(1))[2:]
        assert cli.main(["render", *argv, "--out", str(out)] if "--" not in argv else
                        ["render", *argv[:argv.index("--")], "--out", str(out), *argv[argv.index("--"):]]) == 0
        assert (out / name).read_text() == text, f"{name}: its header command renders something else"


def test_rendering_is_deterministic_and_sbatch_is_executable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert cli.main(["render", "--all", "--out", str(out)]) == 0
    assert {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()} == \
        {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert all(p.stat().st_mode & 0o111 for p in (a / "slurm").glob("*.sbatch"))


# ------------------------------------------------------------------------------------------------ validity


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict_passes_on_every_k8s_yaml(version):
    files = sorted((REPO / "k8s").glob("*.yaml"))
    assert files
    proc = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--kubernetes-version", version,
                           *map(str, files)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARN" not in proc.stdout + proc.stderr and "ERROR" not in proc.stdout + proc.stderr
    for f in files:  # ConfigMap, PVC, Service and Job each validated
        for kind in ("configmap", "persistentvolumeclaim", "service", "job"):
            assert re.search(rf"{re.escape(str(f))} passed for resource {kind}/", proc.stdout), (f, kind, proc.stdout)


def _shellcheck(paths: list[Path]) -> subprocess.CompletedProcess:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (make sysdeps installs it)")
    return subprocess.run(["shellcheck", "--shell=bash", *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_shellcheck_passes_on_every_sbatch_and_pod_launcher(tmp_path):
    scripts = sorted((REPO / "slurm").glob("*.sbatch"))
    assert scripts
    for f in sorted((REPO / "k8s").glob("*.yaml")):  # the launcher each pod runs, from the ConfigMap
        (cm,) = [d for d in yaml.safe_load_all(f.read_text()) if d and d["kind"] == "ConfigMap"]
        scripts.append(tmp_path / f"{f.stem}-launch.sh")
        scripts[-1].write_text(cm["data"]["launch.sh"])
    proc = _shellcheck(scripts)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hostfiles_read_by_deepspeed_and_dsfleet():
    from deepspeed.launcher.runner import _parse_hostfile
    from dsfleet.hostfile import read_hostfile
    for f in sorted((REPO / "hostfiles").iterdir()):
        sbatch = (REPO / "slurm" / f"{f.name}.sbatch").read_text()
        nodes = int(re.search(r"--nodes=(\d+)", sbatch).group(1))
        gpus = int(re.search(r"--gpus-per-node=(\d+)", sbatch).group(1))
        pool = _parse_hostfile(f.read_text().splitlines())  # DeepSpeed's own reader
        assert list(pool.values()) == [gpus] * nodes, (f.name, pool)
        assert [(e.host, e.slots) for e in read_hostfile(f, gpus)] == list(pool.items())
        assert "StrictHostKeyChecking" not in f.read_text()


def sbatch_directives(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?$", text, re.M))


def test_slurm_scripts_carry_what_the_issue_asks():
    for f in sorted((REPO / "slurm").glob("*.sbatch")):
        text = f.read_text()
        d = sbatch_directives(text)
        for key in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "output", "requeue", "signal"):
            assert key in d, (f.name, key)
        assert d["ntasks-per-node"] == d["gpus-per-node"]  # one task per GPU
        assert re.fullmatch(r"B:USR1@\d+", d["signal"]) and re.fullmatch(r"\d+:\d\d:\d\d", d["time"])
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text  # master from the allocation
        assert "--resume_from_checkpoint auto" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
        assert "--container-image" in text and "apptainer exec" in text  # pyxis / apptainer options
        assert text.count("NCCL_SOCKET_IFNAME=") == 1  # the knobs in one place
        assert "StrictHostKeyChecking" not in text and not re.search(r"(?i)(password|secret|token)=", text)


def k8s_docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def test_k8s_jobs_carry_what_the_issue_asks():
    for f in sorted((REPO / "k8s").glob("*.yaml")):
        docs = k8s_docs(f)
        job, svc, cm, pvc = docs["Job"], docs["Service"], docs["ConfigMap"], docs["PersistentVolumeClaim"]
        spec = job["spec"]
        nodes = spec["completions"]
        assert spec["completionMode"] == "Indexed" and spec["parallelism"] == nodes
        assert spec["backoffLimit"] >= 1 and spec["podFailurePolicy"]["rules"]
        assert svc["spec"]["clusterIP"] == "None"
        pod = spec["template"]["spec"]
        assert pod["subdomain"] == svc["metadata"]["name"] and pod["restartPolicy"] == "Never"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
        per_node = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert int(env["WORLD_SIZE"]) == nodes * per_node and int(env["NPROC_PER_NODE"]) == per_node
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert vols[mounts["/checkpoints"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert env["DSFLEET_OUTPUT_DIR"].startswith("/checkpoints/")
        assert vols[mounts["/etc/dsfleet"]]["configMap"]["name"] == cm["metadata"]["name"]
        # the ConfigMap's DeepSpeed config is the one the pods train with: DeepSpeed's choices in the file, the
        # training values "auto" there and given by the flags — one source each; filled, it is sized for this world
        ds = json.loads(cm["data"]["ds_config.json"])
        args = c["args"]
        assert args[args.index("--deepspeed") + 1] == "/etc/dsfleet/ds_config.json"
        assert not set(args) & {"--zero", "--offload_optimizer", "--offload_param"}, args
        assert ds["train_batch_size"] == "auto" and ds["optimizer"]["params"]["lr"] == "auto"
        pod_spec = parse_args(args)
        filled = dsconfig.fill_auto(ds, pod_spec, world_size=nodes * per_node, hidden_size=1024, total_steps=10)
        assert filled["train_batch_size"] == (filled["train_micro_batch_size_per_gpu"] *
                                              filled["gradient_accumulation_steps"] * nodes * per_node)
        assert filled.get("bf16", {}).get("enabled") is True  # both committed Jobs train in bf16
        assert "StrictHostKeyChecking" not in f.read_text() and "kind: Secret" not in f.read_text()


def test_mpijob_flavour(tmp_path):
    """The Kubeflow MPIJob option: no schema for the CRD in kubernetes-validate, so its ConfigMap and PVC are validated
    as they are and each pod template strictly as a core PodTemplate."""
    assert cli.main(["render", "--preset", "t5_11b", "--target", "mpijob", "--nodes", "2", "--gpus-per-node", "8",
                     "--out", str(tmp_path), "--", "--from_scratch", "--zero", "3", "--bf16"]) == 0
    docs = k8s_docs(tmp_path / "k8s" / "mpijob" / "t5_11b.yaml")
    mpi = docs["MPIJob"]
    assert mpi["apiVersion"] == "kubeflow.org/v2beta1" and mpi["spec"]["slotsPerWorker"] == 8
    replicas = mpi["spec"]["mpiReplicaSpecs"]
    assert replicas["Worker"]["replicas"] == 2 and replicas["Launcher"]["replicas"] == 1
    launcher_args = replicas["Launcher"]["template"]["spec"]["containers"][0]["args"]
    assert launcher_args[:2] == ["-np", "16"] and "dsfleet.train" in launcher_args
    core = [docs["ConfigMap"], docs["PersistentVolumeClaim"]] + [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"mpijob-{role.lower()}"},
         "template": spec["template"]} for role, spec in replicas.items()]
    check = tmp_path / "core.yaml"
    check.write_text(yaml.safe_dump_all(core))
    for version in K8S_VERSIONS:
        proc = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--kubernetes-version", version,
                               str(check)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "WARN" not in proc.stdout, proc.stdout + proc.stderr


FAKE_TRAIN = """#!/bin/bash
# stands in for `python -m dsfleet.train`: logs its rank and args, exits 75 on TERM/USR1 (checkpoint saved)
trap 'echo "rank $RANK got TERM" >> "$LOG"; exit 75' TERM
trap 'echo "rank $RANK got USR1" >> "$LOG"; exit 75' USR1
if [ "$2" = dsfleet.cli ]; then  # pod 0's `python -m dsfleet.cli prepare ...`: FAKE_PREPARE_CODE after a second
  echo "prepare args $*" >> "$LOG"; sleep 1; exit "${FAKE_PREPARE_CODE:-0}"
fi
if [ "$FAKE_MODE" = crash ] && [ "$LOCAL_RANK" = 1 ]; then sleep 1; exit 3; fi
if [ "$FAKE_MODE" = stop ] && [ "$LOCAL_RANK" = 1 ]; then touch "$DSFLEET_HEARTBEAT_DIR/pid-$$"; kill -STOP $$; fi
echo "rank $RANK local $LOCAL_RANK world $WORLD_SIZE args $*" >> "$LOG"
sleep 60 & wait $!
"""


# Sourced through BASH_ENV by every non-interactive bash (the pod launcher here, the Slurm batch script in
# tests/test_slurm_jobs.py): bash 4.2's `wait`, which takes no option (-n came in bash 4.3, -f in 5.0, -p in 5.1).
# This machine's bash is newer and no Debian package has an older one (bash and bash-static are both 5.2): this is
# how the supervision loop runs "where wait -n / wait -p are absent"; the static check below covers the rest.
OLD_BASH_WAIT = """wait() {
  case "${1:-}" in -*) echo "bash: wait: $1: invalid option (bash 4.2 has no wait options)" >&2; return 2 ;; esac
  builtin wait "$@"
}
"""


def _launcher(tmp_path: Path, mode: str, index: int = 1, prepared: bool = True,
              **env_extra: str) -> tuple[subprocess.Popen, Path]:
    """The pod launcher of the committed t5_3b Job (pod `index` of a 2-rank-per-pod world), with a fake trainer,
    run with bash 4.2's `wait` (OLD_BASH_WAIT). `prepared`: pod 0's "data prepared" marker is there already."""
    (cm,) = [d for d in yaml.safe_load_all((REPO / "k8s" / "t5_3b.yaml").read_text()) if d and d["kind"] == "ConfigMap"]
    (tmp_path / "launch.sh").write_text(cm["data"]["launch.sh"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(FAKE_TRAIN)
    (tmp_path / "bin" / "python").chmod(0o755)
    log = tmp_path / "ranks.log"
    (tmp_path / "old_bash_wait.sh").write_text(OLD_BASH_WAIT)
    cache = tmp_path / "token-cache"
    if prepared:
        cache.mkdir()
        (cache / ".prepared-run-uid-1").write_text("by pod 0\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", LOG=str(log), FAKE_MODE=mode,
               JOB_COMPLETION_INDEX=str(index), NPROC_PER_NODE="2", WORLD_SIZE="4", MASTER_ADDR="pod-0.svc",
               MASTER_PORT="29500", DSFLEET_OUTPUT_DIR="/checkpoints/run", TMPDIR=str(tmp_path),
               DSFLEET_HEARTBEAT_TIMEOUT="2", BASH_ENV=str(tmp_path / "old_bash_wait.sh"),
               DSFLEET_CACHE_DIR=str(cache), DSFLEET_JOB_UID="uid-1", **env_extra)
    with open(tmp_path / "launcher.out", "w") as out:  # a file, not a pipe: a killed rank's children may hold it
        return subprocess.Popen(["bash", str(tmp_path / "launch.sh"), "--preset", "t5_3b"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True), log


@pytest.fixture
def stop_group():
    started = []
    yield started.append
    for proc in started:  # whatever a failed assertion left running
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_pod_launcher_forwards_preemption_and_exits_75(tmp_path, sig, stop_group):
    proc, log = _launcher(tmp_path, "run")
    stop_group(proc)
    deadline = time.monotonic() + 20
    while len(_lines(log)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = sorted(_lines(log))
    assert started == [f"rank {r} local {r - 2} world 4 args -m dsfleet.train --preset t5_3b --output_dir /checkpoints/run "
                       "--resume_from_checkpoint auto" for r in (2, 3)], started
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 75, (tmp_path / "launcher.out").read_text()
    assert sorted(_lines(log)[2:]) == [f"rank {r} got {sig.name[3:]}" for r in (2, 3)]


def test_pod_launcher_stops_the_peers_of_a_crashed_rank(tmp_path, stop_group):
    proc, log = _launcher(tmp_path, "crash")
    stop_group(proc)
    assert proc.wait(timeout=20) == 3  # the crashed rank's code, not a hang
    assert "exited 3: stopping the other ranks" in (tmp_path / "launcher.out").read_text()
    assert not any("got" in line for line in _lines(log))  # killed, not asked to checkpoint with a dead peer


def test_pod_launcher_ends_a_rank_that_stopped_beating(tmp_path, stop_group):
    """A stopped process (SIGSTOP, a wedged driver call) cannot end itself: the launcher sees its heartbeat file age
    past DSFLEET_HEARTBEAT_TIMEOUT (2 s here), kills it and its pod-mates, and exits 75 (restart the gang)."""
    proc, log = _launcher(tmp_path, "stop")
    stop_group(proc)
    started = time.monotonic()
    assert proc.wait(timeout=30) == 75, (tmp_path / "launcher.out").read_text()
    assert time.monotonic() - started < 15
    out = (tmp_path / "launcher.out").read_text()
    assert "has not beaten for over 2s (stopped or hung): killing it" in out, out
    assert "stopped beating: stopping the other ranks" in out, out
    assert "invalid option" not in out, out  # the loop never asked bash 4.2's wait for an option


@pytest.mark.parametrize("flags, why", [
    (("--from_scratch", "--dataset_name", "embedded", "--max_steps", "5"), None),
    (("--synthetic_data", "--max_steps", "5"), "--synthetic_data"),
    (("--from_scratch", "--train_file", "big.txt", "--streaming", "--max_steps", "5"), "--streaming"),
])
def test_the_prepare_step_is_rendered_only_where_there_is_a_corpus_to_tokenize(flags, why):
    """A dataset: Slurm's one prepare task and pod 0's prepare, the cache on the shared root / the PVC. Synthetic
    batches or a stream: no prepare step (a stream is tokenized as it trains), and the header says so."""
    launch = render.Launch("gpt2_tiny", "gpt2_tiny", 2, 2, flags, targets=("slurm", "k8s"), cpu=True)
    files = render.render(launch, launch.targets)
    sbatch, job = files["slurm/gpt2_tiny.sbatch"], files["k8s/gpt2_tiny.yaml"]
    (cm,) = [d for d in yaml.safe_load_all(job) if d and d["kind"] == "ConfigMap"]
    launcher = cm["data"]["launch.sh"]
    assert 'export DSFLEET_CACHE_DIR="${DSFLEET_CACHE_DIR:-$DSFLEET_OUTPUT_ROOT/token-cache}"' in sbatch
    (pod,) = [d for d in yaml.safe_load_all(job) if d and d["kind"] == "Job"]
    env = {e["name"]: e for e in pod["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DSFLEET_CACHE_DIR"]["value"] == "/checkpoints/token-cache"  # on the PVC
    if why is None:
        assert re.search(r"srun --ntasks=1 --nodes=1 .*\n.* -m dsfleet\.cli prepare --world-size "
                         r'"\$\(\(SLURM_JOB_NUM_NODES \* 2\)\)"', sbatch), sbatch
        assert sbatch.index("-m dsfleet.cli prepare") < sbatch.index('-m dsfleet.train "${train_args[@]}"')
        assert launcher.index("-m dsfleet.cli prepare") < launcher.index('-m dsfleet.train "$@"')
        assert "batch.kubernetes.io/controller-uid" in env["DSFLEET_JOB_UID"]["valueFrom"]["fieldRef"]["fieldPath"]
    else:
        assert "dsfleet.cli prepare" not in sbatch and "dsfleet.cli prepare" not in launcher
        assert "DSFLEET_JOB_UID" not in env
        assert re.search(rf"#   token cache +none: {why}", sbatch) and re.search(rf"#   token cache +none: {why}", job)


RANK_ARGS = "args -m dsfleet.train --preset t5_3b --output_dir /checkpoints/run --resume_from_checkpoint auto"


def _wait_lines(log: Path, n: int, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(_lines(log)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return _lines(log)


def test_pod_0_prepares_the_data_before_its_ranks_and_marks_it_done(tmp_path, stop_group):
    proc, log = _launcher(tmp_path, "run", index=0, prepared=False)
    stop_group(proc)
    lines = _wait_lines(log, 3)
    assert lines[0] == "prepare args -m dsfleet.cli prepare --world-size 4 -- --preset t5_3b --output_dir " \
        "/checkpoints/run", lines  # the run's own flags, before any rank
    assert sorted(lines[1:3]) == [f"rank {r} local {r} world 4 {RANK_ARGS}" for r in (0, 1)], lines
    assert (tmp_path / "token-cache" / ".prepared-run-uid-1").is_file()  # the other pods' signal to start
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 75


def test_pod_0_ends_with_the_prepare_s_code_and_starts_no_rank(tmp_path, stop_group):
    proc, log = _launcher(tmp_path, "run", index=0, prepared=False, FAKE_PREPARE_CODE="2")
    stop_group(proc)
    assert proc.wait(timeout=20) == 2  # 2: the Job's podFailurePolicy fails the Job (bad input)
    out = (tmp_path / "launcher.out").read_text()
    assert "dsfleet: preparing the data failed (exit 2" in out, out
    assert [line for line in _lines(log) if line.startswith("rank")] == [], _lines(log)
    assert not (tmp_path / "token-cache" / ".prepared-run-uid-1").exists()


def test_other_pods_wait_for_pod_0_s_marker_of_this_job(tmp_path, stop_group):
    proc, log = _launcher(tmp_path, "run", index=1, prepared=False)
    stop_group(proc)
    (tmp_path / "token-cache").mkdir()
    (tmp_path / "token-cache" / ".prepared-run-uid-0").write_text("an earlier Job's\n")  # a stale marker: not ours
    time.sleep(4)
    assert _lines(log) == [] and proc.poll() is None  # no rank yet: still waiting
    (tmp_path / "token-cache" / ".prepared-run-uid-1").write_text("by pod 0\n")
    assert sorted(_wait_lines(log, 2)) == [f"rank {r} local {r - 2} world 4 {RANK_ARGS}" for r in (2, 3)]
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=20) == 75


def test_a_waiting_pod_exits_75_on_preemption(tmp_path, stop_group):
    proc, log = _launcher(tmp_path, "run", index=1, prepared=False)
    stop_group(proc)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 75 and _lines(log) == []
    assert "TERM while waiting for the data: exiting 75" in (tmp_path / "launcher.out").read_text()


# ------------------------------------------------------------------------------------------------ bash 4.2

# what bash 4.2 (RHEL 7) does not have, each with the version that brought it
NEWER_THAN_BASH_4_2 = {
    r"\bwait\s+-[a-z]*[nfp]": "wait -n (4.3), -f (5.0), -p (5.1)",
    r"\$\{[^}]*@[QEPAKaUuLk]\}": "${var@op} transformations (4.4)",
    r"\b(declare|local|typeset)\s+-[a-zA-Z]*n\b": "namerefs (4.3)",
    r"\b(mapfile|readarray)\b[^\n]*\s-d\b": "mapfile -d (4.4)",
    r"\$\{?(EPOCHSECONDS|EPOCHREALTIME|SRANDOM|BASH_ARGV0)\b": "bash 5 variables",
    r"\$\{[A-Za-z_][A-Za-z0-9_]*\[-[0-9]+\]\}": "negative array subscripts (4.3)",
    r"\bshopt\s+-s\s+(inherit_errexit|localvar_inherit|assoc_expand_once|globasciiranges)": "shell options of 4.4+",
}


def newer_bash_features(text: str) -> list[str]:
    """Constructs a bash 4.2 script cannot use, with the line they are on. Besides the features above: an array that
    can be empty (assigned `()` or a guarded expansion) expanded as "${a[@]}" — before bash 4.4 that is an unbound
    variable under `set -u`; ${a[@]+"${a[@]}"} is the portable form."""
    found = []
    code = "\n".join(line.split("  #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    for pattern, what in NEWER_THAN_BASH_4_2.items():
        found += [f"{what}: {m.group(0)!r}" for m in re.finditer(pattern, code)]
    maybe_empty = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)=\((?:\)|\$\{[A-Za-z_][A-Za-z0-9_]*\[@\]\+)", code))
    for m in re.finditer(r'"\$\{([A-Za-z_][A-Za-z0-9_]*)\[@\]\}"', code):
        if m.group(1) in maybe_empty and code[m.start() - 1] != "+":
            found.append(f"empty array under set -u (4.4): {m.group(0)}")
    return found


def test_the_bash_4_2_check_finds_what_it_looks_for():
    old_loop = 'left=()\nwait -n -p finished "${running[@]}"\nrunning=("${left[@]}")\necho "${x@Q}"\n'
    assert len(newer_bash_features(old_loop)) == 3, newer_bash_features(old_loop)
    assert newer_bash_features('left=()\nkill ${left[@]+"${left[@]}"}\nwait "$pid"\n') == []


def test_every_rendered_script_is_bash_4_2(tmp_path, site_render):
    scripts = {p.name: p.read_text() for p in sorted((REPO / "slurm").glob("*.sbatch"))}
    for f in sorted((REPO / "k8s").glob("*.yaml")):
        (cm,) = [d for d in yaml.safe_load_all(f.read_text()) if d and d["kind"] == "ConfigMap"]
        scripts[f"{f.name}:launch.sh"] = cm["data"]["launch.sh"]
    scripts["every site option.sbatch"] = (site_render / "slurm" / "t5_3b.sbatch").read_text()
    for name, text in scripts.items():
        assert newer_bash_features(text) == [], name
        assert "BASH_VERSINFO" in text, name  # an older shell stops at once, with the reason


# ------------------------------------------------------------------------------------------------ site options

SITE_OPTIONS = ["--partition", "gpu", "--account", "proj-42", "--qos", "normal", "--mem", "500G", "--exclusive",
                "--constraint", "h100&ib", "--setup", "module load cuda/12.4 && source ~/venv/bin/activate",
                "--output-root", "/lustre/proj/runs", "--hf-home", "$SCRATCH/hf", "--hf-offline", "--max-requeues",
                "5", "--container", "pyxis", "--image", "registry.example.com/ml/dsfleet:sm90",
                "--image-pull-secrets", "regcred", "--storage-class", "cephfs", "--access-mode", "RWX",
                "--tolerations", "nvidia.com/gpu:NoSchedule,dedicated=ml:NoExecute",
                "--node-selector", "nvidia.com/gpu.product=NVIDIA-H200", "--queue", "team-a",
                "--priority-class", "high-priority", "--shm", "32Gi", "--secret", "dsfleet-creds"]


@pytest.fixture(scope="module")
def site_render(tmp_path_factory) -> Path:
    """t5_3b on 2 nodes x 8 GPUs with every site option set, as Slurm, Kubernetes and MPIJob files."""
    out = tmp_path_factory.mktemp("site")
    for target in ("all", "mpijob"):
        assert cli.main(["render", "--preset", "t5_3b", "--target", target, "--nodes", "2", "--gpus-per-node", "8",
                         *SITE_OPTIONS, "--out", str(out), "--", "--from_scratch", "--bf16"]) == 0
    return out


def test_every_site_option_reaches_its_file(site_render):
    sbatch = (site_render / "slurm" / "t5_3b.sbatch").read_text()
    d = sbatch_directives(sbatch)
    assert (d["account"], d["qos"], d["mem"], d["constraint"], d["partition"]) == \
        ("proj-42", "normal", "500G", "h100&ib", "gpu") and "exclusive" in d
    assert "module load cuda/12.4 && source ~/venv/bin/activate" in sbatch
    assert 'DSFLEET_OUTPUT_ROOT="${DSFLEET_OUTPUT_ROOT:-/lustre/proj/runs}"' in sbatch
    assert 'export HF_HOME="${DSFLEET_HF_HOME:-$SCRATCH/hf}"' in sbatch and "HF_HUB_OFFLINE=1" in sbatch
    assert 'DSFLEET_MAX_REQUEUES="${DSFLEET_MAX_REQUEUES:-5}"' in sbatch
    assert 'DSFLEET_CONTAINER="${DSFLEET_CONTAINER:-pyxis}"' in sbatch and "--save_interval_minutes 30" in sbatch
    for option in ("--account", "--qos", "--mem", "--exclusive", "--constraint", "--setup", "--output-root",
                   "--hf-home", "--hf-offline", "--max-requeues"):
        assert re.search(rf"^#   {option} +\S", sbatch, re.M), option  # the header shows it
    docs = k8s_docs(site_render / "k8s" / "t5_3b.yaml")
    job, pvc = docs["Job"], docs["PersistentVolumeClaim"]
    assert pvc["spec"]["storageClassName"] == "cephfs" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"] is True
    pod = job["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["priorityClassName"] == "high-priority"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                  {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/ml/dsfleet:sm90"
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(secret_refs) == {"WANDB_API_KEY", "HF_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                                "MLFLOW_TRACKING_PASSWORD"}
    assert all(ref["name"] == "dsfleet-creds" and ref["key"] == name for name, ref in secret_refs.items())
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["shm"]["emptyDir"]["sizeLimit"] == "32Gi"
    limit = int(c["resources"]["limits"]["memory"].removesuffix("Gi"))
    header = (site_render / "k8s" / "t5_3b.yaml").read_text()
    m = re.search(r"inside the memory limit (\d+)Gi \((\d+)Gi \+ 32Gi\)", header)
    assert m and limit == int(m.group(1)) == int(m.group(2)) + 32, header[:3000]  # /dev/shm counted in the limit
    mpi = k8s_docs(site_render / "k8s" / "mpijob" / "t5_3b.yaml")["MPIJob"]
    worker = mpi["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    assert worker["tolerations"] == pod["tolerations"] and worker["imagePullSecrets"] == [{"name": "regcred"}]


def test_a_zero3_pod_has_room_for_the_partition_deepspeed_stages_on_the_host(tmp_path):
    """ZeRO-3 without parameter offload copies each rank's 16-bit partition through host memory at optimizer init
    (planner.zero3_host_staging_bytes; mamba_7b on one H200: 12.9 of the rank's 14.4 GiB RSS): a one-GPU pod's
    memory limit holds it beside the process's 6 GiB, or the kubelet kills the pod before its first step. With
    the parameters offloaded there is no staging; the offloaded states are the planner's host bytes instead."""
    from dsfleet.planner import model_shape
    n = model_shape("mamba_7b").n_params

    def limit(*flags) -> int:
        out = tmp_path / "-".join(flags).replace("-", "")
        assert cli.main(["render", "--preset", "mamba7b", "--target", "k8s", "--nodes", "1", "--gpus-per-node", "1",
                         "--out", str(out), "--", "--from_scratch", "--bf16", *flags]) == 0
        pod = k8s_docs(out / "k8s" / "mamba7b.yaml")["Job"]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        (shm,) = [v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "shm"]
        return int(c["resources"]["limits"]["memory"].removesuffix("Gi")) - int(shm.removesuffix("Gi"))

    staged = limit("--zero", "3")
    assert staged == math.ceil((6 * 2**30 + 2 * n) / 2**30), staged  # 6 GiB + 12.9 GiB
    assert limit("--zero", "3", "--offload_optimizer", "cpu", "--offload_param", "cpu") >= 18 * n * 1.5 / 2**30


def test_every_site_option_passes_the_tools(site_render, tmp_path):
    cm = k8s_docs(site_render / "k8s" / "t5_3b.yaml")["ConfigMap"]
    (tmp_path / "launch.sh").write_text(cm["data"]["launch.sh"])
    proc = _shellcheck([site_render / "slurm" / "t5_3b.sbatch", tmp_path / "launch.sh"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for version in K8S_VERSIONS:
        proc = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--kubernetes-version", version,
                               str(site_render / "k8s" / "t5_3b.yaml")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "WARN" not in proc.stdout, proc.stdout + proc.stderr
    for name in ("slurm/t5_3b.sbatch", "k8s/t5_3b.yaml"):  # the header command gives the file back
        text = (site_render / name).read_text()
        argv = shlex.split(re.search(r"^# Rendered by `(dsfleet render .+)`$", text, re.M).group(1))[2:]
        out = tmp_path / name.replace("/", "_")
        cut = argv.index("--")
        assert cli.main(["render", *argv[:cut], "--out", str(out), *argv[cut:]]) == 0
        assert (out / name).read_text() == text, name


# ------------------------------------------------------------------------------------------------ templates


def test_templates_share_pieces_instead_of_copying_them():
    tdir = Path(render.__file__).with_name("templates")
    texts = {p.name: p.read_text() for p in tdir.iterdir()}
    # the signal-forwarding / wait logic lives in one file, included by the Slurm script and the pod launcher
    assert [n for n, t in texts.items() if "wait -n" in t or "trap " in t] == ["_supervise.j2"]
    for n in ("slurm.sbatch.j2", "k8s_launch.sh.j2"):
        assert all(f"{{{{ {m}(" in texts[n] for m in ("bash_version_check", "forward_signals", "wait_for_ranks")), n
    # the fabric knobs are one list; every backend prints it through a macro
    assert [n for n, t in texts.items() if "NCCL_SOCKET_IFNAME" in t] == ["_common.j2"]
    # pod security, volumes and the ConfigMap are written once for the Job and the MPIJob
    assert [n for n, t in texts.items() if "runAsNonRoot" in t] == ["_k8s.j2"]


def test_templates_are_strict():
    env = render.environment()
    assert env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("slurm.sbatch.j2").render(r={})


# ------------------------------------------------------------------------------------------------ bad input


BAD = {
    "unknown target": (["--preset", "t5_3b", "--target", "pbs", "--nodes", "1", "--gpus-per-node", "8"],
                       "unknown target 'pbs'"),
    "zero nodes": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "0", "--gpus-per-node", "8"],
                   "--nodes 0: needs at least 1"),
    "gpus over 16": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "17"],
                     "no node has more than 16 GPUs"),
    "nodes not a number": (["--preset", "t5_3b", "--target", "k8s", "--nodes", "two", "--gpus-per-node", "8"],
                           "--nodes 'two' is not a whole number"),
    "unknown preset": (["--preset", "t5_giant", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8"],
                       "unknown preset 't5_giant'"),
    "bad time": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8", "--time", "2d"],
                 "--time '2d' is not HH:MM:SS"),
    "flag the files own": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8", "--",
                            "--from_scratch", "--output_dir", "/x"], "--output_dir is set by the launch files"),
    "no weights": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8"],
                   "no weights given"),
    "bad train flag": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8", "--",
                        "--from_scratch", "--zero", "5"], "--zero"),
    "all with sizes": (["--all", "--nodes", "2"], "--all renders the committed set"),
    "unknown option": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "8"],
                       "unrecognized arguments"),
    # site options
    "RWO for two pods": (["--preset", "t5_3b", "--target", "k8s", "--nodes", "2", "--gpus-per-node", "8",
                          "--access-mode", "RWO", "--", "--from_scratch"], "--access-mode RWO mounts the run dir on one"),
    "bad toleration": (["--preset", "t5_3b", "--target", "k8s", "--nodes", "1", "--gpus-per-node", "8",
                        "--tolerations", "gpu:Sometimes", "--", "--from_scratch"], "is not KEY[=VALUE][:EFFECT]"),
    "setup not bash": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8",
                        "--setup", "module load cuda; if then", "--", "--from_scratch"], "--setup is not a shell snippet"),
    "bad mem": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8", "--mem", "lots",
                 "--", "--from_scratch"], "--mem 'lots' is not a Slurm memory size"),
    "output root with spaces": (["--preset", "t5_3b", "--target", "slurm", "--nodes", "1", "--gpus-per-node", "8",
                                 "--output-root", "/my runs", "--", "--from_scratch"], "--output-root '/my runs'"),
}
HOSTFILES = {  # malformed hostfile lines: the validator names the line
    "no slots": ("node-0 slots=8\nnode-1\n", ":2: host node-1 has no slots"),
    "duplicate host": ("node-0 slots=8\nnode-0 slots=8\n", ":2: host node-0 is listed twice"),
    "bad slots": ("node-0 slots=eight\n", ":1: slots='eight'"),
    "zero slots": ("node-0 slots=0\n", ":1: slots=0"),
    "spaces around =": ("node-0 slots = 8\n", ":1:"),
    "slots over the GPUs": ("node-0 slots=8\nnode-1 slots=16\n", ":2: node-1 has slots=16 but only 8 GPU(s)"),
}


def _one_line_exit_2(args: list[str], out: Path, words: str) -> None:
    proc = dsfleet("render", *args[:args.index("--")] if "--" in args else args, "--out", str(out),
                   *args[args.index("--"):] if "--" in args else [])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in lines[0], lines[0]
    assert " — " in lines[0], lines[0]  # what is wrong — what to do
    assert not out.exists(), "bad input wrote files"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, tmp_path):
    args, words = BAD[case]
    _one_line_exit_2(args, tmp_path / "out", words)


@pytest.mark.parametrize("case", list(HOSTFILES))
def test_malformed_hostfile_is_one_line_exit_2(case, tmp_path):
    text, words = HOSTFILES[case]
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)
    _one_line_exit_2(["--preset", "t5_3b", "--target", "all", "--hostfile", str(hostfile), "--gpus-per-node", "8",
                      "--", "--from_scratch"], tmp_path / "out", f"{hostfile}{words}")  # file:line: what is wrong


def test_a_good_hostfile_sizes_the_job(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two of our nodes\ngpu-a slots=4\ngpu-b slots=4  # half of it\n")
    assert cli.main(["render", "--preset", "t5_3b", "--target", "all", "--hostfile", str(hostfile), "--gpus-per-node",
                     "8", "--out", str(tmp_path), "--", "--from_scratch"]) == 0
    d = sbatch_directives((tmp_path / "slurm" / "t5_3b.sbatch").read_text())
    assert (d["nodes"], d["ntasks-per-node"], d["gpus-per-node"]) == ("2", "4", "4")
    assert (tmp_path / "hostfiles" / "t5_3b").read_text().endswith("gpu-a slots=4\ngpu-b slots=4\n")
