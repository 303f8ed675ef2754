"""``pysev vm`` driven as libvirt drives QEMU: two VMM processes, the real ``qemu.qmp`` client (async
``QMPClient`` and the legacy sync ``QEMUMonitorProtocol``), live migration with events and query-migrate,
cancel, a destination killed midway, a byte corrupted in transit, and hostile control-plane input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

import pysev
from pysev.firmware.sev.abi import SEV_CERT_SIZE

START_TIMEOUT = 30.0
MIGRATE_TIMEOUT = 40.0
GUEST = "64M"
FAST = 1 << 30  # max-bandwidth for tests that want speed (bytes/s)
SLOW = 4 << 20  # ... and for tests that need a migration still running after a second
NODBG_POLICY = 0x11000021

pytestmark = pytest.mark.usefixtures("legacy_qmp_event_loop")


def _env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(pysev.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Vm:
    """One ``pysev vm`` process; ``qmp`` is its QMP address as ``qemu.qmp`` takes it."""

    def __init__(self, workdir: str, name: str, *args: str, memory: str = GUEST) -> None:
        self.name = name
        self.sock = os.path.join(workdir, f"{name}.qmp")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.clients: list[QEMUMonitorProtocol] = []
        cmd = [sys.executable, "-m", "pysev.cli", "-v", "vm", "--memory", memory, "--qmp", self.sock, *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=_env())
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(START_TIMEOUT):
            self.kill()
            raise AssertionError(f"{name} did not start within {START_TIMEOUT} s:\n{self.log()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"{name} exited ({self.proc.wait()}):\n{self.log()}")
        self.hello = json.loads(line)
        self.qmp = self.hello["qmp"]
        self.incoming = self.hello["incoming"]

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def client(self) -> QEMUMonitorProtocol:
        mon = QEMUMonitorProtocol(self.qmp)
        mon.connect()
        mon.settimeout(MIGRATE_TIMEOUT)
        self.clients.append(mon)
        return mon

    def kill(self) -> None:
        for mon in self.clients:
            with contextlib.suppress(Exception):
                mon.close()
        self.clients.clear()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(15)


@pytest.fixture
def vms():
    workdir = tempfile.mkdtemp(prefix="pvm", dir="/tmp")  # short: sun_path holds 108 bytes
    keep = os.environ.get("PYSEV_TEST_KEEP")
    started: list[Vm] = []

    def start(name: str, *args: str, **kw) -> Vm:
        vm = Vm(workdir, name, *args, **kw)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.kill()
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


# -- helpers ---------------------------------------------------------------------------------------------


def sev_params(caps: dict, **extra) -> dict:
    """What libvirt sets on the source from the destination's query-sev-capabilities."""
    return {
        "sev-pdh": caps["pdh"],
        "sev-plat-cert": caps["cert-chain"],
        "sev-amd-cert": caps["amd-cert-chain"],
        **extra,
    }


def prepare(src: QEMUMonitorProtocol, dst: QEMUMonitorProtocol, **params) -> None:
    caps = dst.cmd("query-sev-capabilities")
    src.cmd("migrate-set-parameters", **sev_params(caps, **params))
    for mon in (src, dst):
        mon.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])


def wait_status(
    mon: QEMUMonitorProtocol, done=("completed", "failed", "cancelled"), timeout: float = MIGRATE_TIMEOUT
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = mon.cmd("query-migrate")
        if info.get("status") in done:
            return info
        assert time.monotonic() < deadline, f"migration still {info.get('status')} after {timeout} s"
        time.sleep(0.05)


def wait_run_state(mon: QEMUMonitorProtocol, state: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := mon.cmd("query-status")["status"]) != state:
        assert time.monotonic() < deadline, f"run state {status}, expected {state}"
        time.sleep(0.05)


def wait_incoming(mon: QEMUMonitorProtocol, timeout: float = 20.0) -> dict:
    """The destination's side: QEMU announces "completed" only once the guest runs."""
    info = wait_status(mon, done=("completed", "failed"), timeout=timeout)
    assert info["status"] == "completed", info
    assert mon.cmd("query-status")["status"] == "running"
    return info


def wait_transferred(mon: QEMUMonitorProtocol, nbytes: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = mon.cmd("query-migrate")
        assert info.get("status") in ("setup", "active"), info
        if info.get("ram", {}).get("transferred", 0) >= nbytes:
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def events(mon: QEMUMonitorProtocol, name: str | None = None) -> list:
    return [(e["event"], e.get("data")) for e in mon.get_events() if name is None or e["event"] == name]


def expect_error(mon: QEMUMonitorProtocol, cmd: str, class_: str = "GenericError", contains: str = "", **args):
    with pytest.raises(ExecuteError) as info:
        mon.cmd(cmd, **args)
    assert info.value.error_class == class_, info.value
    desc = str(info.value)
    assert contains in desc, desc
    return desc


# -- §3: the libvirt flow with the async client ------------------------------------------------------------


def test_migrate_with_async_client_and_events(vms):
    src = vms("src")
    dst = vms("dst", "--incoming", "tcp:127.0.0.1:0")
    assert dst.incoming.startswith("tcp:127.0.0.1:") and not dst.incoming.endswith(":0")

    async def main():
        s, d = QMPClient("libvirt-src"), QMPClient("libvirt-dst")
        await s.connect(src.qmp)
        await d.connect(dst.qmp)
        assert (await s.execute("query-status")) == {"status": "running", "running": True, "singlestep": False}
        assert (await d.execute("query-status"))["status"] == "inmigrate"
        assert (await d.execute("query-migrate"))["status"] == "setup"  # listening
        assert (await s.execute("query-migrate")) == {}
        caps = await d.execute("query-sev-capabilities")
        assert len(base64.b64decode(caps["pdh"])) == SEV_CERT_SIZE
        assert len(base64.b64decode(caps["cert-chain"])) == 3 * SEV_CERT_SIZE  # PEK ‖ OCA ‖ CEK
        assert base64.b64decode(caps["amd-cert-chain"]) and base64.b64decode(caps["cpu0-id"])
        assert (caps["cbitpos"], caps["reduced-phys-bits"]) == (51, 1)
        await s.execute("migrate-set-parameters", sev_params(caps, **{"max-bandwidth": FAST}))
        params = await s.execute("query-migrate-parameters")
        assert params["sev-pdh"] == caps["pdh"] and params["max-bandwidth"] == FAST
        assert params["downtime-limit"] == 300
        for c in (s, d):
            await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        assert {"capability": "events", "state": True} in await s.execute("query-migrate-capabilities")
        sev = await s.execute("query-sev")
        assert sev["enabled"] and sev["state"] == "running" and sev["sev-type"] == "sev" and sev["handle"] > 0

        seen, dst_seen = [], []

        async def follow(client, into, until):
            with client.listener() as listener:
                async for ev in listener:
                    assert "timestamp" in ev and {"seconds", "microseconds"} <= set(ev["timestamp"])
                    into.append((ev["event"], ev.get("data")))
                    if until(ev):
                        return

        src_done = asyncio.create_task(
            follow(
                s,
                seen,
                lambda ev: ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "failed", "cancelled"),
            )
        )
        dst_done = asyncio.create_task(
            follow(
                d, dst_seen, lambda ev: ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "failed")
            )
        )
        await asyncio.sleep(0)
        assert (await s.execute("migrate", {"uri": dst.incoming})) == {}
        with pytest.raises(ExecuteError, match="There's a migration process in progress"):
            await s.execute("migrate", {"uri": dst.incoming})
        await asyncio.wait_for(src_done, MIGRATE_TIMEOUT)
        await asyncio.wait_for(dst_done, MIGRATE_TIMEOUT)
        statuses = [data["status"] for name, data in seen if name == "MIGRATION"]
        assert statuses[0] == "setup" and "active" in statuses and statuses[-1] == "completed", seen
        assert ("MIGRATION_PASS", {"pass": 1}) in seen
        assert ("STOP", None) in seen  # switchover stops the source
        # As QEMU's process_incoming_migration_bh: the guest runs before "completed" is announced.
        assert dst_seen[-2:] == [("RESUME", None), ("MIGRATION", {"status": "completed"})], dst_seen

        info = await s.execute("query-migrate")
        assert info["status"] == "completed" and info["downtime"] >= 0 and info["ram"]["transferred"] > 0
        assert info["ram"]["total"] >= 64 << 20 and info["ram"]["remaining"] == 0
        assert (await s.execute("query-status"))["status"] == "postmigrate"
        assert (await d.execute("query-status")) == {"status": "running", "running": True, "singlestep": False}
        dinfo = await d.execute("query-migrate")
        assert dinfo["status"] == "completed"
        assert info["x-guest-digest"] == dinfo["x-guest-digest"] == (await d.execute("x-guest-digest"))["digest"]
        assert (await s.execute("x-guest-digest"))["digest"] == info["x-guest-digest"]  # SENT, still readable
        assert (await s.execute("query-sev"))["state"] == "sent"
        with pytest.raises(ExecuteError, match="migrated away"):
            await s.execute("cont")
        # quit: reply, SHUTDOWN event, clean exit.
        with s.listener() as listener:
            await s.execute("quit")
            ev = await asyncio.wait_for(listener.get(), 5)
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await s.disconnect()
        await d.disconnect()

    loop = asyncio.new_event_loop()  # not asyncio.run: it would drop the thread's current loop, which
    try:  # the legacy sync clients of other tests share
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert src.proc.wait(15) == 0
    # SIGTERM on the destination: SHUTDOWN with reason host-signal, exit status 0.
    mon = dst.client()
    assert dst.terminate() == 0
    assert ("SHUTDOWN", {"guest": False, "reason": "host-signal"}) in events(mon)
    with contextlib.suppress(Exception):
        mon.close()


# -- §3 with the sync client: deferred incoming, page channels, a dirtying guest -------------------------


def test_migrate_defer_multifd_dirtying_guest(vms):
    src = vms("src", "--dirty-rate", "16M")
    dst = vms("dst", "--incoming", "defer", "--dirty-rate", "16M")
    assert dst.incoming == "defer"
    s, d = src.client(), dst.client()
    expect_error(d, "cont", contains="Guest is waiting for an incoming migration")
    expect_error(d, "migrate", contains="Guest is waiting for an incoming migration", uri="tcp:127.0.0.1:1")
    expect_error(
        s, "migrate-incoming", contains="'-incoming' was not specified on the command line", uri="tcp:127.0.0.1:0"
    )
    assert d.cmd("query-migrate") == {}
    d.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    expect_error(d, "migrate-incoming", contains="already been started", uri="tcp:127.0.0.1:0")
    listening = d.cmd("query-migrate")  # port 0 asked for: QEMU reports the real one here
    assert listening["status"] == "setup"
    (addr,) = listening["socket-address"]
    assert addr["type"] == "inet" and addr["port"] != "0"
    uri = f"tcp:{addr['host']}:{addr['port']}"
    prepare(s, d, **{"max-bandwidth": FAST, "multifd-channels": 2})
    s.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    s.cmd("migrate", uri=uri)
    info = wait_status(s)
    assert info["status"] == "completed", (info, src.log(), dst.log())
    assert info["ram"]["multifd-bytes"] > 0
    dinfo = wait_incoming(d)
    # The destination's vCPUs dirty memory at once: compare the digests taken at switchover.
    assert info["x-guest-digest"] == dinfo["x-guest-digest"]
    assert s.cmd("query-status")["status"] == "postmigrate"
    s.close()
    d.close()


# -- §3: cancel midway, destination killed midway, a corrupted byte in transit -------------------------


def test_cancel_midway_then_retry(vms):
    src = vms("src", "--dirty-rate", "4M")
    dst = vms("dst", "--incoming", "tcp:127.0.0.1:0")
    s, d = src.client(), dst.client()
    prepare(s, d, **{"max-bandwidth": SLOW})
    before = s.cmd("query-status")
    s.cmd("migrate", uri=dst.incoming)
    wait_transferred(s, 2 << 20)
    s.cmd("migrate_cancel")
    info = wait_status(s)
    assert info["status"] == "cancelled", info
    assert "error-desc" not in info
    statuses = [e[1]["status"] for e in events(s, "MIGRATION")]
    assert statuses[-2:] == ["cancelling", "cancelled"], statuses
    assert s.cmd("query-status") == before  # still running
    assert s.cmd("query-sev")["state"] == "running"
    s.cmd("migrate_cancel")  # QEMU: succeeds with nothing running
    # The destination discards the attempt and waits for another one on the same port.
    wait_status(d, done=("failed",), timeout=20)
    assert d.cmd("query-status")["status"] == "inmigrate"
    s.cmd("migrate-set-parameters", **{"max-bandwidth": FAST})
    s.cmd("migrate", uri=dst.incoming)
    info = wait_status(s)
    assert info["status"] == "completed", (info, dst.log())
    assert wait_incoming(d)["x-guest-digest"] == info["x-guest-digest"]
    s.close()
    d.close()


def test_destination_killed_midway(vms):
    src = vms("src", "--dirty-rate", "4M")
    dst = vms("dst", "--incoming", "tcp:127.0.0.1:0")
    s, d = src.client(), dst.client()
    prepare(s, d, **{"max-bandwidth": SLOW})
    s.cmd("migrate", uri=dst.incoming)
    wait_transferred(s, 2 << 20)
    d.close()
    dst.proc.send_signal(signal.SIGKILL)
    dst.proc.wait(10)
    info = wait_status(s)
    assert info["status"] == "failed" and info["error-desc"], info
    assert s.cmd("query-status")["status"] == "running"
    # A fresh destination: the source migrates again and completes.
    dst2 = vms("dst2", "--incoming", "tcp:127.0.0.1:0")
    d2 = dst2.client()
    prepare(s, d2, **{"max-bandwidth": FAST})
    s.cmd("migrate", uri=dst2.incoming)
    info = wait_status(s)
    assert info["status"] == "completed", (info, dst2.log())
    assert wait_incoming(d2)["x-guest-digest"] == info["x-guest-digest"]
    s.close()
    d2.close()


class Relay:
    """A TCP relay on 127.0.0.1 in front of ``target``; subclasses decide how each chunk is forwarded."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self._sock.getsockname()[1]}"
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def forward(self, data: bytes, out: socket.socket, forward: bool, connection: int, seen: int) -> None:
        out.sendall(data)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            n, self._connections = self._connections, self._connections + 1
            for a, b, fwd in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, fwd, n), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, forward: bool, connection: int) -> None:
        seen = 0
        try:
            while data := a.recv(1 << 18):
                self.forward(data, b, forward, connection, seen)
                seen += len(data)
        except OSError:
            pass
        finally:
            # As a dying relay would: the peers see the connection reset, not a silent half-open socket.
            for s_ in (a, b):
                with contextlib.suppress(OSError):
                    s_.shutdown(socket.SHUT_RDWR)
                s_.close()

    def close(self) -> None:
        self._sock.close()


class CorruptingProxy(Relay):
    """Flips one byte of the first connection's forward stream at ``offset``."""

    def __init__(self, target: tuple[str, int], offset: int) -> None:
        self.offset = offset
        self.flipped = False
        super().__init__(target)

    def forward(self, data: bytes, out: socket.socket, forward: bool, connection: int, seen: int) -> None:
        if forward and connection == 0 and not self.flipped and seen <= self.offset < seen + len(data):
            buf = bytearray(data)
            buf[self.offset - seen] ^= 0x40
            data = bytes(buf)
            self.flipped = True
        out.sendall(data)


def test_corrupted_byte_in_transit(vms):
    src = vms("src")
    dst = vms("dst", "--incoming", "tcp:127.0.0.1:0")
    s, d = src.client(), dst.client()
    prepare(s, d, **{"max-bandwidth": FAST})
    host, port = dst.incoming[4:].rsplit(":", 1)
    proxy = CorruptingProxy((host, int(port)), offset=24 << 20)  # inside the first pass's page records
    try:
        s.cmd("migrate", uri=proxy.uri)
        info = wait_status(s)
    finally:
        proxy.close()
    assert proxy.flipped
    assert info["status"] == "failed", info
    assert info["error-desc"], info
    assert "x-guest-digest" not in info
    assert s.cmd("query-status")["status"] == "running"
    assert s.cmd("query-sev")["state"] == "running"  # SEND_CANCEL: the guest is intact
    wait_status(d, done=("failed",), timeout=20)
    assert d.cmd("query-status")["status"] == "inmigrate"
    # A clean retry straight to the same destination.
    s.cmd("migrate", uri=dst.incoming)
    info = wait_status(s)
    assert info["status"] == "completed", (info, dst.log())
    assert info["x-guest-digest"] == wait_incoming(d)["x-guest-digest"] == d.cmd("x-guest-digest")["digest"]
    s.close()
    d.close()


class ImpairedLink(Relay):
    """Makes a bad link out of loopback, where ``tc netem`` is missing: every chunk waits ``delay``
    seconds, writes are re-fragmented at random sizes, and 1 % of chunks stall for ``loss_stall`` seconds,
    as a TCP retransmission after a lost segment looks to the application."""

    def __init__(
        self, target: tuple[str, int], delay: float = 0.020, loss: float = 0.01, loss_stall: float = 0.2, seed: int = 7
    ) -> None:
        import random

        self.delay, self.loss, self.loss_stall = delay, loss, loss_stall
        self._rng = random.Random(seed)
        self.stalls = 0
        super().__init__(target)

    def forward(self, data: bytes, out: socket.socket, forward: bool, connection: int, seen: int) -> None:
        time.sleep(self.delay)
        if self._rng.random() < self.loss:
            self.stalls += 1
            time.sleep(self.loss_stall)
        while data:
            cut = self._rng.randint(1, len(data))
            out.sendall(data[:cut])
            data = data[cut:]


def test_migration_over_an_impaired_link_completes_and_verifies(vms):
    """Delay, re-fragmentation and loss-like stalls on every connection (main and page channels): the
    migration still completes, and the destination's memory equals the source's at switchover."""
    src = vms("src", "--dirty-rate", "4M")
    dst = vms("dst", "--incoming", "tcp:127.0.0.1:0")
    s, d = src.client(), dst.client()
    prepare(s, d, **{"max-bandwidth": FAST, "multifd-channels": 2, "downtime-limit": 2000})
    s.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    host, port = dst.incoming[4:].rsplit(":", 1)
    link = ImpairedLink((host, int(port)))
    try:
        s.cmd("migrate", uri=link.uri)
        info = wait_status(s, timeout=120)
    finally:
        link.close()
    assert info["status"] == "completed", (info, dst.log())
    assert info["x-guest-digest"] == wait_incoming(d)["x-guest-digest"]
    assert link.stalls > 0
    assert s.cmd("query-status")["status"] == "postmigrate" and d.cmd("query-status")["status"] == "running"
    s.close()
    d.close()


# -- the rest of the command set -----------------------------------------------------------------------


def test_lifecycle_commands_and_events(vms):
    vm = vms("vm")
    mon = vm.client()
    names = {c["name"] for c in mon.cmd("query-commands")}
    assert {
        "qmp_capabilities",
        "query-commands",
        "query-status",
        "stop",
        "cont",
        "system_reset",
        "quit",
        "query-sev",
        "query-sev-capabilities",
        "migrate-set-parameters",
        "query-migrate-parameters",
        "migrate-set-capabilities",
        "query-migrate-capabilities",
        "migrate",
        "migrate-incoming",
        "migrate_cancel",
        "query-migrate",
        "x-guest-digest",
    } <= names
    digest = mon.cmd("x-guest-digest")["digest"]
    assert len(digest) == 64
    mon.cmd("stop")
    assert mon.cmd("query-status") == {"status": "paused", "running": False, "singlestep": False}
    mon.cmd("stop")  # already stopped: no-op
    mon.cmd("cont")
    assert mon.cmd("query-status")["running"] is True
    mon.cmd("system_reset")
    assert events(mon) == [
        ("STOP", None),
        ("RESUME", None),
        ("RESET", {"guest": False, "reason": "host-qmp-system-reset"}),
    ]
    caps = {c["capability"]: c["state"] for c in mon.cmd("query-migrate-capabilities")}
    assert (
        caps["events"] is False and caps["multifd"] is False and "postcopy-ram" not in caps
    )  # listed only if it works
    expect_error(
        mon,
        "migrate-set-capabilities",
        contains="not supported",
        capabilities=[{"capability": "postcopy-ram", "state": True}],
    )
    mon.cmd(
        "migrate-set-capabilities",
        capabilities=[{"capability": "postcopy-ram", "state": False}, {"capability": "auto-converge", "state": True}],
    )
    assert {"capability": "auto-converge", "state": True} in mon.cmd("query-migrate-capabilities")
    mon.cmd(
        "migrate-set-parameters",
        **{"downtime-limit": 500, "cpu-throttle-initial": 30, "cpu-throttle-tailslow": True, "tls-creds": ""},
    )
    p = mon.cmd("query-migrate-parameters")
    assert (p["downtime-limit"], p["cpu-throttle-initial"], p["cpu-throttle-tailslow"]) == (500, 30, True)
    assert {
        "max-bandwidth",
        "multifd-channels",
        "cpu-throttle-increment",
        "max-cpu-throttle",
        "throttle-trigger-threshold",
        "sev-plat-cert",
        "sev-amd-cert",
    } <= set(p)
    mon.cmd("migrate_cancel")  # nothing running: succeeds
    # A migration without SEV parameters fails as QEMU's would, and the guest keeps running.
    mon.cmd("migrate", uri="tcp:127.0.0.1:9")
    info = wait_status(mon)
    assert info["status"] == "failed" and info["error-desc"]
    assert mon.cmd("query-status")["status"] == "running"
    mon.close()


def test_nodbg_policy_refuses_digest_and_still_migrates(vms):
    """NODBG: the host's debug path is refused, yet the migration verifies: the guest agent reports the
    digest from inside the guest on both ends."""
    src = vms("src", "--policy", hex(NODBG_POLICY))
    dst = vms("dst", "--incoming", "tcp:127.0.0.1:0", "--policy", hex(NODBG_POLICY))
    s, d = src.client(), dst.client()
    assert s.cmd("query-sev")["policy"] == NODBG_POLICY
    expect_error(s, "x-guest-digest", contains="POLICY_FAILURE")
    prepare(s, d, **{"max-bandwidth": FAST})
    s.cmd("migrate", uri=dst.incoming)
    info = wait_status(s)
    assert info["status"] == "completed", (info, dst.log())
    dest_info = wait_incoming(d)
    assert info["x-guest-digest"] == dest_info["x-guest-digest"], "verified from inside the guest"
    expect_error(d, "x-guest-digest", contains="POLICY_FAILURE")
    s.close()
    d.close()


# -- §5: bad input on the control plane --------------------------------------------------------------------


class Raw:
    def __init__(self, path: str, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""
        assert "QMP" in self.recv()
        if negotiate:
            assert self.cmd(b'{"execute": "qmp_capabilities"}') == {"return": {}}

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, data: bytes) -> dict:
        self.sock.sendall(data)
        while "event" in (reply := self.recv()):
            pass
        return reply

    def close(self) -> None:
        self.sock.close()


def test_bad_control_plane_input(vms):
    vm = vms("vm")
    mon = vm.client()
    digest = mon.cmd("x-guest-digest")["digest"]

    raw = Raw(vm.qmp)
    raw.sock.sendall(b'{"execute": "query-status" "x"}')  # malformed JSON
    assert raw.recv()["error"]["class"] == "GenericError"
    assert raw.cmd(b'{"execute": "query-status"}')["return"]["status"] == "running"
    assert raw.cmd(b"[1, 2]")["error"]["desc"] == "QMP input must be a JSON object"
    assert raw.cmd(b'{"execute": "no-such-command", "id": 7}') == {
        "error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"},
        "id": 7,
    }
    cases = [
        (b'{"execute": "migrate", "arguments": {"uri": 5}}', "Invalid parameter type for 'uri', expected: string"),
        (b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "x"}}', "downtime-limit"),
        (
            b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 9999999999}}',
            "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms",
        ),
        (b'{"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 0}}', "multifd-channels"),
        (b'{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": -1}}', "max-bandwidth"),
        (b'{"execute": "migrate-set-parameters", "arguments": {"sev-pdh": 1}}', "sev-pdh"),
        (b'{"execute": "migrate-set-parameters", "arguments": {"bogus": 1}}', "Parameter 'bogus' is unexpected"),
        (b'{"execute": "migrate-set-capabilities", "arguments": {}}', "Parameter 'capabilities' is missing"),
        (
            b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "nope", '
            b'"state": true}]}}',
            "does not accept value 'nope'",
        ),
        (
            b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events"}]}}',
            "Parameter 'capabilities[0].state' is missing",
        ),
        (b'{"execute": "migrate", "arguments": {}}', "need either 'uri' or 'channels' argument"),
        (b'{"execute": "migrate", "arguments": {"uri": "exec:cat"}}', "tcp: only"),
        (b'{"execute": "migrate", "arguments": {"uri": "gopher://x"}}', "unknown migration protocol"),
        (b'{"execute": "migrate", "arguments": {"uri": "tcp:nohost"}}', "HOST:PORT"),
        (
            b'{"execute": "migrate-incoming", "arguments": {"uri": "tcp:127.0.0.1:0"}}',
            "'-incoming' was not specified on the command line",
        ),
        (b'{"execute": "stop", "arguments": {"now": true}}', "Parameter 'now' is unexpected"),
        (b'{"execute": "query-status", "arguments": []}', "'arguments' must be an object"),
    ]
    for request, fragment in cases:
        reply = raw.cmd(request)
        assert reply["error"]["class"] == "GenericError", (request, reply)
        assert fragment in reply["error"]["desc"], (request, reply)
    # Oversized message: an error, then the connection closes; the VMM lives on.
    big = Raw(vm.qmp)
    with contextlib.suppress(OSError):
        big.sock.sendall(b'{"execute": "query-status", "arguments": {"x": "' + b"a" * (2 << 20) + b'"}}')
    assert "size limit" in big.recv()["error"]["desc"]
    with pytest.raises((EOFError, OSError)):
        big.recv()
    big.close()
    # A client that disconnects mid-command (a digest takes a while) and one that never negotiates.
    for _ in range(3):
        gone = Raw(vm.qmp)
        gone.sock.sendall(b'{"execute": "x-guest-digest"}{"execute": "query-sev-capabilities"}')
        gone.sock.close()
    shy = Raw(vm.qmp, negotiate=False)
    assert shy.cmd(b'{"execute": "query-status"}')["error"]["class"] == "CommandNotFound"
    shy.close()
    # Several clients at once.
    results, errors = [], []

    def client(i: int) -> None:
        loop = asyncio.new_event_loop()  # the sync shim runs on this thread's loop: own and close it
        asyncio.set_event_loop(loop)
        try:
            c = QEMUMonitorProtocol(vm.qmp)
            c.connect()
            for _ in range(5):
                results.append(c.cmd("query-status")["status"])
            if i % 4 == 0:
                results.append(c.cmd("x-guest-digest")["digest"])
            c.close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            loop.close()
            asyncio.set_event_loop(None)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results.count("running") == 40 and results.count(digest) == 2
    raw.close()
    # The VMM and its guest are intact.
    assert mon.cmd("query-status")["status"] == "running"
    assert mon.cmd("x-guest-digest")["digest"] == digest
    assert vm.proc.poll() is None
    mon.close()
    assert vm.terminate() == 0
