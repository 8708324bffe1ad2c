"""Answer at once: the MCP handshake within seconds whatever the weights take, progress while they load, a model
that cannot load failing only its own calls, and weights freed when idle and loaded again on the next call.

The stdio tests speak raw JSON-RPC to ``vlm-tools serve``, as Claude Desktop, Claude Code and Codex do, with every
model load slowed by ``tests/slow_load`` so that the first call surely arrives while the weights load.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import png_bytes, settings_for
from mcp import Client
from scripted import ScriptedBackend, molmo2_script, paligemma_script
from server_process import VLM_TOOLS, server_env

from vlm_tools.backends.resident import ResidentModel
from vlm_tools.families import get_family
from vlm_tools.server import build_server

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "models"
SLOW_LOAD = Path(__file__).resolve().parent / "slow_load"
HANDSHAKE_LIMIT_S = 3.0
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(160, 100)).decode()


class StdioPeer:
    """``vlm-tools serve`` over stdio, spoken to in raw JSON-RPC lines; stderr is kept in a file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        self.proc = subprocess.Popen([VLM_TOOLS, "serve", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("wb"), env=env, cwd=str(cwd))  # fmt: skip
        self.notes: list[dict] = []

    def send(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def answer(self, request_id: int, timeout: float = 120.0) -> dict:
        """The response to ``request_id``; notifications that come before it are kept in :attr:`notes`."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            assert line, f"the server closed stdout; its log:\n{self.log.read_text()}"
            message = json.loads(line)  # every stdout line is protocol: anything else would fail here
            if message.get("id") == request_id:
                return message
            self.notes.append(message)
        raise AssertionError(f"no answer to request {request_id}; log:\n{self.log.read_text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # a client that goes away: the server drains and exits
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def slow_env(delay_s: float, **settings: object) -> dict[str, str]:
    env = server_env(**settings)
    env["VLM_TOOLS_TEST_SLOW_LOAD_S"] = str(delay_s)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SLOW_LOAD), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[StdioPeer]:
    args = ["--model", str(FIXTURES / "molmo2-ui"), "--model", str(FIXTURES / "paligemma-ui")]
    server = StdioPeer(args, slow_env(6.0), tmp_path, tmp_path / "server.log")
    yield server
    server.close()


INITIALIZE = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}


def test_the_handshake_comes_at_once_and_the_first_call_after_the_weights_with_progress(peer: StdioPeer) -> None:
    peer.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE})
    initialized = peer.answer(1, timeout=30)
    handshake_s = time.monotonic() - peer.started
    assert initialized["result"]["serverInfo"]["name"] == "vlm-tools"
    peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    peer.send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    tools = {tool["name"] for tool in peer.answer(2, timeout=30)["result"]["tools"]}
    listed_s = time.monotonic() - peer.started
    assert handshake_s < HANDSHAKE_LIMIT_S and listed_s < HANDSHAKE_LIMIT_S, (handshake_s, listed_s)
    assert tools == {"describe_image", "answer_about_image", "point_to_object", "detect", "read_document"}

    peer.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "point_to_object", "arguments": {"image": IMAGE, "description": "red button"},
        "_meta": {"progressToken": "call-3"}}})  # fmt: skip
    result = peer.answer(3)["result"]
    assert not result.get("isError"), result
    assert result["structuredContent"]["model"].endswith("molmo2-ui")
    progress = [n["params"] for n in peer.notes if n.get("method") == "notifications/progress"]
    assert progress, "no progress while the weights loaded"
    assert all(p["progressToken"] == "call-3" and "loading" in p["message"] and "molmo2-ui" in p["message"]
               for p in progress)  # fmt: skip
    values = [p["progress"] for p in progress]
    assert values == sorted(set(values)) and values[-1] < 1  # growing with every notification, below done
    assert "ready: answering MCP" in peer.log.read_text()


def test_a_call_past_its_time_limit_while_loading_says_so(tmp_path: Path) -> None:
    args = ["--model", str(FIXTURES / "paligemma-ui"), "--request-timeout-s", "1.5"]
    server = StdioPeer(args, slow_env(30.0), tmp_path, tmp_path / "server.log")
    try:
        server.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE})
        server.answer(1, timeout=30)
        server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        server.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "detect", "arguments": {"image": IMAGE, "labels": ["button"]}}})  # fmt: skip
        started = time.monotonic()
        result = server.answer(2, timeout=30)["result"]
        assert time.monotonic() - started < 10
        assert result["isError"] and result["content"][0]["text"].startswith("timeout: ")
        assert "still loading" in result["content"][0]["text"]
    finally:
        server.close()


# --- in memory: a model that cannot load, idle unload ----------------------------------------------------------


def resident(family: str, load, name: str | None = None) -> ResidentModel:
    return ResidentModel(name or f"resident-{family}", get_family(family), load)


async def test_a_model_that_cannot_load_fails_its_own_calls_and_the_other_serves(tmp_path: Path) -> None:
    def broken() -> ScriptedBackend:
        raise OSError("model.safetensors: header too large (the file is not a safetensors file)")

    boxes = resident("paligemma", broken, "acme/broken-paligemma")
    points = resident("molmo2", lambda: ScriptedBackend("molmo2", molmo2_script))
    server = build_server(settings_for(tmp_path), load_backends=lambda _s: [points, boxes])
    async with Client(server) as client:
        detect = await client.call_tool("detect", {"image": IMAGE, "labels": ["button"]})
        assert detect.is_error
        text = detect.content[0].text
        assert text.startswith("model_unavailable: ") and "acme/broken-paligemma" in text and "header too large" in text
        point = await client.call_tool("point_to_object", {"image": IMAGE, "description": "red button"})
        assert not point.is_error and point.structured_content["found"] is True
        health = server.runtime.health()
        assert health["models"]["acme/broken-paligemma"]["state"] == "failed"
        assert health["models"][points.name]["state"] == "ready" and health["ok"] is True


async def test_health_says_loading_then_ready(tmp_path: Path) -> None:
    release = threading.Event()

    def slow() -> ScriptedBackend:
        release.wait(30)
        return ScriptedBackend("paligemma", paligemma_script)

    model = resident("paligemma", slow)
    server = build_server(settings_for(tmp_path), load_backends=lambda _s: [model])
    async with Client(server):
        health = server.runtime.health()
        assert health["ok"] is False and health["models"][model.name]["state"] == "loading"
        release.set()
        for _ in range(200):
            if server.runtime.health()["ok"]:
                break
            await asyncio.sleep(0.02)
        assert server.runtime.health()["models"][model.name]["state"] == "ready"


async def test_idle_weights_are_freed_and_the_next_call_loads_them_again_with_progress(tmp_path: Path) -> None:
    closed: list[ScriptedBackend] = []

    class Closing(ScriptedBackend):
        def close(self) -> None:
            closed.append(self)

    def load() -> Closing:
        if closed:  # loading again takes a while, as real weights do: the call hears about it
            time.sleep(1.5)
        return Closing("paligemma", paligemma_script)

    model = resident("paligemma", load)
    server = build_server(settings_for(tmp_path, idle_unload_s=0.3), load_backends=lambda _s: [model])
    heard: list[tuple[float, str]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        heard.append((value, message or ""))

    async with Client(server) as client:
        first = await client.call_tool("detect", {"image": IMAGE, "labels": ["button"]})
        assert not first.is_error and model.loads == 1
        for _ in range(200):  # the idle timer frees the weights
            if model.state == "unloaded":
                break
            await asyncio.sleep(0.02)
        assert model.state == "unloaded" and len(closed) == 1
        assert server.runtime.health()["models"][model.name]["state"] == "unloaded"
        again = await client.call_tool("detect", {"image": IMAGE, "labels": ["button"]}, progress_callback=progress)
        assert not again.is_error and model.loads == 2
        assert again.structured_content == first.structured_content | {"image_id": again.structured_content["image_id"]}
    assert heard and all("loading resident-paligemma" in message for _, message in heard)
