"""OpenSSL's libcrypto for the csev crypto kernels, found and bound at import time.

No home-written AES, SHA-256 or HMAC, and no OpenSSL headers at build time: this module finds the
libcrypto that Python's own ``_hashlib`` already loaded (``/proc/self/maps``, then
``ctypes.util.find_library('crypto')``), ``dlopen``s it and resolves the few EVP entry points the
kernels need into function pointers (types declared in ``_libcrypto.pxd`` over opaque structs).

``AVAILABLE`` tells whether that worked; ``REASON`` says why not. The kernel modules (``_xts``,
``_transport``, ``_wrap``) refuse to import without it, and ``csev._dispatch`` then falls back to the
plain-Python twins.

It also holds what those kernels share: argument checks (run once per call, with the GIL, before any
memory is touched) and the thread pool that splits a big batch into contiguous chunks.
"""
import os
import threading

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memset
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlerror, dlopen, dlsym

# Function-pointer types of the EVP API (OpenSSL >= 1.1.0 names and signatures).
ctypedef EVP_CIPHER_CTX* (*f_cipher_ctx_new)() noexcept nogil
ctypedef void (*f_cipher_ctx_free)(EVP_CIPHER_CTX*) noexcept nogil
ctypedef const EVP_CIPHER* (*f_cipher)() noexcept nogil
ctypedef int (*f_cipher_init_ex)(EVP_CIPHER_CTX*, const EVP_CIPHER*, ENGINE*,
                                 const unsigned char*, const unsigned char*, int) noexcept nogil
ctypedef int (*f_cipher_update)(EVP_CIPHER_CTX*, unsigned char*, int*,
                                const unsigned char*, int) noexcept nogil
ctypedef EVP_MD_CTX* (*f_md_ctx_new)() noexcept nogil
ctypedef void (*f_md_ctx_free)(EVP_MD_CTX*) noexcept nogil
ctypedef const EVP_MD* (*f_md)() noexcept nogil
ctypedef int (*f_digest_init_ex)(EVP_MD_CTX*, const EVP_MD*, ENGINE*) noexcept nogil
ctypedef int (*f_digest_update)(EVP_MD_CTX*, const void*, size_t) noexcept nogil
ctypedef int (*f_digest_final_ex)(EVP_MD_CTX*, unsigned char*, unsigned int*) noexcept nogil
ctypedef int (*f_md_ctx_copy_ex)(EVP_MD_CTX*, const EVP_MD_CTX*) noexcept nogil
ctypedef int (*f_crypto_memcmp)(const void*, const void*, size_t) noexcept nogil
ctypedef int (*f_rand_bytes)(unsigned char*, int) noexcept nogil
ctypedef unsigned long (*f_version_num)() noexcept nogil
ctypedef const char* (*f_version)(int) noexcept nogil

cdef f_cipher_ctx_new p_EVP_CIPHER_CTX_new = NULL
cdef f_cipher_ctx_free p_EVP_CIPHER_CTX_free = NULL
cdef f_cipher p_EVP_aes_128_xts = NULL
cdef f_cipher p_EVP_aes_128_ctr = NULL
cdef f_cipher_init_ex p_EVP_CipherInit_ex = NULL
cdef f_cipher_update p_EVP_CipherUpdate = NULL
cdef f_md_ctx_new p_EVP_MD_CTX_new = NULL
cdef f_md_ctx_free p_EVP_MD_CTX_free = NULL
cdef f_md p_EVP_sha256 = NULL
cdef f_digest_init_ex p_EVP_DigestInit_ex = NULL
cdef f_digest_update p_EVP_DigestUpdate = NULL
cdef f_digest_final_ex p_EVP_DigestFinal_ex = NULL
cdef f_md_ctx_copy_ex p_EVP_MD_CTX_copy_ex = NULL
cdef f_crypto_memcmp p_CRYPTO_memcmp = NULL
cdef f_rand_bytes p_RAND_bytes = NULL

cdef enum:
    SHA256_BLOCK = 64
    SHA256_LEN = 32
    # EVP_CipherUpdate takes an int length; longer inputs (CTR only) are fed in slices of this size.
    UPDATE_SLICE = 1 << 30

#: True when libcrypto was found and every entry point resolved.
AVAILABLE = False
#: Why not, when AVAILABLE is False ("" otherwise).
REASON = ""
#: Path of the libcrypto in use ("" when unavailable).
PATH = ""
#: OpenSSL_version(OPENSSL_VERSION) of that library ("" when unavailable).
VERSION = ""


def _find_libcrypto():
    """Path of the libcrypto Python's ``_hashlib`` loaded, else the system one, else None."""
    try:
        import _hashlib  # noqa: F401  (maps the libcrypto it links against)
    except ImportError:
        pass
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libcrypto.so"):
                    return fields[5].strip()
    except OSError:
        pass
    import ctypes.util
    return ctypes.util.find_library("crypto")


cdef void* _sym(void* handle, bytes name) except NULL:
    cdef void* p = dlsym(handle, name)
    if p == NULL:
        raise ImportError(f"symbol {name.decode()} missing")
    return p


cdef int _bind(str path) except -1:
    global p_EVP_CIPHER_CTX_new, p_EVP_CIPHER_CTX_free, p_EVP_aes_128_xts, p_EVP_aes_128_ctr
    global p_EVP_CipherInit_ex, p_EVP_CipherUpdate, p_EVP_MD_CTX_new, p_EVP_MD_CTX_free
    global p_EVP_sha256, p_EVP_DigestInit_ex, p_EVP_DigestUpdate, p_EVP_DigestFinal_ex
    global p_EVP_MD_CTX_copy_ex, p_CRYPTO_memcmp, p_RAND_bytes, VERSION
    cdef bytes bpath = os.fsencode(path)
    cdef void* h = dlopen(bpath, RTLD_NOW | RTLD_LOCAL)
    if h == NULL:
        err = dlerror()
        raise ImportError(f"dlopen({path}) failed: {err.decode(errors='replace') if err else '?'}")
    # Never dlclose: the handle is shared with _hashlib and lives as long as the process.
    cdef f_version_num version_num = <f_version_num>_sym(h, b"OpenSSL_version_num")
    if version_num() < 0x10100000:
        raise ImportError(f"{path} is older than OpenSSL 1.1.0")
    VERSION = (<f_version>_sym(h, b"OpenSSL_version"))(0).decode(errors="replace")
    p_EVP_CIPHER_CTX_new = <f_cipher_ctx_new>_sym(h, b"EVP_CIPHER_CTX_new")
    p_EVP_CIPHER_CTX_free = <f_cipher_ctx_free>_sym(h, b"EVP_CIPHER_CTX_free")
    p_EVP_aes_128_xts = <f_cipher>_sym(h, b"EVP_aes_128_xts")
    p_EVP_aes_128_ctr = <f_cipher>_sym(h, b"EVP_aes_128_ctr")
    p_EVP_CipherInit_ex = <f_cipher_init_ex>_sym(h, b"EVP_CipherInit_ex")
    p_EVP_CipherUpdate = <f_cipher_update>_sym(h, b"EVP_CipherUpdate")
    p_EVP_MD_CTX_new = <f_md_ctx_new>_sym(h, b"EVP_MD_CTX_new")
    p_EVP_MD_CTX_free = <f_md_ctx_free>_sym(h, b"EVP_MD_CTX_free")
    p_EVP_sha256 = <f_md>_sym(h, b"EVP_sha256")
    p_EVP_DigestInit_ex = <f_digest_init_ex>_sym(h, b"EVP_DigestInit_ex")
    p_EVP_DigestUpdate = <f_digest_update>_sym(h, b"EVP_DigestUpdate")
    p_EVP_DigestFinal_ex = <f_digest_final_ex>_sym(h, b"EVP_DigestFinal_ex")
    p_EVP_MD_CTX_copy_ex = <f_md_ctx_copy_ex>_sym(h, b"EVP_MD_CTX_copy_ex")
    p_CRYPTO_memcmp = <f_crypto_memcmp>_sym(h, b"CRYPTO_memcmp")
    p_RAND_bytes = <f_rand_bytes>_sym(h, b"RAND_bytes")
    return 0


def _load():
    global AVAILABLE, REASON, PATH
    path = _find_libcrypto()
    if not path:
        REASON = "no libcrypto mapped by _hashlib and none found by ctypes.util.find_library('crypto')"
        return
    try:
        _bind(path)
    except ImportError as exc:
        REASON = f"{path}: {exc}"
        return
    AVAILABLE, PATH = True, path


_load()


# --- ciphers ----------------------------------------------------------------------------------

cdef EVP_CIPHER_CTX* cipher_new(int kind, const uint8_t* key, int enc) noexcept nogil:
    cdef EVP_CIPHER_CTX* ctx = p_EVP_CIPHER_CTX_new()
    if ctx == NULL:
        return NULL
    cdef const EVP_CIPHER* cipher = p_EVP_aes_128_xts() if kind == AES_128_XTS else p_EVP_aes_128_ctr()
    if p_EVP_CipherInit_ex(ctx, cipher, NULL, key, NULL, enc) != 1:
        p_EVP_CIPHER_CTX_free(ctx)
        return NULL
    return ctx


cdef void cipher_free(EVP_CIPHER_CTX* ctx) noexcept nogil:
    if ctx != NULL:
        p_EVP_CIPHER_CTX_free(ctx)


cdef int cipher_set_iv(EVP_CIPHER_CTX* ctx, const uint8_t* iv) noexcept nogil:
    # Key schedule kept; only the IV/tweak (and the stream position) is reset (enc = -1: unchanged).
    return OK if p_EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) == 1 else ERR_EVP


cdef int cipher_update(EVP_CIPHER_CTX* ctx, uint8_t* out, const uint8_t* inp, size_t n) noexcept nogil:
    cdef int outl = 0
    cdef int part
    while True:
        part = <int>(n if n < UPDATE_SLICE else UPDATE_SLICE)
        if p_EVP_CipherUpdate(ctx, out, &outl, inp, part) != 1 or outl != part:
            return ERR_EVP
        n -= part
        if n == 0:
            return OK
        out += part
        inp += part


# --- HMAC-SHA256 (RFC 2104 over OpenSSL's SHA-256) ---------------------------------------------

cdef int _sha256(const uint8_t* data, size_t n, uint8_t* digest) noexcept nogil:
    cdef EVP_MD_CTX* ctx = p_EVP_MD_CTX_new()
    cdef int rc = ERR_EVP
    if ctx == NULL:
        return ERR_NOMEM
    if (p_EVP_DigestInit_ex(ctx, p_EVP_sha256(), NULL) == 1
            and p_EVP_DigestUpdate(ctx, data, n) == 1
            and p_EVP_DigestFinal_ex(ctx, digest, NULL) == 1):
        rc = OK
    p_EVP_MD_CTX_free(ctx)
    return rc


cdef int _pad_state(EVP_MD_CTX* ctx, const uint8_t* k0, uint8_t pad) noexcept nogil:
    cdef uint8_t block[SHA256_BLOCK]
    cdef int i
    for i in range(SHA256_BLOCK):
        block[i] = k0[i] ^ pad
    cdef int ok = (p_EVP_DigestInit_ex(ctx, p_EVP_sha256(), NULL) == 1
                   and p_EVP_DigestUpdate(ctx, block, SHA256_BLOCK) == 1)
    memset(block, 0, SHA256_BLOCK)
    return OK if ok else ERR_EVP


cdef int hmac_init(Hmac* h, const uint8_t* key, size_t keylen) noexcept nogil:
    """K0 = key zero-padded to 64 bytes (hashed first when longer); inner/outer = H state after K0^ipad/opad."""
    cdef uint8_t k0[SHA256_BLOCK]
    cdef int rc = OK
    cdef size_t i
    memset(k0, 0, SHA256_BLOCK)
    h.inner = p_EVP_MD_CTX_new()
    h.outer = p_EVP_MD_CTX_new()
    h.work = p_EVP_MD_CTX_new()
    if h.inner == NULL or h.outer == NULL or h.work == NULL:
        rc = ERR_NOMEM
    elif keylen > SHA256_BLOCK:
        rc = _sha256(key, keylen, k0)
    else:
        for i in range(keylen):
            k0[i] = key[i]
    if rc == OK:
        rc = _pad_state(h.inner, k0, 0x36)
    if rc == OK:
        rc = _pad_state(h.outer, k0, 0x5c)
    memset(k0, 0, SHA256_BLOCK)
    if rc != OK:
        hmac_free(h)
    return rc


cdef void hmac_free(Hmac* h) noexcept nogil:
    if h.inner != NULL:
        p_EVP_MD_CTX_free(h.inner)
    if h.outer != NULL:
        p_EVP_MD_CTX_free(h.outer)
    if h.work != NULL:
        p_EVP_MD_CTX_free(h.work)
    h.inner = h.outer = h.work = NULL


cdef int hmac_begin(Hmac* h) noexcept nogil:
    return OK if p_EVP_MD_CTX_copy_ex(h.work, h.inner) == 1 else ERR_EVP


cdef int hmac_update(Hmac* h, const uint8_t* data, size_t n) noexcept nogil:
    return OK if p_EVP_DigestUpdate(h.work, data, n) == 1 else ERR_EVP


cdef int hmac_end(Hmac* h, uint8_t* mac) noexcept nogil:
    cdef uint8_t ihash[SHA256_LEN]
    if (p_EVP_DigestFinal_ex(h.work, ihash, NULL) == 1
            and p_EVP_MD_CTX_copy_ex(h.work, h.outer) == 1
            and p_EVP_DigestUpdate(h.work, ihash, SHA256_LEN) == 1
            and p_EVP_DigestFinal_ex(h.work, mac, NULL) == 1):
        return OK
    return ERR_EVP


cdef bint ct_equal(const uint8_t* a, const uint8_t* b, size_t n) noexcept nogil:
    return p_CRYPTO_memcmp(a, b, n) == 0


cdef bytes random_bytes(Py_ssize_t n):
    # OpenSSL's DRBG (seeded by the OS, reseeded after fork) rather than os.urandom, which is several
    # times slower for the fresh IV every packet of a send batch needs (docs/performance.md).
    cdef bytearray buf = bytearray(n)
    cdef uint8_t[::1] view = buf
    cdef Py_ssize_t done = 0
    cdef int part
    while done < n:
        part = <int>(n - done if n - done < UPDATE_SLICE else UPDATE_SLICE)
        if p_RAND_bytes(&view[done], part) != 1:
            raise RuntimeError("csev: libcrypto RAND_bytes failed")
        done += part
    return bytes(buf)


cdef void tweak_le128(uint8_t* out, uint64_t pa) noexcept nogil:
    cdef int i
    for i in range(8):
        out[i] = <uint8_t>(pa >> (8 * i))
        out[8 + i] = 0


# --- argument checks (with the GIL, before touching memory) ------------------------------------

cdef str _fmt(object m):
    f = m.format
    return f[1:] if f[:1] in ("@", "=", "<") else f


cdef object _view(object a, str name):
    try:
        return memoryview(a)
    except TypeError:
        raise TypeError(f"{name}: expected a buffer (numpy array), got {type(a).__name__}") from None


cdef int check_pages(object a, str name, Py_ssize_t width, Py_ssize_t min_rows, bint writable,
                     bint rows_may_stride=False) except -1:
    """``rows_may_stride``: rows need only be contiguous and not overlap (e.g. the page fields of
    migration-stream records, so the pipelines read and write the wire layout in place)."""
    m = _view(a, name)
    if _fmt(m) != "B" or m.itemsize != 1:
        raise ValueError(f"{name}: expected dtype uint8, got buffer format {m.format!r}")
    if m.ndim != 2 or m.shape[1] != width:
        raise ValueError(f"{name}: expected shape (n, {width}), got {tuple(m.shape)}")
    if rows_may_stride:
        if m.strides[1] != 1 or m.strides[0] < width:
            raise ValueError(f"{name}: rows must be contiguous and must not overlap")
    elif not m.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if writable and m.readonly:
        raise ValueError(f"{name}: is read-only")
    if m.shape[0] < min_rows:
        raise ValueError(f"{name}: has {m.shape[0]} rows, needs at least {min_rows}")
    return 0


cdef int check_words(object a, str name, bint signed, Py_ssize_t length) except -1:
    m = _view(a, name)
    want = "int64" if signed else "uint64"
    if _fmt(m) not in (("q", "l") if signed else ("Q", "L")) or m.itemsize != 8:
        raise ValueError(f"{name}: expected dtype {want}, got buffer format {m.format!r}")
    if m.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got {m.ndim} dimensions")
    if not m.c_contiguous:
        raise ValueError(f"{name}: must be contiguous")
    if length >= 0 and m.shape[0] != length:
        raise ValueError(f"{name}: has {m.shape[0]} entries, expected {length}")
    return 0


cdef Py_ssize_t _first_bad(const int64_t* idx, Py_ssize_t k, Py_ssize_t nrows) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(k):
        if idx[i] < 0 or idx[i] >= nrows:
            return i
    return -1


cdef int check_rows(const int64_t* idx, Py_ssize_t k, Py_ssize_t nrows, str name) except -1:
    cdef Py_ssize_t bad = _first_bad(idx, k, nrows)
    if bad >= 0:
        raise IndexError(f"{name}[{bad}] = {idx[bad]} is out of range for {nrows} rows")
    return 0


cdef bytes key_bytes(object key, str name, Py_ssize_t size):
    cdef bytes b = bytes(_view(key, name))
    if size >= 0 and len(b) != size:
        raise ValueError(f"{name}: must be {size} bytes, got {len(b)}")
    return b


cdef object error_for(int rc):
    if rc == ERR_NOMEM:
        return MemoryError("csev: out of memory for libcrypto contexts")
    return RuntimeError("csev: a libcrypto EVP call failed")


# --- threads ----------------------------------------------------------------------------------

#: Batches smaller than this run inline in the calling thread.
INLINE_BELOW = 64
_MIN_CHUNK = 32
_pool = None
_pool_pid = 0
_pool_lock = threading.Lock()


def usable_cores():
    """CPUs this process may run on (affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads):
    """None → usable cores; otherwise a positive int."""
    if threads is None:
        return usable_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    return threads


def _executor():
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():   # a forked child has no pool threads
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(max_workers=max(1, usable_cores() - 1),
                                       thread_name_prefix="csev")
            _pool_pid = os.getpid()
        return _pool


def run_chunks(fn, Py_ssize_t k, int threads):
    """Run ``fn(start, stop)`` over contiguous chunks of ``range(k)``; the caller runs the first.

    Waits for every chunk before returning or raising, so buffers outlive all workers.
    """
    if threads <= 1 or k < INLINE_BELOW:
        fn(0, k)
        return
    cdef Py_ssize_t n = min(threads, k // _MIN_CHUNK)
    bounds = [k * i // n for i in range(n + 1)]
    pool = _executor()
    futures = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, n)]
    first_error = None
    try:
        fn(bounds[0], bounds[1])
    except BaseException as exc:
        first_error = exc
    for fut in futures:
        exc = fut.exception()
        if exc is not None and first_error is None:
            first_error = exc
    if first_error is not None:
        raise first_error
