"""`--streaming` (dsfleet/streaming.py): the training text read as a `datasets` stream, each rank its own share,
tokenized and packed on the fly, the stream position in the checkpoint. One real 2-rank CPU run on a local text
file, checked many ways: the loss falls, the ranks read disjoint blocks, no token cache is made, the checkpoint
holds both ranks' positions; then a requeue from its mid-run checkpoint reads exactly the blocks the uninterrupted
run read after that step (the same ids, in the same order) and its losses equal the uninterrupted run's; a resume
on one rank is refused in one line, before the checkpoint is touched."""
import json
import shutil

import pytest

from tests.launch import cpu_env, deepspeed_train, explain, losses, metrics, python_train
from tests.test_token_cache import write_corpus

STEPS, SAVE = 40, 20
MICRO = 4


def blocks(trace_dir, rank):
    """(pass, example, token, crc of the ids) of every block a rank read from the stream, in order
    (DSFLEET_TRACE_ROWS; the token cache's rows, "split index", are the held-out splits' reads)."""
    return [tuple(line.split()) for line in (trace_dir / f"rank{rank}.txt").read_text().splitlines()
            if len(line.split()) == 4]


def test_two_ranks_stream_train_and_a_requeue_continues_at_the_saved_position(tmp_path):
    from dsfleet.data import train_bpe_tokenizer
    corpus = write_corpus(tmp_path / "corpus.txt", 3000, seed=3)
    tokenizer = tmp_path / "tokenizer"
    train_bpe_tokenizer(iter(corpus.read_text().splitlines()), 512, tokenizer)
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["--preset", "gpt2_tiny", "--from_scratch", "--tokenizer_name", str(tokenizer), "--train_file", str(corpus),
            "--streaming", "--block_size", "32", "--per_device_train_batch_size", str(MICRO), "--learning_rate", "3e-3",
            "--logging_steps", "1", "--seed", "5", "--max_steps", str(STEPS), "--save_steps", str(SAVE),
            "--cache_dir", str(cache), "--report_to", "jsonl", "--output_dir", str(out)]
    first = deepspeed_train(args, env=cpu_env(DSFLEET_TRACE_ROWS=str(tmp_path / "trace1")))
    assert first.returncode == 0, explain(first)
    assert "dsfleet: streaming the train data" in first.stdout and "token cache" not in first.stdout, first.stdout
    assert not cache.exists()  # nothing tokenized ahead, nothing on disk but the run dir
    curve = losses(out)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert sum(curve[s] for s in range(STEPS - 4, STEPS + 1)) < 0.6 * sum(curve[s] for s in range(1, 6)), curve
    read = {r: blocks(tmp_path / "trace1", r) for r in (0, 1)}
    assert len(read[0]) == len(read[1]) == STEPS * MICRO
    assert not {b[3] for b in read[0]} & {b[3] for b in read[1]}  # each rank its own share: no block read twice
    state = json.loads((out / "checkpoints" / f"step_{SAVE}" / "dsfleet_state.json").read_text())["data"]
    assert state["streaming"] is True and state["world_size"] == 2 and len(state["ranks"]) == 2, state
    for r in (0, 1):  # the saved position is where the rank's next block started in the uninterrupted run
        nxt = read[r][SAVE * MICRO]
        assert (str(state["ranks"][r]["pass"]), str(state["ranks"][r]["example"]), str(state["ranks"][r]["token"])) \
            == nxt[:3], (r, state["ranks"][r], nxt)
        assert state["ranks"][r]["example"] > 0

    shutil.rmtree(out / "checkpoints" / f"step_{STEPS}")  # the job was "preempted" after step SAVE's checkpoint
    (out / "checkpoints" / "latest").write_text(f"step_{SAVE}")
    second = deepspeed_train([*args, "--resume_from_checkpoint", "auto"],
                             env=cpu_env(DSFLEET_TRACE_ROWS=str(tmp_path / "trace2")))
    assert second.returncode == 0, explain(second)
    assert f"at step {SAVE}" in second.stdout, second.stdout
    for r in (0, 1):
        assert blocks(tmp_path / "trace2", r) == read[r][SAVE * MICRO:], r  # the same blocks, in the same order
    resumed = losses(out)
    off = {s: (resumed[s], curve[s]) for s in range(SAVE + 1, STEPS + 1) if abs(resumed[s] - curve[s]) > 1e-4 * curve[s]}
    assert not off, off

    # on another world size each rank's share is another: one line, exit 2, and the checkpoint is not touched (no
    # re-cut for 1 rank)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    one = python_train([*args, "--resume_from_checkpoint", "auto"])
    assert one.returncode == 2, explain(one)
    assert f"checkpoints/step_{STEPS} holds the stream positions of 2 ranks, not 1 — resume it on 2 ranks" \
        in one.stderr, explain(one)
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_translation_pairs_stream_on_two_ranks_skip_holes_and_resume_exactly(tmp_path):
    """T5 on streamed translation pairs (the embedded en-ro data, two pairs with an empty side): one row a pair,
    encoded as the token cache encodes them; the ranks read disjoint pairs, the holes are skipped with one warning
    and counted in the checkpoint, the loss falls, and a requeue from the mid-run checkpoint reads the same pairs
    in the same order with the uninterrupted run's losses. Evaluation reads --validation_file through the token
    cache (only the train split streams): eval rows mid-run and at the end, the requeue's equal to the first's."""
    from dsfleet import data
    rows = [json.loads(line) for line in open(data.embedded_files("translation")["train"])]
    tokenizer = tmp_path / "tokenizer"
    data.train_bpe_tokenizer(iter(t for r in rows for t in r["translation"].values()), 512, tokenizer)
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i, row in enumerate(rows[:600]):
            if i in (4, 9):  # rank 0's 3rd and rank 1's 5th pair of their shares (every 2nd example)
                row["translation"]["ro"] = "" if i == 4 else None
            f.write(json.dumps(row) + "\n")
    steps, save, micro = 16, 8, 4
    out = tmp_path / "run"
    args = ["--preset", "t5_tiny", "--from_scratch", "--tokenizer_name", str(tokenizer), "--train_file", str(pairs),
            "--streaming", "--per_device_train_batch_size", str(micro), "--logging_steps", "1", "--seed", "5",
            "--max_steps", str(steps), "--save_steps", str(save), "--report_to", "jsonl", "--output_dir", str(out),
            "--do_train", "--do_eval", "--eval_steps", str(save), "--max_eval_samples", "16",
            "--validation_file", data.embedded_files("translation")["validation"], "--cache_dir", str(tmp_path / "c")]
    first = deepspeed_train(args, env=cpu_env(DSFLEET_TRACE_ROWS=str(tmp_path / "trace1")))
    assert first.returncode == 0, explain(first)
    assert "tokenized on the fly into translation pairs" in first.stdout, first.stdout
    assert "token cache built" in first.stdout and "validation 16 rows" in first.stdout, first.stdout
    evals = {r["step"]: r["eval_loss"] for r in metrics(out) if "eval_loss" in r}
    assert sorted(evals) == [save, steps] and evals[steps] < evals[save], evals
    assert first.stdout.count("such pairs are skipped") == 2, first.stdout  # once per rank
    curve = losses(out)
    assert sorted(curve) == list(range(1, steps + 1))
    assert sum(curve[s] for s in range(steps - 2, steps + 1)) < 0.7 * sum(curve[s] for s in range(1, 4)), curve
    read = {r: blocks(tmp_path / "trace1", r) for r in (0, 1)}
    assert len(read[0]) == len(read[1]) == steps * micro
    assert not {b[3] for b in read[0]} & {b[3] for b in read[1]}
    assert {b[1] for b in read[0]}.isdisjoint({"2"}) and {b[1] for b in read[1]}.isdisjoint({"4"})  # the holes
    state = json.loads((out / "checkpoints" / f"step_{save}" / "dsfleet_state.json").read_text())["data"]
    for r in (0, 1):  # each rank read save * micro pairs and passed over its one hole: the position is past both
        assert state["ranks"][r] == {"pass": 0, "example": save * micro + 1, "token": 0, "skipped": 1}, state

    shutil.rmtree(out / "checkpoints" / f"step_{steps}")
    (out / "checkpoints" / "latest").write_text(f"step_{save}")
    second = deepspeed_train([*args, "--resume_from_checkpoint", "auto"],
                             env=cpu_env(DSFLEET_TRACE_ROWS=str(tmp_path / "trace2")))
    assert second.returncode == 0, explain(second)
    for r in (0, 1):
        assert blocks(tmp_path / "trace2", r) == read[r][save * micro:], r
    resumed = losses(out)
    off = {s: (resumed[s], curve[s]) for s in range(save + 1, steps + 1) if abs(resumed[s] - curve[s]) > 1e-4 * curve[s]}
    assert not off, off
    assert "token cache reused" in second.stdout, second.stdout
    again = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r and r["step"] == steps]
    assert len(again) == 2 and again[1] == pytest.approx(again[0], rel=1e-4), again
