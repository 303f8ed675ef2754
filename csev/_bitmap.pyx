"""Bitmap kernels over uint64 words, one bit per 4 KiB page: KVM's dirty log and the SEV page-encryption
bitmap (Linux ``Documentation/virt/kvm/api.rst``, KVM_GET_DIRTY_LOG; QEMU ``include/exec/ram_addr.h``).

Bit i is bit (i % 64) of word i // 64, the little-endian ``unsigned long`` order of KVM's dirty
log. Every function checks dtypes, lengths and ranges once with the GIL and raises ``ValueError``
(bad shape, length or negative value) or ``IndexError`` (a range past the bitmap) before touching
memory; the loops in ``_bitops.h`` then run without the GIL. Bits past ``nbits`` in the last word
are ignored by every reader.
"""
from libc.stdint cimport int64_t, uint64_t, uintptr_t

import numpy as np

cdef extern from "_bitops.h" nogil:
    uint64_t csev_count(const uint64_t *w, int64_t nbits) noexcept
    uint64_t csev_sync(uint64_t *log, uint64_t *dest, size_t n) noexcept
    void csev_split(const uint64_t *dirty, const uint64_t *enc, uint64_t *priv,
                    uint64_t *shared, size_t n, uint64_t *n_priv, uint64_t *n_shared) noexcept
    void csev_extract(const uint64_t *w, int64_t nbits, int64_t *out, int64_t total) noexcept
    int64_t csev_find_next(const uint64_t *w, int64_t start, int64_t nbits) noexcept
    int64_t csev_count_runs(const uint64_t *w, int64_t nbits) noexcept
    void csev_fill_runs(const uint64_t *w, int64_t nbits, int64_t *out) noexcept
    void csev_fill_range(uint64_t *w, int64_t start, int64_t n, int value) noexcept
    int CSEV_POPCNT_DISPATCH

POPCNT_DISPATCH = bool(CSEV_POPCNT_DISPATCH)
"""True when the popcount loops were built twice (POPCNT and baseline) and picked at load time."""


cdef Py_ssize_t _nbits(object nbits, Py_ssize_t nwords) except -1:
    """``nbits`` checked against the words it must fit in; None means all of them."""
    cdef Py_ssize_t cap = nwords * 64
    if nbits is None:
        return cap
    cdef Py_ssize_t nb = nbits
    if nb < 0:
        raise ValueError(f"nbits must be non-negative, got {nb}")
    if nb > cap:
        raise ValueError(f"nbits={nb} exceeds the {nwords} words given ({cap} bits)")
    return nb


cdef int _disjoint(const uint64_t[::1] a, const uint64_t[::1] b, str what) except -1:
    """Refuse overlapping buffers: an output that aliases an input would read half-updated words."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return 0
    cdef uintptr_t a0 = <uintptr_t>&a[0], b0 = <uintptr_t>&b[0]
    if a0 < b0 + <uintptr_t>b.shape[0] * 8 and b0 < a0 + <uintptr_t>a.shape[0] * 8:
        raise ValueError(f"{what} must not share memory")
    return 0


cdef int _check_range(Py_ssize_t start, Py_ssize_t n, Py_ssize_t limit, str where) except -1:
    if start < 0 or n < 0:
        raise ValueError(f"{where}start={start}, n={n}: both must be non-negative")
    if n > limit - start:
        raise IndexError(f"{where}range [{start}, {start} + {n}) is past the bitmap end {limit}")
    return 0


def bitmap_sync(uint64_t[::1] log not None, uint64_t[::1] dest not None):
    """Fetch-and-clear ``log`` into ``dest``; return the number of newly dirty pages.

    QEMU semantics (cpu_physical_memory_sync_dirty_bitmap): for each non-zero log word,
    ``new = bits & ~dest; dest |= bits; log = 0; count += popcount(new)``.
    """
    cdef Py_ssize_t n = log.shape[0]
    if dest.shape[0] != n:
        raise ValueError(f"log has {n} words but dest has {dest.shape[0]}")
    _disjoint(log, dest, "log and dest")
    if n == 0:
        return 0
    cdef uint64_t count
    with nogil:
        count = csev_sync(&log[0], &dest[0], <size_t>n)
    return count


def bitmap_split(const uint64_t[::1] dirty not None, const uint64_t[::1] enc not None,
                 uint64_t[::1] private not None, uint64_t[::1] shared not None):
    """``private = dirty & enc``, ``shared = dirty & ~enc``; return both page counts."""
    cdef Py_ssize_t n = dirty.shape[0]
    if enc.shape[0] != n or private.shape[0] != n or shared.shape[0] != n:
        raise ValueError(f"length mismatch: dirty {n}, enc {enc.shape[0]}, "
                         f"private {private.shape[0]}, shared {shared.shape[0]} words")
    _disjoint(private, shared, "private and shared")
    _disjoint(private, dirty, "private and dirty")
    _disjoint(private, enc, "private and enc")
    _disjoint(shared, dirty, "shared and dirty")
    _disjoint(shared, enc, "shared and enc")
    if n == 0:
        return 0, 0
    cdef uint64_t n_priv, n_shared
    with nogil:
        csev_split(&dirty[0], &enc[0], &private[0], &shared[0], <size_t>n, &n_priv, &n_shared)
    return n_priv, n_shared


def bitmap_count(const uint64_t[::1] words not None, nbits=None):
    """Number of set bits below ``nbits`` (default: all words)."""
    cdef Py_ssize_t nb = _nbits(nbits, words.shape[0])
    if nb == 0:
        return 0
    cdef uint64_t count
    with nogil:
        count = csev_count(&words[0], nb)
    return count


def bitmap_extract(const uint64_t[::1] words not None, nbits=None):
    """int64 indices of the set bits below ``nbits``, ascending.

    Two passes: a popcount sizes the result exactly, then a ctz loop fills it, so neither sparse
    nor dense bitmaps pay for over-allocation or a final copy.
    """
    cdef Py_ssize_t nb = _nbits(nbits, words.shape[0])
    cdef int64_t total = 0
    if nb:
        with nogil:
            total = <int64_t>csev_count(&words[0], nb)
    out = np.empty(total, dtype=np.int64)
    cdef int64_t[::1] ov = out
    if total:
        with nogil:
            csev_extract(&words[0], nb, &ov[0], total)
    return out


def bitmap_find_next(const uint64_t[::1] words not None, Py_ssize_t start, Py_ssize_t nbits):
    """Index of the first set bit at or after ``start`` below ``nbits``; ``nbits`` when none."""
    cdef Py_ssize_t nb = _nbits(nbits, words.shape[0])
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    if start >= nb:
        return nb
    return csev_find_next(&words[0], start, nb)


def bitmap_set_range(uint64_t[::1] words not None, Py_ssize_t start, Py_ssize_t n):
    """Set bits ``[start, start + n)``."""
    _check_range(start, n, words.shape[0] * 64, "")
    if n:
        with nogil:
            csev_fill_range(&words[0], start, n, 1)


def bitmap_clear_range(uint64_t[::1] words not None, Py_ssize_t start, Py_ssize_t n):
    """Clear bits ``[start, start + n)``."""
    _check_range(start, n, words.shape[0] * 64, "")
    if n:
        with nogil:
            csev_fill_range(&words[0], start, n, 0)


def bitmap_to_ranges(const uint64_t[::1] words not None, Py_ssize_t nbits):
    """Maximal runs of set bits below ``nbits`` as int64 ``(start, npages)`` rows, ascending."""
    cdef Py_ssize_t nb = _nbits(nbits, words.shape[0])
    cdef int64_t nruns = 0
    if nb:
        with nogil:
            nruns = csev_count_runs(&words[0], nb)
    out = np.empty((nruns, 2), dtype=np.int64)
    cdef int64_t[:, ::1] ov = out
    if nruns:
        with nogil:
            csev_fill_runs(&words[0], nb, &ov[0, 0])
    return out


def bitmap_from_ranges(const int64_t[:, ::1] ranges not None, Py_ssize_t nbits):
    """A new uint64 bitmap of ``nbits`` bits with the ``(start, npages)`` rows of ``ranges`` set."""
    if nbits < 0:
        raise ValueError(f"nbits must be non-negative, got {nbits}")
    if ranges.shape[1] != 2:
        raise ValueError(f"ranges must have shape (k, 2), got (k, {ranges.shape[1]})")
    cdef Py_ssize_t k = ranges.shape[0], r
    for r in range(k):
        _check_range(ranges[r, 0], ranges[r, 1], nbits, f"ranges[{r}]: ")
    out = np.zeros((nbits + 63) // 64, dtype=np.uint64)
    cdef uint64_t[::1] ov = out
    with nogil:
        for r in range(k):
            if ranges[r, 1]:
                csev_fill_range(&ov[0], ranges[r, 0], ranges[r, 1], 1)
    return out
