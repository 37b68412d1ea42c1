"""Training metrics: what rank 0 shows and records — a tqdm bar, metrics.jsonl, TensorBoard, and plot.png.

Throughput is measured, not assumed: tokens/s from the padded batch shapes actually computed, TFLOP/s from
a stated per-family FLOP count (6 x params x tokens, plus GPT-2's attention term), MFU against a given peak.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch


class FlopCounter:
    """Training FLOPs of one batch (forward + backward = 3 x forward)."""

    def __init__(self, model, family: str):
        self.family = family
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in {id(p): p for p in params.values()}.values())
        ds_numel = [getattr(p, "ds_numel", p.numel()) for p in params.values()]  # ZeRO-3 partitions params
        total = max(total, sum(ds_numel))
        self.n_params = total
        if family == "t5":
            enc = sum(getattr(p, "ds_numel", p.numel()) for n, p in params.items() if n.startswith("encoder."))
            self.n_enc, self.n_dec = enc, total - enc
        cfg = model.config
        self.attn = 12 * getattr(cfg, "n_layer", 0) * getattr(cfg, "n_embd", 0) if family == "gpt2" else 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        ids = batch["input_ids"]
        if self.family == "t5":
            return 6.0 * (self.n_enc * ids.numel() + self.n_dec * batch["labels"].numel())
        seq = ids.shape[-1]
        return (6.0 * self.n_params + self.attn * seq) * ids.numel()


def batch_tokens(batch: dict[str, torch.Tensor], seq2seq: bool) -> int:
    return batch["input_ids"].numel() + (batch["labels"].numel() if seq2seq else 0)


def peak_memory() -> dict[str, int]:
    if torch.cuda.is_available():
        return {"peak_mem_bytes": torch.cuda.max_memory_allocated(),
                "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved()}
    return {"peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


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
    """Rank 0 writes; other ranks hold a silent instance so the loop reads the same on every rank."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int, peak_tflops: float | None,
                 world_size: int, show_progress: bool, report_to: list[str], tags: dict[str, str] | None = None):
        self.enabled, self.peak, self.world = enabled, peak_tflops, world_size
        self.tags = dict(tags or {})  # constant facts of the run in every train row (e.g. mamba_scan)
        self.path = out_dir / "metrics.jsonl"
        self.tb = self.bar = None
        self._window_start = time.perf_counter()
        self._tokens = self._flops = 0.0
        if not enabled:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"))
        if show_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def count(self, tokens: int, flops: float) -> None:
        """Per micro-batch, this rank's share; scaled by world size at log time (ranks run the same shapes)."""
        self._tokens += tokens
        self._flops += flops

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
        self._write(row)
        if self.bar:
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        return row

    def log_eval(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **values})
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

    def _write(self, row: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full or read-only disk must not kill training; the next checkpoint save reports it
            if not getattr(self, "_warned", False):
                print(f"dsfleet: warning: cannot write {self.path} ({e.strerror}) — metrics are not recorded", flush=True)
                self._warned = True
        if self.tb:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):  # TensorBoard keeps its own wall time
                    self.tb.add_scalar(("eval/" if k.startswith("eval") or k in ("bleu", "perplexity") else "train/") + k, v, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        plot(self.path, self.path.parent / "plot.png")


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
