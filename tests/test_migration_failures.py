"""The commit protocol under failure: any failure before SEND_FINISH ends in SEND_CANCEL with the source
running and its memory intact (and able to retry, to the same or another destination); the destination
discards everything; at no moment do both run (``RunMonitor`` in every test). Plus the hostile-stream
bound checks of the series and its gaps (qemu-migration.md §1.8), fed straight to ``IncomingMigration``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pysev.cli import child_command
from pysev.firmware.sev.abi import GuestState
from pysev.hv.machine import RunState, VirtualMachine
from pysev.hw.hostmem import PAGE_SIZE
from pysev.migration import (
    IncomingMigration,
    MigrationParameters,
    migrate_tcp,
    save_to_file,
    stream,
    with_destination_certs,
)
from pysev.migration.commit import Decision, Delivery, exchange_decision
from pysev.migration.sev_ops import MigrationError
from pysev.migration.stream import Outcome
from pysev.migration.transport import _socket_connection, file_reader, inproc_resume_pair

# the shared helpers and fixtures of test_migration.py (pytest runs with --import-mode=importlib)
_spec = importlib.util.spec_from_file_location(
    "_migration_helpers", pathlib.Path(__file__).with_name("test_migration.py")
)
H = sys.modules.get("_migration_helpers") or importlib.util.module_from_spec(_spec)
if "_migration_helpers" not in sys.modules:
    sys.modules["_migration_helpers"] = H
    _spec.loader.exec_module(H)
hosts, monitor = H.hosts, H.monitor
MiB = H.MiB


class Flip(io.RawIOBase):
    """A writer that flips one byte at stream offset ``at`` (corruption in transit)."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.n, self.done = inner, at, 0, False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if not self.done and self.n <= self.at < self.n + len(data):
            b = bytearray(data)
            b[self.at - self.n] ^= 0x5A
            data = bytes(b)
            self.done = True
        self.n += len(data)
        return self.inner.write(data)

    def write_control(self, data) -> int:
        return self.inner.write(data)

    def close(self) -> None:
        self.inner.close()


def flip_at(conn_index: int, at: int):
    def wrap(conns):
        conns[conn_index].wfile = Flip(conns[conn_index].wfile, at)

    return wrap


def assert_source_resumed(
    src: VirtualMachine, info: dict, digest_before: str | None = None, status: str = "failed"
) -> None:
    assert info["status"] == status
    if status == "failed":
        assert info.get("error-desc"), info
    assert src.state == RunState.RUNNING
    assert H.fw_state(src) == GuestState.RUNNING, "SEND_CANCEL returned the guest to RUNNING"
    if digest_before is not None:
        src.workload.pause()
        try:
            assert src.digest() == digest_before, "memory intact"
        finally:
            src.workload.resume()


def assert_destination_discarded(run) -> None:
    assert run.incoming.status == "failed" and run.incoming.error_desc
    assert run.dest.state == RunState.INMIGRATE, "the destination never ran"
    assert H.fw_state(run.dest) != GuestState.RUNNING


# =====================================================================================================
# corruption in transit, retries
# =====================================================================================================
@pytest.mark.parametrize(
    "where, at, expect",
    [
        ("main", 600_000, "BAD_MEASUREMENT"),  # inside an encrypted page's ciphertext
        ("main", 60, "destination rejected"),  # the MEM_SIZE record: stream error
        ("shared", None, "digest"),  # inside a shared page: only the digest catches it
        ("ch1", 900_000, "BAD_MEASUREMENT"),  # a page channel
    ],
)
def test_corruption_in_transit_fails_cleanly_and_retry_completes(hosts, monitor, where, at, expect):
    src = monitor.watch(H.new_vm(hosts["A"], 32 * MiB))
    channels = 2 if where == "ch1" else 0
    if where == "shared":
        src.guest.set_shared(3000 * PAGE_SIZE, 1)
        src.guest.plant(np.array([3000]), b"shared-page-content")
    before = src.digest()
    if where == "shared":
        # the shared page is the first record after MEM_SIZE: find it in a dry run of the same stream
        buf = io.BytesIO()
        w = stream.StreamWriter(buf)
        w.write_header()
        w.section_start(2, "ram", 0, 4)
        w.ram_mem_size([(b.idstr, b.used_length) for b in src.memory.blocks])
        w.ram_eos()
        w.section_footer(2)
        w.section_part(2)
        w.flush()
        at = len(buf.getvalue()) + 8 + 1 + len("pc.ram") + 100
    wrap = flip_at(1 if where == "ch1" else 0, at)
    run = H.run_local(src, hosts["B"], monitor, channels=channels, wrap_src=wrap)
    try:
        assert_source_resumed(src, run.info, before)
        assert expect in run.info["error-desc"], run.info["error-desc"]
        assert_destination_discarded(run)
    finally:
        H.finish(run)
    retry = H.run_local(src, hosts["B"], monitor, channels=channels)  # retry to the same destination
    try:
        assert retry.verified and retry.outgoing.digest_at_switchover == before
    finally:
        H.finish(retry)
        src.destroy()


def test_failed_then_retry_to_another_destination(hosts, monitor):
    src = monitor.watch(H.new_vm(hosts["A"], 32 * MiB, dirty_rate=5e6))
    run = H.run_local(src, hosts["B"], monitor, wrap_src=flip_at(0, 700_000))
    try:
        assert_source_resumed(src, run.info)
        assert_destination_discarded(run)
    finally:
        H.finish(run)
    retry = H.run_local(src, hosts["C"], monitor, channels=2)
    try:
        assert retry.verified
    finally:
        H.finish(retry)
        src.destroy()


# =====================================================================================================
# cancel, timeouts, destination exit, post-commit failure
# =====================================================================================================
def test_cancel_midway_resumes_source_and_retry_completes(hosts, monitor):
    src = monitor.watch(H.new_vm(hosts["A"], 64 * MiB, dirty_rate=5e6))
    seen = {}

    def during(out):
        time.sleep(0.4)
        seen["before"] = out.info()["status"]
        out.cancel()

    run = H.run_local(src, hosts["B"], monitor, during=during, params=H.fast_params(hosts["B"], max_bandwidth=32 * MiB))
    try:
        assert seen["before"] == "active"
        assert_source_resumed(src, run.info, status="cancelled")
        assert "error-desc" not in run.info
        assert_destination_discarded(run)
        assert src.workload.pages_written > 0 and not src.workload.paused
    finally:
        H.finish(run)
    retry = H.run_local(src, hosts["B"], monitor)
    try:
        assert retry.verified
    finally:
        H.finish(retry)
        src.destroy()


def _silent_peer(sock: socket.socket, stop: threading.Event) -> None:
    """Reads everything, never answers."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(1 << 20):
                return
        except TimeoutError:
            continue
        except OSError:
            return


def test_commit_timeout_source_side(hosts, monitor):
    """A destination that takes the whole stream and never answers: the source gives up after
    commit_timeout, SEND_CANCELs and runs on."""
    from pysev.migration import OutgoingMigration

    src = monitor.watch(H.new_vm(hosts["A"], 32 * MiB))
    before = src.digest()
    a, b = socket.socketpair()
    stop = threading.Event()
    t = threading.Thread(target=_silent_peer, args=(b, stop), daemon=True)
    t.start()
    params = H.fast_params(hosts["B"], commit_timeout=1.0)
    t0 = time.monotonic()
    info = OutgoingMigration(src, [_socket_connection("silent", a)], params).run()
    stop.set()
    t.join()
    b.close()
    try:
        assert time.monotonic() - t0 < 30
        assert_source_resumed(src, info, before)
        assert "did not confirm within 1 s" in info["error-desc"]
    finally:
        src.destroy()


@pytest.fixture(scope="module")
def sealed_stream(hosts, tmp_path_factory):
    """A complete stream of a 32 MiB guest (with one shared page) sealed for host B (save_to_file)."""
    src = H.new_vm(hosts["A"], 32 * MiB)
    src.guest.set_shared(3000 * PAGE_SIZE, 1)
    src.guest.plant(np.array([3000]), b"shared-page-content")
    path = tmp_path_factory.mktemp("sealed") / "guest.mig"
    out = save_to_file(src, str(path), params=H.fast_params(hosts["B"]))
    assert out.status == "completed"
    src.destroy()
    return path.read_bytes()


def _feed(data: bytes, answer: bytes | None = None):
    """A fake source on a socketpair: writes ``data``, optionally answers, and collects the return path."""
    a, b = socket.socketpair()
    got = bytearray()

    def run():
        try:
            a.sendall(data)
        except OSError:
            pass
        try:
            a.settimeout(30)
            while True:
                chunk = a.recv(65536)
                if not chunk:
                    break
                got.extend(chunk)
                if answer is not None and len(got) >= 4:
                    a.sendall(answer)
                    answer_sent.set()
                    break
        except OSError:
            pass

    answer_sent = threading.Event()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return _socket_connection("fake-source", b), t, got, a


def _deliver(inc: IncomingMigration, migration_id: bytes, decision: Decision) -> Delivery:
    """The source's side of a resume connection to ``inc``: deliver ``decision``, return the answer."""
    src_end, dst_end = inproc_resume_pair(migration_id)
    server = threading.Thread(target=inc.serve_resume, args=(dst_end,), daemon=True)
    server.start()
    try:
        return exchange_decision(src_end, decision, 10.0)
    finally:
        src_end.close()
        server.join(10)


def test_commit_timeout_destination_side(hosts, monitor, sealed_stream):
    """A source that sends everything and then never decides: once it has answered RECEIVED the
    destination keeps the verified guest prepared (x-commit-pending), neither runs nor discards it; a
    decision that arrives later on a resume connection resolves it."""
    dest = monitor.watch(VirtualMachine(hosts["B"], 32 * MiB, incoming=True))
    conn, t, got, a = _feed(sealed_stream)
    inc = IncomingMigration(dest, [conn], commit_timeout=1.0)
    t0 = time.monotonic()
    inc.run()
    t.join(30)
    a.close()
    try:
        assert time.monotonic() - t0 < 30
        assert inc.status == "x-commit-pending" and "no decision from the source" in inc.error_desc
        assert struct.unpack(">HH", bytes(got[:4]))[0] == 0x5001, "it had answered with its digest"
        assert dest.state == RunState.INMIGRATE and H.fw_state(dest) == GuestState.RUPDATE, "kept, not run"
        # The source's COMMIT, delivered late on a resume connection: the guest runs, DONE(RUNNING).
        assert _deliver(inc, conn.migration_id, Decision.COMMIT) == Delivery.RUNNING
        assert inc.status == "completed" and dest.state == RunState.RUNNING
        assert H.fw_state(dest) == GuestState.RUNNING
        # Delivered again (the DONE was lost): the same answer, nothing changes.
        assert _deliver(inc, conn.migration_id, Decision.COMMIT) == Delivery.RUNNING
        # Another migration's resume: UNKNOWN.
        assert _deliver(inc, b"\x01" * 16, Decision.COMMIT) == Delivery.UNKNOWN
    finally:
        dest.destroy()


def test_abort_delivered_late_discards_and_manual_resolution(hosts, monitor, sealed_stream):
    """A late ABORT discards the kept guest; an operator may resolve a pending guest by hand, once."""
    dest = monitor.watch(VirtualMachine(hosts["B"], 32 * MiB, incoming=True))
    conn, t, _, a = _feed(sealed_stream)
    inc = IncomingMigration(dest, [conn], commit_timeout=0.5)
    inc.run()
    t.join(30)
    a.close()
    try:
        assert inc.status == "x-commit-pending"
        assert _deliver(inc, conn.migration_id, Decision.ABORT) == Delivery.DISCARDED
        assert inc.status == "failed" and dest.state != RunState.RUNNING
        with pytest.raises(MigrationError, match="already resolved"):
            inc.resolve(True, by_hand=True)
    finally:
        dest.destroy()
    dest = monitor.watch(VirtualMachine(hosts["B"], 32 * MiB, incoming=True))
    conn, t, _, a = _feed(sealed_stream)
    inc = IncomingMigration(dest, [conn], commit_timeout=0.5)
    inc.run()
    t.join(30)
    a.close()
    try:
        assert inc.status == "x-commit-pending"
        assert inc.resolve(True, by_hand=True) == Outcome.RUNNING  # the source host is gone for good
        assert inc.status == "completed" and dest.state == RunState.RUNNING
        assert "by hand" in inc.error_desc
    finally:
        dest.destroy()


def test_commit_lost_on_the_wire_is_delivered_again(hosts, monitor):
    """The connection dies as the source sends COMMIT (the window that lost the guest before): the
    source delivers COMMIT again on a resume connection, the destination runs the guest and confirms,
    the source issues SEND_FINISH. Exactly one runner, with the source's switchover digest."""
    src = monitor.watch(H.new_vm(hosts["A"], 32 * MiB, dirty_rate=2e6))

    class FailCommitWrite(io.RawIOBase):
        def __init__(self, inner):
            self.inner = inner

        def writable(self):
            return True

        def write(self, data):
            return self.inner.write(data)

        def write_control(self, data):
            if struct.unpack(">H", bytes(data[:2]))[0] == 0x5003:  # COMMIT
                raise BrokenPipeError("connection cut as COMMIT left")
            return self.inner.write(data)

        def close(self):
            self.inner.close()

    def wrap(conns):
        conns[0].wfile = FailCommitWrite(conns[0].wfile)

    run = H.run_local(src, hosts["B"], monitor, wrap_src=wrap, commit_timeout=2.0)
    try:
        assert run.info["status"] == "completed", run.info
        assert run.incoming.status == "completed"
        assert src.state == RunState.POSTMIGRATE and H.fw_state(src) == GuestState.SENT
        assert run.dest.state == RunState.RUNNING
        assert run.info["x-guest-digest"] == run.incoming.guest_digest
    finally:
        H.finish(run)
        src.destroy()


# =====================================================================================================
# a destination process killed midway (TCP between two processes)
# =====================================================================================================
def _spawn_destination(memory: str = "64M"):
    child = subprocess.Popen(  # this installation of pysev, whatever the working directory
        child_command("migrate", "--serve", "tcp:127.0.0.1:0", "--memory", memory),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    hello = json.loads(child.stdout.readline())
    return child, hello


def test_destination_killed_midway_then_retry(hosts, monitor):
    src = monitor.watch(H.new_vm(hosts["A"], 64 * MiB))
    before = src.digest()
    child, hello = _spawn_destination()
    result = {}
    params = MigrationParameters(max_bandwidth=16 * MiB, commit_timeout=10)

    def go():
        result["out"] = migrate_tcp(src, hello["uri"], hello["capabilities"], params=params, channels=2)

    t = threading.Thread(target=go)
    t.start()
    time.sleep(1.0)
    child.kill()
    child.wait(30)
    child.stdout.close()
    t.join(60)
    assert not t.is_alive()
    info = result["out"].info()
    assert_source_resumed(src, info, before)
    # retry to a fresh destination process: completes, and its digest equals ours at switchover
    child, hello = _spawn_destination()
    try:
        out = migrate_tcp(
            src, hello["uri"], hello["capabilities"], params=MigrationParameters(max_bandwidth=0), channels=2
        )
        dest = json.loads(child.stdout.readline())
        assert out.status == "completed" and dest["status"] == "completed"
        assert out.digest_at_switchover == dest["digest"] == before
    finally:
        child.wait(60)
        child.stdout.close()
        src.destroy()


# =====================================================================================================
# migration parameters
# =====================================================================================================
@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("sev_pdh", "A" * (4 * 0x4000 // 3 + 8), "exceed"),
        ("sev_plat_cert", "!!not base64!!", "not valid base64"),
        ("sev_amd_cert", "", "not set"),
    ],
)
def test_sev_params_bounded_like_qemu(hosts, monitor, field, value, fragment):
    import dataclasses

    from pysev.migration import OutgoingMigration
    from pysev.migration.transport import inproc_pairs

    src = monitor.watch(H.new_vm(hosts["A"], 32 * MiB, fill=False))
    params = dataclasses.replace(H.fast_params(hosts["B"]), **{field: value})
    s, d = inproc_pairs(0)
    info = OutgoingMigration(src, s, params).run()
    for c in d:
        c.close()
    try:
        assert_source_resumed(src, info)
        assert fragment in info["error-desc"]
    finally:
        src.destroy()


def test_wrong_destination_certificates_fail_at_receive_start(hosts, monitor):
    """SEND_START accepts C's (valid) chain, but B cannot open the session: B refuses, A runs on."""
    src = monitor.watch(H.new_vm(hosts["A"], 32 * MiB))
    params = with_destination_certs(MigrationParameters(max_bandwidth=0), hosts["C"].sev_capabilities())
    run = H.run_local(src, hosts["B"], monitor, params=params)
    try:
        assert_source_resumed(src, run.info)
        assert "RECEIVE_START" in run.info["error-desc"]
        assert_destination_discarded(run)
    finally:
        H.finish(run)
        src.destroy()


# =====================================================================================================
# hostile streams fed to IncomingMigration
# =====================================================================================================
def _offsets(data: bytes) -> dict:
    """Where the fields of interest are in the sealed stream."""
    npages = 32 * MiB // PAGE_SIZE
    bitmap = data.index(struct.pack(">IIQQQ", 2, 1, 0, npages, npages // 8))
    page = data.index(struct.pack(">QII", PAGE_SIZE | 0x220, 1, 52))  # page 1, steady state
    first = data.index(struct.pack(">I", 2084)) - 8  # subtype, policy, pdh_len
    shared = data.index(b"shared-page-content")
    return {"bitmap": bitmap, "page": page, "first": first, "shared": shared}


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _hostile_cases(data: bytes):
    o = _offsets(data)
    p, bm = o["page"], o["bitmap"] + 4  # bm: start of the CONTINUE entry
    flipped = bytearray(data)
    flipped[p + 72 + 100] ^= 1
    shared_flip = bytearray(data)
    shared_flip[o["shared"] + 3] ^= 1
    return {
        "bad magic": (_patch(data, 0, ">I", 0x51455600), "bad magic", "file header at offset 0"),
        "truncated early": (data[:40], "truncated", "offset"),
        "truncated mid page": (data[: p + 1000], "truncated", "offset"),
        "truncated before EOF": (data[: bm + 30], "truncated", "offset"),
        "bad hdr_len": (_patch(data, p + 12, ">I", 53), "hdr_len 53", f"offset {p + 12}]"),
        "huge hdr_len": (_patch(data, p + 12, ">I", 0xFFFFFFF0), "exceeds SEV_FW_BLOB_MAX_SIZE", f"offset {p + 12}]"),
        "trans_len != page": (_patch(data, p + 68, ">I", 8192), "trans_len 8192", f"offset {p + 68}]"),
        "huge pdh_len": (_patch(data, o["first"] + 8, ">I", 0x7FFFFFFF), "pdh_len", f"offset {o['first'] + 8}]"),
        "unknown subtype": (_patch(data, p + 8, ">I", 9), "unknown encrypted subtype 9", f"offset {p + 8}]"),
        "unknown RAM flag": (_patch(data, p, ">Q", PAGE_SIZE | 0x220 | 0x40), "XBZRLE", f"offset {p}]"),
        "offset outside block": (_patch(data, p, ">Q", (1 << 40) | 0x220), "outside RAM block", f"offset {p}]"),
        "bad MAC": (bytes(flipped), "BAD_MEASUREMENT", "stream offset"),
        "misaligned bitmap gpa": (_patch(data, bm + 4, ">Q", 0x10), "not page-aligned", f"offset {bm + 4}]"),
        "oversize npages": (_patch(data, bm + 12, ">Q", 1 << 40), "npages", f"offset {bm + 12}]"),
        "npages overflow": (
            _patch(_patch(data, bm + 4, ">Q", (1 << 64) - PAGE_SIZE), bm + 12, ">Q", 8192),
            "GPA limit",
            "offset",
        ),
        "bitmap size mismatch": (_patch(data, bm + 20, ">Q", 1 << 30), "size", f"offset {bm + 20}]"),
        "bad bitmap status": (_patch(data, bm, ">I", 7), "must be CONTINUE (1) or END (2)", f"offset {bm}]"),
        "shared page altered": (bytes(shared_flip), "digest", ""),
    }


HOSTILE = [
    "bad magic",
    "truncated early",
    "truncated mid page",
    "truncated before EOF",
    "bad hdr_len",
    "huge hdr_len",
    "trans_len != page",
    "huge pdh_len",
    "unknown subtype",
    "unknown RAM flag",
    "offset outside block",
    "bad MAC",
    "misaligned bitmap gpa",
    "oversize npages",
    "npages overflow",
    "bitmap size mismatch",
    "bad bitmap status",
    "shared page altered",
]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_stream_file_mode(hosts, monitor, sealed_stream, tmp_path, case):
    data, fragment, where = _hostile_cases(sealed_stream)[case]
    path = tmp_path / "hostile.mig"
    path.write_bytes(data)
    dest = monitor.watch(VirtualMachine(hosts["B"], 32 * MiB, incoming=True))
    inc = IncomingMigration(dest, [file_reader(str(path))], file_mode=True)
    inc.run()
    try:
        assert inc.status == "failed", case
        assert fragment in inc.error_desc and where in inc.error_desc, inc.error_desc
        assert dest.state == RunState.INMIGRATE and H.fw_state(dest) != GuestState.RUNNING
    finally:
        dest.destroy()


@pytest.mark.parametrize(
    "case", ["truncated mid page", "bad MAC", "misaligned bitmap gpa", "oversize npages", "bad hdr_len"]
)
def test_hostile_stream_over_socket_reports_to_source(hosts, monitor, sealed_stream, case):
    data, fragment, where = _hostile_cases(sealed_stream)[case]
    dest = monitor.watch(VirtualMachine(hosts["B"], 32 * MiB, incoming=True))
    conn, t, got, a = _feed(data)
    inc = IncomingMigration(dest, [conn], commit_timeout=2.0)
    th = threading.Thread(target=inc.run, daemon=True)
    th.start()
    if case.startswith("truncated"):
        time.sleep(0.3)
        a.shutdown(socket.SHUT_WR)  # the source went away mid-record
    th.join(30)
    t.join(30)
    a.close()
    try:
        assert inc.status == "failed"
        assert fragment in inc.error_desc and where in inc.error_desc, inc.error_desc
        kind, n = struct.unpack(">HH", bytes(got[:4]))
        assert kind == 0x5002 and fragment in bytes(got[4 : 4 + n]).decode(), "the reason goes to the source"
        assert dest.state == RunState.INMIGRATE and H.fw_state(dest) != GuestState.RUNNING
    finally:
        dest.destroy()


def test_source_abort_is_named_on_the_destination(hosts, monitor):
    """A source that gives up (SEND_START refused: NOSEND) tells the destination, which says so, instead
    of reading the ABORT message as a stream ('bad magic 0x50040000')."""
    src = monitor.watch(H.new_vm(hosts["A"], 32 * MiB, policy=0x11000028))
    run = H.run_local(src, hosts["B"], monitor)
    try:
        assert run.info["status"] == "failed" and "SEND_START" in run.info["error-desc"]
        assert run.incoming.status == "failed"
        assert "the source aborted the migration" in run.incoming.error_desc, run.incoming.error_desc
        assert "magic" not in run.incoming.error_desc
    finally:
        H.finish(run)
        src.destroy()


def test_cli_gives_no_verdict_for_a_migration_that_did_not_complete(tmp_path):
    """No false 'plaintext differs' for a migration that never started (exit 1, verified: null)."""
    from pysev.cli import child_command

    res = subprocess.run(
        child_command("migrate", "--memory", "32M", "--policy", "0x11000028", "--json"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    summary = json.loads(res.stdout)
    assert res.returncode == 1 and summary["status"] == "failed" and summary["verified"] is None
