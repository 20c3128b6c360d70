"""The ``aioqueue`` command (`console`) and its administration commands.

- `console`: ``aioqueue worker|scheduler|status|purge|dlq ...``; ``python -m aioqueue`` too;
- `common`: what every program shares — loading ``module:app``, logging, uvloop;
- `status`: ``aioqueue status`` and ``aioqueue purge``;
- `dlq`: ``aioqueue dlq list|show|replay|purge``.

``aioqueue worker`` and ``aioqueue scheduler`` are the programs of `aioqueue.worker.cli` and
`aioqueue.scheduler.cli` (``python -m aioqueue.worker``, ``python -m aioqueue.scheduler``).
"""
