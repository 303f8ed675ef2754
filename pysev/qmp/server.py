"""QMP protocol server: transport, framing, negotiation, dispatch and events (QEMU's ``docs/interop/qmp-spec.rst``).

The wire contract is QEMU's ``monitor/qmp.c`` as the PyPI ``qemu.qmp`` client sees it:

* the server speaks first with the greeting ``{"QMP": {"version": …, "capabilities": []}}`` and starts in
  capabilities-negotiation mode, where only ``qmp_capabilities`` runs;
* client→server JSON objects are *not* line-framed, so input goes through :class:`JsonStreamer`, which plays
  the part of QEMU's ``json-streamer.c``: it splits a byte stream into top-level JSON texts by counting
  braces outside strings, bounds every message by ``max_message`` and survives malformed input;
* server→client messages are one JSON text per line, ending in ``\\r\\n`` as QEMU's monitor writes them;
* a reply echoes the request's ``"id"`` verbatim; parse errors and non-object input have no id to echo.

Commands come from a :class:`CommandTable` (``pysev.qmp.commands``), declared with an argument schema that
is checked, with QEMU's qobject-input-visitor messages, before a handler runs. Handlers are plain blocking
callables run on a worker thread, one command at a time per client (QEMU without OOB), so a slow command
never stalls another client. The VMM is thread-based: :meth:`QmpServer.run_in_thread` gives the server its
own event loop, and :meth:`QmpServer.emit_event` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Mapping
from typing import Any

from pysev.qmp.commands import CommandTable, QmpError, Session, generic_error
from pysev.qmp.framing import DEFAULT_MAX_MESSAGE, JsonStreamer

__all__ = ["QmpServer"]

log = logging.getLogger(__name__)

#: A client that stops reading is dropped once this much output is queued for it (events are broadcast
#: without back-pressure, so the bound has to be explicit).
DEFAULT_MAX_OUTPUT = 16 << 20
_READ_CHUNK = 64 * 1024

_NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"


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

    def __init__(
        self,
        commands: CommandTable,
        *,
        version: tuple[int, int, int] = (8, 2, 0),
        package: str = "pysev-0.1.0",
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_workers: int = 16,
    ) -> None:
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
        if isinstance(self._sockaddr, tuple):
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
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
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
                    os.unlink(where)  # a stale socket of an earlier run, as QEMU does
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
        if isinstance(self._sockaddr, str):  # a UNIX socket path
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
            with contextlib.suppress(RuntimeError):  # loop already closed
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
        msg: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
            "event": name,
        }
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
            log.warning("QMP client %d (%s) is not reading its output; disconnecting it", session.id, session.peer)
            writer.transport.abort()
            return False
        writer.write(line)
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted just as the server was closing
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None  # a client handler runs as a task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        peer = writer.get_extra_info("peername") or "unix"
        session = Session(next(self._ids), str(peer), self, writer=writer)
        self._sessions.add(session)
        log.info("QMP client %d connected from %s", session.id, session.peer)
        try:
            await self._serve(session, reader, writer)
        except asyncio.CancelledError:
            pass  # server closing
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
                    reply = _line({"error": generic_error(err.desc).to_json()})
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
            return _line({"error": generic_error("QMP input must be a JSON object").to_json()})
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
            return _line(
                {"error": generic_error(f"Command {name} returned a value that is not JSON").to_json(), **ident}
            )

    @staticmethod
    def _check_request(request: dict) -> tuple[str, dict]:
        # qmp_dispatch_check_obj: members checked in the order they arrived.
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise generic_error("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise generic_error("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise generic_error(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise generic_error("QMP input lacks member 'execute'")
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
            raise generic_error(str(e) or type(e).__name__) from None
        if name == "qmp_capabilities":
            session.negotiated = True
            log.info("QMP client %d negotiated capabilities", session.id)
        return {} if result is None else result
