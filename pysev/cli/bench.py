"""``pysev bench kernels``: measure the csev kernels against this machine's limits.

Prints one table (figure, target, PASS/FAIL) or, with ``--json``, one JSON object (keys:
``pysev.benchmarking.RESULT_KEYS``). Exit status 0 when every target is met, 1 when one is not (the
figures below target are named on stderr), so a CI job can gate on it.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from pysev import benchmarking

# (key, label, unit, target text)
ROWS = [
    ("limit_mbps", "per-core limit (XTS+CTR+HMAC)", "MB/s", ""),
    ("send_mbps_1t", "send, 1 thread", "MB/s", ""),
    ("recv_mbps_1t", "receive, 1 thread", "MB/s", ""),
    ("ratio_send_1t", "send 1t / limit", "", "≥ 0.90"),
    ("ratio_recv_1t", "receive 1t / limit", "", "≥ 0.90"),
    ("send_mbps_nt", "send, all threads", "MB/s", ""),
    ("recv_mbps_nt", "receive, all threads", "MB/s", ""),
    ("scaling_send", "send all / 1 thread", "×", "≥ 1.8"),
    ("scaling_recv", "receive all / 1 thread", "×", "≥ 1.8"),
    ("python_baseline_mbps", "plain-Python send loop", "MB/s", ""),
    ("speedup_vs_python", "send 1t / plain Python", "×", "≥ 5"),
    ("extract_ms", "bitmap_extract, 16 Mi pages, 1 %", "ms", "≤ 2"),
    ("numpy_extract_ms", "numpy unpackbits+flatnonzero", "ms", ""),
    ("extract_speedup", "numpy / bitmap_extract", "×", "≥ 15"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure the native kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    kernels = sub.add_parser("kernels", help="send/receive pipelines, scaling, extraction")
    kernels.add_argument("--json", action="store_true", help="print one JSON object")
    kernels.add_argument(
        "--mib", type=int, default=64, metavar="N", help="MiB of guest pages per pipeline run (default 64)"
    )
    kernels.add_argument(
        "--seconds", type=int, default=2, metavar="S", help="seconds per `openssl speed` primitive (default 2)"
    )
    kernels.set_defaults(func=run_kernels)


def run_kernels(args: argparse.Namespace) -> int:
    console = Console()
    if args.json:
        result = benchmarking.measure_kernels(mib=args.mib, seconds=args.seconds)
        print(json.dumps(result, indent=2, sort_keys=True))
        return _exit_status(result)
    with console.status("measuring kernels (openssl speed, pipelines, Python baseline) …"):
        result = benchmarking.measure_kernels(mib=args.mib, seconds=args.seconds)
    verdicts = benchmarking.verdicts(result)
    table = Table(
        title=f"csev kernels — {result['backend']}, {result['openssl_version']}, "
        f"{result['threads']} threads, {result['mib']} MiB"
    )
    for column in ("figure", "value", "target", "verdict"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for key, label, unit, target in ROWS:
        value = result.get(key)
        if value is None:
            continue
        verdict = ""
        if key in verdicts:
            verdict = "[green]PASS[/]" if verdicts[key] else "[bold red]FAIL[/]"
        table.add_row(label, f"{value:,.2f} {unit}".rstrip(), target, verdict)
    console.print(table)
    console.print(f"limit from {result['limit_source']}")
    return _exit_status(result)


def _exit_status(result: dict) -> int:
    """1 (and one line on stderr naming them) when figures miss their targets, else 0."""
    failed = [name for name, ok in benchmarking.verdicts(result).items() if not ok]
    if not failed:
        return 0
    figures = ", ".join(
        f"{name} {result[name]:.3g} (target {'<=' if name == 'extract_ms' else '>='} {benchmarking.TARGETS[name]:g})"
        for name in failed
    )
    fallback = benchmarking.fallback_reason()
    why = f"; csev runs the plain-Python kernels: {fallback}" if fallback else ""
    print(f"pysev bench: below target: {figures}{why}", file=sys.stderr)
    return 1
