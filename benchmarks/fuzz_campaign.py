"""The long fuzz campaign over pysev's hostile-input surfaces: the targets of ``tests/fuzz/targets.py``
(stream reader, return-path messages, QMP framing and dispatch, SEV and AMD certificates and chains,
every firmware command buffer), whose bounded runs are part of the default test run (``tests/test_fuzz.py``).

    python benchmarks/fuzz_campaign.py [--seconds N] [--target NAME] [--seed S] [--crash-dir DIR]
    python benchmarks/fuzz_campaign.py --target NAME --reproduce FILE

``--seconds`` is the whole campaign's budget (default 60), split evenly among the targets (``--target``,
repeatable, selects some). With atheris installed (``pip install atheris``; not a dependency of pysev)
each target runs in a child process under libFuzzer's coverage guidance (``--engine atheris``), its corpus
kept in ``DIR/corpus/NAME`` so a later campaign continues from it; otherwise (``--engine mutate``) a
mutation loop runs in this process: bit flips, byte sets, truncations, insertions, deletions, splices and
length-field edits of the seed corpus, keeping every input that produced a new outcome class as a seed.

Per target it prints executions, executions per second, the outcomes by class with their counts, and
anything new: an exception outside the target's documented outcomes, a broken invariant (time, memory,
a secret or traceback in error text, state changed by a refused firmware command, results that depend
on how the input was split) or a timeout, each with its input saved under ``DIR/NAME/`` (default
``DIR`` = ``$TMPDIR/pysev-fuzz``) and the command that replays it. Exit status 1 if anything new was
found. ``known:…`` outcomes are findings already pinned by strict-xfail tests; they are counted, not new.
The simulated AMD root lives under ``$PYSEV_HOME`` (created on first use, a few seconds).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

TARGETS_FILE = Path(__file__).resolve().parent.parent / "tests" / "fuzz" / "targets.py"
MAX_CORPUS = 512
MAX_INPUT = 1 << 20


def load_targets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_fuzz_targets", TARGETS_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_fuzz_targets"] = module
    spec.loader.exec_module(module)
    return module


class ExecutionTimeout(BaseException):
    """One execution ran past ``--timeout`` (raised by SIGALRM; a BaseException, so no target swallows it)."""


@contextlib.contextmanager
def watchdog(seconds: float):
    def expired(signum, frame):
        raise ExecutionTimeout(f"execution exceeded {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclasses.dataclass
class Finding:
    signature: str
    kind: str
    message: str
    path: str
    count: int = 1


@dataclasses.dataclass
class Report:
    target: str
    engine: str
    seconds: float = 0.0
    execs: int = 0
    corpus: int = 0
    seeds: int = 0
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    findings: dict[str, Finding] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["outcomes"] = dict(self.outcomes)
        out["findings"] = {k: dataclasses.asdict(v) for k, v in self.findings.items()}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Report:
        r = cls(**{k: v for k, v in d.items() if k not in ("outcomes", "findings")})
        r.outcomes = collections.Counter(d["outcomes"])
        r.findings = {k: Finding(**v) for k, v in d["findings"].items()}
        return r


def classify(targets: ModuleType, err: BaseException) -> tuple[str, str]:
    """(kind, signature) of a finding: its class and where it was raised (the innermost pysev frame)."""
    if isinstance(err, ExecutionTimeout):
        kind = "timeout"
    elif isinstance(err, targets.InvariantError):
        kind = f"invariant:{err.kind}"
    else:
        kind = f"exception:{type(err).__name__}"
    frames = traceback.extract_tb(err.__traceback__)
    inner = [f for f in frames if "/pysev/" in f.filename] or frames[-1:]
    where = f"{Path(inner[-1].filename).name}:{inner[-1].lineno}" if inner else "?"
    return kind, f"{kind}@{where}"


def record(targets: ModuleType, report: Report, err: BaseException, data: bytes, crash_dir: Path) -> None:
    kind, signature = classify(targets, err)
    if signature in report.findings:
        report.findings[signature].count += 1
        return
    where = crash_dir / report.target
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{kind.replace(':', '-')}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    text = "".join(traceback.format_exception(err))
    path.with_suffix(".txt").write_text(f"{signature}\n\n{text}")
    report.findings[signature] = Finding(signature, kind, str(err)[:300], str(path))


def run_mutation(targets: ModuleType, name: str, seconds: float, seed: int, crash_dir: Path, timeout: float) -> Report:
    target = targets.TARGETS[name]
    rng = random.Random(f"{seed}/{name}")
    report = Report(name, "mutate")
    t0 = time.perf_counter()
    corpus = list(target.seeds())
    hints = tuple(target.hints())
    report.seeds = len(corpus)
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        r = rng.random()
        if r < 0.05:
            data = rng.randbytes(rng.randrange(300))
        else:
            data = targets.mutate(rng.choice(corpus), rng, corpus, hints)
        report.execs += 1
        try:
            with watchdog(timeout):
                outcome = target.run(data)
        except (Exception, ExecutionTimeout) as err:  # noqa: BLE001 — every escape is a finding
            record(targets, report, err, data, crash_dir)
            targets.close_worlds()
            continue
        if outcome not in report.outcomes and len(corpus) < MAX_CORPUS and len(data) <= MAX_INPUT:
            corpus.append(data)
        report.outcomes[outcome] += 1
    report.seconds = time.perf_counter() - t0
    report.corpus = len(corpus)
    return report


# -- atheris: one child process per target ------------------------------------------------------------------
def run_atheris_parent(name: str, seconds: float, seed: int, crash_dir: Path, timeout: float) -> Report:
    stats = crash_dir / f".{name}.stats.json"
    log = crash_dir / f"{name}.libfuzzer.log"
    stats.unlink(missing_ok=True)
    before = set((crash_dir / name).glob("*")) if (crash_dir / name).exists() else set()
    cmd = [sys.executable, __file__, "--worker", "--target", name, "--seconds", str(seconds), "--seed", str(seed)]
    cmd += ["--crash-dir", str(crash_dir), "--timeout", str(timeout)]
    with open(log, "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + timeout + 120, check=False)
    report = Report.from_json(json.loads(stats.read_text())) if stats.exists() else Report(name, "atheris")
    if proc.returncode != 0:
        artifacts = sorted(set((crash_dir / name).glob("*")) - before)
        libfuzzer = [str(p) for p in artifacts if p.name.startswith(("crash-", "timeout-", "oom-", "leak-", "slow-"))]
        report.problems.append(
            f"libFuzzer child exited {proc.returncode} (log {log}); artifacts: {libfuzzer or 'none'}"
        )
    return report


def run_atheris_worker(name: str, seconds: float, seed: int, crash_dir: Path, timeout: float) -> None:
    import atheris  # only where installed: not a dependency of pysev

    with atheris.instrument_imports(include=["pysev", "csev"]):
        targets = load_targets()
    target = targets.TARGETS[name]
    corpus_dir = crash_dir / "corpus" / name
    corpus_dir.mkdir(parents=True, exist_ok=True)
    seeds = target.seeds()
    for s in seeds:
        (corpus_dir / f"seed-{hashlib.sha1(s).hexdigest()[:16]}").write_bytes(s)
    stats = crash_dir / f".{name}.stats.json"
    report = Report(name, "atheris", seeds=len(seeds))
    t0 = time.perf_counter()
    last = [t0]

    def flush() -> None:
        report.seconds = time.perf_counter() - t0
        report.corpus = len(list(corpus_dir.iterdir()))
        stats.write_text(json.dumps(report.to_json()))

    def one_input(data: bytes) -> None:
        now = time.perf_counter()
        if now - t0 >= seconds:
            flush()
            os._exit(0)
        report.execs += 1
        try:
            report.outcomes[target.run(data)] += 1
        except Exception as err:  # noqa: BLE001 — recorded, and the campaign goes on
            record(targets, report, err, data, crash_dir)
            targets.close_worlds()
            flush()
        if now - last[0] > 1.0:
            last[0] = now
            flush()

    max_len = max(4096, 2 * max(len(s) for s in seeds))
    argv = [sys.argv[0], str(corpus_dir), f"-seed={seed or 1}", f"-timeout={int(timeout)}", f"-max_len={max_len}"]
    argv += [f"-max_total_time={int(seconds) + 30}", "-rss_limit_mb=4096", f"-artifact_prefix={crash_dir / name}/"]
    (crash_dir / name).mkdir(parents=True, exist_ok=True)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


# -- reporting ----------------------------------------------------------------------------------------------
def print_report(targets: ModuleType, report: Report) -> bool:
    rate = report.execs / report.seconds if report.seconds else 0.0
    print(f"== {report.target} ({report.engine}, {report.seconds:.1f} s)")
    print(f"   executions {report.execs:,} ({rate:,.0f}/s); corpus {report.seeds} seeds -> {report.corpus}")
    print("   outcomes by class:")
    for outcome, n in sorted(report.outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        note = f"   (known: {targets.KNOWN_ISSUES[outcome]})" if outcome in targets.KNOWN_ISSUES else ""
        print(f"     {n:>10,}  {outcome}{note}")
    new = bool(report.findings or report.problems)
    if not new:
        print("   new: nothing")
    for f in report.findings.values():
        print(f"   NEW {f.signature} x{f.count}: {f.message}")
        print(f"       input {f.path} (replay: python {sys.argv[0]} --target {report.target} --reproduce {f.path})")
    for p in report.problems:
        print(f"   NEW {p}")
    return new


def reproduce(targets: ModuleType, name: str, path: str) -> int:
    data = Path(path).read_bytes()
    try:
        outcome = targets.TARGETS[name].run(data)
    except BaseException:
        traceback.print_exc()
        return 1
    print(f"{name}: {outcome}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget of the whole campaign (default 60)")
    ap.add_argument("--target", action="append", help="a target to run (repeatable; default: all)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--crash-dir", default=str(Path(tempfile.gettempdir()) / "pysev-fuzz"), help="where inputs go")
    ap.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds one execution may take (default 30)")
    ap.add_argument("--reproduce", metavar="FILE", help="run --target on one saved input and show the result")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    crash_dir = Path(args.crash_dir)
    crash_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_atheris_worker(args.target[0], args.seconds, args.seed, crash_dir, args.timeout)
        return 0
    targets = load_targets()
    names = args.target or list(targets.TARGETS)
    unknown = [n for n in names if n not in targets.TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; known: {', '.join(targets.TARGETS)}")
    if args.reproduce:
        if len(names) != 1:
            ap.error("--reproduce needs exactly one --target")
        return reproduce(targets, names[0], args.reproduce)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "mutate"
    share = args.seconds / len(names)
    print(
        f"pysev fuzz campaign: {len(names)} targets x {share:.1f} s, engine {engine}, seed {args.seed}, "
        f"inputs under {crash_dir}"
    )
    new = False
    for name in names:
        if engine == "atheris":
            report = run_atheris_parent(name, share, args.seed, crash_dir, args.timeout)
        else:
            report = run_mutation(targets, name, share, args.seed, crash_dir, args.timeout)
        new |= print_report(targets, report)
        sys.stdout.flush()
    print("anything new: " + ("YES (see NEW above)" if new else "no"))
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
