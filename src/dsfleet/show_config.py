"""`dsfleet show-config [train flags]`: the merged run spec (preset < YAML < flags) and the DeepSpeed config
it produces, without starting anything — what a run would do, checked before it spends a GPU."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=1, help="ranks the run will have (batch arithmetic)")
    parser.add_argument("--cpu", action="store_true", help="as the CPU accelerator would run it")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="the train flags, e.g. --preset t5_3b --zero 3")


def run(args) -> int:
    from dsfleet.spec import parse_args, spec_to_yaml
    from dsfleet.train import build_ds_config, resolve_model_source

    spec = parse_args([a for a in args.train_args if a != "--"], prog="dsfleet show-config")
    source = resolve_model_source(spec)

    class _Accel:  # which precisions the target accelerator supports
        @staticmethod
        def is_fp16_supported():
            return not args.cpu

    ds_config, stage = build_ds_config(spec, source, args.world_size, args.cpu, _Accel)
    print("# run spec (preset < --config YAML < flags)")
    print(spec_to_yaml(spec), end="")
    print(f"# DeepSpeed config (ZeRO-{stage}, world size {args.world_size})")
    print(json.dumps(ds_config, indent=2))
    return 0
