"""Fault-injection campaign: live migrations over loopback TCP with a fault at a random place, and the
commit invariants checked on every trial.

    python benchmarks/fault_campaign.py [--trials N] [--seed S] [--channels-max C] [--tls] [--json]

Each trial migrates an idle 16 MiB SEV guest between two in-process hosts through a relay that injects
one fault, drawn at random: a cut (one connection closed after a random number of bytes in one
direction), a flipped byte, a stall (a direction held for a random time), or a cancel (``migrate_cancel``
at a random moment); page channels 0..C at random. Invariants, on every trial:

- never two runners: both VMs are sampled every millisecond;
- the guest ends running on exactly one host, with the memory the source stopped with;
- both ends report the same outcome (completed on both, or failed/cancelled on the source and failed on
  the destination);
- no exception escapes a migration thread.

It prints trials, outcomes by class and every violation (with the trial's seed to replay it), and exits 1
if any invariant was broken. ``tests/test_fault_campaign.py`` runs a bounded slice in the default suite.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import random
import socket
import sys
import threading
import time
from typing import Any

from pysev.hv.machine import Host, RunState, VirtualMachine
from pysev.migration import (
    MigrationCapabilities,
    MigrationParameters,
    MigrationStatus,
    OutgoingMigration,
    receive_tcp,
    with_destination_certs,
)
from pysev.migration.transport import TcpListener, tcp_connect, tcp_resume

MiB = 1 << 20
GUEST = 16 * MiB
STREAM_GUESS = 17 * MiB  # about the main stream of an idle 16 MiB guest: offsets are drawn below it


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # cut | flip | stall | cancel
    connection: int  # accept order at the relay: 0 = main, then channels, then resume connections
    direction: str  # s2d | d2s
    offset: int  # bytes into that direction
    seconds: float = 0.0  # stall length, or the cancel's delay

    @staticmethod
    def draw(rng: random.Random, channels: int) -> Fault:
        kind = rng.choice(["cut", "cut", "flip", "stall", "cancel"])
        connection = rng.choice([0, 0, 0, *range(1, channels + 2)])  # main mostly; a channel or a resume
        direction = rng.choice(["s2d", "s2d", "d2s"])
        if direction == "d2s":
            offset = rng.randrange(0, 48)  # the return path: RECEIVED, DONE
        else:
            offset = rng.choice([rng.randrange(0, 64), rng.randrange(0, STREAM_GUESS)])
        return Fault(kind, connection, direction, offset, round(rng.uniform(0.05, 1.5), 3))


class FaultRelay:
    """A loopback relay in front of the destination that applies one ``Fault``."""

    def __init__(self, target: tuple[str, int], fault: Fault) -> None:
        self.target, self.fault = target, fault
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self._sock.getsockname()[1]}"
        self.applied = False
        self._n = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()
        for s in self._open:
            _close(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            index, self._n = self._n, self._n + 1
            self._open += [client, upstream]
            for a, b, direction in ((client, upstream, "s2d"), (upstream, client, "d2s")):
                threading.Thread(target=self._pump, args=(a, b, direction, index), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, direction: str, index: int) -> None:
        f = self.fault
        mine = f.kind in ("cut", "flip", "stall") and f.connection == index and f.direction == direction
        seen = 0
        try:
            while data := a.recv(1 << 18):
                if mine and not self.applied and seen <= f.offset < seen + len(data):
                    at = f.offset - seen
                    self.applied = True
                    if f.kind == "cut":
                        b.sendall(data[:at])
                        break
                    if f.kind == "flip":
                        data = data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1 :]
                    else:  # stall
                        b.sendall(data[:at])
                        time.sleep(f.seconds)
                        data = data[at:]
                seen += len(data)
                b.sendall(data)
        except OSError:
            pass
        _close(a)
        _close(b)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class Sampler:
    def __init__(self, a: VirtualMachine, b: VirtualMachine) -> None:
        self.a, self.b, self.both, self.samples = a, b, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.samples += 1
            if self.a.state == RunState.RUNNING and self.b.state == RunState.RUNNING:
                self.both += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclasses.dataclass
class Trial:
    seed: int
    fault: Fault
    channels: int
    outcome: str = ""
    violations: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def run_trial(seed: int, hosts: dict[str, Host], *, channels_max: int = 2) -> Trial:
    rng = random.Random(seed)
    channels = rng.randint(0, channels_max)
    fault = Fault.draw(rng, channels)
    trial = Trial(seed, fault, channels)
    errors: list[BaseException] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment,misc]
    src = VirtualMachine(hosts["A"], GUEST, seed=seed % 1000)
    src.boot_fill()
    before = src.digest()
    dest = VirtualMachine(hosts["B"], GUEST, incoming=True, seed=seed % 1000)
    listener = TcpListener("tcp:127.0.0.1:0")
    relay = FaultRelay(("127.0.0.1", listener.port), fault)
    sampler = Sampler(src, dest)
    got: dict[str, Any] = {}

    def receive() -> None:
        try:
            got["incoming"] = receive_tcp(listener, dest, commit_timeout=3.0, timeout=20, resume_wait=20)
        except (OSError, ValueError) as err:  # the main connection never came (a cut hello): no guest here
            got["error"] = err

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    params = with_destination_certs(
        MigrationParameters(
            max_bandwidth=0, multifd_channels=max(channels, 1), commit_timeout=3.0, commit_resume_timeout=10.0
        ),
        hosts["B"].sev_capabilities(),
    )
    t0 = time.monotonic()
    out: OutgoingMigration | None = None
    try:
        conns = tcp_connect(relay.uri, channels)
    except OSError as err:  # a cut inside a hello: the source never stopped its guest
        trial.outcome = f"connect-error:{type(err).__name__}"
    else:
        out = OutgoingMigration(
            src,
            conns,
            params,
            MigrationCapabilities(multifd=channels > 0),
            resume_connect=functools.partial(tcp_resume, relay.uri),
        )
        if fault.kind == "cancel":
            threading.Timer(fault.seconds / 10, out.cancel).start()
        out.run()
    if out is not None:
        if out.abort_delivery is not None:
            out.abort_delivery.join(30)
    listener_closer = threading.Timer(25, listener.close)
    listener_closer.start()
    receiver.join(40)
    listener_closer.cancel()
    trial.seconds = time.monotonic() - t0
    sampler.stop()
    relay.close()
    listener.close()
    threading.excepthook = old_hook
    inc = got.get("incoming")
    src_status = out.status.value if out is not None else "not-started"
    dst_status = inc.status.value if inc is not None else "no-migration"
    if not trial.outcome:
        reached = relay.applied or fault.kind == "cancel"
        trial.outcome = f"{src_status}/{dst_status}" + ("" if reached else " (fault not reached)")
    v = trial.violations
    if sampler.both:
        v.append(f"two runners in {sampler.both} of {sampler.samples} samples")
    runners = [vm for vm in (src, dest) if vm.state == RunState.RUNNING]
    if len(runners) != 1:
        v.append(f"{len(runners)} runners at the end (source {src.state.value}, destination {dest.state.value})")
    elif runners[0].digest() != before:
        v.append("the runner's memory differs from the source's at switchover")
    completed = (src_status == MigrationStatus.COMPLETED, dst_status == MigrationStatus.COMPLETED)
    if completed[0] != completed[1]:
        v.append(f"the ends disagree: source {src_status}, destination {dst_status}")
    if completed[0] and runners and runners[0] is not dest:
        v.append("completed, but the destination does not run the guest")
    if errors:
        v.append(f"unhandled exception in a thread: {errors[0]!r}")
    for vm in (src, dest):
        if vm.state != RunState.SHUTDOWN:
            vm.destroy()
    return trial


def campaign(trials: int, seed: int, channels_max: int = 2, report=print) -> list[Trial]:
    hosts = {"A": Host("A", 256 * MiB, seed=1), "B": Host("B", 256 * MiB, seed=2)}
    results = []
    for i in range(trials):
        t = run_trial(seed + i, hosts, channels_max=channels_max)
        results.append(t)
        if t.violations:
            report(f"VIOLATION seed={t.seed} {t.fault}: {'; '.join(t.violations)}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--channels-max", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    results = campaign(args.trials, args.seed, args.channels_max, report=lambda m: print(m, file=sys.stderr))
    by_class = collections.Counter(f"{t.fault.kind}: {t.outcome}" for t in results)
    violations = [t for t in results if t.violations]
    summary = {
        "trials": len(results),
        "seconds": round(time.monotonic() - t0, 1),
        "violations": len(violations),
        "outcomes": dict(sorted(by_class.items())),
        "violating_seeds": [t.seed for t in violations],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['trials']} trials in {summary['seconds']} s, {summary['violations']} violations")
        for name, n in summary["outcomes"].items():
            print(f"  {n:5d}  {name}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
