"""The GPU benchmark (``benchmarks/bench_gpu.py``) runs: on the CPU with its layers cut down, and on CUDA in full.

The CPU run proves only that the script works end to end — random models at the published widths, the real
processors and the server's backends — and that each number it reports is a number; its timings mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from helpers import require_for_gpu_test  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def check_report(report: dict, families: set[str], precisions: set[str], batches: list[int]) -> None:
    assert {(f["family"], f["precision"]) for f in report["families"]} == {(f, p) for f in families for p in precisions}
    assert report["bandwidth_gb_s"] > 0
    for family in report["families"]:
        assert family["weights_gb"] > family["decode_bytes_gb"] > 0
        assert [row["batch"] for row in family["rows"]] == batches
        for row in family["rows"]:
            assert 0 < row["first_token_s"] < row["latency_s"]
            assert row["decode_ms_per_token"] > 0 and row["floor_ms_per_token"] > 0
            assert math.isclose(row["of_floor"], row["decode_ms_per_token"] / row["floor_ms_per_token"], rel_tol=0.02)


@pytest.mark.timeout(600)
def test_the_gpu_benchmark_runs_on_the_cpu_with_its_layers_cut(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--cut-layers", "1", "--precision", "float32", "--batch", "1",
            "--new-tokens", "3", "--task", "point", "--repeat", "1", "--out", str(out)]  # fmt: skip
    assert bench_gpu().main(argv) == 0
    report = json.loads(out.read_text())
    check_report(report, {"molmo2", "paligemma"}, {"float32"}, [1])
    # The published widths are kept: a cut Molmo2-4B still has its 151,936 × 2,560 output embedding (float32).
    molmo2 = next(f for f in report["families"] if f["family"] == "molmo2")
    assert molmo2["decode_bytes_gb"] > 151_936 * 2_560 * 4 / 1e9
    table = capsys.readouterr().out
    assert "molmo2" in table and "paligemma" in table and "ms/token" in table


@pytest.mark.gpu
@pytest.mark.timeout(1800)
def test_the_gpu_benchmark_runs_on_cuda_in_every_precision(tmp_path: Path) -> None:
    require_for_gpu_test(importlib.util.find_spec("bitsandbytes") is not None,
                         "bitsandbytes for the 4- and 8-bit rows (pip install 'vlm-tools[quantize]')")  # fmt: skip
    out = tmp_path / "bench.json"
    argv = ["--device", "cuda", "--cut-layers", "4", "--batch", "1", "8", "--new-tokens", "8", "--task", "point",
            "--repeat", "1", "--out", str(out)]  # fmt: skip
    assert bench_gpu().main(argv) == 0
    from vlm_tools.backends.placement import resolve_dtype

    native = str(resolve_dtype("auto", "cuda")).removeprefix("torch.")  # bfloat16, or float16 on an older GPU
    check_report(json.loads(out.read_text()), {"molmo2", "paligemma"}, {native, "4bit", "8bit"}, [1, 8])
