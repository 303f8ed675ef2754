"""SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA for whole batches of pages (#55766; AMD's firmware source
``sev_mcmd.c``, ``sev_channel.c``). Page and header geometry come from ``csev.packet``; the bytes are
laid out in ``docs/formats.md``. The firmware handlers that run these kernels are in
``pysev/firmware/sev/transport.py``; the KVM face (``KVM_SEV_SEND_UPDATE_DATA``) is ``pysev/kvm.py``.

Send, per page: XTS-decrypt the guest page under the VEK at its host-address tweak (the memory
controller model of ``csev._xts``) → AES-128-CTR under TEK with the packet IV → MAC =
HMAC-SHA256(TIK, 0x02 ‖ LE32(FLAGS) ‖ IV ‖ LE32(4096) ‖ LE32(4096) ‖ ciphertext). Packet header
(52 bytes) = LE32(FLAGS = 0) ‖ IV ‖ MAC.

Receive, per packet, in the firmware's order: FLAGS.COMPRESSED → UNSUPPORTED (0x15); MAC compared in
constant time before anything is decrypted → BAD_MEASUREMENT (0x0B); else CTR-decrypt into a
per-thread scratch page and XTS-encrypt that into guest memory under the destination VEK (written
out while the next packet is MACed). A bad packet writes nothing; the rest of the batch is still
applied.

The primitives are OpenSSL's (through ``csev._libcrypto``). HMAC is RFC 2104 built on OpenSSL's
SHA-256 with the ipad/opad states hashed once per call and copied per page (``EVP_MD_CTX_copy_ex``),
validated against the RFC 4231 vectors in the tests. Contexts are created once per call and thread;
per page only IVs/tweaks are re-initialised: building contexts costs about as much as a page (see
``docs/performance.md``). ``headers``/``trans``/``mem`` must not be modified by another thread while a
call runs.

Output stores: a large batch is streamed past the cache (non-temporal: nobody reads it soon, and it
would evict the guest pages being read). A ring (``on_slice``) is written with ordinary stores and
handed over slice by slice while the batch runs, so its consumer (a socket send) copies it from L2
instead of DRAM (see ``docs/performance.md``).
"""

import numpy as np

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from csev._libcrypto cimport (
    AES_128_CTR, AES_128_XTS, ERR_EVP, ERR_NOMEM, OK, EVP_CIPHER_CTX, Hmac, check_pages, check_rows,
    check_words, cipher_free, cipher_new, cipher_set_iv, cipher_update, ct_equal, error_for,
    hmac_begin, hmac_end, hmac_free, hmac_init, hmac_update, key_bytes, random_bytes, tweak_le128,
)

from csev import _libcrypto, packet

if not _libcrypto.AVAILABLE:
    raise ImportError(f"csev._transport needs libcrypto: {_libcrypto.REASON}")

cdef extern from *:
    """
    /* Memory traffic is hidden behind HMAC-SHA256, which dominates a page's cost and touches only an
       L1-resident page. The HMAC is fed in slices; between slices the kernels stream a slice of
       the finished output page to its destination with non-temporal stores (not read again by this
       thread: no read-for-ownership, no cache pollution) and prefetch a slice of the next page's
       input (a random guest row on send; the hardware streamer stops at 4 KiB boundaries). Issued
       all at once, 64 prefetches or stores stall on the line-fill buffers; spread out, they cost
       nearly nothing (see docs/performance.md). n is a multiple of 64. */
    #include <string.h>
    #include <stdint.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static inline void csev_stream(void *dst, const void *src, size_t n) {
        unsigned char *d = (unsigned char *)dst;
        const unsigned char *s = (const unsigned char *)src;
        uintptr_t mis = (uintptr_t)d & 15;
    #if defined(__x86_64__)
        /* Migration records put the transport data at 8 mod 16 in every other record (4168-byte
           records, docs/formats.md): one 8-byte non-temporal store realigns, and another
           ends the run, so those rows are streamed too instead of going through the cache. */
        long long w;
        if (mis == 8) {
            memcpy(&w, s, 8);
            _mm_stream_si64((long long *)d, w);
            d += 8; s += 8; n -= 8; mis = 0;
        }
    #endif
        if (mis != 0) { memcpy(d, s, n); return; }
        size_t i = 0;
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
            __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
            _mm_stream_si128((__m128i *)(d + i), a);
            _mm_stream_si128((__m128i *)(d + i + 16), b);
            _mm_stream_si128((__m128i *)(d + i + 32), c);
            _mm_stream_si128((__m128i *)(d + i + 48), e);
        }
        for (; i + 16 <= n; i += 16)
            _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
    #if defined(__x86_64__)
        if (i + 8 <= n) {
            memcpy(&w, s + i, 8);
            _mm_stream_si64((long long *)(d + i), w);
            i += 8;
        }
    #endif
        if (i < n)
            memcpy(d + i, s + i, n - i);
    }
    static inline void csev_store_fence(void) { _mm_sfence(); }
    #else
    static inline void csev_stream(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
    static inline void csev_store_fence(void) { }
    #endif
    /* Prefetch the lines holding bytes [p, p + n). */
    static inline void csev_prefetch(const void *p, size_t n) {
    #if defined(__GNUC__)
        uintptr_t a = (uintptr_t)p & ~(uintptr_t)63, e = (uintptr_t)p + n;
        for (; a < e; a += 64) __builtin_prefetch((const void *)a, 0, 3);
    #else
        (void)p; (void)n;
    #endif
    }
    """
    void stream "csev_stream"(void* dst, const void* src, size_t n) noexcept nogil
    void store_fence "csev_store_fence"() noexcept nogil
    void prefetch "csev_prefetch"(const void* p, size_t n) noexcept nogil

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

# Page and packet-header geometry: csev.packet's, read once at import.
cdef Py_ssize_t PAGE = packet.PAGE_SIZE
cdef Py_ssize_t HEADER = packet.PACKET_HEADER_SIZE
cdef Py_ssize_t HDR_FLAGS = packet.PACKET_FLAGS_OFFSET
cdef Py_ssize_t HDR_IV = packet.PACKET_IV_OFFSET
cdef Py_ssize_t HDR_MAC = packet.PACKET_MAC_OFFSET
cdef uint32_t FLAG_COMPRESSED = packet.PACKET_FLAG_COMPRESSED

cdef enum:
    # Field sizes that size C arrays, so compile-time constants: checked against csev.packet below.
    FLAGS_SIZE = 4       # LE32
    IV_SIZE = 16         # one AES block: the CTR initial counter
    MAC_SIZE = 32        # one HMAC-SHA256
    # What the MAC covers before the ciphertext: CTX ‖ LE32 FLAGS ‖ IV ‖ LE32 len_a ‖ LE32 len_b
    # (send_receive_update_aad_t in AMD's sev_mcmd.h), offsets into it.
    AAD_FLAGS = 1
    AAD_IV = AAD_FLAGS + FLAGS_SIZE
    AAD_LEN_A = AAD_IV + IV_SIZE
    AAD_LEN_B = AAD_LEN_A + 4
    AAD = AAD_LEN_B + 4  # 29
    CTX_DATA = 0x02
    STATUS_SUCCESS = 0x00
    STATUS_BAD_MEASUREMENT = 0x0B
    STATUS_UNSUPPORTED = 0x15
    MAC_SLICE = 512      # HMAC input slice between prefetches/streamed stores (a multiple of 64)
    BLOCK_ALIGN = 64 - AAD   # page bytes that complete the AAD's SHA-256 block

if ((packet.PACKET_HEADER["flags"].itemsize, packet.PACKET_IV_SIZE, packet.PACKET_MAC_SIZE)
        != (FLAGS_SIZE, IV_SIZE, MAC_SIZE) or PAGE % MAC_SLICE):
    raise ImportError("csev._transport was compiled for other packet field sizes than csev.packet "
                      "declares (or a page that is not a whole number of MAC slices): rebuild it")


cdef inline void _le32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    p[2] = <uint8_t>(v >> 16)
    p[3] = <uint8_t>(v >> 24)


cdef inline uint32_t _rd_le32(const uint8_t* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef void _aad_init(uint8_t* aad) noexcept nogil:
    memset(aad, 0, AAD)
    aad[0] = CTX_DATA
    _le32(aad + AAD_LEN_A, <uint32_t>PAGE)     # GUEST_LEN
    _le32(aad + AAD_LEN_B, <uint32_t>PAGE)     # TRANS_LEN


cdef struct Ctxs:
    EVP_CIPHER_CTX* xts
    EVP_CIPHER_CTX* ctr
    Hmac mac
    uint8_t* scratch       # two pages: [0, PAGE) plaintext, [PAGE, 2 PAGE) the output page


cdef int _ctxs_open(Ctxs* c, const uint8_t* vek, int xts_enc, const uint8_t* tek,
                    const uint8_t* tik) noexcept nogil:
    memset(c, 0, sizeof(Ctxs))
    if posix_memalign(<void**>&c.scratch, 64, 2 * PAGE) != 0:     # whole cache lines
        c.scratch = NULL
        return ERR_NOMEM
    c.xts = cipher_new(AES_128_XTS, vek, xts_enc)
    c.ctr = cipher_new(AES_128_CTR, tek, 1)
    if c.xts == NULL or c.ctr == NULL:
        return ERR_EVP
    return hmac_init(&c.mac, tik, 16)


cdef void _ctxs_close(Ctxs* c) noexcept nogil:
    cipher_free(c.xts)
    cipher_free(c.ctr)
    hmac_free(&c.mac)
    if c.scratch != NULL:
        memset(c.scratch, 0, 2 * PAGE)     # it held guest plaintext
        free(c.scratch)


cdef int _mac_page(Hmac* mac, const uint8_t* aad, const uint8_t* page, uint8_t* out,
                   uint8_t* store_dst, const uint8_t* store_src, const uint8_t* next) noexcept nogil:
    """HMAC over aad ‖ page into ``out``; meanwhile stream ``store_src`` to ``store_dst`` and prefetch
    ``next`` (each optional), one slice per HMAC slice. The HMAC slices are shifted by BLOCK_ALIGN so
    that each starts on a SHA-256 block: OpenSSL then buffers no partial block (docs/performance.md)."""
    cdef int rc = hmac_begin(mac)
    cdef size_t off = 0
    cdef size_t lo = 0
    cdef size_t hi
    if rc == OK:
        rc = hmac_update(mac, aad, AAD)
    while rc == OK and off < PAGE:
        hi = off + MAC_SLICE + BLOCK_ALIGN
        if hi > PAGE:
            hi = PAGE
        rc = hmac_update(mac, page + lo, hi - lo)
        lo = hi
        if store_dst != NULL:
            stream(store_dst + off, store_src + off, MAC_SLICE)
        if next != NULL:
            prefetch(next + off, MAC_SLICE)
        off += MAC_SLICE
    if rc == OK:
        rc = hmac_end(mac, out)
    return rc


cdef int _send_run(Ctxs* c, const uint8_t* mem, const int64_t* idx, const uint64_t* tweaks,
                   uint8_t* headers, uint8_t* trans, const uint8_t* ivs,
                   Py_ssize_t hdr_stride, Py_ssize_t trans_stride, Py_ssize_t ring, bint nontemporal,
                   Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Pages [start, stop) with open contexts; page i goes to output row i % ring."""
    cdef uint8_t aad[AAD]
    cdef uint8_t tweak[16]
    cdef Py_ssize_t i, row, out
    cdef uint8_t* hdr
    cdef uint8_t* dst
    cdef const uint8_t* iv
    cdef const uint8_t* nxt
    cdef int rc = OK
    _aad_init(aad)                                      # FLAGS = 0: no compression
    i = start
    while rc == OK and i < stop:
        row = idx[i] if idx != NULL else i
        out = i % ring
        hdr = headers + out * hdr_stride
        dst = trans + out * trans_stride
        iv = ivs + i * IV_SIZE
        nxt = NULL
        if i + 1 < stop:
            nxt = mem + (idx[i + 1] if idx != NULL else i + 1) * PAGE
        tweak_le128(tweak, tweaks[i])
        # the guest page decrypted with the VEK (into scratch, never into TRANS)
        rc = cipher_set_iv(c.xts, tweak)
        if rc == OK:
            rc = cipher_update(c.xts, c.scratch, mem + row * PAGE, PAGE)
        # then CTR under TEK, and encrypt-then-MAC under TIK; the ciphertext goes out to TRANS
        # while it is MACed (non-temporal) or after it (ordinary stores), and the next guest page comes in
        if rc == OK:
            rc = cipher_set_iv(c.ctr, iv)
        if rc == OK:
            rc = cipher_update(c.ctr, c.scratch + PAGE, c.scratch, PAGE)
        memcpy(aad + AAD_IV, iv, IV_SIZE)
        if rc == OK:
            rc = _mac_page(&c.mac, aad, c.scratch + PAGE, hdr + HDR_MAC,
                           dst if nontemporal else NULL, c.scratch + PAGE, nxt)
        if rc == OK and not nontemporal:
            memcpy(dst, c.scratch + PAGE, PAGE)
        _le32(hdr + HDR_FLAGS, 0)
        memcpy(hdr + HDR_IV, iv, IV_SIZE)
        i += 1
    store_fence()
    return rc


cdef int _send_core(const uint8_t* vek, const uint8_t* tek, const uint8_t* tik,
                    const uint8_t* mem, const int64_t* idx, const uint64_t* tweaks,
                    uint8_t* headers, uint8_t* trans, const uint8_t* ivs,
                    Py_ssize_t hdr_stride, Py_ssize_t trans_stride, bint nontemporal,
                    Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    cdef Ctxs c
    cdef int rc = _ctxs_open(&c, vek, 0, tek, tik)
    if rc == OK:
        rc = _send_run(&c, mem, idx, tweaks, headers, trans, ivs, hdr_stride, trans_stride, stop,
                       nontemporal, start, stop)
    _ctxs_close(&c)
    return rc


cdef int _receive_core(const uint8_t* vek, const uint8_t* tek, const uint8_t* tik,
                       const uint8_t* headers, const uint8_t* trans, uint8_t* mem,
                       const int64_t* idx, const uint64_t* tweaks, uint32_t* status,
                       Py_ssize_t hdr_stride, Py_ssize_t trans_stride,
                       Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    cdef Ctxs c
    cdef uint8_t aad[AAD]
    cdef uint8_t tweak[16]
    cdef uint8_t mac[MAC_SIZE]
    cdef Py_ssize_t i, row
    cdef const uint8_t* hdr
    cdef const uint8_t* ct
    cdef uint32_t flags
    cdef uint8_t* pending = NULL        # guest row of the last accepted page, still in scratch
    cdef int rc = _ctxs_open(&c, vek, 1, tek, tik)
    _aad_init(aad)
    i = start
    while rc == OK and i < stop:
        hdr = headers + i * hdr_stride
        ct = trans + i * trans_stride
        flags = _rd_le32(hdr + HDR_FLAGS)
        i += 1
        if flags & FLAG_COMPRESSED:                     # UNSUPPORTED, as in the firmware
            status[i - 1] = STATUS_UNSUPPORTED
            continue
        _le32(aad + AAD_FLAGS, flags)                   # FLAGS and IV as received
        memcpy(aad + AAD_IV, hdr + HDR_IV, IV_SIZE)
        # the previous page goes out to guest memory while this one is MACed
        rc = _mac_page(&c.mac, aad, ct, mac, pending, c.scratch + PAGE,
                       ct + trans_stride if i < stop else NULL)
        pending = NULL
        if rc != OK:
            break
        if not ct_equal(mac, hdr + HDR_MAC, MAC_SIZE):     # the MAC before decrypting
            status[i - 1] = STATUS_BAD_MEASUREMENT
            continue
        row = idx[i - 1] if idx != NULL else i - 1
        tweak_le128(tweak, tweaks[i - 1])
        rc = cipher_set_iv(c.ctr, hdr + HDR_IV)
        if rc == OK:
            rc = cipher_update(c.ctr, c.scratch, ct, PAGE)
        if rc == OK:
            rc = cipher_set_iv(c.xts, tweak)
        if rc == OK:                                    # into guest memory under the VEK
            rc = cipher_update(c.xts, c.scratch + PAGE, c.scratch, PAGE)
        if rc != OK:
            break
        pending = mem + row * PAGE
        status[i - 1] = STATUS_SUCCESS
    if pending != NULL:
        stream(pending, c.scratch + PAGE, PAGE)
    store_fence()
    _ctxs_close(&c)
    return rc


cdef class _Job:
    """One validated batch; ``send``/``receive(start, stop)`` run a chunk without the GIL."""
    cdef object keep            # keys and buffers, alive while any chunk runs
    cdef const uint8_t* vek
    cdef const uint8_t* tek
    cdef const uint8_t* tik
    cdef const uint8_t* mem_in
    cdef uint8_t* mem_out
    cdef const int64_t* idx
    cdef const uint64_t* tweaks
    cdef const uint8_t* hdr_in
    cdef uint8_t* hdr_out
    cdef const uint8_t* trans_in
    cdef uint8_t* trans_out
    cdef const uint8_t* ivs
    cdef uint32_t* status
    cdef Py_ssize_t hdr_stride      # bytes between rows: 52/4096 for plain arrays, the record size
    cdef Py_ssize_t trans_stride    # when the rows are fields of migration-stream records
    cdef bint nontemporal           # send: TRANS streamed past the cache (else ordinary stores)

    def send(self, Py_ssize_t start, Py_ssize_t stop):
        cdef int rc
        with nogil:
            rc = _send_core(self.vek, self.tek, self.tik, self.mem_in, self.idx, self.tweaks,
                            self.hdr_out, self.trans_out, self.ivs, self.hdr_stride, self.trans_stride,
                            self.nontemporal, start, stop)
        if rc != OK:
            raise error_for(rc)

    def send_ring(self, Py_ssize_t k, Py_ssize_t ring, on_slice):
        """All k pages on this thread, ``ring`` at a time into rows [0, ring), each slice handed to
        ``on_slice(start, stop)`` (with the GIL) before the next overwrites it; contexts opened once."""
        cdef Ctxs c
        cdef int rc
        cdef Py_ssize_t a = 0
        cdef Py_ssize_t b
        with nogil:
            rc = _ctxs_open(&c, self.vek, 0, self.tek, self.tik)
        try:
            if rc != OK:
                raise error_for(rc)
            while a < k:
                b = min(a + ring, k)
                with nogil:
                    rc = _send_run(&c, self.mem_in, self.idx, self.tweaks, self.hdr_out, self.trans_out,
                                   self.ivs, self.hdr_stride, self.trans_stride, ring, self.nontemporal,
                                   a, b)
                if rc != OK:
                    raise error_for(rc)
                on_slice(a, b)
                a = b
        finally:
            _ctxs_close(&c)

    def receive(self, Py_ssize_t start, Py_ssize_t stop):
        cdef int rc
        with nogil:
            rc = _receive_core(self.vek, self.tek, self.tik, self.hdr_in, self.trans_in,
                               self.mem_out, self.idx, self.tweaks, self.status, self.hdr_stride,
                               self.trans_stride, start, stop)
        if rc != OK:
            raise error_for(rc)


cdef tuple _keys(_Job job, object vek, object tek, object tik):
    cdef bytes v = key_bytes(vek, "vek", 32)
    if v[:16] == v[16:]:
        raise ValueError("vek: the two AES-128 halves of an XTS key must differ")
    cdef bytes t = key_bytes(tek, "tek", 16)
    cdef bytes m = key_bytes(tik, "tik", 16)
    job.vek = v
    job.tek = t
    job.tik = m
    return (v, t, m)


def send_pages(vek, tek, tik, mem, index, tweaks, headers, trans, ivs=None, *, threads=None,
               bint nontemporal=True, on_slice=None):
    """SEND_UPDATE_DATA for ``k = len(tweaks)`` pages ``mem[index[i]]`` into ``headers[i]``/``trans[i]``.

    ``ivs``: None for fresh random IVs, else a C-contiguous buffer of ``16 * k`` bytes.
    ``nontemporal``: stream TRANS past the cache (right for output larger than the cache, read later);
    False writes it with ordinary stores, for a consumer that reads a small output at once (a socket
    send of a ring of records: the socket's copy then reads it from cache, not from DRAM).
    ``on_slice``: ``headers``/``trans`` are a ring of ``n = len(trans)`` rows: page i goes to row
    ``i % n``, and after each ``n`` pages (and the last) ``on_slice(start, stop)`` is called to consume
    rows ``[0, stop - start)``. The batch then runs on the calling thread; an exception from
    ``on_slice`` ends it and propagates.
    """
    cdef _Job job = _Job()
    keys = _keys(job, vek, tek, tik)
    if on_slice is not None and threads not in (None, 1):
        raise ValueError("on_slice: the batch runs on the calling thread (threads must be None or 1)")
    nthreads = _libcrypto.resolve_threads(threads)
    check_words(tweaks, "tweaks", False, -1)
    cdef const uint64_t[::1] tw = tweaks
    cdef Py_ssize_t k = tw.shape[0]
    cdef Py_ssize_t rows = k
    if on_slice is not None:
        if not callable(on_slice):
            raise TypeError("on_slice must be callable")
        check_pages(trans, "trans", PAGE, 1, True, True)
        rows = min(k, memoryview(trans).shape[0])
    check_pages(mem, "mem", PAGE, 0 if index is not None else k, False)
    check_pages(headers, "headers", HEADER, rows, True, True)
    check_pages(trans, "trans", PAGE, rows, True, True)
    cdef const uint8_t[:, ::1] m = mem
    cdef uint8_t[:, :] h = headers
    cdef uint8_t[:, :] t = trans
    cdef const int64_t[::1] ix = None
    if index is not None:
        check_words(index, "index", True, k)
        ix = index
    cdef bytes iv = random_bytes(IV_SIZE * k) if ivs is None else key_bytes(ivs, "ivs", IV_SIZE * k)
    if k == 0:
        return
    if ix is not None:
        check_rows(&ix[0], k, m.shape[0], "index")
        job.idx = &ix[0]
    job.keep = (keys, m, h, t, ix, tw, iv)
    job.mem_in = &m[0, 0]
    job.hdr_out = &h[0, 0]
    job.trans_out = &t[0, 0]
    job.hdr_stride = h.strides[0]
    job.trans_stride = t.strides[0]
    job.nontemporal = nontemporal
    job.tweaks = &tw[0]
    job.ivs = iv
    if on_slice is not None:
        job.send_ring(k, rows, on_slice)
    else:
        _libcrypto.run_chunks(job.send, k, nthreads)


def receive_pages(vek, tek, tik, headers, trans, mem, index, tweaks, *, threads=None):
    """RECEIVE_UPDATE_DATA for ``k = len(tweaks)`` packets into ``mem[index[i]]``; uint32[k] statuses."""
    cdef _Job job = _Job()
    keys = _keys(job, vek, tek, tik)
    nthreads = _libcrypto.resolve_threads(threads)
    check_words(tweaks, "tweaks", False, -1)
    cdef const uint64_t[::1] tw = tweaks
    cdef Py_ssize_t k = tw.shape[0]
    check_pages(headers, "headers", HEADER, k, False, True)
    check_pages(trans, "trans", PAGE, k, False, True)
    check_pages(mem, "mem", PAGE, 0 if index is not None else k, True)
    cdef const uint8_t[:, :] h = headers
    cdef const uint8_t[:, :] t = trans
    cdef uint8_t[:, ::1] m = mem
    cdef const int64_t[::1] ix = None
    if index is not None:
        check_words(index, "index", True, k)
        ix = index
    status = np.zeros(k, dtype=np.uint32)
    if k == 0:
        return status
    if ix is not None:
        check_rows(&ix[0], k, m.shape[0], "index")
        job.idx = &ix[0]
    cdef uint32_t[::1] st = status
    job.keep = (keys, m, h, t, ix, tw, st)
    job.mem_out = &m[0, 0]
    job.hdr_in = &h[0, 0]
    job.trans_in = &t[0, 0]
    job.hdr_stride = h.strides[0]
    job.trans_stride = t.strides[0]
    job.tweaks = &tw[0]
    job.status = &st[0]
    _libcrypto.run_chunks(job.receive, k, nthreads)
    return status
