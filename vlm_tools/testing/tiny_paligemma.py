"""A tiny PaliGemma 2 written file for file in the layout of ``google/paligemma2-3b-mix-448`` on the hub.

Made from transformers' own classes, only smaller (the files: :func:`save_hub_checkpoint`). Random weights give
noise, but with the real token layout, processor and masks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .published import edit_json, published_json, write_json

PATCH_SIZE = 14
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(1024))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(128))
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
"""Gemma's first ids: pad 0, eos 1, bos 2, unk 3, mask 4."""
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
"""Gemma's turn markers, at ids 106 and 107 as in the real vocabulary (special; Gemma 2 also ends at 107)."""
FIRST_TURN_ID = 106
NEWLINE = "\n"
"""A token of its own (id 108 in Gemma, right after the turn markers): vLLM's PaliGemma code looks it up."""
SPACE = "▁"
"""SentencePiece's visible space: the normaliser turns every ``" "`` into it, so a word start reads ``▁word``."""
BASE_VOCAB = 1024
"""Regular vocabulary (256000 in Gemma); the location tokens start here, as at 256000 on the hub."""
TASK_WORDS = ("caption", "describe", "answer", "detect", "segment", "ocr", "question", "▁en")
"""Pieces the tiny vocabulary spells as one token, as Gemma's does (everything else spells by character)."""

HUB_DIR = "paligemma2-3b-mix-448"


@dataclass(frozen=True)
class PaliGemmaShape:
    """Sizes of a tiny PaliGemma 2. Text heads are 32 wide: vLLM's CPU attention takes 32, 64, 80… but not less."""

    image_size: int = 56
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vision_intermediate: int = 64
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_head_dim: int = 32
    text_intermediate: int = 64
    init_std: float = 0.2
    """Weight init of the text model. Ten times Gemma's 0.02: at 0.02 a random model's greedy output barely depends
    on its input, so a padding bug would go unnoticed by batch-vs-single comparisons; at 0.2 it changes the output."""

    @property
    def image_tokens(self) -> int:
        """Image tokens per prompt: one per patch, ``(image_size / 14)²`` (1024 at 448 px)."""
        return (self.image_size // PATCH_SIZE) ** 2


def hub_file(name: str) -> dict[str, Any]:
    """A JSON file of the published checkpoint (``vlm_tools/testing/hub/paligemma2-3b-mix-448/``)."""
    return published_json(HUB_DIR, name)


def build_tokenizer(words: Iterable[str] = TASK_WORDS) -> Any:
    """A ``GemmaTokenizer`` shaped like PaliGemma's, over a small vocabulary.

    Like the real one: SentencePiece-style BPE with byte fallback (any text tokenises), ``" "`` normalised to
    ``"▁"`` with no prefix space, ``"\\n"`` a token of its own, the special tokens at Gemma's ids, the 1024
    ``<locNNNN>`` and 128 ``<segNNN>`` tokens right after the regular vocabulary as added tokens that are *not*
    special (they survive ``skip_special_tokens=True``), then ``<image>`` (special). ``words`` become single tokens
    (merges), as whole words are in Gemma's vocabulary; the rest spells by character.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizer

    reserved = [f"<unused{i}>" for i in range(FIRST_TURN_ID - len(SPECIAL_TOKENS))]
    pieces = [*SPECIAL_TOKENS, *reserved, *TURN_TOKENS, NEWLINE, *(f"<0x{b:02X}>" for b in range(256)), SPACE]
    pieces += [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        piece = word[0]
        for char in word[1:]:
            if (piece, char) not in merges:
                merges.append((piece, char))
            piece += char
            vocab.setdefault(piece, len(vocab))
    if len(vocab) > BASE_VOCAB:
        raise ValueError(f"{len(vocab)} regular pieces do not fit the {BASE_VOCAB}-token base vocabulary")
    # The rest of the regular vocabulary: ordinary word pieces, as Gemma's 256000 are (a random model emits them
    # as text; were they special, its answers would decode to nothing).
    for index in range(len(vocab), BASE_VOCAB):
        vocab[f"{SPACE}piece{index}"] = index

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [*SPECIAL_TOKENS, *reserved, *TURN_TOKENS]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (*LOC_TOKENS, *SEG_TOKENS)])
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer = GemmaTokenizer(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", extra_special_tokens=[IMAGE_TOKEN], padding_side="left", add_bos_token=False,
        add_eos_token=False,
    )  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids
    if (ids("<loc0000>"), ids(IMAGE_TOKEN), ids(NEWLINE)) != (BASE_VOCAB, BASE_VOCAB + 1152, FIRST_TURN_ID + 2):
        raise RuntimeError("the tiny Gemma tokenizer's id layout is off")
    return tokenizer


def build_processor(image_size: int, words: Iterable[str] = TASK_WORDS) -> Any:
    """The real ``PaliGemmaProcessor``: SigLIP square resize to ``image_size`` over :func:`build_tokenizer`."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    published = hub_file("preprocessor_config.json")
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=published["image_mean"],
        image_std=published["image_std"], resample=published["resample"],
    )  # fmt: skip
    image_processor.image_seq_length = (image_size // PATCH_SIZE) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(words))


def vocab_size(tokenizer: Any) -> int:
    """The text model's vocabulary: the tokenizer's, padded to a multiple of 64 (257153 → 257216 on the hub)."""
    return -(-len(tokenizer) // 64) * 64


def build_config(tokenizer: Any, shape: PaliGemmaShape) -> Any:
    """A ``PaliGemmaConfig`` of ``shape``: Gemma 2 text model (soft-capping and eos as published), SigLIP vision."""
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

    published = hub_file("config.json")["text_config"]
    image_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = SiglipVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads, image_size=shape.image_size,
        patch_size=PATCH_SIZE, projection_dim=shape.text_hidden, vision_use_head=False,
    )  # fmt: skip
    text = Gemma2Config(
        vocab_size=vocab_size(tokenizer), hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads, head_dim=shape.text_head_dim,
        query_pre_attn_scalar=shape.text_head_dim, sliding_window=published["sliding_window"],
        attn_logit_softcapping=published["attn_logit_softcapping"],
        final_logit_softcapping=published["final_logit_softcapping"], hidden_activation=published["hidden_activation"],
        pad_token_id=0, bos_token_id=2, eos_token_id=list(published["eos_token_id"]),
        initializer_range=shape.init_std,
    )  # fmt: skip
    return PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=image_index, projection_dim=shape.text_hidden,
        hidden_size=shape.text_hidden, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip


def new_model(shape: PaliGemmaShape, *, seed: int = 0, words: Iterable[str] = TASK_WORDS) -> tuple[Any, Any]:
    """A freshly initialised PaliGemma 2 of ``shape`` and its processor."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    if shape.image_size < PATCH_SIZE or shape.image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of the patch size {PATCH_SIZE}")
    processor = build_processor(shape.image_size, words)
    config = build_config(processor.tokenizer, shape)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(config).eval()
    return model, processor


def hub_config(model: Any) -> dict[str, Any]:
    """``config.json`` as the hub writes it: the published keys and nesting, with this model's values."""
    config = model.config
    text, vision = config.text_config, config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    published = hub_file("config.json")
    written = {
        **published,
        "_vocab_size": config.image_token_index,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": text.hidden_size,
        "image_token_index": config.image_token_index,
        "num_hidden_layers": text.num_hidden_layers,
        "pad_token_id": 0,
        "projection_dim": text.hidden_size,
        "torch_dtype": "float32",
    }
    written["text_config"] = {
        **published["text_config"],
        "attn_logit_softcapping": text.attn_logit_softcapping,
        "final_logit_softcapping": text.final_logit_softcapping,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_image_tokens": image_tokens,
        "num_key_value_heads": text.num_key_value_heads,
        "query_pre_attn_scalar": text.query_pre_attn_scalar,
        "sliding_window": text.sliding_window,
        "torch_dtype": "float32",
        "vocab_size": text.vocab_size,
        # Not in the published file, whose values are Gemma 2's defaults (8 heads of 256): a tiny model needs its own.
        "num_attention_heads": text.num_attention_heads,
        "head_dim": text.head_dim,
    }
    written["vision_config"] = {
        **published["vision_config"],
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "intermediate_size": vision.intermediate_size,
        "num_attention_heads": vision.num_attention_heads,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_image_tokens": image_tokens,
        "projection_dim": vision.projection_dim,
        "torch_dtype": "float32",
    }
    return written


def hub_tensor_name(name: str) -> str:
    """The hub's name for a tensor as transformers 5 saves it: the vision tower keeps SigLIP's ``vision_model.``."""
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def save_hub_checkpoint(model: Any, processor: Any, path: Path) -> Path:
    """Write ``model`` and ``processor`` to ``path`` in the hub's layout.

    The model is made from transformers' own classes (``PaliGemmaForConditionalGeneration`` with a SigLIP vision tower
    and a Gemma 2 text model, ``PaliGemmaProcessor``), only smaller, and saved as the hub checkpoints are:

    * ``config.json`` with the published file's keys and nesting (``hub/paligemma2-3b-mix-448/config.json``), its sizes
      scaled down — plus ``num_attention_heads`` and ``head_dim``, which the published file leaves at Gemma 2's defaults
      (8 heads of 256) and a tiny model cannot;
    * ``model.safetensors`` under the hub's tensor names: ``vision_tower.vision_model.{embeddings,encoder,
      post_layernorm}.…``, ``multi_modal_projector.linear.…``, ``language_model.model.…`` (transformers 5 saves the
      vision tower without ``vision_model.``, which vLLM refuses);
    * a Gemma-shaped tokenizer (see :func:`build_tokenizer`), ``preprocessor_config.json``, ``special_tokens_map.json``
      and ``generation_config.json`` as published; no chat template (PaliGemma has none).

    It loads back through ``from_pretrained(path, local_files_only=True)`` — the path a hub id takes — in this
    process and in a vLLM server.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    weights = path / "model.safetensors"
    with safe_open(weights, "pt") as saved:
        tensors = {hub_tensor_name(key): saved.get_tensor(key) for key in saved.keys()}  # noqa: SIM118
    save_file(tensors, weights, metadata={"format": "pt"})
    image_processor = processor.image_processor
    preprocessor = {
        **hub_file("preprocessor_config.json"),
        "image_seq_length": processor.image_seq_length,
        "size": {"height": image_processor.size["height"], "width": image_processor.size["width"]},
    }
    write_json(path / "preprocessor_config.json", preprocessor)
    write_json(path / "special_tokens_map.json", hub_file("special_tokens_map.json"))
    write_json(path / "generation_config.json", hub_file("generation_config.json"))
    write_json(path / "config.json", hub_config(model))
    # PaliGemma 2's tokenizer adds no BOS itself (PaliGemma 1's does; vLLM's PaliGemma code tells them apart by
    # this flag): the processor writes <bos> after the image tokens.
    edit_json(path / "tokenizer_config.json", add_bos_token=False, add_eos_token=False,
              processor_class="PaliGemmaProcessor")  # fmt: skip
    return path


def build_tiny_paligemma(path: Path, *, image_size: int = 56, seed: int = 0) -> Path:
    """Build a tiny random PaliGemma 2 and write it to ``path`` in the hub's layout; returns ``path``.

    Deterministic for a given ``seed``; takes a second or two and about a megabyte on disk.
    """
    model, processor = new_model(PaliGemmaShape(image_size=image_size), seed=seed)
    return save_hub_checkpoint(model, processor, path)

