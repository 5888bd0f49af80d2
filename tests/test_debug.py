"""Debug mode: emits, deliveries and retries on ``tidings.debug``."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidings import Bus, ConfigurationError, Retry, listener


@pytest.fixture(autouse=True)
def _debug_logger() -> Iterator[None]:
    # Debug mode sets the logger's level (and a handler when logging is not set up):
    # left as the test found it.
    debug = logging.getLogger("tidings.debug")
    level, handlers = debug.level, list(debug.handlers)
    yield
    debug.setLevel(level)
    debug.handlers[:] = handlers


def debug_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tidings.debug"]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_debug_logs_each_emit_delivery_and_retry_with_timings(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, store: str
) -> None:
    calls = 0

    @listener("user.created", retry=Retry(attempts=2, backoff=0.001))
    async def flaky(email: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("smtp down")

    url = None if store == "memory" else f"sqlite:///{tmp_path / 'e.db'}?poll_interval=0.01"
    caplog.set_level(logging.DEBUG, "tidings.debug")
    async with Bus(url, listeners=[flaky], debug=True) as bus:
        bus.emit("user.created", email="a@b.c")
        await bus.drain()
    lines = debug_lines(caplog)
    (emitted,) = [line for line in lines if line.startswith("emit ")]
    event_id = re.search(r"id=(\w+)", emitted)
    assert event_id is not None
    assert re.fullmatch(
        rf"emit +user\.created  id={event_id[1]}  listeners=1  payload=\(email='a@b.c'\)",
        emitted,
    )
    who = f"id={event_id[1]}  listener={flaky.qualname}"
    delivery = [line for line in lines if not line.startswith("emit ")]
    took = r"took=[\d.]+(us|ms|s)"
    assert len(delivery) == 4, delivery
    assert re.fullmatch(rf"start +user\.created  {who}  attempt=1", delivery[0])
    assert re.fullmatch(
        rf"retry +user\.created  {who}  attempt=1  {took}  error=ValueError: smtp down",
        delivery[1],
    )
    assert re.fullmatch(rf"start +user\.created  {who}  attempt=2", delivery[2])
    assert re.fullmatch(rf"success +user\.created  {who}  attempt=2  {took}", delivery[3])


async def test_tidings_debug_in_the_environment_turns_it_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    @listener("x")
    def on_x() -> None: ...

    caplog.set_level(logging.DEBUG, "tidings.debug")
    monkeypatch.setenv("TIDINGS_DEBUG", "true")
    async with Bus(listeners=[on_x]) as bus:
        bus.emit("x")
        await bus.drain()
    assert [line.split()[0] for line in debug_lines(caplog)] == ["emit", "start", "success"]
    caplog.clear()
    async with Bus(listeners=[on_x], debug=False) as bus:  # said here: wins
        bus.emit("x")
        await bus.drain()
    assert debug_lines(caplog) == []
    monkeypatch.setenv("TIDINGS_DEBUG", "verbose")
    with pytest.raises(ConfigurationError, match=r"TIDINGS_DEBUG must be a boolean.*'verbose'"):
        Bus()


def test_debug_off_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_DEBUG", "0")
    bus = Bus()
    assert bus.observers == []
    assert bus.router.emit_hooks == []
    on = Bus(debug=True)
    assert len(on.observers) == 1
    assert len(on.router.emit_hooks) == 1


SCRIPT = """
import logging, sys
from tidings import Bus, listener


@listener("x")
def on_x() -> None: ...


bus = Bus(listeners=[on_x], debug=True)  # made at import, as a module-level bus is

if sys.argv[1] == "configured":  # logging set up later, in main()
    logging.basicConfig(level=logging.WARNING, format="app %(name)s %(message)s")

with bus:
    bus.emit("x")
"""


@pytest.mark.parametrize("logging_setup", ["none", "configured"])
def test_debug_lines_show_once_whether_or_not_logging_is_configured(
    tmp_path: Path, logging_setup: str
) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), logging_setup],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "tidings.debug" in line]
    assert [line.split("tidings.debug ")[1].split()[0] for line in lines] == [
        "emit",
        "start",
        "success",
    ]
    if logging_setup == "configured":
        assert all(line.startswith("app tidings.debug ") for line in lines)  # the app's
