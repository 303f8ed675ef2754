"""``pysev stream dump FILE``: what a saved migration stream holds — sections, RAM chunks (one per pass in
pysev's streams), the SEND_START context, device sections (decoded through the vmdesc trailer), the
vmdesc itself and the record digest, as tables or, with ``--json``, one JSON object.

Reads the streams ``pysev migrate --save-stream FILE`` and ``--transport file:FILE`` write (with the
page-channel copies ``FILE.ch1``… found beside them), and streams saved by QEMU. Exit status 0; 1 when
the file stores a record digest (a file migration does) that its records no longer match; 2, with one
line naming the offset, when the file is truncated or is not a migration stream.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from pysev.cli.units import format_size


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "stream",
        help="inspect a saved migration stream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_subparsers(dest="stream_command", required=True, metavar="WHAT")
    dump = what.add_parser("dump", help="sections, records with offsets, context, vmdesc, record digest")
    dump.add_argument("file", metavar="FILE", help="a stream saved by pysev migrate or by QEMU")
    dump.add_argument("--json", action="store_true", help="print one JSON object")
    dump.add_argument("--records", action="store_true", help="list every record with its byte offsets too")
    dump.add_argument(
        "--no-channels",
        action="store_true",
        help="ignore the page-channel copies FILE.ch1… beside FILE (the digest then covers FILE alone)",
    )
    dump.set_defaults(func=run_dump)


def run_dump(args: argparse.Namespace) -> int:
    from pysev.migration.stream import StreamError
    from pysev.migration.stream.dump import summarize

    try:
        summary = summarize(args.file, [] if args.no_channels else None, records=args.records)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"argument FILE: {err.strerror or err}: {args.file}") from None
    except StreamError as err:
        raise argparse.ArgumentTypeError(f"{args.file}: not a readable migration stream: {err}") from None
    summary["context"] = _with_policy(summary["context"])
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        _show(summary)
    return 1 if summary["digest"]["matches"] is False else 0


def _with_policy(context: dict[str, Any] | None) -> dict[str, Any] | None:
    """The SEND_START context with its policy spelled out (the firmware's Policy bits, API version)."""
    if context is None:
        return None
    from pysev.firmware.sev.abi import Policy, policy_api

    policy = context["policy"]
    flags = [p.name for p in Policy if policy & p and p.name]
    major, minor = policy_api(policy)
    return {**context, "policy-flags": flags, "policy-api": f"{major}.{minor}"}


def _short(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"bytes", "sha256"}:
        return f"{value['bytes']} B, sha256 {value['sha256'][:16]}…"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value[:8]) + (", …" if len(value) > 8 else "") + "]"
    if isinstance(value, str) and len(value) > 40:
        return value[:32] + "…"
    return str(value)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        left = i == 0 or column in ("idstr", "section", "kind", "fields")
        table.add_column(column, justify="left" if left else "right", overflow="fold")  # never cut a number
    return table


def _show(s: dict[str, Any]) -> None:
    # No markup: idstrs, machine and file names come from the file (a "[/x]" there would be markup).
    console = Console(markup=False, highlight=False)

    def say(text: str, style: str | None = None) -> None:  # prose is not wrapped: one fact per line, for grep
        console.print(text, style=style, soft_wrap=True)

    sev = "SEV" if s["sev"] else "no encrypted records"
    machine = f", machine {s['configuration']}" if s["configuration"] else ""
    say(f"{s['file']}: QEMU migration stream v{s['version']}, {s['size']:,} bytes{machine}, {sev}", "bold")
    if s["channels"]:
        say(f"page channels: {', '.join(s['channels'])}")

    blocks = _table("RAM blocks (MEM_SIZE)", "idstr", "size", "bytes")
    for b in s["blocks"]:
        blocks.add_row(b["idstr"], format_size(b["size"]), f"{b['size']:,}")
    console.print(blocks)

    sections = _table("sections", "id", "idstr", "instance", "version", "kind", "offset")
    for sec in s["sections"]:
        sections.add_row(*(str(sec[k]) for k in ("id", "idstr", "instance", "version", "kind", "offset")))
    console.print(sections)

    columns = ["pass", "section", "offset", "bytes", "pages", "zero", "encrypted", "bitmap"]
    if s["channels"]:
        columns.append("on channels")
    passes = _table("RAM chunks (in pysev's streams one per pass; 0 announces the blocks)", *columns)
    for p in s["passes"]:
        row = [str(p["pass"]), p["section"], str(p["offset"]), format_size(p["bytes"])]
        counts = [p["page"], p["zero"], p["encrypted-page"], p["encryption-bitmap"]]
        if s["channels"]:
            counts.append(p["channel-encrypted-pages"])
        passes.add_row(*row, *(f"{v:,}" for v in counts))
    console.print(passes)
    t = s["totals"]
    say(
        f"records: {t['page']:,} page(s), {t['zero']:,} zero page(s), {t['encrypted-page']:,} encrypted page(s), "
        f"{t['encryption-bitmap']} encryption bitmap(s), {t['device']} device section(s); "
        f"{s['pages']['sent']:,} of {s['pages']['guest']:,} guest pages sent at least once"
    )

    ctx = s["context"]
    if ctx is not None:
        flags = "|".join(ctx["policy-flags"]) or "no flags"
        say(
            f"SEND_START context at offset {ctx['offset']:,}: policy {ctx['policy']:#010x} ({flags}, "
            f"API >= {ctx['policy-api']}), PDH {_short(ctx['pdh'])}, session {_short(ctx['session'])}"
        )

    if s["devices"]:
        devices = _table("device sections", "offset", "idstr", "instance", "version", "decoded by", "fields")
        for d in s["devices"]:
            fields = "\n".join(f"{k}={_short(v)}" for k, v in d["fields"].items())
            devices.add_row(
                f"{d['offset']:,}", d["idstr"], str(d["instance"]), str(d["version"]), d["decoded-by"], fields
            )
        console.print(devices)

    v = s["vmdesc"]
    if v is None:
        say("vmdesc trailer: none")
    else:
        say(
            f"vmdesc trailer at offset {v['offset']:,}: {v['length']:,} bytes, page size {v['page-size']}, "
            f"devices: {', '.join(v['devices']) or 'none'}"
        )

    d = s["digest"]
    say(f"record digest ({d['covers']}): {d['record-sha256']}")
    if d["matches"] is True:
        say("  matches the digest stored in the file", "green")
    elif d["matches"] is False:
        say(f"  DIFFERS from the digest stored in the file, {d['stored']}", "bold red")
    for note in d["notes"]:
        say(f"  note: {note}")

    if "records" in s:
        _show_records(s["records"])


def _show_records(records: list[dict[str, Any]]) -> None:
    """Every record, one plain line each (a stream can hold millions: no table layout)."""
    out = sys.stdout
    out.write(f"{'offset':>12} {'end':>12}  {'kind':<17} {'chunk':>5}  {'block':<14} {'address':>12}  detail\n")
    skip = {"offset", "end", "kind", "chunk", "block", "address"}
    for r in records:
        detail = ", ".join(f"{k}={_short(v)}" for k, v in r.items() if k not in skip)
        address = f"{r['address']:#x}" if "address" in r else ""
        chunk = str(r.get("chunk", ""))
        out.write(
            f"{r['offset']:>12} {r['end']:>12}  {r['kind']:<17} {chunk:>5}  {r.get('block', ''):<14} {address:>12}"
            f"  {detail}\n"
        )
