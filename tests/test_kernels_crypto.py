"""csev crypto kernels: native (OpenSSL through csev._libcrypto) and plain-Python twins, side by side.

Known answers: IEEE 1619-2007 Annex B XTS-AES-128 vectors 1-4 and 15-18 (ciphertext stealing),
NIST SP 800-38A F.5.1/F.5.2 CTR-AES128, RFC 4231 HMAC-SHA256 test cases 1-7. Oracles: ``cryptography``
(XTS, CTR) and the stdlib ``hmac`` on whole 4 KiB pages. Then the SEV transport pipeline
(SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA, #55766; AMD's firmware source ``sev_mcmd.c``) and bad input.
"""

from __future__ import annotations

import hmac
import importlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import csev
from csev import _fallback_crypto, errors, packet

PAGE, HEADER = 4096, 52
UNSUPPORTED, BAD_MEASUREMENT = 0x15, 0x0B


class Native:
    """The native kernels as one namespace (skipped when libcrypto or the build is missing)."""

    def __init__(self):
        for name in ("_xts", "_transport", "_wrap"):
            mod = importlib.import_module(f"csev.{name}")
            for attr in dir(mod):
                if not attr.startswith("_"):
                    setattr(self, attr, getattr(mod, attr))


def _native():
    try:
        return Native()
    except ImportError as exc:
        pytest.skip(f"native kernels unavailable: {exc}")


@pytest.fixture(params=["native", "twin"])
def k(request):
    return _native() if request.param == "native" else _fallback_crypto


@pytest.fixture(scope="module")
def native():
    return _native()


def rand_pages(rng, n):
    return rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8)


def le128(x: int) -> bytes:
    return x.to_bytes(16, "little")


# --- known answers ------------------------------------------------------------------------------

_V4_PT = bytes(range(256)) * 2
_V4_CT = bytes.fromhex(
    "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f560000"
    "05279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
    "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4c4e41a8952c651d33174be51"
    "a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
    "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec3"
    "0bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
    "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6"
    "d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
    "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38"
    "fc82bbe872c5539edb609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
    "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568"
)
_K15 = "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0"
_P15 = bytes(range(20))

# (name, key1‖key2, data unit sequence number, plaintext, ciphertext)
XTS_VECTORS = [
    (
        "ieee-2",
        "11" * 16 + "22" * 16,
        0x3333333333,
        b"\x44" * 32,
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    ),
    (
        "ieee-3",
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0" + "22" * 16,
        0x3333333333,
        b"\x44" * 32,
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    ),
    ("ieee-4", "2718281828459045235360287471352631415926535897932384626433832795", 0, _V4_PT, _V4_CT.hex()),
    ("ieee-15", _K15, 0x123456789A, _P15[:17], "6c1625db4671522d3d7599601de7ca09ed"),
    ("ieee-16", _K15, 0x123456789A, _P15[:18], "d069444b7a7e0cab09e24447d24deb1fedbf"),
    ("ieee-17", _K15, 0x123456789A, _P15[:19], "e5df1351c0544ba1350b3363cd8ef4beedbf9d"),
    ("ieee-18", _K15, 0x123456789A, _P15[:20], "9d84c813f719aa2c7be3f66171c7c5c2edbf9dac"),
]


@pytest.mark.parametrize("name,key,seq,pt,ct", XTS_VECTORS, ids=[v[0] for v in XTS_VECTORS])
def test_xts_ieee1619_vectors(k, name, key, seq, pt, ct):
    key = bytes.fromhex(key)
    assert k.xts_crypt_raw(key, le128(seq), pt, True).hex() == ct
    assert k.xts_crypt_raw(key, le128(seq), bytes.fromhex(ct), False) == pt


def test_xts_ieee1619_vector1_equal_halves_rejected(k):
    # Vector 1 has key1 == key2 == 0: the case XTS implementations must refuse (IEEE 1619-2018).
    with pytest.raises(ValueError, match="halves"):
        k.xts_crypt_raw(bytes(32), bytes(16), bytes(32))


def test_xts_page_api_matches_vector_4(k):
    # The batch API on a page holding vector 4's 512 bytes at its start: the first 32 data
    # units-worth of blocks match (XTS is blockwise before the final stealing step).
    key = bytes.fromhex(XTS_VECTORS[2][1])
    page = np.zeros((1, PAGE), np.uint8)
    page[0, :512] = np.frombuffer(_V4_PT, np.uint8)
    out = np.empty_like(page)
    k.xts_encrypt(key, page, out, np.zeros(1, np.uint64))
    assert out[0, :512].tobytes() == _V4_CT


CTR_KEY = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
CTR_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
CTR_PT = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
)
CTR_CT = bytes.fromhex(
    "874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff"
    "5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee"
)


def test_ctr_sp800_38a(k):
    assert k.aes128_ctr(CTR_KEY, CTR_IV, CTR_PT) == CTR_CT  # F.5.1 encrypt
    assert k.aes128_ctr(CTR_KEY, CTR_IV, CTR_CT) == CTR_PT  # F.5.2 decrypt
    assert k.aes128_ctr(CTR_KEY, CTR_IV, CTR_PT[:23]) == CTR_CT[:23]
    assert k.aes128_ctr(CTR_KEY, CTR_IV, b"") == b""


def test_ctr_counter_wraps_mod_2_128(k):
    iv = b"\xff" * 16
    data = bytes(range(48))
    oracle = Cipher(algorithms.AES(CTR_KEY), modes.CTR(iv)).encryptor().update(data)
    assert k.aes128_ctr(CTR_KEY, iv, data) == oracle


RFC4231 = [
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50, "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\x0c" * 20, b"Test With Truncation", "a3b6167473100ee06e0c796c2955552b"),  # 128-bit truncation
    (
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data."
        b" The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
]


@pytest.mark.parametrize("key,data,mac", RFC4231, ids=[f"tc{i}" for i in range(1, 8)])
def test_hmac_rfc4231(k, key, data, mac):
    assert k.hmac_sha256(key, data).hex()[: len(mac)] == mac


def test_hmac_key_lengths_and_buffers(k):
    data = os.urandom(1000)
    for n in (0, 1, 16, 63, 64, 65, 200):
        key = os.urandom(n)
        assert k.hmac_sha256(key, data) == hmac.digest(key, data, "sha256")
    arr = np.frombuffer(data[:800], np.uint64)  # any contiguous buffer, read as bytes
    assert k.hmac_sha256(b"k", arr) == hmac.digest(b"k", data[:800], "sha256")
    assert k.hmac_sha256(b"k", b"") == hmac.digest(b"k", b"", "sha256")


# --- oracles on whole pages ----------------------------------------------------------------------


def test_xts_pages_against_cryptography(k):
    rng = np.random.default_rng(1)
    key = os.urandom(32)
    src = rand_pages(rng, 5)
    tweaks = rng.integers(0, 2**64, size=5, dtype=np.uint64)
    enc = np.empty_like(src)
    k.xts_encrypt(key, src, enc, tweaks)
    for i in range(5):
        c = Cipher(algorithms.AES(key), modes.XTS(le128(int(tweaks[i]))))
        assert enc[i].tobytes() == c.encryptor().update(src[i].tobytes())
    dec = np.empty_like(src)
    k.xts_decrypt(key, enc, dec, tweaks)
    assert np.array_equal(dec, src)


def test_xts_gather_scatter_and_in_place(k):
    rng = np.random.default_rng(2)
    key = os.urandom(32)
    mem = rand_pages(rng, 20)
    tweaks = np.arange(20, dtype=np.uint64) << np.uint64(12)
    ref = np.empty_like(mem)
    k.xts_encrypt(key, mem, ref, tweaks)
    si = rng.permutation(20)[:7].astype(np.int64)
    di = rng.permutation(30)[:7].astype(np.int64)
    dst = np.zeros((30, PAGE), np.uint8)
    k.xts_encrypt(key, mem, dst, tweaks[si], si, di)
    assert np.array_equal(dst[di], ref[si])
    untouched = np.setdiff1d(np.arange(30), di)
    assert not dst[untouched].any()
    inplace = mem.copy()
    k.xts_encrypt(key, inplace, inplace, tweaks)
    assert np.array_equal(inplace, ref)


def test_tweak_is_the_host_address(k):
    # The memory controller's physical-address tweak: the same plaintext at another host address
    # gives other ciphertext.
    key = os.urandom(32)
    page = np.zeros((2, PAGE), np.uint8)
    out = np.empty_like(page)
    k.xts_encrypt(key, page, out, np.array([0x1000, 0x2000], np.uint64))
    assert not np.array_equal(out[0], out[1])


# --- transport pipeline --------------------------------------------------------------------------


def _keys():
    return os.urandom(32), os.urandom(16), os.urandom(16)


def _send(k, vek, tek, tik, mem, index, tweaks, ivs=None, threads=None):
    n = len(tweaks)
    headers = np.zeros((n, HEADER), np.uint8)
    trans = np.zeros((n, PAGE), np.uint8)
    k.send_pages(vek, tek, tik, mem, index, tweaks, headers, trans, ivs, threads=threads)
    return headers, trans


def test_send_packet_format(k):
    rng = np.random.default_rng(3)
    vek, tek, tik = _keys()
    mem = rand_pages(rng, 4)
    tweaks = np.array([0x5000, 0x7000], np.uint64)
    index = np.array([3, 1], np.int64)
    ivs = os.urandom(32)
    headers, trans = _send(k, vek, tek, tik, mem, index, tweaks, ivs)
    for i in range(2):
        plain = (
            Cipher(algorithms.AES(vek), modes.XTS(le128(int(tweaks[i])))).decryptor().update(mem[index[i]].tobytes())
        )
        iv = ivs[16 * i : 16 * i + 16]
        ct = Cipher(algorithms.AES(tek), modes.CTR(iv)).encryptor().update(plain)
        assert trans[i].tobytes() == ct
        aad = b"\x02" + struct.pack("<I", 0) + iv + struct.pack("<II", PAGE, PAGE)
        assert headers[i].tobytes() == struct.pack("<I", 0) + iv + hmac.digest(tik, aad + ct, "sha256")
    fields = headers.view(packet.PACKET_HEADER)[:, 0]  # csev.packet's declaration reads the same
    assert not fields["flags"].any() and fields["iv"].tobytes() == ivs


@pytest.mark.parametrize("base", [0, 8, 4, 1])
def test_send_into_stream_records_at_every_alignment(k, base):
    """Rows strided like migration records (4168 bytes, TRANS at 8 mod 16 in every other record) and
    at odd bases: the output equals the contiguous one, and the bytes around each row are untouched."""
    from pysev.migration.stream import ENC_PAGE_RECORD

    rng = np.random.default_rng(30 + base)
    vek, tek, tik = _keys()
    n = 9
    mem = rand_pages(rng, n)
    tweaks = rng.integers(0, 2**40, size=n, dtype=np.uint64) << np.uint64(12)
    ivs = os.urandom(16 * n)
    headers, trans = _send(k, vek, tek, tik, mem, None, tweaks, ivs)
    raw = np.frombuffer(rng.bytes(n * ENC_PAGE_RECORD.itemsize + 64), np.uint8).copy()
    rec = raw[base : base + n * ENC_PAGE_RECORD.itemsize].view(ENC_PAGE_RECORD)
    before = rec.copy()
    k.send_pages(vek, tek, tik, mem, None, tweaks, rec["hdr"], rec["trans"], ivs)
    assert np.array_equal(rec["trans"], trans) and np.array_equal(rec["hdr"], headers)
    for field in ("header", "subtype", "hdr_len", "trans_len"):
        assert np.array_equal(rec[field], before[field]), field


@pytest.mark.parametrize("ring", [1, 3, 7, 20, 64])
def test_send_through_a_ring_equals_the_batch(k, ring):
    """``on_slice``: the batch comes out ``ring`` packets at a time into the same rows (records of the
    wire layout, ordinary stores), each slice handed over in order before the rows are reused; the
    packets are those of the whole batch at once."""
    from pysev.migration.stream import ENC_PAGE_RECORD

    rng = np.random.default_rng(40 + ring)
    vek, tek, tik = _keys()
    n = 20
    mem = rand_pages(rng, 32)
    index = rng.permutation(32)[:n].astype(np.int64)
    tweaks = rng.integers(0, 2**40, size=n, dtype=np.uint64) << np.uint64(12)
    ivs = os.urandom(16 * n)
    headers, trans = _send(k, vek, tek, tik, mem, index, tweaks, ivs)
    rec = np.zeros(ring, ENC_PAGE_RECORD)
    got_h, got_t, calls = np.zeros_like(headers), np.zeros_like(trans), []

    def on_slice(start, stop):
        calls.append((start, stop))
        got_h[start:stop] = rec["hdr"][: stop - start]
        got_t[start:stop] = rec["trans"][: stop - start]

    k.send_pages(
        vek,
        tek,
        tik,
        mem,
        index,
        tweaks,
        rec["hdr"],
        rec["trans"],
        ivs,
        threads=1,
        nontemporal=False,
        on_slice=on_slice,
    )
    step = min(ring, n)
    assert calls == [(a, min(a + step, n)) for a in range(0, n, step)]
    assert np.array_equal(got_h, headers) and np.array_equal(got_t, trans)
    assert not rec["header"].any() and not rec["trans_len"].any()  # only hdr/trans are written


def test_send_ring_stops_at_a_failing_consumer_and_checks_its_arguments(k):
    rng = np.random.default_rng(41)
    vek, tek, tik = _keys()
    mem = rand_pages(rng, 8)
    tweaks = np.arange(8, dtype=np.uint64) << np.uint64(12)
    h, t = np.zeros((2, HEADER), np.uint8), np.zeros((2, PAGE), np.uint8)
    calls = []

    def failing(start, stop):
        calls.append((start, stop))
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        k.send_pages(vek, tek, tik, mem, None, tweaks, h, t, on_slice=failing)
    assert calls == [(0, 2)]  # nothing produced after the consumer failed
    with pytest.raises(ValueError, match="calling thread"):
        k.send_pages(vek, tek, tik, mem, None, tweaks, h, t, threads=2, on_slice=lambda a, b: None)
    with pytest.raises(TypeError, match="callable"):
        k.send_pages(vek, tek, tik, mem, None, tweaks, h, t, on_slice=42)
    with pytest.raises(ValueError, match="headers"):
        k.send_pages(vek, tek, tik, mem, None, tweaks, h[:1], t, on_slice=lambda a, b: None)


def test_send_fresh_ivs(k):
    vek, tek, tik = _keys()
    mem = np.zeros((2, PAGE), np.uint8)
    headers, trans = _send(k, vek, tek, tik, mem, None, np.array([0, 0], np.uint64))
    assert headers[0, 4:20].tobytes() != headers[1, 4:20].tobytes()
    assert trans[0].tobytes() != trans[1].tobytes()


def test_receive_statuses_and_isolation(k):
    rng = np.random.default_rng(4)
    vek_a, tek, tik = _keys()
    vek_b = os.urandom(32)
    n = 8
    plain = rand_pages(rng, n)
    tw_a = rng.integers(0, 2**52, size=n, dtype=np.uint64) << np.uint64(12)
    mem_a = np.empty_like(plain)
    k.xts_encrypt(vek_a, plain, mem_a, tw_a)
    headers, trans = _send(k, vek_a, tek, tik, mem_a, None, tw_a)
    headers[1, 0] |= 1  # COMPRESSED (checked first, even with a bad MAC)
    headers[1, 30] ^= 1
    headers[2, 40] ^= 0x80  # MAC
    trans[3, 4095] ^= 1  # ciphertext
    headers[4, 7] ^= 1  # IV
    headers[5, 2] ^= 4  # FLAGS other than COMPRESSED: covered by the MAC
    tw_b = (np.arange(n, dtype=np.uint64) + np.uint64(100)) << np.uint64(12)
    dest_rows = np.array([9, 8, 7, 6, 5, 4, 3, 2], np.int64)
    mem_b = rand_pages(rng, 10)
    before = mem_b.copy()
    status = k.receive_pages(vek_b, tek, tik, headers, trans, mem_b, dest_rows, tw_b)
    assert status.dtype == np.uint32 and status.shape == (n,)
    assert status.tolist() == [0, UNSUPPORTED, BAD_MEASUREMENT, BAD_MEASUREMENT, BAD_MEASUREMENT, BAD_MEASUREMENT, 0, 0]
    for i in range(n):
        row = dest_rows[i]
        if status[i]:
            assert np.array_equal(mem_b[row], before[row])  # a bad packet writes nothing
        else:
            out = np.empty((1, PAGE), np.uint8)
            k.xts_decrypt(vek_b, mem_b, out, tw_b[i : i + 1], np.array([row], np.int64))
            assert np.array_equal(out[0], plain[i])
    assert np.array_equal(mem_b[:2], before[:2])  # rows nobody targets


def test_native_and_twin_threads_agree(native):
    rng = np.random.default_rng(5)
    vek, tek, tik = _keys()
    n = 300
    mem = rand_pages(rng, n + 20)
    index = rng.permutation(n + 20)[:n].astype(np.int64)
    tweaks = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    ivs = os.urandom(16 * n)
    outs = [
        _send(kk, vek, tek, tik, mem, index, tweaks, ivs, threads=t)
        for kk, t in ((native, 1), (native, 2), (_fallback_crypto, None))
    ]
    for h, t in outs[1:]:
        assert np.array_equal(h, outs[0][0]) and np.array_equal(t, outs[0][1])
    headers, trans = outs[0]
    headers[77, 25] ^= 1
    mems = []
    for kk, t in ((native, 1), (native, 2), (_fallback_crypto, None)):
        m = np.zeros((n + 20, PAGE), np.uint8)
        s = kk.receive_pages(vek, tek, tik, headers, trans, m, index, tweaks, threads=t)
        assert s[77] == BAD_MEASUREMENT and np.count_nonzero(s) == 1
        mems.append(m)
    assert all(np.array_equal(m, mems[0]) for m in mems[1:])
    assert np.array_equal(mems[0][index[np.arange(n) != 77]], mem[index[np.arange(n) != 77]])
    a, b = np.zeros_like(mem), np.zeros_like(mem)
    native.xts_encrypt(vek, mem, a, tweaks, index, index, threads=1)
    native.xts_encrypt(vek, mem, b, tweaks, index, index, threads=2)
    assert np.array_equal(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), n=st.integers(0, 12), rows=st.integers(12, 24))
def test_property_migration_between_hosts(native, data, n, rows):
    """Send on host A → receive on host B: B's page decrypts (under B's VEK) to A's plaintext."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    vek_a, tek, tik = (data.draw(st.binary(min_size=s, max_size=s)) for s in (32, 16, 16))
    vek_b = data.draw(st.binary(min_size=32, max_size=32))
    if vek_a[:16] == vek_a[16:] or vek_b[:16] == vek_b[16:]:
        return
    plain = rand_pages(rng, rows)
    src = rng.permutation(rows)[:n].astype(np.int64)
    dst = rng.permutation(rows)[:n].astype(np.int64)
    tw_a = rng.integers(0, 2**64, size=rows, dtype=np.uint64)
    tw_b = rng.integers(0, 2**64, size=rows, dtype=np.uint64)
    results = []
    for kk in (native, _fallback_crypto):
        mem_a = np.empty_like(plain)
        kk.xts_encrypt(vek_a, plain, mem_a, tw_a)
        ivs = bytes(rng.integers(0, 256, 16 * n, dtype=np.uint8)) if kk is native else results[0][0]
        headers, trans = _send(kk, vek_a, tek, tik, mem_a, src, tw_a[src], ivs)
        mem_b = np.zeros((rows, PAGE), np.uint8)
        status = kk.receive_pages(vek_b, tek, tik, headers, trans, mem_b, dst, tw_b[dst])
        assert not status.any()
        back = np.zeros((n, PAGE), np.uint8)
        kk.xts_decrypt(vek_b, mem_b, back, tw_b[dst], dst)
        assert np.array_equal(back, plain[src])
        results.append((ivs, headers, trans, mem_b))
    for x, y in zip(results[0][1:], results[1][1:], strict=True):
        assert np.array_equal(x, y)


# --- key wrapping (SEND_START / RECEIVE_START, #55766; sev_channel.c) ------------------------------


def test_wrap_unwrap(k):
    kek, kik, iv, tek, tik = (os.urandom(16) for _ in range(5))
    wrapped, mac = k.wrap_tk(kek, kik, iv, tek, tik)
    assert wrapped == Cipher(algorithms.AES(kek), modes.CTR(iv)).encryptor().update(tek + tik)
    assert mac == hmac.digest(kik, wrapped, "sha256")
    assert k.unwrap_tk(kek, kik, iv, wrapped, mac) == (tek, tik)
    bad = bytearray(mac)
    bad[0] ^= 1
    with pytest.raises(csev.MacError):
        k.unwrap_tk(kek, kik, iv, wrapped, bytes(bad))
    with pytest.raises(csev.MacError):
        k.unwrap_tk(kek, kik, iv, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), mac)
    assert issubclass(csev.MacError, ValueError)
    with pytest.raises(ValueError):
        k.wrap_tk(kek[:15], kik, iv, tek, tik)


# --- bad input: clear errors, memory untouched ----------------------------------------------------


def _xts_case(**over):
    rng = np.random.default_rng(6)
    args = dict(
        key=os.urandom(32),
        src=rand_pages(rng, 4),
        dst=np.zeros((4, PAGE), np.uint8),
        tweaks=np.arange(4, dtype=np.uint64),
        src_index=None,
        dst_index=None,
    )
    args.update(over)
    return args


BAD_XTS = {
    "key-size": (dict(key=b"\x01" * 31), ValueError),
    "key-halves": (dict(key=b"\x07" * 32), ValueError),
    "key-type": (dict(key=12345), TypeError),
    "src-dtype": (dict(src=np.zeros((4, PAGE), np.int16)), ValueError),
    "src-shape": (dict(src=np.zeros((4, 2048), np.uint8)), ValueError),
    "src-noncontig": (dict(src=np.zeros((4, 2 * PAGE), np.uint8)[:, ::2]), ValueError),
    "dst-readonly": (dict(readonly=True), ValueError),
    "dst-too-few": (dict(dst=np.zeros((3, PAGE), np.uint8)), ValueError),
    "tweaks-dtype": (dict(tweaks=np.arange(4, dtype=np.int64)), ValueError),
    "tweaks-2d": (dict(tweaks=np.zeros((4, 1), np.uint64)), ValueError),
    "index-dtype": (dict(src_index=np.arange(4, dtype=np.int32)), ValueError),
    "index-len": (dict(src_index=np.arange(3, dtype=np.int64)), ValueError),
    "index-range": (dict(dst_index=np.array([0, 1, 2, 4], np.int64)), IndexError),
    "index-negative": (dict(src_index=np.array([0, -1, 2, 3], np.int64)), IndexError),
}


@pytest.mark.parametrize("case", sorted(BAD_XTS))
def test_xts_bad_input(k, case):
    over, exc = BAD_XTS[case]
    over = dict(over)
    readonly = over.pop("readonly", False)
    args = _xts_case(**over)
    dst = args["dst"]
    dst[:] = 0x5A
    dst.setflags(write=not readonly)
    before = dst.copy()
    with pytest.raises(exc):
        k.xts_encrypt(args["key"], args["src"], dst, args["tweaks"], args["src_index"], args["dst_index"])
    assert np.array_equal(dst, before)


def test_transport_bad_input_leaves_memory(k):
    rng = np.random.default_rng(7)
    vek, tek, tik = _keys()
    mem = rand_pages(rng, 4)
    tweaks = np.arange(4, dtype=np.uint64)
    headers, trans = _send(k, vek, tek, tik, mem, None, tweaks)
    target = rand_pages(rng, 4)
    before = target.copy()
    bad_calls = [
        (ValueError, dict(tik=os.urandom(15))),
        (ValueError, dict(tek=os.urandom(17))),
        (ValueError, dict(vek=b"\x05" * 32)),
        (IndexError, dict(index=np.array([0, 1, 2, 9], np.int64))),
        (IndexError, dict(index=np.array([0, 1, -2, 3], np.int64))),
        (ValueError, dict(headers=headers[:, :51].copy())),
        (ValueError, dict(trans=trans[:3])),
        (ValueError, dict(threads=0)),
    ]
    for exc, over in bad_calls:
        args = dict(
            vek=vek,
            tek=tek,
            tik=tik,
            headers=headers,
            trans=trans,
            mem=target,
            index=np.arange(4, dtype=np.int64),
            tweaks=tweaks,
            threads=None,
        )
        args.update(over)
        threads = args.pop("threads")
        with pytest.raises(exc):
            k.receive_pages(**args, threads=threads)
        assert np.array_equal(target, before)
    ro = target.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        k.receive_pages(vek, tek, tik, headers, trans, ro, None, tweaks)
    out_h, out_t = np.zeros_like(headers), np.zeros_like(trans)
    for exc, over in [
        (ValueError, dict(ivs=os.urandom(63))),
        (IndexError, dict(index=np.array([4, 0, 0, 0], np.int64))),
    ]:
        args = dict(ivs=None, index=None)
        args.update(over)
        with pytest.raises(exc):
            k.send_pages(vek, tek, tik, mem, args["index"], tweaks, out_h, out_t, args["ivs"])
        assert not out_h.any() and not out_t.any()


def test_empty_batches(k):
    vek, tek, tik = _keys()
    empty = np.zeros((0, PAGE), np.uint8)
    none = np.zeros(0, np.uint64)
    k.xts_encrypt(vek, empty, empty, none)
    k.send_pages(vek, tek, tik, empty, None, none, np.zeros((0, HEADER), np.uint8), empty)
    status = k.receive_pages(vek, tek, tik, np.zeros((0, HEADER), np.uint8), empty, empty, None, none)
    assert status.shape == (0,) and status.dtype == np.uint32


def test_native_transport_refuses_another_packet_layout(tmp_path):
    """csev._transport sizes C arrays at compile time, so it must not load beside another csev.packet."""
    _native()
    code = (
        "import csev.packet as p\n"
        "p.PACKET_MAC_SIZE = 16\n"
        "try:\n"
        "    import csev._transport\n"
        "except ImportError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {**os.environ, "CSEV_PURE": "1"}  # so that importing csev loads no native kernel first
    # Run from elsewhere: ``python -c`` puts the working directory first on sys.path, and the repository
    # root holds an unbuilt csev beside the installed one.
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.startswith("refused: csev._transport was compiled for other packet field sizes")


def test_dispatch_exports():
    assert csev.PAGE_SIZE == PAGE and csev.HEADER_SIZE == HEADER
    assert (csev.PAGE_SIZE, csev.HEADER_SIZE) == (packet.PAGE_SIZE, packet.PACKET_HEADER_SIZE)
    assert csev.MacError is errors.MacError
    assert csev.default_threads() >= 1
    assert csev.BACKEND == "python" or csev.BACKEND.startswith("libcrypto:")
