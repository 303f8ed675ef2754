"""Migration performance requirements, each a ratio measured in the same run (not in the default test run).

    pytest benchmarks/test_migration.py --benchmark-enable -s

All three move gigabytes (marker ``migration_large``; ``-m "not migration_large"`` leaves them out). Their
processes run this installation of pysev and csev (``pysev.cli.python_command``), never a source tree
in the working directory, and each test checks that source and destination ran the native kernels.

(a) idle 2 GiB guest between two processes over loopback TCP: throughput >= 0.75 x the 1-thread send
    kernel measured beside it (pysev.benchmarking);
(b) a guest dirtying 100 MB/s with downtime-limit 300 ms converges, measured downtime <= limit;
(c) source peak memory (VmHWM of the source process) <= 1.25 x guest size: no whole-guest copies;
(d) pages/s against the PSP's published 350-450 pages/s (qemu-migration.md §5);
(e) the design choice behind (a): SEND_UPDATE_DATA into a cache-sized ring that a loopback socket drains
    slice by slice beats streaming whole batches past the cache and sending them after.
"""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
import threading
import time

import numpy as np
import pytest

import csev
from pysev import benchmarking
from pysev.cli import installation, python_command
from pysev.migration import stream
from pysev.migration.channels import BATCH_PAGES, SEND_RING_RECORDS
from pysev.migration.transport import SOCKET_BUFFER

GIB = 1 << 30
PSP_PAGES_PER_S = (350, 450)

# The source side in a process of its own, so its peak RSS is the source's alone; the destination is
# the `pysev migrate --serve` process it starts (as `pysev migrate --transport tcp` does).
SOURCE = textwrap.dedent("""
    import json, subprocess, sys, time
    from pysev.cli import child_command, installation
    from pysev.hv.machine import Host, VirtualMachine
    from pysev.migration import MigrationParameters, migrate_tcp
    size, dirty, downtime, channels = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    host = Host("source", size + (512 << 20), seed=1)
    vm = VirtualMachine(host, size, dirty_rate=dirty, seed=3)
    vm.boot_fill()
    child = subprocess.Popen(child_command("migrate", "--serve", "tcp:127.0.0.1:0", "--memory", str(size)),
                             stdout=subprocess.PIPE, text=True)
    hello = json.loads(child.stdout.readline())
    t0 = time.monotonic()
    out = migrate_tcp(vm, hello["uri"], hello["capabilities"], channels=channels,
                      params=MigrationParameters(max_bandwidth=0, downtime_limit=downtime))
    wall = time.monotonic() - t0
    dest = json.loads(child.stdout.readline())
    child.wait()
    hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(json.dumps({"info": out.info(), "passes": out.passes, "dest": dest, "wall": wall, "hwm": hwm,
                      "verified": out.digest_at_switchover is not None
                                  and out.digest_at_switchover == dest.get("digest"),
                      "source_installation": installation(), "destination_installation": hello["installation"]}))
""")


def _source(size: int, dirty: float = 0.0, downtime: int = 300, channels: int = 0) -> dict:
    res = subprocess.run(
        python_command(SOURCE, str(size), str(dirty), str(downtime), str(channels)),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    # Figures of the plain-Python kernels, or of another installation, would be recorded as these.
    assert r["source_installation"] == r["destination_installation"] == installation(), r
    assert benchmarking.fallback_reason() == "", benchmarking.fallback_reason()
    return r


@pytest.fixture(scope="module")
def send_1t_mbps():
    w = benchmarking.Workload(64)
    w.send(1)
    return w.mbps(benchmarking.best_of(lambda: w.send(1), 5))


@pytest.mark.migration_large
def test_idle_2g_tcp_throughput_memory_and_pages_per_second(benchmark, send_1t_mbps):
    size = 2 * GIB
    r = benchmark.pedantic(lambda: _source(size), rounds=1, iterations=1)
    info = r["info"]
    assert info["status"] == "completed" and r["verified"], r
    first = r["passes"][0]
    mbps = first["pages"] * 4096 / first["seconds"] / 1e6  # guest MB/s of the bulk pass
    overall = info["ram"]["total"] / (info["total-time"] / 1000) / 1e6
    pps = first["pages"] / first["seconds"]
    extra = {
        "guest_bytes": size,
        "send_kernel_1t_mbps": send_1t_mbps,
        "migration_mbps_first_pass": mbps,
        "migration_mbps_overall": overall,
        "ratio_to_send_kernel_1t": mbps / send_1t_mbps,
        "ratio_overall_to_send_kernel_1t": overall / send_1t_mbps,
        "total_time_ms": info["total-time"],
        "downtime_ms": info["downtime"],
        "source_vmhwm_bytes": r["hwm"],
        "source_peak_ratio_to_guest": r["hwm"] / size,
        "pages_per_second": pps,
        "ratio_to_psp_450": pps / PSP_PAGES_PER_S[1],
        "ratio_to_psp_350": pps / PSP_PAGES_PER_S[0],
        # What the regression gate compares between runs (benchmarks/compare.py): ratios to limits
        # measured in the same run, and which way is better.
        "gate": {"ratio_to_send_kernel_1t": "higher", "source_peak_ratio_to_guest": "lower"},
    }
    benchmark.extra_info.update(extra)
    print(json.dumps(extra, indent=1))
    assert extra["ratio_to_send_kernel_1t"] >= 0.75
    assert extra["source_peak_ratio_to_guest"] <= 1.25
    assert pps > 100 * PSP_PAGES_PER_S[1]


@pytest.mark.migration_large
def test_dirtying_100mbs_converges_within_300ms(benchmark):
    r = benchmark.pedantic(lambda: _source(1 * GIB, dirty=100e6, downtime=300), rounds=1, iterations=1)
    info = r["info"]
    extra = {
        "status": info["status"],
        "downtime_ms": info.get("downtime"),
        "passes": len(r["passes"]),
        "total_time_ms": info["total-time"],
        "dirty_rate_bytes_s": 100e6,
        "downtime_limit_ms": 300,
        # Downtime is gated by its own limit (asserted below), not between runs: it varies 13-150 ms.
        "gate": {},
    }
    benchmark.extra_info.update(extra)
    print(json.dumps(extra, indent=1))
    assert info["status"] == "completed" and r["verified"]
    assert info["downtime"] <= 300


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return a, b


def _send_over_loopback(mem: np.ndarray, batches: list[np.ndarray], ring: bool) -> float:
    """Guest MB/s of SEND_UPDATE_DATA batches written as migration records to a loopback socket that a
    thread drains: into a ring of ``SEND_RING_RECORDS`` sent slice by slice (ordinary stores), or
    into whole-batch records (non-temporal stores) sent after each batch."""
    keys = (bytes(range(32)), bytes(range(16)), bytes(range(3, 19)))
    a, b = _loopback_pair()

    def drain() -> None:
        buf = bytearray(1 << 20)
        while b.recv_into(buf):
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    rec = np.zeros(SEND_RING_RECORDS if ring else BATCH_PAGES, stream.ENC_PAGE_RECORD)
    t0 = time.perf_counter()
    try:
        for idx in batches:
            tweaks = idx.astype(np.uint64) << np.uint64(12)
            if ring:
                csev.send_pages(
                    *keys,
                    mem,
                    idx,
                    tweaks,
                    rec["hdr"],
                    rec["trans"],
                    threads=1,
                    nontemporal=False,
                    on_slice=lambda start, stop: a.sendall(rec[: stop - start].view(np.uint8)),
                )
            else:
                csev.send_pages(*keys, mem, idx, tweaks, rec["hdr"], rec["trans"], threads=1)
                a.sendall(rec.view(np.uint8))
        a.shutdown(socket.SHUT_WR)
        reader.join()
        return sum(len(i) for i in batches) * 4096 / (time.perf_counter() - t0) / 1e6
    finally:
        a.close()
        b.close()


@pytest.mark.migration_large
def test_send_ring_beats_streamed_batches_over_loopback(benchmark):
    rows = (1 << 30) // 4096  # 1 GiB of guest rows: the pages come from DRAM
    mem = np.ones((rows, 4096), np.uint8)
    perm = np.random.default_rng(0).permutation(rows).astype(np.int64)
    batches = [perm[i : i + BATCH_PAGES] for i in range(0, 64 * BATCH_PAGES, BATCH_PAGES)]
    runs = {"ring": [], "streamed": []}

    def alternate() -> None:
        for mode in ("streamed", "ring"):
            runs[mode].append(_send_over_loopback(mem, batches, mode == "ring"))

    benchmark.pedantic(alternate, rounds=3, iterations=1)
    ring, streamed = max(runs["ring"]), max(runs["streamed"])
    extra = {
        "ring_mbps": ring,
        "streamed_mbps": streamed,
        "ring_to_streamed": ring / streamed,
        "ring_records": SEND_RING_RECORDS,
        "batch_pages": BATCH_PAGES,
        "gate": {"ring_to_streamed": "higher"},
    }
    benchmark.extra_info.update(extra)
    print(json.dumps(extra, indent=1))
    assert ring / streamed >= 1.05  # measured 1.12-1.18 on this project's machine
