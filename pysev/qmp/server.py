"""QMP protocol server: transport, framing, negotiation, dispatch and events (QEMU's ``docs/interop/qmp-spec.rst``).

The wire contract is QEMU's ``monitor/qmp.c`` as the PyPI ``qemu.qmp`` client sees it (§4.2):

* the server speaks first with the greeting ``{"QMP": {"version": …, "capabilities": []}}`` and starts in
  capabilities-negotiation mode, where only ``qmp_capabilities`` runs;
* client→server JSON objects are *not* line-framed, so input goes through :class:`JsonStreamer`, which plays
  the part of QEMU's ``json-streamer.c``: it splits a byte stream into top-level JSON texts by counting
  braces outside strings, bounds every message by ``max_message`` and survives malformed input;
* server→client messages are one JSON text per line, ending in ``\\r\\n`` as QEMU's monitor writes them;
* a reply echoes the request's ``"id"`` verbatim; parse errors and non-object input have no id to echo.

Commands come from a :class:`CommandTable`, declared with an argument schema that is checked here, with
QEMU's qobject-input-visitor messages, before a handler runs. Handlers are plain blocking callables run on a
worker thread, one command at a time per client (QEMU without OOB), so a slow command never stalls another
client. The VMM is thread-based: :meth:`QmpServer.run_in_thread` gives the server its own event loop, and
:meth:`QmpServer.emit_event` may be called from any thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = [
    "ArgEnum", "Command", "CommandTable", "JsonStreamer", "QmpError", "QmpServer", "Session",
    "DEFAULT_MAX_MESSAGE", "MAX_NESTING",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE = 1 << 20
#: Deepest ``{``/``[`` nesting accepted. QEMU allows 1024; Python's json module recurses per level and the
#: interpreter's recursion limit is 1000, so the bound here is lower. QMP arguments nest a few levels.
MAX_NESTING = 128
#: A client that stops reading is dropped once this much output is queued for it (events are broadcast
#: without back-pressure, so the bound has to be explicit).
DEFAULT_MAX_OUTPUT = 16 << 20
_READ_CHUNK = 64 * 1024

_NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"


class QmpError(Exception):
    """A QMP error reply: ``{"error": {"class": class_, "desc": desc}}``. Handlers raise it."""

    def __init__(self, class_: str, desc: str) -> None:
        super().__init__(f"{class_}: {desc}")
        self.class_ = class_
        self.desc = desc

    def to_json(self) -> dict:
        return {"class": self.class_, "desc": self.desc}


def _generic(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


# ---------------------------------------------------------------------------------------------------------
# Framing: bytes -> top-level JSON values (QEMU qobject/json-streamer.c + json-parser.c)
# ---------------------------------------------------------------------------------------------------------

_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_STRING_SPECIAL = re.compile(rb'["\\]')
_TOKEN_END = re.compile(rb'[ \t\r\n{}\[\]"]')
_WHITESPACE = frozenset(b" \t\r\n")


def _no_duplicate_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key '{key}'")
            seen.add(key)
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


# Stricter than json.loads: JSON has no NaN/Infinity, and QEMU's parser rejects duplicate keys.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)


@dataclass(frozen=True)
class ParseError:
    """A framing or syntax error. ``fatal`` means the stream cannot be resynchronised (size/nesting limits)."""

    desc: str
    fatal: bool = False


class JsonStreamer:
    """Splits a byte stream into top-level JSON values, incrementally.

    Only structural bytes are tracked (``{}[]"`` and backslash escapes inside strings), which is enough to
    find where a value ends however the input was split; the complete value is then decoded as strict UTF-8
    JSON. A malformed value costs one :class:`ParseError` and parsing resumes after it, as in QEMU. Limits:
    a value (or an unfinished one) longer than ``max_message`` bytes, or nested deeper than ``max_depth``,
    is fatal, after which every further byte is ignored. Top-level scalars (``42``, ``true``) end at
    whitespace or at the next structural byte, so a trailing bare scalar waits for more input.
    """

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, max_depth: int = MAX_NESTING) -> None:
        if max_message < 2:
            raise ValueError("max_message must be at least 2 bytes")
        self.max_message = max_message
        self.max_depth = max_depth
        self._buf = bytearray()
        self._pos = 0          # next byte of _buf to scan
        self._start = -1       # offset of the pending value in _buf, -1 between values
        self._depth = 0
        self._in_string = False
        self._in_token = False  # inside a bare top-level scalar
        self.failed = False

    def feed(self, data: bytes) -> list[tuple[Any, ParseError | None]]:
        """Consume ``data``; return ``(value, None)`` per complete value and ``(None, error)`` per error."""
        out: list[tuple[Any, ParseError | None]] = []
        if self.failed:
            return out
        buf = self._buf
        buf += data
        i, n, start = self._pos, len(buf), self._start
        while i < n:
            if self._in_string:
                m = _STRING_SPECIAL.search(buf, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                if buf[j] == 0x5C:          # backslash: skip the escaped byte once it has arrived
                    if j + 1 >= n:
                        i = j
                        break
                    i = j + 2
                    continue
                self._in_string = False
                i = j + 1
                if self._depth == 0:
                    if not self._emit(out, buf, start, i):
                        return out
                    start = -1
            elif self._depth:
                m = _STRUCTURAL.search(buf, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                c = buf[j]
                i = j + 1
                if c == 0x22:
                    self._in_string = True
                elif c in b"{[":
                    self._depth += 1
                    if self._depth > self.max_depth:
                        self._fail(out, "JSON nesting depth limit exceeded")
                        return out
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        if not self._emit(out, buf, start, i):
                            return out
                        start = -1
            elif self._in_token:
                m = _TOKEN_END.search(buf, i)
                if m is None:
                    i = n
                    break
                i = m.start()               # the delimiter starts the next value; do not consume it
                self._in_token = False
                if not self._emit(out, buf, start, i):
                    return out
                start = -1
            else:
                c = buf[i]
                if c in _WHITESPACE:
                    i += 1
                    continue
                start = i
                i += 1
                if c in b"{[":
                    self._depth = 1
                elif c == 0x22:
                    self._in_string = True
                elif c in b"}]":
                    out.append((None, ParseError(f"JSON parse error, stray '{chr(c)}'")))
                    start = -1
                else:
                    self._in_token = True
        if start >= 0 and n - start > self.max_message:
            self._fail(out, "JSON message size limit exceeded")
            return out
        # Drop consumed bytes: keep only the pending value (if any) so memory stays bounded.
        keep = start if start >= 0 else i
        del buf[:keep]
        self._pos = i - keep
        self._start = 0 if start >= 0 else -1
        return out

    def _emit(self, out: list, buf: bytearray, start: int, end: int) -> bool:
        if end - start > self.max_message:
            self._fail(out, "JSON message size limit exceeded")
            return False
        out.append(self._decode(bytes(buf[start:end])))
        return True

    def _fail(self, out: list, desc: str) -> None:
        out.append((None, ParseError(desc, fatal=True)))
        self.failed = True
        self._buf = bytearray()
        self._pos, self._start, self._depth = 0, -1, 0

    @staticmethod
    def _decode(raw: bytes) -> tuple[Any, ParseError | None]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, ParseError(f"JSON parse error, invalid UTF-8 sequence at byte {e.start} of the message")
        try:
            return _DECODER.decode(text), None
        except json.JSONDecodeError as e:
            return None, ParseError(f"JSON parse error, {e.msg[:1].lower()}{e.msg[1:]} at byte {e.pos}")
        except (ValueError, RecursionError) as e:   # duplicate key, NaN, oversized integer literal
            return None, ParseError(f"JSON parse error, {e}")


# ---------------------------------------------------------------------------------------------------------
# Commands and their argument schemas (QEMU qapi/qobject-input-visitor.c messages)
# ---------------------------------------------------------------------------------------------------------

class ArgEnum:
    """An enum argument type: a string that must be one of ``values`` (QAPI ``enum``)."""

    def __init__(self, *values: str) -> None:
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError("ArgEnum needs at least one string value")
        self.values = tuple(values)

    def __repr__(self) -> str:
        return f"ArgEnum{self.values!r}"


_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT64 = (0, (1 << 64) - 1)

# name -> (predicate, QEMU's word for the type in "expected: …")
_SCALARS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "string"),
    "int": (lambda v: type(v) is int and _INT64[0] <= v <= _INT64[1], "integer"),
    "uint": (lambda v: type(v) is int and _UINT64[0] <= v <= _UINT64[1], "uint64"),
    "number": (lambda v: type(v) in (int, float), "number"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "object": (lambda v: isinstance(v, dict), "object"),
    "array": (lambda v: isinstance(v, list), "array"),
    "strornull": (lambda v: v is None or isinstance(v, str), "StrOrNull"),
    "any": (lambda v: True, "any"),
}

#: A type is a scalar name from ``_SCALARS``, an :class:`ArgEnum`, ``[T]`` (array of T) or a nested schema
#: ``{member: (T, required)}`` (a QAPI struct).
TypeSpec = Any
Schema = Mapping[str, "tuple[TypeSpec, bool]"]


def _check_typespec(spec: TypeSpec, where: str) -> None:
    if isinstance(spec, str):
        if spec not in _SCALARS:
            raise ValueError(f"{where}: unknown argument type {spec!r} (known: {', '.join(_SCALARS)})")
    elif isinstance(spec, ArgEnum):
        pass
    elif isinstance(spec, list):
        if len(spec) != 1:
            raise ValueError(f"{where}: an array type is written [element_type]")
        _check_typespec(spec[0], where + "[]")
    elif isinstance(spec, Mapping):
        _check_schema(spec, where)
    else:
        raise ValueError(f"{where}: bad argument type {spec!r}")


def _check_schema(schema: Schema, where: str) -> None:
    for name, entry in schema.items():
        if not isinstance(name, str) or not (isinstance(entry, tuple) and len(entry) == 2
                                             and isinstance(entry[1], bool)):
            raise ValueError(f"{where}: schema entries are name -> (type, required), got {name!r}: {entry!r}")
        _check_typespec(entry[0], f"{where}.{name}")


def _validate_struct(schema: Schema, value: dict, prefix: str) -> None:
    """Check ``value`` against ``schema`` in schema order, then reject unknown members (as QEMU's visitor)."""
    for name, (spec, required) in schema.items():
        full = prefix + name
        if name in value:
            _validate_value(spec, value[name], full)
        elif required:
            raise _generic(f"Parameter '{full}' is missing")
    for name in value:
        if name not in schema:
            raise _generic(f"Parameter '{prefix}{name}' is unexpected")


def _validate_value(spec: TypeSpec, value: Any, full: str) -> None:
    if isinstance(spec, str):
        ok, word = _SCALARS[spec]
        if not ok(value):
            if spec == "uint":      # QEMU's uint64 visitor words its error differently
                raise _generic(f"Parameter '{full}' expects uint64")
            raise _generic(f"Invalid parameter type for '{full}', expected: {word}")
    elif isinstance(spec, ArgEnum):
        if not isinstance(value, str):
            raise _generic(f"Invalid parameter type for '{full}', expected: string")
        if value not in spec.values:
            raise _generic(f"Parameter '{full}' does not accept value '{value}'")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise _generic(f"Invalid parameter type for '{full}', expected: array")
        for k, item in enumerate(value):
            _validate_value(spec[0], item, f"{full}[{k}]")
    else:
        if not isinstance(value, dict):
            raise _generic(f"Invalid parameter type for '{full}', expected: object")
        _validate_struct(spec, value, full + ".")


Handler = Callable[[dict, "Session"], Any]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    args: Schema
    allow_in_negotiation: bool = False
    # Built-ins that only read server state run on the event loop; everything else on a worker thread.
    inline: bool = False

    def validate(self, args: dict) -> None:
        _validate_struct(self.args, args, "")


class CommandTable:
    """The QMP commands a server offers, with their argument schemas.

    ``qmp_capabilities``, ``query-commands`` and ``query-version`` are built in. Register the rest with
    :meth:`register` or the :meth:`command` decorator; registration is thread-safe and may happen while a
    server is running.
    """

    BUILTINS = ("qmp_capabilities", "query-commands", "query-version")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: dict[str, Command] = {}
        self._add(Command("qmp_capabilities", _qmp_capabilities, {"enable": ([ArgEnum("oob")], False)},
                          allow_in_negotiation=True, inline=True))
        self._add(Command("query-commands", _query_commands, {}, inline=True))
        self._add(Command("query-version", _query_version, {}, inline=True))

    def _add(self, cmd: Command) -> None:
        with self._lock:
            if cmd.name in self._commands:
                raise ValueError(f"QMP command {cmd.name!r} is already registered")
            self._commands[cmd.name] = cmd

    def register(self, name: str, handler: Handler, args: Schema | None = None) -> Command:
        """Add command ``name``: ``handler(args, session)`` returns the ``"return"`` value (None means ``{}``)
        or raises :class:`QmpError`. ``args`` maps each argument to ``(type, required)``."""
        if not isinstance(name, str) or not name:
            raise ValueError("a QMP command name is a non-empty string")
        if not callable(handler):
            raise TypeError(f"handler for {name!r} is not callable")
        schema = dict(args or {})
        _check_schema(schema, name)
        cmd = Command(name, handler, schema)
        self._add(cmd)
        return cmd

    def command(self, name: str, args: Schema | None = None) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""
        def deco(fn: Handler) -> Handler:
            self.register(name, fn, args)
            return fn
        return deco

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands


def _qmp_capabilities(args: dict, session: Session) -> dict:
    if session.negotiated:
        raise QmpError("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    for cap in args.get("enable", []):
        # The greeting offers no capability (no out-of-band execution), so none can be enabled.
        raise _generic(f"Capability {cap} not available")
    return {}


def _query_commands(args: dict, session: Session) -> list:
    return [{"name": name} for name in session.server.commands.names()]


def _query_version(args: dict, session: Session) -> dict:
    return session.server.version_info()


# ---------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Session:
    """One connected client, as handlers see it."""

    id: int
    peer: str
    server: QmpServer
    negotiated: bool = False
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)


def _line(obj: Any) -> bytes:
    # QEMU's JSON style (", " and ": ", non-ASCII escaped) and its monitor's "\r\n" line end.
    return json.dumps(obj, allow_nan=False).encode("ascii") + b"\r\n"


def _parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    if address.startswith("tcp:"):
        host, sep, port = address[4:].rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"bad QMP address {address!r}: expected tcp:HOST:PORT")
        return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    path = address[5:] if address.startswith("unix:") else address
    if not path:
        raise ValueError("empty QMP socket path")
    return "unix", path


class QmpServer:
    """A QMP monitor listening on a UNIX socket path (``"unix:PATH"`` or ``"PATH"``) or ``"tcp:HOST:PORT"``."""

    def __init__(self, commands: CommandTable, *, version: tuple[int, int, int] = (8, 2, 0),
                 package: str = "pysev-0.1.0", max_message: int = DEFAULT_MAX_MESSAGE,
                 max_output: int = DEFAULT_MAX_OUTPUT, max_workers: int = 16) -> None:
        if len(version) != 3 or not all(type(v) is int and v >= 0 for v in version):
            raise ValueError(f"version must be (major, minor, micro), got {version!r}")
        self.commands = commands
        self.version = tuple(version)
        self.package = package
        self.max_message = max_message
        self.max_output = max_output
        self.max_workers = max_workers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._sessions: set[Session] = set()
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count(1)
        self._kind = ""
        self._sockaddr: str | tuple[str, int] | None = None
        self._thread: threading.Thread | None = None

    # -- addresses ------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The listening address, with the real port when port 0 was asked for."""
        if self._sockaddr is None:
            raise RuntimeError("QMP server is not listening")
        if self._kind == "tcp":
            host, port = self._sockaddr
            return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        return self._sockaddr

    @property
    def sockaddr(self) -> str | tuple[str, int]:
        """The address as ``qemu.qmp`` takes it: a path, or a ``(host, port)`` tuple."""
        if self._sockaddr is None:
            raise RuntimeError("QMP server is not listening")
        return self._sockaddr

    def version_info(self) -> dict:
        major, minor, micro = self.version
        return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": self.package}

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions)

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self, address: str) -> None:
        """Listen on ``address`` in the running event loop."""
        if self._server is not None:
            raise RuntimeError("QMP server already started")
        kind, where = _parse_address(address)
        self._loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="qmp-cmd")
        try:
            await self._listen(kind, where)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._kind = kind
        log.info("QMP server listening on %s", self.address)

    async def _listen(self, kind: str, where: Any) -> None:
        if kind == "tcp":
            host, port = where
            # Bind one socket (the first address), so that port 0 means one port, not one per family.
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)
            family, type_, proto, _, sa = infos[0]
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sa)
                self._server = await asyncio.start_server(self._client, sock=sock)
            except BaseException:
                sock.close()
                raise
            bound = sock.getsockname()
            self._sockaddr = (bound[0], bound[1])
        else:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(where).st_mode):
                    os.unlink(where)        # a stale socket of an earlier run, as QEMU does
            self._server = await asyncio.start_unix_server(self._client, path=where)
            self._sockaddr = where

    async def close(self) -> None:
        """Stop listening, disconnect every client and remove the UNIX socket. Running handlers finish on
        their worker threads; their replies are dropped."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for t in self._tasks:
            t.cancel()
        # Every client task, including those already past their session and only closing their socket.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        if self._kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self._sockaddr)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        log.info("QMP server on %s closed", self.address)

    def run_in_thread(self, address: str, timeout: float = 10.0) -> str:
        """Run the server on its own event loop in a daemon thread; return :attr:`address` once listening."""
        if self._thread is not None:
            raise RuntimeError("QMP server thread already running")
        loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start(address))
                except BaseException as e:
                    ready.set_exception(e)
                    return
                ready.set_result(self.address)
                loop.run_forever()
                loop.run_until_complete(self.close())
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception:
                log.exception("QMP server thread failed")
            finally:
                self._loop = None
                loop.close()

        self._thread = threading.Thread(target=main, name="qmp-server", daemon=True)
        self._thread.start()
        try:
            return ready.result(timeout)
        except BaseException:
            self._thread.join(timeout)
            self._thread = None
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Close a server started with :meth:`run_in_thread` and join its thread. Call from another thread."""
        thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("QmpServer.stop() called from the server's own thread")
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):    # loop already closed
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError("QMP server thread did not stop")
        self._thread = None

    # -- events ---------------------------------------------------------------------------------------

    def emit_event(self, name: str, data: Mapping | None = None) -> None:
        """Broadcast event ``name`` to every negotiated client. Thread-safe; the timestamp is taken here.
        ``data`` must be JSON-serialisable (checked here, in the caller's thread)."""
        if not isinstance(name, str) or not name:
            raise ValueError("a QMP event name is a non-empty string")
        now = time.time()
        seconds = int(now)
        msg: dict[str, Any] = {"timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
                               "event": name}
        if data is not None:
            msg["data"] = dict(data)
        line = _line(msg)
        loop = self._loop
        if loop is None or self._server is None:
            log.debug("QMP event %s dropped: server not running", name)
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, line)
        except RuntimeError:
            log.debug("QMP event %s dropped: event loop closed", name)

    def _broadcast(self, line: bytes) -> None:
        for session in list(self._sessions):
            if session.negotiated:
                self._send(session, line)

    # -- per client -----------------------------------------------------------------------------------

    def _send(self, session: Session, line: bytes) -> bool:
        writer = session.writer
        if writer is None or writer.is_closing():
            return False
        if writer.transport.get_write_buffer_size() + len(line) > self.max_output:
            log.warning("QMP client %d (%s) is not reading its output; disconnecting it",
                        session.id, session.peer)
            writer.transport.abort()
            return False
        writer.write(line)
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:        # accepted just as the server was closing
            writer.close()
            return
        task = asyncio.current_task()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        peer = writer.get_extra_info("peername") or "unix"
        session = Session(next(self._ids), str(peer), self, writer=writer)
        self._sessions.add(session)
        log.info("QMP client %d connected from %s", session.id, session.peer)
        try:
            await self._serve(session, reader, writer)
        except asyncio.CancelledError:
            pass                        # server closing
        except (ConnectionError, OSError) as e:
            log.info("QMP client %d: connection lost: %s", session.id, e)
        except Exception:
            log.exception("QMP client %d: internal error; disconnecting it", session.id)
        finally:
            self._sessions.discard(session)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()
            log.info("QMP client %d disconnected", session.id)

    async def _serve(self, session: Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._send(session, _line({"QMP": {"version": self.version_info(), "capabilities": []}}))
        await writer.drain()
        streamer = JsonStreamer(self.max_message)
        while True:
            data = await reader.read(_READ_CHUNK)
            if not data:
                return
            for value, err in streamer.feed(data):
                if err is not None:
                    log.warning("QMP client %d: %s", session.id, err.desc)
                    reply = _line({"error": _generic(err.desc).to_json()})
                else:
                    reply = await self._dispatch(session, value)
                if not self._send(session, reply):
                    return
                await writer.drain()
                if err is not None and err.fatal:
                    return

    async def _dispatch(self, session: Session, request: Any) -> bytes:
        """Run one request; return the encoded reply (qapi/qmp-dispatch.c ``qmp_dispatch``)."""
        if not isinstance(request, dict):
            return _line({"error": _generic("QMP input must be a JSON object").to_json()})
        ident = {"id": request["id"]} if "id" in request else {}
        try:
            name, args = self._check_request(request)
            result = await self._execute(session, name, args)
        except QmpError as e:
            return _line({"error": e.to_json(), **ident})
        try:
            return _line({"return": result, **ident})
        except (TypeError, ValueError) as e:
            log.error("QMP command %s returned a value that is not JSON: %s", name, e)
            return _line({"error": _generic(f"Command {name} returned a value that is not JSON").to_json(),
                          **ident})

    @staticmethod
    def _check_request(request: dict) -> tuple[str, dict]:
        # qmp_dispatch_check_obj: members checked in the order they arrived.
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise _generic("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise _generic("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise _generic(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise _generic("QMP input lacks member 'execute'")
        return request["execute"], request.get("arguments", {})

    async def _execute(self, session: Session, name: str, args: dict) -> Any:
        cmd = self.commands.get(name)
        if not session.negotiated and (cmd is None or not cmd.allow_in_negotiation):
            raise QmpError("CommandNotFound", _NEGOTIATION_DESC)
        if cmd is None:
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        cmd.validate(args)
        try:
            if cmd.inline:
                result = cmd.handler(args, session)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, cmd.handler, args, session)
        except QmpError:
            raise
        except Exception as e:
            log.exception("QMP command %s failed (client %d)", name, session.id)
            raise _generic(str(e) or type(e).__name__) from None
        if name == "qmp_capabilities":
            session.negotiated = True
            log.info("QMP client %d negotiated capabilities", session.id)
        return {} if result is None else result
