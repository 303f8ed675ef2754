"""Root pinning for the host-side verifier: the AMD roots shipped with pysev (checked against their recorded
fingerprints), this machine's simulated root, user-named roots, and ``pysev certs verify`` run as a program."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from Crypto.PublicKey import ECC, RSA

from pysev.cli import child_command
from pysev.firmware import certs
from pysev.firmware.amdroot import SimulatedRoot, derive_cek
from pysev.firmware.certs import Algo, AmdCert, CertError, RootKind, SevCert, TrustStore, Usage, trust
from pysev.firmware.status import SevError, SevStatus

DATA = Path(__file__).resolve().parent / "data" / "sev-certs"
GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")
# ARK KEY_ID, ASK KEY_ID (tests/data/sev-certs/README.md; the Genoa ARK's is ASPFW amd_cert.c's root id)
KEY_IDS = {
    "naples": ("1bb987c359494606b174945601c9ea5b", "e139970cfc464377ae61b289e2f9e96e"),
    "rome": ("e6002122fb58419399d15fee7b131351", "c6cbcf145b3146f498e40ecb4ad4fded"),
    "milan": ("94c38e4177d0479292a7ae671d083fb6", "73478c05cc174bfeb06e718fa75dc3c8"),
    "genoa": ("9f9d4a8fe761456599f6946c4c010f3a", "acbb4ad21acc436fb3e932f812cd01b0"),
    "turin": ("d05c3a8bde484904b49552422ceb3942", "15051693f7304d65a527b4a7f3f7cb77"),
}
CHAIN = ("ark", "ask", "cek", "oca", "pek", "pdh")
UNTRUSTED = "the chain is self-consistent but its root is not trusted (ARK KEY_ID {})"
HINT = "; name it with --trust-root FILE to trust it"


def shipped() -> Path:
    """The installed package's roots directory."""
    return Path(str(importlib.resources.files("pysev.firmware.certs").joinpath("roots")))


def manifest() -> dict:
    return json.loads((shipped() / "manifest.json").read_text())


def manifest_files() -> dict[str, dict]:
    return {entry[kind]["file"]: entry[kind] for entry in manifest()["roots"] for kind in ("ark", "ask")}


def sha256_block(readme: Path) -> dict[str, str]:
    """The ``<sha256>  ./<path>`` lines of a README."""
    listed = {}
    for line in readme.read_text().splitlines():
        digest, _, path = line.partition("  ./")
        if len(digest) == 64 and path:
            listed[path] = digest
    return listed


def real_chain(gen: str) -> dict:
    out: dict = {n: AmdCert.from_bytes((DATA / gen / f"{n}.cert").read_bytes()) for n in ("ark", "ask")}
    out.update({n: SevCert.from_bytes((DATA / gen / f"{n}.cert").read_bytes()) for n in ("cek", "oca", "pek", "pdh")})
    return out


def platform_under(cek: SevCert, cek_key: ECC.EccKey) -> dict:
    """OCA, PEK (signed by the OCA and the CEK) and PDH: what a platform holds after PEK_GEN."""
    oca_key, pek_key, pdh_key = (ECC.generate(curve="P-384") for _ in range(3))
    oca = SevCert.build(oca_key.public_key(), Usage.OCA, Algo.ECDSA_SHA256, 1, 55)
    oca = oca.sign_as(oca, oca_key)
    pek = SevCert.build(pek_key.public_key(), Usage.PEK, Algo.ECDSA_SHA256, 1, 55)
    pek = pek.sign_as(oca, oca_key).sign_as(cek, cek_key)
    pdh = SevCert.build(pdh_key.public_key(), Usage.PDH, Algo.ECDH_SHA256, 1, 55).sign_as(pek, pek_key)
    return {"oca": oca, "pek": pek, "pdh": pdh}


def simulated_chain(root: SimulatedRoot) -> dict:
    """A whole chain under ``root``, its CEK served by the root's key server as for a real chip."""
    chip = b"trust-test-chip"
    cek = SevCert.from_bytes(root.kds.cek_cert(chip))
    return {"ark": root.ark, "ask": root.ask, "cek": cek, **platform_under(cek, derive_cek(root.fuse_chip(chip)))}


def forged_chain() -> dict:
    """AMD's real Naples ARK over an ASK the attacker made: CERTIFYING_ID names AMD's ARK, but the attacker's own
    key signed it. Below the ASK everything is self-consistent (the attacker holds the ASK key)."""
    ark = AmdCert.from_bytes((DATA / "naples" / "ark.cert").read_bytes())
    attacker, ask_key = RSA.generate(2048), RSA.generate(2048)
    ask = AmdCert.build(uuid.uuid4().bytes, ark.key_id, Usage.ASK, ask_key.public_key()).sign(attacker)
    cek_key = ECC.generate(curve="P-384")
    cek = SevCert.build(cek_key.public_key(), Usage.CEK, Algo.ECDSA_SHA256, 0, 14).sign_as(ask, ask_key)
    return {"ark": ark, "ask": ask, "cek": cek, **platform_under(cek, cek_key)}


def write_chain(directory: Path, chain: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in CHAIN:
        (directory / f"{name}.cert").write_bytes(chain[name].to_bytes())
    return directory


def verify(chain: dict, store: TrustStore | None) -> certs.ChainReport:
    return certs.verify_chain(*(chain[n] for n in CHAIN), trust=store)


@pytest.fixture(scope="module")
def sim() -> SimulatedRoot:
    """A root made with SimulatedRoot.create(): trusted by nobody until named."""
    return SimulatedRoot.create()


@pytest.fixture(scope="module")
def sim_chain(sim) -> dict:
    return simulated_chain(sim)


# -------------------------------------------------------------------------------------------------
# The shipped AMD roots and their recorded fingerprints
# -------------------------------------------------------------------------------------------------
def test_manifest_lists_every_shipped_file():
    present = sorted(
        str(p.relative_to(shipped())) for p in shipped().rglob("*") if p.is_file() and p.parent != shipped()
    )
    assert sorted(manifest_files()) == present
    assert sorted(p.name for p in shipped().iterdir() if p.is_file()) == ["README.md", "manifest.json"]
    assert tuple(entry["generation"] for entry in manifest()["roots"]) == GENERATIONS


@pytest.mark.parametrize("name", sorted(manifest_files()))
def test_every_shipped_file_has_its_recorded_fingerprint(name):
    data = (shipped() / name).read_bytes()
    recorded = manifest_files()[name]
    assert hashlib.sha256(data).hexdigest() == recorded["sha256"]
    assert len(data) == recorded["size"]
    # the README's table says the same, and so does the independently collected test data's README
    assert sha256_block(shipped() / "README.md")[name] == recorded["sha256"]
    assert sha256_block(DATA / "README.md")[name] == recorded["sha256"]
    assert data == (DATA / name).read_bytes()


@pytest.mark.parametrize("gen", GENERATIONS)
def test_recorded_key_ids_and_key_hash(gen):
    entry = next(e for e in manifest()["roots"] if e["generation"] == gen)
    ark = AmdCert.from_bytes((shipped() / entry["ark"]["file"]).read_bytes())
    ask = AmdCert.from_bytes((shipped() / entry["ask"]["file"]).read_bytes())
    assert (entry["ark"]["key_id"], entry["ask"]["key_id"]) == KEY_IDS[gen] == (ark.key_id.hex(), ask.key_id.hex())
    assert entry["ark"]["key_sha384"] == ark.key_hash().hex()
    assert ask.certifying_id == ark.key_id == ark.certifying_id
    row = next(line for line in (shipped() / "README.md").read_text().splitlines() if line.startswith(f"| {gen} |"))
    assert KEY_IDS[gen][0] in row and KEY_IDS[gen][1] in row and ark.key_hash().hex() in row


def test_builtin_store_holds_the_five_amd_roots():
    store = TrustStore.builtin()
    assert [root.name for root in store] == [f"AMD {gen.capitalize()} ARK" for gen in GENERATIONS]
    assert all(root.kind is RootKind.AMD and root.path is None for root in store)
    for gen in GENERATIONS:
        ark = AmdCert.from_bytes((DATA / gen / "ark.cert").read_bytes())
        matched = store.match(ark)
        assert matched is not None and matched.generation == gen
        assert str(matched) == f"AMD {gen.capitalize()} ARK (KEY_ID {KEY_IDS[gen][0]})"
        assert store.match(AmdCert.from_bytes((DATA / gen / "ask.cert").read_bytes())) is None
    assert TrustStore.builtin().roots == store.roots  # loaded and checked once


def test_builtin_refuses_altered_package_data(tmp_path):
    copy = tmp_path / "roots"
    shutil.copytree(shipped(), copy)
    assert [r.generation for r in trust._load_amd_roots(copy)] == list(GENERATIONS)
    ask = copy / "milan" / "ask.cert"
    data = bytearray(ask.read_bytes())
    data[0x100] ^= 1
    ask.write_bytes(bytes(data))
    with pytest.raises(CertError, match=r"roots/milan/ask\.cert.*SHA-256"):
        trust._load_amd_roots(copy)
    # another generation's ARK under Milan's name, its SHA-256 re-recorded: the KEY_ID gives it away
    shutil.copy(shipped() / "milan" / "ask.cert", ask)
    shutil.copy(shipped() / "rome" / "ark.cert", copy / "milan" / "ark.cert")
    text = (copy / "manifest.json").read_text()
    milan_sha = manifest_files()["milan/ark.cert"]["sha256"]
    (copy / "manifest.json").write_text(text.replace(milan_sha, manifest_files()["rome/ark.cert"]["sha256"]))
    with pytest.raises(CertError, match=r"roots/milan/ark\.cert.*not the recorded ARK 94c38e41"):
        trust._load_amd_roots(copy)


# -------------------------------------------------------------------------------------------------
# verify_chain(..., trust=)
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_real_chains_are_anchored_by_their_generation(gen):
    report = verify(real_chain(gen), TrustStore.builtin())
    assert report.ok and report.trusted is True and report.self_consistent, report.message
    assert report.anchor is not None and report.anchor.kind is RootKind.AMD and report.anchor.generation == gen
    assert report.links[-1].link == certs.TRUST_LINK == "Trusted root"
    assert report.message.endswith(f"; anchored by AMD {gen.capitalize()} ARK (KEY_ID {KEY_IDS[gen][0]})")
    info = report.to_dict()
    assert info["anchor"]["generation"] == gen and info["ark_key_id"] == KEY_IDS[gen][0] and info["trusted"]


def test_without_a_trust_store_nothing_is_decided():
    report = verify(real_chain("rome"), None)
    assert report.ok and report.trusted is None and report.anchor is None and len(report.links) == 7
    assert "anchored" not in report.message


def test_simulated_root_is_not_trusted_unless_named(sim, sim_chain, tmp_path):
    key_id = sim.ark.key_id.hex()
    report = verify(sim_chain, TrustStore.builtin())
    assert not report.ok and report.self_consistent and report.trusted is False and report.anchor is None
    assert report.first_failure is not None and report.first_failure.link == certs.TRUST_LINK
    assert report.first_failure.status == SevStatus.INVALID_CERTIFICATE
    assert report.message == UNTRUSTED.format(key_id)
    with pytest.raises(SevError) as err:
        report.raise_for_status()
    assert err.value.status == SevStatus.INVALID_CERTIFICATE
    # named by a file of any name: the key decides, not the name
    named = tmp_path / "whatever.bin"
    named.write_bytes(sim.ark.to_bytes())
    report = verify(sim_chain, TrustStore.builtin().with_file(named))
    assert report.ok and report.anchor is not None and report.anchor.kind is RootKind.FILE
    assert report.message.endswith(f"anchored by user root {named} (KEY_ID {key_id})")
    # AMD's published form, ASK ‖ ARK in one file, names its ARK
    bundle = tmp_path / "ask_ark_sim.cert"
    bundle.write_bytes(sim.amd_chain())
    assert verify(sim_chain, TrustStore.builtin().with_file(bundle)).ok
    # a file called ark.cert holding another root does not make this one trusted
    other = tmp_path / "ark.cert"
    shutil.copy(DATA / "milan" / "ark.cert", other)
    assert verify(sim_chain, TrustStore.builtin().with_file(other)).trusted is False


def test_machine_simulated_root_is_trusted(sim, sim_chain, tmp_path, monkeypatch):
    home = tmp_path / "home"
    sim.save(home / "roots" / "default")
    monkeypatch.setenv("PYSEV_HOME", str(home))
    store = TrustStore.builtin().with_simulated()
    assert len(store) == 6
    report = verify(sim_chain, store)
    assert report.ok and report.anchor is not None and report.anchor.kind is RootKind.SIMULATED
    assert report.anchor.name == f"simulated root {home.resolve() / 'roots' / 'default'}"
    # a home without a root adds nothing and creates nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PYSEV_HOME", str(empty))
    assert len(TrustStore.builtin().with_simulated()) == 5 and not any(empty.iterdir())


def test_real_ark_over_a_forged_ask_fails(sim, sim_chain):
    report = verify(forged_chain(), TrustStore.builtin())
    assert not report.ok and not report.self_consistent
    assert report.first_failure is not None and report.first_failure.link == "ASK<-ARK"
    assert report.first_failure.status == SevStatus.BAD_SIGNATURE
    assert report.trusted is True and report.anchor is not None and report.anchor.generation == "naples"
    assert report.message.startswith("certificate chain invalid at ASK<-ARK")
    # AMD's Rome ARK over the simulated root's ASK and chain
    rome_ark = AmdCert.from_bytes((DATA / "rome" / "ark.cert").read_bytes())
    report = verify({**sim_chain, "ark": rome_ark}, TrustStore.builtin())
    assert report.first_failure is not None and report.first_failure.link == "ASK<-ARK" and not report.ok


def test_an_ark_claiming_amds_key_id_is_not_amds():
    """Matching is by key: a self-signed ARK that copies AMD's KEY_ID is an unknown root."""
    amd_ark = AmdCert.from_bytes((DATA / "naples" / "ark.cert").read_bytes())
    ark_key, ask_key = RSA.generate(2048), RSA.generate(2048)
    ark = AmdCert.build(amd_ark.key_id, amd_ark.key_id, Usage.ARK, ark_key.public_key()).sign(ark_key)
    ask = AmdCert.build(uuid.uuid4().bytes, ark.key_id, Usage.ASK, ask_key.public_key()).sign(ark_key)
    cek_key = ECC.generate(curve="P-384")
    cek = SevCert.build(cek_key.public_key(), Usage.CEK, Algo.ECDSA_SHA256, 0, 14).sign_as(ask, ask_key)
    report = verify({"ark": ark, "ask": ask, "cek": cek, **platform_under(cek, cek_key)}, TrustStore.builtin())
    assert report.self_consistent and report.trusted is False
    assert report.message == UNTRUSTED.format(KEY_IDS["naples"][0])


def test_trust_root_files(tmp_path, sim):
    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    # AMD's unsigned Naples ARK is the same key as the signed one
    unsigned = TrustStore().with_file(DATA / "naples" / "ark.cert.bad")
    assert unsigned.match(AmdCert.from_bytes((DATA / "naples" / "ark.cert").read_bytes())) is not None
    with pytest.raises(CertError, match=r"KEY_USAGE at offset 0x024: 0x13 \(ASK\)"):
        TrustStore().with_file(DATA / "rome" / "ask.cert")
    with pytest.raises(CertError, match="SEV PEK certificate"):
        TrustStore().with_file(DATA / "rome" / "pek.cert")
    with pytest.raises(CertError):
        TrustStore().with_file(write("junk", b"\xff" * 300))
    with pytest.raises(CertError, match="larger than"):
        TrustStore().with_file(write("big", bytes(4000)))
    bad_sig = bytearray(sim.ark.to_bytes())
    bad_sig[-1] ^= 1
    with pytest.raises(CertError, match="SIGNATURE at offset 0x440: ARK .* self-signature does not verify"):
        TrustStore().with_file(write("bad_sig", bytes(bad_sig)))
    not_self = dataclasses.replace(sim.ark, certifying_id=bytes(16), signature=None)
    with pytest.raises(CertError, match="CERTIFYING_ID"):
        TrustStore().with_file(write("not_self", not_self.to_bytes()))
    with pytest.raises(FileNotFoundError):
        TrustStore().with_file(tmp_path / "absent")


# -------------------------------------------------------------------------------------------------
# `pysev certs verify` as a program
# -------------------------------------------------------------------------------------------------
def pysev(home: Path, *argv: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYSEV_HOME=str(home))
    return subprocess.run(child_command(*map(str, argv)), env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def home(tmp_path) -> Path:
    """A $PYSEV_HOME with no root in it."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def test_cli_real_chains_name_their_amd_root(home):
    run = pysev(home, "certs", "verify", DATA / "rome")
    assert run.returncode == 0, run.stderr
    assert f"anchored by AMD Rome ARK (KEY_ID {KEY_IDS['rome'][0]})" in run.stdout and run.stderr == ""
    run = pysev(home, "certs", "verify", DATA / "naples", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["ok"] and out["anchor"]["kind"] == "amd" and out["anchor"]["generation"] == "naples"


def test_cli_simulated_root_needs_trust_root(home, tmp_path, sim, sim_chain):
    chain = write_chain(tmp_path / "chain", sim_chain)
    key_id = sim.ark.key_id.hex()
    run = pysev(home, "certs", "verify", chain)
    assert run.returncode == 1 and run.stderr == ""
    assert UNTRUSTED.format(key_id) + HINT in run.stdout
    assert "certificate chain valid" not in run.stdout
    run = pysev(home, "certs", "verify", chain, "--json")
    out = json.loads(run.stdout)
    assert run.returncode == 1 and out["message"] == UNTRUSTED.format(key_id) + HINT
    assert out["self_consistent"] and out["trusted"] is False and out["anchor"] is None
    named = tmp_path / "sim-ark.cert"
    named.write_bytes(sim.ark.to_bytes())
    run = pysev(home, "certs", "verify", chain, "--trust-root", DATA / "milan" / "ark.cert", "--trust-root", named)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"anchored by user root {named} (KEY_ID {key_id})" in run.stdout


def test_cli_trusts_the_machine_root(tmp_path, sim, sim_chain):
    chain = write_chain(tmp_path / "chain", sim_chain)
    home = tmp_path / "home"
    sim.save(home / "roots" / "default")
    run = pysev(home, "certs", "verify", chain)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"anchored by simulated root {home.resolve() / 'roots' / 'default'} (KEY_ID {sim.ark.key_id.hex()})" in (
        run.stdout
    )


def test_cli_forged_ask_is_an_invalid_chain(home, tmp_path):
    run = pysev(home, "certs", "verify", write_chain(tmp_path / "forged", forged_chain()))
    assert run.returncode == 1 and run.stderr == ""
    assert "certificate chain invalid at ASK<-ARK" in run.stdout and "self-consistent" not in run.stdout


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no-dir", "is not a directory"),
        ("no-trust-file", "--trust-root {tmp}/absent.cert: no such file"),
        ("trust-dir", "not a file"),
        ("trust-junk", "cannot use --trust-root"),
        ("trust-ask", "KEY_USAGE at offset 0x024"),
        ("trust-sev", "SEV PEK certificate"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_bad_input_is_one_line_and_status_2(home, tmp_path, case, expect, as_json):
    directory: Path = DATA / "rome"
    trust_root: list[str | Path] = []
    if case == "no-dir":
        directory = tmp_path / "absent"
    elif case == "no-trust-file":
        trust_root = ["--trust-root", tmp_path / "absent.cert"]
    elif case == "trust-dir":
        trust_root = ["--trust-root", tmp_path]
    elif case == "trust-junk":
        (tmp_path / "junk.cert").write_bytes(b"not a certificate")
        trust_root = ["--trust-root", tmp_path / "junk.cert"]
    elif case == "trust-ask":
        trust_root = ["--trust-root", DATA / "rome" / "ask.cert"]
    elif case == "trust-sev":
        trust_root = ["--trust-root", DATA / "rome" / "pek.cert"]
    run = pysev(home, "certs", "verify", directory, *trust_root, *(["--json"] if as_json else []))
    assert run.returncode == 2
    expect = expect.format(tmp=tmp_path)
    if as_json:
        out = json.loads(run.stdout)
        assert out["ok"] is False and expect in out["error"] and run.stderr == ""
    else:
        assert run.stdout == "" and run.stderr.startswith("error: ") and expect in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


def test_cli_unreadable_machine_root_is_bad_input(tmp_path):
    home = tmp_path / "home"
    (home / "roots" / "default").mkdir(parents=True)
    (home / "roots" / "default" / "ark.cert").write_bytes(b"\0" * 100)
    run = pysev(home, "certs", "verify", DATA / "rome")
    assert run.returncode == 2 and "cannot load the trusted roots" in run.stderr and "ark.cert" in run.stderr
    assert "Traceback" not in run.stderr
