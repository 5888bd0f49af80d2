"""Event names and patterns."""

from __future__ import annotations

import pytest

from tidings import ConfigurationError
from tidings._patterns import is_pattern, matches, validate_name


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("user.created", "user.created", True),
        ("user.created", "user.deleted", False),
        ("user.*", "user.created", True),
        ("user.*", "user.created.email", False),
        ("user.*", "user", False),
        ("*.created", "user.created", True),
        ("*.created", "user.deleted", False),
        ("order_*", "order_paid", True),
        ("order_*", "order.paid", False),
        ("order_*", "invoice_paid", False),
        ("user.cre*", "user.created", True),
        ("**", "anything", True),
        ("**", "a.b.c", True),
        ("user.**", "user.created", True),
        ("user.**", "user.created.email", True),
        ("user.**", "user", True),
        ("user.**", "users.created", False),
        ("a.**.z", "a.z", True),
        ("a.**.z", "a.b.z", True),
        ("a.**.z", "a.b.c.z", True),
        ("a.**.z", "a.b.c", False),
        ("a.b", "a.b.c", False),
        ("log.*", "log.line\nbreak", True),
        ("*", "a\nb", True),
    ],
)
def test_matches(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected


@pytest.mark.parametrize("bad", ["", "user..created", ".user", "user.", 42, None])
def test_bad_names_are_configuration_errors(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="event name"):
        validate_name(bad)


def test_is_pattern() -> None:
    assert is_pattern("user.*")
    assert is_pattern("**")
    assert not is_pattern("user.created")
