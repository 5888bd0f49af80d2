"""The ``tidings`` command line."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import tempfile
from collections.abc import Callable, Coroutine
from importlib.metadata import version
from typing import Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tidings._loading import load_bus
from tidings.bus import Bus
from tidings.demo import DemoResult, run_demo
from tidings.errors import TidingsError
from tidings.worker import run_worker

T = TypeVar("T")

__all__ = ["app", "main"]

app = typer.Typer(
    name="tidings",
    help="Events for async Python: emit from anywhere, listen with plain functions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


dead_app = typer.Typer(help="List, show, replay and purge dead letters.", no_args_is_help=True)
app.add_typer(dead_app, name="dead")
db_app = typer.Typer(help="The store's tables (PostgreSQL).", no_args_is_help=True)
app.add_typer(db_app, name="db")

_APP_HELP = "The bus, as 'package.module:bus' or 'package.module:make_bus()'."
_DEBUG_HELP = "Show tracebacks."


@app.callback()
def _root() -> None:
    """Events for async Python: emit from anywhere, listen with plain functions."""


def _fail(message: str) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(1)


def _guarded(debug: bool, fn: Callable[[], T]) -> T:
    """Run a command's body: a known failure is one line and exit code 1."""
    try:
        return fn()
    except (TidingsError, OSError, ImportError) as exc:
        if debug:
            raise
        raise _fail(str(exc)) from None


def _with_bus(target: str, debug: bool, body: Callable[[Bus], Coroutine[Any, Any, T]]) -> T:
    """Load the bus, start it without consuming, run ``body``, close it."""

    async def run() -> T:
        bus = load_bus(target)
        backend: Any = bus.backend
        if hasattr(backend, "consume"):
            backend.consume = False
        async with bus:
            return await body(bus)

    _configure_logging(debug)
    return _guarded(debug, lambda: asyncio.run(run()))


@app.command()
def worker(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    concurrency: int = typer.Option(100, min=1, help="Deliveries per listener at once."),
    listeners: list[str] = typer.Option(  # noqa: B008
        [], "--listeners", "-l", help="Run only listeners whose qualified name matches."
    ),
    shutdown_timeout: float = typer.Option(
        30.0, help="Seconds running deliveries get to finish on SIGTERM/SIGINT."
    ),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Run the listeners of a durable bus until SIGTERM or SIGINT."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tidings").setLevel(logging.DEBUG if debug else logging.INFO)
    console = Console(stderr=True)

    def ready(count: int) -> None:
        console.print(f"tidings worker: {count} listener(s) on {bus.url}", highlight=False)

    bus = _guarded(debug, lambda: load_bus(target))
    _guarded(
        debug,
        lambda: asyncio.run(
            run_worker(
                bus,
                concurrency=concurrency,
                listeners=listeners or None,
                shutdown_timeout_s=shutdown_timeout,
                on_ready=ready,
            )
        ),
    )


@app.command("listeners")
def listeners_(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """List a bus's listeners and their options."""
    bus = _guarded(debug, lambda: load_bus(target))
    table = Table(title=f"listeners on {bus.url}")
    for column in ("listener", "events", "kind", "retry", "timeout", "concurrency"):
        table.add_column(column)
    for lst in bus.listeners():
        retry = lst.retry or bus.retry
        timeout = lst.timeout or bus.timeout
        table.add_row(
            lst.qualname,
            ", ".join(lst.names),
            ("async" if lst.is_async else "sync") + (", once" if lst.once else ""),
            f"{retry.attempts} attempts" if retry else "-",
            f"{timeout:g}s" if timeout else "-",
            str(lst.concurrency or "-"),
        )
    Console().print(table)


@app.command()
def emit(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    name: str = typer.Argument(..., help="The event name."),
    json_payload: str = typer.Option(
        "{}", "--json", help="The payload: keyword arguments, as a JSON object (payload only)."
    ),
    delay: float | None = typer.Option(None, help="Deliver after this many seconds."),
    at: str | None = typer.Option(
        None, help="Deliver at this time: ISO 8601 with a UTC offset (2030-01-01T09:00+00:00)."
    ),
    key: str | None = typer.Option(None, help="The event's ordering key."),
    headers: list[str] = typer.Option(  # noqa: B008
        [], "--header", "-H", help="A header, as NAME=VALUE (repeat for more)."
    ),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Publish one event (stored for the workers on a durable bus).

    --json is the payload only; options come from flags (--delay, --at, --key, --header).
    """
    try:
        kwargs = msgspec.json.decode(json_payload)
    except msgspec.DecodeError as exc:
        raise _fail(f"--json is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise _fail("--json must be a JSON object of keyword arguments")
    header_map: dict[str, str] = {}
    for item in headers:
        header, sep, value = item.partition("=")
        if not sep or not header:
            raise _fail(f"--header takes NAME=VALUE, not {item!r}")
        header_map[header] = value
    when: dt.datetime | None = None
    if at is not None:
        try:
            when = dt.datetime.fromisoformat(at)
        except ValueError:
            raise _fail(f"--at is not an ISO 8601 time: {at!r}") from None

    async def body(bus: Bus) -> None:
        options = bus.options(delay=delay, at=when, key=key, headers=header_map or None)
        await options.publish(name, **kwargs)

    _with_bus(target, debug, body)
    Console().print(f"emitted {name!r}", highlight=False)


@app.command()
def stats(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """What waits per listener: pending, in flight, retrying, delayed, dead."""

    async def body(bus: Bus) -> Table:
        figures = await bus.listener_stats()
        table = Table(title=f"deliveries on {bus.url}")
        table.add_column("listener", overflow="fold")
        for column in ("pending", "in flight", "retrying", "delayed", "dead", "oldest"):
            table.add_column(column, justify="right")
        for listener, s in sorted(figures.items()):
            oldest = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:.1f}s"
            table.add_row(
                listener,
                str(s.pending),
                str(s.in_flight),
                str(s.retrying),
                str(s.delayed),
                str(s.dead),
                oldest,
            )
        return table

    Console().print(_with_bus(target, debug, body))


@db_app.command("migrate")
def db_migrate(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Create the store's tables, or bring them up to date."""

    async def run() -> str:
        bus = load_bus(target)
        backend: Any = bus.backend
        if not hasattr(backend, "run_migrations"):
            raise _fail(f"{bus.url} has no migrations: only a PostgreSQL store has tables to make")
        backend.migrate = False
        backend.consume = False
        await backend.connect()
        try:
            ran = await backend.run_migrations()
        finally:
            await backend.disconnect()
        if not ran:
            return f"schema {backend.schema} is up to date"
        return f"schema {backend.schema}: ran migration(s) {', '.join(map(str, ran))}"

    _configure_logging(debug)
    Console().print(_guarded(debug, lambda: asyncio.run(run())))


@dead_app.command("list")
def dead_list(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    listener: str | None = typer.Option(None, help="Only this listener (qualified name)."),
    limit: int = typer.Option(100, min=1, help="At most this many."),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """List dead letters, oldest first."""

    async def body(bus: Bus) -> Table:
        letters = await bus.list_dead_letters(listener=listener, limit=limit)
        table = Table(title=f"{len(letters)} dead letter(s) on {bus.url}")
        for column in ("event id", "event", "listener", "attempts", "failed at", "error"):
            table.add_column(column)
        for d in letters:
            table.add_row(
                d.event.id,
                d.event.name,
                d.listener,
                str(d.attempts),
                _when(d.failed_at),
                d.error,
            )
        return table

    Console().print(_with_bus(target, debug, body))


@dead_app.command("show")
def dead_show(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    event_id: str = typer.Argument(..., help="The event id."),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Show one event's dead letters: payload, error and traceback."""

    async def body(bus: Bus) -> list[Any]:
        return [d for d in await bus.list_dead_letters(limit=1_000_000) if d.event.id == event_id]

    letters = _with_bus(target, debug, body)
    if not letters:
        raise _fail(f"no dead letter of event {event_id!r}")
    console = Console()
    for d in letters:
        console.print(f"[bold]{d.event.name}[/] {d.event.id} -> {d.listener}", highlight=False)
        console.print(f"attempts: {d.attempts}, failed at {_when(d.failed_at)}")
        payload = {"args": list(d.event.args), "kwargs": d.event.kwargs, "obj": d.event.obj}
        console.print(f"payload: {msgspec.json.encode(payload).decode()}", highlight=False)
        console.print(f"headers: {dict(d.event.headers)}", highlight=False)
        console.print(d.traceback or d.error, highlight=False, markup=False)


@dead_app.command("replay")
def dead_replay(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    event_ids: list[str] = typer.Option([], "--id", help="Only these event ids."),  # noqa: B008
    listener: str | None = typer.Option(None, help="Only this listener (qualified name)."),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Deliver dead letters again, with fresh attempts."""

    async def body(bus: Bus) -> int:
        letters = await bus.list_dead_letters(listener=listener, limit=1_000_000)
        ids = [d.event.id for d in letters if not event_ids or d.event.id in event_ids]
        ids = list(dict.fromkeys(ids))
        replayed = 0
        with Progress(
            TextColumn("[bold]replaying"), BarColumn(), MofNCompleteColumn(), transient=True
        ) as progress:
            task = progress.add_task("replay", total=len(ids))
            for start in range(0, len(ids), 100):
                chunk = ids[start : start + 100]
                replayed += await bus.replay_dead_letters(ids=chunk, listener=listener)
                progress.advance(task, len(chunk))
        return replayed

    count = _with_bus(target, debug, body)
    Console().print(f"replayed {count} dead letter(s)")


@dead_app.command("purge")
def dead_purge(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    event_ids: list[str] = typer.Option([], "--id", help="Only these event ids."),  # noqa: B008
    listener: str | None = typer.Option(None, help="Only this listener (qualified name)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Delete dead letters for good."""
    if not yes and not event_ids and listener is None:
        typer.confirm("Delete every dead letter?", abort=True)

    async def body(bus: Bus) -> int:
        return await bus.purge_dead_letters(ids=event_ids or None, listener=listener)

    count = _with_bus(target, debug, body)
    Console().print(f"purged {count} dead letter(s)")


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


# One string without line breaks: the help shows a docstring's line breaks as they are.
_DEMO_HELP = (
    "Emit a burst of sign-ups to four listeners and show what each one did.\n\n"
    "A welcome mail (async), an audit log (sync, on 'user.*'), a CRM sync that fails on "
    "its first attempt for one user in five and succeeds on a retry, and a trial grant "
    "that fails for good for users of a retired plan (dead letters)."
)


@app.command(help=_DEMO_HELP)
def demo(
    users: int = typer.Option(5000, min=1, help="Sign-ups to emit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the library's logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress, only the table."),
    backend: str = typer.Option(
        "sqlite", help="'sqlite' (a database in a temporary directory), 'memory', or a URL."
    ),
) -> None:
    """Emit a burst of sign-ups to four listeners and show what each one did.

    A welcome mail (async), an audit log (sync, on ``user.*``), a CRM sync that fails on
    its first attempt for one user in five and succeeds on a retry, and a trial grant
    that fails for good for users of a retired plan (dead letters).
    """
    console = Console()
    _configure_logging(verbose)
    with tempfile.TemporaryDirectory(prefix="tidings-demo-") as tmp:
        url = _demo_url(backend, tmp, console)
        result = _run_demo(console, users, url, quiet)
    console.print(_table(result))
    console.print(
        f"{result.deliveries} deliveries of {result.users} events in "
        f"{result.elapsed_s:.2f}s on the {result.backend} backend; "
        "dead letters stay inspectable with 'await bus.list_dead_letters()'."
    )


def _demo_url(backend: str, tmp: str, console: Console) -> str:
    if "://" in backend:
        return backend
    if backend == "memory":
        return "memory://"
    if backend != "sqlite":
        raise _fail(f"unknown --backend {backend!r}: 'sqlite', 'memory' or a URL")
    try:
        import aiosqlite  # noqa: F401
    except ImportError:
        console.print("aiosqlite is missing (pip install 'tidings[sqlite]'): running in memory")
        return "memory://"
    return f"sqlite:///{tmp}/demo.db?poll_s=0.01"


def _run_demo(console: Console, users: int, url: str, quiet: bool) -> DemoResult:
    if quiet:
        return asyncio.run(run_demo(users=users, url=url))
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

            return asyncio.run(run_demo(users=users, url=url, on_progress=on_progress))


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


if __name__ == "__main__":
    main()
