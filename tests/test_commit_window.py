"""The commit window, cut at every byte: whatever part of the exchange after the stream is lost (RECEIVED,
COMMIT, DONE, each resume connection), the guest ends on exactly one host, with the memory the source
stopped with, and both ends report the same outcome. Never two runners at any sampled instant.

Source and destination run in this process over loopback TCP through a relay that cuts one connection
after a given number of bytes in one direction (the relay's other connections, e.g. the resume ones,
pass untouched unless a rule names them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import socket
import sys
import threading
import time

import pytest

from pysev.hv.machine import Host, RunState, VirtualMachine
from pysev.migration import MigrationStatus, migrate_tcp, receive_tcp
from pysev.migration.stream import DIGEST_SIZE, MESSAGE_HEAD
from pysev.migration.transport import HELLO, TcpListener

MiB = 1 << 20
RECEIVED = MESSAGE_HEAD.size + DIGEST_SIZE  # destination → source
COMMIT = MESSAGE_HEAD.size  # source → destination
DONE = MESSAGE_HEAD.size + 1  # destination → source

_spec = importlib.util.spec_from_file_location(
    "_migration_helpers", pathlib.Path(__file__).with_name("test_migration.py")
)
H = sys.modules.get("_migration_helpers") or importlib.util.module_from_spec(_spec)
if "_migration_helpers" not in sys.modules:
    sys.modules["_migration_helpers"] = H
    _spec.loader.exec_module(H)


@dataclasses.dataclass(frozen=True)
class Cut:
    """Cut connection ``connection`` (accept order: 0 = main) after ``limit`` bytes in one direction:
    ``"d2s"`` (destination → source) or ``"s2d"``; with ``after_d2s``, the s2d count starts once that
    many bytes went d2s (the commit exchange follows the whole stream)."""

    connection: int
    direction: str
    limit: int
    after_d2s: int | None = None


class CuttingRelay:
    def __init__(self, target: tuple[str, int], cuts: tuple[Cut, ...]) -> None:
        self.target, self.cuts = target, cuts
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self.cut_done: list[Cut] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

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
            index, self.connections = self.connections, self.connections + 1
            state = {"d2s": 0, "s2d": 0, "s2d_after": 0}
            cut = next((c for c in self.cuts if c.connection == index), None)
            for a, b, direction in ((client, upstream, "s2d"), (upstream, client, "d2s")):
                threading.Thread(
                    target=self._pump, args=(a, b, direction, cut, state, client, upstream), daemon=True
                ).start()

    def _pump(self, a, b, direction, cut, state, client, upstream) -> None:
        try:
            while data := a.recv(1 << 18):
                if cut is not None and cut.direction == direction:
                    if cut.after_d2s is None:
                        room = cut.limit - state[direction]
                    elif state["d2s"] < cut.after_d2s:
                        room = len(data)  # the count has not started yet
                    else:
                        room = cut.limit - state["s2d_after"]
                    if room < len(data):
                        if room > 0:
                            b.sendall(data[:room])
                        self.cut_done.append(cut)
                        for s in (client, upstream):
                            try:
                                s.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                        return
                    if cut.after_d2s is not None and state["d2s"] >= cut.after_d2s:
                        state["s2d_after"] += len(data)
                state[direction] += len(data)  # before the bytes leave: the peer's answer may race back
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


class RunnerSampler:
    """Samples both VMs every millisecond: never both running."""

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


@pytest.fixture(scope="module")
def hosts():
    hs = {"A": Host("A", 256 * MiB, seed=1), "B": Host("B", 256 * MiB, seed=2)}
    yield hs


def _trial(hosts, cuts: tuple[Cut, ...]):
    """One migration of an idle 16 MiB guest through a cutting relay; returns what both ends ended with."""
    src = H.new_vm(hosts["A"], 16 * MiB)
    digest_before = src.digest()
    dest = VirtualMachine(hosts["B"], 16 * MiB, incoming=True, seed=7)
    listener = TcpListener("tcp:127.0.0.1:0")
    relay = CuttingRelay(("127.0.0.1", listener.port), cuts)
    sampler = RunnerSampler(src, dest)
    got = {}
    receiver = threading.Thread(
        target=lambda: got.setdefault(
            "incoming", receive_tcp(listener, dest, commit_timeout=2.0, timeout=30, resume_wait=20)
        ),
        daemon=True,
    )
    receiver.start()
    params = H.fast_params(hosts["B"], commit_timeout=2.0, commit_resume_timeout=10.0)
    t0 = time.monotonic()
    out = migrate_tcp(src, relay.uri, hosts["B"].sev_capabilities(), params=params)
    if out.abort_delivery is not None:
        out.abort_delivery.join(20)
    receiver.join(40)
    elapsed = time.monotonic() - t0
    sampler.stop()
    relay.close()
    listener.close()
    return src, dest, out, got.get("incoming"), digest_before, sampler, relay, elapsed


def _check(hosts, cuts: tuple[Cut, ...], expect_completed: bool) -> None:
    src, dest, out, inc, before, sampler, relay, elapsed = _trial(hosts, cuts)
    try:
        assert relay.cut_done, "the cut happened"
        assert inc is not None, "the destination answered"
        assert sampler.both == 0 and sampler.samples > 10, "never two runners"
        assert elapsed < 30, "resolved within seconds"
        runners = [vm for vm in (src, dest) if vm.state == RunState.RUNNING]
        assert len(runners) == 1, f"exactly one runner ({src.state}, {dest.state})"
        runners[0].workload and runners[0].workload.pause()
        assert runners[0].digest() == before, "the runner holds the memory the source stopped with"
        if expect_completed:
            assert out.status == MigrationStatus.COMPLETED and inc.status == MigrationStatus.COMPLETED
            assert runners[0] is dest and out.info()["x-guest-digest"] == inc.guest_digest == before
        else:
            assert out.status == MigrationStatus.FAILED and inc.status == MigrationStatus.FAILED
            assert runners[0] is src
    finally:
        for vm in (src, dest):
            if vm.state != RunState.SHUTDOWN:
                vm.destroy()


@pytest.mark.parametrize("k", range(RECEIVED))
def test_received_cut(hosts, k):
    """RECEIVED lost after k of its bytes: the source never sees a matching digest, decides ABORT and
    resumes; the destination, which had answered, keeps the guest until the ABORT arrives on a resume."""
    _check(hosts, (Cut(0, "d2s", k),), expect_completed=False)


@pytest.mark.parametrize("k", range(COMMIT))
def test_commit_cut(hosts, k):
    """COMMIT lost after k of its bytes: the source delivers it again on a resume connection."""
    _check(hosts, (Cut(0, "s2d", k, after_d2s=RECEIVED),), expect_completed=True)


@pytest.mark.parametrize("k", range(DONE))
def test_done_cut(hosts, k):
    """DONE lost after k of its bytes: the destination runs the guest; the source learns it on a resume."""
    _check(hosts, (Cut(0, "d2s", RECEIVED + k),), expect_completed=True)


@pytest.mark.parametrize("k", [0, HELLO.size // 2, HELLO.size, HELLO.size + COMMIT - 1])
def test_resume_connection_cut_too(hosts, k):
    """COMMIT lost, then the first resume connection cut inside its hello or its COMMIT: a later one wins."""
    _check(hosts, (Cut(0, "s2d", 0, after_d2s=RECEIVED), Cut(1, "s2d", k)), expect_completed=True)


@pytest.mark.parametrize("k", range(DONE))
def test_resume_answer_cut(hosts, k):
    """COMMIT lost, then the resume connection's DONE cut after k bytes: the destination applied the
    decision once; the next resume gets the same answer."""
    _check(hosts, (Cut(0, "s2d", 0, after_d2s=RECEIVED), Cut(1, "d2s", k)), expect_completed=True)
