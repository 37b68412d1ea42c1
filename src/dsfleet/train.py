"""The one training entry point: `python -m dsfleet.train`, and the user script of deepspeed, torchrun,
`srun python` and `mpirun python` alike. Read `train()` top to bottom: parse, check, resolve, build, loop,
finish. Every piece it calls lives in its component (models, data, resolve, rundir, checkpoint, metrics,
evaluate, schedule, runtime); nothing imports this module.
"""
from __future__ import annotations

import os
import sys

from dsfleet.cli import UsageError
from dsfleet.runtime import EXIT_PREEMPTED, EXIT_SAVE_FAILED
from dsfleet.trackers import check_trackers


def main(argv: list[str] | None = None, prog: str = "python -m dsfleet.train") -> int:
    from dsfleet.checkpoint import CheckpointError
    from dsfleet.spec import parse_args
    try:
        return train(parse_args(argv, prog=prog))
    except UsageError as e:
        print(f"dsfleet train: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dsfleet train: {e}", file=sys.stderr)
        return EXIT_SAVE_FAILED


def train(spec) -> int:
    # ---- 1. what to train, where, with what: every check before the first byte is written ---------------
    from dsfleet import checkpoint, data, dist_env, fastpath, models, rundir, runtime, schedule, token_cache, watchdog
    from dsfleet.resolve import Hardware, describe, resolve
    denv = dist_env.setup()
    world = spec.planned_world_size(denv.world_size)  # --num_gpus N: a dry run / memory check plans for N ranks
    source = models.resolve_source(spec)
    scan = fastpath.choose_mamba_scan(spec, source.family, runtime.has_gpu())  # once, before the Mamba import
    models.check_weights(spec)
    if not (spec.do_train or spec.do_eval or spec.do_predict):
        spec.do_train = True
    out = rundir.checked(spec)
    check_trackers(spec.report_to)  # a tracker not installed, or MLflow with nowhere to write: said now
    accel = runtime.accelerator()
    is_main = denv.rank == 0
    if spec.dry_run:
        hardware = Hardware.live(world, accel, spec.gpu_mem_bytes, scan)
        print(describe(resolve(spec, source, hardware), source)) if is_main else None
        return 0
    runtime.start_process_group(accel, denv.local_rank, spec.gpu_memory_fraction, spec.dist_timeout)
    watchdog.start(spec, denv, out)  # a lost or stopped peer: one line, exit 75 (dist_env.leave_process_group stops it)
    import torch
    import torch.distributed as dist
    tokenizer, splits = token_cache.prepare_for_run(spec, source, out, denv)  # tokenized once per job, memory-mapped
    order = data.batch_order(spec, splits["train"], denv) if spec.do_train else None
    total_steps = data.planned_steps(spec, order)
    run = resolve(spec, source, Hardware.live(denv.world_size, accel, spec.gpu_mem_bytes, scan), total_steps)
    spec, ds_config, zero_stage = run.spec, run.ds_config, run.zero_stage
    resume_dir = checkpoint.find(spec.resume_from_checkpoint, out) if spec.resume_from_checkpoint else None
    dist.barrier()
    if is_main:
        rundir.create(out, spec, ds_config, tokenizer)
        for line in run.notes:
            print(f"dsfleet: {line}", flush=True)
    dist.barrier()
    runtime.seed_everything(spec.seed)

    # ---- 2. model and engine ----------------------------------------------------------------------------
    from dsfleet.metrics import FlopCounter, MetricsLog, batch_tokens, live_memory
    import deepspeed
    collate = data.Collator(pad_id=tokenizer.pad_token_id if tokenizer is not None else 0, seq2seq=source.seq2seq)
    model = models.build_for_run(spec, source, tokenizer, ds_config, zero_stage, accel)
    fast = fastpath.apply(model, spec, source.family, zero_stage, scan)  # fused loss/GELU, compile: same math
    resume_dir = checkpoint.for_world_size(resume_dir, ds_config, denv.world_size, rank=denv.rank)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config,
                                           lr_scheduler=schedule.client_scheduler(spec, total_steps, ds_config))
    fast.attach(engine, spec, out, denv.rank, total_steps)
    flops = FlopCounter(engine.module, source.family)
    if is_main:
        print(f"dsfleet: {source.name} ({flops.n_params / 1e6:,.2f}M params), {denv.world_size} rank(s) via "
              f"{denv.source}, ZeRO-{zero_stage}, {spec.precision}, micro batch {spec.per_device_train_batch_size} x "
              f"grad accum {spec.gradient_accumulation_steps} x world {denv.world_size} = "
              f"{ds_config['train_batch_size']}, {total_steps} steps", flush=True)
        print(f"dsfleet: fast path: {fast.describe()}", flush=True)
        for line in fast.warnings:
            print(f"dsfleet: {line}", flush=True)
    if spec.check_memory:
        print(f"[rank {denv.rank}] memory after engine init: {live_memory()}", flush=True)
    run_state = {"world_size": denv.world_size, "global_batch": ds_config["train_batch_size"],
                 "schedule": schedule.describe(spec, total_steps, ds_config), "total_steps": total_steps,
                 "zero_stage": zero_stage}
    step = checkpoint.resume(engine, resume_dir, order, run_state, rank=denv.rank) if resume_dir is not None else 0

    log = MetricsLog(out, is_main, total_steps, step, spec.peak_tflops, denv.world_size,
                     show_progress=not spec.no_progress, report_to=spec.report_to, tags=fast.tags)
    stop = runtime.PreemptionFlag()
    collector = runtime.StepBoundaryGC(spec.gc_interval)
    batches = data.PrefetchedBatches(order, splits["train"], collate, accel, micro_batches=(total_steps - step) *
                                     spec.gradient_accumulation_steps) if spec.do_train else None  # read ahead

    def save(at_step: int) -> None:  # the data position is the last batch the step took, not the read-ahead
        checkpoint.save(engine, out / "checkpoints", at_step, {"step": at_step, "data": batches.state(), **run_state},
                        rank=denv.rank, keep=spec.save_total_limit)

    # ---- 3. the loop ------------------------------------------------------------------------------------
    from dsfleet.evaluate import evaluate, final_evaluations, should_eval
    if spec.do_train:
        engine.train()
        loss_sum = torch.zeros((), device=engine.device)
        loss_count = 0
        while step < total_steps:
            for _ in range(spec.gradient_accumulation_steps):
                batch = batches.to(next(batches), engine.device)
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
                loss_count += 1
                log.count(batch_tokens(batch, source.seq2seq), flops(batch))
            step += 1
            log.advance()
            if log.should_log(step, spec.logging_steps):
                dist.all_reduce(loss_sum)
                log.log_train(step, loss=loss_sum.item() / (loss_count * denv.world_size),
                              lr=engine.get_lr()[0], grad_norm=runtime.grad_norm(engine), epoch=batches.epoch)
                loss_sum.zero_()
                loss_count = 0
                if spec.check_memory:
                    print(f"[rank {denv.rank}] step {step}: {live_memory()}", flush=True)
            if should_eval(spec, step, total_steps, splits):
                evaluate(engine, spec, splits["validation"], collate, tokenizer, step, log, denv, zero_stage,
                         source.seq2seq)
                log.reset_window()
            collector.maybe_collect(step)
            if checkpoint.should_save(spec, step, total_steps):
                save(step)
            if stop.agreed(engine.device):
                batches.close()
                save(step)
                if is_main:
                    print(f"dsfleet: preempted ({stop.signal_name}) — checkpoint step {step} saved, exiting "
                          f"{EXIT_PREEMPTED} for requeue", flush=True)
                log.close()
                dist_env.leave_process_group()
                return EXIT_PREEMPTED
        save(step)
        collector.stop()

    # ---- 4. evaluation, prediction, export --------------------------------------------------------------
    final_evaluations(engine, spec, splits, collate, tokenizer, step, log, denv, zero_stage, source.seq2seq, out)
    if spec.do_train and spec.export_hf:
        checkpoint.export_hf(engine, engine.module, tokenizer, out / "final", rank=denv.rank, zero_stage=zero_stage)
    log.close()
    if is_main:
        print(f"dsfleet: done — run dir {out} (metrics.jsonl, plot.png, checkpoints/, final/)", flush=True)
    dist_env.leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
