"""Integrations with other frameworks, each an optional extra (``aioqueue-rabbit[aiohttp]``)."""
