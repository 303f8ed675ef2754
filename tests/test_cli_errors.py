"""Bad input to the command line ends at once: exit status 2, one line on stderr naming the option and the
problem, no traceback, nothing started. Each case runs the installed ``pysev`` in a child process from
the repository root, where a ``python -m pysev.cli`` would import the unbuilt source tree.

And ``pysev bench kernels`` exits non-zero when a figure misses its target, so a CI job can gate on it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pysev import benchmarking
from pysev.cli import child_command, main

ROOT = Path(__file__).resolve().parents[1]
FAST = 10.0  # seconds: the interpreter and the parser start, nothing else


def pysev_command() -> list[str]:
    """The console script of this interpreter's environment, else this installation run by path."""
    script = Path(sys.executable).with_name("pysev")
    return [str(script)] if script.is_file() else child_command()


def run_pysev(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = subprocess.run(
        [*pysev_command(), *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    return res, time.monotonic() - t0


@pytest.mark.parametrize(
    "argv, option, problem",
    [
        (["--memory", "0"], "--memory", "needs some memory"),
        (["--memory", "12Q"], "--memory", "not a size"),
        (["--memory", "1000"], "--memory", "not a multiple of the 4096-byte page"),
        (["--memory", "1T"], "--memory", "this machine has"),
        (["--channels", "-1"], "--channels", "outside 0..64"),
        (["--channels", "100000"], "--channels", "MAX_CHANNELS"),
        (["--downtime-limit", "-5"], "--downtime-limit", "outside 0..2000000"),
        (["--max-bandwidth", "-1"], "--max-bandwidth", "must not be negative"),
        (["--policy", "0xZZ"], "--policy", "not a number"),
        (["--policy", "0xffffffffff"], "--policy", "32-bit"),
        (["--policy", "0x11000060"], "--policy", "reserved bits 0x40"),
        (["--dirty-rate", "fast"], "--dirty-rate", "not a size"),
        (["--vga-fps", "-1"], "--vga-fps", ">= 0"),
        (["--no-sev", "--convert-rate", "3"], "--convert-rate", "a guest without SEV has no private pages"),
        (["--transport", "udp"], "--transport", "not inproc, tcp or file:PATH"),
        (["--transport", "file:/nonexistent/dir/x"], "--transport", "/nonexistent/dir does not exist"),
        (["--transport", "file:/tmp", "--channels", "1"], "--transport", "is a directory"),
        (["--transport", "file:/tmp/pysev-x.mig", "--channels", "2"], "--channels", "one stream"),
        (["--save-stream", "/nonexistent/x"], "--save-stream", "/nonexistent does not exist"),
        (["--plot", "/nonexistent/x.png"], "--plot", "/nonexistent does not exist"),
    ],
)
def test_migrate_bad_input(argv, option, problem):
    res, seconds = run_pysev("migrate", *argv)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"pysev migrate: error: argument {option}: "), lines[0]
    assert problem in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert seconds < FAST, f"took {seconds:.1f} s: the work started before the input was checked"


def test_stream_dump_bad_input(tmp_path):
    not_a_stream = tmp_path / "notes.txt"
    not_a_stream.write_text("hello\n")
    for argv, expect in (
        (["stream", "dump", str(tmp_path / "missing.mig")], "No such file"),
        (["stream", "dump", str(not_a_stream)], "bad magic"),
        (["stream", "dump"], "required: FILE"),
    ):
        res, seconds = run_pysev(*argv)
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.splitlines()) == 1 and expect in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and seconds < FAST


def test_main_returns_the_status_of_a_parse_error(capsys):
    """``main()`` called from Python returns 2 for input argparse refuses, as for the checks after it."""
    assert main(["migrate", "--channels", "x"]) == 2
    assert capsys.readouterr().err == "pysev migrate: error: argument --channels: not an integer: 'x'\n"
    assert main(["migrate", "--no-sev", "--convert-rate", "3"]) == 2
    assert capsys.readouterr().err.startswith("pysev migrate: error: argument --convert-rate: ")


# -------------------------------------------------------------------------------- pysev bench kernels
FIGURES = {
    "backend": "libcrypto:/test",
    "threads": 2,
    "mib": 1,
    "openssl_version": "OpenSSL test",
    "limit_source": "openssl speed",
    "limit_mbps": 1000.0,
    "send_mbps_1t": 950.0,
    "recv_mbps_1t": 940.0,
    "send_mbps_nt": 1900.0,
    "recv_mbps_nt": 1880.0,
    "ratio_send_1t": 0.95,
    "ratio_recv_1t": 0.94,
    "scaling_send": 2.0,
    "scaling_recv": 2.0,
    "python_baseline_mbps": 100.0,
    "speedup_vs_python": 9.5,
    "extract_ms": 0.5,
    "numpy_extract_ms": 25.0,
    "extract_speedup": 50.0,
}


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("ratio, status", [(0.95, 0), (0.5, 1)], ids=["met", "missed"])
def test_bench_kernels_exit_status_gates_on_the_targets(monkeypatch, capsys, as_json, ratio, status):
    monkeypatch.setattr(benchmarking, "measure_kernels", lambda **_: {**FIGURES, "ratio_send_1t": ratio})
    assert main(["bench", "kernels", *(["--json"] if as_json else [])]) == status
    err = capsys.readouterr().err
    assert ("ratio_send_1t 0.5 (target >= 0.9)" in err) == bool(status), err


def test_bench_kernels_json_has_the_documented_keys(monkeypatch):
    """Every key of ``pysev bench kernels --json`` is in ``benchmarking.RESULT_KEYS`` and the other way
    round (the slow parts shortened; the keys do not depend on them)."""
    monkeypatch.setattr(
        benchmarking,
        "pipeline_limit",
        lambda seconds: {"limit_mbps": 1e3, "limit_source": "test", "xts_mbps": 8e3, "ctr_mbps": 4e3, "hmac_mbps": 2e3},
    )
    monkeypatch.setattr(benchmarking, "python_baseline_mbps", lambda: 100.0)
    monkeypatch.setattr(benchmarking, "extraction_ms", functools.partial(benchmarking.extraction_ms, 1, 1 << 16))
    result = benchmarking.measure_kernels(mib=1, repeats=1)
    assert tuple(result) == benchmarking.RESULT_KEYS
    json.dumps(result)


# ---------------------------------------------------------------------- benchmarks/compare.py, the gate
def _saved_run(path: Path, ratio: float, noise_ns: float) -> Path:
    """A pytest-benchmark JSON file with one gated ratio and a raw timing that moves with noise."""
    bench = {
        "fullname": "benchmarks/test_kernels.py::test_send[1t]",
        "stats": {"mean": 300e-9 + noise_ns * 1e-9},
        "extra_info": {"ratio_to_limit": ratio, "mbps": 900.0, "gate": {"ratio_to_limit": "higher"}},
    }
    path.write_text(json.dumps({"benchmarks": [bench]}))
    return path


@pytest.mark.parametrize(
    "ratio, status", [(0.95, 0), (0.90, 0), (0.80, 1)], ids=["same", "within-tolerance", "regressed"]
)
def test_regression_gate_compares_the_gated_ratios(tmp_path, ratio, status):
    """A timing 30 % slower under load with the same ratio passes; a ratio 16 % lower fails."""
    base = _saved_run(tmp_path / "base.json", 0.95, 0)
    new = _saved_run(tmp_path / "new.json", ratio, 90)
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(base), str(new)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == status, res.stdout + res.stderr
    assert ("REGRESSION" in res.stdout) == bool(status)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(base), str(bad)], capture_output=True, text=True
    )
    assert res.returncode == 2 and "no 'benchmarks' list" in res.stderr


def test_vm_bad_input(tmp_path):
    """pysev vm: a port in use, a QMP socket in a missing directory, a bad size: one line naming the
    option and the address or path, exit status 2, no traceback."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        cases = [
            (["--qmp", str(tmp_path / "a.qmp"), "--incoming", f"tcp:127.0.0.1:{port}"], "--incoming", str(port)),
            (["--qmp", f"tcp:127.0.0.1:{port}"], "--qmp", str(port)),
            (["--qmp", "/nonexistent/dir/x.qmp"], "--qmp", "/nonexistent/dir"),
            (["--qmp", str(tmp_path / "b.qmp"), "--memory", "0"], "--memory", "memory"),
        ]
        for extra, option, fragment in cases:
            argv = ["vm", "--memory", "64M", *extra]
            res, seconds = run_pysev(*argv)
            err = res.stderr.strip()
            assert res.returncode == 2, (argv, res.returncode, err)
            assert "Traceback" not in err and len(err.splitlines()) == 1, err
            assert option in err and fragment in err, err
            assert seconds < 30
