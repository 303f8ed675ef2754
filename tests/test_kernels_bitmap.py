"""Bitmap kernels (csev._bitmap) and their numpy twins against a plain bool-array oracle.

Bit i is bit (i % 64) of word i // 64, as KVM's dirty log (Linux ``Documentation/virt/kvm/api.rst``,
KVM_GET_DIRTY_LOG). Sync follows QEMU's cpu_physical_memory_sync_dirty_bitmap
(``include/exec/ram_addr.h``).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import csev._bitmap
import csev._fallback_bitmap

IMPLS = [
    pytest.param(csev._bitmap, id="native"),
    pytest.param(csev._fallback_bitmap, id="numpy"),
]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DENSITIES = [0.0, 0.002, 0.5, 1.0]


@pytest.fixture(params=IMPLS)
def bm(request):
    return request.param


def pack(bits: np.ndarray, nwords: int | None = None) -> np.ndarray:
    """uint64 words of a bool array, little-endian bit order, zero-padded to nwords."""
    nwords = (bits.size + 63) // 64 if nwords is None else nwords
    padded = np.zeros(nwords * 64, dtype=bool)
    padded[: bits.size] = bits
    return np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)


def unpack(words: np.ndarray) -> np.ndarray:
    return np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little").astype(bool)


def popcount(words: np.ndarray) -> int:
    return int(unpack(words).sum())


def oracle_runs(bits: np.ndarray) -> np.ndarray:
    edges = np.diff(bits.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return np.column_stack((starts, ends - starts)).astype(np.int64).reshape(-1, 2)


@st.composite
def bitmaps(draw, max_bits=3000):
    """(words, nbits, bits): nbits often not a multiple of 64; bits past nbits are garbage set
    in the words and absent from the oracle `bits`."""
    nbits = draw(st.one_of(st.integers(0, max_bits), st.sampled_from([63, 64, 65, 128, 640])))
    density = draw(st.sampled_from(DENSITIES))
    extra_words = draw(st.integers(0, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nwords = (nbits + 63) // 64 + extra_words
    bits = rng.random(nwords * 64) < density
    if draw(st.booleans()):
        bits[nbits:] = rng.random(nwords * 64 - nbits) < 0.5  # garbage past nbits
    return pack(bits, nwords), nbits, bits[:nbits]


# -- readers: count, extract, find_next, to_ranges ------------------------------------------------


@SETTINGS
@given(bitmaps())
def test_readers_match_oracle(bm, case):
    words, nbits, bits = case
    before = words.copy()
    assert bm.bitmap_count(words, nbits) == int(bits.sum())
    got = bm.bitmap_extract(words, nbits)
    assert got.dtype == np.int64 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, np.flatnonzero(bits))
    runs = bm.bitmap_to_ranges(words, nbits)
    assert runs.dtype == np.int64 and runs.shape[1:] == (2,)
    np.testing.assert_array_equal(runs, oracle_runs(bits))
    np.testing.assert_array_equal(words, before)


@SETTINGS
@given(bitmaps(), st.data())
def test_find_next_matches_oracle(bm, case, data):
    words, nbits, bits = case
    start = data.draw(st.integers(0, nbits + 70))
    hits = np.flatnonzero(bits[start:])
    want = start + int(hits[0]) if hits.size else nbits
    assert bm.bitmap_find_next(words, start, nbits) == want


@SETTINGS
@given(bitmaps())
def test_defaults_cover_all_words(bm, case):
    words, _, _ = case
    bits = unpack(words)
    assert bm.bitmap_count(words) == int(bits.sum())
    np.testing.assert_array_equal(bm.bitmap_extract(words), np.flatnonzero(bits))


@pytest.mark.parametrize("density", DENSITIES + [0.01, 0.9])
def test_extract_large(bm, density):
    """Long enough for the native branch-free path and its switch to the exact tail loop."""
    bits = np.random.default_rng(7).random(100_003) < density
    words = pack(bits)
    np.testing.assert_array_equal(bm.bitmap_extract(words, bits.size), np.flatnonzero(bits))
    assert bm.bitmap_count(words, bits.size) == int(bits.sum())


def test_find_next_word_boundaries_and_end(bm):
    nbits = 200
    bits = np.zeros(nbits, dtype=bool)
    bits[[0, 63, 64, 127, 128, 199]] = True
    words = pack(bits, 4)
    words[3] |= np.uint64(0xFFFF_FFFF_FFFF_FF00)  # garbage: bits 200..255
    words[2] |= np.uint64(1 << 63)  # bit 191, the top of word 2
    bits[191] = True
    expect = {
        0: 0,
        1: 63,
        63: 63,
        64: 64,
        65: 127,
        127: 127,
        128: 128,
        129: 191,
        192: 199,
        199: 199,
        200: 200,
        201: 200,
        10**6: 200,
    }
    for start, want in expect.items():
        assert bm.bitmap_find_next(words, start, nbits) == want, start
    assert bm.bitmap_find_next(words, 192, 199) == 199  # bit 199 is past nbits=199
    assert bm.bitmap_find_next(np.zeros(0, np.uint64), 0, 0) == 0
    assert bm.bitmap_find_next(np.zeros(3, np.uint64), 5, 192) == 192


def test_empty_bitmaps(bm):
    empty = np.zeros(0, dtype=np.uint64)
    assert bm.bitmap_count(empty) == 0
    assert bm.bitmap_extract(empty).shape == (0,)
    assert bm.bitmap_to_ranges(empty, 0).shape == (0, 2)
    assert bm.bitmap_from_ranges(np.zeros((0, 2), np.int64), 0).shape == (0,)
    assert bm.bitmap_sync(empty, empty.copy()) == 0
    assert bm.bitmap_split(empty, empty.copy(), empty.copy(), empty.copy()) == (0, 0)


# -- writers: sync, split, set/clear range, from_ranges -------------------------------------------


@SETTINGS
@given(bitmaps(), st.sampled_from(DENSITIES), st.integers(0, 2**32 - 1))
def test_sync_is_qemu_fetch_and_clear(bm, case, dest_density, seed):
    log = case[0]
    dest = pack(np.random.default_rng(seed).random(log.size * 64) < dest_density, log.size)
    old_log, old_dest = log.copy(), dest.copy()
    newly = bm.bitmap_sync(log, dest)
    assert newly == popcount(old_log & ~old_dest)  # newly dirty only
    assert not log.any()  # log cleared
    np.testing.assert_array_equal(dest, old_dest | old_log)  # dest OR-ed
    assert bm.bitmap_sync(log, dest) == 0  # nothing new the second time


def test_sync_counts_only_new_pages(bm):
    log = pack(np.array([1, 1, 0, 1] + [0] * 60 + [1], dtype=bool))
    dest = pack(np.array([1, 0, 1, 0] + [0] * 60 + [0], dtype=bool))
    assert bm.bitmap_sync(log, dest) == 3  # pages 1, 3, 64; page 0 was already in dest
    np.testing.assert_array_equal(unpack(dest)[:65], np.array([1, 1, 1, 1] + [0] * 60 + [1], bool))
    assert not log.any()


@SETTINGS
@given(bitmaps(), st.integers(0, 2**32 - 1))
def test_split_private_shared(bm, case, seed):
    dirty = case[0]
    enc = np.random.default_rng(seed).integers(0, 2**64, dirty.size, dtype=np.uint64, endpoint=False)
    private = np.full_like(dirty, 0xA5A5)
    shared = np.full_like(dirty, 0x5A5A)
    n_private, n_shared = bm.bitmap_split(dirty, enc, private, shared)
    np.testing.assert_array_equal(private, dirty & enc)
    np.testing.assert_array_equal(shared, dirty & ~enc)
    assert (n_private, n_shared) == (popcount(dirty & enc), popcount(dirty & ~enc))
    assert n_private + n_shared == popcount(dirty)


@SETTINGS
@given(bitmaps(), st.data())
def test_set_and_clear_range(bm, case, data):
    words = case[0]
    total = words.size * 64
    start = data.draw(st.integers(0, total))
    n = data.draw(st.integers(0, total - start))
    expect = unpack(words)
    expect[start : start + n] = True
    bm.bitmap_set_range(words, start, n)
    np.testing.assert_array_equal(unpack(words), expect)
    expect[start : start + n] = False
    bm.bitmap_clear_range(words, start, n)
    np.testing.assert_array_equal(unpack(words), expect)


@SETTINGS
@given(bitmaps())
def test_ranges_round_trip(bm, case):
    words, nbits, bits = case
    runs = bm.bitmap_to_ranges(words, nbits)
    if runs.size:
        assert (runs[:, 1] > 0).all() and (runs[1:, 0] > runs[:-1].sum(axis=1)).all()  # maximal
    back = bm.bitmap_from_ranges(runs, nbits)
    assert back.dtype == np.uint64 and back.shape == ((nbits + 63) // 64,)
    np.testing.assert_array_equal(back, pack(bits))


@SETTINGS
@given(st.integers(0, 1000), st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=8))
def test_from_ranges_overlapping(bm, nbits, spans):
    ranges = np.array([(int(a * nbits), int(b * (nbits - int(a * nbits)))) for a, b in spans], dtype=np.int64).reshape(
        -1, 2
    )
    bits = np.zeros(nbits, dtype=bool)
    for start, n in ranges:
        bits[start : start + n] = True
    words = bm.bitmap_from_ranges(ranges, nbits)
    np.testing.assert_array_equal(words, pack(bits))
    np.testing.assert_array_equal(bm.bitmap_to_ranges(words, nbits), oracle_runs(bits))


def test_twins_agree_on_a_64_gib_bitmap():
    bits = np.random.default_rng(3).random(1 << 24) < 0.01
    words = pack(bits)
    for name in ("bitmap_extract", "bitmap_to_ranges", "bitmap_count"):
        native = getattr(csev._bitmap, name)(words, bits.size)
        twin = getattr(csev._fallback_bitmap, name)(words, bits.size)
        np.testing.assert_array_equal(native, twin)


# -- bad inputs: raise before touching memory -----------------------------------------------------


def _w(n=4, dtype=np.uint64, fill=0x0123_4567_89AB_CDEF):
    return np.full(n, fill, dtype=np.uint64).astype(dtype)


def _ro(a):
    a.setflags(write=False)
    return a


def _alias():
    a = _w()
    return a, a


BAD = [
    # (function, args factory, exception)
    ("bitmap_sync", lambda: (_w(dtype=np.int64), _w()), ValueError),
    ("bitmap_sync", lambda: (_w(), _w(dtype=np.uint32)), ValueError),
    ("bitmap_sync", lambda: (_w(8)[::2], _w()), ValueError),
    ("bitmap_sync", lambda: (_w(), _ro(_w())), ValueError),
    ("bitmap_sync", lambda: (_ro(_w()), _w()), ValueError),
    ("bitmap_sync", lambda: (_w(4), _w(5)), ValueError),
    ("bitmap_sync", _alias, ValueError),
    ("bitmap_split", lambda: (_w(), _w(dtype=np.int64), _w(), _w()), ValueError),
    ("bitmap_split", lambda: (_w(), _w(), _ro(_w()), _w()), ValueError),
    ("bitmap_split", lambda: (_w(), _w(), _w(), _w(3)), ValueError),
    ("bitmap_split", lambda: (_w(), _w(), _w(8)[::2], _w()), ValueError),
    ("bitmap_split", lambda: (lambda d: (d, _w(), d, _w()))(_w()), ValueError),
    ("bitmap_split", lambda: (lambda p: (_w(), _w(), p, p))(_w()), ValueError),
    ("bitmap_count", lambda: (_w(dtype=np.int64),), ValueError),
    ("bitmap_count", lambda: (_w(), 257), ValueError),
    ("bitmap_count", lambda: (_w(), -1), ValueError),
    ("bitmap_extract", lambda: (_w(dtype=np.uint32),), ValueError),
    ("bitmap_extract", lambda: (_w(8)[::2],), ValueError),
    ("bitmap_extract", lambda: (_w(), 4 * 64 + 1), ValueError),
    ("bitmap_find_next", lambda: (_w(), -1, 100), ValueError),
    ("bitmap_find_next", lambda: (_w(), 0, 257), ValueError),
    ("bitmap_find_next", lambda: (_w(dtype=np.int64), 0, 10), ValueError),
    ("bitmap_set_range", lambda: (_w(), -1, 3), ValueError),
    ("bitmap_set_range", lambda: (_w(), 3, -1), ValueError),
    ("bitmap_set_range", lambda: (_w(), 250, 7), IndexError),
    ("bitmap_set_range", lambda: (_w(), 2**62, 1), IndexError),
    ("bitmap_set_range", lambda: (_ro(_w()), 0, 1), ValueError),
    ("bitmap_set_range", lambda: (_w(dtype=np.int64), 0, 1), ValueError),
    ("bitmap_clear_range", lambda: (_w(), 0, 257), IndexError),
    ("bitmap_clear_range", lambda: (_w(), -5, 1), ValueError),
    ("bitmap_clear_range", lambda: (_w(8)[::2], 0, 1), ValueError),
    ("bitmap_to_ranges", lambda: (_w(), 300), ValueError),
    ("bitmap_to_ranges", lambda: (_w(dtype=np.uint32), 64), ValueError),
    ("bitmap_from_ranges", lambda: (np.array([[0, 1, 2]], np.int64), 64), ValueError),
    ("bitmap_from_ranges", lambda: (np.array([[0, 1]], np.int32), 64), ValueError),
    ("bitmap_from_ranges", lambda: (np.array([[0, 1]], np.uint64), 64), ValueError),
    ("bitmap_from_ranges", lambda: (np.array([0, 1], np.int64), 64), ValueError),
    ("bitmap_from_ranges", lambda: (np.asfortranarray(np.ones((3, 2), np.int64)), 64), ValueError),
    ("bitmap_from_ranges", lambda: (np.array([[0, 4], [-1, 2]], np.int64), 64), ValueError),
    ("bitmap_from_ranges", lambda: (np.array([[0, 4], [1, -2]], np.int64), 64), ValueError),
    ("bitmap_from_ranges", lambda: (np.array([[0, 4], [60, 5]], np.int64), 64), IndexError),
    ("bitmap_from_ranges", lambda: (np.array([[0, 4]], np.int64), -64), ValueError),
]


@pytest.mark.parametrize("name, make, exc", BAD, ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(BAD)])
def test_bad_inputs_raise_and_leave_arrays_unchanged(bm, name, make, exc):
    args = make()
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with pytest.raises(exc):
        getattr(bm, name)(*args)
    for a, b in zip(args, before, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["bitmap_count", "bitmap_extract", "bitmap_sync"])
def test_none_is_rejected(bm, name):
    with pytest.raises((TypeError, ValueError)):
        getattr(bm, name)(None, None) if name == "bitmap_sync" else getattr(bm, name)(None)
