"""Metrics: a registry per server, the exposition text, and what the engine records into it."""

from __future__ import annotations

import asyncio

import pytest
from fakes import FakeBackend, eventually, make_request
from prometheus_client.parser import text_string_to_metric_families

from vlm_tools.backends.base import Task
from vlm_tools.engine import Engine
from vlm_tools.errors import Busy, ModelError
from vlm_tools.metrics import Metrics

pytestmark = pytest.mark.timeout(15)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the rendered text, keyed by (sample name, labels)."""
    body, _ = metrics.render()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_render_gives_prometheus_text_and_its_content_type() -> None:
    metrics = Metrics()
    metrics.record_request("detect", "ok")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain") and "version=" in content_type
    assert b"# TYPE vlm_tools_requests_total counter" in body
    assert value(metrics, "vlm_tools_requests_total", tool="detect", outcome="ok", code="none") == 1


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # a second server in one process must not clash with the first
    first.record_request("describe_image", "error", "invalid_image")
    assert value(first, "vlm_tools_requests_total", tool="describe_image", outcome="error", code="invalid_image") == 1
    assert value(second, "vlm_tools_requests_total", tool="describe_image", outcome="error", code="invalid_image") is None


@pytest.mark.parametrize(
    ("outcome", "code"),
    [("ok", "busy"), ("error", "none"), ("error", ""), ("maybe", "none")],
    ids=["ok-with-code", "error-without-code", "error-empty-code", "unknown-outcome"],
)
def test_contradictory_outcomes_are_refused(outcome: str, code: str) -> None:
    with pytest.raises(ValueError):
        Metrics().record_request("detect", outcome, code)  # type: ignore[arg-type]


def test_an_error_reported_twice_is_counted_once() -> None:
    metrics = Metrics()
    busy, other_busy = Busy("full"), Busy("full")
    metrics.record_error("detect", busy)  # the engine reports it ...
    metrics.record_error("detect", busy)  # ... and the tool boundary sees the same object again
    metrics.record_error("detect", other_busy)  # a second call that was refused too
    metrics.record_error("detect", RuntimeError("no code"))
    assert value(metrics, "vlm_tools_requests_total", tool="detect", outcome="error", code="busy") == 2
    assert value(metrics, "vlm_tools_requests_total", tool="detect", outcome="error", code="internal_error") == 1


def test_batch_sizes_times_and_queue_depth_are_exposed() -> None:
    metrics = Metrics()
    metrics.record_batch("m", "caption", 3)
    metrics.record_batch("m", "caption", 8)
    metrics.observe_queue_wait("describe_image", 0.02)
    metrics.observe_run("describe_image", -1.0)  # a clock hiccup never yields a negative observation
    metrics.set_queue_depth("m", 5)
    assert value(metrics, "vlm_tools_batch_size_count", model="m", task="caption") == 2
    assert value(metrics, "vlm_tools_batch_size_sum", model="m", task="caption") == 11
    assert value(metrics, "vlm_tools_batch_size_bucket", model="m", task="caption", le="4.0") == 1
    assert value(metrics, "vlm_tools_queue_wait_seconds_count", tool="describe_image") == 1
    assert value(metrics, "vlm_tools_run_seconds_sum", tool="describe_image") == 0
    assert value(metrics, "vlm_tools_queue_depth", model="m") == 5


async def test_the_engine_records_outcomes_batches_and_times() -> None:
    metrics = Metrics()
    fake = FakeBackend("m/one", poison={"bad"})
    engine = Engine([fake], max_batch_size=4, batch_wait_ms=50, queue_size=4, request_timeout_s=5, metrics=metrics)
    await engine.start()
    try:
        texts = ["a", "b", "bad", "c"]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(engine.submit(fake, make_request(t), tool="describe_image") for t in texts), return_exceptions=True
            ),
            5,
        )
        assert isinstance(results[2], ModelError)
        # A full queue: one running, four waiting, the next refused.
        fake.hold()
        running = asyncio.create_task(engine.submit(fake, make_request("r", task=Task.DETECT), tool="detect"))
        await eventually(lambda: len(fake.batches) == 6, what="the detect request to run")
        waiting = [asyncio.create_task(engine.submit(fake, make_request(f"w{i}", task=Task.DETECT), tool="detect"))
                   for i in range(4)]
        await eventually(lambda: engine.queue_depth == 4, what="four to wait")
        assert value(metrics, "vlm_tools_queue_depth", model="m/one") == 4
        with pytest.raises(Busy):
            await engine.submit(fake, make_request("x", task=Task.DETECT), tool="detect")
        fake.release()
        await asyncio.wait_for(asyncio.gather(running, *waiting), 5)
    finally:
        fake.release()
        await asyncio.wait_for(engine.shutdown(1), 5)

    requests = "vlm_tools_requests_total"
    assert value(metrics, requests, tool="describe_image", outcome="ok", code="none") == 3
    assert value(metrics, requests, tool="describe_image", outcome="error", code="model_error") == 1
    assert value(metrics, requests, tool="detect", outcome="ok", code="none") == 5
    assert value(metrics, requests, tool="detect", outcome="error", code="busy") == 1
    # The poisoned batch of 4, its four single retries, then the detect batches of 1 and 4.
    assert value(metrics, "vlm_tools_batch_size_count", model="m/one", task="caption") == 5
    assert value(metrics, "vlm_tools_batch_size_sum", model="m/one", task="caption") == 8
    assert value(metrics, "vlm_tools_batch_size_count", model="m/one", task="detect") == 2
    assert value(metrics, "vlm_tools_queue_wait_seconds_count", tool="describe_image") == 4
    assert value(metrics, "vlm_tools_run_seconds_count", tool="detect") == 5
    assert value(metrics, "vlm_tools_queue_depth", model="m/one") == 0
