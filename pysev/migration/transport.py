"""Migration transports: in-process, TCP between processes or machines, and files.

Every transport yields ``Connection`` objects: a byte stream to write (``wfile``) and, except for
files, one to read (``rfile``), the reverse direction being QEMU's return path. A migration uses one
main connection (the QEMU stream) plus N page channels (multifd-like) for encrypted pages.

TCP connections open with a hello (``HELLO``: magic, version, migration id, channel number, channel
count) so the destination can tell the main stream from the channels of one migration, as QEMU's
multifd initial packet does.
"""
from __future__ import annotations

import io
import os
import socket
import struct
import uuid
from typing import BinaryIO

HELLO = struct.Struct(">II16sHH")  # magic, version, migration uuid, channel (0 = main), channel count
HELLO_MAGIC = 0x50535631           # "PSV1"
HELLO_VERSION = 1
MAX_CHANNELS = 64
SOCKET_BUFFER = 4 << 20


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


class Connection:
    def __init__(self, name: str, wfile: BinaryIO | None, rfile: BinaryIO | None, closer=None,
                 sock: socket.socket | None = None) -> None:
        self.name = name
        self.wfile = wfile
        self.rfile = rfile
        self._closer = closer
        self._sock = sock

    def set_timeout(self, seconds: float | None) -> None:
        """Bound blocking reads (a silent peer becomes a ``TimeoutError``, not a hang); files: no-op."""
        if self._sock is not None:
            self._sock.settimeout(seconds)

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


def _socket_connection(name: str, sock: socket.socket) -> Connection:
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

    return Connection(name, _SocketWriter(sock), sock.makefile("rb", buffering=1 << 20), closer, sock)


def inproc_pairs(channels: int) -> tuple[list[Connection], list[Connection]]:
    """Source and destination ends of 1 + ``channels`` in-process connections (socketpairs)."""
    src, dst = [], []
    for i in range(channels + 1):
        a, b = socket.socketpair()
        name = "main" if i == 0 else f"channel{i}"
        src.append(_socket_connection(f"inproc:{name}", a))
        dst.append(_socket_connection(f"inproc:{name}", b))
    return src, dst


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
            conns.append(_socket_connection(f"tcp:{host}:{port}#{i}", sock))
    except OSError as err:
        for c in conns:
            c.close()
        raise TransportError(f"cannot connect to {host}:{port}: {err}") from None
    return conns


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
        """Block until one migration's main connection and all its channels have connected."""
        self._sock.settimeout(timeout)
        conns: dict[int, Connection] = {}
        expected, mig_id = None, None
        try:
            while expected is None or len(conns) < expected + 1:
                sock, peer = self._sock.accept()
                sock.settimeout(10.0)
                hello = _recv_exact(sock, HELLO.size)
                magic, version, mid, index, count = HELLO.unpack(hello)
                if magic != HELLO_MAGIC or version != HELLO_VERSION or count > MAX_CHANNELS or index > count:
                    sock.close()
                    raise TransportError(f"bad migration hello from {peer}")
                if mig_id is None:
                    mig_id, expected = mid, count
                elif mid != mig_id or count != expected or index in conns:
                    sock.close()
                    raise TransportError(f"unexpected connection from {peer} (another migration?)")
                sock.settimeout(None)
                conns[index] = _socket_connection(f"tcp:{peer[0]}:{peer[1]}#{index}", sock)
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
