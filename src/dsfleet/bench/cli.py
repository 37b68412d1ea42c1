"""`dsfleet bench`'s command line: its flags, their checks (bad input: one line, exit 2, nothing run), and the
call that runs the suites and cleans up after them. dsfleet.cli's COMMANDS reaches it through dsfleet.bench.
"""
from __future__ import annotations

import argparse
import re
import shutil

from dsfleet.bench.suites import ROWS, SUITES, Bench, is_row_name
from dsfleet.cli import fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=SUITES, default="all")
    parser.add_argument("--out", default="runs/bench", help="results.json, results.md, logs/ (small files only)")
    parser.add_argument("--work", default=None, help="scratch for run dirs (default: a dir under /tmp, removed after)")
    parser.add_argument("--gpus", type=int, default=None, help="scaling suite: up to this many GPUs (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 20; cpu_smoke 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5; cpu_smoke 3)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU (default: by GPU name)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile of the blocks in dsfleet's fast runs, and the peers' own compile "
                             "(plain_compiled, hf_compiled) (auto: on for GPU suites)")
    parser.add_argument("--dsfleet_args", default="", help="extra train flags for dsfleet's fast runs (quoted)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="gpt2_xl suite: one more fast run with these extra train flags, reported as "
                             "dsfleet_fast_NAME beside the others (repeatable; for tuning)")
    parser.add_argument("--profile", action="store_true",
                        help="profile 3 extra steps after each dsfleet fast run (OUT/profile/NAME/profile.txt)")
    parser.add_argument("--rows", default=None, metavar="NAME[,NAME]",
                        help="run only these rows of the suite (e.g. dsfleet_no_compile); the others' checks "
                             "say not run")
    parser.add_argument("--memory-snapshot", action="store_true",
                        help="record rank 0's CUDA allocations over the first 2 steps of each dsfleet run and say "
                             "which code holds the peak's bytes (OUT/memory/NAME.txt), beside the planner's parts")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run before it is stopped")


def run(args) -> int:
    for spec in args.variant:
        name, sep, _ = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            fail(f"--variant {spec!r} is not NAME=FLAGS — e.g. --variant nochecks='--fused_grad_checks false'")
    for name in args.rows.split(",") if args.rows else []:
        if not is_row_name(name, args.variant):
            fail(f"--rows: no suite has a row {name!r} — rows: {', '.join(ROWS)}, dsfleet_fast_<N>gpu (scaling), "
                 "dsfleet_fast_<NAME> (--variant)")
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
