"""The ``tidings`` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import tempfile
import time
from collections.abc import Callable, Coroutine
from importlib.metadata import version
from typing import Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand

from tidings._loading import load_bus
from tidings.backends.base import DeadLetter
from tidings.backends.durable import DurableBackend
from tidings.bus import Bus
from tidings.delivery import Retry
from tidings.demo import DemoResult, run_demo
from tidings.errors import ConfigurationError, TidingsError
from tidings.listeners import Listener
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
    # Never wrapped (a pipe's 80 columns would break it), and the message is shown as it
    # is, brackets included.
    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )
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
        bus.backend.consume = False
        async with bus:
            return await body(bus)

    _configure_logging(debug)
    return _guarded(debug, lambda: asyncio.run(run()))


def _print_table(table: Table) -> None:
    """Print ``table`` without ever cutting a cell of a column that does not wrap (ids,
    names): as wide as it needs in a pipe or a CI log, at least that wide in a terminal."""
    _console_for(table).print(table)


def _console_for(table: Table, *, whole_rows: bool = False) -> Console:
    """A console wide enough for ``table``: as wide as its rows in a pipe or a CI log (or
    with ``whole_rows``), at least as wide as its columns that do not wrap in a terminal."""
    console = Console()
    needed = console.measure(table, options=console.options.update_width(1_000_000))
    width = needed.minimum if console.is_terminal and not whole_rows else needed.maximum
    if width > console.width or not console.is_terminal:
        console = Console(width=max(width, 1))
    return console


def _print_json(value: Any) -> None:
    typer.echo(msgspec.json.format(msgspec.json.encode(value, enc_hook=_json_default), indent=2))


def _json_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # a pydantic model in a typed event
    if callable(dump):
        return dump(mode="json")
    return repr(value)


_NONE_TO_SHOW = (
    "where there are none to show: read bus.stats() or await bus.list_dead_letters() in the app"
)


def _require_store(bus: Bus, why: str = _NONE_TO_SHOW) -> None:
    """Refuse a bus whose deliveries live only in the memory of the process running it;
    ``why`` ends the sentence that says so: what it means for this command."""
    if not bus.backend.durable:
        raise ConfigurationError(
            f"{bus.url} keeps its deliveries and dead letters in the memory of the process "
            f"that runs the bus, and this command runs in a process of its own, {why}, "
            "or give the bus a durable URL (sqlite:///events.db, redis://..., postgresql://...)"
        )


_JSON_HELP = "Print JSON instead of a table."


@app.command()
def worker(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    concurrency: int = typer.Option(100, min=1, help="Deliveries per listener at once."),
    listeners: list[str] = typer.Option(  # noqa: B008
        [],
        "--listeners",
        "-l",
        help="Run only the listeners whose qualified name matches this pattern, written as "
        "event-name patterns are: '*' within one dotted part, '**' for any number of parts "
        "(-l 'myapp.events.*', -l 'myapp.**'); repeat for more.",
    ),
    shutdown_timeout: float = typer.Option(
        30.0, help="Seconds running deliveries get to finish on SIGTERM/SIGINT."
    ),
    log_level: str = typer.Option(
        "INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR: the least a log line shows."
    ),
    log_deliveries: bool = typer.Option(
        False, "--log-deliveries", help="Log one line per successful delivery (at INFO)."
    ),
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        help="Serve Prometheus metrics on this port (GET /metrics; 0 picks a free one).",
    ),
    metrics_host: str = typer.Option(
        "0.0.0.0",
        "--metrics-host",
        help="The address the metrics listen on: every interface by default, for a "
        "Prometheus on another host; 127.0.0.1 for this host only.",
    ),
    debug: bool = typer.Option(False, "--debug", help=f"{_DEBUG_HELP} Implies DEBUG logs."),
) -> None:
    """Run the listeners of a durable bus until SIGTERM or SIGINT."""
    if log_level.upper() not in _LOG_LEVELS:
        raise _fail(f"--log-level must be one of {', '.join(_LOG_LEVELS)}, not {log_level!r}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tidings").setLevel("DEBUG" if debug else log_level.upper())
    bus = _guarded(debug, lambda: load_bus(target))
    work = run_worker(
        bus,
        concurrency=concurrency,
        listeners=listeners or None,
        shutdown_timeout=shutdown_timeout,
        log_deliveries=log_deliveries,
    )
    if metrics_port is not None:
        work = _with_metrics(bus, metrics_host, metrics_port, work, Console(stderr=True))
    _guarded(debug, lambda: asyncio.run(work))


async def _with_metrics(
    bus: Bus, host: str, port: int, work: Coroutine[Any, Any, None], console: Console
) -> None:
    """Run ``work`` while serving ``bus``'s Prometheus metrics on ``host``:``port``."""
    from tidings.metrics import instrument, serve

    try:
        server = await serve(instrument(bus), host=host, port=port)
    except BaseException:
        work.close()
        raise
    port = server.sockets[0].getsockname()[1]  # the one picked, for port 0
    shown = f"[{host}]" if ":" in host else host
    console.print(f"tidings worker: metrics on http://{shown}:{port}/metrics", highlight=False)
    try:
        await work
    finally:
        server.close()
        await server.wait_closed()


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _ListenersCommand(TyperCommand):
    """``tidings listeners``, whose usage shows its two forms, listing and forgetting."""

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        formatter.write_usage(ctx.command_path, "[OPTIONS] APP")
        formatter.write_usage(ctx.command_path, "forget [OPTIONS] APP NAME", prefix="   or: ")


_LISTENERS_HELP = (
    "List a bus's listeners and their options.\n\n"
    "'tidings listeners forget APP NAME' removes the listener NAME (its qualified name) from "
    "the app's durable store: its deliveries are deleted and no event is stored for it any more."
)


class _UsageError(typer.BadParameter):
    """A usage error (exit code 2, shown under the usage) told in its own words."""

    def format_message(self) -> str:
        return self.message


def _listeners_rest(ctx: typer.Context, value: list[str] | None) -> list[str]:
    """The arguments after APP: NAME after ``forget APP``, none after a plain APP.

    Raises:
        typer.BadParameter: any other, with the form that was likely meant.
    """
    rest, target = value or [], ctx.params.get("target")
    if target == "forget":
        if len(rest) != 2:
            raise _UsageError("forget takes APP NAME: tidings listeners forget APP NAME")
    elif rest:
        name = rest[1] if len(rest) == 2 else "NAME"
        meant = f"forget {target} {name}" if rest[0] == "forget" else f"{target}"
        raise _UsageError(f"unexpected {' '.join(rest)!r}; did you mean: tidings listeners {meant}")
    return rest


@app.command("listeners", cls=_ListenersCommand, help=_LISTENERS_HELP)
def listeners_(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    rest: list[str] | None = typer.Argument(None, hidden=True, callback=_listeners_rest),  # noqa: B008
    json_out: bool = typer.Option(False, "--json", help=_JSON_HELP),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """List a bus's listeners, or forget one that is gone from the code."""
    if target == "forget":
        _forget_listener(rest or [], debug)
        return
    bus = _guarded(debug, lambda: load_bus(target))
    seen = _last_seen(bus, debug) if bus.backend.durable else None
    if json_out:
        rows = [_listener_json(bus, lst) for lst in bus.listeners()]
        if seen is not None:
            for row in rows:
                row["last_seen"] = _iso(seen.get(row["listener"]))
        _print_json(rows)
        return
    table = Table(title=f"listeners on {bus.url}")
    for column in ("listener", "events", "kind", "retry", "timeout", "concurrency"):
        table.add_column(column, no_wrap=column == "listener")
    if seen is not None:
        table.add_column("last seen", justify="right")
    now = time.time()
    for lst in bus.listeners():
        retry, timeout = _policy(bus, lst)
        cells = [
            lst.qualname,
            ", ".join(lst.names),
            _kind(lst),
            f"{retry.attempts} attempts" if retry else "-",
            f"{timeout:g}s" if timeout else "-",
            str(lst.concurrency or "-"),
        ]
        if seen is not None:
            last = seen.get(lst.qualname)
            cells.append("never" if last is None else f"{max(0.0, now - last):.0f}s ago")
        table.add_row(*cells)
    _print_table(table)


def _last_seen(bus: Bus, debug: bool) -> dict[str, float | None]:
    """When a process last claimed deliveries of each listener of ``bus`` (a durable
    bus, started without consuming to ask its store)."""

    async def run() -> dict[str, float | None]:
        bus.backend.consume = False
        async with bus:
            stats = await bus.listener_stats()
        return {name: s.last_seen for name, s in stats.items()}

    _configure_logging(debug)
    return _guarded(debug, lambda: asyncio.run(run()))


def _listener_json(bus: Bus, lst: Listener[..., Any]) -> dict[str, Any]:
    retry, timeout = _policy(bus, lst)
    return {
        "listener": lst.qualname,
        "events": list(lst.names),
        "async": lst.is_async if lst.batching is None else lst.batching.is_async,
        "once": lst.once,
        "attempts": retry.attempts if retry else None,
        "timeout_s": timeout,
        "concurrency": lst.concurrency,
        "batch": lst.batching.size if lst.batching is not None else None,
    }


def _policy(bus: Bus, lst: Listener[..., Any]) -> tuple[Retry | None, float | None]:
    """A listener's retry policy and timeout: a batch listener's apply to its batches."""
    if lst.batching is not None:
        return lst.batching.retry, lst.batching.timeout
    return lst.retry or bus.retry, lst.timeout or bus.timeout


def _kind(lst: Listener[..., Any]) -> str:
    batching = lst.batching
    is_async = lst.is_async if batching is None else batching.is_async
    kind = "async" if is_async else "sync"
    if batching is not None:
        kind += f", batches of {batching.size} within {batching.wait_s:g}s"
    return kind + (", once" if lst.once else "")


def _forget_listener(args: list[str], debug: bool) -> None:
    target, name = args

    async def body(bus: Bus) -> bool:
        if any(lst.qualname == name for lst in bus.listeners()):
            raise _fail(
                f"{name!r} is still a listener of {target}, and each start of the app joins "
                "it again: remove it from the code first"
            )
        return await bus.forget_listener(name)

    if not _with_bus(target, debug, body):
        raise _fail(f"no listener {name!r} is joined on the store")
    Console().print(
        f"forgot listener {name!r}: its deliveries are deleted",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


# Help texts are one string a paragraph: the help shows a docstring's line breaks.
_EMIT_HELP = (
    "Publish one event (stored for the workers on a durable bus).\n\n"
    "--json is the payload only; options come from flags (--delay, --at, --key, --header). "
    "Emits nothing, and fails, when the store knows no listener that takes it, unless "
    "--allow-none."
)


@app.command(help=_EMIT_HELP)
def emit(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    name: str = typer.Argument(..., metavar="NAME", help="The event name."),
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
    allow_none: bool = typer.Option(
        False,
        "--allow-none",
        help="Emit even when no listener joined on the store takes the event.",
    ),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Publish one event (stored for the workers on a durable bus)."""
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
        if when.tzinfo is None:
            raise _fail(f"--at needs a UTC offset, e.g. {at}+00:00")

    async def body(bus: Bus) -> list[str] | None:
        _require_store(
            bus,
            "whose listeners an event emitted here would reach, not the app's: call "
            "bus.emit(...) in the app",
        )
        backend = bus.backend
        takers = await backend.listeners_of(name) if isinstance(backend, DurableBackend) else None
        if takers == [] and not allow_none:
            raise _fail(
                f"{name!r} was not emitted: no listener joined on the store takes it (a "
                "listener receives the events stored after it joined); --allow-none emits it "
                "anyway"
            )
        options = bus.options(delay=delay, at=when, key=key, headers=header_map or None)
        await options.publish(name, **kwargs)
        return takers

    takers = _with_bus(target, debug, body)
    if takers is None:
        stored = ""
    elif not takers:
        stored = ": stored for no listener, as none joined on the store takes it"
    else:
        stored = f": stored for {len(takers)} listener{'s' if len(takers) > 1 else ''}"
    Console().print(f"emitted {name!r}{stored}", highlight=False, markup=False, soft_wrap=True)


_STATS_HELP = (
    "What waits per listener (pending, in flight, retrying, delayed, dead), and the "
    "attempts the store counted as delivered and failed."
)


@app.command(help=_STATS_HELP)
def stats(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    json_out: bool = typer.Option(False, "--json", help=_JSON_HELP),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh live, with rates."),
    interval: float = typer.Option(1.0, min=0.01, help="With --watch, seconds between refreshes."),
    refreshes: int | None = typer.Option(
        None, min=1, help="With --watch, stop after this many refreshes (default: Ctrl-C)."
    ),
) -> None:
    """What waits per listener, and the attempts the store counted."""
    if watch:
        _watch_stats(target, debug, interval, refreshes)
        return

    async def body(bus: Bus) -> Table | None:
        _require_store(bus)
        figures = await bus.listener_stats()
        if json_out:
            _print_json(
                [
                    {"listener": n, **dataclasses.asdict(s), "last_seen": _iso(s.last_seen)}
                    for n, s in sorted(figures.items())
                ]
            )
            return None
        from tidings.dashboard.live import STAT_COLUMNS, stat_cells

        table = Table(title=f"deliveries on {bus.url}")
        table.add_column("listener", no_wrap=True)
        for column in (*STAT_COLUMNS, "delivered", "failed"):
            table.add_column(column, justify="right")
        now = time.time()
        for listener, s in sorted(figures.items()):
            totals = ["-" if n is None else str(n) for n in (s.delivered, s.failed)]
            table.add_row(listener, *stat_cells(s, now), *totals)
        return table

    table = _with_bus(target, debug, body)
    if table is not None:
        _print_table(table)


def _watch_stats(target: str, debug: bool, interval: float, refreshes: int | None) -> None:
    """``stats --watch``: the per-listener figures as a live table, with rates."""
    from contextlib import suppress

    from rich.live import Live

    from tidings.dashboard.live import Watch

    live: Live | None = None

    async def body(bus: Bus) -> None:
        nonlocal live
        _require_store(bus)
        watch = Watch(bus.url)
        done = 0
        while refreshes is None or done < refreshes:
            if done:
                await asyncio.sleep(interval)
            watch.add(await bus.listener_stats())
            table = watch.table()
            console = _console_for(table, whole_rows=True)
            if not console.is_terminal or console.width > Console().width:
                # A pipe, or rows wider than the terminal (which would wrap them and
                # break redrawing in place): each reading is a table of its own.
                if live is not None:
                    live.stop()
                    live = None
                console.print(table)
            elif live is None:
                live = Live(table, console=console, auto_refresh=False)
                live.start(refresh=True)
            else:
                live.update(table, refresh=True)
            done += 1

    try:
        with suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
            _with_bus(target, debug, body)
    finally:
        if live is not None:
            live.stop()


@app.command()
def dashboard(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    host: str = typer.Option("127.0.0.1", help="The address to listen on."),
    port: int = typer.Option(8000, help="The port to listen on."),
    allow_actions: bool = typer.Option(
        False, "--allow-actions", help="Let visitors replay and purge dead letters."
    ),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Serve the web dashboard of a bus (read only unless --allow-actions)."""
    from tidings import dashboard as web

    try:
        import uvicorn
    except ImportError:
        raise _fail(
            "the dashboard's server needs uvicorn: pip install 'tidings[dashboard]'"
        ) from None
    bus = _guarded(debug, lambda: load_bus(target))
    bus.backend.consume = False  # a viewer: the workers run the listeners
    page = web.app(bus, auth=(lambda request: "act") if allow_actions else None)
    Console(stderr=True).print(
        f"tidings dashboard of {bus.url} on http://{host}:{port}/"
        + ("" if allow_actions else " (read only)"),
        highlight=False,
        soft_wrap=True,
    )
    _configure_logging(debug)
    _guarded(debug, lambda: uvicorn.run(page, host=host, port=port, log_level="warning"))


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
            why = (
                "a SQLite store makes its tables itself, when the bus starts"
                if bus.url.startswith("sqlite")
                else "only a PostgreSQL store has tables to make"
            )
            raise _fail(f"{bus.url} has no migrations to run: {why}")
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
    json_out: bool = typer.Option(False, "--json", help=_JSON_HELP),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """List dead letters, oldest first."""

    async def body(bus: Bus) -> Table | None:
        _require_store(bus)
        await _check_listener(bus, listener)
        letters = await bus.list_dead_letters(listener=listener, limit=limit)
        if json_out:
            _print_json([_letter_json(d, traceback=False) for d in letters])
            return None
        return _dead_table(f"{len(letters)} dead letter(s) on {bus.url}", letters)

    table = _with_bus(target, debug, body)
    if table is not None:
        _print_table(table)


_DEAD_COLUMNS = ("event id", "event", "listener", "attempts", "failed at", "error")
# Left out of ``dead list``, in this order, in a terminal too narrow for the rest and an
# error column of ``_ERROR_WIDTH``: each says less than the ones kept.
_DEAD_DROPPABLE = ("attempts", "event", "failed at")
_ERROR_WIDTH = 24


def _dead_table(title: str, letters: list[DeadLetter]) -> Table:
    """The ``dead list`` table. In a pipe or a CI log, every column whole (as wide as its
    rows); in a terminal, ids and names whole, and each error on one line in the width
    left, cut with an ellipsis, less useful columns left out when the terminal is narrow
    (``dead show`` and ``--json`` show it all)."""
    console = Console()
    columns = list(_DEAD_COLUMNS)
    error_width: int | None = None
    if console.is_terminal:
        for drop in (None, *_DEAD_DROPPABLE):
            if drop is not None:
                columns.remove(drop)
            others = _dead_rows(Table(), columns[:-1], letters)
            # A column more takes a border and two spaces of padding, besides its text.
            needed = console.measure(others, options=console.options.update_width(1_000_000))
            error_width = console.width - needed.maximum - 3
            if error_width >= _ERROR_WIDTH:
                break
        # As wide as the longest error at most, and never so narrow that it says nothing
        # (the terminal then wraps the table's lines: ids and names stay whole).
        longest = max((len(" ".join(d.error.split())) for d in letters), default=0)
        error_width = max(min(error_width or 0, longest), min(longest, 10), 1)
    left_out = [c for c in _DEAD_COLUMNS if c not in columns]
    table = Table(title=title)
    if left_out:
        table.caption = f"{', '.join(left_out)} left out to fit: see --json or a wider terminal"
    return _dead_rows(table, columns, letters, error_width=error_width)


def _dead_rows(
    table: Table, columns: list[str], letters: list[DeadLetter], *, error_width: int | None = None
) -> Table:
    """``table`` with ``columns`` of ``letters``: the error cut to ``error_width`` on one
    line if given, else whole."""
    for column in columns:
        if column != "error":
            table.add_column(column, no_wrap=True)
        elif error_width is None:
            table.add_column(column)
        else:
            table.add_column(column, no_wrap=True, overflow="ellipsis", width=error_width)
    for d in letters:
        cells = {
            "event id": d.event.id,
            "event": d.event.name,
            "listener": d.listener,
            "attempts": str(d.attempts),
            "failed at": _when(d.failed_at),
            "error": d.error if error_width is None else " ".join(d.error.split()),
        }
        table.add_row(*(cells[c] for c in columns))
    return table


_ID_HELP = "The event id, or any start of it that no other dead letter's id shares."


@dead_app.command("show")
def dead_show(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    event_id: str = typer.Argument(..., metavar="EVENT_ID", help=_ID_HELP),
    json_out: bool = typer.Option(False, "--json", help=_JSON_HELP),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Show one event's dead letters: payload, error and traceback."""

    async def body(bus: Bus) -> list[DeadLetter]:
        _require_store(bus)
        letters = await bus.list_dead_letters(limit=1_000_000)
        (full_id,) = _full_ids(letters, [event_id])
        return [d for d in letters if d.event.id == full_id]

    letters = _with_bus(target, debug, body)
    if json_out:
        _print_json([_letter_json(d, traceback=True) for d in letters])
        return
    # Free text as it is: never wrapped (so a traceback can be copied from a pipe), and
    # no brackets in a payload taken for markup.
    console = Console(soft_wrap=True, highlight=False)
    for d in letters:
        console.print(f"[bold]{escape(d.event.name)}[/] {d.event.id} -> {escape(d.listener)}")
        console.print(f"attempts: {d.attempts}, failed at {_when(d.failed_at)}")
        payload = {"args": list(d.event.args), "kwargs": d.event.kwargs, "obj": d.event.obj}
        console.print(f"payload: {msgspec.json.encode(payload).decode()}", markup=False)
        console.print(f"headers: {dict(d.event.headers)}", markup=False)
        console.print(d.traceback or d.error, markup=False)


@dead_app.command("replay")
def dead_replay(
    target: str = typer.Argument(..., metavar="APP", help=_APP_HELP),
    event_ids: list[str] = typer.Option([], "--id", help=f"Only these events. {_ID_HELP}"),  # noqa: B008
    listener: str | None = typer.Option(None, help="Only this listener (qualified name)."),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Deliver dead letters again, with fresh attempts."""

    async def body(bus: Bus) -> int:
        _require_store(bus)
        await _check_listener(bus, listener)
        letters = await bus.list_dead_letters(listener=listener, limit=1_000_000)
        if event_ids:
            ids = _full_ids(letters, event_ids)
        else:
            ids = list(dict.fromkeys(d.event.id for d in letters))
        replayed = 0
        # Drawn in a terminal only: elsewhere it would leave a blank line behind.
        with Progress(
            TextColumn("[bold]replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            transient=True,
            disable=not Console().is_terminal,
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
    event_ids: list[str] = typer.Option([], "--id", help=f"Only these events. {_ID_HELP}"),  # noqa: B008
    listener: str | None = typer.Option(None, help="Only this listener (qualified name)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Delete dead letters for good."""
    ask = not yes and not event_ids and listener is None
    nothing = False

    async def body(bus: Bus) -> int | None:
        nonlocal nothing
        _require_store(bus)
        await _check_listener(bus, listener)
        if ask:
            # Counted and confirmed while the bus is open: a bus given a backend object
            # does not start twice.
            found = len(await bus.list_dead_letters(limit=1_000_000))
            if not found:
                nothing = True
                return 0
            if not typer.confirm(f"Delete all {found} dead letter(s)?"):
                return None
        ids = None
        if event_ids:
            letters = await bus.list_dead_letters(listener=listener, limit=1_000_000)
            ids = _full_ids(letters, event_ids)
        return await bus.purge_dead_letters(ids=ids, listener=listener)

    count = _with_bus(target, debug, body)
    if count is None:
        raise typer.Abort()
    Console().print("no dead letters to purge" if nothing else f"purged {count} dead letter(s)")


async def _check_listener(bus: Bus, listener: str | None) -> None:
    """Refuse a ``--listener`` that names no listener: of the app, joined on its store,
    or with dead letters.

    Raises:
        ConfigurationError: it names none, with the names it could be.
    """
    if listener is None or any(lst.qualname == listener for lst in bus.listeners()):
        return
    known = {lst.qualname for lst in bus.listeners()}
    known.update(await bus.listener_stats())
    known.update(d.listener for d in await bus.list_dead_letters(limit=1_000_000))
    if listener not in known:
        names = f"the listeners are {', '.join(sorted(known))}" if known else "it has none"
        raise ConfigurationError(
            f"no listener {listener!r} in the app or on {bus.url} (--listener takes a "
            f"qualified name): {names}"
        )


def _full_ids(letters: list[DeadLetter], given: list[str]) -> list[str]:
    """The event ids of ``letters`` that the ``given`` ids or id prefixes name, once each.

    Raises:
        ConfigurationError: one names no dead letter, or the start of several events' ids.
    """
    known = list(dict.fromkeys(d.event.id for d in letters))
    found: list[str] = []
    for prefix in given:
        if not prefix:
            raise ConfigurationError("an empty event id names no dead letter")
        matches = [prefix] if prefix in known else [i for i in known if i.startswith(prefix)]
        if not matches:
            raise ConfigurationError(f"no dead letter of an event whose id starts with {prefix!r}")
        if len(matches) > 1:
            shown = ", ".join(matches[:10]) + (", ..." if len(matches) > 10 else "")
            raise ConfigurationError(
                f"{prefix!r} is the start of {len(matches)} dead events' ids ({shown}): "
                "give more of the id"
            )
        found.append(matches[0])
    return list(dict.fromkeys(found))


def _letter_json(d: DeadLetter, *, traceback: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "event_id": d.event.id,
        "event": d.event.name,
        "listener": d.listener,
        "attempts": d.attempts,
        "failed_at": _iso(d.failed_at),
        "error": d.error,
        "args": list(d.event.args),
        "kwargs": d.event.kwargs,
        "obj": d.event.obj,
        "headers": dict(d.event.headers),
    }
    if traceback:
        out["traceback"] = d.traceback
    return out


def _iso(timestamp: float | None) -> str | None:
    """An epoch time as JSON output gives every time: ISO 8601 text in UTC."""
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


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
    return f"sqlite:///{tmp}/demo.db?poll_interval=0.01"


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
