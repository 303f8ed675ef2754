"""Golden migration streams: the wire bytes pinned in ``tests/data/streams/``.

``sev_guest_stream()`` writes every record type an SEV-ES guest's migration carries: file header,
configuration, the RAM section (START with MEM_SIZE for two blocks; PART with plain, zero and encrypted
pages, the first one carrying the SEND_START context, then CONTINUE records, a batch and a RecordRing
batch; END with the page-encryption bitmap), footers, one ``sev-es-vmsa`` FULL section per vCPU, EOF and
the vmdesc trailer. ``plain_guest_stream()`` is the same guest without SEV.

The saved files never change: when the writer's API changes, the builders change and must still
produce these bytes. Every payload byte comes from SHAKE-256 of a label, so the builders are
deterministic whatever the numpy version. ``python tests/test_stream_golden.py --write`` creates a
missing file; it never overwrites one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pysev.migration import stream

DATA = Path(__file__).parent / "data" / "streams"
SEV_FILE = DATA / "sev_guest.mig"
PLAIN_FILE = DATA / "plain_guest.mig"

PAGE = 4096
MACHINE = "pc-q35-sev"
RAM_ID = 2  # section ids as the engine numbers them: RAM, then one per vCPU
VMSA_ID = 3
BLOCKS = [("pc.ram", 16 * PAGE), ("vga.vram", 4 * PAGE)]
VCPUS = 2
POLICY = 0x0011_0005  # NODBG | ES, API 17.0


def payload(label: str, n: int) -> bytes:
    return hashlib.shake_256(f"pysev golden stream/{label}".encode()).digest(n)


def rows(label: str, k: int, width: int) -> np.ndarray:
    return np.frombuffer(payload(label, k * width), np.uint8).reshape(k, width).copy()


def records(hdrs, trans) -> np.ndarray:
    """Encrypted-page records holding these packets, as SEND_UPDATE_DATA leaves them."""
    rec = np.zeros(len(hdrs), stream.ENC_PAGE_RECORD)
    rec["hdr"] = np.frombuffer(b"".join(map(bytes, hdrs)), np.uint8).reshape(-1, 52)
    rec["trans"] = np.frombuffer(b"".join(map(bytes, trans)), np.uint8).reshape(-1, PAGE)
    return rec


def context() -> stream.SevContext:
    return stream.SevContext(POLICY, payload("pdh", 2084), payload("session", 128))


def sev_guest_stream() -> bytes:
    buf = io.BytesIO()
    w = stream.StreamWriter(buf)
    w.write_header(MACHINE)
    w.section_start(RAM_ID, "ram", 0, 4)
    w.ram_mem_size(BLOCKS)
    w.ram_eos()
    w.section_footer(RAM_ID)

    # first pass: shared pages in the clear, then private ones
    w.section_part(RAM_ID)
    w.ram_page("pc.ram", 0x0000, payload("page pc.ram 0", PAGE))
    w.ram_zero_page("pc.ram", 0x1000)
    w.ram_page("vga.vram", 0x0000, payload("page vga.vram 0", PAGE))
    w.ram_zero_page("vga.vram", 0x3000)
    hdrs, trans = rows("enc hdr pass 1", 4, 52), rows("enc trans pass 1", 4, PAGE)
    w.sev_encrypted_pages("pc.ram", [0x2000], records(hdrs[:1], trans[:1]), context())  # names the block + context
    w.sev_encrypted_pages("pc.ram", [0x3000], records(hdrs[1:2], trans[1:2]))  # CONTINUE
    w.sev_encrypted_pages("pc.ram", np.array([0x5000, 0x4000], np.uint64), records(hdrs[2:], trans[2:]))
    w.ram_eos()
    w.section_footer(RAM_ID)

    # second pass: a named encrypted record without the context, then a ring batch in two slices
    w.section_part(RAM_ID)
    hdrs, trans = rows("enc hdr pass 2", 4, 52), rows("enc trans pass 2", 4, PAGE)
    w.sev_encrypted_pages("vga.vram", [0x1000], records(hdrs[:1], trans[:1]))
    ring = stream.RecordRing(w, 2)
    assert ring.begin("vga.vram", np.array([0x2000, 0x3000, 0x0000], np.uint64))
    for start, stop in ((0, 2), (2, 3)):
        ring.hdr[: stop - start] = hdrs[1 + start : 1 + stop]
        ring.trans[: stop - start] = trans[1 + start : 1 + stop]
        ring.put(start, stop)
    w.ram_page("pc.ram", 0x7000, payload("page pc.ram 7", PAGE))
    w.ram_eos()
    w.section_footer(RAM_ID)

    # stop and copy: the last dirty pages, then the page-encryption bitmap of pc.ram (named again)
    w.section_end(RAM_ID)
    w.ram_zero_page("pc.ram", 0x8000)
    w.sev_encrypted_pages("pc.ram", [0xA000], records([payload("enc hdr end", 52)], [payload("enc trans end", PAGE)]))
    w.ram_page("vga.vram", 0x2000, payload("page vga.vram 2", PAGE))
    w.sev_encrypted_bitmap("pc.ram", [(0, 16, payload("bitmap pc.ram", 2) + bytes(6))])
    w.ram_eos()
    w.section_footer(RAM_ID)

    for vcpu in range(VCPUS):
        hdr, trans = payload(f"vmsa hdr {vcpu}", 52), payload(f"vmsa trans {vcpu}", PAGE)
        w.sev_es_vmsa_section(VMSA_ID + vcpu, vcpu, hdr, trans)
    w.write_eof()
    w.write_vmdesc(stream.default_vmdesc(MACHINE, [stream.vmsa_vmdesc(vcpu) for vcpu in range(VCPUS)]))
    w.close()
    return buf.getvalue()


def plain_guest_stream() -> bytes:
    buf = io.BytesIO()
    w = stream.StreamWriter(buf)
    w.write_header(MACHINE)
    w.section_start(RAM_ID, "ram", 0, 4)
    w.ram_mem_size(BLOCKS)
    w.ram_eos()
    w.section_footer(RAM_ID)
    w.section_part(RAM_ID)
    w.ram_page("pc.ram", 0x0000, payload("plain pc.ram 0", PAGE))
    w.ram_page("pc.ram", 0x1000, payload("plain pc.ram 1", PAGE))
    w.ram_zero_page("pc.ram", 0x2000)
    w.ram_zero_page("vga.vram", 0x0000)
    w.ram_page("vga.vram", 0x1000, payload("plain vga.vram 1", PAGE))
    w.ram_eos()
    w.section_footer(RAM_ID)
    w.section_end(RAM_ID)
    w.ram_page("pc.ram", 0xF000, payload("plain pc.ram 15", PAGE))
    w.ram_eos()
    w.section_footer(RAM_ID)
    w.write_eof()
    w.write_vmdesc(stream.default_vmdesc(MACHINE))
    w.close()
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- read back
def read_back(data: bytes) -> list[tuple]:
    """Every item of the stream as a plain tuple (encrypted pages one by one)."""
    r = stream.StreamReader(io.BytesIO(data), ram_blocks=dict(BLOCKS))
    out: list[tuple] = [("header", r.read_header())]
    while True:
        sec = r.next_section()
        if isinstance(sec, stream.Eof):
            out.append(("eof",))
            break
        if isinstance(sec, stream.Configuration):
            out.append(("configuration", sec.machine))
        elif isinstance(sec, stream.Footer):
            out.append(("footer", sec.section_id))
        elif sec.idstr == stream.VMSA_SECTION_IDSTR:
            out.append(("section", sec.kind, sec.section_id, sec.idstr, sec.instance_id, sec.version_id))
            vmsa = r.read_vmsa_section(sec)
            out.append(("vmsa", vmsa.vcpu, vmsa.hdr, vmsa.trans))
        else:
            out.append(("section", sec.kind, sec.section_id, sec.idstr, sec.instance_id, sec.version_id))
            for rec in r.ram_records():
                if isinstance(rec, stream.MemSize):
                    out.append(("mem_size", rec.blocks))
                elif isinstance(rec, stream.Page):
                    out.append(("page", rec.block, rec.offset, rec.data))
                elif isinstance(rec, stream.Zero):
                    out.append(("zero", rec.block, rec.offset))
                elif isinstance(rec, stream.EncryptedPages):
                    for i in range(rec.count):
                        out.append(
                            (
                                "encrypted",
                                rec.block,
                                int(rec.offsets[i]),
                                rec.context if i == 0 else None,
                                rec.hdrs[i].tobytes(),
                                rec.trans[i].tobytes(),
                            )
                        )
                elif isinstance(rec, stream.EncryptedBitmap):
                    out.append(("bitmap", rec.block, tuple(tuple(e) for e in rec.entries)))
                else:
                    out.append(("eos",))
    out.append(("vmdesc", r.read_vmdesc()))
    assert r.at_end()
    return out


def expected_sev() -> list[tuple]:
    start, part, end, full = (
        stream.QEMU_VM_SECTION_START,
        stream.QEMU_VM_SECTION_PART,
        stream.QEMU_VM_SECTION_END,
        stream.QEMU_VM_SECTION_FULL,
    )
    h1, t1 = rows("enc hdr pass 1", 4, 52), rows("enc trans pass 1", 4, PAGE)
    h2, t2 = rows("enc hdr pass 2", 4, 52), rows("enc trans pass 2", 4, PAGE)
    out = [
        ("header", 3),
        ("configuration", MACHINE),
        ("section", start, RAM_ID, "ram", 0, 4),
        ("mem_size", tuple(BLOCKS)),
        ("eos",),
        ("footer", RAM_ID),
        ("section", part, RAM_ID, "ram", 0, 4),
        ("page", "pc.ram", 0x0000, payload("page pc.ram 0", PAGE)),
        ("zero", "pc.ram", 0x1000),
        ("page", "vga.vram", 0x0000, payload("page vga.vram 0", PAGE)),
        ("zero", "vga.vram", 0x3000),
    ]
    for i, off in enumerate((0x2000, 0x3000, 0x5000, 0x4000)):
        out.append(("encrypted", "pc.ram", off, context() if i == 0 else None, h1[i].tobytes(), t1[i].tobytes()))
    out += [("eos",), ("footer", RAM_ID), ("section", part, RAM_ID, "ram", 0, 4)]
    for i, off in enumerate((0x1000, 0x2000, 0x3000, 0x0000)):
        out.append(("encrypted", "vga.vram", off, None, h2[i].tobytes(), t2[i].tobytes()))
    out += [
        ("page", "pc.ram", 0x7000, payload("page pc.ram 7", PAGE)),
        ("eos",),
        ("footer", RAM_ID),
        ("section", end, RAM_ID, "ram", 0, 4),
        ("zero", "pc.ram", 0x8000),
        ("encrypted", "pc.ram", 0xA000, None, payload("enc hdr end", 52), payload("enc trans end", PAGE)),
        ("page", "vga.vram", 0x2000, payload("page vga.vram 2", PAGE)),
        ("bitmap", "pc.ram", ((0, 16, payload("bitmap pc.ram", 2) + bytes(6)),)),
        ("eos",),
        ("footer", RAM_ID),
    ]
    for vcpu in range(VCPUS):
        out += [
            ("section", full, VMSA_ID + vcpu, "sev-es-vmsa", vcpu, 1),
            ("vmsa", vcpu, payload(f"vmsa hdr {vcpu}", 52), payload(f"vmsa trans {vcpu}", PAGE)),
            ("footer", VMSA_ID + vcpu),
        ]
    return out + [("eof",), ("vmdesc", stream.default_vmdesc(MACHINE, [stream.vmsa_vmdesc(v) for v in range(VCPUS)]))]


def expected_plain() -> list[tuple]:
    part, end = stream.QEMU_VM_SECTION_PART, stream.QEMU_VM_SECTION_END
    return [
        ("header", 3),
        ("configuration", MACHINE),
        ("section", stream.QEMU_VM_SECTION_START, RAM_ID, "ram", 0, 4),
        ("mem_size", tuple(BLOCKS)),
        ("eos",),
        ("footer", RAM_ID),
        ("section", part, RAM_ID, "ram", 0, 4),
        ("page", "pc.ram", 0x0000, payload("plain pc.ram 0", PAGE)),
        ("page", "pc.ram", 0x1000, payload("plain pc.ram 1", PAGE)),
        ("zero", "pc.ram", 0x2000),
        ("zero", "vga.vram", 0x0000),
        ("page", "vga.vram", 0x1000, payload("plain vga.vram 1", PAGE)),
        ("eos",),
        ("footer", RAM_ID),
        ("section", end, RAM_ID, "ram", 0, 4),
        ("page", "pc.ram", 0xF000, payload("plain pc.ram 15", PAGE)),
        ("eos",),
        ("footer", RAM_ID),
        ("eof",),
        ("vmdesc", stream.default_vmdesc(MACHINE)),
    ]


# ----------------------------------------------------------------------------------------------- tests
def test_sev_guest_stream_bytes_are_pinned():
    assert sev_guest_stream() == SEV_FILE.read_bytes()


def test_plain_guest_stream_bytes_are_pinned():
    assert plain_guest_stream() == PLAIN_FILE.read_bytes()


def test_sev_guest_stream_reads_back():
    assert read_back(SEV_FILE.read_bytes()) == expected_sev()


def test_plain_guest_stream_reads_back():
    assert read_back(PLAIN_FILE.read_bytes()) == expected_plain()


@pytest.mark.skipif(not os.environ.get("PYSEV_ANALYZE_MIGRATION"), reason="PYSEV_ANALYZE_MIGRATION not set")
def test_plain_guest_stream_is_read_by_analyze_migration(tmp_path):
    """QEMU's scripts/analyze-migration.py extracts the plain guest's RAM from the pinned file."""
    res = subprocess.run(
        [sys.executable, os.environ["PYSEV_ANALYZE_MIGRATION"], "-f", str(PLAIN_FILE), "-x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    ram = bytearray(16 * PAGE)
    for idx, label in ((0, "plain pc.ram 0"), (1, "plain pc.ram 1"), (15, "plain pc.ram 15")):
        ram[idx * PAGE : (idx + 1) * PAGE] = payload(label, PAGE)
    assert (tmp_path / "pc.ram").read_bytes() == ram
    assert (tmp_path / "vga.vram").read_bytes() == bytes(PAGE) + payload("plain vga.vram 1", PAGE) + bytes(2 * PAGE)
    sizes = json.loads((tmp_path / "state.json").read_text())["ram (2)"]["section sizes"]
    assert sizes == {"pc.ram": f"{16 * PAGE:#018x}", "vga.vram": f"{4 * PAGE:#018x}"}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_stream_golden.py --write   (creates missing golden files only)")
    DATA.mkdir(parents=True, exist_ok=True)
    for path, build in ((SEV_FILE, sev_guest_stream), (PLAIN_FILE, plain_guest_stream)):
        if path.exists():
            print(f"{path} exists: left as it is")
        else:
            path.write_bytes(build())
            print(f"{path}: {path.stat().st_size} bytes written")
