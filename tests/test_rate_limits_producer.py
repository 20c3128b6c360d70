"""A producer that knows a task's ``rate_limit`` publishes it straight to the holding queue.

The message waits in ``aioqueue.ratelimit.<task>`` with ``aioqueue-rate-queue`` naming its work
queue: the copy a worker's hold would have made, without the hop through the work queue. What
the producer cannot know about (a submit by name only, a delayed message) still goes to the work
queue and is held by the worker. On RabbitMQ and on the in-memory broker alike.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aioqueue import App, TaskCancelledError, chain
from aioqueue.message import H_PACED, H_RATE_QUEUE
from aioqueue.ratelimit import holding_queue_name
from tests.conftest import running_worker, wait_until
from tests.rabbit import RabbitNode
from tests.test_core import get_dead_letter

KEYS = {"k1": b"k" * 32}


async def waiting(app: App, queue: str) -> tuple[int | None, list[dict[str, Any]]]:
    """How many messages are ready in ``queue`` (None: no such queue), and their headers;
    they go back to the queue afterwards."""
    async with app.broker.hold(queue, 100) as held:
        if held is None:
            return None, []
        return held.ready, [dict(m.properties.headers or {}) for m in held.messages]


@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "signed"])
async def test_a_submit_waits_in_the_holding_queue_until_a_worker_paces_it(
    make_any_app: Any, queue_name: str, signing: bool
) -> None:
    # Given an app with a rate-limited task, and no worker running yet
    app: App = make_any_app(signing_keys=KEYS if signing else None)

    @app.task(name=f"{queue_name}.limited", rate_limit="50/s")
    async def limited(i: int) -> int:
        return i

    holding = holding_queue_name(limited.name)
    async with app:
        # When three are submitted
        handles = [await limited.submit(i) for i in range(3)]
        # Then they wait in the holding queue, each naming its work queue, none yet paced
        ready, headers = await waiting(app, holding)
        assert ready == 3
        assert [h[H_RATE_QUEUE] for h in headers] == [queue_name] * 3
        assert not any(H_PACED in h for h in headers)
        # and the work queue is declared (the pacer's target) but empty
        assert await waiting(app, queue_name) == (0, [])
        # And once a worker comes, its pacer lets them through and they run
        async with running_worker(app) as worker:
            assert [await h.result(timeout=30) for h in handles] == [0, 1, 2]
            pacer = worker.pacer
            assert pacer is not None
            # (the pacer counts a copy after its confirm: the run's reply may come first)
            await wait_until(lambda: pacer.paced == 3, timeout=30, what="three paced copies")
        assert (await waiting(app, holding))[0] == 0


async def test_a_submit_to_another_queue_is_paced_back_to_that_queue(
    make_any_app: Any, queue_name: str
) -> None:
    # Given a rate-limited task submitted to a queue other than its own, no worker yet
    app: App = make_any_app()
    other = f"{queue_name}.other"

    @app.task(name=f"{queue_name}.limited", rate_limit="50/s")
    async def limited(i: int) -> int:
        return i

    async with app:
        handle = await limited.submit_with_options(args=(5,), queue=other)
        # Then the held message names that queue
        ready, headers = await waiting(app, holding_queue_name(limited.name))
        assert ready == 1 and headers[0][H_RATE_QUEUE] == other
        # And a worker of that queue runs it once paced
        async with running_worker(app, queues=[other]):
            assert await handle.result(timeout=30) == 5


async def test_on_rabbitmq_the_queue_stats_show_the_task_in_the_holding_queue(
    make_app: Any, rabbit: RabbitNode, queue_name: str
) -> None:
    # Given an app with a rate-limited task, and no worker
    app: App = make_app()

    @app.task(name=f"{queue_name}.limited", rate_limit="10/s")
    async def limited() -> None: ...

    async with app:
        # When one is submitted
        await limited.submit()
        # Then RabbitMQ counts it in the holding queue, and none in the (declared) work queue
        stats = await asyncio.to_thread(rabbit.queue_stats)
        assert stats[holding_queue_name(limited.name)]["messages"] == 1
        assert stats[queue_name]["messages"] == 0


async def test_a_submit_by_name_only_is_held_by_the_worker(
    make_any_app: Any, queue_name: str
) -> None:
    # Given a client that does not register the rate-limited task, and no worker yet
    client: App = make_any_app()
    app: App = make_any_app()
    name = f"{queue_name}.limited"

    @app.task(name=name, rate_limit="50/s")
    async def limited(i: int) -> int:
        return i

    async with client, app:
        # When the client submits it by name
        handle = await client.submit(name, 7)
        # Then it goes to the work queue (the client does not know of the limit)
        assert (await waiting(client, queue_name))[0] == 1
        assert (await waiting(client, holding_queue_name(name)))[0] in (None, 0)
        # And a worker holds it, its pacer lets it through, and it runs
        async with running_worker(app) as worker:
            assert await handle.result(timeout=30) == 7
            pacer = worker.pacer
            assert pacer is not None
            await wait_until(lambda: pacer.paced == 1, timeout=30, what="one paced copy")


async def test_a_delayed_submit_is_held_by_the_worker_once_due(
    make_any_app: Any, queue_name: str
) -> None:
    # Given an app with a rate-limited task, and no worker yet
    app: App = make_any_app()

    @app.task(name=f"{queue_name}.limited", rate_limit="50/s")
    async def limited(i: int) -> int:
        return i

    async with app:
        # When one is submitted with a countdown
        handle = await limited.submit_with_options(args=(3,), countdown=0.2)
        # Then, once due, it comes out of the delay ladder into the work queue (unpaced)
        await wait_until(lambda: _ready_is(app, queue_name, 1), timeout=30, what="the due message")
        assert (await waiting(app, holding_queue_name(limited.name)))[0] in (None, 0)
        # And a worker holds it, then runs it at its turn
        async with running_worker(app) as worker:
            assert await handle.result(timeout=30) == 3
            pacer = worker.pacer
            assert pacer is not None
            await wait_until(lambda: pacer.paced == 1, timeout=30, what="one paced copy")


async def _ready_is(app: App, queue: str, count: int) -> bool:
    return (await waiting(app, queue))[0] == count


async def test_the_producer_declares_a_deleted_holding_queue_again(
    make_app: Any, rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a rate-limited task submitted once, and no worker (no pacer to declare anything)
    app: App = make_app()

    @app.task(name=f"{queue_name}.limited", rate_limit="10/s")
    async def limited(i: int) -> int:
        return i

    holding = holding_queue_name(limited.name)
    async with app:
        await limited.submit(1)
        # When someone deletes the holding queue (with what waited in it)
        await asyncio.to_thread(rabbit.ctl, "delete_queue", holding)
        # Then the next submit declares it again and is confirmed there
        handle = await limited.submit(2)
        stats = await asyncio.to_thread(rabbit.queue_stats)
        assert stats[holding]["messages"] == 1
        async with running_worker(app):
            assert await handle.result(timeout=30) == 2


async def test_a_task_cancelled_while_in_its_holding_queue_never_runs(
    make_any_app: Any, queue_name: str
) -> None:
    # Given a rate-limited task waiting in its holding queue, no worker yet
    app: App = make_any_app()
    ran: list[int] = []

    @app.task(name=f"{queue_name}.limited", rate_limit="50/s")
    async def limited(i: int) -> int:
        ran.append(i)
        return i

    async with app:
        handle = await limited.submit(1)
        assert (await waiting(app, holding_queue_name(limited.name)))[0] == 1
        # When it is cancelled, then a worker starts
        await handle.cancel()
        async with running_worker(app):
            # Then the pacer lets it through and the worker refuses it: the caller is told
            with pytest.raises(TaskCancelledError):
                await handle.result(timeout=30)
            # and other tasks run
            assert await (await limited.submit(2)).result(timeout=30) == 2
    assert ran == [2]
    dead = await get_dead_letter(app.broker_url, f"{queue_name}.dlq")
    assert dead.headers["aioqueue-dead-reason"] == "cancelled"


async def test_a_rate_limited_step_of_a_chain_is_paced(make_any_app: Any, queue_name: str) -> None:
    # Given a chain whose second step is rate-limited
    app: App = make_any_app()

    @app.task(name=f"{queue_name}.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name=f"{queue_name}.limited", rate_limit="50/s")
    async def limited(x: int) -> int:
        return x * 10

    async with app, running_worker(app) as worker:
        # When it runs
        handle = await chain(add.s(1, 2), limited.s()).submit()
        # Then the step went through the pacer (published to its holding queue by the worker
        # that finished the first step) and the chain's result comes
        assert await handle.result(timeout=30) == 30
        pacer = worker.pacer
        assert pacer is not None
        await wait_until(lambda: pacer.paced == 1, timeout=30, what="one paced copy")
