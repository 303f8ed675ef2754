"""The commit protocol's messages after the stream: byte layout, round trips, bounds, truncation."""

from __future__ import annotations

import io
import struct

import pytest

from pysev.migration import stream
from pysev.migration.stream import (
    DIGEST_SIZE,
    FAILED_REASON_MAX,
    Outcome,
    ReturnMessage,
    ReturnPathMessage,
    StreamError,
    read_return_message,
    write_return_message,
)

DIGEST = bytes(range(32))


def test_types_and_header_layout():
    assert [int(k) for k in ReturnMessage] == [0x5001, 0x5002, 0x5003, 0x5004, 0x5005, 0x5006]
    assert [k.name for k in ReturnMessage] == ["RECEIVED", "FAILED", "COMMIT", "ABORT", "DONE", "UNKNOWN"]
    assert [(int(o), o.name) for o in Outcome] == [(1, "RUNNING"), (2, "DISCARDED")]
    assert stream.MESSAGE_HEAD.format == ">HH" and stream.MESSAGE_HEAD.size == 4
    assert (DIGEST_SIZE, FAILED_REASON_MAX) == (32, 4096)


@pytest.mark.parametrize(
    "kind,data,wire",
    [
        (ReturnMessage.RECEIVED, DIGEST, b"\x50\x01\x00\x20" + DIGEST),
        (ReturnMessage.FAILED, "décodé".encode(), b"\x50\x02\x00\x08" + "décodé".encode()),
        (ReturnMessage.FAILED, b"", b"\x50\x02\x00\x00"),
        (ReturnMessage.COMMIT, b"", b"\x50\x03\x00\x00"),
        (ReturnMessage.ABORT, b"", b"\x50\x04\x00\x00"),
        (ReturnMessage.DONE, b"\x01", b"\x50\x05\x00\x01\x01"),
        (ReturnMessage.UNKNOWN, b"", b"\x50\x06\x00\x00"),
    ],
)
def test_bytes_and_round_trip(kind, data, wire):
    buf = io.BytesIO()
    write_return_message(buf, kind, data)
    assert buf.getvalue() == wire
    msg = read_return_message(io.BytesIO(wire))
    assert msg == ReturnPathMessage(kind, data) and msg.kind is kind
    if kind == ReturnMessage.FAILED:
        assert msg.reason == data.decode()


def test_messages_follow_each_other_on_one_connection():
    buf = io.BytesIO()
    write_return_message(buf, ReturnMessage.RECEIVED, bytearray(DIGEST))
    write_return_message(buf, ReturnMessage.COMMIT)
    write_return_message(buf, ReturnMessage.FAILED, b"x" * FAILED_REASON_MAX)
    buf.seek(0)
    assert [read_return_message(buf).kind for _ in range(3)] == [
        ReturnMessage.RECEIVED,
        ReturnMessage.COMMIT,
        ReturnMessage.FAILED,
    ]
    with pytest.raises(StreamError, match="ended after 0 of the 4 bytes of the message header"):
        read_return_message(buf)


def test_reason_with_invalid_utf8_is_replaced():
    msg = read_return_message(io.BytesIO(b"\x50\x02\x00\x03ab\xff"))
    assert msg.reason == "ab\ufffd"


class Tee(io.RawIOBase):
    """Like ``--save-stream``: ``write`` goes to the transport and the copy, ``write_control`` to the
    transport only."""

    def __init__(self):
        self.transport, self.copy = bytearray(), bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.transport += b
        self.copy += b
        return len(b)

    def write_control(self, b):
        self.transport += b
        return len(b)


def test_writer_uses_write_control_when_the_file_has_it():
    tee = Tee()
    write_return_message(tee, ReturnMessage.ABORT)
    assert bytes(tee.transport) == b"\x50\x04\x00\x00" and tee.copy == b""


def test_short_writes_are_completed():
    class Short(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += bytes(b[:3])
            return min(3, len(b))

    f = Short()
    write_return_message(f, ReturnMessage.RECEIVED, DIGEST)
    assert bytes(f.data) == b"\x50\x01\x00\x20" + DIGEST


class Trickle(io.RawIOBase):
    def __init__(self, data: bytes):
        self._data = data

    def readable(self):
        return True

    def readinto(self, b):
        n = min(1, len(self._data), len(b))
        b[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def test_short_reads_are_completed():
    msg = read_return_message(Trickle(b"\x50\x01\x00\x20" + DIGEST))
    assert msg == ReturnPathMessage(ReturnMessage.RECEIVED, DIGEST)


def test_truncated_at_every_offset():
    wire = b"\x50\x01\x00\x20" + DIGEST
    for cut in range(len(wire)):
        with pytest.raises(StreamError) as ei:
            read_return_message(io.BytesIO(wire[:cut]))
        e = ei.value
        assert e.record == "return-path message" and e.offset == cut, str(e)
        what = "message header" if cut < 4 else "RECEIVED message"
        total = 4 if cut < 4 else 32
        assert f"ended after {cut if cut < 4 else cut - 4} of the {total} bytes of the {what}" in str(e)


@pytest.mark.parametrize(
    "kind,length,fragment",
    [
        (0x5001, 31, "RECEIVED message of 31 bytes, must be 32"),
        (0x5001, 33, "RECEIVED message of 33 bytes, must be 32"),
        (0x5001, 0, "RECEIVED message of 0 bytes, must be 32"),
        (0x5002, FAILED_REASON_MAX + 1, "FAILED message of 4097 bytes, must be at most 4096"),
        (0x5002, 0xFFFF, "FAILED message of 65535 bytes, must be at most 4096"),
        (0x5003, 1, "COMMIT message of 1 bytes, must be 0"),
        (0x5004, 0xFFFF, "ABORT message of 65535 bytes, must be 0"),
    ],
)
def test_bad_lengths_are_refused_before_the_data_is_read(kind, length, fragment):
    class Counting(io.BytesIO):
        def read(self, n=-1):
            self.asked = getattr(self, "asked", 0) + (n if n and n > 0 else 0)
            return super().read(n)

    src = Counting(struct.pack(">HH", kind, length) + bytes(length))
    with pytest.raises(StreamError) as ei:
        read_return_message(src)
    assert fragment in str(ei.value) and ei.value.offset == 2
    assert src.asked == 4  # the header only


@pytest.mark.parametrize("kind", [0x0000, 0x0001, 0x5000, 0x5007, 0xFFFF])
def test_unknown_type_is_refused(kind):
    with pytest.raises(StreamError, match=f"unknown message type {kind:#06x}") as ei:
        read_return_message(io.BytesIO(struct.pack(">HH", kind, 0)))
    assert ei.value.offset == 0 and ei.value.record == "return-path message"


@pytest.mark.parametrize("value", [0, 3, 255])
def test_done_with_no_outcome_is_refused(value):
    message = read_return_message(io.BytesIO(struct.pack(">HHB", 0x5005, 1, value)))
    with pytest.raises(StreamError, match="outcome"):
        _ = message.outcome
    assert read_return_message(io.BytesIO(b"\x50\x05\x00\x01\x02")).outcome == Outcome.DISCARDED


def test_the_error_is_a_value_error():
    """Callers catch ValueError (as for any malformed input) or StreamError."""
    with pytest.raises(ValueError):
        read_return_message(io.BytesIO(b"\x50"))


def test_writer_refuses_bad_messages_without_writing():
    buf = io.BytesIO()
    for kind, data, fragment in [
        (ReturnMessage.RECEIVED, DIGEST[:31], "must be 32"),
        (ReturnMessage.COMMIT, b"x", "must be 0"),
        (ReturnMessage.ABORT, b"x", "must be 0"),
        (ReturnMessage.FAILED, b"x" * (FAILED_REASON_MAX + 1), "at most 4096"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            write_return_message(buf, kind, data)
    with pytest.raises(ValueError):
        write_return_message(buf, 0x5007)
    for data in (b"", b"\x01\x02"):
        with pytest.raises(ValueError, match="must be 1"):
            write_return_message(buf, ReturnMessage.DONE, data)
    assert buf.getvalue() == b""


def test_io_errors_and_timeouts_propagate():
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def read(self, n=-1):
            raise TimeoutError("timed out")

    with pytest.raises(TimeoutError):
        read_return_message(Broken())
