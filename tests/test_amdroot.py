"""pysev.firmware.amdroot: the simulated AMD root, its key server, CEK derivation, and the shared default root."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import subprocess
from pathlib import Path

import pytest
from Crypto.PublicKey import ECC

from pysev.cli import python_command
from pysev.firmware import amdroot, certs
from pysev.firmware.amdroot import SimulatedRoot, default_root, derive_cek
from pysev.firmware.certs import Algo, SevCert, Usage
from pysev.firmware.certs.keys import P384_N
from pysev.firmware.status import SevStatus

OK = SevStatus.SUCCESS
CHIP = bytes.fromhex(
    "5E1FDB617787B6D516F5CC5A5BB48FAE868DD57C71EC81F3FD59AD7C84A761C7"
    "453289287481DEA46C010E25304DA3FDFCE63DF87C5AE735537975EEE069CB14"
)


@pytest.fixture(scope="session")
def rome() -> SimulatedRoot:
    return SimulatedRoot.create()


@pytest.fixture(scope="session")
def naples() -> SimulatedRoot:
    return SimulatedRoot.create(generation="naples")


@pytest.fixture(scope="session")
def untrusted() -> SimulatedRoot:
    """A second, independent root: nothing it signs may verify under ``rome``."""
    return SimulatedRoot.create()


def platform_chain(root: SimulatedRoot, chip_id: bytes = CHIP):
    """What a simulated platform holds after PEK_GEN, with its CEK fetched from the KDS."""
    cek_key = derive_cek(root.fuse_chip(chip_id))  # platform side: from the fused key
    cek = SevCert.from_bytes(root.kds.cek_cert(chip_id))  # KDS side
    oca_key, pek_key, pdh_key = (ECC.generate(curve="P-384") for _ in range(3))
    oca = SevCert.build(oca_key.public_key(), Usage.OCA, Algo.ECDSA_SHA256, 1, 55)
    oca = oca.sign_as(oca, oca_key)
    pek = SevCert.build(pek_key.public_key(), Usage.PEK, Algo.ECDSA_SHA256, 1, 55)
    pek = pek.sign_as(oca, oca_key).sign_as(cek, cek_key)
    pdh = SevCert.build(pdh_key.public_key(), Usage.PDH, Algo.ECDH_SHA256, 1, 55).sign_as(pek, pek_key)
    return cek, oca, pek, pdh


# -------------------------------------------------------------------------------------------------
# Root certificates
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gen, size, algo", [("rome", 1600, Algo.RSA_SHA384), ("naples", 832, Algo.RSA_SHA256)])
def test_root_certificates(request, gen, size, algo):
    root: SimulatedRoot = request.getfixturevalue(gen)
    assert root.generation == gen
    assert len(root.ark.to_bytes()) == len(root.ask.to_bytes()) == size
    assert certs.amd_cert_validate(root.ark, root.ark, Usage.ARK) == OK
    assert certs.amd_cert_validate(root.ask, root.ark, Usage.ASK) == OK
    assert root.ark.key_id == root.ark.certifying_id == root.ask.certifying_id != root.ask.key_id
    assert root.ask.export_pubkey().algo == algo
    assert root.trust_anchor == certs.TrustAnchor(root.ark.key_id, hashlib.sha384(root.ark.signed_bytes()).digest())
    ask, ark = certs.split_amd_chain(root.amd_chain())
    assert (ask, ark) == (root.ask, root.ark)
    assert len(root.naples_bundle()) == len(root.amd_chain()) - root.ark.modulus_bits // 8


def test_private_material_is_not_exposed(rome):
    text = repr(rome) + str(rome) + repr(rome.kds)
    assert rome.ark.key_id.hex() in text and rome.ask.key_id.hex() in text
    assert f"{rome._ark_key.d:x}"[:32] not in text and rome._fuse_secret.hex() not in text
    public = {k: v for k, v in vars(rome).items() if not k.startswith("_")}
    assert set(public) == {"ark", "ask", "kds"}
    assert not any(k for k in vars(rome.kds) if not k.startswith("_"))


# -------------------------------------------------------------------------------------------------
# KDS and CEK derivation (AMD sev_plat.c sev_cek_derive)
# -------------------------------------------------------------------------------------------------
def test_derive_cek_follows_the_firmware_recipe():
    fused = bytes(range(32))
    seed = hashlib.sha256(fused).digest()
    # SP 800-108 counter mode, LE32 counter and bit length, label ‖ 0x00, no context (AMD nist_kdf.c)
    label = b"sev-chip-endorsement-key"
    blocks = b"".join(
        hmac.digest(seed, i.to_bytes(4, "little") + label + b"\0" + (56 * 8).to_bytes(4, "little"), "sha256")
        for i in (1, 2)
    )
    d = int.from_bytes(blocks[:56], "big") % (P384_N - 1) + 1
    assert int(derive_cek(fused).d) == d
    assert derive_cek(fused).public_key() == derive_cek(fused).public_key()
    with pytest.raises(ValueError):
        derive_cek(b"")


@pytest.mark.parametrize("gen", ["rome", "naples"])
def test_kds_cek_verifies_and_matches_platform_derivation(request, gen):
    root: SimulatedRoot = request.getfixturevalue(gen)
    data = root.kds.cek_cert(CHIP)
    assert len(data) == certs.SEV_CERT_SIZE and root.kds.cek_cert(CHIP) == data  # one cert per chip
    cek = SevCert.from_bytes(data)
    assert (cek.version, cek.api_major, cek.api_minor) == (1, 0, 14)
    assert (cek.pubkey_usage, cek.pubkey_algo) == (Usage.CEK, Algo.ECDSA_SHA256)
    expected_algo = Algo.RSA_SHA384 if gen == "rome" else Algo.RSA_SHA256
    assert (cek.sig1.usage, cek.sig1.algo) == (Usage.ASK, expected_algo) and cek.sig2.is_empty
    assert certs.sev_cert_validate(cek, root.ask) == OK
    platform_cek = derive_cek(root.fuse_chip(CHIP))
    assert cek.pubkey == certs.EcPublicKey.from_ecc(platform_cek)
    other = SevCert.from_bytes(root.kds.cek_cert(CHIP[::-1]))
    assert other.pubkey != cek.pubkey


def test_kds_cek_fails_under_another_root(rome, untrusted, naples):
    cek = SevCert.from_bytes(untrusted.kds.cek_cert(CHIP))
    assert certs.sev_cert_validate(cek, rome.ask) == SevStatus.BAD_SIGNATURE
    assert certs.sev_cert_validate(cek, naples.ask) == SevStatus.INVALID_CERTIFICATE  # no RSA_SHA256 slot
    assert untrusted.fuse_chip(CHIP) != rome.fuse_chip(CHIP)


def test_chip_id_is_bounded(rome):
    for bad in (b"", bytes(129)):
        with pytest.raises(ValueError):
            rome.kds.cek_cert(bad)
    with pytest.raises(TypeError):
        rome.fuse_chip("abc")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# A whole simulated platform chain under the root
# -------------------------------------------------------------------------------------------------
def test_platform_chain_verifies_under_its_root(rome, untrusted):
    cek, oca, pek, pdh = platform_chain(rome)
    report = certs.verify_chain(rome.ark, rome.ask, cek, oca, pek, pdh, anchor=rome.trust_anchor)
    assert report.ok, report.message
    plat = certs.join_plat_certs(pek, oca, cek)
    assert certs.validate_platform(pdh.to_bytes(), plat, rome.amd_chain(), rome.trust_anchor) == OK
    assert certs.validate_domain(pdh, plat, oca) == OK
    # wrong root: the target presents another root's chain
    assert (
        certs.validate_platform(pdh.to_bytes(), plat, untrusted.amd_chain(), rome.trust_anchor)
        == SevStatus.INVALID_CERTIFICATE
    )
    # wrong root: the anchor is right but the ASK is another root's → ASK←ARK fails
    mixed = untrusted.ask.to_bytes() + rome.ark.to_bytes()
    assert certs.validate_platform(pdh.to_bytes(), plat, mixed, rome.trust_anchor) == SevStatus.BAD_SIGNATURE
    report = certs.verify_chain(rome.ark, untrusted.ask, cek, oca, pek, pdh)
    assert report.first_failure.link == "ASK<-ARK"
    report = certs.verify_chain(untrusted.ark, untrusted.ask, cek, oca, pek, pdh, anchor=rome.trust_anchor)
    assert report.first_failure.link == "ARK (trust anchor)" and "pinned root" in report.message
    # the CEK of a chip of the untrusted root
    foreign_cek, oca2, pek2, pdh2 = platform_chain(untrusted)
    plat2 = certs.join_plat_certs(pek2, oca2, foreign_cek)
    assert (
        certs.validate_platform(pdh2.to_bytes(), plat2, rome.amd_chain(), rome.trust_anchor) == SevStatus.BAD_SIGNATURE
    )
    report = certs.verify_chain(rome.ark, rome.ask, foreign_cek, oca2, pek2, pdh2)
    assert report.first_failure.link == "CEK<-ASK"


def test_naples_bundle_of_a_simulated_root(naples):
    cek, oca, pek, pdh = platform_chain(naples)
    plat = certs.join_plat_certs(pek, oca, cek)
    bundle = naples.naples_bundle()
    assert len(bundle) == certs.NAPLES_BUNDLE_SIZE
    assert certs.validate_platform(pdh.to_bytes(), plat, bundle, naples.trust_anchor) == SevStatus.INVALID_LENGTH
    assert certs.validate_platform(pdh.to_bytes(), plat, bundle, naples.trust_anchor, allow_unsigned_ark=True) == OK


# -------------------------------------------------------------------------------------------------
# Persistence and the machine-wide default root
# -------------------------------------------------------------------------------------------------
def test_save_load_round_trip(rome, naples, tmp_path):
    rome.save(tmp_path / "r")
    loaded = SimulatedRoot.load(tmp_path / "r")
    assert (loaded.ark, loaded.ask, loaded.trust_anchor) == (rome.ark, rome.ask, rome.trust_anchor)
    assert loaded.fuse_chip(CHIP) == rome.fuse_chip(CHIP)
    assert SevCert.from_bytes(loaded.kds.cek_cert(CHIP)).pubkey == SevCert.from_bytes(rome.kds.cek_cert(CHIP)).pubkey
    for name in ("ark_key.pem", "ask_key.pem", "fuse_secret.pem"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o600
    assert (tmp_path / "r" / "ark.cert").read_bytes() == rome.ark.to_bytes()
    # keys that do not match the certificates are refused
    naples.save(tmp_path / "n")
    (tmp_path / "r" / "ask_key.pem").write_bytes((tmp_path / "n" / "ask_key.pem").read_bytes())
    with pytest.raises(ValueError, match="ASK private key"):
        SimulatedRoot.load(tmp_path / "r")
    (tmp_path / "n" / "fuse_secret.pem").unlink()
    with pytest.raises(FileNotFoundError, match="fuse_secret.pem"):
        SimulatedRoot.load(tmp_path / "n")


def test_create_rejects_unknown_generation():
    with pytest.raises(ValueError, match="unknown generation"):
        SimulatedRoot.create(generation="milan")


_CHILD = (
    "import sys; from pysev.firmware.amdroot import default_root; r = default_root(); "
    "sys.stdout.write(r.ark.key_id.hex() + ' ' + r.ask.key_id.hex())"
)


def _spawn(home: Path) -> subprocess.Popen:
    env = dict(os.environ, PYSEV_HOME=str(home))
    return subprocess.Popen(python_command(_CHILD), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_default_root_is_shared_between_processes(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PYSEV_HOME", str(home))
    children = [_spawn(home), _spawn(home)]  # started together: one creates, one waits
    ids = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        ids.append(out)
    assert ids[0] == ids[1]
    root_dir = home / "roots" / "default"
    before = {p.name: p.stat().st_mtime_ns for p in root_dir.iterdir()}
    mine = default_root()
    assert f"{mine.ark.key_id.hex()} {mine.ask.key_id.hex()}" == ids[0]
    assert default_root() is mine  # cached per PYSEV_HOME
    later = _spawn(home)
    out, err = later.communicate(timeout=120)
    assert later.returncode == 0, err
    assert out == ids[0]
    assert {p.name: p.stat().st_mtime_ns for p in root_dir.iterdir()} == before  # not regenerated
    assert not [p for p in (home / "roots").iterdir() if p.name.startswith(".default.") and p.is_dir()]
    assert stat.S_IMODE((root_dir / "ask_key.pem").stat().st_mode) == 0o600


def test_pysev_home_default(monkeypatch, tmp_path):
    monkeypatch.delenv("PYSEV_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert amdroot.pysev_home() == tmp_path / ".cache" / "pysev"
