"""Greedy means greedy: nothing in a checkpoint's ``generation_config.json`` leaks into the tools' decoding.

Real checkpoints may ship ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, sampling settings…
and ``generate`` fills whatever a call leaves unset from them. The same weights with a hostile generation config
must answer exactly as with a neutral one — and, so that the check has teeth, that config does change what plain
``generate`` says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from helpers import noise_image  # noqa: E402

from vlm_tools.backends.base import Output, Request, Task  # noqa: E402
from vlm_tools.settings import Settings  # noqa: E402

HOSTILE = {
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 2,
    "top_p": 0.5,
    "num_beams": 3,
    "repetition_penalty": 5.0,
    "no_repeat_ngram_size": 1,
    "min_new_tokens": 6,
    "length_penalty": -2.0,
    "max_length": 9,
}


def with_generation_config(source: Path, target: Path, extra: dict[str, object]) -> Path:
    """A copy of ``source`` whose generation_config.json also carries ``extra`` (its token ids stay)."""
    shutil.copytree(source, target)
    path = target / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=2))
    return target


REQUESTS = [
    lambda i: Request(Task.CAPTION, noise_image(48, 40, i), max_new_tokens=12),
    lambda i: Request(Task.ANSWER, noise_image(48, 40, i), text="what is this?", max_new_tokens=12),
    lambda i: Request(Task.POINT, noise_image(48, 40, i), text="the cat", max_new_tokens=12),
]


@pytest.mark.parametrize("family", ["paligemma", "molmo2"])
def test_a_hostile_generation_config_changes_nothing(
    family: str, tiny_paligemma_dir: Path, tiny_molmo2_dir: Path, tmp_path: Path
) -> None:
    from vlm_tools.backends.loading import load_backend

    neutral = tiny_paligemma_dir if family == "paligemma" else tiny_molmo2_dir
    hostile = with_generation_config(neutral, tmp_path / f"hostile-{family}", HOSTILE)
    clean, bent = (load_backend(str(d), Settings(model=(str(d),), device="cpu")) for d in (neutral, hostile))
    requests = [make(i) for make in REQUESTS for i in range(3)]
    expected = clean.run_batch(requests)
    got = bent.run_batch(requests)
    assert all(isinstance(o, Output) for o in expected + got)
    assert [o.raw for o in got] == [o.raw for o in expected]

    # Teeth: loaded as it is, the hostile config bends generate even when greedy decoding is asked for.
    from transformers import AutoModelForImageTextToText

    raw_model = AutoModelForImageTextToText.from_pretrained(hostile).eval()
    assert raw_model.generation_config.repetition_penalty == HOSTILE["repetition_penalty"]
    inputs = clean.reference_inputs(requests, [clean.family.prompt(r) for r in requests])
    greedy = {"do_sample": False, "num_beams": 1, "max_new_tokens": 12, "pad_token_id": clean.pad_token_id}
    with torch.inference_mode():
        bent_tokens = raw_model.generate(**inputs, **greedy)
        straight_tokens = clean.model.generate(**inputs, **greedy)
    assert not torch.equal(bent_tokens, straight_tokens)
    clean.close()
    bent.close()
