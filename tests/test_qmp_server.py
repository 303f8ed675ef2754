"""QMP protocol server: the real ``qemu.qmp`` client (async and legacy sync) over UNIX and TCP, plus raw
sockets for everything a client library never sends (split/merged objects, malformed and hostile input,
limits, disconnects, concurrency, negotiation rules)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from pysev.qmp.commands import ArgEnum, CommandTable, QmpError
from pysev.qmp.framing import JsonStreamer
from pysev.qmp.server import QmpServer

TIMEOUT = 5.0
SLEEP = 0.5


class _Unserialisable:
    pass


def toy_table() -> CommandTable:
    t = CommandTable()

    @t.command("echo", args={"data": ("any", False)})
    def echo(args, session):
        return {"data": args.get("data"), "session": session.id}

    @t.command("add", args={"a": ("int", True), "b": ("int", True)})
    def add(args, session):
        return args["a"] + args["b"]

    @t.command("sleep", args={"seconds": ("number", False)})
    def sleep(args, session):
        time.sleep(args.get("seconds", SLEEP))

    @t.command("boom")
    def boom(args, session):
        raise RuntimeError("kaboom")

    @t.command("fail")
    def fail(args, session):
        raise QmpError("DeviceNotFound", "no such device")

    @t.command("emit", args={"name": ("str", True), "data": ("object", False)})
    def emit(args, session):
        session.server.emit_event(args["name"], args.get("data"))

    @t.command("bad-return")
    def bad_return(args, session):
        return {"x": _Unserialisable()}

    t.register(
        "typed",
        lambda args, session: args,
        args={
            "s": ("str", False),
            "u": ("uint", False),
            "n": ("number", False),
            "f": ("bool", False),
            "sn": ("strornull", False),
            "mode": (ArgEnum("none", "zlib"), False),
            "caps": ([{"capability": ("str", True), "state": ("bool", True)}], False),
            "opts": ({"level": ("int", True)}, False),
        },
    )
    return t


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="qmp", dir="/tmp")  # short: sun_path holds 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def serving(address, **kw):
    server = QmpServer(toy_table(), **kw)
    server.run_in_thread(address)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def unix_server(sockdir):
    with serving(os.path.join(sockdir, "qmp.sock")) as s:
        yield s


@pytest.fixture
def tcp_server():
    with serving("tcp:127.0.0.1:0") as s:
        yield s


@pytest.fixture(params=["unix", "tcp"])
def server(request, sockdir):
    addr = os.path.join(sockdir, "qmp.sock") if request.param == "unix" else "tcp:127.0.0.1:0"
    with serving(addr) as s:
        yield s


class Raw:
    """A blocking raw-socket client that reads the server's newline-terminated replies."""

    def __init__(self, server: QmpServer, negotiate: bool = True) -> None:
        addr = server.sockaddr
        family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(addr)
        self.buf = b""
        self.greeting = self.recv()
        if negotiate:
            assert self.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    def send(self, data: bytes | dict) -> None:
        self.sock.sendall(json.dumps(data).encode() if isinstance(data, dict) else data)

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"server closed the connection; pending {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        assert line.endswith(b"\r")
        return json.loads(line)

    def cmd(self, data: bytes | dict) -> dict:
        self.send(data)
        return self.recv()

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def err(class_: str, desc: str, **extra) -> dict:
    return {"error": {"class": class_, "desc": desc}, **extra}


def generic(desc: str, **extra) -> dict:
    return err("GenericError", desc, **extra)


# --- the real client ---------------------------------------------------------------------------------


def test_async_client(server):
    async def main():
        qmp = QMPClient("test")
        await qmp.connect(server.sockaddr)
        try:
            assert qmp.greeting.QMP.version == {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": "pysev-0.1.0"}
            assert qmp.greeting.QMP.capabilities == []
            assert await qmp.execute("add", {"a": 40, "b": 2}) == 42
            assert (await qmp.execute("echo", {"data": [1, "é", None]}))["data"] == [1, "é", None]
            assert await qmp.execute("query-version") == server.version_info()
            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert {"qmp_capabilities", "query-commands", "query-version", "add", "sleep"} <= names
            assert await qmp.execute("sleep", {"seconds": 0.01}) == {}
            cases = [
                ("boom", None, "GenericError", "kaboom"),
                ("fail", None, "DeviceNotFound", "no such device"),
                ("nope", None, "CommandNotFound", "The command nope has not been found"),
                ("add", {"a": 1}, "GenericError", "Parameter 'b' is missing"),
                ("add", {"a": "1", "b": 2}, "GenericError", "Invalid parameter type for 'a', expected: integer"),
                (
                    "qmp_capabilities",
                    None,
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                ),
            ]
            for cmd, args, class_, desc in cases:
                with pytest.raises(ExecuteError) as ei:
                    await qmp.execute(cmd, args)
                assert (ei.value.error_class, ei.value.error.error.desc) == (class_, desc)
            await qmp.execute("emit", {"name": "MIGRATION", "data": {"status": "setup"}})
            ev = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
            assert ev["event"] == "MIGRATION" and ev["data"] == {"status": "setup"}
            # From a thread that is neither the loop's nor a command's, as the VMM's migration thread does.
            threading.Thread(target=server.emit_event, args=("MIGRATION_PASS", {"pass": 1})).start()
            ev = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
            assert ev["event"] == "MIGRATION_PASS" and ev["data"] == {"pass": 1}
            ts = ev["timestamp"]
            assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - time.time()) < 60
            assert 0 <= ts["microseconds"] < 1_000_000
        finally:
            await qmp.disconnect()

    asyncio.run(main())


def test_legacy_client(server):
    loop = asyncio.new_event_loop()  # the shim runs on the thread's loop; own and close it here
    asyncio.set_event_loop(loop)
    try:
        qmp = QEMUMonitorProtocol(server.sockaddr)
        try:
            greeting = qmp.connect()
            assert greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 8}
            assert qmp.cmd("add", a=2, b=3) == 5
            assert qmp.cmd_obj({"execute": "add", "arguments": {"a": 1, "b": 1}, "id": "x1"}) == {
                "return": 2,
                "id": "x1",
            }
            assert qmp.cmd_obj({"execute": "nope", "id": "x7"}) == err(
                "CommandNotFound", "The command nope has not been found", id="x7"
            )
            with pytest.raises(ExecuteError) as ei:
                qmp.cmd("boom")
            assert ei.value.error_class == "GenericError"
            server.emit_event("STOP")
            ev = qmp.pull_event(wait=TIMEOUT)
            assert ev["event"] == "STOP" and "data" not in ev and set(ev["timestamp"]) == {"seconds", "microseconds"}
            server.emit_event("MIGRATION", {"status": "completed"})
            assert [e["data"] for e in qmp.get_events(wait=TIMEOUT)] == [{"status": "completed"}]
        finally:
            qmp.close()
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_concurrent_clients_do_not_block_each_other(unix_server):
    """Five clients each run a 0.5 s command at once: handlers run off the event loop."""

    async def one(k):
        qmp = QMPClient(f"c{k}")
        await qmp.connect(unix_server.sockaddr)
        try:
            await qmp.execute("sleep", {"seconds": SLEEP})
            assert await qmp.execute("add", {"a": k, "b": 1}) == k + 1
            return (await qmp.execute("echo"))["session"]
        finally:
            await qmp.disconnect()

    async def main():
        t0 = time.monotonic()
        ids = await asyncio.gather(*(one(k) for k in range(5)))
        return time.monotonic() - t0, ids

    elapsed, ids = asyncio.run(main())
    assert len(set(ids)) == 5
    assert elapsed < 5 * SLEEP * 0.8, elapsed


# --- raw framing -------------------------------------------------------------------------------------


def test_greeting_and_line_endings(unix_server):
    with Raw(unix_server, negotiate=False) as c:
        assert c.greeting == {"QMP": {"version": unix_server.version_info(), "capabilities": []}}


def test_split_byte_by_byte(unix_server):
    with Raw(unix_server) as c:
        for b in b'{"execute": "add", "arguments": {"a": 1, "b": 2}, "id": "k\\"}"}':
            c.send(bytes([b]))
        assert c.recv() == {"return": 3, "id": 'k"}'}


def test_several_objects_in_one_send_without_newlines(unix_server):
    with Raw(unix_server) as c:
        c.send(
            b'{"execute":"add","arguments":{"a":1,"b":1},"id":1}{"execute":"add","arguments":{"a":2,"b":2},"id":2}'
            b' \r\n\t {"execute":"echo","id":3}\n{"execute":"a'
            b'dd","arguments":{"a":3,"b":3},"id":4}'
        )
        assert [c.recv()["id"] for _ in range(4)] == [1, 2, 3, 4]


def test_id_echoed_verbatim(unix_server):
    with Raw(unix_server) as c:
        for ident in ["s", 0, -1.5, None, True, [1, {"a": []}], {"x": {"y": "z"}}, "é\u2028"]:
            assert c.cmd({"execute": "add", "arguments": {"a": 1, "b": 2}, "id": ident}) == {"return": 3, "id": ident}
            assert c.cmd({"execute": "boom", "id": ident}) == generic("kaboom", id=ident)
            assert c.cmd({"execute": "add", "id": ident}) == generic("Parameter 'a' is missing", id=ident)
            assert c.cmd({"execute": "nope", "id": ident})["id"] == ident
            assert c.cmd({"id": ident, "bogus": 1}) == generic("QMP input member 'bogus' is unexpected", id=ident)
        assert "id" not in c.cmd({"execute": "echo"})


def test_malformed_json_recovers(unix_server):
    with Raw(unix_server) as c:
        for bad in [
            b'{"execute": }',
            b'{"execute" "x"}',
            b"{'execute': 'echo'}",
            b"}",
            b"]",
            b"foo ",
            b'{"a": NaN}',
            b'{"a": 1, "a": 2}',
            b'{"a": "\x01"}',
            b"nul{}",
        ]:
            reply = c.cmd(bad)
            assert reply["error"]["class"] == "GenericError", bad
            assert reply["error"]["desc"].startswith("JSON parse error, "), (bad, reply)
            assert "id" not in reply
            if bad == b"nul{}":
                assert c.recv() == generic("QMP input lacks member 'execute'")  # "nul" fails, "{}" parses
            else:
                assert c.cmd({"execute": "add", "arguments": {"a": 1, "b": 1}, "id": 9}) == {"return": 2, "id": 9}


def test_non_object_input(unix_server):
    with Raw(unix_server) as c:
        for value in [b"[1, 2]", b"42 ", b'"execute"', b"null ", b"true\n", b"[]"]:
            assert c.cmd(value) == generic("QMP input must be a JSON object"), value


def test_request_shape_errors(unix_server):
    with Raw(unix_server) as c:
        cases = [
            ({"execute": 1}, "QMP input member 'execute' must be a string"),
            ({"execute": None}, "QMP input member 'execute' must be a string"),
            ({"execute": ["echo"]}, "QMP input member 'execute' must be a string"),
            ({}, "QMP input lacks member 'execute'"),
            ({"arguments": {}}, "QMP input lacks member 'execute'"),
            ({"execute": "echo", "argument": {}}, "QMP input member 'argument' is unexpected"),
            ({"exec-oob": "echo"}, "QMP input member 'exec-oob' is unexpected"),
            ({"execute": "echo", "arguments": []}, "QMP input member 'arguments' must be an object"),
            ({"execute": "echo", "arguments": None}, "QMP input member 'arguments' must be an object"),
        ]
        for req, desc in cases:
            assert c.cmd(req) == generic(desc), req


def test_argument_checking(unix_server):
    with Raw(unix_server) as c:

        def call(cmd, args):
            return c.cmd({"execute": cmd, "arguments": args})

        typed = lambda desc: generic(desc)  # noqa: E731
        ok = {
            "s": "x",
            "u": 2**64 - 1,
            "n": 1.5,
            "f": False,
            "sn": None,
            "mode": "zlib",
            "caps": [{"capability": "events", "state": True}],
            "opts": {"level": -3},
        }
        assert call("typed", ok) == {"return": ok}
        assert call("add", {"a": True, "b": 1}) == typed("Invalid parameter type for 'a', expected: integer")
        assert call("add", {"a": 1.0, "b": 1}) == typed("Invalid parameter type for 'a', expected: integer")
        assert call("add", {"a": 2**63, "b": 1}) == typed("Invalid parameter type for 'a', expected: integer")
        assert call("add", {"b": 1}) == typed("Parameter 'a' is missing")
        assert call("add", {"a": 1, "b": 2, "foo": 3}) == typed("Parameter 'foo' is unexpected")
        assert call("echo", {"foo": 3}) == typed("Parameter 'foo' is unexpected")
        cases = [
            ({"s": 1}, "Invalid parameter type for 's', expected: string"),
            ({"u": -1}, "Parameter 'u' expects uint64"),
            ({"n": "1"}, "Invalid parameter type for 'n', expected: number"),
            ({"n": False}, "Invalid parameter type for 'n', expected: number"),
            ({"f": 0}, "Invalid parameter type for 'f', expected: boolean"),
            ({"sn": 0}, "Invalid parameter type for 'sn', expected: StrOrNull"),
            ({"mode": "lz4"}, "Parameter 'mode' does not accept value 'lz4'"),
            ({"mode": 1}, "Invalid parameter type for 'mode', expected: string"),
            ({"caps": {}}, "Invalid parameter type for 'caps', expected: array"),
            ({"caps": [1]}, "Invalid parameter type for 'caps[0]', expected: object"),
            (
                {"caps": [{"capability": "x", "state": True}, {"state": True}]},
                "Parameter 'caps[1].capability' is missing",
            ),
            ({"caps": [{"capability": "x", "state": True, "z": 1}]}, "Parameter 'caps[0].z' is unexpected"),
            ({"opts": {"level": "9"}}, "Invalid parameter type for 'opts.level', expected: integer"),
        ]
        for args, desc in cases:
            assert call("typed", args) == typed(desc), args


def test_bad_handler_result_is_an_error(unix_server, caplog):
    with Raw(unix_server) as c:
        reply = c.cmd({"execute": "bad-return", "id": 1})
        assert reply["error"]["class"] == "GenericError" and reply["id"] == 1
        assert c.cmd({"execute": "echo", "id": 2})["id"] == 2


def test_handler_exception_logged_not_leaked(unix_server, caplog, capsys):
    with caplog.at_level(logging.ERROR, logger="pysev.qmp.server"):
        with Raw(unix_server) as c:
            assert c.cmd({"execute": "boom"}) == generic("kaboom")
    assert any(r.exc_info and "kaboom" in str(r.exc_info[1]) for r in caplog.records)
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err


# --- negotiation -------------------------------------------------------------------------------------


def test_negotiation_mode(unix_server):
    with Raw(unix_server, negotiate=False) as c:
        expecting = err("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        assert c.cmd({"execute": "add", "arguments": {"a": 1, "b": 1}}) == expecting
        assert c.cmd({"execute": "query-version", "id": 1}) == {**expecting, "id": 1}
        assert c.cmd({"execute": "nope"}) == expecting
        assert c.cmd({"execute": 3}) == generic("QMP input member 'execute' must be a string")
        assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == generic(
            "Capability oob not available"
        )
        assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}) == generic(
            "Parameter 'enable[0]' does not accept value 'x'"
        )
        unix_server.emit_event("EARLY")  # not negotiated: no events yet
        assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}) == {
            "return": {},
            "id": "n",
        }
        assert c.cmd({"execute": "qmp_capabilities"}) == err(
            "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
        )
        unix_server.emit_event("LATE", {"k": 1})
        ev = c.recv()
        assert ev["event"] == "LATE" and ev["data"] == {"k": 1}
        assert c.cmd({"execute": "add", "arguments": {"a": 1, "b": 1}}) == {"return": 2}


def test_events_reach_every_negotiated_client(unix_server):
    with Raw(unix_server) as a, Raw(unix_server) as b, Raw(unix_server, negotiate=False) as quiet:
        threads = [threading.Thread(target=unix_server.emit_event, args=("E", {"n": k})) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in (a, b):
            assert sorted(c.recv()["data"]["n"] for _ in range(8)) == list(range(8))
        assert quiet.cmd({"execute": "qmp_capabilities", "id": 0}) == {"return": {}, "id": 0}


# --- limits and hostile clients ----------------------------------------------------------------------


def test_oversized_message_closes_only_that_client(sockdir):
    with serving(os.path.join(sockdir, "q"), max_message=4096) as srv:
        with Raw(srv) as other, Raw(srv) as c:
            big = json.dumps({"execute": "echo", "arguments": {"data": "x" * 8000}}).encode()
            c.send(big)
            assert c.recv() == generic("JSON message size limit exceeded")
            assert c.at_eof()
            assert other.cmd({"execute": "add", "arguments": {"a": 1, "b": 1}}) == {"return": 2}
        with Raw(srv) as fresh:
            assert fresh.cmd({"execute": "echo", "arguments": {"data": "y" * 3000}})["return"]["data"] == "y" * 3000


def test_slowloris_is_bounded(sockdir):
    with serving(os.path.join(sockdir, "q"), max_message=4096) as srv, Raw(srv) as c:
        c.send(b'{"execute": "echo", "arguments": {"data": "')
        for _ in range(5):
            c.send(b"a" * 1000)  # never closes the string
        assert c.recv() == generic("JSON message size limit exceeded")
        assert c.at_eof()


def test_nesting_limit(unix_server):
    with Raw(unix_server) as c:
        c.send(b"[" * 100_000)
        assert c.recv() == generic("JSON nesting depth limit exceeded")
        assert c.at_eof()
    with Raw(unix_server) as c:
        assert c.cmd(b'{"execute": "echo", "arguments": {"data": ' + b"[" * 50 + b"]" * 50 + b"}}")["return"]


def test_one_mib_message_accepted(unix_server):
    with Raw(unix_server) as c:
        data = "z" * ((1 << 20) - 100)
        assert c.cmd({"execute": "echo", "arguments": {"data": data}})["return"]["data"] == data


def test_non_utf8_bytes(unix_server):
    with Raw(unix_server) as c:
        reply = c.cmd(b'{"execute": "echo", "arguments": {"data": "\xff\xfe"}}')
        assert reply["error"]["class"] == "GenericError" and "UTF-8" in reply["error"]["desc"]
        reply = c.cmd(b"\xc3\x28 ")
        assert reply["error"]["desc"].startswith("JSON parse error")
        assert c.cmd('{"execute": "echo", "arguments": {"data": "\u00e9"}}'.encode())["return"]["data"] == "é"


def test_disconnect_during_command(unix_server, caplog):
    with Raw(unix_server) as other:
        leaver = Raw(unix_server)
        leaver.send({"execute": "sleep", "arguments": {"seconds": SLEEP}})
        leaver.sock.shutdown(socket.SHUT_RDWR)
        leaver.close()
        t0 = time.monotonic()
        assert other.cmd({"execute": "add", "arguments": {"a": 1, "b": 1}}) == {"return": 2}
        assert time.monotonic() - t0 < SLEEP  # not queued behind the other client's sleep
        time.sleep(SLEEP + 0.2)  # the orphan reply is written (or not) by now
        assert other.cmd({"execute": "echo", "id": 1})["id"] == 1
    with Raw(unix_server) as fresh:
        assert fresh.cmd({"execute": "add", "arguments": {"a": 2, "b": 2}}) == {"return": 4}


def test_client_that_never_reads_is_dropped(sockdir):
    with serving(os.path.join(sockdir, "q"), max_output=256 * 1024) as srv:
        with Raw(srv) as deaf, Raw(srv) as live:
            deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            blob = "e" * 16384
            for k in range(200):  # ~3 MiB to a client that reads nothing
                srv.emit_event("FLOOD", {"k": k, "blob": blob})
                assert live.recv()["data"]["k"] == k
            deadline = time.monotonic() + TIMEOUT
            while len(srv.sessions) > 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(srv.sessions) == 1
            assert live.cmd({"execute": "add", "arguments": {"a": 1, "b": 1}}) == {"return": 2}


def test_garbage_clients_do_not_stop_server(unix_server):
    for junk in [b"", b"\x00\x01\x02", b"{" * 10, b'{"execute":"sleep"', os.urandom(4096)]:
        with Raw(unix_server, negotiate=False) as c:
            c.send(junk)
    with Raw(unix_server) as c:
        assert c.cmd({"execute": "add", "arguments": {"a": 1, "b": 1}}) == {"return": 2}


# --- lifecycle and API -------------------------------------------------------------------------------


def test_addresses_and_close(sockdir):
    path = os.path.join(sockdir, "life.sock")

    async def main():
        srv = QmpServer(toy_table(), version=(9, 1, 2), package="x")
        await srv.start("unix:" + path)
        assert srv.address == path and os.path.exists(path)
        qmp = QMPClient("t")
        await qmp.connect(path)
        assert await qmp.execute("query-version") == {"qemu": {"micro": 2, "minor": 1, "major": 9}, "package": "x"}
        await srv.close()  # with a client still connected
        with contextlib.suppress(EOFError, OSError):  # the client reports the lost connection
            await qmp.disconnect()
        assert not os.path.exists(path)

        tcp = QmpServer(toy_table())
        await tcp.start("tcp:127.0.0.1:0")
        host, port = tcp.sockaddr
        assert port > 0 and tcp.address == f"tcp:127.0.0.1:{port}"
        await tcp.close()

    asyncio.run(main())


def test_run_in_thread_stop_is_idempotent(sockdir):
    srv = QmpServer(CommandTable())
    addr = srv.run_in_thread(os.path.join(sockdir, "t.sock"))
    assert srv.address == addr
    srv.stop()
    srv.stop()
    srv.emit_event("AFTER_STOP")  # dropped, no error


def test_start_failures_leave_nothing_behind(sockdir):
    path = os.path.join(sockdir, "plain-file")
    open(path, "w").close()

    async def main():
        srv = QmpServer(CommandTable())
        with pytest.raises(OSError):
            await srv.start(path)  # not a socket: never unlinked
        assert os.path.isfile(path)
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(OSError):
                await srv.start(f"tcp:127.0.0.1:{busy.getsockname()[1]}")
        await srv.close()  # never started: no-op

    asyncio.run(main())
    with pytest.raises(OSError):
        QmpServer(CommandTable()).run_in_thread(path)


def test_table_rejects_bad_registrations():
    t = CommandTable()
    with pytest.raises(ValueError):
        t.register("qmp_capabilities", lambda a, s: None)
    with pytest.raises(ValueError):
        t.register("x", lambda a, s: None, args={"a": ("integer", True)})
    with pytest.raises(ValueError):
        t.register("y", lambda a, s: None, args={"a": "int"})
    with pytest.raises(ValueError):
        QmpServer(t, version=(8, 2))
    with pytest.raises(ValueError):
        asyncio.run(QmpServer(t).start("tcp:127.0.0.1"))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_streamer_independent_of_split_points(data):
    stream = b'{"execute":"a","id":[1,"}\\"{"]} 7 {"b":"\\\\"}[]"s"  }{"c":{"d":[{}]}} {bad}{"e":"\xc3\xa9"}\n'
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    whole = JsonStreamer(1024).feed(stream)
    parts, pieces, prev = JsonStreamer(1024), [], 0
    for cut in cuts + [len(stream)]:
        pieces += parts.feed(stream[prev:cut])
        prev = cut
    assert pieces == whole
    assert [v for v, e in whole if e is None] == [
        {"execute": "a", "id": [1, '}"{']},
        7,
        {"b": "\\"},
        [],
        "s",
        {"c": {"d": [{}]}},
        {"e": "é"},
    ]
    assert len([e for _, e in whole if e is not None]) == 2
