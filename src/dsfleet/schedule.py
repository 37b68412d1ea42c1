"""The learning-rate schedule of a run whose DeepSpeed config has no `scheduler` block: transformers'
get_scheduler (what HF Trainer uses) for --lr_scheduler_type with --warmup_steps, stepped by DeepSpeed once per
optimizer step. A DeepSpeed `scheduler` block, when present, is DeepSpeed's own and this is not used."""
from __future__ import annotations

# --lr_scheduler_type -> transformers' scheduler name; "constant" keeps dsfleet's warmup when --warmup_steps is set
_HF_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def client_scheduler(spec, total_steps: int, ds_config: dict):
    """A factory DeepSpeed calls with its optimizer, or None when the DeepSpeed config schedules the LR itself."""
    if "scheduler" in ds_config:
        return None
    from transformers import get_scheduler
    name = _HF_NAMES[spec.lr_scheduler_type]
    return lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=spec.warmup_steps,
                                           num_training_steps=max(total_steps, 1))


def describe(spec, total_steps: int, ds_config: dict) -> dict:
    """What a checkpoint records of the schedule, so a resume can say what changed."""
    if "scheduler" in ds_config:
        return {"deepspeed_scheduler": ds_config["scheduler"]}
    return {"type": spec.lr_scheduler_type, "learning_rate": spec.learning_rate, "warmup_steps": spec.warmup_steps,
            "total_steps": total_steps}
