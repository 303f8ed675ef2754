"""A simulated AMD root of trust and key server for simulated platforms.

Real platforms trust AMD's ARK (pinned by a fused SHA-384 hash), which signs the ASK, which signs each
chip's CEK; the ASK-signed CEK is served by AMD's key distribution server (KDS) keyed by GET_ID, because
PDH_CERT_EXPORT hands out an unsigned CEK (AMD ``sev_mcmd.c`` ``sev_mcmd_pdh_cert_export``; sevctl fetches
the signed one from the KDS, virtee/sevctl ``src/main.rs``). :class:`SimulatedRoot` plays AMD: it owns an ARK/ASK
in the real certificate format, "fuses" a chip-unique key into each simulated chip, and its
:class:`KeyServer` signs CEKs. Platform and KDS derive the CEK independently from the fused key with
the firmware's derivation (:func:`derive_cek`), so they agree without sharing anything else.

:func:`default_root` is the machine-wide root under ``$PYSEV_HOME/roots/default`` (default
``~/.cache/pysev``), created once under a file lock, so that independently started processes trust the
same root and can migrate between each other.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import logging
import os
import tempfile
import uuid
from pathlib import Path

from Crypto.IO import PEM
from Crypto.PublicKey import ECC, RSA

from pysev.firmware.certs import Algo, AmdCert, CertError, SevCert, TrustAnchor, Usage, amd_cert_validate
from pysev.firmware.certs.keys import P384_N
from pysev.firmware.kdf import kdf
from pysev.firmware.status import SevStatus

__all__ = ["GENERATIONS", "KeyServer", "SimulatedRoot", "default_root", "default_root_dir", "derive_cek", "pysev_home"]

log = logging.getLogger(__name__)

# generation → RSA size of ARK/ASK. Naples: 2048-bit, SHA-256; Rome and later: 4096-bit, SHA-384
# (AMD's published ark/ask certificates, tests/data/sev-certs).
GENERATIONS = {"naples": 2048, "rome": 4096}
CEK_API = (0, 14)  # KDS-served CEKs carry API 0.14 (the real Naples and Rome CEKs in tests/data)
CHIP_ID_MAX = 128  # GET_ID output is 64 bytes per socket; bound what we accept
CEK_LABEL = b"sev-chip-endorsement-key"
_FUSE_LABEL = b"pysev-chip-unique-key\x00"
_SECRET_MARKER = "PYSEV ROOT FUSE SECRET"
_FILES = ("ark.cert", "ask.cert", "ark_key.pem", "ask_key.pem", "fuse_secret.pem")


def derive_cek(chip_unique_key: bytes) -> ECC.EccKey:
    """The chip's CEK private key, as AMD's ``sev_plat.c`` ``sev_cek_derive``.

    seed = SHA-256(chip-unique key); 56 bytes = KDF(seed, "sev-chip-endorsement-key", no context);
    d = int(56 bytes, big-endian) mod (n − 1) + 1 (FIPS 186-4 B.4.1 "extra bits").
    """
    if not chip_unique_key:
        raise ValueError("chip-unique key is empty")
    seed = hashlib.sha256(chip_unique_key).digest()
    extra = kdf(seed, CEK_LABEL, b"", 56)
    d = int.from_bytes(extra, "big") % (P384_N - 1) + 1
    return ECC.construct(curve="P-384", d=d)


def _check_chip_id(chip_id: bytes) -> bytes:
    if not isinstance(chip_id, (bytes, bytearray, memoryview)):
        raise TypeError(f"chip id must be bytes, got {type(chip_id).__name__}")
    chip_id = bytes(chip_id)
    if not 0 < len(chip_id) <= CHIP_ID_MAX:
        raise ValueError(f"chip id must be 1..{CHIP_ID_MAX} bytes, got {len(chip_id)}")
    return chip_id


class KeyServer:
    """The simulated AMD KDS: ``cek_cert(chip_id)`` is what ``kdsintf.amd.com/cek/id/<id>`` serves."""

    def __init__(self, root: SimulatedRoot) -> None:
        self._root = root
        self._served: dict[bytes, bytes] = {}

    def cek_cert(self, chip_id: bytes) -> bytes:
        """The 2084-byte CEK certificate of ``chip_id``, slot 1 signed by the ASK (usage 0x13,
        RSA_SHA256 for a Naples root, RSA_SHA384 otherwise), API 0.14, slot 2 empty."""
        chip_id = _check_chip_id(chip_id)
        cert = self._served.get(chip_id)
        if cert is None:  # the KDS serves one fixed cert per chip, as the real one does
            cek = derive_cek(self._root.fuse_chip(chip_id))
            body = SevCert.build(cek.public_key(), Usage.CEK, Algo.ECDSA_SHA256, *CEK_API)
            cert = self._root._sign_cek(body).to_bytes()
            self._served[chip_id] = cert
        return cert

    def __repr__(self) -> str:
        return f"KeyServer(ask_key_id={self._root.ask.key_id.hex()})"


class SimulatedRoot:
    """An AMD-style root of trust: ARK (self-signed) → ASK → per-chip CEKs, plus the fuse secret.

    Private keys live only in underscore attributes; ``repr`` shows key ids only.
    """

    def __init__(
        self, ark: AmdCert, ask: AmdCert, ark_key: RSA.RsaKey, ask_key: RSA.RsaKey, fuse_secret: bytes
    ) -> None:
        if amd_cert_validate(ark, ark, Usage.ARK) != SevStatus.SUCCESS:
            raise ValueError("ARK is not a valid self-signed root certificate")
        if amd_cert_validate(ask, ark, Usage.ASK) != SevStatus.SUCCESS:
            raise ValueError("ASK is not signed by this ARK")
        for name, cert, key in (("ARK", ark, ark_key), ("ASK", ask, ask_key)):
            if not key.has_private() or (int(key.n), int(key.e)) != (cert.modulus, cert.pubexp):
                raise ValueError(f"{name} private key does not match the {name} certificate")
        if len(fuse_secret) < 32:
            raise ValueError("fuse secret must be at least 32 bytes")
        self.ark = ark
        self.ask = ask
        self._ark_key = ark_key
        self._ask_key = ask_key
        self._fuse_secret = bytes(fuse_secret)
        self.kds = KeyServer(self)

    # -- identity -----------------------------------------------------------------------------------
    @property
    def generation(self) -> str:
        return "naples" if self.ark.modulus_bits == 2048 else "rome"

    @property
    def trust_anchor(self) -> TrustAnchor:
        """What a platform of this root pins: ARK KEY_ID and SHA-384(fixed ‖ PUBEXP ‖ MODULUS)."""
        return TrustAnchor.from_ark(self.ark)

    def amd_chain(self) -> bytes:
        """ASK ‖ ARK, the SEND_START ``amd_certs`` blob (AMD ``sev_mcmd.c`` ``validate_platform`` reads the ASK
        first)."""
        return self.ask.to_bytes() + self.ark.to_bytes()

    def naples_bundle(self) -> bytes:
        """ASK ‖ ARK-without-signature, the 1408-byte form AMD published for Naples (``ask_ark_naples.cert``)."""
        return self.ask.to_bytes() + self.ark.signed_bytes()

    def fuse_chip(self, chip_id: bytes) -> bytes:
        """The chip-unique key "fused" into chip ``chip_id`` at manufacture (32 bytes)."""
        return hmac.digest(self._fuse_secret, _FUSE_LABEL + _check_chip_id(chip_id), "sha256")

    def _sign_cek(self, cek: SevCert) -> SevCert:
        return cek.sign_as(self.ask, self._ask_key)

    def __repr__(self) -> str:
        return (
            f"SimulatedRoot(generation={self.generation!r}, ark_key_id={self.ark.key_id.hex()}, "
            f"ask_key_id={self.ask.key_id.hex()})"
        )

    __str__ = __repr__

    # -- creation -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, generation: str = "rome") -> SimulatedRoot:
        """A fresh root in memory (RSA-4096 keygen: about a second each)."""
        try:
            bits = GENERATIONS[generation]
        except KeyError:
            raise ValueError(f"unknown generation {generation!r}; choose from {sorted(GENERATIONS)}") from None
        ark_key, ask_key = RSA.generate(bits, e=65537), RSA.generate(bits, e=65537)
        ark_id, ask_id = uuid.uuid4().bytes, uuid.uuid4().bytes
        ark = AmdCert.build(ark_id, ark_id, Usage.ARK, ark_key.public_key()).sign(ark_key)
        ask = AmdCert.build(ask_id, ark_id, Usage.ASK, ask_key.public_key()).sign(ark_key)
        return cls(ark, ask, ark_key, ask_key, os.urandom(32))

    # -- persistence --------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ark.cert, ask.cert and the private material (PEM, mode 0600) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        contents = {
            "ark.cert": self.ark.to_bytes(),
            "ask.cert": self.ask.to_bytes(),
            "ark_key.pem": self._ark_key.export_key("PEM", pkcs=8),
            "ask_key.pem": self._ask_key.export_key("PEM", pkcs=8),
            "fuse_secret.pem": PEM.encode(self._fuse_secret, _SECRET_MARKER).encode() + b"\n",
        }
        for name, data in contents.items():
            mode = 0o644 if name.endswith(".cert") else 0o600
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(directory / name, mode)

    @classmethod
    def load(cls, directory: str | Path) -> SimulatedRoot:
        directory = Path(directory)
        missing = [name for name in _FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"root directory {directory} lacks {', '.join(missing)}")
        try:
            ark = AmdCert.from_bytes((directory / "ark.cert").read_bytes())
            ask = AmdCert.from_bytes((directory / "ask.cert").read_bytes())
        except CertError as exc:
            raise ValueError(f"root directory {directory}: {exc}") from exc
        ark_key = RSA.import_key((directory / "ark_key.pem").read_bytes())
        ask_key = RSA.import_key((directory / "ask_key.pem").read_bytes())
        secret, marker, _ = PEM.decode((directory / "fuse_secret.pem").read_text())
        if marker != _SECRET_MARKER:
            raise ValueError(f"{directory / 'fuse_secret.pem'}: unexpected PEM label {marker!r}")
        return cls(ark, ask, ark_key, ask_key, secret)


def pysev_home() -> Path:
    """``$PYSEV_HOME``, default ``~/.cache/pysev``."""
    return Path(os.environ.get("PYSEV_HOME") or Path.home() / ".cache" / "pysev")


def default_root_dir() -> Path:
    """Where :func:`default_root` keeps the machine-wide root, ``$PYSEV_HOME/roots/default``; the host-side verifier
    trusts the ARK found there (``TrustStore.with_simulated``)."""
    return pysev_home().resolve() / "roots" / "default"


def default_root() -> SimulatedRoot:
    """The machine-wide root under ``$PYSEV_HOME/roots/default``, created on first use."""
    return _default_root_at(str(pysev_home().resolve()))


@functools.cache
def _default_root_at(home: str) -> SimulatedRoot:
    roots = Path(home) / "roots"
    target = roots / "default"
    # The directory appears only by an atomic rename of a complete one, so its existence means it is whole.
    if target.is_dir():
        return SimulatedRoot.load(target)
    roots.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(roots / ".default.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # two processes started together: one creates
        try:
            if target.is_dir():
                return SimulatedRoot.load(target)
            log.info("creating the default simulated AMD root in %s", target)
            root = SimulatedRoot.create()
            tmp = Path(tempfile.mkdtemp(prefix=".default.", dir=roots))
            root.save(tmp)
            os.rename(tmp, target)
            return root
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
