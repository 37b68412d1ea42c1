"""Where rank 0's metric rows go: metrics.jsonl (always: plot.png, `dsfleet bench` and the tests read it), and
the trackers `--report_to` names — TensorBoard, Weights & Biases, MLflow — each through its own library.

One small class per tracker (the `Tracker` interface: log, close, abandon). A tracker takes its settings (project, run,
tracking URI, credentials) from its library's standard environment variables and nothing else; dsfleet writes
none of them to a file. The rule for `--report_to`, as HF's: the names given are what is used, plus jsonl always;
`none` is jsonl alone; `all` is jsonl, tensorboard and each optional tracker that is installed.
`check_trackers` says a missing library or setting in one line before the run writes anything; it only looks
(importlib.util.find_spec, the environment), so it is cheap on every rank.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dsfleet.cli import fail

TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")
CHOICES = (*TRACKERS, "none", "all")  # what --report_to accepts
OPTIONAL = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the module it needs (pip extra dsfleet[<tracker>])


def parse_report_to(report_to: list[str]) -> list[str]:
    """--report_to as given, checked (names only; ValueError "what — fix"), duplicates dropped: the spec keeps it."""
    unknown = [n for n in report_to if n not in CHOICES]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a tracker — use any of: {', '.join(TRACKERS)} "
                         "(jsonl is always written), or none, or all")
    for alone in ("none", "all"):
        if alone in report_to and len(set(report_to)) > 1:
            raise ValueError(f"{alone} cannot be combined with other trackers — pass {alone} alone, or list the "
                             "trackers")
    return list(dict.fromkeys(report_to))


def check_trackers(report_to: list[str]) -> list[str]:
    """The trackers a run with this --report_to uses, jsonl first; one line (UsageError) for an unknown name, an
    optional tracker that is not installed, or an MLflow run with no place to write to. Looks, imports nothing."""
    try:
        asked = parse_report_to(report_to)
    except ValueError as e:
        fail(f"--report_to {' '.join(report_to)}: {e}")
    if "all" in asked:
        names = ["jsonl", "tensorboard", *(n for n, module in OPTIONAL.items() if installed(module))]
    else:
        names = ["jsonl", *(n for n in TRACKERS if n in asked and n != "jsonl")]
        for name in names:
            if name in OPTIONAL and not installed(OPTIONAL[name]):
                fail(f"--report_to {name}: the {OPTIONAL[name]} package is not installed — "
                     f"pip install 'dsfleet[{name}]', or leave {name} out of --report_to")
    if "mlflow" in names:
        check_mlflow_env()
    return names


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None  # None also for a module marked absent in sys.modules


def check_mlflow_env() -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:  # MLflow's own default is a sqlite file in the working directory (and needs SQLAlchemy)
        fail("--report_to mlflow: MLFLOW_TRACKING_URI is not set — export it: your tracking server "
             "(http://HOST:5000) or a local store (file:///abs/path/mlruns with MLFLOW_ALLOW_FILE_STORE=true)")
    if (urlparse(uri).scheme in ("", "file") and _mlflow_refuses_file_store()
            and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true")):
        fail(f"--report_to mlflow: MLFLOW_TRACKING_URI={uri} is a file store, which MLflow >= 3.13 opens only on "
             "request — export MLFLOW_ALLOW_FILE_STORE=true, or point MLFLOW_TRACKING_URI at a server")


def _mlflow_refuses_file_store() -> bool:
    """MLflow 3.13 made file stores opt-in (MLFLOW_ALLOW_FILE_STORE); read from the installed version, no import."""
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("mlflow", "mlflow-skinny"):
        try:
            major, minor = (int(x) for x in version(dist).split(".")[:2])
        except (PackageNotFoundError, ValueError):
            continue
        return (major, minor) >= (3, 13)
    return True


def scalars(section: str, row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a row under `train/` or `eval/` (one naming for every tracker); step and unix time are not
    metrics (each tracker keeps its own step axis and wall time)."""
    return {f"{section}/{k}": float(v) for k, v in row.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """What MetricsLog calls: log a row of the `train` or `eval` section; close at the end (done or preempted);
    abandon after one of its calls failed (let go of what the library holds, quietly)."""

    def log(self, section: str, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


class JsonlFile(Tracker):
    """metrics.jsonl, one JSON object per row: what plot.png, the benchmarks and the tests read."""

    def __init__(self, out_dir: Path, config: dict[str, Any]):
        self.path = out_dir / "metrics.jsonl"
        self._warned = False

    def log(self, section: str, row: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full or read-only disk must not kill training; the next checkpoint save reports it
            if not self._warned:
                print(f"dsfleet: warning: cannot write {self.path} ({e.strerror}) — metrics are not recorded", flush=True)
                self._warned = True


class TensorBoard(Tracker):
    """Event files in the run dir's tb/."""

    def __init__(self, out_dir: Path, config: dict[str, Any]):  # TensorBoard's hparams view is left out
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out_dir / "tb"))

    def log(self, section: str, row: dict[str, Any]) -> None:
        for tag, value in scalars(section, row).items():
            self.writer.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class Wandb(Tracker):
    """One Weights & Biases run. WANDB_PROJECT (default dsfleet), WANDB_NAME (default: the run dir's name),
    WANDB_DIR (default: the run dir), WANDB_MODE (offline, disabled), WANDB_API_KEY: wandb reads them itself."""

    def __init__(self, out_dir: Path, config: dict[str, Any]):
        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "dsfleet",
                              name=os.environ.get("WANDB_NAME") or out_dir.name,
                              dir=os.environ.get("WANDB_DIR") or str(out_dir), config=config)

    def log(self, section: str, row: dict[str, Any]) -> None:
        self.run.log(scalars(section, row), step=row["step"])

    def close(self) -> None:
        self.run.finish()

    def abandon(self) -> None:
        import wandb
        try:  # a dead service: without this, wandb's exit hook prints the same error again as a traceback
            wandb.teardown()
        except Exception:  # noqa: BLE001
            pass


class Mlflow(Tracker):
    """One MLflow run in MLFLOW_EXPERIMENT_NAME (default: MLflow's Default), at MLFLOW_TRACKING_URI; the spec as
    params. MLflow reads those variables (and MLFLOW_RUN_ID, MLFLOW_TRACKING_TOKEN/USERNAME/PASSWORD) itself."""

    def __init__(self, out_dir: Path, config: dict[str, Any]):
        import mlflow
        self.mlflow = mlflow
        run_name = None if os.environ.get("MLFLOW_RUN_ID") else out_dir.name  # a given run keeps its name
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in config.items()})

    def log(self, section: str, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics(scalars(section, row), step=row["step"])

    def close(self) -> None:
        self.mlflow.end_run()


KINDS = {"jsonl": JsonlFile, "tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
SETTINGS = {"wandb": "WANDB_API_KEY (or WANDB_MODE=offline), WANDB_PROJECT",
            "mlflow": "MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME"}


def open_trackers(names: list[str], out_dir: Path, config: dict[str, Any]) -> dict[str, Tracker]:
    """The named trackers, started; a library that cannot start its run is one line (what failed — what to set)."""
    opened: dict[str, Tracker] = {}
    for name in names:
        try:
            opened[name] = KINDS[name](out_dir, config)
        except Exception as e:  # noqa: BLE001 — any library's failure to start is the user's setting to fix
            for tracker in opened.values():
                tracker.close()
            fail(f"--report_to {name}: cannot start ({first_line(e)}) — check {SETTINGS.get(name, 'the run dir')}, "
                 f"or leave {name} out of --report_to")
    return opened


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
