"""The commit protocol's messages, which follow the migration stream on its connection.

They use the framing of QEMU's return path (``migration/migration.c``, ``migrate_send_rp_message`` and
``source_return_path_thread``: ``be16 type, be16 length, data``) with pysev's own types, in both
directions: the destination answers RECEIVED (the record digest) or FAILED (a reason), the source then
sends its decision, COMMIT or ABORT, and the destination confirms it applied the decision with DONE.
When the connection breaks before DONE, the source delivers the decision again on a resume connection
(a transport hello that names the migration), where a destination that holds no such migration answers
UNKNOWN. The byte-level description is ``docs/formats.md`` ("Return path"); the protocol is in
``docs/design.md`` ("Commit").

They are not part of the QEMU stream: the writer uses the file object's ``write_control`` when it has
one, so that a ``--save-stream`` copy stays readable by ``scripts/analyze-migration.py``. The reader
bounds every length by its type before reading the data.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, BinaryIO, NamedTuple

from pysev.migration.stream.layout import StreamError

MESSAGE_HEAD = struct.Struct(">HH")  # type, length of the data that follows
DIGEST_SIZE = 32  # SHA-256 record digest
FAILED_REASON_MAX = 4096  # bytes of UTF-8 a FAILED message may carry


class ReturnMessage(enum.IntEnum):
    """Message types, in a range QEMU's MIG_RP_MSG_* do not use."""

    RECEIVED = 0x5001  # destination → source: the digest of every record applied (DIGEST_SIZE bytes)
    FAILED = 0x5002  # destination → source: why it failed, UTF-8
    COMMIT = 0x5003  # source → destination: the source committed, run the guest (no data)
    ABORT = 0x5004  # source → destination: discard the guest (no data)
    DONE = 0x5005  # destination → source: the decision is applied (one byte: an Outcome)
    UNKNOWN = 0x5006  # destination → source, on a resume connection: no such migration here (no data)


class Outcome(enum.IntEnum):
    """What a destination did with a migration's guest, as DONE reports it."""

    RUNNING = 1  # committed: the guest runs on the destination
    DISCARDED = 2  # aborted: the destination discarded what it received


# Allowed data length per type: (min, max)
_LENGTHS = {
    ReturnMessage.RECEIVED: (DIGEST_SIZE, DIGEST_SIZE),
    ReturnMessage.FAILED: (0, FAILED_REASON_MAX),
    ReturnMessage.COMMIT: (0, 0),
    ReturnMessage.ABORT: (0, 0),
    ReturnMessage.DONE: (1, 1),
    ReturnMessage.UNKNOWN: (0, 0),
}


class ReturnPathMessage(NamedTuple):
    kind: ReturnMessage
    data: bytes = b""

    @property
    def outcome(self) -> Outcome:
        """A DONE message's outcome; StreamError for a value that names none."""
        try:
            return Outcome(self.data[0])
        except (IndexError, ValueError):
            raise StreamError(
                f"DONE message with outcome {self.data!r}", offset=MESSAGE_HEAD.size, record="return-path message"
            ) from None

    @property
    def reason(self) -> str:
        """A FAILED message's reason (undecodable bytes replaced)."""
        return self.data.decode("utf-8", errors="replace")


def _check_length(kind: ReturnMessage, n: int) -> str | None:
    low, high = _LENGTHS[kind]
    if low <= n <= high:
        return None
    need = f"{low}" if low == high else f"at most {high}"
    return f"{kind.name} message of {n} bytes, must be {need}"


def write_return_message(wfile: BinaryIO, kind: ReturnMessage, data: Any = b"") -> None:
    """One message, in one write: through ``wfile.write_control`` when the file object has it (a tee
    keeps it out of its copy of the stream), else ``wfile.write``. ValueError for a bad type or length."""
    kind = ReturnMessage(kind)
    data = bytes(data)
    problem = _check_length(kind, len(data))
    if problem:
        raise ValueError(problem)
    write = getattr(wfile, "write_control", None) or wfile.write
    out = memoryview(MESSAGE_HEAD.pack(kind, len(data)) + data)
    while len(out):
        n = write(out)
        if n is None:
            raise BlockingIOError("non-blocking file object would block")
        out = out[n:]


def _read_exact(rfile: BinaryIO, n: int, what: str, at: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = rfile.read(n - len(out))
        if not chunk:
            raise StreamError(
                f"return path ended after {len(out)} of the {n} bytes of the {what}",
                offset=at + len(out),
                record="return-path message",
            )
        out += chunk
    return bytes(out)


def read_return_message(rfile: BinaryIO) -> ReturnPathMessage:
    """The next message. ``StreamError`` (offsets count from the message's first byte) when the connection
    closes inside it, or its type is unknown, or its length is not the type's; timeouts and I/O errors
    of ``rfile`` propagate."""
    kind, n = MESSAGE_HEAD.unpack(_read_exact(rfile, MESSAGE_HEAD.size, "message header", 0))
    try:
        kind = ReturnMessage(kind)
    except ValueError:
        raise StreamError(f"unknown message type {kind:#06x}", offset=0, record="return-path message") from None
    problem = _check_length(kind, n)
    if problem:
        raise StreamError(problem, offset=2, record="return-path message")
    return ReturnPathMessage(kind, _read_exact(rfile, n, f"{kind.name} message", MESSAGE_HEAD.size))


__all__ = [
    "DIGEST_SIZE",
    "FAILED_REASON_MAX",
    "MESSAGE_HEAD",
    "Outcome",
    "ReturnMessage",
    "ReturnPathMessage",
    "read_return_message",
    "write_return_message",
]
