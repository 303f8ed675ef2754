"""The source side of a live migration: the pre-copy loop, stop-and-copy and the commit (QEMU
``migration/migration.c`` and ``migration/ram.c``).

``OutgoingMigration.run``: setup (SEND_START through the ops, MEM_SIZE), then passes — each pass sends
every page of the migration bitmap (private pages as batched SEND_UPDATE_DATA records, shared pages in
the clear, zero shared pages as ZERO records), then syncs: the dirty log is fetched-and-cleared FIRST
and the page-encryption state is snapshotted AFTER (the ordering invariant documented in
``pysev.hv.memory``) — until the remaining bytes fit ``bandwidth × downtime-limit`` (QEMU's switchover
rule in ``migration_iteration_run``); auto-converge throttles the vCPUs by QEMU's
``migration_trigger_throttle``; then stop-and-copy, the page-encryption map, EOF and the commit.

Commit (never two runners, nothing lost): the destination verifies every record and answers on the
return path with the digest of what it applied (``pysev.migration.commit``); the source decides COMMIT
only if that digest equals the digest of what it sent, and from then on never runs the guest again
unless the destination proves it holds no copy. It sends COMMIT; the destination runs the guest and
answers DONE; the source issues SEND_FINISH. A COMMIT that cannot be confirmed is delivered again on new
connections (``commit.redeliver``); meanwhile both ends report ``x-commit-pending``. Any failure before
the decision ends in SEND_CANCEL, the source guest resumes with its memory untouched, and the source
tells the destination to discard what it holds (``docs/design.md``, "Commit").

The engine is SEV-agnostic: everything SEV-specific is behind ``pysev.migration.sev_ops``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np

import csev
from csev.packet import PAGE_SIZE
from pysev.hv.machine import RunState, VirtualMachine
from pysev.migration import stream
from pysev.migration.channels import BATCH_PAGES, ChannelSender, PageEncrypter
from pysev.migration.commit import Decision, Delivery, RecordDigest, combined_digest, exchange_decision, redeliver
from pysev.migration.sev_ops import MigrationError, ops_for
from pysev.migration.state import (
    MigrationCapabilities,
    MigrationParameters,
    MigrationStatus,
    StatusCell,
)
from pysev.migration.transport import Connection

log = logging.getLogger(__name__)

BUFFER_DELAY = 0.1  # QEMU's BUFFER_DELAY: the rate-limit and bandwidth window, seconds
MAX_PASSES = 10_000
RAM_SECTION_ID = 2
RAM_SECTION = (stream.RAM_SECTION_IDSTR, stream.RAM_SECTION_INSTANCE, stream.RAM_SECTION_VERSION)
#: SEV-ES: one FULL device section per vCPU after the RAM section, numbered from here.
VMSA_SECTION_ID = 3

_CANCELLABLE = frozenset({MigrationStatus.SETUP, MigrationStatus.ACTIVE})


class MigrationCancelledError(MigrationError):
    """migrate_cancel was called; the source guest keeps running."""


class OutgoingMigration:
    """One outgoing migration of ``vm`` over ``conns`` (main connection first, then page channels).

    ``run()`` blocks until the migration has completed, failed or been cancelled and returns the final
    ``info()``; call it on a thread of its own for an asynchronous migration. ``on_event(name, data)`` is
    called for MIGRATION and MIGRATION_PASS (when the ``events`` capability is on), ``on_pass(record)``
    after each pre-copy pass, ``on_progress(pass, sent, total)`` as pages go out. ``resume_connect(id)``
    opens a resume connection to the destination (``transport.tcp_resume``); without it a decision that
    cannot be confirmed on the main connection stays pending until ``redeliver`` or ``resolve_here``.
    """

    def __init__(
        self,
        vm: VirtualMachine,
        conns: list[Connection],
        params: MigrationParameters | None = None,
        caps: MigrationCapabilities | None = None,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        on_pass: Callable[[dict[str, Any]], None] | None = None,
        on_progress: Callable[[int, int, int], None] | None = None,
        file_mode: bool = False,
        verify: bool = True,
        resume_connect: Callable[[bytes], Connection] | None = None,
        max_passes: int = MAX_PASSES,
    ) -> None:
        self.max_passes = max_passes
        self.vm = vm
        self.conns = conns
        self.migration_id = conns[0].migration_id
        self._resume_connect = resume_connect
        self.params = params or MigrationParameters()
        self.caps = caps or MigrationCapabilities()
        self.ops = ops_for(vm)
        self.file_mode = file_mode
        self.verify = verify
        self._on_event = on_event
        self._on_pass = on_pass
        self._on_progress = on_progress
        self._cancel = threading.Event()
        self._status = StatusCell()
        self.error_desc: str | None = None
        self.passes: list[dict[str, Any]] = []
        self.digest_at_switchover: str | None = None
        # The wire: the main stream, then one sender thread per page channel.
        blocks = {b.idstr: b.used_length for b in vm.memory.blocks}
        self.writer = stream.StreamWriter(conns[0].output)
        self.main_digest = RecordDigest()
        self.channels = [ChannelSender(i, conn, self.ops, blocks) for i, conn in enumerate(conns[1:], start=1)]
        self._main_encrypter = PageEncrypter(self.writer, self.ops, self.main_digest)
        self._bitmaps: dict[str, np.ndarray] = {}
        self._channel_bytes_queued = 0
        self._next_channel = 0
        self.context: stream.SevContext | None = None
        self._context_pending = False  # the SEND_START context rides the first private page
        self.record_digest = b""  # of everything sent, at switchover
        # Whether a failure resumes the guest (it was running when the migration started).
        self._resume_after_failure = True
        #: COMMIT or ABORT, once taken (never changed); None before the end of the stream.
        self.decision: Decision | None = None
        # The whole stream went out: the destination may hold a verified guest waiting for the decision.
        self._destination_may_hold = False
        self._stop_delivery = threading.Event()
        self._delivery_lock = threading.Lock()  # one delivery of the decision at a time
        #: A background delivery of ABORT after a failure (joinable; None when not needed).
        self.abort_delivery: threading.Thread | None = None
        self._downtime_start = 0.0
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
        self._live_at = self._synced_at = time.monotonic()  # the live counters' last update, the last sync
        self._live_bytes = 0

    # -- QMP view ----------------------------------------------------------------------------------------
    @property
    def status(self) -> MigrationStatus:
        return self._status.value

    def _set_status(self, status: MigrationStatus) -> None:
        self._status.set(status)
        self._announce(status)

    def _announce(self, status: MigrationStatus) -> None:
        log.info("migration %s", status.value)
        if self._on_event and self.caps.events:
            self._on_event("MIGRATION", {"status": status.value})

    @property
    def transferred(self) -> int:
        return self.writer.transferred + sum(c.transferred for c in self.channels)

    def info(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo: QEMU's field names and formulas (``migration/migration.c``
        ``fill_source_migration_info``, ``populate_ram_info``)."""
        status = self.status
        if status == MigrationStatus.NONE:
            return {}
        total_time = self.total_time if status.finished else int((time.monotonic() - self.start_time) * 1000)
        info: dict[str, Any] = {
            "status": status.value,
            "total-time": total_time,
            "setup-time": self.setup_time,
            "ram": {
                "transferred": self.transferred,
                "remaining": self.remaining_pages * PAGE_SIZE,
                "total": self.vm.memory.total_pages * PAGE_SIZE,
                "duplicate": self.duplicate,
                "skipped": 0,
                "normal": self.normal,
                "normal-bytes": self.normal * PAGE_SIZE,
                "dirty-pages-rate": self.dirty_pages_rate,
                "mbps": round(self.mbps, 3),
                "dirty-sync-count": self.dirty_sync_count,
                "postcopy-requests": 0,
                "page-size": PAGE_SIZE,
                "multifd-bytes": sum(c.transferred for c in self.channels),
                "pages-per-second": self.pages_per_second,
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
                "postcopy-bytes": 0,
            },
            "sev": {"pages-encrypted": self.pages_private, "pages-shared": self.pages_shared},
        }
        if status == MigrationStatus.ACTIVE:
            info["expected-downtime"] = self.expected_downtime
        if status == MigrationStatus.COMPLETED:
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
        if self._status.set_if(_CANCELLABLE, MigrationStatus.CANCELLING):
            self._announce(MigrationStatus.CANCELLING)
        self._cancel.set()
        for conn in self.conns:
            conn.shutdown()

    # -- the migration thread ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._set_status(MigrationStatus.SETUP)
        try:
            self._setup()
            if not self._status.set_if(frozenset({MigrationStatus.SETUP}), MigrationStatus.ACTIVE):
                raise MigrationCancelledError("migration cancelled")
            self._announce(MigrationStatus.ACTIVE)
            self._precopy()
            self._stop_and_copy()
            self._commit()
        except BaseException as err:  # noqa: BLE001 — every failure ends in the same rollback
            self._rollback(err)
        finally:
            self.total_time = self.total_time or int((time.monotonic() - self.start_time) * 1000)
            for conn in self.conns:
                conn.close()
        return self.info()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelledError("migration cancelled")

    def _setup(self) -> None:
        vm = self.vm
        if vm.state != RunState.RUNNING and vm.state != RunState.PAUSED:
            raise MigrationError(f"cannot migrate a VM in state {vm.state.value}")
        self._resume_after_failure = vm.state == RunState.RUNNING
        self.context = self.ops.save_setup(self.params)  # SEND_START (SEV) or nothing
        self._context_pending = self.context is not None
        for channel in self.channels:
            channel.start()
        writer = self.writer
        writer.write_header()
        writer.section_start(RAM_SECTION_ID, *RAM_SECTION)
        writer.ram_mem_size([(b.idstr, b.used_length) for b in vm.memory.blocks])
        self._end_chunk()
        for block in vm.memory.blocks:  # the first pass sends everything
            bitmap = np.zeros((block.npages + 63) // 64, dtype=np.uint64)
            csev.bitmap_set_range(bitmap, 0, block.npages)
            self._bitmaps[block.idstr] = bitmap
        for block in vm.memory.blocks:  # start dirty logging from a clean log
            vm.memory.sync_dirty(block, np.zeros_like(self._bitmaps[block.idstr]))
        self.remaining_pages = vm.memory.total_pages
        self.setup_time = int((time.monotonic() - self.start_time) * 1000)

    def _sync_channels(self) -> None:
        """Every channel ends its chunk (EOS) and has written everything queued before it."""
        for channel in self.channels:
            channel.sync()
        for channel in self.channels:
            channel.queue.join()
            channel.raise_error()

    def _end_chunk(self) -> None:
        """EOS on the main stream and a sync on every channel; the destination meets them at a barrier."""
        self._sync_channels()
        self.writer.ram_eos()
        self.writer.section_footer(RAM_SECTION_ID)
        self.writer.flush()
        self.writer.check()

    # -- sending pages -----------------------------------------------------------------------------------
    def _rate_limit(self, window: dict[str, float]) -> None:
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

    def _send_pass(self) -> int:
        """Send every page of the migration bitmaps; returns the number of pages sent."""
        window = {"start": time.monotonic(), "bytes": float(self._rate_bytes())}
        sent = 0
        total = sum(csev.bitmap_count(b) for b in self._bitmaps.values())
        pass_no = len(self.passes) + 1
        progress = self._on_progress or (lambda *_: None)
        progress(pass_no, 0, total)
        for block in self.vm.memory.blocks:
            bitmap = self._bitmaps[block.idstr]
            private = np.empty_like(bitmap)
            shared = np.empty_like(bitmap)
            self.ops.classify(block, bitmap, private, shared)
            bitmap[:] = 0
            shared_pages = csev.bitmap_extract(shared, block.npages)
            private_pages = csev.bitmap_extract(private, block.npages)
            for first in range(0, len(shared_pages), BATCH_PAGES):
                self._check_cancel()
                sent += self._send_shared(block, shared_pages[first : first + BATCH_PAGES])
                progress(pass_no, sent, total)
                self._rate_limit(window)
                self._live_counters(total - sent)
            for first in range(0, len(private_pages), BATCH_PAGES):
                self._check_cancel()
                sent += self._send_private(block, private_pages[first : first + BATCH_PAGES])
                progress(pass_no, sent, total)
                self._rate_limit(window)
                self._live_counters(total - sent)
        return sent

    def _live_counters(self, left_in_pass: int) -> None:
        """query-migrate's live figures, every BUFFER_DELAY as QEMU's ``migration_update_counters``:
        remaining = pages of the migration bitmap not sent yet, mbps over the last interval,
        expected-downtime from it, dirty-pages-rate from the dirty log since the last sync."""
        now = time.monotonic()
        elapsed = now - self._live_at
        if elapsed < BUFFER_DELAY or self.vm.state == RunState.FINISH_MIGRATE:  # stop-and-copy: pass figures
            return
        moved = self.transferred - self._live_bytes
        self.mbps = moved * 8 / elapsed / 1e6
        bandwidth = moved / (elapsed * 1000)  # bytes/ms
        self.remaining_pages = left_in_pass
        self.expected_downtime = int(left_in_pass * PAGE_SIZE / bandwidth) if bandwidth else 0
        self.dirty_pages_rate = int(self.vm.memory.dirty_pending() / max(now - self._synced_at, 1e-6))
        self._live_at, self._live_bytes = now, self.transferred

    def _send_shared(self, block, pages: np.ndarray) -> int:
        """Shared pages in the clear on the main stream; all-zero ones as ZERO records."""
        writer, digest = self.writer, self.main_digest
        data = self.vm.read_shared_pages(block, pages)
        nonzero = data.any(axis=1)
        flags = cast(list[bool], nonzero.tolist())
        for page, page_data, is_nonzero in zip(pages.tolist(), data, flags, strict=True):
            offset = page * PAGE_SIZE
            if is_nonzero:
                writer.ram_page(block.idstr, offset, page_data)
                digest.page(block.idstr, offset, page_data)
            else:
                writer.ram_zero_page(block.idstr, offset)
                digest.zero(block.idstr, offset)
        writer.check()
        n_nonzero = int(nonzero.sum())
        self.duplicate += len(pages) - n_nonzero
        self.normal += n_nonzero
        self.pages_shared += len(pages)
        return len(pages)

    def _send_private(self, block, pages: np.ndarray) -> int:
        """Private pages through SEND_UPDATE_DATA: on the main stream, or handed to the next channel."""
        rest = pages
        if not self.channels or self._context_pending:
            # The SEND_START context rides the main stream with the first private page; with channels,
            # flush it now: their pages wait for RECEIVE_START on the far end.
            on_main = pages if not self.channels else pages[:1]
            self._main_encrypter.send(block, on_main, self.context if self._context_pending else None)
            self._context_pending = False
            if self.channels:
                self.writer.flush()
            rest = pages[len(on_main) :]
        if len(rest):
            channel = self.channels[self._next_channel % len(self.channels)]
            self._next_channel += 1
            channel.raise_error()
            channel.queue.put((block, rest))
            self._channel_bytes_queued += len(rest) * stream.ENC_PAGE_RECORD_SIZE
        self.normal += len(pages)
        self.pages_private += len(pages)
        return len(pages)

    def _sync(self) -> int:
        """migration_bitmap_sync: dirty log first (fetch-and-clear), encryption state after (classify)."""
        self._synced_at = time.monotonic()
        newly = 0
        for block in self.vm.memory.blocks:
            newly += self.vm.memory.sync_dirty(block, self._bitmaps[block.idstr])
        self.dirty_sync_count += 1
        self.remaining_pages = sum(csev.bitmap_count(b) for b in self._bitmaps.values())
        return newly

    # -- pre-copy --------------------------------------------------------------------------------------
    def _precopy(self) -> None:
        throttle_hits = 0
        for pass_no in range(1, self.max_passes + 1):
            self._check_cancel()
            t0, bytes0 = time.monotonic(), self.transferred
            self.writer.section_part(RAM_SECTION_ID)
            sent = self._send_pass()
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
            record = {
                "pass": pass_no,
                "pages": sent,
                "bytes": pass_bytes,
                "seconds": elapsed,
                "dirty_pages": newly,
                "mbps": self.mbps,
                "throttle": self.throttle,
            }
            self.passes.append(record)
            if self._on_pass:
                self._on_pass(record)
            log.info("pass %d: %d pages in %.3f s (%.0f Mbit/s), %d dirtied", pass_no, sent, elapsed, self.mbps, newly)
            if pending <= threshold:
                return
            if self.caps.auto_converge:
                throttle_hits = self._auto_converge(newly * PAGE_SIZE, pass_bytes, throttle_hits)
        raise MigrationError(f"did not converge in {self.max_passes} passes")

    def _auto_converge(self, bytes_dirty: int, bytes_xfer: int, hits: int) -> int:
        """migration_trigger_throttle: dirtying > threshold% of transfer on two syncs → throttle up."""
        if bytes_dirty > bytes_xfer * self.params.throttle_trigger_threshold / 100:
            hits += 1
            if hits >= 2:
                if self.throttle == 0:
                    self.throttle = self.params.cpu_throttle_initial
                else:
                    self.throttle = min(
                        self.throttle + self.params.cpu_throttle_increment, self.params.max_cpu_throttle
                    )
                if self.vm.workload:
                    self.vm.workload.set_throttle(self.throttle)
                log.info("auto-converge: vCPU throttle %d%%", self.throttle)
                hits = 0
        return hits

    # -- stop and copy ------------------------------------------------------------------------------------
    def _stop_and_copy(self) -> None:
        vm, writer = self.vm, self.writer
        self._downtime_start = time.monotonic()
        before = self.transferred
        vm.pause(RunState.FINISH_MIGRATE)
        self._sync()
        if vm.workload:
            vm.workload.set_throttle(0)
        writer.section_end(RAM_SECTION_ID)
        t0, bytes0 = time.monotonic(), self.transferred
        sent = self._send_pass()
        self._sync_channels()
        for block, entries in self.ops.state_map():
            writer.sev_encrypted_bitmap(block.idstr, entries)
            self.main_digest.bitmap(block.idstr, entries)
        writer.ram_eos()
        writer.section_footer(RAM_SECTION_ID)
        vmsas = self.ops.send_vmsas()  # SEV-ES: SEND_UPDATE_VMSA per vCPU
        for vcpu, (hdr, trans) in enumerate(vmsas):
            writer.sev_es_vmsa_section(VMSA_SECTION_ID + vcpu, vcpu, hdr, trans)
            self.main_digest.vmsa(vcpu, hdr)
        writer.write_eof()
        for channel in self.channels:
            channel.queue.put(None)
        for channel in self.channels:
            channel.join()
            channel.raise_error()
        self.record_digest = combined_digest([self.main_digest] + [c.digest for c in self.channels])
        vmdesc = stream.default_vmdesc("pc-q35-sev", [stream.vmsa_vmdesc(vcpu) for vcpu in range(len(vmsas))])
        if self.file_mode:
            vmdesc["pysev"] = {"record-sha256": self.record_digest.hex()}
        writer.write_vmdesc(vmdesc)
        self._destination_may_hold = True  # from the first byte of the flush on, it may reach RECEIVED
        writer.flush()
        writer.check()
        self.remaining_pages = 0
        self.downtime_bytes = self.transferred - before
        elapsed = max(time.monotonic() - t0, 1e-6)
        self.passes.append(
            {
                "pass": len(self.passes) + 1,
                "pages": sent,
                "bytes": self.transferred - bytes0,
                "seconds": elapsed,
                "dirty_pages": 0,
                "mbps": (self.transferred - bytes0) * 8 / elapsed / 1e6,
                "throttle": self.throttle,
                "stop_and_copy": True,
            }
        )
        if self._on_pass:
            self._on_pass(self.passes[-1])

    # -- commit ------------------------------------------------------------------------------------------
    def _commit(self) -> None:
        main = self.conns[0]
        if self.file_mode:
            main.sync()
            # The file now holds the guest: the source must not run it again (SEND_FINISH), as after a
            # network migration. The restoring side checks the record digest stored in the trailer.
            self.decision = Decision.COMMIT
            self.ops.commit()
            self._finish_ok()
            return
        main.set_timeout(self.params.commit_timeout)  # a silent peer is a failure, not a hang
        try:
            message = stream.read_return_message(main.input)
        except TimeoutError:
            raise MigrationError(f"destination did not confirm within {self.params.commit_timeout:.0f} s") from None
        except OSError as err:
            raise MigrationError(f"return path failed: {err}") from None
        except stream.StreamError as err:
            raise MigrationError(f"return path: {err}") from None
        if message.kind == stream.ReturnMessage.FAILED:
            self._destination_may_hold = False  # it discarded what it received
            raise MigrationError(f"destination rejected the migration: {message.reason}")
        if message.kind != stream.ReturnMessage.RECEIVED:
            raise MigrationError(f"unexpected return-path message {message.kind.name}")
        if message.data != self.record_digest:
            raise MigrationError(
                "destination's digest of the received stream differs from what was sent (corrupted in transit)"
            )
        # The decision. From here on the guest runs here again only if the destination proves it holds
        # no copy (UNKNOWN, DISCARDED) or an operator resolves it by hand.
        self.decision = Decision.COMMIT
        try:
            delivery = exchange_decision(main, Decision.COMMIT, self.params.commit_timeout)
        except (OSError, ValueError) as err:
            self.error_desc = f"COMMIT not confirmed on the migration connection ({err}); delivering it again"
            log.warning("migration: %s", self.error_desc)
            self._set_status(MigrationStatus.COMMIT_PENDING)
            delivery, why = self._redeliver_commit()
            if delivery == Delivery.UNDELIVERED:
                self.error_desc = (
                    f"COMMIT not confirmed ({why}): the guest is paused here and may be prepared on the "
                    "destination; retry with migrate resume=true, or resolve with x-resolve-migration"
                )
                log.warning("migration: %s", self.error_desc)
                return
        self._apply_delivery(delivery)

    def _redeliver_commit(self, connect: Callable[[bytes], Connection] | None = None) -> tuple[Delivery, str]:
        connect = connect or self._resume_connect
        if connect is None:
            return Delivery.UNDELIVERED, "no way to reconnect to the destination"
        return redeliver(
            connect,
            self.migration_id,
            Decision.COMMIT,
            give_up_after=self.params.commit_resume_timeout,
            timeout=min(self.params.commit_timeout, 10.0),
            stop=self._stop_delivery,
        )

    def _apply_delivery(self, delivery: Delivery) -> None:
        """The destination's answer to COMMIT decides where the guest runs."""
        if delivery == Delivery.RUNNING:
            self.ops.commit()  # SEND_FINISH: the destination runs the guest
            self.error_desc = None
            self._finish_ok()
            return
        # UNKNOWN or DISCARDED: the destination holds no copy (it restarted, or discarded it by hand), so
        # the only copy of the guest is here: run it again rather than lose it.
        what = "holds no such migration" if delivery == Delivery.UNKNOWN else "discarded the guest"
        self.error_desc = f"the destination {what}; the guest resumed on the source"
        log.warning("migration: %s", self.error_desc)
        self._resume_here()
        self._set_status(MigrationStatus.FAILED)

    def redeliver(self, connect: Callable[[bytes], Connection]) -> MigrationStatus:
        """Deliver a pending COMMIT again through ``connect`` (QMP ``migrate`` with ``resume=true``);
        returns the status after the attempt."""
        with self._delivery_lock:
            if self.status != MigrationStatus.COMMIT_PENDING:
                raise MigrationError(f"no commit is pending (migration status {self.status.value})")
            self._stop_delivery.clear()
            delivery, why = self._redeliver_commit(connect)
            if delivery == Delivery.UNDELIVERED:
                self.error_desc = f"COMMIT still not confirmed ({why})"
            else:
                self._apply_delivery(delivery)
            return self.status

    def resolve_here(self, run_here: bool) -> None:
        """Resolve a pending commit by hand, when the destination host is gone for good (``run_here``:
        SEND_CANCEL and run the guest here) or known to run the guest (SEND_FINISH). The operator's word
        replaces the proof the protocol could not get; nothing checks it."""
        with self._delivery_lock:
            if self.status != MigrationStatus.COMMIT_PENDING:
                raise MigrationError(f"no commit is pending (migration status {self.status.value})")
            self._stop_delivery.set()
            if run_here:
                self.error_desc = "resolved by hand: the guest runs on the source"
                self._resume_here()
                self._set_status(MigrationStatus.FAILED)
            else:
                self.ops.commit()
                self.error_desc = None
                self._finish_ok()

    def _resume_here(self) -> None:
        self.ops.cancel()  # SEND_CANCEL: back to RUNNING, memory untouched
        if self.vm.state == RunState.FINISH_MIGRATE:
            if self._resume_after_failure:
                self.vm.resume()
            else:
                self.vm.set_state(RunState.PAUSED)
        if self.vm.workload:
            self.vm.workload.set_throttle(0)

    def _finish_ok(self) -> None:
        self.downtime = int((time.monotonic() - self._downtime_start) * 1000)
        self.total_time = int((time.monotonic() - self.start_time) * 1000)
        if self.verify:
            # Memory has been frozen since the pause, so this is the guest as it was at switchover;
            # taken after the downtime window so verification does not inflate the measured downtime.
            # Under NODBG the host cannot read the guest: its agent reports the digest from inside.
            self.digest_at_switchover = self.vm.verification_digest(self.ops.plaintext_readable)
        self.vm.set_state(RunState.POSTMIGRATE)
        if self.vm.workload:
            self.vm.workload.stop()
        self._set_status(MigrationStatus.COMPLETED)

    def _rollback(self, err: BaseException) -> None:
        if self.decision == Decision.COMMIT:
            # Past the decision the guest must not run here unless the destination proves it holds no copy:
            # a failure now leaves the commit pending (never resumed on a guess).
            self.error_desc = f"failed after the commit decision ({err}); the guest stays paused here"
            log.warning("migration: %s", self.error_desc, exc_info=not isinstance(err, (MigrationError, OSError)))
            self._status.set_if(
                frozenset({MigrationStatus.ACTIVE, MigrationStatus.CANCELLING}), MigrationStatus.COMMIT_PENDING
            )
            return
        self.decision = Decision.ABORT
        cancelled = isinstance(err, MigrationCancelledError) or self._cancel.is_set()
        self.error_desc = None if cancelled else str(err)
        if not cancelled and not self.file_mode and not str(err).startswith("destination rejected"):
            reason = self._peer_reason()
            if reason:
                self.error_desc = f"destination rejected the migration: {reason} (source saw: {err})"
        if not cancelled:
            log.warning("migration failed: %s", err, exc_info=not isinstance(err, (MigrationError, OSError)))
        for channel in self.channels:
            channel.error = channel.error or err
            channel.queue.put(None)
        self._resume_here()
        self._tell_destination_abort()
        if cancelled:
            self._status.set_if(_CANCELLABLE, MigrationStatus.CANCELLING)
            self._set_status(MigrationStatus.CANCELLED)
        else:
            self._set_status(MigrationStatus.FAILED)

    def _tell_destination_abort(self) -> None:
        """ABORT on the main connection; when the destination may hold a verified guest and did not
        confirm, deliver ABORT again in the background (it never runs the guest without COMMIT, so this
        only frees it; the source guest already runs)."""
        main = self.conns[0]
        try:
            if not self._destination_may_hold or self.file_mode:
                stream.write_return_message(main.output, stream.ReturnMessage.ABORT)
                return
            delivery = exchange_decision(main, Decision.ABORT, min(self.params.commit_timeout, 5.0))
            if delivery != Delivery.UNDELIVERED:
                return
        except (OSError, ValueError):
            if not self._destination_may_hold or self.file_mode:
                return
        connect = self._resume_connect
        if connect is None:
            return

        def deliver() -> None:
            delivery, why = redeliver(
                connect,
                self.migration_id,
                Decision.ABORT,
                give_up_after=self.params.commit_resume_timeout,
                timeout=min(self.params.commit_timeout, 10.0),
                stop=self._stop_delivery,
            )
            log.info("ABORT delivery: %s %s", delivery.value, why)

        self.abort_delivery = threading.Thread(target=deliver, name="migration-abort", daemon=True)
        self.abort_delivery.start()

    def _peer_reason(self) -> str | None:
        """After a local failure (e.g. a broken pipe): the destination's FAILED reason, if it sent one."""
        main = self.conns[0]
        if main.rfile is None:
            return None
        try:
            main.set_timeout(1.0)
            message = stream.read_return_message(main.input)
        except (OSError, ValueError):
            return None
        return message.reason if message.kind == stream.ReturnMessage.FAILED else None
