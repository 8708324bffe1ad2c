"""4-bit (NF4) and 8-bit (LLM.int8) through bitsandbytes on this CPU: both trained fixtures load quantised, take
less memory, and still ground — the accuracy suite's targets, through the real tools.

bitsandbytes quantises on x86-64 CPUs from 0.47; the test extra installs it, so these run in CI (not skipped).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
from pathlib import Path

import pytest

from vlm_tools.evaluation import run_eval
from vlm_tools.settings import Settings

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="bitsandbytes quantises on x86-64 CPUs (and CUDA)"
)

FIXTURES = Path(__file__).parent / "fixtures" / "models"
MOLMO2, PALIGEMMA = FIXTURES / "molmo2-ui", FIXTURES / "paligemma-ui"


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_the_fixtures_meet_the_accuracy_targets_quantised(tmp_path: Path, quantize: str) -> None:
    pytest.importorskip("bitsandbytes")
    settings = Settings(model=(str(MOLMO2), str(PALIGEMMA)), device="cpu", quantize=quantize,
                        allow_path=(tmp_path,), log_level="warning")  # fmt: skip
    out, printed = tmp_path / "report.json", io.StringIO()
    args = argparse.Namespace(seed=1234, count=10, sizes="1280x720,600x900,1000x1000", out=str(out),
                              min_inside=0.95, min_iou=0.7)  # fmt: skip
    code = run_eval(settings, args, stdout=printed)
    table = printed.getvalue()
    assert code == 0, table
    for size in json.loads(out.read_text())["sizes"]:
        assert size["point"]["inside"] >= 0.95 and size["detect"]["mean_iou"] >= 0.7, table
        assert size["point"]["errors"] == size["detect"]["errors"] == 0


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantised_weights_take_less_memory(quantize: str) -> None:
    pytest.importorskip("bitsandbytes")
    from vlm_tools.backends.loading import load_backend

    def footprint(setting: str) -> int:
        backend = load_backend(str(PALIGEMMA), Settings(model=(str(PALIGEMMA),), device="cpu", quantize=setting),
                               local_files_only=True)  # fmt: skip
        try:
            return int(backend.model.get_memory_footprint())
        finally:
            backend.close()

    full, quantised = footprint("none"), footprint(quantize)
    assert quantised < 0.6 * full, (full, quantised)


def test_an_eight_bit_warning_repeated_on_every_product_is_said_once(capfd: pytest.CaptureFixture[str]) -> None:
    from vlm_tools.logs import configure

    configure("info")
    try:
        noisy = logging.getLogger("bitsandbytes.autograd._functions")
        for _ in range(50):
            noisy.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        logging.getLogger("vlm_tools.test").warning("said twice")
        logging.getLogger("vlm_tools.test").warning("said twice")
        err = capfd.readouterr().err
    finally:
        configure("warning")
    assert err.count("MatMul8bitLt") == 1 and err.count("said twice") == 2
