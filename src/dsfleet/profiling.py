"""Where a training step's time goes, for tuning the fast path: `DSFLEET_PROFILE=DIR` (the bench's `--profile`)
profiles three steps of rank 0 with torch.profiler and writes

- `profile.txt`: kernels and ops by device time, then by input shape (which tensors the big elementwise
  kernels touch);
- `gaps.txt`: how long the device sat idle in those steps and where the host was meanwhile — in the engine's
  forward, backward or step (wrapped here in `dsfleet.*` ranges) or in the loop between them, and in which ops
  (and Python functions with `DSFLEET_PROFILE_STACK=1`, which slows the host several-fold and so distorts
  exactly this) — on a GPU the step is host-bound exactly where these are;
- `trace.json`: the Chrome trace (chrome://tracing, Perfetto).
"""
from __future__ import annotations

import bisect
import json
import os
from collections import defaultdict
from pathlib import Path

import torch

ACTIVE_STEPS = 3
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
MIN_GAP_US = 5.0  # shorter device idle is launch jitter, not a host-bound stretch


def attach_profiler(engine, out: Path, total_steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile, schedule
    out.mkdir(parents=True, exist_ok=True)
    wait = max(total_steps - ACTIVE_STEPS - 1, 0)  # the last steps, after any timed window
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])

    def ready(prof) -> None:
        events = prof.key_averages()
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=40, max_name_column_width=60,
                                                                      max_shapes_column_width=90)
        (out / "profile.txt").write_text(f"steps {wait + 2}..{wait + 1 + ACTIVE_STEPS}, sorted by {key}\n"
                                         f"{events.table(sort_by=key, row_limit=60)}\n\nby input shape\n{by_shape}\n")
        prof.export_chrome_trace(str(out / "trace.json"))
        if on_gpu:
            (out / "gaps.txt").write_text(gap_report(json.loads((out / "trace.json").read_text())))
        print(f"dsfleet: profile of {ACTIVE_STEPS} steps written to {out}", flush=True)

    prof = profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=ACTIVE_STEPS, repeat=1),
                   on_trace_ready=ready, record_shapes=True,
                   with_stack=os.environ.get("DSFLEET_PROFILE_STACK") == "1")
    prof.start()
    for name in ("forward", "backward"):
        setattr(engine, name, _ranged(f"dsfleet.{name}", getattr(engine, name)))
    step = _ranged("dsfleet.step", engine.step)

    def profiled_step(*args, **kwargs):
        result = step(*args, **kwargs)
        prof.step()
        return result

    engine.step = profiled_step


def _ranged(name: str, fn):
    """`fn` inside a profiler range called `name` (an instance attribute: shadows the engine's method)."""
    def call(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return call


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _overlap(gaps: list[tuple[float, float]], starts: list[float], start: float, end: float) -> float:
    """Total length of [start, end) that falls in the sorted, disjoint `gaps`."""
    total, i = 0.0, max(bisect.bisect_right(starts, start) - 1, 0)
    while i < len(gaps) and gaps[i][0] < end:
        total += max(0.0, min(end, gaps[i][1]) - max(start, gaps[i][0]))
        i += 1
    return total


def gap_report(trace: dict, top: int = 40) -> str:
    """Device idle time inside the profiled steps, attributed to the host-side functions and ops running then."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                   if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("ProfilerStep#"))
    if not steps:
        return "no ProfilerStep events in the trace\n"
    lo, hi = steps[0][0], steps[-1][1]
    busy = _merge([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATEGORIES])
    gaps, cursor = [], lo
    for start, end in busy:
        if start > cursor and start - cursor >= MIN_GAP_US and start > lo:
            gaps.append((max(cursor, lo), min(start, hi)))
        cursor = max(cursor, end)
        if cursor >= hi:
            break
    if hi - cursor >= MIN_GAP_US:
        gaps.append((cursor, hi))
    gaps = [g for g in gaps if g[1] > g[0]]
    starts = [g[0] for g in gaps]
    idle = sum(end - start for start, end in gaps)
    lines = [f"{len(steps)} profiled steps, {(hi - lo) / 1e3:.1f} ms wall: device idle {idle / 1e3:.1f} ms "
             f"({100 * idle / max(hi - lo, 1e-9):.0f} %) in {len(gaps)} gaps of >= {MIN_GAP_US:.0f} us"]
    for start, end, name in steps:
        step_idle = _overlap(gaps, starts, start, end)
        lines.append(f"  {name}: {(end - start) / 1e3:.1f} ms wall, {step_idle / 1e3:.1f} ms idle")
    in_phase = sum(_overlap(gaps, starts, e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("dsfleet."))
    lines.append(f"  idle outside the engine's forward/backward/step (the loop: data, logging): "
                 f"{(idle - in_phase) / 1e3:.1f} ms")
    for category, title in (("user_annotation", "ranges"), ("python_function", "Python functions"),
                            ("cpu_op", "ops (aten)")):
        spent: dict[str, float] = defaultdict(float)
        for e in events:
            if e.get("cat") == category and e["ts"] < hi and e["ts"] + e["dur"] > lo:
                spent[e["name"]] += _overlap(gaps, starts, e["ts"], e["ts"] + e["dur"])
        ranked = sorted(spent.items(), key=lambda kv: -kv[1])[:top]
        if not ranked:
            continue
        lines.append(f"\n{title} running while the device was idle (inclusive ms over the {len(steps)} steps):")
        lines += [f"  {ms / 1e3:9.2f}  {name[:150]}" for name, ms in ranked if ms > 0]
    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:15]
    lines.append("\nlongest gaps (ms, offset from the first step's start):")
    lines += [f"  {(end - start) / 1e3:7.2f} at +{(start - lo) / 1e3:.1f}" for start, end in longest]
    return "\n".join(lines) + "\n"


# ---- where the peak's bytes are: DSFLEET_MEMORY_SNAPSHOT=DIR (the bench's --memory-snapshot) ------------------
SNAPSHOT_STEPS = 2  # the first step allocates the optimizer's state; the second is a steady one


def start_memory_history() -> bool:
    """Record every CUDA allocation from here on (Python stacks), for memory_report(); False where there is no
    CUDA (a CPU rank's memory is the process's, which this cannot attribute)."""
    if not torch.cuda.is_available():
        return False
    stacks = "all" if os.environ.get("DSFLEET_MEMORY_STACKS") == "all" else "python"  # all: C++ frames too (slow)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="all", stacks=stacks)
    return True


def attach_memory_snapshot(engine, out: Path) -> None:
    """After SNAPSHOT_STEPS steps: write memory_peak.txt (memory_report) and the raw snapshot (memory.pickle, for
    pytorch.org/memory_viz), then stop recording."""
    out.mkdir(parents=True, exist_ok=True)
    step, taken = engine.step, [0]

    def snapshotting_step(*args, **kwargs):
        result = step(*args, **kwargs)
        taken[0] += 1
        if taken[0] == SNAPSHOT_STEPS:
            import pickle
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            (out / "memory.pickle").write_bytes(pickle.dumps(snap))
            (out / "memory_peak.txt").write_text(memory_report(snap, torch.cuda.max_memory_allocated()))
            print(f"dsfleet: memory snapshot of {SNAPSHOT_STEPS} steps written to {out}", flush=True)
        return result

    engine.step = snapshotting_step


def _site(frames: list[dict]) -> str:
    """The allocation's first frame in model, DeepSpeed or dsfleet code (not torch's own machinery)."""
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in ("/transformers/", "/deepspeed/", "/dsfleet/", "/mamba_ssm/")):
            short = name.split("/site-packages/")[-1].split("/src/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    for f in frames:
        if f.get("filename", "").endswith(".py"):
            return f"{f['filename'].split('/site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
    return "(no Python frame)"


def memory_report(snap: dict, max_allocated: int, top: int = 45, blocks: int = 8, frames: int = 14) -> str:
    """Replay the recorded allocations to the highest allocated moment and say which code holds its bytes,
    grouped by allocation site; bytes allocated before recording began (the model's weights) are one line."""
    traces = snap.get("device_traces", [[]])
    events = traces[0] if traces else []
    recorded = sum(e["size"] for e in events if e["action"] == "alloc")

    def replay(upto: int) -> tuple[dict[int, int], int, int]:
        """The blocks live after event `upto` (addr -> event index), and the highest total and its event."""
        live: dict[int, int] = {}
        now = peak = peak_index = 0
        for i, e in enumerate(events[:upto + 1]):
            if e["action"] == "alloc":
                live[e["addr"]] = i
                now += e["size"]
                if now > peak:
                    peak, peak_index = now, i
            elif e["action"] == "free_completed" and e["addr"] in live:
                now -= events[live.pop(e["addr"])]["size"]
        return live, peak, peak_index

    _, peak, peak_index = replay(len(events) - 1)
    at_peak = [(events[i]["size"], _site(events[i].get("frames", [])), i) for i in replay(peak_index)[0].values()]
    before = max_allocated - peak  # allocated before recording started (weights) — if the peak is inside it
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, site, _ in at_peak:
        by_site[site][0] += size
        by_site[site][1] += 1
    gib = 2**30
    lines = [f"max_memory_allocated {max_allocated / gib:.3f} GiB; recorded allocations live at their highest "
             f"{peak / gib:.3f} GiB (event {peak_index} of {len(events)}; {recorded / gib:.1f} GiB allocated in all); "
             f"the rest, {before / gib:.3f} GiB, was allocated before recording began (the model's weights)",
             f"{'GiB':>8} {'blocks':>7}  first frame in model / DeepSpeed / dsfleet code"]
    ranked = sorted(by_site.items(), key=lambda kv: -kv[1][0])
    for site, (size, count) in ranked[:top]:
        lines.append(f"{size / gib:8.3f} {count:7d}  {site}")
    rest = ranked[top:]
    if rest:
        lines.append(f"{sum(v[0] for _, v in rest) / gib:8.3f} {sum(v[1] for _, v in rest):7d}  ({len(rest)} more sites)")
    lines.append(f"\nthe {blocks} largest blocks at the peak, with their stacks (innermost first):")
    for size, _, i in sorted(at_peak, key=lambda v: -v[0])[:blocks]:
        lines.append(f"{size / gib:8.3f} GiB, event {i}:")
        lines += [f"           {f.get('filename', '?').split('/site-packages/')[-1]}:{f.get('line')} {f.get('name', '')[:120]}"
                  for f in events[i].get("frames", [])[:frames]]
    return "\n".join(lines) + "\n"
