"""Key wrapping and one-shot primitives of the SEV session: SEND_START / RECEIVE_START (#55766; AMD's
firmware source ``sev_channel.c``).

WRAP_TK = AES-128-CTR(KEK, WRAP_IV)(TEK ‖ TIK); WRAP_MAC = HMAC-SHA256(KIK, WRAP_TK). Unwrapping
checks the MAC in constant time first and raises ``csev.MacError`` on mismatch (the firmware's
BAD_MEASUREMENT), before anything is decrypted.

``hmac_sha256`` is RFC 2104 HMAC built on OpenSSL's SHA-256 (keys longer than the 64-byte block are
hashed first), validated by the RFC 4231 vectors in the tests.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t

from csev._libcrypto cimport (
    AES_128_CTR, ERR_EVP, OK, EVP_CIPHER_CTX, Hmac, cipher_free, cipher_new, cipher_set_iv,
    cipher_update,
    ct_equal, error_for, hmac_begin, hmac_end, hmac_free, hmac_init, hmac_update, key_bytes,
)

from csev import _libcrypto
from csev.errors import MacError

if not _libcrypto.AVAILABLE:
    raise ImportError(f"csev._wrap needs libcrypto: {_libcrypto.REASON}")


cdef object _contiguous(object data, str name):
    try:
        m = memoryview(data)
    except TypeError:
        raise TypeError(f"{name}: expected a bytes-like object, got {type(data).__name__}") from None
    if not m.contiguous:
        raise ValueError(f"{name}: must be contiguous")
    return m.cast("B") if (m.format != "B" or m.ndim != 1) else m


cdef int _ctr(const uint8_t* key, const uint8_t* iv, const uint8_t* inp, uint8_t* out,
              size_t n) noexcept nogil:
    cdef EVP_CIPHER_CTX* ctx
    if n == 0:
        return OK
    ctx = cipher_new(AES_128_CTR, key, 1)
    if ctx == NULL:
        return ERR_EVP
    # The IV is the first counter block (SP 800-38A): pass it with the key schedule already set.
    cdef int rc = OK
    rc = cipher_set_iv(ctx, iv)
    if rc == OK:
        rc = cipher_update(ctx, out, inp, n)
    cipher_free(ctx)
    return rc


cdef int _hmac(const uint8_t* key, size_t keylen, const uint8_t* data, size_t n,
               uint8_t* mac) noexcept nogil:
    cdef Hmac h
    cdef int rc = hmac_init(&h, key, keylen)
    if rc != OK:
        return rc
    rc = hmac_begin(&h)
    if rc == OK and n:
        rc = hmac_update(&h, data, n)
    if rc == OK:
        rc = hmac_end(&h, mac)
    hmac_free(&h)
    return rc


def aes128_ctr(key, iv, data):
    """AES-128-CTR (SP 800-38A; 128-bit big-endian counter starting at ``iv``) of ``data``."""
    cdef bytes k = key_bytes(key, "key", 16)
    cdef bytes v = key_bytes(iv, "iv", 16)
    cdef const uint8_t[::1] d = _contiguous(data, "data")
    cdef size_t n = d.shape[0]
    out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    cdef const uint8_t* kp = k
    cdef const uint8_t* vp = v
    cdef const uint8_t* dp = &d[0] if n else NULL
    cdef int rc
    with nogil:
        rc = _ctr(kp, vp, dp, o, n)
    if rc != OK:
        raise error_for(rc)
    return out


def hmac_sha256(key, data):
    """HMAC-SHA256(key, data) for any key length."""
    cdef bytes k = key_bytes(key, "key", -1)
    cdef const uint8_t[::1] d = _contiguous(data, "data")
    cdef size_t n = d.shape[0]
    cdef uint8_t mac[32]
    cdef const uint8_t* kp = k
    cdef const uint8_t* dp = &d[0] if n else NULL
    cdef size_t kl = len(k)
    cdef int rc
    with nogil:
        rc = _hmac(kp, kl, dp, n, mac)
    if rc != OK:
        raise error_for(rc)
    return <bytes>mac[:32]


def wrap_tk(kek, kik, wrap_iv, tek, tik):
    """(WRAP_TK, WRAP_MAC) for the session blob: CTR(KEK, WRAP_IV)(TEK ‖ TIK), HMAC(KIK, WRAP_TK)."""
    key_bytes(kik, "kik", 16)
    cdef bytes plain = key_bytes(tek, "tek", 16) + key_bytes(tik, "tik", 16)
    wrapped = aes128_ctr(key_bytes(kek, "kek", 16), key_bytes(wrap_iv, "wrap_iv", 16), plain)
    return wrapped, hmac_sha256(kik, wrapped)


def unwrap_tk(kek, kik, wrap_iv, wrap_tk, wrap_mac):
    """(TEK, TIK) from WRAP_TK after WRAP_MAC verified in constant time; ``csev.MacError`` if not."""
    cdef bytes k = key_bytes(kek, "kek", 16)
    cdef bytes v = key_bytes(wrap_iv, "wrap_iv", 16)
    cdef bytes w = key_bytes(wrap_tk, "wrap_tk", 32)
    cdef bytes want = key_bytes(wrap_mac, "wrap_mac", 32)
    cdef bytes got = hmac_sha256(key_bytes(kik, "kik", 16), w)
    if not ct_equal(got, want, 32):
        raise MacError("wrap_mac does not match wrap_tk (BAD_MEASUREMENT)")
    plain = aes128_ctr(k, v, w)
    return plain[:16], plain[16:]
