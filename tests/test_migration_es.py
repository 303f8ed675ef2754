"""SEV-ES: every vCPU's VMSA travels through SEND_UPDATE_VMSA / RECEIVE_UPDATE_VMSA (sev-api.md §2.3, §2.6)
in a ``sev-es-vmsa`` device section after the RAM section, and arrives decryptable only by the destination."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pysev.firmware.sev import Policy, make_policy
from pysev.hv.machine import Host, RunState, VirtualMachine
from pysev.hw.hostmem import PAGE_SIZE
from pysev.migration import MigrationParameters, migrate_local, stream

ES_POLICY = make_policy(Policy.SEV | Policy.ES, 0, 17)
MEM = 16 << 20
FAST = MigrationParameters(max_bandwidth=0, commit_timeout=20)


@pytest.fixture(scope="module")
def hosts():
    return Host("es-a", MEM + (256 << 20), seed=11), Host("es-b", MEM + (256 << 20), seed=12)


def vmsa_plaintext(vm: VirtualMachine) -> bytes:
    out = np.empty((len(vm.vmsa_hpas), PAGE_SIZE), dtype=np.uint8)
    vm.sev.dbg_decrypt_batch(np.array(vm.vmsa_hpas, dtype=np.uint64) // PAGE_SIZE, out)
    return out.tobytes()


@pytest.mark.parametrize("channels", [0, 1])
def test_es_guest_migrates_with_its_vmsa(hosts, tmp_path, channels):
    a, b = hosts
    vm = VirtualMachine(a, MEM, policy=ES_POLICY, seed=1)
    vm.boot_fill()
    before = vmsa_plaintext(vm)
    assert before.startswith(b"pysev SEV-ES VMSA of vCPU 0")
    saved = tmp_path / "es.mig"
    r = migrate_local(vm, b, params=FAST, channels=channels, save_stream=str(saved))
    assert r.info["status"] == "completed" and r.verified  # the digest covers the VMSA too
    assert vmsa_plaintext(r.destination) == before
    # on the wire the VMSA is transport ciphertext: its plaintext never appears
    wire = b"".join(p.read_bytes() for p in tmp_path.glob("es.mig*"))
    assert b"sev-es-vmsa" in wire and b"pysev SEV-ES VMSA" not in wire
    r.destination.destroy()
    vm.destroy()


def test_tampered_vmsa_fails_the_migration_and_the_source_keeps_running(hosts, monkeypatch):
    a, b = hosts
    vm = VirtualMachine(a, MEM, policy=ES_POLICY, seed=2)
    vm.boot_fill()
    digest = vm.digest()
    from pysev.migration import sev_ops as ops_mod

    original = ops_mod.SevOps.send_vmsas

    def flipped(self):
        return [(hdr, bytes([trans[0] ^ 1]) + trans[1:]) for hdr, trans in original(self)]

    monkeypatch.setattr(ops_mod.SevOps, "send_vmsas", flipped)
    r = migrate_local(vm, b, params=FAST)
    assert r.info["status"] == "failed"
    assert "RECEIVE_UPDATE_VMSA" in r.info["error-desc"] and "BAD_MEASUREMENT" in r.info["error-desc"]
    assert r.destination is None
    assert vm.state == RunState.RUNNING and vm.digest() == digest
    monkeypatch.setattr(ops_mod.SevOps, "send_vmsas", original)
    retry = migrate_local(vm, b, params=FAST)
    assert retry.info["status"] == "completed" and retry.verified
    retry.destination.destroy()


def test_vmsa_section_bounds_are_checked():
    """A hostile stream: hdr_len other than 52 is refused before anything is read or allocated."""
    buf = io.BytesIO()
    w = stream.StreamWriter(buf)
    w.write_header()
    w.section_full(3, "sev-es-vmsa", 0, 1)
    w.put_be32(0xFFFFFFFF)
    w.flush()
    host = Host("es-c", MEM + (256 << 20), seed=13)
    dest = VirtualMachine(host, MEM, policy=ES_POLICY, incoming=True)
    from pysev.migration.incoming import IncomingMigration
    from pysev.migration.transport import Connection

    buf.seek(0)
    inc = IncomingMigration(dest, [Connection("test", None, buf)], file_mode=True, commit_timeout=5)
    result = inc.run()
    assert result["status"] == "failed" and "hdr_len 4294967295" in result["error-desc"]
    assert dest.state == RunState.INMIGRATE
