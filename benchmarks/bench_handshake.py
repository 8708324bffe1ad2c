"""Benchmark: how soon a client that starts ``vlm-tools serve`` over stdio gets its handshake, and its first answer.

Speaks raw JSON-RPC over the server's pipes, as Claude Desktop, Claude Code and Codex do: ``initialize``,
``notifications/initialized``, ``tools/list``, then one ``point_to_object`` call with a progress token. Prints, as
JSON, the seconds from spawn to each answer, and the progress notifications the call received while the weights
loaded. Run from the repository root (the server is the ``vlm-tools`` beside this Python)::

    .venv/bin/python benchmarks/bench_handshake.py --model tests/fixtures/models/molmo2-ui \\
        --model tests/fixtures/models/paligemma-ui
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


class Peer:
    """The server process and its pipes."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("wb"))

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def answer(self, request_id: int, timeout: float = 600.0) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        """The response to ``request_id``, the notifications before it, and the seconds since spawn."""
        assert self.proc.stdout is not None
        notes: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.proc.stdout], [], [], 0.2)[0]:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("the server closed its stdout")
            message = json.loads(line)
            if message.get("id") == request_id:
                return message, notes, time.monotonic() - self.started
            notes.append(message)
        raise SystemExit(f"no answer to request {request_id} within {timeout} s")


def screenshot() -> str:
    image = Image.new("RGB", (320, 200), (250, 250, 250))
    ImageDraw.Draw(image).rectangle((100, 50, 180, 110), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = str(Path(sys.executable).with_name("vlm-tools"))
    command = [server, "serve", *(flag for model in args.model for flag in ("--model", model)), *args.serve_flags]
    peer = Peer(command, Path(args.log))
    init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
    peer.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
    _, _, initialize_s = peer.answer(1)
    peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    peer.send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    _, _, tools_list_s = peer.answer(2)
    peer.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "point_to_object", "arguments": {"image": screenshot(), "description": "red button"},
        "_meta": {"progressToken": "bench"}}})  # fmt: skip
    result, notes, first_call_s = peer.answer(3)
    assert peer.proc.stdin is not None
    peer.proc.stdin.close()
    peer.proc.wait(timeout=60)
    progress = [n["params"] for n in notes if n.get("method") == "notifications/progress"]
    return {
        "initialize_s": round(initialize_s, 2), "tools_list_s": round(tools_list_s, 2),
        "first_call_s": round(first_call_s, 2), "first_call_error": bool(result.get("result", {}).get("isError")),
        "progress_notifications": len(progress), "progress": [(p["progress"], p.get("message")) for p in progress],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="a model to serve (repeatable)")
    parser.add_argument("--log", default="/tmp/bench_handshake.log", help="where the server's stderr goes")
    parser.add_argument("serve_flags", nargs="*", help="more flags for vlm-tools serve (after --)")
    print(json.dumps(run(parser.parse_args()), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
