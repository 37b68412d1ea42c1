"""The run directory: refused when it holds another run (unless --overwrite_output_dir or a resume asks), and
written only once every check of the run has passed — the spec actually used, the DeepSpeed config handed to
DeepSpeed, and a tokenizer trained for the run. Until create() nothing exists in it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from dsfleet.cli import fail

# what a dsfleet run writes; --overwrite_output_dir removes only these
ARTIFACTS = ("checkpoints", "metrics.jsonl", "tb", "final", "plot.png", "tokenizer", "spec.yaml", "ds_config.json",
             "generated_predictions.txt")


def checked(spec) -> Path | None:
    """The output dir of the spec, or one line saying why it cannot be used (None: a dry run, which writes
    nothing, given none). Writes nothing."""
    if not spec.output_dir:
        if spec.dry_run:
            return None
        fail("--output_dir is required — pass a directory for metrics and checkpoints")
    out = Path(spec.output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {out} is a file — pass a directory")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not spec.overwrite_output_dir and not spec.resume_from_checkpoint and not spec.dry_run:
        fail(f"output dir {out} exists and is not empty — pass --overwrite_output_dir to replace it, or "
             "--resume_from_checkpoint auto to continue it")
    if spec.overwrite_output_dir and spec.resume_from_checkpoint:
        fail("--overwrite_output_dir and --resume_from_checkpoint contradict each other — choose one")
    return out


def create(out: Path, spec, ds_config: dict, tokenizer=None) -> None:
    """Rank 0, after every check: the dir, spec.yaml, ds_config.json and (when trained here) tokenizer/."""
    out.mkdir(parents=True, exist_ok=True)
    if spec.overwrite_output_dir:  # asked for: remove only what a previous dsfleet run wrote
        for name in ARTIFACTS:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    from dsfleet.spec import spec_to_yaml
    (out / "spec.yaml").write_text(spec_to_yaml(spec))
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2, default=str) + "\n")  # what DeepSpeed was given
    if tokenizer is not None and getattr(tokenizer, "trained_here", False) and not (out / "tokenizer").is_dir():
        tokenizer.save_pretrained(out / "tokenizer")
