"""Molmo2: the model (:class:`Molmo2Size`, :func:`build_molmo2`), its answers and the training recipe.

``Point to the {colour} {shape}.`` → ``<points coords="1 1 XXX YYY" alt="…">…</points>``: one point at the
target's centre in Molmo2's native format, prompt inputs from
:meth:`vlm_tools.backends.molmo2_local.Molmo2Backend.reference_inputs`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlm_tools.backends.base import Backend, Task
from vlm_tools.families import get_family
from vlm_tools import scenes as ui_scenes
from vlm_tools.scenes import Scene

from .loop import Recipe, request_for
from .settings import TrainSettings
from .supervision import add_attention_targets, answer_logits, loc_code, position_code_2d, position_ids_from_mask


@dataclass
class Molmo2Size:
    """Architecture and image tiling of the trained Molmo2."""

    crop_size: int = 112
    max_crops: int = 2
    overlap_margins: tuple[int, int] = (2, 2)
    pooling: tuple[int, int] = (1, 1)
    """Patches per image token (rows, columns). Molmo2-4B pools 2×2; here each 14-px patch keeps its own token,
    so the low-resolution view is an 8×8 grid rather than 4×4, which a model this small reads positions from
    far sooner."""
    vision_hidden: int = 64
    vision_layers: int = 3
    text_hidden: int = 96
    text_layers: int = 4
    heads: int = 4
    """Attention heads of the vision tower and adapter."""
    text_heads: int = 3
    """Text attention heads, each 32 wide (the narrowest vLLM's CPU attention takes)."""
    init_std: float = 0.1
    """Weight init of every part: about 1/sqrt(text_hidden) (see :attr:`PaliGemmaSize.init_std`)."""


def molmo2_answer(scene: Scene) -> str:
    """Molmo2's native answer for the scene's target: one point at its centre, 0–1000, three digits."""
    width, height = scene.size
    cx, cy = scene.target.center
    x = min(999, max(0, round(cx / width * 1000)))
    y = min(999, max(0, round(cy / height * 1000)))
    name = scene.target.name
    return f'<points coords="1 1 {x:03d} {y:03d}" alt="{name}">{name}</points>'


def _molmo2_corpus() -> list[str]:
    """What the tokenizer's merges are learnt from: every prompt and answer shape the model is taught, the other
    tasks' prompts, and the chat markup."""
    from vlm_tools.families.molmo2 import Molmo2 as Molmo2Family

    lines = []
    rng = random.Random(0)
    for colour in ui_scenes.PALETTE:
        for shape in ui_scenes.SHAPES:
            name = f"{colour} {shape}"
            lines.append(Molmo2Family.point_instruction(name))
            x, y = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f'<points coords="1 1 {x:03d} {y:03d}" alt="{name}">{name}</points>')
    lines += [
        Molmo2Family.brief_caption, Molmo2Family.detailed_caption, Molmo2Family.ocr_instruction,
        "What is in the picture? How many objects are there? Answer in English.",
        "There is nothing like that in the image.", "user\n assistant\n system\n Image 1 Image 2",
    ]  # fmt: skip
    return lines * 4


def molmo2_shape(size: Molmo2Size) -> Any:
    """The hub-layout builder's shape for ``size``: two ViT layers read (the deepest and the first), like the
    hub's two of 27."""
    from vlm_tools.testing.tiny_molmo2 import Molmo2Shape

    return Molmo2Shape(
        crop_size=size.crop_size, max_crops=size.max_crops, overlap_margins=size.overlap_margins,
        pooling=size.pooling, vision_hidden=size.vision_hidden, vision_heads=size.heads,
        vision_intermediate=size.vision_hidden * 4, vit_layers=(-2, -(size.vision_layers + 1)),
        vit_declared_layers=size.vision_layers + 1, text_hidden=size.text_hidden, text_layers=size.text_layers,
        text_heads=size.text_heads, text_kv_heads=size.text_heads, text_head_dim=size.text_hidden // size.text_heads,
        text_intermediate=size.text_hidden * 4, adapter_intermediate=size.text_hidden * 2, init_std=size.init_std,
    )  # fmt: skip


def build_molmo2(size: Molmo2Size, seed: int) -> tuple[torch.nn.Module, Any]:
    """A fresh Molmo2 of ``size`` in the hub's layout (Qwen2-shaped tokenizer whose merges are learnt from the
    prompts and answers taught, the real processor and chat template), its patch positions and digit tokens
    starting as codes of their position and value."""
    from vlm_tools.testing.tiny_molmo2 import new_model

    model, processor = new_model(molmo2_shape(size), seed=seed, corpus=_molmo2_corpus())
    model.set_attn_implementation("sdpa")
    ids = processor.tokenizer.convert_tokens_to_ids
    grid = size.crop_size // 14
    with torch.no_grad():
        model.model.vision_tower.positional_embedding.copy_(0.5 * position_code_2d(grid, size.vision_hidden))
        # Digits are ordinal: the rows of "0".."9" (input and output) start as a code of the digit's value over
        # 0..1 (0.05, 0.15, ...), at the norm of the other rows, so "7" starts out near "6" and "8".
        digit_rows = ids([str(d) for d in range(10)])
        code = loc_code(10, size.text_hidden, high=5.0)
        for table in (model.get_input_embeddings().weight, model.lm_head.weight):
            table[digit_rows] = code * (table.norm(dim=1).mean() / code.norm(dim=1).mean())
    return model, processor


class _Molmo2Training:
    """The Molmo2 side of one run: its model and processor, how a batch is built, the loss, the backend the
    held-out check decodes through, and how the checkpoint is saved."""

    def __init__(self, size: Molmo2Size, settings: TrainSettings) -> None:
        from vlm_tools.backends.molmo2_local import Molmo2Backend

        self.size = size
        self.settings = settings
        self.model, self.processor = build_molmo2(size, settings.seed)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.family = get_family("molmo2")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        check_molmo2_tokens(tokenizer)
        self.digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))
        self.patch_id = tokenizer.convert_tokens_to_ids("<im_patch>")
        self.grid = size.crop_size // 14 // size.pooling[0]
        self.backend_class = Molmo2Backend
        # Prompt inputs come from a backend of its own, built once, exactly as generate() gets them.
        self.builder = self.make_backend()
        self.noise_rng = random.Random(settings.seed + 1)

    def make_backend(self) -> Backend:
        """The real backend class around the model being trained."""
        return self.backend_class("training", self.family, self.model, self.processor, device="cpu", max_batch_size=8)

    def make_backends(self) -> dict[str, Backend]:
        """The one backend the held-out check decodes through (Molmo2 has one attention mode)."""
        return {"": self.make_backend()}

    def _answers(self, scenes: Sequence[Scene]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Per scene: the true answer tokens, the tokens the model must predict, and the tokens it reads."""
        truths = [self.tokenizer(molmo2_answer(s), add_special_tokens=False)["input_ids"] + [self.eos] for s in scenes]
        # What the model reads may differ from what it must predict: see slip_digits.
        slipped = [slip_digits(a, self.digit_ids, self.noise_rng, self.settings.digit_slip) for a in truths]
        return truths, [target for target, _ in slipped], [read for _, read in slipped]

    def build_batch(self, scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
        """Model inputs, labels, digit values and attention targets for ``scenes``."""
        requests = [request_for(Task.POINT, s, 1) for s in scenes]
        # The exact inputs generate() gets: chat template, crops, left padding, control-token sanitising.
        prompt = self.builder.reference_inputs(requests, [self.family.prompt(r) for r in requests])
        truths, answers, inputs = self._answers(scenes)
        width = max(len(a) for a in answers)
        rows = len(scenes)
        answer_ids = torch.full((rows, width), self.pad, dtype=torch.long)
        read_ids = torch.full((rows, width), self.pad, dtype=torch.long)
        answer_mask = torch.zeros((rows, width), dtype=torch.long)
        for i, (answer, read) in enumerate(zip(answers, inputs)):
            answer_ids[i, : len(answer)] = torch.tensor(answer)
            read_ids[i, : len(read)] = torch.tensor(read)
            answer_mask[i, : len(answer)] = 1
        batch = dict(prompt)
        batch["input_ids"] = torch.cat([prompt["input_ids"], read_ids], dim=1)
        batch["attention_mask"] = torch.cat([prompt["attention_mask"], answer_mask], dim=1)
        batch["mm_token_type_ids"] = torch.cat(
            [prompt["mm_token_type_ids"], torch.zeros_like(answer_ids, dtype=prompt["mm_token_type_ids"].dtype)], dim=1
        )
        batch.pop("token_type_ids", None)
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, prompt["input_ids"].shape[1] :] = answer_ids.masked_fill(answer_mask == 0, -100)
        batch["labels"] = labels
        batch["_digit_value"] = torch.stack(
            [digit_values(a, width, self.digit_ids, t) for a, t in zip(answers, truths)]
        )
        if self.settings.attn_weight > 0:
            self._add_attention_targets(batch, scenes, answers, prompt["input_ids"].shape[1])
        return batch

    def _add_attention_targets(
        self, batch: dict[str, torch.Tensor], scenes: Sequence[Scene], answers: Sequence[Sequence[int]], start: int
    ) -> None:
        """The positions predicting the six digits of the point look at the target; the whole-image
        (low-resolution) view's patches come first. ``start`` is where the answers begin."""
        coordinates = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        digit_set = set(self.digit_ids.tolist())
        for row, answer in enumerate(answers):
            digits = [i for i, token in enumerate(answer) if token in digit_set]
            for i in digits[2:8]:
                coordinates[row, start + i] = True
        boxes = [[s.target.box] for s in scenes]
        add_attention_targets(batch, scenes, boxes, coordinates, self.patch_id, self.grid, per_object=6)

    def loss(self, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        """Answer cross-entropy, the hundreds and tens digits smoothed over their neighbours, plus attention
        supervision."""
        logits, wanted, extra = answer_logits(self.model, batch, self.settings)
        logp = F.log_softmax(logits, dim=-1)
        per_token = -logp.gather(1, wanted[:, None]).squeeze(1)
        block = batch["labels"][:, -batch["_digit_value"].shape[1] :]
        values = batch["_digit_value"][block != -100]
        smooth = ~torch.isnan(values)
        if smooth.any():
            # Hundreds and tens digits of a coordinate are ordinal: a Gaussian over the ten digits around the true
            # continuous value (7.345 for the hundreds digit of 734) teaches "near" as well as "right"; 0.8 digits
            # wide at the start, 0.15 (practically one-hot) at the end.
            sigma = 0.8 * (0.15 / 0.8) ** progress
            centres = torch.arange(10, dtype=torch.float32) + 0.5
            soft = torch.softmax(-0.5 * ((centres[None, :] - values[smooth][:, None]) / sigma) ** 2, dim=1)
            per_token = per_token.clone()
            per_token[smooth] = -(soft * logp[smooth][:, self.digit_ids]).sum(1)
        return per_token.mean() + extra

    def save_checkpoint(self, path: Path) -> None:
        """Save model and processor in the hub's layout."""
        from vlm_tools.testing.tiny_molmo2 import save_hub_checkpoint

        save_hub_checkpoint(self.model, self.processor, molmo2_shape(self.size), path)


def molmo2_recipe(size: Molmo2Size, settings: TrainSettings) -> Recipe:
    """Molmo2: its point prompt → its native points; prompt inputs from :meth:`Molmo2Backend.reference_inputs`."""
    run = _Molmo2Training(size, settings)
    return Recipe(
        "molmo2", run.model, run.processor, run.make_backends, run.build_batch, run.loss, Task.POINT,
        run.save_checkpoint, asdict(size),
    )  # fmt: skip


def digit_values(
    answer: Sequence[int], width: int, digit_ids: torch.Tensor, truth: Sequence[int] | None = None
) -> torch.Tensor:
    """Per answer position: the continuous value of a coordinate's hundreds or tens digit (NaN elsewhere).

    The answer's digit tokens are, in order, the image index, the point id, then x and y with three digits each.
    ``truth`` (default ``answer``) gives the hundreds digits' values: after a slipped hundreds digit (see
    :func:`slip_digits`) the hundreds target is still the true one, the tens target the corrected one.
    """
    truth = answer if truth is None else truth
    values = torch.full((width,), float("nan"))
    digit_of = {int(token): d for d, token in enumerate(digit_ids.tolist())}
    digits = [i for i, token in enumerate(answer) if token in digit_of]
    for start in (2, 5):
        true, written = (sum(digit_of[a[digits[start + k]]] * 10 ** (2 - k) for k in range(3)) for a in (truth, answer))
        values[digits[start]] = (true + 0.5) / 100  # hundreds digit: 7.345 for 734
        values[digits[start + 1]] = (written % 100 + 0.5) / 10  # tens digit: 3.45 for 734
    return values


def slip_digits(
    answer: Sequence[int], digit_ids: torch.Tensor, rng: random.Random, share: float
) -> tuple[list[int], list[int]]:
    """Teach the model to finish a coordinate whose hundreds digit it got wrong: returns (targets, inputs).

    Trained on correct prefixes only, a model that writes 8 for the hundreds of 0.904 finishes with the tens and
    units of 904 ("800", 104 off) instead of the nearest value that starts with 8 ("899"). For ``share`` of the
    coordinates the model READS a hundreds digit one off (it still must PREDICT the right one there), and the
    digits after it are the nearest value under that prefix — a one-step form of scheduled sampling.
    """
    targets, read = list(answer), list(answer)
    digit_of = {int(token): d for d, token in enumerate(digit_ids.tolist())}
    digits = [i for i, token in enumerate(answer) if token in digit_of]
    for start in (2, 5):
        if rng.random() >= share:
            continue
        h = digit_of[answer[digits[start]]]
        slipped = h + rng.choice((-1, 1))
        if not 0 <= slipped <= 9:
            continue
        nearest = slipped * 100 + (99 if slipped < h else 0)
        read[digits[start]] = int(digit_ids[slipped])
        for k, d in ((1, nearest // 10 % 10), (2, nearest % 10)):
            targets[digits[start + k]] = read[digits[start + k]] = int(digit_ids[d])
    return targets, read


def check_molmo2_tokens(tokenizer: Any) -> None:
    """Every answer must round-trip exactly, with one token per coordinate digit."""
    rng = random.Random(2)
    for _ in range(50):
        text = molmo2_answer(ui_scenes.random_scene(rng))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=True)
        coords = text.split('"')[1]
        digit_tokens = sum(tokenizer.decode([i]).strip().isdigit() for i in ids)
        if back != text or digit_tokens < sum(c.isdigit() for c in coords):
            raise RuntimeError(f"the Molmo2 tokenizer does not round-trip {text!r} (got {back!r})")
