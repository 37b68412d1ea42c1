#!/usr/bin/env python3
"""Data start-up benchmark (issue 22), not a timed test: how long a 2-rank CPU run takes to its first step, and how
much memory each rank holds, on corpora of a given size — today's in-memory path (every rank tokenizes the whole
corpus with datasets.map(keep_in_memory=True)) against the token cache, in the same run, on the same files.

For each size it generates a plain-text corpus (one text a line, Zipf-distributed pseudo-words) under --work and
measures:
  cold prepare      `dsfleet prepare` from nothing (fresh datasets cache, fresh token cache): loading, the BPE
                    trained on the text, tokenizing with every core; wall, MB/s, peak RSS (the preparer and its
                    worker tree)
  prepared start    `deepspeed --num_gpus 2 --module dsfleet.train ... --max_steps 2` on the prepared cache: launch
                    to the first logged step, peak RSS of each rank
  anchor            datasets.map(num_proc=cores, batched) with its own Arrow cache on the same file and tokenizer
                    (the same packing into blocks): load and tokenize times, to compare with the cold prepare's
  today's path      the same 2-rank run with the source tree of --baseline-rev (the merge base with main by
                    default), its datasets cache warm: launch to first step, peak RSS of each rank; stopped once a
                    rank passes --rss-cap-gb (the number then says "more than")

    PYTHONPATH=src .venv/bin/python scripts/bench_data.py --sizes-mb 58 1100 --work /tmp/dsfleet-bench-data

Writes --work/results.json and prints a markdown table (docs/data.md has the numbers measured here).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRAIN = ["--preset", "gpt2_tiny", "--from_scratch", "--max_steps", "2", "--logging_steps", "1", "--no_progress",
         "--report_to", "jsonl", "--export_hf", "false", "--per_device_train_batch_size", "8"]


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Lines of 4-40 pseudo-words (a 20,000-word Zipf vocabulary) until the file has `megabytes` MB."""
    import numpy as np
    if path.is_file() and path.stat().st_size >= megabytes * 1e6:
        return path
    rng = np.random.default_rng(seed)
    syllables = np.array("ka lo mi ne su ta ri po ve da ho ju ce fa gi bu ze wo ly xe".split())
    words = np.array(["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(20_000)])
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w") as f:
        while written < target:
            lens = rng.integers(4, 41, 50_000)
            picks = words[rng.choice(len(words), int(lens.sum()), p=p)]
            ends = np.cumsum(lens)
            text = "\n".join(" ".join(picks[e - n:e]) for n, e in zip(lens, ends)) + "\n"
            if written + len(text) > target:  # stop at the first line end past the size asked for
                text = text[:text.index("\n", target - written) + 1]
            f.write(text)
            written += len(text)
    return path


def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def measure(cmd: list[str], env: dict, log: Path, rss_cap: float | None = None, timeout: float = 3600) -> dict:
    """Run cmd, sampling every 0.1 s the RSS of each rank process (`--local_rank=` in its command line) and of the
    whole process tree; stop it when a rank passes rss_cap bytes."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        root = psutil.Process(proc.pid)
        ranks: dict[int, int] = {}
        tree_peak = top_peak = 0
        killed = None
        while proc.poll() is None:
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            seen = {}
            for q in procs:
                try:
                    seen[q.pid] = (q.memory_info().rss, q.cmdline(), q.ppid())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            rank_of = {pid: next((a.split("=")[1] for a in cmd if a.startswith("--local_rank=")), None)
                       for pid, (_, cmd, _) in seen.items()}
            for pid, (rss, cmdline, ppid) in seen.items():
                total += rss
                if pid == proc.pid:
                    top_peak = max(top_peak, rss)
                rank = rank_of[pid]
                if rank is not None and rank_of.get(ppid) is None:  # a rank, not a worker it forked
                    ranks[int(rank)] = max(ranks.get(int(rank), 0), rss)
            tree_peak = max(tree_peak, total)
            if rss_cap and max([*ranks.values(), top_peak]) > rss_cap:
                killed = f"stopped at {time.time() - started:.0f} s: a rank passed {rss_cap / 2**30:.1f} GiB RSS"
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if time.time() - started > timeout:
                killed = f"stopped at the {timeout:.0f} s time limit"
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
        rc = proc.wait()
    return {"wall_s": round(time.time() - started, 1), "rc": rc, "killed": killed, "started_unix": started,
            "rank_peak_rss_mb": {r: round(v / 2**20) for r, v in sorted(ranks.items())},
            "tree_peak_rss_mb": round(tree_peak / 2**20), "top_peak_rss_mb": round(top_peak / 2**20),
            "log": str(log)}


def first_step_s(run_dir: Path, started: float) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    return round(steps[0]["time"] - started, 1) if steps else None


def launch_phases(log: Path, started: float, first_step: float | None) -> dict:
    """Where a 2-rank start-up's seconds went: from the `deepspeed` command to the launcher spawning the last rank
    (the runner and deepspeed.launcher.launch each import deepspeed; no dsfleet code runs yet), then from there to
    the first step (the ranks: imports, process group, model, engine, first step)."""
    import datetime
    spawned = [line for line in Path(log).read_text().splitlines() if "spawned with command" in line]
    if not spawned:
        return {}
    stamp = spawned[-1][1:spawned[-1].index("]")]
    at = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    out = {"launcher_s": round(at - started, 1)}
    if first_step is not None:
        out["ranks_to_first_step_s"] = round(first_step - out["launcher_s"], 1)
    return out


def prepared_starts(args, results: dict) -> None:
    """--prepared-only: the no-data floor and the 2-rank start on each size's already prepared cache (from an
    earlier full run in --work), nothing else: what a change to the ranks' start-up costs or saves."""
    rows = {}
    runs = [("floor", ["--synthetic_data", "--block_size", "64"])]
    for mb in args.sizes_mb:
        cache = args.work / f"{mb:g}MB" / "token-cache"
        if not (cache / "tokens").is_dir():
            raise SystemExit(f"{cache} has no prepared entry — run this size once without --prepared-only")
        tokenizer = results.get(f"{mb:g}", {}).get("tokenizer")  # the one that size was prepared with
        flags = ["--train_file", str(args.work / f"corpus_{mb:g}MB.txt"), "--cache_dir", str(cache),
                 *(["--tokenizer_name", tokenizer] if tokenizer and Path(tokenizer).is_dir() else [])]
        runs.append((f"{mb:g}", flags))
    for name, flags in runs:
        run = args.work / f"run-prepared-{name}"
        shutil.rmtree(run, ignore_errors=True)
        res = measure(deepspeed_cmd([*TRAIN, *flags, "--output_dir", str(run)]), env_with(PYTHONPATH=str(args.src)),
                      args.work / f"start-prepared-{name}.log")
        res["first_step_s"] = first_step_s(run, res["started_unix"])
        res["reused"] = "token cache reused" in Path(res["log"]).read_text()
        res.update(launch_phases(Path(res["log"]), res["started_unix"], res["first_step_s"]))
        res["load_average"] = os.getloadavg()
        res["src"] = str(args.src)
        rows[name] = res
        print(f"{name}: first step {res['first_step_s']} s (launcher {res.get('launcher_s')} s, ranks "
              f"{res.get('ranks_to_first_step_s')} s), ranks {', '.join(f'{v} MB' for v in res['rank_peak_rss_mb'].values())}"
              f", reused {res['reused']}, load {', '.join(f'{x:.2f}' for x in res['load_average'])}", flush=True)
    results.setdefault("prepared_only", []).append({"unix": time.time(), "rows": rows})


def step_times(args, results: dict) -> None:
    """--step-time: the step time on the 58 MB corpus's prepared cache, --src's tree against this one (and
    --other-src, or with --without-read-ahead this tree with the batches read at the step), ABAB
    (--step-time-rounds rounds), each run --step-time-steps steps: the median of its logged windows after the
    first 10 %, as ms a step (tokens of a step / tokens_per_s). CPU: 2 gpt2_tiny ranks; --gpu: one rank on the
    first GPU, --step-time-flags' model (default GPT-2 124M, micro-batch 16 x 1024, bf16)."""
    corpus = make_corpus(args.work / "corpus_58MB.txt", 58)
    cache = args.work / "58MB" / ("token-cache-gpu" if args.gpu else "token-cache")
    steps = args.step_time_steps
    model = shlex.split(args.step_time_flags or (GPU_STEP_FLAGS if args.gpu else ""))
    flags = ["--train_file", str(corpus), "--cache_dir", str(cache), "--max_steps", str(steps),
             "--logging_steps", str(max(steps // 10, 1)), *model]
    micro = int(flag_value([*TRAIN, *model], "--per_device_train_batch_size"))
    block = int(flag_value(model, "--block_size") or 64)
    step_tokens = micro * (1 if args.gpu else 2) * block
    out: dict = {}
    trees = {**({"src": args.src} if args.src.resolve() != (REPO / "src").resolve() else {}), "this": REPO / "src",
             **({"other": args.other_src} if args.other_src else {})}
    if args.without_read_ahead:
        trees["without_read_ahead"] = without_read_ahead(REPO / "src", args.work / "tree-without-read-ahead")
    for round_ in range(args.step_time_rounds):
        for name, src in trees.items():
            run = args.work / f"run-steptime-{name}"
            shutil.rmtree(run, ignore_errors=True)
            train = drop_flags(TRAIN, "--max_steps", "--logging_steps", *[f for f in model if f.startswith("--")])
            env = gpu_env(PYTHONPATH=str(src)) if args.gpu else env_with(PYTHONPATH=str(src))
            res = measure(deepspeed_cmd([*train, *flags, "--output_dir", str(run)], gpus=1 if args.gpu else 2,
                                        module_launcher=args.gpu), env, args.work / f"steptime-{name}.log")
            if not (run / "metrics.jsonl").is_file():
                raise SystemExit(f"{name}: no metrics.jsonl (rc {res.get('rc')}; log {res['log']})")
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            ms = sorted(1000 * step_tokens / r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > steps // 10)
            out.setdefault(name, []).append({"median": round(ms[len(ms) // 2], 2), "min": round(ms[0], 2)})
            print(f"round {round_}: {name} ({src}): {out[name][-1]} ms a step ({len(ms)} windows), "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    results.setdefault("step_time", []).append({"unix": time.time(), "src": str(args.src), "gpu": args.gpu,
                                                "flags": flags, "ms": out})


GPU_STEP_FLAGS = "--preset gpt2 --per_device_train_batch_size 16 --block_size 1024 --bf16"


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the flag's last occurrence (the one the train CLI keeps), or None."""
    at = [i for i, a in enumerate(argv) if a == flag]
    return argv[at[-1] + 1] if at else None


def drop_flags(argv: list[str], *names: str) -> list[str]:
    """argv without each named flag and its value (TRAIN's own where the step-time run sets them)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = a not in ("--from_scratch", "--bf16", "--no_progress")
        else:
            out.append(a)
    return out


def without_read_ahead(src: Path, dest: Path) -> Path:
    """A copy of `src` whose PrefetchedBatches reads each batch at the step (the inline read CPU ranks use): the
    step time of the read-ahead is this tree's against `src`'s."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest / "src", ignore=shutil.ignore_patterns("__pycache__"))
    data_py = dest / "src" / "dsfleet" / "data.py"
    text = data_py.read_text()
    line = "self.ahead = self.pin if ahead is None else ahead"
    if line not in text:
        raise SystemExit(f"{data_py}: no `{line}` to switch off — update without_read_ahead()")
    data_py.write_text(text.replace(line, "self.ahead = False"))
    return dest / "src"


def gpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    env["PYTHONPATH"] = ":".join(p for p in (extra.get("PYTHONPATH"), os.environ.get("PYTHONPATH")) if p)
    return env


def deepspeed_cmd(args: list[str], gpus: int = 2, module_launcher: bool = False) -> list[str]:
    """The deepspeed launcher over dsfleet.train (`module_launcher`: through this interpreter, where the venv has no
    `deepspeed` script, as on the GPU box)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"] if module_launcher else [str(VENV_BIN / "deepspeed")]
    return [*launcher, "--num_gpus", str(gpus), "--master_port", str(port), "--module", "dsfleet.train", *args]


ANCHOR = r'''
import json, os, sys, time
t0 = time.time()
import datasets
from dsfleet.data import fast_tokenizer
path, tok_json, block, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
raw = datasets.load_dataset("text", data_files={"train": path})["train"]
t1 = time.time()
tokenizer = fast_tokenizer(open(tok_json).read())
def encode_batched(batch):  # the same blocks, the tokenizer's batch call
    texts = [t for t in batch["text"] if t]
    ids = [i for seq in tokenizer(texts)["input_ids"] for i in (seq if seq and seq[-1] == tokenizer.eos_token_id
                                                                 else seq + [tokenizer.eos_token_id])]
    n = len(ids) // block * block
    return {"input_ids": [ids[i:i + block] for i in range(0, n, block)]}
out = raw.map(encode_batched, batched=True, batch_size=100_000, num_proc=workers, remove_columns=["text"])
t2 = time.time()
print(json.dumps({"load_s": round(t1 - t0, 1), "map_s": round(t2 - t1, 1),
                  "blocks": len(out)}))
'''


NEW_STEP = r'''
import json, resource, sys, time
from dsfleet import token_cache
from dsfleet.models import resolve_source
from dsfleet.spec import parse_args
spec = parse_args(sys.argv[1:])
source = resolve_source(spec)
t = time.time()
tokenizer, splits, entry = token_cache.prepare_once(spec, source, None, 1, say=lambda line: None)
step = max(1, len(splits["train"]) // 64)
rows = [splits["train"][i] for i in range(0, len(splits["train"]), step)]
print(json.dumps({"data_s": round(time.time() - t, 2), "rows": len(splits["train"]),
                  "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
'''
OLD_STEP = r'''
import json, resource, sys, time
from dsfleet import data
from dsfleet.models import resolve_source
from dsfleet.spec import parse_args
spec = parse_args(sys.argv[1:])
source = resolve_source(spec)
t = time.time()
raw = data.load_checked(spec, 1)
vocab = int(source.preset.config.get("vocab_size", 512))
tokenizer = (data.load_tokenizer(spec.tokenizer_name) if spec.tokenizer_name
             else data.train_bpe_tokenizer(data.training_texts(spec, raw), vocab))
splits = data.tokenize(spec, raw, tokenizer)
print(json.dumps({"data_s": round(time.time() - t, 2), "rows": len(splits["train"]),
                  "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
'''


def data_step(script: str, args: list[str], env: dict, log: Path, rss_cap: float | None, timeout: float) -> dict:
    """One process doing what one rank does for its data before the model is built (rank 0's share)."""
    res = measure([sys.executable, "-c", script, *args], env, log, rss_cap=rss_cap, timeout=timeout)
    lines = Path(log).read_text().strip().splitlines()
    if res["rc"] == 0 and lines:
        res.update(json.loads(lines[-1]))
    return res


def bench_size(mb: float, work: Path, baseline_src: Path, rss_cap: float, skip_old: bool, tokenizer: str | None,
               time_cap: float, skip_anchor: bool) -> dict:
    cores = len(os.sched_getaffinity(0))
    size_dir = work / f"{mb:g}MB"
    shutil.rmtree(size_dir, ignore_errors=True)
    size_dir.mkdir(parents=True)
    corpus = make_corpus(work / f"corpus_{mb:g}MB.txt", mb)
    nbytes = corpus.stat().st_size
    res: dict = {"size_mb": round(nbytes / 1e6, 1), "lines": sum(1 for _ in open(corpus, "rb")), "cores": cores}
    data_flags = ["--train_file", str(corpus), *(["--tokenizer_name", tokenizer] if tokenizer else [])]
    res["tokenizer"] = tokenizer or "byte-level BPE trained on the corpus"
    cache = size_dir / "token-cache"
    print(f"[{mb:g} MB] cold prepare", flush=True)
    cold = measure([sys.executable, "-m", "dsfleet.cli", "prepare", "--", *TRAIN, *data_flags, "--cache_dir", str(cache)],
                   env_with(HF_DATASETS_CACHE=str(size_dir / "hf-new"), PYTHONPATH=str(REPO / "src")),
                   size_dir / "prepare.log")
    manifest = json.loads(next((cache / "tokens").glob("*/manifest.json")).read_text())
    text = Path(cold["log"]).read_text()
    cold.update(tokenize_s=manifest["built_seconds"], workers=manifest["workers"],
                mb_per_s=round(nbytes / 1e6 / cold["wall_s"], 1),
                tokenize_mb_per_s=round(nbytes / 1e6 / manifest["built_seconds"], 1),
                train_rows=manifest["splits"]["train"]["rows"],
                notes=[line for line in text.splitlines() if line.startswith("dsfleet prepare:")])
    res["cold_prepare"] = cold
    print(f"[{mb:g} MB] start on the prepared corpus", flush=True)
    run = size_dir / "run-new"
    start = measure(deepspeed_cmd([*TRAIN, *data_flags, "--cache_dir", str(cache), "--output_dir", str(run)]),
                    env_with(HF_DATASETS_CACHE=str(size_dir / "hf-new"), PYTHONPATH=str(REPO / "src")),
                    size_dir / "start-new.log")
    start["first_step_s"] = first_step_s(run, start["started_unix"])
    start["reused"] = "token cache reused" in Path(start["log"]).read_text()
    res["prepared_start"] = start
    res["prepared_data_step"] = data_step(NEW_STEP, [*TRAIN, *data_flags, "--cache_dir", str(cache)],
                                          env_with(PYTHONPATH=str(REPO / "src")), size_dir / "step-new.log", None,
                                          time_cap)
    tok_json = next((cache / "tokens").glob("*/tokenizer.json"))
    anchor_env = env_with(HF_DATASETS_CACHE=str(size_dir / "hf-anchor"), PYTHONPATH=str(REPO / "src"))
    if not skip_anchor:
        print(f"[{mb:g} MB] anchor: datasets.map(num_proc={cores})", flush=True)
        anchor = measure([sys.executable, "-c", ANCHOR, str(corpus), str(tok_json), "64", str(cores)], anchor_env,
                         size_dir / "anchor.log", timeout=time_cap)
        lines = Path(anchor["log"]).read_text().strip().splitlines()
        if anchor["rc"] == 0 and lines:
            anchor.update(json.loads(lines[-1]))
            anchor["map_mb_per_s"] = round(nbytes / 1e6 / anchor["map_s"], 1)
        res["anchor"] = anchor
    if not skip_old:
        print(f"[{mb:g} MB] today's path ({baseline_src})", flush=True)
        run = size_dir / "run-old"
        old = measure(deepspeed_cmd([*TRAIN, *data_flags, "--output_dir", str(run)]),
                      env_with(HF_DATASETS_CACHE=str(size_dir / "hf-anchor"), PYTHONPATH=str(baseline_src)),
                      size_dir / "start-old.log", rss_cap=rss_cap, timeout=time_cap)
        old["first_step_s"] = first_step_s(run, old["started_unix"])
        res["todays_path"] = old
        res["todays_data_step"] = data_step(OLD_STEP, [*TRAIN, *data_flags], env_with(
            HF_DATASETS_CACHE=str(size_dir / "hf-anchor"), PYTHONPATH=str(baseline_src)), size_dir / "step-old.log",
            rss_cap, time_cap)
    for d in ("hf-new", "hf-anchor"):
        shutil.rmtree(size_dir / d, ignore_errors=True)
    return res


def table(results: list[dict]) -> str:
    rows = ["| corpus | path | prepare (wall) | tokenize | start-up to first step | peak RSS per rank |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        c, s, a = r["cold_prepare"], r["prepared_start"], r.get("anchor", {})
        size = f"{r['size_mb']:,.0f} MB ({r['lines']:,} lines)"
        rows.append(f"| {size} | token cache, cold `dsfleet prepare` ({c['workers']} workers) | {c['wall_s']} s "
                    f"({c['mb_per_s']} MB/s) | {c['tokenize_s']} s ({c['tokenize_mb_per_s']} MB/s) | — | preparer "
                    f"{c['top_peak_rss_mb']} MB (tree {c['tree_peak_rss_mb']} MB) |")
        rss = ", ".join(f"{v} MB" for v in s["rank_peak_rss_mb"].values())
        rows.append(f"| {size} | token cache, prepared: 2 ranks | — | — | {s['first_step_s']} s (run {s['wall_s']} s) "
                    f"| {rss} |")
        d = r.get("prepared_data_step", {})
        if "data_s" in d:
            rows.append(f"| {size} | token cache, prepared: the data step alone (one process) | — | — | {d['data_s']} s "
                        f"| {d['maxrss_mb']} MB (process peak) |")
        if "map_s" in a:
            rows.append(f"| {size} | anchor: datasets.map(num_proc={r['cores']}) + Arrow cache | load {a['load_s']} s "
                        f"| {a['map_s']} s ({a['map_mb_per_s']} MB/s) | — | — |")
        if "todays_path" in r:
            o = r["todays_path"]
            rss = ", ".join(f"{v} MB" for v in o["rank_peak_rss_mb"].values())
            first = f"{o['first_step_s']} s (run {o['wall_s']} s)" if o["first_step_s"] else f"— ({o['killed']})"
            rows.append(f"| {size} | today's path (in memory, every rank): 2 ranks | — | — | {first} | "
                        f"{'> ' if o['killed'] else ''}{rss} |")
            d = r.get("todays_data_step", {})
            if d:
                done = f"{d['data_s']} s" if "data_s" in d else f"— ({d['killed']})"
                peak = f"{d['maxrss_mb']} MB" if "maxrss_mb" in d else f"> {d['top_peak_rss_mb']} MB"
                rows.append(f"| {size} | today's path: the data step alone (rank 0's share, one process) | — | — | "
                            f"{done} | {peak} (process peak) |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[58])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dsfleet-bench-data"))
    parser.add_argument("--baseline-rev", default=None, help="git rev of today's path (default: merge base with main)")
    parser.add_argument("--rss-cap-gb", type=float, default=4.0, help="stop today's path when a rank passes this")
    parser.add_argument("--skip-old-above-mb", type=float, default=None, help="no today's-path run above this size")
    parser.add_argument("--skip-anchor-above-mb", type=float, default=None, help="no anchor run above this size")
    parser.add_argument("--time-cap-s", type=float, default=3600, help="stop a measured command after this long")
    parser.add_argument("--data-steps-only", action="store_true", help="for sizes already measured: add the "
                        "one-process data steps (prepared cache, today's path) to their results")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer dir for every path (default: each path "
                        "trains its BPE on the corpus, as --from_scratch does)")
    parser.add_argument("--prepared-only", action="store_true", help="only the no-data floor and the 2-rank start "
                        "on each size's cache prepared by an earlier run in --work (seconds and RSS of start-up)")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="with --prepared-only: the dsfleet source "
                        "tree the ranks run (another checkout's src/ to compare start-ups back to back)")
    parser.add_argument("--step-time", action="store_true", help="only the step time of 2 ranks on the 58 MB "
                        "prepared cache, --src's tree against this one, alternating")
    parser.add_argument("--step-time-rounds", type=int, default=2)
    parser.add_argument("--other-src", type=Path, default=None, help="with --step-time: a third tree in each round")
    parser.add_argument("--without-read-ahead", action="store_true", help="with --step-time: also this tree with "
                        "the batches read at the step (no read-ahead thread, no pinned memory)")
    parser.add_argument("--gpu", action="store_true", help="with --step-time: one rank on the first GPU")
    parser.add_argument("--step-time-steps", type=int, default=200)
    parser.add_argument("--step-time-flags", default=None, help=f"with --step-time: the model's train flags "
                        f"(--gpu: {GPU_STEP_FLAGS!r})")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.step_time:  # no baseline tree needed (nor git: the GPU box's copy has none)
        step_times(args, results)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    rev = args.baseline_rev or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=REPO, capture_output=True,
                                              text=True, check=True).stdout.strip()
    baseline = args.work / f"baseline-{rev[:10]}"
    if not (baseline / "src" / "dsfleet" / "train.py").is_file():
        baseline.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "src"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
    if args.prepared_only:
        prepared_starts(args, results)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    if "floor" not in results:  # the same run with no data at all: what start-up costs without any corpus
        run = args.work / "run-synthetic"
        shutil.rmtree(run, ignore_errors=True)
        floor = measure(deepspeed_cmd([*TRAIN, "--synthetic_data", "--block_size", "64", "--output_dir", str(run)]),
                        env_with(PYTHONPATH=str(REPO / "src")), args.work / "start-synthetic.log")
        floor["first_step_s"] = first_step_s(run, floor["started_unix"])
        results["floor"] = floor
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    for mb in args.sizes_mb:
        if args.data_steps_only:
            size_dir, corpus = args.work / f"{mb:g}MB", args.work / f"corpus_{mb:g}MB.txt"
            flags = [*TRAIN, "--train_file", str(corpus), *(["--tokenizer_name", args.tokenizer] if args.tokenizer else [])]
            r = results[f"{mb:g}"]
            r["prepared_data_step"] = data_step(NEW_STEP, [*flags, "--cache_dir", str(size_dir / "token-cache")],
                                                env_with(PYTHONPATH=str(REPO / "src")), size_dir / "step-new.log",
                                                None, args.time_cap_s)
            r["todays_data_step"] = data_step(OLD_STEP, flags, env_with(
                HF_DATASETS_CACHE=str(size_dir / "hf-old"), PYTHONPATH=str(baseline / "src")),
                size_dir / "step-old.log", args.rss_cap_gb * 2**30, args.time_cap_s)
            shutil.rmtree(size_dir / "hf-old", ignore_errors=True)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            continue
        skip = args.skip_old_above_mb is not None and mb > args.skip_old_above_mb
        skip_anchor = args.skip_anchor_above_mb is not None and mb > args.skip_anchor_above_mb
        results[f"{mb:g}"] = bench_size(mb, args.work, baseline / "src", args.rss_cap_gb * 2**30, skip, args.tokenizer,
                                        args.time_cap_s, skip_anchor)
        results[f"{mb:g}"]["baseline_rev"] = rev
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    f = results["floor"]
    print(f"no data (--synthetic_data): first step {f['first_step_s']} s, ranks "
          f"{', '.join(f'{v} MB' for v in f['rank_peak_rss_mb'].values())}")
    print(table([results[f"{mb:g}"] for mb in args.sizes_mb]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
