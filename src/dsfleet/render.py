"""`dsfleet render`: the launch files of a run, rendered from one run spec with Jinja2 (StrictUndefined).

Why it exists: a DeepSpeed job is launched through a hostfile (ssh + the deepspeed launcher), a Slurm batch script or
a Kubernetes Job, and hand-written copies of those drift apart — different flags, a stale DeepSpeed config, NCCL knobs
set in one place and not another. Here every file starts the same `python -m dsfleet.train` with the same validated
run spec (preset < flags), the same DeepSpeed config (what `dsfleet show-config` prints) and the same fabric knobs,
from templates in dsfleet/templates/ that share their pieces through Jinja imports and includes.

`dsfleet render --preset NAME --target hostfile|slurm|k8s|mpijob|all --nodes N --gpus-per-node G [-- TRAIN FLAGS]`
writes OUT/hostfiles/NAME, OUT/slurm/NAME.sbatch, OUT/k8s/NAME.yaml (OUT/k8s/mpijob/NAME.yaml for the Kubeflow
flavour). `dsfleet render --all` regenerates the committed set (COMMITTED below); a test keeps it byte-identical.
docs/launching.md says how each backend launches, the env each sets and the preemption/requeue flow.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from dsfleet.cli import fail

TARGETS = ("hostfile", "slurm", "k8s", "mpijob")
ALL_TARGETS = ("hostfile", "slurm", "k8s")  # --target all; the MPIJob flavour only on request
MAX_PER_NODE = 16  # no node has more GPUs than this
MAX_NODES = 4096
DEFAULT_IMAGE = "dsfleet:sm90"  # what `make image CUDA_ARCH=9.0` tags for H100/H200 (docker/build-image.sh)
IMAGE_UID = 1001  # the image's unprivileged user (docker/Dockerfile USER_UID; 1000 is ubuntu:24.04's own user); pods run as it
RUNS_MOUNT = "/checkpoints"  # the PVC in Kubernetes pods: run dirs and the HF cache
CONFIG_MOUNT = "/etc/dsfleet"  # the ConfigMap: ds_config.json and the pod launcher
DEFAULT_PORT = 29500
# flags the launch files own: each run dir and its resume request are set at launch, per backend
OWNED_FLAGS = ("--output_dir", "--overwrite_output_dir", "--resume_from_checkpoint", "--local_rank", "--local-rank")
TEMPLATES = {"hostfile": "hostfile.j2", "slurm": "slurm.sbatch.j2", "k8s": "k8s.yaml.j2", "mpijob": "mpijob.yaml.j2"}


@dataclass(frozen=True)
class Launch:
    """One set of launch files: which preset, how big, and the run spec flags (preset defaults < these flags)."""
    name: str
    preset: str
    nodes: int
    per_node: int  # GPUs per node (CPU ranks per node with cpu=True)
    train_flags: tuple[str, ...] = ()
    targets: tuple[str, ...] = ALL_TARGETS
    cpu: bool = False
    time: str = "24:00:00"
    signal_lead: int = 300  # s before the time limit: reach the next step and save a checkpoint
    image: str = DEFAULT_IMAGE
    partition: str | None = None
    cpus_per_task: int | None = None
    container: str = "none"
    master_port: int = DEFAULT_PORT
    storage: str | None = None
    hosts: tuple[str, ...] | None = None


# The committed set (`dsfleet render --all`). Sizes: t5_small fits one GPU; t5_3b and gpt2_xl one 8-GPU node
# (ZeRO-2, bf16); t5_11b two 8-GPU nodes (ZeRO-3: 11B parameters do not fit replicated); mamba7b one node of 4 GPUs
# with ZeRO-2 in bf16 as the seed ran it. docs/launching.md has the table.
_TRANSLATION = ("--dataset_name", "wmt16", "--dataset_config", "ro-en", "--do_train", "--do_eval",
                "--predict_with_generate")
_TEXT = ("--dataset_name", "wikitext", "--dataset_config", "wikitext-103-raw-v1", "--do_train", "--do_eval")
_CKPT = ("--save_steps", "500", "--save_total_limit", "2", "--logging_steps", "10", "--eval_steps", "1000")
COMMITTED = (
    Launch("t5_small", "t5_small", 1, 1, ("--model_name_or_path", "t5-small", *_TRANSLATION, "--bf16", "--zero", "2",
                                          "--per_device_train_batch_size", "32", "--num_train_epochs", "1", *_CKPT),
           targets=("hostfile", "slurm"), time="04:00:00", storage="20Gi"),
    Launch("t5_3b", "t5_3b", 1, 8, ("--model_name_or_path", "t5-3b", *_TRANSLATION, "--bf16", "--zero", "2",
                                    "--per_device_train_batch_size", "8", "--num_train_epochs", "1", *_CKPT),
           storage="200Gi"),
    Launch("t5_11b", "t5_11b", 2, 8, ("--model_name_or_path", "t5-11b", *_TRANSLATION, "--bf16", "--zero", "3",
                                      "--per_device_train_batch_size", "4", "--gradient_checkpointing",
                                      "--num_train_epochs", "1", *_CKPT),
           targets=("hostfile", "slurm"), time="48:00:00", signal_lead=600, storage="800Gi"),
    Launch("gpt2_xl", "gpt2_xl", 1, 8, ("--model_name_or_path", "gpt2-xl", *_TEXT, "--bf16", "--zero", "2",
                                        "--per_device_train_batch_size", "8", "--num_train_epochs", "1", *_CKPT),
           targets=("hostfile", "slurm"), storage="100Gi"),
    Launch("mamba7b", "mamba7b", 1, 4, ("--from_scratch", *_TEXT, "--bf16", "--zero", "2",
                                         "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8",
                                         "--gradient_checkpointing", "--max_steps", "20000", *_CKPT),
           time="48:00:00", signal_lead=600, storage="300Gi"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.error = _one_line_error(parser)  # bad input is one line, exit 2, like every dsfleet command
    parser.allow_abbrev = False  # --gpu is not --gpus-per-node
    parser.add_argument("--preset", help="model preset (t5_3b, mamba7b, t5_tiny, ...)")
    parser.add_argument("--target", help="hostfile | slurm | k8s | mpijob (Kubeflow MPIJob) | all (the first three)")
    parser.add_argument("--nodes", help="nodes (Kubernetes: pods)")
    parser.add_argument("--gpus-per-node", help=f"GPUs per node, 1-{MAX_PER_NODE} (with --cpu: CPU ranks per node)")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks (DS_ACCELERATOR=cpu, gloo): no GPU requests")
    parser.add_argument("--image", help=f"container image (default {DEFAULT_IMAGE})")
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    parser.add_argument("--time", help="Slurm time limit HH:MM:SS (default 24:00:00)")
    parser.add_argument("--signal-lead", help="seconds before the time limit Slurm sends USR1 (checkpoint, requeue); "
                        "also the pods' termination grace period (default 300)")
    parser.add_argument("--cpus-per-task", help="CPUs per rank (default 8, with --cpu 1)")
    parser.add_argument("--container", help="Slurm: none | pyxis | apptainer (default none; DSFLEET_CONTAINER "
                        "overrides it at submit time)")
    parser.add_argument("--master-port", help=f"rank 0's rendezvous port in Kubernetes (default {DEFAULT_PORT})")
    parser.add_argument("--storage", help="size of the Kubernetes PVC for run dirs (default 500Gi, with --cpu 1Gi)")
    parser.add_argument("--hosts", help="hostfile: comma-separated host names (default node-0,node-1,...)")
    parser.add_argument("--hostfile", help="take hosts and GPUs per host from this DeepSpeed hostfile (validated)")
    parser.add_argument("--name", help="file name and job name stem (default: the preset as given)")
    parser.add_argument("--out", default=".", help="output root: files go to OUT/slurm, OUT/k8s, OUT/hostfiles "
                        "(default: the current directory)")
    parser.add_argument("--all", action="store_true", help="regenerate the committed set (slurm/, k8s/, hostfiles/)")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER,
                        help="after --: train flags of the run spec, e.g. -- --from_scratch --zero 3 --bf16")


def _one_line_error(parser: argparse.ArgumentParser):
    def error(message: str):
        print(f"{parser.prog}: {message} — see `{parser.prog} --help`", file=sys.stderr)
        sys.exit(2)
    return error


def run(args) -> int:
    out = Path(args.out)
    if args.all:
        given = [f"--{k.replace('_', '-')}" for k in ("preset", "target", "nodes", "gpus_per_node", "image", "partition",
                                                      "time", "signal_lead", "cpus_per_task", "container", "master_port",
                                                      "storage", "hosts", "hostfile", "name") if getattr(args, k)]
        if given or args.cpu or _flags(args):
            fail(f"--all renders the committed set with its own sizes and flags; {' '.join(given) or 'train flags'} "
                 "cannot apply — drop them, or render one preset without --all")
        files = {}
        for launch in COMMITTED:
            files.update(render(launch, launch.targets))
    else:
        launch, targets = launch_from_args(args)
        files = render(launch, targets)
    for rel, text in files.items():
        _write(out / rel, text)
        print(out / rel)
    return 0


def _flags(args) -> list[str]:
    flags = list(args.train_flags or [])
    return flags[1:] if flags[:1] == ["--"] else flags


def launch_from_args(args) -> tuple[Launch, tuple[str, ...]]:
    """The command line as a Launch, every value checked (one line naming the fix when bad)."""
    if not args.preset:
        fail("no preset — pass --preset NAME (e.g. t5_3b), or --all for the committed set")
    if not args.target:
        fail(f"no target — pass --target {'|'.join(TARGETS)}|all")
    if args.target not in (*TARGETS, "all"):
        fail(f"unknown target {args.target!r} — use one of: {', '.join(TARGETS)}, all")
    targets = ALL_TARGETS if args.target == "all" else (args.target,)
    from dsfleet.presets import get_preset
    get_preset(args.preset)  # an unknown preset is the first thing to say
    name = (args.name or args.preset).replace("-", "_").lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]{0,39}", name):
        fail(f"name {name!r} cannot name files and Kubernetes objects — use up to 40 of a-z, 0-9 and _ (--name)")
    hosts = None
    if args.hostfile:  # hosts and slots from a validated hostfile; --gpus-per-node, when given, is what each host has
        has = _positive(args.gpus_per_node, "--gpus-per-node", MAX_PER_NODE) if args.gpus_per_node else None
        hosts, per_node = _read_hostfile(args.hostfile, has)
        nodes = len(hosts)
        if args.nodes is not None and _positive(args.nodes, "--nodes", MAX_NODES) != nodes:
            fail(f"--hostfile {args.hostfile} lists {nodes} host(s) but --nodes is {args.nodes} — drop --nodes or "
                 "make them agree")
        if args.hosts:
            fail("--hosts and --hostfile both name the hosts — pass one of them")
    else:
        if args.nodes is None or args.gpus_per_node is None:
            fail("sizes missing — pass --nodes N and --gpus-per-node G (or --hostfile FILE)")
        nodes = _positive(args.nodes, "--nodes", MAX_NODES)
        per_node = _positive(args.gpus_per_node, "--gpus-per-node", MAX_PER_NODE)
        if args.hosts:
            from dsfleet.hostfile import parse_hostfile  # the one validator of host names and duplicates
            listed = [h.strip() for h in args.hosts.split(",")]
            hosts = tuple(e.host for e in parse_hostfile("".join(f"{h} slots={per_node}\n" for h in listed), "--hosts"))
            if len(hosts) != nodes:
                fail(f"--hosts names {len(hosts)} host(s) but --nodes is {nodes} — name one host per node")
    time = args.time or "24:00:00"
    lead = _positive(args.signal_lead, "--signal-lead", 24 * 3600) if args.signal_lead else 300
    launch = Launch(name=name, preset=args.preset, nodes=nodes, per_node=per_node, train_flags=tuple(_flags(args)),
                    targets=targets, cpu=args.cpu, time=time, signal_lead=lead,
                    image=args.image or DEFAULT_IMAGE, partition=args.partition,
                    cpus_per_task=_positive(args.cpus_per_task, "--cpus-per-task", 1024) if args.cpus_per_task else None,
                    container=args.container or "none",
                    master_port=_positive(args.master_port, "--master-port", 65535) if args.master_port else DEFAULT_PORT,
                    storage=args.storage, hosts=hosts)
    return launch, targets


def _positive(text, flag: str, most: int) -> int:
    try:
        value = int(str(text))
    except ValueError:
        fail(f"{flag} {text!r} is not a whole number — pass e.g. {flag} 1")
    if value < 1:
        fail(f"{flag} {value}: needs at least 1 — pass {flag} 1 or more")
    if value > most:
        what = "no node has more than 16 GPUs" if flag == "--gpus-per-node" else f"at most {most}"
        fail(f"{flag} {value} is too large ({what}) — use more nodes with fewer per node" if flag == "--gpus-per-node"
             else f"{flag} {value} is too large ({what})")
    return value


def _read_hostfile(path: str, gpus: int | None) -> tuple[tuple[str, ...], int]:
    """Hosts and their common slot count from a DeepSpeed hostfile, through dsfleet.hostfile's validator (syntax,
    duplicates, slot counts, slots over the GPUs a host has), which names the line of each problem."""
    from dsfleet.hostfile import read_hostfile
    entries = read_hostfile(path, gpus)
    slots = {e.slots for e in entries}
    if len(slots) != 1:
        fail(f"{path}: hosts have different slot counts ({', '.join(map(str, sorted(slots)))}) — the launch files run "
             "the same number of ranks on every node; use one count")
    per_node = slots.pop()
    if per_node > MAX_PER_NODE:
        fail(f"{path}: slots={per_node} is more than a node's GPUs (max {MAX_PER_NODE}) — use more hosts with fewer "
             "slots each")
    return tuple(e.host for e in entries), per_node


# ------------------------------------------------------------------------------------------------ rendering


def check(launch: Launch) -> None:
    """Values a template would otherwise turn into a broken file."""
    if not re.fullmatch(r"(\d+-)?\d{1,3}:[0-5]\d:[0-5]\d", launch.time):
        fail(f"--time {launch.time!r} is not HH:MM:SS — pass e.g. --time 24:00:00")
    if launch.signal_lead >= _seconds(launch.time):
        fail(f"--signal-lead {launch.signal_lead} s is not shorter than --time {launch.time} — the checkpoint signal "
             "would come before the job starts; use a shorter lead or a longer time")
    if launch.partition is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", launch.partition):
        fail(f"--partition {launch.partition!r} is not a partition name — use letters, digits, _ . -")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*", launch.image):
        fail(f"--image {launch.image!r} is not an image reference — pass e.g. registry.example.com/dsfleet:sm90")
    if launch.container not in ("none", "pyxis", "apptainer"):
        fail(f"--container {launch.container!r} is not a container runtime — use none, pyxis or apptainer")
    if launch.storage is not None and not re.fullmatch(r"[1-9]\d*(Mi|Gi|Ti)", launch.storage):
        fail(f"--storage {launch.storage!r} is not a size — pass e.g. --storage 500Gi")
    owned = [f for f in launch.train_flags if f.split("=")[0] in OWNED_FLAGS]
    if owned:
        fail(f"{owned[0].split('=')[0]} is set by the launch files (a run dir per job that restarts resume) — drop it")


def _seconds(time: str) -> int:
    days, _, hms = time.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days) if days else 0) * 86400 + h * 3600 + m * 60 + s


def resolve(launch: Launch) -> SimpleNamespace:
    """Everything the templates read: the effective spec, the DeepSpeed config, the commands, the sizes — from the
    one resolver (dsfleet.resolve), for the hardware the launch names."""
    from dsfleet import dsconfig
    from dsfleet.models import resolve_source
    from dsfleet.presets import get_preset
    from dsfleet.resolve import CPU_PLANNING_GPU_MEM, Hardware
    from dsfleet.resolve import resolve as resolve_run
    from dsfleet.runtime import EXIT_PREEMPTED
    from dsfleet.spec import parse_args

    check(launch)
    preset = get_preset(launch.preset)
    spec = parse_args(["--preset", preset.name, *launch.train_flags], prog="dsfleet render")
    source = resolve_source(spec)
    hardware = Hardware(nodes=launch.nodes, gpus_per_node=launch.per_node,
                        gpu_mem_bytes=spec.gpu_mem_bytes or CPU_PLANNING_GPU_MEM, cpu_mem_bytes=RENDER_HOST_MEM,
                        cpu=launch.cpu, fp16=not launch.cpu)
    run = resolve_run(spec, source, hardware)
    flags = _effective_flags(list(launch.train_flags), spec, run.spec)
    words = ["--preset", preset.name, *flags]
    # k8s pods read the DeepSpeed config from the ConfigMap: DeepSpeed's own decisions (stage, offload, buckets)
    # live only there, the training values the flags carry are "auto" in it — one source for each value
    k8s_words = ["--preset", preset.name, *_without_all(flags, DS_CONFIG_FLAGS),
                 "--deepspeed", f"{CONFIG_MOUNT}/ds_config.json"]
    job_name = "dsfleet-" + launch.name.replace("_", "-")
    r = SimpleNamespace(
        name=launch.name, preset=preset.name, nodes=launch.nodes, per_node=launch.per_node,
        world_size=hardware.world_size, cpu=launch.cpu, zero_stage=run.zero_stage, precision=run.spec.precision,
        job_name=job_name, time=launch.time,
        signal_lead=launch.signal_lead, partition=launch.partition, image=launch.image, container=launch.container,
        cpus_per_task=launch.cpus_per_task or (1 if launch.cpu else 8), master_port=launch.master_port,
        storage=launch.storage or ("1Gi" if launch.cpu else "500Gi"), memory=f"{_pod_memory_gib(run, source)}Gi",
        shm="256Mi" if launch.cpu else "16Gi", backoff_limit=3 * launch.nodes,
        hosts=launch.hosts or tuple(f"node-{i}" for i in range(launch.nodes)),
        train_words=words, train_lines=_group(words), k8s_args=k8s_words,
        k8s_output_dir=f"{RUNS_MOUNT}/{job_name}",
        ds_config_json=json.dumps(dsconfig.with_spec_autos(run.ds_config), indent=2),
    )
    assert EXIT_PREEMPTED == 75, "templates/_supervise.j2 and the Job's podFailurePolicy say 75"
    return r


RENDER_HOST_MEM = 2**40  # host memory a rendered job plans with when the site names none (offload fits)
# flags whose values a DeepSpeed config holds: dropped from a command that is handed the config file
DS_CONFIG_FLAGS = ("--zero", "--offload_optimizer", "--offload_param", "--nvme_path", "--reduce_bucket_size",
                   "--allgather_bucket_size", "--stage3_prefetch_bucket_size", "--stage3_param_persistence_threshold",
                   "--stage3_max_live_parameters", "--stage3_max_reuse_distance", "--overlap_comm", "--reduce_scatter",
                   "--deepspeed")
# what the resolver may decide for a spec (zero auto): carried into the rendered flags when it changed them
RESOLVED_KEYS = ("zero", "offload_optimizer", "offload_param", "gradient_checkpointing")


def _effective_flags(flags: list[str], asked, effective) -> list[str]:
    """The train flags with what the resolver decided (a stage for `--zero auto`, the planner's offload and
    activation checkpointing), so the file says what it runs."""
    for key in RESOLVED_KEYS:
        value = getattr(effective, key)
        if value == getattr(asked, key):
            continue
        flags = _without(flags, f"--{key}")
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return flags


def _pod_memory_gib(run, source) -> int:
    """A pod's memory limit: the planner's host bytes for offload plus, per rank, the process itself (CUDA
    context, transformers, DeepSpeed: ~6 GiB measured on the H200 runs) and one 16-bit copy of the model while it
    loads (none under ZeRO-3: partitioned at construction). CPU pods: 2 GiB a rank."""
    per_node = run.hardware.gpus_per_node
    if run.hardware.cpu:
        return 2 * per_node
    from dsfleet import models
    try:
        n_params = models.count_parameters(source.preset)
    except Exception:  # a model dir whose config cannot be built on the meta device: the old fixed figure
        return 32 * per_node
    loading = 0 if run.zero_stage == 3 else 2 * n_params
    offload = 0
    if (run.spec.offload_optimizer, run.spec.offload_param) != ("none", "none"):
        from dsfleet import resolve as resolver
        pl = resolver.plan(run.spec, run.hardware)
        same = [c for c in (pl.candidates if pl is not None else []) if (c.zero_stage, c.offload_optimizer,
                c.offload_param) == (run.zero_stage, run.spec.offload_optimizer, run.spec.offload_param)]
        offload = max((c.cpu_bytes_per_node for c in same), default=0)
    return -(-(offload + per_node * (6 * 2**30 + loading)) // 2**30)


def _without_all(words: list[str], flags) -> list[str]:
    for flag in flags:
        words = _without(words, flag)
    return words


def _without(words: list[str], flag: str) -> list[str]:
    """Drop `flag` and its value(s) (`--flag v` or `--flag=v`)."""
    out, skipping = [], False
    for word in words:
        if word == flag or word.startswith(flag + "="):
            skipping = word == flag
            continue
        if skipping and not word.startswith("--"):
            continue
        skipping = False
        out.append(word)
    return out


def _group(words: list[str]) -> list[list[str]]:
    """One flag and its values per line."""
    lines: list[list[str]] = []
    for word in words:
        if word.startswith("--") or not lines:
            lines.append([word])
        else:
            lines[-1].append(word)
    return lines


def environment():
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["shquote"] = shlex.quote
    env.filters["yamlstr"] = json.dumps  # a JSON string is a YAML double-quoted scalar
    env.globals.update(UID=IMAGE_UID, RUNS_MOUNT=RUNS_MOUNT, CONFIG_MOUNT=CONFIG_MOUNT)
    return env


PATHS = {"hostfile": "hostfiles/{}", "slurm": "slurm/{}.sbatch", "k8s": "k8s/{}.yaml", "mpijob": "k8s/mpijob/{}.yaml"}


def render(launch: Launch, targets: tuple[str, ...]) -> dict[str, str]:
    """{relative path: text} for each target."""
    r = resolve(launch)
    env = environment()
    files = {}
    for target in targets:
        r.path = PATHS[target].format(launch.name)
        r.command = command(launch, target)
        if target == "k8s":
            r.launcher_script = env.get_template("k8s_launch.sh.j2").render(r=r)
        files[r.path] = env.get_template(TEMPLATES[target]).render(r=r)
    return files


# which Launch fields each target's file depends on (its header's command names only those)
OPTIONS_USED = {
    "hostfile": ("hosts",),
    "slurm": ("time", "signal_lead", "partition", "cpus_per_task", "container", "image"),
    "k8s": ("signal_lead", "cpus_per_task", "image", "master_port", "storage"),
    "mpijob": ("signal_lead", "cpus_per_task", "image", "master_port", "storage"),
}


def command(launch: Launch, target: str) -> str:
    """The `dsfleet render` command line that gives this file (its header says it)."""
    d = Launch(name=launch.name, preset=launch.preset, nodes=1, per_node=1)
    words = ["dsfleet", "render", "--preset", launch.preset, "--target", target, "--nodes", str(launch.nodes),
             "--gpus-per-node", str(launch.per_node)]
    if launch.name != launch.preset.replace("-", "_").lower():
        words += ["--name", launch.name]
    if launch.cpu:
        words.append("--cpu")
    for attr in OPTIONS_USED[target]:
        value = getattr(launch, attr)
        if value != getattr(d, attr):
            words += ["--" + attr.replace("_", "-"), ",".join(value) if attr == "hosts" else str(value)]
    if launch.train_flags:
        words += ["--", *launch.train_flags]
    return shlex.join(words)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if path.suffix == ".sbatch":
        tmp.chmod(0o755)
    tmp.replace(path)
