"""Finding the bus a command names."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from tidings import ConfigurationError
from tidings._loading import load_bus


def test_a_file_in_the_current_directory_never_shadows_an_installed_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tidings_loading_app.py").write_text(
        "from tidings import Bus\n\nbus = Bus()\n", encoding="utf-8"
    )
    # A module of the standard library, not imported yet, shadowed by a file here.
    (tmp_path / "colorsys.py").write_text("raise RuntimeError('shadowed')\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    monkeypatch.delitem(sys.modules, "tidings_loading_app", raising=False)

    bus = load_bus("tidings_loading_app:bus")

    assert type(bus).__name__ == "Bus"
    module = importlib.import_module("colorsys")  # the standard library's, not the file
    assert Path(module.__file__ or "").parent != tmp_path


def test_a_call_of_what_is_no_factory_is_refused_with_the_form_to_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tidings_loading_calls.py").write_text(
        "from tidings import Bus\n\nbus = Bus()\n\n\ndef make(url):\n    return Bus(url)\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tidings_loading_calls", raising=False)
    with pytest.raises(ConfigurationError, match="bus is a Bus, not a function to call"):
        load_bus("tidings_loading_calls:bus()")
    with pytest.raises(ConfigurationError, match="the factory must take no arguments"):
        load_bus("tidings_loading_calls:make()")
