"""``vlm-tools pull``: says how much it will download, downloads into the Hugging Face cache, and the model then
serves offline. Against a hub in a thread (``fake_hub.py``) speaking the endpoints huggingface_hub uses, so the
HTTP, the headers and the cache layout are the real ones; without a hub it stops in seconds with the advice
``serve`` gives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub, FakeRepo, serve_hub
from test_doorstep import DEFAULTS, VLM_TOOLS, image, no_hub_env, run

from vlm_tools.pull import human_bytes

REPO_ID = "acme/tiny-paligemma"
DUPLICATES = {"pytorch_model.bin": b"\0" * 4096, "original/params.json": b"{}", "README.md": b"# tiny\n"}
"""Files a real repository carries beside what from_pretrained reads: never downloaded."""


def hub_env(home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """A process environment with an empty Hugging Face home and ``endpoint`` as the hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLM_TOOLS_"))}
    env.update({"HF_HOME": str(home), "HF_ENDPOINT": endpoint, "OMP_NUM_THREADS": "1", **extra})
    return env


def snapshot(home: Path, repo: FakeRepo, repo_id: str = REPO_ID) -> Path:
    return home / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / repo.commit


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_without_the_hub_pull_stops_in_seconds_with_the_advice(tmp_path: Path, offline: bool) -> None:
    env = no_hub_env(tmp_path / "hf")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    code, out, err, seconds = run(["pull"], env, tmp_path)
    assert code == 2 and out == "", (out, err)
    assert seconds < 20, f"took {seconds:.1f} s"
    assert "Traceback" not in err and err.startswith("vlm-tools: model_unavailable: ")
    for model in DEFAULTS:
        assert err.count(f"{model} is not in the local cache") == 1, err
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in err
    assert "--model tests/fixtures/models/molmo2-ui --model tests/fixtures/models/paligemma-ui" in err


def test_pull_downloads_what_the_model_needs_once_and_it_then_serves_offline(
    tmp_path: Path, tiny_paligemma_dir: Path
) -> None:
    repo = FakeRepo.from_directory(tiny_paligemma_dir, extra=DUPLICATES)
    needed = {name: data for name, data in repo.files.items() if name not in DUPLICATES}
    size = sum(len(data) for data in needed.values())
    hub = FakeHub({REPO_ID: repo})
    home = tmp_path / "hf"
    with serve_hub(hub) as url:
        code, out, err, _ = run(["pull", REPO_ID], hub_env(home, url), tmp_path)
        assert code == 0, err
        assert f"will download {human_bytes(size)} ({size} bytes, {len(needed)} files)" in out, out
        assert f"{REPO_ID}: pulled {human_bytes(size)}; commit {repo.commit}" in out
        assert f"{REPO_ID}: {human_bytes(size)} of {human_bytes(size)} (100 %)" in err  # progress on stderr
        assert "Traceback" not in err
        assert sorted(hub.file_requests("GET")) == sorted(needed)  # nothing else fetched, nothing twice
        files = snapshot(home, repo)
        assert {str(p.relative_to(files)) for p in files.rglob("*") if p.is_file()} == set(needed)
        assert all((files / name).read_bytes() == data for name, data in needed.items())

        fetched = len(hub.file_requests("GET"))
        code, out, err, _ = run(["pull", REPO_ID], hub_env(home, url), tmp_path)
        assert code == 0, err
        assert "will download 0 bytes: every file is in the cache" in out and "already in the cache" in out
        assert len(hub.file_requests("GET")) == fetched

    # The hub is gone: the pulled model serves from the cache alone.
    env = hub_env(home, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    code, out, err, _ = run(["describe", str(image(tmp_path)), "--model", REPO_ID, "--max-new-tokens", "4"], env,
                            tmp_path)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["model"] == REPO_ID


def test_a_pull_stopped_mid_file_goes_on_from_the_files_it_finished(tmp_path: Path, tiny_paligemma_dir: Path) -> None:
    """Ctrl-C half-way through the weights: the small files it finished stay; the next pull fetches the rest."""
    repo = FakeRepo.from_directory(tiny_paligemma_dir)
    weights = len(repo.files["model.safetensors"])
    hub = FakeHub({REPO_ID: repo}, hold={"model.safetensors": threading.Event()})
    home = tmp_path / "hf"
    with serve_hub(hub) as url:
        process = subprocess.Popen([VLM_TOOLS, "pull", REPO_ID], env=hub_env(home, url), cwd=tmp_path,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)  # fmt: skip
        try:
            assert hub.held.wait(60), "the pull never reached the weights"
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
        finally:
            process.kill()
        assert process.returncode == 130 and "Traceback" not in err, err
        hub.hold.clear()
        finished = set(hub.file_requests("GET")) - {"model.safetensors"}
        assert finished == set(repo.files) - {"model.safetensors"}  # smallest first: only the weights were left
        assert not list(home.rglob("*.incomplete"))  # no half-written file left to be mistaken for the weights

        fetched = len(hub.file_requests("GET"))
        code, out, err, _ = run(["pull", REPO_ID], hub_env(home, url), tmp_path)
        assert code == 0, err
        assert f"will download {human_bytes(weights)} ({weights} bytes, 1 file)" in out, out
        assert hub.file_requests("GET")[fetched:] == ["model.safetensors"]
        assert (snapshot(home, repo) / "model.safetensors").read_bytes() == repo.files["model.safetensors"]


def test_pull_says_what_to_do_when_the_hub_refuses(tmp_path: Path, tiny_paligemma_dir: Path) -> None:
    gated = FakeRepo.from_directory(tiny_paligemma_dir, gated=True)
    hub = FakeHub({"acme/tiny-gated": gated})
    home = tmp_path / "hf"
    with serve_hub(hub) as url:
        code, out, err, _ = run(["pull", "acme/tiny-gated", "acme/missing", "acme/tiny-gated@v9"], hub_env(home, url),
                                tmp_path)  # fmt: skip
        assert code == 2 and "Traceback" not in err, err
        assert "acme/tiny-gated is a gated model" in err and "https://huggingface.co/acme/tiny-gated" in err
        assert "set HF_TOKEN" in err
        assert "acme/missing was not found on the Hugging Face hub" in err
        assert "the hub has no revision 'v9' of acme/tiny-gated" in err
        assert hub.file_requests("GET") == []  # refused on its first (smallest) file: nothing big was fetched

        # With a token (read from HF_TOKEN by huggingface_hub) and a pinned commit, the same model pulls.
        pinned = f"acme/tiny-gated@{gated.commit}"
        code, out, err, _ = run(["pull", pinned], hub_env(home, url, HF_TOKEN="hf_test"), tmp_path)
        assert code == 0, err
        assert f"acme/tiny-gated@{gated.commit} (commit {gated.commit[:7]})" in out
    assert (snapshot(home, gated, "acme/tiny-gated") / "model.safetensors").is_file()


def test_pull_refuses_a_name_that_is_neither_a_directory_nor_a_hub_id(tmp_path: Path) -> None:
    code, out, err, _ = run(["pull", "acme/bad name"], no_hub_env(tmp_path / "hf"), tmp_path)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("vlm-tools: configuration_error: --model 'acme/bad name' is neither a local directory nor a "
                          "hub id (org/name)")  # fmt: skip


def test_pull_of_a_local_directory_has_nothing_to_do(tmp_path: Path, tiny_paligemma_dir: Path) -> None:
    started = time.monotonic()
    code, out, err, _ = run(["pull", str(tiny_paligemma_dir)], no_hub_env(tmp_path / "hf"), tmp_path)
    assert code == 0, err
    assert out.strip() == f"{tiny_paligemma_dir}: a local directory; nothing to pull"
    assert time.monotonic() - started < 60
