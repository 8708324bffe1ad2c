"""A tiny Molmo2 written file for file in the layout of ``allenai/Molmo2-4B`` on the hub.

Made from transformers' own Molmo2 classes, only smaller (the files: :func:`save_hub_checkpoint`). Random weights
give noise, but with the real token layout, chat template, crops, masks and image-token bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .published import edit_json, published_json, published_text, write_json

logger = logging.getLogger(__name__)

HUB_DIR = "molmo2-4b"
PATCH_SIZE = 14
REGULAR_VOCAB = 512
"""Byte-level BPE entries before the added tokens (151643 on the hub)."""
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer split: every digit stands alone, so a coordinate like ``073`` is always ``0``, ``7``, ``3``."""
IMAGE_TOKENS = (
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>", "<im_low>",
    "<frame_start>", "<frame_end>", "<|video|>",
)  # fmt: skip
"""Molmo2's multimodal tokens, in the hub's order, right above the text vocabulary (151936… on the hub)."""

_CORPUS = (
    "Describe this image in one or two sentences. Describe this image in detail. Answer in German.",
    "What is in the picture? How many objects are there?",
    "Transcribe all the text in this image. Keep the reading order.",
    "Point to the red circle. Point to all the boats. Point to the blue square. Count the cars.",
    '<points coords="1 1 073 160 2 173 600" alt="boats">the boats</points>',
    '<point x="63.3" y="85.8" alt="cup">cup</point>',
    "Counting the <points coords=\"1 1 500 500\" alt=\"cat\">cat</points> shows a total of 1. There are none.",
    "A red circle on a white background. A blue square, a green triangle and a yellow star. Yes. No.",
    "( ) [ ] { } < > = \" ' , . ; : ! ? - _ / \\ * + % & # @ ~ ` | ^ $",
    "user\n assistant\n Image 1 Image 2",
)
"""Text the tiny BPE learns its merges from: the families' prompts and the answer formats they parse."""


@dataclass(frozen=True)
class Molmo2Shape:
    """Sizes and image tiling of a tiny Molmo2. Text heads are 32 wide, the least vLLM's CPU attention takes."""

    crop_size: int = 56
    max_crops: int = 6
    overlap_margins: tuple[int, int] = (1, 1)
    """Counted in patches; they must leave a window inside the crop (56 px = 4 patches, margins 1 leave 2)."""
    pooling: tuple[int, int] = (2, 2)
    """Patches per image token (rows, columns); 2×2 as on the hub."""
    vision_hidden: int = 32
    vision_heads: int = 4
    vision_intermediate: int = 64
    vit_layers: tuple[int, ...] = (-2, -4)
    """ViT layers the adapter reads, counted from the declared depth and deepest first, like the hub's (-3, -9)."""
    vit_declared_layers: int = 4
    """Depth ``vit_config`` declares. The weights stop at the deepest layer read (here 3 of 4; the hub: 25 of 27)."""
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_head_dim: int = 32
    text_intermediate: int = 128
    adapter_intermediate: int = 128
    rope_theta: float = 10_000.0
    """RoPE base. The hub's 5,000,000 is for 36,864 positions; a tiny model's prompts are a few hundred tokens."""
    init_std: float = 0.2
    """Larger than a real model's 0.02 on purpose: at 0.02 a tiny random model yields nearly the same tokens for
    every prompt; at 0.2 its output depends on every input token and pixel, which lets tests tell correct padding
    and image bookkeeping from wrong."""

    @property
    def vision_layers(self) -> int:
        """ViT layers built and saved: up to the deepest one the adapter reads."""
        return max(layer % self.vit_declared_layers for layer in self.vit_layers) + 1


def hub_text(name: str) -> str:
    """A file of the published checkpoint (``vlm_tools/testing/hub/molmo2-4b/``), as text."""
    return published_text(HUB_DIR, name)


def hub_file(name: str) -> dict[str, Any]:
    """A JSON file of the published checkpoint."""
    return published_json(HUB_DIR, name)


def published_added_tokens() -> list[tuple[str, bool]]:
    """Every added token of the hub tokenizer in id order, with whether it is special."""
    summary = hub_file("tokenizer_config.summary.json")
    plain = set(summary["not_special_added_tokens"])
    added = sorted(summary["added_tokens"].items(), key=lambda item: int(item[0]))
    return [(token, int(index) not in plain) for index, token in added]


def build_tokenizer(corpus: Iterable[str] = _CORPUS) -> Any:
    """A Qwen2-shaped tokenizer: byte-level BPE learnt from ``corpus``, then the hub's added tokens.

    As on the hub: NFC normalisation, Qwen2's pre-tokenizer split (single digits), byte-level BPE with
    :data:`REGULAR_VOCAB` entries at most; then every added token of the published tokenizer in the published order
    and roles (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``…, the ``|<EXTRA_TOKENS_N>|`` fillers, then the
    image tokens, at the same offsets from the regular vocabulary as on the hub); ``bos`` = ``eos`` =
    ``<|im_end|>``, ``pad`` = ``<|endoftext|>``, no BOS added (the processor puts ``bos`` in front of a prompt).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=REGULAR_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(list(corpus) * 4, trainer=trainer)
    regular = backend.get_vocab_size()
    published = published_added_tokens()
    # Added in published order, so each lands at (its hub id - 151643) above the regular vocabulary.
    for token, special in published:
        added = AddedToken(token, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([added])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend, bos_token="<|im_end|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, add_bos_token=False, add_prefix_space=False, errors="replace", padding_side="left",
        model_max_length=hub_file("tokenizer_config.summary.json")["model_max_length"],
        clean_up_tokenization_spaces=False, split_special_tokens=False,
        extra_special_tokens=list(IMAGE_TOKENS),
    )  # fmt: skip
    first_image = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[0])
    if first_image != regular + text_vocab_offset():
        raise RuntimeError(f"image tokens start at {first_image}, expected {regular + text_vocab_offset()}")
    return tokenizer


def text_vocab_offset() -> int:
    """How far above the regular vocabulary the text model's vocabulary ends: 151936 - 151643 = 293 on the hub."""
    summary = hub_file("tokenizer_config.summary.json")
    return int(summary["text_config.vocab_size"]) - int(summary["regular_vocab_size"])


def build_processor(tokenizer: Any, shape: Molmo2Shape) -> Any:
    """The real ``Molmo2Processor`` (overlapping crops + a low-resolution view) with the published chat template."""
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

    image = hub_file("preprocessor_config.json")
    video = hub_file("video_preprocessor_config.json")
    options = hub_file("processor_config.json")
    size = {"height": shape.crop_size, "width": shape.crop_size}
    image_processor = Molmo2ImageProcessor(
        size=size, max_crops=shape.max_crops, overlap_margins=list(shape.overlap_margins), patch_size=PATCH_SIZE,
        pooling_size=list(shape.pooling), resample=image["resample"], image_mean=image["image_mean"],
        image_std=image["image_std"],
    )  # fmt: skip
    video_processor = Molmo2VideoProcessor(
        size=size, patch_size=PATCH_SIZE, pooling_size=list(shape.pooling), num_frames=4, max_fps=video["max_fps"],
        resample=video["resample"], image_mean=video["image_mean"], image_std=video["image_std"],
    )  # fmt: skip
    return Molmo2Processor(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
        chat_template=hub_text("chat_template.jinja"),
        **{key: options[key] for key in ("image_use_col_tokens", "use_single_crop_col_tokens",
                                           "use_single_crop_start_token", "video_use_col_tokens",
                                           "use_frame_special_tokens")},
    )  # fmt: skip


def build_config(tokenizer: Any, shape: Molmo2Shape) -> Any:
    """A native ``Molmo2Config`` of ``shape`` whose ids are the tokenizer's."""
    from transformers import Molmo2Config
    from transformers.models.molmo2.configuration_molmo2 import (
        Molmo2AdapterConfig,
        Molmo2TextConfig,
        Molmo2VisionConfig,
    )

    published = hub_file("config.json")
    ids = tokenizer.convert_tokens_to_ids
    vocab = ids(IMAGE_TOKENS[0])
    text = Molmo2TextConfig(
        hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate, num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_kv_heads, head_dim=shape.text_head_dim,
        vocab_size=vocab, additional_vocab_size=published["text_config"]["additional_vocab_size"],
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        initializer_range=shape.init_std,
    )  # fmt: skip
    vision = Molmo2VisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        num_key_value_heads=shape.vision_heads, head_dim=shape.vision_hidden // shape.vision_heads,
        image_size=[shape.crop_size, shape.crop_size], patch_size=PATCH_SIZE, initializer_range=shape.init_std,
    )  # fmt: skip
    adapter = Molmo2AdapterConfig(
        vision_feature_layer=[layer % shape.vit_declared_layers for layer in shape.vit_layers],
        hidden_size=shape.vision_hidden, num_attention_heads=shape.vision_heads,
        num_key_value_heads=shape.vision_heads, head_dim=shape.vision_hidden // shape.vision_heads,
        intermediate_size=shape.adapter_intermediate, text_hidden_size=shape.text_hidden,
        initializer_range=shape.init_std,
    )  # fmt: skip
    return Molmo2Config(
        text_config=text, vision_config=vision, adapter_config=adapter,
        image_start_token_id=ids("<im_start>"), low_res_image_start_token_id=ids("<low_res_im_start>"),
        image_end_token_id=ids("<im_end>"), image_patch_id=ids("<im_patch>"),
        frame_start_token_id=ids("<frame_start>"), frame_end_token_id=ids("<frame_end>"),
        tie_word_embeddings=False, initializer_range=shape.init_std,
    )  # fmt: skip


def new_model(shape: Molmo2Shape, *, seed: int = 0, corpus: Iterable[str] = _CORPUS) -> tuple[Any, Any]:
    """A freshly initialised Molmo2 of ``shape`` and its processor."""
    import torch
    from transformers import Molmo2ForConditionalGeneration

    tokenizer = build_tokenizer(corpus)
    config = build_config(tokenizer, shape)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = Molmo2ForConditionalGeneration(config).eval()
    return model, build_processor(tokenizer, shape)


def hub_config(model: Any, processor: Any, shape: Molmo2Shape) -> dict[str, Any]:
    """``config.json`` in the hub's (remote-code) layout with this model's values."""
    config = model.config
    text, vision, adapter = config.text_config, config.vision_config, config.adapter_config
    ids = processor.tokenizer.convert_tokens_to_ids
    published = hub_file("config.json")
    written = {
        **published,
        "frame_end_token_id": config.frame_end_token_id,
        "frame_start_token_id": config.frame_start_token_id,
        "image_col_id": ids("<im_col>"),
        "image_end_token_id": config.image_end_token_id,
        "image_high_res_id": config.image_patch_id,
        "image_low_res_id": ids("<im_low>"),
        "image_patch_id": config.image_patch_id,
        "image_start_token_id": config.image_start_token_id,
        "initializer_range": shape.init_std,
        "low_res_image_start_token_id": config.low_res_image_start_token_id,
    }
    written["adapter_config"] = {
        **published["adapter_config"],
        "head_dim": adapter.head_dim,
        "hidden_size": adapter.hidden_size,
        "initializer_range": shape.init_std,
        "intermediate_size": adapter.intermediate_size,
        "num_attention_heads": adapter.num_attention_heads,
        "num_key_value_heads": adapter.num_key_value_heads,
        "text_hidden_size": adapter.text_hidden_size,
        "vit_layers": list(shape.vit_layers),
    }
    written["text_config"] = {
        **published["text_config"],
        "head_dim": text.head_dim,
        "hidden_size": text.hidden_size,
        "initializer_range": shape.init_std,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rope_theta": shape.rope_theta,
        "vocab_size": text.vocab_size,
    }
    grid = shape.crop_size // PATCH_SIZE
    written["vit_config"] = {
        **published["vit_config"],
        "head_dim": vision.head_dim,
        "hidden_size": vision.hidden_size,
        "image_default_input_size": [shape.crop_size, shape.crop_size],
        "image_num_pos": grid * grid,
        "initializer_range": shape.init_std,
        "intermediate_size": vision.intermediate_size,
        "num_attention_heads": vision.num_attention_heads,
        "num_hidden_layers": shape.vit_declared_layers,
        "num_key_value_heads": vision.num_key_value_heads,
    }
    return written


def save_hub_checkpoint(model: Any, processor: Any, shape: Molmo2Shape, path: Path) -> Path:
    """Write ``model`` and ``processor`` to ``path`` in the hub's layout.

    Written as the hub checkpoint is (``hub/molmo2-4b/`` holds the published files it is scaled from):

    * ``config.json`` in the layout of the repository's own code — ``vit_config`` (``image_default_input_size``,
      ``image_num_pos``…), ``adapter_config.vit_layers``, ``image_col_id``, ``auto_map`` — with the published keys and
      nesting and smaller sizes. transformers 5 converts it when it loads natively; vLLM reads it as it is. As on the
      hub, ``vit_config`` declares more layers than the weights hold: only those up to the deepest one ``vit_layers``
      reads are saved (27 declared, 25 saved for Molmo2-4B);
    * ``model.safetensors`` under the hub's tensor names (``model.transformer.blocks.N…``,
      ``model.vision_backbone.image_vit…``, ``lm_head.weight``; transformers 5 saves Molmo2 under them);
    * a Qwen2-shaped tokenizer (:func:`build_tokenizer`), the published chat template byte for byte,
      ``preprocessor_config.json``, ``video_preprocessor_config.json``, ``processor_config.json`` and
      ``generation_config.json`` with the published keys.

    It loads back through ``from_pretrained(path, local_files_only=True)`` like a hub id.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer = processor.tokenizer
    tokenizer.save_pretrained(path)
    tokenizer.backend_tokenizer.model.save(str(path))  # vocab.json and merges.txt, as the hub also ships them
    (path / "chat_template.jinja").write_text(hub_text("chat_template.jinja"))
    size = {"height": shape.crop_size, "width": shape.crop_size}
    write_json(path / "config.json", hub_config(model, processor, shape))
    write_json(path / "preprocessor_config.json", {
        **hub_file("preprocessor_config.json"), "max_crops": shape.max_crops,
        "overlap_margins": list(shape.overlap_margins), "pooling_size": list(shape.pooling), "size": size,
    })  # fmt: skip
    write_json(path / "video_preprocessor_config.json", {
        **hub_file("video_preprocessor_config.json"), "num_frames": 4, "pooling_size": list(shape.pooling),
        "size": size,
    })  # fmt: skip
    write_json(path / "processor_config.json", hub_file("processor_config.json"))
    ids = tokenizer.convert_tokens_to_ids
    write_json(path / "generation_config.json", {
        **hub_file("generation_config.json"), "bos_token_id": ids("<|im_end|>"), "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    })  # fmt: skip
    summary = hub_file("tokenizer_config.summary.json")
    edit_json(path / "tokenizer_config.json", tokenizer_class=summary["tokenizer_class"],
              add_bos_token=summary["add_bos_token"], processor_class=summary["processor_class"],
              auto_map=summary["auto_map"])  # fmt: skip
    return path


def build_tiny_molmo2(path: Path, *, seed: int = 0, shape: Molmo2Shape | None = None) -> Path:
    """Build a tiny random Molmo2 and write it to ``path`` in the hub's layout; returns ``path``.

    Deterministic for a given ``seed`` and shape; takes a second or two and a few MB on disk.
    """
    shape = shape or Molmo2Shape()
    model, processor = new_model(shape, seed=seed)
    save_hub_checkpoint(model, processor, shape, path)
    logger.info("built tiny Molmo2 in %s", path)
    return Path(path)

