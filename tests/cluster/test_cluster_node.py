"""The tests' own 3-node RabbitMQ cluster (``RabbitCluster`` in tests/rabbit.py, driven through
services/rabbitmq/broker.sh) works: the nodes form one cluster, a quorum queue keeps a confirmed
message when its leader is killed, a killed node comes back, and connections are placed on nodes.

Plain sync tests with ``asyncio.run`` (the cluster helper blocks), as in test_rabbit_node.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import pytest

from tests.rabbit import RabbitCluster
from tests.waiting import poll_until

# the package's cluster (tests/cluster/conftest.py) may boot (~15 s here) inside a test's timeout
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

BODY = b"confirmed before the leader died"


async def declare_and_publish(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()  # publisher confirms: stored once publish returns
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        message = aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)


async def get_one(url: str, queue: str) -> bytes | None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        message = await q.get(fail=False, timeout=30)
        if message is None:
            return None
        await message.ack()
        return message.body


def test_the_nodes_form_one_cluster(cluster: RabbitCluster) -> None:
    assert cluster.running() == [0, 1, 2]
    names = sorted(node.name for node in cluster.nodes)
    assert len(set(names)) == 3
    for node in cluster.nodes:  # each node sees the same three members, all running
        status = json.loads(node.ctl("-q", "cluster_status", "--formatter", "json"))
        assert sorted(status["disk_nodes"]) == names
        assert sorted(status["running_nodes"]) == names
    assert cluster.url == ",".join(node.url for node in cluster.nodes)
    assert [cluster.node_of_port(node.port) for node in cluster.nodes] == [0, 1, 2]


def test_a_confirmed_message_survives_killing_the_quorum_leader(cluster: RabbitCluster) -> None:
    queue = f"cluster-selftest.{uuid.uuid4().hex[:8]}"
    asyncio.run(declare_and_publish(cluster.urls[0], queue))
    leader = cluster.leader_of(queue)
    assert cluster.queue_stats()[queue]["messages"] in (0, 1)  # the count may lag the confirm

    cluster.kill(leader)

    assert cluster.running() == [0, 1, 2]
    assert cluster.leader_of(queue) in (0, 1, 2)
    other = (leader + 1) % 3
    assert asyncio.run(get_one(cluster.urls[other], queue)) == BODY


def test_a_killed_node_stays_down_until_start_node(cluster: RabbitCluster) -> None:
    cluster.kill(2, restart=False)
    assert poll_until(lambda: cluster.running() == [0, 1], timeout=60)
    assert not cluster.nodes[2].epmd_registered()

    cluster.start_node(2)

    assert cluster.running() == [0, 1, 2]
    assert cluster.nodes[2].ctl("-q", "eval", "node().").strip("'\n ") == cluster.nodes[2].name


def test_connection_nodes_finds_the_node_of_a_named_connection(cluster: RabbitCluster) -> None:
    name = f"cluster-selftest-{uuid.uuid4().hex[:8]}"

    async def connected_to_node_1() -> list[int]:
        connection = await aio_pika.connect(
            cluster.urls[1], client_properties={"connection_name": name}
        )
        async with connection:
            found = await asyncio.to_thread(cluster.connection_nodes, name)
        return found

    assert asyncio.run(connected_to_node_1()) == [1]
    assert cluster.connection_nodes(name) == []


def test_a_rolling_restart_restarts_every_node_and_keeps_quorum_messages(
    cluster: RabbitCluster,
) -> None:
    queue = f"cluster-selftest.{uuid.uuid4().hex[:8]}"
    asyncio.run(declare_and_publish(cluster.urls[0], queue))
    pids = [node.pid for node in cluster.nodes]
    restarted: list[int] = []

    def on_restarted(i: int) -> None:
        assert cluster.running() == [0, 1, 2]  # back in the cluster before the next one goes
        restarted.append(i)

    cluster.rolling_restart(on_restarted)

    assert restarted == [0, 1, 2]
    assert all(node.pid not in (None, old) for node, old in zip(cluster.nodes, pids, strict=True))
    assert asyncio.run(get_one(cluster.urls[2], queue)) == BODY
