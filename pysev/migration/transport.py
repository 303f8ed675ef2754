"""Migration transports: in-process, TCP between processes or machines, and files.

Every transport yields ``Connection`` objects: a byte stream to write (``wfile``) and, except for
files, one to read (``rfile``), the reverse direction being QEMU's return path. A migration uses one
main connection (the QEMU stream) plus N page channels (multifd-like) for encrypted pages.

TCP connections open with a hello (``HELLO``: magic, version, migration id, channel number, channel
count) so the destination can tell the main stream from the channels of one migration, as QEMU's
multifd initial packet does. A hello whose channel number is ``RESUME_CHANNEL`` opens a resume
connection: the source delivers its commit decision again for the migration the hello names
(``docs/design.md``, "Commit"; ``docs/formats.md``, "Page channels").
"""

from __future__ import annotations

import io
import os
import select
import socket
import struct
import time
import uuid
from typing import BinaryIO, cast

HELLO = struct.Struct(">II16sHH")  # magic, version, migration uuid, channel (0 = main), channel count
HELLO_MAGIC = 0x50535631  # "PSV1"
HELLO_VERSION = 1
RESUME_CHANNEL = 0xFFFF  # a hello's channel number for a resume connection (channel count 0)
MIGRATION_ID_SIZE = 16
MAX_CHANNELS = 64
# Fixed socket buffers (capped by net.core.[rw]mem_max). Fixed, not autotuned: Linux resizes an
# autotuned receive buffer when SO_RCVLOWAT changes, and on 6.18 toggling it (as _SocketReader does)
# left a connection with a 2 KiB window.
SOCKET_BUFFER = 4 << 20
# Bulk reads (see _SocketReader): while a stream flows, the reader is woken once per BULK_LOWAT bytes
# (at most half the receive buffer the kernel granted), or after BULK_WAIT_MS with whatever arrived,
# so the destination applies whole batches instead of a few hundred pages (docs/performance.md).
BULK_LOWAT = 4 << 20
BULK_WAIT_MS = 5
BULK_READ = 256 << 10  # a read at least this large means a bulk transfer is under way


class TransportError(OSError):
    pass


class _SocketWriter(io.RawIOBase):
    """Unbuffered writer over a socket: the stream writer does its own 64 KiB batching."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._sock.sendall(data)
        return len(data)


class _SocketReader(io.RawIOBase):
    """Reads of a socket that come in large pieces while a bulk transfer flows.

    A plain ``recv`` returns whatever has arrived, so a receiver as fast as its sender takes the stream
    in ~64 KiB pieces and pays its per-batch costs (a RECEIVE_UPDATE_DATA batch, bound checks, digest)
    thousands of times per second. During a bulk transfer (the last read was at least ``BULK_READ``)
    this reader sets ``SO_RCVLOWAT``: the kernel wakes it once ``lowat`` bytes are queued, and after
    ``BULK_WAIT_MS`` it takes what is there anyway, so the end of a burst costs that wait once. Outside
    bulk transfers (control messages, the commit protocol) a read returns as soon as any byte is there.

    Timeouts are the reader's own (``timeout``): it reads through a duplicate of the socket that stays
    in blocking mode and uses ``MSG_DONTWAIT``, because a Python socket with a timeout polls for plain
    readability, which ``SO_RCVLOWAT`` withholds, before each ``recv``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)
        granted = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # doubled by the kernel
        self.lowat = max(1, min(BULK_LOWAT, granted // 2))
        self._bulk = False
        self.timeout: float | None = None

    def readable(self) -> bool:
        return True

    def _set_bulk(self, bulk: bool) -> None:
        if bulk != self._bulk:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.lowat if bulk else 1)
            self._bulk = bulk

    def _recv(self, b) -> int | None:
        try:
            n = self._sock.recv_into(b, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        self._set_bulk(n >= BULK_READ)
        return n

    def readinto(self, b) -> int:
        if self._bulk:
            self._poll.poll(BULK_WAIT_MS)  # ready once lowat bytes are queued (or EOF, error)
            n = self._recv(b)
            if n is not None:
                return n
            self._set_bulk(False)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            self._poll.poll(wait)
            n = self._recv(b)
            if n is not None:
                return n
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("timed out")

    def close(self) -> None:
        if not self.closed:
            self._sock.close()
        super().close()


class Connection:
    def __init__(
        self,
        name: str,
        wfile: BinaryIO | None,
        rfile: BinaryIO | None,
        closer=None,
        sock: socket.socket | None = None,
        reader: _SocketReader | None = None,
        migration_id: bytes = b"",
        resume: bool = False,
    ) -> None:
        self.name = name
        #: The migration this connection belongs to (the hello's uuid; in-process pairs share one).
        self.migration_id = migration_id
        #: A resume connection: the source delivers its commit decision again (no stream follows).
        self.resume = resume
        self.wfile = wfile
        self.rfile = rfile
        self._closer = closer
        self._sock = sock
        self._reader = reader

    @property
    def output(self) -> BinaryIO:
        """The write side (a file migration's reader has none)."""
        if self.wfile is None:
            raise TransportError(f"{self.name} has no write side")
        return self.wfile

    @property
    def input(self) -> BinaryIO:
        """The read side (a file migration's writer has none)."""
        if self.rfile is None:
            raise TransportError(f"{self.name} has no read side")
        return self.rfile

    def set_timeout(self, seconds: float | None) -> None:
        """Bound blocking reads and writes (a silent peer becomes a ``TimeoutError``, not a hang);
        files: no-op."""
        if self._sock is not None:
            self._sock.settimeout(seconds)
        if self._reader is not None:
            self._reader.timeout = seconds

    def __repr__(self) -> str:
        return f"Connection({self.name})"

    def close(self) -> None:
        for f in (self.wfile, self.rfile):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if self._closer:
            self._closer()

    def sync(self) -> None:
        """Make everything written durable (files: flush + fsync; sockets: nothing to do)."""
        if self.wfile is not None and hasattr(self.wfile, "fileno") and self._closer is None:
            self.wfile.flush()
            os.fsync(self.wfile.fileno())

    def shutdown(self) -> None:
        """Abort the connection from another thread: blocked reads and writes fail at once."""
        if self._closer:
            self._closer(shutdown=True)


def _socket_connection(name: str, sock: socket.socket, migration_id: bytes = b"", resume: bool = False) -> Connection:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def closer(shutdown: bool = False) -> None:
        try:
            if shutdown:
                sock.shutdown(socket.SHUT_RDWR)
            else:
                sock.close()
        except OSError:
            pass

    reader = _SocketReader(sock)
    # The raw socket files implement the BinaryIO methods the stream uses (write, readinto, read, close).
    writer = cast(BinaryIO, _SocketWriter(sock))
    rfile = cast(BinaryIO, io.BufferedReader(reader, 1 << 20))
    return Connection(name, writer, rfile, closer, sock, reader, migration_id, resume)


def inproc_pairs(channels: int) -> tuple[list[Connection], list[Connection]]:
    """Source and destination ends of 1 + ``channels`` in-process connections (socketpairs)."""
    src, dst = [], []
    mig_id = uuid.uuid4().bytes
    for i in range(channels + 1):
        a, b = socket.socketpair()
        name = "main" if i == 0 else f"channel{i}"
        src.append(_socket_connection(f"inproc:{name}", a, mig_id))
        dst.append(_socket_connection(f"inproc:{name}", b, mig_id))
    return src, dst


def inproc_resume_pair(migration_id: bytes) -> tuple[Connection, Connection]:
    """The source and destination ends of an in-process resume connection for ``migration_id``."""
    a, b = socket.socketpair()
    return (
        _socket_connection("inproc:resume", a, migration_id, resume=True),
        _socket_connection("inproc:resume", b, migration_id, resume=True),
    )


def parse_tcp(uri: str) -> tuple[str, int]:
    """``tcp:HOST:PORT`` (IPv6 hosts in brackets)."""
    if not uri.startswith("tcp:"):
        raise ValueError(f"not a tcp: URI: {uri!r}")
    host, sep, port = uri[4:].rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"tcp URI needs HOST:PORT, got {uri!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def tcp_connect(uri: str, channels: int, *, timeout: float = 10.0) -> list[Connection]:
    """The source side: main connection then ``channels`` page channels, each announced by a hello."""
    host, port = parse_tcp(uri)
    mig_id = uuid.uuid4().bytes
    conns = []
    try:
        for i in range(channels + 1):
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.settimeout(None)
            sock.sendall(HELLO.pack(HELLO_MAGIC, HELLO_VERSION, mig_id, i, channels))
            conns.append(_socket_connection(f"tcp:{host}:{port}#{i}", sock, mig_id))
    except OSError as err:
        for c in conns:
            c.close()
        raise TransportError(f"cannot connect to {host}:{port}: {err}") from None
    return conns


def tcp_resume(uri: str, migration_id: bytes, *, timeout: float = 10.0) -> Connection:
    """A resume connection to the destination at ``uri`` for the migration ``migration_id``."""
    host, port = parse_tcp(uri)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(None)
        sock.sendall(HELLO.pack(HELLO_MAGIC, HELLO_VERSION, migration_id, RESUME_CHANNEL, 0))
    except OSError as err:
        raise TransportError(f"cannot connect to {host}:{port}: {err}") from None
    return _socket_connection(f"tcp:{host}:{port}#resume", sock, migration_id, resume=True)


class TcpListener:
    """The destination side: accepts the main connection and its channels (hellos must agree)."""

    def __init__(self, uri: str) -> None:
        host, port = parse_tcp(uri)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(MAX_CHANNELS)
        self.host, self.port = self._sock.getsockname()[:2]

    @property
    def uri(self) -> str:
        return f"tcp:{self.host}:{self.port}"

    def accept(self, *, timeout: float | None = None) -> list[Connection]:
        """Block until one migration's main connection and all its channels have connected, or until a
        resume connection arrives (returned alone, with ``resume`` set)."""
        self._sock.settimeout(timeout)
        conns: dict[int, Connection] = {}
        expected, mig_id = None, None
        try:
            while expected is None or len(conns) < expected + 1:
                sock, peer = self._sock.accept()
                sock.settimeout(10.0)
                try:
                    hello = _recv_exact(sock, HELLO.size)
                except OSError:
                    sock.close()
                    raise
                magic, version, mid, index, count = HELLO.unpack(hello)
                if magic == HELLO_MAGIC and version == HELLO_VERSION and index == RESUME_CHANNEL and count == 0:
                    if mig_id is None:
                        sock.settimeout(None)
                        return [_socket_connection(f"tcp:{peer[0]}:{peer[1]}#resume", sock, mid, resume=True)]
                    sock.close()  # in the middle of another migration's channels: the source retries
                    continue
                if magic != HELLO_MAGIC or version != HELLO_VERSION or count > MAX_CHANNELS or index > count:
                    sock.close()
                    raise TransportError(f"bad migration hello from {peer}")
                if mig_id is None:
                    mig_id, expected = mid, count
                elif mid != mig_id or count != expected or index in conns:
                    sock.close()
                    raise TransportError(f"unexpected connection from {peer} (another migration?)")
                sock.settimeout(None)
                conns[index] = _socket_connection(f"tcp:{peer[0]}:{peer[1]}#{index}", sock, mid)
        except (OSError, TransportError):
            for c in conns.values():
                c.close()
            raise
        return [conns[i] for i in range(expected + 1)]

    def close(self) -> None:
        try:  # wakes a thread blocked in accept(); close() alone leaves it (and the port) in place
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise TransportError("connection closed during the hello")
        out += chunk
    return bytes(out)


def file_writer(path: str) -> Connection:
    return Connection(f"file:{path}", open(path, "wb"), None)


def file_reader(path: str) -> Connection:
    return Connection(f"file:{path}", None, open(path, "rb", buffering=1 << 20))
