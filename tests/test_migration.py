"""End-to-end tests of SEV live migration through the public API (``pysev.migration``).

What each requirement is proved by (qemu-migration.md §1, §2.6, §3–5; sev-api.md §2, §6, §7):

* guest RAM, lazily backed, non-contiguous frames differing between hosts; device regions in the clear;
  dirty log get-and-clear; KVM_HC_MAP_GPA_RANGE; flips during pre-copy re-sent in the new mode; a
  non-SEV guest through the same engine — ``test_memory_*``, ``test_flips_*``, ``test_non_sev_*``;
* the commit protocol (never two runners, source resumes on any failure, destination discards) —
  ``RunMonitor`` samples run states on every transition and firmware GUEST_STATUS in a polling thread
  during *every* migration of this file, failure cases included (``test_migration_failures.py``);
* planted private plaintext never on the wire, shared pages as they are — ``test_planted_*``;
* the seed's known issues: reboot after migration and A→B→A→C, VGA framebuffer equality;
* query-migrate counters and QEMU's formulas, downtime, auto-converge.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pysev.firmware.sev.abi import Cmd, GuestState, GuestStatusBuf
from pysev.hv.machine import Host, RunState, VirtualMachine
from pysev.hv.memory import (
    BIOS_IDSTR,
    FLASH_VARS_IDSTR,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    RAM_IDSTR,
    VRAM_IDSTR,
)
from pysev.hw.hostmem import PAGE_SIZE
from pysev.migration import (
    IncomingMigration,
    MigrationCapabilities,
    MigrationParameters,
    OutgoingMigration,
    migrate_local,
    with_destination_certs,
)
from pysev.migration.transport import inproc_pairs, inproc_resume_pair

MiB, GiB = 1 << 20, 1 << 30
SECRET = b"TOP-SECRET-PLAINTEXT:do-not-leak:"
SHARED_MARKER = b"SHARED-BOUNCE-BUFFER-MARKER:"


# =====================================================================================================
# helpers (each test file carries its own copy: pytest runs with --import-mode=importlib)
# =====================================================================================================
def fw_state(vm: VirtualMachine) -> int | None:
    """GUEST_STATUS of the VM's SEV context straight from the firmware (under its lock; the simulated KVM
    layer is not safe for concurrent ioctls on one VM). None: no context yet, or decommissioned."""
    if vm.sev is None or not getattr(vm.sev, "handle", 0):
        return None
    buf = GuestStatusBuf(handle=vm.sev.handle)
    if vm.host.platform.issue(Cmd.GUEST_STATUS, buf) != 0:
        return None
    return int(buf.state)


class RunMonitor:
    """Never two runners: watches every VM's run state (listener, on every transition) and its firmware
    guest state (GUEST_STATUS, polled every millisecond) and records any moment two run."""

    def __init__(self) -> None:
        self.vms: list[VirtualMachine] = []
        self.violations: list[str] = []
        self.samples = 0
        self.fw_seen: dict[int, set] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def watch(self, vm: VirtualMachine) -> VirtualMachine:
        with self._lock:
            self.vms.append(vm)
        vm.state_listeners.append(lambda old, new: self._check("transition"))
        self._check("watch")
        return vm

    def _check(self, why: str) -> None:
        with self._lock:
            running = [vm for vm in self.vms if vm.state == RunState.RUNNING]
        if len(running) > 1:
            self.violations.append(f"{why}: run state RUNNING on {[v.host.name for v in running]}")

    def _poll(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                vms = list(self.vms)
            states = [(vm, fw_state(vm)) for vm in vms]
            for vm, st in states:
                self.fw_seen.setdefault(id(vm), set()).add(st)
            fw_running = [vm for vm, st in states if st == GuestState.RUNNING]
            if len(fw_running) > 1:
                self.violations.append(f"firmware RUNNING on {[v.host.name for v in fw_running]}")
            # "runs" = the VMM runs its vCPUs AND the firmware would let it
            runs = [vm for vm, st in states if st in (GuestState.RUNNING, None) and vm.state == RunState.RUNNING]
            if len(runs) > 1:
                self.violations.append(f"both running: {[v.host.name for v in runs]}")
            self.samples += 1
            time.sleep(0.001)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._check("close")

    def assert_ok(self) -> None:
        self.close()
        assert self.samples > 0
        assert not self.violations, self.violations[:5]


@pytest.fixture
def monitor():
    m = RunMonitor()
    yield m
    m.assert_ok()


@pytest.fixture(scope="module")
def hosts():
    """Four hosts A, B, C, D with 1.5 GiB of lazily backed DRAM each (frames shuffled per host)."""
    return {name: Host(name, 3 * GiB // 2, seed=i + 1) for i, name in enumerate("ABCD")}


def new_vm(host: Host, size: int = 64 * MiB, *, fill: bool = True, **kw) -> VirtualMachine:
    vm = VirtualMachine(host, size, seed=kw.pop("seed", 7), **kw)
    if fill:
        vm.boot_fill()
    return vm


def fast_params(dest_host: Host | None = None, **kw) -> MigrationParameters:
    params = MigrationParameters(max_bandwidth=kw.pop("max_bandwidth", 0), **kw)
    return with_destination_certs(params, dest_host.sev_capabilities()) if dest_host else params


@dataclasses.dataclass
class Run:
    info: dict
    outgoing: OutgoingMigration
    incoming: IncomingMigration
    dest: VirtualMachine

    @property
    def verified(self) -> bool:
        return (
            self.info["status"] == "completed"
            and self.incoming.status == "completed"
            and self.outgoing.digest_at_switchover is not None
            and self.outgoing.digest_at_switchover == self.incoming.guest_digest
        )


def run_local(
    src: VirtualMachine,
    dest_host: Host,
    monitor: RunMonitor | None = None,
    *,
    channels: int = 0,
    params: MigrationParameters | None = None,
    caps: MigrationCapabilities | None = None,
    wrap_src=None,
    wrap_dst=None,
    during=None,
    commit_timeout: float = 20.0,
    dest_kw=None,
    **out_kw,
) -> Run:
    """``migrate_local`` with hooks: the destination VM is created here (so the monitor sees it from
    its first state), and ``wrap_src``/``wrap_dst`` may replace connection file objects."""
    params = params or fast_params(dest_host, commit_timeout=commit_timeout)
    if not params.sev_pdh and src.sev_enabled:
        params = with_destination_certs(params, dest_host.sev_capabilities())
    dest = VirtualMachine(
        dest_host,
        src.memory.ram.used_length,
        sev=src.sev_enabled,
        policy=src.policy,
        incoming=True,
        **{**src.workload_args(), **(dest_kw or {})},
    )
    if monitor:
        monitor.watch(dest)
    s, d = inproc_pairs(channels)
    if wrap_src:
        wrap_src(s)
    if wrap_dst:
        wrap_dst(d)
    incoming = IncomingMigration(dest, d, commit_timeout=params.commit_timeout, verify=True)
    thread = threading.Thread(target=incoming.run, daemon=True)
    thread.start()

    def resume_connect(migration_id: bytes):
        src_end, dst_end = inproc_resume_pair(migration_id)
        threading.Thread(target=incoming.serve_resume, args=(dst_end,), daemon=True).start()
        return src_end

    out_kw.setdefault("resume_connect", resume_connect)
    outgoing = OutgoingMigration(src, s, params, caps, **out_kw)
    if during:
        runner = threading.Thread(target=outgoing.run, daemon=True)
        runner.start()
        during(outgoing)
        runner.join(120)
        assert not runner.is_alive()
        info = outgoing.info()
    else:
        info = outgoing.run()
    thread.join(params.commit_timeout + 30)
    assert not thread.is_alive(), "destination thread hung"
    return Run(info, outgoing, incoming, dest)


def finish(run: Run) -> None:
    """Tear down a destination VM of a completed/failed run (frees its host frames)."""
    if run.dest.state != RunState.SHUTDOWN:
        run.dest.destroy()


def check_counters(info: dict, passes: list[dict], wire_bytes: int | None = None) -> None:
    """query-migrate against QEMU's definitions (qemu-migration.md §4.1)."""
    ram = info["ram"]
    sent = sum(p["pages"] for p in passes)
    assert ram["normal"] + ram["duplicate"] == sent
    assert info["sev"]["pages-encrypted"] + info["sev"]["pages-shared"] == sent
    assert ram["normal-bytes"] == ram["normal"] * PAGE_SIZE
    assert ram["page-size"] == PAGE_SIZE
    assert ram["remaining"] == 0
    assert ram["dirty-sync-count"] == len(passes)  # one sync per pre-copy pass + the final one
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    assert sum(p["bytes"] for p in passes) <= ram["transferred"] <= sum(p["bytes"] for p in passes) + 64 * 1024
    # mbps = transferred*8/(time/1000)/1e6 over each interval; the reported one is the last pre-copy pass
    for p in passes:
        assert p["mbps"] == pytest.approx(p["bytes"] * 8 / p["seconds"] / 1e6, rel=1e-6)
    precopy = [p for p in passes if not p.get("stop_and_copy")]
    assert ram["mbps"] == pytest.approx(precopy[-1]["mbps"], rel=1e-3, abs=1e-3)
    # every private page costs 4168 bytes on the wire and every shared non-zero page 4104 (+idstr)
    assert ram["transferred"] >= info["sev"]["pages-encrypted"] * 4168
    if wire_bytes is not None:
        assert wire_bytes == ram["transferred"]
    assert info["total-time"] >= info["setup-time"] >= 0
    assert 0 <= info["downtime"] <= info["total-time"]


def stream_files(path) -> list:
    path = str(path)
    out = [pathlib.Path(path)]
    i = 1
    while os.path.exists(f"{path}.ch{i}"):
        out.append(pathlib.Path(f"{path}.ch{i}"))
        i += 1
    return out


# =====================================================================================================
# guest memory model
# =====================================================================================================
def test_memory_frames_noncontiguous_and_differ_between_hosts(hosts):
    a = new_vm(hosts["A"], 32 * MiB, fill=False)
    b = new_vm(hosts["B"], 32 * MiB, fill=False)
    try:
        fa, fb = a.memory.ram.frames, b.memory.ram.frames
        assert (np.diff(fa.astype(np.int64)) != 1).any(), "RAM should not be one contiguous run of frames"
        assert not np.array_equal(fa, fb), "two hosts back the same guest RAM with different frames"
        names = [blk.idstr for blk in a.memory.blocks]
        assert names == [RAM_IDSTR, VRAM_IDSTR, BIOS_IDSTR, FLASH_VARS_IDSTR]
        assert [blk.shared_by_nature for blk in a.memory.blocks] == [False, True, True, True]
        # a private page's ciphertext differs between hosts (tweak = HPA): plaintext equal, DRAM not
        gfns = np.arange(100, 104)
        a.guest.plant(gfns, SECRET)
        b.guest.plant(gfns, SECRET)
        assert np.array_equal(a.guest.read_pages(gfns), b.guest.read_pages(gfns))
        assert not np.array_equal(
            hosts["A"].dram.frames[fa[gfns].astype(np.int64)], hosts["B"].dram.frames[fb[gfns].astype(np.int64)]
        )
        assert SECRET not in hosts["A"].dram.frames[fa[gfns].astype(np.int64)].tobytes()
    finally:
        a.destroy()
        b.destroy()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_memory_64g_guest_with_little_touched_fits():
    """A 64 GiB guest on a 65 GiB host costs only what it touches (MAP_NORESERVE, lazy frames)."""
    host = Host("big", 65 * GiB, seed=11)
    before = _rss_bytes()
    vm = VirtualMachine(host, 64 * GiB, seed=1)
    try:
        touched = 64 * MiB
        gfns = np.linspace(0, vm.memory.ram.npages - 1, touched // PAGE_SIZE).astype(np.int64)
        vm.guest.plant(gfns, b"touched")
        grown = _rss_bytes() - before
        assert grown < touched + 512 * MiB, f"RSS grew by {grown >> 20} MiB for {touched >> 20} MiB touched"
        assert vm.memory.ram.npages == 16 * MiB
        assert (vm.guest.read_pages(gfns[:4])[:, :7] == np.frombuffer(b"touched", np.uint8)).all()
    finally:
        vm.destroy()


def test_memory_dirty_log_get_and_clear_and_map_gpa_range(hosts):
    vm = new_vm(hosts["A"], 32 * MiB, fill=False)
    try:
        ram, mem = vm.memory.ram, vm.memory
        words = np.zeros_like(ram.dirty_log)
        mem.sync_dirty(ram, words)  # start from a clean log
        words[:] = 0
        vm.guest.plant(np.array([5, 6, 700]), b"x")
        assert mem.sync_dirty(ram, words) == 3
        again = np.zeros_like(words)
        assert mem.sync_dirty(ram, again) == 0 and not again.any(), "the fetch clears the log"
        # KVM_HC_MAP_GPA_RANGE: the state changes first, then the range is dirty
        assert mem.map_gpa_range(10 * PAGE_SIZE, 4, KVM_MAP_GPA_RANGE_DECRYPTED) == 0
        enc = mem.enc_snapshot(ram)
        bits = np.unpackbits(enc.view(np.uint8), bitorder="little")
        assert not bits[10:14].any() and bits[9] and bits[14]
        words[:] = 0
        assert mem.sync_dirty(ram, words) == 4
        assert mem.map_gpa_range(10 * PAGE_SIZE, 4, KVM_MAP_GPA_RANGE_ENCRYPTED) == 0
        assert np.unpackbits(mem.enc_snapshot(ram).view(np.uint8), bitorder="little")[10:14].all()
        for bad in (
            (PAGE_SIZE + 1, 1, 0),
            (0, 0, 0),
            (0, 1, 1 << 5),
            (0, 1, 3),
            (1 << 62, 1, 0),
            (ram.end_gpa - PAGE_SIZE, 1 << 64, 0),
        ):
            assert mem.map_gpa_range(*bad) < 0, bad
        # device regions are never encrypted
        vram = mem.block(VRAM_IDSTR)
        assert mem.map_gpa_range(vram.gpa, 4, KVM_MAP_GPA_RANGE_ENCRYPTED) == 0
        assert not mem.enc_snapshot(vram).any()
    finally:
        vm.destroy()


# =====================================================================================================
# migrations that complete
# =====================================================================================================
@pytest.mark.parametrize("channels", [0, 2])
def test_idle_guest_migrates_verified_with_consistent_counters(hosts, monitor, channels):
    src = monitor.watch(new_vm(hosts["A"], 64 * MiB))
    digest0 = src.digest()
    run = run_local(src, hosts["B"], monitor, channels=channels)
    try:
        assert run.info["status"] == "completed", run.info.get("error-desc")
        assert run.verified and run.outgoing.digest_at_switchover == digest0
        assert src.state == RunState.POSTMIGRATE and fw_state(src) == GuestState.SENT
        assert run.dest.state == RunState.RUNNING and fw_state(run.dest) == GuestState.RUNNING
        check_counters(run.info, run.outgoing.passes)
        total_pages = src.memory.total_pages
        assert run.info["ram"]["total"] == total_pages * PAGE_SIZE
        first = run.outgoing.passes[0]
        assert first["pages"] == total_pages, "the first pass sends every page"
        assert run.info["sev"]["pages-encrypted"] >= src.memory.ram.npages
        if channels:
            assert run.info["ram"]["multifd-bytes"] > 0.9 * src.memory.ram.npages * 4168
        else:
            assert run.info["ram"]["multifd-bytes"] == 0
    finally:
        finish(run)
        src.destroy()


@pytest.mark.parametrize("channels", [0, 2])
def test_migrate_local_api_transferred_equals_bytes_on_the_wire(hosts, tmp_path, channels):
    src = new_vm(hosts["A"], 32 * MiB)
    save = tmp_path / "s.mig"
    result = migrate_local(src, hosts["B"], params=fast_params(), channels=channels, save_stream=str(save))
    try:
        assert result.verified and result.destination_status == {"status": "completed"}
        files = stream_files(save)
        assert len(files) == channels + 1
        wire = sum(os.path.getsize(f) for f in files)
        check_counters(result.info, result.passes, wire_bytes=wire)
        # the saved copy is the QEMU stream only (no commit message after the vmdesc trailer)
        assert files[0].read_bytes().endswith(b"}")
    finally:
        result.destination.destroy()
        src.destroy()


@pytest.mark.parametrize("channels", [0, 2])
def test_dirtying_guest_converges_within_downtime_limit(hosts, monitor, channels):
    src = monitor.watch(new_vm(hosts["A"], 128 * MiB, dirty_rate=30e6, workload="uniform"))
    time.sleep(0.2)
    run = run_local(src, hosts["B"], monitor, channels=channels, params=fast_params(hosts["B"], downtime_limit=300))
    try:
        assert run.info["status"] == "completed", run.info.get("error-desc")
        assert run.verified
        assert run.info["downtime"] <= 300, run.info["downtime"]
        passes = run.outgoing.passes
        assert len(passes) >= 2 and passes[1]["pages"] > 0, "dirtied pages are re-sent"
        assert sum(p["dirty_pages"] for p in passes) > 0
        check_counters(run.info, passes)
        # the destination keeps running the workload
        written = run.dest.workload.pages_written
        time.sleep(0.2)
        assert run.dest.workload.pages_written > written
    finally:
        finish(run)
        src.destroy()


def test_flips_during_precopy_are_resent_in_new_mode(hosts, monitor, tmp_path):
    """Pages flip private<->shared between and *within* passes: each is re-sent in its new mode, and
    the destination ends with the source's plaintext and private/shared map at pause."""
    src = monitor.watch(new_vm(hosts["A"], 64 * MiB, dirty_rate=5e6))
    time.sleep(0.1)
    to_shared = np.arange(2000, 2064)  # private at boot, made shared mid pass 1
    to_private = np.arange(3000, 3016)  # made shared before, back to private mid pass 1
    src.guest.set_shared(int(to_private[0]) * PAGE_SIZE, len(to_private))
    src.guest.plant(to_private, SHARED_MARKER + b"old")
    flipped = threading.Event()

    def on_progress(pass_no, sent, total):
        if pass_no == 1 and sent > 0 and not flipped.is_set():
            flipped.set()
            src.guest.set_shared(int(to_shared[0]) * PAGE_SIZE, len(to_shared))
            src.guest.plant(to_shared, SHARED_MARKER + b"new")
            src.guest.set_private(int(to_private[0]) * PAGE_SIZE, len(to_private))
            src.guest.plant(to_private, SECRET + b"now-private")

    save = tmp_path / "flip.mig"
    run = run_local(
        src, hosts["B"], monitor, channels=2, on_progress=on_progress, wrap_src=lambda conns: _tee_all(conns, save)
    )
    try:
        assert flipped.is_set()
        assert run.info["status"] == "completed", run.info.get("error-desc")
        assert run.verified, "destination plaintext + private/shared map equal the source's at pause"
        dram = run.dest.memory.ram
        enc = np.unpackbits(dram.enc.view(np.uint8), bitorder="little")
        assert not enc[to_shared].any() and enc[to_private].all()
        got = run.dest.guest.read_pages(to_shared + dram.gfn)
        assert got.tobytes().startswith(SHARED_MARKER + b"new")
        got = run.dest.guest.read_pages(to_private + dram.gfn)
        assert got.tobytes().startswith(SECRET + b"now-private")
        data = b"".join(f.read_bytes() for f in stream_files(save))
        assert (SHARED_MARKER + b"new") in data, "a page flipped to shared travels in the clear"
        assert (SECRET + b"now-private") not in data, "a page flipped to private is re-sent encrypted"
    finally:
        finish(run)
        src.destroy()


@pytest.mark.parametrize("channels", [0, 2])
def test_flips_by_workload_during_precopy(hosts, monitor, channels):
    """DMA bounce-buffer conversions (KVM_HC_MAP_GPA_RANGE) at 3000 pages/s throughout pre-copy."""
    src = monitor.watch(new_vm(hosts["A"], 64 * MiB, dirty_rate=10e6, convert_rate=3000))
    time.sleep(0.2)
    conv0 = src.workload.conversions
    run = run_local(
        src,
        hosts["B"],
        monitor,
        channels=channels,
        dest_kw=dict(convert_rate=0, dirty_rate=0),
        params=fast_params(hosts["B"], max_bandwidth=96 * MiB),
    )
    try:
        assert run.info["status"] == "completed", run.info.get("error-desc")
        assert run.verified, "destination plaintext + private/shared map equal the source's at pause"
        assert src.workload.conversions > conv0 + 50, "the workload flipped pages during migration"
        assert np.array_equal(run.dest.memory.ram.enc, src.memory.ram.enc)
        bits = np.unpackbits(run.dest.memory.ram.enc.view(np.uint8), bitorder="little")
        assert not bits.all(), "the workload's bounce pages are shared on the destination"
        assert run.info["sev"]["pages-shared"] > src.memory.total_pages - src.memory.ram.npages
    finally:
        finish(run)
        src.destroy()


def _tee_all(conns, path) -> None:
    """The same tee as ``save_stream=`` (used where run_local builds the connections)."""
    from pysev.migration import _tee

    _tee(conns, str(path))


@pytest.mark.parametrize("channels", [0, 2])
def test_planted_private_plaintext_never_on_the_wire(hosts, monitor, tmp_path, channels):
    src = monitor.watch(new_vm(hosts["A"], 64 * MiB, vga_fps=30))
    private_pages = np.arange(1000, 1100)
    src.guest.plant(private_pages, SECRET)
    shared_page = 5000
    src.guest.set_shared(shared_page * PAGE_SIZE, 1)
    src.guest.plant(np.array([shared_page]), SHARED_MARKER)
    time.sleep(0.1)
    save = tmp_path / "leak.mig"
    result = migrate_local(src, hosts["B"], params=fast_params(), channels=channels, save_stream=str(save))
    try:
        assert result.verified
        files = stream_files(save)
        assert len(files) == channels + 1
        for f in files:
            data = f.read_bytes()
            assert SECRET not in data and SECRET[:16] not in data, f"private plaintext leaked into {f}"
        main = files[0].read_bytes()
        assert SHARED_MARKER in main, "a shared page travels as is"
        vram = src.memory.block(VRAM_IDSTR)
        fb = hosts["A"].dram.frames[int(vram.frames[0])].tobytes()  # frozen since the switchover
        # drawn (every BGRX pixel has X = 0xFF; frame 0's scanline 0 is half zero bytes, so no zero count)
        assert fb[3::4] == b"\xff" * (len(fb) // 4), "the framebuffer's first page was drawn"
        assert fb in main, "the VGA framebuffer travels in the clear"
        assert result.destination.guest.read_pages(private_pages[:1]).tobytes().startswith(SECRET)
        assert result.info["sev"]["pages-encrypted"] >= src.memory.ram.npages - 1
    finally:
        result.destination.destroy()
        src.destroy()


def test_vga_and_every_shared_region_equal_after_migration(hosts, monitor):
    """Seed known issue (2): the destination framebuffer equals the source's, and so every region."""
    src = monitor.watch(new_vm(hosts["A"], 64 * MiB, vga_fps=200, dirty_rate=5e6))
    time.sleep(0.3)
    # the destination's vCPUs do not draw, so its framebuffer stays as it arrived
    run = run_local(src, hosts["B"], monitor, channels=2, dest_kw=dict(vga_fps=0, dirty_rate=0))
    try:
        assert run.verified
        assert src.workload.frames_drawn > 10
        for idstr in (VRAM_IDSTR, BIOS_IDSTR, FLASH_VARS_IDSTR):
            sb, db = src.memory.block(idstr), run.dest.memory.block(idstr)
            s = hosts["A"].dram.frames[sb.frames.astype(np.int64)]
            d = hosts["B"].dram.frames[db.frames.astype(np.int64)]
            assert np.array_equal(s, d), f"{idstr} differs"
            assert not db.enc.any()
        vram = hosts["B"].dram.frames[run.dest.memory.block(VRAM_IDSTR).frames[:768].astype(np.int64)]
        assert vram.any(), "the framebuffer was drawn"
        assert (vram.view("<u4") >> 24 == 0xFF).sum() > 768 * 1000 // 2, "BGRX pixels, not ciphertext"
    finally:
        finish(run)
        src.destroy()


def test_non_sev_guest_same_engine_plain_pages(hosts, monitor, tmp_path):
    src = monitor.watch(new_vm(hosts["A"], 32 * MiB, sev=False, dirty_rate=5e6))
    src.guest.plant(np.arange(10, 20), SECRET)
    save = tmp_path / "plain.mig"
    result = migrate_local(src, hosts["B"], params=MigrationParameters(max_bandwidth=0), save_stream=str(save))
    try:
        assert result.verified
        assert result.info["sev"]["pages-encrypted"] == 0
        assert SECRET in save.read_bytes(), "a non-SEV guest's pages travel in the clear"
        assert result.destination.guest.read_pages(np.arange(10, 11)).tobytes().startswith(SECRET)
        from pysev.migration import stream

        assert stream.RAM_SAVE_FLAG_ENCRYPTED_DATA.to_bytes(8, "big") not in save.read_bytes()[:64]
    finally:
        result.destination.destroy()
        src.destroy()


ANALYZER = os.environ.get("PYSEV_ANALYZE_MIGRATION")


@pytest.mark.skipif(not ANALYZER, reason="set PYSEV_ANALYZE_MIGRATION to QEMU's scripts/analyze-migration.py")
def test_non_sev_saved_stream_is_read_by_analyze_migration(hosts, tmp_path):
    src = new_vm(hosts["A"], 32 * MiB, sev=False)
    save = tmp_path / "plain.mig"
    result = migrate_local(src, hosts["B"], params=MigrationParameters(max_bandwidth=0), save_stream=str(save))
    try:
        assert result.verified
        out = tmp_path / "x"
        out.mkdir()
        res = subprocess.run(
            [sys.executable, ANALYZER, "-f", str(save), "-x"], cwd=out, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr[-2000:]
        ram = src.memory.ram
        expected = hosts["A"].dram.frames[ram.frames.astype(np.int64)].tobytes()
        assert (out / RAM_IDSTR).read_bytes() == expected
        assert (out / VRAM_IDSTR).read_bytes() == hosts["A"].dram.frames[
            src.memory.block(VRAM_IDSTR).frames.astype(np.int64)
        ].tobytes()
    finally:
        result.destination.destroy()
        src.destroy()


def test_reboot_after_migration_then_a_b_a_c(hosts, monitor):
    """Seed known issue (1): after migration the guest reboots (state map back to boot default), keeps
    running, and migrates on: A→B, reboot, B→A, A→C — each verified."""
    vm = monitor.watch(new_vm(hosts["A"], 64 * MiB, dirty_rate=5e6, convert_rate=500))
    vm.guest.set_shared(4000 * PAGE_SIZE, 8)
    time.sleep(0.2)
    chain = [hosts["B"], hosts["A"], hosts["C"]]
    try:
        for i, dest_host in enumerate(chain):
            run = run_local(vm, dest_host, monitor, channels=i % 2 * 2)
            assert run.info["status"] == "completed", run.info.get("error-desc")
            assert run.verified, f"hop {i}"
            old, vm = vm, run.dest
            old.destroy()  # the source's frames go back to its host
            ram = vm.memory.ram
            if i == 0:
                assert not np.unpackbits(ram.enc.view(np.uint8), bitorder="little")[: ram.npages].all()
                vm.reset()  # reboot on B
                bits = np.unpackbits(vm.memory.enc_snapshot(ram).view(np.uint8), bitorder="little")
                assert bits[: ram.npages].all(), "reboot resets the state map: all RAM private"
                for blk in vm.memory.blocks[1:]:
                    assert not blk.enc.any()
                assert vm.state == RunState.RUNNING and not vm.workload.paused
                written = vm.workload.pages_written
                time.sleep(0.3)
                assert vm.workload.pages_written > written, "keeps running after the reboot"
                vm.guest.plant(np.arange(50, 52), b"after-reboot")
                assert vm.guest.read_pages(np.arange(50, 51)).tobytes().startswith(b"after-reboot")
        assert vm.host is hosts["C"]
        assert vm.guest.read_pages(np.arange(50, 51)).tobytes().startswith(b"after-reboot")
    finally:
        vm.destroy()


def test_auto_converge_raises_throttle_when_guest_outruns_link(hosts, monitor):
    src = monitor.watch(new_vm(hosts["A"], 16 * MiB, dirty_rate=24e6, workload="uniform"))
    caps = MigrationCapabilities(auto_converge=True, events=True)
    params = fast_params(hosts["B"], max_bandwidth=8 * MiB, downtime_limit=20)
    events = []
    seen = {}

    def during(out):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and out.info().get("cpu-throttle-percentage", 0) < 30:
            time.sleep(0.05)
        seen.update(info=out.info(), throttle=src.workload.throttle)
        out.cancel()

    run = run_local(
        src,
        hosts["B"],
        monitor,
        params=params,
        caps=caps,
        during=during,
        on_event=lambda name, data: events.append((name, data)),
    )
    try:
        info = seen["info"]
        assert info["status"] == "active"
        assert info["cpu-throttle-percentage"] >= 30, "initial 20 % then +10 % (QEMU's defaults)"
        assert seen["throttle"] == info["cpu-throttle-percentage"], "the vCPUs are throttled"
        assert "expected-downtime" in info
        assert ("MIGRATION_PASS", {"pass": 1}) in events
        assert run.info["status"] == "cancelled" and "error-desc" not in run.info
        assert src.state == RunState.RUNNING and src.workload.throttle == 0, "cancel lifts the throttle"
        assert run.incoming.status == "failed" and run.dest.state != RunState.RUNNING
    finally:
        finish(run)
        src.destroy()


def test_precopy_switchover_follows_qemu_formula(hosts, monitor):
    """Switch over when pending <= bandwidth × downtime-limit (bandwidth in bytes/ms over the pass);
    expected-downtime = pending / bandwidth (qemu-migration.md §4.1, §5)."""
    src = monitor.watch(new_vm(hosts["A"], 64 * MiB, dirty_rate=40e6, workload="hotset"))
    time.sleep(0.1)
    holder, records = {}, []

    def on_pass(rec):
        out = holder["out"]
        records.append(
            dict(
                rec,
                remaining=out.remaining_pages * PAGE_SIZE,
                expected=out.expected_downtime,
                bw=rec["bytes"] / (rec["seconds"] * 1000),
            )
        )

    run = run_local(
        src,
        hosts["B"],
        monitor,
        params=fast_params(hosts["B"], downtime_limit=30),
        on_pass=on_pass,
        during=lambda out: holder.setdefault("out", out),
    )
    try:
        assert run.verified
        assert len(records) == len(run.outgoing.passes), "on_pass sees every pass, stop-and-copy included"
        assert records[-1].get("stop_and_copy") and not any(r.get("stop_and_copy") for r in records[:-1])
        records = records[:-1]  # the pre-copy passes
        for r in records[:-1]:
            assert r["remaining"] > r["bw"] * 30, "no switchover while pending > threshold"
        last = records[-1]
        assert last["remaining"] <= last["bw"] * 30
        for r in records:
            assert r["expected"] == int(r["remaining"] / r["bw"])
        assert run.outgoing.passes[-1]["pages"] * PAGE_SIZE >= last["remaining"]
    finally:
        finish(run)
        src.destroy()


def test_nodbg_guest_verified_from_inside(hosts, monitor):
    """NODBG forbids DBG_DECRYPT, so the host cannot digest the guest; its agent does, from inside, on
    both ends: the verdict is a real comparison, not a guess (a wrong page would differ)."""
    src = monitor.watch(new_vm(hosts["A"], 32 * MiB, policy=0x11000021, dirty_rate=4e6))
    with pytest.raises(Exception, match="POLICY_FAILURE"):
        src.digest()  # the host's debug path is refused
    run = run_local(src, hosts["B"], monitor)
    try:
        assert run.info["status"] == "completed" and run.verified
        assert run.info["x-guest-digest"] == run.incoming.guest_digest
        run.dest.workload.pause()
        before = run.dest.agent_digest()
        run.dest.guest.plant(np.array([5]), b"one page changed")
        assert run.dest.agent_digest() != before
    finally:
        finish(run)
        src.destroy()


def test_live_progress_during_the_first_pass(hosts, monitor):
    """query-migrate during the bulk pass: remaining falls, mbps over the last interval, expected-downtime
    from it, dirty-pages-rate from the dirty log (QEMU's migration_update_counters), not totals and zeros."""
    src = monitor.watch(new_vm(hosts["A"], 64 * MiB, dirty_rate=8e6))
    samples = []

    def during(out):
        deadline = time.monotonic() + 20
        while out.status != "active" and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(8):
            time.sleep(0.25)
            info = out.info()
            if info.get("status") == "active" and not out.passes:
                samples.append(info)

    run = run_local(src, hosts["B"], monitor, params=fast_params(hosts["B"], max_bandwidth=24 << 20), during=during)
    try:
        assert run.info["status"] == "completed"
        assert len(samples) >= 3, "sampled during the first pass"
        total = samples[0]["ram"]["total"]
        remaining = [s["ram"]["remaining"] for s in samples]
        assert remaining[-1] < remaining[0] <= total, remaining
        assert all(s["ram"]["mbps"] > 0 for s in samples[1:])
        assert all(s["expected-downtime"] > 0 for s in samples[1:])
        assert any(s["ram"]["dirty-pages-rate"] > 0 for s in samples)
    finally:
        finish(run)
        src.destroy()
