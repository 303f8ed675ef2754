"""QEMU migration stream format (``QEMU_VM_FILE_MAGIC``, version 3) with the SEV v3 series' RAM records.

Bytes only: no firmware calls, no crypto. The writer is a QEMUFile-like buffered sink with a sticky first
error (qemu-migration.md §3, style-anchors.md convention 12); the reader treats every byte as hostile
(house-style.md "Readers treat input as hostile", convention 11) and names the record and the byte offset
in every error.

Wire layout (all big-endian; qemu-migration.md §1.6, §3.1–3.2):

* file: ``be32 magic, be32 version, [0x07 be32 len machine] sections… 0x00 [0x06 be32 len JSON]``
* START/FULL: ``u8 type, be32 id, u8 len idstr, be32 instance, be32 version``; PART/END: ``u8 type, be32 id``;
  footer ``0x7e be32 id``.
* RAM record: ``be64 offset|flags`` then ``u8 len idstr`` unless CONTINUE (QEMU ``save_page_header``).
* SEV page: header with ``ENCRYPTED_DATA``, ``be32 1``, [first page only: ``be32 policy, be32 pdh_len, pdh,
  be32 session_len, session``], ``be32 hdr_len, hdr, be32 trans_len, trans``.
* SEV bitmap: header with ``ENCRYPTED_DATA`` (offset 0), ``be32 2``, ``{be32 1, be64 start_gpa, be64 npages,
  be64 size, bitmap[size]}*``, ``be32 2``.

Deliberate keeps of the seed series' bytes (so a v3 peer and our stream stay byte-compatible):

* ``RAM_SAVE_FLAG_ENCRYPTED_DATA = 0x200`` collides with upstream ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (QEMU ≥ 8.x,
  §0.2/§3.2). There is no free flag left below the 1 KiB minimum target page (Dave Gilbert: "our very last
  usable flag"), and the v3 series is the format we reproduce. Consequence: streams with encrypted records
  are not readable by upstream ``analyze-migration.py``; plain streams are (§3.4).
* The SEND_START context is framed implicitly: it precedes the body of the *first* encrypted page only
  (§1.6). The reader therefore tracks "first encrypted page seen" per stream; the writer enforces that the
  first encrypted page carries the context and no later one does. A dedicated subtype would be cleaner
  (§2.6) but would break byte compatibility.

Gaps of the series closed by the reader (§1.8): ``trans_len`` must equal the page size; bitmap ``start_gpa``
page-aligned; ``npages`` bounded by the RAM size and ``start + npages·4096`` bounded (no overflow); bitmap status
words exactly CONTINUE or END. ``hdr_len`` must be exactly 52: the firmware accepts ≥ 52 but every sender
(QEMU queries the length and gets 52) writes 52, so anything else is malformed. ``policy`` is passed through:
RECEIVE_START is the authority on it (reserved bits, API version, POLICY_MAC; sev-api.md §2).
"""
from __future__ import annotations

import io
import json
import logging
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, Union

import numpy as np

log = logging.getLogger(__name__)

# --- File and section constants (migration/savevm.c; qemu-migration.md §3.1) -------------------------
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

# --- RAM section "ram", instance 0, version 4 (migration/ram.c; §3.2) -----------------------------------
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
# SEV v3 series (§1.6). Same value as upstream RAM_SAVE_FLAG_MULTIFD_FLUSH (0x200): kept on purpose, see
# the module docstring. We never write MULTIFD_FLUSH, so within our streams the meaning is unambiguous.
RAM_SAVE_FLAG_ENCRYPTED_DATA = 0x200

# SEV subtypes after the ENCRYPTED_DATA header (include/sysemu/sev.h of the series)
RAM_SAVE_ENCRYPTED_PAGE = 1
RAM_SAVE_ENCRYPTED_BITMAP = 2
ENCRYPTED_BITMAP_CONTINUE = 1
ENCRYPTED_BITMAP_END = 2

SEV_FW_BLOB_MAX_SIZE = 0x4000
TARGET_PAGE_SIZE = 4096
TARGET_PAGE_BITS = 12
SEV_PACKET_HEADER_SIZE = 52  # flags(4) + iv(16) + mac(32), sev-api.md §4
SEV_PDH_CERT_SIZE = 2084  # RECEIVE_START requires exactly this (sev-api.md §2)
SEV_SESSION_SIZE = 128  # RECEIVE_START requires exactly this (sev-api.md §2, §3)
IDSTR_MAX = 127  # analyze-migration.py reads the length with a *signed* read8 (§3.3 item 5)

_FLAGS_MASK = TARGET_PAGE_SIZE - 1
_U64_MAX = (1 << 64) - 1
_KNOWN_FLAGS = (
    RAM_SAVE_FLAG_FULL | RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_MEM_SIZE | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_EOS
    | RAM_SAVE_FLAG_CONTINUE | RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_HOOK | RAM_SAVE_FLAG_COMPRESS_PAGE
    | RAM_SAVE_FLAG_ENCRYPTED_DATA
)
_UNSUPPORTED_FLAGS = {
    RAM_SAVE_FLAG_FULL: "FULL", RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK", RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
}

# --- Layouts, declared once and shared by writer and reader ----------------------------------------------
_U8 = struct.Struct(">B")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_FILE_HEADER = struct.Struct(">II")  # magic, version
_SECTION_ID = struct.Struct(">BI")  # type, section_id
_SECTION_TAIL = struct.Struct(">II")  # instance_id, version_id (after the idstr)
_ENC_HEAD = struct.Struct(">QII")  # page header (CONTINUE), subtype, hdr_len
_CONTEXT_HEAD = struct.Struct(">II")  # policy, pdh_len
_BITMAP_ENTRY = struct.Struct(">IQQQ")  # status, start_gpa, npages, size
_VMDESC_HEAD = struct.Struct(">BI")  # 0x06, be32 len

#: One steady-state encrypted page record (CONTINUE case): 8+4+4+52+4+4096 = 4168 bytes (§1.6).
ENC_PAGE_RECORD = np.dtype([
    ("header", ">u8"),  # ram offset | ENCRYPTED_DATA | CONTINUE
    ("subtype", ">u4"),  # RAM_SAVE_ENCRYPTED_PAGE
    ("hdr_len", ">u4"),  # 52
    ("hdr", "u1", (SEV_PACKET_HEADER_SIZE,)),  # SEND_UPDATE_DATA packet header
    ("trans_len", ">u4"),  # 4096
    ("trans", "u1", (TARGET_PAGE_SIZE,)),  # transport ciphertext
])
ENC_PAGE_RECORD_SIZE = ENC_PAGE_RECORD.itemsize
ENC_PAGE_CONTINUE_FLAGS = RAM_SAVE_FLAG_ENCRYPTED_DATA | RAM_SAVE_FLAG_CONTINUE
#: Bytes the first-page SEND_START prefix adds: be32 policy, be32 pdh_len, pdh, be32 session_len, session.
SEV_CONTEXT_SIZE = 12 + SEV_PDH_CERT_SIZE + SEV_SESSION_SIZE
VMDESC_MAX = 10 * 1024 * 1024 - 16  # analyze-migration.py looks for the trailer in the last 10 MiB


def bitmap_size(npages: int) -> int:
    """Bytes of a page-encryption bitmap for ``npages``: ALIGN(npages, 64) / 8 (whole LE u64 words)."""
    return ((npages + 63) // 64) * 8


def default_vmdesc(machine: str | None = None, devices: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The vmdesc JSON QEMU would write for a guest with no described devices.

    With ``machine`` the 0x07 configuration section is described the way QEMU's ``vmstate_configuration``
    is (``len`` uint32 + ``name`` buffer), which is how a current analyze-migration.py expects it.
    """
    desc: dict[str, Any] = {"page_size": TARGET_PAGE_SIZE, "devices": list(devices)}
    if machine is not None:
        n = len(machine.encode("ascii"))
        desc = {"configuration": {"vmsd_name": "configuration", "version": 1, "fields": [
            {"name": "len", "type": "uint32", "size": 4},
            {"name": "name", "type": "buffer", "size": n}]}, **desc}
    return desc


# --- Records ---------------------------------------------------------------------------------------------
class SevContext(NamedTuple):
    """The SEND_START output carried before the first encrypted page (sev-api.md §6)."""

    policy: int
    pdh: bytes  # the *source's* PDH cert, 2084 bytes
    session: bytes  # 128-byte session blob


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


@dataclass(frozen=True, slots=True)
class EncryptedPage:
    block: str
    offset: int
    context: SevContext | None
    hdr: bytes
    trans: bytes


class BitmapEntry(NamedTuple):
    start_gpa: int
    npages: int
    bitmap: bytes  # little-endian u64 words, bit set = private page


@dataclass(frozen=True, slots=True)
class EncryptedBitmap:
    block: str
    entries: tuple[BitmapEntry, ...]


class EncryptedBatch:
    """Preallocated arrays the reader fills with consecutive encrypted pages of one block.

    ``offsets`` (k,) uint64 block offsets, ``hdrs`` (k, 52) and ``trans`` (k, 4096) uint8, C-contiguous, so a
    whole batch can go to RECEIVE_UPDATE_DATA in one call. The arrays are reused batch after batch.
    """

    def __init__(self, capacity: int = 256, *, hdrs: np.ndarray | None = None, trans: np.ndarray | None = None,
                 offsets: np.ndarray | None = None, zero_copy: bool = False) -> None:
        """``zero_copy=True``: runs of CONTINUE records already in the reader's buffer are handed out as
        views of the wire layout (``hdrs``/``trans`` with a row stride of one record) instead of copies."""
        self.zero_copy = zero_copy
        if capacity <= 0:
            raise ValueError(f"batch capacity must be positive, got {capacity}")
        self.hdrs = _checked_rows(hdrs, capacity, SEV_PACKET_HEADER_SIZE, "hdrs")
        self.trans = _checked_rows(trans, capacity, TARGET_PAGE_SIZE, "trans")
        if offsets is None:
            offsets = np.empty(capacity, dtype=np.uint64)
        if offsets.shape != (capacity,) or offsets.dtype != np.uint64:
            raise ValueError(f"offsets must be uint64 of shape ({capacity},)")
        self.offsets = offsets
        self.capacity = capacity


def _checked_rows(arr: np.ndarray | None, k: int, width: int, name: str) -> np.ndarray:
    if arr is None:
        return np.empty((k, width), dtype=np.uint8)
    if arr.shape != (k, width) or arr.dtype != np.uint8 or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} must be a writable C-contiguous uint8 array of shape ({k}, {width})")
    return arr


@dataclass(frozen=True, slots=True)
class EncryptedPages:
    """``count`` encrypted pages of ``block`` in ``batch`` (views below). Valid until the next record is read."""

    block: str
    count: int
    batch: EncryptedBatch
    context: SevContext | None  # only on the batch holding the stream's first encrypted page (index 0)
    records: np.ndarray | None = None  # zero-copy: the ENC_PAGE_RECORDs in the reader's buffer

    @property
    def offsets(self) -> np.ndarray:
        if self.records is not None:
            return self.records["header"] & np.uint64(~_FLAGS_MASK & _U64_MAX)
        return self.batch.offsets[:self.count]

    @property
    def hdrs(self) -> np.ndarray:
        return self.records["hdr"] if self.records is not None else self.batch.hdrs[:self.count]

    @property
    def trans(self) -> np.ndarray:
        return self.records["trans"] if self.records is not None else self.batch.trans[:self.count]


SectionRecord = Union[Configuration, SectionHeader, Footer, Command, Eof]
RamRecord = Union[MemSize, Page, Zero, Eos, EncryptedPage, EncryptedBitmap, EncryptedPages]


class StreamError(ValueError):
    """Malformed or truncated migration stream. ``offset`` is where the offending field starts."""

    def __init__(self, message: str, *, offset: int, record: str) -> None:
        super().__init__(f"{message} [{record} at offset {offset}]")
        self.offset = offset
        self.record = record


def _encode_idstr(idstr: str, what: str) -> bytes:
    raw = idstr.encode("utf-8")
    if not raw or len(raw) > IDSTR_MAX or b"\0" in raw:
        raise ValueError(f"{what} idstr must be 1..{IDSTR_MAX} bytes without NUL, got {idstr!r}")
    return raw


def _as_bytes_view(data: Any) -> memoryview:
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return mv.cast("B") if (mv.ndim != 1 or mv.format != "B") else mv


# =========================================================================================================
class StreamWriter:
    """QEMUFile-like big-endian writer with a 64 KiB buffer and a sticky first error.

    After the first I/O failure every ``put_*`` is a no-op and ``check()``/``close()`` raise that error
    (QEMU ``qemu_file_set_error``). Argument errors (bad idstr, unaligned offset…) raise ``ValueError`` at
    once: they are bugs of the caller, not I/O. ``transferred`` counts bytes accepted (buffered or written).
    The underlying file object is not closed.
    """

    BUFFER_SIZE = 64 * 1024
    _SCRATCH_RECORDS = 256  # encrypted-page batch chunk written straight from a scratch array (~1 MiB)

    def __init__(self, fileobj: BinaryIO, *, buffer_size: int = BUFFER_SIZE, continuation: bool = False) -> None:
        """``continuation=True``: a page channel continuing a main stream that already carried the
        SEND_START context, so no record of this stream carries it."""
        if buffer_size < 4096:
            raise ValueError("buffer_size must be at least 4096")
        self._f = fileobj
        self._cap = buffer_size
        self._buf = bytearray(buffer_size)
        self._mv = memoryview(self._buf)
        self._used = 0
        self._transferred = 0
        self.last_error: BaseException | None = None
        self._closed = False
        self._last_block: str | None = None  # QEMU last_sent_block
        self._idstr: dict[str, bytes] = {}
        self._block_sizes: dict[str, int] = {}
        self._context_sent = continuation
        self._scratch: np.ndarray | None = None

    # -- byte level -------------------------------------------------------------------------------------
    @property
    def transferred(self) -> int:
        return self._transferred

    def _write_all(self, data: memoryview) -> None:
        while len(data):
            n = self._f.write(data)
            if n is None:
                raise BlockingIOError("non-blocking file object would block")
            data = data[n:]

    def _flush_buffer(self) -> None:
        used, self._used = self._used, 0
        if used and self.last_error is None:
            try:
                self._write_all(self._mv[:used])
            except OSError as e:
                self._set_error(e)

    def _set_error(self, e: BaseException) -> None:
        if self.last_error is None:
            log.debug("migration stream write failed after %d bytes: %s", self._transferred, e)
            self.last_error = e

    def _room(self, n: int) -> bool:
        """Make ``n`` contiguous bytes free in the buffer; False when the stream has failed."""
        if self.last_error is not None:
            return False
        if self._used + n > self._cap:
            self._flush_buffer()
            if self.last_error is not None:
                return False
        return True

    def _pack(self, st: struct.Struct, *values: int) -> None:
        if self._room(st.size):
            st.pack_into(self._buf, self._used, *values)
            self._used += st.size
            self._transferred += st.size

    def put_be8(self, v: int) -> None:
        self._pack(_U8, v)

    def put_be16(self, v: int) -> None:
        self._pack(_BE16, v)

    def put_be32(self, v: int) -> None:
        self._pack(_BE32, v)

    def put_be64(self, v: int) -> None:
        self._pack(_BE64, v)

    def put_bytes(self, data: Any) -> None:
        """Append a bytes-like object: copied once into the buffer, or written straight when large."""
        if self.last_error is not None:
            return
        mv = _as_bytes_view(data)
        n = len(mv)
        if n <= self._cap - self._used:
            self._mv[self._used:self._used + n] = mv
            self._used += n
        elif n < self._cap:
            self._flush_buffer()
            if self.last_error is not None:
                return
            self._mv[:n] = mv
            self._used = n
        else:
            self._flush_buffer()
            if self.last_error is not None:
                return
            try:
                self._write_all(mv)
            except OSError as e:
                self._set_error(e)
                return
        self._transferred += n

    def flush(self) -> None:
        """Hand buffered bytes to the file object (and flush it, if it buffers)."""
        self._flush_buffer()
        if self.last_error is None and hasattr(self._f, "flush"):
            try:
                self._f.flush()
            except OSError as e:
                self._set_error(e)

    def check(self) -> None:
        """Raise the sticky error, if any."""
        if self.last_error is not None:
            raise self.last_error

    def close(self) -> None:
        """Flush and raise the first error of the stream's life, if there was one."""
        if not self._closed:
            self.flush()
            self._closed = True
        self.check()

    # -- file structure ---------------------------------------------------------------------------------
    def write_header(self, machine: str | None = "pc-q35-sev") -> None:
        """Magic, version and (unless ``machine`` is None) the 0x07 configuration section."""
        self._pack(_FILE_HEADER, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)
        if machine is not None:
            raw = machine.encode("ascii")
            if not raw or len(raw) > 255 or b"\0" in raw:
                raise ValueError(f"machine name must be 1..255 ASCII bytes without NUL, got {machine!r}")
            self.put_be8(QEMU_VM_CONFIGURATION)
            self.put_be32(len(raw))
            self.put_bytes(raw)

    def _section_with_idstr(self, kind: int, section_id: int, idstr: str, instance_id: int,
                            version_id: int) -> None:
        raw = _encode_idstr(idstr, "section")
        self._pack(_SECTION_ID, kind, section_id)
        self.put_be8(len(raw))
        self.put_bytes(raw)
        self._pack(_SECTION_TAIL, instance_id, version_id)

    def section_start(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> None:
        self._section_with_idstr(QEMU_VM_SECTION_START, section_id, idstr, instance_id, version_id)

    def section_full(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> None:
        self._section_with_idstr(QEMU_VM_SECTION_FULL, section_id, idstr, instance_id, version_id)

    def section_part(self, section_id: int) -> None:
        self._pack(_SECTION_ID, QEMU_VM_SECTION_PART, section_id)

    def section_end(self, section_id: int) -> None:
        self._pack(_SECTION_ID, QEMU_VM_SECTION_END, section_id)

    def section_footer(self, section_id: int) -> None:
        self._pack(_SECTION_ID, QEMU_VM_SECTION_FOOTER, section_id)

    def write_eof(self) -> None:
        self.put_be8(QEMU_VM_EOF)

    def write_vmdesc(self, desc: Mapping[str, Any]) -> None:
        """0x06, be32 len, JSON: the analysis-only trailer after EOF (qemu-migration.md §3.3 item 1).

        analyze-migration.py finds the JSON as "the first ``{`` after the last NUL", so the JSON must contain
        no NUL (``json.dumps`` escapes U+0000) and the length bytes after their last zero byte must not
        contain 0x7b; when they would (len 0x17b, 0x27b, …), the JSON is padded with spaces.
        """
        text = json.dumps(desc, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        if not text.startswith(b"{"):
            raise ValueError("vmdesc must be a JSON object")
        while _vmdesc_len_ambiguous(len(text)):
            text += b" "
        if len(text) > VMDESC_MAX:
            raise ValueError(f"vmdesc JSON of {len(text)} bytes exceeds {VMDESC_MAX}")
        self._pack(_VMDESC_HEAD, QEMU_VM_VMDESCRIPTION, len(text))
        self.put_bytes(text)

    # -- RAM records --------------------------------------------------------------------------------------
    def _raw_idstr(self, block: str) -> bytes:
        raw = self._idstr.get(block)
        if raw is None:
            raise ValueError(f"RAM block {block!r} was not announced with ram_mem_size()")
        return raw

    def ram_page_header(self, block: str, offset: int, flags: int) -> int:
        """QEMU ``save_page_header``: CONTINUE and no idstr when ``block`` was the last one sent.

        Returns the header's size in bytes.
        """
        raw = self._raw_idstr(block)
        if offset & _FLAGS_MASK or flags & ~_FLAGS_MASK or flags & RAM_SAVE_FLAG_CONTINUE:
            raise ValueError(f"bad RAM record header: offset {offset:#x} flags {flags:#x}")
        if offset + TARGET_PAGE_SIZE > self._block_sizes[block]:
            raise ValueError(f"offset {offset:#x} outside RAM block {block!r}")
        if block == self._last_block:
            self._pack(_BE64, offset | flags | RAM_SAVE_FLAG_CONTINUE)
            return 8
        self._pack(_BE64, offset | flags)
        self.put_be8(len(raw))
        self.put_bytes(raw)
        self._last_block = block
        return 9 + len(raw)

    def ram_mem_size(self, blocks: Iterable[tuple[str, int]]) -> None:
        """``be64 total|MEM_SIZE`` then ``u8 len, idstr, be64 used_length`` per block (ram_save_setup)."""
        blocks = list(blocks)
        raws = []
        for idstr, size in blocks:
            raw = _encode_idstr(idstr, "RAM block")
            if size <= 0 or size & _FLAGS_MASK:
                raise ValueError(f"RAM block {idstr!r} size {size:#x} must be a positive multiple of the page size")
            if idstr in self._idstr:
                raise ValueError(f"RAM block {idstr!r} announced twice")
            self._idstr[idstr] = raw
            self._block_sizes[idstr] = size
            raws.append(raw)
        self._pack(_BE64, sum(s for _, s in blocks) | RAM_SAVE_FLAG_MEM_SIZE)
        for raw, (_, size) in zip(raws, blocks):
            self.put_be8(len(raw))
            self.put_bytes(raw)
            self.put_be64(size)

    def ram_page(self, block: str, offset: int, page: Any) -> None:
        mv = _as_bytes_view(page)
        if len(mv) != TARGET_PAGE_SIZE:
            raise ValueError(f"page must be {TARGET_PAGE_SIZE} bytes, got {len(mv)}")
        self.ram_page_header(block, offset, RAM_SAVE_FLAG_PAGE)
        self.put_bytes(mv)

    def ram_zero_page(self, block: str, offset: int) -> None:
        self.ram_page_header(block, offset, RAM_SAVE_FLAG_ZERO)
        self.put_be8(0)

    def ram_eos(self) -> None:
        self.put_be64(RAM_SAVE_FLAG_EOS)

    # -- SEV records (qemu-migration.md §1.6) ---------------------------------------------------------
    def _context_rule(self, context: SevContext | tuple[int, bytes, bytes] | None) -> None:
        if context is None and not self._context_sent:
            raise ValueError("the first encrypted page must carry the SEND_START context (seed framing)")
        if context is not None and self._context_sent:
            raise ValueError("the SEND_START context goes with the first encrypted page only")

    def _put_context(self, context: SevContext | tuple[int, bytes, bytes]) -> None:
        policy, pdh, session = context
        pdh_v, ses_v = _as_bytes_view(pdh), _as_bytes_view(session)
        if len(pdh_v) != SEV_PDH_CERT_SIZE or len(ses_v) != SEV_SESSION_SIZE:
            raise ValueError(f"context needs a {SEV_PDH_CERT_SIZE}-byte PDH and a {SEV_SESSION_SIZE}-byte session")
        self._pack(_CONTEXT_HEAD, policy, len(pdh_v))
        self.put_bytes(pdh_v)
        self.put_be32(len(ses_v))
        self.put_bytes(ses_v)
        self._context_sent = True

    def sev_encrypted_page(self, block: str, offset: int, hdr: Any, trans: Any,
                           context: SevContext | tuple[int, bytes, bytes] | None = None) -> None:
        """One RAM_SAVE_ENCRYPTED_PAGE record; ``context`` (SEND_START output) only on the first one."""
        hdr_v, trans_v = _as_bytes_view(hdr), _as_bytes_view(trans)
        if len(hdr_v) != SEV_PACKET_HEADER_SIZE or len(trans_v) != TARGET_PAGE_SIZE:
            raise ValueError(f"hdr must be {SEV_PACKET_HEADER_SIZE} and trans {TARGET_PAGE_SIZE} bytes")
        self._context_rule(context)
        self._check_offset(block, offset)
        if context is None and block == self._last_block:
            self._pack(_ENC_HEAD, offset | ENC_PAGE_CONTINUE_FLAGS, RAM_SAVE_ENCRYPTED_PAGE, SEV_PACKET_HEADER_SIZE)
        else:
            self.ram_page_header(block, offset, RAM_SAVE_FLAG_ENCRYPTED_DATA)
            self.put_be32(RAM_SAVE_ENCRYPTED_PAGE)
            if context is not None:
                self._put_context(context)
            self.put_be32(SEV_PACKET_HEADER_SIZE)
        self.put_bytes(hdr_v)
        self.put_be32(TARGET_PAGE_SIZE)
        self.put_bytes(trans_v)

    def _check_offset(self, block: str, offset: int) -> None:
        size = self._block_sizes.get(block)
        if size is None:
            raise ValueError(f"RAM block {block!r} was not announced with ram_mem_size()")
        if offset < 0 or offset & _FLAGS_MASK or offset + TARGET_PAGE_SIZE > size:
            raise ValueError(f"offset {offset:#x} is not a page inside RAM block {block!r}")

    def sev_encrypted_pages(self, block: str, offsets: Any, hdrs: np.ndarray, trans: np.ndarray,
                            context: SevContext | tuple[int, bytes, bytes] | None = None) -> None:
        """Many RAM_SAVE_ENCRYPTED_PAGE records in one pass; bytes identical to per-page calls.

        Records after the first are fixed-size CONTINUE records (``ENC_PAGE_RECORD``) built by numpy field
        assignment, either inside the write buffer or in a scratch array that is written straight to the
        file: each page is copied exactly once.
        """
        offs = np.ascontiguousarray(offsets, dtype=np.uint64)
        k = offs.shape[0] if offs.ndim == 1 else -1
        if (k < 0 or hdrs.shape != (k, SEV_PACKET_HEADER_SIZE) or trans.shape != (k, TARGET_PAGE_SIZE)
                or hdrs.dtype != np.uint8 or trans.dtype != np.uint8):
            raise ValueError("need offsets (k,), hdrs (k, 52) uint8 and trans (k, 4096) uint8")
        if k == 0:
            return
        self._check_offsets(block, offs)
        self._context_rule(context)
        start = 0
        if context is not None or block != self._last_block:
            self.sev_encrypted_page(block, int(offs[0]), hdrs[0], trans[0], context)
            start = 1
        while start < k and self.last_error is None:
            free = (self._cap - self._used) // ENC_PAGE_RECORD_SIZE
            if free:
                m = min(free, k - start)
                rec = np.frombuffer(self._buf, ENC_PAGE_RECORD, m, self._used)
                self._fill_records(rec, offs, hdrs, trans, start)
                del rec
                self._used += m * ENC_PAGE_RECORD_SIZE
                self._transferred += m * ENC_PAGE_RECORD_SIZE
            else:
                self._flush_buffer()
                m = min(self._SCRATCH_RECORDS, k - start)
                if m * ENC_PAGE_RECORD_SIZE < self._cap:
                    continue  # fits the (now empty) buffer
                if self._scratch is None:
                    self._scratch = np.empty(self._SCRATCH_RECORDS, ENC_PAGE_RECORD)
                rec = self._scratch[:m]
                self._fill_records(rec, offs, hdrs, trans, start)
                self.put_bytes(rec.view(np.uint8))
            start += m

    def continues(self, block: str) -> bool:
        """True when the next encrypted-page record of ``block`` can be a CONTINUE record: ``block`` was
        sent last and the SEND_START context has gone out."""
        return block == self._last_block and self._context_sent

    def _check_offsets(self, block: str, offs: np.ndarray) -> None:
        size = self._block_sizes.get(block)
        if size is None:
            raise ValueError(f"RAM block {block!r} was not announced with ram_mem_size()")
        if offs.size and ((offs & np.uint64(_FLAGS_MASK)).any() or int(offs.max()) + TARGET_PAGE_SIZE > size):
            raise ValueError(f"offsets must be pages inside RAM block {block!r}")

    @staticmethod
    def _fill_records(rec: np.ndarray, offs: np.ndarray, hdrs: np.ndarray, trans: np.ndarray, start: int) -> None:
        m = rec.shape[0]
        rec["header"] = offs[start:start + m] | np.uint64(ENC_PAGE_CONTINUE_FLAGS)
        rec["subtype"] = RAM_SAVE_ENCRYPTED_PAGE
        rec["hdr_len"] = SEV_PACKET_HEADER_SIZE
        rec["hdr"] = hdrs[start:start + m]
        rec["trans_len"] = TARGET_PAGE_SIZE
        rec["trans"] = trans[start:start + m]

    def sev_encrypted_bitmap(self, block: str, entries: Iterable[tuple[int, int, Any]]) -> None:
        """The RAM_SAVE_ENCRYPTED_BITMAP record: header (offset 0), ``be32 2``, entries, ``be32 END``."""
        checked = []
        for start_gpa, npages, bitmap in entries:
            mv = _as_bytes_view(bitmap)
            if start_gpa < 0 or start_gpa & _FLAGS_MASK or npages < 0 or start_gpa + npages * TARGET_PAGE_SIZE > _U64_MAX:
                raise ValueError(f"bad bitmap range start_gpa={start_gpa:#x} npages={npages}")
            if len(mv) != bitmap_size(npages):
                raise ValueError(f"bitmap of {npages} pages must be {bitmap_size(npages)} bytes, got {len(mv)}")
            checked.append((start_gpa, npages, mv))
        self.ram_page_header(block, 0, RAM_SAVE_FLAG_ENCRYPTED_DATA)
        self.put_be32(RAM_SAVE_ENCRYPTED_BITMAP)
        for start_gpa, npages, mv in checked:
            self._pack(_BITMAP_ENTRY, ENCRYPTED_BITMAP_CONTINUE, start_gpa, npages, len(mv))
            self.put_bytes(mv)
        self.put_be32(ENCRYPTED_BITMAP_END)


class RecordRing:
    """CONTINUE encrypted-page records (``ENC_PAGE_RECORD``) reused slice after slice by a producer that
    writes their ``hdr``/``trans`` fields in place: the SEND_UPDATE_DATA pipeline puts its packets straight
    into the wire layout, and each slice goes to the stream while it is still in cache, so a page is
    written once, by the pipeline, and read once, by the socket's copy.

        if ring.begin(block, offsets):      # False: the next record must name the block (or carry the context)
            pipeline(hdr=ring.hdr, trans=ring.trans, on_slice=ring.put)
    """

    def __init__(self, writer: StreamWriter, n: int) -> None:
        if n < 1:
            raise ValueError("a record ring needs at least one record")
        self._w = writer
        self.records = np.empty(n, ENC_PAGE_RECORD)
        self.records["subtype"] = RAM_SAVE_ENCRYPTED_PAGE
        self.records["hdr_len"] = SEV_PACKET_HEADER_SIZE
        self.records["trans_len"] = TARGET_PAGE_SIZE
        self.hdr = self.records["hdr"]          # (n, 52) rows for the packet headers
        self.trans = self.records["trans"]      # (n, 4096) rows for the transport data
        self._headers = np.empty(0, np.uint64)  # this batch's record headers: offset | flags

    def begin(self, block: str, offsets: Any) -> bool:
        """Start a batch of ``block`` pages at ``offsets``; False when its first record cannot be a CONTINUE
        record (another block was sent last, or the SEND_START context is still due)."""
        if not self._w.continues(block):
            return False
        offs = np.ascontiguousarray(offsets, dtype=np.uint64)
        self._w._check_offsets(block, offs)
        self._headers = offs | np.uint64(ENC_PAGE_CONTINUE_FLAGS)
        return True

    def put(self, start: int, stop: int) -> None:
        """Write the batch's records ``[start, stop)``, whose packets are in rows ``[0, stop - start)``;
        raises the stream's error if the write failed."""
        rec = self.records[:stop - start]
        rec["header"] = self._headers[start:stop]
        self._w.put_bytes(rec.view(np.uint8))
        self._w.check()


def _vmdesc_len_ambiguous(n: int) -> bool:
    raw = _BE32.pack(n)
    tail = raw[raw.rfind(b"\0") + 1:]
    return b"{" in tail


# =========================================================================================================
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


class StreamReader:
    """Bounded, offset-tracking reader of a migration stream.

    ``ram_blocks`` are the destination's RAM blocks (idstr → used_length): MEM_SIZE must announce blocks that
    exist with the same size, and bitmap ranges are bounded by their total. The reader owns ``fileobj`` and
    reads ahead into one reused buffer (``readinto1`` when available, so a live socket never blocks for more
    than is there). After the first ``StreamError`` the reader is dead: every call raises it again.
    """

    def __init__(self, fileobj: BinaryIO, limits: ReaderLimits = ReaderLimits(), *,
                 ram_blocks: Mapping[str, int] | None = None, continuation: bool = False) -> None:
        """``continuation=True``: a page channel whose SEND_START context came on the main stream."""
        self._f = fileobj
        # readinto1 returns what is there (a live socket never blocks for more); raw objects have readinto.
        self._readinto = getattr(fileobj, "readinto1", None) or fileobj.readinto
        self.limits = limits
        self._buf = bytearray(limits.read_chunk)  # fixed; replaced (never resized) when a field needs more
        self._mv = memoryview(self._buf)
        self._pos = 0  # next unread byte in _buf
        self._end = 0  # end of valid data in _buf
        self._base = 0  # stream offset of _buf[0]
        self._record = "stream"
        self._error: StreamError | None = None
        self._dest_blocks = dict(ram_blocks) if ram_blocks is not None else None
        self._blocks: dict[bytes, tuple[str, int]] = {}
        self._ram_total = 0
        self._last_block: tuple[str, int] | None = None  # QEMU last_recv_block
        self._context_seen = continuation
        self._sections: dict[int, tuple[str, int, int]] = {}
        self._open_sections: set[int] = set()
        self._last_section: int | None = None

    # -- low level ----------------------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Stream offset of the next unread byte."""
        return self._base + self._pos

    @property
    def blocks(self) -> dict[str, int]:
        """RAM blocks announced by MEM_SIZE (idstr → size)."""
        return dict(self._blocks.values())

    def _fail(self, message: str, at: int | None = None) -> StreamError:
        err = StreamError(message, offset=self.offset if at is None else at, record=self._record)
        self._error = err
        return err

    def _more(self, n: int) -> bool:
        """Try to have ``n`` unread bytes buffered; False at end of stream.

        Callers bound ``n`` by a limit first, so the buffer only grows to a checked size.
        """
        if self._error is not None:
            raise self._error
        rem = self._end - self._pos
        cap = max(n, self.limits.read_chunk)
        if cap > len(self._buf):
            buf = bytearray(cap)
            buf[:rem] = self._mv[self._pos:self._end]
            self._buf, self._mv = buf, memoryview(buf)
        elif self._pos:
            self._mv[:rem] = bytes(self._mv[self._pos:self._end]) if rem > self._pos else self._mv[self._pos:self._end]
        self._base += self._pos
        self._pos, self._end = 0, rem
        while self._end < n:
            try:
                got = self._readinto(self._mv[self._end:])
            except OSError as e:
                raise self._fail(f"I/O error {e}") from e
            if not got:
                return False
            self._end += got
        return True

    def _need(self, n: int, what: str) -> None:
        if self._error is not None:
            raise self._error
        if self._end - self._pos < n and not self._more(n):
            raise self._fail(f"truncated stream while reading {what} at offset {self.offset}")

    def get_be8(self, what: str = "u8") -> int:
        self._need(1, what)
        self._pos += 1
        return self._buf[self._pos - 1]

    def get_be16(self, what: str = "be16") -> int:
        self._need(2, what)
        (v,) = _BE16.unpack_from(self._buf, self._pos)
        self._pos += 2
        return v

    def get_be32(self, what: str = "be32") -> int:
        self._need(4, what)
        (v,) = _BE32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return v

    def get_be64(self, what: str = "be64") -> int:
        self._need(8, what)
        (v,) = _BE64.unpack_from(self._buf, self._pos)
        self._pos += 8
        return v

    def get_bytes(self, n: int, what: str = "bytes", *, cap: int = SEV_FW_BLOB_MAX_SIZE,
                  len_at: int | None = None) -> bytes:
        """``n`` bytes, refused before reading when ``n`` exceeds ``cap`` (error at ``len_at``, the length field)."""
        if n > cap:
            raise self._fail(f"{what} length {n} exceeds the limit of {cap}", len_at)
        self._need(n, what)
        v = self._mv[self._pos:self._pos + n].tobytes()
        self._pos += n
        return v

    def _unpack(self, st: struct.Struct, what: str) -> tuple[int, ...]:
        self._need(st.size, what)
        v = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        return v

    def _idstr(self, what: str) -> bytes:
        n = self.get_be8(f"{what} length")
        if n == 0:
            raise self._fail(f"empty {what}", self.offset - 1)
        raw = self.get_bytes(n, what, cap=255)
        if b"\0" in raw:
            raise self._fail(f"{what} contains NUL", self.offset - n)
        return raw

    def _decode(self, raw: bytes, what: str, at: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} is not UTF-8", at) from None

    # -- file structure -----------------------------------------------------------------------------------
    def read_header(self) -> int:
        self._record = "file header"
        magic = self.get_be32("magic")
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._fail(f"bad magic {magic:#010x}", self.offset - 4)
        version = self.get_be32("version")
        if version != QEMU_VM_FILE_VERSION:
            raise self._fail(f"unsupported version {version}", self.offset - 4)
        return version

    def next_section(self) -> SectionRecord:
        """The next top-level item: Configuration, SectionHeader, Footer, Command or Eof."""
        self._record = "section header"
        at = self.offset
        kind = self.get_be8("section type")
        if kind == QEMU_VM_EOF:
            return Eof()
        if kind == QEMU_VM_CONFIGURATION:
            self._record = "configuration section"
            n = self.get_be32("machine name length")
            raw = self.get_bytes(n, "machine name", cap=self.limits.max_machine_name, len_at=self.offset - 4)
            return Configuration(self._decode(raw, "machine name", self.offset - n))
        if kind == QEMU_VM_COMMAND:
            self._record = "command"
            cmd = self.get_be16("command")
            n = self.get_be16("command length")
            return Command(cmd, self.get_bytes(n, "command data", cap=self.limits.max_command_len,
                                               len_at=self.offset - 2))
        if kind in (QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION):
            raise self._fail(f"section type {kind:#04x} is not valid at top level before EOF", at)
        if kind not in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END,
                        QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_FOOTER):
            raise self._fail(f"unknown section type {kind:#04x}", at)
        sid_at = self.offset
        sid = self.get_be32("section id")
        if kind == QEMU_VM_SECTION_FOOTER:
            self._record = "section footer"
            if sid != self._last_section:
                raise self._fail(f"footer for section {sid} after section {self._last_section}", sid_at)
            return Footer(sid)
        if kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            if sid not in self._open_sections:
                raise self._fail(f"section {sid} was not started or has ended", sid_at)
            if kind == QEMU_VM_SECTION_END:
                self._open_sections.discard(sid)
            self._last_section = sid
            return SectionHeader(kind, sid, *self._sections[sid])
        if sid in self._sections:
            raise self._fail(f"duplicate section id {sid}", sid_at)
        name_at = self.offset
        idstr = self._decode(self._idstr("section idstr"), "section idstr", name_at)
        instance_id, version_id = self._unpack(_SECTION_TAIL, "instance/version id")
        if idstr == RAM_SECTION_IDSTR and (instance_id, version_id) != (RAM_SECTION_INSTANCE, RAM_SECTION_VERSION):
            raise self._fail(f"RAM section instance {instance_id} version {version_id}, need 0 and 4", name_at)
        self._sections[sid] = (idstr, instance_id, version_id)
        if kind == QEMU_VM_SECTION_START:
            self._open_sections.add(sid)
        self._last_section = sid
        return SectionHeader(kind, sid, idstr, instance_id, version_id)

    def read_vmdesc(self) -> dict[str, Any] | None:
        """The JSON trailer after EOF, or None if the stream ends there."""
        self._record = "vmdesc trailer"
        if self._end == self._pos and not self._more(1):
            return None
        at = self.offset
        kind = self.get_be8("trailer type")
        if kind != QEMU_VM_VMDESCRIPTION:
            raise self._fail(f"unknown section type {kind:#04x} after EOF", at)
        n = self.get_be32("JSON length")
        text = self.get_bytes(n, "JSON", cap=self.limits.max_vmdesc, len_at=at + 1)
        try:
            desc = json.loads(text.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise self._fail(f"invalid JSON ({e.__class__.__name__})", at + 5) from None
        if not isinstance(desc, dict):
            raise self._fail("JSON is not an object", at + 5)
        return desc

    def at_end(self) -> bool:
        """True when no byte is left (the stream must end after the trailer)."""
        return self._end == self._pos and not self._more(1)

    # -- RAM section ----------------------------------------------------------------------------------------
    def ram_records(self, batch: EncryptedBatch | None = None) -> Iterator[RamRecord]:
        """Records of one RAM chunk, ending with (and including) ``Eos``.

        With ``batch``, consecutive encrypted pages of one block are gathered into its arrays and yielded as
        ``EncryptedPages``; the consumer must be done with a batch before asking for the next record.
        """
        if batch is None:
            while True:
                rec = self._ram_record()
                yield rec
                if type(rec) is Eos:
                    return
        n = 0
        block: tuple[str, int] | None = None
        context: SevContext | None = None
        while True:
            if batch.zero_copy and block is not None and self._context_seen and block is self._last_block:
                run = self._encrypted_run(batch.capacity, block)
                if run is not None:
                    if n:
                        yield EncryptedPages(block[0], n, batch, context)
                        n, context = 0, None
                    yield EncryptedPages(block[0], len(run), batch, None, run)
                    continue
            if n and self._context_seen and block is self._last_block:
                n += self._fast_encrypted(batch, n, block)
                if n == batch.capacity:
                    yield EncryptedPages(block[0], n, batch, context)
                    n, context = 0, None
                    continue
            if n and self._end == self._pos:
                # Nothing more is buffered: hand over what we have before blocking on a live stream (the
                # sender may be waiting for these pages to be applied, e.g. the SEND_START context).
                yield EncryptedPages(block[0], n, batch, context)
                n, context = 0, None
            rec = self._ram_record()
            if type(rec) is EncryptedPage:
                if n and (self._last_block is not block or rec.context is not None):
                    yield EncryptedPages(block[0], n, batch, context)
                    n, context = 0, None
                block = self._last_block
                if rec.context is not None:
                    context = rec.context
                batch.offsets[n] = rec.offset
                batch.hdrs[n] = np.frombuffer(rec.hdr, np.uint8)
                batch.trans[n] = np.frombuffer(rec.trans, np.uint8)
                n += 1
                if n == batch.capacity:
                    yield EncryptedPages(block[0], n, batch, context)
                    n, context = 0, None
                continue
            if n:
                yield EncryptedPages(block[0], n, batch, context)
                n, context = 0, None
            yield rec
            if type(rec) is Eos:
                return

    def _encrypted_run(self, limit: int, block: tuple[str, int]) -> np.ndarray | None:
        """The well-formed CONTINUE records of ``block`` at the read position, as a view of the buffer
        (at most ``limit``), consumed; None when there is none (the scalar path takes over)."""
        m = min((self._end - self._pos) // ENC_PAGE_RECORD_SIZE, limit)
        if m <= 0:
            return None
        rec = np.frombuffer(self._buf, ENC_PAGE_RECORD, m, self._pos)
        head = rec["header"]
        ok = ((head & np.uint64(_FLAGS_MASK)) == ENC_PAGE_CONTINUE_FLAGS)
        ok &= rec["subtype"] == RAM_SAVE_ENCRYPTED_PAGE
        ok &= rec["hdr_len"] == SEV_PACKET_HEADER_SIZE
        ok &= rec["trans_len"] == TARGET_PAGE_SIZE
        ok &= head < np.uint64(block[1])  # offset + 4096 <= size, as size and offset are page multiples
        good = m if ok.all() else int(np.argmin(ok))
        if not good:
            return None
        self._pos += good * ENC_PAGE_RECORD_SIZE
        return rec[:good]

    def _fast_encrypted(self, batch: EncryptedBatch, n: int, block: tuple[str, int]) -> int:
        """Copy buffered CONTINUE encrypted-page records into ``batch`` from row ``n``; returns how many.

        Stops at the first record that is not a well-formed in-range CONTINUE page; the scalar path then
        parses (and, if need be, rejects) it with a precise error.
        """
        run = self._encrypted_run(batch.capacity - n, block)
        if run is None:
            return 0
        good = len(run)
        batch.offsets[n:n + good] = run["header"] & np.uint64(~_FLAGS_MASK & _U64_MAX)
        batch.hdrs[n:n + good] = run["hdr"]
        batch.trans[n:n + good] = run["trans"]
        return good

    def _ram_record(self) -> RamRecord:
        self._record = "RAM record header"
        at = self.offset
        word = self.get_be64("RAM record header")
        flags = word & _FLAGS_MASK
        addr = word & ~_FLAGS_MASK
        if flags & ~_KNOWN_FLAGS:
            raise self._fail(f"unknown RAM flags {flags & ~_KNOWN_FLAGS:#x}", at)
        for bit, name in _UNSUPPORTED_FLAGS.items():
            if flags & bit:
                raise self._fail(f"unsupported RAM flag {name}", at)
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind == RAM_SAVE_FLAG_EOS and word == RAM_SAVE_FLAG_EOS:
            return Eos()
        if kind == RAM_SAVE_FLAG_MEM_SIZE and flags == kind:
            return self._mem_size(addr, at)
        if kind == RAM_SAVE_FLAG_PAGE:
            self._record = "page"
            name, _ = self._block_for(flags, addr, at)
            return Page(name, addr, self.get_bytes(TARGET_PAGE_SIZE, "page data", cap=TARGET_PAGE_SIZE))
        if kind == RAM_SAVE_FLAG_ZERO:
            self._record = "zero page"
            name, _ = self._block_for(flags, addr, at)
            fill = self.get_be8("fill byte")
            if fill != 0:
                raise self._fail(f"zero page with fill value {fill}", self.offset - 1)
            return Zero(name, addr, fill)
        if kind == RAM_SAVE_FLAG_ENCRYPTED_DATA:
            return self._encrypted(flags, addr, at)
        raise self._fail(f"invalid RAM flag combination {flags:#x}", at)

    def _block_for(self, flags: int, addr: int, at: int) -> tuple[str, int]:
        """Resolve the record's block (CONTINUE or idstr) and check that ``addr`` is a page inside it."""
        if flags & RAM_SAVE_FLAG_CONTINUE:
            blk = self._last_block
            if blk is None:
                raise self._fail("CONTINUE without a previous block", at)
        else:
            name_at = self.offset
            raw = self._idstr("RAM block idstr")
            blk = self._blocks.get(raw)
            if blk is None:
                raise self._fail(f"RAM block {raw!r} was not announced in MEM_SIZE", name_at)
            self._last_block = blk
        if addr + TARGET_PAGE_SIZE > blk[1]:
            raise self._fail(f"offset {addr:#x} outside RAM block {blk[0]!r} of {blk[1]:#x} bytes", at)
        return blk

    def _mem_size(self, total: int, at: int) -> MemSize:
        self._record = "MEM_SIZE"
        if self._blocks:
            raise self._fail("second MEM_SIZE record", at)
        cap = self.limits.max_ram_bytes if self._dest_blocks is None else sum(self._dest_blocks.values())
        if total > cap:
            raise self._fail(f"total RAM {total:#x} exceeds {cap:#x}", at)
        seen: dict[bytes, tuple[str, int]] = {}
        remaining = total
        while remaining:
            if len(seen) == self.limits.max_blocks:
                raise self._fail(f"more than {self.limits.max_blocks} RAM blocks")
            name_at = self.offset
            raw = self._idstr("RAM block idstr")
            name = self._decode(raw, "RAM block idstr", name_at + 1)
            size_at = self.offset
            size = self.get_be64("RAM block size")
            if raw in seen:
                raise self._fail(f"RAM block {name!r} announced twice", name_at)
            if size == 0 or size & _FLAGS_MASK:
                raise self._fail(f"RAM block {name!r} size {size:#x} is not a positive page multiple", size_at)
            if size > remaining:
                raise self._fail(f"RAM block sizes exceed the MEM_SIZE total {total:#x}", size_at)
            if self._dest_blocks is not None and self._dest_blocks.get(name) != size:
                raise self._fail(f"RAM block {name!r} of {size:#x} bytes does not match the destination", name_at)
            seen[raw] = (name, size)
            remaining -= size
        self._blocks = seen
        self._ram_total = total
        return MemSize(tuple(seen.values()))

    def _encrypted(self, flags: int, addr: int, at: int) -> EncryptedPage | EncryptedBitmap:
        self._record = "encrypted record"
        blk = self._block_for(flags, addr, at)
        sub_at = self.offset
        subtype = self.get_be32("subtype")
        if subtype == RAM_SAVE_ENCRYPTED_BITMAP:
            if addr:
                raise self._fail(f"encrypted bitmap with offset {addr:#x}", at)
            return self._bitmap(blk[0])
        if subtype != RAM_SAVE_ENCRYPTED_PAGE:
            raise self._fail(f"unknown encrypted subtype {subtype}", sub_at)
        context = None
        if not self._context_seen:
            # Seed framing: the first encrypted page carries SEND_START's output (§1.6).
            self._record = "SEND_START context"
            policy = self.get_be32("policy")
            pdh = self._blob("pdh_len", "pdh", SEV_PDH_CERT_SIZE)
            session = self._blob("session_len", "session", SEV_SESSION_SIZE)
            context = SevContext(policy, pdh, session)
            self._context_seen = True
        self._record = "encrypted page"
        hdr = self._blob("hdr_len", "hdr", SEV_PACKET_HEADER_SIZE)
        trans = self._blob("trans_len", "trans", TARGET_PAGE_SIZE)
        return EncryptedPage(blk[0], addr, context, hdr, trans)

    def _blob(self, len_name: str, name: str, exact: int) -> bytes:
        """``be32 len, bytes``: bounded by SEV_FW_BLOB_MAX_SIZE (the series' check) and then exact."""
        at = self.offset
        n = self.get_be32(len_name)
        if n > SEV_FW_BLOB_MAX_SIZE:
            raise self._fail(f"{len_name} {n} exceeds SEV_FW_BLOB_MAX_SIZE", at)
        if n != exact:
            raise self._fail(f"{len_name} {n}, must be {exact}", at)
        return self.get_bytes(n, name, cap=exact)

    def _bitmap(self, block: str) -> EncryptedBitmap:
        self._record = "encrypted bitmap"
        dest_total = sum(self._dest_blocks.values()) if self._dest_blocks is not None else self._ram_total
        budget = dest_total // TARGET_PAGE_SIZE  # pages all entries together may describe
        entries = []
        while True:
            st_at = self.offset
            status = self.get_be32("status")
            if status == ENCRYPTED_BITMAP_END:
                return EncryptedBitmap(block, tuple(entries))
            if status != ENCRYPTED_BITMAP_CONTINUE:
                raise self._fail(f"bitmap status {status}, must be CONTINUE (1) or END (2)", st_at)
            if len(entries) == self.limits.max_bitmap_entries:
                raise self._fail(f"more than {self.limits.max_bitmap_entries} bitmap entries", st_at)
            start = self.get_be64("start_gpa")
            npages = self.get_be64("npages")
            size = self.get_be64("size")
            if start & _FLAGS_MASK:
                raise self._fail(f"start_gpa {start:#x} is not page-aligned", st_at + 4)
            if npages > budget:
                raise self._fail(f"npages {npages} exceeds the {budget} pages of guest RAM", st_at + 12)
            if start + npages * TARGET_PAGE_SIZE > self.limits.max_gpa:
                raise self._fail(f"range {start:#x}+{npages} pages exceeds the GPA limit", st_at + 4)
            if size != bitmap_size(npages):
                raise self._fail(f"size {size}, must be {bitmap_size(npages)} for {npages} pages", st_at + 20)
            budget -= npages
            entries.append(BitmapEntry(start, npages, self.get_bytes(size, "bitmap", cap=size)))


def open_reader(data: bytes, **kw: Any) -> StreamReader:
    """A reader over an in-memory stream (tests, tools)."""
    return StreamReader(io.BytesIO(data), **kw)


__all__ = [name for name in dir() if name.isupper() and not name.startswith("_")] + [
    "BitmapEntry", "Command", "Configuration", "EncryptedBatch", "EncryptedBitmap", "EncryptedPage",
    "EncryptedPages", "Eof", "Eos", "Footer", "MemSize", "Page", "RamRecord", "ReaderLimits", "RecordRing",
    "SectionHeader", "SectionRecord", "SevContext", "StreamError", "StreamReader", "StreamWriter", "Zero",
    "bitmap_size", "default_vmdesc", "open_reader",
]
