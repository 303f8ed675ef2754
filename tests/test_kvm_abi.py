"""Wire layouts pinned to their sources, and the KVM_MEMORY_ENCRYPT_OP facade's Linux semantics.

* ``pysev.kvm`` ctypes structs vs ``/usr/include/linux/kvm.h`` (compiled with ``cc``).
* Firmware command buffers (``pysev.firmware.sev.abi.BUFFERS``) vs Linux ``include/linux/psp-sev.h``.
* Session blob and packet header offsets vs AMD ``sev_channel.h`` (``sev_session_t``, ``sev_packet_header_t``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest

from pysev import kvm
from pysev.firmware.mailbox import CommandBuffer
from pysev.firmware.sev import abi, session
from pysev.firmware.sev.abi import Cmd
from pysev.firmware.sev.platform import Platform
from pysev.firmware.status import SevStatus
from pysev.hw.hostmem import PAGE_SIZE, HostMemory

KVM_H = "/usr/include/linux/kvm.h"


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
        '  printf("KVM_MEMORY_ENCRYPT_OP %lu\\n", (unsigned long)KVM_MEMORY_ENCRYPT_OP);',
    ]
    for s in kvm.STRUCTS:
        n = s.__name__
        lines.append(f'  printf("{n} sizeof %zu\\n", sizeof(struct {n}));')
        for f, _ in s._fields_:
            lines.append(f'  printf("{n} {f} %zu %zu\\n", offsetof(struct {n}, {f}), sizeof(((struct {n} *)0)->{f}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not os.path.exists(KVM_H):
        pytest.skip(f"{KVM_H} not installed (linux-libc-dev); cannot pin the KVM ABI")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) on PATH; cannot pin the KVM ABI")
    d = tmp_path_factory.mktemp("kvmabi")
    (d / "abi.c").write_text(_c_program())
    r = subprocess.run([cc, "-o", str(d / "abi"), str(d / "abi.c")], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"compiling against {KVM_H} failed:\n{r.stderr}")
    out = subprocess.run([str(d / "abi")], capture_output=True, text=True, check=True).stdout
    return dict(
        line.rsplit(" ", 1)
        if "sizeof" in line or line.startswith("KVM_")
        else (line.rsplit(" ", 2)[0], line.split(" ", 2)[2])
        for line in out.splitlines()
    )


def test_memory_encrypt_op_number(header_facts):
    assert int(header_facts["KVM_MEMORY_ENCRYPT_OP"]) == kvm.KVM_MEMORY_ENCRYPT_OP


@pytest.mark.parametrize("struct_type", kvm.STRUCTS, ids=lambda s: s.__name__)
def test_kvm_struct_layout(header_facts, struct_type):
    n = struct_type.__name__
    assert int(header_facts[f"{n} sizeof"]) == ctypes.sizeof(struct_type)
    for f, ctype in struct_type._fields_:
        off, size = (int(x) for x in header_facts[f"{n} {f}"].split())
        assert (off, size) == (getattr(struct_type, f).offset, ctypes.sizeof(ctype)), f


def test_kvm_struct_spec_sizes():
    # include/uapi/linux/kvm.h: the natural-alignment sizes of the kvm_sev_* structs
    assert ctypes.sizeof(kvm.kvm_sev_cmd) == 24 and kvm.kvm_sev_cmd.error.offset == 16
    assert ctypes.sizeof(kvm.kvm_sev_send_start) == 72 and kvm.kvm_sev_send_start.session_len.offset == 64
    assert ctypes.sizeof(kvm.kvm_sev_send_update_data) == 48 and kvm.kvm_sev_send_update_data.trans_len.offset == 40
    assert ctypes.sizeof(kvm.kvm_sev_receive_start) == 40 and kvm.kvm_sev_receive_start.session_len.offset == 32
    assert ctypes.sizeof(kvm.kvm_sev_launch_start) == 40 and kvm.kvm_sev_launch_start.session_uaddr.offset == 24


# Linux include/linux/psp-sev.h sev_data_* (packed): name -> (size, {field: offset})
SPEC_BUFFERS = {
    # AMD sev_mcmd_init_t: u16 flags, u8 reserved[6] (declared as mbz, mbz2), u64 tmr_paddr, u32 tmr_length
    Cmd.INIT: (0x14, {"flags": 0, "mbz": 2, "mbz2": 4, "tmr_address": 8, "tmr_len": 0x10}),
    Cmd.PLATFORM_STATUS: (
        12,
        {"api_major": 0, "api_minor": 1, "state": 2, "owner": 3, "config": 4, "build": 7, "guest_count": 8},
    ),
    Cmd.PEK_CSR: (12, {"address": 0, "len": 8}),
    Cmd.PEK_CERT_IMPORT: (
        0x1C,
        {"pek_cert_address": 0, "pek_cert_len": 8, "oca_cert_address": 0x10, "oca_cert_len": 0x18},
    ),
    Cmd.PDH_CERT_EXPORT: (
        0x1C,
        {"pdh_cert_address": 0, "pdh_cert_len": 8, "cert_chain_address": 0x10, "cert_chain_len": 0x18},
    ),
    Cmd.GET_ID: (12, {"address": 0, "len": 8}),
    Cmd.DECOMMISSION: (4, {"handle": 0}),
    Cmd.ACTIVATE: (8, {"handle": 0, "asid": 4}),
    Cmd.GUEST_STATUS: (13, {"handle": 0, "policy": 4, "asid": 8, "state": 12}),
    Cmd.LAUNCH_START: (
        0x24,
        {
            "handle": 0,
            "policy": 4,
            "dh_cert_address": 8,
            "dh_cert_len": 0x10,
            "session_address": 0x18,
            "session_len": 0x20,
        },
    ),
    Cmd.LAUNCH_UPDATE_DATA: (0x14, {"handle": 0, "address": 8, "len": 0x10}),
    Cmd.LAUNCH_MEASURE: (0x14, {"handle": 0, "address": 8, "len": 0x10}),
    Cmd.LAUNCH_SECRET: (
        0x34,
        {
            "handle": 0,
            "hdr_address": 8,
            "hdr_len": 0x10,
            "guest_address": 0x18,
            "guest_len": 0x20,
            "trans_address": 0x28,
            "trans_len": 0x30,
        },
    ),
    Cmd.SEND_START: (
        0x44,
        {
            "handle": 0,
            "policy": 4,
            "pdh_cert_address": 8,
            "pdh_cert_len": 0x10,
            "plat_certs_address": 0x18,
            "plat_certs_len": 0x20,
            "amd_certs_address": 0x28,
            "amd_certs_len": 0x30,
            "session_address": 0x38,
            "session_len": 0x40,
        },
    ),
    Cmd.RECEIVE_START: (
        0x24,
        {
            "handle": 0,
            "policy": 4,
            "pdh_cert_address": 8,
            "pdh_cert_len": 0x10,
            "session_address": 0x18,
            "session_len": 0x20,
        },
    ),
    Cmd.DBG_DECRYPT: (0x1C, {"handle": 0, "src_addr": 8, "dst_addr": 0x10, "len": 0x18}),
}
for _c in (Cmd.SEND_UPDATE_DATA, Cmd.SEND_UPDATE_VMSA, Cmd.RECEIVE_UPDATE_DATA, Cmd.RECEIVE_UPDATE_VMSA):
    SPEC_BUFFERS[_c] = SPEC_BUFFERS[Cmd.LAUNCH_SECRET]
for _c in (Cmd.DEACTIVATE, Cmd.LAUNCH_FINISH, Cmd.SEND_FINISH, Cmd.SEND_CANCEL, Cmd.RECEIVE_FINISH):
    SPEC_BUFFERS[_c] = SPEC_BUFFERS[Cmd.DECOMMISSION]
SPEC_BUFFERS[Cmd.LAUNCH_UPDATE_VMSA] = SPEC_BUFFERS[Cmd.LAUNCH_UPDATE_DATA]
SPEC_BUFFERS[Cmd.DBG_ENCRYPT] = SPEC_BUFFERS[Cmd.DBG_DECRYPT]


@pytest.mark.parametrize("cmd", [c for c in Cmd if abi.BUFFERS[c] is not None], ids=lambda c: c.name)
def test_firmware_buffer_layout(cmd):
    layout = abi.BUFFERS[cmd]
    size, offsets = SPEC_BUFFERS[cmd]
    assert layout.size() == size
    assert layout.offsets() == offsets
    # reader and writer share the layout
    values = {n: (i + 1) * 3 for i, n in enumerate(offsets)}
    assert layout.unpack(layout(**values).pack()) == layout(**values)


@pytest.mark.parametrize(
    "layout",
    sorted({b for b in abi.BUFFERS.values() if b is not None}, key=lambda b: b.__name__),
    ids=lambda b: b.__name__,
)
def test_firmware_buffer_fields_are_its_format(layout):
    # The typed fields (what mypy and the constructor see) are FORMAT's named entries, in order, default 0.
    assert dataclasses.is_dataclass(layout)
    fields = dataclasses.fields(layout)
    assert [f.name for f in fields] == [n for n, _ in layout.FORMAT if n]
    assert all(f.type == "int" and f.default == 0 for f in fields)
    assert layout.unpack(bytes(layout.size())) == layout()
    with pytest.raises(TypeError):
        layout(reserved=1)


def test_firmware_buffer_declaration_must_match_format():
    with pytest.raises(TypeError, match="do not match its FORMAT"):

        class Swapped(CommandBuffer):  # fields out of FORMAT's order
            FORMAT = (("handle", "I"), (None, "I"), ("address", "Q"))
            address: int = 0
            handle: int = 0

    with pytest.raises(TypeError, match="do not match its FORMAT"):

        class Missing(CommandBuffer):
            FORMAT = (("handle", "I"), ("len", "I"))
            handle: int = 0

    with pytest.raises(TypeError, match="every field is an int"):

        class Wide(CommandBuffer):
            FORMAT = (("address", "Q"),)
            address: bytes = b""

    with pytest.raises(struct.error):

        class BadCode(CommandBuffer):
            FORMAT = (("handle", "Z"),)
            handle: int = 0


def test_session_and_header_offsets():
    assert session.SESSION_SIZE == abi.SESSION_SIZE == 128
    assert [
        (s.start, s.stop)
        for s in (session.NONCE, session.WRAP_TK, session.WRAP_IV, session.WRAP_MAC, session.POLICY_MAC)
    ] == [(0, 0x10), (0x10, 0x30), (0x30, 0x40), (0x40, 0x60), (0x60, 0x80)]
    assert abi.PACKET_HEADER_SIZE == 0x34 and abi.MEASURE_SIZE == 48 and abi.SEV_CERT_SIZE == 0x824
    assert abi.PLAT_CERTS_SIZE == 6252 and abi.SCRATCH_BUF_LEN == 0x5000
    assert session._AAD.size == 29  # CTX ‖ FLAGS ‖ IV ‖ len ‖ len (send_receive_update_aad_t)
    assert (session.CTX_SECRET, session.CTX_DATA, session.CTX_MEASURE) == (1, 2, 4)


# ---------------------------------------------------------------------------------------------------
# KVM facade semantics (Linux arch/x86/kvm/svm/sev.c)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vm():
    p = Platform(HostMemory(64 << 20, seed=7))
    sev_kvm = kvm.KvmHost(p).create_vm()
    sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_INIT)
    sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_START, kvm.kvm_sev_launch_start(policy=0))
    frames = p.dram.alloc_ram(2)
    for f in frames:
        sev_kvm.op(
            kvm.sev_cmd_id.KVM_SEV_LAUNCH_UPDATE_DATA,
            kvm.kvm_sev_launch_update_data(uaddr=sev_kvm.uaddr_of_hpa(int(f) * PAGE_SIZE), len=PAGE_SIZE),
        )
    return sev_kvm, frames


def _op(sev_kvm, op_id, arg):
    cmd = kvm.kvm_sev_cmd(id=op_id, data=ctypes.addressof(arg) if arg is not None else 0)
    return sev_kvm.memory_encrypt_op(cmd), cmd.error


def test_launch_measure_length_query(vm):
    sev_kvm, _ = vm
    arg = kvm.kvm_sev_launch_measure(uaddr=0, len=0)
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_LAUNCH_MEASURE, arg) == (-errno.EIO, SevStatus.INVALID_LENGTH)
    assert arg.len == 48


def _certs(sev_kvm):
    c = sev_kvm.platform.public_certs()
    bufs = {k: ctypes.create_string_buffer(v, len(v)) for k, v in c.items()}
    return c, bufs


@pytest.fixture(scope="module")
def sending(vm):
    sev_kvm, frames = vm
    mb = ctypes.create_string_buffer(48)
    sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_MEASURE, kvm.kvm_sev_launch_measure(uaddr=ctypes.addressof(mb), len=48))
    sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_FINISH)
    c, bufs = _certs(sev_kvm)
    # session_len == 0: a length query — firmware INVALID_LENGTH and 128 written back
    q = kvm.kvm_sev_send_start(session_len=0)
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_SEND_START, q) == (-errno.EIO, SevStatus.INVALID_LENGTH)
    assert q.session_len == 128
    sess = ctypes.create_string_buffer(128)
    arg = kvm.kvm_sev_send_start(
        pdh_cert_uaddr=ctypes.addressof(bufs["pdh"]),
        pdh_cert_len=2084,
        plat_certs_uaddr=ctypes.addressof(bufs["cert_chain"]),
        plat_certs_len=len(c["cert_chain"]),
        amd_certs_uaddr=ctypes.addressof(bufs["amd_cert_chain"]),
        amd_certs_len=len(c["amd_cert_chain"]),
        session_uaddr=ctypes.addressof(sess),
        session_len=128,
    )
    bad = kvm.kvm_sev_send_start.from_buffer_copy(bytes(arg))
    bad.pdh_cert_uaddr = 0x10
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_SEND_START, bad)[0] == -errno.EFAULT
    bad.pdh_cert_uaddr, bad.pdh_cert_len = arg.pdh_cert_uaddr, kvm.SEV_FW_BLOB_MAX_SIZE + 1
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_SEND_START, bad)[0] == -errno.EINVAL
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_SEND_START, arg) == (0, SevStatus.SUCCESS)
    assert any(sess.raw)
    return sev_kvm, frames, (bufs, sess)


def test_send_update_length_query_and_page_limit(sending):
    sev_kvm, frames, _ = sending
    for hdr_len, trans_len in ((0, 0), (0, 4096), (52, 0)):
        q = kvm.kvm_sev_send_update_data(hdr_len=hdr_len, trans_len=trans_len)
        ret, err = _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_SEND_UPDATE_DATA, q)
        assert ret == -errno.EIO and err == SevStatus.INVALID_LENGTH and q.hdr_len == 52
    hdr, tr = np.zeros(52, np.uint8), np.zeros(2 * PAGE_SIZE, np.uint8)
    base = sev_kvm.uaddr_of_hpa(int(frames[0]) * PAGE_SIZE)

    def sud(**kw):
        a = dict(
            hdr_uaddr=hdr.ctypes.data,
            hdr_len=52,
            guest_uaddr=base,
            guest_len=PAGE_SIZE,
            trans_uaddr=tr.ctypes.data,
            trans_len=PAGE_SIZE,
        )
        a.update(kw)
        return _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_SEND_UPDATE_DATA, kvm.kvm_sev_send_update_data(**a))

    assert sud(guest_uaddr=base + 16) == (-errno.EINVAL, 0)  # crosses into the next page
    assert sud(guest_len=2 * PAGE_SIZE, trans_len=2 * PAGE_SIZE)[0] == -errno.EINVAL
    assert sud(hdr_uaddr=0x20)[0] == -errno.EFAULT
    assert sud(trans_uaddr=8)[0] == -errno.EFAULT
    assert sud(guest_uaddr=0x1000)[0] == -errno.EFAULT  # not guest RAM
    assert sud(guest_uaddr=base + 256, guest_len=256, trans_len=256) == (0, SevStatus.SUCCESS)
    assert sud() == (0, SevStatus.SUCCESS)
    assert any(hdr[4:20]) and any(tr[:PAGE_SIZE])


def test_bad_pointers_never_crash(vm):
    sev_kvm, _ = vm
    for op_id in range(0, 24):
        ret = sev_kvm.memory_encrypt_op(kvm.kvm_sev_cmd(id=op_id, data=0x1000))
        assert ret < 0 or op_id in (
            kvm.sev_cmd_id.KVM_SEV_LAUNCH_FINISH,
            kvm.sev_cmd_id.KVM_SEV_SEND_FINISH,
            kvm.sev_cmd_id.KVM_SEV_RECEIVE_FINISH,
            kvm.sev_cmd_id.KVM_SEV_SEND_CANCEL,
        )
    assert sev_kvm.memory_encrypt_op(kvm.kvm_sev_cmd(id=99, data=0)) == -errno.EINVAL
    dbg = kvm.kvm_sev_dbg(src_uaddr=0x40, dst_uaddr=0x80, len=16)
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_DBG_DECRYPT, dbg)[0] == -errno.EFAULT


def test_receive_one_page_max_and_nonzero_fields():
    p = Platform(HostMemory(64 << 20, seed=8))
    sev_kvm = kvm.KvmHost(p).create_vm()
    sev_kvm.op(kvm.sev_cmd_id.KVM_SEV_INIT)
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_RECEIVE_START, kvm.kvm_sev_receive_start())[0] == -errno.EINVAL
    from pysev.owner import GuestOwner

    owner = GuestOwner(p.public_certs()["pdh"], 0)
    godh, sess = (ctypes.create_string_buffer(b, len(b)) for b in owner.launch_blobs())
    sev_kvm.op(
        kvm.sev_cmd_id.KVM_SEV_RECEIVE_START,
        kvm.kvm_sev_receive_start(
            pdh_uaddr=ctypes.addressof(godh), pdh_len=2084, session_uaddr=ctypes.addressof(sess), session_len=128
        ),
    )
    f = p.dram.alloc_ram(1)
    base = sev_kvm.uaddr_of_hpa(int(f[0]) * PAGE_SIZE)
    hdr, tr = np.zeros(52, np.uint8), np.zeros(2 * PAGE_SIZE, np.uint8)
    full = dict(
        hdr_uaddr=hdr.ctypes.data,
        hdr_len=52,
        guest_uaddr=base,
        guest_len=PAGE_SIZE,
        trans_uaddr=tr.ctypes.data,
        trans_len=PAGE_SIZE,
    )
    for k in full:
        arg = kvm.kvm_sev_receive_update_data(**dict(full, **{k: 0}))
        assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_DATA, arg)[0] == -errno.EINVAL, k
    arg = kvm.kvm_sev_receive_update_data(**dict(full, guest_uaddr=base + 16))
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_DATA, arg)[0] == -errno.EINVAL
    arg = kvm.kvm_sev_receive_update_data(**full)
    assert _op(sev_kvm, kvm.sev_cmd_id.KVM_SEV_RECEIVE_UPDATE_DATA, arg) == (-errno.EIO, SevStatus.BAD_MEASUREMENT)
