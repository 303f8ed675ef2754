"""The simulated SEV firmware (AMD-SP) of one host: platform and guest state machines and every
key-management command a host or guest owner uses (sev-api.md §1–§4).

One ``Platform`` per simulated host; nothing is global, so any number coexist in one process.
Commands enter through one choke point, ``Platform.issue(cmd, buf)``: the platform-state gate comes
from ``COMMANDS`` (§1.4), then the command's handler runs its checks **in the firmware's order**
(AMD's ``sev_mcmd.c`` as transcribed in §2) and returns the firmware status; guest-state transitions
come from the same table (§1.5) and are committed only when the handler succeeds. A refused command
changes nothing: handlers validate everything (lengths, addresses, MACs) before the first write.

Secrets (VEK, TEK, TIK, private keys) live in ``_Guest``/``_Identity`` objects reachable only through
underscore attributes; no repr, log line or status message carries them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import threading
from typing import Callable

import numpy as np

import csev
from pysev.firmware.sev import session as sess
from pysev.firmware.sev import identity as ident
from pysev.firmware.sev.abi import (
    GET_ID_SIZE,
    INIT_FLAGS_SEV_ES,
    MEASURE_SIZE,
    PACKET_HEADER_COMPRESSED,
    PACKET_HEADER_SIZE,
    PLAT_CERTS_SIZE,
    POLICY_RESERVED_MASK,
    SCRATCH_BUF_LEN,
    SESSION_SIZE,
    SEV_CERT_SIZE,
    VMSA_SIZE,
    BUFFERS,
    Cmd,
    CommandBuffer,
    GuestState,
    PlatformState,
    Policy,
    policy_api,
)
from pysev.hw.memctl import MemoryController
from pysev.hw.hostmem import PAGE_SHIFT, PAGE_SIZE, HostMemory
from pysev.firmware.status import SevStatus

log = logging.getLogger(__name__)

# Firmware identity reported by PLATFORM_STATUS and stamped into PEK/PDH certs. 0.24 is the last
# legacy-SEV API of Rome/Milan firmware; the build number is ours.
API_MAJOR, API_MINOR, BUILD = 0, 24, 15
CBITPOS = 51            # C-bit position in a physical address (query-sev-capabilities cbitpos)
REDUCED_PHYS_BITS = 1
MAX_ASID = 15           # SEV ASIDs of this simulated part (1..MAX_ASID)

S = SevStatus
P = PlatformState
G = GuestState
_ANY_PLATFORM = frozenset(P)
_INIT_OR_WORKING = frozenset({P.INIT, P.WORKING})
_WORKING = frozenset({P.WORKING})


@dataclasses.dataclass(frozen=True)
class CommandSpec:
    """One row of the firmware's state table: where a command may run and where it leads."""

    platform: frozenset[PlatformState]
    guest: frozenset[GuestState] | None = None  # required guest states (INVALID_GUEST_STATE otherwise)
    to: GuestState | None = None                # guest state after success


_ALL_LIVE = frozenset(set(G) - {G.UNINIT})
COMMANDS: dict[Cmd, CommandSpec] = {
    Cmd.INIT: CommandSpec(frozenset({P.UNINIT})),
    Cmd.SHUTDOWN: CommandSpec(_ANY_PLATFORM),
    Cmd.PLATFORM_RESET: CommandSpec(frozenset({P.UNINIT})),
    Cmd.PLATFORM_STATUS: CommandSpec(_ANY_PLATFORM),
    Cmd.PEK_GEN: CommandSpec(frozenset({P.INIT})),
    Cmd.PEK_CSR: CommandSpec(_INIT_OR_WORKING),
    Cmd.PEK_CERT_IMPORT: CommandSpec(frozenset({P.INIT})),
    Cmd.PDH_GEN: CommandSpec(_INIT_OR_WORKING),
    Cmd.PDH_CERT_EXPORT: CommandSpec(_INIT_OR_WORKING),
    Cmd.DF_FLUSH: CommandSpec(_INIT_OR_WORKING),
    Cmd.GET_ID: CommandSpec(_ANY_PLATFORM),
    Cmd.GUEST_STATUS: CommandSpec(_INIT_OR_WORKING),
    Cmd.DECOMMISSION: CommandSpec(_WORKING, _ALL_LIVE, G.UNINIT),
    Cmd.ACTIVATE: CommandSpec(_WORKING, _ALL_LIVE - {G.SENT}),
    Cmd.DEACTIVATE: CommandSpec(_WORKING),
    Cmd.LAUNCH_START: CommandSpec(_INIT_OR_WORKING, frozenset({G.UNINIT}), G.LUPDATE),
    Cmd.LAUNCH_UPDATE_DATA: CommandSpec(_WORKING, frozenset({G.LUPDATE})),
    Cmd.LAUNCH_UPDATE_VMSA: CommandSpec(_WORKING, frozenset({G.LUPDATE})),
    Cmd.LAUNCH_MEASURE: CommandSpec(_WORKING, frozenset({G.LUPDATE}), G.LSECRET),
    Cmd.LAUNCH_SECRET: CommandSpec(_WORKING, frozenset({G.LSECRET})),
    Cmd.LAUNCH_FINISH: CommandSpec(_WORKING, frozenset({G.LSECRET}), G.RUNNING),
    Cmd.SEND_START: CommandSpec(_WORKING, frozenset({G.RUNNING}), G.SUPDATE),
    Cmd.SEND_UPDATE_DATA: CommandSpec(_WORKING, frozenset({G.SUPDATE})),
    Cmd.SEND_UPDATE_VMSA: CommandSpec(_WORKING, frozenset({G.SUPDATE})),
    Cmd.SEND_FINISH: CommandSpec(_WORKING, frozenset({G.SUPDATE}), G.SENT),
    Cmd.SEND_CANCEL: CommandSpec(_WORKING, frozenset({G.SUPDATE}), G.RUNNING),
    Cmd.RECEIVE_START: CommandSpec(_INIT_OR_WORKING, frozenset({G.UNINIT}), G.RUPDATE),
    Cmd.RECEIVE_UPDATE_DATA: CommandSpec(_WORKING, frozenset({G.RUPDATE})),
    Cmd.RECEIVE_UPDATE_VMSA: CommandSpec(_WORKING, frozenset({G.RUPDATE})),
    Cmd.RECEIVE_FINISH: CommandSpec(_WORKING, frozenset({G.RUPDATE}), G.RUNNING),
    Cmd.DBG_DECRYPT: CommandSpec(_WORKING),
    Cmd.DBG_ENCRYPT: CommandSpec(_WORKING),
}


class _Fail(Exception):
    """Internal early exit of a handler with a firmware status."""

    def __init__(self, status: SevStatus) -> None:
        self.status = status


def _new_vek(trng: Callable[[int], bytes]) -> bytes:
    while True:  # XTS rejects equal halves; the TRNG will not produce them, but never hand one out
        vek = trng(32)
        if vek[:16] != vek[16:]:
            return vek


@dataclasses.dataclass(eq=False, repr=False)
class _Guest:
    handle: int
    policy: int
    state: GuestState
    vek: bytes
    asid: int = 0
    tek: bytes = bytes(16)
    tik: bytes = bytes(16)
    digest: "hashlib._Hash" = dataclasses.field(default_factory=hashlib.sha256)
    measure: bytes = bytes(32)

    def __repr__(self) -> str:
        return f"_Guest(handle={self.handle}, policy={self.policy:#x}, state={self.state.name}, asid={self.asid})"

    def zeroize_channel(self) -> None:
        self.tek = self.tik = bytes(16)

    @property
    def es(self) -> bool:
        return bool(self.policy & Policy.ES)


class Platform:
    """The SEV firmware and memory controller of one simulated host.

    ``dram`` is the host's physical memory (command buffers, certificates and guest RAM all live there,
    addressed by host physical address). ``root`` is the simulated AMD root that manufactured this chip
    and that its SEND_START trusts (default: the machine-wide root, ``pysev.firmware.amdroot.default_root``).
    ``trng`` is the firmware's random source (injectable so tests can replay identical output). It must
    behave as a byte stream: the batch forms draw all their IVs in one ``trng(16·k)`` call where the
    per-page commands make k calls of ``trng(16)``; a stream gives both the same bytes.
    """

    def __init__(self, dram: HostMemory, *, root=None, chip_id: bytes | None = None,
                 trng: Callable[[int], bytes] = os.urandom, max_asid: int = MAX_ASID) -> None:
        from pysev.firmware import amdroot

        self.dram = dram
        self.memctl = MemoryController(dram)
        self.root = root if root is not None else amdroot.default_root()
        self.chip_id = chip_id if chip_id is not None else trng(GET_ID_SIZE)
        self.max_asid = max_asid
        self._trng = trng
        self._lock = threading.RLock()
        self._identity = ident.Identity(self.root, self.chip_id)
        self.state = P.UNINIT
        self.es_enabled = False
        self._guests: dict[int, _Guest] = {}
        self._next_handle = 1
        self._dirty_asids: set[int] = set()

    def __repr__(self) -> str:
        return (f"Platform(chip_id={self.chip_id[:8].hex()}…, state={self.state.name}, "
                f"guests={len(self._guests)}, owner={'external' if self._identity.owned else 'self'})")

    # -- the choke point ---------------------------------------------------------------------------
    def issue(self, cmd: int, buf: CommandBuffer | None = None) -> SevStatus:
        """Run one firmware command on its command buffer; output fields are written back into ``buf``."""
        with self._lock:
            try:
                cmd = Cmd(cmd)
            except ValueError:
                return S.INVALID_COMMAND
            expected = BUFFERS[cmd]
            if expected is not None and not isinstance(buf, expected):
                raise TypeError(f"{cmd.name} takes a {expected.__name__}, got {type(buf).__name__}")
            spec = COMMANDS[cmd]
            if self.state not in spec.platform:
                status = S.INVALID_PLATFORM_STATE
            else:
                try:
                    status = getattr(self, f"_cmd_{cmd.name.lower()}")(buf)
                except _Fail as fail:
                    status = fail.status
            log.debug("%s -> %s (platform %s)", cmd.name, status.name, self.state.name)
            return status

    def issue_mailbox(self, cmd: int, cmd_paddr: int) -> SevStatus:
        """The PSP mailbox form: the command buffer is read from and written back to host memory."""
        try:
            layout = BUFFERS[Cmd(cmd)]
        except ValueError:
            return S.INVALID_COMMAND
        if layout is None:
            return self.issue(cmd)
        if not self.dram.contains(cmd_paddr, layout.size()):
            return S.INVALID_ADDRESS
        buf = layout.unpack(self.dram.read(cmd_paddr, layout.size()))
        status = self.issue(cmd, buf)
        self.dram.write(cmd_paddr, buf.pack())
        return status

    # -- helpers used by handlers --------------------------------------------------------------------
    def _guest(self, handle: int) -> _Guest:
        guest = self._guests.get(handle)
        if guest is None:
            raise _Fail(S.INVALID_GUEST)
        return guest

    @staticmethod
    def _require_state(guest: _Guest, cmd: Cmd) -> None:
        if guest.state not in COMMANDS[cmd].guest:
            raise _Fail(S.INVALID_GUEST_STATE)

    def _transition(self, guest: _Guest, cmd: Cmd) -> None:
        to = COMMANDS[cmd].to
        log.info("guest %d: %s -> %s (%s)", guest.handle, guest.state.name, to.name, cmd.name)
        guest.state = to

    @staticmethod
    def _require_active(guest: _Guest) -> None:
        if not guest.asid:
            raise _Fail(S.INACTIVE)

    def _read(self, paddr: int, length: int) -> bytes:
        if not self.dram.contains(paddr, length):
            raise _Fail(S.INVALID_ADDRESS)
        return self.dram.read(paddr, length)

    def _check_writable(self, *ranges: tuple[int, int]) -> None:
        for paddr, length in ranges:
            if not self.dram.contains(paddr, length):
                raise _Fail(S.INVALID_ADDRESS)

    @staticmethod
    def _strip_cbit(paddr: int) -> int:
        # KVM ORs the C-bit into GUEST_PADDR (§2.3); the firmware accesses it with the guest key.
        return paddr & ~(1 << CBITPOS)

    def _check_api(self, policy: int) -> None:
        if (API_MAJOR, API_MINOR) < policy_api(policy) or policy & POLICY_RESERVED_MASK:
            raise _Fail(S.POLICY_FAILURE)

    def _open_channel(self, guest_policy: int, peer_cert_paddr: int, session_paddr: int) -> tuple[bytes, bytes]:
        """RECEIVE_START steps 2–5 (also LAUNCH_START with a GODH): ECDH, unwrap, POLICY_MAC, policy."""
        peer = self._read(peer_cert_paddr, SEV_CERT_SIZE)
        session = self._read(session_paddr, SESSION_SIZE)
        if not self._identity.pdh_usable():
            raise _Fail(S.INVALID_CERTIFICATE)
        status = ident.pdh_sanity(peer)
        if status != S.SUCCESS:
            raise _Fail(status)
        z = self._identity.ecdh(peer)
        try:
            tek, tik = sess.open_session(z, session, guest_policy)
        except sess.SevError as err:
            raise _Fail(err.status) from None
        self._check_api(guest_policy)
        return tek, tik

    def _start_guest(self, handle_in: int, policy: int) -> bytes:
        """Key sharing (RECEIVE_START step 6) and the ES check (step 7); returns the guest's VEK."""
        if handle_in:
            other = self._guest(handle_in)
            if other.policy != policy or policy & Policy.NOKS:
                raise _Fail(S.POLICY_FAILURE)
            vek = other.vek
        else:
            vek = None
        if policy & Policy.ES and not self.es_enabled:
            raise _Fail(S.UNSUPPORTED)
        if len(self._guests) >= self.max_asid:
            raise _Fail(S.RESOURCE_LIMIT)
        return vek if vek is not None else _new_vek(self._trng)

    def _add_guest(self, policy: int, vek: bytes, cmd: Cmd, tek=bytes(16), tik=bytes(16)) -> _Guest:
        guest = _Guest(self._next_handle, policy, G.UNINIT, vek, tek=tek, tik=tik)
        self._next_handle += 1
        self._guests[guest.handle] = guest
        self._transition(guest, cmd)
        if self.state == P.INIT:
            self.state = P.WORKING
        return guest

    # -- platform commands (§1.4, §2.9) --------------------------------------------------------------
    def _cmd_init(self, buf) -> SevStatus:
        self.es_enabled = bool(buf.flags & INIT_FLAGS_SEV_ES)
        self._identity.ensure()
        self.state = P.INIT
        return S.SUCCESS

    def _cmd_shutdown(self, buf) -> SevStatus:
        for guest in self._guests.values():
            if guest.asid:
                self.memctl.remove_key(guest.asid)
        self._guests.clear()
        self._dirty_asids.clear()
        self.state = P.UNINIT
        self.es_enabled = False
        return S.SUCCESS

    def _cmd_platform_reset(self, buf) -> SevStatus:
        self._identity.wipe()
        return S.SUCCESS

    def _cmd_platform_status(self, buf) -> SevStatus:
        up = self.state != P.UNINIT
        buf.api_major, buf.api_minor, buf.build = API_MAJOR, API_MINOR, BUILD
        buf.state = int(self.state)
        buf.owner = int(up and self._identity.owned)
        buf.config = int(up and self.es_enabled)
        buf.guest_count = len(self._guests) if up else 0
        return S.SUCCESS

    def _cmd_pek_gen(self, buf) -> SevStatus:
        self._identity.pek_gen()
        return S.SUCCESS

    def _cmd_pek_csr(self, buf) -> SevStatus:
        if buf.len < SEV_CERT_SIZE:
            buf.len = SEV_CERT_SIZE
            return S.INVALID_LENGTH
        self._check_writable((buf.address, SEV_CERT_SIZE))
        self.dram.write(buf.address, self._identity.pek_csr())
        buf.len = SEV_CERT_SIZE
        return S.SUCCESS

    def _cmd_pek_cert_import(self, buf) -> SevStatus:
        if self._identity.owned:
            return S.ALREADY_OWNED
        if buf.pek_cert_len != SEV_CERT_SIZE or buf.oca_cert_len != SEV_CERT_SIZE:
            return S.INVALID_LENGTH
        pek = self._read(buf.pek_cert_address, SEV_CERT_SIZE)
        oca = self._read(buf.oca_cert_address, SEV_CERT_SIZE)
        return self._identity.pek_cert_import(pek, oca)

    def _cmd_pdh_gen(self, buf) -> SevStatus:
        self._identity.pdh_gen()
        return S.SUCCESS

    def _cmd_pdh_cert_export(self, buf) -> SevStatus:
        if buf.pdh_cert_len < SEV_CERT_SIZE or buf.cert_chain_len < PLAT_CERTS_SIZE:
            buf.pdh_cert_len, buf.cert_chain_len = SEV_CERT_SIZE, PLAT_CERTS_SIZE
            return S.INVALID_LENGTH
        self._check_writable((buf.pdh_cert_address, SEV_CERT_SIZE), (buf.cert_chain_address, PLAT_CERTS_SIZE))
        self.dram.write(buf.pdh_cert_address, self._identity.pdh_cert)
        self.dram.write(buf.cert_chain_address, self._identity.plat_certs())
        buf.pdh_cert_len, buf.cert_chain_len = SEV_CERT_SIZE, PLAT_CERTS_SIZE
        return S.SUCCESS

    def _cmd_df_flush(self, buf) -> SevStatus:
        self._dirty_asids.clear()
        return S.SUCCESS

    def _cmd_get_id(self, buf) -> SevStatus:
        if buf.len < GET_ID_SIZE:
            buf.len = GET_ID_SIZE
            return S.INVALID_LENGTH
        self._check_writable((buf.address, GET_ID_SIZE))
        self.dram.write(buf.address, self.chip_id)
        buf.len = GET_ID_SIZE
        return S.SUCCESS

    # -- guest lifecycle (§1.5) ----------------------------------------------------------------------
    def _cmd_guest_status(self, buf) -> SevStatus:
        guest = self._guest(buf.handle)
        buf.policy, buf.asid, buf.state = guest.policy, guest.asid, int(guest.state)
        return S.SUCCESS

    def _cmd_activate(self, buf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_state(guest, Cmd.ACTIVATE)
        if not 0 < buf.asid <= self.max_asid:
            return S.INVALID_ASID
        if any(g.asid == buf.asid for g in self._guests.values() if g is not guest):
            return S.ASID_OWNED
        if guest.asid:
            return S.ACTIVE
        if buf.asid in self._dirty_asids:
            return S.DF_FLUSH_REQUIRED
        guest.asid = buf.asid
        self.memctl.install_key(buf.asid, guest.vek)
        return S.SUCCESS

    def _cmd_deactivate(self, buf) -> SevStatus:
        guest = self._guest(buf.handle)
        if guest.asid:
            self.memctl.remove_key(guest.asid)
            self._dirty_asids.add(guest.asid)  # its cache lines may hold the key's data until DF_FLUSH
            guest.asid = 0
        return S.SUCCESS

    def _cmd_decommission(self, buf) -> SevStatus:
        guest = self._guest(buf.handle)
        if guest.asid:
            return S.ACTIVE
        del self._guests[guest.handle]
        guest.zeroize_channel()
        if not self._guests:
            self.state = P.INIT
        return S.SUCCESS

    # -- launch (§2.8) -------------------------------------------------------------------------------
    def _cmd_launch_start(self, buf) -> SevStatus:
        tek = tik = bytes(16)
        if buf.dh_cert_address:
            if buf.session_len != SESSION_SIZE or buf.dh_cert_len != SEV_CERT_SIZE:
                return S.INVALID_LENGTH
            tek, tik = self._open_channel(buf.policy, buf.dh_cert_address, buf.session_address)
        # Without a GODH no channel is opened and the policy is not MAC-, API- or reserved-checked (§2.8).
        vek = self._start_guest(buf.handle, buf.policy)
        buf.handle = self._add_guest(buf.policy, vek, Cmd.LAUNCH_START, tek, tik).handle
        return S.SUCCESS

    def _launch_update(self, buf, cmd: Cmd) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_state(guest, cmd)
        if cmd == Cmd.LAUNCH_UPDATE_VMSA and not guest.es:
            return S.UNSUPPORTED
        self._require_active(guest)
        paddr = self._strip_cbit(buf.address)
        if cmd == Cmd.LAUNCH_UPDATE_VMSA and buf.len != VMSA_SIZE:
            return S.INVALID_LENGTH
        if buf.len == 0 or buf.len % 16:
            return S.INVALID_LENGTH
        if paddr % 16:
            return S.INVALID_ADDRESS
        plaintext = self._read(paddr, buf.len)   # written by the host with the C-bit clear
        guest.digest.update(plaintext)            # the launch digest covers plaintext, in call order
        self.memctl.write(guest.asid, paddr, plaintext)
        return S.SUCCESS

    def _cmd_launch_update_data(self, buf) -> SevStatus:
        return self._launch_update(buf, Cmd.LAUNCH_UPDATE_DATA)

    def _cmd_launch_update_vmsa(self, buf) -> SevStatus:
        return self._launch_update(buf, Cmd.LAUNCH_UPDATE_VMSA)

    def _cmd_launch_measure(self, buf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_state(guest, Cmd.LAUNCH_MEASURE)
        if buf.len < MEASURE_SIZE:
            buf.len = MEASURE_SIZE
            return S.INVALID_LENGTH
        self._check_writable((buf.address, MEASURE_SIZE))
        mnonce = self._trng(16)
        guest.measure = sess.launch_measure(guest.tik, API_MAJOR, API_MINOR, BUILD, guest.policy,
                                            guest.digest.digest(), mnonce)
        self.dram.write(buf.address, guest.measure + mnonce)
        buf.len = MEASURE_SIZE
        self._transition(guest, Cmd.LAUNCH_MEASURE)
        return S.SUCCESS

    def _cmd_launch_secret(self, buf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_state(guest, Cmd.LAUNCH_SECRET)
        self._require_active(guest)
        if (buf.hdr_len != PACKET_HEADER_SIZE or buf.guest_len != buf.trans_len or buf.guest_len == 0
                or buf.guest_len % 16 or buf.guest_len > SCRATCH_BUF_LEN):
            return S.INVALID_LENGTH
        paddr = self._strip_cbit(buf.guest_address)
        if paddr % 16:
            return S.INVALID_ADDRESS
        self._check_writable((paddr, buf.guest_len))
        plaintext = self._open_packet(guest, buf, sess.CTX_SECRET, guest.measure)
        self.memctl.write(guest.asid, paddr, plaintext)
        return S.SUCCESS

    def _cmd_launch_finish(self, buf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_state(guest, Cmd.LAUNCH_FINISH)
        guest.zeroize_channel()
        self._transition(guest, Cmd.LAUNCH_FINISH)
        return S.SUCCESS

    # -- packets (§4) --------------------------------------------------------------------------------
    def _open_packet(self, guest: _Guest, buf, ctx: int, measure: bytes = b"") -> bytes:
        """Read a transport packet, check flags and MAC (constant time) before decrypting; → plaintext."""
        header = self._read(buf.hdr_address, PACKET_HEADER_SIZE)
        ciphertext = self._read(buf.trans_address, buf.trans_len)
        flags = int.from_bytes(header[0:4], "little")
        if flags & PACKET_HEADER_COMPRESSED:
            raise _Fail(S.UNSUPPORTED)
        iv, mac = header[4:20], header[20:52]
        expected = sess.packet_mac(guest.tik, ctx, flags, iv, buf.guest_len, buf.trans_len, ciphertext, measure)
        if not hmac.compare_digest(expected, mac):
            raise _Fail(S.BAD_MEASUREMENT)
        return csev.aes128_ctr(guest.tek, iv, ciphertext)

    # -- send (§2.2–§2.4) ----------------------------------------------------------------------------
    def _cmd_send_start(self, buf) -> SevStatus:
        guest = self._guest(buf.handle)
        if buf.session_len != SESSION_SIZE:
            buf.session_len = SESSION_SIZE
            return S.INVALID_LENGTH
        self._require_state(guest, Cmd.SEND_START)
        if guest.policy & Policy.NOSEND:
            return S.POLICY_FAILURE
        if buf.pdh_cert_len != SEV_CERT_SIZE:
            return S.INVALID_LENGTH
        if guest.policy & Policy.SEV:
            if buf.plat_certs_len != PLAT_CERTS_SIZE or not ident.amd_chain_length_ok(buf.amd_certs_len):
                return S.INVALID_LENGTH
            pdh = self._read(buf.pdh_cert_address, SEV_CERT_SIZE)
            plat = self._read(buf.plat_certs_address, PLAT_CERTS_SIZE)
            amd = self._read(buf.amd_certs_address, buf.amd_certs_len)
            status = ident.validate_platform(self.root.trust_anchor, pdh, plat, amd)
            if status != S.SUCCESS:
                return status
            if ident.cert_api(plat[:SEV_CERT_SIZE]) < policy_api(guest.policy):
                return S.POLICY_FAILURE
        if guest.policy & Policy.DOMAIN:
            if buf.plat_certs_len != PLAT_CERTS_SIZE:
                return S.INVALID_LENGTH
            pdh = self._read(buf.pdh_cert_address, SEV_CERT_SIZE)
            plat = self._read(buf.plat_certs_address, PLAT_CERTS_SIZE)
            status = ident.validate_domain(pdh, plat, self._identity.oca_cert)
            if status != S.SUCCESS:
                return status
        self._check_writable((buf.session_address, SESSION_SIZE))
        target_pdh = self._read(buf.pdh_cert_address, SEV_CERT_SIZE)
        if not self._identity.pdh_usable():
            return S.INVALID_CERTIFICATE
        status = ident.pdh_sanity(target_pdh)
        if status != S.SUCCESS:
            return status
        tek, tik, nonce, wrap_iv = (self._trng(16) for _ in range(4))
        session = sess.build_session(self._identity.ecdh(target_pdh), nonce, wrap_iv, tek, tik, guest.policy)
        self.dram.write(buf.session_address, session)
        buf.policy = guest.policy
        guest.tek, guest.tik = tek, tik
        self._transition(guest, Cmd.SEND_START)
        return S.SUCCESS

    def _send_update(self, buf, cmd: Cmd) -> SevStatus:
        if buf.hdr_len < PACKET_HEADER_SIZE:  # checked before the handle (§2.3 step 1)
            buf.hdr_len = PACKET_HEADER_SIZE
            return S.INVALID_LENGTH
        guest = self._guest(buf.handle)
        self._require_state(guest, cmd)
        if cmd == Cmd.SEND_UPDATE_VMSA and not guest.es:
            return S.UNSUPPORTED
        self._require_active(guest)
        if (buf.guest_len == 0 or buf.guest_len > SCRATCH_BUF_LEN or buf.guest_len % 16
                or buf.trans_len == 0 or buf.trans_len < buf.guest_len):
            return S.INVALID_LENGTH
        paddr = self._strip_cbit(buf.guest_address)
        if paddr % 16:
            return S.INVALID_ADDRESS
        self._check_writable((paddr, buf.guest_len), (buf.trans_address, buf.guest_len),
                             (buf.hdr_address, PACKET_HEADER_SIZE))
        plaintext = self.memctl.read(guest.asid, paddr, buf.guest_len)
        iv = self._trng(16)
        ciphertext = csev.aes128_ctr(guest.tek, iv, plaintext)
        mac = sess.packet_mac(guest.tik, sess.CTX_DATA, 0, iv, buf.guest_len, buf.guest_len, ciphertext)
        self.dram.write(buf.trans_address, ciphertext)
        self.dram.write(buf.hdr_address, bytes(4) + iv + mac)
        buf.hdr_len = PACKET_HEADER_SIZE
        return S.SUCCESS

    def _cmd_send_update_data(self, buf) -> SevStatus:
        return self._send_update(buf, Cmd.SEND_UPDATE_DATA)

    def _cmd_send_update_vmsa(self, buf) -> SevStatus:
        return self._send_update(buf, Cmd.SEND_UPDATE_VMSA)

    def _end_channel(self, buf, cmd: Cmd) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_state(guest, cmd)
        guest.zeroize_channel()
        self._transition(guest, cmd)
        return S.SUCCESS

    def _cmd_send_finish(self, buf) -> SevStatus:
        return self._end_channel(buf, Cmd.SEND_FINISH)

    def _cmd_send_cancel(self, buf) -> SevStatus:
        return self._end_channel(buf, Cmd.SEND_CANCEL)

    # -- receive (§2.5–§2.7) -------------------------------------------------------------------------
    def _cmd_receive_start(self, buf) -> SevStatus:
        if buf.session_len != SESSION_SIZE or buf.pdh_cert_len != SEV_CERT_SIZE:
            return S.INVALID_LENGTH
        tek, tik = self._open_channel(buf.policy, buf.pdh_cert_address, buf.session_address)
        vek = self._start_guest(buf.handle, buf.policy)
        buf.handle = self._add_guest(buf.policy, vek, Cmd.RECEIVE_START, tek, tik).handle
        return S.SUCCESS

    def _receive_update(self, buf, cmd: Cmd) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_state(guest, cmd)
        if cmd == Cmd.RECEIVE_UPDATE_VMSA and not guest.es:
            return S.UNSUPPORTED
        self._require_active(guest)
        if (buf.trans_len == 0 or buf.trans_len > SCRATCH_BUF_LEN or buf.guest_len == 0
                or buf.guest_len != buf.trans_len or buf.guest_len % 16 or buf.hdr_len < PACKET_HEADER_SIZE):
            return S.INVALID_LENGTH
        paddr = self._strip_cbit(buf.guest_address)
        if paddr % 16:
            return S.INVALID_ADDRESS
        self._check_writable((paddr, buf.guest_len))
        plaintext = self._open_packet(guest, buf, sess.CTX_DATA)
        self.memctl.write(guest.asid, paddr, plaintext)
        return S.SUCCESS

    def _cmd_receive_update_data(self, buf) -> SevStatus:
        return self._receive_update(buf, Cmd.RECEIVE_UPDATE_DATA)

    def _cmd_receive_update_vmsa(self, buf) -> SevStatus:
        return self._receive_update(buf, Cmd.RECEIVE_UPDATE_VMSA)

    def _cmd_receive_finish(self, buf) -> SevStatus:
        return self._end_channel(buf, Cmd.RECEIVE_FINISH)

    # -- debug (§1.3 NODBG) --------------------------------------------------------------------------
    def _dbg(self, buf, encrypt: bool) -> SevStatus:
        guest = self._guest(buf.handle)
        if guest.policy & Policy.NODBG:
            return S.POLICY_FAILURE
        self._require_active(guest)
        if buf.len == 0 or buf.len % 16:
            return S.INVALID_LENGTH
        src, dst = self._strip_cbit(buf.src_addr), self._strip_cbit(buf.dst_addr)
        if src % 16 or dst % 16:
            return S.INVALID_ADDRESS
        self._check_writable((src, buf.len), (dst, buf.len))
        if encrypt:
            self.memctl.write(guest.asid, dst, self.dram.read(src, buf.len))
        else:
            self.dram.write(dst, self.memctl.read(guest.asid, src, buf.len))
        return S.SUCCESS

    def _cmd_dbg_decrypt(self, buf) -> SevStatus:
        return self._dbg(buf, encrypt=False)

    def _cmd_dbg_encrypt(self, buf) -> SevStatus:
        return self._dbg(buf, encrypt=True)

    # -- batch forms: many whole pages per call through the csev pipelines ---------------------------
    # Not PSP commands: pysev's batched equivalents of issuing the command once per 4 KiB page
    # (GUEST_LEN = TRANS_LEN = 4096). Same checks, same statuses, and byte-identical output for the
    # same TRNG stream: the IVs are drawn in page order exactly as the per-page commands draw them.
    def _batch_guest(self, handle: int, cmd: Cmd, frames: np.ndarray) -> _Guest:
        if self.state not in COMMANDS[cmd].platform:
            raise _Fail(S.INVALID_PLATFORM_STATE)
        guest = self._guest(handle)
        self._require_state(guest, cmd)
        self._require_active(guest)
        if frames.size and int(frames.max()) >= self.dram.n_frames:
            raise _Fail(S.INVALID_ADDRESS)
        return guest

    def send_update_data_batch(self, handle: int, frames: np.ndarray, headers: np.ndarray,
                               trans: np.ndarray, *, threads: int | None = None,
                               on_slice: Callable[[int, int], None] | None = None) -> SevStatus:
        """SEND_UPDATE_DATA for whole pages: ``frames`` are host frame numbers of guest pages.

        With ``on_slice``, ``headers``/``trans`` are a ring of ``n`` rows that the hypervisor drains: the
        packets are produced ``n`` at a time into rows ``[0, stop - start)``, and ``on_slice(start, stop)``
        consumes them before the next slice reuses the rows, as QEMU writes each packet to the stream
        right after its SEND_UPDATE_DATA (qemu-migration.md §1.4 step 4). The ring is written with
        ordinary stores: its consumer (a socket send) then copies it from cache, not from DRAM.
        An exception from ``on_slice`` ends the batch there.
        """
        frames = np.ascontiguousarray(frames, dtype=np.uint64)
        with self._lock:
            try:
                guest = self._batch_guest(handle, Cmd.SEND_UPDATE_DATA, frames)
            except _Fail as fail:
                return fail.status
            ivs = np.frombuffer(self._trng(16 * frames.size), dtype=np.uint8).reshape(-1, 16)
            keys = guest.vek, guest.tek, guest.tik
        # The pipeline runs outside the command lock: it reads only the keys captured above and the
        # guest's pages, so page channels can encrypt concurrently (a later SEND_FINISH/CANCEL cannot
        # change what this batch produces).
        csev.send_pages(*keys, self.dram.frames, frames.astype(np.int64), frames << np.uint64(PAGE_SHIFT),
                        headers, trans, ivs, threads=threads, nontemporal=on_slice is None, on_slice=on_slice)
        return S.SUCCESS

    def receive_update_data_batch(self, handle: int, frames: np.ndarray, headers: np.ndarray,
                                  trans: np.ndarray, *, threads: int | None = None
                                  ) -> tuple[SevStatus, np.ndarray]:
        """RECEIVE_UPDATE_DATA for whole pages; returns (command status, per-packet statuses).

        A packet that fails its MAC (BAD_MEASUREMENT) or carries the COMPRESSED flag (UNSUPPORTED)
        writes nothing; the others in the batch are applied. The caller decides what a failure means.
        """
        frames = np.ascontiguousarray(frames, dtype=np.uint64)
        with self._lock:
            try:
                guest = self._batch_guest(handle, Cmd.RECEIVE_UPDATE_DATA, frames)
            except _Fail as fail:
                return fail.status, np.full(frames.size, fail.status, dtype=np.uint32)
            keys = guest.vek, guest.tek, guest.tik
        statuses = csev.receive_pages(*keys, headers, trans, self.dram.frames, frames.astype(np.int64),
                                      frames << np.uint64(PAGE_SHIFT), threads=threads)
        return S.SUCCESS, statuses

    def dbg_decrypt_batch(self, handle: int, frames: np.ndarray, out: np.ndarray) -> SevStatus:
        """DBG_DECRYPT of whole pages into ``out`` (refused with POLICY_FAILURE under NODBG)."""
        frames = np.ascontiguousarray(frames, dtype=np.uint64)
        with self._lock:
            try:
                if self.state not in COMMANDS[Cmd.DBG_DECRYPT].platform:
                    raise _Fail(S.INVALID_PLATFORM_STATE)
                guest = self._guest(handle)
                if guest.policy & Policy.NODBG:
                    raise _Fail(S.POLICY_FAILURE)
                self._require_active(guest)
                if frames.size and int(frames.max()) >= self.dram.n_frames:
                    raise _Fail(S.INVALID_ADDRESS)
            except _Fail as fail:
                return fail.status
            csev.xts_decrypt(guest.vek, self.dram.frames, out, frames << np.uint64(PAGE_SHIFT),
                             src_index=frames.astype(np.int64))
            return S.SUCCESS

    # -- what the host may learn (no secrets) --------------------------------------------------------
    def public_certs(self) -> dict[str, bytes]:
        """The certificates a host publishes for this platform (query-sev-capabilities)."""
        return {
            "pdh": self._identity.pdh_cert,
            "cert_chain": self._identity.plat_certs(signed_cek=True),
            "amd_cert_chain": self.root.amd_chain(),
        }

    @property
    def guest_handles(self) -> list[int]:
        return sorted(self._guests)

    @property
    def page_size(self) -> int:
        return PAGE_SIZE
