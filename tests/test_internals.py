"""Every private part of aio-pika, aiormq and pamqp we rely on is still there (no broker)."""

from __future__ import annotations

import aio_pika
import aiormq
import pamqp

from aioqueue.rabbit.internals import INTERNALS, Internal, missing


def test_every_internal_we_rely_on_exists_in_the_installed_libraries() -> None:
    gone = missing()
    assert not gone, (
        f"aio-pika {aio_pika.__version__} / aiormq {aiormq.__version__} / pamqp "
        f"{pamqp.__version__} no longer have what aioqueue.rabbit relies on:\n  "
        + "\n  ".join(gone)
    )


def test_the_check_notices_a_missing_one() -> None:
    # Given an internal that no library has, then it is reported, by name
    ghost = Internal(aiormq.Channel, "no_such_thing", "attribute", "nothing")
    assert not ghost.present()
    assert "no_such_thing" in str(ghost)
    assert len(INTERNALS) >= 15
