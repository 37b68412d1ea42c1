"""The token cache: a corpus is tokenized once per job, with every core, into memory-mapped token shards that
every rank reads in place — per-rank memory and start-up do not grow with the corpus, and a requeued job (or
any later run on the same data, tokenizer and lengths) reuses what an earlier one wrote.

Layout under the cache dir (`--cache_dir`; unset: $DSFLEET_CACHE_DIR, else $XDG_CACHE_HOME/dsfleet, else
~/.cache/dsfleet — outside the run dir, so a run that fails a later check leaves its run dir untouched):

    tokens/<key>/manifest.json            what the entry holds and the key's inputs (written last)
    tokens/<key>/tokenizer.json           the tokenizer the ids are of
    tokens/<key>/<split>.input_ids.bin    every row's ids, back to back (uint16 for vocabularies up to 65,536, else uint32)
    tokens/<key>/<split>.input_ids.idx    translation: row i is bin[idx[i]:idx[i+1]] (uint64 offsets, rows + 1)
    tokens/<key>/<split>.labels.bin|.idx  translation targets, the same way
    tokenizers/<key>/tokenizer.json       a byte-level BPE trained here on the training text (--from_scratch)
    tokens/.tmp-<key>-<host>-<pid>-<n>/   an entry being written; renamed to tokens/<key> when whole

Packed causal-LM text has no index: row i is bin[i*block_size:(i+1)*block_size] (text packed per 100,000 rows,
each group's tail shorter than a block dropped — the blocks the in-memory path made).

The key is a hash of the data (each file's path, size and mtime; a `datasets` dataset's fingerprints), the
tokenizer (its serialized JSON and class), the task, the lengths or block size, the source prefix and languages,
and max_{train,eval,predict}_samples. An entry is written into a temp dir, its manifest last, then renamed into
place: a killed prepare leaves a temp dir that no run reads (the next prepare of that host removes it), and two
preparers racing on one key both end with the one entry that won the rename.

In a job, one process per filesystem prepares: global rank 0 for every rank that sees the files rank 0 writes
in the cache dir, else the first rank of each node; the others wait at a barrier (a gloo group with a long
timeout: preparing a large corpus outlasts the default 30 minutes) and then open the same entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from datetime import timedelta
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsfleet import data
from dsfleet.cli import UsageError, fail

FORMAT = 1  # bump when the layout or the tokenization changes: old entries are then never matched
PACK_ROWS = 100_000  # causal LM: rows packed together into blocks (data.tokenize's map batches)
ENCODE_ROWS = 10_000  # causal LM: rows tokenized per call inside a packing group (bounded worker memory)
PAIR_ROWS = 2_000  # translation: rows per worker task
WAIT_S = 24 * 3600  # how long ranks wait for the preparer
KEY_LEN = 24  # hex digits of an entry's key


def default_cache_dir() -> Path:
    if os.environ.get("DSFLEET_CACHE_DIR"):
        return Path(os.environ["DSFLEET_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dsfleet"


def cache_root(spec) -> Path:
    root = Path(spec.cache_dir).expanduser() if spec.cache_dir else default_cache_dir()
    if root.exists() and not root.is_dir():
        fail(f"--cache_dir {root} is a file — pass a directory for the token cache")
    return root


def _digest(material: Any) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LEN]


# ---- what identifies the data, the tokenizer and the entry ------------------------------------------------------

def file_fingerprint(spec) -> dict | None:
    """The data files' absolute paths, sizes and mtimes (the embedded corpus's too), without reading them; None
    for a dataset by name or a file that is not there (then the data is loaded, and says what is wrong)."""
    if spec.dataset_name == data.EMBEDDED:
        files = data.embedded_files(spec.task)
    elif spec.train_file or spec.validation_file or spec.test_file:
        files = {k: v for k, v in (("train", spec.train_file), ("validation", spec.validation_file),
                                   ("test", spec.test_file)) if v}
    else:
        return None
    out = {}
    for split, path in files.items():
        p = Path(path)
        if not p.is_file():
            return None
        st = p.stat()
        out[split] = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def source_bytes(fingerprint: dict, raw) -> int:
    if all("size" in v for v in fingerprint.values()):
        return sum(v["size"] for v in fingerprint.values())
    return sum(int(ds.data.nbytes) for ds in raw.values()) if raw else 0


def tokenizer_identity(tokenizer) -> str:
    """A hash of what decides the ids: the backend's serialized JSON (without the truncation/padding a call
    leaves set), the class (target-mode behaviour) and the special ids the packing appends."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return _digest({"class": type(tokenizer).__name__, "backend": state, "eos": tokenizer.eos_token_id,
                    "pad": tokenizer.pad_token_id, "len": len(tokenizer)})


def token_material(spec, fingerprint: dict, tokenizer) -> dict:
    if spec.task == "translation":
        shape = {"source_lang": spec.source_lang, "target_lang": spec.target_lang, "source_prefix": spec.source_prefix,
                 "max_source_length": spec.max_source_length, "max_target_length": spec.max_target_length}
    else:
        shape = {"text_column": spec.text_column, "block_size": spec.block_size, "pack_rows": PACK_ROWS}
    return {"format": FORMAT, "data": fingerprint, "tokenizer": tokenizer_identity(tokenizer), "task": spec.task,
            **shape, "max_train_samples": spec.max_train_samples, "max_eval_samples": spec.max_eval_samples,
            "max_predict_samples": spec.max_predict_samples}


def bpe_material(spec, fingerprint: dict, vocab: int) -> dict:
    columns = [spec.source_lang, spec.target_lang] if spec.task == "translation" else [spec.text_column]
    return {"recipe": "byte-level-bpe-1", "train_data": fingerprint.get("train"), "vocab_size": vocab,
            "task": spec.task, "columns": columns}


def id_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if max(len(tokenizer), tokenizer.vocab_size or 0) <= 65536 else np.dtype(np.uint32)


# ---- reading an entry ---------------------------------------------------------------------------------------------

class TokenRows:
    """One split of an entry, row by row like the in-memory `datasets` split it replaces: len() and
    [i] -> {"input_ids": [...]} (+ "labels" for translation), read from memory-mapped files (nothing is loaded
    up front; only the pages of the rows read come into memory)."""

    def __init__(self, entry: Path, split: str, manifest: dict):
        meta = manifest["splits"][split]
        self.entry, self.split, self.rows = Path(entry), split, int(meta["rows"])
        self.dtype = np.dtype(manifest["dtype"])
        self.block = int(manifest["block_size"]) if manifest["task"] != "translation" else None
        self.columns = ["input_ids"] if self.block else ["input_ids", "labels"]
        self._maps: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None
        self._trace = None

    def __len__(self) -> int:
        return self.rows

    def _open(self) -> dict:
        def mapped(path: Path, dtype) -> np.ndarray:
            return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
        maps = {}
        for col in self.columns:
            ids = mapped(self.entry / f"{self.split}.{col}.bin", self.dtype)
            idx = None if self.block else mapped(self.entry / f"{self.split}.{col}.idx", np.uint64)
            maps[col] = (ids, idx)
        self._maps = maps
        if os.environ.get("DSFLEET_TRACE_ROWS"):  # tests: which rows each rank read, in order
            trace_dir = Path(os.environ["DSFLEET_TRACE_ROWS"])
            trace_dir.mkdir(parents=True, exist_ok=True)
            self._trace = open(trace_dir / f"rank{os.environ.get('RANK', '0')}.txt", "a", buffering=1)
        return maps

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"row index must be an int, not {type(i).__name__}")
        i = int(i) + (self.rows if i < 0 else 0)
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} of {self.rows}")
        maps = self._maps or self._open()
        if self._trace is not None:
            self._trace.write(f"{self.split} {i}\n")
        out = {}
        for col, (ids, idx) in maps.items():
            if self.block:
                out[col] = ids[i * self.block:(i + 1) * self.block].tolist()
            else:
                out[col] = ids[int(idx[i]):int(idx[i + 1])].tolist()
        return out

    def __getstate__(self):  # a DataLoader worker maps the files itself
        return {**self.__dict__, "_maps": None, "_trace": None}


def read_manifest(entry: Path, key: str) -> dict | None:
    """The manifest of a whole entry for this key, or None (missing, another key or format, a file short)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("format") != FORMAT:
        return None
    item = np.dtype(manifest["dtype"]).itemsize
    for split, meta in manifest["splits"].items():
        for col, n in meta["tokens"].items():
            f = entry / f"{split}.{col}.bin"
            if not f.is_file() or f.stat().st_size != n * item:
                return None
            if manifest["task"] == "translation" and (entry / f"{split}.{col}.idx").stat().st_size != (meta["rows"] + 1) * 8:
                return None
    return manifest


def open_splits(entry: Path, manifest: dict) -> dict[str, TokenRows]:
    return {split: TokenRows(entry, split, manifest) for split in manifest["splits"]}


# ---- writing an entry: a pool of tokenizer processes, the parent appending their shards in order ----------------

_WORK: dict[str, Any] = {}  # what the pool's workers read: set before the fork (or sent to each spawned worker)


def _worker_init(work: dict) -> None:
    _WORK.update(work)
    if sys.platform.startswith("linux"):  # die with the preparer (a kill -9 must not leave workers behind)
        try:
            import ctypes
            import signal
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _texts(split: str, start: int, stop: int) -> list:
    ds = _WORK["raw"][split]
    return ds[start:stop][_WORK["column"]]


def _batch_encoder(tok) -> Callable[[list[str]], list[list[int]]]:
    """The ids of a batch of texts as `tok(texts)["input_ids"]` gives them: the `tokenizers` backend's batch call
    directly (no truncation or padding; a third less time than the transformers wrapper's dicts) when it agrees
    with the wrapper on a probe, else the wrapper."""
    if "encoder" in _WORK:
        return _WORK["encoder"]
    backend = getattr(tok, "backend_tokenizer", None)

    def direct(texts):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]

    def wrapped(texts):
        return tok(texts)["input_ids"]
    probe = ["Hello world, this is a probe.", " leading space", "tab\tand\nnewline", "ünïcödé 字 🙂", "x"]
    choice = wrapped
    if backend is not None:
        expected = wrapped(probe)  # the wrapper leaves truncation/padding as this call set them: none
        backend.no_truncation()
        backend.no_padding()
        if direct(probe) == expected:
            choice = direct
    _WORK["encoder"] = choice
    return choice


def _encode_blocks(task: tuple[str, int, int]) -> np.ndarray:
    """One packing group of causal-LM rows -> its full blocks, flat."""
    split, start, stop = task
    tok, block, dtype = _WORK["tokenizer"], _WORK["block_size"], _WORK["dtype"]
    eos = tok.eos_token_id
    encode = _batch_encoder(tok)
    parts = []
    for a in range(start, stop, ENCODE_ROWS):
        texts = [t for t in _texts(split, a, min(a + ENCODE_ROWS, stop)) if t]
        if not texts:
            continue
        seqs = [ids if ids and ids[-1] == eos else ids + [eos] for ids in encode(texts)]
        parts.append(np.fromiter(chain.from_iterable(seqs), dtype=dtype, count=sum(map(len, seqs))))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return flat[:len(flat) // block * block]


def _encode_pairs(task: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Translation rows -> (source ids, their lengths, target ids, their lengths), flat."""
    split, start, stop = task
    tok, w, dtype = _WORK["tokenizer"], _WORK, _WORK["dtype"]
    src, tgt = data.encode_pairs(tok, _texts(split, start, stop), w["prefix"], w["source_lang"], w["target_lang"],
                                 w["max_source_length"], w["max_target_length"])

    def flat(seqs):
        lens = np.fromiter(map(len, seqs), dtype=np.uint64, count=len(seqs))
        return np.fromiter(chain.from_iterable(seqs), dtype=dtype, count=int(lens.sum())), lens
    return (*flat(src), *flat(tgt))


def _fault(where: str) -> None:
    """Tests only: DSFLEET_FAULT_INJECT=kill_in_prepare kills the preparer with SIGKILL once some shards are on
    disk, before the entry is whole (as checkpoint.py's kill_in_save does for a save)."""
    if os.environ.get("DSFLEET_FAULT_INJECT") == where:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


SMALL_BYTES = 16 * 2**20  # a corpus this small is tokenized in the preparing process (a pool costs more)


def _workers(spec, n_tasks: int, n_bytes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = spec.preprocessing_num_workers or (1 if n_bytes < SMALL_BYTES else cores)
    return max(1, min(wanted, n_tasks))


def _limit(spec, split: str) -> int | None:
    return {"train": spec.max_train_samples, "validation": spec.max_eval_samples,
            "test": spec.max_predict_samples}.get(split)


class _Pool:
    """map(fn, tasks) in order: inline for one worker, else a process pool (fork where there is one: the dataset
    and tokenizer are inherited, nothing is pickled; the tokenizer's own threads are off in the workers)."""

    def __init__(self, workers: int, work: dict):
        self.workers, self.pool = workers, None
        if workers > 1:
            import multiprocessing as mp
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            before = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers: one thread each, no warning
            try:
                self.pool = ctx.Pool(workers, initializer=_worker_init, initargs=(work,))
            finally:
                if before is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = before
        else:
            _worker_init(work)

    def map(self, fn: Callable, tasks: list):
        return self.pool.imap(fn, tasks) if self.pool else map(fn, tasks)

    def close(self) -> None:
        if self.pool:
            self.pool.terminate()
            self.pool.join()
        _WORK.clear()


def _write_split(pool: _Pool, spec, split: str, n_raw: int, tmp: Path, dtype) -> dict:
    if spec.task == "translation":
        tasks = [(split, a, min(a + PAIR_ROWS, n_raw)) for a in range(0, n_raw, PAIR_ROWS)]
        files = {c: (open(tmp / f"{split}.{c}.bin", "wb"), open(tmp / f"{split}.{c}.idx", "wb"))
                 for c in ("input_ids", "labels")}
        ends = {c: 0 for c in files}
        for (_, idx) in files.values():
            idx.write(np.zeros(1, np.uint64).tobytes())
        rows = 0
        for n, (src, src_len, tgt, tgt_len) in enumerate(pool.map(_encode_pairs, tasks)):
            for col, ids, lens in (("input_ids", src, src_len), ("labels", tgt, tgt_len)):
                files[col][0].write(ids.tobytes())
                files[col][1].write((np.cumsum(lens, dtype=np.uint64) + np.uint64(ends[col])).tobytes())
                ends[col] += int(lens.sum())
            rows += len(src_len)
            if n == 0:
                for f, _ in files.values():
                    f.flush()
                _fault("kill_in_prepare")
        for f, idx in files.values():
            f.close()
            idx.close()
        return {"rows": rows, "raw_rows": n_raw, "tokens": ends}
    tasks = [(split, a, min(a + PACK_ROWS, n_raw)) for a in range(0, n_raw, PACK_ROWS)]
    total = 0
    with open(tmp / f"{split}.input_ids.bin", "wb") as f:
        for n, blocks in enumerate(pool.map(_encode_blocks, tasks)):
            f.write(blocks.tobytes())
            total += len(blocks)
            if n == 0:
                f.flush()
                _fault("kill_in_prepare")
    return {"rows": total // spec.block_size, "raw_rows": n_raw, "tokens": {"input_ids": total}}


def _remove_stale_temps(tokens_dir: Path) -> None:
    """Temp dirs of preparers on this host that are gone (killed): never read, removed here."""
    host = socket.gethostname()
    for tmp in tokens_dir.glob(".tmp-*"):
        parts = tmp.name[len(".tmp-") + KEY_LEN + 1:].rsplit("-", 2)  # .tmp-<key>-<host>-<pid>-<n>, host may have '-'
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except PermissionError:
                pass


def _mkdirs(path: Path) -> list[Path]:
    """mkdir -p, returning the dirs it made (removed again if the build fails: a bad input leaves nothing)."""
    made = []
    for p in reversed([path, *path.parents]):
        if not p.exists():
            try:
                p.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                fail(f"cannot make the token cache dir {p} ({type(e).__name__}: {e.strerror}) — pass a writable "
                     "--cache_dir")
            made.append(p)
    return made


def build(spec, raw, tokenizer, root: Path, key: str, material: dict, fingerprint: dict) -> tuple[Path, dict]:
    """Tokenize every split into a temp dir, run the checks that need token counts there (nothing is kept when
    one fails), write the manifest last and rename the dir into place."""
    tokens_dir = root / "tokens"
    made = _mkdirs(tokens_dir)
    _remove_stale_temps(tokens_dir)
    tmp = tokens_dir / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    final = tokens_dir / key
    started = time.time()
    pool = None
    try:
        tmp.mkdir()
        dtype = id_dtype(tokenizer)
        sizes = {split: min(len(ds), _limit(spec, split) or len(ds)) for split, ds in raw.items()}
        n_tasks = sum(-(-n // (PAIR_ROWS if spec.task == "translation" else PACK_ROWS)) for n in sizes.values())
        work = {"raw": {s: ds.select_columns(["translation" if spec.task == "translation" else spec.text_column])
                        for s, ds in raw.items()},
                "column": "translation" if spec.task == "translation" else spec.text_column,
                "tokenizer": tokenizer, "dtype": dtype, "block_size": spec.block_size,
                "prefix": spec.source_prefix or "", "source_lang": spec.source_lang, "target_lang": spec.target_lang,
                "max_source_length": spec.max_source_length, "max_target_length": spec.max_target_length}
        workers = _workers(spec, n_tasks, source_bytes(fingerprint, raw))
        pool = _Pool(workers, work)
        splits = {split: _write_split(pool, spec, split, sizes[split], tmp, dtype) for split in raw}
        pool.close()
        pool = None
        data.check_blocks(spec, {s: range(m["rows"]) for s, m in splits.items()})
        (tmp / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
        seconds = time.time() - started
        manifest = {"format": FORMAT, "key": key, "task": spec.task, "dtype": dtype.name,
                    "block_size": spec.block_size if spec.task != "translation" else None, "splits": splits,
                    "inputs": material, "built_seconds": round(seconds, 3), "workers": workers,
                    "source_bytes": source_bytes(fingerprint, raw), "created_unix": time.time(),
                    "dsfleet": _version()}
        for f in tmp.iterdir():
            _fsync(f)
        (tmp / "manifest.json.part").write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync(tmp / "manifest.json.part")
        os.replace(tmp / "manifest.json.part", tmp / "manifest.json")
        try:
            os.rename(tmp, final)
        except OSError:  # another preparer's entry won the rename: use it if it is whole, else replace it
            if read_manifest(final, key) is None:
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                manifest = read_manifest(final, key)
        return final, manifest
    except BaseException:
        if pool is not None:
            pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _version() -> str:
    from dsfleet import __version__
    return __version__


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_text(text)
    os.replace(part, path)


# ---- one job's preparation ------------------------------------------------------------------------------------

class Preparation:
    """What one process knows while preparing: the spec, the raw data once loaded (and checked), the cache root,
    the trained tokenizer to keep once the tokens are whole."""

    def __init__(self, spec, source, out: Path | None, world_size: int):
        self.spec, self.source, self.out, self.world_size = spec, source, out, world_size
        self.root = cache_root(spec)
        self._raw, self._checked = None, False
        self._fingerprint = None
        self.pending_tokenizer: tuple[Path, str] | None = None
        self.notes: list[str] = []

    def raw(self, checked: bool = True):
        started = time.time()
        if checked and not self._checked:
            self._raw, self._checked = data.load_checked(self.spec, self.world_size), True
            self.notes.append(f"data loaded and checked in {time.time() - started:.1f} s")
        elif self._raw is None:
            self._raw = data.load_raw(self.spec)
        return self._raw

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            fp = file_fingerprint(self.spec)
            if fp is None:
                fp = {s: {"dataset": self.spec.dataset_name, "config": self.spec.dataset_config_name,
                          "fingerprint": ds._fingerprint} for s, ds in self.raw(checked=True).items()}
            self._fingerprint = fp
        return self._fingerprint

    def tokenizer_source(self) -> tuple[str, str]:
        """("path", dir-or-name) for a tokenizer every rank loads itself, ("json", serialized) for one trained
        here: from the cache when this training text and vocabulary trained one before, else trained now."""
        spec = self.spec
        name = spec.tokenizer_name or data.model_dir_tokenizer(spec)  # the model's own (a dir's tokenizer files)
        if name:
            return "path", name
        if self.out is not None and (self.out / "tokenizer" / "tokenizer.json").is_file():
            return "path", str(self.out / "tokenizer")
        vocab = int(self.source.preset.config.get("vocab_size", 512))
        path = self.root / "tokenizers" / _digest(bpe_material(spec, self.fingerprint(), vocab)) / "tokenizer.json"
        if path.is_file():
            self.notes.append(f"tokenizer reused: {path}")
            return "json", path.read_text()
        started = time.time()
        serialized = data.train_bpe_tokenizer(data.training_texts(spec, self.raw()), vocab).backend_tokenizer.to_str()
        self.notes.append(f"tokenizer trained: byte-level BPE, vocab {vocab}, in {time.time() - started:.1f} s")
        self.pending_tokenizer = (path, serialized)
        return "json", serialized

    def entry(self, tokenizer) -> tuple[Path, dict, str]:
        """(entry dir, manifest, "reused" | "built") for this run's data and tokenizer."""
        material = token_material(self.spec, self.fingerprint(), tokenizer)
        key = _digest(material)
        final = self.root / "tokens" / key
        manifest = read_manifest(final, key)
        if manifest is not None:
            status = "reused"
        else:
            final, manifest = build(self.spec, self.raw(), tokenizer, self.root, key, material, self.fingerprint())
            status = "built"
        if self.pending_tokenizer is not None:  # kept only once the data it was trained for is whole
            _atomic_write(*self.pending_tokenizer)
            self.pending_tokenizer = None
        return final, manifest, status


def tokenizer_from(source: tuple[str, str]):
    kind, value = source
    if kind == "path":
        return data.load_tokenizer(value)
    tokenizer = data.fast_tokenizer(value)
    tokenizer.trained_here = True
    return tokenizer


def describe(entry: Path, manifest: dict, status: str) -> str:
    parts = []
    for split, meta in manifest["splits"].items():
        tokens = sum(meta["tokens"].values())
        parts.append(f"{split} {meta['rows']:,} rows ({tokens / 1e6:,.2f}M tokens)")
    line = f"token cache {status}: {entry} — {', '.join(parts)}, {manifest['dtype']}"
    if status == "built":
        mb = manifest["source_bytes"] / 1e6
        secs = max(manifest["built_seconds"], 1e-9)
        line += f"; tokenized {mb:,.1f} MB in {secs:.1f} s ({mb / secs:,.1f} MB/s, {manifest['workers']} worker(s))"
    return line


def check_entry(spec, manifest: dict, world_size: int) -> None:
    """The data checks a reused entry still answers (the world size or batch may differ from the run that wrote
    it): a train split to train on, enough samples, blocks in every split."""
    splits = manifest["splits"]
    if spec.do_train and "train" not in splits:
        fail("the dataset has no 'train' split — pass --train_file or a dataset with a train split")
    if "train" in splits:
        meta = splits["train"]
        data.check_train_size(spec, {"train": range(meta["rows"] if spec.task == "translation" else meta["raw_rows"])},
                              world_size)
    data.check_blocks(spec, {s: range(m["rows"]) for s, m in splits.items()})


def prepare_once(spec, source, out: Path | None, world_size: int = 1, say: Callable[[str], None] = print):
    """One process, no process group (`dsfleet prepare`, and a one-rank run): (tokenizer, splits, entry)."""
    prep = Preparation(spec, source, out, world_size)
    tokenizer = tokenizer_from(prep.tokenizer_source())
    entry, manifest, status = prep.entry(tokenizer)
    for note in prep.notes:
        say(note)
    say(describe(entry, manifest, status))
    check_entry(spec, manifest, world_size)
    return tokenizer, open_splits(entry, manifest), entry


class _Job:
    """The collectives of the preparation, on their own gloo group with a long timeout (CPU objects only, also
    when training runs on NCCL)."""

    def __init__(self, denv):
        import torch.distributed as dist
        self.dist, self.rank, self.world = dist, denv.rank, denv.world_size
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_S))

    def broadcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        self.dist.destroy_process_group(self.group)


def _guarded(fn: Callable):
    """("ok", value) or ("error", the one line) — a bad input on the preparer reaches every rank."""
    try:
        return "ok", fn()
    except UsageError as e:
        return "error", str(e)


def _agreed(result):
    kind, value = result
    if kind == "error":
        fail(value)
    return value


def plan_preparers(views: list[tuple[str, bool]]) -> tuple[set[int], list[int]]:
    """Who prepares, and whose entry each rank reads, from each rank's (host name, sees rank 0's probe file):
    rank 0 for every rank that sees it (a shared cache dir), else the first rank of its host that does not."""
    preparers = {0}
    for host in {h for h, seen in views if not seen}:
        preparers.add(min(r for r, (h, seen) in enumerate(views) if h == host and not seen))
    reads_from = [0 if seen else min(r for r in preparers if views[r][0] == host and not views[r][1])
                  for host, seen in views]
    return preparers, reads_from


def prepare_for_run(spec, source, out: Path, denv):
    """(tokenizer, splits) for train(): synthetic batches, or the token cache's entry for the run's data —
    reused when its key matches, else built by one process per filesystem while the other ranks wait. Every
    check of the data happens here or in the build, before the run dir is written."""
    if spec.synthetic_data:
        return None, data.synthetic_splits(spec, source)
    if spec.streaming:  # bigger than the disk: no cache, each rank tokenizes its share of the stream as it trains
        from dsfleet import streaming
        return streaming.prepare_for_run(spec, source, out, denv)
    data.check_block_size(spec, source.max_positions)
    is_main = denv.rank == 0

    def say(line: str) -> None:
        print(f"dsfleet: {line}", flush=True) if is_main else None

    if denv.world_size == 1:
        tokenizer, splits, _ = prepare_once(spec, source, out, 1, say)
        return tokenizer, splits
    job = _Job(denv)
    prep = Preparation(spec, source, out, denv.world_size)
    # 1. the tokenizer: rank 0 decides (a trained one is sent to everyone: one tokenizer per job); rank 0 also
    #    writes a probe file in the cache dir, for 2.
    probe = prep.root / f".probe-{uuid.uuid4().hex}"
    decided = None
    if is_main:
        decided = (_guarded(prep.tokenizer_source),
                   _guarded(lambda: (_mkdirs(prep.root), probe.write_text(probe.name), probe.name)[-1]))
    decided = job.broadcast(decided)
    tok_source = decided[0][1] if decided[0][0] == "ok" else None
    loaded = _guarded(lambda: tokenizer_from(tok_source)) if tok_source else ("ok", None)
    # 2. who prepares: rank 0 for every rank that sees rank 0's probe file in the cache dir, else the first rank
    #    of each host that does not
    sees = decided[1][0] == "ok" and (prep.root / decided[1][1]).is_file()
    gathered = job.gather((socket.gethostname(), sees, loaded if loaded[0] == "error" else ("ok", None)))
    if is_main:
        probe.unlink(missing_ok=True)
    for result in (*decided, *(g[2] for g in gathered)):  # a bad input anywhere stops every rank, now
        _agreed(result)
    tokenizer = loaded[1]
    views = [(host, seen) for host, seen, _ in gathered]
    preparers, reads_from = plan_preparers(views)
    # 3. the preparers reuse or build; everyone else waits for them here
    mine = _guarded(lambda: prep.entry(tokenizer)) if denv.rank in preparers else None
    results = job.gather(mine)
    for r in sorted(preparers):
        _agreed(results[r])
    entry, manifest, status = results[reads_from[denv.rank]][1]
    job.close()
    for note in prep.notes:
        say(note)
    say(describe(entry, manifest, status) + (f" ({len(preparers)} preparers: a cache dir per node)"
                                              if len(preparers) > 1 else ""))
    check_entry(spec, manifest, denv.world_size)
    return tokenizer, open_splits(entry, manifest)
