"""`dsfleet bench` and the fast path on CPU: the fused chunked cross-entropy is the model's own loss (values and
gradients), the fast forward of GPT-2 and T5 changes no number, regional torch.compile keeps one graph for all
layers, and the cpu_smoke suite runs dsfleet (plain and fast) against HF Trainer + DeepSpeed end to end — both
sides produce numbers and the fast path's loss curve is the plain path's (fp32: relative 1e-4 per step)."""
import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from dsfleet import bench, fastpath
from dsfleet.models import build_config, family
from dsfleet.presets import get_preset


@pytest.mark.parametrize("n, vocab, chunk_rows", [(300, 517, 64), (64, 50, 4096)])
def test_linear_cross_entropy_is_the_plain_loss(monkeypatch, n, vocab, chunk_rows):
    """fp64 so the comparison is exact up to summation order: several chunks, a vocab padded inside the op
    (517 -> 576, padded columns at -inf), ignored targets, and the no-grad path."""
    monkeypatch.setattr(fastpath, "CHUNK_BYTES", chunk_rows * 4 * 576)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 32, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 32, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::7] = -100
    want = F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=-100)
    got = fastpath.linear_cross_entropy(hidden, weight, targets)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(3 * want, (hidden, weight)), torch.autograd.grad(3 * got, (hidden, weight))):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert fastpath.linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(want.item(), rel=1e-12)


def _tiny(preset_name, **overrides):
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    return family(preset.family).model_cls(build_config(preset, **overrides))


@pytest.mark.parametrize("preset", ["gpt2_tiny", "t5_tiny"])
def test_fast_forward_changes_no_number(preset):
    """Fused loss + fused GELU against the stock model: the same loss and the same gradient for every parameter
    (eval mode: no dropout; fp32, as CPU ranks train) up to summation order. Calls without labels still reach
    the model's own forward, and the state dict is untouched."""
    plain = _tiny(preset, pad_token_id=0, eos_token_id=1) if preset == "t5_tiny" else _tiny(preset)
    fast = copy.deepcopy(plain)
    fam = get_preset(preset).family
    assert fastpath.fuse_activations(fast) == (2 if fam == "gpt2" else 0)
    fastpath.install_fused_loss(fast, fam)
    ids = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if fam == "t5":
        batch["labels"] = torch.cat([ids[:, :10], torch.full((3, 2), -100)], dim=1)
    plain.eval()
    fast.eval()
    want, got = plain(**batch).loss, fast(**batch).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    want.backward()
    got.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    if fam == "t5":
        no_labels["decoder_input_ids"] = ids[:, :4]
    assert fast(**no_labels).logits.shape[-1] == plain.config.vocab_size
    assert fast.state_dict().keys() == plain.state_dict().keys()


def test_regional_compile_is_one_graph_for_all_layers(monkeypatch):
    """torch.compile per block (aot_eager here: no C++ toolchain time) traces GPT-2's block once for all six
    layers, without graph breaks, and gives the eager loss."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("DSFLEET_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    plain = _tiny("gpt2_tiny", n_layer=6, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    fast = copy.deepcopy(plain)
    fastpath.install_fused_loss(fast, "gpt2")
    assert fastpath.compile_blocks(fast) == 6
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        got = fast(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        got.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert got.item() == pytest.approx(plain(input_ids=ids, labels=ids).loss.item(), rel=1e-6)
    torch._dynamo.reset()


@pytest.mark.slow
def test_cpu_smoke_suite(tmp_path, monkeypatch):
    """The harness end to end on one CPU rank: HF Trainer + DeepSpeed, dsfleet plain, dsfleet fast — real
    deepspeed launches — all produce tokens/s, and the loss curves of the two dsfleet paths agree."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--suite", "cpu_smoke", "--out", str(tmp_path / "out")])
    assert bench.run(args) == 0, (tmp_path / "out" / "results.md").read_text()
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {r["name"]: r for r in doc["results"]}
    assert set(runs) == {"hf_trainer_zero2", "dsfleet_plain", "dsfleet_fast"}
    for r in runs.values():
        assert r["ok"] and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and len(r["losses"]) == 8, r
        assert r["zero_stage"] == 2
    assert "fused chunked cross-entropy" in runs["dsfleet_fast"]["config"]
    (loss_check,) = [c for c in doc["checks"] if c["what"].startswith("loss curve")]
    assert loss_check["pass"] and loss_check["target"] == 1e-4, loss_check
    assert len(doc["loss_curves"]["cpu_smoke"]) == 8
    md = (tmp_path / "out" / "results.md").read_text()
    assert "hf_trainer_zero2" in md and "dsfleet_fast" in md and "PASS" in md
    hf_json = json.loads((tmp_path / "out" / "ds_configs" / "hf_zero2.json").read_text())
    assert hf_json["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in hf_json["zero_optimization"]
