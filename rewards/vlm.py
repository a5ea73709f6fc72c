"""Rewards from transformers vision-language models (``AutoModelForImageTextToText``).

* ``vqascore`` — VQAScore-style yes-token reward (Lin et al., arXiv:2404.01291): ask the VLM
  ``Does this figure show "{prompt}"? Please answer yes or no.`` through its chat template and take
  ``P("Yes")`` as the first answer token under the full-vocabulary softmax (not renormalised over
  yes/no).
* ``checklist`` — VisionReward-style (Xu et al., arXiv:2412.21059): a list of (question, weight) asked
  with the same scorer; each question is a named dimension and the total is the weighted sum.
* ``multihead-vlm`` — VideoAlign-style (Liu et al., arXiv:2501.13918): a linear head on the VLM's
  last hidden states at special reward tokens (e.g. visual quality / motion quality / text
  alignment), loaded from a folder in the layout documented in :func:`load_multihead_vlm`.
* ``vlm-pairwise`` (a *pairwise* judge, ``rewards.load_pairwise``) — RewardDance-style (Wu et al.,
  arXiv:2509.08826): one chat turn holds image A then image B and asks whether image 1 is better than
  image 2 for the prompt under a stated criterion (with an optional task instruction in context); the
  judgement is ``P("Yes")`` of the first answer token under the same full-vocabulary softmax
  (:class:`PairwiseYesTokenJudge`; ``symmetric=True`` averages both orders to cancel position bias).

Gradients reach the pixels for the families whose image preprocessing is re-done in torch here:
Qwen2-VL and Qwen2.5-VL (images and videos), LLaVA and PaliGemma. Other families (Idefics3, SmolVLM,
...) are scored through their HF processor on uint8 images and are flagged not differentiable. The
text side always comes from the processor: it is called on blank images of the same size, which
gives exactly the image-token layout of the real image, and its pixel tensors are then replaced by
the differentiable ones. Several images per conversation (the pairwise judge's two) go the same way:
``VisionLanguageModel.inputs`` takes a sequence of equally shaped batches, one per image slot.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from rewards import preprocess
from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.checkpoints import load_pretrained, load_state_dict
from rewards.errors import DamagedCheckpointError, RewardInputError
from rewards.pairwise import PairwiseReward

DEFAULT_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
DEFAULT_PAIRWISE_QUESTION = (
    'Image 1 and image 2 were generated for the prompt "{prompt}". '
    "Is image 1 better than image 2{criterion}? Please answer yes or no."
)
DEFAULT_CRITERION = " in how well it matches the prompt and in visual quality"
DEFAULT_VLM = "Qwen/Qwen2-VL-2B-Instruct"
DIFFERENTIABLE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "paligemma")
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    arrays = (pixels.detach().permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


class VisionLanguageModel(nn.Module):
    """A VLM and its processor, turning (pixels, rendered chat text) into model inputs."""

    def __init__(self, model: nn.Module, processor: Any):
        super().__init__()
        self.model, self.processor = model, processor
        self.family = model.config.model_type
        self.differentiable = self.family in DIFFERENTIABLE_FAMILIES
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # the answer position is then the last one in every row
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def load(
        cls, pretrained: str | None, *, what: str, device: str = "cpu", dtype: str = "float32"
    ) -> VisionLanguageModel:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_dtype = getattr(torch, dtype)
        model = load_pretrained(
            lambda s: AutoModelForImageTextToText.from_pretrained(s, dtype=torch_dtype),
            pretrained,
            default_id=DEFAULT_VLM,
            what=what,
        )
        processor = load_pretrained(
            AutoProcessor.from_pretrained, pretrained, default_id=DEFAULT_VLM, what=f"{what} processor"
        )
        return cls(model.to(device).eval().requires_grad_(False), processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(
        self,
        text: str,
        *,
        video: bool = False,
        generation_prompt: bool = True,
        images: int = 1,
        instruction: str | None = None,
    ) -> str:
        """One user turn holding ``images`` images (or videos) and then ``text``, through the chat
        template; ``instruction``, when given, is a text item before the images (verbatim)."""
        if getattr(self.processor, "chat_template", None) is None:
            raise RewardInputError(
                f"the {self.family} processor has no chat template; use a chat/instruct checkpoint"
            )
        if images < 1:
            raise RewardInputError(f"a turn holds at least one image, got images={images}")
        content = [{"type": "video" if video else "image"} for _ in range(images)]
        content.append({"type": "text", "text": text})
        if instruction is not None:
            content.insert(0, {"type": "text", "text": instruction})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=generation_prompt, tokenize=False
        )

    def inputs(
        self, pixels: torch.Tensor | Sequence[torch.Tensor], texts: list[str]
    ) -> dict[str, torch.Tensor]:
        """Model inputs for B images (B x 3 x H x W) or videos (B x 3 x T x H x W) and B rendered texts.

        ``pixels`` may also be a sequence of N equally shaped batches: N images (videos) per text, text
        i seeing ``pixels[0][i], ..., pixels[N - 1][i]`` in that order (render it with ``images=N``)."""
        if isinstance(pixels, torch.Tensor):
            per_text = 1
        else:
            slots = list(pixels)
            if not slots or any(slot.shape != slots[0].shape for slot in slots):
                raise RewardInputError(
                    "several images per text need equally shaped batches, got "
                    f"{[tuple(slot.shape) for slot in slots]}"
                )
            per_text = len(slots)
            pixels = slots[0] if per_text == 1 else torch.stack(slots, dim=1).flatten(0, 1)  # text-major

        def per_sample(items: list[Any]) -> list[Any]:
            return (
                items if per_text == 1 else [items[i : i + per_text] for i in range(0, len(items), per_text)]
            )

        count = len(texts) * per_text
        video = pixels.ndim == 5
        if video and self.family not in VIDEO_FAMILIES:
            raise RewardInputError(
                f"{self.family} models take images here; video input needs Qwen2-VL / Qwen2.5-VL"
            )
        height, width = pixels.shape[-2:]
        if video:
            frames = pixels.shape[2]
            blank = [np.zeros((frames, height, width, 3), np.uint8) for _ in range(count)]
            batch = self.processor(
                text=texts,
                videos=per_sample(blank),
                padding=True,
                return_tensors="pt",
                do_sample_frames=False,
            )
            values, grid = self._qwen_video(pixels)
            batch["pixel_values_videos"], batch["video_grid_thw"] = values, grid
        elif self.differentiable:
            blank = [Image.new("RGB", (width, height)) for _ in range(count)]
            batch = self.processor(text=texts, images=per_sample(blank), padding=True, return_tensors="pt")
            batch.update(self.pixel_values(pixels))
        else:
            images = per_sample(_pil_images(pixels))
            batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        batch.pop("labels", None)  # PaliGemma's processor adds training labels
        dtype = next(self.model.parameters()).dtype
        return {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in batch.items()
        }

    # ---------------------------------------------------------------- torch preprocessing per family
    def pixel_values(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        ip = self.processor.image_processor
        pixels = pixels.float()
        if self.family in ("qwen2_vl", "qwen2_5_vl"):
            values, grid = self._qwen_patches(pixels.unsqueeze(2), ip)
            return {"pixel_values": values, "image_grid_thw": grid}
        if self.family == "llava":
            size = ip.size["shortest_edge"]
            x = preprocess.resize(pixels, preprocess.shortest_side_size(*pixels.shape[-2:], size))
            x = preprocess.center_crop(x, (ip.crop_size["height"], ip.crop_size["width"]), offsets="floor")
            return {"pixel_values": preprocess.normalize(x, ip.image_mean, ip.image_std)}
        if self.family == "paligemma":
            x = preprocess.resize(pixels, (ip.size["height"], ip.size["width"]))
            return {"pixel_values": preprocess.normalize(x, ip.image_mean, ip.image_std)}
        raise RewardInputError(f"no torch preprocessing for {self.family}")

    def _qwen_video(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._qwen_patches(video.float(), self.processor.video_processor)

    @staticmethod
    def _qwen_patches(video: torch.Tensor, ip: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2-VL's patch layout for B x 3 x T x H x W (images are T = 1, repeated in time): resize to
        ``smart_resize``'s multiple of patch x merge, normalise, pad T to the temporal patch with the
        last frame, and flatten patches in (t, h-block, w-block, h-in-block, w-in-block) order."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        batch, channels, frames, height, width = video.shape
        patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        new_h, new_w = smart_resize(
            height,
            width,
            factor=patch * merge,
            min_pixels=ip.size["shortest_edge"],
            max_pixels=ip.size["longest_edge"],
        )
        x = video.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*T, C, H, W]
        x = preprocess.normalize(preprocess.resize(x, (new_h, new_w)), ip.image_mean, ip.image_std)
        x = x.view(batch, frames, channels, new_h, new_w)
        if frames % temporal:
            x = torch.cat([x, x[:, -1:].expand(-1, temporal - frames % temporal, -1, -1, -1)], dim=1)
        grid_t, grid_h, grid_w = x.shape[1] // temporal, new_h // patch, new_w // patch
        x = x.reshape(
            batch, grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
        )
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # B, t, hb, wb, hm, wm, C, tp, p, p
        values = x.reshape(batch * grid_t * grid_h * grid_w, channels * temporal * patch * patch)
        grid = torch.tensor([[grid_t, grid_h, grid_w]] * batch)
        return values, grid

    def logits_at_end(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits after the last input token of each row ([B, vocab], float32)."""
        extra = {"logits_to_keep": 1} if self._keep_logits else {}
        return self.model(**inputs, **extra).logits[:, -1].float()

    def last_hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs, output_hidden_states=True).hidden_states[-1]


def first_answer_token(tokenizer: Any, rendered: str, answer: str = "Yes") -> int:
    """Id of the first token of ``answer`` right after the rendered prompt. Templates that end in
    whitespace ("assistant\\n") are answered without a leading space, others ("ASSISTANT:") with one."""
    text = answer if rendered[-1:].isspace() else " " + answer
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    full_ids = tokenizer.encode(rendered + text, add_special_tokens=False)
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise RewardInputError(
            f"cannot find the token that starts {answer!r} after the prompt; pass yes_token_id="
        )
    return full_ids[len(prompt_ids)]


def answer_token_id(vlm: VisionLanguageModel, answer: str = "Yes") -> int:
    """The first token of ``answer`` after a rendered question *as the model sees it* (processors may
    append to the rendered text: PaliGemma's adds a newline). The end of a turn does not depend on the
    question or on how many images it holds, so one blank image and the question "x" find it."""
    blank = torch.zeros(1, 3, 56, 56)
    ids = vlm.inputs(blank, [vlm.render("x")])["input_ids"][0]
    seen = vlm.tokenizer.decode(ids[-8:], skip_special_tokens=False)
    return first_answer_token(vlm.tokenizer, seen, answer)


def answer_probability(
    vlm: VisionLanguageModel,
    pixels: torch.Tensor | Sequence[torch.Tensor],
    texts: list[str],
    token_id: int,
) -> torch.Tensor:
    """P(first answer token = ``token_id``) after each rendered text, under the softmax over the whole
    vocabulary (not renormalised over yes/no): [B]. ``pixels`` as in :meth:`VisionLanguageModel.inputs`."""
    logits = vlm.logits_at_end(vlm.inputs(pixels, texts))
    return torch.softmax(logits, dim=-1)[:, token_id]


class YesTokenReward(Reward):
    """P("Yes") as the first answer token to a question about the image."""

    def __init__(
        self,
        vlm: VisionLanguageModel,
        *,
        question: str = DEFAULT_QUESTION,
        answer: str = "Yes",
        yes_token_id: int | None = None,
        info: RewardInfo,
    ):
        super().__init__()
        if "{prompt}" not in question and info.needs_prompt:
            raise RewardInputError("question must contain {prompt}")
        self.vlm, self.question, self.answer = vlm, question, answer
        self._yes_token_id = yes_token_id
        self.info = info

    def yes_token_id(self) -> int:
        """The answer's first token after the prompt *as the model sees it* (processors may append to the
        rendered text: PaliGemma's adds a newline)."""
        if self._yes_token_id is None:
            self._yes_token_id = answer_token_id(self.vlm, self.answer)
        return self._yes_token_id

    def probability(self, pixels: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """P(first answer token = Yes) for each (image, question) pair: [B]."""
        video = pixels.ndim == 5
        texts = [self.vlm.render(q, video=video) for q in questions]
        return answer_probability(self.vlm, pixels, texts, self.yes_token_id())

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        return RewardOutput(self.probability(pixels, [self.question.format(prompt=p) for p in prompts]))


class ChecklistReward(Reward):
    """Weighted yes/no questions; each question's P("Yes") is a named dimension."""

    def __init__(self, scorer: YesTokenReward, questions: Sequence[dict[str, Any]]):
        super().__init__()
        if not questions:
            raise RewardInputError("a checklist needs at least one question")
        self.scorer = scorer
        self.questions = [_checklist_item(q, i) for i, q in enumerate(questions)]
        self.info = RewardInfo(
            name="checklist",
            description="weighted yes/no questions answered by a VLM (VisionReward-style)",
            differentiable=scorer.vlm.differentiable,
            modality="image+video" if scorer.vlm.family in VIDEO_FAMILIES else "image",
            scale="sum of weight * P(Yes)",
            typical_range=(0.0, sum(q["weight"] for q in self.questions)),
            needs_prompt=any("{prompt}" in q["question"] for q in self.questions),
        )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        dims = {
            item["name"]: self.scorer.probability(
                pixels, [item["question"].format(prompt=p) for p in prompts]
            )
            for item in self.questions
        }
        total = sum(item["weight"] * dims[item["name"]] for item in self.questions)
        return RewardOutput(total, dims)


def _checklist_item(item: Any, index: int) -> dict[str, Any]:
    if isinstance(item, str):
        item = {"question": item}
    if not isinstance(item, dict) or not isinstance(item.get("question"), str):
        raise RewardInputError(
            f"checklist item {index} must be a question string or {{question, weight, name}}"
        )
    return {
        "question": item["question"],
        "weight": float(item.get("weight", 1.0)),
        "name": item.get("name", f"q{index}"),
    }


DEFAULT_CHECKLIST = [
    {"name": "alignment", "question": DEFAULT_QUESTION, "weight": 1.0},
    {
        "name": "quality",
        "question": "Is this image sharp, clean and free of artifacts? Please answer yes or no.",
        "weight": 0.5,
    },
    {
        "name": "anatomy",
        "question": "Are the shapes and proportions of everything in this image natural? "
        "Please answer yes or no.",
        "weight": 0.5,
    },
]

VQASCORE_INFO = RewardInfo(
    name="vqascore",
    description="VQAScore-style P(Yes) of a vision-language model asked whether the image shows the prompt",
    differentiable=True,
    modality="image+video",
    scale="probability of the 'Yes' token (full-vocabulary softmax)",
    typical_range=(0.0, 1.0),
    default_checkpoint=DEFAULT_VLM,
)
CHECKLIST_INFO = RewardInfo(
    name="checklist",
    description="weighted yes/no questions answered by a VLM (VisionReward-style)",
    differentiable=True,
    modality="image+video",
    scale="sum of weight * P(Yes)",
    typical_range=(0.0, 2.0),
    default_checkpoint=DEFAULT_VLM,
)


def load_vqascore(
    *,
    pretrained: str | None = None,
    question: str = DEFAULT_QUESTION,
    answer: str = "Yes",
    yes_token_id: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> YesTokenReward:
    """``pretrained``: an image-text-to-text checkpoint with a chat template (default Qwen2-VL-2B-Instruct)."""
    vlm = VisionLanguageModel.load(pretrained, what="vqascore", device=device, dtype=dtype)
    info = RewardInfo(
        **{
            **VQASCORE_INFO.__dict__,
            "differentiable": vlm.differentiable,
            "modality": "image+video" if vlm.family in VIDEO_FAMILIES else "image",
        }
    )
    return YesTokenReward(vlm, question=question, answer=answer, yes_token_id=yes_token_id, info=info)


def load_checklist(
    *,
    pretrained: str | None = None,
    questions: Sequence[Any] | None = None,
    answer: str = "Yes",
    device: str = "cpu",
    dtype: str = "float32",
) -> ChecklistReward:
    """``questions``: a list of strings or ``{question, weight, name}`` ("{prompt}" is filled in)."""
    scorer = load_vqascore(pretrained=pretrained, answer=answer, device=device, dtype=dtype)
    return ChecklistReward(scorer, questions if questions is not None else DEFAULT_CHECKLIST)


# ------------------------------------------------------------------------------------ pairwise judge
class PairwiseYesTokenJudge(PairwiseReward):
    """RewardDance-style pairwise judge (Wu et al., arXiv:2509.08826): P("Yes") that image A is better
    than image B for the prompt.

    One user turn holds ``instruction`` (optional, a text item before the images: RewardDance's task
    instruction in context), image A, image B, then ``question`` filled with the prompt and
    ``criterion``; the judgement is the probability of the first token of ``answer`` at the answer
    position under the full-vocabulary softmax, as :class:`YesTokenReward` (same helpers). Calling it as
    ``judge(pixels_a, pixels_b, prompts)`` gives Tensor[B] in [0, 1].

    ``symmetric=True`` asks both orders and returns ``(P(A > B) + 1 - P(B > A)) / 2``, which cancels a
    preference for the first (or second) position; it costs two VLM calls instead of one.

    Reference mode (RewardDance's pairwise reward against a reference image) is the same judge with the
    references as the second batch: ``judge(samples, references, prompts)``, e.g.
    ``references.expand_as(samples)`` for one reference per batch.

    Gradients reach both pixel batches for the families of ``DIFFERENTIABLE_FAMILIES`` (Qwen2-VL,
    Qwen2.5-VL, LLaVA, PaliGemma): the two images of a turn go through the same torch preprocessing as
    one image. Other families are scored through their processor on uint8 images and are flagged
    ``info.differentiable = False``. Videos (two per turn) work for the Qwen families.
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        *,
        question: str = DEFAULT_PAIRWISE_QUESTION,
        criterion: str = DEFAULT_CRITERION,
        instruction: str | None = None,
        symmetric: bool = False,
        answer: str = "Yes",
        yes_token_id: int | None = None,
    ):
        super().__init__()
        try:
            question.format(prompt="", criterion="")
        except (KeyError, IndexError, ValueError) as error:
            raise RewardInputError(
                f"vlm-pairwise: the question may use only {{prompt}} and {{criterion}} ({error!r}); write a "
                "literal brace as {{ or }}"
            ) from None
        self.vlm, self.question, self.criterion = vlm, question, criterion
        self.instruction, self.symmetric, self.answer = instruction, bool(symmetric), answer
        self._yes_token_id = yes_token_id
        self.info = RewardInfo(
            name="vlm-pairwise",
            description="P(Yes) of a VLM asked whether the first image is better than the second "
            + ("(both orders averaged; RewardDance-style)" if symmetric else "(RewardDance-style)"),
            differentiable=vlm.differentiable,
            modality="image+video" if vlm.family in VIDEO_FAMILIES else "image",
            scale="probability of the 'Yes' token that image A is better (full-vocabulary softmax)",
            typical_range=(0.0, 1.0),
            default_checkpoint=DEFAULT_VLM,
            needs_prompt="{prompt}" in question,
        )

    def yes_token_id(self) -> int:
        if self._yes_token_id is None:
            self._yes_token_id = answer_token_id(self.vlm, self.answer)
        return self._yes_token_id

    def texts(self, prompts: Sequence[str], *, video: bool = False) -> list[str]:
        """The rendered two-image turns for these prompts."""
        return [
            self.vlm.render(
                self.question.format(prompt=p, criterion=self.criterion),
                video=video,
                images=2,
                instruction=self.instruction,
            )
            for p in prompts
        ]

    def first_is_better(self, first: torch.Tensor, second: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """P(Yes) that ``first`` is better than ``second``, in that order in the turn (one VLM call): [B]."""
        texts = self.texts(prompts, video=first.ndim == 5)
        return answer_probability(self.vlm, (first, second), texts, self.yes_token_id())

    def compare(self, pixels_a: torch.Tensor, pixels_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        forward = self.first_is_better(pixels_a, pixels_b, prompts)
        if not self.symmetric:
            return forward
        return 0.5 * (forward + 1.0 - self.first_is_better(pixels_b, pixels_a, prompts))


PAIRWISE_VLM_INFO = RewardInfo(
    name="vlm-pairwise",
    description="P(Yes) of a VLM asked whether the first image is better than the second (RewardDance-style)",
    differentiable=True,
    modality="image+video",
    scale="probability of the 'Yes' token that image A is better (full-vocabulary softmax)",
    typical_range=(0.0, 1.0),
    default_checkpoint=DEFAULT_VLM,
)


def load_pairwise_vlm(
    *,
    pretrained: str | None = None,
    question: str = DEFAULT_PAIRWISE_QUESTION,
    criterion: str = DEFAULT_CRITERION,
    instruction: str | None = None,
    symmetric: bool = False,
    answer: str = "Yes",
    yes_token_id: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> PairwiseYesTokenJudge:
    """The ``vlm-pairwise`` judge. ``pretrained``: an image-text-to-text checkpoint with a chat template
    (default Qwen2-VL-2B-Instruct); ``question``: a template with ``{prompt}`` and ``{criterion}``;
    ``instruction``: task instruction put before the two images; ``symmetric``: average both orders."""
    vlm = VisionLanguageModel.load(pretrained, what="vlm-pairwise", device=device, dtype=dtype)
    return PairwiseYesTokenJudge(
        vlm,
        question=question,
        criterion=criterion,
        instruction=instruction,
        symmetric=symmetric,
        answer=answer,
        yes_token_id=yes_token_id,
    )


# ------------------------------------------------------------------------------------------ multi-head
class MultiHeadVLMReward(Reward):
    """Linear head on the VLM's last hidden state at each special reward token; dimension ``i`` reads
    the head's output ``i`` at special token ``i`` (VideoAlign's ``output_dim = len(tokens)``) or its
    only output (``output_dim = 1``), then ``(r - mean) / std``; the total is the weighted sum."""

    def __init__(self, vlm: VisionLanguageModel, head: nn.Linear, config: dict[str, Any]):
        super().__init__()
        self.vlm, self.head, self.config = vlm, head, config
        self.token_ids = [vlm.tokenizer.convert_tokens_to_ids(t) for t in config["special_tokens"]]
        if any(i is None or i == vlm.tokenizer.unk_token_id for i in self.token_ids):
            raise RewardInputError(
                f"the tokenizer lacks the special reward tokens {config['special_tokens']}"
            )
        self.info = RewardInfo(
            name="multihead-vlm",
            description="linear head on VLM hidden states at special reward tokens (VideoAlign-style)",
            differentiable=vlm.differentiable,
            modality="image+video" if vlm.family in VIDEO_FAMILIES else "image",
            scale="weighted sum of normalised head outputs",
            typical_range=(-3.0, 3.0),
        )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        config, video = self.config, pixels.ndim == 5
        suffix = "".join(config["special_tokens"])
        texts = [
            self.vlm.render(
                config["question"].format(prompt=p) + suffix, video=video, generation_prompt=False
            )
            for p in prompts
        ]
        inputs = self.vlm.inputs(pixels, texts)
        hidden = self.vlm.last_hidden_states(inputs)
        outputs = self.head(hidden.to(self.head.weight.dtype)).float()  # [B, L, output_dim]
        dims, total = {}, torch.zeros(len(prompts), device=outputs.device)
        for i, (name, token_id) in enumerate(zip(config["dimensions"], self.token_ids)):
            position = (inputs["input_ids"] == token_id).int().argmax(dim=1)  # the token's (first) position
            value = outputs[torch.arange(len(prompts)), position, i if outputs.shape[-1] > 1 else 0]
            dims[name] = (value - config["mean"].get(name, 0.0)) / config["std"].get(name, 1.0)
            total = total + config["weights"].get(name, 1.0) * dims[name]
        return RewardOutput(total, dims)


MULTIHEAD_INFO = RewardInfo(
    name="multihead-vlm",
    description="linear head on VLM hidden states at special reward tokens (VideoAlign-style)",
    differentiable=True,
    modality="image+video",
    scale="weighted sum of normalised head outputs",
    typical_range=(-3.0, 3.0),
    default_checkpoint=None,
)


def load_multihead_vlm(*, pretrained: str, device: str = "cpu", dtype: str = "float32") -> MultiHeadVLMReward:
    """A folder holding: the VLM and its processor (``save_pretrained``; the tokenizer knows the special
    tokens), ``reward_head.safetensors`` (``weight``: [output_dim, hidden], no bias) and
    ``reward_config.json``: ``{"special_tokens": [...], "dimensions": [...], "question": "... {prompt} ...",
    "mean": {dim: m}, "std": {dim: s}, "weights": {dim: w}}``. VideoAlign's published model is this
    layout after merging its LoRA (its ``rm_head.weight`` is the head): tokens <|VQ_reward|>,
    <|MQ_reward|>, <|TA_reward|>; means 3.6757, 1.1646, 2.8105 and stds 2.2476, 1.3811, 2.5121."""
    if pretrained is None or not os.path.isdir(pretrained):
        raise RewardInputError(
            f"multihead-vlm needs pretrained=FOLDER in the documented layout, got {pretrained!r}"
        )
    config_path = os.path.join(pretrained, "reward_config.json")
    head_path = os.path.join(pretrained, "reward_head.safetensors")
    for path in (config_path, head_path):
        if not os.path.isfile(path):
            raise RewardInputError(f"multihead-vlm folder {pretrained} has no {os.path.basename(path)}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedCheckpointError(f"multihead-vlm: {config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise RewardInputError(f"multihead-vlm: {config_path} must hold a JSON object")
    config.setdefault("question", "{prompt}")
    for key in ("mean", "std", "weights"):
        config.setdefault(key, {})
    if len(config.get("special_tokens", [])) != len(config.get("dimensions", [])):
        raise RewardInputError("reward_config.json needs as many special_tokens as dimensions")
    vlm = VisionLanguageModel.load(pretrained, what="multihead-vlm", device=device, dtype=dtype)
    weight = load_state_dict(head_path)["weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data.copy_(weight)
    return MultiHeadVLMReward(vlm, head.to(device).eval().requires_grad_(False), config)
