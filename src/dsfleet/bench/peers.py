"""The strongest peers of `dsfleet bench` (issue 21): what a user who skips dsfleet would run instead, each with
its own best settings, on dsfleet's workload. A ratio against HF Trainer + DeepSpeed alone flatters dsfleet when
the same user could get most of the way with torch.compile and a fused optimizer and no DeepSpeed at all.

  plain_compiled  this module's `python -m dsfleet.bench.peers`: a plain PyTorch loop, nanoGPT's recipe on HF's
                  model class — `torch.compile(model)`, `torch.optim.AdamW(fused=True)`, bf16 autocast over fp32
                  weights — with dsfleet's lr schedule (transformers' linear decay, no warmup), clipping at 1.0,
                  Adam betas/eps/weight decay, seed and batches (dsfleet.data's synthetic tokens in dsfleet's batch
                  order). On CPU: no compile, plain AdamW, fp32 (as the CPU suites run dsfleet). One process.
  hf_compiled     dsfleet.hf_baseline without DeepSpeed: HF Trainer, `torch_compile=True`,
                  `optim="adamw_torch_fused"`, bf16 (CPU: no compile, `adamw_torch`, fp32). One process.
  hf_trainer_zero2 (T5) HF Trainer + DeepSpeed with the shipped ZeRO-2 JSON minus its optimizer offload: the best
                  HF config that fits T5-3B on one GPU, beside the seeds' ZeRO-3 offload baseline.
  dsfleet_best    dsfleet's fast path at the micro-batch, ZeRO stage, offload and checkpointing the planner picks
                  for the GPU (`dsfleet plan`'s choice), beside the fixed-shape rows the ratios use.

The plain loop writes its per-step rows through dsfleet.metrics.MetricsLog into OUTPUT_DIR/metrics.jsonl, so the
bench reads it exactly as it reads a dsfleet run (Bench.read_dsfleet). The suites call `gpt2_peers` and
`t5_peers` after their own rows: every peer's tokens/s ratio, and its loss curve against dsfleet's run of the
same shapes and seed (the stated LOSS_RTOL of the precision).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from dsfleet.hf_baseline import add_workload_arguments, synthetic_train_set

# ---- the plain PyTorch loop ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsfleet.bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, help="dsfleet preset: the transformers config (random init)")
    p.add_argument("--output_dir", required=True, help="metrics.jsonl goes here (one row per step, as dsfleet's)")
    add_workload_arguments(p)  # --bf16: autocast over fp32 weights here
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--compile", choices=("true", "false"), default="true",
                   help="torch.compile(model) (backend: $DSFLEET_COMPILE_BACKEND, default inductor; the bench passes "
                        "false on CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        print("dsfleet.bench.peers: --steps must be >= 1 — pass a positive step count", file=sys.stderr)
        return 2
    from dsfleet import runtime
    gpu = runtime.has_gpu()
    import torch

    from dsfleet import data, fastpath, models, schedule
    from dsfleet.metrics import FlopCounter, MetricsLog, batch_tokens
    from dsfleet.presets import get_preset

    preset = get_preset(args.preset)
    seq2seq = preset.family == "t5"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # dsfleet.train's data, in its order: the same synthetic tokens, the same shuffled batches of rank 0 of 1
    train = synthetic_train_set(args, int(preset.config["vocab_size"]), seq2seq)
    order = data.ResumableOrder(len(train), args.micro_batch, 0, 1, args.seed)
    spec = SimpleNamespace(attn_implementation="auto", lr_scheduler_type="linear", warmup_steps=0)  # dsfleet's defaults
    collate = data.Collator(pad_id=0, seq2seq=seq2seq)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # nanoGPT's; bf16 autocast does the large GEMMs anyway
        torch.backends.cudnn.allow_tf32 = True

    runtime.seed_everything(args.seed)  # as dsfleet.train, right before the model: the same init
    attn = fastpath.attn_implementation(spec, preset.family)
    with device:
        model = models.load_model(preset, None, True, {}, False, attn_implementation=attn)
    model.config.use_cache = False  # a training loop keeps no KV cache (nanoGPT's model has none); same math
    # transformers' loss lookup, resolved once here: inside forward it logs a warning — a graph break under compile
    model.loss_function = model.loss_function
    model.train()
    flops = FlopCounter(model, preset.family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=gpu)
    scheduler = schedule.client_scheduler(spec, args.steps, {})(optimizer)  # dsfleet's: linear decay, no warmup
    compiled = args.compile == "true"
    step_model = torch.compile(model, backend=os.environ.get("DSFLEET_COMPILE_BACKEND", "inductor")) if compiled else model
    amp = args.bf16 and gpu
    print(f"peers: plain loop, {preset.name} ({flops.n_params / 1e6:,.2f}M params), "
          f"{'torch.compile(model)' if compiled else 'eager'}, {'fused ' if gpu else ''}AdamW, "
          f"{'bf16 autocast' if amp else 'fp32'}, micro batch {args.micro_batch}, {args.steps} steps", flush=True)
    log = MetricsLog(out, True, args.steps, 0, args.peak_tflops, 1, show_progress=False, report_to=["jsonl"],
                     tags={"tool": "plain_loop"})
    batches = iter(order)
    for step in range(1, args.steps + 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate([train[i] for i in next(batches)]).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = step_model(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.count(batch_tokens(batch, seq2seq), flops(batch))
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()  # one sync a step
        log.log_train(step, loss=loss_value, lr=lr, grad_norm=norm_value, epoch=order.epoch)
    print("peers: done", flush=True)
    return 0


# ---- the rows the suites add -----------------------------------------------------------------------------

def run_plain_loop(bench, suite: str, name: str, w, config: str):
    """One launch of the plain loop (one process, no launcher), read back as a dsfleet run."""
    from dsfleet.bench.report import Result
    from dsfleet.bench.runner import last_step, read_rows
    import shutil
    if (skipped := bench.not_asked(suite, name, "plain_pytorch", 1)) is not None:
        return skipped
    run_dir = bench.work / suite / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dsfleet.bench.peers", "--preset", w.preset, "--output_dir", str(run_dir),
           "--micro_batch", str(w.micro_batch), *w.shape_flags(), "--steps", str(w.steps), "--seed", str(w.seed),
           "--learning_rate", str(w.learning_rate), "--compile", "true" if bench.compile_for("peers") else "false",
           *(["--bf16"] if w.bf16 else []), *(["--peak_tflops", str(bench.peak)] if bench.peak else [])]
    metrics = run_dir / "metrics.jsonl"
    result = Result(suite, name, "plain_pytorch", 1, config=config, command=shlex.join(cmd))
    from dsfleet.bench.suites import one_gpu_env
    launched = bench.launch(result, cmd, one_gpu_env(bench.env), done=lambda: last_step(metrics) >= w.steps,
                            first=lambda: metrics.stat().st_mtime if metrics.exists() else None, kill_when_done=True)
    log_text = Path(result.log).read_text(errors="replace") if result.log else ""
    for line in log_text.splitlines():
        if line.startswith("peers: plain loop, "):
            result.config += f" [{line.split(', ', 2)[-1]}]"  # compile, optimizer, precision as run
            break
    if launched:
        bench.read_dsfleet(result, read_rows(metrics), w, 1)
    bench.report.record(result)
    return result


def run_hf_compiled(bench, suite: str, w):
    """HF Trainer without DeepSpeed, its own best settings: torch.compile and the fused AdamW (GPU)."""
    gpu = not bench.cpu
    compiled = bench.compile_for("peers")
    optim = "adamw_torch_fused" if gpu else "adamw_torch"
    extra = ["--optim", optim, *(["--torch_compile"] if compiled else [])]
    how = f"HF Trainer, no DeepSpeed, {'torch_compile=True' if compiled else 'eager'}, optim={optim}"
    return bench.run_hf(suite, "hf_compiled", w, 1, None, how, extra=extra)


def best_choice(bench, w):
    """The planner's pick for this GPU (stage, offload, checkpointing, micro-batch) at the workload's lengths and
    precision, for dsfleet's fast path: (flags, micro-batch, how), or None when it cannot plan."""
    from dsfleet import planner
    import psutil
    gpu_mem = gpu_memory_bytes() if not bench.cpu else None
    if gpu_mem is None:
        from dsfleet.resolve import CPU_PLANNING_GPU_MEM
        gpu_mem = CPU_PLANNING_GPU_MEM  # what `--zero auto` plans for on CPU ranks
    seq, tgt = (w.source, w.target) if w.seq2seq else (w.block_size, None)
    pl = planner.plan(preset=w.preset, gpus=1, gpu_mem_bytes=gpu_mem, cpu_mem_bytes=psutil.virtual_memory().total,
                      seq_len=seq, tgt_len=tgt, precision="bf16" if w.bf16 else "fp32")
    best = pl.best
    if best is None:
        return None
    flags = ["--zero", str(best.zero_stage), "--offload_optimizer", best.offload_optimizer,
             "--offload_param", best.offload_param, *(["--gradient_checkpointing"] if best.gradient_checkpointing else [])]
    return flags, best.micro_batch, f"planner's pick for {gpu_mem / 2**30:.0f} GiB: {best.label()}"


def gpu_memory_bytes() -> int | None:
    """GPU 0's memory as nvidia-smi reports it (MiB), without a CUDA context of the bench's own."""
    from dsfleet.bench.runner import gpu_query
    rows = gpu_query("memory.total")
    try:
        return int(float(rows[0][0])) * 2**20 if rows else None
    except (ValueError, IndexError):
        return None


def run_best(bench, suite: str, w, family: str):
    """dsfleet's fast path at the planner's micro-batch and config: the `dsfleet_best` row."""
    choice = best_choice(bench, w)
    if choice is None:
        bench.report.notes.append(f"{suite}: no dsfleet_best row — the planner finds nothing that fits {w.preset}")
        return None, w
    flags, micro, how = choice
    best_w = replace(w, micro_batch=micro)
    result = bench.run_dsfleet(suite, "dsfleet_best", best_w, 1, [*flags, *bench.fast_flags(family)],
                               f"{how}, fast path", fast=True)
    return result, best_w


def compare_peer_losses(bench, suite: str, reference, peer, w) -> None:
    """A peer's loss curve against dsfleet's run of the same shapes, seed and batches (stated tolerance)."""
    from dsfleet.bench.suites import LOSS_RTOL
    precision = "bf16" if w.bf16 else "fp32"
    bench.report.compare_losses(suite, reference, peer, precision, LOSS_RTOL[precision],
                                names=(reference.name, peer.name), key=f"{suite} / {peer.name}")


def targets() -> dict:
    from dsfleet.bench.suites import TARGETS  # (suites imports this module lazily: no cycle at import time)
    return TARGETS


def gpt2_peers(bench, suite: str, w, plain, fast) -> None:
    """The gpt2_xl suite's peers: the compiled plain loop at the suite's micro-batch, dsfleet at the planner's, then
    HF Trainer with torch.compile (the rows with a target first: a call cut short keeps them). Ratios dsfleet fast /
    each peer; the peers' loss curves against dsfleet's plain path."""
    gpu = not bench.cpu
    loop = run_plain_loop(bench, suite, "plain_compiled", w, "plain PyTorch loop (nanoGPT's recipe on HF's model)")
    bench.report.check_ratio(suite, "dsfleet fast / plain PyTorch loop (compiled) tokens/s, same micro-batch", fast,
                             loop, targets()["gpt2_vs_plain_compiled"] if gpu else None)
    compare_peer_losses(bench, suite, plain, loop, w)
    best, best_w = run_best(bench, suite, w, "gpt2")
    if best is not None:
        bench.report.check(suite, f"dsfleet best (planner: micro-batch {best_w.micro_batch}) tokens/s",
                           best.tokens_per_s if best.ok else None,
                           targets()["gpt2_best_tokens_per_s"] if gpu else None, fmt="{:,.0f}")
        bench.report.check_ratio(suite, "dsfleet best / plain PyTorch loop (compiled) tokens/s (their micro-batches)",
                                 best, loop, None)
    hf = run_hf_compiled(bench, suite, w)
    bench.report.check_ratio(suite, "dsfleet fast / HF Trainer (torch.compile, fused AdamW, no DeepSpeed) tokens/s",
                             fast, hf, None)
    compare_peer_losses(bench, suite, plain, hf, w)


def t5_peers(bench, suite: str, w, dsfleet_run) -> None:
    """The t5_3b suite's peers: HF Trainer + DeepSpeed ZeRO-2 without offload (the best HF config that fits one
    GPU) at the suite's shapes, then dsfleet at the planner's micro-batch. The HF peer's loss curve is compared
    with the suite's dsfleet run (same shapes, seed and batches)."""
    gpu = not bench.cpu
    hf = bench.run_hf(suite, "hf_trainer_zero2", w, 1, bench.baseline_config("zero2"),
                      "shipped ZeRO-2 JSON without optimizer offload (the best HF config that fits one GPU)")
    bench.report.check_ratio(suite, "dsfleet (planner) / HF Trainer ZeRO-2 no offload tokens/s, same shapes",
                             dsfleet_run, hf, targets()["t5_vs_hf_zero2"] if gpu else None)
    compare_peer_losses(bench, suite, dsfleet_run, hf, w)
    best, best_w = run_best(bench, suite, w, "t5")
    if best is not None:
        bench.report.check(suite, f"dsfleet best (planner: micro-batch {best_w.micro_batch}) tokens/s",
                           best.tokens_per_s if best.ok else None, None, fmt="{:,.0f}")
        bench.report.check_ratio(suite, "dsfleet best / HF Trainer ZeRO-2 no offload tokens/s (their micro-batches)",
                                 best, hf, None)


if __name__ == "__main__":
    sys.exit(main())
