"""The host-side verifier: every link of a full chain ARK … PDH checked and reported, the first failure named.

Each link uses the firmware's rule (``validation.py``) and explains a failure in words; the ``pysev
certs verify`` command prints the report. A self-consistent chain proves nothing until its root is trusted: with
``trust=`` (a :class:`~pysev.firmware.certs.trust.TrustStore`) the last link says which trusted root the ARK is,
as a platform compares its ARK with the fused root-key hash (AMD ``amd_cert.c`` ``amd_cert_validate_ark``).
"""

from __future__ import annotations

import dataclasses

from Crypto.Hash import SHA256

from pysev.firmware.certs.amd_cert import AmdCert
from pysev.firmware.certs.keys import Usage
from pysev.firmware.certs.sev_cert import SevCert
from pysev.firmware.certs.trust import TrustedRoot, TrustStore
from pysev.firmware.certs.validation import (
    Signer,
    TrustAnchor,
    amd_cert_validate,
    ark_matches_anchor,
    explain,
    sev_cert_validate,
)
from pysev.firmware.status import SevError, SevStatus


@dataclasses.dataclass(frozen=True)
class LinkResult:
    link: str
    status: SevStatus
    message: str

    @property
    def ok(self) -> bool:
        return self.status == SevStatus.SUCCESS


TRUST_LINK = "Trusted root"


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """Result of :func:`verify_chain`: every link's result, in order ARK … PDH, then the trust decision if asked.

    ``ark_key_id`` is the chain's ARK KEY_ID; ``anchor`` the trusted root the ARK matched (None when none did or
    no trust store was given).
    """

    links: tuple[LinkResult, ...]
    ark_key_id: bytes
    anchor: TrustedRoot | None = None

    @property
    def ok(self) -> bool:
        return all(link.ok for link in self.links)

    @property
    def self_consistent(self) -> bool:
        """Every signature and field check passed, whether or not the root is trusted."""
        return all(link.ok for link in self.links if link.link != TRUST_LINK)

    @property
    def trusted(self) -> bool | None:
        """Whether the ARK is a trusted root (the chain may still be broken below it); None without a trust store."""
        if not any(link.link == TRUST_LINK for link in self.links):
            return None
        return self.anchor is not None

    @property
    def first_failure(self) -> LinkResult | None:
        return next((link for link in self.links if not link.ok), None)

    @property
    def message(self) -> str:
        bad = self.first_failure
        if bad is None:
            valid = "certificate chain valid: " + ", ".join(link.link for link in self.links if link.link != TRUST_LINK)
            return valid if self.anchor is None else f"{valid}; anchored by {self.anchor}"
        if bad.link == TRUST_LINK:  # the last link: everything before it passed
            return f"the chain is self-consistent but its root is not trusted (ARK KEY_ID {self.ark_key_id.hex()})"
        return f"certificate chain invalid at {bad.link}: {bad.message}"

    def raise_for_status(self) -> None:
        bad = self.first_failure
        if bad is not None:
            raise SevError(bad.status, self.message)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "message": self.message,
            "first_failure": self.first_failure.link if self.first_failure else None,
            "self_consistent": self.self_consistent,
            "trusted": self.trusted,
            "ark_key_id": self.ark_key_id.hex(),
            "anchor": self.anchor.to_dict() if self.anchor is not None else None,
            "links": [{"link": r.link, "ok": r.ok, "status": r.status.name, "message": r.message} for r in self.links],
        }


def _amd_link(name: str, cert: AmdCert, parent: AmdCert, usage: Usage) -> LinkResult:
    """One ARK/ASK link, with the firmware's status (signature first, then fields) and a reason."""
    algo = f"RSA-PSS/{'SHA-256' if parent.hash is SHA256 else 'SHA-384'}"
    if not cert.is_signed:
        return LinkResult(name, SevStatus.BAD_SIGNATURE, "certificate has no signature (AMD-published Naples ARK form)")
    status = amd_cert_validate(cert, parent, usage)
    if status == SevStatus.SUCCESS:
        return LinkResult(name, status, f"signed by {parent.key_id.hex()} ({algo})")
    if status == SevStatus.BAD_SIGNATURE:
        why = (
            f"{parent.modulus_bits}-bit key cannot have made a {cert.modulus_bits}-bit signature"
            if cert.modulus_bits != parent.modulus_bits
            else "does not verify"
        )
        return LinkResult(name, status, f"{algo} signature by key {parent.key_id.hex()} {why}")
    if cert.key_usage != usage:
        return LinkResult(
            name, status, f"KEY_USAGE is {cert.key_usage.name} ({int(cert.key_usage):#x}), expected {usage.name}"
        )
    if cert.certifying_id != parent.key_id:
        return LinkResult(
            name, status, f"CERTIFYING_ID {cert.certifying_id.hex()} != signer KEY_ID {parent.key_id.hex()}"
        )
    return LinkResult(name, status, "fixed fields invalid (version or key sizes)")


def _sev_link(name: str, cert: SevCert, expected: Usage, signer: Signer) -> LinkResult:
    if cert.pubkey_usage != expected:
        return LinkResult(
            name,
            SevStatus.INVALID_CERTIFICATE,
            f"certificate usage is {cert.pubkey_usage.name}, expected {expected.name}",
        )
    status = sev_cert_validate(cert, signer)
    return LinkResult(name, status, explain(cert, signer, status))


def verify_chain(
    ark: AmdCert,
    ask: AmdCert,
    cek: SevCert,
    oca: SevCert,
    pek: SevCert,
    pdh: SevCert,
    *,
    anchor: TrustAnchor | None = None,
    trust: TrustStore | None = None,
) -> ChainReport:
    """Check every link of a full chain and report each.

    Links: ARK self-signed (usage ARK, CERTIFYING_ID == KEY_ID), optionally pinned by ``anchor``;
    ASK←ARK; CEK←ASK; OCA self-signed; PEK←OCA; PEK←CEK; PDH←PEK. SEV links use the firmware rule
    :func:`sev_cert_validate` (which also checks the points are on P-384) plus the subject's usage.
    With ``trust``, a last link says which trusted root the ARK is (by KEY_ID and key hash, never by file);
    the ASK and everything below must still chain to it, so a real ARK with a forged ASK fails at ASK<-ARK.
    """
    links = [_amd_link("ARK (self-signed)", ark, ark, Usage.ARK)]
    if anchor is not None:
        pinned = ark_matches_anchor(ark, anchor)
        links.append(
            LinkResult(
                "ARK (trust anchor)",
                SevStatus.SUCCESS if pinned else SevStatus.INVALID_CERTIFICATE,
                "KEY_ID and SHA-384 match the pinned root"
                if pinned
                else "ARK is not the pinned root (KEY_ID or SHA-384 differs)",
            )
        )
    links += [
        _amd_link("ASK<-ARK", ask, ark, Usage.ASK),
        _sev_link("CEK<-ASK", cek, Usage.CEK, ask),
        _sev_link("OCA (self-signed)", oca, Usage.OCA, oca),
        _sev_link("PEK<-OCA", pek, Usage.PEK, oca),
        _sev_link("PEK<-CEK", pek, Usage.PEK, cek),
        _sev_link("PDH<-PEK", pdh, Usage.PDH, pek),
    ]
    matched = None
    if trust is not None:
        matched = trust.match(ark)
        links.append(
            LinkResult(TRUST_LINK, SevStatus.SUCCESS, str(matched))
            if matched is not None
            else LinkResult(
                TRUST_LINK,
                SevStatus.INVALID_CERTIFICATE,
                f"ARK KEY_ID {ark.key_id.hex()} is none of the {len(trust)} trusted roots",
            )
        )
    return ChainReport(tuple(links), ark.key_id, matched)
