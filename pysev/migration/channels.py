"""Private pages on the wire: the SEND_UPDATE_DATA batches written into stream records, and the page
channels (QEMU's multifd) that carry them on extra connections.

``PageEncrypter`` is the send side's seam between the firmware and the stream: the send pipeline writes
each batch's packets straight into a ring of encrypted-page records (``stream.RecordRing``), and every
filled slice goes to the connection while it is still in cache (the ring is the pipeline's record sink;
``docs/design.md``, "The send ring"). ``ChannelSender``/``ChannelReceiver`` run one extra connection each;
the destination meets every connection at a barrier at each chunk end (EOS), so a page re-sent in a later
pass never loses to an earlier copy (``docs/formats.md``, "Page channels").
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from csev.packet import PAGE_SIZE
from pysev.migration import stream
from pysev.migration.commit import RecordDigest
from pysev.migration.sev_ops import MigrationError, PlainOps
from pysev.migration.transport import Connection

if TYPE_CHECKING:
    from pysev.hv.memory import RamBlock
    from pysev.migration.incoming import IncomingMigration

#: Pages per SEND/RECEIVE_UPDATE_DATA batch (8 MiB of guest memory: few firmware calls per pass).
BATCH_PAGES = 2048
#: Records in the send ring (533 KB): small enough to stay in a core's L2 beside the guest pages being
#: read and the socket buffers, so the socket copies each record from cache (docs/performance.md).
SEND_RING_RECORDS = 128
#: The destination reads ahead 8 MiB, so runs of ~2000 encrypted-page records reach RECEIVE_UPDATE_DATA
#: in place, without a copy.
READER_LIMITS = dataclasses.replace(stream.ReaderLimits(), read_chunk=8 << 20)

#: What a page channel's queue carries besides (block, pages) batches.
_SYNC = "sync"


class PageEncrypter:
    """Writes SEND_UPDATE_DATA batches into the records of one stream.

    Only the first record after a block change (or the one carrying the SEND_START context) takes the
    ordinary writer path, because it names the block; every other page goes through the ring.
    """

    def __init__(self, writer: stream.StreamWriter, ops: PlainOps, digest: RecordDigest) -> None:
        self.writer, self.ops, self.digest = writer, ops, digest
        self._ring = stream.RecordRing(writer, SEND_RING_RECORDS)
        self._first = np.zeros(1, stream.ENC_PAGE_RECORD)  # the record that names the block

    def send(self, block: RamBlock, pages: np.ndarray, context: stream.SevContext | None = None) -> None:
        offsets = pages.astype(np.uint64) * np.uint64(PAGE_SIZE)
        ring, writer = self._ring, self.writer
        if context is not None or not ring.begin(block.idstr, offsets):  # the record names the block
            first = self._first
            self.ops.send_pages(block, pages[:1], first["hdr"], first["trans"])
            writer.sev_encrypted_pages(block.idstr, offsets[:1], first, context)
            writer.check()
            if context is not None:  # digested where it is written, as the destination meets it there
                self.digest.context(context)
            self.digest.encrypted(block.idstr, offsets[:1], first["hdr"])
            pages, offsets = pages[1:], offsets[1:]
            if not len(pages):
                return
            if not ring.begin(block.idstr, offsets):
                raise RuntimeError("the stream refused a CONTINUE record right after naming the block")

        def drain(start: int, stop: int) -> None:
            ring.put(start, stop)
            self.digest.encrypted(block.idstr, offsets[start:stop], ring.hdr[: stop - start])

        self.ops.send_pages(block, pages, ring.hdr, ring.trans, on_slice=drain)


class ChannelSender(threading.Thread):
    """One page channel of the source: encrypts the batches it is given and writes their records.

    Its queue carries ``(block, pages)`` batches, ``"sync"`` (end the chunk with EOS and flush) and finally
    ``None``. After a failure it keeps consuming, and discarding, until ``None``: a producer must never
    block in ``put()`` or ``join()`` on a dead channel.
    """

    def __init__(self, index: int, conn: Connection, ops: PlainOps, blocks: dict[str, int]) -> None:
        super().__init__(name=f"mig-send-ch{index}", daemon=True)
        self.conn = conn
        self.writer = stream.StreamWriter(conn.output, continuation=True)
        self.writer.ram_mem_size(list(blocks.items()))  # each channel stream announces the blocks
        self.digest = RecordDigest()
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.pages = 0
        self.encrypter = PageEncrypter(self.writer, ops, self.digest)

    def run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    if self.error is None:
                        self.writer.flush()
                    return
                if self.error is not None:
                    continue
                if item == _SYNC:
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

    def sync(self) -> None:
        self.queue.put(_SYNC)

    def raise_error(self) -> None:
        if self.error is not None:
            raise MigrationError(f"page channel {self.name} failed: {self.error}") from self.error

    @property
    def transferred(self) -> int:
        return self.writer.transferred


class ChannelReceiver(threading.Thread):
    """Applies one page channel's batches; meets the main stream at every chunk boundary (barrier)."""

    def __init__(self, index: int, conn: Connection, incoming: IncomingMigration) -> None:
        super().__init__(name=f"mig-recv-ch{index}", daemon=True)
        self.index = index
        self.conn = conn
        self.incoming = incoming
        self.digest = RecordDigest()
        self.error: BaseException | None = None

    def run(self) -> None:
        incoming = self.incoming
        try:
            reader = stream.StreamReader(self.conn.input, READER_LIMITS, ram_blocks=incoming.blocks, continuation=True)
            chunk = 0
            while True:
                chunk += 1
                for rec in reader.ram_records():
                    if isinstance(rec, stream.EncryptedPages):
                        incoming.context_ready.wait()
                        if incoming.failed.is_set():
                            return
                        incoming.apply_encrypted(rec, self.digest, f"channel {self.index}", reader.offset)
                    elif not isinstance(rec, (stream.Eos, stream.MemSize)):
                        raise MigrationError(f"channel {self.index}: unexpected {type(rec).__name__} record")
                if incoming.barrier_wait() is None or incoming.final_chunk == chunk:
                    return
        except BaseException as err:  # noqa: BLE001 — reported to the incoming migration
            self.error = err
            incoming.fail(err)
