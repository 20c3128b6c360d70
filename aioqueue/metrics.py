"""Prometheus metrics of a worker: `PrometheusObserver`, and serving them over HTTP.

Needs the ``metrics`` extra (``pip install aioqueue-rabbit[metrics]``, the official
prometheus-client); nothing else in aioqueue imports this module, so the core never needs it.

```python
observer = PrometheusObserver(tasks=app.tasks)           # its own CollectorRegistry
app.on_submit.append(observer.submitted)                  # count this process's submits too
app.on_unreadable_reply.append(observer.unreadable_reply) # and replies it could not read
worker = Worker(app, observers=[TaskLog(), observer])
server = serve_metrics(observer.registry, 9100)           # http://host:9100/metrics
watch = asyncio.ensure_future(observer.watch_queues(app.broker, worker.queues))
```

``python -m aioqueue.worker module:app --metrics-port 9100`` does all of this. The metric names
and labels are listed in ``docs/observability.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "aioqueue.metrics needs the Prometheus client library: pip install aioqueue-rabbit[metrics]"
    ) from exc

from .broker import Broker
from .rabbit import RabbitBroker
from .rabbit.admin import queue_depths
from .topology import dlq_name
from .worker.events import RunResult

__all__ = ["DURATION_BUCKETS", "MetricsServer", "PrometheusObserver", "serve_metrics"]

log = logging.getLogger("aioqueue.metrics")

# Seconds, 1 ms to 5 min: fast async tasks at the low end, long jobs near a typical timeout.
DURATION_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)

# Dead letters whose task name comes from the message rather than the registry: any producer
# could mint label values without bound, so they are counted under this name (the worker's
# WARNING log line names the task).
UNTRUSTED_NAME_REASONS = frozenset({"decode", "not_found"})
UNKNOWN_TASK = "unknown"


class PrometheusObserver:
    """A `TaskObserver` that counts tasks into its own Prometheus `CollectorRegistry`.

    Args:
        registry: Where the metrics live; default: a new registry (never the global one, so
            several workers in one process, or tests, do not collide).
        tasks: Task names whose series start at 0 (so the first failure shows up in
            ``increase()``); usually ``app.tasks``.

    Attributes:
        registry: Serve it with `serve_metrics` or ``prometheus_client.generate_latest``.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, tasks: Iterable[str] = ()
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("task",)) -> Counter:
            return Counter(f"aioqueue_tasks_{name}", doc, labels, registry=self.registry)

        self.submitted_total = counter("submitted", "Tasks submitted (confirmed) by this process.")
        self.started_total = counter("started", "Task attempts started.")
        self.succeeded_total = counter("succeeded", "Task attempts that succeeded.")
        self.failed_total = counter("failed", "Tasks failed for good, timeouts included.")
        self.retried_total = counter("retried", "Task attempts that failed and were retried.")
        self.dead_lettered_total = counter(
            "dead_lettered", "Messages sent to a dead-letter queue.", ("task", "queue", "reason")
        )
        self.events_dropped_total = Counter(
            "aioqueue_events_dropped_total",
            "Task events dropped (the event stream missing or refusing, or a full buffer).",
            registry=self.registry,
        )
        self.unreadable_replies_total = Counter(
            "aioqueue_replies_unreadable_total",
            "Messages of this process's reply queue that could not be read (logged, dropped).",
            registry=self.registry,
        )
        self.duration = Histogram(
            "aioqueue_task_duration_seconds",
            "Run time of task attempts, whatever their outcome.",
            ("task",),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "aioqueue_tasks_in_flight",
            "Task attempts running now.",
            ("task",),
            registry=self.registry,
        )
        self.queue_messages = Gauge(
            "aioqueue_queue_messages",
            "Messages ready in a queue (sampled every few seconds).",
            ("queue",),
            registry=self.registry,
        )
        self.queue_consumers = Gauge(
            "aioqueue_queue_consumers",
            "Consumers of a queue (sampled every few seconds).",
            ("queue",),
            registry=self.registry,
        )
        self._outcomes = {
            "succeeded": self.succeeded_total,
            "retried": self.retried_total,
            "failed": self.failed_total,
            "timeout": self.failed_total,
        }
        self._probe_ok = True
        for task in tasks:
            self._prime(task)

    def _prime(self, task: str) -> None:
        for metric in (self.submitted_total, self.started_total, self.in_flight, self.duration):
            metric.labels(task)
        for counter in self._outcomes.values():
            counter.labels(task)

    # -- TaskObserver ---------------------------------------------------------------------

    def started(self, task: str, task_id: str, attempt: int) -> None:
        self.started_total.labels(task).inc()
        self.in_flight.labels(task).inc()

    def finished(
        self, task: str, task_id: str, attempt: int, outcome: RunResult, duration: float
    ) -> None:
        self.in_flight.labels(task).dec()
        self.duration.labels(task).observe(duration)
        counter = self._outcomes.get(outcome)  # a cancelled run counts as its dead letter
        if counter is not None:
            counter.labels(task).inc()

    def dead_lettered(self, queue: str, task: str, task_id: str, reason: str) -> None:
        if reason in UNTRUSTED_NAME_REASONS or not task:
            task = UNKNOWN_TASK
        self.dead_lettered_total.labels(task, queue, reason).inc()

    def cancelled(self, task: str, task_id: str, attempt: int) -> None:
        return None  # counted where it is handed off (a dead letter, reason cancelled)

    # -- EventPublisher.on_dropped --------------------------------------------------------

    def events_dropped(self, count: int) -> None:
        """Count task events dropped by the worker's event publisher:
        ``publisher.on_dropped.append(observer.events_dropped)``."""
        self.events_dropped_total.inc(count)

    # -- App.on_submit --------------------------------------------------------------------

    def submitted(self, task: str) -> None:
        """Count one confirmed submit: ``app.on_submit.append(observer.submitted)``."""
        self.submitted_total.labels(task).inc()

    # -- App.on_unreadable_reply ----------------------------------------------------------

    def unreadable_reply(self) -> None:
        """Count one unreadable reply of this process's reply queue:
        ``app.on_unreadable_reply.append(observer.unreadable_reply)``."""
        self.unreadable_replies_total.inc()

    # -- queue gauges ---------------------------------------------------------------------

    async def watch_queues(
        self, broker: Broker, queues: Iterable[str], *, interval: float = 5.0
    ) -> None:
        """Refresh the queue gauges every ``interval`` seconds until cancelled; never raises.

        A failed sample (broker unreachable, ...) removes the gauges' series, so dashboards
        show no data rather than stale numbers; it is logged once until sampling works again.
        """
        names = list(queues)
        while True:
            try:
                async with asyncio.timeout(max(interval, 10.0)):
                    await self.refresh_queues(broker, names)
            except Exception as exc:
                self.queue_messages.clear()
                self.queue_consumers.clear()
                level = logging.WARNING if self._probe_ok else logging.DEBUG
                log.log(level, "could not sample queue depths: %s: %s", type(exc).__name__, exc)
                self._probe_ok = False
            else:
                if not self._probe_ok:
                    log.info("sampling queue depths again")
                self._probe_ok = True
            await asyncio.sleep(interval)

    async def refresh_queues(self, broker: Broker, queues: Iterable[str]) -> None:
        """Sample each queue and its ``.dlq`` once (RabbitMQ only; a no-op on other brokers).

        Passive declares on a channel of its own — a missing queue closes the channel it is
        asked on, and that must never be the publishing channel — so nothing is created; the
        series of a missing queue is removed.
        """
        if not isinstance(broker, RabbitBroker):
            return
        names = [n for queue in queues for n in (queue, dlq_name(queue))]
        for name, depth in (await queue_depths(broker, names)).items():
            if depth is None:
                self._forget(name)  # the series of a missing queue is removed
                continue
            self.queue_messages.labels(name).set(depth[0])
            self.queue_consumers.labels(name).set(depth[1])

    def _forget(self, queue: str) -> None:
        for gauge in (self.queue_messages, self.queue_consumers):
            with contextlib.suppress(KeyError):
                gauge.remove(queue)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A registry served over HTTP by prometheus-client's server thread."""

    server: WSGIServer
    host: str
    port: int

    @property
    def url(self) -> str:
        """Where to scrape; a wildcard host is shown as ``localhost``."""
        host = "localhost" if self.host in ("", "0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (waits up to half a second for the thread)."""
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free port (see `MetricsServer.port`). Raises OSError when the port is
    taken.
    """
    server, _thread = start_http_server(port, host, registry=registry)
    return MetricsServer(server, host, int(server.server_port))
