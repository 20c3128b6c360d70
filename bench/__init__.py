"""aioqueue's benchmark suite: aioqueue against a naive aio-pika baseline (``python -m bench``).

See ``bench/README.md``. Nothing here is imported by aioqueue itself or by ``make test``.
"""
