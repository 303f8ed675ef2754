"""Command-line units (sizes and rates with K/M/G/T suffixes, binary as QEMU's -m), the checks every option
value goes through, and the options ``pysev migrate`` and ``pysev vm`` share.

Each ``type=`` function here refuses a bad value with ``argparse.ArgumentTypeError``, which argparse
reports as ``argument OPTION: PROBLEM`` before the command starts. ``option_error`` words a problem found
past parsing (one option against another, or against the machine) the same way.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
PAGE_SIZE = 4096
U32_MAX = 0xFFFF_FFFF


def option_error(option: str, problem: str) -> argparse.ArgumentTypeError:
    """Bad input found past parsing, worded as argparse words its own (``pysev.cli.main`` prints it)."""
    return argparse.ArgumentTypeError(f"argument {option}: {problem}")


def parse_size(text: str) -> int:
    """``1G`` → 1073741824; ``100M``, ``512K``, ``4096``; fractions allowed (``1.5G``)."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("/S")
    unit = s[-1] if s and s[-1] in _SUFFIX else ""
    number = s[: len(s) - len(unit)] if unit else s
    try:
        value = float(number) * _SUFFIX[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 1G, 100M/s)") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 1G, 100M/s)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """``1073741824`` → ``1 GiB``; ``1.5 GiB``; sizes below 1 KiB in bytes."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def parse_memory(text: str) -> int:
    """A guest RAM size: a positive multiple of the 4 KiB page (K/M/G/T suffixes)."""
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a guest needs some memory (e.g. 64M, 1G)")
    if size % PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of the {PAGE_SIZE}-byte page")
    return size


def host_ram() -> int:
    """Bytes of physical RAM of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bounded_int(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """An integer ``type=`` in ``[low, high]``; ``what`` says where the upper bound comes from."""

    def check(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}{what}")
        return value

    return check


def non_negative(text: str) -> float:
    """A rate or a count per second: a finite number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def parse_policy(text: str) -> int:
    """An SEV guest policy: 32 bits, reserved bits 6-15 clear (AMD ``sev_guest.h``)."""
    from pysev.firmware.sev.abi import POLICY_RESERVED_MASK

    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0x11000020)") from None
    if not 0 <= value <= U32_MAX:
        raise argparse.ArgumentTypeError(f"{text} does not fit the 32-bit guest policy")
    if value & POLICY_RESERVED_MASK:
        raise argparse.ArgumentTypeError(
            f"{text} sets reserved bits {value & POLICY_RESERVED_MASK:#x} (bits 6-15 must be zero)"
        )
    return value


def writable_file(text: str) -> str:
    """A file this process can create or overwrite: checked before the work whose result it keeps."""
    if not text:
        raise argparse.ArgumentTypeError("empty file name")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text}: not writable")
    return text


def convert_rate_of(args: argparse.Namespace) -> float:
    """``--convert-rate`` as given, else the command's default for an SEV guest (0 without SEV: a plain
    guest has no private pages to convert)."""
    if args.convert_rate is not None:
        return args.convert_rate
    return 0.0 if args.no_sev else args.sev_convert_rate


def check_guest_arguments(args: argparse.Namespace) -> None:
    """The guest options against each other (``option_error``), before anything is booted."""
    if args.no_sev and args.convert_rate:
        raise option_error(
            "--convert-rate", "a guest without SEV has no private pages to convert (drop --no-sev or the rate)"
        )


def add_guest_arguments(
    p: argparse.ArgumentParser, *, dirty_rate: str = "0", convert_rate: float = 0.0, vga_fps: float = 0.0
) -> None:
    """The guest options ``pysev migrate`` and ``pysev vm`` share (workload, policy, SEV on/off); the
    keyword arguments are the workload a command's guest runs by default."""
    p.add_argument(
        "--dirty-rate",
        type=parse_size,
        default=dirty_rate,
        help=f"bytes/s the guest dirties (K/M/G; 0 = idle; default {dirty_rate})",
    )
    p.add_argument(
        "--workload",
        choices=("uniform", "hotset", "sequential"),
        default="uniform",
        help="which pages the guest dirties",
    )
    p.add_argument(
        "--convert-rate",
        type=non_negative,
        default=None,
        help=f"pages/s the guest flips private<->shared (DMA bounce buffers; SEV guests only; "
        f"default {convert_rate:g} with SEV, 0 with --no-sev)",
    )
    p.set_defaults(sev_convert_rate=convert_rate)
    p.add_argument(
        "--vga-fps", type=non_negative, default=vga_fps, help=f"framebuffer redraws per second (default {vga_fps:g})"
    )
    p.add_argument(
        "--policy",
        type=parse_policy,
        default=None,
        help="SEV guest policy (default 0x11000020: SEV bit, API >= 0.17, debugging allowed)",
    )
    p.add_argument("--no-sev", action="store_true", help="a plain guest without memory encryption")
    p.add_argument("--seed", type=bounded_int(0, (1 << 63) - 1), default=None, help="seed of the guest workload (>= 0)")
