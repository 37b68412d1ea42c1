"""`dsfleet show-config [train flags]`: the effective run spec (preset < YAML < flags, with what the resolver
decided) and the DeepSpeed config it produces, without starting anything — what a run would do, checked before
it spends a GPU."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=1, help="ranks the run will have (batch arithmetic)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the ranks are spread over (planning)")
    parser.add_argument("--cpu", action="store_true", help="as the CPU accelerator would run it")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="the train flags, e.g. --preset t5_3b --zero 3")


def run(args) -> int:
    from dsfleet.models import resolve_source
    from dsfleet.resolve import CPU_PLANNING_GPU_MEM, Hardware, resolve
    from dsfleet.spec import parse_args, spec_to_yaml
    from dsfleet.cli import fail

    spec = parse_args([a for a in args.train_args if a != "--"], prog="dsfleet show-config")
    source = resolve_source(spec)
    if args.world_size < 1 or args.nodes < 1 or args.world_size % args.nodes:
        fail(f"--world-size {args.world_size} over --nodes {args.nodes} is not a whole number of ranks per node — "
             "pass a world size that the node count divides")
    hardware = Hardware(nodes=args.nodes, gpus_per_node=args.world_size // args.nodes,
                        gpu_mem_bytes=spec.gpu_mem_bytes or CPU_PLANNING_GPU_MEM, cpu_mem_bytes=2**40, cpu=args.cpu,
                        fp16=not args.cpu)
    run = resolve(spec, source, hardware)
    print("# run spec (preset < --config YAML < flags, as resolved)")
    print(spec_to_yaml(run.spec), end="")
    print(f"# DeepSpeed config (ZeRO-{run.zero_stage}, world size {args.world_size})")
    print(json.dumps(run.ds_config, indent=2))
    return 0
