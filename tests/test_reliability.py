"""dsfleet loses nothing: preemption signals, kill -9 mid-save, resume on another world size, a full or
read-only disk during a save — with real DeepSpeed CPU ranks, a real tmpfs for the full disk and a real
read-only bind mount. The kill -9 lands at a fault-injection point (DSFLEET_FAULT_INJECT) because a
millisecond-long save cannot be hit reliably from outside; the kill itself is a real SIGKILL."""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dsfleet.checkpoint import find
from tests.launch import REPO, VENV_BIN, cpu_env, deepspeed_train, explain, free_port, losses

pytestmark = pytest.mark.slow
BASE = ["--preset", "t5_tiny", "--from_scratch", "--dataset_name", "embedded", "--logging_steps", "1",
        "--per_device_train_batch_size", "8", "--seed", "11", "--report_to", "jsonl"]


def copy_checkpoint(src_run, step, dst_run):
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / f"step_{step}", dst_run / "checkpoints" / f"step_{step}")
    shutil.copytree(src_run / "tokenizer", dst_run / "tokenizer")
    (dst_run / "checkpoints" / "latest").write_text(f"step_{step}")


def close(a, b, rel, steps):
    """Curve b matches the reference a within rel at every step of `steps` — each of which b must have (an empty
    or short resumed curve fails)."""
    missing = sorted(set(steps) - set(b))
    assert not missing, f"steps missing from the curve: {missing[:10]}"
    bad = {s: (a[s], b[s]) for s in steps if abs(a[s] - b[s]) > rel * abs(a[s]) + 1e-6}
    assert not bad, bad


def start(args, out, extra_env=None):
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "dsfleet.train", "--no_progress", *args, "--output_dir", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rank_processes(out):
    """The rank processes (`python -m dsfleet.train --local_rank=N ...`), not the launcher above them."""
    return [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "dsfleet.train" in p.info["cmdline"] and str(out) in p.info["cmdline"]
            and any(a.startswith("--local_rank=") for a in p.info["cmdline"])]


def wait_for_step(out, step, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and losses(out) and max(losses(out)) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"run never reached step {step}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = deepspeed_train([*BASE, "--zero", "2", "--max_steps", "150", "--output_dir", str(out)])
    assert proc.returncode == 0, explain(proc)
    return losses(out)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_exits_75_and_resume_continues_the_curve(tmp_path, reference, sig):
    out = tmp_path / "run"
    proc = start([*BASE, "--zero", "2", "--max_steps", "150"], out)
    wait_for_step(out, 10, proc)
    ranks = rank_processes(out)
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert "exiting 75 for requeue" in stdout
    saved = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    assert 10 <= saved < 150
    resumed = deepspeed_train([*BASE, "--zero", "2", "--max_steps", "150", "--output_dir", str(out),
                               "--resume_from_checkpoint", "auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert f"at step {saved}" in resumed.stdout
    curve = losses(out)  # metrics.jsonl holds both runs; the resumed steps overwrite nothing before `saved`
    assert max(curve) == 150
    close(reference, curve, rel=1e-4, steps=range(1, 151))


def test_kill_9_during_save_keeps_latest_on_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*BASE, "--zero", "2", "--max_steps", "20", "--save_steps", "5"]
    proc = deepspeed_train([*args, "--output_dir", str(out)], env=cpu_env(DSFLEET_FAULT_INJECT="kill_in_save:10:1"))
    assert proc.returncode != 0
    assert (out / "checkpoints" / "latest").read_text() == "step_5"
    assert not (out / "checkpoints" / "step_10" / "COMPLETE").exists()
    assert find("auto", out).name == "step_5"
    before = losses(out)
    resumed = deepspeed_train([*args, "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert "at step 5" in resumed.stdout
    after = losses(out)
    assert (out / "checkpoints" / "latest").read_text() == "step_20" and max(after) == 20
    close(before, after, rel=1e-4, steps=range(6, 11))


@pytest.mark.parametrize("zero", [2, 3])
def test_two_rank_checkpoint_resumes_on_one_rank_and_on_two(tmp_path, zero):
    ref = tmp_path / "ref"
    args = [*BASE, "--zero", str(zero), "--max_steps", "12"]
    proc = deepspeed_train([*args, "--save_steps", "6", "--output_dir", str(ref)])
    assert proc.returncode == 0, explain(proc)
    one = tmp_path / "one"
    copy_checkpoint(ref, 6, one)  # same global batch on 1 rank: micro 8 x grad accumulation 2
    proc = deepspeed_train([*args, "--gradient_accumulation_steps", "2", "--output_dir", str(one),
                            "--resume_from_checkpoint", "auto"], ranks=1)
    assert proc.returncode == 0, explain(proc)
    assert "step_6_universal at step 6" in proc.stdout
    close(losses(ref), losses(one), rel=1e-3, steps=range(7, 13))
    two = tmp_path / "two"
    copy_checkpoint(ref, 6, two)
    proc = deepspeed_train([*args, "--output_dir", str(two), "--resume_from_checkpoint", "auto"])
    assert proc.returncode == 0, explain(proc)
    close(losses(ref), losses(two), rel=1e-4, steps=range(7, 13))


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(path, size_bytes):
        path.mkdir(parents=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}) — needs root in a container that allows mounts")
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def du(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


SAVE_ARGS = [*BASE, "--zero", "2", "--max_steps", "20", "--save_steps", "10"]


@pytest.fixture(scope="module")
def run_sizes(tmp_path_factory):
    """(bytes of a run without its checkpoints and export, bytes of one checkpoint), from one real run."""
    sizing = tmp_path_factory.mktemp("sizing") / "run"
    proc = deepspeed_train([*SAVE_ARGS, "--output_dir", str(sizing)])
    assert proc.returncode == 0, explain(proc)
    ckpt = du(sizing / "checkpoints" / "step_10")
    base = du(sizing) - du(sizing / "checkpoints" / "step_10") - du(sizing / "checkpoints" / "step_20") - du(sizing / "final")
    return base, ckpt


def test_disk_full_during_save(tmp_path, tmpfs, run_sizes):
    args = SAVE_ARGS
    base, ckpt = run_sizes
    disk = tmpfs(tmp_path / "small", base + ckpt + ckpt // 2)  # room for one checkpoint, not two
    out = disk / "run"
    proc = deepspeed_train([*args, "--output_dir", str(out)])
    assert proc.returncode == 74, explain(proc)
    line = [x for x in proc.stderr.splitlines() if x.startswith("dsfleet train:")]
    assert len(line) == 1 and "No space left on device" in line[0] and "step_10 is intact" in line[0], proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_10"
    assert not (out / "checkpoints" / "step_20").exists()
    moved = tmp_path / "bigger"
    shutil.copytree(out, moved)  # the user frees space / moves the run: it resumes from the intact checkpoint
    proc = deepspeed_train([*args, "--output_dir", str(moved), "--resume_from_checkpoint", "auto"])
    assert proc.returncode == 0 and "at step 10" in proc.stdout, explain(proc)


def test_disk_full_in_the_middle_of_the_first_save(tmp_path, tmpfs, run_sizes):
    """No earlier checkpoint to size the next one by: the disk fills while DeepSpeed writes the files. The rank
    whose write fails must still meet its peers (no hang), and no partial step_10 may be left looking loadable."""
    args = SAVE_ARGS
    base, ckpt = run_sizes
    disk = tmpfs(tmp_path / "small", base + ckpt // 3)
    out = disk / "run"
    proc = deepspeed_train([*args, "--output_dir", str(out)], timeout=240)
    assert proc.returncode == 74, explain(proc)
    line = [x for x in proc.stderr.splitlines() if x.startswith("dsfleet train:")]
    assert len(line) == 1 and "no earlier checkpoint exists" in line[0], proc.stderr[-2000:]
    assert not (out / "checkpoints" / "latest").exists() and not (out / "checkpoints" / "step_10").exists()


def test_read_only_output_dir_during_save(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", 512 * 2**20)
    view = tmp_path / "view"
    view.mkdir()
    assert subprocess.run(["mount", "--bind", str(disk), str(view)]).returncode == 0
    try:
        out = view / "run"
        proc = start([*BASE, "--zero", "2", "--max_steps", "400", "--save_steps", "20"], out)
        deadline = time.time() + 120
        while not ((out / "checkpoints" / "latest").exists() and (out / "checkpoints" / "latest").read_text() == "step_20"):
            assert time.time() < deadline and proc.poll() is None, "first checkpoint never completed"
            time.sleep(0.05)
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 74, stdout[-2000:] + stderr[-2000:]
        line = [x for x in stderr.splitlines() if x.startswith("dsfleet train:")]
        assert len(line) == 1 and "Read-only file system" in line[0] and "step_20 is intact" in line[0], stderr[-2000:]
        assert find("auto", out).name == "step_20"
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)


def test_checkpoint_saves_skip_the_checksum_torch_load_never_reads(tmp_path):
    import torch
    """dsfleet's saves write torch's zip records without their crc32 (a third to a half of a save's time, and
    torch.load does not check it): the records carry CRC 0 inside the save and a real one outside it, and the file
    loads back equal."""
    import zipfile
    from dsfleet.checkpoint import saves_without_checksums
    state = {"w": torch.arange(4096.0)}

    def data_crcs(path):
        return [i.CRC for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename]

    with saves_without_checksums():
        torch.save(state, tmp_path / "inside.pt")
    torch.save(state, tmp_path / "after.pt")
    assert data_crcs(tmp_path / "inside.pt") == [0]
    assert data_crcs(tmp_path / "after.pt") != [0]  # the setting is put back
    assert torch.equal(torch.load(tmp_path / "inside.pt")["w"], state["w"])


def test_checkpoint_loads_map_the_files_instead_of_copying_them_into_memory(tmp_path):
    """checkpoint.load reads DeepSpeed's files memory-mapped: what a resume loads (the module file, the rank's
    optimizer shard: 77 GiB for mamba_7b's one-GPU ZeRO-3) is file pages the kernel can drop, not anonymous memory
    that a pod's memory limit kills the requeued pod for. Checked on a checkpoint-sized file as dsfleet saves it
    (no checksums): the load adds no anonymous memory, a plain load adds the file's size, the values are the same,
    and a write to the loaded tensor (a CPU rank's optimizer state is that tensor) never reaches the file."""
    import gc
    import torch
    from dsfleet.checkpoint import loads_memory_mapped, saves_without_checksums

    def anon_mib() -> float:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^RssAnon:\s+(\d+) kB", status, re.M).group(1)) / 1024

    size_mib = 256
    saved = {"exp_avg": torch.randn(size_mib * 2**20 // 4, generator=torch.Generator().manual_seed(0))}
    with saves_without_checksums():
        torch.save(saved, tmp_path / "optim_states.pt")
    probe = saved["exp_avg"][:: 2**16].clone()
    total = float(saved["exp_avg"].sum(dtype=torch.float64))
    del saved
    gc.collect()

    before = anon_mib()
    with loads_memory_mapped():
        mapped = torch.load(tmp_path / "optim_states.pt", map_location="cpu", weights_only=False)
    assert torch.equal(mapped["exp_avg"][:: 2**16], probe)
    assert float(mapped["exp_avg"].sum(dtype=torch.float64)) == total  # every page read back, no copy made
    grew_mapped = anon_mib() - before
    mapped["exp_avg"].mul_(0)  # copy-on-write: private to this process
    del mapped
    gc.collect()

    before = anon_mib()
    copied = torch.load(tmp_path / "optim_states.pt", map_location="cpu", weights_only=False)  # the setting is back
    grew_copied = anon_mib() - before
    assert torch.equal(copied["exp_avg"][:: 2**16], probe), "a write to the mapped tensor reached the file"
    assert grew_mapped < 32 and grew_copied > 0.8 * size_mib, (grew_mapped, grew_copied)
