"""Which AMD roots the host-side verifier trusts: AMD's published ARKs, this machine's simulated root, named roots.

A platform pins its root by the ARK's KEY_ID and the fused SHA-384 of ARK fixed ‖ PUBEXP ‖ MODULUS (AMD
``amd_cert.c`` ``amd_cert_validate_ark``); ``sevctl verify`` checks a chain against the ARK/ASK of its generation
built into virtee/sev (``src/certs/sev/builtin/<generation>/``, picked by ``Generation::try_from(&sev::Chain)``)
or against the CA chain named by ``--ca``. A :class:`TrustStore` does the same for
:func:`~pysev.firmware.certs.chain.verify_chain`: every root in it is pinned by a :class:`TrustAnchor` (the key,
never a file name), and the report names the root that anchored a chain, or says that none did.

AMD's roots ship as package data in ``roots/``, with their provenance in ``roots/README.md``;
``roots/manifest.json`` records each file's SHA-256 and each key's KEY_ID, and :meth:`TrustStore.builtin`
refuses a file that differs from it. Stores are immutable: :meth:`TrustStore.with_simulated` and
:meth:`TrustStore.with_file` return a new store.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.resources
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pysev.firmware.certs.amd_cert import AMD_OFF_CERTIFYING_ID, AMD_OFF_KEY_USAGE, AmdCert
from pysev.firmware.certs.files import load_amd_cert, read_cert_file
from pysev.firmware.certs.keys import CertError, Usage
from pysev.firmware.certs.validation import TrustAnchor, amd_cert_validate, ark_matches_anchor
from pysev.firmware.status import SevStatus

if TYPE_CHECKING:
    from importlib.abc import Traversable

ROOTS_PACKAGE = "pysev.firmware.certs"
ROOTS_DIR = "roots"
MANIFEST = "manifest.json"


class RootKind(enum.Enum):
    """Where a trusted root comes from."""

    AMD = "amd"  # shipped with pysev: AMD's published ARK of one generation
    SIMULATED = "simulated"  # this machine's simulated AMD root ($PYSEV_HOME/roots/default)
    FILE = "file"  # a file the user named


@dataclasses.dataclass(frozen=True)
class TrustedRoot:
    """One trusted ARK and where it came from; ``str()`` is how a report names it."""

    kind: RootKind
    name: str  # "AMD Milan ARK", "simulated root /…/roots/default", "user root /…/ark.cert"
    ark: AmdCert
    generation: str | None = None  # AMD roots: "naples" … "turin"
    path: Path | None = None  # simulated and user roots: where the ARK was read
    anchor: TrustAnchor = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor", TrustAnchor.from_ark(self.ark))

    def __str__(self) -> str:
        return f"{self.name} (KEY_ID {self.ark.key_id.hex()})"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind.value,
            "name": self.name,
            "key_id": self.ark.key_id.hex(),
            "key_sha384": self.anchor.ark_hash.hex(),
            "generation": self.generation,
            "path": None if self.path is None else str(self.path),
        }


def _check_ark(ark: AmdCert) -> None:
    """A root must be an ARK that names itself; a signed one must verify under its own key (AMD ``amd_cert.c``
    ``amd_cert_validate`` with the ARK as its own parent). The unsigned Naples form is pinned by its key alone."""
    if ark.key_usage != Usage.ARK:
        usage = f"{int(ark.key_usage):#x} ({ark.key_usage.name})"
        raise CertError("KEY_USAGE", AMD_OFF_KEY_USAGE, f"{usage}: a trusted root must be an ARK (0x0)")
    if ark.certifying_id != ark.key_id:
        raise CertError("CERTIFYING_ID", AMD_OFF_CERTIFYING_ID, "an ARK certifies itself: must equal its KEY_ID")
    status = amd_cert_validate(ark, ark if ark.is_signed else None, Usage.ARK)
    if status == SevStatus.BAD_SIGNATURE:
        raise CertError("SIGNATURE", len(ark.signed_bytes()), f"ARK {ark.key_id.hex()} self-signature does not verify")
    if status != SevStatus.SUCCESS:
        raise CertError("AMD certificate", None, f"ARK {ark.key_id.hex()} is not a valid root ({status.name})")


def _pinned_file(base: Traversable | Path, entry: dict, usage: Usage) -> AmdCert:
    """One manifest file, refused unless its SHA-256, KEY_ID and (ARK) key hash are the recorded ones."""
    name = str(entry["file"])
    data = base.joinpath(name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CertError(f"{ROOTS_DIR}/{name}", None, f"SHA-256 {digest} is not the recorded {entry['sha256']}")
    cert = AmdCert.from_bytes(data)
    if cert.key_usage != usage or cert.key_id.hex() != entry["key_id"]:
        raise CertError(f"{ROOTS_DIR}/{name}", None, f"is not the recorded {usage.name} {entry['key_id']}")
    if usage == Usage.ARK and cert.key_hash().hex() != entry["key_sha384"]:
        raise CertError(f"{ROOTS_DIR}/{name}", None, "key SHA-384 is not the recorded one")
    return cert


@functools.cache
def _amd_roots() -> tuple[TrustedRoot, ...]:
    """AMD's roots from the package data, checked once per process."""
    return _load_amd_roots(importlib.resources.files(ROOTS_PACKAGE).joinpath(ROOTS_DIR))


def _load_amd_roots(base: Traversable | Path) -> tuple[TrustedRoot, ...]:
    """The roots ``manifest.json`` in ``base`` lists, each file checked against it and against its signatures."""
    roots = []
    for entry in json.loads(base.joinpath(MANIFEST).read_bytes())["roots"]:
        ark = _pinned_file(base, entry["ark"], Usage.ARK)
        ask = _pinned_file(base, entry["ask"], Usage.ASK)
        try:
            _check_ark(ark)
        except CertError as exc:
            raise CertError(f"{ROOTS_DIR}/{entry['ark']['file']}", None, str(exc)) from exc
        if amd_cert_validate(ask, ark, Usage.ASK) != SevStatus.SUCCESS:
            raise CertError(f"{ROOTS_DIR}/{entry['ask']['file']}", None, "ASK is not signed by its ARK")
        roots.append(TrustedRoot(RootKind.AMD, f"AMD {entry['name']} ARK", ark, generation=str(entry["generation"])))
    return tuple(roots)


def read_root_file(path: str | Path) -> AmdCert:
    """The ARK in ``path``: one ARK (signed, or the unsigned Naples form) or an ASK ‖ ARK chain as AMD publishes
    it (``ask_ark_<generation>.cert``). Raises :class:`CertError` for anything else, ``OSError`` if unreadable."""
    path = Path(path)
    decoded = read_cert_file(path)  # bounded read: at most 2 × AMD_CERT_MAX_SIZE bytes
    if isinstance(decoded, tuple):
        _ask, ark = decoded
    elif isinstance(decoded, AmdCert):
        ark = decoded
    else:
        usage = decoded.pubkey_usage.name
        raise CertError("certificate", None, f"a SEV {usage} certificate (2084 bytes), not an AMD ARK")
    _check_ark(ark)
    return ark


class TrustStore:
    """The roots a chain may be anchored by, matched by ARK KEY_ID and key hash (:class:`TrustAnchor`).

    ``TrustStore.builtin().with_simulated().with_file(path)`` is what ``pysev certs verify`` trusts.
    """

    def __init__(self, roots: Iterable[TrustedRoot] = ()) -> None:
        self._roots = tuple(roots)

    @classmethod
    def builtin(cls) -> TrustStore:
        """AMD's published ARKs for Naples, Rome, Milan, Genoa and Turin (package data, checked on first use)."""
        return cls(_amd_roots())

    def with_root(self, root: TrustedRoot) -> TrustStore:
        return TrustStore((*self._roots, root))

    def with_simulated(self, directory: str | Path | None = None) -> TrustStore:
        """Also trust the simulated root in ``directory`` (default: this machine's, ``$PYSEV_HOME/roots/default``).

        Reads only its ``ark.cert``. A root that does not exist yet adds nothing: none is created here, and no chain
        can be under it.
        """
        if directory is None:
            # amdroot builds on this package, so it is imported when first needed, not at import time.
            from pysev.firmware.amdroot import default_root_dir

            directory = default_root_dir()
        directory = Path(directory)
        path = directory / "ark.cert"
        if not path.is_file():
            return self
        try:
            ark = load_amd_cert(path)
            _check_ark(ark)
        except CertError as exc:
            raise CertError(str(path), None, str(exc)) from exc
        return self.with_root(TrustedRoot(RootKind.SIMULATED, f"simulated root {directory}", ark, path=path))

    def with_file(self, path: str | Path) -> TrustStore:
        """Also trust the ARK in ``path`` (see :func:`read_root_file`)."""
        path = Path(path)
        ark = read_root_file(path)
        return self.with_root(TrustedRoot(RootKind.FILE, f"user root {path}", ark, path=path))

    def match(self, ark: AmdCert) -> TrustedRoot | None:
        """The first trusted root whose KEY_ID and key hash equal the ARK's, or None."""
        return next((root for root in self._roots if ark_matches_anchor(ark, root.anchor)), None)

    @property
    def roots(self) -> tuple[TrustedRoot, ...]:
        return self._roots

    def __iter__(self) -> Iterator[TrustedRoot]:
        return iter(self._roots)

    def __len__(self) -> int:
        return len(self._roots)

    def __repr__(self) -> str:
        return f"TrustStore({', '.join(str(root) for root in self._roots)})"
