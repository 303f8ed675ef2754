"""SEV session crypto (sev-api.md §3, §4): the SP 800-108 KDF, the 128-byte session blob, packet MACs.

Byte layouts follow AMD's firmware source as transcribed in sev-api.md; names are the spec's.
"""
from __future__ import annotations

import hmac
import struct

import csev

from pysev.firmware.status import SevError, SevStatus

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


# -- session buffer (§2.1): NONCE ‖ WRAP_TK ‖ WRAP_IV ‖ WRAP_MAC ‖ POLICY_MAC ------------------------
SESSION_SIZE = 128
NONCE = slice(0x00, 0x10)
WRAP_TK = slice(0x10, 0x30)
WRAP_IV = slice(0x30, 0x40)
WRAP_MAC = slice(0x40, 0x60)
POLICY_MAC = slice(0x60, 0x80)

# Packet MAC context bytes (§4): the first byte of every transport MAC input.
CTX_SECRET = 0x01   # LAUNCH_SECRET
CTX_DATA = 0x02     # SEND/RECEIVE_UPDATE_DATA (and _VMSA in AMD's firmware source)
CTX_MEASURE = 0x04  # LAUNCH_MEASURE

MASTER_SECRET_LABEL = b"sev-master-secret"
KEK_LABEL = b"sev-kek"
KIK_LABEL = b"sev-kik"


def _transport_keys(shared_secret: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """KEK and KIK from the ECDH secret Z and the session NONCE (§3.3 derivation chain)."""
    master = kdf(shared_secret, MASTER_SECRET_LABEL, nonce, 16)
    return kdf(master, KEK_LABEL, b"", 16), kdf(master, KIK_LABEL, b"", 16)


def policy_mac(tik: bytes, policy: int) -> bytes:
    """POLICY_MAC = HMAC-SHA256(TIK, LE32(policy)) (§2.1)."""
    return hmac.digest(tik, _LE32.pack(policy & 0xFFFFFFFF), "sha256")


def _check_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def build_session(shared_secret: bytes, nonce: bytes, wrap_iv: bytes, tek: bytes, tik: bytes,
                  policy: int) -> bytes:
    """The 128-byte session buffer the client side (guest owner or source firmware) sends (§3.3)."""
    _check_len("nonce", nonce, 16)
    _check_len("wrap_iv", wrap_iv, 16)
    _check_len("tek", tek, 16)
    _check_len("tik", tik, 16)
    kek, kik = _transport_keys(shared_secret, nonce)
    wrapped, wrap_mac = csev.wrap_tk(kek, kik, wrap_iv, tek, tik)
    return b"".join((nonce, wrapped, wrap_iv, wrap_mac, policy_mac(tik, policy)))


def open_session(shared_secret: bytes, session: bytes, policy: int) -> tuple[bytes, bytes]:
    """Unwrap TEK and TIK from a session buffer, as RECEIVE_START/LAUNCH_START do (§2.5 steps 3–5).

    WRAP_MAC is checked before unwrapping and POLICY_MAC after; any mismatch raises ``SevError`` with
    BAD_MEASUREMENT, the firmware's one opaque integrity status.
    """
    if len(session) != SESSION_SIZE:
        raise SevError(SevStatus.INVALID_LENGTH, f"session must be {SESSION_SIZE} bytes, got {len(session)}")
    session = bytes(session)
    kek, kik = _transport_keys(shared_secret, session[NONCE])
    try:
        tek, tik = csev.unwrap_tk(kek, kik, session[WRAP_IV], session[WRAP_TK], session[WRAP_MAC])
    except csev.MacError:
        raise SevError(SevStatus.BAD_MEASUREMENT, "session WRAP_MAC mismatch") from None
    if not hmac.compare_digest(policy_mac(tik, policy), session[POLICY_MAC]):
        raise SevError(SevStatus.BAD_MEASUREMENT, "session POLICY_MAC mismatch")
    return tek, tik


_AAD = struct.Struct("<BI16sII")  # CTX ‖ LE32(FLAGS) ‖ IV ‖ LE32(len_a) ‖ LE32(len_b): 29 bytes (§4)


def packet_mac(tik: bytes, ctx: int, flags: int, iv: bytes, guest_len: int, trans_len: int,
               ciphertext: bytes, measure: bytes = b"") -> bytes:
    """Transport packet MAC (§4): HMAC-SHA256(TIK, CTX ‖ LE32(FLAGS) ‖ IV ‖ LE32 ‖ LE32 ‖ ct [‖ measure])."""
    _check_len("iv", iv, 16)
    mac = hmac.new(tik, _AAD.pack(ctx, flags, iv, guest_len, trans_len), "sha256")
    mac.update(ciphertext)
    mac.update(measure)
    return mac.digest()


_MEASURE_INPUT = struct.Struct("<BBBBI32s16s")


def launch_measure(tik: bytes, api_major: int, api_minor: int, build: int, policy: int, digest: bytes,
                   mnonce: bytes) -> bytes:
    """LAUNCH_MEASURE's MEASURE (§2.8): HMAC(TIK, 0x04 ‖ API_MAJOR ‖ API_MINOR ‖ BUILD ‖ LE32(policy) ‖
    launch digest(32) ‖ MNONCE(16))."""
    _check_len("digest", digest, 32)
    _check_len("mnonce", mnonce, 16)
    data = _MEASURE_INPUT.pack(CTX_MEASURE, api_major, api_minor, build, policy & 0xFFFFFFFF, digest, mnonce)
    return hmac.digest(tik, data, "sha256")
