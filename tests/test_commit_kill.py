"""Kill either side of a migration at each step of the commit exchange (two ``pysev vm`` processes driven
with the real ``qemu.qmp`` client, kill -9 while a relay holds the exchange at that step), bring the host
back, and check: never two runners, the guest ends running on exactly one host with the memory the source
stopped with, and where no protocol can know the answer (the source died after the destination
answered), the destination says so (``x-commit-pending``) and an operator resolves it by hand.
"""

from __future__ import annotations

import importlib.util
import pathlib
import socket
import sys
import threading
import time

import pytest
from qemu.qmp import ExecuteError

from pysev.migration.stream import DIGEST_SIZE, MESSAGE_HEAD

_spec = importlib.util.spec_from_file_location("_vm_qmp_helpers", pathlib.Path(__file__).with_name("test_vm_qmp.py"))
Q = sys.modules.get("_vm_qmp_helpers") or importlib.util.module_from_spec(_spec)
if "_vm_qmp_helpers" not in sys.modules:
    sys.modules["_vm_qmp_helpers"] = Q
    _spec.loader.exec_module(Q)
vms = Q.vms  # the fixture


pytestmark = pytest.mark.usefixtures("legacy_qmp_event_loop")


RECEIVED = MESSAGE_HEAD.size + DIGEST_SIZE


class HoldingRelay:
    """Forwards the first connection until the destination has sent ``d2s_before_hold`` bytes back, then
    holds one direction (``"s2d"`` or ``"d2s"``): what the peer sends next stays in the relay, so a process
    can be killed exactly there. Later connections (resume) pass straight through."""

    def __init__(self, target: tuple[str, int], hold: str, d2s_before_hold: int) -> None:
        self.target, self.hold, self.d2s_before_hold = target, hold, d2s_before_hold
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self._sock.getsockname()[1]}"
        self.holding = threading.Event()
        self._d2s = 0
        self._n = 0
        self._first: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()
        self.release()

    def release(self) -> None:
        """Cut the held connection (both ends see it closed)."""
        for s in self._first:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

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
            first, self._n = self._n == 0, self._n + 1
            if first:
                self._first = [client, upstream]
            for a, b, direction in ((client, upstream, "s2d"), (upstream, client, "d2s")):
                threading.Thread(target=self._pump, args=(a, b, direction, first), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, direction: str, first: bool) -> None:
        try:
            while data := a.recv(1 << 18):
                if first and direction == "d2s":
                    room = self.d2s_before_hold - self._d2s
                    self._d2s += len(data)
                    if self.hold == "d2s" and room < len(data):
                        if room > 0:
                            b.sendall(data[:room])
                        self.holding.set()
                        continue  # held: the rest never leaves
                if first and direction == "s2d" and self.hold == "s2d" and self._d2s >= self.d2s_before_hold:
                    self.holding.set()
                    continue
                b.sendall(data)
        except OSError:
            pass
        if first and direction == "d2s" and self.holding.is_set() and self.hold == "d2s":
            return  # the destination closed after what is held: the source keeps waiting until release()
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _setup(vms, hold: str, d2s_before_hold: int):
    src = vms("src", "--dirty-rate", "0")
    dst = vms("dst", "--incoming", "tcp:127.0.0.1:0")
    s, d = src.client(), dst.client()
    Q.prepare(s, d, **{"max-bandwidth": Q.FAST})
    before = s.cmd("x-guest-digest")["digest"]
    port = int(dst.incoming.rsplit(":", 1)[1])
    relay = HoldingRelay(("127.0.0.1", port), hold, d2s_before_hold)
    s.cmd("migrate", uri=relay.uri)
    assert relay.holding.wait(Q.MIGRATE_TIMEOUT), "the exchange reached the held step"
    time.sleep(0.2)  # let the held side settle into its wait
    return src, dst, s, d, before, relay, port


def _running(mon) -> bool:
    return mon.cmd("query-status")["status"] == "running"


def test_source_killed_after_the_destination_answered(vms):
    """The source dies before it learns the digest: the destination holds the only copy, says so, never
    runs it on a guess; an operator resolves it by hand and the guest runs with the source's memory."""
    src, dst, s, d, before, relay, _ = _setup(vms, "d2s", 0)
    try:
        src.kill()
        info = Q.wait_status(d, done=("x-commit-pending",), timeout=20)
        assert "no decision from the source" in info["error-desc"]
        assert d.cmd("query-status")["status"] == "inmigrate", "kept, not run"
        d.cmd("x-resolve-migration", action="run-here")
        Q.wait_run_state(d, "running")
        assert d.cmd("x-guest-digest")["digest"] == before
        assert d.cmd("query-migrate")["status"] == "completed"
    finally:
        relay.close()


def test_destination_killed_before_commit_arrives(vms):
    """The source decided COMMIT, the destination dies before COMMIT reaches it: when the destination
    host is back (empty), it answers UNKNOWN and the source resumes its copy: one runner, same memory."""
    src, dst, s, d, before, relay, port = _setup(vms, "s2d", RECEIVED)
    try:
        dst.kill()
        info = Q.wait_status(s, done=("x-commit-pending",), timeout=20)
        assert not _running(s), "never resumed on a guess while the destination might run the guest"
        dst2 = vms("dst2", "--incoming", f"tcp:127.0.0.1:{port}")
        info = Q.wait_status(s, timeout=30)
        assert info["status"] == "failed" and "holds no such migration" in info["error-desc"], info
        Q.wait_run_state(s, "running")
        assert s.cmd("x-guest-digest")["digest"] == before
        assert dst2.client().cmd("query-status")["status"] == "inmigrate"
    finally:
        relay.close()


def test_source_killed_after_commit_delivered(vms):
    """COMMIT reached the destination (its DONE is held): the source dies; the destination runs the guest."""
    src, dst, s, d, before, relay, _ = _setup(vms, "d2s", RECEIVED)
    try:
        Q.wait_run_state(d, "running")
        src.kill()
        assert Q.wait_status(d)["status"] == "completed"
        assert d.cmd("x-guest-digest")["digest"] == before
    finally:
        relay.close()


def test_destination_killed_after_running_the_guest(vms):
    """The destination ran the guest and died before its DONE reached the source: the source learns from
    the restarted (empty) destination that no copy exists there and runs its own, from the switchover
    state (what the destination ran in between is lost, as in a crash)."""
    src, dst, s, d, before, relay, port = _setup(vms, "d2s", RECEIVED)
    try:
        Q.wait_run_state(d, "running")
        dst.kill()
        relay.release()  # the source sees the connection die
        assert Q.wait_status(s, done=("x-commit-pending",), timeout=20)["status"] == "x-commit-pending"
        assert not _running(s)
        vms("dst2", "--incoming", f"tcp:127.0.0.1:{port}")
        info = Q.wait_status(s, timeout=30)
        assert info["status"] == "failed" and "holds no such migration" in info["error-desc"], info
        Q.wait_run_state(s, "running")
        assert s.cmd("x-guest-digest")["digest"] == before
    finally:
        relay.close()


def test_destination_gone_for_good_resolved_on_the_source(vms):
    """The destination host never comes back: the source keeps the commit pending (bounded retries) and
    an operator resolves it there by hand (run-here: SEND_CANCEL and resume)."""
    src, dst, s, d, before, relay, _ = _setup(vms, "s2d", RECEIVED)
    try:
        dst.kill()
        Q.wait_status(s, done=("x-commit-pending",), timeout=20)
        with pytest.raises(ExecuteError, match="not finalized"):
            s.cmd("cont")  # not while the decision is pending
        s.cmd("x-resolve-migration", action="run-here")
        Q.wait_run_state(s, "running")
        assert s.cmd("query-migrate")["status"] == "failed"
        assert s.cmd("x-guest-digest")["digest"] == before
    finally:
        relay.close()
