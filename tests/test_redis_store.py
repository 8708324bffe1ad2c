"""Image handles on every replica: ``--image-store redis://…`` against a real ``redis-server``.

An id issued by one server is answered by another sharing the Redis (two servers in memory, and two
``vlm-tools serve --transport http`` processes); ids stay bound to their scope; images expire after the TTL and
leave nothing behind; the count and byte caps evict the oldest first whichever store sent them; with Redis stopped,
calls that carry an image work, calls by another server's id get ``image_store_unavailable`` at once, and when Redis
is back ids are shared again without a restart; hostile ids get the same ``unknown_image_id`` as with the in-memory
store; the URL is checked at start-up and its password shown nowhere.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from conftest_inputs import noisy_image
from helpers import data_uri, loader, png_of, settings_for
from mcp import Client
from PIL import Image
from redis_process import RedisProcess
from scripted import ScriptedBackend, molmo2_script
from server_process import ServerProcess, error_text, free_port, http_client, outcome, server_env

from vlm_tools.errors import ImageTooLarge, UnknownImageId
from vlm_tools.images.redis_store import RedisImageStore
from vlm_tools.server import VisionServer, build_server
from vlm_tools.settings import Settings

pytestmark = pytest.mark.timeout(120)

PICTURE = noisy_image((64, 48), seed=5)
OTHER = noisy_image((40, 30), seed=6)
NEVER_ISSUED = "img_" + "0" * 32
SECRET = "hunter2-redis-password"
MOLMO2_UI = Path(__file__).parent / "fixtures" / "models" / "molmo2-ui"
UNAVAILABLE_WITHIN_S = 2.0
"""How long a call by an id may take to say that Redis cannot be reached (the store's time limits are 1 s)."""


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session's Redis, emptied for this test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url()


@contextlib.asynccontextmanager
async def _stores(
    url: str, count: int, *, max_count: int = 100, max_bytes: int = 10**8, ttl_s: float = 60.0
) -> AsyncIterator[list[RedisImageStore]]:
    """``count`` stores over one Redis, each what one server process holds."""
    stores = [RedisImageStore(url, max_count=max_count, max_bytes=max_bytes, ttl_s=ttl_s) for _ in range(count)]
    try:
        yield stores
    finally:
        for store in stores:
            await store.aclose()


def _server(tmp_path: Path, url: str, backend: ScriptedBackend | None = None) -> VisionServer:
    backend = backend or ScriptedBackend("molmo2", molmo2_script)
    return build_server(settings_for(tmp_path, image_store=url), load_backends=loader(backend))


def _carrying(image: Image.Image) -> dict[str, str]:
    return {"image": data_uri(png_of(image))}


def _by_id(image_id: str) -> dict[str, str]:
    return {"image": image_id, "question": "What colour is it?"}


# --- one id, every server --------------------------------------------------------------------------------------


async def test_an_image_id_from_one_server_is_answered_by_another(tmp_path: Path, redis_url: str) -> None:
    first, second = ScriptedBackend("molmo2", molmo2_script), ScriptedBackend("molmo2", molmo2_script)
    async with Client(_server(tmp_path, redis_url, first)) as a, Client(_server(tmp_path, redis_url, second)) as b:
        made = await a.call_tool("describe_image", _carrying(PICTURE))
        image_id = made.structured_content["image_id"]
        follow = await b.call_tool("point_to_object", {"image": image_id, "description": "the dot"})
    assert not follow.is_error, error_text(follow)
    assert follow.structured_content["image_id"] == image_id
    assert follow.structured_content["image_size"] == {"width": 64, "height": 48}
    assert second.requests[0].image.tobytes() == PICTURE.tobytes()  # the very pixels, through Redis


@pytest.mark.timeout(300)
async def test_two_serve_processes_share_image_ids_through_redis(tmp_path: Path, redis_url: str) -> None:
    args = ["--model", str(MOLMO2_UI), "--image-store", redis_url, "--max-new-tokens", "8",
            "--allow-path", str(tmp_path)]  # fmt: skip
    with contextlib.ExitStack() as running:
        servers = []
        for name in ("first", "second"):  # both start at once; each is stopped however the test ends
            server = ServerProcess(args, server_env(), tmp_path, tmp_path / f"{name}.log")
            running.callback(server.stop)
            servers.append(server)
        for server in servers:
            server.wait_healthy()
        first, second = servers
        point = {"image": data_uri(png_of(PICTURE)), "description": "the red button"}
        async with http_client(first.base) as a, http_client(second.base) as b:
            made = await a.call_tool("point_to_object", point)
            assert not made.is_error, error_text(made) + first.log_tail()
            image_id = made.structured_content["image_id"]
            follow = await b.call_tool("point_to_object", {**point, "image": image_id})
        assert not follow.is_error, error_text(follow) + second.log_tail()
        # A session of its own (protocol revisions with sessions) is another scope: the id is not its to use.
        async with http_client(second.base, mode="legacy") as session:
            foreign = await session.call_tool("point_to_object", {**point, "image": image_id})
        assert outcome(foreign) == "unknown_image_id", error_text(foreign)
    # The same model on the same pixels answers the same: the second process saw exactly the first one's image.
    for field in ("image_id", "image_size", "raw", "points"):
        assert follow.structured_content[field] == made.structured_content[field], field


async def test_ids_stay_bound_to_their_scope_across_stores(redis_url: str) -> None:
    async with _stores(redis_url, 2) as (a, b):
        mine = await a.put(PICTURE, "session:a")
        with pytest.raises(UnknownImageId) as other_scope:
            await b.get(mine, "session:b")
        with pytest.raises(UnknownImageId) as never_issued:
            await b.get(NEVER_ISSUED, "session:b")
        # Same words either way: nothing is learnt about another session's images.
        assert str(other_scope.value).replace(mine, "ID") == str(never_issued.value).replace(NEVER_ISSUED, "ID")
        assert (await b.get(mine, "session:a")).tobytes() == PICTURE.tobytes()
        with pytest.raises(UnknownImageId):  # the copy b keeps now is bound to the scope as well
            await b.get(mine, "session:b")


@pytest.mark.parametrize("hostile", ["img_*", "img_" + "0" * 31 + "?", "vlm-tools:images:bytes", ""])
async def test_ids_not_of_the_issued_form_are_unknown_to_the_store(redis_url: str, hostile: str) -> None:
    async with _stores(redis_url, 1) as (store,):
        await store.put(PICTURE, "s")
        with pytest.raises(UnknownImageId):
            await store.get(hostile, "s")


@pytest.mark.parametrize("info", [b"garbage", b"64 48", b"64 47 s", b"-64 -48 s", b"\xff\xfe s"])
async def test_an_entry_this_store_did_not_write_is_unknown(
    redis_server: RedisProcess, redis_url: str, info: bytes
) -> None:
    async with _stores(redis_url, 1) as (store,):
        client = redis_server.client()
        client.set("vlm-tools:info:" + NEVER_ISSUED, info)  # as another program (or an old version) might
        client.set("vlm-tools:pixels:" + NEVER_ISSUED, PICTURE.tobytes())
        client.close()
        with pytest.raises(UnknownImageId):
            await store.get(NEVER_ISSUED, "s")


@pytest.mark.parametrize("hostile", [NEVER_ISSUED, "img_123", "img_" + "g" * 31, "img_" + "0" * 31])
async def test_hostile_ids_get_the_same_error_as_with_the_memory_store(
    tmp_path: Path, redis_url: str, hostile: str
) -> None:
    codes = []
    for url in ("memory", redis_url):
        async with Client(_server(tmp_path, url)) as client:
            await client.call_tool("describe_image", _carrying(PICTURE))
            codes.append(outcome(await client.call_tool("answer_about_image", _by_id(hostile))))
    assert codes == ["unknown_image_id", "unknown_image_id"]


# --- bounds: age, count, bytes ------------------------------------------------------------------------------


async def test_images_expire_after_the_ttl_everywhere_and_leave_nothing(
    redis_server: RedisProcess, redis_url: str
) -> None:
    async with _stores(redis_url, 3, ttl_s=1.0) as (a, b, c):
        image_id = await a.put(PICTURE, "s")
        await b.get(image_id, "s")  # b keeps a copy, for what is left of the TTL
        await anyio.sleep(1.3)
        for store in (a, b, c):
            with pytest.raises(UnknownImageId, match="expired from the store"):
                await store.get(image_id, "s")
    client = redis_server.client()
    assert client.dbsize() == 0  # the bookkeeping went with the last image
    client.close()


async def test_the_count_cap_holds_across_stores_oldest_first(redis_url: str) -> None:
    async with _stores(redis_url, 3, max_count=3) as (a, b, reader):
        ids = [await store.put(PICTURE, "s") for store in (a, b, a, b)]
        # The fourth image made room by evicting the first, which the other store had sent. (a keeps a copy of
        # its own for follow-ups on that process: the reader, a third process, sees what Redis holds.)
        with pytest.raises(UnknownImageId):
            await reader.get(ids[0], "s")
        for image_id in ids[1:]:
            assert (await reader.get(image_id, "s")).tobytes() == PICTURE.tobytes()


async def test_the_byte_cap_holds_across_stores_oldest_first(redis_url: str) -> None:
    small, big = Image.new("RGB", (10, 10)), Image.new("RGB", (14, 14))  # 300 and 588 bytes
    async with _stores(redis_url, 3, max_bytes=900) as (a, b, reader):
        ids = [await a.put(small, "s"), await b.put(small, "s"), await a.put(small, "s")]
        big_id = await b.put(big, "s")  # 588 more bytes: the two oldest go, whoever sent them
        for gone in ids[:2]:
            with pytest.raises(UnknownImageId):
                await reader.get(gone, "s")
        await reader.get(ids[2], "s")
        await reader.get(big_id, "s")


async def test_an_image_over_the_byte_cap_is_refused(redis_url: str) -> None:
    async with _stores(redis_url, 1, max_bytes=100) as (store,):
        with pytest.raises(ImageTooLarge, match="--image-store-bytes"):
            await store.put(PICTURE, "s")


async def test_copies_leaving_this_process_are_told_to_listeners(redis_url: str) -> None:
    async with _stores(redis_url, 1, max_count=2) as (store,):
        gone: list[str] = []
        store.on_evict(gone.append)  # the server forgets what the models made of the image
        ids = [await store.put(PICTURE, "s") for _ in range(3)]
    assert gone == ids[:1]


# --- Redis down ---------------------------------------------------------------------------------------------


async def test_redis_down_then_back(tmp_path: Path, redis_server_binary: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vlm_tools.images.redis_store")
    with RedisProcess(redis_server_binary, tmp_path / "redis.log") as redis_process:
        url = redis_process.url()
        async with Client(_server(tmp_path, url)) as a, Client(_server(tmp_path, url)) as b:
            seen = (await a.call_tool("describe_image", _carrying(PICTURE))).structured_content["image_id"]
            unseen = (await a.call_tool("describe_image", _carrying(OTHER))).structured_content["image_id"]
            assert outcome(await b.call_tool("answer_about_image", _by_id(seen))) == "ok"
            redis_process.stop()

            started = time.monotonic()
            refused = await b.call_tool("answer_about_image", _by_id(unseen))
            assert time.monotonic() - started < UNAVAILABLE_WITHIN_S
            assert outcome(refused) == "image_store_unavailable", error_text(refused)
            assert "send the image itself again" in error_text(refused)
            assert outcome(await b.call_tool("describe_image", _carrying(OTHER))) == "ok"  # images sent still work
            assert outcome(await b.call_tool("answer_about_image", _by_id(seen))) == "ok"  # b's own copy
            while_down = (await a.call_tool("describe_image", _carrying(PICTURE))).structured_content["image_id"]
            for image_id in (seen, unseen, while_down):  # every id a made, from a's own copies
                assert outcome(await a.call_tool("answer_about_image", _by_id(image_id))) == "ok"

            redis_process.start()  # the same port, empty: no server restarts
            await _until_shared(a, b)
    assert "cannot be reached" in caplog.text and "answers again" in caplog.text


async def _until_shared(a: Client, b: Client, timeout: float = 15.0) -> None:
    """Send a new image to ``a`` until ``b`` answers by its id (a put within a moment of the outage stays local)."""
    deadline = time.monotonic() + timeout
    while True:
        image_id = (await a.call_tool("describe_image", _carrying(PICTURE))).structured_content["image_id"]
        got = outcome(await b.call_tool("answer_about_image", _by_id(image_id)))
        if got == "ok":
            return
        assert got in ("unknown_image_id", "image_store_unavailable"), got
        assert time.monotonic() < deadline, f"ids not shared again {timeout:g} s after Redis came back: {got}"
        await anyio.sleep(0.2)


async def test_a_server_starts_and_serves_images_without_redis(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"  # nothing listens there
    async with Client(_server(tmp_path, url)) as client:
        made = await client.call_tool("describe_image", _carrying(PICTURE))
        assert not made.is_error, error_text(made)
        again = await client.call_tool("answer_about_image", _by_id(made.structured_content["image_id"]))
        assert not again.is_error, error_text(again)  # this process's own copy
        started = time.monotonic()
        never = await client.call_tool("answer_about_image", _by_id(NEVER_ISSUED))
        assert time.monotonic() - started < UNAVAILABLE_WITHIN_S
    assert outcome(never) == "image_store_unavailable", error_text(never)
    assert "cannot be reached" in caplog.text
    assert SECRET not in caplog.text and SECRET not in error_text(never)


async def test_a_redis_that_never_answers_holds_no_call_up(tmp_path: Path) -> None:
    with socket.socket() as silent:  # takes connections (the kernel does), never says a word: a hung Redis
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        async with Client(_server(tmp_path, url)) as client:
            started = time.monotonic()
            made = await client.call_tool("describe_image", _carrying(PICTURE))
            never = await client.call_tool("answer_about_image", _by_id(NEVER_ISSUED))
            took = time.monotonic() - started
    assert not made.is_error, error_text(made)
    assert outcome(never) == "image_store_unavailable", error_text(never)
    assert took < UNAVAILABLE_WITHIN_S  # one time-out at most: after it, the store leaves Redis alone a moment


# --- the setting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [f"http://user:{SECRET}@cache:6379/0", f"redis://:{SECRET}@cache:port/0", f"redis://:{SECRET}@cache:6379/db",
     f"redis://:{SECRET}@:6379/0", f"{SECRET}@cache:6379"],
)  # fmt: skip
def test_a_bad_store_url_stops_the_start_without_showing_it(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from vlm_tools.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--image-store", url])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "image_store" in message and SECRET not in message


def test_store_urls_accepted_and_kept_secret() -> None:
    assert Settings().image_store_url is None
    for url in (f"redis://:{SECRET}@cache.internal:6380/2", "rediss://cache:6379", "redis://[::1]:6379/0"):
        settings = Settings(image_store=url)
        assert settings.image_store_url == url
        assert SECRET not in repr(settings)
