"""The ``vlm-tools`` command: ``serve`` runs the MCP server; the one-shot verbs call one tool and print its JSON.

One-shot verbs go through the very same server and tool code as an MCP client would (an in-memory client), so
what they print is exactly the tool's structured result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from . import __version__
from .errors import VlmToolsError
from .settings import Settings, add_arguments, from_arguments

logger = logging.getLogger("vlm_tools")


def _frame(text: str) -> dict[str, float]:
    try:
        width, _, height = text.lower().partition("x")
        return {"width": float(width), "height": float(height)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"frame must be WIDTHxHEIGHT, e.g. 1280x720, not {text!r}") from None


ANNOTATED_HELP = (
    "Also write the image with the results drawn on it to this PNG file, scaled down to at most 1024 px on its long "
    "side (the coordinates in the JSON stay those of the input image)."
)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser (every subcommand documents every setting)."""
    parser = argparse.ArgumentParser(
        prog="vlm-tools", description="An MCP server that gives agents eyes they can act on."
    )
    parser.add_argument("--version", action="version", version=f"vlm-tools {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, **settings: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p, **{"serving": False, **settings})
        return p

    command("serve", "Run the MCP server (stdio by default; --transport http for streamable HTTP).", serving=True)

    p = command("pull", "Download models into the Hugging Face cache (saying first how much), so serve starts at "
                "once and offline.", only=("model", "log_level"))  # fmt: skip
    p.add_argument("models", nargs="*", metavar="MODEL", help="Hub id (org/name, or org/name@<commit, branch or "
                   "tag>) or local directory; default: the configured models (--model, VLM_TOOLS_MODEL).")  # fmt: skip

    p = command("describe", "Describe an image and print the JSON result.")
    p.add_argument("image", help="Path, URL, data: URI or base64 of the image.")
    p.add_argument("--detail", choices=("brief", "detailed"), default="brief")
    p.add_argument("--language", default="en")

    p = command("ask", "Answer a question about an image.")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--language", default="en")

    p = command("point", "Point to objects in an image.")
    p.add_argument("image")
    p.add_argument("description")
    p.add_argument("--max-points", type=int, default=10)
    p.add_argument("--frame", type=_frame, help="Caller frame WIDTHxHEIGHT, e.g. 1280x720.")
    p.add_argument("--annotated", metavar="PNG", help=ANNOTATED_HELP)

    p = command("detect", "Detect objects with boxes.")
    p.add_argument("image")
    p.add_argument("labels", nargs="+", metavar="LABEL")
    p.add_argument("--frame", type=_frame, help="Caller frame WIDTHxHEIGHT, e.g. 1280x720.")
    p.add_argument("--annotated", metavar="PNG", help=ANNOTATED_HELP)

    p = command("read", "Read the text of a PDF or an image, page by page.")
    p.add_argument("document")
    p.add_argument("--pages", help="e.g. 1-3,5")

    p = command("doctor", "Report what this machine has for serving (Python, torch, GPU, models, inputs, browser).")
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")

    p = command("eval", "Measure grounding accuracy of the loaded models on generated screenshots.")
    p.add_argument("--seed", type=int, default=1234, help="Scene seed (the fixture models never trained on 1234).")
    p.add_argument("--count", type=int, default=40, help="Images per size.")
    p.add_argument("--sizes", default="1280x720,600x900,1000x1000", help="Canvas sizes, WIDTHxHEIGHT,...")
    p.add_argument("--out", help="Write the JSON report here.")
    p.add_argument("--min-inside", type=float, default=0.95, help="Target share of points inside their target.")
    p.add_argument("--min-iou", type=float, default=0.7, help="Target mean IoU of detect boxes.")

    return parser


def _tool_call(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    cmd = args.command
    if cmd == "describe":
        return "describe_image", {"image": args.image, "detail": args.detail, "language": args.language}
    if cmd == "ask":
        return "answer_about_image", {"image": args.image, "question": args.question, "language": args.language}
    if cmd == "point":
        call = {"image": args.image, "description": args.description, "max_points": args.max_points}
        if args.frame:
            call["frame"] = args.frame
        call["annotate"] = bool(args.annotated)
        return "point_to_object", call
    if cmd == "detect":
        call = {"image": args.image, "labels": args.labels, "annotate": bool(args.annotated)}
        if args.frame:
            call["frame"] = args.frame
        return "detect", call
    if cmd == "read":
        return "read_document", {"document": args.document, "pages": args.pages}
    raise AssertionError(cmd)


async def _call(settings: Settings, name: str, arguments: dict[str, Any]) -> Any:
    from mcp import Client

    from .server import build_server

    async with Client(build_server(settings)) as client:
        return await client.call_tool(name, arguments)


def _one_shot(settings: Settings, args: argparse.Namespace) -> int:
    import base64
    from pathlib import Path

    name, arguments = _tool_call(args)
    result = asyncio.run(_call(settings, name, arguments))
    if result.is_error:
        text = " ".join(getattr(block, "text", "") for block in result.content)
        print(text, file=sys.stderr)
        return 1
    print(json.dumps(result.structured_content, indent=2))
    path = getattr(args, "annotated", None)
    if path:
        images = [block for block in result.content if getattr(block, "type", None) == "image"]
        if not images:
            print(f"vlm-tools: no annotated image came back; {path} not written", file=sys.stderr)
            return 1
        Path(path).write_bytes(base64.b64decode(images[0].data))
        print(_wrote(path, result.structured_content["image_size"]), file=sys.stderr)
    return 0


def _wrote(path: str, input_size: dict[str, int]) -> str:
    """``wrote marked.png at 1024x576 (the input is 1280x720; …)``: the annotated image is at most 1024 px long."""
    from PIL import Image

    with Image.open(path) as written:
        width, height = written.size
    line = f"wrote {path} at {width}x{height}"
    if (width, height) != (input_size["width"], input_size["height"]):
        line += (f" (the input is {input_size['width']}x{input_size['height']}; coordinates in the JSON are the "
                 "input's)")  # fmt: skip
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vlm-tools`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = from_arguments(args)
    except ValidationError as exc:
        parser.error(str(exc))
    from .logs import configure

    configure(settings.log_level)
    try:
        if args.command == "serve":
            from .serve import serve

            return serve(settings)
        if args.command == "eval":
            from .evaluation import run_eval

            return run_eval(settings, args)
        if args.command == "pull":
            from .pull import run_pull

            return run_pull(args.models or settings.model)
        if args.command == "doctor":
            from .doctor import run_doctor

            return run_doctor(settings, as_json=args.json)
        return _one_shot(settings, args)
    except VlmToolsError as exc:
        print(f"vlm-tools: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
