"""The destination side of a live migration (QEMU ``migration/savevm.c`` ``qemu_loadvm_state`` and
``migration/ram.c`` ``ram_load``): load and verify every record, answer with the record digest, and run
the guest only when the source commits.

Everything that can fail happens before the destination acknowledges: after COMMIT only RECEIVE_FINISH
and starting the vCPUs remain. Once it has answered RECEIVED, the destination never discards the
verified guest on its own: without the source's decision it keeps it prepared (paused, RECEIVE_FINISH
not issued) in ``x-commit-pending`` until the decision arrives on a resume connection (``serve_resume``)
or an operator resolves it (``resolve``) (``docs/design.md``, "Commit").
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from csev.packet import PAGE_SIZE
from pysev.hv.machine import VirtualMachine
from pysev.migration import stream
from pysev.migration.channels import READER_LIMITS, ChannelReceiver
from pysev.migration.commit import RecordDigest, combined_digest
from pysev.migration.sev_ops import MigrationError, ops_for
from pysev.migration.state import MigrationStatus, StatusCell
from pysev.migration.transport import Connection

log = logging.getLogger(__name__)

#: Longest reason a destination sends back in a FAILED message.
FAILED_REASON_MAX = 4096


class IncomingMigration:
    """The destination of one migration: loads the stream into ``vm`` (created with ``incoming=True``),
    answers with the record digest, and runs the guest only when the source commits."""

    def __init__(
        self,
        vm: VirtualMachine,
        conns: list[Connection],
        *,
        commit_timeout: float = 60.0,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        file_mode: bool = False,
        verify: bool = False,
    ) -> None:
        self.vm = vm
        self.migration_id = conns[0].migration_id
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
        self._status = StatusCell()
        self._status.set(MigrationStatus.ACTIVE)
        self.error_desc: str | None = None
        self.pages_private = 0
        self.pages_shared = 0
        self._barrier = threading.Barrier(len(conns))
        # Number of the END section's chunk, set by the main stream before it waits at that chunk's
        # barrier: a channel that has passed barrier k reads it as k only if chunk k was the last
        # (a plain flag could already describe the main stream's *next* chunk).
        self.final_chunk: int | None = None
        self._apply_lock = threading.Lock()
        self._decision_lock = threading.Lock()  # the source's decision is applied once
        self.outcome: stream.Outcome | None = None  # RUNNING or DISCARDED once the decision is applied
        self._prepared = False  # RECEIVED sent: a verified guest waits for the source's decision

    @property
    def status(self) -> MigrationStatus:
        return self._status.value

    def fail(self, err: BaseException) -> None:
        first = self._error is None
        if first:
            self._error = err
            if not self.file_mode and self.conns and self.conns[0].wfile is not None:
                try:  # tell the source why (its error-desc), before the connections are cut
                    stream.write_return_message(
                        self.conns[0].output, stream.ReturnMessage.FAILED, str(err).encode()[:FAILED_REASON_MAX]
                    )
                except (OSError, ValueError):
                    pass
        self.failed.set()
        self.context_ready.set()
        self._barrier.abort()
        for conn in self.conns:
            conn.shutdown()

    def barrier_wait(self) -> int | None:
        try:
            return self._barrier.wait(timeout=self.commit_timeout)
        except threading.BrokenBarrierError:
            return None

    def apply_encrypted(self, rec: stream.EncryptedPages, digest: RecordDigest, where: str, offset: int) -> None:
        block = self._block_by_id[rec.block]
        pages = (rec.offsets // np.uint64(PAGE_SIZE)).astype(np.int64)
        statuses = self.ops.receive_pages(block, pages, rec.hdrs, rec.trans)
        bad = np.flatnonzero(statuses)
        if bad.size:
            i = int(bad[0])
            raise MigrationError(
                f"RECEIVE_UPDATE_DATA rejected the encrypted page at {rec.block}+{int(rec.offsets[i]):#x} "
                f"({self.ops.status_name(int(statuses[i]))}; {where}, batch ending at stream offset {offset}); "
                f"{bad.size} of {rec.count} pages in the batch rejected"
            )
        digest.encrypted(rec.block, rec.offsets, rec.hdrs)
        with self._apply_lock:
            self.pages_private += rec.count

    def run(self) -> dict[str, Any]:
        """Load, verify, answer, wait for the verdict. Returns {"status", "error-desc"?}."""
        receivers = [ChannelReceiver(i, c, self) for i, c in enumerate(self.conns[1:], start=1)]
        for receiver in receivers:
            receiver.start()
        main_digest = RecordDigest()
        try:
            trailer = self._load_main(main_digest)
            for receiver in receivers:
                receiver.join()
                if receiver.error:
                    raise receiver.error
            if self._error is not None:
                raise self._error
            digest = combined_digest([main_digest] + [r.digest for r in receivers])
            self._verdict(digest, trailer)
        except BaseException as err:  # noqa: BLE001 — every failure before RECEIVED discards the guest
            self.fail(err)
            self._discard(err)
        finally:
            for conn in self.conns:
                conn.close()
        return {"status": self.status.value, **({"error-desc": self.error_desc} if self.error_desc else {})}

    def _load_main(self, digest: RecordDigest) -> dict[str, Any] | None:
        reader = stream.StreamReader(self.conns[0].input, READER_LIMITS, ram_blocks=self.blocks)
        reader.read_header()
        chunk = 0
        while True:
            section = reader.next_section()
            if isinstance(section, stream.Eof):
                return reader.read_vmdesc()
            if isinstance(section, (stream.Configuration, stream.Footer)):
                continue
            if isinstance(section, stream.SectionHeader) and section.idstr == stream.VMSA_SECTION_IDSTR:
                vmsa = reader.read_vmsa_section(section)
                self.ops.receive_vmsa(vmsa.vcpu, vmsa.hdr, vmsa.trans)
                digest.vmsa(vmsa.vcpu, vmsa.hdr)
                continue
            if not isinstance(section, stream.SectionHeader) or section.idstr != stream.RAM_SECTION_IDSTR:
                raise MigrationError(f"unexpected section {section!r} at stream offset {reader.offset}")
            final = section.kind == stream.QEMU_VM_SECTION_END
            for rec in reader.ram_records():
                if isinstance(rec, stream.Page):
                    self.vm.write_shared_page(self._block_by_id[rec.block], rec.offset // PAGE_SIZE, rec.data)
                    digest.page(rec.block, rec.offset, rec.data)
                    self.pages_shared += 1
                elif isinstance(rec, stream.Zero):
                    self.vm.write_shared_page(self._block_by_id[rec.block], rec.offset // PAGE_SIZE, None)
                    digest.zero(rec.block, rec.offset)
                    self.pages_shared += 1
                elif isinstance(rec, stream.EncryptedPages):
                    if rec.context is not None:
                        self.ops.load_setup(rec.context)  # RECEIVE_START
                        digest.context(rec.context)
                        self.context_ready.set()
                    self.apply_encrypted(rec, digest, "main stream", reader.offset)
                elif isinstance(rec, stream.EncryptedBitmap):
                    entries = [(e.start_gpa, e.npages, e.bitmap) for e in rec.entries]
                    self.ops.load_state_map(self._block_by_id[rec.block], entries)
                    digest.bitmap(rec.block, entries)
                elif isinstance(rec, stream.Eos):
                    chunk += 1
                    if final:
                        self.final_chunk = chunk
                    if len(self.conns) > 1 and self.barrier_wait() is None:
                        raise self._error or MigrationError("a page channel failed")
            if self._error is not None:
                raise self._error

    def _verdict(self, digest: bytes, trailer: dict[str, Any] | None) -> None:
        main = self.conns[0]
        self.vm.prepare_incoming()
        if self.file_mode:
            expected = ((trailer or {}).get("pysev") or {}).get("record-sha256")
            if expected != digest.hex():
                raise MigrationError("the file's record digest does not match its contents (corrupted file)")
            self._run_guest()
            return
        # From the first byte of RECEIVED on, the guest is kept until the source's decision is known, however
        # long that takes: the source may have read all of it even if this write fails.
        self._prepared = True
        try:
            stream.write_return_message(main.output, stream.ReturnMessage.RECEIVED, digest)
            main.set_timeout(self.commit_timeout)
            message = stream.read_return_message(main.input)
            if message.kind not in (stream.ReturnMessage.COMMIT, stream.ReturnMessage.ABORT):
                raise ValueError(f"unexpected {message.kind.name} where the source's decision was due")
        except (OSError, ValueError) as err:
            with self._decision_lock:
                if self.outcome is not None:  # a resume connection delivered the decision meanwhile
                    return
                self.error_desc = f"no decision from the source ({err}); the verified guest is kept, paused"
                self._status.set(MigrationStatus.COMMIT_PENDING)
            log.warning("incoming migration: %s", self.error_desc)
            self._emit(MigrationStatus.COMMIT_PENDING)
            return
        self.resolve(message.kind == stream.ReturnMessage.COMMIT, answer=functools.partial(_answer_done, main))

    def resolve(
        self, commit: bool, *, by_hand: bool = False, answer: Callable[[stream.Outcome], None] | None = None
    ) -> stream.Outcome | None:
        """Apply the source's decision (COMMIT: run the guest; ABORT: discard it), once; later calls
        return the outcome of the first. None: a COMMIT for a guest that was never verified here (no
        source sends one), which the caller answers with UNKNOWN. ``by_hand``: an operator's decision
        (QMP x-resolve-migration), refused unless a verified guest is waiting. ``answer(outcome)`` tells
        the source as soon as the decision is applied: after RECEIVE_FINISH, before the verification
        digest, so that verifying does not lengthen the downtime the source measures."""
        with self._decision_lock:
            if self.outcome is not None:
                if by_hand:
                    raise MigrationError(f"the migration is already resolved ({self.outcome.name.lower()})")
                if answer is not None:
                    answer(self.outcome)
                return self.outcome
            if not self._prepared:
                if by_hand:
                    raise MigrationError("no verified guest is waiting for a decision")
                if commit:
                    return None
                self.fail(MigrationError("the source aborted the migration"))  # run() discards it
                if answer is not None:
                    answer(stream.Outcome.DISCARDED)
                return stream.Outcome.DISCARDED
            if commit:
                self._run_guest(answer)
                self.error_desc = "resolved by hand: the guest runs here" if by_hand else None
            else:
                why = "resolved by hand: the guest was discarded" if by_hand else "the source aborted the migration"
                self._discard(MigrationError(why))
                if answer is not None:
                    answer(stream.Outcome.DISCARDED)
            return self.outcome

    def serve_resume(self, conn: Connection) -> None:
        """A resume connection for this migration: read the source's decision, apply it, answer DONE (or
        UNKNOWN when the connection names another migration)."""
        try:
            conn.set_timeout(self.commit_timeout)
            if conn.migration_id != self.migration_id:
                read_decision(conn)
                stream.write_return_message(conn.output, stream.ReturnMessage.UNKNOWN)
                return
            if self.resolve(read_decision(conn), answer=functools.partial(_answer_done, conn)) is None:
                stream.write_return_message(conn.output, stream.ReturnMessage.UNKNOWN)
        except (OSError, ValueError, MigrationError) as err:
            log.warning("resume connection %s: %s", conn.name, err)
        finally:
            conn.close()

    def _emit(self, status: MigrationStatus) -> None:
        if self._on_event:
            self._on_event("MIGRATION", {"status": status.value})

    def _run_guest(self, answer: Callable[[stream.Outcome], None] | None = None) -> None:
        self.ops.finish()  # RECEIVE_FINISH
        self.outcome = stream.Outcome.RUNNING
        if answer is not None:
            answer(self.outcome)
        # Before its vCPUs change anything; under NODBG (policy from the stream) from inside, as on the source.
        if self.verify:
            self.guest_digest = self.vm.verification_digest(self.ops.plaintext_readable)
        self.vm.incoming_complete()
        self._status.set(MigrationStatus.COMPLETED)
        self._emit(MigrationStatus.COMPLETED)

    def _discard(self, err: BaseException) -> None:
        self.error_desc = str(err)
        self.outcome = stream.Outcome.DISCARDED
        self._status.set(MigrationStatus.FAILED)
        log.warning("incoming migration failed: %s", err)
        self.ops.abort()
        self._emit(MigrationStatus.FAILED)


def _answer_done(conn: Connection, outcome: stream.Outcome) -> None:
    """DONE(outcome) to the source; a lost one is answered again when the source resumes."""
    with contextlib.suppress(OSError, ValueError):
        stream.write_return_message(conn.output, stream.ReturnMessage.DONE, bytes([outcome]))


def read_decision(conn: Connection) -> bool:
    """The source's decision on a connection: True for COMMIT, False for ABORT (ValueError otherwise)."""
    message = stream.read_return_message(conn.input)
    if message.kind not in (stream.ReturnMessage.COMMIT, stream.ReturnMessage.ABORT):
        raise ValueError(f"expected COMMIT or ABORT, got {message.kind.name}")
    return message.kind == stream.ReturnMessage.COMMIT


def serve_unknown_resume(conn: Connection) -> None:
    """A resume connection for a migration this destination does not hold: answer UNKNOWN."""
    try:
        conn.set_timeout(10.0)
        read_decision(conn)
        stream.write_return_message(conn.output, stream.ReturnMessage.UNKNOWN)
    except (OSError, ValueError) as err:
        log.warning("resume connection %s: %s", conn.name, err)
    finally:
        conn.close()
