"""The Molmo 0924 backend: plain refusals when its remote code cannot run, and its one-request plumbing.

Loading is tested on directories whose config says ``model_type: molmo`` (the released checkpoints' code is not
available offline, and on transformers 5.x it would not run). The generation plumbing is tested with a scripted
stand-in for the remote model that speaks the model card's API (``processor.process`` and
``model.generate_from_batch``) and records what it was given.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from vlm_tools.backends.base import Output, Request, Task
from vlm_tools.backends.family import get_family
from vlm_tools.backends.molmo_local import UNSUPPORTED_MESSAGE, MolmoBackend
from vlm_tools.errors import Cancelled, ConfigurationError, UnsupportedByModel
from vlm_tools.geometry import NormPoint
from vlm_tools.settings import Settings

torch = pytest.importorskip("torch")


def molmo_dir(root: Path, auto_map: dict[str, str] | None) -> Path:
    """A directory that declares a Molmo 0924 checkpoint but holds none of its code or weights."""
    root.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"model_type": "molmo", "architectures": ["MolmoForCausalLM"]}
    if auto_map is not None:
        config["auto_map"] = auto_map
    (root / "config.json").write_text(json.dumps(config))
    return root


REMOTE_AUTO_MAP = {
    "AutoConfig": "config_molmo.MolmoConfig",
    "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM",
    "AutoProcessor": "preprocessing_molmo.MolmoProcessor",
}


@pytest.mark.parametrize(
    ("trust_remote_code", "auto_map"),
    [(False, REMOTE_AUTO_MAP), (True, None), (True, REMOTE_AUTO_MAP)],
    ids=["without-trust-remote-code", "trusted-but-no-auto-map", "trusted-but-code-files-missing"],
)
def test_load_fails_with_the_plain_message(tmp_path: Path, trust_remote_code: bool, auto_map: dict | None) -> None:
    directory = str(molmo_dir(tmp_path / "molmo", auto_map))
    settings = Settings(model=(directory,), device="cpu", trust_remote_code=trust_remote_code)
    with pytest.raises(ConfigurationError) as raised:
        MolmoBackend.load(directory, settings)
    assert raised.value.message.startswith(UNSUPPORTED_MESSAGE)
    assert str(raised.value).startswith("configuration_error: Molmo (0924) checkpoints")


@pytest.mark.parametrize("trust_remote_code", [False, True], ids=["untrusted", "trusted"])
def test_load_backend_dispatches_molmo_and_fails_cleanly(tmp_path: Path, trust_remote_code: bool) -> None:
    from vlm_tools.backends.loading import load_backend

    directory = str(molmo_dir(tmp_path / "molmo", REMOTE_AUTO_MAP))
    settings = Settings(model=(directory,), device="cpu", trust_remote_code=trust_remote_code)
    with pytest.raises(ConfigurationError, match="(?i)vllm"):
        load_backend(directory, settings)


# --- generation plumbing, against a scripted stand-in for the remote code ---------------------------------


PIECES = {0: "<|endoftext|>", 1: '<point x="50.0" y="25.0" alt="cat">', 2: "cat", 3: "</point>", 4: " more"}


class ScriptedTokenizer:
    eos_token_id = 0

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        pieces = [PIECES[int(i)] for i in ids]
        return "".join(p for p in pieces if not (skip_special_tokens and p == "<|endoftext|>"))


class ScriptedProcessor:
    """``process()`` as the Molmo card uses it: one unbatched example per call."""

    def __init__(self) -> None:
        self.tokenizer = ScriptedTokenizer()
        self.calls: list[tuple[list[Image.Image], str]] = []

    def process(self, images: list[Image.Image], text: str) -> dict[str, Any]:
        self.calls.append((images, text))
        return {
            "input_ids": torch.tensor([7, 8, 9]),
            "images": torch.zeros(2, 4, 6),
            "image_input_idx": torch.zeros(2, 4, dtype=torch.long),
            "image_masks": torch.ones(2, 4),
        }


class ScriptedRemoteModel:
    """Emits ``script`` one token per step, consulting the stopping criteria like ``generate`` does."""

    dtype = torch.float32

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.configs: list[Any] = []

    def generate_from_batch(self, batch: dict, generation_config: Any, tokenizer: Any, stopping_criteria: Any):
        self.configs.append(generation_config)
        ids = batch["input_ids"]
        assert ids.shape[0] == 1 and batch["images"].shape[0] == 1  # a batch of one, as the card builds it
        for token in self.script[: generation_config.max_new_tokens]:
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if bool(stopping_criteria(ids, None).all()):
                break
        return ids


def scripted_backend(script: list[int]) -> MolmoBackend:
    return MolmoBackend("scripted-molmo", ScriptedRemoteModel(script), ScriptedProcessor(), "cpu", get_family("molmo"))


def test_points_come_back_parsed() -> None:
    backend = scripted_backend([1, 2, 3, 0, 4])
    image = Image.new("RGB", (200, 100))
    (outcome,) = backend.run_batch([Request(task=Task.POINT, image=image, text="cat", max_new_tokens=50)])
    assert isinstance(outcome, Output)
    assert outcome.raw == '<point x="50.0" y="25.0" alt="cat">cat</point>'
    assert outcome.points == [NormPoint(0.5, 0.25, "cat")]
    assert backend.processor.calls == [([image], "Point to the cat.")]
    config = backend.model.configs[0]
    assert config.max_new_tokens == 50 and config.stop_strings == "<|endoftext|>"
    assert backend.max_batch_size == 1 and Task.DETECT not in backend.supported


def test_max_new_tokens_cuts_the_answer() -> None:
    backend = scripted_backend([4] * 20)
    (outcome,) = backend.run_batch([Request(task=Task.CAPTION, image=Image.new("RGB", (8, 8)), max_new_tokens=3)])
    assert outcome.raw == " more" * 3


class CancelAfter(threading.Event):
    """Reports itself set from its ``checks``-th ``is_set()`` call on: a cancel mid-generation."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.remaining = checks

    def is_set(self) -> bool:
        self.remaining -= 1
        return self.remaining < 0 or super().is_set()


@pytest.mark.parametrize(
    ("cancel", "processed"),
    [(CancelAfter(2), True), ("set", False)],
    ids=["while-generating", "before-starting"],
)
def test_cancelled_request(cancel: Any, processed: bool) -> None:
    backend = scripted_backend([4] * 20)
    request = Request(task=Task.CAPTION, image=Image.new("RGB", (8, 8)), max_new_tokens=20)
    if cancel == "set":
        request.cancel.set()
    else:
        request.cancel = cancel
    (outcome,) = backend.run_batch([request])
    assert isinstance(outcome, Cancelled)
    assert bool(backend.processor.calls) is processed


def test_unsupported_task_fails_alone_without_running() -> None:
    backend = scripted_backend([2, 0])
    outcomes = backend.run_batch(
        [
            Request(task=Task.DETECT, image=Image.new("RGB", (8, 8)), labels=("cat",)),
            Request(task=Task.ANSWER, image=Image.new("RGB", (8, 8)), text="What?", max_new_tokens=5),
        ]
    )
    assert isinstance(outcomes[0], UnsupportedByModel)
    assert isinstance(outcomes[1], Output) and outcomes[1].raw == "cat"
    assert len(backend.processor.calls) == 1


# --- the real model -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and the allenai/Molmo-7B-D-0924 weights")
def test_real_molmo_loads_and_points_or_refuses_plainly() -> None:
    """On transformers 5.x the remote code is expected to fail: then the refusal must be the plain one."""
    model = "allenai/Molmo-7B-D-0924"
    settings = Settings(model=(model,), device="cuda", trust_remote_code=True)
    try:
        backend = MolmoBackend.load(model, settings)
    except ConfigurationError as error:
        assert error.message.startswith(UNSUPPORTED_MESSAGE)
        return
    try:
        image = Image.new("RGB", (640, 480), "white")
        ImageDraw.Draw(image).ellipse((430, 70, 530, 170), fill="red")
        request = Request(task=Task.POINT, image=image, text="the red circle", max_new_tokens=64)
        (outcome,) = backend.run_batch([request])
        assert isinstance(outcome, Output) and outcome.points, outcome
        nearest = min(outcome.points, key=lambda p: (p.x - 0.75) ** 2 + (p.y - 0.25) ** 2)
        assert abs(nearest.x - 0.75) < 0.06 and abs(nearest.y - 0.25) < 0.06, outcome.raw
    finally:
        backend.close()
