"""Every declaration of the migration stream, shared by ``writer`` and ``reader``: constants, ``struct``
layouts, the encrypted-page record dtype, the records the reader yields, the reader's limits and its error.

The byte-level description, field by field, is ``docs/formats.md`` ("Migration stream"). Sources: QEMU
``migration/savevm.c`` (file header, sections, footer, vmdesc trailer), ``migration/ram.c``
(``save_page_header``, ``ram_save_setup``: RAM records), ``scripts/analyze-migration.py`` (what a
stream must look like to be analysed), and the SEV live-migration series v3 (Brijesh Singh 2019,
``target/i386/sev.c``, ``include/sysemu/sev.h``: the encrypted-page and encryption-bitmap records).

Deliberate keeps of the series' bytes, so that a v3 peer and our stream stay byte-compatible:

* ``RAM_SAVE_FLAG_ENCRYPTED_DATA = 0x200`` is upstream's ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (QEMU 8.x). No
  flag is left below the 1 KiB minimum target page (``migration/ram.c``: "We can't use any flag that is
  bigger than 0x200"), and the v3 series is the format we reproduce. Streams with encrypted records are
  therefore not readable by ``analyze-migration.py``; plain streams are.
* The SEND_START context is framed implicitly: it precedes the body of the *first* encrypted page only.
  The reader tracks "first encrypted page seen" per stream; the writer puts the context on the first
  encrypted page and on no other. A dedicated subtype would be cleaner but would break compatibility.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# Every size the stream uses comes in here, from its one declaration, and reader and writer take it from
# here: the page and the transport packet header (csev.packet), the SEV certificate, session and largest
# blob (the firmware ABI; SEV_FW_BLOB_MAX_SIZE bounds the reader's length fields).
from csev.packet import PACKET_HEADER_SIZE, PAGE_SIZE
from pysev.firmware.sev.abi import SESSION_SIZE, SEV_CERT_SIZE, SEV_FW_BLOB_MAX_SIZE  # noqa: F401

# --- File and section types (migration/savevm.c) -------------------------------------------------------
QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

# --- RAM section "ram", instance 0, version 4 (migration/ram.c register_savevm_live) ------------------------
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_INSTANCE = 0
RAM_SECTION_VERSION = 4

RAM_SAVE_FLAG_FULL = 0x01  # obsolete since 2009; never written, rejected on read
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
# The SEV series' flag. Same value as upstream RAM_SAVE_FLAG_MULTIFD_FLUSH: kept on purpose (module
# docstring). We never write MULTIFD_FLUSH, so within our streams the meaning is unambiguous.
RAM_SAVE_FLAG_ENCRYPTED_DATA = 0x200

# Subtypes after the ENCRYPTED_DATA header, and the bitmap's status words (the series' include/sysemu/sev.h)
RAM_SAVE_ENCRYPTED_PAGE = 1
RAM_SAVE_ENCRYPTED_BITMAP = 2
ENCRYPTED_BITMAP_CONTINUE = 1
ENCRYPTED_BITMAP_END = 2

IDSTR_MAX = 127  # analyze-migration.py reads an idstr's length with a *signed* read8
VMDESC_MAX = 10 * 1024 * 1024 - 16  # analyze-migration.py looks for the trailer in the last 10 MiB

FLAGS_MASK = PAGE_SIZE - 1  # flags live in the low bits of a RAM record's be64, below the page offset
U64_MAX = (1 << 64) - 1
KNOWN_FLAGS = (
    RAM_SAVE_FLAG_FULL
    | RAM_SAVE_FLAG_ZERO
    | RAM_SAVE_FLAG_MEM_SIZE
    | RAM_SAVE_FLAG_PAGE
    | RAM_SAVE_FLAG_EOS
    | RAM_SAVE_FLAG_CONTINUE
    | RAM_SAVE_FLAG_XBZRLE
    | RAM_SAVE_FLAG_HOOK
    | RAM_SAVE_FLAG_COMPRESS_PAGE
    | RAM_SAVE_FLAG_ENCRYPTED_DATA
)
UNSUPPORTED_FLAGS = {
    RAM_SAVE_FLAG_FULL: "FULL",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
}

# --- SEV-ES: one FULL device section per vCPU after the RAM section --------------------------------------
# QEMU puts non-iterable devices there; this one carries SEND_UPDATE_VMSA's packet of one vCPU.
VMSA_SECTION_IDSTR = "sev-es-vmsa"
VMSA_SECTION_VERSION = 1
#: The section's body, field by field: (name, vmdesc type, size). Also its vmdesc description.
VMSA_FIELDS = (
    ("hdr_len", "uint32", 4),
    ("hdr", "buffer", PACKET_HEADER_SIZE),
    ("trans_len", "uint32", 4),
    ("trans", "buffer", PAGE_SIZE),
)

# --- struct layouts ---------------------------------------------------------------------------------------
U8 = struct.Struct(">B")
BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")
FILE_HEADER = struct.Struct(">II")  # magic, version
SECTION_ID = struct.Struct(">BI")  # type, section_id
SECTION_TAIL = struct.Struct(">II")  # instance_id, version_id (after the idstr)
CONTEXT_HEAD = struct.Struct(">II")  # policy, pdh_len
BITMAP_ENTRY = struct.Struct(">IQQQ")  # status, start_gpa, npages, size
VMDESC_HEAD = struct.Struct(">BI")  # 0x06, be32 len

#: One steady-state encrypted page record (CONTINUE case): 8+4+4+52+4+4096 = 4168 bytes.
ENC_PAGE_RECORD = np.dtype(
    [
        ("header", ">u8"),  # ram offset | ENCRYPTED_DATA | CONTINUE
        ("subtype", ">u4"),  # RAM_SAVE_ENCRYPTED_PAGE
        ("hdr_len", ">u4"),  # 52
        ("hdr", "u1", (PACKET_HEADER_SIZE,)),  # SEND_UPDATE_DATA packet header
        ("trans_len", ">u4"),  # 4096
        ("trans", "u1", (PAGE_SIZE,)),  # transport ciphertext
    ]
)
ENC_PAGE_RECORD_SIZE = ENC_PAGE_RECORD.itemsize
ENC_PAGE_CONTINUE_FLAGS = RAM_SAVE_FLAG_ENCRYPTED_DATA | RAM_SAVE_FLAG_CONTINUE
#: Bytes the first-page SEND_START prefix adds: be32 policy, be32 pdh_len, pdh, be32 session_len, session.
SEV_CONTEXT_SIZE = 12 + SEV_CERT_SIZE + SESSION_SIZE


def bitmap_size(npages: int) -> int:
    """Bytes of a page-encryption bitmap for ``npages``: ALIGN(npages, 64) / 8 (whole LE u64 words)."""
    return ((npages + 63) // 64) * 8


def default_vmdesc(machine: str | None = None, devices: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The vmdesc JSON QEMU would write for a guest with the given described devices.

    With ``machine`` the 0x07 configuration section is described the way QEMU's ``vmstate_configuration``
    is (``len`` uint32 + ``name`` buffer), which is how a current analyze-migration.py expects it.
    """
    desc: dict[str, Any] = {"page_size": PAGE_SIZE, "devices": list(devices)}
    if machine is not None:
        n = len(machine.encode("ascii"))
        desc = {
            "configuration": {
                "vmsd_name": "configuration",
                "version": 1,
                "fields": [{"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": n}],
            },
            **desc,
        }
    return desc


def vmsa_vmdesc(vcpu: int) -> dict[str, Any]:
    """The vmdesc entry that lets analyze-migration.py decode the ``sev-es-vmsa`` section of ``vcpu``."""
    return {
        "name": VMSA_SECTION_IDSTR,
        "instance_id": vcpu,
        "vmsd_name": VMSA_SECTION_IDSTR,
        "version": VMSA_SECTION_VERSION,
        "fields": [{"name": name, "type": kind, "size": size} for name, kind, size in VMSA_FIELDS],
    }


# --- Records ------------------------------------------------------------------------------------------------
class SevContext(NamedTuple):
    """The SEND_START output carried before the first encrypted page."""

    policy: int
    pdh: bytes  # the *source's* PDH cert, SEV_CERT_SIZE bytes
    session: bytes  # SESSION_SIZE-byte session blob


@dataclass(frozen=True, slots=True)
class Configuration:
    machine: str


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """A START/PART/END/FULL header. PART/END get idstr/instance/version from their START."""

    kind: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class Footer:
    section_id: int


@dataclass(frozen=True, slots=True)
class Command:
    cmd: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Eof:
    pass


@dataclass(frozen=True, slots=True)
class MemSize:
    blocks: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Page:
    block: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Zero:
    block: str
    offset: int
    fill: int


@dataclass(frozen=True, slots=True)
class Eos:
    pass


@dataclass(frozen=True, slots=True, eq=False)
class EncryptedPages:
    """Consecutive RAM_SAVE_ENCRYPTED_PAGE records of ``block``, ready for one RECEIVE_UPDATE_DATA batch.

    ``offsets`` (k,) uint64 block offsets; ``hdrs`` (k, 52) and ``trans`` (k, 4096) uint8, read-only. A run
    of CONTINUE records is a view of the reader's buffer (rows one record apart), so the arrays are valid
    only until the next record is read. ``context`` is set only on the stream's first encrypted page,
    which is always alone in its ``EncryptedPages``.
    """

    block: str
    offsets: np.ndarray
    hdrs: np.ndarray
    trans: np.ndarray
    context: SevContext | None = None

    @property
    def count(self) -> int:
        return len(self.offsets)


class BitmapEntry(NamedTuple):
    start_gpa: int
    npages: int
    bitmap: bytes  # little-endian u64 words, bit set = private page


@dataclass(frozen=True, slots=True)
class EncryptedBitmap:
    block: str
    entries: tuple[BitmapEntry, ...]


@dataclass(frozen=True, slots=True)
class VmsaRecord:
    """The body of one ``sev-es-vmsa`` section: SEND_UPDATE_VMSA's packet for ``vcpu``."""

    vcpu: int
    hdr: bytes
    trans: bytes


SectionRecord = Configuration | SectionHeader | Footer | Command | Eof
RamRecord = MemSize | Page | Zero | Eos | EncryptedPages | EncryptedBitmap


class StreamError(ValueError):
    """Malformed or truncated migration stream. ``offset`` is where the offending field starts."""

    def __init__(self, message: str, *, offset: int, record: str) -> None:
        super().__init__(f"{message} [{record} at offset {offset}]")
        self.offset = offset
        self.record = record


@dataclass(frozen=True)
class ReaderLimits:
    """Caps applied before anything is allocated. Defaults fit any guest this project simulates."""

    max_ram_bytes: int = 1 << 40  # MEM_SIZE total when the destination's blocks are not given
    max_blocks: int = 1024
    max_machine_name: int = 256
    max_command_len: int = 4096
    max_vmdesc: int = VMDESC_MAX
    max_bitmap_entries: int = 32768  # > KVM_USER_MEM_SLOTS
    max_gpa: int = 1 << 52  # x86 MAXPHYADDR; start_gpa + npages·4096 must stay below
    read_chunk: int = 1 << 20  # read-ahead per underlying read


__all__ = [
    "BE16",
    "BE32",
    "BE64",
    "BITMAP_ENTRY",
    "CONTEXT_HEAD",
    "ENCRYPTED_BITMAP_CONTINUE",
    "ENCRYPTED_BITMAP_END",
    "ENC_PAGE_CONTINUE_FLAGS",
    "ENC_PAGE_RECORD",
    "ENC_PAGE_RECORD_SIZE",
    "FILE_HEADER",
    "FLAGS_MASK",
    "IDSTR_MAX",
    "KNOWN_FLAGS",
    "QEMU_VM_COMMAND",
    "QEMU_VM_CONFIGURATION",
    "QEMU_VM_EOF",
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "QEMU_VM_SECTION_END",
    "QEMU_VM_SECTION_FOOTER",
    "QEMU_VM_SECTION_FULL",
    "QEMU_VM_SECTION_PART",
    "QEMU_VM_SECTION_START",
    "QEMU_VM_SUBSECTION",
    "QEMU_VM_VMDESCRIPTION",
    "RAM_SAVE_ENCRYPTED_BITMAP",
    "RAM_SAVE_ENCRYPTED_PAGE",
    "RAM_SAVE_FLAG_COMPRESS_PAGE",
    "RAM_SAVE_FLAG_CONTINUE",
    "RAM_SAVE_FLAG_ENCRYPTED_DATA",
    "RAM_SAVE_FLAG_EOS",
    "RAM_SAVE_FLAG_FULL",
    "RAM_SAVE_FLAG_HOOK",
    "RAM_SAVE_FLAG_MEM_SIZE",
    "RAM_SAVE_FLAG_PAGE",
    "RAM_SAVE_FLAG_XBZRLE",
    "RAM_SAVE_FLAG_ZERO",
    "RAM_SECTION_IDSTR",
    "RAM_SECTION_INSTANCE",
    "RAM_SECTION_VERSION",
    "SECTION_ID",
    "SECTION_TAIL",
    "SEV_CONTEXT_SIZE",
    "U64_MAX",
    "U8",
    "UNSUPPORTED_FLAGS",
    "VMDESC_HEAD",
    "VMDESC_MAX",
    "VMSA_FIELDS",
    "VMSA_SECTION_IDSTR",
    "VMSA_SECTION_VERSION",
    "BitmapEntry",
    "Command",
    "Configuration",
    "EncryptedBitmap",
    "EncryptedPages",
    "Eof",
    "Eos",
    "Footer",
    "MemSize",
    "Page",
    "RamRecord",
    "ReaderLimits",
    "SectionHeader",
    "SectionRecord",
    "SevContext",
    "StreamError",
    "VmsaRecord",
    "Zero",
    "bitmap_size",
    "default_vmdesc",
    "vmsa_vmdesc",
]
