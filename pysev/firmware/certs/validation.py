"""The firmware's certificate rules, returning a ``SevStatus`` in the firmware's order.

AMD's firmware source: ``sev_cert.c`` ``sev_cert_validate`` and ``sev_cert_sanity_check``, ``amd_cert.c``
``amd_cert_validate`` and ``amd_cert_validate_ark``, ``sev_mcmd.c`` ``validate_platform`` and
``validate_domain`` (the chain checks of SEND_START). ``require_valid`` raises instead, naming the link.
"""

from __future__ import annotations

import dataclasses
import hmac
import struct

from pysev.firmware.certs.amd_cert import AMD_CERT_MAX_SIZE, AMD_KEY_BITS, AmdCert, split_amd_chain
from pysev.firmware.certs.keys import (
    Algo,
    CertError,
    CertPubkey,
    EcPublicKey,
    RsaPublicKey,
    Usage,
    ecdsa_verify,
    pss_verify,
)
from pysev.firmware.certs.sev_cert import (
    EC_SCALAR_SIZE,
    OFF_EC_CURVE,
    OFF_EC_QX,
    OFF_EC_QY,
    OFF_PUBKEY_ALGO,
    OFF_PUBKEY_USAGE,
    OFF_VERSION,
    PLAT_CERTS_SIZE,
    SEV_CERT_SIZE,
    SevCert,
    Signature,
    int_from_le,
    split_plat_certs,
)
from pysev.firmware.status import SevError, SevStatus

Signer = SevCert | AmdCert | CertPubkey


def _as_pubkey(signer: Signer) -> CertPubkey:
    if isinstance(signer, CertPubkey):
        return signer
    if isinstance(signer, AmdCert):
        return signer.export_pubkey()
    return signer.signing_key


def _slot_verifies(cert: SevCert, slot: Signature, key: CertPubkey) -> bool:
    body = cert.body()
    if key.algo.is_rsa:
        return isinstance(key.key, RsaPublicKey) and pss_verify(key.key, key.algo.hash, body, slot.sig)
    if key.algo.is_ecdsa:
        return isinstance(key.key, EcPublicKey) and ecdsa_verify(key.key, key.algo, body, slot.sig)
    return False  # an ECDH key never produced a signature


# PDH←PEK, PEK←OCA or CEK, OCA←OCA, CEK←ASK (AMD sev_cert.c sev_cert_validate)
_ALLOWED_SIGNERS = {
    Usage.PDH: frozenset({Usage.PEK}),
    Usage.PEK: frozenset({Usage.OCA, Usage.CEK}),
    Usage.OCA: frozenset({Usage.OCA}),
    Usage.CEK: frozenset({Usage.ASK}),
}


def _body_is_valid(cert: SevCert) -> bool:
    return cert.version == 1 and cert.signing_key.is_valid()


def sev_cert_validate(cert: SevCert, signer: Signer) -> SevStatus:
    """AMD ``sev_cert.c`` ``sev_cert_validate`` exactly.

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
    """AMD ``amd_cert.c`` ``amd_cert_validate``: signature by ``parent`` (or none if ``parent`` is None), then the
    fixed fields, then usage and CERTIFYING_ID == parent's KEY_ID (own KEY_ID when no parent)."""
    if parent is not None:
        if cert.signature is None or not pss_verify(
            parent.public_key, parent.hash, cert.signed_bytes(), cert.signature
        ):
            return SevStatus.BAD_SIGNATURE
    if cert.version != 1 or cert.modulus_bits not in AMD_KEY_BITS or cert.pubexp_bits not in AMD_KEY_BITS:
        return SevStatus.INVALID_CERTIFICATE
    key_id = parent.key_id if parent is not None else cert.key_id
    if cert.key_usage != expected_usage or not hmac.compare_digest(cert.certifying_id, key_id):
        return SevStatus.INVALID_CERTIFICATE
    return SevStatus.SUCCESS


def peer_pdh_key(pdh: SevCert | bytes) -> EcPublicKey | None:
    """The public key of a peer's PDH or a guest owner's GODH if it passes AMD's only check of such a
    certificate (``sev_cert.c`` ``sev_cert_sanity_check(cert, PDH, ECDH_SHA256)`` from ``sev_channel.c``
    ``sev_channel_open_server``/``_client``): VERSION 1, usage 0x1003, algo exactly 0x3, a P-384 point on
    the curve; else None. Nothing else is read: reserved bytes, padding and the signature slots may hold
    anything, as they may on AMD's firmware (no strict parse)."""
    raw = pdh.to_bytes() if isinstance(pdh, SevCert) else bytes(pdh)
    if len(raw) != SEV_CERT_SIZE:
        return None
    version, usage, algo = (
        struct.unpack_from("<I", raw, off)[0] for off in (OFF_VERSION, OFF_PUBKEY_USAGE, OFF_PUBKEY_ALGO)
    )
    if version != 1 or usage != Usage.PDH or algo != Algo.ECDH_SHA256:
        return None
    (curve,) = struct.unpack_from("<I", raw, OFF_EC_CURVE)
    key = EcPublicKey(
        int_from_le(raw[OFF_EC_QX : OFF_EC_QX + EC_SCALAR_SIZE]),
        int_from_le(raw[OFF_EC_QY : OFF_EC_QY + EC_SCALAR_SIZE]),
        curve,
    )
    return key if key.is_valid() else None


def pdh_sanity_check(pdh: SevCert | bytes) -> SevStatus:
    """The peer PDH / GODH check of SEND_START, RECEIVE_START and LAUNCH_START (see :func:`peer_pdh_key`):
    SUCCESS or INVALID_CERTIFICATE."""
    return SevStatus.SUCCESS if peer_pdh_key(pdh) is not None else SevStatus.INVALID_CERTIFICATE


@dataclasses.dataclass(frozen=True)
class TrustAnchor:
    """What a platform pins about its AMD root: the hard-coded ARK KEY_ID and the fused SHA-384 of
    ARK fixed ‖ PUBEXP ‖ MODULUS (AMD ``amd_cert.c`` ``amd_cert_validate_ark``)."""

    ark_key_id: bytes
    ark_hash: bytes

    @classmethod
    def from_ark(cls, ark: AmdCert) -> TrustAnchor:
        return cls(ark.key_id, ark.key_hash())


def ark_matches_anchor(ark: AmdCert, anchor: TrustAnchor) -> bool:
    """The ARK is the pinned root: its KEY_ID and its SHA-384 both match (compared in constant time)."""
    return hmac.compare_digest(ark.key_id, anchor.ark_key_id) and hmac.compare_digest(ark.key_hash(), anchor.ark_hash)


def validate_platform(
    pdh: bytes | SevCert, plat_certs: bytes, amd_certs: bytes, anchor: TrustAnchor, *, allow_unsigned_ark: bool = False
) -> SevStatus:
    """SEND_START with policy bit SEV (AMD ``sev_mcmd.c`` ``validate_platform``), in firmware order.

    Lengths (INVALID_LENGTH); ARK self-signed, usage ARK, CERTIFYING_ID == KEY_ID, KEY_ID and hash equal
    the anchor; ASK←ARK; CEK←ASK; PEK←CEK; PDH←PEK. The OCA is not looked at (that is the DOMAIN
    check). ``allow_unsigned_ark`` accepts the AMD-published Naples bundle, whose ARK has no signature
    but is still pinned by the fused hash (what Naples firmware did is not known).
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
        return SevStatus.INVALID_LENGTH  # Genoa's amd_cert_chain_length_is_valid rejects 1408
    try:
        pek, _oca, cek = split_plat_certs(plat_certs, check_key=False)
        pdh_cert = SevCert.from_bytes(pdh_bytes, check_key=False)
    except CertError:
        return SevStatus.INVALID_CERTIFICATE
    status = amd_cert_validate(ark, ark if ark.is_signed else None, Usage.ARK)
    if status != SevStatus.SUCCESS:
        return status
    if not ark_matches_anchor(ark, anchor):
        return SevStatus.INVALID_CERTIFICATE
    status = amd_cert_validate(ask, ark, Usage.ASK)
    if status == SevStatus.SUCCESS:
        status = sev_cert_validate(cek, ask)  # ASK exported as a SEV signing key
    if status == SevStatus.SUCCESS:
        status = sev_cert_validate(pek, cek)
    if status == SevStatus.SUCCESS:
        status = sev_cert_validate(pdh_cert, pek)
    return status


def validate_domain(pdh: bytes | SevCert, plat_certs: bytes, own_oca: bytes | SevCert) -> SevStatus:
    """SEND_START with policy bit DOMAIN (AMD ``sev_mcmd.c`` ``validate_domain``): OCA self-signed, PEK←OCA,
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
    supplied = plat_certs[SEV_CERT_SIZE : 2 * SEV_CERT_SIZE]
    return SevStatus.SUCCESS if hmac.compare_digest(bytes(supplied), own) else SevStatus.POLICY_FAILURE


def require_valid(cert: SevCert, signer: Signer, link: str) -> None:
    """:func:`sev_cert_validate`, raising ``SevError`` that names ``link`` (e.g. ``"PEK<-CEK"``)."""
    status = sev_cert_validate(cert, signer)
    if status != SevStatus.SUCCESS:
        raise SevError(status, f"{link}: {explain(cert, signer, status)}")


def explain(cert: SevCert, signer: Signer, status: SevStatus) -> str:
    """Why :func:`sev_cert_validate` returned ``status``, in words (for ``require_valid`` and the chain report)."""
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
