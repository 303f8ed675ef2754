"""The stream's writer: ``StreamWriter``, a QEMUFile-like buffered sink with a sticky first error, and
``RecordRing``, the encrypted-page records a SEND_UPDATE_DATA pipeline fills in place.

One writer method per record type; the layouts come from ``layout``, the byte-level description is
``docs/formats.md`` ("Migration stream"). Argument errors raise ``ValueError`` before a byte of the
record is written; I/O errors are sticky (QEMU ``migration/qemu-file.c`` ``qemu_file_set_error``).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

import numpy as np

from pysev.migration.stream.layout import (
    BE16,
    BE32,
    BE64,
    BITMAP_ENTRY,
    CONTEXT_HEAD,
    ENC_PAGE_CONTINUE_FLAGS,
    ENC_PAGE_RECORD,
    ENCRYPTED_BITMAP_CONTINUE,
    ENCRYPTED_BITMAP_END,
    FILE_HEADER,
    FLAGS_MASK,
    IDSTR_MAX,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_ENCRYPTED_BITMAP,
    RAM_SAVE_ENCRYPTED_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_ENCRYPTED_DATA,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    SECTION_ID,
    SECTION_TAIL,
    SESSION_SIZE,
    SEV_CERT_SIZE,
    U8,
    U64_MAX,
    VMDESC_HEAD,
    VMDESC_MAX,
    VMSA_SECTION_IDSTR,
    VMSA_SECTION_VERSION,
    SevContext,
    bitmap_size,
)

log = logging.getLogger(__name__)


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


def _vmdesc_len_ambiguous(n: int) -> bool:
    """analyze-migration.py finds the JSON as "the first ``{`` after the last NUL": a 0x7b among the
    length bytes after their last zero byte would be taken for the JSON's start."""
    raw = BE32.pack(n)
    tail = raw[raw.rfind(b"\0") + 1 :]
    return b"{" in tail


class StreamWriter:
    """QEMUFile-like big-endian writer with a 64 KiB buffer and a sticky first error.

    After the first I/O failure every ``put_*`` is a no-op and ``check()``/``close()`` raise that error
    (QEMU ``qemu_file_set_error``). Argument errors (bad idstr, unaligned offset…) raise ``ValueError`` at
    once: they are bugs of the caller, not I/O. ``transferred`` counts bytes accepted (buffered or written).
    The underlying file object is not closed.
    """

    BUFFER_SIZE = 64 * 1024

    def __init__(self, fileobj: BinaryIO, *, buffer_size: int = BUFFER_SIZE, continuation: bool = False) -> None:
        """``continuation=True``: a page channel continuing a main stream that already carried the
        SEND_START context, so no record of this stream carries it."""
        if buffer_size < PAGE_SIZE:
            raise ValueError(f"buffer_size must be at least {PAGE_SIZE}")
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
        self._pack(U8, v)

    def put_be16(self, v: int) -> None:
        self._pack(BE16, v)

    def put_be32(self, v: int) -> None:
        self._pack(BE32, v)

    def put_be64(self, v: int) -> None:
        self._pack(BE64, v)

    def put_bytes(self, data: Any) -> None:
        """Append a bytes-like object: copied once into the buffer, or written straight when large."""
        if self.last_error is not None:
            return
        mv = _as_bytes_view(data)
        n = len(mv)
        if n <= self._cap - self._used:
            self._mv[self._used : self._used + n] = mv
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

    # -- file structure (migration/savevm.c) ------------------------------------------------------------
    def write_header(self, machine: str | None = "pc-q35-sev") -> None:
        """Magic, version and (unless ``machine`` is None) the 0x07 configuration section."""
        raw = b""
        if machine is not None:
            raw = machine.encode("ascii")
            if not raw or len(raw) > 255 or b"\0" in raw:
                raise ValueError(f"machine name must be 1..255 ASCII bytes without NUL, got {machine!r}")
        self._pack(FILE_HEADER, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)
        if machine is not None:
            self.put_be8(QEMU_VM_CONFIGURATION)
            self.put_be32(len(raw))
            self.put_bytes(raw)

    def _section_with_idstr(self, kind: int, section_id: int, idstr: str, instance_id: int, version_id: int) -> None:
        raw = _encode_idstr(idstr, "section")
        self._pack(SECTION_ID, kind, section_id)
        self.put_be8(len(raw))
        self.put_bytes(raw)
        self._pack(SECTION_TAIL, instance_id, version_id)

    def section_start(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> None:
        self._section_with_idstr(QEMU_VM_SECTION_START, section_id, idstr, instance_id, version_id)

    def section_full(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> None:
        self._section_with_idstr(QEMU_VM_SECTION_FULL, section_id, idstr, instance_id, version_id)

    def section_part(self, section_id: int) -> None:
        self._pack(SECTION_ID, QEMU_VM_SECTION_PART, section_id)

    def section_end(self, section_id: int) -> None:
        self._pack(SECTION_ID, QEMU_VM_SECTION_END, section_id)

    def section_footer(self, section_id: int) -> None:
        self._pack(SECTION_ID, QEMU_VM_SECTION_FOOTER, section_id)

    def write_eof(self) -> None:
        self.put_be8(QEMU_VM_EOF)

    def write_vmdesc(self, desc: Mapping[str, Any]) -> None:
        """0x06, be32 len, JSON: the analysis-only trailer after EOF (``qemu_savevm_state_complete_precopy``).

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
        self._pack(VMDESC_HEAD, QEMU_VM_VMDESCRIPTION, len(text))
        self.put_bytes(text)

    # -- RAM records (migration/ram.c) -------------------------------------------------------------------
    def ram_mem_size(self, blocks: Iterable[tuple[str, int]]) -> None:
        """``be64 total|MEM_SIZE`` then ``u8 len, idstr, be64 used_length`` per block (``ram_save_setup``)."""
        blocks = list(blocks)
        raws = []
        for idstr, size in blocks:
            raw = _encode_idstr(idstr, "RAM block")
            if size <= 0 or size & FLAGS_MASK:
                raise ValueError(f"RAM block {idstr!r} size {size:#x} must be a positive multiple of the page size")
            if idstr in self._idstr or raw in raws:
                raise ValueError(f"RAM block {idstr!r} announced twice")
            raws.append(raw)
        for raw, (idstr, size) in zip(raws, blocks, strict=True):
            self._idstr[idstr] = raw
            self._block_sizes[idstr] = size
        self._pack(BE64, sum(s for _, s in blocks) | RAM_SAVE_FLAG_MEM_SIZE)
        for raw, (_, size) in zip(raws, blocks, strict=True):
            self.put_be8(len(raw))
            self.put_bytes(raw)
            self.put_be64(size)

    def check_pages(self, block: str, offsets: Any) -> np.ndarray:
        """``offsets`` as uint64, checked to be page offsets inside ``block``; ValueError otherwise."""
        size = self._block_sizes.get(block)
        if size is None:
            raise ValueError(f"RAM block {block!r} was not announced with ram_mem_size()")
        offs = np.asarray(offsets)
        if offs.ndim != 1 or (offs.size and offs.dtype.kind not in "ui"):
            raise ValueError("offsets must be a 1-d array of integers")
        u = offs.astype(np.uint64, copy=False)  # a negative offset wraps beyond any block
        if u.size and (int(u.max()) + PAGE_SIZE > size or int(np.bitwise_or.reduce(u)) & FLAGS_MASK):
            bad = offs[(offs < 0) | (offs > size - PAGE_SIZE) | ((offs & FLAGS_MASK) != 0)][0]
            raise ValueError(f"offset {int(bad):#x} is not a page inside RAM block {block!r} of {size:#x} bytes")
        return np.ascontiguousarray(u)

    def _page_header(self, block: str, offset: int, flags: int) -> None:
        """QEMU ``save_page_header``: CONTINUE and no idstr when ``block`` was the last one sent.
        ``offset`` has been checked by the caller."""
        if block == self._last_block:
            self._pack(BE64, offset | flags | RAM_SAVE_FLAG_CONTINUE)
            return
        raw = self._idstr[block]
        self._pack(BE64, offset | flags)
        self.put_be8(len(raw))
        self.put_bytes(raw)
        self._last_block = block

    def ram_page(self, block: str, offset: int, page: Any) -> None:
        mv = _as_bytes_view(page)
        if len(mv) != PAGE_SIZE:
            raise ValueError(f"page must be {PAGE_SIZE} bytes, got {len(mv)}")
        self.check_pages(block, [offset])
        self._page_header(block, offset, RAM_SAVE_FLAG_PAGE)
        self.put_bytes(mv)

    def ram_zero_page(self, block: str, offset: int) -> None:
        self.check_pages(block, [offset])
        self._page_header(block, offset, RAM_SAVE_FLAG_ZERO)
        self.put_be8(0)

    def ram_eos(self) -> None:
        self.put_be64(RAM_SAVE_FLAG_EOS)

    # -- SEV records (the SEV live-migration series v3, target/i386/sev.c) --------------------------------
    def continues(self, block: str) -> bool:
        """True when the next encrypted-page record of ``block`` can be a CONTINUE record: ``block`` was
        sent last and the SEND_START context has gone out."""
        return block == self._last_block and self._context_sent

    def sev_encrypted_pages(
        self,
        block: str,
        offsets: Any,
        records: np.ndarray,
        context: SevContext | tuple[int, bytes, bytes] | None = None,
    ) -> None:
        """RAM_SAVE_ENCRYPTED_PAGE records of ``block`` at ``offsets``; ``context`` (SEND_START's output)
        goes with the stream's first encrypted page and no other.

        ``records`` is an ``ENC_PAGE_RECORD`` array, one per page, whose ``hdr`` and ``trans`` fields hold
        the packets (SEND_UPDATE_DATA writes them there in place); this method fills in the other fields.
        A record that names the block (the first after another block) or carries the context is written
        field by field; every other one is a fixed-size CONTINUE record and goes out as it lies in
        ``records``, so a page's ciphertext is copied once, by the file's write.
        """
        offs = self.check_pages(block, offsets)
        k = len(offs)
        if (
            not isinstance(records, np.ndarray)
            or records.dtype != ENC_PAGE_RECORD
            or records.shape != (k,)
            or not records.flags.c_contiguous
            or not records.flags.writeable
        ):
            raise ValueError(f"records must be a writable C-contiguous ENC_PAGE_RECORD array of shape ({k},)")
        if context is not None:
            if self._context_sent:
                raise ValueError("the SEND_START context goes with the first encrypted page only")
            policy, pdh, session = context
            pdh_v, session_v = _as_bytes_view(pdh), _as_bytes_view(session)
            if len(pdh_v) != SEV_CERT_SIZE or len(session_v) != SESSION_SIZE:
                raise ValueError(f"context needs a {SEV_CERT_SIZE}-byte PDH and a {SESSION_SIZE}-byte session")
            if k == 0:
                raise ValueError("the SEND_START context needs a page to go with")
        if k == 0:
            return
        if context is None and not self._context_sent:
            raise ValueError("the first encrypted page must carry the SEND_START context")
        start = 0
        if context is not None or block != self._last_block:
            self._page_header(block, int(offs[0]), RAM_SAVE_FLAG_ENCRYPTED_DATA)
            self.put_be32(RAM_SAVE_ENCRYPTED_PAGE)
            if context is not None:
                self._pack(CONTEXT_HEAD, policy, len(pdh_v))
                self.put_bytes(pdh_v)
                self.put_be32(len(session_v))
                self.put_bytes(session_v)
                self._context_sent = True
            self.put_be32(PACKET_HEADER_SIZE)
            self.put_bytes(records["hdr"][0])
            self.put_be32(PAGE_SIZE)
            self.put_bytes(records["trans"][0])
            start = 1
        if start < k:
            rec = records[start:]
            rec["header"] = offs[start:] | np.uint64(ENC_PAGE_CONTINUE_FLAGS)
            rec["subtype"] = RAM_SAVE_ENCRYPTED_PAGE
            rec["hdr_len"] = PACKET_HEADER_SIZE
            rec["trans_len"] = PAGE_SIZE
            self.put_bytes(rec.view(np.uint8))

    def sev_encrypted_bitmap(self, block: str, entries: Iterable[tuple[int, int, Any]]) -> None:
        """The RAM_SAVE_ENCRYPTED_BITMAP record: header (offset 0), ``be32 2``, entries, ``be32 END``."""
        checked = []
        for start_gpa, npages, bitmap in entries:
            mv = _as_bytes_view(bitmap)
            if start_gpa < 0 or start_gpa & FLAGS_MASK or npages < 0 or start_gpa + npages * PAGE_SIZE > U64_MAX:
                raise ValueError(f"bad bitmap range start_gpa={start_gpa:#x} npages={npages}")
            if len(mv) != bitmap_size(npages):
                raise ValueError(f"bitmap of {npages} pages must be {bitmap_size(npages)} bytes, got {len(mv)}")
            checked.append((start_gpa, npages, mv))
        self.check_pages(block, [0])
        self._page_header(block, 0, RAM_SAVE_FLAG_ENCRYPTED_DATA)
        self.put_be32(RAM_SAVE_ENCRYPTED_BITMAP)
        for start_gpa, npages, mv in checked:
            self._pack(BITMAP_ENTRY, ENCRYPTED_BITMAP_CONTINUE, start_gpa, npages, len(mv))
            self.put_bytes(mv)
        self.put_be32(ENCRYPTED_BITMAP_END)

    def sev_es_vmsa_section(self, section_id: int, vcpu: int, hdr: Any, trans: Any) -> None:
        """The ``sev-es-vmsa`` FULL section of ``vcpu`` (instance id = vCPU index), footer included:
        SEND_UPDATE_VMSA's packet as ``be32 hdr_len, hdr, be32 trans_len, trans``."""
        hdr_v, trans_v = _as_bytes_view(hdr), _as_bytes_view(trans)
        if len(hdr_v) != PACKET_HEADER_SIZE or len(trans_v) != PAGE_SIZE:
            raise ValueError(f"a VMSA packet is a {PACKET_HEADER_SIZE}-byte header and {PAGE_SIZE} bytes of data")
        self.section_full(section_id, VMSA_SECTION_IDSTR, vcpu, VMSA_SECTION_VERSION)
        self.put_be32(PACKET_HEADER_SIZE)
        self.put_bytes(hdr_v)
        self.put_be32(PAGE_SIZE)
        self.put_bytes(trans_v)
        self.section_footer(section_id)


class RecordRing:
    """Encrypted-page records reused slice after slice by a producer that writes their ``hdr``/``trans``
    fields in place: the SEND_UPDATE_DATA pipeline puts its packets straight into the wire layout, and each
    slice goes to the stream (``StreamWriter.sev_encrypted_pages``) while it is still in cache, so a page is
    written once, by the pipeline, and read once, by the socket's copy.

        if ring.begin(block, offsets):      # False: the next record must name the block (or carry the context)
            pipeline(hdr=ring.hdr, trans=ring.trans, on_slice=ring.put)
    """

    def __init__(self, writer: StreamWriter, n: int) -> None:
        if n < 1:
            raise ValueError("a record ring needs at least one record")
        self._w = writer
        self.records = np.zeros(n, ENC_PAGE_RECORD)
        self.hdr = self.records["hdr"]  # (n, 52) rows for the packet headers
        self.trans = self.records["trans"]  # (n, 4096) rows for the transport data
        self._block = ""
        self._offsets = np.empty(0, np.uint64)

    def begin(self, block: str, offsets: Any) -> bool:
        """Start a batch of ``block`` pages at ``offsets``; False when its first record cannot be a CONTINUE
        record (another block was sent last, or the SEND_START context is still due)."""
        if not self._w.continues(block):
            return False
        self._offsets = self._w.check_pages(block, offsets)
        self._block = block
        return True

    def put(self, start: int, stop: int) -> None:
        """Write the batch's records ``[start, stop)``, whose packets are in rows ``[0, stop - start)``;
        raises the stream's error if the write failed."""
        self._w.sev_encrypted_pages(self._block, self._offsets[start:stop], self.records[: stop - start])
        self._w.check()


__all__ = ["RecordRing", "StreamWriter"]
