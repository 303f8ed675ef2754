"""QMP that tells the truth, driven with the real qemu.qmp client against a ``pysev vm`` process:
capabilities listed only if they work, SEV certificates checked when they are set, parameter names as
QMP spells them, and the cheap queries orchestrators call (name, UUID, KVM, vCPUs, dirty rate)."""

from __future__ import annotations

import base64
import importlib.util
import pathlib
import sys
import time

import pytest
from qemu.qmp import ExecuteError

_spec = importlib.util.spec_from_file_location("_vm_qmp_helpers", pathlib.Path(__file__).with_name("test_vm_qmp.py"))
Q = sys.modules.get("_vm_qmp_helpers") or importlib.util.module_from_spec(_spec)
if "_vm_qmp_helpers" not in sys.modules:
    sys.modules["_vm_qmp_helpers"] = Q
    _spec.loader.exec_module(Q)
vms = Q.vms


pytestmark = pytest.mark.usefixtures("legacy_qmp_event_loop")


def test_capabilities_listed_are_the_ones_that_work(vms):
    mon = vms("src").client()
    listed = mon.cmd("query-migrate-capabilities")
    names = {c["capability"] for c in listed}
    assert names == {"events", "auto-converge", "multifd", "return-path"}
    for item in listed:  # each one listed can be set to what it shows
        mon.cmd("migrate-set-capabilities", capabilities=[item])
    with pytest.raises(ExecuteError, match="postcopy-ram"):
        mon.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": True}],
        )
    assert not any(c["state"] for c in mon.cmd("query-migrate-capabilities") if c["capability"] == "events"), (
        "a refused call changes nothing"
    )


def test_sev_certificates_checked_when_set(vms):
    src, dst = vms("src"), vms("dst", "--incoming", "tcp:127.0.0.1:0")
    s, d = src.client(), dst.client()
    caps = d.cmd("query-sev-capabilities")
    s.cmd("migrate-set-parameters", **Q.sev_params(caps))  # the real ones are accepted
    garbage = base64.b64encode(b"\x01" * 2084).decode()
    for name, value, fragment in [
        ("sev-pdh", "not base64!", "sev-pdh"),
        ("sev-pdh", garbage, "sev-pdh"),
        ("sev-plat-cert", caps["pdh"], "sev-plat-cert"),  # one certificate where three belong
        ("sev-amd-cert", caps["pdh"], "sev-amd-cert"),
    ]:
        with pytest.raises(ExecuteError, match=fragment):
            s.cmd("migrate-set-parameters", **{name: value})
    with pytest.raises(ExecuteError, match="Parameter 'downtime-limit'"):
        s.cmd("migrate-set-parameters", **{"downtime-limit": 3_000_000})


def test_cheap_queries(vms):
    mon = vms("src", "--dirty-rate", "16M").client()
    assert mon.cmd("query-name")["name"]
    uuid = mon.cmd("query-uuid")["UUID"]
    assert len(uuid) == 36 and uuid == mon.cmd("query-uuid")["UUID"]
    assert mon.cmd("query-kvm") == {"enabled": True, "present": True}
    cpus = mon.cmd("query-cpus-fast")
    assert [c["cpu-index"] for c in cpus] == [0] and cpus[0]["thread-id"] > 0 and cpus[0]["target"] == "x86_64"
    assert mon.cmd("query-dirty-rate")["status"] == "unstarted"
    mon.cmd("calc-dirty-rate", **{"calc-time": 500, "calc-time-unit": "millisecond"})
    deadline = time.monotonic() + 20
    while (info := mon.cmd("query-dirty-rate"))["status"] != "measured":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert info["mode"] == "dirty-bitmap" and info["calc-time"] == 500
    assert 4 <= info["dirty-rate"] <= 64, info  # MB/s, the guest dirties 16 MB/s (distinct pages: fewer)
    with pytest.raises(ExecuteError, match="calc-time"):
        mon.cmd("calc-dirty-rate", **{"calc-time": 0})
