"""The SEV firmware of one simulated host: the state table, and the platform, guest-management, launch
and debug commands. The SEND_* and RECEIVE_* commands are in ``transport.py``, which ``Platform``
derives from.

One ``Platform`` per simulated host; nothing is global, so any number coexist in one process.
Commands enter through the one choke point, ``Platform.issue(cmd, buf)`` (``pysev.firmware.mailbox``):
the platform-state gate comes from ``COMMANDS`` (AMD ``sev_plat.c`` ``state_tbl_sev``), then the
command's handler runs its checks **in the firmware's order** (AMD ``sev_mcmd.c``, one
``sev_mcmd_<command>`` function per handler here) and returns the firmware status; guest-state
transitions come from the same table (AMD ``sev_guest.c`` ``state_tbl_sev``) and are committed only
when the handler succeeds. A refused command changes nothing: handlers validate everything (lengths,
addresses, MACs) before the first write.

Secrets (VEK, TEK, TIK, private keys) live in ``GuestContext``/``Identity`` objects reachable only
through underscore attributes; no repr, log line or status message carries them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pysev.firmware import amdroot
from pysev.firmware.mailbox import CommandSpec
from pysev.firmware.sev import identity, session
from pysev.firmware.sev.abi import (
    API_MAJOR,
    API_MINOR,
    BUFFERS,
    BUILD,
    GET_ID_SIZE,
    INIT_FLAGS_SEV_ES,
    MEASURE_SIZE,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    PLAT_CERTS_SIZE,
    SCRATCH_BUF_LEN,
    SESSION_SIZE,
    SEV_CERT_SIZE,
    VMSA_SIZE,
    ActivateBuf,
    Cmd,
    DbgBuf,
    GetIdBuf,
    GuestState,
    GuestStatusBuf,
    HandleBuf,
    InitBuf,
    LaunchMeasureBuf,
    LaunchStartBuf,
    LaunchUpdateBuf,
    PdhCertExportBuf,
    PekCertImportBuf,
    PekCsrBuf,
    PlatformState,
    PlatformStatusBuf,
    Policy,
    TransportBuf,
)
from pysev.firmware.sev.transport import TransportCommands
from pysev.firmware.status import SevStatus
from pysev.hw.hostmem import HostMemory
from pysev.hw.memctl import MemoryController

MAX_ASID = 15  # SEV ASIDs of this simulated part (1..MAX_ASID)

_ANY_PLATFORM = frozenset(PlatformState)
_INIT_OR_WORKING = frozenset({PlatformState.INIT, PlatformState.WORKING})
_WORKING = frozenset({PlatformState.WORKING})
_ALL_LIVE = frozenset(set(GuestState) - {GuestState.UNINIT})

COMMANDS: dict[Cmd, CommandSpec] = {
    Cmd.INIT: CommandSpec(frozenset({PlatformState.UNINIT})),
    Cmd.SHUTDOWN: CommandSpec(_ANY_PLATFORM),
    Cmd.PLATFORM_RESET: CommandSpec(frozenset({PlatformState.UNINIT})),
    Cmd.PLATFORM_STATUS: CommandSpec(_ANY_PLATFORM),
    Cmd.PEK_GEN: CommandSpec(frozenset({PlatformState.INIT})),
    Cmd.PEK_CSR: CommandSpec(_INIT_OR_WORKING),
    Cmd.PEK_CERT_IMPORT: CommandSpec(frozenset({PlatformState.INIT})),
    Cmd.PDH_GEN: CommandSpec(_INIT_OR_WORKING),
    Cmd.PDH_CERT_EXPORT: CommandSpec(_INIT_OR_WORKING),
    Cmd.DF_FLUSH: CommandSpec(_INIT_OR_WORKING),
    Cmd.GET_ID: CommandSpec(_ANY_PLATFORM),
    Cmd.GUEST_STATUS: CommandSpec(_INIT_OR_WORKING),
    Cmd.DECOMMISSION: CommandSpec(_WORKING, _ALL_LIVE, GuestState.UNINIT),
    Cmd.ACTIVATE: CommandSpec(_WORKING, _ALL_LIVE - {GuestState.SENT}),
    Cmd.DEACTIVATE: CommandSpec(_WORKING),
    Cmd.LAUNCH_START: CommandSpec(_INIT_OR_WORKING, frozenset({GuestState.UNINIT}), GuestState.LUPDATE),
    Cmd.LAUNCH_UPDATE_DATA: CommandSpec(_WORKING, frozenset({GuestState.LUPDATE})),
    Cmd.LAUNCH_UPDATE_VMSA: CommandSpec(_WORKING, frozenset({GuestState.LUPDATE})),
    Cmd.LAUNCH_MEASURE: CommandSpec(_WORKING, frozenset({GuestState.LUPDATE}), GuestState.LSECRET),
    Cmd.LAUNCH_SECRET: CommandSpec(_WORKING, frozenset({GuestState.LSECRET})),
    Cmd.LAUNCH_FINISH: CommandSpec(_WORKING, frozenset({GuestState.LSECRET}), GuestState.RUNNING),
    Cmd.SEND_START: CommandSpec(_WORKING, frozenset({GuestState.RUNNING}), GuestState.SUPDATE),
    Cmd.SEND_UPDATE_DATA: CommandSpec(_WORKING, frozenset({GuestState.SUPDATE})),
    Cmd.SEND_UPDATE_VMSA: CommandSpec(_WORKING, frozenset({GuestState.SUPDATE})),
    Cmd.SEND_FINISH: CommandSpec(_WORKING, frozenset({GuestState.SUPDATE}), GuestState.SENT),
    Cmd.SEND_CANCEL: CommandSpec(_WORKING, frozenset({GuestState.SUPDATE}), GuestState.RUNNING),
    Cmd.RECEIVE_START: CommandSpec(_INIT_OR_WORKING, frozenset({GuestState.UNINIT}), GuestState.RUPDATE),
    Cmd.RECEIVE_UPDATE_DATA: CommandSpec(_WORKING, frozenset({GuestState.RUPDATE})),
    Cmd.RECEIVE_UPDATE_VMSA: CommandSpec(_WORKING, frozenset({GuestState.RUPDATE})),
    Cmd.RECEIVE_FINISH: CommandSpec(_WORKING, frozenset({GuestState.RUPDATE}), GuestState.RUNNING),
    Cmd.DBG_DECRYPT: CommandSpec(_WORKING),
    Cmd.DBG_ENCRYPT: CommandSpec(_WORKING),
}


class Platform(TransportCommands):
    """The SEV firmware and memory controller of one simulated host.

    ``dram`` is the host's physical memory (command buffers, certificates and guest RAM all live there,
    addressed by host physical address). ``root`` is the simulated AMD root that manufactured this chip
    and that its SEND_START trusts (default: the machine-wide root, ``pysev.firmware.amdroot.default_root``).
    ``trng`` is the firmware's random source (injectable so tests can replay identical output). It must
    behave as a byte stream: the batch forms draw all their IVs in one ``trng(16·k)`` call where the
    per-page commands make k calls of ``trng(16)``; a stream gives both the same bytes.
    """

    command_ids = Cmd
    state_table = COMMANDS
    buffers = BUFFERS
    statuses = SevStatus

    def __init__(
        self,
        dram: HostMemory,
        *,
        root: amdroot.SimulatedRoot | None = None,
        chip_id: bytes | None = None,
        trng: Callable[[int], bytes] = os.urandom,
        max_asid: int = MAX_ASID,
    ) -> None:
        super().__init__(dram, PlatformState.UNINIT)
        self.memctl = MemoryController(dram)
        self.root = root if root is not None else amdroot.default_root()
        self.chip_id = chip_id if chip_id is not None else trng(GET_ID_SIZE)
        self.max_asid = max_asid
        self._trng = trng
        self._identity = identity.Identity(self.root, self.chip_id)
        self.es_enabled = False
        self._next_handle = 1
        self._dirty_asids: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"Platform(chip_id={self.chip_id[:8].hex()}…, state={self.state.name}, "
            f"guests={len(self._guests)}, owner={'external' if self._identity.owned else 'self'})"
        )

    # -- platform commands (AMD sev_mcmd.c sev_mcmd_init … sev_mcmd_get_id) ------------------------------
    def _cmd_init(self, buf: InitBuf) -> SevStatus:
        self.es_enabled = bool(buf.flags & INIT_FLAGS_SEV_ES)
        self._identity.ensure()
        self.state = PlatformState.INIT
        return SevStatus.SUCCESS

    def _cmd_shutdown(self, buf: None) -> SevStatus:
        for guest in self._guests.values():
            if guest.asid:
                self.memctl.remove_key(guest.asid)
        self._guests.clear()
        self._dirty_asids.clear()
        self.state = PlatformState.UNINIT
        self.es_enabled = False
        return SevStatus.SUCCESS

    def _cmd_platform_reset(self, buf: None) -> SevStatus:
        self._identity.wipe()
        return SevStatus.SUCCESS

    def _cmd_platform_status(self, buf: PlatformStatusBuf) -> SevStatus:
        up = self.state != PlatformState.UNINIT
        buf.api_major, buf.api_minor, buf.build = API_MAJOR, API_MINOR, BUILD
        buf.state = int(self.state)
        buf.owner = int(up and self._identity.owned)
        buf.config = int(up and self.es_enabled)
        buf.guest_count = len(self._guests) if up else 0
        return SevStatus.SUCCESS

    def _cmd_pek_gen(self, buf: None) -> SevStatus:
        self._identity.pek_gen()
        return SevStatus.SUCCESS

    def _cmd_pek_csr(self, buf: PekCsrBuf) -> SevStatus:
        if buf.len < SEV_CERT_SIZE:
            buf.len = SEV_CERT_SIZE
            return SevStatus.INVALID_LENGTH
        self._check_writable((buf.address, SEV_CERT_SIZE))
        self.dram.write(buf.address, self._identity.pek_csr())
        buf.len = SEV_CERT_SIZE
        return SevStatus.SUCCESS

    def _cmd_pek_cert_import(self, buf: PekCertImportBuf) -> SevStatus:
        if self._identity.owned:
            return SevStatus.ALREADY_OWNED
        if buf.pek_cert_len != SEV_CERT_SIZE or buf.oca_cert_len != SEV_CERT_SIZE:
            return SevStatus.INVALID_LENGTH
        pek = self._read(buf.pek_cert_address, SEV_CERT_SIZE)
        oca = self._read(buf.oca_cert_address, SEV_CERT_SIZE)
        return self._identity.pek_cert_import(pek, oca)

    def _cmd_pdh_gen(self, buf: None) -> SevStatus:
        self._identity.pdh_gen()
        return SevStatus.SUCCESS

    def _cmd_pdh_cert_export(self, buf: PdhCertExportBuf) -> SevStatus:
        if buf.pdh_cert_len < SEV_CERT_SIZE or buf.cert_chain_len < PLAT_CERTS_SIZE:
            buf.pdh_cert_len, buf.cert_chain_len = SEV_CERT_SIZE, PLAT_CERTS_SIZE
            return SevStatus.INVALID_LENGTH
        self._check_writable((buf.pdh_cert_address, SEV_CERT_SIZE), (buf.cert_chain_address, PLAT_CERTS_SIZE))
        self.dram.write(buf.pdh_cert_address, self._identity.pdh_cert)
        self.dram.write(buf.cert_chain_address, self._identity.plat_certs())
        buf.pdh_cert_len, buf.cert_chain_len = SEV_CERT_SIZE, PLAT_CERTS_SIZE
        return SevStatus.SUCCESS

    def _cmd_df_flush(self, buf: None) -> SevStatus:
        self._dirty_asids.clear()
        return SevStatus.SUCCESS

    def _cmd_get_id(self, buf: GetIdBuf) -> SevStatus:
        if buf.len < GET_ID_SIZE:
            buf.len = GET_ID_SIZE
            return SevStatus.INVALID_LENGTH
        self._check_writable((buf.address, GET_ID_SIZE))
        self.dram.write(buf.address, self.chip_id)
        buf.len = GET_ID_SIZE
        return SevStatus.SUCCESS

    # -- guest management (AMD sev_mcmd.c sev_mcmd_guest_status, mcmd_activate_common, …) -------------
    def _cmd_guest_status(self, buf: GuestStatusBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        buf.policy, buf.asid, buf.state = guest.policy, guest.asid, int(guest.state)
        return SevStatus.SUCCESS

    def _cmd_activate(self, buf: ActivateBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, Cmd.ACTIVATE)
        if not 0 < buf.asid <= self.max_asid:
            return SevStatus.INVALID_ASID
        if any(g.asid == buf.asid for g in self._guests.values() if g is not guest):
            return SevStatus.ASID_OWNED
        if guest.asid:
            return SevStatus.ACTIVE
        if buf.asid in self._dirty_asids:
            return SevStatus.DF_FLUSH_REQUIRED
        guest.asid = buf.asid
        self.memctl.install_key(buf.asid, guest.vek)
        return SevStatus.SUCCESS

    def _cmd_deactivate(self, buf: HandleBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        if guest.asid:
            self.memctl.remove_key(guest.asid)
            self._dirty_asids.add(guest.asid)  # its cache lines may hold the key's data until DF_FLUSH
            guest.asid = 0
        return SevStatus.SUCCESS

    def _cmd_decommission(self, buf: HandleBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        if guest.asid:
            return SevStatus.ACTIVE
        del self._guests[guest.handle]
        guest.zeroize_channel()
        if not self._guests:
            self.state = PlatformState.INIT
        return SevStatus.SUCCESS

    # -- launch (AMD sev_mcmd.c sev_mcmd_launch_start … sev_mcmd_launch_finish) --------------------------
    def _cmd_launch_start(self, buf: LaunchStartBuf) -> SevStatus:
        tek = tik = bytes(16)
        if buf.dh_cert_address:
            if buf.session_len != SESSION_SIZE or buf.dh_cert_len != SEV_CERT_SIZE:
                return SevStatus.INVALID_LENGTH
            tek, tik = self._open_channel(buf.policy, buf.dh_cert_address, buf.session_address)
        # Without a GODH no channel is opened and the policy is not MAC-, API- or reserved-checked.
        vek = self._start_guest(buf.handle, buf.policy)
        buf.handle = self._add_guest(buf.policy, vek, Cmd.LAUNCH_START, tek, tik).handle
        return SevStatus.SUCCESS

    def _launch_update(self, buf: LaunchUpdateBuf, cmd: Cmd) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, cmd)
        if cmd == Cmd.LAUNCH_UPDATE_VMSA and not guest.es:
            return SevStatus.UNSUPPORTED
        self._require_active(guest)
        paddr = self._strip_cbit(buf.address)
        if cmd == Cmd.LAUNCH_UPDATE_VMSA and buf.len != VMSA_SIZE:
            return SevStatus.INVALID_LENGTH
        if buf.len == 0 or buf.len % 16:
            return SevStatus.INVALID_LENGTH
        if paddr % 16:
            return SevStatus.INVALID_ADDRESS
        plaintext = self._read(paddr, buf.len)  # written by the host with the C-bit clear
        guest.digest.update(plaintext)  # the launch digest covers plaintext, in call order
        self.memctl.write(guest.asid, paddr, plaintext)
        return SevStatus.SUCCESS

    def _cmd_launch_update_data(self, buf: LaunchUpdateBuf) -> SevStatus:
        return self._launch_update(buf, Cmd.LAUNCH_UPDATE_DATA)

    def _cmd_launch_update_vmsa(self, buf: LaunchUpdateBuf) -> SevStatus:
        return self._launch_update(buf, Cmd.LAUNCH_UPDATE_VMSA)

    def _cmd_launch_measure(self, buf: LaunchMeasureBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, Cmd.LAUNCH_MEASURE)
        if buf.len < MEASURE_SIZE:
            buf.len = MEASURE_SIZE
            return SevStatus.INVALID_LENGTH
        self._check_writable((buf.address, MEASURE_SIZE))
        mnonce = self._trng(16)
        guest.measure = session.launch_measure(
            guest.tik, API_MAJOR, API_MINOR, BUILD, guest.policy, guest.digest.digest(), mnonce
        )
        self.dram.write(buf.address, guest.measure + mnonce)
        buf.len = MEASURE_SIZE
        self._transition(guest, Cmd.LAUNCH_MEASURE)
        return SevStatus.SUCCESS

    def _cmd_launch_secret(self, buf: TransportBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, Cmd.LAUNCH_SECRET)
        self._require_active(guest)
        if (
            buf.hdr_len != PACKET_HEADER_SIZE
            or buf.guest_len != buf.trans_len
            or buf.guest_len == 0
            or buf.guest_len % 16
            or buf.guest_len > SCRATCH_BUF_LEN
        ):
            return SevStatus.INVALID_LENGTH
        paddr = self._strip_cbit(buf.guest_address)
        if paddr % 16:
            return SevStatus.INVALID_ADDRESS
        self._check_writable((paddr, buf.guest_len))
        plaintext = self._open_packet(guest, buf, session.CTX_SECRET, guest.measure)
        self.memctl.write(guest.asid, paddr, plaintext)
        return SevStatus.SUCCESS

    def _cmd_launch_finish(self, buf: HandleBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, Cmd.LAUNCH_FINISH)
        guest.zeroize_channel()
        self._transition(guest, Cmd.LAUNCH_FINISH)
        return SevStatus.SUCCESS

    # -- debug (AMD sev_mcmd.c sev_mcmd_dbg_decrypt, sev_mcmd_dbg_encrypt; policy bit NODBG) -----------
    def _dbg(self, buf: DbgBuf, encrypt: bool) -> SevStatus:
        guest = self._guest(buf.handle)
        if guest.policy & Policy.NODBG:
            return SevStatus.POLICY_FAILURE
        self._require_active(guest)
        if buf.len == 0 or buf.len % 16:
            return SevStatus.INVALID_LENGTH
        src, dst = self._strip_cbit(buf.src_addr), self._strip_cbit(buf.dst_addr)
        if src % 16 or dst % 16:
            return SevStatus.INVALID_ADDRESS
        self._check_writable((src, buf.len), (dst, buf.len))
        if encrypt:
            self.memctl.write(guest.asid, dst, self.dram.read(src, buf.len))
        else:
            self.dram.write(dst, self.memctl.read(guest.asid, src, buf.len))
        return SevStatus.SUCCESS

    def _cmd_dbg_decrypt(self, buf: DbgBuf) -> SevStatus:
        return self._dbg(buf, encrypt=False)

    def _cmd_dbg_encrypt(self, buf: DbgBuf) -> SevStatus:
        return self._dbg(buf, encrypt=True)

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
