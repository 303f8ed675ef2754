"""Migration transports: in-process, TCP between processes or machines (optionally in TLS), and files.

Every transport yields ``Connection`` objects: a byte stream to write (``wfile``) and, except for
files, one to read (``rfile``), the reverse direction being QEMU's return path. A migration uses one
main connection (the QEMU stream) plus N page channels (multifd-like) for encrypted pages.

TCP connections open with a hello (``HELLO``: magic, version, migration id, channel number, channel
count) so the destination can tell the main stream from the channels of one migration, as QEMU's
multifd initial packet does. A hello whose channel number is ``RESUME_CHANNEL`` opens a resume
connection: the source delivers its commit decision again for the migration the hello names
(``docs/design.md``, "Commit"; ``docs/formats.md``, "Page channels").

With TLS (QEMU's ``tls-creds``, ``pysev.migration.tls``) every connection — main, page channels and
resume — is wrapped before its hello, and the destination answers each hello (``HELLO_REPLY``) once the
handshake, the client certificate and ``tls-authz`` have been checked, so that a refusal reaches the
source as a reason before any stream byte is sent. A TLS listener refuses a plain connection (and
tells a pysev source why, in a return-path FAILED message) and goes on listening.
"""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import uuid
from typing import BinaryIO, cast

from pysev.migration.stream.returnpath import ReturnMessage, write_return_message
from pysev.migration.tls import AuthzSimple, TlsCredsX509, TlsError, check_authz, describe, session_summary

log = logging.getLogger(__name__)

HELLO = struct.Struct(">II16sHH")  # magic, version, migration uuid, channel (0 = main), channel count
HELLO_MAGIC = 0x50535631  # "PSV1"
HELLO_VERSION = 1
RESUME_CHANNEL = 0xFFFF  # a hello's channel number for a resume connection (channel count 0)
# TLS only, destination -> source after each hello: magic, length of the UTF-8 refusal reason that
# follows (0: accepted).
HELLO_REPLY = struct.Struct(">IH")
HELLO_REASON_MAX = 1024
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
TLS_RECORD = 16 << 10  # the largest TLS plaintext record (RFC 8446 section 5.1)
_TLS_HANDSHAKE_RECORD = b"\x16\x03"  # how a ClientHello starts: record type handshake, version 3.x
HELLO_TIMEOUT = 10.0  # s: a connecting peer's hello (and TLS handshake) must arrive within this


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
        self._setup(self._sock)

    def _setup(self, sock: socket.socket) -> None:
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # doubled by the kernel
        self.lowat = max(1, min(BULK_LOWAT, granted // 2))
        self._bulk = False
        self.timeout: float | None = None

    def readable(self) -> bool:
        return True

    def _set_bulk(self, bulk: bool) -> None:
        if bulk != self._bulk:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.lowat if bulk else 1)
            self._bulk = bulk

    def _ready(self) -> bool:
        """Bytes readable without waiting for the socket (none: every byte is in the socket's queue)."""
        return False

    def _recv(self, b) -> int | None:
        try:
            n = self._sock.recv_into(b, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        self._set_bulk(n >= BULK_READ)
        return n

    def readinto(self, b) -> int:
        if self._bulk:
            if not self._ready():
                self._poll.poll(BULK_WAIT_MS)  # ready once lowat bytes are queued (or EOF, error)
            n = self._recv(b)
            if n is not None:
                return n
            self._set_bulk(False)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            n = self._recv(b) if self._ready() else None
            if n is not None:
                return n
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


class _TlsSession:
    """The SSL state of one TLS connection, shared by its reader and writer.

    OpenSSL forbids using one SSL object from two threads at once, and the engine does so (a destination
    thread may write FAILED on the main connection while another reads it), so every SSL call here is
    non-blocking and made under ``lock``; the waits happen outside the lock, in ``poll``. Writers are
    serialized as a whole (``write_lock``): a write that OpenSSL asked to retry must not be interleaved
    with another message."""

    def __init__(self, sock: ssl.SSLSocket, name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        # Plaintext that a failed write read while it looked for the peer's alert; the reader returns it first.
        self.stash = bytearray()
        self._cork = sock.family in (socket.AF_INET, socket.AF_INET6)

    def failure(self, err: ssl.SSLError) -> TransportError:
        text = describe(err)
        if "BAD_RECORD_MAC" in (err.reason or ""):
            text = f"a record failed authentication ({text}): the stream was altered in transit"
        return TransportError(f"TLS on {self.name}: {text}")

    def pending(self) -> bool:
        """Decrypted bytes are waiting in the session (a read returns them without touching the socket)."""
        with self.lock:
            return bool(self.stash) or self.sock.pending() > 0

    def read(self, b: memoryview) -> int | None:
        """Non-blocking: the plaintext that is decrypted, or can be decrypted from bytes already queued,
        up to ``len(b)``. None: nothing without waiting; 0: end of stream."""
        with self.lock:
            total = min(len(b), len(self.stash))
            if total:
                b[:total] = self.stash[:total]
                del self.stash[:total]
            while total < len(b):
                try:
                    n = self.sock.recv_into(b[total:])  # at most one TLS record
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                except ssl.SSLError as err:
                    raise self.failure(err) from None
                if n == 0:
                    return total
                total += n
            return total or None

    def write(self, data, timeout: float | None) -> None:
        view = memoryview(data).cast("B")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.write_lock:
            # A large write becomes many records (one send each): cork the socket so that the kernel
            # sends full segments rather than one per record.
            cork = self._cork and len(view) > TLS_RECORD
            if cork:
                self._set_cork(True)
            try:
                while True:
                    with self.lock:
                        try:
                            self.sock.send(view)  # all of it, or WANT_WRITE (OpenSSL keeps its place)
                            return
                        except ssl.SSLWantWriteError:
                            event = select.POLLOUT
                        except ssl.SSLWantReadError:
                            event = select.POLLIN
                        except (ssl.SSLEOFError, ssl.SSLSyscallError) as err:  # the peer went away
                            raise self._after_write_error(err) from None
                        except ssl.SSLError as err:
                            raise self.failure(err) from None
                        except OSError as err:
                            raise self._after_write_error(err) from None
                    _wait(self.sock, event, deadline)
            finally:
                if cork:
                    self._set_cork(False)

    def _set_cork(self, on: bool) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
        except OSError:
            pass

    def _after_write_error(self, err: OSError) -> OSError:
        """A write failed (the peer closed or reset the connection): when the peer ended the session
        with an alert (a record it could not authenticate, a certificate it refused), that is the
        reason. Plaintext read on the way is kept for the reader (a FAILED message, say). Lock held."""
        while len(self.stash) < (1 << 20):
            try:
                chunk = self.sock.recv(TLS_RECORD)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ssl.SSLError as alert:
                return TransportError(f"TLS on {self.name}: {describe(alert)} (the write failed: {describe(err)})")
            except OSError:
                break
            if not chunk:
                break
            self.stash += chunk
        return TransportError(f"TLS on {self.name}: {describe(err)}") if isinstance(err, ssl.SSLError) else err


def _wait(sock: socket.socket, event: int, deadline: float | None) -> None:
    wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
    poll = select.poll()
    poll.register(sock, event)
    if not poll.poll(wait) and deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError("timed out")


class _TlsWriter(io.RawIOBase):
    """Unbuffered writer over a TLS session (each write is whole before it returns)."""

    def __init__(self, session: _TlsSession) -> None:
        self._session = session
        self.timeout: float | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._session.write(data, self.timeout)
        return memoryview(data).nbytes


class _TlsReader(_SocketReader):
    """``_SocketReader``'s bulk reads over a TLS session. ``SO_RCVLOWAT`` counts the ciphertext queued
    in the socket; plaintext OpenSSL has already decrypted is invisible to it, so a read takes that
    first and never waits for the socket while the session holds some (``_ready``)."""

    def __init__(self, session: _TlsSession) -> None:
        self._session = session
        self._sock = session.sock
        self._setup(self._sock)

    def _ready(self) -> bool:
        return self._session.pending()

    def _recv(self, b) -> int | None:
        # At most about what one plain recv could return, so batches reach the destination as they flow.
        n = self._session.read(memoryview(b).cast("B")[:SOCKET_BUFFER])
        if n is not None:
            self._set_bulk(n >= BULK_READ)
        return n

    def close(self) -> None:
        io.RawIOBase.close(self)  # the socket is the connection's to close


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
        writer: _TlsWriter | None = None,
        tls: str | None = None,
    ) -> None:
        self.name = name
        #: The migration this connection belongs to (the hello's uuid; in-process pairs share one).
        self.migration_id = migration_id
        #: A resume connection: the source delivers its commit decision again (no stream follows).
        self.resume = resume
        #: The TLS session's protocol and cipher ("TLSv1.3 TLS_AES_256_GCM_SHA384"); None without TLS.
        self.tls = tls
        self.wfile = wfile
        self.rfile = rfile
        self._closer = closer
        self._sock = sock
        self._reader = reader
        self._writer = writer

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
        if self._writer is not None:  # TLS: the socket stays non-blocking; reader and writer wait in poll
            self._writer.timeout = seconds
        elif self._sock is not None:
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
                # The TCP connection itself: never the SSL state, which another thread may be using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            else:
                sock.close()
        except OSError:
            pass

    if isinstance(sock, ssl.SSLSocket):
        session = _TlsSession(sock, name)
        tls_reader, tls_writer = _TlsReader(session), _TlsWriter(session)
        return Connection(
            name,
            cast(BinaryIO, tls_writer),
            cast(BinaryIO, io.BufferedReader(tls_reader, 1 << 20)),
            closer,
            None,
            tls_reader,
            migration_id,
            resume,
            writer=tls_writer,
            tls=session_summary(sock),
        )
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


def _open(
    host: str, port: int, hello: bytes, timeout: float, tls: TlsCredsX509 | None, tls_hostname: str | None
) -> socket.socket:
    """Connect, handshake (TLS), send the hello; with TLS, wait for the destination to accept it."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if tls is not None:
            try:
                sock = tls.client_session(sock, tls_hostname or host)
            except (ssl.SSLError, ConnectionError) as err:
                hint = ""
                if isinstance(err, (ssl.SSLEOFError, ConnectionError)):
                    hint = " (the destination closed the connection: does it listen with tls-creds?)"
                raise TransportError(f"TLS handshake with {host}:{port} failed: {describe(err)}{hint}") from None
        try:
            sock.sendall(hello)
        except OSError:
            if tls is not None:  # refused at once (TLS 1.3: our certificate): the alert says why
                _read_hello_reply(sock, f"{host}:{port}")
            raise
        if tls is not None:
            _read_hello_reply(sock, f"{host}:{port}")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_hello_reply(sock: socket.socket, where: str) -> None:
    try:
        magic, n = HELLO_REPLY.unpack(_recv_exact(sock, HELLO_REPLY.size))
        reason = _recv_exact(sock, n).decode("utf-8", "replace") if n and magic == HELLO_MAGIC else ""
    except ssl.SSLError as err:  # TLS 1.3: the server's verdict on our certificate arrives here
        raise TransportError(f"TLS handshake with {where} failed: {describe(err)}") from None
    except (TransportError, ConnectionError) as err:
        raise TransportError(f"{where} closed the connection instead of accepting its hello ({err})") from None
    if magic != HELLO_MAGIC:
        raise TransportError(f"bad hello reply from {where}")
    if n:
        raise TransportError(f"the destination {where} refused the connection: {reason}")


def tcp_connect(
    uri: str,
    channels: int,
    *,
    timeout: float = 10.0,
    tls: TlsCredsX509 | None = None,
    tls_hostname: str | None = None,
) -> list[Connection]:
    """The source side: main connection then ``channels`` page channels, each announced by a hello. With
    ``tls`` (client credentials) every connection is TLS; the server certificate must match
    ``tls_hostname`` (default: the host of ``uri``), as QEMU's ``tls-hostname``."""
    host, port = parse_tcp(uri)
    mig_id = uuid.uuid4().bytes
    conns = []
    try:
        for i in range(channels + 1):
            sock = _open(
                host, port, HELLO.pack(HELLO_MAGIC, HELLO_VERSION, mig_id, i, channels), timeout, tls, tls_hostname
            )
            conns.append(_socket_connection(f"tcp:{host}:{port}#{i}", sock, mig_id))
    except OSError as err:
        for c in conns:
            c.close()
        if isinstance(err, TransportError):
            raise
        raise TransportError(f"cannot connect to {host}:{port}: {err}") from None
    if tls is not None:
        log.info("migration connections to %s:%d in %s", host, port, conns[0].tls)
    return conns


def tcp_resume(
    uri: str,
    migration_id: bytes,
    *,
    timeout: float = 10.0,
    tls: TlsCredsX509 | None = None,
    tls_hostname: str | None = None,
) -> Connection:
    """A resume connection to the destination at ``uri`` for the migration ``migration_id`` (in TLS
    when ``tls`` is given, as ``tcp_connect``)."""
    host, port = parse_tcp(uri)
    hello = HELLO.pack(HELLO_MAGIC, HELLO_VERSION, migration_id, RESUME_CHANNEL, 0)
    try:
        sock = _open(host, port, hello, timeout, tls, tls_hostname)
    except TransportError:
        raise
    except OSError as err:
        raise TransportError(f"cannot connect to {host}:{port}: {err}") from None
    return _socket_connection(f"tcp:{host}:{port}#resume", sock, migration_id, resume=True)


class _RefusedError(Exception):
    """A connection the TLS listener turned away (closed); the listener goes on."""


class TcpListener:
    """The destination side: accepts the main connection and its channels (hellos must agree). With
    ``tls`` (server credentials) every connection must be TLS, and with ``tls_authz`` its client
    certificate's distinguished name must be allowed (QEMU's ``tls-creds``, ``tls-authz``)."""

    def __init__(self, uri: str, *, tls: TlsCredsX509 | None = None, tls_authz: AuthzSimple | None = None) -> None:
        self.set_tls(tls, tls_authz)
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

    def set_tls(self, tls: TlsCredsX509 | None, tls_authz: AuthzSimple | None = None) -> None:
        """TLS (or none) from the next connection on: QEMU reads ``tls-creds`` when a connection arrives.
        TlsError for credentials that cannot serve (a client endpoint; tls-authz without peer checks)."""
        if tls is not None:
            tls.check_endpoint("server")
            if tls_authz is not None and not tls.verify_peer:
                raise TlsError(f"tls-authz needs client certificates: '{tls.id}' has verify-peer=off")
        elif tls_authz is not None:
            raise TlsError("tls-authz needs tls-creds")
        self.tls, self.tls_authz = tls, tls_authz

    def accept(self, *, timeout: float | None = None) -> list[Connection]:
        """Block until one migration's main connection and all its channels have connected, or until a
        resume connection arrives (returned alone, with ``resume`` set)."""
        self._sock.settimeout(timeout)
        conns: dict[int, Connection] = {}
        expected, mig_id = None, None
        try:
            while expected is None or len(conns) < expected + 1:
                sock, peer = self._sock.accept()
                where = f"tcp:{peer[0]}:{peer[1]}"
                tls, authz = self.tls, self.tls_authz
                try:
                    sock, hello = _server_hello(sock, where, tls, authz)
                except _RefusedError as why:
                    log.warning("migration connection from %s refused: %s", where, why)
                    if conns:  # one of the channels being collected: this migration cannot complete
                        raise TransportError(f"page channel from {where} refused: {why}") from None
                    continue
                magic, version, mid, index, count = HELLO.unpack(hello)
                if magic == HELLO_MAGIC and version == HELLO_VERSION and index == RESUME_CHANNEL and count == 0:
                    if mig_id is None:
                        _admit(sock, tls)
                        return [_socket_connection(f"{where}#resume", sock, mid, resume=True)]
                    # in the middle of another migration's channels: the source retries
                    _refuse(sock, tls, "another migration is connecting; retry")
                    continue
                if magic != HELLO_MAGIC or version != HELLO_VERSION or count > MAX_CHANNELS or index > count:
                    _refuse(sock, tls, "bad migration hello")
                    raise TransportError(f"bad migration hello from {peer}")
                if mig_id is None:
                    mig_id, expected = mid, count
                elif mid != mig_id or count != expected or index in conns:
                    _refuse(sock, tls, "another migration is connecting")
                    raise TransportError(f"unexpected connection from {peer} (another migration?)")
                _admit(sock, tls)
                conns[index] = _socket_connection(f"{where}#{index}", sock, mid)
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


def _server_hello(
    sock: socket.socket, where: str, tls: TlsCredsX509 | None, authz: AuthzSimple | None
) -> tuple[socket.socket, bytes]:
    """The hello of an accepted connection, after the TLS handshake and the authz check when ``tls``.
    _RefusedError (socket closed) for a connection a TLS listener turns away; without TLS, OSError as before."""
    sock.settimeout(HELLO_TIMEOUT)
    try:
        if tls is None:
            hello = _recv_exact(sock, HELLO.size)
            if hello.startswith(_TLS_HANDSHAKE_RECORD):
                raise TransportError(f"a TLS client connected from {where}, but tls-creds is not set here")
            return sock, hello
        try:
            if sock.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL) == struct.pack(">I", HELLO_MAGIC):
                _refuse_plain(sock)
                raise _RefusedError("a connection without TLS, and this destination requires TLS (tls-creds)")
            ssock = tls.server_session(sock)
        except (ssl.SSLError, OSError) as err:
            raise _RefusedError(f"TLS handshake failed: {describe(err)}") from None
        sock = ssock
        try:
            hello = _recv_exact(sock, HELLO.size)
        except (ssl.SSLError, OSError) as err:
            raise _RefusedError(f"no hello after the TLS handshake: {describe(err)}") from None
        denied = check_authz(ssock, authz)
        if denied:
            _refuse(sock, tls, denied)
            raise _RefusedError(denied)
        return sock, hello
    except BaseException:
        sock.close()
        raise


def _refuse_plain(sock: socket.socket) -> None:
    """Tell a plain pysev source why (it reads a FAILED message after its first failed write)."""
    try:
        _recv_exact(sock, HELLO.size)  # read it, so that closing sends FIN rather than a reset
        reason = "this destination requires TLS (tls-creds is set): the source connected without TLS"
        write_return_message(cast(BinaryIO, _SocketWriter(sock)), ReturnMessage.FAILED, reason.encode())
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _admit(sock: socket.socket, tls: TlsCredsX509 | None) -> None:
    if tls is not None:
        sock.sendall(HELLO_REPLY.pack(HELLO_MAGIC, 0))
    sock.settimeout(None)


def _refuse(sock: socket.socket, tls: TlsCredsX509 | None, reason: str) -> None:
    """Close a connection after its hello; a TLS source is told why."""
    try:
        if tls is not None:
            data = reason.encode()[:HELLO_REASON_MAX]
            sock.sendall(HELLO_REPLY.pack(HELLO_MAGIC, len(data)) + data)
    except OSError:
        pass
    finally:
        sock.close()


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
