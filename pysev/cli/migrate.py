"""``pysev migrate``: the main job — a live migration of a running SEV guest between two simulated hosts,
with a progress bar per pass and a summary (or one JSON object with QEMU's query-migrate fields)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

from pysev.cli import child_command, installation
from pysev.cli.units import (
    add_guest_arguments,
    bounded_int,
    check_guest_arguments,
    convert_rate_of,
    format_size,
    host_ram,
    option_error,
    parse_memory,
    parse_size,
    writable_file,
)
from pysev.migration.transport import MAX_CHANNELS
from pysev.qmp.migration_jobs import PARAM_RANGES

log = logging.getLogger(__name__)

DEFAULT_MEMORY = "1G"
# The main job migrates a guest that is doing something: it dirties 100 MB/s (the rate the downtime
# benchmark uses), redraws its framebuffer and flips DMA bounce buffers between private and shared, so
# the summary shows dirty pages re-sent, shared pages in the clear and state changes tracked.
DEFAULT_DIRTY_RATE, DEFAULT_VGA_FPS, DEFAULT_CONVERT_RATE = "100M", 30.0, 20.0
#: DRAM a simulated host has besides its guest (firmware and KVM buffers, VMSA pages).
HOST_OVERHEAD = 512 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate", help="live-migrate a running SEV guest between two simulated hosts", description=__doc__
    )
    p.add_argument(
        "--memory", type=parse_memory, default=DEFAULT_MEMORY, help="guest RAM size (K/M/G suffix; default 1G)"
    )
    add_guest_arguments(p, dirty_rate=DEFAULT_DIRTY_RATE, vga_fps=DEFAULT_VGA_FPS, convert_rate=DEFAULT_CONVERT_RATE)
    p.add_argument(
        "--transport",
        type=parse_transport,
        default="inproc",
        help="inproc (default), tcp (a second process over loopback) or file:PATH",
    )
    p.add_argument(
        "--channels",
        type=bounded_int(0, MAX_CHANNELS, " (the transport's MAX_CHANNELS)"),
        default=0,
        help=f"parallel page channels for encrypted pages (0..{MAX_CHANNELS})",
    )
    low, high, _ = PARAM_RANGES["downtime-limit"]
    p.add_argument("--downtime-limit", type=bounded_int(low, high, " ms"), default=300, help="ms (QEMU default 300)")
    p.add_argument(
        "--max-bandwidth",
        type=parse_bandwidth,
        default="0",
        help="bytes/s (K/M/G); 0 = unlimited (the default here; the API and QMP default to QEMU's 128M)",
    )
    p.add_argument("--auto-converge", action="store_true", help="throttle the vCPUs as QEMU's auto-converge")
    p.add_argument("--no-verify", action="store_true", help="skip the plaintext comparison after migration")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE", type=writable_file, help="PNG with dirty pages and throughput per pass")
    p.add_argument("--save-stream", metavar="FILE", type=writable_file, help="keep a copy of the migration stream")
    p.add_argument("--serve", metavar="URI", help=argparse.SUPPRESS)  # the destination process of --transport tcp
    p.set_defaults(func=run)


def parse_transport(text: str) -> str:
    """inproc, tcp or file:PATH (PATH checked writable now; empty: a file in the temporary directory)."""
    if text in ("inproc", "tcp"):
        return text
    if text.startswith("file:"):
        return "file:" + writable_file(text[5:] or os.path.join(tempfile.gettempdir(), "pysev-guest.mig"))
    raise argparse.ArgumentTypeError(f"{text!r} is not inproc, tcp or file:PATH")


def parse_bandwidth(text: str) -> int:
    value = parse_size(text)
    _, high, _ = PARAM_RANGES["max-bandwidth"]
    if value > high:
        raise argparse.ArgumentTypeError(f"{text} exceeds {high} bytes/s (QEMU's max-bandwidth)")
    return value


def _hosts_size(memory: int) -> int:
    return memory + HOST_OVERHEAD


def check_arguments(args: argparse.Namespace) -> None:
    """What argument parsing cannot see: options against each other and against this machine."""
    check_guest_arguments(args)
    hosts = 1 if args.serve else 2  # both hosts run on this machine, whatever the transport
    need, have = hosts * _hosts_size(args.memory), host_ram()
    if need > have:
        raise option_error(
            "--memory",
            f"a {format_size(args.memory)} guest needs {format_size(need)} of RAM for {hosts} simulated "
            f"host{'s' * (hosts > 1)} (guest + {format_size(HOST_OVERHEAD)} each); "
            f"this machine has {format_size(have)}",
        )
    if args.transport.startswith("file:"):
        for option, given in (("--channels", args.channels), ("--save-stream", args.save_stream)):
            if given:
                raise option_error(option, "a file migration writes one stream, into the file:PATH itself")
        if args.auto_converge:
            raise option_error("--auto-converge", "a file migration takes no capabilities (use inproc or tcp)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise option_error("--plot", "needs matplotlib: pip install 'pysev[plot]'")


class _DestinationError(Exception):
    """The destination process could not be started or is not this installation."""


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    memory = args.memory
    if args.serve:
        return _serve(args, memory)
    from pysev.cli.report import MigrationView
    from pysev.hv.machine import DEFAULT_POLICY, Host, VirtualMachine
    from pysev.migration import MigrationCapabilities, MigrationParameters

    policy = DEFAULT_POLICY if args.policy is None else args.policy
    # multifd-channels counts the channels when the multifd capability is on (1..MAX_CHANNELS); 0 channels
    # is the capability off, and the parameter keeps its default.
    channels = {"multifd_channels": args.channels} if args.channels else {}
    params = MigrationParameters(downtime_limit=args.downtime_limit, max_bandwidth=args.max_bandwidth, **channels)
    caps = MigrationCapabilities(auto_converge=args.auto_converge, multifd=args.channels > 0)
    view = MigrationView(quiet=args.json)
    with view.status(f"booting two hosts and a {format_size(memory)} guest"):
        source_host = Host("source", _hosts_size(memory), seed=1)
        vm = VirtualMachine(
            source_host,
            memory,
            sev=not args.no_sev,
            policy=policy,
            dirty_rate=args.dirty_rate,
            workload=args.workload,
            convert_rate=convert_rate_of(args),
            vga_fps=args.vga_fps,
            seed=args.seed,
        )
        vm.boot_fill()
    verify = not args.no_verify
    vms = [vm]  # torn down at the end: main() may be called from a longer-lived process
    try:
        start = time.monotonic()
        if args.transport == "inproc":
            from pysev.migration import migrate_local

            dest_host = Host("destination", _hosts_size(memory), seed=2)
            with view.progress() as progress:
                result = migrate_local(
                    vm,
                    dest_host,
                    params=params,
                    caps=caps,
                    channels=args.channels,
                    verify=verify,
                    save_stream=args.save_stream,
                    on_progress=progress,
                )
            if result.destination is not None:
                vms.append(result.destination)
            summary = _summary(
                result.info, result.passes, result.verified if verify else None, result.destination_status
            )
        elif args.transport == "tcp":
            try:
                summary = _run_tcp(args, vm, memory, policy, params, caps, view, verify)
            except _DestinationError as err:
                print(f"pysev migrate: error: {err}", file=sys.stderr)
                return 1
        else:
            summary = _run_file(args, vm, memory, params, view, verify, vms)
        summary["wall-seconds"] = round(time.monotonic() - start, 3)
        if args.plot:
            from pysev.cli.report import plot_passes

            plot_passes(summary["passes"], args.plot)
        view.summary(summary, as_json=args.json)
        ok = summary["status"] == "completed" and summary.get("verified") is not False
        return 0 if ok else 1
    finally:
        for machine in vms:
            _destroy(machine)


def _destroy(vm) -> None:
    """Stop a VM's vCPUs and free it; a failure found now (a vCPU's) is logged, the result stands."""
    if vm is None:
        return
    try:
        vm.destroy()
    except Exception as exc:  # noqa: BLE001 — teardown must not mask the migration's own result
        log.warning("tearing down %r: %s", vm, exc)


def _summary(info: dict, passes: list[dict], verified: bool | None, dest: dict) -> dict:
    out = dict(info)
    # A verdict only for a migration that completed: one that failed or never started has nothing to compare.
    out["verified"] = verified if info.get("status") == "completed" else None
    out["passes"] = passes
    out["destination"] = dest
    return out


def _run_tcp(args, vm, memory, policy, params, caps, view, verify) -> dict:
    """Destination in a second process over loopback: it prints its capabilities, we migrate to it. The
    child runs this installation of pysev and csev wherever it is started (``child_command``), and its
    hello says so: a destination on other kernels would measure, and verify, something else."""
    from pysev.migration import migrate_tcp

    argv = ["migrate", "--serve", "tcp:127.0.0.1:0", "--memory", str(memory), "--policy", hex(policy)]
    if args.no_sev:
        argv.append("--no-sev")
    if args.no_verify:
        argv.append("--no-verify")
    child = subprocess.Popen(child_command(*argv), stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None  # stdout=PIPE
    try:
        hello = json.loads(child.stdout.readline() or "{}")
        if "uri" not in hello:
            raise _DestinationError(f"the destination process did not start (exit status {child.wait(timeout=60)})")
        if hello.get("installation") != installation():
            child.kill()
            raise _DestinationError(
                f"the destination process runs {hello.get('installation')}, not this process's {installation()}"
            )
        with view.progress() as progress:
            outgoing = migrate_tcp(
                vm,
                hello["uri"],
                hello["capabilities"],
                params=params,
                caps=caps,
                channels=args.channels,
                verify=verify,
                save_stream=args.save_stream,
                on_progress=progress,
            )
        dest = json.loads(child.stdout.readline() or '{"status": "failed", "error-desc": "destination exited"}')
    finally:
        child.wait(timeout=120)
        child.stdout.close()
    verified = None
    if verify:
        verified = outgoing.digest_at_switchover is not None and outgoing.digest_at_switchover == dest.get("digest")
    return _summary(outgoing.info(), outgoing.passes, verified, dest)


def _serve(args, memory) -> int:
    """The destination process: one incoming migration, then a JSON line with the result."""
    from pysev.hv.machine import Host, VirtualMachine
    from pysev.migration import receive_tcp
    from pysev.migration.transport import TcpListener

    host = Host("destination", _hosts_size(memory), seed=2)
    dest = VirtualMachine(host, memory, sev=not args.no_sev, policy=args.policy or 0, incoming=True)
    listener = TcpListener(args.serve)
    hello = {"uri": listener.uri, "capabilities": host.sev_capabilities(), "installation": installation()}
    print(json.dumps(hello), flush=True)
    incoming = receive_tcp(listener, dest, verify=not args.no_verify)
    listener.close()
    print(
        json.dumps(
            {
                "status": incoming.status,
                "digest": incoming.guest_digest,
                **({"error-desc": incoming.error_desc} if incoming.error_desc else {}),
            }
        ),
        flush=True,
    )
    if incoming.status == "completed":
        dest.destroy()
    return 0 if incoming.status == "completed" else 1


def _run_file(args, vm, memory, params, view, verify, vms: list) -> dict:
    """Save the guest into a file, then restore it on the second host (the file is sealed for it)."""
    from pysev.hv.machine import Host
    from pysev.migration import restore_from_file, save_to_file, with_destination_certs

    path = args.transport[5:]  # parse_transport filled in a default and checked it
    dest_host = Host("destination", _hosts_size(memory), seed=2)
    params = with_destination_certs(params, dest_host.sev_capabilities())
    with view.progress() as progress:
        outgoing = save_to_file(vm, path, params=params, verify=verify, on_progress=progress)
    if outgoing.status != "completed":
        return _summary(outgoing.info(), outgoing.passes, None, {"status": "not started"})
    with view.status(f"restoring from {path}"):
        dest, incoming = restore_from_file(dest_host, path, memory, sev=not args.no_sev, verify=verify)
    vms.append(dest)
    verified = None
    if verify:
        verified = incoming.guest_digest is not None and incoming.guest_digest == outgoing.digest_at_switchover
    status = {"status": incoming.status, **({"error-desc": incoming.error_desc} if incoming.error_desc else {})}
    info = outgoing.info()
    info["file"] = path
    return _summary(info, outgoing.passes, verified, status)
