"""`dsfleet prepare [train flags]`: tokenize a run's corpus into the token cache ahead of the job — one step
before the ranks start (a Slurm script's first srun, a Kubernetes init step), so no rank waits on it and 8 ranks
never race on it. A run with the same data, tokenizer and lengths then reuses the entry (`token cache reused`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=1,
                        help="ranks the run will have (checks that the data fills one global micro batch)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="the train flags after --, e.g. -- --preset gpt2_tiny --from_scratch --train_file big.txt")


def run(args) -> int:
    from dsfleet import token_cache
    from dsfleet.cli import fail
    from dsfleet.models import resolve_source
    from dsfleet.spec import parse_args

    spec = parse_args([a for a in args.train_args if a != "--"], prog="dsfleet prepare")
    if args.world_size < 1:
        fail(f"--world-size {args.world_size} is not a rank count — pass 1 or more")
    source = resolve_source(spec)
    if spec.synthetic_data or spec.streaming:
        why = "--synthetic_data makes its batches" if spec.synthetic_data else "--streaming tokenizes its stream"
        print(f"dsfleet prepare: {why} on the fly — nothing to prepare")
        return 0
    from dsfleet.data import check_block_size
    check_block_size(spec, source.max_positions)
    out = Path(spec.output_dir) if spec.output_dir else None  # a run dir's own tokenizer (a resume) is used
    token_cache.prepare_once(spec, source, out, args.world_size, say=lambda line: print(f"dsfleet prepare: {line}"))
    return 0
