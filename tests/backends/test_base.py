"""What every backend shares: URLs as they are shown, and the backend a URL names."""

from __future__ import annotations

import pytest

from tidings import BackendError, Bus, ConfigurationError
from tidings.backends._options import redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@localhost:1/0", "redis://user:***@localhost:1/0"),
        ("redis://:hunter2@localhost/0", "redis://:***@localhost/0"),
        (
            "redis://h/0?password=hunter2&prefix=app&api_key=k1&token=t1",
            "redis://h/0?password=***&prefix=app&api_key=***&token=***",
        ),
        (
            "postgresql://app@db/app?sslpassword=hunter2&secret=s&pass=p&schema=events",
            "postgresql://app@db/app?sslpassword=***&secret=***&pass=***&schema=events",
        ),
        ("sqlite:///events.db?key=hunter2", "sqlite:///events.db?key=***"),
        ("sqlite:///events.db?poll_s=0.1", "sqlite:///events.db?poll_s=0.1"),
        ("memory://", "memory://"),
    ],
)
def test_credentials_are_never_shown(url: str, shown: str) -> None:
    assert redact(url) == shown


async def test_a_bus_shows_no_credential_in_its_url_repr_or_connection_error() -> None:
    url = "redis://user:hunter2@127.0.0.1:1/0?password=s3cret&socket_timeout=1"
    with pytest.raises(ConfigurationError, match="unknown option 'token'") as refused:
        Bus(f"{url}&token=t0ken")
    assert "t0ken" not in str(refused.value)
    bus = Bus(url)
    for text in (bus.url, repr(bus.backend), repr(bus)):
        assert "hunter2" not in text
        assert "s3cret" not in text
    with pytest.raises(BackendError) as raised:
        await bus.start()
    message = str(raised.value)
    assert "127.0.0.1:1" in message
    for secret in ("hunter2", "s3cret", "t0ken"):
        assert secret not in message


def test_the_tests_keep_off_the_redis_database_apps_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from .. import services

    monkeypatch.delenv("TIDINGS_TEST_REDIS", raising=False)
    fresh = importlib.reload(services)
    try:
        assert fresh.REDIS_URL == "redis://127.0.0.1:6379/15"
    finally:
        monkeypatch.undo()
        importlib.reload(services)
