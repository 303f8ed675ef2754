"""AES-128-XTS over batches of 4 KiB pages: a model of the SEV memory controller, whose AES engine
takes a tweak from the host physical address (Kaplan, Powell and Woller, "AMD Memory Encryption",
AMD white paper, 2016).

Each page is one XTS data unit; its tweak is the page's host physical address as a 16-byte
little-endian integer, so the same plaintext at another host address gives other ciphertext.
The cipher is OpenSSL's (through ``csev._libcrypto``); one EVP context per call and thread, and per
page only the tweak is re-initialised: building contexts costs about as much as a page (see
``docs/performance.md``). The page size is ``csev.packet``'s.
"""
from libc.stdint cimport int64_t, uint8_t, uint64_t

from csev._libcrypto cimport (
    AES_128_XTS, ERR_EVP, OK, EVP_CIPHER_CTX, check_pages, check_rows, check_words, cipher_free,
    cipher_new, cipher_set_iv, cipher_update, error_for, key_bytes, tweak_le128,
)

from csev import _libcrypto, packet

if not _libcrypto.AVAILABLE:
    raise ImportError(f"csev._xts needs libcrypto: {_libcrypto.REASON}")

cdef Py_ssize_t PAGE = packet.PAGE_SIZE      # read once at import

cdef enum:
    XTS_MAX_UNIT = 1 << 24   # IEEE 1619 caps a data unit at 2^20 blocks


cdef bytes _xts_key(object key):
    cdef bytes k = key_bytes(key, "key", 32)
    if k[:16] == k[16:]:
        raise ValueError("key: the two AES-128 halves of an XTS key must differ")
    return k


cdef int _xts_core(const uint8_t* key, int enc, const uint8_t* src, uint8_t* dst,
                   const int64_t* sidx, const int64_t* didx, const uint64_t* tweaks,
                   Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    cdef EVP_CIPHER_CTX* ctx = cipher_new(AES_128_XTS, key, enc)
    cdef uint8_t tweak[16]
    cdef Py_ssize_t i, s, d
    cdef int rc = OK
    if ctx == NULL:
        return ERR_EVP
    for i in range(start, stop):
        s = sidx[i] if sidx != NULL else i
        d = didx[i] if didx != NULL else i
        tweak_le128(tweak, tweaks[i])
        rc = cipher_set_iv(ctx, tweak)
        if rc == OK:
            rc = cipher_update(ctx, dst + d * PAGE, src + s * PAGE, PAGE)
        if rc != OK:
            break
    cipher_free(ctx)
    return rc


cdef class _XtsJob:
    """One validated batch; ``run(start, stop)`` processes a contiguous chunk without the GIL."""
    cdef bytes key
    cdef const uint8_t* keyp
    cdef int enc
    cdef object keep            # the buffers, alive while any chunk runs
    cdef const uint8_t* src
    cdef uint8_t* dst
    cdef const int64_t* sidx
    cdef const int64_t* didx
    cdef const uint64_t* tweaks

    def run(self, Py_ssize_t start, Py_ssize_t stop):
        cdef int rc
        with nogil:
            rc = _xts_core(self.keyp, self.enc, self.src, self.dst, self.sidx, self.didx,
                           self.tweaks, start, stop)
        if rc != OK:
            raise error_for(rc)


cdef _xts_batch(int enc, object key, object src, object dst, object tweaks,
                object src_index, object dst_index, object threads):
    cdef _XtsJob job = _XtsJob()
    cdef Py_ssize_t k
    job.key = _xts_key(key)
    job.keyp = job.key
    job.enc = enc
    nthreads = _libcrypto.resolve_threads(threads)
    check_words(tweaks, "tweaks", False, -1)
    cdef const uint64_t[::1] tw = tweaks
    k = tw.shape[0]
    check_pages(src, "src", PAGE, 0 if src_index is not None else k, False)
    check_pages(dst, "dst", PAGE, 0 if dst_index is not None else k, True)
    cdef const uint8_t[:, ::1] s = src
    cdef uint8_t[:, ::1] d = dst
    cdef const int64_t[::1] si = None
    cdef const int64_t[::1] di = None
    if src_index is not None:
        check_words(src_index, "src_index", True, k)
        si = src_index
    if dst_index is not None:
        check_words(dst_index, "dst_index", True, k)
        di = dst_index
    if k == 0:
        return
    if si is not None:
        check_rows(&si[0], k, s.shape[0], "src_index")
        job.sidx = &si[0]
    if di is not None:
        check_rows(&di[0], k, d.shape[0], "dst_index")
        job.didx = &di[0]
    job.keep = (s, d, si, di, tw)
    job.src = &s[0, 0]
    job.dst = &d[0, 0]
    job.tweaks = &tw[0]
    _libcrypto.run_chunks(job.run, k, nthreads)


def xts_encrypt(key, src, dst, tweaks, src_index=None, dst_index=None, *, threads=None):
    """AES-128-XTS-encrypt ``src[src_index[i]]`` into ``dst[dst_index[i]]`` at tweak ``tweaks[i]``."""
    _xts_batch(1, key, src, dst, tweaks, src_index, dst_index, threads)


def xts_decrypt(key, src, dst, tweaks, src_index=None, dst_index=None, *, threads=None):
    """AES-128-XTS-decrypt ``src[src_index[i]]`` into ``dst[dst_index[i]]`` at tweak ``tweaks[i]``."""
    _xts_batch(0, key, src, dst, tweaks, src_index, dst_index, threads)


def xts_crypt_raw(key, tweak, data, encrypt=True):
    """One XTS data unit of any length >= 16 with an explicit 16-byte tweak (test vectors only)."""
    cdef bytes k = _xts_key(key)
    cdef bytes tw = key_bytes(tweak, "tweak", 16)
    cdef bytes inp = key_bytes(data, "data", -1)
    cdef Py_ssize_t n = len(inp)
    if n < 16 or n > XTS_MAX_UNIT:
        raise ValueError(f"data: an XTS data unit is 16..{XTS_MAX_UNIT} bytes, got {n}")
    out = bytearray(n)
    cdef uint8_t[::1] o = out
    cdef EVP_CIPHER_CTX* ctx = cipher_new(AES_128_XTS, k, 1 if encrypt else 0)
    cdef int rc = ERR_EVP
    if ctx != NULL:
        rc = cipher_set_iv(ctx, tw)
        if rc == OK:
            rc = cipher_update(ctx, &o[0], inp, n)
        cipher_free(ctx)
    if rc != OK:
        raise error_for(rc)
    return bytes(out)
