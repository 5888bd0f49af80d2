"""Payload schemas: validated at emit and publish, rejected before anything is queued."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tidings import Bus, ConfigurationError, Event, PayloadError, listener
from tidings.contrib.pydantic import SchemaError


class UserCreated(BaseModel):
    id: int
    email: str
    plan: str = "free"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int


class Signup(BaseModel):
    __event_name__: ClassVar[str] = "user.signed_up"
    email: str = Field(pattern=r"^[^@]+@[^@]+$")
    age: int = Field(ge=0)


async def test_a_valid_payload_is_delivered_with_the_validated_values() -> None:
    seen: list[dict[str, object]] = []

    @listener("user.created")
    async def welcome(event: Event) -> None:
        seen.append(dict(event.kwargs))

    bus = Bus(listeners=[welcome])
    assert bus.schema("user.created", UserCreated) is UserCreated
    async with bus:
        bus.emit("user.created", id="7", email="ada@example.com")
        await bus.publish("user.created", id=8, email="bob@example.com", plan="pro")
        await bus.drain()
    # Coerced ("7" -> 7) and completed with the model's defaults.
    assert seen == [
        {"id": 7, "email": "ada@example.com", "plan": "free"},
        {"id": 8, "email": "bob@example.com", "plan": "pro"},
    ]


async def test_an_invalid_payload_raises_a_payload_error_and_nothing_is_queued() -> None:
    seen: list[int] = []

    @listener("user.created")
    async def welcome(id: int) -> None:
        seen.append(id)

    bus = Bus(listeners=[welcome])
    bus.schema("user.created", UserCreated)
    async with bus:
        with pytest.raises(PayloadError, match=r"'user.created'.*UserCreated.*id") as info:
            bus.emit("user.created", id="not a number", email="ada@example.com")
        error = info.value
        assert isinstance(error, SchemaError)
        assert error.event == "user.created"
        assert error.model is UserCreated
        assert [e["loc"] for e in error.errors] == [("id",)]
        assert error.errors[0]["type"] == "int_parsing"
        assert isinstance(error.__cause__, ValidationError)

        with pytest.raises(SchemaError, match="email"):
            await bus.publish("user.created", id=1)
        with pytest.raises(SchemaError, match="keyword arguments"):
            bus.emit("user.created", 1, "ada@example.com")
        assert bus.backend.stats()["pending"] == 0
        await bus.drain()
    assert seen == []


async def test_the_decorator_form_and_the_models_own_config() -> None:
    bus = Bus()

    @bus.schema("job.done")
    class JobDone(BaseModel):
        model_config = ConfigDict(extra="forbid")
        job: str

    assert JobDone.__name__ == "JobDone"
    bus.schema("strict", Strict)
    async with bus:
        bus.emit("job.done", job="backup")
        with pytest.raises(SchemaError, match="Extra inputs"):
            bus.emit("job.done", job="backup", surprise=True)
        with pytest.raises(SchemaError, match="Extra inputs"):
            bus.emit("strict", n=1, m=2)
        # Names without a schema are not checked.
        bus.emit("other", anything=object())


async def test_a_durable_bus_stores_only_validated_payloads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    seen: list[tuple[int, str]] = []

    @listener("user.created")
    async def welcome(id: int, plan: str) -> None:
        seen.append((id, plan))

    producer = Bus(url, listeners=[welcome], consume=False)
    producer.schema("user.created", UserCreated)
    async with producer:
        with pytest.raises(SchemaError):
            await producer.publish("user.created", id="x", email="a@b.c")
        await producer.publish("user.created", id="1", email="a@b.c")
        assert producer.backend.stats()["stored"] == 1
    worker = Bus(url, listeners=[welcome])
    worker.backend.poll_s = 0.01  # type: ignore[attr-defined]
    async with worker:
        await worker.drain()
    assert seen == [(1, "free")]


def test_a_schema_must_be_a_model_for_one_name() -> None:
    bus = Bus()
    with pytest.raises(ConfigurationError, match="pydantic model class"):
        bus.schema("user.created", dict)
    with pytest.raises(ConfigurationError, match="pattern"):
        bus.schema("user.*", UserCreated)


async def test_an_invalid_typed_event_never_reaches_the_queue() -> None:
    seen: list[Signup] = []

    @listener(Signup)
    async def on_signup(signup: Signup) -> None:
        seen.append(signup)

    async with Bus(listeners=[on_signup]) as bus:
        with pytest.raises(ValidationError):
            bus.emit(Signup(email="not an email", age=-1))
        assert bus.backend.stats()["pending"] == 0
        bus.emit(Signup(email="ada@example.com", age=36))
        await bus.drain()
    assert [s.email for s in seen] == ["ada@example.com"]


async def test_without_a_schema_emit_keeps_its_flat_path() -> None:
    bus = Bus()
    async with bus:
        assert bus._hot
        bus.schema("user.created", UserCreated)
        assert not bus._hot


async def test_one_positional_dict_is_validated_as_the_payload() -> None:
    seen: list[tuple[tuple[object, ...], dict[str, object]]] = []

    @listener("user.created")
    async def welcome(event: Event) -> None:
        seen.append((event.args, dict(event.kwargs)))

    bus = Bus(listeners=[welcome])
    bus.schema("user.created", UserCreated)
    async with bus:
        bus.emit("user.created", {"id": "7", "email": "ada@example.com"})
        await bus.publish("user.created", {"id": 8, "email": "bob@example.com", "plan": "pro"})
        with pytest.raises(SchemaError, match="id") as info:
            bus.emit("user.created", {"id": "x", "email": "c@example.com"})
        # Not a ValidationError itself (pydantic allows no subclass): chained to one.
        assert isinstance(info.value.__cause__, ValidationError)
        with pytest.raises(SchemaError, match="keyword arguments or one dict"):
            bus.emit("user.created", {"id": 1}, email="c@example.com")
        await bus.drain()
    assert seen == [
        ((), {"id": 7, "email": "ada@example.com", "plan": "free"}),
        ((), {"id": 8, "email": "bob@example.com", "plan": "pro"}),
    ]


def test_a_bare_schema_decorator_is_a_clear_error() -> None:
    bus = Bus()
    with pytest.raises(ConfigurationError, match=r"takes the event name first.*Bare"):

        @bus.schema
        class Bare(BaseModel):  # type: ignore[call-overload]
            id: int

    with pytest.raises(ConfigurationError, match="takes the event name first"):
        bus.schema(UserCreated)  # type: ignore[call-overload]
