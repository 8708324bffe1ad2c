"""Images behind ``image_id``s kept in Redis, so that every server process pointed at it answers every id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio.to_thread
import redis.asyncio as aioredis
from PIL import Image
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ..errors import ConfigurationError, ImageStoreUnavailable
from ..settings import redis_location
from .lru import ImageLru
from .store import EvictionListener, ImageStore, check_fits, is_image_id, new_image_id, unknown_image_id

logger = logging.getLogger(__name__)

T = TypeVar("T")

PIXELS_KEY = "vlm-tools:pixels:"  # + image id: the raw RGB bytes (a string: Redis sends it back without a copy)
INFO_KEY = "vlm-tools:info:"  # + image id: "<width> <height> <scope>"
ORDER_KEY = "vlm-tools:images:in-order"  # sorted set: image id -> its sequence number (the order they were sent)
SIZES_KEY = "vlm-tools:images:bytes-by-id"  # hash: image id -> bytes charged
TOTAL_KEY = "vlm-tools:images:bytes"  # bytes charged for every image held
SEQUENCE_KEY = "vlm-tools:images:sequence"  # the last sequence number given

TIMEOUT_S = 1.0
"""Time limit for connecting to Redis and for each read or write: an unreachable Redis costs a call no more."""
RETRY_AFTER_S = (1.0, 8.0)
"""After a failure Redis is not asked again for a while, 1 s at first, twice as long after each failure of the same
outage, 8 s at most: an outage costs a time-out now and then, not one per call, and its end is noticed soon."""
LOCAL_COUNT = 32
"""Most images a process keeps copies of (within the byte cap): enough for the follow-ups of the calls in
flight; the models' encodings of images, the costly part to redo, are fewer still (``--encoding-cache-bytes``)."""

# Run in the MULTI that writes the new image's two keys. KEYS: order, sizes, total, sequence. ARGV: id, nbytes,
# ttl_ms, max_count, max_bytes, pixels key prefix, info key prefix. Returns the ids evicted for room.
BOOKKEEPING_SCRIPT = """
local order, sizes, total_key, sequence = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, nbytes, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_count, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local pixels, info = ARGV[6], ARGV[7]
local total = tonumber(redis.call('GET', total_key) or '0')
local function drop(old)
  total = total - tonumber(redis.call('HGET', sizes, old) or '0')
  redis.call('HDEL', sizes, old)
  redis.call('ZREM', order, old)
  redis.call('DEL', pixels .. old, info .. old)
end
-- Images past their TTL, the oldest, are gone from Redis already: their bytes leave the total now.
while true do
  local oldest = redis.call('ZRANGE', order, 0, 0)[1]
  if oldest == nil or redis.call('EXISTS', info .. oldest) == 1 then break end
  drop(oldest)
end
-- A sequence number, not a clock, orders the images: two sent in the same millisecond keep their order.
redis.call('ZADD', order, redis.call('INCR', sequence), id)
redis.call('HSET', sizes, id, nbytes)
total = total + nbytes
local evicted = {}
while redis.call('ZCARD', order) > max_count or total > max_bytes do
  local victim = redis.call('ZRANGE', order, 0, 0)[1]
  if victim == nil or victim == id then break end
  drop(victim)
  evicted[#evicted + 1] = victim
end
-- The bookkeeping lives as long as the newest image: an idle Redis is left empty.
redis.call('SET', total_key, math.max(total, nbytes), 'PX', ttl_ms)
for _, kept in ipairs({order, sizes, sequence}) do redis.call('PEXPIRE', kept, ttl_ms) end
return evicted
"""

INLINE_BYTES = 16_000_000
"""Pixels are copied on the event loop up to this size (a few milliseconds at most, less than a hop to a worker
thread costs on a busy machine); bigger images are copied in a worker thread."""


class RedisImageStore(ImageStore):
    """Images in Redis at ``url``: ``max_count`` images and ``max_bytes`` bytes across every process sharing it,
    each for ``ttl_s`` seconds after it was sent, with this process's recent copies in front.

    Per image, Redis holds two keys that expire ``ttl_s`` after the image was sent: ``vlm-tools:pixels:<id>``, the
    raw 8-bit RGB bytes, and ``vlm-tools:info:<id>``, its width, height and scope. Raw pixels because they are lossless,
    need no encoder or decoder, and are exactly the bytes the byte cap charges, so ``--image-store-bytes`` is what Redis
    holds. They are also the fastest: for a 1280x720 screenshot (``benchmarks/bench_image_store.py``, a busy 2-core
    machine) raw bytes went to Redis and back in 3-11 ms each way, where PNG at compression level 1 took 31-75 ms to
    put and zlib level 1 of the same bytes 15-23 ms; a photo, which does not compress, 126-231 ms and 75-136 ms. Their
    12x smaller screenshots pay for that only where the link to Redis is slower than 1-2 Gbit/s, and photos never.

    The count and byte caps hold across processes: one MULTI writes the image's keys and runs a Lua script that keeps a
    sorted set of ids in the order they were sent and a running byte total, and evicts the oldest first.

    A small LRU of this process's own copies sits in front: a follow-up on the same process needs no round trip, and
    an image sent while Redis is down still answers follow-ups here. Every call to Redis has a short time limit, and
    after a failure Redis is left alone for a while, so during an outage calls that carry an image lose a time-out now
    and then at most, and calls by an id this process does not hold get a quick
    :class:`~vlm_tools.errors.ImageStoreUnavailable`; when Redis answers again, so does the store. The password in
    the URL is never logged: messages name ``redis://host:port/db``.
    """

    def __init__(self, url: str, *, max_count: int, max_bytes: int, ttl_s: float, timeout_s: float = TIMEOUT_S) -> None:
        self.location = redis_location(url)
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._ttl_ms = max(1, round(ttl_s * 1000))
        # Expiry happens in Redis, where no listener hears it; listeners hear of this process's copies leaving.
        self._local = ImageLru(min(max_count, LOCAL_COUNT), max_bytes, ttl_s)
        try:
            # One retry, on a dropped connection only: a connection pooled before Redis restarted fails at once
            # and the retry opens a fresh one; a time-out is not waited for twice.
            retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
            self._redis = aioredis.Redis.from_url(
                url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=retry
            )
        except (ValueError, TypeError):  # the URL's ?options; their values are not repeated (nor the password)
            raise ConfigurationError(f"--image-store {self.location}: the URL's options are not valid") from None
        self._quiet_until = 0.0
        self._quiet_s = RETRY_AFTER_S[0]
        self._down = False

    def on_evict(self, listener: EvictionListener) -> None:
        # What a model made of an image goes when this process's copy goes. Images that expire or are evicted in
        # Redis leave no word here; the models' encoding caches are bounded by bytes anyway (--encoding-cache-bytes).
        self._local.on_evict(listener)

    async def check(self) -> bool:
        """Whether Redis answers now; logs a warning when it does not (serving goes on: images sent with a call
        still work)."""
        try:
            await self._ask(self._redis.ping)
        except ImageStoreUnavailable:
            return False
        logger.info("image store: Redis at %s", self.location)
        return True

    async def put(self, image: Image.Image, scope: str) -> str:
        nbytes = check_fits(image, self._max_bytes)
        image_id = new_image_id()
        self._local.add(image_id, image, scope)
        pixels = await _copied(nbytes, image.tobytes)
        try:
            evicted = await self._ask(lambda: self._write(image_id, image.size, scope, pixels))
        except ImageStoreUnavailable:
            logger.debug("image %s kept on this process only: Redis at %s cannot be reached", image_id, self.location)
        else:
            logger.debug("image %s in Redis; %d evicted for room", image_id, len(evicted))
        return image_id

    async def get(self, image_id: str, scope: str) -> Image.Image:
        image = self._local.find(image_id, scope)
        if image is not None:
            return image
        if not is_image_id(image_id):  # only ids of the issued form are looked up: no other key is ever read
            raise unknown_image_id(image_id)
        (info, pixels), ttl_ms = await self._ask(lambda: self._read(image_id))
        if info is None or pixels is None:  # never issued, expired or evicted
            raise unknown_image_id(image_id)
        size, held_scope = _parse_info(info, len(pixels))
        if size is None:  # not written by this store: treat as not held
            logger.warning("image %s in Redis at %s is malformed; ignored", image_id, self.location)
        if size is None or held_scope != scope:
            raise unknown_image_id(image_id)
        image = await _copied(len(pixels), Image.frombytes, "RGB", size, pixels)
        self._local.add(image_id, image, scope, ttl_s=ttl_ms / 1000 if ttl_ms > 0 else None)
        return image

    async def aclose(self) -> None:
        """Close the connections to Redis."""
        await self._redis.aclose()

    async def _write(self, image_id: str, size: tuple[int, int], scope: str, pixels: bytes) -> list[bytes]:
        """The image's two keys and the bookkeeping, in one MULTI (one round trip); the ids evicted for room."""
        keys = [ORDER_KEY, SIZES_KEY, TOTAL_KEY, SEQUENCE_KEY]
        args = [image_id, len(pixels), self._ttl_ms, self._max_count, self._max_bytes, PIXELS_KEY, INFO_KEY]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(PIXELS_KEY + image_id, pixels, px=self._ttl_ms)
            pipe.set(INFO_KEY + image_id, f"{size[0]} {size[1]} {scope}", px=self._ttl_ms)
            pipe.eval(BOOKKEEPING_SCRIPT, len(keys), *keys, *args)  # EVAL, not EVALSHA: no script cache to miss
            return list((await pipe.execute())[-1])

    async def _read(self, image_id: str) -> list[Any]:
        """``[[info, pixels], milliseconds left]`` of an image (``None`` for keys Redis does not hold)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.mget(INFO_KEY + image_id, PIXELS_KEY + image_id)
            pipe.pttl(PIXELS_KEY + image_id)
            return list(await pipe.execute())

    async def _ask(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; :class:`ImageStoreUnavailable` when Redis cannot be reached (or could not a
        moment ago). Says once per outage that Redis is down, and once that it is back."""
        if time.monotonic() < self._quiet_until:
            raise self._unavailable()
        try:
            result = await operation()
        except RedisError as error:  # connection refused or lost, time-outs, a Redis that refuses writes
            self._quiet_s = min(self._quiet_s * 2, RETRY_AFTER_S[1]) if self._down else RETRY_AFTER_S[0]
            self._quiet_until = time.monotonic() + self._quiet_s
            if not self._down:
                self._down = True
                logger.warning(
                    "the image store (Redis at %s) cannot be reached (%s: %s): images sent now are kept on this "
                    "process only, and ids from other processes cannot be looked up, until it answers again",
                    self.location, type(error).__name__, error,
                )  # fmt: skip
            raise self._unavailable() from None
        if self._down:
            self._down = False
            logger.warning("the image store (Redis at %s) answers again", self.location)
        return result

    def _unavailable(self) -> ImageStoreUnavailable:
        return ImageStoreUnavailable(
            f"the image store (Redis at {self.location}) cannot be reached, so this image_id cannot be looked up: "
            "send the image itself again"
        )


async def _copied(nbytes: int, copy: Callable[..., T], *args: Any) -> T:
    """``copy(*args)`` (pixels to bytes or back): on the event loop when small, in a worker thread when big."""
    if nbytes <= INLINE_BYTES:
        return copy(*args)
    return await anyio.to_thread.run_sync(copy, *args)


def _parse_info(info: bytes, npixels: int) -> tuple[tuple[int, int] | None, str]:
    """``(size, scope)`` from an image's ``"<width> <height> <scope>"``; size ``None`` unless the pixels fit it."""
    width, _, rest = info.decode(errors="replace").partition(" ")
    height, _, scope = rest.partition(" ")
    if not (width.isdigit() and height.isdigit()) or int(width) * int(height) * 3 != npixels:
        return None, scope
    return (int(width), int(height)), scope
