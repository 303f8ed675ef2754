"""The cheap machine queries orchestrators call (QEMU's ``qapi/machine.json``, ``qapi/misc.json``,
``qapi/migration.json``): ``query-name``, ``query-uuid``, ``query-kvm``, ``query-cpus-fast``, and the
dirty-rate measurement ``calc-dirty-rate`` / ``query-dirty-rate`` in QEMU's dirty-bitmap mode: the VM's
dirty log is fetched and cleared, then fetched again after ``calc-time`` and its pages counted.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import numpy as np

from pysev.hv.machine import VCPUS, VirtualMachine
from pysev.hv.memory import nwords
from pysev.qmp.commands import generic_error

PAGE = 4096
MiB = 1 << 20

#: QEMU's bounds for calc-time (migration/dirtyrate.c): 1..60 s, or 50..60000 ms.
CALC_TIME_BOUNDS = {"second": (1, 60), "millisecond": (50, 60_000)}


def cpus_fast(vm: VirtualMachine) -> list[dict[str, Any]]:
    """QEMU's CpuInfoFast per vCPU: index, QOM path, the host thread that runs it, topology, target."""
    threads = {t.name: t.native_id for t in threading.enumerate()}
    return [
        {
            "cpu-index": i,
            "qom-path": f"/machine/unattached/device[{i}]",
            "thread-id": threads.get(f"vcpu{i}") or threading.get_native_id(),
            "props": {"core-id": 0, "thread-id": 0, "socket-id": i},
            "target": "x86_64",
        }
        for i in range(VCPUS)
    ]


class DirtyRateMeter:
    """One dirty-rate measurement at a time, as QEMU's DirtyRateInfo reports it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._info: dict[str, Any] = {"status": "unstarted", "start-time": 0, "calc-time": 0}

    def info(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._info)

    def start(self, vm: VirtualMachine, calc_time: int, unit: str, migrating: bool) -> None:
        low, high = CALC_TIME_BOUNDS[unit]
        if not low <= calc_time <= high:
            raise generic_error(f"Parameter 'calc-time' is out of range: {low}..{high} {unit}s")
        if migrating:  # both use the dirty log, which a measurement would clear under the migration
            raise generic_error("Dirty rate cannot be measured while a migration is in progress")
        with self._lock:
            if self._info["status"] == "measuring":
                raise generic_error("the dirty rate is already being measured")
            self._info = {
                "status": "measuring",
                "start-time": int(time.time()),
                "calc-time": calc_time,
                "calc-time-unit": unit,
                "sample-pages": 0,
                "mode": "dirty-bitmap",
            }
        seconds = calc_time if unit == "second" else calc_time / 1000
        threading.Thread(target=self._measure, args=(vm, seconds), name="dirty-rate", daemon=True).start()

    def _measure(self, vm: VirtualMachine, seconds: float) -> None:
        memory = vm.memory
        scratch = {b.idstr: np.zeros(nwords(b.npages), dtype=np.uint64) for b in memory.blocks}
        for block in memory.blocks:  # start from a clean log
            memory.sync_dirty(block, scratch[block.idstr])
        t0 = time.monotonic()
        time.sleep(seconds)
        pages = 0
        for block in memory.blocks:
            scratch[block.idstr][:] = 0
            pages += memory.sync_dirty(block, scratch[block.idstr])
        elapsed = max(time.monotonic() - t0, 1e-6)
        with self._lock:
            self._info["dirty-rate"] = int(pages * PAGE / MiB / elapsed)
            self._info["status"] = "measured"


def vm_uuid(name: str) -> str:
    """A stable UUID for a VMM's guest (QEMU's -uuid; here derived from its name)."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.pysev"))
