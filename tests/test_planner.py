"""The memory planner: its model-state numbers are DeepSpeed's own estimators', its activation formulas match what
autograd keeps on CPU (tensor by tensor, tiny models), its ZeRO phase accounting matches DeepSpeed's allocations
(CPU accelerator, one rank), and it answers the seeds' questions: mamba_7b ZeRO-2 on 4 x 24 GB does not fit;
T5-3B on one 80 GB GPU trains with ZeRO-1/2, not ZeRO-3; impossible requests say what would fit and exit 2.

The GPU half (predicted vs measured peak on an H100, emulated 24 GB cards) is scripts/gpu_memory_check.py."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from dsfleet import planner as P
from dsfleet.cli import UsageError, main as cli_main
from dsfleet.resolve import Hardware

GiB = 2**30


# ---------------------------------------------------------------------------------------------------------
# Inputs

@pytest.mark.parametrize("text, value", [("80GiB", 80 * GiB), ("24GB", 24 * 10**9), ("512G", 512 * GiB),
                                         ("1.5TiB", int(1.5 * 2**40)), ("100", 100), (2**30, 2**30)])
def test_parse_size(text, value):
    assert P.parse_size(text) == value


@pytest.mark.parametrize("text, value", [("6.9e9", 6_900_000_000), ("6.9B", 6_900_000_000), ("350M", 350_000_000),
                                         ("1e9", 10**9), (123, 123)])
def test_parse_count(text, value):
    assert P.parse_count(text) == value


@pytest.mark.parametrize("bad", ["80 gigs", "-5GB", ""])
def test_bad_size_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="cannot read size"):
        P.parse_size(bad)


def test_counts_are_dsfleet_models_exact_counts():
    from dsfleet.models import count_parameters
    from dsfleet.presets import get_preset
    for name in ("t5_3b", "gpt2_xl", "mamba_7b"):
        assert P.model_shape(name).n_params == count_parameters(get_preset(name))
    assert P.model_shape("t5_3b").n_params == 2_851_598_336
    assert P.model_shape("gpt2_xl").largest_param == 50257 * 1600  # the tied embedding


# ---------------------------------------------------------------------------------------------------------
# Model states == DeepSpeed's estimators

def _ds_estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    return stage_1_and_2, stage3


def _planned(name, stage, offload_opt, offload_param, gpus, nodes, shape=None):
    shape = shape or P.model_shape(name)
    return P.evaluate(shape, zero_stage=stage, offload_optimizer=offload_opt, offload_param=offload_param,
                      precision="bf16", micro_batch=1, gpus=gpus, nodes=nodes)


@pytest.mark.parametrize("preset", ["t5_tiny", "gpt2_tiny", "mamba_tiny"])
def test_model_states_equal_deepspeed_estimators_all_live(preset):
    """The same real (tiny) model through DeepSpeed's *_all_live estimators and through the planner."""
    s12, s3 = _ds_estimators()
    from dsfleet.models import build_config, family
    from dsfleet.presets import get_preset
    p = get_preset(preset)
    torch.manual_seed(0)
    model = family(p.family).model_cls(build_config(p))
    total = s12.model_to_params(model)
    total3, largest = s3.model_to_params(model)
    shape = P.model_shape(preset)
    assert (shape.n_params, shape.largest_layer) == (total, largest) == (total3, largest)
    for gpus, nodes in [(1, 1), (4, 1), (8, 2)]:
        for off in (False, True):
            cpu, gpu = s12.estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=off)
            c = _planned(preset, 2, "cpu" if off else "none", "none", gpus, nodes, shape)
            assert (c.model_states_bytes, c.cpu_bytes_per_node if off else cpu) == (gpu, cpu)
            assert c.gpu["params"] + c.gpu["grads"] + c.gpu["optimizer"] == gpu
        for off_opt, off_par in [(False, False), (True, False), (True, True)]:
            cpu, gpu, _ = s3.estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=off_opt,
                                                                  cpu_offload_params=off_par, zero_init=True)
            c = _planned(preset, 3, "cpu" if off_opt else "none", "cpu" if off_par else "none", gpus, nodes, shape)
            assert c.model_states_bytes == gpu
            if off_opt:
                assert c.cpu_bytes_per_node == cpu
        # the printed tables of the *_all_live functions, to their 2 decimals
        for fn, stage in ((s12.estimate_zero2_model_states_mem_needs_all_live, 2),
                          (s3.estimate_zero3_model_states_mem_needs_all_live, 3)):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                fn(model, num_gpus_per_node=gpus, num_nodes=nodes)
            for cpu_gb, gpu_gb, options in re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", out.getvalue(), re.M):
                if "zero_init=0" in options:
                    continue
                opt = "cpu" if "offload_optimizer=cpu" in options else "none"
                par = "cpu" if "offload_param=cpu" in options else "none"
                c = _planned(preset, stage, opt, par, gpus, nodes, shape)
                assert f"{c.model_states_bytes / 2**30:6.2f}".strip() == gpu_gb, (options, c.model_states_bytes)


@pytest.mark.parametrize("preset", ["t5_3b", "gpt2_xl", "mamba_7b"])
def test_model_states_equal_deepspeed_estimators_for_big_presets(preset):
    s12, s3 = _ds_estimators()
    shape = P.model_shape(preset)
    for gpus, nodes in [(1, 1), (4, 1), (8, 4)]:
        for off in (False, True):
            _, gpu = s12.estimate_zero2_model_states_mem_needs(shape.n_params, gpus, nodes, cpu_offload=off)
            assert _planned(preset, 2, "cpu" if off else "none", "none", gpus, nodes).model_states_bytes == gpu
        for off_opt, off_par in [(False, False), (True, False), (True, True)]:
            cpu, gpu, _ = s3.estimate_zero3_model_states_mem_needs(shape.n_params, shape.largest_layer, gpus, nodes,
                                                                  cpu_offload=off_opt, cpu_offload_params=off_par)
            c = _planned(preset, 3, "cpu" if off_opt else "none", "cpu" if off_par else "none", gpus, nodes)
            assert c.model_states_bytes == gpu
            assert not off_opt or c.cpu_bytes_per_node == cpu


# ---------------------------------------------------------------------------------------------------------
# Activations == what autograd keeps (CPU, bf16, tiny models with the real module code)

class _Live(torch.utils._python_dispatch.TorchDispatchMode):
    """Live bytes of every tensor storage an op creates, freed when the storage dies; params excluded."""

    def __init__(self, exclude=()):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {t.untyped_storage()._cdata: 0 for t in exclude}

    def _free(self, key):
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st._cdata not in self.sizes:
                    self.sizes[st._cdata] = st.nbytes()
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, st._cdata)
        self.peak = max(self.peak, self.live)
        return out


class _FlashLikeSDPA(torch.autograd.Function):
    """Stands in for CUDA's flash/mem-efficient attention on CPU: keeps q, k, v, out and an fp32 logsumexp (and the
    bias), never the probabilities. Values are computed exactly; gradients are zeros of the right shapes (only
    memory is measured)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, is_causal):
        b, h, s, d = q.shape
        with torch.no_grad():
            w = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else d ** -0.5)
            if is_causal:
                w = w.masked_fill(~torch.ones(s, k.shape[2], dtype=torch.bool).tril(), float("-inf"))
            if mask is not None:
                w = w + mask if mask.dtype != torch.bool else w.masked_fill(~mask, float("-inf"))
            ref = torch.matmul(torch.softmax(w.float(), -1).to(q.dtype), v)
        out = torch.empty(b, s, h, d, dtype=q.dtype)
        out.copy_(ref.transpose(1, 2))
        del ref, w
        out = out.transpose(1, 2)
        lse = torch.empty(b, h, s, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *m = ctx.saved_tensors
        grads = [torch.zeros(t.shape[0], t.shape[2], t.shape[1], t.shape[3], dtype=t.dtype).transpose(1, 2)
                 for t in (q, k, v)]
        gm = torch.zeros(m[0].shape, dtype=m[0].dtype) if (m and m[0].requires_grad) else None
        return grads[0], grads[1], grads[2], gm, None, None


def _flash_like(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashLikeSDPA.apply(query, key, value, attn_mask, scale, is_causal)


def _measure(preset, layers, batch, seq, tgt=None, ckpt=False, fused=False, **dims):
    """Build a tiny model from the preset's module code, train one micro-batch as the entry point does (grads
    taken away as DeepSpeed's hooks do), and return (bytes held after forward, peak) plus the planner's view."""
    import torch.nn.functional as F

    from dsfleet import fastpath
    from dsfleet.models import build_config, family
    from dsfleet.presets import get_preset
    p = get_preset(preset)
    key = {"t5": "num_layers", "gpt2": "n_layer", "mamba": "num_hidden_layers"}[p.family]
    over = {key: layers, **dims, **({"num_decoder_layers": layers} if p.family == "t5" else {})}
    cfg = build_config(p, **over)
    torch.manual_seed(0)
    fam = family(p.family)
    model = (fam.model_cls._from_config(cfg, attn_implementation="sdpa") if p.family != "mamba"
             else fam.model_cls(cfg)).to(torch.bfloat16).train()
    if ckpt:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if fused:
        fastpath.fuse_activations(model)
        fastpath.install_fused_loss(model, p.family)
    for q in model.parameters():
        q.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
    ids = torch.randint(3, cfg.vocab_size, (batch, seq))
    labels = torch.randint(3, cfg.vocab_size, (batch, tgt)) if p.family == "t5" else ids.clone()
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like
    try:
        with _Live(exclude=list(model.parameters()) + list(model.buffers())) as live:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            saved = live.live
            loss.backward()
            del loss
    finally:
        F.scaled_dot_product_attention = real
    with torch.device("meta"):
        meta = fam.model_cls(cfg)
    shape = P.ModelShape(
        name=preset, family=p.family, n_params=sum(q.numel() for q in meta.parameters()),
        largest_layer=max(sum(q.numel() for q in m.parameters(recurse=False)) for m in meta.modules()),
        largest_param=max(q.numel() for q in meta.parameters()), vocab=cfg.vocab_size,
        tied=bool(cfg.tie_word_embeddings),
        hidden=getattr(cfg, "d_model", None) or getattr(cfg, "n_embd", None) or cfg.hidden_size,
        layers=layers, dec_layers=layers if p.family == "t5" else 0, heads=getattr(cfg, "num_heads", None) or
        getattr(cfg, "n_head", 1), d_ff=getattr(cfg, "d_ff", 0) or (4 * cfg.n_embd if p.family == "gpt2" else 0),
        inner=cfg.num_heads * cfg.d_kv if p.family == "t5" else 0,
        dropout=getattr(cfg, "dropout_rate", None) or getattr(cfg, "resid_pdrop", 0.0) if p.family != "mamba" else 0,
        d_state=getattr(cfg, "state_size", 0), expand=getattr(cfg, "expand", 2),
        dt_rank=int(getattr(cfg, "time_step_rank", 0) or 0), conv_kernel=getattr(cfg, "conv_kernel", 4))
    act = P.activation_memory(shape, batch, seq, tgt, "bf16", ckpt, fused_loss=fused, fused_activation=fused,
                              device="cpu")
    return saved, live.peak, act


ACT_CASES = {
    "gpt2 model loss": ("gpt2_xl", 2, 2, 64, None, False, False, dict(vocab_size=512, n_embd=128, n_head=4)),
    "gpt2 fast path": ("gpt2_xl", 2, 2, 64, None, False, True, dict(vocab_size=512, n_embd=128, n_head=4)),
    "gpt2 checkpointed": ("gpt2_xl", 3, 2, 64, None, True, True, dict(vocab_size=64, n_embd=256, n_head=4)),
    "t5 model loss": ("t5_3b", 2, 2, 32, 16, False, False, dict(vocab_size=512, d_model=64, d_ff=256, num_heads=4,
                                                                d_kv=32)),
    "t5 fast path": ("t5_3b", 2, 2, 32, 16, False, True, dict(vocab_size=512, d_model=64, d_ff=256, num_heads=4,
                                                              d_kv=32)),
    "mamba scan": ("mamba_1b", 2, 2, 8, None, False, False, dict(vocab_size=64, hidden_size=32, state_size=4)),
    "mamba checkpointed": ("mamba_1b", 2, 2, 8, None, True, False, dict(vocab_size=64, hidden_size=32,
                                                                        state_size=4)),
}


@pytest.mark.parametrize("case", list(ACT_CASES))
def test_activation_formulas_match_autograd_on_cpu(case):
    preset, layers, b, s, tgt, ckpt, fused, dims = ACT_CASES[case]
    saved, peak, act = _measure(preset, layers, b, s, tgt, ckpt, fused, **dims)
    assert act.saved == pytest.approx(saved, rel=0.02), (case, act, saved)
    assert act.peak == pytest.approx(peak, rel=0.12), (case, act, peak)


def test_mamba_scan_counts_the_fp32_state_tensors():
    """The pure-PyTorch scan's (batch, d_inner, seq, d_state) fp32 tensors dominate: 14 bytes per element
    in bf16 (exp(A dt), dt B, fp32 states, 16-bit states)."""
    shape = P.model_shape("mamba_1b")
    a1 = P.activation_memory(shape, 1, 1024, precision="bf16")
    a2 = P.activation_memory(shape, 2, 1024, precision="bf16")
    per_token_layer = (a2.saved - a1.saved) / 1024 / shape.layers
    E, N = shape.expand * shape.hidden, shape.d_state
    assert 14 * E * N < per_token_layer < 14 * E * N * 1.15


# The kernel scan runs only on a GPU, so its formula is checked against the peaks measured on one H200
# (docs/benchmarks.md, "Mamba with the CUDA kernels"; torch.cuda.max_memory_allocated of the training step):
# (preset, ZeRO stage, micro-batch, seq, checkpointing, measured GiB)
H200_MAMBA_KERNEL_PEAKS = [
    ("mamba_7b", 3, 2, 2048, True, 109.3),  # 2026-12-01/02, gpu_mamba.sh 7b / 7bckpt
    ("mamba_1b", 2, 8, 2048, False, 58.0),  # bench --suite mamba, dsfleet_kernels
    ("mamba_1b", 2, 1, 2048, False, 28.2),  # gpu_mamba.sh resume
    ("mamba_1b", 2, 4, 128, False, 28.2),  # bench --suite mamba, dsfleet_kernels_short
]


@pytest.mark.parametrize("preset, stage, mb, seq, ckpt, measured", H200_MAMBA_KERNEL_PEAKS)
def test_mamba_kernel_activations_match_the_h200_peaks(preset, stage, mb, seq, ckpt, measured):
    """With mamba_ssm's fused scan no (d_inner x d_state) tensor per token is kept: the planner's peak for the
    kernel path is within 5 % of what the H200 measured; the pure-PyTorch scan's formula is not (it is 14x the
    activations of mamba_1b at 8 x 2048)."""
    kw = dict(zero_stage=stage, precision="bf16", gradient_checkpointing=ckpt, micro_batch=mb, gpus=1,
              gpu_mem_bytes=139 * GiB, cpu_mem_bytes=128 * GiB, seq_len=seq)
    shape = P.model_shape(preset)
    kernels = P.evaluate(dataclasses.replace(shape, mamba_kernels=True), **kw)
    assert abs(kernels.gpu["peak"] / GiB - measured) / measured < 0.05, (kernels.gpu, measured)
    if not ckpt and seq >= 2048:
        scan = P.evaluate(shape, **kw)
        assert scan.gpu["peak"] / GiB > 1.5 * measured


def test_mamba_plans_for_the_scan_that_will_run():
    """plan_for_spec takes the kernel path for GPU ranks with --mamba_kernels auto|on, the pure-PyTorch scan for
    CPU ranks and --mamba_kernels off; the plan says which."""
    class Spec:
        preset = "mamba_1b"
        per_device_train_batch_size = 8
        gradient_accumulation_steps = 1
        bf16, fp16 = True, False
        block_size = 2048
        gradient_checkpointing = False
        mamba_kernels = "auto"
    gpu = Hardware(1, 1, 139 * GiB, 128 * GiB)
    on_gpu = P.plan_for_spec(Spec(), gpu)
    assert "mamba_ssm's fused scan" in on_gpu.activations
    Spec.mamba_kernels = "off"
    off = P.plan_for_spec(Spec(), gpu)
    assert "pure-PyTorch scan" in off.activations
    assert off.best.gpu["activations"] > on_gpu.best.gpu["activations"] or off.best.gradient_checkpointing
    Spec.mamba_kernels = "auto"
    assert "pure-PyTorch scan" in P.plan_for_spec(Spec(), Hardware(1, 2, 139 * GiB, 128 * GiB, cpu=True)).activations
    # inside a run, the scan its process decided (fastpath.choose_mamba_scan, carried by Hardware.live) wins: a GPU
    # whose kernels do not import plans for the pure-PyTorch scan it will run
    decided = Hardware(1, 1, 139 * GiB, 128 * GiB, mamba_kernels=False)
    assert "pure-PyTorch scan" in P.plan_for_spec(Spec(), decided).activations
    assert P.plan_for_spec(Spec(), decided).to_json() == off.to_json()


# ---------------------------------------------------------------------------------------------------------
# ZeRO phases == DeepSpeed's allocations (CPU accelerator, one rank, fused AdamW like the GPU's FusedAdam)

DS_PROBE = textwrap.dedent(r'''
    import json, os, sys, weakref
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, torch._dynamo
    import deepspeed
    sys.path.insert(0, sys.argv[3])
    from test_planner import _Live
    H = 256
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([torch.nn.Linear(H, 4 * H) for _ in range(4)])
            self.b = torch.nn.ModuleList([torch.nn.Linear(4 * H, H) for _ in range(4)])
        def forward(self, x):
            for a, b in zip(self.a, self.b):
                x = x + b(torch.relu(a(x)))
            return x.float().pow(2).mean()
    import deepspeed.runtime.zero.stage3 as stage3
    staged = []  # bytes ZeRO-3's optimizer init hands to `defragment` (the real one still runs)
    real_defragment = stage3.defragment
    def spy(tensors):
        staged.append(sum(t.numel() * t.element_size() for t in tensors))
        return real_defragment(tensors)
    stage3.defragment = spy
    results = {}
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    for stage in (2, 3):
        staged.clear()
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
               "gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
               "steps_per_print": 10**9,
               "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": False,
                                     "reduce_bucket_size": 10**5}}
        live = _Live()  # counts what this stage's engine allocates
        marks = {}
        with live:
            if stage == 3:
                with deepspeed.zero.Init(config_dict_or_path=cfg):
                    model = M()
            else:
                model = M()
            n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # no temporaries, as FusedAdam
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            marks["init"] = live.peak
            x = torch.randn(2, H, dtype=torch.bfloat16)
            for step in range(3):
                engine.backward(engine(x))
                marks[f"after_backward{step}"] = live.live
                engine.step()
                marks[f"after_step{step}"] = live.live
            marks["peak"] = live.peak
        results[stage] = {"n": n, "staged": sum(staged), **marks}
    print("RESULT", json.dumps(results))
''')


@pytest.fixture(scope="module")
def ds_probe(tmp_path_factory):
    """One CPU process, one rank: ZeRO-2 then ZeRO-3 engines, their live bytes through init and three steps."""
    probe = tmp_path_factory.mktemp("probe") / "probe.py"
    probe.write_text(DS_PROBE)
    port = str(29400 + os.getpid() % 500)
    proc = subprocess.run([sys.executable, str(probe), "-", port, os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_phases_match_deepspeed_allocations(stage, ds_probe):
    r = ds_probe[str(stage)]
    n = r["n"]
    largest = 4 * 256 * 256 + 4 * 256  # a Linear's weight + bias is DeepSpeed's "largest layer"
    shape = P.ModelShape(name="probe", family="generic", n_params=n, largest_layer=largest, largest_param=4 * 256 * 256,
                         hidden=256, vocab=1, layers=4)
    c = P.Candidate(stage, "none", "none", "bf16", False, 1)
    phases, _ = P.gpu_memory(shape, c, 1, P.ActMem(0, 0, 0, 0), reduce_bucket=10**5, overlap_comm=False)
    # states between steps: 16-bit params + fp32 master + Adam (+ ZeRO-3's gradient partition and bucket)
    resident = (2 + 4 + 8) * n + (2 * n + 2 * 10**5 if stage == 3 else 0)
    assert r["after_step2"] == pytest.approx(resident, rel=0.01)
    # after backward: + the 16-bit gradient partition (ZeRO-2; ZeRO-3's is resident)
    assert r["after_backward2"] == pytest.approx(resident + (2 * n if stage == 2 else 0), rel=0.01)
    assert r["peak"] == pytest.approx(phases["optimizer step"], rel=0.02), (r, phases)
    assert r["init"] == pytest.approx(phases["init"], rel=0.02), (r, phases)


def test_zero3_stages_each_ranks_16bit_partition_through_the_host(ds_probe):
    """The host side of ZeRO-3 without offload (mamba_7b on one H200: 14.4 GiB peak RSS against the 1.4 GiB of
    DeepSpeed's estimator, which counts zero.Init's buffers only): at optimizer init DeepSpeed hands the rank's whole
    16-bit partition to `defragment`, which copies it into a buffer it allocates on the host whatever device holds
    it. The planner counts that (planner.zero3_host_staging_bytes), checks it against the host's memory, and the
    rendered pods' memory limit carries it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from deepspeed.runtime.zero.utils import defragment
    n = ds_probe["3"]["n"]
    assert ds_probe["3"]["staged"] == P.zero3_host_staging_bytes(n, 3, "none", "bf16", 1, 1) == 2 * n
    assert ds_probe["2"]["staged"] == 0

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided):
                self.seen.append(((kwargs or {}).get("device"), list(args[0])))
            return func(*args, **(kwargs or {}))

    on_device = [torch.empty(1000, dtype=torch.bfloat16, device="meta"), torch.empty(24, dtype=torch.bfloat16,
                                                                                   device="meta")]
    allocations = Allocations()
    with allocations, contextlib.suppress(NotImplementedError):  # a meta tensor has no data to copy out
        defragment(on_device)
    assert allocations.seen[0] == (torch.device("cpu"), [1024]), allocations.seen

    # mamba_7b on 1 x H200 + 128 GiB: the plan's host figure is the staging, 2 bytes a parameter, which is 90 % of the
    # rank's measured 14.4 GiB (the rest is the process itself: interpreter, libraries, CUDA's host side)
    plan = P.plan(preset="mamba_7b", gpus=1, gpu_mem_bytes=139 * GiB, cpu_mem_bytes=128 * GiB, precision="bf16",
                  seq_len=2048)
    assert plan.best.zero_stage == 3 and plan.best.offload == "none"
    assert plan.best.cpu_bytes_per_node == 2 * plan.n_params
    assert 0.85 * 14.4 * GiB < plan.best.cpu_bytes_per_node < 14.4 * GiB
    # a host too small for the staging rules ZeRO-3 without offload out, with the reason
    small = P.plan(preset="mamba_7b", gpus=1, gpu_mem_bytes=139 * GiB, cpu_mem_bytes=8 * GiB, precision="bf16",
                   seq_len=2048, zero_stages=[3])
    no_offload = [c for c in small.candidates if c.offload == "none"]
    assert no_offload and not any(c.fits for c in no_offload)
    assert all("CPU/node" in c.why_not for c in no_offload if c.fits_gpu)


# ---------------------------------------------------------------------------------------------------------
# The seeds' questions

def test_seed_004_mamba_7b_zero2_does_not_fit_4x24gb_and_an_alternative_is_proposed():
    plan = P.plan(preset="mamba_7b", gpus=4, gpu_mem_bytes=24 * GiB, precision="bf16")
    zero2 = [c for c in plan.candidates if c.zero_stage == 2 and c.offload == "none"]
    assert zero2 and not any(c.fits for c in zero2)
    # model states alone exceed the card: 13.8 GB of bf16 weights + 18 bytes/param of the rest over 4 GPUs
    assert all(c.model_states_bytes > 24 * GiB for c in zero2)
    assert min(c.model_states_bytes for c in zero2) > 1.9 * 23.1e9  # seed 004 said 23.1 GB/GPU: off ~2x
    # at the preset's 4096 tokens nothing fits (the pure-PyTorch scan): the one line names what would
    assert plan.best is None and "--seq-len 2048" in plan.reason and "ZeRO-3" in plan.reason
    shorter = P.plan(preset="mamba_7b", gpus=4, gpu_mem_bytes=24 * GiB, precision="bf16", seq_len=2048)
    assert shorter.best is not None and shorter.best.zero_stage == 3 and shorter.best.offload != "none"


def test_t5_3b_on_one_80gb_gpu_trains_with_zero_1_or_2_not_zero_3():
    plan = P.plan(preset="t5_3b", gpus=1, gpu_mem_bytes=80 * GiB, precision="bf16")
    fits = {z: [c for c in plan.candidates if c.zero_stage == z and c.offload == "none" and c.fits] for z in (1, 2, 3)}
    assert fits[1] and fits[2] and fits[3]
    assert plan.best.zero_stage in (1, 2) and plan.best.offload == "none"
    fastest = {z: min(c.time_per_token for c in cs) for z, cs in fits.items()}
    assert fastest[3] > 1.3 * max(fastest[1], fastest[2])
    warning = P.check_heavier_stage(plan, 3)
    assert warning and f"--zero {plan.best.zero_stage}" in warning and "ZeRO-3 is heavier" in warning
    assert P.check_heavier_stage(plan, plan.best.zero_stage) is None


def test_choose_for_spec_reads_a_runspec_like_object():
    class Spec:
        preset = "t5_3b"
        per_device_train_batch_size = 8
        gradient_accumulation_steps = 1
        bf16, fp16 = True, False
        max_source_length = max_target_length = 128
        block_size = 1024
        gradient_checkpointing = False
    choice = P.choose_for_spec(Spec(), Hardware(1, 1, 80 * GiB, 512 * GiB))
    assert choice.fits and choice.zero_stage in (1, 2) and choice.micro_batch == 8 and choice.precision == "bf16"
    small = P.choose_for_spec(Spec(), Hardware(1, 1, 24 * GiB, 512 * GiB))
    assert small.fits and small.offload != "none"


def test_choose_for_spec_with_a_runspec_and_a_model_dir(tmp_path):
    from dsfleet.models import build_config
    from dsfleet.presets import get_preset
    from dsfleet.spec import parse_args
    spec = parse_args(["--preset", "gpt2_xl", "--bf16", "--zero", "auto", "--per_device_train_batch_size", "64"])
    choice = P.choose_for_spec(spec, Hardware(1, 8, 40 * GiB, 512 * GiB))
    assert choice.fits and choice.micro_batch == 64 and choice.gradient_checkpointing  # 64 x 1024 tokens need it
    build_config(get_preset("gpt2_medium")).save_pretrained(tmp_path / "my-gpt2")
    spec = parse_args(["--model_name_or_path", str(tmp_path / "my-gpt2"), "--bf16", "--zero", "auto"])
    shape = P.shape_for_spec(spec)
    assert shape.family == "gpt2" and shape.n_params == P.model_shape("gpt2_medium").n_params
    assert P.choose_for_spec(spec, Hardware(1, 1, 24 * GiB, 64 * GiB)).fits


def test_two_nodes_of_8_gpus_are_planned_as_two_nodes_not_one_of_16(monkeypatch):
    """The topology is the Hardware's, not the environment's: a 2 x 8 job rendered where no launcher set
    LOCAL_WORLD_SIZE was planned as one node of 16 GPUs (host memory per node for 16 ranks, NVLink bandwidth)."""
    from dsfleet.spec import parse_args
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    spec = parse_args(["--preset", "t5_3b", "--bf16", "--zero", "auto", "--per_device_train_batch_size", "8"])
    pl = P.plan_for_spec(spec, Hardware(2, 8, 24 * GiB, 256 * GiB))
    assert (pl.nodes, pl.gpus_per_node, pl.total_gpus) == (2, 8, 16)
    one_node = P.plan_for_spec(spec, Hardware(1, 16, 24 * GiB, 256 * GiB))
    assert (one_node.nodes, one_node.gpus_per_node) == (1, 16)
    both = list(zip(pl.candidates, one_node.candidates))
    # the inter-node link is slower: every collective costs more across two nodes
    assert all(a.cost_terms["communication"] > b.cost_terms["communication"] for a, b in both)
    # host memory per node (DeepSpeed's estimators, x1.5): ZeRO-3 optimizer offload keeps 16 B/param over the
    # nodes, so each of 2 nodes holds half; without offload each of a node's 8 ranks (not 16) stages its 16-bit
    # partition through the host at optimizer init (more than the largest layer zero.Init builds, for t5_3b)
    shape = P.model_shape("t5_3b")
    offload = [(a, b) for a, b in both if (a.zero_stage, a.offload) == (3, "optimizer->cpu")]
    assert offload and all(a.cpu_bytes_per_node == int(shape.n_params * 16 / 2 * 1.5) for a, _ in offload)
    assert all(b.cpu_bytes_per_node == int(shape.n_params * 16 * 1.5) for _, b in offload)
    zero3 = [(a, b) for a, b in both if (a.zero_stage, a.offload) == (3, "none")]
    assert zero3 and all(a.cpu_bytes_per_node == 8 * 2 * math.ceil(shape.n_params / 16)
                         > int(shape.largest_layer * 4 * 8 * 1.5) for a, _ in zero3)
    assert all(2 * a.cpu_bytes_per_node == b.cpu_bytes_per_node for a, b in zero3)
    # the environment no longer decides: a LOCAL_WORLD_SIZE of this process changes nothing
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert P.plan_for_spec(spec, Hardware(2, 8, 24 * GiB, 256 * GiB)).to_json() == pl.to_json()
    with pytest.raises(TypeError, match="Hardware"):
        P.plan_for_spec(spec, 16)


def test_format_plan_is_a_table_with_the_reason():
    text = P.format_plan(P.plan(preset="gpt2_xl", gpus=8, gpu_mem_bytes=40 * GiB, precision="bf16"))
    assert "ZeRO" in text and "peak" in text and "best: ZeRO-" in text
    assert len(text.splitlines()) > 10


# ---------------------------------------------------------------------------------------------------------
# The command line

def _cli(args, capsys):
    code = cli_main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_lists_every_candidate_with_integer_bytes(capsys):
    code, out, err = _cli(["--preset", "gpt2_xl", "--gpus", "4", "--gpu-mem", "40GiB", "--micro-batch", "4",
                           "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    cands = data["candidates"]
    assert len(cands) == len(P.OFFLOADS) * len(P.PRECISIONS) * 2  # stage/offload x precision x checkpointing
    for c in cands:
        assert c["zero_stage"] in (0, 1, 2, 3) and c["offload"] and isinstance(c["model_states_bytes"], int)
        assert all(isinstance(v, int) for v in c["gpu"].values())
        assert isinstance(c["cpu_bytes_per_node"], int) and isinstance(c["fits"], bool)
    assert data["best"]["fits"] and data["reason"]


def test_cli_params_count_and_human_table(capsys):
    code, out, err = _cli(["--params", "6.9B", "--gpus", "8", "--seq-len", "2048"], capsys)
    assert code == 0, err
    assert "best: " in out and "GPT-like" in out


def test_impossible_request_says_what_would_fit_and_exits_2(capsys):
    code, out, err = _cli(["--preset", "t5_11b", "--gpus", "1", "--gpu-mem", "16GiB", "--cpu-mem", "8GiB"], capsys)
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsfleet plan: t5_11b fits no ZeRO stage")
    assert re.search(r">= \d+ GPUs of 16.0 GiB with ZeRO-3", lines[0]) and "GiB CPU RAM" in lines[0]


def test_cli_needs_a_model(capsys):
    code, _, err = _cli(["--gpus", "2"], capsys)
    assert code == 2 and "pass --preset NAME or --params N" in err


def test_plan_is_fast():
    import time
    P.model_shape("gpt2_xl")
    t = time.perf_counter()
    P.plan(preset="gpt2_xl", gpus=8, nodes=2)
    assert time.perf_counter() - t < 2.0
    assert math.isfinite(P.plan(preset="gpt2_xl", gpus=1).best.est_step_cost)
