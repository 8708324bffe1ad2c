"""Look at a web page, find a thing by description, click it: vlm-tools driving a real browser.

    python examples/web_automation.py "red button"
    python examples/web_automation.py "blue circle" --dpr 2 --viewport 800x800
    python examples/web_automation.py "the Sign in button" --url https://example.com/login \\
        --model allenai/Molmo2-4B              # a real model (GPU recommended)
    python examples/web_automation.py "green triangle" --stdio # the server as a `vlm-tools serve` subprocess

What happens:

1. The vision server starts — in memory (``mcp.Client(build_server(settings))``) or, with ``--stdio``, as the
   ``vlm-tools serve`` subprocess an agent would launch — with the small trained Molmo2 fixture
   ``tests/fixtures/models/molmo2-ui`` unless ``--model`` names others. It runs on any CPU in well under a second.
2. Chromium opens the page: a bundled demo page of coloured buttons and shapes (served on 127.0.0.1: a red button,
   a blue and a purple circle, a green and an orange triangle), or ``--url``.
3. The page is screenshotted at ``--dpr`` (devicePixelRatio: 2 gives a screenshot twice the viewport size).
4. ``point_to_object`` gets the screenshot and the description, with ``frame`` = the viewport in CSS pixels, so the
   answer carries ``frame_x``/``frame_y`` in exactly the units ``page.mouse.click`` takes — whatever the ratio.
5. The browser clicks there, and the script prints what the click reached.

The fixture models only know the demo vocabulary: a colour (red, green, blue, yellow, purple, orange) and a shape
(button, circle, triangle). Needs the ``playwright`` package and a Chromium: Debian's
(``apt-get install chromium``, used by default) or Playwright's own (``playwright install chromium``, then pass
``--chromium ""``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "models"
DEFAULT_MODELS = [str(FIXTURES / "molmo2-ui")]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]

log = logging.getLogger("web_automation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description="Find a thing on a web page by description and click it.")
    parser.add_argument("description", help='What to click, e.g. "red button" or "the purple circle".')
    parser.add_argument("--url", help="Page to open (default: a bundled demo page served locally).")
    parser.add_argument("--model", action="append", help="Model directory or hub id (repeatable; default: the Molmo2 fixture).")
    parser.add_argument("--viewport", default="1024x640", help="Browser viewport in CSS pixels, WIDTHxHEIGHT.")
    parser.add_argument("--dpr", type=float, default=1.0, help="devicePixelRatio of the screenshot (1, 2, …).")
    parser.add_argument("--stdio", action="store_true", help="Run the server as a `vlm-tools serve` subprocess.")
    parser.add_argument("--device", default="cpu", help="Where the models run (cpu, cuda, auto).")
    parser.add_argument(
        "--chromium", default="/usr/bin/chromium", help='Chromium binary; "" uses Playwright\'s own browser.'
    )
    parser.add_argument("--screenshot", type=Path, help="Also save the screenshot here.")
    args = parser.parse_args(argv)
    try:
        width, _, height = args.viewport.lower().partition("x")
        args.viewport_size = (int(width), int(height))
    except ValueError:
        parser.error(f"--viewport must be WIDTHxHEIGHT, e.g. 1024x640, not {args.viewport!r}")
    return args


# --- the demo page ----------------------------------------------------------------------------------------------


DEMO_OBJECTS = (
    ("red", "button", "Save", 0.22, 0.22),
    ("blue", "circle", None, 0.75, 0.28),
    ("green", "triangle", None, 0.50, 0.68),
    ("purple", "circle", None, 0.16, 0.72),
    ("orange", "triangle", None, 0.84, 0.74),
)
"""The demo page: (colour, shape, word on it, centre x and y as shares of the viewport)."""


def demo_page(viewport: tuple[int, int]) -> tuple[str, list[str]]:
    """The demo page laid out for ``viewport`` (sizes scale with its short side, as in the training scenes), and
    the names of the things on it."""
    from vlm_tools.scenes import Background, SceneObject, scene_html

    width, height = viewport
    short = min(width, height)
    objects = []
    for colour, shape, text, cx, cy in DEMO_OBJECTS:
        if shape == "button":
            w, h = 0.38 * short, 0.16 * short
        elif shape == "circle":
            w = h = 0.22 * short
        else:
            w, h = 0.24 * short, 0.21 * short
        x0, y0 = round(cx * width - w / 2), round(cy * height - h / 2)
        radius = round(0.3 * h) if shape == "button" else 0
        objects.append(SceneObject(colour, shape, (x0, y0, x0 + round(w), y0 + round(h)), text, radius))
    page = scene_html(objects, Background((248, 250, 252)), title="vlm-tools demo page")
    return page, [o.name for o in objects]


@contextmanager
def serve_page(page: str) -> Iterator[str]:
    """Serve ``page`` at http://127.0.0.1:<free port>/ from a background thread."""
    body = page.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the vision server ------------------------------------------------------------------------------------------


def vision_client(models: list[str], device: str, stdio: bool) -> Any:
    """An MCP client for the vision server: in memory, or over stdio to a ``vlm-tools serve`` subprocess."""
    from mcp import Client

    if stdio:
        from mcp import StdioServerParameters

        args = ["serve", "--device", device, "--log-level", "warning"]
        for model in models:
            args += ["--model", model]
        vlm_tools = Path(sys.executable).with_name("vlm-tools")
        return Client(StdioServerParameters(command=str(vlm_tools), args=args))

    from vlm_tools.server import build_server
    from vlm_tools.settings import Settings

    return Client(build_server(Settings(model=tuple(models), device=device, log_level="warning")))


# --- the flow ---------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, url: str) -> int:
    """Open ``url``, screenshot it, ask where ``args.description`` is, click there, report."""
    from playwright.async_api import async_playwright

    width, height = args.viewport_size
    launch: dict[str, Any] = {"args": CHROMIUM_ARGS}
    if args.chromium:
        launch["executable_path"] = args.chromium
    async with (
        async_playwright() as playwright,
        vision_client(args.model or DEFAULT_MODELS, args.device, args.stdio) as client,
    ):
        browser = await playwright.chromium.launch(**launch)
        try:
            context = await browser.new_context(
                viewport={"width": width, "height": height}, device_scale_factor=args.dpr
            )
            page = await context.new_page()
            await page.goto(url)
            png = await page.screenshot()
            if args.screenshot:
                args.screenshot.write_bytes(png)
            print(f"page: {url}\nviewport: {width}x{height} CSS px at devicePixelRatio {args.dpr:g}")

            result = await client.call_tool(
                "point_to_object",
                {
                    "image": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                    "description": args.description,
                    "frame": {"width": width, "height": height},  # answer in viewport units, ready to click
                },
            )
            if result.is_error:
                print("point_to_object failed:", " ".join(getattr(b, "text", "") for b in result.content))
                return 2
            data = result.structured_content
            size = data["image_size"]
            print(f"screenshot: {size['width']}x{size['height']} device px; model: {data['model']}")
            print(f"model said: {data['raw']}")
            if not data["found"]:
                print(f"nothing matching {args.description!r} was found; no click")
                return 1
            point = data["points"][0]
            x, y = point["frame_x"], point["frame_y"]
            print(
                f"point: ({point['x']:.1f}, {point['y']:.1f}) screenshot px = ({x:.1f}, {y:.1f}) CSS px "
                f"[{point['source']}]"
            )
            target = await page.evaluate(
                """([x, y]) => { const el = document.elementFromPoint(x, y);
                     return el ? {tag: el.tagName.toLowerCase(), name: el.getAttribute('aria-label') || el.id || '',
                                  text: (el.innerText || '').trim().slice(0, 60)} : null; }""",
                [x, y],
            )
            await page.mouse.click(x, y)
            print(f"clicked ({x:.1f}, {y:.1f}): {json.dumps(target) if target else 'nothing there'}")
            clicks = await page.evaluate("window.clicks || null")
            if clicks is not None:  # the demo page records every click it receives
                print(f"the page recorded: {json.dumps(clicks)}")
        finally:
            await browser.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.url:
        return asyncio.run(run(args, args.url))
    page, names = demo_page(args.viewport_size)
    print(f"demo page shows: {', '.join(names)}")
    with serve_page(page) as url:
        return asyncio.run(run(args, url))


if __name__ == "__main__":
    sys.exit(main())
