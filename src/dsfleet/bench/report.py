"""What `dsfleet bench` hands back: the runs as measured, the ratios and checks against targets, the loss curves
and the environment, as OUT/results.json and OUT/results.md. Kept apart from the suites so that every suite is
reported the same way, and rewritten after every run so a call cut short still leaves what it measured.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from dsfleet.bench.runner import gpu_query


@dataclass
class Result:
    """One run as the report shows it."""
    suite: str
    name: str
    tool: str  # "dsfleet" | "hf_trainer" | "plain_pytorch"
    gpus: int
    ok: bool = False
    zero_stage: int | None = None
    config: str = ""
    tokens_per_s: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    planned_peak_gib: float | None = None  # the planner's predicted peak for this run's config (any-model suites)
    first_step_s: float | None = None
    wall_s: float | None = None
    step_ms: list[float] = field(default_factory=list)  # each timed step's wall time (dsfleet runs: per-step rows)
    losses: dict[int, float] = field(default_factory=dict)
    command: str = ""
    log: str = ""
    note: str = ""
    superseded: bool = False  # failed, then measured again (e.g. without torch.compile): not counted

    @property
    def tokens_per_s_per_gpu(self) -> float | None:
        return self.tokens_per_s / self.gpus if self.tokens_per_s else None


class Report:
    """The results, checks, loss tables and notes of one `dsfleet bench` call, written to `out` on every record.
    `environment()` gives the report's header (hardware, versions, the command) at the time of writing."""

    def __init__(self, out: Path, environment: Callable[[], dict[str, Any]]):
        self.out = out
        self.environment = environment
        self.results: list[Result] = []
        self.checks: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.loss_tables: dict[str, list[tuple[int, float, float, float]]] = {}
        self.loss_names: dict[str, list[str]] = {}  # the two runs of each loss table (default: plain, fast)

    def record(self, result: Result) -> None:
        self.results.append(result)
        self.write()

    def all_ok(self) -> bool:
        return all(r.ok for r in self.results if not r.superseded)

    def check(self, suite: str, what: str, value: float | None, target: float | None, fmt: str = "{:.2f}",
              below: bool = False) -> None:
        passed = None if target is None or value is None else (value <= target if below else value >= target)
        self.checks.append({"suite": suite, "what": what, "value": value, "target": target, "below": below,
                            "fmt": fmt, "pass": passed})

    def check_within(self, suite: str, what: str, value: float | None, tolerance: float | None,
                     fmt: str = "{:+.1%}") -> None:
        """A signed relative error checked by its size: passes when |value| <= tolerance."""
        passed = None if tolerance is None or value is None else abs(value) <= tolerance
        self.checks.append({"suite": suite, "what": what, "value": value, "target": tolerance, "below": True,
                            "within": True, "fmt": fmt, "pass": passed})

    def check_ratio(self, suite: str, what: str, a: Result, b: Result, target: float | None) -> None:
        value = a.tokens_per_s / b.tokens_per_s if a.ok and b.ok and b.tokens_per_s else None
        self.check(suite, what, value, target, fmt="{:.2f}x")

    def compare_losses(self, suite: str, plain: Result, fast: Result, precision: str, rtol: float,
                       names: tuple[str, str] = ("plain", "fast"), key: str | None = None) -> None:
        """fast's loss at every step both logged against plain's; `key` names the table (default: the suite's
        one table) when a suite compares more than one pair."""
        steps = sorted(set(plain.losses) & set(fast.losses))
        rows = [(s, plain.losses[s], fast.losses[s], abs(fast.losses[s] - plain.losses[s]) / abs(plain.losses[s]))
                for s in steps]
        self.loss_tables[key or suite] = rows
        self.loss_names[key or suite] = list(names)
        worst = max((r[3] for r in rows), default=None)
        self.checks.append({"suite": suite, "what": f"loss curve {names[1]} vs {names[0]}, max relative difference over "
                            f"{len(rows)} steps ({precision}, same seed)", "value": worst, "target": rtol,
                            "below": True, "fmt": "{:.1e}", "pass": None if worst is None else worst <= rtol})

    def write(self) -> None:
        doc = {"environment": self.environment(),
               "results": [dict(asdict(r), tokens_per_s_per_gpu=r.tokens_per_s_per_gpu) for r in self.results],
               "checks": self.checks, "loss_curves": self.loss_tables, "loss_curve_names": self.loss_names,
               "notes": self.notes}
        (self.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (self.out / "results.md").write_text(markdown(doc))


def environment(args, gpu_names: list[str], cpu: bool, peak: float | None, prebuilt: dict[str, Any],
                started: float) -> dict[str, Any]:
    """The report's header: hardware, library versions, the command as typed, the ops built before timing."""
    versions = {}
    for pkg in ("torch", "transformers", "deepspeed", "accelerate"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"gpus": gpu_names, "driver": gpu_driver() if not cpu else None, "peak_tflops": peak,
            "python": platform.python_version(), "host_cpus": os.cpu_count(), **versions,
            "command": bench_command(args), "prebuilt_ops": prebuilt, "elapsed_s": round(time.time() - started, 1)}


def markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    gpu = f"{len(env['gpus'])} x {env['gpus'][0]}" if env["gpus"] else "CPU"
    lines = [f"GPU: {gpu} (driver {env['driver']}), peak {env['peak_tflops']} TFLOP/s bf16 dense per device; "
             f"torch {env['torch']}, transformers {env['transformers']}, deepspeed {env['deepspeed']}, "
             f"accelerate {env['accelerate']}, python {env['python']}; {env['host_cpus']} host CPUs.",
             f"Command: `{env['command']}` ({env['elapsed_s']:.0f} s).", "",
             "| suite | run | GPUs | ZeRO | tokens/s | tokens/s/GPU | TFLOP/s/GPU | MFU | peak mem GiB | planned peak GiB | "
             "first step s | step ms: median (min-max) | config |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    def num(v, fmt="{:,.0f}"):
        return "—" if v is None else fmt.format(v)

    for r in doc["results"]:
        name = r["name"] if r["ok"] else f"{r['name']} ({'failed, measured again' if r['superseded'] else 'FAILED'}: {r['note'][:120]})"
        lines.append(f"| {r['suite']} | {name} | {r['gpus']} | {num(r['zero_stage'], '{}')} | {num(r['tokens_per_s'])} | "
                     f"{num(r['tokens_per_s_per_gpu'])} | {num(r['tflops_per_gpu'], '{:.1f}')} | {num(r['mfu'], '{:.1%}')} | "
                     f"{num(r['peak_mem_gib'], '{:.1f}')} | {num(r.get('planned_peak_gib'), '{:.1f}')} | "
                     f"{num(r['first_step_s'], '{:.0f}')} | "
                     f"{step_spread(r.get('step_ms'))} | {r['config']} |")
    lines += ["", "| suite | check | value | target | |", "| --- | --- | ---: | ---: | --- |"]
    for c in doc["checks"]:
        if c["target"] is None:
            target = "—"
        elif c.get("within"):
            target = "within ±" + c["fmt"].format(c["target"]).lstrip("+")
        else:
            target = ("<= " if c["below"] else ">= ") + c["fmt"].format(c["target"])
        verdict = {True: "PASS", False: "FAIL", None: ""}[c["pass"]]
        lines.append(f"| {c['suite']} | {c['what']} | {num(c['value'], c['fmt'])} | {target} | {verdict} |")
    for suite, rows in doc["loss_curves"].items():
        a_name, b_name = doc.get("loss_curve_names", {}).get(suite, ("plain", "fast"))
        lines += ["", f"Loss curve, {suite}: {a_name} vs {b_name} (same seed, same data)", "",
                  f"| step | {a_name} | {b_name} | rel. diff |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {s} | {a:.5f} | {b:.5f} | {d:.1e} |" for s, a, b, d in rows]
    if doc["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in doc["notes"]]
    lines += ["", "Commands (one per run):", ""]
    lines += [f"- {r['suite']} / {r['name']}: `{r['command']}`" for r in doc["results"]]
    return "\n".join(lines) + "\n"


def median_ratio(slow: Result, fast: Result) -> float | None:
    """slow's median step time over fast's: a speed ratio for runs with the same tokens per step."""
    if not (slow.ok and fast.ok and slow.step_ms and fast.step_ms):
        return None
    return statistics.median(slow.step_ms) / statistics.median(fast.step_ms)


def step_spread(step_ms: list[float] | None) -> str:
    """Median and range of the timed steps: how much one run's mean can be trusted against another's."""
    if not step_ms:
        return "—"
    return f"{statistics.median(step_ms):.0f} ({min(step_ms):.0f}-{max(step_ms):.0f})"


def bench_command(args) -> str:
    """The call as a user would type it again: the flags given, defaults left out."""
    words = ["dsfleet", "bench"]
    for key, value in vars(args).items():
        if key.startswith("_") or value in (None, False, "", []) or (key == "compile" and value == "auto"):
            continue
        if isinstance(value, list):  # a repeatable flag
            words += [w for item in value for w in (f"--{key}", str(item))]
        else:
            words += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return shlex.join(words)


def gpu_driver() -> str | None:
    rows = gpu_query("driver_version")
    return rows[0][0] if rows else None
