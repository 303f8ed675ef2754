"""Independent conformance tests of the simulated SEV firmware against AMD's SEV API (pub. #55766) as AMD's
firmware source implements it (amd/AMD-ASPFW ``sev_mcmd.c``, ``sev_plat.c``, ``sev_guest.c``).

Expected statuses come from tables written here from the spec, not from ``pysev.firmware.sev.platform.COMMANDS``.
Packets and sessions are built with an independent oracle (``cryptography``) or by ``pysev.owner``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import logging
import struct

import numpy as np
import pytest
from Crypto.Cipher import AES
from Crypto.PublicKey import ECC
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pysev import kvm
from pysev.firmware.amdroot import SimulatedRoot, default_root
from pysev.firmware.certs import Algo, SevCert, Usage
from pysev.firmware.sev import abi
from pysev.firmware.sev.abi import (
    API_MAJOR,
    API_MINOR,
    BUILD,
    CBITPOS,
    Cmd,
    GuestState,
    PlatformState,
    Policy,
    make_policy,
)
from pysev.firmware.sev.platform import Platform
from pysev.firmware.status import SevStatus
from pysev.hw.hostmem import PAGE_SIZE, HostMemory
from pysev.owner import GuestOwner

MiB = 1 << 20
CBIT = 1 << CBITPOS
SCRATCH = 8 * MiB


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
class Trng:
    """A deterministic TRNG stream (AES-CTR keystream): n calls of k bytes == one call of n·k bytes."""

    def __init__(self, seed: bytes) -> None:
        self._c = AES.new(hashlib.sha256(seed).digest()[:16], AES.MODE_CTR, nonce=b"", initial_value=0)

    def __call__(self, n: int) -> bytes:
        return self._c.encrypt(bytes(n))


def oracle_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def oracle_packet(tek, tik, plaintext, *, ctx=2, flags=0, iv=b"\x5a" * 16, trailer=b""):
    ct = oracle_ctr(tek, iv, plaintext)
    aad = bytes([ctx]) + struct.pack("<I", flags) + iv + struct.pack("<II", len(ct), len(ct))
    mac = hmac.digest(tik, aad + ct + trailer, "sha256")
    return struct.pack("<I", flags) + iv + mac, ct


class Host:
    """A Platform on its own DRAM plus a bump allocator over a kernel scratch area for command data."""

    def __init__(self, seed=1, *, root=None, trng=None, chip_id=None, size=128 * MiB, es=True, init=True):
        kw = {"trng": trng} if trng is not None else {}
        self.p = Platform(HostMemory(size, seed=seed), root=root, chip_id=chip_id, **kw)
        self.dram = self.p.dram
        self._scratch = self.dram.alloc_kernel(SCRATCH)
        self._off = 0
        if init:
            assert self.issue(Cmd.INIT, abi.InitBuf(flags=abi.INIT_FLAGS_SEV_ES if es else 0)) == SevStatus.SUCCESS
            self.flush()

    def flush(self):
        """What the PSP driver does after INIT (Linux sev-dev.c): WBINVD on all CPUs, then DF_FLUSH."""
        self.p.wbinvd_on_all_cpus()
        assert self.issue(Cmd.DF_FLUSH) == SevStatus.SUCCESS

    def k(self, n: int) -> int:
        n = (max(n, 1) + 63) & ~63
        if self._off + n > SCRATCH:
            self._off = 0
        pa = self._scratch + self._off
        self._off += n
        self.dram.write(pa, bytes(n))
        return pa

    def put(self, data: bytes) -> int:
        pa = self.k(len(data))
        self.dram.write(pa, bytes(data))
        return pa

    def get(self, pa: int, n: int) -> bytes:
        return self.dram.read(pa, n)

    def issue(self, cmd, buf=None):
        return self.p.issue(cmd, buf)

    def free_asid(self, es: bool = False) -> int:
        """A free ASID of the guest type's range: SEV-ES 1..MIN_SEV_ASID-1, SEV MIN_SEV_ASID..MAX_ASID."""
        used = {self.gstatus(h).asid for h in self.p.guest_handles}
        lo, hi = (1, self.p.min_sev_asid - 1) if es else (self.p.min_sev_asid, self.p.max_asid)
        return next(a for a in range(lo, hi + 1) if a not in used)

    def gstatus(self, handle):
        buf = abi.GuestStatusBuf(handle=handle)
        assert self.issue(Cmd.GUEST_STATUS, buf) == SevStatus.SUCCESS
        return buf

    def pstatus(self):
        buf = abi.PlatformStatusBuf()
        assert self.issue(Cmd.PLATFORM_STATUS, buf) == SevStatus.SUCCESS
        return buf

    @property
    def certs(self):
        if self.p._identity._keys is None:  # never INITed (or PLATFORM_RESET): borrow a peer's certs
            return _peer_certs()
        return self.p.public_certs()


_PEER = []


def _peer_certs():
    if not _PEER:
        _PEER.append(Host(seed=98).certs)
    return _PEER[0]


class Guest:
    def __init__(self, host: Host, handle: int, frames: np.ndarray, plain: np.ndarray, policy: int):
        self.host, self.handle, self.frames, self.plain, self.policy = host, handle, frames, plain, policy
        self.owner = None

    @property
    def hpa(self) -> int:
        return int(self.frames[0]) * PAGE_SIZE

    def activate(self, asid=None) -> SevStatus:
        return self.host.issue(
            Cmd.ACTIVATE,
            abi.ActivateBuf(handle=self.handle, asid=asid or self.host.free_asid(bool(self.policy & Policy.ES))),
        )

    def state(self) -> GuestState:
        return GuestState(self.host.gstatus(self.handle).state)

    def read(self, off=0, n=PAGE_SIZE) -> bytes:
        dst = self.host.k(n)
        st = self.host.issue(
            Cmd.DBG_DECRYPT, abi.DbgBuf(handle=self.handle, src_addr=(self.hpa + off) | CBIT, dst_addr=dst, len=n)
        )
        assert st == SevStatus.SUCCESS, st
        return self.host.get(dst, n)

    def destroy(self) -> None:
        h = self.host
        h.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=self.handle))
        assert h.issue(Cmd.DECOMMISSION, abi.HandleBuf(handle=self.handle)) == SevStatus.SUCCESS
        h.flush()
        h.dram.free_ram(self.frames)


def launch(host: Host, policy=0, *, npages=1, owner: GuestOwner | None = None, share=0, activate=True, seed=0) -> Guest:
    frames = host.dram.alloc_ram(npages)
    plain = np.random.default_rng(seed).integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
    host.dram.frames[frames] = plain
    buf = abi.LaunchStartBuf(handle=share, policy=policy)
    if owner is not None:
        godh, session = owner.launch_blobs()
        buf.dh_cert_address, buf.dh_cert_len = host.put(godh), len(godh)
        buf.session_address, buf.session_len = host.put(session), len(session)
    st = host.issue(Cmd.LAUNCH_START, buf)
    assert st == SevStatus.SUCCESS, st
    g = Guest(host, buf.handle, frames, plain, policy)
    g.owner = owner
    if activate:
        assert g.activate() == SevStatus.SUCCESS
        for f in frames:
            buf = abi.LaunchUpdateBuf(handle=g.handle, address=int(f) * PAGE_SIZE | CBIT, len=PAGE_SIZE)
            st = host.issue(Cmd.LAUNCH_UPDATE_DATA, buf)
            assert st == SevStatus.SUCCESS, st
    return g


def measure(g: Guest) -> bytes:
    pa = g.host.k(48)
    buf = abi.LaunchMeasureBuf(handle=g.handle, address=pa, len=48)
    assert g.host.issue(Cmd.LAUNCH_MEASURE, buf) == SevStatus.SUCCESS
    return g.host.get(pa, 48)


def running(host: Host, policy=0, **kw) -> Guest:
    g = launch(host, policy, **kw)
    measure(g)
    assert host.issue(Cmd.LAUNCH_FINISH, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    return g


def send_start_buf(host: Host, g: Guest, target: dict, *, session_len=128, amd=None, plat=None, pdh=None):
    pdh = target["pdh"] if pdh is None else pdh
    plat = target["cert_chain"] if plat is None else plat
    amd = target["amd_cert_chain"] if amd is None else amd
    return abi.SendStartBuf(
        handle=g.handle,
        pdh_cert_address=host.put(pdh),
        pdh_cert_len=len(pdh),
        plat_certs_address=host.put(plat),
        plat_certs_len=len(plat),
        amd_certs_address=host.put(amd),
        amd_certs_len=len(amd),
        session_address=host.k(128),
        session_len=session_len,
    )


def send_start(host, g, target, **kw):
    buf = send_start_buf(host, g, target, **kw)
    return host.issue(Cmd.SEND_START, buf), buf


def receive_start_buf(host: Host, policy: int, sender_pdh: bytes, session: bytes, handle=0):
    return abi.ReceiveStartBuf(
        handle=handle,
        policy=policy,
        pdh_cert_address=host.put(sender_pdh),
        pdh_cert_len=len(sender_pdh),
        session_address=host.put(session),
        session_len=len(session),
    )


def receiving(host: Host, policy=0, *, share=0, activate=True, npages=1):
    """A guest in RUPDATE whose session came from a GuestOwner acting as the sender (TEK/TIK known)."""
    sender = GuestOwner(host.certs["pdh"], policy)
    godh, session = sender.launch_blobs()
    buf = receive_start_buf(host, policy, godh, session, share)
    st = host.issue(Cmd.RECEIVE_START, buf)
    assert st == SevStatus.SUCCESS, st
    frames = host.dram.alloc_ram(npages)
    g = Guest(host, buf.handle, frames, None, policy)
    g.owner = sender
    if activate:
        assert g.activate() == SevStatus.SUCCESS
    return g


@pytest.fixture(scope="module")
def root():
    return default_root()


@pytest.fixture(scope="module")
def other_root():
    return SimulatedRoot.create("naples")  # a second, untrusted AMD root (2048-bit: quick to make)


@pytest.fixture(scope="module")
def target(root):
    return Host(seed=99)


# ---------------------------------------------------------------------------------------------------
# platform state table (AMD sev_plat.c state_tbl_sev): every command in every platform state
# ---------------------------------------------------------------------------------------------------
ALL_P = frozenset(PlatformState)
IW = frozenset({PlatformState.INIT, PlatformState.WORKING})
W = frozenset({PlatformState.WORKING})
SPEC_PLATFORM = {
    Cmd.INIT: {PlatformState.UNINIT},
    Cmd.SHUTDOWN: ALL_P,
    Cmd.PLATFORM_RESET: {PlatformState.UNINIT},
    Cmd.PLATFORM_STATUS: ALL_P,
    Cmd.PEK_GEN: {PlatformState.INIT},
    Cmd.PEK_CERT_IMPORT: {PlatformState.INIT},
    Cmd.PEK_CSR: IW,
    Cmd.PDH_GEN: IW,
    Cmd.PDH_CERT_EXPORT: IW,
    Cmd.GUEST_STATUS: IW,
    Cmd.LAUNCH_START: IW,
    Cmd.RECEIVE_START: IW,
    # no platform-state check in AMD's handlers (mcmd_df_flush_common, sev_mcmd_get_id)
    Cmd.DF_FLUSH: frozenset(PlatformState),
    Cmd.GET_ID: ALL_P,
}
for _cmd in Cmd:
    SPEC_PLATFORM.setdefault(_cmd, W)  # DECOMMISSION and every other guest command: WORKING only


def wellformed(host: Host, cmd: Cmd, g: Guest | None, handle: int | None = None):
    """A buffer with sane lengths and valid addresses, so that only the state checks can fail."""
    h = handle if handle is not None else (g.handle if g else 1)
    page = g.hpa if g else host.k(PAGE_SIZE)
    if cmd in (Cmd.SHUTDOWN, Cmd.PLATFORM_RESET, Cmd.PEK_GEN, Cmd.PDH_GEN, Cmd.DF_FLUSH):
        return None
    if cmd == Cmd.INIT:
        return abi.InitBuf(flags=abi.INIT_FLAGS_SEV_ES)
    if cmd == Cmd.PLATFORM_STATUS:
        return abi.PlatformStatusBuf()
    if cmd == Cmd.PEK_CSR:
        return abi.PekCsrBuf(address=host.k(2084), len=2084)
    if cmd == Cmd.PEK_CERT_IMPORT:
        return abi.PekCertImportBuf(
            pek_cert_address=host.k(2084), pek_cert_len=2084, oca_cert_address=host.k(2084), oca_cert_len=2084
        )
    if cmd == Cmd.PDH_CERT_EXPORT:
        return abi.PdhCertExportBuf(
            pdh_cert_address=host.k(2084), pdh_cert_len=2084, cert_chain_address=host.k(6252), cert_chain_len=6252
        )
    if cmd == Cmd.GET_ID:
        return abi.GetIdBuf(address=host.k(64), len=64)
    if cmd in (
        Cmd.DECOMMISSION,
        Cmd.DEACTIVATE,
        Cmd.LAUNCH_FINISH,
        Cmd.SEND_FINISH,
        Cmd.SEND_CANCEL,
        Cmd.RECEIVE_FINISH,
    ):
        return abi.HandleBuf(handle=h)
    if cmd == Cmd.ACTIVATE:
        return abi.ActivateBuf(handle=h, asid=host.free_asid())
    if cmd == Cmd.GUEST_STATUS:
        return abi.GuestStatusBuf(handle=h)
    if cmd == Cmd.LAUNCH_START:
        return abi.LaunchStartBuf(policy=0)
    if cmd == Cmd.RECEIVE_START:
        godh, session = GuestOwner(host.certs["pdh"], 0).launch_blobs()
        return receive_start_buf(host, 0, godh, session)
    if cmd in (Cmd.LAUNCH_UPDATE_DATA, Cmd.LAUNCH_UPDATE_VMSA):
        return abi.LaunchUpdateBuf(handle=h, address=page | CBIT, len=PAGE_SIZE)
    if cmd == Cmd.LAUNCH_MEASURE:
        return abi.LaunchMeasureBuf(handle=h, address=host.k(48), len=48)
    if cmd == Cmd.LAUNCH_SECRET:
        return abi.TransportBuf(
            handle=h,
            hdr_address=host.k(52),
            hdr_len=52,
            guest_address=page | CBIT,
            guest_len=16,
            trans_address=host.k(16),
            trans_len=16,
        )
    if cmd in (Cmd.SEND_UPDATE_DATA, Cmd.SEND_UPDATE_VMSA, Cmd.RECEIVE_UPDATE_DATA, Cmd.RECEIVE_UPDATE_VMSA):
        return abi.TransportBuf(
            handle=h,
            hdr_address=host.k(52),
            hdr_len=52,
            guest_address=page | CBIT,
            guest_len=PAGE_SIZE,
            trans_address=host.k(PAGE_SIZE),
            trans_len=PAGE_SIZE,
        )
    if cmd == Cmd.SEND_START:
        buf = send_start_buf(host, g or Guest(host, h, None, None, 0), host.certs)
        buf.handle = h
        return buf
    if cmd in (Cmd.DBG_DECRYPT, Cmd.DBG_ENCRYPT):
        scratch = host.k(16)
        guest = page | CBIT
        return abi.DbgBuf(
            handle=h,
            src_addr=guest if cmd == Cmd.DBG_DECRYPT else scratch,
            dst_addr=scratch if cmd == Cmd.DBG_DECRYPT else guest,
            len=16,
        )
    raise AssertionError(cmd)


def enter_platform_state(host: Host, state: PlatformState) -> Guest | None:
    host.issue(Cmd.SHUTDOWN)
    if state == PlatformState.UNINIT:
        return None
    assert host.issue(Cmd.INIT, abi.InitBuf(flags=abi.INIT_FLAGS_SEV_ES)) == SevStatus.SUCCESS
    host.flush()
    if state == PlatformState.INIT:
        return None
    return running(host)


@pytest.mark.parametrize("state", list(PlatformState), ids=lambda s: s.name)
def test_platform_state_table(state):
    host = Host(seed=3, init=False)
    for cmd in Cmd:
        g = enter_platform_state(host, state)
        assert PlatformState(host.pstatus().state) == state
        st = host.issue(cmd, wellformed(host, cmd, g))
        allowed = state in SPEC_PLATFORM[cmd]
        assert (st == SevStatus.INVALID_PLATFORM_STATE) == (not allowed), (cmd.name, st.name)


@pytest.mark.parametrize(
    "cmd_id", [0x00, 0x0B, 0x0D, 0x0E, 0x0F, 0x24, 0x25, 0x36, 0x45, 0x54, 0x62, 0x70, 0x71, 0xFF, 0x1234]
)
def test_unknown_command_is_invalid_command(target, cmd_id):
    assert target.issue(cmd_id, None) == SevStatus.INVALID_COMMAND
    assert target.p.issue_mailbox(cmd_id, 0) == SevStatus.INVALID_COMMAND


# ---------------------------------------------------------------------------------------------------
# guest state table (AMD sev_guest.c state_tbl_sev): every guest command in every guest state (and for a bad handle)
# ---------------------------------------------------------------------------------------------------
LIVE = frozenset(GuestState) - {GuestState.UNINIT}
SPEC_GUEST = {
    Cmd.LAUNCH_UPDATE_DATA: {GuestState.LUPDATE},
    Cmd.LAUNCH_UPDATE_VMSA: {GuestState.LUPDATE},
    Cmd.LAUNCH_MEASURE: {GuestState.LUPDATE},
    Cmd.LAUNCH_SECRET: {GuestState.LSECRET},
    Cmd.LAUNCH_FINISH: {GuestState.LSECRET},
    Cmd.SEND_START: {GuestState.RUNNING},
    Cmd.SEND_UPDATE_DATA: {GuestState.SUPDATE},
    Cmd.SEND_UPDATE_VMSA: {GuestState.SUPDATE},
    Cmd.SEND_FINISH: {GuestState.SUPDATE},
    Cmd.SEND_CANCEL: {GuestState.SUPDATE},
    Cmd.RECEIVE_UPDATE_DATA: {GuestState.RUPDATE},
    Cmd.RECEIVE_UPDATE_VMSA: {GuestState.RUPDATE},
    Cmd.RECEIVE_FINISH: {GuestState.RUPDATE},
    Cmd.ACTIVATE: LIVE - {GuestState.SENT},
    Cmd.DECOMMISSION: LIVE,
    Cmd.DEACTIVATE: LIVE,
    Cmd.GUEST_STATUS: LIVE,
    Cmd.DBG_DECRYPT: LIVE,
    Cmd.DBG_ENCRYPT: LIVE,
}


def make_guest(host: Host, state: GuestState) -> Guest:
    if state == GuestState.RUPDATE:
        return receiving(host)
    g = launch(host)
    if state == GuestState.LUPDATE:
        return g
    measure(g)
    if state == GuestState.LSECRET:
        return g
    assert host.issue(Cmd.LAUNCH_FINISH, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    if state == GuestState.RUNNING:
        return g
    assert send_start(host, g, host.certs)[0] == SevStatus.SUCCESS
    if state == GuestState.SUPDATE:
        return g
    assert host.issue(Cmd.SEND_FINISH, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    assert state == GuestState.SENT
    return g


@pytest.fixture(scope="module")
def table_host():
    return Host(seed=4)


@pytest.mark.parametrize("state", sorted(LIVE), ids=lambda s: s.name)
def test_guest_state_table(table_host, state):
    host = table_host
    for cmd, allowed in SPEC_GUEST.items():
        g = make_guest(host, state)
        assert g.state() == state
        st = host.issue(cmd, wellformed(host, cmd, g))
        if state in allowed:
            refused = (SevStatus.INVALID_GUEST_STATE, SevStatus.INVALID_PLATFORM_STATE, SevStatus.INVALID_GUEST)
            assert st not in refused, (cmd.name, st.name)
        else:
            # ACTIVATE checks ASID_OWNED/ACTIVE before the guest state (mcmd_activate_common)
            held = cmd == Cmd.ACTIVATE and host.gstatus(g.handle).asid
            assert st == (SevStatus.ACTIVE if held else SevStatus.INVALID_GUEST_STATE), (cmd.name, st.name)
            assert g.state() == state
        if g.handle in host.p.guest_handles:
            g.destroy()
    assert host.p.guest_handles == []
    # back to INIT when the last guest goes (sev_mcmd_decommission)
    assert PlatformState(host.pstatus().state) == PlatformState.INIT


def test_bad_handle_is_invalid_guest(table_host):
    host = table_host
    keep = running(host)  # platform WORKING
    for cmd in SPEC_GUEST:
        if cmd == Cmd.GUEST_STATUS:  # SUCCESS with state INVALID (0) (sev_mcmd_guest_status)
            buf = wellformed(host, cmd, keep, handle=0x777)
            assert host.issue(cmd, buf) == SevStatus.SUCCESS and buf.state == 0
            continue
        assert host.issue(cmd, wellformed(host, cmd, keep, handle=0x777)) == SevStatus.INVALID_GUEST, cmd.name
    # key sharing with a handle that does not exist
    assert host.issue(Cmd.LAUNCH_START, abi.LaunchStartBuf(handle=0x777, policy=0)) == SevStatus.INVALID_GUEST
    godh, session = GuestOwner(host.certs["pdh"], 0).launch_blobs()
    assert host.issue(Cmd.RECEIVE_START, receive_start_buf(host, 0, godh, session, 0x777)) == SevStatus.INVALID_GUEST
    assert host.p.guest_handles == [keep.handle]
    keep.destroy()


def test_sent_only_decommission(table_host):
    host = table_host
    g = make_guest(host, GuestState.SENT)
    # its own ASID is held (ASID_OWNED, before ACTIVE and SENT: mcmd_activate_common)
    assert g.activate(g.host.gstatus(g.handle).asid) == SevStatus.ASID_OWNED
    assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    assert g.activate() == SevStatus.INVALID_GUEST_STATE  # cannot run again (AMD sev_mcmd.c activate_common)
    for cmd in (Cmd.SEND_START, Cmd.LAUNCH_FINISH, Cmd.RECEIVE_FINISH, Cmd.SEND_CANCEL, Cmd.SEND_FINISH):
        assert host.issue(cmd, wellformed(host, cmd, g)) == SevStatus.INVALID_GUEST_STATE
    assert host.issue(Cmd.DECOMMISSION, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    host.flush()


def test_send_cancel_returns_to_running_and_send_again(table_host):
    host = table_host
    g = make_guest(host, GuestState.SUPDATE)
    assert host.issue(Cmd.SEND_CANCEL, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    assert g.state() == GuestState.RUNNING
    assert g.read() == g.plain[0].tobytes()
    assert send_start(host, g, host.certs)[0] == SevStatus.SUCCESS
    assert g.state() == GuestState.SUPDATE
    g.destroy()


# ---------------------------------------------------------------------------------------------------
# order of checks (AMD sev_mcmd.c, handler by handler), length queries with write-back
# ---------------------------------------------------------------------------------------------------
def test_send_update_hdr_len_before_handle(target):
    g = running(target)
    for handle in (0x999, g.handle):
        for hdr_len in (0, 1, 51):
            buf = abi.TransportBuf(handle=handle, hdr_len=hdr_len)
            assert target.issue(Cmd.SEND_UPDATE_DATA, buf) == SevStatus.INVALID_LENGTH
            assert buf.hdr_len == 52
    # with HDR_LEN fine: handle, then state (RUNNING is not SUPDATE)
    assert target.issue(Cmd.SEND_UPDATE_DATA, abi.TransportBuf(handle=0x999, hdr_len=52)) == SevStatus.INVALID_GUEST
    assert (
        target.issue(Cmd.SEND_UPDATE_DATA, abi.TransportBuf(handle=g.handle, hdr_len=52))
        == SevStatus.INVALID_GUEST_STATE
    )
    g.destroy()


def test_send_update_checks(target):
    g = running(target)
    assert send_start(target, g, target.certs)[0] == SevStatus.SUCCESS

    def sud(**kw):
        base = dict(
            handle=g.handle,
            hdr_address=target.k(52),
            hdr_len=52,
            guest_address=g.hpa | CBIT,
            guest_len=4096,
            trans_address=target.k(0x6000),
            trans_len=4096,
        )
        base.update(kw)
        return target.issue(Cmd.SEND_UPDATE_DATA, abi.TransportBuf(**base))

    for kw in (
        dict(guest_len=0),
        dict(guest_len=0x5010, trans_len=0x5010),
        dict(guest_len=24),
        dict(trans_len=0),
        dict(trans_len=4080),
    ):
        assert sud(**kw) == SevStatus.INVALID_LENGTH, kw
    assert sud(guest_len=0x5000, trans_len=0x5000) == SevStatus.SUCCESS  # up to SEV_SCRATCH_BUF_LEN
    assert sud(trans_len=8192) == SevStatus.SUCCESS  # TRANS_LEN may exceed GUEST_LEN
    assert sud(guest_address=(g.hpa + 8) | CBIT) == SevStatus.INVALID_ADDRESS
    assert sud(guest_address=(g.hpa + 8) | CBIT, guest_len=0) == SevStatus.INVALID_LENGTH  # lengths first
    assert sud(guest_address=target.dram.size | CBIT) == SevStatus.INVALID_ADDRESS
    assert sud(hdr_address=target.dram.size - 10) == SevStatus.INVALID_ADDRESS
    # INACTIVE before the lengths
    assert target.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    assert sud(guest_len=0) == SevStatus.INACTIVE
    assert sud(hdr_len=10) == SevStatus.INVALID_LENGTH  # HDR_LEN still first of all
    # VMSA variant on a non-ES guest
    assert target.issue(Cmd.SEND_UPDATE_VMSA, abi.TransportBuf(handle=g.handle, hdr_len=52)) == SevStatus.UNSUPPORTED
    g.destroy()


def test_send_start_session_len_order(target):
    g = launch(target)  # LUPDATE: wrong state, but the length comes first
    for bad in (0, 127, 129, 0x4000):
        buf = send_start_buf(target, g, target.certs, session_len=bad)
        assert target.issue(Cmd.SEND_START, buf) == SevStatus.INVALID_LENGTH
        assert buf.session_len == 128
    buf = send_start_buf(target, g, target.certs)
    assert target.issue(Cmd.SEND_START, buf) == SevStatus.INVALID_GUEST_STATE
    bad_handle = abi.SendStartBuf(handle=0x4444, session_len=0)
    assert target.issue(Cmd.SEND_START, bad_handle) == SevStatus.INVALID_GUEST  # handle before the length
    g.destroy()


def test_send_start_length_rules(target, root):
    g = running(target, make_policy(Policy.SEV))
    c = target.certs
    assert send_start(target, g, c, pdh=c["pdh"] + b"\0")[0] == SevStatus.INVALID_LENGTH
    assert send_start(target, g, c, plat=c["cert_chain"][:-1])[0] == SevStatus.INVALID_LENGTH
    assert send_start(target, g, c, amd=c["amd_cert_chain"][:-1])[0] == SevStatus.INVALID_LENGTH
    assert g.state() == GuestState.RUNNING
    g.destroy()
    g = running(target, 0)  # no chain check: only the PDH length matters
    assert send_start(target, g, c, pdh=c["pdh"][:100])[0] == SevStatus.INVALID_LENGTH
    assert send_start(target, g, c, plat=b"x", amd=b"y")[0] == SevStatus.SUCCESS
    g.destroy()


def test_receive_update_checks(target):
    g = receiving(target)
    tek, tik = g.owner._tek, g.owner._tik
    hdr, ct = oracle_packet(tek, tik, b"\x11" * 4096)

    def rud(**kw):
        base = dict(
            handle=g.handle,
            hdr_address=target.put(hdr),
            hdr_len=52,
            guest_address=int(g.frames[0]) * 4096 | CBIT,
            guest_len=4096,
            trans_address=target.put(ct),
            trans_len=4096,
        )
        base.update(kw)
        return target.issue(Cmd.RECEIVE_UPDATE_DATA, abi.TransportBuf(**base))

    for kw in (
        dict(trans_len=0),
        dict(trans_len=0x5010, guest_len=0x5010),
        dict(guest_len=0),
        dict(guest_len=4080),
        dict(guest_len=24, trans_len=24),
        dict(hdr_len=51),
        dict(hdr_len=0),
    ):
        assert rud(**kw) == SevStatus.INVALID_LENGTH, kw
    assert rud(guest_address=(int(g.frames[0]) * 4096 + 8) | CBIT) == SevStatus.INVALID_ADDRESS
    assert rud(handle=0x5555) == SevStatus.INVALID_GUEST
    assert rud() == SevStatus.SUCCESS
    assert rud(hdr_len=100) == SevStatus.SUCCESS  # HDR_LEN >= 52 is fine
    assert target.issue(Cmd.RECEIVE_UPDATE_VMSA, abi.TransportBuf(handle=g.handle, hdr_len=52)) == SevStatus.UNSUPPORTED
    assert target.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    assert rud(trans_len=0) == SevStatus.INACTIVE  # INACTIVE before the lengths
    g.destroy()


def test_inactive_before_activation(target):
    g = launch(target, activate=False)
    upd = abi.LaunchUpdateBuf(handle=g.handle, address=g.hpa | CBIT, len=4096)
    assert target.issue(Cmd.LAUNCH_UPDATE_DATA, upd) == SevStatus.INACTIVE
    assert target.issue(Cmd.DBG_DECRYPT, wellformed(target, Cmd.DBG_DECRYPT, g)) == SevStatus.INACTIVE
    assert g.activate() == SevStatus.SUCCESS
    assert target.issue(Cmd.LAUNCH_UPDATE_DATA, upd) == SevStatus.SUCCESS
    for kw in (dict(len=0), dict(len=24)):
        assert (
            target.issue(Cmd.LAUNCH_UPDATE_DATA, abi.LaunchUpdateBuf(handle=g.handle, address=g.hpa | CBIT, **kw))
            == SevStatus.INVALID_LENGTH
        )
    assert (
        target.issue(Cmd.LAUNCH_UPDATE_DATA, abi.LaunchUpdateBuf(handle=g.handle, address=(g.hpa + 4) | CBIT, len=16))
        == SevStatus.INVALID_ADDRESS
    )
    assert target.issue(Cmd.LAUNCH_UPDATE_VMSA, upd) == SevStatus.UNSUPPORTED  # not an ES guest
    g.destroy()


def test_launch_measure_length_query(target):
    g = launch(target)
    for bad in (0, 47):
        buf = abi.LaunchMeasureBuf(handle=g.handle, address=target.k(48), len=bad)
        assert target.issue(Cmd.LAUNCH_MEASURE, buf) == SevStatus.INVALID_LENGTH
        assert buf.len == 48
    assert g.state() == GuestState.LUPDATE
    g2 = running(target)
    buf = abi.LaunchMeasureBuf(handle=g2.handle, len=0)
    assert target.issue(Cmd.LAUNCH_MEASURE, buf) == SevStatus.INVALID_GUEST_STATE  # state before length
    buf = abi.LaunchMeasureBuf(handle=g.handle, address=target.k(64), len=64)
    # LEN is written back only with INVALID_LENGTH (sev_mcmd_launch_measure; CMD_BUF_INPUT_AND_OUTPUT_ERROR)
    assert target.issue(Cmd.LAUNCH_MEASURE, buf) == SevStatus.SUCCESS and buf.len == 64
    g.destroy()
    g2.destroy()


@pytest.mark.parametrize("cmd,field,size", [(Cmd.PEK_CSR, "len", 2084), (Cmd.GET_ID, "len", 64)])
def test_identity_length_queries(target, cmd, field, size):
    layout = abi.BUFFERS[cmd]
    for bad in (0, size - 1):
        buf = layout(address=0, len=bad)
        assert target.issue(cmd, buf) == SevStatus.INVALID_LENGTH and buf.len == size
    buf = layout(address=target.k(size), len=size + 100)
    assert target.issue(cmd, buf) == SevStatus.SUCCESS and buf.len == size
    assert target.issue(cmd, layout(address=target.dram.size, len=size)) == SevStatus.INVALID_ADDRESS


def test_pdh_cert_export_length_query(target):
    for lens in ((0, 0), (2084, 0), (0, 6252), (2083, 6252)):
        buf = abi.PdhCertExportBuf(pdh_cert_len=lens[0], cert_chain_len=lens[1])
        assert target.issue(Cmd.PDH_CERT_EXPORT, buf) == SevStatus.INVALID_LENGTH
        assert (buf.pdh_cert_len, buf.cert_chain_len) == (2084, 6252)
    buf = wellformed(target, Cmd.PDH_CERT_EXPORT, None)
    assert target.issue(Cmd.PDH_CERT_EXPORT, buf) == SevStatus.SUCCESS
    assert target.get(buf.pdh_cert_address, 2084) == target.certs["pdh"]
    chain = target.get(buf.cert_chain_address, 6252)
    cek = SevCert.from_bytes(chain[4168:])
    assert cek.pubkey_usage == Usage.CEK and cek.sig1.usage == Usage.INVALID  # PDH_CERT_EXPORT: CEK unsigned
    assert chain[:4168] == target.certs["cert_chain"][:4168]


def test_platform_status_fields():
    host = Host(seed=5, init=False)
    st = host.pstatus()
    assert (st.api_major, st.api_minor, st.build, st.state, st.owner, st.config, st.guest_count) == (
        API_MAJOR,
        API_MINOR,
        BUILD,
        0,
        0,
        0,
        0,
    )
    assert host.issue(Cmd.INIT, abi.InitBuf(flags=abi.INIT_FLAGS_SEV_ES)) == SevStatus.SUCCESS
    host.flush()
    assert (host.pstatus().state, host.pstatus().config) == (PlatformState.INIT, 1)
    g = running(host)
    assert (host.pstatus().state, host.pstatus().guest_count) == (PlatformState.WORKING, 1)
    assert host.issue(Cmd.INIT, abi.InitBuf()) == SevStatus.INVALID_PLATFORM_STATE
    g.destroy()
    assert host.pstatus().state == PlatformState.INIT


def test_activate_rules():
    """AMD mcmd_activate_common, activate_common, sev_guest_activate, sev_mcmd_deactivate, mcmd_df_flush_common."""
    host = Host(seed=6)
    a, b = launch(host, activate=False), launch(host, activate=False)
    act = lambda g, asid: host.issue(Cmd.ACTIVATE, abi.ActivateBuf(handle=g.handle, asid=asid))  # noqa: E731
    sev_asid = host.p.min_sev_asid
    assert act(a, 0) == SevStatus.INVALID_ASID
    assert act(a, host.p.max_asid + 1) == SevStatus.INVALID_ASID
    assert act(a, 1) == SevStatus.INVALID_ASID  # an SEV-ES ASID for an SEV guest (sev_es_validate_asid)
    assert act(a, sev_asid) == SevStatus.SUCCESS
    assert act(b, sev_asid) == SevStatus.ASID_OWNED
    assert act(a, sev_asid) == SevStatus.ASID_OWNED  # its own ASID, too: before ACTIVE
    assert act(a, sev_asid + 1) == SevStatus.ACTIVE
    assert host.issue(Cmd.DECOMMISSION, abi.HandleBuf(handle=a.handle)) == SevStatus.ACTIVE
    # never ran (LUPDATE: pending): DEACTIVATE returns the ASID clean
    assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=a.handle)) == SevStatus.SUCCESS
    assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=a.handle)) == SevStatus.INACTIVE
    assert act(b, sev_asid) == SevStatus.SUCCESS
    assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=b.handle)) == SevStatus.SUCCESS
    # a guest that ran leaves its ASID dirty, and the cores need WBINVD before DF_FLUSH
    r = running(host)
    ran = host.gstatus(r.handle).asid
    assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=r.handle)) == SevStatus.SUCCESS
    assert act(a, ran) == SevStatus.DF_FLUSH_REQUIRED
    assert host.issue(Cmd.DF_FLUSH) == SevStatus.WBINVD_REQUIRED
    assert act(a, ran) == SevStatus.DF_FLUSH_REQUIRED
    host.p.wbinvd_on_all_cpus()
    assert host.issue(Cmd.DF_FLUSH) == SevStatus.SUCCESS
    assert act(a, ran) == SevStatus.SUCCESS
    assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=a.handle)) == SevStatus.SUCCESS
    for g in (a, b, r):
        assert host.issue(Cmd.DECOMMISSION, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    assert host.pstatus().state == PlatformState.INIT
    assert host.issue(Cmd.DECOMMISSION, abi.HandleBuf(handle=b.handle)) == SevStatus.INVALID_PLATFORM_STATE


# ---------------------------------------------------------------------------------------------------
# policy matrix (AMD sev_guest.h policy bits; sev_mcmd_send_start, sev_mcmd_receive_start)
# ---------------------------------------------------------------------------------------------------
def _flip(data: bytes, off: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[off] ^= 1 << bit
    return bytes(b)


def test_nosend(target):
    g = running(target, make_policy(Policy.NOSEND | Policy.SEV))
    assert send_start(target, g, target.certs)[0] == SevStatus.POLICY_FAILURE
    assert g.state() == GuestState.RUNNING
    g.destroy()


def test_sev_bit_chain(target, other_root):
    src = Host(seed=11)
    pol = make_policy(Policy.SEV, 0, API_MINOR)
    c = target.certs
    g = running(src, pol)
    # under another AMD root: the chain is self-consistent but not ours
    alien = Host(seed=12, root=other_root)
    st = send_start(src, g, alien.certs)[0]
    assert st in (SevStatus.INVALID_CERTIFICATE, SevStatus.BAD_SIGNATURE), st
    assert send_start(src, g, c, amd=other_root.amd_chain())[0] in (
        SevStatus.INVALID_CERTIFICATE,
        SevStatus.BAD_SIGNATURE,
    )
    # tampering with each link
    pek, oca, cek = c["cert_chain"][:2084], c["cert_chain"][2084:4168], c["cert_chain"][4168:]
    assert send_start(src, g, c, plat=_flip(pek, 0x20) + oca + cek)[0] == SevStatus.BAD_SIGNATURE  # PEK body
    assert send_start(src, g, c, plat=pek[:0x624] + _flip(pek, 0x624)[0x624:] + oca + cek)[0] == SevStatus.BAD_SIGNATURE
    assert send_start(src, g, c, plat=pek + oca + _flip(cek, 0x30))[0] == SevStatus.BAD_SIGNATURE  # CEK body
    assert send_start(src, g, c, pdh=_flip(c["pdh"], 0x30))[0] == SevStatus.BAD_SIGNATURE  # PDH body
    assert send_start(src, g, c, pdh=_flip(c["pdh"], 0x41C))[0] == SevStatus.BAD_SIGNATURE  # PDH sig
    unsigned_cek = SevCert.from_bytes(cek).unsigned().to_bytes()  # as PDH_CERT_EXPORT gives it
    assert send_start(src, g, c, plat=pek + oca + unsigned_cek)[0] == SevStatus.INVALID_CERTIFICATE
    assert send_start(src, g, c, amd=_flip(c["amd_cert_chain"], 0x100))[0] in (
        SevStatus.BAD_SIGNATURE,
        SevStatus.INVALID_CERTIFICATE,
    )
    assert send_start(src, g, alien.certs, pdh=c["pdh"])[0] != SevStatus.SUCCESS
    # the OCA is not part of the SEV check: a foreign OCA passes
    assert send_start(src, g, c, plat=pek + alien.certs["cert_chain"][2084:4168] + cek)[0] == SevStatus.SUCCESS
    assert g.state() == GuestState.SUPDATE
    src.issue(Cmd.SEND_CANCEL, abi.HandleBuf(handle=g.handle))
    # receiver API (PEK body) lower than the policy demands
    g2 = running(src, make_policy(Policy.SEV, API_MAJOR, API_MINOR + 1))
    assert send_start(src, g2, c)[0] == SevStatus.POLICY_FAILURE
    assert g2.state() == GuestState.RUNNING


def make_oca():
    key = ECC.generate(curve="P-384")
    cert = SevCert.build(key.public_key(), Usage.OCA, Algo.ECDSA_SHA256).sign(key, Usage.OCA, Algo.ECDSA_SHA256)
    return cert, key


def take_ownership(host: Host, oca: SevCert, oca_key) -> SevStatus:
    csr = abi.PekCsrBuf(address=host.k(2084), len=2084)
    assert host.issue(Cmd.PEK_CSR, csr) == SevStatus.SUCCESS
    pek = SevCert.from_bytes(host.get(csr.address, 2084))
    assert pek.sig1.usage == Usage.INVALID and pek.sig2.usage == Usage.INVALID
    pek = pek.sign_as(oca, oca_key)
    return host.issue(
        Cmd.PEK_CERT_IMPORT,
        abi.PekCertImportBuf(
            pek_cert_address=host.put(pek.to_bytes()),
            pek_cert_len=2084,
            oca_cert_address=host.put(oca.to_bytes()),
            oca_cert_len=2084,
        ),
    )


def test_domain_bit():
    oca, oca_key = make_oca()
    a, b, d = Host(seed=21), Host(seed=22), Host(seed=23)
    old_pdh = b.certs["pdh"]
    for h in (a, b):
        assert take_ownership(h, oca, oca_key) == SevStatus.SUCCESS
        assert h.pstatus().owner == 1
    assert take_ownership(a, oca, oca_key) == SevStatus.ALREADY_OWNED
    assert b.certs["pdh"] != old_pdh  # PEK_CERT_IMPORT regenerates the PDH
    assert b.certs["cert_chain"][2084:4168] == oca.to_bytes()
    g = running(a, make_policy(Policy.DOMAIN))
    assert send_start(a, g, d.certs)[0] == SevStatus.POLICY_FAILURE  # other (self-owned) OCA
    other_oca, other_key = make_oca()
    forged_pek = SevCert.from_bytes(b.certs["cert_chain"][:2084]).unsigned().sign_as(other_oca, other_key)
    assert send_start(a, g, b.certs, plat=forged_pek.to_bytes() + oca.to_bytes() + b.certs["cert_chain"][4168:])[0] in (
        SevStatus.BAD_SIGNATURE,
        SevStatus.INVALID_CERTIFICATE,
    )
    assert send_start(a, g, b.certs, amd=b"not looked at")[0] == SevStatus.SUCCESS  # same OCA; AMD chain unused
    # SEV | DOMAIN: both checks
    g2 = running(a, make_policy(Policy.DOMAIN | Policy.SEV))
    assert send_start(a, g2, d.certs)[0] == SevStatus.POLICY_FAILURE
    assert send_start(a, g2, b.certs)[0] == SevStatus.SUCCESS


def test_neither_bit_checks_nothing(target, other_root):
    alien = Host(seed=13, root=other_root)
    g = running(target, make_policy(Policy.NODBG))
    st, buf = send_start(target, g, alien.certs, plat=b"\0" * 10, amd=b"\0")
    assert st == SevStatus.SUCCESS and buf.policy == g.policy
    target.issue(Cmd.SEND_CANCEL, abi.HandleBuf(handle=g.handle))
    # the PDH itself must still be a sane ECDH PDH (step 7)
    pek = alien.certs["cert_chain"][:2084]
    assert send_start(target, g, alien.certs, pdh=pek)[0] == SevStatus.INVALID_CERTIFICATE
    assert g.state() == GuestState.RUNNING
    g.destroy()


def _receive_start(host, policy, owner_policy=None, handle=0, session=None):
    owner = GuestOwner(host.certs["pdh"], policy if owner_policy is None else owner_policy)
    godh, sess_blob = owner.launch_blobs()
    buf = receive_start_buf(host, policy, godh, session or sess_blob, handle)
    return host.issue(Cmd.RECEIVE_START, buf), buf


def test_receive_start_policy():
    host = Host(seed=31, es=False)
    for pol in (0x40, 0x8000, make_policy(0, API_MAJOR, API_MINOR + 1), make_policy(0, API_MAJOR + 1, 0)):
        assert _receive_start(host, pol)[0] == SevStatus.POLICY_FAILURE, hex(pol)
    assert _receive_start(host, make_policy(Policy.ES))[0] == SevStatus.UNSUPPORTED
    assert host.p.guest_handles == [] and host.pstatus().state == PlatformState.INIT  # refused: nothing changed
    # POLICY_MAC is checked before the policy itself
    assert _receive_start(host, 0x40, owner_policy=0)[0] == SevStatus.BAD_MEASUREMENT
    assert _receive_start(host, make_policy(0, API_MAJOR, API_MINOR))[0] == SevStatus.SUCCESS
    es = Host(seed=32, es=True)
    assert _receive_start(es, make_policy(Policy.ES))[0] == SevStatus.SUCCESS


def test_key_sharing_copies_vek():
    host = Host(seed=33)
    first = running(host, 0)
    noks = running(host, make_policy(Policy.NOKS))
    assert _receive_start(host, make_policy(Policy.NOKS), handle=noks.handle)[0] == SevStatus.POLICY_FAILURE
    differs = make_policy(Policy.NODBG)
    assert _receive_start(host, differs, handle=first.handle)[0] == SevStatus.POLICY_FAILURE
    st, buf = _receive_start(host, 0, handle=first.handle)
    assert st == SevStatus.SUCCESS and buf.handle not in (0, first.handle)
    second = Guest(host, buf.handle, first.frames, None, 0)
    assert second.activate() == SevStatus.SUCCESS
    assert second.read() == first.plain[0].tobytes()  # same VEK: same ciphertext decrypts
    st = host.issue(Cmd.LAUNCH_START, abi.LaunchStartBuf(handle=first.handle, policy=0))
    assert st == SevStatus.SUCCESS
    shared_key = abi.LaunchStartBuf(handle=noks.handle, policy=noks.policy)
    assert host.issue(Cmd.LAUNCH_START, shared_key) == SevStatus.POLICY_FAILURE
    third = launch(host, 0)  # no sharing: a fresh VEK
    third_view = Guest(host, third.handle, first.frames, None, 0)
    assert third_view.read() != first.plain[0].tobytes()


# ---------------------------------------------------------------------------------------------------
# MAC tampering → BAD_MEASUREMENT (AMD sev_channel.c establish_channel, sev_mcmd.c sev_mcmd_receive_update)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "off", [0x00, 0x0F, 0x10, 0x2F, 0x30, 0x3F, 0x40, 0x5F, 0x60, 0x7F], ids=lambda o: f"session+{o:#04x}"
)
def test_session_tamper(target, off):
    owner = GuestOwner(target.certs["pdh"], 0)
    godh, session = owner.launch_blobs()
    bad = _flip(session, off, 3)
    assert target.issue(Cmd.RECEIVE_START, receive_start_buf(target, 0, godh, bad)) == SevStatus.BAD_MEASUREMENT
    buf = abi.LaunchStartBuf(
        policy=0, dh_cert_address=target.put(godh), dh_cert_len=2084, session_address=target.put(bad), session_len=128
    )
    assert target.issue(Cmd.LAUNCH_START, buf) == SevStatus.BAD_MEASUREMENT
    assert target.p.guest_handles == []


def test_policy_mismatch_and_length(target):
    owner = GuestOwner(target.certs["pdh"], make_policy(Policy.NODBG))
    godh, session = owner.launch_blobs()
    assert target.issue(Cmd.RECEIVE_START, receive_start_buf(target, 0, godh, session)) == SevStatus.BAD_MEASUREMENT
    long_session = receive_start_buf(target, 1, godh, session + b"\0")
    assert target.issue(Cmd.RECEIVE_START, long_session) == SevStatus.INVALID_LENGTH
    assert target.issue(Cmd.RECEIVE_START, receive_start_buf(target, 1, godh[:-1], session)) == SevStatus.INVALID_LENGTH
    ecdsa_cert = target.certs["cert_chain"][:2084]  # a PEK (ECDSA) is not a PDH (sev_cert_sanity_check)
    assert (
        target.issue(Cmd.RECEIVE_START, receive_start_buf(target, 1, ecdsa_cert, session))
        == SevStatus.INVALID_CERTIFICATE
    )
    assert target.issue(Cmd.RECEIVE_START, receive_start_buf(target, 1, godh, session)) == SevStatus.SUCCESS


@pytest.mark.parametrize(
    "what,off", [("hdr", 4), ("hdr", 19), ("hdr", 20), ("hdr", 51), ("ct", 0), ("ct", 4095), ("len", 0)]
)
def test_packet_tamper_leaves_memory(target, what, off):
    g = receiving(target)
    hpa = int(g.frames[0]) * PAGE_SIZE
    hdr, ct = oracle_packet(g.owner._tek, g.owner._tik, bytes(range(256)) * 16)
    guest_len = 4096
    if what == "hdr":
        hdr = _flip(hdr, off)
    elif what == "ct":
        ct = _flip(ct, off, 7)
    else:
        guest_len = 4080  # the MAC covers the lengths
        ct = ct[:4080]
    before = target.get(hpa, PAGE_SIZE)
    buf = abi.TransportBuf(
        handle=g.handle,
        hdr_address=target.put(hdr),
        hdr_len=52,
        guest_address=hpa | CBIT,
        guest_len=guest_len,
        trans_address=target.put(ct),
        trans_len=guest_len,
    )
    assert target.issue(Cmd.RECEIVE_UPDATE_DATA, buf) == SevStatus.BAD_MEASUREMENT
    assert target.get(hpa, PAGE_SIZE) == before
    # batch form: the same verdict per packet, nothing written
    if guest_len == 4096:
        status, per = target.p.receive_update_data_batch(
            g.handle,
            g.frames[:1],
            np.frombuffer(hdr, np.uint8).reshape(1, 52).copy(),
            np.frombuffer(ct, np.uint8).reshape(1, 4096).copy(),
        )
        assert status == SevStatus.SUCCESS and list(per) == [SevStatus.BAD_MEASUREMENT]
        assert target.get(hpa, PAGE_SIZE) == before
    g.destroy()


def test_packet_good_and_compressed(target):
    g = receiving(target)
    hpa = int(g.frames[0]) * PAGE_SIZE
    data = bytes(range(256)) * 16
    hdr, ct = oracle_packet(g.owner._tek, g.owner._tik, data)

    def buf(h, c):
        return abi.TransportBuf(
            handle=g.handle,
            hdr_address=target.put(h),
            hdr_len=52,
            guest_address=hpa | CBIT,
            guest_len=4096,
            trans_address=target.put(c),
            trans_len=4096,
        )

    chdr, cct = oracle_packet(g.owner._tek, g.owner._tik, data, flags=1)  # correctly MACed, but compressed
    before = target.get(hpa, PAGE_SIZE)
    assert target.issue(Cmd.RECEIVE_UPDATE_DATA, buf(chdr, cct)) == SevStatus.UNSUPPORTED
    assert target.get(hpa, PAGE_SIZE) == before
    status, per = target.p.receive_update_data_batch(
        g.handle,
        g.frames[:1],
        np.frombuffer(chdr, np.uint8).reshape(1, 52).copy(),
        np.frombuffer(cct, np.uint8).reshape(1, 4096).copy(),
    )
    assert list(per) == [SevStatus.UNSUPPORTED] and target.get(hpa, PAGE_SIZE) == before
    shdr, sct = oracle_packet(g.owner._tek, g.owner._tik, data, ctx=1)  # a secret-context MAC
    assert target.issue(Cmd.RECEIVE_UPDATE_DATA, buf(shdr, sct)) == SevStatus.BAD_MEASUREMENT
    assert target.issue(Cmd.RECEIVE_UPDATE_DATA, buf(hdr, ct)) == SevStatus.SUCCESS
    assert target.get(hpa, PAGE_SIZE) != data  # stored encrypted
    assert target.issue(Cmd.RECEIVE_FINISH, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    assert Guest(target, g.handle, g.frames, None, 0).read() == data
    # the channel keys are gone after RECEIVE_FINISH: nothing else is accepted
    assert target.issue(Cmd.RECEIVE_UPDATE_DATA, buf(hdr, ct)) == SevStatus.INVALID_GUEST_STATE
    g.destroy()


# ---------------------------------------------------------------------------------------------------
# Launch with a guest owner (sev_mcmd_launch_start … sev_mcmd_launch_finish)
# ---------------------------------------------------------------------------------------------------
def test_launch_with_owner(target, root):
    c = target.certs
    pol = make_policy(Policy.NOKS, 0, 17)
    owner = GuestOwner(
        c["pdh"], pol, plat_certs=c["cert_chain"], amd_certs=c["amd_cert_chain"], anchor=root.trust_anchor
    )
    assert "policy" in repr(owner)
    g = launch(target, pol, owner=owner, activate=False, npages=2)
    assert g.activate() == SevStatus.SUCCESS
    digest = hashlib.sha256()
    pieces = [(g.hpa, 4096), (int(g.frames[1]) * 4096 + 0x100, 0x40), (g.hpa, 32)]  # call order matters
    for hpa, n in pieces:
        digest.update(target.get(hpa, n))
        assert (
            target.issue(Cmd.LAUNCH_UPDATE_DATA, abi.LaunchUpdateBuf(handle=g.handle, address=hpa | CBIT, len=n))
            == SevStatus.SUCCESS
        )
    m = measure(g)
    assert owner.verify_measurement(m, digest.digest(), API_MAJOR, API_MINOR, BUILD)
    assert not owner.verify_measurement(m, hashlib.sha256(b"other").digest(), API_MAJOR, API_MINOR, BUILD)
    assert not owner.verify_measurement(_flip(m, 40), digest.digest(), API_MAJOR, API_MINOR, BUILD)
    assert not owner.verify_measurement(m, digest.digest(), API_MAJOR, API_MINOR, BUILD + 1)
    secret = b"disk-key:" + b"\xa5" * 55
    gpa_off = 0x230
    hdr, ct = owner.secret_packet(secret, m)
    tbuf = lambda h, c_, off=gpa_off: abi.TransportBuf(  # noqa: E731
        handle=g.handle,
        hdr_address=target.put(h),
        hdr_len=52,
        guest_address=(g.hpa + off) | CBIT,
        guest_len=len(c_),
        trans_address=target.put(c_),
        trans_len=len(c_),
    )
    hdr_bad, ct_bad = owner.secret_packet(secret, _flip(m, 0))  # bound to MEASURE
    assert target.issue(Cmd.LAUNCH_SECRET, tbuf(hdr_bad, ct_bad)) == SevStatus.BAD_MEASUREMENT
    assert target.issue(Cmd.LAUNCH_SECRET, tbuf(hdr, ct, 0x238)) == SevStatus.INVALID_ADDRESS
    b = tbuf(hdr, ct)
    b.hdr_len = 53
    assert target.issue(Cmd.LAUNCH_SECRET, b) == SevStatus.INVALID_LENGTH  # exactly 52
    assert target.issue(Cmd.LAUNCH_SECRET, tbuf(hdr, ct)) == SevStatus.SUCCESS
    assert g.read(gpa_off, len(secret)) == secret
    assert target.issue(Cmd.LAUNCH_FINISH, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
    assert g.state() == GuestState.RUNNING
    assert target.issue(Cmd.LAUNCH_SECRET, tbuf(hdr, ct)) == SevStatus.INVALID_GUEST_STATE
    g.destroy()
    with pytest.raises(ValueError):
        owner.secret_packet(b"x" * 17, m)
    with pytest.raises(ValueError):
        owner.secret_packet(b"x" * 0x5010, m)


def test_owner_rejects_foreign_chain(target, other_root):
    from pysev.firmware.status import SevError

    c = target.certs
    with pytest.raises(SevError):
        GuestOwner(c["pdh"], 0, plat_certs=c["cert_chain"], amd_certs=other_root.amd_chain())
    with pytest.raises(SevError):
        GuestOwner(
            c["pdh"], 0, plat_certs=c["cert_chain"], amd_certs=c["amd_cert_chain"], anchor=other_root.trust_anchor
        )
    with pytest.raises(SevError):
        GuestOwner(_flip(c["pdh"], 0x30), 0, plat_certs=c["cert_chain"], amd_certs=c["amd_cert_chain"])


def test_launch_without_godh_skips_policy(target):
    g = launch(target, 0xFFC0 | make_policy(0, 0xFF, 0xFF))  # reserved bits and an impossible API: accepted
    m = measure(g)
    assert g.state() == GuestState.LSECRET and len(m) == 48
    g.destroy()
    owner = GuestOwner(target.certs["pdh"], 0x40)
    godh, session = owner.launch_blobs()
    buf = abi.LaunchStartBuf(
        policy=0x40,
        dh_cert_address=target.put(godh),
        dh_cert_len=2084,
        session_address=target.put(session),
        session_len=128,
    )
    assert target.issue(Cmd.LAUNCH_START, buf) == SevStatus.POLICY_FAILURE
    buf.session_len = 0
    assert target.issue(Cmd.LAUNCH_START, buf) == SevStatus.INVALID_LENGTH


def test_nodbg(target):
    g = running(target, make_policy(Policy.NODBG))
    for cmd in (Cmd.DBG_DECRYPT, Cmd.DBG_ENCRYPT):
        assert target.issue(cmd, wellformed(target, cmd, g)) == SevStatus.POLICY_FAILURE
    assert target.p.dbg_decrypt_batch(g.handle, g.frames, np.empty((1, 4096), np.uint8)) == SevStatus.POLICY_FAILURE
    g.destroy()
    g = running(target, 0)
    src = target.put(b"\x42" * 32)
    assert (
        target.issue(Cmd.DBG_ENCRYPT, abi.DbgBuf(handle=g.handle, src_addr=src, dst_addr=(g.hpa + 32) | CBIT, len=32))
        == SevStatus.SUCCESS
    )
    assert g.read(0, 96) == g.plain[0].tobytes()[:32] + b"\x42" * 32 + g.plain[0].tobytes()[64:96]
    g.destroy()


# ---------------------------------------------------------------------------------------------------
# Through KVM: launch with an owner, A → B → C, per-page vs batch, no secret leaks
# ---------------------------------------------------------------------------------------------------
def cbuf(data: bytes):
    b = ctypes.create_string_buffer(bytes(data), len(data))
    return b, ctypes.addressof(b)


class Vm:
    def __init__(self, host: Host, npages: int):
        self.host, self.kvm = host, kvm.KvmHost(host.p).create_vm()
        self.kvm.op(kvm.sev_cmd_id.KVM_SEV_INIT)
        self.frames = host.dram.alloc_ram(npages)
        self.keep = []

    def uaddr(self, i, off=0):
        return self.kvm.uaddr_of_hpa(int(self.frames[i]) * PAGE_SIZE + off)

    def launch(self, policy, owner: GuestOwner, plain: np.ndarray, secret: bytes):
        godh, session = owner.launch_blobs()
        (_gb, ga), (_sb, sa) = cbuf(godh), cbuf(session)  # buffers kept alive
        self.kvm.op(
            kvm.sev_cmd_id.KVM_SEV_LAUNCH_START,
            kvm.kvm_sev_launch_start(policy=policy, dh_uaddr=ga, dh_len=len(godh), session_uaddr=sa, session_len=128),
        )
        self.host.dram.frames[self.frames] = plain
        for i in range(len(self.frames)):
            self.kvm.op(
                kvm.sev_cmd_id.KVM_SEV_LAUNCH_UPDATE_DATA,
                kvm.kvm_sev_launch_update_data(uaddr=self.uaddr(i), len=PAGE_SIZE),
            )
        mb = ctypes.create_string_buffer(48)
        self.kvm.op(
            kvm.sev_cmd_id.KVM_SEV_LAUNCH_MEASURE, kvm.kvm_sev_launch_measure(uaddr=ctypes.addressof(mb), len=48)
        )
        m = mb.raw
        assert owner.verify_measurement(m, hashlib.sha256(plain.tobytes()).digest(), API_MAJOR, API_MINOR, BUILD)
        hdr, ct = owner.secret_packet(secret, m)
        (_hb, ha), (_tb, ta) = cbuf(hdr), cbuf(ct)  # buffers kept alive
        self.kvm.op(
            kvm.sev_cmd_id.KVM_SEV_LAUNCH_SECRET,
            kvm.kvm_sev_launch_secret(
                hdr_uaddr=ha,
                hdr_len=52,
                guest_uaddr=self.uaddr(0, 0x100),
                guest_len=len(ct),
                trans_uaddr=ta,
                trans_len=len(ct),
            ),
        )
        self.kvm.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_FINISH)

    def send_start(self, certs: dict):
        bufs = {k: cbuf(v) for k, v in certs.items()}
        sess = ctypes.create_string_buffer(128)
        self.keep += [bufs, sess]
        arg = kvm.kvm_sev_send_start(
            pdh_cert_uaddr=bufs["pdh"][1],
            pdh_cert_len=len(certs["pdh"]),
            plat_certs_uaddr=bufs["cert_chain"][1],
            plat_certs_len=len(certs["cert_chain"]),
            amd_certs_uaddr=bufs["amd_cert_chain"][1],
            amd_certs_len=len(certs["amd_cert_chain"]),
            session_uaddr=ctypes.addressof(sess),
            session_len=128,
        )
        self.kvm.op(kvm.sev_cmd_id.KVM_SEV_SEND_START, arg)
        return arg.policy, sess.raw

    def send_pages(self):
        n = len(self.frames)
        hdr, tr = np.zeros((n, 52), np.uint8), np.zeros((n, PAGE_SIZE), np.uint8)
        for i in range(n):
            arg = kvm.kvm_sev_send_update_data(
                hdr_uaddr=hdr[i].ctypes.data,
                hdr_len=52,
                guest_uaddr=self.uaddr(i),
                guest_len=PAGE_SIZE,
                trans_uaddr=tr[i].ctypes.data,
                trans_len=PAGE_SIZE,
            )
            self.kvm.op(kvm.sev_cmd_id.KVM_SEV_SEND_UPDATE_DATA, arg)
        return hdr, tr

    def send_batch(self):
        n = len(self.frames)
        hdr, tr = np.zeros((n, 52), np.uint8), np.zeros((n, PAGE_SIZE), np.uint8)
        self.kvm.send_update_data_batch(self.frames, hdr, tr)
        return hdr, tr

    def receive(self, policy, src_pdh, session, hdr, tr, per_page=False):
        (_pb, pa), (_sb, sa) = cbuf(src_pdh), cbuf(session)  # buffers kept alive
        self.kvm.op(
            kvm.sev_cmd_id.KVM_SEV_RECEIVE_START,
            kvm.kvm_sev_receive_start(policy=policy, pdh_uaddr=pa, pdh_len=2084, session_uaddr=sa, session_len=128),
        )
        if per_page:
            for i in range(len(self.frames)):
                self.kvm.op(
                    kvm.sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_DATA,
                    kvm.kvm_sev_receive_update_data(
                        hdr_uaddr=hdr[i].ctypes.data,
                        hdr_len=52,
                        guest_uaddr=self.uaddr(i),
                        guest_len=PAGE_SIZE,
                        trans_uaddr=tr[i].ctypes.data,
                        trans_len=PAGE_SIZE,
                    ),
                )
        else:
            assert set(self.kvm.receive_update_data_batch(self.frames, hdr, tr).tolist()) == {0}
        self.kvm.op(kvm.sev_cmd_id.KVM_SEV_RECEIVE_FINISH)

    def plaintext(self):
        out = np.empty((len(self.frames), PAGE_SIZE), np.uint8)
        self.kvm.dbg_decrypt_batch(self.frames, out)
        return out

    def state(self):
        return GuestState(self.kvm.op(kvm.sev_cmd_id.KVM_SEV_GUEST_STATUS, kvm.kvm_sev_guest_status()).state)


def _secrets_of(*objs) -> list[bytes]:
    return [s for s in objs if s and any(s)]


def test_round_trip_a_b_c_and_no_leaks(root, caplog):
    caplog.set_level(logging.DEBUG)
    n = 8
    hosts = [Host(seed=40 + i) for i in range(3)]
    a, b, c = (Vm(h, n) for h in hosts)
    plain = np.random.default_rng(5).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
    secret = b"S" * 48
    pol = make_policy(Policy.SEV | Policy.NOKS, 0, 17)
    ca = hosts[0].certs
    owner = GuestOwner(
        ca["pdh"], pol, plat_certs=ca["cert_chain"], amd_certs=ca["amd_cert_chain"], anchor=root.trust_anchor
    )
    a.launch(pol, owner, plain, secret)
    expected = plain.copy()
    expected[0, 0x100 : 0x100 + len(secret)] = np.frombuffer(secret, np.uint8)
    assert np.array_equal(a.plaintext(), expected)
    secrets = [owner._tek, owner._tik, owner._godh_key.d.to_bytes(48, "big")]
    hops = [(a, b, True), (b, c, False)]
    for src, dst, per_page in hops:
        policy, session = src.send_start(dst.host.certs)
        assert policy == pol
        sg = src.host.p._guests[src.kvm.handle]
        secrets += [sg.vek, sg.tek, sg.tik]
        hdr, tr = src.send_pages() if per_page else src.send_batch()
        assert not any(bytes(row).find(bytes(expected[0][:64])) >= 0 for row in tr)  # transport is encrypted
        dst.receive(policy, src.host.certs["pdh"], session, hdr, tr, per_page=per_page)
        secrets.append(dst.host.p._guests[dst.kvm.handle].vek)
        src.kvm.op(kvm.sev_cmd_id.KVM_SEV_SEND_FINISH)
        assert src.state() == GuestState.SENT and dst.state() == GuestState.RUNNING
        assert np.array_equal(dst.plaintext(), expected)
    for h in hosts:
        ident, keys = h.p._identity, h.p._identity._keys
        assert keys is not None
        secrets += [
            k.d.to_bytes(48, "big") for k in (keys.pdh_key, keys.pek_key, keys.oca_key, ident._cek_key) if k is not None
        ]
    secrets = _secrets_of(*secrets)
    hexes = [s.hex() for s in secrets] + [s.hex().upper() for s in secrets]
    texts = [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    objs = [owner]
    for vm in (a, b, c):
        objs += [
            vm.kvm,
            vm.kvm.host,
            vm.host.p,
            vm.host.p._identity,
            vm.host.p.memctl,
            vm.host.p.root,
            vm.host.p.root.kds,
        ]
    for o in objs:
        texts += [repr(o), str(o)]
        for name in dir(o):
            if name.startswith("_"):
                continue
            try:
                val = getattr(o, name)
            except Exception:  # noqa: BLE001 - properties may refuse in some states
                continue
            if callable(val):
                continue
            if isinstance(val, (bytes, bytearray)):
                assert not any(s in bytes(val) for s in secrets), (type(o).__name__, name)
            texts.append(repr(val))
    blob = "\n".join(texts)
    assert len(caplog.records) > 10
    for s, hx in zip(secrets, hexes, strict=False):
        assert hx not in blob and hx.upper() not in blob and repr(s) not in blob
    # nothing secret left behind in the host-visible kernel area either (session/packets are wrapped)
    for h in hosts:
        kernel = h.get(0, 16 * MiB)
        for s in secrets:
            assert kernel.find(s) < 0


def _send_through_ring(vm, ring: int):
    """The batch through a ``ring``-row buffer the caller drains (``on_slice``), reassembled."""
    n = len(vm.frames)
    hdr, tr = np.zeros((n, 52), np.uint8), np.zeros((n, PAGE_SIZE), np.uint8)
    rh, rt = np.zeros((ring, 52), np.uint8), np.zeros((ring, PAGE_SIZE), np.uint8)

    def drain(start, stop):
        hdr[start:stop], tr[start:stop] = rh[: stop - start], rt[: stop - start]

    vm.kvm.send_update_data_batch(vm.frames, rh, rt, on_slice=drain)
    return hdr, tr


def test_per_page_batch_and_ring_byte_identical(target):
    n = 6
    out = []
    for mode in ("pages", "batch", "ring"):
        h = Host(seed=50, trng=Trng(b"fixed"), chip_id=b"\x07" * 64)
        vm = Vm(h, n)
        plain = np.random.default_rng(1).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
        owner = GuestOwner(h.certs["pdh"], 0, rng=Trng(b"owner"))
        vm.launch(0, owner, plain, b"k" * 16)
        vm.send_start(target.certs)
        out.append(
            {"pages": vm.send_pages, "batch": vm.send_batch, "ring": functools.partial(_send_through_ring, vm, 4)}[
                mode
            ]()
        )
    (h1, t1), (h2, t2), (h3, t3) = out
    assert np.array_equal(h1, h2) and np.array_equal(t1, t2)
    assert np.array_equal(h1, h3) and np.array_equal(t1, t3)
    assert len({bytes(r[4:20]) for r in h1}) == n  # a fresh IV per packet


# ---------------------------------------------------------------------------------------------------
# Hostile command buffers: always a status, never an exception, an unrelated guest untouched
# ---------------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_env():
    host = Host(seed=60, size=48 * MiB)
    victim = running(host, 0, npages=1, seed=9)
    other = running(host, 0, npages=1, seed=10)
    sending = running(host, 0, npages=1, seed=11)
    assert send_start(host, sending, host.certs)[0] == SevStatus.SUCCESS
    recv = receiving(host)
    return host, victim, [other.handle, sending.handle, recv.handle, 0, 0x1000, 0xFFFFFFFF], other


FUZZ_CMDS = [c for c in Cmd if c not in (Cmd.SHUTDOWN, Cmd.PLATFORM_RESET)]
LENS = st.one_of(
    st.sampled_from(
        [0, 1, 15, 16, 17, 47, 48, 51, 52, 53, 127, 128, 129, 2083, 2084, 4095, 4096, 6252, 0x5000, 0x5001, 0xFFFFFFFF]
    ),
    st.integers(0, 0x6000),
)


def _addr_st(host, other_hpa):
    size = host.dram.size
    return st.one_of(
        st.sampled_from([0, 8, size - 16, size, size + 4096, 2**63, 2**64 - 1]),
        st.integers(0, 16 * MiB - 1),
        st.integers(size - 0x8000, size + 0x8000),
        st.integers(0, 2**64 - 1),
        st.integers(other_hpa - 64, other_hpa + 8192),
    )


def _fields(layout):
    return [n for n, _ in layout.FORMAT if n]


@pytest.mark.parametrize("cmd", FUZZ_CMDS, ids=lambda c: c.name)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_command_buffers(fuzz_env, cmd, data):
    host, victim, handles, other = fuzz_env
    layout = abi.BUFFERS[cmd]
    buf = None
    vlo, vhi = victim.hpa, victim.hpa + PAGE_SIZE
    if layout is not None:
        values = {}
        addr = _addr_st(host, other.hpa)
        for name in _fields(layout):
            code = dict(layout.FORMAT)[name]
            bits = {"B": 8, "H": 16, "I": 32, "Q": 64}[code]
            if name == "handle":
                v = data.draw(st.sampled_from(handles))
            elif "addr" in name:
                v = data.draw(
                    st.one_of(addr, addr.map(lambda a: a | CBIT)) if bits == 64 else st.integers(0, 2**bits - 1)
                )
            elif name.endswith("len"):
                v = data.draw(LENS)
            else:
                v = data.draw(st.integers(0, 2**bits - 1))
            values[name] = v & ((1 << bits) - 1)
        lens = [v for n, v in values.items() if n.endswith("len")] + [0x5000]
        span = max(lens)
        for n, v in values.items():
            if "addr" in n:
                a = v & ~CBIT & (2**64 - 1)
                assume(a + span <= vlo or a >= vhi)
        buf = layout(**values)
    before = host.get(vlo, PAGE_SIZE)
    status = host.issue(cmd, buf)
    assert isinstance(status, SevStatus)
    assert host.get(vlo, PAGE_SIZE) == before
    assert victim.state() == GuestState.RUNNING


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(cmd=st.integers(0, 0x80), raw=st.binary(min_size=0x44, max_size=0x44))
def test_fuzz_mailbox_raw_bytes(fuzz_env, cmd, raw):
    host, victim, handles, _ = fuzz_env
    assume(cmd not in (Cmd.SHUTDOWN, Cmd.PLATFORM_RESET))
    raw = bytearray(raw)
    if raw[0] & 1:  # often aim at a live handle
        raw[0:4] = struct.pack("<I", handles[raw[1] % len(handles)])
    pa = host.put(bytes(raw))
    before = host.get(victim.hpa, PAGE_SIZE)
    status = host.p.issue_mailbox(cmd, pa)
    assert isinstance(status, SevStatus)
    if status == SevStatus.SUCCESS and cmd in (Cmd.DBG_ENCRYPT, Cmd.LAUNCH_UPDATE_DATA):
        return  # could legitimately have targeted any address
    assert host.get(victim.hpa, PAGE_SIZE) == before


def test_victim_intact_after_fuzz(fuzz_env):
    host, victim, _, _ = fuzz_env
    assert victim.read() == victim.plain[0].tobytes()
