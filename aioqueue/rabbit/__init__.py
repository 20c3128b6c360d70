"""Everything that speaks AMQP: RabbitMQ through aio-pika, with aiormq on the per-message path.

- `broker`: `RabbitBroker`, the `aioqueue.broker.Broker` on RabbitMQ (connection, confirmed
  publishes, declarations, the delay ladder);
- `subscription`: a consumer that comes back after reconnects and server cancels;
- `acks`, `frames`: acks batched per channel, frames written in the order made;
- `publisher`: confirmed publishes without aiormq's per-publish lock, timer and queue wait;
- `connection`: the robust connection with coalesced writes and deeper channel buffers;
- `inbound`: frames pamqp cannot read made readable before aiormq parses them;
- `errors`: which errors are retried through and which are final;
- `admin`: the named operations admin, status, metrics and the scheduler need;
- `internals`: every private attribute of aio-pika, aiormq and pamqp this package relies on.
"""

from .broker import RabbitBroker

__all__ = ["RabbitBroker"]
