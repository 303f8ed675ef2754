"""The AMD certificate (ARK, ASK): 832 or 1600 bytes, declared once, read and written here.

Layout: AMD ``amd_cert.h`` ``amd_cert_t``; byte offsets in ``docs/formats.md``. The signed bytes are
the 64-byte fixed header ‖ PUBEXP ‖ MODULUS; the signature is RSASSA-PSS, stored little-endian. AMD
published the Naples ARK without its signature; ``AmdCert.signature`` is then ``None``.
"""

from __future__ import annotations

import dataclasses
import struct

from Crypto.Hash import SHA384
from Crypto.PublicKey import RSA

from pysev.firmware.certs.keys import (
    Algo,
    CertError,
    CertPubkey,
    RsaPublicKey,
    Usage,
    check_zero,
    describe_code,
    hash_for_bits,
    int_from_le,
    int_to_le,
    pss_sign,
)

AMD_OFF_VERSION = 0x00  # u32, = 1
AMD_OFF_KEY_ID = 0x04  # 16 bytes
AMD_OFF_CERTIFYING_ID = 0x14  # 16 bytes
AMD_OFF_KEY_USAGE = 0x24  # u32
AMD_OFF_RESERVED = 0x28  # 16 bytes, zero
AMD_OFF_PUBEXP_SIZE = 0x38  # u32 bits
AMD_OFF_MODULUS_SIZE = 0x3C  # u32 bits
AMD_CERT_FIXED_SIZE = 0x40  # then PUBEXP ‖ MODULUS ‖ SIGNATURE
AMD_ID_SIZE = 16
_AMD_FIXED = struct.Struct("<I16s16sI16sII")
assert _AMD_FIXED.size == AMD_CERT_FIXED_SIZE
AMD_KEY_BITS = (2048, 4096)
AMD_CERT_SIZE_2K = AMD_CERT_FIXED_SIZE + 3 * 256  # 832
AMD_CERT_SIZE_4K = AMD_CERT_FIXED_SIZE + 3 * 512  # 1600
AMD_CERT_UNSIGNED_SIZE_2K = AMD_CERT_FIXED_SIZE + 2 * 256  # 576: AMD-published Naples ARK
NAPLES_BUNDLE_SIZE = AMD_CERT_SIZE_2K + AMD_CERT_UNSIGNED_SIZE_2K  # 1408: the bundle AMD published for Naples
AMD_CERT_MAX_SIZE = AMD_CERT_SIZE_4K


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
    pubexp_bits: int = 0  # 0 (not given): modulus_bits, as in every real cert
    version: int = 1

    def __post_init__(self) -> None:
        if not self.pubexp_bits:
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
            raise CertError(
                "AMD certificate",
                base,
                f"{len(data) - base} bytes is shorter than the {AMD_CERT_FIXED_SIZE}-byte header",
            )
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
        check_zero(data, AMD_OFF_RESERVED, AMD_OFF_PUBEXP_SIZE, "reserved")
        off = AMD_CERT_FIXED_SIZE
        pubexp = int_from_le(data[off : off + pe_n])
        modulus = int_from_le(data[off + pe_n : off + pe_n + mod_n])
        return cls(key_id, cert_id, Usage(usage), mod_bits, pubexp, modulus, signature, pe_bits, version)

    # -- writing ------------------------------------------------------------------------------------
    def signed_bytes(self) -> bytes:
        """Fixed header ‖ PUBEXP ‖ MODULUS: what is signed, and what the fused ARK hash covers."""
        fixed = _AMD_FIXED.pack(
            self.version,
            self.key_id,
            self.certifying_id,
            self.key_usage,
            bytes(16),
            self.pubexp_bits,
            self.modulus_bits,
        )
        return fixed + int_to_le(self.pubexp, self.pubexp_bits // 8) + int_to_le(self.modulus, self.modulus_bits // 8)

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + (self.signature or b"")

    @property
    def is_signed(self) -> bool:
        return self.signature is not None

    @property
    def hash(self):
        """The hash this key signs with: SHA-256 for 2048-bit, SHA-384 for 4096-bit."""
        return hash_for_bits(self.modulus_bits)

    def key_hash(self) -> bytes:
        """SHA-384(fixed ‖ PUBEXP ‖ MODULUS): the value firmware compares with the fused root-key hash."""
        return SHA384.new(self.signed_bytes()).digest()

    @property
    def public_key(self) -> RsaPublicKey:
        return RsaPublicKey(self.modulus_bits, self.pubexp, self.modulus)

    def export_pubkey(self) -> CertPubkey:
        """AMD ``amd_cert.c`` ``amd_cert_export_pubkey``: the ASK as the SEV signing key of the CEK.

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
        sig = pss_sign(private_key, hash_for_bits(private_key.size_in_bits()), self.signed_bytes())
        return dataclasses.replace(self, signature=sig)

    def describe(self) -> dict:
        return {
            "format": "amd",
            "size": len(self.to_bytes()),
            "version": self.version,
            "key_id": self.key_id.hex(),
            "certifying_id": self.certifying_id.hex(),
            "key_usage": describe_code(self.key_usage),
            "pubexp_bits": self.pubexp_bits,
            "modulus_bits": self.modulus_bits,
            "pubexp": self.pubexp,
            "modulus": f"{self.modulus:x}",
            "signed": self.is_signed,
            "self_signed_id": self.key_id == self.certifying_id,
            "signature": self.signature[::-1].hex() if self.signature else None,
            "key_hash_sha384": self.key_hash().hex(),
        }


def split_amd_chain(blob: bytes | bytearray | memoryview) -> tuple[AmdCert, AmdCert]:
    """Split the SEND_START ``amd_certs`` blob ASK ‖ ARK into ``(ask, ark)``.

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
