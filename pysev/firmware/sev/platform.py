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
from pysev.firmware.mailbox import CommandSpec, WriteBack
from pysev.firmware.sev import identity, session
from pysev.firmware.sev.abi import (
    BUFFERS,
    FW_0_24,
    GET_ID_SIZE,
    INIT_FLAGS_SEV_ES,
    MAX_ASID,
    MEASURE_SIZE,
    MIN_SEV_ASID,
    PACKET_FLAG_COMPRESSED,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    PLAT_CERTS_SIZE,
    SCRATCH_BUF_LEN,
    SESSION_SIZE,
    SEV_CERT_SIZE,
    SEV_ES_TMR_SIZE,
    VMSA_SIZE,
    ActivateBuf,
    Cmd,
    DbgBuf,
    FirmwareVersion,
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
from pysev.firmware.sev.guest import GuestContext
from pysev.firmware.sev.transport import TransportCommands
from pysev.firmware.status import SevStatus
from pysev.hw.hostmem import HostMemory
from pysev.hw.memctl import MemoryController

_ANY_PLATFORM = frozenset(PlatformState)
_INIT_OR_WORKING = frozenset({PlatformState.INIT, PlatformState.WORKING})
_WORKING = frozenset({PlatformState.WORKING})
_ALL_LIVE = frozenset(set(GuestState) - {GuestState.UNINIT})
_OUT = WriteBack.ON_SUCCESS
_QUERY = WriteBack.ON_SUCCESS_OR_LENGTH

# Platform states each command runs in (each AMD sev_mcmd_<command> checks its own; DF_FLUSH, GET_ID,
# PLATFORM_STATUS and SHUTDOWN check none), guest states and transitions (AMD sev_guest.c state_tbl_sev;
# DECOMMISSION, DEACTIVATE, GUEST_STATUS and the DBG commands check no guest state, ACTIVATE refuses only
# SENT), and the mailbox's write-back (AMD sev_dispatch.c master_handler_table).
COMMANDS: dict[Cmd, CommandSpec] = {
    Cmd.INIT: CommandSpec(frozenset({PlatformState.UNINIT})),
    Cmd.SHUTDOWN: CommandSpec(_ANY_PLATFORM),
    Cmd.PLATFORM_RESET: CommandSpec(frozenset({PlatformState.UNINIT})),
    Cmd.PLATFORM_STATUS: CommandSpec(_ANY_PLATFORM, write_back=WriteBack.OUTPUT_ONLY),
    Cmd.PEK_GEN: CommandSpec(frozenset({PlatformState.INIT})),
    Cmd.PEK_CSR: CommandSpec(_INIT_OR_WORKING, write_back=_QUERY),
    Cmd.PEK_CERT_IMPORT: CommandSpec(frozenset({PlatformState.INIT})),
    Cmd.PDH_GEN: CommandSpec(_INIT_OR_WORKING),
    Cmd.PDH_CERT_EXPORT: CommandSpec(_INIT_OR_WORKING, write_back=_QUERY),
    Cmd.DF_FLUSH: CommandSpec(_ANY_PLATFORM),
    Cmd.GET_ID: CommandSpec(_ANY_PLATFORM, write_back=_QUERY),
    Cmd.GUEST_STATUS: CommandSpec(_INIT_OR_WORKING, write_back=_OUT),
    Cmd.DECOMMISSION: CommandSpec(_WORKING, _ALL_LIVE, GuestState.UNINIT),
    Cmd.ACTIVATE: CommandSpec(_WORKING, _ALL_LIVE - {GuestState.SENT}),
    Cmd.DEACTIVATE: CommandSpec(_WORKING),
    Cmd.LAUNCH_START: CommandSpec(
        _INIT_OR_WORKING, frozenset({GuestState.UNINIT}), GuestState.LUPDATE, write_back=_OUT
    ),
    Cmd.LAUNCH_UPDATE_DATA: CommandSpec(_WORKING, frozenset({GuestState.LUPDATE})),
    # LEN == 4096 is checked before anything, the platform state included (sev_mcmd_launch_update_vmsa).
    Cmd.LAUNCH_UPDATE_VMSA: CommandSpec(_WORKING, frozenset({GuestState.LUPDATE}), platform_gate=False),
    Cmd.LAUNCH_MEASURE: CommandSpec(_WORKING, frozenset({GuestState.LUPDATE}), GuestState.LSECRET, write_back=_QUERY),
    Cmd.LAUNCH_SECRET: CommandSpec(_WORKING, frozenset({GuestState.LSECRET})),
    Cmd.LAUNCH_FINISH: CommandSpec(_WORKING, frozenset({GuestState.LSECRET}), GuestState.RUNNING),
    Cmd.SEND_START: CommandSpec(_WORKING, frozenset({GuestState.RUNNING}), GuestState.SUPDATE, write_back=_QUERY),
    Cmd.SEND_UPDATE_DATA: CommandSpec(_WORKING, frozenset({GuestState.SUPDATE}), write_back=_QUERY),
    Cmd.SEND_UPDATE_VMSA: CommandSpec(_WORKING, frozenset({GuestState.SUPDATE}), write_back=_QUERY),
    Cmd.SEND_FINISH: CommandSpec(_WORKING, frozenset({GuestState.SUPDATE}), GuestState.SENT),
    Cmd.SEND_CANCEL: CommandSpec(_WORKING, frozenset({GuestState.SUPDATE}), GuestState.RUNNING),
    Cmd.RECEIVE_START: CommandSpec(
        _INIT_OR_WORKING, frozenset({GuestState.UNINIT}), GuestState.RUPDATE, write_back=_OUT
    ),
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
        min_sev_asid: int = MIN_SEV_ASID,
        firmware: FirmwareVersion = FW_0_24,
        allow_es_without_tmr: bool = True,
    ) -> None:
        super().__init__(dram, PlatformState.UNINIT)
        if not 1 <= min_sev_asid <= max_asid + 1:
            raise ValueError(f"min_sev_asid {min_sev_asid} outside 1..max_asid+1 ({max_asid + 1})")
        self.memctl = MemoryController(dram)
        self.root = root if root is not None else amdroot.default_root()
        self.chip_id = chip_id if chip_id is not None else trng(GET_ID_SIZE)
        self.max_asid = max_asid
        self.min_sev_asid = min_sev_asid
        self.firmware = firmware
        self.allow_es_without_tmr = allow_es_without_tmr
        self._trng = trng
        self._identity = identity.Identity(self.root, self.chip_id, firmware.api)
        self.config_flags = 0
        self.tmr: tuple[int, int] | None = None
        # Firmware ASID bookkeeping, one CCX (AMD sev_plat.h gpDram->perm.asid_dirty/_allocated/_in_use;
        # an ASID in none of them is clean) and the cores' WBINVD_DONE flags (is_wbinvd_done).
        self._asid_dirty: set[int] = set()
        self._asid_allocated: set[int] = set()
        self._asid_in_use: set[int] = set()
        self._wbinvd_done = False

    def __repr__(self) -> str:
        return (
            f"Platform(chip_id={self.chip_id[:8].hex()}…, state={self.state.name}, "
            f"guests={len(self._guests)}, owner={'external' if self._identity.owned else 'self'})"
        )

    @property
    def es_enabled(self) -> bool:
        return bool(self.config_flags & INIT_FLAGS_SEV_ES)

    # -- the host's side of the cache rule (x86, not PSP commands) -------------------------------------
    def wbinvd_on_all_cpus(self) -> None:
        """Every core executes WBINVD, setting its WBINVD_DONE flag, which DF_FLUSH requires (Linux
        ``arch/x86/lib/cache-smp.c`` ``wbinvd_on_all_cpus``, issued by ``sev.c`` ``sev_flush_asids``)."""
        with self._lock:
            self._wbinvd_done = True

    # -- platform commands (AMD sev_mcmd.c sev_mcmd_init … sev_mcmd_get_id) ------------------------------
    def _cmd_init(self, buf: InitBuf) -> SevStatus:
        """sev_mcmd_init_common: buffer (flags ⊆ ES, reserved zero) → INVALID_CONFIG; with ES the TMR
        (sev_es.c sev_es_reserve_trusted_region): 1 MiB-aligned → INVALID_ADDRESS, exactly 1 MiB →
        INVALID_LENGTH, in DRAM → INVALID_ADDRESS."""
        if buf.flags & ~INIT_FLAGS_SEV_ES or buf.mbz or buf.mbz2:
            return SevStatus.INVALID_CONFIG
        tmr = None
        if buf.flags & INIT_FLAGS_SEV_ES and not (
            self.allow_es_without_tmr and buf.tmr_address == 0 and buf.tmr_len == 0
        ):
            base = self._strip_cbit(buf.tmr_address)
            if base % SEV_ES_TMR_SIZE:
                return SevStatus.INVALID_ADDRESS
            if buf.tmr_len != SEV_ES_TMR_SIZE:
                return SevStatus.INVALID_LENGTH
            self._check_writable((base, SEV_ES_TMR_SIZE))
            tmr = (base, SEV_ES_TMR_SIZE)
        self._identity.ensure()
        # Every ASID dirty, every core's WBINVD_DONE clear: a WBINVD and DF_FLUSH before the first ACTIVATE.
        self._asid_dirty = set(range(1, self.max_asid + 1))
        self._asid_allocated.clear()
        self._asid_in_use.clear()
        self._wbinvd_done = False
        self.tmr = tmr
        self.config_flags = buf.flags
        self.state = PlatformState.INIT
        return SevStatus.SUCCESS

    def _cmd_shutdown(self, buf: None) -> SevStatus:
        for guest in self._guests.values():
            if guest.asid:
                self.memctl.remove_key(guest.asid)
        self._guests.clear()
        self._asid_dirty.clear()
        self._asid_allocated.clear()
        self._asid_in_use.clear()
        self.state = PlatformState.UNINIT
        self.config_flags = 0
        self.tmr = None
        return SevStatus.SUCCESS

    def _cmd_platform_reset(self, buf: None) -> SevStatus:
        self._identity.wipe()
        return SevStatus.SUCCESS

    def _cmd_platform_status(self, buf: PlatformStatusBuf) -> SevStatus:
        up = self.state != PlatformState.UNINIT
        buf.api_major, buf.api_minor, buf.build = self.firmware.api_major, self.firmware.api_minor, self.firmware.build
        buf.state = int(self.state)
        buf.owner = int(up and self._identity.owned)
        buf.config = self.config_flags if up else 0
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
        """mcmd_df_flush_common: no platform-state check; dirty ASIDs turn clean only once every core has
        done WBINVD since INIT or since the DEACTIVATE of a guest that ran, else WBINVD_REQUIRED."""
        if not self._wbinvd_done:
            return SevStatus.WBINVD_REQUIRED
        self._asid_dirty.clear()
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
        guest = self._guests.get(buf.handle)
        if guest is None:  # not an error: the state of a free slot is INVALID (0)
            buf.state = int(GuestState.UNINIT)
            return SevStatus.SUCCESS
        buf.policy, buf.asid, buf.state = guest.policy, guest.asid, int(guest.state)
        return SevStatus.SUCCESS

    def _cmd_activate(self, buf: ActivateBuf) -> SevStatus:
        """mcmd_activate_common, activate_common, sev_guest.c sev_guest_activate: INVALID_ASID, ASID_OWNED
        (held by any guest, this one included), ACTIVE, SENT, DF_FLUSH_REQUIRED, then the ES/SEV range."""
        guest = self._guest(buf.handle)
        if not 0 < buf.asid <= self.max_asid:
            return SevStatus.INVALID_ASID
        if buf.asid in self._asid_in_use or buf.asid in self._asid_allocated:
            return SevStatus.ASID_OWNED
        if guest.asid:
            return SevStatus.ACTIVE
        self._require_guest_state(guest, Cmd.ACTIVATE)
        if buf.asid in self._asid_dirty:
            return SevStatus.DF_FLUSH_REQUIRED
        es_range = range(1, self.min_sev_asid)
        if (buf.asid in es_range) != guest.es:  # sev_es.c sev_es_validate_asid
            return SevStatus.INVALID_ASID
        guest.asid = buf.asid
        self.memctl.install_key(buf.asid, guest.vek)
        if guest.state in (GuestState.RUNNING, GuestState.SUPDATE):
            self._asid_in_use.add(buf.asid)
        else:  # pending until LAUNCH_FINISH/RECEIVE_FINISH
            self._asid_allocated.add(buf.asid)
        return SevStatus.SUCCESS

    def _finish_pending_activate(self, guest: GuestContext) -> None:
        """LAUNCH_FINISH/RECEIVE_FINISH of a pending guest: its ASID goes from allocated to in use."""
        if guest.asid in self._asid_allocated:
            self._asid_allocated.discard(guest.asid)
            self._asid_in_use.add(guest.asid)

    def _cmd_deactivate(self, buf: HandleBuf) -> SevStatus:
        """sev_mcmd_deactivate: INACTIVE if no ASID; an ASID that ran turns dirty (and the cores' WBINVD_DONE
        clear), one that never ran (pending) turns clean."""
        guest = self._guest(buf.handle)
        if not guest.asid:
            return SevStatus.INACTIVE
        asid = guest.asid
        self.memctl.remove_key(asid)
        if asid in self._asid_in_use:
            self._asid_in_use.discard(asid)
            self._asid_dirty.add(asid)
            self._wbinvd_done = False
        self._asid_allocated.discard(asid)
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
            if buf.session_len != SESSION_SIZE:
                return SevStatus.INVALID_LENGTH
            blob = self._read(buf.session_address, SESSION_SIZE)
            if buf.dh_cert_len != SEV_CERT_SIZE:
                return SevStatus.INVALID_LENGTH
            godh = self._read(buf.dh_cert_address, SEV_CERT_SIZE)
            tek, tik = self._open_channel(buf.policy, godh, blob)
        # Without a GODH no channel is opened and the policy is not MAC-, API- or reserved-checked.
        vek = self._start_guest(buf.handle, buf.policy)
        buf.handle = self._add_guest(buf.policy, vek, Cmd.LAUNCH_START, tek, tik).handle
        return SevStatus.SUCCESS

    def _launch_update(self, buf: LaunchUpdateBuf, cmd: Cmd) -> SevStatus:
        """launch_update_common: handle, state, ES (VMSA), INACTIVE, address alignment, length."""
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, cmd)
        if cmd == Cmd.LAUNCH_UPDATE_VMSA and not guest.es:
            return SevStatus.UNSUPPORTED
        self._require_active(guest)
        paddr = self._strip_cbit(buf.address)
        if paddr % 16:
            return SevStatus.INVALID_ADDRESS
        if buf.len == 0 or buf.len % 16:
            return SevStatus.INVALID_LENGTH
        plaintext = self._read(paddr, buf.len)  # written by the host with the C-bit clear
        guest.digest.update(plaintext)  # the launch digest covers plaintext, in call order
        self.memctl.write(guest.asid, paddr, plaintext)
        return SevStatus.SUCCESS

    def _cmd_launch_update_data(self, buf: LaunchUpdateBuf) -> SevStatus:
        return self._launch_update(buf, Cmd.LAUNCH_UPDATE_DATA)

    def _cmd_launch_update_vmsa(self, buf: LaunchUpdateBuf) -> SevStatus:
        if buf.len != VMSA_SIZE:  # before the platform state (sev_mcmd_launch_update_vmsa)
            return SevStatus.INVALID_LENGTH
        self._require_platform_state(Cmd.LAUNCH_UPDATE_VMSA)
        return self._launch_update(buf, Cmd.LAUNCH_UPDATE_VMSA)

    def _cmd_launch_measure(self, buf: LaunchMeasureBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, Cmd.LAUNCH_MEASURE)
        if buf.len < MEASURE_SIZE:
            buf.len = MEASURE_SIZE  # written back only with INVALID_LENGTH
            return SevStatus.INVALID_LENGTH
        self._check_writable((buf.address, MEASURE_SIZE))
        mnonce = self._trng(16)
        fw = self.firmware
        guest.measure = session.launch_measure(
            guest.tik, fw.api_major, fw.api_minor, fw.build, guest.policy, guest.digest.digest(), mnonce
        )
        self.dram.write(buf.address, guest.measure + mnonce)
        self._transition(guest, Cmd.LAUNCH_MEASURE)
        return SevStatus.SUCCESS

    def _cmd_launch_secret(self, buf: TransportBuf) -> SevStatus:
        """sev_mcmd_launch_secret: handle, address alignment, lengths, state, INACTIVE, header, guest and
        transport reads, MAC, and only then the COMPRESSED flag."""
        guest = self._guest(buf.handle)
        paddr = self._strip_cbit(buf.guest_address)
        if paddr % 16:
            return SevStatus.INVALID_ADDRESS
        if (
            buf.hdr_len != PACKET_HEADER_SIZE
            or buf.guest_len % 16
            or buf.guest_len == 0
            or buf.guest_len > SCRATCH_BUF_LEN
            or buf.guest_len != buf.trans_len
        ):
            return SevStatus.INVALID_LENGTH
        self._require_guest_state(guest, Cmd.LAUNCH_SECRET)
        self._require_active(guest)
        header = self._read(buf.hdr_address, PACKET_HEADER_SIZE)
        self._check_writable((paddr, buf.trans_len))
        ciphertext = self._read(buf.trans_address, buf.trans_len)
        flags, plaintext = self._open_packet(guest, buf, header, ciphertext, session.CTX_SECRET, guest.measure)
        if flags & PACKET_FLAG_COMPRESSED:
            return SevStatus.UNSUPPORTED
        self.memctl.write(guest.asid, paddr, plaintext)
        return SevStatus.SUCCESS

    def _cmd_launch_finish(self, buf: HandleBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, Cmd.LAUNCH_FINISH)
        self._finish_pending_activate(guest)
        guest.zeroize_channel()
        self._transition(guest, Cmd.LAUNCH_FINISH)
        return SevStatus.SUCCESS

    # -- debug (AMD sev_mcmd.c sev_mcmd_dbg_decrypt, sev_mcmd_dbg_encrypt, debug_crypt_common) ----------
    def _dbg(self, buf: DbgBuf, encrypt: bool) -> SevStatus:
        """Alignment, LEN % 16 (0 allowed: nothing is copied), handle, NODBG, INACTIVE, then the copy."""
        src, dst = self._strip_cbit(buf.src_addr), self._strip_cbit(buf.dst_addr)
        if src % 16 or dst % 16:
            return SevStatus.INVALID_ADDRESS
        if buf.len % 16:
            return SevStatus.INVALID_LENGTH
        guest = self._guest(buf.handle)
        if guest.policy & Policy.NODBG:
            return SevStatus.POLICY_FAILURE
        self._require_active(guest)
        self._check_writable((src, buf.len), (dst, buf.len))
        if not buf.len:
            return SevStatus.SUCCESS
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
