# OpenSSL's libcrypto, resolved at import time (no OpenSSL headers at build time).
#
# The EVP types are opaque incomplete structs: csev only ever holds pointers to them. The entry
# points are function-pointer types filled in by dlsym() in _libcrypto.pyx; sibling kernel modules
# use the small cdef API below, never the raw pointers.
from libc.stdint cimport int64_t, uint8_t, uint64_t

cdef struct evp_cipher_ctx_st
cdef struct evp_cipher_st
cdef struct evp_md_ctx_st
cdef struct evp_md_st
cdef struct engine_st
ctypedef evp_cipher_ctx_st EVP_CIPHER_CTX
ctypedef evp_cipher_st EVP_CIPHER
ctypedef evp_md_ctx_st EVP_MD_CTX
ctypedef evp_md_st EVP_MD
ctypedef engine_st ENGINE

# Cipher selectors for cipher_new().
cdef enum:
    AES_128_XTS = 0   # 32-byte key (two AES-128 halves), 16-byte tweak
    AES_128_CTR = 1   # 16-byte key, 16-byte initial counter block

# Status codes of the nogil cores (0 = success); error_for() turns one into the exception to raise.
cdef enum:
    OK = 0
    ERR_NOMEM = -1
    ERR_EVP = -2

# HMAC-SHA256 (RFC 2104) over OpenSSL's SHA-256: the ipad/opad states are hashed once per key and
# copied (EVP_MD_CTX_copy_ex) for every message.
cdef struct Hmac:
    EVP_MD_CTX* inner
    EVP_MD_CTX* outer
    EVP_MD_CTX* work

# Ciphers. cipher_new returns NULL on failure; per data unit only the IV/tweak is re-initialised.
cdef EVP_CIPHER_CTX* cipher_new(int kind, const uint8_t* key, int enc) noexcept nogil
cdef void cipher_free(EVP_CIPHER_CTX* ctx) noexcept nogil
cdef int cipher_set_iv(EVP_CIPHER_CTX* ctx, const uint8_t* iv) noexcept nogil
cdef int cipher_update(EVP_CIPHER_CTX* ctx, uint8_t* out, const uint8_t* inp, size_t n) noexcept nogil

# HMAC-SHA256. All return OK or an ERR_* code; hmac_init leaves h all-NULL on failure.
cdef int hmac_init(Hmac* h, const uint8_t* key, size_t keylen) noexcept nogil
cdef void hmac_free(Hmac* h) noexcept nogil
cdef int hmac_begin(Hmac* h) noexcept nogil
cdef int hmac_update(Hmac* h, const uint8_t* data, size_t n) noexcept nogil
cdef int hmac_end(Hmac* h, uint8_t* mac) noexcept nogil

# Constant-time equality (CRYPTO_memcmp): 1 when equal.
cdef bint ct_equal(const uint8_t* a, const uint8_t* b, size_t n) noexcept nogil

# Shared argument checks (with the GIL, before any memory is touched); they raise and return -1.
cdef int check_pages(object a, str name, Py_ssize_t width, Py_ssize_t min_rows, bint writable,
                     bint rows_may_stride=*) except -1
cdef int check_words(object a, str name, bint signed, Py_ssize_t length) except -1
cdef int check_rows(const int64_t* idx, Py_ssize_t k, Py_ssize_t nrows, str name) except -1
cdef bytes key_bytes(object key, str name, Py_ssize_t size)
cdef object error_for(int rc)

# n random bytes from libcrypto's DRBG (packet IVs); raises RuntimeError on failure.
cdef bytes random_bytes(Py_ssize_t n)

# XTS tweak of a host physical address (the memory-controller model of csev._xts): 16 bytes, LE.
cdef void tweak_le128(uint8_t* out, uint64_t pa) noexcept nogil
