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
RUNS_MOUNT = "/checkpoints"  # the PVC in Kubernetes pods: run dirs, the HF cache and the token cache
TOKEN_CACHE = "token-cache"  # the token cache's dir under the shared output root (Slurm) or the PVC (Kubernetes)
CONFIG_MOUNT = "/etc/dsfleet"  # the ConfigMap: ds_config.json and the pod launcher
DEFAULT_PORT = 29500
DEFAULT_MAX_REQUEUES = 10  # Slurm restarts (SLURM_RESTART_COUNT) after which an exit 75 no longer requeues
DEFAULT_SAVE_INTERVAL_MINUTES = 30  # rendered jobs checkpoint at least this often (unless the flags say otherwise)
DEFAULT_OUTPUT_ROOT = "${SCRATCH:-$SLURM_SUBMIT_DIR}/dsfleet-runs"  # scratch where the site defines it, not $HOME
SRUN_WAIT = 30  # s srun gives the other tasks once the first has ended (a stopped rank never ends by itself)
GPU_TOLERATION = "nvidia.com/gpu:NoSchedule"  # the taint GPU node pools commonly carry (GKE, AKS, the GPU operator)
# flags the launch files own: each run dir and its resume request are set at launch, per backend
OWNED_FLAGS = ("--output_dir", "--overwrite_output_dir", "--resume_from_checkpoint", "--local_rank", "--local-rank")
TEMPLATES = {"hostfile": "hostfile.j2", "slurm": "slurm.sbatch.j2", "k8s": "k8s.yaml.j2", "mpijob": "mpijob.yaml.j2"}


@dataclass(frozen=True)
class Launch:
    """One set of launch files: which preset, how big, and the run spec flags (preset defaults < these flags)."""
    name: str
    preset: str | None  # None: the architecture is the train flags' --model_name_or_path / --config_name
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
    # Slurm site options (each unset = the cluster's own default; the file's header lists them)
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    exclusive: bool = False
    constraint: str | None = None
    setup: str | None = None  # shell run in the batch script before the ranks start (module load, a venv)
    output_root: str | None = None
    hf_home: str | None = None
    hf_offline: bool = False
    max_requeues: int = DEFAULT_MAX_REQUEUES
    # Kubernetes site options
    image_pull_secrets: tuple[str, ...] = ()
    storage_class: str | None = None
    access_mode: str | None = None  # RWO | RWX; unset: RWO for one pod, RWX for several
    tolerations: tuple[str, ...] | None = None  # KEY[=VALUE][:EFFECT]; unset: GPU jobs tolerate nvidia.com/gpu
    node_selector: tuple[str, ...] = ()  # KEY=VALUE
    queue: str | None = None  # Kueue LocalQueue
    priority_class: str | None = None
    shm: str | None = None
    secret: str | None = None  # the Secret whose keys give WANDB_API_KEY, HF_TOKEN, MLFLOW_TRACKING_* to the ranks


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
    parser.add_argument("--model_name_or_path", "--model-name-or-path", dest="model_name_or_path", metavar="DIR|ID",
                        help="instead of --preset: the model dir (any transformers architecture), as train's flag")
    parser.add_argument("--config_name", "--config-name", dest="config_name", metavar="DIR|FILE",
                        help="instead of --preset: a transformers config for a random init, as train's flag")
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
    site = parser.add_argument_group("site options (each optional; the file's header shows what is assumed)")
    site.add_argument("--account", help="Slurm account to charge (default: the user's default account)")
    site.add_argument("--qos", help="Slurm QOS (default: the partition's)")
    site.add_argument("--mem", help="Slurm memory per node, e.g. 500G, or 0 for all of it (default: the cluster's)")
    site.add_argument("--exclusive", action="store_true", help="Slurm: whole nodes, shared with no other job")
    site.add_argument("--constraint", help="Slurm node features, e.g. h100 or 'h100&ib' (default: any node)")
    site.add_argument("--setup", help="Slurm: shell run in the batch script before the ranks start, e.g. "
                      "'module load cuda/12.4; source ~/venv/bin/activate' (the ranks inherit its environment)")
    site.add_argument("--output-root", help="Slurm: where run dirs go, shared by every node (default "
                      f"{DEFAULT_OUTPUT_ROOT}; DSFLEET_OUTPUT_ROOT overrides it at submit time)")
    site.add_argument("--hf-home", help="Slurm: the Hugging Face cache, shared by every node (default "
                      "$DSFLEET_OUTPUT_ROOT/hf-cache; Kubernetes: always on the PVC)")
    site.add_argument("--hf-offline", action="store_true", help="HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1: models and "
                      "data come only from the cache (fill it once before submitting)")
    site.add_argument("--max-requeues", help=f"Slurm: restarts after which exit 75 stops requeueing (default "
                      f"{DEFAULT_MAX_REQUEUES})")
    site.add_argument("--image-pull-secrets", help="Kubernetes: comma-separated Secret names for the image registry")
    site.add_argument("--storage-class", help="Kubernetes: storageClassName of the run-dir PVC (default: the cluster's "
                      "default class); it must offer the access mode")
    site.add_argument("--access-mode", help="Kubernetes PVC access mode RWO | RWX (default: RWO with one pod, RWX "
                      "with several; several pods need RWX)")
    site.add_argument("--tolerations", help=f"Kubernetes: comma-separated KEY[=VALUE][:EFFECT] (default for GPU jobs "
                      f"{GPU_TOLERATION}; none for no toleration)")
    site.add_argument("--node-selector", help="Kubernetes: comma-separated KEY=VALUE node labels")
    site.add_argument("--queue", help="Kubernetes: Kueue LocalQueue name (the Job is created suspended and admitted "
                      "as a gang)")
    site.add_argument("--priority-class", help="Kubernetes: priorityClassName of the pods")
    site.add_argument("--shm", help="Kubernetes: size of the memory-backed /dev/shm, counted in the memory limit "
                      "(default 16Gi, with --cpu 256Mi)")
    site.add_argument("--secret", help="Kubernetes: a Secret whose keys WANDB_API_KEY, HF_TOKEN, "
                      "MLFLOW_TRACKING_TOKEN/USERNAME/PASSWORD reach the ranks (secretKeyRef; never in the file)")
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
                                                      "storage", "hosts", "hostfile", "name", "model_name_or_path",
                                                      "config_name", *SITE_OPTIONS) if getattr(args, k, None)]
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
    model_flags = [w for flag in ("model_name_or_path", "config_name") if getattr(args, flag, None)
                   for w in (f"--{flag}", getattr(args, flag))]
    train = model_flags + _flags(args)
    model_arg = next((train[i + 1] for i, w in enumerate(train[:-1]) if w in ("--model_name_or_path", "--config_name")),
                     None)
    if not args.preset and not model_arg:
        fail("no preset — pass --preset NAME (e.g. t5_3b) or --model_name_or_path DIR / --config_name DIR|FILE, or "
             "--all for the committed set")
    if not args.target:
        fail(f"no target — pass --target {'|'.join(TARGETS)}|all")
    if args.target not in (*TARGETS, "all"):
        fail(f"unknown target {args.target!r} — use one of: {', '.join(TARGETS)}, all")
    targets = ALL_TARGETS if args.target == "all" else (args.target,)
    from dsfleet.presets import get_preset
    if args.preset:
        get_preset(args.preset)  # an unknown preset is the first thing to say
    stem = args.preset or Path(model_arg.rstrip("/")).name.removesuffix(".json").replace(".", "_")
    name = (args.name or stem).replace("-", "_").lower()
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
    launch = Launch(name=name, preset=args.preset, nodes=nodes, per_node=per_node, train_flags=tuple(train),
                    targets=targets, cpu=args.cpu, time=time, signal_lead=lead,
                    image=args.image or DEFAULT_IMAGE, partition=args.partition,
                    cpus_per_task=_positive(args.cpus_per_task, "--cpus-per-task", 1024) if args.cpus_per_task else None,
                    container=args.container or "none",
                    master_port=_positive(args.master_port, "--master-port", 65535) if args.master_port else DEFAULT_PORT,
                    storage=args.storage, hosts=hosts,
                    account=args.account, qos=args.qos, mem=args.mem, exclusive=args.exclusive,
                    constraint=args.constraint, setup=args.setup, output_root=args.output_root, hf_home=args.hf_home,
                    hf_offline=args.hf_offline,
                    max_requeues=_count(args.max_requeues, "--max-requeues") if args.max_requeues is not None
                    else DEFAULT_MAX_REQUEUES,
                    image_pull_secrets=_list(args.image_pull_secrets), storage_class=args.storage_class,
                    access_mode=args.access_mode,
                    tolerations=None if args.tolerations is None else
                    (() if args.tolerations == "none" else _list(args.tolerations)),
                    node_selector=_list(args.node_selector), queue=args.queue, priority_class=args.priority_class,
                    shm=args.shm, secret=args.secret)
    return launch, targets


SITE_OPTIONS = ("account", "qos", "mem", "exclusive", "constraint", "setup", "output_root", "hf_home", "hf_offline",
                "max_requeues", "image_pull_secrets", "storage_class", "access_mode", "tolerations", "node_selector",
                "queue", "priority_class", "shm", "secret")


def _list(text: str | None) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip()) if text else ()


def _count(text, flag: str) -> int:
    try:
        value = int(str(text))
    except ValueError:
        fail(f"{flag} {text!r} is not a whole number — pass e.g. {flag} 10")
    if value < 0:
        fail(f"{flag} {value} is negative — pass 0 (never requeue) or more")
    return value


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
    _check_site(launch)
    owned = [f for f in launch.train_flags if f.split("=")[0] in OWNED_FLAGS]
    if owned:
        fail(f"{owned[0].split('=')[0]} is set by the launch files (a run dir per job that restarts resume) — drop it")


_SLURM_NAME = r"[A-Za-z0-9_.-]+"
_K8S_NAME = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"  # a DNS subdomain: Secret, StorageClass, PriorityClass names
_LABEL_KEY = r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# a path, or one starting with an environment variable ($SCRATCH/runs): no quotes, spaces or command substitution
_SHELL_PATH = r"(/|\$[A-Za-z_][A-Za-z0-9_]*|\$\{[A-Za-z_][A-Za-z0-9_]*\})[A-Za-z0-9._/+-]*"


def _check_site(launch: Launch) -> None:
    """The site options, each checked so the file that carries it is valid for the tool that reads it."""
    for flag, value in (("--account", launch.account), ("--qos", launch.qos)):
        if value is not None and not re.fullmatch(_SLURM_NAME, value):
            fail(f"{flag} {value!r} is not a Slurm name — use letters, digits, _ . -")
    if launch.mem is not None and not re.fullmatch(r"\d+[KMGT]?", launch.mem):
        fail(f"--mem {launch.mem!r} is not a Slurm memory size — pass e.g. --mem 500G (or 0: all of the node's)")
    if launch.constraint is not None and not re.fullmatch(r"[A-Za-z0-9_.&|,!*()\[\]:-]+", launch.constraint):
        fail(f"--constraint {launch.constraint!r} is not a Slurm feature expression — pass e.g. --constraint 'h100&ib'")
    if launch.setup is not None:
        import subprocess
        syntax = subprocess.run(["bash", "-n", "-c", launch.setup], capture_output=True, text=True)
        if not launch.setup.strip() or syntax.returncode != 0:
            why = (syntax.stderr.strip().splitlines() or ["it is empty"])[-1]
            fail(f"--setup is not a shell snippet bash can run ({why}) — pass e.g. --setup 'module load cuda; "
                 "source ~/venv/bin/activate'")
    for flag, value in (("--output-root", launch.output_root), ("--hf-home", launch.hf_home)):
        if value is not None and not re.fullmatch(_SHELL_PATH, value):
            fail(f"{flag} {value!r} is not a path the script can use — pass an absolute path (or one starting with a "
                 "variable: '$SCRATCH/runs') without spaces or quotes")
    for flag, names in (("--image-pull-secrets", launch.image_pull_secrets),
                        ("--storage-class", [launch.storage_class] if launch.storage_class else []),
                        ("--queue", [launch.queue] if launch.queue else []),
                        ("--priority-class", [launch.priority_class] if launch.priority_class else []),
                        ("--secret", [launch.secret] if launch.secret else [])):
        for name in names:
            if not re.fullmatch(_K8S_NAME, name):
                fail(f"{flag} {name!r} is not a Kubernetes object name — use lower-case letters, digits, - and .")
    if launch.access_mode is not None:
        if launch.access_mode not in ACCESS_MODES:
            fail(f"--access-mode {launch.access_mode!r} is not an access mode — use RWO or RWX")
        if ACCESS_MODES[launch.access_mode] == "ReadWriteOnce" and launch.nodes > 1:
            fail(f"--access-mode RWO mounts the run dir on one node, but the job has {launch.nodes} pods on as many "
                 "nodes — use --access-mode RWX with a --storage-class that offers it (NFS, CephFS, Lustre, ...)")
    for t in launch.tolerations or ():
        _toleration(t)
    for pair in launch.node_selector:
        key, eq, value = pair.partition("=")
        if not eq or not re.fullmatch(_LABEL_KEY, key) or not re.fullmatch(_LABEL_VALUE, value):
            fail(f"--node-selector {pair!r} is not KEY=VALUE of a node label — pass e.g. "
                 "--node-selector nvidia.com/gpu.product=NVIDIA-H200")
    if launch.shm is not None and not re.fullmatch(r"[1-9]\d*(Mi|Gi)", launch.shm):
        fail(f"--shm {launch.shm!r} is not a size — pass e.g. --shm 16Gi")


ACCESS_MODES = {"RWO": "ReadWriteOnce", "RWX": "ReadWriteMany", "ReadWriteOnce": "ReadWriteOnce",
                "ReadWriteMany": "ReadWriteMany"}


def _toleration(text: str) -> SimpleNamespace:
    """KEY[=VALUE][:EFFECT] -> a toleration (Equal with a value, Exists without)."""
    rest, _, effect = text.rpartition(":") if ":" in text else (text, "", "")
    key, eq, value = rest.partition("=")
    if not re.fullmatch(_LABEL_KEY, key) or (eq and not re.fullmatch(_LABEL_VALUE, value)) or \
            (effect and effect not in _EFFECTS):
        fail(f"--tolerations {text!r} is not KEY[=VALUE][:EFFECT] — pass e.g. nvidia.com/gpu:NoSchedule (effects: "
             f"{', '.join(_EFFECTS)})")
    return SimpleNamespace(key=key, operator="Equal" if eq else "Exists", value=value if eq else None,
                           effect=effect or None)


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
    preset = get_preset(launch.preset) if launch.preset else None
    model_words = ["--preset", preset.name] if preset else []
    train_flags = list(launch.train_flags)
    if not any(f.split("=")[0] == "--save_interval_minutes" for f in train_flags):  # a node crash costs <= 30 min
        train_flags += ["--save_interval_minutes", str(DEFAULT_SAVE_INTERVAL_MINUTES)]
    spec = parse_args([*model_words, *train_flags], prog="dsfleet render")
    source = resolve_source(spec)
    hardware = Hardware(nodes=launch.nodes, gpus_per_node=launch.per_node,
                        gpu_mem_bytes=spec.gpu_mem_bytes or CPU_PLANNING_GPU_MEM, cpu_mem_bytes=RENDER_HOST_MEM,
                        cpu=launch.cpu, fp16=not launch.cpu)
    run = resolve_run(spec, source, hardware)
    flags = _effective_flags(train_flags, spec, run.spec)
    words = [*model_words, *flags]
    # k8s pods read the DeepSpeed config from the ConfigMap: DeepSpeed's own decisions (stage, offload, buckets)
    # live only there, the training values the flags carry are "auto" in it — one source for each value
    k8s_words = [*model_words, *_without_all(flags, DS_CONFIG_FLAGS),
                 "--deepspeed", f"{CONFIG_MOUNT}/ds_config.json"]
    job_name = "dsfleet-" + launch.name.replace("_", "-")
    r = SimpleNamespace(
        name=launch.name, preset=preset.name if preset else re.sub(r"[^A-Za-z0-9_.-]", "_", source.name)[:63],
        nodes=launch.nodes, per_node=launch.per_node,
        world_size=hardware.world_size, cpu=launch.cpu, zero_stage=run.zero_stage, precision=run.spec.precision,
        job_name=job_name, time=launch.time,
        signal_lead=launch.signal_lead, partition=launch.partition, image=launch.image, container=launch.container,
        cpus_per_task=launch.cpus_per_task or (1 if launch.cpu else 8), master_port=launch.master_port,
        storage=launch.storage or ("1Gi" if launch.cpu else "500Gi"), backoff_limit=3 * launch.nodes,
        hosts=launch.hosts or tuple(f"node-{i}" for i in range(launch.nodes)),
        train_words=words, train_lines=_group(words), k8s_args=k8s_words,
        k8s_output_dir=f"{RUNS_MOUNT}/{job_name}", k8s_cache_dir=f"{RUNS_MOUNT}/{TOKEN_CACHE}",
        prepare=not (run.spec.synthetic_data or run.spec.streaming),  # tokenized once, before the ranks start
        ds_config_json=json.dumps(dsconfig.with_spec_autos(run.ds_config), indent=2),
        **_site_inputs(launch, run, source),
    )
    assert EXIT_PREEMPTED == 75, "templates/_supervise.j2 and the Job's podFailurePolicy say 75"
    return r


def _site_inputs(launch: Launch, run, source) -> dict:
    """The site options as the templates read them, and the header lines that show each (set or assumed)."""
    process_gib = _pod_memory_gib(run, source)
    shm = launch.shm or ("256Mi" if launch.cpu else "16Gi")
    shm_mib = int(shm[:-2]) * (1024 if shm.endswith("Gi") else 1)
    total_mib = process_gib * 1024 + shm_mib
    memory = f"{total_mib // 1024}Gi" if total_mib % 1024 == 0 else f"{total_mib}Mi"
    access = ACCESS_MODES[launch.access_mode] if launch.access_mode else \
        ("ReadWriteMany" if launch.nodes > 1 else "ReadWriteOnce")
    tolerations = launch.tolerations if launch.tolerations is not None else (() if launch.cpu else (GPU_TOLERATION,))
    output_root = launch.output_root or DEFAULT_OUTPUT_ROOT
    hf_home = launch.hf_home or "$DSFLEET_OUTPUT_ROOT/hf-cache"
    spec = run.spec
    save = (f"every {spec.save_interval_minutes:g} min" if spec.save_interval_minutes else "no time-based one") + \
        (f" and every {spec.save_steps} steps" if spec.save_steps else "")
    watch = (f"--heartbeat_timeout {spec.heartbeat_timeout} s (a stopped/lost rank), --dist_timeout "
             f"{spec.dist_timeout} s (a collective)")
    unset = "unset:"
    site_slurm = [
        ("--partition", launch.partition or f"{unset} the cluster's default partition"),
        ("--account", launch.account or f"{unset} the user's default account"),
        ("--qos", launch.qos or f"{unset} the partition's default QOS"),
        ("--mem", launch.mem or f"{unset} the cluster's default (this run plans about {process_gib} GiB a node)"),
        ("--exclusive", "on: whole nodes" if launch.exclusive else "off: other jobs may share the nodes"),
        ("--constraint", launch.constraint or f"{unset} any node of the partition"),
        ("--setup", "the snippet in \"site setup\" below" if launch.setup else
         f"{unset} dsfleet on the PATH of the submitting shell (DSFLEET_PYTHON)"),
        ("--container", f"{launch.container} (image {launch.image})" if launch.container != "none" else
         "none: the host's Python"),
        ("--output-root", output_root + ("" if launch.output_root else " (not $HOME: quotas)")),
        ("--hf-home", hf_home + " (one download for every rank)"),
        ("--hf-offline", "on: only the cache, no downloads" if launch.hf_offline else "off: ranks may download"),
        ("--max-requeues", f"{launch.max_requeues} restarts"),
        ("token cache", f"$DSFLEET_OUTPUT_ROOT/{TOKEN_CACHE} (DSFLEET_CACHE_DIR overrides it), prepared by one task "
         "before the ranks" if not (spec.synthetic_data or spec.streaming) else
         f"none: {'--synthetic_data' if spec.synthetic_data else '--streaming tokenizes as it trains'}"),
        ("checkpoints", save),
        ("timeouts", watch),
    ]
    site_k8s = [
        ("--image", launch.image + ("" if launch.image != DEFAULT_IMAGE else
                                    " (build and push it: docker/build-image.sh; then pass --image REGISTRY/...)")),
        ("--image-pull-secrets", ",".join(launch.image_pull_secrets) or f"{unset} a public or node-cached image"),
        ("--storage-class", launch.storage_class or f"{unset} the cluster's default class (it must offer {access})"),
        ("--access-mode", access + ("" if launch.access_mode else " (RWO for one pod, RWX for several)")),
        ("--tolerations", ",".join(tolerations) or "none"),
        ("--node-selector", ",".join(launch.node_selector) or f"{unset} any node with the resources"),
        ("--queue", f"{launch.queue} (Kueue, gang admission)" if launch.queue else f"{unset} no Kueue"),
        ("--priority-class", launch.priority_class or f"{unset} the cluster's default priority"),
        ("--shm", f"{shm} memory-backed /dev/shm, inside the memory limit {memory} ({process_gib}Gi + {shm})"),
        ("--secret", launch.secret or f"{unset} no credentials reach the ranks"),
        ("token cache", f"{RUNS_MOUNT}/{TOKEN_CACHE} on the PVC, prepared by pod 0 before any rank starts" if not
         (spec.synthetic_data or spec.streaming) else
         f"none: {'--synthetic_data' if spec.synthetic_data else '--streaming tokenizes as it trains'}"),
        ("checkpoints", save),
        ("timeouts", watch),
    ]
    return dict(
        account=launch.account, qos=launch.qos, mem=launch.mem, exclusive=launch.exclusive,
        constraint=launch.constraint, setup=launch.setup, output_root=output_root, hf_home=hf_home,
        hf_offline=launch.hf_offline, max_requeues=launch.max_requeues, srun_wait=SRUN_WAIT, token_cache=TOKEN_CACHE,
        heartbeat_timeout=spec.heartbeat_timeout,
        image_pull_secrets=launch.image_pull_secrets, storage_class=launch.storage_class, access_mode=access,
        tolerations=[_toleration(t) for t in tolerations],
        node_selector=[tuple(p.split("=", 1)) for p in launch.node_selector], queue=launch.queue,
        priority_class=launch.priority_class, secret=launch.secret, shm=shm, memory=memory,
        memory_why=f"{process_gib}Gi for the ranks + {shm} of /dev/shm (memory-backed: charged to this limit)",
        site_slurm=site_slurm, site_k8s=site_k8s)


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
    loads — under ZeRO-3 no copy at load (partitioned at construction) but the rank's partition staged through the
    host at optimizer init (planner.zero3_host_staging_bytes; none with parameter offload). CPU pods: 2 GiB a rank."""
    per_node = run.hardware.gpus_per_node
    if run.hardware.cpu:
        return 2 * per_node
    from dsfleet import models
    try:
        n_params = models.count_parameters(source.preset, source.seq2seq)
    except Exception:  # a model dir whose config cannot be built on the meta device: the old fixed figure
        return 32 * per_node
    from dsfleet.planner import zero3_host_staging_bytes
    if run.zero_stage == 3:  # per node: no model loaded whole, the partitions staged at optimizer init instead
        loading = zero3_host_staging_bytes(n_params, 3, run.spec.offload_param, run.spec.precision, per_node,
                                           run.hardware.nodes)
    else:
        loading = per_node * 2 * n_params
    offload = 0
    if (run.spec.offload_optimizer, run.spec.offload_param) != ("none", "none"):
        from dsfleet import resolve as resolver
        pl = resolver.plan(run.spec, run.hardware)
        same = [c for c in (pl.candidates if pl is not None else []) if (c.zero_stage, c.offload_optimizer,
                c.offload_param) == (run.zero_stage, run.spec.offload_optimizer, run.spec.offload_param)]
        offload = max((c.cpu_bytes_per_node for c in same), default=0)
    return -(-(offload + loading + per_node * 6 * 2**30) // 2**30)


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
_K8S_SITE = ("image_pull_secrets", "storage_class", "access_mode", "tolerations", "node_selector", "queue",
             "priority_class", "shm", "secret", "hf_offline")
OPTIONS_USED = {
    "hostfile": ("hosts",),
    "slurm": ("time", "signal_lead", "partition", "cpus_per_task", "container", "image", "account", "qos", "mem",
              "exclusive", "constraint", "setup", "output_root", "hf_home", "hf_offline", "max_requeues"),
    "k8s": ("signal_lead", "cpus_per_task", "image", "master_port", "storage", *_K8S_SITE),
    "mpijob": ("signal_lead", "cpus_per_task", "image", "master_port", "storage", *_K8S_SITE),
}


def command(launch: Launch, target: str) -> str:
    """The `dsfleet render` command line that gives this file (its header says it)."""
    d = Launch(name=launch.name, preset=launch.preset, nodes=1, per_node=1)
    words = ["dsfleet", "render", *(["--preset", launch.preset] if launch.preset else []), "--target", target,
             "--nodes", str(launch.nodes), "--gpus-per-node", str(launch.per_node)]
    if launch.preset is None or launch.name != launch.preset.replace("-", "_").lower():
        words += ["--name", launch.name]
    if launch.cpu:
        words.append("--cpu")
    for attr in OPTIONS_USED[target]:
        value = getattr(launch, attr)
        if value == getattr(d, attr):
            continue
        if isinstance(value, bool):
            words.append("--" + attr.replace("_", "-"))
        else:
            shown = (",".join(value) or "none") if isinstance(value, tuple) else str(value)
            words += ["--" + attr.replace("_", "-"), shown]
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
