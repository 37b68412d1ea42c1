"""The one training entry point: `python -m dsfleet.train`, and the user script of deepspeed, torchrun,
`srun python` and `mpirun python` alike. It reads one RunSpec, finds its rank from whichever launcher
started it, and runs a plain loop on the DeepSpeed engine. Read `train()` top to bottom.
"""
from __future__ import annotations

import atexit
import gc
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

from dsfleet.cli import UsageError, fail

EXIT_PREEMPTED = 75  # a checkpoint was saved after SIGUSR1/SIGTERM; the Slurm script requeues on this code
EXIT_SAVE_FAILED = 74  # a checkpoint could not be written (disk full, read-only); the previous one is intact
ARTIFACTS = ("checkpoints", "metrics.jsonl", "tb", "final", "plot.png", "tokenizer", "spec.yaml", "ds_config.json",
             "generated_predictions.txt")


def main(argv: list[str] | None = None) -> int:
    from dsfleet.checkpoint import CheckpointError
    from dsfleet.spec import parse_args
    try:
        return train(parse_args(argv, prog="python -m dsfleet.train"))
    except UsageError as e:
        print(f"dsfleet train: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dsfleet train: {e}", file=sys.stderr)
        return EXIT_SAVE_FAILED


def train(spec) -> int:
    # ---- 1. what to train, where: all checks before anything is written ----------------------------------
    if spec.mamba_kernels == "off":  # before anything imports transformers' Mamba: it picks its scan at import
        from dsfleet.fastpath import hide_mamba_kernels
        hide_mamba_kernels()
    model_source = resolve_model_source(spec)
    if spec.mamba_kernels == "on" and model_source.family == "mamba":
        from dsfleet.fastpath import mamba_kernels_problem
        problem = "no GPU visible" if not _has_gpu() else mamba_kernels_problem()
        if problem:
            fail(f"--mamba_kernels on, but the mamba_ssm / causal_conv1d CUDA kernels cannot run here ({problem}) — "
                 "build them for this GPU (docker/install.sh mamba with CUDA_ARCH set) or pass --mamba_kernels auto")
    if spec.model_name_or_path and spec.preset and not spec.from_scratch:
        model_config(spec.model_name_or_path)  # weights load after the run dir exists: a bad source is said now
    spec.task = spec.task or ("translation" if model_source.family == "t5" else "causal_lm")
    if not (spec.do_train or spec.do_eval or spec.do_predict):
        spec.do_train = True
    out = Path(spec.output_dir or fail("--output_dir is required — pass a directory for metrics and checkpoints"))
    resume_request = spec.resume_from_checkpoint
    check_output_dir(out, spec)

    from dsfleet import dist_env
    denv = dist_env.setup()
    if not _has_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from dsfleet import checkpoint, data, fastpath
    from dsfleet.metrics import FlopCounter, MetricsLog, batch_tokens, live_memory

    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    is_main = denv.rank == 0
    ds_config, zero_stage = build_ds_config(spec, model_source, denv.world_size, on_cpu, accel)
    if spec.dry_run:
        if is_main:
            print_plan(spec, model_source, ds_config, denv.world_size)
        return 0

    # ---- 2. processes, output dir, seed ----------------------------------------------------------------
    if not on_cpu:
        accel.set_device(denv.local_rank)
        if spec.gpu_memory_fraction:
            torch.cuda.set_per_process_memory_fraction(spec.gpu_memory_fraction, denv.local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                               verbose=False)
    import torch.distributed as dist
    dist_env.release_cpu_allreduce_segment()
    raw = None if spec.synthetic_data else data.load_raw(spec)  # data errors surface before anything is written
    if raw is not None:
        if "train" not in raw and spec.do_train:
            fail("the dataset has no 'train' split — pass --train_file or a dataset with a train split")
        data.check_columns(spec, raw)
        data.check_train_size(spec, raw, denv.world_size)
    resume_dir = checkpoint.find(resume_request, out) if resume_request else None
    dist.barrier()
    if is_main:
        prepare_output_dir(out, spec, ds_config)
    dist.barrier()
    seed_everything(spec.seed)

    # ---- 3. data and tokenizer -------------------------------------------------------------------------
    tokenizer, splits = load_data(spec, model_source, raw, out, is_main, dist)
    seq2seq = model_source.family == "t5"
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    collate = data.Collator(pad_id=pad_id, seq2seq=seq2seq)
    order = data.ResumableOrder(len(splits["train"]), spec.per_device_train_batch_size, denv.rank,
                                denv.world_size, spec.seed) if spec.do_train else None
    total_steps = planned_steps(spec, order) if order else 0

    # ---- 4. model and engine ---------------------------------------------------------------------------
    model = build_model(spec, model_source, tokenizer, ds_config, zero_stage, on_cpu, accel)
    fast = fastpath.apply(model, spec, model_source.family, zero_stage)  # fused loss/GELU, compile: same math
    if resume_dir is not None and checkpoint.saved_world_size(resume_dir) != denv.world_size:
        resume_dir = checkpoint.to_universal(resume_dir, rank=denv.rank)  # ZeRO shards re-cut for this world
        ds_config["checkpoint"] = {"load_universal": True}
    client_scheduler = None if "scheduler" in ds_config else lr_lambda_scheduler(spec, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config, lr_scheduler=client_scheduler)
    fast.attach(engine, spec, out, denv.rank, total_steps)
    device = engine.device
    flops = FlopCounter(engine.module, model_source.family)
    if is_main:
        print(f"dsfleet: {model_source.name} ({flops.n_params / 1e6:,.2f}M params), {denv.world_size} rank(s) via "
              f"{denv.source}, ZeRO-{zero_stage}, {spec.precision}, micro batch {spec.per_device_train_batch_size} x "
              f"grad accum {spec.gradient_accumulation_steps} x world {denv.world_size} = "
              f"{ds_config['train_batch_size']}, {total_steps} steps", flush=True)
        print(f"dsfleet: fast path: {fast.describe()}", flush=True)
        for line in fast.warnings:
            print(f"dsfleet: {line}", flush=True)
    if spec.check_memory:
        print(f"[rank {denv.rank}] memory after engine init: {live_memory()}", flush=True)

    step = 0
    if resume_dir is not None:
        state = checkpoint.load(engine, resume_dir, rank=denv.rank)
        step = state["step"]
        order.load_state(state["data"]) if order else None
        if is_main:
            print(f"dsfleet: resumed from {resume_dir} at step {step}", flush=True)

    log = MetricsLog(out, is_main, total_steps, step, spec.peak_tflops, denv.world_size,
                     show_progress=not spec.no_progress, report_to=spec.report_to, tags=fast.tags)
    stop = PreemptionFlag()
    collector = StepBoundaryGC(spec.gc_interval)

    def save(at_step: int) -> None:
        checkpoint.save(engine, out / "checkpoints", at_step,
                        {"step": at_step, "data": order.state(), "world_size": denv.world_size,
                         "total_steps": total_steps, "zero_stage": zero_stage},
                        rank=denv.rank, keep=spec.save_total_limit)

    # ---- 5. the loop -------------------------------------------------------------------------------------
    if spec.do_train:
        engine.train()
        batches = iter(order)
        loss_sum = torch.zeros((), device=device)
        loss_count = 0
        while step < total_steps:
            for _ in range(spec.gradient_accumulation_steps):
                batch = {k: v.to(device) for k, v in collate([splits["train"][i] for i in next(batches)]).items()}
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
                loss_count += 1
                log.count(batch_tokens(batch, seq2seq), flops(batch))
            step += 1
            log.advance()
            if step % spec.logging_steps == 0 or step == total_steps:
                dist.all_reduce(loss_sum)
                log.log_train(step, loss=loss_sum.item() / (loss_count * denv.world_size),
                              lr=engine.get_lr()[0], grad_norm=grad_norm(engine), epoch=order.epoch)
                loss_sum.zero_()
                loss_count = 0
                if spec.check_memory:
                    print(f"[rank {denv.rank}] step {step}: {live_memory()}", flush=True)
            if spec.eval_steps and step % spec.eval_steps == 0 and step < total_steps and "validation" in splits:
                evaluate(engine, spec, splits["validation"], collate, tokenizer, step, log, denv, zero_stage, seq2seq)
                engine.train()
                log.reset_window()
            collector.maybe_collect(step)
            if spec.save_steps and step % spec.save_steps == 0 and step < total_steps:
                save(step)
            if stop.agreed(device, dist):
                save(step)
                if is_main:
                    print(f"dsfleet: preempted ({stop.signal_name}) — checkpoint step {step} saved, exiting "
                          f"{EXIT_PREEMPTED} for requeue", flush=True)
                log.close()
                dist_env.leave_process_group()
                return EXIT_PREEMPTED
        save(step)
        collector.stop()

    # ---- 6. evaluation, prediction, export -----------------------------------------------------------------
    if spec.do_eval and "validation" in splits:
        evaluate(engine, spec, splits["validation"], collate, tokenizer, step, log, denv, zero_stage, seq2seq)
    if spec.do_predict and "test" in splits:
        evaluate(engine, spec, splits["test"], collate, tokenizer, step, log, denv, zero_stage, seq2seq,
                 predictions_file=out / "generated_predictions.txt", prefix="predict_")
    if spec.do_train and spec.export_hf:
        checkpoint.export_hf(engine, engine.module, tokenizer, out / "final", rank=denv.rank, zero_stage=zero_stage)
    log.close()
    if is_main:
        print(f"dsfleet: done — run dir {out} (metrics.jsonl, plot.png, checkpoints/, final/)", flush=True)
    dist_env.leave_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------------
# The pieces train() composes.

def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _has_gpu() -> bool:
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return False
    import torch
    return torch.cuda.is_available()


def resolve_model_source(spec) -> SimpleNamespace:
    """Which architecture (preset or a model dir's config) and where its weights come from — never silently."""
    from dsfleet.presets import get_preset
    preset = get_preset(spec.preset) if spec.preset else None
    if spec.synthetic_data and not spec.from_scratch and not spec.model_name_or_path:
        spec.from_scratch = True  # random tokens need no trained weights; said in the start line
    if not spec.from_scratch and not spec.model_name_or_path:
        fail(f"no weights given — pass --model_name_or_path DIR (a local dir or hub id) or --from_scratch for a "
             f"random init of {preset.name if preset else 'the preset'}")
    if preset is None:
        if not spec.model_name_or_path:
            fail("--from_scratch without an architecture — pass --preset NAME (e.g. t5_small) or --model_name_or_path "
                 "DIR whose config.json gives it")
        cfg = model_config(spec.model_name_or_path)
        if cfg.model_type not in ("t5", "gpt2", "mamba"):
            fail(f"model type {cfg.model_type!r} is not supported — use a T5, GPT-2 or Mamba model")
        from dsfleet.presets import Preset
        preset = Preset(Path(spec.model_name_or_path).name or cfg.model_type, cfg.model_type, cfg.to_diff_dict())
    return SimpleNamespace(preset=preset, family=preset.family, name=preset.name)


def model_config(name_or_path: str):
    """The transformers config of --model_name_or_path: a missing local dir, an unreadable config.json and an
    unreachable hub id are each one line (bad input), said before anything is written."""
    from transformers import AutoConfig
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # hub ids: NAME or ORG/NAME
    if looks_local and not local.is_dir():
        fail(f"--model_name_or_path {name_or_path}: no such directory — pass a local model dir (with config.json) or a "
             "hub id such as t5-small")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as e:
        if local.is_dir():
            fail(f"cannot read the model config in {name_or_path} ({type(e).__name__}: "
                 f"{(str(e).strip().splitlines() or [''])[0][:120]}) — pass a dir with a transformers config.json")
        fail(f"cannot load model {name_or_path!r} ({type(e).__name__}: no local dir with config.json "
             "and the hub is unreachable?) — pass a local model dir, or --preset NAME --from_scratch")


def check_output_dir(out: Path, spec) -> None:
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {out} is a file — pass a directory")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not spec.overwrite_output_dir and not spec.resume_from_checkpoint and not spec.dry_run:
        fail(f"output dir {out} exists and is not empty — pass --overwrite_output_dir to replace it, or "
             "--resume_from_checkpoint auto to continue it")
    if spec.overwrite_output_dir and spec.resume_from_checkpoint:
        fail("--overwrite_output_dir and --resume_from_checkpoint contradict each other — choose one")


def prepare_output_dir(out: Path, spec, ds_config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if spec.overwrite_output_dir:  # asked for: remove only what a previous dsfleet run wrote
        for name in ARTIFACTS:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    from dsfleet.spec import spec_to_yaml
    (out / "spec.yaml").write_text(spec_to_yaml(spec))
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2, default=str) + "\n")  # what DeepSpeed was given


def hidden_size_of(config: dict) -> int:
    for key in ("d_model", "n_embd", "hidden_size"):
        if key in config:
            return int(config[key])
    return 1024


def build_ds_config(spec, model_source, world_size: int, on_cpu: bool, accel):
    from dsfleet import dsconfig
    hidden = hidden_size_of(model_source.preset.config)
    if spec.deepspeed:
        user = dsconfig.read_user_config(spec.deepspeed)
        spec_steps = spec.max_steps if spec.max_steps > 0 else 10**6
        config = dsconfig.fill_auto(user, spec, world_size=world_size, hidden_size=hidden, total_steps=spec_steps)
        stage = dsconfig.zero_stage_of(config)
        warn_heavier_stage(spec, stage, world_size, on_cpu)
    else:
        stage = spec.zero
        if stage == "auto":
            stage = choose_zero(spec, model_source, world_size, on_cpu)
        config = dsconfig.generate(spec, world_size=world_size, hidden_size=hidden, zero_stage=stage, on_cpu=on_cpu)
    config = dsconfig.check(config, world_size=world_size, on_cpu=on_cpu,
                            accelerator_fp16=bool(accel.is_fp16_supported()))
    if on_cpu and "optimizer" in config and not config["zero_optimization"].get("offload_optimizer"):
        config["optimizer"].setdefault("params", {})["torch_adam"] = True
    spec.fp16 = bool(config.get("fp16", {}).get("enabled"))
    spec.bf16 = bool(config.get("bf16", {}).get("enabled"))
    return config, stage


def _device_memory() -> tuple[int, int]:
    import psutil
    import torch
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30
    return gpu, psutil.virtual_memory().total


def choose_zero(spec, model_source, world_size: int, on_cpu: bool) -> int:
    """`--zero auto`: the planner's fastest fitting candidate; its offload/checkpointing choices apply too."""
    from dsfleet import planner
    gpu_mem, cpu_mem = _device_memory()
    choice = planner.choose_for_spec(spec, world_size, spec.gpu_mem_bytes or gpu_mem, cpu_mem)
    if choice is None or not choice.fits:
        fail(f"no ZeRO stage/offload fits {model_source.name} on {world_size} x {(spec.gpu_mem_bytes or gpu_mem) / 2**30:.0f} GiB "
             "— run `dsfleet plan` to see what would")
    spec.offload_optimizer, spec.offload_param = choice.offload_optimizer, choice.offload_param
    spec.gradient_checkpointing = spec.gradient_checkpointing or choice.gradient_checkpointing
    print(f"dsfleet: zero auto -> ZeRO-{choice.zero_stage}, offload optimizer {choice.offload_optimizer}, "
          f"params {choice.offload_param}", flush=True)
    return choice.zero_stage


def warn_heavier_stage(spec, stage: int, world_size: int, on_cpu: bool) -> None:
    if on_cpu or int(os.environ.get("RANK", "0")) != 0:
        return
    from dsfleet import planner
    plan = _plan(spec, world_size)
    message = planner.check_heavier_stage(plan, stage) if plan is not None else None
    if message:
        print(f"dsfleet: warning: {message}", flush=True)


def print_plan(spec, model_source, ds_config: dict, world_size: int) -> None:
    from dsfleet.spec import spec_to_yaml
    print("# run spec\n" + spec_to_yaml(spec))
    print("# DeepSpeed config\n" + json.dumps(ds_config, indent=2))
    plan = _plan(spec, world_size)
    if plan is not None:
        from dsfleet import planner
        print("# memory plan\n" + planner.format_plan(plan))
    else:
        print(f"# memory plan\n(no plan: the model of {model_source.name} has no readable T5/GPT-2/Mamba config)")


def _plan(spec, world_size: int):
    """The planner's view of exactly this spec on this hardware (None when its model cannot be read)."""
    from dsfleet import planner
    gpu_mem, cpu_mem = _device_memory()
    return planner.plan_for_spec(spec, world_size, spec.gpu_mem_bytes or gpu_mem, cpu_mem)


def load_data(spec, model_source, raw, out: Path, is_main: bool, dist):
    """Tokenizer + tokenized splits. A locally trained tokenizer is made once by rank 0 and kept in the run dir."""
    from dsfleet import data
    if raw is None:
        vocab = int(model_source.preset.config.get("vocab_size", 32128))
        seq2seq = model_source.family == "t5"
        src = spec.max_source_length if seq2seq else spec.block_size
        n = spec.max_train_samples or 100_000
        ds = data.SyntheticTokens(n, vocab, seq2seq, src, spec.max_target_length, spec.seed)
        return None, {"train": ds, "validation": data.SyntheticTokens(64, vocab, seq2seq, src, spec.max_target_length,
                                                                     spec.seed + 1)}
    local_tok = out / "tokenizer"
    source = spec.tokenizer_name or (spec.model_name_or_path if not spec.from_scratch else None)
    if source:
        tokenizer = data.load_tokenizer(source)
    else:
        if is_main and not (local_tok / "tokenizer.json").is_file():
            vocab = int(model_source.preset.config.get("vocab_size", 512))
            data.train_bpe_tokenizer(data.training_texts(spec, raw), vocab, local_tok)
        dist.barrier()
        tokenizer = data.load_tokenizer(str(local_tok))
    return tokenizer, data.tokenize(spec, raw, tokenizer)


def planned_steps(spec, order) -> int:
    per_epoch = max(order.micro_steps_per_epoch // spec.gradient_accumulation_steps, 1)
    return spec.max_steps if spec.max_steps > 0 else math.ceil(spec.num_train_epochs * per_epoch)


def build_model(spec, model_source, tokenizer, ds_config: dict, zero_stage: int, on_cpu: bool, accel):
    import functools

    import torch
    from dsfleet.fastpath import attn_implementation
    from dsfleet.models import load_model
    load_model = functools.partial(load_model, attn_implementation=attn_implementation(spec, model_source.family))
    overrides = {}
    if tokenizer is not None and spec.from_scratch:
        overrides = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if model_source.family == "t5":
            overrides["decoder_start_token_id"] = tokenizer.pad_token_id
        else:
            overrides["bos_token_id"] = tokenizer.eos_token_id
        if model_source.preset.cpu_sized or len(tokenizer) > model_source.preset.config.get("vocab_size", 0):
            overrides["vocab_size"] = len(tokenizer)
    keep_alive = None
    if zero_stage == 3:  # partition at construction: a model larger than one device never materialises whole
        import deepspeed
        import torch._dynamo  # noqa: F401 — imported inside zero.Init, its polyfills trip over the patched Tensor.__new__
        from dsfleet.models import family
        family(model_source.family)  # import the model classes outside the patched context too
        if spec.from_scratch:
            from dsfleet.models import zero3_construction
            with deepspeed.zero.Init(config_dict_or_path=ds_config), zero3_construction(model_source.family):
                return load_model(model_source.preset, None, True, overrides, spec.gradient_checkpointing)
        from transformers.integrations import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 — from_pretrained reads it while alive
    device = None if on_cpu or not spec.from_scratch else torch.device(accel.current_device_name())
    try:
        if device is not None:
            with device:
                return load_model(model_source.preset, spec.model_name_or_path, spec.from_scratch, overrides,
                                  spec.gradient_checkpointing)
        return load_model(model_source.preset, spec.model_name_or_path, spec.from_scratch, overrides,
                          spec.gradient_checkpointing)
    except (OSError, ValueError) as e:
        fail(f"cannot load weights from {spec.model_name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}) "
             "— pass a local model dir or --from_scratch")
    finally:
        del keep_alive


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm before clipping (DeepSpeed keeps it; inf on a skipped step)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def lr_lambda_scheduler(spec, total_steps: int):
    import torch

    def factor(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - spec.warmup_steps) / max(total_steps - spec.warmup_steps, 1)
        if spec.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StepBoundaryGC:
    """Python's cyclic garbage collector at every `interval`-th step boundary instead of whenever allocation counts
    trigger it: a collection over the millions of objects of a transformers + DeepSpeed process, landing in the
    middle of backward, leaves the GPU waiting (GPT-2 XL on one H200: every few steps ~10 % slower). Objects alive
    at the start of the loop are frozen out of collections. interval 0 leaves Python's collector as it is.
    stop() (also run at exit, whichever way the run ends) hands everything back to Python's collector, so the
    interpreter's own shutdown collection still frees the frozen objects (process groups, their threads)."""

    def __init__(self, interval: int):
        self.interval = interval
        if interval:
            gc.collect()
            gc.freeze()
            gc.disable()
            atexit.register(self.stop)

    def stop(self) -> None:
        if self.interval:
            gc.unfreeze()
            gc.enable()

    def maybe_collect(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect()


class PreemptionFlag:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it at step boundaries (one tiny all-reduce) and save together."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device, dist) -> bool:
        import torch
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.signal_name:
            self.signal_name = "a peer's signal"
        return bool(flag.item())


def evaluate(engine, spec, ds, collate, tokenizer, step: int, log, denv, zero_stage: int, seq2seq: bool,
             predictions_file: Path | None = None, prefix: str = "eval_") -> None:
    """Eval loss (all ranks, sharded), perplexity for LM, BLEU from generation for translation."""
    import torch
    import torch.distributed as dist
    from dsfleet.data import eval_batches
    engine.eval()
    device = engine.device
    total = torch.zeros(2, device=device)
    generated: list[tuple[int, str, str]] = []
    want_generate = seq2seq and tokenizer is not None and (spec.predict_with_generate or predictions_file is not None)
    with torch.no_grad():
        for idx in eval_batches(ds, spec.per_device_eval_batch_size, denv.rank, denv.world_size):
            batch = {k: v.to(device) for k, v in collate([ds[i] for i in idx]).items()}
            n_tokens = (batch["labels"] != -100).sum()
            total += torch.stack([engine(**batch).loss.float() * n_tokens, n_tokens.float()])
            if want_generate:
                out = engine.module.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             max_new_tokens=spec.generation_max_length or spec.max_target_length,
                                             num_beams=spec.num_beams,
                                             synced_gpus=zero_stage == 3 and denv.world_size > 1)
                preds = tokenizer.batch_decode(out, skip_special_tokens=True)
                labels = batch["labels"].masked_fill(batch["labels"] == -100, tokenizer.pad_token_id)
                refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
                generated += [(i, p.strip(), r.strip()) for i, p, r in zip(idx, preds, refs)]
    dist.all_reduce(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    values = {f"{prefix}loss": loss}
    if not seq2seq:
        values[f"{prefix}perplexity"] = math.exp(min(loss, 50))
    if want_generate:
        gathered = [None] * denv.world_size
        dist.all_gather_object(gathered, generated)
        unique = dict((i, (p, r)) for part in gathered for i, p, r in part)
        if denv.rank == 0:
            import sacrebleu
            preds = [unique[i][0] for i in sorted(unique)]
            refs = [unique[i][1] for i in sorted(unique)]
            values["bleu" if prefix == "eval_" else f"{prefix}bleu"] = sacrebleu.corpus_bleu(preds, [refs]).score
            if predictions_file is not None:
                predictions_file.write_text("\n".join(preds) + "\n")
    log.log_eval(step, **values)


if __name__ == "__main__":
    sys.exit(main())
