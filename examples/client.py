"""Call every vlm-tools tool from an MCP client, over stdio, the way an agent would.

    python examples/client.py                       # tiny random models (noise answers), a generated screenshot
    python examples/client.py shot.png report.pdf -- --model allenai/Molmo2-4B --model google/paligemma2-3b-mix-448

Arguments after ``--`` go to ``vlm-tools serve``. Without them the server runs the tiny random test models, built
on the spot: their answers are noise, but every tool, source and coordinate path runs for real.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

from mcp import Client, StdioServerParameters
from PIL import Image, ImageDraw



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


def show(name: str, result: object) -> None:
    print(f"\n== {name}")
    if result.is_error:  # type: ignore[attr-defined]
        print("error:", result.content[0].text)  # type: ignore[attr-defined]
        return
    data = dict(result.structured_content)  # type: ignore[attr-defined]
    for key in ("raw",):
        data.pop(key, None)
    print(json.dumps(data, indent=2)[:1500])


async def main() -> None:
    args = sys.argv[1:]
    folder = Path(tempfile.mkdtemp())
    server_args: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, server_args = args[:cut], args[cut + 1 :]
    server_args = server_args or tiny_models(folder)
    shot, pdf = demo_files(folder)
    if args:
        shot = Path(args[0]).resolve()
    if len(args) > 1:
        pdf = Path(args[1]).resolve()
    command = shutil.which("vlm-tools") or str(Path(sys.executable).with_name("vlm-tools"))
    allow = ["--allow-path", str(folder), "--allow-path", str(shot.parent), "--allow-path", str(pdf.parent)]
    params = StdioServerParameters(command=command, args=["serve", *allow, *server_args])
    async with Client(params) as client:
        tools = (await client.list_tools()).tools
        print("tools:", ", ".join(t.name for t in tools))
        first = await client.call_tool("describe_image", {"image": str(shot)})
        show("describe_image", first)
        image_id = first.structured_content["image_id"]  # reuse: the image is not sent again
        show("answer_about_image", await client.call_tool(
            "answer_about_image", {"image": image_id, "question": "What colour is the left button?"}))
        show("point_to_object", await client.call_tool(
            "point_to_object", {"image": image_id, "description": "the red button",
                                "frame": {"width": 640, "height": 360}}))
        show("detect", await client.call_tool("detect", {"image": image_id, "labels": ["blue button", "red button"]}))
        show("read_document", await client.call_tool("read_document", {"document": str(pdf), "pages": "1"}))


if __name__ == "__main__":
    asyncio.run(main())
