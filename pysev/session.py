"""SEV session crypto (sev-api.md §3, §4): the SP 800-108 KDF, the 128-byte session blob, packet MACs.

Byte layouts follow AMD's firmware source as transcribed in sev-api.md; names are the spec's.
"""
from __future__ import annotations

import hmac
import struct

_LE32 = struct.Struct("<I")


def kdf(key: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """NIST SP 800-108 counter-mode KDF with HMAC-SHA256, exactly as the firmware lays it out (§3.3).

    ``LE32(i) ‖ label ‖ 0x00 ‖ context ‖ LE32(8·length)`` per 32-byte block; the counter and the bit
    length are little-endian (the PSP's byte order), not the big-endian of SP 800-108's examples.
    """
    if length <= 0:
        raise ValueError(f"kdf length must be positive, got {length}")
    bits = _LE32.pack(8 * length)
    out = bytearray()
    for i in range(1, (length + 31) // 32 + 1):
        out += hmac.digest(key, _LE32.pack(i) + label + b"\x00" + context + bits, "sha256")
    return bytes(out[:length])
