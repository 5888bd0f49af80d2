"""Sync listeners that run in worker processes: ``@listener(..., executor="process")``,
for CPU-bound work that would hold the GIL in a thread.

The call is made from the bus's thread pool as for any sync listener, so retries,
timeouts and dead letters are the same: the thread hands the call to a pool of worker
processes and waits for its result. A worker process finds the function by its module
and qualified name (the function itself is never pickled), so it must be defined at
the top level of an importable module; its arguments and what it raises are pickled.

The pool is shared by the process's buses, started (with ``spawn``, which is safe in a
process with threads) at the first such delivery, and stopped when the process exits.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import select
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import msgspec

from tidings.errors import ConfigurationError
from tidings.events import Event

__all__ = ["InProcess", "check", "shutdown"]

_pool: ProcessPoolExecutor | None = None
_lock = threading.Lock()


def check(
    fn: Callable[..., Any], qualname: str, *, is_async: bool, inline: bool, injected: bool
) -> None:
    """Raise ``ConfigurationError`` unless a worker process can find and run ``fn``."""
    what = f"listener {qualname} runs in a process pool (executor='process')"
    if injected:
        raise ConfigurationError(f"{what}, where its injected dependencies cannot follow it")
    if is_async:
        raise ConfigurationError(f"{what}, which is for sync functions: it is async")
    if inline:
        raise ConfigurationError(f"{what} and inline, on the event loop: choose one")
    if not isinstance(fn, types.FunctionType):
        raise ConfigurationError(
            f"{what}, where it is imported by name: it must be a function defined at the "
            f"top level of a module, not {type(fn).__name__} {fn!r}"
        )
    if "<" in fn.__qualname__:  # <lambda>, <locals>
        raise ConfigurationError(
            f"{what}, where it is imported by name: it must be defined at the top level "
            f"of a module, not inside a function or as a lambda ({fn.__qualname__})"
        )


class InProcess:
    """Calls a function in a worker process and returns its result (or raises what it
    raised), blocking the calling thread meanwhile."""

    __slots__ = ("fn", "found", "module", "name", "qualname")

    def __init__(self, fn: Callable[..., Any], qualname: str) -> None:
        self.fn = fn
        self.qualname = qualname
        self.module: str = fn.__module__
        self.name: str = fn.__qualname__
        self.found = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.found:
            # Checked here, once: at registration its module was still being imported.
            try:
                target = _resolve(self.module, self.name)
            except (ImportError, AttributeError) as exc:
                target = exc
            if target is not self.fn and getattr(target, "fn", None) is not self.fn:
                raise ConfigurationError(
                    f"listener {self.qualname} runs in a process pool, where it is found by "
                    f"its name, but {self.module}.{self.name} does not name it"
                )
            self.found = True
        args = tuple(_portable(a) for a in args)
        kwargs = {k: _portable(v) for k, v in kwargs.items()}
        return _get_pool().submit(_call, self.module, self.name, args, kwargs).result()


def _portable(value: Any) -> Any:
    """``value``, made picklable if it is the envelope (whose empty headers are a
    read-only view, which pickle refuses), with its id."""
    if isinstance(value, Event) and not isinstance(value.headers, dict):
        return msgspec.structs.replace(value, _id=value.id, headers=dict(value.headers))
    return value


def _resolve(module: str, name: str) -> Any:
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def _call(module: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run in a worker process: the listener (or its function) named, called."""
    return _resolve(module, name)(*args, **kwargs)


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            if _pool is None:
                _pool = ProcessPoolExecutor(
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_watch_parent,
                    initargs=(os.getpid(),),
                )
            pool = _pool
    return pool


def _watch_parent(parent: int) -> None:
    """Run in each worker process: exit when the process that started it is gone. A
    parent killed outright (SIGKILL, or SIGTERM with no handler) never tells its
    workers, which would wait for calls forever."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent)  # Linux: readable once the parent has exited
        except (AttributeError, OSError):
            while os.getppid() == parent:
                time.sleep(1.0)
        else:
            select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="tidings-parent-watch", daemon=True).start()


def shutdown() -> None:
    """Stop the worker processes (waiting for the calls they run); the next call starts
    new ones."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
