"""dsfleet.hostfile: accepts what the deepspeed launcher and OpenMPI accept, and rejects the rest early with the
file name, the line number and what to do (exit 2 through the CLI). Cross-checked against DeepSpeed's own reader so
a file dsfleet passes is one the launcher takes, with the same hosts and slots in the same order."""
import subprocess
import sys
from pathlib import Path

import pytest

from dsfleet.cli import UsageError
from dsfleet.hostfile import format_hostfile, over_capacity, parse_hostfile, read_hostfile

GOOD = """\
# a comment line, then a blank one

worker-0 slots=8
worker-1    slots=8   # trailing comment
10.0.0.7 slots=4
ubuntu@gpu_box.example.com slots=2
"""


def test_good_file_entries_and_line_numbers():
    entries = parse_hostfile(GOOD, "hf")
    assert [(e.host, e.slots, e.line) for e in entries] == [
        ("worker-0", 8, 3), ("worker-1", 8, 4), ("10.0.0.7", 4, 5), ("ubuntu@gpu_box.example.com", 2, 6)]
    assert entries[3].address == "gpu_box.example.com"
    assert parse_hostfile(format_hostfile(entries)) == [e.__class__(e.host, e.slots, i) for i, e in
                                                         enumerate(entries, 1)]


def test_same_reading_as_deepspeeds_launcher():
    from deepspeed.launcher.runner import _parse_hostfile
    pool = _parse_hostfile(GOOD.splitlines(True))
    assert list(pool.items()) == [(e.host, e.slots) for e in parse_hostfile(GOOD)]


@pytest.mark.parametrize("text, line, words", [
    ("node1 slots=2\nnode1 slots=2\n", 2, ["listed twice", "line 1"]),
    ("node1 slots=2\nNODE1 slots=4\n", 2, ["listed twice"]),
    ("node1 slots=0\n", 1, ["slots=0", "at least 1"]),
    ("node1 slots=-2\n", 1, ["at least 1"]),
    ("\n\nnode1 slots=two\n", 3, ["not a whole number"]),
    ("node1 slots=2.5\n", 1, ["not a whole number"]),
    ("node1 slots=\n", 1, ["spaces around"]),
    ("node1 slots = 2\n", 1, ["spaces around"]),
    ("node1\n", 1, ["has no slots", "node1 slots=N"]),
    ("node1 gpus=2\n", 1, ["not `HOST slots=N`"]),
    ("node1 slots=2 max_slots=4\n", 1, ["not `HOST slots=N`"]),
    ("slots=2\n", 1, ["does not start with a host"]),
    ("node;rm slots=2\n", 1, ["not a host name"]),
    ("node1 slots=99999\n", 1, ["more than any host"]),
])
def test_bad_lines_name_file_and_line(text, line, words):
    with pytest.raises(UsageError) as e:
        parse_hostfile(text, "hostfiles/x")
    msg = str(e.value)
    assert msg.startswith(f"hostfiles/x:{line}: "), msg
    assert "\n" not in msg and " — " in msg  # one line: what is wrong — what to do
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("text", ["", "# only comments\n\n"])
def test_no_hosts(text):
    with pytest.raises(UsageError, match="no hosts"):
        parse_hostfile(text, "hf")


def test_deepspeed_rejects_what_we_reject():
    """Not stricter for nothing: DeepSpeed's launcher also refuses these (late, with a traceback)."""
    from deepspeed.launcher.runner import _parse_hostfile
    for text in ("node1 slots=2\nnode1 slots=2\n", "node1\n", "node1 slots=two\n", "node1 slots = 2\n", ""):
        with pytest.raises(ValueError):
            _parse_hostfile(text.splitlines(True))
        with pytest.raises(UsageError):
            parse_hostfile(text)


def test_slots_over_known_gpus():
    text = "a slots=8\nb slots=4\nuser@c slots=4\n"
    assert [e.host for e in parse_hostfile(text, gpus={"a": 8, "b": 8})] == ["a", "b", "user@c"]  # c unknown: ok
    with pytest.raises(UsageError, match=r"^hf:2: b has slots=4 but only 2 GPU\(s\) — set slots=2 or fewer"):
        parse_hostfile(text, "hf", gpus={"a": 8, "b": 2})
    with pytest.raises(UsageError, match=r"hf:1: a has slots=8 but only 4"):
        parse_hostfile(text, "hf", gpus=4)
    entries = parse_hostfile(text)
    assert [(e.host, n) for e, n in over_capacity(entries, {"c": 2})] == [("user@c", 2)]  # by address too


def test_read_hostfile_missing_and_binary(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_hostfile(tmp_path / "nope")
    bad = tmp_path / "bin"
    bad.write_bytes(b"\xff\xfe\x00node")
    with pytest.raises(UsageError, match="cannot read hostfile"):
        read_hostfile(bad)
    good = tmp_path / "hf"
    good.write_text("n1 slots=1\n")
    assert read_hostfile(good)[0].host == "n1"


def test_cli_bad_hostfile_is_one_line_exit_2(tmp_path):
    hf = tmp_path / "hf"
    hf.write_text("node1 slots=1\nnode1 slots=1\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "dsfleet"), "preflight", "--hostfile", str(hf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{hf}:2: host node1 is listed twice" in lines[0], proc.stderr
