"""Data for every workload: `datasets` loading (hub name, local dir, json/jsonl/csv/txt files, the embedded
demo corpus), the tokenizer (a pretrained one, or a byte-level BPE trained here on the training text),
tokenization, dynamic padding, synthetic token batches for benchmarks, and a resumable batch order.

The batch order is a pure function of (seed, epoch, global sample offset), so a run resumed on a different
world size continues at the same sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch

from dsfleet.cli import fail

SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5 ids: pad 0, eos 1, unk 2 — shared by every locally made tokenizer
EMBEDDED = "embedded"  # --dataset_name embedded: the corpus shipped in dsfleet/embedded/


def embedded_files(task: str) -> dict[str, str]:
    root = resources.files("dsfleet") / "embedded"
    stem = "translation" if task == "translation" else "text"
    return {split: str(root / f"{stem}_{split}.jsonl") for split in ("train", "validation", "test")}


_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}


def load_checked(spec, world_size: int):
    """The raw splits with their columns and size checked, or None for --synthetic_data."""
    if spec.synthetic_data:
        return None
    raw = load_raw(spec)
    if "train" not in raw and spec.do_train:
        fail("the dataset has no 'train' split — pass --train_file or a dataset with a train split")
    check_columns(spec, raw)
    check_cells(spec, raw)
    check_train_size(spec, raw, world_size)
    return raw


def load_raw(spec) -> dict[str, Any]:
    """The raw splits as `datasets` objects: {'train': ..., 'validation': ..., 'test': ...} (those present)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a bad file is said once, below, not logged too
    if spec.dataset_name == EMBEDDED:
        files, builder = embedded_files(spec.task), "json"
    elif spec.train_file or spec.validation_file or spec.test_file:
        files = {k: v for k, v in (("train", spec.train_file), ("validation", spec.validation_file),
                                   ("test", spec.test_file)) if v}
        for split, path in files.items():
            if not Path(path).is_file():
                fail(f"--{split}_file {path} not found — pass an existing file")
        exts = {Path(p).suffix for p in files.values()}
        if len(exts) != 1 or not exts <= set(_BUILDERS):
            fail(f"data files {', '.join(files.values())} have the extension(s) {', '.join(sorted(exts)) or '(none)'} "
                 f"— use one of {', '.join(_BUILDERS)} for all of them (convert the file or rename it)")
        for split, path in files.items():
            if Path(path).stat().st_size == 0:
                fail(f"--{split}_file {path} is empty — give it at least one row of data")
        builder = _BUILDERS[exts.pop()]
    elif spec.dataset_name:
        try:
            loaded = datasets.load_dataset(spec.dataset_name, spec.dataset_config_name)
        except Exception as e:  # hub unreachable, unknown name, bad local dir: all one line
            fail(f"cannot load dataset {spec.dataset_name!r} ({_why(e)}) "
                 "— pass a local dir or --train_file/--validation_file, or --dataset_name embedded")
        return dict(loaded)
    else:
        fail("no data given — pass --dataset_name NAME|DIR, --train_file FILE, --dataset_name embedded, "
             "or --synthetic_data")
    try:
        return dict(datasets.load_dataset(builder, data_files=files))
    except Exception as e:
        fail(f"cannot read {', '.join(files.values())} ({_why(e)}) — fix the file: .json/.jsonl one JSON object "
             "per line, .csv a header row then rows, .txt one text per line")


def _why(e: BaseException) -> str:
    """`Type: first line` of an exception, looking through `datasets`' generic wrapper to the parser's error."""
    while type(e).__name__ == "DatasetGenerationError" and (e.__cause__ or e.__context__):
        e = e.__cause__ or e.__context__
    first = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def train_bpe_tokenizer(texts: Iterator[str], vocab_size: int, save_dir: Path | None = None):
    """A byte-level BPE trained on the run's own training text (no hub needed); saved when save_dir is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = fast_tokenizer(tok.to_str())
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def fast_tokenizer(serialized: str):
    """The transformers tokenizer around a serialized `tokenizers` JSON, with dsfleet's special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(serialized), pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")


def model_dir_tokenizer(spec) -> str | None:
    """The model's own tokenizer: --model_name_or_path when loading weights (a dir or hub id: it must have one),
    and with --from_scratch a model dir (or --config_name dir) that holds tokenizer files."""
    if spec.model_name_or_path and not spec.from_scratch:
        return spec.model_name_or_path
    for where in (spec.model_name_or_path, getattr(spec, "config_name", None)):
        if where and Path(where).is_dir() and any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
            return where
    return None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        fail(f"cannot load a tokenizer from {path!r} ({type(e).__name__}) — pass a local dir with tokenizer files")


def training_texts(spec, raw) -> Iterator[str]:
    """The training text in order (both sides of each pair), read a batch of rows at a time."""
    column = "translation" if spec.task == "translation" else spec.text_column
    for batch in raw["train"].select_columns([column]).iter(batch_size=10_000):
        if spec.task == "translation":
            for t in batch[column]:
                yield t[spec.source_lang]
                yield t[spec.target_lang]
        else:
            yield from (text for text in batch[column] if text)


def check_columns(spec, raw) -> None:
    for split, ds in raw.items():
        if spec.task == "translation":
            if "translation" not in ds.column_names:
                fail(f"{split} data has no 'translation' column (columns: {', '.join(ds.column_names)}) — "
                     f"rows must look like {{\"translation\": {{\"{spec.source_lang}\": ..., \"{spec.target_lang}\": ...}}}}")
            first = ds[0]["translation"] if len(ds) else {}
            for lang in (spec.source_lang, spec.target_lang):
                if lang not in first:
                    fail(f"{split} data has no language {lang!r} in 'translation' (has {', '.join(first) or 'nothing'}) "
                         "— fix --source_lang/--target_lang")
        elif spec.text_column not in ds.column_names:
            fail(f"{split} data has no {spec.text_column!r} column (columns: {', '.join(ds.column_names)}) — "
                 "pass --text_column")


def _first_hole(column, allow_empty: bool) -> int | None:
    """Index of the first None (or, unless allowed, empty/blank) value of a pyarrow column, or None."""
    import pyarrow.compute as pc
    holes = pc.is_null(column)
    if not allow_empty:
        text = pc.fill_null(pc.cast(column, "string"), "")
        holes = pc.or_(holes, pc.equal(pc.utf8_trim_whitespace(text), ""))
    if not pc.any(holes).as_py():
        return None
    return pc.index(holes, True).as_py()


def check_cells(spec, raw) -> None:
    """Holes in the data — a missing (None) text, an empty or missing side of a translation pair — are one line
    naming the file, the row and the fix. Blank lines of causal-LM text are allowed (a paragraph break in a .txt)."""
    for split, ds in raw.items():
        where = _file_of(spec, split)
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        if spec.task == "translation":
            pairs = table.column("translation")
            import pyarrow.compute as pc
            for lang in (spec.source_lang, spec.target_lang):
                row = _first_hole(pc.struct_field(pairs, lang), allow_empty=False)
                if row is not None:
                    fail(f"{where} row {row + 1}: the {lang!r} side of the translation is empty — fill it in or "
                         "remove the row")
        else:
            row = _first_hole(table.column(spec.text_column), allow_empty=True)
            if row is not None:
                fail(f"{where} row {row + 1}: the {spec.text_column!r} cell is empty (None) — fill it in or remove "
                     "the row")


def _file_of(spec, split: str) -> str:
    path = {"train": spec.train_file, "validation": spec.validation_file, "test": spec.test_file}.get(split)
    return f"--{split}_file {path}" if path else f"{split} split of {spec.dataset_name}"


def check_block_size(spec, max_positions: int | None) -> None:
    """A causal-LM block size longer than the model's position embeddings: one line now, not an IndexError in the
    first forward."""
    if spec.task != "translation" and max_positions and spec.block_size > max_positions:
        fail(f"--block_size {spec.block_size} is longer than the model's {max_positions} positions — pass "
             f"--block_size {max_positions} or less")


def check_blocks(spec, splits) -> None:
    """A block size the data cannot fill once: one line before anything is written (not an empty batch order)."""
    if spec.task == "translation":
        return
    for split, ds in splits.items():
        if len(ds) == 0:
            flag = f"--{split}_file" if split != "train" or spec.train_file else "the train split"
            fail(f"{flag}: the {split} text is shorter than one block of --block_size {spec.block_size} tokens — "
                 "pass a smaller --block_size or give more text")


def check_train_size(spec, raw, world_size: int) -> None:
    """Too little training data is said before the run dir is made (the batch order checks again, exactly)."""
    if not spec.do_train or "train" not in raw:
        return
    n = len(raw["train"])
    if spec.max_train_samples:
        n = min(n, spec.max_train_samples)
    need = spec.per_device_train_batch_size * world_size
    if n == 0:
        fail("the training data has no rows — give --train_file (or the dataset's train split) at least one row")
    if spec.task == "translation" and n < need:  # one row, one sample (causal LM rows are packed into blocks later)
        fail(f"only {n} training samples for micro batch {spec.per_device_train_batch_size} x world size {world_size} "
             "— give more data or a smaller --per_device_train_batch_size")


def encode_pairs(tokenizer, pairs, prefix: str | None, source_lang: str, target_lang: str, max_source_length: int,
                 max_target_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Translation pairs ({lang: text} each) -> (source ids, target ids), one tokenizer call a side: the source
    with --source_prefix, each side truncated at its length — how every path (the token cache, a stream, the
    in-memory reference) encodes a pair."""
    if not pairs:
        return [], []
    src = tokenizer([(prefix or "") + t[source_lang] for t in pairs], max_length=max_source_length, truncation=True)
    tgt = tokenizer(text_target=[t[target_lang] for t in pairs], max_length=max_target_length, truncation=True)
    return src["input_ids"], tgt["input_ids"]


def tokenize(spec, raw, tokenizer) -> dict[str, Any]:
    """Tokenized splits: seq2seq rows {input_ids, labels}; causal-LM rows are fixed `block_size` chunks."""
    out = {}
    for split, ds in raw.items():
        limit = {"train": spec.max_train_samples, "validation": spec.max_eval_samples,
                 "test": spec.max_predict_samples}[split] if split in ("train", "validation", "test") else None
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        if spec.task == "translation":
            def encode(batch):
                src, tgt = encode_pairs(tokenizer, batch["translation"], spec.source_prefix, spec.source_lang,
                                        spec.target_lang, spec.max_source_length, spec.max_target_length)
                return {"input_ids": src, "labels": tgt}
        else:
            block = spec.block_size

            def encode(batch):
                ids = [i for text in batch[spec.text_column] if text
                       for i in _with_eos(tokenizer(text)["input_ids"], tokenizer)]
                n = len(ids) // block * block
                return {"input_ids": [ids[i:i + block] for i in range(0, n, block)]}
        out[split] = ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True,
                            batch_size=1000 if spec.task == "translation" else 100_000)
    return out


def synthetic_splits(spec, source) -> dict:
    """--synthetic_data: deterministic random token batches at the run's lengths (benchmarks, memory checks) —
    every other run's data comes from the token cache (token_cache.prepare_for_run) or a stream (streaming.py)."""
    vocab = int(source.preset.config.get("vocab_size", 32128))
    seq2seq = source.seq2seq
    src = spec.max_source_length if seq2seq else spec.block_size
    n = spec.max_train_samples or 100_000
    return {"train": SyntheticTokens(n, vocab, seq2seq, src, spec.max_target_length, spec.seed),
            "validation": SyntheticTokens(64, vocab, seq2seq, src, spec.max_target_length, spec.seed + 1)}


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


class SyntheticTokens(torch.utils.data.Dataset):
    """Random token ids at fixed lengths, deterministic per index: benchmarks and memory measurements."""

    def __init__(self, n: int, vocab: int, seq2seq: bool, src_len: int, tgt_len: int, seed: int):
        self.n, self.vocab, self.seq2seq, self.src_len, self.tgt_len, self.seed = n, vocab, seq2seq, src_len, tgt_len, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(3, self.vocab, (self.src_len,), generator=g).tolist()
        if not self.seq2seq:
            return {"input_ids": ids}
        return {"input_ids": ids, "labels": torch.randint(3, self.vocab, (self.tgt_len,), generator=g).tolist()}


@dataclass
class Collator:
    """Dynamic padding to the longest row of the batch (labels padded with -100, ignored by the loss)."""
    pad_id: int | None  # a tokenizer without a pad token (many causal LMs'): 0, never seen in unpadded blocks
    seq2seq: bool

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = 0

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        def pad(seqs, value):
            width = max(len(s) for s in seqs)
            return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

        ids = pad([r["input_ids"] for r in rows], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": (ids != self.pad_id).long() if self.seq2seq else torch.ones_like(ids)}
        batch["labels"] = pad([r["labels"] for r in rows], -100) if self.seq2seq else ids.clone()
        return batch


class ResumableOrder:
    """Which samples each rank reads: epoch e shuffles all n samples with seed+e; each optimizer micro-step
    takes the next `micro * world` samples of that order, rank r the r-th slice. Position = (epoch, offset)."""

    def __init__(self, n: int, micro: int, rank: int, world: int, seed: int, shuffle: bool = True):
        if n < micro * world:
            fail(f"only {n} training samples for micro batch {micro} x world size {world} — "
                 "give more data or a smaller --per_device_train_batch_size")
        self.n, self.micro, self.rank, self.world, self.seed, self.shuffle = n, micro, rank, world, seed, shuffle
        self.epoch, self.offset = 0, 0

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.n // (self.micro * self.world)

    def state(self, position: dict[str, int] | None = None) -> dict[str, int]:
        """What a checkpoint holds: the position after the last batch handed out, or the one given (a
        `position()` taken earlier: PrefetchedBatches saves where the step is, not where the prefetch is)."""
        return dict(position) if position is not None else self.position()

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        if self.offset + self.micro * self.world > self.n:  # a different world size may not fit the tail
            self.epoch, self.offset = self.epoch + 1, 0

    def _order(self) -> torch.Tensor:
        """The epoch's order as one tensor: int32 below 2**31 samples (4 bytes a sample, not a ~36-byte Python int;
        torch draws the same permutation for int32 as for int64)."""
        dtype = torch.int32 if self.n < 2**31 else torch.int64
        if not self.shuffle:
            return torch.arange(self.n, dtype=dtype)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch), dtype=dtype)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            order = self._order()
            while self.offset + self.micro * self.world <= self.n:
                start = self.offset + self.rank * self.micro
                self.offset += self.micro * self.world
                yield order[start:start + self.micro].tolist()
            self.epoch, self.offset = self.epoch + 1, 0


class PrefetchedBatches:
    """The training batches, read and collated ahead of the step on a thread of their own (`depth` batches
    ahead), so that the step does not wait for the rows and the padding: a rank's next micro batch is ready when
    its last backward ends. On a GPU (the accelerator says so) each batch is put in pinned memory by that
    thread, and the step's copy to the device is non_blocking.

    On CPU ranks (the accelerator is the CPU) there is no thread: the host IS the device, every core already
    runs a rank's step, and a reading thread only takes the GIL and cycles from it — measured on this repo's
    2-core VM, 2 gpt2_tiny ranks: 27.8 ms a step with the thread, 26.1 ms without (the plain loop's). The batch
    is then read at the step, as the plain loop did, through the same object (same batches, same state).

    Exactly `micro_batches` batches are read (the rest of the run), so the rows read are the ones trained on.
    `state()` is the order's position after the last batch the step TOOK, not after the last one read ahead:
    a checkpoint saved while batches wait in the queue resumes at the first of them, as without prefetching
    (the order's own position runs ahead; the checkpoint never sees it). `epoch` likewise. An error on the
    thread (a bad row of a stream) is raised by the step that would have taken its batch."""

    def __init__(self, order, rows, collate, accel, micro_batches: int, depth: int = 2, ahead: bool | None = None):
        """ahead: read on the thread (None: when the accelerator is not the CPU; the tests ask for both)."""
        import queue
        import threading
        self.order, self.rows, self.collate, self.remaining = order, rows, collate, micro_batches
        self.pin = accel.device_name() != "cpu"
        self.ahead = self.pin if ahead is None else ahead
        self._taken = (order.position(), order.epoch)  # where a save now would resume (after any resume)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="dsfleet-batches", daemon=True)
        if self.ahead:
            self._thread.start()
        else:
            self._indices = iter(order)

    def _produce(self) -> None:
        try:
            indices = iter(self.order)
            for _ in range(self.remaining):
                batch = self.collate([self.rows[i] for i in next(indices)])
                if self.pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                if not self._put((batch, (self.order.position(), self.order.epoch))):
                    return
        except BaseException as e:  # handed to the step, which raises it on the main thread
            self._put(e)

    def _put(self, item) -> bool:
        import queue
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.remaining <= 0:
            raise StopIteration
        if not self.ahead:  # read now, on the step's thread
            batch = self.collate([self.rows[i] for i in next(self._indices)])
            self._taken = (self.order.position(), self.order.epoch)
            self.remaining -= 1
            return batch
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._taken = item
        self.remaining -= 1
        return batch

    def to(self, batch: dict, device) -> dict:
        """The batch on the step's device: non_blocking from pinned memory (the copy overlaps what the host does
        next; the step's kernels queue behind it on the same stream)."""
        return {k: v.to(device, non_blocking=self.pin) for k, v in batch.items()}

    def state(self) -> dict:
        return self.order.state(self._taken[0])

    @property
    def epoch(self) -> int:
        return self._taken[1]

    def close(self) -> None:
        """Stop reading ahead (a run that ends early: preemption); batches read and not taken are dropped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def batch_order(spec, train, denv):
    """The run's batch order: a ResumableOrder over the samples, or under --streaming the stream's own order."""
    if spec.streaming:
        from dsfleet.streaming import StreamOrder
        return StreamOrder(train, spec.per_device_train_batch_size)
    return ResumableOrder(len(train), spec.per_device_train_batch_size, denv.rank, denv.world_size, spec.seed)


def planned_steps(spec, order: "ResumableOrder | None") -> int:
    """Optimizer steps of the run: --max_steps, else --num_train_epochs over the batch order (0: no training)."""
    if order is None:
        return 0
    import math
    per_epoch = max(order.micro_steps_per_epoch // spec.gradient_accumulation_steps, 1)
    return spec.max_steps if spec.max_steps > 0 else math.ceil(spec.num_train_epochs * per_epoch)


def eval_batches(ds, batch_size: int, rank: int, world: int) -> Iterator[list[int]]:
    """Evaluation shards: every rank gets the same number of batches (the last padded by repetition), so
    collective ops inside forward (ZeRO-3 gathers) stay in step."""
    idx = list(range(len(ds)))
    per_rank = -(-len(idx) // world)
    mine = idx[rank * per_rank:(rank + 1) * per_rank] or idx[:1]
    mine += [mine[-1]] * (per_rank - len(mine))
    for i in range(0, per_rank, batch_size):
        yield mine[i:i + batch_size]
