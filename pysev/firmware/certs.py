"""SEV and AMD certificates (sev-api.md §5): formats, signing, and the firmware's validation rules.

Two wire formats, each declared once and shared by reader and writer:

* the SEV certificate (PDH, PEK, OCA, CEK, GODH), a fixed 2084 bytes (§5.1), and
* the AMD certificate (ARK, ASK), 832 or 1600 bytes (§5.2).

Readers treat their input as hostile and raise :class:`CertError` naming the field and its offset.
Validation follows AMD's firmware (ASPFW ``sev_cert.c`` / ``amd_cert.c`` / ``sev_mcmd.c``) and returns a
:class:`~pysev.firmware.status.SevStatus`, as the firmware does; :func:`verify_chain` is the host-side verifier that
checks every link and names the first one that fails.

Everything here is pure data: no globals, no I/O except the explicit ``load_*`` helpers.
"""
from __future__ import annotations

import dataclasses
import enum
import hmac
import struct
from pathlib import Path
from typing import Union

from Crypto.Hash import SHA256, SHA384
from Crypto.Protocol.DH import key_agreement
from Crypto.PublicKey import ECC, RSA
from Crypto.Signature import DSS, pss

from pysev.firmware.status import SevError, SevStatus

__all__ = [
    "AMD_CERT_FIXED_SIZE", "AMD_CERT_SIZE_2K", "AMD_CERT_SIZE_4K", "AMD_CERT_UNSIGNED_SIZE_2K",
    "NAPLES_BUNDLE_SIZE", "PLAT_CERTS_SIZE", "SEV_CERT_BODY_SIZE", "SEV_CERT_SIZE",
    "Algo", "AmdCert", "CertError", "CertPubkey", "ChainReport", "EcPublicKey", "LinkResult",
    "RsaPublicKey", "SevCert", "Signature", "TrustAnchor", "Usage",
    "amd_cert_validate", "ecdh_shared_secret", "ec_public_key", "join_plat_certs",
    "load_amd_cert", "load_sev_cert", "pdh_sanity_check", "read_cert_file", "require_valid", "sev_cert_validate",
    "split_amd_chain", "split_plat_certs", "validate_domain", "validate_platform", "verify_chain",
]


class CertError(ValueError):
    """A certificate is malformed. ``field`` and ``offset`` say what was wrong and where."""

    def __init__(self, field: str, offset: int | None, problem: str) -> None:
        self.field = field
        self.offset = offset
        where = f" at offset {offset:#05x}" if offset is not None else ""
        super().__init__(f"{field}{where}: {problem}")


class Usage(enum.IntEnum):
    """Key usage codes (§5.1; ASPFW ``sev_cert.h`` ``sev_cert_usage``)."""

    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algo(enum.IntEnum):
    """Public-key / signature algorithm codes (§5.1). RSA means RSASSA-PSS, salt = hash length."""

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


# Usages a firmware key may carry (ASPFW sev_cert.c usage_is_valid): INVALID is not one of them.
_KEY_USAGES = frozenset({Usage.ARK, Usage.ASK, Usage.OCA, Usage.PEK, Usage.PDH, Usage.CEK})

# ---------------------------------------------------------------------------------------------------
# NIST P-384 (FIPS 186-4 D.1.2.4). Only curve id 2 is used by SEV (§3.2).
# ---------------------------------------------------------------------------------------------------
CURVE_P384 = 2
P384_P = 2**384 - 2**128 - 2**96 + 2**32 - 1
P384_B = 0xB3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875AC656398D8A2ED19D2A85C8EDD3EC2AEF
P384_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
P384_BYTES = 48

# ---------------------------------------------------------------------------------------------------
# SEV certificate layout (§5.1). Offsets are from the start of the 2084-byte certificate.
# ---------------------------------------------------------------------------------------------------
SEV_CERT_SIZE = 0x824
SEV_CERT_BODY_SIZE = 0x414          # signed bytes = [0x000, 0x414)
OFF_VERSION = 0x000                 # u32, = 1
OFF_API_MAJOR = 0x004               # u8
OFF_API_MINOR = 0x005               # u8
OFF_RESERVED = 0x006                # u16, 0
OFF_PUBKEY_USAGE = 0x008            # u32
OFF_PUBKEY_ALGO = 0x00C             # u32
OFF_PUBKEY = 0x010                  # 1028-byte union
PUBKEY_SIZE = SEV_CERT_BODY_SIZE - OFF_PUBKEY
_HEADER = struct.Struct("<IBBHII")  # version .. pubkey_algo, 16 bytes
assert _HEADER.size == OFF_PUBKEY

# ECC public key inside the union
OFF_EC_CURVE = 0x010                # u32 curve id
OFF_EC_QX = 0x014                   # 72-byte LE
OFF_EC_QY = 0x05C                   # 72-byte LE
EC_SCALAR_SIZE = 72
OFF_EC_RESERVED = 0x0A4             # .. 0x414, zero (880 bytes)

# RSA public key inside the union
OFF_RSA_MODULUS_BITS = 0x010        # u32
OFF_RSA_PUBEXP = 0x014              # 512-byte LE
OFF_RSA_MODULUS = 0x214             # 512-byte LE
RSA_MAX_BYTES = 512
assert OFF_RSA_MODULUS + RSA_MAX_BYTES == SEV_CERT_BODY_SIZE
assert OFF_EC_QY + EC_SCALAR_SIZE == OFF_EC_RESERVED

# Signature slots
OFF_SIG1 = 0x414
OFF_SIG2 = 0x61C
SIG_SLOT_SIZE = 0x208               # usage u32, algo u32, 512 signature bytes
SIG_SIZE = 512
_SLOT_HEADER = struct.Struct("<II")
ECDSA_SIG_USED = 2 * EC_SCALAR_SIZE  # R[72] ‖ S[72]; the remaining 368 bytes are zero
assert OFF_SIG1 + SIG_SLOT_SIZE == OFF_SIG2 and OFF_SIG2 + SIG_SLOT_SIZE == SEV_CERT_SIZE

PLAT_CERTS_SIZE = 3 * SEV_CERT_SIZE  # PEK ‖ OCA ‖ CEK (§2.1), 6252 bytes

# ---------------------------------------------------------------------------------------------------
# AMD certificate layout (§5.2)
# ---------------------------------------------------------------------------------------------------
AMD_OFF_VERSION = 0x00              # u32, = 1
AMD_OFF_KEY_ID = 0x04               # 16 bytes
AMD_OFF_CERTIFYING_ID = 0x14        # 16 bytes
AMD_OFF_KEY_USAGE = 0x24            # u32
AMD_OFF_RESERVED = 0x28             # 16 bytes, zero
AMD_OFF_PUBEXP_SIZE = 0x38          # u32 bits
AMD_OFF_MODULUS_SIZE = 0x3C         # u32 bits
AMD_CERT_FIXED_SIZE = 0x40          # then PUBEXP ‖ MODULUS ‖ SIGNATURE
AMD_ID_SIZE = 16
_AMD_FIXED = struct.Struct("<I16s16sI16sII")
assert _AMD_FIXED.size == AMD_CERT_FIXED_SIZE
AMD_KEY_BITS = (2048, 4096)
AMD_CERT_SIZE_2K = AMD_CERT_FIXED_SIZE + 3 * 256     # 832
AMD_CERT_SIZE_4K = AMD_CERT_FIXED_SIZE + 3 * 512     # 1600
AMD_CERT_UNSIGNED_SIZE_2K = AMD_CERT_FIXED_SIZE + 2 * 256  # 576: AMD-published Naples ARK
NAPLES_BUNDLE_SIZE = AMD_CERT_SIZE_2K + AMD_CERT_UNSIGNED_SIZE_2K  # 1408 (§2.2 "Naples quirk")
AMD_CERT_MAX_SIZE = AMD_CERT_SIZE_4K


def _le(data: bytes | memoryview) -> int:
    return int.from_bytes(data, "little")


def _to_le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def _hash_for_bits(bits: int):
    """AMD root certs: SHA-256 for 2048-bit keys (Naples), SHA-384 for 4096-bit (Rome+) (§5.2)."""
    return SHA256 if bits <= 2048 else SHA384


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
        """ASPFW ``ecc_pubkey_is_valid``: curve P-384 and the point lies on it (not infinity)."""
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
        """ASPFW ``rsa_pubkey_is_valid`` (size ≤ 4096) plus a usable key (odd modulus that fits)."""
        return (0 < self.modulus_bits <= 8 * RSA_MAX_BYTES and self.modulus_bits % 8 == 0
                and self.modulus.bit_length() <= self.modulus_bits and self.modulus % 2 == 1
                and 1 < self.pubexp < self.modulus)

    def to_rsa(self) -> RSA.RsaKey:
        return RSA.construct((self.modulus, self.pubexp), consistency_check=True)

    @classmethod
    def from_rsa(cls, key: RSA.RsaKey) -> RsaPublicKey:
        return cls(key.size_in_bits(), int(key.e), int(key.n))

    def summary(self) -> str:
        return f"RSA-{self.modulus_bits} e={self.pubexp}"


PublicKey = Union[EcPublicKey, RsaPublicKey]


def ec_public_key(key: ECC.EccKey | EcPublicKey | SevCert) -> EcPublicKey:
    """The little-endian-storable point of a pycryptodome key, an ``EcPublicKey`` or an ECC cert."""
    if isinstance(key, EcPublicKey):
        return key
    if isinstance(key, SevCert):
        if not isinstance(key.pubkey, EcPublicKey):
            raise ValueError(f"{key.pubkey_usage.name} certificate does not hold an ECC key")
        return key.pubkey
    return EcPublicKey.from_ecc(key)


@dataclasses.dataclass(frozen=True)
class CertPubkey:
    """A public key with its usage and algorithm: the firmware's ``sev_cert_pubkey_t``.

    This is what signs a slot: a slot verifies under it only if the slot's (usage, algo) equal these.
    """

    usage: Usage
    algo: Algo
    key: PublicKey

    def is_valid(self) -> bool:
        """ASPFW ``pubkey_is_valid``."""
        if self.usage not in _KEY_USAGES:
            return False
        if self.algo.is_rsa:
            return isinstance(self.key, RsaPublicKey) and self.key.is_valid()
        if self.algo.is_ecc:
            return isinstance(self.key, EcPublicKey) and self.key.is_valid()
        return False


# ---------------------------------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Signature:
    """One signature slot: the signing key's usage and algo and 512 raw signature bytes."""

    usage: Usage = Usage.INVALID
    algo: Algo = Algo.INVALID
    sig: bytes = bytes(SIG_SIZE)

    def __post_init__(self) -> None:
        if len(self.sig) != SIG_SIZE:
            raise ValueError(f"signature data must be {SIG_SIZE} bytes, got {len(self.sig)}")

    @property
    def is_empty(self) -> bool:
        return self.usage == Usage.INVALID and self.algo == Algo.INVALID

    @property
    def is_malformed(self) -> bool:
        """Exactly one of usage/algo is INVALID (ASPFW ``sev_cert_validate_sig``)."""
        return (self.usage == Usage.INVALID) != (self.algo == Algo.INVALID)

    def to_bytes(self) -> bytes:
        return _SLOT_HEADER.pack(self.usage, self.algo) + self.sig


EMPTY_SIGNATURE = Signature()


def _ecdsa_sign(key: ECC.EccKey, algo: Algo, message: bytes) -> bytes:
    rs = DSS.new(key, "fips-186-3", encoding="binary").sign(algo.hash.new(message))
    r, s = int.from_bytes(rs[:P384_BYTES], "big"), int.from_bytes(rs[P384_BYTES:], "big")
    return (_to_le(r, EC_SCALAR_SIZE) + _to_le(s, EC_SCALAR_SIZE)).ljust(SIG_SIZE, b"\0")


def _ecdsa_verify(pub: EcPublicKey, algo: Algo, message: bytes, sig: bytes) -> bool:
    r, s = _le(sig[:EC_SCALAR_SIZE]), _le(sig[EC_SCALAR_SIZE:ECDSA_SIG_USED])
    if not (0 < r < P384_N and 0 < s < P384_N):
        return False
    rs = r.to_bytes(P384_BYTES, "big") + s.to_bytes(P384_BYTES, "big")
    try:
        DSS.new(pub.to_ecc(), "fips-186-3", encoding="binary").verify(algo.hash.new(message), rs)
    except ValueError:
        return False
    return True


def _pss_sign(key: RSA.RsaKey, hash_mod, message: bytes) -> bytes:
    """RSASSA-PSS, MGF1 with the same hash, salt = hash length; returned little-endian (§5.1)."""
    h = hash_mod.new(message)
    return pss.new(key, salt_bytes=h.digest_size).sign(h)[::-1]


def _pss_verify(pub: RsaPublicKey, hash_mod, message: bytes, sig_le: bytes) -> bool:
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


# ---------------------------------------------------------------------------------------------------
# SEV certificate (§5.1)
# ---------------------------------------------------------------------------------------------------
def _check_zero(data: bytes, start: int, end: int, field: str) -> None:
    if any(data[start:end]):
        first = next(i for i in range(start, end) if data[i])
        raise CertError(field, first, f"reserved bytes [{start:#05x}, {end:#05x}) must be zero")


def _enum(cls, value: int, field: str, offset: int):
    try:
        return cls(value)
    except ValueError:
        raise CertError(field, offset, f"unknown {cls.__name__.lower()} code {value:#x}") from None


@dataclasses.dataclass(frozen=True)
class SevCert:
    """A 2084-byte SEV certificate (PDH, PEK, OCA, CEK, GODH).

    Immutable: :meth:`sign` returns a new certificate with the signature in the first free slot.
    """

    pubkey_usage: Usage
    pubkey_algo: Algo
    pubkey: PublicKey
    api_major: int = 0
    api_minor: int = 0
    sig1: Signature = EMPTY_SIGNATURE
    sig2: Signature = EMPTY_SIGNATURE
    version: int = 1

    # -- reading ------------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, check_key: bool = True) -> SevCert:
        """Parse a certificate, treating it as hostile.

        ``check_key=False`` skips only the point-on-curve / RSA-key check, so that firmware-order
        validation can report a bad key after the signature check, as ASPFW ``sev_cert_validate`` does.
        """
        data = bytes(data)
        if len(data) != SEV_CERT_SIZE:
            raise CertError("SEV certificate", None, f"length must be {SEV_CERT_SIZE}, got {len(data)}")
        version, api_major, api_minor, reserved, usage, algo = _HEADER.unpack_from(data, 0)
        if version != 1:
            raise CertError("VERSION", OFF_VERSION, f"unsupported version {version}, expected 1")
        if reserved:
            raise CertError("reserved", OFF_RESERVED, f"must be zero, got {reserved:#x}")
        usage = _enum(Usage, usage, "PUBKEY_USAGE", OFF_PUBKEY_USAGE)
        algo = _enum(Algo, algo, "PUBKEY_ALGO", OFF_PUBKEY_ALGO)
        if usage == Usage.INVALID:
            raise CertError("PUBKEY_USAGE", OFF_PUBKEY_USAGE, "certificate holds no key (usage INVALID)")
        pubkey: PublicKey
        if algo.is_ecc:
            (curve,) = struct.unpack_from("<I", data, OFF_EC_CURVE)
            if curve != CURVE_P384:
                raise CertError("CURVE", OFF_EC_CURVE, f"curve id {curve}, only 2 (P-384) is supported")
            pubkey = EcPublicKey(_le(data[OFF_EC_QX:OFF_EC_QX + EC_SCALAR_SIZE]),
                                 _le(data[OFF_EC_QY:OFF_EC_QY + EC_SCALAR_SIZE]), curve)
            _check_zero(data, OFF_EC_RESERVED, SEV_CERT_BODY_SIZE, "PUBKEY reserved")
            if check_key and not pubkey.is_valid():
                raise CertError("PUBKEY", OFF_EC_QX, "point (QX, QY) is not on P-384")
        elif algo.is_rsa:
            (bits,) = struct.unpack_from("<I", data, OFF_RSA_MODULUS_BITS)
            if not (0 < bits <= 8 * RSA_MAX_BYTES and bits % 8 == 0):
                raise CertError("MODULUS_SIZE", OFF_RSA_MODULUS_BITS, f"bad RSA modulus size {bits} bits")
            n = bits // 8
            _check_zero(data, OFF_RSA_PUBEXP + n, OFF_RSA_MODULUS, "PUB_EXP padding")
            _check_zero(data, OFF_RSA_MODULUS + n, SEV_CERT_BODY_SIZE, "MODULUS padding")
            pubkey = RsaPublicKey(bits, _le(data[OFF_RSA_PUBEXP:OFF_RSA_PUBEXP + n]),
                                  _le(data[OFF_RSA_MODULUS:OFF_RSA_MODULUS + n]))
            if check_key and not pubkey.is_valid():
                raise CertError("PUBKEY", OFF_RSA_MODULUS, "not a usable RSA public key")
        else:
            raise CertError("PUBKEY_ALGO", OFF_PUBKEY_ALGO, "certificate holds no key (algo INVALID)")
        sigs = [cls._read_slot(data, off, name) for off, name in ((OFF_SIG1, "SIG1"), (OFF_SIG2, "SIG2"))]
        return cls(usage, algo, pubkey, api_major, api_minor, sigs[0], sigs[1], version)

    @staticmethod
    def _read_slot(data: bytes, off: int, name: str) -> Signature:
        usage, algo = _SLOT_HEADER.unpack_from(data, off)
        usage = _enum(Usage, usage, f"{name}_USAGE", off)
        algo = _enum(Algo, algo, f"{name}_ALGO", off + 4)
        sig_off = off + _SLOT_HEADER.size
        sig = Signature(usage, algo, data[sig_off:sig_off + SIG_SIZE])
        if sig.is_empty:
            _check_zero(data, sig_off, sig_off + SIG_SIZE, f"{name} (empty slot)")
        elif algo.is_ecdsa:
            _check_zero(data, sig_off + ECDSA_SIG_USED, sig_off + SIG_SIZE, f"{name} reserved")
        return sig

    # -- writing ------------------------------------------------------------------------------------
    def body(self) -> bytes:
        """The signed bytes [0x000, 0x414)."""
        out = bytearray(SEV_CERT_BODY_SIZE)
        _HEADER.pack_into(out, 0, self.version, self.api_major, self.api_minor, 0,
                          self.pubkey_usage, self.pubkey_algo)
        if isinstance(self.pubkey, EcPublicKey):
            struct.pack_into("<I", out, OFF_EC_CURVE, self.pubkey.curve)
            out[OFF_EC_QX:OFF_EC_QX + EC_SCALAR_SIZE] = _to_le(self.pubkey.x, EC_SCALAR_SIZE)
            out[OFF_EC_QY:OFF_EC_QY + EC_SCALAR_SIZE] = _to_le(self.pubkey.y, EC_SCALAR_SIZE)
        else:
            n = self.pubkey.modulus_bits // 8
            struct.pack_into("<I", out, OFF_RSA_MODULUS_BITS, self.pubkey.modulus_bits)
            out[OFF_RSA_PUBEXP:OFF_RSA_PUBEXP + n] = _to_le(self.pubkey.pubexp, n)
            out[OFF_RSA_MODULUS:OFF_RSA_MODULUS + n] = _to_le(self.pubkey.modulus, n)
        return bytes(out)

    def to_bytes(self) -> bytes:
        return self.body() + self.sig1.to_bytes() + self.sig2.to_bytes()

    # -- building and signing -----------------------------------------------------------------------
    @classmethod
    def build(cls, public_key: ECC.EccKey | RSA.RsaKey | PublicKey, usage: Usage, algo: Algo,
              api_major: int = 0, api_minor: int = 0) -> SevCert:
        """An unsigned certificate for a public key (ASPFW ``sev_cert_create`` without a signer)."""
        usage, algo = Usage(usage), Algo(algo)
        if usage not in _KEY_USAGES:
            raise ValueError(f"usage {usage.name} cannot be certified")
        if isinstance(public_key, RSA.RsaKey):
            public_key = RsaPublicKey.from_rsa(public_key)
        elif isinstance(public_key, ECC.EccKey):
            public_key = EcPublicKey.from_ecc(public_key)
        want = EcPublicKey if algo.is_ecc else RsaPublicKey if algo.is_rsa else None
        if want is None or not isinstance(public_key, want):
            raise ValueError(f"algo {algo.name} does not fit a {type(public_key).__name__}")
        if not (0 <= api_major <= 0xFF and 0 <= api_minor <= 0xFF):
            raise ValueError(f"API version {api_major}.{api_minor} does not fit in two bytes")
        return cls(usage, algo, public_key, api_major, api_minor)

    @property
    def signing_key(self) -> CertPubkey:
        """This certificate's key as a signer: (usage, algo, public key)."""
        return CertPubkey(self.pubkey_usage, self.pubkey_algo, self.pubkey)

    def with_signature(self, sig: Signature) -> SevCert:
        """Put ``sig`` into the first free slot (ASPFW ``sev_cert_set_sig``); both full → error."""
        if self.sig1.usage == Usage.INVALID:
            return dataclasses.replace(self, sig1=sig)
        if self.sig2.usage == Usage.INVALID:
            return dataclasses.replace(self, sig2=sig)
        raise SevError(SevStatus.INVALID_CERTIFICATE, "both signature slots are already in use")

    def sign(self, private_key: ECC.EccKey | RSA.RsaKey, usage: Usage, algo: Algo) -> SevCert:
        """Sign the body with ``private_key`` acting as a key of ``usage``/``algo``; fill a free slot."""
        usage, algo = Usage(usage), Algo(algo)
        if usage not in _KEY_USAGES:
            raise ValueError(f"a key of usage {usage.name} cannot sign")
        if algo.is_ecdsa:
            if not isinstance(private_key, ECC.EccKey) or not private_key.has_private():
                raise TypeError(f"{algo.name} needs an ECC private key")
            sig = _ecdsa_sign(private_key, algo, self.body())
        elif algo.is_rsa:
            if not isinstance(private_key, RSA.RsaKey) or not private_key.has_private():
                raise TypeError(f"{algo.name} needs an RSA private key")
            sig = _pss_sign(private_key, algo.hash, self.body()).ljust(SIG_SIZE, b"\0")
        else:
            raise ValueError(f"algo {algo.name} cannot sign")  # ECDH keys are not signing keys
        return self.with_signature(Signature(usage, algo, sig))

    def sign_as(self, signer: SevCert | AmdCert, private_key: ECC.EccKey | RSA.RsaKey) -> SevCert:
        """Sign with the private half of ``signer``'s key, using the signer's usage and algo."""
        pub = signer.signing_key if isinstance(signer, SevCert) else signer.export_pubkey()
        mine = (EcPublicKey.from_ecc(private_key) if isinstance(private_key, ECC.EccKey)
                else RsaPublicKey.from_rsa(private_key))
        if mine != pub.key:
            raise ValueError(f"private key does not belong to the {pub.usage.name} certificate")
        return self.sign(private_key, pub.usage, pub.algo)

    def unsigned(self) -> SevCert:
        """The same body with both slots empty (what PEK_CSR returns, §2.9)."""
        return dataclasses.replace(self, sig1=EMPTY_SIGNATURE, sig2=EMPTY_SIGNATURE)

    # -- convenience --------------------------------------------------------------------------------
    def ecc_key(self) -> ECC.EccKey:
        return ec_public_key(self).to_ecc()

    def describe(self) -> dict:
        """Every field, decoded, as plain JSON-able data."""
        def slot(s: Signature) -> dict:
            out = {"usage": _code(s.usage), "algo": _code(s.algo), "empty": s.is_empty,
                   "malformed": s.is_malformed}
            if s.algo.is_ecdsa:   # r, s as big-endian hex
                out["r"] = f"{_le(s.sig[:EC_SCALAR_SIZE]):096x}"
                out["s"] = f"{_le(s.sig[EC_SCALAR_SIZE:ECDSA_SIG_USED]):096x}"
            elif not s.is_empty:  # RSA: the standard big-endian octet string
                out["sig"] = s.sig.rstrip(b"\0")[::-1].hex()
            return out
        pk = self.pubkey
        key = ({"type": "ecc", "curve": pk.curve, "curve_name": "P-384" if pk.curve == CURVE_P384 else None,
                "qx": f"{pk.x:096x}", "qy": f"{pk.y:096x}", "on_curve": pk.is_valid()}
               if isinstance(pk, EcPublicKey) else
               {"type": "rsa", "modulus_bits": pk.modulus_bits, "pubexp": pk.pubexp,
                "modulus": f"{pk.modulus:x}"})
        return {"format": "sev", "size": SEV_CERT_SIZE, "version": self.version,
                "api": f"{self.api_major}.{self.api_minor}", "api_major": self.api_major,
                "api_minor": self.api_minor, "pubkey_usage": _code(self.pubkey_usage),
                "pubkey_algo": _code(self.pubkey_algo), "pubkey": key,
                "sig1": slot(self.sig1), "sig2": slot(self.sig2)}


def _code(value: enum.IntEnum) -> dict:
    return {"code": f"{int(value):#x}", "name": value.name}


# ---------------------------------------------------------------------------------------------------
# AMD certificate (§5.2)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AmdCert:
    """An ARK or ASK. ``signature`` is little-endian, or ``None`` for the AMD-published Naples ARK."""

    key_id: bytes
    certifying_id: bytes
    key_usage: Usage
    modulus_bits: int
    pubexp: int
    modulus: int
    signature: bytes | None = None
    pubexp_bits: int | None = None   # defaults to modulus_bits, as in every real cert
    version: int = 1

    def __post_init__(self) -> None:
        if self.pubexp_bits is None:
            object.__setattr__(self, "pubexp_bits", self.modulus_bits)
        if len(self.key_id) != AMD_ID_SIZE or len(self.certifying_id) != AMD_ID_SIZE:
            raise ValueError("KEY_ID and CERTIFYING_ID are 16 bytes")
        if self.modulus_bits not in AMD_KEY_BITS or self.pubexp_bits not in AMD_KEY_BITS:
            raise ValueError(f"AMD key sizes are 2048 or 4096 bits, got {self.modulus_bits}/{self.pubexp_bits}")
        if self.signature is not None and len(self.signature) != self.modulus_bits // 8:
            raise ValueError(f"signature must be {self.modulus_bits // 8} bytes, got {len(self.signature)}")

    # -- reading ------------------------------------------------------------------------------------
    @staticmethod
    def _sizes(data: bytes, base: int) -> tuple[int, int]:
        if len(data) - base < AMD_CERT_FIXED_SIZE:
            raise CertError("AMD certificate", base,
                            f"{len(data) - base} bytes is shorter than the {AMD_CERT_FIXED_SIZE}-byte header")
        pe_bits, mod_bits = struct.unpack_from("<II", data, base + AMD_OFF_PUBEXP_SIZE)
        if pe_bits not in AMD_KEY_BITS:
            raise CertError("PUBEXP_SIZE", base + AMD_OFF_PUBEXP_SIZE, f"{pe_bits} bits, expected 2048 or 4096")
        if mod_bits not in AMD_KEY_BITS:
            raise CertError("MODULUS_SIZE", base + AMD_OFF_MODULUS_SIZE, f"{mod_bits} bits, expected 2048 or 4096")
        return pe_bits, mod_bits

    @classmethod
    def signed_size_at(cls, data: bytes, base: int = 0) -> int:
        """Total size of the (signed) AMD cert starting at ``base``, from its bounded header."""
        pe_bits, mod_bits = cls._sizes(data, base)
        return AMD_CERT_FIXED_SIZE + pe_bits // 8 + 2 * (mod_bits // 8)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, allow_unsigned: bool = False) -> AmdCert:
        """Parse one ARK/ASK; the length must be exactly what the header's sizes imply."""
        data = bytes(data)
        pe_bits, mod_bits = cls._sizes(data, 0)
        version, key_id, cert_id, usage, _, _, _ = _AMD_FIXED.unpack_from(data, 0)
        pe_n, mod_n = pe_bits // 8, mod_bits // 8
        unsigned_len = AMD_CERT_FIXED_SIZE + pe_n + mod_n
        if len(data) == unsigned_len + mod_n:
            signature: bytes | None = data[unsigned_len:]
        elif len(data) == unsigned_len and allow_unsigned:
            signature = None
        else:
            expect = f"{unsigned_len + mod_n}" + (f" (or {unsigned_len} unsigned)" if allow_unsigned else "")
            raise CertError("AMD certificate", None, f"length {len(data)} does not match its sizes: expected {expect}")
        if version != 1:
            raise CertError("VERSION", AMD_OFF_VERSION, f"unsupported version {version}, expected 1")
        if usage not in (Usage.ARK, Usage.ASK):
            raise CertError("KEY_USAGE", AMD_OFF_KEY_USAGE, f"{usage:#x} is neither ARK (0x0) nor ASK (0x13)")
        _check_zero(data, AMD_OFF_RESERVED, AMD_OFF_PUBEXP_SIZE, "reserved")
        off = AMD_CERT_FIXED_SIZE
        pubexp = _le(data[off:off + pe_n])
        modulus = _le(data[off + pe_n:off + pe_n + mod_n])
        return cls(key_id, cert_id, Usage(usage), mod_bits, pubexp, modulus, signature, pe_bits, version)

    # -- writing ------------------------------------------------------------------------------------
    def signed_bytes(self) -> bytes:
        """Fixed header ‖ PUBEXP ‖ MODULUS: what is signed, and what the fused ARK hash covers."""
        fixed = _AMD_FIXED.pack(self.version, self.key_id, self.certifying_id, self.key_usage,
                                bytes(16), self.pubexp_bits, self.modulus_bits)
        return fixed + _to_le(self.pubexp, self.pubexp_bits // 8) + _to_le(self.modulus, self.modulus_bits // 8)

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + (self.signature or b"")

    @property
    def is_signed(self) -> bool:
        return self.signature is not None

    @property
    def hash(self):
        """The hash this key signs with: SHA-256 for 2048-bit, SHA-384 for 4096-bit (§5.2)."""
        return _hash_for_bits(self.modulus_bits)

    def key_hash(self) -> bytes:
        """SHA-384(fixed ‖ PUBEXP ‖ MODULUS): the value firmware compares with the fused root-key hash."""
        return SHA384.new(self.signed_bytes()).digest()

    @property
    def public_key(self) -> RsaPublicKey:
        return RsaPublicKey(self.modulus_bits, self.pubexp, self.modulus)

    def export_pubkey(self) -> CertPubkey:
        """ASPFW ``amd_cert_export_pubkey``: the ASK as the SEV signing key of the CEK.

        Genoa firmware always exports RSA_SHA384; real Naples CEKs carry RSA_SHA256 from a 2048-bit
        ASK, so the algo follows the key size here (RSA_SHA384 for every 4096-bit root).
        """
        algo = Algo.RSA_SHA256 if self.modulus_bits == 2048 else Algo.RSA_SHA384
        return CertPubkey(self.key_usage, algo, self.public_key)

    # -- building and signing -----------------------------------------------------------------------
    @classmethod
    def build(cls, key_id: bytes, certifying_id: bytes, usage: Usage, public_key: RSA.RsaKey) -> AmdCert:
        bits = public_key.size_in_bits()
        return cls(bytes(key_id), bytes(certifying_id), Usage(usage), bits, int(public_key.e), int(public_key.n))

    def sign(self, private_key: RSA.RsaKey) -> AmdCert:
        """RSASSA-PSS over fixed‖PUBEXP‖MODULUS with the signer's hash; stored little-endian."""
        if not private_key.has_private():
            raise TypeError("signing needs an RSA private key")
        if private_key.size_in_bits() != self.modulus_bits:
            raise ValueError("the SIGNATURE field is MODULUS_SIZE long: signer and subject sizes must match")
        sig = _pss_sign(private_key, _hash_for_bits(private_key.size_in_bits()), self.signed_bytes())
        return dataclasses.replace(self, signature=sig)

    def describe(self) -> dict:
        return {"format": "amd", "size": len(self.to_bytes()), "version": self.version,
                "key_id": self.key_id.hex(), "certifying_id": self.certifying_id.hex(),
                "key_usage": _code(self.key_usage), "pubexp_bits": self.pubexp_bits,
                "modulus_bits": self.modulus_bits, "pubexp": self.pubexp, "modulus": f"{self.modulus:x}",
                "signed": self.is_signed, "self_signed_id": self.key_id == self.certifying_id,
                "signature": self.signature[::-1].hex() if self.signature else None,
                "key_hash_sha384": self.key_hash().hex()}


def split_amd_chain(blob: bytes | bytearray | memoryview) -> tuple[AmdCert, AmdCert]:
    """Split the SEND_START ``amd_certs`` blob ASK ‖ ARK (§2.1) into ``(ask, ark)``.

    The AMD-published Naples bundle (1408 bytes: ASK 832 ‖ ARK 576 without signature) is recognised;
    its ARK comes back with ``signature is None`` (``ark.is_signed`` is False).
    """
    blob = bytes(blob)
    if len(blob) > 2 * AMD_CERT_MAX_SIZE:
        raise CertError("AMD certificate chain", None, f"length {len(blob)} exceeds {2 * AMD_CERT_MAX_SIZE}")
    ask_len = AmdCert.signed_size_at(blob, 0)
    if ask_len > len(blob):
        raise CertError("ASK", 0, f"needs {ask_len} bytes, chain has {len(blob)}")
    ask = AmdCert.from_bytes(blob[:ask_len])
    ark = AmdCert.from_bytes(blob[ask_len:], allow_unsigned=True)
    return ask, ark


def split_plat_certs(blob: bytes | bytearray | memoryview, *,
                     check_key: bool = True) -> tuple[SevCert, SevCert, SevCert]:
    """Split PDH_CERT_EXPORT / SEND_START ``plat_certs`` PEK ‖ OCA ‖ CEK (§2.1) into ``(pek, oca, cek)``."""
    blob = bytes(blob)
    if len(blob) != PLAT_CERTS_SIZE:
        raise CertError("platform certificate chain", None, f"length must be {PLAT_CERTS_SIZE}, got {len(blob)}")
    pek, oca, cek = (SevCert.from_bytes(blob[i * SEV_CERT_SIZE:(i + 1) * SEV_CERT_SIZE], check_key=check_key)
                     for i in range(3))
    return pek, oca, cek


def join_plat_certs(pek: SevCert, oca: SevCert, cek: SevCert) -> bytes:
    """PEK ‖ OCA ‖ CEK, as PDH_CERT_EXPORT writes it."""
    return pek.to_bytes() + oca.to_bytes() + cek.to_bytes()


# ---------------------------------------------------------------------------------------------------
# Firmware validation rules (ASPFW sev_cert.c / amd_cert.c), returning SevStatus
# ---------------------------------------------------------------------------------------------------
Signer = Union[SevCert, AmdCert, CertPubkey]


def _as_pubkey(signer: Signer) -> CertPubkey:
    if isinstance(signer, CertPubkey):
        return signer
    if isinstance(signer, AmdCert):
        return signer.export_pubkey()
    return signer.signing_key


def _slot_verifies(cert: SevCert, slot: Signature, key: CertPubkey) -> bool:
    body = cert.body()
    if key.algo.is_rsa:
        return isinstance(key.key, RsaPublicKey) and _pss_verify(key.key, key.algo.hash, body, slot.sig)
    if key.algo.is_ecdsa:
        return isinstance(key.key, EcPublicKey) and _ecdsa_verify(key.key, key.algo, body, slot.sig)
    return False  # an ECDH key never produced a signature


# PDH←PEK, PEK←OCA or CEK, OCA←OCA, CEK←ASK (§5.1)
_ALLOWED_SIGNERS = {
    Usage.PDH: frozenset({Usage.PEK}),
    Usage.PEK: frozenset({Usage.OCA, Usage.CEK}),
    Usage.OCA: frozenset({Usage.OCA}),
    Usage.CEK: frozenset({Usage.ASK}),
}


def _body_is_valid(cert: SevCert) -> bool:
    return cert.version == 1 and cert.signing_key.is_valid()


def sev_cert_validate(cert: SevCert, signer: Signer) -> SevStatus:
    """ASPFW ``sev_cert_validate`` exactly (§5.1).

    Both slots are scanned: a malformed slot (exactly one of usage/algo INVALID) → BAD_SIGNATURE at
    once; slots whose (usage, algo) differ from the signer's are skipped; the last matching slot's
    verification decides (BAD_SIGNATURE on failure); none matching → INVALID_CERTIFICATE. Then the
    body (version 1, valid key) and the signer's usage for this subject → INVALID_CERTIFICATE.
    """
    key = _as_pubkey(signer)
    if not key.is_valid():
        return SevStatus.INVALID_CERTIFICATE
    status = SevStatus.INVALID_CERTIFICATE
    for slot in (cert.sig1, cert.sig2):
        if slot.is_malformed:
            return SevStatus.BAD_SIGNATURE
        if slot.usage != key.usage or slot.algo != key.algo:
            continue
        status = SevStatus.SUCCESS if _slot_verifies(cert, slot, key) else SevStatus.BAD_SIGNATURE
    if status != SevStatus.SUCCESS:
        return status
    if not _body_is_valid(cert):
        return SevStatus.INVALID_CERTIFICATE
    if key.usage not in _ALLOWED_SIGNERS.get(cert.pubkey_usage, frozenset()):
        return SevStatus.INVALID_CERTIFICATE
    return SevStatus.SUCCESS


def amd_cert_validate(cert: AmdCert, parent: AmdCert | None, expected_usage: Usage) -> SevStatus:
    """ASPFW ``amd_cert_validate``: signature by ``parent`` (or none if ``parent`` is None), then the
    fixed fields, then usage and CERTIFYING_ID == parent's KEY_ID (own KEY_ID when no parent)."""
    if parent is not None:
        if cert.signature is None or not _pss_verify(parent.public_key, parent.hash, cert.signed_bytes(),
                                                     cert.signature):
            return SevStatus.BAD_SIGNATURE
    if cert.version != 1 or cert.modulus_bits not in AMD_KEY_BITS or cert.pubexp_bits not in AMD_KEY_BITS:
        return SevStatus.INVALID_CERTIFICATE
    key_id = parent.key_id if parent is not None else cert.key_id
    if cert.key_usage != expected_usage or not hmac.compare_digest(cert.certifying_id, key_id):
        return SevStatus.INVALID_CERTIFICATE
    return SevStatus.SUCCESS


def pdh_sanity_check(pdh: SevCert | bytes) -> SevStatus:
    """SEND_START step 7 (ASPFW ``sev_cert_sanity_check(pdh, PDH, ECDH_SHA256)``): version 1, valid
    point, usage 0x1003 and algo exactly 0x3, else INVALID_CERTIFICATE."""
    if not isinstance(pdh, SevCert):
        try:
            pdh = SevCert.from_bytes(pdh, check_key=False)
        except CertError:
            return SevStatus.INVALID_CERTIFICATE
    if not _body_is_valid(pdh) or pdh.pubkey_usage != Usage.PDH or pdh.pubkey_algo != Algo.ECDH_SHA256:
        return SevStatus.INVALID_CERTIFICATE
    return SevStatus.SUCCESS


@dataclasses.dataclass(frozen=True)
class TrustAnchor:
    """What a platform pins about its AMD root: the hard-coded ARK KEY_ID and the fused SHA-384 of
    ARK fixed ‖ PUBEXP ‖ MODULUS (§2.2 step 4, ASPFW ``amd_cert_validate_ark``)."""

    ark_key_id: bytes
    ark_hash: bytes

    @classmethod
    def from_ark(cls, ark: AmdCert) -> TrustAnchor:
        return cls(ark.key_id, ark.key_hash())


def _ark_matches_anchor(ark: AmdCert, anchor: TrustAnchor) -> bool:
    return (hmac.compare_digest(ark.key_id, anchor.ark_key_id)
            and hmac.compare_digest(ark.key_hash(), anchor.ark_hash))


def validate_platform(pdh: bytes | SevCert, plat_certs: bytes, amd_certs: bytes, anchor: TrustAnchor,
                      *, allow_unsigned_ark: bool = False) -> SevStatus:
    """SEND_START with policy bit SEV, step 4 (ASPFW ``validate_platform``), in firmware order.

    Lengths (INVALID_LENGTH); ARK self-signed, usage ARK, CERTIFYING_ID == KEY_ID, KEY_ID and hash equal
    the anchor; ASK←ARK; CEK←ASK; PEK←CEK; PDH←PEK. The OCA is not looked at (that is the DOMAIN
    check). ``allow_unsigned_ark`` accepts the AMD-published Naples bundle, whose ARK has no signature
    but is still pinned by the fused hash (behaviour of Naples firmware is UNCONFIRMED, §2.2).
    The receiver-API policy check needs the PEK: get it from :func:`split_plat_certs`.
    """
    pdh_bytes = pdh.to_bytes() if isinstance(pdh, SevCert) else bytes(pdh)
    if len(plat_certs) != PLAT_CERTS_SIZE or len(pdh_bytes) != SEV_CERT_SIZE:
        return SevStatus.INVALID_LENGTH
    if len(amd_certs) > 2 * AMD_CERT_MAX_SIZE:
        return SevStatus.INVALID_LENGTH
    try:
        ask, ark = split_amd_chain(amd_certs)
    except CertError:
        return SevStatus.INVALID_LENGTH
    if not ark.is_signed and not allow_unsigned_ark:
        return SevStatus.INVALID_LENGTH   # Genoa's amd_cert_chain_length_is_valid rejects 1408
    try:
        pek, _oca, cek = split_plat_certs(plat_certs, check_key=False)
        pdh_cert = SevCert.from_bytes(pdh_bytes, check_key=False)
    except CertError:
        return SevStatus.INVALID_CERTIFICATE
    status = amd_cert_validate(ark, ark if ark.is_signed else None, Usage.ARK)
    if status != SevStatus.SUCCESS:
        return status
    if not _ark_matches_anchor(ark, anchor):
        return SevStatus.INVALID_CERTIFICATE
    status = amd_cert_validate(ask, ark, Usage.ASK)
    if status == SevStatus.SUCCESS:
        status = sev_cert_validate(cek, ask)        # ASK exported as a SEV signing key
    if status == SevStatus.SUCCESS:
        status = sev_cert_validate(pek, cek)
    if status == SevStatus.SUCCESS:
        status = sev_cert_validate(pdh_cert, pek)
    return status


def validate_domain(pdh: bytes | SevCert, plat_certs: bytes, own_oca: bytes | SevCert) -> SevStatus:
    """SEND_START with policy bit DOMAIN, step 5 (ASPFW ``validate_domain``): OCA self-signed, PEK←OCA,
    PDH←PEK, and the supplied OCA byte-for-byte equal to this platform's OCA, else POLICY_FAILURE."""
    pdh_bytes = pdh.to_bytes() if isinstance(pdh, SevCert) else bytes(pdh)
    if len(plat_certs) != PLAT_CERTS_SIZE or len(pdh_bytes) != SEV_CERT_SIZE:
        return SevStatus.INVALID_LENGTH
    try:
        pek, oca, _cek = split_plat_certs(plat_certs, check_key=False)
        pdh_cert = SevCert.from_bytes(pdh_bytes, check_key=False)
    except CertError:
        return SevStatus.INVALID_CERTIFICATE
    status = sev_cert_validate(oca, oca)
    if status == SevStatus.SUCCESS:
        status = sev_cert_validate(pek, oca)
    if status == SevStatus.SUCCESS:
        status = sev_cert_validate(pdh_cert, pek)
    if status != SevStatus.SUCCESS:
        return status
    own = own_oca.to_bytes() if isinstance(own_oca, SevCert) else bytes(own_oca)
    supplied = plat_certs[SEV_CERT_SIZE:2 * SEV_CERT_SIZE]
    return SevStatus.SUCCESS if hmac.compare_digest(bytes(supplied), own) else SevStatus.POLICY_FAILURE


def require_valid(cert: SevCert, signer: Signer, link: str) -> None:
    """:func:`sev_cert_validate`, raising ``SevError`` that names ``link`` (e.g. ``"PEK<-CEK"``)."""
    status = sev_cert_validate(cert, signer)
    if status != SevStatus.SUCCESS:
        raise SevError(status, f"{link}: {_explain(cert, signer, status)}")


def _explain(cert: SevCert, signer: Signer, status: SevStatus) -> str:
    key = _as_pubkey(signer)
    if status == SevStatus.SUCCESS:
        n = [i for i, s in enumerate((cert.sig1, cert.sig2), 1) if (s.usage, s.algo) == (key.usage, key.algo)]
        return f"signed by {key.usage.name}/{key.algo.name} (slot {n[-1]})"
    if not key.is_valid():
        return f"signer key ({key.usage.name}/{key.algo.name}) is not a valid public key"
    slots = (cert.sig1, cert.sig2)
    if any(s.is_malformed for s in slots):
        return "a signature slot is malformed (exactly one of usage/algo is INVALID)"
    if status == SevStatus.BAD_SIGNATURE:
        return f"signature by {key.usage.name}/{key.algo.name} does not verify"
    if not any(s.usage == key.usage and s.algo == key.algo for s in slots):
        have = ", ".join(f"{s.usage.name}/{s.algo.name}" for s in slots)
        return f"no signature slot for signer {key.usage.name}/{key.algo.name} (slots: {have})"
    if not _body_is_valid(cert):
        return "certificate body invalid (version or public key, e.g. point not on P-384)"
    return f"a {key.usage.name} key may not certify a {cert.pubkey_usage.name} key"


# ---------------------------------------------------------------------------------------------------
# Host-side full chain verification
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LinkResult:
    link: str
    status: SevStatus
    message: str

    @property
    def ok(self) -> bool:
        return self.status == SevStatus.SUCCESS


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """Result of :func:`verify_chain`: every link's result, in order ARK … PDH."""

    links: tuple[LinkResult, ...]

    @property
    def ok(self) -> bool:
        return all(link.ok for link in self.links)

    @property
    def first_failure(self) -> LinkResult | None:
        return next((link for link in self.links if not link.ok), None)

    @property
    def message(self) -> str:
        bad = self.first_failure
        if bad is None:
            return "certificate chain valid: " + ", ".join(link.link for link in self.links)
        return f"certificate chain invalid at {bad.link}: {bad.message}"

    def raise_for_status(self) -> None:
        bad = self.first_failure
        if bad is not None:
            raise SevError(bad.status, self.message)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "message": self.message,
                "first_failure": self.first_failure.link if self.first_failure else None,
                "links": [{"link": l.link, "ok": l.ok, "status": l.status.name, "message": l.message}
                          for l in self.links]}


def _amd_link(name: str, cert: AmdCert, parent: AmdCert, usage: Usage) -> LinkResult:
    """One ARK/ASK link, with the firmware's status (signature first, then fields) and a reason."""
    algo = f"RSA-PSS/{'SHA-256' if parent.hash is SHA256 else 'SHA-384'}"
    if not cert.is_signed:
        return LinkResult(name, SevStatus.BAD_SIGNATURE,
                          "certificate has no signature (AMD-published Naples ARK form)")
    status = amd_cert_validate(cert, parent, usage)
    if status == SevStatus.SUCCESS:
        return LinkResult(name, status, f"signed by {parent.key_id.hex()} ({algo})")
    if status == SevStatus.BAD_SIGNATURE:
        why = (f"{parent.modulus_bits}-bit key cannot have made a {cert.modulus_bits}-bit signature"
               if cert.modulus_bits != parent.modulus_bits else "does not verify")
        return LinkResult(name, status, f"{algo} signature by key {parent.key_id.hex()} {why}")
    if cert.key_usage != usage:
        return LinkResult(name, status, f"KEY_USAGE is {cert.key_usage.name} ({int(cert.key_usage):#x}), "
                                        f"expected {usage.name}")
    if cert.certifying_id != parent.key_id:
        return LinkResult(name, status, f"CERTIFYING_ID {cert.certifying_id.hex()} != signer KEY_ID "
                                        f"{parent.key_id.hex()}")
    return LinkResult(name, status, "fixed fields invalid (version or key sizes)")


def _sev_link(name: str, cert: SevCert, expected: Usage, signer: Signer) -> LinkResult:
    if cert.pubkey_usage != expected:
        return LinkResult(name, SevStatus.INVALID_CERTIFICATE,
                          f"certificate usage is {cert.pubkey_usage.name}, expected {expected.name}")
    status = sev_cert_validate(cert, signer)
    return LinkResult(name, status, _explain(cert, signer, status))


def verify_chain(ark: AmdCert, ask: AmdCert, cek: SevCert, oca: SevCert, pek: SevCert,
                 pdh: SevCert, *, anchor: TrustAnchor | None = None) -> ChainReport:
    """Check every link of a full chain and report each (§5; README "A correct verifier concludes").

    Links: ARK self-signed (usage ARK, CERTIFYING_ID == KEY_ID), optionally pinned by ``anchor``;
    ASK←ARK; CEK←ASK; OCA self-signed; PEK←OCA; PEK←CEK; PDH←PEK. SEV links use the firmware rule
    :func:`sev_cert_validate` (which also checks the points are on P-384) plus the subject's usage.
    """
    links = [_amd_link("ARK (self-signed)", ark, ark, Usage.ARK)]
    if anchor is not None:
        pinned = _ark_matches_anchor(ark, anchor)
        links.append(LinkResult("ARK (trust anchor)",
                                SevStatus.SUCCESS if pinned else SevStatus.INVALID_CERTIFICATE,
                                "KEY_ID and SHA-384 match the pinned root" if pinned
                                else "ARK is not the pinned root (KEY_ID or SHA-384 differs)"))
    links += [
        _amd_link("ASK<-ARK", ask, ark, Usage.ASK),
        _sev_link("CEK<-ASK", cek, Usage.CEK, ask),
        _sev_link("OCA (self-signed)", oca, Usage.OCA, oca),
        _sev_link("PEK<-OCA", pek, Usage.PEK, oca),
        _sev_link("PEK<-CEK", pek, Usage.PEK, cek),
        _sev_link("PDH<-PEK", pdh, Usage.PDH, pek),
    ]
    return ChainReport(tuple(links))


# ---------------------------------------------------------------------------------------------------
# ECDH (§3.2)
# ---------------------------------------------------------------------------------------------------
def ecdh_shared_secret(private_key: ECC.EccKey, peer: SevCert | EcPublicKey | ECC.EccKey) -> bytes:
    """Z = x-coordinate of d·Q on P-384, 48 bytes big-endian (§3.2), for the KDF's master secret."""
    if not private_key.has_private():
        raise TypeError("ECDH needs a private key")
    point = ec_public_key(peer)
    if not point.is_valid():
        raise CertError("PUBKEY", OFF_EC_QX, "peer point is not on P-384")
    z = key_agreement(static_priv=private_key, static_pub=point.to_ecc(), kdf=lambda secret: secret)
    if len(z) != P384_BYTES:
        raise ValueError(f"ECDH produced {len(z)} bytes, expected {P384_BYTES}")
    return z


# ---------------------------------------------------------------------------------------------------
# Load helpers (the only I/O here)
# ---------------------------------------------------------------------------------------------------
def _read_bounded(path: str | Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CertError(str(path), None, f"file is larger than {limit} bytes")
    return data


def load_sev_cert(path: str | Path) -> SevCert:
    return SevCert.from_bytes(_read_bounded(path, SEV_CERT_SIZE))


def load_amd_cert(path: str | Path, *, allow_unsigned: bool = False) -> AmdCert:
    return AmdCert.from_bytes(_read_bounded(path, AMD_CERT_MAX_SIZE), allow_unsigned=allow_unsigned)


def read_cert_file(path: str | Path) -> SevCert | AmdCert | tuple[AmdCert, AmdCert]:
    """Decode a file by its size: a SEV cert (2084), one AMD cert, or an ASK ‖ ARK chain."""
    data = _read_bounded(path, 2 * AMD_CERT_MAX_SIZE)
    if len(data) == SEV_CERT_SIZE:
        return SevCert.from_bytes(data)
    try:
        return AmdCert.from_bytes(data, allow_unsigned=True)
    except CertError as single:
        if len(data) > AMD_CERT_FIXED_SIZE and len(data) > AmdCert.signed_size_at(data, 0):
            return split_amd_chain(data)
        raise single
