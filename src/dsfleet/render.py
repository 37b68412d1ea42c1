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
import contextlib
import io
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
    """Everything the templates read: the validated spec, the DeepSpeed config, the commands, the sizes."""
    from dsfleet.presets import get_preset
    from dsfleet.spec import parse_args
    from dsfleet.train import EXIT_PREEMPTED, build_ds_config, resolve_model_source

    check(launch)
    preset = get_preset(launch.preset)
    flags = list(launch.train_flags)
    spec = parse_args(["--preset", preset.name, *flags], prog="dsfleet render")
    source = resolve_model_source(spec)
    world = launch.nodes * launch.per_node
    if spec.zero == "auto" and not spec.deepspeed:
        flags = _plan_zero(spec, world, flags)
    with contextlib.redirect_stdout(io.StringIO()):  # CPU/fp16 notes are for training runs, not for rendering
        ds_config, stage = build_ds_config(spec, source, world, launch.cpu, _Accelerator(fp16=not launch.cpu))
    words = ["--preset", preset.name, *flags]
    k8s_words = _without(words, "--deepspeed") + ["--deepspeed", f"{CONFIG_MOUNT}/ds_config.json"]
    job_name = "dsfleet-" + launch.name.replace("_", "-")
    per_rank_gib = 2 if launch.cpu else 32
    r = SimpleNamespace(
        name=launch.name, preset=preset.name, nodes=launch.nodes, per_node=launch.per_node, world_size=world,
        cpu=launch.cpu, zero_stage=stage, precision=spec.precision, job_name=job_name, time=launch.time,
        signal_lead=launch.signal_lead, partition=launch.partition, image=launch.image, container=launch.container,
        cpus_per_task=launch.cpus_per_task or (1 if launch.cpu else 8), master_port=launch.master_port,
        storage=launch.storage or ("1Gi" if launch.cpu else "500Gi"), memory=f"{per_rank_gib * launch.per_node}Gi",
        shm="256Mi" if launch.cpu else "16Gi", backoff_limit=3 * launch.nodes,
        hosts=launch.hosts or tuple(f"node-{i}" for i in range(launch.nodes)),
        train_words=words, train_lines=_group(words), k8s_args=k8s_words,
        k8s_output_dir=f"{RUNS_MOUNT}/{job_name}", ds_config_json=json.dumps(ds_config, indent=2),
    )
    assert EXIT_PREEMPTED == 75, "templates/_supervise.j2 and the Job's podFailurePolicy say 75"
    return r


def _plan_zero(spec, world: int, flags: list[str]) -> list[str]:
    """`--zero auto` resolved at render time by the memory planner, deterministically (the spec's GPU memory or 80 GiB,
    1 TiB of host memory), so the file says which stage it runs."""
    try:
        from dsfleet import planner
    except ImportError:
        fail("--zero auto needs the memory planner (dsfleet plan), which this install lacks — pass --zero 0-3")
    choice = planner.choose_for_spec(spec, world, spec.gpu_mem_bytes or 80 * 2**30, 2**40)
    if choice is None or not choice.fits:
        fail(f"no ZeRO stage fits {spec.preset} on {world} GPUs — run `dsfleet plan` to see what would")
    spec.zero = choice.zero_stage
    flags = _without(flags, "--zero") + ["--zero", str(choice.zero_stage)]
    for flag, value in (("--offload_optimizer", choice.offload_optimizer), ("--offload_param", choice.offload_param)):
        if value != "none":
            setattr(spec, flag[2:], value)
            flags = _without(flags, flag) + [flag, value]
    return flags


class _Accelerator:
    """Which precisions the target accelerator supports (build_ds_config asks); nothing is probed."""

    def __init__(self, fp16: bool):
        self.fp16 = fp16

    def is_fp16_supported(self) -> bool:
        return self.fp16


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
