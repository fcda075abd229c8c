"""Headless Chromium through Selenium, for the leaderboard page's browser test and its screenshot.

Needs Debian's `chromium` and `chromium-driver` packages (or any Chromium or Chrome with a matching
chromedriver on PATH) and `selenium` (the `dev` extra). The driver is given explicitly, so Selenium never
tries to download one.

    python -m benchmark.report.screenshot results/demo/leaderboard.html docs/leaderboard.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmark.core.errors import UserError
from tasks.atomic import atomic_write_bytes

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def missing() -> str | None:
    """Why headless Chromium cannot run here (None when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not any(shutil.which(b) for b in BROWSERS):
        return "no Chromium on PATH (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


def chromium(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium session that records the console and the network log (`performance`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    reason = missing()
    if reason:
        raise UserError(f"cannot start headless Chromium: {reason}")
    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                 f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))


def screenshot(page: Path, png: Path, width: int = 1400, hover: bool = True, height: int | None = None) -> None:
    """A PNG of `page` (opened from disk) at `width` CSS pixels: the whole page, or its top `height` pixels.

    With `hover`, the pointer rests on the plot's point of the first row, so the picture shows a tooltip.
    """
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page = Path(page).resolve()
    if not page.is_file():
        raise UserError(f"no page at {page}; run `python -m benchmark leaderboard` first")
    driver = chromium(width)
    try:
        driver.get(page.as_uri())
        whole = driver.execute_script("return document.documentElement.scrollHeight")
        wanted = min(whole, height or whole)
        driver.set_window_size(width, wanted)
        # The window's frame is not part of the viewport, and its size differs between Chromium's versions.
        frame = driver.execute_script("return window.outerHeight - window.innerHeight")
        driver.set_window_size(width, wanted + frame)
        points = driver.find_elements(By.CSS_SELECTOR, ".pt.ours")
        if hover and points:
            ActionChains(driver).move_to_element(points[0]).perform()
        atomic_write_bytes(Path(png), driver.get_screenshot_as_png())
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    from benchmark.commands.options import positive_int  # the commands' own check, here only when run as one

    parser = argparse.ArgumentParser(description="Screenshot a leaderboard.html in headless Chromium.")
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=positive_int, default=1400, metavar="PX")
    parser.add_argument("--height", type=positive_int, metavar="PX",
                        help="only the page's top PX pixels (default: the whole page)")  # fmt: skip
    parser.add_argument("--no-hover", action="store_true", help="no tooltip in the picture")
    args = parser.parse_args(argv)
    try:
        screenshot(args.page, args.png, args.width, hover=not args.no_hover, height=args.height)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
