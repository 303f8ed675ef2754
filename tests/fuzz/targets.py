"""Fuzz targets for pysev's hostile-input surfaces, shared by the default test run (``tests/test_fuzz.py``,
driven by hypothesis) and the long campaign (``benchmarks/fuzz_campaign.py``, atheris or a mutation loop).

A target is ``target_<name>(data: bytes) -> str``: it feeds ``data`` to one parser or command surface,
checks what must hold for ANY input, and returns an outcome class (``"ok"``, ``"StreamError:page"``,
``"status:INVALID_LENGTH"``). A documented error is an outcome; everything else that leaves a target is a
finding: an undocumented exception, or an ``InvariantError`` (too slow, too much memory, a secret or
a traceback in error text, state changed by a refused firmware command, results that depend on how the
input was split). ``TARGETS`` lists them with their seed corpora (valid inputs the mutators start from).

Outcomes named ``known:…`` are findings already reported, each pinned by a strict-xfail test in
``tests/test_fuzz.py`` (``KNOWN_ISSUES``): the campaign counts them without calling them new.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import random
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from Crypto.Cipher import AES
from Crypto.PublicKey import ECC

import csev
from pysev.firmware import amdroot, certs
from pysev.firmware.sev import abi, session
from pysev.firmware.sev.abi import CBITPOS, Cmd, Policy, make_policy
from pysev.firmware.sev.platform import Platform
from pysev.firmware.status import SevStatus
from pysev.hw.hostmem import PAGE_SIZE, HostMemory
from pysev.migration import stream
from pysev.migration.stream import returnpath
from pysev.owner import GuestOwner
from pysev.qmp.commands import Session, generic_error
from pysev.qmp.framing import MAX_NESTING, JsonStreamer
from pysev.qmp.vmm import Vmm

DATA = Path(__file__).resolve().parent.parent / "data"
MiB = 1 << 20


class InvariantError(AssertionError):
    """A property that holds for every input was broken: a finding. ``kind`` groups findings (memory,
    time, secret, state, determinism, contract)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


#: Findings already reported: outcome → the strict-xfail test in tests/test_fuzz.py that pins it.
# Findings the campaign counts without calling them new, each pinned by a strict-xfail test of
# tests/test_fuzz.py. The first three (a vmdesc buffer grown before its bytes arrived, JSON numbers that
# overflowed to Infinity, a QMP reply that could not carry such an id) are fixed; their tests now pass.
KNOWN_ISSUES: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------------------
# shared checks
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cost:
    """What one execution took: wall time and peak traced allocation."""

    seconds: float = 0.0
    peak: int = 0


@contextlib.contextmanager
def measured() -> Iterator[Cost]:
    """Wall time and peak traced allocation (tracemalloc) of the block."""
    usage = Cost()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start(1)
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds = time.perf_counter() - t0
        usage.peak = max(0, tracemalloc.get_traced_memory()[1] - base)
        if started:
            tracemalloc.stop()


def check_time(usage: Cost, limit: float, what: str) -> None:
    if usage.seconds > limit:
        raise InvariantError("time", f"{what} took {usage.seconds:.2f} s (limit {limit} s)")


def check_error_text(
    text: str, what: str, *, limit: int = 2048, secrets: tuple[bytes, ...] = (), source: bytes = b""
) -> None:
    """Error text is short, is not a traceback (unless the input itself said so: messages may echo it) and
    names no secret."""
    if not isinstance(text, str) or not text:
        raise InvariantError("contract", f"{what}: empty or non-string error text {text!r}")
    if len(text) > limit:
        raise InvariantError("contract", f"{what}: error text of {len(text)} characters (limit {limit})")
    if "Traceback (most recent call last)" in text and b"Traceback" not in source:
        raise InvariantError("contract", f"{what}: error text is a traceback: {text[:200]!r}")
    leaked = leaked_secret(text, secrets)
    if leaked:
        raise InvariantError("secret", f"{what}: error text carries a secret ({leaked}): {text[:200]!r}")


def leaked_secret(text: str, secrets: tuple[bytes, ...]) -> str | None:
    """How ``text`` carries one of ``secrets`` (hex, raw, base64 or bytes repr), or None."""
    low = text.lower()
    for s in secrets:
        if len(s) < 8:
            continue
        if s.hex() in low:
            return "hex"
        if s.decode("latin-1") in text:
            return "raw"
        if base64.b64encode(s).decode().rstrip("=") in text:
            return "base64"
        if repr(s)[2:-1] in text:
            return "repr"
    return None


class Trickle(io.RawIOBase):
    """A file whose reads return the data in pieces of sizes fixed by the data itself: a socket that
    delivers a stream in arbitrary fragments (the reader must not depend on how it was split)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(bytes(data))
        self.pos = 0
        h = hashlib.sha256(bytes(self._data[:4096])).digest()
        self._sizes = [(1 + (b * 131) % 9000) if b % 3 else 1 + b % 7 for b in h]
        self._i = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._sizes[self._i % len(self._sizes)], len(self._data) - self.pos)
        self._i += 1
        b[:n] = self._data[self.pos : self.pos + n]
        self.pos += n
        return n

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos


def pieces(data: bytes) -> Iterator[bytes]:
    """``data`` cut at places fixed by its hash (the way a socket may deliver it)."""
    f = Trickle(data)
    while f.remaining:
        buf = bytearray(65536)
        n = f.readinto(buf)
        yield bytes(buf[:n])


# ---------------------------------------------------------------------------------------------------------
# mutations (the campaign's mutation loop; hypothesis drives the same operators)
# ---------------------------------------------------------------------------------------------------------
_BOUNDARY = (0, 1, 2, 15, 16, 17, 48, 52, 63, 64, 127, 128, 255, 256, 2084, 4095, 4096, 4097, 4168, 6252, 0x4000)
_BOUNDARY += (0x4001, 0x5000, 0x5001, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 51)
_BOUNDARY += ((1 << 63) - 1, 1 << 63, (1 << 64) - 1)
_INT_FORMATS = (">H", ">I", ">Q", "<H", "<I", "<Q", "B")


def mutate(data: bytes, rng: random.Random, corpus: list[bytes], hints: tuple[int, ...] = (), ops: int = 0) -> bytes:
    """One input derived from ``data``: bit flips, byte sets, truncations, insertions, deletions,
    splices with another corpus entry, and length-field edits (a boundary value or a hint written as
    an integer of every width and byte order)."""
    out = bytearray(data)
    for _ in range(ops or rng.choice((1, 1, 2, 3, 4, 8))):
        op = rng.randrange(9)
        n = len(out)
        pos = rng.randrange(n) if n else 0
        if op == 0 and n:  # flip a bit
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # set a byte
            out[pos] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2 and n:  # truncate
            del out[rng.randrange(n) :]
        elif op == 3:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 8, 52, 4096)))
        elif op == 4 and n:  # delete a run
            del out[pos : pos + rng.choice((1, 4, 8, 64, 4168))]
        elif op == 5 and corpus:  # splice: our head, another entry's tail
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            out[pos:] = other[cut:]
        elif op == 6 and corpus:  # copy a chunk of another entry over ours
            other = rng.choice(corpus)
            if other:
                a = rng.randrange(len(other))
                chunk = other[a : a + rng.choice((4, 8, 52, 128, 4168))]
                out[pos : pos + len(chunk)] = chunk
        elif n:  # length-field edit
            fmt = rng.choice(_INT_FORMATS)
            pool = _BOUNDARY + tuple(hints) + (n, n - 1, n + 1)
            value = rng.choice(pool) + rng.choice((0, 0, 0, -1, 1))
            size = struct.calcsize(fmt)
            value &= (1 << (8 * size)) - 1
            if op == 8 and hints:
                pos -= pos % 4
            if pos + size <= n:
                struct.pack_into(fmt, out, pos, value)
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------
# the migration stream reader
# ---------------------------------------------------------------------------------------------------------
#: The destination the golden streams were made for (tests/test_stream_golden.py, BLOCKS).
STREAM_BLOCKS = {"pc.ram": 16 * PAGE_SIZE, "vga.vram": 4 * PAGE_SIZE}
#: A small fixed read buffer, so that any growth beyond it shows in the memory bound.
STREAM_LIMITS = dataclasses.replace(stream.ReaderLimits(), read_chunk=64 << 10)
_TRICKLE_LIMITS = dataclasses.replace(stream.ReaderLimits(), read_chunk=PAGE_SIZE)
STREAM_TIME_LIMIT = 5.0


def stream_seeds() -> list[bytes]:
    seeds = [(DATA / "streams" / name).read_bytes() for name in ("sev_guest.mig", "plain_guest.mig")]
    header = struct.pack(">II", stream.QEMU_VM_FILE_MAGIC, stream.QEMU_VM_FILE_VERSION)
    seeds.append(header + b"\x00")  # header and EOF, no trailer
    return seeds


def _walk_stream(reader: stream.StreamReader, data: bytes) -> tuple[str, bytes, stream.StreamError | None]:
    """Read a whole stream as the destination does (``IncomingMigration._load_main``), checking every
    record against the reader's documented guarantees; returns (outcome, digest of what was read, error)."""
    h = hashlib.sha256()
    total_pages = sum(STREAM_BLOCKS.values()) // PAGE_SIZE
    contexts = 0

    def in_block(block: str, offset: int) -> None:
        size = STREAM_BLOCKS.get(block)
        if size is None or offset % PAGE_SIZE or offset + PAGE_SIZE > size:
            raise InvariantError("contract", f"reader returned page {block!r}+{offset:#x} outside the blocks")

    try:
        reader.read_header()
        while True:
            section = reader.next_section()
            h.update(repr(section).encode())
            if isinstance(section, stream.Eof):
                desc = reader.read_vmdesc()
                if desc is not None and not isinstance(desc, dict):
                    raise InvariantError("contract", f"vmdesc is {type(desc).__name__}, not an object")
                h.update(b"vmdesc" + json.dumps(desc, sort_keys=True).encode())
                return "ok", h.digest(), None
            if isinstance(section, stream.Configuration):
                if len(section.machine.encode()) > stream.ReaderLimits().max_machine_name:
                    raise InvariantError("contract", "machine name longer than its bound")
                continue
            if isinstance(section, stream.Command):
                if len(section.data) > stream.ReaderLimits().max_command_len:
                    raise InvariantError("contract", "command data longer than its bound")
                continue
            if isinstance(section, stream.Footer):
                continue
            if section.idstr == stream.VMSA_SECTION_IDSTR:
                vmsa = reader.read_vmsa_section(section)
                if len(vmsa.hdr) != 52 or len(vmsa.trans) != PAGE_SIZE:
                    raise InvariantError("contract", "VMSA packet of the wrong size")
                h.update(b"V%d" % vmsa.vcpu + vmsa.hdr + vmsa.trans)
                continue
            if section.idstr != stream.RAM_SECTION_IDSTR:
                return "unexpected-section", h.digest(), None  # the engine stops here (MigrationError)
            for rec in reader.ram_records():
                if isinstance(rec, stream.Page):
                    in_block(rec.block, rec.offset)
                    if len(rec.data) != PAGE_SIZE:
                        raise InvariantError("contract", "PAGE record without 4096 bytes")
                    h.update(b"P%s/%d" % (rec.block.encode(), rec.offset) + rec.data)
                elif isinstance(rec, stream.Zero):
                    in_block(rec.block, rec.offset)
                    h.update(b"Z%s/%d" % (rec.block.encode(), rec.offset))
                elif isinstance(rec, stream.EncryptedPages):
                    k = rec.count
                    if k < 1 or rec.hdrs.shape != (k, 52) or rec.trans.shape != (k, PAGE_SIZE):
                        raise InvariantError("contract", f"encrypted run of shape {rec.hdrs.shape}/{rec.trans.shape}")
                    if rec.context is not None:
                        contexts += 1
                        if contexts > 1 or len(rec.context.pdh) != 2084 or len(rec.context.session) != 128:
                            raise InvariantError("contract", "second or malformed SEND_START context")
                        h.update(b"C" + rec.context.pdh + rec.context.session)
                    for i in range(k):
                        in_block(rec.block, int(rec.offsets[i]))
                        h.update(b"E%s/%d" % (rec.block.encode(), int(rec.offsets[i])))
                        h.update(rec.hdrs[i].tobytes() + rec.trans[i].tobytes())
                elif isinstance(rec, stream.EncryptedBitmap):
                    if rec.block not in STREAM_BLOCKS:
                        raise InvariantError("contract", f"bitmap of unannounced block {rec.block!r}")
                    pages = 0
                    for e in rec.entries:
                        pages += e.npages
                        if e.start_gpa % PAGE_SIZE or len(e.bitmap) != stream.bitmap_size(e.npages):
                            raise InvariantError("contract", f"bitmap entry {e.start_gpa:#x}+{e.npages} malformed")
                        h.update(b"M%d/%d" % (e.start_gpa, e.npages) + e.bitmap)
                    if pages > total_pages:
                        raise InvariantError("contract", f"bitmaps describe {pages} pages of {total_pages}")
                elif isinstance(rec, stream.MemSize):
                    if any(STREAM_BLOCKS.get(name) != size for name, size in rec.blocks):
                        raise InvariantError("contract", f"MEM_SIZE {rec.blocks} accepted for other blocks")
                    h.update(repr(rec.blocks).encode())
                else:
                    h.update(b"EOS")
    except stream.StreamError as err:
        if not 0 <= err.offset <= len(data):
            raise InvariantError("contract", f"error offset {err.offset} outside the {len(data)}-byte stream") from err
        check_error_text(str(err), "StreamError", source=data)
        try:  # after the first error the reader is dead
            reader.next_section()
        except stream.StreamError as again:
            if str(again) != str(err):
                raise InvariantError("contract", f"dead reader raised {again!r} after {err!r}") from None
        else:
            raise InvariantError("contract", "reader kept reading after a StreamError") from err
        return f"StreamError:{err.record}", h.digest(), err


def target_stream(data: bytes) -> str:
    """The stream reader on a whole stream, as the destination reads it: in one piece (time and memory
    measured) and again in fragments, which must give the same records and the same error."""
    with measured() as usage:
        outcome, digest, err = _walk_stream(
            stream.StreamReader(io.BytesIO(data), STREAM_LIMITS, ram_blocks=STREAM_BLOCKS), data
        )
    check_time(usage, STREAM_TIME_LIMIT, "reading the stream")
    bound = STREAM_LIMITS.read_chunk + 8 * len(data) + 512 * 1024
    if usage.peak > bound:
        raise InvariantError("memory", f"reader peak {usage.peak} bytes for a {len(data)}-byte stream (bound {bound})")
    outcome2, digest2, err2 = _walk_stream(
        stream.StreamReader(Trickle(data), _TRICKLE_LIMITS, ram_blocks=STREAM_BLOCKS), data
    )
    if (outcome2, digest2, str(err2)) != (outcome, digest, str(err)):
        raise InvariantError(
            "determinism",
            f"in one piece: {outcome} {err}; in fragments: {outcome2} {err2} (records differ: {digest != digest2})",
        )
    return outcome


# ---------------------------------------------------------------------------------------------------------
# return-path (commit protocol) messages
# ---------------------------------------------------------------------------------------------------------
def return_path_seeds() -> list[bytes]:
    """One message of every type, each with the first data length its type accepts."""
    out = []
    for kind in returnpath.ReturnMessage:
        for n in (returnpath.DIGEST_SIZE, 1, 0, 64):
            body = hashlib.shake_256(b"%d" % kind).digest(n) if n else b""
            buf = io.BytesIO()
            try:
                returnpath.write_return_message(buf, kind, body)
            except ValueError:
                continue
            out.append(buf.getvalue())
            break
    out.append(b"".join(out))
    return out


def target_return_path(data: bytes) -> str:
    """A sequence of return-path messages: each parsed message writes back to the same bytes, and a
    connection that delivers them in fragments reads the same."""
    f = Trickle(data)
    first = None
    with measured() as usage:
        try:
            while first is None or f.remaining:
                at = f.pos
                msg = returnpath.read_return_message(f)
                if not isinstance(msg.kind, returnpath.ReturnMessage):
                    raise InvariantError("contract", f"message type {msg.kind!r} is not a ReturnMessage")
                out = io.BytesIO()
                returnpath.write_return_message(out, msg.kind, msg.data)
                if out.getvalue() != data[at : f.pos]:
                    raise InvariantError(
                        "contract", f"{msg.kind.name} does not write back to the bytes it was read from"
                    )
                if not isinstance(msg.reason, str):
                    raise InvariantError("contract", "reason is not a string")
                with contextlib.suppress(stream.StreamError):  # a DONE message's outcome, documented
                    getattr(msg, "outcome", None)
                first = first or msg.kind.name
        except stream.StreamError as err:
            check_error_text(str(err), "return-path StreamError")
            return "StreamError"
    check_time(usage, 1.0, "reading return-path messages")
    if usage.peak > 4 * len(data) + 64 * 1024:
        raise InvariantError("memory", f"{usage.peak} bytes to read {len(data)} bytes of messages")
    return f"ok:{first}"


# ---------------------------------------------------------------------------------------------------------
# QMP: framing and dispatch
# ---------------------------------------------------------------------------------------------------------
FRAMING_MAX = 4096  # a small message limit, so that the size limit is reachable


def qmp_seeds() -> list[bytes]:
    reqs = [
        {"execute": "qmp_capabilities"},
        {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1},
        {"execute": "query-status", "id": "a"},
        {"execute": "query-commands"},
        {"execute": "query-version", "id": {"nested": [1, 2.5, None, True]}},
        {"execute": "query-sev"},
        {"execute": "query-sev-capabilities", "id": 7},
        {"execute": "query-migrate"},
        {"execute": "query-migrate-parameters"},
        {"execute": "query-migrate-capabilities"},
        {"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 100, "sev-pdh": None, "tls-creds": ""}},
        {"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 70}},
        {
            "execute": "migrate-set-capabilities",
            "arguments": {"capabilities": [{"capability": "events", "state": True}]},
        },
        {"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}},
        {
            "execute": "migrate",
            "arguments": {
                "channels": [
                    {
                        "channel-type": "main",
                        "addr": {"transport": "socket", "type": "inet", "host": "::1", "port": "1"},
                    }
                ]
            },
        },
        {"execute": "migrate-incoming", "arguments": {"uri": "tcp:127.0.0.1:0"}},
        {"execute": "migrate_cancel"},
        {"execute": "x-guest-digest"},
        {"execute": "stop"},
        {"execute": "cont"},
        {"execute": "system_reset"},
        {"execute": "no-such-command", "arguments": {"x": 1}},
    ]
    lines = [json.dumps(r).encode() for r in reqs]
    seeds = [lines[0] + b"\n" + line for line in lines[1:]]
    seeds += [b"\r\n".join(lines), b'{"execute": "qmp_capabilities"} {"execute": "query-status", "id": "\\u00e9\\n"}']
    seeds += [b'[1, 2] 3 "x" {"a": {"b": [[[]]]}} }', b'{"a": 1, "a": 2}', b'{"x": NaN} {"y": "\xff"}']
    seeds += [b"[" * 130 + b"]" * 130, b'{"execute": "' + b"x" * 5000 + b'"}']
    seeds += [b'{"execute": "qmp_capabilities", "id": 1e308} [1.5e300, -2e-300, 123456789012345678901234567890]']
    return seeds


def _json_kinds(value: Any) -> Iterator[Any]:
    stack = [value]
    while stack:
        v = stack.pop()
        yield v
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _non_finite(value: Any) -> bool:
    return any(isinstance(v, float) and not math.isfinite(v) for v in _json_kinds(value))


def _canonical(items: list) -> list[tuple[str, str | None]]:
    return [(repr(v), None if e is None else "fatal" if e.fatal else e.desc) for v, e in items]


def target_qmp_framing(data: bytes) -> str:
    """``JsonStreamer``: the same values and errors whether the bytes come in one piece or in fragments;
    decoded values are strict JSON; after a fatal error nothing more; memory bounded by the message limit."""
    with measured() as usage:
        whole = JsonStreamer(FRAMING_MAX, MAX_NESTING)
        got = whole.feed(data)
    check_time(usage, 2.0, "framing")
    if usage.peak > 64 * len(data) + 1 * MiB:
        raise InvariantError("memory", f"framing peak {usage.peak} bytes for {len(data)} input bytes")
    split = JsonStreamer(FRAMING_MAX, MAX_NESTING)
    got2 = []
    for piece in pieces(data):
        got2 += split.feed(piece)
    # The size limit is checked where a piece ends, so which fatal limit is reported first may differ.
    if _canonical(got) != _canonical(got2):
        raise InvariantError("determinism", f"one piece: {got[:3]!r}…; fragments: {got2[:3]!r}…")
    outcome = "ok"
    for i, (value, err) in enumerate(got):
        if err is not None:
            check_error_text(err.desc, "ParseError", limit=FRAMING_MAX + 256, source=data)
            if err.fatal:
                if i != len(got) - 1 or not whole.failed or whole.feed(b"{}"):
                    raise InvariantError("contract", "values after a fatal framing error")
                return "ParseError:fatal"
            outcome = "ParseError"
            continue
        if _non_finite(value):
            raise InvariantError("contract", "framing produced a non-finite number")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvariantError("contract", f"decoded value is not JSON: {e}") from None
    return outcome


class _IsolatedVmm(Vmm):
    """The real VMM and its command table, minus the one effect a fuzz input must not have: a TCP listener
    (``migrate-incoming``). It waits for an incoming migration, so ``migrate`` is refused after its
    arguments are checked and no outgoing connection is made."""

    def _listen(self, uri: str) -> None:
        raise generic_error(f"fuzz harness: not listening on {uri!r}")


_MUTATING_QMP = frozenset(
    {"stop", "cont", "system_reset", "quit", "migrate-set-parameters", "migrate-set-capabilities"}
)
_QMP_CLASSES = frozenset({"GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"})


class _QmpWorld:
    def __init__(self) -> None:
        assert hasattr(Vmm, "_listen"), "Vmm._listen is gone: the fuzz harness would open TCP listeners"
        self.vmm = _IsolatedVmm(16 * MiB, incoming="defer", host_memory=64 * MiB, seed=1)
        self.server = self.vmm.server
        assert hasattr(self.server, "_dispatch"), "QmpServer._dispatch is gone: update the QMP fuzz target"
        self.loop = asyncio.new_event_loop()
        identity = getattr(self.vmm.host.platform, "_identity", None)
        keys = getattr(identity, "_keys", None)
        self.secrets = tuple(
            int(k.d).to_bytes(48, "big")
            for k in (getattr(keys, n, None) for n in ("pdh_key", "pek_key", "oca_key"))
            if k is not None
        )

    def close(self) -> None:
        self.loop.close()
        self.vmm.vm.destroy()


_qmp_world: _QmpWorld | None = None


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def target_qmp_dispatch(data: bytes) -> str:
    """The server's dispatcher behind the real ``Vmm`` command table: every request gets exactly one reply
    line, the request's id echoed, an error class QEMU has, a desc that is neither a traceback nor a secret,
    and no handler escapes with an unexpected exception. The outcome is the last reply's class."""
    global _qmp_world
    if _qmp_world is None:
        _qmp_world = _QmpWorld()
    world = _qmp_world
    sess = Session(1, "fuzz", world.server)
    values = JsonStreamer().feed(data)[:16]
    log = logging.getLogger("pysev.qmp")
    outcome = "no-request"
    for value, err in values:
        if err is not None:
            outcome = "ParseError"
            continue
        errors = _ErrorLog()
        log.addHandler(errors)
        try:
            with measured() as usage:
                reply = world.loop.run_until_complete(world.server._dispatch(sess, value))
        except ValueError:
            raise
        finally:
            log.removeHandler(errors)
        check_time(usage, 10.0, f"dispatching {str(value)[:80]}")
        if errors.records:
            r = errors.records[0]
            raise InvariantError(
                "contract", f"handler failed unexpectedly: {r.getMessage()} ({r.exc_info and r.exc_info[1]!r})"
            )
        answer = _check_reply(reply, value, world.secrets, data)
        name = value.get("execute") if isinstance(value, dict) else None
        if "return" in answer and name in _MUTATING_QMP:
            world.close()
            _qmp_world = world = _QmpWorld()
        outcome = "return" if "return" in answer else f"QmpError:{answer['error']['class']}"
    return outcome


def _check_reply(reply: bytes, request: Any, secrets: tuple[bytes, ...], source: bytes) -> dict:
    if not isinstance(reply, bytes) or not reply.endswith(b"\r\n") or b"\n" in reply[:-2]:
        raise InvariantError("contract", f"reply is not one line: {reply[:120]!r}")
    try:
        answer = json.loads(reply.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvariantError("contract", f"reply is not ASCII JSON: {e}") from None
    keys = set(answer) - {"id"}
    if not isinstance(answer, dict) or keys not in ({"return"}, {"error"}):
        raise InvariantError("contract", f"reply {answer!r} has neither exactly 'return' nor 'error'")
    has_id = isinstance(request, dict) and "id" in request
    if has_id != ("id" in answer) or (has_id and answer["id"] != json.loads(json.dumps(request["id"]))):
        raise InvariantError("contract", f"id not echoed verbatim: request {request!r}, reply {answer!r}")
    if "error" in answer:
        e = answer["error"]
        if set(e) != {"class", "desc"} or e["class"] not in _QMP_CLASSES:
            raise InvariantError("contract", f"error {e!r} is not a QEMU error class")
        check_error_text(e["desc"], f"QMP {e['class']}", limit=8192, secrets=secrets, source=source)
    return answer


# ---------------------------------------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------------------------------------
def _cert(gen: str, name: str) -> bytes:
    return (DATA / "sev-certs" / gen / name).read_bytes()


@functools.cache
def _simulated_certs() -> dict[str, bytes]:
    return _target_platform().public_certs()


def sev_cert_seeds() -> list[bytes]:
    out = [_cert(g, f"{n}.cert") for g in ("naples", "rome") for n in ("pdh", "pek", "oca", "cek")]
    out.append(_cert("migration-attack", "pdh_remote.cert"))
    sim = _simulated_certs()
    out += [sim["pdh"]] + [sim["cert_chain"][i * 2084 : (i + 1) * 2084] for i in range(3)]
    return out


@functools.cache
def _signers() -> tuple[Any, ...]:
    rome = {n: certs.SevCert.from_bytes(_cert("rome", f"{n}.cert")) for n in ("pek", "oca", "cek")}
    return (rome["pek"], rome["oca"], rome["cek"], certs.AmdCert.from_bytes(_cert("rome", "ask.cert")))


def target_sev_cert(data: bytes) -> str:
    """``SevCert.from_bytes`` (hostile input, ``CertError`` naming the field); a parsed certificate writes
    back to the same bytes, describes itself as JSON, and the firmware's checks on it return statuses."""
    with measured() as usage:
        try:
            cert = certs.SevCert.from_bytes(data)
        except certs.CertError as err:
            check_error_text(str(err), "CertError", limit=512)
            cert, outcome = None, f"CertError:{err.field}"
        status = certs.pdh_sanity_check(data)
        if not isinstance(status, SevStatus):
            raise InvariantError("contract", f"pdh_sanity_check returned {status!r}")
        if cert is not None:
            if cert.to_bytes() != bytes(data):
                raise InvariantError("contract", "a parsed SEV certificate does not write back to its bytes")
            json.dumps(cert.describe())
            for signer in _signers() + (cert,):
                st = certs.sev_cert_validate(cert, signer)
                if not isinstance(st, SevStatus):
                    raise InvariantError("contract", f"sev_cert_validate returned {st!r}")
            outcome = "ok"
    check_time(usage, 5.0, "parsing and validating a SEV certificate")
    return outcome


def amd_cert_seeds() -> list[bytes]:
    out = [_cert(g, n) for g in ("naples", "rome", "milan", "genoa", "turin") for n in ("ark.cert", "ask.cert")]
    out += [_cert("naples", "ark.cert.bad"), _cert("naples-kds-cek", "ask_ark_naples.cert")]
    out += [_cert("rome", "ask.cert") + _cert("rome", "ark.cert"), _simulated_certs()["amd_cert_chain"]]
    return out


@functools.cache
def _amd_parents() -> tuple[certs.AmdCert, ...]:
    return tuple(certs.AmdCert.from_bytes(_cert(g, "ark.cert")) for g in ("naples", "rome"))


def target_amd_cert(data: bytes) -> str:
    """``AmdCert.from_bytes`` and ``split_amd_chain`` (ASK ‖ ARK): ``CertError`` or certificates that write
    back to exactly the bytes they came from; ``amd_cert_validate`` returns a status for any parent."""
    parsed: list[certs.AmdCert] = []
    outcome = ""
    with measured() as usage:
        try:
            cert = certs.AmdCert.from_bytes(data, allow_unsigned=True)
        except certs.CertError as err:
            check_error_text(str(err), "CertError", limit=512)
            outcome = f"CertError:{err.field}"
        else:
            if cert.to_bytes() != bytes(data):
                raise InvariantError("contract", "a parsed AMD certificate does not write back to its bytes")
            parsed.append(cert)
            outcome = "cert"
        try:
            ask, ark = certs.split_amd_chain(data)
        except certs.CertError as err:
            check_error_text(str(err), "CertError", limit=512)
        else:
            if ask.to_bytes() + ark.to_bytes() != bytes(data):
                raise InvariantError("contract", "a split ASK ‖ ARK chain does not write back to its bytes")
            parsed += [ask, ark]
            outcome = "chain"
        for cert in parsed:
            json.dumps(cert.describe())
            for parent in (None, cert, *_amd_parents()):
                for usage_code in (certs.Usage.ARK, certs.Usage.ASK):
                    st = certs.amd_cert_validate(cert, parent, usage_code)
                    if not isinstance(st, SevStatus):
                        raise InvariantError("contract", f"amd_cert_validate returned {st!r}")
    check_time(usage, 10.0, "parsing and validating an AMD certificate")
    return outcome


# A chain input: byte 0 picks the trust anchor, then PDH ‖ PEK ‖ OCA ‖ CEK (2084 bytes each) ‖ ASK ‖ ARK.
_CHAIN_GENS = ("rome", "naples", "simulated")


@functools.cache
def _anchors() -> tuple[certs.TrustAnchor, ...]:
    arks = [certs.AmdCert.from_bytes(_cert(g, "ark.cert")) for g in _CHAIN_GENS[:2]]
    arks.append(certs.split_amd_chain(_simulated_certs()["amd_cert_chain"])[1])
    return tuple(certs.TrustAnchor.from_ark(a) for a in arks)


def cert_chain_seeds() -> list[bytes]:
    out = []
    for i, gen in enumerate(_CHAIN_GENS[:2]):
        parts = [_cert(gen, f"{n}.cert") for n in ("pdh", "pek", "oca", "cek", "ask", "ark")]
        out.append(bytes([i]) + b"".join(parts))
    sim = _simulated_certs()
    out.append(bytes([2]) + sim["pdh"] + sim["cert_chain"] + sim["amd_cert_chain"])
    return out


def target_cert_chain(data: bytes) -> str:
    """``validate_platform`` and ``validate_domain`` (SEND_START's chain checks) return a status for any
    chain; where every certificate parses, ``verify_chain`` (the host-side verifier) agrees with them."""
    if not data:
        return "empty"
    anchor = _anchors()[data[0] % len(_anchors())]
    body = data[1:]
    pdh, plat, amd = body[:2084], body[2084 : 4 * 2084], body[4 * 2084 :]
    with measured() as usage:
        status = certs.validate_platform(pdh, plat, amd, anchor)
        domain = certs.validate_domain(pdh, plat, plat[2084:4168])
        for st in (status, domain):
            if not isinstance(st, SevStatus):
                raise InvariantError("contract", f"chain validation returned {st!r}")
        try:
            pdh_c = certs.SevCert.from_bytes(pdh)
            pek, oca, cek = certs.split_plat_certs(plat)
            ask, ark = certs.split_amd_chain(amd)
        except certs.CertError:
            parsed = False
        else:
            parsed = True
            report = certs.verify_chain(ark, ask, cek, oca, pek, pdh_c, anchor=anchor)
            json.dumps(report.to_dict())
            firmware_links = [r for r in report.links if not r.link.startswith(("OCA", "PEK<-OCA"))]
            verifier_ok = all(r.ok for r in firmware_links)
            if verifier_ok != (status == SevStatus.SUCCESS) and ark.is_signed:
                raise InvariantError(
                    "determinism", f"validate_platform says {status.name}, verify_chain says {report.message}"
                )
    check_time(usage, 10.0, "validating a certificate chain")
    return f"status:{status.name}" + ("" if parsed else "(unparsed)")


# ---------------------------------------------------------------------------------------------------------
# the SEV firmware: every command buffer through the mailbox
# ---------------------------------------------------------------------------------------------------------
CBIT = 1 << CBITPOS
FW_DRAM = 48 * MiB
FW_SCRATCH = 1 * MiB
#: Command selector (byte 0 of an input, modulo): every SEV command, then ids no command has.
FW_COMMAND_IDS = tuple(int(c) for c in Cmd) + (0x00, 0x0B, 0x62, 0xFF)
#: Commands whose success changes nothing but their command buffer: no rebuild of the world after them.
_READ_ONLY = frozenset({Cmd.PLATFORM_STATUS, Cmd.GUEST_STATUS})
#: Fields a refused command may write back (docs/formats.md, "Firmware length and address rules").
_WRITEBACK = {
    Cmd.PEK_CSR: {"len": 2084},
    Cmd.PDH_CERT_EXPORT: {"pdh_cert_len": 2084, "cert_chain_len": 6252},
    Cmd.GET_ID: {"len": 64},
    Cmd.LAUNCH_MEASURE: {"len": 48},
    Cmd.SEND_START: {"session_len": 128},
    Cmd.SEND_UPDATE_DATA: {"hdr_len": 52},
    Cmd.SEND_UPDATE_VMSA: {"hdr_len": 52},
}
FW_TIME_LIMIT = 10.0


class Drbg:
    """A deterministic TRNG stream (AES-CTR keystream), so that a world rebuilds identically."""

    def __init__(self, seed: bytes) -> None:
        self._c = AES.new(hashlib.sha256(seed).digest()[:16], AES.MODE_CTR, nonce=b"", initial_value=0)

    def __call__(self, n: int) -> bytes:
        return self._c.encrypt(bytes(n))


@functools.cache
def _target_platform() -> Platform:
    """A second host whose certificates SEND_START authenticates."""
    p = Platform(HostMemory(24 * MiB, seed=2), root=amdroot.default_root(), chip_id=b"\x02" * 64, trng=Drbg(b"target"))
    assert p.issue(Cmd.INIT, abi.InitBuf(flags=abi.INIT_FLAGS_SEV_ES)) == SevStatus.SUCCESS
    return p


class FirmwareWorld:
    """One simulated platform with a guest in each state a command needs: RUNNING (handle 1), LUPDATE
    (2, SEV-ES), LSECRET (3, launched with a guest owner's session), SUPDATE (4, SEV-ES, after SEND_START to
    a second host) and RUPDATE (5, SEV-ES, whose session and packets the harness made). A 1 MiB kernel
    scratch area holds the command buffer, the blobs the commands point at and their output areas."""

    RUN, LUPDATE, LSECRET, SUPDATE, RUPDATE = 1, 2, 3, 4, 5

    def __init__(self) -> None:
        p = self.p = Platform(
            HostMemory(FW_DRAM, seed=1), root=amdroot.default_root(), chip_id=b"\x01" * 64, trng=Drbg(b"fw")
        )
        self.dram = p.dram
        self.issue(Cmd.INIT, abi.InitBuf(flags=abi.INIT_FLAGS_SEV_ES))
        p.wbinvd_on_all_cpus()  # INIT leaves every ASID dirty: WBINVD and DF_FLUSH, as Linux's PSP driver
        self.issue(Cmd.DF_FLUSH)
        self.scratch = self.dram.alloc_kernel(FW_SCRATCH)
        self.cmd_paddr = self.scratch
        self._off = PAGE_SIZE
        self.at: dict[str, int] = {}
        self.frames: dict[int, np.ndarray] = {}
        target = _target_platform().public_certs()
        plat = target["cert_chain"]
        for name, blob in (
            ("tgt_pdh", target["pdh"]),
            ("tgt_plat", plat),
            ("tgt_amd", target["amd_cert_chain"]),
            ("tgt_pek", plat[:2084]),
            ("tgt_oca", plat[2084:4168]),
        ):
            self.put(name, blob)
        for name, size in (
            ("out_session", 128),
            ("out_hdr", 52),
            ("out_trans", 0x5000),
            ("out_measure", 48),
            ("out_id", 64),
            ("out_pdh", 2084),
            ("out_chain", 6252),
            ("out_csr", 2084),
            ("out_dbg", PAGE_SIZE),
        ):
            self.put(name, bytes(size))
        own_pdh = p.public_certs()["pdh"]
        # 1: RUNNING
        self._launch(make_policy(Policy.SEV, 0, 17), finish=True)
        # 2: LUPDATE (SEV-ES)
        self._launch(make_policy(Policy.ES), measure=False)
        # 3: LSECRET, with a guest owner's launch session; its LAUNCH_SECRET packet
        owner = GuestOwner(own_pdh, 0, rng=Drbg(b"owner"))
        godh, launch_session = owner.launch_blobs()
        self.put("godh", godh)
        self.put("launch_session", launch_session)
        measure = self._launch(0, godh=True)
        hdr, trans = owner.secret_packet(b"fuzzing secret!!", measure)
        self.put("secret_hdr", hdr)
        self.put("secret_trans", trans)
        # 4: SUPDATE (SEV-ES), after SEND_START to the second host
        self._launch(make_policy(Policy.SEV | Policy.ES, 0, 17), finish=True)
        self.issue(Cmd.SEND_START, self.send_start_buf(self.SUPDATE))
        # 5: RUPDATE (SEV-ES): a session and a packet the harness made for this platform's PDH
        sender = ECC.generate(curve="P-384", randfunc=Drbg(b"sender"))
        sender_cert = certs.SevCert.build(sender.public_key(), certs.Usage.PDH, certs.Algo.ECDH_SHA256).to_bytes()
        z = certs.ecdh_shared_secret(sender, certs.SevCert.from_bytes(own_pdh))
        rng = Drbg(b"session")
        nonce, wrap_iv, tek, tik = (rng(16) for _ in range(4))
        self.recv_policy = make_policy(Policy.ES)
        self.put("recv_pdh", sender_cert)
        self.put("recv_session", session.build_session(z, nonce, wrap_iv, tek, tik, self.recv_policy))
        buf = self.receive_start_buf()
        self.issue(Cmd.RECEIVE_START, buf)
        assert buf.handle == self.RUPDATE
        self.issue(Cmd.ACTIVATE, abi.ActivateBuf(handle=self.RUPDATE, asid=self.asid_of(self.RUPDATE, True)))
        self.frames[self.RUPDATE] = self.dram.alloc_ram(1)
        iv = rng(16)
        ct = csev.aes128_ctr(tek, iv, _pattern(b"received page"))
        mac = session.packet_mac(tik, session.CTX_DATA, 0, iv, PAGE_SIZE, PAGE_SIZE, ct)
        self.put("recv_hdr", session.pack_packet_header(0, iv, mac))
        self.put("recv_trans", ct)
        self.guest_frames = np.concatenate([self.frames[h] for h in sorted(self.frames)])
        self.pristine_scratch = self.dram.read(self.scratch, FW_SCRATCH)
        self.pristine_frames = self.dram.frames[self.guest_frames.astype(np.int64)].copy()
        self.dirty = False

    # -- building -------------------------------------------------------------------------------------
    def issue(self, cmd: Cmd, buf: Any = None) -> None:
        status = self.p.issue(cmd, buf)
        assert status == SevStatus.SUCCESS, (cmd.name, status)

    def put(self, name: str, blob: bytes) -> int:
        paddr = self.scratch + self._off
        self._off += (len(blob) + 63) & ~63
        assert self._off <= FW_SCRATCH
        self.dram.write(paddr, blob)
        self.at[name] = paddr
        return paddr

    def asid_of(self, handle: int, es: bool) -> int:
        """SEV-ES guests take ASIDs below MIN_SEV_ASID, SEV guests the rest (AMD sev_es_validate_asid)."""
        return handle if es else self.p.min_sev_asid + handle

    def _launch(self, policy: int, *, godh: bool = False, measure: bool = True, finish: bool = False) -> bytes:
        buf = abi.LaunchStartBuf(policy=policy)
        if godh:
            buf.dh_cert_address, buf.dh_cert_len = self.at["godh"], 2084
            buf.session_address, buf.session_len = self.at["launch_session"], 128
        self.issue(Cmd.LAUNCH_START, buf)
        handle = buf.handle
        frames = self.frames[handle] = self.dram.alloc_ram(2)
        self.issue(Cmd.ACTIVATE, abi.ActivateBuf(handle=handle, asid=self.asid_of(handle, bool(policy & Policy.ES))))
        for i, f in enumerate(frames.tolist()):
            self.dram.write(f * PAGE_SIZE, _pattern(b"guest %d page %d" % (handle, i)))
            self.issue(
                Cmd.LAUNCH_UPDATE_DATA, abi.LaunchUpdateBuf(handle=handle, address=f * PAGE_SIZE | CBIT, len=PAGE_SIZE)
            )
        out = b""
        if measure:
            self.issue(Cmd.LAUNCH_MEASURE, abi.LaunchMeasureBuf(handle=handle, address=self.at["out_measure"], len=48))
            out = self.dram.read(self.at["out_measure"], 48)
        if finish:
            self.issue(Cmd.LAUNCH_FINISH, abi.HandleBuf(handle=handle))
        return out

    def page(self, handle: int, i: int = 0) -> int:
        return int(self.frames[handle][i]) * PAGE_SIZE

    def send_start_buf(self, handle: int) -> abi.SendStartBuf:
        return abi.SendStartBuf(
            handle=handle,
            pdh_cert_address=self.at["tgt_pdh"],
            pdh_cert_len=2084,
            plat_certs_address=self.at["tgt_plat"],
            plat_certs_len=6252,
            amd_certs_address=self.at["tgt_amd"],
            amd_certs_len=len(_target_platform().public_certs()["amd_cert_chain"]),
            session_address=self.at["out_session"],
            session_len=128,
        )

    def receive_start_buf(self) -> abi.ReceiveStartBuf:
        return abi.ReceiveStartBuf(
            policy=self.recv_policy,
            pdh_cert_address=self.at["recv_pdh"],
            pdh_cert_len=2084,
            session_address=self.at["recv_session"],
            session_len=128,
        )

    def seed_buffers(self) -> list[tuple[int, Any]]:
        """A well-formed command buffer for every command (the seeds' command parts)."""
        at, page = self.at, self.page
        transport = abi.TransportBuf
        out: list[tuple[int, Any]] = [
            (Cmd.INIT, abi.InitBuf(flags=abi.INIT_FLAGS_SEV_ES)),
            (Cmd.PLATFORM_STATUS, abi.PlatformStatusBuf()),
            (Cmd.PEK_CSR, abi.PekCsrBuf(address=at["out_csr"], len=2084)),
            (Cmd.PEK_CERT_IMPORT, abi.PekCertImportBuf(at["tgt_pek"], 2084, at["tgt_oca"], 2084)),
            (Cmd.PDH_CERT_EXPORT, abi.PdhCertExportBuf(at["out_pdh"], 2084, at["out_chain"], 6252)),
            (Cmd.GET_ID, abi.GetIdBuf(address=at["out_id"], len=64)),
            (Cmd.DECOMMISSION, abi.HandleBuf(handle=self.LUPDATE)),
            (Cmd.ACTIVATE, abi.ActivateBuf(handle=self.RUN, asid=self.p.max_asid - 1)),
            (Cmd.DEACTIVATE, abi.HandleBuf(handle=self.RUN)),
            (Cmd.GUEST_STATUS, abi.GuestStatusBuf(handle=self.SUPDATE)),
            (Cmd.LAUNCH_START, abi.LaunchStartBuf(policy=0)),
            (Cmd.LAUNCH_START, abi.LaunchStartBuf(0, 0, at["godh"], 2084, at["launch_session"], 128)),
            (Cmd.LAUNCH_UPDATE_DATA, abi.LaunchUpdateBuf(self.LUPDATE, page(self.LUPDATE) | CBIT, PAGE_SIZE)),
            (Cmd.LAUNCH_UPDATE_VMSA, abi.LaunchUpdateBuf(self.LUPDATE, page(self.LUPDATE, 1) | CBIT, PAGE_SIZE)),
            (Cmd.LAUNCH_MEASURE, abi.LaunchMeasureBuf(self.LUPDATE, at["out_measure"], 48)),
            (
                Cmd.LAUNCH_SECRET,
                transport(self.LSECRET, at["secret_hdr"], 52, page(self.LSECRET) | CBIT, 16, at["secret_trans"], 16),
            ),
            (Cmd.LAUNCH_FINISH, abi.HandleBuf(handle=self.LSECRET)),
            (Cmd.SEND_START, self.send_start_buf(self.RUN)),
            (
                Cmd.SEND_UPDATE_DATA,
                transport(
                    self.SUPDATE, at["out_hdr"], 52, page(self.SUPDATE) | CBIT, PAGE_SIZE, at["out_trans"], PAGE_SIZE
                ),
            ),
            (
                Cmd.SEND_UPDATE_VMSA,
                transport(
                    self.SUPDATE, at["out_hdr"], 52, page(self.SUPDATE, 1) | CBIT, PAGE_SIZE, at["out_trans"], PAGE_SIZE
                ),
            ),
            (Cmd.SEND_FINISH, abi.HandleBuf(handle=self.SUPDATE)),
            (Cmd.SEND_CANCEL, abi.HandleBuf(handle=self.SUPDATE)),
            (Cmd.RECEIVE_START, self.receive_start_buf()),
            (
                Cmd.RECEIVE_UPDATE_DATA,
                transport(
                    self.RUPDATE, at["recv_hdr"], 52, page(self.RUPDATE) | CBIT, PAGE_SIZE, at["recv_trans"], PAGE_SIZE
                ),
            ),
            (
                Cmd.RECEIVE_UPDATE_VMSA,
                transport(
                    self.RUPDATE, at["recv_hdr"], 52, page(self.RUPDATE) | CBIT, PAGE_SIZE, at["recv_trans"], PAGE_SIZE
                ),
            ),
            (Cmd.RECEIVE_FINISH, abi.HandleBuf(handle=self.RUPDATE)),
            (Cmd.DBG_DECRYPT, abi.DbgBuf(self.RUN, page(self.RUN) | CBIT, at["out_dbg"], PAGE_SIZE)),
            (Cmd.DBG_ENCRYPT, abi.DbgBuf(self.RUN, at["out_dbg"], page(self.RUN) | CBIT, 16)),
        ]
        out += [(c, None) for c in (Cmd.SHUTDOWN, Cmd.PLATFORM_RESET, Cmd.PEK_GEN, Cmd.PDH_GEN, Cmd.DF_FLUSH)]
        out += [(c, None) for c in FW_COMMAND_IDS[len(Cmd) :]]
        return out

    def hints(self) -> tuple[int, ...]:
        pages = [self.page(h, i) for h in self.frames for i in range(len(self.frames[h]))]
        return tuple(self.at.values()) + tuple(pages) + tuple(p | CBIT for p in pages) + (FW_DRAM, FW_DRAM - 16)

    # -- one execution --------------------------------------------------------------------------------
    def reset(self) -> None:
        self.dram.write(self.scratch, self.pristine_scratch)
        self.dram.frames[self.guest_frames.astype(np.int64)] = self.pristine_frames

    def secrets(self) -> tuple[bytes, ...]:
        out = []
        for g in getattr(self.p, "_guests", {}).values():
            out += [g.vek, g.vek[:16], g.vek[16:], g.tek, g.tik]
        keys = getattr(getattr(self.p, "_identity", None), "_keys", None)
        for name in ("pdh_key", "pek_key", "oca_key"):
            k = getattr(keys, name, None)
            if k is not None:
                out.append(int(k.d).to_bytes(48, "big"))
        return tuple(s for s in out if any(s))

    def state(self) -> tuple:
        """What the firmware holds: platform status, every guest's context (secrets as hashes), the
        memory controller's key slots."""
        p = self.p
        guests = tuple(
            (g.handle, int(g.state), g.policy, g.asid, _h(g.vek, g.tek, g.tik, g.measure), g.digest.copy().digest())
            for g in sorted(getattr(p, "_guests", {}).values(), key=lambda g: g.handle)
        )
        status = abi.PlatformStatusBuf()
        p.issue(Cmd.PLATFORM_STATUS, status)
        return (
            status.pack(),
            p.es_enabled,
            guests,
            tuple(a for a in range(1, p.max_asid + 1) if p.memctl.has_key(a)),
            tuple(sorted(getattr(p, "_asid_dirty", ()))),
            tuple(sorted(getattr(p, "_asid_allocated", ()))),
            tuple(sorted(getattr(p, "_asid_in_use", ()))),
            repr(getattr(p, "_identity", None)),
            p.public_certs()["pdh"] if getattr(getattr(p, "_identity", None), "_keys", True) else None,
        )

    def regions(self, buf: Any) -> list[tuple[int, int]]:
        """Host memory a command with this buffer could write: the scratch area, the guests' frames
        (as pages), and a window at every address the buffer names."""
        spans = [(self.scratch, FW_SCRATCH)]
        if buf is not None:
            for name in buf.offsets():
                if name.endswith(("address", "addr")):
                    a = getattr(buf, name) & ~CBIT
                    length = 64 << 10
                    if isinstance(buf, abi.DbgBuf):
                        length = min(max(buf.len, 16), 4 * MiB)
                    a, end = min(a, self.dram.size), min(a + length, self.dram.size)
                    if end > a:
                        spans.append((a, end - a))
        return spans

    def snapshot(self, spans: list[tuple[int, int]]) -> list[bytes]:
        frames = self.dram.frames[self.guest_frames.astype(np.int64)].tobytes()
        return [frames] + [self.dram.read(a, n) for a, n in spans]


def _h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def _pattern(label: bytes) -> bytes:
    return hashlib.shake_256(b"pysev fuzz " + label).digest(PAGE_SIZE)


_fw_world: FirmwareWorld | None = None


def firmware_world() -> FirmwareWorld:
    global _fw_world
    if _fw_world is None or _fw_world.dirty:
        _fw_world = FirmwareWorld()
    return _fw_world


def encode_firmware_input(cmd_id: int, buf: Any, patch: tuple[str, int, bytes] | None = None) -> bytes:
    """byte 0: command selector; then the command buffer; then optionally a be32 offset into the scratch
    data area and bytes written there (a corrupted blob: certificate, session, packet)."""
    out = bytes([FW_COMMAND_IDS.index(int(cmd_id))]) + (buf.pack() if buf is not None else b"")
    if patch is not None:
        name, delta, blob = patch
        w = firmware_world()
        out += struct.pack(">I", w.at[name] - w.scratch - PAGE_SIZE + delta) + blob
    return out


def firmware_seeds() -> list[bytes]:
    w = firmware_world()
    seeds = [encode_firmware_input(c, b) for c, b in w.seed_buffers()]
    by_cmd = dict(w.seed_buffers())
    seeds += [
        encode_firmware_input(Cmd.RECEIVE_UPDATE_DATA, by_cmd[Cmd.RECEIVE_UPDATE_DATA], ("recv_hdr", 30, b"\x01")),
        encode_firmware_input(Cmd.RECEIVE_UPDATE_DATA, by_cmd[Cmd.RECEIVE_UPDATE_DATA], ("recv_hdr", 0, b"\x01")),
        encode_firmware_input(Cmd.SEND_START, by_cmd[Cmd.SEND_START], ("tgt_pdh", 0x20, b"\xff")),
        encode_firmware_input(Cmd.SEND_START, by_cmd[Cmd.SEND_START], ("tgt_amd", 0x3C, b"\x00\x08")),
        encode_firmware_input(Cmd.RECEIVE_START, by_cmd[Cmd.RECEIVE_START], ("recv_session", 0x60, b"\x00")),
        encode_firmware_input(Cmd.LAUNCH_SECRET, by_cmd[Cmd.LAUNCH_SECRET], ("secret_trans", 0, b"\x00")),
    ]
    return seeds


def firmware_hints() -> tuple[int, ...]:
    return firmware_world().hints()


def _decode_firmware_input(data: bytes) -> tuple[int, bytes, tuple[int, bytes] | None]:
    cmd_id = FW_COMMAND_IDS[data[0] % len(FW_COMMAND_IDS)] if data else FW_COMMAND_IDS[0]
    try:
        layout = abi.BUFFERS[Cmd(cmd_id)]
    except ValueError:
        layout = None
    size = layout.size() if layout is not None else 0
    body = data[1 : 1 + size].ljust(size, b"\0")
    rest = data[1 + size :]
    patch = None
    if len(rest) > 4:
        (offset,) = struct.unpack_from(">I", rest)
        patch = (PAGE_SIZE + offset % (FW_SCRATCH - PAGE_SIZE), rest[4 : 4 + 8192])
    return cmd_id, body, patch


class _LogText(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def target_firmware(data: bytes) -> str:
    """One command through the PSP mailbox (``Platform.issue_mailbox``) with a buffer from ``data``: the
    status is a ``SevStatus``; a refused command changes nothing (the firmware's state, the guests' memory,
    the memory at every address the buffer names) except the length write-backs the spec allows; no log
    line names a key."""
    w = firmware_world()
    cmd_id, body, patch = _decode_firmware_input(data)
    w.reset()
    if patch is not None:
        at, blob = patch
        w.dram.write(w.scratch + at, blob[: FW_SCRATCH - at])
    w.dram.write(w.cmd_paddr, body)
    try:
        cmd: Cmd | None = Cmd(cmd_id)
    except ValueError:
        cmd = None
    layout = abi.BUFFERS.get(cmd) if cmd is not None else None
    before_buf = layout.unpack(body) if layout is not None else None
    spans = w.regions(before_buf)
    before_state, before_mem = w.state(), w.snapshot(spans)
    secrets = w.secrets()
    fw_log = logging.getLogger("pysev.firmware")
    text = _LogText()
    old_level = fw_log.level
    fw_log.addHandler(text)
    fw_log.setLevel(logging.DEBUG)
    try:
        with measured() as usage:
            status = w.p.issue_mailbox(cmd_id, w.cmd_paddr)
    except BaseException:
        w.dirty = True
        raise
    finally:
        fw_log.removeHandler(text)
        fw_log.setLevel(old_level)
    check_time(usage, FW_TIME_LIMIT, f"command {cmd_id:#x}")
    if not isinstance(status, SevStatus):
        w.dirty = True
        raise InvariantError("contract", f"command {cmd_id:#x} returned {status!r}, not a SevStatus")
    for line in text.lines:
        leak = leaked_secret(line, secrets)
        if leak:
            w.dirty = True
            raise InvariantError("secret", f"firmware log line carries a key ({leak}): {line[:120]!r}")
    name = cmd.name if cmd is not None else f"{cmd_id:#04x}"
    if status != SevStatus.SUCCESS:
        after_buf = layout.unpack(w.dram.read(w.cmd_paddr, layout.size())) if layout is not None else None
        problems = _changes(cmd, before_buf, after_buf, spans, before_mem, w.snapshot(spans), w.cmd_paddr)
        if w.state() != before_state:
            problems.append("the firmware's state")
        if problems:
            w.dirty = True
            raise InvariantError("state", f"{name} refused with {status.name} but changed {', '.join(problems)}")
    elif cmd not in _READ_ONLY:
        w.dirty = True
    return f"status:{status.name}"


def _changes(
    cmd: Cmd | None, before: Any, after: Any, spans: list, mem_before: list, mem_after: list, cmd_paddr: int
) -> list[str]:
    problems = []
    if before is not None:
        allowed = _WRITEBACK.get(cmd, {}) if cmd is not None else {}
        for field in before.offsets():
            old, new = getattr(before, field), getattr(after, field)
            if old != new and allowed.get(field) != new:
                problems.append(f"buffer field {field} ({old:#x} -> {new:#x})")
    size = type(before).size() if before is not None else 0
    if mem_before[0] != mem_after[0]:
        problems.append("guest memory")
    for (a, _), old, new in zip(spans, mem_before[1:], mem_after[1:], strict=True):
        if old == new:
            continue
        diff = np.flatnonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8)) + a
        outside = diff[(diff < cmd_paddr) | (diff >= cmd_paddr + size)]
        if outside.size:
            problems.append(f"host memory at {int(outside[0]):#x} ({outside.size} bytes)")
    return problems


def close_worlds() -> None:
    """Drop the QMP and firmware worlds (closing the QMP world's event loop); the next execution rebuilds."""
    global _qmp_world, _fw_world
    if _qmp_world is not None:
        _qmp_world.close()
    _qmp_world = _fw_world = None


# ---------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], str]
    seeds: Callable[[], list[bytes]]
    hints: Callable[[], tuple[int, ...]] = tuple
    #: Error types a target turns into outcomes (documentation for the campaign's report).
    documented: tuple[str, ...] = ()


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("stream", target_stream, stream_seeds, documented=("StreamError",)),
        Target("return_path", target_return_path, return_path_seeds, documented=("StreamError",)),
        Target("qmp_framing", target_qmp_framing, qmp_seeds, documented=("ParseError",)),
        Target("qmp_dispatch", target_qmp_dispatch, qmp_seeds, documented=("QmpError", "ParseError")),
        Target("sev_cert", target_sev_cert, sev_cert_seeds, documented=("CertError",)),
        Target("amd_cert", target_amd_cert, amd_cert_seeds, documented=("CertError",)),
        Target("cert_chain", target_cert_chain, cert_chain_seeds, documented=("SevStatus",)),
        Target("firmware", target_firmware, firmware_seeds, firmware_hints, documented=("SevStatus",)),
    )
}
