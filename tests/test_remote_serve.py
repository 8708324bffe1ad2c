"""The remote backend against a real ``transformers serve`` running the tiny PaliGemma: every task, parity with
the local backend on the same model directory (raw text and parsed output equal, also through the MCP tools), and
no request lost when one of two servers is killed mid-run.

Two server processes for the whole module (each loads torch: tens of seconds on a small machine); the kill test
runs last and kills the second one. Marked ``slow`` so it can be deselected (``-m "not slow"``); runs by default.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import borrowed, data_uri, png_bytes, run_requests, settings_for
from PIL import Image

from vlm_tools.backends.base import Backend, Output, Request, Task
from vlm_tools.backends.remote import RemoteBackend, load_remote_backends
from vlm_tools.families import get_family
from vlm_tools.settings import Settings
from inference_servers import InferenceServer, transformers_server, with_chat_template

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_TOKENS = 24


def _images() -> list[Image.Image]:
    noise = Image.effect_noise((50, 70), 60).convert("RGB")
    return [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 200)), noise]


IMAGES = _images()

TASKS = {
    "caption": lambda image: Request(Task.CAPTION, image, max_new_tokens=MAX_TOKENS),
    "caption-detailed": lambda image: Request(Task.CAPTION, image, detail="detailed", max_new_tokens=MAX_TOKENS),
    "answer": lambda image: Request(Task.ANSWER, image, text="what <eos> colour is it?", max_new_tokens=MAX_TOKENS),
    "detect": lambda image: Request(Task.DETECT, image, labels=("cat", "dog"), max_new_tokens=MAX_TOKENS),
    "point": lambda image: Request(Task.POINT, image, text="the cat", max_new_tokens=MAX_TOKENS),
    "ocr": lambda image: Request(Task.OCR, image, max_new_tokens=MAX_TOKENS),
}


@pytest.fixture(scope="module")
def served_dir(tiny_paligemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny PaliGemma with a chat template (the name keeps "paligemma": the family is read from it)."""
    return with_chat_template(tiny_paligemma_dir, tmp_path_factory.mktemp("served") / "tiny-paligemma")


@pytest.fixture(scope="module")
def servers(
    served_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InferenceServer, InferenceServer]]:
    work = tmp_path_factory.mktemp("serve")
    started: list[InferenceServer] = []
    try:
        # Both start loading at once; one torch thread each, so two servers and the local model share the cores.
        started = [transformers_server(served_dir, work, threads=1) for _ in range(2)]
        for server in started:
            server.wait_ready()
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def local(served_dir: Path) -> Iterator[Backend]:
    from vlm_tools.backends.loading import load_backend

    backend = load_backend(str(served_dir), Settings(model=(str(served_dir),), device="cpu"))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def remote(servers: tuple[InferenceServer, InferenceServer], served_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Backend]:
    """The remote backend as the server loads it: model named by --remote-model, family read from the name."""
    settings = settings_for(tmp_path_factory.mktemp("settings"), backend="openai", base_url=(servers[0].url,),
                            remote_model=str(served_dir), request_timeout_s=60)  # fmt: skip
    (backend,) = load_remote_backends(settings)
    yield backend
    backend.close()


def _one(backend: Backend, request: Request) -> Output:
    (outcome,) = run_requests(backend, [request])
    assert isinstance(outcome, Output), outcome
    return outcome


def test_the_remote_backend_is_a_paligemma_named_like_the_served_model(remote: Backend, served_dir: Path) -> None:
    assert (remote.name, remote.family.name) == (str(served_dir), "paligemma")
    assert Task.DETECT in remote.native and Task.POINT in remote.supported


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_gives_what_the_local_backend_gives(remote: Backend, local: Backend, task: str) -> None:
    said = []
    for image in IMAGES:
        request = TASKS[task](image)
        there, here = _one(remote, request), _one(local, request)
        assert there.raw == here.raw
        assert there == here
        said.append(there.raw)
        if task == "point":
            assert there.point_source == "box_center"
    # Equality has teeth only if the model says something, and something that depends on the image (a random
    # model may also emit the padding rows of its vocabulary, which decode to nothing).
    assert any(said) and len(set(said)) > 1


def test_geometry_actually_came_back(remote: Backend, local: Backend) -> None:
    """Parity is not vacuous: the location tokens survive the trip and parse into boxes."""
    outputs = [_one(remote, TASKS["detect"](image)) for image in IMAGES]
    assert any("<loc" in output.raw for output in outputs)
    assert any(output.boxes for output in outputs)


def test_a_batch_is_sent_concurrently_and_matches_local(remote: Backend, local: Backend) -> None:
    requests = [TASKS[task](image) for task in ("detect", "point") for image in IMAGES]
    assert run_requests(remote, requests) == [_one(local, request) for request in requests]


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("detect", {"labels": ["cat", "dog"], "frame": {"width": 640, "height": 480}}),
        ("point_to_object", {"description": "the cat", "max_points": 3}),
        ("describe_image", {}),
        ("answer_about_image", {"question": "what is it?"}),
    ],
)
async def test_the_same_tool_call_gives_the_same_result(
    tmp_path: Path, remote: Backend, local: Backend, tool: str, arguments: dict[str, object]
) -> None:
    from mcp import Client

    from vlm_tools.server import build_server

    image = data_uri(png_bytes(48, 36, (90, 160, 20)))
    results = []
    for backend in (local, remote):
        server = build_server(settings_for(tmp_path), load_backends=lambda _s, b=backend: [borrowed(b)])
        async with Client(server) as client:
            result = await client.call_tool(tool, {"image": image, **arguments})
            assert not result.is_error, result
            data = dict(result.structured_content)
            data.pop("image_id")  # a fresh random handle per server
            results.append(data)
    assert results[0] == results[1]


def test_killing_one_of_two_servers_mid_run_loses_no_request(
    servers: tuple[InferenceServer, InferenceServer], served_dir: Path, local: Backend
) -> None:
    """Runs last: it kills the second server. Requests in flight on it are retried on the survivor."""
    first, second = servers
    remote = RemoteBackend([first.url, second.url], str(served_dir), get_family("paligemma"), concurrency=4, timeout_s=120)
    requests = [Request(Task.DETECT, image, labels=(label,), max_new_tokens=48)
                for label in ("cat", "dog", "car", "cup") for image in IMAGES]  # fmt: skip
    outcomes: list[object] = []
    runner = threading.Thread(target=lambda: outcomes.extend(run_requests(remote, requests)))
    try:
        runner.start()
        deadline = time.monotonic() + 60
        # Kill once the second server holds requests (in flight and queued). Its log cannot tell: it holds the
        # requests of earlier tests too.
        while remote.pool.snapshot()[1]["outstanding"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let it start answering them
        assert remote.pool.snapshot()[1]["outstanding"] > 0
        second.kill()
        runner.join(timeout=240)
        assert not runner.is_alive()
        state = remote.pool.snapshot()
    finally:
        remote.close()
    assert len(outcomes) == len(requests)
    assert all(isinstance(outcome, Output) for outcome in outcomes), outcomes
    assert outcomes == [_one(local, request) for request in requests]
    assert state[1]["up"] is False
    assert state[0]["completed"] + state[1]["completed"] == len(requests)
    assert state[1]["completed"] < len(requests) // 2  # the killed server did not answer its share
