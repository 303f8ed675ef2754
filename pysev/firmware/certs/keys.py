"""Codes, keys and signatures shared by both certificate formats (SEV and AMD).

Key usage and algorithm codes (AMD ``sev_cert.h``), NIST P-384, the public keys a certificate carries and
where a SEV certificate stores them (the PUBKEY union, AMD ``sev_cert.h`` ``sev_cert_pubkey_t``; offsets
from the start of the certificate, table in ``docs/formats.md``), and signing and verification in the SEV
byte order: ECDSA P-384 r ‖ s and RSASSA-PSS, both little-endian. :class:`CertError` is the readers' one
error: it names the field and its offset.
"""

from __future__ import annotations

import dataclasses
import enum

from Crypto.Hash import SHA256, SHA384
from Crypto.PublicKey import ECC, RSA
from Crypto.Signature import DSS, pss


class CertError(ValueError):
    """A certificate is malformed. ``field`` and ``offset`` say what was wrong and where."""

    def __init__(self, field: str, offset: int | None, problem: str) -> None:
        self.field = field
        self.offset = offset
        where = f" at offset {offset:#05x}" if offset is not None else ""
        super().__init__(f"{field}{where}: {problem}")


class Usage(enum.IntEnum):
    """Key usage codes (AMD ``sev_cert.h`` ``sev_cert_usage``)."""

    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algo(enum.IntEnum):
    """Public-key / signature algorithm codes (AMD ``sev_cert.h`` ``sev_cert_algo``). RSA means RSASSA-PSS,
    salt = hash length."""

    INVALID = 0x000
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103

    @property
    def is_rsa(self) -> bool:
        return self in (Algo.RSA_SHA256, Algo.RSA_SHA384)

    @property
    def is_ecc(self) -> bool:
        return self in (Algo.ECDSA_SHA256, Algo.ECDSA_SHA384, Algo.ECDH_SHA256, Algo.ECDH_SHA384)

    @property
    def is_ecdsa(self) -> bool:
        return self in (Algo.ECDSA_SHA256, Algo.ECDSA_SHA384)

    @property
    def hash(self):  # -> Crypto.Hash module
        return SHA384 if self & 0x100 else SHA256


# Usages a firmware key may carry (AMD sev_cert.c usage_is_valid): INVALID is not one of them.
KEY_USAGES = frozenset({Usage.ARK, Usage.ASK, Usage.OCA, Usage.PEK, Usage.PDH, Usage.CEK})

# ---------------------------------------------------------------------------------------------------
# NIST P-384 (FIPS 186-4 D.1.2.4). Only curve id 2 is used by SEV (AMD ecc.h).
# ---------------------------------------------------------------------------------------------------
CURVE_P384 = 2
P384_P = 2**384 - 2**128 - 2**96 + 2**32 - 1
P384_B = 0xB3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875AC656398D8A2ED19D2A85C8EDD3EC2AEF
P384_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
P384_BYTES = 48

# ---------------------------------------------------------------------------------------------------
# The PUBKEY union of a SEV certificate, at its offsets in the certificate, and the signature data
# ---------------------------------------------------------------------------------------------------
OFF_PUBKEY = 0x010  # 1028-byte union, zero-padded
PUBKEY_SIZE = 1028

# ECC public key inside the union (AMD ecc.h ECC_SCALAR_SIZE_BYTES)
OFF_EC_CURVE = 0x010  # u32 curve id
OFF_EC_QX = 0x014  # 72-byte LE
OFF_EC_QY = 0x05C  # 72-byte LE
EC_SCALAR_SIZE = 72
OFF_EC_RESERVED = 0x0A4  # .. 0x414, zero (880 bytes)

# RSA public key inside the union (AMD rsa.h: up to 4096 bits)
OFF_RSA_MODULUS_BITS = 0x010  # u32
OFF_RSA_PUBEXP = 0x014  # 512-byte LE
OFF_RSA_MODULUS = 0x214  # 512-byte LE
RSA_MAX_BYTES = 512
assert OFF_RSA_MODULUS + RSA_MAX_BYTES == OFF_PUBKEY + PUBKEY_SIZE
assert OFF_EC_QY + EC_SCALAR_SIZE == OFF_EC_RESERVED

SIG_SIZE = 512  # the signature data of a slot
ECDSA_SIG_USED = 2 * EC_SCALAR_SIZE  # R[72] ‖ S[72]; the remaining 368 bytes are zero


def int_from_le(data: bytes | memoryview) -> int:
    return int.from_bytes(data, "little")


def int_to_le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def hash_for_bits(bits: int):
    """AMD root certs: SHA-256 for 2048-bit keys (Naples), SHA-384 for 4096-bit (Rome and later)."""
    return SHA256 if bits <= 2048 else SHA384


def check_zero(data: bytes, start: int, end: int, field: str) -> None:
    if any(data[start:end]):
        first = next(i for i in range(start, end) if data[i])
        raise CertError(field, first, f"reserved bytes [{start:#05x}, {end:#05x}) must be zero")


def describe_code(value: enum.IntEnum) -> dict:
    return {"code": f"{int(value):#x}", "name": value.name}


# ---------------------------------------------------------------------------------------------------
# Public keys
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EcPublicKey:
    """An ECC public key as the certificate stores it: curve id and the affine point."""

    x: int
    y: int
    curve: int = CURVE_P384

    def is_valid(self) -> bool:
        """AMD ``ecc.c`` ``ecc_pubkey_is_valid``: curve P-384 and the point lies on it (not infinity)."""
        if self.curve != CURVE_P384 or not (0 <= self.x < P384_P and 0 <= self.y < P384_P):
            return False
        return (self.y * self.y - (self.x**3 - 3 * self.x + P384_B)) % P384_P == 0

    def to_ecc(self) -> ECC.EccKey:
        if not self.is_valid():
            raise CertError("PUBKEY", OFF_EC_CURVE, "not a point on P-384")
        return ECC.construct(curve="P-384", point_x=self.x, point_y=self.y)

    @classmethod
    def from_ecc(cls, key: ECC.EccKey) -> EcPublicKey:
        if key.curve not in ("NIST P-384", "p384", "P-384", "secp384r1"):
            raise ValueError(f"SEV uses only P-384 keys, got {key.curve}")
        return cls(int(key.pointQ.x), int(key.pointQ.y))

    def summary(self) -> str:
        return f"ECC P-384 ({'on curve' if self.is_valid() else 'NOT on curve'})"


@dataclasses.dataclass(frozen=True)
class RsaPublicKey:
    """An RSA public key: declared modulus size in bits, public exponent, modulus."""

    modulus_bits: int
    pubexp: int
    modulus: int

    def is_valid(self) -> bool:
        """AMD ``rsa.c`` ``rsa_pubkey_is_valid`` (size ≤ 4096) plus a usable key (odd modulus that fits)."""
        return (
            0 < self.modulus_bits <= 8 * RSA_MAX_BYTES
            and self.modulus_bits % 8 == 0
            and self.modulus.bit_length() <= self.modulus_bits
            and self.modulus % 2 == 1
            and 1 < self.pubexp < self.modulus
        )

    def to_rsa(self) -> RSA.RsaKey:
        return RSA.construct((self.modulus, self.pubexp), consistency_check=True)

    @classmethod
    def from_rsa(cls, key: RSA.RsaKey) -> RsaPublicKey:
        return cls(key.size_in_bits(), int(key.e), int(key.n))

    def summary(self) -> str:
        return f"RSA-{self.modulus_bits} e={self.pubexp}"


PublicKey = EcPublicKey | RsaPublicKey


@dataclasses.dataclass(frozen=True)
class CertPubkey:
    """A public key with its usage and algorithm: the firmware's ``sev_cert_pubkey_t``.

    This is what signs a slot: a slot verifies under it only if the slot's (usage, algo) equal these.
    """

    usage: Usage
    algo: Algo
    key: PublicKey

    def is_valid(self) -> bool:
        """AMD ``sev_cert.c`` ``pubkey_is_valid``."""
        if self.usage not in KEY_USAGES:
            return False
        if self.algo.is_rsa:
            return isinstance(self.key, RsaPublicKey) and self.key.is_valid()
        if self.algo.is_ecc:
            return isinstance(self.key, EcPublicKey) and self.key.is_valid()
        return False


# ---------------------------------------------------------------------------------------------------
# Signatures in the SEV byte order
# ---------------------------------------------------------------------------------------------------
def ecdsa_sign(key: ECC.EccKey, algo: Algo, message: bytes) -> bytes:
    rs = DSS.new(key, "fips-186-3", encoding="binary").sign(algo.hash.new(message))
    r, s = int.from_bytes(rs[:P384_BYTES], "big"), int.from_bytes(rs[P384_BYTES:], "big")
    return (int_to_le(r, EC_SCALAR_SIZE) + int_to_le(s, EC_SCALAR_SIZE)).ljust(SIG_SIZE, b"\0")


def ecdsa_verify(pub: EcPublicKey, algo: Algo, message: bytes, sig: bytes) -> bool:
    r, s = int_from_le(sig[:EC_SCALAR_SIZE]), int_from_le(sig[EC_SCALAR_SIZE:ECDSA_SIG_USED])
    if not (0 < r < P384_N and 0 < s < P384_N):
        return False
    rs = r.to_bytes(P384_BYTES, "big") + s.to_bytes(P384_BYTES, "big")
    try:
        DSS.new(pub.to_ecc(), "fips-186-3", encoding="binary").verify(algo.hash.new(message), rs)
    except ValueError:
        return False
    return True


def pss_sign(key: RSA.RsaKey, hash_mod, message: bytes) -> bytes:
    """RSASSA-PSS, MGF1 with the same hash, salt = hash length; returned little-endian."""
    h = hash_mod.new(message)
    return pss.new(key, salt_bytes=h.digest_size).sign(h)[::-1]


def pss_verify(pub: RsaPublicKey, hash_mod, message: bytes, sig_le: bytes) -> bool:
    nbytes = pub.modulus_bits // 8
    if len(sig_le) < nbytes or any(sig_le[nbytes:]):
        return False
    try:
        key = pub.to_rsa()
        h = hash_mod.new(message)
        pss.new(key, salt_bytes=h.digest_size).verify(h, bytes(sig_le[:nbytes])[::-1])
    except ValueError:
        return False
    return True
