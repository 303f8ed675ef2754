"""SEV channel crypto: the 128-byte session blob, transport packets and their MACs, LAUNCH_MEASURE.

Byte layouts follow AMD's firmware source (``sev_channel.h`` ``sev_session_t``, ``sev_packet_header_t``,
``sev_measurement_t``; ``sev_channel.c`` ``create_session``, ``establish_channel``,
``sev_channel_hmac``; ``sev_guest.c`` ``sev_guest_measure``); names are those of AMD SEV API pub. #55766.
Offsets of every structure are in ``docs/formats.md``.
"""

from __future__ import annotations

import hmac
import struct

import numpy as np

import csev
from csev.packet import PACKET_HEADER
from pysev.firmware.kdf import kdf
from pysev.firmware.sev.abi import MEASURE_SIZE, SESSION_SIZE
from pysev.firmware.status import SevError, SevStatus

_LE32 = struct.Struct("<I")

# -- session buffer: NONCE ‖ WRAP_TK ‖ WRAP_IV ‖ WRAP_MAC ‖ POLICY_MAC ---------------------------------
NONCE = slice(0x00, 0x10)
WRAP_TK = slice(0x10, 0x30)
WRAP_IV = slice(0x30, 0x40)
WRAP_MAC = slice(0x40, 0x60)
POLICY_MAC = slice(0x60, 0x80)
assert POLICY_MAC.stop == SESSION_SIZE

# -- LAUNCH_MEASURE output: MEASURE ‖ MNONCE -------------------------------------------------------------
MEASURE = slice(0x00, 0x20)
MNONCE = slice(0x20, 0x30)
assert MNONCE.stop == MEASURE_SIZE

# Packet MAC context bytes (AMD sev_channel.h SEV_CHANNEL_CTX_*): the first byte of every MAC input.
CTX_SECRET = 0x01  # LAUNCH_SECRET
CTX_DATA = 0x02  # SEND/RECEIVE_UPDATE_DATA (and _VMSA in AMD's firmware source)
CTX_MEASURE = 0x04  # LAUNCH_MEASURE

MASTER_SECRET_LABEL = b"sev-master-secret"
KEK_LABEL = b"sev-kek"
KIK_LABEL = b"sev-kik"


def _transport_keys(shared_secret: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """KEK and KIK from the ECDH secret Z and the session NONCE (AMD ``sev_channel.c`` ``derive_master_secret``)."""
    master = kdf(shared_secret, MASTER_SECRET_LABEL, nonce, 16)
    return kdf(master, KEK_LABEL, b"", 16), kdf(master, KIK_LABEL, b"", 16)


def policy_mac(tik: bytes, policy: int) -> bytes:
    """POLICY_MAC = HMAC-SHA256(TIK, LE32(policy))."""
    return hmac.digest(tik, _LE32.pack(policy & 0xFFFFFFFF), "sha256")


def _check_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def build_session(shared_secret: bytes, nonce: bytes, wrap_iv: bytes, tek: bytes, tik: bytes, policy: int) -> bytes:
    """The session buffer the client side (guest owner or source firmware) sends
    (AMD ``sev_channel.c`` ``create_session``)."""
    _check_len("nonce", nonce, 16)
    _check_len("wrap_iv", wrap_iv, 16)
    _check_len("tek", tek, 16)
    _check_len("tik", tik, 16)
    kek, kik = _transport_keys(shared_secret, nonce)
    wrapped, wrap_mac = csev.wrap_tk(kek, kik, wrap_iv, tek, tik)
    return b"".join((nonce, wrapped, wrap_iv, wrap_mac, policy_mac(tik, policy)))


def open_session(shared_secret: bytes, session: bytes, policy: int) -> tuple[bytes, bytes]:
    """Unwrap TEK and TIK from a session buffer, as RECEIVE_START and LAUNCH_START do
    (AMD ``sev_channel.c`` ``establish_channel``, ``sev_guest.c`` ``sev_guest_verify_policy``).

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


# -- transport packets -----------------------------------------------------------------------------------
def pack_packet_header(flags: int, iv: bytes, mac: bytes) -> bytes:
    """FLAGS ‖ IV ‖ MAC, laid out by ``csev.packet.PACKET_HEADER``."""
    header = np.zeros((), dtype=PACKET_HEADER)
    header["flags"] = flags
    header["iv"] = np.frombuffer(iv, dtype=np.uint8)
    header["mac"] = np.frombuffer(mac, dtype=np.uint8)
    return header.tobytes()


def unpack_packet_header(data: bytes) -> tuple[int, bytes, bytes]:
    """(FLAGS, IV, MAC) of a packet header, read by ``csev.packet.PACKET_HEADER``."""
    header = np.frombuffer(data, dtype=PACKET_HEADER, count=1)[0]
    return int(header["flags"]), header["iv"].tobytes(), header["mac"].tobytes()


_AAD = struct.Struct("<BI16sII")  # CTX ‖ LE32(FLAGS) ‖ IV ‖ LE32(len_a) ‖ LE32(len_b): 29 bytes


def packet_mac(
    tik: bytes, ctx: int, flags: int, iv: bytes, guest_len: int, trans_len: int, ciphertext: bytes, measure: bytes = b""
) -> bytes:
    """Transport packet MAC: HMAC-SHA256(TIK, CTX ‖ LE32(FLAGS) ‖ IV ‖ LE32 ‖ LE32 ‖ ct [‖ measure])
    (AMD ``sev_mcmd.h`` ``send_receive_update_aad_t``, ``sev_channel.c`` ``sev_channel_hmac``)."""
    _check_len("iv", iv, 16)
    mac = hmac.new(tik, _AAD.pack(ctx, flags, iv, guest_len, trans_len), "sha256")
    mac.update(ciphertext)
    mac.update(measure)
    return mac.digest()


_MEASURE_INPUT = struct.Struct("<BBBBI32s16s")


def launch_measure(
    tik: bytes, api_major: int, api_minor: int, build: int, policy: int, digest: bytes, mnonce: bytes
) -> bytes:
    """LAUNCH_MEASURE's MEASURE: HMAC(TIK, 0x04 ‖ API_MAJOR ‖ API_MINOR ‖ BUILD ‖ LE32(policy) ‖
    launch digest(32) ‖ MNONCE(16)) (AMD ``sev_guest.c`` ``sev_guest_measure``)."""
    _check_len("digest", digest, 32)
    _check_len("mnonce", mnonce, 16)
    data = _MEASURE_INPUT.pack(CTX_MEASURE, api_major, api_minor, build, policy & 0xFFFFFFFF, digest, mnonce)
    return hmac.digest(tik, data, "sha256")
