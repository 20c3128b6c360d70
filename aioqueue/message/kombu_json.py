"""kombu's typed JSON values (``kombu/utils/json.py``), read back as the objects kombu wrote.

kombu's JSON serializer wraps datetime, date, time, Decimal, UUID and bytes as
``{"__type__": ..., "__value__": ...}``. `typed` reads such a value (anywhere in a body) back as
that object; `conform_arguments` then fits a task's arguments to its annotations, or refuses
them. A part of Celery's wire format (`aioqueue.message.celery`), kept apart for its size.
"""

from __future__ import annotations

import base64
import inspect
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any, Final, get_type_hints

from ..errors import DecodeError

__all__ = ["aware", "conform_arguments", "typed"]


def aware(moment: datetime) -> datetime:
    """Celery writes aware times (``enable_utc``); a naive one is read as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# kombu/utils/json.py's typed values, read back as the objects kombu wrote
def typed(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [typed(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if value.keys() == {"__type__", "__value__"}:
        return _kombu_value(value["__type__"], value["__value__"], where)
    return {k: typed(v, f"{where}[{k!r}]") for k, v in value.items()}


def _kombu_value(kind: Any, raw: Any, where: str) -> Any:
    try:
        if kind == "datetime" and isinstance(raw, str):
            return aware(datetime.fromisoformat(raw))
        if kind == "date" and isinstance(raw, str):
            return datetime.fromisoformat(raw).date()
        if kind == "time" and isinstance(raw, str):
            return time.fromisoformat(raw)
        if kind == "decimal" and isinstance(raw, str):
            return Decimal(raw)
        if kind == "uuid" and isinstance(raw, dict) and isinstance(raw.get("hex"), str):
            return uuid.UUID(hex=raw["hex"])
        if kind == "bytes" and isinstance(raw, str):
            return raw.encode()
        if kind == "base64" and isinstance(raw, str):
            return base64.b64decode(raw.encode(), validate=True)
    except (ValueError, InvalidOperation, TypeError) as exc:
        message = f"{where}: kombu {kind!r} value {raw!r:.80} cannot be read: {exc}"
        raise DecodeError(message) from None
    raise DecodeError(
        f"{where}: kombu type {kind!r} with value {raw!r:.80} is not one aioqueue reads"
    )


def conform_arguments(
    fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fit kombu-typed arguments to the task's annotations.

    A datetime stays an aware datetime (or becomes its ISO string for a ``str`` parameter).
    A date, time, Decimal, UUID or bytes value becomes what its parameter's annotation asks
    for: that type itself, ``str``, or (Decimal) ``float``/``int``. With no annotation, or
    another one, it is refused with a `DecodeError` naming the argument — never passed on as
    something the task did not declare. Plain JSON values are left as they are.
    """
    if not _has_typed(args) and not _has_typed(kwargs):
        return tuple(args), dict(kwargs)
    signature = inspect.signature(fn)
    try:
        hints = get_type_hints(fn)
    except Exception:  # unresolvable annotations: as if there were none
        hints = {}
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise DecodeError(f"the arguments do not fit the task: {exc}") from None
    params = signature.parameters
    for name, value in list(bound.arguments.items()):
        kind = params[name].kind
        hint = hints.get(name)
        if kind is inspect.Parameter.VAR_POSITIONAL:
            bound.arguments[name] = tuple(_fit(v, hint, f"*{name}") for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            bound.arguments[name] = {k: _fit(v, hint, f"{k}") for k, v in value.items()}
        else:
            bound.arguments[name] = _fit(value, hint, name)
    return bound.args, bound.kwargs


_KOMBU_TYPES: Final = (datetime, date, time, Decimal, uuid.UUID, bytes)


def _has_typed(value: Any) -> bool:
    if isinstance(value, _KOMBU_TYPES):
        return True
    if isinstance(value, list | tuple):
        return any(_has_typed(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_typed(v) for v in value.values())
    return False


def _fit(value: Any, hint: Any, name: str) -> Any:
    if isinstance(value, datetime):
        return value.isoformat() if hint is str else value
    if not isinstance(value, _KOMBU_TYPES):
        if _has_typed(value):
            raise DecodeError(
                f"argument {name!r} holds a kombu-typed value (date, time, Decimal, UUID or "
                "bytes) inside a list or object: only a whole argument can be converted"
            )
        return value
    if hint is not None and isinstance(hint, type) and isinstance(value, hint):
        return value
    if hint is str:
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="strict")
        return value.isoformat() if isinstance(value, date | time) else str(value)
    if isinstance(value, Decimal) and hint is float:
        return float(value)
    if isinstance(value, Decimal) and hint is int and value == value.to_integral_value():
        return int(value)
    wanted = "no annotation" if hint is None else f"annotation {hint!r}"
    raise DecodeError(
        f"argument {name!r} is a {type(value).__name__} (kombu-typed JSON) and the task's "
        f"parameter has {wanted}: annotate it as {type(value).__name__} or str"
    )
