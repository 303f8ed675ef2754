"""The benchmarks' regression gate: compare the same-run ratios of two saved runs.

    pytest benchmarks -m "not migration_large" --benchmark-enable --benchmark-json=base.json
    ...change the code...
    pytest benchmarks -m "not migration_large" --benchmark-enable --benchmark-json=new.json
    python benchmarks/compare.py base.json new.json [--tolerance 0.10]

Each benchmark names, in ``extra_info["gate"]``, the figures worth gating on and which way is better
(``{"ratio_to_limit": "higher"}``): ratios to a limit measured in the same run (the openssl-speed
pipeline limit, the numpy twin, the send kernel beside a migration). Timings themselves are not compared:
on a shared machine a ~300 ns kernel call moves by more than 10 % between two runs of the same code,
its ratio to a limit measured beside it far less.

Exit status 0 when no gated figure got worse by more than the tolerance, 1 when one did (each listed),
2 when a file is not a pytest-benchmark JSON file. Benchmarks present in only one run are listed, not
failed (a ``-m``/``-k`` selection may differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def gated(path: str) -> dict[str, dict[str, tuple[float, str]]]:
    """benchmark fullname -> {figure: (value, "higher"|"lower")} of one saved run."""
    with open(path) as f:
        data = json.load(f)
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list):
        raise ValueError(f"{path}: no 'benchmarks' list (save runs with --benchmark-json or --benchmark-autosave)")
    out: dict[str, dict[str, tuple[float, str]]] = {}
    for bench in benchmarks:
        extra: dict[str, Any] = bench.get("extra_info") or {}
        figures = {}
        for name, better in (extra.get("gate") or {}).items():
            if better not in ("higher", "lower") or not isinstance(extra.get(name), (int, float)):
                raise ValueError(f"{path}: {bench['fullname']}: gate {name!r}: {better!r} of {extra.get(name)!r}")
            figures[name] = (float(extra[name]), better)
        out[bench["fullname"]] = figures
    return out


def compare(base: str, new: str, tolerance: float) -> list[str]:
    """One line per gated figure of ``new`` worse than in ``base`` by more than ``tolerance`` (a fraction)."""
    before, after = gated(base), gated(new)
    regressions = []
    for name in sorted(before.keys() | after.keys()):
        if name not in after or name not in before:
            print(f"only in {base if name in before else new}: {name}")
            continue
        for figure, (old, better) in before[name].items():
            if figure not in after[name]:
                print(f"{name}: {figure} no longer gated")
                continue
            value = after[name][figure][0]
            change = (value - old) / old if old else 0.0
            worse = -change if better == "higher" else change
            line = f"{name}: {figure} {old:.4g} -> {value:.4g} ({change:+.1%}, {better} is better)"
            print(("REGRESSION " if worse > tolerance else "ok ") + line)
            if worse > tolerance:
                regressions.append(line)
    return regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the baseline run (pytest-benchmark JSON)")
    parser.add_argument("new", help="the run to check")
    parser.add_argument("--tolerance", type=float, default=0.10, help="worst change allowed (default 0.10)")
    args = parser.parse_args(argv)
    try:
        regressions = compare(args.base, args.new, args.tolerance)
    except (OSError, ValueError, KeyError) as err:
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2
    if regressions:
        print(f"{len(regressions)} gated figure(s) worse by more than {args.tolerance:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
