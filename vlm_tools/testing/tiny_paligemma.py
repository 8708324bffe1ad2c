"""A tiny random PaliGemma 2, built offline from real transformers classes and saved like a hub checkpoint.

The saved directory loads back through ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained`` with
``local_files_only=True`` — the same public path a hub id takes — so tests exercise the real processor (image
tokens, ``<bos>``, the trailing ``"\\n"``, left padding, prefix-LM ``token_type_ids``) and the real model code,
only smaller: a SigLIP vision tower and a Gemma 2 text model of hidden size 32 and two layers, a few hundred kB.

Rules this follows (see REFERENCE.md): ``image_seq_length == (image_size // patch_size) ** 2``;
``projection_dim`` equals the text hidden size; the image token id is the tokenizer's; the text vocabulary covers
every token the processor adds (``<image>``, 1024 ``<locNNNN>``, 128 ``<segNNN>``); the tokenizer has no
whitespace pre-tokenizer, so ``"\\n"`` survives (it is the byte token ``<0x0A>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tokenizer import byte_fallback_vocab

PATCH_SIZE = 14
TEXT_HIDDEN = 32
INIT_RANGE = 0.2
"""Weight init std of the text model. Ten times Gemma's 0.02: at 0.02 a random model's greedy output barely
depends on its input, so a padding bug (right padding, shifted positions) would go unnoticed by batch-vs-single
comparisons; at 0.2 it changes the output."""
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
"""Gemma's order: pad 0, eos 1, bos 2, unk 3, mask 4."""


def build_tokenizer() -> Any:
    """A ``GemmaTokenizer`` (the class PaliGemma checkpoints use) over a byte-fallback character vocabulary."""
    from transformers import GemmaTokenizer

    tokenizer = GemmaTokenizer(vocab=byte_fallback_vocab(SPECIAL_TOKENS), merges=[])
    tokenizer.padding_side = "left"
    return tokenizer


def build_processor(image_size: int) -> Any:
    """The real ``PaliGemmaProcessor``: SigLIP image processor (square resize) + tokenizer with PaliGemma's tokens."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    # PaliGemmaProcessor refuses an image processor without it; the real checkpoints store it in their config.
    image_processor.image_seq_length = (image_size // PATCH_SIZE) ** 2
    # The processor adds <image> (special), the 1024 location and 128 segmentation tokens to the tokenizer.
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def build_config(tokenizer: Any, image_size: int) -> Any:
    """A PaliGemma 2 config (SigLIP vision + Gemma 2 text) whose vocabulary covers ``tokenizer``."""
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

    vocab_size = len(tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=TEXT_HIDDEN,
        vision_use_head=False,
    )
    text = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=2048,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        initializer_range=INIT_RANGE,
    )
    return PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=vocab_size,
        projection_dim=TEXT_HIDDEN,
        hidden_size=TEXT_HIDDEN,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def build_tiny_paligemma(path: Path, *, image_size: int = 56, seed: int = 0) -> Path:
    """Build a tiny random PaliGemma 2 and save model + processor to ``path`` (created if needed).

    Deterministic for a given ``seed``; takes a second or two and a few hundred kB on disk. Returns ``path``.
    """
    import torch
    from transformers import GenerationConfig, PaliGemmaForConditionalGeneration

    if image_size < PATCH_SIZE or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of the patch size {PATCH_SIZE}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor = build_processor(image_size)
    tokenizer = processor.tokenizer
    config = build_config(tokenizer, image_size)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
