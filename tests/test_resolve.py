"""The one resolver (dsfleet.resolve): what train, render and show-config run is decided in one place, for the
hardware the launch names, and what spec.yaml and the rendered files carry is what was decided. No component
imports an entry point (train, render) — they import components."""
import ast
from pathlib import Path

from dsfleet import render
from dsfleet.models import resolve_source
from dsfleet.resolve import Hardware, resolve
from dsfleet.spec import parse_args
from tests.launch import REPO, cpu_env, explain, python_train

GiB = 2**30
H100_NODE = dict(gpu_mem_bytes=40 * GiB, cpu_mem_bytes=512 * GiB)


def resolved(flags, nodes=1, per_node=8, **hw):
    spec = parse_args(flags)
    return resolve(spec, resolve_source(spec), Hardware(nodes=nodes, gpus_per_node=per_node, **{**H100_NODE, **hw}))


def test_zero_auto_resolves_stage_offload_and_checkpointing_into_the_effective_spec():
    run = resolved(["--preset", "gpt2_xl", "--from_scratch", "--bf16", "--zero", "auto",
                    "--per_device_train_batch_size", "64"])
    assert run.spec.zero == run.zero_stage == run.ds_config["zero_optimization"]["stage"] in (1, 2)
    assert run.spec.gradient_checkpointing  # 64 x 1024 tokens of GPT-2 XL on 40 GiB need it (the planner's choice)
    assert any(n.startswith("zero auto -> ZeRO-") for n in run.notes)


def test_a_deepspeed_file_sets_the_effective_stage_and_offload():
    run = resolved(["--preset", "t5_tiny", "--from_scratch", "--deepspeed", "zero3"], per_node=2)
    assert run.spec.zero == 3 and run.spec.offload_optimizer == "cpu"  # the shipped zero3 file offloads to the CPU


def test_render_with_zero_auto_keeps_the_planners_checkpointing():
    launch = render.Launch("gpt2_xl", "gpt2_xl", nodes=1, per_node=8,
                           train_flags=("--from_scratch", "--bf16", "--zero", "auto", "--per_device_train_batch_size",
                                        "64", "--gpu_mem_bytes", str(40 * GiB)))
    r = render.resolve(launch)
    words = r.train_words
    assert words[words.index("--zero") + 1] == str(r.zero_stage) != "auto"
    assert "--gradient_checkpointing" in words and "--gradient_checkpointing" in r.k8s_args
    assert "--zero" not in r.k8s_args  # the pod reads its stage from the ConfigMap's DeepSpeed config only


def test_spec_yaml_of_a_dry_run_records_the_effective_stage(tmp_path):
    proc = python_train(["--preset", "t5_tiny", "--from_scratch", "--dataset_name", "embedded", "--deepspeed", "zero3",
                         "--output_dir", str(tmp_path / "run"), "--dry_run"], env=cpu_env())
    assert proc.returncode == 0, explain(proc)
    spec_part = proc.stdout.split("# DeepSpeed config")[0]
    assert "\nzero: 3\n" in spec_part and "offload_optimizer: cpu" in spec_part
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_no_component_imports_an_entry_point():
    """train and render are entry points: importing them from a component would run the tail of the graph upside
    down (render and show-config once imported train to reach its DeepSpeed config builder)."""
    entry = {"dsfleet.train", "dsfleet.render"}
    offenders = []
    for path in sorted((REPO / "src" / "dsfleet").rglob("*.py")):
        module = "dsfleet." + ".".join(path.relative_to(REPO / "src" / "dsfleet").with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            hit = entry & set(names) - {module}
            if hit and module not in ("dsfleet.cli", "dsfleet.__main__"):
                offenders.append(f"{module} imports {sorted(hit)}")
    assert not offenders, offenders
    assert Path(REPO / "src" / "dsfleet" / "resolve.py").is_file()


def test_a_2x8_render_is_planned_as_2_nodes_of_8():
    """Host memory per node comes from the ranks of one node: 2 x 8 pods ask for half of what one 16-GPU pod does
    (before, render planned every world as one node: LOCAL_WORLD_SIZE is absent at render time)."""
    flags = ("--from_scratch", "--bf16", "--zero", "3", "--offload_optimizer", "cpu")
    two = render.resolve(render.Launch("t5_11b", "t5_11b", nodes=2, per_node=8, train_flags=flags))
    one = render.resolve(render.Launch("t5_11b", "t5_11b", nodes=1, per_node=16, train_flags=flags))
    gib = lambda r: int(r.memory.removesuffix("Gi"))  # noqa: E731
    assert two.world_size == one.world_size == 16
    assert 0.4 < gib(two) / gib(one) < 0.6, (two.memory, one.memory)


def test_cuda_graphs_are_decided_once_where_a_graph_can_replay():
    """--cuda_graphs (off unless asked) auto becomes on or off in the effective spec: on for compiled blocks on GPUs at ZeRO 0-2, off
    wherever a block is not called once forward and once backward a step (checkpointing, ZeRO-3), off for Mamba's
    custom scan, off on CPU ranks and without --compile; fastpath only reads the answer."""
    gpt2 = ["--preset", "gpt2_tiny", "--from_scratch", "--bf16", "--cuda_graphs", "auto"]
    assert resolved(gpt2[:-2] + ["--compile", "true", "--zero", "2"]).spec.cuda_graphs == "off"  # the default: off
    assert resolved([*gpt2, "--compile", "true", "--zero", "2"]).spec.cuda_graphs == "on"
    assert resolved([*gpt2, "--compile", "true", "--zero", "2", "--cuda_graphs", "off"]).spec.cuda_graphs == "off"
    assert resolved([*gpt2, "--zero", "2"]).spec.cuda_graphs == "off"  # not compiled
    assert resolved([*gpt2, "--compile", "true", "--zero", "3"]).spec.cuda_graphs == "off"
    assert resolved([*gpt2, "--compile", "true", "--zero", "2", "--gradient_checkpointing"]).spec.cuda_graphs == "off"
    assert resolved([*gpt2, "--compile", "true", "--zero", "2"], cpu=True).spec.cuda_graphs == "off"
    assert resolved(["--preset", "mamba_tiny", "--from_scratch", "--bf16", "--compile", "true", "--zero", "2",
                     "--cuda_graphs", "auto"]).spec.cuda_graphs == "off"
    t5 = ["--preset", "t5_tiny", "--from_scratch", "--bf16", "--compile", "true", "--zero", "auto", "--cuda_graphs",
          "auto"]
    assert resolved([*t5, "--synthetic_data"]).spec.cuda_graphs == "on"  # planned ZeRO 0-2, no checkpointing
    assert resolved(t5).spec.cuda_graphs == "off"  # real rows: padded to each batch's longest
