"""Celery's wire format without a broker: `encode_task` and `decode_reply` (issue 16).

Checked against Celery's own code where it can say what Celery writes (``as_task_v2`` for the
task message, the result backend's ``_get_result_meta`` and ``encode`` for a reply), and
`decode_reply` is fuzzed: whatever bytes arrive, it returns an `Outcome` or None, or raises
`DecodeError` — nothing else.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import orjson
import pytest
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec

from aioqueue.errors import DecodeError
from aioqueue.message import Envelope, ErrorInfo, Outcome
from aioqueue.message.celery import (
    CeleryFields,
    decode_reply,
    decode_task,
    encode_reply,
    encode_task,
)

MAX = 1 << 20
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def celery_app() -> Celery:
    app = Celery("wire", broker="memory://", backend="rpc://")
    app.conf.update(result_serializer="json", task_serializer="json")
    return app


def new_task(**celery: Any) -> Envelope:
    return Envelope(
        id="abc123",
        task="tasks.add",
        args=(2, 3),
        kwargs={"z": [1, "x"]},
        reply_to="aioqueue.reply.client",
        deadline=celery.pop("deadline", None),
        celery=CeleryFields(**celery),
    )


def reply(meta: dict[str, Any], content_type: str | None = "application/json") -> Outcome | None:
    return decode_reply(
        orjson.dumps(meta),
        task_id="abc123",
        task_name="tasks.add",
        content_type=content_type,
        max_size=MAX,
    )


# -- encode_task ----------------------------------------------------------------------------


def test_a_new_task_has_every_header_celery_writes(celery_app: Celery) -> None:
    # Given the message Celery itself builds for the same call
    eta, expires = NOW + dt.timedelta(seconds=30), NOW + dt.timedelta(minutes=5)
    theirs = celery_app.amqp.as_task_v2(
        "abc123", "tasks.add", args=(2, 3), kwargs={"z": [1, "x"]}, eta=eta, expires=expires
    )
    # When aioqueue encodes it
    envelope = new_task(eta=eta.timestamp(), deadline=expires.timestamp())
    body, properties = encode_task(envelope, expiration=True)
    # Then it has the same headers (origin aside) with the same values, and the same body
    ours = properties.headers
    assert ours is not None
    assert set(ours) == set(theirs.headers)
    for key in set(theirs.headers) - {"origin", "eta", "expires"}:
        assert ours[key] == theirs.headers[key], key
    assert dt.datetime.fromisoformat(ours["eta"]) == eta
    assert dt.datetime.fromisoformat(ours["expires"]) == expires
    assert orjson.loads(body) == [[2, 3], {"z": [1, "x"]}, theirs.body[2]]
    assert properties.correlation_id == "abc123"
    assert properties.reply_to == "aioqueue.reply.client"
    assert properties.content_type == "application/json"
    assert properties.content_encoding == "utf-8"
    assert properties.delivery_mode == 2


@pytest.mark.parametrize(
    ("expires_in", "expiration", "ttl"),
    [
        (None, True, None),  # no expiry: no TTL
        (600.0, False, None),  # a message on its way through a delay queue: no TTL
        (-5.0, True, "0"),  # already expired: TTL 0, as Celery sends it
    ],
)
def test_the_amqp_expiration(expires_in: float | None, expiration: bool, ttl: str | None) -> None:
    deadline = None if expires_in is None else NOW.timestamp() + expires_in
    _, properties = encode_task(new_task(deadline=deadline), expiration=expiration)
    assert properties.expiration == ttl


def test_the_amqp_expiration_is_the_time_left_in_milliseconds() -> None:
    deadline = dt.datetime.now(dt.UTC).timestamp() + 60
    _, properties = encode_task(new_task(deadline=deadline), expiration=True)
    assert properties.expiration is not None
    assert 55_000 <= int(properties.expiration) <= 60_000


def test_ignore_result_is_a_header_and_no_reply_to_means_an_empty_one() -> None:
    envelope = Envelope(id="i", task="tasks.add", celery=CeleryFields(ignore_result=True))
    _, properties = encode_task(envelope, expiration=True)
    assert properties.headers is not None and properties.headers["ignore_result"] is True
    assert properties.reply_to == ""


def test_what_aioqueue_writes_celery_reads_back() -> None:
    # a new message read by aioqueue's own Celery reader: the same task, arguments and times
    eta, deadline = NOW.timestamp() + 30, NOW.timestamp() + 300
    body, properties = encode_task(new_task(eta=eta, deadline=deadline), expiration=True)
    envelope = decode_task(body, properties, max_size=MAX)
    assert (envelope.id, envelope.task, envelope.args) == ("abc123", "tasks.add", (2, 3))
    assert envelope.kwargs == {"z": [1, "x"]}
    assert envelope.deadline == pytest.approx(deadline, abs=1e-3)
    assert envelope.celery is not None
    assert envelope.celery.eta == pytest.approx(eta, abs=1e-3)
    assert envelope.reply_to == "aioqueue.reply.client"
    assert envelope.attempt == 1


# -- decode_reply ---------------------------------------------------------------------------


def test_celerys_own_success_reply(celery_app: Celery) -> None:
    backend = celery_app.backend
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    value = {"n": 5, "when": when, "amount": Decimal("1.10")}
    meta = backend._get_result_meta(result=value, state="SUCCESS", traceback=None, request=None)
    outcome = decode_reply(
        backend.encode(meta).encode(),
        task_id="t",
        task_name="tasks.add",
        content_type="application/json",
        max_size=MAX,
    )
    assert outcome == Outcome(task_id="t", task_name="tasks.add", value=value)


@pytest.mark.parametrize(
    ("exc", "kind", "type_name", "message"),
    [
        (ValueError("boom"), "error", "ValueError", "boom"),
        (KeyError("k"), "error", "KeyError", "k"),
        (ValueError("a", 2), "error", "ValueError", "'a', 2"),
        (RuntimeError(), "error", "RuntimeError", ""),
    ],
)
def test_celerys_own_failure_reply(
    celery_app: Celery, exc: Exception, kind: str, type_name: str, message: str
) -> None:
    backend = celery_app.backend
    result = backend.prepare_exception(exc)
    meta = backend._get_result_meta(result=result, state="FAILURE", traceback="TB", request=None)
    outcome = decode_reply(
        backend.encode(meta).encode(),
        task_id="t",
        task_name="tasks.add",
        content_type="application/json",
        max_size=MAX,
    )
    assert outcome is not None and outcome.error is not None
    assert (outcome.error.kind, outcome.error.type_name) == (kind, type_name)
    assert outcome.error.message == message
    assert outcome.error.traceback == "TB"


@pytest.mark.parametrize("exc_type", ["TimeLimitExceeded", "SoftTimeLimitExceeded"])
def test_a_time_limit_is_a_timeout(exc_type: str) -> None:
    result = {"exc_type": exc_type, "exc_message": [1.5], "exc_module": "billiard.exceptions"}
    outcome = reply({"status": "FAILURE", "result": result, "traceback": None})
    assert outcome is not None and outcome.error is not None
    assert (outcome.error.kind, outcome.error.type_name) == ("timeout", exc_type)
    assert outcome.error.message == "1.5"


def test_revoked_is_an_error_naming_task_revoked_error() -> None:
    result = {"exc_type": "TaskRevokedError", "exc_message": ["expired"], "exc_module": "c"}
    outcome = reply({"status": "REVOKED", "result": result})
    assert outcome is not None
    assert outcome.error == ErrorInfo("error", "TaskRevokedError", "expired", "", "c")


@pytest.mark.parametrize("status", ["PENDING", "RECEIVED", "STARTED", "RETRY", "PROGRESS"])
def test_states_on_the_way_are_not_an_outcome(status: str) -> None:
    result = {"exc_type": "Retry", "exc_message": ["Retry in 1s"], "exc_module": "celery"}
    assert reply({"status": status, "result": result}) is None


@pytest.mark.parametrize(
    ("meta", "content_type", "reason"),
    [
        ({"status": "SUCCESS", "result": 1}, "application/x-python-serialize", "result_serializer"),
        ({"status": "SUCCESS", "result": 1}, None, "result_serializer"),
        ({"status": "SUCCESS", "result": 1}, "application/x-yaml", "nothing is ever unpickled"),
        ([1, 2], "application/json", '"status"'),
        ({"result": 1}, "application/json", '"status"'),
        ({"status": 3}, "application/json", '"status"'),
        ({"status": "FAILURE", "result": "boom"}, "application/json", "no exception"),
        ({"status": "REVOKED", "result": None}, "application/json", "no exception"),
        ({"status": "FAILURE", "result": {"exc_type": 1}}, "application/json", "no exception"),
        (
            {"status": "SUCCESS", "result": {"__type__": "pickle", "__value__": "x"}},
            "application/json",
            "not one aioqueue reads",
        ),
        (
            {"status": "SUCCESS", "result": {"__type__": "decimal", "__value__": "one"}},
            "application/json",
            "cannot be read",
        ),
    ],
)
def test_unreadable_replies(meta: Any, content_type: str | None, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        reply(meta, content_type)


def test_a_reply_over_the_size_limit_is_refused_before_parsing() -> None:
    body = orjson.dumps({"status": "SUCCESS", "result": "x" * 100})
    with pytest.raises(DecodeError, match="over the limit"):
        decode_reply(body, task_id="t", task_name="n", content_type="application/json", max_size=50)


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(task_id="t", task_name="n", value={"a": [1, 2.5, None, "s"]}),
        Outcome(task_id="t", task_name="n", error=ErrorInfo("error", "ValueError", "boom", "tb")),
        Outcome(task_id="t", task_name="n", error=ErrorInfo("timeout", "TaskTimeoutError", "1s")),
    ],
)
def test_aioqueues_own_replies_read_back(outcome: Outcome) -> None:
    body, properties = encode_reply(outcome)
    back = decode_reply(
        body, task_id="t", task_name="n", content_type=properties.content_type, max_size=MAX
    )
    assert back is not None
    assert back.value == outcome.value
    if outcome.error is None:
        assert back.error is None
    else:
        assert back.error is not None
        assert back.error.kind == outcome.error.kind
        assert back.error.message == outcome.error.message


# -- fuzzing: DecodeError, an Outcome or None; nothing else -------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_kombu = st.fixed_dictionaries(
    {
        "__type__": st.sampled_from(["datetime", "date", "time", "decimal", "uuid", "bytes", "x"]),
        "__value__": _json,
    }
)
_status = st.sampled_from(["SUCCESS", "FAILURE", "REVOKED", "RETRY", "STARTED", "?"]) | _json
_meta = st.fixed_dictionaries(
    {"status": _status},
    optional={
        "result": _json
        | _kombu
        | st.fixed_dictionaries(
            {"exc_type": st.text() | _json},
            optional={"exc_message": _json, "exc_module": _json},
        ),
        "traceback": _json,
        "task_id": _json,
    },
)
_content_type = st.sampled_from(["application/json", "application/x-python-serialize", None])


def _check_decode(body: bytes, content_type: str | None) -> None:
    try:
        outcome = decode_reply(
            body, task_id="t", task_name="n", content_type=content_type, max_size=4096
        )
    except DecodeError:
        return
    assert outcome is None or isinstance(outcome, Outcome)


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=512), content_type=_content_type)
def test_fuzz_decode_reply_with_arbitrary_bytes(body: bytes, content_type: str | None) -> None:
    _check_decode(body, content_type)


@settings(max_examples=400, deadline=None)
@given(meta=_meta)
def test_fuzz_decode_reply_with_reply_shaped_json(meta: dict[str, Any]) -> None:
    _check_decode(orjson.dumps(meta), "application/json")


def test_properties_are_pamqp_properties() -> None:
    _, properties = encode_task(new_task(), expiration=True)
    assert isinstance(properties, spec.Basic.Properties)
