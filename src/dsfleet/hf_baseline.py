"""The baseline of `dsfleet bench`: the same workload through HF Trainer + DeepSpeed, the way a user runs it.

dsfleet's throughput claims are ratios against this program, so it must run exactly the workload dsfleet runs:
the preset's transformers config with a random init (`from_config`: no download; on the GPU for ZeRO 0-2, and
partitioned at construction by transformers' own ZeRO-3 integration for stage 3), dsfleet's synthetic tokens
and collator (same lengths, same padding), the given DeepSpeed JSON with HF's "auto" values, bf16, the same
micro-batch, learning rate, clipping and schedule. Nothing of HF's defaults is tuned: it is the baseline.
The batches are dsfleet's too, in dsfleet's order (`train_sampling_strategy="sequential"` over dsfleet's shuffled
batch order), and the dropout draws start from the state the model's init left, as in dsfleet's loop (HF Trainer
re-seeds inside train(); the state is put back before the first step), so the loss curves can be compared.
Without `--deepspeed` it is the bench's `hf_compiled` peer (dsfleet.bench.peers): HF Trainer alone, one process,
with `--torch_compile` and `--optim adamw_torch_fused`.

Throughput is measured as the bench reads dsfleet's runs: the wall time of the steps after `--warmup` (device
synchronised at both ends), tokens from the padded batch shapes, FLOPs from dsfleet.metrics.FlopCounter, MFU
against `--peak_tflops`. Rank 0 writes one JSON result. `--config_name DIR|config.json` instead of `--preset` trains any
transformers architecture the same way (dsfleet's `--config_name --from_scratch`). Start it under the deepspeed
launcher:

    deepspeed --num_gpus N --module dsfleet.hf_baseline --preset gpt2_xl --deepspeed ds.json --bf16 \\
        --micro_batch 8 --block_size 1024 --steps 20 --warmup 5 --output_dir DIR --result result.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The workload flags every bench peer takes (the bench passes the same ones to each: Workload.shape_flags)."""
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--block_size", type=int, default=1024, help="causal LM: tokens per row")
    p.add_argument("--max_source_length", type=int, default=128, help="seq2seq: source tokens per row")
    p.add_argument("--max_target_length", type=int, default=128, help="seq2seq: target tokens per row")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--bf16", action="store_true", help="bf16 (on a GPU)")
    p.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsfleet.hf_baseline", description=__doc__.splitlines()[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", help="dsfleet preset: the transformers config (random init)")
    model.add_argument("--config_name", help="any transformers config (a dir with config.json, or the file): random "
                       "init of that architecture, causal LM or seq2seq as the config says")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON as HF Trainer takes it (\"auto\" allowed); "
                   "left out: HF Trainer alone (one process)")
    p.add_argument("--optim", default=None, help="TrainingArguments.optim without --deepspeed (e.g. adamw_torch_fused)")
    p.add_argument("--torch_compile", action="store_true", help="TrainingArguments.torch_compile")
    p.add_argument("--result", required=True, help="where rank 0 writes the JSON result")
    p.add_argument("--output_dir", required=True, help="HF Trainer's output dir (nothing is saved there)")
    add_workload_arguments(p)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timed window")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's
    return p


def _has_gpu() -> bool:
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return False
    import torch
    return torch.cuda.is_available()


def _known(cls, kwargs: dict) -> dict:
    """TrainingArguments fields move between transformers releases: pass the ones this one has."""
    accepted = inspect.signature(cls).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        print("hf_baseline: need 1 <= --warmup < --steps — the timed window starts after a warm step", file=sys.stderr)
        return 2
    gpu = _has_gpu()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import transformers
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, Seq2SeqTrainer, Seq2SeqTrainingArguments,
                              Trainer, TrainerCallback, TrainingArguments, set_seed)

    from dsfleet.data import Collator
    from dsfleet.dist_env import leave_process_group, release_cpu_allreduce_segment
    from dsfleet.metrics import FlopCounter, batch_tokens
    from dsfleet.models import build_config, model_config, seq2seq_of
    from dsfleet.presets import get_preset

    if args.config_name:  # the architecture as dsfleet's --config_name reads it
        config = model_config(args.config_name, flag="--config_name")
        seq2seq, model_family = seq2seq_of(config), config.model_type
        name = Path(args.config_name.rstrip("/")).name
        name = config.model_type if name in ("", "config.json") else name
    else:
        preset = get_preset(args.preset)
        seq2seq, model_family, name = preset.family == "t5", preset.family, preset.name
        config = build_config(preset)
    ds_json = json.loads(Path(args.deepspeed).read_text()) if args.deepspeed else {}
    stage = int(ds_json.get("zero_optimization", {}).get("stage", 0))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpu:
        torch.cuda.set_device(local_rank)

    args_cls = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    training_args = args_cls(**_known(args_cls, dict(
        output_dir=args.output_dir, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.learning_rate, weight_decay=0.0, warmup_steps=0,
        lr_scheduler_type="linear", max_grad_norm=1.0, bf16=args.bf16, deepspeed=args.deepspeed, seed=args.seed,
        logging_strategy="steps", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_drop_last=True, remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not gpu, train_sampling_strategy="sequential", torch_compile=args.torch_compile,
        **({"optim": args.optim} if args.optim else {}))))  # before the model: with ZeRO-3 it switches on zero.Init

    set_seed(args.seed)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    started = time.perf_counter()
    if stage == 3 or not gpu:
        model = auto.from_config(config)
    else:
        with torch.device("cuda", local_rank):  # a 1.5-3B model initialised on the CPU takes minutes
            model = auto.from_config(config)
    init_s = time.perf_counter() - started
    rng_after_init = (torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if gpu else None)

    src_len = args.max_source_length if seq2seq else args.block_size
    data = dsfleet_batches(args, config.vocab_size, seq2seq, world)
    collate = Collator(pad_id=0, seq2seq=seq2seq)  # what dsfleet.train uses for --synthetic_data
    sample = collate([data[i] for i in range(args.micro_batch)])

    timer = _StepTimer(TrainerCallback, args.warmup, args.steps, gpu, rng_after_init)
    trainer_cls = Seq2SeqTrainer if seq2seq else Trainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=data, data_collator=collate,
                          callbacks=[timer])
    # HF Trainer would divide the summed token loss by its own count of labels (transformers 5.24, GPT-2: before
    # the shift, B x T for B x (T - 1) predicted tokens — 1/64 low at 64 tokens, 1/1024 at 1024); the model's own
    # mean, as dsfleet and the plain loop compute it, makes the loss curves comparable (same gradient direction)
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    release_cpu_allreduce_segment()  # DeepSpeed's CPU all-reduce segment (dist_env says why)

    if rank == 0:
        flops = FlopCounter(model, model_family)
        timed = args.steps - args.warmup
        elapsed = timer.end - timer.start
        tokens = batch_tokens(sample, seq2seq) * world * timed
        tflops = flops(sample) * world * timed / elapsed / 1e12
        result = {
            "tool": "hf_trainer", "preset": name, "world_size": world,
            "zero_stage": stage if args.deepspeed else None,  # None: HF Trainer alone, no DeepSpeed
            "precision": "bf16" if args.bf16 else "fp32", "micro_batch": args.micro_batch,
            "seq": {"source": src_len, "target": args.max_target_length} if seq2seq else {"block": src_len},
            "steps": args.steps, "warmup": args.warmup, "timed_s": elapsed,
            "tokens_per_s": tokens / elapsed, "tflops": tflops, "tflops_per_gpu": tflops / world,
            "mfu": tflops / world / args.peak_tflops if args.peak_tflops else None,
            "peak_mem_bytes": timer.peak_mem, "n_params": flops.n_params,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "model_init_s": init_s, "first_step_end_unix": timer.first_step_end,
            "step_ms": [round(1000 * (b - a), 2) for a, b in zip(timer.step_ends, timer.step_ends[1:])],
            "losses": timer.losses, "transformers": transformers.__version__, "torch": torch.__version__,
        }
        tmp = Path(args.result).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.result)
        print(f"hf_baseline: {result['tokens_per_s']:,.0f} tokens/s, {tflops / world:.1f} TFLOP/s per GPU over "
              f"steps {args.warmup + 1}-{args.steps}", flush=True)
    leave_process_group()
    return 0


def synthetic_train_set(args, vocab_size: int, seq2seq: bool):
    """dsfleet.train's --synthetic_data training set for the workload flags: the tokens every peer trains on."""
    from types import SimpleNamespace

    from dsfleet import data
    spec = SimpleNamespace(max_source_length=args.max_source_length, max_target_length=args.max_target_length,
                           block_size=args.block_size, max_train_samples=None, seed=args.seed)
    source = SimpleNamespace(preset=SimpleNamespace(config={"vocab_size": vocab_size}), seq2seq=seq2seq)
    return data.synthetic_splits(spec, source)["train"]


def dsfleet_batches(args, vocab_size: int, seq2seq: bool, world: int):
    """dsfleet.train's synthetic training set, viewed in dsfleet's batch order: read sequentially, step k of rank r
    gets the samples dsfleet's ResumableOrder gives rank r at step k."""
    import itertools

    import torch

    from dsfleet import data
    train = synthetic_train_set(args, vocab_size, seq2seq)
    chunks = itertools.islice(iter(data.ResumableOrder(len(train), args.micro_batch * world, 0, 1, args.seed)),
                              args.steps + 2)
    return torch.utils.data.Subset(train, [i for chunk in chunks for i in chunk])


def _StepTimer(base, warmup: int, steps: int, gpu: bool, rng_state=None):
    """A TrainerCallback (class made here: transformers is imported lazily) timing steps warmup+1..steps; before
    the first step it puts back `rng_state` (CPU, CUDA), the generators as the model's init left them."""
    import torch

    from dsfleet.metrics import peak_memory

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    class StepTimer(base):
        def __init__(self):
            self.start = self.end = None
            self.first_step_end = None
            self.peak_mem = None
            self.losses: dict[int, float] = {}
            self.step_ends: list[float] = []  # perf_counter at the end of steps warmup..steps: per-step wall times
            self.rng_state = rng_state

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0 and self.rng_state is not None:
                cpu, cuda = self.rng_state
                torch.random.set_rng_state(cpu)
                if cuda is not None:
                    torch.cuda.set_rng_state_all(cuda)
                self.rng_state = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                sync()
                self.first_step_end = time.time()
            if state.global_step == warmup:
                sync()
                self.start = time.perf_counter()
            if state.global_step == steps:
                sync()
                self.end = time.perf_counter()
                self.peak_mem = peak_memory()["peak_mem_bytes"]  # as dsfleet's metrics rows record it
            if warmup <= state.global_step <= steps:  # loss logging at every step syncs the device each step
                self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return StepTimer()


if __name__ == "__main__":
    sys.exit(main())
