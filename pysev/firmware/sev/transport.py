"""The SEV firmware's migration commands: SEND_*, RECEIVE_*, and their batch forms.

SEND_UPDATE_DATA and the others live in three places: the firmware handler here (checks in AMD's
order), the KVM face in ``pysev/kvm.py`` (``SevKvm._send_update``, ``KVM_SEV_SEND_UPDATE_DATA``), and the
batch kernel in ``csev/_transport.pyx`` (``send_pages``, ``receive_pages``).

Handlers follow AMD's firmware source function by function (``sev_mcmd.c`` ``sev_mcmd_send_start``,
``sev_mcmd_send_update``, ``sev_mcmd_send_finish``, ``sev_mcmd_send_cancel``, ``sev_mcmd_receive_start``,
``sev_mcmd_receive_update``, ``sev_mcmd_receive_finish``); session blob, packet layout and MAC are in
``session.py``. ``Platform`` (``platform.py``) derives from :class:`TransportCommands` and adds the
platform, guest-management, launch and debug commands.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import numpy as np

import csev
from csev.packet import PAGE_SHIFT
from pysev.firmware.amdroot import SimulatedRoot
from pysev.firmware.mailbox import CommandRefusedError, Mailbox
from pysev.firmware.sev import identity, session
from pysev.firmware.sev.abi import (
    CBITPOS,
    GUEST_COUNT_MAX,
    PACKET_FLAG_COMPRESSED,
    PACKET_HEADER_SIZE,
    PLAT_CERTS_SIZE,
    POLICY_RESERVED_MASK,
    SCRATCH_BUF_LEN,
    SESSION_SIZE,
    SEV_CERT_SIZE,
    Cmd,
    FirmwareVersion,
    GuestState,
    HandleBuf,
    PlatformState,
    Policy,
    ReceiveStartBuf,
    SendStartBuf,
    TransportBuf,
    policy_api,
)
from pysev.firmware.sev.guest import GuestContext, new_vek
from pysev.firmware.status import SevError, SevStatus
from pysev.hw.memctl import MemoryController


class TransportCommands(Mailbox):
    """SEND_START … RECEIVE_FINISH; the channel and packet helpers LAUNCH_START and LAUNCH_SECRET share
    with them; pysev's batch forms of SEND/RECEIVE_UPDATE_DATA and DBG_DECRYPT."""

    # Set by Platform.__init__.
    memctl: MemoryController
    root: SimulatedRoot
    max_asid: int
    firmware: FirmwareVersion
    _identity: identity.Identity
    _trng: Callable[[int], bytes]
    _guests: dict[int, GuestContext]

    @property
    def es_enabled(self) -> bool:
        raise NotImplementedError

    def _finish_pending_activate(self, guest: GuestContext) -> None:
        raise NotImplementedError

    # -- checks and the channel, shared with the launch commands ------------------------------------
    @staticmethod
    def _require_active(guest: GuestContext) -> None:
        if not guest.asid:
            raise CommandRefusedError(SevStatus.INACTIVE)

    @staticmethod
    def _strip_cbit(paddr: int) -> int:
        # KVM ORs the C-bit into GUEST_PADDR (Linux arch/x86/kvm/svm/sev.c); the firmware accesses it
        # with the guest key.
        return paddr & ~(1 << CBITPOS)

    def _check_api(self, policy: int) -> None:
        if self.firmware.api < policy_api(policy) or policy & POLICY_RESERVED_MASK:
            raise CommandRefusedError(SevStatus.POLICY_FAILURE)

    def _open_channel(self, guest_policy: int, peer: bytes, blob: bytes) -> tuple[bytes, bytes]:
        """ECDH with the peer's PDH or GODH, unwrap TEK/TIK, check POLICY_MAC and the policy: RECEIVE_START
        and LAUNCH_START with a GODH (AMD ``sev_channel.c`` ``sev_channel_open_server``, then
        ``sev_guest.c`` ``sev_guest_verify_policy``)."""
        if not self._identity.pdh_usable():
            raise CommandRefusedError(SevStatus.INVALID_CERTIFICATE)
        status = identity.pdh_sanity(peer)
        if status != SevStatus.SUCCESS:
            raise CommandRefusedError(status)
        z = self._identity.ecdh(peer)
        try:
            tek, tik = session.open_session(z, blob, guest_policy)
        except SevError as err:
            raise CommandRefusedError(err.status) from None
        self._check_api(guest_policy)
        return tek, tik

    def _start_guest(self, handle_in: int, policy: int) -> bytes:
        """Key sharing with ``handle_in``, a free guest slot (RESOURCE_LIMIT) and the ES check of
        LAUNCH_START/RECEIVE_START, in that order; the guest's VEK."""
        if handle_in:
            other = self._guest(handle_in)
            if other.policy != policy or policy & Policy.NOKS:
                raise CommandRefusedError(SevStatus.POLICY_FAILURE)
            vek = other.vek
        else:
            vek = None
        if len(self._guests) >= GUEST_COUNT_MAX:  # sev_guest.c find_free_guest_handle
            raise CommandRefusedError(SevStatus.RESOURCE_LIMIT)
        if policy & Policy.ES and not self.es_enabled:
            raise CommandRefusedError(SevStatus.UNSUPPORTED)
        return vek if vek is not None else new_vek(self._trng)

    def _add_guest(
        self, policy: int, vek: bytes, cmd: Cmd, tek: bytes = bytes(16), tik: bytes = bytes(16)
    ) -> GuestContext:
        # The lowest free handle of 1..GUEST_COUNT_MAX: a DECOMMISSIONed guest's handle is reused.
        handle = next(h for h in range(1, GUEST_COUNT_MAX + 1) if h not in self._guests)
        guest = GuestContext(handle, policy, GuestState.UNINIT, vek, tek=tek, tik=tik)
        self._guests[guest.handle] = guest
        self._transition(guest, cmd)
        if self.state == PlatformState.INIT:
            self.state = PlatformState.WORKING
        return guest

    # -- packets ---------------------------------------------------------------------------------------
    def _open_packet(
        self, guest: GuestContext, buf: TransportBuf, header: bytes, ciphertext: bytes, ctx: int, measure: bytes = b""
    ) -> tuple[int, bytes]:
        """Check a transport packet's MAC (constant time) before decrypting; → (header flags, plaintext)."""
        flags, iv, mac = session.unpack_packet_header(header)
        expected = session.packet_mac(guest.tik, ctx, flags, iv, buf.guest_len, buf.trans_len, ciphertext, measure)
        if not hmac.compare_digest(expected, mac):
            raise CommandRefusedError(SevStatus.BAD_MEASUREMENT)
        return flags, csev.aes128_ctr(guest.tek, iv, ciphertext)

    # -- send ----------------------------------------------------------------------------------------------
    def _cmd_send_start(self, buf: SendStartBuf) -> SevStatus:
        """sev_mcmd_send_start: handle, SESSION_LEN (written back), state, NOSEND, the SEV chain
        (validate_platform) and receiver API, the DOMAIN chain (validate_domain), the target PDH, the
        channel (sev_channel_open_client), and only then the session address (copy_to_x86)."""
        guest = self._guest(buf.handle)
        if buf.session_len != SESSION_SIZE:
            buf.session_len = SESSION_SIZE
            return SevStatus.INVALID_LENGTH
        self._require_guest_state(guest, Cmd.SEND_START)
        if guest.policy & Policy.NOSEND:
            return SevStatus.POLICY_FAILURE
        target_pdh = None
        if guest.policy & Policy.SEV:
            if (
                buf.plat_certs_len != PLAT_CERTS_SIZE
                or buf.pdh_cert_len != SEV_CERT_SIZE
                or not identity.amd_chain_length_ok(buf.amd_certs_len)
            ):
                return SevStatus.INVALID_LENGTH
            plat = self._read(buf.plat_certs_address, PLAT_CERTS_SIZE)
            target_pdh = self._read(buf.pdh_cert_address, SEV_CERT_SIZE)
            amd = self._read(buf.amd_certs_address, buf.amd_certs_len)
            status = identity.validate_platform(self.root.trust_anchor, target_pdh, plat, amd)
            if status != SevStatus.SUCCESS:
                return status
            if identity.cert_api(plat[:SEV_CERT_SIZE]) < policy_api(guest.policy):
                return SevStatus.POLICY_FAILURE
        if guest.policy & Policy.DOMAIN:
            if buf.plat_certs_len != PLAT_CERTS_SIZE or buf.pdh_cert_len != SEV_CERT_SIZE:
                return SevStatus.INVALID_LENGTH
            plat = self._read(buf.plat_certs_address, PLAT_CERTS_SIZE)
            target_pdh = self._read(buf.pdh_cert_address, SEV_CERT_SIZE)
            status = identity.validate_domain(target_pdh, plat, self._identity.oca_cert)
            if status != SevStatus.SUCCESS:
                return status
        if target_pdh is None:
            if buf.pdh_cert_len != SEV_CERT_SIZE:
                return SevStatus.INVALID_LENGTH
            target_pdh = self._read(buf.pdh_cert_address, SEV_CERT_SIZE)
        if not self._identity.pdh_usable():
            return SevStatus.INVALID_CERTIFICATE
        status = identity.pdh_sanity(target_pdh)
        if status != SevStatus.SUCCESS:
            return status
        self._check_writable((buf.session_address, SESSION_SIZE))
        tek, tik, nonce, wrap_iv = (self._trng(16) for _ in range(4))
        blob = session.build_session(self._identity.ecdh(target_pdh), nonce, wrap_iv, tek, tik, guest.policy)
        self.dram.write(buf.session_address, blob)
        buf.policy = guest.policy
        guest.tek, guest.tik = tek, tik
        self._transition(guest, Cmd.SEND_START)
        return SevStatus.SUCCESS

    def _send_update(self, buf: TransportBuf, cmd: Cmd) -> SevStatus:
        if buf.hdr_len < PACKET_HEADER_SIZE:  # checked before the handle, as AMD's firmware does
            buf.hdr_len = PACKET_HEADER_SIZE
            return SevStatus.INVALID_LENGTH
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, cmd)
        if cmd == Cmd.SEND_UPDATE_VMSA and not guest.es:
            return SevStatus.UNSUPPORTED
        self._require_active(guest)
        if (
            buf.guest_len == 0
            or buf.guest_len > SCRATCH_BUF_LEN
            or buf.guest_len % 16
            or buf.trans_len == 0
            or buf.trans_len < buf.guest_len
        ):
            return SevStatus.INVALID_LENGTH
        paddr = self._strip_cbit(buf.guest_address)
        if paddr % 16:
            return SevStatus.INVALID_ADDRESS
        self._check_writable(
            (paddr, buf.guest_len), (buf.trans_address, buf.guest_len), (buf.hdr_address, PACKET_HEADER_SIZE)
        )
        plaintext = self.memctl.read(guest.asid, paddr, buf.guest_len)
        iv = self._trng(16)
        ciphertext = csev.aes128_ctr(guest.tek, iv, plaintext)
        mac = session.packet_mac(guest.tik, session.CTX_DATA, 0, iv, buf.guest_len, buf.guest_len, ciphertext)
        self.dram.write(buf.trans_address, ciphertext)
        self.dram.write(buf.hdr_address, session.pack_packet_header(0, iv, mac))
        buf.hdr_len = PACKET_HEADER_SIZE
        return SevStatus.SUCCESS

    def _cmd_send_update_data(self, buf: TransportBuf) -> SevStatus:
        return self._send_update(buf, Cmd.SEND_UPDATE_DATA)

    def _cmd_send_update_vmsa(self, buf: TransportBuf) -> SevStatus:
        return self._send_update(buf, Cmd.SEND_UPDATE_VMSA)

    def _end_channel(self, buf: HandleBuf, cmd: Cmd) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, cmd)
        guest.zeroize_channel()
        self._transition(guest, cmd)
        return SevStatus.SUCCESS

    def _cmd_send_finish(self, buf: HandleBuf) -> SevStatus:
        return self._end_channel(buf, Cmd.SEND_FINISH)

    def _cmd_send_cancel(self, buf: HandleBuf) -> SevStatus:
        return self._end_channel(buf, Cmd.SEND_CANCEL)

    # -- receive -------------------------------------------------------------------------------------------
    def _cmd_receive_start(self, buf: ReceiveStartBuf) -> SevStatus:
        """sev_mcmd_receive_start: SESSION_LEN, session read, PDH_CERT_LEN, PDH read, channel, policy, then
        key sharing, a guest slot and the ES check (``_start_guest``)."""
        if buf.session_len != SESSION_SIZE:
            return SevStatus.INVALID_LENGTH
        blob = self._read(buf.session_address, SESSION_SIZE)
        if buf.pdh_cert_len != SEV_CERT_SIZE:
            return SevStatus.INVALID_LENGTH
        peer = self._read(buf.pdh_cert_address, SEV_CERT_SIZE)
        tek, tik = self._open_channel(buf.policy, peer, blob)
        vek = self._start_guest(buf.handle, buf.policy)
        buf.handle = self._add_guest(buf.policy, vek, Cmd.RECEIVE_START, tek, tik).handle
        return SevStatus.SUCCESS

    def _receive_update(self, buf: TransportBuf, cmd: Cmd) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, cmd)
        if cmd == Cmd.RECEIVE_UPDATE_VMSA and not guest.es:
            return SevStatus.UNSUPPORTED
        self._require_active(guest)
        if (
            buf.trans_len == 0
            or buf.trans_len > SCRATCH_BUF_LEN
            or buf.guest_len == 0
            or buf.guest_len != buf.trans_len
            or buf.guest_len % 16
            or buf.hdr_len < PACKET_HEADER_SIZE
        ):
            return SevStatus.INVALID_LENGTH
        paddr = self._strip_cbit(buf.guest_address)
        if paddr % 16:
            return SevStatus.INVALID_ADDRESS
        header = self._read(buf.hdr_address, PACKET_HEADER_SIZE)
        if session.unpack_packet_header(header)[0] & PACKET_FLAG_COMPRESSED:  # before the guest and trans reads
            return SevStatus.UNSUPPORTED
        self._check_writable((paddr, buf.guest_len))
        ciphertext = self._read(buf.trans_address, buf.trans_len)
        _flags, plaintext = self._open_packet(guest, buf, header, ciphertext, session.CTX_DATA)
        self.memctl.write(guest.asid, paddr, plaintext)
        return SevStatus.SUCCESS

    def _cmd_receive_update_data(self, buf: TransportBuf) -> SevStatus:
        return self._receive_update(buf, Cmd.RECEIVE_UPDATE_DATA)

    def _cmd_receive_update_vmsa(self, buf: TransportBuf) -> SevStatus:
        return self._receive_update(buf, Cmd.RECEIVE_UPDATE_VMSA)

    def _cmd_receive_finish(self, buf: HandleBuf) -> SevStatus:
        guest = self._guest(buf.handle)
        self._require_guest_state(guest, Cmd.RECEIVE_FINISH)
        self._finish_pending_activate(guest)
        return self._end_channel(buf, Cmd.RECEIVE_FINISH)

    # -- batch forms: many whole pages per call through the csev pipelines ---------------------------
    # Not PSP commands: pysev's batched equivalents of issuing the command once per page
    # (GUEST_LEN = TRANS_LEN = PAGE_SIZE). Same checks, same statuses, and byte-identical output for the
    # same TRNG stream: the IVs are drawn in page order exactly as the per-page commands draw them.
    def _batch_guest(self, handle: int, cmd: Cmd, frames: np.ndarray) -> GuestContext:
        self._require_platform_state(cmd)
        guest = self._guest(handle)
        self._require_guest_state(guest, cmd)
        self._require_active(guest)
        if frames.size and int(frames.max()) >= self.dram.n_frames:
            raise CommandRefusedError(SevStatus.INVALID_ADDRESS)
        return guest

    def send_update_data_batch(
        self,
        handle: int,
        frames: np.ndarray,
        headers: np.ndarray,
        trans: np.ndarray,
        *,
        threads: int | None = None,
        on_slice: Callable[[int, int], None] | None = None,
    ) -> SevStatus:
        """SEND_UPDATE_DATA for whole pages: ``frames`` are host frame numbers of guest pages.

        With ``on_slice``, ``headers``/``trans`` are a ring of ``n`` rows that the hypervisor drains: the
        packets are produced ``n`` at a time into rows ``[0, stop - start)``, and ``on_slice(start, stop)``
        consumes them before the next slice reuses the rows, as QEMU writes each packet to the stream
        right after its SEND_UPDATE_DATA (``target/i386/sev.c`` ``sev_send_update_data`` of QEMU's SEV
        migration series). The ring is written with ordinary stores: its consumer (a socket send) then
        copies it from cache, not from DRAM. An exception from ``on_slice`` ends the batch there.
        """
        frames = np.ascontiguousarray(frames, dtype=np.uint64)
        with self._lock:
            try:
                guest = self._batch_guest(handle, Cmd.SEND_UPDATE_DATA, frames)
            except CommandRefusedError as refused:
                return refused.status
            ivs = np.frombuffer(self._trng(16 * frames.size), dtype=np.uint8).reshape(-1, 16)
            keys = guest.vek, guest.tek, guest.tik
        # The pipeline runs outside the command lock: it reads only the keys captured above and the
        # guest's pages, so page channels can encrypt concurrently (a later SEND_FINISH/CANCEL cannot
        # change what this batch produces).
        csev.send_pages(
            *keys,
            self.dram.frames,
            frames.astype(np.int64),
            frames << np.uint64(PAGE_SHIFT),
            headers,
            trans,
            ivs,
            threads=threads,
            nontemporal=on_slice is None,
            on_slice=on_slice,
        )
        return SevStatus.SUCCESS

    def receive_update_data_batch(
        self, handle: int, frames: np.ndarray, headers: np.ndarray, trans: np.ndarray, *, threads: int | None = None
    ) -> tuple[SevStatus, np.ndarray]:
        """RECEIVE_UPDATE_DATA for whole pages; returns (command status, per-packet statuses).

        A packet that fails its MAC (BAD_MEASUREMENT) or carries the COMPRESSED flag (UNSUPPORTED)
        writes nothing; the others in the batch are applied. The caller decides what a failure means.
        """
        frames = np.ascontiguousarray(frames, dtype=np.uint64)
        with self._lock:
            try:
                guest = self._batch_guest(handle, Cmd.RECEIVE_UPDATE_DATA, frames)
            except CommandRefusedError as refused:
                return refused.status, np.full(frames.size, refused.status, dtype=np.uint32)
            keys = guest.vek, guest.tek, guest.tik
        statuses = csev.receive_pages(
            *keys,
            headers,
            trans,
            self.dram.frames,
            frames.astype(np.int64),
            frames << np.uint64(PAGE_SHIFT),
            threads=threads,
        )
        return SevStatus.SUCCESS, statuses

    def dbg_decrypt_batch(self, handle: int, frames: np.ndarray, out: np.ndarray) -> SevStatus:
        """DBG_DECRYPT of whole pages into ``out`` (refused with POLICY_FAILURE under NODBG)."""
        frames = np.ascontiguousarray(frames, dtype=np.uint64)
        with self._lock:
            try:
                self._require_platform_state(Cmd.DBG_DECRYPT)
                guest = self._guest(handle)
                if guest.policy & Policy.NODBG:
                    raise CommandRefusedError(SevStatus.POLICY_FAILURE)
                self._require_active(guest)
                if frames.size and int(frames.max()) >= self.dram.n_frames:
                    raise CommandRefusedError(SevStatus.INVALID_ADDRESS)
            except CommandRefusedError as refused:
                return refused.status
            csev.xts_decrypt(
                guest.vek, self.dram.frames, out, frames << np.uint64(PAGE_SHIFT), src_index=frames.astype(np.int64)
            )
            return SevStatus.SUCCESS
