"""Memory-encryption operations: everything SEV-specific the migration engine needs, behind one
interface (the SEV live-migration series' ``MachineMemoryEncryptionOps``, with per-call errors). The
engine (``outgoing``, ``incoming``, ``channels``) never names a firmware command or type; a guest without
SEV migrates through the same engine with ``PlainOps``.

Source side: ``save_setup`` (SEND_START), ``classify`` (which dirty pages are private), ``send_pages``
(SEND_UPDATE_DATA, batched), ``state_map`` (the private/shared map for the END section), ``commit``
(SEND_FINISH) or ``cancel`` (SEND_CANCEL). Destination side: ``load_setup`` (RECEIVE_START from the
context record), ``receive_pages`` (RECEIVE_UPDATE_DATA, batched), ``load_state_map``, ``finish``
(RECEIVE_FINISH) or ``abort``.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import logging

import numpy as np

import csev
from csev.packet import PACKET_HEADER_SIZE, PAGE_SIZE, RecordSink
from pysev import kvm
from pysev.firmware.sev.abi import SESSION_SIZE, SEV_CERT_SIZE, SEV_FW_BLOB_MAX_SIZE, GuestState, Policy
from pysev.firmware.status import SevStatus
from pysev.hv.memory import RamBlock
from pysev.migration.stream import SevContext

log = logging.getLogger(__name__)


class MigrationError(Exception):
    """A migration failed; the message names what failed and where."""


def decode_blob(name: str, value: str) -> bytes:
    """A base64 migration parameter, bounded like QEMU's ``check_blob_length`` (≤ SEV_FW_BLOB_MAX_SIZE)."""
    if not value:
        raise MigrationError(
            f"migration parameter {name} is not set (take it from the destination's query-sev-capabilities)"
        )
    if len(value) > 4 * SEV_FW_BLOB_MAX_SIZE // 3 + 4:
        raise MigrationError(
            f"migration parameter {name}: {len(value)} base64 characters exceed the {SEV_FW_BLOB_MAX_SIZE}-byte limit"
        )
    try:
        blob = base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise MigrationError(f"migration parameter {name} is not valid base64: {err}") from None
    if not blob or len(blob) > SEV_FW_BLOB_MAX_SIZE:
        raise MigrationError(f"migration parameter {name}: invalid length {len(blob)} (max {SEV_FW_BLOB_MAX_SIZE})")
    return blob


class PlainOps:
    """A guest without memory encryption: every page is shared and travels in the clear."""

    encrypted = False
    #: What makes the source guest unrunnable, as error messages name it.
    commit_name = "the commit"

    def __init__(self, vm) -> None:
        self.vm = vm

    @property
    def plaintext_readable(self) -> bool:
        """Whether the host can read the guest's plaintext (to digest it for verification)."""
        return True

    @staticmethod
    def status_name(code: int) -> str:
        """The name of a per-page status that ``receive_pages`` returned."""
        return f"status {code:#x}"

    def save_setup(self, params) -> SevContext | None:
        return None

    def classify(self, block, dirty: np.ndarray, private: np.ndarray, shared: np.ndarray) -> tuple[int, int]:
        private[:] = 0
        shared[:] = dirty
        return 0, csev.bitmap_count(dirty)

    def commit(self) -> None:
        pass

    def cancel(self) -> None:
        pass

    def send_pages(
        self,
        block: RamBlock,
        pages: np.ndarray,
        hdrs: np.ndarray,
        trans: np.ndarray,
        threads: int = 1,
        on_slice: RecordSink | None = None,
    ) -> None:
        raise MigrationError("a guest without SEV has no private pages to encrypt")

    def receive_pages(
        self, block: RamBlock, pages: np.ndarray, hdrs: np.ndarray, trans: np.ndarray, threads: int = 1
    ) -> np.ndarray:
        raise MigrationError("the stream carries encrypted pages but this VM has no SEV context")

    def send_vmsas(self) -> list[tuple[bytes, bytes]]:
        return []

    def receive_vmsa(self, vcpu: int, hdr: bytes, trans: bytes) -> None:
        raise MigrationError("the stream carries a SEV-ES VMSA but this VM is not an SEV-ES guest")

    def state_map(self):
        return []

    def load_setup(self, context: SevContext) -> None:
        raise MigrationError("the stream carries encrypted pages but this VM has no SEV context")

    def load_state_map(self, block, entries) -> None:
        raise MigrationError("the stream carries a page-encryption map but this VM has no SEV context")

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


class SevOps(PlainOps):
    """SEV: private pages through the firmware's transport commands, shared pages in the clear."""

    encrypted = True
    commit_name = "SEND_FINISH"

    def __init__(self, vm) -> None:
        super().__init__(vm)
        self.sev: kvm.SevKvm = vm.sev
        self.sending = False
        self.receiving = False

    @property
    def plaintext_readable(self) -> bool:
        """NODBG forbids DBG_DECRYPT: the host cannot read the guest's plaintext."""
        return not self.vm.policy & Policy.NODBG

    @staticmethod
    def status_name(code: int) -> str:
        try:
            return SevStatus(code).name
        except ValueError:
            return f"firmware status {code:#x}"

    # -- source --------------------------------------------------------------------------------------
    def save_setup(self, params) -> SevContext:
        """SEND_START with the target's PDH and chains (QEMU ``sev_send_start``): returns the context
        that precedes the first encrypted page on the wire."""
        pdh = decode_blob("sev-pdh", params.sev_pdh)
        plat = decode_blob("sev-plat-cert", params.sev_plat_cert)
        amd = decode_blob("sev-amd-cert", params.sev_amd_cert)
        bufs = [ctypes.create_string_buffer(b, len(b)) for b in (pdh, plat, amd)]
        session = ctypes.create_string_buffer(SESSION_SIZE)
        # The length query first, as QEMU does (session_len = 0 → INVALID_LENGTH + the length).
        query = kvm.kvm_sev_send_start()
        cmd = kvm.kvm_sev_cmd(id=kvm.sev_cmd_id.KVM_SEV_SEND_START, data=ctypes.addressof(query))
        if self.sev.memory_encrypt_op(cmd) == 0 or cmd.error != SevStatus.INVALID_LENGTH:
            raise MigrationError(f"SEND_START length query: unexpected firmware status {cmd.error:#x}")
        start = kvm.kvm_sev_send_start(
            pdh_cert_uaddr=ctypes.addressof(bufs[0]),
            pdh_cert_len=len(pdh),
            plat_certs_uaddr=ctypes.addressof(bufs[1]),
            plat_certs_len=len(plat),
            amd_certs_uaddr=ctypes.addressof(bufs[2]),
            amd_certs_len=len(amd),
            session_uaddr=ctypes.addressof(session),
            session_len=query.session_len,
        )
        try:
            self.sev.op(kvm.sev_cmd_id.KVM_SEV_SEND_START, start)
        except kvm.KvmError as err:
            raise MigrationError(f"SEND_START refused the target: {err}") from None
        self.sending = True
        own_pdh = self.vm.host.platform.public_certs()["pdh"]  # PDH_CERT_EXPORT of our own PDH
        return SevContext(start.policy, own_pdh, session.raw)

    def classify(self, block, dirty, private, shared):
        if block.shared_by_nature:
            return super().classify(block, dirty, private, shared)
        return csev.bitmap_split(dirty, self.vm.memory.enc_snapshot(block), private, shared)

    def send_pages(
        self,
        block,
        pages: np.ndarray,
        hdrs: np.ndarray,
        trans: np.ndarray,
        threads: int = 1,
        on_slice: RecordSink | None = None,
    ) -> None:
        """SEND_UPDATE_DATA for ``pages`` (indices into ``block``), batched through the csev pipeline;
        ``threads`` cores work on the batch. With ``on_slice``, ``hdrs``/``trans`` are a ring the
        caller drains in ``on_slice(start, stop)`` (``Platform.send_update_data_batch``)."""
        self.sev.send_update_data_batch(block.frames[pages], hdrs, trans, threads=threads, on_slice=on_slice)

    def state_map(self):
        """(block, [(start_gpa, npages, bitmap bytes)]) for every encryptable block (v3 subtype 2)."""
        return [
            (b, [(b.gpa, b.npages, self.vm.memory.enc_snapshot(b).tobytes())])
            for b in self.vm.memory.blocks
            if not b.shared_by_nature
        ]

    def send_vmsas(self) -> list[tuple[bytes, bytes]]:
        """SEND_UPDATE_VMSA for every vCPU of an SEV-ES guest (at stop-and-copy): (header, transport data)."""
        out = []
        for hpa in self.vm.vmsa_hpas:
            hdr, trans = ctypes.create_string_buffer(PACKET_HEADER_SIZE), ctypes.create_string_buffer(PAGE_SIZE)
            self.sev.op(
                kvm.sev_cmd_id.KVM_SEV_SEND_UPDATE_VMSA,
                kvm.kvm_sev_send_update_data(
                    hdr_uaddr=ctypes.addressof(hdr),
                    hdr_len=PACKET_HEADER_SIZE,
                    guest_uaddr=self.sev.uaddr_of_hpa(hpa),
                    guest_len=PAGE_SIZE,
                    trans_uaddr=ctypes.addressof(trans),
                    trans_len=PAGE_SIZE,
                ),
            )
            out.append((hdr.raw, trans.raw))
        return out

    def receive_vmsa(self, vcpu: int, hdr: bytes, trans: bytes) -> None:
        """RECEIVE_UPDATE_VMSA of one vCPU's VMSA (MAC checked by the firmware: BAD_MEASUREMENT)."""
        if not self.receiving or not 0 <= vcpu < len(self.vm.vmsa_hpas):
            raise MigrationError(
                f"SEV-ES VMSA for vCPU {vcpu}: this guest has "
                f"{len(self.vm.vmsa_hpas)} VMSAs{'' if self.receiving else ' and no session yet'}"
            )
        h, t = ctypes.create_string_buffer(hdr, len(hdr)), ctypes.create_string_buffer(trans, len(trans))
        try:
            self.sev.op(
                kvm.sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_VMSA,
                kvm.kvm_sev_receive_update_data(
                    hdr_uaddr=ctypes.addressof(h),
                    hdr_len=len(hdr),
                    guest_uaddr=self.sev.uaddr_of_hpa(self.vm.vmsa_hpas[vcpu]),
                    guest_len=PAGE_SIZE,
                    trans_uaddr=ctypes.addressof(t),
                    trans_len=len(trans),
                ),
            )
        except kvm.KvmError as err:
            raise MigrationError(f"RECEIVE_UPDATE_VMSA rejected the VMSA of vCPU {vcpu}: {err}") from None

    def commit(self) -> None:
        """SEND_FINISH: the source guest becomes unrunnable (SENT) — only after the destination has
        verified everything (the commit protocol in ``outgoing``)."""
        self.sev.op(kvm.sev_cmd_id.KVM_SEV_SEND_FINISH)
        self.sending = False

    def cancel(self) -> None:
        """SEND_CANCEL: back to RUNNING with the TEK/TIK channel destroyed; memory untouched."""
        if self.sending:
            status = kvm.kvm_sev_guest_status()
            self.sev.op(kvm.sev_cmd_id.KVM_SEV_GUEST_STATUS, status)
            if status.state == GuestState.SUPDATE:
                self.sev.op(kvm.sev_cmd_id.KVM_SEV_SEND_CANCEL)
            self.sending = False

    # -- destination -----------------------------------------------------------------------------------
    def load_setup(self, context: SevContext) -> None:
        """RECEIVE_START from the stream's context (QEMU ``sev_receive_start``)."""
        if len(context.pdh) != SEV_CERT_SIZE or len(context.session) != SESSION_SIZE:
            raise MigrationError(f"SEV context: the PDH must be {SEV_CERT_SIZE} bytes and the session {SESSION_SIZE}")
        pdh = ctypes.create_string_buffer(context.pdh, len(context.pdh))
        session = ctypes.create_string_buffer(context.session, len(context.session))
        start = kvm.kvm_sev_receive_start(
            policy=context.policy,
            pdh_uaddr=ctypes.addressof(pdh),
            pdh_len=len(context.pdh),
            session_uaddr=ctypes.addressof(session),
            session_len=len(context.session),
        )
        try:
            self.sev.op(kvm.sev_cmd_id.KVM_SEV_RECEIVE_START, start)
        except kvm.KvmError as err:
            raise MigrationError(f"RECEIVE_START refused the session: {err}") from None
        self.vm.policy = context.policy
        self.receiving = True

    def receive_pages(
        self, block, pages: np.ndarray, hdrs: np.ndarray, trans: np.ndarray, threads: int = 1
    ) -> np.ndarray:
        """RECEIVE_UPDATE_DATA for a batch; returns per-packet firmware statuses (0 = applied)."""
        if not self.receiving:
            raise MigrationError("encrypted page before the SEV context (RECEIVE_START) was received")
        return self.sev.receive_update_data_batch(block.frames[pages], hdrs, trans, threads=threads)

    def load_state_map(self, block, entries) -> None:
        if block.shared_by_nature:
            raise MigrationError(f"page-encryption map for {block.idstr}, which is shared by nature")
        for start_gpa, npages, bitmap in entries:
            self.vm.memory.set_enc_bitmap(
                block, start_gpa, npages, np.frombuffer(bitmap, dtype="<u8").astype(np.uint64)
            )

    def finish(self) -> None:
        """RECEIVE_FINISH: the destination guest may run (after the source committed)."""
        if self.receiving:
            self.sev.op(kvm.sev_cmd_id.KVM_SEV_RECEIVE_FINISH)
            self.receiving = False

    def abort(self) -> None:
        """Discard a received guest: the SEV context is decommissioned, its key gone."""
        self.receiving = False


def ops_for(vm) -> PlainOps:
    return SevOps(vm) if vm.sev_enabled else PlainOps(vm)
