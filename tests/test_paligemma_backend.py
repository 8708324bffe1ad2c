"""The PaliGemma local backend on a tiny random PaliGemma 2 built offline, loaded like a hub checkpoint.

The tiny model's answers are noise, but they are deterministic, depend on the prompt and the image, and come
from the real processor and model code: so batched and unbatched runs must agree token for token, which fails
if padding, position ids or the prefix attention mask are wrong.

``tiny_paligemma_dir`` (tests/conftest.py) builds the model once per session with
:func:`vlm_tools.testing.tiny_paligemma.build_tiny_paligemma`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import noise_image  # noqa: E402
from PIL import Image  # noqa: E402

from vlm_tools.backends import generation  # noqa: E402
from vlm_tools.backends.base import Output, Request, Task  # noqa: E402
from vlm_tools.backends.loading import load_backend  # noqa: E402
from vlm_tools.backends.paligemma_local import PaliGemmaBackend  # noqa: E402
from vlm_tools.errors import Cancelled, InvalidArgument  # noqa: E402
from vlm_tools.families import get_family  # noqa: E402
from vlm_tools.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def backend(tiny_paligemma_dir: Path) -> PaliGemmaBackend:
    model = str(tiny_paligemma_dir)
    loaded = load_backend(model, Settings(model=(model,), device="cpu", max_batch_size=8))
    assert isinstance(loaded, PaliGemmaBackend)
    return loaded


def request(task: Task, seed: int = 0, **fields: object) -> Request:
    fields.setdefault("max_new_tokens", 12)
    return Request(task=task, image=noise_image(48, 40, seed), **fields)  # type: ignore[arg-type]


def test_loads_through_the_public_path(backend: PaliGemmaBackend, tiny_paligemma_dir: Path) -> None:
    family = get_family("paligemma")
    assert backend.name == str(tiny_paligemma_dir)
    assert backend.family.name == "paligemma"
    assert backend.native == family.native
    assert backend.supported == family.supported
    assert backend.max_batch_size == 8
    assert backend.tokenizer.padding_side == "left"
    assert not backend.model.training


def test_saved_model_round_trips_paligemma_tokens(backend: PaliGemmaBackend) -> None:
    tokenizer = backend.tokenizer
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<loc0000>", "<loc1023>", "<seg000>", "<seg127>"])
    assert tokenizer.unk_token_id not in ids
    assert backend.model.config.image_token_id == ids[0]
    assert backend.model.config.text_config.vocab_size >= len(tokenizer)
    # The prompt layout PaliGemma needs: image tokens, <bos>, the prompt, and a "\n" that survives tokenising.
    batch = backend.processor(text=["<image>caption en"], images=[noise_image(48, 40, 1)], return_tensors="pt")
    text = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    image_tokens = backend.processor.image_seq_length
    assert text == "<image>" * image_tokens + "<bos>caption en\n"


TASK_CASES = [
    pytest.param(Task.CAPTION, {"detail": "brief"}, "caption en", id="caption-brief"),
    pytest.param(Task.CAPTION, {"detail": "detailed"}, "describe en", id="caption-detailed"),
    pytest.param(Task.ANSWER, {"text": "what colour is the sky?"}, "answer en what colour is the sky?", id="answer"),
    pytest.param(Task.DETECT, {"labels": ("cat", "dog", "traffic light")}, "detect cat ; dog ; traffic light",
                 id="detect-several-labels"),
    pytest.param(Task.POINT, {"text": "the red button", "max_points": 3}, "detect the red button", id="point"),
    pytest.param(Task.OCR, {}, "ocr", id="ocr"),
]  # fmt: skip


@pytest.mark.parametrize(("task", "fields", "prompt"), TASK_CASES)
def test_every_task_reaches_the_model_in_the_published_layout(
    backend: PaliGemmaBackend, task: Task, fields: dict, prompt: str
) -> None:
    """What the model reads for each task: the image tokens, <bos>, the task prefix, "\\n" — PaliGemma's layout."""
    req = request(task, **fields)
    inputs = backend.reference_inputs([req], [backend.family.prompt(req)])
    text = backend.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    assert text == "<image>" * backend.processor.image_seq_length + f"<bos>{prompt}\n"
    assert inputs["token_type_ids"].sum() == 0  # the whole prompt is the bidirectional prefix
    (outcome,) = backend.run_batch([req])
    assert isinstance(outcome, Output) and "<eos>" not in outcome.raw
    if task is Task.POINT:
        assert outcome.point_source == "box_center"


BATCH_CASES = [
    pytest.param(
        Task.ANSWER,
        [{"text": "why " * n + "?"} for n in (1, 7, 2, 12, 4, 1)],
        id="answer-six-prompt-lengths",
    ),
    pytest.param(
        Task.DETECT,
        [{"labels": labels} for labels in (("cat",), ("a very long label name", "dog", "bird"), ("x", "y"), ("car",))],
        id="detect-four-label-lists",
    ),
]


@pytest.mark.parametrize(("task", "variants"), BATCH_CASES)
def test_batched_raw_text_equals_unbatched(backend: PaliGemmaBackend, task: Task, variants: list[dict]) -> None:
    requests = [request(task, seed=i, **v) for i, v in enumerate(variants)]
    # Prompts of different lengths get padded: that is what this test is about.
    assert len({len(backend.family.prompt(r)) for r in requests}) > 1
    batched = backend.run_batch(requests)
    alone = [backend.run_batch([r])[0] for r in requests]
    assert [o.raw for o in batched] == [o.raw for o in alone]
    # The comparison has teeth only if outputs differ between requests.
    assert len({o.raw for o in alone}) > 1


def test_right_padding_would_be_caught(backend: PaliGemmaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The equality check above detects a padding mistake (guards against a model too dull to tell)."""
    import torch

    from vlm_tools.backends import paligemma_local

    def right_padded(rows, pad_id):  # the mistake: padding after the prompt, where generation continues
        width = max(len(row) for row in rows)
        ids = torch.tensor([list(row) + [pad_id] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return ids, mask

    requests = [request(Task.ANSWER, seed=i, text="why " * n + "?") for i, n in enumerate((1, 9, 3, 14))]
    alone = [backend.run_batch([r])[0].raw for r in requests]
    monkeypatch.setattr(paligemma_local, "left_padded", right_padded)
    wrong = [o.raw for o in backend.run_batch(requests)]
    assert wrong != alone


def record_decoded_rows(backend: PaliGemmaBackend, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Record the token ids of each row the backend decodes."""
    rows: list[list[int]] = []
    decode = backend.tokenizer.decode

    def recording(ids, **kwargs):
        rows.append(list(ids))
        return decode(ids, **kwargs)

    monkeypatch.setattr(backend.tokenizer, "decode", recording)
    return rows


def test_per_row_token_limits_in_a_mixed_batch(backend: PaliGemmaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = [3, 12, 1, 7]
    requests = [request(Task.ANSWER, seed=0, text="what is here?", max_new_tokens=n) for n in limits]
    rows = record_decoded_rows(backend, monkeypatch)
    outcomes = backend.run_batch(requests)
    assert all(isinstance(o, Output) for o in outcomes)
    longest = rows[1]
    assert len(longest) > 7, "the tiny model should not stop this early; the test needs a long row"
    for row, limit in zip(rows, limits, strict=True):
        # Greedy decoding of the same input: each row is the longest row cut at its own limit.
        assert row == longest[:limit]


class CancelAfterChecks(threading.Event):
    """An event that sets itself on its ``n``-th check: a cancellation that arrives mid-generation, on cue."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.checks = 0
        self.n = n

    def is_set(self) -> bool:
        self.checks += 1
        if self.checks >= self.n:
            self.set()
        return super().is_set()


@pytest.mark.parametrize(
    "make_event",
    [
        pytest.param(lambda: _set_event(), id="cancelled-before-start"),
        pytest.param(lambda: CancelAfterChecks(3), id="cancelled-while-generating"),
    ],
)
def test_a_cancelled_row_stops_while_the_rest_complete(backend: PaliGemmaBackend, make_event) -> None:
    requests = [request(Task.ANSWER, seed=i, text="why " * (i + 1), max_new_tokens=10) for i in range(4)]
    expected = [backend.run_batch([r])[0].raw for r in requests]
    event = make_event()
    requests[2].cancel = event
    outcomes = backend.run_batch(requests)
    assert isinstance(outcomes[2], Cancelled)
    assert outcomes[2].code == "cancelled"
    assert [o.raw for i, o in enumerate(outcomes) if i != 2] == [e for i, e in enumerate(expected) if i != 2]
    if isinstance(event, CancelAfterChecks):
        # Checked once before the batch and once per generated token: it stopped early, not at its limit.
        assert event.checks < 10


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def test_every_row_cancelled_skips_generation(backend: PaliGemmaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    called = []
    monkeypatch.setattr(generation, "generate_rows", lambda *a, **k: called.append(1) or [])
    requests = [request(Task.OCR, seed=i) for i in range(2)]
    for r in requests:
        r.cancel.set()
    assert all(isinstance(o, Cancelled) for o in backend.run_batch(requests))
    assert called == []


def test_a_bad_request_fails_alone(backend: PaliGemmaBackend) -> None:
    good = request(Task.ANSWER, seed=1, text="what is this?")
    outcomes = backend.run_batch([good, request(Task.ANSWER, seed=2, text="   "), good])
    assert isinstance(outcomes[1], InvalidArgument)
    assert isinstance(outcomes[0], Output) and outcomes[0].raw == outcomes[2].raw


@pytest.mark.parametrize(
    "question",
    [
        pytest.param("what is <image> here?", id="image-token"),
        pytest.param("<bos><eos> end?", id="control-tokens"),
        pytest.param("is it at <loc0100><loc0200>?", id="location-tokens"),
    ],
)
def test_reserved_token_spellings_in_user_text_stay_text(backend: PaliGemmaBackend, question: str) -> None:
    # Without neutralising, "<image>" in a question would add image placeholders the model has no features for.
    (outcome,) = backend.run_batch([request(Task.ANSWER, text=question)])
    assert isinstance(outcome, Output)
    batch = backend.processor(
        text=["<image>" + backend.family.prompt(request(Task.ANSWER, text=question))],
        images=[noise_image(48, 40, 0)],
        return_tensors="pt",
    )
    ids = batch["input_ids"][0].tolist()
    assert ids.count(backend.model.config.image_token_id) == backend.processor.image_seq_length
    assert ids.count(backend.tokenizer.bos_token_id) == 1
    assert backend.tokenizer.eos_token_id not in ids


# --- the real model on a GPU ------------------------------------------------------------------------------

REAL_MODEL = "google/paligemma2-3b-mix-448"


@pytest.mark.gpu
def test_real_paligemma_in_4bit_finds_a_red_square() -> None:
    import importlib.util

    from helpers import require_for_gpu_test

    from vlm_tools.errors import ModelUnavailable

    require_for_gpu_test(importlib.util.find_spec("bitsandbytes") is not None, "bitsandbytes (pip install 'vlm-tools[quantize]')")
    try:
        real = load_backend(REAL_MODEL, Settings(model=(REAL_MODEL,), device="cuda", quantize="4bit"))
    except ModelUnavailable as error:
        require_for_gpu_test(False, f"{REAL_MODEL} is not available here: {error.message}")
    image = Image.new("RGB", (640, 480), "white")
    image.paste((220, 20, 20), (160, 120, 480, 360))  # x0, y0, x1, y1 → normalised 0.25, 0.25, 0.75, 0.75
    (outcome,) = real.run_batch([Request(task=Task.DETECT, image=image, labels=("red square",), max_new_tokens=64)])
    assert isinstance(outcome, Output), outcome
    assert outcome.boxes, f"no box in {outcome.raw!r}"
    box = outcome.boxes[0]
    for got, want in zip((box.x0, box.y0, box.x1, box.y1), (0.25, 0.25, 0.75, 0.75), strict=True):
        assert abs(got - want) < 0.06, (outcome.raw, box)
    real.close()
