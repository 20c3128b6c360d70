"""``aioqueue dlq list|show|replay|purge module:app --queue Q``: dead letters by hand.

(``status`` and ``purge`` live in ``status.py``; this module's `main` runs them all, for
the ``aioqueue`` command of `aioqueue.cli.console`.)

Messages are read with ``basic.get`` and left unacked while we look at them; what is not replayed
goes back to the dead-letter queue when the channel closes. A replay re-publishes the message,
confirmed, to the queue it died in (headers of its death removed, attempt count reset), and only
then removes it from the dead-letter queue.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from ..app import App
from ..errors import AioqueueError, SignatureError
from ..message import (
    H_DEAD_AT,
    H_DEAD_ERROR,
    H_DEAD_QUEUE,
    H_DEAD_REASON,
    H_DEAD_TRACEBACK,
    H_TASK,
    H_UNDECODABLE,
    replay_copy,
)
from ..message.signing import SigningKeys, sign, verify
from ..rabbit import RabbitBroker
from ..rabbit.admin import HeldMessage, held_messages, purge_queue, queue_depths
from ..topology import dlq_name
from .common import app_from_args, run, setup_logging
from .status import add_parsers, run_command

__all__ = ["DeadLetter", "main", "rabbit_of", "replay_message", "task_id_of"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in a dead-letter queue, as shown to a person."""

    id: str
    task: str
    reason: str
    error: str
    at: str
    headers: dict[str, Any]
    body: bytes

    @classmethod
    def of(cls, message: HeldMessage) -> DeadLetter:
        headers = message.headers
        return cls(
            id=task_id_of(message),
            task=str(headers.get(H_TASK) or headers.get("task") or "?"),  # ours, or Celery's
            # a message RabbitMQ dead-lettered itself (a policy's dead-letter-exchange) says why
            # in its own header
            reason=str(headers.get(H_DEAD_REASON) or headers.get("x-first-death-reason") or "?"),
            error=str(headers.get(H_DEAD_ERROR, "")),
            at=str(headers.get(H_DEAD_AT, "")),
            headers=headers,
            body=message.body,
        )


def task_id_of(message: HeldMessage) -> str:
    """The task id: the ``id`` header of a Celery message, the message id of ours."""
    headers = message.headers
    celery_id = headers.get("id")
    if "task" in headers and isinstance(celery_id, str):
        return celery_id
    return message.message_id or ""


def parser(prog: str = "aioqueue") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="aioqueue: run workers and schedulers, inspect and repair queues"
    )
    sub = p.add_subparsers(dest="command", required=True)
    # `aioqueue.cli.console` hands these two to their own programs before this parser sees them;
    # they are here to be listed in the help
    for name, text in (("worker", "a worker"), ("scheduler", "the periodic-task scheduler")):
        sub.add_parser(name, help=f"run {text} (see: {prog} {name} --help)", add_help=False)
    sub.add_parser(
        "inspect",
        help=f"workers online and their running tasks (see: {prog} inspect --help)",
        add_help=False,
    )
    sub.add_parser(
        "dashboard",
        help=f"serve the web dashboard (see: {prog} dashboard --help)",
        add_help=False,
    )
    dlq = sub.add_parser("dlq", help="inspect and re-run dead-lettered tasks")
    actions = dlq.add_subparsers(dest="action", required=True)
    for name, text in (
        ("list", "list the dead letters of a queue"),
        ("show", "show one dead letter in full"),
        ("replay", "re-run dead letters: re-publish them to their queue"),
        ("purge", "delete every dead letter of a queue"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("app", help="MODULE:APP")
        a.add_argument("--queue", help="the work queue (default: the app's default queue)")
        a.add_argument("--broker-url", help="overrides the app's broker URL")
        a.add_argument("--limit", type=int, default=1000, help="most messages to read")
        if name in ("show", "replay"):
            a.add_argument("ids", nargs="*", help="task ids (replay: none with --all)")
        if name == "replay":
            a.add_argument("--all", action="store_true", help="replay every dead letter")
        if name == "purge":
            a.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_parsers(sub)  # status, purge
    return p


def main(
    argv: list[str] | None = None, *, stdin: TextIO | None = None, prog: str = "aioqueue"
) -> int:
    """Run ``status``, ``purge`` or ``dlq ...``; returns the exit code."""
    p = parser(prog)
    args, extra = p.parse_known_args(argv)
    if args.command in ("worker", "scheduler", "inspect", "dashboard"):
        p.error(f"{args.command} is a program of its own: run `{prog} {args.command} ...`")
    # task ids may come after the options: `dlq show shop:app --queue q ID ...`
    if extra and (getattr(args, "ids", None) is None or any(e.startswith("-") for e in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.ids = [*args.ids, *extra]
    setup_logging("WARNING")
    app = app_from_args(args)
    if app is None:
        return 2
    try:
        if args.command != "dlq":
            return run(run_command(app, args, stdin or sys.stdin))
        return run(_dlq(app, args.queue or app.default_queue, args, stdin or sys.stdin))
    except AioqueueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _dlq(app: App, queue: str, args: argparse.Namespace, stdin: TextIO) -> int:
    async with app:
        broker = rabbit_of(app)
        dead = dlq_name(queue)
        if args.action == "purge":
            return await _purge(broker, dead, args.yes, stdin)
        async with held_messages(broker, dead, args.limit) as messages:
            if messages is None:
                print(f"{dead} does not exist: nothing was dead-lettered there")
                return 0
            if args.action == "list":
                _print_table([DeadLetter.of(m) for m in messages], dead)
                return 0
            chosen = [
                m
                for m in messages
                if (args.action == "replay" and args.all) or task_id_of(m) in args.ids
            ]
            missing = set(args.ids) - {task_id_of(m) for m in chosen}
            if missing:
                print(f"not found in {dead}: {', '.join(sorted(missing))}")
            if args.action == "show":
                for message in chosen:
                    _print_one(DeadLetter.of(message))
            else:
                await _replay_all(broker, chosen, queue, app.signing)
            return 1 if missing else 0


async def _purge(broker: RabbitBroker, dead: str, yes: bool, stdin: TextIO) -> int:
    depth = (await queue_depths(broker, [dead]))[dead]
    if depth is None:
        print(f"{dead} does not exist: nothing was dead-lettered there")
        return 0
    if not yes:
        print(f"Delete {depth[0]} message(s) from {dead}? Type 'yes' to confirm: ", end="")
        if stdin.readline().strip() != "yes":
            print("cancelled; nothing deleted")
            return 1
    purged = await purge_queue(broker, dead)
    print(f"purged {purged or 0} message(s) from {dead}")
    return 0


async def _replay_all(
    broker: RabbitBroker, chosen: list[HeldMessage], queue: str, signing: SigningKeys | None
) -> None:
    replayed = 0
    for message in chosen:
        if H_UNDECODABLE in message.headers:
            print(
                f"not replayed: {message.message_id or '(no readable id)'} has properties "
                "that cannot be read and would be dead-lettered again (see `dlq show`)"
            )
            continue
        if await replay_message(broker, message, queue, signing):
            replayed += 1
        else:
            print(
                f"not replayed: {message.message_id or '(no readable id)'} is not signed with "
                "one of the app's keys (a signing worker would refuse it; docs/security.md)"
            )
    print(f"replayed {replayed} message(s)")


async def replay_message(
    broker: RabbitBroker, message: HeldMessage, queue: str, signing: SigningKeys | None = None
) -> bool:
    """Re-publish a dead letter to its queue, then remove it from the dead-letter queue.

    With ``signing`` keys only a dead letter whose own signature verifies (however old) is
    replayed, signed anew: an unsigned or forged message is never vouched for by a replay.
    Returns False (the message stays in the dead-letter queue) when it is refused.
    """
    target = str(message.headers.get(H_DEAD_QUEUE) or queue)
    copy = replay_copy(message.properties)
    if signing is not None:
        try:
            verify(message.properties, message.body, signing)
        except SignatureError:
            return False
        sign(copy, message.body, signing, due_at=broker.now())
    await broker.publish(target, message.body, copy)
    await message.ack()
    return True


def rabbit_of(app: App) -> RabbitBroker:
    broker = app.broker
    if not isinstance(broker, RabbitBroker):
        raise AioqueueError("these commands need RabbitMQ, not an in-memory broker")
    return broker


def _print_table(rows: list[DeadLetter], name: str) -> None:
    if not rows:
        print(f"{name} is empty")
        return
    print(f"{len(rows)} dead letter(s) in {name}:")
    print(f"{'task id':<34} {'task':<28} {'reason':<10} {'when':<26} error")
    for r in rows:
        print(f"{r.id:<34} {r.task[:28]:<28} {r.reason:<10} {r.at[:26]:<26} {r.error[:80]}")


def _print_one(letter: DeadLetter) -> None:
    print(f"task id: {letter.id}\ntask:    {letter.task}\nreason:  {letter.reason}")
    print(f"when:    {letter.at}\nerror:   {letter.error}")
    for key, value in sorted(letter.headers.items()):
        if key != H_DEAD_TRACEBACK:
            print(f"  {key}: {value}")
    print(f"body ({len(letter.body)} bytes): {letter.body[:2000]!r}")
    traceback = letter.headers.get(H_DEAD_TRACEBACK)
    if traceback:
        print(f"traceback:\n{traceback}")
