"""The fuzz targets in the default run, and the findings they made.

Hypothesis drives every target of ``tests/fuzz/targets.py`` for a bounded number of examples (derandomized,
no example database: the same inputs on every CI run): mutations of each target's seed corpus (bit flips,
truncations, splices, length-field edits) and raw bytes. A target raises on a finding, so a failing example
here is a bug or a broken invariant; the long campaign is ``python benchmarks/fuzz_campaign.py``.

The tests at the end pin the findings of the campaign: each was a strict xfail until the library was
fixed, and stays as a regression test. A new finding gets the same treatment (a strict xfail and a
``known:`` outcome in ``KNOWN_ISSUES``) until it is fixed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import socket
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysev.firmware.sev.abi import Cmd
from pysev.migration import stream
from pysev.qmp.commands import CommandTable
from pysev.qmp.framing import JsonStreamer
from pysev.qmp.server import QmpServer

_spec = importlib.util.spec_from_file_location("_fuzz_targets", Path(__file__).with_name("fuzz") / "targets.py")
assert _spec is not None and _spec.loader is not None
T = sys.modules.get("_fuzz_targets") or importlib.util.module_from_spec(_spec)
if "_fuzz_targets" not in sys.modules:
    sys.modules["_fuzz_targets"] = T
    _spec.loader.exec_module(T)

pytestmark = pytest.mark.fuzz

#: Examples per target: a few seconds in all on 2 cores.
EXAMPLES = {
    "stream": 150,
    "return_path": 400,
    "qmp_framing": 400,
    "qmp_dispatch": 100,
    "sev_cert": 300,
    "amd_cert": 100,
    "cert_chain": 60,
    "firmware": 250,
}


@pytest.fixture(scope="module", autouse=True)
def _worlds():
    yield
    T.close_worlds()


def inputs(name: str) -> st.SearchStrategy[bytes]:
    """Mutations of the target's seeds (the campaign's operators, driven by hypothesis), seeds as they
    are, and raw bytes. Deferred: building a corpus may need the simulated AMD root ($PYSEV_HOME)."""

    def build() -> st.SearchStrategy[bytes]:
        target = T.TARGETS[name]
        seeds, hints = target.seeds(), target.hints()
        mutated = st.builds(
            lambda i, s, k: T.mutate(seeds[i], random.Random(s), seeds, hints, ops=k),
            st.integers(0, len(seeds) - 1),
            st.integers(0, 2**32 - 1),
            st.integers(1, 8),
        )
        return st.one_of(mutated, mutated, st.sampled_from(seeds), st.binary(max_size=300))

    return st.deferred(build)


def _fuzz_test(name: str):
    @settings(
        max_examples=EXAMPLES[name],
        deadline=30_000,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=inputs(name))
    def test(data: bytes) -> None:
        outcome = T.TARGETS[name].run(data)
        assert isinstance(outcome, str) and outcome

    test.__name__ = f"test_fuzz_{name}"
    test.__doc__ = f"Target {name!r}: {T.TARGETS[name].run.__doc__.splitlines()[0]}"
    return test


test_fuzz_stream = _fuzz_test("stream")
test_fuzz_return_path = _fuzz_test("return_path")
test_fuzz_qmp_framing = _fuzz_test("qmp_framing")
test_fuzz_qmp_dispatch = _fuzz_test("qmp_dispatch")
test_fuzz_sev_cert = _fuzz_test("sev_cert")
test_fuzz_amd_cert = _fuzz_test("amd_cert")
test_fuzz_cert_chain = _fuzz_test("cert_chain")
test_fuzz_firmware = _fuzz_test("firmware")


def test_every_target_is_fuzzed_here():
    assert set(EXAMPLES) == set(T.TARGETS)


# ---------------------------------------------------------------------------------------------------------
# the harness: its seeds reach what they are meant to reach, and its checks fire
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("stream", {"ok"}),
        ("sev_cert", {"ok"}),
        ("amd_cert", {"cert", "chain"}),
        ("cert_chain", {"status:SUCCESS"}),
    ],
)
def test_seeds_are_valid_inputs(name, expected):
    assert {T.TARGETS[name].run(seed) for seed in T.TARGETS[name].seeds()} == expected


def test_return_path_seeds_cover_every_message_type():
    outcomes = {T.target_return_path(seed) for seed in T.return_path_seeds()}
    assert outcomes == {f"ok:{kind.name}" for kind in stream.ReturnMessage}


def test_firmware_seeds_reach_every_handler():
    """The firmware world has a guest in every state a command needs: each well-formed seed succeeds or
    is refused for the reason its buffer names (not for a broken harness)."""
    refused = {
        Cmd.INIT: "INVALID_PLATFORM_STATE",  # already INIT
        Cmd.PEK_CERT_IMPORT: "INVALID_PLATFORM_STATE",  # INIT only; the world is WORKING
        Cmd.PLATFORM_RESET: "INVALID_PLATFORM_STATE",
        Cmd.PEK_GEN: "INVALID_PLATFORM_STATE",
        Cmd.DECOMMISSION: "ACTIVE",  # an activated guest
        Cmd.ACTIVATE: "ACTIVE",
    }
    world = T.firmware_world()
    for cmd, buf in world.seed_buffers():
        got = T.target_firmware(T.encode_firmware_input(cmd, buf))
        if cmd in tuple(Cmd):
            assert got == f"status:{refused.get(Cmd(cmd), 'SUCCESS')}", Cmd(cmd).name
        else:
            assert got == "status:INVALID_COMMAND"
    patched = [T.target_firmware(seed) for seed in T.firmware_seeds()[-6:]]
    assert patched == [f"status:{s}" for s in ("BAD_MEASUREMENT", "UNSUPPORTED", "BAD_SIGNATURE")] + [
        f"status:{s}" for s in ("INVALID_LENGTH", "BAD_MEASUREMENT", "BAD_MEASUREMENT")
    ]


def test_firmware_target_catches_a_refused_command_that_writes(monkeypatch):
    """The snapshot is not vacuous: a handler that writes its output and then refuses is a finding."""
    from pysev.firmware.sev.platform import Platform
    from pysev.firmware.status import SevStatus

    def leaky_get_id(self, buf):
        self.dram.write(buf.address, b"\xaa" * 64)
        return SevStatus.INVALID_LENGTH

    seed = T.encode_firmware_input(Cmd.GET_ID, dict(T.firmware_world().seed_buffers())[Cmd.GET_ID])
    monkeypatch.setattr(Platform, "_cmd_get_id", leaky_get_id)
    with pytest.raises(T.InvariantError, match="GET_ID refused with INVALID_LENGTH but changed host memory"):
        T.target_firmware(seed)
    monkeypatch.undo()
    assert T.target_firmware(seed) == "status:SUCCESS"


def test_qmp_dispatch_target_catches_a_handler_that_crashes(monkeypatch):
    """A handler that fails with anything but a QMP error (a traceback where a clear error is due)."""
    from pysev.qmp.vmm import Vmm

    def crash(self, args, session):
        return {}["no such key"]

    T.close_worlds()
    monkeypatch.setattr(Vmm, "cmd_query_status", crash)
    request = b'{"execute": "qmp_capabilities"} {"execute": "query-status"}'
    with pytest.raises(T.InvariantError, match="handler failed unexpectedly"):
        T.target_qmp_dispatch(request)
    monkeypatch.undo()
    T.close_worlds()
    assert T.target_qmp_dispatch(request) == "return"


def test_secret_scan_finds_every_encoding():
    key = bytes(range(16))
    for text in (key.hex(), key.hex().upper(), key.decode("latin-1"), repr(key)):
        assert T.leaked_secret(f"error: {text}", (key,))
    assert T.leaked_secret("error: nothing here", (key,)) is None


# ---------------------------------------------------------------------------------------------------------
# findings: each was a strict xfail until the library was fixed; they stay as regression tests
# ---------------------------------------------------------------------------------------------------------
def test_known_issues_name_tests_of_this_file():
    for outcome, test in T.KNOWN_ISSUES.items():
        assert outcome.startswith("known:") and callable(globals()[test]), outcome


def test_stream_reader_allocation_follows_arrival():
    data = struct.pack(">IIB", stream.QEMU_VM_FILE_MAGIC, 3, stream.QEMU_VM_EOF)
    data += struct.pack(">BI", stream.QEMU_VM_VMDESCRIPTION, stream.VMDESC_MAX) + b"{}"
    limits = stream.ReaderLimits(read_chunk=64 << 10)
    reader = stream.StreamReader(io.BytesIO(data), limits)
    tracemalloc.start()
    try:
        reader.read_header()
        assert isinstance(reader.next_section(), stream.Eof)
        with pytest.raises(stream.StreamError, match="truncated"):
            reader.read_vmdesc()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= limits.read_chunk + 64 * len(data) + (256 << 10), f"{peak} bytes for a {len(data)}-byte stream"


def test_qmp_framing_rejects_numbers_that_overflow_to_infinity():
    got = JsonStreamer().feed(b'{"execute": "query-version", "id": 1e400} [-1E999]')
    assert [value for value, err in got] == [None, None]
    assert all(err is not None and not err.fatal for _, err in got)


def test_qmp_server_answers_a_request_whose_id_overflows(tmp_path):
    server = QmpServer(CommandTable())
    path = server.run_in_thread(str(tmp_path / "qmp.sock"))
    try:
        with socket.socket(socket.AF_UNIX) as sock, sock.makefile("rb") as rfile:
            sock.settimeout(5)
            sock.connect(path)
            assert b"QMP" in rfile.readline()
            sock.sendall(b'{"execute": "qmp_capabilities", "id": 1e400}')
            reply = rfile.readline()
            assert reply, "the server closed the connection instead of answering"
            assert "error" in json.loads(reply) or "return" in json.loads(reply)
            sock.sendall(b'{"execute": "query-version", "id": 2}')
            assert json.loads(rfile.readline())["id"] == 2
    finally:
        server.stop()
