"""The SEV certificate (PDH, PEK, OCA, CEK, GODH): a fixed 2084 bytes, declared once, read and written here.

Layout: AMD ``sev_cert.h`` ``sev_cert_t`` (``sev_cert_body_t`` then two ``sev_cert_sig_t`` slots; the
PUBKEY union is in ``keys.py``); byte offsets in ``docs/formats.md``. The signed bytes are the body,
[0x000, 0x414). Readers treat their input as hostile and raise ``CertError`` naming the field and its
offset.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

from Crypto.Protocol.DH import key_agreement
from Crypto.PublicKey import ECC, RSA

from pysev.firmware.certs.keys import (
    CURVE_P384,
    EC_SCALAR_SIZE,
    ECDSA_SIG_USED,
    KEY_USAGES,
    OFF_EC_CURVE,
    OFF_EC_QX,
    OFF_EC_QY,
    OFF_EC_RESERVED,
    OFF_PUBKEY,
    OFF_RSA_MODULUS,
    OFF_RSA_MODULUS_BITS,
    OFF_RSA_PUBEXP,
    P384_BYTES,
    PUBKEY_SIZE,
    RSA_MAX_BYTES,
    SIG_SIZE,
    Algo,
    CertError,
    CertPubkey,
    EcPublicKey,
    PublicKey,
    RsaPublicKey,
    Usage,
    check_zero,
    describe_code,
    ecdsa_sign,
    int_from_le,
    int_to_le,
    pss_sign,
)
from pysev.firmware.status import SevError, SevStatus

if TYPE_CHECKING:
    from pysev.firmware.certs.amd_cert import AmdCert

SEV_CERT_SIZE = 0x824  # 2084
SEV_CERT_BODY_SIZE = OFF_PUBKEY + PUBKEY_SIZE  # 0x414: signed bytes = [0x000, 0x414)
OFF_VERSION = 0x000  # u32, = 1
OFF_API_MAJOR = 0x004  # u8
OFF_API_MINOR = 0x005  # u8
OFF_RESERVED = 0x006  # u16, 0
OFF_PUBKEY_USAGE = 0x008  # u32
OFF_PUBKEY_ALGO = 0x00C  # u32
_HEADER = struct.Struct("<IBBHII")  # version .. pubkey_algo, 16 bytes
assert _HEADER.size == OFF_PUBKEY

# Signature slots
OFF_SIG1 = 0x414
OFF_SIG2 = 0x61C
SIG_SLOT_SIZE = 0x208  # usage u32, algo u32, 512 signature bytes
_SLOT_HEADER = struct.Struct("<II")
assert OFF_SIG1 == SEV_CERT_BODY_SIZE and OFF_SIG1 + SIG_SLOT_SIZE == OFF_SIG2
assert OFF_SIG2 + SIG_SLOT_SIZE == SEV_CERT_SIZE and _SLOT_HEADER.size + SIG_SIZE == SIG_SLOT_SIZE

PLAT_CERTS_SIZE = 3 * SEV_CERT_SIZE  # PEK ‖ OCA ‖ CEK (AMD sev_mcmd.c pdh_cert_chain_t), 6252 bytes


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
        """Exactly one of usage/algo is INVALID (AMD ``sev_cert.c`` ``sev_cert_validate_sig``)."""
        return (self.usage == Usage.INVALID) != (self.algo == Algo.INVALID)

    def to_bytes(self) -> bytes:
        return _SLOT_HEADER.pack(self.usage, self.algo) + self.sig


EMPTY_SIGNATURE = Signature()


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
        validation can report a bad key after the signature check, as AMD ``sev_cert.c`` ``sev_cert_validate`` does.
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
            pubkey = EcPublicKey(
                int_from_le(data[OFF_EC_QX : OFF_EC_QX + EC_SCALAR_SIZE]),
                int_from_le(data[OFF_EC_QY : OFF_EC_QY + EC_SCALAR_SIZE]),
                curve,
            )
            check_zero(data, OFF_EC_RESERVED, SEV_CERT_BODY_SIZE, "PUBKEY reserved")
            if check_key and not pubkey.is_valid():
                raise CertError("PUBKEY", OFF_EC_QX, "point (QX, QY) is not on P-384")
        elif algo.is_rsa:
            (bits,) = struct.unpack_from("<I", data, OFF_RSA_MODULUS_BITS)
            if not (0 < bits <= 8 * RSA_MAX_BYTES and bits % 8 == 0):
                raise CertError("MODULUS_SIZE", OFF_RSA_MODULUS_BITS, f"bad RSA modulus size {bits} bits")
            n = bits // 8
            check_zero(data, OFF_RSA_PUBEXP + n, OFF_RSA_MODULUS, "PUB_EXP padding")
            check_zero(data, OFF_RSA_MODULUS + n, SEV_CERT_BODY_SIZE, "MODULUS padding")
            pubkey = RsaPublicKey(
                bits,
                int_from_le(data[OFF_RSA_PUBEXP : OFF_RSA_PUBEXP + n]),
                int_from_le(data[OFF_RSA_MODULUS : OFF_RSA_MODULUS + n]),
            )
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
        sig = Signature(usage, algo, data[sig_off : sig_off + SIG_SIZE])
        if sig.is_empty:
            check_zero(data, sig_off, sig_off + SIG_SIZE, f"{name} (empty slot)")
        elif algo.is_ecdsa:
            check_zero(data, sig_off + ECDSA_SIG_USED, sig_off + SIG_SIZE, f"{name} reserved")
        return sig

    # -- writing ------------------------------------------------------------------------------------
    def body(self) -> bytes:
        """The signed bytes [0x000, 0x414)."""
        out = bytearray(SEV_CERT_BODY_SIZE)
        _HEADER.pack_into(out, 0, self.version, self.api_major, self.api_minor, 0, self.pubkey_usage, self.pubkey_algo)
        if isinstance(self.pubkey, EcPublicKey):
            struct.pack_into("<I", out, OFF_EC_CURVE, self.pubkey.curve)
            out[OFF_EC_QX : OFF_EC_QX + EC_SCALAR_SIZE] = int_to_le(self.pubkey.x, EC_SCALAR_SIZE)
            out[OFF_EC_QY : OFF_EC_QY + EC_SCALAR_SIZE] = int_to_le(self.pubkey.y, EC_SCALAR_SIZE)
        else:
            n = self.pubkey.modulus_bits // 8
            struct.pack_into("<I", out, OFF_RSA_MODULUS_BITS, self.pubkey.modulus_bits)
            out[OFF_RSA_PUBEXP : OFF_RSA_PUBEXP + n] = int_to_le(self.pubkey.pubexp, n)
            out[OFF_RSA_MODULUS : OFF_RSA_MODULUS + n] = int_to_le(self.pubkey.modulus, n)
        return bytes(out)

    def to_bytes(self) -> bytes:
        return self.body() + self.sig1.to_bytes() + self.sig2.to_bytes()

    # -- building and signing -----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        public_key: ECC.EccKey | RSA.RsaKey | PublicKey,
        usage: Usage,
        algo: Algo,
        api_major: int = 0,
        api_minor: int = 0,
    ) -> SevCert:
        """An unsigned certificate for a public key (AMD ``sev_cert.c`` ``sev_cert_create`` without a signer)."""
        usage, algo = Usage(usage), Algo(algo)
        if usage not in KEY_USAGES:
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
        """Put ``sig`` into the first free slot (AMD ``sev_cert.c`` ``sev_cert_set_sig``); both full → error."""
        if self.sig1.usage == Usage.INVALID:
            return dataclasses.replace(self, sig1=sig)
        if self.sig2.usage == Usage.INVALID:
            return dataclasses.replace(self, sig2=sig)
        raise SevError(SevStatus.INVALID_CERTIFICATE, "both signature slots are already in use")

    def sign(self, private_key: ECC.EccKey | RSA.RsaKey, usage: Usage, algo: Algo) -> SevCert:
        """Sign the body with ``private_key`` acting as a key of ``usage``/``algo``; fill a free slot."""
        usage, algo = Usage(usage), Algo(algo)
        if usage not in KEY_USAGES:
            raise ValueError(f"a key of usage {usage.name} cannot sign")
        if algo.is_ecdsa:
            if not isinstance(private_key, ECC.EccKey) or not private_key.has_private():
                raise TypeError(f"{algo.name} needs an ECC private key")
            sig = ecdsa_sign(private_key, algo, self.body())
        elif algo.is_rsa:
            if not isinstance(private_key, RSA.RsaKey) or not private_key.has_private():
                raise TypeError(f"{algo.name} needs an RSA private key")
            sig = pss_sign(private_key, algo.hash, self.body()).ljust(SIG_SIZE, b"\0")
        else:
            raise ValueError(f"algo {algo.name} cannot sign")  # ECDH keys are not signing keys
        return self.with_signature(Signature(usage, algo, sig))

    def sign_as(self, signer: SevCert | AmdCert, private_key: ECC.EccKey | RSA.RsaKey) -> SevCert:
        """Sign with the private half of ``signer``'s key, using the signer's usage and algo."""
        pub = signer.signing_key if isinstance(signer, SevCert) else signer.export_pubkey()
        mine = (
            EcPublicKey.from_ecc(private_key)
            if isinstance(private_key, ECC.EccKey)
            else RsaPublicKey.from_rsa(private_key)
        )
        if mine != pub.key:
            raise ValueError(f"private key does not belong to the {pub.usage.name} certificate")
        return self.sign(private_key, pub.usage, pub.algo)

    def unsigned(self) -> SevCert:
        """The same body with both slots empty (what PEK_CSR returns)."""
        return dataclasses.replace(self, sig1=EMPTY_SIGNATURE, sig2=EMPTY_SIGNATURE)

    # -- convenience --------------------------------------------------------------------------------
    def ecc_key(self) -> ECC.EccKey:
        return ec_public_key(self).to_ecc()

    def describe(self) -> dict:
        """Every field, decoded, as plain JSON-able data."""

        def slot(s: Signature) -> dict:
            out = {
                "usage": describe_code(s.usage),
                "algo": describe_code(s.algo),
                "empty": s.is_empty,
                "malformed": s.is_malformed,
            }
            if s.algo.is_ecdsa:  # r, s as big-endian hex
                out["r"] = f"{int_from_le(s.sig[:EC_SCALAR_SIZE]):096x}"
                out["s"] = f"{int_from_le(s.sig[EC_SCALAR_SIZE:ECDSA_SIG_USED]):096x}"
            elif not s.is_empty:  # RSA: the standard big-endian octet string
                out["sig"] = s.sig.rstrip(b"\0")[::-1].hex()
            return out

        pk = self.pubkey
        key = (
            {
                "type": "ecc",
                "curve": pk.curve,
                "curve_name": "P-384" if pk.curve == CURVE_P384 else None,
                "qx": f"{pk.x:096x}",
                "qy": f"{pk.y:096x}",
                "on_curve": pk.is_valid(),
            }
            if isinstance(pk, EcPublicKey)
            else {"type": "rsa", "modulus_bits": pk.modulus_bits, "pubexp": pk.pubexp, "modulus": f"{pk.modulus:x}"}
        )
        return {
            "format": "sev",
            "size": SEV_CERT_SIZE,
            "version": self.version,
            "api": f"{self.api_major}.{self.api_minor}",
            "api_major": self.api_major,
            "api_minor": self.api_minor,
            "pubkey_usage": describe_code(self.pubkey_usage),
            "pubkey_algo": describe_code(self.pubkey_algo),
            "pubkey": key,
            "sig1": slot(self.sig1),
            "sig2": slot(self.sig2),
        }


def ec_public_key(key: ECC.EccKey | EcPublicKey | SevCert) -> EcPublicKey:
    """The little-endian-storable point of a pycryptodome key, an ``EcPublicKey`` or an ECC cert."""
    if isinstance(key, EcPublicKey):
        return key
    if isinstance(key, SevCert):
        if not isinstance(key.pubkey, EcPublicKey):
            raise ValueError(f"{key.pubkey_usage.name} certificate does not hold an ECC key")
        return key.pubkey
    return EcPublicKey.from_ecc(key)


def ecdh_shared_secret(private_key: ECC.EccKey, peer: SevCert | EcPublicKey | ECC.EccKey) -> bytes:
    """Z = x-coordinate of d·Q on P-384, 48 bytes big-endian, for the KDF's master secret (AMD ``ecdh.c``
    ``ecdh_key_agreement`` byte-reverses the engine's little-endian x into this order)."""
    if not private_key.has_private():
        raise TypeError("ECDH needs a private key")
    point = ec_public_key(peer)
    if not point.is_valid():
        raise CertError("PUBKEY", OFF_EC_QX, "peer point is not on P-384")
    z = key_agreement(static_priv=private_key, static_pub=point.to_ecc(), kdf=lambda secret: secret)
    if len(z) != P384_BYTES:
        raise ValueError(f"ECDH produced {len(z)} bytes, expected {P384_BYTES}")
    return z


def split_plat_certs(
    blob: bytes | bytearray | memoryview, *, check_key: bool = True
) -> tuple[SevCert, SevCert, SevCert]:
    """Split PDH_CERT_EXPORT / SEND_START ``plat_certs`` PEK ‖ OCA ‖ CEK into ``(pek, oca, cek)``."""
    blob = bytes(blob)
    if len(blob) != PLAT_CERTS_SIZE:
        raise CertError("platform certificate chain", None, f"length must be {PLAT_CERTS_SIZE}, got {len(blob)}")
    pek, oca, cek = (
        SevCert.from_bytes(blob[i * SEV_CERT_SIZE : (i + 1) * SEV_CERT_SIZE], check_key=check_key) for i in range(3)
    )
    return pek, oca, cek


def join_plat_certs(pek: SevCert, oca: SevCert, cek: SevCert) -> bytes:
    """PEK ‖ OCA ‖ CEK, as PDH_CERT_EXPORT writes it."""
    return pek.to_bytes() + oca.to_bytes() + cek.to_bytes()
