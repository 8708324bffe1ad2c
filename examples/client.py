"""Call every vlm-tools tool from an MCP client, over stdio, the way an agent would.

    python examples/client.py                       # tiny random models (noise answers), a generated screenshot
    python examples/client.py -- --model tests/fixtures/models/molmo2-ui --model tests/fixtures/models/paligemma-ui
    python examples/client.py shot.png report.pdf -- --model allenai/Molmo2-4B --model google/paligemma2-3b-mix-448

Arguments after ``--`` go to ``vlm-tools serve``. Without them the server runs the tiny random test models, built
on the spot: their answers are noise, but every tool, source and coordinate path runs for real. A tool error is
printed as the server sent it (``error: <code>: <what to do>``) and the example goes on with the next tool; it exits
1 when a tool failed, 2 when the server could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from PIL import Image, ImageDraw


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This example's own arguments, and the ``vlm-tools serve`` flags given after ``--``."""
    serve_flags: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_flags = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="examples/client.py",
        usage="%(prog)s [-h] [IMAGE] [DOCUMENT] [-- SERVE_FLAGS ...]",
        description="Start `vlm-tools serve` over stdio and call every tool on an image and a PDF, as an agent "
        "would. Each result is printed as JSON (the raw model output left out).",
        epilog="Flags after -- go to `vlm-tools serve`, e.g. -- --model tests/fixtures/models/molmo2-ui --model "
        "tests/fixtures/models/paligemma-ui (the small trained fixtures) or -- --model allenai/Molmo2-4B (run "
        "`vlm-tools pull` first). Without them the server runs tiny random models built on the spot (noise answers).",
    )
    parser.add_argument("image", nargs="?", type=Path, help="Image to ask about (default: a generated screenshot).")
    parser.add_argument("document", nargs="?", type=Path, help="PDF to read (default: a generated two-page PDF).")
    args = parser.parse_args(argv)
    for path in (args.image, args.document):
        if path is not None and not path.is_file():
            parser.error(f"{path} is not a file")
    return args, serve_flags


def tiny_models(folder: Path) -> list[str]:
    """Server flags for the tiny random test models, built into ``folder``."""
    from vlm_tools.testing.tiny_molmo2 import build_tiny_molmo2
    from vlm_tools.testing.tiny_paligemma import build_tiny_paligemma

    molmo2 = build_tiny_molmo2(folder / "tiny-molmo2")
    paligemma = build_tiny_paligemma(folder / "tiny-paligemma")
    return ["--model", str(molmo2), "--model", str(paligemma), "--max-new-tokens", "32"]


def demo_files(folder: Path) -> tuple[Path, Path]:
    """A screenshot-like PNG with two buttons, and a two-page PDF of it."""
    image = Image.new("RGB", (1280, 720), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((200, 300, 420, 380), radius=16, fill=(220, 40, 40))
    draw.rounded_rectangle((800, 420, 1000, 500), radius=16, fill=(40, 80, 220))
    shot = folder / "demo.png"
    image.save(shot)
    pdf = folder / "demo.pdf"
    image.save(pdf, save_all=True, append_images=[image])
    return shot, pdf


def show(name: str, result: Any) -> bool:
    """Print one tool's result (or its error); whether it succeeded."""
    print(f"\n== {name}")
    if result.is_error:
        print("error:", " ".join(getattr(block, "text", "") for block in result.content))
        return False
    data = dict(result.structured_content)
    data.pop("raw", None)
    for page in data.get("pages", ()):
        page.pop("raw", None)
    print(json.dumps(data, indent=2))
    return True


async def call_every_tool(client: Client, shot: Path, pdf: Path) -> bool:
    """Each tool once, the image sent once and then named by its ``image_id``; whether all succeeded."""
    tools = (await client.list_tools()).tools
    print("tools:", ", ".join(t.name for t in tools))
    first = await client.call_tool("describe_image", {"image": str(shot)})
    ok = show("describe_image", first)
    # Reuse: the image is not sent again. Without an id (the first call failed) the path goes each time.
    image = first.structured_content["image_id"] if ok else str(shot)
    calls = [
        ("answer_about_image", {"image": image, "question": "What colour is the left button?"}),
        ("point_to_object", {"image": image, "description": "the red button", "frame": {"width": 640, "height": 360}}),
        ("detect", {"image": image, "labels": ["blue button"]}),
        ("read_document", {"document": str(pdf), "pages": "1"}),
    ]
    for name, arguments in calls:
        ok = show(name, await client.call_tool(name, arguments)) and ok
    return ok


async def main(args: argparse.Namespace, serve_flags: list[str]) -> int:
    folder = Path(tempfile.mkdtemp())
    shot, pdf = demo_files(folder)
    shot = args.image.resolve() if args.image else shot
    pdf = args.document.resolve() if args.document else pdf
    serve_flags = serve_flags or tiny_models(folder)
    command = shutil.which("vlm-tools") or str(Path(sys.executable).with_name("vlm-tools"))
    allow = ["--allow-path", str(folder), "--allow-path", str(shot.parent), "--allow-path", str(pdf.parent)]
    # The whole environment: the SDK passes only a few variables by default, and the server needs HF_TOKEN,
    # HF_HOME, HF_HUB_OFFLINE and any VLM_TOOLS_* settings of this shell.
    params = StdioServerParameters(command=command, args=["serve", *allow, *serve_flags], env=dict(os.environ))
    async with Client(params) as client:
        return 0 if await call_every_tool(client, shot, pdf) else 1


def first_leaf(error: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def run(argv: list[str]) -> int:
    """Run the example; the exit code (0: every tool answered, 1: a tool failed, 2: no server)."""
    args, serve_flags = parse_args(argv)
    code = 2
    try:
        code = asyncio.run(main(args, serve_flags))
    except* MCPError as group:
        # The server went away (it could not load a model, or stopped): its own messages are above, on stderr.
        print(f"client.py: the server stopped ({first_leaf(group)}); its messages are above", file=sys.stderr)
    except* KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
