"""Loading models: the family comes from the config, unavailable models are skipped with a way to fix them.

Nothing here touches the network: hub ids are looked up with the hub in offline mode.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from vlm_tools.backends import generation, placement  # noqa: E402
from vlm_tools.backends.hub import model_unavailable  # noqa: E402
from vlm_tools.backends.loading import load_backend, prepare_models, read_family  # noqa: E402
from vlm_tools.errors import ConfigurationError, ModelUnavailable  # noqa: E402
from vlm_tools.settings import Settings  # noqa: E402


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hub offline with an empty cache: a hub id resolves only from the (empty) local cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import; patch the live value too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def config_dir(root: Path, name: str, config: dict) -> Path:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


# --- read_family ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "family"),
    [
        pytest.param("paligemma", "paligemma", id="paligemma"),
        pytest.param("molmo2", "molmo2", id="molmo2"),
        pytest.param("molmo", "molmo", id="molmo-0924-remote-code"),
    ],
)
def test_family_is_read_from_the_config(tmp_path: Path, model_type: str, family: str) -> None:
    # The directory name says "llama": the family must come from config.json, not the name.
    path = config_dir(tmp_path, "llama-lookalike", {"model_type": model_type, "auto_map": {"AutoConfig": "x.Y"}})
    assert read_family(str(path)).name == family


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        pytest.param({"model_type": "llama"}, "'llama'", id="unsupported-type"),
        pytest.param({"hidden_size": 8}, "(none)", id="no-model-type"),
        pytest.param({"model_type": "custom", "auto_map": {"AutoConfig": "m.C"}}, "its repository", id="remote-code"),
    ],
)
def test_unsupported_family_names_the_supported_ones(tmp_path: Path, config: dict, needle: str) -> None:
    path = config_dir(tmp_path, "model", config)
    with pytest.raises(ConfigurationError) as caught:
        read_family(str(path))
    assert not isinstance(caught.value, ModelUnavailable)
    assert needle in caught.value.message
    assert "molmo, molmo2, paligemma" in caught.value.message


@pytest.mark.parametrize(
    ("make_model", "needle"),
    [
        pytest.param(lambda root: str(root / "missing"), "is not a directory", id="missing-local-dir"),
        pytest.param(lambda root: str(root), "no config.json", id="dir-without-config"),
        pytest.param(lambda root: "no-such-org/no-such-model-3b", "HF_HUB_OFFLINE is set", id="unknown-hub-id-offline"),
        pytest.param(
            lambda root: "google/paligemma2-3b-mix-448", "--model with a local directory", id="uncached-hub-id"
        ),
    ],
)
def test_unavailable_models_say_how_to_fix_it(tmp_path: Path, offline_hub: None, make_model, needle: str) -> None:
    model = make_model(tmp_path)
    with pytest.raises(ModelUnavailable) as caught:
        read_family(model)
    assert needle in caught.value.message
    assert caught.value.message.startswith(model)


def _hub_error(kind: str) -> OSError:
    """A transformers-style OSError wrapping the huggingface_hub error it came from."""
    import httpx
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = httpx.Response(401 if kind == "gated" else 404, request=httpx.Request("GET", "https://huggingface.co"))
    cause = (GatedRepoError if kind == "gated" else RepositoryNotFoundError)("denied", response=response)
    try:
        raise OSError("You are trying to access a repo, see above") from cause
    except OSError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("model", "kind", "needles"),
    [
        pytest.param(
            "google/paligemma2-3b-mix-448",
            "gated",
            ("accept the licence at https://huggingface.co/google/paligemma2-3b-mix-448", "HF_TOKEN", "--model"),
            id="gated-paligemma",
        ),
        pytest.param(
            "acme/gated-thing", "gated", ("https://huggingface.co/acme/gated-thing", "HF_TOKEN"), id="gated-other"
        ),
        pytest.param("acme/typo", "missing", ("not found", "check the id"), id="repository-not-found"),
    ],
)
def test_hub_errors_become_actionable_messages(model: str, kind: str, needles: tuple[str, ...]) -> None:
    error = model_unavailable(model, _hub_error(kind))
    assert isinstance(error, ModelUnavailable) and isinstance(error, ConfigurationError)
    for needle in needles:
        assert needle in error.message


def test_gated_config_fetch_is_reported_as_gated(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def gated(*args, **kwargs):
        raise _hub_error("gated")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ModelUnavailable, match="gated model"):
        read_family("google/paligemma2-3b-mix-448")


# --- load_backend / prepare_models -------------------------------------------------------------------------


def test_molmo_0924_is_sent_to_vllm(tmp_path: Path) -> None:
    path = str(config_dir(tmp_path, "molmo", {"model_type": "molmo"}))
    with pytest.raises(ConfigurationError, match="--backend openai") as caught:
        load_backend(path, Settings(model=(path,), device="cpu"))
    assert "vLLM (--trust-remote-code)" in caught.value.message


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantize_is_refused_where_bitsandbytes_cannot_run(
    tiny_paligemma_dir: Path, quantize: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    model = str(tiny_paligemma_dir)
    with pytest.raises(ConfigurationError, match=f"--quantize {quantize} cannot run here: .*x86-64 CPUs, not aarch64"):
        load_backend(model, Settings(model=(model,), device="cpu", quantize=quantize))


@pytest.mark.parametrize("tiny", ["tiny_paligemma_dir", "tiny_molmo2_dir"])
def test_4bit_keeps_the_vision_tower_and_projector_in_the_compute_dtype(
    tiny: str, request: pytest.FixtureRequest
) -> None:
    """Only the language model's linear layers are quantised (bitsandbytes runs on x86-64 CPUs)."""
    if placement.quantization_support("cpu") is not None:
        pytest.skip(placement.quantization_support("cpu"))
    model = str(request.getfixturevalue(tiny))
    backend = load_backend(model, Settings(model=(model,), device="cpu", quantize="4bit"))
    try:
        kinds = {name: type(module).__name__ for name, module in backend.model.named_modules()
                 if isinstance(module, torch.nn.Linear)}  # fmt: skip
    finally:
        backend.close()
    kept = {n: k for n, k in kinds.items() if n.startswith(("model.vision_tower", "model.multi_modal_projector"))}
    assert kept and set(kept.values()) == {"Linear"}, kept
    assert kinds["lm_head"] == "Linear"
    assert {k for n, k in kinds.items() if n.startswith("model.language_model.")} == {"Linear4bit"}


def test_one_unavailable_model_is_skipped_with_a_hint(
    tiny_paligemma_dir: Path, offline_hub: None, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    good = str(tiny_paligemma_dir)
    settings = Settings(model=("acme/paligemma-private", good), device="cpu")
    with caplog.at_level(logging.WARNING, logger="vlm_tools.backends.loading"):
        backends = prepare_models(settings)
    assert [b.name for b in backends] == [good]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = record.getMessage()
    assert "skipping acme/paligemma-private" in text
    assert "detect" in text and "--model with a local directory" in text
    # Loading prints nothing on stdout: on the stdio transport stdout is the protocol.
    assert capfd.readouterr().out == ""


def test_no_model_loads_is_a_configuration_error(tmp_path: Path, offline_hub: None) -> None:
    settings = Settings(model=(str(tmp_path / "gone"), "acme/nothing-here"), device="cpu")
    with pytest.raises(ConfigurationError, match="no model could be loaded") as caught:
        prepare_models(settings)
    assert "gone is not a directory" in caught.value.message
    assert "acme/nothing-here" in caught.value.message


def test_a_configuration_mistake_is_not_skipped(tmp_path: Path, tiny_paligemma_dir: Path) -> None:
    unsupported = str(config_dir(tmp_path, "bert", {"model_type": "bert"}))
    with pytest.raises(ConfigurationError, match="'bert'"):
        prepare_models(Settings(model=(str(tiny_paligemma_dir), unsupported), device="cpu"))


def test_preparing_the_models_imports_neither_torch_nor_transformers(tiny_paligemma_dir: Path) -> None:
    # Before the transport starts, only configs are read: the handshake must not wait for the heavy imports.
    code = (
        "import sys; from vlm_tools.backends.loading import prepare_models; from vlm_tools.settings import Settings; "
        f"models = prepare_models(Settings(model=({str(tiny_paligemma_dir)!r},))); "
        "assert [m.family.name for m in models] == ['paligemma'] and models[0].state == 'unloaded'; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- placement and generation helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        pytest.param("cpu", "cpu", id="explicit-cpu"),
        pytest.param("auto", "cuda" if torch.cuda.is_available() else None, id="auto"),
    ],
)
def test_resolve_device(setting: str, expected: str | None) -> None:
    got = placement.resolve_device(setting)
    assert got == expected if expected else got in ("mps", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_a_missing_cuda_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no CUDA GPU"):
        placement.resolve_device("cuda")


@pytest.mark.parametrize(
    ("setting", "device", "bf16_gpu", "dtype"),
    [
        pytest.param("auto", "cuda", True, torch.bfloat16, id="auto-cuda-bf16-capable"),
        pytest.param("auto", "cuda", False, torch.float16, id="auto-cuda-older-gpu-fp16"),
        pytest.param("auto", "cpu", False, torch.float32, id="auto-cpu-fp32"),
        pytest.param("auto", "mps", False, torch.float32, id="auto-mps-fp32"),
        pytest.param("float16", "cpu", False, torch.float16, id="explicit-fp16"),
        pytest.param("bfloat16", "cuda", False, torch.bfloat16, id="explicit-bf16-wins"),
    ],
)
def test_resolve_dtype(
    monkeypatch: pytest.MonkeyPatch, setting: str, device: str, bf16_gpu: bool, dtype: torch.dtype
) -> None:
    # The GPU's own answer, as torch gives it (T4 and V100 say no; A100, H100, L4 say yes).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_gpu)
    assert placement.resolve_dtype(setting, device) is dtype


def test_missing_bitsandbytes_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ConfigurationError, match=r"pip install 'vlm-tools\[quantize\]'"):
        placement.quantization_config("4bit", "cuda", torch.bfloat16, ())


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        pytest.param(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), True, id="cuda-oom"),
        pytest.param(RuntimeError("MPS backend out of memory"), True, id="runtime-oom"),
        pytest.param(RuntimeError("shape mismatch"), False, id="other-runtime-error"),
        pytest.param(ValueError("out of memory"), False, id="not-a-runtime-error"),
    ],
)
def test_is_oom(error: BaseException, oom: bool) -> None:
    assert placement.is_oom(error) is oom


STOP_CASES = [
    # (last tokens per row over the steps, limits, cancel-at-step per row or None, eos) → done, cancelled
    pytest.param([[5, 6]], [1, 5], [None, None], (), [True, False], [False, False], id="row-limit-reached"),
    pytest.param([[1, 6]], [5, 5], [None, None], (1,), [True, False], [False, False], id="eos-finishes-a-row"),
    pytest.param([[5, 6], [7, 8]], [5, 5], [None, 2], (), [False, True], [False, True], id="cancel-mid-run"),
    pytest.param(
        [[1, 6], [0, 8]], [5, 5], [2, None], (1,), [True, False], [False, False], id="cancel-after-eos-ignored"
    ),
    pytest.param([[5, 6]], [1, 5], [1, None], (), [True, False], [False, False], id="limit-wins-over-late-cancel"),
]


@pytest.mark.parametrize(("steps", "limits", "cancel_at", "eos", "done", "cancelled"), STOP_CASES)
def test_row_stopping(steps, limits, cancel_at, eos, done, cancelled) -> None:
    prompt = 3
    events = [threading.Event() for _ in limits]
    stopping = generation.RowStopping(prompt, limits, events, eos)
    sequence = torch.zeros((len(limits), prompt), dtype=torch.long)
    result = None
    for step, last in enumerate(steps, start=1):
        for row, at in enumerate(cancel_at):
            if at == step:
                events[row].set()
        sequence = torch.cat([sequence, torch.tensor(last).unsqueeze(1)], dim=1)
        result = stopping(sequence, None)
    assert result.tolist() == done
    assert stopping.cancelled == cancelled


@pytest.mark.parametrize(
    ("tokens", "limit", "expected"),
    [
        pytest.param([4, 5, 6, 7], 2, [4, 5], id="cut-at-limit"),
        pytest.param([4, 1, 0, 0], 4, [4], id="cut-at-eos-drops-padding"),
        pytest.param([1, 5], 4, [], id="eos-first"),
        pytest.param([4, 5, 1], 2, [4, 5], id="limit-before-eos"),
    ],
)
def test_cut_row(tokens: list[int], limit: int, expected: list[int]) -> None:
    assert generation.cut_row(tokens, limit, {1}) == expected
