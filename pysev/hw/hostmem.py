"""The physical memory (DRAM) of one simulated host.

One flat, lazily backed mapping (``MAP_NORESERVE``): a 64 GiB host costs nothing until pages are
touched, so a 64 GiB guest with 1 GiB written fits in this machine's memory. Host physical address
(HPA) = byte offset into the mapping; frame = HPA >> PAGE_SHIFT. Guest RAM, firmware command buffers
and the hypervisor's bounce buffers all live here, which is what makes the memory controller's tweak
(the HPA; AMD64 Architecture Programmer's Manual, Vol. 2, "Secure Memory Encryption") and the
firmware's PADDR arguments real addresses rather than labels. Page geometry is ``csev.packet``'s.

Frames are handed out in shuffled 2 MiB chunks, so a guest's RAM is backed by non-contiguous frames
that differ between hosts (the reason ciphertext cannot be copied between them).
"""

from __future__ import annotations

import ctypes
import mmap
import threading

import numpy as np

from csev.packet import PAGE_SIZE

CHUNK_FRAMES = 512  # 2 MiB, the granule of guest-RAM allocation
KERNEL_CHUNKS = 8  # the first 16 MiB serve small kernel/firmware buffers, frame by frame

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)
CHUNK_BYTES = CHUNK_FRAMES * PAGE_SIZE
_libc = ctypes.CDLL(None, use_errno=True)


class OutOfHostMemoryError(MemoryError):
    """No free frames (or no contiguous kernel buffer) of the requested size."""


class HostMemory:
    """DRAM of one host: ``frames`` is a ``uint8[n_frames, PAGE_SIZE]`` view, ``flat`` the byte view."""

    def __init__(self, size: int, *, seed: int | None = None) -> None:
        n_chunks = -(-size // (CHUNK_FRAMES * PAGE_SIZE))
        if n_chunks <= KERNEL_CHUNKS:
            raise ValueError(f"host memory of {size} bytes is too small (need > {KERNEL_CHUNKS * 2} MiB)")
        self.size = n_chunks * CHUNK_BYTES
        # One chunk more than needed, so that HPA 0 can sit on a 2 MiB boundary of the address space:
        # then every chunk is exactly one transparent huge page when it is populated (see populate).
        self._map = mmap.mmap(-1, self.size + CHUNK_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self._base = -np.frombuffer(self._map, dtype=np.uint8).ctypes.data % CHUNK_BYTES
        self.flat = np.frombuffer(self._map, dtype=np.uint8, count=self.size, offset=self._base)
        self.frames = self.flat.reshape(-1, PAGE_SIZE)
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self._free_chunks = list(self._rng.permutation(np.arange(KERNEL_CHUNKS, n_chunks)))
        self._kernel_free = np.ones(KERNEL_CHUNKS * CHUNK_FRAMES, dtype=bool)

    @property
    def n_frames(self) -> int:
        return self.frames.shape[0]

    def alloc_ram(self, npages: int) -> np.ndarray:
        """Frames for ``npages`` of guest RAM: whole 2 MiB chunks in random order (uint64 frame numbers)."""
        need = -(-npages // CHUNK_FRAMES)
        with self._lock:
            if need > len(self._free_chunks):
                raise OutOfHostMemoryError(f"{npages} pages requested, {len(self._free_chunks) * CHUNK_FRAMES} free")
            chunks = np.array([self._free_chunks.pop() for _ in range(need)], dtype=np.uint64)
        frames = (chunks[:, None] * CHUNK_FRAMES + np.arange(CHUNK_FRAMES, dtype=np.uint64)).ravel()
        return frames[:npages].copy()

    def populate(self, frames: np.ndarray) -> None:
        """Back the chunks holding ``frames`` now, with transparent huge pages where the kernel has them
        (QEMU's -mem-prealloc, and the MADV_HUGEPAGE QEMU gives guest RAM). For RAM a guest uses whole:
        a destination receiving a migration takes no page fault per page in its hot path, and the
        pipelines' random page accesses miss the TLB far less. Sparse guests are not populated, so a
        64 GiB guest that touches little still costs little (no 2 MiB page per touched 4 KiB)."""
        chunks = np.unique(np.asarray(frames, dtype=np.uint64) // CHUNK_FRAMES)
        for c in chunks.tolist():
            start = self._base + c * CHUNK_BYTES
            try:
                self._map.madvise(_MADV_HUGEPAGE, start, CHUNK_BYTES)
            except OSError:  # a kernel without transparent huge pages: 4 KiB pages do
                pass
            try:
                self._map.madvise(_MADV_POPULATE_WRITE, start, CHUNK_BYTES)
            except OSError:  # kernels before 5.14: touch one byte per page instead
                self.flat[c * CHUNK_BYTES : (c + 1) * CHUNK_BYTES : PAGE_SIZE] = 0

    def free_ram(self, frames: np.ndarray) -> None:
        """Return guest-RAM frames; their contents are discarded (zero, and no longer resident)."""
        chunks = np.unique(np.asarray(frames, dtype=np.uint64) // CHUNK_FRAMES)
        for c in chunks:
            self._discard(int(c) * CHUNK_FRAMES, CHUNK_FRAMES)
            try:  # the next guest on these frames may be sparse: no huge pages unless it populates
                self._map.madvise(_MADV_NOHUGEPAGE, self._base + int(c) * CHUNK_BYTES, CHUNK_BYTES)
            except OSError:
                pass
        with self._lock:
            self._free_chunks.extend(int(c) for c in chunks)

    def alloc_kernel(self, length: int) -> int:
        """A physically contiguous, zeroed buffer for firmware/kernel use; returns its HPA."""
        n = max(1, -(-length // PAGE_SIZE))
        with self._lock:
            free = self._kernel_free
            # first run of n free frames
            run = np.flatnonzero(np.convolve(free, np.ones(n, dtype=int), mode="valid") == n)
            if run.size == 0:
                raise OutOfHostMemoryError(f"no contiguous kernel buffer of {length} bytes")
            first = int(run[0])
            free[first : first + n] = False
        self.flat[first * PAGE_SIZE : (first + n) * PAGE_SIZE] = 0
        return first * PAGE_SIZE

    def free_kernel(self, hpa: int, length: int) -> None:
        first, n = hpa // PAGE_SIZE, max(1, -(-length // PAGE_SIZE))
        self.flat[hpa : hpa + n * PAGE_SIZE] = 0
        with self._lock:
            self._kernel_free[first : first + n] = True

    def contains(self, hpa: int, length: int) -> bool:
        return 0 <= hpa and length >= 0 and hpa + length <= self.size

    def read(self, hpa: int, length: int) -> bytes:
        if not self.contains(hpa, length):
            raise IndexError(f"HPA range [{hpa:#x}, +{length:#x}) outside host memory")
        return self.flat[hpa : hpa + length].tobytes()

    def write(self, hpa: int, data: bytes) -> None:
        if not self.contains(hpa, len(data)):
            raise IndexError(f"HPA range [{hpa:#x}, +{len(data):#x}) outside host memory")
        self.flat[hpa : hpa + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def _discard(self, first_frame: int, n: int) -> None:
        start, length = first_frame * PAGE_SIZE, n * PAGE_SIZE
        self._map.madvise(mmap.MADV_DONTNEED, self._base + start, length)

    def release(self) -> None:
        """Discard every byte of this host's memory (the mapping stays, unbacked): what a host that is
        shut down gives back."""
        self._map.madvise(mmap.MADV_DONTNEED, 0, len(self._map))

    def resident_bytes(self) -> int:
        """Bytes of host memory actually backed by RAM (mincore(2) over exactly this mapping, so an
        adjacent mapping that the kernel merged into the same VMA is not counted), for memory tests."""
        resident = 0
        step = 1 << 30
        vec = np.empty(step // PAGE_SIZE, dtype=np.uint8)
        addr = self.flat.ctypes.data
        for off in range(0, self.size, step):
            n = min(step, self.size - off)
            if _libc.mincore(ctypes.c_void_p(addr + off), ctypes.c_size_t(n), vec.ctypes.data_as(ctypes.c_void_p)):
                raise OSError(ctypes.get_errno(), "mincore failed")
            resident += int(np.count_nonzero(vec[: n // PAGE_SIZE] & 1))
        return resident * PAGE_SIZE
