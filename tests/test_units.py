from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from tidings._units import seconds
from tidings.errors import ConfigurationError, EmitError


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2, 2.0), (0.5, 0.5), (timedelta(milliseconds=250), 0.25), (-1, -1.0)],
)
def test_numbers_and_timedeltas_are_read_as_seconds(value: Any, expected: float) -> None:
    assert seconds(value, "x") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1", "timeout takes seconds or a timedelta, not '1'"),
        (True, "timeout takes seconds or a timedelta, not True"),
        (None, "timeout takes seconds or a timedelta, not None"),
        (float("nan"), "timeout must be a finite number of seconds, not nan"),
        (float("inf"), "timeout must be a finite number of seconds, not inf"),
        (10**400, "timeout must be a finite number of seconds"),
    ],
)
def test_anything_else_is_refused_by_name(value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        seconds(value, "timeout")


def test_the_caller_chooses_the_error() -> None:
    with pytest.raises(EmitError, match="delay="):
        seconds("soon", "delay=", error=EmitError)
