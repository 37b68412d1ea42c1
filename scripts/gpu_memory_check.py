#!/usr/bin/env python3
"""Predicted vs measured peak GPU memory, on the GPU box, through dsfleet's real entry point.

Why this exists: the planner (dsfleet/planner/) is only worth what its numbers predict on a real GPU. This
script runs `python -m dsfleet.train` once per config (sequentially, one process each, a few steps, synthetic
tokens, models initialised from config on the GPU), reads the peak it logs (metrics.jsonl `peak_mem_bytes`, from
torch.cuda.max_memory_allocated, which is what the planner's `peak` predicts), and writes a markdown table and
JSON to $OUT. Two more runs emulate a 24 GiB card (--gpu_memory_fraction = 24 GiB / the card's total): one the planner says fits, one it
says does not; each is recorded as ran or out-of-memory.

    OUT=/tmp/out python scripts/gpu_memory_check.py            # < 9 minutes on one H100 80GB
    OUT=/tmp/out python scripts/gpu_memory_check.py --only t5_3b_z2,t5_3b_z3 --budget 300

A run is stopped (SIGKILL to its process group) as soon as its last step's metrics row is written: the final
checkpoint of a 3B model (~45 GB of optimizer state) would cost minutes and tells nothing about memory.
The parent never touches CUDA (the GPU total comes from nvidia-smi), so every run gets the whole card.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from dsfleet.bench import runner  # the launch/poll/kill loop, metrics reader and free port of `dsfleet bench`

GiB = 2**30
STEPS = 3
EMULATED_GB = 24  # the small card: the process gets this many GiB of the real one
TOLERANCE = 0.10

# name, preset, ZeRO stage, optimizer offload, checkpointing, micro-batch, sequence length (None: the preset's),
# fast path (None: the entry point's defaults; False: the stock transformers path), emulated card (None: whole GPU).
# Ordered by priority: when the time budget runs short the tail is skipped (and said so).
CONFIGS = [
    dict(name="gpt2_xl_z2", preset="gpt2_xl", zero=2, offload="none", ckpt=False, mb=8),
    dict(name="t5_3b_z2", preset="t5_3b", zero=2, offload="none", ckpt=False, mb=8),
    dict(name="t5_3b_z3", preset="t5_3b", zero=3, offload="none", ckpt=False, mb=8),
    dict(name="gpt2_xl_z1_stock", preset="gpt2_xl", zero=1, offload="none", ckpt=False, mb=2, fast=False),
    dict(name="emul24_gpt2_large_mb4", preset="gpt2_large", zero=2, offload="none", ckpt=False, mb=4,
         card_gb=EMULATED_GB),
    dict(name="emul24_gpt2_large_mb16", preset="gpt2_large", zero=2, offload="none", ckpt=False, mb=16,
         card_gb=EMULATED_GB),
    dict(name="mamba_1b_z2_offload_ckpt", preset="mamba_1b", zero=2, offload="cpu", ckpt=True, mb=8, seq=256),
    dict(name="gpt2_xl_z2_ckpt", preset="gpt2_xl", zero=2, offload="none", ckpt=True, mb=32),
    dict(name="t5_3b_z2_offload", preset="t5_3b", zero=2, offload="cpu", ckpt=False, mb=8),
]
MIN_RUN_S = 45  # do not start a run with less budget than this left


def gpu_info() -> dict:
    """Name and total memory from nvidia-smi: the parent must not create a CUDA context of its own."""
    rows = runner.gpu_query("name", "memory.total")
    if not rows:
        return {"name": "unknown (nvidia-smi lists no GPU)", "total_bytes": 80 * GiB}
    try:
        name, mib = rows[0]
        return {"name": name, "total_bytes": int(float(mib)) * 2**20}
    except Exception as e:  # noqa: BLE001 — reported, the runs still happen
        return {"name": f"unknown ({e.__class__.__name__})", "total_bytes": 80 * GiB}


def spec_defaults() -> dict:
    """The entry point's fast-path defaults (RunSpec), so the prediction plans the same path the run takes."""
    try:
        from dsfleet.spec import RunSpec
        fields = RunSpec.model_fields
        return {k: fields[k].default for k in ("fused_loss", "fused_activation") if k in fields}
    except Exception:  # noqa: BLE001
        return {}


def predict(cfg: dict, defaults: dict, card_bytes: int) -> dict:
    from dsfleet import planner
    shape = planner.model_shape(cfg["preset"])
    fast = cfg.get("fast")
    fused_loss = defaults.get("fused_loss", False) if fast is None else bool(fast)
    fused_act = defaults.get("fused_activation", False) if fast is None else bool(fast)
    c = planner.evaluate(shape, zero_stage=cfg["zero"], offload_optimizer=cfg["offload"], precision="bf16",
                         gradient_checkpointing=cfg["ckpt"], micro_batch=cfg["mb"], seq_len=cfg.get("seq"),
                         gpus=1, gpu_mem_bytes=card_bytes, fused_loss=fused_loss, fused_activation=fused_act)
    return {"peak_bytes": c.gpu["peak"], "need_bytes": c.gpu["need"], "fits": c.fits, "phase": c.peak_phase,
            "phases": c.phases, "activations_bytes": c.gpu["activations"], "model_states_bytes": c.model_states_bytes,
            "fused_loss": fused_loss, "fused_activation": fused_act}


def command(cfg: dict, out_dir: Path, defaults: dict, fraction: float | None) -> list[str]:
    cmd = [sys.executable, "-m", "dsfleet.train", "--preset", cfg["preset"], "--from_scratch", "--synthetic_data",
           "--zero", str(cfg["zero"]), "--bf16", "--per_device_train_batch_size", str(cfg["mb"]),
           "--max_steps", str(STEPS), "--logging_steps", "1", "--output_dir", str(out_dir), "--no_progress",
           "--report_to", "jsonl", "--export_hf", "false", "--max_train_samples", str(max(cfg["mb"] * 4, 64))]
    if cfg["offload"] != "none":
        cmd += ["--offload_optimizer", cfg["offload"]]
    if cfg["ckpt"]:
        cmd += ["--gradient_checkpointing"]
    if cfg.get("seq"):
        cmd += ["--block_size", str(cfg["seq"])]
    if cfg.get("fast") is False:
        for flag in ("fused_loss", "fused_activation"):
            if flag in defaults:
                cmd += [f"--{flag}", "false"]
    if fraction:
        cmd += ["--gpu_memory_fraction", f"{fraction:.6f}"]
    return cmd


def card_fraction(cfg: dict, total_bytes: int) -> float | None:
    """The share of this GPU that leaves `card_gb` GiB to the process: 24 GiB of an H200's 140 GiB is 0.17, not
    24/80 (which is what an 80 GB card would need and leaves 42 GiB on an H200)."""
    return min(1.0, cfg["card_gb"] * GiB / total_bytes) if cfg.get("card_gb") else None


def run_one(cfg: dict, work: Path, logs: Path, defaults: dict, timeout: float,
            total_bytes: int) -> dict:
    out_dir = work / cfg["name"]
    fraction = card_fraction(cfg, total_bytes)
    cmd = command(cfg, out_dir, defaults, fraction)
    env = runner.source_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                            TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(runner.free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    log_path = logs / f"{cfg['name']}.log"
    metrics = out_dir / "metrics.jsonl"
    # done measuring once the last step's row is written (or out of time): the final checkpoint and export are
    # skipped (the runner kills the process group)
    run = runner.launch(cmd, env, log_path, done=lambda: runner.last_step(metrics, "peak_mem_bytes") >= STEPS,
                        timeout=timeout, poll_s=0.5, cwd=REPO)
    text = log_path.read_text(errors="replace")
    rows = [r for r in runner.read_rows(metrics) if "peak_mem_bytes" in r]
    oom = "out of memory" in text.lower() or "outofmemoryerror" in text.lower()
    if run.reached:
        status = "completed"
    elif run.timed_out:
        status = "timeout"
    else:
        status = "oom" if oom else f"failed (rc {run.rc})"
    lines = text.splitlines()
    # what the run actually used: dsfleet's fast-path line, transformers' kernel fallbacks (Mamba's scan)
    notes = sorted({line.strip()[:200] for line in lines if "fast path:" in line or "falling back to" in line})
    log_path.write_text("\n".join(lines[-80:]) + "\n")  # keep what comes back small
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"status": status, "rc": run.rc, "seconds": round(run.wall_s, 1), "command": " ".join(cmd),
            "steps_logged": len(rows),
            "measured_peak_bytes": max((r["peak_mem_bytes"] for r in rows), default=None),
            "measured_reserved_bytes": max((r.get("peak_mem_reserved_bytes", 0) for r in rows), default=None)
            if rows else None,
            "tokens_per_s": rows[-1].get("tokens_per_s") if rows else None, "notes": notes}


def markdown(results: list[dict], info: dict) -> str:
    lines = [f"GPU: {info['gpu']['name']}, {info['gpu']['total_bytes'] / GiB:.1f} GiB; torch {info['torch']}, "
             f"deepspeed {info['deepspeed']}, transformers {info['transformers']}; {STEPS} steps per run, bf16, "
             f"synthetic tokens, models initialised from config.", "",
             "| config | ZeRO | offload | ckpt | micro-batch x tokens | fast path | predicted peak GiB (phase) | "
             "measured peak GiB | error | status | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, p = r["config"], r.get("prediction", {})
        seq = c.get("seq") or "preset"
        meas = r.get("measured_peak_bytes")
        err = f"{(p['peak_bytes'] - meas) / meas:+.1%}" if (meas and p) else "-"
        lines.append(f"| {c['name']} | {c['zero']} | {c['offload']} | {'on' if c['ckpt'] else '-'} | "
                     f"{c['mb']} x {seq} | {'stock' if c.get('fast') is False else 'default'} | "
                     f"{p.get('peak_bytes', 0) / GiB:.2f} ({p.get('phase', '-')}) | "
                     f"{(meas / GiB) if meas else float('nan'):.2f} | {err} | {r['status']} | {r.get('seconds', '-')} |")
    emulated = [r for r in results if r["config"].get("card_gb")]
    if emulated:
        lines += ["", f"Emulated {EMULATED_GB} GiB card (`--gpu_memory_fraction` = {EMULATED_GB} GiB / the GPU's total):", "",
                  "| config | planner on a 24 GiB card | predicted need GiB | outcome | verdict holds |",
                  "|---|---|---|---|---|"]
        for r in emulated:
            p = r.get("prediction", {})
            ran = r["status"] == "completed"
            holds = (p.get("fits") and ran) or (not p.get("fits") and r["status"] == "oom")
            lines.append(f"| {r['config']['name']} | {'fits' if p.get('fits') else 'does not fit'} | "
                         f"{p.get('need_bytes', 0) / GiB:.2f} | {'ran ' + str(STEPS) + ' steps' if ran else r['status']} "
                         f"| {'yes' if holds else 'NO'} |")
    within = [r for r in results if not r["config"].get("card_gb") and r.get("measured_peak_bytes")]
    ok = sum(abs(r["prediction"]["peak_bytes"] - r["measured_peak_bytes"]) <= TOLERANCE * r["measured_peak_bytes"]
             for r in within)
    lines += ["", f"{ok} of {len(within)} measured configs within {TOLERANCE:.0%} of the prediction."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=510, help="seconds for all runs (default 510)")
    ap.add_argument("--only", help="comma-separated config names")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per run at most")
    ap.add_argument("--dry-run", action="store_true", help="print predictions and commands, run nothing")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT") or "memory_check_out")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from importlib.metadata import version  # versions without importing deepspeed (no accelerator probing here)
    info = {"gpu": gpu_info(), "torch": version("torch"), "deepspeed": version("deepspeed"),
            "transformers": version("transformers"), "python": sys.version.split()[0]}
    defaults = spec_defaults()
    configs = [c for c in CONFIGS if not args.only or c["name"] in args.only.split(",")]
    work = Path(tempfile.mkdtemp(prefix="dsfleet_memcheck_"))
    results = []
    for cfg in configs:
        card = int(cfg["card_gb"] * GiB) if cfg.get("card_gb") else info["gpu"]["total_bytes"]
        entry = {"config": cfg}
        try:
            entry["prediction"] = predict(cfg, defaults, card)
        except Exception as e:  # noqa: BLE001 — recorded; the run still tells the measured side
            entry["prediction"] = {}
            entry["prediction_error"] = f"{type(e).__name__}: {e}"
        left = args.budget - (time.time() - t0)
        if args.dry_run:
            entry.update(status="dry run", command=" ".join(command(cfg, work / cfg["name"], defaults,
                                                                     card_fraction(cfg, info["gpu"]["total_bytes"]))))
            print(entry["command"])
        elif left < MIN_RUN_S:
            entry.update(status=f"skipped ({left:.0f}s of budget left)")
        else:
            entry.update(run_one(cfg, work, out / "logs", defaults, min(args.timeout, left - 5),
                                info["gpu"]["total_bytes"]))
        results.append(entry)
        meas = entry.get("measured_peak_bytes")
        pred = entry.get("prediction", {}).get("peak_bytes")
        print(f"[{time.time() - t0:5.0f}s] {cfg['name']}: {entry['status']}, predicted "
              f"{(pred or 0) / GiB:.2f} GiB, measured {(meas or 0) / GiB:.2f} GiB", flush=True)
        (out / "memory_check.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    table = markdown(results, info)
    (out / "memory_check.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
