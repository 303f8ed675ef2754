"""What the CLI shows: progress bars per migration pass, the summary table, the per-pass plot."""

from __future__ import annotations

import contextlib
import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class MigrationView:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def status(self, message: str):
        if self.quiet or not self.console.is_terminal:
            yield
            return
        with self.console.status(message):
            yield

    @contextlib.contextmanager
    def progress(self):
        """A callback ``(pass_no, pages_sent, pages_in_pass)`` drawing one bar per pass."""
        if self.quiet:
            yield lambda *_: None
            return
        bars = Progress(
            TextColumn("pass {task.fields[pass_no]:>3}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("pages"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        tasks: dict[int, int] = {}

        def update(pass_no: int, sent: int, total: int) -> None:
            if pass_no not in tasks:
                tasks[pass_no] = bars.add_task("", total=max(total, 1), pass_no=pass_no)
            bars.update(tasks[pass_no], completed=sent if total else 1)

        with bars:
            yield update

    def summary(self, s: dict, *, as_json: bool) -> None:
        if as_json:
            json.dump(s, sys.stdout, indent=None)
            sys.stdout.write("\n")
            return
        ram = s.get("ram", {})
        sev = s.get("sev", {})
        table = Table(title="SEV live migration", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        verified = s.get("verified")
        rows = [
            ("status", s.get("status", "?")),
            ("passes (dirty syncs)", str(ram.get("dirty-sync-count", 0))),
            ("pages private (SEND_UPDATE_DATA)", f"{sev.get('pages-encrypted', 0):,}"),
            ("pages shared (in the clear)", f"{sev.get('pages-shared', 0):,}"),
            ("  of which zero pages", f"{ram.get('duplicate', 0):,}"),
            ("bytes transferred", f"{ram.get('transferred', 0):,}"),
            (
                "throughput, last pre-copy pass",
                f"{ram.get('mbps', 0) / 8:,.1f} MB/s ({ram.get('pages-per-second', 0):,} pages/s)",
            ),
            ("downtime", f"{s.get('downtime', '-')} ms"),
            ("setup time", f"{s.get('setup-time', 0)} ms"),
            ("total time", f"{s.get('total-time', 0)} ms"),
            (
                "verified",
                {
                    True: "yes: destination plaintext == source at switchover",
                    False: "NO: plaintext differs",
                    None: "not checked" if s.get("status") == "completed" else "no: the migration did not complete",
                }[verified],
            ),
        ]
        if "error-desc" in s:
            rows.insert(1, ("error", s["error-desc"]))
        dest = s.get("destination", {})
        if dest.get("error-desc"):
            rows.insert(2, ("destination", dest["error-desc"]))
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
        if s.get("passes"):
            per_pass = Table(
                "pass",
                "pages",
                "MB",
                "seconds",
                "MB/s",
                "dirtied after",
                "throttle %",
                title="passes",
                title_justify="left",
            )
            for p in s["passes"]:
                stop = p.get("stop_and_copy")
                per_pass.add_row(
                    f"{p['pass']}{' stop' if stop else ''}",
                    f"{p['pages']:,}",
                    f"{p['bytes'] / 1e6:,.1f}",
                    f"{p['seconds']:.3f}",
                    "-" if stop and p["pages"] < 256 else f"{p['bytes'] / 1e6 / p['seconds']:,.0f}",
                    "-" if stop else f"{p['dirty_pages']:,}",
                    str(p["throttle"]),
                )
            Console().print(per_pass)


def plot_passes(passes: list[dict], path: str) -> None:
    """PNG: pages dirtied and throughput per pass."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("pysev migrate --plot needs matplotlib: pip install 'pysev[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["pass"] for p in passes]
    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    ax1.bar(xs, [p["dirty_pages"] for p in passes], color="tab:orange", alpha=0.7, label="pages dirtied during pass")
    ax1.set_xlabel("pass")
    ax1.set_ylabel("pages dirtied")
    ax2 = ax1.twinx()
    ax2.plot(xs, [p["bytes"] / 1e6 / p["seconds"] for p in passes], "o-", color="tab:blue", label="throughput")
    ax2.set_ylabel("MB/s")
    fig.legend(loc="upper right")
    ax1.set_title("SEV live migration: dirty pages and throughput per pass")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
