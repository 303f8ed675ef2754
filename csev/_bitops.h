/* Bitmap helper loops for csev/_bitmap.pyx: KVM's dirty log (Linux Documentation/virt/kvm/api.rst,
 * KVM_GET_DIRTY_LOG) and QEMU's dirty bitmaps (include/exec/ram_addr.h).
 *
 * Bit i of a bitmap is bit (i % 64) of word i / 64: the little-endian `unsigned long` order of
 * KVM's dirty log. Callers have already checked lengths and ranges with the GIL; nothing here can
 * fail, and nothing here reads past `nbits` bits or writes past the counts it is given.
 *
 * Why function multiversioning: wheels target a generic x86-64 (no -mpopcnt), where
 * __builtin_popcountll becomes a bit-twiddling routine several times slower than the POPCNT
 * instruction (docs/performance.md). target_clones("popcnt", "default") compiles each
 * popcount-heavy loop twice and the dynamic loader binds the best one once, through an ifunc, so
 * the same binary runs on any x86-64 and uses POPCNT where the CPU has it. One resolved call per batch costs nothing, unlike a
 * per-word dispatch. ifunc needs GCC on an ELF/glibc target; on other compilers, other libcs or
 * other architectures (or a build that already enables POPCNT, e.g. -march=native) the plain
 * loops below are built unchanged.
 */
#ifndef CSEV_BITOPS_H
#define CSEV_BITOPS_H

#include <stddef.h>
#include <stdint.h>   /* on glibc this defines __GLIBC__, tested below */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__) \
    && defined(__GLIBC__) && !defined(__POPCNT__)
#  define CSEV_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#  define CSEV_POPCNT_DISPATCH 1
#else
#  define CSEV_POPCNT_CLONES
#  define CSEV_POPCNT_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define csev_popcount64(x) ((unsigned)__builtin_popcountll(x))
#  define csev_ctz64(x) ((unsigned)__builtin_ctzll(x)) /* x != 0 */
#else
static inline unsigned csev_popcount64(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (unsigned)((x * 0x0101010101010101ULL) >> 56);
}
static inline unsigned csev_ctz64(uint64_t x) /* x != 0 */
{
    return csev_popcount64((x & (0 - x)) - 1);
}
#endif

#if defined(__cplusplus) || defined(_MSC_VER)
#  define CSEV_RESTRICT __restrict
#else
#  define CSEV_RESTRICT restrict
#endif

#define CSEV_TOP_BIT (1ULL << 63)

/* Mask of the valid bits of the word holding bit `nbits - 1`; all ones when nbits % 64 == 0. */
static inline uint64_t csev_tail_mask(int64_t nbits)
{
    unsigned r = (unsigned)(nbits & 63);
    return r ? (~0ULL >> (64 - r)) : ~0ULL;
}

/* Set bits among the first nbits. */
CSEV_POPCNT_CLONES
static inline uint64_t csev_count(const uint64_t *w, int64_t nbits)
{
    int64_t nfull = nbits >> 6, i;
    uint64_t c = 0, c1 = 0, c2 = 0, c3 = 0;
    /* Four accumulators: one add chain would limit the loop to a word per cycle. */
    for (i = 0; i < (nfull & ~(int64_t)3); i += 4) {
        c += csev_popcount64(w[i]);
        c1 += csev_popcount64(w[i + 1]);
        c2 += csev_popcount64(w[i + 2]);
        c3 += csev_popcount64(w[i + 3]);
    }
    for (c += c1 + c2 + c3; i < nfull; i++)
        c += csev_popcount64(w[i]);
    if (nbits & 63)
        c += csev_popcount64(w[nfull] & csev_tail_mask(nbits));
    return c;
}

/* QEMU cpu_physical_memory_sync_dirty_bitmap (include/exec/ram_addr.h), aligned path: count the
 * log bits not yet in dest, OR them in, clear the log. Returns the newly dirty pages.
 * QEMU skips zero log words to save an atomic exchange; we have no atomics, and on a random 1 %
 * log about half the words are non-zero, so that branch mispredicts on every other word
 * (docs/performance.md). Every word takes the same branch-free path; the result is the same
 * because a zero log word adds nothing and its dest word keeps its value. */
CSEV_POPCNT_CLONES
static inline uint64_t csev_sync(uint64_t *CSEV_RESTRICT log, uint64_t *CSEV_RESTRICT dest,
                                 size_t n)
{
    uint64_t c = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        uint64_t bits = log[i], d = dest[i];
        c += csev_popcount64(bits & ~d);
        dest[i] = d | bits;
        log[i] = 0;
    }
    return c;
}

/* private = dirty & enc, shared = dirty & ~enc; the counts of both. */
CSEV_POPCNT_CLONES
static inline void csev_split(const uint64_t *CSEV_RESTRICT dirty,
                              const uint64_t *CSEV_RESTRICT enc, uint64_t *CSEV_RESTRICT priv,
                              uint64_t *CSEV_RESTRICT shared, size_t n, uint64_t *n_priv,
                              uint64_t *n_shared)
{
    uint64_t cp = 0, cs = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        uint64_t d = dirty[i], e = enc[i];
        uint64_t p = d & e, s = d & ~e;
        priv[i] = p;
        shared[i] = s;
        cp += csev_popcount64(p);
        cs += csev_popcount64(s);
    }
    *n_priv = cp;
    *n_shared = cs;
}

/* Second pass of the extraction: write the indices of the set bits below nbits into out, which
 * holds exactly `total` = csev_count(w, nbits) entries.
 *
 * While at least 72 slots remain, each word is handled without a data-dependent branch for sparse
 * words: 4 indices are written unconditionally and k advances by the word's popcount, so the extra
 * writes are garbage that the next word overwrites. ctz(w | TOP_BIT) equals ctz(w) whenever the
 * entry is real and stays defined once w is exhausted. Dense words continue 8 at a time (at most
 * 4 + 64 writes). Near the end, where over-writing could leave the buffer, the plain ctz loop
 * finishes the job. Faster than the plain ctz loop alone at sparse and dense fills alike
 * (docs/performance.md). */
CSEV_POPCNT_CLONES
static inline void csev_extract(const uint64_t *CSEV_RESTRICT w, int64_t nbits,
                                int64_t *CSEV_RESTRICT out, int64_t total)
{
    int64_t nw = (nbits + 63) >> 6, i = 0, k = 0;
    for (; i < nw - 1 && total - k >= 72; i++) {
        uint64_t x = w[i];
        int64_t base = i << 6, *o = out + k;
        unsigned cnt = csev_popcount64(x), j;
        o[0] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
        o[1] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
        o[2] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
        o[3] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
        for (j = 4; j < cnt; j += 8) {
            o[j + 0] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
            o[j + 1] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
            o[j + 2] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
            o[j + 3] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
            o[j + 4] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
            o[j + 5] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
            o[j + 6] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
            o[j + 7] = base + csev_ctz64(x | CSEV_TOP_BIT); x &= x - 1;
        }
        k += cnt;
    }
    for (; i < nw; i++) {
        uint64_t x = w[i];
        int64_t base = i << 6;
        if (i == nw - 1)
            x &= csev_tail_mask(nbits);
        while (x) {
            out[k++] = base + csev_ctz64(x);
            x &= x - 1;
        }
    }
}

/* First set bit at index >= start among the first nbits; nbits when none. */
static inline int64_t csev_find_next(const uint64_t *w, int64_t start, int64_t nbits)
{
    int64_t nw = (nbits + 63) >> 6, i = start >> 6;
    uint64_t x;
    if (start >= nbits)
        return nbits;
    x = w[i] & (~0ULL << (start & 63));
    for (;;) {
        if (x) {
            int64_t pos = (i << 6) + csev_ctz64(x);
            return pos < nbits ? pos : nbits;
        }
        if (++i >= nw)
            return nbits;
        x = w[i];
    }
}

/* Run starts of a word: set bits whose lower neighbour (across the word boundary) is clear.
 * `w` is the word masked to nbits. */
static inline uint64_t csev_run_starts(uint64_t w, uint64_t prev)
{
    return w & ~((w << 1) | (prev >> 63));
}

/* Number of maximal runs of set bits below nbits. */
CSEV_POPCNT_CLONES
static inline int64_t csev_count_runs(const uint64_t *w, int64_t nbits)
{
    int64_t nw = (nbits + 63) >> 6, i;
    uint64_t prev = 0, c = 0;
    for (i = 0; i < nw; i++) {
        uint64_t x = w[i];
        if (i == nw - 1)
            x &= csev_tail_mask(nbits);
        c += csev_popcount64(csev_run_starts(x, prev));
        prev = x;
    }
    return (int64_t)c;
}

/* Write the runs as (start, npages) rows into out[2 * nruns]. Starts and ends alternate along
 * the bitmap, so run r's start is always written before its end is found. */
static inline void csev_fill_runs(const uint64_t *w, int64_t nbits, int64_t *out)
{
    int64_t nw = (nbits + 63) >> 6, i, rs = 0, re = 0;
    uint64_t prev = 0;
    for (i = 0; i < nw; i++) {
        uint64_t x = w[i], starts, ends;
        int64_t base = i << 6;
        if (i == nw - 1)
            x &= csev_tail_mask(nbits);
        starts = csev_run_starts(x, prev);
        ends = ~x & ((x << 1) | (prev >> 63));   /* clear bits whose lower neighbour is set */
        while (starts) {
            out[2 * rs++] = base + csev_ctz64(starts);
            starts &= starts - 1;
        }
        while (ends) {
            out[2 * re + 1] = base + csev_ctz64(ends) - out[2 * re];
            re++;
            ends &= ends - 1;
        }
        prev = x;
    }
    if (re < rs)   /* the last run reaches nbits, a multiple of 64 */
        out[2 * re + 1] = nbits - out[2 * re];
}

/* Set (value != 0) or clear bits [start, start + n), as Linux bitmap_set / bitmap_clear. */
static inline void csev_fill_range(uint64_t *w, int64_t start, int64_t n, int value)
{
    int64_t end = start + n, i = start >> 6, last = (end - 1) >> 6;
    uint64_t first_mask, last_mask;
    if (n <= 0)
        return;
    first_mask = ~0ULL << (start & 63);
    last_mask = csev_tail_mask(end);
    if (i == last) {
        first_mask &= last_mask;
        w[i] = value ? (w[i] | first_mask) : (w[i] & ~first_mask);
        return;
    }
    w[i] = value ? (w[i] | first_mask) : (w[i] & ~first_mask);
    for (i++; i < last; i++)
        w[i] = value ? ~0ULL : 0;
    w[last] = value ? (w[last] | last_mask) : (w[last] & ~last_mask);
}

#endif /* CSEV_BITOPS_H */
