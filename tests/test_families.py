"""Families: the prompt each task gets, and how each family's answer becomes an Output."""

from __future__ import annotations

import math
from typing import Any

import pytest
from PIL import Image

from vlm_tools.backends.base import Output, Request, Task
from vlm_tools.errors import InvalidArgument, UnsupportedByModel
from vlm_tools.families import FAMILIES, Molmo, Molmo2, PaliGemma, get_family

IMAGE = Image.new("RGB", (4, 4))


def req(task: Task, **kwargs: Any) -> Request:
    return Request(task=task, image=IMAGE, **kwargs)


def loc(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def test_registry() -> None:
    assert {f.name for f in FAMILIES} == {"paligemma", "molmo2", "molmo"}
    for family in FAMILIES:
        assert get_family(family.name) is family
        assert family.native <= family.supported
    with pytest.raises(KeyError):
        get_family("llava")


CAPABILITIES = [
    (
        "paligemma",
        {Task.CAPTION, Task.ANSWER, Task.DETECT, Task.OCR},
        {Task.CAPTION, Task.ANSWER, Task.DETECT, Task.OCR, Task.POINT},
    ),
    ("molmo2", {Task.CAPTION, Task.ANSWER, Task.POINT, Task.OCR}, {Task.CAPTION, Task.ANSWER, Task.POINT, Task.OCR}),
    ("molmo", {Task.CAPTION, Task.ANSWER, Task.POINT, Task.OCR}, {Task.CAPTION, Task.ANSWER, Task.POINT, Task.OCR}),
]


@pytest.mark.parametrize(("name", "native", "supported"), [c for c in CAPABILITIES], ids=[c[0] for c in CAPABILITIES])
def test_capabilities(name: str, native: set[Task], supported: set[Task]) -> None:
    assert get_family(name).native == native
    assert get_family(name).supported == supported


PROMPTS = [
    ("pg_caption_brief", "paligemma", req(Task.CAPTION), "caption en"),
    ("pg_caption_detailed_de", "paligemma", req(Task.CAPTION, detail="detailed", language="de"), "describe de"),
    ("pg_caption_fr", "paligemma", req(Task.CAPTION, language="fr"), "caption fr"),
    ("pg_answer", "paligemma", req(Task.ANSWER, text="what is on the table?"), "answer en what is on the table?"),
    (
        "pg_answer_newlines_become_spaces",
        "paligemma",
        req(Task.ANSWER, text="what is\nthis?\r\n"),
        "answer en what is this?",
    ),
    (
        "pg_detect_labels",
        "paligemma",
        req(Task.DETECT, labels=("cat", "dog", "cell phone")),
        "detect cat ; dog ; cell phone",
    ),
    (
        "pg_detect_label_with_semicolon",
        "paligemma",
        req(Task.DETECT, labels=("salt;pepper", "cup")),
        "detect salt,pepper ; cup",
    ),
    ("pg_detect_label_with_newline", "paligemma", req(Task.DETECT, labels=("red\ncar",)), "detect red car"),
    ("pg_point_is_detect", "paligemma", req(Task.POINT, text="red cup"), "detect red cup"),
    ("pg_ocr", "paligemma", req(Task.OCR), "ocr"),
    ("m2_caption_brief", "molmo2", req(Task.CAPTION), "Describe this image in one or two sentences."),
    ("m2_caption_detailed", "molmo2", req(Task.CAPTION, detail="detailed"), "Describe this image in detail."),
    (
        "m2_caption_german",
        "molmo2",
        req(Task.CAPTION, language="de"),
        "Describe this image in one or two sentences. Answer in German.",
    ),
    (
        "m2_caption_unknown_language_code",
        "molmo2",
        req(Task.CAPTION, language="xx"),
        "Describe this image in one or two sentences. Answer in xx.",
    ),
    ("m2_answer", "molmo2", req(Task.ANSWER, text="  What colour is the car? "), "What colour is the car?"),
    (
        "m2_answer_french",
        "molmo2",
        req(Task.ANSWER, text="What is this?", language="fr"),
        "What is this? Answer in French.",
    ),
    ("m2_point_adds_article", "molmo2", req(Task.POINT, text="boats"), "Point to the boats."),
    ("m2_point_keeps_determiner", "molmo2", req(Task.POINT, text="all the cats"), "Point to all the cats."),
    ("m2_point_no_double_period", "molmo2", req(Task.POINT, text="the red button."), "Point to the red button."),
    ("m2_point_one_line", "molmo2", req(Task.POINT, text="the\nlogin   button"), "Point to the login button."),
    ("m2_ocr", "molmo2", req(Task.OCR), "Transcribe all the text in this image. Keep the reading order."),
    ("molmo_caption_detailed", "molmo", req(Task.CAPTION, detail="detailed"), "Describe this image."),
    ("molmo_caption_brief", "molmo", req(Task.CAPTION), "Describe this image in one or two sentences."),
    ("molmo_point", "molmo", req(Task.POINT, text="cup"), "Point to the cup."),
    ("molmo_answer", "molmo", req(Task.ANSWER, text="How many cups?"), "How many cups?"),
]


@pytest.mark.parametrize(("name", "request_", "expected"), [c[1:] for c in PROMPTS], ids=[c[0] for c in PROMPTS])
def test_prompt(name: str, request_: Request, expected: str) -> None:
    assert get_family(name).prompt(request_) == expected


BAD_REQUESTS = [
    ("molmo2_cannot_detect", "molmo2", req(Task.DETECT, labels=("cat",)), UnsupportedByModel),
    ("molmo_cannot_detect", "molmo", req(Task.DETECT, labels=("cat",)), UnsupportedByModel),
    ("pg_detect_without_labels", "paligemma", req(Task.DETECT), InvalidArgument),
    ("pg_detect_blank_label", "paligemma", req(Task.DETECT, labels=("cat", "  ")), InvalidArgument),
    ("pg_empty_question", "paligemma", req(Task.ANSWER, text=" \n "), InvalidArgument),
    ("pg_empty_point_description", "paligemma", req(Task.POINT, text=""), InvalidArgument),
    ("m2_empty_question", "molmo2", req(Task.ANSWER, text=""), InvalidArgument),
    ("m2_empty_description", "molmo2", req(Task.POINT, text="\n"), InvalidArgument),
]


@pytest.mark.parametrize(("name", "request_", "error"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(name: str, request_: Request, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        get_family(name).prompt(request_)
    assert str(info.value).startswith(f"{error.code}: ")  # type: ignore[attr-defined]


# --- interpret ---------------------------------------------------------------------------------------------

TEXT_ANSWERS = [
    ("pg_caption", "paligemma", req(Task.CAPTION), "a cat on a mat<eos><pad>", "a cat on a mat"),
    ("pg_answer_echoed", "paligemma", req(Task.ANSWER, text="colour?"), "answer en colour?\nred<eos>", "red"),
    ("pg_ocr_lines", "paligemma", req(Task.OCR), "TOTAL\n12.00<eos>", "TOTAL\n12.00"),
    ("m2_caption", "molmo2", req(Task.CAPTION), " A red boat on a lake.<|im_end|>", "A red boat on a lake."),
    (
        "m2_answer_with_points",
        "molmo2",
        req(Task.ANSWER, text="?"),
        'Counting the <points coords="1 1 100 100" alt="boats">boats</points> shows a total of 1.',
        "Counting the boats shows a total of 1.",
    ),
    ("molmo_ocr", "molmo", req(Task.OCR), "Hello\nWorld<|endoftext|>", "Hello\nWorld"),
]


@pytest.mark.parametrize(
    ("name", "request_", "raw", "text"), [c[1:] for c in TEXT_ANSWERS], ids=[c[0] for c in TEXT_ANSWERS]
)
def test_interpret_text(name: str, request_: Request, raw: str, text: str) -> None:
    out = get_family(name).interpret(request_, raw)
    assert out == Output(raw=raw, text=text)


def test_paligemma_detect_maps_labels_back() -> None:
    request = req(Task.DETECT, labels=("Cell Phone", "remote", "salt;pepper"))
    raw = (
        loc(100, 200, 300, 400) + " cell phone ; "
        + loc(500, 600, 700, 800) + "  Remote ; "
        + loc(10, 10, 20, 20) + " salt,pepper ; "
        + loc(0, 0, 1023, 1023) + " dog<eos>"
    )  # fmt: skip
    out = PaliGemma().interpret(request, raw)
    assert [b.label for b in out.boxes] == ["Cell Phone", "remote", "salt;pepper", "dog"]
    assert out.points == [] and out.text == ""
    first = out.boxes[0]
    assert math.isclose(first.x0, 200 / 1024) and math.isclose(first.y0, 100 / 1024)
    assert math.isclose(first.x1, 400 / 1024) and math.isclose(first.y1, 300 / 1024)


def test_paligemma_detect_unlabelled_box_gets_the_only_label() -> None:
    out = PaliGemma().interpret(req(Task.DETECT, labels=("cat",)), loc(1, 2, 3, 4))
    assert [b.label for b in out.boxes] == ["cat"]
    out = PaliGemma().interpret(req(Task.DETECT, labels=("cat", "dog")), loc(1, 2, 3, 4))
    assert [b.label for b in out.boxes] == [None]


def test_paligemma_point_is_box_centre() -> None:
    raw = loc(256, 128, 768, 896) + " cup ; " + loc(0, 0, 100, 50) + " cup ; " + loc(900, 900, 1000, 1000) + " cup"
    out = PaliGemma().interpret(req(Task.POINT, text="red cup", max_points=2), raw)
    assert out.point_source == "box_center"
    assert len(out.points) == len(out.boxes) == 2
    p = out.points[0]
    assert math.isclose(p.x, (128 + 896) / 2 / 1024) and math.isclose(p.y, (256 + 768) / 2 / 1024)
    assert math.isclose(out.points[1].x, 25 / 1024) and math.isclose(out.points[1].y, 50 / 1024)
    assert {q.label for q in out.points} == {"red cup"} == {b.label for b in out.boxes}


def test_molmo2_point() -> None:
    raw = '<points coords="1 1 073 160 2 173 600 3 500 500" alt="boats">the boats</points>'
    out = Molmo2().interpret(req(Task.POINT, text="boats", max_points=2), raw)
    assert out.point_source == "native"
    assert out.boxes == []
    assert [(p.x, p.y, p.label) for p in out.points] == [(0.073, 0.16, "boats"), (0.173, 0.6, "boats")]
    assert out.text == "the boats"


def test_molmo2_point_without_label_uses_description() -> None:
    out = Molmo2().interpret(req(Task.POINT, text="the door"), '<points coords="1 1 250 750"/>')
    assert [(p.x, p.y, p.label) for p in out.points] == [(0.25, 0.75, "the door")]


def test_molmo_point_percent() -> None:
    raw = '<points x1="9.1" y1="11.7" x2="17.2" y2="41.3" alt="cups">cups</points>'
    out = Molmo().interpret(req(Task.POINT, text="cups", max_points=10), raw)
    assert len(out.points) == 2
    assert math.isclose(out.points[1].x, 0.172) and math.isclose(out.points[1].y, 0.413)
    assert out.points[0].label == "cups" and out.point_source == "native"


@pytest.mark.parametrize("max_points", [0, 1, 3, 50])
@pytest.mark.parametrize("name", ["paligemma", "molmo2", "molmo"])
def test_max_points_respected(name: str, max_points: int) -> None:
    raws = {
        "paligemma": " ; ".join(loc(i, i, i + 10, i + 10) + " x" for i in range(5)),
        "molmo2": '<points coords="1 '
        + " ".join(f"{i} {100 * i:03d} 500" for i in range(1, 6))
        + '" alt="x">x</points>',
        "molmo": "".join(f'<point x="{10 * i}" y="5" alt="x">x</point>' for i in range(1, 6)),
    }
    out = get_family(name).interpret(req(Task.POINT, text="x", max_points=max_points), raws[name])
    assert len(out.points) == min(max_points, 5)


GARBAGE = ["", "<", '<loc0001><points coords="1 1', "\x00\x01 random ; <eos>", "<point x='1000' y='-1'>"]


@pytest.mark.parametrize("raw", GARBAGE, ids=["empty", "lt", "mixed", "control", "invalid_point"])
@pytest.mark.parametrize("task", list(Task), ids=[t.value for t in Task])
@pytest.mark.parametrize("name", ["paligemma", "molmo2", "molmo"])
def test_interpret_never_raises_on_odd_output(name: str, task: Task, raw: str) -> None:
    request = req(task, text="thing", labels=("thing",))
    out = get_family(name).interpret(request, raw)
    assert out.raw == raw
    for p in out.points:
        assert 0.0 <= p.x <= 1.0 and 0.0 <= p.y <= 1.0
