"""DeepSpeed hostfile parser and validator: the one reading of `HOST slots=N` files in dsfleet.

Why it exists: the deepspeed launcher (pdsh, openmpi runners), `mpirun --hostfile`, `dsfleet render --hostfile`
and `dsfleet preflight` all take the same file, and DeepSpeed's own reader fails late and vaguely (a duplicate
host or `slots=0` surfaces as a launcher traceback, a host without `slots=` as "bad entry" with no line number).
This module accepts what both DeepSpeed and OpenMPI accept and rejects, with the file name and line number:
unknown syntax, duplicate hosts, slot counts that are not positive whole numbers, and (when the GPU count of a
host is known, e.g. from preflight's nvidia-smi) more slots than the host has GPUs.

Format, one host per line: `HOST slots=N`, `#` starts a comment (whole line or after the entry), blank lines are
ignored. HOST is a host name, an ssh alias, an IPv4 address or `user@host` (pdsh and OpenMPI take all four).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from dsfleet.cli import fail

MAX_SLOTS = 1024  # more ranks on one host than any machine has GPUs or cores: a typo
_HOST = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_.-]*@)?[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


@dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int
    line: int  # 1-based line number in the file

    @property
    def address(self) -> str:
        """The host without a `user@` prefix."""
        return self.host.rpartition("@")[2]


def parse_hostfile(text: str, source: str = "hostfile",
                   gpus: int | Mapping[str, int] | None = None) -> list[HostEntry]:
    """Entries of a hostfile's text, in file order. Bad input -> UsageError naming `source:LINE` (exit 2).

    `gpus`: GPUs per host when known (one count for every host, or a mapping host -> count); slots above it fail.
    """
    entries: list[HostEntry] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        words = line.split()
        host = words[0]
        if "=" in host:
            fail(f"{where}: {line!r} does not start with a host name — write `HOST slots=N`")
        if not _HOST.fullmatch(host):
            fail(f"{where}: {host!r} is not a host name — use letters, digits, '.', '-', '_' (or user@host)")
        if len(words) == 1:
            fail(f"{where}: host {host} has no slots — write `{host} slots=N` (N = GPUs it runs ranks on)")
        if re.fullmatch(r"slots\s*=?", words[1]) or (len(words) > 2 and words[2].startswith("=")):
            fail(f"{where}: {line!r} has spaces around '=' — write `{host} slots=N` (DeepSpeed rejects the spaces)")
        if len(words) > 2 or not words[1].startswith("slots="):
            fail(f"{where}: {line!r} is not `HOST slots=N` — one host and its slot count per line "
                 "(comments after '#')")
        value = words[1][len("slots="):]
        if not re.fullmatch(r"[+-]?\d+", value):
            fail(f"{where}: slots={value!r} for {host} is not a whole number — write e.g. `{host} slots=8`")
        slots = int(value)
        if slots < 1:
            fail(f"{where}: slots={slots} for {host} — a host needs at least 1 slot; remove the line to leave it out")
        if slots > MAX_SLOTS:
            fail(f"{where}: slots={slots} for {host} is more than any host has (max {MAX_SLOTS}) — "
                 "N is the number of GPUs (ranks) on that host")
        key = host.lower()  # host names are case-insensitive: Node1 and node1 are the same machine
        if key in seen:
            fail(f"{where}: host {host} is listed twice (first on line {seen[key]}) — list each host once with "
                 "all its slots")
        seen[key] = number
        entries.append(HostEntry(host, slots, number))
    if not entries:
        fail(f"{source}: no hosts — add one `HOST slots=N` line per machine")
    if gpus is not None:
        for entry, count in over_capacity(entries, gpus):
            fail(f"{source}:{entry.line}: {entry.host} has slots={entry.slots} but only {count} GPU(s) — "
                 f"set slots={count} or fewer")
    return entries


def over_capacity(entries: list[HostEntry], counts: int | Mapping[str, int]) -> list[tuple[HostEntry, int]]:
    """(entry, count) for each entry with more slots than its host's count (GPUs or cores); unknown hosts pass."""
    out = []
    for e in entries:
        count = counts if isinstance(counts, int) else counts.get(e.host, counts.get(e.address))
        if count is not None and e.slots > count:
            out.append((e, count))
    return out


def read_hostfile(path: str | Path, gpus: int | Mapping[str, int] | None = None) -> list[HostEntry]:
    """`parse_hostfile` of a file; a missing or unreadable file is bad input too (exit 2)."""
    p = Path(path)
    if not p.is_file():
        fail(f"hostfile {path} not found — pass a DeepSpeed hostfile (`HOST slots=N` lines), e.g. one from "
             "`dsfleet render --target hostfile`")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read hostfile {path} ({e.__class__.__name__}: {e}) — pass a readable text file")
    return parse_hostfile(text, str(path), gpus)


def format_hostfile(entries: list[HostEntry]) -> str:
    """The entries as hostfile lines (what DeepSpeed and OpenMPI read)."""
    return "".join(f"{e.host} slots={e.slots}\n" for e in entries)
