"""The commit protocol's record digest: what both ends hash of the stream, so that the source commits
(SEND_FINISH) only when the destination applied exactly what was sent.

The digest is SHA-256 over every record's meaning: block, offset, record type and content. An encrypted
page contributes its 52-byte packet header (flags, IV, MAC) rather than its 4096-byte payload: the
destination firmware has already checked that payload against the MAC (BAD_MEASUREMENT otherwise), so
hashing it again would double the CPU cost per page and add no integrity. The entries are listed in
``docs/formats.md`` ("Record digest"); the protocol is walked through in ``docs/design.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from csev.packet import PACKET_HEADER_SIZE
from pysev.migration.stream import SevContext

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
