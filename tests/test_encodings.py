"""Reusing each image's encoding: what a model made of an image it has seen is kept, by image id, and used again.

The reused path must give exactly what the processor's own path gives (inputs and tokens, batched and alone); a
follow-up call on an image skips the processor and the vision encoder; an image encoded ahead of its batch is not
encoded again; encodings are bounded in bytes and leave with their image.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from helpers import noise_image  # noqa: E402
from PIL import Image  # noqa: E402

from vlm_tools.backends import generation  # noqa: E402
from vlm_tools.backends.base import Output, Request, Task  # noqa: E402
from vlm_tools.backends.encodings import EncodingCache  # noqa: E402
from vlm_tools.images import MemoryImageStore  # noqa: E402
from vlm_tools.settings import Settings  # noqa: E402

SIZES = [(64, 64), (300, 100), (30, 120), (17, 9), (640, 480)]


@pytest.fixture(params=["paligemma", "molmo2"])
def backend(request: pytest.FixtureRequest, tiny_paligemma_dir: Path, tiny_molmo2_dir: Path):
    from vlm_tools.backends.loading import load_backend

    directory = str(tiny_paligemma_dir if request.param == "paligemma" else tiny_molmo2_dir)
    loaded = load_backend(directory, Settings(model=(directory,), device="cpu"))
    yield loaded
    loaded.close()


def requests(count: int = 5, with_ids: bool = True) -> list[Request]:
    """The same five (image, question) pairs each time; with ids, the images are known to the backend by name."""
    questions = ["what?", "why is it so very red?", "x", "how many?", "where is the cat, if there is one?"]
    return [
        Request(
            Task.ANSWER,
            noise_image(*SIZES[i], i),
            text=questions[i],
            max_new_tokens=8,
            image_id=f"img_{i}" if with_ids else None,
        )
        for i in range(count)
    ]


def count_encodings(backend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many images each call to the backend's image encoder got."""
    calls: list[int] = []
    original = backend.encode_images

    def counting(images):
        calls.append(len(images))
        return original(images)

    monkeypatch.setattr(backend, "encode_images", counting)
    return calls


def test_reused_inputs_are_the_processors_token_for_token(backend) -> None:
    batch = requests()
    prompts = [backend.family.prompt(r) for r in batch]
    reference = backend.reference_inputs(batch, prompts)
    reused = backend.encoded_inputs(batch, prompts) if backend.family.name == "molmo2" else backend.serving_inputs(batch, prompts)
    types = "mm_token_type_ids" if backend.family.name == "molmo2" else "token_type_ids"
    for key in ("input_ids", "attention_mask", types):
        assert torch.equal(reference[key], reused[key]), key
    kwargs = {"eos_token_ids": backend.eos_token_ids, "pad_token_id": backend.pad_token_id}
    via_processor = generation.generate_rows(backend.model, reference, batch, **kwargs)
    via_reuse = generation.generate_rows(backend.model, reused, batch, **kwargs)
    assert via_processor == via_reuse
    assert len({tuple(row) for row in via_reuse}) > 1  # outputs differ by image: the equality means something


def test_a_follow_up_on_an_image_runs_no_encoder_and_answers_the_same(backend, monkeypatch) -> None:
    calls = count_encodings(backend, monkeypatch)
    first = backend.run_batch(requests())
    again = backend.run_batch(requests())  # the same images, by the same ids
    assert calls == [5]
    assert [o.raw for o in again] == [o.raw for o in first] and all(isinstance(o, Output) for o in first)
    mixed = requests()[:2] + [Request(Task.CAPTION, noise_image(50, 40, 99), max_new_tokens=6, image_id="img_new")]
    backend.run_batch(mixed)
    assert calls == [5, 1]  # only the new image was encoded
    alone = [backend.run_batch([r])[0].raw for r in requests()]
    assert alone == [o.raw for o in first]  # batched or alone, reused or not: the same answers


def test_an_image_encoded_ahead_of_its_batch_is_not_encoded_again(backend, monkeypatch) -> None:
    calls = count_encodings(backend, monkeypatch)
    batch = requests(3)
    for request in batch:
        backend.prefetch(request)
    assert all(r.ahead is not None for r in batch)
    for request in batch:
        request.ahead.result(timeout=60)
    outcomes = backend.run_batch(batch)
    assert calls == [1, 1, 1]  # each on the prefetch thread, none in the batch
    expected = [backend.run_batch([r])[0].raw for r in requests(3, with_ids=False)]  # no ids: encoded afresh
    assert [o.raw for o in outcomes] == expected


def test_prefetching_while_a_batch_generates_changes_no_answer(backend) -> None:
    """Images of the next batch are encoded on the prefetch thread while the current batch generates."""
    first, second = requests(3), requests(5)[3:]
    expected = [backend.run_batch([r])[0].raw for r in requests(5, with_ids=False)]
    for request in second:
        request.image_id = request.image_id + "-next"
    results: list[list[str]] = []
    runner = threading.Thread(target=lambda: results.append([o.raw for o in backend.run_batch(first)]))
    runner.start()
    for request in second:
        backend.prefetch(request)
    runner.join(timeout=120)
    results.append([o.raw for o in backend.run_batch(second)])
    assert results[0] + results[1] == expected


async def test_encodings_are_bounded_and_leave_with_their_image() -> None:
    class Sized:
        def __init__(self, nbytes: int) -> None:
            self.nbytes = nbytes

    cache = EncodingCache(max_bytes=100)
    for name in "abc":
        cache.put(name, Sized(40), 40)
    assert cache.get("a") is None and cache.get("b") is not None and cache.nbytes == 80  # a was least recent
    cache.put("huge", Sized(101), 101)
    assert cache.get("huge") is None  # bigger than the cache: never kept
    cache.put(None, Sized(1), 1)
    assert len(cache) == 2
    store = MemoryImageStore(max_count=1, max_bytes=10**9)
    store.on_evict(cache.forget)
    first = await store.put(Image.new("RGB", (4, 4)), "s")
    cache.put(first, Sized(10), 10)
    await store.put(Image.new("RGB", (4, 4)), "s")  # the store evicts the first image, and its encoding goes too
    assert cache.get(first) is None


async def test_a_follow_up_through_the_tools_reuses_the_encoding(tmp_path: Path, tiny_paligemma_dir: Path) -> None:
    from helpers import data_uri, png_bytes
    from mcp import Client

    from vlm_tools.server import build_server

    settings = Settings(model=(str(tiny_paligemma_dir),), device="cpu", allow_path=(tmp_path,), max_new_tokens=8,
                        image_store_count=2)  # fmt: skip
    server = build_server(settings)
    async with Client(server) as client:
        made = await client.call_tool("describe_image", {"image": data_uri(png_bytes(80, 60, (200, 30, 30)))})
        backend = server.runtime.backends[0].loaded  # the weights loaded in the background for the first call
        image_id = made.structured_content["image_id"]
        hits = backend.encodings.hits
        follow = await client.call_tool("answer_about_image", {"image": image_id, "question": "what colour?"})
        assert not follow.is_error and backend.encodings.hits == hits + 1
        for colour in ((1, 2, 3), (4, 5, 6)):  # two more images push the first out of a 2-image store
            await client.call_tool("describe_image", {"image": data_uri(png_bytes(80, 60, colour))})
        assert backend.encodings.get(image_id) is None
