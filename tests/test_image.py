"""The image and the one install script (docker/): lint-clean files, CUDA_ARCH validation, the CPU ops really
prebuilt in this venv (by `make setup` -> docker/install.sh), a second install doing nothing, a 2-rank
ZeRO-Offload step on those ops with nothing JIT-compiled, and (opt-in, buildah) the CPU image built and run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, VENV_BIN, allreduce_segments_left, cpu_env, deepspeed_train, explain, metrics

DOCKER = REPO / "docker"
JIT_MARKERS = ("Building extension module", "Loading extension module", "Emitting ninja build file")


def run(cmd, env=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def offload_report(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if "OFFLOAD_STEP " in ln]
    assert lines, explain(proc)
    return json.loads(lines[-1].split("OFFLOAD_STEP ", 1)[1])


# ---- static: lint -------------------------------------------------------------------------------------------
def test_hadolint_clean_on_every_dockerfile():
    dockerfiles = sorted(DOCKER.glob("Dockerfile*"))
    assert dockerfiles
    proc = run([str(VENV_BIN / "hadolint"), *map(str, dockerfiles)])
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_shellcheck_clean_on_docker_scripts():
    scripts = sorted(DOCKER.glob("*.sh")) + [REPO / "scripts" / "gpu_ops_check.sh"]
    proc = run(["shellcheck", *map(str, scripts)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_docker_file_says_why_it_exists():
    for path in [*DOCKER.glob("*.sh"), *DOCKER.glob("*.py"), REPO / "scripts" / "gpu_ops_check.sh"]:
        head = path.read_text().splitlines()[:3]
        assert any(line.startswith("#") and len(line) > 30 for line in head) or head[0].startswith('"""'), path


# ---- CUDA_ARCH: accepted forms, junk rejected in one line with exit 2 ------------------------------------------
@pytest.mark.parametrize("value, expected", [("8.9", "8.9"), ("8.0;9.0", "8.0;9.0"), ("8.0 9.0", "8.0;9.0"),
                                             ("9.0+PTX", "9.0+PTX"), ("7.5;8.6;9.0+PTX", "7.5;8.6;9.0+PTX"),
                                             ("", "cpu"), ("cpu", "cpu")])
def test_cuda_arch_accepted(value, expected):
    proc = run(["bash", "-c", '. docker/common.sh && cuda_arch_list "$1"', "_", value])
    assert proc.returncode == 0 and proc.stdout.strip() == expected, proc.stderr


@pytest.mark.parametrize("value", ["sm_90", "9.0a", "90", "8.9;junk", "9", ";", "8.9+ptx", "9.0 && rm -rf /"])
def test_cuda_arch_junk_rejected_by_install_and_image_build(value):
    for cmd in (["bash", "docker/install.sh"], ["bash", "docker/build-image.sh", value]):
        env = dict(os.environ, CUDA_ARCH=value, PYTHON=sys.executable)
        proc = run(cmd, env=env, timeout=60)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "CUDA_ARCH" in lines[0] and "8.9" in lines[0], proc.stderr


@pytest.mark.parametrize("args, needle", [(["", "dsfleet"], "CUDA_ARCH is required"),
                                          (["8.9", "Dsfleet:latest"], "IMAGE=")])
def test_image_build_bad_input(args, needle):
    proc = run(["bash", "docker/build-image.sh", *args], timeout=30)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr


def test_install_bad_input_one_line(tmp_path):
    cases = [({"PYTHON": str(tmp_path / "nope")}, "PYTHON="),
             ({"WHEELHOUSE": str(tmp_path / "missing")}, "WHEELHOUSE="),
             ({"OFFLINE": "1"}, "OFFLINE=1 needs WHEELHOUSE"),
             ({"DSFLEET_SRC": str(tmp_path)}, "DSFLEET_SRC="),
             ({"DSFLEET_MAMBA_KERNELS": "1"}, "DSFLEET_MAMBA_KERNELS=1 needs a GPU CUDA_ARCH"),  # this venv: CPU
             ({"DSFLEET_MAMBA_KERNELS": "yes"}, "DSFLEET_MAMBA_KERNELS=yes")]
    for extra, needle in cases:
        env = {**os.environ, "PYTHON": sys.executable, **extra}
        proc = run(["bash", "docker/install.sh"], env=env, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, \
            (extra, proc.stderr)
    proc = run(["bash", "docker/install.sh", "everything"], env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and "unknown step" in proc.stderr
    # the Mamba kernels are CUDA only: on the CPU flavour their step does nothing, and says nothing
    proc = run(["bash", "docker/install.sh", "mamba"], env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)


# ---- this venv: the ops are prebuilt and a second install does nothing --------------------------------------
def test_ds_report_lists_cpu_ops_installed():
    proc = run(["bash", "docker/check-ops.sh"], env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    for op in ("cpu_adam", "async_io", "deepspeed_shm_comm"):
        assert any(line.startswith(op + " ") and "[YES]" in line for line in proc.stdout.splitlines()), op


def test_install_again_is_fast_and_builds_nothing():
    env = dict(os.environ, PYTHON=sys.executable)
    t0 = time.monotonic()
    proc = run(["bash", "docker/install.sh", "torch", "deepspeed"], env=env, timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nothing to do" in proc.stdout and "building deepspeed" not in proc.stdout, proc.stdout
    assert "keeping torch" in proc.stdout
    assert took < 60, f"the no-op install took {took:.0f} s"


# ---- ZeRO-Offload on the prebuilt ops, 2 CPU ranks: nothing JIT-compiled ------------------------------------
@pytest.mark.slow
def test_zero_offload_two_ranks_entry_point_no_jit(tmp_path):
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    out = tmp_path / "run"
    env = cpu_env(TORCH_EXTENSIONS_DIR=str(ext))
    proc = deepspeed_train(["--preset", "gpt2_tiny", "--from_scratch", "--synthetic_data", "--zero", "2",
                            "--offload_optimizer", "cpu",
                            "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2",
                            "--output_dir", str(out)], env=env, timeout=400)
    assert proc.returncode == 0, explain(proc)
    import yaml
    spec = yaml.safe_load((out / "spec.yaml").read_text())
    assert spec["offload_optimizer"] == "cpu" and spec["zero"] == 2, spec
    assert [r["step"] for r in metrics(out) if "loss" in r][-1] == 2
    assert not list(ext.iterdir()), f"JIT-built: {list(ext.iterdir())}"
    assert not any(m in proc.stdout + proc.stderr for m in JIT_MARKERS), explain(proc)


@pytest.mark.slow
def test_zero_offload_two_ranks_uses_the_prebuilt_libraries(tmp_path):
    """The entry point cannot show which library each op came from; this plain DeepSpeed script can."""
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = cpu_env(TORCH_EXTENSIONS_DIR=str(ext))
    port = _port()
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "docker/offload_step.py",
           "--zero", "2", "--offload_optimizer", "cpu", "--steps", "2", "--aio_dir", str(tmp_path)]
    proc = run(cmd, env=env, timeout=300)
    assert proc.returncode == 0, explain(proc)
    report = offload_report(proc)
    site = Path(sys.executable).parent.parent
    assert report["world_size"] == 2 and report["optimizer"] == "DeepSpeedCPUAdam", report
    for op in ("cpu_adam", "deepspeed_shm_comm", "async_io"):
        assert op in report["ops"] and report["ops"][op].startswith(str(site)), report["ops"]
        assert "/deepspeed/ops/" in report["ops"][op], report["ops"]
    assert report["aio"] == "ok", report
    assert report["jit_built"] == [] and not list(ext.iterdir())
    assert not allreduce_segments_left(port)  # released, not leaked


def _port() -> int:
    from tests.launch import free_port
    return free_port()


# ---- the CPU image, built with buildah from a locally made Debian base (~13 min the first time, cached after) ---
def _image_test_skip_reason() -> str | None:
    if os.environ.get("DSFLEET_IMAGE_TEST") == "0":
        return "DSFLEET_IMAGE_TEST=0: the CPU image build (about 13 min cold on 2 cores) was turned off"
    if not shutil.which("buildah") or not shutil.which("debootstrap"):
        return "buildah/debootstrap not installed (apt-get install buildah debootstrap)"
    if os.geteuid() != 0:
        return "debootstrap of the local base needs root"
    if not _torch_cpu_wheel():
        return "no torch-*+cpu wheel for this Python in /opt/wheels or DSFLEET_TORCH_WHEEL_DIR"
    return None


def _torch_cpu_wheel() -> Path | None:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for d in (os.environ.get("DSFLEET_TORCH_WHEEL_DIR", ""), "/opt/wheels"):
        if d and Path(d).is_dir():
            found = sorted(Path(d).glob(f"torch-*+cpu-{tag}-{tag}-*x86_64.whl"))
            if found:
                return found[-1]
    return None


@pytest.mark.slow
@pytest.mark.timeout(2700)  # a cold build (DeepSpeed's ops compiled on 2 cores: 732 s idle) plus the in-image runs
@pytest.mark.skipif(_image_test_skip_reason() is not None, reason=str(_image_test_skip_reason()))
def test_cpu_image_builds_and_runs_offload_step(tmp_path):
    # The base's Python must be the torch wheel's: bookworm has 3.11 (this venv's, checked by the wheel tag).
    proc = run(["bash", "docker/make-local-base.sh", "bookworm"], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = proc.stdout.strip().splitlines()[-1]
    wheel = _torch_cpu_wheel()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy(wheel, wheels)
    version = wheel.name.split("-")[1]  # e.g. 2.13.0+cpu: only the carried wheel matches, never a CUDA one
    env = dict(os.environ, WHEELHOUSE=str(wheels), TORCH_VERSION=version, TORCH_INDEX_URL="", MAX_JOBS="2")
    t0 = time.monotonic()
    proc = run(["bash", "docker/build-image.sh", "cpu", "localhost/dsfleet-test", base], env=env, timeout=3600)
    build_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    tag = f"localhost/dsfleet-test:cpu-torch{version.split('+')[0]}-ds0.19.8"
    assert f"built {tag}" in proc.stdout
    print(f"image build took {build_s:.0f} s")

    info = json.loads(run(["buildah", "inspect", "--type", "image", tag]).stdout)
    assert info["OCIv1"]["config"]["User"] not in ("", "0", "root"), info["OCIv1"]["config"]
    ctr = run(["buildah", "from", "--pull-never", tag]).stdout.strip()
    try:
        def inside(*cmd, timeout=600):
            return run(["buildah", "run", "--isolation", "chroot", ctr, "--", *cmd], timeout=timeout)
        check = inside("bash", "/opt/dsfleet/docker/check-ops.sh")
        assert check.returncode == 0, check.stdout[-3000:] + check.stderr
        assert inside("id", "-u").stdout.strip() != "0"
        step = inside("env", "DS_ACCELERATOR=cpu", "TORCH_EXTENSIONS_DIR=/tmp/ext", "OMP_NUM_THREADS=1",
                      "deepspeed", "--num_gpus", "2", "--master_port", str(_port()),
                      "/opt/dsfleet/docker/offload_step.py", "--zero", "2", "--offload_optimizer", "cpu",
                      "--aio_dir", "/home/dsfleet")
        assert step.returncode == 0, explain(step)
        report = offload_report(step)
        assert report["jit_built"] == [] and report["optimizer"] == "DeepSpeedCPUAdam", report
        assert all(report["ops"][op].startswith("/opt/venv/") for op in ("cpu_adam", "deepspeed_shm_comm")), report
        assert inside("dsfleet", "--help").returncode == 0
        # multi-node plumbing as the non-root user: its own sshd, then ssh and pdsh through it
        ssh = inside("bash", "-c", "set -e; ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/id_ed25519; "
                     f"SSH_PORT={_port()} bash /opt/dsfleet/docker/start-sshd.sh; "
                     "cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys; sleep 1; "
                     "ssh -o BatchMode=yes localhost 'echo ssh-as-$(id -un)'; pdsh -w localhost echo pdsh-ok; "
                     "kill $(cat ~/.ssh/sshd.pid)", timeout=120)
        assert ssh.returncode == 0 and "ssh-as-dsfleet" in ssh.stdout and "pdsh-ok" in ssh.stdout, explain(ssh)
    finally:
        run(["buildah", "rm", ctr])
