"""`dsfleet bench`: dsfleet's training entry point against HF Trainer + DeepSpeed on the same workload, in one call.

A throughput claim is only worth the baseline it is measured against, so both sides run here, one after the
other on the same GPUs, with the same model config (random init from a preset: nothing to download), precision,
ZeRO stage, micro-batch, sequence lengths and synthetic tokens, and both are read the same way: the steps after
`--warmup`, tokens from the padded batch shapes, FLOPs from dsfleet.metrics.FlopCounter, MFU against the card's
dense bf16 peak. Suites (issue 8's measurements):

  gpt2_xl    GPT-2 XL, ZeRO-2 bf16, micro-batch 8 x 1024. HF Trainer with the shipped ZeRO-2 JSON minus its
             optimizer offload; dsfleet's plain path (fast-path flags off); dsfleet's fast path. Ratio fast/HF,
             MFU, and the fast path's loss curve against the plain path's (same seed, stated tolerance).
  t5_3b      T5-3B, micro-batch 16 x (128 source + 128 target), bf16. HF Seq2SeqTrainer with the shipped ZeRO-3
             JSON exactly (seed 001's config: optimizer offloaded to the CPU) against dsfleet with the planner's
             choice (`--zero auto`; `--zero 2` when no planner is installed, said in the report). Ratio, and the
             time from launch to the first finished step (if the first launch, cold torch.compile cache, takes
             over 60 s, the same command is launched again: compiled kernels from the on-disk cache).
  scaling    GPT-2 XL fast path on 1, 2, 4 ... --gpus GPUs, same per-GPU batch: tokens/s per GPU, ratio to 1 GPU.
  mamba      mamba_1b, ZeRO-2 bf16: the mamba_ssm / causal_conv1d CUDA kernels at micro-batch 8 x 2048 (MFU), and
             kernels against transformers' pure-PyTorch scan (`--mamba_kernels on|off`) at 4 x 128, where the
             scan gets through steps: tokens/s ratio and the loss curves (same seed, stated tolerance).
  cpu_smoke  gpt2_tiny on one CPU rank, a few steps: the gpt2_xl suite's three runs in miniature (tests, laptops).
  all        gpt2_xl, t5_3b and scaling.

Every run is a real `deepspeed --module ...` launch whose log lands in OUT/logs/. dsfleet runs are stopped once
their last step is logged (the end-of-run checkpoint is not part of a throughput run). OUT gets results.json
and results.md, rewritten after every run so a call cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from dsfleet.cli import fail

SUITES = ("gpt2_xl", "t5_3b", "scaling", "mamba", "all", "cpu_smoke")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.0, "A10G": 125.0}  # dense bf16 per device, vendor spec sheets
TARGETS = {"gpt2_mfu": 0.40, "gpt2_vs_hf": 2.1, "t5_vs_hf": 3.0, "t5_first_step_s": 60.0, "scaling_per_gpu": 0.92,
           "mamba_mfu": 0.25}
LOSS_RTOL = {"bf16": 2e-2, "fp32": 1e-4}  # fast vs plain path, every logged step, same seed (see docs/benchmarks.md)
# the stock path: transformers' model as it is (SDPA as transformers picks it, its own loss), DeepSpeed's own
# gradient checks, Python's own garbage collector
PLAIN_FLAGS = ["--attn_implementation", "auto", "--fused_loss", "false", "--fused_activation", "false",
               "--compile", "false", "--fused_grad_checks", "false", "--gc_interval", "0"]


@dataclass
class Workload:
    """What both sides train: one preset at fixed shapes on random tokens."""
    preset: str
    micro_batch: int
    block_size: int = 1024  # causal LM
    source: int = 128  # seq2seq
    target: int = 128
    bf16: bool = True
    steps: int = 20
    warmup: int = 5
    seed: int = 42
    learning_rate: float = 5e-5

    @property
    def seq2seq(self) -> bool:
        return self.preset.startswith("t5")

    @property
    def tokens_per_row(self) -> int:
        return self.source + self.target if self.seq2seq else self.block_size

    def shape_flags(self) -> list[str]:
        if self.seq2seq:
            return ["--max_source_length", str(self.source), "--max_target_length", str(self.target)]
        return ["--block_size", str(self.block_size)]


@dataclass
class Result:
    suite: str
    name: str
    tool: str  # "dsfleet" | "hf_trainer"
    gpus: int
    ok: bool = False
    zero_stage: int | None = None
    config: str = ""
    tokens_per_s: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
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


# ---------------------------------------------------------------------------------------------------------
# The subcommand.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=SUITES, default="all")
    parser.add_argument("--out", default="runs/bench", help="results.json, results.md, logs/ (small files only)")
    parser.add_argument("--work", default=None, help="scratch for run dirs (default: a dir under /tmp, removed after)")
    parser.add_argument("--gpus", type=int, default=None, help="scaling suite: up to this many GPUs (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 20; cpu_smoke 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5; cpu_smoke 3)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU (default: by GPU name)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile of the blocks in dsfleet's fast runs (auto: on for GPU suites)")
    parser.add_argument("--dsfleet_args", default="", help="extra train flags for dsfleet's fast runs (quoted)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="gpt2_xl suite: one more fast run with these extra train flags, reported as "
                             "dsfleet_fast_NAME beside the others (repeatable; for tuning)")
    parser.add_argument("--profile", action="store_true",
                        help="profile 3 extra steps after each dsfleet fast run (OUT/profile/NAME/profile.txt)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run before it is stopped")


def run(args) -> int:
    for spec in args.variant:
        name, sep, _ = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            fail(f"--variant {spec!r} is not NAME=FLAGS — e.g. --variant nochecks='--fused_grad_checks false'")
    if args.warmup is not None and args.steps is not None and not 1 <= args.warmup < args.steps:
        fail("need 1 <= --warmup < --steps — the timed window starts after a warm step")
    bench = Bench(args)
    try:
        return bench.run_suite(args.suite)
    finally:
        for proc in bench.background.values():  # a prebuild nobody waited for (its suite failed early)
            proc.kill()
            proc.wait()
        if not args.work:
            shutil.rmtree(bench.work, ignore_errors=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.cpu = args.suite == "cpu_smoke"
        self.gpu_names = [] if self.cpu else gpu_names()
        if not self.cpu and not self.gpu_names:
            fail("no NVIDIA GPU visible (nvidia-smi lists none) — run the GPU suites on a GPU box, or --suite cpu_smoke")
        self.out = Path(args.out).resolve()
        self.work = Path(args.work or f"/tmp/dsfleet-bench-{os.getpid()}").resolve()
        for d in (self.out / "logs", self.work):
            d.mkdir(parents=True, exist_ok=True)
        self.env = child_env(self.cpu)
        self.peak = args.peak_tflops or (None if self.cpu else peak_for(self.gpu_names[0]))
        self.results: list[Result] = []
        self.checks: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.loss_tables: dict[str, list[tuple[int, float, float, float]]] = {}
        self.loss_names: dict[str, list[str]] = {}  # the two runs of each loss table (default: plain, fast)
        self.prebuilt: dict[str, Any] = {}
        self.background: dict[str, subprocess.Popen] = {}
        self.started = time.time()
        self.fast_gpt2: Result | None = None
        self.launch_time = 0.0

    # ---- suites --------------------------------------------------------------------------------------------
    def run_suite(self, suite: str) -> int:
        if not self.cpu:
            self.prebuild("FusedAdamBuilder", wait=True)  # every GPU run uses FusedAdam: compiled once, untimed
            if suite in ("t5_3b", "all"):
                self.prebuild("CPUAdamBuilder", wait=False)  # only the ZeRO-3 offload baseline needs it
        suites = ["gpt2_xl", "t5_3b", "scaling"] if suite == "all" else [suite]
        for name in suites:
            getattr(self, f"suite_{name}")()
        self.write()
        print((self.out / "results.md").read_text(), flush=True)
        return 0 if all(r.ok for r in self.results if not r.superseded) else 1

    def workload(self, base: Workload) -> Workload:
        steps = self.args.steps or base.steps
        warmup = self.args.warmup if self.args.warmup is not None else min(base.warmup, steps - 1)
        return replace(base, steps=steps, warmup=warmup)

    def compile_for(self, family: str) -> bool:
        if self.args.compile != "auto":
            return self.args.compile == "on"
        return not self.cpu

    def suite_gpt2_xl(self, suite: str = "gpt2_xl", preset: str = "gpt2_xl", micro: int = 8, block: int = 1024,
                      bf16: bool = True, steps: int = 20, warmup: int = 5) -> None:
        w = self.workload(Workload(preset, micro, block_size=block, bf16=bf16, steps=steps, warmup=warmup))
        hf = self.run_hf(suite, "hf_trainer_zero2", w, 1, self.baseline_config("zero2"),
                         "shipped ZeRO-2 JSON without optimizer offload")
        plain = self.run_dsfleet(suite, "dsfleet_plain", w, 1, ["--zero", "2", *PLAIN_FLAGS], "ZeRO-2, plain path")
        fast_flags = ["--zero", "2", *self.fast_flags("gpt2")]
        fast = self.run_dsfleet(suite, "dsfleet_fast", w, 1, fast_flags, "ZeRO-2, fast path", fast=True)
        if self.compile_for("gpt2") and fast.ok:
            # the first launch compiles into an empty torch.compile cache; one such launch once ran 15 % slow
            # for reasons not pinned down (docs/benchmarks.md). The same command again is what every later job on
            # this machine (or with a shared TORCHINDUCTOR_CACHE_DIR) runs. Both are reported; the checks use this one.
            self.check(suite, "dsfleet fast MFU, first launch (cold torch.compile cache)", fast.mfu, None,
                       fmt="{:.1%}")
            fast = self.run_dsfleet(suite, "dsfleet_fast_relaunch", w, 1, fast_flags,
                                    "ZeRO-2, fast path, the same command again (compile cache warm)")
        self.fast_gpt2 = fast
        for spec in self.args.variant:
            name, _, extra = spec.partition("=")
            variant = self.run_dsfleet(suite, f"dsfleet_fast_{name}", w, 1, [*fast_flags, *shlex.split(extra)],
                                       f"ZeRO-2, fast path + {extra}", fast=True)
            self.check_ratio(suite, f"dsfleet fast + {extra} / HF Trainer tokens/s", variant, hf, None)
        self.check_ratio(suite, "dsfleet fast / HF Trainer tokens/s", fast, hf, None if self.cpu else TARGETS["gpt2_vs_hf"])
        self.check(suite, "dsfleet fast / HF Trainer, median step time (the same ratio without slow outlier steps)",
                   median_ratio(hf, fast), None, fmt="{:.2f}x")
        self.check_ratio(suite, "dsfleet plain / HF Trainer tokens/s", plain, hf, None)
        if not self.cpu:
            self.check(suite, "dsfleet fast MFU", fast.mfu, TARGETS["gpt2_mfu"], fmt="{:.1%}")
        self.compare_losses(suite, plain, fast, "bf16" if w.bf16 else "fp32")

    def suite_cpu_smoke(self) -> None:
        self.suite_gpt2_xl("cpu_smoke", "gpt2_tiny", micro=4, block=64, bf16=False, steps=8, warmup=3)

    def suite_t5_3b(self) -> None:
        suite = "t5_3b"
        w = self.workload(Workload("t5_3b", 16, source=128, target=128))
        zero, how = planner_zero()
        flags = ["--zero", zero, *self.fast_flags("t5")]
        fast = self.run_dsfleet(suite, "dsfleet_planner", w, 1, flags, f"{how}, fast path", fast=True)
        relaunch = None
        slow_start = fast.first_step_s is None or fast.first_step_s > TARGETS["t5_first_step_s"]
        if self.compile_for("t5") and fast.ok and not fast.name.endswith("_retry") and slow_start:
            # the first launch compiled cold: the same command again takes torch.compile's kernels from the
            # on-disk inductor cache, as any relaunch (requeue, next job) on this machine or with a shared
            # TORCHINDUCTOR_CACHE_DIR does
            relaunch = self.run_dsfleet(suite, "dsfleet_planner_relaunch", w, 1, flags,
                                        f"{how}, fast path, compile cache warm", fast=True)
        self.wait_background("CPUAdamBuilder")
        hf = self.run_hf(suite, "hf_trainer_zero3_seed", w, 1, self.baseline_config("zero3"),
                         "shipped ZeRO-3 JSON (seed 001: optimizer offload to CPU), unchanged")
        self.check_ratio(suite, "dsfleet (planner) / HF Trainer seed ZeRO-3 tokens/s", fast, hf, TARGETS["t5_vs_hf"])
        self.check(suite, "dsfleet launch to first finished step (s), first launch", fast.first_step_s,
                   TARGETS["t5_first_step_s"], fmt="{:.1f}", below=True)
        if relaunch is not None:
            self.check(suite, "dsfleet launch to first finished step (s), relaunch (compile cache warm)",
                       relaunch.first_step_s, TARGETS["t5_first_step_s"], fmt="{:.1f}", below=True)

    def suite_scaling(self) -> None:
        suite = "scaling"
        available = len(self.gpu_names)
        top = min(self.args.gpus or available, available)
        if self.args.gpus and self.args.gpus > available:
            self.notes.append(f"scaling: --gpus {self.args.gpus} asked, {available} visible — measured up to {top}")
        counts = sorted({n for n in (1, 2, 4, 8, 16) if n <= top} | {top})
        w = self.workload(Workload("gpt2_xl", 8, block_size=1024))
        by_n: dict[int, Result] = {}
        for n in counts:
            reuse = self.fast_gpt2
            if n == 1 and reuse is not None and reuse.ok:
                by_n[1] = reuse  # the gpt2_xl suite's fast run is this point: same command
                continue
            by_n[n] = self.run_dsfleet(suite, f"dsfleet_fast_{n}gpu", w, n, ["--zero", "2", *self.fast_flags("gpt2")],
                                       "ZeRO-2, fast path", fast=True)
        one = by_n.get(1)
        for n in counts[1:]:
            value = (by_n[n].tokens_per_s_per_gpu / one.tokens_per_s_per_gpu
                     if one and one.ok and by_n[n].ok else None)
            what = f"tokens/s per GPU at {n} GPUs / at 1 GPU" + ("" if n >= 4 else " (issue 8 sets the target at 4)")
            self.check(suite, what, value, TARGETS["scaling_per_gpu"], fmt="{:.1%}")

    def suite_mamba(self) -> None:
        suite = "mamba"
        flags = ["--zero", "2", "--compile", "false", *shlex.split(self.args.dsfleet_args)]
        long = self.workload(Workload("mamba_1b", 8, block_size=2048))
        kernels = self.run_dsfleet(suite, "dsfleet_kernels", long, 1, [*flags, "--mamba_kernels", "on"],
                                   "ZeRO-2, mamba_ssm + causal_conv1d kernels", fast=True)
        self.check(suite, "kernels MFU (6N + scan FLOPs), micro-batch 8 x 2048", kernels.mfu, TARGETS["mamba_mfu"],
                   fmt="{:.1%}")
        # the pure-PyTorch scan's backward grows with the square of the length (17.8 tokens/s at 1 x 2048): the
        # comparison runs both paths at a length it gets through, pure-PyTorch last (the slowest, most at risk)
        short = self.workload(Workload("mamba_1b", 4, block_size=128, steps=16, warmup=3))
        fast = self.run_dsfleet(suite, "dsfleet_kernels_short", short, 1, [*flags, "--mamba_kernels", "on"],
                                "ZeRO-2, kernels", fast=True)
        scan = self.run_dsfleet(suite, "dsfleet_pytorch_scan_short", short, 1, [*flags, "--mamba_kernels", "off"],
                                "ZeRO-2, transformers' pure-PyTorch scan")
        self.check_ratio(suite, "kernels / pure-PyTorch scan tokens/s, micro-batch 4 x 128", fast, scan, None)
        self.compare_losses(suite, scan, fast, "bf16", names=("pure-PyTorch scan", "kernels"))

    def fast_flags(self, family: str) -> list[str]:
        flags = ["--compile", "true" if self.compile_for(family) else "false"]
        return flags + shlex.split(self.args.dsfleet_args)

    # ---- baselines' DeepSpeed JSON -------------------------------------------------------------------------
    def baseline_config(self, which: str) -> Path:
        from dsfleet.dsconfig import shipped_config_path
        config = json.loads(shipped_config_path(which).read_text())
        if which == "zero2":
            # same ZeRO stage as dsfleet's run; the shipped file offloads the optimizer for small cards, which
            # would make this a CPU-Adam benchmark
            config["zero_optimization"].pop("offload_optimizer", None)
        if self.cpu:
            config["optimizer"].setdefault("params", {})["torch_adam"] = True  # no CUDA FusedAdam on CPU ranks
            config["zero_optimization"]["overlap_comm"] = False
        path = self.out / "ds_configs" / f"hf_{which}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    # ---- launching ---------------------------------------------------------------------------------------
    def launcher(self, gpus: int) -> list[str]:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus),
                "--master_port", str(free_port())]

    def run_dsfleet(self, suite: str, name: str, w: Workload, gpus: int, flags: list[str], config: str,
                    fast: bool = False) -> Result:
        run_dir = self.work / suite / name
        shutil.rmtree(run_dir, ignore_errors=True)
        steps = w.steps + (4 if fast and self.args.profile else 0)
        env = dict(self.env)
        if fast and self.args.profile:
            env["DSFLEET_PROFILE"] = str(run_dir / "profile")
        cmd = [*self.launcher(gpus), "--module", "dsfleet.train", "--preset", w.preset, "--from_scratch",
               "--synthetic_data", "--per_device_train_batch_size", str(w.micro_batch), *w.shape_flags(),
               "--max_steps", str(steps), "--logging_steps", "1", "--seed", str(w.seed),
               "--learning_rate", str(w.learning_rate), "--report_to", "jsonl", "--no_progress",
               "--export_hf", "false", "--overwrite_output_dir", "--output_dir", str(run_dir),
               *(["--bf16"] if w.bf16 else []), *(["--peak_tflops", str(self.peak)] if self.peak else []), *flags]
        metrics = run_dir / "metrics.jsonl"

        def last_step() -> int:
            rows = read_rows(metrics)
            return max((r["step"] for r in rows if "loss" in r), default=0)

        result = Result(suite, name, "dsfleet", gpus, config=config, command=shlex.join(cmd))
        launched = self.launch(result, cmd, env, done=lambda: last_step() >= steps,
                               first=lambda: metrics.stat().st_mtime if metrics.exists() else None, kill_when_done=True)
        log_text = Path(result.log).read_text(errors="replace") if result.log else ""
        m = re.search(r"rank\(s\) via \S+, ZeRO-(\d)", log_text)
        result.zero_stage = int(m.group(1)) if m else None
        m = re.search(r"fast path: (.*)", log_text)
        if m:
            result.config += f" [{m.group(1).strip()}]"
        if launched:
            self.read_dsfleet(result, read_rows(metrics), w, gpus)
        if fast and self.args.profile:
            self.keep_profile(run_dir / "profile", name)
        retry = None if result.ok or self.cpu else fallback(flags)
        if retry is not None:
            flags, how = retry
            self.notes.append(f"{name}: failed ({result.note[:160]}; log {Path(result.log).name}) — measured again {how}")
            result.superseded = True
            self.record(result)
            return self.run_dsfleet(suite, f"{name}_retry", w, gpus, flags, f"{config}, {how}", fast)
        self.record(result)
        return result

    def read_dsfleet(self, result: Result, rows: list[dict], w: Workload, gpus: int) -> None:
        """Tokens/s over the timed window from the per-step rows: each row's wall time is its tokens divided by
        its tokens/s (rows are single steps: --logging_steps 1)."""
        train = [r for r in rows if "loss" in r]
        result.losses = {int(r["step"]): float(r["loss"]) for r in train}
        timed = [r for r in train if w.warmup < r["step"] <= w.steps]
        if len(timed) < w.steps - w.warmup:
            result.note = f"only {len(timed)} timed steps logged"
            return
        step_tokens = w.micro_batch * gpus * w.tokens_per_row
        seconds = [step_tokens / r["tokens_per_s"] for r in timed]
        result.step_ms = [round(1000 * t, 2) for t in seconds]
        total = sum(seconds)
        result.tokens_per_s = step_tokens * len(timed) / total
        result.tflops_per_gpu = sum(r["tflops"] * s for r, s in zip(timed, seconds)) / total / gpus
        result.mfu = result.tflops_per_gpu / self.peak if self.peak else None
        result.peak_mem_gib = max(r.get("peak_mem_bytes", 0) for r in timed) / 2**30
        result.ok = True

    def run_hf(self, suite: str, name: str, w: Workload, gpus: int, ds_json: Path, config: str) -> Result:
        run_dir = self.work / suite / name
        shutil.rmtree(run_dir, ignore_errors=True)
        result_path = run_dir / "result.json"
        run_dir.mkdir(parents=True)
        cmd = [*self.launcher(gpus), "--module", "dsfleet.hf_baseline", "--preset", w.preset, "--deepspeed",
               str(ds_json), "--result", str(result_path), "--output_dir", str(run_dir / "trainer"),
               "--micro_batch", str(w.micro_batch), *w.shape_flags(), "--steps", str(w.steps),
               "--warmup", str(w.warmup), "--seed", str(w.seed), "--learning_rate", str(w.learning_rate),
               *(["--bf16"] if w.bf16 else []), *(["--peak_tflops", str(self.peak)] if self.peak else [])]
        result = Result(suite, name, "hf_trainer", gpus, config=config, command=shlex.join(cmd))
        self.launch(result, cmd, self.env, done=result_path.exists, first=lambda: None, kill_when_done=False)
        if result_path.exists():
            data = json.loads(result_path.read_text())
            result.zero_stage = data["zero_stage"]
            result.tokens_per_s = data["tokens_per_s"]
            result.tflops_per_gpu = data["tflops_per_gpu"]
            result.mfu = data["mfu"]
            result.peak_mem_gib = data["peak_mem_bytes"] / 2**30 if data.get("peak_mem_bytes") else None
            result.first_step_s = data["first_step_end_unix"] - self.launch_time if data.get("first_step_end_unix") else None
            result.losses = {int(k): v for k, v in data["losses"].items()}
            result.step_ms = data.get("step_ms", [])
            result.config += f" [attention {data.get('attn_implementation')}]"
            result.ok = True
        self.record(result)
        return result

    def launch(self, result: Result, cmd: list[str], env: dict, done, first, kill_when_done: bool) -> bool:
        """Run one launcher process group; stop it when `done()` (dsfleet: at once, skipping the final
        checkpoint; HF: after a grace period), on exit, or at the timeout. True if it got to done."""
        log = self.out / "logs" / f"{result.suite}__{result.name}.log"
        result.log = str(log)
        print(f"bench: {result.suite} / {result.name}: {result.command}", flush=True)
        self.launch_time = start = time.time()
        reached = None
        first_at = None
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                while True:
                    rc = proc.poll()
                    now = time.time()
                    if first_at is None:
                        first_at = first()
                    if reached is None and done():
                        reached = now
                    if rc is not None:
                        break
                    if reached is not None and (kill_when_done or now - reached > 20):
                        stop(proc)
                        break
                    if now - start > self.args.timeout:
                        stop(proc)
                        result.note = f"stopped after the {self.args.timeout} s timeout"
                        break
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    stop(proc)
        if reached is None and done():
            reached = time.time()
        result.wall_s = time.time() - start
        if first_at is not None:
            result.first_step_s = first_at - start
        if reached is None:
            result.note = result.note or f"exit {proc.returncode}: {last_error(log)}"
        status = "done" if reached is not None else f"FAILED ({result.note})"
        print(f"bench: {result.suite} / {result.name}: {status} in {result.wall_s:.0f} s", flush=True)
        return reached is not None

    def record(self, result: Result) -> None:
        self.results.append(result)
        self.write()

    # ---- prebuilt DeepSpeed ops --------------------------------------------------------------------------
    def prebuild(self, builder: str, wait: bool) -> None:
        """JIT-build a DeepSpeed op once, before anything is timed (TORCH_EXTENSIONS_DIR keeps it for the runs)."""
        code = f"from deepspeed.ops.op_builder import {builder}; {builder}().load()"
        with open(self.out / "logs" / f"prebuild_{builder}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", code], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.prebuilt[builder] = {"started": time.time()}
        self.background[builder] = proc
        print(f"bench: building DeepSpeed op {builder} ({'waiting' if wait else 'in the background'})", flush=True)
        if wait:
            self.wait_background(builder)

    def wait_background(self, builder: str) -> None:
        proc = self.background.pop(builder, None)
        if proc is None:
            return
        rc = proc.wait()
        info = self.prebuilt[builder]
        info.update(rc=rc, seconds=round(time.time() - info["started"], 1))
        del info["started"]
        print(f"bench: {builder}: rc {rc}, {info['seconds']} s", flush=True)
        if rc != 0:
            self.notes.append(f"{builder} did not build (rc {rc}, logs/prebuild_{builder}.log): runs will JIT it")

    # ---- checks --------------------------------------------------------------------------------------------
    def check(self, suite: str, what: str, value: float | None, target: float | None, fmt: str = "{:.2f}",
              below: bool = False) -> None:
        passed = None if target is None or value is None else (value <= target if below else value >= target)
        self.checks.append({"suite": suite, "what": what, "value": value, "target": target, "below": below,
                            "fmt": fmt, "pass": passed})

    def check_ratio(self, suite: str, what: str, a: Result, b: Result, target: float | None) -> None:
        value = a.tokens_per_s / b.tokens_per_s if a.ok and b.ok and b.tokens_per_s else None
        self.check(suite, what, value, target, fmt="{:.2f}x")

    def compare_losses(self, suite: str, plain: Result, fast: Result, precision: str,
                       names: tuple[str, str] = ("plain", "fast")) -> None:
        rtol = LOSS_RTOL[precision]
        steps = sorted(set(plain.losses) & set(fast.losses))
        rows = [(s, plain.losses[s], fast.losses[s], abs(fast.losses[s] - plain.losses[s]) / abs(plain.losses[s]))
                for s in steps]
        self.loss_tables[suite] = rows
        self.loss_names[suite] = list(names)
        worst = max((r[3] for r in rows), default=None)
        self.checks.append({"suite": suite, "what": f"loss curve {names[1]} vs {names[0]}, max relative difference over "
                            f"{len(rows)} steps ({precision}, same seed)", "value": worst, "target": rtol,
                            "below": True, "fmt": "{:.1e}", "pass": None if worst is None else worst <= rtol})

    def keep_profile(self, src: Path, name: str) -> None:
        dest = self.out / "profile" / name
        if (src / "profile.txt").exists():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "profile.txt", dest / "profile.txt")
            if (src / "gaps.txt").exists():
                shutil.copy(src / "gaps.txt", dest / "gaps.txt")
            if (src / "trace.json").exists():
                import gzip
                with open(src / "trace.json", "rb") as f_in, gzip.open(dest / "trace.json.gz", "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)

    # ---- report ------------------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        versions = {}
        for pkg in ("torch", "transformers", "deepspeed", "accelerate"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        return {"gpus": self.gpu_names, "driver": gpu_driver() if not self.cpu else None, "peak_tflops": self.peak,
                "python": platform.python_version(), "host_cpus": os.cpu_count(), **versions,
                "command": bench_command(self.args),
                "prebuilt_ops": self.prebuilt, "elapsed_s": round(time.time() - self.started, 1)}

    def write(self) -> None:
        doc = {"environment": self.environment(), "results": [dict(asdict(r), tokens_per_s_per_gpu=r.tokens_per_s_per_gpu)
                                                              for r in self.results],
               "checks": self.checks, "loss_curves": self.loss_tables, "loss_curve_names": self.loss_names,
               "notes": self.notes}
        (self.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (self.out / "results.md").write_text(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    gpu = f"{len(env['gpus'])} x {env['gpus'][0]}" if env["gpus"] else "CPU"
    lines = [f"GPU: {gpu} (driver {env['driver']}), peak {env['peak_tflops']} TFLOP/s bf16 dense per device; "
             f"torch {env['torch']}, transformers {env['transformers']}, deepspeed {env['deepspeed']}, "
             f"accelerate {env['accelerate']}, python {env['python']}; {env['host_cpus']} host CPUs.",
             f"Command: `{env['command']}` ({env['elapsed_s']:.0f} s).", "",
             "| suite | run | GPUs | ZeRO | tokens/s | tokens/s/GPU | TFLOP/s/GPU | MFU | peak mem GiB | first step s | "
             "step ms: median (min-max) | config |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    def num(v, fmt="{:,.0f}"):
        return "—" if v is None else fmt.format(v)

    for r in doc["results"]:
        name = r["name"] if r["ok"] else f"{r['name']} ({'failed, measured again' if r['superseded'] else 'FAILED'}: {r['note'][:120]})"
        lines.append(f"| {r['suite']} | {name} | {r['gpus']} | {num(r['zero_stage'], '{}')} | {num(r['tokens_per_s'])} | "
                     f"{num(r['tokens_per_s_per_gpu'])} | {num(r['tflops_per_gpu'], '{:.1f}')} | {num(r['mfu'], '{:.1%}')} | "
                     f"{num(r['peak_mem_gib'], '{:.1f}')} | {num(r['first_step_s'], '{:.0f}')} | "
                     f"{step_spread(r.get('step_ms'))} | {r['config']} |")
    lines += ["", "| suite | check | value | target | |", "| --- | --- | ---: | ---: | --- |"]
    for c in doc["checks"]:
        target = "—" if c["target"] is None else ("<= " if c["below"] else ">= ") + c["fmt"].format(c["target"])
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


# ---------------------------------------------------------------------------------------------------------
# Small helpers.

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
    words = ["dsfleet", "bench"]
    for key, value in vars(args).items():
        if key.startswith("_") or value in (None, False, "", []) or (key == "compile" and value == "auto"):
            continue
        if isinstance(value, list):  # a repeatable flag
            words += [w for item in value for w in (f"--{key}", str(item))]
        else:
            words += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return shlex.join(words)


def fallback(flags: list[str]) -> tuple[list[str], str] | None:
    """A failed fast run is measured again without its riskiest choice: torch.compile first, then the planner."""
    flags = list(flags)
    if "--compile" in flags and flags[flags.index("--compile") + 1] == "true":
        flags[flags.index("--compile") + 1] = "false"
        return flags, "without torch.compile"
    if "--zero" in flags and flags[flags.index("--zero") + 1] == "auto":
        flags[flags.index("--zero") + 1] = "2"
        return flags, "with --zero 2 instead of the planner's choice"
    return None


def planner_zero() -> tuple[str, str]:
    """`--zero auto` when dsfleet's planner can choose; otherwise ZeRO-2, and the report says why."""
    try:
        from dsfleet import planner
    except Exception as e:  # absent, or mid-edit
        return "2", f"ZeRO-2 (planner unavailable: {type(e).__name__})"
    if not hasattr(planner, "choose_for_spec"):
        return "2", "ZeRO-2 (planner has no choose_for_spec)"
    return "auto", "planner's choice (--zero auto)"


def child_env(cpu: bool) -> dict[str, str]:
    import dsfleet
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    src = str(Path(dsfleet.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    return env


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    names = [line.strip() for line in out.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() and all(v.strip().isdigit() for v in visible.split(",")):
        names = [names[int(v)] for v in visible.split(",") if int(v) < len(names)]
    return names


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def peak_for(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key in name.upper():
            return PEAK_BF16_TFLOPS[key]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_error(log: Path) -> str:
    """The line that says what went wrong: the last exception or error line of a launch's log, else its end."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception|error:|Killed|CUDA out of memory)", line)
              and "Warning" not in line]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:240]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written right now
            pass
    return rows


def stop(proc: subprocess.Popen) -> None:
    """End the launcher and the ranks it started: the process group this bench created for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    time.sleep(1)  # let the driver release the ranks' device memory before the next launch
