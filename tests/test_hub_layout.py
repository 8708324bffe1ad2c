"""Every checkpoint the project builds or ships, held against the files the hub really publishes.

The tiny random models (``vlm_tools.testing.tiny_*``) and the trained fixtures in ``tests/fixtures/models/`` must
be shaped like ``allenai/Molmo2-4B`` and ``google/paligemma2-3b-mix-448``: the same files, the same config keys and
nesting, the same token roles in the same order, tensors under the hub's names. Servers such as vLLM refuse
anything else. The published files are in ``vlm_tools/testing/hub/`` (its README says where each comes from).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")  # Molmo2's image processor exists only as a torchvision backend

from vlm_tools.testing.published import published_json, published_text  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "models"
MOLMO2 = "molmo2-4b"
PALIGEMMA = "paligemma2-3b-mix-448"

MOLMO2_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "vocab.json", "merges.txt",
}  # fmt: skip
"""Molmo2-4B's files that loaders read (the hub also has the repository's code, its README and the weights in
shards; ``special_tokens_map.json`` / ``added_tokens.json`` repeat ``tokenizer_config.json``)."""
PALIGEMMA_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
}  # fmt: skip
"""paligemma2-3b-mix-448's files (no chat template, no processor_config.json; weights in shards on the hub)."""
TRAINED_EXTRAS = {"MODEL_CARD.md", "training_log.json"}

# Tensor names of the hub checkpoints. Molmo2: the repository code's module tree (``modeling_molmo2.py``:
# ``model.transformer`` / ``model.vision_backbone`` / ``lm_head``; fused q|k|v ``att_proj``, ``wte.embedding`` +
# ``wte.new_embedding``). PaliGemma 2: transformers' ``convert_paligemma2_weights_to_hf.py``, which wrote the hub
# checkpoints (SigLIP under ``vision_tower.vision_model``, tied output head, so no ``lm_head``).
MOLMO2_TENSORS = [
    r"lm_head\.weight",
    r"model\.transformer\.wte\.(embedding|new_embedding)",
    (
        r"model\.transformer\.blocks\.\d+\.(self_attn\.(att_proj|attn_out|q_norm|k_norm)|attn_norm"
        r"|mlp\.(ff_proj|ff_out)|ff_norm)\.weight"
    ),
    r"model\.transformer\.ln_f\.weight",
    r"model\.vision_backbone\.image_vit\.(positional_embedding|patch_embedding\.(weight|bias))",
    (
        r"model\.vision_backbone\.image_vit\.transformer\.resblocks\.\d+\.(attention\.w[qkvo]|feed_forward\.w[12]"
        r"|attention_norm|ffn_norm)\.(weight|bias)"
    ),
    r"model\.vision_backbone\.image_pooling_2d\.w[qkvo]\.(weight|bias)",
    r"model\.vision_backbone\.image_projector\.w[123]\.weight",
]
PALIGEMMA_TENSORS = [
    r"vision_tower\.vision_model\.embeddings\.(patch_embedding\.(weight|bias)|position_embedding\.weight)",
    (
        r"vision_tower\.vision_model\.encoder\.layers\.\d+\.(layer_norm[12]|mlp\.fc[12]|self_attn\.(q|k|v|out)_proj)"
        r"\.(weight|bias)"
    ),
    r"vision_tower\.vision_model\.post_layernorm\.(weight|bias)",
    r"multi_modal_projector\.linear\.(weight|bias)",
    r"language_model\.model\.embed_tokens\.weight",
    (
        r"language_model\.model\.layers\.\d+\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
        r"|post_feedforward_layernorm|mlp\.(gate|up|down)_proj|self_attn\.(q|k|v|o)_proj)\.weight"
    ),
    r"language_model\.model\.norm\.weight",
]
PALIGEMMA_EXTRA_KEYS = {"text_config.num_attention_heads", "text_config.head_dim"}
"""Keys the tiny PaliGemma writes and the published file leaves to Gemma 2's defaults (8 heads of 256)."""


@pytest.fixture(scope="module")
def molmo2_random(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm_tools.testing.tiny_molmo2 import build_tiny_molmo2

    return build_tiny_molmo2(tmp_path_factory.mktemp("hub") / "molmo2")


@pytest.fixture(scope="module")
def paligemma_random(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm_tools.testing.tiny_paligemma import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("hub") / "paligemma")


@pytest.fixture(params=["random", "trained"])
def molmo2_dir(request: pytest.FixtureRequest, molmo2_random: Path) -> Path:
    return molmo2_random if request.param == "random" else FIXTURES / "molmo2-ui"


@pytest.fixture(params=["random", "trained"])
def paligemma_dir(request: pytest.FixtureRequest, paligemma_random: Path) -> Path:
    return paligemma_random if request.param == "random" else FIXTURES / "paligemma-ui"


def key_paths(data: Any, prefix: str = "") -> set[str]:
    """Every key of a JSON object, nested keys as ``outer.inner``."""
    if not isinstance(data, dict):
        return set()
    paths = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        paths.add(path)
        paths |= key_paths(value, path + ".")
    return paths


def read(directory: Path, name: str) -> dict[str, Any]:
    return json.loads((directory / name).read_text())


def tensor_names(directory: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as weights:
        return list(weights.keys())


def special_added_tokens(tokenizer: Any) -> set[str]:
    """The added tokens the tokenizer treats as special (control) tokens."""
    return {added.content for added in tokenizer.added_tokens_decoder.values() if added.special}


def unmatched(names: list[str], patterns: list[str]) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    return [name for name in names if not any(p.fullmatch(name) for p in compiled)]


# --- Molmo2 -------------------------------------------------------------------------------------------------


def test_molmo2_has_the_hubs_files(molmo2_dir: Path) -> None:
    names = {p.name for p in molmo2_dir.iterdir() if not p.name.startswith(".")}
    assert names - TRAINED_EXTRAS == MOLMO2_FILES


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
             "video_preprocessor_config.json"],
)  # fmt: skip
def test_molmo2_json_files_have_the_published_keys_and_nesting(molmo2_dir: Path, name: str) -> None:
    assert key_paths(read(molmo2_dir, name)) == key_paths(published_json(MOLMO2, name))


def test_molmo2_config_is_in_the_remote_code_layout(molmo2_dir: Path) -> None:
    config = read(molmo2_dir, "config.json")
    published = published_json(MOLMO2, "config.json")
    assert "vit_config" in config and "vision_config" not in config
    assert config["auto_map"] == published["auto_map"]
    assert config["architectures"] == published["architectures"] and config["model_type"] == "molmo2"
    # As on the hub the ViT declares more layers than the weights hold: only those up to the deepest one read.
    declared = config["vit_config"]["num_hidden_layers"]
    deepest = max(layer % declared for layer in config["adapter_config"]["vit_layers"])
    blocks = {int(m.group(1)) for n in tensor_names(molmo2_dir) if (m := re.search(r"resblocks\.(\d+)\.", n))}
    assert blocks == set(range(deepest + 1)) and deepest + 1 < declared


def test_molmo2_chat_template_is_the_published_one(molmo2_dir: Path) -> None:
    assert (molmo2_dir / "chat_template.jinja").read_text() == published_text(MOLMO2, "chat_template.jinja")


def test_molmo2_tokens_have_the_published_order_and_roles(molmo2_dir: Path) -> None:
    from transformers import AutoTokenizer

    from vlm_tools.testing.tiny_molmo2 import published_added_tokens, text_vocab_offset

    summary = published_json(MOLMO2, "tokenizer_config.summary.json")
    written = read(molmo2_dir, "tokenizer_config.json")
    for field in ("tokenizer_class", "add_bos_token", "bos_token", "eos_token", "pad_token", "processor_class"):
        assert written[field] == summary[field], field
    tokenizer = AutoTokenizer.from_pretrained(molmo2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>",
                                                                               "<|endoftext|>")  # fmt: skip
    regular = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    special = special_added_tokens(tokenizer)
    for index, (token, is_special) in enumerate(published_added_tokens()):
        published_id = int(sorted(summary["added_tokens"], key=int)[index])
        assert tokenizer.convert_tokens_to_ids(token) == regular + published_id - 151643, token
        assert (token in special) == is_special, token
    config = read(molmo2_dir, "config.json")
    assert config["text_config"]["vocab_size"] == regular + text_vocab_offset()
    assert config["text_config"]["additional_vocab_size"] == summary["text_config.additional_vocab_size"]
    # Every token id in the config names the token the published config's id names.
    published = published_json(MOLMO2, "config.json")
    by_published_id = {int(k): v for k, v in summary["added_tokens"].items()}
    for key, value in published.items():
        if key.endswith(("_id", "_token_id")) and isinstance(value, int):
            assert tokenizer.convert_ids_to_tokens(config[key]) == by_published_id[value], key
    # No BOS from the tokenizer (the processor puts it in front of a prompt); digits stand alone (Qwen2's split).
    assert tokenizer.convert_ids_to_tokens(tokenizer("12 345")["input_ids"]) == ["1", "2", "Ġ", "3", "4", "5"]


def test_molmo2_tensors_have_the_hubs_names(molmo2_dir: Path) -> None:
    names = tensor_names(molmo2_dir)
    assert unmatched(names, MOLMO2_TENSORS) == []
    for pattern in MOLMO2_TENSORS:  # and every kind of tensor the hub has is there
        assert any(re.fullmatch(pattern, name) for name in names), pattern


def test_molmo2_loads_natively_with_the_published_structure(molmo2_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(molmo2_dir, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    config = read(molmo2_dir, "config.json")
    assert model.config.vision_config.image_size == config["vit_config"]["image_default_input_size"]
    processor = AutoProcessor.from_pretrained(molmo2_dir)
    assert processor.chat_template == published_text(MOLMO2, "chat_template.jinja")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Point to the cat."}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert prompt == "<|image|><|im_start|>user\nPoint to the cat.<|im_end|>\n<|im_start|>assistant\n"


def test_molmo2_template_refuses_a_system_turn(molmo2_dir: Path) -> None:
    from jinja2.exceptions import TemplateError
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(molmo2_dir)
    with pytest.raises(TemplateError, match="alternate"):
        processor.apply_chat_template(
            [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], tokenize=False
        )


# --- PaliGemma 2 --------------------------------------------------------------------------------------------


def test_paligemma_has_the_hubs_files(paligemma_dir: Path) -> None:
    names = {p.name for p in paligemma_dir.iterdir() if not p.name.startswith(".")}
    assert names - TRAINED_EXTRAS == PALIGEMMA_FILES


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "preprocessor_config.json", "special_tokens_map.json"]
)
def test_paligemma_json_files_have_the_published_keys_and_nesting(paligemma_dir: Path, name: str) -> None:
    extra = PALIGEMMA_EXTRA_KEYS if name == "config.json" else set()
    assert key_paths(read(paligemma_dir, name)) == key_paths(published_json(PALIGEMMA, name)) | extra


def test_paligemma_tokens_are_gemma_shaped(paligemma_dir: Path) -> None:
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(paligemma_dir).tokenizer
    ids = tokenizer.convert_tokens_to_ids
    assert [ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert (ids("<start_of_turn>"), ids("<end_of_turn>")) == (106, 107)
    assert tokenizer.get_vocab()["\n"] == 108  # vLLM's PaliGemma processing looks this token up
    pieces = tokenizer.tokenize("detect red x\n")
    assert "".join(pieces) == "detect▁red▁x\n" and pieces[-1] == "\n"  # ▁ marks a word start, no prefix space
    loc0, seg0, image = ids("<loc0000>"), ids("<seg000>"), ids("<image>")
    assert [ids(f"<loc{i:04d}>") for i in range(1024)] == list(range(loc0, loc0 + 1024))
    assert [ids(f"<seg{i:03d}>") for i in range(128)] == list(range(loc0 + 1024, loc0 + 1152)) and seg0 == loc0 + 1024
    assert image == loc0 + 1152  # 256000 + 1152 = 257152 on the hub
    special = special_added_tokens(tokenizer)
    assert {"<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<image>", "<start_of_turn>", "<end_of_turn>"} <= special
    assert not {"<loc0000>", "<loc1023>", "<seg000>", "<seg127>"} & special
    assert tokenizer.decode([loc0 + 5, seg0 + 7, 2, 1], skip_special_tokens=True) == "<loc0005><seg007>"
    config = read(paligemma_dir, "config.json")
    assert config["image_token_index"] == image == config["_vocab_size"]
    assert config["text_config"]["vocab_size"] % 64 == 0 and config["text_config"]["vocab_size"] > image
    assert config["text_config"]["eos_token_id"] == [1, 107]
    # PaliGemma 2's tokenizer adds no BOS (PaliGemma 1's does; vLLM tells the two apart by this flag): the
    # processor writes <bos> itself, after the image tokens.
    assert read(paligemma_dir, "tokenizer_config.json")["add_bos_token"] is False
    assert tokenizer("x")["input_ids"] == [ids("x")]


def test_paligemma_tensors_have_the_hubs_names(paligemma_dir: Path) -> None:
    names = tensor_names(paligemma_dir)
    assert unmatched(names, PALIGEMMA_TENSORS) == []
    for pattern in PALIGEMMA_TENSORS:
        assert any(re.fullmatch(pattern, name) for name in names), pattern
    assert not any(name.startswith(("vision_tower.embeddings", "vision_tower.encoder")) for name in names)


def test_paligemma_loads_and_lays_the_prompt_out_as_published(paligemma_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(paligemma_dir, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    processor = AutoProcessor.from_pretrained(paligemma_dir)
    batch = processor(text=["<image>caption en"], images=[Image.new("RGB", (30, 20))], return_tensors="pt")
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    assert text == "<image>" * processor.image_seq_length + "<bos>caption en\n"
    config = read(paligemma_dir, "config.json")
    assert processor.image_seq_length == config["text_config"]["num_image_tokens"]
    assert model.config.text_config.attn_logit_softcapping == published_json(PALIGEMMA, "config.json")[
        "text_config"
    ]["attn_logit_softcapping"]
