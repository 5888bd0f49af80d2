"""Serialization with errors that name what cannot be serialized."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import pydantic
import pytest

from tidings import Event, PayloadError
from tidings.codec import check_serializable, decode_payload, encode_payload, revive_object


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Model(pydantic.BaseModel):
    name: str


def test_supported_values_round_trip_as_json() -> None:
    event = Event(
        "x",
        (1, "two"),
        {
            "when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            "id": uuid.UUID(int=1),
            "amount": Decimal("1.5"),
            "point": Point(1, 2),
            "model": Model(name="n"),
        },
    )
    args, kwargs, obj = decode_payload(encode_payload(event))
    assert args == (1, "two")
    assert kwargs["point"] == {"x": 1, "y": 2}
    assert kwargs["model"] == {"name": "n"}
    assert kwargs["amount"] == "1.5"
    assert obj is None


def test_errors_name_the_path_and_type() -> None:
    with pytest.raises(PayloadError, match=r"argument 'data'\['inner'\]\[1\] of type object"):
        check_serializable(Event("x", (), {"data": {"inner": [1, object()]}}))
    with pytest.raises(PayloadError, match="argument 0 of type function"):
        check_serializable(Event("x", (lambda: 1,)))
    with pytest.raises(ValueError, match="event 'x'"):
        check_serializable(Event("x", (), {"p": Point(1, object())}))  # type: ignore[arg-type]


def test_revive_and_bad_bytes() -> None:
    assert revive_object({"x": 1, "y": 2}, Point) == Point(1, 2)
    assert revive_object({"name": "n"}, Model) == Model(name="n")
    with pytest.raises(PayloadError, match="Point"):
        revive_object({"x": "nope"}, Point)
    with pytest.raises(PayloadError, match="cannot be decoded"):
        decode_payload(b"not json")


def test_msgpack_payloads_decode_like_json() -> None:
    event = Event("x", (1,), {"when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "p": Point(1, 2)})
    packed = encode_payload(event, "msgpack")
    assert packed[:1] != b"{"
    args, kwargs, _ = decode_payload(packed)
    assert args == (1,)
    assert kwargs["p"] == {"x": 1, "y": 2}
    assert kwargs["when"] == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(PayloadError, match="argument 'bad'"):
        encode_payload(Event("x", (), {"bad": object()}), "msgpack")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_float_is_refused_where_json_would_turn_it_into_none(value: float) -> None:
    with pytest.raises(PayloadError, match=r"argument 'v'\[1\]\['x'\] is .*JSON cannot carry"):
        encode_payload(Event("x", (), {"v": [1.0, {"x": value}]}))
    with pytest.raises(PayloadError, match=r"Point\.y|Point\['y'\]|JSON cannot carry"):
        encode_payload(Event("x", (), {}, obj=Point(x=1, y=value)))  # type: ignore[arg-type]
    # msgpack carries it as it is.
    (_, kwargs, _) = decode_payload(encode_payload(Event("x", (), {"v": value}), "msgpack"))
    assert repr(kwargs["v"]) == repr(value)


def test_none_and_the_word_null_still_round_trip() -> None:
    event = Event("x", (None,), {"v": None, "w": "null"})
    assert decode_payload(encode_payload(event)) == ((None,), {"v": None, "w": "null"}, None)
