"""The firmware's key-derivation function, shared by every command set (SEV session keys, the CEK).

NIST SP 800-108 counter mode with HMAC-SHA256 as the PRF, laid out as AMD's firmware does it
(``nist_kdf.c`` ``nist_kdf``): ``LE32(i) ‖ label ‖ 0x00 ‖ context ‖ LE32(8·length)`` per 32-byte
block. The counter and the bit length are little-endian (the PSP's byte order), not the big-endian of
SP 800-108's examples.
"""

from __future__ import annotations

import hmac
import struct

_LE32 = struct.Struct("<I")


def kdf(key: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """``length`` bytes derived from ``key`` for ``label`` (without its NUL) and ``context``."""
    if length <= 0:
        raise ValueError(f"kdf length must be positive, got {length}")
    bits = _LE32.pack(8 * length)
    out = bytearray()
    for i in range(1, (length + 31) // 32 + 1):
        out += hmac.digest(key, _LE32.pack(i) + label + b"\x00" + context + bits, "sha256")
    return bytes(out[:length])
