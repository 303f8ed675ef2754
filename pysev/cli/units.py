"""Command-line units (sizes and rates with K/M/G/T suffixes, binary as QEMU's -m) and shared options."""

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


def convert_rate_of(args: argparse.Namespace) -> float:
    """``--convert-rate`` as given, else the command's default for an SEV guest (0 without SEV: a plain
    guest has no private pages to convert)."""
    if args.convert_rate is not None:
        return args.convert_rate
    return 0.0 if args.no_sev else args.sev_convert_rate


def add_guest_arguments(
    p: argparse.ArgumentParser, *, dirty_rate: str = "0", convert_rate: float = 0.0, vga_fps: float = 0.0
) -> None:
    """The guest options ``pysev migrate`` and ``pysev vm`` share (workload, policy, SEV on/off); the
    keyword arguments are the workload a command's guest runs by default."""
    p.add_argument(
        "--dirty-rate", default=dirty_rate, help=f"bytes/s the guest dirties (K/M/G; 0 = idle; default {dirty_rate})"
    )
    p.add_argument(
        "--workload",
        choices=("uniform", "hotset", "sequential"),
        default="uniform",
        help="which pages the guest dirties",
    )
    p.add_argument(
        "--convert-rate",
        type=float,
        default=None,
        help=f"pages/s the guest flips private<->shared (DMA bounce buffers; SEV guests only; "
        f"default {convert_rate:g} with SEV, 0 with --no-sev)",
    )
    p.set_defaults(sev_convert_rate=convert_rate)
    p.add_argument(
        "--vga-fps", type=float, default=vga_fps, help=f"framebuffer redraws per second (default {vga_fps:g})"
    )
    p.add_argument(
        "--policy",
        type=lambda s: int(s, 0),
        default=None,
        help="SEV guest policy (default 0x11000020: SEV bit, API >= 0.17, debugging allowed)",
    )
    p.add_argument("--no-sev", action="store_true", help="a plain guest without memory encryption")
    p.add_argument("--seed", type=int, default=None, help="seed of the guest workload")
