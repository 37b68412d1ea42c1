"""Credentials stay out of files: tracker and hub secrets (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN/USERNAME/PASSWORD,
HF_TOKEN) are set in the environment of `dsfleet render` and of a real training run (wandb offline, MLflow's file
store, TensorBoard, metrics.jsonl), and then every file either wrote — the launch files of every target, spec.yaml,
ds_config.json, metrics, the trackers' own dirs — and the run's stdout/stderr are searched for each value (MLflow
keeps the username as the run's owner, in its own store: the one value allowed there). In the Kubernetes files the ranks get them through secretKeyRef entries naming the --secret, never as values."""
from __future__ import annotations

import secrets
import subprocess
import sys

import pytest
import yaml

from tests.launch import REPO, cpu_env, explain

CREDENTIALS = ("WANDB_API_KEY", "HF_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def values():
    return {name: f"{name.lower()}-{secrets.token_hex(16)}" for name in CREDENTIALS}


def leaks(root, values, *texts):
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {name}" for name, v in values.items() if v.encode() in data]
    for i, text in enumerate(texts):
        found += [f"output {i}: {name}" for name, v in values.items() if v in text]
    return found


def test_rendered_files_hold_no_credential_and_k8s_reads_them_from_the_secret(tmp_path, values):
    env = cpu_env(**values)
    outputs = []
    for target in ("all", "mpijob"):
        for secret in ([], ["--secret", "dsfleet-creds"]):
            proc = subprocess.run([sys.executable, "-m", "dsfleet.cli", "render", "--preset", "t5_3b", "--target",
                                   target, "--nodes", "2", "--gpus-per-node", "8", *secret, "--out",
                                   str(tmp_path / f"{target}{len(secret)}"), "--", "--from_scratch", "--report_to",
                                   "wandb", "mlflow"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            outputs += [proc.stdout, proc.stderr]
    assert leaks(tmp_path, values, *outputs) == []
    job = [d for d in yaml.safe_load_all((tmp_path / "all2" / "k8s" / "t5_3b.yaml").read_text())
           if d and d["kind"] == "Job"][0]
    env_list = job["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env_list
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == dict.fromkeys(CREDENTIALS, "dsfleet-creds")
    mpi = [d for d in yaml.safe_load_all((tmp_path / "mpijob2" / "k8s" / "mpijob" / "t5_3b.yaml").read_text())
           if d and d["kind"] == "MPIJob"][0]
    launcher = mpi["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in launcher["env"]}
    assert refs == dict.fromkeys(CREDENTIALS, "dsfleet-creds")  # the launcher reads them from the Secret ...
    args = launcher["args"]
    forwarded = {args[i + 1] for i, a in enumerate(args) if a == "-x"}
    assert set(CREDENTIALS) <= forwarded  # ... and mpirun forwards them by name to every rank (-x NAME, no value)
    plain = [d for d in yaml.safe_load_all((tmp_path / "all0" / "k8s" / "t5_3b.yaml").read_text()) if d]
    assert "secretKeyRef" not in yaml.safe_dump_all(plain)  # no --secret: no credential reaches the pods


@pytest.mark.slow
def test_a_tracked_run_writes_no_credential(tmp_path, values):
    root = tmp_path / "all"
    out = root / "run"
    env = {k: v for k, v in cpu_env().items() if not k.startswith(("WANDB_", "MLFLOW_", "HF_"))}
    env.update(values, WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_PROJECT="dsfleet-tests",
               MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
               HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "dsfleet.train", "--preset", "t5_tiny", "--from_scratch",
                           "--dataset_name", "embedded", "--max_steps", "4", "--logging_steps", "2", "--save_steps", "2",
                           "--save_interval_minutes", "30", "--report_to", "jsonl", "tensorboard", "wandb", "mlflow",
                           "--no_progress", "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, explain(proc)
    written = [p.name for p in out.iterdir()]
    assert {"spec.yaml", "ds_config.json", "metrics.jsonl", "checkpoints", "tb"} <= set(written), written
    assert any((root / "mlruns").rglob("meta.yaml")) and any(root.rglob("*.wandb")), "the trackers wrote nothing"
    found = leaks(root, values, proc.stdout, proc.stderr)
    # MLflow records MLFLOW_TRACKING_USERNAME as the run's owner (meta.yaml user_id, the mlflow.user tag) by design:
    # an identity, not a secret. No other value — token, password, API keys — may appear anywhere.
    assert [f for f in found if not f.endswith("MLFLOW_TRACKING_USERNAME")] == [], found
    owner = [f for f in found if f.endswith("MLFLOW_TRACKING_USERNAME")]
    assert all(f.startswith("mlruns/") for f in owner), owner
