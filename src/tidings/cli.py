"""The ``tidings`` command line."""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import version

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tidings.demo import DemoResult, run_demo

__all__ = ["app", "main"]

app = typer.Typer(
    name="tidings",
    help="Events for async Python: emit from anywhere, listen with plain functions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Events for async Python: emit from anywhere, listen with plain functions."""


@app.command()
def demo(
    users: int = typer.Option(5000, min=1, help="Sign-ups to emit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the library's logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress, only the table."),
) -> None:
    """Emit a burst of sign-ups to four listeners and show what each one did.

    A welcome mail (async), an audit log (sync, on ``user.*``), a CRM sync that fails on
    its first attempt for one user in five and succeeds on a retry, and a trial grant
    that fails for good for users of a retired plan (dead letters).
    """
    console = Console()
    _configure_logging(verbose)
    if quiet:
        result = asyncio.run(run_demo(users=users))
    else:
        with Progress(
            TextColumn("[bold]deliveries"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("deliveries", total=users * 4)

            def on_progress(done: int, expected: int) -> None:
                progress.update(task, completed=done, total=expected)

            result = asyncio.run(run_demo(users=users, on_progress=on_progress))
    console.print(_table(result))
    console.print(
        f"{result.deliveries} deliveries of {result.users} events in "
        f"{result.elapsed_s:.2f}s on the {result.backend} backend; "
        "dead letters stay inspectable with bus.dead_letters()."
    )


@app.command("version")
def version_() -> None:
    """Print the installed version."""
    typer.echo(version("tidings"))


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # The demo fails deliveries on purpose; their tracebacks are noise unless asked for.
    logging.getLogger("tidings").setLevel(logging.INFO if verbose else logging.CRITICAL)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _table(result: DemoResult) -> Table:
    table = Table(title=f"{result.users} sign-ups, one row per listener")
    table.add_column("listener")
    for column in ("delivered", "retried", "dead", "p50", "p99"):
        table.add_column(column, justify="right")
    for f in result.listeners.values():
        table.add_row(
            f.name,
            str(f.delivered),
            str(f.retried),
            str(f.dead),
            _ms(f.percentile(0.5)),
            _ms(f.percentile(0.99)),
        )
    return table


def main() -> None:
    """The console script's entry point."""
    app()
