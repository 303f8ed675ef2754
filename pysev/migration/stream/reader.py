"""The stream's reader: ``StreamReader``, bounded and offset-tracking, for input that may be hostile.

Every length is bounded before anything is allocated or read, alignments and ranges are checked, unknown
types and subtypes are rejected, and every ``StreamError`` names the record and the byte offset where the
offending field starts. One reader method per record type; the layouts come from ``layout``, the
byte-level description and the full list of bounds are ``docs/formats.md`` ("Migration stream",
"Stream reader bounds").

Gaps of the SEV series' own loader (``target/i386/sev.c`` of the SEV live-migration series v3, Brijesh
Singh 2019) closed here: ``trans_len`` must equal the page size; bitmap ``start_gpa`` page-aligned;
``npages`` bounded by the RAM size and ``start + npages·4096`` bounded (no overflow); bitmap status words
exactly CONTINUE or END. ``hdr_len`` must be exactly 52: the firmware accepts ≥ 52 but every sender (QEMU
queries the length and gets 52) writes 52, so anything else is malformed. ``policy`` is passed through:
RECEIVE_START is the authority on it.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np

from pysev.migration.stream.layout import (
    BE16,
    BE32,
    BE64,
    ENC_PAGE_CONTINUE_FLAGS,
    ENC_PAGE_RECORD,
    ENC_PAGE_RECORD_SIZE,
    ENCRYPTED_BITMAP_CONTINUE,
    ENCRYPTED_BITMAP_END,
    FLAGS_MASK,
    KNOWN_FLAGS,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_ENCRYPTED_BITMAP,
    RAM_SAVE_ENCRYPTED_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_ENCRYPTED_DATA,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    RAM_SECTION_IDSTR,
    RAM_SECTION_INSTANCE,
    RAM_SECTION_VERSION,
    SECTION_TAIL,
    SESSION_SIZE,
    SEV_CERT_SIZE,
    SEV_FW_BLOB_MAX_SIZE,
    U64_MAX,
    UNSUPPORTED_FLAGS,
    VMSA_SECTION_IDSTR,
    VMSA_SECTION_VERSION,
    BitmapEntry,
    Command,
    Configuration,
    EncryptedBitmap,
    EncryptedPages,
    Eof,
    Eos,
    Footer,
    MemSize,
    Page,
    RamRecord,
    ReaderLimits,
    SectionHeader,
    SectionRecord,
    SevContext,
    StreamError,
    VmsaRecord,
    Zero,
    bitmap_size,
)
from pysev.migration.stream.returnpath import MESSAGE_HEAD, ReturnMessage

#: The source's ABORT message as it appears where stream bytes were due.
_ABORT = MESSAGE_HEAD.pack(ReturnMessage.ABORT, 0)

_OFFSET_MASK = np.uint64(~FLAGS_MASK & U64_MAX)
_DEFAULT_LIMITS = ReaderLimits()


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class StreamReader:
    """Bounded, offset-tracking reader of a migration stream.

    ``ram_blocks`` are the destination's RAM blocks (idstr → used_length): MEM_SIZE must announce blocks that
    exist with the same size, and bitmap ranges are bounded by their total. The reader owns ``fileobj`` and
    reads ahead into one reused buffer (``readinto1`` when available, so a live socket never blocks for more
    than is there). After the first ``StreamError`` the reader is dead: every call raises it again.
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        limits: ReaderLimits = _DEFAULT_LIMITS,
        *,
        ram_blocks: Mapping[str, int] | None = None,
        continuation: bool = False,
    ) -> None:
        """``continuation=True``: a page channel whose SEND_START context came on the main stream."""
        self._f = fileobj
        # readinto1 returns what is there (a live socket never blocks for more); raw objects have readinto.
        readinto = getattr(fileobj, "readinto1", None) or getattr(fileobj, "readinto", None)
        if readinto is None:
            raise TypeError("the stream reader needs a file object with readinto1() or readinto()")
        self._readinto = readinto
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
            buf[:rem] = self._mv[self._pos : self._end]
            self._buf, self._mv = buf, memoryview(buf)
        elif self._pos:
            self._mv[:rem] = (
                bytes(self._mv[self._pos : self._end]) if rem > self._pos else self._mv[self._pos : self._end]
            )
        self._base += self._pos
        self._pos, self._end = 0, rem
        while self._end < n:
            try:
                got = self._readinto(self._mv[self._end :])
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
        (v,) = BE16.unpack_from(self._buf, self._pos)
        self._pos += 2
        return v

    def get_be32(self, what: str = "be32") -> int:
        self._need(4, what)
        (v,) = BE32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return v

    def get_be64(self, what: str = "be64") -> int:
        self._need(8, what)
        (v,) = BE64.unpack_from(self._buf, self._pos)
        self._pos += 8
        return v

    def get_bytes(
        self, n: int, what: str = "bytes", *, cap: int = SEV_FW_BLOB_MAX_SIZE, len_at: int | None = None
    ) -> bytes:
        """``n`` bytes, refused before reading when ``n`` exceeds ``cap`` (error at ``len_at``, the length field)."""
        if n > cap:
            raise self._fail(f"{what} length {n} exceeds the limit of {cap}", len_at)
        if n <= self.limits.read_chunk:
            self._need(n, what)
            v = self._mv[self._pos : self._pos + n].tobytes()
            self._pos += n
            return v
        # Longer than the read-ahead: collected piece by piece, so memory follows what arrives rather
        # than what a length field announces.
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), self.limits.read_chunk)
            self._need(take, what)
            out += self._mv[self._pos : self._pos + take]
            self._pos += take
        return bytes(out)

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

    # -- file structure (migration/savevm.c qemu_loadvm_state) -------------------------------------------
    def _abort_follows(self, first: int) -> bool:
        """The source's ABORT return-path message starts at the byte just read (the source gave up and
        said so on the connection, where stream data was due)."""
        if first != _ABORT[0] or (self._end - self._pos < len(_ABORT) - 1 and not self._more(len(_ABORT) - 1)):
            return False
        return bytes(self._mv[self._pos : self._pos + len(_ABORT) - 1]) == _ABORT[1:]

    def read_header(self) -> int:
        self._record = "file header"
        magic = self.get_be32("magic")
        if magic != QEMU_VM_FILE_MAGIC:
            if magic == int.from_bytes(_ABORT, "big"):
                raise self._fail("the source aborted the migration before sending its stream", self.offset - 4)
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
            return Command(
                cmd, self.get_bytes(n, "command data", cap=self.limits.max_command_len, len_at=self.offset - 2)
            )
        if kind in (QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION):
            raise self._fail(f"section type {kind:#04x} is not valid at top level before EOF", at)
        if kind not in (
            QEMU_VM_SECTION_START,
            QEMU_VM_SECTION_PART,
            QEMU_VM_SECTION_END,
            QEMU_VM_SECTION_FULL,
            QEMU_VM_SECTION_FOOTER,
        ):
            if self._abort_follows(kind):
                raise self._fail("the source aborted the migration (its ABORT where a section was due)", at)
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
        instance_id, version_id = self._unpack(SECTION_TAIL, "instance/version id")
        if idstr == RAM_SECTION_IDSTR and (instance_id, version_id) != (RAM_SECTION_INSTANCE, RAM_SECTION_VERSION):
            raise self._fail(f"RAM section instance {instance_id} version {version_id}, need 0 and 4", name_at)
        if idstr == VMSA_SECTION_IDSTR and (kind, version_id) != (QEMU_VM_SECTION_FULL, VMSA_SECTION_VERSION):
            raise self._fail(
                f"{VMSA_SECTION_IDSTR} section of type {kind:#04x} version {version_id}, need a FULL "
                f"section of version {VMSA_SECTION_VERSION}",
                name_at,
            )
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

    # -- SEV-ES VMSA section ----------------------------------------------------------------------------------
    def read_vmsa_section(self, section: SectionHeader) -> VmsaRecord:
        """The body of the ``sev-es-vmsa`` section ``section`` that ``next_section`` has just returned (its
        footer, if any, is the next item): ``be32 hdr_len`` (52), ``hdr``, ``be32 trans_len`` (4096), ``trans``."""
        if section.idstr != VMSA_SECTION_IDSTR or section.section_id != self._last_section:
            raise ValueError(f"{section!r} is not the {VMSA_SECTION_IDSTR} section just read")
        self._record = f"{VMSA_SECTION_IDSTR} section"
        hdr = self._blob("hdr_len", "hdr", PACKET_HEADER_SIZE)
        trans = self._blob("trans_len", "trans", PAGE_SIZE)
        return VmsaRecord(section.instance_id, hdr, trans)

    # -- RAM section (migration/ram.c ram_load) ----------------------------------------------------------------
    def ram_records(self) -> Iterator[RamRecord]:
        """Records of one RAM chunk, ending with (and including) ``Eos``.

        Encrypted pages come as ``EncryptedPages``: each buffered run of CONTINUE records as one view of
        the read buffer, any other encrypted page alone. The consumer must be done with one before asking
        for the next record. A run never waits for input: on a live stream the sender may be waiting for
        the pages already sent to be applied (the SEND_START context) before it sends more.
        """
        while True:
            run = self._encrypted_run()
            if run is not None:
                yield run
                continue
            rec = self._ram_record()
            yield rec
            if type(rec) is Eos:
                return

    def _encrypted_run(self) -> EncryptedPages | None:
        """The well-formed in-range CONTINUE encrypted-page records already buffered at the read position,
        consumed; None when the next record is not one (the record-by-record path then reads it and, if
        need be, rejects it with a precise error)."""
        block = self._last_block
        m = (self._end - self._pos) // ENC_PAGE_RECORD_SIZE
        if (
            not m
            or block is None
            or not self._context_seen
            or BE64.unpack_from(self._buf, self._pos)[0] & FLAGS_MASK != ENC_PAGE_CONTINUE_FLAGS
        ):
            return None
        rec = np.frombuffer(self._buf, ENC_PAGE_RECORD, m, self._pos)
        head = rec["header"]
        ok = (head & np.uint64(FLAGS_MASK)) == ENC_PAGE_CONTINUE_FLAGS
        ok &= rec["subtype"] == RAM_SAVE_ENCRYPTED_PAGE
        ok &= rec["hdr_len"] == PACKET_HEADER_SIZE
        ok &= rec["trans_len"] == PAGE_SIZE
        ok &= head < np.uint64(block[1])  # offset + 4096 <= size, as size and offset are page multiples
        good = m if ok.all() else int(np.argmin(ok))
        if not good:
            return None
        self._pos += good * ENC_PAGE_RECORD_SIZE
        rec = rec[:good]
        return EncryptedPages(block[0], head[:good] & _OFFSET_MASK, _read_only(rec["hdr"]), _read_only(rec["trans"]))

    def _ram_record(self) -> RamRecord:
        self._record = "RAM record header"
        at = self.offset
        if self._end - self._pos >= len(_ABORT) or self._more(len(_ABORT)):
            # No RAM record starts so (its offset would be ~88 TB): the source gave up mid-stream.
            if bytes(self._mv[self._pos : self._pos + len(_ABORT)]) == _ABORT:
                raise self._fail("the source aborted the migration (its ABORT where a RAM record was due)", at)
        word = self.get_be64("RAM record header")
        flags = word & FLAGS_MASK
        addr = word & ~FLAGS_MASK
        if flags & ~KNOWN_FLAGS:
            raise self._fail(f"unknown RAM flags {flags & ~KNOWN_FLAGS:#x}", at)
        for bit, name in UNSUPPORTED_FLAGS.items():
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
            return Page(name, addr, self.get_bytes(PAGE_SIZE, "page data", cap=PAGE_SIZE))
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
        if addr + PAGE_SIZE > blk[1]:
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
            if size == 0 or size & FLAGS_MASK:
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

    def _encrypted(self, flags: int, addr: int, at: int) -> EncryptedPages | EncryptedBitmap:
        """One ENCRYPTED_DATA record, field by field: a page (with the SEND_START context if it is the
        stream's first) or the encryption bitmap."""
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
            # The series' framing: the first encrypted page carries SEND_START's output.
            self._record = "SEND_START context"
            policy = self.get_be32("policy")
            pdh = self._blob("pdh_len", "pdh", SEV_CERT_SIZE)
            session = self._blob("session_len", "session", SESSION_SIZE)
            context = SevContext(policy, pdh, session)
            self._context_seen = True
        self._record = "encrypted page"
        hdr = self._blob("hdr_len", "hdr", PACKET_HEADER_SIZE)
        trans = self._blob("trans_len", "trans", PAGE_SIZE)
        return EncryptedPages(
            blk[0],
            np.array([addr], np.uint64),
            np.frombuffer(hdr, np.uint8).reshape(1, PACKET_HEADER_SIZE),
            np.frombuffer(trans, np.uint8).reshape(1, PAGE_SIZE),
            context,
        )

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
        budget = dest_total // PAGE_SIZE  # pages all entries together may describe
        entries: list[BitmapEntry] = []
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
            if start & FLAGS_MASK:
                raise self._fail(f"start_gpa {start:#x} is not page-aligned", st_at + 4)
            if npages > budget:
                raise self._fail(f"npages {npages} exceeds the {budget} pages of guest RAM", st_at + 12)
            if start + npages * PAGE_SIZE > self.limits.max_gpa:
                raise self._fail(f"range {start:#x}+{npages} pages exceeds the GPA limit", st_at + 4)
            if size != bitmap_size(npages):
                raise self._fail(f"size {size}, must be {bitmap_size(npages)} for {npages} pages", st_at + 20)
            budget -= npages
            entries.append(BitmapEntry(start, npages, self.get_bytes(size, "bitmap", cap=size)))


def open_reader(data: bytes, **kw: Any) -> StreamReader:
    """A reader over an in-memory stream (tests, tools)."""
    return StreamReader(io.BytesIO(data), **kw)


__all__ = ["StreamReader", "open_reader"]
