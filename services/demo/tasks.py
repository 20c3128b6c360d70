"""The demo's tasks: the situations that make people reach for a task queue.

Run a worker for them with ``python -m aioqueue.worker services.demo.tasks:app``, and the
scheduler of the periodic one with ``python -m aioqueue.scheduler services.demo.tasks:app``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime

from aioqueue import App, task_context

app = App("demo", default_queue="demo")
log = logging.getLogger("demo")
ARTICLES = 200
# The hour's most-read articles, by hour: stands in for a cache the web pages read.
TOP_ARTICLES: dict[datetime, list[str]] = {}


@app.task(name="demo.deliver_post")
async def deliver_post(post_id: int, follower_id: int) -> str:
    """Fan-out: put a new post into one follower's feed (many small tasks at once)."""
    await asyncio.sleep(0.001)  # stands in for a write to the follower's feed store
    return f"post {post_id} -> feed of user {follower_id}"


@app.task(name="demo.render_report", queue="demo.slow", timeout=60)
def render_report(customer: str, rounds: int) -> dict[str, object]:
    """A slow, CPU-bound computation offloaded from a request (runs in a worker thread)."""
    digest = customer.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"customer": customer, "rounds": rounds, "fingerprint": digest.hex()[:16]}


@app.task(name="demo.send_welcome_email", ignore_result=True)
async def send_welcome_email(address: str) -> None:
    """Fire-and-forget: nobody waits for a notification."""
    log.warning("demo: welcome e-mail sent to %s (task %s)", address, task_context().id)


@app.task(name="demo.charge_card")
async def charge_card(customer: str, cents: int) -> str:
    """A task that fails for bad input and reports its error back to the caller."""
    if cents <= 0:
        raise ValueError(f"cannot charge {cents} cents to {customer}")
    return f"charged {cents} cents to {customer}"


@app.periodic(cron="* * * * *", name="demo.top_articles", ignore_result=True)
async def top_articles() -> list[str]:
    """Periodic: recompute the hour's ten most-read articles, every minute.

    The work is keyed by the slot's hour, so running a slot again (a redelivery) overwrites the
    same entry rather than counting twice.
    """
    slot = task_context().scheduled_at or datetime.now(UTC)  # a manual submit has no slot
    hour = slot.replace(minute=0, second=0, microsecond=0)
    reads = {f"article-{n}": _page_views(hour, n, slot.minute) for n in range(ARTICLES)}
    top = sorted(reads, key=lambda article: reads[article], reverse=True)[:10]
    TOP_ARTICLES[hour] = top
    log.warning("demo: most read at %s: %s", slot.strftime("%H:%M"), ", ".join(top[:3]))
    return top


def _page_views(hour: datetime, article: int, minutes: int) -> int:
    """Stands in for the page-view store: a deterministic count per article, hour and minute."""
    seed = hashlib.sha256(f"{hour.isoformat()}/{article}".encode()).digest()
    return int.from_bytes(seed[:2], "big") * (minutes + 1) // 60 + seed[2] * minutes
