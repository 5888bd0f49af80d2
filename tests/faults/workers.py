"""``tidings worker`` subprocesses the fault scenarios start, kill, freeze and read.

Also the SIGKILL scenario itself (:func:`kill_run`), which ``bench/faults.py`` runs at
full size.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tidings import Bus

from . import app

ROOT = Path(__file__).resolve().parent.parent.parent


class Workers:
    """Worker processes of one app on one store, writing to one output file.

    Args:
        directory: where the output file and the workers' logs go.
        url: the store's URL.
        target: the bus to run, ``module:attribute``.
    """

    def __init__(
        self, directory: Path, url: str, target: str, *, env: dict[str, str] | None = None
    ) -> None:
        self.out = directory / "deliveries.txt"
        self.log = directory / "workers.log"
        self.url = url
        self.target = target
        self.env = env or {}
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *, concurrency: int = 50) -> subprocess.Popen[bytes]:
        """Start one more worker."""
        env = dict(os.environ)
        env.update(self.env)
        env["TIDINGS_TEST_URL"] = self.url
        env["TIDINGS_TEST_OUT"] = str(self.out)
        env["PYTHONPATH"] = str(ROOT)
        with self.log.open("ab") as stderr:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tidings.cli",
                    "worker",
                    self.target,
                    "--concurrency",
                    str(concurrency),
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.started.append(proc)
        return proc

    def lines(self) -> list[list[str]]:
        """What the listeners wrote so far, one list of fields per line."""
        if not self.out.exists():
            return []
        # Only whole lines: the last may still be being written as this reads it.
        *whole, _partial = self.out.read_text().split("\n")
        return [line.split() for line in whole]

    def logs(self) -> str:
        """The workers' logs (their stderr)."""
        return self.log.read_text() if self.log.exists() else ""

    async def ready(self, count: int, *, timeout_s: float = 30) -> None:
        """Wait until ``count`` workers in all have said they started (their signal
        handlers are in place from then on)."""
        deadline = time.monotonic() + timeout_s
        while self.logs().count("worker started") < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} workers not started:\n{self.logs()[-3000:]}")
            await asyncio.sleep(0.02)

    async def wait_until(
        self,
        done: Callable[[list[list[str]]], bool],
        what: str,
        *,
        timeout_s: float = 60,
        alive: subprocess.Popen[bytes] | None = None,
    ) -> list[list[str]]:
        """Read the output until ``done`` holds of it; fail after ``timeout_s``, or as
        soon as the worker ``alive`` has exited."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = self.lines()
            if done(lines):
                return lines
            if alive is not None and alive.poll() is not None:
                raise AssertionError(f"the worker exited before {what}:\n{self.logs()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} after {timeout_s}s:\n{self.logs()[-3000:]}")
            # Polling a file another process writes: there is nothing to await.
            await asyncio.sleep(0.02)

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> int:
        """SIGTERM a worker and wait for it; its exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(30)

    def reap(self) -> None:
        """Kill every worker still running (SIGCONT first: a frozen one ignores SIGKILL
        until it runs again, on some systems)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
        self.started.clear()


@dataclass(slots=True)
class KillFigures:
    """What a run of :func:`kill_run` found."""

    events: int
    kills: int
    lost: int
    duplicates: int
    deliveries: int
    killed_at: list[int]
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.events} events x 2 listeners, worker SIGKILLed {self.kills} times "
            f"(after {', '.join(map(str, self.killed_at))} deliveries): lost {self.lost}, "
            f"duplicates {self.duplicates} of {self.deliveries} deliveries, "
            f"{self.seconds:.1f}s"
        )


def _at_least(count: int) -> Callable[[list[list[str]]], bool]:
    """Whether the listeners wrote ``count`` distinct deliveries."""

    def done(lines: list[list[str]]) -> bool:
        return len({(tag, n) for tag, n, *_ in lines}) >= count

    return done


async def publish_jobs(url: str, events: int) -> None:
    """Store ``events`` events for :data:`app.jobs`'s two listeners."""
    async with Bus(url, listeners=[app.first, app.second], consume=False) as bus:
        for start in range(0, events, 10_000):
            for n in range(start, min(start + 10_000, events)):
                bus.emit("job", n=n)
            await bus.drain()


async def kill_run(
    directory: Path,
    url: str,
    *,
    events: int,
    kills: int = 3,
    concurrency: int = 50,
    job_s: float = 0.0002,
    timeout_s: float = 120,
) -> KillFigures:
    """Store ``events`` events for two listeners (each delivery taking ``job_s``), then
    run workers on them, SIGKILLing one ``kills`` times at even intervals, and let one
    more finish; what it found."""
    began = time.monotonic()
    await publish_jobs(url, events)
    workers = Workers(
        directory, url, "tests.faults.app:jobs", env={"TIDINGS_TEST_JOB_S": str(job_s)}
    )
    total = 2 * events
    killed_at: list[int] = []
    try:
        for k in range(1, kills + 1):
            victim = workers.start(concurrency=concurrency)
            goal = total * k // (kills + 1)
            await workers.wait_until(
                _at_least(goal),
                f"{goal} distinct deliveries",
                timeout_s=timeout_s,
                alive=victim,
            )
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed_at.append(len(workers.lines()))
        survivor = workers.start(concurrency=concurrency)
        await workers.ready(kills + 1)
        try:
            await workers.wait_until(
                _at_least(total),
                "every delivery made",
                timeout_s=timeout_s,
                alive=survivor,
            )
        except AssertionError as exc:
            # Counted below as lost: the figures say how many.
            print(exc)
        assert workers.stop(survivor) == 0, workers.logs()[-3000:]
    finally:
        workers.reap()
    seen = collections.Counter((tag, n) for tag, n, *_ in workers.lines())
    expected = {(tag, str(n)) for tag in ("first", "second") for n in range(events)}
    return KillFigures(
        events=events,
        kills=kills,
        lost=len(expected - set(seen)),
        duplicates=sum(count - 1 for count in seen.values()),
        deliveries=sum(seen.values()),
        killed_at=killed_at,
        seconds=time.monotonic() - began,
    )
