"""PaliGemma: the model (:class:`PaliGemmaSize`, :func:`build_paligemma`), its answers and the training recipe.

``detect {colour} {shape}`` → ``<locY0><locX0><locY1><locX1> {colour} {shape}``: one box in PaliGemma's native
format, inputs built exactly as :class:`vlm_tools.backends.paligemma_local.PaliGemmaBackend` builds them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlm_tools.backends.base import Backend, Request, Task
from vlm_tools.families import get_family
from vlm_tools import scenes as ui_scenes
from vlm_tools.scenes import Scene

from .loop import Recipe
from .settings import TrainSettings
from .supervision import add_attention_targets, answer_logits, loc_code, position_code_2d, position_ids_from_mask

LOC_BINS = 1024
"""PaliGemma's location tokens ``<loc0000>``..``<loc1023>``: bins of 1/1024 of the image side."""


@dataclass
class PaliGemmaSize:
    """Architecture of the trained PaliGemma."""

    image_size: int = 140
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 96
    text_layers: int = 4
    text_heads: int = 3
    text_head_dim: int = 32
    """32: the narrowest head vLLM's CPU attention takes."""
    init_std: float = 0.1
    """Weight init of the Gemma 2 text model: about 1/sqrt(text_hidden). Gemma's own 0.02 suits a width of
    thousands; at 96 it leaves attention scores near zero and uniform, and the model sits for hundreds of steps
    before its attention learns to single out an object."""
    loc_high: float = 64.0
    """Highest frequency (cycles per image side) of the location tokens' initial code (see :func:`loc_code`)."""


PALIGEMMA_WORDS = ("detect", *(f"▁{w}" for w in (*ui_scenes.PALETTE, *ui_scenes.SHAPES)))
"""Whole-word tokens of the PaliGemma tokenizer (``▁`` is a space): a prompt reads ``detect ▁red ▁button`` rather
than 17 characters, as it does with the real Gemma vocabulary. Everything else still spells out by character or
byte, so any text tokenises."""


def paligemma_shape(size: PaliGemmaSize) -> Any:
    """The hub-layout builder's shape for ``size``."""
    from vlm_tools.testing.tiny_paligemma import PaliGemmaShape

    return PaliGemmaShape(
        image_size=size.image_size, vision_hidden=size.vision_hidden, vision_layers=size.vision_layers,
        vision_heads=size.vision_heads, vision_intermediate=size.vision_hidden * 4, text_hidden=size.text_hidden,
        text_layers=size.text_layers, text_heads=size.text_heads, text_kv_heads=size.text_heads,
        text_head_dim=size.text_head_dim, text_intermediate=size.text_hidden * 4, init_std=size.init_std,
    )  # fmt: skip


def build_paligemma(size: PaliGemmaSize, seed: int) -> tuple[torch.nn.Module, Any]:
    """A fresh PaliGemma 2 of ``size`` in the hub's layout (Gemma-shaped tokenizer, the real processor) whose
    vocabulary spells each of :data:`PALIGEMMA_WORDS` as one token."""
    from vlm_tools.testing.tiny_paligemma import new_model

    model, processor = new_model(paligemma_shape(size), seed=seed, words=PALIGEMMA_WORDS)
    tokenizer = processor.tokenizer
    grid = size.image_size // 14
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.copy_(
            0.5 * position_code_2d(grid, size.vision_hidden)
        )
        # Location-token rows of the (tied) embedding get the bin code, at the norm the other rows have.
        table = model.get_input_embeddings().weight
        loc0 = tokenizer.convert_tokens_to_ids("<loc0000>")
        code = loc_code(LOC_BINS, size.text_hidden, high=size.loc_high)
        table[loc0 : loc0 + LOC_BINS] = code * (table.norm(dim=1).mean() / code.norm(dim=1).mean())
    return model, processor


def edge_bands(
    box: tuple[float, float, float, float], size: tuple[int, int], grid: int
) -> list[tuple[float, float, float, float]]:
    """The four regions a box's ``<loc>`` tokens (y0, x0, y1, x1) are read from: one patch-thick bands along the
    top, left, bottom and right edges, centred on the edge and as long as the box's side.

    A head that averages the patches of the whole object reads its centre; an edge token needs the patches the
    edge crosses, where the vision tower sees the transition."""
    width, height = size
    x0, y0, x1, y1 = box
    half_w, half_h = width / grid / 2, height / grid / 2

    def clip(b: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return max(0.0, b[0]), max(0.0, b[1]), min(float(width), b[2]), min(float(height), b[3])

    return [
        clip((x0, y0 - half_h, x1, y0 + half_h)),
        clip((x0 - half_w, y0, x0 + half_w, y1)),
        clip((x0, y1 - half_h, x1, y1 + half_h)),
        clip((x1 - half_w, y0, x1 + half_w, y1)),
    ]


def loc_tokens(box: tuple[float, float, float, float], size: tuple[int, int]) -> str:
    """A pixel box as PaliGemma's four location tokens: y0, x0, y1, x1, each a bin of 1024 over its side."""
    width, height = size
    x0, y0, x1, y1 = box
    bins = [min(LOC_BINS - 1, max(0, round(v * LOC_BINS))) for v in (y0 / height, x0 / width, y1 / height, x1 / width)]
    return "".join(f"<loc{b:04d}>" for b in bins)


def paligemma_answer(scene: Scene, objects: Sequence[ui_scenes.SceneObject] | None = None) -> str:
    """The detect answer naming ``objects`` (default: the target): ``<loc…>×4 label`` per object, ``" ; "`` between."""
    return " ; ".join(f"{loc_tokens(o.box, scene.size)} {o.name}" for o in (objects or [scene.target]))


class _PaliGemmaTraining:
    """The PaliGemma side of one run: its model and processor, how a batch is built, the loss, the backends the
    held-out check decodes through, and how the checkpoint is saved."""

    def __init__(self, size: PaliGemmaSize, settings: TrainSettings) -> None:
        from vlm_tools.backends.paligemma_local import IMAGE_TOKEN

        self.settings = settings
        self.model, self.processor = build_paligemma(size, settings.seed)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # as the backend sets it
        self.family = get_family("paligemma")
        self.loc0 = tokenizer.convert_tokens_to_ids("<loc0000>")
        check_paligemma_tokens(tokenizer)
        # Which rows read their prefix causally; a stream of its own so the scenes drawn do not depend on it.
        self.attention_rng = random.Random(settings.seed + 2)
        self.image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.grid = size.image_size // 14

    def build_batch(self, scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
        """Model inputs, labels and attention targets for ``scenes``, each prompt naming its target."""
        from vlm_tools.backends.paligemma_local import IMAGE_TOKEN

        settings = self.settings
        requests = [Request(Task.DETECT, s.image, labels=(s.target.name,)) for s in scenes]
        prompts = [IMAGE_TOKEN + self.family.prompt(r) for r in requests]
        # The same processor call as PaliGemmaBackend._generate, plus the answer as PaliGemma's "suffix": the
        # processor appends it after the prompt's "\n" with <eos>, marks it token_type 1 and masks the rest in labels.
        answers = [paligemma_answer(s) for s in scenes]
        inputs = self.processor(
            text=prompts, images=[s.image for s in scenes], suffix=answers, return_tensors="pt", padding="longest"
        )
        inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"], offset=1)
        # A row whose token types are all 1 reads its prefix causally (see TrainSettings.causal_share).
        causal = torch.tensor([self.attention_rng.random() < settings.causal_share for _ in scenes])
        inputs["token_type_ids"] = inputs["token_type_ids"].masked_fill(causal[:, None], 1)
        batch = dict(inputs)
        if settings.attn_weight > 0:
            # The positions predicting the target's four <loc> tokens look at the whole of it (one set of heads)
            # and each at the edge its token places (another).
            is_loc = (batch["labels"] >= self.loc0) & (batch["labels"] < self.loc0 + LOC_BINS)
            boxes = [[s.target.box] for s in scenes]
            add_attention_targets(batch, scenes, boxes, is_loc, self.image_token, self.grid, per_object=4)
            regions = [edge_bands(s.target.box, s.size, self.grid) for s in scenes]
            add_attention_targets(
                batch, scenes, regions, is_loc, self.image_token, self.grid, 1, key="_attn_target_edges"
            )
        return batch

    def loss(self, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        """Answer cross-entropy, each ``<loc>`` target smoothed over its neighbours, plus attention supervision."""
        loc0 = self.loc0
        logits, wanted, extra = answer_logits(self.model, batch, self.settings, progress)
        logp = F.log_softmax(logits, dim=-1)
        per_token = -logp.gather(1, wanted[:, None]).squeeze(1)
        is_loc = (wanted >= loc0) & (wanted < loc0 + LOC_BINS)
        if is_loc.any():
            # Gaussian over neighbouring bins, sigma_start (30) bins wide at the start (an answer roughly right earns
            # credit while the model learns where things are) narrowing geometrically to 1.5 (sharp answers).
            sigma = self.settings.sigma_start * (1.5 / self.settings.sigma_start) ** progress
            bins = torch.arange(LOC_BINS, dtype=torch.float32)
            centre = (wanted[is_loc] - loc0).float()[:, None]
            soft = torch.exp(-0.5 * ((bins[None, :] - centre) / sigma) ** 2)
            soft = soft / soft.sum(1, keepdim=True)
            per_token = per_token.clone()
            per_token[is_loc] = -(soft * logp[is_loc][:, loc0 : loc0 + LOC_BINS]).sum(1)
        return per_token.mean() + extra

    def make_backends(self) -> dict[str, Backend]:
        """The backend as transformers runs it (``prefix``) and, when trained for it, as vLLM runs it (``causal``)."""
        from vlm_tools.backends.paligemma_local import PaliGemmaBackend

        kinds = {"prefix": PaliGemmaBackend} | ({"causal": _causal_backend()} if self.settings.causal_share else {})
        return {
            mode: kind("training", self.family, self.model, self.processor, device="cpu", max_batch_size=8)
            for mode, kind in kinds.items()
        }

    def save_checkpoint(self, path: Path) -> None:
        """Save model and processor in the hub's layout."""
        from vlm_tools.testing.tiny_paligemma import save_hub_checkpoint

        save_hub_checkpoint(self.model, self.processor, path)


def _causal_backend() -> type[Backend]:
    """:class:`PaliGemmaBackend` with the prompt read causally, as vLLM's CPU attention reads it (no prefix-LM mask).
    Built on demand: the backend module loads transformers' PaliGemma."""
    from vlm_tools.backends.paligemma_local import PaliGemmaBackend

    class CausalPaliGemmaBackend(PaliGemmaBackend):
        """The backend with every token type 1: no bidirectional prefix."""

        bidirectional_prefix = False

    return CausalPaliGemmaBackend


def paligemma_recipe(size: PaliGemmaSize, settings: TrainSettings) -> Recipe:
    """PaliGemma: ``detect {colour} {shape}`` → one box, inputs built as :class:`PaliGemmaBackend` builds them."""
    run = _PaliGemmaTraining(size, settings)
    return Recipe(
        "paligemma", run.model, run.processor, run.make_backends, run.build_batch, run.loss, Task.DETECT,
        run.save_checkpoint, asdict(size),
    )  # fmt: skip


def check_paligemma_tokens(tokenizer: Any) -> None:
    """Every answer the model is taught must tokenise and decode back exactly (loc tokens whole, labels intact).

    Multi-label answers (every object of a scene, ``" ; "`` between) are checked too: the model is taught one label
    per prompt, but the tokenizer must still spell the served multi-label format.
    """
    rng = random.Random(1)
    for _ in range(50):
        scene = ui_scenes.random_scene(rng)
        for objects in ([scene.target], scene.objects):
            text = paligemma_answer(scene, objects)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            locs = sum(tokenizer.convert_ids_to_tokens(i).startswith("<loc") for i in ids)
            if back != text or locs != 4 * len(objects):
                raise RuntimeError(f"the PaliGemma tokenizer does not round-trip {text!r} (got {back!r})")
    words = tokenizer.convert_ids_to_tokens(tokenizer("detect red button", add_special_tokens=False)["input_ids"])
    if words != ["detect", "▁red", "▁button"]:
        raise RuntimeError(f"the PaliGemma tokenizer splits 'detect red button' into {words}")
