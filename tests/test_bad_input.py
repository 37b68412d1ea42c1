"""Bad input to the entry point: one line naming the problem and the fix, exit 2, nothing written or overwritten."""
import hashlib
import json

import pytest

from tests.launch import python_train


def snapshot(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def bad_run(args, out):
    proc = python_train(args + ["--output_dir", str(out), "--no_progress"], timeout=180)
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("dsfleet", "python -m dsfleet.train"))]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(ours) == 1, proc.stderr[-2000:]
    return ours[0]


TINY = ["--preset", "t5_tiny", "--from_scratch", "--dataset_name", "embedded", "--max_steps", "2"]


@pytest.fixture
def no_columns(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"en": "hello", "ro": "salut"}) + "\n")
    return f


@pytest.fixture
def bad_batch_config(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
                             "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}))
    return f


CASES = {
    "unknown preset": (lambda p: ["--preset", "t5_giant", "--from_scratch"], "unknown preset 't5_giant'"),
    "unknown flag": (lambda p: TINY + ["--learning_rat", "1"], "unrecognized arguments: --learning_rat"),
    "no weights": (lambda p: ["--preset", "t5_tiny", "--dataset_name", "embedded"], "pass --model_name_or_path"),
    "missing column": (lambda p: ["--preset", "t5_tiny", "--from_scratch", "--train_file", str(p["no_columns"])],
                       "no 'translation' column"),
    "batch arithmetic": (lambda p: TINY + ["--deepspeed", str(p["bad_batch_config"]), "--per_device_train_batch_size", "4"],
                         "train_batch_size 10 != micro batch 4 x grad accumulation 1 x world size 1"),
    "unreadable ds_config": (lambda p: TINY + ["--deepspeed", str(p["tmp"] / "missing.json")], "not found"),
    "hub model unreachable": (lambda p: ["--model_name_or_path", "t5-small", "--dataset_name", "embedded"],
                              "cannot load model 't5-small'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_writes_nothing(case, tmp_path, no_columns, bad_batch_config):
    build, words = CASES[case]
    out = tmp_path / "run"
    line = bad_run(build({"no_columns": no_columns, "bad_batch_config": bad_batch_config, "tmp": tmp_path}), out)
    assert words in line, line
    assert " — " in line  # what is wrong — what to do
    assert not out.exists()


def test_existing_output_dir_is_not_clobbered(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_5").mkdir(parents=True)
    (out / "checkpoints" / "step_5" / "weights.pt").write_bytes(b"precious")
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    before = snapshot(out)
    line = bad_run(TINY, out)
    assert "exists and is not empty" in line and "--overwrite_output_dir" in line
    assert snapshot(out) == before
