"""The engine's contract, checked against the scripted fake backend: batching, admission, time-outs, cancellation,
fault isolation, shutdown and health. Every test is bounded: asyncio.wait_for around waits, a pytest timeout."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest
from fakes import FakeBackend, eventually, expected_raw, make_request

from vlm_tools.backends.base import Output, Task
from vlm_tools.engine import Engine
from vlm_tools.errors import Busy, ModelBroken, ModelError, ShuttingDown, Timeout
from vlm_tools.metrics import Metrics
from vlm_tools.settings import Settings

pytestmark = pytest.mark.timeout(15)

EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    """Build and start engines; at the end release every fake and shut every engine down."""
    built: list[tuple[Engine, list[FakeBackend]]] = []

    async def build(*backends: FakeBackend, **overrides: float) -> Engine:
        options = dict(max_batch_size=8, batch_wait_ms=20.0, queue_size=64, request_timeout_s=5.0)
        options.update(overrides)
        engine = Engine(list(backends), **options)  # type: ignore[arg-type]
        await engine.start()
        built.append((engine, list(backends)))
        return engine

    yield build
    for engine, backends in built:
        for backend in backends:
            backend.release()
        await asyncio.wait_for(engine.shutdown(1.0), 5)


async def settle_all(*awaitables: Awaitable[object], timeout: float = 5.0) -> list[object]:
    """Gather results and exceptions alike; a hang fails the test instead of freezing it."""
    return await asyncio.wait_for(asyncio.gather(*awaitables, return_exceptions=True), timeout)


def raw_of(result: object) -> str:
    assert isinstance(result, Output), f"expected an Output, got {result!r}"
    return result.raw


# --- batching ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "max_batch", "wait_ms"),
    [(20, 8, 100.0), (8, 8, 100.0), (5, 2, 50.0), (1, 8, 50.0)],
    ids=["20-by-8", "exactly-full", "5-by-2", "single"],
)
async def test_concurrent_submits_run_in_full_batches_and_each_caller_gets_its_own_answer(
    make_engine: EngineFactory, count: int, max_batch: int, wait_ms: float
) -> None:
    fake = FakeBackend()
    engine = await make_engine(fake, max_batch_size=max_batch, batch_wait_ms=wait_ms)
    requests = [make_request(f"r{i}") for i in range(count)]
    results = await settle_all(*(engine.submit(fake, r, tool="describe_image") for r in requests))
    assert [raw_of(res) for res in results] == [expected_raw(r) for r in requests]
    assert len(fake.batches) == math.ceil(count / max_batch)
    assert sorted(fake.texts_run) == sorted(r.text for r in requests)  # each ran exactly once


async def test_backend_max_batch_size_caps_the_engine_limit(make_engine: EngineFactory) -> None:
    fake = FakeBackend(max_batch_size=3)
    engine = await make_engine(fake, max_batch_size=8, batch_wait_ms=50.0)
    await settle_all(*(engine.submit(fake, make_request(f"r{i}"), tool="t") for i in range(7)))
    assert fake.batch_sizes == [3, 3, 1]


async def test_tasks_never_share_a_batch_and_the_oldest_request_goes_first(make_engine: EngineFactory) -> None:
    fake = FakeBackend()
    engine = await make_engine(fake, max_batch_size=4, batch_wait_ms=20.0)
    fake.hold()
    blocker = asyncio.create_task(engine.submit(fake, make_request("blocker"), tool="t"))
    await eventually(lambda: len(fake.batches) == 1, what="the blocker to start")
    # One ANSWER request waits behind a stream of CAPTION requests: it must not be starved by them.
    tasks = [Task.CAPTION, Task.ANSWER] + [Task.CAPTION] * 9 + [Task.DETECT]
    requests = [make_request(f"m{i}", task=task) for i, task in enumerate(tasks)]
    pending = [engine.submit(fake, r, tool="t") for r in requests]
    gathered = asyncio.ensure_future(settle_all(*pending))
    await eventually(lambda: engine.queue_depth == len(requests), what="all requests to queue")
    fake.release()
    results = await gathered
    await blocker
    assert [raw_of(res) for res in results] == [expected_raw(r) for r in requests]
    ran = fake.batches[1:]
    assert all(len({text for text in b.texts}) == b.size for b in ran)
    for batch in ran:  # one task per batch, and it is the task of every request in it
        assert {r.task for r in requests if r.text in batch.texts} == {batch.task}
    # FIFO across tasks: caption m0 heads the first batch, then ANSWER (the oldest left), captions, DETECT last.
    assert [b.task for b in ran] == [Task.CAPTION, Task.ANSWER, Task.CAPTION, Task.CAPTION, Task.DETECT]
    assert ran[0].texts[0] == "m0" and ran[1].texts == ("m1",)


async def test_requests_with_different_token_limits_share_a_batch_and_each_stops_at_its_own(
    make_engine: EngineFactory,
) -> None:
    fake = FakeBackend(token_delay_s=0.001)
    engine = await make_engine(fake, batch_wait_ms=100.0, max_batch_size=4)
    limits = [3, 10, 1, 6]
    requests = [make_request(f"n{limit}", max_new_tokens=limit) for limit in limits]
    results = await settle_all(*(engine.submit(fake, r, tool="t") for r in requests))
    assert [raw_of(res) for res in results] == [expected_raw(r) for r in requests]
    assert fake.batch_sizes == [4]
    assert fake.batches[0].max_new_tokens == tuple(limits)
    assert [fake.tokens_of(r.text) for r in requests] == limits


async def test_no_batch_wait_still_answers_everyone_correctly(make_engine: EngineFactory) -> None:
    fake = FakeBackend(token_delay_s=0.001)
    engine = await make_engine(fake, batch_wait_ms=0.0, max_batch_size=4)
    requests = [make_request(f"z{i}", task=(Task.CAPTION, Task.OCR)[i % 2]) for i in range(10)]
    results = await settle_all(*(engine.submit(fake, r, tool="t") for r in requests))
    assert [raw_of(res) for res in results] == [expected_raw(r) for r in requests]
    assert sorted(fake.texts_run) == sorted(r.text for r in requests)
    assert all(1 <= size <= 4 for size in fake.batch_sizes)


async def test_a_lone_request_waits_no_longer_than_the_batch_window(make_engine: EngineFactory) -> None:
    fake = FakeBackend()
    engine = await make_engine(fake, batch_wait_ms=150.0)
    started = time.monotonic()
    await asyncio.wait_for(engine.submit(fake, make_request("alone"), tool="t"), 3)
    assert 0.14 <= time.monotonic() - started < 1.5


async def test_each_model_has_its_own_worker_and_queue(make_engine: EngineFactory) -> None:
    slow, fast = FakeBackend("slow"), FakeBackend("fast")
    engine = await make_engine(slow, fast, batch_wait_ms=0.0, queue_size=2)
    slow.hold()
    blocked = [asyncio.create_task(engine.submit(slow, make_request("s0"), tool="t"))]
    await eventually(lambda: len(slow.batches) == 1, what="the slow model to start")
    blocked += [asyncio.create_task(engine.submit(slow, make_request(f"s{i}"), tool="t")) for i in (1, 2)]
    await eventually(lambda: engine.health()["models"]["slow"]["queued"] == 2, what="slow queue to fill")
    # The slow model is full, yet the fast one still answers: admission is per model.
    result = await asyncio.wait_for(engine.submit(fast, make_request("f0"), tool="t"), 3)
    assert raw_of(result) == expected_raw(make_request("f0"))
    with pytest.raises(Busy):
        await engine.submit(slow, make_request("s-extra"), tool="t")
    slow.release()
    assert all(isinstance(r, Output) for r in await settle_all(*blocked))


async def test_parallel_workers_run_batches_at_the_same_time(make_engine: EngineFactory) -> None:
    fake = FakeBackend(parallelism=3, token_delay_s=0.02, max_batch_size=1)
    engine = await make_engine(fake, batch_wait_ms=0.0)
    results = await settle_all(*(engine.submit(fake, make_request(f"p{i}"), tool="t") for i in range(6)))
    assert all(isinstance(r, Output) for r in results)
    assert fake.max_in_flight >= 2
    assert len({b.thread for b in fake.batches}) >= 2


# --- admission --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [1, 3], ids=["one-over", "three-over"])
async def test_past_the_queue_bound_submit_is_refused_at_once(make_engine: EngineFactory, extra: int) -> None:
    fake = FakeBackend()
    queue_size = 4
    engine = await make_engine(fake, queue_size=queue_size, batch_wait_ms=0.0, max_batch_size=2)
    fake.hold()
    running = asyncio.create_task(engine.submit(fake, make_request("running"), tool="t"))
    await eventually(lambda: len(fake.batches) == 1, what="the first request to run")

    async def ask(index: int) -> tuple[object, None]:
        try:
            return await engine.submit(fake, make_request(f"q{index}"), tool="t"), None
        except Busy as error:
            return error, None

    tasks = [asyncio.create_task(ask(i)) for i in range(queue_size + extra)]
    await eventually(lambda: sum(t.done() for t in tasks) == extra, what="the refusals")
    refused = [t.result() for t in tasks if t.done()]
    assert all(isinstance(error, Busy) for error, _ in refused)
    assert "retry" in str(refused[0][0]) and str(refused[0][0]).startswith("busy:")
    assert engine.queue_depth == queue_size
    # Refused at once: the call raises on its first step, before it ever waits.
    coroutine = engine.submit(fake, make_request("one more"), tool="t")
    with pytest.raises(Busy):
        coroutine.send(None)
    fake.release()
    outcomes = await settle_all(running, *tasks)
    completed = [o for o in outcomes[1:] if isinstance(o[0], Output)]  # type: ignore[index]
    assert len(completed) == queue_size and isinstance(outcomes[0], Output)
    assert engine.health()["ok"] is True and engine.queue_depth == 0


async def test_submit_to_an_unknown_backend_is_a_programming_error(make_engine: EngineFactory) -> None:
    engine = await make_engine(FakeBackend("known"))
    with pytest.raises(ValueError, match="not served"):
        await engine.submit(FakeBackend("stranger"), make_request("x"), tool="t")


# --- time-outs --------------------------------------------------------------------------------------------


async def test_a_request_that_expires_in_the_queue_never_runs(make_engine: EngineFactory) -> None:
    fake = FakeBackend()
    engine = await make_engine(fake, request_timeout_s=0.3, batch_wait_ms=0.0, max_batch_size=1)
    fake.hold()
    first = asyncio.create_task(engine.submit(fake, make_request("first"), tool="t"))
    await eventually(lambda: len(fake.batches) == 1, what="the first request to run")
    started = time.monotonic()
    with pytest.raises(Timeout, match="^timeout:"):
        await asyncio.wait_for(engine.submit(fake, make_request("late"), tool="t"), 3)
    assert 0.2 < time.monotonic() - started < 1.5
    fake.release()
    await settle_all(first)
    await asyncio.sleep(0.05)
    assert "late" not in fake.texts_run
    assert engine.queue_depth == 0


async def test_a_running_request_times_out_and_its_row_stops(make_engine: EngineFactory) -> None:
    fake = FakeBackend(token_delay_s=0.01)
    engine = await make_engine(fake, request_timeout_s=0.3, batch_wait_ms=0.0)
    started = time.monotonic()
    with pytest.raises(Timeout):
        await asyncio.wait_for(engine.submit(fake, make_request("long", max_new_tokens=400), tool="t"), 3)
    assert time.monotonic() - started < 1.5
    await eventually(lambda: engine.health()["models"]["fake/model"]["running"] == 0, what="the row to stop")
    assert 0 < fake.tokens_of("long") < 200  # it stopped early: 400 tokens would take 4 s


# --- cancellation -----------------------------------------------------------------------------------------


async def test_a_cancelled_queued_request_never_reaches_the_backend(make_engine: EngineFactory) -> None:
    fake = FakeBackend()
    engine = await make_engine(fake, batch_wait_ms=0.0, max_batch_size=8)
    fake.hold()
    first = asyncio.create_task(engine.submit(fake, make_request("first"), tool="t"))
    await eventually(lambda: len(fake.batches) == 1, what="the first request to run")
    doomed = asyncio.create_task(engine.submit(fake, make_request("doomed"), tool="t"))
    kept = asyncio.create_task(engine.submit(fake, make_request("kept"), tool="t"))
    await eventually(lambda: engine.queue_depth == 2, what="two queued")
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert engine.queue_depth == 1
    fake.release()
    results = await settle_all(first, kept)
    assert [raw_of(r) for r in results] == [expected_raw(make_request("first")), expected_raw(make_request("kept"))]
    assert "doomed" not in fake.texts_run


async def test_an_anyio_cancel_scope_withdraws_a_queued_request(make_engine: EngineFactory) -> None:
    # The MCP SDK cancels tool calls through anyio cancel scopes: the request must leave the queue the same way.
    fake = FakeBackend()
    engine = await make_engine(fake, batch_wait_ms=0.0)
    fake.hold()
    first = asyncio.create_task(engine.submit(fake, make_request("first"), tool="t"))
    await eventually(lambda: len(fake.batches) == 1, what="the first request to run")
    with anyio.move_on_after(0.05) as scope:
        await engine.submit(fake, make_request("abandoned"), tool="t")
    assert scope.cancelled_caught and engine.queue_depth == 0
    fake.release()
    await settle_all(first)
    assert fake.texts_run == ["first"]


async def test_a_row_cancelled_while_generating_stops_while_the_others_finish(make_engine: EngineFactory) -> None:
    fake = FakeBackend(token_delay_s=0.005)
    engine = await make_engine(fake, batch_wait_ms=100.0, max_batch_size=3)
    limit = 120
    texts = ["keep-a", "cancel-me", "keep-b"]
    tasks = [asyncio.create_task(engine.submit(fake, make_request(t, max_new_tokens=limit), tool="t")) for t in texts]
    await eventually(lambda: fake.tokens_of("cancel-me") >= 10, what="generation to start")
    tasks[1].cancel()
    results = await settle_all(*tasks)
    assert isinstance(results[1], asyncio.CancelledError)
    assert raw_of(results[0]) == expected_raw(make_request("keep-a", max_new_tokens=limit))
    assert fake.batch_sizes == [3]  # they did share one batch
    saved = limit - fake.tokens_of("cancel-me")
    assert saved >= limit // 2, f"the cancelled row generated {fake.tokens_of('cancel-me')} of {limit} tokens"
    assert fake.tokens_of("keep-a") == fake.tokens_of("keep-b") == limit


# --- faults -----------------------------------------------------------------------------------------------


async def test_a_poisoned_request_fails_alone(make_engine: EngineFactory, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeBackend(poison={"r3"})
    engine = await make_engine(fake, batch_wait_ms=100.0, max_batch_size=8)
    requests = [make_request(f"r{i}") for i in range(8)]
    with caplog.at_level(logging.ERROR, logger="vlm_tools.engine"):
        results = await settle_all(*(engine.submit(fake, r, tool="t") for r in requests))
    assert isinstance(results[3], ModelError) and str(results[3]).startswith("model_error:")
    assert [raw_of(res) for i, res in enumerate(results) if i != 3] == [
        expected_raw(r) for i, r in enumerate(requests) if i != 3
    ]
    assert fake.batch_sizes == [8] + [1] * 8  # the batch failed, then each request ran alone
    assert any(rec.levelno == logging.ERROR and rec.exc_info for rec in caplog.records), "traceback not logged"
    assert engine.health()["ok"] is True


async def test_a_failed_row_outcome_fails_only_its_request(make_engine: EngineFactory) -> None:
    fake = FakeBackend(fail_rows={"bad"})
    engine = await make_engine(fake, batch_wait_ms=100.0, max_batch_size=3)
    results = await settle_all(*(engine.submit(fake, make_request(t), tool="t") for t in ("ok1", "bad", "ok2")))
    assert isinstance(results[1], ModelError)
    assert raw_of(results[0]) == expected_raw(make_request("ok1")) and isinstance(results[2], Output)
    assert fake.batch_sizes == [3]  # a row failure needs no retry


@pytest.mark.parametrize(
    ("oom_above", "expected_sizes"),
    [(2, [8, 4, 2, 2, 4, 2, 2]), (4, [8, 4, 4]), (7, [8, 4, 4])],
    ids=["over-2", "over-4", "over-7"],
)
async def test_out_of_memory_splits_the_batch_in_halves(
    make_engine: EngineFactory, oom_above: int, expected_sizes: list[int]
) -> None:
    fake = FakeBackend(oom_above=oom_above)
    engine = await make_engine(fake, batch_wait_ms=100.0, max_batch_size=8)
    requests = [make_request(f"r{i}") for i in range(8)]
    results = await settle_all(*(engine.submit(fake, r, tool="t") for r in requests))
    assert [raw_of(res) for res in results] == [expected_raw(r) for r in requests]
    assert fake.batch_sizes == expected_sizes
    assert fake.free_memory_calls == sum(1 for size in expected_sizes if size > oom_above)


async def test_out_of_memory_on_a_single_request_is_a_model_error(make_engine: EngineFactory) -> None:
    fake = FakeBackend(oom_above=0)
    engine = await make_engine(fake, batch_wait_ms=0.0)
    with pytest.raises(ModelError, match="out of memory"):
        await asyncio.wait_for(engine.submit(fake, make_request("huge"), tool="t"), 3)
    assert engine.health()["ok"] is True


async def test_a_dead_worker_is_noticed_and_nothing_hangs(make_engine: EngineFactory) -> None:
    fake, other = FakeBackend("doomed/model", crash={"boom"}), FakeBackend("other/model")
    engine = await make_engine(fake, other, batch_wait_ms=0.0, max_batch_size=1)
    fake.hold()
    crashing = asyncio.create_task(engine.submit(fake, make_request("boom"), tool="t"))
    await eventually(lambda: len(fake.batches) == 1, what="the crashing request to run")
    queued = [asyncio.create_task(engine.submit(fake, make_request(f"w{i}"), tool="t")) for i in range(3)]
    await eventually(lambda: engine.queue_depth == 3, what="requests to queue")
    fake.release()
    results = await settle_all(crashing, *queued)
    assert all(isinstance(r, ModelError) for r in results), results
    health = engine.health()
    assert health["ok"] is False
    assert health["models"]["doomed/model"]["alive"] is False
    assert "FakeWorkerCrash" in health["models"]["doomed/model"]["last_error"]
    assert health["models"]["other/model"]["alive"] is True
    with pytest.raises(ModelError, match="unavailable"):
        await asyncio.wait_for(engine.submit(fake, make_request("after"), tool="t"), 1)
    assert isinstance(await asyncio.wait_for(engine.submit(other, make_request("o"), tool="t"), 3), Output)
    assert fake.texts_run == ["boom"]


# --- shutdown ---------------------------------------------------------------------------------------------


async def test_shutdown_under_load_answers_every_request(make_engine: EngineFactory) -> None:
    fake = FakeBackend(token_delay_s=0.01)
    engine = await make_engine(fake, batch_wait_ms=5.0, max_batch_size=4)
    requests = [make_request(f"s{i}", max_new_tokens=10) for i in range(40)]  # ~0.1 s per batch
    tasks = [asyncio.create_task(engine.submit(fake, r, tool="t")) for r in requests]
    await eventually(lambda: len(fake.batches) >= 2, what="some batches to run")
    await asyncio.wait_for(engine.shutdown(2.0), 5)
    results = await settle_all(*tasks, timeout=3)
    done = [r for r in results if isinstance(r, Output)]
    refused = [r for r in results if isinstance(r, ShuttingDown)]
    assert len(done) + len(refused) == len(requests), results
    assert done and refused
    assert {raw_of(r) for r in done} == {expected_raw(r) for r in requests if r.text in fake.texts_run}
    coroutine = engine.submit(fake, make_request("after"), tool="t")
    with pytest.raises(ShuttingDown):  # at once: on its first step, before it ever waits
        coroutine.send(None)
    health = engine.health()
    assert health["accepting"] is False and health["ok"] is False


async def test_shutdown_cuts_a_hung_batch_after_the_drain_time(make_engine: EngineFactory) -> None:
    fake = FakeBackend()
    engine = await make_engine(fake, batch_wait_ms=0.0, max_batch_size=2)
    fake.hold()
    tasks = [asyncio.create_task(engine.submit(fake, make_request(f"h{i}"), tool="t")) for i in range(5)]
    await eventually(lambda: len(fake.batches) == 1 and engine.queue_depth == 5 - fake.batch_sizes[0], what="one batch to hang")
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(engine.shutdown(0.2), engine.shutdown(0.2)), 3)  # idempotent
    assert 0.15 < time.monotonic() - started < 2
    results = await settle_all(*tasks, timeout=2)
    assert all(isinstance(r, ShuttingDown) for r in results), results
    assert "did not finish" in str(results[0]) and "not started" in str(results[-1])
    await asyncio.wait_for(engine.shutdown(0.2), 1)  # a third call returns at once


# --- construction -----------------------------------------------------------------------------------------


def test_from_settings_takes_the_engine_section() -> None:
    settings = Settings(max_batch_size=3, batch_wait_ms=7, queue_size=9, request_timeout_s=11, drain_timeout_s=2)
    metrics = Metrics()
    engine = Engine.from_settings([FakeBackend()], settings, metrics)
    assert (engine.max_batch_size, engine.batch_wait_s, engine.queue_size) == (3, 0.007, 9)
    assert (engine.request_timeout_s, engine.drain_timeout_s, engine.metrics) == (11, 2, metrics)
    assert engine.health()["ok"] is False  # not started yet


async def test_submit_needs_a_started_engine_and_none_after_shutdown() -> None:
    fake = FakeBackend()
    engine = Engine([fake], max_batch_size=2, batch_wait_ms=0, queue_size=2, request_timeout_s=1)
    with pytest.raises(RuntimeError, match="start"):
        await engine.submit(fake, make_request("early"), tool="t")
    await asyncio.wait_for(engine.shutdown(0), 1)
    with pytest.raises(ShuttingDown):
        await engine.submit(fake, make_request("late"), tool="t")
    with pytest.raises(RuntimeError, match="restarted"):
        await engine.start()
    assert fake.batches == []


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch_size": 0},
        {"queue_size": 0},
        {"batch_wait_ms": -1},
        {"request_timeout_s": 0},
    ],
    ids=["batch-0", "queue-0", "negative-wait", "zero-timeout"],
)
def test_bad_engine_options_are_refused(options: dict[str, float]) -> None:
    base = dict(max_batch_size=4, batch_wait_ms=1.0, queue_size=4, request_timeout_s=1.0)
    with pytest.raises(ValueError):
        Engine([FakeBackend()], **{**base, **options})  # type: ignore[arg-type]


def test_backend_names_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Engine([FakeBackend("a"), FakeBackend("a")], max_batch_size=1, batch_wait_ms=0, queue_size=1,
               request_timeout_s=1)


# --- a model that fails every request ---------------------------------------------------------------------------


async def test_a_model_failing_every_request_alike_is_said_once_and_marked_not_serving(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeBackend()
    fake.broken = RuntimeError("the chat template does not put the image first")
    engine = await make_engine(fake, batch_wait_ms=100.0, max_batch_size=4)
    with caplog.at_level(logging.WARNING, logger="vlm_tools.engine"):
        results = await settle_all(*(engine.submit(fake, make_request(f"r{i}"), tool="t") for i in range(4)))
    assert all(isinstance(r, ModelError) for r in results), results
    assert not any("retry" in str(r) for r in results)  # the same request would fail again: no false hope
    assert fake.batch_sizes == [4, 1, 1, 1, 1]  # isolated once, to tell it from one bad request
    assert len([r for r in caplog.records if r.exc_info]) == 1  # one traceback, not one per request
    model = engine.health()["models"][fake.name]
    assert engine.health()["ok"] is False and model["serving"] is False
    assert "the chat template does not put the image first" in model["last_error"]

    # The next batch that fails the same way is answered at once: nothing runs twice for nothing.
    results = await settle_all(*(engine.submit(fake, make_request(f"s{i}"), tool="t") for i in range(3)))
    assert fake.batch_sizes[5:] == [3]
    assert all(isinstance(r, ModelBroken) and "not about your request" in str(r) for r in results), results

    fake.broken = None  # fixed (say, a reload): the first batch that succeeds makes it healthy again
    assert raw_of(await engine.submit(fake, make_request("t0"), tool="t")) == expected_raw(make_request("t0"))
    assert engine.health()["ok"] is True and engine.health()["models"][fake.name]["serving"] is True


async def test_a_model_broken_error_fails_the_batch_in_one_run(make_engine: EngineFactory) -> None:
    fake = FakeBackend()
    fake.broken = ModelBroken("model fake/model cannot lay its prompts out")
    engine = await make_engine(fake, batch_wait_ms=100.0, max_batch_size=4)
    results = await settle_all(*(engine.submit(fake, make_request(f"r{i}"), tool="t") for i in range(4)))
    assert all(r is fake.broken for r in results)
    assert fake.batch_sizes == [4]
    assert engine.health()["models"][fake.name]["serving"] is False
