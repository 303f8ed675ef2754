"""The semantic attacks a malicious hypervisor (or anyone on the wire) can mount on an SEV migration stream,
one test each, with SEV's answer and pysev's.

SEV's answer is the firmware's, shown by driving two simulated PSPs directly: the packet MAC covers FLAGS,
IV, lengths and ciphertext (``docs/formats.md``, "Packet header and MAC") but neither the guest address
nor a sequence number, and a session is bound to the two platforms' PDH keys but not to a moment. So
RECEIVE_UPDATE_DATA accepts a packet replayed, redirected or never followed by its re-send, and
RECEIVE_START accepts an old session again: the firmware accepts every attack here.

pysev's answer comes from real in-process migrations (16 MiB SEV guests) through a man in the middle of
the main connection (``Relay``) that rewrites the stream. Both ends keep the record digest
(``pysev.migration.commit``); the source commits only when the destination's RECEIVED digest equals its
own. An attacker who rewrites the stream alone is caught: the source aborts, SEND_CANCEL, its guest runs
on, the destination discards. But the digest is a plain SHA-256 on an unauthenticated return path: an
attacker who also answers the source with the digest of the stream it sent (computed from the bytes it
intercepted) makes both ends report "completed" while the destination's guest holds stale or wrong
memory, and nothing detects it. These tests assert exactly that gap. It is closed for a network attacker
by an authenticated channel between the hosts (QEMU's TLS migration, ``tls-creds``; pysev offers none), which
makes rewriting or replaying the connection's bytes impossible; a malicious host, the source's or the
destination's hypervisor, which produces or consumes the stream itself, can always mount these attacks:
under SEV the hypervisor is not trusted with the guest's plaintext, but it is trusted with its availability
and its freshness.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pysev.firmware.amdroot import default_root
from pysev.firmware.sev.abi import (
    BUFFERS,
    CBITPOS,
    INIT_FLAGS_SEV_ES,
    ActivateBuf,
    Cmd,
    DbgBuf,
    GuestState,
    GuestStatusBuf,
    HandleBuf,
    InitBuf,
    LaunchMeasureBuf,
    LaunchStartBuf,
    LaunchUpdateBuf,
    ReceiveStartBuf,
    SendStartBuf,
    TransportBuf,
)
from pysev.firmware.sev.platform import Platform
from pysev.firmware.status import SevStatus
from pysev.hv.guest import page_pattern
from pysev.hv.machine import DEFAULT_POLICY, Host, RunState, VirtualMachine
from pysev.hw.hostmem import PAGE_SIZE, HostMemory
from pysev.migration import IncomingMigration, MigrationParameters, OutgoingMigration, stream, with_destination_certs
from pysev.migration.commit import RecordDigest, combined_digest
from pysev.migration.transport import Connection, inproc_pairs

MiB = 1 << 20
GUEST = 16 * MiB
CBIT = 1 << CBITPOS
RAM = "pc.ram"  # RAM starts at GPA 0: a pc.ram offset is the page's guest-physical address

# ---------------------------------------------------------------------------------------------------------
# SEV's answer: two PSPs driven through their command buffers
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FwGuest:
    handle: int
    asid: int
    frames: np.ndarray

    def hpa(self, page: int) -> int:
        return int(self.frames[page]) * PAGE_SIZE


class Psp:
    """One host's SEV firmware, driven as KVM drives it: command buffers, blobs in a scratch area."""

    def __init__(self, seed: int) -> None:
        self.p = Platform(HostMemory(64 * MiB, seed=seed), root=default_root())
        self.run(Cmd.INIT, InitBuf(flags=INIT_FLAGS_SEV_ES))
        self.p.wbinvd_on_all_cpus()  # INIT leaves every ASID dirty: flush as the PSP driver does
        self.run(Cmd.DF_FLUSH)
        self.dram = self.p.dram
        self.scratch, self._off = self.dram.alloc_kernel(4 * MiB), 0
        self._asids = itertools.count(self.p.min_sev_asid)  # plain SEV guests take the upper ASIDs

    def issue(self, cmd: Cmd, buf: Any = None) -> SevStatus:
        return self.p.issue(cmd, buf)

    def run(self, cmd: Cmd, buf: Any = None) -> Any:
        status = self.issue(cmd, buf)
        assert status == SevStatus.SUCCESS, (cmd.name, status.name)
        return buf

    def put(self, data: bytes) -> int:
        paddr = self.scratch + self._off
        self._off += (max(len(data), 1) + 63) & ~63
        self.dram.write(paddr, bytes(data))
        return paddr

    def get(self, paddr: int, n: int) -> bytes:
        return self.dram.read(paddr, n)

    def _activate(self, handle: int, npages: int) -> FwGuest:
        g = FwGuest(handle, next(self._asids), self.dram.alloc_ram(npages))
        self.run(Cmd.ACTIVATE, ActivateBuf(handle=handle, asid=g.asid))
        return g

    def launch(self, pages: list[bytes]) -> FwGuest:
        """A RUNNING guest (policy as ``pysev vm``'s) whose pages hold ``pages``."""
        g = self._activate(self.run(Cmd.LAUNCH_START, LaunchStartBuf(policy=DEFAULT_POLICY)).handle, len(pages))
        for i, data in enumerate(pages):
            self.dram.write(g.hpa(i), data)
            self.run(Cmd.LAUNCH_UPDATE_DATA, LaunchUpdateBuf(g.handle, g.hpa(i) | CBIT, PAGE_SIZE))
        self.run(Cmd.LAUNCH_MEASURE, LaunchMeasureBuf(g.handle, self.put(bytes(48)), 48))
        self.run(Cmd.LAUNCH_FINISH, HandleBuf(g.handle))
        return g

    def guest_writes(self, g: FwGuest, page: int, data: bytes) -> None:
        """The guest stores to its page (a C-bit access through the memory controller)."""
        self.p.memctl.write(g.asid, g.hpa(page), data)

    def read(self, g: FwGuest, page: int) -> bytes:
        out = self.put(bytes(PAGE_SIZE))
        self.run(Cmd.DBG_DECRYPT, DbgBuf(g.handle, g.hpa(page) | CBIT, out, PAGE_SIZE))
        return self.get(out, PAGE_SIZE)

    def state(self, g: FwGuest) -> GuestState:
        return GuestState(self.run(Cmd.GUEST_STATUS, GuestStatusBuf(handle=g.handle)).state)

    # -- migration --------------------------------------------------------------------------------
    def send_start(self, g: FwGuest, target: Psp) -> tuple[int, bytes, bytes]:
        """SEND_START to ``target``: (policy, this platform's PDH, session) — the stream's context."""
        certs = target.p.public_certs()
        buf = SendStartBuf(
            g.handle,
            0,
            self.put(certs["pdh"]),
            len(certs["pdh"]),
            self.put(certs["cert_chain"]),
            len(certs["cert_chain"]),
            self.put(certs["amd_cert_chain"]),
            len(certs["amd_cert_chain"]),
            self.put(bytes(128)),
            128,
        )
        self.run(Cmd.SEND_START, buf)
        return buf.policy, self.p.public_certs()["pdh"], self.get(buf.session_address, 128)

    def send_page(self, g: FwGuest, page: int) -> tuple[bytes, bytes]:
        """SEND_UPDATE_DATA of one page: (packet header, ciphertext)."""
        hdr, trans = self.put(bytes(52)), self.put(bytes(PAGE_SIZE))
        self.run(Cmd.SEND_UPDATE_DATA, TransportBuf(g.handle, hdr, 52, g.hpa(page) | CBIT, PAGE_SIZE, trans, PAGE_SIZE))
        return self.get(hdr, 52), self.get(trans, PAGE_SIZE)

    def receive_start(self, context: tuple[int, bytes, bytes], npages: int) -> FwGuest:
        policy, sender_pdh, session = context
        buf = ReceiveStartBuf(0, policy, self.put(sender_pdh), len(sender_pdh), self.put(session), len(session))
        return self._activate(self.run(Cmd.RECEIVE_START, buf).handle, npages)

    def receive_page(self, g: FwGuest, page: int, packet: tuple[bytes, bytes]) -> SevStatus:
        hdr, trans = packet
        buf = TransportBuf(g.handle, self.put(hdr), 52, g.hpa(page) | CBIT, PAGE_SIZE, self.put(trans), PAGE_SIZE)
        return self.issue(Cmd.RECEIVE_UPDATE_DATA, buf)


def _page(label: str) -> bytes:
    return (label.encode() * (PAGE_SIZE // len(label) + 1))[:PAGE_SIZE]


@pytest.fixture(scope="module")
def psps() -> tuple[Psp, Psp]:
    """Source and destination firmware."""
    return Psp(seed=11), Psp(seed=12)


# ---------------------------------------------------------------------------------------------------------
# pysev's answer: live migrations through a man in the middle
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Item:
    """One item of a stream, as the writer writes it. ``chunk`` numbers the RAM section's chunks (0 the
    START chunk, then one per pre-copy pass, the last the END chunk)."""

    kind: str
    chunk: int = -1
    block: str = ""
    offset: int = 0
    data: Any = None
    context: stream.SevContext | None = None
    extra: tuple = ()


def parse(raw: bytes) -> list[Item]:
    """A stream as items, read by ``StreamReader`` as the destination reads it."""
    r = stream.StreamReader(io.BytesIO(raw))
    r.read_header()
    first = r.next_section()
    assert isinstance(first, stream.Configuration)
    items, chunk, after_vmsa = [Item("header", extra=(first.machine,))], -1, False
    while True:
        sec = r.next_section()
        if isinstance(sec, stream.Eof):
            return items + [Item("eof"), Item("vmdesc", extra=(r.read_vmdesc(),))]
        if isinstance(sec, stream.Footer):
            if not after_vmsa:  # a VMSA section's footer is written with the section
                items.append(Item("footer", extra=(sec.section_id,)))
            after_vmsa = False
            continue
        assert isinstance(sec, stream.SectionHeader), sec
        if sec.idstr == stream.VMSA_SECTION_IDSTR:
            v = r.read_vmsa_section(sec)
            items.append(Item("vmsa", data=(v.hdr, v.trans), extra=(sec.section_id, v.vcpu)))
            after_vmsa = True
            continue
        chunk += 1
        items.append(
            Item("section", chunk, extra=(sec.kind, sec.section_id, sec.idstr, sec.instance_id, sec.version_id))
        )
        for rec in r.ram_records():
            if isinstance(rec, stream.MemSize):
                items.append(Item("mem_size", chunk, extra=(rec.blocks,)))
            elif isinstance(rec, stream.Page):
                items.append(Item("page", chunk, rec.block, rec.offset, rec.data))
            elif isinstance(rec, stream.Zero):
                items.append(Item("zero", chunk, rec.block, rec.offset))
            elif isinstance(rec, stream.EncryptedPages):
                for i in range(rec.count):
                    packet = (rec.hdrs[i].tobytes(), rec.trans[i].tobytes())
                    ctx = rec.context if i == 0 else None
                    items.append(Item("enc", chunk, rec.block, int(rec.offsets[i]), packet, ctx))
            elif isinstance(rec, stream.EncryptedBitmap):
                entries = [(e.start_gpa, e.npages, e.bitmap) for e in rec.entries]
                items.append(Item("bitmap", chunk, rec.block, data=entries))
            else:
                items.append(Item("eos", chunk))


def serialize(items: list[Item]) -> bytes:
    """The stream the writer makes of ``items`` (``serialize(parse(raw)) == raw``)."""
    out = io.BytesIO()
    w = stream.StreamWriter(out)
    starts = {
        stream.QEMU_VM_SECTION_START: w.section_start,
        stream.QEMU_VM_SECTION_FULL: w.section_full,
    }
    i = 0
    while i < len(items):
        it = items[i]
        i += 1
        if it.kind == "header":
            w.write_header(it.extra[0])
        elif it.kind == "section":
            kind, sid, idstr, instance, version = it.extra
            if kind in starts:
                starts[kind](sid, idstr, instance, version)
            else:
                (w.section_part if kind == stream.QEMU_VM_SECTION_PART else w.section_end)(sid)
        elif it.kind == "footer":
            w.section_footer(it.extra[0])
        elif it.kind == "mem_size":
            w.ram_mem_size(it.extra[0])
        elif it.kind == "page":
            w.ram_page(it.block, it.offset, it.data)
        elif it.kind == "zero":
            w.ram_zero_page(it.block, it.offset)
        elif it.kind == "enc":
            run = [it]
            while i < len(items) and items[i].kind == "enc" and items[i].block == it.block and items[i].context is None:
                run.append(items[i])
                i += 1
            recs = np.zeros(len(run), stream.ENC_PAGE_RECORD)
            for k, r in enumerate(run):
                recs["hdr"][k] = np.frombuffer(r.data[0], np.uint8)
                recs["trans"][k] = np.frombuffer(r.data[1], np.uint8)
            w.sev_encrypted_pages(it.block, np.array([r.offset for r in run], np.uint64), recs, it.context)
        elif it.kind == "bitmap":
            w.sev_encrypted_bitmap(it.block, it.data)
        elif it.kind == "eos":
            w.ram_eos()
        elif it.kind == "vmsa":
            w.sev_es_vmsa_section(it.extra[0], it.extra[1], *it.data)
        elif it.kind == "eof":
            w.write_eof()
        elif it.kind == "vmdesc" and it.extra[0] is not None:
            w.write_vmdesc(it.extra[0])
    w.close()
    return out.getvalue()


def record_digest(items: list[Item]) -> bytes:
    """The record digest of a stream, fed as the destination feeds it (``IncomingMigration``)."""
    d = RecordDigest()
    for it in items:
        if it.kind == "page":
            d.page(it.block, it.offset, it.data)
        elif it.kind == "zero":
            d.zero(it.block, it.offset)
        elif it.kind == "enc":
            if it.context is not None:
                d.context(it.context)
            d.encrypted(it.block, np.array([it.offset], np.uint64), np.frombuffer(it.data[0], np.uint8).reshape(1, 52))
        elif it.kind == "bitmap":
            d.bitmap(it.block, it.data)
        elif it.kind == "vmsa":
            d.vmsa(it.extra[1], it.data[0])
    return combined_digest([d])


class _Recorder:
    """The bytes a reader consumes, kept (to find where the source's stream ends and keep it)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seen = inner, bytearray()

    def readinto(self, b: Any) -> int:
        n = self.inner.readinto1(b)
        self.seen += memoryview(b)[:n]
        return n


class Relay:
    """A man in the middle of a migration's main connection: reads the source's whole stream, hands the
    destination ``tamper(stream)`` instead, and relays the commit protocol's messages both ways. With
    ``forge``, the destination's RECEIVED digest is replaced by the digest of the stream the source sent,
    which the relay computes from the intercepted bytes (the digest has no key)."""

    def __init__(self, source_side: Connection, dest_side: Connection, tamper: Callable[[bytes], bytes], forge: bool):
        self.src, self.dst, self.tamper, self.forge = source_side, dest_side, tamper, forge
        self.original = self.sent = b""
        self.forged: bytes | None = None
        self.thread = threading.Thread(target=self._relay, name="mitm", daemon=True)

    def start(self) -> Relay:
        self.thread.start()
        return self

    def _relay(self) -> None:
        self.original = read_whole_stream(self.src.input)
        self.sent = self.tamper(self.original)
        if self.forge:
            self.forged = record_digest(parse(self.original))
        try:
            self.dst.output.write(self.sent)
        except OSError:  # the destination failed and hung up: its FAILED message is relayed below
            pass
        back = threading.Thread(target=self._pump, args=(self.src, self.dst, False), daemon=True)
        back.start()
        self._pump(self.dst, self.src, self.forge)
        back.join(30)
        self.src.close()
        self.dst.close()

    def _pump(self, a: Connection, b: Connection, forge: bool) -> None:
        while True:
            try:
                msg = stream.read_return_message(a.input)
            except (OSError, ValueError):
                return
            data = self.forged if forge and msg.kind == stream.ReturnMessage.RECEIVED else msg.data
            try:
                stream.write_return_message(b.output, msg.kind, data)
            except (OSError, ValueError):
                return

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive(), "relay hung"


def read_whole_stream(rfile: Any) -> bytes:
    """The source's stream, read up to the end of its trailer (after which the source waits for RECEIVED)."""
    rec = _Recorder(rfile)
    r = stream.StreamReader(rec, dataclasses.replace(stream.ReaderLimits(), read_chunk=1 << 16))
    r.read_header()
    while True:
        sec = r.next_section()
        if isinstance(sec, stream.Eof):
            r.read_vmdesc()
            return bytes(rec.seen)
        if isinstance(sec, stream.SectionHeader):
            if sec.idstr == stream.VMSA_SECTION_IDSTR:
                r.read_vmsa_section(sec)
            else:
                for _ in r.ram_records():
                    pass


@dataclasses.dataclass
class Run:
    source: VirtualMachine
    dest: VirtualMachine
    outgoing: OutgoingMigration
    incoming: IncomingMigration
    relay: Relay

    @property
    def caught(self) -> bool:
        """The source refused to commit (digest mismatch): aborted, its guest running, the copy discarded."""
        return (
            self.outgoing.status.value == "failed"
            and "digest" in (self.outgoing.error_desc or "")
            and self.source.state == RunState.RUNNING
            and self.incoming.status.value == "failed"
        )

    @property
    def undetected(self) -> bool:
        """Both ends say completed and the destination runs a guest whose memory is not the source's."""
        return (
            self.outgoing.status.value == "completed"
            and self.incoming.status.value == "completed"
            and self.dest.state == RunState.RUNNING
            and self.incoming.guest_digest is not None
            and self.incoming.guest_digest != self.outgoing.digest_at_switchover
        )


def migrate(
    source: VirtualMachine,
    dest_host: Host,
    tamper: Callable[[bytes], bytes] = bytes,
    *,
    forge: bool = False,
    on_pass: Callable[[dict], None] | None = None,
) -> Run:
    """A live migration of ``source`` to a new VM on ``dest_host`` through a ``Relay``."""
    params = with_destination_certs(
        MigrationParameters(max_bandwidth=0, commit_timeout=15.0), dest_host.sev_capabilities()
    )
    dest = VirtualMachine(dest_host, GUEST, policy=source.policy, incoming=True, **source.workload_args())
    s, r1 = inproc_pairs(0)
    r2, d = inproc_pairs(0)
    incoming = IncomingMigration(dest, d, commit_timeout=15.0, verify=True)
    t = threading.Thread(target=incoming.run, name="mig-incoming", daemon=True)
    t.start()
    relay = Relay(r1[0], r2[0], tamper, forge).start()
    outgoing = OutgoingMigration(source, s, params, on_pass=on_pass, verify=True)
    outgoing.run()
    t.join(60)
    assert not t.is_alive(), "destination hung"
    relay.join()
    if forge:
        assert relay.forged == outgoing.record_digest, "the attacker's digest is not the source's"
    return Run(source, dest, outgoing, incoming, relay)


def edit(fn: Callable[[list[Item]], None]) -> Callable[[bytes], bytes]:
    """A stream rewrite: parse, edit the items, write them again."""

    def tamper(raw: bytes) -> bytes:
        items = parse(raw)
        fn(items)
        return serialize(items)

    return tamper


def end_chunk(items: list[Item]) -> int:
    return next(it.chunk for it in items if it.kind == "section" and it.extra[0] == stream.QEMU_VM_SECTION_END)


def encrypted(items: list[Item], chunk: int, gfns: list[int]) -> dict[int, Item]:
    return {
        it.offset // PAGE_SIZE: it
        for it in items
        if it.kind == "enc" and it.chunk == chunk and it.block == RAM and it.offset // PAGE_SIZE in gfns
    }


@pytest.fixture(scope="module")
def hosts() -> dict[str, Host]:
    return {name: Host(name, 512 * MiB, seed=i + 21) for i, name in enumerate("AB")}


@pytest.fixture
def guest(hosts):
    vm = VirtualMachine(hosts["A"], GUEST, seed=7)
    vm.boot_fill()
    yield vm
    vm.destroy()


def rewrites_after_pass_1(vm: VirtualMachine, gfns: list[int], seq: int) -> Callable[[dict], None]:
    """on_pass: after pass 1 the guest writes new contents into ``gfns``, so they are re-sent at
    stop-and-copy (the END chunk)."""

    def on_pass(record: dict) -> None:
        if record["pass"] == 1:
            assert vm.guest is not None
            g = np.array(gfns, np.int64)
            vm.guest.write_pages(g, page_pattern(g, seq=seq))

    return on_pass


def read_pages(vm: VirtualMachine, gfns: list[int]) -> np.ndarray:
    assert vm.guest is not None
    return vm.guest.read_pages(np.array(gfns, np.int64))


def finish(*runs: Run) -> None:
    for run in runs:
        if run.dest.state != RunState.SHUTDOWN:
            run.dest.destroy()


# ---------------------------------------------------------------------------------------------------------
# the attacks
# ---------------------------------------------------------------------------------------------------------
def test_roundtrip_of_the_attackers_tools(hosts, guest):
    """The relay's parse/serialize and digest reproduce a real migration byte for byte (so every rewrite
    below changes exactly what it says), and an honest relay changes nothing."""
    run = migrate(guest, hosts["B"])
    assert serialize(parse(run.relay.original)) == run.relay.original
    assert record_digest(parse(run.relay.original)) == run.outgoing.record_digest
    assert run.outgoing.status.value == run.incoming.status.value == "completed"
    assert run.incoming.guest_digest == run.outgoing.digest_at_switchover
    finish(run)


def test_replay_pass1_page_in_place_of_its_resend(psps, hosts, guest):
    """(a) The attacker replaces the stop-and-copy re-send of a page with the ciphertext the page had in
    pass 1.

    SEV: accepts. Both packets are MACed under the same TIK and the MAC binds neither the GPA nor a
    sequence number: RECEIVE_UPDATE_DATA takes the pass-1 packet again and the page holds its old contents.

    pysev: the record digest (offset and packet header of every page) catches a rewrite of the stream alone:
    the source aborts, SEND_CANCEL, its guest runs on. An attacker who also forges RECEIVED gets both ends
    to "completed" with the destination holding the pass-1 contents of those pages: undetected.
    """
    src, dst = psps
    g = src.launch([_page("v1 of page 0"), _page("page 1")])
    ctx = src.send_start(g, dst)
    pass1 = src.send_page(g, 0)
    src.guest_writes(g, 0, _page("v2 of page 0"))
    resend = src.send_page(g, 0)
    r = dst.receive_start(ctx, 2)
    assert dst.receive_page(r, 0, pass1) == SevStatus.SUCCESS
    assert dst.receive_page(r, 0, pass1) == SevStatus.SUCCESS  # replayed where `resend` was due
    assert dst.read(r, 0) == _page("v1 of page 0") != src.read(g, 0)
    assert dst.receive_page(r, 1, resend) == SevStatus.SUCCESS  # and any packet fits any page
    dst.run(Cmd.RECEIVE_FINISH, HandleBuf(r.handle))
    assert dst.state(r) == GuestState.RUNNING

    gfns = [100, 101, 102, 103]

    def replay(items: list[Item]) -> None:
        pass1, resent = encrypted(items, 1, gfns), encrypted(items, end_chunk(items), gfns)
        assert sorted(resent) == gfns  # the pages were re-sent at stop-and-copy
        for gfn, item in resent.items():
            item.data = pass1[gfn].data

    naive = migrate(guest, hosts["B"], edit(replay), on_pass=rewrites_after_pass_1(guest, gfns, seq=1))
    assert naive.caught, (naive.outgoing.status, naive.outgoing.error_desc, naive.incoming.status)
    forged = migrate(guest, hosts["B"], edit(replay), forge=True, on_pass=rewrites_after_pass_1(guest, gfns, seq=2))
    assert forged.undetected
    assert (read_pages(forged.dest, gfns) == page_pattern(np.array(gfns), seq=1)).all()  # stale: pass 1's
    assert (read_pages(guest, gfns) == page_pattern(np.array(gfns), seq=2)).all()
    finish(naive, forged)


def test_swap_two_records_pages(psps, hosts, guest):
    """(b) The attacker swaps the offset fields of two encrypted-page records, keeping their packets.

    SEV: accepts. The packet says nothing about where it belongs: RECEIVE_UPDATE_DATA decrypts each packet
    into whichever page the hypervisor names, so the two pages trade contents.

    pysev: the digest covers each record's offset, so the rewritten stream alone is caught (abort,
    SEND_CANCEL, the source runs on). With RECEIVED forged, both ends complete and the destination's guest
    has the two pages swapped: undetected.
    """
    src, dst = psps
    g = src.launch([_page("page P"), _page("page Q")])
    ctx = src.send_start(g, dst)
    p, q = src.send_page(g, 0), src.send_page(g, 1)
    r = dst.receive_start(ctx, 2)
    assert dst.receive_page(r, 0, q) == dst.receive_page(r, 1, p) == SevStatus.SUCCESS
    assert (dst.read(r, 0), dst.read(r, 1)) == (_page("page Q"), _page("page P"))
    dst.run(Cmd.RECEIVE_FINISH, HandleBuf(r.handle))

    gfns = [200, 201]

    def swap(items: list[Item]) -> None:
        pages = encrypted(items, 1, gfns)
        pages[200].offset, pages[201].offset = pages[201].offset, pages[200].offset

    naive = migrate(guest, hosts["B"], edit(swap))
    assert naive.caught, (naive.outgoing.error_desc, naive.incoming.status)
    forged = migrate(guest, hosts["B"], edit(swap), forge=True)
    assert forged.undetected
    src_pages, dest_pages = read_pages(guest, gfns), read_pages(forged.dest, gfns)
    assert (dest_pages[0] == src_pages[1]).all() and (dest_pages[1] == src_pages[0]).all()
    finish(naive, forged)


def test_drop_resent_pages_of_a_later_pass(psps, hosts, guest):
    """(c) The attacker drops the pages re-sent in a later pass (here the stop-and-copy chunk).

    SEV: accepts. RECEIVE_FINISH takes no count and no digest of what was received: a guest finishes with
    whatever packets arrived, so dropped re-sends leave the pages as the earlier pass wrote them.

    pysev: the digest covers every record, so a missing one is caught when the stream alone is rewritten
    (abort, SEND_CANCEL, the source runs on). With RECEIVED forged, both ends complete and the destination's
    guest keeps the stale contents of the dropped pages: undetected.
    """
    src, dst = psps
    g = src.launch([_page("old contents")])
    ctx = src.send_start(g, dst)
    early = src.send_page(g, 0)
    src.guest_writes(g, 0, _page("new contents"))
    src.send_page(g, 0)  # the re-send, never delivered
    r = dst.receive_start(ctx, 1)
    assert dst.receive_page(r, 0, early) == SevStatus.SUCCESS
    dst.run(Cmd.RECEIVE_FINISH, HandleBuf(r.handle))
    assert dst.state(r) == GuestState.RUNNING
    assert dst.read(r, 0) == _page("old contents") != src.read(g, 0)

    gfns = [300, 301, 302, 303]

    def drop(items: list[Item]) -> None:
        resent = encrypted(items, end_chunk(items), gfns)
        assert sorted(resent) == gfns
        items[:] = [it for it in items if all(it is not r for r in resent.values())]

    naive = migrate(guest, hosts["B"], edit(drop), on_pass=rewrites_after_pass_1(guest, gfns, seq=1))
    assert naive.caught, (naive.outgoing.error_desc, naive.incoming.status)
    forged = migrate(guest, hosts["B"], edit(drop), forge=True, on_pass=rewrites_after_pass_1(guest, gfns, seq=2))
    assert forged.undetected
    assert (read_pages(forged.dest, gfns) == page_pattern(np.array(gfns), seq=1)).all()  # what pass 1 carried
    assert (read_pages(guest, gfns) == page_pattern(np.array(gfns), seq=2)).all()
    finish(naive, forged)


def test_flip_a_bit_of_the_page_encryption_bitmap(psps, hosts, guest):
    """(d) The attacker flips one bit of the page-encryption bitmap record: a private page becomes shared.

    SEV: accepts; the firmware never sees the bitmap. No command buffer carries a page-state map (the v3
    series hands it to KVM, not to the PSP); the firmware encrypts whatever page it is told to and RECEIVE_FINISH
    succeeds. Whether a page is private is the C-bit of the guest's access, which nothing in the firmware
    checks against the source's.

    pysev: the digest covers the bitmap's bytes, so the rewritten stream alone is caught (abort, SEND_CANCEL,
    the source runs on). With RECEIVED forged, both ends complete and the destination treats the page as
    shared: its guest reads the page's ciphertext in the clear. Undetected.
    """
    fields = {name for layout in BUFFERS.values() if layout for name in layout.offsets()}
    assert not [f for f in fields if "bitmap" in f or "map" in f]  # no command takes a page-state map
    src, dst = psps
    g = src.launch([_page("a private page")])
    r = dst.receive_start(src.send_start(g, dst), 1)
    assert dst.receive_page(r, 0, src.send_page(g, 0)) == SevStatus.SUCCESS
    dst.run(Cmd.RECEIVE_FINISH, HandleBuf(r.handle))
    assert dst.read(r, 0) == _page("a private page") != dst.get(r.hpa(0), PAGE_SIZE)  # C-bit view vs raw

    gfn = 400

    def flip(items: list[Item]) -> None:
        (bitmap,) = [it for it in items if it.kind == "bitmap" and it.block == RAM]
        (start, npages, words), *rest = bitmap.data
        page = gfn - start // PAGE_SIZE
        flipped = bytearray(words)
        assert flipped[page // 8] >> (page % 8) & 1  # private on the source
        flipped[page // 8] ^= 1 << (page % 8)
        bitmap.data = [(start, npages, bytes(flipped)), *rest]

    naive = migrate(guest, hosts["B"], edit(flip))
    assert naive.caught, (naive.outgoing.error_desc, naive.incoming.status)
    forged = migrate(guest, hosts["B"], edit(flip), forge=True)
    assert forged.undetected
    assert forged.dest.guest is not None and guest.guest is not None
    assert guest.guest.is_private(np.array([gfn])).all() and not forged.dest.guest.is_private(np.array([gfn])).any()
    assert not (read_pages(forged.dest, [gfn]) == read_pages(guest, [gfn])).all()
    assert (read_pages(forged.dest, [gfn + 1]) == read_pages(guest, [gfn + 1])).all()
    finish(naive, forged)


def test_replay_an_older_session(psps, hosts, guest):
    """(e) The attacker replays the saved stream of an earlier migration of the same guest to the same
    destination platform, in place of the current one.

    SEV: accepts. The old session is still valid: it is wrapped for the destination's PDH with the source's
    PDH, neither of which changed, and RECEIVE_START takes no freshness input from the destination. The old
    packets are MACed under the old session's TIK: all accepted; the guest comes back as it was then.

    pysev: the source compares the destination's digest with the digest of what it sent now, so the
    replayed old stream is caught (abort, SEND_CANCEL, the source runs on), and needs no rewriting: it is
    self-consistent. With RECEIVED forged (the digest of the current stream, which the relay intercepted),
    both ends complete and the destination runs the guest with the memory of the earlier migration.
    """
    src, dst = psps
    g = src.launch([_page("contents at migration 1")])
    old_ctx, old_packet = src.send_start(g, dst), src.send_page(g, 0)
    src.run(Cmd.SEND_CANCEL, HandleBuf(g.handle))  # that migration did not go through; the guest runs on
    src.guest_writes(g, 0, _page("contents at migration 2"))
    src.send_start(g, dst)
    src.send_page(g, 0)  # the current packet, which the attacker withholds
    r = dst.receive_start(old_ctx, 1)
    assert dst.receive_page(r, 0, old_packet) == SevStatus.SUCCESS
    dst.run(Cmd.RECEIVE_FINISH, HandleBuf(r.handle))
    assert dst.read(r, 0) == _page("contents at migration 1") != src.read(g, 0)

    # Migration 1 A -> B is recorded; the guest comes back to A (migration 2) and changes there.
    m1 = migrate(guest, hosts["B"])
    assert m1.incoming.status.value == "completed"
    old_stream, old_digest = m1.relay.original, m1.outgoing.digest_at_switchover
    m2 = migrate(m1.dest, hosts["A"])
    assert m2.incoming.status.value == "completed"
    back = m2.dest
    assert back.guest is not None
    gfns = np.arange(500, 508)
    back.guest.write_pages(gfns, page_pattern(gfns, seq=9))

    naive = migrate(back, hosts["B"], lambda _: old_stream)
    assert naive.caught, (naive.outgoing.error_desc, naive.incoming.status)
    forged = migrate(back, hosts["B"], lambda _: old_stream, forge=True)
    assert forged.undetected
    assert forged.incoming.guest_digest == old_digest  # the guest as it was at migration 1
    assert (read_pages(forged.dest, list(gfns)) != page_pattern(gfns, seq=9)).any(axis=1).all()
    finish(m1, m2, naive, forged)


def test_replay_the_same_session_twice(psps, hosts, guest):
    """(f) The attacker replays a completed migration's stream to the same destination again.

    SEV: accepts. RECEIVE_START keeps no record of sessions it has opened: the same session opens a second
    guest context with the same TEK/TIK, every packet is accepted again, and both copies RECEIVE_FINISH.

    pysev: nothing detects it. The replayed stream is the authentic one, so its record digest is right with
    no rewriting; the decision that makes the destination run the guest (COMMIT) carries no authentication,
    so the attacker plays the source's part. The destination runs a second copy of the guest beside the
    first: the "never two runners" guarantee of the commit protocol does not hold against a replay.
    """
    src, dst = psps
    g = src.launch([_page("the only guest")])
    ctx, packet = src.send_start(g, dst), src.send_page(g, 0)
    copies = [dst.receive_start(ctx, 1) for _ in range(2)]
    for r in copies:
        assert dst.receive_page(r, 0, packet) == SevStatus.SUCCESS
        dst.run(Cmd.RECEIVE_FINISH, HandleBuf(r.handle))
    assert [dst.state(r) for r in copies] == [GuestState.RUNNING] * 2
    assert dst.read(copies[0], 0) == dst.read(copies[1], 0) == _page("the only guest")

    first = migrate(guest, hosts["B"])
    assert first.outgoing.status.value == first.incoming.status.value == "completed"
    clone = VirtualMachine(hosts["B"], GUEST, policy=guest.policy, incoming=True, **guest.workload_args())
    attacker, d = inproc_pairs(0)
    incoming = IncomingMigration(clone, d, commit_timeout=15.0, verify=True)
    t = threading.Thread(target=incoming.run, daemon=True)
    t.start()
    main = attacker[0]
    main.output.write(first.relay.original)
    received = stream.read_return_message(main.input)
    assert received.kind == stream.ReturnMessage.RECEIVED and received.data == first.outgoing.record_digest
    stream.write_return_message(main.output, stream.ReturnMessage.COMMIT)
    t.join(30)
    main.close()
    assert incoming.status.value == "completed"
    assert first.dest.state == clone.state == RunState.RUNNING  # two copies of one guest run
    assert incoming.guest_digest == first.incoming.guest_digest == first.outgoing.digest_at_switchover
    clone.destroy()
    finish(first)
