"""Any Molmo2 checkpoint's chat template: the serving layout is probed at load and gives the processor's tokens.

Checkpoints that differ from Molmo2-4B's files only in their chat template — the image inside the user turn, BOS
emitted by the template (as the pending hub changes propose), a fixed preamble, the prompt before the image — must
serve every tool. Each variant is held against the processor path token for token, and every tool is called
through an MCP client on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import noise_image, settings_for
from mcp import Client

from vlm_tools.backends import generation
from vlm_tools.backends.base import Request, Task
from vlm_tools.backends.loading import load_backend
from vlm_tools.settings import Settings

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

HOISTED = "{% if image_count.value == 1 %}{{ '<|image|>' }}"
USER_TURN = "{{ '<|im_start|>user\\n' }}{{ text_content }}"
FIRST_IMAGE = "{% if image_count.value == 1 and loop.first %}{{ '<|image|>' }}{% endif %}"


def _inline(template: str) -> str:
    """The image inside the first user turn, after its header, instead of before everything."""
    assert HOISTED in template and USER_TURN in template
    template = template.replace(HOISTED, "{% if image_count.value == 1 %}{{ '' }}")
    return template.replace(USER_TURN, "{{ '<|im_start|>user\\n' }}" + FIRST_IMAGE + "{{ text_content }}")


def _prompt_first(template: str) -> str:
    """The prompt before the image: the tokens before the image differ from prompt to prompt."""
    template = template.replace(HOISTED, "{% if image_count.value == 1 %}{{ '' }}")
    return template.replace(USER_TURN, USER_TURN + FIRST_IMAGE)


VARIANTS = {
    # name: (how the published template is changed, the layout the probe must choose)
    "published": (lambda t: t, "prefix"),
    "bos-first": (lambda t: "{{ bos_token }}" + t, "prefix"),
    "image-in-turn": (_inline, "prefix"),
    "bos-and-image-in-turn": (lambda t: "{{ bos_token }}" + _inline(t), "prefix"),
    "preamble": (lambda t: "{{ 'You are a careful assistant.\\n' }}" + t, "prefix"),
    "prompt-first": (_prompt_first, "reuse"),
    # a template that rewrites the prompt: rendered per request instead of once
    "upper-cased-prompt": (lambda t: t.replace(USER_TURN, "{{ '<|im_start|>user\\n' }}{{ text_content | upper }}"),
                           "prefix"),
}


@pytest.fixture(scope="session", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, tiny_molmo2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(name, directory, expected mode): the tiny Molmo2 with its chat template changed as the variant says."""
    name = request.param
    change, mode = VARIANTS[name]
    directory = tmp_path_factory.mktemp("molmo2-template") / name
    shutil.copytree(tiny_molmo2_dir, directory)
    template = directory / "chat_template.jinja"
    template.write_text(change(template.read_text()))
    return name, directory, mode


@pytest.fixture(scope="session")
def backend(variant):
    _, directory, _ = variant
    loaded = load_backend(str(directory), Settings(model=(str(directory),), device="cpu"), local_files_only=True)
    yield loaded
    loaded.close()


def batch() -> list[Request]:
    sizes = [(64, 64), (300, 100), (30, 120)]
    questions = ["what?", "why is it so very red?", "where is the cat, if there is one?"]
    return [
        Request(Task.ANSWER, noise_image(*size, i), text=question, max_new_tokens=8, image_id=f"img_{i}")
        for i, (size, question) in enumerate(zip(sizes, questions, strict=True))
    ]


def test_the_probe_chooses_the_layout(backend, variant) -> None:
    name, _, mode = variant
    assert backend.layout.mode == mode, backend.layout.describe()
    if name.startswith("bos"):
        assert backend.layout.lead_ids == ()  # the template writes BOS itself: nothing more goes in front
    else:
        assert backend.layout.lead_ids == (backend.tokenizer.convert_tokens_to_ids("<|im_end|>"),)  # BOS


def test_the_laid_out_tokens_are_the_processors(backend) -> None:
    requests = batch()
    prompts = [backend.family.prompt(r) for r in requests]
    reference = backend.reference_inputs(requests, prompts)
    encoded = backend.encoded_inputs(requests, prompts)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(reference[key], encoded[key]), key


def test_serving_generates_what_the_processor_path_generates(backend) -> None:
    kwargs = {"eos_token_ids": backend.eos_token_ids, "pad_token_id": backend.pad_token_id}
    requests = batch()
    prompts = [backend.family.prompt(r) for r in requests]
    reference = generation.generate_rows(backend.model, backend.reference_inputs(requests, prompts), requests, **kwargs)
    assert len({tuple(row) for row in reference}) > 1  # rows differ: the equality below means something
    for _ in range(2):  # encodings (and prefixes) made now, then kept
        served = generation.generate_rows(backend.model, backend.serving_inputs(requests, prompts), requests, **kwargs)
        assert served == reference


async def test_every_tool_answers_through_mcp(variant, tmp_path: Path) -> None:
    from vlm_tools.server import build_server

    from helpers import data_uri, pdf_of, png_of

    _, directory, _ = variant
    settings = settings_for(tmp_path, model=(str(directory),), device="cpu", max_new_tokens=6)
    image = data_uri(png_of(noise_image(120, 80, 3)))
    (tmp_path / "doc.pdf").write_bytes(pdf_of([noise_image(60, 80, 4), noise_image(80, 60, 5)]))
    calls = [
        ("describe_image", {"image": image}),
        ("answer_about_image", {"image": image, "question": "What colour is it?"}),
        ("point_to_object", {"image": image, "description": "the red button"}),
        ("read_document", {"document": str(tmp_path / "doc.pdf")}),
    ]
    async with Client(build_server(settings)) as client:
        for tool, arguments in calls:
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, (tool, result.content)
            assert result.structured_content["model"] == str(directory) or tool == "read_document"
        # detect needs boxes: a Molmo2 alone says which family can, rather than failing
        result = await client.call_tool("detect", {"image": image, "labels": ["button"]})
        assert result.is_error and result.content[0].text.startswith("unsupported_by_model:")


def test_the_fixed_text_is_rendered_once_where_the_template_passes_the_prompt_through(
    backend, variant, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlm_tools.backends.molmo2_layout import conversation

    name, _, _ = variant
    prompts = ["Point to the blue {circle}, not the <b>red</b> one.", "x", "What does it say?"]
    expected = [
        backend.processor.apply_chat_template([conversation(None, p)], tokenize=False, add_generation_prompt=True)[0]
        for p in prompts
    ]
    renders = []
    real = backend.processor.apply_chat_template
    monkeypatch.setattr(backend.processor, "apply_chat_template", lambda *a, **k: renders.append(1) or real(*a, **k))
    assert [backend.layout.render(p) for p in prompts] == expected  # what the template says, either way
    assert len(renders) == (len(prompts) if name == "upper-cased-prompt" else 0)


class _ExtraToken:
    """A processor whose tokens differ from its template's text (one token more at the end): the fast layouts
    cannot reproduce it, so the processor must lay every prompt out."""

    def __init__(self, processor) -> None:
        self._processor = processor

    def __getattr__(self, name: str):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        out = self._processor(*args, **kwargs)
        out["input_ids"] = torch.cat([out["input_ids"], out["input_ids"][:, -1:]], dim=1)
        return out


def test_a_processor_the_fast_layouts_cannot_match_is_served_by_the_processor(tiny_molmo2_dir: Path) -> None:
    from transformers import AutoProcessor

    from vlm_tools.backends.molmo2_layout import plan_layout

    processor = AutoProcessor.from_pretrained(str(tiny_molmo2_dir), local_files_only=True)
    assert plan_layout(processor).mode == "prefix"
    layout = plan_layout(_ExtraToken(processor))
    assert layout.mode == "processor" and "does not tokenize as the processor" in layout.reason


def test_a_prefix_that_fails_on_the_probe_falls_back_to_encoding_reuse(
    tiny_molmo2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlm_tools.backends.molmo2_local import Molmo2Backend

    def wrapped_model(self, requests, images):  # as a wrapped (e.g. PEFT) model fails a bare language-model pass
        raise AttributeError("'PeftModel' object has no attribute 'model'")

    monkeypatch.setattr(Molmo2Backend, "image_prefixes", wrapped_model)
    model = str(tiny_molmo2_dir)
    backend = load_backend(model, Settings(model=(model,), device="cpu"), local_files_only=True)
    try:
        assert backend.layout.mode == "reuse" and "AttributeError" in backend.layout.reason
        request = Request(Task.ANSWER, noise_image(50, 40, 1), text="what?", max_new_tokens=4)
        (output,) = backend.run_batch([request])
        assert output.raw is not None
    finally:
        backend.close()
