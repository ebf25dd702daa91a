"""Headless Chromium (Debian's `chromium` package) driven by Playwright, for the dashboard's
browser tests (tests/test_browser.py).

Nothing leaves the machine: the host resolver maps every name but 127.0.0.1 to "not found",
background networking is off, and every page request goes through a route that lets loopback
through, answers the fixtures' image host with a small local PNG, and aborts anything else.
Every page records console errors, uncaught errors and dialogs, so a test can insist there
were none. A missing browser or Playwright skips the tests, or fails them when
RECEIVER_REQUIRE_SERVICES is set (CI installs both, so a skip there would hide a broken setup).
"""

from __future__ import annotations

import importlib.util
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from .helpers import ROOT, TOKEN

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, ConsoleMessage, Dialog, Error, Page, Route

CHROMIUM = "/usr/bin/chromium"
PACKAGE = "chromium"  # the Debian package that provides CHROMIUM
IMAGE_HOST = "cdn.example.com"  # the fixtures' image URLs; answered locally, never fetched
ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 10_000  # every wait for an element, navigation or click is bounded by this


def screenshot_dir() -> Path:
    """`RECEIVER_SCREENSHOTS`, default artifacts/screenshots in the repository (git-ignored)."""
    folder = Path(os.environ.get("RECEIVER_SCREENSHOTS") or ROOT / "artifacts" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def png(width: int = 320, height: int = 240) -> bytes:
    """A small gradient PNG standing in for an evaluated image."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in (40 + x * 160 // width, 90, 200 - y // 2))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


IMAGE = png()


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install {PACKAGE} chromium-driver)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """A headless Chromium with a fresh profile in `profile`, for the duration."""
    missing = _missing()
    if missing is not None:
        if os.environ.get("RECEIVER_REQUIRE_SERVICES"):
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport=VIEWPORT,  # type: ignore[arg-type]
        )
        context.set_default_timeout(TIMEOUT_MS)
        context.route("**/*", _route)
        try:
            yield context
        finally:
            context.close()


def _route(route: Route) -> None:
    host = urlsplit(route.request.url).hostname
    if host == "127.0.0.1":
        route.continue_()
    elif host == IMAGE_HOST:
        route.fulfill(status=200, content_type="image/png", body=IMAGE)
    else:  # aborted: Chromium logs a console error, which fails the test
        route.abort()


@dataclass
class Watched:
    """A page and everything it complained about."""

    page: Page
    problems: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text} ({message.location})")

    def page_error(self, error: Error) -> None:
        self.problems.append(f"uncaught error: {error}")

    def dialog(self, dialog: Dialog) -> None:
        self.problems.append(f"{dialog.type} dialog opened: {dialog.message!r}")
        dialog.dismiss()


def watch(page: Page) -> Watched:
    watched = Watched(page)
    page.on("console", watched.console)
    page.on("pageerror", watched.page_error)
    page.on("dialog", watched.dialog)
    return watched


def log_in(page: Page, base: str, path: str = "/") -> None:
    """Through the /login form, as a person would; ends on `path`."""
    page.goto(f"{base}{path}")
    page.fill("#login input[name=token]", TOKEN)
    page.click("#login button[type=submit]")
    page.wait_for_url(f"{base}{path}")


def see(page: Page, selector: str, text: str) -> str:
    """The text of the first `selector` containing `text`, once it shows (bounded wait): after
    a form posts and redirects, this waits for the new page rather than reading the old one."""
    found = page.locator(selector, has_text=text).first
    found.wait_for()
    return found.inner_text()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=screenshot_dir() / f"{name}.png", full_page=True)
