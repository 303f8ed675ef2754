"""Shared test setup."""

import asyncio
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def pysev_home(tmp_path_factory):
    """One private $PYSEV_HOME per test session, so the simulated AMD root is generated once, in tmp."""
    home = tmp_path_factory.mktemp("pysev-home")
    old = os.environ.get("PYSEV_HOME")
    os.environ["PYSEV_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("PYSEV_HOME", None)
    else:
        os.environ["PYSEV_HOME"] = old


@pytest.fixture(scope="module")
def legacy_qmp_event_loop():
    """qemu.qmp's legacy client runs on the thread's event loop, creating one if there is none: modules
    that use it get one that they close, so no unclosed loop is left for a later asyncio.run() to orphan
    (the loop would be collected, with its sockets, in the middle of an unrelated test)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()
