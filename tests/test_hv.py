"""The hypervisor side: RAM blocks, dirty log, page-encryption state, the guest and its workload.

The SEV context is a real launch through ``pysev.kvm`` (KVM_SEV_INIT, LAUNCH_START, LAUNCH_MEASURE,
LAUNCH_FINISH), so the guest's VEK is installed for ``sev_kvm.asid`` in the platform's memory controller.
"""

import ctypes
import errno
import subprocess
import textwrap
import threading
import time

import numpy as np
import pytest

import csev
from pysev import kvm
from pysev.cli import python_command
from pysev.firmware.sev import Platform, Policy, make_policy
from pysev.hv import memory as hvmem
from pysev.hv.guest import FB_BAND, Guest, Workload, framebuffer_lines, page_pattern
from pysev.hv.memory import (
    BIOS_IDSTR,
    FLASH_VARS_IDSTR,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    RAM_IDSTR,
    VRAM_IDSTR,
    GpaError,
    GuestMemory,
    Region,
    nwords,
)
from pysev.hw.hostmem import PAGE_SIZE, HostMemory

MiB, GiB = 1 << 20, 1 << 30
EINVAL = -errno.EINVAL


@pytest.fixture(scope="session")
def sev(tmp_path_factory):
    """A launched SEV guest context on a 66 GiB (lazily backed) host: (platform, sev_kvm)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYSEV_HOME", str(tmp_path_factory.mktemp("pysev-home")))
        platform = Platform(HostMemory(66 * GiB, seed=1))
        sev_kvm = kvm.KvmHost(platform).create_vm()
        sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_INIT)
        sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_START, kvm.kvm_sev_launch_start(policy=make_policy(Policy.SEV, 0, 17)))
        m = ctypes.create_string_buffer(48)
        sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_MEASURE, kvm.kvm_sev_launch_measure(uaddr=ctypes.addressof(m), len=48))
        sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_FINISH)
        yield platform, sev_kvm


@pytest.fixture
def mem(sev):
    platform, _ = sev
    m = GuestMemory(platform.dram, 64 * MiB)
    yield m
    m.free()


@pytest.fixture
def guest(sev, mem):
    platform, sev_kvm = sev
    return Guest(mem, platform.memctl, sev_kvm.asid, seed=7)


def bits(words, n):
    return np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little", count=n).astype(bool)


def drain(mem):
    """Fetch-and-clear every block's dirty log: {idstr: bool[npages]}."""
    out = {}
    for b in mem.blocks:
        dest = np.zeros(nwords(b.npages), dtype=np.uint64)
        mem.sync_dirty(b, dest)
        out[b.idstr] = bits(dest, b.npages)
    return out


# -- blocks and translation ----------------------------------------------------------------------------
def test_q35_blocks(mem):
    ids = [b.idstr for b in mem.blocks]
    assert ids == [RAM_IDSTR, VRAM_IDSTR, BIOS_IDSTR, FLASH_VARS_IDSTR]
    ram, vram = mem.block(RAM_IDSTR), mem.block(VRAM_IDSTR)
    assert (ram.gpa, ram.used_length, ram.shared_by_nature) == (0, 64 * MiB, False)
    assert vram.gpa >= ram.end_gpa and vram.gpa % GiB == 0 and vram.used_length == 16 * MiB
    assert mem.block(BIOS_IDSTR).used_length == 256 * 1024
    assert mem.block(FLASH_VARS_IDSTR).used_length == 128 * 1024
    assert mem.total_pages == sum(b.npages for b in mem.blocks)
    for b in mem.blocks:
        assert b.gpa % PAGE_SIZE == 0 and b.frames.dtype == np.uint64 and b.frames.size == b.npages
        assert b.dirty_log.size == b.enc.size == nwords(b.npages) and not b.dirty_log.any()
        # RAM boots all-private (no padding bits), device regions shared
        assert csev.bitmap_count(b.enc) == (0 if b.shared_by_nature else b.npages)
        assert b.shared_by_nature == (b.idstr != RAM_IDSTR)
    frames = np.concatenate([b.frames for b in mem.blocks])
    assert np.unique(frames).size == frames.size
    assert (np.diff(ram.frames.astype(np.int64)) != 1).any()  # not one contiguous host run
    with pytest.raises(KeyError, match="no RAM block"):
        mem.block("pc.rom")


def test_translate(mem):
    ram, vram = mem.block(RAM_IDSTR), mem.block(VRAM_IDSTR)
    assert mem.translate(0) == (ram, 0)
    assert mem.translate(0x12345) == (ram, 0x12)
    assert mem.translate(ram.end_gpa - 1) == (ram, ram.npages - 1)
    assert mem.translate(vram.gpa + 5 * PAGE_SIZE) == (vram, 5)
    for gpa in (ram.end_gpa, vram.gpa - 1, mem.blocks[-1].end_gpa, 1 << 60, -1):
        with pytest.raises(GpaError, match="not"):
            mem.translate(gpa)
    groups = mem.locate_pages(np.array([vram.gfn + 1, 3, vram.gfn]))
    assert [(b.idstr, pos.tolist(), idx.tolist()) for b, pos, idx in groups] == [
        (RAM_IDSTR, [1], [3]),
        (VRAM_IDSTR, [0, 2], [1, 0]),
    ]
    with pytest.raises(GpaError, match="guest page"):
        mem.locate_pages(np.array([3, ram.npages]))


@pytest.mark.parametrize(
    "regions, match",
    [
        ([], "at least one"),
        ([Region("a", 0, 4096), Region("a", 8192, 4096)], "duplicate"),
        ([Region("a", 0, 100)], "page aligned"),
        ([Region("a", 4097, 4096)], "page aligned"),
        ([Region("a", 0, 8192), Region("b", 4096, 4096)], "overlap"),
    ],
)
def test_layout_validation(sev, regions, match):
    with pytest.raises(ValueError, match=match):
        GuestMemory(sev[0].dram, regions)


# -- KVM_HC_MAP_GPA_RANGE --------------------------------------------------------------------------------
def _state(mem):
    return [(b.enc.copy(), b.dirty_log.copy()) for b in mem.blocks]


@pytest.mark.parametrize(
    "gpa, npages, attrs",
    [
        pytest.param(0x800, 1, 0, id="unaligned-gpa"),
        pytest.param(0x1000, 0, 0, id="npages-0"),
        pytest.param(0xFFFF_FFFF_FFFF_F000, 2, 0, id="gfn-overflow"),
        pytest.param(0x1000, (1 << 64) - 1, 0, id="npages-overflow"),
        pytest.param(0x1000, 1, 1 << 5, id="mbz-bit5"),
        pytest.param(0x1000, 1, 1 << 63 | KVM_MAP_GPA_RANGE_ENCRYPTED, id="mbz-bit63"),
        pytest.param(0x1000, 1, 3, id="page-size-3"),
        pytest.param(0x1000, 1, 0xF, id="page-size-15"),
        pytest.param(64 * MiB - PAGE_SIZE, 2, 0, id="past-ram-end"),
        pytest.param(64 * MiB, 1, 0, id="in-hole"),
        pytest.param(1 << 51, 1, 0, id="far-away"),
        pytest.param(-PAGE_SIZE, 1, 0, id="negative"),
    ],
)
def test_map_gpa_range_einval(mem, gpa, npages, attrs):
    before = _state(mem)
    assert mem.map_gpa_range(gpa, npages, attrs) == EINVAL
    for (e0, d0), (e1, d1) in zip(before, _state(mem), strict=True):
        assert np.array_equal(e0, e1) and np.array_equal(d0, d1)


@pytest.mark.parametrize("hint", [0, 1, 2])
def test_map_gpa_range_page_size_hints(mem, hint):
    ram = mem.ram
    assert mem.map_gpa_range(2 * MiB, 512, hint) == 0
    assert bits(mem.enc_snapshot(ram), ram.npages)[512:1024].sum() == 0
    assert mem.map_gpa_range(2 * MiB, 512, hint | KVM_MAP_GPA_RANGE_ENCRYPTED) == 0
    assert csev.bitmap_count(mem.enc_snapshot(ram)) == ram.npages


def test_map_gpa_range_shared_by_nature_ignored(mem):
    vram, bios = mem.block(VRAM_IDSTR), mem.block(BIOS_IDSTR)
    assert mem.map_gpa_range(vram.gpa, 16, KVM_MAP_GPA_RANGE_ENCRYPTED) == 0
    # spanning two device blocks is still fully inside guest memory
    assert mem.map_gpa_range(vram.end_gpa - PAGE_SIZE, 2, KVM_MAP_GPA_RANGE_ENCRYPTED) == 0
    assert not vram.enc.any() and not bios.enc.any()
    assert not any(d.any() for d in drain(mem).values())


def test_flip_updates_state_then_marks_dirty(mem, monkeypatch):
    ram = mem.ram
    events = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(csev, name)

            def wrapped(words, *args):
                which = "enc" if words is ram.enc else "dirty" if words is ram.dirty_log else "?"
                events.append((which, mem._lock.locked()))
                return fn(words, *args)

            return wrapped

    monkeypatch.setattr(hvmem, "csev", Spy())
    assert mem.map_gpa_range(10 * PAGE_SIZE, 3, 0) == 0
    assert events == [("enc", True), ("dirty", True)]
    monkeypatch.undo()
    enc = bits(mem.enc_snapshot(ram), ram.npages)
    assert not enc[10:13].any() and enc[:10].all() and enc[13:].all()
    assert np.flatnonzero(drain(mem)[RAM_IDSTR]).tolist() == [10, 11, 12]


def test_flips_race_free_with_engine_order(mem):
    """An engine that syncs dirty FIRST and snapshots enc AFTER ends with the exact state of every page."""
    ram = mem.ram
    pages = np.arange(0, 256, 3)
    stop = threading.Event()

    def flipper():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            p = int(rng.choice(pages))
            mem.map_gpa_range(p * PAGE_SIZE, 1, KVM_MAP_GPA_RANGE_ENCRYPTED * int(rng.integers(2)))

    sent = bits(mem.enc_snapshot(ram), ram.npages)  # the destination's view after the first pass
    t = threading.Thread(target=flipper, daemon=True)
    t.start()
    dest = np.zeros(nwords(ram.npages), dtype=np.uint64)

    def one_pass():
        dest[:] = 0
        mem.sync_dirty(ram, dest)
        enc = bits(mem.enc_snapshot(ram), ram.npages)
        dirty = bits(dest, ram.npages)
        sent[dirty] = enc[dirty]

    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        one_pass()
    stop.set()
    t.join()
    one_pass()  # the final pass, "vCPUs paused"
    assert np.array_equal(sent, bits(ram.enc, ram.npages))


def test_state_first_order_would_lose_a_flip(mem):
    """Why the engine syncs dirty before it snapshots state (memory.py docstring, Dave's order reversed)."""
    ram = mem.ram
    dest = np.zeros(nwords(ram.npages), dtype=np.uint64)
    stale = mem.enc_snapshot(ram)  # state first ...
    assert mem.map_gpa_range(0, 1, 0) == 0  # ... a flip lands in between ...
    mem.sync_dirty(ram, dest)  # ... and its dirty bit is consumed with the old state
    assert bits(dest, 1)[0] and bits(stale, 1)[0] and not bits(ram.enc, 1)[0]
    assert not ram.dirty_log.any()  # nothing would ever re-send page 0
    assert mem.map_gpa_range(0, 1, KVM_MAP_GPA_RANGE_ENCRYPTED) == 0
    mem.sync_dirty(ram, dest)  # our order: the fetched bit comes with the new state
    assert bits(mem.enc_snapshot(ram), 1)[0]


def test_dirty_log_get_and_clear(mem):
    ram = mem.ram
    mem.mark_dirty(ram, 5, 70)
    mem.mark_dirty_pages(ram, np.array([1000, 3, 1000]))
    dest = np.zeros(nwords(ram.npages), dtype=np.uint64)
    csev.bitmap_set_range(dest, 0, 6)  # already in the migration bitmap: not newly dirty
    assert mem.sync_dirty(ram, dest) == 72 - 2  # pages 3 and 5 were already set
    assert not ram.dirty_log.any()
    assert mem.sync_dirty(ram, dest) == 0
    assert np.flatnonzero(bits(dest, ram.npages)).tolist() == [0, 1, 2, 3, 4] + list(range(5, 75)) + [1000]
    with pytest.raises(ValueError):
        mem.sync_dirty(ram, np.zeros(3, dtype=np.uint64))
    with pytest.raises(IndexError):
        mem.mark_dirty_pages(ram, np.array([ram.npages]))
    with pytest.raises(ValueError, match="does not belong"):
        GuestMemory(mem.dram, 4 * MiB).sync_dirty(ram, dest)


def test_set_enc_bitmap(mem):
    ram, vram = mem.ram, mem.block(VRAM_IDSTR)
    rng = np.random.default_rng(3)
    want = rng.integers(0, 2, 1000).astype(bool)
    words = np.packbits(np.concatenate([want, np.ones(24, bool)]), bitorder="little").view("<u8").astype(np.uint64)
    mem.set_enc_bitmap(ram, 37 * PAGE_SIZE, 1000, words)  # unaligned in the words; padding bits ignored
    enc = bits(ram.enc, ram.npages)
    assert np.array_equal(enc[37:1037], want) and enc[:37].all() and enc[1037:].all()
    assert csev.bitmap_count(ram.enc) == ram.npages - int((~want).sum())  # padding stays clear
    mem.set_enc_bitmap(VRAM_IDSTR, vram.gpa, vram.npages, np.zeros(nwords(vram.npages), np.uint64))
    bad = [
        (ram, 37 * PAGE_SIZE + 1, 1000, words, "not page aligned"),
        (ram, ram.end_gpa - PAGE_SIZE, 2, words[:1], "outside"),
        (ram, 0, 0, words[:0], "outside"),
        (ram, vram.gpa, 1, words[:1], "outside"),
        (ram, 0, 1000, words[:15], "need 16 words"),
        (ram, 0, 64, words[:1].astype(np.int64), "uint64"),
        (vram, vram.gpa, 64, np.ones(1, np.uint64), "shared by nature"),
    ]
    for block, gpa, n, w, match in bad:
        with pytest.raises(ValueError, match=match):
            mem.set_enc_bitmap(block, gpa, n, w)


def test_reset_encryption_state(guest, mem):
    ram = mem.ram
    guest.set_shared(8 * PAGE_SIZE, 4)
    guest.set_shared(100 * PAGE_SIZE, 1)
    drain(mem)
    guest.reboot()
    assert csev.bitmap_count(ram.enc) == ram.npages
    assert all(not b.enc.any() for b in mem.blocks if b.shared_by_nature)
    assert np.flatnonzero(drain(mem)[RAM_IDSTR]).tolist() == [8, 9, 10, 11, 100]
    assert guest.is_private(np.array([8, 100, 5])).all()
    assert not guest.is_private(np.array([mem.block(VRAM_IDSTR).gfn])).any()


# -- the guest ---------------------------------------------------------------------------------------------
def test_private_write_is_ciphertext_shared_is_plaintext(guest, mem):
    ram, dram = mem.ram, mem.dram
    marker = b"pysev-secret-marker"
    guest.set_shared(20 * PAGE_SIZE, 2)
    pages = np.array([3, 4, 20, 21, 700])
    guest.plant(pages, marker)
    want = np.frombuffer((marker * 300)[:PAGE_SIZE], np.uint8)
    assert (guest.read_pages(pages) == want).all()
    raw = dram.frames[ram.frames[pages]]
    for page, row in zip(pages, raw, strict=True):
        if page in (20, 21):
            assert np.array_equal(row, want)
        else:
            assert marker not in row.tobytes() and not np.array_equal(row, want)
    # what the memory controller decrypts (C-bit = 1) is the plaintext
    assert (guest.memctl.read_pages(guest.asid, ram.frames[[3, 700]]) == want).all()
    assert np.flatnonzero(drain(mem)[RAM_IDSTR]).tolist() == pages.tolist()


def test_write_marks_dirty_after_data(guest, mem, monkeypatch):
    ram = mem.ram
    data = page_pattern(np.array([9]), 5)
    seen = []
    real = mem.mark_dirty_pages

    def check(block, idx):
        seen.append(np.array_equal(guest.memctl.read_pages(guest.asid, block.frames[idx]), data))
        real(block, idx)

    monkeypatch.setattr(mem, "mark_dirty_pages", check)
    guest.write_pages(np.array([9]), data)
    assert seen == [True] and bits(ram.dirty_log, ram.npages)[9]


def test_conversion_flips_state_and_loses_contents(guest, mem):
    ram = mem.ram
    guest.plant(np.arange(30, 34), b"old")
    drain(mem)
    guest.set_shared(30 * PAGE_SIZE, 4)
    assert not bits(ram.enc, ram.npages)[30:34].any() and not guest.is_private(np.arange(30, 34)).any()
    assert not guest.read_pages(np.arange(30, 34)).any()  # fresh (zero) contents, in the clear
    assert not mem.dram.frames[ram.frames[30:34]].any()
    assert np.flatnonzero(drain(mem)[RAM_IDSTR]).tolist() == [30, 31, 32, 33]  # re-sent in the new mode
    guest.set_private(30 * PAGE_SIZE, 4)
    assert bits(ram.enc, ram.npages)[30:34].all() and guest.is_private(np.arange(30, 34)).all()
    assert not guest.read_pages(np.arange(30, 34)).any()
    assert mem.dram.frames[ram.frames[30:34]].any()  # zeros, encrypted
    for bad in [(mem.block(VRAM_IDSTR).gpa, 1), (ram.end_gpa - PAGE_SIZE, 2), (0x10, 1), (0, 0)]:
        with pytest.raises(ValueError, match="own RAM"):
            guest.set_shared(*bad)


def test_framebuffer_and_guest_errors(sev, guest, mem):
    vram = mem.block(VRAM_IDSTR)
    assert guest.draw_framebuffer(3) == FB_BAND
    rows = (3 * FB_BAND + np.arange(FB_BAND)) % 768
    assert np.array_equal(mem.dram.frames[vram.frames[rows]], framebuffer_lines(rows, 3))
    assert np.flatnonzero(drain(mem)[VRAM_IDSTR]).tolist() == sorted(rows.tolist())
    with pytest.raises(ValueError, match="no VEK"):
        Guest(mem, sev[0].memctl, 99)
    with pytest.raises(ValueError, match="uint8"):
        guest.write_pages(np.array([1, 2]), np.zeros((1, PAGE_SIZE), np.uint8))
    with pytest.raises(GpaError):
        guest.write_pages(np.array([mem.ram.npages]), np.zeros((1, PAGE_SIZE), np.uint8))


# -- the workload ------------------------------------------------------------------------------------------
@pytest.fixture
def big_guest(sev):
    platform, sev_kvm = sev
    m = GuestMemory(platform.dram, 256 * MiB)
    yield Guest(m, platform.memctl, sev_kvm.asid, seed=1)
    m.free()


def test_workload_rate_throttle_and_pause(big_guest):
    mem, ram = big_guest.memory, big_guest.memory.ram
    rate = 100e6
    w = Workload(big_guest, dirty_rate=rate, pattern="sequential", seed=1)
    with w:
        time.sleep(0.05)
        drain(mem)
        b0, t0 = w.bytes_written, time.monotonic()
        time.sleep(1.0)
        w.pause()
        elapsed = time.monotonic() - t0
        achieved = (w.bytes_written - b0) / elapsed
        dirty = drain(mem)[RAM_IDSTR].sum() * PAGE_SIZE / elapsed
        assert 0.7 * rate <= achieved <= 1.3 * rate
        assert 0.7 * rate <= dirty <= 1.3 * rate  # 256 MiB: a 1 s sequential sweep never wraps
        # paused: nothing is written, nothing is dirtied
        written = w.pages_written
        time.sleep(0.2)
        assert w.pages_written == written and not ram.dirty_log.any()
        # auto-converge: 50 % throttle halves the rate
        w.set_throttle(50)
        b0, t0 = w.bytes_written, time.monotonic()
        w.resume()
        time.sleep(1.0)
        w.pause()
        ratio = (w.bytes_written - b0) / (time.monotonic() - t0) / rate
        assert 0.5 * 0.7 <= ratio <= 0.5 * 1.3
    assert not any(t.is_alive() for t in w._threads)
    with pytest.raises(ValueError):
        w.set_throttle(100)


def test_workload_conversions_vga_and_reset(big_guest):
    mem, ram = big_guest.memory, big_guest.memory.ram
    w = Workload(
        big_guest, dirty_rate=20e6, pattern="hotset", hot_fraction=0.05, convert_rate=2000, vga_fps=50, vcpus=2, seed=3
    )
    with w:
        time.sleep(0.4)
        w.pause()
        assert w.conversions > 100 and w.frames_drawn > 5
        # paused: the VMM's state map and the guest's page tables agree page for page
        enc = bits(mem.enc_snapshot(ram), ram.npages)
        assert np.array_equal(enc, big_guest.is_private(ram.gfn + np.arange(ram.npages)))
        assert not enc.all()  # some bounce pages are shared right now
        f = w.frames_drawn - 1
        rows = (f * FB_BAND + np.arange(FB_BAND)) % 768
        vram = mem.block(VRAM_IDSTR)
        assert np.array_equal(mem.dram.frames[vram.frames[rows]], framebuffer_lines(rows, f))
        w.resume()
        w.reset()
        assert not w.paused
        w.pause()
        enc = bits(mem.enc_snapshot(ram), ram.npages)
        assert np.array_equal(enc, big_guest.is_private(ram.gfn + np.arange(ram.npages)))
        # hotset: all data writes land in the window (conversions may hit anywhere)
        w.resume()


def test_workload_stop_is_clean_and_surfaces_errors(big_guest):
    w = Workload(big_guest, dirty_rate=10e6, seed=2)
    w.pause()  # before start: the vCPUs park at once
    w.start()
    time.sleep(0.05)
    assert w.pages_written == 0
    w.resume()
    time.sleep(0.05)
    w.stop()
    assert w.pages_written > 0 and all(t.daemon and not t.is_alive() for t in w._threads)
    with pytest.raises(ValueError):
        Workload(big_guest, pattern="zipf")

    class Boom(Guest):
        def write_pages(self, *a):
            raise RuntimeError("boom")

    bad = Workload(Boom(big_guest.memory, big_guest.memctl, big_guest.asid), dirty_rate=10e6)
    bad.start()
    bad.pause()  # a dead vCPU does not hang pause()
    with pytest.raises(RuntimeError, match="vCPU thread failed"):
        bad.stop()


# -- scale -------------------------------------------------------------------------------------------------
def _vmrss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_64gib_guest_stays_small(sev):
    platform, sev_kvm = sev
    dram = platform.dram
    rss0, res0 = _vmrss(), dram.resident_bytes()
    m = GuestMemory(dram, 64 * GiB)
    try:
        g = Guest(m, platform.memctl, sev_kvm.asid)
        ram = m.ram
        pages = np.array([0, 1, ram.npages // 2, ram.npages - 1])
        g.plant(pages, b"far")
        g.set_shared(ram.end_gpa - 2 * PAGE_SIZE, 1)
        assert g.read_pages(pages[:2]).tobytes()[:3] == b"far"
        assert m.sync_dirty(ram, np.zeros(nwords(ram.npages), np.uint64)) == 5
        # touched pages only; frames array (8 B/page) + bitmaps dominate the process growth
        assert dram.resident_bytes() - res0 < 64 * MiB
        assert _vmrss() - rss0 < 512 * MiB
    finally:
        m.free()
    assert dram.resident_bytes() - res0 < 64 * MiB


def _anon_huge_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:"))


def test_populated_ram_is_huge_page_backed_and_freed_chunks_are_not():
    """populate() (a prealloc'd destination, a guest that fills its RAM) backs each 2 MiB chunk with one
    transparent huge page where the kernel offers them; freed chunks go back to 4 KiB pages so the next,
    sparse guest on them stays small."""
    dram = HostMemory(96 * MiB, seed=5)
    assert dram.flat.ctypes.data % (2 * MiB) == 0  # HPA 0 on a huge-page boundary
    frames = dram.alloc_ram(32 * MiB // PAGE_SIZE)
    huge0 = _anon_huge_bytes()
    dram.populate(frames)
    assert dram.resident_bytes() >= 32 * MiB
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = "[never]" not in f.read()
    if thp:
        assert _anon_huge_bytes() - huge0 >= 16 * MiB  # most chunks (the kernel may refuse a few)
    dram.frames[frames[:3].astype(np.int64)] = 7
    assert (dram.frames[frames[:3].astype(np.int64)] == 7).all()
    dram.free_ram(frames)
    assert dram.resident_bytes() < 2 * MiB
    again = dram.alloc_ram(32 * MiB // PAGE_SIZE)  # the same chunks, now for a sparse guest
    dram.frames[again[::512].astype(np.int64)] = 1  # one page per chunk
    assert dram.resident_bytes() < 4 * MiB


def test_running_vcpus_are_stopped_at_interpreter_exit():
    """A VM left running at exit: its daemon vCPU threads are stopped before finalization (a daemon thread
    killed there inside numpy's C++ loops aborts the process). The check runs in an atexit handler
    registered before pysev's, so it runs after it."""
    code = textwrap.dedent("""
        import atexit, threading
        def check():
            alive = [t.name for t in threading.enumerate() if t.name.startswith("vcpu") and t.is_alive()]
            print("alive at exit:", alive, flush=True)
        atexit.register(check)
        from pysev.hv.machine import Host, VirtualMachine
        vm = VirtualMachine(Host("h", 96 << 20, seed=1), 32 << 20, dirty_rate=50e6, vga_fps=30, seed=2)
        import time; time.sleep(0.2)
        print("started:", vm.workload.pages_written > 0, flush=True)
    """)
    out = subprocess.run(python_command(code), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "started: True" in out.stdout and "alive at exit: []" in out.stdout, out.stdout
    assert "terminate called" not in out.stderr
