"""A real browser clicks where point_to_object says, at devicePixelRatio 1 and 2.

The trip under test: a page of CSS buttons and shapes (the trained fixture model's visual vocabulary, placed
differently in every trial) served on 127.0.0.1 → Chromium screenshot in device pixels → ``point_to_object``
through the MCP client with ``frame`` = the viewport in CSS pixels → the trained Molmo2 fixture → parser →
frame coordinates → ``page.mouse.click(frame_x, frame_y)`` → the page records which element the click reached.
At DPR 2 the screenshot is twice the viewport, so a point not mapped to the frame would click twice as far out.

Chromium is Debian's ``/usr/bin/chromium`` (``apt-get install chromium``; ``VLM_TOOLS_CHROMIUM`` names another
binary). Without it the test skips locally and FAILS in CI (``CI`` set), so CI can never pass by not running it.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client
from PIL import Image

from vlm_tools.server import build_server
from vlm_tools.settings import Settings
from vlm_tools.scenes import random_background, random_layout, scene_html

from helpers import data_uri, static_site

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "molmo2-ui"
CHROMIUM = os.environ.get("VLM_TOOLS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
TRIALS = 20
MIN_HITS = 19
VIEWPORTS = ((1024, 640), (800, 800), (640, 900), (1280, 720))
"""CSS-pixel viewports the trials cycle through: landscape, square, portrait."""


def _need_browser() -> None:
    """Skip (locally) or fail (in CI) when Playwright or Chromium is missing."""
    problem = None
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed (pip install playwright)"
    if problem is None and not Path(CHROMIUM).is_file():
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VLM_TOOLS_CHROMIUM)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {problem}")
        pytest.skip(problem)


@pytest.fixture
def site() -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """A local web server serving the pages put into the returned dict by path."""
    pages: dict[str, tuple[str, bytes]] = {}
    with static_site(pages) as base:
        yield base, pages


@pytest.mark.parametrize("dpr", [1, 2], ids=["dpr1", "dpr2"])
async def test_click_lands_on_the_named_object(
    dpr: int, site: tuple[str, dict[str, tuple[str, bytes]]], tmp_path: Path
) -> None:
    _need_browser()
    from playwright.async_api import async_playwright

    base_url, pages = site
    settings = Settings(model=(str(FIXTURE),), device="cpu", allow_path=(tmp_path,), log_level="warning")
    hits, misses = 0, []
    async with async_playwright() as playwright, Client(build_server(settings)) as client:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1024, "height": 640}, device_scale_factor=dpr)
            page = await context.new_page()
            for trial in range(TRIALS):
                width, height = VIEWPORTS[trial % len(VIEWPORTS)]
                rng = random.Random(50_000 + 1_000 * dpr + trial)  # layouts the model never saw in training
                objects, target_index = random_layout(rng, (width, height))
                target = objects[target_index]
                pages[f"/trial{trial}.html"] = (
                    "text/html; charset=utf-8",
                    scene_html(objects, random_background(rng)).encode(),
                )
                await page.set_viewport_size({"width": width, "height": height})
                await page.goto(f"{base_url}/trial{trial}.html")
                png = await page.screenshot()
                assert Image.open(io.BytesIO(png)).size == (width * dpr, height * dpr)  # device pixels

                result = await client.call_tool(
                    "point_to_object",
                    {"image": data_uri(png), "description": target.name, "frame": {"width": width, "height": height}},
                )
                assert not result.is_error, result.content
                data = result.structured_content
                assert data["image_size"] == {"width": width * dpr, "height": height * dpr}
                if not data["points"]:
                    misses.append((trial, target.name, "no point"))
                    continue
                point = data["points"][0]
                # The frame is the viewport: frame coordinates are device pixels divided by the ratio.
                assert point["frame_x"] == pytest.approx(point["x"] / dpr)
                assert point["frame_y"] == pytest.approx(point["y"] / dpr)
                await page.mouse.click(point["frame_x"], point["frame_y"])
                clicks = await page.evaluate("window.clicks")
                if len(clicks) == 1 and clicks[0]["name"] == target.name:
                    hits += 1
                else:
                    misses.append((trial, target.name, clicks))
        finally:
            await browser.close()
    print(f"DPR {dpr}: {hits}/{TRIALS} clicks reached the named object")  # shown with pytest -s / -rP
    assert hits >= MIN_HITS, f"DPR {dpr}: {hits}/{TRIALS} clicks reached the named object; misses: {misses}"
