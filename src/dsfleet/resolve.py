"""The one path from a run spec and the hardware it runs on to what the run does.

`resolve(spec, source, hardware)` decides, once, the ZeRO stage, offload, activation checkpointing and
precision actually used (the *effective spec*, what spec.yaml records and rendered files carry) and the DeepSpeed
config handed to DeepSpeed. train, render, show-config, plan and bench all call it; nothing else derives a stage
or a DeepSpeed config. The hardware is what the launch says (render's flags) or the live cluster (train), never
an environment variable that may be absent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dsfleet.cli import fail

CPU_PLANNING_GPU_MEM = 80 * 2**30  # what `zero auto` plans for when there is no GPU to ask (and no --gpu_mem_bytes)


@dataclass(frozen=True)
class Hardware:
    """Where a run runs: its topology and the memory of one device and of one host."""
    nodes: int
    gpus_per_node: int  # ranks per node
    gpu_mem_bytes: int
    cpu_mem_bytes: int  # one host's memory, shared by its ranks
    cpu: bool = False  # CPU ranks (DeepSpeed's CPU accelerator, gloo)
    fp16: bool = True  # the accelerator trains in fp16
    mamba_kernels: bool | None = None  # a Mamba's scan as this process decided it (fastpath.MambaScan); None:
    #                                    planned from elsewhere (dsfleet plan, render), the kernels expected on GPUs

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def live(cls, world_size: int, accel, gpu_mem_bytes: int | None = None, mamba_scan=None) -> "Hardware":
        """The machine this process runs on; with the process group up, ranks per node are counted from the
        ranks' host names (not from an env var). `mamba_scan`: fastpath.choose_mamba_scan's answer, carried."""
        import psutil
        import torch
        per_node = _ranks_per_node(world_size)
        cpu = accel.device_name() == "cpu"
        gpu = torch.cuda.get_device_properties(0).total_memory if not cpu else CPU_PLANNING_GPU_MEM
        return cls(nodes=max(1, world_size // per_node), gpus_per_node=per_node, gpu_mem_bytes=gpu_mem_bytes or gpu,
                   cpu_mem_bytes=psutil.virtual_memory().total, cpu=cpu, fp16=bool(accel.is_fp16_supported()),
                   mamba_kernels=mamba_scan.kernels if mamba_scan is not None else None)


def _ranks_per_node(world_size: int) -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        import socket
        hosts = [None] * world_size
        dist.all_gather_object(hosts, socket.gethostname())
        return max(hosts.count(h) for h in set(hosts))
    return world_size


@dataclass
class Resolved:
    spec: Any  # the effective RunSpec: stage, offload, checkpointing and precision as used
    ds_config: dict[str, Any]
    zero_stage: int
    hardware: Hardware
    notes: list[str] = field(default_factory=list)  # one line each, said by rank 0 (what was decided and why)


def resolve(spec, source, hardware: Hardware, total_steps: int | None = None) -> Resolved:
    """The effective spec and the DeepSpeed config. `total_steps` (the run's optimizer steps, known once the data
    is) fills a user config's scheduler "auto" values; None in a dry run or render (then --max_steps, else 1)."""
    from dsfleet import dsconfig
    spec = spec.model_copy(deep=True)
    notes: list[str] = []
    world = hardware.world_size
    steps = total_steps or (spec.max_steps if spec.max_steps > 0 else 1)
    if spec.deepspeed:
        user = dsconfig.read_user_config(spec.deepspeed)
        config = dsconfig.fill_auto(user, spec, world_size=world, hidden_size=source.hidden_size, total_steps=steps)
        stage = dsconfig.zero_stage_of(config)
        zero = config.get("zero_optimization", {})
        _set(spec, zero=stage,
             offload_optimizer=_device(zero.get("offload_optimizer")), offload_param=_device(zero.get("offload_param")))
        heavier = _heavier_stage_warning(spec, stage, hardware)
        if heavier:
            notes.append(f"warning: {heavier}")
    else:
        if spec.zero == "auto":
            choice = _planner_choice(spec, hardware)
            if choice is None or not choice.fits:
                fail(f"no ZeRO stage/offload fits {source.name} on {world} x {hardware.gpu_mem_bytes / 2**30:.0f} GiB "
                     "— run `dsfleet plan` to see what would")
            _set(spec, zero=choice.zero_stage, offload_optimizer=choice.offload_optimizer,
                 offload_param=choice.offload_param,
                 gradient_checkpointing=spec.gradient_checkpointing or choice.gradient_checkpointing)
            notes.append(f"zero auto -> ZeRO-{choice.zero_stage}, offload optimizer {choice.offload_optimizer}, "
                         f"params {choice.offload_param}, gradient checkpointing {spec.gradient_checkpointing}")
        stage = int(spec.zero)
        config = dsconfig.generate(spec, world_size=world, hidden_size=source.hidden_size, zero_stage=stage,
                                   on_cpu=hardware.cpu)
    config, precision_note = dsconfig.check(config, world_size=world, on_cpu=hardware.cpu,
                                            accelerator_fp16=hardware.fp16)
    if precision_note:
        notes.append(precision_note)
    _set(spec, fp16=bool(config.get("fp16", {}).get("enabled")), bf16=bool(config.get("bf16", {}).get("enabled")))
    spec.cuda_graphs = _cuda_graphs(spec, source, hardware, stage)
    return Resolved(spec, config, stage, hardware, notes)


def _cuda_graphs(spec, source, hardware: Hardware, stage: int) -> str:
    """Whether the compiled blocks replay as CUDA graphs: "on" or "off", decided here once. A CUDA graph replays
    fixed kernels on fixed addresses, so it needs compiled blocks on a GPU and a step that calls each block once
    forward and once backward: no gradient checkpointing (its recompute calls the block again inside backward),
    not ZeRO-3 (its hooks gather and free parameters around each block), not Mamba (its scan kernels are
    custom autograd functions the graph would break on), and batches of one shape: causal LMs' packed blocks or
    synthetic rows, not seq2seq rows padded per batch (each new length would record new graphs)."""
    why_not = ("it needs --compile true" if not spec.compile else
               "it needs CUDA GPUs" if hardware.cpu else
               "not with ZeRO-3" if stage == 3 else
               "not with gradient checkpointing" if spec.gradient_checkpointing else
               "not for Mamba" if getattr(source, "family", None) == "mamba" else
               "seq2seq batches are padded to each batch's longest row (a new length each step); with "
               "--synthetic_data every batch has the same shape" if source.seq2seq and not spec.synthetic_data else None)
    if spec.cuda_graphs == "on" and why_not:
        fail(f"--cuda_graphs on: {why_not} — use --cuda_graphs auto, which turns it on where it applies")
    return "off" if why_not or spec.cuda_graphs == "off" else "on"


def _set(spec, **values) -> None:
    """Assign in an order the spec's validator accepts (the stage before an offload that needs it)."""
    for key in ("zero", *[k for k in values if k != "zero"]):
        if key in values:
            setattr(spec, key, values[key])


def _device(block) -> str:
    return block.get("device", "none") if isinstance(block, dict) else "none"


def plan(spec, hardware: Hardware):
    """The planner's view of exactly this spec on this hardware (None when its model cannot be read)."""
    from dsfleet import planner
    import dataclasses
    return planner.plan_for_spec(spec, dataclasses.replace(hardware, gpu_mem_bytes=spec.gpu_mem_bytes or
                                                           hardware.gpu_mem_bytes))


def _planner_choice(spec, hardware: Hardware):
    pl = plan(spec, hardware)
    return None if pl is None else pl.best


def _heavier_stage_warning(spec, stage: int, hardware: Hardware) -> str | None:
    if hardware.cpu or int(os.environ.get("RANK", "0")) != 0:
        return None
    from dsfleet import planner
    pl = plan(spec, hardware)
    return planner.check_heavier_stage(pl, stage) if pl is not None else None


def describe(resolved: Resolved, source) -> str:
    """The dry run's report: the effective spec, the DeepSpeed config and the memory plan."""
    import json

    from dsfleet.spec import spec_to_yaml
    text = "# run spec\n" + spec_to_yaml(resolved.spec)
    text += "\n# DeepSpeed config\n" + json.dumps(resolved.ds_config, indent=2)
    pl = plan(resolved.spec, resolved.hardware)
    if pl is None:
        return text + f"\n# memory plan\n(no plan: the model of {source.name} has no readable T5/GPT-2/Mamba config)"
    from dsfleet import planner
    return text + "\n# memory plan\n" + planner.format_plan(pl)
