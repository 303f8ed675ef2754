"""Plain-Python/numpy twins of the csev crypto kernels: same signatures, same outputs, same errors.

They serve when libcrypto cannot be loaded (or ``CSEV_PURE=1``) and are the reference the native
kernels are tested against. No home-written primitives: AES is pycryptodome's (ECB for XTS, CTR),
HMAC-SHA256 is the stdlib's. pycryptodome has no XTS mode, so XTS (IEEE 1619) is composed here from
AES-ECB and the GF(2^128) tweak chain, vectorised with numpy across all pages of a batch.
"""

from __future__ import annotations

import hmac
import os

import numpy as np
from Crypto.Cipher import AES

from csev.errors import MacError
from csev.packet import (
    PACKET_FLAG_COMPRESSED,
    PACKET_FLAGS_OFFSET,
    PACKET_HEADER_SIZE,
    PACKET_IV_OFFSET,
    PACKET_IV_SIZE,
    PACKET_MAC_OFFSET,
    PACKET_MAC_SIZE,
    PAGE_SIZE,
)

# The header's fields as slices of one packet header (csev.packet).
_FLAGS = slice(PACKET_FLAGS_OFFSET, PACKET_IV_OFFSET)
_IV = slice(PACKET_IV_OFFSET, PACKET_IV_OFFSET + PACKET_IV_SIZE)
_MAC = slice(PACKET_MAC_OFFSET, PACKET_MAC_OFFSET + PACKET_MAC_SIZE)
_BLOCKS = PAGE_SIZE // 16
_CTX_DATA = 0x02
_STATUS_SUCCESS = 0x00
_STATUS_BAD_MEASUREMENT = 0x0B
_STATUS_UNSUPPORTED = 0x15
_XTS_MAX_UNIT = 1 << 24
_GF_POLY = 0x87  # x^128 + x^7 + x^2 + x + 1
_BATCH = 4096  # pages per numpy step (bounds the tweak table to 16 MiB)


# --- argument checks (mirror csev._libcrypto's, message for message) ---------------------------


def _view(a, name: str) -> memoryview:
    try:
        return memoryview(a)
    except TypeError:
        raise TypeError(f"{name}: expected a buffer (numpy array), got {type(a).__name__}") from None


def _fmt(m: memoryview) -> str:
    return m.format[1:] if m.format[:1] in ("@", "=", "<") else m.format


def _pages(a, name: str, width: int, min_rows: int, writable: bool, rows_may_stride: bool = False) -> np.ndarray:
    m = _view(a, name)
    shape, strides = m.shape or (), m.strides or ()  # typed Optional; a memoryview always has both
    if _fmt(m) != "B" or m.itemsize != 1:
        raise ValueError(f"{name}: expected dtype uint8, got buffer format {m.format!r}")
    if m.ndim != 2 or shape[1] != width:
        raise ValueError(f"{name}: expected shape (n, {width}), got {shape}")
    if rows_may_stride:
        if strides[1] != 1 or strides[0] < width:
            raise ValueError(f"{name}: rows must be contiguous and must not overlap")
    elif not m.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if writable and m.readonly:
        raise ValueError(f"{name}: is read-only")
    if shape[0] < min_rows:
        raise ValueError(f"{name}: has {shape[0]} rows, needs at least {min_rows}")
    return np.asarray(m)


def _words(a, name: str, signed: bool, length: int) -> np.ndarray:
    m = _view(a, name)
    shape = m.shape or ()  # typed Optional; a memoryview always has one
    want = "int64" if signed else "uint64"
    if _fmt(m) not in (("q", "l") if signed else ("Q", "L")) or m.itemsize != 8:
        raise ValueError(f"{name}: expected dtype {want}, got buffer format {m.format!r}")
    if m.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got {m.ndim} dimensions")
    if not m.c_contiguous:
        raise ValueError(f"{name}: must be contiguous")
    if length >= 0 and shape[0] != length:
        raise ValueError(f"{name}: has {shape[0]} entries, expected {length}")
    return np.asarray(m).view(np.int64 if signed else np.uint64)


def _rows(idx: np.ndarray | None, k: int, nrows: int, name: str) -> np.ndarray:
    if idx is None:
        return np.arange(k, dtype=np.int64)
    bad = np.flatnonzero((idx < 0) | (idx >= nrows))
    if bad.size:
        i = int(bad[0])
        raise IndexError(f"{name}[{i}] = {int(idx[i])} is out of range for {nrows} rows")
    return idx


def _key(key, name: str, size: int) -> bytes:
    b = bytes(_view(key, name))
    if size >= 0 and len(b) != size:
        raise ValueError(f"{name}: must be {size} bytes, got {len(b)}")
    return b


def _xts_key(key, name: str = "key") -> bytes:
    k = _key(key, name, 32)
    if k[:16] == k[16:]:
        raise ValueError(f"{name}: the two AES-128 halves of an XTS key must differ")
    return k


def _threads(threads) -> int:
    """Validated like the native kernels'; the twins run single-threaded whatever the value."""
    if threads is None:
        return 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    return threads


def _bytes_of(data, name: str) -> memoryview:
    try:
        m = memoryview(data)
    except TypeError:
        raise TypeError(f"{name}: expected a bytes-like object, got {type(data).__name__}") from None
    if not m.contiguous:
        raise ValueError(f"{name}: must be contiguous")
    return m.cast("B") if (m.format != "B" or m.ndim != 1) else m


# --- XTS (IEEE 1619) from AES-ECB + the tweak chain -------------------------------------------


def _xts_pages(key: bytes, pages: np.ndarray, tweaks: np.ndarray, encrypt: bool) -> np.ndarray:
    """XTS of k whole pages (uint8[k, 4096]) at LE128 tweaks (uint64[k]); returns uint8[k, 4096]."""
    k = pages.shape[0]
    out = np.empty((k, PAGE_SIZE), dtype=np.uint8)
    data_key = AES.new(key[:16], AES.MODE_ECB)
    tweak_key = AES.new(key[16:], AES.MODE_ECB)
    for b in range(0, k, _BATCH):
        n = min(_BATCH, k - b)
        t0 = np.zeros((n, 2), dtype="<u8")
        t0[:, 0] = tweaks[b : b + n]
        t0 = np.frombuffer(tweak_key.encrypt(t0.tobytes()), dtype="<u8").reshape(n, 2)
        chain = np.empty((n, _BLOCKS, 2), dtype="<u8")  # T_j = T_0 · α^j, little-endian halves
        chain[:, 0] = t0
        for j in range(1, _BLOCKS):
            lo, hi = chain[:, j - 1, 0], chain[:, j - 1, 1]
            chain[:, j, 1] = (hi << np.uint64(1)) | (lo >> np.uint64(63))
            chain[:, j, 0] = (lo << np.uint64(1)) ^ ((hi >> np.uint64(63)) * np.uint64(_GF_POLY))
        x = pages[b : b + n].view("<u8").reshape(n, _BLOCKS, 2) ^ chain
        y = (data_key.encrypt if encrypt else data_key.decrypt)(x.tobytes())
        out[b : b + n] = (
            (np.frombuffer(y, dtype="<u8").reshape(n, _BLOCKS, 2) ^ chain).view(np.uint8).reshape(n, PAGE_SIZE)
        )
    return out


def _gf_double(t: int) -> int:
    t <<= 1
    return (t ^ _GF_POLY) & ((1 << 128) - 1) if t >> 128 else t


def xts_crypt_raw(key, tweak, data, encrypt=True) -> bytes:
    """One XTS data unit of any length >= 16 with an explicit 16-byte tweak (test vectors only)."""
    k = _xts_key(key)
    tw = _key(tweak, "tweak", 16)
    inp = _key(data, "data", -1)
    n = len(inp)
    if n < 16 or n > _XTS_MAX_UNIT:
        raise ValueError(f"data: an XTS data unit is 16..{_XTS_MAX_UNIT} bytes, got {n}")
    data_key = AES.new(k[:16], AES.MODE_ECB)
    t = int.from_bytes(AES.new(k[16:], AES.MODE_ECB).encrypt(tw), "little")
    tweaks = []
    for _ in range(n // 16 + 1):
        tweaks.append(t.to_bytes(16, "little"))
        t = _gf_double(t)

    def block(b: bytes, j: int) -> bytes:
        x = bytes(p ^ q for p, q in zip(b, tweaks[j], strict=True))
        y = (data_key.encrypt if encrypt else data_key.decrypt)(x)
        return bytes(p ^ q for p, q in zip(y, tweaks[j], strict=True))

    m, r = divmod(n, 16)
    out = [block(inp[16 * j : 16 * j + 16], j) for j in range(m - (1 if r else 0))]
    if r:  # ciphertext stealing (IEEE 1619 §5.3.2 / §5.4.2)
        last, tail = inp[16 * (m - 1) : 16 * m], inp[16 * m :]
        if encrypt:
            cc = block(last, m - 1)
            out += [block(tail + cc[r:], m), cc[:r]]
        else:
            pp = block(last, m)
            out += [block(tail + pp[r:], m - 1), pp[:r]]
    return b"".join(out)


def _xts_batch(encrypt, key, src, dst, tweaks, src_index, dst_index, threads) -> None:
    k_ = _xts_key(key)
    _threads(threads)
    tw = _words(tweaks, "tweaks", False, -1)
    k = tw.shape[0]
    s = _pages(src, "src", PAGE_SIZE, 0 if src_index is not None else k, False)
    d = _pages(dst, "dst", PAGE_SIZE, 0 if dst_index is not None else k, True)
    si = _words(src_index, "src_index", True, k) if src_index is not None else None
    di = _words(dst_index, "dst_index", True, k) if dst_index is not None else None
    if k == 0:
        return
    si = _rows(si, k, s.shape[0], "src_index")
    di = _rows(di, k, d.shape[0], "dst_index")
    d[di] = _xts_pages(k_, s[si], tw, encrypt)


def xts_encrypt(key, src, dst, tweaks, src_index=None, dst_index=None, *, threads=None) -> None:
    """AES-128-XTS-encrypt ``src[src_index[i]]`` into ``dst[dst_index[i]]`` at tweak ``tweaks[i]``."""
    _xts_batch(True, key, src, dst, tweaks, src_index, dst_index, threads)


def xts_decrypt(key, src, dst, tweaks, src_index=None, dst_index=None, *, threads=None) -> None:
    """AES-128-XTS-decrypt ``src[src_index[i]]`` into ``dst[dst_index[i]]`` at tweak ``tweaks[i]``."""
    _xts_batch(False, key, src, dst, tweaks, src_index, dst_index, threads)


# --- CTR, HMAC, key wrapping (SEND_START / RECEIVE_START, #55766; sev_channel.c) ----------------


def _ctr(key: bytes, iv: bytes, data) -> bytes:
    """SP 800-38A CTR, 128-bit counter wrapping mod 2^128 like OpenSSL (pycryptodome would raise)."""
    n = len(data)
    room = ((1 << 128) - int.from_bytes(iv, "big")) * 16
    head = AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=iv).encrypt(data[:room])
    if n <= room:
        return head
    return head + AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=bytes(16)).encrypt(data[room:])


def aes128_ctr(key, iv, data) -> bytes:
    """AES-128-CTR (SP 800-38A; 128-bit big-endian counter starting at ``iv``) of ``data``."""
    k = _key(key, "key", 16)
    v = _key(iv, "iv", 16)
    return _ctr(k, v, _bytes_of(data, "data"))


def hmac_sha256(key, data) -> bytes:
    """HMAC-SHA256(key, data) for any key length."""
    return hmac.digest(_key(key, "key", -1), _bytes_of(data, "data"), "sha256")


def wrap_tk(kek, kik, wrap_iv, tek, tik) -> tuple[bytes, bytes]:
    """(WRAP_TK, WRAP_MAC) for the session blob: CTR(KEK, WRAP_IV)(TEK ‖ TIK), HMAC(KIK, WRAP_TK)."""
    _key(kik, "kik", 16)
    plain = _key(tek, "tek", 16) + _key(tik, "tik", 16)
    wrapped = aes128_ctr(_key(kek, "kek", 16), _key(wrap_iv, "wrap_iv", 16), plain)
    return wrapped, hmac_sha256(kik, wrapped)


def unwrap_tk(kek, kik, wrap_iv, wrap_tk, wrap_mac) -> tuple[bytes, bytes]:
    """(TEK, TIK) from WRAP_TK after WRAP_MAC verified in constant time; ``csev.MacError`` if not."""
    k = _key(kek, "kek", 16)
    v = _key(wrap_iv, "wrap_iv", 16)
    w = _key(wrap_tk, "wrap_tk", 32)
    want = _key(wrap_mac, "wrap_mac", 32)
    if not hmac.compare_digest(hmac_sha256(_key(kik, "kik", 16), w), want):
        raise MacError("wrap_mac does not match wrap_tk (BAD_MEASUREMENT)")
    plain = aes128_ctr(k, v, w)
    return plain[:16], plain[16:]


# --- SEND/RECEIVE_UPDATE_DATA (#55766; sev_mcmd.c, sev_channel.c) -------------------------------


def _aad(flags: bytes | bytearray, iv: bytes) -> bytes:
    """What the MAC covers before the ciphertext: CTX ‖ LE32 FLAGS ‖ IV ‖ LE32 len_a ‖ LE32 len_b."""
    size = PAGE_SIZE.to_bytes(4, "little")
    return bytes([_CTX_DATA]) + flags + iv + size + size


def _keys(vek, tek, tik) -> tuple[bytes, bytes, bytes]:
    return _xts_key(vek, "vek"), _key(tek, "tek", 16), _key(tik, "tik", 16)


def send_pages(
    vek,
    tek,
    tik,
    mem,
    index,
    tweaks,
    headers,
    trans,
    ivs=None,
    *,
    threads=None,
    nontemporal: bool = True,
    on_slice=None,
) -> None:
    """SEND_UPDATE_DATA for ``k = len(tweaks)`` pages ``mem[index[i]]`` into ``headers[i]``/``trans[i]``.

    ``ivs``: None for fresh random IVs, else a C-contiguous buffer of ``16 * k`` bytes.
    ``nontemporal``: a store hint for the native kernel; the output is the same either way.
    ``on_slice``: ``headers``/``trans`` are a ring of ``n = len(trans)`` rows: page i goes to row
    ``i % n``, and after each ``n`` pages (and the last) ``on_slice(start, stop)`` consumes rows
    ``[0, stop - start)``; an exception from it ends the batch.
    """
    v, t, m = _keys(vek, tek, tik)
    if on_slice is not None and threads not in (None, 1):
        raise ValueError("on_slice: the batch runs on the calling thread (threads must be None or 1)")
    _threads(threads)
    tw = _words(tweaks, "tweaks", False, -1)
    k = tw.shape[0]
    ring = k
    if on_slice is not None:
        if not callable(on_slice):
            raise TypeError("on_slice must be callable")
        ring = min(k, _pages(trans, "trans", PAGE_SIZE, 1, True, rows_may_stride=True).shape[0])
    mm = _pages(mem, "mem", PAGE_SIZE, 0 if index is not None else k, False)
    h = _pages(headers, "headers", PACKET_HEADER_SIZE, ring, True, rows_may_stride=True)
    tr = _pages(trans, "trans", PAGE_SIZE, ring, True, rows_may_stride=True)
    ix = _words(index, "index", True, k) if index is not None else None
    iv_all = os.urandom(PACKET_IV_SIZE * k) if ivs is None else _key(ivs, "ivs", PACKET_IV_SIZE * k)
    if k == 0:
        return
    rows = _rows(ix, k, mm.shape[0], "index")
    hdr = bytearray(PACKET_HEADER_SIZE)  # FLAGS = 0: no compression
    for start in range(0, k, ring):
        stop = min(start + ring, k)
        plain = _xts_pages(v, mm[rows[start:stop]], tw[start:stop], False)
        for i in range(start, stop):
            iv = iv_all[PACKET_IV_SIZE * i : PACKET_IV_SIZE * (i + 1)]
            ct = _ctr(t, iv, plain[i - start].data)
            tr[i - start] = np.frombuffer(ct, dtype=np.uint8)
            hdr[_IV] = iv
            hdr[_MAC] = hmac.digest(m, _aad(hdr[_FLAGS], iv) + ct, "sha256")
            h[i - start] = np.frombuffer(hdr, np.uint8)
        if on_slice is not None:
            on_slice(start, stop)


def receive_pages(vek, tek, tik, headers, trans, mem, index, tweaks, *, threads=None) -> np.ndarray:
    """RECEIVE_UPDATE_DATA for ``k = len(tweaks)`` packets into ``mem[index[i]]``; uint32[k] statuses."""
    v, t, m = _keys(vek, tek, tik)
    _threads(threads)
    tw = _words(tweaks, "tweaks", False, -1)
    k = tw.shape[0]
    h = _pages(headers, "headers", PACKET_HEADER_SIZE, k, False, rows_may_stride=True)
    tr = _pages(trans, "trans", PAGE_SIZE, k, False, rows_may_stride=True)
    mm = _pages(mem, "mem", PAGE_SIZE, 0 if index is not None else k, True)
    ix = _words(index, "index", True, k) if index is not None else None
    status = np.zeros(k, dtype=np.uint32)
    if k == 0:
        return status
    rows = _rows(ix, k, mm.shape[0], "index")
    good: list[int] = []
    plain = np.empty((k, PAGE_SIZE), dtype=np.uint8)
    for i in range(k):
        hdr = h[i].tobytes()
        if int.from_bytes(hdr[_FLAGS], "little") & PACKET_FLAG_COMPRESSED:  # as in the firmware
            status[i] = _STATUS_UNSUPPORTED
            continue
        ct = tr[i].tobytes()
        mac = hmac.digest(m, _aad(hdr[_FLAGS], hdr[_IV]) + ct, "sha256")
        if not hmac.compare_digest(mac, hdr[_MAC]):  # the MAC before decrypting
            status[i] = _STATUS_BAD_MEASUREMENT
            continue
        plain[i] = np.frombuffer(_ctr(t, hdr[_IV], ct), dtype=np.uint8)
        good.append(i)
    if good:
        sel = np.asarray(good, dtype=np.int64)
        mm[rows[sel]] = _xts_pages(v, plain[sel], tw[sel], True)
    return status
