from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from tidings._units import positive_seconds, positive_seconds_or_none, seconds
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


def test_a_positive_duration_is_more_than_0_seconds() -> None:
    assert positive_seconds(timedelta(milliseconds=250), "lease") == 0.25
    assert positive_seconds_or_none(2, "timeout") == 2.0
    assert positive_seconds_or_none(None, "timeout") is None
    for value in (0, -1, timedelta(0)):
        with pytest.raises(ConfigurationError, match="lease must be more than 0 seconds, not"):
            positive_seconds(value, "lease")
        with pytest.raises(ConfigurationError, match="timeout must be more than 0 seconds"):
            positive_seconds_or_none(value, "timeout")
    with pytest.raises(ConfigurationError, match="lease takes seconds or a timedelta"):
        positive_seconds("1", "lease")
