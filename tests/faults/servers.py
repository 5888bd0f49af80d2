"""Private broker servers a test may kill and restart: never the machine's shared ones.

Each runs on a free loopback port, with its data in a directory of the test's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import pytest


class Server(Protocol):
    """A broker server the test owns: started, killed outright, started again."""

    port: int

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""

    def kill(self) -> None:
        """SIGKILL the server: a crash, not a shutdown."""


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is not installed; CI needs it", pytrace=False)
    pytest.skip(f"{what} is not installed")


class RedisServer:
    """A private redis-server; ``persistent`` writes every command to an append-only
    file (fsync always), otherwise it keeps nothing across a restart. ``options`` are
    more of redis-server's arguments."""

    def __init__(self, directory: Path, *options: str, persistent: bool = True) -> None:
        self.directory = directory
        self.options = options
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        if not self.persistent:
            persistence = ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                *persistence,
                "--save",
                "",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("the private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@contextmanager
def redis_server(directory: Path, *options: str, persistent: bool = True) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, killed on exit (skips when redis-server is missing)."""
    if shutil.which("redis-server") is None:
        _missing("redis-server")
    server = RedisServer(directory, *options, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A PostgreSQL cluster of the test's own, in a temporary directory, on a free port."""

    def __init__(self, directory: Path, bin_dir: Path) -> None:
        self.data = directory / "data"
        self.bin = bin_dir
        self.port = free_port()
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.user:
            shutil.chown(directory, "postgres")
        subprocess.run(
            [
                *self.user,
                str(bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *self.user,
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("the private PostgreSQL did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGKILL the postmaster: a crash, not a shutdown. Its backends notice and
            # exit; the next start recovers from the write-ahead log.
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            self.proc.wait()
            # Its orphaned backends exit once they notice; a start before that finds
            # their shared memory still in use.
            time.sleep(0.5)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started :class:`PostgresServer`, killed and deleted on exit (skips when
    PostgreSQL's binaries are missing)."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        _missing("PostgreSQL's initdb")
        raise AssertionError("unreachable")
    # Not under pytest's tmp_path: the server's user (postgres, when the tests run as
    # root) must be able to reach it.
    directory = Path(tempfile.mkdtemp(prefix="tidings-pg-"))
    try:
        server = PostgresServer(directory, bin_dir)
        server.start()
        try:
            yield server
        finally:
            server.kill()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
