"""Each source form of ImageSources, the in-memory image store's bounds and expiry, and scope isolation."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import anyio
import pytest
from PIL import Image

from conftest_inputs import PNG_BODY, LocalServer, image_bytes, local_server, noisy_image
from vlm_tools.errors import InvalidArgument, PathNotAllowed, UnknownImageId, UrlBlocked
from vlm_tools.images import ImageSources, MemoryImageStore, StoredImage, is_image_id
from vlm_tools.images.lru import ImageLru
from vlm_tools.images.store import IMAGE_ID_PATTERN
from vlm_tools.settings import Settings

__all__ = ["local_server"]

pytestmark = pytest.mark.timeout(30)

PICTURE = noisy_image((12, 7), seed=3)
PNG = image_bytes(PICTURE, "PNG")


@pytest.fixture
def picture_path(tmp_path: Path) -> Path:
    path = tmp_path / "picture.png"
    path.write_bytes(PNG)
    return path


def _sources(tmp_path: Path, **overrides: object) -> ImageSources:
    settings = Settings(allow_path=(tmp_path,), allow_private_urls=True, **overrides)
    return ImageSources(settings, MemoryImageStore(16, 10**8))


def _same_as_picture(stored: StoredImage) -> None:
    assert is_image_id(stored.image_id)
    assert (stored.size.width, stored.size.height) == (12, 7)
    assert stored.image.mode == "RGB"
    assert stored.image.tobytes() == PICTURE.tobytes()


FORMS = [
    ("absolute-path", lambda p: str(p)),
    ("file-url", lambda p: p.as_uri()),
    ("file-url-localhost", lambda p: "file://localhost" + str(p)),
    ("data-uri", lambda p: "data:image/png;base64," + base64.b64encode(PNG).decode()),
    ("data-uri-upper-case", lambda p: "DATA:IMAGE/PNG;BASE64," + base64.b64encode(PNG).decode()),
    ("bare-base64", lambda p: base64.b64encode(PNG).decode()),
    ("bare-base64-surrounding-space", lambda p: "  " + base64.b64encode(PNG).decode() + "\n"),
]


@pytest.mark.parametrize("build", [f[1] for f in FORMS], ids=[f[0] for f in FORMS])
async def test_source_forms(build, picture_path: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sources = _sources(tmp_path)
    try:
        _same_as_picture(await sources.load_image(build(picture_path), "scope"))
    finally:
        await sources.aclose()


async def test_relative_and_home_paths(picture_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    sources = _sources(tmp_path)
    try:
        _same_as_picture(await sources.load_image("picture.png", "s"))
        _same_as_picture(await sources.load_image("./picture.png", "s"))
        _same_as_picture(await sources.load_image("~/picture.png", "s"))
    finally:
        await sources.aclose()


async def test_jpeg_base64_starting_with_slash_is_not_taken_for_a_path(tmp_path: Path) -> None:
    jpeg = image_bytes(Image.new("RGB", (5, 4), (0, 200, 0)), "JPEG")
    text = base64.b64encode(jpeg).decode()
    assert text.startswith("/9j/")
    sources = _sources(tmp_path)
    try:
        stored = await sources.load_image(text, "s")
    finally:
        await sources.aclose()
    assert stored.image.size == (5, 4)


async def test_http_url_via_local_server(local_server: LocalServer, tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    try:
        stored = await sources.load_image(f"{local_server.base}/img.png", "s")
    finally:
        await sources.aclose()
    assert stored.image.size == Image.open(__import__("io").BytesIO(PNG_BODY)).size
    assert local_server.log.requests == ["/img.png"]


async def test_url_fetching_off(local_server: LocalServer, tmp_path: Path) -> None:
    sources = _sources(tmp_path, allow_urls=False)
    try:
        for url in (f"{local_server.base}/img.png", "https://example.com/a.png", "HTTP://example.com/a.png"):
            with pytest.raises(UrlBlocked, match=r"URL fetching is off \(--no-urls\)"):
                await sources.load_image(url, "s")
    finally:
        await sources.aclose()
    assert local_server.log.connections == 0


async def test_private_urls_refused_by_default(local_server: LocalServer, tmp_path: Path) -> None:
    sources = ImageSources(Settings(allow_path=(tmp_path,)), MemoryImageStore(4, 10**8))
    try:
        with pytest.raises(UrlBlocked, match="loopback"):
            await sources.load_image(f"{local_server.base}/img.png", "s")
    finally:
        await sources.aclose()
    assert local_server.log.connections == 0


async def test_image_id_reuse_returns_same_id_and_pixels(picture_path: Path, tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    try:
        first = await sources.load_image(str(picture_path), "s")
        again = await sources.load_image(first.image_id, "s")
        spaced = await sources.load_image(f"  {first.image_id}\n", "s")
        as_bytes = await sources.load_bytes(first.image_id, "s")
    finally:
        await sources.aclose()
    assert again.image_id == first.image_id == spaced.image_id
    assert again.image.tobytes() == first.image.tobytes()
    assert again.size == first.size
    assert isinstance(as_bytes, StoredImage) and as_bytes.image_id == first.image_id


async def test_each_load_gets_a_fresh_id(picture_path: Path, tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    try:
        ids = {(await sources.load_image(str(picture_path), "s")).image_id for _ in range(5)}
    finally:
        await sources.aclose()
    assert len(ids) == 5


async def test_load_bytes_returns_raw_bytes(picture_path: Path, tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    try:
        assert await sources.load_bytes(str(picture_path), "s") == PNG
        assert await sources.load_bytes(base64.b64encode(PNG).decode(), "s") == PNG
    finally:
        await sources.aclose()


BAD_ARGUMENTS = [
    ("empty", "", InvalidArgument),
    ("blank", "  \n ", InvalidArgument),
    ("prose", "a picture of my cat", InvalidArgument),
    ("unknown-well-formed-id", "img_" + "0" * 32, UnknownImageId),
    ("malformed-id", "img_123", UnknownImageId),
    ("missing-file", "/definitely/not/here.png", PathNotAllowed),
    ("missing-relative-file", "nothere.png", PathNotAllowed),
    ("ftp-url", "ftp://example.com/a.png", UrlBlocked),
    ("javascript-url", "javascript:alert(1)", UrlBlocked),
    ("file-url-remote-host", "file://example.com/etc/passwd", PathNotAllowed),
    ("file-url-outside", "file:///etc/passwd", PathNotAllowed),
]


@pytest.mark.parametrize(("argument", "error"), [b[1:] for b in BAD_ARGUMENTS], ids=[b[0] for b in BAD_ARGUMENTS])
async def test_bad_arguments(argument: str, error: type[Exception], tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    try:
        with pytest.raises(error):
            await sources.load_image(argument, "s")
    finally:
        await sources.aclose()


async def test_not_a_string_is_invalid_argument(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    try:
        with pytest.raises(InvalidArgument):
            await sources.load_image(b"bytes", "s")  # type: ignore[arg-type]
    finally:
        await sources.aclose()


# --- the store ---------------------------------------------------------------------------------------------


def _img(side: int = 10) -> Image.Image:
    return Image.new("RGB", (side, side))


async def test_ids_are_unguessable_and_well_formed() -> None:
    store = MemoryImageStore(100, 10**8)
    ids = [await store.put(_img(), "s") for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(IMAGE_ID_PATTERN.fullmatch(i) for i in ids)


async def test_eviction_by_count_oldest_first() -> None:
    store = MemoryImageStore(max_count=3, max_bytes=10**8)
    ids = [await store.put(_img(), "s") for _ in range(4)]
    with pytest.raises(UnknownImageId):
        await store.get(ids[0], "s")
    for i in ids[1:]:
        await store.get(i, "s")
    assert len(store) == 3


async def test_get_refreshes_so_least_recently_used_goes() -> None:
    store = MemoryImageStore(max_count=2, max_bytes=10**8)
    a, b = await store.put(_img(), "s"), await store.put(_img(), "s")
    await store.get(a, "s")  # b is now the least recently used
    c = await store.put(_img(), "s")
    await store.get(a, "s")
    await store.get(c, "s")
    with pytest.raises(UnknownImageId):
        await store.get(b, "s")


async def test_eviction_by_bytes() -> None:
    store = MemoryImageStore(max_count=100, max_bytes=3 * 10 * 10 * 3)  # room for three 10x10 RGB images
    ids = [await store.put(_img(10), "s") for _ in range(3)]
    assert store.nbytes == 900
    big = await store.put(_img(14), "s")  # 588 bytes: two of the old ones must go
    assert store.nbytes <= 900
    with pytest.raises(UnknownImageId):
        await store.get(ids[0], "s")
    with pytest.raises(UnknownImageId):
        await store.get(ids[1], "s")
    await store.get(ids[2], "s")
    await store.get(big, "s")


async def test_image_larger_than_the_store_is_refused() -> None:
    from vlm_tools.errors import ImageTooLarge

    store = MemoryImageStore(max_count=10, max_bytes=100)
    with pytest.raises(ImageTooLarge, match="--image-store-bytes"):
        await store.put(_img(10), "s")
    assert len(store) == 0


async def test_images_expire_after_the_ttl_however_often_used() -> None:
    store = MemoryImageStore(max_count=10, max_bytes=10**8, ttl_s=1.0)
    gone: list[str] = []
    store.on_evict(gone.append)
    old = await store.put(_img(), "s")
    await anyio.sleep(0.6)
    await store.get(old, "s")  # in use, but the TTL counts from when it was sent
    young = await store.put(_img(), "s")
    await anyio.sleep(0.6)
    with pytest.raises(UnknownImageId, match="expired from the store"):
        await store.get(old, "s")
    assert await store.get(young, "s") is not None
    assert gone == [old] and len(store) == 1 and store.nbytes == 300  # the expired image's memory went with it


async def test_evicted_images_are_told_to_listeners() -> None:
    store = MemoryImageStore(max_count=2, max_bytes=10**8)
    gone: list[str] = []
    store.on_evict(gone.append)
    ids = [await store.put(_img(), "s") for _ in range(4)]
    assert gone == ids[:2]


async def test_scope_isolation_gives_the_same_error_as_unknown() -> None:
    store = MemoryImageStore(10, 10**8)
    mine = await store.put(_img(), "session-a")
    with pytest.raises(UnknownImageId) as other_scope:
        await store.get(mine, "session-b")
    with pytest.raises(UnknownImageId) as never_issued:
        await store.get("img_" + "f" * 32, "session-b")
    # Same words either way: nothing is learnt about another session's images.
    assert str(other_scope.value).replace(mine, "ID") == str(never_issued.value).replace("img_" + "f" * 32, "ID")
    assert await store.get(mine, "session-a") is not None


async def test_scope_isolation_through_sources(picture_path: Path, tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    try:
        stored = await sources.load_image(str(picture_path), "session-a")
        with pytest.raises(UnknownImageId):
            await sources.load_image(stored.image_id, "session-b")
        with pytest.raises(UnknownImageId):
            await sources.load_bytes(stored.image_id, "session-b")
    finally:
        await sources.aclose()


async def test_eviction_through_sources(picture_path: Path, tmp_path: Path) -> None:
    sources = ImageSources(Settings(allow_path=(tmp_path,)), MemoryImageStore(max_count=2, max_bytes=10**8))
    try:
        first = await sources.load_image(str(picture_path), "s")
        await sources.load_image(str(picture_path), "s")
        await sources.load_image(str(picture_path), "s")
        with pytest.raises(UnknownImageId, match="send the image itself again"):
            await sources.load_image(first.image_id, "s")
    finally:
        await sources.aclose()


def test_the_lru_is_thread_safe() -> None:
    # Pages render and listeners run in worker threads: the LRU under both stores takes a lock.
    images = ImageLru(max_count=50, max_bytes=10**8, ttl_s=3600)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                image_id = f"img_{n}_{i}"
                images.add(image_id, _img(4), "s")
                images.find(image_id, "s")  # None when evicted by another thread in between: allowed
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(images) == 50
    assert images.nbytes == 50 * 4 * 4 * 3


async def test_file_reads_and_decoding_run_off_the_event_loop(
    picture_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlm_tools.images.sources as sources_module

    seen: dict[str, threading.Thread] = {}
    real_decode, real_read = sources_module.decode_image, sources_module.read_file_capped

    def decode(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["decode"] = threading.current_thread()
        return real_decode(*args, **kwargs)

    def read(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["read"] = threading.current_thread()
        return real_read(*args, **kwargs)

    monkeypatch.setattr(sources_module, "decode_image", decode)
    monkeypatch.setattr(sources_module, "read_file_capped", read)
    sources = _sources(tmp_path)
    try:
        await sources.load_image(str(picture_path), "s")
    finally:
        await sources.aclose()
    assert seen["decode"] is not threading.current_thread()
    assert seen["read"] is not threading.current_thread()
