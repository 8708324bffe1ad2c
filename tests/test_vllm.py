"""The tools served by a real vLLM (its CPU build, ``scripts/setup_vllm.sh``) through ``--backend openai``.

Two vLLM servers for the module, both serving the trained PaliGemma fixture (``tests/fixtures/models/paligemma-ui``,
shaped like the hub's checkpoint): the second one a copy whose ``generation_config.json`` is hostile (sampling,
penalties, a minimum length), which the tools' explicit greedy parameters must override. They cover every tool
through the MCP server, token-for-token parity with transformers, the accuracy suite, a prompt too long for the
context, and — last, because it kills the second server — failover with no call lost.

Parity: vLLM's CPU attention runs PaliGemma causally over its whole prompt (it has no prefix-LM mask), while
transformers makes the image and the prompt one bidirectional prefix, as the model was trained. So vLLM's answers
equal, token for token, those of the in-process backend with its prompt read causally; the fixture was trained to
ground either way, and the accuracy suite meets its targets through vLLM.

Molmo2 is not here: vLLM 0.32 reads Molmo2 only through the checkpoint's own repository code (``auto_map`` →
``configuration_molmo2.py``…, which lives on the hub), and refuses a checkpoint without it.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import borrowed, data_uri, pdf_of, png_of, run_requests, settings_for

from vlm_tools.backends.base import Backend, Output, Request, Task
from vlm_tools.backends.remote import RemoteBackend, load_remote_backends
from vlm_tools.families import get_family
from vlm_tools import scenes as ui_scenes
from inference_servers import InferenceServer, vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "paligemma-ui"
MAX_MODEL_LEN = 512
HOSTILE = {
    "do_sample": True, "temperature": 1.5, "top_k": 3, "top_p": 0.5, "repetition_penalty": 3.0, "min_new_tokens": 30,
}  # fmt: skip


@pytest.fixture(scope="module")
def served(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InferenceServer, ...]]:
    """(plain, hostile): the fixture, and a copy whose generation config asks for sampling and penalties."""
    work = tmp_path_factory.mktemp("vllm")
    hostile_dir = work / "paligemma-ui-hostile"
    shutil.copytree(FIXTURE, hostile_dir)
    config = hostile_dir / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **HOSTILE}, indent=2))
    servers = [
        vllm_server(vllm_python, FIXTURE, work, max_model_len=MAX_MODEL_LEN),
        vllm_server(vllm_python, hostile_dir, work, max_model_len=MAX_MODEL_LEN, served_name=str(FIXTURE)),
    ]
    try:
        for server in servers:
            server.wait_ready()
        yield tuple(servers)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def remote(served: tuple[InferenceServer, ...], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The remote backend as ``vlm-tools serve --backend openai --base-url …`` loads it (family from the name)."""
    settings = settings_for(tmp_path_factory.mktemp("settings"), backend="openai", base_url=(served[0].url,))
    (backend,) = load_remote_backends(settings)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def local() -> Iterator[Backend]:
    from vlm_tools.backends.loading import load_backend
    from vlm_tools.settings import Settings

    backend = load_backend(str(FIXTURE), Settings(model=(str(FIXTURE),), device="cpu"))
    yield backend
    backend.close()


def scenes(count: int, seed: int = 77) -> list[Any]:
    rng = random.Random(seed)
    return [ui_scenes.random_scene(rng, size) for size in [(1280, 720), (600, 900), (1000, 1000)] * (count // 3 + 1)][
        :count
    ]


def requests_for(scene: Any) -> list[Request]:
    name = scene.target.name
    return [
        Request(Task.DETECT, scene.image, labels=(name,), max_new_tokens=32),
        Request(Task.POINT, scene.image, text=name, max_new_tokens=32),
        Request(Task.CAPTION, scene.image, max_new_tokens=16),
        Request(Task.ANSWER, scene.image, text=f"where is the {name}?", max_new_tokens=16),
        Request(Task.OCR, scene.image, max_new_tokens=16),
    ]


def run(backend: Backend, requests: list[Request]) -> list[Output]:
    outcomes = run_requests(backend, requests)
    assert all(isinstance(o, Output) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]


class ReadCausally:
    """The in-process backend with its prompt read causally (token types all 1), as vLLM's CPU attention reads it."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def __enter__(self) -> None:
        self.backend.bidirectional_prefix = False

    def __exit__(self, *exc: object) -> None:
        del self.backend.bidirectional_prefix  # back to the class's: bidirectional


def test_the_server_reports_the_fixture_and_its_context(remote: Backend) -> None:
    assert remote.family.name == "paligemma" and remote.name == str(FIXTURE)
    assert isinstance(remote, RemoteBackend) and remote.max_model_len == MAX_MODEL_LEN


def test_vllm_answers_token_for_token_as_transformers_reading_causally(remote: Backend, local: Any) -> None:
    requests = [r for scene in scenes(6) for r in requests_for(scene)]
    there = run(remote, requests)
    with ReadCausally(local):
        here = run(local, requests)
    assert [o.raw for o in there] == [o.raw for o in here]
    assert there == here
    assert sum(bool(o.boxes) for o in there) >= 10  # geometry came back through vLLM, not just text


async def test_every_tool_answers_through_vllm(tmp_path: Path, remote: Backend) -> None:
    from mcp import Client

    from vlm_tools.server import build_server

    scene = scenes(1)[0]
    image = data_uri(png_of(scene.image))
    server = build_server(settings_for(tmp_path), load_backends=lambda _s: [borrowed(remote)])
    name = scene.target.name
    async with Client(server) as client:
        calls = {
            "describe_image": {"image": image},
            "answer_about_image": {"image": image, "question": f"what colour is the {scene.target.shape}?"},
            "point_to_object": {"image": image, "description": name, "frame": {"width": 640, "height": 360}},
            "detect": {"image": image, "labels": [name], "annotate": True},
            "read_document": {"document": data_uri(pdf_of([s.image for s in scenes(2)]), "application/pdf")},
        }
        results = {tool: await client.call_tool(tool, arguments) for tool, arguments in calls.items()}
    for tool, result in results.items():
        assert not result.is_error, (tool, result.content)
        assert result.structured_content["model"] == str(FIXTURE)
    point = results["point_to_object"].structured_content
    detect = results["detect"].structured_content
    assert point["found"] and point["points"][0]["source"] == "box_center"
    assert point["points"][0]["frame_x"] == pytest.approx(point["points"][0]["x_norm"] * 640)
    assert detect["found"] and detect["detections"][0]["label"] == name
    x0, y0, x1, y1 = scene.target.box
    box = detect["detections"][0]["box"]
    assert box["x0"] < (x0 + x1) / 2 < box["x1"] and box["y0"] < (y0 + y1) / 2 < box["y1"]
    assert any(block.type == "image" for block in results["detect"].content)  # the annotated PNG
    document = results["read_document"].structured_content
    assert [page["page"] for page in document["pages"]] == [1, 2]
    assert isinstance(results["answer_about_image"].structured_content["answer"], str)


def test_the_accuracy_suite_meets_its_targets_through_vllm(tmp_path: Path, served: tuple[InferenceServer, ...]) -> None:
    from vlm_tools.evaluation import run_eval

    settings = settings_for(tmp_path, backend="openai", base_url=(served[0].url,), max_batch_size=8)
    out = tmp_path / "report.json"
    printed = io.StringIO()
    args = argparse.Namespace(seed=1234, count=30, sizes="1280x720,600x900,1000x1000", out=str(out),
                              min_inside=0.95, min_iou=0.7)  # fmt: skip
    code = run_eval(settings, args, stdout=printed)
    table = printed.getvalue()
    report = json.loads(out.read_text())
    assert code == 0, table
    for size in report["sizes"]:
        assert size["point"]["errors"] == size["detect"]["errors"] == 0, table
        assert size["point"]["inside"] >= 0.95 and size["detect"]["mean_iou"] >= 0.7, table
        assert size["point"]["point_source"] == ["box_center"]


def test_a_hostile_generation_config_changes_nothing(served: tuple[InferenceServer, ...]) -> None:
    plain, hostile = served
    requests = [r for scene in scenes(3, seed=5) for r in requests_for(scene)]
    answers = []
    for server in (plain, hostile):
        backend = RemoteBackend((server.url,), str(FIXTURE), get_family("paligemma"), max_model_len=MAX_MODEL_LEN)
        try:
            answers.append([o.raw for o in run(backend, requests)])
        finally:
            backend.close()
    assert answers[0] == answers[1]
    # Teeth: asked without the explicit neutral values, the hostile server samples and stretches its answers.
    bare = {"model": str(FIXTURE), "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(png_of(scenes(1, seed=5)[0].image))}},
        {"type": "text", "text": "caption en"}]}]}  # fmt: skip
    texts = {httpx.post(hostile.url + "/chat/completions", json=bare, timeout=120).json()["choices"][0]["message"]
             ["content"] for _ in range(3)}  # fmt: skip
    assert texts != {answers[0][2]}


async def test_a_prompt_too_long_for_the_context_is_a_clear_tool_error(tmp_path: Path, remote: Backend) -> None:
    from mcp import Client

    from vlm_tools.server import build_server

    server = build_server(settings_for(tmp_path), load_backends=lambda _s: [borrowed(remote)])
    image = data_uri(png_of(scenes(1)[0].image))
    async with Client(server) as client:
        result = await client.call_tool("answer_about_image", {"image": image, "question": "why " * 150})
        after = await client.call_tool("answer_about_image", {"image": image, "question": "why?"})
    text = " ".join(getattr(block, "text", "") for block in result.content)
    assert result.is_error and "input_too_long: " in text and f"{MAX_MODEL_LEN} tokens" in text, text
    assert not after.is_error  # and the server keeps serving


class RecordedLogs(logging.Handler):
    """Log records kept as lines, for a failure message."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def test_killing_one_of_two_servers_mid_run_loses_no_call(served: tuple[InferenceServer, ...], remote: Backend) -> None:
    """Runs last: it kills the second server. Requests in flight on it are retried on the survivor."""
    plain, hostile = served
    requests = [r for scene in scenes(12, seed=11) for r in requests_for(scene)[:2]]
    expected = [o.raw for o in run(remote, requests)]
    pool = RemoteBackend((plain.url, hostile.url), str(FIXTURE), get_family("paligemma"), concurrency=4, timeout_s=120,
                         max_model_len=MAX_MODEL_LEN)  # fmt: skip
    outcomes: list[Any] = []
    runner = threading.Thread(target=lambda: outcomes.extend(run_requests(pool, requests)))
    records = RecordedLogs()  # what the pool says (a server marked down…), straight from its logger
    logging.getLogger("vlm_tools.backends.remote_client").addHandler(records)
    try:
        runner.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill it mid-run: calls answered, and calls in flight on it
            state = pool.pool.snapshot()
            if state[0]["completed"] + state[1]["completed"] >= 1 and state[1]["outstanding"] > 0:
                break
            time.sleep(0.002)
        else:
            runner.join(timeout=300)
            pytest.fail(f"the second server never held calls in flight mid-run: {pool.pool.snapshot()}; "
                        f"the pool logged: {records.lines}")  # fmt: skip
        hostile.kill()
        runner.join(timeout=300)
        assert not runner.is_alive()
        state = pool.pool.snapshot()
    finally:
        logging.getLogger("vlm_tools.backends.remote_client").removeHandler(records)
        pool.close()
    assert len(outcomes) == len(requests)
    assert all(isinstance(o, Output) for o in outcomes), outcomes
    assert [o.raw for o in outcomes] == expected
    assert state[1]["up"] is False
    assert state[0]["completed"] + state[1]["completed"] == len(requests)

