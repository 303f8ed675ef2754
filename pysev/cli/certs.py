"""``pysev certs``: verify an SEV certificate chain, or decode one certificate (``pysev.firmware.certs``).

``verify DIR`` exits 0 when the whole chain verifies and its ARK is a trusted root, 1 when a link fails or the
root is not trusted, 2 when input is missing or malformed. It trusts AMD's published ARKs (shipped with pysev),
this machine's simulated root (``$PYSEV_HOME``) and every ``--trust-root FILE``, as ``sevctl verify`` trusts its
built-in roots and ``--ca``; the decision is the library's (``TrustStore``), this module only presents it.
``show FILE`` decodes either format, chosen by size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pysev.firmware.certs import (
    AmdCert,
    CertError,
    ChainReport,
    SevCert,
    TrustStore,
    load_amd_cert,
    load_sev_cert,
    read_cert_file,
    verify_chain,
)

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
CHAIN_FILES = ("ark.cert", "ask.cert", "cek.cert", "oca.cert", "pek.cert", "pdh.cert")
UNTRUSTED_HINT = "name it with --trust-root FILE to trust it"
VERIFY_DESCRIPTION = (
    "Verify every link of the chain in DIR, and that its ARK is a trusted root: AMD's published ARK of Naples, "
    "Rome, Milan, Genoa or Turin (shipped with pysev), this machine's simulated root ($PYSEV_HOME/roots/default), "
    "or one named with --trust-root. Exit status 0: valid under a trusted root; 1: a link fails, or the chain is "
    "self-consistent but its root is not trusted; 2: bad input."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs", help="verify or decode SEV/AMD certificates", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    verify = sub.add_parser(
        "verify",
        help="verify ARK→ASK→CEK, OCA→PEK←CEK, PEK→PDH in a directory, and that the ARK is a trusted root",
        description=VERIFY_DESCRIPTION,
    )
    verify.add_argument("directory", type=Path, metavar="DIR", help="holds " + " ".join(CHAIN_FILES))
    verify.add_argument(
        "--trust-root",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="also trust the ARK in FILE (an ARK, or an ASK‖ARK chain as AMD publishes it); repeatable",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(func=run_verify)
    show = sub.add_parser("show", help="decode one certificate (SEV 2084 B, AMD ARK/ASK, or ASK‖ARK)")
    show.add_argument("file", type=Path, metavar="FILE")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=run_show)


def _error(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return EXIT_BAD_INPUT


def run_verify(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if not directory.is_dir():
        return _error(args, f"{directory} is not a directory")
    missing = [name for name in CHAIN_FILES if not (directory / name).is_file()]
    if missing:
        return _error(args, f"{directory} lacks {', '.join(missing)}")
    amd: list[AmdCert] = []  # ARK, ASK
    sev: list[SevCert] = []  # CEK, OCA, PEK, PDH
    for name in CHAIN_FILES:
        path = directory / name
        try:
            if name in ("ark.cert", "ask.cert"):
                amd.append(load_amd_cert(path, allow_unsigned=name == "ark.cert"))
            else:
                sev.append(load_sev_cert(path))
        except (CertError, OSError) as exc:
            return _error(args, f"cannot read {path}: {exc}")
    (ark, ask), (cek, oca, pek, pdh) = amd, sev
    try:
        trust = TrustStore.builtin().with_simulated()
    except (CertError, OSError) as exc:
        return _error(args, f"cannot load the trusted roots: {exc}")
    for path in args.trust_root:
        if not path.is_file():
            return _error(args, f"--trust-root {path}: " + ("not a file" if path.exists() else "no such file"))
        try:
            trust = trust.with_file(path)
        except (CertError, OSError) as exc:
            return _error(args, f"cannot use --trust-root {path}: {exc}")
    report = verify_chain(ark, ask, cek, oca, pek, pdh, trust=trust)
    message = report.message
    if report.self_consistent and report.trusted is False:
        message = f"{message}; {UNTRUSTED_HINT}"
    if args.json:
        print(json.dumps({**report.to_dict(), "message": message}))
    else:
        _print_report(report, directory, message)
    return EXIT_OK if report.ok else EXIT_FAIL


def _print_report(report: ChainReport, directory: Path, message: str) -> None:
    console = Console()
    table = Table(title=f"SEV certificate chain in {directory}")
    table.add_column("Link")
    table.add_column("Result")
    table.add_column("Status")
    table.add_column("Detail", overflow="fold")
    for link in report.links:
        result = "[green]OK[/]" if link.ok else "[bold red]FAIL[/]"
        table.add_row(link.link, result, link.status.name, escape(link.message))
    console.print(table)
    colour = "[green]" if report.ok else "[bold red]"
    console.print(colour + escape(message) + "[/]", highlight=False, soft_wrap=True)  # one line, for grep


def run_show(args: argparse.Namespace) -> int:
    try:
        decoded = read_cert_file(args.file)
    except (CertError, OSError) as exc:
        return _error(args, f"cannot decode {args.file}: {exc}")
    if isinstance(decoded, tuple):
        ask, ark = decoded
        info = {"format": "amd-chain", "ask": ask.describe(), "ark": ark.describe()}
    else:
        info = decoded.describe()
    info["file"] = str(args.file)
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    console = Console()
    if isinstance(decoded, tuple):
        console.print(_amd_table(decoded[0], f"{args.file}: ASK (chain part 1)"))
        console.print(_amd_table(decoded[1], f"{args.file}: ARK (chain part 2)"))
    elif isinstance(decoded, AmdCert):
        console.print(_amd_table(decoded, str(args.file)))
    else:
        console.print(_sev_table(decoded, str(args.file)))
    return EXIT_OK


def _fields_table(title: str) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("Field")
    table.add_column("Value", overflow="fold")
    return table


def _named(value) -> str:
    return f"{value.name} ({int(value):#x})"


def _sev_table(cert: SevCert, title: str) -> Table:
    table = _fields_table(f"SEV certificate {title}")
    table.add_row("VERSION", str(cert.version))
    table.add_row("API", f"{cert.api_major}.{cert.api_minor}")
    table.add_row("PUBKEY_USAGE", _named(cert.pubkey_usage))
    table.add_row("PUBKEY_ALGO", _named(cert.pubkey_algo))
    table.add_row("PUBKEY", cert.pubkey.summary())
    info = cert.describe()["pubkey"]
    if info["type"] == "ecc":
        table.add_row("QX", info["qx"])
        table.add_row("QY", info["qy"])
    else:
        table.add_row("MODULUS", info["modulus"])
    described = cert.describe()
    for name, slot in (("SIG1", cert.sig1), ("SIG2", cert.sig2)):
        if slot.is_empty:
            table.add_row(name, "empty")
            continue
        flag = " [red](malformed)[/]" if slot.is_malformed else ""
        d = described[name.lower()]
        value = f"r={d['r']}\ns={d['s']}" if "r" in d else d.get("sig", "")
        table.add_row(name, f"{_named(slot.usage)} / {_named(slot.algo)}{flag}\n{value}")
    return table


def _amd_table(cert: AmdCert, title: str) -> Table:
    info = cert.describe()
    table = _fields_table(f"AMD certificate {title}")
    table.add_row("VERSION", str(cert.version))
    table.add_row("KEY_ID", info["key_id"])
    table.add_row("CERTIFYING_ID", info["certifying_id"] + (" (self)" if info["self_signed_id"] else ""))
    table.add_row("KEY_USAGE", _named(cert.key_usage))
    table.add_row("PUBEXP", f"{cert.pubexp} ({cert.pubexp_bits}-bit field)")
    table.add_row("MODULUS", f"{cert.modulus_bits} bits: {info['modulus']}")
    table.add_row("SIGNATURE", info["signature"] or "[yellow]absent (AMD-published Naples ARK form)[/]")
    table.add_row("SHA-384(fixed‖pubexp‖modulus)", info["key_hash_sha384"])
    return table


def main(argv: list[str] | None = None) -> int:
    """Run ``certs`` alone (used when the full ``pysev`` dispatcher is not importable)."""
    parser = argparse.ArgumentParser(prog="pysev")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
