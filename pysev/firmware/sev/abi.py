"""The SEV command set's ABI: command ids, guest policy, platform and guest states, sizes, command buffers.

Each command buffer is declared once, as the little-endian packed layout the host writes into memory
for the PSP mailbox (Linux ``include/linux/psp-sev.h`` ``sev_data_*``; AMD ``sev_mcmd.h``; byte
offsets in ``docs/formats.md``). Address fields are host physical addresses (PADDR) into the host's
DRAM. ``pack``/``unpack`` share the layout (``pysev.firmware.mailbox.CommandBuffer``).

The sizes of every blob a command takes are here too: the certificate sizes come from
``pysev.firmware.certs`` (the format's home), page and packet-header geometry from ``csev.packet``.
"""

from __future__ import annotations

import dataclasses
import enum

from csev.packet import PACKET_FLAG_COMPRESSED, PACKET_HEADER_SIZE, PAGE_SIZE  # noqa: F401  (re-exported)
from pysev.firmware.certs import PLAT_CERTS_SIZE, SEV_CERT_SIZE  # noqa: F401  (re-exported)
from pysev.firmware.mailbox import CommandBuffer


class Cmd(enum.IntEnum):
    """PSP mailbox command ids (AMD ``sev_mcmd.h`` ``sev_mcmd_id_t``; Linux ``psp-sev.h`` ``enum sev_cmd``)."""

    INIT = 0x01
    SHUTDOWN = 0x02
    PLATFORM_RESET = 0x03
    PLATFORM_STATUS = 0x04
    PEK_GEN = 0x05
    PEK_CSR = 0x06
    PEK_CERT_IMPORT = 0x07
    PDH_CERT_EXPORT = 0x08
    PDH_GEN = 0x09
    DF_FLUSH = 0x0A
    GET_ID = 0x0C
    DECOMMISSION = 0x20
    ACTIVATE = 0x21
    DEACTIVATE = 0x22
    GUEST_STATUS = 0x23
    LAUNCH_START = 0x30
    LAUNCH_UPDATE_DATA = 0x31
    LAUNCH_UPDATE_VMSA = 0x32
    LAUNCH_MEASURE = 0x33
    LAUNCH_SECRET = 0x34
    LAUNCH_FINISH = 0x35
    SEND_START = 0x40
    SEND_UPDATE_DATA = 0x41
    SEND_UPDATE_VMSA = 0x42
    SEND_FINISH = 0x43
    SEND_CANCEL = 0x44
    RECEIVE_START = 0x50
    RECEIVE_UPDATE_DATA = 0x51
    RECEIVE_UPDATE_VMSA = 0x52
    RECEIVE_FINISH = 0x53
    DBG_DECRYPT = 0x60
    DBG_ENCRYPT = 0x61


class Policy(enum.IntFlag):
    """Guest policy bits 0–5 (AMD ``sev_guest.h`` ``SEV_GUEST_POLICY_*``). Bits 16–23/24–31 carry the
    minimum firmware API major/minor."""

    NODBG = 1 << 0
    NOKS = 1 << 1
    ES = 1 << 2
    NOSEND = 1 << 3
    DOMAIN = 1 << 4
    SEV = 1 << 5


POLICY_RESERVED_MASK = 0xFFC0  # bits 6–15 must be zero (AMD sev_guest.h SEV_GUEST_POLICY_RESERVED_MASK)


def policy_api(policy: int) -> tuple[int, int]:
    """(API_MAJOR, API_MINOR) minimum demanded by a policy."""
    return (policy >> 16) & 0xFF, (policy >> 24) & 0xFF


def make_policy(flags: int = 0, api_major: int = 0, api_minor: int = 0) -> int:
    return int(flags) | (api_major & 0xFF) << 16 | (api_minor & 0xFF) << 24


class PlatformState(enum.IntEnum):
    """Platform states (AMD ``sev_plat.h`` ``sev_state_t``)."""

    UNINIT = 0
    INIT = 1
    WORKING = 2


class GuestState(enum.IntEnum):
    """Guest states, firmware numbering (AMD ``sev_guest.h`` ``sev_guest_state_t``; GUEST_STATUS returns
    these, not the order of Linux's userspace enum)."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


# What this simulated part reports: firmware API version (PLATFORM_STATUS, stamped into PEK/PDH certs;
# 0.24 is the last legacy-SEV API of Rome/Milan firmware; the build number is ours) and the C-bit
# position of a physical address (CPUID 0x8000001F EBX, query-sev-capabilities cbitpos).
API_MAJOR, API_MINOR, BUILD = 0, 24, 15


@dataclasses.dataclass(frozen=True)
class FirmwareVersion:
    """The firmware a simulated part runs: what PLATFORM_STATUS reports and LAUNCH_MEASURE, the PEK/PDH
    certificates and the policy's API check use (AMD ``sev_mcmd.h`` ``SEV_API_MAJOR``/``SEV_API_MINOR``/
    ``SEV_BUILD_ID``, from the image's FWVersion)."""

    api_major: int
    api_minor: int
    build: int

    @property
    def api(self) -> tuple[int, int]:
        return self.api_major, self.api_minor


FW_0_24 = FirmwareVersion(API_MAJOR, API_MINOR, BUILD)  # Rome/Milan legacy-SEV API (pysev's default)
FW_1_55 = FirmwareVersion(1, 55, 25)  # Genoa 1.55.25, the firmware AMD published as source (amd/AMD-ASPFW)

# ASIDs of this simulated part (CPUID 0x8000001F ECX = max, EDX = MIN_SEV_ASID): SEV-ES guests take
# 1..MIN_SEV_ASID-1, plain SEV guests MIN_SEV_ASID..MAX_ASID (AMD sev_es.c sev_es_validate_asid).
MAX_ASID = 15
MIN_SEV_ASID = 8
GUEST_COUNT_MAX = 1024  # guest slots, handles 1..1024 (AMD sev_plat.h SEV_GUEST_COUNT_MAX)
SEV_ES_TMR_SIZE = 1 << 20  # the SEV-ES TMR INIT reserves: 1 MiB, 1 MiB-aligned (AMD df_regs.h)
CBITPOS = 51
REDUCED_PHYS_BITS = 1

SEV_FW_BLOB_MAX_SIZE = 0x4000  # largest blob KVM copies in (Linux include/linux/psp-sev.h)
SESSION_SIZE = 128  # the session blob (AMD sev_channel.h sev_session_t)
MEASURE_SIZE = 48  # MEASURE(32) ‖ MNONCE(16) (AMD sev_channel.h sev_measurement_t)
GET_ID_SIZE = 64
SCRATCH_BUF_LEN = 0x5000  # largest packet the firmware accepts (AMD sev_globals.h)
VMSA_SIZE = PAGE_SIZE  # LAUNCH_UPDATE_VMSA takes exactly one page


# In/Out per field as in psp-sev.h; handles are In/Out where the firmware assigns them. Each buffer's
# FORMAT is its layout; the annotated fields repeat its named entries, in order (checked when the class
# is defined, see CommandBuffer), so that a type checker sees the constructor and the attributes.
@dataclasses.dataclass
class InitBuf(CommandBuffer):
    # AMD sev_mcmd.h sev_mcmd_init_t: u16 flags, u8 reserved[6] (INIT checks both: INVALID_CONFIG); Linux's
    # sev_data_init declares u32 flags + u32 reserved over the same bytes.
    FORMAT = (("flags", "H"), ("mbz", "H"), ("mbz2", "I"), ("tmr_address", "Q"), ("tmr_len", "I"))
    flags: int = 0
    mbz: int = 0  # u8 reserved[6] of AMD's layout, as two fields: must be zero
    mbz2: int = 0
    tmr_address: int = 0
    tmr_len: int = 0


INIT_FLAGS_SEV_ES = 1 << 0  # AMD sev_plat.h SEV_CONFIG_ES_FLAG


@dataclasses.dataclass
class PlatformStatusBuf(CommandBuffer):
    FORMAT = (  # Out, written in place (12 bytes)
        ("api_major", "B"),
        ("api_minor", "B"),
        ("state", "B"),
        ("owner", "B"),
        ("config", "H"),
        (None, "B"),
        ("build", "B"),
        ("guest_count", "I"),
    )
    api_major: int = 0
    api_minor: int = 0
    state: int = 0
    owner: int = 0
    config: int = 0
    build: int = 0
    guest_count: int = 0


@dataclasses.dataclass
class PekCsrBuf(CommandBuffer):
    FORMAT = (("address", "Q"), ("len", "I"))  # len In/Out
    address: int = 0
    len: int = 0


@dataclasses.dataclass
class PekCertImportBuf(CommandBuffer):
    FORMAT = (
        ("pek_cert_address", "Q"),
        ("pek_cert_len", "I"),
        (None, "I"),
        ("oca_cert_address", "Q"),
        ("oca_cert_len", "I"),
    )
    pek_cert_address: int = 0
    pek_cert_len: int = 0
    oca_cert_address: int = 0
    oca_cert_len: int = 0


@dataclasses.dataclass
class PdhCertExportBuf(CommandBuffer):
    FORMAT = (
        ("pdh_cert_address", "Q"),
        ("pdh_cert_len", "I"),
        (None, "I"),  # lens In/Out
        ("cert_chain_address", "Q"),
        ("cert_chain_len", "I"),
    )
    pdh_cert_address: int = 0
    pdh_cert_len: int = 0
    cert_chain_address: int = 0
    cert_chain_len: int = 0


@dataclasses.dataclass
class GetIdBuf(CommandBuffer):
    FORMAT = (("address", "Q"), ("len", "I"))  # len In/Out
    address: int = 0
    len: int = 0


@dataclasses.dataclass
class HandleBuf(CommandBuffer):
    FORMAT = (("handle", "I"),)
    handle: int = 0


@dataclasses.dataclass
class ActivateBuf(CommandBuffer):
    FORMAT = (("handle", "I"), ("asid", "I"))
    handle: int = 0
    asid: int = 0


@dataclasses.dataclass
class GuestStatusBuf(CommandBuffer):
    FORMAT = (("handle", "I"), ("policy", "I"), ("asid", "I"), ("state", "B"))  # policy..state Out
    handle: int = 0
    policy: int = 0
    asid: int = 0
    state: int = 0


@dataclasses.dataclass
class LaunchStartBuf(CommandBuffer):
    FORMAT = (
        ("handle", "I"),
        ("policy", "I"),
        ("dh_cert_address", "Q"),
        ("dh_cert_len", "I"),
        (None, "I"),
        ("session_address", "Q"),
        ("session_len", "I"),
    )
    handle: int = 0
    policy: int = 0
    dh_cert_address: int = 0
    dh_cert_len: int = 0
    session_address: int = 0
    session_len: int = 0


@dataclasses.dataclass
class LaunchUpdateBuf(CommandBuffer):
    FORMAT = (("handle", "I"), (None, "I"), ("address", "Q"), ("len", "I"))  # _DATA and _VMSA
    handle: int = 0
    address: int = 0
    len: int = 0


@dataclasses.dataclass
class LaunchMeasureBuf(CommandBuffer):
    FORMAT = (("handle", "I"), (None, "I"), ("address", "Q"), ("len", "I"))  # len In/Out
    handle: int = 0
    address: int = 0
    len: int = 0


@dataclasses.dataclass
class TransportBuf(CommandBuffer):
    FORMAT = (  # LAUNCH_SECRET, SEND_UPDATE_*, RECEIVE_UPDATE_* (0x34 bytes)
        ("handle", "I"),
        (None, "I"),
        ("hdr_address", "Q"),
        ("hdr_len", "I"),
        (None, "I"),
        ("guest_address", "Q"),
        ("guest_len", "I"),
        (None, "I"),
        ("trans_address", "Q"),
        ("trans_len", "I"),
    )
    handle: int = 0
    hdr_address: int = 0
    hdr_len: int = 0
    guest_address: int = 0
    guest_len: int = 0
    trans_address: int = 0
    trans_len: int = 0


@dataclasses.dataclass
class SendStartBuf(CommandBuffer):
    FORMAT = (
        ("handle", "I"),
        ("policy", "I"),
        ("pdh_cert_address", "Q"),
        ("pdh_cert_len", "I"),
        (None, "I"),
        ("plat_certs_address", "Q"),
        ("plat_certs_len", "I"),
        (None, "I"),
        ("amd_certs_address", "Q"),
        ("amd_certs_len", "I"),
        (None, "I"),
        ("session_address", "Q"),
        ("session_len", "I"),
    )
    handle: int = 0
    policy: int = 0
    pdh_cert_address: int = 0
    pdh_cert_len: int = 0
    plat_certs_address: int = 0
    plat_certs_len: int = 0
    amd_certs_address: int = 0
    amd_certs_len: int = 0
    session_address: int = 0
    session_len: int = 0


@dataclasses.dataclass
class ReceiveStartBuf(CommandBuffer):
    FORMAT = (
        ("handle", "I"),
        ("policy", "I"),
        ("pdh_cert_address", "Q"),
        ("pdh_cert_len", "I"),
        (None, "I"),
        ("session_address", "Q"),
        ("session_len", "I"),
    )
    handle: int = 0
    policy: int = 0
    pdh_cert_address: int = 0
    pdh_cert_len: int = 0
    session_address: int = 0
    session_len: int = 0


@dataclasses.dataclass
class DbgBuf(CommandBuffer):
    FORMAT = (("handle", "I"), (None, "I"), ("src_addr", "Q"), ("dst_addr", "Q"), ("len", "I"))
    handle: int = 0
    src_addr: int = 0
    dst_addr: int = 0
    len: int = 0


BUFFERS: dict[Cmd, type[CommandBuffer] | None] = {
    Cmd.INIT: InitBuf,
    Cmd.SHUTDOWN: None,
    Cmd.PLATFORM_RESET: None,
    Cmd.PLATFORM_STATUS: PlatformStatusBuf,
    Cmd.PEK_GEN: None,
    Cmd.PEK_CSR: PekCsrBuf,
    Cmd.PEK_CERT_IMPORT: PekCertImportBuf,
    Cmd.PDH_CERT_EXPORT: PdhCertExportBuf,
    Cmd.PDH_GEN: None,
    Cmd.DF_FLUSH: None,
    Cmd.GET_ID: GetIdBuf,
    Cmd.DECOMMISSION: HandleBuf,
    Cmd.ACTIVATE: ActivateBuf,
    Cmd.DEACTIVATE: HandleBuf,
    Cmd.GUEST_STATUS: GuestStatusBuf,
    Cmd.LAUNCH_START: LaunchStartBuf,
    Cmd.LAUNCH_UPDATE_DATA: LaunchUpdateBuf,
    Cmd.LAUNCH_UPDATE_VMSA: LaunchUpdateBuf,
    Cmd.LAUNCH_MEASURE: LaunchMeasureBuf,
    Cmd.LAUNCH_SECRET: TransportBuf,
    Cmd.LAUNCH_FINISH: HandleBuf,
    Cmd.SEND_START: SendStartBuf,
    Cmd.SEND_UPDATE_DATA: TransportBuf,
    Cmd.SEND_UPDATE_VMSA: TransportBuf,
    Cmd.SEND_FINISH: HandleBuf,
    Cmd.SEND_CANCEL: HandleBuf,
    Cmd.RECEIVE_START: ReceiveStartBuf,
    Cmd.RECEIVE_UPDATE_DATA: TransportBuf,
    Cmd.RECEIVE_UPDATE_VMSA: TransportBuf,
    Cmd.RECEIVE_FINISH: HandleBuf,
    Cmd.DBG_DECRYPT: DbgBuf,
    Cmd.DBG_ENCRYPT: DbgBuf,
}
