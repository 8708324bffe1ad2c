"""Stopping under load, and what cancelled work costs.

* HTTP: SIGTERM while calls are queued and running. The server stops accepting connections and drains
  (queued calls are answered ``shutting_down`` at once, running ones finish within the drain time), so every call
  it holds gets a result or a typed error on its own connection; later calls are answered ``shutting_down`` or
  refused by the closed listener, never left hanging; the process exits 0 within the drain time plus a margin.
* stdio: closing stdin while calls are in flight. This is the MCP SDK's ground (mcp 2.3, ``JSONRPCDispatcher``):
  at end of input it cancels the handlers still running and writes a JSON-RPC error ``Connection closed``
  (-32000) for each, while finished calls keep their results; the engine withdraws the cancelled requests, so
  the process exits 0 at once. (The SDK documents one narrow exception: an answer whose write had already
  started is not followed by that error, as it prefers "possibly zero answers over possibly two"; closing stdin
  right as a batch's answers are written, as this test does, every call still got exactly one answer.)
* Cancellation: a call cancelled while queued never reaches the model; one cancelled while generating stops at
  its next token, while the rest of its batch and later calls go on. Counted in tokens through the real server
  with the scripted fake model, and as time-to-idle over HTTP with the real tiny model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import anyio
import httpx
import pytest
from fakes import FakeBackend, eventually
from helpers import loader, png_bytes, settings_for
from mcp import Client
from server_process import (
    VLM_TOOLS,
    Call,
    ServerProcess,
    http_client,
    outcome,
    record_call,
    server_env,
    with_http_client,
)

from vlm_tools.backends.base import Task
from vlm_tools.server import build_server

CALL_TIMEOUT_S = 40.0
"""Longer than any call may take here (drain included): reaching it means a call hung."""


# --- HTTP: SIGTERM under load --------------------------------------------------------------------------------

DRAIN_S = 4.0
EXIT_MARGIN_S = 10.0
"""After the drain: uvicorn's grace for writing responses (3 s at most) and interpreter teardown (~2 s)."""


@pytest.mark.timeout(150)
async def test_sigterm_under_load_answers_every_accepted_call(tiny_paligemma_dir: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    shot.write_bytes(png_bytes(160, 100))
    point = {"image": str(shot), "description": "the square"}
    # Pointing may take 384 new tokens: a batch of 4 runs for a second or more here, so at the signal 4 calls run
    # and 8 wait.
    args = ["--model", str(tiny_paligemma_dir), "--allow-path", str(tmp_path), "--max-batch-size", "4",
            "--drain-timeout-s", str(DRAIN_S)]  # fmt: skip
    server = ServerProcess(args, server_env(), tmp_path, tmp_path / "server.log")
    accepted: list[Call] = []  # calls the server is known to hold at the signal (its engine counts them)
    extra: list[Call] = []  # calls of clients that keep sending through the shutdown
    stop = anyio.Event()

    async def one_call(client: object, mine: list[Call]) -> None:
        await record_call(client, "point_to_object", point, mine, accepted, timeout=CALL_TIMEOUT_S)

    async def keep_calling(client: object, mine: list[Call]) -> None:
        while not stop.is_set():
            call = await record_call(client, "point_to_object", point, mine, extra, timeout=CALL_TIMEOUT_S)
            if call.result.startswith("transport") or call.result == "hang":
                return
            if call.result != "ok":
                await anyio.sleep(0.05)  # refused at once: do not spin

    def all_accepted() -> bool:
        done = sum(1 for c in accepted if c.result != "pending")  # read first: a call ending later stays counted
        return len(accepted) == 12 and done + _in_engine(server) >= 12

    with server:
        async with anyio.create_task_group() as group:
            for _ in range(12):
                group.start_soon(with_http_client, server.base, one_call)
            await eventually_async(all_accepted, 60, "12 calls queued or running")
            for _ in range(4):
                group.start_soon(with_http_client, server.base, keep_calling)
            await anyio.sleep(0.5)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            returncode = await anyio.to_thread.run_sync(lambda: server.proc.wait(DRAIN_S + EXIT_MARGIN_S + 30))
            exited_after = time.monotonic() - signalled
            stop.set()
        log = server.log_tail()

    assert returncode == 0, log
    assert exited_after <= DRAIN_S + EXIT_MARGIN_S, f"exit took {exited_after:.1f} s\n{log}"
    assert not [c for c in accepted + extra if c.result == "hang"], "a call hung"
    # Every call the server held is answered on its own connection: a result (it ran within the drain time) or
    # shutting_down (it was still waiting, or did not finish in time).
    results = [c.result for c in accepted]
    assert set(results) <= {"ok", "shutting_down"}, results
    assert "shutting_down" in results, "the waiting calls should have been refused at once"
    # The others: answered, or refused by the closed listener (the MCP client then fails as a whole); never
    # accepted and then dropped, never left hanging.
    refused = ("transport:", "client_failed:")
    others = {c.result for c in extra}
    assert not {r for r in others if r not in ("ok", "shutting_down") and not r.startswith(refused)}, others
    assert "Traceback" not in log


def _in_engine(server: ServerProcess) -> int:
    try:
        _, body = server.health()
    except httpx.HTTPError:
        return 0
    return sum(model["queued"] + model["running"] for model in body["models"].values())


async def eventually_async(predicate: object, timeout: float, what: str) -> None:
    """Poll a blocking ``predicate`` in a worker thread until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await anyio.to_thread.run_sync(predicate):  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


# --- stdio: stdin closes while calls are in flight ---------------------------------------------------------


@pytest.mark.timeout(120)
def test_stdio_stdin_closed_in_flight_every_call_answered(tiny_paligemma_dir: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    shot.write_bytes(png_bytes(160, 100))
    proc = subprocess.Popen(
        [VLM_TOOLS, "serve", "--model", str(tiny_paligemma_dir), "--allow-path", str(tmp_path),
         "--max-batch-size", "2", "--drain-timeout-s", str(DRAIN_S)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
        env=server_env(max_new_tokens=1000),
        # Unbuffered: communicate() reads the pipe itself, so bytes a buffered readline() had read ahead are lost.
        bufsize=0,
    )  # fmt: skip
    assert proc.stdin and proc.stdout

    def send(message: dict[str, object]) -> None:
        proc.stdin.write((json.dumps(message) + "\n").encode())  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def read_message() -> dict[str, object]:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, "server closed stdout early"
        return _json_line(line)

    try:
        send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})  # fmt: skip
        assert read_message()["id"] == 0
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        ids = list(range(1, 7))
        for i in ids:
            send({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                  "params": {"name": "read_document", "arguments": {"document": str(shot)}}})  # fmt: skip
        # One answer is back: its batch-mate's answer is being written, the model starts the next batch (two
        # readings of 1000 tokens: seconds) and two calls wait. The client goes away now.
        lines = [read_message()]
        closed = time.monotonic()
        rest, err = proc.communicate(timeout=DRAIN_S + EXIT_MARGIN_S + 30)  # closes stdin: the client is gone
        exited_after = time.monotonic() - closed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += [_json_line(line) for line in rest.splitlines()]
    log = err.decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    assert exited_after <= DRAIN_S + EXIT_MARGIN_S, f"exit took {exited_after:.1f} s"
    answers = [m for m in lines if "id" in m]
    assert sorted(m["id"] for m in answers) == ids, "every call gets exactly one answer"
    kinds = [_stdio_kind(m) for m in answers]
    assert set(kinds) <= {"ok", "connection_closed", "shutting_down"}, kinds
    assert "connection_closed" in kinds or "shutting_down" in kinds, f"no call was cut: {kinds}"
    assert "Traceback" not in log


def _json_line(line: bytes) -> dict[str, object]:
    """One line of the server's stdout, which must be a JSON-RPC message and nothing else."""
    try:
        message = json.loads(line)
    except ValueError:
        raise AssertionError(f"stdout carried a line that is not JSON-RPC: {line[:300]!r}") from None
    assert isinstance(message, dict) and message.get("jsonrpc") == "2.0", line[:300]
    return message


def _stdio_kind(message: dict[str, object]) -> str:
    if "error" in message:
        error = message["error"]
        assert isinstance(error, dict)
        return "connection_closed" if error.get("message") == "Connection closed" else f"jsonrpc:{error}"
    result = message["result"]
    assert isinstance(result, dict)
    if not result.get("isError"):
        return "ok"
    text = result["content"][0]["text"]
    return "shutting_down" if "shutting_down:" in text else f"tool_error:{text[:80]}"


# --- cancellation cost ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_cancelled_calls_stop_costing_compute(tmp_path: Path) -> None:
    """Through the server: the queued call never runs; the generating call stops within a few tokens."""
    tokens = 100
    fake = FakeBackend("fake/model", token_delay_s=0.01)
    server = build_server(
        settings_for(tmp_path, max_batch_size=1, max_new_tokens=tokens, batch_wait_ms=0.0), load_backends=loader(fake)
    )
    shot = tmp_path / "shot.png"
    shot.write_bytes(png_bytes(32, 32))
    async with Client(server) as client:
        made = await client.call_tool("describe_image", {"image": str(shot)})
        assert outcome(made) == "ok"
        image = made.structured_content["image_id"]
        fake.batches.clear()
        fake.tokens.clear()
        results: dict[str, str] = {}
        scopes: dict[str, anyio.CancelScope] = {}
        engine = server.runtime.engine if server.runtime else None
        assert engine is not None

        async def ask(question: str) -> None:
            with anyio.CancelScope() as scope:
                scopes[question] = scope
                results[question] = outcome(
                    await client.call_tool("answer_about_image", {"image": image, "question": question})
                )
            if scope.cancelled_caught:
                results[question] = "cancelled"

        async with anyio.create_task_group() as group:
            group.start_soon(ask, "running")
            await eventually(lambda: fake.tokens_of("running") > 0, what="the first call generating")
            group.start_soon(ask, "queued")  # waits behind it
            await eventually(lambda: engine.queue_depth == 1, what="the second call queued")
            group.start_soon(ask, "kept")  # waits too, and must still run after the cancellations
            await eventually(lambda: engine.queue_depth == 2, what="the third call queued")
            scopes["queued"].cancel()  # the caller gives up while its call waits
            scopes["running"].cancel()  # and this one while the model is generating it
        assert results == {"running": "cancelled", "queued": "cancelled", "kept": "ok"}
        assert "queued" not in fake.texts_run, "a call cancelled while queued reached the model"
        stopped_at = fake.tokens_of("running")
        assert 0 < stopped_at < tokens, stopped_at  # it stopped before its limit
        assert fake.tokens_of("running") == stopped_at  # and stays stopped
        assert fake.tokens_of("kept") == tokens
        assert [b.texts for b in fake.batches if b.task is Task.ANSWER] == [("running",), ("kept",)]


@pytest.mark.timeout(120)
async def test_cancelled_http_calls_leave_the_real_model_idle(tiny_paligemma_dir: Path, tmp_path: Path) -> None:
    """Over HTTP with the real tiny model: once the callers give up, the engine is idle long before the work
    they asked for would have been done."""
    shot = tmp_path / "shot.png"
    shot.write_bytes(png_bytes(160, 100))
    read = {"document": str(shot)}  # reading an image: up to 1000 new tokens, a second or more here
    args = ["--model", str(tiny_paligemma_dir), "--allow-path", str(tmp_path), "--max-batch-size", "2"]
    with ServerProcess(args, server_env(max_new_tokens=1000), tmp_path, tmp_path / "server.log") as server:
        async with http_client(server.base) as client:
            started = time.monotonic()
            full = await client.call_tool("read_document", read)  # one call, not cancelled: what one costs
            one_call_s = time.monotonic() - started
            assert outcome(full) == "ok", server.log_tail()

            async def give_up() -> None:
                with anyio.move_on_after(0.5):
                    await client.call_tool("read_document", read)

            async with anyio.create_task_group() as group:
                for _ in range(6):  # three batches of two: seconds of work, abandoned after half a second
                    group.start_soon(give_up)
            cancelled_at = time.monotonic()
            await eventually_async(lambda: _in_engine(server) == 0, 30, "the engine to go idle")
            idle_after = time.monotonic() - cancelled_at
            # The server still serves, and the abandoned work did not linger in front of this call.
            started = time.monotonic()
            again = await client.call_tool("read_document", read)
            again_s = time.monotonic() - started
        assert outcome(again) == "ok"
        status, body = server.health()
        log = server.log_tail()
    assert status == 200 and body["ok"], body
    assert idle_after < 0.5 * one_call_s + 0.5, (idle_after, one_call_s, log)
    assert again_s < 2 * one_call_s + 0.5, (again_s, one_call_s)
