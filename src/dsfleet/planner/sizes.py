"""Byte sizes in and out of the planner: '80GiB' / '24GB' / '512G' read, GiB with one decimal printed.

Why this exists: `dsfleet plan` takes memory per GPU and per node as text, and every table, reason and warning
prints bytes the same way; the defaults are the hardware `dsfleet plan` assumes when it is not told.
"""
from __future__ import annotations

import re

from dsfleet.cli import fail

GiB = 2**30
DEFAULT_GPU_MEM = 80 * GiB
DEFAULT_CPU_MEM = 512 * GiB

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'80GiB', '24GB', '512G', '1.5TiB', 8e10 -> bytes. GB/TB are decimal; GiB and bare G/T are binary."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        fail(f"cannot read size {text!r} — write it like 80GiB, 24GB or 512G")
    number, unit, binary, byte = m.groups()
    power = "kmgtp".find(unit.lower()) + 1 if unit else 0
    base = 1000 if (byte and not binary) else 1024
    return int(float(number) * base**power)


def format_gib(n: float) -> str:
    """Bytes as GiB with one decimal, as every planner table and line prints them."""
    return f"{n / GiB:.1f}"
