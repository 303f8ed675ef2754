"""``pysev vm``: one simulated host running one SEV guest, driven over QMP like a QEMU process.

Prints one JSON line to stdout once listening: ``{"qmp": ADDRESS, "incoming": URI|"defer"|null, "pid": N}``
(the real ports when port 0 was asked for); logs go to stderr. SIGTERM, SIGINT and ``quit`` shut it down
cleanly (SHUTDOWN event, guest destroyed, exit status 0). ``--object`` creates objects as QEMU's
``-object`` does (TLS credentials and authz for TLS migration, named by the migration parameters
``tls-creds`` and ``tls-authz``); a bad one ends with one line that names it and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from pysev.cli.units import add_guest_arguments, convert_rate_of, parse_memory, parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vm",
        help="run one SEV guest with a QMP monitor (source or migration destination)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--memory", required=True, type=parse_memory, help="guest RAM size (K/M/G suffix), e.g. 128M")
    p.add_argument(
        "--qmp",
        required=True,
        metavar="PATH|tcp:HOST:PORT",
        help="QMP monitor address: a UNIX socket path or tcp:HOST:PORT (port 0 = any)",
    )
    p.add_argument(
        "--incoming",
        metavar="tcp:HOST:PORT|defer",
        help="wait for an incoming migration (listen now, or after migrate-incoming with 'defer')",
    )
    p.add_argument(
        "--object",
        action="append",
        default=[],
        metavar="TYPE,id=ID,...",
        help="create an object as QEMU's -object does: tls-creds-x509,id=ID,dir=DIR,endpoint=client|server"
        "[,verify-peer=on|off] or authz-simple,id=ID,identity=DN (repeatable; named by the migration "
        "parameters tls-creds and tls-authz)",
    )
    add_guest_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pysev.hv.machine import DEFAULT_POLICY
    from pysev.qmp.commands import QmpError
    from pysev.qmp.objects import UserObjects, parse_object_option
    from pysev.qmp.vmm import Vmm

    incoming = args.incoming
    if incoming is not None and incoming != "defer" and not incoming.startswith("tcp:"):
        print(f"pysev vm: --incoming takes tcp:HOST:PORT or defer, not {incoming!r}", file=sys.stderr)
        return 2
    objects = UserObjects()
    for option in args.object:
        try:
            objects.add(parse_object_option(option))
        except ValueError as err:
            print(f"pysev vm: --object {option}: {err}", file=sys.stderr)
            return 2
        except QmpError as err:
            print(f"pysev vm: --object {option}: {err.desc}", file=sys.stderr)
            return 2
    qmp_dir = os.path.dirname(args.qmp) if not args.qmp.startswith("tcp:") else ""
    if qmp_dir and not os.path.isdir(qmp_dir):
        print(f"pysev vm: argument --qmp: {args.qmp}: directory {qmp_dir} does not exist", file=sys.stderr)
        return 2
    try:
        vmm = Vmm(
            args.memory,
            sev=not args.no_sev,
            policy=DEFAULT_POLICY if args.policy is None else args.policy,
            incoming=incoming,
            dirty_rate=parse_size(args.dirty_rate),
            workload=args.workload,
            convert_rate=convert_rate_of(args),
            vga_fps=args.vga_fps,
            seed=args.seed,
            objects=objects,
        )
    except (ValueError, TypeError) as err:
        print(f"pysev vm: {err}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:  # the host could not be built (memory)
        print(f"pysev vm: {err}", file=sys.stderr)
        return 1
    try:
        addresses = vmm.start(args.qmp)
    except QmpError as err:  # the incoming listener (the only QMP error start raises): names the address
        print(f"pysev vm: argument --incoming: {err.desc}", file=sys.stderr)
        vmm.shutdown()
        return 2
    except OSError as err:
        print(f"pysev vm: argument --qmp: cannot listen on {args.qmp}: {err.strerror or err}", file=sys.stderr)
        vmm.shutdown()
        return 2
    # QEMU's termsig handler: SIGTERM/SIGINT/SIGHUP request a shutdown with reason "host-signal".
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: vmm.request_shutdown("host-signal"))
    print(json.dumps({**addresses, "pid": os.getpid()}), flush=True)
    vmm.wait()
    return 0
