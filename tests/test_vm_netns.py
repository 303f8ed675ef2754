"""Two hosts: a ``pysev vm`` in each of two network namespaces joined by a veth pair, migrating across the
link, then again over a degraded link (``tc netem`` delay and loss). Needs root, ``ip netns`` and veth;
the netem case also needs the kernel's ``sch_netem``. Each part skips with the reason where it cannot run.

QMP stays on UNIX sockets in /tmp (the filesystem is shared; a TCP monitor inside a namespace is not
reachable from outside); only the migration crosses the link.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from pysev.cli import child_command

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("legacy_qmp_event_loop")]

GUEST = "32M"
START_TIMEOUT = 30.0
SUBNET = "10.77.0"  # only inside the test's own namespaces


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


class Link:
    """Namespaces ``a`` and ``b`` joined by a veth pair: a = SUBNET.1, b = SUBNET.2."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = {"a": f"pysev{tag}a", "b": f"pysev{tag}b"}
        self.dev = {"a": f"psv{tag}a", "b": f"psv{tag}b"}  # ≤ 15 characters (IFNAMSIZ)
        self.ip = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2"}
        self.created: list[str] = []

    def up(self) -> None:
        for side in "ab":
            _run("ip", "netns", "add", self.ns[side])
            self.created.append(self.ns[side])
        _run("ip", "link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"])
        for side in "ab":
            ns, dev = self.ns[side], self.dev[side]
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{self.ip[side]}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def netem(self, *spec: str) -> None:
        for side in "ab":
            _run(
                "ip",
                "netns",
                "exec",
                self.ns[side],
                "tc",
                "qdisc",
                "replace",
                "dev",
                self.dev[side],
                "root",
                "netem",
                *spec,
            )

    def down(self) -> None:
        for ns in self.created:  # deleting a namespace deletes its end of the veth pair, and so both
            _run("ip", "netns", "del", ns, check=False)
        self.created.clear()


@pytest.fixture(scope="module")
def link():
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip (apt-get install iproute2)")
    net = Link()
    try:
        net.up()
    except subprocess.CalledProcessError as err:
        net.down()
        pytest.skip(f"cannot create network namespaces and a veth pair here: {err.stderr.strip() or err}")
    try:
        yield net
    finally:
        net.down()


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="pvmns", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class NsVm:
    """``ip netns exec NS python -m pysev.cli vm …`` with its QMP socket in ``workdir``."""

    def __init__(self, link: Link, side: str, workdir: str, name: str, *args: str) -> None:
        env = dict(os.environ)
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.log_path = os.path.join(workdir, f"{name}.log")
        cmd = [
            "ip",
            "netns",
            "exec",
            link.ns[side],
            *child_command("-v", "vm", "--memory", GUEST, "--qmp", self.qmp_path, *args),
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(START_TIMEOUT)
        sel.close()
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise AssertionError(f"{name} did not start:\n{self.log()}")
        self.hello = json.loads(line)
        self.mon = QEMUMonitorProtocol(self.qmp_path)
        self.mon.connect()
        self.mon.settimeout(60)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.mon.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()


def _migrate(src: NsVm, dst: NsVm, uri: str, timeout: float) -> dict:
    caps = dst.mon.cmd("query-sev-capabilities")
    src.mon.cmd(
        "migrate-set-parameters",
        **{
            "sev-pdh": caps["pdh"],
            "sev-plat-cert": caps["cert-chain"],
            "sev-amd-cert": caps["amd-cert-chain"],
            "max-bandwidth": 0,
        },
    )
    src.mon.cmd("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    while (info := src.mon.cmd("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"migration still {info['status']} after {timeout} s: {info}"
        time.sleep(0.2)
    assert info["status"] == "completed", (info, src.log(), dst.log())
    while dst.mon.cmd("query-status")["status"] != "running":
        assert time.monotonic() < deadline, dst.log()
        time.sleep(0.1)
    assert src.mon.cmd("query-status")["status"] == "postmigrate"
    assert dst.mon.cmd("query-migrate")["x-guest-digest"] == info["x-guest-digest"]
    assert dst.mon.cmd("x-guest-digest")["digest"] == info["x-guest-digest"]
    return info


def test_migrate_between_namespaces(link, workdir):
    src = NsVm(link, "a", workdir, "src")
    dst = NsVm(link, "b", workdir, "dst", "--incoming", f"tcp:{link.ip['b']}:4444")
    try:
        assert dst.hello["incoming"] == f"tcp:{link.ip['b']}:4444"
        info = _migrate(src, dst, dst.hello["incoming"], timeout=60)
        assert info["ram"]["transferred"] >= 32 << 20
    finally:
        src.stop()
        dst.stop()


def test_migrate_over_lossy_link(link, workdir):
    try:
        link.netem("delay", "20ms", "loss", "1%")
    except subprocess.CalledProcessError as err:
        pytest.skip(f"tc netem is not available here (kernel module sch_netem): {err.stderr.strip()}")
    src = NsVm(link, "a", workdir, "src")
    dst = NsVm(link, "b", workdir, "dst", "--incoming", f"tcp:{link.ip['b']}:4445")
    back = None
    try:
        _migrate(src, dst, dst.hello["incoming"], timeout=240)
        # And back again, over the same degraded link, from the guest now running in b.
        back = NsVm(link, "a", workdir, "back", "--incoming", f"tcp:{link.ip['a']}:4446")
        _migrate(dst, back, back.hello["incoming"], timeout=240)
    finally:
        for vm in (src, dst, back):
            if vm is not None:
                vm.stop()
