"""The guest side of a running SEV VM: its own C-bit map, its memory accesses, and a vCPU workload.

``Guest`` is what the guest kernel does to memory. It keeps its page tables' C-bit per page (all
RAM private at boot), writes private pages through the memory controller under the guest's VEK
(``MemoryController.write_pages``: ciphertext in DRAM, tweak = HPA) and shared pages straight into
DRAM, and marks the pages dirty after the data is written (memory.py, ordering invariant 4). Page
conversions follow Linux: the KVM_HC_MAP_GPA_RANGE hypercall, the C-bit change, and old contents
treated as lost — fresh contents are written through the new mapping (Sean Christopherson's
answer to race #3, the KVM list, Sean Christopherson, Message-Id <YEaAXXGZH0uSMA3v@google.com>).

``Workload`` runs vCPU threads that dirty guest RAM at a set rate with a set access pattern, flip
DMA bounce pages between private and shared, and redraw the VGA framebuffer: the load a live
migration has to converge against. Throttling follows QEMU's cpu_throttle (auto-converge).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref

import numpy as np

import csev
from csev.packet import PAGE_SHIFT, PAGE_SIZE
from pysev.hv.memory import (
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    VRAM_IDSTR,
    GuestMemory,
    RamBlock,
    nwords,
)
from pysev.hw.memctl import MemoryController

log = logging.getLogger(__name__)

#: Pages per memory-controller call on a vCPU: csev runs batches this small inline on the calling
#: thread (larger ones fan out to its pool), so a vCPU stays on one core.
VCPU_CHUNK = 32
#: Pages per fresh-content write when a conversion covers a large range.
_CONVERT_CHUNK = 256

# The framebuffer: 1024 x 768 at 32 bpp, so one scanline is exactly one 4 KiB page.
FB_WIDTH, FB_HEIGHT = 1024, 768
#: Scanlines redrawn per frame (a moving band: 1/8 of the screen).
FB_BAND = 96

_WORD_SALT = np.arange(PAGE_SIZE // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def page_pattern(gfns: np.ndarray, seq: int, out: np.ndarray | None = None) -> np.ndarray:
    """Cheap, checkable page contents: word 0 = gfn << 24 | seq (24 bits), word i = word 0 ^ salt(i)."""
    gfns = np.asarray(gfns, dtype=np.uint64)
    if out is None:
        out = np.empty((gfns.size, PAGE_SIZE), dtype=np.uint8)
    base = (gfns << np.uint64(24)) | np.uint64(seq & 0xFFFFFF)
    np.bitwise_xor(base[:, None], _WORD_SALT[None, :], out=out.view(np.uint64))
    return out


def framebuffer_lines(rows: np.ndarray, frame_no: int) -> np.ndarray:
    """Scanlines ``rows`` of frame ``frame_no``: BGRX pixels (x+f, y+f, f) as uint8[k, 4096]."""
    y = np.asarray(rows, dtype=np.uint32)[:, None]
    x = np.arange(FB_WIDTH, dtype=np.uint32)[None, :]
    f = np.uint32(frame_no & 0xFF)
    px = np.uint32(0xFF000000) | (((x + f) & 0xFF) << 16) | (((y + f) & 0xFF) << 8) | f
    return np.ascontiguousarray(px.astype("<u4")).view(np.uint8)


class Guest:
    """One SEV guest's view of its memory: C-bit map, reads, writes, conversions."""

    def __init__(
        self, memory: GuestMemory, memctl: MemoryController | None, asid: int, *, seed: int | None = None
    ) -> None:
        """``memctl`` None: a guest without SEV (no C-bit; every page written in the clear)."""
        if memctl is not None and not memctl.has_key(asid):
            raise ValueError(f"no VEK installed for ASID {asid}: launch the guest first")
        self.memory = memory
        self.memctl = memctl
        self.asid = asid
        self.rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._cbit: dict[str, np.ndarray] = {}
        self.reset_cbits()

    def __repr__(self) -> str:
        return f"Guest(asid={self.asid}, {self.memory!r})"

    # -- the guest's page tables ---------------------------------------------------------------------
    def reset_cbits(self) -> None:
        """Boot default: every RAM page private (C-bit set), device regions shared."""
        cbit = {}
        for b in self.memory.blocks:
            words = np.zeros(nwords(b.npages), dtype=np.uint64)
            if not b.shared_by_nature:
                csev.bitmap_set_range(words, 0, b.npages)
            cbit[b.idstr] = words
        with self._lock:
            self._cbit = cbit

    def load_cbits_from_state_map(self) -> None:
        """After an incoming migration: the guest's page tables are the migrated private/shared map."""
        with self._lock:
            self._cbit = {b.idstr: b.enc.copy() for b in self.memory.blocks}

    def cbit_map(self, block: RamBlock) -> np.ndarray:
        """The guest's own private/shared map of ``block`` (its page tables' C-bits), a copy."""
        with self._lock:
            return self._cbit[block.idstr].copy()

    def is_private(self, gpa_pages: np.ndarray) -> np.ndarray:
        """C-bit of each guest page, as bool."""
        gfns = np.asarray(gpa_pages, dtype=np.int64)
        out = np.empty(gfns.size, dtype=bool)
        for b, pos, idx in self.memory.locate_pages(gfns):
            out[pos] = self._private_mask(b, idx)
        return out

    def _private_mask(self, block: RamBlock, idx: np.ndarray) -> np.ndarray:
        with self._lock:
            words = self._cbit[block.idstr][idx >> 6]
        return ((words >> (idx & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)

    # -- memory accesses -----------------------------------------------------------------------------
    def write_pages(self, gpa_pages: np.ndarray, data: np.ndarray) -> None:
        """Write whole pages (guest page numbers): C-bit=1 through the VEK, C-bit=0 straight to DRAM.

        The pages are marked dirty after the data is in DRAM.
        """
        gfns = np.asarray(gpa_pages, dtype=np.int64).ravel()
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.shape != (gfns.size, PAGE_SIZE) or not data.flags.c_contiguous:
            raise ValueError(f"data must be C-contiguous uint8[{gfns.size}, {PAGE_SIZE}], got {data.dtype}{data.shape}")
        for b, pos, idx in self.memory.locate_pages(gfns):
            whole = pos.size == gfns.size  # one block: rows of data in order, no gather needed
            rows = data if whole else data[pos]
            frames = b.frames[idx]
            priv = self._private_mask(b, idx)
            if priv.all():
                self._write_private(frames, rows)
            elif not priv.any():
                self.memory.dram.frames[frames] = rows
            else:
                self._write_private(frames[priv], rows[priv])
                self.memory.dram.frames[frames[~priv]] = rows[~priv]
            self.memory.mark_dirty_pages(b, idx)

    def _private_memctl(self) -> MemoryController:
        """The memory controller that reaches private pages; only an SEV guest has private pages."""
        if self.memctl is None:
            raise RuntimeError("a guest without SEV has no private pages")
        return self.memctl

    def _write_private(self, frames: np.ndarray, rows: np.ndarray) -> None:
        memctl = self._private_memctl()
        for i in range(0, frames.size, VCPU_CHUNK):
            memctl.write_pages(self.asid, frames[i : i + VCPU_CHUNK], rows[i : i + VCPU_CHUNK])

    def read_pages(self, gpa_pages: np.ndarray) -> np.ndarray:
        """Read whole pages as the guest sees them (decrypted where its C-bit is set)."""
        gfns = np.asarray(gpa_pages, dtype=np.int64).ravel()
        out = np.empty((gfns.size, PAGE_SIZE), dtype=np.uint8)
        for b, pos, idx in self.memory.locate_pages(gfns):
            frames = b.frames[idx]
            priv = self._private_mask(b, idx)
            if priv.any():
                out[pos[priv]] = self._private_memctl().read_pages(self.asid, frames[priv])
            out[pos[~priv]] = self.memory.dram.frames[frames[~priv]]
        return out

    def plant(self, gpa_pages: np.ndarray, marker: bytes) -> None:
        """Test helper: write pages filled with ``marker`` repeated."""
        if not 0 < len(marker) <= PAGE_SIZE:
            raise ValueError(f"marker must be 1..{PAGE_SIZE} bytes, got {len(marker)}")
        gfns = np.asarray(gpa_pages, dtype=np.int64).ravel()
        page = np.frombuffer((bytes(marker) * (PAGE_SIZE // len(marker) + 1))[:PAGE_SIZE], dtype=np.uint8)
        self.write_pages(gfns, np.ascontiguousarray(np.broadcast_to(page, (gfns.size, PAGE_SIZE))))

    def draw_framebuffer(self, frame_no: int) -> int:
        """Redraw a band of ``FB_BAND`` scanlines of vga.vram for this frame; returns pages written."""
        vram = self.memory.block(VRAM_IDSTR)
        rows = (frame_no * FB_BAND + np.arange(FB_BAND)) % min(FB_HEIGHT, vram.npages)
        self.write_pages(vram.gfn + rows, framebuffer_lines(rows, frame_no))
        return int(rows.size)

    # -- conversions (Linux set_memory_decrypted / set_memory_encrypted) -------------------------------
    def set_shared(self, gpa: int, npages: int) -> None:
        self._convert(gpa, npages, private=False)

    def set_private(self, gpa: int, npages: int) -> None:
        self._convert(gpa, npages, private=True)

    def _convert(self, gpa: int, npages: int, *, private: bool) -> None:
        block, first = self.memory.translate(gpa)
        if block.shared_by_nature or gpa & (PAGE_SIZE - 1) or not 0 < npages <= block.npages - first:
            raise ValueError(f"guest converts only its own RAM: [{gpa:#x}, +{npages} pages) in {block!r}")
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if private else KVM_MAP_GPA_RANGE_DECRYPTED
        rc = self.memory.map_gpa_range(gpa, npages, attrs)
        if rc:
            raise OSError(-rc, f"KVM_HC_MAP_GPA_RANGE gpa={gpa:#x} npages={npages} attrs={attrs:#x} failed")
        with self._lock:
            words = self._cbit[block.idstr]
            (csev.bitmap_set_range if private else csev.bitmap_clear_range)(words, first, npages)
        # Old contents are lost the instant the host is told (race #3, Message-Id <YEaAXXGZH0uSMA3v@google.com>).
        zeros = np.zeros((min(npages, _CONVERT_CHUNK), PAGE_SIZE), dtype=np.uint8)
        gfn = gpa >> PAGE_SHIFT
        for i in range(0, npages, _CONVERT_CHUNK):
            n = min(_CONVERT_CHUNK, npages - i)
            self.write_pages(np.arange(gfn + i, gfn + i + n), zeros[:n])

    def reboot(self) -> None:
        """Guest reset: the VMM's state map and the guest's page tables back to boot default."""
        self.memory.reset_encryption_state()
        self.reset_cbits()


PATTERNS = ("uniform", "hotset", "sequential")
SLICE = 0.010  # seconds of vCPU run time per batch (QEMU's CPU_THROTTLE_TIMESLICE is 10 ms)
_MAX_CREDIT = 5  # slices of write debt a vCPU may catch up after a stall
_BOUNCE_POOL = 64  # pages a workload keeps shared at most


class Workload:
    """vCPU threads dirtying guest RAM.

    ``dirty_rate`` (bytes/s of guest RAM writes over all vCPUs, 0 = idle; read every slice, so it can
    be changed while running), ``pattern``: "uniform" (random pages of RAM), "hotset" (random pages
    of a fixed window of ``hot_fraction`` of RAM) or "sequential" (a cursor sweeping RAM);
    ``convert_rate`` (pages/s flipped private<->shared, as DMA bounce buffers), ``vga_fps``
    (framebuffer bands redrawn per second, by vCPU 0).
    """

    def __init__(
        self,
        guest: Guest,
        *,
        dirty_rate: float = 0.0,
        pattern: str = "uniform",
        hot_fraction: float = 0.1,
        convert_rate: float = 0.0,
        vga_fps: float = 0.0,
        vcpus: int = 1,
        seed: int | None = None,
    ) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        if not 0 < hot_fraction <= 1:
            raise ValueError(f"hot_fraction must be in (0, 1], got {hot_fraction}")
        if min(dirty_rate, convert_rate, vga_fps) < 0 or vcpus < 1:
            raise ValueError("rates must be non-negative and vcpus >= 1")
        self.guest = guest
        self.dirty_rate = float(dirty_rate)
        self.pattern = pattern
        self.convert_rate = float(convert_rate)
        self.vga_fps = float(vga_fps)
        self.vcpus = vcpus
        ram = guest.memory.ram
        self._ram = ram
        self._seeds = np.random.SeedSequence(seed).spawn(vcpus + 1)
        rng = np.random.default_rng(self._seeds[-1])
        self._hot_pages = max(1, int(ram.npages * hot_fraction))
        self._hot_start = int(rng.integers(0, ram.npages))
        self._cv = threading.Condition()
        self._paused = False
        self._stopping = False
        self._active = 0
        self._throttle = 0
        self._threads: list[threading.Thread] = []
        self._bounce: list[int] = []  # shared bounce pages (block page indices), oldest first
        self._bounce_set: set[int] = set()
        self.pages_written = 0
        self.conversions = 0
        self.frames_drawn = 0
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        state = "stopped" if not self._threads else "paused" if self._paused else "running"
        return (
            f"Workload({state}, {self.dirty_rate / 1e6:g} MB/s {self.pattern}, "
            f"vcpus={self.vcpus}, throttle={self._throttle}%)"
        )

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def bytes_written(self) -> int:
        return self.pages_written * PAGE_SIZE

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def throttle(self) -> int:
        return self._throttle

    # -- control ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("workload already started")
        with self._cv:
            self._active = self.vcpus
        self._threads = [
            threading.Thread(target=self._vcpu, args=(i,), name=f"vcpu{i}", daemon=True) for i in range(self.vcpus)
        ]
        _running.add(self)
        for t in self._threads:
            t.start()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop the vCPUs; returns once every vCPU thread is parked (no write in flight)."""
        with self._cv:
            self._paused = True
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: self._active == 0, timeout):
                raise TimeoutError(f"vCPUs did not park within {timeout} s")

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Stop and join the vCPU threads (each within ``timeout`` seconds if given); re-raises a vCPU's
        failure."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)
        _running.discard(self)
        if self.error is not None:
            raise RuntimeError("a vCPU thread failed") from self.error

    def set_throttle(self, percent: int) -> None:
        """Auto-converge: the vCPUs sleep ``percent`` % of the time (QEMU cpu_throttle, 0..99)."""
        if not 0 <= percent <= 99:
            raise ValueError(f"throttle must be 0..99 %, got {percent}")
        with self._cv:
            self._throttle = int(percent)
            self._cv.notify_all()

    def reset(self) -> None:
        """Guest reboot: pause, reset the encryption state and C-bit map, resume if it was running."""
        was_running = bool(self._threads) and not self._paused
        self.pause()
        try:
            self.guest.reboot()
            with self._cv:
                self._bounce.clear()
                self._bounce_set.clear()
        finally:
            if was_running:
                self.resume()

    # -- the vCPU --------------------------------------------------------------------------------------
    def _park(self) -> bool:
        """Checkpoint between batches: park while paused. False when stopping."""
        with self._cv:
            if not (self._paused or self._stopping):
                return True
            self._active -= 1
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._paused or self._stopping)
            if self._stopping:
                return False
            self._active += 1
            return True

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking early to pause or stop."""
        if seconds > 0:
            with self._cv:
                self._cv.wait_for(lambda: self._paused or self._stopping, seconds)

    def _vcpu(self, vcpu: int) -> None:
        rng = np.random.default_rng(self._seeds[vcpu])
        ram = self._ram
        cursor = ram.npages * vcpu // self.vcpus
        seq = vcpu << 20
        buf = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        owed = self.dirty_rate / self.vcpus * SLICE / PAGE_SIZE
        owed_conv = 0.0
        next_frame = time.monotonic()
        parked = False
        try:
            while True:
                if not self._park():
                    parked = True
                    return
                start = time.monotonic()
                written = 0
                n = int(owed)
                owed -= n
                if n:
                    gfns, cursor = self._pick(rng, n, cursor)
                    if buf.shape[0] < gfns.size:
                        buf = np.empty((gfns.size, PAGE_SIZE), dtype=np.uint8)
                    seq += 1
                    self.guest.write_pages(gfns, page_pattern(gfns, seq, buf[: gfns.size]))
                    written += gfns.size
                conv = int(owed_conv)
                owed_conv -= conv
                converted = sum(self._convert_one(rng) for _ in range(conv))
                frames = 0
                if vcpu == 0 and self.vga_fps > 0 and start >= next_frame:
                    written += self.guest.draw_framebuffer(self.frames_drawn + frames)
                    frames += 1
                    next_frame = max(next_frame + 1 / self.vga_fps, start)
                with self._cv:
                    self.pages_written += written + converted
                    self.conversions += converted
                    self.frames_drawn += frames
                    throttle = self._throttle
                self._sleep(start + SLICE - time.monotonic())
                run = time.monotonic() - start
                cap = _MAX_CREDIT * SLICE
                owed = min(
                    owed + self.dirty_rate / self.vcpus * run / PAGE_SIZE,
                    self.dirty_rate / self.vcpus * cap / PAGE_SIZE + 1,
                )
                owed_conv = min(
                    owed_conv + self.convert_rate / self.vcpus * run, self.convert_rate / self.vcpus * cap + 1
                )
                if throttle:
                    self._sleep(SLICE * throttle / (100 - throttle))
        except BaseException as exc:  # surfaced by stop()
            log.exception("vCPU %d failed", vcpu)
            self.error = self.error or exc
        finally:
            if not parked:
                with self._cv:
                    self._active -= 1
                    self._cv.notify_all()

    def _pick(self, rng: np.random.Generator, n: int, cursor: int) -> tuple[np.ndarray, int]:
        """Guest page numbers of the next batch (sorted, distinct) and the new sequential cursor."""
        npages = self._ram.npages
        n = min(n, npages)
        if self.pattern == "sequential":
            idx = (cursor + np.arange(n)) % npages
            cursor = (cursor + n) % npages
            idx.sort()
        elif self.pattern == "hotset":
            hot = min(self._hot_pages, npages)
            idx = np.sort((self._hot_start + rng.choice(hot, min(n, hot), replace=False)) % npages)
        else:
            idx = np.sort(rng.choice(npages, n, replace=False))
        return self._ram.gfn + idx, cursor

    def _convert_one(self, rng: np.random.Generator) -> int:
        """One DMA bounce-buffer event: share a fresh RAM page, or return the oldest one to private."""
        with self._cv:
            if self._bounce and (len(self._bounce) >= _BOUNCE_POOL or rng.random() < 0.5):
                page, private = self._bounce.pop(0), True  # stays in _bounce_set until converted
            else:
                page = int(rng.integers(0, self._ram.npages))
                if page in self._bounce_set:
                    return 0
                self._bounce.append(page)
                self._bounce_set.add(page)
                private = False
        gpa = self._ram.gpa + (page << PAGE_SHIFT)
        (self.guest.set_private if private else self.guest.set_shared)(gpa, 1)
        if private:
            with self._cv:
                self._bounce_set.discard(page)
        return 1


# vCPU threads are daemons, so a VM left running does not keep the interpreter alive. But a daemon
# thread that is still running at finalization is killed by a forced unwind when it next takes the GIL,
# and one inside numpy's C++ loops then aborts the process ("terminate called without an active
# exception"). Stopping every running workload at exit, before finalization, prevents that.
_running: weakref.WeakSet[Workload] = weakref.WeakSet()


@atexit.register
def _stop_running_workloads() -> None:
    for workload in list(_running):
        try:
            workload.stop(timeout=5.0)  # never hang the exit on a stuck vCPU
        except Exception:  # noqa: BLE001 — exiting anyway; a vCPU failure was already logged by its thread
            pass
