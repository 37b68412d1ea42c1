"""Training metrics: what rank 0 shows and records — a tqdm bar, metrics.jsonl, plot.png, and the trackers of
--report_to (TensorBoard, Weights & Biases, MLflow: dsfleet/trackers.py).

Throughput is measured, not assumed: tokens/s from the padded batch shapes actually computed, TFLOP/s from
a stated FLOP count (6 x params x tokens, plus the attention scores from the config's heads, head size and
layers — any transformers decoder or encoder-decoder — and Mamba's scan), MFU against a given peak.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from dsfleet import trackers
from dsfleet.cli import UsageError


class FlopCounter:
    """Training FLOPs of one batch, forward + backward = 3 x forward: 6 x parameters x tokens (the usual 6N,
    embeddings included) plus what 6N leaves out — attention scores (GPT-2: QK^T and AV over the sequence; T5:
    encoder self-, decoder self- and cross-attention; the cross-attention's keys and values run over the source)
    and Mamba's selective scan (9 FLOPs per token, channel and
    state in forward: discretize 3, state update 4, output 2). tests/test_flops.py checks every term against
    torch's FlopCounterMode on the tiny presets."""

    SCAN_FLOPS = 9  # per token x d_inner x d_state, forward
    # the decoder's cross-attention keys and values project the encoder's output (source tokens): T5/mT5, BART-likes
    CROSS_KV = (".EncDecAttention.k.", ".EncDecAttention.v.", ".encoder_attn.k_proj.", ".encoder_attn.v_proj.")

    def __init__(self, model, family: str):
        self.family = family
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in {id(p): p for p in params.values()}.values())
        ds_numel = [getattr(p, "ds_numel", p.numel()) for p in params.values()]  # ZeRO-3 partitions params
        total = max(total, sum(ds_numel))
        self.n_params = total
        cfg = model.config
        self.seq2seq = bool(getattr(cfg, "is_encoder_decoder", False))
        if self.seq2seq:
            enc = sum(getattr(p, "ds_numel", p.numel()) for n, p in params.items()
                      if ".encoder." in "." + n or any(k in "." + n for k in self.CROSS_KV))
            self.n_enc, self.n_dec = enc, total - enc
            heads = _first(cfg, "num_heads", "encoder_attention_heads", "num_attention_heads")
            self.inner = heads * (_first(cfg, "d_kv", "head_dim") or _first(cfg, "d_model", "hidden_size") // heads)
            self.layers_enc = _first(cfg, "num_layers", "encoder_layers", "num_hidden_layers")
            self.layers_dec = _first(cfg, "num_decoder_layers", "decoder_layers") or self.layers_enc
        # attention scores: QK^T and AV, 2 x 2 x seq x (heads x head_dim) per token and layer in forward, x3
        self.attn = 0
        if family == "gpt2":
            self.attn = 12 * cfg.n_layer * cfg.n_embd
        elif family != "mamba" and not self.seq2seq:
            heads = _first(cfg, "num_attention_heads", "n_head")
            hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
            head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0)
            self.attn = 12 * (_first(cfg, "num_hidden_layers", "n_layer") or 0) * (heads or 0) * head_dim
        self.scan = (3 * self.SCAN_FLOPS * cfg.num_hidden_layers * cfg.intermediate_size * cfg.state_size
                     if family == "mamba" else 0)

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        ids = batch["input_ids"]
        if self.seq2seq:
            labels = batch["labels"]
            rows, src, tgt = ids.shape[0], ids.shape[-1], labels.shape[-1]
            scores = 12.0 * rows * self.inner * (self.layers_enc * src * src + self.layers_dec * (tgt * tgt + tgt * src))
            return 6.0 * (self.n_enc * ids.numel() + self.n_dec * labels.numel()) + scores
        seq = ids.shape[-1]
        return (6.0 * self.n_params + self.attn * seq + self.scan) * ids.numel()


def _first(cfg, *names):
    """The first of these config attributes that is set (configs name the same dim differently)."""
    for name in names:
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return 0


def batch_tokens(batch: dict[str, torch.Tensor], seq2seq: bool) -> int:
    return batch["input_ids"].numel() + (batch["labels"].numel() if seq2seq else 0)


def peak_memory() -> dict[str, int]:
    """The device's peaks (on CPU ranks the process's) and the rank process's peak RSS on its host, which is what a
    node's or a pod's memory limit is measured against (the planner's host column)."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        return {"peak_mem_bytes": torch.cuda.max_memory_allocated(),
                "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved(), "host_peak_rss_bytes": host}
    return {"peak_mem_bytes": host, "host_peak_rss_bytes": host}


def live_memory() -> str:
    import psutil
    vm = psutil.virtual_memory()
    text = f"cpu: process rss {psutil.Process().memory_info().rss / 2**30:.2f} GiB, host used {vm.used / 2**30:.1f}/{vm.total / 2**30:.1f} GiB"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        text += (f" | gpu{torch.cuda.current_device()}: allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
                 f"reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
                 f"device used {(total - free) / 2**30:.1f}/{total / 2**30:.1f} GiB")
    return text


class MetricsLog:
    """Rank 0 writes; other ranks hold a silent instance so the loop reads the same on every rank.

    Every row goes to each tracker of `report_to` (trackers.check_trackers: jsonl always); the spec in the run
    dir's spec.yaml is the trackers' config. A tracker that fails mid-run (a server gone, its process killed by a
    preemption signal) is warned about once and left out from then on: training and the checkpoint go on."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int, peak_tflops: float | None,
                 world_size: int, show_progress: bool, report_to: list[str], tags: dict[str, str] | None = None):
        self.enabled, self.peak, self.world, self.total_steps = enabled, peak_tflops, world_size, total_steps
        self.tags = dict(tags or {})  # constant facts of the run in every train row (e.g. mamba_scan)
        self.path = out_dir / "metrics.jsonl"
        self.active: dict[str, Any] = {}
        self.bar = None
        self._window_start = time.perf_counter()
        self._tokens = self._flops = 0.0
        if not enabled:
            if agree_on_start(None) is not None:
                raise SystemExit(2)  # rank 0 says why in one line; the others leave now, not at the next collective
            return
        try:  # every rank waits in agree_on_start for this one's answer
            names = trackers.check_trackers(report_to)
            self.active = trackers.open_trackers(names, out_dir, run_config(out_dir, world_size, self.tags))
        except UsageError as e:
            agree_on_start(str(e))
            raise
        agree_on_start(None)
        print(f"dsfleet: metrics to {', '.join(names)}", flush=True)
        if show_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def count(self, tokens: int, flops: float) -> None:
        """Per micro-batch, this rank's share; scaled by world size at log time (ranks run the same shapes)."""
        self._tokens += tokens
        self._flops += flops

    def should_log(self, step: int, every: int) -> bool:
        """A train row every --logging_steps steps and at the last step (every rank asks: the row is a collective)."""
        return step % every == 0 or step == self.total_steps

    def log_train(self, step: int, **values: Any) -> dict[str, Any]:
        if not self.enabled:
            return {}
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        row = {"step": step, "time": round(time.time(), 3), **self.tags, **values,  # time: unix, at the log
               "tokens_per_s": self._tokens * self.world / elapsed,
               "tflops": self._flops * self.world / elapsed / 1e12}
        row["tflops_per_gpu"] = row["tflops"] / self.world
        if self.peak:
            row["mfu"] = row["tflops_per_gpu"] / self.peak
        row.update(peak_memory())
        self._window_start, self._tokens, self._flops = time.perf_counter(), 0.0, 0.0
        self._send("train", row)
        if self.bar:
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        return row

    def log_eval(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self._send("eval", {"step": step, **values})
        if self.bar:
            self.bar.write("eval step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in values.items())))
        else:
            print(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()), flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar:
            self.bar.update(n)

    def reset_window(self) -> None:
        if self.enabled:
            self._window_start, self._tokens, self._flops = time.perf_counter(), 0.0, 0.0

    def _send(self, section: str, row: dict[str, Any]) -> None:
        for name in list(self.active):
            self._guarded(name, lambda t: t.log(section, row))

    def _guarded(self, name: str, call) -> None:
        if name == "jsonl":  # handles its own disk errors; anything else is a bug to see
            return call(self.active[name])
        try:
            call(self.active[name])
        except Exception as e:  # noqa: BLE001 — a tracker must not end a run; metrics.jsonl keeps every row
            print(f"dsfleet: warning: {name} failed ({trackers.first_line(e)}) — it gets no more metrics from this run; "
                  f"metrics.jsonl has them all", flush=True)
            self.active.pop(name).abandon()

    def close(self) -> None:
        """Ends every tracker's run (the done and the preempted path both call it), draws plot.png; again: redraws."""
        if not self.enabled:
            return
        if self.bar:
            self.bar.close()
            self.bar = None
        for name in list(self.active):
            self._guarded(name, lambda t: t.close())
        self.active = {}
        plot(self.path, self.path.parent / "plot.png")


def agree_on_start(failure: str | None) -> str | None:
    """Rank 0's tracker start (None: started), told to every rank by one small broadcast."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failure
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_config(out_dir: Path, world_size: int, tags: dict[str, Any]) -> dict[str, Any]:
    """What the trackers record as the run's config/params: the spec the run dir holds, world size, the row tags."""
    import yaml
    spec_file = out_dir / "spec.yaml"
    spec = yaml.safe_load(spec_file.read_text()) if spec_file.is_file() else {}
    return {**(spec or {}), "world_size": world_size, **tags}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r or "bleu" in r]
    if not train:
        return
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(14 if evals else 10, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if any("eval_loss" in r for r in evals):
        axes[0].plot([r["step"] for r in evals if "eval_loss" in r], [r["eval_loss"] for r in evals if "eval_loss" in r],
                     "o-", label="eval loss")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green")
    axes[1].set(xlabel="step", ylabel="tokens/s", title="throughput (all ranks)")
    if evals:
        key = "bleu" if any("bleu" in r for r in evals) else "eval_loss"
        axes[2].plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-", color="tab:red")
        axes[2].set(xlabel="step", ylabel=key, title=key)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
