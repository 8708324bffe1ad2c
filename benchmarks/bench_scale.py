"""Benchmark: a spike of agents against Ray Serve replicas of the in-process engine.

Web-automation fleets send bursts: agents take a screenshot, ask where to click, ask follow-ups about the same
screenshot, then go quiet. This runs that shape — idle, then ``--callers`` agents for ``--spike-s`` seconds, then
idle — against two deployments of the trained Molmo2 fixture on a local Ray cluster:

* ``fixed`` — one model replica;
* ``autoscale`` — ``--min-replicas`` to ``--max-replicas`` replicas, Ray Serve adding them under load.

Each agent loops: ``point_to_object`` on a new screenshot (a data URI), then ``--follow-ups`` ``answer_about_image``
calls naming its ``image_id``. Reported per deployment: calls answered per second during the spike, p50/p95 latency
of first calls and of follow-ups, the replica count over time (from ``/health`` every second), the time from the
spike's start to the first extra replica, and the follow-up affinity hit rate (the share of follow-ups that reached
the replica already holding their image, from ``/metrics``). Also the ingress's added latency: one caller's median
``point_to_object`` through Ray Serve minus the same through the one-process HTTP server (``vlm-tools serve
--transport http``). Run from the repository root::

    .venv/bin/python benchmarks/bench_scale.py --out bench_scale.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import data_uri, noise_image, png_of  # noqa: E402
from server_process import TOKEN, ServerProcess, free_port, http_client, server_env  # noqa: E402

MODEL = str(REPO / "tests" / "fixtures" / "models" / "molmo2-ui")
APP = "vlm-tools"


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def agent(base: str, index: int, stop: asyncio.Event, follow_ups: int, calls: list[dict[str, Any]]) -> None:
    """One agent: a screenshot, where to click, follow-ups on it; again, until the spike ends."""
    async with http_client(base) as client:
        shot = 0
        while not stop.is_set():
            shot += 1
            picture = data_uri(png_of(noise_image(320, 200, index * 10_000 + shot)))
            started = time.monotonic()
            result = await client.call_tool("point_to_object", {"image": picture, "description": "red button"})
            calls.append({"kind": "first", "at": started, "s": time.monotonic() - started, "error": result.is_error})
            if result.is_error:
                continue
            image_id = result.structured_content["image_id"]
            for n in range(follow_ups):
                started = time.monotonic()
                result = await client.call_tool("answer_about_image", {"image": image_id, "question": f"what {n}?"})
                calls.append({"kind": "follow-up", "at": started, "s": time.monotonic() - started,
                              "error": result.is_error})  # fmt: skip


def replica_count(base: str) -> int | None:
    import httpx

    try:
        return int(httpx.get(f"{base}/health", timeout=5).json()["replicas"][MODEL])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def affinity(base: str) -> dict[str, float]:
    import re

    import httpx

    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    found = dict(re.findall(r'vlm_tools_image_affinity_total\{held="(yes|no)",model="[^"]*"\} ([0-9.e+]+)', text))
    return {held: float(found.get(held, 0)) for held in ("yes", "no")}


async def spike(base: str, args: argparse.Namespace) -> dict[str, Any]:
    """Idle, the spike, idle again; every number of one deployment."""
    timeline: list[tuple[float, int | None]] = []
    calls: list[dict[str, Any]] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            timeline.append((time.monotonic(), await asyncio.to_thread(replica_count, base)))
            await asyncio.sleep(1.0)

    sampler = asyncio.ensure_future(sample())
    await asyncio.sleep(args.idle_s)
    before = affinity(base)
    start, stop = time.monotonic(), asyncio.Event()
    agents = [asyncio.ensure_future(agent(base, i, stop, args.follow_ups, calls)) for i in range(args.callers)]
    await asyncio.sleep(args.spike_s)
    stop.set()
    await asyncio.gather(*agents)
    end = time.monotonic()
    after = affinity(base)
    await asyncio.sleep(args.cool_s)
    stop_sampling.set()
    await sampler
    first_extra = next((t - start for t, n in timeline if t >= start and n is not None and n > timeline[0][1]), None)
    ok = [c for c in calls if not c["error"]]
    hits, total = after["yes"] - before["yes"], (after["yes"] - before["yes"]) + (after["no"] - before["no"])
    follow_ups = [c for c in ok if c["kind"] == "follow-up"]
    return {
        "calls": len(calls), "errors": len(calls) - len(ok), "calls_per_s": len(ok) / (end - start),
        "first_p50_s": percentile([c["s"] for c in ok if c["kind"] == "first"], 0.5),
        "first_p95_s": percentile([c["s"] for c in ok if c["kind"] == "first"], 0.95),
        "follow_up_p50_s": percentile([c["s"] for c in follow_ups], 0.5),
        "follow_up_p95_s": percentile([c["s"] for c in follow_ups], 0.95),
        "all_p50_s": percentile([c["s"] for c in ok], 0.5), "all_p95_s": percentile([c["s"] for c in ok], 0.95),
        "time_to_first_extra_replica_s": first_extra,
        "replicas_over_time": [(round(t - start, 1), n) for t, n in timeline],
        "max_replicas_seen": max((n or 0) for _, n in timeline),
        # Every call names an image id (the ingress issues it before the model runs), but only a follow-up can find
        # its image already held: the hit rate is held follow-ups over follow-ups answered.
        "requests_on_an_image_id": total, "held": hits,
        "affinity_hit_rate": (hits / len(follow_ups)) if follow_ups else None,
    }  # fmt: skip


async def one_caller_median(base: str, calls: int) -> float:
    async with http_client(base) as client:
        picture = data_uri(png_of(noise_image(320, 200, 7)))
        await client.call_tool("point_to_object", {"image": picture, "description": "red button"})  # warm
        times = []
        for _ in range(calls):
            started = time.monotonic()
            await client.call_tool("point_to_object", {"image": picture, "description": "red button"})
            times.append(time.monotonic() - started)
    return statistics.median(times)


def deploy(port: int, **overrides: Any) -> None:
    from ray import serve

    from vlm_tools.scale.app import build_app
    from vlm_tools.settings import Settings

    values: dict[str, Any] = {"transport": "http", "scale": "ray", "port": port, "auth_token": TOKEN,
                              "model": (MODEL,), "device": "cpu", "replica_cpus": 0.5, "log_level": "warning"}  # fmt: skip
    values.update(overrides)
    serve.run(build_app(Settings(**values)), name=APP, route_prefix="/")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    report: dict[str, Any] = {"cpus": os.cpu_count(), "args": vars(args)}
    with ServerProcess(["--model", MODEL], server_env(), REPO, Path(args.log_dir) / "one-process.log") as single:
        single.wait_healthy()
        report["one_process_median_s"] = asyncio.run(one_caller_median(single.base, args.latency_calls))
    port = free_port()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        deploy(port, min_replicas=1, max_replicas=1)
        report["ray_median_s"] = asyncio.run(one_caller_median(base, args.latency_calls))
        report["ingress_added_s"] = report["ray_median_s"] - report["one_process_median_s"]
        report["fixed"] = asyncio.run(spike(base, args))
        serve.delete(APP)
        deploy(port, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
               target_ongoing_requests=args.target, upscale_delay_s=args.upscale_delay_s,
               downscale_delay_s=args.downscale_delay_s)  # fmt: skip
        report["autoscale"] = asyncio.run(spike(base, args))
        serve.delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()
    return report


def table(report: dict[str, Any]) -> str:
    rows = ["| deployment | calls/s | p50 s | p95 s | first p95 s | follow-up p95 s | first extra replica | "
            "most replicas | affinity hit rate | errors |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip

    def f(value: Any, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    for name in ("fixed", "autoscale"):
        r = report[name]
        extra = f"{r['time_to_first_extra_replica_s']:.1f} s" if r["time_to_first_extra_replica_s"] else "—"
        rows.append(f"| {name} | {f(r['calls_per_s'], 1)} | {f(r['all_p50_s'])} | {f(r['all_p95_s'])} | "
                    f"{f(r['first_p95_s'])} | {f(r['follow_up_p95_s'])} | {extra} | {r['max_replicas_seen']} | "
                    f"{f(r['affinity_hit_rate'])} | {r['errors']} |")  # fmt: skip
    rows.append("")
    rows.append(f"ingress added latency (one caller, median): {report['ingress_added_s'] * 1000:.0f} ms "
                f"({report['ray_median_s'] * 1000:.0f} ms through Ray Serve, "
                f"{report['one_process_median_s'] * 1000:.0f} ms one process)")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--spike-s", type=float, default=30.0)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--cool-s", type=float, default=20.0, help="idle after the spike, replicas still sampled")
    parser.add_argument("--follow-ups", type=int, default=2)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--target", type=float, default=4.0, help="target requests in flight per replica")
    parser.add_argument("--upscale-delay-s", type=float, default=2.0)
    parser.add_argument("--downscale-delay-s", type=float, default=5.0)
    parser.add_argument("--latency-calls", type=int, default=30)
    parser.add_argument("--ray-cpus", type=int, default=6, help="logical CPUs of the local cluster")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--out")
    args = parser.parse_args()
    report = run(args)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
