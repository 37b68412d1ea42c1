"""`--streaming`: train on a corpus bigger than the disk (or than anyone wants to tokenize ahead): the training split
is read as a `datasets` stream (`load_dataset(..., streaming=True)`, an IterableDataset), each rank reading its own
share (`datasets.distributed.split_dataset_by_node`: whole shards per rank when the files divide by the world size,
else every world_size-th example), tokenized and packed into blocks on the fly, and its position saved in the
checkpoint — exactly: a resumed run reads the same next block as the uninterrupted run.

Position of a rank: (pass over the stream, example of its share, token of that example) where its next block
starts. The checkpoint holds every rank's position (gathered at each save, written by rank 0); a resume skips that
many examples of the rank's share (read again, not tokenized) and drops that many tokens of the next one. A pass
that ends starts the stream again (the same order: a stream is not shuffled).

Packing (causal LM): each text's ids, followed by `</s>` unless the tokenizer appends it, concatenated across texts
and cut into --block_size blocks (blank texts skipped). Unlike the token cache, nothing is dropped at a 100,000-row
group's end, so the blocks differ from a non-streaming run's on the same file.

Translation: one row a pair, {"input_ids", "labels"} as the token cache makes them (--source_prefix, truncation at
--max_source_length / --max_target_length), the position's token always 0. A pair with an empty or missing side
is skipped (a stream cannot be checked ahead for holes as a file is): the first one is said, with its example
index, and each rank counts them.

Evaluation (--do_eval, --eval_steps, --do_predict) reads --validation_file / --test_file (or the embedded
corpus's splits) through the token cache as a run without --streaming does: held-out splits are of known size,
tokenized once, memory-mapped; only the train split streams.

What it refuses (one line each, before anything is written): --synthetic_data, training by --num_train_epochs (a
stream's length is unknown: pass --max_steps), --do_eval/--do_predict without a file for their split,
a run without a tokenizer it can load (training a BPE needs the whole corpus: pass --tokenizer_name), and a resume from a checkpoint of another world size or of a non-streaming run.
"""
from __future__ import annotations

import os
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from dsfleet.cli import fail

ENCODE_BATCH = 256  # texts of a rank's share tokenized per tokenizer call


def check(spec) -> None:
    """The options a stream cannot serve."""
    from dsfleet import data
    if spec.synthetic_data:
        fail("--streaming reads a dataset, --synthetic_data makes batches without one — drop one of them")
    if spec.max_steps <= 0:
        fail("--streaming needs --max_steps: a stream's length is unknown, so --num_train_epochs cannot be counted "
             "— pass --max_steps N")
    for flag, wanted, file in (("--do_eval", spec.do_eval, spec.validation_file),
                               ("--do_predict", spec.do_predict, spec.test_file)):
        if wanted and not file and spec.dataset_name != data.EMBEDDED:
            named = "--validation_file" if flag == "--do_eval" else "--test_file"
            fail(f"{flag} with --streaming reads its split from {named} (only the train split is streamed; "
                 f"evaluation needs a split of known size) — pass {named} FILE, or drop {flag}")


def open_stream(spec):
    """The training split as a `datasets` IterableDataset (nothing downloaded or read ahead)."""
    from dsfleet import data
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if spec.dataset_name == data.EMBEDDED:
        files, builder = {"train": data.embedded_files(spec.task)["train"]}, "json"
    elif spec.train_file:
        if not Path(spec.train_file).is_file():
            fail(f"--train_file {spec.train_file} not found — pass an existing file")
        suffix = Path(spec.train_file).suffix
        if suffix not in data._BUILDERS:
            fail(f"--train_file {spec.train_file} has the extension {suffix or '(none)'} — use one of "
                 f"{', '.join(data._BUILDERS)} (convert the file or rename it)")
        if Path(spec.train_file).stat().st_size == 0:
            fail(f"--train_file {spec.train_file} is empty — give it at least one row of data")
        files, builder = {"train": spec.train_file}, data._BUILDERS[suffix]
    elif spec.dataset_name:
        try:
            return datasets.load_dataset(spec.dataset_name, spec.dataset_config_name, split="train", streaming=True)
        except Exception as e:
            fail(f"cannot stream dataset {spec.dataset_name!r} ({data._why(e)}) — pass a local dir or --train_file, "
                 "or drop --streaming")
    else:
        fail("no data given — --streaming needs --train_file FILE or --dataset_name NAME|DIR")
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)


class StreamRows:
    """This rank's blocks of the stream, read in order: rows[j] is its j-th block from where it started, as
    {"input_ids": [...]} (train()'s `splits["train"][i]`); only the next block can be asked for."""

    def __init__(self, spec, tokenizer, rank: int, world: int):
        self.spec, self.tokenizer, self.rank, self.world = spec, tokenizer, rank, world
        self.pairs = spec.task == "translation"  # rows are translation pairs, not packed blocks
        self.skipped = 0  # pairs with an empty side passed over since the run (or its resume) started
        self._warned = False
        self.position = {"pass": 0, "example": 0, "token": 0}  # where this rank's next block starts
        self.read = 0  # blocks handed out
        self._blocks: Iterator[list[int]] | None = None
        self.started_at = dict(self.position)

    def seek(self, position: dict[str, int]) -> None:
        self.position = {k: int(position[k]) for k in ("pass", "example", "token")}
        self.started_at = dict(self.position)
        self._blocks = None

    def _share(self):
        from datasets.distributed import split_dataset_by_node
        ds = open_stream(self.spec)
        if self.spec.max_train_samples:
            ds = ds.take(self.spec.max_train_samples)
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.world)

    def _generate(self) -> Iterator[Any]:
        if self.pairs:
            yield from self._generate_pairs()
            return
        tok, block = self.tokenizer, self.spec.block_size
        eos = tok.eos_token_id
        while True:
            start_example, start_token = self.position["example"], self.position["token"]
            # the examples before the position are read again, not tokenized (IterableDataset.skip would skip
            # them before the split by rank, not in this rank's share)
            share = islice(self._share(), start_example, None)
            buf: list[int] = []
            segs: list[list[int]] = []  # [example, first token, end] of each example's part of buf, in order
            yielded = False
            for k, text, ids in self._encoded(share, start_example):
                if not text:
                    if not segs:
                        self.position.update(example=k + 1, token=0)
                    continue
                ids = ids if ids and ids[-1] == eos else ids + [eos]
                first = start_token if k == start_example else 0
                if first >= len(ids):
                    fail(f"the checkpoint's stream position (rank {self.rank}: example {k}, token {first}) is past "
                         f"that example's {len(ids)} tokens: the data changed since it was saved — resume on the "
                         "same data, or start a new --output_dir")
                buf.extend(ids[first:])
                segs.append([k, first, len(ids)])
                while len(buf) >= block:
                    out, buf = buf[:block], buf[block:]
                    used = block
                    while used:
                        n = segs[0][2] - segs[0][1]
                        if n <= used:
                            segs.pop(0)
                            used -= n
                        else:
                            segs[0][1] += used
                            used = 0
                    ex, tok_at = (segs[0][0], segs[0][1]) if segs else (k + 1, 0)
                    self.position.update(example=ex, token=tok_at)
                    yielded = True
                    yield out
            if not yielded and not (start_example or start_token):
                fail(f"this rank's share of the streamed train data (rank {self.rank} of {self.world}) holds less "
                     f"than one block of --block_size {block} tokens — give more text or a smaller --block_size")
            self.position = {"pass": self.position["pass"] + 1, "example": 0, "token": 0}  # the next pass

    def _generate_pairs(self) -> Iterator[dict[str, list[int]]]:
        """This rank's translation rows from its position on, pass after pass."""
        while True:
            start = self.position["example"]
            yielded = False
            for k, row in self._encoded_pairs(islice(self._share(), start, None), start):
                self.position.update(example=k + 1, token=0)
                if row is None:
                    continue
                yielded = True
                yield row
            if not yielded and not start:
                fail(f"this rank's share of the streamed train data (rank {self.rank} of {self.world}) holds no "
                     "translation pair with both sides — give more pairs, or fewer ranks")
            self.position = {"pass": self.position["pass"] + 1, "example": 0, "token": 0}

    def _encoded_pairs(self, share, start: int) -> Iterator[tuple[int, dict[str, list[int]] | None]]:
        """(example index in the share, its row — None for a pair with an empty side), ENCODE_BATCH pairs to a
        tokenizer call, encoded as the token cache encodes them."""
        from dsfleet import data
        spec, rows = self.spec, enumerate(share, start=start)
        langs = (spec.source_lang, spec.target_lang)
        while True:
            chunk = list(islice(rows, ENCODE_BATCH))
            if not chunk:
                return
            for _, row in chunk[:1]:
                if "translation" not in row:
                    fail(f"the streamed train data has no 'translation' column (columns: {', '.join(row)}) — rows "
                         f"must look like {{\"translation\": {{\"{langs[0]}\": ..., \"{langs[1]}\": ...}}}}")
            whole = [(k, row["translation"]) for k, row in chunk
                     if all(str((row["translation"] or {}).get(lang) or "").strip() for lang in langs)]
            if len(whole) < len(chunk):
                kept = {k for k, _ in whole}
                self._say_skipped([k for k, _ in chunk if k not in kept], chunk)
            src, tgt = data.encode_pairs(self.tokenizer, [t for _, t in whole], spec.source_prefix, *langs,
                                         spec.max_source_length, spec.max_target_length)
            encoded = {k: {"input_ids": a, "labels": b} for (k, _), a, b in zip(whole, src, tgt)}
            for k, _ in chunk:
                yield k, encoded.get(k)

    def _say_skipped(self, holes: list[int], chunk) -> None:
        if not self._warned:
            self._warned = True
            first = dict(chunk)[holes[0]]["translation"] or {}
            langs = [lang for lang in (self.spec.source_lang, self.spec.target_lang)
                     if not str(first.get(lang) or "").strip()]
            print(f"dsfleet: warning: streamed pair {holes[0]} of rank {self.rank}'s share has no "
                  f"{' / '.join(repr(x) for x in langs)} side — such pairs are skipped (each rank's count since "
                  "its launch is in the checkpoint's stream position)", flush=True)
        self.skipped += len(holes)

    def _encoded(self, share, start: int) -> Iterator[tuple[int, Any, list[int]]]:
        """(example index in the share, its text, its ids), the texts tokenized ENCODE_BATCH at a time (one
        tokenizer call per batch, not per text)."""
        column, rows = self.spec.text_column, enumerate(share, start=start)
        while True:
            chunk = list(islice(rows, ENCODE_BATCH))
            if not chunk:
                return
            for _, row in chunk[:1]:
                if column not in row:
                    fail(f"the streamed train data has no {column!r} column (columns: {', '.join(row)}) — pass "
                         "--text_column")
            texts = [row[column] for _, row in chunk]
            full = [t for t in texts if t]
            encoded = iter(self.tokenizer(full)["input_ids"] if full else [])
            for (k, _), text in zip(chunk, texts):
                yield k, text, next(encoded) if text else []

    def check_first_block(self) -> tuple[str, str | None]:
        """("ok", None) when this rank's share fills one block from the start, else ("error", the one line) —
        read before the run dir is written (the position is left at the start)."""
        from dsfleet.cli import UsageError
        try:
            next(self._generate())
            return "ok", None
        except UsageError as e:
            return "error", str(e)
        finally:
            self.seek({"pass": 0, "example": 0, "token": 0})
            self.skipped = 0

    def __getitem__(self, j: int) -> dict[str, list[int]]:
        if j != self.read:
            raise IndexError(f"a stream is read in order: block {self.read} is next, not {j}")
        if self._blocks is None:
            self._blocks = self._generate()
        at = dict(self.position)
        row = next(self._blocks)
        if self.pairs:  # the pair's own example (the position was where the next one was looked for: maybe a hole)
            at = dict(self.position, example=self.position["example"] - 1)
        else:
            row = {"input_ids": row}
        self.read += 1
        if os.environ.get("DSFLEET_TRACE_ROWS"):  # tests: where each block of each rank started, and its ids
            self._trace(at, row["input_ids"] + row.get("labels", []))
        return row

    def _trace(self, at: dict[str, int], ids: list[int]) -> None:
        import zlib
        trace = Path(os.environ["DSFLEET_TRACE_ROWS"])
        trace.mkdir(parents=True, exist_ok=True)
        crc = zlib.crc32(b"".join(i.to_bytes(4, "little") for i in ids))
        with open(trace / f"rank{self.rank}.txt", "a") as f:
            f.write(f"{at['pass']} {at['example']} {at['token']} {crc:08x}\n")


class StreamOrder:
    """The batch order of a stream (what `data.ResumableOrder` is for a dataset of known size): each micro step,
    this rank's next `micro` blocks. Its state is every rank's stream position (a collective: every rank calls
    state() at each save, as it does)."""

    def __init__(self, rows: StreamRows, micro: int):
        self.rows, self.micro = rows, micro

    micro_steps_per_epoch = 1  # unknown for a stream; --max_steps (required) decides the steps

    @property
    def epoch(self) -> int:
        return self.rows.position["pass"]

    def position(self) -> dict[str, int]:
        """This rank's stream position after the last block read (cheap, local: no collective); for translation
        pairs with the count of pairs skipped for an empty side."""
        if self.rows.pairs:
            return dict(self.rows.position, skipped=self.rows.skipped)
        return dict(self.rows.position)

    def state(self, position: dict[str, int] | None = None) -> dict[str, Any]:
        """Every rank's position (this rank's: `position`, a `position()` taken earlier, else the current one)."""
        import torch.distributed as dist
        mine = dict(position) if position is not None else self.position()
        everyone = [None] * self.rows.world
        if self.rows.world > 1:
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        return {"streaming": True, "world_size": self.rows.world, "ranks": everyone, "epoch": mine["pass"]}

    def load_state(self, state: dict[str, Any]) -> None:
        check_position(state, self.rows.world)
        self.rows.seek(state["ranks"][self.rows.rank])

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            start = self.rows.read
            yield list(range(start, start + self.micro))


def check_position(state: dict[str, Any], world: int, where: str = "this checkpoint") -> None:
    """A checkpoint's data position that a stream of `world` ranks can continue from, or one line."""
    if not state.get("streaming"):
        fail(f"{where} was saved by a run without --streaming (its position is a sample offset, not a stream "
             "position) — resume it without --streaming, or start a new --output_dir")
    if int(state["world_size"]) != world:
        fail(f"{where} holds the stream positions of {state['world_size']} ranks, not {world} — resume it on "
             f"{state['world_size']} ranks (each rank's share of the stream depends on the world size)")


def check_resume(spec, out: Path, world: int) -> None:
    """Before anything is written or converted (a checkpoint of another world size would be re-cut for this one
    first): the checkpoint to resume holds stream positions for this many ranks."""
    import json
    from dsfleet import checkpoint
    if not spec.resume_from_checkpoint:
        return
    tag_dir = checkpoint.find(spec.resume_from_checkpoint, out)
    if tag_dir is not None:
        state = json.loads((tag_dir / checkpoint.STATE_FILE).read_text())
        check_position(state.get("data", {}), world, f"checkpoint {tag_dir}")



def prepare_for_run(spec, source, out: Path, denv):
    """(tokenizer, {"train": StreamRows}): every rank's share checked to fill a block (the spec's own checks,
    `check`, ran when it was parsed)."""
    from dsfleet import data
    if spec.task != "translation":
        data.check_block_size(spec, source.max_positions)
    check_resume(spec, out, denv.world_size)
    name = spec.tokenizer_name or data.model_dir_tokenizer(spec)
    if not name and (out / "tokenizer" / "tokenizer.json").is_file():
        name = str(out / "tokenizer")  # a resumed run: the tokenizer its run dir holds
    if not name:
        fail("--streaming needs a tokenizer to load (training one reads the whole corpus) — pass --tokenizer_name "
             "DIR, or a model dir with tokenizer files")
    tokenizer = data.load_tokenizer(name)
    rows = StreamRows(spec, tokenizer, denv.rank, denv.world_size)
    verdicts = [rows.check_first_block()]
    if denv.world_size > 1:  # a bad input on one rank stops every rank, now
        import torch.distributed as dist
        mine, verdicts = verdicts[0], [None] * denv.world_size
        dist.all_gather_object(verdicts, mine)
    for kind, line in verdicts:
        if kind == "error":
            fail(line)
    splits = {"train": rows, **held_out_splits(spec, source, out, denv, name)}
    if os.environ.get("RANK", "0") == "0":
        print(f"dsfleet: streaming the train data (rank {denv.rank} of {denv.world_size} reads "
              f"{'every ' + str(denv.world_size) + 'th example or whole shards' if denv.world_size > 1 else 'all of it'}"
              f"), tokenized on the fly into "
              f"{'translation pairs' if rows.pairs else f'blocks of {spec.block_size}'}", flush=True)
    return tokenizer, splits


def held_out_splits(spec, source, out: Path, denv, tokenizer_name: str) -> dict:
    """The validation / test splits a streaming run evaluates on: the token cache's entry for those files alone
    (the same tokenizer, by --tokenizer_name), prepared once per job like a run without --streaming."""
    from dsfleet import data
    if not (spec.do_eval or spec.do_predict or spec.eval_steps):
        return {}
    if not (spec.validation_file or spec.test_file or spec.dataset_name == data.EMBEDDED):
        return {}  # --eval_steps alone, no file: nothing to evaluate on (as a run without a validation split)
    from dsfleet import token_cache
    if spec.dataset_name == data.EMBEDDED:
        files = {"dataset_name": data.EMBEDDED}
    else:
        files = {"dataset_name": None, "validation_file": spec.validation_file, "test_file": spec.test_file}
    held_out = spec.model_copy(update={"streaming": False, "do_train": False, "train_file": None, **files,
                                       "tokenizer_name": tokenizer_name})
    _, splits = token_cache.prepare_for_run(held_out, source, out, denv)
    return {k: v for k, v in splits.items() if k in ("validation", "test")}
