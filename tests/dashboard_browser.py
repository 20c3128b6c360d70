"""A headless chromium driven through chromedriver, for the dashboard's browser tests.

Selenium's calls block; the dashboard under test runs in the test's event loop, so every call
goes through `asyncio.to_thread`. Waits are DOM conditions under deadlines, never sleeps.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

__all__ = ["ARTEFACTS", "Browser", "browser_available"]

ARTEFACTS = (
    Path(
        os.environ.get("AIOQUEUE_ARTEFACTS", Path(__file__).resolve().parent.parent / ".artefacts")
    )
    / "dashboard"
)


def browser_available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


class Browser:
    """One chromium window (1280x900)."""

    def __init__(self) -> None:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-features=BackForwardCache",
            "--window-size=1280,900",
        ):
            options.add_argument(argument)
        service = Service(shutil.which("chromedriver") or "chromedriver")
        self.driver = webdriver.Chrome(options=options, service=service)
        self.driver.set_page_load_timeout(30)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def wait(self, condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        """Poll ``condition`` (called in the browser's thread) until truthy, or fail."""

        def check(_driver: Any) -> Any:
            try:
                return condition()
            except Exception:  # an element replaced by a live update: look again
                return False

        def waiting() -> Any:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(check, what)

        return await self.run(waiting)

    def text(self, css: str) -> str:
        """The text of the first element ``css`` selects ("" if none); call inside `wait`."""
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return str(found[0].text) if found else ""

    async def click(self, css: str) -> None:
        """Click ``css``, looking again if a live update replaced it between find and click."""

        def clicked() -> bool:
            self.driver.find_element(By.CSS_SELECTOR, css).click()
            return True

        await self.wait(clicked, f"a click on {css}")

    async def screenshot(self, name: str) -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        await self.run(self.driver.save_screenshot, str(path))
        return path

    async def close(self) -> None:
        await self.run(self.driver.quit)
