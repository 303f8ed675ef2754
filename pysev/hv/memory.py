"""Guest RAM as the hypervisor sees it: RAM blocks, KVM's dirty log, and page-encryption state.

A ``RamBlock`` is QEMU's RAMBlock: an ``idstr``, a guest-physical base, and the host frames that back
it (``HostMemory.alloc_ram``; HPA = frame << 12, the memory controller's address tweak, docs/formats.md
"Guest memory ciphertext"). Each block carries two
bitmaps of uint64 words, one bit per page, little-endian bit order (csev's bitmap kernels):

- ``dirty_log``: KVM's per-memslot dirty log, set by guest writes and by encryption-state flips,
  fetched-and-cleared by ``sync_dirty`` (KVM_GET_DIRTY_LOG).
- ``enc``: the VMM's page-encryption state, 1 = private. Merged KVM keeps no such bitmap; the VMM
  tracks it from ``KVM_HC_MAP_GPA_RANGE`` exits (Linux Documentation/virt/kvm/x86/hypercalls.rst).
  Device regions (VGA framebuffer, BIOS ROM, pflash vars) are ``shared_by_nature``: never
  encrypted, always migrated in the clear, their ``enc`` all zero (as the SEV live-migration
  series' VGA and flash fixes).

Ordering invariant (what makes encryption-state flips race-free with the migration engine)
------------------------------------------------------------------------------------------
1. The VMM updates ``enc`` BEFORE it marks the flipped range dirty (``map_gpa_range``,
   ``reset_encryption_state``), both under this GuestMemory's one lock.
2. The engine, each pass, fetches-and-clears the dirty log FIRST (``sync_dirty``) and snapshots
   ``enc`` AFTER (``enc_snapshot``).
3. So every dirty bit the engine fetched comes with an ``enc`` at least as new as the flip that set
   it; a flip after the fetch leaves its dirty bit in the log for the next pass, and the page is
   re-sent in its new mode. The final pass runs with the vCPUs paused, so its ``enc`` is exact.
   A page sent in a stale mode in between does no harm: it is always re-sent.
4. Guest writes mark dirty AFTER the data is in DRAM, so a page the engine reads mid-write is
   always re-sent.

This answers Sean Christopherson's three races (KVM list, Message-Id <YEaAXXGZH0uSMA3v@google.com>):
#1 (convert after write,
migration in between) and #3 (set_private, write, set_shared) are covered because the flip itself
dirties the page, and the guest treats old contents as lost at conversion; #2 (dirty log read after
the state list, private data sent as shared) cannot happen because we read the state after the log.

Dave Gilbert asked for the opposite order, "sync the encrypted bitmap before the dirty bitmap"
(review of the series v2, Message-Id <20190711190541.GU3971@work-vm>). In v3 a flip did not dirty the
page: the kernel bitmap changed silently and
only the guest's later write re-dirtied it, so reading state first guaranteed that write came after.
Here the flip is itself a dirty event; reading state first would let a flip land between the
snapshot and the fetch, hand the engine that flip's dirty bit with the old state, and consume the
bit, so the page would never be re-sent in its new mode.

Layout: one "pc.ram" block at GPA 0 (QEMU also has one RAMBlock; we do not model the PCI hole), and
the device blocks in a window above RAM, aligned to 1 GiB.
"""

from __future__ import annotations

import bisect
import errno
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import csev
from csev.packet import PAGE_SHIFT, PAGE_SIZE
from pysev.hw.hostmem import HostMemory

log = logging.getLogger(__name__)

MiB, GiB = 1 << 20, 1 << 30
U64_MAX = (1 << 64) - 1

# KVM_HC_MAP_GPA_RANGE attributes (Linux Documentation/virt/kvm/x86/hypercalls.rst,
# arch/x86/include/uapi/asm/kvm_para.h)
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 1 << 1
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0xF
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0
_MAP_GPA_RANGE_MBZ = ~(KVM_MAP_GPA_RANGE_PAGE_SZ_MASK | KVM_MAP_GPA_RANGE_ENCRYPTED) & U64_MAX

RAM_IDSTR = "pc.ram"
VRAM_IDSTR = "0000:00:02.0/vga.vram"
BIOS_IDSTR = "pc.bios"
FLASH_VARS_IDSTR = "system.flash1"


class GpaError(LookupError):
    """A guest-physical address no RAM block backs."""


def nwords(npages: int) -> int:
    """uint64 words of a one-bit-per-page bitmap."""
    return (npages + 63) // 64


@dataclass(frozen=True)
class Region:
    """One block of a machine layout: where it sits in guest-physical space and what it is."""

    idstr: str
    gpa: int
    size: int
    shared_by_nature: bool = False


def q35_layout(
    ram_size: int, *, vram_size: int = 16 * MiB, bios_size: int = 256 * 1024, flash_vars_size: int = 128 * 1024
) -> tuple[Region, ...]:
    """A q35-like machine: RAM at 0, then VGA framebuffer, BIOS ROM and pflash vars above it."""
    window = -(-ram_size // GiB) * GiB
    return (
        Region(RAM_IDSTR, 0, ram_size),
        Region(VRAM_IDSTR, window, vram_size, shared_by_nature=True),
        Region(BIOS_IDSTR, window + vram_size, bios_size, shared_by_nature=True),
        Region(FLASH_VARS_IDSTR, window + vram_size + bios_size, flash_vars_size, shared_by_nature=True),
    )


class RamBlock:
    """QEMU's RAMBlock: a named, page-aligned run of guest-physical pages backed by host frames."""

    __slots__ = ("idstr", "gpa", "npages", "frames", "shared_by_nature", "dirty_log", "enc")

    def __init__(self, idstr: str, gpa: int, frames: np.ndarray, shared_by_nature: bool) -> None:
        self.idstr = idstr
        self.gpa = gpa
        self.npages = int(frames.size)
        self.frames = frames
        self.shared_by_nature = shared_by_nature
        self.dirty_log = np.zeros(nwords(self.npages), dtype=np.uint64)
        self.enc = np.zeros(nwords(self.npages), dtype=np.uint64)
        self._reset_enc()

    def _reset_enc(self) -> None:
        """Boot default: RAM private, device regions shared (padding bits past npages stay zero)."""
        self.enc[:] = 0
        if not self.shared_by_nature:
            csev.bitmap_set_range(self.enc, 0, self.npages)

    @property
    def used_length(self) -> int:
        return self.npages * PAGE_SIZE

    @property
    def gfn(self) -> int:
        return self.gpa >> PAGE_SHIFT

    @property
    def end_gpa(self) -> int:
        return self.gpa + self.used_length

    def __repr__(self) -> str:
        kind = "shared" if self.shared_by_nature else "ram"
        return f"RamBlock({self.idstr!r}, gpa={self.gpa:#x}, npages={self.npages}, {kind})"


class GuestMemory:
    """The guest-physical memory map of one VM, its dirty log and its page-encryption state.

    ``layout`` is a RAM size in bytes (a ``q35_layout``) or a sequence of ``Region``.
    All mutation of ``dirty_log``/``enc`` happens under one lock (see the module docstring).
    """

    def __init__(self, dram: HostMemory, layout: int | Sequence[Region], *, encrypted: bool = True) -> None:
        """``encrypted=False`` is a VM without SEV: every block then behaves as shared by nature (never
        encrypted, always migrated in the clear, conversions ignored)."""
        regions = q35_layout(layout) if isinstance(layout, int) else tuple(layout)
        _check_layout(regions)
        self.dram = dram
        self._lock = threading.Lock()
        self._blocks: list[RamBlock] = []
        try:
            for r in sorted(regions, key=lambda r: r.gpa):
                frames = dram.alloc_ram(r.size >> PAGE_SHIFT)
                self._blocks.append(RamBlock(r.idstr, r.gpa, frames, r.shared_by_nature or not encrypted))
        except BaseException:
            self.free()
            raise
        self._by_id = {b.idstr: b for b in self._blocks}
        self._starts = [b.gfn for b in self._blocks]
        self._start_gfns = np.array(self._starts, dtype=np.int64)
        self._end_gfns = np.array([b.gfn + b.npages for b in self._blocks], dtype=np.int64)

    def __repr__(self) -> str:
        return f"GuestMemory({', '.join(f'{b.idstr}@{b.gpa:#x}+{b.used_length:#x}' for b in self._blocks)})"

    # -- the memory map ------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[RamBlock]:
        """All blocks, in guest-physical order (stable for the life of the VM)."""
        return list(self._blocks)

    def block(self, idstr: str) -> RamBlock:
        try:
            return self._by_id[idstr]
        except KeyError:
            raise KeyError(f"no RAM block {idstr!r} (have {', '.join(self._by_id)})") from None

    @property
    def ram(self) -> RamBlock:
        return self._by_id[RAM_IDSTR]

    @property
    def total_pages(self) -> int:
        return sum(b.npages for b in self._blocks)

    def translate(self, gpa: int) -> tuple[RamBlock, int]:
        """(block, page index in the block) of a guest-physical address."""
        if not 0 <= gpa <= U64_MAX:
            raise GpaError(f"GPA {gpa:#x} is not a 64-bit address")
        gfn = gpa >> PAGE_SHIFT
        i = bisect.bisect_right(self._starts, gfn) - 1
        if i >= 0:
            b = self._blocks[i]
            if gfn < b.gfn + b.npages:
                return b, gfn - b.gfn
        raise GpaError(f"GPA {gpa:#x} is not backed by any RAM block; map: {self._map_text()}")

    def locate_pages(self, gfns: np.ndarray) -> list[tuple[RamBlock, np.ndarray, np.ndarray]]:
        """Vectorised ``translate`` of guest page numbers: ``[(block, positions in gfns, page indices)]``."""
        gfns = np.asarray(gfns, dtype=np.int64)
        which = np.searchsorted(self._start_gfns, gfns, side="right") - 1
        bad = (which < 0) | (gfns >= self._end_gfns[np.maximum(which, 0)])
        if bad.any():
            gfn = int(gfns[np.argmax(bad)])
            raise GpaError(
                f"guest page {gfn:#x} (GPA {gfn << PAGE_SHIFT:#x}) is not backed by any RAM "
                f"block; map: {self._map_text()}"
            )
        out = []
        for i in np.unique(which):
            pos = np.flatnonzero(which == i)
            b = self._blocks[int(i)]
            out.append((b, pos, gfns[pos] - b.gfn))
        return out

    def _map_text(self) -> str:
        return ", ".join(f"{b.idstr} [{b.gpa:#x}, {b.end_gpa:#x})" for b in self._blocks)

    def _resolve(self, block: RamBlock | str) -> RamBlock:
        b = self.block(block) if isinstance(block, str) else block
        if self._by_id.get(b.idstr) is not b:
            raise ValueError(f"{b!r} does not belong to this guest")
        return b

    # -- dirty log (KVM_GET_DIRTY_LOG) ---------------------------------------------------------------
    def sync_dirty(self, block: RamBlock | str, dest_words: np.ndarray) -> int:
        """Fetch-and-clear the block's dirty log into ``dest_words`` (OR); return the newly dirty count.

        Call it BEFORE ``enc_snapshot`` in every pass (module docstring).
        """
        b = self._resolve(block)
        with self._lock:
            return csev.bitmap_sync(b.dirty_log, dest_words)

    def dirty_pending(self) -> int:
        """Pages dirtied since each block's log was last fetched (the log is not cleared)."""
        with self._lock:
            return sum(csev.bitmap_count(b.dirty_log, b.npages) for b in self.blocks)

    def mark_dirty(self, block: RamBlock | str, first_page: int, npages: int) -> None:
        b = self._resolve(block)
        with self._lock:
            csev.bitmap_set_range(b.dirty_log, first_page, npages)

    def mark_dirty_pages(self, block: RamBlock, pages: np.ndarray) -> None:
        """Mark scattered pages of one block dirty (the guest's write path; data already written)."""
        pages = np.asarray(pages, dtype=np.int64)
        if pages.size and (pages.min() < 0 or pages.max() >= block.npages):
            raise IndexError(f"page index out of range for {block!r}")
        bits = np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64))
        with self._lock:
            np.bitwise_or.at(block.dirty_log, pages >> 6, bits)

    # -- page-encryption state -----------------------------------------------------------------------
    def enc_snapshot(self, block: RamBlock | str) -> np.ndarray:
        """A copy of the block's encryption state (1 = private). Call it AFTER ``sync_dirty``."""
        b = self._resolve(block)
        with self._lock:
            return b.enc.copy()

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        """The KVM_HC_MAP_GPA_RANGE exit handler (Linux Documentation/virt/kvm/x86/hypercalls.rst): 0, or -EINVAL.

        Rejects what KVM rejects before exiting (unaligned ``gpa``, ``npages`` == 0, a range that
        wraps) and what the VMM rejects (MBZ bits 63:5, a page-size hint other than 4K/2M/1G, a range
        not fully backed by guest memory). Parts on shared_by_nature blocks are ignored, as QEMU
        ignored ROM. On success ``enc`` is updated first, THEN the range is marked dirty.
        """
        rc = self._check_map(gpa, npages, attrs)
        if rc:
            log.debug("MAP_GPA_RANGE gpa=%#x npages=%#x attrs=%#x -> %d", gpa, npages, attrs, rc)
            return rc
        encrypted = bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)
        spans = self._spans(gpa >> PAGE_SHIFT, npages)
        if spans is None:
            log.debug("MAP_GPA_RANGE gpa=%#x npages=%#x: not inside guest memory", gpa, npages)
            return -errno.EINVAL
        with self._lock:
            for b, first, n in spans:
                if b.shared_by_nature:
                    continue
                (csev.bitmap_set_range if encrypted else csev.bitmap_clear_range)(b.enc, first, n)
                csev.bitmap_set_range(b.dirty_log, first, n)  # after the state: see module docstring
        log.debug("MAP_GPA_RANGE gpa=%#x npages=%#x -> %s", gpa, npages, "private" if encrypted else "shared")
        return 0

    @staticmethod
    def _check_map(gpa: int, npages: int, attrs: int) -> int:
        if not all(0 <= v <= U64_MAX for v in (gpa, npages, attrs)):
            return -errno.EINVAL
        if gpa & (PAGE_SIZE - 1) or npages == 0 or (gpa >> PAGE_SHIFT) + npages > U64_MAX:
            return -errno.EINVAL  # KVM: !PAGE_ALIGNED(gpa) || !npages || gfn + npages wraps
        if attrs & _MAP_GPA_RANGE_MBZ:
            return -errno.EINVAL
        if (attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK) not in (
            KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
            KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
            KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
        ):
            return -errno.EINVAL
        return 0

    def _spans(self, gfn: int, npages: int) -> list[tuple[RamBlock, int, int]] | None:
        """Split [gfn, gfn + npages) over blocks; None if any page is not backed."""
        spans, end = [], gfn + npages
        i = bisect.bisect_right(self._starts, gfn) - 1
        while gfn < end:
            if i < 0 or i >= len(self._blocks):
                return None
            b = self._blocks[i]
            if not b.gfn <= gfn < b.gfn + b.npages:
                return None
            n = min(end, b.gfn + b.npages) - gfn
            spans.append((b, gfn - b.gfn, n))
            gfn += n
            i += 1
        return spans

    def reset_encryption_state(self) -> None:
        """Guest reset: RAM back to all-private, device regions shared (AMD 7604d4cf32's fix).

        Pages whose state changed are marked dirty, after the state, so a migration in flight
        re-sends them in their new mode.
        """
        with self._lock:
            for b in self._blocks:
                old = b.enc.copy()
                b._reset_enc()
                b.dirty_log |= old ^ b.enc
        log.debug("page-encryption state reset to boot default")

    def set_enc_bitmap(self, block: RamBlock | str, start_gpa: int, npages: int, words: np.ndarray) -> None:
        """Load an incoming encryption-state map for [start_gpa, +npages) of ``block`` (destination).

        The input is hostile: the range must lie inside the block, ``words`` must be exactly
        ceil(npages / 64) uint64 words, and a shared_by_nature block takes no private page.
        Bits past ``npages`` in the last word are ignored.
        """
        b = self._resolve(block)
        words = np.asarray(words)
        if words.dtype != np.uint64 or words.ndim != 1:
            raise ValueError(f"{b.idstr}: state map must be 1-D uint64 words, got {words.dtype}{words.shape}")
        if start_gpa & (PAGE_SIZE - 1):
            raise ValueError(f"{b.idstr}: state map start {start_gpa:#x} is not page aligned")
        first = (start_gpa - b.gpa) >> PAGE_SHIFT
        if not (b.gpa <= start_gpa and 0 < npages <= b.npages - first):
            raise ValueError(
                f"{b.idstr}: state map [{start_gpa:#x}, +{npages} pages) is outside "
                f"the block [{b.gpa:#x}, {b.end_gpa:#x})"
            )
        if words.size != nwords(npages):
            raise ValueError(f"{b.idstr}: {npages} pages need {nwords(npages)} words, got {words.size}")
        bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little", count=npages)
        if b.shared_by_nature and bits.any():
            raise ValueError(
                f"{b.idstr} is shared by nature, but the state map marks {int(bits.sum())} of its pages private"
            )
        w0, w1 = first // 64, nwords(first + npages)
        with self._lock:
            region = np.unpackbits(b.enc[w0:w1].astype("<u8").view(np.uint8), bitorder="little")
            region[first - w0 * 64 : first - w0 * 64 + npages] = bits
            b.enc[w0:w1] = np.packbits(region, bitorder="little").view("<u8")

    # -- lifetime ------------------------------------------------------------------------------------
    def free(self) -> None:
        """Return every block's frames to the host (contents discarded). Idempotent."""
        blocks, self._blocks = self._blocks, []
        for b in blocks:
            self.dram.free_ram(b.frames)


def _check_layout(regions: Sequence[Region]) -> None:
    if not regions:
        raise ValueError("a machine needs at least one memory region")
    seen: set[str] = set()
    for r in regions:
        if r.idstr in seen:
            raise ValueError(f"duplicate region {r.idstr!r}")
        seen.add(r.idstr)
        if r.gpa < 0 or r.gpa % PAGE_SIZE or r.size <= 0 or r.size % PAGE_SIZE:
            raise ValueError(f"region {r.idstr!r} at {r.gpa:#x} size {r.size:#x} is not page aligned and non-empty")
    ordered = sorted(regions, key=lambda r: r.gpa)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.gpa + a.size > b.gpa:
            raise ValueError(f"regions {a.idstr!r} and {b.idstr!r} overlap")
    if ordered[-1].gpa + ordered[-1].size > 1 << 52:
        raise ValueError("guest-physical space ends past 2**52")
