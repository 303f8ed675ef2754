"""The platform's identity keys and the certificate checks SEND_START runs.

``Identity`` holds the private OCA/PEK/PDH keys and the chip's CEK (derived from the fused chip secret,
as AMD's ``sev_plat.c`` ``sev_cek_derive``; PEK, OCA and PDH as ``sev_pek_generate``, ``sev_oca_generate``,
``sev_pdh_generate``). It is owned by a ``Platform`` and never hands a private key out: callers get
certificates (bytes) and ECDH results. The chain checks are AMD's ``sev_mcmd.c`` ``validate_platform``
and ``validate_domain``, implemented in ``pysev.firmware.certs``.
"""

from __future__ import annotations

import dataclasses

from Crypto.PublicKey import ECC

from pysev.firmware import amdroot, certs
from pysev.firmware.certs import Algo, SevCert, Usage
from pysev.firmware.certs.sev_cert import OFF_API_MAJOR, OFF_API_MINOR
from pysev.firmware.status import SevError, SevStatus

# ASK‖ARK lengths the firmware accepts: each of ASK and ARK 2048- or 4096-bit, in any mix: 1664, 2176,
# 2688, 3200 (AMD amd_cert.c amd_cert_chain_length_is_valid). The AMD-published 1408-byte Naples bundle
# (ARK without signature) is rejected, as AMD's published firmware source does; what Naples firmware did
# is not known.
_AMD_FIXED, _KEY_2K, _KEY_4K = 64, 256, 512  # amd_cert_fixed_t; 2048- and 4096-bit key bytes
# ASK = fixed ‖ pubexp ‖ modulus (both its key size) ‖ signature (the ARK's key size); ARK = fixed + 3 keys.
AMD_CHAIN_LENGTHS = frozenset(
    2 * _AMD_FIXED + 2 * ask + 4 * ark for ask in (_KEY_2K, _KEY_4K) for ark in (_KEY_2K, _KEY_4K)
)


def amd_chain_length_ok(length: int) -> bool:
    return length in AMD_CHAIN_LENGTHS


def pdh_sanity(pdh: bytes) -> SevStatus:
    return certs.pdh_sanity_check(pdh)


def validate_platform(anchor: certs.TrustAnchor, pdh: bytes, plat_certs: bytes, amd_certs: bytes) -> SevStatus:
    return certs.validate_platform(pdh, plat_certs, amd_certs, anchor)


def validate_domain(pdh: bytes, plat_certs: bytes, own_oca: bytes) -> SevStatus:
    return certs.validate_domain(pdh, plat_certs, own_oca)


def cert_api(cert: bytes) -> tuple[int, int]:
    """(API_MAJOR, API_MINOR) bytes of a SEV certificate body: the receiver's API that SEND_START
    compares with the policy (AMD ``sev_mcmd.c`` ``sev_mcmd_send_start``)."""
    return cert[OFF_API_MAJOR], cert[OFF_API_MINOR]


@dataclasses.dataclass(repr=False)
class _Keys:
    """OCA, PEK and PDH with their private keys; no OCA key once an owner imported its own OCA."""

    oca: SevCert
    oca_key: ECC.EccKey | None
    pek: SevCert
    pek_key: ECC.EccKey
    pdh: SevCert
    pdh_key: ECC.EccKey


class Identity:
    def __init__(self, root: amdroot.SimulatedRoot, chip_id: bytes, api: tuple[int, int] = (0, 24)) -> None:
        self._root = root
        self._chip_id = bytes(chip_id)
        self._api = api
        self._cek_key = amdroot.derive_cek(root.fuse_chip(self._chip_id))
        self._cek = SevCert.build(self._cek_key.public_key(), Usage.CEK, Algo.ECDSA_SHA256, *amdroot.CEK_API)
        self._keys: _Keys | None = None  # None until INIT (PEK_GEN) and after PLATFORM_RESET
        self.owned = False

    def __repr__(self) -> str:
        return f"Identity(owner={'external' if self.owned else 'self'}, provisioned={self._keys is not None})"

    # -- lifecycle -----------------------------------------------------------------------------------
    def ensure(self) -> None:
        """INIT: load the persistent identity, generating it on first use."""
        if self._keys is None:
            self.pek_gen()

    def wipe(self) -> None:
        """PLATFORM_RESET: forget OCA/PEK/PDH and the owner."""
        self._keys = None
        self.owned = False

    def pek_gen(self) -> None:
        """PEK_GEN: self-owned OCA (self-signed), PEK (sig1 = OCA, sig2 = CEK), then a new PDH."""
        oca_key = ECC.generate(curve="P-384")
        oca = SevCert.build(oca_key.public_key(), Usage.OCA, Algo.ECDSA_SHA256, *self._api)
        oca = oca.sign(oca_key, Usage.OCA, Algo.ECDSA_SHA256)
        pek_key = ECC.generate(curve="P-384")
        pek = SevCert.build(pek_key.public_key(), Usage.PEK, Algo.ECDSA_SHA256, *self._api)
        pek = pek.sign_as(oca, oca_key).sign_as(self._cek, self._cek_key)
        pdh, pdh_key = self._new_pdh(pek, pek_key)
        self._keys = _Keys(oca, oca_key, pek, pek_key, pdh, pdh_key)
        self.owned = False

    def pdh_gen(self) -> None:
        keys = self._provisioned()
        keys.pdh, keys.pdh_key = self._new_pdh(keys.pek, keys.pek_key)

    def _new_pdh(self, pek: SevCert, pek_key: ECC.EccKey) -> tuple[SevCert, ECC.EccKey]:
        pdh_key = ECC.generate(curve="P-384")
        pdh = SevCert.build(pdh_key.public_key(), Usage.PDH, Algo.ECDH_SHA256, *self._api)
        return pdh.sign_as(pek, pek_key), pdh_key

    def pek_csr(self) -> bytes:
        return self._provisioned().pek.unsigned().to_bytes()

    def pek_cert_import(self, pek_bytes: bytes, oca_bytes: bytes) -> SevStatus:
        """PEK_CERT_IMPORT (AMD ``sev_mcmd.c`` ``sev_mcmd_pek_cert_import``): OCA self-signed, PEK signed
        by it with our PEK body; then the CEK signature goes in the free slot, the owner bit is set and
        the PDH regenerated."""
        try:  # key checks are part of sev_cert_validate, after the signature
            oca = SevCert.from_bytes(oca_bytes, check_key=False)
            pek = SevCert.from_bytes(pek_bytes, check_key=False)
        except certs.CertError:
            return SevStatus.INVALID_CERTIFICATE
        # The OCA's signature is checked before its usage and algorithm (sev_cert_validate(oca, oca)).
        for status in (certs.sev_cert_validate(oca, oca), certs.sev_cert_validate(pek, oca)):
            if status != SevStatus.SUCCESS:
                return status
        keys = self._provisioned()
        if pek.body() != keys.pek.body():
            return SevStatus.INVALID_CERTIFICATE
        try:
            keys.pek = pek.sign_as(self._cek, self._cek_key)
        except SevError as err:  # both signature slots in use: INVALID_CERTIFICATE
            return SevStatus(err.status)
        keys.oca, keys.oca_key = oca, None  # the owner keeps the OCA private key
        self.owned = True
        self.pdh_gen()
        return SevStatus.SUCCESS

    # -- what leaves the platform -------------------------------------------------------------------
    def _provisioned(self) -> _Keys:
        if self._keys is None:
            raise RuntimeError("the platform has no PEK/PDH yet: issue INIT first (or PEK_GEN after PLATFORM_RESET)")
        return self._keys

    @property
    def pdh_cert(self) -> bytes:
        return self._provisioned().pdh.to_bytes()

    @property
    def oca_cert(self) -> bytes:
        return self._provisioned().oca.to_bytes()

    def plat_certs(self, signed_cek: bool = False) -> bytes:
        """PEK ‖ OCA ‖ CEK. The firmware exports its CEK unsigned (AMD ``sev_mcmd.c``
        ``sev_mcmd_pdh_cert_export``); hosts replace it with the ASK-signed one from the key server
        (``signed_cek=True``), as sevctl does (virtee/sevctl ``src/main.rs``)."""
        keys = self._provisioned()
        cek = self._root.kds.cek_cert(self._chip_id) if signed_cek else self._cek.to_bytes()
        return keys.pek.to_bytes() + keys.oca.to_bytes() + cek

    def pdh_usable(self) -> bool:
        return (
            self._keys is not None
            and self._keys.pdh.pubkey_usage == Usage.PDH
            and self._keys.pdh.pubkey_algo in (Algo.ECDH_SHA256, Algo.ECDH_SHA384)
        )

    def ecdh(self, peer_cert: bytes) -> bytes:
        """Z with our long-term PDH private key and the peer's PDH/GODH public key (AMD ``ecdh.c``
        ``ecdh_key_agreement``)."""
        key = certs.peer_pdh_key(peer_cert)
        if key is None:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "peer PDH fails the sanity check")
        return certs.ecdh_shared_secret(self._provisioned().pdh_key, key)
