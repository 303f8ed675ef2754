"""QMP input framing: a byte stream from a client split into top-level JSON texts, bounded and robust to
malformed input (QEMU's ``qobject/json-streamer.c`` and ``json-parser.c``).

QMP input is *not* line-framed: ``JsonStreamer`` counts braces outside strings, bounds every message by
``max_message`` and its nesting by ``MAX_NESTING``, and recovers after garbage as QEMU's parser does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_MESSAGE = 1 << 20
#: Deepest ``{``/``[`` nesting accepted. QEMU allows 1024; Python's json module recurses per level and the
#: interpreter's recursion limit is 1000, so the bound here is lower. QMP arguments nest a few levels.
MAX_NESTING = 128

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


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON text but no double: Python would make it Infinity, which JSON cannot carry back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


# Stricter than json.loads: JSON has no NaN/Infinity (not even through an overflowing number), and QEMU's
# parser rejects duplicate keys.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants, parse_float=_finite_float
)


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
        self._pos = 0  # next byte of _buf to scan
        self._start = -1  # offset of the pending value in _buf, -1 between values
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
                if buf[j] == 0x5C:  # backslash: skip the escaped byte once it has arrived
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
                i = m.start()  # the delimiter starts the next value; do not consume it
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
        except (ValueError, RecursionError) as e:  # duplicate key, NaN, oversized integer literal
            return None, ParseError(f"JSON parse error, {e}")
