"""numpy twins of the bitmap kernels in ``csev/_bitmap.pyx``: same signatures, outputs and errors.

Bit i is bit (i % 64) of word i // 64, the little-endian ``unsigned long`` order of KVM's dirty log
(Linux ``Documentation/virt/kvm/api.rst``, KVM_GET_DIRTY_LOG). Words are unpacked through a
little-endian view, so the twins also agree with the kernels on a big-endian host.
"""

from __future__ import annotations

import numpy as np

_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)

if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def _popcount(words: np.ndarray) -> int:
        return int(np.bitwise_count(words).sum(dtype=np.uint64))

else:
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(words: np.ndarray) -> int:
        return int(_POP8[_le(words).view(np.uint8)].sum(dtype=np.uint64))


def _le(words: np.ndarray) -> np.ndarray:
    return words.astype("<u8", copy=False)


def _array(obj, name: str, dtype, ndim: int, writable: bool) -> np.ndarray:
    """Reject what a typed memoryview rejects: wrong dtype, rank or layout, read-only output."""
    if obj is None:
        raise TypeError(f"{name} must not be None")
    a = np.asarray(memoryview(obj))  # a buffer, as the kernels take; no list/scalar coercion
    if a.dtype.kind != np.dtype(dtype).kind or a.dtype.itemsize != np.dtype(dtype).itemsize:
        raise ValueError(f"{name}: dtype mismatch, expected {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got {a.ndim}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: buffer is not C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name}: buffer source array is read-only")
    return a


def _words(obj, name: str = "words", writable: bool = False) -> np.ndarray:
    return _array(obj, name, np.uint64, 1, writable)


def _index(value, name: str) -> int:
    if value is None:
        raise TypeError(f"{name} must be an integer, not None")
    return int(value.__index__())


def _nbits(nbits, nwords: int) -> int:
    cap = nwords * 64
    if nbits is None:
        return cap
    nb = _index(nbits, "nbits")
    if nb < 0:
        raise ValueError(f"nbits must be non-negative, got {nb}")
    if nb > cap:
        raise ValueError(f"nbits={nb} exceeds the {nwords} words given ({cap} bits)")
    return nb


def _disjoint(a: np.ndarray, b: np.ndarray, what: str) -> None:
    # For 1-D contiguous arrays the bounds test is exact.
    if a.size and b.size and np.may_share_memory(a, b):
        raise ValueError(f"{what} must not share memory")


def _check_range(start: int, n: int, limit: int, where: str = "") -> None:
    if start < 0 or n < 0:
        raise ValueError(f"{where}start={start}, n={n}: both must be non-negative")
    if n > limit - start:
        raise IndexError(f"{where}range [{start}, {start} + {n}) is past the bitmap end {limit}")


def _bits(words: np.ndarray, nbits: int) -> np.ndarray:
    """uint8 0/1 per page, the first nbits pages."""
    return np.unpackbits(_le(words).view(np.uint8), bitorder="little", count=nbits)


def bitmap_sync(log, dest) -> int:
    """Fetch-and-clear ``log`` into ``dest``; return the number of newly dirty pages."""
    log = _words(log, "log", writable=True)
    dest = _words(dest, "dest", writable=True)
    if dest.shape[0] != log.shape[0]:
        raise ValueError(f"log has {log.shape[0]} words but dest has {dest.shape[0]}")
    _disjoint(log, dest, "log and dest")
    count = _popcount(log & ~dest)
    dest |= log
    log[:] = 0
    return count


def bitmap_split(dirty, enc, private, shared) -> tuple[int, int]:
    """``private = dirty & enc``, ``shared = dirty & ~enc``; return both page counts."""
    dirty, enc = _words(dirty, "dirty"), _words(enc, "enc")
    private = _words(private, "private", writable=True)
    shared = _words(shared, "shared", writable=True)
    n = dirty.shape[0]
    if enc.shape[0] != n or private.shape[0] != n or shared.shape[0] != n:
        raise ValueError(
            f"length mismatch: dirty {n}, enc {enc.shape[0]}, "
            f"private {private.shape[0]}, shared {shared.shape[0]} words"
        )
    _disjoint(private, shared, "private and shared")
    _disjoint(private, dirty, "private and dirty")
    _disjoint(private, enc, "private and enc")
    _disjoint(shared, dirty, "shared and dirty")
    _disjoint(shared, enc, "shared and enc")
    np.bitwise_and(dirty, enc, out=private)
    np.invert(enc, out=shared)
    np.bitwise_and(shared, dirty, out=shared)
    return _popcount(private), _popcount(shared)


def bitmap_count(words, nbits=None) -> int:
    """Number of set bits below ``nbits`` (default: all words)."""
    words = _words(words)
    nb = _nbits(nbits, words.shape[0])
    full, rem = divmod(nb, 64)
    count = _popcount(words[:full])
    if rem:
        count += int(words[full] & np.uint64((1 << rem) - 1)).bit_count()
    return count


def bitmap_extract(words, nbits=None) -> np.ndarray:
    """int64 indices of the set bits below ``nbits``, ascending."""
    words = _words(words)
    nb = _nbits(nbits, words.shape[0])
    return np.flatnonzero(_bits(words, nb)).astype(np.int64, copy=False)


def bitmap_find_next(words, start, nbits) -> int:
    """Index of the first set bit at or after ``start`` below ``nbits``; ``nbits`` when none.

    Searches windows of 1, 64, 4096 … words so that a near hit costs one small numpy call.
    """
    words = _words(words)
    start = _index(start, "start")
    nb = _nbits(_index(nbits, "nbits"), words.shape[0])
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    if start >= nb:
        return nb
    nw = (nb + 63) // 64
    i = start // 64
    first = int(words[i]) & ~((1 << (start % 64)) - 1)
    if first:
        return min(i * 64 + ((first & -first).bit_length() - 1), nb)
    i += 1
    window = 64
    while i < nw:
        nz = np.flatnonzero(words[i : i + window])
        if nz.size:
            j = i + int(nz[0])
            w = int(words[j])
            return min(j * 64 + ((w & -w).bit_length() - 1), nb)
        i += window
        window *= 64
    return nb


def _fill_range(words: np.ndarray, start: int, n: int, value: bool) -> None:
    if n == 0:
        return
    end = start + n
    i, last = start // 64, (end - 1) // 64
    first_mask = (~0 << (start % 64)) & 0xFFFF_FFFF_FFFF_FFFF
    last_mask = 0xFFFF_FFFF_FFFF_FFFF >> ((-end) % 64)
    if i == last:
        masks = [(i, first_mask & last_mask)]
    else:
        masks = [(i, first_mask), (last, last_mask)]
        words[i + 1 : last] = _ALL if value else 0
    for j, m in masks:
        w = int(words[j])
        words[j] = (w | m) if value else (w & ~m)


def bitmap_set_range(words, start, n) -> None:
    """Set bits ``[start, start + n)``."""
    words = _words(words, writable=True)
    start, n = _index(start, "start"), _index(n, "n")
    _check_range(start, n, words.shape[0] * 64)
    _fill_range(words, start, n, True)


def bitmap_clear_range(words, start, n) -> None:
    """Clear bits ``[start, start + n)``."""
    words = _words(words, writable=True)
    start, n = _index(start, "start"), _index(n, "n")
    _check_range(start, n, words.shape[0] * 64)
    _fill_range(words, start, n, False)


def bitmap_to_ranges(words, nbits) -> np.ndarray:
    """Maximal runs of set bits below ``nbits`` as int64 ``(start, npages)`` rows, ascending."""
    words = _words(words)
    nb = _nbits(_index(nbits, "nbits"), words.shape[0])
    edges = np.diff(_bits(words, nb).astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return np.column_stack((starts, ends - starts)).astype(np.int64).reshape(-1, 2)


def bitmap_from_ranges(ranges, nbits) -> np.ndarray:
    """A new uint64 bitmap of ``nbits`` bits with the ``(start, npages)`` rows of ``ranges`` set."""
    nb = _index(nbits, "nbits")
    if nb < 0:
        raise ValueError(f"nbits must be non-negative, got {nb}")
    ranges = _array(ranges, "ranges", np.int64, 2, writable=False)
    if ranges.shape[1] != 2:
        raise ValueError(f"ranges must have shape (k, 2), got (k, {ranges.shape[1]})")
    starts, counts = ranges[:, 0], ranges[:, 1]
    bad = np.flatnonzero((starts < 0) | (counts < 0) | (counts > nb - starts))
    if bad.size:
        r = int(bad[0])
        _check_range(int(starts[r]), int(counts[r]), nb, f"ranges[{r}]: ")
    nw = (nb + 63) // 64
    depth = np.zeros(nw * 64 + 1, dtype=np.int64)
    keep = counts > 0
    np.add.at(depth, starts[keep], 1)
    np.add.at(depth, starts[keep] + counts[keep], -1)
    bits = np.cumsum(depth[:-1]) > 0
    return np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
