"""``pysev stream dump`` and its library, ``pysev.migration.stream.dump``: every item of a saved stream with
its offsets, RAM chunks as passes, the SEND_START context, device sections decoded through the vmdesc
trailer (as QEMU's analyze-migration.py decodes them), the record digest both ends compare, and one
clear error naming the offset for a truncated or corrupt file."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from pysev.cli import main
from pysev.migration import stream
from pysev.migration.stream.dump import (
    KINDS,
    channel_files,
    iter_records,
    record_digest,
    summarize,
)

DATA = Path(__file__).parent / "data" / "streams"
SEV_FILE = DATA / "sev_guest.mig"
PLAIN_FILE = DATA / "plain_guest.mig"
PAGE = 4096


def dump_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["stream", "dump", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_tiles(items, size: int) -> None:
    """The items cover the file exactly, in order, without gap or overlap."""
    end = 0
    for item in items:
        assert item.offset == end and item.end > item.offset, item
        end = item.end
    assert end == size


# ------------------------------------------------------------------------------------ golden streams
def test_sev_stream_records_offsets_and_passes():
    items = list(iter_records(SEV_FILE))
    assert_tiles(items, SEV_FILE.stat().st_size)
    assert {i.kind for i in items} <= set(KINDS)
    pages = [(i.kind, i.chunk, i.block, i.address) for i in items if i.kind in ("page", "zero", "encrypted-page")]
    assert pages[:5] == [
        ("page", 1, "pc.ram", 0x0000),
        ("zero", 1, "pc.ram", 0x1000),
        ("page", 1, "vga.vram", 0x0000),
        ("zero", 1, "vga.vram", 0x3000),
        ("encrypted-page", 1, "pc.ram", 0x2000),
    ]
    first = next(i for i in items if i.kind == "encrypted-page")
    assert first.detail["context"]["policy"] == 0x0011_0005
    # A CONTINUE run: fixed-size records one after the other.
    run = [i for i in items if i.kind == "encrypted-page" and i.chunk == 2 and i.block == "vga.vram"]
    assert [i.end - i.offset for i in run[1:]] == [stream.ENC_PAGE_RECORD_SIZE] * 3
    bitmap = next(i for i in items if i.kind == "encryption-bitmap")
    assert bitmap.chunk == 3 and bitmap.detail["entries"][0]["npages"] == 16
    # One EOS per chunk: START (the blocks), two passes, the stop-and-copy END.
    assert [i.chunk for i in items if i.kind == "eos"] == [0, 1, 2, 3]

    s = summarize(SEV_FILE)
    assert s["sev"] is True and s["configuration"] == "pc-q35-sev" and s["version"] == 3
    assert [(p["pass"], p["section"]) for p in s["passes"]] == [(0, "start"), (1, "part"), (2, "part"), (3, "end")]
    assert [p["encrypted-page"] for p in s["passes"]] == [0, 4, 4, 1]
    assert s["totals"] == {"page": 4, "zero": 3, "encrypted-page": 9, "encryption-bitmap": 1, "device": 2}
    assert s["context"]["offset"] == first.offset and s["context"]["pdh"]["bytes"] == 2084
    assert s["vmdesc"]["devices"] == ["sev-es-vmsa (0)", "sev-es-vmsa (1)"]


def test_plain_stream():
    s = summarize(PLAIN_FILE, records=True)
    assert s["sev"] is False and s["context"] is None and s["devices"] == []
    assert s["totals"]["encrypted-page"] == 0 and s["totals"]["page"] == 4
    assert s["records"][-1]["kind"] == "vmdesc" and s["records"][-1]["end"] == PLAIN_FILE.stat().st_size


def test_device_section_decoded_through_the_vmdesc(tmp_path):
    """The sev-es-vmsa sections are described in the vmdesc: decoded through it, with the same fields and
    digest as pysev's own reader gives for the same file without a trailer."""
    s = summarize(SEV_FILE)
    vmsa = s["devices"][0]
    assert vmsa["decoded-by"] == "vmdesc" and (vmsa["idstr"], vmsa["instance"]) == ("sev-es-vmsa", 0)
    assert vmsa["fields"]["hdr_len"] == 52 and vmsa["fields"]["trans_len"] == PAGE
    assert len(bytes.fromhex(vmsa["fields"]["hdr"])) == 52 and vmsa["fields"]["trans"]["bytes"] == PAGE

    bare = tmp_path / "no-trailer.mig"
    bare.write_bytes(SEV_FILE.read_bytes()[: s["vmdesc"]["offset"]])  # ends right after EOF
    t = summarize(bare)
    assert t["vmdesc"] is None and t["devices"][0]["decoded-by"] == "pysev"
    assert [d["fields"] for d in t["devices"]] == [d["fields"] for d in s["devices"]]
    assert t["digest"]["record-sha256"] == s["digest"]["record-sha256"]


def test_vmdesc_that_misdescribes_the_vmsa_is_refused(tmp_path):
    data = SEV_FILE.read_bytes()
    at = summarize(SEV_FILE)["vmdesc"]["offset"]
    desc = json.loads(data[at + 5 :])
    desc["devices"][0]["fields"][1]["size"] = 16  # hdr: 16 bytes instead of 52
    bad = tmp_path / "lying.mig"
    buf = io.BytesIO()
    w = stream.StreamWriter(buf)
    w.write_vmdesc(desc)
    w.close()
    bad.write_bytes(data[:at] + buf.getvalue())
    with pytest.raises(stream.StreamError, match="not SEND_UPDATE_VMSA's packet") as err:
        summarize(bad)
    assert err.value.offset == summarize(SEV_FILE)["devices"][0]["offset"]


# ------------------------------------------------------------------------------ a QEMU-style stream
def qemu_stream() -> tuple[bytes, dict]:
    """What a QEMU without SEV saves: configuration with a subsection, RAM, device sections described only
    by the vmdesc (fields of several types, an array, a struct, a subsection), EOF, the trailer."""
    buf = io.BytesIO()
    w = stream.StreamWriter(buf)
    w.write_header("pc-q35-8.2")
    w.put_be8(stream.QEMU_VM_SUBSECTION)
    w.put_be8(len(b"configuration/uuid"))
    w.put_bytes(b"configuration/uuid")
    w.put_be32(1)
    w.put_bytes(bytes(range(16)))
    w.section_start(2, "ram", 0, 4)
    w.ram_mem_size([("pc.ram", 4 * PAGE)])
    w.ram_eos()
    w.section_footer(2)
    w.section_end(2)
    w.ram_page("pc.ram", 0, bytes([7]) * PAGE)
    w.ram_zero_page("pc.ram", PAGE)
    w.ram_eos()
    w.section_footer(2)
    w.section_full(3, "timer", 0, 2)
    w.put_be64((1 << 64) - 5)  # int64 -5
    w.put_be64(42)
    w.put_be8(1)  # bool
    w.put_bytes((-2).to_bytes(4, "little", signed=True))  # int32 le
    w.put_bytes(bytes([1, 2, 3]))  # uint8[3]
    w.put_be16(0xBEEF)  # struct { uint16 a; buffer b[3] }
    w.put_bytes(b"xyz")
    w.put_be8(stream.QEMU_VM_SUBSECTION)
    w.put_be8(len(b"timer/dummy"))
    w.put_bytes(b"timer/dummy")
    w.put_be32(1)
    w.put_be32(0xCAFE)
    w.section_footer(3)
    w.write_eof()
    vmdesc = stream.default_vmdesc(
        "pc-q35-8.2",
        [
            {
                "name": "timer",
                "instance_id": 0,
                "vmsd_name": "timer",
                "version": 2,
                "fields": [
                    {"name": "cpu_ticks_offset", "type": "int64", "size": 8},
                    {"name": "dummy", "type": "uint64", "size": 8},
                    {"name": "enabled", "type": "bool", "size": 1},
                    {"name": "le", "type": "int32 le", "size": 4},
                    {"name": "regs", "type": "uint8", "size": 1, "array_len": 3},
                    {
                        "name": "pair",
                        "type": "struct",
                        "size": 5,
                        "struct": {
                            "vmsd_name": "pair",
                            "version": 1,
                            "fields": [
                                {"name": "a", "type": "uint16", "size": 2},
                                {"name": "b", "type": "buffer", "size": 3},
                            ],
                        },
                    },
                ],
                "subsections": [
                    {"vmsd_name": "timer/dummy", "version": 1, "fields": [{"name": "x", "type": "uint32", "size": 4}]}
                ],
            }
        ],
    )
    vmdesc["configuration"]["subsections"] = [
        {"vmsd_name": "configuration/uuid", "version": 1, "fields": [{"name": "uuid", "type": "buffer", "size": 16}]}
    ]
    w.write_vmdesc(vmdesc)
    w.close()
    return buf.getvalue(), vmdesc


def test_qemu_stream_device_sections_through_the_vmdesc(tmp_path):
    data, _ = qemu_stream()
    path = tmp_path / "qemu.mig"
    path.write_bytes(data)
    items = list(iter_records(path))
    assert_tiles(items, len(data))
    config = next(i for i in items if i.kind == "configuration")
    assert config.detail == {
        "machine": "pc-q35-8.2",
        "subsections": {"configuration/uuid": {"uuid": bytes(range(16)).hex()}},
    }
    timer = next(i for i in items if i.kind == "device")
    assert timer.detail["decoded-by"] == "vmdesc"
    assert timer.detail["fields"] == {
        "cpu_ticks_offset": -5,
        "dummy": 42,
        "enabled": True,
        "le": -2,
        "regs": [1, 2, 3],
        "pair": {"a": 0xBEEF, "b": b"xyz".hex()},
        "timer/dummy": {"x": 0xCAFE},
    }
    s = summarize(path)
    assert s["sev"] is False and s["pages"] == {"guest": 4, "sent": 2}


def test_device_section_without_a_description_names_its_offset(tmp_path):
    data, vmdesc = qemu_stream()
    eof = data.rindex(bytes([stream.QEMU_VM_EOF, stream.QEMU_VM_VMDESCRIPTION]))
    vmdesc["devices"] = []
    buf = io.BytesIO()
    w = stream.StreamWriter(buf)
    w.write_vmdesc(vmdesc)
    w.close()
    described = tmp_path / "described.mig"
    described.write_bytes(data)
    header = next(i for i in iter_records(described) if i.kind == "section" and i.detail["idstr"] == "timer")
    path = tmp_path / "undescribed.mig"
    path.write_bytes(data[: eof + 1] + buf.getvalue())
    with pytest.raises(
        stream.StreamError, match="'timer' instance 0 cannot be read: the vmdesc does not describe it"
    ) as err:
        list(iter_records(path))
    assert err.value.offset == header.end  # where the section's body starts


# ---------------------------------------------------------------------------------- damaged files
def test_truncated_stream(tmp_path, capsys):
    data = SEV_FILE.read_bytes()
    for cut in (3, 500, 20_000, len(data) - 300):
        path = tmp_path / f"cut{cut}.mig"
        path.write_bytes(data[:cut])
        with pytest.raises(stream.StreamError, match="truncated") as err:
            list(iter_records(path))
        assert err.value.offset <= cut
        rc, out, err_text = dump_cli(capsys, path)
        assert rc == 2 and out == ""
        assert len(err_text.splitlines()) == 1 and f"at offset {err.value.offset}" in err_text, err_text
        assert "truncated" in err_text and "Traceback" not in err_text


def test_corrupt_stream(tmp_path, capsys):
    items = list(iter_records(SEV_FILE))
    page = next(i for i in items if i.kind == "page")
    data = bytearray(SEV_FILE.read_bytes())
    data[page.offset + 7] |= 0x40  # XBZRLE in the flags of the first page's header
    path = tmp_path / "corrupt.mig"
    path.write_bytes(data)
    with pytest.raises(stream.StreamError, match="unsupported RAM flag XBZRLE") as err:
        summarize(path)
    assert err.value.offset == page.offset
    rc, _, err_text = dump_cli(capsys, path)
    assert rc == 2 and f"at offset {page.offset}" in err_text and len(err_text.splitlines()) == 1


# ----------------------------------------------------------------------- streams pysev migrate saves
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A file migration (stores its digest) and a --save-stream copy with two page channels."""
    import contextlib

    tmp = tmp_path_factory.mktemp("saved")
    runs = {}
    for name, argv in (
        ("file", ["--transport", f"file:{tmp / 'guest.mig'}"]),
        ("channels", ["--channels", "2", "--save-stream", str(tmp / "copy.mig")]),
    ):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["migrate", "--memory", "32M", "--json", "--dirty-rate", "20M", *argv])
        assert rc == 0
        runs[name] = json.loads(out.getvalue().strip().splitlines()[-1])
    return tmp, runs


def test_file_migration_digest_matches_and_passes_line_up(saved, capsys):
    tmp, runs = saved
    path = tmp / "guest.mig"
    digest = record_digest(path)
    assert digest.stored is not None and digest.matches is True
    rc, out, _ = dump_cli(capsys, path, "--json")
    s = json.loads(out)
    assert rc == 0 and s["digest"]["matches"] is True and s["digest"]["notes"] == []
    # Chunk n is pass n: the same pages the migration reported per pass.
    migrated = runs["file"]["passes"]
    assert len(s["passes"]) == len(migrated) + 1
    for chunk, reported in zip(s["passes"][1:], migrated, strict=True):
        assert chunk["page"] + chunk["zero"] + chunk["encrypted-page"] == reported["pages"]
    assert s["pages"]["sent"] == s["pages"]["guest"]
    assert s["context"]["policy"] == 0x11000020 and s["context"]["policy-flags"] == ["SEV"]

    rc, out, _ = dump_cli(capsys, path)
    assert rc == 0 and "matches the digest stored in the file" in out and "SEND_START context" in out


def test_file_whose_records_changed_fails_its_digest(saved, tmp_path, capsys):
    tmp, _ = saved
    data = bytearray((tmp / "guest.mig").read_bytes())
    page = next(i for i in iter_records(tmp / "guest.mig") if i.kind == "page")
    data[page.end - 1] ^= 0xFF  # the last byte of a page in the clear: the structure stays valid
    path = tmp_path / "changed.mig"
    path.write_bytes(data)
    assert record_digest(path).matches is False
    rc, out, _ = dump_cli(capsys, path)
    assert rc == 1 and "DIFFERS" in out


def test_saved_stream_with_page_channels(saved, tmp_path, capsys):
    tmp, runs = saved
    path = tmp / "copy.mig"
    assert channel_files(path) == [f"{path}.ch1", f"{path}.ch2"]
    s = summarize(path)
    assert s["channels"] == channel_files(path) and s["pages"]["sent"] == s["pages"]["guest"]
    assert sum(p["channel-encrypted-pages"] for p in s["passes"]) > 0
    assert s["digest"]["covers"] == "the main stream and 2 page channel(s)"
    assert s["digest"]["record-sha256"] == record_digest(path, channel_files(path)).record_sha256

    # The main stream alone: the dump says the channels' pages are not in it.
    alone = tmp_path / "main-only.mig"
    shutil.copy(path, alone)
    rc, out, _ = dump_cli(capsys, alone, "--json", "--records")
    t = json.loads(out)
    assert rc == 0 and t["channels"] == [] and t["digest"]["covers"] == "the main stream"
    assert t["digest"]["record-sha256"] != s["digest"]["record-sha256"]
    assert any("page channels" in note for note in t["digest"]["notes"])
    assert t["pages"]["sent"] < t["pages"]["guest"]
    assert t["records"][0] == {"offset": 0, "end": 8, "kind": "header", "version": 3}


def test_json_schema(capsys):
    rc, out, _ = dump_cli(capsys, SEV_FILE, "--json", "--records")
    s = json.loads(out)
    assert rc == 0
    assert set(s) == {
        "file", "size", "version", "configuration", "channels", "sev", "blocks", "sections", "passes", "totals",
        "pages", "context", "devices", "vmdesc", "digest", "records",
    }  # fmt: skip
    assert set(s["digest"]) == {"main", "channels", "record-sha256", "covers", "stored", "matches", "notes"}
    assert set(s["passes"][0]) == {
        "pass", "section", "offset", "end", "bytes", "page", "zero", "encrypted-page", "encryption-bitmap",
        "channel-encrypted-pages",
    }  # fmt: skip
    assert set(s["context"]) == {"offset", "policy", "policy-flags", "policy-api", "pdh", "session"}
    assert set(s["sections"][0]) == {"id", "idstr", "instance", "version", "kind", "offset"}
    assert {r["kind"] for r in s["records"]} <= set(KINDS)
    assert all(isinstance(r["offset"], int) and isinstance(r["end"], int) for r in s["records"])
    rc, out, _ = dump_cli(capsys, SEV_FILE, "--records")
    assert rc == 0 and "encryption-bitmap" in out and "sev-es-vmsa" in out
