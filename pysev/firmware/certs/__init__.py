"""SEV and AMD certificates: formats, signing, and the firmware's validation rules.

Two wire formats, each declared once and shared by reader and writer (byte offsets in
``docs/formats.md``):

* the SEV certificate (PDH, PEK, OCA, CEK, GODH), a fixed 2084 bytes: ``sev_cert.py``, and
* the AMD certificate (ARK, ASK), 832 or 1600 bytes: ``amd_cert.py``;

the codes, keys and signature primitives both use are in ``keys.py``. Readers treat their input as
hostile and raise :class:`CertError` naming the field and its offset. ``validation.py`` holds the
firmware's rules (AMD's ``sev_cert.c``, ``amd_cert.c``, ``sev_mcmd.c``), which return a
:class:`~pysev.firmware.status.SevStatus` as the firmware does; ``chain.py`` is the host-side verifier
that checks every link and names the first one that fails; ``trust.py`` holds the roots it trusts (AMD's
published ARKs, shipped in ``roots/`` with their provenance, the machine's simulated root, roots the user names)
and says which one anchored a chain; ``files.py`` reads certificate files.

Everything is pure data: no globals, no I/O except the explicit ``load_*``/``read_cert_file`` helpers and the
``TrustStore`` constructors, which read the shipped roots and the named ARK files.
This package serves every command set and imports none of them.
"""

from pysev.firmware.certs.amd_cert import (
    AMD_CERT_FIXED_SIZE,
    AMD_CERT_SIZE_2K,
    AMD_CERT_SIZE_4K,
    AMD_CERT_UNSIGNED_SIZE_2K,
    NAPLES_BUNDLE_SIZE,
    AmdCert,
    split_amd_chain,
)
from pysev.firmware.certs.chain import TRUST_LINK, ChainReport, LinkResult, verify_chain
from pysev.firmware.certs.files import load_amd_cert, load_sev_cert, read_cert_file
from pysev.firmware.certs.keys import Algo, CertError, CertPubkey, EcPublicKey, RsaPublicKey, Usage
from pysev.firmware.certs.sev_cert import (
    PLAT_CERTS_SIZE,
    SEV_CERT_BODY_SIZE,
    SEV_CERT_SIZE,
    SevCert,
    Signature,
    ec_public_key,
    ecdh_shared_secret,
    join_plat_certs,
    split_plat_certs,
)
from pysev.firmware.certs.trust import RootKind, TrustedRoot, TrustStore, read_root_file
from pysev.firmware.certs.validation import (
    TrustAnchor,
    amd_cert_validate,
    pdh_sanity_check,
    peer_pdh_key,
    require_valid,
    sev_cert_validate,
    validate_domain,
    validate_platform,
)

__all__ = [
    "AMD_CERT_FIXED_SIZE",
    "AMD_CERT_SIZE_2K",
    "AMD_CERT_SIZE_4K",
    "AMD_CERT_UNSIGNED_SIZE_2K",
    "NAPLES_BUNDLE_SIZE",
    "PLAT_CERTS_SIZE",
    "SEV_CERT_BODY_SIZE",
    "SEV_CERT_SIZE",
    "TRUST_LINK",
    "Algo",
    "AmdCert",
    "CertError",
    "CertPubkey",
    "ChainReport",
    "EcPublicKey",
    "LinkResult",
    "RootKind",
    "RsaPublicKey",
    "SevCert",
    "Signature",
    "TrustAnchor",
    "TrustStore",
    "TrustedRoot",
    "Usage",
    "amd_cert_validate",
    "ecdh_shared_secret",
    "ec_public_key",
    "join_plat_certs",
    "load_amd_cert",
    "load_sev_cert",
    "pdh_sanity_check",
    "peer_pdh_key",
    "read_cert_file",
    "read_root_file",
    "require_valid",
    "sev_cert_validate",
    "split_amd_chain",
    "split_plat_certs",
    "validate_domain",
    "validate_platform",
    "verify_chain",
]
