"""Sync listeners in worker processes: ``@listener(..., executor="process")``."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tidings import Bus, ConfigurationError, Event, Retry, listener


# Defined at the top level: a worker process imports this module to find them.
@listener("square", executor="process")
def square(n: int, out: str) -> None:
    Path(out, str(n)).write_text(f"{os.getpid()} {n * n}")


@listener("fails", executor="process", retry=Retry(attempts=2, backoff=0.001))
def fails(out: str) -> None:
    with Path(out, "attempts").open("a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError("no such invoice")


@listener("envelope", executor="process")
def envelope(event: Event, out: str) -> None:
    seen = f"{event.name} {event.id} {event.attempt} {dict(event.headers)}"
    Path(out, "envelope").write_text(seen)


@listener("slow", executor="process", timeout=0.2)
def slow() -> None:
    time.sleep(1)


def test_a_listener_runs_in_another_process(tmp_path: Path) -> None:
    with Bus(listeners=[square]) as bus:
        for n in range(4):
            bus.emit("square", n=n, out=str(tmp_path))
        bus.run_sync(bus.drain())
        assert bus.dead_letters() == []
    results = {int(p.name): p.read_text().split() for p in tmp_path.iterdir()}
    assert sorted(results) == [0, 1, 2, 3]
    assert [int(r[1]) for _, r in sorted(results.items())] == [0, 1, 4, 9]
    assert {int(r[0]) for r in results.values()}.isdisjoint({os.getpid()})
    assert square(3, str(tmp_path)) is None  # still a plain function when called


def test_a_listener_taking_the_envelope_gets_it_in_its_process(tmp_path: Path) -> None:
    ids: list[str] = []
    with Bus(listeners=[envelope], on_success=lambda e, lst: ids.append(e.id)) as bus:
        bus.emit("envelope", out=str(tmp_path))
        bus.run_sync(bus.drain())
        assert bus.dead_letters() == []
    assert (tmp_path / "envelope").read_text() == f"envelope {ids[0]} 1 {{}}"


def test_a_failing_listener_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    with Bus(listeners=[fails]) as bus:
        bus.emit("fails", out=str(tmp_path))
        bus.run_sync(bus.drain())
        (letter,) = bus.dead_letters()
    assert letter.error == "ValueError: no such invoice"
    assert letter.attempts == 2
    pids = (tmp_path / "attempts").read_text().split()
    assert len(pids) == 2
    assert str(os.getpid()) not in pids


def test_a_listener_past_its_timeout_is_dead_lettered() -> None:
    with Bus(listeners=[slow]) as bus:
        bus.emit("slow")
        bus.run_sync(bus.drain())
        (letter,) = bus.dead_letters()
    assert "timed out after 0.2s" in letter.error


def nested_holder() -> Any:
    def nested() -> None: ...

    return nested


class Job:
    def __call__(self) -> None: ...

    def method(self) -> None: ...


async def coroutine_fn() -> None: ...


def plain() -> None: ...


@pytest.mark.parametrize(
    ("fn", "options", "message"),
    [
        (lambda: None, {}, r"top level of a module, not inside a function or as a lambda"),
        (nested_holder(), {}, r"not inside a function .*nested_holder.<locals>.nested"),
        (Job(), {}, r"a function defined at the top level of a module, not Job"),
        (Job().method, {}, r"not method"),
        (coroutine_fn, {}, r"which is for sync functions: it is async"),
        (plain, {"inline": True}, r"and inline, on the event loop: choose one"),
        (plain, {"executor": "fork"}, r"must be 'thread' or 'process', not 'fork'"),
    ],
)
def test_what_a_worker_process_cannot_run_is_refused_at_registration(
    fn: Any, options: dict[str, Any], message: str
) -> None:
    options.setdefault("executor", "process")
    with pytest.raises(ConfigurationError, match=message):
        listener("x", **options)(fn)


def test_a_function_its_module_does_not_name_fails_its_delivery_clearly() -> None:
    def renamed(event: Event) -> None: ...

    renamed.__qualname__ = "no_such_function"  # top level in name only
    dead: list[BaseException] = []
    made = listener("x", executor="process", retry=1)(renamed)
    with Bus(listeners=[made], on_dead=lambda e, lst, exc: dead.append(exc)) as bus:
        bus.emit("x")
        bus.run_sync(bus.drain())
    (error,) = dead
    assert isinstance(error, ConfigurationError)
    assert f"{__name__}.no_such_function does not name it" in str(error)


KILLED_SCRIPT = """
import os, signal, sys
from pathlib import Path
from tidings import Bus, listener


@listener("work", executor="process")
def work(out: str) -> None:
    Path(out).write_text(str(os.getpid()))


if __name__ == "__main__":
    with Bus(listeners=[work]) as bus:
        bus.emit("work", out=sys.argv[1])
        bus.run_sync(bus.drain())
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no shutdown of the pool
"""


def test_worker_processes_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_SCRIPT))
    out = tmp_path / "pid"
    done = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -9, done.stderr
    worker = int(out.read_text())
    try:
        fd = os.pidfd_open(worker)
    except ProcessLookupError:
        return  # gone already
    try:
        exited, _, _ = select.select([fd], [], [], 30)  # readable once it has exited
    finally:
        os.close(fd)
    assert exited, f"worker process {worker} outlived its parent"
