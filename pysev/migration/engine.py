"""The pre-copy live-migration engine (QEMU ``migration/``), SEV-agnostic: SEV specifics live in
``pysev.migration.sev_ops``; the wire format in ``pysev.migration.stream``; transports in ``transport``.

Source (``OutgoingMigration.run``): setup (SEND_START via ops, MEM_SIZE), iterative passes — each pass
sends every page of the migration bitmap (private pages as batched SEND_UPDATE_DATA records, shared
pages in the clear, zero shared pages as ZERO records), then syncs: the dirty log is fetched-and-cleared
FIRST and the page-encryption state is snapshotted AFTER (the ordering invariant documented in
``pysev.hv.memory``) — until the remaining bytes fit ``bandwidth × downtime-limit`` (QEMU's switchover
rule, qemu-migration.md §4.1, §5); auto-converge throttles the vCPUs by QEMU's rules; then
stop-and-copy, the page-encryption state map, EOF and the commit protocol.

Commit protocol (never two runners, nothing lost): the destination verifies every record and answers on
the return path with a digest of what it applied; the source commits (SEND_FINISH, then COMMIT on the
wire) only if that digest equals the digest of what it sent. Any failure before — a rejected packet, a
cut connection, a destination exit, a timeout, a cancel — ends in SEND_CANCEL and the source guest
resumes with its memory untouched; the destination discards everything and runs the guest
(RECEIVE_FINISH) only on COMMIT.

The digest is SHA-256 over every record's meaning: block, offset, record type and content; an encrypted
page contributes its 52-byte packet header (flags, IV, MAC) rather than its 4096-byte payload, because the
destination firmware has already verified that payload against the MAC (BAD_MEASUREMENT otherwise).
Hashing the payload again would cost as much CPU as the MAC itself and add no integrity.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import struct
import threading
import time
from typing import Callable

import numpy as np

import csev
from pysev.hw.hostmem import PAGE_SIZE
from pysev.hv.machine import RunState, VirtualMachine
from pysev.migration import stream as S
from pysev.migration.sev_ops import MigrationError, ops_for
from pysev.migration.transport import Connection

log = logging.getLogger(__name__)

BATCH_PAGES = 2048            # pages per SEND/RECEIVE_UPDATE_DATA batch (8 MiB of guest memory: fewer round trips)
# A send batch goes out through a ring of this many records (533 KB), each slice sent while in cache. It
# fits a core's L2 beside the guest pages being read and the socket's buffers. Measured over loopback TCP
# (2 GiB idle guest, alternating runs): the socket's copy from cache instead of DRAM took the source from
# ~4.4 to ~4.2 us per page (0.74 -> 0.80 of the send kernel); 256-512 records gave it back.
# benchmarks/test_migration.py (e) keeps the comparison.
SEND_RING_RECORDS = 128
# The destination reads ahead 8 MiB: runs of ~2000 encrypted-page records are then handed to
# RECEIVE_UPDATE_DATA in place, without a copy (stream.EncryptedBatch zero_copy).
READER_LIMITS = dataclasses.replace(S.ReaderLimits(), read_chunk=8 << 20)
BUFFER_DELAY = 0.1           # QEMU's BUFFER_DELAY: the rate-limit and bandwidth window, seconds
MAX_PASSES = 10_000
RAM_SECTION_ID = 2
RAM_SECTION = ("ram", 0, 4)
# SEV-ES: one FULL device section per vCPU after the RAM section (QEMU puts non-iterable devices there),
# carrying SEND_UPDATE_VMSA's packet: be32 hdr_len (52), hdr, be32 trans_len (4096), trans.
VMSA_SECTION_ID = 3
VMSA_SECTION = ("sev-es-vmsa", 1)


def _vmsa_vmdesc(vcpu: int) -> dict:
    """The vmdesc entry that lets analyze-migration.py decode a VMSA section."""
    return {"name": VMSA_SECTION[0], "instance_id": vcpu, "vmsd_name": VMSA_SECTION[0], "version": VMSA_SECTION[1],
            "fields": [{"name": "hdr_len", "type": "uint32", "size": 4}, {"name": "hdr", "type": "buffer", "size": 52},
                       {"name": "trans_len", "type": "uint32", "size": 4},
                       {"name": "trans", "type": "buffer", "size": PAGE_SIZE}]}

# Return path and commit messages after the QEMU stream, in QEMU's return-path framing
# (be16 type, be16 length, data; migration/migration.c MIG_RP_MSG_*), with pysev's own types.
MSG = struct.Struct(">HH")
RP_SEV_RECEIVED = 0x5001     # destination → source: digest(32) of every record applied
RP_SEV_FAILED = 0x5002       # destination → source: utf-8 reason
FWD_SEV_COMMIT = 0x5003      # source → destination: SEND_FINISH done, run the guest
FWD_SEV_ABORT = 0x5004       # source → destination: discard


@dataclasses.dataclass
class MigrationParameters:
    """QEMU's migration parameters (qapi MigrationParameters) that this engine honours."""

    downtime_limit: int = 300                 # ms
    max_bandwidth: int = 128 << 20            # bytes/s; 0 = unlimited
    multifd_channels: int = 2
    throttle_trigger_threshold: int = 50      # %
    cpu_throttle_initial: int = 20            # %
    cpu_throttle_increment: int = 10          # %
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99                # %
    sev_pdh: str = ""
    sev_plat_cert: str = ""
    sev_amd_cert: str = ""
    commit_timeout: float = 60.0              # s: how long either side waits for the other's verdict

    def qmp(self) -> dict:
        out = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("commit-timeout")
        return out


@dataclasses.dataclass
class MigrationCapabilities:
    events: bool = False
    auto_converge: bool = False
    multifd: bool = False
    return_path: bool = True
    zero_blocks: bool = False
    pause_before_switchover: bool = False

    def qmp(self) -> list[dict]:
        return [{"capability": f.name.replace("_", "-"), "state": getattr(self, f.name)}
                for f in dataclasses.fields(self)]


# One digest record per encrypted page: tag, offset, packet header (IV and MAC bind the payload).
_ENC_DIGEST = np.dtype([("tag", "S1"), ("offset", ">u8"), ("hdr", "u1", (52,))])


class _Digest:
    """The record digest both ends keep (see module docstring). It depends on the sequence of records
    only, never on how either side batches them: the block is named when it changes, and every page
    contributes a fixed-format entry."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._block: str | None = None
        self._entries = np.empty(0, _ENC_DIGEST)   # reused: one entry per encrypted page of a call

    def _name(self, block: str) -> None:
        if block != self._block:
            self._h.update(b"N%s\0" % block.encode())
            self._block = block

    def page(self, block: str, offset: int, data) -> None:
        self._name(block)
        self._h.update(b"P%d\0" % offset)
        self._h.update(data)

    def zero(self, block: str, offset: int) -> None:
        self._name(block)
        self._h.update(b"Z%d\0" % offset)

    def encrypted(self, block: str, offsets: np.ndarray, hdrs: np.ndarray) -> None:
        self._name(block)
        n = len(offsets)
        if len(self._entries) < n:
            self._entries = np.empty(n, _ENC_DIGEST)
            self._entries["tag"] = b"E"
        entries = self._entries[:n]
        entries["offset"] = offsets
        entries["hdr"] = hdrs
        self._h.update(entries)

    def context(self, ctx: S.SevContext) -> None:
        self._h.update(b"C%d\0" % ctx.policy)
        self._h.update(ctx.pdh)
        self._h.update(ctx.session)

    def vmsa(self, vcpu: int, hdr: bytes) -> None:
        self._h.update(b"V%d\0" % vcpu)
        self._h.update(hdr)

    def bitmap(self, block: str, entries) -> None:
        self._h.update(b"M%s\0" % block.encode())
        for start, npages, bitmap in entries:
            self._h.update(b"%d\0%d\0" % (start, npages))
            self._h.update(bytes(bitmap))

    def digest(self) -> bytes:
        return self._h.digest()


def combined_digest(digests: list[_Digest]) -> bytes:
    return hashlib.sha256(b"".join(d.digest() for d in digests)).digest()


def _write_msg(conn: Connection, kind: int, data: bytes = b"") -> None:
    # Commit/return-path messages follow the QEMU stream but are not part of it: a ``--save-stream``
    # tee (``write_control``) keeps them out of its copy, which must stay readable by analyze-migration.py.
    write = getattr(conn.wfile, "write_control", None) or conn.wfile.write
    write(MSG.pack(kind, len(data)) + data)


def _read_msg(conn: Connection) -> tuple[int, bytes]:
    head = conn.rfile.read(MSG.size)
    if len(head) != MSG.size:
        raise MigrationError("return path closed before the destination answered")
    kind, length = MSG.unpack(head)
    data = conn.rfile.read(length)
    if len(data) != length:
        raise MigrationError("return path closed in the middle of a message")
    return kind, data


class _Cancelled(MigrationError):
    pass


# =====================================================================================================
# Source
# =====================================================================================================
class _Encrypter:
    """SEND_UPDATE_DATA batches written into the wire layout of one stream.

    The pipeline writes a batch's packets into a ring of CONTINUE records (``S.RecordRing``) and each
    filled ring goes to the stream at once: a page's transport ciphertext is written once, by the
    pipeline, and read once, from cache, by the socket. Only the first record after a block change (or
    the one carrying the SEND_START context) takes the ordinary path.
    """

    def __init__(self, writer: S.StreamWriter, ops, digest: _Digest) -> None:
        self.writer, self.ops, self.digest = writer, ops, digest
        self._ring = S.RecordRing(writer, SEND_RING_RECORDS)
        self._hdr1 = np.empty((1, S.SEV_PACKET_HEADER_SIZE), dtype=np.uint8)
        self._trans1 = np.empty((1, PAGE_SIZE), dtype=np.uint8)

    def send(self, block, pages: np.ndarray, context: S.SevContext | None = None) -> None:
        offsets = pages.astype(np.uint64) * np.uint64(PAGE_SIZE)
        ring, w = self._ring, self.writer
        if context is not None or not ring.begin(block.idstr, offsets):   # the record names the block
            self.ops.send_pages(block, pages[:1], self._hdr1, self._trans1)
            w.sev_encrypted_pages(block.idstr, offsets[:1], self._hdr1, self._trans1, context)
            w.check()
            if context is not None:  # digested where it is written, as the destination meets it there
                self.digest.context(context)
            self.digest.encrypted(block.idstr, offsets[:1], self._hdr1)
            pages, offsets = pages[1:], offsets[1:]
            if not len(pages):
                return
            if not ring.begin(block.idstr, offsets):
                raise RuntimeError("the stream refused a CONTINUE record right after naming the block")

        def drain(start: int, stop: int) -> None:
            ring.put(start, stop)
            self.digest.encrypted(block.idstr, offsets[start:stop], ring.hdr[:stop - start])

        self.ops.send_pages(block, pages, ring.hdr, ring.trans, on_slice=drain)


class _ChannelSender(threading.Thread):
    """One multifd-like page channel: encrypts batches (SEND_UPDATE_DATA) and writes their records."""

    def __init__(self, index: int, conn: Connection, ops, blocks: dict[str, int]) -> None:
        super().__init__(name=f"mig-send-ch{index}", daemon=True)
        self.conn = conn
        self.ops = ops
        self.writer = S.StreamWriter(conn.wfile, continuation=True)
        self.writer.ram_mem_size(list(blocks.items()))   # each channel stream announces the blocks
        self.digest = _Digest()
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.pages = 0
        self.encrypter = _Encrypter(self.writer, ops, self.digest)

    def run(self) -> None:
        # After a failure the thread keeps consuming (and discarding) until the final None: a producer
        # that put an item or a "sync" after the failure must never block in put() or queue.join().
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    if self.error is None:
                        self.writer.flush()
                    return
                if self.error is not None:
                    continue
                if item == "sync":
                    self.writer.ram_eos()
                    self.writer.flush()
                    self.writer.check()
                    continue
                block, pages = item
                self.encrypter.send(block, pages)
                self.pages += len(pages)
            except BaseException as err:  # noqa: BLE001 — reported to the migration thread
                self.error = self.error or err
                if item is None:
                    return
            finally:
                self.queue.task_done()

    @property
    def transferred(self) -> int:
        return self.writer.transferred


class OutgoingMigration:
    """One outgoing migration of ``vm`` over ``conns`` (main connection first, then page channels).

    ``run()`` blocks until the migration has completed, failed or been cancelled and returns the final
    ``info()``; call it on a thread of its own for an asynchronous migration. ``on_event(name, data)`` is
    called for MIGRATION and MIGRATION_PASS (when the ``events`` capability is on).
    """

    def __init__(self, vm: VirtualMachine, conns: list[Connection], params: MigrationParameters | None = None,
                 caps: MigrationCapabilities | None = None, *, on_event: Callable[[str, dict], None] | None = None,
                 on_pass: Callable[[dict], None] | None = None,
                 on_progress: Callable[[int, int, int], None] | None = None, file_mode: bool = False,
                 verify: bool = True) -> None:
        self.vm = vm
        self.verify = verify
        self._on_progress = on_progress
        self.conns = conns
        self.params = params or MigrationParameters()
        self.caps = caps or MigrationCapabilities()
        self.ops = ops_for(vm)
        self.file_mode = file_mode
        self._on_event = on_event
        self._on_pass = on_pass
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self.status = "none"
        self.error_desc: str | None = None
        self.passes: list[dict] = []
        self.digest_at_switchover: str | None = None
        # QEMU counters (qapi MigrationStats) and times (ms)
        self.start_time = time.monotonic()
        self.setup_time = 0
        self.total_time = 0
        self.downtime = 0
        self.expected_downtime = 0
        self.dirty_sync_count = 0
        self.duplicate = 0
        self.normal = 0
        self.pages_private = 0
        self.pages_shared = 0
        self.dirty_pages_rate = 0
        self.mbps = 0.0
        self.pages_per_second = 0
        self.remaining_pages = 0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.throttle = 0
        self._bitmaps: dict[str, np.ndarray] = {}
        self._channel_bytes_queued = 0

    # -- QMP view ----------------------------------------------------------------------------------------
    def _set_status(self, status: str) -> None:
        with self._lock:
            self.status = status
        log.info("migration %s", status)
        if self._on_event and self.caps.events:
            self._on_event("MIGRATION", {"status": status})

    @property
    def transferred(self) -> int:
        total = self.writer.transferred if hasattr(self, "writer") else 0
        return total + sum(c.transferred for c in getattr(self, "channels", []))

    def info(self) -> dict:
        """query-migrate's MigrationInfo, QEMU's field names and formulas (qemu-migration.md §4.1)."""
        with self._lock:
            status = self.status
        if status == "none":
            return {}
        now = time.monotonic()
        total_time = self.total_time if status in ("completed", "failed", "cancelled") else \
            int((now - self.start_time) * 1000)
        ram_total = self.vm.memory.total_pages * PAGE_SIZE
        info = {
            "status": status,
            "total-time": total_time,
            "setup-time": self.setup_time,
            "ram": {
                "transferred": self.transferred,
                "remaining": self.remaining_pages * PAGE_SIZE,
                "total": ram_total,
                "duplicate": self.duplicate,
                "skipped": 0,
                "normal": self.normal,
                "normal-bytes": self.normal * PAGE_SIZE,
                "dirty-pages-rate": self.dirty_pages_rate,
                "mbps": round(self.mbps, 3),
                "dirty-sync-count": self.dirty_sync_count,
                "postcopy-requests": 0,
                "page-size": PAGE_SIZE,
                "multifd-bytes": sum(c.transferred for c in getattr(self, "channels", [])),
                "pages-per-second": self.pages_per_second,
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
                "postcopy-bytes": 0,
            },
            "sev": {"pages-encrypted": self.pages_private, "pages-shared": self.pages_shared},
        }
        if status == "active":
            info["expected-downtime"] = self.expected_downtime
        if status == "completed":
            info["downtime"] = self.downtime
        if self.throttle:
            info["cpu-throttle-percentage"] = self.throttle
        if self.error_desc:
            info["error-desc"] = self.error_desc
        if self.digest_at_switchover:
            info["x-guest-digest"] = self.digest_at_switchover
        return info

    def cancel(self) -> None:
        """migrate_cancel: the migration thread notices at the next batch and rolls back."""
        if self.status in ("setup", "active", "device"):
            self._set_status("cancelling")
        self._cancel.set()
        for c in self.conns:
            c.shutdown()

    # -- the migration thread ------------------------------------------------------------------------------
    def run(self) -> dict:
        self._set_status("setup")
        self._verify_digest = None
        try:
            self._setup()
            self._set_status("active")
            self._precopy()
            self._stop_and_copy()
            self._commit()
        except BaseException as err:  # noqa: BLE001 — every failure ends in the same rollback
            self._rollback(err)
        finally:
            self.total_time = self.total_time or int((time.monotonic() - self.start_time) * 1000)
            self._close()
        return self.info()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled("migration cancelled")

    def _setup(self) -> None:
        vm = self.vm
        if vm.state != RunState.RUNNING and vm.state != RunState.PAUSED:
            raise MigrationError(f"cannot migrate a VM in state {vm.state.value}")
        self._resume_after_failure = vm.state == RunState.RUNNING
        blocks = {b.idstr: b.used_length for b in vm.memory.blocks}
        self.writer = S.StreamWriter(self.conns[0].wfile)
        self.main_digest = _Digest()
        self.context = self.ops.save_setup(self.params)          # SEND_START (SEV) or nothing
        self._context_pending = self.context is not None   # digested where it is written (first private page)
        channel_conns = self.conns[1:]
        self.channels = [_ChannelSender(i + 1, c, self.ops, blocks) for i, c in enumerate(channel_conns)]
        for ch in self.channels:
            ch.start()
        w = self.writer
        w.write_header()
        w.section_start(RAM_SECTION_ID, *RAM_SECTION)
        w.ram_mem_size(list(blocks.items()))
        self._end_chunk()
        for block in vm.memory.blocks:                          # the first pass sends everything
            bitmap = np.zeros((block.npages + 63) // 64, dtype=np.uint64)
            csev.bitmap_set_range(bitmap, 0, block.npages)
            self._bitmaps[block.idstr] = bitmap
        for block in vm.memory.blocks:                          # start dirty logging from a clean log
            vm.memory.sync_dirty(block, np.zeros_like(self._bitmaps[block.idstr]))
        self.remaining_pages = vm.memory.total_pages
        self.setup_time = int((time.monotonic() - self.start_time) * 1000)

    def _sync_channels(self) -> None:
        """Every channel ends its chunk (EOS) and has written everything queued before it."""
        for ch in self.channels:
            ch.queue.put("sync")
        for ch in self.channels:
            ch.queue.join()
            if ch.error:
                raise MigrationError(f"page channel {ch.name} failed: {ch.error}") from ch.error

    def _end_chunk(self) -> None:
        """EOS on the main stream and a sync on every channel; the destination meets them at a barrier."""
        self._sync_channels()
        self.writer.ram_eos()
        self.writer.section_footer(RAM_SECTION_ID)
        self.writer.flush()
        self.writer.check()

    # -- sending pages -----------------------------------------------------------------------------------
    def _rate_limit(self, window: dict) -> None:
        limit = self.params.max_bandwidth
        if limit <= 0:
            return
        sent = self._rate_bytes() - window["bytes"]
        budget = limit * BUFFER_DELAY
        if sent >= budget:
            wait = window["start"] + sent / limit - time.monotonic()
            if wait > 0:
                self._cancel.wait(wait)
            window["start"], window["bytes"] = time.monotonic(), self._rate_bytes()

    def _rate_bytes(self) -> int:
        """Bytes charged to max-bandwidth: the main stream's plus every batch handed to a page channel,
        counted when queued (a channel writes later; counting its bytes only once written let the
        queued backlog, and whatever it flushed during a wait, escape the limit)."""
        return self.writer.transferred + self._channel_bytes_queued

    def _send_pass(self, final: bool) -> int:
        """Send every page of the migration bitmaps; returns the number of pages sent."""
        vm, w = self.vm, self.writer
        window = {"start": time.monotonic(), "bytes": self._rate_bytes()}
        sent = 0
        rr = 0
        total = sum(csev.bitmap_count(b) for b in self._bitmaps.values())
        pass_no = len(self.passes) + 1
        progress = self._on_progress or (lambda *_: None)
        progress(pass_no, 0, total)
        for block in vm.memory.blocks:
            bitmap = self._bitmaps[block.idstr]
            private = np.empty_like(bitmap)
            shared = np.empty_like(bitmap)
            self.ops.classify(block, bitmap, private, shared)
            bitmap[:] = 0
            shared_pages = csev.bitmap_extract(shared, block.npages)
            private_pages = csev.bitmap_extract(private, block.npages)
            frames = vm.host.dram.frames
            for first in range(0, len(shared_pages), BATCH_PAGES):
                self._check_cancel()
                pages = shared_pages[first:first + BATCH_PAGES]
                data = frames[block.frames[pages].astype(np.int64)]
                nonzero = data.any(axis=1)
                for page, page_data, nz in zip(pages.tolist(), data, nonzero.tolist()):
                    offset = page * PAGE_SIZE
                    if nz:
                        w.ram_page(block.idstr, offset, page_data)
                        self.main_digest.page(block.idstr, offset, page_data)
                    else:
                        w.ram_zero_page(block.idstr, offset)
                        self.main_digest.zero(block.idstr, offset)
                w.check()
                self.duplicate += int(len(pages) - nonzero.sum())
                self.normal += int(nonzero.sum())
                self.pages_shared += len(pages)
                sent += len(pages)
                progress(pass_no, sent, total)
                self._rate_limit(window)
            for first in range(0, len(private_pages), BATCH_PAGES):
                self._check_cancel()
                pages = private_pages[first:first + BATCH_PAGES]
                if self.channels:
                    rest = pages
                    if self._context_pending:   # the SEND_START context rides the main stream, with one page
                        self._send_private_on_main(block, pages[:1])
                        self.writer.flush()     # now: the channels' pages wait for RECEIVE_START on the far end
                        rest = pages[1:]
                    if len(rest):
                        ch = self.channels[rr % len(self.channels)]
                        rr += 1
                        if ch.error:
                            raise MigrationError(f"page channel {ch.name} failed: {ch.error}") from ch.error
                        ch.queue.put((block, rest))
                        self._channel_bytes_queued += len(rest) * S.ENC_PAGE_RECORD_SIZE
                else:
                    self._send_private_on_main(block, pages)
                self.normal += len(pages)
                self.pages_private += len(pages)
                sent += len(pages)
                progress(pass_no, sent, total)
                self._rate_limit(window)
        return sent

    def _send_private_on_main(self, block, pages: np.ndarray) -> None:
        if not hasattr(self, "_encrypter"):
            self._encrypter = _Encrypter(self.writer, self.ops, self.main_digest)
        self._encrypter.send(block, pages, self.context if self._context_pending else None)
        self._context_pending = False

    def _sync(self) -> int:
        """migration_bitmap_sync: dirty log first (fetch-and-clear), encryption state after (classify)."""
        newly = 0
        for block in self.vm.memory.blocks:
            newly += self.vm.memory.sync_dirty(block, self._bitmaps[block.idstr])
        self.dirty_sync_count += 1
        self.remaining_pages = sum(csev.bitmap_count(b) for b in self._bitmaps.values())
        return newly

    # -- pre-copy --------------------------------------------------------------------------------------
    def _precopy(self) -> None:
        w = self.writer
        throttle_hits = 0
        for pass_no in range(1, MAX_PASSES + 1):
            self._check_cancel()
            t0, bytes0 = time.monotonic(), self.transferred
            w.section_part(RAM_SECTION_ID)
            sent = self._send_pass(final=False)
            self._end_chunk()
            elapsed = max(time.monotonic() - t0, 1e-6)
            pass_bytes = self.transferred - bytes0
            newly = self._sync()
            if self._on_event and self.caps.events:
                self._on_event("MIGRATION_PASS", {"pass": self.dirty_sync_count})
            # QEMU migration_update_counters: bandwidth in bytes/ms, threshold = bw × downtime-limit.
            bandwidth = pass_bytes / (elapsed * 1000)
            threshold = bandwidth * self.params.downtime_limit
            pending = self.remaining_pages * PAGE_SIZE
            self.mbps = pass_bytes * 8 / elapsed / 1e6
            self.pages_per_second = int(sent / elapsed)
            self.dirty_pages_rate = int(newly / elapsed)
            self.expected_downtime = int(pending / bandwidth) if bandwidth else 0
            self.precopy_bytes = self.transferred
            record = {"pass": pass_no, "pages": sent, "bytes": pass_bytes, "seconds": elapsed,
                      "dirty_pages": newly, "mbps": self.mbps, "throttle": self.throttle}
            self.passes.append(record)
            if self._on_pass:
                self._on_pass(record)
            log.info("pass %d: %d pages in %.3f s (%.0f Mbit/s), %d dirtied", pass_no, sent, elapsed,
                     self.mbps, newly)
            if pending <= threshold:
                return
            if self.caps.auto_converge:
                throttle_hits = self._auto_converge(newly * PAGE_SIZE, pass_bytes, throttle_hits)
        raise MigrationError(f"did not converge in {MAX_PASSES} passes")

    def _auto_converge(self, bytes_dirty: int, bytes_xfer: int, hits: int) -> int:
        """migration_trigger_throttle: dirtying > threshold% of transfer on two syncs → throttle up."""
        if bytes_dirty > bytes_xfer * self.params.throttle_trigger_threshold / 100:
            hits += 1
            if hits >= 2:
                if self.throttle == 0:
                    self.throttle = self.params.cpu_throttle_initial
                else:
                    self.throttle = min(self.throttle + self.params.cpu_throttle_increment,
                                        self.params.max_cpu_throttle)
                if self.vm.workload:
                    self.vm.workload.set_throttle(self.throttle)
                log.info("auto-converge: vCPU throttle %d%%", self.throttle)
                hits = 0
        return hits

    # -- stop and copy ------------------------------------------------------------------------------------
    def _stop_and_copy(self) -> None:
        vm, w = self.vm, self.writer
        self._downtime_start = time.monotonic()
        before = self.transferred
        vm.pause(RunState.FINISH_MIGRATE)
        self._sync()
        if vm.workload:
            vm.workload.set_throttle(0)
        w.section_end(RAM_SECTION_ID)
        t0, bytes0 = time.monotonic(), self.transferred
        sent = self._send_pass(final=True)
        self._sync_channels()
        for block, entries in self.ops.state_map():
            w.sev_encrypted_bitmap(block.idstr, entries)
            self.main_digest.bitmap(block.idstr, entries)
        w.ram_eos()
        w.section_footer(RAM_SECTION_ID)
        vmsas = self.ops.send_vmsas()                   # SEV-ES: SEND_UPDATE_VMSA per vCPU
        for vcpu, (hdr, trans) in enumerate(vmsas):
            w.section_full(VMSA_SECTION_ID + vcpu, VMSA_SECTION[0], vcpu, VMSA_SECTION[1])
            w.put_be32(len(hdr))
            w.put_bytes(hdr)
            w.put_be32(len(trans))
            w.put_bytes(trans)
            w.section_footer(VMSA_SECTION_ID + vcpu)
            self.main_digest.vmsa(vcpu, hdr)
        w.write_eof()
        for ch in self.channels:
            ch.queue.put(None)
        for ch in self.channels:
            ch.join()
            if ch.error:
                raise MigrationError(f"page channel {ch.name} failed: {ch.error}") from ch.error
        self.digest = combined_digest([self.main_digest] + [c.digest for c in self.channels])
        vmdesc = S.default_vmdesc("pc-q35-sev", [_vmsa_vmdesc(vcpu) for vcpu in range(len(vmsas))])
        if self.file_mode:
            vmdesc["pysev"] = {"record-sha256": self.digest.hex()}
        w.write_vmdesc(vmdesc)
        w.flush()
        w.check()
        self.remaining_pages = 0
        self.downtime_bytes = self.transferred - before
        elapsed = max(time.monotonic() - t0, 1e-6)
        self.passes.append({"pass": len(self.passes) + 1, "pages": sent, "bytes": self.transferred - bytes0,
                            "seconds": elapsed, "dirty_pages": 0, "mbps": (self.transferred - bytes0) * 8 / elapsed / 1e6,
                            "throttle": self.throttle, "stop_and_copy": True})

    def _can_digest(self) -> bool:
        from pysev.firmware.sev.abi import Policy
        return not (self.vm.sev_enabled and self.vm.policy & Policy.NODBG)

    # -- commit ------------------------------------------------------------------------------------------
    def _commit(self) -> None:
        main = self.conns[0]
        if self.file_mode:
            main.sync()
            # The file now holds the guest: the source must not run it again (SEND_FINISH), as after a
            # network migration. The restoring side checks the record digest stored in the trailer.
            self.ops.commit()
            self._committed = True
            self._finish_ok()
            return
        main.set_timeout(self.params.commit_timeout)   # a silent peer is a failure, not a hang
        try:
            kind, data = _read_msg(main)
        except TimeoutError:
            raise MigrationError(f"destination did not confirm within {self.params.commit_timeout:.0f} s") from None
        except OSError as err:
            raise MigrationError(f"return path failed: {err}") from None
        if kind == RP_SEV_FAILED:
            raise MigrationError(f"destination rejected the migration: {data.decode(errors='replace')}")
        if kind != RP_SEV_RECEIVED or len(data) != 32:
            raise MigrationError(f"unexpected return-path message {kind:#x}")
        if data != self.digest:
            raise MigrationError("destination's digest of the received stream differs from what was sent "
                                 "(corrupted in transit)")
        self.ops.commit()                         # SEND_FINISH: from here on the source cannot run the guest
        self._committed = True
        _write_msg(main, FWD_SEV_COMMIT)
        self._finish_ok()

    def _finish_ok(self) -> None:
        self.downtime = int((time.monotonic() - self._downtime_start) * 1000)
        self.total_time = int((time.monotonic() - self.start_time) * 1000)
        if self.verify and self._can_digest():
            # Memory has been frozen since the pause, so this is the guest as it was at switchover;
            # taken after the downtime window so verification does not inflate the measured downtime.
            self.digest_at_switchover = self.vm.digest()
        self.vm.set_state(RunState.POSTMIGRATE)
        if self.vm.workload:
            self.vm.workload.stop()
        self._set_status("completed")

    def _rollback(self, err: BaseException) -> None:
        if getattr(self, "_committed", False):
            # Past SEND_FINISH the guest is SENT: it must never run here again (the destination may
            # already run it). Fail without resuming; nothing to cancel.
            commit = "SEND_FINISH" if self.vm.sev_enabled else "the commit"
            self.error_desc = f"failed after {commit} (the source cannot resume the guest): {err}"
            log.warning("migration failed after commit: %s", err)
            if self.vm.state != RunState.POSTMIGRATE:
                self.vm.set_state(RunState.POSTMIGRATE)
            if self.vm.workload:
                try:
                    self.vm.workload.stop()
                except RuntimeError:
                    pass
            self._set_status("failed")
            return
        cancelled = isinstance(err, _Cancelled) or self._cancel.is_set()
        self.error_desc = None if cancelled else str(err)
        if not cancelled and not self.file_mode and not str(err).startswith("destination rejected"):
            reason = self._peer_reason()
            if reason:
                self.error_desc = f"destination rejected the migration: {reason} (source saw: {err})"
        if not cancelled:
            log.warning("migration failed: %s", err, exc_info=not isinstance(err, (MigrationError, OSError)))
        try:
            _write_msg(self.conns[0], FWD_SEV_ABORT)
        except (OSError, ValueError, AttributeError):
            pass
        for ch in getattr(self, "channels", []):
            ch.error = ch.error or err
            ch.queue.put(None)
        self.ops.cancel()                         # SEND_CANCEL: back to RUNNING, memory untouched
        if self.vm.state == RunState.FINISH_MIGRATE or (self.vm.state == RunState.RUNNING and self.vm.workload):
            if self._resume_after_failure if hasattr(self, "_resume_after_failure") else True:
                self.vm.resume()
            else:
                self.vm.set_state(RunState.PAUSED)
        if self.vm.workload:
            self.vm.workload.set_throttle(0)
        self._set_status("cancelled" if cancelled else "failed")

    def _peer_reason(self) -> str | None:
        """After a local failure (e.g. a broken pipe): the destination's RP_SEV_FAILED reason, if it sent one."""
        main = self.conns[0] if self.conns else None
        if main is None or main.rfile is None:
            return None
        try:
            main.set_timeout(1.0)
            kind, data = _read_msg(main)
        except (OSError, ValueError, MigrationError):
            return None
        return data.decode(errors="replace") if kind == RP_SEV_FAILED else None

    def _close(self) -> None:
        for c in self.conns:
            c.close()


# =====================================================================================================
# Destination
# =====================================================================================================
class _ChannelReceiver(threading.Thread):
    """Applies one page channel's batches; meets the main stream at every chunk boundary (barrier)."""

    def __init__(self, index: int, conn: Connection, incoming: IncomingMigration) -> None:
        super().__init__(name=f"mig-recv-ch{index}", daemon=True)
        self.index = index
        self.conn = conn
        self.incoming = incoming
        self.digest = _Digest()
        self.error: BaseException | None = None

    def run(self) -> None:
        inc = self.incoming
        try:
            reader = S.StreamReader(self.conn.rfile, READER_LIMITS, ram_blocks=inc.blocks, continuation=True)
            batch = S.EncryptedBatch(BATCH_PAGES, zero_copy=True)
            chunk = 0
            while True:
                chunk += 1
                for rec in reader.ram_records(batch):
                    if isinstance(rec, S.EncryptedPages):
                        inc.context_ready.wait()
                        if inc.failed.is_set():
                            return
                        inc.apply_encrypted(rec, self.digest, f"channel {self.index}", reader.offset)
                    elif not isinstance(rec, (S.Eos, S.MemSize)):
                        raise MigrationError(f"channel {self.index}: unexpected {type(rec).__name__} record")
                if inc.barrier_wait() is None or inc.final_chunk == chunk:
                    return
        except BaseException as err:  # noqa: BLE001
            self.error = err
            inc.fail(err)


class IncomingMigration:
    """The destination of one migration: loads the stream into ``vm`` (created with ``incoming=True``),
    answers with the record digest, and runs the guest only when the source commits."""

    def __init__(self, vm: VirtualMachine, conns: list[Connection], *, commit_timeout: float = 60.0,
                 on_event: Callable[[str, dict], None] | None = None, file_mode: bool = False,
                 verify: bool = False) -> None:
        self.vm = vm
        self.verify = verify
        self.guest_digest: str | None = None
        self.conns = conns
        self.ops = ops_for(vm)
        self.commit_timeout = commit_timeout
        self.file_mode = file_mode
        self._on_event = on_event
        self.blocks = {b.idstr: b.used_length for b in vm.memory.blocks}
        self._block_by_id = {b.idstr: b for b in vm.memory.blocks}
        self.context_ready = threading.Event()
        self.failed = threading.Event()
        self._error: BaseException | None = None
        self.status = "active"
        self.error_desc: str | None = None
        self.pages_private = 0
        self.pages_shared = 0
        self._barrier = threading.Barrier(len(conns))
        # Number of the END section's chunk, set by the main stream before it waits at that chunk's
        # barrier: a channel that has passed barrier k reads it as k only if chunk k was the last
        # (a plain flag could already describe the main stream's *next* chunk).
        self.final_chunk: int | None = None
        self._apply_lock = threading.Lock()

    def fail(self, err: BaseException) -> None:
        first = self._error is None
        if first:
            self._error = err
            if not self.file_mode and self.conns and self.conns[0].wfile is not None:
                try:  # tell the source why (its error-desc), before the connections are cut
                    _write_msg(self.conns[0], RP_SEV_FAILED, str(err).encode()[:4096])
                except (OSError, ValueError):
                    pass
        self.failed.set()
        self.context_ready.set()
        self._barrier.abort()
        for c in self.conns:
            c.shutdown()

    def barrier_wait(self) -> int | None:
        try:
            return self._barrier.wait(timeout=self.commit_timeout)
        except threading.BrokenBarrierError:
            return None

    def apply_encrypted(self, rec: S.EncryptedPages, digest: _Digest, where: str, offset: int) -> None:
        block = self._block_by_id[rec.block]
        pages = (rec.offsets // np.uint64(PAGE_SIZE)).astype(np.int64)
        statuses = self.ops.receive_pages(block, pages, rec.hdrs, rec.trans)
        bad = np.flatnonzero(statuses)
        if bad.size:
            from pysev.firmware.status import SevStatus
            i = int(bad[0])
            raise MigrationError(
                f"RECEIVE_UPDATE_DATA rejected the encrypted page at {rec.block}+{int(rec.offsets[i]):#x} "
                f"({SevStatus(int(statuses[i])).name}; {where}, batch ending at stream offset {offset}); "
                f"{bad.size} of {rec.count} pages in the batch rejected")
        digest.encrypted(rec.block, rec.offsets, rec.hdrs)
        with self._apply_lock:
            self.pages_private += rec.count

    def run(self) -> dict:
        """Load, verify, answer, wait for the verdict. Returns {"status", "error-desc"?}."""
        receivers = [_ChannelReceiver(i, c, self) for i, c in enumerate(self.conns[1:], start=1)]
        for r in receivers:
            r.start()
        main_digest = _Digest()
        try:
            trailer = self._load_main(main_digest)
            for r in receivers:
                r.join()
                if r.error:
                    raise r.error
            if self.failed.is_set():
                raise self._error
            digest = combined_digest([main_digest] + [r.digest for r in receivers])
            self._verdict(digest, trailer)
        except BaseException as err:  # noqa: BLE001
            self.fail(err)
            self._discard(err)
        finally:
            for c in self.conns:
                c.close()
        return {"status": self.status, **({"error-desc": self.error_desc} if self.error_desc else {})}

    def _load_main(self, digest: _Digest) -> dict | None:
        reader = S.StreamReader(self.conns[0].rfile, READER_LIMITS, ram_blocks=self.blocks)
        reader.read_header()
        batch = S.EncryptedBatch(BATCH_PAGES, zero_copy=True)
        frames = self.vm.host.dram.frames
        chunk = 0
        while True:
            section = reader.next_section()
            if isinstance(section, S.Eof):
                return reader.read_vmdesc()
            if isinstance(section, (S.Configuration, S.Footer)):
                continue
            if (isinstance(section, S.SectionHeader) and section.kind == S.QEMU_VM_SECTION_FULL
                    and section.idstr == VMSA_SECTION[0]):
                self._load_vmsa(reader, section, digest)
                continue
            if not isinstance(section, S.SectionHeader) or section.idstr != "ram":
                raise MigrationError(f"unexpected section {section!r} at stream offset {reader.offset}")
            final = section.kind == S.QEMU_VM_SECTION_END
            for rec in reader.ram_records(batch):
                if isinstance(rec, S.Page):
                    block = self._block_by_id[rec.block]
                    frames[int(block.frames[rec.offset // PAGE_SIZE])] = np.frombuffer(rec.data, dtype=np.uint8)
                    digest.page(rec.block, rec.offset, rec.data)
                    self.pages_shared += 1
                elif isinstance(rec, S.Zero):
                    block = self._block_by_id[rec.block]
                    frames[int(block.frames[rec.offset // PAGE_SIZE])] = 0
                    digest.zero(rec.block, rec.offset)
                    self.pages_shared += 1
                elif isinstance(rec, S.EncryptedPages):
                    if rec.context is not None:
                        self.ops.load_setup(rec.context)          # RECEIVE_START
                        digest.context(rec.context)
                        self.context_ready.set()
                    self.apply_encrypted(rec, digest, "main stream", reader.offset)
                elif isinstance(rec, S.EncryptedBitmap):
                    entries = [(e.start_gpa, e.npages, e.bitmap) for e in rec.entries]
                    self.ops.load_state_map(self._block_by_id[rec.block], entries)
                    digest.bitmap(rec.block, entries)
                elif isinstance(rec, S.MemSize):
                    continue
                elif isinstance(rec, S.Eos):
                    chunk += 1
                    if final:
                        self.final_chunk = chunk
                    if len(self.conns) > 1 and self.barrier_wait() is None:
                        raise self._error or MigrationError("a page channel failed")
            if self.failed.is_set():
                raise self._error

    def _load_vmsa(self, reader: S.StreamReader, section: S.SectionHeader, digest: _Digest) -> None:
        """One ``sev-es-vmsa`` section: bounded fields, then RECEIVE_UPDATE_VMSA."""
        if section.version_id != VMSA_SECTION[1]:
            raise MigrationError(f"sev-es-vmsa section version {section.version_id} (expected {VMSA_SECTION[1]}) "
                                 f"at stream offset {reader.offset}")
        at = reader.offset
        hdr_len = reader.get_be32("VMSA hdr_len")
        if hdr_len != 52:
            raise MigrationError(f"sev-es-vmsa: hdr_len {hdr_len} (must be 52) at stream offset {at}")
        hdr = reader.get_bytes(hdr_len, "VMSA packet header")
        at = reader.offset
        trans_len = reader.get_be32("VMSA trans_len")
        if trans_len != PAGE_SIZE:
            raise MigrationError(f"sev-es-vmsa: trans_len {trans_len} (must be {PAGE_SIZE}) at stream offset {at}")
        trans = reader.get_bytes(trans_len, "VMSA transport data")
        self.ops.receive_vmsa(section.instance_id, hdr, trans)
        digest.vmsa(section.instance_id, hdr)

    def _verdict(self, digest: bytes, trailer: dict | None) -> None:
        main = self.conns[0]
        # Everything that can fail happens before we acknowledge: once the source has committed
        # (SEND_FINISH) it can never run the guest again, so after COMMIT only RECEIVE_FINISH and
        # starting the vCPUs remain.
        self.vm.prepare_incoming()
        if self.file_mode:
            expected = ((trailer or {}).get("pysev") or {}).get("record-sha256")
            if expected != digest.hex():
                raise MigrationError("the file's record digest does not match its contents (corrupted file)")
            self._run_guest()
            return
        _write_msg(main, RP_SEV_RECEIVED, digest)
        main.set_timeout(self.commit_timeout)
        try:
            kind, _ = _read_msg(main)
        except (TimeoutError, OSError, MigrationError) as err:
            # The source may or may not have committed; it never runs the guest again after SEND_FINISH,
            # and we run it only on COMMIT. Without a verdict we keep nothing (see docs: the one window).
            raise MigrationError(f"no commit from the source: {err}") from None
        if kind != FWD_SEV_COMMIT:
            raise MigrationError("the source aborted the migration")
        self._run_guest()

    def _run_guest(self) -> None:
        self.ops.finish()                                   # RECEIVE_FINISH
        from pysev.firmware.sev.abi import Policy
        # Past COMMIT nothing may fail: under NODBG (policy from the stream) there is no debug path to hash.
        if self.verify and not (self.vm.sev_enabled and self.vm.policy & Policy.NODBG):
            self.guest_digest = self.vm.digest()            # before its vCPUs change anything
        self.vm.incoming_complete()
        self.status = "completed"
        if self._on_event:
            self._on_event("MIGRATION", {"status": "completed"})

    def _discard(self, err: BaseException) -> None:
        self.error_desc = str(err)
        self.status = "failed"
        log.warning("incoming migration failed: %s", err)
        self.ops.abort()
        if self._on_event:
            self._on_event("MIGRATION", {"status": "failed"})
