"""A SQLite store that cannot be opened says so, and leaves no thread behind."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tidings import BackendError, Bus
from tidings.backends.sqlite import SQLiteBackend


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


async def test_a_path_that_is_a_directory_is_refused_with_no_thread_left(
    tmp_path: Path,
) -> None:
    before = set(threading.enumerate())
    bus = Bus(SQLiteBackend(tmp_path))
    with pytest.raises(BackendError, match="cannot open SQLite database"):
        await bus.start()
    assert _new_threads(before) == []


async def test_a_file_that_is_not_a_database_is_refused_with_no_thread_left(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.db"
    path.write_bytes(b"this is not a database\n" * 100)
    before = set(threading.enumerate())
    bus = Bus(SQLiteBackend(path))
    with pytest.raises(BackendError, match=r"cannot open SQLite database.*not a database"):
        await bus.start()
    assert _new_threads(before) == []
