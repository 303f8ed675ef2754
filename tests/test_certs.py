"""pysev.firmware.certs against the real AMD data in tests/data/sev-certs (its README's conclusions),
the layouts of AMD's sev_cert.h/amd_cert.h (docs/formats.md), the firmware validation rules, and hostile input."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import ECC
from Crypto.Signature import DSS

from pysev.firmware import certs
from pysev.firmware.certs import (
    Algo,
    AmdCert,
    CertError,
    SevCert,
    Signature,
    TrustAnchor,
    Usage,
    amd_cert,
    keys,
    sev_cert,
)
from pysev.firmware.status import SevError, SevStatus

DATA = Path(__file__).resolve().parent / "data" / "sev-certs"

OK, BAD_SIG, INVALID_CERT = SevStatus.SUCCESS, SevStatus.BAD_SIGNATURE, SevStatus.INVALID_CERTIFICATE


def raw(*parts: str) -> bytes:
    return DATA.joinpath(*parts).read_bytes()


def sev(*parts: str) -> SevCert:
    return SevCert.from_bytes(raw(*parts))


def amd(*parts: str) -> AmdCert:
    return AmdCert.from_bytes(raw(*parts))


def chain(gen: str) -> dict:
    out = {"ark": amd(gen, "ark.cert"), "ask": amd(gen, "ask.cert")}
    out.update({n: sev(gen, f"{n}.cert") for n in ("cek", "oca", "pek", "pdh")})
    return out


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


# -------------------------------------------------------------------------------------------------
# Layout pinned to AMD sev_cert.h / amd_cert.h (docs/formats.md)
# -------------------------------------------------------------------------------------------------
def test_sev_layout_matches_spec():
    assert sev_cert.SEV_CERT_SIZE == 2084 == 0x824
    assert sev_cert.SEV_CERT_BODY_SIZE == 0x414
    assert (sev_cert.OFF_VERSION, sev_cert.OFF_API_MAJOR, sev_cert.OFF_API_MINOR, sev_cert.OFF_RESERVED) == (
        0x000,
        0x004,
        0x005,
        0x006,
    )
    assert (sev_cert.OFF_PUBKEY_USAGE, sev_cert.OFF_PUBKEY_ALGO, keys.OFF_PUBKEY, keys.PUBKEY_SIZE) == (
        0x008,
        0x00C,
        0x010,
        1028,
    )
    assert (keys.OFF_EC_CURVE, keys.OFF_EC_QX, keys.OFF_EC_QY, keys.OFF_EC_RESERVED) == (0x010, 0x014, 0x05C, 0x0A4)
    assert sev_cert.SEV_CERT_BODY_SIZE - keys.OFF_EC_RESERVED == 880
    assert (keys.OFF_RSA_MODULUS_BITS, keys.OFF_RSA_PUBEXP, keys.OFF_RSA_MODULUS) == (0x010, 0x014, 0x214)
    assert (sev_cert.OFF_SIG1, sev_cert.OFF_SIG2, keys.SIG_SIZE) == (0x414, 0x61C, 512)
    assert sev_cert.PLAT_CERTS_SIZE == 6252
    # the package's public names are these same declarations
    assert (certs.SEV_CERT_SIZE, certs.SEV_CERT_BODY_SIZE, certs.PLAT_CERTS_SIZE) == (2084, 0x414, 6252)


def test_amd_layout_matches_spec():
    assert (
        amd_cert.AMD_OFF_VERSION,
        amd_cert.AMD_OFF_KEY_ID,
        amd_cert.AMD_OFF_CERTIFYING_ID,
        amd_cert.AMD_OFF_KEY_USAGE,
    ) == (0, 4, 0x14, 0x24)
    assert (amd_cert.AMD_OFF_RESERVED, amd_cert.AMD_OFF_PUBEXP_SIZE, amd_cert.AMD_OFF_MODULUS_SIZE) == (
        0x28,
        0x38,
        0x3C,
    )
    assert amd_cert.AMD_CERT_FIXED_SIZE == certs.AMD_CERT_FIXED_SIZE == 64
    assert (certs.AMD_CERT_SIZE_2K, certs.AMD_CERT_SIZE_4K, certs.AMD_CERT_UNSIGNED_SIZE_2K) == (832, 1600, 576)
    assert certs.NAPLES_BUNDLE_SIZE == 1408


def test_codes_match_spec():
    assert {u.name: int(u) for u in Usage} == {
        "ARK": 0,
        "ASK": 0x13,
        "INVALID": 0x1000,
        "OCA": 0x1001,
        "PEK": 0x1002,
        "PDH": 0x1003,
        "CEK": 0x1004,
    }
    assert {a.name: int(a) for a in Algo} == {
        "INVALID": 0,
        "RSA_SHA256": 1,
        "ECDSA_SHA256": 2,
        "ECDH_SHA256": 3,
        "RSA_SHA384": 0x101,
        "ECDSA_SHA384": 0x102,
        "ECDH_SHA384": 0x103,
    }


def test_p384_constants_match_pycryptodome():
    key = ECC.generate(curve="P-384")
    assert certs.EcPublicKey.from_ecc(key).is_valid()
    assert int(key._curve.order) == keys.P384_N  # noqa: SLF001 (cross-check only)


# -------------------------------------------------------------------------------------------------
# Real data: integrity and round trips
# -------------------------------------------------------------------------------------------------
README_SHA256 = {
    "naples/ark.cert": "dedabca561e1dece8cc00b7bda864cf5f20b95017864408cfe18eaee0dce24b9",
    "naples/cek.cert": "cbecc40f5b7d7e988fe7e4af20195cc540404eb685a2b49df0160781d04cf8f4",
    "rome/ark.cert": "865977b268c16d5b27772b00aaefb4e737ba9499e818ed8e9f65b0cecefbc529",
    "migration-attack/pdh_remote.cert": "b7c3dce19e828a41a0a930abb6e9a02d6d01fe6c6d7486837fa3095292b88431",
}


@pytest.mark.parametrize("name", sorted(README_SHA256))
def test_testdata_is_the_documented_data(name):
    assert hashlib.sha256(raw(name)).hexdigest() == README_SHA256[name]


def test_readme_lists_every_data_file_with_its_sha256():
    listed = {}
    for line in (DATA / "README.md").read_text().splitlines():
        digest, _, path = line.partition("  ./")
        if len(digest) == 64 and path:
            listed[path] = digest
    present = sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file() and p.name != "README.md")
    assert sorted(listed) == present
    assert all(hashlib.sha256(raw(path)).hexdigest() == digest for path, digest in listed.items())


def _all_cert_files() -> list[str]:
    return sorted(str(p.relative_to(DATA)) for p in DATA.glob("*/*.cert"))


@pytest.mark.parametrize("name", _all_cert_files())
def test_round_trip_is_byte_identical(name):
    data = raw(name)
    if len(data) == certs.SEV_CERT_SIZE:
        assert SevCert.from_bytes(data).to_bytes() == data
    elif len(data) == certs.NAPLES_BUNDLE_SIZE:
        ask, ark = certs.split_amd_chain(data)
        assert ask.to_bytes() + ark.to_bytes() == data
    else:
        assert AmdCert.from_bytes(data).to_bytes() == data


# -------------------------------------------------------------------------------------------------
# Naples
# -------------------------------------------------------------------------------------------------
def test_naples_ark_is_published_ark_plus_signature():
    assert raw("naples", "ark.cert") == raw("naples", "ark.cert.bad") + raw("naples", "ark.cert.sig")
    bad = AmdCert.from_bytes(raw("naples", "ark.cert.bad"), allow_unsigned=True)
    assert not bad.is_signed and bad.signature is None
    with pytest.raises(CertError, match="length 576"):
        AmdCert.from_bytes(raw("naples", "ark.cert.bad"))
    assert dataclasses.replace(bad, signature=raw("naples", "ark.cert.sig")) == amd("naples", "ark.cert")


def test_naples_ark_fields():
    ark, ask = amd("naples", "ark.cert"), amd("naples", "ask.cert")
    assert ark.key_id.hex() == ark.certifying_id.hex() == "1bb987c359494606b174945601c9ea5b"
    assert ask.key_id.hex() == "e139970cfc464377ae61b289e2f9e96e" and ask.certifying_id == ark.key_id
    assert (ark.key_usage, ask.key_usage) == (Usage.ARK, Usage.ASK)
    assert ark.modulus_bits == 2048 and ark.pubexp == 65537
    assert ark.key_hash().hex().startswith("bf66a6df") and ark.key_hash().hex().endswith("d192537f")


def _oracle_pss(cert: AmdCert, signer: AmdCert, hash_name: str) -> bool:
    """Independent check with `cryptography` (test-only oracle)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    h = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[hash_name]
    pub = rsa.RSAPublicNumbers(signer.pubexp, signer.modulus).public_key()
    try:
        pub.verify(
            cert.signature[::-1], cert.signed_bytes(), padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h
        )
    except InvalidSignature:
        return False
    return True


def test_naples_amd_signatures_are_pss_sha256():
    ark, ask = amd("naples", "ark.cert"), amd("naples", "ask.cert")
    assert certs.amd_cert_validate(ark, ark, Usage.ARK) == OK
    assert certs.amd_cert_validate(ask, ark, Usage.ASK) == OK
    assert _oracle_pss(ark, ark, "sha256") and not _oracle_pss(ark, ark, "sha384")
    assert _oracle_pss(ask, ark, "sha256")


def test_naples_chain_verifies_link_by_link():
    c = chain("naples")
    assert c["cek"].api_major == 0 and c["cek"].api_minor == 14
    assert (c["cek"].sig1.usage, c["cek"].sig1.algo) == (Usage.ASK, Algo.RSA_SHA256)
    assert c["cek"].sig2.is_empty
    assert (c["pek"].sig1.usage, c["pek"].sig2.usage) == (Usage.OCA, Usage.CEK)
    report = certs.verify_chain(**c)
    assert report.ok, report.message
    assert [link.link for link in report.links] == [
        "ARK (self-signed)",
        "ASK<-ARK",
        "CEK<-ASK",
        "OCA (self-signed)",
        "PEK<-OCA",
        "PEK<-CEK",
        "PDH<-PEK",
    ]
    assert "slot 2" in report.links[5].message and "RSA_SHA256" in report.links[2].message
    assert all(
        isinstance(c[n].pubkey, certs.EcPublicKey) and c[n].pubkey.is_valid() for n in ("cek", "oca", "pek", "pdh")
    )


# -------------------------------------------------------------------------------------------------
# Rome, Milan, Genoa, Turin
# -------------------------------------------------------------------------------------------------
def test_rome_chain_verifies_with_sha384():
    c = chain("rome")
    assert (c["ark"].key_id.hex(), c["ask"].key_id.hex()) == (
        "e6002122fb58419399d15fee7b131351",
        "c6cbcf145b3146f498e40ecb4ad4fded",
    )
    assert _oracle_pss(c["ark"], c["ark"], "sha384") and not _oracle_pss(c["ark"], c["ark"], "sha256")
    assert _oracle_pss(c["ask"], c["ark"], "sha384")
    assert c["cek"].sig1.algo == Algo.RSA_SHA384 and c["pek"].api_minor == 22
    report = certs.verify_chain(**c)
    assert report.ok, report.message
    report.raise_for_status()


ROOTS = {
    "naples": ("1bb987c359494606b174945601c9ea5b", "e139970cfc464377ae61b289e2f9e96e", "bf66a6df", "d192537f"),
    "rome": ("e6002122fb58419399d15fee7b131351", "c6cbcf145b3146f498e40ecb4ad4fded", "3d2c1157", "1ae203ed"),
    "milan": ("94c38e4177d0479292a7ae671d083fb6", "73478c05cc174bfeb06e718fa75dc3c8", "569da618", "b7a1e737"),
    "genoa": ("9f9d4a8fe761456599f6946c4c010f3a", "acbb4ad21acc436fb3e932f812cd01b0", "b66e16ff", "75c37926"),
    "turin": ("d05c3a8bde484904b49552422ceb3942", "15051693f7304d65a527b4a7f3f7cb77", "712a2800", "ef411a0e"),
}


@pytest.mark.parametrize("gen", sorted(ROOTS))
def test_amd_roots(gen):
    ark_id, ask_id, hash_head, hash_tail = ROOTS[gen]
    ark, ask = amd(gen, "ark.cert"), amd(gen, "ask.cert")
    assert (ark.key_id.hex(), ask.key_id.hex()) == (ark_id, ask_id)
    assert ask.certifying_id == ark.key_id == ark.certifying_id
    assert certs.amd_cert_validate(ark, ark, Usage.ARK) == OK
    assert certs.amd_cert_validate(ask, ark, Usage.ASK) == OK
    h = ark.key_hash().hex()
    assert h.startswith(hash_head) and h.endswith(hash_tail)
    if gen != "naples":
        assert len(ark.to_bytes()) == 1600 and ark.hash.__name__.endswith("SHA384")


def test_genoa_ark_id_is_the_firmware_root_id():
    aspfw_amd_root_key_id = bytes(
        [0x9F, 0x9D, 0x4A, 0x8F, 0xE7, 0x61, 0x45, 0x65, 0x99, 0xF6, 0x94, 0x6C, 0x4C, 0x01, 0x0F, 0x3A]
    )
    assert amd("genoa", "ark.cert").key_id == aspfw_amd_root_key_id


# -------------------------------------------------------------------------------------------------
# naples-kds-cek and migration-attack
# -------------------------------------------------------------------------------------------------
KDS_CEK = (
    "naples-kds-cek/cek_5E1FDB617787B6D516F5CC5A5BB48FAE868DD57C71EC81F3FD59AD7C84A761C7453289287481"
    "DEA46C010E25304DA3FDFCE63DF87C5AE735537975EEE069CB14.cert"
)


def test_naples_bundle_is_ask_plus_unsigned_ark():
    bundle = raw("naples-kds-cek", "ask_ark_naples.cert")
    assert bundle == raw("naples", "ask.cert") + raw("naples", "ark.cert.bad")
    ask, ark = certs.split_amd_chain(bundle)
    assert ask == amd("naples", "ask.cert")
    assert not ark.is_signed and ark.signed_bytes() == raw("naples", "ark.cert.bad")
    report = certs.verify_chain(ark, ask, *(sev("naples", f"{n}.cert") for n in ("cek", "oca", "pek", "pdh")))
    assert not report.ok and report.first_failure.link == "ARK (self-signed)"
    assert "no signature" in report.message


def test_kds_cek_is_signed_by_naples_ask():
    cek = SevCert.from_bytes(raw(KDS_CEK))
    assert (cek.version, cek.api_major, cek.api_minor) == (1, 0, 14)
    assert (cek.pubkey_usage, cek.pubkey_algo, cek.pubkey.curve) == (Usage.CEK, Algo.ECDSA_SHA256, 2)
    assert (cek.sig1.usage, cek.sig1.algo) == (Usage.ASK, Algo.RSA_SHA256) and cek.sig2.is_empty
    ask, _ = certs.split_amd_chain(raw("naples-kds-cek", "ask_ark_naples.cert"))
    assert certs.sev_cert_validate(cek, ask) == OK
    assert certs.sev_cert_validate(cek, amd("rome", "ask.cert")) == INVALID_CERT  # no RSA_SHA384 slot
    # data.sig is DER ECDSA-SHA256 made with this chip's CEK private key
    DSS.new(cek.ecc_key(), "fips-186-3", encoding="der").verify(
        SHA256.new(raw("naples-kds-cek", "data")), raw("naples-kds-cek", "data.sig")
    )


Z_ATTACK = "071e4d4688fb4410d5b161fd11c3f6c4ca5885354bae717de77f503f94a271b2f1c9a0799e8a65b278ccb2ce21721feb"


def test_migration_attack_pdh_and_ecdh():
    data = raw("migration-attack", "pdh_remote.cert")
    pdh = SevCert.from_bytes(data)
    assert (pdh.version, pdh.api_major, pdh.api_minor) == (1, 0, 17)
    assert (pdh.pubkey_usage, pdh.pubkey_algo) == (Usage.PDH, Algo.ECDH_SHA256)
    assert pdh.pubkey.curve == 2 and pdh.pubkey.is_valid()
    assert pdh.pubkey.x == int.from_bytes(data[0x14:0x5C], "little")
    assert pdh.pubkey.y == int.from_bytes(data[0x5C:0xA4], "little")
    assert (pdh.sig1.usage, pdh.sig1.algo) == (Usage.PEK, Algo.ECDSA_SHA256) and pdh.sig2.is_empty
    assert certs.pdh_sanity_check(pdh) == OK
    priv = ECC.import_key(raw("migration-attack", "pdh_priv.pem"))
    z = certs.ecdh_shared_secret(priv, pdh)
    assert z.hex() == Z_ATTACK
    assert certs.ecdh_shared_secret(priv, pdh.pubkey) == certs.ecdh_shared_secret(priv, pdh.ecc_key()) == z

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    oracle = load_pem_private_key(raw("migration-attack", "pdh_priv.pem"), None)
    peer = ec.EllipticCurvePublicNumbers(pdh.pubkey.x, pdh.pubkey.y, ec.SECP384R1()).public_key()
    assert oracle.exchange(ec.ECDH(), peer) == z


# -------------------------------------------------------------------------------------------------
# Building and signing (pycryptodome keys), cross-checked with `cryptography`
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def private_keys():
    return {n: ECC.generate(curve="P-384") for n in ("oca", "pek", "pdh", "cek", "other")}


def make_domain(private_keys, api=(0, 22)):
    """An OCA/PEK/PDH (+ unsigned-by-AMD CEK) set as PEK_GEN would make it."""
    cek = SevCert.build(private_keys["cek"].public_key(), Usage.CEK, Algo.ECDSA_SHA256, 0, 14)
    oca = SevCert.build(private_keys["oca"].public_key(), Usage.OCA, Algo.ECDSA_SHA256, *api)
    oca = oca.sign_as(oca, private_keys["oca"])
    pek = SevCert.build(private_keys["pek"].public_key(), Usage.PEK, Algo.ECDSA_SHA256, *api)
    pek = pek.sign_as(oca, private_keys["oca"]).sign_as(cek, private_keys["cek"])
    pdh = SevCert.build(private_keys["pdh"].public_key(), Usage.PDH, Algo.ECDH_SHA256, *api)
    pdh = pdh.sign_as(pek, private_keys["pek"])
    return cek, oca, pek, pdh


def test_built_certs_verify_and_round_trip(private_keys):
    cek, oca, pek, pdh = make_domain(private_keys)
    assert certs.sev_cert_validate(oca, oca) == OK
    assert certs.sev_cert_validate(pek, oca) == OK and certs.sev_cert_validate(pek, cek) == OK
    assert certs.sev_cert_validate(pdh, pek) == OK and certs.pdh_sanity_check(pdh) == OK
    assert (pek.sig1.usage, pek.sig2.usage) == (Usage.OCA, Usage.CEK)
    for cert in (cek, oca, pek, pdh):
        assert SevCert.from_bytes(cert.to_bytes()) == cert
    assert pek.unsigned().sig1.is_empty and pek.unsigned().body() == pek.body()


@pytest.mark.parametrize("algo", [Algo.ECDSA_SHA256, Algo.ECDSA_SHA384])
def test_ecdsa_slot_encoding_matches_oracle(private_keys, algo):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    signer = SevCert.build(private_keys["oca"].public_key(), Usage.OCA, algo)
    cert = SevCert.build(private_keys["pek"].public_key(), Usage.PEK, Algo.ECDSA_SHA256)
    cert = cert.sign_as(signer, private_keys["oca"])
    assert cert.sig1.algo == algo and not any(cert.sig1.sig[144:])
    r = int.from_bytes(cert.sig1.sig[:72], "little")
    s = int.from_bytes(cert.sig1.sig[72:144], "little")
    pub = ec.EllipticCurvePublicNumbers(signer.pubkey.x, signer.pubkey.y, ec.SECP384R1()).public_key()
    h = hashes.SHA256() if algo == Algo.ECDSA_SHA256 else hashes.SHA384()
    pub.verify(encode_dss_signature(r, s), cert.to_bytes()[:0x414], ec.ECDSA(h))
    assert certs.sev_cert_validate(cert, signer) == OK


def test_signing_errors(private_keys):
    cek, oca, pek, _ = make_domain(private_keys)
    with pytest.raises(SevError) as exc:
        pek.sign_as(oca, private_keys["oca"])  # both slots used
    assert exc.value.status == INVALID_CERT
    with pytest.raises(ValueError, match="does not belong"):
        pek.unsigned().sign_as(oca, private_keys["other"])
    with pytest.raises(ValueError, match="cannot sign"):
        pek.unsigned().sign(private_keys["pdh"], Usage.PDH, Algo.ECDH_SHA256)
    with pytest.raises(ValueError):
        SevCert.build(private_keys["pdh"].public_key(), Usage.PDH, Algo.RSA_SHA256)
    with pytest.raises(ValueError):
        SevCert.build(private_keys["pdh"].public_key(), Usage.INVALID, Algo.ECDH_SHA256)


# -------------------------------------------------------------------------------------------------
# sev_cert_validate semantics (AMD sev_cert.c sev_cert_validate) and negative cases
# -------------------------------------------------------------------------------------------------
def test_wrong_signer_and_swapped_parent_child():
    c = chain("naples")
    assert certs.sev_cert_validate(c["pdh"], c["oca"]) == INVALID_CERT  # no OCA slot on a PDH
    assert certs.sev_cert_validate(c["cek"], c["pek"]) == INVALID_CERT  # swapped: parent under child
    assert certs.sev_cert_validate(c["pek"], c["pdh"]) == INVALID_CERT
    assert certs.amd_cert_validate(c["ark"], c["ask"], Usage.ARK) == BAD_SIG
    swapped = certs.verify_chain(c["ark"], c["ask"], c["pek"], c["oca"], c["cek"], c["pdh"])
    assert not swapped.ok and swapped.first_failure.link == "CEK<-ASK"
    assert "CEK<-ASK" in swapped.message and "expected CEK" in swapped.message
    amd_swapped = certs.verify_chain(c["ask"], c["ark"], c["cek"], c["oca"], c["pek"], c["pdh"])
    assert amd_swapped.first_failure.link == "ARK (self-signed)"
    with pytest.raises(SevError, match="PDH<-OCA") as exc:
        certs.require_valid(c["pdh"], c["oca"], "PDH<-OCA")
    assert exc.value.status == INVALID_CERT
    with pytest.raises(SevError, match="ARK") as exc:
        swapped_report = certs.verify_chain(c["ask"], c["ask"], c["cek"], c["oca"], c["pek"], c["pdh"])
        swapped_report.raise_for_status()


def test_wrong_usage_signer_is_rejected_after_good_signature(private_keys):
    """An OCA key can sign a PDH body, but only a PEK may certify a PDH → INVALID_CERTIFICATE."""
    _, oca, _, _ = make_domain(private_keys)
    rogue = SevCert.build(private_keys["pdh"].public_key(), Usage.PDH, Algo.ECDH_SHA256)
    rogue = rogue.sign_as(oca, private_keys["oca"])
    assert certs.sev_cert_validate(rogue, oca) == INVALID_CERT
    with pytest.raises(SevError, match="may not certify a PDH"):
        certs.require_valid(rogue, oca, "PDH<-OCA")


@pytest.mark.parametrize("where", ["body", "signature"])
def test_flipped_bit_is_bad_signature(where):
    c = chain("rome")
    data = c["pdh"].to_bytes()
    offset = 0x20 if where == "body" else sev_cert.OFF_SIG1 + 8 + 5  # QX byte / R byte
    bad = SevCert.from_bytes(flip(data, offset), check_key=False)
    assert certs.sev_cert_validate(bad, c["pek"]) == BAD_SIG
    report = certs.verify_chain(c["ark"], c["ask"], c["cek"], c["oca"], c["pek"], bad)
    assert report.first_failure.link == "PDH<-PEK" and report.first_failure.status == BAD_SIG
    assert "does not verify" in report.message


@pytest.mark.parametrize("where", ["modulus", "signature"])
def test_flipped_bit_in_amd_cert(where):
    c = chain("rome")
    data = c["ask"].to_bytes()
    offset = 0x40 + 512 + 7 if where == "modulus" else 0x40 + 1024 + 9
    ask = AmdCert.from_bytes(flip(data, offset))
    assert certs.amd_cert_validate(ask, c["ark"], Usage.ASK) == BAD_SIG
    report = certs.verify_chain(c["ark"], ask, c["cek"], c["oca"], c["pek"], c["pdh"])
    assert report.first_failure.link == "ASK<-ARK" and "RSA-PSS/SHA-384" in report.message


def test_mixed_generations_fail():
    naples, rome, milan = chain("naples"), chain("rome"), {"ark": amd("milan", "ark.cert")}
    assert certs.sev_cert_validate(rome["pek"], naples["cek"]) == BAD_SIG  # CEK/ECDSA slot, other key
    assert certs.amd_cert_validate(rome["ask"], milan["ark"], Usage.ASK) == BAD_SIG
    assert certs.sev_cert_validate(naples["cek"], rome["ask"]) == INVALID_CERT
    report = certs.verify_chain(milan["ark"], rome["ask"], rome["cek"], rome["oca"], rome["pek"], rome["pdh"])
    assert report.first_failure.link == "ASK<-ARK" and report.first_failure.status == BAD_SIG
    mixed = certs.verify_chain(naples["ark"], naples["ask"], naples["cek"], rome["oca"], rome["pek"], rome["pdh"])
    assert mixed.first_failure.link == "PEK<-CEK" and "PEK<-CEK" in mixed.message


def test_slot_rules(private_keys):
    cek, oca, pek, _ = make_domain(private_keys)
    # malformed slot (exactly one of usage/algo INVALID) → BAD_SIGNATURE even if the other slot is good
    malformed = dataclasses.replace(pek, sig2=Signature(Usage.CEK, Algo.INVALID))
    assert certs.sev_cert_validate(malformed, oca) == BAD_SIG
    assert SevCert.from_bytes(malformed.to_bytes()) == malformed  # parses: the rule decides
    # both slots claim OCA; the last matching slot decides (the loop of AMD sev_cert.c sev_cert_validate)
    one = pek.unsigned().sign_as(oca, private_keys["oca"])
    good, junk = one.sig1, Signature(Usage.OCA, Algo.ECDSA_SHA256, bytes([1]) + bytes(143) + bytes(368))
    assert certs.sev_cert_validate(dataclasses.replace(one, sig2=junk), oca) == BAD_SIG
    assert certs.sev_cert_validate(dataclasses.replace(one, sig1=junk, sig2=good), oca) == OK
    # a signer key that is itself invalid → INVALID_CERTIFICATE
    off = dataclasses.replace(oca, pubkey=certs.EcPublicKey(oca.pubkey.x, oca.pubkey.y + 1))
    assert certs.sev_cert_validate(pek, off) == INVALID_CERT
    assert certs.sev_cert_validate(pek, cek) == OK


# -------------------------------------------------------------------------------------------------
# Hostile input
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, field",
    [
        (lambda d: d[:-1], "length must be 2084"),
        (lambda d: d + b"\0", "length must be 2084"),
        (lambda d: b"", "length must be 2084"),
        (lambda d: struct.pack("<I", 2) + d[4:], "VERSION at offset 0x000"),
        (lambda d: d[:6] + b"\1\0" + d[8:], "reserved at offset 0x006"),
        (lambda d: d[:8] + struct.pack("<I", 0x1005) + d[12:], "PUBKEY_USAGE at offset 0x008"),
        (lambda d: d[:8] + struct.pack("<I", 0x1000) + d[12:], "PUBKEY_USAGE at offset 0x008"),
        (lambda d: d[:12] + struct.pack("<I", 0x4) + d[16:], "PUBKEY_ALGO at offset 0x00c"),
        (lambda d: d[:16] + struct.pack("<I", 1) + d[20:], "CURVE at offset 0x010"),
        (lambda d: flip(d, 0x100), "PUBKEY reserved at offset 0x100"),
        (lambda d: flip(d, 0x5C), "PUBKEY at offset 0x014: point"),
        (lambda d: d[:0x414] + struct.pack("<I", 0x7) + d[0x418:], "SIG1_USAGE at offset 0x414"),
        (lambda d: d[:0x620] + struct.pack("<I", 0x104) + d[0x624:], "SIG2_ALGO at offset 0x620"),
        (lambda d: flip(d, 0x700), "SIG2 (empty slot) at offset 0x700"),
        (lambda d: flip(d, 0x41C + 200), "SIG1 reserved at offset 0x4e4"),
    ],
)
def test_hostile_sev_cert_rejected_with_field_and_offset(data, field):
    with pytest.raises(CertError, match=field.replace("(", r"\(").replace(")", r"\)")):
        SevCert.from_bytes(data(raw("naples", "pdh.cert")))


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d[:-1], "length 1599"),
        (lambda d: d + b"\0", "length 1601"),
        (lambda d: d[:40], "shorter than the 64-byte header"),
        (lambda d: struct.pack("<I", 3) + d[4:], "VERSION at offset 0x000"),
        (lambda d: d[:0x24] + struct.pack("<I", 0x1001) + d[0x28:], "KEY_USAGE at offset 0x024"),
        (lambda d: flip(d, 0x30), "reserved at offset 0x030"),
        (lambda d: d[:0x3C] + struct.pack("<I", 3072) + d[0x40:], "MODULUS_SIZE at offset 0x03c"),
        (lambda d: d[:0x38] + struct.pack("<I", 0xFFFFFFF8) + d[0x3C:], "PUBEXP_SIZE at offset 0x038"),
    ],
)
def test_hostile_amd_cert_rejected(mutate, field):
    with pytest.raises(CertError, match=field):
        AmdCert.from_bytes(mutate(raw("rome", "ask.cert")))


def test_hostile_amd_chain():
    blob = raw("rome", "ask.cert") + raw("rome", "ark.cert")
    assert certs.split_amd_chain(blob)[1] == amd("rome", "ark.cert")
    for bad in (blob[:-1], blob + b"\0", blob[:1000], blob * 2, b""):
        with pytest.raises(CertError):
            certs.split_amd_chain(bad)


def test_off_curve_point():
    data = bytearray(raw("naples", "pdh.cert"))
    data[0x5C] ^= 1
    with pytest.raises(CertError, match="not on P-384"):
        SevCert.from_bytes(data)
    off = SevCert.from_bytes(data, check_key=False)
    assert not off.pubkey.is_valid()
    assert certs.pdh_sanity_check(off) == INVALID_CERT
    assert certs.pdh_sanity_check(bytes(data)) == INVALID_CERT
    with pytest.raises(CertError):
        certs.ecdh_shared_secret(ECC.generate(curve="P-384"), off)


def test_off_curve_point_with_valid_signature_is_invalid_certificate(private_keys):
    _, _, pek, _ = make_domain(private_keys)
    x = certs.EcPublicKey.from_ecc(private_keys["pdh"]).x
    off = SevCert(Usage.PDH, Algo.ECDH_SHA256, certs.EcPublicKey(x, 5)).sign_as(pek, private_keys["pek"])
    assert certs.sev_cert_validate(off, pek) == INVALID_CERT  # signature first, then the body
    with pytest.raises(SevError, match="not on P-384"):
        certs.require_valid(off, pek, "PDH<-PEK")


# -------------------------------------------------------------------------------------------------
# Firmware-order SEND_START checks (AMD sev_mcmd.c validate_platform, validate_domain, sev_cert_sanity_check)
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_validate_platform_real_chains(gen):
    c = chain(gen)
    plat = certs.join_plat_certs(c["pek"], c["oca"], c["cek"])
    amd_chain = c["ask"].to_bytes() + c["ark"].to_bytes()
    anchor = TrustAnchor.from_ark(c["ark"])
    pdh = c["pdh"].to_bytes()
    assert certs.validate_platform(pdh, plat, amd_chain, anchor) == OK
    assert certs.split_plat_certs(plat) == (c["pek"], c["oca"], c["cek"])
    other = TrustAnchor.from_ark(amd("genoa", "ark.cert"))
    assert certs.validate_platform(pdh, plat, amd_chain, other) == INVALID_CERT
    other_hash = dataclasses.replace(anchor, ark_hash=bytes(48))
    assert certs.validate_platform(pdh, plat, amd_chain, other_hash) == INVALID_CERT
    assert certs.validate_platform(pdh[:-1], plat, amd_chain, anchor) == SevStatus.INVALID_LENGTH
    assert certs.validate_platform(pdh, plat + b"\0", amd_chain, anchor) == SevStatus.INVALID_LENGTH
    assert certs.validate_platform(pdh, plat, amd_chain[:-1], anchor) == SevStatus.INVALID_LENGTH
    assert certs.validate_platform(flip(pdh, 0x30), plat, amd_chain, anchor) == BAD_SIG
    assert certs.validate_platform(pdh, flip(plat, 0x30), amd_chain, anchor) == BAD_SIG  # PEK body
    swapped = certs.join_plat_certs(c["cek"], c["oca"], c["pek"])
    assert certs.validate_platform(pdh, swapped, amd_chain, anchor) == INVALID_CERT
    # the OCA is not part of the SEV-bit check
    assert certs.validate_platform(pdh, certs.join_plat_certs(c["pek"], c["pek"], c["cek"]), amd_chain, anchor) == OK


def test_validate_platform_naples_bundle():
    c = chain("naples")
    plat = certs.join_plat_certs(c["pek"], c["oca"], c["cek"])
    bundle = raw("naples-kds-cek", "ask_ark_naples.cert")
    anchor = TrustAnchor.from_ark(c["ark"])
    pdh = c["pdh"].to_bytes()
    assert certs.validate_platform(pdh, plat, bundle, anchor) == SevStatus.INVALID_LENGTH
    assert certs.validate_platform(pdh, plat, bundle, anchor, allow_unsigned_ark=True) == OK
    rome_anchor = TrustAnchor.from_ark(amd("rome", "ark.cert"))
    assert certs.validate_platform(pdh, plat, bundle, rome_anchor, allow_unsigned_ark=True) == INVALID_CERT


def test_validate_domain_and_pdh_sanity():
    n, r = chain("naples"), chain("rome")
    plat = certs.join_plat_certs(n["pek"], n["oca"], n["cek"])
    assert certs.validate_domain(n["pdh"], plat, n["oca"]) == OK
    assert certs.validate_domain(n["pdh"], plat, r["oca"].to_bytes()) == SevStatus.POLICY_FAILURE
    assert certs.validate_domain(r["pdh"], plat, n["oca"]) == BAD_SIG
    assert certs.validate_domain(n["pdh"], plat[:-1], n["oca"]) == SevStatus.INVALID_LENGTH
    assert certs.pdh_sanity_check(n["pdh"]) == OK
    assert certs.pdh_sanity_check(n["pek"]) == INVALID_CERT
    assert certs.pdh_sanity_check(dataclasses.replace(n["pdh"], pubkey_algo=Algo.ECDH_SHA384)) == INVALID_CERT
    assert certs.pdh_sanity_check(b"\0" * 2084) == INVALID_CERT


# -------------------------------------------------------------------------------------------------
# CLI: `pysev certs verify|show`
# -------------------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    """Through the full dispatcher when every subcommand module imports, else this module alone."""
    try:
        from pysev.cli import build_parser

        parser = build_parser()
    except ImportError:
        from pysev.cli import certs as cli_certs

        parser = argparse.ArgumentParser(prog="pysev")
        cli_certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_verify_ok(capsys):
    assert run_cli(["certs", "verify", str(DATA / "naples")]) == 0
    out = capsys.readouterr().out
    assert "PEK<-CEK" in out and "OK" in out and "FAIL" not in out
    assert "anchored by AMD Naples ARK (KEY_ID 1bb987c359494606b174945601c9ea5b)" in out
    assert run_cli(["certs", "verify", str(DATA / "rome"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["links"]) == 8 and report["first_failure"] is None
    assert report["links"][-1]["link"] == "Trusted root" and report["anchor"]["generation"] == "rome"


def test_cli_verify_failures(tmp_path, capsys):
    d = tmp_path / "chain"
    shutil.copytree(DATA / "naples", d)
    (d / "pek.cert").write_bytes(flip(raw("naples", "pek.cert"), 0x05))  # API_MINOR: body changed
    assert run_cli(["certs", "verify", str(d), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["first_failure"] == "PEK<-OCA"
    assert run_cli(["certs", "verify", str(d)]) == 1
    assert "FAIL" in capsys.readouterr().out
    (d / "pdh.cert").write_bytes(raw("naples", "pdh.cert")[:100])
    assert run_cli(["certs", "verify", str(d)]) == 2
    assert "pdh.cert" in capsys.readouterr().err
    assert run_cli(["certs", "verify", str(DATA / "milan"), "--json"]) == 2
    assert "lacks cek.cert" in json.loads(capsys.readouterr().out)["error"]


def test_cli_show(capsys, tmp_path):
    assert run_cli(["certs", "show", str(DATA / "rome" / "pek.cert"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "sev" and info["pubkey_usage"]["name"] == "PEK"
    assert info["sig2"]["usage"]["name"] == "CEK" and info["api"] == "0.22" and info["pubkey"]["on_curve"]
    assert run_cli(["certs", "show", str(DATA / "milan" / "ark.cert"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["key_id"] == "94c38e4177d0479292a7ae671d083fb6" and info["key_usage"]["name"] == "ARK"
    assert run_cli(["certs", "show", str(DATA / "naples-kds-cek" / "ask_ark_naples.cert"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "amd-chain" and info["ark"]["signed"] is False
    assert run_cli(["certs", "show", str(DATA / "naples" / "cek.cert")]) == 0
    assert "RSA_SHA256" in capsys.readouterr().out
    junk = tmp_path / "junk.cert"
    junk.write_bytes(b"\xff" * 300)
    assert run_cli(["certs", "show", str(junk)]) == 2
    assert "cannot decode" in capsys.readouterr().err
