"""Benchmark the image stores on a 1280×720 screenshot: what a put and a get cost, and the encodings not chosen.

* **stores** — ``put`` and ``get`` of :class:`~vlm_tools.images.memory_store.MemoryImageStore` and of
  :class:`~vlm_tools.images.redis_store.RedisImageStore`, the latter both from the process that sent the image
  (its own copy) and from another store that never saw it (the round trip every other replica pays).
* **encodings** — the pixels written to Redis and read back as an image, by encoding: raw RGB bytes (what the
  store keeps), zlib level 1 of those bytes, PNG at compression levels 0 and 1; with each one's size in Redis.

Two images: a synthetic UI screenshot (flat panels, text, a photo inset: compresses ~12×) and random noise (does
not compress: the worst case for an encoder). Starts its own ``redis-server`` on a free loopback port (``--url``
uses a running one, whose ``vlm-tools:*`` keys it overwrites). Run from the repository root::

    .venv/bin/python benchmarks/bench_image_store.py --out bench_image_store.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import shutil
import socket
import statistics
import subprocess
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import redis
import redis.asyncio as aioredis
from PIL import Image, ImageDraw

from vlm_tools.images.memory_store import MemoryImageStore
from vlm_tools.images.redis_store import RedisImageStore

T = TypeVar("T")


def screenshot() -> Image.Image:
    """A 1280×720 UI-like screenshot: a title bar, a side panel, lines of text, buttons and a photo inset."""
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (1280, 720), (246, 247, 249))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 1280, 56), fill=(32, 40, 60))
    draw.rectangle((0, 56, 240, 720), fill=(235, 237, 241))
    for i in range(60):
        draw.text((260 + (i % 3) * 330, 80 + (i // 3) * 30), f"Lorem ipsum dolor sit amet {i}", fill=(20, 20, 20))
    for i in range(8):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rounded_rectangle((260 + i * 120, 680, 360 + i * 120, 710), 6, fill=colour)
    image.paste(Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)), (900, 300))
    return image


def noise() -> Image.Image:
    """1280×720 random pixels."""
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8))


def _png(level: int) -> Callable[[Image.Image], bytes]:
    def encode(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    return encode


def _from_png(data: bytes, size: tuple[int, int]) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


ENCODINGS: dict[str, tuple[Callable[[Image.Image], bytes], Callable[[bytes, tuple[int, int]], Image.Image]]] = {
    "raw RGB (chosen)": (Image.Image.tobytes, lambda data, size: Image.frombytes("RGB", size, data)),
    "zlib-1 of raw": (
        lambda image: zlib.compress(image.tobytes(), 1),
        lambda data, size: Image.frombytes("RGB", size, zlib.decompress(data)),
    ),
    "PNG level 0": (_png(0), _from_png),
    "PNG level 1": (_png(1), _from_png),
}


async def timed(times: list[float], step: Awaitable[T]) -> T:
    """Await ``step``, appending its wall time to ``times``."""
    started = time.perf_counter()
    result = await step
    times.append(time.perf_counter() - started)
    return result


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list of times, in milliseconds."""
    return {name: round(statistics.median(values) * 1000, 2) for name, values in times.items()}


async def measure_stores(url: str, image: Image.Image, repeat: int) -> dict[str, float]:
    """Each round: put, then a follow-up get on the same store and a get on another store (another process)."""
    memory = MemoryImageStore(1000, 10**11)
    sender = RedisImageStore(url, max_count=1000, max_bytes=10**11, ttl_s=600)
    reader = RedisImageStore(url, max_count=1000, max_bytes=10**11, ttl_s=600)
    steps = ["memory put", "memory get", "redis put", "redis get (same store)", "redis get (other store)"]
    times: dict[str, list[float]] = {step: [] for step in steps}
    try:
        for _ in range(repeat):
            image_id = await timed(times["memory put"], memory.put(image, "s"))
            await timed(times["memory get"], memory.get(image_id, "s"))
            image_id = await timed(times["redis put"], sender.put(image, "s"))
            await timed(times["redis get (same store)"], sender.get(image_id, "s"))
            got = await timed(times["redis get (other store)"], reader.get(image_id, "s"))
            assert got.tobytes() == image.tobytes()
        return medians_ms(times)
    finally:
        await sender.aclose()
        await reader.aclose()


async def measure_encodings(url: str, image: Image.Image, repeat: int) -> dict[str, dict[str, float]]:
    """Per encoding: encode + SET, and GET + decode, with the bytes kept in Redis."""
    client = aioredis.Redis.from_url(url)
    rows = {}
    try:
        for name, (encode, decode) in ENCODINGS.items():
            times: dict[str, list[float]] = {"put": [], "get": []}
            for _ in range(repeat):
                started = time.perf_counter()
                data = encode(image)
                await client.set("vlm-tools:bench", data)
                times["put"].append(time.perf_counter() - started)
                started = time.perf_counter()
                decode(await client.get("vlm-tools:bench"), image.size)
                times["get"].append(time.perf_counter() - started)
            rows[name] = {**medians_ms(times), "MB": round(len(data) / 1e6, 2)}
        await client.delete("vlm-tools:bench")
        return rows
    finally:
        await client.aclose()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port, persistence off; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server), or pass --url")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        probe_client = redis.Redis(port=port, socket_connect_timeout=1)
        for _ in range(100):  # until it answers, 10 s at most
            with contextlib.suppress(redis.ConnectionError):
                probe_client.ping()
                break
            time.sleep(0.1)
        probe_client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def run(url: str, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, image in (("screenshot", screenshot()), ("noise", noise())):
        results[name] = {"stores": await measure_stores(url, image, repeat),
                         "encodings": await measure_encodings(url, image, repeat)}  # fmt: skip
        print(f"\n{name} 1280x720 ({repeat} runs, median ms)")
        for what, ms in results[name]["stores"].items():
            print(f"  {what:26s} {ms:8.2f}")
        for what, row in results[name]["encodings"].items():
            print(f"  {what:26s} put {row['put']:7.2f}  get {row['get']:7.2f}  {row['MB']:5.2f} MB in Redis")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30, help="runs per number")
    parser.add_argument("--url", help="a running Redis to use instead of starting one")
    parser.add_argument("--out", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(redis_server())
        results = asyncio.run(run(url, args.repeat))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
