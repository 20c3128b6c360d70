"""A broker URL naming several nodes: parsing, masking, and failover on connect and reconnect.

The cluster itself (three joined nodes, one killed) is in ``tests/cluster/``; here one real node
stands beside addresses where nothing listens, which is what a dead cluster node looks like to
a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import pytest
from yarl import URL

from aioqueue import App, BrokerConnectionError, Settings
from aioqueue.rabbit.connection import NodeRing
from aioqueue.settings import broker_nodes, mask_url, scrub
from tests.conftest import WorkerProcess, wait_until
from tests.rabbit import RabbitNode, free_port

A = "amqp://u:s3cret@rabbit1:5672/prod"
B = "amqp://u:s3cret@rabbit2:5673/prod"


def dead_node() -> str:
    """The URL of a node that is down: nothing listens on its port."""
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/"


# -- parsing and masking ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "nodes"),
    [
        (A, (A,)),
        (f"{A},{B}", (A, B)),
        (f" {A} , {B} ", (A, B)),
        ("amqps://u:p@h1/,amqps://u:p@h2:5671/", ("amqps://u:p@h1/", "amqps://u:p@h2:5671/")),
    ],
)
def test_a_broker_url_names_one_node_or_a_comma_separated_list(
    url: str, nodes: tuple[str, ...]
) -> None:
    assert broker_nodes(url) == nodes


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        (f"{A},", "expected amqp://"),
        (f"{A},,{B}", "expected amqp://"),
        ("http://u:s3cret@h/", "expected amqp://"),
        (f"{A},amqp://u:other@rabbit2/prod", "only host and port may differ"),
        (f"{A},amqp://u:s3cret@rabbit2/test", "only host and port may differ"),
        (f"{A},amqps://u:s3cret@rabbit2/prod", "only host and port may differ"),
        (f"{A},amqp://u:s3cret@rabbit2:99999/prod", "unparsable"),
    ],
)
def test_a_malformed_node_list_is_refused_with_passwords_masked(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as info:
        broker_nodes(url)
    assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match=complaint):
        App("bad", broker_url=url)  # at construction, not at the first connect


def test_every_password_of_a_list_is_masked() -> None:
    assert mask_url(f"{A},{B}") == "amqp://u:****@rabbit1:5672/prod,amqp://u:****@rabbit2:5673/prod"
    text = "failed: amqp://u:s3cret@rabbit2:5673/prod?heartbeat=15 and u:s3cret@rabbit1"
    assert "s3cret" not in scrub(text, f"{A},{B}")
    assert "u:****@rabbit2:5673" in scrub(text, f"{A},{B}")


def test_the_ring_starts_at_a_random_node_and_visits_every_node_in_turn() -> None:
    nodes = [URL(f"amqp://h{i}/") for i in range(3)]
    starts: Counter[str] = Counter()
    for _ in range(300):
        ring = NodeRing(nodes)
        first = [ring.next() for _ in range(3)]
        assert sorted(map(str, first)) == sorted(map(str, nodes))  # each once per round
        assert [ring.next() for _ in range(3)] == first  # then the same order again
        starts[str(first[0])] += 1
    assert set(starts) == {str(n) for n in nodes}  # clients spread over the cluster
    assert min(starts.values()) > 50


# -- failover against a real node ------------------------------------------------------------


async def test_a_client_connects_past_dead_nodes_and_back_after_losing_its_connection(
    rabbit: RabbitNode, queue_name: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # Given a worker and a client whose broker URL names two dead nodes and the live one
    url = ",".join([dead_node(), rabbit.url, dead_node()])
    worker = spawn_worker(env={"AIOQUEUE_BROKER_URL": url})
    await worker.wait_ready()
    app = App("node-list", broker_url=url, default_queue=queue_name)
    async with app:
        assert await (await app.submit("tests.add", 1, 2)).result(timeout=60) == 3
        # When every connection is closed by the broker, twice
        for _ in range(2):
            await asyncio.to_thread(rabbit.close_all_connections)
            # Then both find the live node again, whatever node their ring tries first
            handle = await app.submit("tests.add", 20, 22)
            assert await handle.result(timeout=60) == 42
    assert worker.proc.poll() is None


async def test_the_worker_cli_takes_a_node_list(
    rabbit: RabbitNode, queue_name: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker("--broker-url", f"{dead_node()},{rabbit.url}")
    await worker.wait_ready()
    async with App("cli-list", broker_url=rabbit.url, default_queue=queue_name) as app:
        assert await (await app.submit("tests.add", 2, 2)).result(timeout=60) == 4
    await wait_until(lambda: "127.0.0.1" in worker.output(), what="the worker's banner")
    assert "guest:guest" not in worker.output()  # the banner masks every node's password


async def test_no_node_reachable_is_a_clear_error_naming_every_node_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    nodes = [f"amqp://user:hunter2@127.0.0.1:{free_port()}/" for _ in range(3)]
    app = App("none", broker_url=",".join(nodes), settings=Settings(connect_timeout=1))
    with pytest.raises(BrokerConnectionError, match="cannot reach the broker") as info:
        await app.connect()
    for node in nodes:
        assert mask_url(node) in str(info.value)
    for text in (repr(app), str(info.value), caplog.text):
        assert "hunter2" not in text
