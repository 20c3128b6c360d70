"""The web dashboard: ``aioqueue dashboard module:app`` (needs the ``aiohttp`` extra).

Pages for tasks, workers, queues and schedules, live from the event stream
(`aioqueue.events.EventReader`), its state in bounded memory (`DashboardState`).
"""

from .server import create_app
from .state import DashboardState

__all__ = ["DashboardState", "create_app"]
