"""The worker: ``python -m aioqueue.worker module:app`` or `Worker` from Python."""

from .lifecycle import Worker, WorkerStatistics

__all__ = ["Worker", "WorkerStatistics"]
