"""The guest owner (tenant): the client side of a LAUNCH session.

The owner checks the platform's certificate chain, makes a fresh GODH key, wraps its own TEK/TIK into the
session for LAUNCH_START, verifies LAUNCH_MEASURE and builds the LAUNCH_SECRET packet, as AMD's sev-tool
(``src/commands.cpp``: ``build_session_buffer``, ``calculate_measurement``, ``create_launch_secret_header``)
and virtee/sev (``src/session``) do. TEK, TIK and the GODH private key live only in underscore attributes.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from Crypto.PublicKey import ECC

import csev
from pysev.firmware import certs
from pysev.firmware.certs import Algo, SevCert, Usage
from pysev.firmware.sev import session
from pysev.firmware.sev.abi import MEASURE_SIZE, SCRATCH_BUF_LEN
from pysev.firmware.status import SevError, SevStatus


class GuestOwner:
    """One launch session with one platform.

    ``platform_pdh_cert`` is the platform's PDH certificate. With ``plat_certs`` (PEK ‖ OCA ‖ CEK) and
    ``amd_certs`` (ASK ‖ ARK) the whole chain is verified first (ARK…PDH), pinned to ``anchor`` when
    given; a broken chain raises ``SevError`` with the firmware status of the failing link.
    ``rng`` is the owner's random source (injectable for known-answer tests).
    """

    def __init__(
        self,
        platform_pdh_cert: bytes,
        policy: int,
        *,
        plat_certs: bytes | None = None,
        amd_certs: bytes | None = None,
        anchor: certs.TrustAnchor | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        pdh_bytes = bytes(platform_pdh_cert)
        status = certs.pdh_sanity_check(pdh_bytes)
        if status != SevStatus.SUCCESS:
            raise SevError(status, "platform PDH is not a P-384 ECDH_SHA256 PDH certificate")
        pdh = SevCert.from_bytes(pdh_bytes)
        if plat_certs is not None or amd_certs is not None or anchor is not None:
            self._verify_platform(pdh, plat_certs, amd_certs, anchor)
        self.policy = int(policy) & 0xFFFFFFFF
        self._rng = rng
        self._godh_key = ECC.generate(curve="P-384")
        self.godh_cert = SevCert.build(self._godh_key.public_key(), Usage.PDH, Algo.ECDH_SHA256).to_bytes()
        z = certs.ecdh_shared_secret(self._godh_key, pdh)
        nonce, wrap_iv, self._tek, self._tik = (rng(16) for _ in range(4))
        self.session = session.build_session(z, nonce, wrap_iv, self._tek, self._tik, self.policy)

    @staticmethod
    def _verify_platform(pdh: SevCert, plat_certs, amd_certs, anchor) -> None:
        if plat_certs is None or amd_certs is None:
            raise ValueError("verifying the platform needs both plat_certs and amd_certs")
        try:
            pek, oca, cek = certs.split_plat_certs(plat_certs)
            ask, ark = certs.split_amd_chain(amd_certs)
        except certs.CertError as err:
            raise SevError(SevStatus.INVALID_CERTIFICATE, str(err)) from None
        certs.verify_chain(ark, ask, cek, oca, pek, pdh, anchor=anchor).raise_for_status()

    def __repr__(self) -> str:
        return f"GuestOwner(policy={self.policy:#010x})"

    __str__ = __repr__

    # -- LAUNCH_START --------------------------------------------------------------------------------
    def launch_blobs(self) -> tuple[bytes, bytes]:
        """(GODH cert, session) for LAUNCH_START's DH_CERT and SESSION."""
        return self.godh_cert, self.session

    # -- LAUNCH_MEASURE ------------------------------------------------------------------------------
    def verify_measurement(self, measure48: bytes, digest: bytes, api_major: int, api_minor: int, build: int) -> bool:
        """Whether LAUNCH_MEASURE's MEASURE ‖ MNONCE matches ``digest`` (SHA-256 of the launched plaintext)."""
        if len(measure48) != MEASURE_SIZE or len(digest) != 32:
            return False
        measure48 = bytes(measure48)
        expected = session.launch_measure(
            self._tik, api_major, api_minor, build, self.policy, bytes(digest), measure48[session.MNONCE]
        )
        return hmac.compare_digest(expected, measure48[session.MEASURE])

    # -- LAUNCH_SECRET -------------------------------------------------------------------------------
    def secret_packet(self, secret: bytes, measure48: bytes) -> tuple[bytes, bytes]:
        """(packet header, ciphertext) for LAUNCH_SECRET: AES-128-CTR under TEK with a random IV, MAC
        ctx 0x01 over FLAGS ‖ IV ‖ lengths ‖ ciphertext ‖ MEASURE(32) under TIK (virtee/sevctl
        ``src/secret.rs``; AMD ``sev_mcmd.c`` ``sev_mcmd_launch_secret``)."""
        secret = bytes(secret)
        if not secret or len(secret) % 16 or len(secret) > SCRATCH_BUF_LEN:
            raise ValueError(
                f"secret length must be a non-zero multiple of 16 up to {SCRATCH_BUF_LEN:#x}, got {len(secret)}"
            )
        if len(measure48) < session.MEASURE.stop:
            raise ValueError(f"measure must hold the 32-byte MEASURE, got {len(measure48)} bytes")
        iv = self._rng(16)
        ciphertext = csev.aes128_ctr(self._tek, iv, secret)
        mac = session.packet_mac(
            self._tik,
            session.CTX_SECRET,
            0,
            iv,
            len(secret),
            len(secret),
            ciphertext,
            bytes(measure48[session.MEASURE]),
        )
        return session.pack_packet_header(0, iv, mac), ciphertext
