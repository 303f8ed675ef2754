"""A bounded slice of the fault-injection campaign (``benchmarks/fault_campaign.py``): random cuts,
flipped bytes, stalls and cancels over loopback TCP, with and without page channels; every trial must
keep the commit invariants (one runner, the source's memory, both ends agreeing, never two runners)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fault_campaign.py"
_spec = importlib.util.spec_from_file_location("_fault_campaign", _path)
fault_campaign = sys.modules.get("_fault_campaign") or importlib.util.module_from_spec(_spec)
if "_fault_campaign" not in sys.modules:
    sys.modules["_fault_campaign"] = fault_campaign
    _spec.loader.exec_module(fault_campaign)


@pytest.fixture(scope="module")
def hosts():
    return {"A": fault_campaign.Host("A", 256 << 20, seed=1), "B": fault_campaign.Host("B", 256 << 20, seed=2)}


@pytest.mark.parametrize("seed", range(1000, 1016))
def test_fault_trial_keeps_the_invariants(hosts, seed):
    trial = fault_campaign.run_trial(seed, hosts)
    assert not trial.violations, (trial.fault, trial.outcome, trial.violations)
