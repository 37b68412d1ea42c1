"""`python -m dsfleet ...` is the `dsfleet` console script, for a venv whose bin/ is not on PATH (and for
`srun python -m dsfleet ...`): the same subcommands, flags and exit codes; usage lines say `python -m dsfleet`."""
import sys

from dsfleet import cli

if __name__ == "__main__":
    sys.exit(cli.main(prog="python -m dsfleet"))
