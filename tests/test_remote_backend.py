"""The remote backend against scripted fake inference servers (tests/fake_openai.py): request shape, every
failure of an inference server as a typed error, retries across servers, spreading, back-off, cancellation,
start-up checks, and that no user URL ever reaches an inference server (through the real MCP tool path)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai import DEFAULT_MODEL, FakeOpenAI, Reply, closed_port_url
from helpers import answer_all, png_bytes, settings_for, static_site
from PIL import Image

from vlm_tools.backends.base import Output, Request, Task
from vlm_tools.backends.remote import RemoteBackend, load_remote_backends
from vlm_tools.errors import Busy, Cancelled, ConfigurationError, InvalidArgument, ModelError, Timeout
from vlm_tools.families import family_from_name, get_family
from vlm_tools.geometry import NormBox

IMAGE = Image.new("RGB", (32, 24), (10, 200, 30))
BOX_RAW = "<loc0100><loc0200><loc0300><loc0400> cat"
BOX = NormBox(200 / 1024, 100 / 1024, 400 / 1024, 300 / 1024, "cat")


def detect(label: str = "cat", **extra: object) -> Request:
    return Request(Task.DETECT, IMAGE, labels=(label,), max_new_tokens=33, **extra)  # type: ignore[arg-type]


def backend(*urls: str, **options: object) -> RemoteBackend:
    values: dict[str, object] = {"timeout_s": 5.0, "backoff_s": (30.0, 30.0)}
    values.update(options)
    return RemoteBackend(urls, DEFAULT_MODEL, get_family("paligemma"), **values)  # type: ignore[arg-type]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(Reply(content=BOX_RAW)) as server:
        yield server


@pytest.fixture
def other() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(Reply(content=BOX_RAW)) as server:
        yield server


def run_one(remote: RemoteBackend, request: Request | None = None) -> Output | BaseException:
    (outcome,) = answer_all(remote, [request or detect()])
    return outcome


# --- the request ---------------------------------------------------------------------------------------------


def test_request_is_one_user_message_with_a_png_data_uri_then_the_prompt(fake: FakeOpenAI) -> None:
    remote = backend(fake.url, api_key="sekrit")
    try:
        outcome = run_one(remote)
    finally:
        remote.close()
    assert outcome == Output(raw=BOX_RAW, boxes=[BOX])
    (body,) = fake.chat_bodies
    (message,) = body["messages"]
    assert message["role"] == "user"
    image_part, text_part = message["content"]
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": "detect cat"}
    assert body["model"] == DEFAULT_MODEL
    # Greedy with every penalty and cut-off neutral, sent explicitly: vLLM would otherwise take the checkpoint's
    # generation_config.json values (a repetition penalty there bends every answer).
    greedy = {
        "temperature": 0, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "seed": 0, "n": 1,
        "max_tokens": 33, "top_k": 0, "min_p": 0, "repetition_penalty": 1, "min_tokens": 0,
    }  # fmt: skip
    assert {key: body.get(key) for key in greedy} == greedy
    assert "skip_special_tokens" not in body  # dropped as locally: PaliGemma's <locNNNN> tokens are not special
    headers = {k.lower(): v for k, v in fake.requests[-1].headers.items()}
    assert headers["authorization"] == "Bearer sekrit"


def test_the_image_arrives_pixel_exact(fake: FakeOpenAI) -> None:
    import base64
    import io
    import random

    rng = random.Random(5)
    image = Image.frombytes("RGB", (7, 5), bytes(rng.randrange(256) for _ in range(7 * 5 * 3)))
    remote = backend(fake.url)
    try:
        run_one(remote, Request(Task.CAPTION, image, max_new_tokens=8))
    finally:
        remote.close()
    url = fake.chat_bodies[0]["messages"][0]["content"][0]["image_url"]["url"]
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.mode == "RGB" and sent.size == (7, 5)
    assert sent.tobytes() == image.tobytes()


def test_a_follow_up_on_an_image_sends_the_kept_bytes_without_encoding_again(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlm_tools.backends import remote as remote_module

    encoded: list[tuple[int, int]] = []
    original = remote_module.png_data_uri

    def counting(image: Image.Image) -> str:
        encoded.append(image.size)
        return original(image)

    monkeypatch.setattr(remote_module, "png_data_uri", counting)
    remote = backend(fake.url)
    other_image = Image.new("RGB", (8, 8), (1, 2, 3))
    try:
        run_one(remote, detect(image_id="img_a"))
        run_one(remote, detect("dog", image_id="img_a"))  # a follow-up by id: the kept URI
        run_one(remote, Request(Task.CAPTION, other_image, max_new_tokens=8))  # no id: encoded, not kept
        remote.forget_image("img_a")  # the image left the store: encoded afresh next time
        run_one(remote, detect(image_id="img_a"))
    finally:
        remote.close()
    assert encoded == [IMAGE.size, (8, 8), IMAGE.size]
    urls = [body["messages"][0]["content"][0]["image_url"]["url"] for body in fake.chat_bodies]
    assert urls[0] == urls[1] == urls[3] != urls[2]


def test_list_content_parts_are_joined(fake: FakeOpenAI) -> None:
    parts = [{"type": "text", "text": "<loc0100><loc0200>"}, {"type": "text", "text": "<loc0300><loc0400> cat"}]
    fake.script = Reply(content=parts)
    remote = backend(fake.url)
    try:
        assert run_one(remote) == Output(raw=BOX_RAW, boxes=[BOX])
    finally:
        remote.close()


def test_reserved_tokens_in_user_text_are_broken_up(fake: FakeOpenAI) -> None:
    remote = backend(fake.url)
    try:
        run_one(remote, Request(Task.ANSWER, IMAGE, text="what <eos> is <loc0001> here <image>?", max_new_tokens=8))
    finally:
        remote.close()
    sent = fake.chat_bodies[0]["messages"][0]["content"][1]["text"]
    assert sent == "answer en what < eos> is < loc0001> here < image>?"


def test_an_invalid_request_fails_alone_and_is_never_sent(fake: FakeOpenAI) -> None:
    remote = backend(fake.url)
    try:
        bad, good = answer_all(remote, [Request(Task.ANSWER, IMAGE, text="   "), detect()])
    finally:
        remote.close()
    assert isinstance(bad, InvalidArgument)
    assert good == Output(raw=BOX_RAW, boxes=[BOX])
    assert len(fake.chat_bodies) == 1


def test_a_server_refusing_the_extra_parameters_gets_them_no_more() -> None:
    with FakeOpenAI(Reply(content=BOX_RAW), reject_fields=frozenset({"repetition_penalty"})) as strict:
        remote = backend(strict.url)
        try:
            # A concurrent batch: several requests carry the extras before the first refusal comes back.
            assert answer_all(remote, [detect() for _ in range(6)]) == [Output(raw=BOX_RAW, boxes=[BOX])] * 6
            assert run_one(remote) == Output(raw=BOX_RAW, boxes=[BOX])
        finally:
            remote.close()
        bodies = [r.body for r in strict.requests]
        refused = [body for body in bodies if "repetition_penalty" in body]
        accepted = [body for body in bodies if "repetition_penalty" not in body]
        assert 1 <= len(refused) <= 6 and len(accepted) == 7
        assert "repetition_penalty" not in bodies[-1]


# --- failures, each a typed error; the backend keeps serving after -----------------------------------------

HUGE = "x" * 5000

FAILURES = [
    pytest.param(Reply(status=500, body={"error": {"message": "CUDA error"}}), ModelError, "HTTP 500: CUDA error",
                 id="500"),
    pytest.param(Reply(status=429, body={"message": "too many"}), Busy, "saturated", id="429-busy"),
    pytest.param(Reply(status=503, body={"detail": "overloaded"}), Busy, "saturated", id="503-busy"),
    pytest.param(Reply(delay_s=2.0), Timeout, "did not answer within 0.5 s", id="slow-timeout"),
    pytest.param(Reply(body="{not json"), ModelError, "malformed JSON", id="malformed-json"),
    pytest.param(Reply(body={"choices": []}), ModelError, "without choices", id="empty-choices"),
    pytest.param(Reply(body={"id": "x"}), ModelError, "without choices", id="no-choices"),
    pytest.param(Reply(content=None), ModelError, "without text content", id="null-content"),
    pytest.param(Reply(content=7), ModelError, "without text content", id="number-content"),
    pytest.param(Reply(status=401, body={"error": {"message": "bad key"}}), ModelError, "refused the API key",
                 id="401"),
    pytest.param(Reply(status=404, body={"message": "model nope does not exist"}), ModelError, "does not exist",
                 id="404"),
    pytest.param(Reply(status=400, body={"message": HUGE}), ModelError, "HTTP 400", id="400-long-message"),
    pytest.param(Reply(drop=True), ModelError, "inference server failed", id="dropped-connection"),
]


@pytest.mark.parametrize(("reply", "error", "fragment"), FAILURES)
def test_each_failure_becomes_a_typed_error_then_serving_goes_on(
    fake: FakeOpenAI, reply: Reply, error: type[Exception], fragment: str
) -> None:
    fake.script = [reply, Reply(content=BOX_RAW)]
    remote = backend(fake.url, timeout_s=0.5)
    try:
        outcome = run_one(remote)
        assert isinstance(outcome, error), outcome
        assert fragment in str(outcome)
        assert fake.url in str(outcome) or isinstance(outcome, Busy)
        assert len(str(outcome)) < 600  # a server's long message is cut
        assert run_one(remote) == Output(raw=BOX_RAW, boxes=[BOX])  # a pool of one keeps trying its server
    finally:
        remote.close()


def test_connection_refused_alone_says_no_server_is_reachable() -> None:
    url = closed_port_url()
    remote = backend(url)
    try:
        outcome = run_one(remote)
    finally:
        remote.close()
    assert isinstance(outcome, ModelError)
    assert str(outcome).startswith("model_error: no inference server reachable:")
    assert url in str(outcome)


@pytest.mark.parametrize(
    ("first", "down"),
    [
        pytest.param(None, True, id="refused"),
        pytest.param(Reply(status=500), True, id="500"),
        pytest.param(Reply(status=502), True, id="502"),
        pytest.param(Reply(status=503), True, id="503"),
        pytest.param(Reply(status=429), False, id="429"),
        pytest.param(Reply(drop=True), True, id="dropped"),
    ],
)
def test_a_failing_server_hands_the_request_to_the_other(
    other: FakeOpenAI, first: Reply | None, down: bool
) -> None:
    with FakeOpenAI(first or Reply()) as failing:
        url = failing.url if first else closed_port_url()
        remote = backend(url, other.url)
        try:
            assert run_one(remote) == Output(raw=BOX_RAW, boxes=[BOX])
            state = {s["url"]: s for s in remote.pool.snapshot()}
        finally:
            remote.close()
    assert len(other.chat_bodies) == 1
    assert len(failing.chat_bodies) == (1 if first else 0)
    assert state[url]["up"] is (not down)


def test_every_server_busy_is_busy(fake: FakeOpenAI, other: FakeOpenAI) -> None:
    fake.script = Reply(status=429)
    other.script = Reply(status=503)
    remote = backend(fake.url, other.url)
    try:
        outcome = run_one(remote)
    finally:
        remote.close()
    assert isinstance(outcome, Busy)
    assert "retry shortly" in str(outcome)


# --- spreading and back-off ----------------------------------------------------------------------------------


def test_requests_spread_to_the_server_with_fewest_outstanding(fake: FakeOpenAI, other: FakeOpenAI) -> None:
    fake.script = other.script = Reply(content=BOX_RAW, delay_s=0.3)
    remote = backend(fake.url, other.url, concurrency=3)
    try:
        outcomes = answer_all(remote, [detect() for _ in range(8)])
    finally:
        remote.close()
    assert outcomes == [Output(raw=BOX_RAW, boxes=[BOX])] * 8
    assert (len(fake.chat_bodies), len(other.chat_bodies)) == (4, 4)
    assert fake.max_in_flight <= 3 and other.max_in_flight <= 3  # the per-server bound held


class Clock:
    """A clock the test moves: back-offs pass when it says so, not when the machine gets round to it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_downed_server_is_skipped_then_tried_again_after_its_back_off(fake: FakeOpenAI, other: FakeOpenAI) -> None:
    fake.script = [Reply(status=500), Reply(content=BOX_RAW)]
    clock = Clock()
    remote = backend(fake.url, other.url, backoff_s=(0.5, 0.5), clock=clock)
    try:
        for _ in range(4):
            assert run_one(remote) == Output(raw=BOX_RAW, boxes=[BOX])
        assert len(fake.chat_bodies) == 1  # the 500; skipped since
        assert len(other.chat_bodies) == 4
        clock.advance(0.49)
        assert not remote.pool.snapshot()[0]["up"]  # still in its back-off
        clock.advance(0.02)
        for _ in range(2):
            assert run_one(remote) == Output(raw=BOX_RAW, boxes=[BOX])
        assert len(fake.chat_bodies) == 2  # back in the rotation, and it answered
        assert all(s["up"] for s in remote.pool.snapshot())
    finally:
        remote.close()


def test_one_outage_counts_once_however_many_requests_it_fails(fake: FakeOpenAI, other: FakeOpenAI) -> None:
    fake.script = Reply(status=500, delay_s=0.2)  # several requests in flight when they all fail
    clock = Clock()
    remote = backend(fake.url, other.url, backoff_s=(0.5, 30.0), clock=clock)
    try:
        assert answer_all(remote, [detect() for _ in range(6)]) == [Output(raw=BOX_RAW, boxes=[BOX])] * 6
        assert len(fake.chat_bodies) == 3 and len(other.chat_bodies) == 6
        clock.advance(0.49)
        assert not remote.pool.snapshot()[0]["up"]
        clock.advance(0.02)  # one outage: 0.5 s, not 0.5 × 2 × 2
        assert all(s["up"] for s in remote.pool.snapshot())
    finally:
        remote.close()


# --- cancellation --------------------------------------------------------------------------------------------


def test_a_cancelled_request_is_never_sent(fake: FakeOpenAI) -> None:
    cancelled = detect()
    cancelled.cancel.set()
    remote = backend(fake.url)
    try:
        first, second = answer_all(remote, [cancelled, detect()])
    finally:
        remote.close()
    assert isinstance(first, Cancelled)
    assert second == Output(raw=BOX_RAW, boxes=[BOX])
    assert len(fake.chat_bodies) == 1


def test_cancelling_mid_flight_abandons_the_call(fake: FakeOpenAI) -> None:
    import asyncio

    fake.script = Reply(content=BOX_RAW, delay_s=3.0)
    remote = backend(fake.url)

    async def cancel_once_sent() -> float:
        call = asyncio.ensure_future(remote.answer(detect()))
        deadline = time.monotonic() + 10
        while fake.in_flight == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return time.monotonic() - started

    try:
        took = asyncio.run(cancel_once_sent())
        answered_meanwhile = fake.completed
    finally:
        remote.close()
    assert took < 1.0 and answered_meanwhile == 0  # it returned without waiting for the server's answer


# --- start-up ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("google/paligemma2-3b-mix-448", "paligemma"),
        ("/models/PaliGemma-ft", "paligemma"),
        ("allenai/Molmo2-4B", "molmo2"),
        ("allenai/Molmo-7B-D-0924", "molmo"),
        ("allenai/MolmoE-1B-0924", "molmo"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", None),
    ],
)
def test_family_from_name(name: str, family: str | None) -> None:
    found = family_from_name(name)
    assert (found.name if found else None) == family


def test_start_up_reads_the_model_and_family_from_the_server(
    tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLM_TOOLS_API_KEY", "from-env")
    settings = settings_for(tmp_path, backend="openai", base_url=(fake.url, closed_port_url()), remote_concurrency=8,
                            max_batch_size=4)  # fmt: skip
    (remote,) = load_remote_backends(settings)
    try:
        assert isinstance(remote, RemoteBackend)
        assert (remote.name, remote.family.name) == (DEFAULT_MODEL, "paligemma")
        assert remote.concurrency == 2 * 8  # every server's slots
        assert run_one(remote) == Output(raw=BOX_RAW, boxes=[BOX])
    finally:
        remote.close()
    assert all(r.headers.get("Authorization") == "Bearer from-env" for r in fake.requests)


@pytest.mark.parametrize(
    ("models", "options", "fragment"),
    [
        pytest.param((), {}, "--remote-model", id="nothing-listed"),
        pytest.param(("a/paligemma", "b/molmo2"), {}, "several models", id="several-listed"),
        pytest.param(("org/mystery-vlm",), {}, "--remote-family", id="unknown-family"),
    ],
)
def test_start_up_refuses_what_it_cannot_tell(
    tmp_path: Path, models: tuple[str, ...], options: dict[str, object], fragment: str
) -> None:
    with FakeOpenAI(models=models) as fake:
        settings = settings_for(tmp_path, backend="openai", base_url=(fake.url,), **options)
        with pytest.raises(ConfigurationError, match=fragment):
            load_remote_backends(settings)


def test_start_up_with_explicit_model_and_family_needs_no_listing(tmp_path: Path) -> None:
    with FakeOpenAI(models_status=500) as fake:  # transformers serve without a hub cache directory
        settings = settings_for(tmp_path, backend="openai", base_url=(fake.url,), remote_model="/srv/tiny",
                                remote_family="molmo2")  # fmt: skip
        (remote,) = load_remote_backends(settings)
        remote.close()
    assert (remote.name, remote.family.name) == ("/srv/tiny", "molmo2")


def test_start_up_without_any_reachable_server_fails(tmp_path: Path) -> None:
    url = closed_port_url()
    settings = settings_for(tmp_path, backend="openai", base_url=(url,), remote_family="paligemma", remote_model="m")
    with pytest.raises(ConfigurationError, match="no inference server reachable") as caught:
        load_remote_backends(settings)
    assert url in str(caught.value)


def test_start_up_with_a_refused_key_fails(tmp_path: Path) -> None:
    with FakeOpenAI(models_status=401) as fake:
        settings = settings_for(tmp_path, backend="openai", base_url=(fake.url,), api_key="wrong")
        with pytest.raises(ConfigurationError, match="refused the API key"):
            load_remote_backends(settings)


# --- no user URL reaches the inference server (through the MCP tool path) -----------------------------------


@pytest.fixture
def http_image() -> Iterator[str]:
    with static_site({"/shot.png": ("image/png", png_bytes(64, 48))}) as base:
        yield f"{base}/shot.png"


async def test_no_user_url_reaches_the_inference_server(tmp_path: Path, fake: FakeOpenAI, http_image: str) -> None:
    from mcp import Client

    from vlm_tools.server import build_server

    settings = settings_for(tmp_path, backend="openai", base_url=(fake.url,), allow_private_urls=True)
    remote = backend(fake.url)
    server = build_server(settings, load_backends=lambda _s: [remote])
    async with Client(server) as client:
        result = await client.call_tool("point_to_object", {"image": http_image, "description": "the cat"})
        assert not result.is_error, result
        data = result.structured_content
        assert data["found"] is True and data["model"] == DEFAULT_MODEL
        assert data["image_size"] == {"width": 64, "height": 48}
        assert data["points"][0]["x"] == pytest.approx(300 / 1024 * 64)
    (body,) = fake.chat_bodies
    urls = [part["image_url"]["url"] for m in body["messages"] for part in m["content"] if part["type"] == "image_url"]
    assert urls and all(url.startswith("data:image/png;base64,") for url in urls)
    assert "http://" not in str(body) and http_image not in str(body)


# --- no head-of-line blocking --------------------------------------------------------------------------------


async def test_each_caller_gets_its_answer_when_it_arrives_not_when_the_slowest_does(fake: FakeOpenAI) -> None:
    import asyncio

    from vlm_tools.engine import Engine

    def script(body: dict) -> Reply:
        prompt = body["messages"][0]["content"][1]["text"]
        return Reply(content=BOX_RAW, delay_s=4.0 if "slow" in prompt else 0.05)

    fake.script = script
    remote = backend(fake.url)
    engine = Engine([remote], max_batch_size=8, batch_wait_ms=50.0, queue_size=64, request_timeout_s=30.0)
    await engine.start()
    started = time.monotonic()
    finished: dict[str, float] = {}

    async def call(label: str) -> None:
        await engine.submit(remote, detect(label), tool="detect")
        finished[label] = time.monotonic() - started

    try:
        slow = asyncio.ensure_future(call("slow"))
        await asyncio.sleep(0.01)  # the slow one first: a batch would have held every later one behind it
        await asyncio.wait_for(asyncio.gather(*(call(f"fast {i}") for i in range(7))), timeout=3.0)
        assert not slow.done() and max(finished.values()) < 2.0, finished  # answered while the slow one runs
        await asyncio.wait_for(slow, timeout=10.0)
        assert finished["slow"] >= 3.5
    finally:
        await engine.shutdown(1.0)
        remote.close()
