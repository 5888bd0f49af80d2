"""The command line: ``tidings demo`` and friends."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tidings import Bus, listener
from tidings.cli import app
from tidings.demo import run_demo

from . import cli_app
from .services import REDIS_URL, drop_prefix_now, require_redis, unique_prefix

runner = CliRunner(env={"COLUMNS": "250"})


def test_demo_runs_and_prints_a_row_per_listener() -> None:
    result = runner.invoke(app, ["demo", "--quiet", "--users", "200"])
    assert result.exit_code == 0, result.output
    for name in ("send_welcome_mail", "audit", "sync_to_crm", "grant_trial"):
        assert name in result.output
    assert "800 deliveries of 200 events" in result.output
    assert "Traceback" not in result.output


def test_demo_with_live_progress() -> None:
    result = runner.invoke(app, ["demo", "--users", "50"])
    assert result.exit_code == 0, result.output
    assert "grant_trial" in result.output


def test_demo_verbose_shows_the_librarys_logs() -> None:
    try:
        result = runner.invoke(app, ["demo", "--quiet", "--verbose", "--users", "100"])
        assert result.exit_code == 0, result.output
        assert logging.getLogger("tidings").level == logging.INFO
    finally:
        logging.getLogger("tidings").setLevel(logging.NOTSET)


async def test_demo_figures_add_up() -> None:
    progress: list[tuple[int, int]] = []
    result = await run_demo(
        users=300, pause_s=0, on_progress=lambda done, total: progress.append((done, total))
    )
    figures = {f.name: f for f in result.listeners.values()}
    assert figures["send_welcome_mail"].delivered == 300
    assert figures["audit"].delivered == 300
    crm = figures["sync_to_crm"]
    assert (crm.delivered, crm.retried, crm.dead) == (300, 60, 0)
    trial = figures["grant_trial"]
    assert (trial.delivered, trial.retried, trial.dead) == (294, 6, 6)
    assert result.deliveries == 1200
    assert progress[-1] == (1200, 1200)
    assert crm.percentile(0.5) is not None
    assert figures["grant_trial"].percentile(0.99) is not None


def test_no_command_shows_help_and_version_prints() -> None:
    result = runner.invoke(app, [])
    assert "demo" in result.output
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.strip() == version("tidings")


@pytest.fixture(params=["sqlite", "redis"])
def app_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The app's store: a SQLite file, or a key prefix of its own on Redis."""
    prefix = ""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cli.db'}?poll_interval=0.01"
    else:
        require_redis()
        prefix = unique_prefix()
        url = f"{REDIS_URL}?prefix={prefix}&poll_interval=0.01"
    monkeypatch.setenv("TIDINGS_TEST_URL", url)
    try:
        yield url
    finally:
        if prefix:
            drop_prefix_now(prefix)


APP = "tests.cli_app:make_bus()"


@listener("user.signed_up")
async def send_welcome_mail_to_each_new_user(user_id: int) -> None:
    """A listener with a long qualified name, for the width of tables."""


def test_listeners_lists_names_and_options(app_url: str) -> None:
    result = runner.invoke(app, ["listeners", APP])
    assert result.exit_code == 0, result.output
    for text in ("charge", "order.paid", "2 attempts", "5s", "audit", "order.*", "sync"):
        assert text in result.output


def test_listeners_help_shows_its_two_forms() -> None:
    result = runner.invoke(app, ["listeners", "--help"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert "Usage: tidings listeners [OPTIONS] APP" in lines
    assert "or: tidings listeners forget [OPTIONS] APP NAME" in lines
    assert "see below" not in result.output
    assert "{APP}" not in result.output


@pytest.mark.parametrize(
    ("args", "meant"),
    [
        ([APP, "forget"], f"tidings listeners forget {APP} NAME"),
        ([APP, "forget", "old.listener"], f"tidings listeners forget {APP} old.listener"),
        ([APP, "extra"], f"tidings listeners {APP}"),
        (["forget", APP], "tidings listeners forget APP NAME"),
        (["forget", APP, "a", "b"], "tidings listeners forget APP NAME"),
    ],
)
def test_listeners_refuses_misplaced_arguments(
    sqlite_url: str, args: list[str], meant: str
) -> None:
    result = runner.invoke(app, ["listeners", *args])
    assert result.exit_code == 2, result.output
    assert meant in result.output
    assert "Usage: tidings listeners" in result.output
    assert "tests.cli_app.charge" not in result.output  # nothing listed


def test_listeners_forget_forgets(sqlite_url: str) -> None:
    async def join() -> None:
        async with Bus(sqlite_url, listeners=[send_welcome_mail_to_each_new_user], consume=False):
            pass

    asyncio.run(join())
    name = send_welcome_mail_to_each_new_user.qualname
    result = runner.invoke(app, ["listeners", "forget", APP, name])
    assert result.exit_code == 0, result.output
    assert f"forgot listener {name!r}" in result.output
    result = runner.invoke(app, ["listeners", "forget", APP, name])
    assert result.exit_code == 1, result.output
    assert "is joined on the store" in result.output


def test_emit_stats_and_dead_letters_round_trip(app_url: str) -> None:
    result = runner.invoke(app, ["emit", APP, "order.paid", "--json", '{"order_id": -1}'])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["stats", APP])
    assert result.exit_code == 0, result.output
    assert "charge" in result.output

    async def work() -> None:
        async with cli_app.make_bus() as bus:
            await bus.drain()

    asyncio.run(work())
    result = runner.invoke(app, ["dead", "list", APP])
    assert result.exit_code == 0, result.output
    assert "ValueError: order -1 cannot be charged" in result.output

    async def dead_id() -> str:
        async with Bus(app_url, consume=False) as bus:
            (letter,) = await bus.list_dead_letters()
            return letter.event.id

    event_id = asyncio.run(dead_id())
    result = runner.invoke(app, ["dead", "show", APP, event_id])
    assert result.exit_code == 0, result.output
    assert '"order_id":-1' in result.output
    assert "Traceback" in result.output
    result = runner.invoke(app, ["dead", "replay", APP, "--id", event_id])
    assert result.exit_code == 0, result.output
    assert "replayed 1 dead letter(s)" in result.output
    asyncio.run(work())
    result = runner.invoke(app, ["dead", "purge", APP, "--yes"])
    assert result.exit_code == 0, result.output
    assert "purged 1 dead letter(s)" in result.output
    result = runner.invoke(app, ["dead", "show", APP, event_id])
    assert result.exit_code == 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nowhere.at_all:bus", "no module named 'nowhere'"),
        ("tests.cli_app:missing", "has no attribute 'missing'"),
        ("tests.cli_app:not_a_bus", "is a value of type int, not a tidings Bus: name a Bus"),
        (
            "tests.cli_app:make_bus",
            "is a function, not a tidings Bus: write 'tests.cli_app:make_bus()' to call it",
        ),
        ("tests.cli_app:listener()", "returned a value of type function, not a tidings Bus"),
        ("tests.cli_app", "does not name a bus"),
    ],
)
def test_bad_targets_are_one_clear_line(app_url: str, target: str, message: str) -> None:
    result = runner.invoke(app, ["stats", target])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_json_and_passwords(app_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["emit", APP, "x", "--json", "{nope"])
    assert result.exit_code == 1
    assert "not valid JSON" in result.output
    monkeypatch.setenv("TIDINGS_TEST_URL", "redis://user:hunter2@localhost:1/0")
    result = runner.invoke(app, ["stats", APP])
    assert result.exit_code == 1
    assert "hunter2" not in result.output


def test_worker_refuses_a_memory_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TEST_URL", "memory://")
    result = runner.invoke(app, ["worker", APP])
    assert result.exit_code == 1
    assert "durable backend" in result.output


def test_demo_on_memory() -> None:
    result = runner.invoke(app, ["demo", "--quiet", "--users", "100", "--backend", "memory"])
    assert result.exit_code == 0, result.output
    assert "memory backend" in result.output


# -- output for operators ------------------------------------------------------------

narrow = CliRunner(env={"COLUMNS": "80"})


@pytest.fixture
def sqlite_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'ops.db'}?poll_interval=0.01"
    monkeypatch.setenv("TIDINGS_TEST_URL", url)
    return url


def _dead_ids(url: str, order_ids: list[int]) -> list[str]:
    """Publish a failing order per id, run them to dead letters, return the event ids."""

    async def run() -> list[str]:
        async with cli_app.make_bus() as bus:
            for order_id in order_ids:
                await bus.publish("order.paid", order_id=order_id)
            await bus.drain()
        async with Bus(url, consume=False) as bus:
            return [d.event.id for d in await bus.list_dead_letters()]

    return asyncio.run(run())


def test_tables_never_cut_ids_or_names_in_an_80_column_pipe(sqlite_url: str) -> None:
    (event_id,) = _dead_ids(sqlite_url, [-1])
    for command in (["dead", "list", APP], ["stats", APP], ["listeners", APP]):
        result = narrow.invoke(app, command)
        assert result.exit_code == 0, result.output
        assert "…" not in result.output, result.output
        lines = result.output.splitlines()
        assert any("tests.cli_app.charge" in line for line in lines), result.output
    lines = narrow.invoke(app, ["dead", "list", APP]).output.splitlines()
    assert any(event_id in line for line in lines)
    assert any("ValueError: order -1 cannot be charged" in line for line in lines)


@pytest.mark.parametrize(
    "env",
    [{"COLUMNS": "80"}, {"COLUMNS": "100", "TTY_COMPATIBLE": "1", "NO_COLOR": "1"}],
    ids=["pipe", "terminal"],
)
def test_stats_watch_never_cuts_names_or_headers(sqlite_url: str, env: dict[str, str]) -> None:
    async def join() -> None:
        async with Bus(sqlite_url, listeners=[send_welcome_mail_to_each_new_user], consume=False):
            pass

    asyncio.run(join())
    _dead_ids(sqlite_url, [-1])  # a worker ran: the app's listeners were last seen now
    args = ["stats", APP, "--watch", "--refreshes", "2", "--interval", "0.01"]
    result = CliRunner(env=env).invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "…" not in result.output, result.output
    lines = result.output.splitlines()
    name = send_welcome_mail_to_each_new_user.qualname
    assert any(name in line for line in lines), result.output
    header = next(line for line in lines if "pending" in line)
    for column in ("in flight", "retrying", "last seen", "backlog/s", "delivered/s"):
        assert column in header, header
    charge = next(line for line in lines if "tests.cli_app.charge" in line)
    assert re.search(r"\d+s ago", charge), charge


def test_tables_in_a_narrow_terminal_still_show_whole_ids(sqlite_url: str) -> None:
    (event_id,) = _dead_ids(sqlite_url, [-1])
    terminal = CliRunner(env={"COLUMNS": "40", "TTY_COMPATIBLE": "1", "NO_COLOR": "1"})
    result = terminal.invoke(app, ["dead", "list", APP])
    assert result.exit_code == 0, result.output
    assert any(event_id in line for line in result.output.splitlines()), result.output
    assert any("tests.cli_app.charge" in line for line in result.output.splitlines())


def test_dead_list_in_an_80_column_terminal_fits_with_each_error_on_one_line(
    sqlite_url: str,
) -> None:
    ids = _dead_ids(sqlite_url, [-1, -(10**60)])
    terminal = CliRunner(env={"COLUMNS": "80", "TTY_COMPATIBLE": "1", "NO_COLOR": "1"})
    result = terminal.invoke(app, ["dead", "list", APP])
    assert result.exit_code == 0, result.output
    lines = re.sub(r"\x1b\[[0-9;]*m", "", result.output).splitlines()
    assert all(len(line) <= 80 for line in lines), result.output
    for event_id in ids:
        (row,) = [line for line in lines if event_id in line]
        assert "tests.cli_app.charge" in row
        assert "ValueError: order…" in row
    assert "left out to fit" in result.output
    wide = CliRunner(env={"COLUMNS": "200", "TTY_COMPATIBLE": "1", "NO_COLOR": "1"})
    result = wide.invoke(app, ["dead", "list", APP])
    assert "left out" not in result.output
    assert "ValueError: order -1 cannot be charged" in result.output


def test_long_lines_are_never_wrapped_in_a_pipe(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (event_id,) = _dead_ids(sqlite_url, [-(10**60)])
    result = narrow.invoke(app, ["dead", "show", APP, event_id])
    assert result.exit_code == 0, result.output
    error = f"ValueError: order {-(10**60)} cannot be charged"
    assert error in result.output.splitlines(), result.output
    monkeypatch.setenv("TIDINGS_TEST_URL", "memory://")
    result = narrow.invoke(app, ["stats", APP])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("error: memory:// keeps")
    assert line.endswith("postgresql://...)")


def test_dead_show_prints_brackets_in_a_payload_as_they_are(sqlite_url: str) -> None:
    async def run() -> str:
        async with cli_app.make_bus() as bus:
            await bus.publish("order.paid", order_id=-1, note="[bold]x[/bold]")
            await bus.drain()
            (letter,) = await bus.list_dead_letters()
            return letter.event.id

    event_id = asyncio.run(run())
    result = runner.invoke(app, ["dead", "show", APP, event_id])
    assert result.exit_code == 0, result.output
    assert '"note":"[bold]x[/bold]"' in result.output


@pytest.mark.parametrize("command", ["list", "replay", "purge"])
def test_dead_commands_refuse_an_unknown_listener(sqlite_url: str, command: str) -> None:
    _dead_ids(sqlite_url, [-1])
    result = runner.invoke(app, ["dead", command, APP, "--listener", "nope"])
    assert result.exit_code == 1, result.output
    assert "no listener 'nope' in the app or on sqlite:///" in result.output
    assert "the listeners are tests.cli_app.audit, tests.cli_app.charge" in result.output
    result = runner.invoke(app, ["dead", "list", APP, "--json"])
    assert len(json.loads(result.output)) == 1  # nothing replayed or purged


def test_dead_replay_prints_one_line_and_purge_asks_with_the_count(sqlite_url: str) -> None:
    _dead_ids(sqlite_url, [-1, -2])
    result = runner.invoke(app, ["dead", "replay", APP, "--listener", "tests.cli_app.charge"])
    assert result.exit_code == 0, result.output
    assert result.output == "replayed 2 dead letter(s)\n"
    asyncio.run(_drain())
    result = runner.invoke(app, ["dead", "purge", APP], input="n\n")
    assert result.exit_code == 1, result.output
    assert "Delete all 2 dead letter(s)? [y/N]" in result.output
    result = runner.invoke(app, ["dead", "purge", APP], input="y\n")
    assert result.exit_code == 0, result.output
    assert "purged 2 dead letter(s)" in result.output
    result = runner.invoke(app, ["dead", "purge", APP])
    assert result.exit_code == 0, result.output
    assert result.output == "no dead letters to purge\n"


def test_dead_purge_asks_and_purges_on_a_bus_given_its_backend_object(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dead_ids(sqlite_url, [-1])
    path = sqlite_url.removeprefix("sqlite://").partition("?")[0]
    (tmp_path / "purge_object_app.py").write_text(
        "from tidings import Bus\n"
        "from tidings.backends.sqlite import SQLiteBackend\n"
        "from tests.cli_app import audit, charge\n"
        f"bus = Bus(SQLiteBackend({path!r}), listeners=[charge, audit])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["dead", "purge", "purge_object_app:bus"], input="y\n")
    assert result.exit_code == 0, result.output
    assert "Delete all 1 dead letter(s)? [y/N]" in result.output
    assert "purged 1 dead letter(s)" in result.output


async def _drain() -> None:
    async with cli_app.make_bus() as bus:
        await bus.drain()


def test_dead_commands_take_a_unique_id_prefix(sqlite_url: str) -> None:
    # 17 events: two of their ids share a first hex digit, whichever ids they get.
    ids = _dead_ids(sqlite_url, list(range(-17, 0)))
    assert len(ids) == 17
    first = ids[0]
    prefix = next(first[:n] for n in range(1, 33) if sum(i.startswith(first[:n]) for i in ids) == 1)
    result = runner.invoke(app, ["dead", "show", APP, prefix])
    assert result.exit_code == 0, result.output
    assert first in result.output
    shared = next(i[0] for i in ids if sum(j.startswith(i[0]) for j in ids) > 1)
    result = runner.invoke(app, ["dead", "show", APP, shared])
    assert result.exit_code == 1
    assert f"{shared!r} is the start of" in result.output
    for full in (i for i in ids if i.startswith(shared)):
        assert full in result.output
    result = runner.invoke(app, ["dead", "replay", APP, "--id", shared])
    assert result.exit_code == 1
    assert "give more of the id" in result.output
    result = runner.invoke(app, ["dead", "show", APP, "zz"])
    assert result.exit_code == 1
    assert "no dead letter of an event whose id starts with 'zz'" in result.output
    result = runner.invoke(app, ["dead", "purge", APP, "--id", "zz"])
    assert result.exit_code == 1
    result = runner.invoke(app, ["dead", "replay", APP, "--id", prefix])
    assert result.exit_code == 0, result.output
    assert "replayed 1 dead letter(s)" in result.output
    second = ids[1]
    prefix = next(
        second[:n] for n in range(1, 33) if sum(i.startswith(second[:n]) for i in ids) == 1
    )
    result = runner.invoke(app, ["dead", "purge", APP, "--id", prefix])
    assert result.exit_code == 0, result.output
    assert "purged 1 dead letter(s)" in result.output

    async def listed() -> list[str]:
        async with Bus(sqlite_url, consume=False) as bus:
            return [d.event.id for d in await bus.list_dead_letters()]

    remaining = asyncio.run(listed())  # the first waits to run again, the second is gone
    assert first not in remaining
    assert second not in remaining
    assert len(remaining) == 15


def test_every_listing_command_prints_json(sqlite_url: str) -> None:
    (event_id,) = _dead_ids(sqlite_url, [-3])
    result = runner.invoke(app, ["listeners", APP, "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert listed[0] == {
        "listener": "tests.cli_app.charge",
        "events": ["order.paid"],
        "async": True,
        "once": False,
        "attempts": 2,
        "timeout_s": 5.0,
        "concurrency": None,
        "batch": None,
        "last_seen": listed[0]["last_seen"],
    }
    assert _epoch(listed[0]["last_seen"]) > 0
    assert listed[1]["concurrency"] == 1
    result = runner.invoke(app, ["stats", APP, "--json"])
    assert result.exit_code == 0, result.output
    figures = {row["listener"]: row for row in json.loads(result.output)}
    assert figures["tests.cli_app.charge"]["dead"] == 1
    # Every time in JSON output is ISO 8601 text in UTC, like a dead letter's failed_at.
    assert _epoch(figures["tests.cli_app.charge"]["last_seen"]) == pytest.approx(
        _epoch(listed[0]["last_seen"]), abs=1
    )
    assert figures["tests.cli_app.audit"]["pending"] == 0
    result = runner.invoke(app, ["dead", "list", APP, "--json"])
    assert result.exit_code == 0, result.output
    (letter,) = json.loads(result.output)
    assert letter["event_id"] == event_id
    assert letter["kwargs"] == {"order_id": -3}
    assert letter["error"] == "ValueError: order -3 cannot be charged"
    assert letter["attempts"] == 2
    assert _epoch(letter["failed_at"]) > 0
    assert "traceback" not in letter
    result = runner.invoke(app, ["dead", "show", APP, event_id[:12], "--json"])
    assert result.exit_code == 0, result.output
    (shown,) = json.loads(result.output)
    assert shown["event_id"] == event_id
    assert "Traceback" in shown["traceback"]


def _epoch(text: str) -> float:
    """A time from JSON output (ISO 8601 with the UTC offset) as epoch seconds."""
    when = datetime.fromisoformat(text)
    assert when.utcoffset() == timedelta(0), text
    return when.timestamp()


@pytest.mark.parametrize(
    "command",
    [["stats", APP], ["dead", "list", APP], ["dead", "show", APP, "ab"], ["emit", APP, "zzz.q"]],
)
def test_store_commands_on_a_memory_bus_say_why_they_show_nothing(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDINGS_TEST_URL", "memory://")
    result = runner.invoke(app, command)
    assert result.exit_code == 1
    assert "memory:// keeps its deliveries and dead letters in the memory" in result.output
    assert "durable URL" in result.output
    assert "Traceback" not in result.output


def test_emit_on_a_memory_bus_runs_no_listener_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TEST_URL", "memory://")
    result = runner.invoke(app, ["emit", APP, "order.paid", "--json", '{"order_id": -1}'])
    assert result.exit_code == 1
    assert "an event emitted here would reach, not the app's" in result.output
    assert "emitted" not in result.output.replace("emitted here", "")


def test_listeners_of_a_memory_bus_still_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TEST_URL", "memory://")
    result = runner.invoke(app, ["listeners", APP, "--json"])
    assert result.exit_code == 0, result.output
    assert [row["listener"] for row in json.loads(result.output)] == [
        "tests.cli_app.charge",
        "tests.cli_app.audit",
    ]
    assert all("last_seen" not in row for row in json.loads(result.output))
    result = runner.invoke(app, ["listeners", APP])
    assert result.exit_code == 0, result.output
    assert "last seen" not in result.output


def test_listeners_of_a_durable_bus_say_when_a_worker_last_claimed(sqlite_url: str) -> None:
    result = runner.invoke(app, ["listeners", APP, "--json"])
    assert result.exit_code == 0, result.output
    assert [row["last_seen"] for row in json.loads(result.output)] == [None, None]
    result = runner.invoke(app, ["listeners", APP])
    assert result.exit_code == 0, result.output
    assert "last seen" in result.output
    charge_line = next(line for line in result.output.splitlines() if ".charge" in line)
    assert "never" in charge_line
    before = time.time()
    _dead_ids(sqlite_url, [-1])  # a worker ran: it claimed for both listeners
    result = runner.invoke(app, ["listeners", APP, "--json"])
    assert result.exit_code == 0, result.output
    seen = [_epoch(row["last_seen"]) for row in json.loads(result.output)]
    assert all(before - 1 <= t <= time.time() for t in seen), seen
    result = runner.invoke(app, ["listeners", APP])
    charge_line = next(line for line in result.output.splitlines() if ".charge" in line)
    assert re.search(r"\d+s ago", charge_line), result.output


def test_worker_listeners_are_patterns_and_a_miss_lists_the_names(sqlite_url: str) -> None:
    result = runner.invoke(app, ["worker", "--help"])
    assert "-l 'myapp.events.*'" in result.output
    result = runner.invoke(app, ["worker", APP, "-l", "charge"])
    assert result.exit_code == 1, result.output
    assert (
        "none matches charge; the bus's listeners are tests.cli_app.charge, tests.cli_app.audit"
        in result.output
    )


def test_worker_refuses_an_unknown_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TEST_URL", "memory://")
    result = runner.invoke(app, ["worker", APP, "--log-level", "chatty"])
    assert result.exit_code == 1
    assert "--log-level must be one of DEBUG, INFO, WARNING, ERROR, not 'chatty'" in result.output


ROOT = Path(__file__).resolve().parent.parent


def _worker_log(url: str, *options: str, delivered: int = 0) -> str:
    """Run ``tidings worker`` on a store holding one failing and one good order, until its
    dead letter is logged (and, with ``delivered``, as many deliveries), stop it with
    SIGTERM and return all it logged."""

    async def publish() -> None:
        async with Bus(url, listeners=[cli_app.charge, cli_app.audit], consume=False) as bus:
            await bus.publish("order.paid", order_id=-1)
            await bus.publish("order.paid", order_id=1)

    asyncio.run(publish())
    env = {**os.environ, "TIDINGS_TEST_URL": url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings.cli", "worker", APP, *options],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with proc, proc.stderr:
        try:
            seen: list[str] = []
            dead = made = 0
            for line in proc.stderr:
                seen.append(line)
                dead += "dead letter" in line
                made += " delivered event " in line
                if dead and made >= delivered:
                    break
            proc.send_signal(signal.SIGTERM)
            rest = proc.stderr.read()
            assert proc.wait(timeout=30) == 0, "".join(seen) + rest
        finally:
            if proc.poll() is None:
                proc.kill()
    return "".join(seen) + rest


def test_worker_logs_a_line_per_failed_attempt_and_the_traceback_once(sqlite_url: str) -> None:
    # The good charge and the two audits: they may run after the dead letter.
    log = _worker_log(sqlite_url, "--log-deliveries", delivered=3)
    assert log.count("worker started") == 1, log
    assert log.count("Traceback") == 1, log
    (retried,) = [line for line in log.splitlines() if "retrying" in line]
    assert "WARNING" in retried
    assert "failed on attempt 1/2: ValueError: order -1 cannot be charged" in retried
    (dead,) = [line for line in log.splitlines() if "dead letter" in line]
    assert "ERROR" in dead
    assert "failed on attempt 2/2" in dead
    delivered = [line for line in log.splitlines() if " delivered event " in line]
    assert any("to tests.cli_app.charge on attempt 1 in" in line for line in delivered), log
    assert sum("to tests.cli_app.audit" in line for line in delivered) == 2, log


def test_worker_serves_metrics_on_the_address_given(sqlite_url: str) -> None:
    help_text = runner.invoke(app, ["worker", "--help"]).output
    assert "--metrics-host" in help_text
    assert "0.0.0.0" in help_text  # the default, said where it is chosen
    env = {**os.environ, "TIDINGS_TEST_URL": sqlite_url, "PYTHONPATH": str(ROOT)}
    args = ["worker", APP, "--metrics-host", "127.0.0.1", "--metrics-port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with proc, proc.stderr:
        try:
            line = next((line for line in proc.stderr if "metrics on" in line), "")
            found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            assert found, line
            with urllib.request.urlopen(f"http://127.0.0.1:{found[1]}/metrics") as response:
                assert b"tidings_dead_letters" in response.read()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_worker_log_level_hides_what_is_below_it(sqlite_url: str) -> None:
    log = _worker_log(sqlite_url, "--log-level", "warning", "--log-deliveries")
    assert "worker started" not in log
    assert " delivered event " not in log
    assert "failed on attempt 1/2" in log
    assert log.count("Traceback") == 1


def test_emit_json_is_the_payload_and_options_are_flags(app_url: str) -> None:
    payload = '{"order_id": -1, "delay": 86400, "key": "k", "headers": "h", "at": "noon"}'
    args = ["emit", APP, "order.paid", "--json", payload, "--header", "trace=t1", "--key", "o1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["emit", APP, "order.paid", "--json", '{"order_id": -2}'])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["emit", APP, "order.paid", "--json", '{"order_id": -3}', "--delay", "3600"]
    )
    assert result.exit_code == 0, result.output

    async def work() -> list[Any]:
        async with cli_app.make_bus() as bus:
            await bus.drain()
            letters = await bus.list_dead_letters(listener=f"{cli_app.__name__}.charge")
            stats = await bus.listener_stats()
        assert stats[f"{cli_app.__name__}.charge"].delayed == 1  # the --delay 3600 one
        return letters

    letters = asyncio.run(work())
    # Delivered at once: the JSON's "delay" is the listener's, not an option.
    assert sorted(d.event.kwargs["order_id"] for d in letters) == [-2, -1]
    (first,) = [d for d in letters if d.event.kwargs["order_id"] == -1]
    assert first.event.kwargs == {
        "order_id": -1,
        "delay": 86400,
        "key": "k",
        "headers": "h",
        "at": "noon",
    }
    assert dict(first.event.headers) == {"trace": "t1"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--header", "novalue"], "--header takes NAME=VALUE"),
        (["--at", "tomorrow"], "--at is not an ISO 8601 time"),
        (["--at", "2030-01-01T09:00"], "--at needs a UTC offset, e.g. 2030-01-01T09:00+00:00"),
        (["--delay", "nan"], "finite"),
    ],
)
def test_emit_flags_are_checked(app_url: str, flags: list[str], message: str) -> None:
    result = runner.invoke(app, ["emit", APP, "order.paid", "--json", '{"order_id": 1}', *flags])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "datetime" not in result.output  # words for the command line, not for Python


def test_emit_says_how_many_listeners_in_words(sqlite_url: str) -> None:
    result = runner.invoke(app, ["emit", APP, "order.paid", "--json", '{"order_id": 1}'])
    assert result.exit_code == 0, result.output
    assert "emitted 'order.paid': stored for 2 listeners" in result.output
    result = runner.invoke(app, ["emit", APP, "order.shipped", "--json", '{"order_id": 1}'])
    assert result.exit_code == 0, result.output
    assert "emitted 'order.shipped': stored for 1 listener\n" in result.output


def test_emit_with_no_listener_stores_nothing_unless_allowed(sqlite_url: str) -> None:
    result = runner.invoke(app, ["emit", APP, "usr.created"])
    assert result.exit_code == 1, result.output
    assert "'usr.created' was not emitted: no listener joined on the store" in result.output
    assert "emitted 'usr.created'" not in result.output
    result = runner.invoke(app, ["emit", APP, "usr.created", "--allow-none"])
    assert result.exit_code == 0, result.output
    assert "emitted 'usr.created': stored for no listener" in result.output


def _commands(command: Any) -> Iterator[Any]:
    """A click command and every command under it."""
    yield command
    for sub in getattr(command, "commands", {}).values():
        yield from _commands(sub)


def test_no_help_text_breaks_a_paragraph_where_its_source_does() -> None:
    # The help shows a line break inside a paragraph as it is, wherever the terminal is.
    for command in _commands(typer.main.get_command(app)):
        texts = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
        for text in texts:
            for paragraph in text.split("\n\n"):
                assert "\n" not in paragraph.strip(), (command.name, paragraph)


def test_db_migrate_on_sqlite_says_sqlite_makes_its_tables(sqlite_url: str) -> None:
    result = runner.invoke(app, ["db", "migrate", APP])
    assert result.exit_code == 1
    assert "a SQLite store makes its tables itself, when the bus starts" in result.output


def test_demo_help_wraps_at_the_terminals_width_only() -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("A welcome mail"))
    paragraph = lines[start : lines.index("", start)]
    assert "dead letters" in paragraph[-1]
    # No line broken mid-sentence where the source broke it: all but the last are full.
    assert all(len(line) > 60 for line in paragraph[:-1]), paragraph
