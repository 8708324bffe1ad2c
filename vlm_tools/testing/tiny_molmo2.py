"""Build a tiny random Molmo2 checkpoint offline, for tests that need the real transformers code path.

The checkpoint is made from transformers' own Molmo2 classes (``Molmo2Config``, ``Molmo2ForConditionalGeneration``,
``Molmo2Processor`` with its torchvision image and video processors) and saved with ``save_pretrained``, so it loads
back through ``from_pretrained(path, local_files_only=True)`` exactly like a hub id. Only the sizes are small:
hidden sizes of 32–64, two layers, 56 px crops. Its weights are random, so it emits garbage text — but with the
same token layout, padding, masks and image-token bookkeeping as ``allenai/Molmo2-4B``.

The tokenizer mirrors the real one's shape: a byte-level BPE (trained here on a small built-in corpus) whose base
vocabulary holds the chat tokens, with Molmo2's image tokens in the *additional* vocabulary above
``text_config.vocab_size`` (the model's embedding covers ``vocab_size + additional_vocab_size`` rows while its
output head covers only ``vocab_size``, so the model can read those tokens but never emit them). As on
Molmo2-4B, there is no BOS token: the processor puts ``eos_token`` (``<|im_end|>``) in front of each prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Chat-format tokens; they live in the base vocabulary (the model can emit them)."""

IMAGE_TOKENS = (
    "<im_start>",
    "<im_end>",
    "<im_patch>",
    "<im_col>",
    "<low_res_im_start>",
    "<|image|>",
    "<im_low>",
    "<frame_start>",
    "<frame_end>",
    "<|video|>",
)
"""Molmo2's multimodal tokens, in the additional vocabulary (the order of the real checkpoint's first ids)."""

CROP_SIZE = 56
PATCH_SIZE = 14
BASE_VOCAB_SIZE = 512
ADDITIONAL_VOCAB_SIZE = 16

# Molmo2 (like Molmo) puts every image placeholder at the very start of the sequence, before the first turn, and
# numbers them when there are several; turns use the Qwen/ChatML markers. The real template also rejects
# conversations that do not alternate user/assistant; so does this one.
CHAT_TEMPLATE = (
    "{%- set images = namespace(count=0) -%}"
    "{%- set videos = namespace(count=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set images.count = images.count + 1 -%}"
    "{%- elif item['type'] == 'video' -%}{%- set videos.count = videos.count + 1 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if images.count == 1 -%}{{- '<|image|>' -}}"
    "{%- elif images.count > 1 -%}"
    "{%- for index in range(images.count) -%}{{- 'Image ' ~ (index + 1) ~ '<|image|>' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- for index in range(videos.count) -%}{{- '<|video|>' -}}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' or not loop.last -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""Chat template: image placeholders first, then ChatML turns."""

# Text the tokenizer is trained on: the prompts the families send, the output formats they parse, digits and
# punctuation, so that merges exist for what tests feed through it. Byte-level BPE covers any other text anyway.
_CORPUS = (
    "Describe this image. Describe this image in detail. Write a short caption for this image.",
    "What is in the picture? How many objects are there? Answer the question briefly. Answer in English.",
    "Point to the red circle. Point to all the boats. Point to the blue square. Count the cars.",
    '<points coords="1 1 073 160 2 173 600" alt="boats">the boats</points>',
    '<point x="63.3" y="85.8" alt="cup">cup</point>',
    '<points x1="9.1" y1="11.7" x2="17.2" y2="41.3" alt="people">people</points>',
    "Counting the <points coords=\"1 1 500 500\" alt=\"cat\">cat</points> shows a total of 1.",
    "Transcribe the text in this image. Read all the text. OCR: the quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 000 073 160 173 600 0.5 12.25",
    "A red circle on a white background. A blue square, a green triangle and a yellow star.",
    "There is nothing like that in the image. Yes. No. I don't know.",
    "( ) [ ] { } < > = \" ' , . ; : ! ? - _ / \\ * + % & # @ ~ ` | ^ $",
    "user\n assistant\n system\n Image 1 Image 2",
)


def _train_tokenizer():
    """A byte-level BPE with the chat tokens at ids 0..2 and exactly ``BASE_VOCAB_SIZE`` base entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(CHAT_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    size = tokenizer.get_vocab_size()
    if size > BASE_VOCAB_SIZE:  # the trainer never overshoots; guard the id layout the model relies on
        raise RuntimeError(f"tiny tokenizer has {size} base tokens, more than {BASE_VOCAB_SIZE}")
    return tokenizer


def _build_tokenizer():
    """The transformers tokenizer: trained BPE + Molmo2's image tokens above the base vocabulary."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = _train_tokenizer()
    # Pad the base vocabulary to its full size so the image tokens start exactly at ``BASE_VOCAB_SIZE``, as on the
    # real checkpoint (151936 there): the model's output head covers only the base vocabulary.
    filler = [f"<|reserved_{i}|>" for i in range(BASE_VOCAB_SIZE - backend.get_vocab_size())]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in filler])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in IMAGE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(IMAGE_TOKENS),
        padding_side="left",
        model_max_length=4096,
    )
    first_image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[0])
    if first_image_id != BASE_VOCAB_SIZE:
        raise RuntimeError(f"image tokens start at id {first_image_id}, expected {BASE_VOCAB_SIZE}")
    return tokenizer


def _build_config(tokenizer, *, hidden_size: int, vision_hidden_size: int, layers: int, init_std: float):
    from transformers import Molmo2Config
    from transformers.models.molmo2.configuration_molmo2 import (
        Molmo2AdapterConfig,
        Molmo2TextConfig,
        Molmo2VisionConfig,
    )

    ids = tokenizer.convert_tokens_to_ids
    text_config = Molmo2TextConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        vocab_size=BASE_VOCAB_SIZE,
        additional_vocab_size=ADDITIONAL_VOCAB_SIZE,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        initializer_range=init_std,
    )
    vision_config = Molmo2VisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=vision_hidden_size // 4,
        image_size=[CROP_SIZE, CROP_SIZE],
        patch_size=PATCH_SIZE,
        initializer_range=init_std,
    )
    # Two ViT layers concatenated, deepest first, like the real [24, 18].
    adapter_config = Molmo2AdapterConfig(
        vision_feature_layer=[-1, 0],
        hidden_size=vision_hidden_size,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=vision_hidden_size // 4,
        intermediate_size=hidden_size * 2,
        text_hidden_size=hidden_size,
        initializer_range=init_std,
    )
    return Molmo2Config(
        text_config=text_config,
        vision_config=vision_config,
        adapter_config=adapter_config,
        image_start_token_id=ids("<im_start>"),
        low_res_image_start_token_id=ids("<low_res_im_start>"),
        image_end_token_id=ids("<im_end>"),
        image_patch_id=ids("<im_patch>"),
        frame_start_token_id=ids("<frame_start>"),
        frame_end_token_id=ids("<frame_end>"),
        tie_word_embeddings=False,
        initializer_range=init_std,
    )


def _build_processor(tokenizer, *, max_crops: int):
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

    size = {"height": CROP_SIZE, "width": CROP_SIZE}
    # Overlap margins are counted in patches and must leave a window inside the crop: 56 px / 14 = 4 patches,
    # margins [1, 1] leave a 2-patch window.
    image_processor = Molmo2ImageProcessor(
        size=size, max_crops=max_crops, overlap_margins=[1, 1], patch_size=PATCH_SIZE, pooling_size=[2, 2]
    )
    video_processor = Molmo2VideoProcessor(size=size, patch_size=PATCH_SIZE, pooling_size=[2, 2], num_frames=4)
    return Molmo2Processor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_use_col_tokens=True,
        use_single_crop_col_tokens=False,  # as in the released processor_config.json
        use_single_crop_start_token=True,
        video_use_col_tokens=False,
        use_frame_special_tokens=True,
    )


def build_tiny_molmo2(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    layers: int = 2,
    max_crops: int = 6,
    init_std: float = 0.2,
) -> Path:
    """Build a tiny random Molmo2 (model, processor, generation config) and save it to ``path``.

    Deterministic for a given ``seed`` and arguments; takes a second or two and a few MB on disk. Returns ``path``,
    loadable with ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained(path, local_files_only=True)``.

    ``init_std`` is larger than a real model's 0.02 on purpose: with tiny random weights at 0.02 every prompt yields
    nearly the same tokens, whereas larger weights make the output depend on every input token and pixel — which
    is what lets a test tell correct padding and image bookkeeping from wrong.
    """
    import torch
    from transformers import GenerationConfig, Molmo2ForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = _build_config(
        tokenizer, hidden_size=hidden_size, vision_hidden_size=vision_hidden_size, layers=layers, init_std=init_std
    )

    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = Molmo2ForConditionalGeneration(config).eval()
    eos = [config.text_config.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=config.text_config.pad_token_id, do_sample=False
    )
    model.save_pretrained(path)
    _build_processor(tokenizer, max_crops=max_crops).save_pretrained(path)
    logger.info("built tiny Molmo2 in %s", path)
    return path
