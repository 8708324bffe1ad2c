"""The doorstep: what a new user meets before the first tool call.

On a machine that cannot reach the hub, ``vlm-tools serve`` says within seconds why it cannot serve (once per
model, with the ways out, no traceback) — and serves at once a model that is in the cache. ``vlm-tools doctor``
reports the machine with and without a cache. A CPU start with big models warns of the memory they need. Tool
descriptions reach agents as plain paragraphs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import closed_port_url

from vlm_tools.settings import Settings
from vlm_tools.testing.published import published_text

VLM_TOOLS = str(Path(sys.executable).with_name("vlm-tools"))
DEFAULTS = ("allenai/Molmo2-4B", "google/paligemma2-3b-mix-448")


def no_hub_env(home: Path) -> dict[str, str]:
    """A process environment with an empty Hugging Face home and a hub that refuses connections."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLM_TOOLS_"))}
    hub = closed_port_url().removesuffix("/v1")
    env.update({"HF_HOME": str(home), "HF_ENDPOINT": hub, "OMP_NUM_THREADS": "1"})
    return env


def cache_model(home: Path, repo: str, source: Path) -> None:
    """Put ``source``'s files into the hub cache under ``repo``, laid out as huggingface_hub lays a download out."""
    base = home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file():
            (snapshot / item.name).write_bytes(item.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[int, str, str, float]:
    started = time.monotonic()
    done = subprocess.run([VLM_TOOLS, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def test_without_the_hub_serve_fails_in_seconds_saying_why_once(tmp_path: Path) -> None:
    code, out, err, seconds = run(["serve"], no_hub_env(tmp_path / "hf"), tmp_path)
    assert code == 2 and out == ""
    assert seconds < 30, f"took {seconds:.1f} s"  # the hub client's retry ladder alone took ~50 s
    assert "Traceback" not in err
    for model in DEFAULTS:
        assert err.count(f"{model} is not in the local cache") == 1, err
    for way_out in ("--model with a local directory", "HF_HUB_OFFLINE=1", "--model tests/fixtures/models/molmo2-ui"):
        assert way_out in err
    lines = [re.sub(r"^\S+ \S+ ", "", line) for line in err.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), err  # every message once


def test_without_the_hub_a_cached_model_serves_at_once(tmp_path: Path, tiny_paligemma_dir: Path) -> None:
    home = tmp_path / "hf"
    cache_model(home, "acme/tiny-paligemma", tiny_paligemma_dir)
    code, out, err, seconds = run(["describe", str(image(tmp_path)), "--model", "acme/tiny-paligemma",
                                   "--max-new-tokens", "4"], no_hub_env(home), tmp_path)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["model"] == "acme/tiny-paligemma"
    assert "Retrying" not in err and seconds < 60


def test_doctor_reports_the_machine_without_a_cache(tmp_path: Path) -> None:
    code, out, err, _ = run(["doctor", "--json"], no_hub_env(tmp_path / "hf"), tmp_path)
    assert code == 0, err
    report = json.loads(out)
    assert report["python"]["version"] and report["packages"]["torch"] and report["packages"]["transformers"]
    assert report["hub"]["reachable"] is False and report["hub"]["token_set"] is False
    assert report["device"]["chosen"]["device"] in ("cpu", "cuda", "mps")
    molmo2, paligemma = report["models"]
    assert (molmo2["model"], paligemma["model"]) == DEFAULTS
    assert molmo2["cached"] is False and paligemma["cached"] is False
    assert paligemma["gated"].startswith("yes") and molmo2["gated"].startswith("no")
    assert molmo2["revision"].startswith("main (not pinned") and molmo2["family"].startswith("Molmo2 (by its name")
    assert paligemma["family"].startswith("PaliGemma 2 (by its name")
    assert molmo2["serving_path"] == "known at load (its processor files are not here)"
    assert "serving_path" not in paligemma  # only Molmo2 checkpoints choose one
    if report["device"]["chosen"]["dtype"] == "float32":  # no GPU: what the default models would take
        assert (molmo2["weights_gb"], paligemma["weights_gb"]) == (19.4, 12.1)
        assert (molmo2["weights_gb_at_4bit"], paligemma["weights_gb_at_4bit"]) == (6.9, 5.2)
        assert report["memory"]["needs_gb"] == 31.5 and report["memory"]["loads_on"] == "RAM"
    assert report["memory"]["verdict"].startswith(("fits", "does not fit"))
    # bitsandbytes quantises on CUDA and on x86-64 CPUs: installed here (the test extra), it is usable.
    import platform

    if platform.machine() in ("x86_64", "AMD64") and report["packages"]["torch"]:
        assert report["bitsandbytes"]["usable"] is True, report["bitsandbytes"]
    assert {"urls", "allowed_paths"} <= set(report["inputs"]) and "chromium" in report["browser"]


def test_doctor_reports_a_cached_model_and_prints_text(tmp_path: Path, tiny_paligemma_dir: Path) -> None:
    home = tmp_path / "hf"
    cache_model(home, "acme/tiny-paligemma", tiny_paligemma_dir)
    code, out, err, _ = run(["doctor", "--json", "--model", "acme/tiny-paligemma"], no_hub_env(home), tmp_path)
    assert code == 0, err
    (entry,) = json.loads(out)["models"]
    assert entry["cached"] is True and entry["available"] is True
    from transformers import AutoModelForImageTextToText

    expected = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(tiny_paligemma_dir).parameters())
    assert entry["parameters"] == expected
    assert entry["family"] == "PaliGemma 2 (from its config.json)"
    code, text, _, _ = run(["doctor", "--model", "acme/tiny-paligemma@" + "0" * 40], no_hub_env(home), tmp_path)
    assert code == 0 and "models:" in text and "acme/tiny-paligemma" in text and "cached: yes" in text
    assert f"revision: {'0' * 40}" in text and "family: PaliGemma 2 (from its config.json)" in text
    assert "\nmemory:\n" in text and "  verdict: fits: the weights take " in text


def test_a_cpu_start_with_big_models_warns_of_their_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two directories holding the real Molmo2-4B and PaliGemma 2 configs (no weights): the warning comes before
    loading is tried."""
    from vlm_tools.backends import placement
    from vlm_tools.backends.loading import warn_if_heavy_on_cpu

    monkeypatch.setattr(placement, "resolve_device", lambda setting: "cpu")
    models = []
    for name in ("molmo2-4b", "paligemma2-3b-mix-448"):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(published_text(name, "config.json"))
        models.append(str(directory))
    with caplog.at_level(logging.WARNING):
        warn_if_heavy_on_cpu(Settings(model=tuple(models), device="cpu"))
    (record,) = [r for r in caplog.records if "no GPU" in r.getMessage()]
    message = record.getMessage()
    assert "31.5 GB" in message and "19.4 GB" in message and "12.1 GB" in message
    assert f"--model {models[0]}" in message and "--backend openai" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # one small model: nothing to warn of
        warn_if_heavy_on_cpu(Settings(model=(models[1],), dtype="bfloat16", device="cpu"))
        warn_if_heavy_on_cpu(Settings(model=(str(tmp_path / "missing"),), device="cpu"))
    assert [r for r in caplog.records if "no GPU" in r.getMessage()] == []


def test_the_known_sizes_of_the_default_models_are_counted_from_their_published_configs(tmp_path: Path) -> None:
    from vlm_tools.backends.sizing import WeightCount, count_weights
    from vlm_tools.families import family_from_name

    for model, name in zip(DEFAULTS, ("molmo2-4b", "paligemma2-3b-mix-448"), strict=True):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(published_text(name, "config.json"))
        known = family_from_name(model).known_checkpoint(model)
        assert count_weights(str(directory)) == WeightCount(known.parameters, known.quantisable)


def test_the_4bit_size_doctor_states_is_what_loading_takes(tiny_paligemma_dir: Path) -> None:
    """The quantised layers' packed weights and scales plus the rest in float32, byte for byte."""
    from vlm_tools.backends import placement
    from vlm_tools.backends.loading import load_backend
    from vlm_tools.backends.sizing import count_weights, weights_bytes

    if placement.quantization_support("cpu") is not None:
        pytest.skip(placement.quantization_support("cpu"))
    model = str(tiny_paligemma_dir)
    backend = load_backend(model, Settings(model=(model,), device="cpu", quantize="4bit"))
    try:
        taken = sum(p.numel() * p.element_size() for p in backend.model.parameters())
        for module in backend.model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            taken += state.absmax.numel() * state.absmax.element_size() if state is not None else 0
    finally:
        backend.close()
    count = count_weights(model)
    assert weights_bytes(count, "float32", "4bit") == taken
    assert weights_bytes(count, "float32") > taken


def test_doctor_says_whether_the_models_fit_and_names_the_way_out(
    tiny_paligemma_dir: Path, tiny_molmo2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlm_tools import doctor
    from vlm_tools.backends import hub, sizing

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setattr(sizing, "gpus_free", list)  # no GPU
    models = (str(tiny_molmo2_dir), str(tiny_paligemma_dir))
    settings = Settings(model=models, device="cpu")
    sizes = [sizing.weights_bytes(sizing.count_weights(m), "float32") for m in models]
    at_4bit = sum(sizing.weights_bytes(sizing.count_weights(m), "float32", "4bit") or 0 for m in models)
    ram = max(at_4bit, *sizes) + 1  # each model fits alone, and both at 4 bit; not both in float32
    assert ram < sum(sizes)

    monkeypatch.setattr(sizing, "ram_available", lambda: 10 * sum(sizes))
    report = doctor.build_report(settings)
    assert report["memory"]["fits"] is True and report["memory"]["verdict"].startswith("fits: the weights take")
    assert "ways_out" not in report["memory"]
    assert [m["fits"].split(" ")[0] for m in report["models"]] == ["yes", "yes"]
    assert report["models"][0]["serving_path"].startswith("kv-prefix")  # the tiny Molmo2's template: image first

    monkeypatch.setattr(sizing, "ram_available", lambda: ram)
    report = doctor.build_report(settings)
    memory = report["memory"]
    assert memory["fits"] is False
    assert memory["verdict"] == (f"does not fit: the weights take {sizing.human_bytes(sum(sizes))} and "
                                 f"{sizing.human_bytes(ram)} of RAM is free")  # fmt: skip
    ways = memory["ways_out"]
    assert ways[0].startswith("--quantize 4bit (bitsandbytes): ") and ways[0].endswith(": fits")
    assert f"load one model: --model {models[0]}" in ways[1] and f"load one model: --model {models[1]}" in ways[2]
    assert "--backend openai" in ways[-1]
    text = doctor.render(report)
    assert "  verdict: does not fit: the weights take" in text and "  ways_out:\n    - --quantize 4bit" in text


def test_library_messages_appear_once(capfd: pytest.CaptureFixture[str]) -> None:
    code = (
        "import logging; from vlm_tools.logs import configure, route_library_logs; configure('info'); "
        "route_library_logs(); logging.getLogger('huggingface_hub.utils._http').warning('from the hub client'); "
        "logging.getLogger('transformers.modeling_utils').warning('from transformers')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("from the hub client") == 1 and done.stderr.count("from transformers") == 1
    assert done.stdout == ""


async def test_tool_descriptions_are_plain_paragraphs() -> None:
    from mcp import Client
    from scripted import ScriptedBackend, paligemma_script

    from vlm_tools.server import build_server

    server = build_server(Settings(model=("scripted",)), load_backends=lambda _s: [ScriptedBackend("paligemma",
                                                                                                  paligemma_script)])
    async with Client(server) as client:
        tools = (await client.list_tools()).tools
    assert len(tools) == 5
    for tool in tools:
        texts = [tool.description or ""] + [
            p.get("description", "") for p in tool.input_schema.get("properties", {}).values()
        ]
        for text in texts:
            assert not re.search(r"\n[ \t]", text), (tool.name, text)
            assert "  " not in text, (tool.name, text)
        assert tool.description and not tool.description.endswith(" ")


def test_on_cuda_the_models_are_held_against_the_gpu_they_load_on() -> None:
    """device_map="cuda" puts every model on the first GPU: that one decides; a roomier one is a way out."""
    from vlm_tools.backends.sizing import WeightCount
    from vlm_tools.families import get_family
    from vlm_tools.memory_fit import fits_alone, judge, memory_for, size_model

    settings = Settings(model=DEFAULTS, device="cpu", dtype="float16")  # float16: an older GPU's choice
    counts = [WeightCount(4_850_869_200, 3_633_315_840), WeightCount(3_033_127_152, 2_024_275_968)]
    families = [get_family("molmo2"), get_family("paligemma")]
    sizes = [size_model(m, f, c, settings, "cuda") for m, f, c in zip(DEFAULTS, families, counts, strict=True)]
    assert [s.dtype for s in sizes] == ["float16", "float32"]  # PaliGemma 2 overflows in float16
    assert sizes[1].dtype_note and "float32" in sizes[1].dtype_note
    memory = memory_for("cuda", 500 * 10**9, [("cuda:0 T4", 15 * 10**9), ("cuda:1 A100", 80 * 10**9)])
    assert memory.where == "cuda:0 T4" and fits_alone(sizes[0], memory).startswith("yes (9.7 GB; 15.0 GB")
    report = judge(sizes, memory, settings, quantizable=True)
    assert report["fits"] is False and report["needs_gb"] == 21.8 and report["loads_on"] == "cuda:0 T4"
    assert "another GPU: CUDA_VISIBLE_DEVICES=1 (80.0 GB free there)" in report["ways_out"]
    assert report["ways_out"][0].endswith(": fits") and "--quantize 4bit" in report["ways_out"][0]


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"


def test_the_annotated_image_is_at_most_1024_px_long_and_says_so(tmp_path: Path) -> None:
    from helpers import png_of
    from PIL import Image

    model = ["--model", str(FIXTURES / "paligemma-ui")]
    for (width, height), written, note in (((1280, 720), (1024, 576), True), ((200, 100), (200, 100), False)):
        source = tmp_path / f"shot-{width}.png"
        source.write_bytes(png_of(Image.new("RGB", (width, height), (240, 240, 240))))
        marked = tmp_path / f"marked-{width}.png"
        code, out, err, _ = run(["detect", str(source), "red button", "--annotated", str(marked), *model],
                                no_hub_env(tmp_path / "hf"), tmp_path)  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["image_size"] == {"width": width, "height": height}
        assert Image.open(marked).size == written
        line = f"wrote {marked} at {written[0]}x{written[1]}"
        assert line in err
        assert (f"{line} (the input is 1280x720; coordinates in the JSON are the input's)" in err) is note, err


CLIENT = Path(__file__).resolve().parent.parent / "examples" / "client.py"


def test_the_client_example_prints_usage_and_tool_errors(tmp_path: Path) -> None:
    env = no_hub_env(tmp_path / "hf")
    env["PATH"] = f"{Path(VLM_TOOLS).parent}{os.pathsep}{env.get('PATH', '')}"  # the server it starts is this one

    def client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(CLIENT), *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, check=False)  # fmt: skip

    shown = client("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: examples/client.py [-h] [IMAGE] [DOCUMENT]")
    missing = client("--nope.png")
    assert missing.returncode == 2 and "unrecognized arguments" in missing.stderr
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    fixtures = ["--model", str(FIXTURES / "molmo2-ui"), "--model", str(FIXTURES / "paligemma-ui")]
    done = client(str(broken), "--", *fixtures)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.count("error: invalid_image: ") == 4  # every tool given the image; the PDF still reads
    assert "== read_document\n{" in done.stdout


SERVER_ONLY_FLAGS = ("--transport", "--host", "--port", "--auth-token", "--allow-public-bind", "--allowed-origins",
                     "--allowed-hosts", "--drain-timeout-s")  # fmt: skip


ONE_SHOT = {"describe": ["shot.png"], "ask": ["shot.png", "Why?"], "point": ["shot.png", "the button"],
            "detect": ["shot.png", "button"], "read": ["doc.pdf"], "eval": [], "doctor": [], "pull": []}  # fmt: skip


@pytest.mark.parametrize("command", ONE_SHOT)
def test_one_shot_commands_do_not_offer_server_only_flags(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from vlm_tools.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    shown = capsys.readouterr().out
    assert "--model" in shown
    for flag in SERVER_ONLY_FLAGS:
        assert not re.search(rf"{flag}\b", shown), (command, flag)
    with pytest.raises(SystemExit) as refused:  # and they are refused, not silently ignored
        build_parser().parse_args([command, *ONE_SHOT[command], "--port", "9000"])
    assert refused.value.code == 2 and "unrecognized arguments: --port" in capsys.readouterr().err


def test_serve_offers_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from vlm_tools.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = capsys.readouterr().out
    assert all(re.search(rf"{flag}\b", shown) for flag in (*SERVER_ONLY_FLAGS, "--model", "--allow-path"))


def test_version() -> None:
    done = subprocess.run([VLM_TOOLS, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "vlm-tools 0.1.0"


def image(directory: Path) -> Path:
    from helpers import png_bytes

    path = directory / "shot.png"
    path.write_bytes(png_bytes())
    return path
