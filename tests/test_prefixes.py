"""Molmo2 reads a prompt on from its image's kept prefix: BOS and the image tokens are read once per image.

What a user would check: the answers are the processor path's, token for token, batched or alone, with prefixes
kept or read now; a follow-up question makes the language model read only its own turn; the kept prefix is
counted in the encoding's bytes and leaves with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from helpers import noise_image  # noqa: E402

from vlm_tools.backends import generation  # noqa: E402
from vlm_tools.backends.base import Output, Request, Task  # noqa: E402
from vlm_tools.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAINED = REPO / "tests" / "fixtures" / "models" / "molmo2-ui"
SIZES = [(64, 64), (300, 100), (30, 120), (17, 9), (640, 480)]
QUESTIONS = ["what?", "why is it so very red?", "x", "how many?", "where is the cat, if there is one?"]


def requests(ids: bool = True, task: Task = Task.ANSWER) -> list[Request]:
    return [
        Request(
            task, noise_image(*SIZES[i], i), text=QUESTIONS[i], max_new_tokens=10, image_id=f"img_{i}" if ids else None
        )
        for i in range(len(SIZES))
    ]


@pytest.fixture(params=["random", "trained"])
def backend(request: pytest.FixtureRequest, tiny_molmo2_dir: Path):
    from vlm_tools.backends.loading import load_backend

    directory = str(tiny_molmo2_dir if request.param == "random" else TRAINED)
    loaded = load_backend(directory, Settings(model=(directory,), device="cpu"))
    yield loaded
    loaded.close()


def language_model_reads(backend) -> list[int]:
    """Record how many tokens each pass of the language model reads."""
    reads: list[int] = []

    def record(_module, _args, kwargs):
        reads.append(int(kwargs["inputs_embeds"].shape[1]))

    backend.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    return reads


def via_processor(backend, batch: list[Request]) -> list[list[int]]:
    prompts = [backend.family.prompt(r) for r in batch]
    inputs = backend.reference_inputs(batch, prompts)
    return generation.generate_rows(
        backend.model, inputs, batch, eos_token_ids=backend.eos_token_ids, pad_token_id=backend.pad_token_id
    )


def via_prefixes(backend, batch: list[Request]) -> list[list[int]]:
    prompts = [backend.family.prompt(r) for r in batch]
    inputs = backend.serving_inputs(batch, prompts)
    return generation.generate_rows(
        backend.model, inputs, batch, eos_token_ids=backend.eos_token_ids, pad_token_id=backend.pad_token_id
    )


def test_read_on_from_prefixes_the_tokens_are_the_processors(backend) -> None:
    reference = via_processor(backend, requests())
    assert len({tuple(row) for row in reference}) > 1  # answers differ by image: the equality below means something
    assert via_prefixes(backend, requests()) == reference  # prefixes read now, batched
    assert via_prefixes(backend, requests()) == reference  # all kept
    alone = [via_prefixes(backend, [r])[0] for r in requests()]
    assert alone == reference
    mixed = requests()[:2] + requests(ids=False)[2:]  # kept and new prefixes in one batch
    assert via_prefixes(backend, mixed) == reference


def test_a_follow_up_question_reads_only_its_turn(backend) -> None:
    first = requests()
    prompts = [backend.family.prompt(r) for r in first]
    turns = [len(backend.layout.turn_ids(p)) for p in prompts]
    reads = language_model_reads(backend)
    outcomes = backend.run_batch(first)
    prefix_lengths = [len(backend.encodings.get(r.image_id).prefix.token_ids) for r in first]
    assert reads[:2] == [max(prefix_lengths), max(turns)]  # the prefixes once, then only the turns
    reads.clear()
    again = backend.run_batch(requests())
    assert reads[0] == max(turns) and all(n == 1 for n in reads[1:])  # no image token is read again
    assert [o.raw for o in again] == [o.raw for o in outcomes] and all(isinstance(o, Output) for o in again)


def test_one_image_asked_many_things_at_once_is_read_once(backend) -> None:
    image = noise_image(200, 120, 7)
    batch = [Request(Task.ANSWER, image, text=q, max_new_tokens=6, image_id="shot") for q in QUESTIONS]
    reads = language_model_reads(backend)
    prefixed = via_prefixes(backend, batch)
    kept = backend.encodings.get("shot").prefix
    assert reads[0] == len(kept.token_ids)  # one row: the shared prefix, read once for five questions
    assert prefixed == via_processor(backend, batch)


def test_the_kept_prefix_counts_in_the_encodings_bytes_and_leaves_with_the_image(backend) -> None:
    batch = requests()[:1]
    backend.image_encodings(batch)
    without = backend.encodings.nbytes
    backend.run_batch(batch)
    kept = backend.encodings.get("img_0")
    assert kept.prefix is not None and backend.encodings.nbytes == without + kept.prefix.nbytes
    layers = backend.model.config.get_text_config().num_hidden_layers
    assert len(kept.prefix.layers) == layers and kept.prefix.layers[0][0].shape[1] == len(kept.prefix.token_ids)
    backend.forget_image("img_0")
    assert backend.encodings.nbytes == 0


def test_rows_of_different_lengths_sit_where_one_pass_puts_them() -> None:
    from vlm_tools.backends.generation import left_padded
    from vlm_tools.backends.prefixes import Prefix, continue_from_prefixes

    def prefix(length: int, value: float) -> Prefix:
        return Prefix(
            tuple(range(100, 100 + length)), ((torch.full((2, length, 4), value), torch.zeros(2, length, 4)),)
        )

    prefixes, turns = [prefix(3, 1.0), prefix(5, 2.0)], [[7, 8, 9, 10], [11]]
    inputs = continue_from_prefixes(prefixes, turns, pad_token_id=0, config=None)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1)[mask.bool()].split(mask.sum(-1).tolist())
    for row, (p, turn) in enumerate(zip(prefixes, turns, strict=True)):
        ids, one_pass_mask = left_padded([[*p.token_ids, *turn]], 0)
        assert inputs["input_ids"][row][mask[row].bool()].tolist() == ids[0].tolist()
        assert positions[row].tolist() == list(range(len(p.token_ids) + len(turn)))  # as in one pass from 0
    keys = inputs["cache"].layers[0].keys
    assert keys.shape == (2, 2, 5, 4)
    assert keys[0, :, :2].abs().sum() == 0 and torch.all(keys[0, :, 2:] == 1.0) and torch.all(keys[1] == 2.0)


def test_a_prefetch_that_finishes_late_does_not_drop_the_kept_prefix(backend) -> None:
    backend.run_batch(requests()[:1])
    assert backend.encodings.get("img_0").prefix is not None
    backend.prefetch(requests()[0])  # known already: nothing to do
    backend._encode_one(requests()[0])  # as a prefetch admitted before the batch kept the prefix would end
    assert backend.encodings.get("img_0").prefix is not None
