"""The token cache (dsfleet/token_cache.py): the corpus tokenized once into memory-mapped shards. What a user
notices: the rows are the ones the in-memory path made, a second run or a requeue says `token cache reused` and
rewrites nothing, a changed tokenizer or block size builds a new entry, a prepare killed with SIGKILL leaves
nothing a run would read, and two real CPU ranks read disjoint rows and resume exactly where a checkpoint left
off."""
import json
import random
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from tests.launch import REPO, cpu_env, deepspeed_train, explain, losses


def entries(cache):
    """{key: manifest} of the whole entries in a cache dir (what a run would read)."""
    tokens = cache / "tokens"
    return {p.name: json.loads((p / "manifest.json").read_text())
            for p in (tokens.iterdir() if tokens.is_dir() else []) if (p / "manifest.json").is_file()}


def mtimes(entry):
    return {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}


def prepare(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "dsfleet.cli", "prepare", "--", *args], cwd=REPO,
                          env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)


def write_corpus(path, lines, seed=0):
    rng = random.Random(seed)
    words = "the a river stone quick slow light dark over under north south red blue seven eleven house road".split()
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + "\n"
                            for _ in range(lines)))
    return path


@pytest.mark.parametrize("preset,extra", [("t5_tiny", []), ("gpt2_tiny", ["--block_size", "64"])])
def test_rows_are_the_in_memory_paths_and_a_second_prepare_reuses_them(tmp_path, preset, extra):
    """Two tokenizer processes (the pool path) give exactly data.tokenize's rows; the same spec again reuses."""
    from dsfleet import data, token_cache
    from dsfleet.models import resolve_source
    from dsfleet.spec import parse_args
    cache = tmp_path / "cache"
    spec = parse_args(["--preset", preset, "--from_scratch", "--dataset_name", "embedded", "--cache_dir", str(cache),
                       "--preprocessing_num_workers", "2", *extra])
    source = resolve_source(spec)
    said = []
    tokenizer, splits, entry = token_cache.prepare_once(spec, source, None, 1, say=said.append)
    assert any(line.startswith("token cache built") and "2 worker(s)" in line for line in said), said
    old = data.tokenize(spec, data.load_checked(spec, 1), tokenizer)
    assert set(old) == set(splits) == {"train", "validation", "test"}
    for split in old:
        assert len(splits[split]) == len(old[split]) > 0
        assert [splits[split][i] for i in range(len(splits[split]))] == [old[split][i] for i in range(len(old[split]))]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16"  # vocab 512
    before = mtimes(entry)
    said.clear()
    _, again, entry2 = token_cache.prepare_once(spec, source, None, 1, say=said.append)
    assert entry2 == entry and mtimes(entry) == before
    assert any(line.startswith("token cache reused") for line in said), said
    assert again["train"][3] == splits["train"][3]


def test_prepare_command_reuses_and_rebuilds_for_a_new_tokenizer_or_block_size(tmp_path):
    from dsfleet.data import train_bpe_tokenizer
    corpus = write_corpus(tmp_path / "corpus.txt", 3000)
    cache = tmp_path / "cache"
    base = ["--preset", "gpt2_tiny", "--from_scratch", "--train_file", str(corpus), "--block_size", "32",
            "--cache_dir", str(cache)]
    first = prepare(base)
    assert first.returncode == 0, explain(first)
    assert "token cache built" in first.stdout and "tokenizer trained" in first.stdout
    (key, manifest), = entries(cache).items()
    before = mtimes(cache / "tokens" / key)
    again = prepare(base)
    assert again.returncode == 0, explain(again)
    assert "token cache reused" in again.stdout and "tokenizer reused" in again.stdout, again.stdout
    assert mtimes(cache / "tokens" / key) == before and set(entries(cache)) == {key}
    block = prepare([*base[:-4], "--block_size", "48", "--cache_dir", str(cache)])
    assert block.returncode == 0 and "token cache built" in block.stdout, explain(block)
    other = train_bpe_tokenizer(iter(corpus.read_text().splitlines()), 280, tmp_path / "tok280")
    tok = prepare([*base, "--tokenizer_name", str(tmp_path / "tok280")])
    assert tok.returncode == 0 and "token cache built" in tok.stdout, explain(tok)
    built = entries(cache)
    assert len(built) == 3 and mtimes(cache / "tokens" / key) == before
    by_block = {m["block_size"]: m for m in built.values()}
    assert set(by_block) == {32, 48}
    assert by_block[48]["splits"]["train"]["rows"] < manifest["splits"]["train"]["rows"]
    assert len({m["inputs"]["tokenizer"] for m in built.values()}) == 2 and len(other) == 280


def test_the_batch_order_is_the_one_a_python_list_gave():
    """ResumableOrder keeps its epoch order as an int32 tensor (memory): the same samples as torch's int64
    permutation as a list, so runs and checkpoints from before resume on the same order."""
    import torch
    from dsfleet.data import ResumableOrder
    n, micro, world = 1003, 4, 2
    for rank in range(world):
        order = ResumableOrder(n, micro, rank, world, seed=7)
        batches = iter(order)
        got = [next(batches) for _ in range(n // (micro * world) + 3)]  # into the second epoch
        want = []
        for epoch in (0, 1):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
            want += [perm[o + rank * micro:o + rank * micro + micro] for o in range(0, n - micro * world + 1, micro * world)]
        assert got == want[:len(got)] and all(isinstance(i, int) for i in got[0])


@pytest.mark.parametrize("ahead", [True, False])
def test_prefetched_batches_are_the_loops_and_a_save_resumes_at_the_first_batch_not_taken(monkeypatch, ahead):
    """PrefetchedBatches reads ahead on a thread (what a GPU rank does): the batches are the plain loop's, only
    the rest of the run is read, and its state is where the step is (the order itself is ahead). CPU here: the
    accelerator says no pinning and no thread (ahead=False, the CPU ranks' default: the same contract). A
    failing read is raised at the step."""
    import torch
    from dsfleet import runtime
    from dsfleet.data import Collator, PrefetchedBatches, ResumableOrder
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    accel = runtime.accelerator()
    rows = [{"input_ids": [i, i + 1, i + 2]} for i in range(50)]
    collate = Collator(pad_id=0, seq2seq=False)

    class Reads(list):  # the rows, with a record of which were read
        def __getitem__(self, i):
            self.read.append(i)
            return list.__getitem__(self, i)
    data = Reads(rows)
    data.read = []
    plain = ResumableOrder(50, 4, 1, 2, seed=3)
    want, states = [], []
    for idx in iter(plain):
        want.append(collate([rows[i] for i in idx]))
        states.append((plain.state(), plain.epoch))
        if len(want) == 9:  # 6 micro steps an epoch: into the second
            break
    batches = PrefetchedBatches(ResumableOrder(50, 4, 1, 2, seed=3), data, collate, accel, micro_batches=9,
                                ahead=ahead)
    assert not batches.pin and batches.state() == {"epoch": 0, "offset": 0}
    assert PrefetchedBatches(ResumableOrder(50, 4, 1, 2, seed=3), rows, collate, accel, 0).ahead is False
    got = [next(batches) for _ in range(4)]
    deadline = time.time() + 30
    while ahead and len(data.read) <= 4 * 4 and time.time() < deadline:  # wait for the thread to read ahead
        time.sleep(0.01)
    if ahead:
        assert len(data.read) > 4 * 4 and tuple(batches.order.position().values()) > tuple(states[3][0].values())
    else:
        assert len(data.read) == 4 * 4
    assert (batches.state(), batches.epoch) == states[3]  # a save now resumes at the 5th batch
    got += list(batches)
    assert len(got) == 9 and all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w)
    assert (batches.state(), batches.epoch) == states[8] and states[8][1] == 1
    assert len(data.read) == 9 * 4  # the rest of the run, nothing more
    assert batches.to(got[0], torch.device("cpu"))["input_ids"] is got[0]["input_ids"]
    resumed = ResumableOrder(50, 4, 1, 2, seed=3)
    resumed.load_state(states[3][0])
    again = PrefetchedBatches(resumed, rows, collate, accel, micro_batches=5, ahead=ahead)
    assert all(torch.equal(g["input_ids"], w["input_ids"]) for g, w in zip(again, want[4:]))

    class Broken(list):
        def __getitem__(self, i):
            raise ValueError("row 7 is bad")
    failing = PrefetchedBatches(ResumableOrder(50, 4, 0, 1, seed=3), Broken(rows), collate, accel, micro_batches=3,
                                 ahead=ahead)
    with pytest.raises(ValueError, match="row 7 is bad"):
        next(failing)


def test_one_preparer_per_filesystem():
    """A cache dir every node sees: rank 0 prepares for all; per-node dirs (k8s pods): the first rank of each."""
    from dsfleet.token_cache import plan_preparers
    assert plan_preparers([("a", True), ("a", True), ("b", True), ("b", True)]) == ({0}, [0, 0, 0, 0])
    assert plan_preparers([("a", True), ("a", True), ("b", False), ("b", False), ("c", False)]) == (
        {0, 2, 4}, [0, 0, 2, 2, 4])


def test_a_killed_prepare_leaves_no_usable_half_cache(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 3000)
    cache = tmp_path / "cache"
    args = ["--preset", "gpt2_tiny", "--from_scratch", "--train_file", str(corpus), "--block_size", "32",
            "--cache_dir", str(cache), "--preprocessing_num_workers", "2"]
    killed = prepare(args, env=cpu_env(DSFLEET_FAULT_INJECT="kill_in_prepare"))
    assert killed.returncode == -9, explain(killed)
    half = list((cache / "tokens").glob(".tmp-*"))
    assert len(half) == 1 and (half[0] / "train.input_ids.bin").stat().st_size > 0  # shards were being written
    assert not entries(cache) and not (half[0] / "manifest.json").exists()
    assert not (cache / "tokenizers").exists()  # the trained tokenizer is kept only with a whole entry
    time.sleep(0.5)  # the tokenizer workers die with their parent (PR_SET_PDEATHSIG)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(cache) in " ".join(p.info["cmdline"] or [])]
    done = prepare(args)
    assert done.returncode == 0, explain(done)
    assert "token cache built" in done.stdout and "reused" not in done.stdout
    assert not list((cache / "tokens").glob(".tmp-*"))  # the dead preparer's temp dir is gone
    (manifest,) = entries(cache).values()
    assert manifest["splits"]["train"]["rows"] > 100


def test_two_ranks_read_disjoint_rows_and_a_requeue_reuses_the_cache_and_resumes_exactly(tmp_path):
    """One real 2-rank run (trained tokenizer, a text file), then a requeue from its step-3 checkpoint."""
    corpus = write_corpus(tmp_path / "corpus.txt", 2000, seed=1)
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["--preset", "gpt2_tiny", "--from_scratch", "--train_file", str(corpus), "--block_size", "32",
            "--cache_dir", str(cache), "--per_device_train_batch_size", "2", "--logging_steps", "1", "--seed", "5",
            "--max_steps", "6", "--save_steps", "3", "--report_to", "jsonl", "--output_dir", str(out)]
    first = deepspeed_train(args, env=cpu_env(DSFLEET_TRACE_ROWS=str(tmp_path / "trace1")))
    assert first.returncode == 0, explain(first)
    assert first.stdout.count("token cache built") == 1, first.stdout
    (key, manifest), = entries(cache).items()
    entry = cache / "tokens" / key
    before = mtimes(entry)
    read = {r: [int(line.split()[1]) for line in (tmp_path / "trace1" / f"rank{r}.txt").read_text().splitlines()]
            for r in (0, 1)}
    assert len(read[0]) == len(read[1]) == 6 * 2  # 6 steps x micro batch 2
    assert not set(read[0]) & set(read[1])  # 24 of the epoch's rows, none read twice
    assert max(read[0] + read[1]) < manifest["splits"]["train"]["rows"]
    curve = losses(out)
    shutil.rmtree(out / "checkpoints" / "step_6")  # the job was "preempted" after step 3's checkpoint
    (out / "checkpoints" / "latest").write_text("step_3")
    second = deepspeed_train([*args, "--resume_from_checkpoint", "auto"],
                             env=cpu_env(DSFLEET_TRACE_ROWS=str(tmp_path / "trace2")))
    assert second.returncode == 0, explain(second)
    assert "token cache reused" in second.stdout and "token cache built" not in second.stdout, second.stdout
    assert "at step 3" in second.stdout
    assert mtimes(entry) == before and set(entries(cache)) == {key}
    for r in (0, 1):
        again = [int(line.split()[1]) for line in (tmp_path / "trace2" / f"rank{r}.txt").read_text().splitlines()]
        assert again == read[r][3 * 2:], (r, again, read[r])  # the rows of steps 4-6, in the same order
    resumed = losses(out)
    assert all(abs(resumed[s] - curve[s]) <= 1e-4 * abs(curve[s]) for s in (4, 5, 6)), (curve, resumed)


def test_the_run_dir_is_untouched_when_the_data_cannot_fill_a_block(tmp_path):
    """A check that needs token counts runs on the entry in its temp dir: nothing is kept, in the cache or the
    run dir (the bad-input catalogue checks the same with the default cache dir)."""
    (tmp_path / "short.txt").write_text("hello there\nanother short line\n")
    cache = tmp_path / "cache"
    proc = prepare(["--preset", "gpt2_tiny", "--from_scratch", "--train_file", str(tmp_path / "short.txt"),
                    "--block_size", "200", "--cache_dir", str(cache)])
    assert proc.returncode == 2 and "shorter than one block of --block_size 200" in proc.stderr, explain(proc)
    assert not cache.exists()


def test_two_ranks_stop_together_when_the_preparer_finds_bad_input(tmp_path):
    """The preparer's one line reaches the waiting rank: both stop (no rank left waiting at the barrier), and
    nothing is kept in the cache or the run dir."""
    (tmp_path / "short.txt").write_text("hello there\nanother short line\n")
    cache, out = tmp_path / "cache", tmp_path / "run"
    proc = deepspeed_train(["--preset", "gpt2_tiny", "--from_scratch", "--train_file", str(tmp_path / "short.txt"),
                            "--block_size", "200", "--max_steps", "2", "--cache_dir", str(cache),
                            "--output_dir", str(out)], timeout=240)
    assert proc.returncode != 0, explain(proc)
    lines = [x for x in proc.stderr.splitlines() if "shorter than one block of --block_size 200" in x]
    assert lines, explain(proc)  # said by a rank (the launcher may stop the other before it says it too)
    assert not out.exists() and not entries(cache) and not list(cache.glob(".probe-*"))
