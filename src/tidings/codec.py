"""Serialization of payloads with msgspec (JSON by default), with errors that name the
argument that cannot be serialized. Never pickle."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import msgspec

from tidings.errors import PayloadError
from tidings.events import Event

__all__ = [
    "CODECS",
    "MAX_DEPTH",
    "as_stored",
    "check_serializable",
    "converter",
    "decode_payload",
    "encode_payload",
    "revive_object",
]


def _enc_hook(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # pydantic models, without importing pydantic
    if callable(dump):
        return dump(mode="json")
    raise NotImplementedError(type(value))


_json = msgspec.json.Encoder(enc_hook=_enc_hook)
_msgpack = msgspec.msgpack.Encoder(enc_hook=_enc_hook)

#: The formats a durable backend may store payloads in.
CODECS = ("json", "msgpack")

#: How many levels a stored payload may nest (its outer mapping and its ``args`` list
#: are two of them): deeper data could exhaust a reader's stack.
MAX_DEPTH = 100

# msgpack's map and array headers; a payload has fewer containers than these bytes.
_NOT_MSGPACK_CONTAINERS = bytes(
    b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF)
)


def _may_be_too_deep(data: bytes) -> bool:
    """Whether ``data`` holds enough container openings to nest past MAX_DEPTH (a cheap
    bound: most payloads are told apart without reading them)."""
    if data[:1] == b"{":
        return data.count(b"[") + data.count(b"{") > MAX_DEPTH
    return len(data.translate(None, _NOT_MSGPACK_CONTAINERS)) > MAX_DEPTH


def _depth(value: Any) -> int:
    """How many containers nest in ``value``, at most (counted without recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _too_deep(what: str) -> PayloadError:
    return PayloadError(
        f"{what} nests deeper than {MAX_DEPTH} levels (tidings.codec.MAX_DEPTH), more than "
        "a reader can be sure to take; flatten it"
    )


def encode_payload(event: Event, codec: str = "json") -> bytes:
    """The event's payload as JSON (or msgpack) bytes.

    Raises:
        PayloadError: a value cannot be serialized; the message names its path and type.
    """
    payload = {"args": event.args, "kwargs": event.kwargs, "obj": event.obj}
    try:
        data = (_msgpack if codec == "msgpack" else _json).encode(payload)
    except RecursionError:
        raise _too_deep(f"the payload of event {event.name!r}") from None
    except (TypeError, NotImplementedError, OverflowError, ValueError) as exc:
        path, bad = _find(event)
        raise PayloadError(
            f"event {event.name!r}: {path} of type {type(bad).__qualname__} cannot be "
            f"serialized ({exc}); use JSON types, datetime, date, UUID, Decimal, enums, "
            "dataclasses, msgspec Structs or pydantic models"
        ) from exc
    if _may_be_too_deep(data):
        try:
            too_deep = _depth(_read(data)) > MAX_DEPTH
        except RecursionError:
            too_deep = True
        if too_deep:
            raise _too_deep(f"the payload of event {event.name!r}")
    # JSON writes NaN and the infinities as null: the listener would get None. A payload
    # with no null beyond the envelope's own has none of them (the common case, one scan).
    if codec != "msgpack" and data.count(b"null") > (event.obj is None):
        found = _non_finite(event)
        if found is not None:
            raise PayloadError(
                f"event {event.name!r}: {found[0]} is {found[1]!r}, which JSON cannot carry "
                "(it would arrive as None); send None or a string, or use codec=msgpack"
            )
    return data


def _non_finite(event: Event) -> tuple[str, float] | None:
    """Where the payload holds a NaN or an infinity, and which, if it does."""
    roots: list[tuple[str, Any]] = [(f"argument {i}", v) for i, v in enumerate(event.args)]
    roots += [(f"argument {k!r}", v) for k, v in event.kwargs.items()]
    if event.obj is not None:
        roots.append((type(event.obj).__qualname__, event.obj))
    stack = [(path, msgspec.to_builtins(value, enc_hook=_enc_hook)) for path, value in roots]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, value
        if isinstance(value, dict):
            stack.extend((f"{path}[{k!r}]", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


_decoder = msgspec.json.Decoder()
_msgpack_decoder = msgspec.msgpack.Decoder()


def decode_payload(data: bytes) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``(args, kwargs, obj)`` from :func:`encode_payload`'s bytes, in either format
    (a JSON payload starts with ``{``, a msgpack one never does).

    Raises:
        PayloadError: the bytes are not a payload this codec wrote, or nest too deeply.
    """
    try:
        raw = _read(data)
        if _may_be_too_deep(data) and _depth(raw) > MAX_DEPTH:
            raise _too_deep("a stored payload")
        return tuple(raw["args"]), raw["kwargs"], raw["obj"]
    except RecursionError:
        raise _too_deep("a stored payload") from None
    except (msgspec.DecodeError, KeyError, TypeError, IndexError) as exc:
        raise PayloadError(f"a stored payload cannot be decoded: {exc}") from exc


def _read(data: bytes) -> Any:
    return (_decoder if data[:1] == b"{" else _msgpack_decoder).decode(data)


def revive_object(data: Any, cls: type[Any]) -> Any:
    """Rebuild a typed event's object of class ``cls`` from its JSON form.

    Raises:
        PayloadError: the data does not fit the class.
    """
    try:
        validate = getattr(cls, "model_validate", None)  # pydantic
        if callable(validate):
            return validate(data)
        return msgspec.convert(data, cls, strict=False)
    except Exception as exc:
        raise PayloadError(f"stored {cls.__qualname__} event cannot be rebuilt: {exc}") from exc


def converter(annotation: Any) -> Callable[[Any], Any]:
    """A function that converts one stored value (read back from JSON or msgpack) to
    the type ``annotation`` names, strictly: what JSON writes for the type is read back
    (an ISO string for a ``datetime``, base64 for ``bytes``, a list for a ``set``), and
    nothing is coerced (``'42'`` and ``4.5`` are no ``int``). A pydantic model validates
    the value by its own rules.

    The function raises ``msgspec.ValidationError`` (or pydantic's) when the value does
    not fit.

    Raises:
        TypeError: msgspec cannot convert to this type.
    """
    validate = getattr(annotation, "model_validate", None)  # pydantic, not imported
    if callable(validate) and isinstance(annotation, type):
        return cast("Callable[[Any], Any]", validate)
    msgspec.inspect.type_info(annotation)  # a TypeError now, not at each delivery
    if annotation in (str, int, float, bool):
        # The common case, checked before msgspec is asked: the value is one already.
        return lambda value: (
            value if type(value) is annotation else msgspec.convert(value, annotation, strict=True)
        )
    return lambda value: msgspec.convert(value, annotation, strict=True)


def as_stored(value: Any) -> Any:
    """``value`` as a worker reads it back from a store that keeps JSON.

    Raises:
        PayloadError: the value cannot be serialized.
    """
    try:
        return _decoder.decode(_json.encode(value))
    except (TypeError, NotImplementedError, OverflowError, ValueError) as exc:
        raise PayloadError(f"{type(value).__qualname__} cannot be serialized ({exc})") from exc


def check_serializable(event: Event) -> None:
    """Raise ``PayloadError`` if the event's payload cannot be serialized."""
    encode_payload(event)


def _find(event: Event) -> tuple[str, Any]:
    roots: list[tuple[str, Any]] = [(f"argument {i}", v) for i, v in enumerate(event.args)]
    roots += [(f"argument {k!r}", v) for k, v in event.kwargs.items()]
    if event.obj is not None:
        roots.append((type(event.obj).__qualname__, event.obj))
    for path, value in roots:
        found = _walk(path, value)
        if found is not None:
            return found
    return "the payload", event.payload


def _ok(value: Any) -> bool:
    try:
        _json.encode(value)
    except (TypeError, NotImplementedError, OverflowError, ValueError):
        return False
    return True


def _walk(path: str, value: Any) -> tuple[str, Any] | None:
    if _ok(value):
        return None
    children: list[tuple[str, Any]] = []
    if isinstance(value, Mapping):
        children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, list | tuple | set | frozenset):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [(f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, msgspec.Struct):
        children = [(f"{path}.{n}", getattr(value, n)) for n in value.__struct_fields__]
    for child_path, child in children:
        found = _walk(child_path, child)
        if found is not None:
            return found
    return path, value
