"""The Python API cleans up after itself: hosts, VMs and migration results are context managers whose exit
stops every vCPU thread and frees the guest's memory; ``migrate_local`` takes a timeout and a pass limit."""

from __future__ import annotations

import threading

from pysev.hv.machine import Host, RunState, VirtualMachine
from pysev.migration import MigrationParameters, migrate_local

MiB = 1 << 20


def _vcpus() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vcpu")]


def test_context_managers_stop_every_thread_and_free_memory():
    with Host("a", 512 * MiB) as a, Host("b", 512 * MiB) as b:
        vm = VirtualMachine(a, 64 * MiB, dirty_rate=20e6)
        vm.boot_fill()
        with migrate_local(vm, b, params=MigrationParameters(max_bandwidth=0)) as result:
            assert result.info["status"] == "completed" and result.verified
            assert result.destination is not None and result.destination.state == RunState.RUNNING
            assert _vcpus(), "the destination's vCPU runs"
        assert result.destination.state == RunState.SHUTDOWN
        other = VirtualMachine(a, 32 * MiB, dirty_rate=1e6)  # left running: the host's exit stops it
    assert other.state == RunState.SHUTDOWN and vm.state == RunState.SHUTDOWN
    assert not _vcpus()
    assert a.dram.resident_bytes() == 0 and b.dram.resident_bytes() == 0


def test_timeout_cancels_and_the_source_keeps_running():
    with Host("a", 512 * MiB) as a, Host("b", 512 * MiB) as b, VirtualMachine(a, 128 * MiB) as vm:
        vm.boot_fill()
        slow = MigrationParameters(max_bandwidth=16 * MiB)  # 128 MiB takes ~8 s
        with migrate_local(vm, b, params=slow, timeout=0.5) as result:
            assert result.info["status"] == "cancelled"
            assert result.destination is None
        assert vm.state == RunState.RUNNING


def test_pass_limit_ends_a_migration_that_cannot_converge():
    with Host("a", 512 * MiB) as a, Host("b", 512 * MiB) as b:
        with VirtualMachine(a, 64 * MiB, dirty_rate=200e6, workload="uniform") as vm:
            params = MigrationParameters(max_bandwidth=32 * MiB, downtime_limit=1)
            with migrate_local(vm, b, params=params, max_passes=2) as result:
                assert result.info["status"] == "failed"
                assert "did not converge in 2 passes" in result.info["error-desc"]
            assert vm.state == RunState.RUNNING


def test_bad_arguments_raise_before_anything_starts():
    """One failure model: bad arguments raise (TypeError/ValueError naming the argument) before anything
    is created or sent; a migration that starts returns its outcome (status, error-desc) and never raises."""
    import pytest

    with Host("a", 512 * MiB) as a:
        for bad, kind, fragment in [
            ("256M", TypeError, "memory_size"),
            (0, ValueError, "memory_size"),
            (1000, ValueError, "multiple of 4096"),
        ]:
            with pytest.raises(kind, match=fragment):
                VirtualMachine(a, bad)
        for policy in (-1, 1 << 32, 0x40):
            with pytest.raises(ValueError, match="policy"):
                VirtualMachine(a, 32 * MiB, policy=policy)
        with pytest.raises(ValueError, match="dirty_rate"):
            VirtualMachine(a, 32 * MiB, dirty_rate=-1)
        for kw, fragment in [
            ({"downtime_limit": -5}, "downtime-limit"),
            ({"max_bandwidth": -1}, "max-bandwidth"),
            ({"multifd_channels": 0}, "multifd-channels"),
            ({"multifd_channels": 100_000}, "multifd-channels"),
            ({"commit_timeout": 0}, "commit-timeout"),
        ]:
            with pytest.raises(ValueError, match=fragment):
                MigrationParameters(**kw)
        from pysev.migration import migrate_tcp

        with VirtualMachine(a, 32 * MiB) as vm, pytest.raises(ValueError, match="pdh, cert-chain, amd-cert-chain"):
            migrate_tcp(vm, "tcp:127.0.0.1:1", {})
