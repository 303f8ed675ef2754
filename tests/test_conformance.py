"""Drive the conformance table of ``tests/conformance/sev_legacy.py`` (AMD's check order, statuses and
mailbox write-back per legacy SEV command) through the firmware's public mailbox, ``Platform.issue_mailbox``."""

from __future__ import annotations

import collections
import struct

import pytest

from pysev.firmware.sev import abi
from pysev.firmware.sev.abi import Cmd, GuestState
from pysev.firmware.status import SevStatus
from tests.conformance.sev_legacy import ROWS
from tests.test_firmware import CBIT, Host, launch, make_guest, wellformed

COUNTS = collections.Counter(row[0] for row in ROWS)


def test_every_legacy_command_has_rows():
    assert set(COUNTS) == set(Cmd)


def _start(host: Host, start):
    """Bring a fresh host to the row's starting point; returns the guest (or None)."""
    if start in ("uninit", "wbinvd"):
        host.issue(Cmd.SHUTDOWN)
        if start == "wbinvd":
            host.p.wbinvd_on_all_cpus()
        return None
    if start in (None, "init-only"):
        return None
    if start == "reinit":  # INIT clears every core's WBINVD_DONE
        host.issue(Cmd.SHUTDOWN)
        assert host.issue(Cmd.INIT, abi.InitBuf()) == SevStatus.SUCCESS
        return None
    if start == "L-inactive":
        return launch(host, activate=False)
    if start == "SENT-inactive":
        g = make_guest(host, GuestState.SENT)
        assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
        return g
    if start == "RU-inactive":
        g = make_guest(host, GuestState.RUPDATE)
        assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=g.handle)) == SevStatus.SUCCESS
        return g
    if start == "dirty":
        ran = make_guest(host, GuestState.RUNNING)
        asid = host.gstatus(ran.handle).asid
        assert host.issue(Cmd.DEACTIVATE, abi.HandleBuf(handle=ran.handle)) == SevStatus.SUCCESS
        g = launch(host, activate=False)
        g.dirty_asid = asid
        return g
    return make_guest(host, start)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0].name}-{i}-{r[3].name}" for i, r in enumerate(ROWS)])
def test_conformance_row(row):
    cmd, start, mutation, expected, writes_back, amd_function = row
    host = Host(seed=11)
    g = _start(host, start)
    buf = wellformed(host, cmd, g)
    if cmd == Cmd.ACTIVATE and g is not None:
        buf.asid = getattr(g, "dirty_asid", None) or host.free_asid(bool(g.policy & abi.Policy.ES))
    for field, value in mutation.items():
        if field == "compressed":
            hdr = bytearray(host.get(buf.hdr_address, 4))
            hdr[0] |= 1
            host.dram.write(buf.hdr_address, bytes(hdr))
            continue
        if value == "own":
            value = host.gstatus(g.handle).asid
        elif value == "guest+8":
            value = (g.hpa + 8) | CBIT
        setattr(buf, field, value)
    cmd_paddr = host.k(64)
    if buf is not None:
        host.dram.write(cmd_paddr, buf.pack_over(bytes(range(0x80, 0x80 + buf.size()))))
    before = host.get(cmd_paddr, 64)
    status = host.p.issue_mailbox(cmd, cmd_paddr)
    assert status == expected, (amd_function, status.name)
    after = host.get(cmd_paddr, 64)
    if buf is not None and not writes_back:
        assert after == before, f"{cmd.name} wrote its buffer back ({amd_function})"
    if buf is not None and cmd != Cmd.PLATFORM_STATUS:
        # reserved bytes keep what the host wrote (CMD_BUF_INPUT_AND_OUTPUT copies PSP's copy back)
        layout = type(buf)
        off = 0
        for name, code in layout.FORMAT:
            n = struct.calcsize("<" + code)
            if name is None:
                assert after[off : off + n] == before[off : off + n]
            off += n
