"""The KVM face of the simulated firmware: ``KVM_MEMORY_ENCRYPT_OP`` as Linux implements it.

ctypes structures carry the names and fields of ``include/uapi/linux/kvm.h`` (a test compiles a C
program against ``/usr/include/linux/kvm.h`` and pins every size and offset). ``SevKvm.memory_encrypt_op``
takes a ``kvm_sev_cmd`` exactly as the ioctl does: ``id`` is the KVM sub-command (``enum sev_cmd_id``),
``data`` the user address of the sub-command's struct, ``error`` receives the firmware status, and the
return value is 0 or a negative errno. Like KVM (``arch/x86/kvm/svm/sev.c``) it:

- copies certificate/session blobs from user memory into kernel buffers (bounded by
  ``SEV_FW_BLOB_MAX_SIZE``) and hands the firmware their physical addresses;
- translates user addresses of guest RAM to host physical addresses with the C-bit set;
- performs the length queries (``session_len``/``hdr_len``/``trans_len``/``len`` == 0);
- binds an ASID right after LAUNCH_START/RECEIVE_START (ACTIVATE) and enforces one page per
  SEND/RECEIVE_UPDATE_DATA.

Upstream KVM has no handler for SEND/RECEIVE_UPDATE_VMSA (the dispatch switch of
``arch/x86/kvm/svm/sev.c`` ``sev_mem_enc_ioctl``); pysev adds them, marked as an extension, because SEV-ES
migration needs them.

SEND_UPDATE_DATA and the other migration commands: the KVM face is here (``SevKvm._send_update``), the
firmware handler in ``pysev/firmware/sev/transport.py``, the batch kernel in ``csev/_transport.pyx``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import numpy as np

from csev.packet import PAGE_SIZE
from pysev.firmware.mailbox import CommandBuffer
from pysev.firmware.sev import abi
from pysev.firmware.sev.abi import CBITPOS, SEV_FW_BLOB_MAX_SIZE
from pysev.firmware.sev.platform import Platform
from pysev.firmware.status import SevStatus

log = logging.getLogger(__name__)

_Arg = TypeVar("_Arg", bound=ctypes.Structure)

u32, u64, u8 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint8

KVMIO = 0xAE
KVM_MEMORY_ENCRYPT_OP = (3 << 30) | (ctypes.sizeof(ctypes.c_ulong) << 16) | (KVMIO << 8) | 0xBA  # _IOWR


class sev_cmd_id:  # noqa: N801  (the header's enum name)
    KVM_SEV_INIT = 0
    KVM_SEV_ES_INIT = 1
    KVM_SEV_LAUNCH_START = 2
    KVM_SEV_LAUNCH_UPDATE_DATA = 3
    KVM_SEV_LAUNCH_UPDATE_VMSA = 4
    KVM_SEV_LAUNCH_SECRET = 5
    KVM_SEV_LAUNCH_MEASURE = 6
    KVM_SEV_LAUNCH_FINISH = 7
    KVM_SEV_SEND_START = 8
    KVM_SEV_SEND_UPDATE_DATA = 9
    KVM_SEV_SEND_UPDATE_VMSA = 10
    KVM_SEV_SEND_FINISH = 11
    KVM_SEV_RECEIVE_START = 12
    KVM_SEV_RECEIVE_UPDATE_DATA = 13
    KVM_SEV_RECEIVE_UPDATE_VMSA = 14
    KVM_SEV_RECEIVE_FINISH = 15
    KVM_SEV_GUEST_STATUS = 16
    KVM_SEV_DBG_DECRYPT = 17
    KVM_SEV_DBG_ENCRYPT = 18
    KVM_SEV_CERT_EXPORT = 19
    KVM_SEV_GET_ATTESTATION_REPORT = 20
    KVM_SEV_SEND_CANCEL = 21


class kvm_sev_cmd(ctypes.Structure):  # noqa: N801
    _fields_ = [("id", u32), ("data", u64), ("error", u32), ("sev_fd", u32)]


class kvm_sev_launch_start(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("handle", u32),
        ("policy", u32),
        ("dh_uaddr", u64),
        ("dh_len", u32),
        ("session_uaddr", u64),
        ("session_len", u32),
    ]


class kvm_sev_launch_update_data(ctypes.Structure):  # noqa: N801
    _fields_ = [("uaddr", u64), ("len", u32)]


class kvm_sev_launch_secret(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("hdr_uaddr", u64),
        ("hdr_len", u32),
        ("guest_uaddr", u64),
        ("guest_len", u32),
        ("trans_uaddr", u64),
        ("trans_len", u32),
    ]


class kvm_sev_launch_measure(ctypes.Structure):  # noqa: N801
    _fields_ = [("uaddr", u64), ("len", u32)]


class kvm_sev_guest_status(ctypes.Structure):  # noqa: N801
    _fields_ = [("handle", u32), ("policy", u32), ("state", u32)]


class kvm_sev_dbg(ctypes.Structure):  # noqa: N801
    _fields_ = [("src_uaddr", u64), ("dst_uaddr", u64), ("len", u32)]


class kvm_sev_send_start(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("policy", u32),
        ("pdh_cert_uaddr", u64),
        ("pdh_cert_len", u32),
        ("plat_certs_uaddr", u64),
        ("plat_certs_len", u32),
        ("amd_certs_uaddr", u64),
        ("amd_certs_len", u32),
        ("session_uaddr", u64),
        ("session_len", u32),
    ]


class kvm_sev_send_update_data(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("hdr_uaddr", u64),
        ("hdr_len", u32),
        ("guest_uaddr", u64),
        ("guest_len", u32),
        ("trans_uaddr", u64),
        ("trans_len", u32),
    ]


class kvm_sev_receive_start(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("handle", u32),
        ("policy", u32),
        ("pdh_uaddr", u64),
        ("pdh_len", u32),
        ("session_uaddr", u64),
        ("session_len", u32),
    ]


class kvm_sev_receive_update_data(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("hdr_uaddr", u64),
        ("hdr_len", u32),
        ("guest_uaddr", u64),
        ("guest_len", u32),
        ("trans_uaddr", u64),
        ("trans_len", u32),
    ]


STRUCTS = (
    kvm_sev_cmd,
    kvm_sev_launch_start,
    kvm_sev_launch_update_data,
    kvm_sev_launch_secret,
    kvm_sev_launch_measure,
    kvm_sev_guest_status,
    kvm_sev_dbg,
    kvm_sev_send_start,
    kvm_sev_send_update_data,
    kvm_sev_receive_start,
    kvm_sev_receive_update_data,
)


class KvmError(OSError):
    """A failed KVM_MEMORY_ENCRYPT_OP: ``errno`` as the ioctl returns it, ``fw_error`` the firmware status."""

    def __init__(self, op: str, err: int, fw_error: int) -> None:
        try:
            fw_name = SevStatus(fw_error).name
        except ValueError:
            fw_name = f"{fw_error:#x}"
        super().__init__(err, f"{op}: {errno.errorcode.get(err, err)} (firmware {fw_name})")
        self.fw_error = fw_error


class _UserMemory:
    """Reads and writes of "user space" addresses, checked against this process's mappings first
    (KVM's copy_{from,to}_user return -EFAULT instead of faulting)."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def _mapped(self, addr: int, length: int) -> bool:
        for attempt in range(2):
            if any(lo <= addr and addr + length <= hi for lo, hi in self._ranges):
                return True
            if attempt == 0:
                self._reload()
        return False

    def _reload(self) -> None:
        ranges: list[tuple[int, int]] = []
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split()[:2]
                if perms.startswith("rw"):
                    lo, hi = (int(x, 16) for x in span.split("-"))
                    if ranges and ranges[-1][1] == lo:  # a buffer may span adjacent mappings
                        ranges[-1] = (ranges[-1][0], hi)
                    else:
                        ranges.append((lo, hi))
        self._ranges = ranges

    def read(self, addr: int, length: int) -> bytes:
        if length < 0 or not addr or not self._mapped(addr, length):
            raise _UserFaultError
        return ctypes.string_at(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        if not addr or not self._mapped(addr, len(data)):
            raise _UserFaultError
        ctypes.memmove(addr, data, len(data))


class _UserFaultError(Exception):
    """A user address outside this process's writable mappings (KVM's copy_from_user fails: -EFAULT)."""


class _IoctlError(Exception):
    """Ends a sub-command with ``err``, a negative errno, as KVM's handlers return one."""

    def __init__(self, err: int) -> None:
        self.err = err


class KvmHost:
    """The host kernel's SEV side: one per platform, owning the ASID allocator (``sev_asid_bitmap``).

    As Linux: the PSP driver INITs the platform (with a 1 MiB SEV-ES TMR) and then flushes (WBINVD on all
    CPUs, DF_FLUSH), because INIT leaves every ASID dirty (``drivers/crypto/ccp/sev-dev.c``
    ``__sev_platform_init_locked``); SEV-ES guests take ASIDs 1..min_sev_asid-1 and SEV guests
    min_sev_asid..max_asid (``arch/x86/kvm/svm/sev.c`` ``sev_asid_new``); a freed ASID waits in the
    reclaim set until the allocator runs out and flushes them all (``__sev_recycle_asids``,
    ``sev_flush_asids``).
    """

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.asids_in_use: set[int] = set()
        self.asids_reclaim: set[int] = set()
        self._bitmap_lock = threading.Lock()  # sev_bitmap_lock
        self._deactivate_lock = threading.Lock()  # sev_deactivate_lock (taken for write by the flush)
        self.platform_init()

    def platform_init(self) -> None:
        """``__sev_platform_init_locked``: INIT with SEV-ES and a TMR if the platform is UNINIT, then flush."""
        p = self.platform
        if p.state == abi.PlatformState.UNINIT:
            status = p.issue(abi.Cmd.INIT, self._init_buf())
            if status != SevStatus.SUCCESS:
                raise KvmError("SEV INIT", errno.EIO, int(status))
        self.flush_asids()

    def _init_buf(self) -> abi.InitBuf:
        # sev_es_tmr: 1 MiB, 1 MiB-aligned, owned by the firmware from INIT on (never freed here).
        raw = self.platform.dram.alloc_kernel(2 * abi.SEV_ES_TMR_SIZE)
        tmr = -(-raw // abi.SEV_ES_TMR_SIZE) * abi.SEV_ES_TMR_SIZE
        return abi.InitBuf(flags=abi.INIT_FLAGS_SEV_ES, tmr_address=tmr, tmr_len=abi.SEV_ES_TMR_SIZE)

    def flush_asids(self) -> int:
        """``sev_flush_asids``: WBINVD on all CPUs, then DF_FLUSH; returns the firmware status."""
        with self._deactivate_lock:
            self.platform.wbinvd_on_all_cpus()
            return int(self.platform.issue(abi.Cmd.DF_FLUSH))

    def asid_new(self, es: bool) -> int:
        """``sev_asid_new``: the lowest free ASID of the guest type's range, recycling once (flush) if none."""
        p = self.platform
        lo, hi = (1, p.min_sev_asid - 1) if es else (p.min_sev_asid, p.max_asid)
        with self._bitmap_lock:
            for retry in (True, False):
                free = [a for a in range(lo, hi + 1) if a not in self.asids_in_use]
                if free:
                    self.asids_in_use.add(free[0])
                    return free[0]
                if not (retry and self.asids_reclaim & set(range(lo, hi + 1))):
                    break
                if self.flush_asids() != SevStatus.SUCCESS:  # __sev_recycle_asids
                    break
                self.asids_in_use -= self.asids_reclaim
                self.asids_reclaim.clear()
        return 0

    def asid_free(self, asid: int) -> None:
        """``sev_asid_free``: the ASID is reusable only after the next flush."""
        with self._bitmap_lock:
            self.asids_reclaim.add(asid)

    def create_vm(self) -> SevKvm:
        return SevKvm(self)


class SevKvm:
    """KVM's SEV state of one VM on one host (``struct kvm_sev_info``): handle, ASID, and the ioctl.

    Guest RAM is host DRAM, so its user address is the DRAM mapping's address plus the HPA; any other
    user address is copied through kernel buffers as KVM does.
    """

    def __init__(self, host: KvmHost) -> None:
        self.host = host
        platform = self.platform = host.platform
        self.handle = 0
        self.asid = 0
        self.active = False
        self.es = False
        self._user = _UserMemory()
        self._dram_base = platform.dram.flat.ctypes.data
        self._kbufs: list[tuple[int, int]] = []
        self._ioctl_lock = threading.Lock()  # KVM serialises SEV ioctls of one VM under kvm->lock

    # -- address helpers ---------------------------------------------------------------------------
    def uaddr_of_hpa(self, hpa: int) -> int:
        return self._dram_base + hpa

    def _guest_pa(self, uaddr: int, length: int) -> int:
        """HPA | C-bit of guest RAM at ``uaddr`` (KVM: pin the page, __sme_page_pa | sev_me_mask)."""
        hpa = uaddr - self._dram_base
        if not self.platform.dram.contains(hpa, length):
            raise _IoctlError(-errno.EFAULT)
        return hpa | (1 << CBITPOS)

    def _blob_in(self, uaddr: int, length: int) -> int:
        """psp_copy_user_blob: bounded copy into a kernel buffer; returns its physical address."""
        if not uaddr or not length or length > SEV_FW_BLOB_MAX_SIZE:
            raise _IoctlError(-errno.EINVAL)
        try:
            data = self._user.read(uaddr, length)
        except _UserFaultError:
            raise _IoctlError(-errno.EFAULT) from None
        return self._kbuf(data)

    def _kbuf(self, data: bytes | int) -> int:
        length = data if isinstance(data, int) else len(data)
        pa = self.platform.dram.alloc_kernel(length)
        self._kbufs.append((pa, length))
        if not isinstance(data, int):
            self.platform.dram.write(pa, data)
        return pa

    def _to_user(self, uaddr: int, pa: int, length: int) -> None:
        try:
            self._user.write(uaddr, self.platform.dram.read(pa, length))
        except _UserFaultError:
            raise _IoctlError(-errno.EFAULT) from None

    def _fw(self, cmd: abi.Cmd, buf: CommandBuffer | None, sev_cmd: kvm_sev_cmd) -> None:
        status = self.platform.issue(cmd, buf)
        sev_cmd.error = int(status)
        if status != SevStatus.SUCCESS:
            raise _IoctlError(-errno.EIO)

    # -- the ioctl ---------------------------------------------------------------------------------
    def memory_encrypt_op(self, cmd: kvm_sev_cmd) -> int:
        """KVM_MEMORY_ENCRYPT_OP: 0 on success, else a negative errno (``cmd.error`` = firmware status)."""
        with self._ioctl_lock:
            return self._memory_encrypt_op(cmd)

    def _memory_encrypt_op(self, cmd: kvm_sev_cmd) -> int:
        handler = _HANDLERS.get(cmd.id)
        if handler is None:
            return -errno.EINVAL
        if cmd.id not in (sev_cmd_id.KVM_SEV_INIT, sev_cmd_id.KVM_SEV_ES_INIT) and not self.asid:
            return -errno.ENOTTY  # not an SEV guest yet (sev_guest(kvm) is false)
        self._kbufs = []
        try:
            struct_type = _ARG_TYPES.get(cmd.id)
            arg: ctypes.Structure | None = None
            if struct_type is not None:
                arg = struct_type.from_buffer_copy(self._user.read(cmd.data, ctypes.sizeof(struct_type)))
            handler(self, cmd, arg)
            if arg is not None:
                self._user.write(cmd.data, bytes(arg))
            return 0
        except _UserFaultError:
            return -errno.EFAULT
        except _IoctlError as ret:
            if arg is not None and ret.err == -errno.EIO:
                self._user.write(cmd.data, bytes(arg))  # length queries report through the struct
            return ret.err
        finally:
            for pa, length in self._kbufs:
                self.platform.dram.free_kernel(pa, length)

    @overload
    def op(self, op_id: int, arg: None = None) -> None: ...

    @overload
    def op(self, op_id: int, arg: _Arg) -> _Arg: ...

    def op(self, op_id: int, arg: ctypes.Structure | None = None) -> ctypes.Structure | None:
        """Convenience: issue one sub-command on a ctypes struct (returned, as the kernel filled it in);
        raises ``KvmError`` on failure."""
        cmd = kvm_sev_cmd(id=op_id, data=ctypes.addressof(arg) if arg is not None else 0)
        ret = self.memory_encrypt_op(cmd)
        if ret:
            raise KvmError(_NAMES.get(op_id, str(op_id)), -ret, cmd.error)
        return arg

    # -- sub-commands --------------------------------------------------------------------------------
    def _init(self, cmd: kvm_sev_cmd, arg: None, es: bool = False) -> None:
        if self.asid:
            raise _IoctlError(-errno.EBUSY)
        if self.platform.state == abi.PlatformState.UNINIT:  # after a SHUTDOWN: sev_platform_init again
            self._fw(abi.Cmd.INIT, self.host._init_buf(), cmd)
            self.host.flush_asids()
        asid = self.host.asid_new(es)
        if not asid:
            raise _IoctlError(-errno.EBUSY)
        self.asid = asid
        self.es = es

    def _es_init(self, cmd: kvm_sev_cmd, arg: None) -> None:
        self._init(cmd, arg, es=True)

    def _bind_asid(self, cmd: kvm_sev_cmd) -> None:
        # sev_bind_asid: ASIDs are flushed when recycled (asid_new); an ASID still dirty (the platform was
        # used behind KVM's back) gets one more flush — WBINVD on all CPUs, then DF_FLUSH — and a retry.
        status = self.platform.issue(abi.Cmd.ACTIVATE, abi.ActivateBuf(handle=self.handle, asid=self.asid))
        if status == SevStatus.DF_FLUSH_REQUIRED:
            self.host.flush_asids()
            status = self.platform.issue(abi.Cmd.ACTIVATE, abi.ActivateBuf(handle=self.handle, asid=self.asid))
        cmd.error = int(status)
        if status != SevStatus.SUCCESS:
            raise _IoctlError(-errno.EIO)
        self.active = True

    def _launch_start(self, cmd: kvm_sev_cmd, arg: kvm_sev_launch_start) -> None:
        buf = abi.LaunchStartBuf(handle=arg.handle, policy=arg.policy)
        if arg.dh_uaddr:
            buf.dh_cert_address, buf.dh_cert_len = self._blob_in(arg.dh_uaddr, arg.dh_len), arg.dh_len
        if arg.session_uaddr:
            buf.session_address = self._blob_in(arg.session_uaddr, arg.session_len)
            buf.session_len = arg.session_len
        self._fw(abi.Cmd.LAUNCH_START, buf, cmd)
        self.handle = arg.handle = buf.handle
        self._bind_asid(cmd)

    def _page_chunks(self, uaddr: int, length: int) -> Iterator[tuple[int, int]]:
        """Split a user range at page boundaries, as KVM issues one command per pinned page run."""
        end = uaddr + length
        while uaddr < end:
            step = min(end, (uaddr // PAGE_SIZE + 1) * PAGE_SIZE) - uaddr
            yield uaddr, step
            uaddr += step

    def _launch_update(
        self, cmd: kvm_sev_cmd, arg: kvm_sev_launch_update_data, fw_cmd: abi.Cmd = abi.Cmd.LAUNCH_UPDATE_DATA
    ) -> None:
        if not arg.len or arg.uaddr % 16 or arg.len % 16:
            raise _IoctlError(-errno.EINVAL)
        for uaddr, length in self._page_chunks(arg.uaddr, arg.len):
            self._fw(
                fw_cmd, abi.LaunchUpdateBuf(handle=self.handle, address=self._guest_pa(uaddr, length), len=length), cmd
            )

    def _launch_measure(self, cmd: kvm_sev_cmd, arg: kvm_sev_launch_measure) -> None:
        buf = abi.LaunchMeasureBuf(handle=self.handle)
        if arg.uaddr and arg.len:
            if arg.len > SEV_FW_BLOB_MAX_SIZE:
                raise _IoctlError(-errno.EINVAL)
            buf.address, buf.len = self._kbuf(arg.len), arg.len
        status = self.platform.issue(abi.Cmd.LAUNCH_MEASURE, buf)
        cmd.error, arg.len = int(status), buf.len
        if status != SevStatus.SUCCESS:
            raise _IoctlError(-errno.EIO)
        self._to_user(arg.uaddr, buf.address, buf.len)

    def _launch_secret(self, cmd: kvm_sev_cmd, arg: kvm_sev_launch_secret) -> None:
        if not arg.guest_len or arg.guest_uaddr // PAGE_SIZE != (arg.guest_uaddr + arg.guest_len - 1) // PAGE_SIZE:
            raise _IoctlError(-errno.EINVAL)
        buf = abi.TransportBuf(
            handle=self.handle,
            hdr_address=self._blob_in(arg.hdr_uaddr, arg.hdr_len),
            hdr_len=arg.hdr_len,
            guest_address=self._guest_pa(arg.guest_uaddr, arg.guest_len),
            guest_len=arg.guest_len,
            trans_address=self._blob_in(arg.trans_uaddr, arg.trans_len),
            trans_len=arg.trans_len,
        )
        self._fw(abi.Cmd.LAUNCH_SECRET, buf, cmd)

    def _send_start(self, cmd: kvm_sev_cmd, arg: kvm_sev_send_start) -> None:
        if not arg.session_len:  # length query: a zeroed buffer; the firmware answers INVALID_LENGTH + SESSION_SIZE
            buf = abi.SendStartBuf(handle=self.handle)
            cmd.error = int(self.platform.issue(abi.Cmd.SEND_START, buf))
            arg.session_len = buf.session_len
            raise _IoctlError(-errno.EIO)
        if (
            not (arg.pdh_cert_uaddr and arg.plat_certs_uaddr and arg.amd_certs_uaddr)
            or arg.session_len > SEV_FW_BLOB_MAX_SIZE
        ):
            raise _IoctlError(-errno.EINVAL)
        buf = abi.SendStartBuf(
            handle=self.handle,
            pdh_cert_address=self._blob_in(arg.pdh_cert_uaddr, arg.pdh_cert_len),
            pdh_cert_len=arg.pdh_cert_len,
            plat_certs_address=self._blob_in(arg.plat_certs_uaddr, arg.plat_certs_len),
            plat_certs_len=arg.plat_certs_len,
            amd_certs_address=self._blob_in(arg.amd_certs_uaddr, arg.amd_certs_len),
            amd_certs_len=arg.amd_certs_len,
            session_address=self._kbuf(arg.session_len),
            session_len=arg.session_len,
        )
        self._fw(abi.Cmd.SEND_START, buf, cmd)
        arg.policy = buf.policy
        self._to_user(arg.session_uaddr, buf.session_address, abi.SESSION_SIZE)

    def _send_update(
        self, cmd: kvm_sev_cmd, arg: kvm_sev_send_update_data, fw_cmd: abi.Cmd = abi.Cmd.SEND_UPDATE_DATA
    ) -> None:
        """KVM_SEV_SEND_UPDATE_DATA (``sev_send_update_data``); the firmware handler is in
        ``pysev/firmware/sev/transport.py``, the batch kernel in ``csev/_transport.pyx``."""
        if not arg.hdr_len or not arg.trans_len:  # length query
            buf = abi.TransportBuf(handle=self.handle)
            cmd.error = int(self.platform.issue(fw_cmd, buf))
            arg.hdr_len, arg.trans_len = buf.hdr_len, buf.trans_len
            raise _IoctlError(-errno.EIO)
        if (
            not arg.guest_len
            or arg.guest_len > PAGE_SIZE
            or arg.guest_uaddr % PAGE_SIZE + arg.guest_len > PAGE_SIZE
            or arg.hdr_len > SEV_FW_BLOB_MAX_SIZE
            or arg.trans_len > SEV_FW_BLOB_MAX_SIZE
        ):
            raise _IoctlError(-errno.EINVAL)
        buf = abi.TransportBuf(
            handle=self.handle,
            hdr_address=self._kbuf(arg.hdr_len),
            hdr_len=arg.hdr_len,
            guest_address=self._guest_pa(arg.guest_uaddr, arg.guest_len),
            guest_len=arg.guest_len,
            trans_address=self._kbuf(arg.trans_len),
            trans_len=arg.trans_len,
        )
        self._fw(fw_cmd, buf, cmd)
        self._to_user(arg.trans_uaddr, buf.trans_address, arg.guest_len)
        self._to_user(arg.hdr_uaddr, buf.hdr_address, abi.PACKET_HEADER_SIZE)
        arg.hdr_len = buf.hdr_len

    def _send_update_vmsa(self, cmd: kvm_sev_cmd, arg: kvm_sev_send_update_data) -> None:
        self._send_update(cmd, arg, abi.Cmd.SEND_UPDATE_VMSA)

    def _receive_start(self, cmd: kvm_sev_cmd, arg: kvm_sev_receive_start) -> None:
        if not (arg.pdh_uaddr and arg.pdh_len and arg.session_uaddr and arg.session_len):
            raise _IoctlError(-errno.EINVAL)
        buf = abi.ReceiveStartBuf(
            handle=arg.handle,
            policy=arg.policy,
            pdh_cert_address=self._blob_in(arg.pdh_uaddr, arg.pdh_len),
            pdh_cert_len=arg.pdh_len,
            session_address=self._blob_in(arg.session_uaddr, arg.session_len),
            session_len=arg.session_len,
        )
        self._fw(abi.Cmd.RECEIVE_START, buf, cmd)
        self.handle = arg.handle = buf.handle
        self._bind_asid(cmd)

    def _receive_update(
        self,
        cmd: kvm_sev_cmd,
        arg: kvm_sev_receive_update_data,
        fw_cmd: abi.Cmd = abi.Cmd.RECEIVE_UPDATE_DATA,
    ) -> None:
        if not (
            arg.hdr_uaddr and arg.hdr_len and arg.guest_uaddr and arg.guest_len and arg.trans_uaddr and arg.trans_len
        ):
            raise _IoctlError(-errno.EINVAL)
        if arg.guest_len > PAGE_SIZE or arg.guest_uaddr % PAGE_SIZE + arg.guest_len > PAGE_SIZE:
            raise _IoctlError(-errno.EINVAL)
        buf = abi.TransportBuf(
            handle=self.handle,
            hdr_address=self._blob_in(arg.hdr_uaddr, arg.hdr_len),
            hdr_len=arg.hdr_len,
            guest_address=self._guest_pa(arg.guest_uaddr, arg.guest_len),
            guest_len=arg.guest_len,
            trans_address=self._blob_in(arg.trans_uaddr, arg.trans_len),
            trans_len=arg.trans_len,
        )
        self._fw(fw_cmd, buf, cmd)

    def _receive_update_vmsa(self, cmd: kvm_sev_cmd, arg: kvm_sev_receive_update_data) -> None:
        self._receive_update(cmd, arg, abi.Cmd.RECEIVE_UPDATE_VMSA)

    def _guest_status(self, cmd: kvm_sev_cmd, arg: kvm_sev_guest_status) -> None:
        buf = abi.GuestStatusBuf(handle=self.handle)
        self._fw(abi.Cmd.GUEST_STATUS, buf, cmd)
        arg.handle, arg.policy, arg.state = self.handle, buf.policy, buf.state

    def _dbg(self, cmd: kvm_sev_cmd, arg: kvm_sev_dbg, fw_cmd: abi.Cmd) -> None:
        """sev_dbg_crypt: 16-byte aligned, chunked at page boundaries of the guest side."""
        if not arg.len or arg.src_uaddr % 16 or arg.dst_uaddr % 16 or arg.len % 16:
            raise _IoctlError(-errno.EINVAL)
        guest_side = arg.src_uaddr if fw_cmd == abi.Cmd.DBG_DECRYPT else arg.dst_uaddr
        done = 0
        for uaddr, length in self._page_chunks(guest_side, arg.len):
            kbuf = self._kbuf(length)
            guest_pa = self._guest_pa(uaddr, length)
            if fw_cmd == abi.Cmd.DBG_DECRYPT:
                self._fw(fw_cmd, abi.DbgBuf(handle=self.handle, src_addr=guest_pa, dst_addr=kbuf, len=length), cmd)
                self._to_user(arg.dst_uaddr + done, kbuf, length)
            else:
                try:
                    self.platform.dram.write(kbuf, self._user.read(arg.src_uaddr + done, length))
                except _UserFaultError:
                    raise _IoctlError(-errno.EFAULT) from None
                self._fw(fw_cmd, abi.DbgBuf(handle=self.handle, src_addr=kbuf, dst_addr=guest_pa, len=length), cmd)
            done += length

    def _dbg_decrypt(self, cmd: kvm_sev_cmd, arg: kvm_sev_dbg) -> None:
        self._dbg(cmd, arg, abi.Cmd.DBG_DECRYPT)

    def _dbg_encrypt(self, cmd: kvm_sev_cmd, arg: kvm_sev_dbg) -> None:
        self._dbg(cmd, arg, abi.Cmd.DBG_ENCRYPT)

    # -- lifecycle outside the ioctl (KVM_DESTROY_VM path) ---------------------------------------------
    def destroy(self) -> None:
        """sev_vm_destroy: DEACTIVATE + DECOMMISSION, release the ASID."""
        with self._ioctl_lock:
            self._destroy()

    def _destroy(self) -> None:
        if self.handle:
            with self.host._deactivate_lock:  # sev_unbind_asid: DEACTIVATE under sev_deactivate_lock
                self.platform.issue(abi.Cmd.DEACTIVATE, abi.HandleBuf(handle=self.handle))
            self.platform.issue(abi.Cmd.DECOMMISSION, abi.HandleBuf(handle=self.handle))
            self.handle = 0
        if self.asid:
            self.host.asid_free(self.asid)
            self.asid = 0
        self.active = False

    # -- pysev batch extension: many pages per call through the csev pipelines -------------------------
    def send_update_data_batch(
        self,
        frames: np.ndarray,
        headers: np.ndarray,
        trans: np.ndarray,
        *,
        threads: int | None = None,
        on_slice: Callable[[int, int], None] | None = None,
    ) -> None:
        status = self.platform.send_update_data_batch(
            self.handle, frames, headers, trans, threads=threads, on_slice=on_slice
        )
        if status != SevStatus.SUCCESS:
            raise KvmError("SEND_UPDATE_DATA(batch)", errno.EIO, status)

    def receive_update_data_batch(
        self, frames: np.ndarray, headers: np.ndarray, trans: np.ndarray, *, threads: int | None = None
    ) -> np.ndarray:
        status, per_packet = self.platform.receive_update_data_batch(
            self.handle, frames, headers, trans, threads=threads
        )
        if status != SevStatus.SUCCESS:
            raise KvmError("RECEIVE_UPDATE_DATA(batch)", errno.EIO, status)
        return per_packet

    def dbg_decrypt_batch(self, frames: np.ndarray, out: np.ndarray) -> None:
        status = self.platform.dbg_decrypt_batch(self.handle, frames, out)
        if status != SevStatus.SUCCESS:
            raise KvmError("DBG_DECRYPT(batch)", errno.EIO, status)


# Each handler takes the sub-command's struct (its type in _ARG_TYPES), or None.
_Handler = Callable[[SevKvm, kvm_sev_cmd, Any], None]


def _handle_only(fw_cmd: abi.Cmd) -> _Handler:
    def run(self: SevKvm, cmd: kvm_sev_cmd, arg: None) -> None:
        self._fw(fw_cmd, abi.HandleBuf(handle=self.handle), cmd)

    return run


_HANDLERS: dict[int, _Handler] = {
    sev_cmd_id.KVM_SEV_INIT: SevKvm._init,
    sev_cmd_id.KVM_SEV_ES_INIT: SevKvm._es_init,
    sev_cmd_id.KVM_SEV_LAUNCH_START: SevKvm._launch_start,
    sev_cmd_id.KVM_SEV_LAUNCH_UPDATE_DATA: SevKvm._launch_update,
    sev_cmd_id.KVM_SEV_LAUNCH_UPDATE_VMSA: lambda self, cmd, arg: self._launch_update(
        cmd, arg, abi.Cmd.LAUNCH_UPDATE_VMSA
    ),
    sev_cmd_id.KVM_SEV_LAUNCH_SECRET: SevKvm._launch_secret,
    sev_cmd_id.KVM_SEV_LAUNCH_MEASURE: SevKvm._launch_measure,
    sev_cmd_id.KVM_SEV_LAUNCH_FINISH: _handle_only(abi.Cmd.LAUNCH_FINISH),
    sev_cmd_id.KVM_SEV_SEND_START: SevKvm._send_start,
    sev_cmd_id.KVM_SEV_SEND_UPDATE_DATA: SevKvm._send_update,
    sev_cmd_id.KVM_SEV_SEND_UPDATE_VMSA: SevKvm._send_update_vmsa,  # pysev extension
    sev_cmd_id.KVM_SEV_SEND_FINISH: _handle_only(abi.Cmd.SEND_FINISH),
    sev_cmd_id.KVM_SEV_SEND_CANCEL: _handle_only(abi.Cmd.SEND_CANCEL),
    sev_cmd_id.KVM_SEV_RECEIVE_START: SevKvm._receive_start,
    sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_DATA: SevKvm._receive_update,
    sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_VMSA: SevKvm._receive_update_vmsa,  # pysev extension
    sev_cmd_id.KVM_SEV_RECEIVE_FINISH: _handle_only(abi.Cmd.RECEIVE_FINISH),
    sev_cmd_id.KVM_SEV_GUEST_STATUS: SevKvm._guest_status,
    sev_cmd_id.KVM_SEV_DBG_DECRYPT: SevKvm._dbg_decrypt,
    sev_cmd_id.KVM_SEV_DBG_ENCRYPT: SevKvm._dbg_encrypt,
}
_ARG_TYPES: dict[int, type[ctypes.Structure]] = {
    sev_cmd_id.KVM_SEV_LAUNCH_START: kvm_sev_launch_start,
    sev_cmd_id.KVM_SEV_LAUNCH_UPDATE_DATA: kvm_sev_launch_update_data,
    sev_cmd_id.KVM_SEV_LAUNCH_UPDATE_VMSA: kvm_sev_launch_update_data,
    sev_cmd_id.KVM_SEV_LAUNCH_SECRET: kvm_sev_launch_secret,
    sev_cmd_id.KVM_SEV_LAUNCH_MEASURE: kvm_sev_launch_measure,
    sev_cmd_id.KVM_SEV_SEND_START: kvm_sev_send_start,
    sev_cmd_id.KVM_SEV_SEND_UPDATE_DATA: kvm_sev_send_update_data,
    sev_cmd_id.KVM_SEV_SEND_UPDATE_VMSA: kvm_sev_send_update_data,
    sev_cmd_id.KVM_SEV_RECEIVE_START: kvm_sev_receive_start,
    sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_DATA: kvm_sev_receive_update_data,
    sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_VMSA: kvm_sev_receive_update_data,
    sev_cmd_id.KVM_SEV_GUEST_STATUS: kvm_sev_guest_status,
    sev_cmd_id.KVM_SEV_DBG_DECRYPT: kvm_sev_dbg,
    sev_cmd_id.KVM_SEV_DBG_ENCRYPT: kvm_sev_dbg,
}
_NAMES = {v: k for k, v in vars(sev_cmd_id).items() if k.startswith("KVM_SEV_")}
