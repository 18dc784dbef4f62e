"""What a new user sees in a browser (issue 20), in Debian's chromium: the
demo's console link opens live, an empty console says what to type, and the
README's JavaScript runs as pasted in a page against `make demo`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import ConsoleMessage, Page, expect

from tests.browser.conftest import ARTIFACTS
from tests.support.demo import Demo, running_demo

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    async with running_demo() as d:
        yield d


@pytest.mark.browser
async def test_the_demo_console_link_opens_live(demo: Demo, page: Page) -> None:
    link = re.search(r"(http://\S+)", demo.line_with("console in a browser"))
    assert link is not None
    await page.goto(link.group(1))
    sub = page.locator('#subs li[data-key="market:tick:*"]')
    await expect(sub).to_have_attribute("data-status", "live")
    # The demo publisher's ticks arrive with nothing typed.
    for symbol in ("BANKNIFTY", "NIFTY"):
        row = page.locator(f'#live tbody tr[data-channel="market:tick:{symbol}"]')
        await expect(row.locator(".value")).to_contain_text('"ltp"')
    await expect(page.locator("#subs-empty")).to_be_hidden()
    await expect(page.locator("#stat-gaps")).to_have_text("0")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console-demo-link.png"))


@pytest.mark.browser
async def test_an_empty_console_says_what_to_type(demo: Demo, page: Page) -> None:
    await page.goto(demo.http + "/")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    hint = page.locator("#subs-empty")
    await expect(hint).to_be_visible()
    await expect(hint).to_contain_text("market:tick:*")
    await expect(hint).to_contain_text("?channels=")
    await expect(page.locator("#live-empty")).to_contain_text("market:tick:*")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console-empty.png"))
    # Following the hint works.
    await page.fill("#sub-input", "market:tick:*")
    await page.click("#sub-btn")
    row = page.locator('#live tbody tr[data-channel="market:tick:NIFTY"]')
    await expect(row.locator(".value")).to_contain_text('"ltp"')


@pytest.mark.browser
async def test_the_readme_javascript_runs_in_a_page(demo: Demo, page: Page) -> None:
    [code] = re.findall(r"```javascript\n(.*?)```", README.read_text(), re.DOTALL)
    code = code.replace("localhost:8889", f"localhost:{demo.port}")
    logged: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        logged.append(msg.text)

    page.on("console", on_console)
    await page.goto(demo.http + "/healthz")
    async with page.expect_console_message(lambda m: m.text.startswith("market:tick:BANKNIFTY")):
        await page.add_script_tag(content=code)
    channel, seq, data = logged[-1].split(" ", 2)
    assert channel == "market:tick:BANKNIFTY" and int(seq) >= 1 and '"ltp"' in data
    assert not any(line.startswith("closed") for line in logged)
