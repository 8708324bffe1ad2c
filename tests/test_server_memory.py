"""The MCP server in memory (``mcp.Client(server)``) over scripted models: every tool, source, frame,
annotation, handle reuse, document progress and cancellation, and every error code through the protocol."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client
from PIL import Image

from vlm_tools.backends.base import Request, Task
from vlm_tools.server import VisionServer, build_server

from fakes import eventually
from helpers import data_uri, loader, png_bytes, settings_for, static_site
from scripted import ScriptedBackend, molmo2_script, paligemma_script

TOOLS = {"describe_image", "answer_about_image", "point_to_object", "detect", "read_document"}


def _pdf(pages: int, size: tuple[float, float] = (612, 792)) -> bytes:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    for _ in range(pages):
        doc.new_page(*size)
    buffer = io.BytesIO()
    doc.save(buffer)
    doc.close()
    return buffer.getvalue()


@pytest.fixture
def molmo2() -> ScriptedBackend:
    return ScriptedBackend("molmo2", molmo2_script)


@pytest.fixture
def paligemma() -> ScriptedBackend:
    return ScriptedBackend("paligemma", paligemma_script)


@pytest.fixture
def server(tmp_path: Path, molmo2: ScriptedBackend, paligemma: ScriptedBackend) -> VisionServer:
    """A server over a scripted Molmo2 (first: points natively) and a scripted PaliGemma (boxes)."""
    return build_server(settings_for(tmp_path), load_backends=loader(molmo2, paligemma))


@pytest.fixture
def http_image() -> Iterator[str]:
    with static_site({"/shot.png": ("image/png", png_bytes(320, 240))}) as base:
        yield f"{base}/shot.png"


def _error_text(result: object) -> str:
    assert result.is_error, result  # type: ignore[attr-defined]
    return " ".join(getattr(b, "text", "") for b in result.content)  # type: ignore[attr-defined]


def _code(result: object) -> str:
    """The error code: the first word after any 'Error executing tool …:' prefix the SDK adds."""
    text = _error_text(result)
    if text.startswith("Error executing tool"):
        text = text.split(":", 1)[1].strip()
    return text.split(":", 1)[0]


# --- listing -------------------------------------------------------------------------------------------------


async def test_lists_the_five_tools_with_schemas_and_annotations(server: VisionServer) -> None:
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.output_schema and tool.output_schema["type"] == "object"
            assert tool.annotations.read_only_hint is True
            assert tool.annotations.idempotent_hint is True
            assert tool.annotations.open_world_hint is True  # URL fetching is on
            assert tool.description
        point = tools["point_to_object"].input_schema["properties"]
        assert point["max_points"]["maximum"] == 100
        assert "frame" in point and "annotate" in point
        assert "image_id" in tools["describe_image"].input_schema["properties"]["image"]["description"]


async def test_open_world_hint_follows_url_setting(tmp_path: Path, molmo2: ScriptedBackend) -> None:
    server = build_server(settings_for(tmp_path, allow_urls=False), load_backends=loader(molmo2))
    async with Client(server) as c:
        for tool in (await c.list_tools()).tools:
            assert tool.annotations.open_world_hint is False


# --- every tool, every source --------------------------------------------------------------------------------


async def test_describe_from_path(server: VisionServer, image_file: Path) -> None:
    async with Client(server) as client:
        result = await client.call_tool("describe_image", {"image": str(image_file)})
        assert not result.is_error
        data = result.structured_content
        assert data["text"] == "A plain test image."
        assert data["image_size"] == {"width": 200, "height": 100}
        assert data["model"] == "scripted-molmo2"
        assert data["image_id"].startswith("img_")
        assert data["raw"] == "A plain test image."


@pytest.mark.parametrize("form", ["data_uri", "base64", "file_url"])
async def test_describe_from_each_inline_form(server: VisionServer, image_file: Path, form: str) -> None:
    async with Client(server) as client:
        raw = image_file.read_bytes()
        source = {
            "data_uri": data_uri(raw),
            "base64": base64.b64encode(raw).decode(),
            "file_url": image_file.as_uri(),
        }[form]
        result = await client.call_tool("describe_image", {"image": source, "detail": "detailed"})
        assert not result.is_error, _error_text(result)
        assert result.structured_content["image_size"] == {"width": 200, "height": 100}


async def test_describe_from_url(server: VisionServer, http_image: str) -> None:
    async with Client(server) as client:
        result = await client.call_tool("describe_image", {"image": http_image})
        assert not result.is_error, _error_text(result)
        assert result.structured_content["image_size"] == {"width": 320, "height": 240}


async def test_image_id_reuse_skips_the_bytes(server: VisionServer, image_file: Path, molmo2: ScriptedBackend) -> None:
    async with Client(server) as client:
        first = await client.call_tool("describe_image", {"image": str(image_file)})
        image_id = first.structured_content["image_id"]
        second = await client.call_tool("answer_about_image", {"image": image_id, "question": "What colour?"})
        assert not second.is_error, _error_text(second)
        assert second.structured_content["image_id"] == image_id
        assert second.structured_content["answer"] == "It is blue."
        assert molmo2.requests[-1].image.size == (200, 100)


async def test_answer_goes_to_first_native_model(
    server: VisionServer, image_file: Path, molmo2: ScriptedBackend
) -> None:
    async with Client(server) as client:
        result = await client.call_tool("answer_about_image", {"image": str(image_file), "question": "Colour?"})
        assert result.structured_content["model"] == "scripted-molmo2"
        assert molmo2.requests[-1].task is Task.ANSWER


async def test_point_pixels_normalised_and_frame(server: VisionServer, tmp_path: Path) -> None:
    async with Client(server) as client:
        # A 2560×1440 screenshot (devicePixelRatio 2) of a 1280×720 viewport; Molmo2 says (500, 250) on 0..1000.
        path = tmp_path / "retina.png"
        path.write_bytes(png_bytes(2560, 1440))
        result = await client.call_tool(
            "point_to_object",
            {"image": str(path), "description": "the button", "frame": {"width": 1280, "height": 720}},
        )
        assert not result.is_error, _error_text(result)
        data = result.structured_content
        assert data["found"] is True and data["count"] == 1
        (point,) = data["points"]
        assert (point["x"], point["y"]) == (1280.0, 360.0)
        assert (point["x_norm"], point["y_norm"]) == (0.5, 0.25)
        assert (point["frame_x"], point["frame_y"]) == (640.0, 180.0)
        assert point["source"] == "native"
        assert data["frame"] == {"width": 1280.0, "height": 720.0}


async def test_point_not_found_is_not_an_error(server: VisionServer, image_file: Path) -> None:
    async with Client(server) as client:
        result = await client.call_tool("point_to_object", {"image": str(image_file), "description": "nothing here"})
        assert not result.is_error
        assert result.structured_content["found"] is False
        assert result.structured_content["points"] == []
        assert result.structured_content["count"] == 0


async def test_max_points_caps_the_points(server: VisionServer, image_file: Path) -> None:
    async with Client(server) as client:
        result = await client.call_tool(
            "point_to_object", {"image": str(image_file), "description": "everything", "max_points": 1}
        )
        assert result.structured_content["count"] == 1


async def test_detect_boxes_in_pixels_and_frame(server: VisionServer, image_file: Path) -> None:
    async with Client(server) as client:
        result = await client.call_tool(
            "detect", {"image": str(image_file), "labels": ["button", "icon"], "frame": {"width": 100, "height": 50}}
        )
        assert not result.is_error, _error_text(result)
        data = result.structured_content
        assert data["model"] == "scripted-paligemma"
        assert [d["label"] for d in data["detections"]] == ["button", "icon"]
        box = data["detections"][0]["box"]
        # <loc0256><loc0128><loc0768><loc0512>: y 0.25..0.75, x 0.125..0.5 of a 200×100 image
        assert (box["x0"], box["y0"], box["x1"], box["y1"]) == (25.0, 25.0, 100.0, 75.0)
        assert (box["frame_x0"], box["frame_y0"], box["frame_x1"], box["frame_y1"]) == (12.5, 12.5, 50.0, 37.5)
        assert (box["center"]["x"], box["center"]["y"]) == (62.5, 50.0)
        assert box["center"]["source"] == "box_center"


async def test_point_served_by_paligemma_says_box_center(tmp_path: Path, paligemma: ScriptedBackend) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    server = build_server(settings_for(tmp_path), load_backends=loader(paligemma))
    async with Client(server) as c:
        result = await c.call_tool("point_to_object", {"image": str(tmp_path / "a.png"), "description": "button"})
    (point,) = result.structured_content["points"]
    assert point["source"] == "box_center"
    assert math.isclose(point["x"], 62.5) and math.isclose(point["y"], 50.0)


@pytest.mark.parametrize("tool", ["point_to_object", "detect"])
async def test_annotate_returns_a_png(server: VisionServer, tmp_path: Path, tool: str) -> None:
    async with Client(server) as client:
        path = tmp_path / "big.png"
        path.write_bytes(png_bytes(3000, 1500))
        args = {"image": str(path), "annotate": True}
        args.update({"description": "the button"} if tool == "point_to_object" else {"labels": ["button"]})
        result = await client.call_tool(tool, args)
        assert not result.is_error, _error_text(result)
        images = [b for b in result.content if b.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        picture = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
        assert max(picture.size) == 1024 and picture.size == (1024, 512)
        # the drawing changed pixels: the solid background is no longer the only colour
        assert len(picture.convert("RGB").getcolors(1_000_000) or []) > 1


async def test_no_image_without_annotate(server: VisionServer, image_file: Path) -> None:
    async with Client(server) as client:
        result = await client.call_tool("detect", {"image": str(image_file), "labels": ["button"]})
        assert [b.type for b in result.content] == ["text"]


# --- documents -----------------------------------------------------------------------------------------------


async def test_read_document_pages_progress_and_page_ids(server: VisionServer, tmp_path: Path) -> None:
    async with Client(server) as client:
        path = tmp_path / "doc.pdf"
        path.write_bytes(_pdf(4))
        progress: list[tuple[float, float | None]] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append((done, total))

        result = await client.call_tool(
            "read_document", {"document": str(path), "pages": "1-2,4"}, progress_callback=on_progress
        )
        assert not result.is_error, _error_text(result)
        data = result.structured_content
        assert data["page_count"] == 4
        assert [p["page"] for p in data["pages"]] == [1, 2, 4]
        assert all(p["text"] == "Page text" for p in data["pages"])
        first = data["pages"][0]
        assert first["page_size_pt"] == {"width": 612.0, "height": 792.0}
        assert max(first["image_size"].values()) == 2048
        assert progress == [(1, 3), (2, 3), (3, 3)]
        again = await client.call_tool("point_to_object", {"image": first["image_id"], "description": "title"})
        assert not again.is_error and again.structured_content["image_size"] == first["image_size"]


async def test_read_document_of_an_image(server: VisionServer, image_file: Path) -> None:
    async with Client(server) as client:
        result = await client.call_tool("read_document", {"document": str(image_file)})
        assert not result.is_error, _error_text(result)
        (page,) = result.structured_content["pages"]
        assert page["page"] == 1 and page["page_size_pt"] is None
        assert page["image_size"] == {"width": 200, "height": 100}


async def test_read_document_stops_between_pages_when_cancelled(tmp_path: Path) -> None:
    slow = ScriptedBackend("molmo2", molmo2_script, delay_s=0.3)
    path = tmp_path / "long.pdf"
    path.write_bytes(_pdf(10, (100, 100)))
    server = build_server(settings_for(tmp_path), load_backends=loader(slow))
    async with Client(server) as c:
        with anyio.move_on_after(1.0):
            await c.call_tool("read_document", {"document": str(path)})
        await anyio.sleep(1.0)  # had the call gone on, pages would keep reaching the model now
        ocr = [b for b in slow.batches if b[0] is Task.OCR]
        assert 1 <= len(ocr) < 10
        after = len(slow.batches)
        await anyio.sleep(0.7)
        assert len(slow.batches) == after
        ok = await c.call_tool("describe_image", {"image": str(path.with_suffix(".png"))})
        assert ok.is_error and _code(ok) == "path_not_allowed"  # missing file; server still answers


async def test_read_document_pages_are_read_together(tmp_path: Path) -> None:
    """The pages of one call wait for the model together, so they share batches instead of going one by one."""
    import threading

    gate = threading.Event()
    model = ScriptedBackend("molmo2", molmo2_script, gate=gate)
    path = tmp_path / "doc.pdf"
    path.write_bytes(_pdf(4, (100, 100)))
    server = build_server(settings_for(tmp_path), load_backends=loader(model))
    async with Client(server) as client, anyio.create_task_group() as group:
        results: list[object] = []

        async def read() -> None:
            results.append(await client.call_tool("read_document", {"document": str(path)}))

        group.start_soon(read)
        # Page 1 is with the model (held at the gate); pages 2-4 are rendered and waiting, all three at once.
        await eventually(lambda: server.runtime is not None and server.runtime.engine.queue_depth == 3, 10,
                         "the other pages to wait together")  # fmt: skip
        gate.set()
    assert not results[0].is_error, _error_text(results[0])  # type: ignore[attr-defined]
    assert [p["page"] for p in results[0].structured_content["pages"]] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert model.batches == [(Task.OCR, 1), (Task.OCR, 3)]


async def test_read_document_reports_pages_in_order_when_they_finish_out_of_order(tmp_path: Path) -> None:
    import threading

    finished: list[str] = []
    first_started = threading.Event()
    others_finished = threading.Event()
    claim = threading.Lock()  # two workers call at once: exactly one of them holds the first page

    def first_page_slowest(request: Request) -> str:
        with claim:
            is_first = not first_started.is_set()
            first_started.set()
        if is_first:
            # Held until the other three pages are read (the bound only keeps a broken run from hanging).
            assert others_finished.wait(30), "the later pages were not read while the first was held"
        finished.append(request.image_id or "")
        if len(finished) == 3:
            others_finished.set()
        return molmo2_script(request)

    model = ScriptedBackend("molmo2", first_page_slowest, max_batch_size=1)
    model.parallelism = 2  # two workers, as for a remote server: the later pages overtake the first
    path = tmp_path / "doc.pdf"
    path.write_bytes(_pdf(4, (100, 100)))
    server = build_server(settings_for(tmp_path), load_backends=loader(model))
    progress: list[tuple[float, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, message))

    async with Client(server) as client:
        result = await client.call_tool("read_document", {"document": str(path)}, progress_callback=on_progress)
    assert not result.is_error, _error_text(result)
    pages = result.structured_content["pages"]
    assert finished[0] != pages[0]["image_id"] and finished[-1] == pages[0]["image_id"]  # page 1 finished last
    assert progress == [(n, f"read page {n} of 4") for n in (1, 2, 3, 4)]


async def test_read_document_fails_at_its_first_failing_page_and_the_server_serves_on(
    tmp_path: Path, image_file: Path
) -> None:
    calls: list[int] = []

    def second_page_breaks(request: Request) -> str:
        calls.append(1)
        if request.task is Task.OCR and len(calls) == 2:
            raise RuntimeError("the model broke")
        return molmo2_script(request)

    model = ScriptedBackend("molmo2", second_page_breaks, max_batch_size=1)
    path = tmp_path / "doc.pdf"
    path.write_bytes(_pdf(30, (100, 100)))
    server = build_server(settings_for(tmp_path), load_backends=loader(model))
    async with Client(server) as client:
        result = await client.call_tool("read_document", {"document": str(path)})
        assert _code(result) == "model_error"
        read = len(calls)
        ok = await client.call_tool("describe_image", {"image": str(image_file)})
    assert not ok.is_error
    assert read < 30  # the pages after the failure were not all read


# --- errors --------------------------------------------------------------------------------------------------


async def test_unsupported_by_model_names_the_family(tmp_path: Path, molmo2: ScriptedBackend, image_file: Path) -> None:
    server = build_server(settings_for(tmp_path), load_backends=loader(molmo2))
    async with Client(server) as c:
        result = await c.call_tool("detect", {"image": str(image_file), "labels": ["cat"]})
        assert _code(result) == "unsupported_by_model"
        assert "PaliGemma" in _error_text(result)


async def test_busy_when_the_queue_is_full(tmp_path: Path, image_file: Path) -> None:
    """One call with the model and one waiting fill a queue of one: the next callers are told to retry at once."""
    import threading

    gate = threading.Event()
    held = ScriptedBackend("molmo2", molmo2_script, max_batch_size=1, gate=gate)
    server = build_server(settings_for(tmp_path, queue_size=1, max_batch_size=1), load_backends=loader(held))
    async with Client(server) as c:
        results: list[object] = []

        async def call() -> None:
            results.append(await c.call_tool("describe_image", {"image": str(image_file)}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await eventually(lambda: len(held.batches) == 1, 10, "the first call to reach the model")
            for _ in range(4):
                tg.start_soon(call)
            await eventually(lambda: len(results) == 3, 10, "three callers to be turned away while the model works")
            gate.set()
        codes = [_code(r) if r.is_error else "ok" for r in results]  # type: ignore[attr-defined]
        assert codes == ["busy", "busy", "busy", "ok", "ok"]
        assert "retry" in _error_text(results[0]).lower()


async def test_timeout(tmp_path: Path, image_file: Path) -> None:
    slow = ScriptedBackend("molmo2", molmo2_script, delay_s=1.0)
    server = build_server(settings_for(tmp_path, request_timeout_s=0.2), load_backends=loader(slow))
    async with Client(server) as c:
        result = await c.call_tool("describe_image", {"image": str(image_file)})
        assert _code(result) == "timeout"


async def test_model_error_stays_with_its_request(tmp_path: Path, image_file: Path) -> None:
    def script(request: Request) -> str:
        if "poison" in request.text:
            raise RuntimeError("boom")
        return molmo2_script(request)

    server = build_server(settings_for(tmp_path), load_backends=loader(ScriptedBackend("molmo2", script)))
    async with Client(server) as c:
        bad = await c.call_tool("answer_about_image", {"image": str(image_file), "question": "poison"})
        assert _code(bad) == "model_error"
        assert "boom" not in _error_text(bad) or "model_error" in _error_text(bad)
        good = await c.call_tool("answer_about_image", {"image": str(image_file), "question": "fine?"})
        assert not good.is_error


def _bad_inputs(tmp_path: Path) -> list[tuple[str, str, dict[str, object], str]]:
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "dir").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}_sibling.png"
    outside.write_bytes(png_bytes())
    image = str(tmp_path / "ok.png")
    (tmp_path / "ok.png").write_bytes(png_bytes())
    (tmp_path / "doc.pdf").write_bytes(_pdf(2))
    long = "x" * 100_000
    return [
        ("text_as_png", "describe_image", {"image": str(tmp_path / "text.png")}, "invalid_image"),
        ("directory", "describe_image", {"image": str(tmp_path / "dir")}, "path_not_allowed"),
        ("prefix_sibling", "describe_image", {"image": str(outside)}, "path_not_allowed"),
        ("dotdot", "describe_image", {"image": str(tmp_path / ".." / outside.name)}, "path_not_allowed"),
        ("etc_passwd", "describe_image", {"image": "/etc/passwd"}, "path_not_allowed"),
        ("missing", "describe_image", {"image": str(tmp_path / "missing.png")}, "path_not_allowed"),
        ("ftp_url", "describe_image", {"image": "ftp://example.com/x.png"}, "url_blocked"),
        ("refused_port", "describe_image", {"image": "http://127.0.0.1:9/x.png"}, "fetch_failed"),
        ("unknown_id", "describe_image", {"image": "img_" + "0" * 32}, "unknown_image_id"),
        ("bad_base64", "describe_image", {"image": "!!!!"}, "invalid_argument"),
        ("wrong_data_uri", "describe_image", {"image": "data:text/html;base64,PGgxPg=="}, "invalid_image"),
        ("empty_image", "describe_image", {"image": ""}, "invalid_argument"),
        ("bad_detail", "describe_image", {"image": image, "detail": "max"}, "invalid_argument"),
        ("bad_language", "describe_image", {"image": image, "language": "english please"}, "invalid_argument"),
        ("huge_question", "answer_about_image", {"image": image, "question": long}, "invalid_argument"),
        ("empty_question", "answer_about_image", {"image": image, "question": ""}, "invalid_argument"),
        ("max_points_zero", "point_to_object", {"image": image, "description": "a", "max_points": 0}, "invalid_argument"),
        ("max_points_huge", "point_to_object", {"image": image, "description": "a", "max_points": 10**6}, "invalid_argument"),
        ("negative_frame", "point_to_object", {"image": image, "description": "a", "frame": {"width": -1, "height": 5}}, "invalid_argument"),
        ("frame_not_object", "point_to_object", {"image": image, "description": "a", "frame": "1280x720"}, "invalid_argument"),
        ("empty_labels", "detect", {"image": image, "labels": []}, "invalid_argument"),
        ("blank_labels", "detect", {"image": image, "labels": ["  "]}, "invalid_argument"),
        ("labels_not_list", "detect", {"image": image, "labels": "cat"}, "invalid_argument"),
        ("too_many_labels", "detect", {"image": image, "labels": [f"l{i}" for i in range(50)]}, "invalid_argument"),
        ("pages_garbage", "read_document", {"document": str(tmp_path / "doc.pdf"), "pages": "one"}, "invalid_argument"),
        ("pages_out_of_range", "read_document", {"document": str(tmp_path / "doc.pdf"), "pages": "3"}, "invalid_argument"),
        ("pages_reversed", "read_document", {"document": str(tmp_path / "doc.pdf"), "pages": "2-1"}, "invalid_argument"),
        ("pdf_garbage", "read_document", {"document": data_uri(b"%PDF-1.7 garbage", "application/pdf")}, "invalid_document"),
        ("missing_argument", "describe_image", {}, "invalid_argument"),
        ("wrong_type", "describe_image", {"image": 5}, "invalid_argument"),
        ("extra_nul_path", "describe_image", {"image": str(tmp_path / "ok.png") + "\x00.png"}, "path_not_allowed"),
        ("javascript_url", "describe_image", {"image": "javascript:alert(1)"}, "url_blocked"),
        ("gopher_url", "describe_image", {"image": "gopher://example.com/x"}, "url_blocked"),
        ("file_url_outside", "describe_image", {"image": "file:///etc/hostname"}, "path_not_allowed"),
        ("truncated_png_uri", "describe_image", {"image": data_uri(png_bytes()[:60])}, "invalid_image"),
        ("svg_uri", "describe_image", {"image": data_uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")}, "invalid_image"),
        ("html_as_base64", "describe_image", {"image": base64.b64encode(b"<html><body>hi</body></html>").decode()}, "invalid_image"),
        ("malformed_id", "describe_image", {"image": "img_zzz"}, "unknown_image_id"),
        ("page_zero", "read_document", {"document": str(tmp_path / "doc.pdf"), "pages": "0"}, "invalid_argument"),
        ("page_huge", "read_document", {"document": str(tmp_path / "doc.pdf"), "pages": "1-99999999999"}, "invalid_argument"),
        ("label_too_long", "detect", {"image": image, "labels": ["x" * 101]}, "invalid_argument"),
        ("empty_description", "point_to_object", {"image": image, "description": ""}, "invalid_argument"),
    ]  # fmt: skip


def test_the_bad_input_corpus_is_large_enough(tmp_path: Path) -> None:
    assert len(_bad_inputs(tmp_path)) >= 40


async def test_each_bad_input_gets_its_code_and_the_server_keeps_serving(
    server: VisionServer, tmp_path: Path, image_file: Path
) -> None:
    async with Client(server) as client:
        failures = []
        for name, tool, args, code in _bad_inputs(tmp_path):
            result = await client.call_tool(tool, args)
            got = _code(result) if result.is_error else "ok"
            if got != code:
                failures.append(f"{name}: expected {code}, got {got}: {_error_text(result) if result.is_error else ''}")
            after = await client.call_tool("describe_image", {"image": str(image_file)})
            assert not after.is_error, f"server stopped serving after {name}"
        assert not failures, "\n".join(failures)


async def test_pixel_cap(tmp_path: Path, molmo2: ScriptedBackend) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(3000, 3000))
    server = build_server(settings_for(tmp_path, max_image_pixels=4_000_000), load_backends=loader(molmo2))
    async with Client(server) as c:
        result = await c.call_tool("describe_image", {"image": str(path)})
        assert _code(result) == "image_too_large"


async def test_url_fetching_off(tmp_path: Path, molmo2: ScriptedBackend, http_image: str) -> None:
    server = build_server(settings_for(tmp_path, allow_urls=False), load_backends=loader(molmo2))
    async with Client(server) as c:
        result = await c.call_tool("describe_image", {"image": http_image})
        assert _code(result) == "url_blocked"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/x.png",
        "http://192.168.1.1/x.png",
        "http://[::ffff:10.0.0.5]/x.png",
        "http://2130706433/x.png",
        "http://127.1/x.png",
    ],
    ids=["metadata", "private_10", "private_192", "mapped_v6", "decimal_loopback", "short_loopback"],
)
async def test_private_urls_refused_through_the_protocol(tmp_path: Path, molmo2: ScriptedBackend, url: str) -> None:
    # Private addresses are refused at the address check: no traffic leaves for them.
    server = build_server(settings_for(tmp_path, allow_private_urls=False), load_backends=loader(molmo2))
    async with Client(server) as c:
        result = await c.call_tool("describe_image", {"image": url})
        assert _code(result) == "url_blocked"
        assert not (await c.call_tool("describe_image", {"image": data_uri(png_bytes())})).is_error


# --- answers the parser cannot read --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "raw", "found"),
    [
        # Molmo (0924) percent markup from a Molmo2: points the Molmo2 parser does not read.
        ("molmo2", '<point x="61.5" y="40.2" alt="red button">red button</point>', 0),
        # One point read, one in a syntax it does not read: the one is returned, and the other is said.
        ("molmo2", '<points coords="1 1 500 250" alt="a">a</points> and <point x="1" y="2">b</point>', 1),
        # A box cut short and an inverted one: nothing to return, two boxes' worth of markup unread.
        ("paligemma", "<loc0100><loc0200><loc0300> cat ; <loc0500><loc0500><loc0100><loc0100> dog", 0),
    ],
    ids=["molmo2-percent-syntax", "molmo2-partly-read", "paligemma-broken-boxes"],
)
async def test_markup_the_parser_cannot_read_is_said_not_taken_for_nothing(
    tmp_path: Path, image_file: Path, family: str, raw: str, found: int
) -> None:
    model = ScriptedBackend(family, lambda _request: raw)
    server = build_server(settings_for(tmp_path), load_backends=loader(model))
    async with Client(server) as client:
        tool, arguments = (
            ("detect", {"image": str(image_file), "labels": ["cat"]}) if family == "paligemma"
            else ("point_to_object", {"image": str(image_file), "description": "red button"})
        )  # fmt: skip
        result = await client.call_tool(tool, arguments)
        data = result.structured_content
        assert data["count"] == found and data["raw"] == raw
        (warning,) = data["warnings"]
        assert "could not read" in warning and "does not mean that nothing more is there" in warning
        metrics, _ = server.metrics.render()
    counted = [line for line in metrics.decode().splitlines() if line.startswith("vlm_tools_unreadable_outputs_total{")]
    assert counted and counted[0].endswith(" 1.0"), counted


async def test_an_answer_with_nothing_to_read_has_no_warning(server: VisionServer, image_file: Path) -> None:
    async with Client(server) as client:
        result = await client.call_tool("point_to_object", {"image": str(image_file), "description": "nothing"})
        assert result.structured_content["found"] is False and result.structured_content["warnings"] == []
