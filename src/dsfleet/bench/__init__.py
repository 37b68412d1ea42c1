"""`dsfleet bench`: dsfleet's training entry point against HF Trainer + DeepSpeed on the same workload, in one call.

A throughput claim is only worth the baseline it is measured against, so both sides run here, one after the
other on the same GPUs, on the same workload, read the same way. Every run is a real `deepspeed --module ...`
launch whose log lands in OUT/logs/; OUT gets results.json and results.md, rewritten after every run so a call
cut short still leaves what it measured. One concern a module:

  runner   start a launch with its env and log, poll it against a deadline, kill its process group, read its
           metrics.jsonl; the free port; nvidia-smi (scripts/gpu_memory_check.py runs through it too)
  suites   what each suite (gpt2_xl, t5_3b, scaling, mamba, llama, bart_large, any_model, cpu_smoke, cpu_llama,
           all) runs and checks against which target
  peers    the strongest peers the gpt2_xl and t5_3b suites add (issue 21): a compiled plain-PyTorch loop (its own
           entry point, `python -m dsfleet.bench.peers`), HF Trainer with torch.compile, HF + ZeRO-2 for T5, and
           dsfleet at the planner's micro-batch (`dsfleet_best`)
  report   the runs, ratios and checks as results.json and results.md
  cli      the subcommand's flags and `run(args)` (dsfleet.cli's COMMANDS entry "bench" imports this package)

The names below are re-exported for callers and tests; a test that monkeypatches a function patches it where
it is looked up (`dsfleet.bench.suites.gpu_names`, not `dsfleet.bench.gpu_names`).
"""
from dsfleet.bench.cli import add_arguments, run
from dsfleet.bench.report import Report, Result, markdown, median_ratio, step_spread
from dsfleet.bench.suites import (LOSS_RTOL, PEAK_BF16_TFLOPS, PLAIN_FLAGS, SUITES, TARGETS, Bench, Workload,
                                  fallback, gpu_names, peak_for, planner_zero)

__all__ = ["add_arguments", "run", "Bench", "Report", "Result", "Workload", "SUITES", "TARGETS", "LOSS_RTOL",
           "PLAIN_FLAGS", "PEAK_BF16_TFLOPS", "markdown", "median_ratio", "step_spread", "fallback", "gpu_names",
           "peak_for", "planner_zero"]
