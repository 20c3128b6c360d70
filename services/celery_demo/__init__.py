"""A Celery producer and an aioqueue worker sharing one queue: ``make celery-demo``."""
