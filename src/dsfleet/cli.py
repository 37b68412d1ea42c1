"""`dsfleet` console script (also `python -m dsfleet`): one subcommand per module, imported only when used (fast
--help, no torch import)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# subcommand -> module exposing `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "show-config": ("dsfleet.show_config", "print the merged run spec and the DeepSpeed config it produces"),
    "plan": ("dsfleet.planner", "memory plan: which ZeRO stage / offload / micro-batch fits, and the fastest"),
    "render": ("dsfleet.render", "render hostfiles, Slurm scripts and Kubernetes jobs from a run spec"),
    "preflight": ("dsfleet.preflight", "check every host of a hostfile before a job burns cluster hours"),
    "prepare": ("dsfleet.prepare", "tokenize a run's corpus once into the token cache (memory-mapped shards)"),
    "bench": ("dsfleet.bench", "throughput benchmark: dsfleet vs HF Trainer + DeepSpeed on the same config"),
    "train": ("dsfleet.train", "the training entry point (same as python -m dsfleet.train; --help lists its flags)"),
}


class UsageError(Exception):
    """Bad input: printed as one line `dsfleet: <what is wrong> — <what to do>`, exit code 2."""


def fail(message: str) -> NoReturn:
    raise UsageError(message)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming the problem and the fix (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D401
        print(f"{self.prog}: {message} — see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def version() -> str:
    """dsfleet's version: the package's own `__version__` (pyproject.toml's version says the same; a test checks)."""
    from dsfleet import __version__
    return __version__


def main(argv: list[str] | None = None, prog: str = "dsfleet") -> int:
    """`prog` is how the user called it (`dsfleet`, `python -m dsfleet`): usage lines and --help say that."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-V", "--version"):
        print(f"dsfleet {version()}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
        out = sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"dsfleet: unknown command {argv[0]!r} — use one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        print(f"usage: {prog} COMMAND [options]  |  {prog} --version\n\n" + (__doc__ or "")
              + "\n\ncommands:\n" + "\n".join(lines), file=out)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    if name == "train":  # the trainer owns its whole argument list (run_translation.py flags)
        return int(module.main(rest, prog=f"{prog} train") or 0)
    parser = OneLineParser(prog=f"{prog} {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UsageError as e:
        print(f"dsfleet {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m dsfleet.cli` runs this file as __main__, a second copy of this module: the subcommands raise
    # dsfleet.cli.UsageError, so dispatch through the imported module, whose class that is.
    from dsfleet import cli as _cli
    sys.exit(_cli.main())
