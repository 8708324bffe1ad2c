"""The server as a user starts it: ``vlm-tools serve`` over stdio and over streamable HTTP, with a tiny model."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
from helpers import png_bytes
from mcp import Client, StdioServerParameters

VLM_TOOLS = str(Path(sys.executable).with_name("vlm-tools"))
TOKEN = "test-token-1234"


def _pdf(pages: int) -> bytes:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    for _ in range(pages):
        doc.new_page(300, 200)
    buffer = io.BytesIO()
    doc.save(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transport")
    (root / "shot.png").write_bytes(png_bytes(320, 200))
    (root / "doc.pdf").write_bytes(_pdf(2))
    return root


def _calls(workdir: Path) -> list[tuple[str, dict[str, object]]]:
    shot = str(workdir / "shot.png")
    return [
        ("describe_image", {"image": shot}),
        ("answer_about_image", {"image": shot, "question": "What colour is it?"}),
        ("point_to_object", {"image": shot, "description": "the square", "frame": {"width": 160, "height": 100}}),
        ("detect", {"image": shot, "labels": ["square", "circle"], "annotate": True}),
        ("read_document", {"document": str(workdir / "doc.pdf"), "pages": "1-2"}),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # A random tiny model never says end-of-text: a low token cap keeps every call short.
    env.update({"HF_HUB_OFFLINE": "1", "VLM_TOOLS_LOG_LEVEL": "warning", "VLM_TOOLS_MAX_NEW_TOKENS": "24",
                "OMP_NUM_THREADS": "1"})
    return env


async def _exercise(client: Client, workdir: Path) -> dict[str, str]:
    """List the tools and call each one; check structured content against the published outputSchema."""
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {name for name, _ in _calls(workdir)}
    image_ids = {}
    for name, args in _calls(workdir):
        result = await client.call_tool(name, args)
        assert not result.is_error, (name, result.content)
        jsonschema.validate(result.structured_content, tools[name].output_schema)
        text = json.loads(result.content[0].text)
        assert text == result.structured_content
        if name != "read_document":
            image_ids[name] = result.structured_content["image_id"]
    return image_ids


# --- stdio ---------------------------------------------------------------------------------------------------


async def test_stdio_subprocess_every_tool(tiny_paligemma_dir: Path, workdir: Path) -> None:
    params = StdioServerParameters(
        command=VLM_TOOLS,
        args=["serve", "--model", str(tiny_paligemma_dir), "--allow-path", str(workdir), "--device", "cpu"],
        env=_env(),
        cwd=str(workdir),
    )
    async with Client(params) as client:
        await _exercise(client, workdir)


def test_stdio_stdout_carries_only_protocol(tiny_paligemma_dir: Path, workdir: Path) -> None:
    """Raw JSON-RPC over the pipes: every line the server writes to stdout is a JSON-RPC message."""
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    ]  # fmt: skip
    for i, (name, args) in enumerate(_calls(workdir), start=3):
        messages.append({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": name, "arguments": args}})
    proc = subprocess.Popen(
        [VLM_TOOLS, "serve", "--model", str(tiny_paligemma_dir), "--allow-path", str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=str(workdir),
    )  # fmt: skip
    assert proc.stdin and proc.stdout
    lines = []
    for message in messages:
        proc.stdin.write((json.dumps(message) + "\n").encode())
        proc.stdin.flush()
        if "id" in message:
            while True:  # read until this request's response (notifications may come first)
                line = proc.stdout.readline()
                assert line, proc.stderr.read().decode() if proc.stderr else "server closed stdout"
                lines.append(line)
                if json.loads(line).get("id") == message["id"]:
                    break
    # Closing stdin is the client going away: the server drains and exits. Read the rest through the same
    # buffered reader that readline() used (communicate() would bypass bytes it has already read ahead).
    proc.stdin.close()
    rest = proc.stdout.read()
    err = proc.stderr.read() if proc.stderr else b""
    proc.wait(timeout=60)
    lines.extend(rest.splitlines(keepends=True))
    assert proc.returncode == 0, err.decode()[-2000:]
    for line in lines:
        message = json.loads(line)
        assert message["jsonrpc"] == "2.0"
    responses = [json.loads(line) for line in lines if "id" in json.loads(line)]
    calls = [r for r in responses if r["id"] >= 3]
    assert len(calls) == 5 and all(not r["result"].get("isError") for r in calls)
    assert b"Traceback" not in err


# --- streamable HTTP -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server(tiny_paligemma_dir: Path, workdir: Path) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [VLM_TOOLS, "serve", "--transport", "http", "--port", str(port), "--model", str(tiny_paligemma_dir),
         "--allow-path", str(workdir), "--auth-token", TOKEN],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=str(workdir),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "server exited")
        time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError("HTTP server did not become healthy")
    yield base
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _client(base: str, token: str | None = TOKEN, mode: str = "auto") -> Client:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = streamable_http_client(f"{base}/mcp", http_client=httpx2.AsyncClient(headers=headers, timeout=60))
    return Client(transport, mode=mode)


async def test_http_every_tool(http_server: str, workdir: Path) -> None:
    async with _client(http_server) as client:
        await _exercise(client, workdir)


async def test_http_sessions_do_not_share_image_ids(http_server: str, workdir: Path) -> None:
    # Sessions (Mcp-Session-Id) exist up to protocol revision 2025-11-25: "legacy" mode in this client.
    async with _client(http_server, mode="legacy") as first, _client(http_server, mode="legacy") as second:
        made = await first.call_tool("describe_image", {"image": str(workdir / "shot.png")})
        image_id = made.structured_content["image_id"]
        mine = await first.call_tool("answer_about_image", {"image": image_id, "question": "What is it?"})
        assert not mine.is_error
        theirs = await second.call_tool("answer_about_image", {"image": image_id, "question": "What is it?"})
        assert theirs.is_error
        assert "unknown_image_id" in theirs.content[0].text


_INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}  # fmt: skip
_MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"Authorization": f"Bearer {TOKEN}", "Host": "evil.example:80"}, 421),
        ({"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}, 403),
        ({"Authorization": f"Bearer {TOKEN}", "Origin": "null"}, 403),
    ],
    ids=["ok", "no_token", "wrong_token", "wrong_scheme", "bad_host", "bad_origin", "null_origin"],
)
def test_http_guards(http_server: str, headers: dict[str, str], status: int) -> None:
    response = httpx.post(f"{http_server}/mcp", json=_INIT, headers={**_MCP_HEADERS, **headers}, timeout=10)
    assert response.status_code == status, response.text


def test_health_needs_no_token_and_metrics_do(http_server: str) -> None:
    health = httpx.get(f"{http_server}/health", timeout=5)
    assert health.status_code == 200 and health.json()["ok"] is True
    assert httpx.get(f"{http_server}/metrics", timeout=5).status_code == 401
    metrics = httpx.get(f"{http_server}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert metrics.status_code == 200 and "vlm_tools_requests_total" in metrics.text


def test_body_limit_refuses_oversized_requests(http_server: str) -> None:
    # Defaults allow 20 MB inline images: ~26.7 MB of base64 plus the envelope. 40 MB is refused unread.
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"describe_image","arguments":{"image":"' + (
        b"A" * 40_000_000
    ) + b'"}}}'
    response = httpx.post(
        f"{http_server}/mcp", content=body, headers={**_MCP_HEADERS, "Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert response.status_code == 413


def test_public_bind_without_token_is_refused(tiny_paligemma_dir: Path) -> None:
    proc = subprocess.run(
        [VLM_TOOLS, "serve", "--transport", "http", "--host", "0.0.0.0", "--port", "0", "--model", "x"],
        capture_output=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert b"--auth-token" in proc.stderr
    assert proc.stdout == b""
