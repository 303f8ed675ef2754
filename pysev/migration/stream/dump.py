"""What a saved migration stream holds, record by record: the library side of ``pysev stream dump``.

QEMU's ``scripts/analyze-migration.py`` stops at the first encrypted record (flag 0x200 is upstream's
MULTIFD_FLUSH); this reads pysev's SEV streams and streams saved by QEMU alike, on ``StreamReader``, so
every bound of the destination's reader applies and every error is a ``StreamError`` naming its offset.

* ``iter_records(path)`` yields one ``StreamItem`` per item of the file: file header, sections, footers,
  RAM records (page, zero page, encrypted page, encryption bitmap, EOS), device sections, EOF, vmdesc.
* Device sections (non-RAM ``FULL`` sections) are decoded through the vmdesc JSON trailer, as
  analyze-migration.py does (the trailer is found first, at the end of the file); pysev's
  ``sev-es-vmsa`` sections are read without one too.
* ``record_digest(path)`` recomputes the record digest (``pysev.migration.commit.RecordDigest``) that
  source and destination compare. A live migration with page channels digests every channel too, and
  ``--save-stream FILE`` keeps them beside the main stream as ``FILE.ch1``, ``FILE.ch2``…: pass them as
  ``channels`` for the migration's digest; without them the digest covers the main stream only.
* ``summarize(path)`` gives all of it as one JSON-ready dict (what ``pysev stream dump --json`` prints).

In pysev's streams each RAM chunk (a START, PART or END section up to its EOS) is one pass of the
pre-copy loop: chunk 0 announces the RAM blocks, chunks 1… are the passes, the END chunk is the
stop-and-copy. QEMU writes a chunk per ``ram_save_iterate`` call, several per pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from pysev.migration.commit import RecordDigest, combined_digest
from pysev.migration.stream.layout import (
    BE32,
    ENC_PAGE_RECORD_SIZE,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SECTION_IDSTR,
    VMDESC_HEAD,
    VMDESC_MAX,
    VMSA_FIELDS,
    VMSA_SECTION_IDSTR,
    Command,
    Configuration,
    EncryptedBitmap,
    EncryptedPages,
    Eof,
    Eos,
    Footer,
    MemSize,
    Page,
    ReaderLimits,
    SectionHeader,
    StreamError,
    Zero,
)
from pysev.migration.stream.reader import StreamReader

#: Every ``StreamItem.kind``, in the order they can first appear.
KINDS = (
    "header",
    "configuration",
    "section",
    "mem-size",
    "page",
    "zero",
    "encrypted-page",
    "encryption-bitmap",
    "eos",
    "footer",
    "device",
    "command",
    "eof",
    "vmdesc",
)
SECTION_TYPES = {
    QEMU_VM_SECTION_START: "start",
    QEMU_VM_SECTION_PART: "part",
    QEMU_VM_SECTION_END: "end",
    QEMU_VM_SECTION_FULL: "full",
}
#: vmdesc field types read as integers (QEMU ``vmstate_info_*``), signed or not; the rest are bytes.
_SIGNED = {"int8", "int16", "int32", "int64", "int32 equal", "int64 equal"}
_UNSIGNED = {"uint8", "uint16", "uint32", "uint64", "uint8 equal", "uint16 equal", "uint32 equal", "uint64 equal"}
_NULLPTR_MARKER = 0x30  # VMS_NULLPTR_MARKER
_MAX_DEPTH = 32  # nesting of structs and subsections in one device's description
_MAX_VALUES = 1 << 20  # values one device section may decode to (array_len can be anything)
_SHOWN_BYTES = 64  # buffers up to this size are shown in hex, larger ones by size and SHA-256


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One item of a stream file, ``offset`` to ``end`` (exclusive). ``chunk`` numbers the RAM chunks
    (0: the START chunk with MEM_SIZE; in pysev's streams chunk n ≥ 1 is pass n); ``block`` and
    ``address`` place a page record in guest RAM; ``detail`` holds the kind's own fields."""

    offset: int
    end: int
    kind: str
    section_id: int | None = None
    chunk: int | None = None
    block: str | None = None
    address: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"offset": self.offset, "end": self.end, "kind": self.kind}
        for name in ("section_id", "chunk", "block", "address"):
            value = getattr(self, name)
            if value is not None:
                out[name.replace("_", "-")] = value
        out.update(self.detail)
        return out


@dataclass(frozen=True)
class StreamDigest:
    """A stream's record digest, recomputed: ``record_sha256`` is what the two ends of a migration compare
    (``combined_digest`` of the main stream and the page channels given); ``stored`` is the one a file
    migration keeps in its vmdesc trailer, if any."""

    main: str
    channels: tuple[str, ...]
    record_sha256: str
    stored: str | None

    @property
    def matches(self) -> bool | None:
        """Whether the recomputed digest equals the stored one (None: nothing stored)."""
        return None if self.stored is None else self.stored == self.record_sha256


def _error(message: str, offset: int, record: str) -> StreamError:
    return StreamError(message, offset=offset, record=record)


def show_bytes(data: bytes) -> str | dict[str, Any]:
    """A buffer as JSON: hex up to 64 bytes, else its size and SHA-256."""
    if len(data) <= _SHOWN_BYTES:
        return data.hex()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _shown(value: Any) -> Any:
    if isinstance(value, bytes):
        return show_bytes(value)
    if isinstance(value, list):
        return [_shown(v) for v in value]
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    return value


def find_vmdesc(f: BinaryIO, size: int) -> tuple[int, dict[str, Any]] | None:
    """The vmdesc trailer, found from the end of the file as analyze-migration.py finds it (0x06, be32
    length, a JSON object that ends the file, within its last 10 MiB): (offset, JSON), or None."""
    span = min(size, VMDESC_MAX + VMDESC_HEAD.size)
    f.seek(size - span)
    data = f.read(span)
    start = max(data.rfind(b"\0") - BE32.size, VMDESC_HEAD.size)
    while (p := data.find(b"{", start)) >= 0:
        start = p + 1
        kind, length = VMDESC_HEAD.unpack_from(data, p - VMDESC_HEAD.size)
        if kind != QEMU_VM_VMDESCRIPTION or length != len(data) - p:
            continue
        try:
            desc = json.loads(data[p:].decode("utf-8"))
        except (ValueError, RecursionError):
            return None
        return (size - span + p - VMDESC_HEAD.size, desc) if isinstance(desc, dict) else None
    return None


class _Devices:
    """Device sections decoded through the vmdesc's descriptions (analyze-migration.py's VMSDSection)."""

    def __init__(self, vmdesc: Mapping[str, Any] | None, at: int) -> None:
        self.at = at  # the trailer's offset, for errors in the descriptions
        self.by_key: dict[tuple[str, int], Mapping[str, Any]] = {}
        self.configuration: Mapping[str, Any] | None = None
        self._values = 0  # decoded in the current section
        self._limit = 0  # file size: no field reads past it
        if vmdesc is None:
            return
        devices = vmdesc.get("devices", [])
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise self._bad("'devices' is not a list of objects")
        for d in devices:
            if not isinstance(d.get("name"), str) or not isinstance(d.get("instance_id"), int):
                raise self._bad(f"device description without name and instance_id: {str(d)[:80]}")
            self.by_key[(d["name"], d["instance_id"])] = d
        config = vmdesc.get("configuration")
        self.configuration = config if isinstance(config, dict) else None

    def _bad(self, message: str) -> StreamError:
        return _error(f"vmdesc: {message}", self.at, "vmdesc trailer")

    def decode(self, r: StreamReader, desc: Mapping[str, Any], limit: int) -> dict[str, Any]:
        """Read one described struct (fields, then subsections) at the reader's position."""
        self._values = 0
        self._limit = limit
        return self._struct(r, desc, 0)

    def _struct(self, r: StreamReader, desc: Mapping[str, Any], depth: int) -> dict[str, Any]:
        if depth > _MAX_DEPTH:
            raise self._bad(f"descriptions nested deeper than {_MAX_DEPTH}")
        fields = desc.get("fields", [])
        subsections = desc.get("subsections", [])
        if not isinstance(fields, list) or not isinstance(subsections, list):
            raise self._bad(f"'fields' or 'subsections' of {desc.get('vmsd_name', '?')!r} is not a list")
        out: dict[str, Any] = {}
        for f in fields:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("type"), str):
                raise self._bad(f"field description without name and type: {str(f)[:80]}")
            count = f.get("array_len")
            if count is None:
                out[f["name"]] = self._field(r, f, depth)
            elif isinstance(count, int) and 0 <= count <= _MAX_VALUES:
                out[f["name"]] = [self._field(r, f, depth) for _ in range(count)]
            else:
                raise self._bad(f"field {f['name']!r} has array_len {count!r}")
        for sub in subsections:
            if not isinstance(sub, dict):
                raise self._bad("a subsection description is not an object")
            at = r.offset
            kind = r.get_be8("subsection type")
            if kind != QEMU_VM_SUBSECTION:
                raise _error(f"subsection {sub.get('vmsd_name')!r} expected, found byte {kind:#04x}", at, "subsection")
            n = r.get_be8("subsection name length")
            name = r.get_bytes(n, "subsection name", cap=255).decode("utf-8", "replace")
            r.get_be32("subsection version")
            out[name] = self._struct(r, sub, depth + 1)
        return out

    def _field(self, r: StreamReader, f: Mapping[str, Any], depth: int) -> Any:
        self._values += 1
        if self._values > _MAX_VALUES:
            raise self._bad(f"more than {_MAX_VALUES} values in one section")
        kind, name = f["type"], f["name"]
        if kind == "struct":
            inner = f.get("struct")
            if not isinstance(inner, dict):
                raise self._bad(f"struct field {name!r} without a 'struct' description")
            return self._struct(r, inner, depth + 1)
        if kind == "capability":
            n = r.get_be8(f"{name} length")
            return r.get_bytes(n, name, cap=255).decode("utf-8", "replace")
        if kind == "nullptr":
            at = r.offset
            if r.get_be8(name) != _NULLPTR_MARKER:
                raise _error(f"field {name!r} is not the null-pointer marker", at, "device section")
            return None
        size = f.get("size")
        if not isinstance(size, int) or size < 0:
            raise self._bad(f"field {name!r} has size {size!r}")
        data = r.get_bytes(size, name, cap=self._limit - r.offset)
        if kind in _SIGNED or kind in _UNSIGNED:
            return int.from_bytes(data, "big", signed=kind in _SIGNED)
        if kind == "int32 le":
            return int.from_bytes(data, "little", signed=True)
        if kind == "bool":
            return any(data)
        return data


class _Walk:
    """One pass over a stream file, item by item, keeping what the summary and the digest need."""

    def __init__(self, f: BinaryIO, size: int, *, channel: bool = False, limits: ReaderLimits | None = None) -> None:
        self.size = size
        self.channel = channel
        self.vmdesc: dict[str, Any] | None = None
        self.vmdesc_at: int | None = None
        described = None if channel else find_vmdesc(f, size)
        f.seek(0)
        self.devices = _Devices(described[1] if described else None, described[0] if described else size)
        self.described_at = described[0] if described else None
        self.reader = StreamReader(f, limits or ReaderLimits(), continuation=channel)
        self.digest = RecordDigest()
        self.blocks: dict[str, int] = {}
        self._sent: dict[str, np.ndarray] = {}  # per block, a bit per page sent at least once

    # -- the pages every block got --------------------------------------------------------------------
    def _mark(self, block: str, offsets: Any) -> None:
        sent = self._sent.get(block)
        if sent is not None:
            sent[np.asarray(offsets, np.uint64) // np.uint64(PAGE_SIZE)] = True

    @staticmethod
    def pages_sent(walks: Sequence[_Walk]) -> int:
        """Pages of guest RAM that at least one record of these streams carries."""
        union: dict[str, np.ndarray] = {}
        for walk in walks:
            for name, sent in walk._sent.items():
                if name in union and len(union[name]) == len(sent):
                    union[name] |= sent
                else:
                    union.setdefault(name, sent.copy())
        return int(sum(np.count_nonzero(s) for s in union.values()))

    # -- items ------------------------------------------------------------------------------------------
    def items(self) -> Iterator[StreamItem]:
        return self._channel() if self.channel else self._main()

    def _main(self) -> Iterator[StreamItem]:
        r = self.reader
        version = r.read_header()
        yield StreamItem(0, r.offset, "header", detail={"version": version})
        chunks: dict[int, int] = {}  # RAM section id -> chunks so far
        while True:
            at = r.offset
            sec = r.next_section()
            if isinstance(sec, Eof):
                yield StreamItem(at, r.offset, "eof")
                break
            if isinstance(sec, Configuration):
                detail: dict[str, Any] = {"machine": sec.machine}
                config = self.devices.configuration
                if config and config.get("subsections"):
                    sub = self.devices.decode(r, {"subsections": config["subsections"]}, self.size)
                    detail["subsections"] = _shown(sub)
                yield StreamItem(at, r.offset, "configuration", detail=detail)
            elif isinstance(sec, Footer):
                yield StreamItem(at, r.offset, "footer", section_id=sec.section_id)
            elif isinstance(sec, Command):
                yield StreamItem(at, r.offset, "command", detail={"command": sec.cmd, "data": sec.data.hex()})
            else:
                yield self._section_item(at, r.offset, sec)
                if sec.idstr == RAM_SECTION_IDSTR:
                    chunk = chunks[sec.section_id] = chunks.get(sec.section_id, -1) + 1
                    yield from self._ram_chunk(sec.section_id, chunk)
                elif sec.kind == QEMU_VM_SECTION_FULL:
                    yield self._device(sec)
                else:
                    raise _error(
                        f"iterable section {sec.idstr!r} is not RAM: its records cannot be decoded", at, "section"
                    )
        at = r.offset
        self.vmdesc = r.read_vmdesc()
        if self.vmdesc is not None:
            if self.described_at is not None and self.described_at != at:
                raise _error(f"a second vmdesc trailer ends the file at offset {self.described_at}", at, "vmdesc")
            self.vmdesc_at = at
            yield StreamItem(at, r.offset, "vmdesc", detail=self._vmdesc_detail(self.vmdesc, r.offset - at))
        if not r.at_end():
            raise _error("bytes after the end of the stream", r.offset, "stream")

    def _channel(self) -> Iterator[StreamItem]:
        """A page channel: RAM records (MEM_SIZE first), each chunk ending with EOS, up to the end of file."""
        chunk = 0
        while not self.reader.at_end():
            yield from self._ram_chunk(None, chunk)
            chunk += 1

    @staticmethod
    def _section_item(at: int, end: int, sec: SectionHeader) -> StreamItem:
        detail = {"type": SECTION_TYPES[sec.kind], "idstr": sec.idstr, "instance": sec.instance_id}
        detail["version"] = sec.version_id
        return StreamItem(at, end, "section", section_id=sec.section_id, detail=detail)

    def _ram_chunk(self, section_id: int | None, chunk: int) -> Iterator[StreamItem]:
        r, digest = self.reader, self.digest
        records = r.ram_records()
        while True:
            at = r.offset
            rec = next(records)
            end = r.offset
            if isinstance(rec, Eos):
                yield StreamItem(at, end, "eos", section_id, chunk)
                return
            if isinstance(rec, MemSize):
                self.blocks = dict(rec.blocks)
                self._sent = {name: np.zeros(size // PAGE_SIZE, bool) for name, size in rec.blocks}
                blocks = [{"idstr": name, "size": size} for name, size in rec.blocks]
                yield StreamItem(at, end, "mem-size", section_id, chunk, detail={"blocks": blocks})
            elif isinstance(rec, Page):
                digest.page(rec.block, rec.offset, rec.data)
                self._mark(rec.block, [rec.offset])
                yield StreamItem(at, end, "page", section_id, chunk, rec.block, rec.offset)
            elif isinstance(rec, Zero):
                digest.zero(rec.block, rec.offset)
                self._mark(rec.block, [rec.offset])
                yield StreamItem(at, end, "zero", section_id, chunk, rec.block, rec.offset)
            elif isinstance(rec, EncryptedPages):
                yield from self._encrypted(rec, at, end, section_id, chunk)
            elif isinstance(rec, EncryptedBitmap):
                entries = [(e.start_gpa, e.npages, e.bitmap) for e in rec.entries]
                digest.bitmap(rec.block, entries)
                shown = [
                    {
                        "start-gpa": e.start_gpa,
                        "npages": e.npages,
                        "private": int.from_bytes(e.bitmap, "little").bit_count(),
                    }
                    for e in rec.entries
                ]
                yield StreamItem(at, end, "encryption-bitmap", section_id, chunk, rec.block, detail={"entries": shown})

    def _encrypted(
        self, rec: EncryptedPages, at: int, end: int, section_id: int | None, chunk: int
    ) -> Iterator[StreamItem]:
        detail: dict[str, Any] = {}
        if rec.context is not None:  # digested where it is met, before its page, as the destination does
            self.digest.context(rec.context)
            detail["context"] = {
                "policy": rec.context.policy,
                "pdh": show_bytes(rec.context.pdh),
                "session": show_bytes(rec.context.session),
            }
        self.digest.encrypted(rec.block, rec.offsets, rec.hdrs)
        self._mark(rec.block, rec.offsets)
        offsets = [int(o) for o in rec.offsets]
        if rec.count == 1:
            yield StreamItem(at, end, "encrypted-page", section_id, chunk, rec.block, offsets[0], detail)
            return
        # A run of CONTINUE records, each of the fixed size.
        for i, address in enumerate(offsets):
            start = at + i * ENC_PAGE_RECORD_SIZE
            yield StreamItem(
                start, start + ENC_PAGE_RECORD_SIZE, "encrypted-page", section_id, chunk, rec.block, address
            )

    def _device(self, sec: SectionHeader) -> StreamItem:
        r = self.reader
        at = r.offset
        desc = self.devices.by_key.get((sec.idstr, sec.instance_id))
        detail: dict[str, Any] = {"idstr": sec.idstr, "instance": sec.instance_id, "version": sec.version_id}
        if desc is not None:
            fields = self.devices.decode(r, desc, self.size)
            detail["decoded-by"] = "vmdesc"
            if sec.idstr == VMSA_SECTION_IDSTR:
                self._vmsa_from_fields(sec, fields, at)
        elif sec.idstr == VMSA_SECTION_IDSTR:
            vmsa = r.read_vmsa_section(sec)
            self.digest.vmsa(vmsa.vcpu, vmsa.hdr)
            fields = {"hdr_len": len(vmsa.hdr), "hdr": vmsa.hdr, "trans_len": len(vmsa.trans), "trans": vmsa.trans}
            detail["decoded-by"] = "pysev"
        else:
            why = "no vmdesc trailer ends the file" if self.described_at is None else "the vmdesc does not describe it"
            raise _error(
                f"device section {sec.idstr!r} instance {sec.instance_id} cannot be read: {why}", at, "device section"
            )
        detail["fields"] = _shown(fields)
        return StreamItem(at, r.offset, "device", sec.section_id, detail=detail)

    def _vmsa_from_fields(self, sec: SectionHeader, fields: Mapping[str, Any], at: int) -> None:
        """The digest entry of an ``sev-es-vmsa`` section read through its vmdesc: the fields must be the
        section's own (SEND_UPDATE_VMSA's 52-byte header and 4096-byte page), whatever the vmdesc says."""
        hdr, trans = fields.get("hdr"), fields.get("trans")
        if not (
            list(fields) == [name for name, _, _ in VMSA_FIELDS]
            and fields["hdr_len"] == PACKET_HEADER_SIZE
            and fields["trans_len"] == PAGE_SIZE
            and isinstance(hdr, bytes)
            and len(hdr) == PACKET_HEADER_SIZE
            and isinstance(trans, bytes)
            and len(trans) == PAGE_SIZE
        ):
            raise _error(
                f"{VMSA_SECTION_IDSTR} section of vCPU {sec.instance_id}: the vmdesc describes fields "
                f"{list(fields)} that are not SEND_UPDATE_VMSA's packet",
                at,
                "device section",
            )
        self.digest.vmsa(sec.instance_id, hdr)

    @staticmethod
    def _vmdesc_detail(desc: Mapping[str, Any], length: int) -> dict[str, Any]:
        devices = desc.get("devices")
        if not isinstance(devices, list):
            devices = []
        detail: dict[str, Any] = {
            "length": length,
            "page-size": desc.get("page_size"),
            "devices": [f"{d.get('name')} ({d.get('instance_id')})" for d in devices if isinstance(d, dict)],
        }
        if isinstance(desc.get("pysev"), dict):
            detail["pysev"] = desc["pysev"]
        return detail


def _open(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    f = open(path, "rb")
    return f, os.fstat(f.fileno()).st_size


def iter_records(path: str | os.PathLike[str], *, channel: bool = False) -> Iterator[StreamItem]:
    """Every item of the stream file ``path``, in file order; ``channel=True`` for a page channel's copy
    (``FILE.chN``). Raises ``StreamError`` (naming the offset) on a truncated or malformed file."""
    f, size = _open(path)
    with f:
        yield from _Walk(f, size, channel=channel).items()


def channel_files(path: str | os.PathLike[str]) -> list[str]:
    """The page-channel copies ``--save-stream PATH`` leaves beside ``PATH``: ``PATH.ch1``, ``PATH.ch2``…"""
    out: list[str] = []
    while os.path.isfile(candidate := f"{os.fspath(path)}.ch{len(out) + 1}"):
        out.append(candidate)
    return out


def _digest_of(walks: Sequence[_Walk]) -> StreamDigest:
    main = walks[0]
    pysev = (main.vmdesc or {}).get("pysev")
    stored = pysev.get("record-sha256") if isinstance(pysev, dict) else None
    return StreamDigest(
        main=main.digest.digest().hex(),
        channels=tuple(w.digest.digest().hex() for w in walks[1:]),
        record_sha256=combined_digest([w.digest for w in walks]).hex(),
        stored=stored if isinstance(stored, str) else None,
    )


def record_digest(path: str | os.PathLike[str], channels: Sequence[str | os.PathLike[str]] = ()) -> StreamDigest:
    """The record digest of the stream file ``path`` (and of its page channels' copies, in channel order),
    recomputed as both ends of the migration computed it."""
    walks = []
    for i, p in enumerate([path, *channels]):
        f, size = _open(p)
        with f:
            walk = _Walk(f, size, channel=i > 0)
            for _ in walk.items():
                pass
        walks.append(walk)
    return _digest_of(walks)


def summarize(
    path: str | os.PathLike[str], channels: Sequence[str | os.PathLike[str]] | None = None, *, records: bool = False
) -> dict[str, Any]:
    """Everything ``pysev stream dump`` shows, as one JSON-ready dict: sections, RAM chunks (passes),
    totals, the SEND_START context, device sections, the vmdesc trailer and the record digest, and with
    ``records`` every item. ``channels`` None: the ``PATH.chN`` files beside ``path``."""
    channels = channel_files(path) if channels is None else [os.fspath(c) for c in channels]
    out: dict[str, Any] = {"file": os.fspath(path)}
    walks: list[_Walk] = []
    chunks: dict[int, dict[str, Any]] = {}
    sections: dict[int, dict[str, Any]] = {}
    totals = dict.fromkeys(("page", "zero", "encrypted-page", "encryption-bitmap", "device"), 0)
    devices: list[dict[str, Any]] = []
    listed: list[dict[str, Any]] = []
    context = None
    for i, p in enumerate([path, *channels]):
        f, size = _open(p)
        with f:
            walk = _Walk(f, size, channel=i > 0)
            walks.append(walk)
            section_type, section_at = "start", 0
            for item in walk.items():
                if records:
                    listed.append({"stream": i, **item.to_json()} if channels else item.to_json())
                kind = item.kind
                if kind == "header":
                    out.update(size=size, version=item.detail["version"], configuration=None)
                elif kind == "configuration":
                    out["configuration"] = item.detail["machine"]
                elif kind == "section":
                    sid = item.section_id
                    assert sid is not None
                    section_type, section_at = item.detail["type"], item.offset
                    if section_type in ("start", "full"):
                        sections[sid] = {"id": sid, **item.detail, "offset": item.offset}
                        del sections[sid]["type"]
                        sections[sid]["kind"] = "iterable" if section_type == "start" else "device"
                elif kind == "device":
                    devices.append({"offset": item.offset, "end": item.end, **item.detail})
                    totals["device"] += 1
                elif item.chunk is not None:
                    c = chunks.setdefault(
                        item.chunk,
                        {"pass": item.chunk, "section": section_type, "offset": section_at, "end": item.end}
                        | dict.fromkeys(("page", "zero", "encrypted-page", "encryption-bitmap"), 0)
                        | {"channel-encrypted-pages": 0},
                    )
                    if i == 0:
                        c["end"] = item.end
                        if kind in c:
                            c[kind] += 1
                    elif kind == "encrypted-page":
                        c["channel-encrypted-pages"] += 1
                    if kind in totals:
                        totals[kind] += 1
                    if "context" in item.detail:
                        context = {"offset": item.offset, **item.detail["context"]}
    main = walks[0]
    for c in chunks.values():
        c["bytes"] = c["end"] - c["offset"]
    blocks = main.blocks
    total_pages = sum(blocks.values()) // PAGE_SIZE
    sent = _Walk.pages_sent(walks)
    digest = _digest_of(walks)
    covers = "the main stream" + (f" and {len(channels)} page channel(s)" if channels else "")
    notes = []
    if sent < total_pages:
        notes.append(
            f"{total_pages - sent:,} of the {total_pages:,} pages of guest RAM are in no record here: a migration "
            "with page channels (--channels N) carried them there, and --save-stream FILE keeps those as "
            "FILE.ch1…, not found beside this file; the digest then covers this file's records only"
        )
    if digest.stored is None:
        notes.append("no digest is stored in the file (only a file migration stores one)")
    out.update(
        {
            "channels": channels,
            "sev": totals["encrypted-page"] > 0 or context is not None,
            "blocks": [{"idstr": k, "size": v} for k, v in blocks.items()],
            "sections": list(sections.values()),
            "passes": [chunks[k] for k in sorted(chunks)],
            "totals": totals,
            "pages": {"guest": total_pages, "sent": sent},
            "context": context,
            "devices": devices,
            "vmdesc": None,
            "digest": {
                "main": digest.main,
                "channels": list(digest.channels),
                "record-sha256": digest.record_sha256,
                "covers": covers,
                "stored": digest.stored,
                "matches": digest.matches,
                "notes": notes,
            },
        }
    )
    if main.vmdesc is not None and main.vmdesc_at is not None:
        out["vmdesc"] = {"offset": main.vmdesc_at, **_Walk._vmdesc_detail(main.vmdesc, main.size - main.vmdesc_at)}
    if records:
        out["records"] = listed
    return out


__all__ = [
    "KINDS",
    "StreamDigest",
    "StreamItem",
    "channel_files",
    "find_vmdesc",
    "iter_records",
    "record_digest",
    "show_bytes",
    "summarize",
]
