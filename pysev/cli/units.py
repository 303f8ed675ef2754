"""Command-line units: sizes and rates with K/M/G/T suffixes (binary, as QEMU's -m and migrate_set_*)."""
from __future__ import annotations

import argparse

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``1G`` → 1073741824; ``100M``, ``512K``, ``4096``; fractions allowed (``1.5G``)."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("/S")
    unit = s[-1] if s and s[-1] in _SUFFIX else ""
    number = s[: len(s) - len(unit)] if unit else s
    try:
        value = float(number) * _SUFFIX[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 1G, 100M/s)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return int(value)
