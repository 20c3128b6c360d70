"""A small aiohttp service in front of aioqueue: submit tasks over HTTP, read their outcome.

``python -m services.web [--port 8080] [--with-worker]``; see ``services/web/README.md``.
"""
