"""``python -m services.web [--host H] [--port 8080] [--with-worker]``: serve the demo's tasks.

The broker is ``$AIOQUEUE_BROKER_URL`` (default ``amqp://guest:guest@localhost/``).
"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from services.demo.tasks import app

from .service import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.web", description="Submit the demo's tasks over HTTP."
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument(
        "--with-worker",
        action="store_true",
        help="also run a worker for the demo's tasks in this process",
    )
    parser.add_argument(
        "--max-handles",
        type=int,
        default=10_000,
        help="most task handles kept in memory (default 10000)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    web_app = create_app(app, max_handles=args.max_handles, worker=args.with_worker)
    web.run_app(web_app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
