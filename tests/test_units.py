"""Pure logic, table-driven: codec, JSON checks, back-off, retry decisions, delay routing, URLs."""

from __future__ import annotations

import random
import types
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import aioqueue
from aioqueue import App, DecodeError, EncodeError, Retry, RetryPolicy
from aioqueue.message import MAX_DEPTH, Envelope, ErrorInfo, Outcome, check_json_native, loads
from aioqueue.retry import backoff, next_delay
from aioqueue.settings import mask_url, resolve_broker_url
from aioqueue.topology import (
    DELAY_LEVELS,
    MAX_DELAY,
    delay_ladder,
    delay_routing_key,
    delay_units,
    deliver_pattern,
)
from aioqueue.worker.lifecycle import split_prefetch
from aioqueue.worker.pipeline import judge


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


HEADERS = {"aioqueue-task": "t", "aioqueue-protocol": 1, "aioqueue-attempt": 1}


def test_public_names_are_complete_and_sorted() -> None:
    public = {
        name
        for name, value in vars(aioqueue).items()
        if name[0].isalpha() and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert public == set(aioqueue.__all__)
    assert aioqueue.__all__ == sorted(aioqueue.__all__)


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(2**63), 2**64 - 1, 1.5, "é", [], (1, "a"), {"a": [{"b": None}]}],
)
def test_json_native_values_pass(value: Any) -> None:
    check_json_native(value)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (object(), "object"),
        (b"x", "bytes"),
        ({1: 2}, "non-str key"),
        (float("inf"), "inf"),
        (float("nan"), "nan"),
        (2**64, "too large"),
        ({1, 2}, "set"),
        (
            [
                [
                    [
                        [
                            [
                                [
                                    [
                                        [
                                            [
                                                [
                                                    [
                                                        [
                                                            [
                                                                [
                                                                    [
                                                                        [
                                                                            [
                                                                                [
                                                                                    [
                                                                                        [
                                                                                            [
                                                                                                [
                                                                                                    [
                                                                                                        [
                                                                                                            [
                                                                                                                [
                                                                                                                    [
                                                                                                                        [
                                                                                                                            [
                                                                                                                                [
                                                                                                                                    [
                                                                                                                                        [
                                                                                                                                            [
                                                                                                                                                [
                                                                                                                                                    [
                                                                                                                                                        [
                                                                                                                                                            [
                                                                                                                                                                [
                                                                                                                                                                    [
                                                                                                                                                                        [
                                                                                                                                                                            [
                                                                                                                                                                                [
                                                                                                                                                                                    [
                                                                                                                                                                                        [
                                                                                                                                                                                            [
                                                                                                                                                                                                [
                                                                                                                                                                                                    [
                                                                                                                                                                                                        [
                                                                                                                                                                                                            [
                                                                                                                                                                                                                [
                                                                                                                                                                                                                    [
                                                                                                                                                                                                                        [
                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                                            []
                                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                ]
                                                                                                                                                                                                            ]
                                                                                                                                                                                                        ]
                                                                                                                                                                                                    ]
                                                                                                                                                                                                ]
                                                                                                                                                                                            ]
                                                                                                                                                                                        ]
                                                                                                                                                                                    ]
                                                                                                                                                                                ]
                                                                                                                                                                            ]
                                                                                                                                                                        ]
                                                                                                                                                                    ]
                                                                                                                                                                ]
                                                                                                                                                            ]
                                                                                                                                                        ]
                                                                                                                                                    ]
                                                                                                                                                ]
                                                                                                                                            ]
                                                                                                                                        ]
                                                                                                                                    ]
                                                                                                                                ]
                                                                                                                            ]
                                                                                                                        ]
                                                                                                                    ]
                                                                                                                ]
                                                                                                            ]
                                                                                                        ]
                                                                                                    ]
                                                                                                ]
                                                                                            ]
                                                                                        ]
                                                                                    ]
                                                                                ]
                                                                            ]
                                                                        ]
                                                                    ]
                                                                ]
                                                            ]
                                                        ]
                                                    ]
                                                ]
                                            ]
                                        ]
                                    ]
                                ]
                            ]
                        ]
                    ]
                ]
            ],
            "nested",
        ),
    ],
)
def test_non_json_values_raise_encode_error(value: Any, fragment: str) -> None:
    with pytest.raises(EncodeError, match=fragment) as info:
        check_json_native(value, "arg")
    assert isinstance(info.value, TypeError)


class _Str(str):
    pass


class _Int(int):
    pass


_ATOMS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.sampled_from([_Str("s"), _Int(3), b"bytes", 1j, object(), {1, 2}, 2**64, -(2**63) - 1]),
)
_VALUES = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=2), st.integers(0, 2)), inner, max_size=3),
    ),
    max_leaves=12,
)


@given(_VALUES, st.integers(min_value=0, max_value=4))
def test_the_fast_json_check_agrees_with_the_full_walk(value: Any, depth: int) -> None:
    from aioqueue.message.codec import _check

    def verdict(check: Any) -> str | None:
        try:
            check()
        except EncodeError as exc:
            return str(exc)
        return None

    # the same error (message and path) or none, whichever way the value is checked
    full = verdict(lambda: _check(value, "v", depth))
    assert verdict(lambda: check_json_native(value, "v", max_depth=depth)) == full


def test_envelope_round_trip_turns_tuples_into_lists_of_the_same_values() -> None:
    env = Envelope(
        id="i",
        task="t",
        args=(1, (2, 3)),
        kwargs={"k": "v"},
        reply_to="r",
        attempt=2,
        deadline=1700000000.123,
        scheduled_at=1700000001.5,
    )
    back = Envelope.decode(
        env.encode(), message_id="i", headers=env.headers(), reply_to="r", max_size=1000
    )
    assert back.args == (1, [2, 3]) and back.kwargs == {"k": "v"}
    assert (back.attempt, back.deadline, back.scheduled_at) == (2, 1700000000.123, 1700000001.5)


@pytest.mark.parametrize(
    ("body", "headers", "kwargs", "fragment"),
    [
        (b"{}", HEADERS, {"message_id": None}, "message_id"),
        (b"x" * 101, HEADERS, {}, "over the limit"),
        (b"{", HEADERS, {}, "not valid JSON"),
        (b'{"args": [], "kwargs": {}, "x": 1}', HEADERS, {}, "exactly"),
        (b'{"args": {}, "kwargs": {}}', HEADERS, {}, "must be an array"),
        (b'{"args": [], "kwargs": {}}', {**HEADERS, "aioqueue-attempt": 0}, {}, "positive"),
        (b'{"args": [], "kwargs": {}}', {**HEADERS, "aioqueue-task": 5}, {}, "not a string"),
        (b'{"args": [], "kwargs": {}}', {**HEADERS, "aioqueue-deadline": "soon"}, {}, "Unix"),
        (b'{"args": [], "kwargs": {}}', None, {}, "protocol"),
        (
            b'{"args": [], "kwargs": {}}',
            HEADERS,
            {"content_type": "application/x-pickle"},
            "content_type",
        ),
    ],
)
def test_envelope_decode_rejects(body: bytes, headers: Any, kwargs: Any, fragment: str) -> None:
    params = {"message_id": "i", "headers": headers, "max_size": 100, **kwargs}
    with pytest.raises(DecodeError, match=fragment):
        Envelope.decode(body, **params)


@given(
    st.binary(max_size=300),
    st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(), st.none())),
)
def test_decode_never_raises_anything_but_decode_error(body: bytes, headers: Any) -> None:
    try:
        Envelope.decode(body, message_id="i", headers={**HEADERS, **headers}, max_size=200)
    except DecodeError:
        pass


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome("i", "t", value={"x": [1, 2]}),
        Outcome("i", "t", error=ErrorInfo("timeout", "TaskTimeoutError", "slow", "tb")),
    ],
)
def test_outcome_round_trip(outcome: Outcome) -> None:
    assert Outcome.decode(outcome.encode(), task_id="i", max_size=1000) == outcome


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "expected"),
    [
        (1, 1.0, 60, 1.0),
        (2, 1.0, 60, 2.0),
        (3, 0.5, 60, 2.0),
        (7, 1.0, 60, 60.0),
        (200, 1.0, 5, 5.0),
        (1, 0.0, 5, 0.0),
    ],
)
def test_backoff_table(attempt: int, base: float, cap: float, expected: float) -> None:
    assert backoff(attempt, base=base, cap=cap) == expected


def test_backoff_jitter_stays_within_bounds_and_cap() -> None:
    rng = random.Random(7)
    values = [backoff(3, base=1.0, cap=4.5, jitter=0.25, rng=rng) for _ in range(500)]
    assert min(values) >= 3.0 and max(values) <= 4.5
    assert len(set(values)) > 100


@pytest.mark.parametrize(
    ("policy", "attempt", "exc", "expected"),
    [
        (RetryPolicy(max_attempts=3, backoff=1, jitter=0), 1, ValueError(), 1.0),
        (RetryPolicy(max_attempts=3, backoff=1, jitter=0), 2, ValueError(), 2.0),
        (RetryPolicy(max_attempts=3, backoff=1, jitter=0), 3, ValueError(), None),
        (RetryPolicy(max_attempts=3, retry_on=(KeyError,)), 1, ValueError(), None),
        (RetryPolicy(max_attempts=3, backoff=9, jitter=0), 1, Retry(delay=0.25), 0.25),
        (RetryPolicy(max_attempts=3, backoff=9, jitter=0), 1, Retry(), 9.0),
        (RetryPolicy(max_attempts=1), 1, Retry(delay=1), None),
    ],
)
def test_next_delay_table(
    policy: RetryPolicy, attempt: int, exc: BaseException, expected: float | None
) -> None:
    assert next_delay(policy, attempt, exc) == expected


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"backoff": -1}, {"jitter": 2}])
def test_retry_policy_validates(kwargs: Any) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("seconds", "units"),
    [(0.01, 1), (0.1, 1), (0.10001, 2), (0.3, 3), (1.5, 15), (30 * 86400, 25_920_000)],
)
def test_delay_units_round_up(seconds: float, units: int) -> None:
    assert delay_units(seconds) == units


def test_delay_bounds() -> None:
    assert MAX_DELAY >= 30 * 86400
    with pytest.raises(ValueError):
        delay_units(MAX_DELAY + 1)
    with pytest.raises(ValueError):
        delay_units(-1)


@given(st.integers(min_value=1, max_value=2**DELAY_LEVELS - 1))
def test_ladder_routing_waits_exactly_the_units(units: int) -> None:
    # Simulate the topic routing of the ladder: the time spent is the sum of the levels whose
    # queue the key routes into, and the message leaves for its own queue only.
    key = delay_routing_key("shop.emails", units)
    words = key.split(".")
    waited = 0
    for _exchange, _queue, args, to_queue, onward in delay_ladder("classic"):
        into_queue = _matches(to_queue, words)
        assert into_queue != _matches(onward, words)
        if into_queue:
            waited += args["x-message-ttl"]
    assert waited == units * 100
    assert _matches(deliver_pattern("shop.emails"), words)
    assert not _matches(deliver_pattern("emails"), words)
    assert not _matches(deliver_pattern("x.shop.emails"), words)


def _matches(pattern: str, words: list[str]) -> bool:
    """AMQP topic matching: * is one word, # zero or more."""
    parts = pattern.split(".")
    if not parts:
        return not words
    head, rest = parts[0], ".".join(parts[1:])
    if head == "#":
        return any(_matches(rest, words[i:]) if rest else True for i in range(len(words) + 1))
    if not words or (head != "*" and head != words[0]):
        return False
    return _matches(rest, words[1:]) if rest else len(words) == 1


@pytest.mark.parametrize("queue", ["a*b", "a#", "q" * 250])
def test_delay_refuses_queue_names_it_cannot_route(queue: str) -> None:
    with pytest.raises(ValueError):
        delay_routing_key(queue, 5)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@localhost/", "amqp://guest:****@localhost/"),
        ("amqps://u:p%40ss@h:5671/v?heartbeat=5", "amqps://u:****@h:5671/v?heartbeat=5"),
        ("amqp://localhost/", "amqp://localhost/"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_broker_url_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOQUEUE_BROKER_URL", raising=False)
    assert resolve_broker_url(None) == "amqp://guest:guest@localhost/"
    monkeypatch.setenv("AIOQUEUE_BROKER_URL", "amqp://env/")
    assert resolve_broker_url(None) == "amqp://env/"
    assert resolve_broker_url("amqp://arg/") == "amqp://arg/"


def test_app_repr_and_errors_never_show_the_password() -> None:
    app = aioqueue.App("x", broker_url="amqp://u:hunter2@h/")
    assert "hunter2" not in repr(app)


async def test_task_is_callable_locally_and_keeps_its_name() -> None:
    app = aioqueue.App("local", broker_url="amqp://nowhere/")

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="custom.mul", queue="slow", timeout=3)
    def mul(x: int, y: int) -> int:
        return x * y

    assert await add(2, 3) == 5 and mul(2, 3) == 6
    assert (
        add.name == "tests.test_units.test_task_is_callable_locally_and_keeps_its_name.<locals>.add"
    )
    assert (mul.name, mul.options.queue, mul.options.timeout) == ("custom.mul", "slow", 3)
    assert app.queues() == ["default", "slow"]
    with pytest.raises(ValueError, match="already registered"):
        app.task(name="custom.mul")(mul.fn)
    with pytest.raises(aioqueue.AioqueueError, match="not connected"):
        await add.submit(1, 2)


def test_orjson_is_what_goes_on_the_wire() -> None:
    env = Envelope(id="i", task="t", args=(1,), kwargs={})
    assert orjson.loads(env.encode()) == {"args": [1], "kwargs": {}}


def test_bind_checks_every_call_although_fitting_shapes_are_remembered() -> None:
    app = aioqueue.App("bind-shapes", broker_url="memory://bind-shapes")

    @app.task
    def f(a: int, b: int = 0, *, c: int = 0) -> int:
        return a + b + c

    for _ in range(2):  # the second round goes through the remembered shapes
        f.bind((1,), {})
        f.bind((1, 2), {"c": 3})
        with pytest.raises(TypeError, match="f"):
            f.bind((), {})
        with pytest.raises(TypeError):
            f.bind((1, 2, 3), {})
        with pytest.raises(TypeError):
            f.bind((1,), {"d": 1})
    f.bind((), {"a": 1})  # a new shape that fits
    with pytest.raises(TypeError):
        f.bind((1,), {"a": 1})  # the same names, another count: checked, and refused


@pytest.mark.parametrize(
    "headers",
    [
        {"aioqueue-task": "t", "aioqueue-attempt": 1, "aioqueue-protocol": 1},
        {"aioqueue-task": "t", "aioqueue-attempt": 3, "aioqueue-deadline": 1_700_000_000_123},
        {"flag": True},  # equal to 1 and hashing alike, but encoded as a boolean
        {"flag": 1},
        {"nested": {"a": [1, "b"]}, "n": None},  # unhashable: encoded without the cache
        {},
        None,
    ],
)
def test_task_properties_encode_exactly_as_pamqp(headers: dict[str, Any] | None) -> None:
    from datetime import UTC, datetime

    from pamqp import commands as spec

    from aioqueue.message import TaskProperties

    fields: dict[str, Any] = {
        "content_type": "application/json",
        "delivery_mode": 2,
        "message_id": "m" * 32,
        "correlation_id": "c" * 32,
        "reply_to": "aioqueue.reply.x",
        "headers": headers,
        "timestamp": datetime(2026, 11, 24, 10, 0, 1, tzinfo=UTC),
    }
    for _ in range(2):  # the second time through the header cache
        assert TaskProperties(**fields).marshal() == spec.Basic.Properties(**fields).marshal()
    assert TaskProperties(**fields, priority=3).marshal() == (
        spec.Basic.Properties(**fields, priority=3).marshal()
    )


_SHORT_TEXT = st.one_of(
    st.just(""),
    st.text(max_size=8),
    st.text(alphabet="é", min_size=120, max_size=140),  # 240-280 bytes: around the limit
    st.integers(0, 3),  # not a string: pamqp's own error
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "content_type": _SHORT_TEXT,
            "content_encoding": _SHORT_TEXT,
            "message_id": _SHORT_TEXT,
            "correlation_id": _SHORT_TEXT,
            "reply_to": _SHORT_TEXT,
            "expiration": _SHORT_TEXT,
            "type": _SHORT_TEXT,
            "user_id": _SHORT_TEXT,
            "app_id": _SHORT_TEXT,
            "delivery_mode": st.sampled_from([1, 2]),
            "priority": st.integers(0, 9),
            "headers": st.dictionaries(
                st.text(max_size=4), st.one_of(st.booleans(), st.integers(-5, 5), st.text())
            ),
        },
    )
)
def test_task_properties_marshal_exactly_as_pamqp_or_fail_alike(fields: dict[str, Any]) -> None:
    from pamqp import commands as spec

    from aioqueue.message import TaskProperties

    def outcome(cls: type[spec.Basic.Properties]) -> bytes | str:
        try:
            return cls(**fields).marshal()
        except Exception as exc:  # the same error type either way
            return type(exc).__name__

    assert outcome(TaskProperties) == outcome(spec.Basic.Properties)


@pytest.mark.parametrize(
    ("value", "deep"),
    [
        (_nested(MAX_DEPTH - 1), False),  # MAX_DEPTH levels, the outermost included
        (_nested(MAX_DEPTH), True),
        ([[] for _ in range(3 * MAX_DEPTH)], False),  # many brackets, shallow: walked, fine
        (["[{" * MAX_DEPTH], False),  # brackets inside a string are not nesting
        ({"a": _nested(MAX_DEPTH - 2)}, False),
        ({"a": _nested(MAX_DEPTH - 1)}, True),
    ],
)
def test_json_nested_past_the_limit_is_refused_and_only_that(value: Any, deep: bool) -> None:
    body = orjson.dumps(value)
    if deep:
        with pytest.raises(DecodeError, match="nested more than"):
            loads(body, max_size=10**6)
    else:
        assert loads(body, max_size=10**6) == value


@pytest.mark.parametrize(
    ("total", "queues", "shares"),
    [
        (1, 1, [1]),
        (100, 1, [100]),
        (4, 4, [1, 1, 1, 1]),
        (6, 4, [2, 2, 1, 1]),
        (10, 3, [4, 3, 3]),
        (100, 3, [34, 33, 33]),
    ],
)
def test_prefetch_is_split_exactly_remainders_first(
    total: int, queues: int, shares: list[int]
) -> None:
    assert split_prefetch(total, queues) == shares
    assert sum(shares) == total


@pytest.mark.parametrize(("total", "queues"), [(1, 4), (3, 4), (5, 0)])
def test_a_prefetch_that_cannot_give_each_queue_one_is_refused(total: int, queues: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        split_prefetch(total, queues)


# -- the verdict on a run: decided once, handed off and reported alike ------------------------

_FAILED = ErrorInfo("error", "ValueError", "boom")
_TIMED_OUT = ErrorInfo("timeout", "TimeoutError", "too slow")


@pytest.mark.parametrize(
    ("attempt", "error", "exc", "result", "retries"),
    [
        (1, None, None, "succeeded", False),
        (1, _FAILED, ValueError("boom"), "retried", True),
        (3, _FAILED, ValueError("boom"), "failed", False),  # the last attempt of 3
        (1, _FAILED, KeyError("no"), "failed", False),  # not in retry_on
        (1, _TIMED_OUT, None, "timeout", False),
        (2, _FAILED, Retry(delay=5.0), "retried", True),
        (3, _FAILED, Retry(delay=5.0), "failed", False),
    ],
)
def test_judge_decides_each_run_once(
    attempt: int, error: ErrorInfo | None, exc: BaseException | None, result: str, retries: bool
) -> None:
    # Given a run of attempt `attempt` under a policy of 3 attempts retrying ValueError
    policy = RetryPolicy(max_attempts=3, backoff=1.0, jitter=0.0, retry_on=(ValueError,))
    envelope = Envelope(id="t", task="x.y", attempt=attempt)
    outcome = Outcome(task_id="t", task_name="x.y", error=error)
    # When it is judged
    verdict = judge(envelope, outcome, exc, policy)
    # Then the one verdict says what happens and what observers hear
    assert verdict.result == result
    assert (verdict.retry_delay is not None) == retries
    assert (verdict.error is not None) == (result in ("failed", "timeout"))
    if isinstance(exc, Retry) and not retries:
        assert verdict.error is not None and "max_attempts=3" in verdict.error.message


@pytest.mark.parametrize("queue", ["reports", "a.b-c_d:e@f#g,h/i+j k", "x" * 251])
def test_a_queue_name_amqp_allows_is_taken(queue: str) -> None:
    app = App("names", broker_url="memory://names", default_queue=queue)

    @app.task(queue=queue)
    async def work() -> None: ...

    assert app.default_queue == queue and work.options.queue == queue


@pytest.mark.parametrize("queue", ["", "the boss's queue", "q*", "caf\u00e9", "x" * 252])
def test_a_queue_name_amqp_refuses_is_a_clear_error_when_defined(queue: str) -> None:
    with pytest.raises(ValueError, match="queue name"):
        App("names", broker_url="memory://names", default_queue=queue)
    app = App("names", broker_url="memory://names")
    with pytest.raises(ValueError, match="queue name"):
        app.task(queue=queue)
