"""Benchmarks measure the native kernels: a run on the plain-Python twins (csev unbuilt, e.g. a source
tree first on ``sys.path``, or ``CSEV_PURE=1``) fails every benchmark with the reason, instead of
recording fallback figures as if they were the kernels'. A benchmark run without ``--benchmark-enable``
(pyproject's ``addopts`` disables them for the test run) fails with the command to use."""

from __future__ import annotations

import pytest

from pysev import benchmarking


@pytest.fixture(scope="session", autouse=True)
def native_kernels() -> None:
    reason = benchmarking.fallback_reason()
    if reason:
        pytest.fail(
            f"csev runs its plain-Python kernels: {reason}. Benchmarks measure the native ones: install pysev "
            "(pip install .) and run pytest from outside an unbuilt source tree, without CSEV_PURE.",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def benchmarks_enabled(request: pytest.FixtureRequest) -> None:
    if "benchmark" in request.fixturenames and request.getfixturevalue("benchmark").disabled:
        pytest.fail("benchmarks measure nothing when disabled: pytest benchmarks --benchmark-enable", pytrace=False)
