"""Scale-out on Ray Serve, on a real local Ray cluster: a burst adds model replicas and every call is answered,
idle takes them away, follow-ups reach the replica that holds their image, a replica killed mid-burst loses no
call, and a saturated deployment answers ``busy`` at once.

One Ray cluster for the whole module (it starts in seconds); each test deploys the application it needs and
deletes it after. The model is the trained Molmo2 fixture (its images' KV prefixes are what affinity keeps).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import data_uri, noise_image, png_of
from server_process import TOKEN, free_port, http_client

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")
from ray import serve  # noqa: E402

from vlm_tools.settings import Settings  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.scale]

REPO = Path(__file__).resolve().parent.parent
MODEL = str(REPO / "tests" / "fixtures" / "models" / "molmo2-ui")
APP = "vlm-tools"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster with Serve's proxy on a free loopback port; its base URL."""
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def scale_settings(port: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "transport": "http", "scale": "ray", "port": port, "auth_token": TOKEN, "model": (MODEL,),
        "device": "cpu", "replica_cpus": 0.5, "max_batch_size": 4, "batch_wait_ms": 5, "log_level": "warning",
    }  # fmt: skip
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def deploy(base: str, **overrides: object) -> None:
    from vlm_tools.scale.app import build_app

    port = int(base.rsplit(":", 1)[1])
    serve.run(build_app(scale_settings(port, **overrides)), name=APP, route_prefix="/")


@pytest.fixture
def app(cluster: str) -> Iterator[str]:
    yield cluster
    serve.delete(APP)


def health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=10).json()


def replicas(base: str) -> int:
    return int(health(base)["replicas"][MODEL])


def affinity(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    found = re.findall(r'vlm_tools_image_affinity_total\{held="(yes|no)",model="[^"]*"\} ([0-9.e+]+)', text)
    counts = {held: float(value) for held, value in found}
    return {"yes": counts.get("yes", 0.0), "no": counts.get("no", 0.0)}


def image(seed: int) -> str:
    return data_uri(png_of(noise_image(160, 100, seed)))


async def point(client, picture: str) -> object:
    return await client.call_tool("point_to_object", {"image": picture, "description": "red button"})


async def wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def test_a_burst_adds_replicas_answers_every_call_and_idle_takes_them_away(app: str) -> None:
    deploy(app, min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0, downscale_delay_s=2)
    assert replicas(app) == 1
    stop = asyncio.Event()
    answered, failed = [], []

    async def caller(index: int) -> None:
        async with http_client(app) as client:
            seed = index * 1000
            while not stop.is_set():
                seed += 1
                result = await point(client, image(seed))
                (failed if result.is_error else answered).append(result)

    callers = [asyncio.ensure_future(caller(i)) for i in range(8)]
    try:
        grew = await wait_for(lambda: replicas(app) == 2, 120, "a second replica under the burst")
        await asyncio.sleep(3)  # both replicas serve for a while
    finally:
        stop.set()
        await asyncio.gather(*callers)
    assert not failed, [r.content[0].text for r in failed[:3]]
    assert len(answered) > 8, len(answered)
    shrank = await wait_for(lambda: replicas(app) == 1, 120, "back to one replica when idle")
    print(f"second replica after {grew:.1f} s of burst; back to one after {shrank:.1f} s idle; {len(answered)} calls")


async def test_follow_ups_reach_the_replica_that_holds_the_image_and_survive_it(app: str) -> None:
    deploy(app, min_replicas=2, max_replicas=2)
    assert replicas(app) == 2
    async with http_client(app) as client:
        first = [await point(client, image(seed)) for seed in range(10)]
        assert not any(r.is_error for r in first)
        ids = [r.structured_content["image_id"] for r in first]
        before = affinity(app)
        for image_id in ids:
            result = await client.call_tool("answer_about_image", {"image": image_id, "question": "what is red?"})
            assert not result.is_error, result.content[0].text
        after = affinity(app)
        hits = after["yes"] - before["yes"]
        assert hits + after["no"] - before["no"] == len(ids)
        assert hits / len(ids) >= 0.9, (hits, after, before)  # sequential follow-ups: every one should be a hit

        # The replica that holds an image goes away: its follow-up is answered by the other, which encodes again.
        replica_names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#molmo2#")]  # fmt: skip
        assert len(replica_names) == 2
        for name in replica_names:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            break
        for image_id in ids:
            result = await client.call_tool("answer_about_image", {"image": image_id, "question": "and now?"})
            assert not result.is_error, result.content[0].text


async def test_a_replica_killed_during_a_burst_loses_no_call(app: str) -> None:
    deploy(app, min_replicas=2, max_replicas=2)
    results: list[object] = []

    async def caller(index: int) -> None:
        async with http_client(app) as client:
            for n in range(6):
                results.append(await point(client, image(index * 100 + n)))

    callers = [asyncio.ensure_future(caller(i)) for i in range(8)]
    await asyncio.sleep(1.5)
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#molmo2#"))  # fmt: skip
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    await asyncio.gather(*callers)
    errors = [r.content[0].text for r in results if r.is_error]  # type: ignore[attr-defined]
    assert not errors and len(results) == 48, errors[:3]


async def test_a_saturated_deployment_answers_busy_at_once(app: str) -> None:
    deploy(app, min_replicas=1, max_replicas=1, queue_size=2, max_batch_size=1)
    async with http_client(app) as client:

        async def timed(seed: int) -> tuple[float, object]:
            started = time.monotonic()
            result = await point(client, image(seed))
            return time.monotonic() - started, result

        outcomes = await asyncio.gather(*(timed(seed) for seed in range(24)))
    busy = [took for took, r in outcomes if r.is_error and r.content[0].text.startswith("busy: ")]  # type: ignore
    other_errors = [r.content[0].text for _, r in outcomes if r.is_error and not r.content[0].text.startswith("busy")]
    assert busy and not other_errors, other_errors[:3]
    assert max(busy) < 2.0, busy  # refused at once, not queued without bound


async def test_an_image_id_issued_through_one_ingress_replica_is_answered_through_another(app: str, redis_server) -> None:
    deploy(app, min_replicas=1, max_replicas=1, ingress_replicas=2, image_store=redis_server.url(db=5))
    ingress = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#mcp-ingress#")]  # fmt: skip
    assert len(ingress) == 2
    async with http_client(app) as client:
        made = [await point(client, image(500 + seed)) for seed in range(4)]
        ids = [r.structured_content["image_id"] for r in made]
        # Each call is balanced over the two ingress replicas on its own: over 20 follow-ups, both answer some (all
        # on the issuing replica would happen one time in a million), and each finds the image in Redis.
        for n in range(20):
            result = await client.call_tool("answer_about_image", {"image": ids[n % 4], "question": f"what {n}?"})
            assert not result.is_error, result.content[0].text
            assert result.structured_content["image_size"] == {"width": 160, "height": 100}


async def test_deleting_the_application_answers_the_calls_in_flight(app: str) -> None:
    # The replica's engine holds its batch open for 3 s: the calls are surely in flight when the deletion comes.
    deploy(app, min_replicas=1, max_replicas=1, batch_wait_ms=3000, max_batch_size=8)
    async with http_client(app) as client:
        await client.list_tools()  # the client has found the server: the calls below go out at once
        calls = [asyncio.ensure_future(point(client, image(900 + seed))) for seed in range(6)]
        await asyncio.sleep(1.5)
        await asyncio.to_thread(serve.delete, APP)  # Ray Serve drains: running requests finish first
        results = await asyncio.gather(*calls, return_exceptions=True)
    broken = [r for r in results if isinstance(r, BaseException)]
    assert not broken, broken  # every call got an answer, none a dropped connection
    texts = [r.content[0].text for r in results if r.is_error]  # type: ignore[union-attr]
    assert all(text.startswith("shutting_down: ") for text in texts), texts
