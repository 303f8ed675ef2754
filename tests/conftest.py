"""Shared test setup."""

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
