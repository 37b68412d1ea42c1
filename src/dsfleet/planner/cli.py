"""`dsfleet plan`: its flags, and the table and one-line verdict a person reads (also printed by --dry_run).

Why this exists: the search (search.py) returns candidates with bytes and seconds; this module turns a request on
the command line into a `plan(...)` call and a Plan into text — GiB per GPU, CPU GiB per node, fit, relative
cost — or JSON, and an impossible request into one line on stderr with exit 2.
"""
from __future__ import annotations

import argparse
import json

from dsfleet.cli import fail
from dsfleet.planner.sizes import format_gib, parse_size
from dsfleet.planner.candidate import Candidate
from dsfleet.planner.search import PRECISIONS, Plan, plan


def _count_text(n: int) -> str:
    """6.923B, 124.4M, 96.3K: parameter counts readable at every scale (tiny CPU presets included)."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{3 if unit == 'B' else 1}f}{unit}"
    return str(n)


def summary_rows(pl: Plan, precision: str | None = None) -> list[Candidate]:
    """One row per (stage, offload, checkpointing) at one precision: its largest fitting micro-batch, or its
    smallest micro-batch when none fits."""
    prec = precision or (pl.best.precision if pl.best else "bf16")
    rows = []
    keys = []
    for c in pl.candidates:
        k = (c.zero_stage, c.offload_optimizer, c.offload_param, c.gradient_checkpointing)
        if c.precision == prec and k not in keys:
            keys.append(k)
    for k in keys:
        group = [c for c in pl.candidates if c.precision == prec and
                 (c.zero_stage, c.offload_optimizer, c.offload_param, c.gradient_checkpointing) == k]
        fit = [c for c in group if c.fits]
        rows.append(max(fit, key=lambda c: c.micro_batch) if fit else min(group, key=lambda c: c.micro_batch))
    return rows


def format_plan(plan: Plan, show_all: bool = False) -> str:
    """The human table: GiB per GPU, CPU GiB per node, fit, and the cost relative to the best."""
    pl = plan
    head = (f"{pl.model}: {_count_text(pl.n_params)} params (largest layer {_count_text(pl.largest_layer)}), "
            f"{pl.nodes} node(s) x {pl.gpus_per_node} GPU(s) of {format_gib(pl.gpu_mem_bytes)} GiB, "
            f"{format_gib(pl.cpu_mem_bytes)} GiB CPU/node, "
            + (f"source {pl.seq_len} / target {pl.tgt_len} tokens" if pl.seq2seq else f"{pl.seq_len} tokens")
            + ("" if pl.family != "generic" else " (GPT-like dims assumed for --params)")
            + "\nparams, states, buffers: formula (meta-device counts, DeepSpeed's estimators); activations: "
            + pl.activations)
    legend = ("GiB per GPU: states = params+grads+optimizer (DeepSpeed's estimate), act = activations, buf = DeepSpeed "
              "buffers, ovh = CUDA context/NCCL/fragmentation;\n  peak = predicted torch.cuda.max_memory_allocated "
              "(the largest phase of a step, not the sum), need = peak + ovh; cost = est. time per token / best")
    rows = pl.candidates if show_all else summary_rows(pl)
    ref = pl.best.time_per_token if pl.best else None
    cols = ["ZeRO", "offload", "prec", "ckpt", "mb", "params", "grads", "optim", "act", "buf", "ovh", "peak",
            "need", "CPU/node", "fits", "cost"]
    table = [cols]
    for c in rows:
        g = c.gpu
        table.append([str(c.zero_stage), c.offload, c.precision, "on" if c.gradient_checkpointing else "-",
                      str(c.micro_batch),
                      *(format_gib(g[k]) for k in ("params", "grads", "optimizer", "activations", "buffers",
                                                   "overhead", "peak", "need")),
                      format_gib(c.cpu_bytes_per_node) + ("" if not c.nvme_bytes_per_node else
                                                          f" +{format_gib(c.nvme_bytes_per_node)}nvme"),
                      "yes" if c.fits else "no", f"{c.time_per_token / ref:.2f}x" if (ref and c.fits) else "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = [head, legend, ""]
    for i, r in enumerate(table):
        lines.append("  ".join(v.rjust(w) if i and j >= 4 else v.ljust(w) for j, (v, w) in enumerate(zip(r, widths))))
    lines.append("")
    lines.append(("best: " if pl.best else "no fit: ") + pl.reason)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# `dsfleet plan`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", help="a dsfleet preset (t5_3b, gpt2_xl, mamba_7b, ...)")
    model.add_argument("--params", help="a parameter count instead (6.9e9, 6.9B): a GPT-like decoder is assumed")
    model.add_argument("--model_name_or_path", "--model-name-or-path", dest="model_name_or_path", metavar="DIR",
                       help="a model dir (its config.json: any transformers architecture; activations measured for "
                       "those without a formula)")
    model.add_argument("--config_name", "--config-name", dest="config_name", metavar="DIR|FILE",
                       help="a transformers config (dir or config.json), as train's --config_name")
    parser.add_argument("--task", choices=("translation", "causal_lm"),
                        help="with a model dir/config: seq2seq (translation) or causal LM (default: the config's)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU (default 80GiB; 24GB, 40GiB ...)")
    parser.add_argument("--cpu-mem", default="512GiB", help="CPU memory per node (default 512GiB)")
    parser.add_argument("--micro-batch", type=int, help="only this micro-batch per GPU (default: try 1..64)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (T5: source length; default: the preset's)")
    parser.add_argument("--tgt-len", type=int, help="T5 target length (default: the preset's)")
    parser.add_argument("--precision", choices=PRECISIONS, help="only this precision (default: all three)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (cost model)")
    parser.add_argument("--no-fused-loss", action="store_true", help="plan for the model's own loss (--fused_loss false)")
    parser.add_argument("--mamba-scan", choices=("kernels", "torch"), default="kernels",
                        help="Mamba: mamba_ssm's fused CUDA scan (default: the GPU image builds it) or transformers' "
                        "pure-PyTorch scan (--mamba_kernels off, or a machine without the kernels)")
    parser.add_argument("--all", action="store_true", help="list every candidate, not the best micro-batch of each")
    parser.add_argument("--json", action="store_true", help="machine-readable: every candidate, bytes as integers")


def run(args) -> int:
    where = args.config_name or args.model_name_or_path
    if not args.preset and not args.params and not where:
        fail("no model given — pass --preset NAME or --params N (e.g. 6.9B), or --model_name_or_path DIR / "
             "--config_name DIR|FILE")
    shape = None
    if where:
        from dsfleet.models import model_config, seq2seq_of
        from dsfleet.planner.shape import shape_for_config
        flag = "--config_name" if args.config_name else "--model_name_or_path"
        cfg = model_config(where, flag=flag)
        name = where.rstrip("/").split("/")[-1]
        shape = shape_for_config(name if name not in ("", "config.json") else cfg.model_type, cfg,
                                 seq2seq_of(cfg, args.task))
    pl = plan(params=args.params, preset=args.preset, shape=shape, gpus=args.gpus, nodes=args.nodes,
              gpu_mem_bytes=parse_size(args.gpu_mem), cpu_mem_bytes=parse_size(args.cpu_mem),
              micro_batch=args.micro_batch, seq_len=args.seq_len, tgt_len=args.tgt_len, precision=args.precision,
              fused_loss=not args.no_fused_loss, grad_accum=args.grad_accum,
              mamba_kernels=args.mamba_scan == "kernels")
    if args.json:
        print(json.dumps(pl.to_json(), indent=1))
    elif pl.best is not None or args.all:
        print(format_plan(pl, show_all=args.all))
    if pl.best is None:
        fail(pl.reason)  # one line: what would fit; exit 2
    return 0
