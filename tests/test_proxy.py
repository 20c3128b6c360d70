"""Clients behind a TCP proxy that resets, blackholes and delays their connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aioqueue import App, PublishError, Settings
from tests.conftest import running_worker, wait_until
from tests.proxy import Proxy
from tests.rabbit import RabbitNode
from tests.test_reconnect import connection_of

HEARTBEAT = 2
# aiormq declares the peer dead after 3 * (heartbeat + 1) s without a frame, checked every
# heartbeat // 2 s (at least 1 s): the bound documented in docs/guarantees.md.
DETECTION_BOUND = 3 * (HEARTBEAT + 1) + max(1, HEARTBEAT // 2)


@pytest.fixture
async def proxy(rabbit: RabbitNode) -> AsyncIterator[Proxy]:
    async with Proxy(rabbit.port) as proxy:
        yield proxy


def echo_app(make_app: Callable[..., App], url: str, **settings: Any) -> tuple[App, Any]:
    app = make_app(broker_url=url, settings=Settings(**settings))

    @app.task(name="p.echo")
    async def echo(x: int) -> int:
        return x

    return app, echo


async def test_a_client_through_the_proxy_survives_resets_and_resumes(
    proxy: Proxy, make_app: Callable[..., App]
) -> None:
    # Given a worker and callers whose connection goes through the proxy, tasks in flight
    app = make_app(broker_url=proxy.url(make_app().broker_url))
    gate = asyncio.Event()

    @app.task(name="p.wait")
    async def wait(x: int) -> int:
        await gate.wait()
        return x

    async with app, running_worker(app) as worker:
        pending = [await wait.submit(i) for i in range(20)]
        await wait_until(lambda: worker.statistics().running == 20, what="20 running")
        # When every connection is reset (RST) twice
        for _ in range(2):
            linked = proxy.linked
            assert proxy.reset() >= 1
            # a reconnect is a new link to the broker, not only an accepted client socket:
            # the next reset must find it
            await proxy.wait_linked(after=linked)
        gate.set()
        # Then the callers get every result, and new submits work
        assert await asyncio.gather(*(h.result(timeout=60) for h in pending)) == list(range(20))
        assert await (await wait.submit(99)).result(timeout=60) == 99


async def test_a_publish_into_a_blackhole_raises_publish_error_at_its_deadline(
    proxy: Proxy, make_app: Callable[..., App], rabbit: RabbitNode
) -> None:
    # Given a connected client behind the proxy with a 3 s publish deadline
    app, echo = echo_app(make_app, proxy.url(rabbit.url), publish_timeout=3)
    async with app:
        await echo.submit_with_options(args=(0,), ignore_result=True)
        # When the network swallows everything
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(PublishError):
            await asyncio.wait_for(echo.submit(1), 30)
        # Then the submit fails at its deadline, not later
        assert time.monotonic() - started < 3 + 2
        proxy.passthrough()
        # and once the network is back, submitting works again
        await wait_until(lambda: proxy.mode == "pass", what="pass")
        handle = await echo.submit_with_options(args=(2,), ignore_result=True)
        assert handle.id


async def test_a_publish_into_a_blackhole_completes_when_the_network_returns(
    proxy: Proxy, make_app: Callable[..., App], rabbit: RabbitNode
) -> None:
    # Given a client behind the proxy, and a worker connected directly
    app, echo = echo_app(make_app, proxy.url(rabbit.url))
    worker_app = make_app()
    worker_app.register(echo)
    async with app, worker_app, running_worker(worker_app):
        assert await (await echo.submit(1)).result(timeout=30) == 1
        # When a submit starts while the network swallows everything
        proxy.blackhole()
        submit = asyncio.ensure_future(echo.submit(2))
        done, _ = await asyncio.wait({submit}, timeout=1.0)
        assert not done, "a submit returned without a confirm"
        # Then it completes when the network returns, and its result arrives
        proxy.passthrough()
        handle = await asyncio.wait_for(submit, app.settings.publish_timeout)
        assert await handle.result(timeout=60) == 2


async def test_heartbeats_detect_a_blackholed_connection_within_the_bound(
    proxy: Proxy, make_app: Callable[..., App], rabbit: RabbitNode
) -> None:
    # Given a client behind the proxy with a short heartbeat, and a worker connected directly
    app, echo = echo_app(make_app, proxy.url(rabbit.url) + f"?heartbeat={HEARTBEAT}")
    worker_app = make_app()
    worker_app.register(echo)
    async with app, worker_app, running_worker(worker_app):
        assert await (await echo.submit(1)).result(timeout=30) == 1
        connection = connection_of(app)
        # When the network silently swallows everything (no FIN, no RST)
        proxy.blackhole()
        started = time.monotonic()
        # Then the client declares the connection dead within the documented bound
        await wait_until(
            lambda: not connection.connected.is_set(),
            timeout=DETECTION_BOUND + 5,
            what="the dead connection to be noticed",
        )
        noticed = time.monotonic() - started
        assert 2 * HEARTBEAT <= noticed <= DETECTION_BOUND + 2, noticed  # + scheduling slack
        # and reconnects once the network returns; results flow again
        proxy.passthrough()
        await wait_until(lambda: connection.connected.is_set(), timeout=60, what="reconnect")
        assert await (await echo.submit(2)).result(timeout=60) == 2
    print(f"\nheartbeat {HEARTBEAT}s: blackholed connection noticed after {noticed:.1f}s")


async def test_a_slow_network_delays_but_loses_nothing(
    proxy: Proxy, make_app: Callable[..., App], rabbit: RabbitNode
) -> None:
    # Given a worker and callers whose every packet is 50 ms late
    app, echo = echo_app(make_app, proxy.url(rabbit.url))
    async with app, running_worker(app):
        proxy.delay(0.05)
        # When tasks flow
        handles = await asyncio.gather(*(echo.submit(i) for i in range(100)))
        # Then every one of them comes back
        assert await asyncio.gather(*(h.result(timeout=60) for h in handles)) == list(range(100))


async def test_publishes_caught_by_a_reset_complete_soon_after_not_at_their_deadline(
    proxy: Proxy, make_app: Callable[..., App], rabbit: RabbitNode
) -> None:
    # Given bursts of publishes through the proxy, each cut by a reset at a different moment
    # (aiormq can leave a publish blocked on the dead connection, holding the channel lock)
    app = make_app(broker_url=proxy.url(rabbit.url), settings=Settings(publish_timeout=60))
    async with app:
        for burst in range(8):
            submits = [asyncio.ensure_future(app.submit("p.none", i)) for i in range(300)]
            await asyncio.wait(submits, timeout=0.02 + 0.04 * burst)
            proxy.reset()
            # Then every one of them is confirmed within seconds of the reconnect
            _, pending = await asyncio.wait(submits, timeout=20)
            for submit in pending:
                submit.cancel()
            assert not pending, f"burst {burst}: {len(pending)} publishes still waiting"
            await asyncio.gather(*submits)
