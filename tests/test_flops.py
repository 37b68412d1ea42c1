"""The numerator of every MFU dsfleet publishes: metrics.FlopCounter against torch's own FlopCounterMode, which
counts the matrix products a real forward + backward dispatches. On the tiny preset of each family the two must
agree exactly once the terms that are not matrix products are named: 6N counts every parameter, but embedding
lookups, norms and biases take part in no product; Mamba's scan is mostly elementwise (FlopCounterMode sees only
its C·h product). A wrong term (a missing attention part, encoder params counted on target tokens, a scan counted
per layer twice) breaks the identity."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsfleet.metrics import FlopCounter
from dsfleet.models import load_model
from dsfleet.presets import get_preset

ROWS, SRC, TGT = 2, 48, 40


def not_in_a_product(model) -> dict[str, int]:
    """Parameters used by no matrix product, by name (each shared tensor once, under the name FlopCounter sees):
    embedding lookups (an output embedding tied to one is a product), norm weights, biases (added, not
    multiplied), Mamba's A_log and D (elementwise)."""
    out_w = model.get_output_embeddings().weight
    owner = {id(p): mod for mod in model.modules() for p in mod.parameters(recurse=False)}
    counts = {}
    for name, p in model.named_parameters():
        mod = owner[id(p)]
        if isinstance(mod, torch.nn.Embedding) and p is not out_w or name.rsplit(".", 1)[-1] in ("bias", "A_log", "D") \
                or "norm" in type(mod).__name__.lower():
            counts[name] = p.numel()
    return counts


def measured(model, batch) -> tuple[float, dict]:
    with FlopCounterMode(display=False) as mode:
        model(**batch).loss.backward()
    by_op = {str(op).split(".")[1]: n for op, n in mode.get_flop_counts()["Global"].items()}
    return mode.get_total_flops(), by_op


@pytest.mark.parametrize("name", ["gpt2_tiny", "t5_tiny", "mamba_tiny"])
def test_flop_counter_agrees_with_torch_flop_counter(name):
    torch.manual_seed(0)
    preset = get_preset(name)
    model = load_model(preset, None, True, {}, attn_implementation="eager")
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (ROWS, SRC))
    labels = torch.randint(3, cfg.vocab_size, (ROWS, TGT)) if preset.family == "t5" else ids.clone()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ours = FlopCounter(model, preset.family)(batch)
    torch_total, by_op = measured(model, batch)
    idle = not_in_a_product(model)
    if preset.family == "gpt2":
        expected = ours - 6 * sum(idle.values()) * ids.numel()
    elif preset.family == "t5":
        enc = sum(n for name, n in idle.items() if name.startswith("encoder."))
        expected = ours - 6 * (enc * ids.numel() + (sum(idle.values()) - enc) * labels.numel())
    else:
        # FlopCounterMode counts a depthwise (grouped) convolution's backward as if it were dense: take it as the
        # 2 x forward it is (the conv weight is in 6N like any product's); the scan: FlopCounter's 9 per (token,
        # channel, state) in forward against the 2 of C·h that FlopCounterMode sees
        torch_total += 2 * by_op["convolution"] - by_op["convolution_backward"]
        per_flop = 3 * cfg.num_hidden_layers * cfg.intermediate_size * cfg.state_size * ids.numel()
        expected = ours - 6 * sum(idle.values()) * ids.numel() - (FlopCounter.SCAN_FLOPS - 2) * per_flop
    assert torch_total == pytest.approx(expected, rel=2e-3), (name, torch_total, expected, by_op)
