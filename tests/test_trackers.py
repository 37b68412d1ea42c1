"""Experiment tracking through the real libraries (`--report_to`, dsfleet/trackers.py).

One 2-rank CPU run reports to jsonl, TensorBoard, Weights & Biases (offline) and MLflow (a file store); each
library's own reader gives back what it was sent — TensorBoard's EventAccumulator, wandb's `wandb leet inspect`
(the .wandb transaction log; offline mode writes no history file), MlflowClient — and it must equal
metrics.jsonl at the same steps, be written once (rank 0 only), hold the run spec as config/params, be finished,
and hold no credential from the environment. Then the one-line errors: an unknown name, a tracker that is not
installed (the import really blocked: `sys.modules[name] = None` is how Python marks a module unimportable),
MLflow with nowhere to write; and a tracker whose process dies mid-run, which training survives.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.launch import cpu_env, deepspeed_train, explain, metrics

SECRET = "dsfleettestsecret" * 3  # set as WANDB_API_KEY and MLFLOW_TRACKING_TOKEN: must end up in no file
TRACKER_ENV = ("WANDB_", "MLFLOW_")
LOGGED = ("loss", "lr", "grad_norm", "tokens_per_s")


def tracker_free_env(**extra: str) -> dict[str, str]:
    """cpu_env without any WANDB_*/MLFLOW_* of the machine running the tests, plus `extra`."""
    env = {k: v for k, v in cpu_env().items() if not k.startswith(TRACKER_ENV)}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    out = root / "gpt2-run"
    env = tracker_free_env(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_PROJECT="dsfleet-tests",
                           WANDB_API_KEY=SECRET, MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(),
                           MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_EXPERIMENT_NAME="dsfleet-tests",
                           MLFLOW_TRACKING_TOKEN=SECRET)
    proc = deepspeed_train(["--preset", "gpt2_tiny", "--from_scratch", "--dataset_name", "embedded", "--max_steps", "20",
                            "--logging_steps", "5", "--do_train", "--do_eval", "--export_hf", "false",
                            "--report_to", "jsonl", "tensorboard", "wandb", "mlflow", "--output_dir", str(out)], env=env)
    assert proc.returncode == 0, explain(proc)
    rows = metrics(out)
    train = {r["step"]: r for r in rows if "loss" in r}
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(train) == [5, 10, 15, 20] and sorted(evals) == [20], rows
    return SimpleNamespace(root=root, out=out, env=env, proc=proc, train=train, evals=evals,
                           spec=yaml.safe_load((out / "spec.yaml").read_text()))


def jsonl_series(run, section: str, key: str) -> dict[int, float]:
    rows = run.train if section == "train" else run.evals
    return {step: row[key] for step, row in rows.items()}


@pytest.mark.slow
def test_tensorboard_still_written_and_the_start_line_names_every_tracker(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert "dsfleet: metrics to jsonl, tensorboard, wandb, mlflow" in run.proc.stdout
    events = EventAccumulator(str(run.out / "tb"))
    events.Reload()
    for key in LOGGED:
        got = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert got == pytest.approx(jsonl_series(run, "train", key), rel=1e-6), key  # TensorBoard stores float32
    assert {e.step: e.value for e in events.Scalars("eval/eval_loss")} == pytest.approx(
        jsonl_series(run, "eval", "eval_loss"), rel=1e-6)


@pytest.mark.slow
def test_mlflow_run_holds_the_same_metrics_and_the_spec(run):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the reader opens the file store too
    from mlflow.tracking import MlflowClient
    client = MlflowClient(run.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("dsfleet-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "only rank 0 logs"
    info, data = runs[0].info, runs[0].data
    assert info.status == "FINISHED" and info.run_name == "gpt2-run"
    for section, key in [*(("train", k) for k in LOGGED), ("eval", "eval_loss"), ("eval", "eval_perplexity")]:
        got = {m.step: m.value for m in client.get_metric_history(info.run_id, f"{section}/{key}")}
        assert got == jsonl_series(run, section, key), key
    assert data.params["learning_rate"] == str(run.spec["learning_rate"])
    assert data.params["preset"] == "gpt2_tiny" and data.params["max_steps"] == "20"
    assert json.loads(data.params["report_to"]) == ["jsonl", "tensorboard", "wandb", "mlflow"]
    assert data.params["world_size"] == "2"


def wandb_inspect(run_file: Path, *flags: str):
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_file)],
                          capture_output=True, text=True, timeout=120, env=tracker_free_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_wandb_offline_run_holds_the_same_metrics_and_the_spec(run):
    run_files = sorted((run.root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, f"only rank 0 logs: {run_files}"
    assert not (run.out / "wandb").exists()  # WANDB_DIR given: the run dir gets nothing of wandb's
    summary = json.loads(wandb_inspect(run_files[0], "--summary"))
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["project"] == "dsfleet-tests" and summary["name"] == "gpt2-run"
    config = summary["config"]
    assert all(config[k] == v for k, v in run.spec.items()), {k: (config.get(k), v) for k, v in run.spec.items()}
    assert config["world_size"] == 2
    history: dict[str, dict[int, float]] = {}
    for line in wandb_inspect(run_files[0]).splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            item = record["history"]["item"]
            for key, value in item.items():
                history.setdefault(key, {})[item["_step"]] = value
    for section, key in [*(("train", k) for k in LOGGED), ("eval", "eval_loss"), ("eval", "eval_perplexity")]:
        assert history[f"{section}/{key}"] == jsonl_series(run, section, key), key


@pytest.mark.slow
def test_no_credential_from_the_environment_is_written(run):
    files = [p for p in run.root.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.slow
def test_a_tracker_that_cannot_start_ends_every_rank_with_one_line(tmp_path):
    """wandb online with no API key anywhere (a fresh HOME, no netrc): rank 0's wandb.init fails after the run dir
    exists; every rank leaves with exit 2 together and the only words are rank 0's one line, no rank's traceback."""
    env = tracker_free_env(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"))
    proc = deepspeed_train(["--preset", "gpt2_tiny", "--from_scratch", "--dataset_name", "embedded", "--max_steps", "5",
                            "--report_to", "wandb", "--output_dir", str(tmp_path / "run")], env=env, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("dsfleet train:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, explain(proc)
    assert len(lines) == 1 and lines[0].startswith("dsfleet train: --report_to wandb: cannot start ("), explain(proc)
    assert "— check WANDB_API_KEY (or WANDB_MODE=offline)" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- the one-line errors ------------------------------------------------------------------------------------

def dry_run_with(tmp_path: Path, blocked: str, *flags: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m dsfleet.train --dry_run` in an empty dir with the module `blocked` unimportable (as if not
    installed); a dry run checks everything a run does before its first write, then prints its plan."""
    code = f"import sys; sys.modules[{blocked!r}] = None; from dsfleet.train import main; sys.exit(main(sys.argv[1:]))"
    argv = ["--preset", "gpt2_tiny", "--from_scratch", "--dataset_name", "embedded", "--max_steps", "2",
            "--output_dir", "run", "--no_progress", "--dry_run", *flags]
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env=tracker_free_env(**env))


MLFLOW_SET = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # mlflow's settings are there: only a package may lack


def test_with_every_tracker_installed_the_dry_run_passes_the_check(tmp_path):
    """The control for the test below: the same command, nothing blocked, gets past every check."""
    proc = dry_run_with(tmp_path, "dsfleet_unrelated_module", "--report_to", "tensorboard", "wandb", "mlflow",
                        **MLFLOW_SET)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, explain(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_not_installed_is_one_line_before_anything_is_written(tmp_path, tracker):
    proc = dry_run_with(tmp_path, tracker, "--report_to", "tensorboard", "wandb", "mlflow", **MLFLOW_SET)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dsfleet")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, explain(proc)
    assert lines[0] == (f"dsfleet train: --report_to {tracker}: the {tracker} package is not installed — "
                        f"pip install 'dsfleet[{tracker}]', or leave {tracker} out of --report_to")
    assert list(tmp_path.iterdir()) == []


def test_report_to_names_and_their_rules():
    from dsfleet.cli import UsageError
    from dsfleet.spec import merge_spec, parse_args
    base = ["--preset", "gpt2_tiny"]
    with pytest.raises(UsageError, match=r"^--report_to jsonl wandbb: 'wandbb' is not a tracker — use any of: "
                                         r"jsonl, tensorboard, wandb, mlflow"):
        parse_args([*base, "--report_to", "jsonl", "wandbb"])
    with pytest.raises(UsageError, match="none cannot be combined"):
        parse_args([*base, "--report_to", "none", "wandb"])
    assert parse_args([*base, "--report_to", "wandb", "wandb", "mlflow"]).report_to == ["wandb", "mlflow"]
    assert parse_args(base).report_to == ["jsonl", "tensorboard"]
    assert merge_spec({"report_to": "wandb"}).report_to == ["wandb"]  # YAML `report_to: wandb`, as HF takes it


def test_which_trackers_a_run_uses(monkeypatch):
    from dsfleet import trackers
    from dsfleet.cli import UsageError
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert trackers.check_trackers(["wandb"]) == ["jsonl", "wandb"]  # jsonl always; tensorboard only if named
    assert trackers.check_trackers(["none"]) == ["jsonl"]
    assert trackers.check_trackers(["mlflow", "tensorboard", "jsonl"]) == ["jsonl", "tensorboard", "mlflow"]
    assert trackers.check_trackers(["all"]) == ["jsonl", "tensorboard", "wandb", "mlflow"]  # both installed here
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: `all` is what is installed
    assert trackers.check_trackers(["all"]) == ["jsonl", "tensorboard", "wandb"]
    monkeypatch.setattr(trackers, "OPTIONAL", {"wandb": "dsfleet_no_such_module", "mlflow": "mlflow"})
    with pytest.raises(UsageError, match=r"^--report_to wandb: the dsfleet_no_such_module package is not installed"):
        trackers.check_trackers(["wandb"])


def test_mlflow_with_nowhere_to_write_is_one_line(monkeypatch):
    from dsfleet import trackers
    from dsfleet.cli import UsageError
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UsageError, match="MLFLOW_TRACKING_URI is not set — export it"):
        trackers.check_trackers(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from importlib.metadata import version
    major, minor = (int(x) for x in version("mlflow-skinny" if _dist("mlflow-skinny") else "mlflow").split(".")[:2])
    if (major, minor) >= (3, 13):  # the installed MLflow refuses a file store unless asked (its own rule)
        with pytest.raises(UsageError, match="export MLFLOW_ALLOW_FILE_STORE=true"):
            trackers.check_trackers(["mlflow"])
    else:
        assert trackers.check_trackers(["mlflow"]) == ["jsonl", "mlflow"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert trackers.check_trackers(["mlflow"]) == ["jsonl", "mlflow"]


def _dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return bool(version(name))
    except PackageNotFoundError:
        return False


DYING_SERVICE = """
import sys, psutil
from pathlib import Path
from dsfleet.metrics import MetricsLog
log = MetricsLog(Path(sys.argv[1]), True, 3, 0, None, 1, show_progress=False, report_to=["wandb"])
log.log_train(1, loss=3.0)
service = [p for p in psutil.Process().children(recursive=True) if "wandb-core" in p.name()]
assert len(service) == 1, service
service[0].terminate()  # SIGTERM, what a preemption sends every process of the job
service[0].wait(30)
log.log_train(2, loss=2.0)
log.log_train(3, loss=1.0)
log.close()
assert log.active == {}
print("closed")
"""


def test_a_tracker_that_dies_mid_run_is_warned_about_and_training_goes_on(tmp_path):
    """wandb's service process killed mid-run: the next log warns once and drops wandb; metrics.jsonl keeps every
    row, close() (the preempted path's too) returns, and the process exits without a traceback."""
    proc = subprocess.run([sys.executable, "-c", DYING_SERVICE, str(tmp_path)], capture_output=True, text=True,
                          timeout=180, env=tracker_free_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path)))
    assert proc.returncode == 0 and "closed" in proc.stdout, explain(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, explain(proc)
    assert [r["loss"] for r in metrics(tmp_path)] == [3.0, 2.0, 1.0]
    warnings = [line for line in proc.stdout.splitlines() if "warning: wandb failed" in line]
    assert len(warnings) == 1 and "metrics.jsonl has them all" in warnings[0], explain(proc)
