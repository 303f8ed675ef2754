"""The commit protocol: the record digest both ends keep, so that the source commits only when the
destination applied exactly what was sent, and the delivery of the source's decision, again and again
on new connections if need be, until the destination confirms it (``docs/design.md``, "Commit").

The digest is SHA-256 over every record's meaning: block, offset, record type and content. An encrypted
page contributes its 52-byte packet header (flags, IV, MAC) rather than its 4096-byte payload: the
destination firmware has already checked that payload against the MAC (BAD_MEASUREMENT otherwise), so
hashing it again would double the CPU cost per page and add no integrity. The entries are listed in
``docs/formats.md`` ("Record digest"); the protocol is walked through in ``docs/design.md``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from csev.packet import PACKET_HEADER_SIZE
from pysev.migration import stream
from pysev.migration.stream import SevContext
from pysev.migration.transport import Connection

log = logging.getLogger(__name__)

# One digest entry per encrypted page: tag, offset, packet header (IV and MAC bind the payload).
_ENCRYPTED_ENTRY = np.dtype([("tag", "S1"), ("offset", ">u8"), ("hdr", "u1", (PACKET_HEADER_SIZE,))])


class RecordDigest:
    """The record digest one stream's reader or writer keeps. It depends on the sequence of records only,
    never on how either side batches them: the block is named when it changes, and every page contributes
    a fixed-format entry."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._block: str | None = None
        self._entries = np.empty(0, _ENCRYPTED_ENTRY)  # reused: one entry per encrypted page of a call

    def _name(self, block: str) -> None:
        if block != self._block:
            self._hash.update(b"N%s\0" % block.encode())
            self._block = block

    def page(self, block: str, offset: int, data: Any) -> None:
        self._name(block)
        self._hash.update(b"P%d\0" % offset)
        self._hash.update(data)

    def zero(self, block: str, offset: int) -> None:
        self._name(block)
        self._hash.update(b"Z%d\0" % offset)

    def encrypted(self, block: str, offsets: np.ndarray, hdrs: np.ndarray) -> None:
        self._name(block)
        n = len(offsets)
        if len(self._entries) < n:
            self._entries = np.empty(n, _ENCRYPTED_ENTRY)
            self._entries["tag"] = b"E"
        entries = self._entries[:n]
        entries["offset"] = offsets
        entries["hdr"] = hdrs
        self._hash.update(entries.data)

    def context(self, ctx: SevContext) -> None:
        self._hash.update(b"C%d\0" % ctx.policy)
        self._hash.update(ctx.pdh)
        self._hash.update(ctx.session)

    def vmsa(self, vcpu: int, hdr: bytes) -> None:
        self._hash.update(b"V%d\0" % vcpu)
        self._hash.update(hdr)

    def bitmap(self, block: str, entries: Iterable[tuple[int, int, Any]]) -> None:
        self._hash.update(b"M%s\0" % block.encode())
        for start, npages, bitmap in entries:
            self._hash.update(b"%d\0%d\0" % (start, npages))
            self._hash.update(bytes(bitmap))

    def digest(self) -> bytes:
        return self._hash.digest()


def combined_digest(digests: Iterable[RecordDigest]) -> bytes:
    """The digest of a migration: the main stream's, then each page channel's, in channel order."""
    return hashlib.sha256(b"".join(d.digest() for d in digests)).digest()


# --- The decision and its delivery -----------------------------------------------------------------------
class Decision(enum.Enum):
    """The source's decision at the end of a migration; once taken it never changes."""

    COMMIT = stream.ReturnMessage.COMMIT  # the guest runs on the destination from now on
    ABORT = stream.ReturnMessage.ABORT  # the guest stays on the source


class Delivery(enum.Enum):
    """What the source learned when it delivered its decision."""

    RUNNING = "running"  # DONE: the destination runs the guest
    DISCARDED = "discarded"  # DONE: the destination discarded what it received
    UNKNOWN = "unknown"  # the destination holds no such migration (it never prepared one, or restarted)
    UNDELIVERED = "undelivered"  # no answer within the bounded time


def exchange_decision(conn: Connection, decision: Decision, timeout: float) -> Delivery:
    """Send ``decision`` on ``conn`` and read the destination's answer. OSError/ValueError (incl.
    StreamError) when the connection fails or the answer is malformed."""
    conn.set_timeout(timeout)
    stream.write_return_message(conn.output, decision.value)
    reply = stream.read_return_message(conn.input)
    if reply.kind == stream.ReturnMessage.DONE:
        return Delivery.RUNNING if reply.outcome == stream.Outcome.RUNNING else Delivery.DISCARDED
    if reply.kind == stream.ReturnMessage.UNKNOWN:
        return Delivery.UNKNOWN
    raise ValueError(f"unexpected answer {reply.kind.name} to {decision.name}")


def redeliver(
    connect: Callable[[bytes], Connection],
    migration_id: bytes,
    decision: Decision,
    *,
    give_up_after: float,
    timeout: float,
    stop: threading.Event,
) -> tuple[Delivery, str]:
    """Deliver ``decision`` on new resume connections (``connect(migration_id)``), backing off from
    0.05 s to 1 s between attempts, until the destination answers or ``give_up_after`` seconds have
    passed or ``stop`` is set. Returns what was learned and the last error (for the error-desc)."""
    deadline = time.monotonic() + give_up_after
    delay, attempts, last = 0.05, 0, "no attempt"
    while not stop.is_set():
        attempts += 1
        try:
            conn = connect(migration_id)
            try:
                delivery = exchange_decision(conn, decision, timeout)
            finally:
                conn.close()
            log.info("%s delivered on resume attempt %d: %s", decision.name, attempts, delivery.value)
            return delivery, ""
        except (OSError, ValueError) as err:
            last = f"{type(err).__name__}: {err}"
            log.info("resume attempt %d to deliver %s failed: %s", attempts, decision.name, last)
        if time.monotonic() + delay > deadline:
            break
        stop.wait(delay)
        delay = min(delay * 2, 1.0)
    return Delivery.UNDELIVERED, f"{attempts} resume attempts over {give_up_after:.0f} s, last: {last}"
